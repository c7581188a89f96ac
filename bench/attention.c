/* bench/attention — decode attention over the KV cache alone: one token's
 * step through every layer of JetMoE-8B's attention shape (24 layers, 16 KV
 * heads of 128, top-2 query slots per head), at P cached positions, on the
 * decode pool, with each kernel set (a bf16 cache goes through the set's
 * attention kernels), beside the read bandwidth measured in the same run.
 *
 *   build/bench/attention [--positions 512] [--threads 1,2] [--kv-cache bf16|f32] [--steps 20]
 *                         [--sets avx512,avx2,portable]
 *
 * A step reads every layer's cached keys and values once (24 x 2 x 2048 x P
 * values), so like the weights it is bound by memory bandwidth: GB/s counts
 * those bytes, and %read is that over plain reads. Each layer's cache is its
 * own allocation, as the model's, so nothing is in cache from the last
 * layer. Prints figures; it is not a test. */
#include "common.h"
#include "base/base.h"
#include "model/ops/ops.h"

#include <stdint.h>

enum { LAYERS = 24, HKV = 16, D = 128, K = 2 };

int main(int argc, char **argv)
{
    int P = 512, steps = 20;
    uint64_t rng = BENCH_SEED;
    const char *threads_arg = "1,2", *kv = "bf16", *sets = "avx512,avx2,portable";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--positions")) P = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads")) threads_arg = argv[i + 1];
        else if (!strcmp(argv[i], "--kv-cache")) kv = argv[i + 1];
        else if (!strcmp(argv[i], "--steps")) steps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--sets")) sets = argv[i + 1];
        else {
            fprintf(stderr, "usage: bench/attention [--positions 512] [--threads 1,2] [--kv-cache bf16|f32] "
                            "[--steps 20] [--sets avx512,avx2,portable]\n");
            return 2;
        }
    }
    if (argc % 2 == 0 || P < 1 || steps < 1 || (strcmp(kv, "bf16") && strcmp(kv, "f32"))) {
        fprintf(stderr, "bench/attention: --positions and --steps >= 1, --kv-cache bf16 or f32, flags with values\n");
        return 2;
    }
    const int bf16 = !strcmp(kv, "bf16"), ctx = P + 1;
    const size_t esize = bf16 ? 2 : 4, A = (size_t)HKV * D, layer_elems = 2 * A * (size_t)ctx;
    void *cache[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        cache[l] = aligned_alloc(64, (layer_elems * esize + 63) / 64 * 64);
        if (!cache[l]) {
            fprintf(stderr, "bench/attention: out of memory\n");
            return 1;
        }
        for (size_t i = 0; i < layer_elems; i++) { /* values of an activation's size */
            float f = bench_frnd(&rng);
            if (bf16) ((uint16_t *)cache[l])[i] = jm_f32_to_bf16(f);
            else ((float *)cache[l])[i] = f;
        }
    }
    float *q = malloc(sizeof(float) * K * A), *out = malloc(sizeof(float) * K * A);
    float *kv_new = malloc(sizeof(float) * 2 * A);
    for (size_t i = 0; i < K * A; i++) q[i] = 2 * bench_frnd(&rng); /* scores spread enough that softmax is not flat */
    for (size_t i = 0; i < 2 * A; i++) kv_new[i] = bench_frnd(&rng);

    char cpu[128];
    cpu_model(cpu, sizeof cpu);
    const double step_bytes = (double)LAYERS * 2 * A * (P + 1) * esize;
    printf("decode attention: %d layers x %d KV heads x %d, %d query slots a head, %d cached positions, %s cache "
           "(%.1f MB a step); %s\n",
           LAYERS, HKV, D, K, P, kv, step_bytes / 1e6, cpu);
    printf("%-9s %8s %10s %8s %8s %6s\n", "kernels", "threads", "ms/step", "GB/s", "read", "%read");
    char setlist[128];
    snprintf(setlist, sizeof setlist, "%s", sets);
    for (char *ssave = NULL, *name = strtok_r(setlist, ",", &ssave); name; name = strtok_r(NULL, ",", &ssave)) {
        const wkernels *kern = wkernels_get(name);
        if (!kern) {
            printf("%-9s (this CPU or build cannot run it)\n", name);
            continue;
        }
        if (!bf16 && kern != wkernels_get("auto")) continue; /* an fp32 cache takes no set's kernels */
    char list[64];
        snprintf(list, sizeof list, "%s", threads_arg);
        for (char *save = NULL, *t = strtok_r(list, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
            const int threads = atoi(t);
            if (threads < 1) continue;
            omp_set_num_threads(threads);
            jm_pool *pool = jm_pool_create(threads);
            float *scratch = malloc(sizeof(float) * attention_cache_scratch_floats(ctx, K, D) * (size_t)threads);
            if (!pool || !scratch) {
                fprintf(stderr, "bench/attention: out of memory\n");
                return 1;
            }
            const att_run run = {0, 1, P, 0};
            double best = 1e30;
            for (int s = 0; s <= steps; s++) { /* the first warms */
                double t0 = now();
                for (int l = 0; l < LAYERS; l++)
                    attention_decode(out, q, kv_new, (kv_cache){cache[l], bf16}, &run, 1, scratch, ctx, K, HKV, D, kern,
                                     pool);
                double dt = now() - t0;
                if (s && dt < best) best = dt;
            }
            const double bw = read_bandwidth((size_t)1 << 30, 5), gbs = step_bytes / best / 1e9;
            printf("%-9s %8d %10.2f %8.1f %8.1f %5.0f%%\n", bf16 ? name : "-", threads, 1e3 * best, gbs, bw, 100 * gbs / bw);
            fflush(stdout);
            jm_pool_free(pool);
            free(scratch);
        }
    }
    for (int l = 0; l < LAYERS; l++) free(cache[l]);
    free(q), free(out), free(kv_new);
    return 0;
}
