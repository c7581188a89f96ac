/* bench/attention — decode attention over the KV cache alone: one token's
 * step through every layer of JetMoE-8B's attention shape (24 layers, 16 KV
 * heads of 128, top-2 query slots per head), at P cached positions, on the
 * decode pool, through each kernel set's attention kernels, beside the read
 * bandwidth measured in the same run.
 *
 *   build/bench/attention [--positions 512] [--threads 1,2] [--kv-cache bf16|f32] [--steps 20]
 *                         [--sets avx512,avx2,portable] [--between 55]
 *
 * Between layers it reads --between MB of other memory (untimed), as a
 * decode step streams each layer's weights between its attentions (55 MB:
 * JetMoE-8B's q4 bytes a token, 1315 MB, over 24 layers; 0 for none). That
 * evicts what the caches held of the KV cache's page tables too: on 4 KB
 * pages attention alone took 3.2 ms a step at one thread, 9.5-11 with 55 MB
 * between, and 16-20 inside a q4 decode step (AMD EPYC family 26 model 2).
 * Times are the best step of --steps; "mean" is their average.
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

/* Reads 256 KB chunks first .. first + count - 1 of the memory at ctx, a
 * line of each 64: a job on the decode pool, whose threads then stay as busy
 * between layers as a step's weight products keep them. */
enum { CHUNK = 256 << 10 };
static void read_chunks(void *ctx, int64_t first, int64_t count, int thread)
{
    (void)thread;
    static volatile uint64_t sink;
    const uint8_t *p = (const uint8_t *)ctx + first * CHUNK;
    uint64_t acc[8] = {0};
    for (size_t i = 0; i < (size_t)count * CHUNK; i += 512) {
        __builtin_prefetch(p + i + READ_AHEAD, 0, 3);
        for (int j = 0; j < 8; j++) acc[j] += *(const uint64_t *)(p + i + 64 * j);
    }
    for (int j = 0; j < 8; j++) sink += acc[j];
}

int main(int argc, char **argv)
{
    int P = 512, steps = 20, between = 55;
    uint64_t rng = BENCH_SEED;
    const char *threads_arg = "1,2", *kv = "bf16", *sets = "avx512,avx2,portable";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--positions")) P = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads")) threads_arg = argv[i + 1];
        else if (!strcmp(argv[i], "--kv-cache")) kv = argv[i + 1];
        else if (!strcmp(argv[i], "--steps")) steps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--sets")) sets = argv[i + 1];
        else if (!strcmp(argv[i], "--between")) between = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: bench/attention [--positions 512] [--threads 1,2] [--kv-cache bf16|f32] "
                            "[--steps 20] [--sets avx512,avx2,portable] [--between 55]\n");
            return 2;
        }
    }
    if (argc % 2 == 0 || P < 1 || steps < 1 || between < 0 || (strcmp(kv, "bf16") && strcmp(kv, "f32"))) {
        fprintf(stderr, "bench/attention: --positions and --steps >= 1, --between >= 0, --kv-cache bf16 or f32, "
                        "flags with values\n");
        return 2;
    }
    const int bf16 = !strcmp(kv, "bf16"), ctx = P + 1;
    const size_t esize = bf16 ? 2 : 4, A = (size_t)HKV * D, layer_elems = 2 * A * (size_t)ctx;
    void *cache[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        cache[l] = huge_alloc(layer_elems * esize); /* on 2 MB pages, as the model's cache */
        for (size_t i = 0; i < layer_elems; i++) { /* values of an activation's size */
            float f = bench_frnd(&rng);
            if (bf16) ((uint16_t *)cache[l])[i] = jm_f32_to_bf16(f);
            else ((float *)cache[l])[i] = f;
        }
    }
    /* the other memory, on 2 MB pages as weights copied into RAM are */
    const size_t other_bytes = (size_t)between * LAYERS << 20;
    uint8_t *other = NULL;
    if (other_bytes) {
        other = mmap(NULL, other_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (other == MAP_FAILED) {
            fprintf(stderr, "bench/attention: out of memory for --between %d\n", between);
            return 1;
        }
        madvise(other, other_bytes, MADV_HUGEPAGE);
        memset(other, 1, other_bytes);
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
    printf("%-15s %8s %10s %8s %8s %8s %6s\n", "kernels", "threads", "ms/step", "mean", "GB/s", "read", "%read");
    char setlist[128];
    snprintf(setlist, sizeof setlist, "%s", sets);
    for (char *ssave = NULL, *name = strtok_r(setlist, ",", &ssave); name; name = strtok_r(NULL, ",", &ssave)) {
        const wkernels *kern = wkernels_get(name);
        if (!kern) {
            printf("%-15s (this CPU or build cannot run it)\n", name);
            continue;
        }
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
            double best = 1e30, sum = 0;
            for (int s = 0; s <= steps; s++) { /* the first warms */
                double dt = 0;
                for (int l = 0; l < LAYERS; l++) {
                    if (other)
                        jm_pool_run(pool, ((int64_t)between << 20) / CHUNK, read_chunks,
                                    other + ((size_t)l * between << 20));
                    const double t0 = now();
                    attention_decode(out, q, kv_new, (kv_cache){cache[l], bf16}, &run, 1, scratch, ctx, K, HKV, D, kern,
                                     pool);
                    dt += now() - t0;
                }
                if (s && dt < best) best = dt;
                if (s) sum += dt;
            }
            const double bw = read_bandwidth((size_t)1 << 30, 5), gbs = step_bytes / best / 1e9;
            printf("%-15s %8d %10.2f %8.2f %8.1f %8.1f %5.0f%%\n", name, threads, 1e3 * best,
                   1e3 * sum / steps, gbs, bw, 100 * gbs / bw);
            fflush(stdout);
            jm_pool_free(pool);
            free(scratch);
        }
    }
    for (int l = 0; l < LAYERS; l++) free(cache[l]);
    if (other) munmap(other, other_bytes);
    free(q), free(out), free(kv_new);
    return 0;
}
