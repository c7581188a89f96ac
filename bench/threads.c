/* bench/threads — what splitting work across threads costs on this machine,
 * the measurement behind the decode step's grain sizes (JM_OMP_GRAIN in
 * ops.h, and the chunk sizes of wexperts_forward and attention_decode).
 *
 *   build/bench/threads [--threads N]
 *
 * Prints, per thread count 1..N: the cost of one empty OpenMP parallel
 * region (fork + join), of one empty job on the decode pool (jm_pool_run),
 * and the time per element of a light op (an RMSNorm row of 2048): the
 * break-even size is where the work split saves as much as the split costs.
 * And what a region whose if() is false costs: libgomp still builds a team
 * of one (why the light ops enter no region at all below the grain: ops.h,
 * JM_OMP_GRAIN). Not a test: figures only. */

#include "common.h"
#include "base/base.h"

#include <math.h>
#include <omp.h>
#include <stdatomic.h>

static void nothing(void *ctx, int64_t first, int64_t count, int thread)
{
    (void)first, (void)count, (void)thread;
    atomic_int *hits = ctx;
    atomic_fetch_add_explicit(hits, 1, memory_order_relaxed);
}

/* One empty region of `threads` threads; with split 0, one whose if() is
 * false (run by the calling thread alone: what a team of one costs). */
static double omp_region_us(int threads, int split, int reps)
{
    static volatile int sink;
    volatile int on = split; /* read at run time: the if() is decided then, as a light op's */
    double best = 1e30;
    for (int round = 0; round < 5; round++) {
        double t0 = now();
        for (int r = 0; r < reps; r++) {
#pragma omp parallel num_threads(threads) if (on)
            sink += omp_get_thread_num() == 0;
        }
        double t = (now() - t0) / reps * 1e6;
        best = t < best ? t : best;
    }
    return best;
}

static double pool_job_us(jm_pool *p, int reps)
{
    atomic_int hits = 0;
    double best = 1e30;
    for (int round = 0; round < 5; round++) {
        double t0 = now();
        for (int r = 0; r < reps; r++) jm_pool_run(p, jm_pool_threads(p), nothing, &hits);
        double t = (now() - t0) / reps * 1e6;
        best = t < best ? t : best;
    }
    return best;
}

/* ns per element of an RMSNorm-like pass (sum of squares, then scale) */
static double light_ns_per_element(void)
{
    enum { H = 2048, ROWS = 256 };
    float *x = malloc(sizeof(float) * H * ROWS), *y = malloc(sizeof(float) * H * ROWS);
    for (int i = 0; i < H * ROWS; i++) x[i] = (float)(i % 17) * 0.1f;
    double best = 1e30;
    for (int round = 0; round < 20; round++) {
        double t0 = now();
        for (int r = 0; r < ROWS; r++) {
            float ss = 0;
            for (int i = 0; i < H; i++) ss += x[r * H + i] * x[r * H + i];
            float s = 1.0f / sqrtf(ss / H + 1e-6f);
            for (int i = 0; i < H; i++) y[r * H + i] = x[r * H + i] * s;
        }
        double t = (now() - t0) / (H * ROWS) * 1e9;
        best = t < best ? t : best;
    }
    static volatile float sink;
    sink += y[7];
    free(x);
    free(y);
    return best;
}

int main(int argc, char **argv)
{
    int threads = 2;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--threads N]\n", argv[0]);
            return 2;
        }
    }
    char cpu[128];
    cpu_model(cpu, sizeof cpu);
    double ns = light_ns_per_element();
    printf("threads bench on %s: a light op costs %.2f ns per element on one thread; a region whose if() is "
           "false, %.2f us\n", cpu, ns, omp_region_us(1, 0, 20000));
    printf("  %7s %14s %14s %18s\n", "threads", "omp region us", "pool job us", "break-even (omp)");
    for (int t = 1; t <= threads; t++) {
        jm_pool *p = jm_pool_create(t);
        double o = omp_region_us(t, 1, 2000), q = pool_job_us(p, 20000);
        /* split n elements over t threads: saves n*ns*(1 - 1/t); costs one region */
        double even = t > 1 ? o * 1e3 / (ns * (1.0 - 1.0 / t)) : 0;
        printf("  %7d %14.2f %14.2f %15.0f el\n", t, o, q, even);
        jm_pool_free(p);
    }
    return 0;
}
