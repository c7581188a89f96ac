/* test_pool.c — the decode pool (base/pool.c): every chunk of every job runs
 * exactly once, on a valid thread index, whatever the thread count and job
 * size (one chunk, many, more than one published job holds); jobs follow
 * each other without mixing up (a worker that slept through jobs must not
 * take a chunk of the next one); the pool starts and stops cleanly with its
 * workers spinning or asleep.
 * Prints `PASS name` / `FAIL name: why`; exits 1 on any failure. */
#include "base/base.h"
#include "harness.h"

#include <stdatomic.h>
#include <string.h>
#include <time.h>

typedef struct {
    _Atomic uint8_t *hits; /* per chunk: how many times it ran */
    int64_t n;
    int threads;
    atomic_int bad_call;   /* a thread index or run outside the job */
    atomic_int seen[64];   /* chunks run per thread index */
    atomic_int calls;
    _Atomic int64_t longest; /* the longest run */
    atomic_int marked;       /* chunks run so far */
    int64_t next0;           /* where the caller's next run of its own share must start */
    atomic_int out_of_order; /* the caller's run inside its share, not where its last one ended */
    atomic_int timed_out;    /* a worker waited in vain for the caller to run the rest */
} job;

static void mark(void *ctx, int64_t first, int64_t count, int thread)
{
    job *j = ctx;
    atomic_fetch_add(&j->calls, 1);
    if (thread < 0 || thread >= j->threads || first < 0 || count < 1 || first + count > j->n) {
        atomic_store(&j->bad_call, 1);
        return;
    }
    atomic_fetch_add(&j->seen[thread], (int)count);
    for (int64_t c = first; c < first + count; c++) atomic_fetch_add(&j->hits[c], 1);
    atomic_fetch_add(&j->marked, (int)count);
    int64_t l = atomic_load(&j->longest);
    while (count > l && !atomic_compare_exchange_weak(&j->longest, &l, count)) {}
}

/* A job whose chunks take some time, so that workers do get some. */
static void mark_slowly(void *ctx, int64_t first, int64_t count, int thread)
{
    volatile double x = 1;
    for (int i = 0; i < 2000 * count; i++) x = x * 1.0000001 + 1e-9;
    mark(ctx, first, count, thread);
}

/* The caller (thread 0) reads its share, the first n / threads chunks, as
 * one stream: each of its runs there starts where its last one ended. */
static void mark_in_order(void *ctx, int64_t first, int64_t count, int thread)
{
    job *j = ctx;
    if (thread == 0 && first < j->n / j->threads) {
        if (first != j->next0) atomic_store(&j->out_of_order, 1);
        j->next0 = first + count;
    }
    mark_slowly(ctx, first, count, thread);
}

/* A worker's run that does not end until every other chunk has run: the
 * caller must take all the chunks no worker has started, from their shares
 * too (waits at most 10 s). */
static void wait_for_the_rest(void *ctx, int64_t first, int64_t count, int thread)
{
    job *j = ctx;
    if (thread == 0) { /* slowly, so that the worker gets a run before the caller has taken them all */
        mark_slowly(ctx, first, count, thread);
        return;
    }
    mark(ctx, first, count, thread);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (atomic_load(&j->marked) < j->n) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec > 10) {
            atomic_store(&j->timed_out, 1);
            return;
        }
    }
}

static int run_job(jm_pool *p, int64_t n, jm_pool_fn fn, int threads, int *helpers)
{
    job j = {.hits = calloc((size_t)(n ? n : 1), 1), .n = n, .threads = threads};
    jm_pool_run(p, n, fn, &j);
    int ok = !atomic_load(&j.bad_call) && (n > 0 || atomic_load(&j.calls) == 0);
    for (int64_t i = 0; i < n; i++) ok &= atomic_load(&j.hits[i]) == 1;
    for (int t = 1; t < threads && helpers; t++) *helpers += atomic_load(&j.seen[t]) > 0;
    free((void *)j.hits);
    return ok;
}

int main(void)
{
    uint64_t seed = 7;
    for (int threads = 1; threads <= 4; threads++) {
        jm_pool *p = jm_pool_create(threads);
        if (!check(p && jm_pool_threads(p) == threads, "pool_create", "%d threads", threads)) return exit_status();
        int ok = 1, jobs = 0, helped = 0;
        /* many jobs back to back, of random sizes including 0 and 1 */
        for (int r = 0; r < 3000; r++, jobs++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            int64_t n = (int64_t)(seed >> 33) % 300;
            ok &= run_job(p, r % 50 == 0 ? r % 2 : n, mark, threads, NULL);
        }
        /* jobs worth splitting: the workers must take part */
        for (int r = 0; r < 50; r++, jobs++) ok &= run_job(p, 400, mark_slowly, threads, &helped);
        /* after the workers have gone to sleep (they spin ~0.3 ms first) */
        struct timespec nap = {0, 5 * 1000 * 1000};
        nanosleep(&nap, NULL);
        ok &= run_job(p, 1000, mark_slowly, threads, &helped), jobs++;
        /* more chunks than one published job holds (2^20 - 1) */
        ok &= run_job(p, (1 << 20) + 5, mark, threads, NULL), jobs++;
        char name[64];
        snprintf(name, sizeof name, "pool_every_chunk_once_%d_threads", threads);
        check_detail(ok, name, "%d jobs of 0 .. 2^20+5 chunks", jobs);
        if (threads > 1) {
            snprintf(name, sizeof name, "pool_workers_help_%d_threads", threads);
            check_detail(helped > 0, name, "(slow job, worker) pairs where the worker ran chunks: %d of %d", helped,
                         51 * (threads - 1));
        }
        jm_pool_free(p);
    }
    /* a run is what a thread claimed at once: a 400-chunk job on 2 threads
     * starts with a claim of half the caller's share, handed over whole */
    {
        jm_pool *p = jm_pool_create(2);
        job j = {.hits = calloc(400, 1), .n = 400, .threads = 2};
        jm_pool_run(p, 400, mark, &j);
        int ok = !atomic_load(&j.bad_call);
        for (int i = 0; i < 400; i++) ok &= atomic_load(&j.hits[i]) == 1;
        check(p && ok && atomic_load(&j.longest) >= 100 && atomic_load(&j.calls) < 400, "pool_hands_out_runs",
              "%d calls for 400 chunks, the longest run %lld", atomic_load(&j.calls),
              (long long)atomic_load(&j.longest));
        free((void *)j.hits);
        jm_pool_free(p);
    }
    /* each thread's share is one stream (the caller's, checked); a worker
     * that stalls does not stall the job beyond its own run */
    {
        jm_pool *p = jm_pool_create(2);
        int ordered = 1, stalls = 0, timeouts = 0, ok = 1;
        for (int r = 0; r < 50; r++) {
            job j = {.hits = calloc(400, 1), .n = 400, .threads = 2};
            jm_pool_run(p, 400, mark_in_order, &j);
            ordered &= !atomic_load(&j.out_of_order);
            for (int i = 0; i < 400; i++) ok &= atomic_load(&j.hits[i]) == 1;
            free((void *)j.hits);
        }
        for (int r = 0; r < 1000 && stalls < 3; r++) { /* until the worker has had a run in 3 */
            job j = {.hits = calloc(400, 1), .n = 400, .threads = 2};
            jm_pool_run(p, 400, wait_for_the_rest, &j);
            stalls += atomic_load(&j.seen[1]) > 0;
            timeouts += atomic_load(&j.timed_out);
            for (int i = 0; i < 400; i++) ok &= atomic_load(&j.hits[i]) == 1;
            free((void *)j.hits);
        }
        check(p && ok && ordered, "pool_caller_share_in_order", "50 jobs of 400 chunks on 2 threads");
        check(p && ok && stalls > 0 && !timeouts, "pool_caller_takes_the_rest",
              "%d jobs where the worker stalled in its run, %d where it waited in vain for the caller", stalls,
              timeouts);
        jm_pool_free(p);
    }
    /* NULL runs inline on the caller, the whole job as one run */
    job j = {.hits = calloc(10, 1), .n = 10, .threads = 1};
    jm_pool_run(NULL, 10, mark, &j);
    int ok = atomic_load(&j.seen[0]) == 10 && atomic_load(&j.calls) == 1 && !atomic_load(&j.bad_call);
    for (int i = 0; i < 10; i++) ok &= atomic_load(&j.hits[i]) == 1;
    check(ok, "pool_null_runs_inline", "%d chunks on the caller in %d calls", atomic_load(&j.seen[0]),
          atomic_load(&j.calls));
    free((void *)j.hits);
    jm_pool_free(NULL);
    check(jm_cpu_count() >= 1, "pool_cpu_count", "%d", jm_cpu_count());
    return exit_status();
}
