/* bench/products — a decode step's products as decoding runs them (on the
 * decode pool, in its chunks), against plain reads of as many bytes through
 * the same pool, in one process.
 *
 *   build/bench/products [--threads 2] [--types bf16,q8,q4] [--items 40] [--mb 1400]
 *
 * Per weight type, product shape of the JetMoE-8B layout (all but the LM
 * head) and thread count 1..N, triplets of items run in turn: the product
 * with the best kernel set this CPU runs (kern), the same chunks read by the
 * "read" tiles (read: every byte the product reads, as plain loads, no
 * math), and a plain read of as many bytes in pieces of the largest decode
 * chunk (plain: bench/common.h's read loop); the ratios printed are the
 * medians over the triplets, the GB/s the totals over them. Each item takes the next of several copies of
 * the weights (--mb in all, at least 5 copies), so none finds its bytes in
 * a cache. The copies ask for 2 MB pages and Q8/Q4 rows are interleaved,
 * their scales inline, as jm_weights_to_ram lays out an 8B model; inputs and scratch are 64-byte
 * aligned, as the model's arena is (misaligned, Q4's figures moved by tens
 * of points).
 *
 * Why beside bench/decode and bench/kernels: on a shared machine the memory
 * and the cores come and go within seconds, so a whole 8B run tells a few
 * percent of difference from noise only over many runs, and bench/kernels
 * reads one long matrix with one thread. Here kern/plain and read/plain are
 * ratios of items timed side by side, product by product: what the kernels
 * lose against the memory (kern below read), and what the product's access
 * pattern loses (read below plain). Prints figures; it is not a test (what
 * it has shown: README, Benchmarks). */
#include "common.h"
#include "base/base.h"
#include "model/ops/ops.h"

#include <stdatomic.h>
#include <stdint.h>

typedef struct {
    const char *name;
    int64_t E, O, C; /* E stacked matrices of O rows x C inputs, two of them active (one when E = 1) */
} shape;

/* The 8B layout's decode products (config hidden 2048, 16 KV heads x 128,
 * intermediate 5632, 8 experts top-2). */
static const shape shapes[] = {
    {"moe in", 8, 11264, 2048},
    {"moe out", 8, 2048, 5632},
    {"moa in/out", 8, 2048, 2048},
    {"kv", 1, 4096, 2048},
};

/* A plain read's piece: as large as the decode products' largest chunks
 * (DECODE_CHUNK_MAX, qmatmul.c), so that read_page's prefetch READ_AHEAD on
 * mostly stays in the thread's own piece. */
#define PLAIN_PIECE 262144

typedef struct {
    const uint8_t *p;
} plain_job;

static _Atomic uint64_t plain_sink; /* keeps the sums (and so the reads) alive */

static void plain_chunk(void *ctx, int64_t chunk, int thread)
{
    (void)thread;
    const uint8_t *p = ((const plain_job *)ctx)->p + chunk * PLAIN_PIECE;
    uint64_t acc[16] = {0}, sum = 0;
    for (int64_t at = 0; at < PLAIN_PIECE; at += 4096) read_page(p + at, acc);
    for (int j = 0; j < 16; j++) sum += acc[j];
    atomic_fetch_add_explicit(&plain_sink, sum, memory_order_relaxed);
}

static void *alloc_or_die(size_t align, size_t bytes)
{
    void *p = NULL;
    if (posix_memalign(&p, align, (bytes + align - 1) / align * align)) {
        fprintf(stderr, "bench/products: out of memory (%.0f MB)\n", bytes / 1e6);
        exit(1);
    }
    return p;
}

enum { MAX_TRIPLETS = 4096 };

/* One row of the table: kern, read and plain GB/s of shape sh, type t. */
static void run(const wkernels *kern, wtype t, const char *tname, const shape *sh, int threads, int items, double mb,
                uint64_t *rng)
{
    const int q = t == WT_Q8 || t == WT_Q4;
    const int64_t E = sh->E, O = sh->O, C = sh->C, nact = E > 1 ? 2 : 1;
    /* as jm_weights_to_ram lays them out: Q8/Q4 WILV_INLINE (every shape
     * here allows it), BF16 row-major */
    const wview layout = {t, NULL, NULL, q && wrows_interleave(t, E * O, C) ? WILV_INLINE : 0};
    const size_t huge = (size_t)2 << 20, wbytes = (size_t)wview_bytes(layout, E * O, C);
    const size_t per = (wbytes + huge - 1) / huge * huge;
    int copies = (int)(mb * 1e6 / (double)per);
    copies = copies < 5 ? 5 : copies;
    uint8_t *buf = alloc_or_die(huge, per * (size_t)copies);
    madvise(buf, per * (size_t)copies, MADV_HUGEPAGE);
    for (size_t i = 0; i < per * (size_t)copies; i += 4) {
        uint32_t r = bench_rnd(rng);
        if (t == WT_BF16) r = (r & 0x807f807fu) | 0x3c003c00u; /* two bf16 of magnitude ~0.01 */
        memcpy(buf + i, &r, 4);
    }
    for (int c = 0; layout.ilv && c < copies; c++) /* F16 scales in [0.008, 0.016) */
        for (int64_t i = 0; i < E * O; i++)
            for (int64_t b = 0; b < C / QBLOCK; b++) {
                uint8_t *p = (uint8_t *)wscale_ptr((wview){t, buf + c * per, NULL, WILV_INLINE}, i, b, C / QBLOCK);
                const uint16_t h = (uint16_t)(0x2000 + bench_rnd(rng) % 0x400);
                p[0] = (uint8_t)h, p[1] = (uint8_t)(h >> 8);
            }
    jm_pool *pool = jm_pool_create(threads);
    if (!pool) {
        fprintf(stderr, "bench/products: cannot start %d threads\n", threads);
        exit(1);
    }
    float *x = alloc_or_die(64, sizeof(float) * (size_t)(nact * C));
    float *y = alloc_or_die(64, sizeof(float) * (size_t)(nact * O));
    void *scratch = alloc_or_die(64, wmatmul_scratch_bytes(nact, C, threads));
    for (int64_t i = 0; i < nact * C; i++) x[i] = bench_frnd(rng);
    int64_t offsets[JM_MAX_EXPERTS + 1] = {0};
    for (int64_t e = 0; e < E; e++) offsets[e + 1] = offsets[e] + (E == 1 || e == 2 || e == 5); /* experts 2 and 5 */
    const double bytes = (double)(nact * wview_bytes(layout, O, C));
    const int64_t plain_chunks = (int64_t)(bytes / PLAIN_PIECE);
    const double plain_bytes = (double)plain_chunks * PLAIN_PIECE;
    const wkernels *K[2] = {kern, wkernels_read()};

    /* triplets (kern, read, plain) until there are `items` and each kind
     * has run for 0.3 s; the ratios are the medians of the triplets', which
     * a moment the machine is elsewhere moves less than it moves the sums */
    static double kr[MAX_TRIPLETS], rr[MAX_TRIPLETS];
    double secs[3] = {0}, moved[3] = {0}, dt[3];
    int n = 0;
    for (int it = -2; it < items || (secs[0] < 0.3 || secs[1] < 0.3 || secs[2] < 0.3); it++) {
        if (n == MAX_TRIPLETS) break;
        for (int v = 0; v < 3; v++) {
            const int c = (int)(((int64_t)(it + 2) * 3 + v) % copies); /* the copies in turn */
            const uint8_t *base = buf + (size_t)c * per;
            const double t0 = now();
            if (v < 2)
                wexperts_forward(y, x, (wview){t, base, NULL, layout.ilv}, offsets, (int)E, C, O, K[v], scratch, pool);
            else jm_pool_run(pool, plain_chunks, plain_chunk, &(plain_job){base});
            dt[v] = now() - t0;
        }
        if (it < 0) continue; /* two to warm clocks, threads and code */
        for (int v = 0; v < 3; v++) secs[v] += dt[v], moved[v] += v < 2 ? bytes : plain_bytes;
        kr[n] = (bytes / dt[0]) / (plain_bytes / dt[2]);
        rr[n++] = (bytes / dt[1]) / (plain_bytes / dt[2]);
    }
    double gbs[3];
    for (int v = 0; v < 3; v++) gbs[v] = moved[v] / secs[v] / 1e9;
    const double k_pl = bench_median(kr, n), r_pl = bench_median(rr, n);
    printf("%-5s %-10s %6lld x %-5lld %2d | %6.1f %6.1f %6.1f | %5.0f%% %5.0f%% | %5d\n", tname, sh->name,
           (long long)O, (long long)C, threads, gbs[0], gbs[1], gbs[2], 100 * k_pl, 100 * r_pl, n);
    fflush(stdout);
    jm_pool_free(pool);
    free(buf), free(x), free(y), free(scratch);
}

int main(int argc, char **argv)
{
    static const wtype types[] = {WT_BF16, WT_Q8, WT_Q4};
    static const char *tnames[] = {"bf16", "q8", "q4"};
    long threads = 2, items = 40;
    double mb = 1400;
    const char *types_arg = "bf16,q8,q4";
    int bad = argc % 2 == 0; /* a flag without its value */
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *v = argv[i + 1];
        char *end;
        if (!strcmp(argv[i], "--threads")) threads = strtol(v, &end, 10);
        else if (!strcmp(argv[i], "--items")) items = strtol(v, &end, 10);
        else if (!strcmp(argv[i], "--mb")) mb = strtod(v, &end);
        else if (!strcmp(argv[i], "--types")) types_arg = v, end = (char *)v + strlen(v);
        else end = (char *)v;
        bad |= end == v || *end; /* an unknown flag, or a value that is not a whole number */
    }
    int known = 0; /* every name in --types one we run */
    for (int ti = 0; ti < 3; ti++) known += bench_in_list(types_arg, tnames[ti]);
    for (const char *p = types_arg; *p; p++) known -= *p == ',';
    const wkernels *K = wkernels_get("auto");
    bad |= known != 1 || threads < 1 || threads > 64 || items < 1 || items > MAX_TRIPLETS;
    if (bad || !(mb >= 1 && mb <= 1e6)) { /* written so that NaN fails too */
        fprintf(stderr, "usage: bench/products [--threads 1-64 (2)] [--types bf16,q8,q4] [--items 1-%d (40)] "
                        "[--mb 1-1000000 (1400)]\n", MAX_TRIPLETS);
        return 2;
    }
    if (!K) {
        fprintf(stderr, "bench/products: no kernel set runs on this CPU\n");
        return 1;
    }
    char cpu[256];
    cpu_model(cpu, sizeof cpu);
    printf("CPU: %s; kernel set %s\n", cpu, K->name);
    printf("A decode step's products (2 of 8 experts active; kv: one matrix), at least %ld triplets each, over %.0f "
           "MB of copies (at least 5);\nGB/s of the kernels (kern), of the read tiles (read) and of a plain read of as "
           "many bytes (plain), all on the decode pool, totals over the items;\nk/pl and r/pl: medians over the "
           "triplets of kern and read against the plain read timed beside them\n\n",
           items, mb);
    printf("%-5s %-10s %14s %2s | %6s %6s %6s | %6s %6s | %5s\n", "type", "product", "rows x inputs", "T", "kern",
           "read", "plain", "k/pl", "r/pl", "items");
    uint64_t rng = BENCH_SEED;
    for (int ti = 0; ti < 3; ti++) {
        if (!bench_in_list(types_arg, tnames[ti])) continue;
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
            for (int th = 1; th <= threads; th++) run(K, types[ti], tnames[ti], &shapes[si], th, (int)items, mb, &rng);
    }
    return 0;
}
