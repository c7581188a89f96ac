/* align.h — alignment: the SFT and preference (DPO) datasets (records.c),
 * their objectives on the training loop, and distillation from a teacher.
 * Uses base, model, tokenizer, train and infer. */
#ifndef JM_ALIGN_H
#define JM_ALIGN_H

#include "base/base.h"
#include "train/train.h"

/* ---- records (records.c): JSONL files -> token sequences with loss masks ----
 *
 * SFT records, one JSON object per line:
 *   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
 *     rendered with the tokenizer's chat template (jm_chat_encode, BOS first).
 *     Loss tokens: each assistant turn's tokens, from where its text starts
 *     (the tokens after the rendering of the messages before it with the
 *     generation prompt; where a token merged across that boundary, from the
 *     first token the two renderings do not share) through the first EOS after
 *     that start (the turn's end-of-turn token; a template that writes none:
 *     through the end of the turn's rendering) - template text after the EOS
 *     gets none. At least one assistant turn, none of them empty.
 *   {"input_ids": [...], "labels": [...]}  pre-tokenized, HF's convention:
 *     labels aligned with input_ids, -100 = no loss (labels absent: every
 *     token is a label). Used exactly as given: no BOS/EOS added.
 *   Either way labels[0] is -1: nothing precedes the first token to predict
 *   it from (HF's shifted loss never uses it either).
 *
 * Preference records:
 *   {"prompt": P, "chosen": C, "rejected": R}: P a string (one user turn) or
 *     a list of messages; C and R each a string (the assistant's answer) or a
 *     list of messages holding the whole conversation (UltraFeedback
 *     binarized), whose last message is the assistant's answer and whose
 *     earlier messages are the prompt (then "prompt" may be left out, and C's
 *     and R's must be the same; when given, it must equal them: a string the
 *     one user message's content). The prompt is rendered with the generation
 *     prompt; the completion is the rest of the rendered conversation through
 *     its first EOS, or to its end (n_prompt: where the two renderings part,
 *     as for SFT).
 *   {"prompt_input_ids": [...], "chosen_input_ids": [...],
 *    "rejected_input_ids": [...]} (TRL's names): each sequence is the prompt
 *     ids followed by the completion ids, exactly as given.
 *
 * Other fields of a record are ignored (UltraChat's "prompt_id", ...); a
 * record with both layouts' fields is a bad line. Bad lines - malformed JSON,
 * a string holding \u0000, missing or mistyped fields, unknown roles, empty
 * completions, no assistant turn, no token to learn, token ids outside
 * [0, vocab) (given, or from the tokenizer), a prompt that leaves no room for
 * its completion in max_len - are reported as "FILE:LINE: why", naming the
 * field ("messages"[2].role). With skip_bad each is printed to stderr and
 * counted; otherwise the first one is the error. Blank lines are ignored (but
 * counted in LINE). Reading errors and running out of memory are never
 * skipped. A load that keeps no example at all fails (JM_ERR_FORMAT, with the
 * counts), so an empty set never reaches training. */

typedef struct {
    int32_t *ids;    /* n ids */
    int32_t *labels; /* n: ids[t] (or the given label) where token t is learned, -1 where not */
    int n;
} jm_sft_example;

/* One side of a preference pair: the prompt ids then the completion ids. */
typedef struct {
    int32_t *ids;
    int n, n_prompt; /* completion = ids[n_prompt .. n), never empty; n_prompt >= 1 */
} jm_pref_seq;

typedef struct {
    jm_pref_seq chosen, rejected;
} jm_pref_example;

typedef struct {
    int max_len;    /* tokens a sequence may have (the training context), >= 2 */
    int truncate;   /* 1: a longer sequence is cut to max_len (SFT: its end; preference: the completion's end);
                       0: it is dropped. Either way it is counted. */
    int skip_bad;   /* --on-bad-line skip: report bad lines on stderr, count them and go on */
    int vocab_size; /* the model's: ids must be in [0, vocab_size) */
    int quiet;      /* no per-line reports on stderr (the counts still are kept) */
} jm_records_opts;

typedef struct {
    int64_t lines;      /* non-blank lines read: used + too_long + bad */
    int64_t used;       /* examples kept */
    int64_t truncated;  /* kept, but cut to max_len */
    int64_t too_long;   /* dropped because longer than max_len (truncate == 0) */
    int64_t bad;        /* bad lines skipped (skip_bad) */
    int64_t tokens;     /* tokens in the kept examples */
    int64_t loss_tokens;/* SFT: learned tokens; preference: completion tokens */
} jm_records_stats;

/* Every example of a file list, in file then line order. The sets own their
 * memory (one arena each); free with the matching _free. */
typedef struct jm_sft_set {
    jm_sft_example *ex;
    int64_t n;
    void *arena; /* owned */
} jm_sft_set;
typedef struct jm_pref_set {
    jm_pref_example *ex;
    int64_t n;
    void *arena; /* owned */
} jm_pref_set;

/* t may be NULL when every record is pre-tokenized (a text record is then a
 * bad line that says a tokenizer is needed). st may be NULL; after an error it
 * holds the counts so far. On error *out is empty. */
jm_status jm_sft_load(const char *const *files, int nfiles, const jm_tokenizer *t, const jm_records_opts *o,
                      jm_sft_set *out, jm_records_stats *st, jm_error *err);
void jm_sft_free(jm_sft_set *s);
jm_status jm_pref_load(const char *const *files, int nfiles, const jm_tokenizer *t, const jm_records_opts *o,
                       jm_pref_set *out, jm_records_stats *st, jm_error *err);
void jm_pref_free(jm_pref_set *s);

/* Prompts for distillation: {"messages": [...]} ending in a user turn, or
 * {"prompt": "..."} (one user turn; TRL's conversational {"prompt": [...]},
 * a list of messages ending in a user turn, too); an optional "answer" (a
 * string, a number - kept as its shortest exact decimal, 42 as "42" - or
 * null: GSM8K's "... #### 42", or just 42) lets a verifier rank samples.
 * max_len bounds the rendered prompt (jm_chat_encode with the generation
 * prompt, so t is required): one of max_len tokens or more leaves no room to
 * generate and is a bad line. Contents and answers point into the set's
 * arena, roles to static strings; stats count the prompt tokens. */
typedef struct {
    jm_chat_message *msgs;
    int nmsgs;
    const char *answer; /* NULL when the record has none */
    int64_t line;       /* 1-based line in its file */
    int file;           /* index into the file list */
} jm_prompt_record;
typedef struct jm_prompt_set {
    jm_prompt_record *rec;
    int64_t n;
    void *arena; /* owned */
} jm_prompt_set;
jm_status jm_prompts_load(const char *const *files, int nfiles, const jm_tokenizer *t, const jm_records_opts *o,
                          jm_prompt_set *out, jm_records_stats *st, jm_error *err);
void jm_prompts_free(jm_prompt_set *s);

/* The final answer of a text as GSM8K's verifier reads it: what follows the
 * last "####" up to the end of its line (else the last number in the text:
 * "-5", "1,234.5"), without spaces, thousands commas (a comma between two
 * digits), trailing '.'s or a ".0", ".00" ... fraction after a digit; NULL
 * when there is none, or when it does not fit in buf (cap bytes with the NUL).
 * The result is written into buf. Exact match of two final answers is strcmp. */
const char *jm_final_answer(const char *text, char *buf, size_t cap);


/* ---- packing (pack.c) ---- */

/* A sequence to pack: n ids and, per position, the id it predicts (-1: none). */
typedef struct {
    const int32_t *ids, *targets;
    int n;
} jm_seq_ref;

/* A packed batch (jm_batch over the buffers below, reused from call to call)
 * and where each sequence landed: start[i] is the flat index (row * T + column)
 * of sequence i's first token. weight is scratch of the same size, zeroed. */
typedef struct {
    jm_batch batch;
    int32_t *tokens, *positions, *targets;
    float *weight;
    int64_t *start;
    int n;
    size_t cap;
} jm_packed;

/* order <- a permutation of 0..n-1, the same for the same (seed, epoch). */
void jm_shuffle(int64_t *order, int64_t n, uint64_t seed, int64_t epoch);
/* Rows of at most max_len that next-fit packing makes of sequences of these
 * lengths, in order; row_of (optional, n) receives each one's row, first
 * (optional, rows + 1) the index of each row's first sequence, then n. */
int64_t jm_pack_rows(const int *len, int64_t n, int max_len, int64_t *row_of, int64_t *first);
/* Packs n >= 1 sequences (each at most max_len) into p. */
jm_status jm_pack(jm_packed *p, const jm_seq_ref *seq, int n, int max_len, jm_error *err);
void jm_packed_free(jm_packed *p);

/* ---- fine-tuning: `jetmoe sft` (sft.c) and `jetmoe dpo` (dpo.c) ---- */

typedef struct {
    const char *model;                /* the starting checkpoint (any HF JetMoE: BF16, sharded, ...) */
    const char *const *data;          /* the training records */
    int ndata;
    const char *const *eval_data;     /* held-out records, scored at the start, every eval_every and the end */
    int neval;
    const char *recipe;               /* NULL: the defaults (README: Fine-tuning) */
    const char *ref;                  /* DPO: the reference checkpoint; NULL: the starting one */
    const char *dump_grad;            /* the whole data as one batch: loss and gradients to this file, no step */
    double beta, label_smoothing;     /* DPO; < 0: the recipe's */
    int skip_bad;                     /* --on-bad-line skip */
    jm_train_opts run;                /* out_dir, resume, overwrite, stop, stop_after, quiet */
} jm_tune_opts;
jm_status jm_sft(const jm_tune_opts *o, int *stopped, jm_error *err);
jm_status jm_dpo(const jm_tune_opts *o, int *stopped, jm_error *err);

/* One optimizer step's forward and backward over a whole set as one
 * micro-batch (packed into rows of max_len), the gradients ADDED to m's: what
 * --dump-grad writes, and what bench/align times. loss <- the objective, the
 * CE (SFT) or DPO loss, aux_loss, z_loss. DPO: ref holds the reference's
 * summed completion log-probs, chosen then rejected for each pair. */
jm_status jm_sft_set_grads(jm_model *m, const jm_sft_set *data, int max_len, double loss[4], jm_error *err);
jm_status jm_dpo_set_grads(jm_model *m, const jm_pref_set *data, const double *ref, int max_len, double beta,
                           double eps, double loss[4], jm_error *err);

/* What sft.c and dpo.c share (tune.c): the recipe with the command line's
 * overrides, the tokenizer, the model, the dump of --dump-grad. */
typedef struct {
    jm_recipe *r;
    jm_tokenizer *tok;     /* NULL when the checkpoint has none (pre-tokenized records only) */
    char tok_dir[4096];    /* where the tokenizer files came from ("" : none) */
    jm_config cfg;         /* the starting checkpoint's, with the recipe's router-loss weights */
    jm_records_opts ropts;
} jm_tune_setup;
jm_status jm_tune_setup_open(const jm_tune_opts *o, jm_task_kind kind, jm_tune_setup *t, jm_error *err);
void jm_tune_setup_close(jm_tune_setup *t);
/* The model training starts from (NULL on --resume: the run's checkpoint is). */
jm_status jm_tune_load_model(const jm_tune_opts *o, const jm_tune_setup *t, jm_model **m, jm_error *err);
/* Writes loss, the named scalars and grad.<name> of every parameter. */
jm_status jm_dump_grads(const char *path, const jm_model *m, const char *const *names, const double *values, int n,
                        const jm_tune_opts *o, jm_error *err);
/* A fine-tune's data cursor is its step (the plan follows from the seed); its
 * checkpoint keeps the data's size under name, so a resume with other data
 * (that the run's hash did not catch) is refused rather than mis-planned. */
int jm_tune_count_state(st_out *out, int cap, const char *name, const int64_t *n, jm_error *err);
jm_status jm_tune_count_restore(const st_file *f, const char *name, const char *what, int64_t n, jm_error *err);
/* The paths a run reads (never to be replaced): model, ref, recipe, data. */
int jm_tune_inputs(const jm_tune_opts *o, const char **inputs, int cap);

/* ---- distillation from a local teacher (distill.c) ----
 *
 * jm_distill_sft: the teacher answers every prompt record (jm_prompts_load)
 * with its chat template and writes an SFT record per prompt,
 *   {"messages": [...the prompt's messages..., {"role": "assistant", "content": ANSWER}], "answer": ...}
 * ("answer" kept when the prompt record has one, so later steps can verify).
 * jm_distill_pairs: the model samples `samples` answers per prompt, ranked
 * by the verifier when the record has an "answer" (jm_distill_verify), else
 * by the teacher's mean log-probability of each answer's tokens given the
 * rendered prompt; when the verifier finds every answer right, or every one
 * wrong, the teacher breaks the tie if there is one, else the prompt gives no
 * pair and is counted. Each pair is written in UltraFeedback's layout,
 *   {"prompt": [...], "chosen": [...prompt, answer], "rejected": [...prompt, answer],
 *    "score_chosen": S, "score_rejected": S, "ranked_by": "verifier"|"teacher", "answer": ...}
 * (scores: the verifier's 1 or 0, or the teacher's mean log p).
 * Both decode on the batched step (jm_generate_batch, jm_score_batch) with
 * `parallel` slots; each answer samples from its own stream, derived from
 * the seed and the record's line (and the sample's number), so the output
 * does not depend on `parallel`. An empty answer is never written (the
 * readers refuse one): counted in skip_empty. out follows the output rule
 * (jm_output_file: replaced only with overwrite, never an input) and is
 * written atomically: on an error or a stop nothing is left. */
typedef struct {
    const char *prompts;        /* JSONL of prompt records */
    const char *out;            /* the JSONL written */
    const char *teacher;        /* checkpoint: sft's answers; pairs' ranking without a verifier (optional there) */
    const char *model;          /* pairs: the checkpoint whose answers are ranked */
    const char *kernels;        /* jm_set_kernels for both; NULL = "auto" */
    int samples;                /* pairs: answers per prompt, >= 2 */
    int max_new;                /* tokens per answer at most */
    int parallel;               /* sequences decoded together (jm_set_slots), >= 1 */
    jm_sample_opts sample;      /* sampling; its seed seeds the run, max_new is the field above */
    int overwrite;              /* replace an existing out */
    int skip_bad;               /* --on-bad-line skip */
    int quiet;                  /* no progress on stderr */
    const volatile int *stop;   /* set asynchronously (SIGINT): end soon, write nothing; may be NULL */
} jm_distill_opts;

typedef struct {
    int64_t prompts;            /* prompt records used */
    int64_t bad_lines;          /* skipped (skip_bad) */
    int64_t answers, tokens;    /* answers generated, and their tokens */
    int64_t written;            /* sft: records; pairs: pairs */
    int64_t verified, right, formatted; /* sft: answers to prompts with an "answer"; of them, the verifier's
                                           right ones and those with a final "#### " line (GSM8K's format) */
    int64_t by_verifier, by_teacher;          /* pairs ranked by each */
    int64_t skip_all_right, skip_all_wrong;   /* no pair: the verifier could not tell them apart, no teacher */
    int64_t skip_tied;          /* no pair: the teacher's best and worst answers are the same text */
    int64_t skip_empty;         /* sft: empty answers; pairs: prompts with fewer than two non-empty answers */
    int64_t skip_teacher_context; /* pairs: answers too long for the teacher's context, not ranked by it */
    double seconds;
} jm_distill_stats;

jm_status jm_distill_sft(const jm_distill_opts *o, jm_distill_stats *st, jm_error *err);
jm_status jm_distill_pairs(const jm_distill_opts *o, jm_distill_stats *st, jm_error *err);

/* The verifier: 1 when text's final answer is answer's (jm_final_answer of
 * each; an answer without a number or "####" is compared whole, trimmed). */
int jm_distill_verify(const char *text, const char *answer);

/* How one prompt's answers were ranked, or why they give no pair. */
typedef enum {
    JM_RANK_VERIFIER,   /* a right answer over a wrong one (the first of each, in sample order) */
    JM_RANK_TEACHER,    /* the teacher's best over its worst */
    JM_RANK_ALL_RIGHT,  /* no pair: every answer right, and no teacher */
    JM_RANK_ALL_WRONG,  /* no pair: every answer wrong, and no teacher */
    JM_RANK_TIED,       /* no pair: no answer differs from the teacher's best */
    JM_RANK_TOO_FEW,    /* no pair: fewer than two answers to rank */
} jm_rank;
/* Ranks k answers: text[i] (the empty ones, and NULL, take no part); right
 * (k, or NULL: no verifier) 1 where the verifier found answer i right; score
 * (k, or NULL: no teacher) the teacher's mean log p. *chosen and *rejected
 * get the pair's indices when the result is JM_RANK_VERIFIER or _TEACHER. */
jm_rank jm_distill_rank(int k, const char *const *text, const int *right, const double *score, int *chosen,
                        int *rejected);

#endif
