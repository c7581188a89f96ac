/* eval.c — scoring a model on evaluation tasks the way lm-evaluation-harness
 * does (jm_eval_run), and the rolling perplexity of text files
 * (jm_eval_text). The task files and their prompt formats are tasks.c's; here
 * is what the model computes on them, all on the one batched decode step:
 *
 *   multiple choice  the model reads [BOS] + enc(context) + cont, where
 *                    cont = enc(context + choice)[len(enc(context)):] after
 *                    the context's trailing whitespace moves to the front
 *                    of the choice (the harness' rule); a choice's score is the sum
 *                    of log p over cont. acc: the argmax of the scores;
 *                    acc_norm: of the scores over the choice's length in bytes.
 *                    Each context is prefilled once: the choices of an example
 *                    follow one another through jm_score_batch, which finds the
 *                    context cached (in the same slot, or copied from another).
 *   generative       greedy generation after [BOS] + enc(prompt) until EOS, a
 *                    stop string or max_gen tokens; the answer is group 1 of
 *                    the task's regex (first match), compared with the
 *                    reference after both drop ",", "$" and a final ".", and
 *                    case (the harness' exact_match settings for GSM8K).
 *   perplexity       rolling windows of at most `window` tokens, each token
 *                    predicted once (below).
 *
 * Standard errors are the harness' mean_stderr: the sample standard
 * deviation (n - 1) over sqrt(n). */
#include "base/base.h"

#include <ctype.h>
#include <math.h>
#include <regex.h>
#include <stdarg.h>
#include <string.h>

/* err's message after "where: " (s returned). */
static jm_status prefixed(jm_error *err, jm_status s, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static jm_status prefixed(jm_error *err, jm_status s, const char *fmt, ...)
{
    char where[512], inner[sizeof err->msg];
    snprintf(inner, sizeof inner, "%s", err->msg);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(where, sizeof where, fmt, ap);
    va_end(ap);
    return jm_fail(err, s, "%s: %s", where, inner);
}

/* ---- the token rule ---- */

/* enc(text) into a malloc'd array. */
static jm_status encode(const jm_tokenizer *tok, const char *text, size_t len, int32_t **ids, size_t *n,
                        jm_error *err)
{
    return jm_tokenizer_encode(tok, text, len, ids, n, err);
}

/* The ids of one (context, continuation) pair: [BOS] + enc(ctx) + cont as
 * the header says; *n_prompt = 1 + len(enc(ctx)). When the whole does not fit
 * `fit` tokens, the context loses tokens on the left (after the BOS), as the
 * harness truncates; *cut counts them. *ids is malloc'd. */
static jm_status pair_ids(const jm_tokenizer *tok, const char *ctx, const char *cont, int fit, int32_t **ids,
                          int *n, int *n_prompt, int *cut, jm_error *err)
{
    size_t lc = strlen(ctx), spaces = 0; /* trailing whitespace, as the harness' context.rstrip() (ASCII) */
    while (spaces < lc && strchr(" \t\n\v\f\r", ctx[lc - 1 - spaces])) spaces++;
    const size_t lx = strlen(cont), lw = lc + lx;
    char *whole = malloc(lw + 1);
    if (!whole) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    memcpy(whole, ctx, lc);
    memcpy(whole + lc, cont, lx + 1);
    int32_t *c_ids = NULL, *w_ids = NULL;
    size_t nc = 0, nw = 0;
    jm_status s = encode(tok, ctx, lc - spaces, &c_ids, &nc, err); /* the context without its trailing spaces */
    if (!s) s = encode(tok, whole, lw, &w_ids, &nw, err);
    free(whole);
    if (!s && nw <= nc)
        s = jm_fail(err, JM_ERR_ARG, "the choice \"%.40s\" adds no token after its context", cont);
    if (!s) {
        const int ncont = (int)(nw - nc);
        int nctx = (int)nc;
        *cut = 0;
        if (1 + nctx + ncont > fit) {
            if (1 + ncont > fit) {
                s = jm_fail(err, JM_ERR_ARG, "a choice of %d tokens does not fit the context of %d", ncont, fit - 1);
            } else {
                *cut = 1 + nctx + ncont - fit;
                nctx -= *cut;
            }
        }
        if (!s && !(*ids = malloc(sizeof(int32_t) * (size_t)(1 + nctx + ncont))))
            s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
        if (!s) {
            (*ids)[0] = jm_tokenizer_bos_id(tok);
            memcpy(*ids + 1, c_ids + *cut, sizeof(int32_t) * (size_t)nctx);
            memcpy(*ids + 1 + nctx, w_ids + nc, sizeof(int32_t) * (size_t)ncont);
            *n = 1 + nctx + ncont;
            *n_prompt = 1 + nctx;
        }
    }
    free(c_ids);
    free(w_ids);
    return s;
}

/* ---- scores and their standard errors ---- */

typedef struct {
    double sum, sum2;
    int n;
} mean_acc;

static void mean_add(mean_acc *a, double x) { a->sum += x, a->sum2 += x * x, a->n++; }
static double mean_of(const mean_acc *a) { return a->n ? a->sum / a->n : 0; }
static double stderr_of(const mean_acc *a)
{
    if (a->n < 2) return 0;
    double mu = a->sum / a->n, var = (a->sum2 - a->n * mu * mu) / (a->n - 1);
    return var > 0 ? sqrt(var / a->n) : 0;
}

/* The first index of the largest value (ties go to the first, as np.argmax). */
static int argmax(const double *v, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* ---- multiple choice ---- */

/* Examples scored per jm_score_batch call: enough sequences to keep the
 * slots busy, few enough that the ids stay small. */
#define MC_GROUP 16
/* Slots: an example's choices and the next examples' side by side, so each
 * decode step reads the weights once for several continuations. */
#define EVAL_SLOTS 4

/* Scores examples [i0, i1) of t: every choice's ids, then one
 * jm_score_batch over all of them (an example's choices consecutive). */
static jm_status mc_group(jm_model *m, const jm_tokenizer *tok, const jm_eval_task *t, const jm_eval_opts *o,
                          int i0, int i1, jm_eval_result *r, mean_acc *acc, mean_acc *norm,
                          int (*on_record)(void *, const jm_eval_record *), void *ctx, jm_error *err)
{
    int total = 0;
    for (int i = i0; i < i1; i++) total += t->ex[i].nchoices;
    jm_score_seq *q = calloc((size_t)total, sizeof *q);
    int32_t **ids = calloc((size_t)total, sizeof *ids);
    double *ll = malloc(sizeof(double) * 2 * (size_t)total); /* scores, then the same over bytes */
    jm_status s = q && ids && ll ? JM_OK : jm_fail(err, JM_ERR_NOMEM, "out of memory");
    const int fit = jm_context(m) + 1; /* the last token is scored, never fed */
    int k = 0;
    for (int i = i0; i < i1 && !s; i++) {
        const jm_eval_example *e = &t->ex[i];
        char *prefix = NULL;
        s = jm_eval_fewshot(t, i, o->pool ? o->pool : t, o->shots, o->seed, &prefix, err);
        int cut_any = 0;
        for (int c = 0; c < e->nchoices && !s; c++, k++) {
            const char *own = e->contexts ? e->contexts[c] : e->context;
            const size_t lp = strlen(prefix), lo = strlen(own);
            char *full = malloc(lp + lo + 1);
            if (!full) {
                s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
                break;
            }
            memcpy(full, prefix, lp);
            memcpy(full + lp, own, lo + 1);
            int n = 0, np = 0, cut = 0;
            s = pair_ids(tok, full, e->choices[c], fit, &ids[k], &n, &np, &cut, err);
            free(full);
            if (s) s = prefixed(err, s, "%s:%d: choice %d", t->path, e->line, c);
            else q[k] = (jm_score_seq){ids[k], n, np, 0}, cut_any |= cut > 0;
        }
        free(prefix);
        r->truncated += cut_any;
    }
    if (!s && o->one_by_one) { /* each pair from an empty cache: what prefix reuse must equal */
        for (int j = 0; j < total && !s; j++) {
            s = jm_slot_copy(m, 0, 0, 0, err);
            if (!s) s = jm_score_batch(m, &q[j], 1, err);
        }
    } else if (!s) {
        s = jm_score_batch(m, q, total, err);
    }
    k = 0;
    for (int i = i0; i < i1 && !s; i++) {
        const jm_eval_example *e = &t->ex[i];
        double *lli = ll + k, *norm_ll = ll + total + k;
        for (int c = 0; c < e->nchoices; c++) {
            lli[c] = q[k + c].logp;
            norm_ll[c] = lli[c] / (e->choice_bytes[c] > 0 ? e->choice_bytes[c] : 1);
        }
        const int pred = argmax(lli, e->nchoices), pred_norm = argmax(norm_ll, e->nchoices);
        mean_add(acc, pred == e->gold);
        mean_add(norm, pred_norm == e->gold);
        r->n++;
        jm_eval_record rec = {.index = i, .line = e->line, .nchoices = e->nchoices, .loglik = lli, .pred = pred,
                              .pred_norm = pred_norm, .gold = e->gold};
        if (on_record && on_record(ctx, &rec)) s = jm_fail(err, JM_ERR_IO, "%s: stopped", t->path);
        k += e->nchoices;
    }
    for (int j = 0; ids && j < total; j++) free(ids[j]);
    free(ids);
    free(q);
    free(ll);
    return s;
}

/* ---- generative ---- */

/* Drops ",", "$", surrounding spaces and a final "." and lowers the case. */
static void normalise_answer(const char *in, char *out, size_t cap)
{
    size_t n = 0;
    for (const char *p = in; *p && n + 1 < cap; p++)
        if (*p != ',' && *p != '$') out[n++] = (char)tolower((unsigned char)*p);
    out[n] = 0;
    while (n && isspace((unsigned char)out[n - 1])) out[--n] = 0;
    if (n && out[n - 1] == '.') out[--n] = 0;
    size_t lead = 0;
    while (lead < n && isspace((unsigned char)out[lead])) lead++;
    memmove(out, out + lead, n - lead + 1);
}

typedef struct {
    jm_text_stream **streams;
    char **text;
    size_t *len, *cap;
    int *stopped;
    jm_status s;
    jm_error *err;
} gen_state;

static int append(gen_state *g, int i, const char *bytes, size_t n)
{
    if (g->len[i] + n + 1 > g->cap[i]) {
        size_t cap = (g->len[i] + n + 1) * 2;
        char *p = realloc(g->text[i], cap);
        if (!p) return -1;
        g->text[i] = p, g->cap[i] = cap;
    }
    memcpy(g->text[i] + g->len[i], bytes, n);
    g->len[i] += n;
    g->text[i][g->len[i]] = 0;
    return 0;
}

/* jm_generate_batch's callback: the text so far, and stop at a stop string. */
static int gen_token(void *p, int i, int32_t id)
{
    gen_state *g = p;
    const char *bytes;
    size_t n;
    int r = jm_text_stream_push(g->streams[i], id, &bytes, &n, g->err);
    if (r < 0) {
        g->s = JM_ERR_ARG;
        return 1;
    }
    if (n && append(g, i, bytes, n)) {
        g->s = jm_fail(g->err, JM_ERR_NOMEM, "out of memory");
        return 1;
    }
    if (r == 1) g->stopped[i] = 1;
    return r == 1;
}

/* Group 1 of re's first match in text, or "[invalid]" (the harness' word for none). */
static void extract(const regex_t *re, const char *text, char *out, size_t cap)
{
    regmatch_t mt[2];
    if (regexec(re, text, 2, mt, 0) == 0 && mt[1].rm_so >= 0) {
        size_t n = (size_t)(mt[1].rm_eo - mt[1].rm_so);
        if (n >= cap) n = cap - 1;
        memcpy(out, text + mt[1].rm_so, n);
        out[n] = 0;
    } else {
        snprintf(out, cap, "[invalid]");
    }
}

#define GEN_GROUP 32

static jm_status gen_group(jm_model *m, const jm_tokenizer *tok, const jm_eval_task *t, const jm_eval_opts *o,
                           const regex_t *re, int i0, int i1, jm_eval_result *r, mean_acc *em,
                           int (*on_record)(void *, const jm_eval_record *), void *ctx, jm_error *err)
{
    const int n = i1 - i0, max_gen = o->max_gen > 0 ? o->max_gen : 256, context = jm_context(m);
    jm_gen_seq *q = calloc((size_t)n, sizeof *q);
    int32_t **ids = calloc((size_t)n, sizeof *ids), *out = malloc(sizeof(int32_t) * (size_t)n * (size_t)max_gen);
    gen_state g = {calloc((size_t)n, sizeof(jm_text_stream *)), calloc((size_t)n, sizeof(char *)),
                   calloc((size_t)n, sizeof(size_t)), calloc((size_t)n, sizeof(size_t)), calloc((size_t)n, sizeof(int)),
                   JM_OK, err};
    jm_status s = q && ids && out && g.streams && g.text && g.len && g.cap && g.stopped
                      ? JM_OK : jm_fail(err, JM_ERR_NOMEM, "out of memory");
    for (int j = 0; j < n && !s; j++) {
        const jm_eval_example *e = &t->ex[i0 + j];
        char *prefix = NULL;
        s = jm_eval_fewshot(t, i0 + j, o->pool ? o->pool : t, o->shots, o->seed, &prefix, err);
        size_t lp = prefix ? strlen(prefix) : 0, lo = strlen(e->prompt), ne = 0;
        char *full = s ? NULL : malloc(lp + lo + 1);
        if (!s && !full) s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
        int32_t *enc = NULL;
        if (!s) {
            memcpy(full, prefix, lp);
            memcpy(full + lp, e->prompt, lo + 1);
            s = encode(tok, full, lp + lo, &enc, &ne, err);
        }
        free(prefix);
        free(full);
        if (!s) {
            /* room for max_gen new tokens; the prompt loses tokens on the left */
            int keep = (int)ne, room = context - max_gen - 1;
            if (room < 1) s = jm_fail(err, JM_ERR_ARG, "--max-gen %d leaves no room in the context of %d", max_gen, context);
            else if (keep > room) keep = room, r->truncated++;
            if (!s && !(ids[j] = malloc(sizeof(int32_t) * (size_t)(keep + 1)))) s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
            if (!s) {
                ids[j][0] = jm_tokenizer_bos_id(tok);
                memcpy(ids[j] + 1, enc + ne - keep, sizeof(int32_t) * (size_t)keep);
                q[j] = (jm_gen_seq){ids[j], keep + 1, max_gen, 0, out + (int64_t)j * max_gen, 0};
                s = jm_text_stream_new(tok, ids[j], (size_t)keep + 1, t->stop, t->nstop, &g.streams[j], err);
            }
        }
        free(enc);
    }
    const jm_sample_opts greedy = {.greedy = 1, .max_new = max_gen, .top_p = 1};
    if (!s) s = jm_generate_batch(m, q, n, &greedy, gen_token, &g, err);
    if (!s && g.s) s = g.s;
    for (int j = 0; j < n && !s; j++) {
        const jm_eval_example *e = &t->ex[i0 + j];
        if (!g.stopped[j]) {
            const char *bytes;
            size_t nb;
            jm_text_stream_flush(g.streams[j], &bytes, &nb);
            if (nb && append(&g, j, bytes, nb)) s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
        }
        if (!g.text[j] && append(&g, j, "", 0)) s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
        if (s) break;
        char got[256], a[256], b[256];
        extract(re, g.text[j], got, sizeof got);
        normalise_answer(got, a, sizeof a);
        normalise_answer(e->answer, b, sizeof b);
        const int correct = strcmp(a, b) == 0;
        mean_add(em, correct);
        r->n++;
        jm_eval_record rec = {.index = i0 + j, .line = e->line, .output = g.text[j], .extracted = got,
                              .answer = e->answer, .correct = correct, .gold = -1, .pred = -1};
        if (on_record && on_record(ctx, &rec)) s = jm_fail(err, JM_ERR_IO, "%s: stopped", t->path);
    }
    for (int j = 0; j < n; j++) {
        if (ids) free(ids[j]);
        if (g.streams) jm_text_stream_free(g.streams[j]);
        if (g.text) free(g.text[j]);
    }
    free(ids), free(out), free(q);
    free(g.streams), free(g.text), free(g.len), free(g.cap), free(g.stopped);
    return s;
}

/* ---- tasks ---- */

jm_status jm_eval_run(jm_model *m, const jm_tokenizer *tok, const jm_eval_task *t, const jm_eval_opts *o,
                      jm_eval_result *r, int (*on_record)(void *ctx, const jm_eval_record *rec), void *ctx,
                      jm_error *err)
{
    memset(r, 0, sizeof *r);
    if (o->shots < 0) return jm_fail(err, JM_ERR_ARG, "--shots %d must be >= 0", o->shots);
    if (jm_tokenizer_bos_id(tok) < 0) return jm_fail(err, JM_ERR_ARG, "the tokenizer has no BOS token");
    jm_status s = JM_OK;
    /* slots of the whole context (a perplexity run before may have left shorter ones) */
    if (o->slots < 0) return jm_fail(err, JM_ERR_ARG, "slots %d must be >= 0", o->slots);
    s = jm_set_slots(m, o->one_by_one ? 1 : o->slots ? o->slots : EVAL_SLOTS, jm_model_config(m)->max_position_embeddings,
                     err);
    if (s) return s;
    const int n = o->limit > 0 && o->limit < t->n ? o->limit : t->n;
    mean_acc a = {0}, b = {0};
    if (t->kind == JM_EVAL_MC) {
        for (int i = 0; i < n && !s; i += MC_GROUP)
            s = mc_group(m, tok, t, o, i, i + MC_GROUP < n ? i + MC_GROUP : n, r, &a, &b, on_record, ctx, err);
        r->acc = mean_of(&a), r->acc_stderr = stderr_of(&a);
        r->acc_norm = mean_of(&b), r->acc_norm_stderr = stderr_of(&b);
    } else {
        regex_t re;
        int rc = regcomp(&re, t->regex, REG_EXTENDED);
        if (rc) {
            char why[128];
            regerror(rc, &re, why, sizeof why);
            return jm_fail(err, JM_ERR_ARG, "%s: the answer regex \"%s\": %s", t->path, t->regex, why);
        }
        for (int i = 0; i < n && !s; i += GEN_GROUP)
            s = gen_group(m, tok, t, o, &re, i, i + GEN_GROUP < n ? i + GEN_GROUP : n, r, &a, on_record, ctx, err);
        regfree(&re);
        r->exact_match = mean_of(&a), r->exact_match_stderr = stderr_of(&a);
    }
    return s;
}

/* ---- perplexity ---- */

jm_status jm_eval_text(jm_model *m, const jm_tokenizer *tok, const char *const *paths, int npaths, int window,
                       int64_t max_tokens, int decode, jm_ppl_result *r,
                       void (*progress)(void *ctx, int64_t done, int64_t total), void *ctx, jm_error *err)
{
    memset(r, 0, sizeof *r);
    if (window < 2) return jm_fail(err, JM_ERR_ARG, "windows of %d tokens predict nothing", window);
    if (window > jm_model_config(m)->max_position_embeddings)
        return jm_fail(err, JM_ERR_ARG, "a window of %d tokens is longer than the model's context (%d)", window,
                       jm_model_config(m)->max_position_embeddings);
    jm_status s = jm_set_slots(m, 1, window, err);
    for (int f = 0; f < npaths && !s; f++) {
        char *text = NULL;
        size_t len = 0;
        if ((s = jm_read_file(paths[f], (size_t)1 << 31, &text, &len, err))) break;
        int32_t *enc = NULL;
        size_t ne = 0;
        s = encode(tok, text, len, &enc, &ne, err);
        int32_t *ids = s ? NULL : malloc(sizeof(int32_t) * (ne + 1));
        if (!s && !ids) s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
        if (!s) {
            ids[0] = jm_tokenizer_bos_id(tok);
            memcpy(ids + 1, enc, sizeof(int32_t) * ne);
            /* every token of the document but the BOS predicted once: the
             * window predicting [a, b) reads the `window` tokens before b,
             * so a full window has one token of context and the last one as
             * much as fits (the harness' rolling windows, context_len 1) */
            const int64_t N = (int64_t)ne + 1;
            int64_t budget = max_tokens > 0 ? max_tokens - r->tokens : N - 1;
            int64_t end = N - 1 < budget ? N : budget + 1;
            for (int64_t a = 1; a < end && !s; a += window) {
                const int64_t b = a + window < end ? a + window : end, start = b - 1 - window > 0 ? b - 1 - window : 0;
                s = jm_score_window(m, ids + start, (int)(b - start), (int)(a - start), decode, &r->loglik, err);
                if (!s) r->tokens += b - a;
                if (!s && progress) progress(ctx, r->tokens, max_tokens);
            }
            /* the bytes the scored tokens stand for: all of the text, or the
             * decoded prefix when the budget stopped inside it */
            if (!s && end == N) {
                r->bytes += (int64_t)len;
            } else if (!s) {
                char *part;
                size_t plen;
                if (!(s = jm_tokenizer_decode(tok, ids + 1, (size_t)(end - 1), &part, &plen, err))) {
                    r->bytes += (int64_t)plen;
                    free(part);
                }
            }
            r->docs++;
        }
        free(ids);
        free(enc);
        free(text);
        if (s && !strstr(err->msg, paths[f])) s = prefixed(err, s, "%s", paths[f]);
        if (max_tokens > 0 && r->tokens >= max_tokens) break;
    }
    return s;
}
