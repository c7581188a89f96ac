/* align.h — alignment: the SFT and preference (DPO) datasets (records.c),
 * their objectives on the training loop, and distillation from a teacher.
 * Uses base, model, tokenizer, train and infer. */
#ifndef JM_ALIGN_H
#define JM_ALIGN_H

#include "base/base.h"

/* ---- records (records.c): JSONL files -> token sequences with loss masks ----
 *
 * SFT records, one JSON object per line:
 *   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
 *     rendered with the tokenizer's chat template (jm_chat_encode, BOS first).
 *     Loss tokens: each assistant turn's tokens, from where its text starts
 *     (the tokens after the rendering of the messages before it with the
 *     generation prompt) through the first EOS after that start (the turn's
 *     end-of-turn token) - template text after the EOS gets none.
 *   {"input_ids": [...], "labels": [...]}  pre-tokenized, HF's convention:
 *     labels aligned with input_ids, -100 = no loss (labels absent: every
 *     token is a label). Used exactly as given: no BOS/EOS added.
 *
 * Preference records:
 *   {"prompt": P, "chosen": C, "rejected": R}: P a string (one user turn) or
 *     a list of messages; C and R each a string (the assistant's answer) or a
 *     list of messages holding the whole conversation (UltraFeedback
 *     binarized), whose last message is the assistant's answer and whose
 *     earlier messages are the prompt (then "prompt" may be left out). The
 *     prompt is rendered with the generation prompt; the completion is the
 *     rest of the rendered conversation through its first EOS.
 *   {"prompt_input_ids": [...], "chosen_input_ids": [...],
 *    "rejected_input_ids": [...]} (TRL's names): each sequence is the prompt
 *     ids followed by the completion ids, exactly as given.
 *
 * Bad lines - malformed JSON, missing or mistyped fields, unknown roles,
 * empty completions, no assistant turn, token ids outside [0, vocab), a prompt
 * that leaves no room for its completion in max_len - are reported as
 * "FILE:LINE: why". With skip_bad each is printed to stderr and counted;
 * otherwise the first one is the error. Blank lines are ignored. */

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
    int max_len;    /* tokens a sequence may have (the training context) */
    int truncate;   /* 1: a longer sequence is cut to max_len (SFT: its end; preference: the completion's end);
                       0: it is dropped. Either way it is counted. */
    int skip_bad;   /* --on-bad-line skip: report bad lines on stderr, count them and go on */
    int vocab_size; /* the model's: ids must be in [0, vocab_size) */
    int quiet;      /* no per-line reports on stderr (the counts still are kept) */
} jm_records_opts;

typedef struct {
    int64_t lines;      /* non-blank lines read */
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
 * bad line that says a tokenizer is needed). */
jm_status jm_sft_load(const char *const *files, int nfiles, const jm_tokenizer *t, const jm_records_opts *o,
                      jm_sft_set *out, jm_records_stats *st, jm_error *err);
void jm_sft_free(jm_sft_set *s);
jm_status jm_pref_load(const char *const *files, int nfiles, const jm_tokenizer *t, const jm_records_opts *o,
                       jm_pref_set *out, jm_records_stats *st, jm_error *err);
void jm_pref_free(jm_pref_set *s);

/* Prompts for distillation: {"messages": [...]} ending in a user turn, or
 * {"prompt": "..."} (one user turn); an optional "answer" (a string or a
 * number: GSM8K's "... #### 42", or just 42) lets a verifier rank samples.
 * max_len bounds the rendered prompt (jm_chat_encode with the generation
 * prompt): a longer one is a bad line. Strings point into the set's arena. */
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
 * last "####" (else the last number in the text), without spaces, thousands
 * commas, a trailing '.' or a ".0" fraction; NULL when there is none. The
 * result is written into buf. Exact match of two final answers is strcmp. */
const char *jm_final_answer(const char *text, char *buf, size_t cap);

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
