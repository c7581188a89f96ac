/* jetmoe — the command-line tool: thin subcommands over libjetmoe.
 * Every error is one line on stderr and a non-zero exit. */
#include "jetmoe.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *name, *usage, *help;
    int (*run)(int argc, char **argv);
} command;

static int die(const char *cmd, const char *fmt, const char *arg)
{
    fprintf(stderr, "jetmoe %s: ", cmd);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    return 2;
}

static int fail(const char *cmd, jm_status s, const jm_error *err)
{
    fprintf(stderr, "jetmoe %s: %s: %s\n", cmd, jm_status_name(s), err->msg);
    return 1;
}

/* Parses a whole decimal integer in [lo, hi]; anything else is an error. */
static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

/* Command-line flags: every flag takes one value; anything else not starting
 * with '-' is the one positional argument. Returns 0, or the exit code after
 * printing the error. */
typedef struct {
    const char *flag;
    const char **value;
} flag_spec;

static int parse_args(const char *cmd, int argc, char **argv, const flag_spec *flags, int nflags,
                      const char **positional)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] != '-') {
            if (*positional) return die(cmd, "unexpected argument %s", a);
            *positional = a;
            continue;
        }
        int f = 0;
        while (f < nflags && strcmp(a, flags[f].flag) != 0) f++;
        if (f == nflags) {
            fprintf(stderr, "jetmoe %s: unknown flag %s (see 'jetmoe help %s')\n", cmd, a, cmd);
            return 2;
        }
        if (i + 1 >= argc) return die(cmd, "%s needs a value", a);
        *flags[f].value = argv[++i];
    }
    return 0;
}

static void print_shape(FILE *f, int ndim, const int64_t *shape)
{
    fputc('[', f);
    for (int d = 0; d < ndim; d++) fprintf(f, d ? ", %lld" : "%lld", (long long)shape[d]);
    fputc(']', f);
}

/* ---- info ---- */

static int cmd_info(int argc, char **argv)
{
    const char *dir = NULL;
    int rc = parse_args("info", argc, argv, NULL, 0, &dir);
    if (rc) return rc;
    if (!dir) return die("info", "%s", "usage: jetmoe info DIR");
    jm_config c;
    jm_tensor_info *t;
    int n;
    jm_error err;
    jm_status s = jm_checkpoint_inspect(dir, &c, &t, &n, &err);
    if (s) return fail("info", s, &err);
    int64_t total = jm_config_num_params(&c), active = jm_config_active_params(&c);
    printf("checkpoint        %s\n", dir);
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
    for (int i = 0; i < n; i++) {
        printf("  %-60s %-5s ", t[i].name, t[i].dtype);
        print_shape(stdout, t[i].ndim, t[i].shape);
        printf("  %s\n", t[i].file);
    }
    free(t);
    return 0;
}

/* ---- forward ---- */

static int parse_tokens(const char *list, int32_t **out, int *n)
{
    int cap = 1;
    for (const char *p = list; *p; p++) cap += *p == ',';
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    char *copy = strdup(list);
    if (!ids || !copy) {
        free(ids);
        free(copy);
        return -1;
    }
    int k = 0;
    char *tok = copy;
    /* strtok_r would skip empty fields ("1,,2"); split by hand so they are errors */
    for (;;) {
        char *comma = strchr(tok, ',');
        if (comma) *comma = 0;
        long v;
        if (parse_int(tok, INT32_MIN, INT32_MAX, &v) != 0) {
            free(ids);
            free(copy);
            return -1;
        }
        ids[k++] = (int32_t)v;
        if (!comma) break;
        tok = comma + 1;
    }
    free(copy);
    *out = ids;
    *n = k;
    return 0;
}

static int cmd_forward(int argc, char **argv)
{
    const char *dir = NULL, *tokens = NULL, *dump = NULL, *threads_arg = "0";
    const flag_spec flags[] = {{"--tokens", &tokens}, {"--dump", &dump}, {"--threads", &threads_arg}};
    int rc = parse_args("forward", argc, argv, flags, 3, &dir);
    if (rc) return rc;
    long threads;
    if (parse_int(threads_arg, 0, 4096, &threads) != 0)
        return die("forward", "--threads wants an integer in [0, 4096], got '%s'", threads_arg);
    if (!dir || !tokens) return die("forward", "%s", "usage: jetmoe forward DIR --tokens 1,5,9 [--dump OUT.safetensors]");
    int32_t *ids;
    int T;
    if (parse_tokens(tokens, &ids, &T) != 0)
        return die("forward", "--tokens wants comma-separated integers, got '%s'", tokens);
    jm_set_threads((int)threads);

    jm_error err;
    jm_model *m;
    jm_status s = jm_model_load(dir, &m, &err);
    if (s) {
        free(ids);
        return fail("forward", s, &err);
    }
    jm_losses L;
    if ((s = jm_forward(m, ids, 1, T, &L, &err))) goto out;
    const jm_config *c = jm_model_config(m);
    printf("tokens %d  loss %.6f  aux_loss %.6f  z_loss %.6f\n", T, L.loss, L.aux_loss, L.z_loss);
    if (dump) {
        int nl = c->num_layers, nt = 4 + 2 * nl;
        jm_tensor_out *t = calloc((size_t)nt, sizeof *t);
        char (*names)[64] = calloc((size_t)nl * 2, sizeof *names);
        float scal[3] = {(float)L.loss, (float)L.aux_loss, (float)L.z_loss};
        if (!t || !names) {
            free(t);
            free(names);
            s = JM_ERR_NOMEM;
            snprintf(err.msg, sizeof err.msg, "out of memory");
            goto out;
        }
        t[0] = (jm_tensor_out){"logits", "F32", 2, {T, c->vocab_size}, jm_logits(m)};
        t[1] = (jm_tensor_out){"loss", "F32", 1, {1}, &scal[0]};
        t[2] = (jm_tensor_out){"aux_loss", "F32", 1, {1}, &scal[1]};
        t[3] = (jm_tensor_out){"z_loss", "F32", 1, {1}, &scal[2]};
        for (int l = 0; l < nl; l++)
            for (int b = 0; b < 2; b++) {
                snprintf(names[2 * l + b], 64, "routing.layers.%d.%s", l, b ? "moe" : "moa");
                t[4 + 2 * l + b] = (jm_tensor_out){names[2 * l + b], "I32", 2, {T, c->top_k}, jm_routing(m, l, b)};
            }
        s = jm_save_tensors(dump, t, nt, &err);
        free(t);
        free(names);
    }
out:
    jm_model_free(m);
    free(ids);
    return s ? fail("forward", s, &err) : 0;
}

/* ---- init ---- */

static int cmd_init(int argc, char **argv)
{
    const char *out = NULL, *config = NULL, *seed_arg = "1";
    const flag_spec flags[] = {{"--config", &config}, {"--seed", &seed_arg}};
    int rc = parse_args("init", argc, argv, flags, 2, &out);
    if (rc) return rc;
    long seed;
    if (parse_int(seed_arg, 0, 2147483647L, &seed) != 0)
        return die("init", "--seed wants a non-negative integer, got '%s'", seed_arg);
    if (!out || !config) return die("init", "%s", "usage: jetmoe init OUT_DIR --config config.json [--seed N]");
    jm_error err;
    jm_config c;
    jm_model *m;
    jm_status s = jm_config_load(config, &c, &err);
    if (!s) s = jm_model_create(&c, (uint64_t)seed, &m, &err);
    if (s) return fail("init", s, &err);
    s = jm_model_save(m, out, &err);
    jm_model_free(m);
    if (s) return fail("init", s, &err);
    printf("wrote %s: %lld parameters\n", out, (long long)jm_config_num_params(&c));
    return 0;
}

/* ---- dispatch ---- */

static int cmd_help(int argc, char **argv);

static const command commands[] = {
    {"info", "jetmoe info DIR",
     "Validates a Hugging Face JetMoE checkpoint (config.json + safetensors, single or sharded)\n"
     "without loading it, and prints the config, total and active-per-token parameter counts\n"
     "and the tensor table.",
     cmd_info},
    {"forward", "jetmoe forward DIR --tokens 1,5,9,... [--dump OUT.safetensors] [--threads N]",
     "Runs the model (fp32) on one sequence of token ids and prints the losses. With --dump,\n"
     "writes F32 'logits' (T, vocab), 'loss', 'aux_loss', 'z_loss' (shape [1]) and I32\n"
     "'routing.layers.{i}.moa|moe' (T, k: the experts each router chose) to OUT, atomically.",
     cmd_forward},
    {"init", "jetmoe init OUT_DIR --config config.json [--seed N]",
     "Creates a JetMoE initialised as the spec says (weights N(0, initializer_range), norms 1,\n"
     "biases 0) and writes it as an HF checkpoint (config.json + model.safetensors, F32).\n"
     "Fields config.json leaves out take JetMoE-8B's values.",
     cmd_init},
    {"help", "jetmoe help [COMMAND]", "Shows the commands, or one command's usage.", cmd_help},
};
#define NCOMMANDS (int)(sizeof commands / sizeof commands[0])

static int cmd_help(int argc, char **argv)
{
    if (argc > 1) {
        for (int i = 0; i < NCOMMANDS; i++)
            if (strcmp(argv[1], commands[i].name) == 0) {
                printf("usage: %s\n\n%s\n", commands[i].usage, commands[i].help);
                return 0;
            }
        return die("help", "unknown command %s", argv[1]);
    }
    printf("jetmoe — JetMoE mixture-of-experts language models in C\n\nusage: jetmoe COMMAND [ARGS]\n\n");
    for (int i = 0; i < NCOMMANDS; i++) printf("  %s\n", commands[i].usage);
    printf("\n'jetmoe help COMMAND' explains one.\n");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        cmd_help(1, argv);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) return cmd_help(1, argv);
    for (int i = 0; i < NCOMMANDS; i++)
        if (strcmp(argv[1], commands[i].name) == 0) return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "jetmoe: unknown command '%s' (see 'jetmoe help')\n", argv[1]);
    return 2;
}
