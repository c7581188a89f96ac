/* experts.c — the grouped expert dispatch shared by MoA and MoE (design.md).
 *
 * The router gives every token k (expert, gate) pairs. We sort the N*k pairs
 * by expert (a stable counting sort), gather each expert's rows into one
 * contiguous block, run one GEMM per expert over its block, and combine the
 * results back per token weighted by the gates. On a CPU this turns N*k
 * matrix-vector products into E large matrix-matrix products. */
#include "ops.h"

#include <cblas.h>
#include <omp.h>
#include <string.h>

void dispatch_build(int32_t *sorted, int32_t *pos, int64_t *offsets, const int32_t *idx, int64_t N, int k, int E)
{
    int64_t Nk = N * k;
    memset(offsets, 0, (size_t)(E + 1) * sizeof *offsets);
    for (int64_t p = 0; p < Nk; p++) offsets[idx[p] + 1]++;
    for (int e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    int64_t fill[JM_MAX_EXPERTS];
    memcpy(fill, offsets, (size_t)E * sizeof *fill);
    for (int64_t p = 0; p < Nk; p++) {
        int64_t m = fill[idx[p]]++;
        sorted[m] = (int32_t)p;
        pos[p] = (int32_t)m;
    }
}

void dispatch_gather(float *xs, const float *x, const int32_t *sorted, int64_t Nk, int k, int64_t C, int per_slot)
{
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < Nk; m++) {
        int64_t row = per_slot ? sorted[m] : sorted[m] / k;
        memcpy(xs + m * C, x + row * C, (size_t)C * sizeof(float));
    }
}

void dispatch_scatter(float *x, const float *xs, const int32_t *sorted, int64_t Nk, int64_t C)
{
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < Nk; m++) memcpy(x + (int64_t)sorted[m] * C, xs + m * C, (size_t)C * sizeof(float));
}

void experts_forward(float *ys, const float *xs, const float *W, const int64_t *offsets, int E, int64_t C,
                     int64_t O)
{
    /* Experts run side by side, one per thread (BLAS goes single-threaded inside
     * a parallel region): fewer, larger units of work than splitting every
     * expert's GEMM across the threads. Dynamic, since the loads differ. With
     * fewer experts than twice the threads, BLAS threads each GEMM instead. */
#pragma omp parallel for schedule(dynamic, 1) if (E >= 2 * omp_get_max_threads())
    for (int e = 0; e < E; e++) {
        int64_t rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)O, (int)C, 1.0f, xs + offsets[e] * C,
                    (int)C, W + (int64_t)e * O * C, (int)C, 0.0f, ys + offsets[e] * O, (int)O);
    }
}

void combine_forward(float *out, const float *resid, const float *ys, const int32_t *pos, const float *gate,
                     const float *bias, int64_t N, int k, int64_t H)
{
    /* per token, in slot order: deterministic whatever the thread count */
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        float *o = out + t * H;
        const float *r = resid + t * H;
        for (int64_t i = 0; i < H; i++) o[i] = r[i] + bias[i];
        for (int j = 0; j < k; j++) {
            const float *y = ys + (int64_t)pos[t * k + j] * H;
            float g = gate[t * k + j];
            for (int64_t i = 0; i < H; i++) o[i] += g * y[i];
        }
    }
}
