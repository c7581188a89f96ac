/* wkernels.c — the dot-product kernels of decoding: tiles of weight rows, as
 * the checkpoint stores them (F32, BF16, and the blockwise Q8/Q4 of
 * `jetmoe quantize`), against a few input rows.
 *
 * Decoding one token reads every active weight once and does two flops per
 * weight: it is bound by memory bandwidth, so a kernel's job is to keep up
 * with it while reading as few bytes as possible. No library does products
 * on these block formats (and OpenBLAS may not be called from the decode
 * pool's threads: its OpenMP build would start a team of its own), so they
 * are written by hand: a portable C set, the reference any CPU runs, and
 * sets for the instruction sets of x86 CPUs, chosen at run time
 * (wkernels_get). Q8/Q4 multiply int8 activations (quantized per block of
 * 32, fp32 scale) with integer multiply-adds, summing each block exactly in
 * int32. bench/kernels measures them against the memory's read bandwidth. */
#include "ops.h"
#include "base/base.h"

#include "simd.h"

#include <stdio.h>
#include <string.h>
#ifdef JM_X86
#include <cpuid.h>
#endif

/* ---- portable kernels: the reference for the SIMD ones ----
 * Each adds the products of n inputs from x to acc, in order, so that a row
 * read in pieces (the lines of interleaved rows) sums as one read whole. */

static float dot_f32_c(float acc, const uint8_t *w, const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        float f;
        memcpy(&f, w + 4 * i, 4);
        acc += f * x[i];
    }
    return acc;
}

/* BF16: bf16 inputs (round_act_bf16), each product exact in fp32. */
static float dot_bf16_c(float acc, const uint8_t *w, const uint16_t *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) acc += jm_bf16_to_f32((uint16_t)(w[2 * i] | w[2 * i + 1] << 8)) * jm_bf16_to_f32(x[i]);
    return acc;
}

/* Q8/Q4: n inputs, whole blocks; ws and xs at the first block's scales. */
static float dot_q8_c(float acc, const int8_t *w, const uint8_t *ws, const int8_t *xq, const float *xs, int64_t n)
{
    for (int64_t b = 0; b < n / QBLOCK; b++) {
        int32_t s = 0;
        for (int i = 0; i < QBLOCK; i++) s += (int32_t)w[b * QBLOCK + i] * xq[b * QBLOCK + i];
        acc += wscale_at(ws, b) * xs[b] * (float)s;
    }
    return acc;
}

static float dot_q4_c(float acc, const uint8_t *w, const uint8_t *ws, const int8_t *xq, const float *xs, int64_t n)
{
    for (int64_t b = 0; b < n / QBLOCK; b++) {
        const uint8_t *qb = w + b * (QBLOCK / 2);
        const int8_t *x = xq + b * QBLOCK;
        int32_t s = 0;
        for (int j = 0; j < QBLOCK / 2; j++) s += ((qb[j] & 15) - 8) * x[j] + ((qb[j] >> 4) - 8) * x[j + 16];
        acc += wscale_at(ws, b) * xs[b] * (float)s;
    }
    return acc;
}

/* Each weight row against the n inputs in turn, in one piece, or a line at
 * a time when the rows are interleaved. */
static void tile_c(float *out, int64_t ldo, wview w, int64_t nrows, const float *x, const void *xp,
                   const float *xs, int64_t n, int64_t C)
{
    const int8_t *xq = xp;
    const uint16_t *xb = xp;
    const int64_t row = wtype_row_bytes(w.type, C), nb = C / QBLOCK;
    const int64_t piece = w.ilv ? 64 : row, inputs = piece * C / row; /* bytes and inputs a piece */
    for (int64_t i = 0; i < nrows; i++) {
        for (int64_t r = 0; r < n; r++) {
            float acc = 0.0f;
            for (int64_t at = 0, e = 0; at < row; at += piece, e += inputs) {
                const uint8_t *wp = wrow_byte(w, i, at, row);
                switch (w.type) {
                case WT_F32: acc = dot_f32_c(acc, wp, x + r * C + e, inputs); break;
                case WT_BF16: acc = dot_bf16_c(acc, wp, xb + r * C + e, inputs); break;
                case WT_Q8:
                    acc = dot_q8_c(acc, (const int8_t *)wp, wscale_ptr(w, i, e / QBLOCK, nb), xq + r * C + e,
                                   xs + r * 2 * nb + e / QBLOCK, inputs);
                    break;
                case WT_Q4:
                    acc = dot_q4_c(acc, wp, wscale_ptr(w, i, e / QBLOCK, nb), xq + r * C + e,
                                   xs + r * 2 * nb + e / QBLOCK, inputs);
                    break;
                }
            }
            out[r * ldo + i] = acc;
        }
    }
}

static const wkernels kernels_portable = {"portable", tile_c, tile_c, tile_c, tile_c, att_scores_c, att_values_c};

/* Rows read together are as many short streams (a row of 2048 Q8 weights is
 * 32 cache lines), which the hardware prefetchers follow badly: with 4 rows a
 * pass and no software prefetch one thread streamed Q8 from memory at 16 GB/s
 * against 26 with one row (Zen 5). So each row's stream is prefetched
 * PREFETCH_BYTES on, into L1: measured, 1 to 4 KB did alike, none or 8 KB
 * worse; into L2 (T1) no better; 8 rows on, as much for Q8 but worse for F32
 * (64 KB on: more than L1 holds). That is Zen 5, and the avx512 set's
 * "prefetch" tuning; Zen 4 follows one stream best alone (its "stream"). */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif
/* Interleaved, a group of WILV rows is one stream: each row's prefetch runs
 * WILV times as far on in it, ILV_AHEAD_BYTES a row (the avx512 set's
 * "prefetch" tuning): 6 KB on in the stream. bench/products at 2 threads,
 * six rounds alternated, kernels over a plain read, 8 KB on -> 6 KB on: the
 * 8-layer step Q8 87-91% -> 91-93%, Q4 86-90% -> 87-92%; the MLP experts'
 * output (rows of 5632) Q8 87-90% -> 87-92%, Q4 82-91% -> 84-94%; one
 * thread alike (AMD EPYC family 26 model 2). 4 KB on did about as well as
 * 6 (three rounds). The avx2 set keeps PREFETCH_BYTES (unmeasured). */
#ifndef ILV_AHEAD_BYTES
#define ILV_AHEAD_BYTES 1536
#endif
#define INL_AHEAD (ILV_AHEAD_BYTES * WILV)
/* Q8/Q4 scales apart from the rows (row-major or ilv 1: a mapped file; not
 * WILV_INLINE) are a stream of their own (R * 2 * C / QBLOCK bytes a pass,
 * beside the pass's rows), which the rows' prefetches do not cover: each
 * pass prefetches the scale lines of the pass SCALE_PASSES_AHEAD on. One
 * thread, rows interleaved as in the files, a 1 GB matrix (bench/kernels,
 * AMD EPYC family 26 model 2, avx512 set): Q8 C = 5632 (the MLP experts'
 * output) 79-80% -> 89-93% of a plain read, C = 2048 91-92% -> 93-100%;
 * Q4 C = 5632 79% -> 97-100%, C = 2048 87-91% -> 98-105%. One pass on did
 * less for C = 5632 (88-93%), four and eight passes no better than two. */
#define SCALE_PASSES_AHEAD 2

#ifdef JM_X86
/* ---- the x86 sets' tiles ----
 * Real tiles rather than dots: a pass takes several weight rows at once
 * against up to a few inputs, so each activation load and its preparation
 * (shuffles, block sums) serves every row, and each weight load serves every
 * input while it is in a register. The passes are written with the rows R
 * and inputs NI as constants, so their loops unroll and the accumulators
 * acc[r][j] live in registers; a set instantiates them for R = its row
 * count and R = 1 (a tile's last rows), NI = 1 .. its input count. */

/* How far on a pass prefetches its rows: d bytes on in the same row, and
 * past a row's end `wrap` bytes on (d + (R - 1) rows: as far into the row R
 * on, which the next pass reads). A tile's last pass prefetches past the
 * tile too: the rows after it are mostly the next chunk of the same thread
 * (the pool hands out runs of consecutive chunks), whose stream then starts
 * warm. One thread decoding the 8B layout in BF16 went from 5.89 to 6.28
 * tokens/s (64% to 70% of the roofline, AMD EPYC family 26 model 2); where
 * the rows are another thread's or past the matrix, a few lines are fetched
 * for nothing (a prefetch never faults). */
typedef struct {
    int64_t d, wrap;
} ahead;

/* Where a pass's rows are: byte `off` of row r at w + r * rs + (off / 64) *
 * ls + off % 64. Row-major: rs the row's bytes, ls 64; interleaved (WILV
 * rows a group, see ops.h): rs 64, ls 64 * WILV. */
typedef struct {
    int64_t rs, ls;
} stride;

/* Byte `off` of a pass's row 0 (add r * rs for row r). */
static inline const uint8_t *wline(const uint8_t *w, int64_t off, stride st)
{
    return w + (off >> 6) * st.ls + (off & 63);
}

/* WILV_INLINE rows (ops.h), for a pass whose row 0 is row r0 of its group
 * and starts at w: the step holding block b (where its lines are as wline
 * finds them from byte b / QSTEP * QSTEP * its block bytes on), and in it
 * the scale of block b of the pass's row r (the step's own start is r0
 * lines before). */
static inline const uint8_t *inline_step(wtype t, const uint8_t *w, int64_t b)
{
    return w + b / QSTEP * wstep_bytes(t);
}
static inline const uint8_t *inline_scale(wtype t, const uint8_t *step, int r0, int r, int64_t b, int64_t nb)
{
    return wstep_scale(t, step - r0 * 64, r0 + r, b, nb);
}

/* What a pass reads: R weight rows from w (Q8/Q4 scales from ws) and NI
 * inputs from x (F32), xb (BF16) or xq/xs (Q8/Q4), with the strides of C inputs;
 * and xg, what the set's prep made of xq for the tile (NULL: none), xgs
 * bytes an input. */
typedef struct {
    const uint8_t *w, *ws;
    const float *x;
    const uint16_t *xb;
    const int8_t *xq;
    const float *xs;
    const uint8_t *xg;
    int64_t xgs;
    int64_t C;
    ahead pf;
    stride st;
    int r0; /* the pass's first row's place in its group (WILV_INLINE: ws is NULL) */
} pass_args;

/* A set's passes for one weight type: runs the one for (R, NI). One
 * function per type, not one for all: gcc allocates registers loop by loop
 * only in functions of at most 100 loops, and spilled the accumulators of a
 * function holding every type's passes (Q8 in L2: 52 GB/s against 89). */
typedef void (*pass_fn)(float *out, int64_t ldo, const pass_args *a, int R, int NI);

/* How a set's passes keep the weights' stream in flight, which is the CPU
 * generation's business (see the avx512 set's two): how far on each row's
 * lines are prefetched into L1 by software (0: not at all, the hardware
 * prefetchers alone), and which rows of one input go 4 a pass. What must be
 * a constant in a pass's loops (4 rows read one after another, prefetches
 * into L2) is in the set's pass functions instead (SEQ, L2). */
typedef struct {
    int64_t fp_ahead;  /* F32/BF16 passes (their speed decides the distance) */
    int64_t ilv_ahead; /* Q8/Q4 passes over interleaved rows, per row (x WILV: a group is one stream):
                        * 0 or ILV_AHEAD_BYTES, which int8_avx512's fast path takes as constants */
    int64_t short_row; /* F32/BF16 rows of at most this many bytes go 4 a pass at one input (the
                        * avx512 set; the avx2 one takes them a row a pass always) */
} stream_tuning;

typedef struct {
    /* a tile of type t against n inputs of C (its rows interleaved or not):
     * R (or 1: its last rows) and at most how many inputs a pass takes */
    void (*shape)(const stream_tuning *tu, wtype t, int ilv, int64_t n, int64_t C, int *rows, int *inputs);
    pass_fn f32, bf16, q8, q4;
    stream_tuning tuning;
    /* the n Q4 inputs of a tile as its passes read them, into xg (cap
     * bytes) -> bytes an input, 0 when they do not fit: then the q4_raw
     * passes run, which work from xq (NULL: q4 always does) */
    int64_t (*prep)(uint8_t *xg, size_t cap, const int8_t *xq, int64_t n, int64_t C);
    pass_fn q4_raw;
    /* the same for BF16 inputs (NULL: the bf16 passes take them as they are) */
    int64_t (*prep_bf16)(uint8_t *xg, size_t cap, const uint16_t *xb, int64_t n, int64_t C);
    pass_fn bf16_raw;
} pass_set;

/* Room for a tile's prepared inputs, on the stack: JetMoE-8B's widest rows
 * (5632 inputs) four at a time as Q4. */
#define XPREP_BYTES 36864

static void tile_by_passes(const pass_set *ps, float *out, int64_t ldo, wview w, int64_t nrows, const float *x,
                           const void *xp, const float *xs, int64_t n, int64_t C)
{
    const int8_t *xq = w.type == WT_BF16 ? NULL : xp;
    const uint16_t *xb = w.type == WT_BF16 ? xp : NULL;
    const int64_t row = wtype_row_bytes(w.type, C), srow = 2 * (C / QBLOCK);
    int rows, inputs;
    ps->shape(&ps->tuning, w.type, w.ilv, n, C, &rows, &inputs);
    uint8_t xg[XPREP_BYTES] __attribute__((aligned(64)));
    const int64_t xgs = ps->prep && w.type == WT_Q4           ? ps->prep(xg, sizeof xg, xq, n, C)
                        : ps->prep_bf16 && w.type == WT_BF16 ? ps->prep_bf16(xg, sizeof xg, xb, n, C)
                                                             : 0;
    pass_fn pass = w.type == WT_F32 ? ps->f32 : w.type == WT_BF16 ? ps->bf16 : w.type == WT_Q8 ? ps->q8 : ps->q4;
    if (w.type == WT_Q4 && ps->prep && !xgs) pass = ps->q4_raw; /* the inputs did not fit xg */
    if (w.type == WT_BF16 && ps->prep_bf16 && !xgs) pass = ps->bf16_raw;
    const stride st = w.ilv ? (stride){64, 64 * WILV} : (stride){row, 64};
    for (int64_t i = 0; i < nrows;) {
        const int R = nrows - i >= rows ? rows : 1;
        /* interleaved, the group is one stream: each row's prefetch runs WILV
         * times as far on in it, past the group into the next. Row-major Q8/Q4
         * rows are R streams a pass (files from before interleaving, matrices
         * not of whole groups or lines): always prefetched. No distance, no
         * prefetch (not even past a row's end). */
        const int fp = w.type == WT_F32 || w.type == WT_BF16;
        const int64_t d = fp ? ps->tuning.fp_ahead : w.ilv ? ps->tuning.ilv_ahead : PREFETCH_BYTES;
        const ahead pf = w.ilv ? (ahead){d * WILV, d * WILV} : d ? (ahead){d, d + (R - 1) * row} : (ahead){0, 0};
        const uint8_t *wi = wrow_byte(w, i, 0, row);
        prefetch_pages(wi, w.ilv == WILV_INLINE ? wgroup_inline_bytes(w.type, row) : R * row, PAGE_AHEAD);
        if (w.scales) {
            prefetch_pages(w.scales + i * srow, R * srow, PAGE_AHEAD * srow / row); /* as many passes on */
            prefetch_each(w.scales + i * srow, R * srow, SCALE_PASSES_AHEAD * R * srow, 64);
        }
        for (int64_t r = 0; r < n; r += inputs) {
            pass_args a = {wi, w.scales ? w.scales + i * srow : NULL, x ? x + r * C : NULL, xb ? xb + r * C : NULL,
                           xq ? xq + r * C : NULL, xs ? xs + r * srow : NULL,
                           xgs ? xg + r * xgs : NULL, xgs, C, pf, st, (int)(i % WILV)};
            pass(out + r * ldo + i, ldo, &a, R, n - r < inputs ? (int)(n - r) : inputs);
        }
        i += R;
    }
}

/* A prefetch pf bytes on (none when pf is 0): a pass issues one per 64
 * bytes a row's stream consumes (a prefetch never faults, and going through
 * an integer keeps the arithmetic defined past the end of the weights). */
static INLINE void prefetch_ahead(const void *p, int64_t pf)
{
    if (pf) _mm_prefetch((const char *)((uintptr_t)p + (uintptr_t)pf), _MM_HINT_T0);
}
/* The same into L2 when L2 (a constant) is set (T1: not L1). */
static INLINE void prefetch_into(const void *p, int64_t pf, const int L2)
{
    if (pf && L2) _mm_prefetch((const char *)((uintptr_t)p + (uintptr_t)pf), _MM_HINT_T1);
    else prefetch_ahead(p, pf);
}

/* A WILV_INLINE step's scale lines, prefetched as far on as its rows'
 * lines. */
static INLINE void prefetch_step_scales(wtype t, const uint8_t *step, int r0, int64_t b, int64_t nb, int64_t pf)
{
    const uint8_t *sc = inline_scale(t, step, r0, -r0, b, nb);
    prefetch_ahead(sc, pf);
    prefetch_ahead(sc + 64, pf);
}

/* The prefetch offset for byte `at` of a row of `row` bytes (0: none). */
static INLINE int64_t stream_ahead(int64_t at, ahead pf, int64_t row)
{
    return at + pf.d < row ? pf.d : pf.wrap;
}

/* ---- AVX2 + FMA + F16C: Q8/Q4 4 rows x up to 2 inputs a pass (16 registers), F32/BF16 a row and an
 * input a pass ---- */
#define AVX2_ROWS 4
#define AVX2_INPUTS 2
_Static_assert(AVX2_ROWS == WILV, "a pass over interleaved rows takes one group");

AVX2 static INLINE float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* F32 and BF16, a row against one input a pass, in steps of 64 weights
 * (four lines of F32, two of BF16): eight vectors of 8, each into an
 * accumulator of its own (eight FMA chains: one could not keep up with the
 * memory, at 4 cycles an FMA), a row's sum the same operations whatever
 * the inputs beside it. BF16 weights are widened by halves: a 32-byte load
 * of 16 is 8 even ones (shifted up into fp32) and 8 odd ones (masked), two
 * instructions for 16 weights where widening them in order took four; the
 * inputs come in that order too, made once a tile (bf16_prep_avx2) or, where
 * they do not fit, split the same way in the pass (RAW). The old passes (4
 * rows, one FMA chain each, the interleaved layout's line arithmetic and a
 * prefetch test every 8 weights) streamed BF16 rows of 2048 from a 1 GB
 * matrix at 53% of a plain read and 17 GB/s from L2 (AMD EPYC family 25
 * model 17, without AVX-512). C % 64 weights at the end: a step of their own,
 * zero-padded. */
#define AVX2_CHAINS 8
#define AVX2_STEP (8 * AVX2_CHAINS) /* a vector of 8 a chain; fp_pass_avx2's final sum is for 8 chains */
_Static_assert(AVX2_CHAINS == 8, "fp_pass_avx2 sums eight chains");

/* 16 bf16 (32 bytes) as fp32: even ones, odd ones. */
AVX2 static INLINE void bf16_halves(__m256i v, __m256 *even, __m256 *odd)
{
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

/* The AVX2_CHAINS weight vectors of a step of row w (byte `off` on; the line
 * arithmetic of interleaved rows when ilv, a constant) */
AVX2 static INLINE void fp_weights(wtype t, __m256 wv[AVX2_CHAINS], const uint8_t *w, int64_t off, stride st,
                                   const int ilv)
{
    if (t == WT_F32) {
        UNROLL for (int v = 0; v < AVX2_CHAINS; v++) {
            const int64_t o = off + 32 * v;
            wv[v] = _mm256_loadu_ps((const float *)(ilv ? wline(w, o, st) : w + o));
        }
    } else {
        UNROLL for (int h = 0; h < AVX2_CHAINS / 2; h++) {
            const int64_t o = off + 32 * h;
            bf16_halves(_mm256_loadu_si256((const __m256i *)(ilv ? wline(w, o, st) : w + o)), &wv[2 * h],
                        &wv[2 * h + 1]);
        }
    }
}

/* The AVX2_CHAINS input vectors of a step, inputs e on from x: fp32 (F32's inputs;
 * BF16's prepared ones, in the weights' order) or, BF16 and RAW, bf16 split
 * as the weights are. */
AVX2 static INLINE void fp_inputs(wtype t, __m256 xv[AVX2_CHAINS], const void *x, int64_t e, const int RAW)
{
    if (t == WT_F32 || !RAW) {
        UNROLL for (int v = 0; v < AVX2_CHAINS; v++) xv[v] = _mm256_loadu_ps((const float *)x + e + 8 * v);
    } else {
        UNROLL for (int h = 0; h < AVX2_CHAINS / 2; h++)
            bf16_halves(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + e + 16 * h)), &xv[2 * h],
                        &xv[2 * h + 1]);
    }
}

/* A pass's input (it takes one), as fp_inputs takes it. */
AVX2 static INLINE const void *fp_input(wtype t, const pass_args *a, const int RAW)
{
    return t == WT_F32 ? (const void *)a->x : RAW ? (const void *)a->xb : (const void *)a->xg;
}

/* The n BF16 inputs of a tile in the order the passes take them (fp32,
 * C rounded up to a step, zero-padded) -> bytes an input; 0 when they do
 * not fit cap bytes (the passes then split them themselves). */
AVX2 static int64_t bf16_prep_avx2(uint8_t *xg, size_t cap, const uint16_t *xb, int64_t n, int64_t C)
{
    const int64_t each = (C + AVX2_STEP - 1) / AVX2_STEP * AVX2_STEP;
    if (n * each * (int64_t)sizeof(float) > (int64_t)cap) return 0;
    float *out = (float *)xg;
    for (int64_t j = 0; j < n; j++)
        for (int64_t e = 0; e < each; e += AVX2_STEP) {
            uint16_t pad[AVX2_STEP] = {0};
            const uint16_t *src = xb + j * C + e;
            if (C - e < AVX2_STEP) src = memcpy(pad, src, (size_t)(C - e) * 2);
            __m256 xv[AVX2_CHAINS];
            fp_inputs(WT_BF16, xv, src, 0, 1);
            UNROLL for (int v = 0; v < AVX2_CHAINS; v++) _mm256_storeu_ps(out + j * each + e + 8 * v, xv[v]);
        }
    return each * (int64_t)sizeof(float);
}

AVX2 static INLINE void fp_pass_avx2(wtype t, float *out, const pass_args *a, const int ilv, const int RAW)
{
    const int64_t es = t == WT_F32 ? 4 : 2, C = a->C, whole = C / AVX2_STEP * AVX2_STEP;
    const void *x = fp_input(t, a, RAW);
    __m256 acc[AVX2_CHAINS];
    UNROLL for (int v = 0; v < AVX2_CHAINS; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t i = 0; i < whole; i += AVX2_STEP) {
        const int64_t off = es * i;
        /* each line once; a row a pass, so past its end as far on (pf.wrap is pf.d) */
        UNROLL for (int l = 0; l < AVX2_STEP * es / 64; l++)
            prefetch_ahead(ilv ? wline(a->w, off + 64 * l, a->st) : a->w + off + 64 * l, a->pf.d);
        __m256 wv[AVX2_CHAINS], xv[AVX2_CHAINS];
        fp_weights(t, wv, a->w, off, a->st, ilv);
        fp_inputs(t, xv, x, i, RAW);
        UNROLL for (int v = 0; v < AVX2_CHAINS; v++) acc[v] = _mm256_fmadd_ps(wv[v], xv[v], acc[v]);
    }
    if (whole < C) { /* the last C % AVX2_STEP, zero-padded: a step as the others */
        uint8_t wpad[AVX2_STEP * 4] = {0};
        float xpad[AVX2_STEP] = {0};
        uint16_t bpad[AVX2_STEP] = {0};
        for (int64_t e = whole; e < C; e += 64 / es) /* line by line: interleaved rows are lines apart */
            memcpy(wpad + es * (e - whole), ilv ? wline(a->w, es * e, a->st) : a->w + es * e,
                   (size_t)(es * ((C - e) < 64 / es ? C - e : 64 / es)));
        if (t == WT_F32) memcpy(xpad, (const float *)x + whole, (size_t)(C - whole) * 4);
        else if (RAW) memcpy(bpad, (const uint16_t *)x + whole, (size_t)(C - whole) * 2);
        __m256 wv[AVX2_CHAINS], xv[AVX2_CHAINS];
        fp_weights(t, wv, wpad, 0, (stride){0, 64}, 0);
        /* F32 and RAW from their padded copies; prepared BF16 inputs are padded already */
        const void *xt = t == WT_F32 ? (const void *)xpad : RAW ? (const void *)bpad : x;
        fp_inputs(t, xv, xt, t == WT_BF16 && !RAW ? whole : 0, RAW);
        UNROLL for (int v = 0; v < AVX2_CHAINS; v++) acc[v] = _mm256_fmadd_ps(wv[v], xv[v], acc[v]);
    }
    UNROLL for (int v = 0; v < AVX2_CHAINS / 2; v++) acc[v] = _mm256_add_ps(acc[v], acc[v + AVX2_CHAINS / 2]);
    *out = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3])));
}

/* Q8 and Q4 in steps of 8 blocks, whose 8 F16 scales convert in one
 * instruction. A block's products go through maddubs (unsigned x signed
 * bytes, pairs summed into int16) and madd (pairs of those into int32), each
 * sum scaled in fp32 by its block's weight scale times activation scale,
 * spread over the block's lanes by a permute. */

/* The first k (< 8: a tail) of 8 values, zeros after. */
AVX2 static INLINE __m256 load8_f32(const float *p, int64_t k)
{
    float t[8] = {0};
    if (k >= 8) return _mm256_loadu_ps(p);
    memcpy(t, p, (size_t)k * sizeof *t);
    return _mm256_loadu_ps(t);
}
AVX2 static INLINE __m256 load8_f16(const uint8_t *p, int64_t k)
{
    float t[8] = {0};
    if (k >= 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    for (int64_t q = 0; q < k; q++) t[q] = _cvtsh_ss((unsigned short)(p[2 * q] | p[2 * q + 1] << 8));
    return _mm256_loadu_ps(t);
}

/* Q8, one block (32 bytes) per row: maddubs wants one unsigned operand, so
 * |w| times x carrying w's sign, the same product. No pair saturates int16:
 * |w| <= 128, |x| <= 127. */
AVX2 static INLINE void q8_block_avx2(__m256 acc[AVX2_ROWS][4], __m256 s[AVX2_ROWS][4], __m256i idx, const int8_t *w,
                                      int64_t row, const int8_t *xq, int64_t C, const int R, const int NI, int64_t pf)
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i xv[4];
    UNROLL for (int j = 0; j < NI; j++) xv[j] = _mm256_loadu_si256((const __m256i *)(xq + j * C));
    UNROLL for (int r = 0; r < R; r++) {
        prefetch_ahead(w + r * row, pf);
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + r * row)), aw = _mm256_sign_epi8(wv, wv);
        UNROLL for (int j = 0; j < NI; j++) {
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[j], wv)), ones);
            acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(s[r][j], idx), acc[r][j]);
        }
    }
}

/* Q4, two blocks (32 bytes, 16 per 128-bit lane) per row: the low nibbles
 * are elements 0-15 of each block, the high ones 16-31, unsigned as they
 * are; the activations are regrouped to match (two 16-byte halves per
 * register). Each int16 sum starts at -8 * sum(x) of its 4 inputs, so that
 * it is sum((nibble - 8) x), at most 4 * 8 * 127 in size: exact. k: blocks
 * left (1: the second lane holds zeros). */
AVX2 static INLINE void q4_group_avx2(__m256 acc[AVX2_ROWS][4], __m256 s[AVX2_ROWS][4], __m256i idx, const uint8_t *w,
                                      int64_t row, const int8_t *xq, int64_t C, int64_t k, const int R, const int NI,
                                      int64_t pf)
{
    const __m256i low4 = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
    __m256i xlo[4], xhi[4], c[4];
    UNROLL for (int j = 0; j < NI; j++) {
        const int8_t *xj = xq + j * C;
        if (k >= 2) {
            xlo[j] = _mm256_loadu2_m128i((const __m128i *)(xj + 32), (const __m128i *)xj);
            xhi[j] = _mm256_loadu2_m128i((const __m128i *)(xj + 48), (const __m128i *)(xj + 16));
        } else {
            xlo[j] = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)xj));
            xhi[j] = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(xj + 16)));
        }
        __m256i sum8 = _mm256_add_epi16(_mm256_maddubs_epi16(eight, xlo[j]), _mm256_maddubs_epi16(eight, xhi[j]));
        c[j] = _mm256_sub_epi16(_mm256_setzero_si256(), sum8);
    }
    UNROLL for (int r = 0; r < R; r++) {
        const uint8_t *wr = w + r * row;
        prefetch_ahead(wr, pf);
        __m256i v = k >= 2 ? _mm256_loadu_si256((const __m256i *)wr)
                           : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)wr));
        __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        UNROLL for (int j = 0; j < NI; j++) {
            __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo[j]), _mm256_maddubs_epi16(hi, xhi[j]));
            p = _mm256_madd_epi16(_mm256_add_epi16(p, c[j]), ones);
            acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(s[r][j], idx), acc[r][j]);
        }
    }
}

/* Q8 and Q4 rows in steps of 8 blocks; WILV_INLINE rows (ws NULL) in
 * halves of their steps. */
_Static_assert(QSTEP % 8 == 0, "a step of 8 blocks lies in one WILV_INLINE step");
AVX2 static INLINE void int8_pass_avx2(wtype t, float *out, int64_t ldo, const uint8_t *w, const uint8_t *ws,
                                       const int8_t *xq, const float *xs, const int R, const int NI, int64_t C,
                                       ahead pf, stride st, int r0)
{
    const int64_t nb = C / QBLOCK, row = wtype_row_bytes(t, C), bb = wblock_bytes(t);
    __m256 acc[AVX2_ROWS][4];
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int j = 0; j < NI; j++) acc[r][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b += 8) {
        const int64_t nblk = nb - b < 8 ? nb - b : 8;
        __m256 s[AVX2_ROWS][4], xd[4];
        /* bytes from `skip` on in a row start at `step` */
        const uint8_t *step = ws ? w : inline_step(t, w, b);
        const int64_t skip = ws ? 0 : b / QSTEP * QSTEP * bb;
        if (!ws && b % QSTEP == 0) prefetch_step_scales(t, step, r0, b, nb, pf.d);
        UNROLL for (int j = 0; j < NI; j++) xd[j] = load8_f32(xs + j * 2 * nb + b, nblk);
        UNROLL for (int r = 0; r < R; r++) {
            __m256 wd = load8_f16(ws ? ws + r * 2 * nb + 2 * b : inline_scale(t, step, r0, r, b, nb), nblk);
            UNROLL for (int j = 0; j < NI; j++) s[r][j] = _mm256_mul_ps(wd, xd[j]);
        }
        const int8_t *x0 = xq + b * QBLOCK;
        if (t == WT_Q8) {
            for (int64_t q = 0; q < nblk; q++) /* one prefetch per 64 bytes: every other block */
                q8_block_avx2(acc, s, _mm256_set1_epi32((int)q),
                              (const int8_t *)wline(step, (b + q) * QBLOCK - skip, st), st.rs, x0 + q * QBLOCK, C, R,
                              NI, q % 2 ? 0 : stream_ahead((b + q) * QBLOCK, pf, row));
        } else {
            const __m256i lanes = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0); /* lane -> block of the two */
            for (int64_t g = 0; g < nblk; g += 2)
                q4_group_avx2(acc, s, _mm256_add_epi32(lanes, _mm256_set1_epi32((int)g)),
                              wline(step, (b + g) * QBLOCK / 2 - skip, st), st.rs, x0 + g * QBLOCK, C, nblk - g, R,
                              NI, g % 4 ? 0 : stream_ahead((b + g) * QBLOCK / 2, pf, row));
        }
    }
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int j = 0; j < NI; j++) out[j * ldo + r] = hsum8(acc[r][j]);
}

AVX2 static INLINE void int8_avx2(wtype t, float *out, int64_t ldo, const pass_args *a, int R, int NI)
{
#define INT8_PASS(R, NI) int8_pass_avx2(t, out, ldo, a->w, a->ws, a->xq, a->xs, R, NI, a->C, a->pf, a->st, a->r0)
    switch ((R == AVX2_ROWS) * 8 + NI) {
    case 8 + 1: INT8_PASS(AVX2_ROWS, 1); break;
    case 8 + 2: INT8_PASS(AVX2_ROWS, 2); break;
    case 1: INT8_PASS(1, 1); break;
    case 2: INT8_PASS(1, 2); break;
    }
#undef INT8_PASS
}

/* F32/BF16 passes are of one row and one input (R and NI are 1); RAW:
 * BF16 inputs not prepared. */
AVX2 static INLINE void fp_avx2(wtype t, float *out, const pass_args *a, const int RAW)
{
    if (a->st.ls != 64) fp_pass_avx2(t, out, a, 1, RAW);
    else fp_pass_avx2(t, out, a, 0, RAW);
}

#define PASS_ENTRY_AVX2(name, call)                                                   \
    AVX2 static void name(float *out, int64_t ldo, const pass_args *a, int R, int NI) \
    {                                                                                 \
        (void)ldo, (void)R, (void)NI;                                                 \
        call;                                                                         \
    }
PASS_ENTRY_AVX2(f32_avx2, fp_avx2(WT_F32, out, a, 0))
PASS_ENTRY_AVX2(bf16_avx2, fp_avx2(WT_BF16, out, a, 0))
PASS_ENTRY_AVX2(bf16_raw_avx2, fp_avx2(WT_BF16, out, a, 1))
PASS_ENTRY_AVX2(q8_avx2, int8_avx2(WT_Q8, out, ldo, a, R, NI))
PASS_ENTRY_AVX2(q4_avx2, int8_avx2(WT_Q4, out, ldo, a, R, NI))
#undef PASS_ENTRY_AVX2
static void shape_avx2(const stream_tuning *tu, wtype t, int ilv, int64_t n, int64_t C, int *rows, int *inputs)
{
    (void)tu, (void)ilv, (void)n, (void)C;
    const int fp = t == WT_F32 || t == WT_BF16;
    *rows = fp ? 1 : AVX2_ROWS;
    *inputs = fp ? 1 : AVX2_INPUTS;
}
/* The set's two tunings, the same passes (the same bits) reading their
 * stream two ways, as the avx512 set's.
 *
 * "prefetch" (Zen 5, and every CPU but AMD family 0x19: Zen 1 unmeasured): F32/BF16
 * rows prefetched AVX2_FP_AHEAD on, interleaved Q8/Q4 rows AVX2_ILV_AHEAD.
 * One thread, rows of 2048 from 1 GB, % of a plain read measured just
 * before (bench/kernels), with the prefetch -> without: AMD EPYC family 26
 * model 2, F32 94-95% -> 82-92%, BF16 83-86% -> 79-80%; an Intel Xeon with
 * AMX (family 6 model 167), F32 97% -> 95%, BF16 95-97% -> 76-78%.
 *
 * "stream", for AMD family 0x19 (there a Zen 4 whose hypervisor hid
 * AVX-512, AMD EPYC family 25 model 17): F32/BF16 rows left to the hardware
 * prefetchers, prefetch -> without: F32 55-69% -> 88-91%, BF16 61-76% ->
 * 82-87%. The Q8/Q4 passes (4 rows each, compute-bound nearer than the
 * avx512 ones) streamed slower there without their prefetches, rows of
 * 2048 over the RAM layout 48-52% of a plain read against 61-65%, Q4 43-49%
 * against 55%: both tunings keep them. */
#ifndef AVX2_FP_AHEAD
#define AVX2_FP_AHEAD 2048
#endif
#ifndef AVX2_ILV_AHEAD
#define AVX2_ILV_AHEAD PREFETCH_BYTES
#endif
static const pass_set passes_avx2 = {shape_avx2, f32_avx2, bf16_avx2, q8_avx2, q4_avx2,
                                     {AVX2_FP_AHEAD, AVX2_ILV_AHEAD, 0}, NULL, NULL, bf16_prep_avx2, bf16_raw_avx2};
static const pass_set passes_avx2_stream = {shape_avx2, f32_avx2, bf16_avx2, q8_avx2, q4_avx2,
                                            {0, AVX2_ILV_AHEAD, 0}, NULL, NULL, bf16_prep_avx2, bf16_raw_avx2};

static void tile_avx2(float *out, int64_t ldo, wview w, int64_t nrows, const float *x, const void *xq,
                      const float *xs, int64_t n, int64_t C)
{
    tile_by_passes(&passes_avx2, out, ldo, w, nrows, x, xq, xs, n, C);
}
static void tile_avx2_stream(float *out, int64_t ldo, wview w, int64_t nrows, const float *x, const void *xq,
                             const float *xs, int64_t n, int64_t C)
{
    tile_by_passes(&passes_avx2_stream, out, ldo, w, nrows, x, xq, xs, n, C);
}

static const wkernels kernels_avx2 = {"avx2:prefetch", tile_avx2, tile_avx2, tile_avx2, tile_avx2,
                                      att_scores_avx2, att_values_avx2};
static const wkernels kernels_avx2_stream = {"avx2:stream",   tile_avx2_stream, tile_avx2_stream, tile_avx2_stream,
                                             tile_avx2_stream, att_scores_avx2,  att_values_avx2};

/* ---- AVX-512 (F, BW, VL) with VNNI and BF16: 4 rows x up to 4 inputs per pass ----
 * Tails (C not a multiple of the vector, or of 16 blocks) go through the
 * same loops with masked loads: the lanes masked off read nothing and hold
 * zeros, which add nothing. */
#define AVX512_ROWS 4
#define AVX512_INPUTS 4
/* F32 and BF16 decode (one input) one row a pass: consecutive rows are then
 * one stream, where 4 rows a pass are 4 streams a row apart (rows of at most
 * the tuning's short_row bytes go 4 a pass: see shape_avx512); batches take 2
 * rows x 2 inputs a pass, each weight and input load serving two products.
 * A row's vectors go round FP_CHAINS accumulators, so that four FMA chains
 * run at once. Whatever the pass's rows and inputs, a row's sum is the same
 * operations, so its products do not depend on what is decoded beside it.
 * A faster pass needs its prefetch farther on (fp_ahead, passes_avx512): a
 * pass that catches up with its prefetches waits on memory at the latency's
 * pace. One thread, BF16 (AMD EPYC family 26 model 2): with two chains and
 * the interleaved layout's line arithmetic in every step, 51-58 GB/s from
 * L2 and 87-94% of a plain read of a 1 GB matrix (bench/kernels); with four
 * chains and plain offsets 75-100 GB/s from L2 but 74-84% from memory at
 * 2 KB ahead, 96-100% at 4-8 KB ahead (8 KB: slower from L2). Batches:
 * BF16 n = 4 58-61% -> 61-68% of a plain read, F32 56-62% -> 58-63%. (All
 * with BF16 widened to fp32 against fp32 inputs, before vdpbf16ps.) */
#define FP_CHAINS 4
#define AVX512_FP_ROWS 2
#define AVX512_FP_INPUTS 2
#ifndef FP_SHORT_ROW
#define FP_SHORT_ROW 2048
#endif
_Static_assert(AVX512_ROWS == WILV, "a pass over interleaved rows takes one group");

/* The first k lanes (none when k <= 0). */
static INLINE __mmask16 mask16(int64_t k) { return k >= 16 ? 0xffff : k <= 0 ? 0 : (__mmask16)((1u << k) - 1); }
static INLINE __mmask32 mask32(int64_t k) { return k >= 32 ? 0xffffffffu : k <= 0 ? 0 : (1u << k) - 1; }
static INLINE __mmask64 mask64(int64_t k) { return k >= 64 ? ~(__mmask64)0 : k <= 0 ? 0 : ((__mmask64)1 << k) - 1; }

/* Loads of up to a vector's worth: whole vectors unmasked, the tail masked.
 * Masked loads that miss the caches stall the stream: Q8 from memory, one
 * row a pass, streamed at 6 GB/s with every load masked, 26 without (Zen 5). */
AVX512 static INLINE __m512 load_f32(const float *p, int64_t k)
{
    return k >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask16(k), p);
}
AVX512 static INLINE __m512i load_i8(const void *p, int64_t k)
{
    return k >= 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(mask64(k), p);
}
AVX512 static INLINE __m512i load_i16(const void *p, int64_t k)
{
    return k >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(mask32(k), p);
}
AVX512 static INLINE __m256i load_f16x16(const void *p, int64_t k)
{
    return k >= 16 ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(mask16(k), p);
}

/* Byte `off` of row r of an F32/BF16 pass: row-major, `row` bytes a row, or
 * interleaved (st; only tests and callers of their own store F32/BF16 so:
 * wrows_interleave never does). ilv is a constant in every instantiation, so
 * the row-major loops keep plain offsets: with the line arithmetic of the
 * interleaved layout in every step they ran a third slower from L2. */
static INLINE const uint8_t *fp_at(const uint8_t *w, int r, int64_t off, int64_t row, stride st, const int ilv)
{
    return ilv ? wline(w, off, st) + r * st.rs : w + r * row + off;
}

/* acc + the products of a line of weights (up to k of its 16 F32 or 32
 * BF16 values, zeros after) with as many inputs (x or xb from input e):
 * F32 by FMA; BF16 by vdpbf16ps, which adds each lane's two products of
 * bf16 by bf16 (inputs of round_act_bf16: subnormals are zeros to it too;
 * it also takes subnormal weights as zeros and flushes subnormal sums,
 * where the other sets keep them: a difference below 1e-38). */
AVX512 static INLINE __m512 fp_line(wtype t, __m512 acc, const uint8_t *w, const float *x, const uint16_t *xb,
                                    int64_t e, int64_t k)
{
    if (t == WT_F32) return _mm512_fmadd_ps(load_f32((const float *)w, k), load_f32(x + e, k), acc);
    return _mm512_dpbf16_ps(acc, (__m512bh)load_i16(w, k), (__m512bh)load_i16(xb + e, k));
}

/* One step of an F32/BF16 pass: FP_CHAINS lines of weights (16 F32 or 32
 * BF16) from column i of each of R rows, line v of a row into accumulator
 * v, each row's stream prefetched pf bytes on once a line. */
AVX512 static INLINE void fp_step(wtype t, __m512 acc[AVX512_ROWS][FP_CHAINS][AVX512_FP_INPUTS], const uint8_t *w,
                                  const float *x, const uint16_t *xb, const int R, const int NI, int64_t C,
                                  int64_t row, stride st, const int ilv, int64_t i, int64_t pf)
{
    const int64_t es = t == WT_F32 ? 4 : 2, lanes = 64 / es;
    UNROLL for (int v = 0; v < FP_CHAINS; v++) {
        const int64_t e = i + lanes * v;
        UNROLL for (int r = 0; r < R; r++) {
            const uint8_t *wv = fp_at(w, r, es * e, row, st, ilv);
            prefetch_ahead(wv, pf);
            UNROLL for (int j = 0; j < NI; j++) acc[r][v][j] = fp_line(t, acc[r][v][j], wv, x, xb, j * C + e, lanes);
        }
    }
}

/* F32 and BF16, R rows a pass (see FP_CHAINS): one FMA per 16 F32 weights
 * and input, one vdpbf16ps per 32 BF16 ones. The steps whose prefetches
 * stay in their row run first, then those that wrap (stream_ahead), so that
 * no step tests which it is. Where the two distances are the same (a row a
 * pass, or interleaved rows) every step runs in the one loop: the same
 * operations, the same bits. When each row was split between the two loops
 * anyway, a pass over a BF16 row of 5632 inputs (widened, fp32 inputs)
 * streamed at 77-81% of a plain read, in one loop at 80-85%, four rounds
 * alternated (bench/kernels --C 5632, AMD EPYC family 26 model 2).
 *
 * BF16 against bf16 inputs (round_act_bf16) instead of widened against fp32
 * ones: half the input bytes a row (11 KB of L1 for 5632 inputs, where 22
 * KB fell out of it under the weights' stream) and one instruction per 32
 * weights for three. One thread, rows of 5632 from a 1 GB matrix: 38-48% ->
 * 75-96% of a plain read, from L2 37-43 -> 60-79 GB/s; rows of 2048 42-46%
 * -> 61-78% (bench/kernels, AMD EPYC family 25 model 17, Zen 4). */
AVX512 static INLINE void fp_pass(wtype t, float *out, int64_t ldo, const uint8_t *w, const float *x,
                                  const uint16_t *xb, const int R, const int NI, int64_t C, ahead pf, stride st,
                                  const int ilv)
{
    const int64_t es = t == WT_F32 ? 4 : 2, row = es * C, lanes = 64 / es, step = lanes * FP_CHAINS;
    __m512 acc[AVX512_ROWS][FP_CHAINS][AVX512_FP_INPUTS]; /* R x NI of them used: at most 16 */
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int v = 0; v < FP_CHAINS; v++)
            UNROLL for (int j = 0; j < NI; j++) acc[r][v][j] = _mm512_setzero_ps();
    const int64_t whole = C / step * step; /* whole vectors, unmasked */
    int64_t in_row = (row - pf.d) / es / step * step; /* steps prefetching inside their row */
    in_row = in_row < 0 ? 0 : in_row > whole ? whole : in_row;
    if (pf.d == pf.wrap) in_row = 0; /* all alike: one loop */
    int64_t i = 0;
    for (; i < in_row; i += step) fp_step(t, acc, w, x, xb, R, NI, C, row, st, ilv, i, pf.d);
    for (; i < whole; i += step) fp_step(t, acc, w, x, xb, R, NI, C, row, st, ilv, i, pf.wrap);
    UNROLL for (int v = 0; v < FP_CHAINS; v++) { /* the rest, masked */
        const int64_t e = i + lanes * v;
        if (e >= C) break;
        UNROLL for (int r = 0; r < R; r++) {
            const uint8_t *wv = fp_at(w, r, es * e, row, st, ilv);
            UNROLL for (int j = 0; j < NI; j++) acc[r][v][j] = fp_line(t, acc[r][v][j], wv, x, xb, j * C + e, C - e);
        }
    }
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int j = 0; j < NI; j++) {
            __m512 sum = acc[r][0][j];
            UNROLL for (int v = 1; v < FP_CHAINS; v++) sum = _mm512_add_ps(sum, acc[r][v][j]);
            out[j * ldo + r] = _mm512_reduce_add_ps(sum);
        }
}

/* v held in a register from here on: gcc would fold its load into every
 * instruction that uses it, a load each (int8_pass_one). */
#define IN_REG(v) __asm__("" : "+v"(v))

/* Q8 and Q4 go through vpdpbusd: u8 x s8 products, four at a time summed
 * into each int32 lane, exactly. A vector of weights holds whole blocks (Q8
 * two, Q4 four), so each int32 lane belongs to one block; its sum is scaled
 * in fp32 by that block's weight scale times activation scale, spread over
 * the block's lanes by a permute of the 16 products of a step of 16 blocks.
 * No horizontal sum until the end of the row. */

/* Q8, one vector of weights (blocks 2g, 2g+1 of the step) per row: the
 * weights as unsigned bytes, w + 128 (w ^ 0x80), against the signed
 * activations; the 128 * sum(x) this adds is taken off in int32 by starting
 * each sum at -128 * sum(x) (one vpdpbusd per input, shared by the rows).
 * Exact for every int8 w and x: no intermediate saturates. k: bytes left.
 * (Its starts made once a tile, as Q4's, ran slower: 66-74 against 77-80
 * GB/s in L2.) */
AVX512 static INLINE void q8_group(__m512 acc[AVX512_ROWS][4], __m512 s[AVX512_ROWS][4], __m512i idx, const int8_t *w,
                                   int64_t row, const int8_t *xq, int64_t C, int64_t k, const int R, const int NI,
                                   int64_t pf, const int L2)
{
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    __m512i xv[4], c[4];
    UNROLL for (int j = 0; j < NI; j++) {
        xv[j] = load_i8(xq + j * C, k);
        c[j] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, flip, xv[j]));
    }
    UNROLL for (int r = 0; r < R; r++) {
        prefetch_into(w + r * row, pf, L2);
        __m512i wu = _mm512_xor_si512(load_i8(w + r * row, k), flip);
        UNROLL for (int j = 0; j < NI; j++) {
            __m512 p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c[j], wu, xv[j]));
            acc[r][j] = _mm512_fmadd_ps(p, _mm512_permutexvar_ps(idx, s[r][j]), acc[r][j]);
        }
    }
}

/* Q4, one vector (blocks 4g .. 4g+3 of the step, 16 bytes each, one per
 * 128-bit lane) per row: the low nibbles are elements 0-15 of each block,
 * the high ones 16-31, unsigned as they are. The activations of the four
 * blocks are regrouped to match (a lane shuffle of two loads picks the
 * blocks' first halves, another their second halves), and each sum starts at
 * -8 * sum(x), so that it is sum((nibble - 8) x), exact. k: blocks left.
 * PREP: they come from q4_prep's xg, xgs bytes an input (a constant: tested
 * in the loop, the test alone cost what the preparing saves; both kinds in
 * one function, its passes streamed from memory at 76-85% of a plain read
 * against 94-98%: they are two, q4_avx512 and q4_raw_avx512). */
AVX512 static INLINE void q4_inputs(const int8_t *xq, int64_t k, __m512i *xlo, __m512i *xhi, __m512i *c)
{
    const __m512i eight = _mm512_set1_epi8(8), zero = _mm512_setzero_si512();
    __m512i x0 = load_i8(xq, 32 * k), x1 = load_i8(xq + 64, 32 * (k - 2));
    *xlo = _mm512_shuffle_i64x2(x0, x1, 0x88); /* lanes 0, 2 of each: the blocks' first halves */
    *xhi = _mm512_shuffle_i64x2(x0, x1, 0xdd);
    *c = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, eight, *xlo), eight, *xhi));
}
AVX512 static INLINE void q4_group(__m512 acc[AVX512_ROWS][4], __m512 s[AVX512_ROWS][4], __m512i idx, const uint8_t *w,
                                   int64_t row, const int8_t *xq, int64_t C, int64_t k, const uint8_t *xg,
                                   int64_t xgs, const int R, const int NI, const int PREP, int64_t pf, const int L2)
{
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512i xlo[4], xhi[4], c[4];
    UNROLL for (int j = 0; j < NI; j++) {
        if (PREP) {
            const uint8_t *p = xg + j * xgs;
            xlo[j] = _mm512_load_si512(p);
            xhi[j] = _mm512_load_si512(p + 64);
            c[j] = _mm512_load_si512(p + 128);
            IN_REG(xlo[j]);
            IN_REG(xhi[j]);
        }
        else q4_inputs(xq + j * C, k, &xlo[j], &xhi[j], &c[j]);
    }
    UNROLL for (int r = 0; r < R; r++) {
        prefetch_into(w + r * row, pf, L2);
        __m512i v = load_i8(w + r * row, 16 * k);
        IN_REG(v);
        __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        UNROLL for (int j = 0; j < NI; j++) {
            __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c[j], lo, xlo[j]), hi, xhi[j]);
            acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx, s[r][j]), acc[r][j]);
        }
    }
}

/* What every pass over a Q4 tile would make of its inputs again (q4_inputs),
 * made once a tile: Q4_PREP bytes a group of 4 blocks. In L2, one thread
 * (AMD EPYC family 26 model 2), Q4 at one input went from 45-53 to 52-58
 * GB/s, at four from 16-18 to 18-21; from memory, a 1 GB matrix at one
 * input 91-100% -> 100-106% of a plain read, at four 34-40% -> 39-46%. */
#define Q4_PREP 192
AVX512 static int64_t q4_prep(uint8_t *xg, size_t cap, const int8_t *xq, int64_t n, int64_t C)
{
    const int64_t nb = C / QBLOCK, groups = (nb + 3) / 4, each = groups * Q4_PREP;
    if (n * each > (int64_t)cap) return 0;
    for (int64_t j = 0; j < n; j++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *p = xg + j * each + g * Q4_PREP;
            __m512i lo, hi, c;
            q4_inputs(xq + j * C + g * 4 * QBLOCK, nb - g * 4, &lo, &hi, &c);
            _mm512_store_si512(p, lo);
            _mm512_store_si512(p + 64, hi);
            _mm512_store_si512(p + 128, c);
        }
    return each;
}

/* The sums of 4 rows' accumulators into out[0..3], each added in the order
 * _mm512_reduce_add_ps adds one vector's lanes (halves of 256, of 128
 * bits, then lanes 0+2 and 1+3, then those two), so that a pass of 4 rows
 * and a pass of one give a row the same bits; 15 instructions for the 4
 * rows, about half what 4 reductions take. */
AVX512 static INLINE void reduce4(float *out, __m512 a0, __m512 a1, __m512 a2, __m512 a3)
{
    /* 128-bit lanes: [a0 l0+l2, a0 l1+l3, a1 l0+l2, a1 l1+l3] and so for a2, a3 */
    const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0xee), _mm512_shuffle_f32x4(a0, a1, 0x44));
    const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0xee), _mm512_shuffle_f32x4(a2, a3, 0x44));
    /* lane k: row k's 4 sums of a quarter each */
    const __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0xdd), _mm512_shuffle_f32x4(u01, u23, 0x88));
    const __m512 w = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4e)); /* [0+2, 1+3, ...] in each lane */
    const __m512 z = _mm512_add_ps(w, _mm512_permute_ps(w, 0xb1)); /* element 0 of lane k: row k's sum */
    const __m512i firsts = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, z)));
}

/* Each int32 lane of a vector of Q8 (2 blocks) or Q4 (4 blocks) weights ->
 * the block of the vector it belongs to. */
AVX512 static INLINE __m512i block_of_lane(wtype t)
{
    return t == WT_Q8 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                      : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
}

/* Group g of a step (blocks b + g onwards, nblk in the step) against its
 * scale products s, from w (INL: the step's start). */
AVX512 static INLINE void int8_group(wtype t, __m512 acc[AVX512_ROWS][4], __m512 s[AVX512_ROWS][4], __m512i idx,
                                     const uint8_t *w, int64_t b, int64_t g, int64_t nblk, const int8_t *xq,
                                     const uint8_t *xg, int64_t xgs, int64_t C, const int R, const int NI,
                                     const int PREP, const int INL, stride st, ahead pf, int64_t row, const int L2)
{
    const int64_t e = (b + g) * QBLOCK; /* the group's first input */
    const int64_t at = t == WT_Q8 ? e : e / 2; /* its first weight's byte in a row */
    const uint8_t *wg = INL ? wline(w, at - b * wblock_bytes(t), st) : wline(w, at, st);
    if (t == WT_Q8)
        q8_group(acc, s, idx, (const int8_t *)wg, st.rs, xq + e, C, 32 * (nblk - g), R, NI,
                 stream_ahead(at, pf, row), L2);
    else q4_group(acc, s, idx, wg, st.rs, xq + e, C, nblk - g, PREP ? xg + (b + g) / 4 * Q4_PREP : NULL, xgs, R,
                  NI, PREP, stream_ahead(at, pf, row), L2);
}

/* Q8 or Q4 rows, in steps of 16 blocks: the steps' 16 scale products per
 * (row, input), then the groups of blocks one vector of weights holds.
 * INL: the rows are WILV_INLINE, whose steps are these (ws NULL). */
_Static_assert(QSTEP == 16, "a pass's step is a step of the WILV_INLINE layout");
AVX512 static INLINE void int8_pass(wtype t, float *out, int64_t ldo, const uint8_t *w, const uint8_t *ws,
                                    const int8_t *xq, const float *xs, const uint8_t *xg, int64_t xgs, const int R,
                                    const int NI, const int PREP, const int INL, int r0, int64_t C, ahead pf,
                                    stride st, const int L2)
{
    const int64_t nb = C / QBLOCK, row = wtype_row_bytes(t, C);
    const int per = t == WT_Q8 ? 2 : 4; /* blocks per vector */
    const __m512i lanes = block_of_lane(t);
    __m512 acc[AVX512_ROWS][4];
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int j = 0; j < NI; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 16) {
        const int64_t nblk = nb - b < 16 ? nb - b : 16;
        __m512 s[AVX512_ROWS][4], xd[4];
        /* WILV_INLINE: the step's lines, then its scales, prefetched as far on
         * as the lines (a step and its scales are as long as the 4-row pass's
         * step: QSTEP blocks) */
        const uint8_t *step = INL ? inline_step(t, w, b) : NULL;
        if (INL) prefetch_step_scales(t, step, r0, b, nb, pf.d);
        UNROLL for (int j = 0; j < NI; j++) xd[j] = load_f32(xs + j * 2 * nb + b, nblk);
        UNROLL for (int r = 0; r < R; r++) {
            const uint8_t *sr = INL ? inline_scale(t, step, r0, r, b, nb) : ws + r * 2 * nb + 2 * b;
            __m512 wd = _mm512_cvtph_ps(load_f16x16(sr, nblk));
            UNROLL for (int j = 0; j < NI; j++) s[r][j] = _mm512_mul_ps(wd, xd[j]);
        }
        const __m512i next = _mm512_set1_epi32(per);
        __m512i idx = lanes;
        for (int64_t g = 0; g < nblk; g += per, idx = _mm512_add_epi32(idx, next))
            int8_group(t, acc, s, idx, INL ? step : w, b, g, nblk, xq, xg, xgs, C, R, NI, PREP, INL, st, pf, row, L2);
    }
    UNROLL for (int j = 0; j < NI; j++) {
        if (R == AVX512_ROWS) reduce4(out + j * ldo, acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
        else UNROLL for (int r = 0; r < R; r++) out[j * ldo + r] = _mm512_reduce_add_ps(acc[r][j]);
    }
}

/* A pass of the common decoding case: one input against the 4 rows of a
 * WILV_INLINE group (a copy in RAM) made of whole steps (C a multiple of
 * QSTEP blocks, as in every JetMoE-8B product). Its own loop, so that every
 * offset and the prefetch distance (pf: the tuning's, 0 for none) are
 * constants, no load is masked and no test is made per group; each line of
 * weights is loaded once into a register, and the prepared inputs once a
 * group (IN_REG: gcc otherwise folds a load into every instruction that
 * uses it, and Zen 5 takes two 512-bit loads a cycle: Q4 made four a row
 * and group). The same operations
 * in the same order as int8_pass, so the same bits. bench/kernels' L2 ilv
 * (one thread, C = 2048, AMD EPYC family 26 model 2), against the general
 * loop with a fast path inside it: Q4 52 -> 67-70 GB/s, Q8 76-77 -> 98
 * (C = 5632: Q4 66 -> 83); from memory unchanged (Q4 91-96%, Q8 92-98% of
 * a plain read). A 2-thread q4 decode did not change either: it runs at the
 * pace of the read-only kernels (README). Kept a loop over the groups:
 * unrolled (an earlier try, fast path of int8_pass), its L2 speed rose but
 * it streamed from memory at 44-95% of the loop's. */
AVX512 static INLINE void int8_pass_one(wtype t, float *out, const uint8_t *w, const int8_t *xq, const float *xs,
                                        const uint8_t *xg, int64_t C, const int PREP, int64_t pf)
{
    const int64_t nb = C / QBLOCK;
    const int per = t == WT_Q8 ? 2 : 4, groups = QSTEP / per; /* blocks a vector, vectors a row and step */
    const __m512i lanes = block_of_lane(t);
    const __m512i next = _mm512_set1_epi32(per);
    __m512 acc[AVX512_ROWS][4];
    UNROLL for (int r = 0; r < AVX512_ROWS; r++) acc[r][0] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += QSTEP, w += wstep_bytes(t)) {
        prefetch_step_scales(t, w, 0, b, nb, pf);
        const __m512 xd = _mm512_loadu_ps(xs + b);
        __m512 s[AVX512_ROWS][4];
        UNROLL for (int r = 0; r < AVX512_ROWS; r++)
            s[r][0] = _mm512_mul_ps(_mm512_cvtph_ps(load_f16x16(inline_scale(t, w, 0, r, b, nb), QSTEP)), xd);
        __m512i idx = lanes;
#pragma GCC unroll 1
        for (int64_t g = 0; g < groups; g++, idx = _mm512_add_epi32(idx, next)) {
            const uint8_t *line = w + g * 64 * WILV; /* group g's line of row 0; row r's r lines on */
            const int8_t *xe = xq + (b + g * per) * QBLOCK;
            if (t == WT_Q8) q8_group(acc, s, idx, (const int8_t *)line, 64, xe, C, 64, AVX512_ROWS, 1, pf, 0);
            else q4_group(acc, s, idx, line, 64, xe, C, per, PREP ? xg + (b / per + g) * Q4_PREP : NULL, 0,
                          AVX512_ROWS, 1, PREP, pf, 0);
        }
    }
    reduce4(out, acc[0][0], acc[1][0], acc[2][0], acc[3][0]);
}

/* The passes of each (R, NI) a Q8/Q4 tile takes, R and NI constants in each.
 * L2: prefetches into L2, not L1 (interleaved rows' fast path: into L1). */
AVX512 static INLINE void int8_avx512(wtype t, float *out, int64_t ldo, const pass_args *a, int R, int NI,
                                      const int PREP, const int L2)
{
#define INT8_PASS(R, NI, INL) \
    int8_pass(t, out, ldo, a->w, a->ws, a->xq, a->xs, a->xg, a->xgs, R, NI, PREP, INL, a->r0, a->C, a->pf, a->st, L2)
    if (!a->ws && R == AVX512_ROWS && NI == 1 && a->r0 == 0 && a->C % (QSTEP * QBLOCK) == 0) {
        /* the tunings' two distances as constants (else a test per group) */
        if (a->pf.d) int8_pass_one(t, out, a->w, a->xq, a->xs, a->xg, a->C, PREP, INL_AHEAD);
        else int8_pass_one(t, out, a->w, a->xq, a->xs, a->xg, a->C, PREP, 0);
        return;
    }
    switch (!a->ws * 16 + (R == AVX512_ROWS) * 8 + NI) {
    case 8 + 1: INT8_PASS(AVX512_ROWS, 1, 0); break;
    case 8 + 2: INT8_PASS(AVX512_ROWS, 2, 0); break;
    case 8 + 3: INT8_PASS(AVX512_ROWS, 3, 0); break;
    case 8 + 4: INT8_PASS(AVX512_ROWS, 4, 0); break;
    case 1: INT8_PASS(1, 1, 0); break;
    case 2: INT8_PASS(1, 2, 0); break;
    case 3: INT8_PASS(1, 3, 0); break;
    case 4: INT8_PASS(1, 4, 0); break;
    case 16 + 8 + 1: INT8_PASS(AVX512_ROWS, 1, 1); break;
    case 16 + 8 + 2: INT8_PASS(AVX512_ROWS, 2, 1); break;
    case 16 + 8 + 3: INT8_PASS(AVX512_ROWS, 3, 1); break;
    case 16 + 8 + 4: INT8_PASS(AVX512_ROWS, 4, 1); break;
    case 16 + 1: INT8_PASS(1, 1, 1); break;
    case 16 + 2: INT8_PASS(1, 2, 1); break;
    case 16 + 3: INT8_PASS(1, 3, 1); break;
    case 16 + 4: INT8_PASS(1, 4, 1); break;
    }
#undef INT8_PASS
}

/* The same for F32/BF16 tiles, row-major or interleaved (fp_at). SEQ: a
 * pass of 4 rows at one input reads them one after another, each as a pass
 * of its own would, in one call (the "stream" tuning's: row-major, the 4 are
 * then one stream, not 4 a row apart; it prefetches nothing, so a row's
 * prefetch distance past its end is never used). */
AVX512 static INLINE void fp_avx512(wtype t, float *out, int64_t ldo, const pass_args *a, int R, int NI,
                                    const int SEQ)
{
    const int ilv = a->st.ls != 64;
#define FP_PASS(R, NI, ILV) fp_pass(t, out, ldo, a->w, a->x, a->xb, R, NI, a->C, a->pf, a->st, ILV)
    if (SEQ && R == AVX512_ROWS && NI == 1) {
        UNROLL for (int r = 0; r < AVX512_ROWS; r++) /* st.rs: from a row to the next */
            fp_pass(t, out + r, ldo, a->w + r * a->st.rs, a->x, a->xb, 1, 1, a->C, a->pf, a->st, ilv);
        return;
    }
    switch (ilv * 32 + (R == AVX512_ROWS) * 16 + (R == AVX512_FP_ROWS) * 8 + NI) {
    case 16 + 1: FP_PASS(AVX512_ROWS, 1, 0); break;
    case 8 + 1: FP_PASS(AVX512_FP_ROWS, 1, 0); break;
    case 8 + 2: FP_PASS(AVX512_FP_ROWS, 2, 0); break;
    case 1: FP_PASS(1, 1, 0); break;
    case 2: FP_PASS(1, 2, 0); break;
    case 32 + 16 + 1: FP_PASS(AVX512_ROWS, 1, 1); break;
    case 32 + 8 + 1: FP_PASS(AVX512_FP_ROWS, 1, 1); break;
    case 32 + 8 + 2: FP_PASS(AVX512_FP_ROWS, 2, 1); break;
    case 32 + 1: FP_PASS(1, 1, 1); break;
    case 32 + 2: FP_PASS(1, 2, 1); break;
    }
#undef FP_PASS
}
/* The set's pass functions (pass_fn), each an instantiation of fp_avx512 or
 * int8_avx512 with its constants: F32/BF16 with or without SEQ; Q8/Q4 with
 * or without prepared inputs (PREP) and prefetches into L2. */
#define PASS_ENTRY(name, call)                                                          \
    AVX512 static void name(float *out, int64_t ldo, const pass_args *a, int R, int NI) \
    {                                                                                   \
        call;                                                                           \
    }
PASS_ENTRY(f32_avx512, fp_avx512(WT_F32, out, ldo, a, R, NI, 0))
PASS_ENTRY(bf16_avx512, fp_avx512(WT_BF16, out, ldo, a, R, NI, 0))
PASS_ENTRY(f32_avx512_seq, fp_avx512(WT_F32, out, ldo, a, R, NI, 1))
PASS_ENTRY(bf16_avx512_seq, fp_avx512(WT_BF16, out, ldo, a, R, NI, 1))
PASS_ENTRY(q8_avx512, int8_avx512(WT_Q8, out, ldo, a, R, NI, 0, 0))
PASS_ENTRY(q4_avx512, int8_avx512(WT_Q4, out, ldo, a, R, NI, 1, 0))
PASS_ENTRY(q4_raw_avx512, int8_avx512(WT_Q4, out, ldo, a, R, NI, 0, 0))
PASS_ENTRY(q8_avx512_l2, int8_avx512(WT_Q8, out, ldo, a, R, NI, 0, 1))
PASS_ENTRY(q4_avx512_l2, int8_avx512(WT_Q4, out, ldo, a, R, NI, 1, 1))
PASS_ENTRY(q4_raw_avx512_l2, int8_avx512(WT_Q4, out, ldo, a, R, NI, 0, 1))
#undef PASS_ENTRY
static void shape_avx512(const stream_tuning *tu, wtype t, int ilv, int64_t n, int64_t C, int *rows, int *inputs)
{
    (void)ilv;
    const int fp = t == WT_F32 || t == WT_BF16;
    /* one input: one row a pass, or four where rows are short (the four are
     * then a few lines of one stream, and a pass's fixed cost, its call and
     * its rows' final sums, is shared) */
    const int one = wtype_row_bytes(t, C) <= tu->short_row ? AVX512_ROWS : 1;
    *rows = !fp ? AVX512_ROWS : n == 1 ? one : AVX512_FP_ROWS;
    *inputs = fp ? AVX512_FP_INPUTS : AVX512_INPUTS;
}
#ifndef FP_AHEAD_AVX512
#define FP_AHEAD_AVX512 4096
#endif
/* The set's two tunings, the same passes (the same operations, the same
 * bits) reading their stream two ways.
 *
 * "prefetch", tuned on Zen 5 (and the choice where nothing was measured):
 * each row's lines prefetched into L1 ahead of the pass, short rows 4 a pass
 * (the figures at FP_CHAINS, PREFETCH_BYTES, SCALE_PASSES_AHEAD). Intel's
 * Xeon with AMX (family 6 model 167 as its hypervisor reports it) measured
 * best with it too: one thread, rows of 2048 from 1 GB, % of a plain read
 * (bench/kernels), prefetch / stream: F32 103% / 102%, BF16 99-102% /
 * 87-89%, Q8 over the RAM layout 96% / 75%, Q4 92% / 62%.
 *
 * "stream", for Zen 4: the same passes leave each stream to the hardware
 * prefetchers (F32/BF16 rows, interleaved Q8/Q4 rows), and F32/BF16 rows at
 * one input are read one at a time, so that a pass reads one stream (rows 4
 * a pass are 4 streams a row apart, which Zen 4's prefetchers follow badly
 * when rows are short). First measured with every row a pass: one thread,
 * rows from a 1 GB matrix, % of a plain read measured just before
 * (bench/kernels, AMD EPYC family 25 model 17, two rounds alternated),
 * prefetch -> stream:
 * F32 rows of 256 33% -> 63-78%, of 704 45-50% -> 93-99%, of 2048 46-68% ->
 * 92-94%; BF16 of 2048 46-49% -> 86-96%, of 5632 66-76% -> 75-97%; Q8 over
 * the RAM layout, rows of 2048 63-79% -> 99-100%, of 5632 43-61% -> 86-87%;
 * Q4 59-68% -> 65-92%, 54-76% -> 69-110%. Prefetching into L2 (T1) instead
 * gave 62-90% over the RAM layout. In a microbenchmark of plain dot products
 * over rows of 1 KB, one row a pass with no prefetch kept up with a plain
 * read (95-103%), software prefetches 1-4 KB on made it 80-87%, and 4 rows a
 * pass 34% (2 KB on into L2: 36%; 8 KB: 53%). Whole decodes, one thread: the
 * small config 165 -> 320-428 tokens/s, the 8B layout (prompt 64) bf16
 * 2.7-3.4 -> 3.8-5.0, q8 5.7-7.0 -> 6.6-8.6, q4 14.7 -> 16.4-17.6.
 * Then short F32/BF16 rows (at most FP_SHORT_ROW bytes) went 4 a pass
 * again, read one after another (fp_avx512's SEQ): a pass's fixed cost (the
 * tile's loop, its call) was most of a row's at one row a pass: F32 rows of 256 from L2
 * 27-29 -> 61-70 GB/s, from memory alike (82-99% of a plain read against
 * 85-89%); the small config 407-419 -> 539-559 tokens/s at one thread,
 * 575-671 -> 694-813 at two (three rounds alternated).
 * Row-major Q8/Q4 rows (quantized files from before interleaving, matrices
 * not of whole groups or lines) are R streams a pass whatever the tuning,
 * and stay prefetched (tile_by_passes), here into L2 (T1): rows of 2048 and
 * 5632 from 1 GB, two rounds, 40-48% of a plain read into L1, 66-76% into
 * L2. A mapped checkpoint of ours (rows interleaved, scales apart: no line
 * prefetch here) decoded q4 at one thread at 13.4 and 12.1 tokens/s with
 * "stream", 14.3 and 12.4 with "prefetch" (alternated; within the swing).
 * Batches (n > 1) were not measured apart: 2 rows a pass, no prefetch. */
static const pass_set passes_avx512 = {shape_avx512, f32_avx512, bf16_avx512, q8_avx512, q4_avx512,
                                       {FP_AHEAD_AVX512, ILV_AHEAD_BYTES, FP_SHORT_ROW}, q4_prep, q4_raw_avx512,
                                       NULL, NULL};
static const pass_set passes_avx512_stream = {shape_avx512,    f32_avx512_seq, bf16_avx512_seq, q8_avx512_l2,
                                              q4_avx512_l2,    {0, 0, FP_SHORT_ROW}, q4_prep,
                                              q4_raw_avx512_l2, NULL,          NULL};

static void tile_avx512(float *out, int64_t ldo, wview w, int64_t nrows, const float *x, const void *xq,
                        const float *xs, int64_t n, int64_t C)
{
    tile_by_passes(&passes_avx512, out, ldo, w, nrows, x, xq, xs, n, C);
}
static void tile_avx512_stream(float *out, int64_t ldo, wview w, int64_t nrows, const float *x, const void *xq,
                               const float *xs, int64_t n, int64_t C)
{
    tile_by_passes(&passes_avx512_stream, out, ldo, w, nrows, x, xq, xs, n, C);
}

static const wkernels kernels_avx512 = {"avx512:prefetch", tile_avx512, tile_avx512, tile_avx512, tile_avx512,
                                          att_scores_avx512, att_values_avx512};
static const wkernels kernels_avx512_stream = {"avx512:stream",    tile_avx512_stream, tile_avx512_stream,
                                               tile_avx512_stream, tile_avx512_stream, att_scores_avx512,
                                               att_values_avx512};
/* The same set where the CPU has AVX-512 and VNNI but not AVX-512 BF16
 * (Intel's Skylake-X to Ice Lake): BF16 through the AVX2 passes, which
 * widen the same bf16 inputs (the same products, summed in another order),
 * every other kernel the AVX-512 one. Nothing of the AVX-512 code it runs
 * uses a BF16 instruction (only the BF16 pass's vdpbf16ps does). */
static const wkernels kernels_avx512_no_bf16 = {"avx512:prefetch", tile_avx512,       tile_avx2, tile_avx512,
                                                tile_avx512,       att_scores_avx512, att_values_avx512};
#endif

/* ---- "read": the products' reads without their math ----
 * For bench/decode --kernels read (jm_set_read_only_products): a tile reads
 * every byte its products would (weights and scales) as plain loads, with
 * the kernels' prefetches (none for the "stream" tuning's), and writes a
 * hash of the positions. A decode step
 * then runs at the memory system's pace for the step's own access pattern
 * (which experts, in what pieces, from the model's mapping): the ceiling the
 * real kernels are measured against, beside the roofline's plain read of
 * one buffer. Never chosen by name or "auto": its outputs are no products. */
/* Lines prefetched 8 KB on (as interleaved Q8/Q4 passes did before they
 * went to ILV_AHEAD_BYTES): inside a BF16 step of the 8B layout, one
 * thread, reads 2 KB on ran at 71-77% of the roofline, 8 and 16 KB on at
 * 81-86%, 32 KB at 72-83% (AMD EPYC family 26 model 2); with 4 KB on, the
 * read tiles in bench/products fell from 86-93% of a plain read to 84-89%. */
#define READ_AHEAD 8192
static uint64_t read_bytes(const uint8_t *p, int64_t bytes, int64_t dist)
{
    uint64_t h[8] = {0};
    int64_t at = 0;
    for (; at + 64 <= bytes; at += 64) {
        if (at % 4096 == 0) prefetch_pages(p + at, 4096, PAGE_AHEAD);
        if (dist) __builtin_prefetch((const void *)((uintptr_t)p + (uintptr_t)(at + dist)), 0, 3);
        for (int k = 0; k < 8; k++) {
            uint64_t v;
            memcpy(&v, p + at + 8 * k, 8);
            h[k] ^= v;
        }
    }
    for (; at < bytes; at++) h[0] ^= p[at];
    return h[0] ^ h[1] ^ h[2] ^ h[3] ^ h[4] ^ h[5] ^ h[6] ^ h[7];
}

/* dist: READ_AHEAD, or 0 for a set tuned to leave its streams to the
 * hardware prefetchers (the "stream" tunings: the avx512 set's, and the
 * avx2 set's for F32/BF16) */
static void read_tile(float *out, int64_t ldo, wview w, int64_t nrows, int64_t n, int64_t C, int64_t dist)
{
    const int64_t row = wtype_row_bytes(w.type, C);
    /* the tile's rows are consecutive bytes in every layout (interleaved
     * tiles are whole groups; WILV_INLINE's hold their scales) */
    uint64_t h = read_bytes(wrow_byte(w, 0, 0, row), w.ilv == WILV_INLINE ? wview_bytes(w, nrows, C) : nrows * row,
                            dist);
    if (w.scales) h ^= read_bytes(w.scales, nrows * 2 * (C / QBLOCK), dist);
    uint32_t v = (uint32_t)(h ^ h >> 32);
    for (int64_t r = 0; r < n; r++)
        for (int64_t o = 0; o < nrows; o++) {
            v = v * 2654435761u + (uint32_t)o; /* finite, in [-0.5, 0.5): the step's softmaxes stay defined */
            out[r * ldo + o] = (float)(v >> 8) / 16777216.0f - 0.5f;
        }
}
static void tile_read(float *out, int64_t ldo, wview w, int64_t nrows, const float *x, const void *xq,
                      const float *xs, int64_t n, int64_t C)
{
    (void)x, (void)xq, (void)xs;
    read_tile(out, ldo, w, nrows, n, C, READ_AHEAD);
}

/* The read set of each set, with that set's attention kernels. */
static const wkernels read_portable = {"read", tile_read, tile_read, tile_read, tile_read, att_scores_c, att_values_c};
#ifdef JM_X86
static const wkernels read_avx2 = {"read", tile_read, tile_read, tile_read, tile_read, att_scores_avx2,
                                   att_values_avx2};
static const wkernels read_avx512 = {"read",    tile_read, tile_read, tile_read, tile_read, att_scores_avx512,
                                     att_values_avx512};
static void tile_read_stream(float *out, int64_t ldo, wview w, int64_t nrows, const float *x, const void *xq,
                             const float *xs, int64_t n, int64_t C)
{
    (void)x, (void)xq, (void)xs;
    read_tile(out, ldo, w, nrows, n, C, 0);
}
static const wkernels read_avx512_stream = {"read",           tile_read_stream,  tile_read_stream, tile_read_stream,
                                            tile_read_stream, att_scores_avx512, att_values_avx512};
/* the avx2 set's "stream": F32/BF16 rows left to the hardware, Q8/Q4 rows
 * prefetched */
static void tile_read_fp_stream(float *out, int64_t ldo, wview w, int64_t nrows, const float *x, const void *xq,
                                const float *xs, int64_t n, int64_t C)
{
    (void)x, (void)xq, (void)xs;
    read_tile(out, ldo, w, nrows, n, C, w.type == WT_F32 || w.type == WT_BF16 ? 0 : READ_AHEAD);
}
static const wkernels read_avx2_stream = {"read", tile_read_fp_stream, tile_read_fp_stream, tile_read_fp_stream,
                                          tile_read_fp_stream, att_scores_avx2, att_values_avx2};
#endif

/* ---- choosing a set ---- */

/* The CPU features the sets need, as bits, and their names by bit
 * (F_X86: an x86 build, never set elsewhere). */
enum { F_X86 = 1, F_AVX2 = 2, F_FMA = 4, F_F16C = 8, F_AVX512F = 16, F_AVX512BW = 32, F_AVX512VL = 64,
       F_AVX512VNNI = 128, F_AVX512BF16 = 256 };
static const char *const feature_names[] = {"x86-64",    "AVX2",      "FMA",          "F16C",       "AVX-512F",
                                            "AVX-512BW", "AVX-512VL", "AVX-512 VNNI", "AVX-512 BF16"};

static unsigned cpu_features(void)
{
#ifdef JM_X86
    __builtin_cpu_init();
    return F_X86 | (__builtin_cpu_supports("avx2") ? F_AVX2 : 0) | (__builtin_cpu_supports("fma") ? F_FMA : 0) |
           (__builtin_cpu_supports("f16c") ? F_F16C : 0) | (__builtin_cpu_supports("avx512f") ? F_AVX512F : 0) |
           (__builtin_cpu_supports("avx512bw") ? F_AVX512BW : 0) |
           (__builtin_cpu_supports("avx512vl") ? F_AVX512VL : 0) |
           (__builtin_cpu_supports("avx512vnni") ? F_AVX512VNNI : 0) |
           (__builtin_cpu_supports("avx512bf16") ? F_AVX512BF16 : 0);
#else
    return 0;
#endif
}

#ifdef JM_X86
/* AMD family 0x19 (Zen 3 and Zen 4), whose tuning is "stream": measured on
 * Zen 4, with AVX-512 and with it hidden by the hypervisor (the avx2 set);
 * Zen 3 (no AVX-512) takes the avx2 set's unmeasured. Zen 5 (family 0x1a)
 * measured best with "prefetch", as did an Intel Xeon with AMX; Zen 1
 * (0x17) gets it unmeasured. */
static int cpu_amd_19h(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d) || b != 0x68747541u || d != 0x69746e65u || c != 0x444d4163u)
        return 0; /* not "AuthenticAMD" */
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned family = (a >> 8 & 15) == 15 ? 15 + (a >> 20 & 255) : a >> 8 & 15;
    return family == 0x19;
}
#endif

/* Every set by name, best first (the order "auto" tries them in); a set
 * with tunings for CPU generations is listed once per tuning, as
 * "set:tuning", each tuning for a CPU generation before the general one
 * (cpu: whether this CPU is of it; NULL: any). A set's bare name is the
 * first of its tunings this CPU is of and runs; "set:tuning" that tuning on
 * any CPU that runs it. */
static const struct {
    const char *name;
    unsigned needs;
    const wkernels *set;
    int (*cpu)(void);
} sets[] = {
#ifdef JM_X86
#define AVX512_NEEDS (F_X86 | F_AVX512F | F_AVX512BW | F_AVX512VL | F_AVX512VNNI)
#define AVX2_NEEDS (F_X86 | F_AVX2 | F_FMA | F_F16C)
    {"avx512:stream", AVX512_NEEDS | F_AVX512BF16, &kernels_avx512_stream, cpu_amd_19h},
    {"avx512:prefetch", AVX512_NEEDS | F_AVX512BF16, &kernels_avx512, NULL},
    {"avx512:prefetch", AVX512_NEEDS | AVX2_NEEDS, &kernels_avx512_no_bf16, NULL},
    {"avx2:stream", AVX2_NEEDS, &kernels_avx2_stream, cpu_amd_19h},
    {"avx2:prefetch", AVX2_NEEDS, &kernels_avx2, NULL},
#undef AVX512_NEEDS
#undef AVX2_NEEDS
#else
    {"avx512:stream", F_X86, NULL, NULL},
    {"avx512:prefetch", F_X86, NULL, NULL},
    {"avx2:stream", F_X86, NULL, NULL},
    {"avx2:prefetch", F_X86, NULL, NULL},
#endif
    {"portable", 0, &kernels_portable, NULL},
};

/* Whether `name` names entry i: its full name, or the set's (the part
 * before ':'). */
static int names_set(const char *name, size_t i)
{
    const char *full = sets[i].name, *colon = strchr(full, ':');
    if (!strcmp(name, full)) return 1;
    return colon && strlen(name) == (size_t)(colon - full) && !strncmp(name, full, (size_t)(colon - full));
}

const wkernels *wkernels_get(const char *name)
{
    const unsigned have = cpu_features();
    const int any = strcmp(name, "auto") == 0, exact = strchr(name, ':') != NULL;
    for (size_t i = 0; i < sizeof sets / sizeof *sets; i++)
        if ((any || names_set(name, i)) && (sets[i].needs & ~have) == 0 && (exact || !sets[i].cpu || sets[i].cpu()))
            return sets[i].set;
    return NULL;
}

int wkernels_missing(const char *name, char *buf, size_t cap)
{
    const unsigned have = cpu_features();
    for (size_t i = 0; i < sizeof sets / sizeof *sets; i++) {
        if (!names_set(name, i)) continue;
        size_t len = 0;
        if (cap) buf[0] = 0;
        for (size_t f = 0; f < sizeof feature_names / sizeof *feature_names; f++)
            if ((sets[i].needs & ~have & 1u << f) && len < cap)
                len += (size_t)snprintf(buf + len, cap - len, "%s%s", len ? ", " : "", feature_names[f]);
        return 0;
    }
    return -1;
}

const wkernels *wkernels_avx512_no_bf16(void)
{
#ifdef JM_X86
    const unsigned have = cpu_features();
    for (size_t i = 0; i < sizeof sets / sizeof *sets; i++)
        if (sets[i].set == &kernels_avx512_no_bf16) return (sets[i].needs & ~have) == 0 ? sets[i].set : NULL;
#endif
    return NULL;
}

const wkernels *wkernels_read(void)
{
#ifdef JM_X86
    const wkernels *best = wkernels_get("auto");
    if (best == &kernels_avx512_stream) return &read_avx512_stream;
    if (best == &kernels_avx512 || best == &kernels_avx512_no_bf16) return &read_avx512;
    if (best == &kernels_avx2) return &read_avx2;
    if (best == &kernels_avx2_stream) return &read_avx2_stream;
#endif
    return &read_portable;
}
