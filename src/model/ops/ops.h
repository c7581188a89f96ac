/* ops.h — the model's operations. Each op's file holds its forward (and,
 * as training lands, its backward) side by side. Shapes in comments:
 * N = tokens in the batch (B*T), H = hidden, E = experts, k = top-k,
 * A = Hkv*D (attention width), F = expert FFN width, V = vocab. */
#ifndef JM_OPS_H
#define JM_OPS_H

#include <stddef.h>
#include <stdint.h>

#define JM_MAX_EXPERTS 1024 /* config.c rejects more */

/* Elements of work below which a light op (norm, RoPE, gather, combine ...)
 * stays on the calling thread. An OpenMP region costs ~2.6 us at 2 threads
 * (8.6 us with OMP_WAIT_POLICY=passive) on a 2-vCPU EPYC, which splitting a
 * light op (~0.6 ns per element) only earns back past ~9,000-29,000 elements
 * (bench/threads). Decoding a few tokens stays under it, with no region. */
#define JM_OMP_GRAIN 32768

/* Below the grain a light op's loop runs with no OpenMP region at all, not
 * in one whose if() clause is false: libgomp still builds a team of one for
 * that, 1.3-1.4 us a region (AMD EPYC family 26 model 2, passive or not;
 * bench/threads prints it), and a decode step ran 314 of them on the 8B
 * layout (13 a layer) and 54 on the small config. So each light op reads
 * "if (work < JM_OMP_GRAIN) loop; else parallel loop", the loop's body one
 * call to the op's row function. */

#include <string.h>

float jm_f16_to_f32(uint16_t h); /* base/half.c */
typedef struct jm_pool jm_pool;  /* base/pool.c: the decode step's threads */

/* exp(x) for softmax, SiLU and cross-entropy, written by hand because glibc's
 * expf is a scalar call that stops gcc from vectorising those loops (they were
 * a quarter of the forward time); this form inlines and vectorises to AVX2.
 * Cephes' range reduction x = n ln2 + r and degree-6 polynomial: within 2 ulp
 * of expf on [-87, 88]; inputs outside are clamped (exp(-87) ~ 1.6e-38 stands
 * in for 0, which no softmax sum or sigmoid can tell apart). */
static inline float jm_expf(float x)
{
    /* NaN fails both comparisons and becomes -87 here, keeping the integer
     * conversion below defined; it is put back at the end */
    float xc = x > -87.0f ? x : -87.0f;
    xc = xc < 88.0f ? xc : 88.0f;
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (xc * 1.44269504088896341f + shifter) - shifter;
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23; /* n in [-126, 127]: a normal power of 2 */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x == x ? p * scale : x;
}

/* Row helpers of the softmax-shaped loops (attention, cross-entropy): the
 * max, and y = exp(x - mx) with its sum (y may be x, or NULL for the sum only).
 * Lane-wise partial sums: each adds at most n/8 terms <= 1. */
static inline float row_max(const float *x, int64_t n)
{
    float mx = x[0];
#pragma omp simd reduction(max : mx)
    for (int64_t i = 1; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    return mx;
}

static inline float exp_shift_sum(float *y, const float *x, int64_t n, float mx)
{
    float s = 0.0f;
    if (y) {
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < n; i++) {
            y[i] = jm_expf(x[i] - mx);
            s += y[i];
        }
    } else {
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < n; i++) s += jm_expf(x[i] - mx);
    }
    return s;
}

/* matmul.c: out (N,O) = inp (N,C) @ W(O,C)^T  (+ out when accumulate) */
void matmul_forward(float *out, const float *inp, const float *W, int64_t N, int64_t C, int64_t O, int accumulate);

void matmul_backward(float *dinp, float *dW, const float *dout, const float *inp, const float *W, int64_t N,
                     int64_t C, int64_t O, int accumulate);

/* embedding.c: out (N,H) = table[tokens] (a stored table: see wview below) */
typedef struct wview wview;
void embedding_forward(float *out, const int32_t *tokens, wview table, int64_t N, int64_t H);
void embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int64_t N, int64_t H);

/* rmsnorm.c: out (N,H) = inp / sqrt(mean(inp^2) + eps) * w; rstd (N) kept for backward */
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int64_t N, int64_t H, float eps);
void rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w, const float *rstd,
                      int64_t N, int64_t H);

/* rope.c: cos/sin tables (T, D/2) for positions 0..T-1, then rotate-half in place
 * on `rows` rows of `heads` heads of D, row stride `stride` floats; row r has
 * position pos[r], or pos0 + r % T when pos is NULL (the tables must cover it). */
void rope_tables(float *cos_t, float *sin_t, int T, int D, double theta);
void rope_forward(float *x, int64_t rows, int T, int pos0, const int32_t *pos, int heads, int D, int64_t stride,
                  const float *cos_t, const float *sin_t);
void rope_backward(float *dx, int64_t rows, int T, const int32_t *pos, int heads, int D, int64_t stride,
                   const float *cos_t, const float *sin_t);

/* attention.c: causal attention for B sequences of T query tokens over Tk >= T
 * keys each (the first Tk - T from a cache). q (B*T, k, Hkv, D): query head
 * (j,h) attends with kv head h of kv (B*Tk, 2*A), K = first A columns, V = last
 * A. out (B*T, k, Hkv, D); lse (B*T, k*Hkv) keeps each row's softmax normaliser
 * for backward (which needs Tk == T). scratch: attention_scratch_floats(Tk, k) per thread.
 * Packing (Tk == T only): kstart (B*T, or NULL = all 0) gives each query row
 * the first key of its own sequence within the row, so row r sees keys
 * kstart[r] .. r and nothing across a boundary; it never decreases along a row. */
size_t attention_scratch_floats(int T, int k);
void attention_forward(float *out, float *lse, const float *q, const float *kv, const int32_t *kstart,
                       float *scratch, int B, int T, int Tk, int k, int Hkv, int D);
void attention_backward(float *dq, float *dkv, const float *dout, const float *out, const float *lse,
                        const float *q, const float *kv, const int32_t *kstart, float *scratch, int B, int T, int k,
                        int Hkv, int D);
/* Decoding several sequences at once, each over its own KV cache. The N query
 * rows of a call form runs, one per sequence: run r is rows row0 .. row0+n-1
 * of q/out, the sequence's tokens at positions p0 .. p0+n-1, whose cache
 * starts off elements into cache: (2, Hkv, ctx, D), K after RoPE then V,
 * each head's positions contiguous. kv_new (N, 2A) holds the rows' own keys
 * and values (K heads, then V heads):
 * they are stored at their positions first (attention_decode: each head's
 * by the chunk that attends it, so a call's runs must be distinct
 * sequences), then each row attends to its sequence's keys 0 .. its
 * position. lse as attention_forward; scratch:
 * attention_cache_scratch_floats(ctx, k, D) per thread, ctx >= every p0 + n.
 * The cache holds fp32, or bf16 (half the bytes a step reads; each value
 * rounded once, when stored). */
typedef struct {
    int64_t row0;
    int n, p0;
    int64_t off;
} att_run;
typedef struct {
    void *data;
    int bf16;
} kv_cache;
size_t attention_cache_scratch_floats(int ctx, int k, int D);
void attention_cached(float *out, float *lse, const float *q, const float *kv_new, kv_cache cache, const att_run *runs,
                      int nruns, float *scratch, int ctx, int k, int Hkv, int D);
/* attention_cached for decoding (a few rows per run), on the decode pool: one
 * chunk per (run, KV head) with all k query slots of it, so each cached K/V
 * row is read once for the k experts; no lse. */
typedef struct wkernels wkernels;
void attention_decode(float *out, const float *q, const float *kv_new, kv_cache cache, const att_run *runs, int nruns,
                      float *scratch, int ctx, int k, int Hkv, int D, const wkernels *kern, jm_pool *pool);

/* router.c: z (N,E) = inp @ Wr^T; idx/gate (N,k): top-k experts (descending,
 * ties to the lower index) and the softmax over the k selected logits. */
void router_forward(float *z, int32_t *idx, float *gate, const float *inp, const float *Wr, int64_t N, int H,
                    int E, int k);
/* The spec's per-router load-balancing (switch) loss and z-loss over the N
 * tokens, or over those with valid[t] != 0 (padding is not data). */
void router_losses(double *switch_loss, double *z_loss, const float *z, const int32_t *idx, const uint8_t *valid,
                   int64_t N, int E, int k);
/* dz (N,E) from the gates' gradient and the aux_w-weighted switch loss and
 * zl_w-weighted z-loss (of the valid tokens, as router_losses). */
void router_backward(float *dz, const float *dgate, const float *z, const int32_t *idx, const float *gate,
                     const uint8_t *valid, int64_t N, int E, int k, double aux_w, double zl_w);

/* experts.c: the grouped dispatch of design.md. The N*k (token, slot) pairs
 * are sorted by expert (stable); sorted[m] = t*k + j, pos[t*k + j] = m, and
 * expert e owns rows offsets[e] .. offsets[e+1]-1 of every sorted buffer. */
void dispatch_build(int32_t *sorted, int32_t *pos, int64_t *offsets, const int32_t *idx, int64_t N, int k, int E);
/* xs (N*k, C) = rows of x (N, C) in sorted order (row t of x for pair t*k+j);
 * when per_slot, x is (N*k, C) and pair p reads row p. */
void dispatch_gather(float *xs, const float *x, const int32_t *sorted, int64_t Nk, int k, int64_t C, int per_slot);
/* ys (N*k, O) = xs @ W[e]^T for each expert's rows; W (E, O, C). */
void experts_forward(float *ys, const float *xs, const float *W, const int64_t *offsets, int E, int64_t C,
                     int64_t O);
/* out (N,H) = resid + bias + sum_j gate[t,j] * ys[pos[t*k+j]]  (the residual add is fused in) */
void combine_forward(float *out, const float *resid, const float *ys, const int32_t *pos, const float *gate,
                     const float *bias, int64_t N, int k, int64_t H);
/* x (N*k, C) = xs scattered back to pair order: x[sorted[m]] = xs[m] */
void dispatch_scatter(float *x, const float *xs, const int32_t *sorted, int64_t Nk, int64_t C);
void experts_backward(float *dxs, float *dW, const float *dys, const float *xs, const float *W,
                      const int64_t *offsets, int E, int64_t C, int64_t O);
void combine_backward(float *dys, float *dgate, float *dbias, const float *dout, const float *ys,
                      const int32_t *pos, const float *gate, int64_t N, int k, int64_t H);
void dispatch_gather_backward(float *dx, const float *dxs, const int32_t *pos, int64_t N, int k, int64_t C,
                              int per_slot, int accumulate);

/* swiglu.c: h (M,F) = silu(u[:, :F]) * u[:, F:] for u (M, 2F) */
void swiglu_forward(float *h, const float *u, int64_t M, int64_t F);
void swiglu_backward(float *du, const float *dh, const float *u, int64_t M, int64_t F);

/* cross_entropy.c: mean over rows with target >= 0 of logsumexp(logits) - logits[target].
 * Returns the number of counted rows in *count; logp (N, optional) receives
 * each row's log-probability of its target (0 for rows without one). */
double cross_entropy_forward(const float *logits, const int32_t *targets, int64_t N, int64_t V, int64_t *count,
                             float *logp);
/* log p(target) under one row of V logits, summed in double: what scoring
 * (jm_score_batch, jm_score_window) adds up over many tokens. */
double log_prob_row(const float *logits, int64_t V, int32_t target);
/* dlogits = w_t * (softmax - onehot(target)) per row with a target, w_t =
 * weight[t] or scale when weight is NULL; 0 for the other rows. */
void cross_entropy_backward(float *dlogits, const float *logits, const int32_t *targets, const float *weight,
                            int64_t N, int64_t V, float scale);

/* ---- weights as stored for inference (qmatmul.c) ----
 * A matrix of rows x C inputs (or a stack of E expert matrices, one after
 * another) in the dtype the checkpoint holds it:
 *   WT_F32, WT_BF16  row-major;
 *   WT_Q8            int8 row-major, and one F16 scale per block of 32 inputs
 *                    (rows x C/32 scales): w = scale * q;
 *   WT_Q4            per block of 32 inputs 16 bytes: byte j holds element j
 *                    in its low nibble and element j + 16 in its high one,
 *                    w = scale * (nibble - 8); scales as Q8.
 * Scales are read as bytes: a mapped file promises no alignment. */
typedef enum { WT_F32, WT_BF16, WT_Q8, WT_Q4 } wtype;
#define QBLOCK 32
struct wview {
    wtype type;
    const void *data;
    const uint8_t *scales; /* Q8/Q4: little-endian F16, C/32 per row (NULL when WILV_INLINE) */
    int ilv;               /* 0: row-major; 1: rows interleaved in groups of WILV; WILV_INLINE: scales inline too */
};
/* Interleaved rows (ilv 1: `jetmoe quantize`'s files, where a row is whole
 * 64-byte lines and the matrix whole groups): each group of WILV
 * consecutive rows holds their lines in turn, line l of row i at the
 * group's start + (l * WILV + i % WILV) * 64. A decode pass takes the WILV
 * rows of a group against the same inputs, and so reads one stream where
 * row-major rows are WILV streams; scales stay row-major. A view into such a
 * matrix starts at a group. */
#define WILV 4
/* ilv == WILV_INLINE (jm_weights_to_ram's copy of a Q8/Q4 matrix): each
 * group in steps of QSTEP blocks, a step its WILV rows' lines of those
 * blocks interleaved as above, then their scales (row after row, 2 bytes a
 * block), padded to a whole line; no separate scales. A decode pass then
 * reads one stream, scales and all, where with scales of their own it reads
 * two. bench/products (a build that read either layout, the two alternated;
 * AMD EPYC family 26 model 2, avx512): the read tiles 84-91% -> 87-99% of
 * a plain read, Q8's kernels 86-97% -> 92-99% (rows of 5632 inputs 86-91%
 * -> 92-96%), Q4's alike within their swing from run to run (70-99% either
 * way). */
#define WILV_INLINE 2
#define QSTEP 16
static inline int64_t wblock_bytes(wtype t) { return t == WT_Q8 ? QBLOCK : QBLOCK / 2; }
/* bytes / wblock_bytes(t), by constants: a division by the block size
 * chosen at run time cost a tenth of tile_by_passes' time, once a pass. */
static inline int64_t wblocks_in(wtype t, int64_t bytes) { return t == WT_Q8 ? bytes / QBLOCK : bytes / (QBLOCK / 2); }
/* A step's scale bytes for nblk blocks a row, whole lines. */
static inline int64_t wstep_scale_bytes(int64_t nblk) { return (WILV * 2 * nblk + 63) / 64 * 64; }
/* Bytes of a whole step (QSTEP blocks) of a WILV_INLINE group. */
static inline int64_t wstep_bytes(wtype t)
{
    return WILV * QSTEP * wblock_bytes(t) + wstep_scale_bytes(QSTEP);
}
/* In the step that starts at `step`, the scale of block b of the group's
 * row rr (nb blocks a row: the last step may hold fewer). */
static inline const uint8_t *wstep_scale(wtype t, const uint8_t *step, int64_t rr, int64_t b, int64_t nb)
{
    const int64_t first = b / QSTEP * QSTEP, nblk = nb - first < QSTEP ? nb - first : QSTEP;
    return step + WILV * nblk * wblock_bytes(t) + (rr * nblk + b - first) * 2;
}
/* Bytes of a group of WILV rows of row_bytes in the WILV_INLINE layout. */
static inline int64_t wgroup_inline_bytes(wtype t, int64_t row_bytes)
{
    const int64_t nb = wblocks_in(t, row_bytes), rest = nb % QSTEP;
    return WILV * row_bytes + nb / QSTEP * wstep_scale_bytes(QSTEP) + (rest ? wstep_scale_bytes(rest) : 0);
}
static inline const uint8_t *wrow_byte(wview w, int64_t i, int64_t off, int64_t row_bytes)
{
    const uint8_t *d = (const uint8_t *)w.data;
    if (!w.ilv) return d + i * row_bytes + off;
    if (w.ilv == 1) return d + i / WILV * WILV * row_bytes + (off / 64 * WILV + i % WILV) * 64 + off % 64;
    const int64_t s = wblocks_in(w.type, off) / QSTEP, o = off - s * QSTEP * wblock_bytes(w.type); /* step s, byte o */
    return d + i / WILV * wgroup_inline_bytes(w.type, row_bytes) + s * wstep_bytes(w.type) +
           (o / 64 * WILV + i % WILV) * 64 + off % 64;
}
/* The F16 scale of block b of row i (Q8/Q4; nb blocks a row). */
static inline const uint8_t *wscale_ptr(wview w, int64_t i, int64_t b, int64_t nb)
{
    if (w.ilv != WILV_INLINE) return w.scales + (i * nb + b) * 2;
    const uint8_t *group = (const uint8_t *)w.data + i / WILV * wgroup_inline_bytes(w.type, nb * wblock_bytes(w.type));
    return wstep_scale(w.type, group + b / QSTEP * wstep_bytes(w.type), i % WILV, b, nb);
}

static inline wview wview_f32(const float *w) { return (wview){WT_F32, w, NULL, 0}; }
/* Bytes of one row of C inputs (data only; Q8/Q4 add 2*C/32 bytes of scales). */
int64_t wtype_row_bytes(wtype t, int64_t C);
/* The view `rows` rows further on (expert e of a stack: rows = e * O;
 * interleaved: whole groups, which every caller's rows are). */
wview wview_rows(wview w, int64_t rows, int64_t C);
/* Bytes `rows` rows of C inputs hold, scales and padding included. */
int64_t wview_bytes(wview w, int64_t rows, int64_t C);
/* out (nrows, C) fp32 = rows row0 .. row0+nrows-1 of W. */
void dequant_rows(float *out, wview W, int64_t row0, int64_t nrows, int64_t C);
/* Whether a Q8/Q4 stack of matrices of `rows` rows of C inputs can hold
 * them interleaved: every row whole lines, every matrix whole groups (so a
 * view at any expert starts at a group). `jetmoe quantize` stores every
 * such tensor interleaved (ilv 1), and jm_weights_to_ram copies it
 * WILV_INLINE. */
static inline int wrows_interleave(wtype t, int64_t rows, int64_t C)
{
    return (t == WT_Q8 || t == WT_Q4) && C % QBLOCK == 0 && wtype_row_bytes(t, C) % 64 == 0 && rows % WILV == 0;
}
/* rows row-major rows of row_bytes (whole lines) from `from` into `to`,
 * interleaved as wrow_byte reads them (rows a whole number of groups, or
 * `to` padded to one: the padding is not written). */
void interleave_rows(uint8_t *to, const uint8_t *from, int64_t rows, int64_t row_bytes);
/* Q8/Q4 rows of `from` (row-major, or interleaved with whole groups or a
 * last group padded to one; whole lines a row) into `to`, laid out
 * WILV_INLINE (wview_bytes of such a view; the padding of partial steps
 * written as zeros). */
void inline_rows(uint8_t *to, wview from, int64_t rows, int64_t C);
/* Blockwise quantization of one row (C % 32 == 0); returns the largest
 * |w - dequantized| (for the quantizer's report and its tests). */
float quantize_row_q8(int8_t *q, uint8_t *scales, const float *w, int64_t C);
float quantize_row_q4(uint8_t *q, uint8_t *scales, const float *w, int64_t C);
/* An activation row as int8 blocks of 32: xq (C), and xs (2*C/32): the fp32
 * block scales, then each block's scale times its sum of values (the Q4
 * kernels take the -8 offset off through it). */
void quantize_act_q8(int8_t *xq, float *xs, const float *x, int64_t C);
/* n activations as bf16 for the BF16 weights' kernels: rounded to nearest
 * even, as vcvtneps2bf16 rounds (subnormals to a signed zero, NaN kept a
 * quiet NaN). A BF16 product is then bf16 x bf16, each product exact in
 * fp32, summed in fp32: the same definition in every set (but for
 * subnormal weights and sums, which vdpbf16ps, the AVX-512 set's one
 * instruction per 32 weights, flushes to zero). */
void round_act_bf16(uint16_t *xb, const float *x, int64_t n);

/* wkernels.c: the kernels the products below are made of. A tile function
 * computes out[r * ldo + i] = <weight row i, input row r> for the nrows
 * consecutive rows of w and n input rows, as the weight type takes them:
 * fp32 x (row stride C) for F32; xq the bf16 inputs of round_act_bf16
 * (uint16_t, stride C) for BF16; xq the int8 blocks and xs the scales of
 * quantize_act_q8 (strides C and 2*C/32) for Q8/Q4. A table per
 * instruction set, chosen at run time. */
typedef void (*wtile_fn)(float *out, int64_t ldo, wview w, int64_t nrows, const float *x, const void *xq,
                         const float *xs, int64_t n, int64_t C);
/* Decode attention over the KV cache (akernels.c), for the nq query slots
 * of one KV head (q_s = q + s * ldq, D values) against its n cached rows
 * (K_i, V_i = K, V + i * D values, fp32 or bf16; D even):
 *   att_scores: S[s * lds + i] = scale * <q_s, K_i>
 *   att_values: o[s * ldo + c] = sum_i P[s * ldp + i] * V_i[c] (o overwritten) */
typedef void (*att_scores_fn)(float *S, int64_t lds, const float *q, int64_t ldq, int nq, const void *K, int bf16,
                              int64_t n, int D, float scale);
typedef void (*att_values_fn)(float *o, int64_t ldo, const float *P, int64_t ldp, int nq, const void *V, int bf16,
                              int64_t n, int D);
struct wkernels {
    const char *name;
    wtile_fn f32, bf16, q8, q4;
    att_scores_fn att_scores;
    att_values_fn att_values;
};
static inline wtile_fn wkernel_for(const wkernels *K, wtype t)
{
    return t == WT_F32 ? K->f32 : t == WT_BF16 ? K->bf16 : t == WT_Q8 ? K->q8 : K->q4;
}
/* A Q8/Q4 block's F16 scale (read as bytes: a mapped file promises no alignment). */
static inline float wscale_at(const uint8_t *s, int64_t b)
{
    return jm_f16_to_f32((uint16_t)(s[2 * b] | s[2 * b + 1] << 8));
}
/* "auto" (the best this CPU runs), "avx512" or "avx2" (this CPU's tuning of
 * the set), a tuning by name ("avx512:stream", "avx2:prefetch", ...) or
 * "portable"; NULL when this
 * CPU (or this build) cannot run the named set. */
const wkernels *wkernels_get(const char *name);
/* The CPU features set `name` needs that this CPU lacks, into buf as
 * "AVX-512 VNNI, AVX-512 BF16" ("" when it has them all); -1 for a name no
 * build knows. */
int wkernels_missing(const char *name, char *buf, size_t cap);
/* The "avx512" set as a CPU without AVX-512 BF16 gets it (NULL when this
 * CPU cannot run it), for the tests of a CPU that has it. */
const wkernels *wkernels_avx512_no_bf16(void);
/* "read": tiles that only read what their products would and write no
 * products, with the attention kernels of the best set this CPU runs
 * (bench/decode's ceiling; see wkernels.c). */
const wkernels *wkernels_read(void);

/* Products with stored weights. Up to WSMALL_N input rows take the dot
 * kernels above (decode: reading the weights once is the whole cost; Q8/Q4
 * multiply int8 activations, as their inputs are quantized per block of 32);
 * more rows dequantize tiles of WTILE weight rows to fp32 for SGEMM (prefill).
 * BF16 weights take their inputs rounded to bf16 on either path, so that a
 * BF16 checkpoint used in place is one function of its tokens however they
 * are batched, up to the order of the sums (tests/ref/jetmoe_ref.py's
 * forward, act=bf16_inputs).
 * With a pool (decoding) and no expert over WSMALL_N rows, the products run
 * on it, F32 ones too, and never on OpenMP or OpenBLAS; otherwise on OpenMP.
 * scratch: wmatmul_scratch_bytes(rows, C, threads, bf16), bf16 when some
 * matrix it serves is BF16. */
#define WSMALL_N 8
#define WTILE 64
size_t wmatmul_scratch_bytes(int64_t rows, int64_t C, int threads, int bf16);
/* out (N,O) = inp (N,C) @ W^T (wexperts_forward with one expert) */
void wmatmul_forward(float *out, const float *inp, wview W, int64_t N, int64_t C, int64_t O, const wkernels *K,
                     void *scratch, jm_pool *pool);
/* experts_forward with stored weights: ys (N*k,O) = xs @ W[e]^T per expert's rows. */
void wexperts_forward(float *ys, const float *xs, wview W, const int64_t *offsets, int E, int64_t C, int64_t O,
                      const wkernels *K, void *scratch, jm_pool *pool);

#endif
