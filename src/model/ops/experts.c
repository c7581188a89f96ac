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

static void gather_row(float *to, const float *x, int64_t row, int64_t C)
{
    memcpy(to, x + row * C, (size_t)C * sizeof(float));
}

void dispatch_gather(float *xs, const float *x, const int32_t *sorted, int64_t Nk, int k, int64_t C, int per_slot)
{
    if (Nk * C < JM_OMP_GRAIN) /* no OpenMP region (ops.h) */
        for (int64_t m = 0; m < Nk; m++) gather_row(xs + m * C, x, per_slot ? sorted[m] : sorted[m] / k, C);
    else {
#pragma omp parallel for schedule(static)
        for (int64_t m = 0; m < Nk; m++) gather_row(xs + m * C, x, per_slot ? sorted[m] : sorted[m] / k, C);
    }
}

void dispatch_scatter(float *x, const float *xs, const int32_t *sorted, int64_t Nk, int64_t C)
{
    if (Nk * C < JM_OMP_GRAIN) /* no OpenMP region (ops.h) */
        for (int64_t m = 0; m < Nk; m++) memcpy(x + (int64_t)sorted[m] * C, xs + m * C, (size_t)C * sizeof(float));
    else {
#pragma omp parallel for schedule(static)
        for (int64_t m = 0; m < Nk; m++) memcpy(x + (int64_t)sorted[m] * C, xs + m * C, (size_t)C * sizeof(float));
    }
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
        matmul_forward(ys + offsets[e] * O, xs + offsets[e] * C, W + (int64_t)e * O * C, rows, C, O, 0);
    }
}

/* One token: o = r + bias + sum_j g[j] * ys row pos[j]. */
static void combine_row(float *o, const float *r, const float *ys, const int32_t *pos, const float *g,
                        const float *bias, int k, int64_t H)
{
    for (int64_t i = 0; i < H; i++) o[i] = r[i] + bias[i];
    for (int j = 0; j < k; j++) {
        const float *y = ys + (int64_t)pos[j] * H;
        const float gj = g[j]; /* once: o may alias g, so g[j] in the loop is a load per element */
        for (int64_t i = 0; i < H; i++) o[i] += gj * y[i];
    }
}

void combine_forward(float *out, const float *resid, const float *ys, const int32_t *pos, const float *gate,
                     const float *bias, int64_t N, int k, int64_t H)
{
    /* per token, in slot order: deterministic whatever the thread count */
    if (N * k * H < JM_OMP_GRAIN) /* no OpenMP region (ops.h) */
        for (int64_t t = 0; t < N; t++)
            combine_row(out + t * H, resid + t * H, ys, pos + t * k, gate + t * k, bias, k, H);
    else {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < N; t++)
            combine_row(out + t * H, resid + t * H, ys, pos + t * k, gate + t * k, bias, k, H);
    }
}

/* Backward of experts_forward: per expert, dxs = dys @ W[e];  dW[e] += dys^T @ xs. */
void experts_backward(float *dxs, float *dW, const float *dys, const float *xs, const float *W,
                      const int64_t *offsets, int E, int64_t C, int64_t O)
{
#pragma omp parallel for schedule(dynamic, 1) if (E >= 2 * omp_get_max_threads())
    for (int e = 0; e < E; e++) {
        int64_t rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        const float *dy = dys + offsets[e] * O, *x = xs + offsets[e] * C, *w = W + (int64_t)e * O * C;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)C, (int)O, 1.0f, dy, (int)O, w,
                    (int)C, 0.0f, dxs + offsets[e] * C, (int)C);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)O, (int)C, (int)rows, 1.0f, dy, (int)O, x,
                    (int)C, 1.0f, dW + (int64_t)e * O * C, (int)C);
    }
}

/* Backward of combine_forward (the residual's gradient passes through unchanged,
 * the caller adds it): dys[pos[t,j]] = gate[t,j] * dout[t];
 * dgate[t,j] = <dout[t], ys[pos[t,j]]>;  dbias += sum_t dout[t]. */
void combine_backward(float *dys, float *dgate, float *dbias, const float *dout, const float *ys,
                      const int32_t *pos, const float *gate, int64_t N, int k, int64_t H)
{
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        const float *g = dout + t * H;
        for (int j = 0; j < k; j++) {
            int64_t m = pos[t * k + j];
            const float *y = ys + m * H;
            float *dy = dys + m * H, w = gate[t * k + j], dot = 0.0f;
            for (int64_t i = 0; i < H; i++) {
                dy[i] = w * g[i];
                dot += g[i] * y[i];
            }
            dgate[t * k + j] = dot;
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < H; i++) {
        float acc = 0.0f;
        for (int64_t t = 0; t < N; t++) acc += dout[t * H + i];
        dbias[i] += acc;
    }
}

/* Backward of dispatch_gather: dx (N or N*k rows, C) (+)= the sorted rows back
 * in pair order; with per_slot == 0 the k slots of a token add up into its row.
 * Per destination row, so no two threads write the same row. */
void dispatch_gather_backward(float *dx, const float *dxs, const int32_t *pos, int64_t N, int k, int64_t C,
                              int per_slot, int accumulate)
{
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++)
        for (int j = 0; j < k; j++) {
            const float *src = dxs + (int64_t)pos[t * k + j] * C;
            float *d = dx + (per_slot ? t * k + j : t) * C;
            if (!accumulate && (per_slot || j == 0))
                memcpy(d, src, (size_t)C * sizeof(float));
            else
                for (int64_t i = 0; i < C; i++) d[i] += src[i];
        }
}
