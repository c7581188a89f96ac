/* cmd_infer.c — the commands that run a model for inference: generate, chat, eval. */
#include "base/base.h"
#include <cjson/cJSON.h>
#include <unistd.h>
#include "flags.h"
#include "line_input.h"

#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The flags of generate and chat: generate's prompt or chat's system message,
 * and the sampling flags both take. */
typedef struct {
    const char *prompt, *tokens, *tokenizer, *system, *kernels, *kv_cache, *weights;
    int ids, quiet;
    int64_t threads;
    cli_sampling smp;
    cli_list stop;
} infer_opts;

/* The flags both tables end with; the defaults that differ are the arguments. */
#define SAMPLING_FLAGS(MAX_NEW, TEMPERATURE, TOP_P, WEIGHTS)                                                       \
    CLI_SAMPLING_FLAGS(infer_opts, smp, MAX_NEW, TEMPERATURE, TOP_P),                                             \
    {"--stop", {NULL}, FLAG_LIST, offsetof(infer_opts, stop), .meta = "STR",                                      \
     .help = "end the text before this string (not printed)"},                     \
    CLI_MODEL_FLAGS(infer_opts, WEIGHTS),                                                                         \
    {"--quiet", {NULL}, FLAG_BOOL, offsetof(infer_opts, quiet), .help = "no timing line on stderr"}

/* What generate's and chat's token callback writes to: the text stream, or
 * the ids alone (still watched for the stop strings); and when tokens came. */
typedef struct {
    jm_text_stream *text;
    int ids_only, n;   /* n: ids printed */
    int stopped;
    char last;         /* the last byte written to stdout */
    int ntok;          /* tokens sampled */
    double t_first, t_last; /* when the first (it ends the prefill) and the latest came */
} stream_ctx;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void write_out(stream_ctx *c, const char *bytes, size_t len)
{
    fwrite(bytes, 1, len, stdout);
    if (len) c->last = bytes[len - 1];
}

static int stream_token(void *p, int32_t id)
{
    stream_ctx *c = p;
    c->t_last = now();
    if (!c->ntok++) c->t_first = c->t_last;
    const char *bytes = "";
    size_t len = 0;
    jm_error err;
    int r = c->text ? jm_text_stream_push(c->text, id, &bytes, &len, &err) : 0;
    if (r < 0) r = 0; /* a piece that cannot be decoded prints nothing; generation goes on */
    if (r == 1) c->stopped = 1;
    if (c->ids_only) {
        char buf[16];
        if (!c->stopped) write_out(c, buf, (size_t)snprintf(buf, sizeof buf, c->n++ ? " %d" : "%d", id));
    } else {
        write_out(c, bytes, len);
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
    write_out(c, bytes, len);
}

/* As llama.cpp reports it: the prompt's rate (prefill) apart from the
 * generation's. The first token arrives with the prefill; the ntok - 1 after
 * it are one decode step each. */
static void print_timing(const jm_model *m, const stream_ctx *c, int n_prompt, double t0)
{
    double prefill = c->t_first - t0, decode = c->t_last - c->t_first;
    fprintf(stderr, "prompt: %d tokens, ", n_prompt);
    if (c->ntok && prefill > 0) fprintf(stderr, "%.1f tok/s", n_prompt / prefill);
    else fputs("- tok/s", stderr);
    fprintf(stderr, " | generation: %d tokens, ", c->ntok);
    if (c->ntok > 1 && decode > 0) fprintf(stderr, "%.1f tok/s", (c->ntok - 1) / decode);
    else fputs("- tok/s", stderr);
    fprintf(stderr, " | %s weights %s, %s kernels%s\n", jm_model_weight_type(m),
            jm_weights_in_ram(m) ? "in RAM" : "mapped", jm_kernels(m), c->stopped ? " | ended at a stop string" : "");
}

/* generate's and chat's arguments: parsed, the model directory resolved, the
 * sampling defaults its generation_config.json gives taken, the stop strings
 * checked, the thread count set. CLI_RUN or the exit code. */
static int infer_args(const cli_command *self, int argc, char **argv, infer_opts *o, char *dir, size_t cap)
{
    *o = (infer_opts){.smp.seed = -1};
    const char *path;
    int rc = cli_parse(self, argc, argv, o, &path);
    if (rc != CLI_RUN || (rc = cli_model_dir(self, path, dir, cap)) != CLI_RUN ||
        (rc = cli_sampling_defaults(self, argc, argv, dir, &o->smp)) != CLI_RUN)
        return rc;
    for (int i = 0; i < o->stop.n; i++)
        if (!*o->stop.v[i]) return cli_error(self, "--stop wants a non-empty string");
    jm_set_threads((int)o->threads);
    return CLI_RUN;
}

jm_status cli_open_model(const char *dir, const char *kernels, const char *kv_cache, const char *weights,
                         jm_model **m, jm_error *err)
{
    jm_status s = jm_model_open(dir, m, err);
    if (!s) s = jm_set_kernels(*m, kernels, err);
    if (!s) s = jm_set_kv_cache(*m, kv_cache, err);
    if (!s && (s = jm_weights_place(*m, weights, err))) {
        char msg[sizeof err->msg];
        snprintf(msg, sizeof msg, "%s", err->msg);
        jm_fail(err, s, "--weights: %s", msg);
    }
    if (s) {
        jm_model_free(*m);
        *m = NULL;
    }
    return s;
}

/* ---- generate ---- */

static const cli_flag generate_flags[] = {
    {"--prompt", {"-p"}, FLAG_STR, offsetof(infer_opts, prompt), .meta = "TEXT",
     .help = "the text to continue (BOS is prepended); this or --tokens"},
    {"--tokens", {NULL}, FLAG_STR, offsetof(infer_opts, tokens), .meta = "IDS",
     .help = "the prompt as comma-separated token ids"},
    {"--tokenizer", {NULL}, FLAG_STR, offsetof(infer_opts, tokenizer), .meta = "PATH",
     .help = "the tokenizer, when it is not in DIR"},
    {"--ids", {NULL}, FLAG_BOOL, offsetof(infer_opts, ids), .help = "print the new token ids, not the text"},
    SAMPLING_FLAGS("64", "0.8", "0.95", "map"),
};

static int run_generate(const cli_command *self, int argc, char **argv);

const cli_command cmd_generate = {
    "generate", "DIR", "continue a prompt, streaming the text",
    "Continues a prompt with the model in DIR (its tokenizer files, or --tokenizer PATH), streaming\n"
    "the text to stdout; --ids prints the generated token ids instead. BOS is prepended to --prompt,\n"
    "and the EOS/BOS strings in it (\"</s>\", \"<s>\") become their token ids. Generation ends at EOS,\n"
    "--max-new, the end of the context, or a --stop string (the earliest of several). The repetition\n"
    "penalty (HF, llama.cpp) divides the positive logits of the tokens seen in the window and\n"
    "multiplies the negative ones. Weights are used as stored (F32, BF16, Q8, Q4). Then a line on\n"
    "stderr: prompt and generation tokens and rates, weights, kernels.",
    generate_flags, (int)(sizeof generate_flags / sizeof generate_flags[0]), run_generate};

static int run_generate(const cli_command *self, int argc, char **argv)
{
    infer_opts o;
    char dir[4096];
    int rc = infer_args(self, argc, argv, &o, dir, sizeof dir);
    if (rc != CLI_RUN) return rc;
    if (!o.prompt == !o.tokens)
        return cli_error(self, "give --prompt or --tokens, one of them; usage: jetmoe generate DIR --prompt TEXT "
                         "| --tokens IDS [options]");

    stream_ctx ctx = {.ids_only = o.ids}; /* before any goto out */
    jm_error err;
    jm_tokenizer *tok = NULL;
    jm_model *m = NULL;
    int32_t *ids = NULL, *out = NULL;
    int n = 0;
    jm_status s = JM_OK;
    if (o.prompt || !o.ids || o.stop.n) {
        s = jm_tokenizer_load(o.tokenizer ? o.tokenizer : dir, &tok, &err);
        if (s) return cli_fail(self, s, &err);
    }
    if (o.prompt) {
        size_t k;
        int32_t *enc;
        /* special tokens in the prompt ("</s>" ending a chat turn) become their ids */
        if ((s = jm_tokenizer_encode_special(tok, o.prompt, strlen(o.prompt), &enc, &k, &err))) goto out;
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
    } else if (cli_parse_ids(o.tokens, &ids, &n) != 0) {
        jm_tokenizer_free(tok);
        return cli_error(self, "--tokens wants comma-separated integers, got '%s'", o.tokens);
    }
    if ((s = cli_open_model(dir, o.kernels, o.kv_cache, o.weights, &m, &err))) goto out;
    if (tok && jm_tokenizer_vocab_size(tok) != jm_model_config(m)->vocab_size) {
        s = JM_ERR_ARG;
        snprintf(err.msg, sizeof err.msg, "tokenizer has %d pieces but the model's vocab_size is %d",
                 jm_tokenizer_vocab_size(tok), jm_model_config(m)->vocab_size);
        goto out;
    }
    /* a prompt that leaves less room than --max-new generates to the end of the context */
    const int context = jm_model_config(m)->max_position_embeddings;
    int max_new = (int)o.smp.max_new;
    if (n >= context) {
        s = JM_ERR_ARG;
        snprintf(err.msg, sizeof err.msg, "the prompt of %d tokens does not fit the context of %d (it must leave "
                 "room for at least one new token)", n, context);
        goto out;
    }
    if (n + max_new > context) {
        fprintf(stderr, "jetmoe generate: note: %d prompt tokens leave room for %d new in the context of %d\n", n,
                context - n, context);
        max_new = context - n;
    }
    if (!(out = malloc(sizeof(int32_t) * (size_t)max_new))) {
        s = JM_ERR_NOMEM;
        snprintf(err.msg, sizeof err.msg, "out of memory");
        goto out;
    }
    /* the stream decodes prompt + continuation together, so the first new
     * piece keeps its leading space; the prompt itself is printed first */
    if (tok && (o.ids ? o.stop.n > 0 : 1)) {
        /* with --ids the stop strings are looked for in the continuation alone */
        if ((s = jm_text_stream_new(tok, ids, o.ids ? 0 : (size_t)n, o.stop.v, o.stop.n, &ctx.text, &err))) goto out;
        if (!o.ids) {
            char *text;
            size_t len;
            if ((s = jm_tokenizer_decode(tok, ids, (size_t)n, &text, &len, &err))) goto out;
            write_out(&ctx, text, len);
            free(text);
        }
    }
    jm_sample_opts so = cli_sample_opts(&o.smp, max_new);
    int n_out = 0;
    const double t0 = now();
    s = jm_generate(m, ids, n, &so, out, &n_out, stream_token, &ctx, &err);
    if (!s) stream_flush(&ctx);
    if (ctx.last != '\n') putchar('\n'); /* the timing line starts a line of its own */
    fflush(stdout);
    if (!s && !o.quiet) print_timing(m, &ctx, n, t0);
out:
    jm_text_stream_free(ctx.text);
    free(out);
    free(ids);
    jm_model_free(m);
    jm_tokenizer_free(tok);
    return s ? cli_fail(self, s, &err) : 0;
}

/* ---- chat ---- */

static const cli_flag chat_flags[] = {
    {"--system", {NULL}, FLAG_STR, offsetof(infer_opts, system), .meta = "TEXT",
     .help = "the system message the conversation starts with (kept when old turns are dropped)"},
    SAMPLING_FLAGS("256", "0.7", "0.9", "auto"),
};

static int run_chat(const cli_command *self, int argc, char **argv);

const cli_command cmd_chat = {
    "chat", "DIR", "talk with the model in its chat template",
    "Talks with the model in DIR in its chat template (JetMoE-chat's by default), streaming each\n"
    "reply; the KV cache keeps the conversation. On a terminal the line can be edited (arrows,\n"
    "Home/End, Ctrl-R searches the history). Ctrl-C stops a reply (or clears the line), Ctrl-D quits.\n"
    "When the conversation no longer fits the context, the oldest turns are dropped (never the\n"
    "system message) and a note says so. Commands: /help, /reset, /history, /exit. After each reply\n"
    "a line on stderr gives its prompt and generation tokens and rates (not with --quiet).",
    chat_flags, (int)(sizeof chat_flags / sizeof chat_flags[0]), run_chat};

static const char chat_help[] =
    "  /help     this list\n"
    "  /reset    start a new conversation (the --system message stays)\n"
    "  /history  print the conversation so far\n"
    "  /exit     quit (also /quit, or Ctrl-D)\n"
    "  Ctrl-C stops a reply; the part shown stays in the conversation.\n";

/* Set by SIGINT: stops the reply being generated, or abandons the line being
 * typed. (The one piece of process state a signal handler needs.) */
static volatile sig_atomic_t chat_interrupted;
static void on_chat_sigint(int sig)
{
    (void)sig;
    chat_interrupted = 1;
}

#define CHAT_MAX_MESSAGES 512

/* The conversation; msg[0 .. keep) (the system message) is never dropped. */
typedef struct {
    jm_chat_message msg[CHAT_MAX_MESSAGES];
    char *owned[CHAT_MAX_MESSAGES]; /* what to free, NULL for --system's */
    int n, keep;
} chat_history;

static void history_drop(chat_history *h, int at, int count)
{
    for (int i = at; i < at + count; i++) free(h->owned[i]);
    memmove(h->msg + at, h->msg + at + count, (size_t)(h->n - at - count) * sizeof *h->msg);
    memmove(h->owned + at, h->owned + at + count, (size_t)(h->n - at - count) * sizeof *h->owned);
    h->n -= count;
}

/* Takes ownership of text (may be NULL: out of memory). */
static int history_add(chat_history *h, const char *role, char *text)
{
    if (!text || h->n == CHAT_MAX_MESSAGES) {
        free(text);
        return -1;
    }
    h->owned[h->n] = text;
    h->msg[h->n++] = (jm_chat_message){role, text};
    return 0;
}

/* The conversation as ids, with room for `reserve` reply tokens: while it does
 * not fit, the oldest exchange (a user message and the reply to it) after the
 * kept messages is dropped; the newest message is never dropped. *dropped
 * counts the messages that went. */
static jm_status chat_fit(const jm_tokenizer *tok, chat_history *h, int ctx, int reserve, int32_t **ids, size_t *n,
                          int *dropped, jm_error *err)
{
    *dropped = 0;
    for (;;) {
        jm_status s = jm_chat_encode(tok, h->msg, h->n, 1, ids, n, err);
        if (s || (long)*n + reserve <= ctx || h->n - h->keep <= 1) return s;
        free(*ids);
        *ids = NULL;
        int k = h->n - h->keep >= 3 && strcmp(h->msg[h->keep + 1].role, "assistant") == 0 ? 2 : 1;
        history_drop(h, h->keep, k);
        *dropped += k;
    }
}

/* What a line typed at the prompt asks for. */
typedef enum { LINE_MESSAGE, LINE_EMPTY, LINE_HANDLED, LINE_EXIT } line_kind;

static line_kind chat_command(const char *line, chat_history *h)
{
    if (!line[0]) return LINE_EMPTY;
    /* a command is '/' and a word alone; "/usr/bin is ..." is a message */
    if (line[0] != '/' || strcspn(line + 1, " /\t") != strlen(line + 1) || !line[1]) return LINE_MESSAGE;
    if (!strcmp(line, "/exit") || !strcmp(line, "/quit")) return LINE_EXIT;
    if (!strcmp(line, "/help")) {
        fputs(chat_help, stderr);
    } else if (!strcmp(line, "/reset")) {
        history_drop(h, h->keep, h->n - h->keep);
        fprintf(stderr, "(history cleared)\n");
    } else if (!strcmp(line, "/history")) {
        for (int i = 0; i < h->n; i++) printf("[%s]\n%s\n", h->msg[i].role, h->msg[i].content);
        fflush(stdout);
    } else {
        jm_error e;
        fprintf(stderr, "(unknown command %s: /help lists them)\n", cli_shown(&e, line));
    }
    return LINE_HANDLED;
}

/* An interactive conversation in the tokenizer's chat template. Each turn
 * re-renders the whole history, keeps the KV cache for the prefix it shares
 * with what is already cached, and prefills only the rest. */
static int run_chat(const cli_command *self, int argc, char **argv)
{
    infer_opts o;
    char dir[4096];
    int rc = infer_args(self, argc, argv, &o, dir, sizeof dir);
    if (rc != CLI_RUN) return rc;
    jm_error err;
    jm_tokenizer *tok = NULL;
    jm_model *m = NULL;
    jm_status s = jm_tokenizer_load(dir, &tok, &err);
    if (!s) s = cli_open_model(dir, o.kernels, o.kv_cache, o.weights, &m, &err);
    if (s) {
        jm_model_free(m);
        jm_tokenizer_free(tok);
        return cli_fail(self, s, &err);
    }
    const int V = jm_model_config(m)->vocab_size, ctx = jm_model_config(m)->max_position_embeddings;
    const int eos = jm_tokenizer_eos_id(tok);
    /* the reply's room: what --max-new asks, at most half the context */
    const int max_new = (int)o.smp.max_new, reserve = max_new < ctx / 2 ? max_new : ctx / 2;
    jm_sample_opts so = cli_sample_opts(&o.smp, max_new);
    chat_history *h = calloc(1, sizeof *h);
    int ncached = 0;
    int32_t *cached = malloc(sizeof(int32_t) * (size_t)ctx), *reply = malloc(sizeof(int32_t) * (size_t)max_new);
    float *probs = malloc(8 * (size_t)V); /* sampling scratch: V (float, int32) pairs */
    float *penalised = malloc(sizeof(float) * (size_t)V); /* the logits after the repetition penalty */
    line_input *in = line_input_open("> ");
    if (h && o.system) h->msg[h->n++] = (jm_chat_message){"system", o.system}, h->keep = 1;
    uint64_t rng = so.seed;
    struct sigaction sa = {0}, old_sa;
    sa.sa_handler = on_chat_sigint; /* no SA_RESTART: a read it interrupts returns */
    sigaction(SIGINT, &sa, &old_sa);
    fprintf(stderr, "jetmoe chat: /help for commands, Ctrl-C stops a reply, Ctrl-D quits (context %d tokens)\n",
            ctx);
    if (!h || !cached || !reply || !probs || !penalised || !in) {
        s = JM_ERR_NOMEM;
        snprintf(err.msg, sizeof err.msg, "out of memory");
    }
    while (!s) {
        int intr;
        chat_interrupted = 0;
        const char *line = line_input_read(in, &intr);
        if (!line) {
            if (line_input_is_tty(in)) fputc('\n', stderr); /* Ctrl-D: the shell's prompt on a line of its own */
            break;
        }
        if (intr) { /* Ctrl-C at the prompt abandons the line */
            if (line_input_is_tty(in)) fputc('\n', stderr);
            continue;
        }
        line_kind kind = chat_command(line, h);
        if (kind == LINE_EXIT) break;
        if (kind != LINE_MESSAGE) continue;
        if (history_add(h, "user", strdup(line)) != 0) {
            fprintf(stderr, "(the conversation has %d messages, the most it holds: /reset to start again)\n",
                    CHAT_MAX_MESSAGES);
            continue;
        }
        int32_t *ids;
        size_t n;
        int dropped;
        if ((s = chat_fit(tok, h, ctx, reserve, &ids, &n, &dropped, &err))) break;
        if (dropped)
            fprintf(stderr, "(dropped the %d oldest message%s to fit the context of %d tokens)\n", dropped,
                    dropped > 1 ? "s" : "", ctx);
        if ((long)n + 1 >= ctx) {
            fprintf(stderr, "(the message does not fit the context of %d tokens%s: shorten it)\n", ctx,
                    h->keep ? " beside the system message" : "");
            free(ids);
            history_drop(h, h->n - 1, 1);
            continue;
        }
        /* reuse the cached prefix (a reply cut at --max-new left its last token out of the
         * KV cache); always recompute at least the last token */
        int same = 0;
        while (same < ncached && same < jm_cached(m) && same < (int)n - 1 && cached[same] == ids[same]) same++;
        const float *logits;
        stream_ctx sc = {0};
        const double t0 = now();
        if ((s = jm_infer(m, ids + same, (int)n - same, same, &logits, &err))) {
            free(ids);
            break;
        }
        memcpy(cached, ids, n * sizeof *ids);
        ncached = (int)n;
        free(ids);
        int nr = 0, limit = max_new < ctx - ncached ? max_new : ctx - ncached;
        if ((s = jm_text_stream_new(tok, NULL, 0, o.stop.v, o.stop.n, &sc.text, &err))) break;
        while (nr < limit && !chat_interrupted) {
            /* the penalty's window is the conversation's last tokens */
            const float *row = jm_apply_repetition_penalty(logits, penalised, V, cached, ncached, &so);
            int32_t id = jm_sample(row, V, &so, &rng, probs);
            if (stream_token(&sc, id) || id == eos) break; /* a stop string, or the end of the turn */
            reply[nr++] = id;
            cached[ncached++] = id;
            if (nr >= limit || (s = jm_infer(m, &id, 1, ncached - 1, &logits, &err))) break;
        }
        if (!s) stream_flush(&sc);
        jm_text_stream_free(sc.text);
        if (s) break;
        putchar('\n');
        fflush(stdout);
        if (chat_interrupted) fprintf(stderr, "(stopped)\n");
        else if (nr >= limit) fprintf(stderr, "(reply cut at %d tokens)\n", nr);
        if (!o.quiet) print_timing(m, &sc, (int)n - same, t0);
        char *text;
        size_t tl;
        if ((s = jm_tokenizer_decode(tok, reply, (size_t)nr, &text, &tl, &err))) break;
        for (int i = 0; sc.stopped && i < o.stop.n; i++) { /* the history holds what was shown */
            char *hit = strstr(text, o.stop.v[i]);
            if (hit) *hit = 0;
        }
        if (history_add(h, "assistant", text) != 0) {
            fprintf(stderr, "(the conversation has %d messages, the most it holds: /reset to start again)\n",
                    CHAT_MAX_MESSAGES);
            history_drop(h, h->n - 1, 1);
        }
    }
    sigaction(SIGINT, &old_sa, NULL);
    if (h) history_drop(h, 0, h->n);
    free(h);
    line_input_close(in);
    free(cached);
    free(reply);
    free(probs);
    free(penalised);
    jm_model_free(m);
    jm_tokenizer_free(tok);
    return s ? cli_fail(self, s, &err) : 0;
}

/* ---- eval ---- */

typedef struct {
    cli_list task;
    const char *data, *kernels, *kv_cache, *weights, *out, *dump, *shots_from, *tokenizer;
    int64_t seq_len, max_tokens, threads, shots, limit, seed, max_gen;
    int decode, overwrite, quiet;
} eval_opts;

static const cli_flag eval_flags[] = {
    {"--task", {NULL}, FLAG_LIST, offsetof(eval_opts, task), .meta = "FILE",
     .help = "a task (.jsonl: multiple choice or generative) or a text file (rolling perplexity); repeatable"},
    {"--data", {NULL}, FLAG_STR, offsetof(eval_opts, data), .meta = "SHARD_DIR",
     .help = "token shards of 'jetmoe prepare': held-out loss and perplexity"},
    {"--shots", {NULL}, FLAG_INT, offsetof(eval_opts, shots), "0", 0, 64, .meta = "K",
     .help = "few-shot examples before each scored one"},
    {"--shots-from", {NULL}, FLAG_STR, offsetof(eval_opts, shots_from), .meta = "FILE",
     .help = "the task's train file to draw shots from (default: the task itself, never the scored example)"},
    {"--limit", {NULL}, FLAG_INT, offsetof(eval_opts, limit), "0", 0, 1e9, .meta = "N",
     .help = "score the first N examples of each task, 0 = all"},
    {"--seed", {NULL}, FLAG_INT, offsetof(eval_opts, seed), "1234", 0, 9007199254740991.0, .meta = "S",
     .help = "the draw of the shots"},
    {"--max-gen", {NULL}, FLAG_INT, offsetof(eval_opts, max_gen), "256", 1, 1 << 20, .meta = "N",
     .help = "generative tasks: new tokens at most"},
    {"--out", {NULL}, FLAG_STR, offsetof(eval_opts, out), .meta = "FILE", .help = "the results as JSON"},
    {"--dump", {NULL}, FLAG_STR, offsetof(eval_opts, dump), .meta = "FILE",
     .help = "one JSON line per scored example, in file order"},
    {"--overwrite", {NULL}, FLAG_BOOL, offsetof(eval_opts, overwrite),
     .help = "replace an existing --out / --dump file"},
    {"--tokenizer", {NULL}, FLAG_STR, offsetof(eval_opts, tokenizer), .meta = "PATH",
     .help = "the tokenizer, when it is not in DIR"},
    {"--seq-len", {NULL}, FLAG_INT, offsetof(eval_opts, seq_len), "256", 2, 1 << 20, .meta = "N",
     .help = "perplexity: tokens per window (at most the model's context)"},
    {"--max-tokens", {NULL}, FLAG_INT, offsetof(eval_opts, max_tokens), "0", 0, 1099511627776.0, .meta = "N",
     .help = "perplexity: tokens to score, 0 = all"},
    {"--decode", {NULL}, FLAG_BOOL, offsetof(eval_opts, decode),
     .help = "perplexity: a token at a time through the KV cache, as generation runs (the same tokens)"},
    {"--quiet", {"-q"}, FLAG_BOOL, offsetof(eval_opts, quiet), .help = "no progress line"},
    CLI_MODEL_FLAGS(eval_opts, "auto"),
};

static int run_eval(const cli_command *self, int argc, char **argv);

const cli_command cmd_eval = {
    "eval", "DIR", "score a model: tasks (multiple choice, generative), perplexity",
    "Scores the model in DIR (F32, BF16, Q8 or Q4 weights, used in place) as lm-evaluation-harness\n"
    "does. --task FILE.jsonl: a multiple-choice task (acc, acc_norm) or a generative one (exact_match),\n"
    "in the generic layouts {\"context\", \"choices\", \"gold\"} / {\"prompt\", \"answer\"} or the native\n"
    "layouts of ARC, HellaSwag, MMLU, WinoGrande, PIQA, TruthfulQA-MC1 and GSM8K (README: Evaluation).\n"
    "--task with any other file: its rolling perplexity (token, byte, bits per byte). --data SHARD_DIR:\n"
    "held-out loss and perplexity of token shards, one JSON line. A table on stdout; progress on stderr.",
    eval_flags, (int)(sizeof eval_flags / sizeof eval_flags[0]), run_eval};

typedef struct {
    const char *what;
    double t0;
    int64_t total;
    int quiet, tty, done;
    jm_atomic_file *dump;
    int dump_open;
    jm_status s;
    jm_error *err;
} eval_run;

static void eval_progress(void *p, int64_t done, int64_t total)
{
    eval_run *r = p;
    if (r->quiet || !r->tty) return; /* progress only on a terminal: logs get the results */
    const double el = now() - r->t0;
    fprintf(stderr, "\reval %s: %lld/%lld, %.1f/s, %.0f s ", r->what, (long long)done, (long long)total,
            el > 0 ? (double)done / el : 0.0, el);
    if (done >= total) fputc('\n', stderr);
}

/* The --dump line of one example, and progress. */
static int eval_record(void *p, const jm_eval_record *rec)
{
    eval_run *r = p;
    if (r->dump_open && !r->s) {
        cJSON *o = cJSON_CreateObject();
        if (rec->gold >= 0) {
            cJSON *a = cJSON_AddArrayToObject(o, "loglik");
            for (int c = 0; c < rec->nchoices; c++) cJSON_AddItemToArray(a, cJSON_CreateNumber(rec->loglik[c]));
            cJSON_AddNumberToObject(o, "pred", rec->pred);
            cJSON_AddNumberToObject(o, "pred_norm", rec->pred_norm);
            cJSON_AddNumberToObject(o, "gold", rec->gold);
        } else {
            cJSON_AddStringToObject(o, "output", rec->output);
            cJSON_AddStringToObject(o, "extracted", rec->extracted);
            cJSON_AddStringToObject(o, "answer", rec->answer);
            cJSON_AddBoolToObject(o, "correct", rec->correct);
        }
        cJSON_AddNumberToObject(o, "line", rec->line);
        char *line = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
        if (!line) r->s = jm_fail(r->err, JM_ERR_NOMEM, "out of memory");
        else {
            r->s = jm_atomic_write(r->dump, line, strlen(line), r->err);
            if (!r->s) r->s = jm_atomic_write(r->dump, "\n", 1, r->err);
            free(line);
        }
    }
    eval_progress(r, ++r->done, r->total);
    return r->s != JM_OK;
}

static int ends_with(const char *s, const char *tail)
{
    size_t n = strlen(s), k = strlen(tail);
    return n >= k && !strcmp(s + n - k, tail);
}

static int run_eval(const cli_command *self, int argc, char **argv)
{
    eval_opts o = {0};
    const char *path;
    char dir[4096];
    int rc = cli_parse(self, argc, argv, &o, &path);
    if (rc != CLI_RUN) return rc;
    if ((rc = cli_model_dir(self, path, dir, sizeof dir)) != CLI_RUN) return rc;
    if (!o.task.n && !o.data) return cli_error(self, "give --task FILE or --data SHARD_DIR");
    if (o.task.n && o.data) return cli_error(self, "--task and --data: one at a time");
    if (o.shots_from && o.task.n != 1) return cli_error(self, "--shots-from goes with one --task");
    jm_set_threads((int)o.threads);
    jm_error err;
    jm_model *m = NULL;
    jm_tokenizer *tok = NULL;
    jm_atomic_file dump;
    eval_run r = {.t0 = now(), .quiet = o.quiet, .tty = isatty(2), .dump = &dump, .err = &err};
    cJSON *results = cJSON_CreateObject(), *tasks = cJSON_AddObjectToObject(results, "results");
    char out_target[4096], dump_target[4096];
    const char *inputs[CLI_MAX_REPEAT + 3];
    int ninputs = 0;
    inputs[ninputs++] = dir;
    for (int i = 0; i < o.task.n; i++) inputs[ninputs++] = o.task.v[i];
    if (o.shots_from) inputs[ninputs++] = o.shots_from;
    if (o.data) inputs[ninputs++] = o.data;
    /* where the outputs go is checked before any work (README: What writes where) */
    jm_status s = o.out ? jm_output_file(o.out, inputs, ninputs, o.overwrite, out_target, sizeof out_target, &err) : JM_OK;
    if (!s && o.dump) s = jm_output_file(o.dump, inputs, ninputs, o.overwrite, dump_target, sizeof dump_target, &err);
    if (!s) s = cli_open_model(dir, o.kernels, o.kv_cache, o.weights, &m, &err);
    if (s) goto out;
    const jm_config *c = jm_model_config(m);
    int windows = !!o.data; /* does --seq-len matter: shards or a text file */
    for (int i = 0; i < o.task.n; i++) windows |= !ends_with(o.task.v[i], ".jsonl");
    if (windows && o.seq_len > c->max_position_embeddings) {
        s = jm_fail(&err, JM_ERR_ARG, "--seq-len %lld is longer than the model's context (%d)", (long long)o.seq_len,
                    c->max_position_embeddings);
        goto out;
    }
    if (o.data) {
        double loss;
        int64_t n;
        r.what = o.data;
        s = jm_eval_shards(m, o.data, (int)o.seq_len, o.max_tokens, o.decode ? JM_EVAL_DECODE : JM_EVAL_CACHED,
                           &loss, &n, eval_progress, &r, &err);
        if (!s)
            printf("{\"loss\": %.6f, \"perplexity\": %.4f, \"tokens\": %lld, \"weights\": \"%s\", \"path\": \"%s\"}\n",
                   loss, exp(loss), (long long)n, jm_model_weight_type(m), o.decode ? "decode" : "batched");
        if (!s && o.out) {
            cJSON *d = cJSON_AddObjectToObject(tasks, o.data);
            cJSON_AddNumberToObject(d, "loss", loss);
            cJSON_AddNumberToObject(d, "perplexity", exp(loss));
            cJSON_AddNumberToObject(d, "tokens", (double)n);
        }
        goto write;
    }
    if ((s = jm_tokenizer_load(o.tokenizer ? o.tokenizer : dir, &tok, &err))) goto out;
    if (o.dump) {
        if ((s = jm_atomic_open(&dump, dump_target, &err))) goto out;
        r.dump_open = 1;
    }
    printf("%-28s %-10s %6s %-15s %9s %9s\n", "task", "layout", "n", "metric", "value", "stderr");
    for (int i = 0; i < o.task.n && !s; i++) {
        const char *f = o.task.v[i];
        r.what = f, r.done = 0, r.t0 = now();
        cJSON *d = cJSON_AddObjectToObject(tasks, f);
        const char *name = strrchr(f, '/') ? strrchr(f, '/') + 1 : f; /* the table's; --out has the path */
        if (!ends_with(f, ".jsonl")) { /* text: rolling perplexity */
            jm_ppl_result p;
            r.total = o.max_tokens;
            s = jm_eval_text(m, tok, &f, 1, (int)o.seq_len, o.max_tokens, o.decode, &p,
                             o.max_tokens ? eval_progress : NULL, &r, &err);
            if (s) break;
            const double tp = exp(-p.loglik / (double)p.tokens), bp = exp(-p.loglik / (double)p.bytes),
                         bpb = -p.loglik / (double)p.bytes / log(2.0);
            printf("%-28s %-10s %6lld %-15s %9.4f %9s\n", name, "text", (long long)p.tokens, "token_perplexity", tp, "");
            printf("%-28s %-10s %6s %-15s %9.4f %9s\n", "", "", "", "byte_perplexity", bp, "");
            printf("%-28s %-10s %6s %-15s %9.4f %9s\n", "", "", "", "bits_per_byte", bpb, "");
            cJSON_AddStringToObject(d, "kind", "perplexity");
            cJSON_AddNumberToObject(d, "tokens", (double)p.tokens);
            cJSON_AddNumberToObject(d, "bytes", (double)p.bytes);
            cJSON_AddNumberToObject(d, "loglik", p.loglik);
            cJSON_AddNumberToObject(d, "token_perplexity", tp);
            cJSON_AddNumberToObject(d, "byte_perplexity", bp);
            cJSON_AddNumberToObject(d, "bits_per_byte", bpb);
            continue;
        }
        jm_eval_task *t = NULL, *pool = NULL;
        s = jm_eval_task_load(f, &t, &err);
        if (!s && o.shots_from) s = jm_eval_task_load(o.shots_from, &pool, &err);
        if (!s && pool && (pool->kind != t->kind || strcmp(pool->layout, t->layout)))
            s = jm_fail(&err, JM_ERR_ARG, "%s: layout %s, the task %s has %s", o.shots_from, pool->layout, f, t->layout);
        if (!s) {
            jm_eval_opts eo = {(int)o.shots, (int)o.limit, (uint64_t)o.seed, pool, (int)o.max_gen, 0, 0};
            jm_eval_result res;
            r.total = o.limit > 0 && o.limit < t->n ? o.limit : t->n;
            s = jm_eval_run(m, tok, t, &eo, &res, eval_record, &r, &err);
            if (!s && r.s) s = r.s;
            if (!s) {
                cJSON_AddStringToObject(d, "layout", t->layout);
                cJSON_AddNumberToObject(d, "n", res.n);
                cJSON_AddNumberToObject(d, "shots", (double)o.shots);
                if (res.truncated) cJSON_AddNumberToObject(d, "truncated", res.truncated);
                if (t->kind == JM_EVAL_MC) {
                    printf("%-28s %-10s %6d %-15s %9.4f %9.4f\n", name, t->layout, res.n, "acc", res.acc, res.acc_stderr);
                    printf("%-28s %-10s %6s %-15s %9.4f %9.4f\n", "", "", "", "acc_norm", res.acc_norm,
                           res.acc_norm_stderr);
                    cJSON_AddNumberToObject(d, "acc", res.acc);
                    cJSON_AddNumberToObject(d, "acc_stderr", res.acc_stderr);
                    cJSON_AddNumberToObject(d, "acc_norm", res.acc_norm);
                    cJSON_AddNumberToObject(d, "acc_norm_stderr", res.acc_norm_stderr);
                } else {
                    printf("%-28s %-10s %6d %-15s %9.4f %9.4f\n", name, t->layout, res.n, "exact_match", res.exact_match,
                           res.exact_match_stderr);
                    cJSON_AddNumberToObject(d, "exact_match", res.exact_match);
                    cJSON_AddNumberToObject(d, "exact_match_stderr", res.exact_match_stderr);
                }
                if (res.truncated)
                    fprintf(stderr, "eval %s: %d examples lost context tokens on the left to fit the context of %d\n",
                            f, res.truncated, jm_context(m));
                fflush(stdout);
            }
        }
        jm_eval_task_free(t);
        jm_eval_task_free(pool);
    }
write:
    cJSON_AddStringToObject(results, "model", dir);
    cJSON_AddStringToObject(results, "weights", jm_model_weight_type(m));
    cJSON_AddNumberToObject(results, "seconds", now() - r.t0);
    if (!s && r.dump_open) {
        r.dump_open = 0;
        s = jm_atomic_commit(&dump, &err);
    }
    if (!s && o.out) s = jm_write_json(out_target, results, &err);
out:
    if (r.dump_open) jm_atomic_abort(&dump);
    cJSON_Delete(results);
    jm_tokenizer_free(tok);
    jm_model_free(m);
    return s ? cli_fail(self, s, &err) : 0;
}
