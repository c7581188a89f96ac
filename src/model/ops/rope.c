/* rope.c — rotary position embedding, rotate-half form over the full head dim (spec, "RoPE"). */
#include "ops.h"

#include <math.h>

void rope_tables(float *cos_t, float *sin_t, int T, int D, double theta)
{
    int half = D / 2;
    for (int p = 0; p < T; p++)
        for (int i = 0; i < half; i++) {
            /* angles in double: at long contexts p * inv_freq loses digits in fp32 */
            double angle = (double)p * pow(theta, -2.0 * i / D);
            cos_t[(int64_t)p * half + i] = (float)cos(angle);
            sin_t[(int64_t)p * half + i] = (float)sin(angle);
        }
}

/* One row's heads rotated by the angles of position p. */
static void rope_row(float *x, int heads, int D, int64_t p, const float *cos_t, const float *sin_t)
{
    int half = D / 2;
    const float *c = cos_t + p * half, *s = sin_t + p * half;
    for (int h = 0; h < heads; h++) {
        float *v = x + (int64_t)h * D;
        for (int i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * c[i] - b * s[i];
            v[i + half] = b * c[i] + a * s[i];
        }
    }
}

void rope_forward(float *x, int64_t rows, int T, int pos0, const int32_t *pos, int heads, int D, int64_t stride,
                  const float *cos_t, const float *sin_t)
{
    if (rows * heads * D < JM_OMP_GRAIN) /* no OpenMP region (ops.h) */
        for (int64_t r = 0; r < rows; r++)
            rope_row(x + r * stride, heads, D, pos ? pos[r] : pos0 + r % T, cos_t, sin_t);
    else {
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            rope_row(x + r * stride, heads, D, pos ? pos[r] : pos0 + r % T, cos_t, sin_t);
    }
}

/* The rotation is orthogonal: the gradient rotates back by -angle, in place. */
void rope_backward(float *dx, int64_t rows, int T, const int32_t *pos, int heads, int D, int64_t stride,
                   const float *cos_t, const float *sin_t)
{
    int half = D / 2;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t p = pos ? pos[r] : r % T;
        const float *c = cos_t + p * half, *s = sin_t + p * half;
        for (int h = 0; h < heads; h++) {
            float *v = dx + r * stride + (int64_t)h * D;
            for (int i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * c[i] + b * s[i];
                v[i + half] = b * c[i] - a * s[i];
            }
        }
    }
}
