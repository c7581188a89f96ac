/* rmsnorm.c — RMSNorm, accumulated in fp32 as the spec asks: v / sqrt(mean(v^2) + eps) * w. */
#include "ops.h"

#include <math.h>

void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int64_t N, int64_t H, float eps)
{
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        const float *x = inp + t * H;
        float *o = out + t * H;
        float ss = 0.0f;
        for (int64_t i = 0; i < H; i++) ss += x[i] * x[i];
        float r = 1.0f / sqrtf(ss / (float)H + eps);
        for (int64_t i = 0; i < H; i++) o[i] = x[i] * r * w[i];
        if (rstd) rstd[t] = r;
    }
}
