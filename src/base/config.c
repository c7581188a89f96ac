/* config.c — HF config.json <-> jm_config, every field range-checked; and
 * generation_config.json (bos/eos written as transformers does, the sampling
 * defaults read).
 *
 * Reads both the Hugging Face spelling and the JetMoE authors' spelling of
 * each field (spec, "Configuration"); writes the HF one. A field that is
 * absent takes JetMoE-8B's value. */
#include "base/base.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#define CONFIG_MAX_BYTES (1u << 20)

void jm_config_default(jm_config *c)
{
    memset(c, 0, sizeof *c);
    c->vocab_size = 32000;
    c->hidden_size = 2048;
    c->num_layers = 24;
    c->num_kv_heads = 16;
    c->head_dim = 128;
    c->intermediate_size = 5632;
    c->num_experts = 8;
    c->top_k = 2;
    c->max_position_embeddings = 4096;
    c->tie_word_embeddings = 1;
    c->bos_token_id = 1;
    c->eos_token_id = 2;
    c->rope_theta = 10000.0;
    c->rms_norm_eps = 1e-6;
    c->aux_loss_coef = 0.01;  /* HF: aux_loss_coef */
    c->z_loss_coef = 0.001;   /* authors: 0.1 inside each router's loss x 0.01 */
    c->initializer_range = 0.01;
    snprintf(c->activation_function, sizeof c->activation_function, "silu");
}

static jm_status check_int(const char *name, int v, int lo, int hi, jm_error *err)
{
    if (v < lo || v > hi)
        return jm_fail(err, JM_ERR_CONFIG, "config field %s = %d is out of range [%d, %d]", name, v, lo, hi);
    return JM_OK;
}

static jm_status check_real(const char *name, double v, double lo, double hi, jm_error *err)
{
    if (!isfinite(v) || v < lo || v > hi)
        return jm_fail(err, JM_ERR_CONFIG, "config field %s = %g is out of range [%g, %g]", name, v, lo, hi);
    return JM_OK;
}

jm_status jm_config_validate(const jm_config *c, jm_error *err)
{
    /* Upper bounds keep every size product far from int64 overflow and
     * reject "huge dimension" files before any allocation is attempted. */
    jm_status s;
    if ((s = check_int("vocab_size", c->vocab_size, 1, 1 << 22, err))) return s;
    if ((s = check_int("hidden_size", c->hidden_size, 1, 1 << 16, err))) return s;
    if ((s = check_int("num_hidden_layers", c->num_layers, 1, 1024, err))) return s;
    if ((s = check_int("num_key_value_heads", c->num_kv_heads, 1, 1024, err))) return s;
    if ((s = check_int("kv_channels", c->head_dim, 2, 1024, err))) return s;
    if (c->head_dim % 2)
        return jm_fail(err, JM_ERR_CONFIG, "config field kv_channels = %d must be even (RoPE rotates halves)", c->head_dim);
    if ((s = check_int("intermediate_size", c->intermediate_size, 1, 1 << 20, err))) return s;
    if ((s = check_int("num_local_experts", c->num_experts, 1, 1024, err))) return s;
    if ((s = check_int("num_experts_per_tok", c->top_k, 1, c->num_experts, err))) return s;
    if ((s = check_int("max_position_embeddings", c->max_position_embeddings, 1, 1 << 22, err))) return s;
    if ((s = check_int("bos_token_id", c->bos_token_id, 0, c->vocab_size - 1, err))) return s;
    if ((s = check_int("eos_token_id", c->eos_token_id, 0, c->vocab_size - 1, err))) return s;
    if ((s = check_int("tie_word_embeddings", c->tie_word_embeddings, 0, 1, err))) return s;
    if ((s = check_real("rope_theta", c->rope_theta, 1e-6, 1e12, err))) return s;
    /* eps > 0: an all-zero row (a zeroed padding embedding) must not divide by zero */
    if ((s = check_real("rms_norm_eps", c->rms_norm_eps, 1e-30, 1.0, err))) return s;
    if ((s = check_real("aux_loss_coef", c->aux_loss_coef, 0.0, 1e6, err))) return s;
    if ((s = check_real("z_loss_coef", c->z_loss_coef, 0.0, 1e6, err))) return s;
    if ((s = check_real("initializer_range", c->initializer_range, 0.0, 1e3, err))) return s;
    if (strcmp(c->activation_function, "silu") != 0)
        return jm_fail(err, JM_ERR_CONFIG, "config field activation_function = \"%s\" is not supported (only \"silu\")",
                       c->activation_function);
    return JM_OK;
}

/* ---- reading ---- */

/* Looks a field up under its HF name or its alias; both present and
 * different is an error, since we could not tell which one is meant. */
static jm_status field(const cJSON *root, const char *name, const char *alias, const char *file,
                       const cJSON **out, jm_error *err)
{
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(root, name);
    const cJSON *b = alias ? cJSON_GetObjectItemCaseSensitive(root, alias) : NULL;
    if (a && cJSON_IsNull(a)) a = NULL;
    if (b && cJSON_IsNull(b)) b = NULL;
    if (a && b && !cJSON_Compare(a, b, 1))
        return jm_fail(err, JM_ERR_CONFIG, "%s: fields %s and %s disagree", file, name, alias);
    *out = a ? a : b;
    return JM_OK;
}

static jm_status get_int(const cJSON *root, const char *name, const char *alias, const char *file,
                         int *v, jm_error *err)
{
    const cJSON *j = NULL;
    jm_status s = field(root, name, alias, file, &j, err);
    if (s || !j) return s;
    double d = j->valuedouble;
    if (!cJSON_IsNumber(j) || !isfinite(d) || d != floor(d) || fabs(d) > 2147483647.0)
        return jm_fail(err, JM_ERR_CONFIG, "%s: field %s must be an integer", file, name);
    *v = (int)d;
    return JM_OK;
}

static jm_status get_real(const cJSON *j, const char *name, const char *file, double *v, jm_error *err)
{
    if (!j) return JM_OK;
    if (!cJSON_IsNumber(j) || !isfinite(j->valuedouble))
        return jm_fail(err, JM_ERR_CONFIG, "%s: field %s must be a finite number", file, name);
    *v = j->valuedouble;
    return JM_OK;
}

static jm_status get_real_field(const cJSON *root, const char *name, const char *file, double *v, jm_error *err)
{
    return get_real(cJSON_GetObjectItemCaseSensitive(root, name), name, file, v, err);
}

jm_status jm_config_parse(const char *json, size_t len, const char *file, jm_config *c, jm_error *err)
{
    jm_config_default(c);
    cJSON *root;
    jm_status s = jm_json_parse(json, len, file, &root, err);
    if (s) return s;
    if (!cJSON_IsObject(root)) {
        s = jm_fail(err, JM_ERR_FORMAT, "%s: expected a JSON object", file);
        goto done;
    }
    if ((s = jm_json_no_nul(json, len, file, err))) goto done;
    /* HF: JetMoeConfig.model_type; absent is fine (the authors' configs), anything else is another architecture */
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    if (mt && !cJSON_IsNull(mt) && !(cJSON_IsString(mt) && strcmp(mt->valuestring, "jetmoe") == 0)) {
        if (cJSON_IsString(mt))
            s = jm_fail(err, JM_ERR_CONFIG, "%s: field model_type is \"%.64s\"; only \"jetmoe\" models are supported",
                        file, mt->valuestring);
        else
            s = jm_fail(err, JM_ERR_CONFIG, "%s: field model_type must be the string \"jetmoe\"", file);
        goto done;
    }
    /* architectures: transformers' JetMoeForCausalLM, or the authors' JetMoEForCausalLM; absent is fine */
    const cJSON *arch = cJSON_GetObjectItemCaseSensitive(root, "architectures");
    if (arch && !cJSON_IsNull(arch)) {
        const cJSON *a = cJSON_IsArray(arch) ? arch->child : NULL;
        bool known = false, strings = cJSON_IsArray(arch);
        for (; a; a = a->next) {
            strings = strings && cJSON_IsString(a);
            known = known || (cJSON_IsString(a) && (!strcmp(a->valuestring, JM_ARCHITECTURE) ||
                                                    !strcmp(a->valuestring, "JetMoEForCausalLM")));
        }
        if (!strings) {
            s = jm_fail(err, JM_ERR_CONFIG, "%s: field architectures must be a list of strings", file);
            goto done;
        }
        if (arch->child && !known) {
            s = jm_fail(err, JM_ERR_CONFIG, "%s: field architectures names \"%.64s\"; only %s (or the older "
                        "spelling JetMoEForCausalLM) is supported", file, arch->child->valuestring, JM_ARCHITECTURE);
            goto done;
        }
    }
    if ((s = get_int(root, "vocab_size", NULL, file, &c->vocab_size, err))) goto done;
    if ((s = get_int(root, "hidden_size", NULL, file, &c->hidden_size, err))) goto done;
    if ((s = get_int(root, "num_hidden_layers", NULL, file, &c->num_layers, err))) goto done;
    if ((s = get_int(root, "num_key_value_heads", NULL, file, &c->num_kv_heads, err))) goto done;
    if ((s = get_int(root, "kv_channels", "head_dim", file, &c->head_dim, err))) goto done;
    if ((s = get_int(root, "intermediate_size", "ffn_hidden_size", file, &c->intermediate_size, err))) goto done;
    if ((s = get_int(root, "num_local_experts", "moe_num_experts", file, &c->num_experts, err))) goto done;
    if ((s = get_int(root, "num_experts_per_tok", "moe_top_k", file, &c->top_k, err))) goto done;
    if ((s = get_int(root, "max_position_embeddings", NULL, file, &c->max_position_embeddings, err))) goto done;
    if ((s = get_int(root, "bos_token_id", NULL, file, &c->bos_token_id, err))) goto done;
    if ((s = get_int(root, "eos_token_id", NULL, file, &c->eos_token_id, err))) goto done;

    const cJSON *j = cJSON_GetObjectItemCaseSensitive(root, "tie_word_embeddings");
    if (j && !cJSON_IsNull(j)) {
        if (!cJSON_IsBool(j)) {
            s = jm_fail(err, JM_ERR_CONFIG, "%s: field tie_word_embeddings must be true or false", file);
            goto done;
        }
        c->tie_word_embeddings = cJSON_IsTrue(j);
    }
    j = cJSON_GetObjectItemCaseSensitive(root, "activation_function");
    if (j && !cJSON_IsNull(j)) {
        if (!cJSON_IsString(j) || strlen(j->valuestring) >= sizeof c->activation_function) {
            s = jm_fail(err, JM_ERR_CONFIG, "%s: field activation_function must be a short string", file);
            goto done;
        }
        snprintf(c->activation_function, sizeof c->activation_function, "%s", j->valuestring);
    }
    /* rope_theta: top level, or inside rope_parameters (newer transformers).
     * Only plain RoPE exists in JetMoE: a scaling scheme we would ignore is an error. */
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(root, "rope_parameters");
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    if (rs && !cJSON_IsNull(rs)) {
        s = jm_fail(err, JM_ERR_CONFIG, "%s: field rope_scaling is not supported by JetMoE (only plain RoPE)", file);
        goto done;
    }
    if (rp && !cJSON_IsNull(rp)) {
        const cJSON *type = cJSON_IsObject(rp) ? cJSON_GetObjectItemCaseSensitive(rp, "rope_type") : NULL;
        if (!cJSON_IsObject(rp) || (type && !(cJSON_IsString(type) && strcmp(type->valuestring, "default") == 0))) {
            s = jm_fail(err, JM_ERR_CONFIG, "%s: field rope_parameters must be an object with rope_type \"default\"",
                        file);
            goto done;
        }
        if ((s = get_real(cJSON_GetObjectItemCaseSensitive(rp, "rope_theta"), "rope_parameters.rope_theta", file,
                          &c->rope_theta, err)))
            goto done;
    }
    const cJSON *rt = cJSON_GetObjectItemCaseSensitive(root, "rope_theta");
    if (rt && !cJSON_IsNull(rt)) {
        double nested = c->rope_theta, top = nested;
        if ((s = get_real(rt, "rope_theta", file, &top, err))) goto done;
        if (rp && !cJSON_IsNull(rp) && cJSON_GetObjectItemCaseSensitive(rp, "rope_theta") && top != nested) {
            s = jm_fail(err, JM_ERR_CONFIG, "%s: fields rope_theta and rope_parameters.rope_theta disagree", file);
            goto done;
        }
        c->rope_theta = top;
    }
    if ((s = get_real_field(root, "rms_norm_eps", file, &c->rms_norm_eps, err))) goto done;
    if ((s = get_real_field(root, "aux_loss_coef", file, &c->aux_loss_coef, err))) goto done;
    if ((s = get_real_field(root, "z_loss_coef", file, &c->z_loss_coef, err))) goto done;
    if ((s = get_real_field(root, "initializer_range", file, &c->initializer_range, err))) goto done;

    /* The authors' num_attention_heads is derived in HF; when given it must agree. */
    int heads = 0;
    const cJSON *hj = cJSON_GetObjectItemCaseSensitive(root, "num_attention_heads");
    int has_heads = hj && !cJSON_IsNull(hj);
    if ((s = get_int(root, "num_attention_heads", NULL, file, &heads, err))) goto done;
    if ((s = jm_config_validate(c, err))) {
        char inner[sizeof err->msg];
        snprintf(inner, sizeof inner, "%s", err->msg);
        s = jm_fail(err, s, "%s: %s", file, inner);
        goto done;
    }
    if (has_heads && (int64_t)heads != (int64_t)c->num_kv_heads * c->top_k)
        s = jm_fail(err, JM_ERR_CONFIG,
                    "%s: field num_attention_heads = %d must equal num_key_value_heads * num_experts_per_tok = %d",
                    file, heads, c->num_kv_heads * c->top_k);
done:
    cJSON_Delete(root);
    return s;
}

/* Every key jm_config_parse above reads, and the descriptive ones
 * jm_config_save writes (so a checkpoint's own config.json is accepted
 * wherever this list is enforced: the recipe's "model"). Keep in step with
 * both. */
static const char *const config_keys[] = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "kv_channels", "head_dim",
    "intermediate_size", "ffn_hidden_size", "num_local_experts", "moe_num_experts", "num_experts_per_tok",
    "moe_top_k", "max_position_embeddings", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "activation_function", "rope_parameters", "rope_scaling", "rope_theta", "rms_norm_eps", "aux_loss_coef",
    "z_loss_coef", "initializer_range", "num_attention_heads",
    "architectures", "model_type", "torch_dtype", "output_router_logits", "use_cache", "attention_dropout",
    "transformers_version", /* written by jm_config_save, not read */
};

const char *const *jm_config_keys(int *n)
{
    *n = (int)(sizeof config_keys / sizeof config_keys[0]);
    return config_keys;
}

jm_status jm_config_load(const char *path, jm_config *c, jm_error *err)
{
    char *buf;
    size_t len;
    jm_status s = jm_read_file(path, CONFIG_MAX_BYTES, &buf, &len, err);
    if (s) return s;
    s = jm_config_parse(buf, len, path, c, err);
    free(buf);
    return s;
}

/* ---- writing ---- */

jm_status jm_config_save(const char *path, const jm_config *c, jm_error *err)
{
    jm_status s = jm_config_validate(c, err);
    if (s) return s;
    cJSON *o = cJSON_CreateObject();
    if (!o) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
    cJSON *arch = cJSON_AddArrayToObject(o, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString(JM_ARCHITECTURE)); /* transformers' class, vLLM's registry key */
    cJSON_AddStringToObject(o, "model_type", "jetmoe");
    cJSON_AddNumberToObject(o, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(o, "hidden_size", c->hidden_size);
    cJSON_AddNumberToObject(o, "num_hidden_layers", c->num_layers);
    cJSON_AddNumberToObject(o, "num_key_value_heads", c->num_kv_heads);
    cJSON_AddNumberToObject(o, "num_attention_heads", c->num_kv_heads * c->top_k);
    cJSON_AddNumberToObject(o, "kv_channels", c->head_dim);
    cJSON_AddNumberToObject(o, "intermediate_size", c->intermediate_size);
    cJSON_AddNumberToObject(o, "num_local_experts", c->num_experts);
    cJSON_AddNumberToObject(o, "num_experts_per_tok", c->top_k);
    cJSON_AddNumberToObject(o, "max_position_embeddings", c->max_position_embeddings);
    cJSON_AddStringToObject(o, "activation_function", c->activation_function);
    cJSON_AddNumberToObject(o, "rope_theta", c->rope_theta);
    cJSON_AddNumberToObject(o, "rms_norm_eps", c->rms_norm_eps);
    cJSON_AddBoolToObject(o, "tie_word_embeddings", c->tie_word_embeddings);
    cJSON_AddNumberToObject(o, "aux_loss_coef", c->aux_loss_coef);
    cJSON_AddNumberToObject(o, "z_loss_coef", c->z_loss_coef);
    cJSON_AddNumberToObject(o, "initializer_range", c->initializer_range);
    cJSON_AddNumberToObject(o, "bos_token_id", c->bos_token_id);
    cJSON_AddNumberToObject(o, "eos_token_id", c->eos_token_id);
    /* HF JetMoeConfig's other fields, which save_pretrained writes for every model: their
     * defaults (no router logits returned, KV cache used, no attention dropout) */
    cJSON_AddFalseToObject(o, "output_router_logits");
    cJSON_AddTrueToObject(o, "use_cache");
    cJSON_AddNumberToObject(o, "attention_dropout", 0.0);
    cJSON_AddStringToObject(o, "torch_dtype", "float32");
    cJSON_AddStringToObject(o, "transformers_version", JM_TRANSFORMERS_VERSION);
    s = jm_write_json(path, o, err);
    cJSON_Delete(o);
    return s;
}

/* ---- parameter counts ---- */

int64_t jm_config_num_params(const jm_config *c)
{
    int64_t H = c->hidden_size, V = c->vocab_size, E = c->num_experts, A = (int64_t)c->num_kv_heads * c->head_dim;
    int64_t F = c->intermediate_size;
    int64_t moa = 2 * A * H + E * H + E * A * H * 2 + H;
    int64_t moe = E * H + E * 2 * F * H + E * H * F + H;
    int64_t layer = H + moa + H + moe;
    return V * H + c->num_layers * layer + H + (c->tie_word_embeddings ? 0 : V * H);
}

int64_t jm_config_active_params(const jm_config *c)
{
    /* Per token: the embedding row read is not compute; count what a token's
     * forward multiplies through (the lm_head included), with k of E experts. */
    int64_t H = c->hidden_size, V = c->vocab_size, E = c->num_experts, k = c->top_k;
    int64_t A = (int64_t)c->num_kv_heads * c->head_dim, F = c->intermediate_size;
    int64_t moa = 2 * A * H + E * H + k * A * H * 2 + H;
    int64_t moe = E * H + k * 2 * F * H + k * H * F + H;
    int64_t layer = H + moa + H + moe;
    return c->num_layers * layer + H + V * H;
}

/* ---- generation_config.json ---- */

jm_status jm_generation_config_save(const char *path, const jm_config *c, jm_error *err)
{
    /* what transformers' save_pretrained writes for a model without sampling
     * defaults (GenerationConfig.from_model_config, keys sorted) */
    cJSON *o = cJSON_CreateObject();
    bool ok = o && cJSON_AddTrueToObject(o, "_from_model_config") &&
              cJSON_AddNumberToObject(o, "bos_token_id", c->bos_token_id) &&
              cJSON_AddNumberToObject(o, "eos_token_id", c->eos_token_id) &&
              cJSON_AddStringToObject(o, "transformers_version", JM_TRANSFORMERS_VERSION);
    jm_status s = ok ? jm_write_json(path, o, err) : jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
    cJSON_Delete(o);
    return s;
}

/* A sampling field: absent or null leaves *has 0; otherwise a number in
 * [lo, hi] (lo excluded with open_lo; a whole number with integer). */
static jm_status gen_field(const cJSON *root, const char *name, double lo, double hi, int open_lo, int integer,
                           const char *file, int *has, double *v, jm_error *err)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!j || cJSON_IsNull(j)) return JM_OK;
    double d = cJSON_IsNumber(j) ? j->valuedouble : NAN;
    if (!isfinite(d) || (open_lo ? d <= lo : d < lo) || d > hi || (integer && d != floor(d)))
        return jm_fail(err, JM_ERR_CONFIG, "%s: field %s must be %s in %s%g, %g]", file, name,
                       integer ? "an integer" : "a number", open_lo ? "(" : "[", lo, hi);
    *has = 1;
    *v = d;
    return JM_OK;
}

jm_status jm_generation_config_load(const char *dir, jm_generation_config *g, jm_error *err)
{
    memset(g, 0, sizeof *g);
    char *path = jm_path_join(dir, "generation_config.json"), *buf = NULL;
    size_t len;
    cJSON *root = NULL;
    if (!path) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dir);
    jm_status s = JM_OK;
    if (access(path, F_OK) != 0) goto done; /* none: the commands' own defaults */
    g->found = 1;
    if ((s = jm_read_file(path, CONFIG_MAX_BYTES, &buf, &len, err))) goto done;
    if ((s = jm_json_parse(buf, len, path, &root, err))) goto done;
    if (!cJSON_IsObject(root)) {
        s = jm_fail(err, JM_ERR_FORMAT, "%s: expected a JSON object", path);
        goto done;
    }
    const cJSON *ds = cJSON_GetObjectItemCaseSensitive(root, "do_sample");
    if (ds && !cJSON_IsNull(ds)) {
        if (!cJSON_IsBool(ds)) {
            s = jm_fail(err, JM_ERR_CONFIG, "%s: field do_sample must be true or false", path);
            goto done;
        }
        g->has_do_sample = 1;
        g->do_sample = cJSON_IsTrue(ds);
    }
    double top_k = 0, max_new = 0; /* HF: top_k, max_new_tokens; ranges as the CLI flags' */
    if ((s = gen_field(root, "temperature", 0, 100, 0, 0, path, &g->has_temperature, &g->temperature, err)) ||
        (s = gen_field(root, "top_p", 0, 1, 1, 0, path, &g->has_top_p, &g->top_p, err)) ||
        (s = gen_field(root, "top_k", 0, 1 << 24, 0, 1, path, &g->has_top_k, &top_k, err)) ||
        (s = gen_field(root, "repetition_penalty", 0, 100, 1, 0, path, &g->has_repetition_penalty,
                       &g->repetition_penalty, err)) ||
        (s = gen_field(root, "max_new_tokens", 1, 1 << 20, 0, 1, path, &g->has_max_new_tokens, &max_new, err)))
        goto done;
    g->top_k = (int)top_k;
    g->max_new_tokens = (int)max_new;
done:
    cJSON_Delete(root);
    free(buf);
    free(path);
    return s;
}
