/* test_packing.c — packing is exact: several sequences in one row (positions
 * restarting at 0, padding at -1) give the same losses and gradients as the
 * same sequences each in a row of its own, and, without the router losses
 * (which are batch statistics), as the sequences run one by one with their
 * gradients accumulated. Also the weighted backward and the batch checks.
 * The model-level golden check against PyTorch is tests/align_ref_tests.py. */
#include "harness.h"

#include <math.h>
#include <string.h>

static jm_config small_config(double aux, double zl)
{
    jm_config c;
    jm_config_default(&c);
    c.vocab_size = 61;
    c.hidden_size = 32;
    c.num_layers = 2;
    c.num_kv_heads = 2;
    c.head_dim = 8;
    c.intermediate_size = 24;
    c.num_experts = 4;
    c.top_k = 2;
    c.max_position_embeddings = 256;
    c.initializer_range = 0.2;
    c.aux_loss_coef = aux;
    c.z_loss_coef = zl;
    return c;
}

/* Lengths chosen so that packed sequences straddle attention's 64-row
 * blocks, start mid-block and include a one-token sequence. */
enum { NSEQ = 6, MAXL = 80 };
static const int seq_len[NSEQ] = {7, 70, 1, 20, 61, 33};

/* Copies every gradient out (the arena is reused by the next backward). */
static float *grads_copy(const jm_model *m)
{
    int64_t total = 0;
    for (int i = 0; i < jm_model_num_params(m); i++) total += jm_model_param(m, i)->numel;
    float *g = malloc((size_t)total * sizeof *g), *p = g;
    for (int i = 0; i < jm_model_num_params(m); i++) {
        const jm_param *q = jm_model_param(m, i);
        memcpy(p, q->grad, (size_t)q->numel * sizeof *p);
        p += q->numel;
    }
    return g;
}

static double rel_err(const float *a, const float *b, int64_t n)
{
    double d = 0, r = 0;
    for (int64_t i = 0; i < n; i++) {
        d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        r += (double)b[i] * b[i];
    }
    return sqrt(d) / fmax(sqrt(r), 1e-30);
}

static int64_t grad_numel(const jm_model *m)
{
    int64_t total = 0;
    for (int i = 0; i < jm_model_num_params(m); i++) total += jm_model_param(m, i)->numel;
    return total;
}

/* The sequences' tokens and targets (the next token; the prompt, the first
 * third of each sequence, has none: fine-tuning's mask). */
static void make_data(int32_t seq[NSEQ][MAXL], int32_t tgt[NSEQ][MAXL], uint64_t seed)
{
    for (int s = 0; s < NSEQ; s++) {
        for (int t = 0; t < seq_len[s]; t++) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            seq[s][t] = (int32_t)((seed >> 33) % 61);
        }
        for (int t = 0; t < seq_len[s]; t++)
            tgt[s][t] = t + 1 < seq_len[s] && t >= seq_len[s] / 3 ? seq[s][t + 1] : -1;
    }
}

static void test_packed_equals_rows(int with_router)
{
    jm_error err = {{0}};
    jm_config c = small_config(with_router ? 0.05 : 0.0, with_router ? 0.01 : 0.0);
    jm_model *m;
    if (!check(jm_model_create(&c, 7, &m, &err) == JM_OK, "packing_model", "%s", err.msg)) return;
    int32_t seq[NSEQ][MAXL], tgt[NSEQ][MAXL];
    make_data(seq, tgt, 11);

    /* A: all packed into one row of 200 (192 tokens + 8 padding) */
    enum { TP = 200 };
    int32_t tok[TP], pos[TP], y[TP];
    int n = 0;
    for (int s = 0; s < NSEQ; s++)
        for (int t = 0; t < seq_len[s]; t++, n++) tok[n] = seq[s][t], pos[n] = t, y[n] = tgt[s][t];
    for (; n < TP; n++) tok[n] = 0, pos[n] = -1, y[n] = -1;
    jm_losses La, Lb;
    jm_status s = jm_forward_batch(m, &(jm_batch){1, TP, tok, pos, y}, &La, &err);
    float lp_sum = 0;
    for (int i = 0; i < TP; i++) lp_sum += jm_token_logprobs(m)[i];
    if (!s) s = jm_zero_grad(m, &err);
    if (!s) s = jm_backward(m, &err);
    if (!check(s == JM_OK, with_router ? "packing_forward_backward" : "packing_forward_backward_ce", "%s", err.msg))
        goto out;
    float *ga = grads_copy(m);
    check(fabs(-lp_sum / (double)La.count - La.loss) < 1e-5 * La.loss, "packing_token_logprobs_sum_to_loss",
          "sum %g count %lld loss %g", -lp_sum, (long long)La.count, La.loss);

    /* B: each sequence in its own row of 80, padded */
    enum { TR = MAXL };
    int32_t tokb[NSEQ * TR], posb[NSEQ * TR], yb[NSEQ * TR];
    for (int r = 0; r < NSEQ; r++)
        for (int t = 0; t < TR; t++) {
            int in = t < seq_len[r];
            tokb[r * TR + t] = in ? seq[r][t] : 5;
            posb[r * TR + t] = in ? t : -1;
            yb[r * TR + t] = in ? tgt[r][t] : -1;
        }
    s = jm_forward_batch(m, &(jm_batch){NSEQ, TR, tokb, posb, yb}, &Lb, &err);
    if (!s) s = jm_zero_grad(m, &err);
    if (!s) s = jm_backward(m, &err);
    float *gb = grads_copy(m);
    const int64_t P = grad_numel(m);
    double eg = rel_err(ga, gb, P);
    const char *name = with_router ? "packed_equals_one_row_each" : "packed_equals_one_row_each_ce";
    check(s == JM_OK && La.count == Lb.count && fabs(La.loss - Lb.loss) <= 1e-6 * fabs(Lb.loss) &&
              fabs(La.aux_loss - Lb.aux_loss) <= 1e-6 * fabs(Lb.aux_loss) + 1e-12 &&
              fabs(La.z_loss - Lb.z_loss) <= 1e-6 * fabs(Lb.z_loss) + 1e-12 && eg < 1e-5,
          name, "loss %.9g vs %.9g, aux %.9g vs %.9g, z %.9g vs %.9g, count %lld vs %lld, grad rel err %.3g",
          La.loss, Lb.loss, La.aux_loss, Lb.aux_loss, La.z_loss, Lb.z_loss, (long long)La.count,
          (long long)Lb.count, eg);

    if (!with_router) {
        /* C: one by one (B = 1, T = the sequence's length, no positions at
         * all: the plain path), each weighted by 1 / the total target count */
        float *w = malloc(MAXL * sizeof *w);
        s = jm_zero_grad(m, &err);
        double loss_sum = 0;
        for (int q = 0; q < NSEQ && !s; q++) {
            jm_losses L;
            s = jm_forward_batch(m, &(jm_batch){1, seq_len[q], seq[q], NULL, tgt[q]}, &L, &err);
            loss_sum += L.loss * (double)L.count;
            for (int t = 0; t < seq_len[q]; t++) w[t] = 1.0f / (float)La.count;
            if (!s) s = jm_backward_weighted(m, w, 1.0, &err);
        }
        float *gc = grads_copy(m);
        double ec = rel_err(ga, gc, P);
        check(s == JM_OK && fabs(loss_sum / La.count - La.loss) <= 1e-6 * La.loss && ec < 1e-5,
              "packed_equals_one_by_one", "loss %.9g vs %.9g, grad rel err %.3g (%s)", loss_sum / La.count, La.loss,
              ec, err.msg);
        free(gc);
        free(w);
    }
    free(ga);
    free(gb);
out:
    jm_model_free(m);
}

/* The plain path (no positions) is a packed row with one sequence. */
static void test_plain_is_one_sequence(void)
{
    jm_error err = {{0}};
    jm_config c = small_config(0.05, 0.01);
    jm_model *m;
    if (jm_model_create(&c, 3, &m, &err)) return;
    int32_t tok[2 * 16], pos[2 * 16];
    for (int i = 0; i < 32; i++) tok[i] = (i * 7 + 3) % 61, pos[i] = i % 16;
    jm_losses A, B;
    jm_status s = jm_forward(m, tok, 2, 16, &A, &err);
    if (!s) s = jm_zero_grad(m, &err);
    if (!s) s = jm_backward(m, &err);
    float *ga = grads_copy(m);
    if (!s) s = jm_forward_batch(m, &(jm_batch){2, 16, tok, pos, NULL}, &B, &err);
    if (!s) s = jm_zero_grad(m, &err);
    if (!s) s = jm_backward(m, &err);
    float *gb = grads_copy(m);
    double e = rel_err(ga, gb, grad_numel(m));
    check(s == JM_OK && A.loss == B.loss && A.aux_loss == B.aux_loss && A.count == B.count && e < 1e-6,
          "packing_positions_0_to_T_equal_plain", "loss %.9g vs %.9g, grad rel err %.3g %s", A.loss, B.loss, e,
          err.msg);
    free(ga);
    free(gb);
    jm_model_free(m);
}

static void test_batch_checks(void)
{
    jm_error err = {{0}};
    jm_config c = small_config(0.01, 0.001);
    jm_model *m;
    if (jm_model_create(&c, 3, &m, &err)) return;
    int32_t tok[4] = {1, 2, 3, 4};
    struct {
        const char *name;
        int32_t pos[4], y[4];
        const char *want;
    } bad[] = {
        {"batch_position_skips", {0, 1, 3, 4}, {-1, -1, -1, -1}, "position 3"},
        {"batch_position_below_padding", {0, 1, -2, 0}, {-1, -1, -1, -1}, "position -2"},
        {"batch_position_after_padding", {0, -1, 1, 2}, {-1, -1, -1, -1}, "position 1"},
        {"batch_target_out_of_vocab", {0, 1, 2, 3}, {61, -1, -1, -1}, "target 61"},
        {"batch_padding_with_target", {0, 1, -1, -1}, {2, -1, 5, -1}, "padding cannot have a target"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err.msg[0] = 0;
        jm_status s = jm_forward_batch(m, &(jm_batch){1, 4, tok, bad[i].pos, bad[i].y}, NULL, &err);
        check(s == JM_ERR_ARG && strstr(err.msg, bad[i].want), bad[i].name, "status %d: %s", s, err.msg);
    }
    jm_model_free(m);
}

int main(void)
{
    test_packed_equals_rows(1);
    test_packed_equals_rows(0);
    test_plain_is_one_sequence();
    test_batch_checks();
    return exit_status();
}
