/* flags.h — the CLI's commands and their typed flag tables.
 *
 * Each command is a cli_command: its name ("generate", or "tokenizer encode"
 * for a subcommand), its positional argument, a paragraph of help, and a
 * table of cli_flag. A flag's value lands in the command's own options struct
 * at the flag's offset, typed by its kind; the parser checks types and ranges,
 * so every command says the same thing the same way ("--threads wants an
 * integer in [0, 4096], got '-1'"), and the usage text is generated from the
 * same table, defaults included. A default is written as it would be typed
 * and goes through the same parser: what --help shows is what runs. */
#ifndef JM_CLI_FLAGS_H
#define JM_CLI_FLAGS_H

#include "jetmoe.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CLI_MAX_REPEAT 16 /* a repeatable flag's values at most */
#define CLI_RUN (-1)      /* cli_parse: go on and run (any other value is the exit code) */

typedef enum {
    FLAG_STR,  /* const char * */
    FLAG_INT,  /* int64_t in [lo, hi] */
    FLAG_REAL, /* double in [lo, hi], or (lo, hi] with open_lo */
    FLAG_BOOL, /* int: 1 when given; takes no value */
    FLAG_LIST, /* cli_list: a string each time the flag is given */
} flag_kind;

typedef struct {
    const char *v[CLI_MAX_REPEAT];
    int n;
} cli_list;

typedef struct {
    const char *name;       /* "--max-new" */
    const char *alias[2];   /* other spellings ("-n"), or NULL */
    flag_kind kind;
    size_t offset;          /* of the value in the command's options struct */
    const char *def;        /* the default as typed, or NULL: none (the help says what happens) */
    double lo, hi;          /* FLAG_INT, FLAG_REAL: the range */
    int open_lo;            /* FLAG_REAL: lo itself excluded */
    int required;
    const char *meta;       /* the value's name in the usage: "N", "TEXT" */
    const char *help;       /* one line */
} cli_flag;

typedef struct cli_command cli_command;
struct cli_command {
    const char *name;       /* "generate", "tokenizer encode" */
    const char *positional; /* "DIR" (then required), or NULL: none */
    const char *summary;    /* one line, for 'jetmoe help' */
    const char *about;      /* the paragraph under the usage */
    const cli_flag *flags;
    int nflags;
    int (*run)(const cli_command *self, int argc, char **argv);
};

/* The flags of the commands that run a model for inference (generate, chat,
 * eval, serve), in an options struct T with int64_t threads and const char
 * *kernels, *kv_cache, *weights. WEIGHTS: --weights' default. A copy in RAM
 * costs up to ~2.5 s per GB at start on a virtual machine whose fresh memory
 * the host backs on first touch (the zeroing of new pages is most of it): the
 * long runs (chat, serve, eval) default to auto, a one-off generate to map. */
#define CLI_MODEL_FLAGS(T, WEIGHTS)                                                                                 \
    {"--threads", {NULL}, FLAG_INT, offsetof(T, threads), "0", 0, 4096, .meta = "N",                                \
     .help = "threads, 0 = all cores"},                                                                               \
    {"--kernels", {NULL}, FLAG_STR, offsetof(T, kernels), "auto", .meta = "auto|avx512|avx2|portable",               \
     .help = "the decode product kernels (avx512 or avx2 is this CPU's tuning of the set; set:stream, for "         \
             "AMD family 0x19, and set:prefetch name one)"},                                                          \
    {"--kv-cache", {NULL}, FLAG_STR, offsetof(T, kv_cache), "f32", .meta = "f32|bf16",                               \
     .help = "the KV cache's element type (bf16: half the bytes)"},                                                  \
    {"--weights", {NULL}, FLAG_STR, offsetof(T, weights), WEIGHTS, .meta = "auto|map|ram",                            \
     .help = "read the weights in place (map) or from a copy in 2 MB-page memory (ram: faster decoding, the "      \
             "model's size in RAM); auto: the copy when it fits in 3/4 of the available memory"}

/* jm_model_open with the chosen kernels (--kernels), KV cache type
 * (--kv-cache) and weights' place (--weights, jm_weights_place); NULL *m on
 * failure. */
jm_status cli_open_model(const char *dir, const char *kernels, const char *kv_cache, const char *weights,
                         jm_model **m, jm_error *err);

/* Parses argv[1..argc) (argv[0] is the command's last word) into opts and
 * *positional: applies the defaults, then the arguments. -h/--help anywhere
 * prints the usage to stdout and returns 0; an error prints one line to stderr
 * and returns 2; otherwise CLI_RUN. */
int cli_parse(const cli_command *c, int argc, char **argv, void *opts, const char **positional);

/* The usage text, all of it generated from the table: synopsis, about, flags. */
void cli_usage(FILE *f, const cli_command *c);
/* "jetmoe init OUT_DIR --config FILE [options]" */
void cli_synopsis(FILE *f, const cli_command *c);
/* Every spelling the parser accepts, one a line (for tests: 'jetmoe help --flags CMD'). */
void cli_list_flags(FILE *f, const cli_command *c);

/* The uniform one-line errors: "jetmoe CMD: <message>" (exit 2: the
 * arguments) and "jetmoe CMD: <status>: <library message>" (exit 1). */
__attribute__((format(printf, 2, 3))) int cli_error(const cli_command *c, const char *fmt, ...);
int cli_fail(const cli_command *c, jm_status s, const jm_error *err);
/* s as every message shows it (control characters as \xNN, see jm_error), in e->msg: for
 * text from files, paths and arguments printed outside cli_error/cli_fail. */
const char *cli_shown(jm_error *e, const char *s);

/* The model directory a user means by path: the directory, a training run or
 * its checkpoints/latest (jm_checkpoint_resolve); a run is announced on stderr
 * ("using RUN/checkpoints/step_N"). Returns CLI_RUN, or the exit code after the error. */
int cli_model_dir(const cli_command *c, const char *path, char *out, size_t cap);

/* "1,5,9" -> ids (malloc'd); -1 unless every field is an int32. */
int cli_parse_ids(const char *list, int32_t **out, int *n);

/* The sampling flags of generate, chat and the distill commands land in a
 * cli_sampling inside the command's options (TYPE's member FIELD); the
 * defaults that differ are the arguments. */
typedef struct {
    int64_t max_new, top_k, seed, repeat_last_n; /* seed < 0: none given */
    double temperature, top_p, repeat_penalty;
    int greedy;
} cli_sampling;

#define CLI_SAMPLING_FLAGS(TYPE, FIELD, MAX_NEW, TEMPERATURE, TOP_P)                                              \
    {"--max-new", {"-n"}, FLAG_INT, offsetof(TYPE, FIELD.max_new), MAX_NEW, 1, 1 << 20, .meta = "N",              \
     .help = "new tokens at most"},                                                                                \
    {"--temperature", {"--temp"}, FLAG_REAL, offsetof(TYPE, FIELD.temperature), TEMPERATURE, 0, 100, .meta = "T", \
     .help = "sampling temperature, 0 = greedy"},                                                                  \
    {"--top-k", {NULL}, FLAG_INT, offsetof(TYPE, FIELD.top_k), "0", 0, 1 << 24, .meta = "K",                      \
     .help = "sample among the K most likely tokens, 0 = all"},                                                    \
    {"--top-p", {NULL}, FLAG_REAL, offsetof(TYPE, FIELD.top_p), TOP_P, 0, 1, .open_lo = 1, .meta = "P",           \
     .help = "nucleus: sample among the most likely tokens holding mass P"},                                       \
    {"--seed", {NULL}, FLAG_INT, offsetof(TYPE, FIELD.seed), NULL, 0, 2147483647, .meta = "S",                    \
     .help = "sampling seed; random when not given (printed to stderr)"},                                          \
    {"--greedy", {NULL}, FLAG_BOOL, offsetof(TYPE, FIELD.greedy), .help = "always the most likely token"},         \
    {"--repeat-penalty", {"--repetition-penalty"}, FLAG_REAL, offsetof(TYPE, FIELD.repeat_penalty), "1", 0, 100,  \
     .open_lo = 1, .meta = "R", .help = "penalise the tokens of the last --repeat-last-n, 1 = off"},               \
    {"--repeat-last-n", {NULL}, FLAG_INT, offsetof(TYPE, FIELD.repeat_last_n), "64", -1, 1 << 20, .meta = "N",    \
     .help = "the repetition penalty's window, prompt included; -1 = all, 0 = off"}

/* The library's sampling options from the flags (set seed to -1 before
 * parsing). Without --seed the seed is random, and printed to stderr when it
 * matters (not greedy) so that the run can be repeated. */
jm_sample_opts cli_sample_opts(const cli_sampling *s, int max_new);

/* Whether argv (as cli_parse took it) gives the flag named name, under any spelling. */
int cli_flag_given(const cli_command *c, int argc, char **argv, const char *name);
/* The checkpoint's generation_config.json (when there is one) as the defaults
 * of the sampling flags argv does not give: temperature (do_sample false:
 * 0, greedy), top_p, top_k, repetition_penalty, max_new_tokens. CLI_RUN, or
 * the exit code after a malformed file's error. */
int cli_sampling_defaults(const cli_command *c, int argc, char **argv, const char *dir, cli_sampling *s);

/* The commands, by family (cmd_model.c, cmd_data.c, cmd_train.c, cmd_infer.c, cmd_distill.c,
 * cmd_serve.c). */
extern const cli_command cmd_info, cmd_forward, cmd_init, cmd_quantize;
extern const cli_command cmd_tokenizer_encode, cmd_tokenizer_decode, cmd_tokenizer_chat, cmd_tokenizer_train,
    cmd_prepare;
extern const cli_command cmd_pretrain;
extern const cli_command cmd_sft;
extern const cli_command cmd_dpo;
extern const cli_command cmd_generate, cmd_chat, cmd_eval;
extern const cli_command cmd_distill_sft, cmd_distill_pairs;
extern const cli_command cmd_serve;

#endif
