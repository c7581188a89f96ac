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

/* ---- AVX-512 (F, BW, VL) with VNNI ----
 * Real tiles rather than dots: a pass takes RMAX weight rows at once against
 * up to NMAX inputs, so each activation load and its preparation (permutes,
 * block sums) serves every row, and each weight load serves every input
 * while it is in a register. Tails (C not a multiple of the vector, or of
 * 16 blocks) go through the same loop with masked loads: the lanes masked
 * off read nothing and hold zeros, which add nothing. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define INLINE inline __attribute__((always_inline))
#ifndef RMAX
#define RMAX 4
#endif
#ifndef NMAX
#define NMAX 4
#endif
#ifndef AVX512_PF_ROWS
#define AVX512_PF_ROWS 8
#endif
#ifndef AVX512_PF_CLAMP
#define AVX512_PF_CLAMP 0
#endif

/* Prefetch of the weights `pf` bytes on (0: none), one per 64 bytes a row's
 * stream consumes. */
AVX512 static INLINE void prefetch_ahead(const void *p, int64_t pf)
{
    if (pf) _mm_prefetch((const char *)((uintptr_t)p + (uintptr_t)pf), _MM_HINT_T0);
}

/* The first k lanes (none when k <= 0). */
static INLINE __mmask16 mask16(int64_t k) { return k >= 16 ? 0xffff : k <= 0 ? 0 : (__mmask16)((1u << k) - 1); }
static INLINE __mmask32 mask32(int64_t k) { return k >= 32 ? 0xffffffffu : k <= 0 ? 0 : (1u << k) - 1; }
static INLINE __mmask64 mask64(int64_t k) { return k >= 64 ? ~(__mmask64)0 : k <= 0 ? 0 : ((__mmask64)1 << k) - 1; }

/* Loads of up to a vector's worth: whole vectors unmasked (a masked load
 * that misses the caches was measured to stall the stream: 6 GB/s instead
 * of 30 here), the tail masked. */
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

/* F32: one FMA per 16 weights and input. */
AVX512 static INLINE void f32_pass(float *out, int64_t ldo, const float *w, const float *x, const int R, const int NI,
                                   int64_t C, int64_t pf)
{
    __m512 acc[RMAX][4];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NI; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < C; i += 16) {
        __m512 xv[4];
        for (int j = 0; j < NI; j++) xv[j] = load_f32(x + j * C + i, C - i);
        for (int r = 0; r < R; r++) {
            prefetch_ahead(w + r * C + i, pf);
            __m512 wv = load_f32(w + r * C + i, C - i);
            for (int j = 0; j < NI; j++) acc[r][j] = _mm512_fmadd_ps(wv, xv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NI; j++) out[j * ldo + r] = _mm512_reduce_add_ps(acc[r][j]);
}

/* BF16 widened exactly: a bf16 is the top half of an fp32, so of 32 weights
 * (one load) the even ones are the 32-bit lanes shifted left by 16 and the odd
 * ones the lanes with the low half cleared. The inputs are split into their
 * even and odd elements to match (two permutes per input, shared by the rows).
 * vdpbf16ps (AVX-512 BF16) multiplies bf16 by bf16, so fp32 inputs would
 * have to be split into three bf16 terms to keep fp32 accuracy (two leave
 * 2^-16 |x|), three of its products per weight: measured at half the speed
 * of this in L2 (41 against 80 GB/s at n = 1, 13 against 34 at n = 4). */
AVX512 static INLINE void bf16_pass(float *out, int64_t ldo, const uint8_t *w, const float *x, const int R,
                                    const int NI, int64_t C, int64_t pf)
{
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000u);
    __m512 acc[RMAX][4];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NI; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < C; i += 32) {
        __m512 xe[4], xo[4];
        for (int j = 0; j < NI; j++) {
            __m512 x0 = load_f32(x + j * C + i, C - i);
            __m512 x1 = load_f32(x + j * C + i + 16, C - i - 16);
            xe[j] = _mm512_permutex2var_ps(x0, even, x1);
            xo[j] = _mm512_permutex2var_ps(x0, odd, x1);
        }
        for (int r = 0; r < R; r++) {
            const uint8_t *wr = w + 2 * (r * C + i);
            prefetch_ahead(wr, pf);
            __m512i v = load_i16(wr, C - i);
            __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi16));
            for (int j = 0; j < NI; j++) acc[r][j] = _mm512_fmadd_ps(wo, xo[j], _mm512_fmadd_ps(we, xe[j], acc[r][j]));
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NI; j++) out[j * ldo + r] = _mm512_reduce_add_ps(acc[r][j]);
}

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
 * Exact for every int8 w and x: no intermediate saturates. k: bytes left. */
AVX512 static INLINE void q8_group(__m512 acc[RMAX][4], __m512 s[RMAX][4], __m512i idx, const int8_t *w,
                                   int64_t row, const int8_t *xq, int64_t C, int64_t k, const int R, const int NI,
                                   int64_t pf)
{
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    __m512i xv[4], c[4];
    for (int j = 0; j < NI; j++) {
        xv[j] = load_i8(xq + j * C, k);
        c[j] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, flip, xv[j]));
    }
    for (int r = 0; r < R; r++) {
        prefetch_ahead(w + r * row, pf);
        __m512i wu = _mm512_xor_si512(load_i8(w + r * row, k), flip);
        for (int j = 0; j < NI; j++) {
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
 * -8 * sum(x), so that it is sum((nibble - 8) x), exact. k: blocks left. */
AVX512 static INLINE void q4_group(__m512 acc[RMAX][4], __m512 s[RMAX][4], __m512i idx, const uint8_t *w,
                                   int64_t row, const int8_t *xq, int64_t C, int64_t k, const int R, const int NI,
                                   int64_t pf)
{
    const __m512i low4 = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8), zero = _mm512_setzero_si512();
    __m512i xlo[4], xhi[4], c[4];
    for (int j = 0; j < NI; j++) {
        __m512i x0 = load_i8(xq + j * C, 32 * k), x1 = load_i8(xq + j * C + 64, 32 * (k - 2));
        xlo[j] = _mm512_shuffle_i64x2(x0, x1, 0x88); /* lanes 0, 2 of each: the blocks' first halves */
        xhi[j] = _mm512_shuffle_i64x2(x0, x1, 0xdd);
        __m512i sum8 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, eight, xlo[j]), eight, xhi[j]);
        c[j] = _mm512_sub_epi32(zero, sum8);
    }
    for (int r = 0; r < R; r++) {
        prefetch_ahead(w + r * row, pf);
        __m512i v = load_i8(w + r * row, 16 * k);
        __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int j = 0; j < NI; j++) {
            __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c[j], lo, xlo[j]), hi, xhi[j]);
            acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx, s[r][j]), acc[r][j]);
        }
    }
}

/* Q8 or Q4 rows, in steps of 16 blocks: the steps' 16 scale products per
 * (row, input), then the groups of blocks one vector of weights holds. */
AVX512 static INLINE void int8_pass(wtype t, float *out, int64_t ldo, const uint8_t *w, const uint8_t *ws,
                                    const int8_t *xq, const float *xs, const int R, const int NI, int64_t C,
                                    int64_t pf)
{
    const int64_t nb = C / QBLOCK, row = wtype_row_bytes(t, C);
    const int per = t == WT_Q8 ? 2 : 4; /* blocks per vector */
    /* lane -> block of the group */
    const __m512i lanes = t == WT_Q8 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                     : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[RMAX][4];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NI; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 16) {
        const int64_t nblk = nb - b < 16 ? nb - b : 16;
        __m512 s[RMAX][4], xd[4];
        for (int j = 0; j < NI; j++) xd[j] = load_f32(xs + j * 2 * nb + b, nblk);
        for (int r = 0; r < R; r++) {
            __m512 wd = _mm512_cvtph_ps(load_f16x16(ws + r * 2 * nb + 2 * b, nblk));
            for (int j = 0; j < NI; j++) s[r][j] = _mm512_mul_ps(wd, xd[j]);
        }
        __m512i idx = lanes;
        for (int64_t g = 0; g < nblk; g += per, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(per))) {
            const int64_t e = (b + g) * QBLOCK; /* the group's first input */
            if (t == WT_Q8) q8_group(acc, s, idx, (const int8_t *)w + e, row, xq + e, C, 32 * (nblk - g), R, NI, pf);
            else q4_group(acc, s, idx, w + e / 2, row, xq + e, C, nblk - g, R, NI, pf);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NI; j++) out[j * ldo + r] = _mm512_reduce_add_ps(acc[r][j]);
}

/* The passes with constant R and NI (so their loops unroll and the
 * accumulators live in registers): RMAX rows at a time, then single rows;
 * the inputs in chunks of up to NMAX. */
typedef struct {
    const uint8_t *w, *ws;
    const float *x;
    const int8_t *xq;
    const float *xs;
    int64_t C, pf;
} pass_args;

AVX512 static INLINE void pass(wtype t, float *out, int64_t ldo, const pass_args *a, const int R, const int NI)
{
    switch (t) {
    case WT_F32: f32_pass(out, ldo, (const float *)a->w, a->x, R, NI, a->C, a->pf); break;
    case WT_BF16: bf16_pass(out, ldo, a->w, a->x, R, NI, a->C, a->pf); break;
    case WT_Q8:
    case WT_Q4: int8_pass(t, out, ldo, a->w, a->ws, a->xq, a->xs, R, NI, a->C, a->pf); break;
    }
}

AVX512 static INLINE void pass_rows(wtype t, float *out, int64_t ldo, const pass_args *a, int R, int NI)
{
    switch ((R == RMAX) * 8 + NI) {
    case 8 + 1: pass(t, out, ldo, a, RMAX, 1); break;
    case 8 + 2: pass(t, out, ldo, a, RMAX, 2); break;
    case 8 + 3: pass(t, out, ldo, a, RMAX, 3); break;
    case 8 + 4: pass(t, out, ldo, a, RMAX, 4); break;
    case 1: pass(t, out, ldo, a, 1, 1); break;
    case 2: pass(t, out, ldo, a, 1, 2); break;
    case 3: pass(t, out, ldo, a, 1, 3); break;
    case 4: pass(t, out, ldo, a, 1, 4); break;
    }
}

AVX512 static INLINE void tile_rows(wtype t, float *out, int64_t ldo, wview w, int64_t nrows, const float *x,
                                    const int8_t *xq, const float *xs, int64_t n, int64_t C)
{
    const int64_t row = wtype_row_bytes(t, C), srow = 2 * (C / QBLOCK), xrow = 2 * (C / QBLOCK);
    for (int64_t i = 0; i < nrows;) {
        const int R = nrows - i >= RMAX ? RMAX : 1;
        const int64_t pf = AVX512_PF_CLAMP && i + R + AVX512_PF_ROWS > nrows ? 0 : AVX512_PF_ROWS * row;
        for (int64_t r = 0; r < n; r += NMAX) {
            pass_args a = {(const uint8_t *)w.data + i * row, w.scales ? w.scales + i * srow : NULL,
                           x ? x + r * C : NULL, xq ? xq + r * C : NULL, xs ? xs + r * xrow : NULL, C, pf};
            pass_rows(t, out + r * ldo + i, ldo, &a, R, n - r < NMAX ? (int)(n - r) : NMAX);
        }
        i += R;
    }
}

AVX512 static void tile_f32_avx512(float *out, int64_t ldo, wview w, int64_t nrows, const float *x,
                                   const int8_t *xq, const float *xs, int64_t n, int64_t C)
{
    tile_rows(WT_F32, out, ldo, w, nrows, x, xq, xs, n, C);
}
AVX512 static void tile_bf16_avx512(float *out, int64_t ldo, wview w, int64_t nrows, const float *x,
                                    const int8_t *xq, const float *xs, int64_t n, int64_t C)
{
    tile_rows(WT_BF16, out, ldo, w, nrows, x, xq, xs, n, C);
}
AVX512 static void tile_q8_avx512(float *out, int64_t ldo, wview w, int64_t nrows, const float *x,
                                  const int8_t *xq, const float *xs, int64_t n, int64_t C)
{
    tile_rows(WT_Q8, out, ldo, w, nrows, x, xq, xs, n, C);
}
AVX512 static void tile_q4_avx512(float *out, int64_t ldo, wview w, int64_t nrows, const float *x,
                                  const int8_t *xq, const float *xs, int64_t n, int64_t C)
{
    tile_rows(WT_Q4, out, ldo, w, nrows, x, xq, xs, n, C);
}

static const wkernels kernels_avx512 = {"avx512", tile_f32_avx512, tile_bf16_avx512, tile_q8_avx512,
                                        tile_q4_avx512};

#endif

/* ---- choosing a set ---- */

/* The CPU features the sets need, as bits. */
enum {
    F_X86 = 1, /* an x86 build: never set elsewhere */
    F_AVX2 = 2,
    F_FMA = 4,
    F_F16C = 8,
    F_AVX512F = 16,
    F_AVX512BW = 32,
    F_AVX512VL = 64,
    F_AVX512VNNI = 128,
};
static const struct {
    unsigned bit;
    const char *label;
} feature_labels[] = {{F_X86, "x86-64"},         {F_AVX2, "AVX2"},         {F_FMA, "FMA"},
                      {F_F16C, "F16C"},          {F_AVX512F, "AVX-512F"},  {F_AVX512BW, "AVX-512BW"},
                      {F_AVX512VL, "AVX-512VL"}, {F_AVX512VNNI, "AVX-512 VNNI"}};

static unsigned cpu_features(void)
{
#ifdef JM_X86
    __builtin_cpu_init();
    return F_X86 | (__builtin_cpu_supports("avx2") ? F_AVX2 : 0) | (__builtin_cpu_supports("fma") ? F_FMA : 0) |
           (__builtin_cpu_supports("f16c") ? F_F16C : 0) | (__builtin_cpu_supports("avx512f") ? F_AVX512F : 0) |
           (__builtin_cpu_supports("avx512bw") ? F_AVX512BW : 0) |
           (__builtin_cpu_supports("avx512vl") ? F_AVX512VL : 0) |
           (__builtin_cpu_supports("avx512vnni") ? F_AVX512VNNI : 0);
#else
    return 0;
#endif
}

/* Every set by name, best first (the order "auto" tries them in). */
static const struct {
    const char *name;
    unsigned needs;
    const wkernels *set;
} sets[] = {
#ifdef JM_X86
    {"avx512", F_X86 | F_AVX512F | F_AVX512BW | F_AVX512VL | F_AVX512VNNI, &kernels_avx512},
    {"avx2", F_X86 | F_AVX2 | F_FMA | F_F16C, &kernels_avx2},
#else
    {"avx512", F_X86, NULL},
    {"avx2", F_X86, NULL},
#endif
    {"portable", 0, &kernels_portable},
};

const wkernels *wkernels_get(const char *name)
{
    const unsigned have = cpu_features();
    const int any = strcmp(name, "auto") == 0;
    for (size_t i = 0; i < sizeof sets / sizeof *sets; i++)
        if ((any || strcmp(name, sets[i].name) == 0) && (sets[i].needs & ~have) == 0) return sets[i].set;
    return NULL;
}

int wkernels_missing(const char *name, char *buf, size_t cap)
{
    const unsigned have = cpu_features();
    for (size_t i = 0; i < sizeof sets / sizeof *sets; i++) {
        if (strcmp(name, sets[i].name) != 0) continue;
        size_t len = 0;
        if (cap) buf[0] = 0;
        for (size_t f = 0; f < sizeof feature_labels / sizeof *feature_labels; f++)
            if ((sets[i].needs & ~have & feature_labels[f].bit) && len < cap)
                len += (size_t)snprintf(buf + len, cap - len, "%s%s", len ? ", " : "", feature_labels[f].label);
        return 0;
    }
    return -1;
}
