/* attention.c — causal scaled dot-product attention for the MoA block.
 *
 * Query head (j, h) of every token — slot j of its k routed experts, head h —
 * attends with the shared key/value head h (the KV heads are tiled k times).
 * Query rows may follow cached keys: row r of a sequence whose first row
 * sits at position p0 sees keys 0 .. p0 + r (attention_cached: decoding,
 * each sequence over its own KV cache).
 * Work is split into independent (sequence, slot, head) tasks over threads;
 * within a task, blocks of query rows run as two small GEMMs (scores, then
 * probabilities @ V) over only the keys the block can see, so the causal
 * mask wastes at most one block's triangle. Packed rows (several sequences
 * in one row, kstart) narrow each block to the keys from its first row's
 * sequence start on, and each row masks the keys before its own start. */
#include "ops.h"
#include "base/base.h"
#include "simd.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#define ATT_BLOCK 64 /* query rows per block: scores fit in L2 for T in the thousands */

size_t attention_scratch_floats(int T, int k)
{
    /* scores, and in backward their gradient; decoding: k rows of scores */
    return (2 * ATT_BLOCK > k ? 2 * ATT_BLOCK : (size_t)k) * (size_t)T;
}

/* One task: query head (j, h) of T rows at positions p0 .. p0+T-1 (Q, O with
 * row stride qs; lse with stride lse_stride) against the keys of its
 * sequence from row 0 (Kb: key head h, row stride kvs; V is A further on).
 * kst (T, or NULL) is each row's first visible key (packing). */
static void attend(float *O, float *lse, int lse_stride, const float *Q, const float *Kb, const int32_t *kst,
                   float *S, int T, int p0, int64_t qs, int64_t kvs, int64_t A, int D)
{
    const float scale = 1.0f / sqrtf((float)D);
    for (int r0 = 0; r0 < T; r0 += ATT_BLOCK) {
        int rb = T - r0 < ATT_BLOCK ? T - r0 : ATT_BLOCK;
        int lo = kst ? kst[r0] : 0; /* no row of the block sees a key before lo */
        int nk = p0 + r0 + rb - lo; /* keys lo .. lo+nk-1 are visible to some row of the block */
        const float *K = Kb + (int64_t)lo * kvs, *V = K + A;
        /* one query row (decoding): GEMV, several times faster than a one-row GEMM in OpenBLAS */
        if (rb == 1)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, nk, D, scale, K, (int)kvs, Q + (int64_t)r0 * qs, 1, 0.0f, S, 1);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rb, nk, D, scale, Q + (int64_t)r0 * qs, (int)qs, K,
                        (int)kvs, 0.0f, S, nk);
        for (int r = 0; r < rb; r++) {
            float *s = S + (int64_t)r * nk;
            int first = kst ? kst[r0 + r] - lo : 0, visible = p0 + r0 + r + 1 - lo;
            float mx = row_max(s + first, visible - first);
            float sum = exp_shift_sum(s + first, s + first, visible - first, mx);
            float inv = 1.0f / sum;
            for (int c = 0; c < first; c++) s[c] = 0.0f;
            for (int c = first; c < visible; c++) s[c] *= inv;
            for (int c = visible; c < nk; c++) s[c] = 0.0f;
            lse[(int64_t)(r0 + r) * lse_stride] = mx + logf(sum);
        }
        if (rb == 1)
            cblas_sgemv(CblasRowMajor, CblasTrans, nk, D, 1.0f, V, (int)kvs, S, 1, 0.0f, O + (int64_t)r0 * qs, 1);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rb, D, nk, 1.0f, S, nk, V, (int)kvs, 0.0f,
                        O + (int64_t)r0 * qs, (int)qs);
    }
}

void attention_forward(float *out, float *lse, const float *q, const float *kv, const int32_t *kstart,
                       float *scratch, int B, int T, int Tk, int k, int Hkv, int D)
{
    const int64_t A = (int64_t)Hkv * D;
    const int64_t qs = k * A, kvs = 2 * A; /* row strides of q/out and kv */
    const int tasks = B * k * Hkv;
#pragma omp parallel
    {
        float *S = scratch + (size_t)omp_get_thread_num() * attention_scratch_floats(Tk, k);
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < tasks; task++) {
            int b = task / (k * Hkv), j = (task / Hkv) % k, h = task % Hkv;
            int64_t row0 = (int64_t)b * T, at = row0 * qs + (int64_t)j * A + (int64_t)h * D;
            attend(out + at, lse + row0 * k * Hkv + j * Hkv + h, k * Hkv, q + at,
                   kv + (int64_t)b * Tk * kvs + (int64_t)h * D, kstart ? kstart + row0 : NULL, S, T, Tk - T, qs, kvs,
                   A, D);
        }
    }
}

/* ---- over a KV cache (decoding) ---- */

size_t attention_cache_scratch_floats(int ctx, int k, int D)
{
    return attention_scratch_floats(ctx, k) + 2 * (size_t)D * (size_t)ctx; /* + one head's K and V as fp32 */
}

/* Where a sequence's cache keeps K (kv 0) or V (kv 1) of head h at
 * position p: head-major, so that a head's keys are one contiguous (ctx, D)
 * block that attention streams through (a position-major layout put each
 * key D floats out of 2A, a page apart at JetMoE-8B's size). */
static inline int64_t cache_at(const att_run *run, int kv, int h, int p, int Hkv, int ctx, int D)
{
    return run->off + (((int64_t)kv * Hkv + h) * ctx + p) * D;
}

/* A run's new rows' keys and values of head h (rows of 2A: K heads, then V
 * heads) join its sequence's cache (bf16: rounded to nearest even, once). */
static void store_head(kv_cache c, const float *kv_new, const att_run *run, int h, int ctx, int Hkv, int D)
{
    for (int t = 0; t < run->n; t++)
        for (int kv = 0; kv < 2; kv++) {
            const float *src = kv_new + (run->row0 + t) * 2 * Hkv * D + ((int64_t)kv * Hkv + h) * D;
            const int64_t at = cache_at(run, kv, h, run->p0 + t, Hkv, ctx, D);
            if (c.bf16)
                for (int i = 0; i < D; i++) ((uint16_t *)c.data)[at + i] = jm_f32_to_bf16(src[i]);
            else
                memcpy((float *)c.data + at, src, (size_t)D * sizeof(float));
        }
}

/* Every run's rows, all heads (attention_cached: before its tasks). */
static void cache_store(kv_cache c, const float *kv_new, const att_run *runs, int nruns, int ctx, int Hkv, int D)
{
    for (int r = 0; r < nruns; r++)
        for (int h = 0; h < Hkv; h++) store_head(c, kv_new, &runs[r], h, ctx, Hkv, D);
}

/* n values of the cache from element `at`, as fp32 in buf: widened from
 * bf16, or copied (the k slots' products then read a block of keys from L1;
 * reading an fp32 cache in place measured 3x slower at JetMoE-8B's size,
 * 7.5 against 23 GB/s on one thread). */
static inline const float *cache_span(kv_cache c, int64_t at, int64_t n, float *buf)
{
    if (!c.bf16) {
        memcpy(buf, (const float *)c.data + at, (size_t)n * sizeof(float));
        return buf;
    }
    const uint16_t *h = (const uint16_t *)c.data + at;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)h[i] << 16;
        memcpy(&buf[i], &u, sizeof u);
    }
    return buf;
}

/* Asks for the cache lines of n values from element `at` (a block of keys
 * or values ahead of the one worked on): read block by block, without, the
 * cache streamed at 7 GB/s, waiting on each block's first lines. */
static inline void prefetch_span(kv_cache c, int64_t at, int64_t n)
{
    const size_t esize = c.bf16 ? 2 : 4;
    const char *p = (const char *)c.data + (size_t)at * esize;
    for (size_t b = 0; b < (size_t)n * esize; b += 64) __builtin_prefetch(p + b, 0, 3);
}

void attention_cached(float *out, float *lse, const float *q, const float *kv_new, kv_cache cache, const att_run *runs,
                      int nruns, float *scratch, int ctx, int k, int Hkv, int D)
{
    const int64_t A = (int64_t)Hkv * D;
    const int64_t qs = k * A;
    cache_store(cache, kv_new, runs, nruns, ctx, Hkv, D);
    /* one task per (run, KV head): a bf16 cache's rows are widened once for
     * its k query slots */
    const int tasks = nruns * Hkv;
#pragma omp parallel
    {
        float *S = scratch + (size_t)omp_get_thread_num() * attention_cache_scratch_floats(ctx, k, D);
        float *wide = S + attention_scratch_floats(ctx, k); /* (2, keys, D): K then V of head h */
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < tasks; task++) {
            const att_run *run = &runs[task / Hkv];
            const int h = task % Hkv, keys = run->p0 + run->n;
            const float *K = cache_span(cache, cache_at(run, 0, h, 0, Hkv, ctx, D), (int64_t)keys * D, wide);
            const float *V = cache_span(cache, cache_at(run, 1, h, 0, Hkv, ctx, D), (int64_t)keys * D,
                                        wide + (int64_t)keys * D);
            for (int j = 0; j < k; j++) {
                int64_t at = run->row0 * qs + (int64_t)j * A + (int64_t)h * D;
                attend(out + at, lse + run->row0 * k * Hkv + j * Hkv + h, k * Hkv, q + at, K, NULL, S, run->n,
                       run->p0, qs, D, V - K, D);
            }
        }
    }
}

typedef struct {
    float *out;
    const float *q, *kv_new;
    kv_cache cache;
    const att_run *runs;
    float *scratch;
    int ctx, k, Hkv, D;
    const wkernels *kern;
} decode_job;

/* One sequence's rows (an att_run) against KV head h, all k query slots
 * (j, h) at once, so each cached K/V row is read once for the k experts,
 * through the set's kernels (akernels.c): scores S[j][i] = scale q_j . K_i
 * over the visible keys, softmax per slot, o_j = sum_i p_ji V_i. The first
 * lines of K and V, and one line of each of their first pages, are asked for
 * up front: the kernels' prefetches run ahead of what they read, so without,
 * each head's keys and values start cold.
 * The run's new keys and values of head h are stored here too, by whichever
 * thread attends the head, not by the caller beforehand: each head's new K
 * and V rows (256 B each in bf16 at JetMoE-8B's shape) sit on pages of
 * their own, 2 x 16 a sequence and layer, and the caller storing them all,
 * a TLB miss each, took 18 us a layer (0.4 ms of a 22 ms q4 step at 2
 * threads, AMD EPYC family 26 model 2) while the workers waited. */
static void attend_head(const void *ctx, int64_t chunk, int thread)
{
    const decode_job *j = ctx;
    const int k = j->k, D = j->D, Hkv = j->Hkv, h = (int)(chunk % Hkv), bf16 = j->cache.bf16;
    const att_run *run = &j->runs[chunk / Hkv];
    const int64_t A = (int64_t)Hkv * D, qs = k * A;
    const float scale = 1.0f / sqrtf((float)D);
    float *S = j->scratch + (size_t)thread * attention_cache_scratch_floats(j->ctx, k, D);
    store_head(j->cache, j->kv_new, run, h, j->ctx, Hkv, D);
    const int64_t k_at = cache_at(run, 0, h, 0, Hkv, j->ctx, D), v_at = cache_at(run, 1, h, 0, Hkv, j->ctx, D);
    const char *Kc = (const char *)j->cache.data + k_at * (bf16 ? 2 : 4);
    const char *Vc = (const char *)j->cache.data + v_at * (bf16 ? 2 : 4);
    for (int r = 0; r < run->n; r++) {
        const int visible = run->p0 + r + 1;
        const int64_t bytes = (int64_t)visible * D * (bf16 ? 2 : 4), first = bytes < PAGE_AHEAD ? bytes : PAGE_AHEAD;
        prefetch_pages((const uint8_t *)Kc, first, 0);
        prefetch_pages((const uint8_t *)Vc, first, 0);
        prefetch_span(j->cache, k_at, (visible < 16 ? visible : 16) * (int64_t)D);
        j->kern->att_scores(S, visible, j->q + (run->row0 + r) * qs + (int64_t)h * D, A, k, Kc, bf16, visible, D,
                            scale);
        for (int s = 0; s < k; s++) {
            float *row = S + (int64_t)s * visible;
            const float inv = 1.0f / exp_shift_sum(row, row, visible, row_max(row, visible));
            for (int i = 0; i < visible; i++) row[i] *= inv;
        }
        prefetch_span(j->cache, v_at, (visible < 16 ? visible : 16) * (int64_t)D);
        j->kern->att_values(j->out + (run->row0 + r) * qs + (int64_t)h * D, A, S, visible, k, Vc, bf16, visible, D);
    }
}

static void attend_heads(void *ctx, int64_t first, int64_t count, int thread)
{
    for (int64_t c = first; c < first + count; c++) attend_head(ctx, c, thread);
}

void attention_decode(float *out, const float *q, const float *kv_new, kv_cache cache, const att_run *runs, int nruns,
                      float *scratch, int ctx, int k, int Hkv, int D, const wkernels *kern, jm_pool *pool)
{
    decode_job j = {out, q, kv_new, cache, runs, scratch, ctx, k, Hkv, D, kern};
    jm_pool_run(pool, (int64_t)nruns * Hkv, attend_heads, &j);
}

/* Backward, recomputing each block's probabilities from the saved row
 * normalisers (lse) instead of storing T x T matrices:
 *   P = exp(scale * Q K^T - lse) (causal), O = P V
 *   dV += P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(dO * O))
 *   dQ = scale * dS K;  dK += scale * dS^T Q
 * One task per (sequence, kv head) covering its k query slots, since all of
 * them write the same dK/dV rows. dkv (B*T, 2A) must be zeroed by the caller;
 * dq (B*T, k, A) is overwritten. */
void attention_backward(float *dq, float *dkv, const float *dout, const float *out, const float *lse,
                        const float *q, const float *kv, const int32_t *kstart, float *scratch, int B, int T, int k,
                        int Hkv, int D)
{
    const int64_t A = (int64_t)Hkv * D;
    const int64_t qs = k * A, kvs = 2 * A;
    const float scale = 1.0f / sqrtf((float)D);
    const int tasks = B * Hkv;
#pragma omp parallel
    {
        float *S = scratch + (size_t)omp_get_thread_num() * attention_scratch_floats(T, k);
        float *dP = S + (size_t)ATT_BLOCK * T;
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < tasks; task++) {
            int b = task / Hkv, h = task % Hkv;
            int64_t row0 = (int64_t)b * T;
            const float *Kb = kv + row0 * kvs + (int64_t)h * D;
            float *dKb = dkv + row0 * kvs + (int64_t)h * D;
            for (int j = 0; j < k; j++) {
                int64_t off = row0 * qs + (int64_t)j * A + (int64_t)h * D;
                const float *Q = q + off, *O = out + off, *dO = dout + off;
                float *dQ = dq + off;
                for (int r0 = 0; r0 < T; r0 += ATT_BLOCK) {
                    int rb = T - r0 < ATT_BLOCK ? T - r0 : ATT_BLOCK;
                    int lo = kstart ? kstart[row0 + r0] : 0, nk = r0 + rb - lo;
                    const float *K = Kb + (int64_t)lo * kvs, *V = K + A;
                    float *dK = dKb + (int64_t)lo * kvs, *dV = dK + A;
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rb, nk, D, scale, Q + (int64_t)r0 * qs,
                                (int)qs, K, (int)kvs, 0.0f, S, nk);
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rb, nk, D, 1.0f, dO + (int64_t)r0 * qs,
                                (int)qs, V, (int)kvs, 0.0f, dP, nk);
                    for (int r = 0; r < rb; r++) {
                        int64_t row = r0 + r;
                        float *s = S + (int64_t)r * nk, *dp = dP + (int64_t)r * nk;
                        const float *o = O + row * qs, *go = dO + row * qs;
                        float l = lse[(row0 + row) * k * Hkv + j * Hkv + h], di = 0.0f;
                        for (int d = 0; d < D; d++) di += o[d] * go[d];
                        int first = kstart ? kstart[row0 + row] - lo : 0, visible = (int)row + 1 - lo;
                        for (int c = 0; c < first; c++) s[c] = dp[c] = 0.0f;
                        for (int c = first; c < visible; c++) {
                            s[c] = jm_expf(s[c] - l);
                            dp[c] = s[c] * (dp[c] - di) * scale; /* dS, with the scale folded in */
                        }
                        for (int c = visible; c < nk; c++) s[c] = dp[c] = 0.0f;
                    }
                    /* dV += P^T dO;  dQ = dS K;  dK += dS^T Q */
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, D, rb, 1.0f, S, nk,
                                dO + (int64_t)r0 * qs, (int)qs, 1.0f, dV, (int)kvs);
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rb, D, nk, 1.0f, dP, nk, K, (int)kvs,
                                0.0f, dQ + (int64_t)r0 * qs, (int)qs);
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, D, rb, 1.0f, dP, nk,
                                Q + (int64_t)r0 * qs, (int)qs, 1.0f, dK, (int)kvs);
                }
            }
        }
    }
}
