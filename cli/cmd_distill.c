/* cmd_distill.c — distillation from a local teacher: distill sft, distill pairs
 * (src/align/distill.c does the work). */
#include "flags.h"
#include "align/align.h"

#include <signal.h>
#include <string.h>

typedef struct {
    const char *teacher, *model, *prompts, *out, *kernels, *on_bad_line;
    int64_t samples, parallel, threads;
    int overwrite, quiet;
    cli_sampling smp;
} distill_cli;

#define DISTILL_FLAGS(TEMPERATURE)                                                                                \
    {"--prompts", {NULL}, FLAG_STR, offsetof(distill_cli, prompts), .required = 1, .meta = "FILE.jsonl",          \
     .help = "prompt records: {\"messages\": [... a user turn last]} or {\"prompt\": TEXT}, \"answer\" optional"}, \
    {"--out", {NULL}, FLAG_STR, offsetof(distill_cli, out), .required = 1, .meta = "FILE.jsonl",                  \
     .help = "the records written (atomically)"},                                                                  \
    CLI_SAMPLING_FLAGS(distill_cli, smp, "256", TEMPERATURE, "1"),                                                \
    {"--parallel", {NULL}, FLAG_INT, offsetof(distill_cli, parallel), "8", 1, 1024, .meta = "N",                  \
     .help = "sequences decoded together, each weight read once per step for all"},                                \
    {"--on-bad-line", {NULL}, FLAG_STR, offsetof(distill_cli, on_bad_line), "fail", .meta = "skip|fail",          \
     .help = "a bad prompt line: stop with its FILE:LINE, or report it and go on"},                               \
    {"--overwrite", {NULL}, FLAG_BOOL, offsetof(distill_cli, overwrite),                                           \
     .help = "replace an existing --out (never an input)"},                                                        \
    {"--threads", {NULL}, FLAG_INT, offsetof(distill_cli, threads), "0", 0, 4096, .meta = "N",                    \
     .help = "threads, 0 = all cores"},                                                                            \
    {"--kernels", {NULL}, FLAG_STR, offsetof(distill_cli, kernels), "auto", .meta = "auto|avx512|avx2|portable", \
     .help = "the BF16/Q8/Q4 product kernels (avx512 or avx2 is this CPU's tuning of the set; set:stream "       \
             "and set:prefetch name one)"},                                                                        \
    {"--quiet", {NULL}, FLAG_BOOL, offsetof(distill_cli, quiet), .help = "no progress and summary on stderr"}

static int run_distill(const cli_command *self, int argc, char **argv);

static const cli_flag sft_flags[] = {
    {"--teacher", {NULL}, FLAG_STR, offsetof(distill_cli, teacher), .required = 1, .meta = "DIR",
     .help = "the teacher checkpoint (its tokenizer and chat template) that answers"},
    DISTILL_FLAGS("0"),
};

const cli_command cmd_distill_sft = {
    "distill sft", NULL, "a teacher's answers to prompts, as SFT records",
    "The teacher in --teacher (any JetMoE checkpoint; BF16/Q8/Q4/F32 weights used in place) answers\n"
    "each prompt of --prompts in its chat template, and --out gets one SFT record per prompt:\n"
    "{\"messages\": [...the prompt..., {\"role\": \"assistant\", \"content\": ANSWER}]}, with the prompt's\n"
    "\"answer\" kept when it has one. Answers are greedy by default (--temperature 0); they end at EOS\n"
    "or --max-new. The teacher's generation_config.json (temperature, do_sample, top_p, top_k,\n"
    "repetition_penalty, max_new_tokens) sets the defaults of the sampling flags not given. --parallel\n"
    "answers are decoded together. An empty answer is not written. Ends with a JSON line of counts on\n"
    "stdout.",
    sft_flags, (int)(sizeof sft_flags / sizeof sft_flags[0]), run_distill};

static const cli_flag pairs_flags[] = {
    {"--model", {NULL}, FLAG_STR, offsetof(distill_cli, model), .required = 1, .meta = "DIR",
     .help = "the checkpoint whose sampled answers are ranked"},
    {"--teacher", {NULL}, FLAG_STR, offsetof(distill_cli, teacher), .meta = "DIR",
     .help = "ranks by its mean log-probability of each answer (needed for prompts without \"answer\")"},
    {"--samples", {NULL}, FLAG_INT, offsetof(distill_cli, samples), "4", 2, 256, .meta = "K",
     .help = "answers sampled per prompt"},
    DISTILL_FLAGS("1.0"),
};

const cli_command cmd_distill_pairs = {
    "distill pairs", NULL, "rank a model's sampled answers into preference pairs",
    "Samples --samples answers per prompt from --model (temperature 1.0 by default, or its\n"
    "generation_config.json's unless that says greedy; a flag given wins) and ranks them:\n"
    "when the prompt record has an \"answer\", by a verifier (the final answer, GSM8K's \"#### N\" or the\n"
    "last number, must match); otherwise by the --teacher's mean log-probability of the answer's tokens\n"
    "given the rendered prompt. When every answer is right, or every one wrong, the teacher breaks the\n"
    "tie if there is one; else the prompt gives no pair and is counted. --out gets the best and worst\n"
    "answer of each prompt, {\"prompt\": [...], \"chosen\": [...], \"rejected\": [...], \"score_chosen\",\n"
    "\"score_rejected\", \"ranked_by\"} (UltraFeedback's layout, read by dpo). Ends with a JSON line of counts\n"
    "on stdout: prompts, pairs written, and why the others gave none.",
    pairs_flags, (int)(sizeof pairs_flags / sizeof pairs_flags[0]), run_distill};

/* Set by SIGINT/SIGTERM: the run ends soon and writes nothing. */
static volatile int distill_stop;
static void on_stop(int sig)
{
    (void)sig;
    distill_stop = 1;
}

static void summary(const cli_command *self, const jm_distill_stats *st, int pairs, int quiet)
{
    const double rate = st->seconds > 0 ? (double)st->tokens / st->seconds : 0;
    if (!quiet) {
        fprintf(stderr, "jetmoe %s: %lld prompts (%lld bad lines skipped), %lld answers (%lld tokens, %.1f tok/s), ",
                self->name, (long long)st->prompts, (long long)st->bad_lines, (long long)st->answers,
                (long long)st->tokens, rate);
        if (pairs)
            fprintf(stderr, "%lld pairs written (%lld by the verifier, %lld by the teacher); no pair: %lld all right, "
                    "%lld all wrong, %lld tied, %lld with fewer than 2 answers\n", (long long)st->written,
                    (long long)st->by_verifier, (long long)st->by_teacher, (long long)st->skip_all_right,
                    (long long)st->skip_all_wrong, (long long)st->skip_tied, (long long)st->skip_empty);
        else
            fprintf(stderr, "%lld records written, %lld empty answers left out; %lld of %lld checkable answers "
                    "right, %lld with a final \"#### \" line\n", (long long)st->written, (long long)st->skip_empty,
                    (long long)st->right, (long long)st->verified, (long long)st->formatted);
    }
    printf("{\"prompts\": %lld, \"bad_lines\": %lld, \"answers\": %lld, \"tokens\": %lld, \"seconds\": %.3f, ",
           (long long)st->prompts, (long long)st->bad_lines, (long long)st->answers, (long long)st->tokens,
           st->seconds);
    if (pairs)
        printf("\"pairs\": %lld, \"by_verifier\": %lld, \"by_teacher\": %lld, \"skipped_all_right\": %lld, "
               "\"skipped_all_wrong\": %lld, \"skipped_tied\": %lld, \"skipped_too_few_answers\": %lld, "
               "\"answers_too_long_for_teacher\": %lld}\n", (long long)st->written, (long long)st->by_verifier,
               (long long)st->by_teacher, (long long)st->skip_all_right, (long long)st->skip_all_wrong,
               (long long)st->skip_tied, (long long)st->skip_empty, (long long)st->skip_teacher_context);
    else
        printf("\"records\": %lld, \"skipped_empty\": %lld, \"verified\": %lld, \"right\": %lld, \"formatted\": %lld}\n",
               (long long)st->written, (long long)st->skip_empty, (long long)st->verified, (long long)st->right,
               (long long)st->formatted);
}

static int run_distill(const cli_command *self, int argc, char **argv)
{
    const int pairs = self == &cmd_distill_pairs;
    distill_cli o = {.smp.seed = -1};
    int rc = cli_parse(self, argc, argv, &o, NULL);
    if (rc != CLI_RUN) return rc;
    int skip = strcmp(o.on_bad_line, "skip") == 0;
    if (!skip && strcmp(o.on_bad_line, "fail") != 0)
        return cli_error(self, "--on-bad-line wants skip or fail, got '%s'", o.on_bad_line);
    char dir[2][4096];
    const char *paths[2] = {pairs ? o.model : o.teacher, pairs ? o.teacher : NULL};
    for (int i = 0; i < 2; i++) /* announces a run directory's checkpoint; the library resolves it again */
        if (paths[i] && (rc = cli_model_dir(self, paths[i], dir[i], sizeof dir[i])) != CLI_RUN) return rc;
    /* the sampling defaults of the model that answers, from its generation_config.json, as generate
     * and chat take them (a flag given wins); but pairs keeps sampling when that file says greedy
     * (do_sample false, temperature 0): its answers would all be the same */
    const double temperature = o.smp.temperature;
    if ((rc = cli_sampling_defaults(self, argc, argv, dir[0], &o.smp)) != CLI_RUN) return rc;
    if (pairs && o.smp.temperature == 0 && !cli_flag_given(self, argc, argv, "--temperature"))
        o.smp.temperature = temperature;
    jm_set_threads((int)o.threads);
    jm_distill_opts d = {.prompts = o.prompts, .out = o.out, .teacher = o.teacher, .model = o.model,
                         .kernels = o.kernels, .samples = (int)o.samples, .max_new = (int)o.smp.max_new,
                         .parallel = (int)o.parallel, .sample = cli_sample_opts(&o.smp, (int)o.smp.max_new),
                         .overwrite = o.overwrite, .skip_bad = skip, .quiet = o.quiet, .stop = &distill_stop};
    struct sigaction sa = {0}, old_int, old_term;
    sa.sa_handler = on_stop;
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    jm_distill_stats st;
    jm_error err;
    jm_status s = pairs ? jm_distill_pairs(&d, &st, &err) : jm_distill_sft(&d, &st, &err);
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    if (s) {
        rc = cli_fail(self, s, &err);
        return distill_stop ? 130 : rc;
    }
    summary(self, &st, pairs, o.quiet);
    return 0;
}
