/* akernels.c — the kernels of decode attention over the KV cache (fp32 or
 * bf16), one per instruction set (the tables are wkernels.c's, chosen at
 * run time):
 *   att_scores: S[s][i] = scale * <q_s, K_i>   (query slots s, keys i)
 *   att_values: o_s = sum_i P[s][i] V_i        (overwrites o)
 * for the nq query slots of one KV head against its n cached rows.
 *
 * A step of JetMoE-8B at 512 cached positions reads 100 MB of bf16 K and V
 * and does two FMAs per value read (top-2 slots share each KV head), so done
 * well this is bound by memory like the weights. Widening the cache to fp32
 * into a buffer, then dot products with a horizontal sum per key, took 7 ms
 * a step at one thread (14 GB/s, 35% of a plain read), bound by those extra
 * instructions. Here each cached row is widened in registers as it is
 * loaded (a bf16 is the top half of an fp32: of 32 values, the even ones
 * are the 32-bit lanes shifted left by 16, the odd ones the lanes with the
 * low half cleared), against query slots split to match into their even
 * and odd elements once per call (an fp32 row needs no widening: its
 * "halves" are the first and second half of each group); the scores of
 * several keys are summed across lanes together, by one transposing
 * reduction instead of a horizontal sum each; and the values are summed
 * into registers holding a tile of the output rows, stored once. No library
 * has kernels on a bf16 cache against fp32 queries (and BLAS may not be
 * called from the decode pool), so they are written here; the portable C
 * set is the reference. */
#include "ops.h"
#include "simd.h"

#include <string.h>

/* ---- portable: the reference ---- */

static inline float widen_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Rows i .. i+m-1 of the cache as fp32: in place, or widened into buf. */
static const float *cached_rows(const void *rows, int bf16, int64_t i, int64_t m, int D, float *buf)
{
    if (!bf16) return (const float *)rows + i * D;
    const uint16_t *h = (const uint16_t *)rows + i * D;
    for (int64_t c = 0; c < m * D; c++) buf[c] = widen_bf16(h[c]);
    return buf;
}

/* Four keys a pass, four independent sums (one key at a time the sum is a
 * chain of dependent FMAs); the loops over D vectorise. */
void att_scores_c(float *S, int64_t lds, const float *q, int64_t ldq, int nq, const void *K, int bf16, int64_t n,
                  int D, float scale)
{
    float buf[4 * 1024]; /* four rows of config.c's largest head_dim */
    for (int64_t i = 0; i < n; i += 4) {
        const int m = n - i < 4 ? (int)(n - i) : 4;
        const float *k0 = cached_rows(K, bf16, i, m, D, buf);
        const float *k1 = k0 + (m > 1) * D, *k2 = k0 + (m > 2) * 2 * D, *k3 = k0 + (m > 3) * 3 * D;
        for (int s = 0; s < nq; s++) {
            const float *qs = q + s * ldq;
            float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
            for (int c = 0; c < D; c++) {
                d0 += qs[c] * k0[c];
                d1 += qs[c] * k1[c];
                d2 += qs[c] * k2[c];
                d3 += qs[c] * k3[c];
            }
            const float d[4] = {d0, d1, d2, d3};
            for (int j = 0; j < m; j++) S[s * lds + i + j] = scale * d[j];
        }
    }
}

void att_values_c(float *o, int64_t ldo, const float *P, int64_t ldp, int nq, const void *V, int bf16, int64_t n,
                  int D)
{
    float buf[1024];
    for (int s = 0; s < nq; s++) memset(o + s * ldo, 0, (size_t)D * sizeof *o);
    for (int64_t i = 0; i < n; i++) {
        const float *v = cached_rows(V, bf16, i, 1, D, buf);
        for (int s = 0; s < nq; s++) {
            float *os = o + s * ldo;
            const float p = P[s * ldp + i];
#pragma omp simd
            for (int c = 0; c < D; c++) os[c] += p * v[c];
        }
    }
}

#ifdef JM_X86

/* Query slots s0, s0+1 (ns of them) split for a set whose vectors hold W / 2
 * fp32 values, per group of W values: bf16, its even values then its odd
 * ones; fp32, as they are. Zeros past D, so a masked tail adds nothing. */
static void split_slots(float *qs, const float *q, int64_t ldq, int ns, int D, int W, int bf16)
{
    const int Dp = (D + W - 1) / W * W;
    for (int s = 0; s < ns; s++)
        for (int g = 0; g < Dp; g += W)
            for (int j = 0; j < W; j++) {
                const int from = bf16 ? g + (j < W / 2 ? 2 * j : 2 * (j - W / 2) + 1) : g + j;
                qs[s * Dp + g + j] = from < D ? q[s * ldq + from] : 0.0f;
            }
}

/* Back to order, from split_slots' layout: values c < D of ns slots. */
static void join_slots(float *o, int64_t ldo, const float *acc, int Dp, int ns, int D, int W, int bf16)
{
    for (int s = 0; s < ns; s++)
        for (int c = 0; c < D; c++) {
            const int g = c / W * W, j = c % W;
            o[s * ldo + c] = acc[s * Dp + (bf16 ? g + (j % 2) * (W / 2) + j / 2 : c)];
        }
}

/* The most slots split at a time, and the most values of a row (config.c
 * takes head_dim up to 1024). */
enum { SLOTS = 2, DMAX = 1024 };

/* One line of each row 4 KB on, and one of each page 64 KB on: the cache of
 * one head is a stream of rows like a weight matrix (see PAGE_AHEAD). A
 * head's keys are short streams (128-270 KB at 512 positions), so how many
 * lines are in flight decides their pace: bench/attention (8B shape, 512
 * positions, 55 MB read between layers), best step, one thread, 2 KB -> 4
 * KB on: bf16 cache 58-63% -> 65-71% of a plain read, f32 77-85% -> 91-92%;
 * two threads bf16 50% -> 51-61%; 8 KB on did no better (AMD EPYC family 26
 * model 2). The small bench config decoded 445-488 -> 506-540 tokens/s.
 * The pages are asked for piece by piece as the rows are read, up to the
 * stream's end (prefetch_stream_pages). Asked for all at once when a head
 * started, and on to 64 KB past its end, they held two threads to 52-58%
 * of a plain read (bf16, bench/attention as above); piece by piece, 61-65%
 * (three rounds alternated, same machine). */
#ifndef ROW_AHEAD
#define ROW_AHEAD 4096
#endif

/* Row i of a cache of rows of D values, element c, as bytes. */
static inline const char *row_at(const void *rows, int bf16, int64_t i, int D, int c)
{
    return (const char *)rows + (i * D + c) * (bf16 ? 2 : 4);
}

/* ---- AVX2: 8 values a vector ---- */

/* A group of 16 values at p, k of them left in the row (an even D: bf16
 * rows are whole pairs, which AVX2 can mask in 32-bit lanes): *e, *o the
 * even and odd values (bf16) or the first and second 8 (fp32). */
AVX2 static INLINE void load16_avx2(const char *p, int bf16, int k, __m256 *e, __m256 *o)
{
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    if (!bf16) {
        const float *f = (const float *)p;
        *e = k >= 8 ? _mm256_loadu_ps(f) : _mm256_maskload_ps(f, _mm256_cmpgt_epi32(_mm256_set1_epi32(k), lane));
        *o = k >= 16 ? _mm256_loadu_ps(f + 8)
             : k > 8 ? _mm256_maskload_ps(f + 8, _mm256_cmpgt_epi32(_mm256_set1_epi32(k - 8), lane))
                     : _mm256_setzero_ps();
        return;
    }
    const __m256i v = k >= 16 ? _mm256_loadu_si256((const __m256i *)p)
                              : _mm256_maskload_epi32((const int *)p,
                                                      _mm256_cmpgt_epi32(_mm256_set1_epi32(k / 2), lane));
    *e = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *o = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

/* Scores of 4 keys (rows i0 .. i0+3 of K, the last nk - 1 read again when
 * fewer) for NS slots: 4 x NS accumulators, then 4 sums each at once. */
AVX2 static INLINE void scores4_avx2(float *S, int64_t lds, const float *qs, int Dp, const void *K, int bf16,
                                     int64_t i0, int nk, int D, float scale, const int NS)
{
    __m256 acc[4][SLOTS];
    UNROLL for (int i = 0; i < 4; i++)
        UNROLL for (int s = 0; s < NS; s++) acc[i][s] = _mm256_setzero_ps();
    const char *row[4];
    UNROLL for (int i = 0; i < 4; i++) row[i] = row_at(K, bf16, i0 + (i < nk ? i : nk - 1), D, 0);
    const int esize = bf16 ? 2 : 4;
    for (int c = 0; c < D; c += 16) {
        __m256 qe[SLOTS], qo[SLOTS];
        UNROLL for (int s = 0; s < NS; s++) {
            qe[s] = _mm256_load_ps(qs + s * Dp + c);
            qo[s] = _mm256_load_ps(qs + s * Dp + c + 8);
        }
        UNROLL for (int i = 0; i < 4; i++) {
            const char *p = row[i] + c * esize;
            if (!bf16 || c % 32 == 0) _mm_prefetch(p + ROW_AHEAD, _MM_HINT_T0); /* a line a prefetch */
            __m256 e, o;
            load16_avx2(p, bf16, D - c, &e, &o);
            UNROLL for (int s = 0; s < NS; s++)
                acc[i][s] = _mm256_fmadd_ps(o, qo[s], _mm256_fmadd_ps(e, qe[s], acc[i][s]));
        }
    }
    UNROLL for (int s = 0; s < NS; s++) {
        /* [k0 k1 k2 k3] per 128-bit half, then the halves added */
        __m256 a = _mm256_hadd_ps(acc[0][s], acc[1][s]), b = _mm256_hadd_ps(acc[2][s], acc[3][s]);
        __m256 t = _mm256_hadd_ps(a, b);
        __m128 sum = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), _mm_set1_ps(scale));
        float out[4];
        _mm_storeu_ps(out, sum);
        for (int i = 0; i < nk; i++) S[s * lds + i0 + i] = out[i];
    }
}

AVX2 void att_scores_avx2(float *S, int64_t lds, const float *q, int64_t ldq, int nq, const void *K, int bf16,
                          int64_t n, int D, float scale)
{
    float qs[SLOTS * DMAX] __attribute__((aligned(32)));
    const int Dp = (D + 15) / 16 * 16;
    const int64_t rowb = (int64_t)D * (bf16 ? 2 : 4);
    for (int s0 = 0; s0 < nq; s0 += SLOTS) {
        const int ns = nq - s0 < SLOTS ? nq - s0 : SLOTS;
        split_slots(qs, q + s0 * ldq, ldq, ns, D, 16, bf16);
        for (int64_t i = 0; i < n; i += 4) {
            const int nk = n - i < 4 ? (int)(n - i) : 4;
            if (s0 == 0) prefetch_stream_pages(K, n * rowb, i * rowb, nk * rowb);
            if (ns == 2) scores4_avx2(S + s0 * lds, lds, qs, Dp, K, bf16, i, nk, D, scale, 2);
            else scores4_avx2(S + s0 * lds, lds, qs, Dp, K, bf16, i, nk, D, scale, 1);
        }
    }
}

/* Values for NS slots over rows i0 .. i0+n-1 and a tile of 32 values from
 * c0: 4 x NS accumulators (two groups of 16, each as two halves), loaded
 * from and stored to acc (per slot, split as split_slots). A tile is a
 * quarter of a 128-value head: the tiles take turns over a block of rows,
 * which is then in L1, rather than each streaming all rows from memory (a
 * line of every row: 12 against 20 GB/s in bf16, one thread, AMD EPYC
 * family 26 model 2). */
AVX2 static INLINE void values_tile_avx2(float *acc, int Dp, const float *P, int64_t ldp, const void *V, int bf16,
                                         int64_t i0, int64_t n, int D, int c0, const int NS)
{
    __m256 a[SLOTS][2][2];
    const int ng = D - c0 > 16 ? 2 : 1, esize = bf16 ? 2 : 4;
    UNROLL for (int s = 0; s < NS; s++)
        UNROLL for (int g = 0; g < 2; g++)
            UNROLL for (int h = 0; h < 2; h++) a[s][g][h] = _mm256_load_ps(acc + s * Dp + c0 + 16 * g + 8 * h);
    for (int64_t i = i0; i < i0 + n; i++) {
        const char *v = row_at(V, bf16, i, D, c0);
        __m256 p[SLOTS];
        UNROLL for (int s = 0; s < NS; s++) p[s] = _mm256_broadcast_ss(P + s * ldp + i);
        UNROLL for (int g = 0; g < 2; g++) {
            if (g >= ng) break;
            if (!bf16 || g == 0) _mm_prefetch(v + 16 * g * esize + ROW_AHEAD, _MM_HINT_T0);
            __m256 e, od;
            load16_avx2(v + 16 * g * esize, bf16, D - c0 - 16 * g, &e, &od);
            UNROLL for (int s = 0; s < NS; s++) {
                a[s][g][0] = _mm256_fmadd_ps(e, p[s], a[s][g][0]);
                a[s][g][1] = _mm256_fmadd_ps(od, p[s], a[s][g][1]);
            }
        }
    }
    UNROLL for (int s = 0; s < NS; s++)
        UNROLL for (int g = 0; g < 2; g++)
            UNROLL for (int h = 0; h < 2; h++) _mm256_store_ps(acc + s * Dp + c0 + 16 * g + 8 * h, a[s][g][h]);
}

AVX2 void att_values_avx2(float *o, int64_t ldo, const float *P, int64_t ldp, int nq, const void *V, int bf16,
                          int64_t n, int D)
{
    const int64_t rows = bf16 ? 32 : 16; /* a block: 8 KB of a 128-value head */
    float acc[SLOTS * DMAX] __attribute__((aligned(32)));
    const int Dp = (D + 31) / 32 * 32;
    const int64_t rowb = (int64_t)D * (bf16 ? 2 : 4);
    for (int s0 = 0; s0 < nq; s0 += SLOTS) {
        const int ns = nq - s0 < SLOTS ? nq - s0 : SLOTS;
        memset(acc, 0, sizeof(float) * (size_t)(ns * Dp));
        for (int64_t i0 = 0; i0 < n; i0 += rows) {
            const int64_t nr = n - i0 < rows ? n - i0 : rows;
            if (s0 == 0) prefetch_stream_pages(V, n * rowb, i0 * rowb, nr * rowb);
            for (int c0 = 0; c0 < D; c0 += 32) {
                if (ns == 2) values_tile_avx2(acc, Dp, P + s0 * ldp, ldp, V, bf16, i0, nr, D, c0, 2);
                else values_tile_avx2(acc, Dp, P + s0 * ldp, ldp, V, bf16, i0, nr, D, c0, 1);
            }
        }
        join_slots(o + s0 * ldo, ldo, acc, Dp, ns, D, 16, bf16);
    }
}

/* ---- AVX-512: 16 values a vector ---- */

/* A group of 32 values at p, k of them left in the row: *e, *o the even and
 * odd values (bf16) or the first and second 16 (fp32). */
AVX512 static INLINE void load32_avx512(const char *p, int bf16, int k, __m512 *e, __m512 *o)
{
    if (!bf16) {
        const float *f = (const float *)p;
        *e = k >= 16 ? _mm512_loadu_ps(f) : _mm512_maskz_loadu_ps((__mmask16)((1u << k) - 1), f);
        *o = k >= 32 ? _mm512_loadu_ps(f + 16)
             : k > 16 ? _mm512_maskz_loadu_ps((__mmask16)((1u << (k - 16)) - 1), f + 16)
                      : _mm512_setzero_ps();
        return;
    }
    const __m512i v = k >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((__mmask32)((1u << k) - 1), p);
    *e = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *o = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}

/* The sums of 8 vectors, in order: pairs summed within 128-bit lanes, then
 * fours, then the lanes (24 instructions for 8 sums against ~64 for 8
 * horizontal sums). */
AVX512 static INLINE __m256 sum8_avx512(const __m512 v[8])
{
    __m512 a[4], b[2];
    UNROLL for (int i = 0; i < 4; i++) /* per lane [v0 v1 v0 v1] of v = v[2i], v[2i+1], partial */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    UNROLL for (int i = 0; i < 2; i++) /* per lane [v0 v1 v2 v3] of four, partial */
        b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* [b0 lanes 0+1, b0 2+3, b1 0+1, b1 2+3], then the pairs of lanes */
    __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
    c = _mm512_shuffle_f32x4(c, c, _MM_SHUFFLE(3, 1, 2, 0));
    return _mm256_add_ps(_mm512_castps512_ps256(c), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1)));
}

/* Scores of 8 keys (rows i0 .. i0+7 of K, the last nk - 1 read again when
 * fewer) for NS slots. */
AVX512 static INLINE void scores8_avx512(float *S, int64_t lds, const float *qs, int Dp, const void *K, int bf16,
                                         int64_t i0, int nk, int D, float scale, const int NS)
{
    __m512 acc[SLOTS][8];
    UNROLL for (int s = 0; s < NS; s++)
        UNROLL for (int i = 0; i < 8; i++) acc[s][i] = _mm512_setzero_ps();
    const char *row[8];
    UNROLL for (int i = 0; i < 8; i++) row[i] = row_at(K, bf16, i0 + (i < nk ? i : nk - 1), D, 0);
    const int esize = bf16 ? 2 : 4;
    for (int c = 0; c < D; c += 32) {
        __m512 qe[SLOTS], qo[SLOTS];
        UNROLL for (int s = 0; s < NS; s++) {
            qe[s] = _mm512_load_ps(qs + s * Dp + c);
            qo[s] = _mm512_load_ps(qs + s * Dp + c + 16);
        }
        UNROLL for (int i = 0; i < 8; i++) {
            const char *p = row[i] + c * esize;
            _mm_prefetch(p + ROW_AHEAD, _MM_HINT_T0);
            if (!bf16) _mm_prefetch(p + 64 + ROW_AHEAD, _MM_HINT_T0);
            __m512 e, o;
            load32_avx512(p, bf16, D - c, &e, &o);
            UNROLL for (int s = 0; s < NS; s++)
                acc[s][i] = _mm512_fmadd_ps(o, qo[s], _mm512_fmadd_ps(e, qe[s], acc[s][i]));
        }
    }
    UNROLL for (int s = 0; s < NS; s++)
        _mm256_mask_storeu_ps(S + s * lds + i0, (__mmask8)((1u << nk) - 1),
                              _mm256_mul_ps(sum8_avx512(acc[s]), _mm256_set1_ps(scale)));
}

AVX512 void att_scores_avx512(float *S, int64_t lds, const float *q, int64_t ldq, int nq, const void *K, int bf16,
                              int64_t n, int D, float scale)
{
    float qs[SLOTS * DMAX] __attribute__((aligned(64)));
    const int Dp = (D + 31) / 32 * 32;
    const int64_t rowb = (int64_t)D * (bf16 ? 2 : 4);
    for (int s0 = 0; s0 < nq; s0 += SLOTS) {
        const int ns = nq - s0 < SLOTS ? nq - s0 : SLOTS;
        split_slots(qs, q + s0 * ldq, ldq, ns, D, 32, bf16);
        for (int64_t i = 0; i < n; i += 8) {
            const int nk = n - i < 8 ? (int)(n - i) : 8;
            if (s0 == 0) prefetch_stream_pages(K, n * rowb, i * rowb, nk * rowb);
            if (ns == 2) scores8_avx512(S + s0 * lds, lds, qs, Dp, K, bf16, i, nk, D, scale, 2);
            else scores8_avx512(S + s0 * lds, lds, qs, Dp, K, bf16, i, nk, D, scale, 1);
        }
    }
}

/* Values for NS slots over a tile of 128 values from c0 (all of a
 * 128-value head): 2 x 4 x NS accumulators, summed over every row. */
AVX512 static INLINE void values_tile_avx512(float *acc, int Dp, const float *P, int64_t ldp, const void *V, int bf16,
                                             int64_t n, int D, int c0, int pages, const int NS)
{
    enum { NG = 4 };
    __m512 a[SLOTS][NG][2];
    UNROLL for (int s = 0; s < NS; s++)
        UNROLL for (int g = 0; g < NG; g++) a[s][g][0] = a[s][g][1] = _mm512_setzero_ps();
    const int ng = (D - c0 + 31) / 32 < NG ? (D - c0 + 31) / 32 : NG, esize = bf16 ? 2 : 4;
    const int64_t rowb = (int64_t)D * esize;
    for (int64_t i = 0; i < n; i++) {
        const char *v = row_at(V, bf16, i, D, c0);
        if (pages) prefetch_stream_pages(V, n * rowb, i * rowb, rowb);
        __m512 p[SLOTS];
        UNROLL for (int s = 0; s < NS; s++) p[s] = _mm512_set1_ps(P[s * ldp + i]);
        UNROLL for (int g = 0; g < NG; g++) {
            if (g >= ng) break;
            const char *vg = v + 32 * g * esize;
            _mm_prefetch(vg + ROW_AHEAD, _MM_HINT_T0);
            if (!bf16) _mm_prefetch(vg + 64 + ROW_AHEAD, _MM_HINT_T0);
            __m512 e, od;
            load32_avx512(vg, bf16, D - c0 - 32 * g, &e, &od);
            UNROLL for (int s = 0; s < NS; s++) {
                a[s][g][0] = _mm512_fmadd_ps(e, p[s], a[s][g][0]);
                a[s][g][1] = _mm512_fmadd_ps(od, p[s], a[s][g][1]);
            }
        }
    }
    UNROLL for (int s = 0; s < NS; s++)
        UNROLL for (int g = 0; g < NG; g++) {
            if (g >= ng) break;
            _mm512_store_ps(acc + s * Dp + c0 + 32 * g, a[s][g][0]);
            _mm512_store_ps(acc + s * Dp + c0 + 32 * g + 16, a[s][g][1]);
        }
}

AVX512 void att_values_avx512(float *o, int64_t ldo, const float *P, int64_t ldp, int nq, const void *V, int bf16,
                              int64_t n, int D)
{
    float acc[SLOTS * DMAX] __attribute__((aligned(64)));
    const int Dp = (D + 31) / 32 * 32;
    for (int s0 = 0; s0 < nq; s0 += SLOTS) {
        const int ns = nq - s0 < SLOTS ? nq - s0 : SLOTS;
        for (int c0 = 0; c0 < D; c0 += 128) {
            const int pages = s0 == 0 && c0 == 0; /* the first pass over the rows */
            if (ns == 2) values_tile_avx512(acc, Dp, P + s0 * ldp, ldp, V, bf16, n, D, c0, pages, 2);
            else values_tile_avx512(acc, Dp, P + s0 * ldp, ldp, V, bf16, n, D, c0, pages, 1);
        }
        join_slots(o + s0 * ldo, ldo, acc, Dp, ns, D, 32, bf16);
    }
}

#endif
