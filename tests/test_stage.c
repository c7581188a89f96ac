/* test_stage.c — pipeline stages are the whole model cut in pieces: the
 * layers split into P contiguous stages, each run with jm_forward_layers /
 * jm_backward_layers on handles from jm_model_share (two per stage, the
 * micro-batches interleaved 1F1B-style), give the losses, token
 * log-probabilities, routing and every gradient of jm_forward_batch +
 * jm_backward_weighted on a model with the same weights, bit for bit. The
 * router losses are summed over the stages in another order, so those are
 * compared to 1e-12. Also: stage parameter ranges tile the arena, the stage
 * balancer (exact, and JetMoE-8B's splits printed), and the argument checks. */
#include "harness.h"
#include "model/model.h"

#include <math.h>
#include <string.h>

enum { NMB = 5, HANDLES = 2, MAXP = 3, B = 2, T = 24 };

static jm_config small_config(int tied, int top_k, int layers)
{
    jm_config c;
    jm_config_default(&c);
    c.vocab_size = tied ? 61 : 50;
    c.hidden_size = tied ? 32 : 24;
    c.num_layers = layers;
    c.num_kv_heads = 2;
    c.head_dim = tied ? 8 : 6;
    c.intermediate_size = tied ? 24 : 20;
    c.num_experts = 4;
    c.top_k = top_k;
    c.max_position_embeddings = 64;
    c.initializer_range = 0.2;
    c.tie_word_embeddings = tied;
    c.aux_loss_coef = 0.05;
    c.z_loss_coef = 0.01;
    return c;
}

/* Micro-batch i: tokens; with packing, sequences restarting at 0 (one of a
 * single token) and padding at the end of row 1, targets the next token of
 * the sequence with the first few masked, and a per-token weight. */
typedef struct {
    int32_t tok[B * T], pos[B * T], y[B * T];
    float w[B * T];
    jm_batch b;
    const float *weight;
} micro;

static void make_micro(micro *mb, int i, int packed, int V)
{
    uint64_t s = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1);
    for (int n = 0; n < B * T; n++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        mb->tok[n] = (int32_t)((s >> 33) % (uint64_t)V);
        mb->w[n] = 0.01f * (float)((s >> 20) % 9 + 1);
    }
    static const int starts[B][4] = {{0, 9, 10, T}, {0, 5, 17, T}}; /* sequence starts per row */
    for (int r = 0; r < B; r++)
        for (int t = 0; t < T; t++) {
            int q = 0;
            while (starts[r][q + 1] <= t) q++;
            int p = r == 1 && t >= 20 ? -1 : t - starts[r][q];
            int next = t + 1 < T && !(r == 1 && t + 1 >= 20) && t + 1 != starts[r][q + 1];
            mb->pos[r * T + t] = p;
            mb->y[r * T + t] = p >= 2 && next ? mb->tok[r * T + t + 1] : -1;
        }
    mb->b = packed ? (jm_batch){B, T, mb->tok, mb->pos, mb->y} : (jm_batch){B, T, mb->tok, NULL, NULL};
    mb->weight = packed ? mb->w : NULL;
}

/* One stage's 1F1B order: warm-up forwards (at most HANDLES-1, and none on
 * the last stage), then one forward and one backward in turn. op >= 0: the
 * forward of micro-batch op; op < 0: the backward of micro-batch -op-1. */
static int stage_ops(int s, int P, int *ops)
{
    int warm = P - 1 - s < HANDLES - 1 ? P - 1 - s : HANDLES - 1, n = 0;
    for (int i = 0; i < warm; i++) ops[n++] = i;
    for (int i = 0; i < NMB; i++) {
        if (i + warm < NMB) ops[n++] = i + warm;
        ops[n++] = -i - 1;
    }
    return n;
}

static float *dup_floats(const float *p, int64_t n)
{
    float *q = malloc((size_t)n * sizeof *q);
    memcpy(q, p, (size_t)n * sizeof *q);
    return q;
}

/* The reference (whole model, micro-batches one after another) against the
 * stages [first[s], first[s+1]) run as a pipeline. */
static void test_pipeline(const char *tag, const jm_config *c, int packed, int P, const int *first)
{
    jm_error err = {{0}};
    char name[160];
    const int64_t N = (int64_t)B * T, H = c->hidden_size;
    jm_model *ref = NULL, *own = NULL, *h[MAXP][HANDLES] = {{0}};
    micro *mb = calloc(NMB, sizeof *mb);
    jm_losses ref_l[NMB], st_l[NMB][MAXP];
    float *ref_logp[NMB] = {0};
    int32_t *ref_route = NULL;
    float *xbuf[MAXP][NMB] = {{0}}, *dxbuf[MAXP][NMB] = {{0}}; /* what the transport would carry to stage s */
    memset(st_l, 0, sizeof st_l);
    for (int i = 0; i < NMB; i++) make_micro(&mb[i], i, packed, c->vocab_size);

    snprintf(name, sizeof name, "stage_%s_models", tag);
    jm_status s = jm_model_create(c, 5, &ref, &err);
    if (!s) s = jm_model_create(c, 5, &own, &err);
    for (int st = 0; st < P && !s; st++)
        for (int j = 0; j < HANDLES && !s; j++) s = jm_model_share(own, &h[st][j], &err);
    if (!check(s == JM_OK, name, "%s", err.msg)) goto out;

    for (int i = 0; i < NMB && !s; i++) {
        s = jm_forward_batch(ref, &mb[i].b, &ref_l[i], &err);
        if (!s) ref_logp[i] = dup_floats(jm_token_logprobs(ref), N);
        if (!s) s = jm_backward_weighted(ref, mb[i].weight, 0.5, &err);
    }
    if (!s) { /* the last micro-batch's routing, held by every layer */
        const int64_t n = jm_routing_count(ref);
        ref_route = malloc((size_t)(2 * c->num_layers * n) * sizeof *ref_route);
        for (int l = 0; l < c->num_layers; l++)
            for (int blk = 0; blk < 2; blk++)
                memcpy(ref_route + (2 * l + blk) * n, jm_routing(ref, l, blk), (size_t)n * sizeof *ref_route);
    }
    snprintf(name, sizeof name, "stage_%s_reference", tag);
    if (!check(s == JM_OK, name, "%s", err.msg)) goto out;

    /* the schedule, run sweep by sweep: each stage does its next op when its input is there */
    int ops[MAXP][2 * NMB + 2], nops[MAXP], next[MAXP] = {0};
    int fdone[MAXP][NMB] = {{0}}, bdone[MAXP][NMB] = {{0}}, inflight_max = 0;
    for (int st = 0; st < P; st++) nops[st] = stage_ops(st, P, ops[st]);
    for (int progress = 1; progress && !s;) {
        progress = 0;
        for (int st = 0; st < P && !s; st++) {
            if (next[st] == nops[st]) continue;
            const int op = ops[st][next[st]], i = op >= 0 ? op : -op - 1, last = st == P - 1;
            jm_model *m = h[st][i % HANDLES];
            if (op >= 0) {
                if (st > 0 && !fdone[st - 1][i]) continue;
                s = jm_forward_layers(m, &mb[i].b, first[st], first[st + 1], st ? xbuf[st][i] : NULL, &st_l[i][st],
                                      &err);
                if (!s && !last) xbuf[st + 1][i] = dup_floats(jm_layers_output(m), N * H);
                if (!s && last && memcmp(jm_token_logprobs(m), ref_logp[i], (size_t)N * sizeof(float)) != 0)
                    s = jm_fail(&err, JM_ERR_ARG, "micro-batch %d: token log-probabilities differ", i);
                fdone[st][i] = 1;
                int inflight = 0;
                for (int q = 0; q < NMB; q++) inflight += fdone[st][q] && !bdone[st][q];
                inflight_max = inflight > inflight_max ? inflight : inflight_max;
            } else {
                if (!last && !bdone[st + 1][i]) continue;
                if (i == NMB - 1) { /* before the backward: compare the routing this stage's layers hold */
                    const int64_t n = jm_routing_count(m);
                    for (int l = 0; l < c->num_layers && !s; l++)
                        for (int blk = 0; blk < 2 && !s; blk++) {
                            const int32_t *r = jm_routing(m, l, blk);
                            int mine = l >= first[st] && l < first[st + 1];
                            if (mine != (r != NULL) ||
                                (r && memcmp(r, ref_route + (2 * l + blk) * n, (size_t)n * sizeof *r)))
                                s = jm_fail(&err, JM_ERR_ARG, "stage %d: routing of layer %d block %d %s", st, l, blk,
                                            mine != (r != NULL) ? "held outside the stage" : "differs");
                        }
                }
                if (!s) s = jm_backward_layers(m, last ? NULL : dxbuf[st][i], mb[i].weight, 0.5, &err);
                if (!s && st > 0) dxbuf[st - 1][i] = dup_floats(jm_layers_input_grad(m), N * H);
                if (!s && st == 0 && jm_layers_input_grad(m))
                    s = jm_fail(&err, JM_ERR_ARG, "stage 0 gives an input gradient");
                bdone[st][i] = 1;
            }
            next[st]++;
            progress = 1;
        }
    }
    int finished = 1;
    for (int st = 0; st < P; st++) finished &= next[st] == nops[st];
    snprintf(name, sizeof name, "stage_%s_schedule", tag);
    if (!check(s == JM_OK && finished && inflight_max == (P > 1 ? HANDLES : 1), name, "%s%s; in flight at most %d",
               err.msg, finished ? "" : " (deadlock)", inflight_max))
        goto out;

    /* losses: cross-entropy from the last stage exactly; the router losses summed over stages */
    double worst_router = 0;
    int loss_exact = 1, router_exact = 1;
    for (int i = 0; i < NMB; i++) {
        double aux = 0, zl = 0;
        for (int st = 0; st < P; st++) {
            aux += st_l[i][st].aux_loss;
            zl += st_l[i][st].z_loss;
            if (st < P - 1) loss_exact &= st_l[i][st].loss == 0 && st_l[i][st].count == 0;
        }
        loss_exact &= st_l[i][P - 1].loss == ref_l[i].loss && st_l[i][P - 1].count == ref_l[i].count;
        router_exact &= aux == ref_l[i].aux_loss && zl == ref_l[i].z_loss;
        worst_router = fmax(worst_router, fabs(aux - ref_l[i].aux_loss) / fabs(ref_l[i].aux_loss));
        worst_router = fmax(worst_router, fabs(zl - ref_l[i].z_loss) / fabs(ref_l[i].z_loss));
    }
    snprintf(name, sizeof name, "stage_%s_loss_exact", tag);
    check(loss_exact, name, "cross-entropy or count differs from the whole model's");
    snprintf(name, sizeof name, "stage_%s_router_losses", tag);
    check_detail(worst_router <= 1e-12, name, "summed over stages: %s, worst relative difference %.2g",
                 router_exact ? "bit-exact" : "not bit-exact", worst_router);

    /* every gradient, bit for bit; but a tied embedding's gradient is the sum
     * of stage 0's (embedding) and the last stage's (lm_head) contributions,
     * added in the schedule's order, not micro-batch by micro-batch: to
     * rounding (in a real pipeline the two are in different processes anyway) */
    int64_t n_ref, n_own;
    const float *g_ref = jm_grad_arena(ref, &n_ref), *g_own = jm_grad_arena(own, &n_own);
    int differ = -1;
    double tied_err = 0;
    for (int p = 0; p < jm_model_num_params(ref) && n_ref == n_own; p++) {
        const jm_param *q = jm_model_param(ref, p);
        const int64_t o = jm_param_offset(ref, p);
        if (memcmp(g_ref + o, g_own + o, (size_t)q->numel * sizeof(float)) == 0) continue;
        if (p == 0 && c->tie_word_embeddings) {
            double d = 0, r = 0;
            for (int64_t e = 0; e < q->numel; e++) {
                d += ((double)g_ref[o + e] - g_own[o + e]) * ((double)g_ref[o + e] - g_own[o + e]);
                r += (double)g_ref[o + e] * g_ref[o + e];
            }
            tied_err = sqrt(d / r);
            if (tied_err <= 1e-6) continue;
        }
        if (differ < 0) differ = p;
    }
    snprintf(name, sizeof name, "stage_%s_grads", tag);
    if (n_ref == n_own && differ < 0 && tied_err > 0)
        check_detail(1, name, "bit-exact but the tied embedding: relative L2 difference %.2g", tied_err);
    else
        check_detail(n_ref == n_own && differ < 0, name, "%s%s", differ < 0 ? "bit-exact" : "differs from ",
                     differ < 0 ? "" : jm_model_param(ref, differ)->name);

out:
    for (int st = 0; st < P; st++)
        for (int j = 0; j < HANDLES; j++) jm_model_free(h[st][j]);
    jm_model_free(own);
    jm_model_free(ref);
    for (int i = 0; i < NMB; i++) {
        free(ref_logp[i]);
        for (int st = 0; st < MAXP; st++) free(xbuf[st][i]), free(dxbuf[st][i]);
    }
    free(ref_route);
    free(mb);
}

/* Stage parameter ranges tile the arena, each parameter inside its stage's. */
static void test_stage_params(const jm_config *c, const char *tag)
{
    jm_error err = {{0}};
    jm_model *m;
    char name[96];
    if (!check(jm_model_create(c, 1, &m, &err) == JM_OK, "stage_params_model", "%s", err.msg)) return;
    int64_t numel;
    const float *arena = jm_param_arena(m, &numel);
    int ok = jm_param_offset(m, jm_model_num_params(m)) == numel && jm_param_offset(m, -1) == -1;
    for (int i = 0; i < jm_model_num_params(m); i++)
        ok &= jm_param_offset(m, i) == jm_model_param(m, i)->data - arena;
    snprintf(name, sizeof name, "stage_param_offsets_%s", tag);
    check(ok, name, "jm_param_offset disagrees with jm_param.data");

    const int L = c->num_layers;
    ok = 1;
    for (int P = 1; P <= L; P++) {
        int first[64];
        if (jm_balance_stages(c, T, P, first, &err)) {
            ok = 0;
            break;
        }
        int64_t prev_end = 0;
        for (int s = 0; s < P; s++) {
            int64_t a, e;
            jm_stage_params(m, first[s], first[s + 1], &a, &e);
            ok &= a == prev_end && e > a;
            prev_end = e;
            for (int i = 0; i < jm_model_num_params(m); i++) { /* the table: embed, L x 11, norm, lm_head */
                const int layer = i == 0 ? 0 : i <= 11 * L ? (i - 1) / 11 : L - 1;
                const int64_t o = jm_param_offset(m, i);
                const int inside = o >= a && o + jm_model_param(m, i)->numel <= e;
                ok &= inside == (layer >= first[s] && layer < first[s + 1]);
            }
        }
        ok &= prev_end == numel;
    }
    int64_t a = 1, e = 1;
    jm_stage_params(m, 2, 2, &a, &e);
    ok &= a == 0 && e == 0;
    snprintf(name, sizeof name, "stage_params_tile_arena_%s", tag);
    check(ok, name, "ranges of the balanced splits, P = 1..%d", L);
    jm_model_free(m);
}

/* The balancer against every split of a small model; JetMoE-8B's splits shown. */
static void test_balance(void)
{
    jm_error err = {{0}};
    jm_config c = small_config(0, 2, 7);
    c.vocab_size = 500; /* a head of about two layers: the split is not even */
    double layer, embed, head;
    jm_stage_costs(&c, T, &layer, &embed, &head);
    int ok = 1;
    for (int P = 1; P <= 4; P++) {
        int first[8];
        ok &= jm_balance_stages(&c, T, P, first, &err) == JM_OK;
        double got = 0, best = INFINITY;
        for (int s = 0; s < P; s++)
            got = fmax(got, (first[s + 1] - first[s]) * layer + (s == 0 ? embed : 0) + (s == P - 1 ? head : 0));
        /* brute force over the P-1 cut points, as a bit mask of layer boundaries 1..L-1 */
        for (int mask = 0; mask < 1 << (c.num_layers - 1); mask++) {
            if (__builtin_popcount((unsigned)mask) != P - 1) continue;
            double worst = 0;
            int start = 0, s = 0;
            for (int l = 1; l <= c.num_layers; l++)
                if (l == c.num_layers || mask >> (l - 1) & 1) {
                    worst = fmax(worst, (l - start) * layer + (start == 0 ? embed : 0) +
                                            (l == c.num_layers ? head : 0));
                    start = l, s++;
                }
            best = fmin(best, worst);
        }
        ok &= got == best;
    }
    check_detail(ok, "stage_balance_optimal", "head %.1f layers' cost; max stage cost equals brute force, P = 1..4",
                 head / layer);

    jm_config big;
    jm_config_default(&big); /* JetMoE-8B */
    const int T8 = 4096;
    jm_stage_costs(&big, T8, &layer, &embed, &head);
    printf("# JetMoE-8B at T = %d: per token %.1f MFLOP a layer, %.1f the head, %.4f the embedding\n", T8, layer / 1e6,
           head / 1e6, embed / 1e6);
    for (int P = 2; P <= 8; P *= 2) {
        int first[9];
        char line[512];
        jm_status s = jm_balance_stages(&big, T8, P, first, &err);
        int good = s == JM_OK && first[0] == 0 && first[P] == big.num_layers;
        size_t o = 0;
        double worst = 0, total = big.num_layers * layer + embed + head;
        for (int i = 0; good && i < P; i++) {
            good &= first[i + 1] > first[i];
            double cost = (first[i + 1] - first[i]) * layer + (i == 0 ? embed : 0) + (i == P - 1 ? head : 0);
            worst = fmax(worst, cost);
            o += (size_t)snprintf(line + o, sizeof line - o, "%s[%d,%d)", i ? " " : "", first[i], first[i + 1]);
        }
        char nm[64];
        snprintf(nm, sizeof nm, "stage_balance_8b_P%d", P);
        check_detail(good, nm, "%s; largest stage %.2f GFLOP/token, %.3f x the mean", good ? line : err.msg,
                     worst / 1e9, worst / (total / P));
    }
}

/* Wrong arguments are refused with a message, never a crash. */
static void test_errors(void)
{
    jm_error err = {{0}};
    jm_config c = small_config(1, 2, 3);
    jm_model *m, *h = NULL, *hh = NULL;
    if (!check(jm_model_create(&c, 1, &m, &err) == JM_OK, "stage_errors_model", "%s", err.msg)) return;
    micro *mb = calloc(1, sizeof *mb);
    make_micro(mb, 0, 1, c.vocab_size);
    float *x = calloc((size_t)B * T * c.hidden_size, sizeof *x);
    jm_losses L;
    struct {
        int l0, l1, with_x;
        const char *want;
    } bad[] = {{1, 3, 0, "x_in must hold"}, {0, 2, 1, "x_in must be NULL"}, {2, 2, 1, "need 0 <= first < end"},
               {2, 1, 1, "need 0 <= first"}, {-1, 2, 0, "need 0 <= first"}, {1, 4, 1, "num_hidden_layers = 3"}};
    int ok = 1;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        jm_status s = jm_forward_layers(m, &mb->b, bad[i].l0, bad[i].l1, bad[i].with_x ? x : NULL, &L, &err);
        ok &= s == JM_ERR_ARG && strstr(err.msg, bad[i].want) != NULL;
        if (!(s == JM_ERR_ARG && strstr(err.msg, bad[i].want))) printf("# [%d, %d): %s\n", bad[i].l0, bad[i].l1, err.msg);
    }
    ok &= jm_forward_layers(m, NULL, 0, 3, NULL, &L, &err) == JM_ERR_ARG;
    ok &= jm_forward_layers(m, &(jm_batch){B, T, NULL, NULL, NULL}, 1, 3, x, &L, &err) == JM_ERR_ARG;
    mb->tok[5] = c.vocab_size; /* checked on every stage, embedded or not */
    ok &= jm_forward_layers(m, &mb->b, 1, 3, x, &L, &err) == JM_ERR_ARG && strstr(err.msg, "vocabulary");
    mb->tok[5] = 0;
    check(ok, "stage_forward_bad_ranges", "%s", err.msg);

    ok = jm_backward_layers(m, NULL, NULL, 1.0, &err) == JM_ERR_ARG && strstr(err.msg, "completed jm_forward");
    ok &= jm_forward_layers(m, &mb->b, 0, 2, NULL, &L, &err) == JM_OK && L.loss == 0 && L.count == 0 &&
          jm_layers_output(m) && !jm_logits(m) && !jm_token_logprobs(m);
    ok &= jm_backward_layers(m, NULL, NULL, 1.0, &err) == JM_ERR_ARG && strstr(err.msg, "dx_out must hold");
    ok &= jm_backward_weighted(m, NULL, 1.0, &err) == JM_ERR_ARG && strstr(err.msg, "dx_out must hold");
    ok &= jm_backward_layers(m, x, NULL, 1.0, &err) == JM_OK && !jm_layers_input_grad(m); /* the error kept the forward */
    ok &= jm_backward_layers(m, x, NULL, 1.0, &err) == JM_ERR_ARG; /* once per forward */
    ok &= jm_forward_layers(m, &mb->b, 1, 3, x, &L, &err) == JM_OK && L.count > 0 && !jm_layers_output(m);
    ok &= jm_backward_layers(m, x, NULL, 1.0, &err) == JM_ERR_ARG && strstr(err.msg, "dx_out must be NULL");
    ok &= jm_backward_layers(m, NULL, mb->w, 1.0, &err) == JM_OK && jm_layers_input_grad(m);
    ok &= jm_forward_layers(m, &mb->b, 0, 2, NULL, &L, &err) == JM_OK && jm_layers_output(m);
    mb->pos[3] = 7; /* a failed forward leaves no output */
    ok &= jm_forward_layers(m, &mb->b, 0, 2, NULL, &L, &err) == JM_ERR_ARG && !jm_layers_output(m);
    mb->pos[3] = 3;
    check(ok, "stage_backward_bad_calls", "%s", err.msg);

    /* a shared handle: no decoding; freeing it (and a handle of a handle) leaves the weights */
    const float *logits;
    ok = jm_model_share(m, &h, &err) == JM_OK && jm_model_share(h, &hh, &err) == JM_OK;
    ok &= jm_set_slots(h, 2, 16, &err) == JM_ERR_ARG && strstr(err.msg, "jm_model_share");
    ok &= jm_infer(hh, mb->tok, 3, 0, &logits, &err) == JM_ERR_ARG && strstr(err.msg, "jm_model_share");
    int64_t n1, n2;
    ok &= jm_grad_arena(h, &n1) == jm_grad_arena(m, &n2) && n1 == n2 && jm_param_arena_mut(hh, &n1) == jm_param_arena(m, &n2);
    jm_model_free(hh);
    jm_model_free(h);
    ok &= jm_forward_batch(m, &mb->b, &L, &err) == JM_OK && jm_backward_weighted(m, mb->w, 1.0, &err) == JM_OK;
    ok &= jm_infer(m, mb->tok, 3, 0, &logits, &err) == JM_OK;
    check(ok, "stage_share_handles", "%s", err.msg);

    /* a model whose weights stay in the checkpoint file cannot be shared */
    char dir[] = "/tmp/jm_test_stage_XXXXXX";
    temp_dir(dir);
    jm_model *mapped = NULL, *hm = NULL;
    int64_t n;
    jm_status s = jm_model_save(m, dir, &err);
    if (!s) s = jm_model_open(dir, &mapped, &err);
    ok = s == JM_OK && jm_model_share(mapped, &hm, &err) == JM_ERR_ARG && !hm && strstr(err.msg, "inference") &&
         !jm_param_arena(mapped, &n) && n == 0;
    check(ok, "stage_share_refuses_mapped", "%s", err.msg);
    jm_model_free(mapped);
    temp_dir_done(dir);

    int first[8];
    ok = jm_balance_stages(&c, T, 4, first, &err) == JM_ERR_ARG && strstr(err.msg, "4 pipeline stages for 3 layers");
    ok &= jm_balance_stages(&c, T, 0, first, &err) == JM_ERR_ARG;
    ok &= jm_balance_stages(&c, 0, 2, first, &err) == JM_ERR_ARG;
    check(ok, "stage_balance_bad_arguments", "%s", err.msg);

    /* a stage keeps only its layers' activations, and the logits only at the end */
    const size_t whole = jm_activation_bytes(&c, B, T), s0 = jm_stage_activation_bytes(&c, B, T, 0, 1),
                 s1 = jm_stage_activation_bytes(&c, B, T, 1, 3);
    check_detail(s0 < s1 && s1 < whole && jm_stage_activation_bytes(&c, B, T, 0, 3) == whole,
                 "stage_activation_bytes", "[0,1) %zu, [1,3) %zu, whole %zu bytes", s0, s1, whole);
    free(x);
    free(mb);
    jm_model_free(m);
}

int main(void)
{
    struct {
        const char *tag;
        int tied, top_k, layers;
    } cfgs[] = {{"tied_top2", 1, 2, 4}, {"untied_top1", 0, 1, 5}};
    for (int ci = 0; ci < 2; ci++) {
        jm_config c = small_config(cfgs[ci].tied, cfgs[ci].top_k, cfgs[ci].layers);
        for (int packed = 0; packed < 2; packed++)
            for (int P = 2; P <= 3; P++) {
                char tag[96];
                int first[MAXP + 1];
                /* P = 2 uneven by hand, P = 3 as the balancer splits */
                if (P == 2) first[0] = 0, first[1] = 1, first[2] = c.num_layers;
                else if (jm_balance_stages(&c, T, P, first, &(jm_error){{0}})) return 2;
                snprintf(tag, sizeof tag, "%s_%s_P%d", cfgs[ci].tag, packed ? "packed" : "plain", P);
                test_pipeline(tag, &c, packed, P, first);
            }
        test_stage_params(&c, cfgs[ci].tag);
    }
    test_balance();
    test_errors();
    return exit_status();
}
