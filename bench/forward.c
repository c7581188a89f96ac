/* bench/forward — forward-pass throughput of the C model, and the machine's
 * fp32 GEMM peak measured in the same process, on the same threads.
 * Prints one JSON line per measurement (bench/run_bench.py compares them
 * with the PyTorch reference). Not a test: nothing here passes or fails. */
#include "jetmoe.h"

#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double now(void) { return omp_get_wtime(); }

/* Best-of-reps SGEMM rate at a size large enough to reach the kernel's peak. */
static double gemm_peak_gflops(int n, int reps)
{
    float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n), *c = malloc(sizeof(float) * n * n);
    for (int i = 0; i < n * n; i++) {
        a[i] = (float)((i * 7) % 13) / 13.0f;
        b[i] = (float)((i * 5) % 11) / 11.0f;
    }
    double best = 1e30;
    for (int r = 0; r < reps + 1; r++) {
        double t0 = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        double t = now() - t0;
        if (r > 0 && t < best) best = t; /* first run warms caches and threads */
    }
    free(a);
    free(b);
    free(c);
    return 2.0 * n * n * (double)n / best / 1e9;
}

/* Multiply-add FLOPs of one forward over B x T tokens (causal attention counts
 * only the visible keys). */
static double forward_flops(const jm_config *c, int B, int T)
{
    double H = c->hidden_size, V = c->vocab_size, E = c->num_experts, k = c->top_k;
    double A = (double)c->num_kv_heads * c->head_dim, F = c->intermediate_size, N = (double)B * T;
    double per_token_layer = H * 2 * A + 2 * E * H + k * (H * A + A * H) + k * (H * 2 * F + F * H);
    double att = (double)B * k * c->num_kv_heads * 2.0 * c->head_dim * (T * (T + 1.0) / 2.0);
    return 2.0 * (N * (c->num_layers * per_token_layer + H * V)) + 2.0 * c->num_layers * att;
}

int main(int argc, char **argv)
{
    int threads = 2, B = 8, T = 256, iters = 5;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--batch")) B = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seq")) T = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--iters")) iters = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "bench/forward: unknown flag %s\n", argv[i]);
            return 2;
        }
    }
    jm_set_threads(threads);

    /* the bench config: vocab 32000, hidden 256, 4 layers, 4 KV heads of 64,
     * expert FFN 704, 8 experts top-2 */
    jm_config c;
    jm_config_default(&c);
    c.vocab_size = 32000;
    c.hidden_size = 256;
    c.num_layers = 4;
    c.num_kv_heads = 4;
    c.head_dim = 64;
    c.intermediate_size = 704;
    c.num_experts = 8;
    c.top_k = 2;
    c.initializer_range = 0.02;
    jm_model *m;
    jm_error err;
    if (jm_model_create(&c, 1, &m, &err)) {
        fprintf(stderr, "bench/forward: %s\n", err.msg);
        return 1;
    }
    int32_t *tok = malloc(sizeof(int32_t) * B * T);
    for (int i = 0; i < B * T; i++) tok[i] = (int32_t)((i * 2654435761u) % (unsigned)c.vocab_size);

    double peak = gemm_peak_gflops(2048, 3);
    jm_losses L;
    if (jm_forward(m, tok, B, T, &L, &err)) { /* warm-up: plans the activation arena */
        fprintf(stderr, "bench/forward: %s\n", err.msg);
        return 1;
    }
    double best = 1e30, total = 0;
    for (int i = 0; i < iters; i++) {
        double t0 = now();
        jm_forward(m, tok, B, T, &L, &err);
        double t = now() - t0;
        total += t;
        best = t < best ? t : best;
    }
    double mean = total / iters, flops = forward_flops(&c, B, T);
    printf("{\"impl\":\"c\",\"what\":\"gemm_peak\",\"n\":2048,\"gflops\":%.2f,\"threads\":%d}\n", peak, threads);
    printf("{\"impl\":\"c\",\"what\":\"forward\",\"tokens_per_s\":%.1f,\"seconds_per_iter\":%.5f,\"best_s\":%.5f,"
           "\"gflops\":%.2f,\"gflop_per_iter\":%.3f,\"threads\":%d,\"batch\":%d,\"seq\":%d,\"loss\":%.4f}\n",
           B * T / mean, mean, best, flops / mean / 1e9, flops / 1e9, threads, B, T, L.loss);
    free(tok);
    jm_model_free(m);
    return 0;
}
