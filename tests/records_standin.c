/* records_standin.c — TEMPORARY test scaffolding, not part of the library.
 *
 * src/align/records.c (the records API of align.h) is being written on the
 * `records` branch. Until it is merged, the Makefile links this stand-in into
 * the CLI and the test programs (and only while src/align/records.c is
 * absent), so that `jetmoe distill` and its tests can run: the prompt reader
 * and jm_final_answer, as align.h describes them, in the fewest lines; the
 * SFT and preference readers only say they are missing (the tests that read
 * the outputs back report a skip). Delete this file once records.c is in. */
#include "align/align.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <string.h>

/* ---- jm_final_answer ---- */

static int digit(char c) { return c >= '0' && c <= '9'; }

const char *jm_final_answer(const char *text, char *buf, size_t cap)
{
    if (!text || !buf || !cap) return NULL;
    const char *from = NULL, *to = NULL;
    for (const char *p = strstr(text, "####"); p; p = strstr(p + 1, "####")) from = p + 4;
    if (from) {
        to = strchr(from, '\n');
        if (!to) to = from + strlen(from);
    } else {
        for (const char *p = text; *p;) { /* the last number: -?digits(,ddd)*(.digits)? */
            if (!digit(*p)) {
                p++;
                continue;
            }
            from = p > text && p[-1] == '-' ? p - 1 : p;
            while (digit(*p) || (*p == ',' && digit(p[1])) || (*p == '.' && digit(p[1]))) p++;
            to = p;
        }
        if (!from) return NULL;
    }
    size_t n = 0;
    for (const char *p = from; p < to; p++) {
        if (*p == ' ' || *p == '\t' || *p == '\r' || (*p == ',' && n && digit(buf[n - 1]) && digit(p[1]))) continue;
        if (n + 1 >= cap) return NULL;
        buf[n++] = *p;
    }
    while (n && buf[n - 1] == '.') n--;
    if (n > 2 && buf[n - 1] == '0' && buf[n - 2] == '.') n -= 2;
    buf[n] = 0;
    return n ? buf : NULL;
}

/* ---- jm_prompts_load ---- */

typedef struct {
    void **p;
    size_t n, cap;
} owned;

static void *keep(owned *o, void *p)
{
    if (!p) return NULL;
    if (o->n == o->cap) {
        size_t cap = o->cap ? 2 * o->cap : 64;
        void **q = realloc(o->p, cap * sizeof *q);
        if (!q) {
            free(p);
            return NULL;
        }
        o->p = q, o->cap = cap;
    }
    return o->p[o->n++] = p;
}

static jm_status bad(jm_error *err, const char *where, const char *why)
{
    return jm_fail(err, JM_ERR_FORMAT, "%s: %s", where, why);
}

/* One line -> a prompt record (strings kept in o), or a bad line. */
static jm_status one(const char *line, size_t len, const char *where, const jm_tokenizer *t, const jm_records_opts *ro,
                     owned *o, jm_prompt_record *r, jm_error *err)
{
    static const char *const roles[] = {"system", "user", "assistant"};
    cJSON *root = NULL;
    jm_status s = jm_json_parse(line, len, where, &root, err);
    if (!s) s = jm_json_no_nul(line, len, where, err);
    if (s) {
        cJSON_Delete(root);
        return s;
    }
    const cJSON *mj = cJSON_GetObjectItemCaseSensitive(root, "messages"),
                *pj = cJSON_GetObjectItemCaseSensitive(root, "prompt"),
                *aj = cJSON_GetObjectItemCaseSensitive(root, "answer");
    int n = cJSON_IsArray(mj) ? cJSON_GetArraySize(mj) : cJSON_IsString(pj) ? 1 : 0;
    r->msgs = n ? keep(o, calloc((size_t)n, sizeof *r->msgs)) : NULL;
    r->nmsgs = n;
    if (!cJSON_IsObject(root) || !n) s = bad(err, where, "no \"messages\" or \"prompt\": not a prompt record");
    else if (!r->msgs) s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", where);
    for (int i = 0; !s && i < n; i++) {
        const cJSON *m = cJSON_IsArray(mj) ? cJSON_GetArrayItem(mj, i) : NULL;
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role"), *c = cJSON_GetObjectItemCaseSensitive(m, "content");
        const char *text = m ? (cJSON_IsString(c) ? c->valuestring : NULL) : pj->valuestring;
        r->msgs[i].role = m ? NULL : "user";
        for (int k = 0; m && cJSON_IsString(role) && k < 3; k++)
            if (!strcmp(role->valuestring, roles[k])) r->msgs[i].role = roles[k];
        if (!r->msgs[i].role || !text) s = bad(err, where, "a message needs a known \"role\" and a \"content\" string");
        else if (!(r->msgs[i].content = keep(o, strdup(text)))) s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
    }
    if (!s && strcmp(r->msgs[n - 1].role, "user") != 0) s = bad(err, where, "a prompt ends with the user's turn");
    char num[64];
    r->answer = NULL;
    if (!s && cJSON_IsNumber(aj)) snprintf(num, sizeof num, "%.17g", aj->valuedouble);
    if (!s && (cJSON_IsString(aj) || cJSON_IsNumber(aj)) &&
        !(r->answer = keep(o, strdup(cJSON_IsString(aj) ? aj->valuestring : num))))
        s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
    int32_t *ids = NULL;
    size_t nids = 0;
    if (!s) s = jm_chat_encode(t, r->msgs, n, 1, &ids, &nids, err);
    free(ids);
    if (!s && nids >= (size_t)ro->max_len) s = bad(err, where, "the prompt leaves no room for an answer");
    cJSON_Delete(root);
    return s;
}

jm_status jm_prompts_load(const char *const *files, int nfiles, const jm_tokenizer *t, const jm_records_opts *ro,
                          jm_prompt_set *out, jm_records_stats *st, jm_error *err)
{
    memset(out, 0, sizeof *out);
    memset(st, 0, sizeof *st);
    owned *o = calloc(1, sizeof *o);
    int64_t cap = 0;
    jm_status s = o ? JM_OK : jm_fail(err, JM_ERR_NOMEM, "out of memory");
    for (int f = 0; f < nfiles && !s; f++) {
        FILE *fp = fopen(files[f], "rb");
        if (!fp) {
            s = jm_fail(err, JM_ERR_IO, "%s: cannot open", files[f]);
            break;
        }
        char *line = NULL, where[4200];
        size_t lcap = 0;
        ssize_t got;
        for (int64_t no = 1; !s && (got = getline(&line, &lcap, fp)) >= 0; no++) {
            size_t len = (size_t)got;
            while (len && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' ')) len--;
            if (!len) continue;
            st->lines++;
            snprintf(where, sizeof where, "%s:%lld", files[f], (long long)no);
            if (out->n == cap) {
                cap = cap ? 2 * cap : 64;
                jm_prompt_record *r = realloc(out->rec, (size_t)cap * sizeof *r);
                if (!r) {
                    s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
                    break;
                }
                out->rec = r;
            }
            jm_error e;
            jm_prompt_record *r = &out->rec[out->n];
            jm_status bs = one(line, len, where, t, ro, o, r, ro->skip_bad ? &e : err);
            if (bs && ro->skip_bad && bs != JM_ERR_NOMEM) {
                st->bad++;
                if (!ro->quiet) fprintf(stderr, "%s\n", e.msg);
            } else if (bs) {
                s = bs;
            } else {
                r->line = no, r->file = f;
                out->n++, st->used++;
            }
        }
        free(line);
        fclose(fp);
    }
    if (!s && !out->n) s = jm_fail(err, JM_ERR_FORMAT, "%s: no prompt example to use", files[0]);
    out->arena = o;
    if (s) jm_prompts_free(out);
    return s;
}

void jm_prompts_free(jm_prompt_set *s)
{
    owned *o = s->arena;
    for (size_t i = 0; o && i < o->n; i++) free(o->p[i]);
    if (o) free(o->p);
    free(o);
    free(s->rec);
    memset(s, 0, sizeof *s);
}

/* ---- the readers of the outputs: records.c's ---- */

static jm_status missing(jm_error *err)
{
    return jm_fail(err, JM_ERR_ARG, "records stand-in: jm_sft_load and jm_pref_load come with src/align/records.c");
}

jm_status jm_sft_load(const char *const *files, int nfiles, const jm_tokenizer *t, const jm_records_opts *o,
                      jm_sft_set *out, jm_records_stats *st, jm_error *err)
{
    (void)files, (void)nfiles, (void)t, (void)o, (void)st;
    memset(out, 0, sizeof *out);
    return missing(err);
}
void jm_sft_free(jm_sft_set *s) { (void)s; }

jm_status jm_pref_load(const char *const *files, int nfiles, const jm_tokenizer *t, const jm_records_opts *o,
                       jm_pref_set *out, jm_records_stats *st, jm_error *err)
{
    (void)files, (void)nfiles, (void)t, (void)o, (void)st;
    memset(out, 0, sizeof *out);
    return missing(err);
}
void jm_pref_free(jm_pref_set *s) { (void)s; }
