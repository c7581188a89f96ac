/* cmd_model.c — the commands on checkpoints: info, forward, init, quantize. */
#include "flags.h"

#include <cjson/cJSON.h>

#include <stdlib.h>
#include <string.h>

/* ---- info ---- */

static int run_info(const cli_command *self, int argc, char **argv);

const cli_command cmd_info = {
    "info", "DIR", "validate a checkpoint; config, weight format, parameter counts, tensor table",
    "Validates a Hugging Face JetMoE checkpoint (config.json + safetensors, single or sharded)\n"
    "without loading it, and prints the config, the weight format (f32, bf16, f16, q8, q4 or\n"
    "mixed), total and active-per-token parameter counts and the tensor table.",
    NULL, 0, run_info};

static int is_scale(const char *name)
{
    size_t len = strlen(name);
    return len > 6 && strcmp(name + len - 6, "_scale") == 0;
}

/* "12 U8, 9 F32; 12 *_scale": the tensors per dtype, in order of first
 * appearance, then the block scales of the quantized ones */
static void dtype_counts(const jm_tensor_info *t, int n, char *buf, size_t cap)
{
    size_t len = 0;
    int scales = 0;
    buf[0] = 0;
    for (int i = 0; i < n; i++) {
        if (is_scale(t[i].name)) {
            scales++;
            continue;
        }
        int first = 1, count = 0;
        for (int j = 0; j < n; j++)
            if (!is_scale(t[j].name) && strcmp(t[j].dtype, t[i].dtype) == 0) {
                first &= j >= i;
                count++;
            }
        if (first && len < cap)
            len += (size_t)snprintf(buf + len, cap - len, "%s%d %s", len ? ", " : "", count, t[i].dtype);
    }
    if (scales && len < cap) snprintf(buf + len, cap - len, "; %d *_scale", scales);
}

/* The weight format, from the matrices' dtypes: q8 (I8 blocks) or q4 (U8) when
 * the checkpoint holds quantized matrices (with F16 "*_scale" beside them;
 * routers keep their float dtype), else the one float dtype; "mixed" otherwise. */
static const char *weight_format(const jm_tensor_info *t, int n)
{
    const char *quant = NULL, *fl = NULL;
    int mixed = 0;
    for (int i = 0; i < n; i++) {
        if (t[i].ndim < 2 || is_scale(t[i].name)) continue;
        int q = strcmp(t[i].dtype, "I8") == 0 || strcmp(t[i].dtype, "U8") == 0;
        const char **seen = q ? &quant : &fl;
        if (*seen && strcmp(*seen, t[i].dtype) != 0) mixed = 1;
        *seen = t[i].dtype;
    }
    if (mixed || (!quant && !fl)) return "mixed";
    const char *d = quant ? quant : fl;
    return strcmp(d, "I8") == 0 ? "q8" : strcmp(d, "U8") == 0 ? "q4" : strcmp(d, "F32") == 0 ? "f32"
           : strcmp(d, "BF16") == 0 ? "bf16" : strcmp(d, "F16") == 0 ? "f16" : "mixed";
}

static int shape_text(char *buf, size_t cap, int ndim, const int64_t *shape)
{
    int len = snprintf(buf, cap, "[");
    for (int d = 0; d < ndim; d++)
        len += snprintf(buf + len, cap - (size_t)len, d ? ", %lld" : "%lld", (long long)shape[d]);
    return len + snprintf(buf + len, cap - (size_t)len, "]");
}

/* config.json's first architectures entry as written (jm_checkpoint_inspect
 * has checked it is a JetMoE spelling), or "" when it names none. */
static void architecture(const char *dir, char *out, size_t cap)
{
    char path[4200], *text = NULL;
    long len = 0;
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "rb");
    out[0] = 0;
    if (f && fseek(f, 0, SEEK_END) == 0 && (len = ftell(f)) > 0 && len < (1 << 20) && fseek(f, 0, SEEK_SET) == 0 &&
        (text = malloc((size_t)len)) && fread(text, 1, (size_t)len, f) == (size_t)len) {
        cJSON *root = cJSON_ParseWithLength(text, (size_t)len);
        const cJSON *a = cJSON_GetObjectItemCaseSensitive(root, "architectures");
        if (cJSON_IsArray(a) && cJSON_IsString(a->child)) snprintf(out, cap, "%s", a->child->valuestring);
        cJSON_Delete(root);
    }
    if (f) fclose(f);
    free(text);
}

static int run_info(const cli_command *self, int argc, char **argv)
{
    const char *path;
    char dir[4096];
    int rc = cli_parse(self, argc, argv, NULL, &path);
    if (rc != CLI_RUN) return rc;
    if ((rc = cli_model_dir(self, path, dir, sizeof dir)) != CLI_RUN) return rc;
    jm_config c;
    jm_tensor_info *t;
    int n;
    jm_error err;
    jm_status s = jm_checkpoint_inspect(dir, &c, &t, &n, &err);
    if (s) return cli_fail(self, s, &err);
    int64_t total = jm_config_num_params(&c), active = jm_config_active_params(&c);
    char counts[256], shape[96];
    dtype_counts(t, n, counts, sizeof counts);
    printf("checkpoint        %s\n", cli_shown(&err, dir));
    printf("weights           %s (%s)\n", weight_format(t, n), counts);
    char arch[64];
    architecture(dir, arch, sizeof arch);
    printf("architecture      %s\n", arch[0] ? cli_shown(&err, arch) : "(config.json names none)");
    printf("vocab_size        %d\n", c.vocab_size);
    printf("hidden_size       %d\n", c.hidden_size);
    printf("num_hidden_layers %d\n", c.num_layers);
    printf("kv heads x dim    %d x %d (query heads %d)\n", c.num_kv_heads, c.head_dim, c.num_kv_heads * c.top_k);
    printf("intermediate_size %d\n", c.intermediate_size);
    printf("experts           %d, top-%d (MoA and MoE)\n", c.num_experts, c.top_k);
    printf("context           %d (rope_theta %g)\n", c.max_position_embeddings, c.rope_theta);
    printf("tied embeddings   %s\n", c.tie_word_embeddings ? "yes" : "no");
    printf("parameters        %lld total (%.2f%s), %lld active per token (%.2f%s)\n", (long long)total,
           total >= 1e9 ? total / 1e9 : total / 1e6, total >= 1e9 ? "B" : "M", (long long)active,
           active >= 1e9 ? active / 1e9 : active / 1e6, active >= 1e9 ? "B" : "M");
    printf("tensors           %d\n", n);
    /* columns as wide as their longest entry ("..._scale" names are long) */
    int wname = 0, wtype = 0, wshape = 0;
    for (int i = 0; i < n; i++) {
        jm_error name;
        int ln = (int)strlen(cli_shown(&name, t[i].name)), lt = (int)strlen(t[i].dtype);
        int ls = shape_text(shape, sizeof shape, t[i].ndim, t[i].shape);
        wname = ln > wname ? ln : wname;
        wtype = lt > wtype ? lt : wtype;
        wshape = ls > wshape ? ls : wshape;
    }
    for (int i = 0; i < n; i++) { /* names come from the file: shown as messages show them */
        jm_error name, file;
        shape_text(shape, sizeof shape, t[i].ndim, t[i].shape);
        printf("  %-*s  %-*s  %-*s  %s\n", wname, cli_shown(&name, t[i].name), wtype, t[i].dtype, wshape, shape,
               cli_shown(&file, t[i].file));
    }
    free(t);
    return 0;
}

/* ---- forward ---- */

typedef struct {
    const char *tokens, *dump;
    int backward, overwrite;
    int64_t threads;
} forward_opts;

static const cli_flag forward_flags[] = {
    {"--tokens", {NULL}, FLAG_STR, offsetof(forward_opts, tokens), .required = 1, .meta = "IDS",
     .help = "the sequence: comma-separated token ids"},
    {"--dump", {NULL}, FLAG_STR, offsetof(forward_opts, dump), .meta = "OUT.safetensors",
     .help = "write logits, losses and routing (and gradients) there"},
    {"--backward", {NULL}, FLAG_BOOL, offsetof(forward_opts, backward),
     .help = "also run the backward pass (its gradients go to --dump)"},
    {"--overwrite", {NULL}, FLAG_BOOL, offsetof(forward_opts, overwrite),
     .help = "replace an existing --dump file (never one of the model's own)"},
    {"--threads", {NULL}, FLAG_INT, offsetof(forward_opts, threads), "0", 0, 4096, .meta = "N",
     .help = "threads, 0 = all cores"},
};

static int run_forward(const cli_command *self, int argc, char **argv);

const cli_command cmd_forward = {
    "forward", "DIR", "fp32 forward (and backward); losses; dump logits, routing, gradients",
    "Runs the model (fp32) on one sequence of token ids and prints the losses. With --dump,\n"
    "writes F32 'logits' (T, vocab), 'loss', 'aux_loss', 'z_loss' (shape [1]) and I32\n"
    "'routing.layers.{i}.moa|moe' (T, k: the experts each router chose) to OUT, atomically.\n"
    "With --backward, also 'grad.<HF tensor name>' for every parameter: the gradient of\n"
    "loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss. An existing OUT is replaced only\n"
    "with --overwrite, a file of the model never; a FIFO or /dev/null is written through, a\n"
    "symlink followed to its file.",
    forward_flags, (int)(sizeof forward_flags / sizeof forward_flags[0]), run_forward};

static int run_forward(const cli_command *self, int argc, char **argv)
{
    forward_opts o = {0};
    const char *path;
    char dir[4096];
    int rc = cli_parse(self, argc, argv, &o, &path);
    if (rc != CLI_RUN) return rc;
    if ((rc = cli_model_dir(self, path, dir, sizeof dir)) != CLI_RUN) return rc;
    int32_t *ids;
    int T;
    if (cli_parse_ids(o.tokens, &ids, &T) != 0)
        return cli_error(self, "--tokens wants comma-separated integers, got '%s'", o.tokens);
    jm_set_threads((int)o.threads);

    jm_error err;
    jm_model *m;
    float *logits = NULL;
    char dump[4096]; /* where --dump goes: checked before any work (README: What writes where) */
    const char *model_dir = dir;
    jm_status s = o.dump ? jm_output_file(o.dump, &model_dir, 1, o.overwrite, dump, sizeof dump, &err) : JM_OK;
    if (!s) s = jm_model_load(dir, &m, &err);
    if (s) {
        free(ids);
        return cli_fail(self, s, &err);
    }
    jm_losses L;
    if ((s = jm_forward(m, ids, 1, T, &L, &err))) goto out;
    const jm_config *c = jm_model_config(m);
    printf("tokens %d  loss %.6f  aux_loss %.6f  z_loss %.6f\n", T, L.loss, L.aux_loss, L.z_loss);
    if (o.dump && o.backward) { /* the backward pass consumes the forward's logits: keep a copy */
        size_t bytes = (size_t)T * c->vocab_size * sizeof(float);
        if (!(logits = malloc(bytes))) {
            s = JM_ERR_NOMEM;
            snprintf(err.msg, sizeof err.msg, "out of memory");
            goto out;
        }
        memcpy(logits, jm_logits(m), bytes);
    }
    if (o.backward && ((s = jm_zero_grad(m, &err)) || (s = jm_backward(m, &err)))) goto out;
    if (o.dump) {
        int nl = c->num_layers, np = o.backward ? jm_model_num_params(m) : 0, nt = 4 + 2 * nl + np;
        jm_tensor_out *t = calloc((size_t)nt, sizeof *t);
        char (*names)[112] = calloc((size_t)nl * 2 + (size_t)np, sizeof *names);
        float scal[3] = {(float)L.loss, (float)L.aux_loss, (float)L.z_loss};
        if (!t || !names) {
            free(t);
            free(names);
            s = JM_ERR_NOMEM;
            snprintf(err.msg, sizeof err.msg, "out of memory");
            goto out;
        }
        t[0] = (jm_tensor_out){"logits", "F32", 2, {T, c->vocab_size}, logits ? logits : jm_logits(m)};
        t[1] = (jm_tensor_out){"loss", "F32", 1, {1}, &scal[0]};
        t[2] = (jm_tensor_out){"aux_loss", "F32", 1, {1}, &scal[1]};
        t[3] = (jm_tensor_out){"z_loss", "F32", 1, {1}, &scal[2]};
        for (int l = 0; l < nl; l++)
            for (int b = 0; b < 2; b++) {
                snprintf(names[2 * l + b], sizeof names[0], "routing.layers.%d.%s", l, b ? "moe" : "moa");
                t[4 + 2 * l + b] = (jm_tensor_out){names[2 * l + b], "I32", 2, {T, c->top_k}, jm_routing(m, l, b)};
            }
        for (int i = 0; i < np; i++) {
            const jm_param *p = jm_model_param(m, i);
            char *name = names[2 * nl + i];
            snprintf(name, sizeof names[0], "grad.%s", p->name);
            t[4 + 2 * nl + i] = (jm_tensor_out){name, "F32", p->ndim, {p->shape[0], p->shape[1], p->shape[2]}, p->grad};
        }
        s = jm_save_tensors(dump, t, nt, &err);
        free(t);
        free(names);
    }
out:
    free(logits);
    jm_model_free(m);
    free(ids);
    return s ? cli_fail(self, s, &err) : 0;
}

/* ---- init ---- */

typedef struct {
    const char *config;
    int64_t seed;
    int overwrite;
} init_opts;

static const cli_flag init_flags[] = {
    {"--config", {NULL}, FLAG_STR, offsetof(init_opts, config), .required = 1, .meta = "config.json",
     .help = "the model's HF config"},
    {"--seed", {NULL}, FLAG_INT, offsetof(init_opts, seed), "1", 0, 2147483647, .meta = "N",
     .help = "seed of the initial weights"},
    {"--overwrite", {NULL}, FLAG_BOOL, offsetof(init_opts, overwrite),
     .help = "replace a checkpoint already in OUT_DIR (only one jetmoe wrote)"},
};

static int run_init(const cli_command *self, int argc, char **argv);

const cli_command cmd_init = {
    "init", "OUT_DIR", "a freshly initialised model as an HF checkpoint",
    "Creates a JetMoE initialised as the spec says (weights N(0, initializer_range), norms 1,\n"
    "biases 0) and writes it as an HF checkpoint (config.json + model.safetensors, F32).\n"
    "Fields config.json leaves out take JetMoE-8B's values. OUT_DIR is new or empty, or, with\n"
    "--overwrite, a checkpoint jetmoe wrote, replaced whole in one rename.",
    init_flags, (int)(sizeof init_flags / sizeof init_flags[0]), run_init};

static int run_init(const cli_command *self, int argc, char **argv)
{
    init_opts o = {0};
    const char *out;
    int rc = cli_parse(self, argc, argv, &o, &out);
    if (rc != CLI_RUN) return rc;
    jm_error err;
    jm_config c;
    jm_model *m = NULL;
    jm_output_dir *od = NULL;
    jm_status s = jm_config_load(o.config, &c, &err);
    if (!s) s = jm_output_dir_open(out, &o.config, 1, o.overwrite, &od, &err);
    if (!s) s = jm_model_create(&c, (uint64_t)o.seed, &m, &err);
    if (!s) s = jm_model_save(m, jm_output_dir_stage(od), &err);
    if (!s) s = jm_output_dir_commit(od, &err);
    else jm_output_dir_abort(od);
    jm_model_free(m);
    if (s) return cli_fail(self, s, &err);
    printf("wrote %s: %lld parameters\n", out, (long long)jm_config_num_params(&c));
    return 0;
}

/* ---- quantize ---- */

typedef struct {
    const char *to, *out;
    int64_t threads;
    int overwrite;
} quantize_opts;

static const cli_flag quantize_flags[] = {
    {"--to", {NULL}, FLAG_STR, offsetof(quantize_opts, to), .required = 1, .meta = "q8|q4",
     .help = "the format: int8 or int4 blocks of 32 with an F16 scale"},
    {"--out", {NULL}, FLAG_STR, offsetof(quantize_opts, out), .required = 1, .meta = "OUT_DIR",
     .help = "where the quantized checkpoint goes"},
    {"--threads", {NULL}, FLAG_INT, offsetof(quantize_opts, threads), "0", 0, 4096, .meta = "N",
     .help = "threads, 0 = all cores"},
    {"--overwrite", {NULL}, FLAG_BOOL, offsetof(quantize_opts, overwrite),
     .help = "replace a checkpoint already in OUT_DIR (only one jetmoe wrote)"},
};

static int run_quantize(const cli_command *self, int argc, char **argv);

const cli_command cmd_quantize = {
    "quantize", "DIR", "blockwise int8 / int4 copy of a checkpoint",
    "Writes a copy of the checkpoint with every weight matrix as blocks of 32 int8 (q8) or int4 (q4)\n"
    "values with an F16 scale each (routers, norms and biases as stored); every command loads it.\n"
    "Reads the input in place, so a BF16 8B checkpoint needs no fp32 copy. OUT_DIR is new or empty,\n"
    "or, with --overwrite, a checkpoint jetmoe wrote (never one holding the input), replaced whole.",
    quantize_flags, (int)(sizeof quantize_flags / sizeof quantize_flags[0]), run_quantize};

static int run_quantize(const cli_command *self, int argc, char **argv)
{
    quantize_opts o = {0};
    const char *path;
    char dir[4096];
    int rc = cli_parse(self, argc, argv, &o, &path);
    if (rc != CLI_RUN) return rc;
    if ((rc = cli_model_dir(self, path, dir, sizeof dir)) != CLI_RUN) return rc;
    int bits = strcmp(o.to, "q8") == 0 ? 8 : strcmp(o.to, "q4") == 0 ? 4 : 0;
    if (!bits) return cli_error(self, "--to wants q8 or q4, got '%s'", o.to);
    jm_set_threads((int)o.threads);
    jm_error err;
    jm_status s = jm_quantize(dir, o.out, bits, o.overwrite, &err);
    if (s) return cli_fail(self, s, &err);
    fprintf(stderr, "jetmoe quantize: wrote %s (%s)\n", o.out, o.to);
    return 0;
}
