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
 * int32. */
#include "ops.h"
#include "base/base.h"

#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define JM_X86 1
#endif

/* ---- portable kernels: the reference for the SIMD ones ---- */

static float dot_f32_c(const float *w, const float *x, int64_t C)
{
    float acc = 0.0f;
    for (int64_t i = 0; i < C; i++) acc += w[i] * x[i];
    return acc;
}

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
        acc += wscale_at(ws, b) * xs[b] * (float)s;
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
        acc += wscale_at(ws, b) * xs[b] * (float)s;
    }
    return acc;
}


/* A tile from a one-row dot: each weight row against the n inputs in turn,
 * so the row stays in L1 while the inputs reuse it. */
#define TILES_FROM_DOTS(set, f32, bf16, q8, q4)                                                                     \
    static void tile_f32_##set(float *out, int64_t ldo, wview w, int64_t nrows, const float *x, const int8_t *xq,   \
                               const float *xs, int64_t n, int64_t C)                                               \
    {                                                                                                               \
        (void)xq, (void)xs;                                                                                         \
        for (int64_t i = 0; i < nrows; i++)                                                                         \
            for (int64_t r = 0; r < n; r++) out[r * ldo + i] = f32((const float *)w.data + i * C, x + r * C, C);  \
    }                                                                                                               \
    static void tile_bf16_##set(float *out, int64_t ldo, wview w, int64_t nrows, const float *x, const int8_t *xq,  \
                                const float *xs, int64_t n, int64_t C)                                              \
    {                                                                                                               \
        (void)xq, (void)xs;                                                                                         \
        for (int64_t i = 0; i < nrows; i++)                                                                         \
            for (int64_t r = 0; r < n; r++)                                                                         \
                out[r * ldo + i] = bf16((const uint8_t *)w.data + i * 2 * C, x + r * C, C);                        \
    }                                                                                                               \
    static void tile_q8_##set(float *out, int64_t ldo, wview w, int64_t nrows, const float *x, const int8_t *xq,    \
                              const float *xs, int64_t n, int64_t C)                                                \
    {                                                                                                               \
        (void)x;                                                                                                    \
        const int64_t nb = C / QBLOCK;                                                                              \
        for (int64_t i = 0; i < nrows; i++)                                                                         \
            for (int64_t r = 0; r < n; r++)                                                                         \
                out[r * ldo + i] = q8((const int8_t *)w.data + i * C, w.scales + i * 2 * nb, xq + r * C,            \
                                      xs + r * 2 * nb, C);                                                          \
    }                                                                                                               \
    static void tile_q4_##set(float *out, int64_t ldo, wview w, int64_t nrows, const float *x, const int8_t *xq,    \
                              const float *xs, int64_t n, int64_t C)                                                \
    {                                                                                                               \
        (void)x;                                                                                                    \
        const int64_t nb = C / QBLOCK;                                                                              \
        for (int64_t i = 0; i < nrows; i++)                                                                         \
            for (int64_t r = 0; r < n; r++)                                                                         \
                out[r * ldo + i] = q4((const uint8_t *)w.data + i * C / 2, w.scales + i * 2 * nb, xq + r * C,       \
                                      xs + r * 2 * nb, C);                                                          \
    }

TILES_FROM_DOTS(c, dot_f32_c, dot_bf16_c, dot_q8_c, dot_q4_c)
static const wkernels kernels_portable = {"portable", tile_f32_c, tile_bf16_c, tile_q8_c, tile_q4_c};

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

AVX2 static float dot_f32_avx2(const float *w, const float *x, int64_t C)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= C; i += 32) {
        _mm_prefetch(ahead(w + i), _MM_HINT_T0);
        _mm_prefetch(ahead(w + i + 16), _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= C; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float acc = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    return acc + dot_f32_c(w + i, x + i, C - i);
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


TILES_FROM_DOTS(avx2, dot_f32_avx2, dot_bf16_avx2, dot_q8_avx2, dot_q4_avx2)
static const wkernels kernels_avx2 = {"avx2", tile_f32_avx2, tile_bf16_avx2, tile_q8_avx2, tile_q4_avx2};

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

