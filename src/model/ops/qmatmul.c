/* qmatmul.c — products with weights as the checkpoint stores them (BF16, and
 * the blockwise Q8/Q4 of `jetmoe quantize`), for inference: the formats,
 * quantization, and the products over experts.
 *
 * Decoding (a few input rows) reads every active weight once: it takes the
 * dot-product kernels of wkernels.c. Prefill has many rows per weight and is
 * compute bound instead: it dequantizes tiles of weights to fp32 and hands
 * them to SGEMM. */
#include "ops.h"
#include "base/base.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>

int64_t wtype_row_bytes(wtype t, int64_t C)
{
    switch (t) {
    case WT_F32: return 4 * C;
    case WT_BF16: return 2 * C;
    case WT_Q8: return C;
    case WT_Q4: return C / 2;
    }
    return 0;
}

wview wview_rows(wview w, int64_t rows, int64_t C)
{
    if (w.ilv == WILV_INLINE) {
        w.data = (const uint8_t *)w.data + rows / WILV * wgroup_inline_bytes(w.type, wtype_row_bytes(w.type, C));
        return w;
    }
    w.data = (const uint8_t *)w.data + rows * wtype_row_bytes(w.type, C);
    if (w.scales) w.scales += rows * (C / QBLOCK) * 2;
    return w;
}

int64_t wview_bytes(wview w, int64_t rows, int64_t C)
{
    const int64_t row = wtype_row_bytes(w.type, C);
    if (w.ilv == WILV_INLINE) return (rows + WILV - 1) / WILV * wgroup_inline_bytes(w.type, row);
    return rows * (row + (w.scales ? 2 * (C / QBLOCK) : 0));
}

/* n bytes of a row (a whole number of elements, and of blocks for Q8/Q4) to
 * fp32 at out; ws: the scale of their first block, the others after it. */
static void dequant_span(float *out, wtype t, const uint8_t *w, int64_t n, const uint8_t *ws)
{
    switch (t) {
    case WT_F32: memcpy(out, w, (size_t)n); break;
    case WT_BF16:
        for (int64_t i = 0; i < n / 2; i++) {
            uint32_t u = (uint32_t)(w[2 * i] | w[2 * i + 1] << 8) << 16;
            memcpy(&out[i], &u, 4);
        }
        break;
    case WT_Q8:
        for (int64_t b = 0; b < n / QBLOCK; b++) {
            const float d = wscale_at(ws, b);
            for (int i = 0; i < QBLOCK; i++) out[b * QBLOCK + i] = d * (float)(int8_t)w[b * QBLOCK + i];
        }
        break;
    case WT_Q4:
        for (int64_t b = 0; b < n / (QBLOCK / 2); b++) {
            const float d = wscale_at(ws, b);
            const uint8_t *qb = w + b * (QBLOCK / 2);
            for (int j = 0; j < QBLOCK / 2; j++) {
                out[b * QBLOCK + j] = d * (float)((qb[j] & 15) - 8);
                out[b * QBLOCK + j + 16] = d * (float)((qb[j] >> 4) - 8);
            }
        }
        break;
    }
}

void interleave_rows(uint8_t *to, const uint8_t *from, int64_t rows, int64_t row_bytes)
{
    const wview w = {WT_Q8, to, NULL, 1}; /* only its data and layout matter to wrow_byte */
    for (int64_t i = 0; i < rows; i++)
        for (int64_t at = 0; at < row_bytes; at += 64)
            memcpy((uint8_t *)wrow_byte(w, i, at, row_bytes), from + i * row_bytes + at, 64);
}

void inline_rows(uint8_t *to, wview from, int64_t rows, int64_t C)
{
    const int64_t row = wtype_row_bytes(from.type, C), nb = C / QBLOCK, bb = wblock_bytes(from.type);
    const wview w = {from.type, to, NULL, WILV_INLINE};
    for (int64_t i = 0; i < rows; i++) {
        /* interleaved already, a whole group's lines of a step are one run */
        const int whole = from.ilv == 1 && i / WILV * WILV + WILV <= rows;
        for (int64_t at = 0; at < row; at += QSTEP * bb) { /* a step: its lines, then its scales */
            const int64_t b = at / bb, n = nb - b < QSTEP ? nb - b : QSTEP;
            if (whole && i % WILV == 0)
                memcpy((uint8_t *)wrow_byte(w, i, at, row), wrow_byte(from, i, at, row), (size_t)(WILV * n * bb));
            else if (!whole)
                for (int64_t l = at; l < at + n * bb; l += 64)
                    memcpy((uint8_t *)wrow_byte(w, i, l, row), wrow_byte(from, i, l, row), 64);
            memcpy((uint8_t *)wscale_ptr(w, i, b, nb), wscale_ptr(from, i, b, nb), (size_t)(2 * n));
            if (i % WILV == 0) { /* the step's padding after its WILV rows' scales */
                uint8_t *end = (uint8_t *)wscale_ptr(w, i, b, nb) + WILV * 2 * n;
                memset(end, 0, (size_t)(wstep_scale_bytes(n) - WILV * 2 * n));
            }
        }
    }
}

void dequant_rows(float *out, wview W, int64_t row0, int64_t nrows, int64_t C)
{
    const int64_t row = wtype_row_bytes(W.type, C), nb = C / QBLOCK;
    const int64_t per_line = W.type == WT_F32 ? 16 : W.type == WT_BF16 ? 32 : W.type == WT_Q8 ? 64 : 128;
    const int q = W.type == WT_Q8 || W.type == WT_Q4;
    for (int64_t r = row0; r < row0 + nrows; r++) {
        float *o = out + (r - row0) * C;
        if (!W.ilv) dequant_span(o, W.type, wrow_byte(W, r, 0, row), row, q ? wscale_ptr(W, r, 0, nb) : NULL);
        else /* a line at a time (the row's lines are WILV apart), and its blocks' scales */
            for (int64_t l = 0; l < row / 64; l++)
                dequant_span(o + l * per_line, W.type, wrow_byte(W, r, 64 * l, row), 64,
                             q ? wscale_ptr(W, r, l * per_line / QBLOCK, nb) : NULL);
    }
}

/* ---- quantization ---- */

static void put_scale(uint8_t *s, uint16_t h)
{
    s[0] = (uint8_t)h;
    s[1] = (uint8_t)(h >> 8);
}

/* Symmetric int8: scale = max|w| / 127, rounded to F16 first so the values
 * are chosen against the scale that will be stored. */
float quantize_row_q8(int8_t *q, uint8_t *scales, const float *w, int64_t C)
{
    float worst = 0.0f;
    for (int64_t b = 0; b < C / QBLOCK; b++) {
        const float *x = w + b * QBLOCK;
        float amax = 0.0f;
        for (int i = 0; i < QBLOCK; i++) amax = fmaxf(amax, fabsf(x[i]));
        uint16_t h = jm_f32_to_f16(amax / 127.0f);
        if (jm_f16_to_f32(h) * 127.0f < amax) h++; /* rounded down: the next F16 up, so nothing clamps */
        float d = jm_f16_to_f32(h), inv = d > 0 ? 1.0f / d : 0.0f;
        put_scale(scales + 2 * b, h);
        for (int i = 0; i < QBLOCK; i++) {
            float v = roundf(x[i] * inv);
            v = v > 127 ? 127 : v < -127 ? -127 : v;
            q[b * QBLOCK + i] = (int8_t)v;
            worst = fmaxf(worst, fabsf(x[i] - d * v));
        }
    }
    return worst;
}

/* int4 in [-8, 7]: the scale maps the value of largest magnitude to -8, so
 * all sixteen levels are used (the other side reaches 7/8 of it). */
float quantize_row_q4(uint8_t *q, uint8_t *scales, const float *w, int64_t C)
{
    float worst = 0.0f;
    for (int64_t b = 0; b < C / QBLOCK; b++) {
        const float *x = w + b * QBLOCK;
        float m = 0.0f;
        for (int i = 0; i < QBLOCK; i++)
            if (fabsf(x[i]) > fabsf(m)) m = x[i];
        uint16_t h = jm_f32_to_f16(m / -8.0f);
        if (fabsf(jm_f16_to_f32(h)) * 8.0f < fabsf(m)) h++; /* as in Q8: never let the extreme clamp */
        float d = jm_f16_to_f32(h), inv = d != 0 ? 1.0f / d : 0.0f;
        put_scale(scales + 2 * b, h);
        uint8_t *qb = q + b * (QBLOCK / 2);
        int v[QBLOCK];
        for (int i = 0; i < QBLOCK; i++) {
            float r = roundf(x[i] * inv);
            v[i] = r > 7 ? 7 : r < -8 ? -8 : (int)r;
            worst = fmaxf(worst, fabsf(x[i] - d * (float)v[i]));
        }
        for (int j = 0; j < QBLOCK / 2; j++) qb[j] = (uint8_t)((v[j] + 8) | (v[j + 16] + 8) << 4);
    }
    return worst;
}

void quantize_act_q8(int8_t *xq, float *xs, const float *x, int64_t C)
{
    const int64_t nb = C / QBLOCK;
    for (int64_t b = 0; b < nb; b++) {
        const float *v = x + b * QBLOCK;
        /* a comparison and rintf, not fmaxf and lrintf: gcc turns these into
         * vector instructions and those into library calls, per element (a
         * decode step quantizes its inputs 120 times: 3.8 ms of a 45 ms token
         * on the 8B layout's Q4, AMD EPYC family 26 model 2). The same values:
         * a NaN is skipped by both maxima, and rintf rounds as lrintf does. */
        float amax = 0.0f;
#pragma omp simd reduction(max : amax)
        for (int i = 0; i < QBLOCK; i++) {
            const float a = fabsf(v[i]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
        int sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < QBLOCK; i++) {
            const int q = (int)rintf(v[i] * inv);
            xq[b * QBLOCK + i] = (int8_t)q;
            sum += q;
        }
        xs[b] = d;
        xs[nb + b] = d * (float)sum;
    }
}

void round_act_bf16(uint16_t *xb, const float *x, int64_t n)
{
    /* jm_f32_to_bf16 with denormals flushed to signed zero; branch-free, so
     * that gcc vectorizes it */
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        const uint16_t zero = (uint16_t)(u >> 16 & 0x8000u), tiny = (u & 0x7f800000u) == 0;
        xb[i] = tiny ? zero : jm_f32_to_bf16(x[i]);
    }
}

/* ---- products ---- */

/* Scratch: up to `rows` input rows as the products take them, then one
 * WTILE x C fp32 tile per thread. The rows: int8 with block scales for
 * Q8/Q4's dot kernels (row m at byte m*C); for BF16, an expert's rows
 * rounded to bf16, in its own 4*C bytes a row (rows m0.. at byte 4*m0*C):
 * as bf16 for the dot kernels (C apart), as fp32 for SGEMM. */
static size_t round64(size_t n) { return (n + 63) & ~(size_t)63; }

static size_t act_bytes(int64_t rows, int64_t C, int bf16)
{
    return round64((size_t)rows * C * (bf16 ? sizeof(float) : 1)) +
           round64((size_t)rows * 2 * (C / QBLOCK) * sizeof(float));
}

size_t wmatmul_scratch_bytes(int64_t rows, int64_t C, int threads, int bf16)
{
    return act_bytes(rows, C, bf16) + (size_t)threads * WTILE * C * sizeof(float);
}

typedef struct {
    char *act; /* the input rows (see wmatmul_scratch_bytes) */
    float *xs; /* Q8/Q4's block scales */
    float *tiles;
} wscratch;

static wscratch carve_scratch(void *scratch, int64_t rows, int64_t C, int bf16)
{
    wscratch s;
    s.act = scratch;
    s.xs = (float *)((char *)scratch + round64((size_t)rows * C * (bf16 ? sizeof(float) : 1))); /* 64-aligned */
    s.tiles = (float *)((char *)scratch + act_bytes(rows, C, bf16));
    return s;
}

/* The inputs of the expert whose rows start at m0, as weights of type t
 * take them (NULL: F32, x itself). */
static const void *prepared_rows(wscratch s, wtype t, int64_t m0, int64_t C)
{
    if (!s.act || t == WT_F32) return NULL;
    return s.act + m0 * C * (t == WT_BF16 ? (int64_t)sizeof(float) : 1);
}

/* Row m of the expert whose rows start at m0 (x row m at x + m*C), as
 * weights of type t take it: BF16 rounded to bf16 (widened back to fp32
 * where the expert's rows go to SGEMM, `tiled`); Q8/Q4 quantized to int8
 * blocks for the dot kernels (prefill's tiles take x itself, as F32). */
static void prepare_row(wscratch s, wtype t, const float *x, int64_t m0, int64_t m, int64_t C, int tiled)
{
    if (t == WT_BF16) {
        char *rows = (char *)prepared_rows(s, t, m0, C);
        uint16_t *b = (uint16_t *)rows + (m - m0) * C;
        float *f = (float *)rows + (m - m0) * C;
        round_act_bf16(tiled ? (uint16_t *)f + C : b, x + m * C, C); /* tiled: into the row's upper half */
        for (int64_t i = 0; tiled && i < C; i++) f[i] = jm_bf16_to_f32(((uint16_t *)f)[C + i]); /* widened in place */
    } else if ((t == WT_Q8 || t == WT_Q4) && !tiled) {
        quantize_act_q8((int8_t *)s.act + m * C, s.xs + m * 2 * (C / QBLOCK), x + m * C, C);
    }
}

/* Input row m of grouped experts (offsets), prepared as its expert's
 * product takes it. */
static void prepare_input(wscratch s, wtype t, const float *x, const int64_t *offsets, int64_t m, int64_t C)
{
    int e = 0;
    while (offsets[e + 1] <= m) e++;
    prepare_row(s, t, x, offsets[e], m, C, offsets[e + 1] - offsets[e] > WSMALL_N);
}

/* Rows o0 .. o1-1 of W against the n input rows of the expert whose rows
 * start at m0 (x row m at x + m*C, prepared in s): out[r*ldo + o]. */
static void dot_rows(float *out, int64_t ldo, const float *x, wscratch s, int64_t m0, int64_t n, wview W, int64_t o0,
                     int64_t o1, int64_t C, const wkernels *K)
{
    wkernel_for(K, W.type)(out + o0, ldo, wview_rows(W, o0, C), o1 - o0, x + m0 * C, prepared_rows(s, W.type, m0, C),
                           W.type == WT_BF16 || !s.xs ? NULL : s.xs + m0 * 2 * (C / QBLOCK), n, C);
}

/* The tiled path: out (n, ldo) columns o0 .. o0+WTILE-1 = x (n, C) @ tile^T. */
static void gemm_tile(float *out, int64_t ldo, const float *x, int64_t n, wview W, int64_t o0, int64_t O, int64_t C,
                      float *tile)
{
    int64_t rows = O - o0 < WTILE ? O - o0 : WTILE;
    dequant_rows(tile, W, o0, rows, C);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)rows, (int)C, 1.0f, x, (int)C, tile, (int)C,
                0.0f, out + o0, (int)ldo);
}

/* A single matrix is a group of one expert owning every row. */
void wmatmul_forward(float *out, const float *inp, wview W, int64_t N, int64_t C, int64_t O, const wkernels *K,
                     void *scratch, jm_pool *pool)
{
    const int64_t offsets[2] = {0, N};
    wexperts_forward(out, inp, W, offsets, 1, C, O, K, scratch, pool);
}

/* Decoding: chunks of one active expert's weight rows, each against all of
 * that expert's (few) input rows: an eighth of a thread's share of the
 * product's bytes, between 16 KB (claiming one costs nothing next to reading
 * it; 2 threads share even a 64 KB matrix) and 256 KB. A thread gets the
 * chunks it claims at once as one run, read as one tile per expert: one
 * stream, its Q4 inputs prepared once. Against a call per chunk, bench/
 * products' 8-layer step at 2 threads went from 41.7-53.9 to 50.2-60.5 GB/s
 * (Q4) and 54.5-57.2 to 55.5-67.1 (Q8), alternated (AMD EPYC family 26
 * model 2); chunks of 8-64 KB (a finer end of the job) did no better, nor
 * 64 or 128 KB with the pool's shares (three rounds alternated). */
#define DECODE_CHUNK_MIN 16384
#ifndef DECODE_CHUNK_MAX
#define DECODE_CHUNK_MAX 262144
#endif

typedef struct {
    float *ys;
    const float *xs;
    wview W;
    const int64_t *offsets;
    int64_t C, O, rows, per_expert; /* weight rows per chunk, chunks per active expert */
    const int *active;
    wscratch s;
    const wkernels *K;
} decode_job;

/* A run of chunks: within each active expert it covers, one tile of
 * consecutive rows, read as one stream. */
static void product_run(void *ctx, int64_t first, int64_t count, int thread)
{
    (void)thread;
    const decode_job *j = ctx;
    const int64_t C = j->C, O = j->O, pe = j->per_expert;
    for (int64_t c = first, end = first + count; c < end;) {
        const int e = j->active[c / pe];
        const int64_t expert_end = (c / pe + 1) * pe, last = end < expert_end ? end : expert_end;
        const int64_t m0 = j->offsets[e], n = j->offsets[e + 1] - m0;
        const int64_t o0 = c % pe * j->rows, o_end = ((last - 1) % pe + 1) * j->rows, o1 = o_end < O ? o_end : O;
        dot_rows(j->ys + m0 * O, O, j->xs, j->s, m0, n, wview_rows(j->W, (int64_t)e * O, C), o0, o1, C, j->K);
        c = last;
    }
}

static void decode_products(float *ys, const float *xs, wview W, const int64_t *offsets, int E, int64_t C,
                            int64_t O, const wkernels *K, wscratch s, jm_pool *pool)
{
    int active[JM_MAX_EXPERTS], nact = 0;
    for (int e = 0; e < E; e++)
        if (offsets[e + 1] > offsets[e]) active[nact++] = e;
    const int64_t row_bytes = wview_bytes(W, WILV, C) / WILV;
    int64_t chunk = (int64_t)nact * O * row_bytes / (8 * (int64_t)(pool ? jm_pool_threads(pool) : 1));
    chunk = chunk < DECODE_CHUNK_MIN ? DECODE_CHUNK_MIN : chunk > DECODE_CHUNK_MAX ? DECODE_CHUNK_MAX : chunk;
    int64_t rows = (chunk / row_bytes + 7) & ~(int64_t)7; /* whole multi-row kernel passes */
    if (rows < 8) rows = 8; /* rows wider than a chunk (F32, C > 65536) */
    if (rows > O) rows = O;
    decode_job j = {ys, xs, W, offsets, C, O, rows, (O + rows - 1) / rows, active, s, K};
    jm_pool_run(pool, (int64_t)nact * j.per_expert, product_run, &j);
}

void wexperts_forward(float *ys, const float *xs, wview W, const int64_t *offsets, int E, int64_t C, int64_t O,
                      const wkernels *K, void *scratch, jm_pool *pool)
{
    int few = 1; /* every expert few enough rows for the dot kernels: decoding */
    for (int e = 0; e < E; e++) few &= offsets[e + 1] - offsets[e] <= WSMALL_N;
    if (pool && few && W.type == WT_F32) {
        decode_products(ys, xs, W, offsets, E, C, O, K, (wscratch){0}, pool);
        return;
    }
    if (W.type == WT_F32) {
        experts_forward(ys, xs, W.data, offsets, E, C, O);
        return;
    }
    const int64_t Nk = offsets[E], ntiles = (O + WTILE - 1) / WTILE;
    wscratch s = carve_scratch(scratch, Nk, C, W.type == WT_BF16);
    /* each row prepared once: a BF16 matrix used in place multiplies bf16
     * inputs, in the dot kernels and in prefill's tiles alike */
    if (pool || Nk <= WSMALL_N) { /* decoding: no OpenMP region (even one that does not fork costs ~1 us) */
        for (int64_t m = 0; m < Nk; m++) prepare_input(s, W.type, xs, offsets, m, C);
    } else {
#pragma omp parallel for schedule(static)
        for (int64_t m = 0; m < Nk; m++) prepare_input(s, W.type, xs, offsets, m, C);
    }
    if (pool && few) {
        decode_products(ys, xs, W, offsets, E, C, O, K, s, pool);
        return;
    }
    /* one work item per (expert, tile of WTILE weight rows): balanced however
     * the tokens fell, and every tile of every active expert is read once */
#pragma omp parallel for schedule(dynamic, 2)
    for (int64_t it = 0; it < (int64_t)E * ntiles; it++) {
        int e = (int)(it / ntiles);
        int64_t t = it % ntiles, m0 = offsets[e], n = offsets[e + 1] - m0;
        if (n == 0) continue;
        wview We = wview_rows(W, (int64_t)e * O, C);
        if (n <= WSMALL_N) {
            int64_t o1 = (t + 1) * WTILE < O ? (t + 1) * WTILE : O;
            dot_rows(ys + m0 * O, O, xs, s, m0, n, We, t * WTILE, o1, C, K);
        } else {
            gemm_tile(ys + m0 * O, O, W.type == WT_BF16 ? prepared_rows(s, W.type, m0, C) : xs + m0 * C, n, We,
                      t * WTILE, O, C,
                      s.tiles + (int64_t)omp_get_thread_num() * WTILE * C);
        }
    }
}
