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
 * length. With whole, only a prefix of all `most` tokens counts (else s
 * starts empty): scoring then prefills a prompt the same way whether it was
 * cached or not, so a score does not depend on what ran before it (a
 * prefill's BLAS product rounds by its row count). */
static jm_status start_slot(jm_model *m, int s, const int32_t *ids, int most, int whole, int *cached, jm_error *err)
{
    int best = s, best_n = 0;
    for (int t = 0; t < jm_slots(m); t++) {
        const int32_t *tok = jm_slot_tokens(m, t);
        int len = jm_slot_len(m, t), lim = len < most ? len : most, k = 0;
        while (k < lim && tok[k] == ids[k]) k++;
        if (k > best_n || (k == best_n && t == s)) best = t, best_n = k;
    }
    if (whole && best_n < most) best = s, best_n = 0;
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

/* ---- the batcher: continuous batching, one step at a time ---- */

typedef struct {
    int running;
    jm_sample_opts o;  /* this sequence's sampling (a server's requests differ) */
    uint64_t rng;
    int max_new, n_out;
    int32_t feed;      /* the token the next step feeds */
} bslot;

struct jm_batcher {
    jm_model *m;
    int S, V, running;
    bslot *slot;
    jm_infer_item *items;
    void *scratch;     /* jm_sample's V (float, int32) pairs */
    float *penalised;
};

jm_status jm_batcher_new(jm_model *m, jm_batcher **out, jm_error *err)
{
    *out = NULL;
    jm_status s = need_slots(m, err);
    if (s) return s;
    jm_batcher *b = calloc(1, sizeof *b);
    if (!b) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    b->m = m, b->S = jm_slots(m), b->V = jm_model_config(m)->vocab_size;
    b->slot = calloc((size_t)b->S, sizeof *b->slot);
    b->items = malloc(sizeof *b->items * (size_t)b->S);
    b->scratch = malloc(8 * (size_t)b->V);
    b->penalised = malloc(sizeof(float) * (size_t)b->V);
    if (!b->slot || !b->items || !b->scratch || !b->penalised) {
        jm_batcher_free(b);
        return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    }
    *out = b;
    return JM_OK;
}

void jm_batcher_free(jm_batcher *b)
{
    if (!b) return;
    free(b->slot);
    free(b->items);
    free(b->scratch);
    free(b->penalised);
    free(b);
}

int jm_batcher_running(const jm_batcher *b) { return b->running; }
int jm_batcher_free_slot(const jm_batcher *b)
{
    for (int t = 0; t < b->S; t++)
        if (!b->slot[t].running) return t;
    return -1;
}

jm_status jm_batcher_start(jm_batcher *b, int slot, const int32_t *prompt, int n_prompt, const jm_sample_opts *o,
                           uint64_t seed, int max_new, jm_error *err)
{
    jm_model *m = b->m;
    const int context = jm_context(m);
    if (slot < 0 || slot >= b->S || b->slot[slot].running)
        return jm_fail(err, JM_ERR_ARG, "slot %d is not a free slot of %d", slot, b->S);
    jm_status s = jm_sample_validate(o, err);
    if (s) return s;
    if (n_prompt < 1 || !prompt) return jm_fail(err, JM_ERR_ARG, "empty prompt: give at least one token");
    if (max_new < 1) return jm_fail(err, JM_ERR_ARG, "max_new %d must be >= 1", max_new);
    if (n_prompt >= context)
        return jm_fail(err, JM_ERR_ARG, "prompt of %d tokens does not fit the context of %d (it must leave room for "
                       "at least one new token)", n_prompt, context);
    if ((int64_t)n_prompt + max_new > context)
        return jm_fail(err, JM_ERR_ARG, "prompt of %d tokens + %d new exceeds the context of %d", n_prompt, max_new,
                       context);
    /* the prompt but its last token is cached (shared or prefilled now);
     * that token joins the next step */
    int cached;
    const float *unused;
    s = start_slot(m, slot, prompt, n_prompt - 1, 0, &cached, err);
    if (!s && cached < n_prompt - 1) {
        const jm_infer_item pre = {slot, cached, n_prompt - 1 - cached, prompt + cached, 0};
        s = jm_infer_batch(m, &pre, 1, &unused, err);
    }
    if (s) return s;
    b->slot[slot] = (bslot){1, *o, seed, max_new, 0, prompt[n_prompt - 1]};
    b->running++;
    return JM_OK;
}

void jm_batcher_stop(jm_batcher *b, int slot)
{
    if (slot >= 0 && slot < b->S && b->slot[slot].running) b->slot[slot].running = 0, b->running--;
}

jm_status jm_batcher_step(jm_batcher *b, int (*on_token)(void *ctx, int slot, int32_t id, jm_gen_end end),
                          void *ctx, jm_error *err)
{
    jm_model *m = b->m;
    const int eos = jm_model_config(m)->eos_token_id;
    int ni = 0;
    for (int t = 0; t < b->S; t++)
        if (b->slot[t].running) b->items[ni++] = (jm_infer_item){t, jm_slot_len(m, t), 1, &b->slot[t].feed, 1};
    if (!ni) return JM_OK;
    const float *logits;
    jm_status s = jm_infer_batch(m, b->items, ni, &logits, err);
    if (s) return s;
    for (int i = 0; i < ni; i++) {
        const int t = b->items[i].slot;
        bslot *q = &b->slot[t];
        /* the penalty's window: what the slot holds, prompt and tokens so far */
        const float *row = jm_apply_repetition_penalty(logits + (int64_t)i * b->V, b->penalised, b->V,
                                                       jm_slot_tokens(m, t), jm_slot_len(m, t), &q->o);
        const int32_t id = jm_sample(row, b->V, &q->o, &q->rng, b->scratch);
        q->n_out++;
        const jm_gen_end end = id == eos ? JM_GEN_EOS : q->n_out == q->max_new ? JM_GEN_LENGTH : JM_GEN_MORE;
        const int stop = on_token && on_token(ctx, t, id, end); /* EOS too: --ids shows it */
        if (stop || end != JM_GEN_MORE) jm_batcher_stop(b, t);
        else q->feed = id;
    }
    return JM_OK;
}

/* ---- generation: a set of sequences through the batcher ---- */

typedef struct {
    jm_gen_seq *seqs;
    int *seq_of; /* slot -> sequence */
    int (*on_token)(void *ctx, int seq, int32_t id);
    void *ctx;
} gen_run;

static int gen_token(void *p, int slot, int32_t id, jm_gen_end end)
{
    (void)end;
    gen_run *g = p;
    const int qi = g->seq_of[slot];
    jm_gen_seq *q = &g->seqs[qi];
    q->out[q->n_out++] = id;
    return g->on_token && g->on_token(g->ctx, qi, id);
}

jm_status jm_generate_batch(jm_model *m, jm_gen_seq *seqs, int n, const jm_sample_opts *o,
                            int (*on_token)(void *ctx, int seq, int32_t id), void *ctx, jm_error *err)
{
    jm_status s = jm_sample_validate(o, err);
    if (!s) s = need_slots(m, err);
    if (s) return s;
    const int context = jm_context(m);
    char at[32];
    for (int i = 0; i < n; i++) { /* every sequence checked before any runs */
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
    jm_batcher *b;
    if ((s = jm_batcher_new(m, &b, err))) return s;
    gen_run g = {seqs, malloc(sizeof(int) * (size_t)b->S), on_token, ctx};
    if (!g.seq_of) s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
    int next = 0;
    while (!s) {
        /* each free slot takes the next sequence */
        for (int t; next < n && !s && (t = jm_batcher_free_slot(b)) >= 0; next++) {
            jm_gen_seq *q = &seqs[next];
            const int max_new = q->max_new ? q->max_new : o->max_new;
            if (!max_new) continue;
            g.seq_of[t] = next;
            s = jm_batcher_start(b, t, q->prompt, q->n_prompt, o, q->seed, max_new, err);
        }
        if (s || !jm_batcher_running(b)) break;
        s = jm_batcher_step(b, gen_token, &g, err);
    }
    free(g.seq_of);
    jm_batcher_free(b);
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
            s = start_slot(m, t, q->ids, q->n_prompt - 1, 1, &cached, err);
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
