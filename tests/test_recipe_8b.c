/* test_recipe_8b.c — data/recipe-jetmoe-8b.json, JetMoE-8B's pretraining
 * recipe, read by the recipe parser (jm_recipe_parse: everything in the text
 * checked, no file opened: its source directories are placeholders) and
 * held against the published numbers (README: Training at scale):
 *   the model: jetmoe-spec.md's table and the HF config (24 layers, H 2048,
 *     16 KV heads of 128, FFN 5632, 8 experts top-2 in MoA and MoE, vocab
 *     32000, context 4096, RoPE 10000) - 8.5B parameters, 2.2B active;
 *   the schedule: 4M-token steps (1024 x 4096), 1T tokens in phase 1 and
 *     250B in phase 2 (1.25T in all), 10B tokens of warmup, WSD at 5e-4;
 *   the mixtures of the report's two phases, in percent.
 * The counts are recomputed here from the spec's tensor table, not from
 * jm_config_num_params' formula, so the two check each other. */
#include "harness.h"
#include "train/train.h"

#include <libgen.h>
#include <limits.h>
#include <math.h>

/* The repository root from this program's path (BUILD/tests/test_recipe_8b). */
static bool repo_root(const char *argv0, char *out, size_t cap)
{
    char real[PATH_MAX];
    if (!realpath(argv0, real)) return false;
    for (int up = 0; up < 3; up++) {
        char *slash = strrchr(real, '/');
        if (!slash || slash == real) return false;
        *slash = 0;
    }
    snprintf(out, cap, "%s", real);
    return true;
}

/* Parameters of the spec's tensor table ("Tensors"), per name, summed. */
static int64_t spec_params(int64_t V, int64_t H, int64_t L, int64_t Hkv, int64_t D, int64_t F, int64_t E, bool tied)
{
    int64_t per_layer = H                     /* input_layernorm */
                        + 2 * Hkv * D * H     /* self_attention.kv_proj */
                        + E * H               /* self_attention.experts.router */
                        + E * Hkv * D * H     /* experts.input_linear [E, Hkv*D, H] */
                        + E * H * Hkv * D     /* experts.output_linear [E, H, Hkv*D] */
                        + H                   /* experts.bias */
                        + H                   /* post_attention_layernorm */
                        + E * H               /* mlp.router */
                        + E * 2 * F * H       /* mlp.input_linear [E, 2F, H] */
                        + E * H * F           /* mlp.output_linear [E, H, F] */
                        + H;                  /* mlp.bias */
    return V * H + L * per_layer + H + (tied ? 0 : V * H);
}

static int find_source(const jm_recipe *r, const char *name)
{
    for (int i = 0; i < r->nsources; i++)
        if (strcmp(r->source_name[i], name) == 0) return i;
    return -1;
}

/* The phase's mixture, in percent, is exactly want (names absent from want: 0). */
static bool mixture_is(const jm_recipe *r, int phase, const char *const *names, const double *pct, int n,
                       char *why, size_t cap)
{
    double sum = 0;
    for (int i = 0; i < r->nsources; i++) sum += r->phases[phase].weights[i];
    for (int i = 0; i < r->nsources; i++) {
        double want = 0;
        for (int k = 0; k < n; k++)
            if (strcmp(names[k], r->source_name[i]) == 0) want = pct[k];
        double got = 100 * r->phases[phase].weights[i] / sum;
        if (fabs(got - want) > 1e-9) {
            snprintf(why, cap, "phase %d: %s is %.2f%%, want %.2f%%", phase + 1, r->source_name[i], got, want);
            return false;
        }
    }
    for (int k = 0; k < n; k++)
        if (find_source(r, names[k]) < 0) {
            snprintf(why, cap, "phase %d: no source %s", phase + 1, names[k]);
            return false;
        }
    return true;
}

int main(int argc, char **argv)
{
    (void)argc;
    char root[PATH_MAX], path[PATH_MAX + 64];
    if (!check(repo_root(argv[0], root, sizeof root), "recipe_8b_found", "cannot find the repository from %s",
               argv[0]))
        return exit_status();
    snprintf(path, sizeof path, "%s/data/recipe-jetmoe-8b.json", root);
    size_t len;
    char *text = slurp(path, &len);
    jm_recipe *r = NULL;
    jm_error err = {{0}};
    const bool read = text != NULL;
    jm_status s = read ? jm_recipe_parse(text, len, path, &r, &err) : JM_ERR_IO;
    free(text);
    if (!check(s == JM_OK, "recipe_8b_parses", "%s: %s", path, read ? err.msg : "cannot read it")) return exit_status();

    const jm_config *c = &r->model;
    check_detail(c->vocab_size == 32000 && c->hidden_size == 2048 && c->num_layers == 24 && c->num_kv_heads == 16 &&
                     c->head_dim == 128 && c->intermediate_size == 5632 && c->num_experts == 8 && c->top_k == 2 &&
                     c->max_position_embeddings == 4096 && c->rope_theta == 10000.0 && c->rms_norm_eps == 1e-5 &&
                     c->tie_word_embeddings && c->bos_token_id == 1 && c->eos_token_id == 2 &&
                     c->initializer_range == 0.01 && r->seq_len == 4096,
                 "recipe_8b_config", "V %d H %d L %d kv %dx%d F %d E %d k %d ctx %d theta %g eps %g tied %d",
                 c->vocab_size, c->hidden_size, c->num_layers, c->num_kv_heads, c->head_dim, c->intermediate_size,
                 c->num_experts, c->top_k, c->max_position_embeddings, c->rope_theta, c->rms_norm_eps,
                 c->tie_word_embeddings);

    int64_t total = jm_config_num_params(c), active = jm_config_active_params(c);
    int64_t table = spec_params(c->vocab_size, c->hidden_size, c->num_layers, c->num_kv_heads, c->head_dim,
                                c->intermediate_size, c->num_experts, c->tie_word_embeddings);
    /* "about 8.5B parameters, about 2.2B active per token" (spec, HF card);
     * the active count here includes the tied output projection (V x H) */
    check_detail(total == table && total > 8.45e9 && total < 8.55e9 && active > 2.2e9 && active < 2.35e9,
                 "recipe_8b_param_counts", "%.4gB total (spec table: %.4gB), %.4gB active", total / 1e9, table / 1e9,
                 active / 1e9);

    const double step_tokens = (double)r->batch_size * r->grad_accum * r->seq_len;
    const double p1 = r->nphases > 0 ? (double)r->phases[0].steps * step_tokens : 0;
    const double p2 = r->nphases > 1 ? (double)r->phases[1].steps * step_tokens : 0;
    const double warm = (double)r->schedule.warmup_steps * step_tokens;
    check_detail(r->nphases == 2 && step_tokens == 4194304 && fabs(p1 - 1e12) <= step_tokens &&
                     fabs(p2 - 250e9) <= step_tokens && fabs(warm - 10e9) <= step_tokens &&
                     r->schedule.type == JM_SCHEDULE_WSD && r->schedule.decay_steps == r->phases[1].steps &&
                     r->schedule.total_steps == r->phases[0].steps + r->phases[1].steps && r->adamw.lr == 5e-4 &&
                     r->adamw.weight_decay == 0.1 && r->adamw.grad_clip == 1.0 && r->model.aux_loss_coef == 0.01 &&
                     r->model.z_loss_coef == 0.001,
                 "recipe_8b_schedule", "%.0f tokens a step; phase 1 %.4gT, phase 2 %.4gB tokens; warmup %.4gB; lr %g",
                 step_tokens, p1 / 1e12, p2 / 1e9, warm / 1e9, r->adamw.lr);

    char why[256] = "";
    static const char *const ph1[] = {"refinedweb", "starcoder_github", "pile", "arxiv", "pes2o", "openwebmath"};
    static const double pct1[] = {64, 25, 8, 1, 1, 1};
    static const char *const ph2[] = {"refinedweb", "starcoder_github", "wikipedia", "nl_sft", "math",
                                      "pile",       "textbook",         "code_sft",  "arxiv"};
    static const double pct2[] = {41, 20, 11, 7, 6, 5, 5, 4, 1};
    bool mix = r->nphases == 2 && mixture_is(r, 0, ph1, pct1, 6, why, sizeof why) &&
               mixture_is(r, 1, ph2, pct2, 9, why, sizeof why);
    check(mix, "recipe_8b_mixtures", "%s", why);

    /* the full loader opens what the recipe names: the placeholders stop it, naming the recipe */
    jm_recipe_free(r);
    jm_recipe *full = NULL;
    s = jm_recipe_load(path, &full, &err);
    check(s != JM_OK && strstr(err.msg, path) != NULL, "recipe_8b_placeholders_refused_by_load",
          "status %s: %s", jm_status_name(s), err.msg);
    jm_recipe_free(full);
    return exit_status();
}
