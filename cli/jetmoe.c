/* jetmoe — the command-line tool: thin subcommands over libjetmoe.
 * Every error is one line on stderr and a non-zero exit. */
#include "jetmoe.h"

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <sys/types.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>

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

/* Command-line flags: a flag with a value pointer takes one value, one with
 * only a switch pointer takes none, one with both takes a value each time it
 * is given (up to MAX_REPEAT); anything else not starting with '-' is
 * the one positional argument. Returns 0, or the exit code after printing
 * the error. */
typedef struct {
    const char *flag;
    const char **value;
    int *on; /* with value too: the flag may repeat, value is an array of MAX_REPEAT, *on its fill */
} flag_spec;
#define MAX_REPEAT 16

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
        if (!flags[f].value) {
            *flags[f].on = 1;
            continue;
        }
        if (i + 1 >= argc) return die(cmd, "%s needs a value", a);
        if (flags[f].on) {
            if (*flags[f].on == MAX_REPEAT) return die(cmd, "%s given too many times", a);
            flags[f].value[(*flags[f].on)++] = argv[++i];
            continue;
        }
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
    int backward = 0;
    const flag_spec flags[] = {{"--tokens", &tokens, NULL},
                               {"--dump", &dump, NULL},
                               {"--threads", &threads_arg, NULL},
                               {"--backward", NULL, &backward}};
    int rc = parse_args("forward", argc, argv, flags, 4, &dir);
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
    float *logits = NULL;
    jm_status s = jm_model_load(dir, &m, &err);
    if (s) {
        free(ids);
        return fail("forward", s, &err);
    }
    jm_losses L;
    if ((s = jm_forward(m, ids, 1, T, &L, &err))) goto out;
    const jm_config *c = jm_model_config(m);
    printf("tokens %d  loss %.6f  aux_loss %.6f  z_loss %.6f\n", T, L.loss, L.aux_loss, L.z_loss);
    if (dump && backward) { /* the backward pass consumes the forward's logits: keep a copy */
        size_t bytes = (size_t)T * c->vocab_size * sizeof(float);
        if (!(logits = malloc(bytes))) {
            s = JM_ERR_NOMEM;
            snprintf(err.msg, sizeof err.msg, "out of memory");
            goto out;
        }
        memcpy(logits, jm_logits(m), bytes);
    }
    if (backward && ((s = jm_zero_grad(m, &err)) || (s = jm_backward(m, &err)))) goto out;
    if (dump) {
        int nl = c->num_layers, np = backward ? jm_model_num_params(m) : 0, nt = 4 + 2 * nl + np;
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
    return s ? fail("forward", s, &err) : 0;
}

/* ---- init ---- */

static int cmd_init(int argc, char **argv)
{
    const char *out = NULL, *config = NULL, *seed_arg = "1";
    const flag_spec flags[] = {{"--config", &config, NULL}, {"--seed", &seed_arg, NULL}};
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

/* ---- tokenizer ---- */

/* encode/decode read stdin line by line, like spm_encode/spm_decode: one
 * output line per input line, the '\n' itself not part of the input. */
static int tokenizer_encode(const jm_tokenizer *t)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    jm_error err;
    int rc = 0;
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        if (len > 0 && line[len - 1] == '\n') len--;
        int32_t *ids;
        size_t n;
        jm_status s = jm_tokenizer_encode(t, line, (size_t)len, &ids, &n, &err);
        if (s) {
            rc = fail("tokenizer encode", s, &err);
            break;
        }
        for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        putchar('\n');
        free(ids);
    }
    free(line);
    return rc;
}

static int tokenizer_decode(const jm_tokenizer *t)
{
    char *line = NULL;
    size_t cap = 0, lineno = 0, idcap = 0;
    int32_t *ids = NULL;
    ssize_t len;
    jm_error err;
    int rc = 0;
    while (rc == 0 && (len = getline(&line, &cap, stdin)) >= 0) {
        lineno++;
        size_t n = 0;
        char *p = line;
        for (;;) {
            while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
            if (!*p) break;
            char *end;
            errno = 0;
            long v = strtol(p, &end, 10);
            if (end == p || errno || v < INT32_MIN || v > INT32_MAX || (*end && *end != ' ' && *end != '\t' &&
                                                                    *end != '\n' && *end != '\r')) {
                fprintf(stderr, "jetmoe tokenizer decode: line %zu: not a token id: '%.20s'\n", lineno, p);
                rc = 2;
                break;
            }
            if (n == idcap) {
                idcap = idcap ? 2 * idcap : 256;
                int32_t *grown = realloc(ids, idcap * sizeof *ids);
                if (!grown) {
                    fprintf(stderr, "jetmoe tokenizer decode: out of memory\n");
                    rc = 1;
                    break;
                }
                ids = grown;
            }
            ids[n++] = (int32_t)v;
            p = end;
        }
        if (rc) break;
        char *text;
        size_t tlen;
        jm_status s = jm_tokenizer_decode(t, ids, n, &text, &tlen, &err);
        if (s) {
            fprintf(stderr, "jetmoe tokenizer decode: line %zu: %s\n", lineno, err.msg);
            rc = 1;
            break;
        }
        fwrite(text, 1, tlen, stdout);
        putchar('\n');
        free(text);
    }
    free(ids);
    free(line);
    return rc;
}

/* Splits "a,b,c" in place into at most max pointers. */
static int split_list(char *s, const char **out, int max)
{
    int n = 0;
    for (char *p = s; n < max;) {
        out[n++] = p;
        p = strchr(p, ',');
        if (!p) break;
        *p++ = 0;
    }
    return n;
}

static int cmd_tokenizer(int argc, char **argv)
{
    const char *sub = argc > 1 ? argv[1] : NULL;
    if (!sub || sub[0] == '-')
        return die("tokenizer", "%s", "usage: jetmoe tokenizer encode|decode --model FILE, or train (see 'jetmoe help tokenizer')");
    if (strcmp(sub, "encode") == 0 || strcmp(sub, "decode") == 0) {
        const char *model = NULL, *extra = NULL;
        const flag_spec flags[] = {{"--model", &model, NULL}};
        int rc = parse_args("tokenizer", argc - 1, argv + 1, flags, 1, &extra);
        if (rc) return rc;
        if (extra) return die("tokenizer", "unexpected argument %s", extra);
        if (!model) return die("tokenizer", "%s", "--model FILE is required (tokenizer.model or tokenizer.json)");
        jm_tokenizer *t;
        jm_error err;
        jm_status s = jm_tokenizer_load(model, &t, &err);
        if (s) return fail("tokenizer", s, &err);
        static char outbuf[1 << 16];
        setvbuf(stdout, outbuf, _IOFBF, sizeof outbuf);
        rc = sub[0] == 'e' ? tokenizer_encode(t) : tokenizer_decode(t);
        jm_tokenizer_free(t);
        if (fflush(stdout) != 0) return die("tokenizer", "%s", "write to stdout failed");
        return rc;
    }
    if (strcmp(sub, "train") == 0) {
        const char *input = NULL, *vocab = NULL, *out = NULL, *bf = "1", *threads = "0", *maxs = "0", *extra = NULL;
        const flag_spec flags[] = {{"--input", &input, NULL},       {"--vocab-size", &vocab, NULL},
                                   {"--out", &out, NULL},           {"--byte-fallback", &bf, NULL},
                                   {"--threads", &threads, NULL},   {"--max-sentences", &maxs, NULL}};
        int rc = parse_args("tokenizer", argc - 1, argv + 1, flags, 6, &extra);
        if (rc) return rc;
        if (extra) return die("tokenizer", "unexpected argument %s", extra);
        if (!input || !vocab || !out)
            return die("tokenizer", "%s", "usage: jetmoe tokenizer train --input F1,F2 --vocab-size N --out DIR");
        long v, b, th, ms;
        if (parse_int(vocab, 1, 1L << 24, &v)) return die("tokenizer", "--vocab-size wants a positive integer, got '%s'", vocab);
        if (parse_int(bf, 0, 1, &b)) return die("tokenizer", "--byte-fallback wants 0 or 1, got '%s'", bf);
        if (parse_int(threads, 0, 4096, &th)) return die("tokenizer", "--threads wants an integer, got '%s'", threads);
        if (parse_int(maxs, 0, 2000000000L, &ms)) return die("tokenizer", "--max-sentences wants an integer, got '%s'", maxs);
        char *list = strdup(input);
        const char *files[256];
        int nf = list ? split_list(list, files, 256) : 0;
        jm_tokenizer_train_opts o = {files, nf, (int)v, out, (int)b, (int)th, ms};
        jm_error err;
        jm_status s = jm_tokenizer_train(&o, &err);
        free(list);
        if (s) return fail("tokenizer train", s, &err);
        printf("wrote %s/tokenizer.model, tokenizer.json, tokenizer_config.json (vocab %ld)\n", out, v);
        return 0;
    }
    return die("tokenizer", "unknown subcommand %s (encode, decode or train)", sub);
}

/* ---- pretrain ---- */

/* Set by SIGINT/SIGTERM; the trainer polls it between steps, saves and returns.
 * (The one piece of process state a signal handler needs.) */
static volatile int stop_requested;
static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static int cmd_pretrain(int argc, char **argv)
{
    const char *recipe = NULL, *out = NULL, *threads = "0", *stop_after = "0", *extra = NULL;
    int resume = 0, quiet = 0;
    const flag_spec flags[] = {{"--recipe", &recipe, NULL},         {"--out", &out, NULL},
                               {"--threads", &threads, NULL},       {"--stop-after", &stop_after, NULL},
                               {"--resume", NULL, &resume},         {"--quiet", NULL, &quiet}};
    int rc = parse_args("pretrain", argc, argv, flags, 6, &extra);
    if (rc) return rc;
    if (extra) return die("pretrain", "unexpected argument %s", extra);
    if (!recipe || !out) return die("pretrain", "%s", "usage: jetmoe pretrain --recipe R --out RUN_DIR [--resume]");
    long th, sa;
    if (parse_int(threads, 0, 4096, &th)) return die("pretrain", "--threads wants an integer, got '%s'", threads);
    if (parse_int(stop_after, 0, 2000000000L, &sa)) return die("pretrain", "--stop-after wants an integer, got '%s'", stop_after);
    jm_set_threads((int)th);
    struct sigaction sa_int = {0};
    sa_int.sa_handler = on_signal;
    sigaction(SIGINT, &sa_int, NULL);
    sigaction(SIGTERM, &sa_int, NULL);
    jm_train_opts o = {recipe, out, resume, sa, &stop_requested, quiet};
    int stopped;
    jm_error err;
    jm_status s = jm_pretrain(&o, &stopped, &err);
    if (s) return fail("pretrain", s, &err);
    return stopped && stop_requested ? 130 : 0;
}

/* ---- prepare ---- */

static int cmd_prepare(int argc, char **argv)
{
    const char *tok = NULL, *input = NULL, *out = NULL, *threads = "0", *shard = "0", *extra = NULL;
    const flag_spec flags[] = {{"--tokenizer", &tok, NULL},  {"--input", &input, NULL}, {"--out", &out, NULL},
                               {"--threads", &threads, NULL}, {"--shard-tokens", &shard, NULL}};
    int rc = parse_args("prepare", argc, argv, flags, 5, &extra);
    if (rc) return rc;
    if (extra) return die("prepare", "unexpected argument %s", extra);
    if (!tok || !input || !out)
        return die("prepare", "%s", "usage: jetmoe prepare --tokenizer T --input F1,DIR2,... --out SHARD_DIR");
    long th, st;
    if (parse_int(threads, 0, 4096, &th)) return die("prepare", "--threads wants an integer, got '%s'", threads);
    if (parse_int(shard, 0, 2000000000L, &st)) return die("prepare", "--shard-tokens wants an integer, got '%s'", shard);
    char *list = strdup(input);
    const char *files[4096];
    int nf = list ? split_list(list, files, 4096) : 0;
    jm_set_threads((int)th);
    jm_prepare_opts o = {tok, files, nf, out, (uint64_t)st, (int)th};
    uint64_t n = 0;
    jm_error err;
    jm_status s = jm_prepare(&o, &n, &err);
    free(list);
    if (s) return fail("prepare", s, &err);
    printf("wrote %llu tokens to %s\n", (unsigned long long)n, out);
    return 0;
}

/* ---- generate ---- */

/* What generate's and chat's token callback writes to: the text stream, or
 * the ids alone (still watched for the stop string). */
typedef struct {
    jm_text_stream *text;
    int ids_only, n;
    int stopped;
} stream_ctx;

static int stream_token(void *p, int32_t id)
{
    stream_ctx *c = p;
    const char *bytes = "";
    size_t len = 0;
    jm_error err;
    int r = c->text ? jm_text_stream_push(c->text, id, &bytes, &len, &err) : 0;
    if (r < 0) r = 0; /* a piece that cannot be decoded prints nothing; generation goes on */
    if (r == 1) c->stopped = 1;
    if (c->ids_only) {
        if (!c->stopped) printf(c->n++ ? " %d" : "%d", id);
    } else {
        fwrite(bytes, 1, len, stdout);
    }
    fflush(stdout);
    return c->stopped;
}

static void stream_flush(stream_ctx *c)
{
    const char *bytes;
    size_t len;
    if (!c->text || c->ids_only || c->stopped) return;
    jm_text_stream_flush(c->text, &bytes, &len);
    fwrite(bytes, 1, len, stdout);
}

static int parse_real(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) return -1;
    *out = v;
    return 0;
}

/* jm_model_open (weights in place from the mapping) with the chosen kernels. */
static jm_status open_model(const char *dir, const char *kernels, jm_model **m, jm_error *err)
{
    jm_status s = jm_model_open(dir, m, err);
    if (!s && (s = jm_set_kernels(*m, kernels, err))) {
        jm_model_free(*m);
        *m = NULL;
    }
    return s;
}

static int cmd_generate(int argc, char **argv)
{
    const char *dir = NULL, *prompt = NULL, *tokens = NULL, *tokpath = NULL, *max_new = "64", *temp = "0.8",
               *topk = "0", *topp = "0.95", *seed = "1", *threads = "0", *stop[MAX_REPEAT], *kernels = "auto";
    int greedy = 0, ids_only = 0, nstop = 0;
    const flag_spec flags[] = {{"--prompt", &prompt, NULL},    {"--tokens", &tokens, NULL},
                               {"--tokenizer", &tokpath, NULL}, {"--max-new", &max_new, NULL},
                               {"--temperature", &temp, NULL},  {"--top-k", &topk, NULL},
                               {"--top-p", &topp, NULL},        {"--seed", &seed, NULL},
                               {"--threads", &threads, NULL},   {"--greedy", NULL, &greedy},
                               {"--ids", NULL, &ids_only},      {"--stop", stop, &nstop},
                               {"--kernels", &kernels, NULL}};
    int rc = parse_args("generate", argc, argv, flags, 13, &dir);
    if (rc) return rc;
    if (!dir || (!prompt == !tokens))
        return die("generate", "%s", "usage: jetmoe generate DIR --prompt TEXT | --tokens IDS [--max-new N]");
    long mn, tk, sd, th;
    double t, tp;
    if (parse_int(max_new, 1, 1 << 20, &mn)) return die("generate", "--max-new wants a positive integer, got '%s'", max_new);
    if (parse_int(topk, 0, 1 << 24, &tk)) return die("generate", "--top-k wants an integer >= 0, got '%s'", topk);
    if (parse_int(seed, 0, 2147483647L, &sd)) return die("generate", "--seed wants an integer >= 0, got '%s'", seed);
    if (parse_int(threads, 0, 4096, &th)) return die("generate", "--threads wants an integer, got '%s'", threads);
    if (parse_real(temp, 1e-6, 100, &t)) return die("generate", "--temperature wants a number in (0, 100], got '%s'", temp);
    if (parse_real(topp, 1e-9, 1, &tp)) return die("generate", "--top-p wants a number in (0, 1], got '%s'", topp);
    jm_set_threads((int)th);

    stream_ctx ctx = {NULL, ids_only, 0, 0}; /* before any goto out */
    jm_error err;
    jm_tokenizer *tok = NULL;
    jm_model *m = NULL;
    int32_t *ids = NULL, *out = NULL;
    int n = 0;
    jm_status s = JM_OK;
    for (int i = 0; i < nstop; i++)
        if (!*stop[i]) return die("generate", "%s", "--stop wants a non-empty string");
    if (prompt || !ids_only || nstop) {
        s = jm_tokenizer_load(tokpath ? tokpath : dir, &tok, &err);
        if (s) return fail("generate", s, &err);
    }
    if (prompt) {
        size_t k;
        int32_t *enc;
        /* special tokens in the prompt ("</s>" ending a chat turn) become their ids */
        if ((s = jm_tokenizer_encode_special(tok, prompt, strlen(prompt), &enc, &k, &err))) goto out;
        ids = malloc(sizeof(int32_t) * (k + 1));
        if (!ids) {
            free(enc);
            s = JM_ERR_NOMEM;
            snprintf(err.msg, sizeof err.msg, "out of memory");
            goto out;
        }
        int bos = jm_tokenizer_bos_id(tok);
        if (bos >= 0) ids[n++] = bos;
        if (k) memcpy(ids + n, enc, k * sizeof *enc); /* enc may be NULL when the text is empty */
        n += (int)k;
        free(enc);
    } else if (parse_tokens(tokens, &ids, &n) != 0) {
        jm_tokenizer_free(tok);
        return die("generate", "--tokens wants comma-separated integers, got '%s'", tokens);
    }
    if ((s = open_model(dir, kernels, &m, &err))) goto out;
    if (tok && jm_tokenizer_vocab_size(tok) != jm_model_config(m)->vocab_size) {
        s = JM_ERR_ARG;
        snprintf(err.msg, sizeof err.msg, "tokenizer has %d pieces but the model's vocab_size is %d",
                 jm_tokenizer_vocab_size(tok), jm_model_config(m)->vocab_size);
        goto out;
    }
    /* a prompt that leaves less room than --max-new generates to the end of the context */
    const int context = jm_model_config(m)->max_position_embeddings;
    if (n >= context) {
        s = JM_ERR_ARG;
        snprintf(err.msg, sizeof err.msg, "the prompt of %d tokens does not fit the context of %d (it must leave "
                 "room for at least one new token)", n, context);
        goto out;
    }
    if (n + mn > context) {
        fprintf(stderr, "jetmoe generate: note: %d prompt tokens leave room for %d new in the context of %d\n", n,
                context - n, context);
        mn = context - n;
    }
    out = malloc(sizeof(int32_t) * (size_t)mn);
    /* the stream decodes prompt + continuation together, so the first new
     * piece keeps its leading space; the prompt itself is printed first */
    if (tok && (ids_only ? nstop > 0 : 1)) {
        /* with --ids the stop strings are looked for in the continuation alone */
        if ((s = jm_text_stream_new(tok, ids, ids_only ? 0 : (size_t)n, stop, nstop, &ctx.text, &err))) goto out;
        if (!ids_only) {
            char *text;
            size_t len;
            if ((s = jm_tokenizer_decode(tok, ids, (size_t)n, &text, &len, &err))) goto out;
            fwrite(text, 1, len, stdout);
            free(text);
        }
    }
    jm_sample_opts so = {t, (int)tk, tp, (uint64_t)sd, (int)mn, greedy};
    int n_out = 0;
    if (!out) {
        s = JM_ERR_NOMEM;
        snprintf(err.msg, sizeof err.msg, "out of memory");
        goto out;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    s = jm_generate(m, ids, n, &so, out, &n_out, stream_token, &ctx, &err);
    if (!s) stream_flush(&ctx);
    putchar('\n');
    if (s) goto out;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    fprintf(stderr, "[%d prompt tokens, %d generated%s, %.2f s, %s weights, %s kernels]\n", n, n_out,
            ctx.stopped ? " (stop string)" : "", secs, jm_model_weight_type(m), jm_kernels(m));
out:
    jm_text_stream_free(ctx.text);
    free(out);
    free(ids);
    jm_model_free(m);
    jm_tokenizer_free(tok);
    return s ? fail("generate", s, &err) : 0;
}

/* ---- chat ---- */

/* An interactive conversation in the tokenizer's chat template. Each turn
 * re-renders the whole history, keeps the KV cache for the prefix it shares
 * with what is already cached, and prefills only the rest. */
static int cmd_chat(int argc, char **argv)
{
    const char *dir = NULL, *system = NULL, *max_new = "256", *temp = "0.7", *topp = "0.9", *seed = "1",
               *threads = "0", *kernels = "auto";
    int greedy = 0;
    const flag_spec flags[] = {{"--system", &system, NULL},     {"--max-new", &max_new, NULL},
                               {"--temperature", &temp, NULL},  {"--top-p", &topp, NULL},
                               {"--seed", &seed, NULL},         {"--threads", &threads, NULL},
                               {"--greedy", NULL, &greedy},     {"--kernels", &kernels, NULL}};
    int rc = parse_args("chat", argc, argv, flags, 8, &dir);
    if (rc) return rc;
    if (!dir) return die("chat", "%s", "usage: jetmoe chat DIR [--system TEXT] [--max-new N] [--temperature T]");
    long mn, sd, th;
    double t, tp;
    if (parse_int(max_new, 1, 1 << 20, &mn)) return die("chat", "--max-new wants a positive integer, got '%s'", max_new);
    if (parse_int(seed, 0, 2147483647L, &sd)) return die("chat", "--seed wants an integer >= 0, got '%s'", seed);
    if (parse_int(threads, 0, 4096, &th)) return die("chat", "--threads wants an integer, got '%s'", threads);
    if (parse_real(temp, 1e-6, 100, &t)) return die("chat", "--temperature wants a number in (0, 100], got '%s'", temp);
    if (parse_real(topp, 1e-9, 1, &tp)) return die("chat", "--top-p wants a number in (0, 1], got '%s'", topp);
    jm_set_threads((int)th);
    jm_error err;
    jm_tokenizer *tok = NULL;
    jm_model *m = NULL;
    jm_status s = jm_tokenizer_load(dir, &tok, &err);
    if (!s) s = open_model(dir, kernels, &m, &err);
    if (s) {
        jm_tokenizer_free(tok);
        return fail("chat", s, &err);
    }
    const int V = jm_model_config(m)->vocab_size, ctx = jm_model_config(m)->max_position_embeddings;
    const int eos = jm_tokenizer_eos_id(tok);
    jm_chat_message hist[512];
    char *owned[512];
    int nh = 0, ncached = 0;
    int32_t *cached = malloc(sizeof(int32_t) * (size_t)ctx), *reply = malloc(sizeof(int32_t) * (size_t)mn);
    float *probs = malloc(8 * (size_t)V); /* sampling scratch: V (float, int32) pairs */
    if (system) hist[nh] = (jm_chat_message){"system", system}, owned[nh++] = NULL;
    jm_sample_opts so = {t, 0, tp, (uint64_t)sd, (int)mn, greedy};
    uint64_t rng = (uint64_t)sd;
    int tty = isatty(0);
    char *line = NULL;
    size_t cap = 0;
    fprintf(stderr, "jetmoe chat: /reset clears the history, /exit quits (context %d tokens)\n", ctx);
    while (cached && reply && probs) {
        if (tty) fputs("> ", stderr);
        ssize_t len = getline(&line, &cap, stdin);
        if (len < 0) break;
        if (len && line[len - 1] == '\n') line[--len] = 0;
        if (strcmp(line, "/exit") == 0) break;
        if (strcmp(line, "/reset") == 0) {
            for (int i = 0; i < nh; i++) free(owned[i]);
            nh = system ? 1 : 0;
            fprintf(stderr, "(history cleared)\n");
            continue;
        }
        if (!len) continue;
        if (nh + 2 > 512) {
            fprintf(stderr, "(history full: /reset to start again)\n");
            continue;
        }
        owned[nh] = strdup(line);
        hist[nh] = (jm_chat_message){"user", owned[nh]};
        nh++;
        int32_t *ids;
        size_t n;
        if ((s = jm_chat_encode(tok, hist, nh, 1, &ids, &n, &err))) break;
        if ((long)n + 1 >= ctx) {
            fprintf(stderr, "(the conversation fills the context of %d tokens: /reset to start again)\n", ctx);
            free(ids);
            free(owned[--nh]);
            continue;
        }
        /* reuse the cached prefix; always recompute at least the last token */
        int same = 0;
        while (same < ncached && same < (int)n - 1 && cached[same] == ids[same]) same++;
        const float *logits;
        if ((s = jm_infer(m, ids + same, (int)n - same, same, &logits, &err))) {
            free(ids);
            break;
        }
        memcpy(cached, ids, n * sizeof *ids);
        ncached = (int)n;
        free(ids);
        int nr = 0, limit = (int)mn < ctx - ncached ? (int)mn : ctx - ncached;
        stream_ctx sc = {NULL, 0, 0, 0};
        if ((s = jm_text_stream_new(tok, NULL, 0, NULL, 0, &sc.text, &err))) break;
        while (nr < limit) {
            int32_t id = jm_sample(logits, V, &so, &rng, probs);
            if (id == eos) break;
            stream_token(&sc, id);
            reply[nr++] = id;
            cached[ncached++] = id;
            if (nr >= limit || (s = jm_infer(m, &id, 1, ncached - 1, &logits, &err))) break;
        }
        if (!s) stream_flush(&sc);
        jm_text_stream_free(sc.text);
        if (s) break;
        putchar('\n');
        fflush(stdout);
        if (nr >= limit) fprintf(stderr, "(reply cut at %d tokens)\n", nr);
        char *text;
        size_t tl;
        if ((s = jm_tokenizer_decode(tok, reply, (size_t)nr, &text, &tl, &err))) break;
        owned[nh] = text;
        hist[nh] = (jm_chat_message){"assistant", text};
        nh++;
    }
    for (int i = 0; i < nh; i++) free(owned[i]);
    free(line);
    free(cached);
    free(reply);
    free(probs);
    jm_model_free(m);
    jm_tokenizer_free(tok);
    return s ? fail("chat", s, &err) : 0;
}

/* ---- eval, quantize ---- */

static int cmd_eval(int argc, char **argv)
{
    const char *dir = NULL, *data = NULL, *seq = "256", *max_tokens = "0", *threads = "0", *kernels = "auto";
    int decode = 0;
    const flag_spec flags[] = {{"--data", &data, NULL},          {"--seq-len", &seq, NULL},
                               {"--max-tokens", &max_tokens, NULL}, {"--threads", &threads, NULL},
                               {"--kernels", &kernels, NULL},   {"--decode", NULL, &decode}};
    int rc = parse_args("eval", argc, argv, flags, 6, &dir);
    if (rc) return rc;
    if (!dir || !data) return die("eval", "%s", "usage: jetmoe eval DIR --data SHARD_DIR [--seq-len N] [--max-tokens N]");
    long T, mt, th;
    if (parse_int(seq, 2, 1 << 20, &T)) return die("eval", "--seq-len wants an integer >= 2, got '%s'", seq);
    if (parse_int(max_tokens, 0, 1L << 40, &mt)) return die("eval", "--max-tokens wants an integer >= 0, got '%s'", max_tokens);
    if (parse_int(threads, 0, 4096, &th)) return die("eval", "--threads wants an integer, got '%s'", threads);
    jm_set_threads((int)th);
    jm_error err;
    jm_model *m;
    jm_status s = open_model(dir, kernels, &m, &err);
    if (s) return fail("eval", s, &err);
    if (T > jm_model_config(m)->max_position_embeddings) {
        jm_model_free(m);
        return die("eval", "--seq-len is longer than the model's context (%s)", seq);
    }
    double loss;
    int64_t n;
    if (decode && (s = jm_set_context(m, (int)T, &err))) {
        jm_model_free(m);
        return fail("eval", s, &err);
    }
    s = jm_eval_shards(m, data, (int)T, mt, decode, &loss, &n, &err);
    if (!s && n == 0) {
        s = JM_ERR_ARG;
        snprintf(err.msg, sizeof err.msg, "%s: no window of %ld tokens to evaluate", data, T);
    }
    if (!s)
        printf("{\"loss\": %.6f, \"perplexity\": %.4f, \"tokens\": %lld, \"weights\": \"%s\", \"path\": \"%s\"}\n",
               loss, exp(loss), (long long)n, jm_model_weight_type(m), decode ? "decode" : "batched");
    jm_model_free(m);
    return s ? fail("eval", s, &err) : 0;
}

static int cmd_quantize(int argc, char **argv)
{
    const char *dir = NULL, *to = NULL, *out = NULL, *threads = "0";
    const flag_spec flags[] = {{"--to", &to, NULL}, {"--out", &out, NULL}, {"--threads", &threads, NULL}};
    int rc = parse_args("quantize", argc, argv, flags, 3, &dir);
    if (rc) return rc;
    if (!dir || !to || !out) return die("quantize", "%s", "usage: jetmoe quantize DIR --to q8|q4 --out OUT_DIR");
    int bits = strcmp(to, "q8") == 0 ? 8 : strcmp(to, "q4") == 0 ? 4 : 0;
    if (!bits) return die("quantize", "--to wants q8 or q4, got '%s'", to);
    long th;
    if (parse_int(threads, 0, 4096, &th)) return die("quantize", "--threads wants an integer, got '%s'", threads);
    jm_set_threads((int)th);
    jm_error err;
    jm_status s = jm_quantize(dir, out, bits, &err);
    if (s) return fail("quantize", s, &err);
    fprintf(stderr, "jetmoe quantize: wrote %s (%s)\n", out, to);
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
    {"forward", "jetmoe forward DIR --tokens 1,5,9,... [--dump OUT.safetensors] [--backward] [--threads N]",
     "Runs the model (fp32) on one sequence of token ids and prints the losses. With --dump,\n"
     "writes F32 'logits' (T, vocab), 'loss', 'aux_loss', 'z_loss' (shape [1]) and I32\n"
     "'routing.layers.{i}.moa|moe' (T, k: the experts each router chose) to OUT, atomically.\n"
     "With --backward, also 'grad.<HF tensor name>' for every parameter: the gradient of\n"
     "loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss.",
     cmd_forward},
    {"init", "jetmoe init OUT_DIR --config config.json [--seed N]",
     "Creates a JetMoE initialised as the spec says (weights N(0, initializer_range), norms 1,\n"
     "biases 0) and writes it as an HF checkpoint (config.json + model.safetensors, F32).\n"
     "Fields config.json leaves out take JetMoE-8B's values.",
     cmd_init},
    {"tokenizer",
     "jetmoe tokenizer encode|decode --model FILE   |   jetmoe tokenizer train --input F1,F2 --vocab-size N --out DIR",
     "encode: reads stdin; each line becomes one line of space-separated token ids, exactly as\n"
     "  spm_encode --output_format=id (the model's normalisation, no BOS/EOS).\n"
     "decode: reads lines of ids and prints the text, exactly as spm_decode --input_format=id.\n"
     "  --model takes tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face).\n"
     "train: runs Debian's spm_train with Llama-2 settings (BPE, byte fallback, split digits,\n"
     "  identity normalisation, unk=0 bos=1 eos=2) and writes DIR/tokenizer.model, tokenizer.json\n"
     "  and tokenizer_config.json (with the chat template).\n"
     "  Options: --byte-fallback 0|1 (default 1), --threads N, --max-sentences N.",
     cmd_tokenizer},
    {"prepare", "jetmoe prepare --tokenizer T --input FILES_OR_DIRS --out SHARD_DIR [--threads N]",
     "Tokenizes text (.txt and other text files), JSONL (.jsonl: a \"text\" field per line) and source\n"
     "code into token shards (see README: shard format); each document is followed by EOS.\n"
     "Directories are walked recursively in name order; the output is the same for any --threads.",
     cmd_prepare},
    {"pretrain", "jetmoe pretrain --recipe R --out RUN_DIR [--resume] [--threads N]",
     "Pretrains a JetMoE as the recipe says (mixture phases, AdamW, warmup-stable-decay schedule,\n"
     "load-balancing and z losses). Writes RUN_DIR/metrics.jsonl, loss.svg and checkpoints in HF\n"
     "format with trainer state; SIGINT/SIGTERM save and exit; --resume continues bit-exactly.",
     cmd_pretrain},
    {"generate", "jetmoe generate DIR --prompt TEXT | --tokens IDS [--max-new N] [--temperature T] [--top-k K] "
                 "[--top-p P] [--seed S] [--greedy] [--ids] [--stop STR]... [--threads N] [--kernels K]",
     "Continues a prompt with the model in DIR (its tokenizer files, or --tokenizer PATH), streaming\n"
     "the text to stdout; --ids prints the generated token ids instead. BOS is prepended to --prompt,\n"
     "and the EOS/BOS strings in it (\"</s>\", \"<s>\") become their token ids. Generation ends at EOS,\n"
     "--max-new, the end of the context, or a --stop string (not printed; up to 16). Weights are used as\n"
     "stored (F32, BF16, Q8, Q4); --kernels auto|avx2|portable picks the BF16/Q8/Q4 kernels.",
     cmd_generate},
    {"chat", "jetmoe chat DIR [--system TEXT] [--max-new N] [--temperature T] [--top-p P] [--seed S] [--greedy]",
     "Talks with the model in DIR in its chat template (JetMoE-chat's by default), streaming each\n"
     "reply; the KV cache keeps the conversation. /reset clears the history, /exit quits.",
     cmd_chat},
    {"eval", "jetmoe eval DIR --data SHARD_DIR [--seq-len 256] [--max-tokens N] [--decode] [--threads N] [--kernels K]",
     "Held-out loss and perplexity of the model in DIR (F32, BF16, Q8 or Q4 weights) on the token\n"
     "shards of 'jetmoe prepare', in windows of --seq-len tokens (--max-tokens 0 = all). One JSON line.\n"
     "--decode runs each window a token at a time through the KV cache, as generation does.",
     cmd_eval},
    {"quantize", "jetmoe quantize DIR --to q8|q4 --out OUT_DIR",
     "Writes a copy of the checkpoint with every weight matrix as blocks of 32 int8 (q8) or int4 (q4)\n"
     "values with an F16 scale each (routers, norms and biases as stored); every command loads it.\n"
     "Reads the input in place, so a BF16 8B checkpoint needs no fp32 copy.",
     cmd_quantize},
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
