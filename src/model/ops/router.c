/* router.c — top-k gating shared by MoA and MoE, and the two router losses. */
#include "ops.h"

#include <math.h>

/* One token: the indices of its k largest logits zt, in descending order,
 * into it; their softmax into gt. */
static void router_topk(int32_t *it, float *gt, const float *zt, int E, int k)
{
    int n = 0;
    /* insertion into a k-long sorted list; '>' keeps the lower index ahead
     * on ties, and NaN never displaces a number */
    for (int e = 0; e < E; e++) {
        int p = n < k ? n : k;
        while (p > 0 && (zt[e] > zt[it[p - 1]] || isnan(zt[it[p - 1]]))) p--;
        if (p >= k) continue;
        for (int q = (n < k ? n : k - 1); q > p; q--) it[q] = it[q - 1];
        it[p] = e;
        if (n < k) n++;
    }
    float mx = zt[it[0]], sum = 0.0f;
    for (int j = 0; j < k; j++) sum += (gt[j] = expf(zt[it[j]] - mx));
    for (int j = 0; j < k; j++) gt[j] /= sum;
}

/* z (N,E) = inp (N,H) @ Wr^T; per token the k largest logits in descending
 * order (ties: lower index first), gates = softmax over those k only. */
void router_forward(float *z, int32_t *idx, float *gate, const float *inp, const float *Wr, int64_t N, int H,
                    int E, int k)
{
    if (N <= WSMALL_N) /* decoding: each row by itself, so its logits do not depend on its batch-mates */
        for (int64_t t = 0; t < N; t++)
            for (int e = 0; e < E; e++) {
                const float *x = inp + t * H, *w = Wr + (int64_t)e * H;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int i = 0; i < H; i++) acc += x[i] * w[i];
                z[t * E + e] = acc;
            }
    else
        matmul_forward(z, inp, Wr, N, H, E, 0);
    if (N * E < JM_OMP_GRAIN) /* no OpenMP region (ops.h) */
        for (int64_t t = 0; t < N; t++) router_topk(idx + t * k, gate + t * k, z + t * E, E, k);
    else {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < N; t++) router_topk(idx + t * k, gate + t * k, z + t * E, E, k);
    }
}

/* switch = E * sum_e (P_e / sum P) * (f_e / sum f), P_e = sum_t softmax(z_t)_e,
 * f_e = tokens that chose e; zloss = mean_t logsumexp(z_t)^2  (spec, "Losses").
 * The sums run over the valid tokens (all when valid is NULL). */
void router_losses(double *switch_loss, double *z_loss, const float *z, const int32_t *idx, const uint8_t *valid,
                   int64_t N, int E, int k)
{
    double P[JM_MAX_EXPERTS] = {0}, zsum = 0.0;
    int64_t f[JM_MAX_EXPERTS] = {0}, n = 0;
    for (int64_t t = 0; t < N; t++) {
        if (valid && !valid[t]) continue;
        n++;
        const float *zt = z + t * E;
        double mx = zt[0], s = 0.0;
        for (int e = 1; e < E; e++) mx = zt[e] > mx ? zt[e] : mx;
        for (int e = 0; e < E; e++) s += exp(zt[e] - mx);
        double lse = mx + log(s);
        zsum += lse * lse;
        for (int e = 0; e < E; e++) P[e] += exp(zt[e] - lse);
        for (int j = 0; j < k; j++) f[idx[t * k + j]]++;
    }
    double Ps = 0.0, fs = 0.0, acc = 0.0;
    for (int e = 0; e < E; e++) {
        Ps += P[e];
        fs += (double)f[e];
    }
    for (int e = 0; e < E; e++) acc += (P[e] / Ps) * ((double)f[e] / fs);
    *switch_loss = n ? E * acc : 0.0;
    *z_loss = n ? zsum / (double)n : 0.0;
}

/* dz (N,E) of  sum_t <dgate_t, gate_t>  +  aux_w * switch  +  zl_w * zloss.
 * Gates: g = softmax over the k selected logits, so dz_sel = g * (dg - <g, dg>).
 * Switch loss: f_e (counts) carries no gradient; through P_e = sum_t p_t,e and
 * the softmax Jacobian, dz_t = aux_w * p_t * (v - <p_t, v>) with
 * v_e = E f_e / (sum f * sum P)  (the sum P term adds the same constant to
 * every v_e, which the Jacobian removes). z-loss: dz_t = zl_w * 2 lse_t / N * p_t.
 * N counts the valid tokens; the others get only the gates' gradient. */
void router_backward(float *dz, const float *dgate, const float *z, const int32_t *idx, const float *gate,
                     const uint8_t *valid, int64_t N, int E, int k, double aux_w, double zl_w)
{
    double f[JM_MAX_EXPERTS] = {0}, v[JM_MAX_EXPERTS];
    int64_t n = 0;
    for (int64_t t = 0; t < N; t++) {
        if (valid && !valid[t]) continue;
        n++;
        for (int j = 0; j < k; j++) f[idx[t * k + j]] += 1.0;
    }
    const double Nv = n ? (double)n : 1.0;
    for (int e = 0; e < E; e++) v[e] = (double)E * f[e] / (Nv * k * Nv);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        const float *zt = z + t * E;
        float *d = dz + t * E;
        const double aw = valid && !valid[t] ? 0.0 : aux_w, zw = valid && !valid[t] ? 0.0 : zl_w;
        double mx = zt[0], s = 0.0, pv = 0.0, p[JM_MAX_EXPERTS];
        for (int e = 1; e < E; e++) mx = zt[e] > mx ? zt[e] : mx;
        for (int e = 0; e < E; e++) s += (p[e] = exp(zt[e] - mx));
        for (int e = 0; e < E; e++) {
            p[e] /= s;
            pv += p[e] * v[e];
        }
        double lse = mx + log(s);
        for (int e = 0; e < E; e++)
            d[e] = (float)(aw * p[e] * (v[e] - pv) + zw * 2.0 * lse / Nv * p[e]);
        const float *g = gate + t * k, *dg = dgate + t * k;
        double gdg = 0.0;
        for (int j = 0; j < k; j++) gdg += (double)g[j] * dg[j];
        for (int j = 0; j < k; j++) d[idx[t * k + j]] += (float)(g[j] * (dg[j] - gdg));
    }
}
