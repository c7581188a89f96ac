/* server.c — jm_serve: the OpenAI-compatible HTTP server (README: Serving).
 *
 * Two kinds of threads share one mutex (server.mu):
 *  - libmicrohttpd's, one per connection (MHD_USE_THREAD_PER_CONNECTION).
 *    Each parses and validates its request, tokenizes it, queues a job and
 *    then blocks until the job has text for it. Thread per connection is
 *    chosen over internal polling with suspend/resume because a handler may
 *    then simply wait on a condition variable (and a streaming reader may
 *    block until the next token), with no resume plumbing; the connection
 *    limit (queue + parallel + some) bounds the threads, and a CPU server
 *    has at most a few hundred requests in flight anyway.
 *  - one decode thread, the only one that touches the model and the
 *    jm_batcher: between steps it stops cancelled jobs and starts queued
 *    ones in free slots (jm_batcher_start reuses the longest cached prefix),
 *    then runs jm_batcher_step for every running job at once, appending
 *    each token's text (jm_text_stream: UTF-8 whole, stop strings held back)
 *    to its job and waking the job's waiter.
 * A job is shared by its connection and the decode thread (refs). A client
 * that goes away is noticed by the waiter (the socket reads EOF) or by MHD
 * (a failed write: the request-completed callback), either way the job is
 * marked cancelled and the decode thread stops its slot at the next step. */
#include "base/base.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_STOP 4          /* OpenAI: up to 4 stop sequences */
#define DEFAULT_MAX_TOKENS 256
#define WAIT_MS 100         /* how often a waiter looks at its socket */

typedef struct server server;

typedef struct job {
    int refs;               /* the connection and the decode thread, under server.mu */
    int chat, stream;
    char id[48];
    long long created;
    int32_t *prompt;
    int n_prompt, max_new;
    jm_sample_opts so;
    uint64_t seed;
    jm_text_stream *ts;     /* the decode thread's */
    /* under server.mu: */
    char *text;             /* the reply so far (valid UTF-8) */
    size_t len, cap;
    int n_out;              /* tokens generated */
    int done, cancelled;
    const char *finish;     /* "stop" or "length" once done; NULL when cancelled or failed */
    int fail_status;        /* nonzero: the job failed (HTTP status), fail_msg says why */
    char fail_msg[1024];
    pthread_cond_t cv;
    struct job *next;       /* the queue */
} job;

struct server {
    jm_model *m;
    const jm_tokenizer *t;
    jm_server_opts o;       /* defaults filled in */
    int ctx;
    jm_batcher *b;
    pthread_mutex_t mu;
    pthread_cond_t work;    /* the decode thread waits here for jobs */
    job *head, *tail;
    int waiting;            /* jobs queued */
    job **slot;             /* slot -> its job (decode thread) */
    int draining;           /* shutting down: new requests get 503 */
    int closing;            /* the decode thread cancels everything and returns */
    int inflight;           /* jobs whose connection has not completed */
    uint64_t id_salt, id_next;
    char mhd_msg[256];      /* libmicrohttpd's last complaint, for jm_serve's error */
};

/* One HTTP request (MHD's con_cls). */
typedef struct {
    server *s;
    int refs;               /* the request, and the streaming response when there is one */
    int route;
    char *body;
    size_t len;
    int too_large, answered;
    job *job;
    int fd;                 /* the client's socket, to notice it hanging up */
    /* streaming: the event being written, and what has been */
    char *ev;
    size_t ev_len, ev_off;
    size_t sent_text;
    int sent_role, sent_final, sent_done;
} conn;

enum { R_NONE, R_CHAT, R_COMPLETIONS, R_MODELS, R_HEALTH, R_PAGE };

static const struct {
    const char *path, *method;
    int route;
} routes[] = {
    {"/v1/chat/completions", "POST", R_CHAT},
    {"/v1/completions", "POST", R_COMPLETIONS},
    {"/v1/models", "GET", R_MODELS},
    {"/health", "GET", R_HEALTH},
    {"/", "GET", R_PAGE},
};

/* ---- jobs ---- */

static void job_release(server *s, job *j) /* under s->mu */
{
    if (!j || --j->refs > 0) return;
    (void)s;
    jm_text_stream_free(j->ts);
    free(j->prompt);
    free(j->text);
    pthread_cond_destroy(&j->cv);
    free(j);
}

/* Appends text, with bytes that are not UTF-8 (a byte-fallback piece alone)
 * as U+FFFD, so that every JSON string we write is valid. Under s->mu. */
static void job_append(job *j, const char *p, size_t n)
{
    if (j->len + 3 * n + 1 > j->cap) {
        size_t cap = (j->len + 3 * n + 1) * 2;
        char *t = realloc(j->text, cap);
        if (!t) return; /* the text is lost, never the server */
        j->text = t, j->cap = cap;
    }
    const unsigned char *u = (const unsigned char *)p;
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        size_t k = c < 0x80 ? 1 : (c >> 5) == 6 && c >= 0xc2 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 && c <= 0xf4 ? 4 : 0;
        int ok = k && i + k <= n;
        for (size_t q = 1; ok && q < k; q++) ok = (u[i + q] >> 6) == 2;
        if (ok && k == 3) {
            unsigned cp = ((c & 0x0fu) << 12) | ((u[i + 1] & 0x3fu) << 6);
            ok = cp >= 0x800 && (cp < 0xd800 || cp > 0xdfff);
        }
        if (ok && k == 4) {
            unsigned cp = ((c & 0x07u) << 18) | ((u[i + 1] & 0x3fu) << 12);
            ok = cp >= 0x10000 && cp <= 0x10ffff;
        }
        if (ok) {
            memcpy(j->text + j->len, p + i, k);
            j->len += k, i += k;
        } else {
            memcpy(j->text + j->len, "\xef\xbf\xbd", 3);
            j->len += 3, i++;
        }
    }
    j->text[j->len] = 0;
}

/* Ends a job (finish NULL: cancelled or failed) and wakes its waiter; the
 * decode thread lets go of it. Under s->mu. */
static void job_end(server *s, job *j, const char *finish)
{
    j->done = 1;
    j->finish = finish;
    pthread_cond_broadcast(&j->cv);
    job_release(s, j);
}

static void job_fail(server *s, job *j, int status, const char *msg)
{
    j->fail_status = status;
    snprintf(j->fail_msg, sizeof j->fail_msg, "%s", msg);
    job_end(s, j, NULL);
}

/* ---- the decode thread ---- */

/* jm_batcher_step's callback: runs on the decode thread, without s->mu. */
static int on_token(void *p, int slot, int32_t id, jm_gen_end end)
{
    server *s = p;
    job *j = s->slot[slot];
    const char *txt = "";
    size_t n = 0;
    jm_error err;
    int r = jm_text_stream_push(j->ts, id, &txt, &n, &err);
    if (r < 0) r = 0, n = 0; /* a piece that cannot be decoded adds nothing (as generate) */
    pthread_mutex_lock(&s->mu);
    j->n_out++;
    job_append(j, txt, n);
    const int fin = r == 1 || end != JM_GEN_MORE, cancelled = j->cancelled;
    if (fin) {
        if (r != 1) { /* what the stream held back (a stop string's first bytes that were not one) */
            jm_text_stream_flush(j->ts, &txt, &n);
            job_append(j, txt, n);
        }
        s->slot[slot] = NULL;
        job_end(s, j, r == 1 || end == JM_GEN_EOS ? "stop" : "length");
    } else if (cancelled) {
        s->slot[slot] = NULL;
        job_end(s, j, NULL);
    } else {
        pthread_cond_broadcast(&j->cv);
    }
    pthread_mutex_unlock(&s->mu);
    return r == 1 || cancelled; /* the batcher stops the slot (it does at EOS and length itself) */
}

static void *decode_main(void *p)
{
    server *s = p;
    const int S = jm_slots(s->m);
    jm_error err;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        for (int t = 0; t < S; t++) { /* clients gone, or the shutdown's grace is over */
            job *j = s->slot[t];
            if (j && (j->cancelled || s->closing)) {
                jm_batcher_stop(s->b, t);
                s->slot[t] = NULL;
                if (s->closing) job_fail(s, j, 503, "the server is shutting down");
                else job_end(s, j, NULL);
            }
        }
        if (s->closing) {
            for (job *j; (j = s->head);) {
                s->head = j->next, s->waiting--;
                job_fail(s, j, 503, "the server is shutting down");
            }
            break;
        }
        for (int t; s->head && (t = jm_batcher_free_slot(s->b)) >= 0;) {
            job *j = s->head;
            s->head = j->next, s->waiting--;
            if (!s->head) s->tail = NULL;
            if (j->cancelled) {
                job_end(s, j, NULL);
                continue;
            }
            s->slot[t] = j;
            /* the prefill runs unlocked: HTTP threads go on queueing meanwhile */
            pthread_mutex_unlock(&s->mu);
            jm_status st = jm_batcher_start(s->b, t, j->prompt, j->n_prompt, &j->so, j->seed, j->max_new, &err);
            pthread_mutex_lock(&s->mu);
            if (st) {
                s->slot[t] = NULL;
                job_fail(s, j, 500, err.msg);
            }
        }
        if (!jm_batcher_running(s->b)) {
            pthread_cond_wait(&s->work, &s->mu);
            continue;
        }
        pthread_mutex_unlock(&s->mu);
        jm_status st = jm_batcher_step(s->b, on_token, s, &err);
        pthread_mutex_lock(&s->mu);
        if (st) /* the model failed: every running request says so */
            for (int t = 0; t < S; t++)
                if (s->slot[t]) {
                    jm_batcher_stop(s->b, t);
                    job_fail(s, s->slot[t], 500, err.msg);
                    s->slot[t] = NULL;
                }
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- responses ---- */

static enum MHD_Result send_bytes(struct MHD_Connection *c, int status, const char *type, const char *body,
                                  size_t len, int copy)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, (void *)body, copy ? MHD_RESPMEM_MUST_COPY : MHD_RESPMEM_PERSISTENT);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", type);
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    return ok;
}

/* Sends root (freed here) as the JSON body. */
static enum MHD_Result send_json(struct MHD_Connection *c, int status, cJSON *root)
{
    char *text = root ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (!text) return MHD_NO;
    enum MHD_Result ok = send_bytes(c, status, "application/json", text, strlen(text), 1);
    cJSON_free(text);
    return ok;
}

/* s with every byte that is not part of a well-formed UTF-8 character
 * replaced by U+FFFD: a message may quote a request's path or field name,
 * and JSON text must be UTF-8 (a client would fail to parse the error). */
static void utf8_clean(const char *s, char *out, size_t cap)
{
    size_t i = 0, o = 0, n = strlen(s);
    while (i < n && o + 4 < cap) {
        size_t k = jm_utf8_char((const uint8_t *)s + i, n - i);
        if (k) {
            memcpy(out + o, s + i, k);
            o += k, i += k;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3, i++;
        }
    }
    out[o] = 0;
}

/* OpenAI's error shape: {"error": {"message", "type", "param", "code"}}. */
static cJSON *error_json(int status, const char *param, const char *raw_msg)
{
    char msg[3 * 1024 + 4], p[3 * 128 + 4];
    utf8_clean(raw_msg, msg, sizeof msg);
    if (param) utf8_clean(param, p, sizeof p), param = p;
    const char *type = status >= 500 ? "server_error" : "invalid_request_error", *code = NULL;
    switch (status) {
    case 401: code = "invalid_api_key"; break;
    case 404: code = "not_found"; break;
    case 405: code = "method_not_allowed"; break;
    case 413: code = "request_too_large"; break;
    case 503: code = "server_overloaded"; break;
    }
    cJSON *root = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(e, "message", msg);
    cJSON_AddStringToObject(e, "type", type);
    if (param) cJSON_AddStringToObject(e, "param", param);
    else cJSON_AddNullToObject(e, "param");
    if (code) cJSON_AddStringToObject(e, "code", code);
    else cJSON_AddNullToObject(e, "code");
    return root;
}

static enum MHD_Result send_error(conn *k, struct MHD_Connection *c, int status, const char *param,
                                  const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static enum MHD_Result send_error(conn *k, struct MHD_Connection *c, int status, const char *param,
                                  const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    k->answered = 1;
    cJSON *root = error_json(status, param, msg);
    char *text = root ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (!text) return MHD_NO;
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_COPY);
    cJSON_free(text);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", "application/json");
    if (status == 401) MHD_add_response_header(r, "WWW-Authenticate", "Bearer");
    if (status == 405) MHD_add_response_header(r, "Allow", k->route == R_CHAT || k->route == R_COMPLETIONS ? "POST" : "GET");
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    return ok;
}

/* ---- requests ---- */

typedef struct {
    int status;
    const char *param;
    char msg[512];
} req_error;

__attribute__((format(printf, 3, 4))) static int bad(req_error *e, const char *param, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->status = 400, e->param = param;
    return -1;
}

/* A field, NULL when absent or null (OpenAI's clients send null for "not given"). */
static const cJSON *field(const cJSON *root, const char *name)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(root, name);
    return f && !cJSON_IsNull(f) ? f : NULL;
}

/* A number field in [lo, hi] (open at lo with open_lo; integral with integer). */
static int number(const cJSON *root, const char *name, double lo, double hi, int open_lo, int integer, double *out,
                  req_error *e)
{
    const cJSON *f = field(root, name);
    if (!f) return 0;
    char d[64];
    if (!cJSON_IsNumber(f))
        return bad(e, name, "'%s' must be a%s number, got %s", name, integer ? "n integer" : "",
                   jm_json_describe(f, d, sizeof d));
    const double v = f->valuedouble;
    if (!isfinite(v) || (integer && v != floor(v)) || v < lo || v > hi || (open_lo && v == lo))
        return bad(e, name, "'%s' must be a%s in %c%g, %g], got %g", name, integer ? "n integer" : " number",
                   open_lo ? '(' : '[', lo, hi, v);
    *out = v;
    return 0;
}

/* Reads the request's fields into j (and the prompt's parts into msgs/prompt). */
static int parse_request(server *s, const cJSON *root, job *j, jm_chat_message **msgs, int *nmsgs,
                         const char **prompt, char **stop, int *nstop, req_error *e)
{
    char d[64];
    if (!cJSON_IsObject(root)) return bad(e, NULL, "the body must be a JSON object, got %s", jm_json_describe(root, d, sizeof d));
    const cJSON *f;
    if ((f = field(root, "model")) && !cJSON_IsString(f))
        return bad(e, "model", "'model' must be a string, got %s", jm_json_describe(f, d, sizeof d));
    if (j->chat) {
        f = field(root, "messages");
        if (!f) return bad(e, "messages", "'messages' is required");
        if (!cJSON_IsArray(f) || !cJSON_GetArraySize(f))
            return bad(e, "messages", "'messages' must be a non-empty array, got %s", jm_json_describe(f, d, sizeof d));
        int n = cJSON_GetArraySize(f), i = 0;
        if (!(*msgs = calloc((size_t)n, sizeof **msgs))) return bad(e, NULL, "out of memory");
        *nmsgs = n;
        for (const cJSON *m = f->child; m; m = m->next, i++) {
            const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
            const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
            if (!cJSON_IsObject(m)) return bad(e, "messages", "messages[%d] must be an object", i);
            if (!cJSON_IsString(role) || (strcmp(role->valuestring, "system") && strcmp(role->valuestring, "user") &&
                                          strcmp(role->valuestring, "assistant")))
                return bad(e, "messages", "messages[%d].role must be \"system\", \"user\" or \"assistant\"", i);
            if (!cJSON_IsString(content))
                return bad(e, "messages", "messages[%d].content must be a string, got %s", i,
                           jm_json_describe(content, d, sizeof d));
            (*msgs)[i] = (jm_chat_message){role->valuestring, content->valuestring};
        }
    } else {
        f = field(root, "prompt");
        if (f && cJSON_IsArray(f) && cJSON_GetArraySize(f) == 1) f = f->child; /* ["text"]: one prompt */
        if (!f) return bad(e, "prompt", "'prompt' is required");
        if (!cJSON_IsString(f))
            return bad(e, "prompt", "'prompt' must be a string, got %s", jm_json_describe(f, d, sizeof d));
        *prompt = f->valuestring;
    }
    /* the defaults: the checkpoint's generation_config.json's, else OpenAI's */
    const jm_generation_config *g = s->o.defaults;
    double v = g && g->has_max_new_tokens ? g->max_new_tokens : DEFAULT_MAX_TOKENS, seed = -1, n = 1;
    double temp = g && g->has_do_sample && !g->do_sample ? 0 : g && g->has_temperature ? g->temperature : 1;
    double top_p = g && g->has_top_p ? g->top_p : 1;
    if (number(root, "max_completion_tokens", 1, 1 << 20, 0, 1, &v, e) || number(root, "max_tokens", 1, 1 << 20, 0, 1, &v, e) ||
        number(root, "temperature", 0, 2, 0, 0, &temp, e) || number(root, "top_p", 0, 1, 1, 0, &top_p, e) ||
        number(root, "seed", -9007199254740992.0, 9007199254740992.0, 0, 1, &seed, e) ||
        number(root, "n", 1, 1, 0, 1, &n, e))
        return -1;
    j->max_new = (int)v;
    if ((f = field(root, "stream")) && !cJSON_IsBool(f))
        return bad(e, "stream", "'stream' must be true or false, got %s", jm_json_describe(f, d, sizeof d));
    j->stream = f && cJSON_IsTrue(f);
    if ((f = field(root, "stop"))) {
        if (cJSON_IsString(f)) {
            stop[(*nstop)++] = f->valuestring;
        } else if (cJSON_IsArray(f) && cJSON_GetArraySize(f) <= MAX_STOP) {
            for (const cJSON *x = f->child; x; x = x->next) {
                if (!cJSON_IsString(x))
                    return bad(e, "stop", "'stop' entries must be strings, got %s", jm_json_describe(x, d, sizeof d));
                stop[(*nstop)++] = x->valuestring;
            }
        } else {
            return bad(e, "stop", "'stop' must be a string or an array of at most %d strings", MAX_STOP);
        }
        for (int i = 0; i < *nstop; i++)
            if (!*stop[i]) return bad(e, "stop", "'stop' strings must not be empty");
    }
    if (seed < 0) { /* none given: a random one */
        uint64_t r;
        if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r) r = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)j;
        j->seed = r;
    } else {
        j->seed = (uint64_t)(int64_t)seed;
    }
    j->so = (jm_sample_opts){.temperature = temp, .top_p = top_p, .seed = j->seed, .max_new = j->max_new,
                             .greedy = temp == 0, .repetition_penalty = 1, .repeat_last_n = 0};
    if (g && g->has_top_k) j->so.top_k = g->top_k;
    if (g && g->has_repetition_penalty) /* HF's penalty: every token so far */
        j->so.repetition_penalty = g->repetition_penalty, j->so.repeat_last_n = -1;
    return 0;
}

/* The prompt's ids: the chat template's (BOS first), or BOS + the text with
 * its "</s>"/"<s>" as ids, as `jetmoe generate --prompt` encodes. */
static int tokenize(server *s, job *j, const jm_chat_message *msgs, int nmsgs, const char *prompt, req_error *e)
{
    jm_error err;
    jm_status st;
    size_t n = 0;
    int32_t *ids = NULL;
    if (j->chat) {
        st = jm_chat_encode(s->t, msgs, nmsgs, 1, &ids, &n, &err);
    } else {
        int32_t *enc = NULL;
        size_t k = 0;
        st = jm_tokenizer_encode_special(s->t, prompt, strlen(prompt), &enc, &k, &err);
        if (!st && !(ids = malloc(sizeof(int32_t) * (k + 1)))) st = jm_fail(&err, JM_ERR_NOMEM, "out of memory");
        if (!st) {
            const int bos = jm_tokenizer_bos_id(s->t);
            if (bos >= 0) ids[n++] = bos;
            if (k) memcpy(ids + n, enc, k * sizeof *enc);
            n += k;
        }
        free(enc);
    }
    if (st) {
        free(ids);
        return bad(e, j->chat ? "messages" : "prompt", "%s", err.msg);
    }
    j->prompt = ids;
    j->n_prompt = (int)n;
    if (!n) return bad(e, "prompt", "the prompt is empty (the tokenizer has no BOS)");
    if ((int64_t)n >= s->ctx)
        return bad(e, j->chat ? "messages" : "prompt", "the prompt of %zu tokens does not fit the context of %d (it "
                   "must leave room for at least one new token)", n, s->ctx);
    if (j->n_prompt + j->max_new > s->ctx) j->max_new = s->ctx - j->n_prompt; /* then finish_reason "length" */
    return 0;
}

static void make_id(server *s, job *j) /* under s->mu */
{
    snprintf(j->id, sizeof j->id, "%s%016llx", j->chat ? "chatcmpl-" : "cmpl-",
             (unsigned long long)jm_seed_stream(s->id_salt, s->id_next++));
    j->created = (long long)time(NULL);
}

/* The frame every response and chunk shares. */
static cJSON *frame(const server *s, const job *j, const char *object)
{
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "id", j->id);
    cJSON_AddStringToObject(r, "object", object);
    cJSON_AddNumberToObject(r, "created", (double)j->created);
    cJSON_AddStringToObject(r, "model", s->o.model_id);
    return r;
}

static void add_usage(cJSON *r, const job *j)
{
    cJSON *u = cJSON_AddObjectToObject(r, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", j->n_prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", j->n_out);
    cJSON_AddNumberToObject(u, "total_tokens", j->n_prompt + j->n_out);
}

/* The whole reply (under s->mu). */
static cJSON *completion_json(const server *s, const job *j)
{
    cJSON *r = frame(s, j, j->chat ? "chat.completion" : "text_completion");
    cJSON *c = cJSON_CreateObject();
    cJSON_AddNumberToObject(c, "index", 0);
    if (j->chat) {
        cJSON *msg = cJSON_AddObjectToObject(c, "message");
        cJSON_AddStringToObject(msg, "role", "assistant");
        cJSON_AddStringToObject(msg, "content", j->text ? j->text : "");
    } else {
        cJSON_AddStringToObject(c, "text", j->text ? j->text : "");
    }
    cJSON_AddNullToObject(c, "logprobs");
    cJSON_AddStringToObject(c, "finish_reason", j->finish);
    cJSON *choices = cJSON_AddArrayToObject(r, "choices");
    cJSON_AddItemToArray(choices, c);
    add_usage(r, j);
    return r;
}

/* One streamed chunk: role (chat's first), text, or the finish (text NULL, finish set). */
static char *chunk_event(const server *s, const job *j, int role, const char *text, size_t len, const char *finish)
{
    cJSON *r = frame(s, j, j->chat ? "chat.completion.chunk" : "text_completion");
    cJSON *c = cJSON_CreateObject();
    cJSON_AddNumberToObject(c, "index", 0);
    char *piece = NULL;
    if (text && (piece = malloc(len + 1))) memcpy(piece, text, len), piece[len] = 0;
    if (j->chat) {
        cJSON *delta = cJSON_AddObjectToObject(c, "delta");
        if (role) cJSON_AddStringToObject(delta, "role", "assistant");
        if (piece) cJSON_AddStringToObject(delta, "content", piece);
    } else {
        cJSON_AddStringToObject(c, "text", piece ? piece : "");
    }
    free(piece);
    cJSON_AddNullToObject(c, "logprobs");
    if (finish) cJSON_AddStringToObject(c, "finish_reason", finish);
    else cJSON_AddNullToObject(c, "finish_reason");
    cJSON_AddItemToArray(cJSON_AddArrayToObject(r, "choices"), c);
    if (finish) add_usage(r, j);
    char *json = cJSON_PrintUnformatted(r);
    cJSON_Delete(r);
    if (!json) return NULL;
    size_t n = strlen(json);
    char *ev = malloc(n + 9);
    if (ev) memcpy(ev, "data: ", 6), memcpy(ev + 6, json, n), memcpy(ev + 6 + n, "\n\n", 3);
    cJSON_free(json);
    return ev;
}

/* Whether the client has hung up: its socket reads EOF (or fails). A request
 * pipelined behind ours reads as data, not as a hang-up. */
static int peer_gone(int fd)
{
    if (fd < 0) return 0;
    char b;
    ssize_t r = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    return r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

/* Waits (under s->mu) until the job has something past `have` bytes of text or
 * is done; 0, or -1 when the client went away (the job is then cancelled). */
static int wait_job(server *s, conn *k, size_t have)
{
    job *j = k->job;
    while (!j->done && j->len <= have) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += WAIT_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&j->cv, &s->mu, &ts);
        if (!j->done && j->len <= have && peer_gone(k->fd)) {
            j->cancelled = 1;
            pthread_cond_signal(&s->work);
            return -1;
        }
    }
    return 0;
}

/* The streaming response's reader: one server-sent event at a time. */
static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    conn *k = cls;
    server *s = k->s;
    job *j = k->job;
    if (k->ev_off == k->ev_len) {
        free(k->ev);
        k->ev = NULL, k->ev_len = k->ev_off = 0;
        pthread_mutex_lock(&s->mu);
        char *ev = NULL;
        int end = 0;
        if (j->chat && !k->sent_role) {
            ev = chunk_event(s, j, 1, NULL, 0, NULL);
            k->sent_role = 1;
        } else if (wait_job(s, k, k->sent_text) < 0) {
            end = -1;
        } else if (j->len > k->sent_text) {
            ev = chunk_event(s, j, 0, j->text + k->sent_text, j->len - k->sent_text, NULL);
            k->sent_text = j->len;
        } else if (!k->sent_final) {
            k->sent_final = 1;
            if (j->finish) {
                ev = chunk_event(s, j, 0, NULL, 0, j->finish);
            } else if (j->fail_status) { /* the status line has gone: the error rides as an event */
                cJSON *r = error_json(j->fail_status, NULL, j->fail_msg);
                char *json = r ? cJSON_PrintUnformatted(r) : NULL;
                cJSON_Delete(r);
                if (json && (ev = malloc(strlen(json) + 9))) sprintf(ev, "data: %s\n\n", json);
                cJSON_free(json);
            } else {
                end = -1; /* cancelled */
            }
        } else if (!k->sent_done) {
            k->sent_done = 1;
            ev = strdup("data: [DONE]\n\n");
        } else {
            end = 1;
        }
        pthread_mutex_unlock(&s->mu);
        if (end) return end > 0 ? MHD_CONTENT_READER_END_OF_STREAM : MHD_CONTENT_READER_END_WITH_ERROR;
        if (!ev) return MHD_CONTENT_READER_END_WITH_ERROR;
        k->ev = ev, k->ev_len = strlen(ev);
    }
    size_t n = k->ev_len - k->ev_off < max ? k->ev_len - k->ev_off : max;
    memcpy(buf, k->ev + k->ev_off, n);
    k->ev_off += n;
    return (ssize_t)n;
}

static void conn_release(server *s, conn *k) /* under s->mu */
{
    if (--k->refs > 0) return;
    if (k->job) {
        if (!k->job->done) {
            k->job->cancelled = 1;
            pthread_cond_signal(&s->work);
        }
        job_release(s, k->job);
        s->inflight--;
    }
    free(k->body);
    free(k->ev);
    free(k);
}

static void stream_free(void *cls)
{
    conn *k = cls;
    server *s = k->s;
    pthread_mutex_lock(&s->mu);
    conn_release(s, k);
    pthread_mutex_unlock(&s->mu);
}

/* The request-completed callback: the response went out, or the client left. */
static void request_done(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe)
{
    (void)c, (void)toe;
    server *s = cls;
    conn *k = *con_cls;
    if (!k) return;
    *con_cls = NULL;
    pthread_mutex_lock(&s->mu);
    conn_release(s, k);
    pthread_mutex_unlock(&s->mu);
}

/* A completion request, its body whole: validate, tokenize, queue, answer. */
static enum MHD_Result serve_completion(server *s, conn *k, struct MHD_Connection *c)
{
    jm_error err;
    cJSON *root = NULL;
    if (jm_json_parse(k->body ? k->body : "", k->len, "the request body", &root, &err))
        return send_error(k, c, 400, NULL, "%s", err.msg);
    job *j = calloc(1, sizeof *j);
    if (!j) {
        cJSON_Delete(root);
        return send_error(k, c, 500, NULL, "out of memory");
    }
    j->refs = 1;
    j->chat = k->route == R_CHAT;
    pthread_cond_init(&j->cv, NULL);
    req_error e = {0};
    jm_chat_message *msgs = NULL;
    int nmsgs = 0, nstop = 0;
    const char *prompt = NULL;
    char *stop[MAX_STOP];
    int bad_req = parse_request(s, root, j, &msgs, &nmsgs, &prompt, stop, &nstop, &e) ||
                  tokenize(s, j, msgs, nmsgs, prompt, &e);
    if (!bad_req) {
        const int V = jm_model_config(s->m)->vocab_size;
        if (jm_text_stream_new(s->t, j->prompt, (size_t)j->n_prompt, (const char *const *)stop, nstop, &j->ts, &err))
            bad_req = bad(&e, "stop", "%s", err.msg);
        for (int i = 0; !bad_req && i < j->n_prompt; i++)
            if (j->prompt[i] < 0 || j->prompt[i] >= V) bad_req = bad(&e, NULL, "token %d is outside the vocabulary", j->prompt[i]);
    }
    free(msgs);
    cJSON_Delete(root);
    pthread_mutex_lock(&s->mu);
    if (bad_req) {
        job_release(s, j);
        pthread_mutex_unlock(&s->mu);
        return send_error(k, c, e.status, e.param, "%s", e.msg);
    }
    if (s->draining || s->waiting >= s->o.queue) {
        job_release(s, j);
        const int draining = s->draining, q = s->o.queue;
        pthread_mutex_unlock(&s->mu);
        return draining ? send_error(k, c, 503, NULL, "the server is shutting down")
                        : send_error(k, c, 503, NULL, "the queue is full (%d requests waiting); try again later", q);
    }
    make_id(s, j);
    j->refs = 2; /* this connection and the decode thread */
    k->job = j;
    s->inflight++;
    if (s->tail) s->tail->next = j;
    else s->head = j;
    s->tail = j, s->waiting++;
    pthread_cond_signal(&s->work);
    k->answered = 1;
    if (j->stream) {
        pthread_mutex_unlock(&s->mu);
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, stream_read, k, stream_free);
        if (!r) return MHD_NO;
        pthread_mutex_lock(&s->mu);
        k->refs++; /* the response's, let go in stream_free */
        pthread_mutex_unlock(&s->mu);
        MHD_add_response_header(r, "Content-Type", "text/event-stream");
        MHD_add_response_header(r, "Cache-Control", "no-cache");
        enum MHD_Result ok = MHD_queue_response(c, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        return ok;
    }
    if (wait_job(s, k, SIZE_MAX) < 0) {
        pthread_mutex_unlock(&s->mu);
        return MHD_NO; /* the client is gone: close */
    }
    cJSON *out = j->finish ? completion_json(s, j) : NULL;
    const int status = j->fail_status;
    char msg[sizeof j->fail_msg];
    snprintf(msg, sizeof msg, "%s", j->fail_msg);
    pthread_mutex_unlock(&s->mu);
    if (!out && status) return send_error(k, c, status, NULL, "%s", msg);
    if (!out) return MHD_NO;
    return send_json(c, 200, out);
}

/* Constant-time comparison of the Authorization header with "Bearer KEY":
 * the time depends on the key's length only, never on where they differ. */
static int authorized(const server *s, struct MHD_Connection *c)
{
    const char *key = s->o.api_key;
    if (!key || !*key) return 1;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncmp(h, "Bearer ", 7) != 0) return 0;
    h += 7;
    const size_t kn = strlen(key), hn = strlen(h);
    unsigned char diff = kn != hn;
    for (size_t i = 0; i < kn; i++) diff |= (unsigned char)key[i] ^ (unsigned char)(i < hn ? h[i] : 0);
    return !diff;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                              const char *version, const char *upload, size_t *upload_size, void **con_cls)
{
    (void)version;
    server *s = cls;
    conn *k = *con_cls;
    if (!k) { /* the headers are in: route, key and size are checked before any body is read */
        if (!(k = calloc(1, sizeof *k))) return MHD_NO;
        k->s = s, k->refs = 1, k->fd = -1;
        *con_cls = k;
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (ci) k->fd = ci->connect_fd;
        int path_known = 0;
        for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++)
            if (!strcmp(url, routes[i].path)) {
                path_known = 1;
                k->route = routes[i].route;
                if (!strcmp(method, routes[i].method)) break;
                k->route = -routes[i].route; /* the path, another method */
            }
        if (!path_known) return send_error(k, c, 404, NULL, "no such endpoint: %s %.200s", method, url);
        if (k->route < 0) {
            k->route = -k->route;
            return send_error(k, c, 405, NULL, "%s takes %s, not %s", url,
                              k->route == R_CHAT || k->route == R_COMPLETIONS ? "POST" : "GET", method);
        }
        /* the page and the health check are open: the page asks for the key itself */
        if (k->route != R_PAGE && k->route != R_HEALTH && !authorized(s, c))
            return send_error(k, c, 401, NULL, "a missing or wrong API key: send 'Authorization: Bearer KEY'");
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > (unsigned long long)s->o.max_body)
            return send_error(k, c, 413, NULL, "the body of %s bytes is over the limit of %lld", cl,
                              (long long)s->o.max_body);
        if (k->route == R_CHAT || k->route == R_COMPLETIONS) return MHD_YES; /* the body next */
    }
    if (k->answered) { /* a body after an answer: dropped */
        *upload_size = 0;
        return MHD_YES;
    }
    if (*upload_size) { /* a chunked body is checked as it comes: never more than max_body is kept */
        if (!k->too_large && k->len + *upload_size > (size_t)s->o.max_body) {
            k->too_large = 1;
            free(k->body);
            k->body = NULL;
        }
        if (!k->too_large) {
            char *b = realloc(k->body, k->len + *upload_size + 1);
            if (!b) return MHD_NO;
            memcpy(b + k->len, upload, *upload_size);
            k->body = b, k->len += *upload_size;
            b[k->len] = 0;
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (k->too_large)
        return send_error(k, c, 413, NULL, "the body is over the limit of %lld bytes", (long long)s->o.max_body);
    k->answered = 1;
    switch (k->route) {
    case R_HEALTH: {
        static const char ok[] = "{\"status\":\"ok\"}";
        return send_bytes(c, 200, "application/json", ok, sizeof ok - 1, 0);
    }
    case R_PAGE:
        if (!s->o.page) return send_error(k, c, 404, NULL, "this server has no web page");
        return send_bytes(c, 200, "text/html; charset=utf-8", s->o.page, s->o.page_len, 0);
    case R_MODELS: {
        cJSON *r = cJSON_CreateObject(), *m = cJSON_CreateObject();
        cJSON_AddStringToObject(r, "object", "list");
        cJSON_AddStringToObject(m, "id", s->o.model_id);
        cJSON_AddStringToObject(m, "object", "model");
        cJSON_AddNumberToObject(m, "created", 0);
        cJSON_AddStringToObject(m, "owned_by", "jetmoe");
        cJSON_AddItemToArray(cJSON_AddArrayToObject(r, "data"), m);
        return send_json(c, 200, r);
    }
    default:
        return serve_completion(s, k, c);
    }
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    server *s = cls;
    pthread_mutex_lock(&s->mu);
    vsnprintf(s->mhd_msg, sizeof s->mhd_msg, fmt, ap);
    size_t n = strlen(s->mhd_msg);
    while (n && (s->mhd_msg[n - 1] == '\n' || s->mhd_msg[n - 1] == '.')) s->mhd_msg[--n] = 0;
    pthread_mutex_unlock(&s->mu);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

jm_status jm_serve(jm_model *m, const jm_tokenizer *t, const jm_server_opts *opts, jm_error *err)
{
    server *s = calloc(1, sizeof *s);
    if (!s) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    s->m = m, s->t = t, s->o = *opts;
    jm_server_opts *o = &s->o;
    if (!o->host) o->host = "127.0.0.1";
    if (!o->parallel) o->parallel = 4;
    if (!o->queue) o->queue = 64;
    if (!o->max_body) o->max_body = 1 << 20;
    if (!o->grace_ms) o->grace_ms = 10000;
    if (!o->model_id) o->model_id = "jetmoe";
    s->ctx = o->ctx ? o->ctx : jm_model_config(m)->max_position_embeddings;
    jm_status st = JM_OK;
    if (o->parallel < 1 || o->queue < 1 || o->max_body < 1 || o->port < 0 || o->port > 65535)
        st = jm_fail(err, JM_ERR_ARG, "server options out of range (parallel %d, queue %d, max_body %lld, port %d)",
                     o->parallel, o->queue, (long long)o->max_body, o->port);
    if (!st && jm_tokenizer_vocab_size(t) != jm_model_config(m)->vocab_size)
        st = jm_fail(err, JM_ERR_ARG, "the tokenizer has %d pieces but the model's vocab_size is %d",
                     jm_tokenizer_vocab_size(t), jm_model_config(m)->vocab_size);
    if (!st) st = jm_set_slots(m, o->parallel, s->ctx, err);
    if (!st) st = jm_batcher_new(m, &s->b, err);
    if (!st && !(s->slot = calloc((size_t)o->parallel, sizeof *s->slot))) st = jm_fail(err, JM_ERR_NOMEM, "out of memory");
    if (st) {
        jm_batcher_free(s->b);
        free(s);
        return st;
    }
    if (getrandom(&s->id_salt, sizeof s->id_salt, 0) != (ssize_t)sizeof s->id_salt) s->id_salt = (uint64_t)time(NULL);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->work, NULL);

    /* the address: a numeric IPv4/IPv6 address or a name, its first result */
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    char port[16];
    snprintf(port, sizeof port, "%d", o->port);
    int gai = getaddrinfo(o->host, port, &hints, &ai);
    struct MHD_Daemon *d = NULL;
    pthread_t decoder;
    int decoding = 0;
    if (gai) {
        st = jm_fail(err, JM_ERR_ARG, "cannot resolve host '%s': %s", o->host, gai_strerror(gai));
        goto out;
    }
    if (pthread_create(&decoder, NULL, decode_main, s)) {
        st = jm_fail(err, JM_ERR_NOMEM, "cannot start the decode thread");
        goto out;
    }
    decoding = 1;
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ITC |
                     MHD_USE_ERROR_LOG | (ai->ai_family == AF_INET6 ? MHD_USE_IPv6 : 0);
    d = MHD_start_daemon(flags, (uint16_t)o->port, NULL, NULL, handle, s,
                         MHD_OPTION_SOCK_ADDR, ai->ai_addr,
                         MHD_OPTION_EXTERNAL_LOGGER, mhd_log, s,
                         MHD_OPTION_NOTIFY_COMPLETED, request_done, s,
                         /* room for every slot, a full queue and some refusals (503) beyond */
                         MHD_OPTION_CONNECTION_LIMIT, (unsigned)(o->parallel + o->queue + 64),
                         MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120, MHD_OPTION_END);
    if (!d) {
        st = jm_fail(err, JM_ERR_IO, "cannot listen on %s port %d%s%s", o->host, o->port, s->mhd_msg[0] ? ": " : "",
                     s->mhd_msg);
        goto out;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    if (o->on_listen) o->on_listen(o->cb_ctx, o->host, di ? di->port : o->port);
    while (!(o->should_stop && o->should_stop(o->cb_ctx))) usleep(WAIT_MS * 1000);

    /* shutdown: no new connections, no new requests on open ones; those in
     * flight have grace_ms to finish, then are cancelled */
    MHD_socket lfd = MHD_quiesce_daemon(d);
    if (lfd != MHD_INVALID_SOCKET) close(lfd);
    const double deadline = now_s() + o->grace_ms / 1000.0;
    pthread_mutex_lock(&s->mu);
    s->draining = 1;
    while (s->inflight > 0 && now_s() < deadline) {
        pthread_mutex_unlock(&s->mu);
        usleep(20 * 1000);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
out:
    if (decoding) {
        pthread_mutex_lock(&s->mu);
        s->closing = 1;
        pthread_cond_signal(&s->work);
        pthread_mutex_unlock(&s->mu);
        pthread_join(decoder, NULL);
    }
    if (d) MHD_stop_daemon(d); /* joins the connection threads: their jobs have all ended */
    if (ai) freeaddrinfo(ai);
    jm_batcher_free(s->b);
    free(s->slot);
    pthread_cond_destroy(&s->work);
    pthread_mutex_destroy(&s->mu);
    free(s);
    return st;
}
