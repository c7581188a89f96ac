/* generate.c — sampling (batch.c's generation loop draws with it), and
 * streaming the text of a generation.
 *
 * Sampling follows the usual order: the repetition penalty (on a copy of the
 * logits), temperature, then top-k, then top-p (nucleus) over the
 * renormalised distribution; greedy (or temperature 0) takes the argmax
 * (lowest id on ties). The generator is seeded per call: no hidden state. */
#include "base/base.h"

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
    if (!o->greedy && !(o->temperature >= 0 && o->temperature <= 100))
        return jm_fail(err, JM_ERR_ARG, "temperature %g must be in [0, 100] (0 = greedy)", o->temperature);
    if (o->top_k < 0) return jm_fail(err, JM_ERR_ARG, "top-k %d must be >= 0 (0 = off)", o->top_k);
    if (!(o->top_p > 0 && o->top_p <= 1)) return jm_fail(err, JM_ERR_ARG, "top-p %g must be in (0, 1]", o->top_p);
    if (!(o->repetition_penalty >= 0) || isinf(o->repetition_penalty))
        return jm_fail(err, JM_ERR_ARG, "repetition penalty %g must be > 0 (1 = off)", o->repetition_penalty);
    if (o->repeat_last_n < -1)
        return jm_fail(err, JM_ERR_ARG, "repeat_last_n %d must be >= -1 (-1 = all)", o->repeat_last_n);
    return JM_OK;
}

/* The first index of the largest logit (a NaN never wins; all NaN: 0). In
 * two passes, the largest value then where it first is: the first
 * vectorises, where one pass carrying the index took 3 cycles a logit (1% of
 * a small model's decode step at a 32000-token vocabulary). */
static int32_t argmax_first(const float *x, int n)
{
    float mx = -INFINITY; /* so that a NaN, compared false, never enters */
#pragma omp simd reduction(max : mx)
    for (int i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    for (int i = 0; i < n; i++)
        if (x[i] == mx) return i;
    return 0;
}

/* Picks the next token from one row of logits. scratch holds V prob_id. */
int32_t jm_sample(const float *logits, int V, const jm_sample_opts *o, uint64_t *rng, void *scratch)
{
    if (o->greedy || o->temperature == 0) return argmax_first(logits, V);
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

/* Writing to a copy makes a repeated id idempotent: its logit is computed
 * from the original each time, so it is penalised once. */
const float *jm_apply_repetition_penalty(const float *logits, float *out, int V, const int32_t *seq, int n,
                                         const jm_sample_opts *o)
{
    const double r = o->repetition_penalty;
    if (r == 0 || r == 1 || o->repeat_last_n == 0) return logits; /* 0: left unset */
    int w = o->repeat_last_n < 0 || o->repeat_last_n > n ? n : o->repeat_last_n;
    memcpy(out, logits, sizeof(float) * (size_t)V);
    for (int i = n - w; i < n; i++) {
        int32_t id = seq[i];
        if (id < 0 || id >= V) continue;
        float x = logits[id];
        out[id] = x > 0 ? (float)(x / r) : (float)(x * r);
    }
    return out;
}

uint64_t jm_seed_stream(uint64_t seed, uint64_t i)
{
    uint64_t s = seed, t = next_u64(&s) ^ i;
    return next_u64(&t);
}

/* ---- streaming text ---- */

/* Decoding the whole sequence again at each token is what keeps the text
 * exact (SentencePiece's leading-space and byte-fallback rules look at
 * neighbours); the decode of a few hundred ids costs microseconds. */
struct jm_text_stream {
    const jm_tokenizer *tok;
    int32_t *ids;
    size_t n, cap;
    size_t prompt_len;    /* bytes of the decoded prompt */
    size_t given;         /* bytes handed out so far (from prompt_len) */
    char **stop;          /* nstop stop strings */
    int nstop;
    size_t hold;          /* the longest stop string's length - 1 */
    int stopped;
    char *text;           /* the latest decode */
};

jm_status jm_text_stream_new(const jm_tokenizer *t, const int32_t *prompt, size_t n_prompt, const char *const *stop,
                             int nstop, jm_text_stream **out, jm_error *err)
{
    *out = NULL;
    for (int i = 0; i < nstop; i++)
        if (!stop[i] || !*stop[i]) return jm_fail(err, JM_ERR_ARG, "stop string %d is empty", i + 1);
    jm_text_stream *s = calloc(1, sizeof *s);
    if (!s) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    s->tok = t;
    s->cap = n_prompt + 64;
    s->ids = malloc(s->cap * sizeof *s->ids);
    s->stop = calloc(nstop > 0 ? (size_t)nstop : 1, sizeof *s->stop);
    int ok = s->ids && s->stop;
    for (int i = 0; ok && i < nstop; i++) {
        ok = (s->stop[i] = strdup(stop[i])) != NULL;
        s->nstop = i + 1;
        size_t h = strlen(stop[i]) - 1;
        s->hold = h > s->hold ? h : s->hold;
    }
    if (!ok) {
        jm_text_stream_free(s);
        return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    }
    if (n_prompt) memcpy(s->ids, prompt, n_prompt * sizeof *prompt);
    s->n = n_prompt;
    size_t len;
    jm_status st = jm_tokenizer_decode(t, s->ids, s->n, &s->text, &len, err);
    if (st) {
        jm_text_stream_free(s);
        return st;
    }
    s->prompt_len = s->given = len;
    *out = s;
    return JM_OK;
}

void jm_text_stream_free(jm_text_stream *s)
{
    if (!s) return;
    free(s->ids);
    for (int i = 0; i < s->nstop; i++) free(s->stop[i]);
    free(s->stop);
    free(s->text);
    free(s);
}

/* Hands out the decoded bytes that can no longer change: not a trailing run
 * of U+FFFD (a character whose bytes are still arriving decodes as one per
 * byte until it is whole), not a tail that may be the start of the stop
 * string, nothing from the stop string on. */
static void stream_take(jm_text_stream *s, size_t len, int final, const char **out, size_t *n)
{
    const size_t p = s->prompt_len;
    size_t stable = len, upto;
    if (!final)
        while (stable >= p + 3 && memcmp(s->text + stable - 3, "\xef\xbf\xbd", 3) == 0) stable -= 3;
    char *hit = NULL; /* the earliest occurrence of any stop string */
    for (int i = 0; i < s->nstop && len > p; i++) {
        char *h = memmem(s->text + p, len - p, s->stop[i], strlen(s->stop[i]));
        if (h && (!hit || h < hit)) hit = h;
    }
    if (hit) {
        upto = (size_t)(hit - s->text);
        s->stopped = 1;
    } else if (s->nstop && !final) {
        /* a match still to come starts within (its length - 1) bytes of the stable end */
        upto = stable - p > s->hold ? stable - s->hold : p;
    } else {
        upto = stable;
    }
    *out = s->text + s->given;
    *n = upto > s->given ? upto - s->given : 0;
    if (upto > s->given) s->given = upto;
}

int jm_text_stream_push(jm_text_stream *s, int32_t id, const char **text, size_t *len, jm_error *err)
{
    *text = "";
    *len = 0;
    if (s->stopped) return 1;
    if (s->n == s->cap) {
        int32_t *p = realloc(s->ids, 2 * s->cap * sizeof *p);
        if (!p) return jm_fail(err, JM_ERR_NOMEM, "out of memory"), -1;
        s->ids = p;
        s->cap *= 2;
    }
    s->ids[s->n++] = id;
    char *t;
    size_t n;
    if (jm_tokenizer_decode(s->tok, s->ids, s->n, &t, &n, err)) {
        s->n--;
        return -1;
    }
    free(s->text);
    s->text = t;
    stream_take(s, n, 0, text, len);
    return s->stopped;
}

void jm_text_stream_flush(jm_text_stream *s, const char **text, size_t *len)
{
    stream_take(s, strlen(s->text), 1, text, len);
}
