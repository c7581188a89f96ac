/* generate.c — sampling and the generation loop.
 *
 * Sampling follows the usual order: temperature, then top-k, then top-p
 * (nucleus) over the renormalised distribution; greedy takes the argmax
 * (lowest id on ties). The generator is seeded per call: no hidden state. */
#include "internal.h"

#include <math.h>
#include <string.h>

typedef struct {
    float p;
    int32_t id;
} prob_id;

static int by_prob_desc(const void *a, const void *b)
{
    const prob_id *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static uint64_t next_u64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

jm_status jm_sample_validate(const jm_sample_opts *o, jm_error *err)
{
    if (!o->greedy && !(o->temperature > 0 && o->temperature <= 100))
        return jm_fail(err, JM_ERR_ARG, "temperature %g must be in (0, 100] (or use greedy)", o->temperature);
    if (o->top_k < 0) return jm_fail(err, JM_ERR_ARG, "top-k %d must be >= 0 (0 = off)", o->top_k);
    if (!(o->top_p > 0 && o->top_p <= 1)) return jm_fail(err, JM_ERR_ARG, "top-p %g must be in (0, 1]", o->top_p);
    return JM_OK;
}

/* Picks the next token from one row of logits. scratch holds V prob_id. */
int32_t jm_sample(const float *logits, int V, const jm_sample_opts *o, uint64_t *rng, void *scratch)
{
    if (o->greedy) {
        int32_t best = 0;
        for (int i = 1; i < V; i++)
            if (logits[i] > logits[best]) best = i;
        return best;
    }
    prob_id *pi = scratch;
    float mx = logits[0];
    for (int i = 1; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    double sum = 0;
    for (int i = 0; i < V; i++) {
        pi[i].p = expf((logits[i] - mx) / (float)o->temperature);
        pi[i].id = i;
        sum += pi[i].p;
    }
    int n = V;
    if ((o->top_k > 0 && o->top_k < V) || o->top_p < 1) {
        qsort(pi, (size_t)V, sizeof *pi, by_prob_desc);
        if (o->top_k > 0 && o->top_k < n) n = o->top_k;
        sum = 0;
        for (int i = 0; i < n; i++) sum += pi[i].p;
        if (o->top_p < 1) { /* the smallest prefix whose mass reaches top_p */
            double acc = 0;
            for (int i = 0; i < n; i++) {
                acc += pi[i].p;
                if (acc >= o->top_p * sum) {
                    n = i + 1;
                    break;
                }
            }
            sum = 0;
            for (int i = 0; i < n; i++) sum += pi[i].p;
        }
    }
    double r = (double)(next_u64(rng) >> 11) * (1.0 / 9007199254740992.0) * sum, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += pi[i].p;
        if (r < acc) return pi[i].id;
    }
    return pi[n - 1].id;
}

jm_status jm_generate(jm_model *m, const int32_t *prompt, int n_prompt, const jm_sample_opts *o, int32_t *out,
                      int *n_out, int (*on_token)(void *ctx, int32_t id), void *ctx, jm_error *err)
{
    *n_out = 0;
    const jm_config *c = jm_model_config(m);
    jm_status s = jm_sample_validate(o, err);
    if (s) return s;
    if (n_prompt < 1) return jm_fail(err, JM_ERR_ARG, "empty prompt: give at least one token");
    int context = jm_context(m) ? jm_context(m) : c->max_position_embeddings;
    if (n_prompt >= context)
        return jm_fail(err, JM_ERR_ARG, "prompt of %d tokens does not fit the context of %d (it must leave room for "
                       "at least one new token)", n_prompt, context);
    if ((int64_t)n_prompt + o->max_new > context)
        return jm_fail(err, JM_ERR_ARG, "prompt of %d tokens + %d new exceeds the context of %d", n_prompt, o->max_new,
                       context);
    const int V = c->vocab_size;
    int32_t *seq = malloc(sizeof(int32_t) * (size_t)(n_prompt + o->max_new));
    void *scratch = malloc(sizeof(prob_id) * (size_t)V);
    if (!seq || !scratch) {
        free(seq);
        free(scratch);
        return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    }
    memcpy(seq, prompt, sizeof(int32_t) * (size_t)n_prompt);
    uint64_t rng = o->seed;
    int n = n_prompt;
    const float *logits;
    /* prefill the prompt in one batched pass, then one cached step per token */
    if (!(s = jm_infer(m, seq, n, 0, &logits, err))) {
        for (int i = 0; i < o->max_new; i++) {
            int32_t id = jm_sample(logits, V, o, &rng, scratch);
            seq[n++] = id;
            out[(*n_out)++] = id;
            if (on_token && on_token(ctx, id)) break; /* EOS too: --ids shows it */
            if (id == c->eos_token_id) break;
            if (i + 1 < o->max_new && (s = jm_infer(m, &id, 1, n - 1, &logits, err))) break;
        }
    }
    free(seq);
    free(scratch);
    return s;
}
