/* qmatmul.c — products with weights as the checkpoint stores them (BF16, and
 * the blockwise Q8/Q4 of `jetmoe quantize`), for inference.
 *
 * Decoding one token reads every active weight once and does two flops per
 * weight: it is bound by memory bandwidth, so the kernels' job is to keep up
 * with it (about 3-4 weights per cycle per core here) while reading as few
 * bytes as possible. No library does products on these block formats, so the
 * dot products are written by hand: a portable C version, the reference any
 * CPU runs, and an AVX2+FMA+F16C version chosen at run time. Q8/Q4 multiply
 * int8 activations (quantized per block of 32, fp32 scale) with integer
 * multiply-adds, summing each block exactly in int32. Prefill has many rows
 * per weight and is compute bound instead: it dequantizes tiles of weights to
 * fp32 and hands them to SGEMM.
 *
 * (AVX-512 BF16/VNNI versions would slot into the same table; this machine
 * has no AVX-512 to test them on, so there are none yet.) */
#include "ops.h"
#include "base/base.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define JM_X86 1
#endif

static inline float scale_at(const uint8_t *s, int64_t b)
{
    return jm_f16_to_f32((uint16_t)(s[2 * b] | s[2 * b + 1] << 8));
}

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
    w.data = (const uint8_t *)w.data + rows * wtype_row_bytes(w.type, C);
    if (w.scales) w.scales += rows * (C / QBLOCK) * 2;
    return w;
}

void dequant_rows(float *out, wview W, int64_t row0, int64_t nrows, int64_t C)
{
    W = wview_rows(W, row0, C);
    const int64_t nb = C / QBLOCK;
    for (int64_t r = 0; r < nrows; r++) {
        float *o = out + r * C;
        switch (W.type) {
        case WT_F32:
            memcpy(o, (const float *)W.data + r * C, (size_t)C * sizeof(float));
            break;
        case WT_BF16: {
            const uint8_t *w = (const uint8_t *)W.data + r * 2 * C;
            for (int64_t i = 0; i < C; i++) {
                uint32_t u = (uint32_t)(w[2 * i] | w[2 * i + 1] << 8) << 16;
                memcpy(&o[i], &u, 4);
            }
            break;
        }
        case WT_Q8: {
            const int8_t *q = (const int8_t *)W.data + r * C;
            for (int64_t b = 0; b < nb; b++) {
                float d = scale_at(W.scales, r * nb + b);
                for (int i = 0; i < QBLOCK; i++) o[b * QBLOCK + i] = d * q[b * QBLOCK + i];
            }
            break;
        }
        case WT_Q4: {
            const uint8_t *q = (const uint8_t *)W.data + r * C / 2;
            for (int64_t b = 0; b < nb; b++) {
                float d = scale_at(W.scales, r * nb + b);
                const uint8_t *qb = q + b * (QBLOCK / 2);
                for (int j = 0; j < QBLOCK / 2; j++) {
                    o[b * QBLOCK + j] = d * (float)((qb[j] & 15) - 8);
                    o[b * QBLOCK + j + 16] = d * (float)((qb[j] >> 4) - 8);
                }
            }
            break;
        }
        }
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
        float amax = 0.0f;
#pragma omp simd reduction(max : amax)
        for (int i = 0; i < QBLOCK; i++) amax = fmaxf(amax, fabsf(v[i]));
        float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
        int sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < QBLOCK; i++) {
            xq[b * QBLOCK + i] = (int8_t)lrintf(v[i] * inv);
            sum += xq[b * QBLOCK + i];
        }
        xs[b] = d;
        xs[nb + b] = d * (float)sum;
    }
}

/* ---- portable kernels: the reference for the SIMD ones ---- */

static float dot_bf16_c(const uint8_t *w, const float *x, int64_t C)
{
    float acc = 0.0f;
    for (int64_t i = 0; i < C; i++) {
        uint32_t u = (uint32_t)(w[2 * i] | w[2 * i + 1] << 8) << 16;
        float f;
        memcpy(&f, &u, 4);
        acc += f * x[i];
    }
    return acc;
}

static float dot_q8_c(const int8_t *w, const uint8_t *ws, const int8_t *xq, const float *xs, int64_t C)
{
    float acc = 0.0f;
    for (int64_t b = 0; b < C / QBLOCK; b++) {
        int32_t s = 0;
        for (int i = 0; i < QBLOCK; i++) s += (int32_t)w[b * QBLOCK + i] * xq[b * QBLOCK + i];
        acc += scale_at(ws, b) * xs[b] * (float)s;
    }
    return acc;
}

static float dot_q4_c(const uint8_t *w, const uint8_t *ws, const int8_t *xq, const float *xs, int64_t C)
{
    float acc = 0.0f;
    for (int64_t b = 0; b < C / QBLOCK; b++) {
        const uint8_t *qb = w + b * (QBLOCK / 2);
        const int8_t *x = xq + b * QBLOCK;
        int32_t s = 0;
        for (int j = 0; j < QBLOCK / 2; j++) s += ((qb[j] & 15) - 8) * x[j] + ((qb[j] >> 4) - 8) * x[j + 16];
        acc += scale_at(ws, b) * xs[b] * (float)s;
    }
    return acc;
}

static const wkernels kernels_portable = {"portable", dot_bf16_c, dot_q8_c, dot_q4_c};

/* ---- AVX2 + FMA + F16C ---- */
#ifdef JM_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 4096 /* ahead of the stream: measured best of 256..8192 here */
#endif
/* The address PREFETCH_BYTES on (past the end near a row's end: a prefetch
 * never faults, and going through an integer keeps the arithmetic defined). */
static inline const char *ahead(const void *p) { return (const char *)((uintptr_t)p + PREFETCH_BYTES); }

AVX2 static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static inline __m256 bf16x8(const uint8_t *p)
{
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AVX2 static float dot_bf16_avx2(const uint8_t *w, const float *x, int64_t C)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= C; i += 32) {
        _mm_prefetch(ahead(w + 2 * i), _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(bf16x8(w + 2 * i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(bf16x8(w + 2 * i + 16), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(bf16x8(w + 2 * i + 32), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(bf16x8(w + 2 * i + 48), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= C; i += 8) a0 = _mm256_fmadd_ps(bf16x8(w + 2 * i), _mm256_loadu_ps(x + i), a0);
    float acc = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    return acc + dot_bf16_c(w + 2 * i, x + i, C - i);
}

/* Both int8 kernels work on 8 blocks at a time: their 8 F16 scales convert
 * in one instruction and are multiplied by the activations' scales into a
 * small table, from which each block's sum is scaled with a broadcast load.
 * A block's 32 products go through maddubs (unsigned x signed bytes -> int16
 * pairs) and madd (-> int32 lanes). */
AVX2 static inline float f16_scalar(const uint8_t *s, int64_t b)
{
    return _cvtsh_ss((unsigned short)(s[2 * b] | s[2 * b + 1] << 8));
}

AVX2 static inline __m256 scales8(const uint8_t *ws, const float *xd, int64_t b)
{
    return _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ws + 2 * b))), _mm256_loadu_ps(xd + b));
}

AVX2 static inline __m256i sum_pairs(__m256i prod16) { return _mm256_madd_epi16(prod16, _mm256_set1_epi16(1)); }

/* Q8: maddubs wants one unsigned operand: |w| times x carrying w's sign is
 * the same product. No pair saturates int16: |w| <= 128, |x| <= 127. */
AVX2 static inline __m256i block_q8(const int8_t *w, const int8_t *x)
{
    __m256i wv = _mm256_loadu_si256((const __m256i *)w), xv = _mm256_loadu_si256((const __m256i *)x);
    return sum_pairs(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)));
}

/* Q4: the nibbles (0..15, low = elements 0-15, high = 16-31) are the unsigned
 * operand as they are; the -8 offset is taken off once per block through the
 * activations' block sums: sum (n - 8) x = sum n x - 8 sum x. */
AVX2 static inline __m256i block_q4(const uint8_t *w, const int8_t *x)
{
    __m128i b = _mm_loadu_si128((const __m128i *)w);
    __m256i n = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(15));
    return sum_pairs(_mm256_maddubs_epi16(n, _mm256_loadu_si256((const __m256i *)x)));
}

AVX2 static float dot_q8_avx2(const int8_t *w, const uint8_t *ws, const int8_t *xq, const float *xs, int64_t C)
{
    const int64_t nb = C / QBLOCK;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        float s[8];
        _mm256_storeu_ps(s, scales8(ws, xs, b));
        for (int j = 0; j < 8; j += 2) {
            _mm_prefetch(ahead(w + (b + j) * 32), _MM_HINT_T0);
            __m256i p0 = block_q8(w + (b + j) * 32, xq + (b + j) * 32);
            __m256i p1 = block_q8(w + (b + j + 1) * 32, xq + (b + j + 1) * 32);
            acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(&s[j]), _mm256_cvtepi32_ps(p0), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(&s[j + 1]), _mm256_cvtepi32_ps(p1), acc1);
        }
    }
    for (; b < nb; b++) {
        __m256 sc = _mm256_set1_ps(f16_scalar(ws, b) * xs[b]);
        acc0 = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(block_q8(w + b * 32, xq + b * 32)), acc0);
    }
    return hsum8(_mm256_add_ps(acc0, acc1));
}

AVX2 static float dot_q4_avx2(const uint8_t *w, const uint8_t *ws, const int8_t *xq, const float *xs, int64_t C)
{
    const int64_t nb = C / QBLOCK;
    const float *xsum = xs + nb;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, off = acc0;
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ws + 2 * b)));
        float s[8];
        _mm256_storeu_ps(s, _mm256_mul_ps(dw, _mm256_loadu_ps(xs + b)));
        off = _mm256_fmadd_ps(dw, _mm256_loadu_ps(xsum + b), off);
        _mm_prefetch(ahead(w + b * 16), _MM_HINT_T0);
        _mm_prefetch(ahead(w + b * 16 + 64), _MM_HINT_T0);
        for (int j = 0; j < 8; j += 2) {
            __m256i p0 = block_q4(w + (b + j) * 16, xq + (b + j) * 32);
            __m256i p1 = block_q4(w + (b + j + 1) * 16, xq + (b + j + 1) * 32);
            acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(&s[j]), _mm256_cvtepi32_ps(p0), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(&s[j + 1]), _mm256_cvtepi32_ps(p1), acc1);
        }
    }
    float tail = 0.0f;
    for (; b < nb; b++) {
        float dw = f16_scalar(ws, b);
        __m256 sc = _mm256_set1_ps(dw * xs[b]);
        acc0 = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(block_q4(w + b * 16, xq + b * 32)), acc0);
        tail += dw * xsum[b];
    }
    return hsum8(_mm256_add_ps(acc0, acc1)) - 8.0f * (hsum8(off) + tail);
}

static const wkernels kernels_avx2 = {"avx2", dot_bf16_avx2, dot_q8_avx2, dot_q4_avx2};

static int cpu_has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

const wkernels *wkernels_get(const char *name)
{
    if (strcmp(name, "portable") == 0) return &kernels_portable;
#ifdef JM_X86
    if (strcmp(name, "avx2") == 0 || strcmp(name, "auto") == 0)
        return cpu_has_avx2() ? &kernels_avx2 : strcmp(name, "auto") == 0 ? &kernels_portable : NULL;
#else
    if (strcmp(name, "auto") == 0) return &kernels_portable;
#endif
    return NULL;
}

/* ---- products ---- */

/* Scratch: int8 copies of up to `rows` input rows with their block scales,
 * then one WTILE x C fp32 tile per thread. */
static size_t round64(size_t n) { return (n + 63) & ~(size_t)63; }

size_t wmatmul_scratch_bytes(int64_t rows, int64_t C, int threads)
{
    size_t act = round64((size_t)rows * C) + round64((size_t)rows * 2 * (C / QBLOCK) * sizeof(float));
    return act + (size_t)threads * WTILE * C * sizeof(float);
}

typedef struct {
    int8_t *xq;
    float *xs;
    float *tiles;
} wscratch;

static wscratch carve_scratch(void *scratch, int64_t rows, int64_t C)
{
    wscratch s;
    size_t q = round64((size_t)rows * C), act = q + round64((size_t)rows * 2 * (C / QBLOCK) * sizeof(float));
    s.xq = scratch;
    s.xs = (float *)((char *)scratch + q); /* 64-byte aligned, as every region */
    s.tiles = (float *)((char *)scratch + act);
    return s;
}

/* Rows o0 .. o1-1 of W against n input rows (x row r at x + r*C, quantized at
 * xq + r*C): out[r*ldo + o]. The weight row stays in L1 across the n inputs. */
static void dot_rows(float *out, int64_t ldo, const float *x, const int8_t *xq, const float *xs, int64_t n, wview W,
                     int64_t o0, int64_t o1, int64_t C, const wkernels *K)
{
    const int64_t nb = C / QBLOCK;
    for (int64_t o = o0; o < o1; o++) {
        wview w = wview_rows(W, o, C);
        for (int64_t r = 0; r < n; r++) {
            float v;
            switch (W.type) {
            case WT_BF16: v = K->dot_bf16(w.data, x + r * C, C); break;
            case WT_Q8: v = K->dot_q8(w.data, w.scales, xq + r * C, xs + r * 2 * nb, C); break;
            case WT_Q4: v = K->dot_q4(w.data, w.scales, xq + r * C, xs + r * 2 * nb, C); break;
            default: v = cblas_sdot((int)C, w.data, 1, x + r * C, 1); break;
            }
            out[r * ldo + o] = v;
        }
    }
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

static int is_int8(wtype t) { return t == WT_Q8 || t == WT_Q4; }

/* A single matrix is a group of one expert owning every row. */
void wmatmul_forward(float *out, const float *inp, wview W, int64_t N, int64_t C, int64_t O, const wkernels *K,
                     void *scratch)
{
    const int64_t offsets[2] = {0, N};
    wexperts_forward(out, inp, W, offsets, 1, C, O, K, scratch);
}

void wexperts_forward(float *ys, const float *xs, wview W, const int64_t *offsets, int E, int64_t C, int64_t O,
                      const wkernels *K, void *scratch)
{
    if (W.type == WT_F32) {
        experts_forward(ys, xs, W.data, offsets, E, C, O);
        return;
    }
    const int64_t Nk = offsets[E], ntiles = (O + WTILE - 1) / WTILE, nb = C / QBLOCK;
    wscratch s = carve_scratch(scratch, Nk, C);
    /* the rows of experts small enough for the dot kernels, quantized once */
    if (is_int8(W.type))
        for (int e = 0; e < E; e++)
            if (offsets[e + 1] - offsets[e] <= WSMALL_N)
                for (int64_t m = offsets[e]; m < offsets[e + 1]; m++)
                    quantize_act_q8(s.xq + m * C, s.xs + m * 2 * nb, xs + m * C, C);
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
            dot_rows(ys + m0 * O, O, xs + m0 * C, s.xq + m0 * C, s.xs + m0 * 2 * nb, n, We, t * WTILE, o1, C, K);
        } else {
            gemm_tile(ys + m0 * O, O, xs + m0 * C, n, We, t * WTILE, O, C,
                      s.tiles + (int64_t)omp_get_thread_num() * WTILE * C);
        }
    }
}
