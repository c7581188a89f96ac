/* bench/common.h — shared by the C benchmarks: the machine's fp32 GEMM peak,
 * the read bandwidth (a decode roofline), the bench config of the issues, the
 * FLOP count of a forward pass, and the timing loop. */
#ifndef JM_BENCH_COMMON_H
#define JM_BENCH_COMMON_H

#include "jetmoe.h"

#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static inline double now(void) { return omp_get_wtime(); }

/* The CPU as /proc/cpuinfo names it, with its family and model (virtual
 * machines often say just "AMD EPYC"), for every figure a bench prints. */
static inline void cpu_model(char *out, size_t cap)
{
    char name[128] = "unknown CPU", fam[16] = "?", mod[16] = "?", line[512];
    FILE *f = fopen("/proc/cpuinfo", "r");
    while (f && fgets(line, sizeof line, f)) {
        char *v = strchr(line, ':');
        if (!v) continue;
        v += v[1] == ' ' ? 2 : 1;
        v[strcspn(v, "\n")] = 0;
        if (strncmp(line, "model name", 10) == 0) snprintf(name, sizeof name, "%s", v);
        else if (strncmp(line, "cpu family", 10) == 0) snprintf(fam, sizeof fam, "%s", v);
        else if (strncmp(line, "model\t", 6) == 0) snprintf(mod, sizeof mod, "%s", v);
        else if (line[0] == '\n') break; /* the first CPU is enough */
    }
    if (f) fclose(f);
    snprintf(out, cap, "%.80s (family %.8s model %.8s)", name, fam, mod); /* fits the callers' 128 bytes */
}

/* Streaming reads of a buffer on the library's threads, the decode
 * roofline's bandwidth: what one decode step, which reads each active weight
 * once, can hope for. The buffer is laid out as the model's weights in
 * memory (2 MB pages asked for), and read the fastest way we know: integer
 * sums the compiler may reorder and vectorise, 16 independent ones to keep
 * the loads in flight (~10% faster than one running sum), and each 4 KB
 * page prefetched READ_AHEAD bytes before the sums reach it, as the
 * kernels do (PAGE_AHEAD, src/model/ops/wkernels.c). In this virtual
 * machine that read 0-15% more than the same loop without the prefetch
 * (AMD EPYC family 26 model 2; the kernels gained far more, 21-23 -> 35-38
 * GB/s, as their passes do more work per line). */
#define READ_AHEAD 65536
typedef struct {
    uint8_t *buf;
    size_t n;
} read_buf;

/* `bytes` of memory on 2 MB pages where the kernel gives them, as the
 * weights a decode reads (jm_weights_to_ram) and its KV cache (model.c's
 * alloc_huge, which returns NULL where this exits): in this virtual machine
 * a stream over 4 KB pages runs at what its page walks allow, which is
 * another figure and a noisier one. Exits when out of memory; free() it. */
static inline void *huge_alloc(size_t bytes)
{
    const size_t huge = (size_t)2 << 20;
    void *p = NULL;
    if (posix_memalign(&p, huge, (bytes + huge - 1) / huge * huge)) {
        fprintf(stderr, "bench: out of memory (%.0f MB)\n", bytes / 1e6);
        exit(1);
    }
    madvise(p, (bytes + huge - 1) / huge * huge, MADV_HUGEPAGE);
    return p;
}

/* A buffer of `bytes` (whole pages) for read passes, first touched by the
 * threads that will read it; 0 when out of memory. */
static inline int read_buf_new(read_buf *rb, size_t bytes)
{
    const size_t page = 4096, n = (bytes + page - 1) / page * page;
    uint8_t *buf = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) return 0;
    madvise(buf, n, MADV_HUGEPAGE);
#pragma omp parallel for schedule(static)
    for (size_t p = 0; p < n; p += page) memset(buf + p, (int)(p >> 12), page); /* first touch by its reader */
    *rb = (read_buf){buf, n};
    return 1;
}

static inline void read_buf_free(read_buf *rb)
{
    if (rb->buf) munmap(rb->buf, rb->n);
    *rb = (read_buf){0};
}

/* The plain read of one 4 KB page into the 16 sums (the page READ_AHEAD
 * bytes on prefetched: a prefetch never faults, even past the end). */
static inline void read_page(const uint8_t *p, uint64_t acc[16])
{
    __builtin_prefetch(p + READ_AHEAD, 0, 3);
    const uint64_t *w = (const uint64_t *)p;
    for (size_t i = 0; i < 4096 / 8; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += w[i + j];
}

/* One pass over the buffer on the library's threads -> GB/s. The clock runs
 * from a barrier after the threads are up to the end of the reads, so a
 * sleeping thread's wake-up is not counted against the memory. */
static inline double read_pass(const read_buf *rb)
{
    static volatile uint64_t sink; /* keeps the sums (and so the reads) alive */
    const size_t page = 4096;
    uint64_t sum = 0;
    double t0 = 0, t1 = 0;
#pragma omp parallel reduction(+ : sum)
    {
        uint64_t acc[16] = {0};
#pragma omp barrier
#pragma omp master
        t0 = now();
#pragma omp for schedule(static)
        for (size_t p = 0; p < rb->n; p += page) read_page(rb->buf + p, acc);
#pragma omp master
        t1 = now();
        for (int j = 0; j < 16; j++) sum += acc[j];
    }
    sink += sum;
    return (double)rb->n / (t1 - t0) / 1e9;
}

/* The best rate of `reps` passes over a fresh buffer of `bytes`. */
static inline double read_bandwidth(size_t bytes, int reps)
{
    read_buf rb;
    if (!read_buf_new(&rb, bytes)) return 0;
    double best = 0;
    for (int r = 0; r < reps; r++) {
        const double g = read_pass(&rb);
        if (g > best) best = g;
    }
    read_buf_free(&rb);
    return best;
}

/* Best-of-reps SGEMM rate at a size large enough to reach the kernel's peak. */
static inline double gemm_peak_gflops(int n, int reps)
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
static inline double forward_flops(const jm_config *c, int B, int T)
{
    double H = c->hidden_size, V = c->vocab_size, E = c->num_experts, k = c->top_k;
    double A = (double)c->num_kv_heads * c->head_dim, F = c->intermediate_size, N = (double)B * T;
    double per_token_layer = H * 2 * A + 2 * E * H + k * (H * A + A * H) + k * (H * 2 * F + F * H);
    double att = (double)B * k * c->num_kv_heads * 2.0 * c->head_dim * (T * (T + 1.0) / 2.0);
    return 2.0 * (N * (c->num_layers * per_token_layer + H * V)) + 2.0 * c->num_layers * att;
}

/* vocab 32000, hidden 256, 4 layers, 4 KV heads of 64, expert FFN 704, 8 experts top-2 */
static inline void bench_config(jm_config *c)
{
    jm_config_default(c);
    c->vocab_size = 32000;
    c->hidden_size = 256;
    c->num_layers = 4;
    c->num_kv_heads = 4;
    c->head_dim = 64;
    c->intermediate_size = 704;
    c->num_experts = 8;
    c->top_k = 2;
    c->initializer_range = 0.02;
}

/* --threads N --batch B --seq T --iters I */
static inline int bench_args(int argc, char **argv, const char *name, int *threads, int *B, int *T, int *iters)
{
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) *threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--batch")) *B = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seq")) *T = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--iters")) *iters = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "%s: unknown flag %s\n", name, argv[i]);
            return 2;
        }
    }
    return 0;
}

/* warmup untimed calls of step (the first also plans the arenas), then iters
 * timed ones, their seconds into t. Returns non-zero when a step fails. */
static inline int bench_times(int (*step)(void *ctx), void *ctx, int warmup, int iters, double *t)
{
    for (int i = 0; i < warmup; i++)
        if (step(ctx)) return 1;
    for (int i = 0; i < iters; i++) {
        double t0 = now();
        if (step(ctx)) return 1;
        t[i] = now() - t0;
    }
    return 0;
}

/* Times iters calls of step (after one warm-up call) and prints the GEMM peak
 * and the result as JSON lines. flops is the work of one call. Returns
 * non-zero when a step fails. */
static inline int bench_run(const char *what, int (*step)(void *ctx), void *ctx, int iters, double flops, int threads,
                     int B, int T, const double *loss)
{
    double peak = gemm_peak_gflops(2048, 3);
    double *t = malloc(sizeof *t * (size_t)(iters > 0 ? iters : 1));
    if (!t || bench_times(step, ctx, 1, iters, t)) {
        free(t);
        return 1;
    }
    double best = 1e30, total = 0;
    for (int i = 0; i < iters; i++) {
        total += t[i];
        best = t[i] < best ? t[i] : best;
    }
    free(t);
    double mean = total / iters;
    printf("{\"impl\":\"c\",\"what\":\"gemm_peak\",\"n\":2048,\"gflops\":%.2f,\"threads\":%d}\n", peak, threads);
    printf("{\"impl\":\"c\",\"what\":\"%s\",\"tokens_per_s\":%.1f,\"seconds_per_iter\":%.5f,\"best_s\":%.5f,"
           "\"gflops\":%.2f,\"gflop_per_iter\":%.3f,\"threads\":%d,\"batch\":%d,\"seq\":%d,\"loss\":%.4f}\n",
           what, B * T / mean, mean, best, flops / mean / 1e9, flops / 1e9, threads, B, T, *loss);
    return 0;
}

/* xorshift64 (the state is the caller's): the benchmarks' deterministic
 * data; bench_frnd in [-1, 1]. */
static inline uint32_t bench_rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return (uint32_t)(*s >> 16);
}
static inline float bench_frnd(uint64_t *s) { return (float)(bench_rnd(s) % 2000001) / 1e6f - 1.0f; }
#define BENCH_SEED 88172645463325252ull

static inline int bench_cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median of v[0..n), which it sorts. */
static inline double bench_median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, bench_cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* Whether the comma-separated list holds name. */
static inline int bench_in_list(const char *list, const char *name)
{
    const size_t n = strlen(name);
    for (const char *p = list; (p = strstr(p, name)); p += n)
        if ((p == list || p[-1] == ',') && (p[n] == ',' || p[n] == 0)) return 1;
    return 0;
}

/* Deterministic token ids spread over the vocabulary. */
static inline int32_t *bench_tokens(int n, int vocab)
{
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)n);
    for (int i = 0; tok && i < n; i++) tok[i] = (int32_t)((i * 2654435761u) % (unsigned)vocab);
    return tok;
}

#endif
