/* bench/kernels — how fast one thread streams stored weights through each
 * kernel set's tiles (src/model/ops/wkernels.c), beside the read bandwidth
 * measured in the same run.
 *
 *   build/bench/kernels [--C 2048] [--big-mb 1024] [--l2-kb 512] [--reps 10] [--sets avx512,avx2,portable]
 *                       [--types f32,bf16,q8,q4]
 *
 * (avx512, avx2: this CPU's tuning of the set; avx512:stream, avx2:prefetch
 * and so on name one, to compare them.)
 *
 * Decoding reads every active weight once, so a kernel keeps up when it
 * streams a matrix far larger than the caches at the rate plain reads reach.
 * Far larger than the TLBs reach too: in a virtual machine, one thread
 * streamed Q4 tiles at 41 GB/s from the first 260 MB of an arena read over
 * and over, and at 22 from 1 GB or more, before the kernels prefetched a
 * page ahead (PAGE_AHEAD, wkernels.c); hence 1 GB by default, not 256 MB.
 * The matrices ask for 2 MB pages (huge_alloc), as a decode's weights in
 * RAM and its KV cache do: the pages a decode reads, not whatever malloc
 * gives (4 KB pages, under the machine's THP "madvise" setting).
 * A matrix resident in L2 shows the kernel's own speed: the headroom left for
 * when several threads share the memory bus (L2 ilv: in the layout of a
 * copy in RAM, which the decode reads). Tiles of 64 weight rows (WTILE,
 * as qmatmul.c hands them out) against n = 1 input row (one sequence
 * decoding) and n = 4 (batched decoding). GB/s count weight and scale bytes.
 * Last, the streaming ceilings: how near plain reads one thread gets with
 * the least work a product can do (print_ceilings). Prints figures; it is
 * not a test. */
#include "common.h"
#include "model/ops/ops.h"

#include <stdint.h>

/* The core clock in GHz, from a chain of dependent register-register adds
 * (one cycle each on every x86 core of this century); 0 where it cannot be
 * measured. Not adds of an immediate: a core that folds those in its
 * renamer runs several a cycle (a chain of them read 22 GHz on an Intel Xeon
 * with AMX, 4.0-4.2 as register adds). On a shared machine it also shows how
 * much of a core this thread gets. */
static double clock_ghz(void)
{
#if defined(__x86_64__)
    double best = 1e30;
    const uint64_t iters = 20000000;
    for (int r = 0; r < 5; r++) {
        uint64_t a = 0, n = iters, one = 1;
        double t0 = now();
        __asm__ volatile("1: add %2, %0\n\tadd %2, %0\n\tadd %2, %0\n\tadd %2, %0\n\t"
                         "add %2, %0\n\tadd %2, %0\n\tadd %2, %0\n\tadd %2, %0\n\t"
                         "dec %1\n\tjnz 1b"
                         : "+r"(a), "+r"(n)
                         : "r"(one));
        double t = now() - t0;
        if (t < best) best = t;
    }
    return 8.0 * (double)iters / best / 1e9;
#else
    return 0;
#endif
}

/* A rows x C matrix of type t: weights of plausible size (normal floats, so
 * no denormal slows any path), scales near 0.01. */
typedef struct {
    wview w;
    void *data;
    uint8_t *scales;
    int64_t rows;
    double bytes; /* weights and scales */
} matrix;

static matrix make_matrix(wtype t, int64_t C, double target_bytes, uint64_t *rng)
{
    matrix m = {0};
    const int64_t nb = C / QBLOCK, row = wtype_row_bytes(t, C), srow = t == WT_Q8 || t == WT_Q4 ? 2 * nb : 0;
    m.rows = (int64_t)(target_bytes / (double)(row + srow));
    m.rows = m.rows < 64 ? 64 : m.rows / 64 * 64; /* whole tiles, and so whole groups of interleaved rows */
    m.bytes = (double)m.rows * (double)(row + srow);
    m.data = huge_alloc((size_t)(m.rows * row));
    m.scales = srow ? huge_alloc((size_t)(m.rows * srow)) : NULL;
    uint8_t *d = m.data;
    for (int64_t i = 0; i < m.rows * row; i += 4) {
        float f = 0.05f * bench_frnd(rng);
        uint32_t u;
        memcpy(&u, &f, 4);
        if (t == WT_F32) memcpy(d + i, &u, 4);
        else if (t == WT_BF16) {
            uint32_t two = u >> 16 | (u & 0xffff0000u); /* two bf16 near f */
            memcpy(d + i, &two, 4);
        } else {
            uint32_t r = bench_rnd(rng);
            memcpy(d + i, &r, 4);
        }
    }
    for (int64_t i = 0; i < m.rows * srow; i += 2) { /* F16 in [0.008, 0.016) */
        uint16_t h = (uint16_t)(0x2000 + bench_rnd(rng) % 0x400);
        m.scales[i] = (uint8_t)h, m.scales[i + 1] = (uint8_t)(h >> 8);
    }
    m.w = (wview){t, m.data, m.scales, 0};
    return m;
}

/* m's copy as jm_weights_to_ram lays it out (ops.h, WILV_INLINE). */
static matrix inlined(const matrix *m, int64_t C)
{
    matrix v = *m;
    v.w = (wview){m->w.type, NULL, NULL, WILV_INLINE};
    const size_t bytes = (size_t)wview_bytes(v.w, m->rows, C);
    v.data = huge_alloc(bytes);
    v.scales = NULL;
    inline_rows(v.data, m->w, m->rows, C);
    v.w.data = v.data;
    return v;
}

/* One pass over the matrix: tiles of 64 rows against n inputs. */
static void pass(const wtile_fn f, const matrix *m, float *out, const float *x, const void *xq, const float *xs,
                 int64_t n, int64_t C)
{
    for (int64_t o = 0; o < m->rows; o += 64) {
        int64_t nr = m->rows - o < 64 ? m->rows - o : 64;
        f(out + o, m->rows, wview_rows(m->w, o, C), nr, x, xq, xs, n, C);
    }
}

/* Best seconds of one pass: each timing runs passes for at least 5 ms (a
 * pass over an L2-sized matrix takes microseconds), best of reps: on a shared
 * machine, short timings and many of them find the quiet moments. */
static double time_passes(const wtile_fn f, const matrix *m, float *out, const float *x, const void *xq,
                          const float *xs, int64_t n, int64_t C, int reps)
{
    pass(f, m, out, x, xq, xs, n, C); /* warm: pages, caches, clocks */
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        int k = 0;
        double t0 = now(), t;
        do {
            pass(f, m, out, x, xq, xs, n, C);
            k++;
        } while ((t = now() - t0) < 0.005);
        if (t / k < best) best = t / k;
    }
    return best;
}

/* ---- streaming ceilings ----
 * What one thread reaches streaming a large matrix with the least work a
 * product can do, so the kernels' %read can be read against it: vector
 * loads summed (the read bandwidth, with wide loads), the same loads
 * multiplied into the sums by a vector held in a register, and by an
 * activation vector loaded beside each (a dot product: what a tile with one
 * input does, before any widening or integer work). Rows of 1024 floats, a
 * sum per row, as the kernels'. GCC vector types: the widest vectors the
 * build targets. */
typedef float vf16 __attribute__((vector_size(64), aligned(64)));

typedef enum { CEIL_SUM, CEIL_FMA_REG, CEIL_DOT } ceiling_kind;

static float ceiling_row(const vf16 *w, const vf16 *x, int64_t nv, ceiling_kind kind)
{
    vf16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, xr = x[0];
    for (int64_t i = 0; i < nv; i += 4) {
        switch (kind) {
        case CEIL_SUM: a0 += w[i], a1 += w[i + 1], a2 += w[i + 2], a3 += w[i + 3]; break;
        case CEIL_FMA_REG: a0 += w[i] * xr, a1 += w[i + 1] * xr, a2 += w[i + 2] * xr, a3 += w[i + 3] * xr; break;
        case CEIL_DOT: a0 += w[i] * x[i], a1 += w[i + 1] * x[i + 1], a2 += w[i + 2] * x[i + 2], a3 += w[i + 3] * x[i + 3]; break;
        }
    }
    vf16 a = a0 + a1 + a2 + a3;
    float s = 0;
    for (int j = 0; j < 16; j++) s += a[j];
    return s;
}

static void print_ceilings(double big_mb, int reps, uint64_t *rng)
{
    enum { ROW = 1024 / 16 }; /* vectors a row */
    const int64_t nrows = (int64_t)(big_mb * 1e6) / (ROW * 64);
    vf16 *w = aligned_alloc(64, (size_t)(nrows * ROW) * 64), *x = aligned_alloc(64, ROW * 64);
    if (!w || !x) {
        fprintf(stderr, "bench/kernels: out of memory\n");
        exit(1);
    }
    for (int64_t i = 0; i < nrows * ROW; i++)
        for (int j = 0; j < 16; j++) w[i][j] = 0.05f * bench_frnd(rng);
    for (int i = 0; i < ROW; i++)
        for (int j = 0; j < 16; j++) x[i][j] = bench_frnd(rng);
    static volatile float sink;
    static const char *names[] = {"vector sum (read)", "FMA by a register", "dot product"};
    double gbs[3];
    for (int k = 0; k < 3; k++) {
        double best = 1e30;
        for (int r = 0; r < reps + 1; r++) { /* the first warms */
            float s = 0;
            double t0 = now();
            for (int64_t row = 0; row < nrows; row++) s += ceiling_row(w + row * ROW, x, ROW, (ceiling_kind)k);
            double t = now() - t0;
            sink += s;
            if (r && t < best) best = t;
        }
        gbs[k] = (double)nrows * ROW * 64 / best / 1e9;
    }
    printf("\nstreaming ceilings, one thread, a %.0f MB matrix of fp32 rows (4 KB): ", big_mb);
    for (int k = 0; k < 3; k++) printf("%s%s %.1f GB/s (%.0f%%)", k ? ", " : "", names[k], gbs[k], 100 * gbs[k] / gbs[0]);
    printf("\n");
    free(w), free(x);
}

int main(int argc, char **argv)
{
    int64_t C = 2048;
    uint64_t rng = BENCH_SEED;
    double big_mb = 1024, l2_kb = 512;
    int reps = 10;
    const char *sets = "avx512,avx2,portable", *types_arg = "f32,bf16,q8,q4";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--C")) C = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--big-mb")) big_mb = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--l2-kb")) l2_kb = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--sets")) sets = argv[i + 1];
        else if (!strcmp(argv[i], "--types")) types_arg = argv[i + 1];
        else {
            fprintf(stderr, "usage: bench/kernels [--C 2048] [--big-mb 1024] [--l2-kb 512] [--reps 10] "
                            "[--sets avx512,avx512:stream,avx512:prefetch,avx2,avx2:stream,avx2:prefetch,portable] "
                            "[--types f32,bf16,q8,q4]\n");
            return 2;
        }
    }
    if (argc % 2 == 0 || C < QBLOCK || C % QBLOCK || reps < 1) {
        fprintf(stderr, "bench/kernels: --C must be a multiple of %d, --reps >= 1, flags with values\n", QBLOCK);
        return 2;
    }
    omp_set_num_threads(1); /* read_bandwidth's loop, as the kernels: one thread */

    char cpu[256];
    cpu_model(cpu, sizeof cpu);
    printf("CPU: %s; one thread\n", cpu);
    printf("C = %lld, tiles of 64 rows; GB/s of weights and scales read from a %.0f MB matrix (big) and a %.0f KB "
           "one (L2),\nbeside the rate plain reads of that size reach (read, measured just before: the machine may be "
           "shared), weights per cycle at the clock then,\nand the big matrix with its rows interleaved in groups of "
           "%d, their scales inline (ilv: the layout of Q8/Q4 copies in RAM), and the L2 one so (L2 ilv, GB/s)\n\n",
           (long long)C, big_mb, l2_kb, WILV);
    printf("%-15s %-5s %2s %5s | %8s %6s %6s %6s | %8s %6s | %8s %6s %6s %6s | %8s\n", "set", "type", "n", "GHz",
           "big GB/s", "read", "%read", "w/cyc", "ilv GB/s", "%read", "L2 GB/s", "read", "%read", "w/cyc", "L2 ilv");

    const int64_t nmax = 4;
    /* x on whole lines, as the model's activations (64-byte aligned arenas):
     * from malloc's 16-byte alignment every 64-byte load of it spans two
     * lines, which cost a four-chain BF16 pass a third of its L2 speed */
    float *x = aligned_alloc(64, (size_t)(nmax * C) * sizeof *x);
    float *xs = malloc((size_t)(nmax * 2 * (C / QBLOCK)) * sizeof *xs);
    int8_t *xq = malloc((size_t)(nmax * C));
    for (int64_t i = 0; i < nmax * C; i++) x[i] = bench_frnd(&rng);
    for (int64_t r = 0; r < nmax; r++) quantize_act_q8(xq + r * C, xs + r * 2 * (C / QBLOCK), x + r * C, C);
    uint16_t *xb = aligned_alloc(64, (size_t)(nmax * C * 2 + 63) / 64 * 64); /* BF16's inputs */
    round_act_bf16(xb, x, nmax * C);

    static const wtype types[] = {WT_F32, WT_BF16, WT_Q8, WT_Q4};
    static const char *tnames[] = {"f32", "bf16", "q8", "q4"};
    for (int ti = 0; ti < 4; ti++) {
        if (!bench_in_list(types_arg, tnames[ti])) continue;
        matrix big = make_matrix(types[ti], C, big_mb * 1e6, &rng), l2 = make_matrix(types[ti], C, l2_kb * 1e3, &rng);
        float *out = malloc((size_t)(nmax * big.rows) * sizeof *out);
        /* the same matrix as jm_weights_to_ram lays it out (ops.h,
         * WILV_INLINE), timed in turn with row-major, so that both see the
         * same moments of a shared machine */
        const int ilv = wrows_interleave(types[ti], big.rows, C); /* F32 and BF16 never are */
        matrix big_ilv = ilv ? inlined(&big, C) : big, l2_ilv = ilv ? inlined(&l2, C) : l2;
        char list[256];
        snprintf(list, sizeof list, "%s", sets);
        for (char *save = NULL, *name = strtok_r(list, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
            const wkernels *K = wkernels_get(name);
            if (!K) {
                printf("%-15s %-5s (this CPU or build cannot run it)\n", name, tnames[ti]);
                continue;
            }
            const wtile_fn f = wkernel_for(K, types[ti]);
            const void *xp = types[ti] == WT_BF16 ? (const void *)xb : xq;
            for (int64_t n = 1; n <= nmax; n += 3) {
                const double ghz = clock_ghz();
                const double bw_big = read_bandwidth((size_t)(big_mb * 1e6), reps + 2);
                double tb = 1e30, tv = 1e30;
                for (int r = 0; r < reps; r++) {
                    const double a = time_passes(f, &big, out, x, xp, xs, n, C, 1);
                    const double b = ilv ? time_passes(f, &big_ilv, out, x, xp, xs, n, C, 1) : 1e30;
                    tb = a < tb ? a : tb, tv = b < tv ? b : tv;
                }
                const double bw_l2 = read_bandwidth((size_t)(l2_kb * 1e3), 200 * reps);
                const double tl = time_passes(f, &l2, out, x, xp, xs, n, C, reps);
                const double tli = ilv ? time_passes(f, &l2_ilv, out, x, xp, xs, n, C, reps) : 1e30;
                const double gb = big.bytes / tb / 1e9, gi = big.bytes / tv / 1e9, gl = l2.bytes / tl / 1e9;
                const double cb = ghz > 0 ? (double)big.rows * C / tb / (ghz * 1e9) : 0;
                const double cl = ghz > 0 ? (double)l2.rows * C / tl / (ghz * 1e9) : 0;
                char ilv_cols[32] = "       -      -", l2_ilv_cols[32] = "       -";
                if (ilv) {
                    snprintf(ilv_cols, sizeof ilv_cols, "%8.1f %5.0f%%", gi, 100 * gi / bw_big);
                    snprintf(l2_ilv_cols, sizeof l2_ilv_cols, "%8.1f", l2.bytes / tli / 1e9);
                }
                printf("%-15s %-5s %2lld %5.2f | %8.1f %6.1f %5.0f%% %6.1f | %s | %8.1f %6.1f %5.0f%% %6.1f | %s\n",
                       K->name, tnames[ti], (long long)n, ghz, gb, bw_big, 100 * gb / bw_big, cb, ilv_cols, gl, bw_l2,
                       100 * gl / bw_l2, cl, l2_ilv_cols);
                fflush(stdout);
            }
        }
        free(out);
        free(big.data), free(big.scales), free(l2.data), free(l2.scales);
        if (ilv) free(big_ilv.data), free(l2_ilv.data);
    }
    free(x), free(xs), free(xq), free(xb);
    print_ceilings(big_mb, reps, &rng);
    return 0;
}
