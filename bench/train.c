/* bench/train — training throughput (forward + backward + AdamW) of the C
 * model on the bench config, and the fp32 GEMM peak measured in the same
 * process. One JSON line per measurement; bench/run_bench.py compares them
 * with the PyTorch reference. Not a test. */
#include "common.h"

int main(int argc, char **argv)
{
    int threads = 2, B = 8, T = 256, iters = 4;
    if (bench_args(argc, argv, "bench/train", &threads, &B, &T, &iters)) return 2;
    jm_set_threads(threads);
    jm_config c;
    bench_config(&c);
    jm_model *m;
    jm_optimizer *opt;
    jm_error err;
    jm_adamw_config ac = {5e-4, 0.9, 0.95, 1e-8, 0.1, 1.0};
    if (jm_model_create(&c, 1, &m, &err) || jm_optimizer_create(m, &ac, &opt, &err) || jm_zero_grad(m, &err)) {
        fprintf(stderr, "bench/train: %s\n", err.msg);
        return 1;
    }
    int32_t *tok = malloc(sizeof(int32_t) * B * T);
    for (int i = 0; i < B * T; i++) tok[i] = (int32_t)((i * 2654435761u) % (unsigned)c.vocab_size);
    double peak = gemm_peak_gflops(2048, 3);
    jm_step_stats st;
    if (jm_train_step(m, opt, tok, B, T, 1, 5e-4, 1.0, NULL, &st, &err)) { /* warm-up */
        fprintf(stderr, "bench/train: %s\n", err.msg);
        return 1;
    }
    double best = 1e30, total = 0;
    for (int i = 0; i < iters; i++) {
        double t0 = now();
        jm_train_step(m, opt, tok, B, T, 1, 5e-4, 1.0, NULL, &st, &err);
        double t = now() - t0;
        total += t;
        best = t < best ? t : best;
    }
    /* model FLOPs: the backward costs twice the forward's products */
    double mean = total / iters, flops = 3.0 * forward_flops(&c, B, T);
    printf("{\"impl\":\"c\",\"what\":\"gemm_peak\",\"n\":2048,\"gflops\":%.2f,\"threads\":%d}\n", peak, threads);
    printf("{\"impl\":\"c\",\"what\":\"train\",\"tokens_per_s\":%.1f,\"seconds_per_iter\":%.5f,\"best_s\":%.5f,"
           "\"gflops\":%.2f,\"gflop_per_iter\":%.3f,\"threads\":%d,\"batch\":%d,\"seq\":%d,\"loss\":%.4f}\n",
           B * T / mean, mean, best, flops / mean / 1e9, flops / 1e9, threads, B, T, st.loss);
    free(tok);
    jm_optimizer_free(opt);
    jm_model_free(m);
    return 0;
}
