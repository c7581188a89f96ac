/* bench/products — a decode step's products as decoding runs them (on the
 * decode pool, in its chunks), against plain reads of as many bytes through
 * the same pool, in one process.
 *
 *   build/bench/products [--threads 2] [--types bf16,q8,q4] [--items 40] [--mb 1400] [--layers 8]
 *
 * Per weight type, product shape of the JetMoE-8B layout (all but the LM
 * head) and thread count 1..N, triplets of items run in turn: the product
 * with the best kernel set this CPU runs (kern), the same chunks read by the
 * "read" tiles (read: every byte the product reads, as plain loads, no
 * math), and a plain read of as many bytes in pieces of the largest decode
 * chunk, claimed in runs as the products' chunks are and each run read as
 * one stream (plain: bench/common.h's read loop); the ratios printed are the
 * medians over the triplets, the GB/s the totals over them. Each item takes
 * the next of several copies of the weights (--mb in all, at least 5
 * copies), so none finds its bytes in a cache. Then a "step" row: the
 * products of --layers layers in sequence, as a decode step runs them, from
 * an arena laid out as a model's, 2 experts of 8 drawn at random per matrix
 * and token (its items are tokens; the arena is --layers layers whatever
 * --mb: a layer is about 700 MB in BF16, 370 in Q8, 200 in Q4). The
 * weights ask for 2 MB pages, Q8/Q4 rows are interleaved, their scales
 * inline, as jm_weights_to_ram lays out an 8B model; inputs and scratch are
 * 64-byte aligned, as the model's arena is (misaligned, Q4's figures moved
 * by tens of points).
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
 * (DECODE_CHUNK_MAX, qmatmul.c), so that the plain read ends a job as
 * coarsely as the products do; a thread reads each run of pieces it claims
 * as one stream, as the products read theirs. */
#define PLAIN_PIECE 262144

typedef struct {
    const uint8_t *p;
} plain_job;

static _Atomic uint64_t plain_sink; /* keeps the sums (and so the reads) alive */

static void plain_run(void *ctx, int64_t first, int64_t count, int thread)
{
    (void)thread;
    const uint8_t *p = ((const plain_job *)ctx)->p + first * PLAIN_PIECE;
    uint64_t acc[16] = {0}, sum = 0;
    for (int64_t at = 0; at < count * PLAIN_PIECE; at += 4096) read_page(p + at, acc);
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

/* Weights for timing, `bytes` on 2 MB pages: BF16 values of magnitude
 * ~0.01; Q8/Q4 bytes whose every 16-bit half is a normal F16 in [2^-7, 2),
 * so that any of them read as a scale is one (the values do not change the
 * time, and no subnormal or NaN could). */
static uint8_t *timing_weights(wtype t, size_t bytes, uint64_t *rng)
{
    const size_t huge = (size_t)2 << 20, all = (bytes + huge - 1) / huge * huge;
    uint8_t *buf = huge_alloc(all);
    for (size_t i = 0; i < all; i += 4) {
        uint32_t r = bench_rnd(rng);
        r = t == WT_BF16 ? (r & 0x807f807fu) | 0x3c003c00u : (r & 0x9fff9fffu) | 0x20002000u;
        memcpy(buf + i, &r, 4);
    }
    return buf;
}

/* What a row of the table times: item `it`'s products with set K, -> the
 * bytes they read; and where item `it`'s plain read of as many bytes starts. */
typedef struct {
    double (*products)(void *ctx, int it, const wkernels *K, jm_pool *pool);
    const uint8_t *(*plain_at)(void *ctx, int it, double bytes);
    void *ctx;
} timed;

/* Triplets (kern, read, plain) until there are `items` and each kind has
 * run for 0.3 s; prints the row: GB/s totals, and the medians of the
 * triplets' ratios, which a moment the machine is elsewhere moves less than
 * it moves the sums. */
static void triplets(const timed *tm, const wkernels *kern, jm_pool *pool, int items, const char *label)
{
    static double kr[MAX_TRIPLETS], rr[MAX_TRIPLETS];
    const wkernels *K[2] = {kern, wkernels_read()};
    double secs[3] = {0}, moved[3] = {0};
    int n = 0;
    for (int it = -2; it < items || (secs[0] < 0.3 || secs[1] < 0.3 || secs[2] < 0.3); it++) {
        if (n == MAX_TRIPLETS) break;
        double dt[3], bytes[3];
        for (int v = 0; v < 3; v++) {
            const int item = (it + 2) * 3 + v; /* each kind its own item: its own copy or experts */
            const double t0 = now();
            if (v < 2) bytes[v] = tm->products(tm->ctx, item, K[v], pool);
            else {
                const int64_t chunks = (int64_t)(bytes[0] / PLAIN_PIECE);
                jm_pool_run(pool, chunks, plain_run, &(plain_job){tm->plain_at(tm->ctx, item, bytes[0])});
                bytes[2] = (double)chunks * PLAIN_PIECE;
            }
            dt[v] = now() - t0;
        }
        if (it < 0) continue; /* two to warm clocks, threads and code */
        for (int v = 0; v < 3; v++) secs[v] += dt[v], moved[v] += bytes[v];
        kr[n] = (bytes[0] / dt[0]) / (bytes[2] / dt[2]);
        rr[n++] = (bytes[1] / dt[1]) / (bytes[2] / dt[2]);
    }
    printf("%s %2d | %6.1f %6.1f %6.1f | %5.0f%% %5.0f%% | %5d\n", label, jm_pool_threads(pool),
           moved[0] / secs[0] / 1e9, moved[1] / secs[1] / 1e9, moved[2] / secs[2] / 1e9, 100 * bench_median(kr, n),
           100 * bench_median(rr, n), n);
    fflush(stdout);
}

/* Q8/Q4 as jm_weights_to_ram lays them out (WILV_INLINE: every shape here
 * allows it), BF16 row-major. */
static int ram_layout(wtype t) { return t == WT_Q8 || t == WT_Q4 ? WILV_INLINE : 0; }

/* Bytes of the E matrices of shape sh, so laid out. */
static size_t stack_bytes(wtype t, const shape *sh)
{
    return (size_t)wview_bytes((wview){t, NULL, NULL, ram_layout(t)}, sh->E * sh->O, sh->C);
}

static jm_pool *pool_or_die(int threads)
{
    jm_pool *pool = jm_pool_create(threads);
    if (!pool) {
        fprintf(stderr, "bench/products: cannot start %d threads\n", threads);
        exit(1);
    }
    return pool;
}

/* Inputs and scratch, 64-byte aligned as the model's arena is (misaligned,
 * Q4's figures moved by tens of points): up to 2 rows of 11264. */
typedef struct {
    float *x, *y;
    void *scratch;
} io;

static io io_new(int threads, uint64_t *rng)
{
    io b = {alloc_or_die(64, sizeof(float) * 2 * 11264), alloc_or_die(64, sizeof(float) * 2 * 11264),
            alloc_or_die(64, wmatmul_scratch_bytes(2, 11264, threads, 1))};
    for (int64_t i = 0; i < 2 * 11264; i++) b.x[i] = bench_frnd(rng);
    return b;
}

static void io_free(io *b) { free(b->x), free(b->y), free(b->scratch); }

/* One product, 2 experts of E (experts 2 and 5; kv: its one matrix), from
 * copies taken in turn. */
typedef struct {
    wtype t;
    const shape *sh;
    uint8_t *buf;
    size_t per;
    int copies;
    io b;
} one_product;

static double product_item(void *ctx, int it, const wkernels *K, jm_pool *pool)
{
    const one_product *c = ctx;
    const int64_t E = c->sh->E, O = c->sh->O, C = c->sh->C;
    int64_t offsets[JM_MAX_EXPERTS + 1] = {0};
    for (int64_t e = 0; e < E; e++) offsets[e + 1] = offsets[e] + (E == 1 || e == 2 || e == 5);
    const wview w = {c->t, c->buf + (size_t)(it % c->copies) * c->per, NULL, ram_layout(c->t)};
    wexperts_forward(c->b.y, c->b.x, w, offsets, (int)E, C, O, K, c->b.scratch, pool);
    return (double)(offsets[E] * wview_bytes(w, O, C));
}

static const uint8_t *product_plain(void *ctx, int it, double bytes)
{
    (void)bytes;
    const one_product *c = ctx;
    return c->buf + (size_t)(it % c->copies) * c->per;
}

/* A row per product: its copies fill --mb (at least 5), so that none finds
 * its bytes in a cache. */
static void run(const wkernels *kern, wtype t, const char *tname, const shape *sh, int threads, int items, double mb,
                uint64_t *rng)
{
    const size_t huge = (size_t)2 << 20;
    const size_t per = (stack_bytes(t, sh) + huge - 1) / huge * huge;
    int copies = (int)(mb * 1e6 / (double)per);
    copies = copies < 5 ? 5 : copies;
    jm_pool *pool = pool_or_die(threads);
    one_product c = {t, sh, timing_weights(t, per * (size_t)copies, rng), per, copies, io_new(threads, rng)};
    char label[64];
    snprintf(label, sizeof label, "%-5s %-10s %6lld x %-5lld", tname, sh->name, (long long)sh->O, (long long)sh->C);
    triplets(&(timed){product_item, product_plain, &c}, kern, pool, items, label);
    jm_pool_free(pool);
    free(c.buf);
    io_free(&c.b);
}

/* A generator for item `it`'s draws, apart from every other item's. */
static uint64_t item_rng(int it)
{
    uint64_t rng = BENCH_SEED ^ ((uint64_t)it + 1) * 0x9e3779b97f4a7c15u;
    for (int k = 0; k < 8; k++) bench_rnd(&rng); /* states that differed in a few bits now differ in all */
    return rng;
}

/* A layer's matrices in the model's order: kv, moa in, moa out, moe in,
 * moe out (shapes[] indices). */
static const int layer_order[5] = {3, 2, 2, 0, 1};

/* A decode step's products in sequence, as decoding runs them: `layers`
 * layers of the five matrices above, laid out one after another as
 * jm_weights_to_ram lays out a model, each token 2 experts of 8 drawn at
 * random per matrix (the same draws for kern and read). Its plain read
 * reads as many bytes from a random place in the arena. */
typedef struct {
    wtype t;
    int layers;
    size_t at[5], per_layer, bytes; /* each matrix's place in a layer */
    uint8_t *buf;
    io b;
} step_case;

static double step_item(void *ctx, int it, const wkernels *K, jm_pool *pool)
{
    const step_case *c = ctx;
    uint64_t rng = item_rng(it / 3); /* kern and read of a triplet: the same experts */
    double bytes = 0;
    for (int l = 0; l < c->layers; l++)
        for (int m = 0; m < 5; m++) {
            const shape *sh = &shapes[layer_order[m]];
            const int64_t E = sh->E, a = (int64_t)(bench_rnd(&rng) % E);
            const int64_t b = E > 1 ? (a + 1 + (int64_t)(bench_rnd(&rng) % (E - 1))) % E : a; /* another */
            int64_t offsets[JM_MAX_EXPERTS + 1] = {0};
            for (int64_t e = 0; e < E; e++) offsets[e + 1] = offsets[e] + (e == a || e == b);
            const wview w = {c->t, c->buf + (size_t)l * c->per_layer + c->at[m], NULL, ram_layout(c->t)};
            wexperts_forward(c->b.y, c->b.x, w, offsets, (int)E, sh->C, sh->O, K, c->b.scratch, pool);
            bytes += (double)(offsets[E] * wview_bytes(w, sh->O, sh->C));
        }
    return bytes;
}

static const uint8_t *step_plain(void *ctx, int it, double bytes)
{
    const step_case *c = ctx;
    uint64_t rng = item_rng(it);
    const size_t pages = (c->bytes - (size_t)bytes) / 4096;
    return c->buf + (size_t)(bench_rnd(&rng) % (uint32_t)pages) * 4096;
}

static void run_step(const wkernels *kern, wtype t, const char *tname, int threads, int layers, int items,
                     uint64_t *rng)
{
    step_case c = {t, layers, {0}, 0, 0, NULL, io_new(threads, rng)};
    for (int m = 0; m < 5; m++) {
        const shape *sh = &shapes[layer_order[m]];
        c.at[m] = c.per_layer;
        c.per_layer += (stack_bytes(t, sh) + 63) / 64 * 64;
    }
    c.bytes = c.per_layer * (size_t)layers;
    c.buf = timing_weights(t, c.bytes, rng);
    jm_pool *pool = pool_or_die(threads);
    char label[64];
    snprintf(label, sizeof label, "%-5s %-10s %7d layers", tname, "step", layers);
    triplets(&(timed){step_item, step_plain, &c}, kern, pool, items, label);
    jm_pool_free(pool);
    free(c.buf);
    io_free(&c.b);
}

int main(int argc, char **argv)
{
    static const wtype types[] = {WT_BF16, WT_Q8, WT_Q4};
    static const char *tnames[] = {"bf16", "q8", "q4"};
    long threads = 2, items = 40, layers = 8;
    double mb = 1400;
    const char *types_arg = "bf16,q8,q4";
    int bad = argc % 2 == 0; /* a flag without its value */
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *v = argv[i + 1];
        char *end;
        if (!strcmp(argv[i], "--threads")) threads = strtol(v, &end, 10);
        else if (!strcmp(argv[i], "--items")) items = strtol(v, &end, 10);
        else if (!strcmp(argv[i], "--mb")) mb = strtod(v, &end);
        else if (!strcmp(argv[i], "--layers")) layers = strtol(v, &end, 10);
        else if (!strcmp(argv[i], "--types")) types_arg = v, end = (char *)v + strlen(v);
        else end = (char *)v;
        bad |= end == v || *end; /* an unknown flag, or a value that is not a whole number */
    }
    int known = 0; /* every name in --types one we run */
    for (int ti = 0; ti < 3; ti++) known += bench_in_list(types_arg, tnames[ti]);
    for (const char *p = types_arg; *p; p++) known -= *p == ',';
    const wkernels *K = wkernels_get("auto");
    bad |= known != 1 || threads < 1 || threads > 64 || items < 1 || items > MAX_TRIPLETS || layers < 0 || layers > 64;
    if (bad || !(mb >= 1 && mb <= 1e6)) { /* written so that NaN fails too */
        fprintf(stderr, "usage: bench/products [--threads 1-64 (2)] [--types bf16,q8,q4] [--items 1-%d (40)] "
                        "[--mb 1-1000000 (1400)] [--layers 0-64 (8)]\n", MAX_TRIPLETS);
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
           "MB of copies (at least 5),\nthen %ld layers of them in sequence from a model's arena (step: items are "
           "tokens, 2 random experts a matrix);\nGB/s of the kernels (kern), of the read tiles (read) and of a plain "
           "read of as many bytes (plain), all on the decode pool, totals over the items;\nk/pl and r/pl: medians "
           "over the triplets of kern and read against the plain read timed beside them\n\n",
           items, mb, layers);
    printf("%-5s %-10s %14s %2s | %6s %6s %6s | %6s %6s | %5s\n", "type", "product", "rows x inputs", "T", "kern",
           "read", "plain", "k/pl", "r/pl", "items");
    uint64_t rng = BENCH_SEED;
    for (int ti = 0; ti < 3; ti++) {
        if (!bench_in_list(types_arg, tnames[ti])) continue;
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
            for (int th = 1; th <= threads; th++) run(K, types[ti], tnames[ti], &shapes[si], th, (int)items, mb, &rng);
        for (int th = 1; layers && th <= threads; th++)
            run_step(K, types[ti], tnames[ti], th, (int)layers, (int)items, &rng);
    }
    return 0;
}
