/* cross_entropy.c — token cross-entropy from logits, fp32 rows, double accumulation. */
#include "ops.h"

#include <math.h>

double cross_entropy_forward(const float *logits, const int32_t *targets, int64_t N, int64_t V, int64_t *count,
                             float *logp)
{
    double sum = 0.0;
    int64_t n = 0;
#pragma omp parallel for schedule(static) reduction(+ : sum, n)
    for (int64_t t = 0; t < N; t++) {
        if (targets[t] < 0) { /* masked (no next token, or prompt in fine-tuning) */
            if (logp) logp[t] = 0.0f;
            continue;
        }
        const float *x = logits + t * V;
        float mx = row_max(x, V), s = exp_shift_sum(NULL, x, V, mx);
        double nll = (double)mx + log((double)s) - (double)x[targets[t]];
        if (logp) logp[t] = (float)-nll;
        sum += nll;
        n++;
    }
    *count = n;
    return n ? sum / (double)n : 0.0;
}

/* dlogits = w * (softmax(logits) - onehot(target)) per counted row (w: the
 * row's weight, or scale), 0 for masked rows. dlogits may alias logits (the
 * forward's logits are consumed). */
void cross_entropy_backward(float *dlogits, const float *logits, const int32_t *targets, const float *weight,
                            int64_t N, int64_t V, float scale)
{
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        const float *x = logits + t * V;
        float *d = dlogits + t * V;
        if (targets[t] < 0) {
            for (int64_t i = 0; i < V; i++) d[i] = 0.0f;
            continue;
        }
        float w = weight ? weight[t] : scale;
        float mx = row_max(x, V), s = exp_shift_sum(d, x, V, mx);
        float inv = w / s;
#pragma omp simd
        for (int64_t i = 0; i < V; i++) d[i] *= inv;
        d[targets[t]] -= w;
    }
}

double log_prob_row(const float *logits, int64_t V, int32_t target)
{
    float mx = logits[0];
    for (int64_t i = 1; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    double sum = 0;
    for (int64_t i = 0; i < V; i++) sum += exp((double)logits[i] - mx);
    return (double)logits[target] - mx - log(sum);
}
