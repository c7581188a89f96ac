/* test_quant.c — weights for inference: F16 conversion, the Q8/Q4 block
 * formats, the dot kernels (portable C against float64 sums, and the SIMD set
 * against the portable one), the tiled products, and whole models opened in
 * place (BF16, Q8, Q4) against the fp32 path.
 * Prints `PASS name` / `FAIL name: why`; exits 1 on any failure. */
#include "base/base.h"
#include "base/safetensors.h"
#include "model/ops/ops.h"
#include "harness.h"

#include <math.h>
#include <omp.h>
#include <string.h>
#include <unistd.h>

static uint64_t rng_state = 12345;
static float frand(void) /* uniform in [-1, 1) */
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0) - 1.0);
}

/* ---- F16 ---- */

static void test_f16(void)
{
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) { /* every half survives the round trip (NaNs stay NaN) */
        float f = jm_f16_to_f32((uint16_t)h);
        uint16_t back = jm_f32_to_f16(f);
        bool nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        if (nan ? !((back & 0x7c00) == 0x7c00 && (back & 0x3ff)) : back != h) bad++;
    }
    check(bad == 0, "f16_roundtrip_all_halves", "%d halves changed", bad);
    /* rounding: halfway cases go to even, overflow to infinity, underflow to signed zero */
    struct {
        float f;
        uint16_t h;
    } cases[] = {{1.0f + 1.0f / 2048, 0x3c00}, {1.0f + 3.0f / 2048, 0x3c02}, {65504.0f, 0x7bff},
                 {65520.0f, 0x7c00},           {-1e9f, 0xfc00},             {5.9604645e-8f, 0x0001},
                 {2.9802322e-8f, 0x0000},      {-1e-12f, 0x8000},           {6.097555e-5f, 0x03ff}};
    int wrong = 0;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) wrong += jm_f32_to_f16(cases[i].f) != cases[i].h;
    check(wrong == 0, "f16_rounding_edges", "%d of %zu cases wrong", wrong, sizeof cases / sizeof *cases);
}

/* BF16 weights' activations: round to nearest even as vcvtneps2bf16 does.
 * Written out bit by bit here (the spec of the instruction), not through
 * jm_f32_to_bf16, which keeps subnormals. */
static void test_round_act_bf16(void)
{
    struct {
        uint32_t f;
        uint16_t h;
    } cases[] = {{0x3f800000u, 0x3f80}, {0x3f808000u, 0x3f80}, /* halfway: to even (down) */
                 {0x3f818000u, 0x3f82}, /* halfway: to even (up) */
                 {0x3f808001u, 0x3f81}, {0xbf807fffu, 0xbf80}, {0x7f7fffffu, 0x7f80}, /* rounds to infinity */
                 {0x7f800000u, 0x7f80}, {0xff800000u, 0xff80}, {0x00000000u, 0x0000}, {0x80000000u, 0x8000},
                 {0x007fffffu, 0x0000}, /* subnormals: a signed zero */
                 {0x807fffffu, 0x8000}, {0x00800000u, 0x0080}, /* the least normal is kept */
                 {0x7fc00001u, 0x7fc0}, {0x7f800001u, 0x7fc0}, /* NaN: quiet, never infinity */
                 {0xffffffffu, 0xffff}};
    enum { N = sizeof cases / sizeof *cases };
    float x[N];
    uint16_t got[N];
    for (int i = 0; i < N; i++) memcpy(&x[i], &cases[i].f, 4);
    round_act_bf16(got, x, N);
    int wrong = 0;
    for (int i = 0; i < N; i++) wrong += got[i] != cases[i].h;
    /* and normal numbers as jm_f32_to_bf16 rounds them */
    int differ = 0;
    for (int i = 0; i < 100000; i++) {
        float f = frand() * ldexpf(1.0f, i % 200 - 100);
        uint16_t h;
        round_act_bf16(&h, &f, 1);
        differ += h != jm_f32_to_bf16(f);
    }
    check_detail(wrong == 0 && differ == 0, "round_act_bf16", "%d of %d edge cases wrong; %d of 100000 normal values "
                 "differ from jm_f32_to_bf16", wrong, N, differ);
}

/* ---- block formats ---- */

static void test_quantize_rows(void)
{
    const int C = 256;
    float w[256], back[256];
    int8_t q8[256];
    uint8_t q4[128], s8[16], s4[16];
    double worst8 = 0, worst4 = 0;
    for (int rep = 0; rep < 200; rep++) {
        float scale = powf(10.0f, (float)(rep % 7) - 4); /* 1e-4 .. 1e2 */
        for (int i = 0; i < C; i++) w[i] = scale * frand() * (i % 32 == 5 ? 3.0f : 1.0f);
        quantize_row_q8(q8, s8, w, C);
        quantize_row_q4(q4, s4, w, C);
        /* the bound per block, in steps of the stored scale d: half a step for
         * int8; one for int4, whose positive side ends at 7 steps when the
         * extreme is negative */
        float b8[256], b4[256];
        dequant_rows(b8, (wview){WT_Q8, q8, s8, 0}, 0, 1, C);
        dequant_rows(b4, (wview){WT_Q4, q4, s4, 0}, 0, 1, C);
        for (int i = 0; i < C; i++) {
            float d8 = jm_f16_to_f32((uint16_t)(s8[i / 32 * 2] | s8[i / 32 * 2 + 1] << 8));
            float d4 = fabsf(jm_f16_to_f32((uint16_t)(s4[i / 32 * 2] | s4[i / 32 * 2 + 1] << 8)));
            worst8 = fmax(worst8, fabsf(b8[i] - w[i]) / (d8 * 0.5 * 1.0001 + 1e-30));
            worst4 = fmax(worst4, fabsf(b4[i] - w[i]) / (d4 * 1.0001 + 1e-30));
        }
    }
    check_detail(worst8 <= 1.0, "quant_q8_error_within_half_step", "worst error %.3f of the bound", worst8);
    check_detail(worst4 <= 1.0, "quant_q4_error_within_one_step", "worst error %.3f of the bound", worst4);

    /* the stored layout, by hand: Q4 byte j holds element j low, j + 16 high */
    for (int i = 0; i < 32; i++) w[i] = (float)(i - 16); /* extreme -16 -> scale 2, nibble = w/2 + 8 */
    quantize_row_q4(q4, s4, w, 32);
    bool layout = jm_f16_to_f32((uint16_t)(s4[0] | s4[1] << 8)) == 2.0f;
    for (int j = 0; j < 16 && layout; j++) {
        int lo = (int)roundf(w[j] / 2) + 8, hi = (int)roundf(w[j + 16] / 2) + 8;
        layout = q4[j] == (uint8_t)((lo > 15 ? 15 : lo) | (hi > 15 ? 15 : hi) << 4);
    }
    check(layout, "quant_q4_layout", "scale %g byte0 %02x", jm_f16_to_f32((uint16_t)(s4[0] | s4[1] << 8)), q4[0]);

    memset(w, 0, sizeof w); /* an all-zero block: scale 0, values 0, no division by zero */
    quantize_row_q8(q8, s8, w, C);
    quantize_row_q4(q4, s4, w, C);
    dequant_rows(back, (wview){WT_Q4, q4, s4, 0}, 0, 1, C);
    bool zero = true;
    for (int i = 0; i < C; i++) zero &= back[i] == 0.0f && q8[i] == 0;
    check(zero, "quant_zero_block", "%s", "nonzero output");
}

/* rows x C random weights of amplitude amp in type t (buffers the caller frees). */
static wview random_matrix(wtype t, int64_t rows, int64_t C, void **data, uint8_t **scales, float amp)
{
    *data = malloc((size_t)(rows * C * 4));
    *scales = malloc((size_t)(rows * (C / 32) * 2 + 2));
    float *w = malloc((size_t)C * sizeof *w);
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < C; i++) w[i] = amp * frand();
        if (t == WT_F32) memcpy((float *)*data + r * C, w, (size_t)C * 4);
        if (t == WT_BF16)
            for (int64_t i = 0; i < C; i++) ((uint16_t *)*data)[r * C + i] = jm_f32_to_bf16(w[i]);
        if (t == WT_Q8) quantize_row_q8((int8_t *)*data + r * C, *scales + r * (C / 32) * 2, w, C);
        if (t == WT_Q4) quantize_row_q4((uint8_t *)*data + r * C / 2, *scales + r * (C / 32) * 2, w, C);
    }
    free(w);
    return (wview){t, *data, t == WT_Q8 || t == WT_Q4 ? *scales : NULL, 0};
}

/* ---- dot kernels ---- */

/* Every kernel set by name, the avx2 and avx512 sets in each of their
 * tunings (the same operations, prefetched into L1 or left to the hardware:
 * see wkernels.c), side by side, "prefetch" first (TUNED pairs them); and
 * as test names say them. */
static const char *const kernel_sets[] = {"portable", "avx2:prefetch", "avx2:stream", "avx512:prefetch",
                                          "avx512:stream"};
static const char *const kernel_labels[] = {"portable", "avx2_prefetch", "avx2_stream", "avx512_prefetch",
                                            "avx512_stream"};
enum { NSETS = sizeof kernel_sets / sizeof *kernel_sets };
/* whether set s is a "stream" tuning, of the same set as s - 1 */
#define TUNED(s) (strstr(kernel_sets[s], ":stream") != NULL)

/* The value weight (row i, input c) holds as stored, exactly (F16 scales and
 * bf16 widen to float exactly; the products below are float64). */
static double stored_weight(wview w, int64_t i, int64_t c, int64_t C)
{
    const int64_t nb = C / 32, b = i * nb + c / 32;
    switch (w.type) {
    case WT_F32: return ((const float *)w.data)[i * C + c];
    case WT_BF16: {
        const uint8_t *p = (const uint8_t *)w.data + 2 * (i * C + c);
        uint32_t u = (uint32_t)(p[0] | p[1] << 8) << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    case WT_Q8: return (double)wscale_at(w.scales, b) * ((const int8_t *)w.data)[i * C + c];
    case WT_Q4: {
        const uint8_t q = ((const uint8_t *)w.data)[i * C / 2 + c / 32 * 16 + c % 16];
        return (double)wscale_at(w.scales, b) * ((c % 32 < 16 ? q & 15 : q >> 4) - 8);
    }
    }
    return 0;
}

/* One tile problem: nrows weight rows of type t against n input rows, every
 * buffer `skew` bytes (or elements) off 64-byte alignment, as a mapped file
 * and an arena may place them: Q8/Q4 weights at any byte, their scales at odd
 * ones, F32/BF16 at their element size. want/mag (n, nrows): the float64 sum
 * of the products of the stored values (BF16: times the activations rounded
 * to bf16, xq; Q8/Q4: dequantized weights times the dequantized int8
 * activations, xq * block scale) and of their magnitudes. */
typedef struct {
    wtype t;
    int64_t nrows, n, C, ldo;
    wview w;
    const float *x, *xs;
    const void *xq; /* int8 (Q8/Q4) or bf16 (BF16) inputs */
    double *want, *mag;
    void *bufs[6];
} tile_case;

/* n bytes 64-byte aligned, and 128 more for the caller to start off alignment. */
static void *alloc64(int64_t n) { return aligned_alloc(64, (size_t)(n + 128 + 63) / 64 * 64); }

static tile_case make_tile_case(wtype t, int64_t nrows, int64_t n, int64_t C, float wamp, float xamp, int skew)
{
    tile_case k = {t, nrows, n, C, nrows + skew % 3 * 5, {0}, NULL, NULL, NULL, NULL, NULL, {0}};
    const int64_t nb = C / 32, row = wtype_row_bytes(t, C), esize = t == WT_F32 ? 4 : t == WT_BF16 ? 2 : 1;
    uint8_t *data = alloc64(nrows * row), *sc = alloc64(nrows * 2 * nb);
    float *x = alloc64(n * C * 4), *xs = alloc64(n * 2 * nb * 4);
    int8_t *xq = alloc64(n * C);
    uint16_t *xb = alloc64(n * C * 2);
    k.bufs[0] = data, k.bufs[1] = sc, k.bufs[2] = x, k.bufs[3] = xs, k.bufs[4] = xq, k.bufs[5] = xb;
    data += skew % 16 * esize, sc += skew % 32 * 2 + 1;
    x += skew % 16, xs += (skew + 5) % 16, xq += skew % 64, xb += (skew + 3) % 32;
    float *w = malloc((size_t)C * sizeof *w);
    for (int64_t i = 0; i < nrows; i++) {
        for (int64_t c = 0; c < C; c++) w[c] = wamp * frand();
        if (t == WT_F32) memcpy(data + i * row, w, (size_t)row);
        for (int64_t c = 0; t == WT_BF16 && c < C; c++) {
            uint16_t h = jm_f32_to_bf16(w[c]);
            data[i * row + 2 * c] = (uint8_t)h, data[i * row + 2 * c + 1] = (uint8_t)(h >> 8);
        }
        if (t == WT_Q8) quantize_row_q8((int8_t *)data + i * row, sc + i * 2 * nb, w, C);
        if (t == WT_Q4) quantize_row_q4(data + i * row, sc + i * 2 * nb, w, C);
    }
    free(w);
    for (int64_t c = 0; c < n * C; c++) x[c] = xamp * frand() * (c % 97 == 0 ? 20.0f : 1.0f);
    const int int8 = t == WT_Q8 || t == WT_Q4;
    for (int64_t r = 0; int8 && r < n; r++) quantize_act_q8(xq + r * C, xs + r * 2 * nb, x + r * C, C);
    if (t == WT_BF16) round_act_bf16(xb, x, n * C);
    k.w = (wview){t, data, int8 ? sc : NULL, 0};
    k.x = x, k.xs = xs, k.xq = t == WT_BF16 ? (const void *)xb : xq;
    k.want = malloc((size_t)(n * nrows) * sizeof *k.want), k.mag = malloc((size_t)(n * nrows) * sizeof *k.mag);
    for (int64_t r = 0; r < n; r++)
        for (int64_t i = 0; i < nrows; i++) {
            double s = 0, m = 0;
            for (int64_t c = 0; c < C; c++) {
                double xv = int8              ? (double)xs[r * 2 * nb + c / 32] * xq[r * C + c]
                            : t == WT_BF16 ? (double)jm_bf16_to_f32(jm_f32_to_bf16(x[r * C + c]))
                                           : x[r * C + c];
                double p = stored_weight(k.w, i, c, C) * xv;
                s += p, m += fabs(p);
            }
            k.want[r * nrows + i] = s, k.mag[r * nrows + i] = m;
        }
    return k;
}

static void free_tile_case(tile_case *k)
{
    for (int i = 0; i < 6; i++) free(k->bufs[i]);
    free(k->want), free(k->mag);
}

/* Runs set K's tile on k into out (n, ldo), first filled with a NaN whose
 * bits mark it unwritten; false if the tile wrote outside its nrows columns. */
static const uint32_t UNWRITTEN = 0x7fc0beefu;
static bool run_tile(const wkernels *K, const tile_case *k, float *out)
{
    for (int64_t i = 0; i < k->n * k->ldo; i++) memcpy(&out[i], &UNWRITTEN, 4);
    wkernel_for(K, k->t)(out, k->ldo, k->w, k->nrows, k->x, k->xq, k->xs, k->n, k->C);
    for (int64_t r = 0; r < k->n; r++)
        for (int64_t i = k->nrows; i < k->ldo; i++)
            if (memcmp(&out[r * k->ldo + i], &UNWRITTEN, 4) != 0) return false;
    return true;
}

/* The same tile with its rows interleaved (ops.h), in a buffer of whole
 * groups, when its rows are whole lines: as Q8/Q4 files hold them (ilv 1)
 * and, Q8/Q4, with their scales inline as jm_weights_to_ram's copy
 * (WILV_INLINE, its pad bytes NaN scales: never read; made from either
 * layout, the same bytes). True if set K
 * computes each bit for bit as it did the row-major tile (ref), the same
 * operations on each row, and dequant_rows gives the same rows; *ran counts
 * the tiles of each layout it applied to. */
static bool interleaved_same(const wkernels *K, const tile_case *k, const float *ref, float *out, int ran[2])
{
    const int64_t row = wtype_row_bytes(k->t, k->C), groups = (k->nrows + WILV - 1) / WILV;
    if (row % 64) return true;
    bool same = true;
    const size_t rows_bytes = sizeof(float) * (size_t)(k->nrows * k->C);
    float *a = malloc(rows_bytes), *b = malloc(rows_bytes);
    dequant_rows(a, k->w, 0, k->nrows, k->C);
    uint8_t *d[2] = {NULL, NULL};
    for (int layout = 1; layout <= (k->w.scales ? WILV_INLINE : 1); layout++) {
        wview w = k->w;
        if (layout == WILV_INLINE) w.scales = NULL;
        w.ilv = layout;
        const int64_t bytes = wview_bytes(w, groups * WILV, k->C);
        d[layout - 1] = aligned_alloc(64, (size_t)(bytes + 63) / 64 * 64);
        memset(d[layout - 1], layout == WILV_INLINE ? 0xff : 0, (size_t)bytes);
        w.data = d[layout - 1];
        if (layout == 1) interleave_rows(d[0], k->w.data, k->nrows, row);
        else { /* from the row-major rows, and the same bytes from the interleaved ones */
            inline_rows(d[1], k->w, k->nrows, k->C);
            uint8_t *again = aligned_alloc(64, (size_t)(bytes + 63) / 64 * 64);
            memset(again, 0xff, (size_t)bytes);
            inline_rows(again, (wview){k->t, d[0], k->w.scales, 1}, k->nrows, k->C);
            same &= memcmp(again, d[1], (size_t)bytes) == 0;
            free(again);
        }
        for (int64_t i = 0; i < k->n * k->ldo; i++) memcpy(&out[i], &UNWRITTEN, 4);
        wkernel_for(K, k->t)(out, k->ldo, w, k->nrows, k->x, k->xq, k->xs, k->n, k->C);
        same &= memcmp(out, ref, sizeof(float) * (size_t)(k->n * k->ldo)) == 0;
        /* and prefill's dequantization reads it as it reads the row-major rows */
        dequant_rows(b, w, 0, k->nrows, k->C);
        same &= memcmp(a, b, rows_bytes) == 0;
        ran[layout - 1]++;
    }
    free(a), free(b), free(d[0]), free(d[1]);
    return same;
}

/* Whether set K gives each row of a tile (ref, from one call over them all)
 * the same bits alone, as a tile of one row: a row's sum does not depend on
 * which rows share its pass (4 a pass, the last ones 1; their sums reduced
 * together or alone). Row-major tiles; it can fail where a set reduces rows
 * together (avx512 Q8/Q4: reduce4), elsewhere it guards future changes.
 * The interleaved passes (int8_pass_one among them) are held to the
 * row-major ones bit for bit by interleaved_same. */
static bool rows_alone_same(const wkernels *K, const tile_case *k, const float *ref)
{
    bool same = true;
    float *one = malloc(sizeof(float) * (size_t)k->n);
    for (int64_t i = 0; i < k->nrows; i++) {
        wkernel_for(K, k->t)(one, 1, wview_rows(k->w, i, k->C), 1, k->x, k->xq, k->xs, k->n, k->C);
        for (int64_t r = 0; r < k->n; r++) same &= memcmp(&one[r], &ref[r * k->ldo + i], 4) == 0;
    }
    free(one);
    return same;
}

/* Whether set K gives each input of a tile (ref, from one call over them
 * all) the same bits alone, as a tile of one input: an input's sums do not
 * depend on the inputs beside it in a pass, nor on how many the tile has
 * (BF16 and Q4 inputs are prepared once a tile where they fit its buffer,
 * and taken as they are where they do not: at C = 4500 a BF16 tile of one
 * input is prepared, one of 8 is not). */
static bool inputs_alone_same(const wkernels *K, const tile_case *k, const float *ref)
{
    const int q = k->t == WT_Q8 || k->t == WT_Q4;
    bool same = true;
    float *one = malloc(sizeof(float) * (size_t)k->nrows);
    for (int64_t r = 0; r < k->n; r++) {
        const void *xq = k->t == WT_BF16 ? (const void *)((const uint16_t *)k->xq + r * k->C)
                         : q             ? (const void *)((const int8_t *)k->xq + r * k->C)
                                         : k->xq;
        wkernel_for(K, k->t)(one, k->nrows, k->w, k->nrows, k->x + r * k->C, xq,
                             q ? k->xs + r * 2 * (k->C / QBLOCK) : k->xs, 1, k->C);
        same &= memcmp(one, ref + r * k->ldo, sizeof(float) * (size_t)k->nrows) == 0;
    }
    free(one);
    return same;
}

/* Worst |got - ref| over the tile in units of KERNEL_TOL * sum |w x|
 * (<= 1 passes; a NaN, as an unwritten output, counts as infinite). */
#define KERNEL_TOL 2e-6
static double tile_error(const tile_case *k, const float *got, const float *ref_f, const double *ref_d)
{
    double worst = 0;
    for (int64_t r = 0; r < k->n; r++)
        for (int64_t i = 0; i < k->nrows; i++) {
            double g = got[r * k->ldo + i], want = ref_f ? ref_f[r * k->ldo + i] : ref_d[r * k->nrows + i];
            double e = g == want ? 0 : fabs(g - want) / (KERNEL_TOL * k->mag[r * k->nrows + i]);
            worst = fmax(worst, e == e ? e : INFINITY);
        }
    return worst;
}

/* AMD family 25 (0x19: Zen 3 and Zen 4; only Zen 4 has AVX-512), from
 * /proc/cpuinfo (0 where there is none). */
static int cpuinfo_amd_19h(void)
{
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return 0;
    char line[256];
    int amd = 0, family = -1;
    while (fgets(line, sizeof line, f) && family < 0) {
        if (!strncmp(line, "vendor_id", 9)) amd = strstr(line, "AuthenticAMD") != NULL;
        if (!strncmp(line, "cpu family", 10)) sscanf(strchr(line, ':') + 1, "%d", &family);
    }
    fclose(f);
    return amd && family == 25;
}

/* Every set this CPU runs, every type, over tiles of nrows 1..9 weight rows
 * and n 1..8 inputs, with C tails, tiny and large magnitudes, ldo > nrows and
 * no alignment, against the float64 sums and against the portable set.
 * The tolerance, 2e-6 of sum |w x| (34 units of fp32 rounding, 2^-24): Q8/Q4
 * sum each block exactly in int32, so their error is fp32 rounding alone,
 * like F32's and BF16's: one rounding per scale product and per addition to
 * an accumulator of at most C terms. Bounded only by C units in the worst
 * case, those errors take random signs and the partial sums grow like
 * sqrt(terms), so they stay at a few units whatever C (the worst is printed:
 * ~6 for the portable set's single running sum). */
static void test_kernels(void)
{
    const wkernels *K[NSETS];
    for (int s = 0; s < NSETS; s++) {
        K[s] = wkernels_get(kernel_sets[s]);
        char why[160];
        if (!K[s] && wkernels_missing(kernel_sets[s], why, sizeof why) == 0)
            printf("SKIP kernels_%s (this CPU lacks %s)\n", kernel_labels[s], why);
    }
    printf("kernel sets this CPU runs, tested below:");
    for (int s = 0; s < NSETS; s++)
        if (K[s]) printf(" %s", kernel_sets[s]);
    printf(" (skipped: the SKIP lines above, if any); avx512 here is %s\n",
           wkernels_get("avx512") ? wkernels_get("avx512")->name : "none");
    const wkernels *best = wkernels_get("avx512")  ? wkernels_get("avx512")
                           : wkernels_get("avx2") ? wkernels_get("avx2")
                                                  : K[0];
    char none[8] = "x";
    /* the bare name is this CPU's tuning ("stream" on AMD family 0x19, as
     * /proc/cpuinfo tells it apart from wkernels.c's cpuid), and each tuning
     * is its own name */
    const int amd19 = cpuinfo_amd_19h();
    int tunings_named = wkernels_get("avx2") == (K[1] && amd19 ? K[2] : K[1]) &&
                        wkernels_get("avx512") == (K[3] && amd19 ? K[4] : K[3]);
    for (int s = 1; s < NSETS; s++) tunings_named &= !K[s] || !strcmp(K[s]->name, kernel_sets[s]);
    printf("this CPU is %sof AMD family 0x19 (/proc/cpuinfo)\n", amd19 ? "" : "not ");
    check(K[0] && wkernels_get("auto") == best && tunings_named && !wkernels_get("avx512-nonsense") &&
              !wkernels_get("avx512:") && !wkernels_get("avx512:nonsense") && !wkernels_get(":stream") &&
              wkernels_missing("avx512-nonsense", none, sizeof none) < 0 &&
              wkernels_missing("avx512:nonsense", none, sizeof none) < 0 &&
              wkernels_missing("portable", none, sizeof none) == 0 && none[0] == 0,
          "kernels_table_lookup",
          "auto is %s (best this CPU runs: %s), avx2 is %s, avx512 is %s (AMD family 0x19: %d); or a name unknown "
          "or mismatched taken",
          wkernels_get("auto") ? wkernels_get("auto")->name : "NULL", best ? best->name : "none",
          wkernels_get("avx2") ? wkernels_get("avx2")->name : "NULL",
          wkernels_get("avx512") ? wkernels_get("avx512")->name : "NULL", amd19);

    static const wtype types[] = {WT_F32, WT_BF16, WT_Q8, WT_Q4};
    static const char *names[] = {"f32", "bf16", "q8", "q4"};
    /* 1024 and 2048: whole lines, several steps of the interleaved passes */
    static const int64_t sizes_f[] = {1, 5, 16, 17, 31, 32, 33, 47, 64, 100, 257, 1000, 1024, 2048, 2065, 4500};
    /* 5632 (JetMoE-8B's FFN): Q4 tiles of up to 4 inputs have them prepared
     * once a tile (the avx512 set), of 5 and more made in every pass; 64
     * (Q8), 128, 384, 640 and 896: partial steps of QSTEP blocks in the
     * WILV_INLINE layout (2, 4, 12, 16 + 4, 16 + 12 blocks) */
    static const int64_t sizes_q[] = {32, 64, 96, 128, 160, 224, 384, 480, 512, 544, 640, 896, 1056, 2048, 5632};
    /* weight and input amplitudes: products near 1e-30, 1 and 1e30 (F32/BF16);
     * for Q8/Q4 F16 scales from subnormal (1e-3 / 127) to ~80 */
    static const float wamp_f[] = {1e-15f, 1.0f, 1e15f}, wamp_q[] = {1e-3f, 1.0f, 1e4f};
    static const float xamp[] = {1e-15f, 1.0f, 1e15f};
    for (int ti = 0; ti < 4; ti++) {
        const int q = types[ti] == WT_Q8 || types[ti] == WT_Q4;
        const int64_t *sizes = q ? sizes_q : sizes_f;
        const size_t nsizes = q ? sizeof sizes_q / sizeof *sizes_q : sizeof sizes_f / sizeof *sizes_f;
        double vs_ref[NSETS] = {0}, vs_port[NSETS] = {0};
        int tiles = 0, stray[NSETS] = {0}, ilv_tiles[NSETS][2] = {{0}}, ilv_differ[NSETS] = {0}, alone[NSETS] = {0};
        int inputs_alone[NSETS] = {0};
        /* tiles where a set's "stream" tuning disagrees with its "prefetch" by a bit */
        int tunings_differ[NSETS] = {0};
        for (size_t si = 0; si < nsizes; si++)
            for (int64_t nrows = 1; nrows <= 9; nrows++)
                for (int64_t n = 1; n <= 8; n++, tiles++) {
                    const int a = tiles % 3;
                    tile_case k = make_tile_case(types[ti], nrows, n, sizes[si], q ? wamp_q[a] : wamp_f[a],
                                                 xamp[(tiles / 3) % 3], tiles % 61);
                    /* exactly n x ldo: a write past it is a sanitizer's error */
                    float *out = malloc((size_t)(n * k.ldo) * sizeof *out), *port = malloc((size_t)(n * k.ldo) * 4);
                    float *ilv = malloc((size_t)(n * k.ldo) * sizeof *ilv);
                    stray[0] += !run_tile(K[0], &k, port);
                    vs_ref[0] = fmax(vs_ref[0], tile_error(&k, port, NULL, k.want));
                    ilv_differ[0] += !interleaved_same(K[0], &k, port, ilv, ilv_tiles[0]);
                    alone[0] += !rows_alone_same(K[0], &k, port);
                    inputs_alone[0] += !inputs_alone_same(K[0], &k, port);
                    float *tuned = malloc((size_t)(n * k.ldo) * sizeof *tuned);
                    for (int s = 1; s < NSETS; s++) {
                        if (!K[s]) continue;
                        stray[s] += !run_tile(K[s], &k, out);
                        if (TUNED(s) && K[s - 1])
                            tunings_differ[s] += memcmp(tuned, out, (size_t)(n * k.ldo) * sizeof *out) != 0;
                        memcpy(tuned, out, (size_t)(n * k.ldo) * sizeof *out);
                        vs_ref[s] = fmax(vs_ref[s], tile_error(&k, out, NULL, k.want));
                        vs_port[s] = fmax(vs_port[s], tile_error(&k, out, port, NULL));
                        ilv_differ[s] += !interleaved_same(K[s], &k, out, ilv, ilv_tiles[s]);
                        alone[s] += !rows_alone_same(K[s], &k, out);
                        inputs_alone[s] += !inputs_alone_same(K[s], &k, out);
                    }
                    free(ilv), free(tuned);
                    free_tile_case(&k);
                    free(out), free(port);
                }
        /* avx512:stream has passes of its own; avx2:stream runs avx2:prefetch's
         * with other prefetch distances, and this holds a pass of its own to
         * the same bits should it get one */
        for (int s = 1; s < NSETS; s++) {
            if (!TUNED(s) || !K[s] || !K[s - 1]) continue;
            char name[64];
            snprintf(name, sizeof name, "kernels_%.*s_tunings_same_bits_%s", (int)strcspn(kernel_sets[s], ":"),
                     kernel_sets[s], names[ti]);
            check_detail(!tunings_differ[s], name, "%d tiles: %d differ between %s and %s", tiles, tunings_differ[s],
                         kernel_sets[s - 1], kernel_sets[s]);
        }
        for (int s = 0; s < NSETS; s++) {
            if (!K[s]) continue;
            char name[64];
            snprintf(name, sizeof name, "kernels_%s_%s_vs_float64", kernel_labels[s], names[ti]);
            check_detail(vs_ref[s] <= 1 && !stray[s], name,
                         "%d tiles: worst error %.3f of 2e-6 sum |w x|; %d wrote outside their columns", tiles,
                         vs_ref[s], stray[s]);
            snprintf(name, sizeof name, "kernels_%s_%s_interleaved_rows", kernel_labels[s], names[ti]);
            check_detail(ilv_tiles[s][0] > 50 && (!q || ilv_tiles[s][1] == ilv_tiles[s][0]) && !ilv_differ[s], name,
                         "%d tiles of whole lines with their rows interleaved, %d with their scales inline too: %d "
                         "differ from row-major by a bit",
                         ilv_tiles[s][0], ilv_tiles[s][1], ilv_differ[s]);
            snprintf(name, sizeof name, "kernels_%s_%s_rows_alone_same", kernel_labels[s], names[ti]);
            check_detail(!alone[s], name, "%d tiles: %d gave some row other bits than a tile of that row alone", tiles,
                         alone[s]);
            snprintf(name, sizeof name, "kernels_%s_%s_inputs_alone_same", kernel_labels[s], names[ti]);
            check_detail(!inputs_alone[s], name, "%d tiles: %d gave some input other bits than a tile of that input "
                         "alone", tiles, inputs_alone[s]);
            if (s == 0) continue;
            snprintf(name, sizeof name, "kernels_%s_%s_vs_portable", kernel_labels[s], names[ti]);
            check_detail(vs_port[s] <= 1, name, "%d tiles: worst difference %.3f of 2e-6 sum |w x|", tiles,
                         vs_port[s]);
        }
    }

    /* the read-only tiles (bench/decode --kernels read): every type, their
     * columns only and finite values; never given by name or "auto", and with
     * the attention kernels of the best set */
    {
        const wkernels *R = wkernels_read();
        int stray_r = 0, nonfinite = 0, cases = 0;
        for (int ti = 0; ti < 4; ti++)
            for (int64_t nrows = 1; nrows <= 9; nrows += 4)
                for (int64_t n = 1; n <= 8; n += 3, cases++) {
                    const int q = types[ti] == WT_Q8 || types[ti] == WT_Q4;
                    tile_case k = make_tile_case(types[ti], nrows, n, q ? 96 : 33, 1.0f, 1.0f, cases);
                    float *out = malloc((size_t)(n * k.ldo) * sizeof *out); /* exact: overruns are the sanitizer's */
                    stray_r += !run_tile(R, &k, out);
                    for (int64_t r = 0; r < n; r++)
                        for (int64_t o = 0; o < nrows; o++) nonfinite += !isfinite(out[r * k.ldo + o]);
                    free(out);
                    free_tile_case(&k);
                }
        check_detail(!stray_r && !nonfinite && !strcmp(R->name, "read") && !wkernels_get("read") &&
                         R->att_scores == best->att_scores && R->att_values == best->att_values,
                     "kernels_read_only_tiles", "%d tiles: %d wrote outside their columns, %d non-finite outputs; "
                     "named %s; by name: %s; the best set's attention: %d", cases, stray_r, nonfinite, R->name,
                     wkernels_get("read") ? "given" : "refused", R->att_scores == best->att_scores);
    }

    /* the avx512 set of a CPU without AVX-512 BF16 (Intel's Skylake-X to Ice
     * Lake): BF16 through the AVX2 passes, the rest the avx512 set's kernels */
    {
        const wkernels *N = wkernels_avx512_no_bf16(), *A = wkernels_get("avx512:prefetch");
        const wkernels *V2 = wkernels_get("avx2:prefetch");
        if (!N || !A || !V2) {
            printf("SKIP kernels_avx512_without_bf16_extension (this CPU cannot run it)\n");
        } else {
            tile_case k = make_tile_case(WT_BF16, 9, 3, 1000, 1.0f, 1.0f, 7);
            float *a = malloc((size_t)(3 * k.ldo) * sizeof *a), *b = malloc((size_t)(3 * k.ldo) * sizeof *b);
            const int ok_run = run_tile(N, &k, a) && run_tile(V2, &k, b);
            const int same = ok_run && memcmp(a, b, (size_t)(3 * k.ldo) * sizeof *a) == 0;
            free(a), free(b);
            free_tile_case(&k);
            check_detail(!strcmp(N->name, "avx512:prefetch") && N->f32 == A->f32 && N->q8 == A->q8 && N->q4 == A->q4 &&
                             N->att_scores == A->att_scores && N->att_values == A->att_values && same,
                         "kernels_avx512_without_bf16_extension",
                         "named %s; F32/Q8/Q4/attention the avx512 set's: %d; a BF16 tile bit for bit the avx2 "
                         "set's: %d", N->name, N->f32 == A->f32 && N->q8 == A->q8 && N->q4 == A->q4, same);
        }
    }

    /* the extremes of the int8 formats, which no product may saturate on:
     * a file may hold Q8 -128 (our quantizer never writes it), and Q4 nibbles
     * all 0 (-8) or all 15 (7), against activations of +-127 */
    int8_t w8[64 * 3];
    uint8_t w4[32 * 3], s1[6 * 3]; /* three rows of 64 inputs */
    for (int i = 0; i < 64 * 3; i++) w8[i] = i < 64 ? -128 : i < 128 ? 127 : (i % 2 ? -128 : 127);
    for (int i = 0; i < 32 * 3; i++) w4[i] = i < 32 ? 0x00 : i < 64 ? 0xff : (i % 2 ? 0x0f : 0xf0);
    for (int i = 0; i < 6 * 3; i += 2) s1[i] = 0x00, s1[i + 1] = 0x3c; /* F16 1.0 */
    float x[64 * 2];
    for (int i = 0; i < 128; i++) x[i] = i < 64 ? (i % 3 ? 1.0f : -1.0f) : (i % 2 ? -1.0f : 1.0f);
    int8_t xq[128];
    float xs[8];
    quantize_act_q8(xq, xs, x, 64), quantize_act_q8(xq + 64, xs + 4, x + 64, 64);
    double worst = 0;
    for (int q4 = 0; q4 < 2; q4++) {
        wview w = q4 ? (wview){WT_Q4, w4, s1, 0} : (wview){WT_Q8, w8, s1, 0};
        float got[6];
        for (int s = 0; s < NSETS; s++) {
            if (!K[s]) continue;
            wkernel_for(K[s], w.type)(got, 3, w, 3, x, xq, xs, 2, 64);
            for (int r = 0; r < 2; r++)
                for (int i = 0; i < 3; i++) {
                    double want = 0, mag = 0;
                    for (int c = 0; c < 64; c++) {
                        double p = stored_weight(w, i, c, 64) * xs[r * 4 + c / 32] * xq[r * 64 + c];
                        want += p, mag += fabs(p);
                    }
                    worst = fmax(worst, fabs(got[r * 3 + i] - want) / (KERNEL_TOL * mag));
                }
        }
    }
    check_detail(worst <= 1, "kernels_int8_extremes_no_saturation", "worst error %.3f of 2e-6 sum |w x|", worst);
}

/* The WILV_INLINE layout's bytes where ops.h puts them, worked out by hand:
 * Q8, C = 640 (20 blocks: a step of 16 and one of 4): a group 4 * 640 data
 * + 128 + 64 (the partial step's 32 scale bytes padded) = 2752 bytes, a
 * full step 4 * 512 + 128 = 2176; Q4, C = 640: a group 4 * 320 + 128 + 64
 * = 1472, a full step 4 * 256 + 128 = 1152. Then stacks of experts so laid
 * out, rows of several steps and a partial one (C = 896: 16 + 12 blocks),
 * multiply as their row-major stack does bit for bit, every expert, on the
 * decode pool (dot kernels) and on OpenMP (tiles dequantized for SGEMM, one
 * from row 64 on), and inline_rows writes the padding as zeros. */
static void test_inline_layout(void)
{
    static uint8_t two_groups[2 * 2752]; /* only addresses are taken in it */
    const wview q8 = {WT_Q8, two_groups, NULL, WILV_INLINE}, q4 = {WT_Q4, two_groups, NULL, WILV_INLINE};
    const uint8_t *b8 = wrow_byte(q8, 0, 0, 640), *b4 = wrow_byte(q4, 0, 0, 320);
    /* scale of row 5 block 17: group 1, step 1, after its 4 x 4 x 32 data
     * bytes, row 1 of the group: 2752 + 2176 + 512 + (1 * 4 + 1) * 2 */
    const bool by_hand = wview_bytes(q8, 8, 640) == 2 * 2752 && wview_bytes(q4, 8, 640) == 2 * 1472 &&
                         wscale_ptr(q8, 5, 17, 20) - b8 == 2752 + 2176 + 512 + 10 &&
                         wrow_byte(q8, 6, 520, 640) - b8 == 2752 + 2176 + 2 * 64 + 8 &&
                         wrow_byte(q8, 3, 100, 640) - b8 == (1 * 4 + 3) * 64 + 36 &&
                         wscale_ptr(q4, 2, 19, 20) - b4 == 1152 + 256 + (2 * 4 + 3) * 2 &&
                         wscale_ptr(q4, 2, 3, 20) - b4 == 4 * 256 + (2 * 16 + 3) * 2 &&
                         wview_rows(q8, 8, 640).data == (const void *)(b8 + 2 * 2752);
    check(by_hand, "wilv_inline_offsets_by_hand", "an offset of the WILV_INLINE layout is not ops.h's");

    const int threads = omp_get_max_threads();
    jm_pool *pool = jm_pool_create(2);
    const int E = 4;
    const int64_t C = 896, O = 72;
    static const wtype types[] = {WT_Q8, WT_Q4};
    for (int ti = 0; ti < 2; ti++) {
        void *data;
        uint8_t *sc;
        const wview W = random_matrix(types[ti], E * O, C, &data, &sc, 0.1f);
        wview I = {types[ti], NULL, NULL, WILV_INLINE};
        const size_t bytes = (size_t)wview_bytes(I, E * O, C);
        uint8_t *d = aligned_alloc(64, (bytes + 63) / 64 * 64);
        memset(d, 0xff, bytes);
        inline_rows(d, W, E * O, C);
        I.data = d;
        int pad_zero = 1; /* the partial step's scales: 4 rows x 12 blocks = 96 bytes, padded to 128 */
        for (int64_t g = 0; g < E * O / WILV; g++) {
            const uint8_t *end = wscale_ptr(I, g * WILV, 16, C / QBLOCK) + WILV * 2 * 12;
            for (int k = 0; k < 32; k++) pad_zero &= end[k] == 0;
        }
        static const int64_t offs[2][5] = {{0, 3, 3, 30, 31}, {0, 3, 3, 8, 9}}; /* OpenMP (tiles), then the pool */
        const int64_t Nk = 31;
        float *xs = malloc((size_t)(Nk * C) * 4), *a = malloc((size_t)(Nk * O) * 4), *b = malloc((size_t)(Nk * O) * 4);
        for (int64_t i = 0; i < Nk * C; i++) xs[i] = frand();
        void *scratch = malloc(wmatmul_scratch_bytes(Nk, C, threads, 0));
        int same = 1;
        for (int pass = 0; pass < 2; pass++) {
            memset(a, 0, (size_t)(Nk * O) * 4), memset(b, 0xff, (size_t)(Nk * O) * 4);
            wexperts_forward(a, xs, W, offs[pass], E, C, O, wkernels_get("auto"), scratch, pool);
            wexperts_forward(b, xs, I, offs[pass], E, C, O, wkernels_get("auto"), scratch, pool);
            same &= memcmp(a, b, (size_t)(offs[pass][E] * O) * 4) == 0;
        }
        float *ra = malloc((size_t)(O * C) * 4), *rb = malloc((size_t)(O * C) * 4);
        dequant_rows(ra, wview_rows(W, 2 * O, C), 8, O - 8, C);
        dequant_rows(rb, wview_rows(I, 2 * O, C), 8, O - 8, C);
        same &= memcmp(ra, rb, (size_t)((O - 8) * C) * 4) == 0;
        char name[64];
        snprintf(name, sizeof name, "wilv_inline_%s_experts_same_as_row_major", types[ti] == WT_Q8 ? "q8" : "q4");
        check_detail(same && pad_zero, name, "products (rows 3/0/27/1 and 3/0/5/1) and expert 2's rows %s; "
                     "padding %s", same ? "bit for bit" : "differ", pad_zero ? "zeros" : "not zeroed");
        free(ra), free(rb), free(xs), free(a), free(b), free(scratch), free(d), free(data), free(sc);
    }
    jm_pool_free(pool);
}

/* The attention kernels (akernels.c) of every set this CPU runs, over a
 * cache of fp32 and of bf16, D from 2 to 1024 (tails of every set's vector), 1 to 100 cached rows (tails
 * of the key blocks), 1 to 5 query slots (pairs and a single), row strides
 * past the rows, pointers off alignment and magnitudes from 1e-12 to 1e12,
 * against float64 sums and against the portable set, at the tolerance of
 * the weight kernels above; and no write outside the n scores or D values
 * of a slot. */
static double att_error(double got, double want, double mag)
{
    double e = got == want ? 0 : fabs(got - want) / (KERNEL_TOL * mag);
    return e == e ? e : INFINITY;
}

static void test_att_kernels(void)
{
    static const int dims[] = {2, 6, 16, 30, 32, 34, 48, 64, 96, 128, 130, 256, 1024};
    static const int keys[] = {1, 3, 7, 8, 9, 16, 17, 100};
    static const float amps[] = {1e-12f, 1.0f, 1e12f};
    const wkernels *K[NSETS];
    for (int s = 0; s < NSETS; s++) K[s] = wkernels_get(kernel_sets[s]);
    double worst_s[NSETS] = {0}, worst_v[NSETS] = {0}, port_s[NSETS] = {0}, port_v[NSETS] = {0};
    int stray[NSETS] = {0}, cases = 0;
    for (int bf16 = 0; bf16 < 2; bf16++)
        for (size_t di = 0; di < sizeof dims / sizeof *dims; di++)
            for (size_t ki = 0; ki < sizeof keys / sizeof *keys; ki++)
                for (int nq = 1; nq <= 5; nq++, cases++) {
                    const int D = dims[di], n = keys[ki];
                    const int64_t ldq = D + 5, lds = n + 3, ldo = D + 7, ldp = n + 2;
                    const float qa = amps[cases % 3], ka = amps[(cases / 3) % 3], scale = 1.0f / sqrtf((float)D);
                    /* off alignment: q one float in, K and V one value in */
                    const size_t esize = bf16 ? 2 : 4;
                    float *qbuf = malloc(sizeof(float) * (size_t)(nq * ldq + 1)), *q = qbuf + 1;
                    char *kbuf = malloc(esize * (size_t)(n * D + 1)), *vbuf = malloc(esize * (size_t)(n * D + 1));
                    char *Kc = kbuf + esize, *Vc = vbuf + esize;
                    float *P = malloc(sizeof(float) * (size_t)(nq * ldp));
                    double *Kd = malloc(sizeof(double) * (size_t)(n * D));
                    double *Vd = malloc(sizeof(double) * (size_t)(n * D));
                    for (int64_t i = 0; i < nq * ldq; i++) q[i] = qa * frand();
                    for (int64_t i = 0; i < (int64_t)n * D; i++)
                        for (int v = 0; v < 2; v++) {
                            const float f = (v ? 1.0f : ka) * frand();
                            char *to = (v ? Vc : Kc) + (size_t)i * esize;
                            const uint16_t b = jm_f32_to_bf16(f);
                            if (bf16) memcpy(to, &b, 2);
                            else memcpy(to, &f, 4);
                            (v ? Vd : Kd)[i] = bf16 ? jm_bf16_to_f32(b) : f; /* what the cache holds */
                        }
                    for (int64_t i = 0; i < nq * ldp; i++) P[i] = frand();
                    float *S[NSETS], *O[NSETS];
                    for (int s = 0; s < NSETS; s++) {
                        S[s] = O[s] = NULL;
                        if (!K[s]) continue;
                        S[s] = malloc(sizeof(float) * (size_t)(nq * lds));
                        O[s] = malloc(sizeof(float) * (size_t)(nq * ldo));
                        for (int64_t i = 0; i < nq * lds; i++) memcpy(&S[s][i], &UNWRITTEN, 4);
                        for (int64_t i = 0; i < nq * ldo; i++) memcpy(&O[s][i], &UNWRITTEN, 4);
                        K[s]->att_scores(S[s], lds, q, ldq, nq, Kc, bf16, n, D, scale);
                        K[s]->att_values(O[s], ldo, P, ldp, nq, Vc, bf16, n, D);
                        for (int sl = 0; sl < nq; sl++) {
                            for (int64_t i = n; i < lds; i++)
                                stray[s] += memcmp(&S[s][sl * lds + i], &UNWRITTEN, 4) != 0;
                            for (int64_t c = D; c < ldo; c++)
                                stray[s] += memcmp(&O[s][sl * ldo + c], &UNWRITTEN, 4) != 0;
                        }
                    }
                    for (int sl = 0; sl < nq; sl++) {
                        for (int i = 0; i < n; i++) {
                            double want = 0, mag = 0;
                            for (int c = 0; c < D; c++) {
                                double p = (double)q[sl * ldq + c] * Kd[(int64_t)i * D + c] * scale;
                                want += p, mag += fabs(p);
                            }
                            for (int s = 0; s < NSETS; s++) {
                                if (!K[s]) continue;
                                worst_s[s] = fmax(worst_s[s], att_error(S[s][sl * lds + i], want, mag));
                                port_s[s] = fmax(port_s[s], att_error(S[s][sl * lds + i], S[0][sl * lds + i], mag));
                            }
                        }
                        for (int c = 0; c < D; c++) {
                            double want = 0, mag = 0;
                            for (int i = 0; i < n; i++) {
                                double p = (double)P[sl * ldp + i] * Vd[(int64_t)i * D + c];
                                want += p, mag += fabs(p);
                            }
                            for (int s = 0; s < NSETS; s++) {
                                if (!K[s]) continue;
                                worst_v[s] = fmax(worst_v[s], att_error(O[s][sl * ldo + c], want, mag));
                                port_v[s] = fmax(port_v[s], att_error(O[s][sl * ldo + c], O[0][sl * ldo + c], mag));
                            }
                        }
                    }
                    for (int s = 0; s < NSETS; s++) free(S[s]), free(O[s]);
                    free(qbuf), free(kbuf), free(vbuf), free(P), free(Kd), free(Vd);
                }
    for (int s = 0; s < NSETS; s++) {
        if (!K[s]) continue; /* test_kernels printed the sets skipped */
        char name[64];
        snprintf(name, sizeof name, "att_kernels_%s_vs_float64", kernel_labels[s]);
        check_detail(worst_s[s] <= 1 && worst_v[s] <= 1 && !stray[s], name,
                     "%d cases: worst error, scores %.3f, values %.3f of 2e-6 sum |products|; %d writes outside "
                     "the scores or values",
                     cases, worst_s[s], worst_v[s], stray[s]);
        if (s == 0) continue;
        snprintf(name, sizeof name, "att_kernels_%s_vs_portable", kernel_labels[s]);
        check_detail(port_s[s] <= 1 && port_v[s] <= 1, name,
                     "%d cases: worst difference, scores %.3f, values %.3f of 2e-6 sum |products|", cases,
                     port_s[s], port_v[s]);
    }
}

/* ---- products ---- */

/* Reference: out = x @ dequant(W)^T in float64, with x as the dot kernels
 * take it: act 0 as it is, 1 quantized to int8 blocks, 2 rounded to bf16. */
enum { ACT_F32, ACT_INT8, ACT_BF16 };
static void ref_matmul(float *out, const float *x, wview W, int64_t N, int64_t C, int64_t O, int act)
{
    float *row = malloc((size_t)C * sizeof *row), *xd = malloc((size_t)(N * C) * sizeof *xd);
    int8_t *xq = malloc((size_t)C);
    float *xs = malloc((size_t)(2 * (C / 32) + 1) * sizeof *xs);
    for (int64_t r = 0; r < N; r++) {
        if (act == ACT_INT8) {
            quantize_act_q8(xq, xs, x + r * C, C);
            for (int64_t i = 0; i < C; i++) xd[r * C + i] = xs[i / 32] * xq[i];
        } else if (act == ACT_BF16) {
            for (int64_t i = 0; i < C; i++) xd[r * C + i] = jm_bf16_to_f32(jm_f32_to_bf16(x[r * C + i]));
        } else {
            memcpy(xd + r * C, x + r * C, (size_t)C * sizeof *xd);
        }
    }
    for (int64_t o = 0; o < O; o++) {
        dequant_rows(row, W, o, 1, C);
        for (int64_t r = 0; r < N; r++) {
            double s = 0;
            for (int64_t i = 0; i < C; i++) s += (double)row[i] * xd[r * C + i];
            out[r * O + o] = (float)s;
        }
    }
    free(row);
    free(xd);
    free(xq);
    free(xs);
}

/* How weights of type t take an expert's n input rows: BF16 always rounded
 * to bf16; Q8/Q4 as int8 blocks in the dot kernels (up to WSMALL_N rows),
 * fp32 in prefill's tiles. */
static int act_of(wtype t, int64_t n)
{
    if (t == WT_BF16) return ACT_BF16;
    return t == WT_F32 || n > WSMALL_N ? ACT_F32 : ACT_INT8;
}

/* RMS of the difference over the RMS of b: the size of an error spread over
 * every logit (int8 activations perturb all of them a little). */
static double rms_rel(const float *a, const float *b, int64_t n)
{
    double d = 0, m = 1e-30;
    for (int64_t i = 0; i < n; i++) {
        d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        m += (double)b[i] * b[i];
    }
    return sqrt(d / m);
}

static double max_rel(const float *a, const float *b, int64_t n)
{
    double d = 0, m = 1e-30;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(b[i])) return INFINITY; /* fmax would pass a NaN over */
        d = fmax(d, fabs((double)a[i] - b[i]));
        m = fmax(m, fabs((double)b[i]));
    }
    return d / m;
}

static void test_products(void)
{
    const int64_t C = 288, O = 150; /* 9 blocks: the SIMD main loop and a tail; O not a multiple of the tile */
    const int threads = omp_get_max_threads();
    static const wtype types[] = {WT_BF16, WT_Q8, WT_Q4, WT_F32};
    static const char *names[] = {"bf16", "q8", "q4", "f32"};
    /* each product on OpenMP and on a decode pool of 3 threads (chunks of
     * experts' rows run on it when no expert has more than WSMALL_N rows) */
    jm_pool *pool = jm_pool_create(3);
    for (int ki = 0; ki < NSETS; ki++) {
        const char *kern = kernel_sets[ki];
        const wkernels *K = wkernels_get(kern);
        if (!K) {
            printf("SKIP wmatmul_%s (this CPU cannot run it)\n", kernel_labels[ki]);
            continue;
        }
        for (int ti = 0; ti < 4; ti++) {
            void *data;
            uint8_t *sc;
            wview W = random_matrix(types[ti], O, C, &data, &sc, 0.1f);
            double worst = 0, worst_pool = 0;
            static const int64_t Ns[] = {1, 3, 8, 9, 19}; /* dot kernels up to WSMALL_N rows, then tiles */
            for (size_t ni = 0; ni < sizeof Ns / sizeof *Ns; ni++) {
                const int64_t N = Ns[ni];
                float *x = malloc((size_t)(N * C) * 4), *got = malloc((size_t)(N * O) * 4),
                      *want = malloc((size_t)(N * O) * 4);
                for (int64_t i = 0; i < N * C; i++) x[i] = frand();
                void *scratch = malloc(wmatmul_scratch_bytes(N, C, threads, types[ti] == WT_BF16));
                ref_matmul(want, x, W, N, C, O, act_of(types[ti], N));
                wmatmul_forward(got, x, W, N, C, O, K, scratch, NULL);
                worst = fmax(worst, max_rel(got, want, N * O));
                memset(got, 0xff, (size_t)(N * O) * 4); /* NaN: a row the pool skips shows */
                wmatmul_forward(got, x, W, N, C, O, K, scratch, pool);
                worst_pool = fmax(worst_pool, max_rel(got, want, N * O));
                free(x), free(got), free(want), free(scratch);
            }
            char name[64];
            snprintf(name, sizeof name, "wmatmul_%s_%s", names[ti], kernel_labels[ki]);
            check_detail(worst < 1e-5, name, "N = 1, 3, 8, 9, 19: worst %.2e of max |out|", worst);
            snprintf(name, sizeof name, "wmatmul_%s_%s_on_decode_pool", names[ti], kernel_labels[ki]);
            check_detail(worst_pool < 1e-5, name, "N = 1, 3, 8, 9, 19: worst %.2e of max |out|", worst_pool);
            free(data), free(sc);
        }
    }

    /* grouped experts: some with a few rows (dot kernels), some with many (tiles), one empty */
    const int E = 4;
    const int64_t offsets[5] = {0, 3, 3, 30, 31};
    const int64_t few[5] = {0, 3, 3, 8, 9}; /* rows 3/0/5/1: all on the pool */
    for (int ti = 0; ti < 4; ti++) {
        void *data;
        uint8_t *sc;
        wview W = random_matrix(types[ti], E * O, C, &data, &sc, 0.1f);
        const int64_t Nk = offsets[E];
        float *xs = malloc((size_t)(Nk * C) * 4), *ys = malloc((size_t)(Nk * O) * 4),
              *want = malloc((size_t)(Nk * O) * 4);
        for (int64_t i = 0; i < Nk * C; i++) xs[i] = frand();
        void *scratch = malloc(wmatmul_scratch_bytes(Nk, C, threads, types[ti] == WT_BF16));
        for (int pass = 0; pass < 2; pass++) { /* OpenMP (a pool is ignored with 27 rows), then the pool */
            const int64_t *off = pass ? few : offsets, n_all = off[E];
            memset(ys, 0xff, (size_t)(Nk * O) * 4);
            wexperts_forward(ys, xs, W, off, E, C, O, wkernels_get("auto"), scratch, pool);
            for (int e = 0; e < E; e++) {
                int64_t n = off[e + 1] - off[e];
                if (n)
                    ref_matmul(want + off[e] * O, xs + off[e] * C, wview_rows(W, e * O, C), n, C, O,
                               act_of(types[ti], n));
            }
            char name[64];
            snprintf(name, sizeof name, "wexperts_%s_%s", names[ti], pass ? "decode_pool" : "mixed_group_sizes");
            double r = max_rel(ys, want, n_all * O);
            check_detail(r < 1e-5, name, "rows %s: %.2e of max |out|", pass ? "3/0/5/1" : "3/0/27/1", r);
        }
        free(xs), free(ys), free(want), free(scratch), free(data), free(sc);
    }
    jm_pool_free(pool);
}

/* ---- whole models ---- */

static jm_config quant_config(void)
{
    jm_config c;
    jm_config_default(&c);
    c.vocab_size = 300;
    c.hidden_size = 256; /* 8 blocks of 32: the SIMD kernels' main loop; A = 32 and F = 96 take the tails */
    c.num_layers = 2;
    c.num_kv_heads = 2;
    c.head_dim = 16;
    c.intermediate_size = 96;
    c.num_experts = 4;
    c.top_k = 2;
    c.max_position_embeddings = 64;
    c.tie_word_embeddings = 0;
    c.initializer_range = 0.1;
    return c;
}

/* Writes m's weights as BF16 (matrices) into dir, with its config. */
static jm_status save_bf16(const jm_model *m, const char *dir, jm_error *err)
{
    int n = jm_model_num_params(m);
    st_out *o = calloc((size_t)n, sizeof *o);
    uint16_t **buf = calloc((size_t)n, sizeof *buf);
    for (int i = 0; i < n; i++) {
        const jm_param *p = jm_model_param(m, i);
        buf[i] = malloc((size_t)p->numel * 2);
        for (int64_t j = 0; j < p->numel; j++) buf[i][j] = jm_f32_to_bf16(p->data[j]);
        o[i] = (st_out){p->name, ST_BF16, p->ndim, {p->shape[0], p->shape[1], p->shape[2]}, buf[i]};
    }
    char path[600];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    jm_status s = jm_mkdir_p(dir, err);
    if (!s) s = st_write(path, o, n, NULL, NULL, 0, err);
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (!s) s = jm_config_save(path, jm_model_config(m), err);
    for (int i = 0; i < n; i++) free(buf[i]);
    free(buf);
    free(o);
    return s;
}

/* Logits of the last position after decoding tokens one at a time. */
static jm_status decode_logits(jm_model *m, const int32_t *tok, int T, float *out, jm_error *err)
{
    const float *lg = NULL;
    jm_status s = jm_set_context(m, T, err);
    for (int t = 0; t < T && !s; t++) s = jm_infer(m, &tok[t], 1, t, &lg, err);
    if (!s) memcpy(out, lg, (size_t)jm_model_config(m)->vocab_size * sizeof *out);
    return s;
}

static void test_models(const char *tmp)
{
    jm_config c = quant_config();
    jm_error err = {{0}};
    jm_model *m = NULL;
    char f32dir[512], bf16dir[512], q8dir[512], q4dir[512];
    snprintf(f32dir, sizeof f32dir, "%s/f32", tmp);
    snprintf(bf16dir, sizeof bf16dir, "%s/bf16", tmp);
    snprintf(q8dir, sizeof q8dir, "%s/q8", tmp);
    snprintf(q4dir, sizeof q4dir, "%s/q4", tmp);
    jm_status s = jm_model_create(&c, 7, &m, &err);
    if (!s) s = jm_model_save(m, f32dir, &err);
    if (!s) s = save_bf16(m, bf16dir, &err);
    if (!s) s = jm_quantize(bf16dir, q8dir, 8, 0, &err);
    if (!s) s = jm_quantize(bf16dir, q4dir, 4, 0, &err);
    jm_model_free(m);
    if (!check(s == JM_OK, "quantize_writes_checkpoints", "%s", err.msg)) return;

    enum { T = 12 };
    const int32_t tok[T] = {1, 17, 250, 3, 99, 42, 7, 7, 180, 64, 2, 111};
    const int V = c.vocab_size;
    float *dec = malloc((size_t)V * 4), *dec2 = malloc((size_t)V * 4), *fwd = malloc((size_t)V * 4);
    const char *dirs[] = {bf16dir, q8dir, q4dir}, *types[] = {"bf16", "q8", "q4"};
    /* decode in place vs a batched forward of the same weights converted to fp32:
     * they differ in the activations the dot kernels take, BF16 rounded to
     * bf16 (2^-9 relative at most, about a fifth of what int8 blocks leave),
     * Q8/Q4 int8 (about 0.5% rms per product); on this random 2-layer model
     * that compounds to 1.2% (BF16) and 2-3% (Q8/Q4) of the logits, and
     * routers near a tie flip: the bounds are loose; the trained model's
     * perplexity (run_tests.py) is the real measure, and the kernels against
     * float64 sums of their own inputs (test_kernels) the exact one */
    const double tol[] = {2e-2, 5e-2, 5e-2};
    for (int i = 0; i < 3; i++) {
        jm_model *mo = NULL, *ml = NULL;
        s = jm_model_open(dirs[i], &mo, &err);
        if (!s) s = jm_model_load(dirs[i], &ml, &err);
        if (!s) s = decode_logits(mo, tok, T, dec, &err);
        if (!s) s = jm_forward(ml, tok, 1, T, NULL, &err);
        if (!s) memcpy(fwd, jm_logits(ml) + (size_t)(T - 1) * V, (size_t)V * 4);
        char name[64];
        snprintf(name, sizeof name, "model_%s_open_in_place", types[i]);
        check(s == JM_OK && strcmp(jm_model_weight_type(mo), types[i]) == 0, name, "status %d: %s; type %s", s,
              err.msg, mo ? jm_model_weight_type(mo) : "-");
        if (s) {
            jm_model_free(mo);
            jm_model_free(ml);
            continue;
        }
        double r = rms_rel(dec, fwd, V), rm = max_rel(dec, fwd, V);
        snprintf(name, sizeof name, "model_%s_decode_vs_fp32_forward", types[i]);
        check_detail(r < tol[i], name, "last-position logits: rms %.2e of rms logit (tolerance %.0e), max %.2e", r,
                     tol[i], rm);

        /* a batched forward on the mapped model (tiles, and dot kernels for
         * experts with few rows) against the fp32 forward. With int8
         * activations a router near a tie may choose another expert at some
         * position, which attention then carries to every later position:
         * nearly all routing choices must agree, and every position before the
         * first that differs must agree in its logits */
        s = jm_forward(mo, tok, 1, T, NULL, &err);
        int agree = 0, total = 0, first_flip = T;
        for (int l = 0; l < c.num_layers && !s; l++)
            for (int blk = 0; blk < 2; blk++) {
                const int32_t *a = jm_routing(mo, l, blk), *b = jm_routing(ml, l, blk);
                for (int t = 0; t < T; t++, total++) { /* as sets: near-equal gates may swap order */
                    int same = 1;
                    for (int j = 0; j < c.top_k; j++) {
                        int found = 0;
                        for (int i2 = 0; i2 < c.top_k; i2++) found |= a[t * c.top_k + j] == b[t * c.top_k + i2];
                        same &= found;
                    }
                    agree += same;
                    if (!same && t < first_flip) first_flip = t;
                }
            }
        double worst = 0;
        for (int t = 0; t < first_flip && !s; t++)
            worst = fmax(worst, rms_rel(jm_logits(mo) + (size_t)t * V, jm_logits(ml) + (size_t)t * V, V));
        snprintf(name, sizeof name, "model_%s_batched_in_place_vs_fp32", types[i]);
        check_detail(s == JM_OK && worst < tol[i] && agree >= total * 9 / 10 && (i > 0 || agree == total), name,
                     "routing agrees on %d of %d choices; positions before the first difference (%d): worst "
                     "logits rms %.2e", agree, total, first_flip, worst);

        /* every SIMD set this CPU runs gives the same model as the portable one */
        s = jm_set_kernels(mo, "portable", &err);
        if (!s) s = decode_logits(mo, tok, T, dec2, &err);
        for (int ki = 1; ki < NSETS; ki++) {
            if (!wkernels_get(kernel_sets[ki])) continue;
            jm_status s2 = s ? s : jm_set_kernels(mo, kernel_sets[ki], &err);
            if (!s2) s2 = decode_logits(mo, tok, T, dec, &err);
            snprintf(name, sizeof name, "model_%s_portable_vs_%s_kernels", types[i], kernel_labels[ki]);
            r = s2 ? 1 : max_rel(dec, dec2, V);
            check_detail(r < 1e-5, name, "status %d; decode logits: %.2e of max |logit|", s2, r);
        }
        /* bench/decode's read-only products: a step that runs (finite logits,
         * not the model's), and jm_set_kernels gives the model back bit for bit */
        {
            jm_set_read_only_products(mo);
            const int said_read = !strcmp(jm_kernels(mo), "read");
            jm_status s2 = s ? s : decode_logits(mo, tok, T, dec, &err);
            int finite = 1;
            for (int v = 0; v < V; v++) finite &= isfinite(dec[v]);
            const double off = s2 ? 0 : max_rel(dec, dec2, V);
            if (!s2) s2 = jm_set_kernels(mo, "portable", &err);
            if (!s2) s2 = decode_logits(mo, tok, T, dec, &err);
            const int back = !s2 && memcmp(dec, dec2, (size_t)V * sizeof *dec) == 0;
            snprintf(name, sizeof name, "model_%s_read_only_products", types[i]);
            check_detail(said_read && finite && off > 1e-3 && back, name,
                         "status %d; kernels said read: %d; finite logits: %d, %.2e of max |logit| from the model's; "
                         "model back after jm_set_kernels: %d", s2, said_read, finite, off, back);
        }
        /* inference-only: training refuses it clearly */
        s = jm_zero_grad(mo, &err);
        snprintf(name, sizeof name, "model_%s_mapped_refuses_training", types[i]);
        check(s == JM_ERR_ARG && strstr(err.msg, "jm_model_load"), name, "status %d: %s", s, err.msg);
        jm_model_free(mo);
        jm_model_free(ml);
    }

    /* bytes per decoded token follow the dtypes: q4 < q8 < bf16 < f32 */
    int64_t bytes[4] = {0};
    const char *all[] = {f32dir, bf16dir, q8dir, q4dir};
    for (int i = 0; i < 4; i++) {
        jm_model *mo = NULL;
        if (!jm_model_open(all[i], &mo, &err)) bytes[i] = jm_active_weight_bytes(mo);
        jm_model_free(mo);
    }
    check_detail(bytes[3] > 0 && bytes[3] < bytes[2] && bytes[2] < bytes[1] && bytes[1] < bytes[0],
                 "active_weight_bytes_by_dtype", "f32 %lld, bf16 %lld, q8 %lld, q4 %lld", (long long)bytes[0],
                 (long long)bytes[1], (long long)bytes[2], (long long)bytes[3]);
    s = jm_quantize(q8dir, q8dir, 4, 1, &err);
    check(s == JM_ERR_ARG, "quantize_refuses_in_place", "status %d: %s", s, err.msg);
    jm_model *mo = NULL;
    s = jm_model_open(q8dir, &mo, &err);
    if (!s) s = jm_set_kernels(mo, "avx512-vnni", &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "unknown"), "set_kernels_unknown_name", "status %d: %s", s, err.msg);
    jm_model_free(mo);
    free(dec), free(dec2), free(fwd);
}

/* Copies the one-file quantized checkpoint src to dst without its
 * jetmoe.quant_interleave, the tensors quantize interleaved put back
 * row-major (rowmajor 1: the layout of files from before the key) or left
 * as stored (0: interleaved bytes a reader must then take as row-major).
 * *changed: how many tensors' bytes the copy changed. */
static jm_status copy_layout(const char *src, const char *dst, int rowmajor, int *changed, const char **ilv,
                             jm_error *err)
{
    char path[600], to[600];
    snprintf(path, sizeof path, "%s/model.safetensors", src);
    st_file f;
    jm_status s = st_open(path, &f, err);
    if (s) return s;
    st_out *o = calloc((size_t)f.n, sizeof *o);
    uint8_t **own = calloc((size_t)f.n, sizeof *own);
    *changed = 0;
    for (int i = 0; i < f.n; i++) {
        const st_tensor *t = &f.t[i];
        o[i] = (st_out){t->name, t->dtype, t->ndim, {0}, t->data};
        memcpy(o[i].shape, t->shape, sizeof o[i].shape);
        const wtype wt = t->dtype == ST_I8 ? WT_Q8 : WT_Q4;
        const int64_t C = t->shape[t->ndim - 1] * (t->dtype == ST_U8 ? 2 : 1);
        if (!rowmajor || (t->dtype != ST_I8 && t->dtype != ST_U8) || t->ndim < 2 ||
            !wrows_interleave(wt, t->shape[t->ndim - 2], C))
            continue;
        const int64_t row = wtype_row_bytes(wt, C), rows = t->numel * (int64_t)st_dtype_size(t->dtype) / row;
        const wview w = {wt, t->data, NULL, 1};
        own[i] = malloc((size_t)(rows * row));
        for (int64_t r = 0; r < rows; r++)
            for (int64_t at = 0; at < row; at += 64) memcpy(own[i] + r * row + at, wrow_byte(w, r, at, row), 64);
        *changed += memcmp(own[i], t->data, (size_t)(rows * row)) != 0;
        o[i].data = own[i];
    }
    const char *key = st_meta(&f, "jetmoe.quant_interleave");
    *ilv = key && strcmp(key, "4") == 0 ? "4" : "(missing)";
    static const char *const keys[] = {"format", "jetmoe.quant", "jetmoe.quant_block"};
    const char *vals[] = {"pt", st_meta(&f, "jetmoe.quant"), st_meta(&f, "jetmoe.quant_block")};
    snprintf(path, sizeof path, "%s/config.json", src);
    snprintf(to, sizeof to, "%s/config.json", dst);
    s = jm_mkdir_p(dst, err);
    if (!s) s = jm_copy_file(path, to, err);
    snprintf(to, sizeof to, "%s/model.safetensors", dst);
    if (!s) s = st_write(to, o, f.n, keys, vals, 3, err);
    for (int i = 0; i < f.n; i++) free(own[i]);
    free(own);
    free(o);
    st_close(&f);
    return s;
}

/* `jetmoe quantize` stores the rows of the matrices that allow it
 * interleaved (quantize.c) and says so in jetmoe.quant_interleave: the model
 * it gives is the one the same values row-major give, as files from before
 * the key hold them, whether mapped or copied into RAM; and the key is what
 * tells the reader (the interleaved bytes without it are another model). */
static void test_quant_layouts(const char *tmp)
{
    enum { T = 12 };
    const int32_t tok[T] = {1, 17, 250, 3, 99, 42, 7, 7, 180, 64, 2, 111};
    const int V = quant_config().vocab_size;
    static const char *const types[] = {"q8", "q4"};
    for (int i = 0; i < 2; i++) {
        char src[512], rm[512], mis[512], name[64];
        snprintf(src, sizeof src, "%s/%s", tmp, types[i]);
        snprintf(rm, sizeof rm, "%s/%s_rowmajor", tmp, types[i]);
        snprintf(mis, sizeof mis, "%s/%s_misread", tmp, types[i]);
        jm_error err = {{0}};
        int changed = 0, unchanged = 0;
        const char *key = "";
        jm_status s = copy_layout(src, rm, 1, &changed, &key, &err);
        if (!s) s = copy_layout(src, mis, 0, &unchanged, &key, &err);
        float *lg[4];
        for (int k = 0; k < 4; k++) lg[k] = calloc((size_t)V, sizeof(float));
        const char *dirs[4] = {src, rm, mis, src};
        for (int k = 0; k < 4 && !s; k++) {
            jm_model *m = NULL;
            s = jm_model_open(dirs[k], &m, &err);
            if (!s && k == 3) s = jm_weights_to_ram(m, &err);
            if (!s) s = decode_logits(m, tok, T, lg[k], &err);
            jm_model_free(m);
        }
        const size_t bytes = (size_t)V * sizeof(float);
        snprintf(name, sizeof name, "quantize_%s_interleaved_rows_same_model", types[i]);
        check(s == JM_OK && changed > 0 && strcmp(key, "4") == 0 && memcmp(lg[0], lg[1], bytes) == 0 &&
                  memcmp(lg[0], lg[3], bytes) == 0 && memcmp(lg[0], lg[2], bytes) != 0,
              name, "status %d %s; %d tensors interleaved, jetmoe.quant_interleave %s; logits as stored = row-major "
              "copy: %d, = in RAM: %d, != interleaved bytes read row-major: %d", s, err.msg, changed, key,
              !memcmp(lg[0], lg[1], bytes), !memcmp(lg[0], lg[3], bytes), memcmp(lg[0], lg[2], bytes) != 0);
        for (int k = 0; k < 4; k++) free(lg[k]);
    }
}

/* A BF16 checkpoint of quant_config with one weight of moe_in replaced by v. */
static jm_status bf16_with(const char *dir, float v, jm_error *err)
{
    jm_config c = quant_config();
    jm_model *m = NULL;
    jm_status s = jm_model_create(&c, 3, &m, err);
    for (int i = 0; !s && i < jm_model_num_params(m); i++)
        if (strstr(jm_model_param(m, i)->name, "layers.1.mlp.input_linear")) jm_model_param(m, i)->data[77] = v;
    if (!s) s = save_bf16(m, dir, err);
    jm_model_free(m);
    return s;
}

static void test_quantize_refuses(const char *tmp)
{
    char src[512], dst[512];
    snprintf(src, sizeof src, "%s/bad_src", tmp);
    snprintf(dst, sizeof dst, "%s/bad_dst", tmp);
    const struct {
        float v;
        int bits;
        const char *expect;
    } cases[] = {{NAN, 8, "non-finite"}, {INFINITY, 4, "non-finite"}, {1e7f, 8, "too large"}, {6e5f, 4, "too large"}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        jm_error err = {{0}};
        jm_status s = bf16_with(src, cases[i].v, &err);
        if (!s) s = jm_quantize(src, dst, cases[i].bits, 0, &err);
        char name[64];
        snprintf(name, sizeof name, "quantize_refuses_%s_q%d", i < 2 ? "nonfinite" : "huge", cases[i].bits);
        check(s == JM_ERR_FORMAT && strstr(err.msg, cases[i].expect) && strstr(err.msg, "input_linear") &&
                  access(dst, F_OK) != 0,
              name, "status %d: %s", s, err.msg);
    }
}

/* dst: a copy of the checkpoint in src whose model.safetensors header has its
 * first `from` replaced by `to` (the length prefix follows). */
static bool copy_with_header_edit(const char *src, const char *dst, const char *from, const char *to)
{
    char a[4200], b[4200];
    size_t n;
    mkdir(dst, 0755);
    snprintf(a, sizeof a, "%s/config.json", src), snprintf(b, sizeof b, "%s/config.json", dst);
    char *text = slurp(a, &n);
    if (!text) return false;
    write_bytes(b, text, n);
    free(text);
    snprintf(a, sizeof a, "%s/model.safetensors", src), snprintf(b, sizeof b, "%s/model.safetensors", dst);
    uint8_t *f = (uint8_t *)slurp(a, &n);
    uint64_t h = 0;
    for (int i = 7; f && i >= 0; i--) h = h << 8 | f[i];
    char *at = f ? memmem(f + 8, h, from, strlen(from)) : NULL;
    if (!at) {
        free(f);
        return false;
    }
    size_t head = (size_t)((uint8_t *)at - f), nf = strlen(from), nt = strlen(to);
    uint8_t *out = malloc(n - nf + nt);
    memcpy(out, f, head), memcpy(out + head, to, nt), memcpy(out + head + nt, f + head + nf, n - head - nf);
    h = h - nf + nt;
    for (int i = 0; i < 8; i++) out[i] = (uint8_t)(h >> (8 * i));
    write_bytes(b, out, n - nf + nt);
    free(f), free(out);
    return true;
}

/* jm_quantize's metadata must be what the reader knows: each way of opening
 * refuses a file that says otherwise, naming the file and the key, and
 * changes nothing on disk. */
static void test_quant_metadata(const char *tmp)
{
    char src[512], dst[600];
    snprintf(src, sizeof src, "%s/q8", tmp); /* written by test_models */
    static const struct {
        const char *name, *from, *to, *want;
    } cases[] = {
        {"quant_meta_control", "\"jetmoe.quant\":\"q8\"", "\"jetmoe.quant\":\"q8\"", NULL}, /* unchanged: opens */
        {"quant_meta_q3", "\"jetmoe.quant\":\"q8\"", "\"jetmoe.quant\":\"q3\"", "metadata jetmoe.quant is \"q3\"; expected \"q8\" or \"q4\""},
        {"quant_meta_empty", "\"jetmoe.quant\":\"q8\"", "\"jetmoe.quant\":\"\"", "metadata jetmoe.quant is \"\""},
        {"quant_meta_control_char", "\"jetmoe.quant\":\"q8\"", "\"jetmoe.quant\":\"q\\u001b8\"",
         "metadata jetmoe.quant is \"q\\x1b8\""},
        {"quant_meta_block_abc", "\"jetmoe.quant_block\":\"32\"", "\"jetmoe.quant_block\":\"abc\"",
         "metadata jetmoe.quant_block is \"abc\"; expected \"32\""},
        {"quant_meta_block_64", "\"jetmoe.quant_block\":\"32\"", "\"jetmoe.quant_block\":\"64\"",
         "metadata jetmoe.quant_block is \"64\""},
        {"quant_meta_block_032", "\"jetmoe.quant_block\":\"32\"", "\"jetmoe.quant_block\":\"032\"",
         "metadata jetmoe.quant_block is \"032\""},
        {"quant_meta_q4_over_int8", "\"jetmoe.quant\":\"q8\"", "\"jetmoe.quant\":\"q4\"",
         "is I8, but metadata jetmoe.quant is \"q4\""},
        {"quant_meta_no_block", ",\"jetmoe.quant_block\":\"32\"", "", "metadata has jetmoe.quant but not jetmoe.quant_block"},
        {"quant_meta_no_quant", "\"jetmoe.quant\":\"q8\",", "", "metadata has jetmoe.quant_block but not jetmoe.quant"},
        {"quant_meta_interleave_3", "\"jetmoe.quant_interleave\":\"4\"", "\"jetmoe.quant_interleave\":\"3\"",
         "metadata jetmoe.quant_interleave is \"3\""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        snprintf(dst, sizeof dst, "%s/%s", tmp, cases[i].name);
        if (!copy_with_header_edit(src, dst, cases[i].from, cases[i].to)) {
            check(false, cases[i].name, "cannot find %s in %s/model.safetensors", cases[i].from, src);
            continue;
        }
        char file[700], before[700];
        snprintf(file, sizeof file, "%s/model.safetensors", dst);
        snprintf(before, sizeof before, "%s/before.safetensors", tmp);
        size_t n;
        char *bytes = slurp(file, &n);
        write_bytes(before, bytes, n);
        free(bytes);
        jm_model *m = NULL;
        jm_config c;
        jm_tensor_info *ti = NULL;
        int nt = 0;
        jm_error e[3] = {{{0}}, {{0}}, {{0}}};
        jm_status s[3] = {jm_model_open(dst, &m, &e[0]), JM_OK, JM_OK};
        jm_model_free(m), m = NULL;
        s[1] = jm_model_load(dst, &m, &e[1]);
        jm_model_free(m), m = NULL;
        s[2] = jm_checkpoint_inspect(dst, &c, &ti, &nt, &e[2]);
        free(ti);
        bool ok = same_file(file, before);
        for (int k = 0; k < 3; k++)
            ok = ok && (cases[i].want ? s[k] == JM_ERR_FORMAT && strstr(e[k].msg, file) && strstr(e[k].msg, cases[i].want)
                                      : s[k] == JM_OK);
        check(ok, cases[i].name, "open: %s %s | load: %s | inspect: %s", jm_status_name(s[0]), e[0].msg, e[1].msg,
              e[2].msg);
    }
}

/* Growing the context after decoding must re-plan the decoder's scratch. */
static void test_context_regrow(void)
{
    jm_config c = quant_config();
    jm_error err = {{0}};
    jm_model *m = NULL;
    enum { T = 40 };
    int32_t tok[T];
    for (int i = 0; i < T; i++) tok[i] = (i * 37 + 5) % c.vocab_size;
    const float *lg = NULL;
    jm_status s = jm_model_create(&c, 9, &m, &err);
    if (!s) s = jm_set_context(m, 4, &err);
    if (!s) s = jm_infer(m, tok, 4, 0, &lg, &err);
    if (!s) s = jm_set_context(m, 64, &err);
    for (int t = 0; t < T && !s; t++) s = jm_infer(m, &tok[t], 1, t, &lg, &err);
    float *dec = malloc((size_t)c.vocab_size * sizeof *dec);
    if (!s) memcpy(dec, lg, (size_t)c.vocab_size * sizeof *dec);
    if (!s) s = jm_forward(m, tok, 1, T, NULL, &err);
    double r = s ? 1 : max_rel(dec, jm_logits(m) + (size_t)(T - 1) * c.vocab_size, c.vocab_size);
    check_detail(s == JM_OK && r < 1e-4, "set_context_regrow_then_decode", "status %d %s; logits %.2e of max", s,
                 err.msg, r);
    free(dec);
    jm_model_free(m);
}

int main(void)
{
    char tmp[] = "/tmp/jm_test_quant_XXXXXX";
    temp_dir(tmp);
    test_f16();
    test_round_act_bf16();
    test_quantize_rows();
    test_kernels();
    test_att_kernels();
    test_products();
    test_inline_layout();
    test_models(tmp);
    test_quant_layouts(tmp);
    test_quant_metadata(tmp);
    test_quantize_refuses(tmp);
    test_context_regrow();
    temp_dir_done(tmp);
    return exit_status();
}
