/* test_model.c — unit tests of config, router, dispatch, checkpoints and
 * batching. Golden values against PyTorch live in run_tests.py; these test
 * the pieces and properties a golden test cannot isolate.
 * Prints `PASS name` / `FAIL name: why`; exits 1 on any failure. */
#include "base/safetensors.h"
#include "model/ops/ops.h"
#include "harness.h"

#include <math.h>
#include <string.h>
#include <unistd.h>

static jm_config tiny_config(void)
{
    jm_config c;
    jm_config_default(&c);
    c.vocab_size = 50;
    c.hidden_size = 24;
    c.num_layers = 2;
    c.num_kv_heads = 2;
    c.head_dim = 6;
    c.intermediate_size = 20;
    c.num_experts = 4;
    c.top_k = 2;
    c.max_position_embeddings = 64;
    c.initializer_range = 0.2; /* large enough that routing is far from uniform */
    return c;
}

static void test_config(const char *tmp)
{
    jm_config c;
    jm_error err = {{0}};
    const char *authors = "{\"vocab_size\": 100, \"hidden_size\": 64, \"ffn_hidden_size\": 96, "
                          "\"moe_num_experts\": 4, \"moe_top_k\": 1, \"head_dim\": 8, \"num_key_value_heads\": 2, "
                          "\"num_attention_heads\": 2, \"rope_parameters\": {\"rope_theta\": 500.0}, "
                          "\"tie_word_embeddings\": false, \"some_unknown_field\": [1, 2]}";
    jm_status s = jm_config_parse(authors, strlen(authors), "authors.json", &c, &err);
    check(s == JM_OK && c.intermediate_size == 96 && c.num_experts == 4 && c.top_k == 1 && c.head_dim == 8 &&
              c.rope_theta == 500.0 && !c.tie_word_embeddings,
          "config_authors_spelling", "status %d: %s", s, err.msg);
    check(s == JM_OK && c.num_layers == 24 && c.max_position_embeddings == 4096 && c.rms_norm_eps == 1e-6 &&
              c.aux_loss_coef == 0.01 && c.z_loss_coef == 0.001,
          "config_defaults_are_8b", "layers %d", c.num_layers);

    /* "jetmoe" (what HF's JetMoeConfig and jetmoe/jetmoe-8b say), null and absent are JetMoE */
    static const char *const ours[] = {"{\"model_type\": \"jetmoe\"}", "{\"model_type\": null}", "{}"};
    for (int i = 0; i < 3; i++) {
        s = jm_config_parse(ours[i], strlen(ours[i]), "ours.json", &c, &err);
        check(s == JM_OK, i == 0 ? "config_model_type_jetmoe" : i == 1 ? "config_model_type_null" : "config_model_type_absent",
              "%s: %s", ours[i], err.msg);
    }

    jm_config d;
    jm_config_default(&d);
    check(jm_config_num_params(&d) > 8400000000LL && jm_config_num_params(&d) < 8600000000LL &&
              jm_config_active_params(&d) > 2100000000LL && jm_config_active_params(&d) < 2400000000LL,
          "config_8b_param_count", "total %lld active %lld", (long long)jm_config_num_params(&d),
          (long long)jm_config_active_params(&d));

    char path[512];
    snprintf(path, sizeof path, "%s/config.json", tmp);
    jm_config e;
    s = jm_config_save(path, &c, &err);
    jm_status s2 = s ? s : jm_config_load(path, &e, &err);
    check(s2 == JM_OK && memcmp(&c, &e, sizeof c) == 0, "config_save_load_roundtrip", "%s", err.msg);

    struct {
        const char *json, *expect;
    } bad[] = {
        {"{\"hidden_size\": 0}", "hidden_size"},
        {"{\"hidden_size\": 3.5}", "hidden_size"},
        {"{\"num_experts_per_tok\": 9}", "num_experts_per_tok"},
        {"{\"kv_channels\": 7}", "kv_channels"},
        {"{\"rms_norm_eps\": -1}", "rms_norm_eps"},
        {"{\"activation_function\": \"gelu\"}", "activation_function"},
        {"{\"tie_word_embeddings\": 1}", "tie_word_embeddings"},
        {"{\"intermediate_size\": 10, \"ffn_hidden_size\": 11}", "ffn_hidden_size"},
        {"{\"eos_token_id\": 40000}", "eos_token_id"},
        {"[1, 2]", "object"},
        {"{\"a\": 1} trailing", "JSON"},
        {"{\"num_experts_per_tok\": 2, \"num_experts_per_tok\": 4}", "duplicate key \"num_experts_per_tok\""},
        {"{\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2}}", "rope_scaling"},
        {"{\"rope_theta\": 100, \"rope_parameters\": {\"rope_theta\": 200}}", "disagree"},
        {"{\"rope_parameters\": {\"rope_type\": \"yarn\"}}", "rope_type"},
        {"{\"rms_norm_eps\": 0}", "rms_norm_eps"},
        {"{\"num_attention_heads\": -1}", "num_attention_heads"},
        {"{\"vocab_size\": 1e300}", "vocab_size"},
        /* another architecture's config is not read as JetMoE's */
        {"{\"model_type\": \"llama\"}", "field model_type is \"llama\"; only \"jetmoe\""},
        {"{\"model_type\": \"JetMoE\"}", "field model_type is \"JetMoE\""},
        {"{\"model_type\": \"\"}", "field model_type is \"\""},
        {"{\"model_type\": 5}", "field model_type must be the string \"jetmoe\""},
        {"{\"model_type\": [\"jetmoe\"]}", "field model_type must be the string"},
        {"{\"model_type\": \"jetmoe\\u0000llama\"}", "\\u0000 (NUL)"},
        {"{\"activation_function\": \"silu\\u0000gelu\"}", "\\u0000 (NUL)"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "config_rejects_%zu", i);
        err.msg[0] = 0;
        s = jm_config_parse(bad[i].json, strlen(bad[i].json), "bad.json", &c, &err);
        check(s != JM_OK && strstr(err.msg, bad[i].expect) && strstr(err.msg, "bad.json"), name,
              "%s -> status %d, message '%s'", bad[i].json, s, err.msg);
    }
}

static void test_router(void)
{
    /* one token, E = 5: logits with a tie between experts 1 and 3 */
    const float x[1] = {1.0f};
    const float Wr[5] = {0.5f, 2.0f, -1.0f, 2.0f, 1.5f};
    float z[5], gate[3];
    int32_t idx[3];
    router_forward(z, idx, gate, x, Wr, 1, 1, 5, 3);
    check(idx[0] == 1 && idx[1] == 3 && idx[2] == 4, "router_topk_ties_lower_index_first", "got %d %d %d", idx[0],
          idx[1], idx[2]);
    double e0 = exp(0.0), e2 = exp(-0.5), s = 2 * e0 + e2;
    check(fabs(gate[0] - e0 / s) < 1e-6 && fabs(gate[1] - e0 / s) < 1e-6 && fabs(gate[2] - e2 / s) < 1e-6,
          "router_gates_softmax_over_selected", "gates %g %g %g", gate[0], gate[1], gate[2]);

    /* uniform logits, perfectly balanced choices -> switch loss exactly 1 */
    float zu[4 * 2] = {0};
    int32_t iu[4] = {0, 1, 0, 1};
    double sw, zl;
    router_losses(&sw, &zl, zu, iu, NULL, 4, 2, 1);
    check(fabs(sw - 1.0) < 1e-12 && fabs(zl - log(2.0) * log(2.0)) < 1e-12, "router_switch_loss_balanced_is_one",
          "switch %g z %g", sw, zl);
    int32_t ic[4] = {0, 0, 0, 0};
    router_losses(&sw, &zl, zu, ic, NULL, 4, 2, 1);
    check(fabs(sw - 1.0) < 1e-12, "router_switch_loss_collapsed", "switch %g", sw); /* P uniform: E*0.5*1 = 1 */
}

static void test_dispatch(void)
{
    /* N = 4 tokens, k = 2, E = 3 */
    const int32_t idx[8] = {2, 0, 0, 1, 2, 1, 0, 2};
    int32_t sorted[8], pos[8];
    int64_t off[4];
    dispatch_build(sorted, pos, off, idx, 4, 2, 3);
    int ok = off[0] == 0 && off[1] == 3 && off[2] == 5 && off[3] == 8;
    for (int m = 0; m < 8; m++) ok &= pos[sorted[m]] == m;
    for (int e = 0; e < 3; e++)
        for (int64_t m = off[e]; m < off[e + 1]; m++) {
            ok &= idx[sorted[m]] == e;
            if (m > off[e]) ok &= sorted[m] > sorted[m - 1]; /* stable */
        }
    check(ok, "dispatch_sorted_by_expert_stable", "offsets %lld %lld %lld %lld", (long long)off[0], (long long)off[1],
          (long long)off[2], (long long)off[3]);
}

static void test_halves(void)
{
    check(jm_bf16_to_f32(jm_f32_to_bf16(1.0f)) == 1.0f && jm_bf16_to_f32(jm_f32_to_bf16(-2.5f)) == -2.5f &&
              jm_f32_to_bf16(1.0f + 1.0f / 256) == jm_f32_to_bf16(1.0f) && /* ties to even */
              isnan(jm_bf16_to_f32(jm_f32_to_bf16(NAN))),
          "bf16_roundtrip", "bf16 conversion");
    check(jm_f16_to_f32(0x3c00) == 1.0f && jm_f16_to_f32(0xc000) == -2.0f &&
              jm_f16_to_f32(0x0001) == ldexpf(1.0f, -24) && isinf(jm_f16_to_f32(0x7c00)) &&
              jm_f16_to_f32(0x7bff) == 65504.0f && jm_f16_to_f32(0x0200) == ldexpf(1.0f, -15),
          "f16_values", "f16 conversion");
}

static void test_expf(void)
{
    double worst = 0;
    float at = 0;
    for (float x = -87.0f; x < 88.0f; x += 0.000731f) {
        double e = exp((double)x), r = fabs(jm_expf(x) - e) / e;
        if (r > worst) {
            worst = r;
            at = x;
        }
    }
    check(worst < 2 * 5.97e-8, "expf_within_2ulp", "max rel err %.3g at %g", worst, at);
    check(jm_expf(0.0f) == 1.0f && jm_expf(-INFINITY) < 1e-37f && isnan(jm_expf(NAN)), "expf_edges",
          "exp(0) %g exp(-inf) %g", jm_expf(0.0f), jm_expf(-INFINITY));
}

static void test_checkpoint_and_batch(const char *tmp)
{
    jm_config c = tiny_config();
    jm_model *m = NULL, *r = NULL;
    jm_error err = {{0}};
    jm_status s = jm_model_create(&c, 42, &m, &err);
    check(s == JM_OK, "model_create", "%s", err.msg);
    if (s) return;
    char dir[512];
    snprintf(dir, sizeof dir, "%s/ckpt", tmp);
    s = jm_model_save(m, dir, &err);
    if (!s) s = jm_model_load(dir, &r, &err);
    int same = s == JM_OK && jm_model_num_params(r) == jm_model_num_params(m);
    for (int i = 0; same && i < jm_model_num_params(m); i++) {
        const jm_param *a = jm_model_param(m, i), *b = jm_model_param(r, i);
        same = strcmp(a->name, b->name) == 0 && a->numel == b->numel &&
               memcmp(a->data, b->data, (size_t)a->numel * sizeof(float)) == 0;
    }
    check(same, "model_save_load_bit_exact", "%s", err.msg);

    /* Two sequences in one batch give each sequence's logits as if run alone
     * (the router losses are batch statistics, so only logits are compared). */
    enum { T = 9 };
    int32_t toks[2 * T];
    for (int i = 0; i < 2 * T; i++) toks[i] = (i * 7 + 3) % c.vocab_size;
    jm_losses lb, l0;
    float *both = malloc(sizeof(float) * 2 * T * c.vocab_size);
    s = jm_forward(m, toks, 2, T, &lb, &err);
    if (!s) memcpy(both, jm_logits(m), sizeof(float) * 2 * T * c.vocab_size);
    double maxdiff = 0;
    for (int b = 0; !s && b < 2; b++) {
        s = jm_forward(m, toks + b * T, 1, T, &l0, &err);
        for (int i = 0; !s && i < T * c.vocab_size; i++)
            maxdiff = fmax(maxdiff, fabs(both[b * T * c.vocab_size + i] - jm_logits(m)[i]));
    }
    check(s == JM_OK && maxdiff < 1e-5, "forward_batch_matches_single", "status %d (%s), max diff %g", s, err.msg,
          maxdiff);

    /* causality: changing the last token changes nothing before it */
    float *before = malloc(sizeof(float) * T * c.vocab_size);
    s = jm_forward(m, toks, 1, T, NULL, &err);
    if (!s) memcpy(before, jm_logits(m), sizeof(float) * T * c.vocab_size);
    toks[T - 1] = (toks[T - 1] + 1) % c.vocab_size;
    if (!s) s = jm_forward(m, toks, 1, T, NULL, &err);
    /* (not bit-exact: the expert GEMMs' row counts change with the routing of
     * the last token, and BLAS may take another kernel path for them) */
    double early = 0, last = 0;
    for (int i = 0; !s && i < T * c.vocab_size; i++) {
        double d = fabs(before[i] - jm_logits(m)[i]);
        if (i < (T - 1) * c.vocab_size) early = fmax(early, d);
        else last = fmax(last, d);
    }
    check(s == JM_OK && early < 1e-6 && last > 1e-3, "forward_causal", "status %d, change before %g, at last %g", s,
          early, last);

    /* KV cache: a prefill of 5 tokens then single steps give the logits the
     * full forward gives at every position; rewinding re-uses the prefix */
    {
        const int V = c.vocab_size;
        float *full = malloc(sizeof(float) * T * V);
        s = jm_forward(m, toks, 1, T, NULL, &err);
        if (!s) memcpy(full, jm_logits(m), sizeof(float) * T * V);
        double worst = 0, scale = 0;
        const float *lg;
        for (int i = 0; i < T * V; i++) scale = fmax(scale, fabs(full[i]));
        if (!s) s = jm_infer(m, toks, 5, 0, &lg, &err);
        for (int i = 0; !s && i < V; i++) worst = fmax(worst, fabs(lg[i] - full[4 * V + i]));
        for (int t = 5; !s && t < T; t++) {
            s = jm_infer(m, toks + t, 1, t, &lg, &err);
            for (int i = 0; !s && i < V; i++) worst = fmax(worst, fabs(lg[i] - full[t * V + i]));
        }
        if (!s) s = jm_infer(m, toks + 3, T - 3, 3, &lg, &err); /* rewind to position 3 */
        for (int i = 0; !s && i < V; i++) worst = fmax(worst, fabs(lg[i] - full[(T - 1) * V + i]));
        check(s == JM_OK && worst <= 1e-4 * scale, "kv_cache_logits_equal_full_forward",
              "status %d (%s), max diff %g vs max |logit| %g", s, err.msg, worst, scale);
        s = jm_infer(m, toks, 2, jm_cached(m) + 1, &lg, &err);
        check(s == JM_ERR_ARG, "kv_cache_rejects_gap", "status %d", s);
        free(full);
    }

    int32_t badtok[2] = {1, 50};
    s = jm_forward(m, badtok, 1, 2, NULL, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "50"), "forward_rejects_out_of_vocab", "status %d: %s", s, err.msg);
    free(both);
    free(before);
    jm_model_free(m);
    jm_model_free(r);
}

int main(void)
{
    char tmp[] = "/tmp/jetmoe-test-model-XXXXXX";
    temp_dir(tmp);
    test_config(tmp);
    test_router();
    test_dispatch();
    test_halves();
    test_expf();
    test_checkpoint_and_batch(tmp);
    temp_dir_done(tmp);
    return exit_status();
}
