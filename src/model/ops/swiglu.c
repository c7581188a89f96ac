/* swiglu.c — the gated linear unit of the MoE experts: the first half of u is activated. */
#include "ops.h"

#include <math.h>

static void swiglu_row(float *o, const float *gate, const float *up, int64_t F)
{
    for (int64_t i = 0; i < F; i++) {
        float g = gate[i];
        o[i] = g / (1.0f + jm_expf(-g)) * up[i];
    }
}

void swiglu_forward(float *h, const float *u, int64_t M, int64_t F)
{
    if (M * F < JM_OMP_GRAIN) /* no OpenMP region (ops.h) */
        for (int64_t m = 0; m < M; m++) swiglu_row(h + m * F, u + m * 2 * F, u + m * 2 * F + F, F);
    else {
#pragma omp parallel for schedule(static)
        for (int64_t m = 0; m < M; m++) swiglu_row(h + m * F, u + m * 2 * F, u + m * 2 * F + F, F);
    }
}

/* h = silu(g) * up:  dup = dh * silu(g);  dg = dh * up * sig(g) * (1 + g * (1 - sig(g))). */
void swiglu_backward(float *du, const float *dh, const float *u, int64_t M, int64_t F)
{
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *gate = u + m * 2 * F, *up = gate + F, *d = dh + m * F;
        float *dg = du + m * 2 * F, *dup = dg + F;
        for (int64_t i = 0; i < F; i++) {
            float g = gate[i], sig = 1.0f / (1.0f + jm_expf(-g));
            dup[i] = d[i] * g * sig;
            dg[i] = d[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
        }
    }
}
