/* test_decode_batch.c — the batched decode step (jm_infer_batch) against
 * one-at-a-time decoding (jm_infer), and what is built on it.
 *
 * Several slots at different lengths advance together, prompts are prefilled
 * beside other slots' decode steps, a slot is reused after its sequence ends
 * (continuous batching), a prompt's prefix is copied to other slots: every
 * row of logits must match the same sequence decoded alone in one slot
 * (max abs difference <= 1e-4 of the largest logit), with F32 weights and
 * with Q8 weights used in place. Then jm_generate_batch against jm_generate
 * (greedy: the same tokens; sampled: the same tokens whatever the number of
 * slots), jm_score_batch against the log-softmax of a full forward, and the
 * argument checks. */
#include "harness.h"

#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static jm_config small_config(int ctx)
{
    jm_config c;
    jm_config_default(&c);
    c.vocab_size = 97;
    c.hidden_size = 64;
    c.num_layers = 2;
    c.num_kv_heads = 2;
    c.head_dim = 16;
    c.intermediate_size = 32;
    c.num_experts = 4;
    c.top_k = 2;
    c.max_position_embeddings = ctx;
    c.initializer_range = 0.15;
    c.eos_token_id = 96; /* rarely the argmax: greedy runs go on */
    return c;
}

static uint64_t lcg(uint64_t *s)
{
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return *s >> 33;
}

/* ---- a schedule of sequences through the slots ---- */

enum { NSEQ = 5, MAXLEN = 72 };

/* Sequence q: tokens tok[q][0 .. len), the first prompt of them prefilled in
 * one item; it enters slot slot[q] at call start[q] and then advances one
 * token per call until its last token has been fed. */
typedef struct {
    int len[NSEQ], prompt[NSEQ], slot[NSEQ], start[NSEQ];
    int32_t tok[NSEQ][MAXLEN];
    int separate_prefill; /* prefills in calls of their own (no decode tokens beside them) */
} schedule;

static void make_tokens(schedule *sc, int V, uint64_t seed)
{
    for (int q = 0; q < NSEQ; q++)
        for (int t = 0; t < sc->len[q]; t++) sc->tok[q][t] = (int32_t)(lcg(&seed) % (uint64_t)V);
}

/* Logits after each token t >= prompt - 1 of sequence q decoded alone: a
 * prefill of the prompt, then one jm_infer per token. ref[q] holds
 * (len - prompt + 1) rows. */
static jm_status reference(jm_model *m, const schedule *sc, float *ref[NSEQ], jm_error *err)
{
    const int V = jm_model_config(m)->vocab_size;
    jm_status s = jm_set_slots(m, 1, MAXLEN, err);
    for (int q = 0; q < NSEQ && !s; q++) {
        const float *lg;
        s = jm_infer(m, sc->tok[q], sc->prompt[q], 0, &lg, err);
        for (int t = sc->prompt[q] - 1, r = 0; !s && t < sc->len[q]; t++, r++) {
            if (t >= sc->prompt[q]) s = jm_infer(m, &sc->tok[q][t], 1, t, &lg, err);
            if (!s) memcpy(ref[q] + (size_t)r * V, lg, (size_t)V * sizeof *lg);
        }
    }
    return s;
}

/* Runs the schedule batched and compares every row with ref: *worst gets the
 * largest difference over the largest |logit|; *calls the calls made,
 * *mixed how many had a prefill beside decode steps. A sequence enters its
 * slot at its start call or, if the slot is busy then, once it is free. */
static jm_status run_schedule(jm_model *m, const schedule *sc, float *ref[NSEQ], int slots, double *worst, int *calls,
                              int *mixed, jm_error *err)
{
    const int V = jm_model_config(m)->vocab_size;
    int fed[NSEQ] = {0}, in[NSEQ] = {0}, owner[NSEQ];
    double scale = 0, diff = 0;
    *calls = *mixed = 0;
    for (int t = 0; t < NSEQ; t++) owner[t] = -1;
    jm_status s = jm_set_slots(m, slots, MAXLEN, err);
    for (int call = 0; !s; call++) {
        int done = 1;
        for (int q = 0; q < NSEQ; q++) {
            done &= fed[q] == sc->len[q];
            if (!in[q] && call >= sc->start[q] && owner[sc->slot[q]] < 0) in[q] = 1, owner[sc->slot[q]] = q;
        }
        if (done) break;
        jm_infer_item items[NSEQ];
        int who[NSEQ], ni = 0, prefills = 0, alone = -1;
        for (int q = 0; q < NSEQ && sc->separate_prefill && alone < 0; q++)
            if (in[q] && !fed[q]) alone = q;
        for (int q = 0; q < NSEQ; q++) {
            if (!in[q] || fed[q] == sc->len[q] || (alone >= 0 && q != alone)) continue;
            items[ni] = (jm_infer_item){sc->slot[q], fed[q], fed[q] ? 1 : sc->prompt[q], sc->tok[q] + fed[q], 1};
            who[ni++] = q;
            prefills += !fed[q];
        }
        if (!ni) continue;
        const float *lg;
        if ((s = jm_infer_batch(m, items, ni, &lg, err))) break;
        (*calls)++;
        *mixed += prefills && prefills < ni;
        for (int i = 0; i < ni; i++) {
            int q = who[i];
            fed[q] += items[i].n;
            const float *want = ref[q] + (size_t)(fed[q] - sc->prompt[q]) * V, *got = lg + (size_t)i * V;
            for (int v = 0; v < V; v++) {
                scale = fmax(scale, fabs(want[v]));
                diff = fmax(diff, fabs((double)got[v] - want[v]));
            }
            if (jm_slot_len(m, sc->slot[q]) != fed[q])
                return jm_fail(err, JM_ERR_ARG, "slot %d holds %d tokens, expected %d", sc->slot[q],
                               jm_slot_len(m, sc->slot[q]), fed[q]);
            if (fed[q] == sc->len[q]) owner[sc->slot[q]] = -1;
        }
    }
    *worst = diff / fmax(scale, 1e-30);
    return s;
}

/* Sequences 0, 1 start together (two prefills in one call) in slots 0, 1; 2
 * joins at call 3 in slot 2 beside their decode steps; 0 is short, and 3
 * takes its slot when it ends (a 40-token prefill beside 1's and 2's steps);
 * 4 takes slot 2 when 2 ends. */
static schedule the_schedule(int V)
{
    schedule sc = {.len = {9, 60, 30, 50, 20},
                   .prompt = {4, 17, 1, 40, 5},
                   .slot = {0, 1, 2, 0, 2},
                   .start = {0, 0, 3, 6, 33}};
    make_tokens(&sc, V, 11);
    return sc;
}

static void test_schedule(jm_model *m, const char *what, int separate)
{
    const int V = jm_model_config(m)->vocab_size;
    schedule sc = the_schedule(V);
    sc.separate_prefill = separate;
    float *ref[NSEQ];
    for (int q = 0; q < NSEQ; q++) ref[q] = malloc(sizeof(float) * (size_t)V * MAXLEN);
    jm_error err = {{0}};
    double worst = 0;
    int calls = 0, mixed = 0;
    /* the reference on one thread, the schedule on all: with prefills apart,
     * every call is a decode step (a few rows), computed row by row whatever
     * else is in it and however many threads share it: bit for bit the same.
     * A prefill beside decode steps gives some experts many rows (GEMM), and
     * the rounding of those rows differs within fp32. */
    jm_set_threads(1);
    jm_status s = reference(m, &sc, ref, &err);
    jm_set_threads(3);
    if (!s) s = run_schedule(m, &sc, ref, 3, &worst, &calls, &mixed, &err);
    jm_set_threads(0);
    char name[96];
    snprintf(name, sizeof name, "decode_batch_equals_alone_%s", what);
    check_detail(s == JM_OK && (separate ? worst == 0 : worst <= 1e-4) && calls > 40 && (separate || mixed >= 2), name,
                 "status %d (%s); max diff %.2e of the largest logit over %d calls (%d with a prefill beside "
                 "decode steps), 5 sequences in 3 slots, slot 0 and 2 reused", s, err.msg, worst, calls, mixed);
    for (int q = 0; q < NSEQ; q++) free(ref[q]);
}

/* ---- a bf16 KV cache ---- */

/* A sequence decoded with an fp32 and a bf16 cache: the logits differ by the
 * rounding of keys and values to 8 bits of mantissa (relative 2^-9), which
 * attention averages; bounded here in rms over max |logit|. Not zero either,
 * or the bf16 cache would not be in use. */
static void test_kv_bf16(jm_model *m, const char *what, double bound)
{
    const int V = jm_model_config(m)->vocab_size;
    enum { P = 20, L = 60 };
    int32_t tok[L];
    uint64_t seed = 9;
    for (int i = 0; i < L; i++) tok[i] = (int32_t)(lcg(&seed) % (uint64_t)V);
    float *lg32 = malloc(sizeof(float) * (size_t)V * L), *lg16 = malloc(sizeof(float) * (size_t)V * L);
    jm_error err = {{0}};
    jm_status s = JM_OK;
    int kind_ok = 1;
    for (int pass = 0; pass < 2 && !s; pass++) {
        float *out = pass ? lg16 : lg32;
        const float *lg;
        s = jm_set_kv_cache(m, pass ? "bf16" : "f32", &err);
        if (!s) s = jm_set_slots(m, 1, 64, &err);
        kind_ok &= strcmp(jm_kv_cache(m), pass ? "bf16" : "f32") == 0;
        if (!s) s = jm_infer(m, tok, P, 0, &lg, &err); /* a prefill (more than WSMALL_N rows) over the cache */
        if (!s) memcpy(out + (size_t)(P - 1) * V, lg, sizeof(float) * (size_t)V);
        for (int t = P; t < L && !s; t++) {
            s = jm_infer(m, &tok[t], 1, t, &lg, &err);
            if (!s) memcpy(out + (size_t)t * V, lg, sizeof(float) * (size_t)V);
        }
    }
    double ss = 0, scale = 0;
    for (size_t i = (size_t)(P - 1) * V; i < (size_t)L * V; i++) {
        ss += ((double)lg16[i] - lg32[i]) * ((double)lg16[i] - lg32[i]);
        scale = fmax(scale, fabs(lg32[i]));
    }
    const double rms = sqrt(ss / ((double)(L - P + 1) * V)) / fmax(scale, 1e-30);
    char name[96];
    snprintf(name, sizeof name, "decode_kv_bf16_logits_%s", what);
    check_detail(s == JM_OK && kind_ok && rms > 0 && rms < bound, name,
                 "status %d (%s); rms logit change %.2e of max |logit| over %d positions", s, err.msg, rms, L - P + 1);
    s = jm_set_kv_cache(m, "fp16", &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "f32 or bf16"), "decode_kv_cache_rejects_unknown", "%s", err.msg);
    free(lg32);
    free(lg16);
}

/* ---- a prompt copied to several slots ---- */

static void test_slot_copy(jm_model *m, const char *what)
{
    const int V = jm_model_config(m)->vocab_size;
    enum { P = 12, K = 4, NEW = 6 };
    int32_t prompt[P], cont[K][NEW];
    uint64_t seed = 5;
    for (int i = 0; i < P; i++) prompt[i] = (int32_t)(lcg(&seed) % (uint64_t)V);
    for (int k = 0; k < K; k++)
        for (int i = 0; i < NEW; i++) cont[k][i] = (int32_t)(lcg(&seed) % (uint64_t)V);
    float *ref = malloc(sizeof(float) * (size_t)V * K * NEW), *got = malloc(sizeof(float) * (size_t)V * K * NEW);
    jm_error err = {{0}};
    const float *lg;
    /* alone: prompt then continuation k, one token at a time */
    jm_status s = jm_set_slots(m, 1, 64, &err);
    for (int k = 0; k < K && !s; k++) {
        s = jm_infer(m, prompt, P, 0, &lg, &err);
        for (int i = 0; i < NEW && !s; i++) {
            s = jm_infer(m, &cont[k][i], 1, P + i, &lg, &err);
            if (!s) memcpy(ref + ((size_t)k * NEW + i) * V, lg, sizeof(float) * (size_t)V);
        }
    }
    /* batched: the prompt prefilled once in slot 2 (no logits), copied to 0, 1, 3 */
    if (!s) s = jm_set_slots(m, K, 64, &err);
    jm_infer_item pre = {2, 0, P, prompt, 0};
    if (!s) s = jm_infer_batch(m, &pre, 1, &lg, &err);
    int copied = 1;
    for (int k = 0; k < K && !s; k++) {
        if (k != 2) s = jm_slot_copy(m, 2, k, P, &err);
        copied &= jm_slot_len(m, k) == P && memcmp(jm_slot_tokens(m, k), prompt, sizeof prompt) == 0;
    }
    for (int i = 0; i < NEW && !s; i++) {
        jm_infer_item it[K];
        for (int k = 0; k < K; k++) it[k] = (jm_infer_item){K - 1 - k, P + i, 1, &cont[K - 1 - k][i], 1};
        s = jm_infer_batch(m, it, K, &lg, &err);
        for (int k = 0; k < K && !s; k++)
            memcpy(got + ((size_t)(K - 1 - k) * NEW + i) * V, lg + (size_t)k * V, sizeof(float) * (size_t)V);
    }
    double scale = 0, diff = 0;
    for (size_t i = 0; i < (size_t)V * K * NEW; i++) {
        scale = fmax(scale, fabs(ref[i]));
        diff = fmax(diff, fabs((double)got[i] - ref[i]));
    }
    char name[96];
    snprintf(name, sizeof name, "decode_batch_slot_copy_%s", what);
    check_detail(s == JM_OK && copied && diff <= 1e-4 * scale, name,
                 "status %d (%s); prompt copied %d; max diff %.2e of the largest logit, %d continuations of one "
                 "prefill", s, err.msg, copied, diff / fmax(scale, 1e-30), K);
    /* copying a prefix and truncating in place */
    s = jm_slot_copy(m, 1, 3, 5, &err);
    int ok = !s && jm_slot_len(m, 3) == 5 && !jm_slot_copy(m, 0, 0, 2, &err) && jm_slot_len(m, 0) == 2;
    s = jm_slot_copy(m, 0, 1, 3, &err); /* slot 0 holds 2 */
    ok &= s == JM_ERR_ARG && strstr(err.msg, "holds 2") != NULL;
    s = jm_slot_copy(m, 0, K, 1, &err);
    ok &= s == JM_ERR_ARG && strstr(err.msg, "outside") != NULL;
    snprintf(name, sizeof name, "decode_batch_slot_copy_prefix_and_errors_%s", what);
    check(ok, name, "%s", err.msg);
    free(ref);
    free(got);
}

/* ---- bad calls are refused and change nothing ---- */

static void test_rejects(jm_model *m)
{
    jm_error err = {{0}};
    const int32_t t3[3] = {1, 2, 3}, t8[8] = {1, 2, 3, 4, 5, 6, 7, 8}, bad_id[1] = {97};
    const float *lg;
    jm_status s = jm_set_slots(m, 2, 8, &err);
    jm_infer_item one = {0, 0, 3, t3, 1};
    if (!s) s = jm_infer_batch(m, &one, 1, &lg, &err);
    if (!check(s == JM_OK, "decode_batch_rejects_setup", "%s", err.msg)) return;
    struct {
        const char *what;
        jm_infer_item it[2];
        int n;
        const char *want;
    } cases[] = {
        {"slot out of range", {{2, 0, 1, t3, 1}}, 1, "outside the 2 slots"},
        {"negative slot", {{-1, 0, 1, t3, 1}}, 1, "outside"},
        {"same slot twice", {{1, 0, 1, t3, 1}, {1, 0, 1, t3, 1}}, 2, "appears twice"},
        {"a gap after the cache", {{0, 4, 1, t3, 1}}, 1, "past the 3 cached"},
        {"past the context", {{1, 0, 3, t3, 1}, {0, 3, 6, t8, 1}}, 2, "3 + 6 tokens exceed the context of 8"},
        {"token outside the vocabulary", {{1, 0, 1, t3, 1}, {0, 3, 1, bad_id, 1}}, 2, "outside the vocabulary"},
        {"more logits than tokens", {{1, 0, 2, t3, 3}}, 1, "logits for 3 of its 2"},
        {"no tokens", {{1, 0, 0, t3, 0}}, 1, "no tokens"},
    };
    int bad = 0;
    char why[512] = "";
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        err.msg[0] = 0;
        s = jm_infer_batch(m, cases[i].it, cases[i].n, &lg, &err);
        if (s != JM_ERR_ARG || !strstr(err.msg, cases[i].want) || jm_slot_len(m, 0) != 3 || jm_slot_len(m, 1) != 0) {
            bad++;
            snprintf(why, sizeof why, "%s: status %d, '%.300s', slots hold %d and %d", cases[i].what, s, err.msg,
                     jm_slot_len(m, 0), jm_slot_len(m, 1));
        }
    }
    check(!bad, "decode_batch_rejects_bad_items", "%d of %zu cases: %s", bad, sizeof cases / sizeof cases[0], why);
    s = jm_set_slots(m, 0, 8, &err);
    int ok = s == JM_ERR_ARG && jm_slots(m) == 2;
    s = jm_set_slots(m, 1, 100000, &err);
    ok &= s == JM_ERR_ARG && strstr(err.msg, "max_position_embeddings") != NULL;
    check(ok, "decode_batch_rejects_bad_slots", "%s", err.msg);
}

/* ---- generation and scoring on the slots ---- */

enum { NPROMPT = 6, NEWTOK = 24 };

static void prompts(int V, int32_t p[NPROMPT][40], int n[NPROMPT])
{
    static const int len[NPROMPT] = {7, 1, 30, 7, 12, 30};
    uint64_t seed = 77;
    for (int i = 0; i < NPROMPT; i++) {
        n[i] = len[i];
        for (int t = 0; t < len[i]; t++) p[i][t] = (int32_t)(lcg(&seed) % (uint64_t)(V - 1));
    }
    memcpy(p[3], p[0], sizeof p[0]);      /* the same prompt twice */
    memcpy(p[4], p[2], 8 * sizeof p[0][0]); /* a shared prefix */
}

static int count_new(void *ctx, int seq, int32_t id)
{
    (void)seq, (void)id;
    (*(int *)ctx)++;
    return 0;
}

static void test_generate(jm_model *m, const char *what, jm_sample_opts o)
{
    const int V = jm_model_config(m)->vocab_size;
    int32_t p[NPROMPT][40], alone[NPROMPT][NEWTOK], batched[2][NPROMPT][NEWTOK];
    int n[NPROMPT], n_alone[NPROMPT];
    prompts(V, p, n);
    jm_error err = {{0}};
    jm_status s = jm_set_slots(m, 1, 64, &err);
    for (int i = 0; i < NPROMPT && !s; i++) {
        jm_sample_opts oi = o;
        oi.seed = jm_seed_stream(o.seed, (uint64_t)i);
        s = jm_generate(m, p[i], n[i], &oi, alone[i], &n_alone[i], NULL, NULL, &err);
    }
    /* 6 sequences through 4 slots and through 2: continuous batching either way */
    int same = 1, total = 0, calls = 0;
    const int slots[2] = {4, 2};
    for (int r = 0; r < 2 && !s; r++) {
        jm_gen_seq q[NPROMPT];
        for (int i = 0; i < NPROMPT; i++)
            q[i] = (jm_gen_seq){p[i], n[i], NEWTOK, jm_seed_stream(o.seed, (uint64_t)i), batched[r][i], 0};
        s = jm_set_slots(m, slots[r], 64, &err);
        if (!s) s = jm_generate_batch(m, q, NPROMPT, &o, count_new, &calls, &err);
        for (int i = 0; i < NPROMPT && !s; i++) {
            same &= q[i].n_out == n_alone[i] && memcmp(batched[r][i], alone[i], sizeof(int32_t) * (size_t)n_alone[i]) == 0;
            total += q[i].n_out;
        }
    }
    char name[96];
    snprintf(name, sizeof name, "generate_batch_%s_equals_generate", what);
    check_detail(s == JM_OK && same && total > NPROMPT * 4 && calls == total, name,
                 "status %d (%s); %d tokens from 6 prompts (two the same, two sharing a prefix) through 4 and "
                 "through 2 slots, each as jm_generate alone with its stream's seed", s, err.msg, total);
}

static void test_score(jm_model *m)
{
    const int V = jm_model_config(m)->vocab_size;
    enum { NS = 4, LONG = 300 };
    static int32_t ids[NS][LONG];
    const int len[NS] = {20, LONG, 20, 9}, n_prompt[NS] = {6, 100, 6, 1};
    uint64_t seed = 3;
    for (int i = 0; i < NS; i++)
        for (int t = 0; t < len[i]; t++) ids[i][t] = (int32_t)(lcg(&seed) % (uint64_t)V);
    memcpy(ids[2], ids[0], 6 * sizeof(int32_t)); /* the same prompt, another continuation */
    jm_error err = {{0}};
    jm_score_seq q[NS];
    for (int i = 0; i < NS; i++) q[i] = (jm_score_seq){ids[i], len[i], n_prompt[i], 0};
    jm_status s = jm_set_slots(m, 2, 320, &err);
    if (!s) s = jm_score_batch(m, q, NS, &err);
    double worst = 0;
    for (int i = 0; i < NS && !s; i++) {
        /* the full forward's log-softmax, in double */
        s = jm_forward(m, ids[i], 1, len[i], NULL, &err);
        double want = 0;
        for (int t = n_prompt[i] - 1; !s && t + 1 < len[i]; t++) {
            const float *row = jm_logits(m) + (size_t)t * V;
            double mx = row[0], sum = 0;
            for (int v = 1; v < V; v++) mx = fmax(mx, row[v]);
            for (int v = 0; v < V; v++) sum += exp(row[v] - mx);
            want += row[ids[i][t + 1]] - mx - log(sum);
        }
        worst = fmax(worst, fabs(q[i].logp - want) / fabs(want));
    }
    check_detail(s == JM_OK && worst < 1e-5, "score_batch_equals_forward",
                 "status %d (%s); largest relative difference %.1e over 4 sequences in 2 slots (a shared prompt, "
                 "one of 300 tokens scored in chunks)", s, err.msg, worst);
    jm_score_seq none = {ids[0], 5, 5, 0};
    s = jm_score_batch(m, &none, 1, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "nothing to score"), "score_batch_rejects_empty_continuation",
          "status %d: %s", s, err.msg);
}

/* The resident kB of this process's mappings of files in dir
 * (/proc/self/smaps): -1 where there is no such file, -2 when no mapping
 * is of a file in dir. */
static long mapped_kb(const char *dir)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return -1;
    char line[1200];
    const size_t n = strlen(dir);
    long kb = 0, v;
    int inside = 0, found = 0;
    while (fgets(line, sizeof line, f)) {
        /* a mapping's line, "addr-addr perms offset dev inode path", starts
         * with a lowercase hex digit; its fields' names with a capital */
        if (isxdigit((unsigned char)line[0]) && !isupper((unsigned char)line[0])) {
            const char *path = strchr(line, '/');
            inside = path && strncmp(path, dir, n) == 0 && path[n] == '/';
            found += inside;
        } else if (inside && sscanf(line, "Rss: %ld kB", &v) == 1)
            kb += v;
    }
    fclose(f);
    return found ? kb : -2;
}

int main(void)
{
    char tmp[] = "/tmp/jm_test_decode_batch_XXXXXX";
    temp_dir(tmp);
    char f32dir[600], q8dir[600];
    snprintf(f32dir, sizeof f32dir, "%s/f32", tmp);
    snprintf(q8dir, sizeof q8dir, "%s/q8", tmp);
    jm_config c = small_config(320);
    jm_error err = {{0}};
    jm_model *made = NULL, *f32 = NULL, *q8 = NULL;
    jm_status s = jm_model_create(&c, 21, &made, &err);
    if (!s) s = jm_model_save(made, f32dir, &err);
    if (!s) s = jm_quantize(f32dir, q8dir, 8, 0, &err);
    /* the copy into RAM reads the whole file through the mapping, then lets
     * its pages go (they stay in the page cache, out of our resident set);
     * before any other model maps the file */
    if (!s) {
        jm_model *ram = NULL;
        s = jm_model_open(q8dir, &ram, &err);
        if (!s) s = jm_weights_to_ram(ram, &err);
        char real[PATH_MAX]; /* smaps names files by their resolved paths */
        const long after = realpath(q8dir, real) ? mapped_kb(real) : -2;
        if (after != -1)
            check(s == JM_OK && jm_weights_in_ram(ram) && after == 0, "weights_in_ram_release_mapping",
                  "status %d; %ld kB of the checkpoint's mapping resident after the copy (-2: no mapping of it "
                  "found)", s, after);
        else
            printf("SKIP weights_in_ram_release_mapping: no /proc/self/smaps\n");
        jm_model_free(ram);
    }
    if (!s) s = jm_model_open(f32dir, &f32, &err);
    if (!s) s = jm_model_open(q8dir, &q8, &err);
    if (!check(s == JM_OK && strcmp(jm_model_weight_type(q8), "q8") == 0, "decode_batch_models", "%s", err.msg))
        return exit_status();

    test_schedule(f32, "f32", 0);
    test_schedule(f32, "f32_separate_prefills", 1);
    /* Q8: prefills in calls of their own, as jm_generate_batch makes them:
     * each decode row is computed the same whatever else is in the call */
    test_schedule(q8, "q8", 1);
    /* the weights copied into huge-page memory decode bit for bit as in place */
    {
        jm_model *ram = NULL;
        jm_status rs = jm_model_open(q8dir, &ram, &err);
        if (!rs) rs = jm_weights_to_ram(ram, &err);
        int same = 0;
        if (!rs) {
            const int V = jm_model_config(q8)->vocab_size;
            int32_t tok[12];
            uint64_t seed = 3;
            for (int i = 0; i < 12; i++) tok[i] = (int32_t)(lcg(&seed) % (uint64_t)V);
            float *a = malloc(sizeof(float) * (size_t)V), *b = malloc(sizeof(float) * (size_t)V);
            const float *lg;
            rs = jm_set_slots(q8, 1, 64, &err);
            if (!rs) rs = jm_set_slots(ram, 1, 64, &err);
            same = !rs;
            /* a prefill of 5 (dequantized tiles and SGEMM), then decode steps */
            for (int t = 0; t < 12 && !rs; t += t ? 1 : 5) {
                const int n = t ? 1 : 5;
                if (!(rs = jm_infer(q8, &tok[t], n, t, &lg, &err))) memcpy(a, lg, sizeof(float) * (size_t)V);
                if (!rs && !(rs = jm_infer(ram, &tok[t], n, t, &lg, &err))) memcpy(b, lg, sizeof(float) * (size_t)V);
                same &= !rs && memcmp(a, b, sizeof(float) * (size_t)V) == 0;
            }
            free(a);
            free(b);
        }
        check(rs == JM_OK && same, "decode_weights_in_ram_equal_mapped", "status %d (%s); a prefill of 5 and 7 steps bit for bit: %d",
              rs, err.msg, same);
        jm_model_free(ram);
    }
    test_kv_bf16(f32, "f32", 2e-3);
    /* Q8 quantizes each layer's input to int8 again, so the cache's rounding
     * flips some of those roundings downstream: the same relative change
     * shows ~10x larger (the held-out perplexity check in run_tests.py is the
     * measure that matters for it) */
    test_kv_bf16(q8, "q8", 2e-2);
    /* the schedules and slot copies again with bf16 caches (prefills widen them for BLAS) */
    jm_set_kv_cache(f32, "bf16", &err);
    jm_set_kv_cache(q8, "bf16", &err);
    test_schedule(q8, "q8_kv_bf16", 1);
    test_schedule(f32, "f32_kv_bf16", 0);
    test_slot_copy(q8, "q8_kv_bf16");
    jm_set_kv_cache(f32, "f32", &err);
    jm_set_kv_cache(q8, "f32", &err);
    test_slot_copy(f32, "f32");
    test_slot_copy(q8, "q8");
    test_rejects(f32);
    test_generate(f32, "greedy", (jm_sample_opts){.greedy = 1, .top_p = 1, .max_new = NEWTOK});
    test_generate(f32, "sampled", (jm_sample_opts){.temperature = 1.0, .top_p = 0.9, .top_k = 40, .seed = 1234,
                                                   .max_new = NEWTOK, .repetition_penalty = 1.3,
                                                   .repeat_last_n = 16});
    test_generate(q8, "greedy_q8", (jm_sample_opts){.greedy = 1, .top_p = 1, .max_new = NEWTOK});
    test_score(made);

    jm_model_free(made);
    jm_model_free(f32);
    jm_model_free(q8);
    temp_dir_done(tmp);
    return exit_status();
}
