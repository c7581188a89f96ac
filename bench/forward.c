/* bench/forward — forward-pass throughput of the C model, and the machine's
 * fp32 GEMM peak measured in the same process, on the same threads.
 * Prints one JSON line per measurement (bench/run_bench.py compares them
 * with the PyTorch reference). Not a test: nothing here passes or fails. */
#include "common.h"

int main(int argc, char **argv)
{
    int threads = 2, B = 8, T = 256, iters = 5;
    if (bench_args(argc, argv, "bench/forward", &threads, &B, &T, &iters)) return 2;
    jm_set_threads(threads);
    jm_config c;
    bench_config(&c);
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
