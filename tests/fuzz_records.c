/* fuzz_records.c — deterministic mutation fuzzer of the SFT, preference and
 * prompt record loaders (src/align/records.c).
 *
 * Each input is a small JSONL file: one to four lines drawn from valid records
 * of every kind (conversations, pre-tokenized ids and labels, both preference
 * layouts, prompts with answers), each mutated with fuzz.h's generic
 * mutations and the records' own tokens (roles, field names, -100, 3.5, 1e30,
 * \u0000, deep nesting), now and then a blank line, a CRLF or a very long
 * line. Every file goes through all three loaders with skip_bad, on the tiny
 * tokenizer (tests/records_fixture.h) and sometimes none, at a random max_len,
 * truncating or dropping. What must hold:
 *   - no crash, leak or undefined behaviour (the suite runs it under ASan+UBSan);
 *   - a load succeeds, or fails only because no example was left, with one line;
 *   - the counts add up (lines = used + too long + bad, used = examples), and
 *     tokens and loss tokens are what the examples hold;
 *   - every example keeps the set's promises: ids in [0, vocab), at most
 *     max_len; SFT labels -1 or an id, the first -1, at least one learned;
 *     preference 1 <= n_prompt < n; prompts end in a user turn;
 *   - the same file without skip_bad gives the same set when nothing was bad,
 *     else an error that begins "FILE:LINE: " with LINE one of its lines.
 *
 * Usage: fuzz_records [files [seed]]   (defaults: 4000, 0x5eedrec)
 * Prints "PASS <name> (...)" or "FAIL <name>: <why>" per check; exits 0 iff nothing failed. */
#include "fuzz.h"
#include "harness.h"
#include "records_fixture.h"

#include <inttypes.h>

#define MAX_LINE 65536

/* Valid records of every kind: the seeds the mutations start from. */
static const char *const seeds[] = {
    "{\"messages\": [{\"role\": \"system\", \"content\": \"be brief\"}, {\"role\": \"user\", \"content\": \"is it 42?\"}, "
    "{\"role\": \"assistant\", \"content\": \"yes, 42.\"}]}",
    "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"Sure\"}, "
    "{\"role\": \"user\", \"content\": \"again \\u00e9\\ud83d\\ude00\"}, {\"role\": \"assistant\", \"content\": "
    "\"a</s>b\"}]}",
    "{\"prompt\": \"q\", \"prompt_id\": \"x1\", \"messages\": [{\"role\": \"user\", \"content\": \"q\"}, "
    "{\"role\": \"assistant\", \"content\": \"r\\n\\tt\"}]}",
    "{\"input_ids\": [1, 40, 41, 42, 2], \"labels\": [-100, -100, 41, 42, 2]}",
    "{\"input_ids\": [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 2]}",
    "{\"prompt\": \"What is 2+2?\", \"chosen\": \"4\", \"rejected\": \"5, I think.\"}",
    "{\"chosen\": [{\"role\": \"user\", \"content\": \"Q\"}, {\"role\": \"assistant\", \"content\": \"good\"}], "
    "\"rejected\": [{\"role\": \"user\", \"content\": \"Q\"}, {\"role\": \"assistant\", \"content\": \"bad\"}]}",
    "{\"prompt\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"Q\"}], "
    "\"chosen\": \"Sure\", \"rejected\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", "
    "\"content\": \"Q\"}, {\"role\": \"assistant\", \"content\": \"no\"}]}",
    "{\"prompt_input_ids\": [1, 50, 51], \"chosen_input_ids\": [60, 61, 2], \"rejected_input_ids\": [70, 2]}",
    "{\"prompt\": \"Anna has 3 apples and buys 4. How many?\", \"answer\": \"3 + 4 = 7\\n#### 7\"}",
    "{\"messages\": [{\"role\": \"user\", \"content\": \"q2\"}], \"answer\": 1234}",
    "{\"prompt\": [{\"role\": \"user\", \"content\": \"q3\"}], \"answer\": 0.5}",
};

/* The records' own tokens, for fz_mutate. */
static const char *const record_tokens[] = {
    "\"role\"", "\"content\"", "\"messages\"", "\"input_ids\"", "\"labels\"", "\"prompt\"", "\"chosen\"",
    "\"rejected\"", "\"answer\"", "\"prompt_input_ids\"", "\"chosen_input_ids\"", "\"rejected_input_ids\"",
    "\"system\"", "\"user\"", "\"assistant\"", "\"bot\"", "\"tool\"", "\"\"", "\"</s>\"", "\"<s>\"", "\"S\"",
    "-100", "-1", "0", "354", "355", "3.5", "1e30", "-1e999", "2147483648", "NaN", "null", "true", "[]", "{}",
    "[[1]]", "\\u0000", "\\ud800", "\\u00e9", "\\n", "\"", "\\", "{", "}", "[", "]", ",", ":",
    "{\"role\": \"assistant\", \"content\": \"x\"}", "{\"role\": \"user\", \"content\": \"\"}",
};

typedef struct {
    long files, lines, kept, bad, too_long, truncated, empty_sets;
    int broken;
    char first[1200];
    fz_shapes shapes;
} tally;

static void broken(tally *ty, long it, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void broken(tally *ty, long it, const char *fmt, ...)
{
    if (ty->broken++) return;
    va_list ap;
    va_start(ap, fmt);
    int k = snprintf(ty->first, sizeof ty->first, "file %ld: ", it);
    vsnprintf(ty->first + k, sizeof ty->first - (size_t)k, fmt, ap);
    va_end(ap);
}

/* Values a record's field may be swapped for: every JSON type, edge ids, roles, messages. */
static const char *const values[] = {
    "-100", "-1", "0", "1", "2", "354", "355", "3.5", "1e30", "-1e30", "2147483648", "null", "true", "[]", "{}",
    "[[1]]", "[1, 2]", "[-100, 5]", "\"\"", "\"S\"", "\"bot\"", "\"user\"", "\"assistant\"", "\"system\"",
    "\"#### 7\"", "\"a\\u0000b\"", "{\"role\": \"assistant\", \"content\": \"x\"}",
    "{\"role\": \"user\", \"content\": \"q\"}", "[{\"role\": \"assistant\", \"content\": \"Sure\"}]",
};
static const char *const keys[] = {
    "role", "content", "messages", "input_ids", "labels", "prompt", "chosen", "rejected", "answer",
    "prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "text", "Role",
};

/* One change that keeps the record JSON, so the checks behind the parser are
 * reached: a value swapped, removed or doubled, a key renamed, a number moved. */
static void mutate_tree(uint64_t *r, cJSON *x, cJSON *p)
{
    switch (below(r, 5)) {
    case 0: { /* swapped for another value */
        cJSON *v = cJSON_Parse(values[below(r, FZ_COUNT(values))]);
        if (v && !cJSON_ReplaceItemViaPointer(p, x, v)) cJSON_Delete(v);
        break;
    }
    case 1: cJSON_Delete(cJSON_DetachItemViaPointer(p, x)); break;
    case 2: /* doubled: in a list the item again, in an object a duplicate key (the copy keeps its name) */
        cJSON_AddItemToArray(p, cJSON_Duplicate(x, 1));
        break;
    case 3: /* a key renamed */
        if (x->string) {
            char *k = strdup(keys[below(r, FZ_COUNT(keys))]);
            if (k) cJSON_free(x->string), x->string = k;
        }
        break;
    default: /* a number moved */
        if (cJSON_IsNumber(x)) cJSON_SetNumberValue(x, below(r, 2) ? x->valuedouble + 1 : -x->valuedouble);
    }
}

/* One line of the file: a seed, as it is or mutated; now and then something else. */
static void make_line(uint64_t *r, fz_bytes *line, fz_bytes *other)
{
    size_t pick = below(r, 40);
    if (pick == 0) { /* blank, or only spaces */
        fz_assign(line, "  \t", below(r, 4));
        return;
    }
    const char *s = seeds[below(r, FZ_COUNT(seeds))];
    fz_assign(line, s, strlen(s));
    if (pick == 1) { /* deep nesting where a value was */
        char deep[4100];
        size_t d = 1 + below(r, 2000);
        for (size_t i = 0; i < d; i++) deep[i] = '[', deep[d + i] = ']';
        const char *colon = memchr(line->p, ':', line->len);
        if (colon) fz_splice(line, (size_t)(colon - (const char *)line->p) + 1, 0, deep, 2 * d);
    } else if (pick == 2) { /* a very long content string or id list */
        fz_bytes fill = {0};
        const char *unit = below(r, 2) ? "abc " : "5, ";
        for (size_t i = 0, n = 1000 + below(r, 8000); i < n; i++) fz_splice(&fill, fill.len, 0, unit, strlen(unit));
        const char *at = memchr(line->p, below(r, 2) ? '[' : '"', line->len);
        if (at) fz_splice(line, (size_t)(at - (const char *)line->p) + 1, 0, fill.p, fill.len);
        free(fill.p);
    } else if (pick < 12) { /* kept as JSON */
        fz_mutate_json(r, line, 1 + (int)below(r, 3), mutate_tree);
    } else if (pick < 32) { /* bytes */
        const char *o = seeds[below(r, FZ_COUNT(seeds))];
        fz_assign(other, o, strlen(o));
        for (size_t k = 1 + below(r, 2); k > 0; k--) fz_mutate(r, line, other, record_tokens, FZ_COUNT(record_tokens));
    }
    /* one line stays one line: a newline a mutation put in becomes a space */
    for (size_t i = 0; i < line->len; i++)
        if (line->p[i] == '\n') line->p[i] = ' ';
    if (line->len > MAX_LINE) line->len = MAX_LINE;
}

/* The file's lines joined, each ended by "\n" (or "\r\n", or nothing on the last). */
static int make_file(uint64_t *r, const char *path)
{
    fz_bytes file = {0}, line = {0}, other = {0};
    int nlines = 1 + (int)below(r, 4);
    for (int i = 0; i < nlines; i++) {
        make_line(r, &line, &other);
        fz_splice(&file, file.len, 0, line.p, line.len);
        size_t end = below(r, 8);
        if (i + 1 < nlines || end > 1) fz_splice(&file, file.len, 0, end == 0 ? "\r\n" : "\n", end == 0 ? 2 : 1);
    }
    write_bytes(path, file.p, file.len);
    free(file.p), free(line.p), free(other.p);
    return nlines;
}

static bool ids_ok(const int32_t *ids, int n, int vocab)
{
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= vocab) return false;
    return true;
}

/* What is wrong with a loaded set (NULL: nothing): the promises of align.h. */
static const char *check_set(const any_set *a, const jm_records_opts *o, const jm_records_stats *st, int nlines)
{
    int64_t tokens = 0, loss = 0;
    if (st->lines != st->used + st->too_long + st->bad || st->used != any_size(a) || st->lines > nlines)
        return "the counts do not add up";
    if (a->kind == SET_SFT)
        for (int64_t i = 0; i < a->sft.n; i++) {
            const jm_sft_example *ex = &a->sft.ex[i];
            if (ex->n < 1 || ex->n > o->max_len || !ids_ok(ex->ids, ex->n, o->vocab_size)) return "SFT ids";
            if (ex->labels[0] != -1) return "SFT: the first token is labelled";
            int learned = 0;
            for (int t = 0; t < ex->n; t++) {
                if (ex->labels[t] < -1 || ex->labels[t] >= o->vocab_size) return "SFT label out of range";
                learned += ex->labels[t] >= 0;
            }
            if (!learned) return "SFT example with nothing to learn";
            tokens += ex->n, loss += learned;
        }
    if (a->kind == SET_PREF)
        for (int64_t i = 0; i < a->pref.n; i++) {
            const jm_pref_seq *sides[2] = {&a->pref.ex[i].chosen, &a->pref.ex[i].rejected};
            for (int k = 0; k < 2; k++) {
                const jm_pref_seq *q = sides[k];
                if (q->n_prompt < 1 || q->n <= q->n_prompt || q->n > o->max_len || !ids_ok(q->ids, q->n, o->vocab_size))
                    return "preference sequence";
                tokens += q->n, loss += q->n - q->n_prompt;
            }
        }
    if (a->kind == SET_PROMPTS)
        for (int64_t i = 0; i < a->prompts.n; i++) {
            const jm_prompt_record *p = &a->prompts.rec[i];
            if (p->nmsgs < 1 || strcmp(p->msgs[p->nmsgs - 1].role, "user") != 0 || p->file != 0 || p->line < 1 ||
                p->line > nlines)
                return "prompt record";
            for (int k = 0; k < p->nmsgs; k++)
                if (!p->msgs[k].content || !p->msgs[k].role) return "prompt message";
            tokens = st->tokens; /* what the renderings hold is checked by test_records */
        }
    if (st->tokens != tokens || st->loss_tokens != loss) return "tokens or loss tokens miscounted";
    return NULL;
}

/* An error message: one line, no control characters, starting with "path:". */
static bool one_line(const char *msg, const char *path)
{
    for (const char *p = msg; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f) return false;
    return strncmp(msg, path, strlen(path)) == 0 && msg[strlen(path)] == ':';
}

static void fuzz_file(tally *ty, long it, uint64_t *r, const char *path, const jm_tokenizer *tiny)
{
    int nlines = make_file(r, path);
    static const int lens[] = {2, 8, 24, 64, 4096};
    jm_records_opts o = {.max_len = lens[below(r, FZ_COUNT(lens))], .truncate = (int)below(r, 2), .skip_bad = 1,
                         .vocab_size = below(r, 8) ? TINY_VOCAB : 300, .quiet = 1};
    const jm_tokenizer *t = below(r, 6) ? tiny : NULL;
    ty->files++;
    for (set_kind kind = SET_SFT; kind <= SET_PROMPTS; kind++) {
        const jm_tokenizer *tk = kind == SET_PROMPTS ? tiny : t;
        any_set a = {.kind = kind}, b = {.kind = kind};
        jm_records_stats st, st2;
        jm_error err = {{0}}, err2 = {{0}};
        o.skip_bad = 1;
        jm_status s = any_load(&a, path, tk, &o, &st, &err);
        char empty[160];
        snprintf(empty, sizeof empty, "no %s example to use", set_kind_name[kind]);
        if (s && !(s == JM_ERR_FORMAT && strstr(err.msg, empty) && st.used == 0 && one_line(err.msg, path))) {
            broken(ty, it, "%s load with skip_bad: %s \"%.500s\"", set_kind_name[kind], jm_status_name(s), err.msg);
            continue;
        }
        if (s) ty->empty_sets++;
        const char *wrong = s ? NULL : check_set(&a, &o, &st, nlines);
        if (wrong) broken(ty, it, "%s set: %s", set_kind_name[kind], wrong);
        ty->lines += st.lines, ty->kept += st.used, ty->bad += st.bad, ty->too_long += st.too_long,
            ty->truncated += st.truncated;

        /* the same without skip_bad */
        o.skip_bad = 0;
        jm_status s2 = any_load(&b, path, tk, &o, &st2, &err2);
        if (st.bad == 0) {
            if (s2 != s || any_size(&b) != any_size(&a))
                broken(ty, it, "%s without skip_bad: %s (\"%.300s\"), with it %s", set_kind_name[kind],
                       jm_status_name(s2), err2.msg, jm_status_name(s));
        } else {
            long line = -1;
            if (s2 == JM_ERR_FORMAT && one_line(err2.msg, path))
                sscanf(err2.msg + strlen(path), ":%ld: ", &line);
            if (line < 1 || line > nlines)
                broken(ty, it, "%s bad line without skip_bad: %s \"%.500s\"", set_kind_name[kind], jm_status_name(s2),
                       err2.msg);
            else
                fz_shapes_add(&ty->shapes, strchr(err2.msg + strlen(path) + 1, ':') + 1, NULL);
        }
        any_free(&a), any_free(&b);
    }
}

int main(int argc, char **argv)
{
    long files = argc > 1 ? strtol(argv[1], NULL, 0) : 4000;
    uint64_t seed = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x5eedecull;
    uint64_t r = seed ? seed : 1;
    char dir[] = "/tmp/jm_fuzz_records_XXXXXX", path[64];
    temp_dir(dir);
    snprintf(path, sizeof path, "%s/fuzz.jsonl", dir);
    jm_tokenizer *tiny = tiny_tokenizer();

    /* the seeds themselves load, each kind in its own loader */
    jm_records_opts o = {.max_len = 4096, .truncate = 1, .vocab_size = TINY_VOCAB, .quiet = 1};
    int seeds_bad = -1;
    for (int i = 0; i < (int)FZ_COUNT(seeds) && seeds_bad < 0; i++) {
        write_text(path, seeds[i]);
        any_set a = {.kind = i < 5 ? SET_SFT : i < 9 ? SET_PREF : SET_PROMPTS};
        jm_records_stats st;
        jm_error err = {{0}};
        if (any_load(&a, path, tiny, &o, &st, &err) || any_size(&a) != 1) seeds_bad = i;
        any_free(&a);
    }
    if (!check(seeds_bad < 0, "fuzz_records_seeds", "seed %d does not load", seeds_bad)) return exit_status();

    static tally ty;
    double t0 = now();
    for (long it = 0; it < files; it++) fuzz_file(&ty, it, &r, path, tiny);
    double secs = now() - t0;
    if (ty.broken)
        check(false, "fuzz_records", "%d broken results; first: %s", ty.broken, ty.first);
    else if (ty.kept < files / 4 || ty.bad < files / 2 || ty.too_long + ty.truncated < files / 50 ||
             ty.empty_sets < files / 20)
        check(false, "fuzz_records", "%ld kept, %ld bad, %ld too long, %ld truncated, %ld empty sets of %ld files: "
              "the mutations do not reach every path", ty.kept, ty.bad, ty.too_long, ty.truncated, ty.empty_sets,
              files);
    else
        check_detail(true, "fuzz_records", "%ld files through 3 loaders in %.1f s: %ld records, %ld kept, %ld bad, "
                     "%ld too long, %ld truncated, %ld sets empty", files, secs, ty.lines, ty.kept, ty.bad,
                     ty.too_long, ty.truncated, ty.empty_sets);
    check_detail(ty.shapes.n >= 30, "fuzz_records_error_variety", "%d kinds of bad line reached", ty.shapes.n);
    if (getenv("JM_FUZZ_VERBOSE"))
        for (int k = 0; k < ty.shapes.n; k++) printf("  %s\n", ty.shapes.shape[k]);
    jm_tokenizer_free(tiny);
    temp_dir_done(dir);
    return exit_status();
}
