/* cmd_serve.c — jetmoe serve: the OpenAI-compatible HTTP server (src/serve/server.c). */
#include "flags.h"

#include <libgen.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>


/* The page GET / serves: web/chat.html, embedded by the Makefile (cli_web_page.c). */
extern const unsigned char cli_web_page[];
extern const unsigned long cli_web_page_len;

typedef struct {
    const char *host, *api_key, *kernels, *kv_cache, *weights, *tokenizer;
    int64_t port, parallel, ctx, threads, queue, max_body;
} serve_opts;

static const cli_flag serve_flags[] = {
    {"--host", {NULL}, FLAG_STR, offsetof(serve_opts, host), "127.0.0.1", .meta = "ADDR",
     .help = "the address to listen on (0.0.0.0 or :: for every interface)"},
    {"--port", {NULL}, FLAG_INT, offsetof(serve_opts, port), "8080", 0, 65535, .meta = "N",
     .help = "the TCP port, 0 = any free one (printed)"},
    {"--parallel", {NULL}, FLAG_INT, offsetof(serve_opts, parallel), "4", 1, 256, .meta = "N",
     .help = "requests decoding at once (KV cache slots)"},
    {"--ctx", {NULL}, FLAG_INT, offsetof(serve_opts, ctx), "0", 0, 1 << 24, .meta = "N",
     .help = "positions per slot (prompt + reply), 0 = the model's max_position_embeddings"},
    {"--api-key", {NULL}, FLAG_STR, offsetof(serve_opts, api_key), .meta = "KEY",
     .help = "require 'Authorization: Bearer KEY' on /v1/ (none when not given)"},
    {"--queue", {NULL}, FLAG_INT, offsetof(serve_opts, queue), "64", 1, 1 << 20, .meta = "N",
     .help = "requests waiting for a slot at most; more get 503"},
    {"--max-body", {NULL}, FLAG_INT, offsetof(serve_opts, max_body), "1048576", 1, (double)(1LL << 40),
     .meta = "BYTES", .help = "request body size at most; more gets 413"},
    {"--tokenizer", {NULL}, FLAG_STR, offsetof(serve_opts, tokenizer), .meta = "PATH",
     .help = "the tokenizer, when it is not in DIR"},
    CLI_MODEL_FLAGS(serve_opts, "auto"),
};

static int run_serve(const cli_command *self, int argc, char **argv);

const cli_command cmd_serve = {
    "serve", "DIR", "an OpenAI-compatible HTTP server (chat, completions, a web page)",
    "Serves the model in DIR over HTTP with OpenAI's API: POST /v1/chat/completions (the checkpoint's\n"
    "chat template) and /v1/completions (BOS + the prompt, as generate), streaming or not; GET\n"
    "/v1/models, /health, and / (a chat page). Up to --parallel requests decode together in one\n"
    "batched step; more wait in a queue of --queue. Prints 'listening on http://HOST:PORT' to\n"
    "stderr. Ctrl-C or SIGTERM stops accepting, lets requests in flight finish (10 s at most) and\n"
    "exits 0. README: Serving (OpenAI API).",
    serve_flags, (int)(sizeof serve_flags / sizeof serve_flags[0]), run_serve};

/* Set by SIGINT/SIGTERM; jm_serve polls it. (The one piece of process state a
 * signal handler needs.) */
static volatile sig_atomic_t serve_stop;
static void on_stop_signal(int sig)
{
    (void)sig;
    serve_stop = 1;
}
static int should_stop(void *ctx)
{
    (void)ctx;
    return serve_stop != 0;
}

static void on_listen(void *ctx, const char *host, int port)
{
    (void)ctx;
    const int v6 = strchr(host, ':') != NULL;
    fprintf(stderr, "listening on http://%s%s%s:%d\n", v6 ? "[" : "", host, v6 ? "]" : "", port);
    fflush(stderr);
}

static int run_serve(const cli_command *self, int argc, char **argv)
{
    serve_opts o = {0};
    const char *path;
    char dir[4096];
    int rc = cli_parse(self, argc, argv, &o, &path);
    if (rc != CLI_RUN || (rc = cli_model_dir(self, path, dir, sizeof dir)) != CLI_RUN) return rc;
    if (o.api_key && !*o.api_key) return cli_error(self, "--api-key wants a non-empty key");
    jm_set_threads((int)o.threads);
    jm_error err;
    jm_tokenizer *tok = NULL;
    jm_model *m = NULL;
    jm_generation_config gen; /* requests' sampling defaults */
    jm_status s = jm_generation_config_load(dir, &gen, &err);
    if (!s) s = jm_tokenizer_load(o.tokenizer ? o.tokenizer : dir, &tok, &err);
    if (!s) s = cli_open_model(dir, o.kernels, o.kv_cache, o.weights, &m, &err);
    if (!s) {
        /* the model's name: the checkpoint directory's */
        char name[4096];
        snprintf(name, sizeof name, "%s", dir);
        for (size_t n = strlen(name); n > 1 && name[n - 1] == '/'; n--) name[n - 1] = 0;
        struct sigaction sa = {.sa_handler = on_stop_signal};
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        jm_server_opts so = {.host = o.host, .port = (int)o.port, .parallel = (int)o.parallel, .ctx = (int)o.ctx,
                             .queue = (int)o.queue, .max_body = o.max_body, .api_key = o.api_key,
                             .model_id = basename(name), .defaults = &gen, .page = (const char *)cli_web_page,
                             .page_len = (size_t)cli_web_page_len, .on_listen = on_listen,
                             .should_stop = should_stop};
        s = jm_serve(m, tok, &so, &err);
        if (!s) fprintf(stderr, "jetmoe serve: stopped\n");
    }
    jm_model_free(m);
    jm_tokenizer_free(tok);
    return s ? cli_fail(self, s, &err) : 0;
}
