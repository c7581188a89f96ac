/* batch.c — many sequences through the model's slots at once: generation
 * (jm_generate_batch, and jm_generate, one sequence of it) and the
 * log-likelihood of continuations (jm_score_batch), all on the one batched
 * decode step (jm_infer_batch).
 *
 * The slots are scheduled the same way for both (continuous batching): every
 * busy slot advances in each call, and a slot its sequence leaves takes the
 * next waiting one at once. A sequence starts from the longest prefix of its
 * prompt that any slot still holds (jm_slot_tokens), copied over with
 * jm_slot_copy: the K samples of one prompt prefill it once, and a prompt
 * that repeats an earlier one's system message reuses it. */
#include "base/base.h"
#include "model/ops/ops.h"

#include <math.h>
#include <string.h>

/* Puts slot s at the longest prefix (at most `most` tokens) of ids that any
 * slot holds, s itself included (then nothing is copied); *cached gets its
 * length. */
static jm_status start_slot(jm_model *m, int s, const int32_t *ids, int most, int *cached, jm_error *err)
{
    int best = s, best_n = 0;
    for (int t = 0; t < jm_slots(m); t++) {
        const int32_t *tok = jm_slot_tokens(m, t);
        int len = jm_slot_len(m, t), lim = len < most ? len : most, k = 0;
        while (k < lim && tok[k] == ids[k]) k++;
        if (k > best_n || (k == best_n && t == s)) best = t, best_n = k;
    }
    *cached = best_n;
    return jm_slot_copy(m, best, s, best_n, err);
}

/* The model's slots: those it has, or one of its whole context. */
static jm_status need_slots(jm_model *m, jm_error *err)
{
    return jm_slots(m) ? JM_OK : jm_set_slots(m, 1, jm_model_config(m)->max_position_embeddings, err);
}

/* "sequence 3: " when there are several, for messages. */
static const char *seq_name(int i, int n, char *buf, size_t cap)
{
    if (n > 1) snprintf(buf, cap, "sequence %d: ", i);
    else buf[0] = 0;
    return buf;
}

/* ---- generation ---- */

jm_status jm_generate_batch(jm_model *m, jm_gen_seq *seqs, int n, const jm_sample_opts *o,
                            int (*on_token)(void *ctx, int seq, int32_t id), void *ctx, jm_error *err)
{
    jm_status s = jm_sample_validate(o, err);
    if (!s) s = need_slots(m, err);
    if (s) return s;
    const jm_config *c = jm_model_config(m);
    const int V = c->vocab_size, S = jm_slots(m), context = jm_context(m);
    char at[32];
    for (int i = 0; i < n; i++) {
        jm_gen_seq *q = &seqs[i];
        q->n_out = 0;
        int max_new = q->max_new ? q->max_new : o->max_new;
        seq_name(i, n, at, sizeof at);
        if (q->n_prompt < 1 || !q->prompt)
            return jm_fail(err, JM_ERR_ARG, "%sempty prompt: give at least one token", at);
        if (max_new < 0) return jm_fail(err, JM_ERR_ARG, "%smax_new %d must be >= 0", at, max_new);
        if (q->n_prompt >= context)
            return jm_fail(err, JM_ERR_ARG, "%sprompt of %d tokens does not fit the context of %d (it must leave "
                           "room for at least one new token)", at, q->n_prompt, context);
        if ((int64_t)q->n_prompt + max_new > context)
            return jm_fail(err, JM_ERR_ARG, "%sprompt of %d tokens + %d new exceeds the context of %d", at,
                           q->n_prompt, max_new, context);
    }
    int *seq_of = malloc(sizeof(int) * (size_t)S);
    int32_t *feed = malloc(sizeof(int32_t) * (size_t)S);
    jm_infer_item *items = malloc(sizeof *items * (size_t)S);
    uint64_t *rng = malloc(sizeof(uint64_t) * (size_t)(n ? n : 1));
    void *scratch = malloc(8 * (size_t)V); /* jm_sample's V (float, int32) pairs */
    float *penalised = malloc(sizeof(float) * (size_t)V);
    if (!seq_of || !feed || !items || !rng || !scratch || !penalised) {
        s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < S; i++) seq_of[i] = -1;
    for (int i = 0; i < n; i++) rng[i] = seqs[i].seed;
    int next = 0, busy = 0;
    for (;;) {
        /* each free slot takes the next sequence: its prompt but the last
         * token is cached (shared or prefilled); that token joins the step */
        for (int t = 0; t < S && next < n && !s; t++) {
            if (seq_of[t] >= 0) continue;
            jm_gen_seq *q = &seqs[next];
            if (!(q->max_new ? q->max_new : o->max_new)) {
                next++, t--;
                continue;
            }
            int cached;
            const float *unused;
            s = start_slot(m, t, q->prompt, q->n_prompt - 1, &cached, err);
            if (!s && cached < q->n_prompt - 1) {
                const jm_infer_item pre = {t, cached, q->n_prompt - 1 - cached, q->prompt + cached, 0};
                s = jm_infer_batch(m, &pre, 1, &unused, err);
            }
            seq_of[t] = next++;
            feed[t] = q->prompt[q->n_prompt - 1];
            busy++;
        }
        if (s || !busy) break;
        int ni = 0;
        for (int t = 0; t < S; t++)
            if (seq_of[t] >= 0) items[ni++] = (jm_infer_item){t, jm_slot_len(m, t), 1, &feed[t], 1};
        const float *logits;
        if ((s = jm_infer_batch(m, items, ni, &logits, err))) break;
        for (int i = 0; i < ni; i++) {
            const int t = items[i].slot, qi = seq_of[t];
            jm_gen_seq *q = &seqs[qi];
            /* the penalty's window: what the slot holds, prompt and tokens so far */
            const float *row = jm_apply_repetition_penalty(logits + (int64_t)i * V, penalised, V,
                                                           jm_slot_tokens(m, t), jm_slot_len(m, t), o);
            int32_t id = jm_sample(row, V, o, &rng[qi], scratch);
            q->out[q->n_out++] = id;
            int stop = on_token && on_token(ctx, qi, id); /* EOS too: --ids shows it */
            if (stop || id == c->eos_token_id || q->n_out == (q->max_new ? q->max_new : o->max_new)) {
                seq_of[t] = -1;
                busy--;
            } else {
                feed[t] = id;
            }
        }
    }
out:
    free(seq_of);
    free(feed);
    free(items);
    free(rng);
    free(scratch);
    free(penalised);
    return s;
}

/* jm_generate's one-argument callback under jm_generate_batch's. */
typedef struct {
    int (*on_token)(void *ctx, int32_t id);
    void *ctx;
} one_seq;

static int one_token(void *p, int seq, int32_t id)
{
    (void)seq;
    const one_seq *o = p;
    return o->on_token(o->ctx, id);
}

jm_status jm_generate(jm_model *m, const int32_t *prompt, int n_prompt, const jm_sample_opts *o, int32_t *out,
                      int *n_out, int (*on_token)(void *ctx, int32_t id), void *ctx, jm_error *err)
{
    jm_gen_seq q = {prompt, n_prompt, o->max_new, o->seed, out, 0};
    one_seq cb = {on_token, ctx};
    jm_status s = jm_generate_batch(m, &q, 1, o, on_token ? one_token : NULL, &cb, err);
    *n_out = q.n_out;
    return s;
}

/* ---- scoring ---- */


jm_status jm_score_batch(jm_model *m, jm_score_seq *seqs, int n, jm_error *err)
{
    jm_status s = need_slots(m, err);
    if (s) return s;
    const int V = jm_model_config(m)->vocab_size, S = jm_slots(m), context = jm_context(m);
    char at[32];
    for (int i = 0; i < n; i++) {
        jm_score_seq *q = &seqs[i];
        q->logp = 0;
        seq_name(i, n, at, sizeof at);
        if (!q->ids || q->n_prompt < 1 || q->n <= q->n_prompt)
            return jm_fail(err, JM_ERR_ARG, "%s%d tokens with a prompt of %d: nothing to score", at, q->n,
                           q->n_prompt);
        if (q->n - 1 > context) /* the last token is scored, never fed */
            return jm_fail(err, JM_ERR_ARG, "%s%d tokens exceed the context of %d", at, q->n, context);
    }
    /* rows of logits per call stay near 512: tokens per slot per call */
    const int chunk = 512 / S > 16 ? 512 / S : 16;
    int *seq_of = malloc(sizeof(int) * (size_t)S);
    jm_infer_item *items = malloc(sizeof *items * (size_t)S);
    if (!seq_of || !items) {
        free(seq_of);
        free(items);
        return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    }
    for (int t = 0; t < S; t++) seq_of[t] = -1;
    int next = 0, busy = 0;
    for (;;) {
        for (int t = 0; t < S && next < n && !s; t++) {
            if (seq_of[t] >= 0) continue;
            /* the logits from position n_prompt - 1 on are needed: that token
             * is fed again. The rest of the prompt is prefilled now, alone, so
             * that the next sequences (a task's other choices) find it cached. */
            const jm_score_seq *q = &seqs[next];
            int cached;
            const float *unused;
            s = start_slot(m, t, q->ids, q->n_prompt - 1, &cached, err);
            if (!s && cached < q->n_prompt - 1) {
                const jm_infer_item pre = {t, cached, q->n_prompt - 1 - cached, q->ids + cached, 0};
                s = jm_infer_batch(m, &pre, 1, &unused, err);
            }
            seq_of[t] = next++;
            busy++;
        }
        if (s || !busy) break;
        int ni = 0;
        for (int t = 0; t < S; t++) {
            if (seq_of[t] < 0) continue;
            const jm_score_seq *q = &seqs[seq_of[t]];
            int pos = jm_slot_len(m, t), cnt = q->n - 1 - pos < chunk ? q->n - 1 - pos : chunk;
            int first = pos > q->n_prompt - 1 ? pos : q->n_prompt - 1; /* the first position that predicts */
            items[ni++] = (jm_infer_item){t, pos, cnt, q->ids + pos, pos + cnt > first ? pos + cnt - first : 0};
        }
        const float *logits;
        if ((s = jm_infer_batch(m, items, ni, &logits, err))) break;
        for (int i = 0, row = 0; i < ni; i++) {
            const jm_infer_item *it = &items[i];
            jm_score_seq *q = &seqs[seq_of[it->slot]];
            for (int p = it->pos + it->n - it->logits; p < it->pos + it->n; p++, row++)
                q->logp += log_prob_row(logits + (int64_t)row * V, V, q->ids[p + 1]);
            if (it->pos + it->n == q->n - 1) {
                seq_of[it->slot] = -1;
                busy--;
            }
        }
    }
    free(seq_of);
    free(items);
    return s;
}
