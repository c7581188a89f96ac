/* rmsnorm.c — RMSNorm, accumulated in fp32 as the spec asks: v / sqrt(mean(v^2) + eps) * w. */
#include "ops.h"

#include <math.h>

/* One row, and its 1 / rms into *rstd (unless NULL). */
static void rmsnorm_row(float *o, float *rstd, const float *x, const float *w, int64_t H, float eps)
{
    float ss = 0.0f;
    for (int64_t i = 0; i < H; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)H + eps);
    for (int64_t i = 0; i < H; i++) o[i] = x[i] * r * w[i];
    if (rstd) *rstd = r;
}

void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int64_t N, int64_t H, float eps)
{
    if (N * H < JM_OMP_GRAIN) /* no OpenMP region (ops.h) */
        for (int64_t t = 0; t < N; t++) rmsnorm_row(out + t * H, rstd ? rstd + t : NULL, inp + t * H, w, H, eps);
    else {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < N; t++) rmsnorm_row(out + t * H, rstd ? rstd + t : NULL, inp + t * H, w, H, eps);
    }
}

/* out = x * r * w with r = (mean(x^2) + eps)^-1/2:
 * dx += r * (dout*w) - x * r^3 / H * sum_i(dout_i * w_i * x_i);  dw += sum_t dout * x * r.
 * dinp is accumulated: the normed input also feeds the residual stream. */
void rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w, const float *rstd,
                      int64_t N, int64_t H)
{
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        const float *x = inp + t * H, *g = dout + t * H;
        float *dx = dinp + t * H, r = rstd[t], dot = 0.0f;
        for (int64_t i = 0; i < H; i++) dot += g[i] * w[i] * x[i];
        float c = dot * r * r * r / (float)H;
        for (int64_t i = 0; i < H; i++) dx[i] += r * g[i] * w[i] - c * x[i];
    }
    /* columns in parallel: each dw[i] is a sum over tokens, no races */
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < H; i++) {
        float acc = 0.0f;
        for (int64_t t = 0; t < N; t++) acc += dout[t * H + i] * inp[t * H + i] * rstd[t];
        dw[i] += acc;
    }
}
