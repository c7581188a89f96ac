/* pool.c — the decode step's threads: a persistent pool whose caller never
 * waits for a thread that has no work.
 *
 * Why not OpenMP here: a decode step is dozens of products of a few
 * microseconds each, and an OpenMP region ends at a barrier that waits for
 * every thread of the team, working or not. On shared virtual CPUs a sibling
 * thread the OS has put aside (another process wants its core) stalls that
 * barrier for a scheduler time slice, and with one region per op that made
 * decoding 30-100x slower on a busy machine, and 2 threads slower than 1 on
 * an idle one.
 *
 * Here a job is n chunks, split into one contiguous share per thread. Each
 * thread claims runs from the front of its own share, so what it reads is
 * one stream from chunk to chunk (a kernel's prefetches past the end of its
 * run land in its next one), and when its share is gone it takes runs from
 * the back of the others' shares. The caller claims chunks too, so it alone
 * can finish any job; workers that are awake help, and the caller waits
 * only for chunks a worker has started. An idle worker spins for a bounded
 * time (jobs within a step come microseconds apart), yielding its core now
 * and then, then sleeps on a condition variable until the next job.
 *
 * Every share's word packs (generation, next chunk, end) so that one
 * compare-and-swap claims a run of chunks of the current job only: a worker
 * that slept through a job cannot take chunks of the next one by mistake.
 *
 * Shares rather than one counter all threads take runs from (guided, as
 * before): there two threads' runs interleaved, so each run was a new
 * stream, started cold. bench/products' 8-layer step at 2 threads, three
 * rounds alternated with the counter: kernels at 82-84% -> 87-90% of a
 * plain read (Q8), 81-85% -> 87-88% (Q4); a job reading 4 MB in chunks of
 * 256 KB lost 6-7 us to one big read, now 3-4 (AMD EPYC family 26 model 2). */
#include "base.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define IDX_BITS 20
#define IDX_MASK ((UINT64_C(1) << IDX_BITS) - 1)
#define GEN_SHIFT (2 * IDX_BITS)
#define MAX_CHUNKS ((int64_t)IDX_MASK) /* per published job; jm_pool_run splits larger ones */
#define SPIN_NS 300000                 /* an idle worker's spin before it sleeps (0.3 ms) */
#define YIELD_NS 20000                 /* after this much spinning, yield the core between checks */

typedef struct {
    jm_pool *pool;
    int index;
} worker_arg;

/* A thread's share of the current job: generation << 40 | next << 20 | end,
 * alone on its cache line (its owner and a thief are all that touch it). */
typedef struct {
    _Alignas(64) _Atomic uint64_t word;
} share;

struct jm_pool {
    int threads; /* the caller and threads - 1 workers */
    int started; /* workers started (jm_pool_free joins them) */
    pthread_t *tid;
    worker_arg *args;
    share *shares;         /* one a thread */
    _Atomic uint64_t job;  /* the published job's generation << 40 (workers watch it) */
    _Atomic int64_t done;  /* chunks of the current job finished */
    jm_pool_fn fn;         /* the current job: written before it is published */
    void *ctx;
    int64_t base;          /* chunk index of the published job's first chunk */
    uint64_t gen;
    _Atomic int sleepers;
    _Atomic int stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t gen_of(uint64_t v) { return v >> GEN_SHIFT; }

/* Claims a run of share s of job generation g: its owner from the front,
 * half of what is left (its runs follow each other in memory, so their
 * size matters only to what a thief can still take); another thread from
 * the back, half of what is left, at least one. -> the first chunk, *count
 * of them; -1 when the share is empty or holds another job. */
static int64_t claim(share *s, uint64_t g, int own, int64_t *count)
{
    uint64_t v = atomic_load_explicit(&s->word, memory_order_acquire);
    for (;;) {
        const uint64_t next = (v >> IDX_BITS) & IDX_MASK, end = v & IDX_MASK, left = end - next;
        if (gen_of(v) != g || next >= end) return -1;
        const uint64_t c = own ? (left + 1) / 2 : left > 1 ? left / 2 : 1;
        const uint64_t to = own ? v + (c << IDX_BITS) : v - c;
        if (atomic_compare_exchange_weak_explicit(&s->word, &v, to, memory_order_acquire, memory_order_acquire)) {
            *count = (int64_t)c;
            return (int64_t)(own ? next : end - c);
        }
    }
}

/* Runs chunks of job generation g while there are any: its own share's,
 * then the others'; -> how many. The job's fields are read after a
 * successful claim: until those chunks are done the job cannot end, so the
 * caller cannot be writing the next one's. */
static int64_t work(jm_pool *p, int index, uint64_t g)
{
    int64_t n = 0, i, c;
    for (int k = 0; k < p->threads; k++) {
        share *s = &p->shares[(index + k) % p->threads];
        while ((i = claim(s, g, k == 0, &c)) >= 0) {
            p->fn(p->ctx, p->base + i, c, index);
            atomic_fetch_add_explicit(&p->done, c, memory_order_release);
            n += c;
        }
    }
    return n;
}

static void *worker_main(void *arg)
{
    jm_pool *p = ((worker_arg *)arg)->pool;
    const int index = ((worker_arg *)arg)->index;
    uint64_t idle_since = now_ns();
    for (unsigned spins = 0;; spins++) {
        const uint64_t g = gen_of(atomic_load_explicit(&p->job, memory_order_acquire));
        if (work(p, index, g)) {
            idle_since = now_ns();
            spins = 0;
            continue;
        }
        if (atomic_load_explicit(&p->stop, memory_order_acquire)) break;
        cpu_relax();
        if (spins % 64) continue;
        uint64_t idle = now_ns() - idle_since;
        if (idle < SPIN_NS) {
            if (idle > YIELD_NS) sched_yield(); /* a busy machine: let whoever waits for this core have it */
            continue;
        }
        /* sleep until another job is published (jm_pool_run checks sleepers
         * after publishing; the check of the job word here is after the
         * increment); job g had nothing left for this thread */
        pthread_mutex_lock(&p->mu);
        atomic_fetch_add(&p->sleepers, 1);
        while (gen_of(atomic_load(&p->job)) == g && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
        atomic_fetch_sub(&p->sleepers, 1);
        pthread_mutex_unlock(&p->mu);
        idle_since = now_ns();
        spins = 0;
    }
    return NULL;
}

jm_pool *jm_pool_create(int threads)
{
    jm_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->threads = threads > 1 ? threads : 1;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->shares = aligned_alloc(_Alignof(share), (size_t)p->threads * sizeof *p->shares);
    p->tid = calloc((size_t)p->threads, sizeof *p->tid);
    p->args = calloc((size_t)p->threads, sizeof *p->args);
    if (!p->shares || !p->tid || !p->args) {
        jm_pool_free(p);
        return NULL;
    }
    for (int i = 0; i < p->threads; i++) atomic_init(&p->shares[i].word, 0);
    for (int i = 1; i < p->threads; i++) {
        p->args[i] = (worker_arg){p, i};
        if (pthread_create(&p->tid[i], NULL, worker_main, &p->args[i])) {
            jm_pool_free(p); /* joins the ones started */
            return NULL;
        }
        p->started = i;
    }
    return p;
}

void jm_pool_free(jm_pool *p)
{
    if (!p) return;
    atomic_store(&p->stop, 1);
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i <= p->started; i++) pthread_join(p->tid[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->tid);
    free(p->args);
    free(p->shares);
    free(p);
}

int jm_pool_threads(const jm_pool *p) { return p ? p->threads : 1; }

int jm_cpu_count(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

void jm_pool_run(jm_pool *p, int64_t nchunks, jm_pool_fn fn, void *ctx)
{
    if (!p || p->threads == 1 || nchunks <= 1) {
        if (nchunks > 0) fn(ctx, 0, nchunks, 0);
        return;
    }
    for (int64_t base = 0; base < nchunks; base += MAX_CHUNKS) {
        const int64_t n = nchunks - base < MAX_CHUNKS ? nchunks - base : MAX_CHUNKS;
        p->fn = fn;
        p->ctx = ctx;
        p->base = base;
        p->gen = (p->gen + 1) & ((UINT64_C(1) << 24) - 1);
        atomic_store_explicit(&p->done, 0, memory_order_relaxed);
        for (int t = 0; t < p->threads; t++) /* contiguous shares, as even as whole chunks make them */
            atomic_store_explicit(&p->shares[t].word, /* release: a claim of it sees the job's fields */
                                  p->gen << GEN_SHIFT | (uint64_t)(n * t / p->threads) << IDX_BITS |
                                      (uint64_t)(n * (t + 1) / p->threads),
                                  memory_order_release);
        atomic_store(&p->job, p->gen << GEN_SHIFT); /* publish (seq_cst: the shares before it) */
        if (atomic_load(&p->sleepers)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_broadcast(&p->cv);
            pthread_mutex_unlock(&p->mu);
        }
        work(p, 0, p->gen);
        /* only chunks a worker has started remain; a worker the OS has
         * descheduled mid-chunk gets the core back sooner if we yield */
        for (unsigned spins = 1; atomic_load_explicit(&p->done, memory_order_acquire) < n; spins++) {
            cpu_relax();
            if (spins % 1024 == 0) sched_yield();
        }
    }
}
