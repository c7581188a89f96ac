/* records.c — SFT, preference and prompt JSONL files -> token sequences with
 * loss masks (align.h).
 *
 * Each file is read a line at a time (getline: a file is never held whole);
 * a non-blank line is one JSON object, parsed strictly
 * (jm_json_parse) and refused when a string holds \u0000 (cJSON would cut it
 * short). A record either becomes an example, copied into the set's arena, or
 * is a bad line whose message begins "FILE:LINE:" and names the field. The
 * loaders differ only in what they make of one record (sft_record,
 * pref_record, prompt_record); reading, reporting and counting are shared
 * (load, read_file, one_line).
 *
 * Where the loss starts. A chat template renders a conversation to text and
 * jm_chat_encode tokenizes it; the ids of a prefix rendered with the
 * generation prompt ("...<|assistant|>\n") are usually a prefix of the ids of
 * the longer conversation, and then the reply's tokens start right after
 * them. When the tokenizer merged across that boundary (a piece "\nHe"), the
 * two differ at the end; the longest common prefix is then where the reply
 * starts, so the merged token is learned rather than lost. */
#include "align/align.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <string.h>

#define MAX_ITEMS (1 << 28) /* ids or messages in one record; a line that long is refused, not allocated */

/* ---- the arena: one per set, freed whole ---- */

typedef struct block {
    struct block *next;
    size_t used, cap;
    max_align_t data[];
} block;

typedef struct {
    block *head;
} arena;

#define BLOCK_BYTES ((size_t)1 << 20)

static void *arena_alloc(arena *a, size_t size);
static void arena_free(arena *a);

/* ---- the shared reader ---- */

typedef enum { SFT, PREF, PROMPTS } set_kind;

/* What the reader and the record functions share while one set loads. */
typedef struct {
    const jm_tokenizer *t;
    const jm_records_opts *o;
    jm_records_stats st;
    arena *a;
    char *items;        /* the examples so far (malloc'd, copied into the arena at the end) */
    size_t item_size;
    int64_t n, cap;
    const char *where;  /* "FILE:LINE" of the record being read */
    int file;
    int64_t line;
} loader;

typedef jm_status (*record_fn)(loader *L, const cJSON *root, jm_error *err);

static jm_status load(set_kind kind, const char *const *files, int nfiles, const jm_tokenizer *t,
                      const jm_records_opts *o, size_t item_size, record_fn fn, void **items, int64_t *n,
                      void **arena_out, jm_records_stats *st, jm_error *err);
static jm_status sft_record(loader *L, const cJSON *root, jm_error *err);
static jm_status pref_record(loader *L, const cJSON *root, jm_error *err);
static jm_status prompt_record(loader *L, const cJSON *root, jm_error *err);

/* ================================================================ public */

jm_status jm_sft_load(const char *const *files, int nfiles, const jm_tokenizer *t, const jm_records_opts *o,
                      jm_sft_set *out, jm_records_stats *st, jm_error *err)
{
    memset(out, 0, sizeof *out);
    void *items = NULL;
    jm_status s = load(SFT, files, nfiles, t, o, sizeof(jm_sft_example), sft_record, &items, &out->n, &out->arena,
                       st, err);
    out->ex = items;
    return s;
}

void jm_sft_free(jm_sft_set *s)
{
    if (!s) return;
    arena_free(s->arena);
    memset(s, 0, sizeof *s);
}

jm_status jm_pref_load(const char *const *files, int nfiles, const jm_tokenizer *t, const jm_records_opts *o,
                       jm_pref_set *out, jm_records_stats *st, jm_error *err)
{
    memset(out, 0, sizeof *out);
    void *items = NULL;
    jm_status s = load(PREF, files, nfiles, t, o, sizeof(jm_pref_example), pref_record, &items, &out->n,
                       &out->arena, st, err);
    out->ex = items;
    return s;
}

void jm_pref_free(jm_pref_set *s)
{
    if (!s) return;
    arena_free(s->arena);
    memset(s, 0, sizeof *s);
}

jm_status jm_prompts_load(const char *const *files, int nfiles, const jm_tokenizer *t, const jm_records_opts *o,
                          jm_prompt_set *out, jm_records_stats *st, jm_error *err)
{
    memset(out, 0, sizeof *out);
    if (st) memset(st, 0, sizeof *st);
    if (!t) return jm_fail(err, JM_ERR_ARG, "prompt records: a tokenizer is needed (max_len bounds the rendered prompt)");
    void *items = NULL;
    jm_status s = load(PROMPTS, files, nfiles, t, o, sizeof(jm_prompt_record), prompt_record, &items, &out->n,
                       &out->arena, st, err);
    out->rec = items;
    return s;
}

void jm_prompts_free(jm_prompt_set *s)
{
    if (!s) return;
    arena_free(s->arena);
    memset(s, 0, sizeof *s);
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static bool is_alnum(char c)
{
    return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* The last number of text: digits with an optional '-' (not after a letter or
 * digit: "x-5" and "3-5" end in "5"), thousands groups ",ddd", a fraction. */
static bool last_number(const char *text, const char **from, const char **to)
{
    bool found = false;
    for (const char *p = text; *p;) {
        if (!is_digit(*p)) {
            p++;
            continue;
        }
        const char *start = p;
        if (p > text && p[-1] == '-' && (p - 1 == text || !is_alnum(p[-2]))) start = p - 1;
        while (is_digit(*p)) p++;
        while (p[0] == ',' && is_digit(p[1]) && is_digit(p[2]) && is_digit(p[3]) && !is_digit(p[4])) p += 4;
        if (p[0] == '.' && is_digit(p[1]))
            for (p++; is_digit(*p);) p++;
        *from = start, *to = p, found = true;
    }
    return found;
}

const char *jm_final_answer(const char *text, char *buf, size_t cap)
{
    if (!text || !buf || cap == 0) return NULL;
    const char *mark = NULL, *from = NULL, *to = NULL;
    for (const char *p = strstr(text, "####"); p; p = strstr(p + 1, "####")) mark = p;
    if (mark) { /* GSM8K's "#### 72": the rest of that line */
        from = mark + 4;
        to = strchr(from, '\n');
        if (!to) to = from + strlen(from);
    } else if (!last_number(text, &from, &to)) {
        return NULL;
    }
    size_t n = 0;
    for (const char *p = from; p < to; p++) {
        if (is_space(*p)) continue;
        if (n + 1 >= cap) return NULL; /* does not fit: no answer rather than a cut one */
        buf[n++] = *p;
    }
    size_t k = 0; /* thousands commas: a comma between two digits */
    for (size_t i = 0; i < n; i++)
        if (!(buf[i] == ',' && i > 0 && i + 1 < n && is_digit(buf[i - 1]) && is_digit(buf[i + 1]))) buf[k++] = buf[i];
    while (k > 0 && buf[k - 1] == '.') k--;
    size_t z = k; /* a ".0", ".00" ... fraction after a digit */
    while (z > 0 && buf[z - 1] == '0') z--;
    if (z < k && z >= 2 && buf[z - 1] == '.' && is_digit(buf[z - 2])) k = z - 1;
    buf[k] = 0;
    return k ? buf : NULL;
}

/* ============================================================ the reader */

static bool fatal(jm_status s)
{
    return s == JM_ERR_NOMEM || s == JM_ERR_IO;
}

static bool blank(const char *p, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r') return false;
    return true;
}

/* One line -> its JSON object: strict JSON, no \u0000, an object. */
static jm_status parse_line(const char *line, size_t len, const char *where, cJSON **root, jm_error *err)
{
    jm_status s = jm_json_parse(line, len, where, root, err);
    if (!s) s = jm_json_no_nul(line, len, where, err);
    if (!s && !cJSON_IsObject(*root))
        s = jm_fail(err, JM_ERR_FORMAT, "%s: a record is a JSON object, not %s", where,
                    cJSON_IsArray(*root) ? "an array" : "a single value");
    if (s) {
        cJSON_Delete(*root);
        *root = NULL;
    }
    return s;
}

/* One record, and what becomes of it: kept, dropped (fn counts it), or a bad
 * line - the error, or with skip_bad reported and counted. */
static jm_status one_line(loader *L, record_fn fn, const char *line, size_t len, jm_error *err)
{
    jm_error e = {{0}};
    jm_error *to = L->o->skip_bad ? &e : err;
    cJSON *root = NULL;
    jm_status s = parse_line(line, len, L->where, &root, to);
    if (!s) s = fn(L, root, to);
    cJSON_Delete(root);
    if (!s) return JM_OK;
    if (!L->o->skip_bad) return s;
    if (fatal(s)) return jm_fail(err, s, "%s", e.msg);
    L->st.bad++;
    if (!L->o->quiet) fprintf(stderr, "%s\n", e.msg);
    return JM_OK;
}

static jm_status read_file(loader *L, const char *path, record_fn fn, jm_error *err)
{
    FILE *f;
    jm_status s = jm_fopen_regular(path, &f, err);
    if (s) return s;
    char *where = malloc(strlen(path) + 32), *line = NULL;
    size_t cap = 0;
    if (!where) s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
    L->line = 0;
    L->where = where;
    while (!s) {
        errno = 0;
        ssize_t got = getline(&line, &cap, f);
        if (got < 0) {
            if (ferror(f) || errno == ENOMEM)
                s = jm_fail(err, errno == ENOMEM ? JM_ERR_NOMEM : JM_ERR_IO, "%s: line %" PRId64 ": %s", path,
                            L->line + 1, strerror(errno ? errno : EIO));
            break;
        }
        size_t len = (size_t)got;
        L->line++;
        if (len && line[len - 1] == '\n') len--;
        if (blank(line, len)) continue;
        L->st.lines++;
        sprintf(where, "%s:%" PRId64, path, L->line);
        s = one_line(L, fn, line, len, err);
    }
    free(line);
    free(where);
    L->where = NULL;
    fclose(f);
    return s;
}

static jm_status load(set_kind kind, const char *const *files, int nfiles, const jm_tokenizer *t,
                      const jm_records_opts *o, size_t item_size, record_fn fn, void **items, int64_t *n,
                      void **arena_out, jm_records_stats *st, jm_error *err)
{
    static const char *const what[] = {"SFT", "preference", "prompt"};
    if (st) memset(st, 0, sizeof *st);
    if (!o || !files || nfiles < 1)
        return jm_fail(err, JM_ERR_ARG, "%s records: %s", what[kind], o ? "no files" : "no options");
    if (o->vocab_size < 1 || o->max_len < 2)
        return jm_fail(err, JM_ERR_ARG, "%s records: vocab_size %d must be >= 1 and max_len %d >= 2", what[kind],
                       o->vocab_size, o->max_len);
    loader L = {.t = t, .o = o, .item_size = item_size};
    L.a = calloc(1, sizeof *L.a);
    jm_status s = L.a ? JM_OK : jm_fail(err, JM_ERR_NOMEM, "%s records: out of memory", what[kind]);
    for (int i = 0; i < nfiles && !s; i++) {
        L.file = i;
        s = files[i] ? read_file(&L, files[i], fn, err)
                     : jm_fail(err, JM_ERR_ARG, "%s records: file %d of %d is NULL", what[kind], i, nfiles);
    }
    if (!s && L.n == 0) {
        char several[32];
        snprintf(several, sizeof several, "%d files", nfiles);
        s = jm_fail(err, JM_ERR_FORMAT, "%s: no %s example to use (%" PRId64 " records: %" PRId64 " bad, %" PRId64
                    " longer than max_len %d)", nfiles > 1 ? several : files[0], what[kind], L.st.lines, L.st.bad,
                    L.st.too_long, o->max_len);
    }
    void *v = NULL;
    if (!s && !(v = arena_alloc(L.a, (size_t)L.n * item_size)))
        s = jm_fail(err, JM_ERR_NOMEM, "%s records: out of memory for %" PRId64 " examples", what[kind], L.n);
    if (!s) {
        memcpy(v, L.items, (size_t)L.n * item_size);
        *items = v;
        *n = L.n;
        *arena_out = L.a;
    } else {
        arena_free(L.a);
    }
    free(L.items);
    if (st) *st = L.st;
    return s;
}

/* Room for one more example at the end of L->items (zeroed); NULL out of memory. */
static void *push_item(loader *L)
{
    if (L->n == L->cap) {
        int64_t cap = L->cap ? 2 * L->cap : 256;
        char *p = (size_t)cap <= SIZE_MAX / L->item_size ? realloc(L->items, (size_t)cap * L->item_size) : NULL;
        if (!p) return NULL;
        L->items = p, L->cap = cap;
    }
    void *it = L->items + (size_t)L->n++ * L->item_size;
    memset(it, 0, L->item_size);
    return it;
}

/* A copy of n ids in the arena. */
static int32_t *arena_ids(loader *L, const int32_t *ids, int n)
{
    int32_t *p = arena_alloc(L->a, (size_t)n * sizeof *p);
    if (p) memcpy(p, ids, (size_t)n * sizeof *p);
    return p;
}

/* ========================================================= record fields */



static const cJSON *field(const cJSON *obj, const char *key)
{
    return cJSON_GetObjectItemCaseSensitive(obj, key);
}

/* Items of a JSON array, or -1 past MAX_ITEMS. */
static int count_items(const cJSON *arr)
{
    int n = 0;
    for (const cJSON *c = arr->child; c; c = c->next)
        if (++n > MAX_ITEMS) return -1;
    return n;
}

/* A list of token ids: whole numbers in [0, vocab), or -100 where allow_ignore
 * (HF's "no loss", read as -1). *ids is malloc'd. */
static jm_status read_ids(const cJSON *arr, const char *name, const loader *L, bool allow_ignore, int32_t **ids,
                          int *n, jm_error *err)
{
    char got[64];
    *ids = NULL, *n = 0;
    if (!cJSON_IsArray(arr))
        return jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\" is %s: expected a list of token ids", name, jm_json_describe(arr, got, sizeof got));
    int k = count_items(arr);
    if (k < 0) return jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\" holds more than %d ids", name, MAX_ITEMS);
    int32_t *v = malloc((size_t)(k ? k : 1) * sizeof *v);
    if (!v) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory for %d ids", L->where, k);
    int i = 0;
    for (const cJSON *c = arr->child; c; c = c->next, i++) {
        double d = c->valuedouble;
        bool whole = cJSON_IsNumber(c) && isfinite(d) && d == floor(d);
        if (whole && allow_ignore && d == -100) {
            v[i] = -1;
        } else if (whole && d >= 0 && d < L->o->vocab_size) {
            v[i] = (int32_t)d;
        } else {
            free(v);
            return jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\"[%d] is %s: expected a token id in [0, %d)%s", name, i,
                       jm_json_describe(c, got, sizeof got), L->o->vocab_size, allow_ignore ? " or -100" : "");
        }
    }
    *ids = v, *n = k;
    return JM_OK;
}

static const char *const roles[] = {"system", "user", "assistant"};

/* A list of chat messages (name: its field, for messages) -> *msgs (malloc'd,
 * the strings pointing into the tree). Every message needs a known role and a
 * string content; the list may not be empty. */
static jm_status read_messages(const cJSON *arr, const char *name, const loader *L, jm_chat_message **msgs, int *n,
                               jm_error *err)
{
    char got[64];
    *msgs = NULL, *n = 0;
    if (!cJSON_IsArray(arr))
        return jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\" is %s: expected a list of messages", name, jm_json_describe(arr, got, sizeof got));
    int k = count_items(arr);
    if (k == 0) return jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\" is an empty list: expected messages", name);
    if (k < 0) return jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\" holds more than %d messages", name, MAX_ITEMS);
    jm_chat_message *m = malloc((size_t)k * sizeof *m);
    if (!m) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory for %d messages", L->where, k);
    jm_status s = JM_OK;
    int i = 0;
    for (const cJSON *c = arr->child; c && !s; c = c->next, i++) {
        const cJSON *role = cJSON_IsObject(c) ? field(c, "role") : NULL, *content = role ? field(c, "content") : NULL;
        const char *r = NULL;
        for (int j = 0; j < 3 && cJSON_IsString(role); j++)
            if (strcmp(role->valuestring, roles[j]) == 0) r = roles[j];
        if (!cJSON_IsObject(c))
            s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\"[%d] is %s: expected a message {\"role\": ..., \"content\": ...}", name, i,
                    jm_json_describe(c, got, sizeof got));
        else if (!r)
            s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\"[%d].role is %s: expected system, user or assistant", name, i,
                    jm_json_describe(role, got, sizeof got));
        else if (!cJSON_IsString(content))
            s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\"[%d].content is %s: expected a string", name, i,
                    jm_json_describe(content, got, sizeof got));
        else
            m[i] = (jm_chat_message){r, content->valuestring};
    }
    if (s) free(m);
    else *msgs = m, *n = k;
    return s;
}

static jm_status need_tokenizer(const loader *L, const char *field_name, jm_error *err)
{
    if (L->t) return JM_OK;
    return jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\" is text, and text records need a tokenizer (none was given)", field_name);
}

/* jm_chat_encode for this record: its errors are bad lines (running out of
 * memory aside), and every id must fit the model. */
static jm_status encode(const loader *L, const jm_chat_message *m, int n, int gen, int32_t **ids, size_t *nids,
                        jm_error *err)
{
    jm_status s = jm_chat_encode(L->t, m, n, gen, ids, nids, err);
    if (s) {
        char inner[sizeof err->msg];
        snprintf(inner, sizeof inner, "%s", err->msg);
        return jm_fail(err, s == JM_ERR_NOMEM ? s : JM_ERR_FORMAT, "%s: %s", L->where, inner);
    }
    if (*nids > (size_t)MAX_ITEMS) s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "the conversation is more than %d tokens", MAX_ITEMS);
    for (size_t i = 0; !s && i < *nids; i++)
        if ((*ids)[i] < 0 || (*ids)[i] >= L->o->vocab_size)
            s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "the tokenizer gave id %" PRId32 " (token %zu), outside the model's vocabulary "
                    "[0, %d)", (*ids)[i], i, L->o->vocab_size);
    if (s) {
        free(*ids);
        *ids = NULL, *nids = 0;
    }
    return s;
}

static size_t common_prefix(const int32_t *a, size_t na, const int32_t *b, size_t nb)
{
    size_t i = 0;
    while (i < na && i < nb && a[i] == b[i]) i++;
    return i;
}

/* The end of the text that starts at `from` in ids[0, n): just past the first EOS at or after it, else n. */
static size_t through_eos(const loader *L, const int32_t *ids, size_t from, size_t n)
{
    int eos = jm_tokenizer_eos_id(L->t);
    for (size_t i = from; i < n; i++)
        if (ids[i] == eos) return i + 1;
    return n;
}

static jm_status no_room(jm_error *err, const loader *L, int64_t n_prompt)
{
    return jm_fail_at(err, JM_ERR_FORMAT, L->where, "the prompt (%" PRId64 " tokens) leaves no room in max_len %d", n_prompt,
               L->o->max_len);
}

/* ================================================================= SFT */

/* A conversation -> its ids and labels: each assistant turn learned from
 * where its text starts through its EOS (the file comment says how the start
 * is found). Turns that start at or past max_len would be cut away whole and
 * are not encoded; *prompt gets where the first assistant turn starts. */
static jm_status sft_chat(const loader *L, const jm_chat_message *m, int nm, int32_t **ids_out,
                          int32_t **labels_out, int *n_out, int64_t *prompt, jm_error *err)
{
    int32_t *ids = NULL, *labels = NULL, *p = NULL, *c = NULL;
    size_t n = 0, np = 0, nc = 0;
    int turns = 0;
    *prompt = -1;
    for (int i = 0; i < nm; i++) {
        if (strcmp(m[i].role, "assistant") != 0) continue;
        if (!m[i].content[0])
            return jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"messages\"[%d].content is empty: an assistant turn must say something", i);
        turns++;
    }
    if (!turns) return jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"messages\" has no assistant turn: nothing to learn");
    jm_status s = encode(L, m, nm, 0, &ids, &n, err);
    if (!s && !(labels = malloc((n ? n : 1) * sizeof *labels)))
        s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory for %zu labels", L->where, n);
    for (size_t t = 0; !s && t < n; t++) labels[t] = -1;
    for (int i = 0; i < nm && !s; i++) {
        if (strcmp(m[i].role, "assistant") != 0) continue;
        /* the conversation through turn i; the last turn's is the whole */
        bool last = i + 1 == nm;
        s = encode(L, m, i, 1, &p, &np, err);
        if (!s && !last) s = encode(L, m, i + 1, 0, &c, &nc, err);
        if (s) break;
        size_t start = last ? common_prefix(p, np, ids, n) : common_prefix(p, np, c, nc);
        size_t turn_end = last || nc > n ? n : nc;
        free(p), free(c);
        p = c = NULL;
        if (*prompt < 0) *prompt = (int64_t)start;
        if (start >= (size_t)L->o->max_len) break;
        size_t end = through_eos(L, ids, start, turn_end);
        for (size_t t = start; t < end; t++) labels[t] = ids[t];
    }
    free(p), free(c);
    if (s) {
        free(ids), free(labels);
        return s;
    }
    *ids_out = ids, *labels_out = labels, *n_out = (int)n;
    return JM_OK;
}

/* {"input_ids": [...], "labels": [...]} -> ids and labels (labels absent: every token). */
static jm_status sft_tokens(const loader *L, const cJSON *root, int32_t **ids_out, int32_t **labels_out,
                            int *n_out, jm_error *err)
{
    int32_t *ids = NULL, *labels = NULL;
    int n = 0, nl = 0;
    const cJSON *lj = field(root, "labels");
    jm_status s = read_ids(field(root, "input_ids"), "input_ids", L, false, &ids, &n, err);
    if (!s && n == 0) s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"input_ids\" is empty");
    if (!s && lj) s = read_ids(lj, "labels", L, true, &labels, &nl, err);
    if (!s && lj && nl != n)
        s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"labels\" has %d entries and \"input_ids\" %d: they must align", nl, n);
    if (!s && !lj) {
        if ((labels = malloc((size_t)n * sizeof *labels))) memcpy(labels, ids, (size_t)n * sizeof *labels);
        else s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory for %d labels", L->where, n);
    }
    if (s) {
        free(ids), free(labels);
        return s;
    }
    *ids_out = ids, *labels_out = labels, *n_out = n;
    return JM_OK;
}

static jm_status sft_record(loader *L, const cJSON *root, jm_error *err)
{
    const cJSON *mj = field(root, "messages"), *ij = field(root, "input_ids");
    if (mj && ij) return jm_fail_at(err, JM_ERR_FORMAT, L->where, "both \"messages\" and \"input_ids\": a record is one or the other");
    if (!mj && !ij)
        return jm_fail_at(err, JM_ERR_FORMAT, L->where, "no \"messages\" or \"input_ids\": an SFT record is a conversation or token ids");
    int32_t *ids = NULL, *labels = NULL;
    int n = 0;
    int64_t prompt = -1;
    jm_status s;
    if (mj) {
        jm_chat_message *m = NULL;
        int nm = 0;
        s = need_tokenizer(L, "messages", err);
        if (!s) s = read_messages(mj, "messages", L, &m, &nm, err);
        if (!s) s = sft_chat(L, m, nm, &ids, &labels, &n, &prompt, err);
        free(m);
    } else {
        s = sft_tokens(L, root, &ids, &labels, &n, err);
    }
    if (s) return s;

    labels[0] = -1; /* nothing comes before the first token to predict it from */
    int first = -1, max_len = L->o->max_len;
    for (int t = 1; t < n && first < 0; t++)
        if (labels[t] >= 0) first = t;
    if (first < 0 && prompt >= max_len) first = (int)prompt;
    if (first < 0) s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "no token to learn (no label after the first token)");
    else if (first >= max_len) s = no_room(err, L, first);
    bool cut = !s && n > max_len;
    if (cut && !L->o->truncate) {
        L->st.too_long++;
    } else if (!s) {
        if (cut) n = max_len;
        jm_sft_example *ex = push_item(L);
        if (ex && (ex->ids = arena_ids(L, ids, n)) && (ex->labels = arena_ids(L, labels, n))) {
            ex->n = n;
            int64_t learned = 0;
            for (int t = 0; t < n; t++) learned += labels[t] >= 0;
            L->st.used++, L->st.truncated += cut, L->st.tokens += n, L->st.loss_tokens += learned;
        } else {
            if (ex) L->n--;
            s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", L->where);
        }
    }
    free(ids), free(labels);
    return s;
}

/* ========================================================== preference */

/* One side of a pair as ids: the prompt, then the completion. */
typedef struct {
    int32_t *ids; /* malloc'd */
    int n, n_prompt;
} side_ids;

/* Two message lists hold the same messages. */
static bool same_messages(const jm_chat_message *a, int na, const jm_chat_message *b, int nb)
{
    if (na != nb) return false;
    for (int i = 0; i < na; i++)
        if (strcmp(a[i].role, b[i].role) || strcmp(a[i].content, b[i].content)) return false;
    return true;
}

/* A side's conversation: the prompt's messages, then the assistant's answer
 * (*conv malloc'd, its strings in the tree; *np = the prompt's messages). j is
 * the answer, or the conversation ending in it. prompt/nprompt is the record's
 * "prompt" (NULL when absent); messages before the answer must agree with it. */
static jm_status side_conversation(const loader *L, const cJSON *j, const char *name, const jm_chat_message *prompt,
                                   int nprompt, jm_chat_message **conv, int *np, jm_error *err)
{
    char got[64];
    *conv = NULL, *np = 0;
    jm_chat_message *list = NULL;
    const jm_chat_message *before = prompt;
    int n = 0, nbefore = nprompt;
    const char *answer = NULL;
    jm_status s = JM_OK;
    if (cJSON_IsString(j)) {
        answer = j->valuestring;
    } else if (!cJSON_IsArray(j)) {
        s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\" is %s: expected the answer (a string) or the conversation (messages)", name,
                jm_json_describe(j, got, sizeof got));
    } else if (!(s = read_messages(j, name, L, &list, &n, err))) {
        answer = list[n - 1].content;
        if (strcmp(list[n - 1].role, "assistant") != 0)
            s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\"[%d].role is \"%s\": the last message must be the assistant's answer",
                    name, n - 1, list[n - 1].role);
        else if (n > 1 && prompt && !same_messages(list, n - 1, prompt, nprompt))
            s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\": the messages before the answer differ from \"prompt\"", name);
        else if (n > 1)
            before = list, nbefore = n - 1;
    }
    if (!s && !before)
        s = cJSON_IsString(j) ? jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\" is a string, so a \"prompt\" is needed", name)
                              : jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\": no prompt before the answer, and no \"prompt\"", name);
    else if (!s && !answer[0]) s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\": the answer is empty", name);
    jm_chat_message *c = s ? NULL : malloc((size_t)(nbefore + 1) * sizeof *c);
    if (!s && !c) s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", L->where);
    if (!s) {
        memcpy(c, before, (size_t)nbefore * sizeof *c);
        c[nbefore] = (jm_chat_message){"assistant", answer};
        *conv = c, *np = nbefore;
    }
    free(list);
    return s;
}

/* A text side: the prompt's ids with the generation prompt, the whole
 * conversation's ids, and the completion from where the two part through its EOS. */
static jm_status side_text(const loader *L, const char *name, const jm_chat_message *conv, int np, side_ids *out,
                           jm_error *err)
{
    int32_t *p = NULL, *full = NULL;
    size_t n_p = 0, n = 0;
    jm_status s = encode(L, conv, np, 1, &p, &n_p, err);
    if (!s) s = encode(L, conv, np + 1, 0, &full, &n, err);
    size_t n_prompt = s ? 0 : common_prefix(p, n_p, full, n);
    size_t end = s ? 0 : through_eos(L, full, n_prompt, n);
    free(p);
    if (!s && n_prompt == 0) s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\": the prompt renders to no tokens", name);
    else if (!s && end == n_prompt) s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\": the completion renders to no tokens", name);
    if (s) {
        free(full);
        return s;
    }
    *out = (side_ids){full, (int)end, (int)n_prompt};
    return JM_OK;
}

/* The text layout: "prompt" (optional with message lists), "chosen", "rejected". */
static jm_status pref_text(const loader *L, const cJSON *root, side_ids sides[2], jm_error *err)
{
    static const char *const names[2] = {"chosen", "rejected"};
    const cJSON *pj = field(root, "prompt");
    jm_chat_message one, *prompt = NULL, *conv[2] = {NULL, NULL};
    int nprompt = 0, np[2] = {0, 0};
    char got[64];
    jm_status s = need_tokenizer(L, "chosen", err);
    if (!s && cJSON_IsString(pj)) {
        if (!pj->valuestring[0]) s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"prompt\" is empty");
        one = (jm_chat_message){"user", pj->valuestring};
        prompt = &one, nprompt = 1;
    } else if (!s && cJSON_IsArray(pj)) {
        s = read_messages(pj, "prompt", L, &prompt, &nprompt, err);
    } else if (!s && pj) {
        s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"prompt\" is %s: expected a string or a list of messages",
                jm_json_describe(pj, got, sizeof got));
    }
    for (int k = 0; k < 2 && !s; k++) {
        const cJSON *j = field(root, names[k]);
        if (!j) s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\" is missing", names[k]);
        else s = side_conversation(L, j, names[k], prompt, nprompt, &conv[k], &np[k], err);
    }
    if (!s && !pj && !same_messages(conv[0], np[0], conv[1], np[1]))
        s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"chosen\" and \"rejected\" have different messages before the answer");
    for (int k = 0; k < 2 && !s; k++) s = side_text(L, names[k], conv[k], np[k], &sides[k], err);
    if (prompt != &one) free(prompt);
    free(conv[0]), free(conv[1]);
    return s;
}

/* TRL's layout: prompt_input_ids, chosen_input_ids, rejected_input_ids. */
static jm_status pref_tokens(const loader *L, const cJSON *root, side_ids sides[2], jm_error *err)
{
    static const char *const names[3] = {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"};
    int32_t *v[3] = {NULL, NULL, NULL};
    int n[3] = {0, 0, 0};
    jm_status s = JM_OK;
    for (int k = 0; k < 3 && !s; k++) {
        s = read_ids(field(root, names[k]), names[k], L, false, &v[k], &n[k], err);
        if (!s && n[k] == 0) s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\" is empty", names[k]);
        if (!s && (int64_t)n[0] + n[k] > MAX_ITEMS) s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\" is too long", names[k]);
    }
    for (int k = 1; k < 3 && !s; k++) {
        int32_t *ids = malloc((size_t)(n[0] + n[k]) * sizeof *ids);
        if (!ids) {
            s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", L->where);
            break;
        }
        memcpy(ids, v[0], (size_t)n[0] * sizeof *ids);
        memcpy(ids + n[0], v[k], (size_t)n[k] * sizeof *ids);
        sides[k - 1] = (side_ids){ids, n[0] + n[k], n[0]};
    }
    for (int k = 0; k < 3; k++) free(v[k]);
    return s;
}

static jm_status pref_record(loader *L, const cJSON *root, jm_error *err)
{
    bool text = field(root, "chosen") || field(root, "rejected");
    bool tokens = field(root, "prompt_input_ids") || field(root, "chosen_input_ids") ||
                  field(root, "rejected_input_ids");
    if (text && tokens)
        return jm_fail_at(err, JM_ERR_FORMAT, L->where, "both \"chosen\"/\"rejected\" and \"*_input_ids\": a record is one or the other");
    if (!text && !tokens)
        return jm_fail_at(err, JM_ERR_FORMAT, L->where, "no \"chosen\" and \"rejected\" (or \"chosen_input_ids\" and "
                   "\"rejected_input_ids\"): not a preference record");
    side_ids sides[2] = {{0}};
    jm_status s = text ? pref_text(L, root, sides, err) : pref_tokens(L, root, sides, err);
    int max_len = L->o->max_len;
    bool cut = false;
    for (int k = 0; k < 2 && !s; k++) {
        if (sides[k].n_prompt >= max_len) s = no_room(err, L, sides[k].n_prompt);
        cut |= sides[k].n > max_len;
    }
    if (!s && cut && !L->o->truncate) {
        L->st.too_long++;
    } else if (!s) {
        jm_pref_example *ex = push_item(L);
        jm_pref_seq *seq[2] = {ex ? &ex->chosen : NULL, ex ? &ex->rejected : NULL};
        for (int k = 0; k < 2 && ex && !s; k++) {
            int n = sides[k].n < max_len ? sides[k].n : max_len;
            *seq[k] = (jm_pref_seq){arena_ids(L, sides[k].ids, n), n, sides[k].n_prompt};
            if (!seq[k]->ids) s = JM_ERR_NOMEM;
        }
        if (!ex || s) {
            if (ex) L->n--;
            s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", L->where);
        } else {
            L->st.used++, L->st.truncated += cut;
            for (int k = 0; k < 2; k++) L->st.tokens += seq[k]->n, L->st.loss_tokens += seq[k]->n - seq[k]->n_prompt;
        }
    }
    free(sides[0].ids), free(sides[1].ids);
    return s;
}

/* ============================================================= prompts */

static char *arena_str(loader *L, const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = arena_alloc(L->a, n);
    if (p) memcpy(p, s, n);
    return p;
}

/* "answer": a string as it is, a number as its shortest exact decimal. */
static jm_status read_answer(loader *L, const cJSON *j, const char **out, jm_error *err)
{
    char num[40], got[64];
    *out = NULL;
    if (!j || cJSON_IsNull(j)) return JM_OK;
    const char *s = NULL;
    if (cJSON_IsString(j)) {
        s = j->valuestring;
    } else if (cJSON_IsNumber(j) && isfinite(j->valuedouble)) {
        double d = j->valuedouble;
        if (d == floor(d) && fabs(d) < 9007199254740992.0) snprintf(num, sizeof num, "%.0f", d);
        else
            for (int digits = 15; digits <= 17; digits++) {
                snprintf(num, sizeof num, "%.*g", digits, d);
                if (strtod(num, NULL) == d) break;
            }
        s = num;
    } else {
        return jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"answer\" is %s: expected a string or a number", jm_json_describe(j, got, sizeof got));
    }
    if (!(*out = arena_str(L, s))) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", L->where);
    return JM_OK;
}

/* Keeps a prompt: its messages copied into the arena, with its answer. */
static jm_status keep_prompt(loader *L, const jm_chat_message *m, int nm, const cJSON *answer, jm_error *err)
{
    const char *a = NULL;
    jm_status s = read_answer(L, answer, &a, err);
    if (s) return s;
    jm_chat_message *msgs = arena_alloc(L->a, (size_t)nm * sizeof *msgs);
    for (int i = 0; i < nm && msgs; i++) {
        msgs[i].role = m[i].role; /* one of the static role names */
        if (!(msgs[i].content = arena_str(L, m[i].content))) msgs = NULL;
    }
    jm_prompt_record *r = msgs ? push_item(L) : NULL;
    if (!r) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", L->where);
    *r = (jm_prompt_record){msgs, nm, a, L->line, L->file};
    return JM_OK;
}

static jm_status prompt_record(loader *L, const cJSON *root, jm_error *err)
{
    const cJSON *mj = field(root, "messages"), *pj = field(root, "prompt");
    if (mj && pj) return jm_fail_at(err, JM_ERR_FORMAT, L->where, "both \"messages\" and \"prompt\": give one");
    if (!mj && !pj) return jm_fail_at(err, JM_ERR_FORMAT, L->where, "no \"messages\" or \"prompt\": not a prompt record");
    const char *name = mj ? "messages" : "prompt";
    jm_chat_message one, *m = NULL;
    int nm = 0;
    char got[64];
    jm_status s = JM_OK;
    if (cJSON_IsString(pj)) {
        if (!pj->valuestring[0]) s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"prompt\" is empty");
        one = (jm_chat_message){"user", pj->valuestring};
        m = &one, nm = 1;
    } else if (pj && !cJSON_IsArray(pj)) {
        s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"prompt\" is %s: expected a string or a list of messages",
                jm_json_describe(pj, got, sizeof got));
    } else if (!(s = read_messages(mj ? mj : pj, name, L, &m, &nm, err)) && strcmp(m[nm - 1].role, "user") != 0) {
        s = jm_fail_at(err, JM_ERR_FORMAT, L->where, "\"%s\"[%d].role is \"%s\": a prompt ends with the user's turn", name, nm - 1,
                m[nm - 1].role);
    }
    int32_t *ids = NULL;
    size_t n = 0;
    if (!s) s = encode(L, m, nm, 1, &ids, &n, err);
    free(ids);
    if (!s && n >= (size_t)L->o->max_len) s = no_room(err, L, (int64_t)n);
    if (!s) s = keep_prompt(L, m, nm, field(root, "answer"), err);
    if (!s) L->st.used++, L->st.tokens += (int64_t)n;
    if (m != &one) free(m);
    return s;
}

/* ================================================================ arena */

static void *arena_alloc(arena *a, size_t size)
{
    const size_t align = sizeof(max_align_t);
    size = size ? (size + align - 1) / align * align : align;
    if (size > SIZE_MAX / 2) return NULL;
    block *b = a->head;
    if (b && b->cap - b->used >= size) {
        void *p = (char *)b->data + b->used;
        b->used += size;
        return p;
    }
    size_t cap = size > BLOCK_BYTES ? size : BLOCK_BYTES;
    block *nb = malloc(sizeof *nb + cap);
    if (!nb) return NULL;
    nb->cap = cap, nb->used = size;
    if (b && size > BLOCK_BYTES) { /* a large piece gets its own block, behind the one being filled */
        nb->next = b->next;
        b->next = nb;
    } else {
        nb->next = b;
        a->head = nb;
    }
    return nb->data;
}

static void arena_free(arena *a)
{
    if (!a) return;
    for (block *b = a->head, *next; b; b = next) {
        next = b->next;
        free(b);
    }
    free(a);
}
