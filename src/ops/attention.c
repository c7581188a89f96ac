/* attention.c — causal scaled dot-product attention for the MoA block.
 *
 * Query head (j, h) of every token — slot j of its k routed experts, head h —
 * attends with the shared key/value head h (the KV heads are tiled k times).
 * Work is split into independent (sequence, slot, head) tasks over threads;
 * within a task, blocks of query rows run as two small GEMMs (scores, then
 * probabilities @ V) over only the keys the block can see, so the causal
 * mask wastes at most one block's triangle. */
#include "ops.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>

#define ATT_BLOCK 64 /* query rows per block: scores fit in L2 for T in the thousands */

size_t attention_scratch_floats(int T)
{
    return (size_t)ATT_BLOCK * (size_t)T;
}

void attention_forward(float *out, float *lse, const float *q, const float *kv, float *scratch, int B, int T,
                       int k, int Hkv, int D)
{
    const int64_t A = (int64_t)Hkv * D;
    const int64_t qs = k * A, kvs = 2 * A; /* row strides of q/out and kv */
    const float scale = 1.0f / sqrtf((float)D);
    const int tasks = B * k * Hkv;
#pragma omp parallel
    {
        float *S = scratch + (size_t)omp_get_thread_num() * attention_scratch_floats(T);
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < tasks; task++) {
            int b = task / (k * Hkv), j = (task / Hkv) % k, h = task % Hkv;
            int64_t row0 = (int64_t)b * T;
            const float *Q = q + row0 * qs + (int64_t)j * A + (int64_t)h * D;
            const float *K = kv + row0 * kvs + (int64_t)h * D;
            const float *V = K + A;
            float *O = out + row0 * qs + (int64_t)j * A + (int64_t)h * D;
            for (int r0 = 0; r0 < T; r0 += ATT_BLOCK) {
                int rb = T - r0 < ATT_BLOCK ? T - r0 : ATT_BLOCK;
                int nk = r0 + rb; /* keys 0 .. nk-1 are visible to some row of the block */
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rb, nk, D, scale, Q + (int64_t)r0 * qs,
                            (int)qs, K, (int)kvs, 0.0f, S, nk);
                for (int r = 0; r < rb; r++) {
                    float *s = S + (int64_t)r * nk;
                    int visible = r0 + r + 1;
                    float mx = s[0];
#pragma omp simd reduction(max : mx)
                    for (int c = 1; c < visible; c++) mx = s[c] > mx ? s[c] : mx;
                    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                    for (int c = 0; c < visible; c++) {
                        s[c] = jm_expf(s[c] - mx);
                        sum += s[c];
                    }
                    float inv = 1.0f / sum;
                    for (int c = 0; c < visible; c++) s[c] *= inv;
                    for (int c = visible; c < nk; c++) s[c] = 0.0f;
                    lse[(row0 + r0 + r) * k * Hkv + j * Hkv + h] = mx + logf(sum);
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rb, D, nk, 1.0f, S, nk, V, (int)kvs, 0.0f,
                            O + (int64_t)r0 * qs, (int)qs);
            }
        }
    }
}
