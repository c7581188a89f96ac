/* tasks.c — evaluation-task files (JSONL) read into examples rendered the way
 * lm-evaluation-harness v0.4 renders each data set (include/jetmoe.h:
 * evaluation tasks). eval.c scores them.
 *
 * A file is read a line at a time (no line over MAX_LINE); a non-blank line is
 * one strict JSON object (jm_json_parse). The first record's fields tell the
 * layout (layouts[], in the order tried) and every record must have it; a bad
 * record is an error "FILE:LINE: ..." naming the field, never skipped.
 *
 * The templates. Paths are under lm_eval/tasks/ of EleutherAI/
 * lm-evaluation-harness; the harness joins a context and a choice with the
 * task's target_delimiter, " " unless a YAML says otherwise (none of these
 * does), so choices[i] = " " + choice text, and choice_bytes counts the text
 * alone (process_results divides by len(choice) of the bare choice).
 *   mc           context, then choice, exactly as written (ours: no delimiter).
 *   gen          prompt; target " " + answer (the harness' default delimiter);
 *                stop "\n\n" (config/task.py: generation_kwargs "until"
 *                defaults to [fewshot_delimiter]); answer = the whole
 *                generation, trimmed (regex ^\s*(\S(.*\S)?)).
 *   arc          arc/arc_easy.yaml (arc_challenge.yaml includes it):
 *                "Question: {question}\nAnswer:", choices choices.text,
 *                gold choices.label.index(answerKey).
 *   hellaswag    hellaswag/hellaswag.yaml + utils.py: context
 *                preprocess(activity_label + ": " + ctx_a + " " +
 *                ctx_b.capitalize()), choices preprocess(ending), gold
 *                int(label); preprocess = strip, " [title]" -> ". ", drop
 *                "[...]" (regex \[.*?\], not across a newline), "  " -> " ".
 *   mmlu         mmlu/default/_default_template_yaml: "{question.strip()}\n
 *                A. {c0}\nB. {c1}\nC. {c2}\nD. {c3}\nAnswer:", choices
 *                "A".."D", gold answer; description (mmlu/_generate_configs.py)
 *                "The following are multiple choice questions (with answers)
 *                about {subject, '_' -> ' '}.\n\n", per example since one file
 *                may hold every subject.
 *   winogrande   winogrande/default.yaml + preprocess_winogrande.py (partial
 *                evaluation): contexts[i] = sentence up to the first "_" +
 *                option{i+1}; every choice is " " + the rest of the sentence
 *                after the "_", stripped; gold answer "1"/"2" - 1.
 *   piqa         piqa/piqa.yaml: "Question: {goal}\nAnswer:", choices sol1,
 *                sol2, gold label.
 *   truthfulqa_mc1  truthfulqa/truthfulqa_mc1.yaml: PRIMER (six Q/A pairs) +
 *                "\n\nQ: {question}\nA:", choices mc1_targets.choices, gold 0
 *                (the YAML's doc_to_target; a file whose labels[0] is not the
 *                true answer is refused rather than scored wrong).
 *   gsm8k        gsm8k/gsm8k.yaml: "Question: {question}\nAnswer:", target
 *                " " + answer (whole field, worked solution and "#### N"),
 *                stop "Question:", "</s>", "<|im_end|>", regex strict-match
 *                "#### (\-?[0-9\.\,]+)" as POSIX ERE "#### (-?[0-9.,]+)".
 *                answer = the reference exact_match compares: regexes_to_ignore
 *                ",", "\$", "(?s).*#### ", "\.$" and ignore_case applied to
 *                the field (the scorer applies the same to the extracted
 *                group), "1,200." -> "1200".
 * Few-shot (api/task.py fewshot_context, build_qa_turn): description, then
 * per shot its text + target_delimiter + its gold answer + fewshot_delimiter
 * "\n\n"; WinoGrande's shot text is the gold choice's context. Our choices and
 * targets carry the delimiter, so a shot is context + choices[gold] (or
 * contexts[gold] + choices[gold]) or prompt + target, then "\n\n".
 *
 * Where we differ: Python's strip()/capitalize() know Unicode; ours touch
 * ASCII only (HellaSwag's capitalize lowercases the rest of ctx_b). The
 * harness's shots come from Python's random (MMLU: the first 5 of dev); ours
 * from jm_seed_stream, so few-shot prompts match in form, not in draw. */
#include "base/base.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>

#define MAX_LINE ((size_t)16 << 20) /* bytes in one record; the largest real ones are a few KB */

static const char PRIMER[] = /* truthfulqa_mc1.yaml: prompt_qa */
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.";

/* One record -> one example; where is "FILE:LINE" for messages. */
typedef jm_status (*record_fn)(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err);

typedef struct {
    const char *name;
    jm_eval_kind kind;
    const char *key, *key2; /* the fields that tell this layout (key2 may be NULL) */
    const char *fields;     /* what a record holds, for messages */
    record_fn read;
    const char *stop[4];    /* generative: stop strings and the answer's regex */
    int nstop;
    const char *regex;
} layout;

static jm_status read_mc(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err);
static jm_status read_gen(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err);
static jm_status read_arc(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err);
static jm_status read_hellaswag(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err);
static jm_status read_winogrande(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err);
static jm_status read_piqa(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err);
static jm_status read_truthfulqa(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err);
static jm_status read_mmlu(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err);
static jm_status read_gsm8k(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err);

/* Tried in this order: the first whose key fields a record has is its layout
 * (ARC, TruthfulQA and MMLU records have "question" too, so GSM8K comes last). */
static const layout layouts[] = {
    {"mc", JM_EVAL_MC, "context", NULL, "{\"context\", \"choices\", \"gold\"}", read_mc, {0}, 0, NULL},
    {"gen", JM_EVAL_GEN, "prompt", NULL, "{\"prompt\", \"answer\"}", read_gen, {"\n\n"}, 1,
     "^[[:space:]]*([^[:space:]](.*[^[:space:]])?)"},
    {"arc", JM_EVAL_MC, "answerKey", NULL, "{\"question\", \"choices\", \"answerKey\"}", read_arc, {0}, 0, NULL},
    {"hellaswag", JM_EVAL_MC, "endings", NULL, "{\"activity_label\", \"ctx_a\", \"ctx_b\", \"endings\", \"label\"}",
     read_hellaswag, {0}, 0, NULL},
    {"winogrande", JM_EVAL_MC, "option1", NULL, "{\"sentence\", \"option1\", \"option2\", \"answer\"}",
     read_winogrande, {0}, 0, NULL},
    {"piqa", JM_EVAL_MC, "goal", NULL, "{\"goal\", \"sol1\", \"sol2\", \"label\"}", read_piqa, {0}, 0, NULL},
    {"truthfulqa_mc1", JM_EVAL_MC, "mc1_targets", NULL, "{\"question\", \"mc1_targets\": {\"choices\", \"labels\"}}",
     read_truthfulqa, {0}, 0, NULL},
    {"mmlu", JM_EVAL_MC, "question", "choices", "{\"question\", \"subject\", \"choices\", \"answer\"}", read_mmlu,
     {0}, 0, NULL},
    {"gsm8k", JM_EVAL_GEN, "question", "answer", "{\"question\", \"answer\"}", read_gsm8k,
     {"Question:", "</s>", "<|im_end|>"}, 3, "#### (-?[0-9.,]+)"},
};
#define NLAYOUTS ((int)(sizeof layouts / sizeof layouts[0]))

static const layout *detect(const cJSON *r);
static jm_status read_records(FILE *f, jm_eval_task *t, jm_error *err);
static void free_example(jm_eval_example *ex);

/* ================================================================ public */

jm_status jm_eval_task_load(const char *path, jm_eval_task **out, jm_error *err)
{
    if (!out) return jm_fail(err, JM_ERR_ARG, "evaluation task: no place for the result");
    *out = NULL;
    if (!path) return jm_fail(err, JM_ERR_ARG, "evaluation task: no file");
    FILE *f;
    jm_status s = jm_fopen_regular(path, &f, err);
    if (s) return s;
    jm_eval_task *t = calloc(1, sizeof *t);
    if (!t) {
        fclose(f);
        return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
    }
    snprintf(t->path, sizeof t->path, "%s", path);
    t->fewshot_sep = "\n\n"; /* the harness' fewshot_delimiter default; no YAML here changes it */
    s = read_records(f, t, err);
    fclose(f);
    if (s) {
        jm_eval_task_free(t);
        return s;
    }
    *out = t;
    return JM_OK;
}

void jm_eval_task_free(jm_eval_task *t)
{
    if (!t) return;
    for (int i = 0; i < t->n; i++) free_example(&t->ex[i]);
    free(t->ex);
    free(t->description);
    free(t);
}

static bool same_text(const char *a, const char *b)
{
    return a == b || (a && b && strcmp(a, b) == 0);
}

/* A shot's two parts: its own text and its gold continuation. */
static void shot_parts(const jm_eval_task *p, int j, const char **text, const char **gold)
{
    const jm_eval_example *e = &p->ex[j];
    if (p->kind == JM_EVAL_GEN) {
        *text = e->prompt, *gold = e->target;
    } else {
        *text = e->contexts ? e->contexts[e->gold] : e->context;
        *gold = e->choices[e->gold];
    }
}

jm_status jm_eval_fewshot(const jm_eval_task *t, int i, const jm_eval_task *pool, int shots, uint64_t seed, char **prefix,
                          jm_error *err)
{
    if (!prefix) return jm_fail(err, JM_ERR_ARG, "few-shot: no place for the prefix");
    *prefix = NULL;
    if (!t || i < 0 || i >= t->n)
        return jm_fail(err, JM_ERR_ARG, "few-shot: example %d of a task of %d", i, t ? t->n : 0);
    if (shots < 0) return jm_fail(err, JM_ERR_ARG, "few-shot: %d shots", shots);
    const jm_eval_example *x = &t->ex[i];
    if (shots > 0 && !pool) return jm_fail(err, JM_ERR_ARG, "few-shot: %d shots but no pool to draw them from", shots);
    if (shots > 0 && strcmp(pool->layout, t->layout) != 0)
        return jm_fail(err, JM_ERR_ARG, "few-shot: the shots' file %s holds %s records, the task %s holds %s",
                       pool->path, pool->layout, t->path, t->layout);
    int *idx = NULL;
    if (shots > 0) {
        /* Usable: the pool's examples under the same description (MMLU: the
         * same subject, as the harness draws from that subject's dev split),
         * never example i itself. */
        idx = malloc((size_t)pool->n * sizeof *idx + 1);
        if (!idx) return jm_fail(err, JM_ERR_NOMEM, "few-shot: out of memory");
        int m = 0;
        for (int j = 0; j < pool->n; j++)
            if (!(pool == t && j == i) && same_text(pool->ex[j].description, x->description)) idx[m++] = j;
        if (m < shots) {
            free(idx);
            return jm_fail(err, JM_ERR_ARG, "%s:%d: %d shots wanted but %s has %d example%s to draw them from "
                           "(of its %d: %s%s)", t->path, x->line, shots, pool->path, m, m == 1 ? "" : "s", pool->n,
                           pool == t ? "not the example itself" : "all",
                           x->description ? ", only those of its subject" : "");
        }
        /* The first `shots` steps of a Fisher-Yates shuffle, drawn from a stream
         * of (seed, i) alone: an example's shots do not depend on which others run. */
        uint64_t stream = jm_seed_stream(seed, (uint64_t)i);
        for (int k = 0; k < shots; k++) {
            int j = k + (int)(jm_seed_stream(stream, (uint64_t)k) % (uint64_t)(m - k));
            int tmp = idx[k];
            idx[k] = idx[j], idx[j] = tmp;
        }
    }
    size_t sep = strlen(t->fewshot_sep), len = x->description ? strlen(x->description) : 0;
    for (int k = 0; k < shots; k++) {
        const char *text, *gold;
        shot_parts(pool, idx[k], &text, &gold);
        len += strlen(text) + strlen(gold) + sep;
    }
    char *p = malloc(len + 1);
    if (!p) {
        free(idx);
        return jm_fail(err, JM_ERR_NOMEM, "few-shot: out of memory for a prefix of %zu bytes", len);
    }
    char *w = p;
    if (x->description) w = stpcpy(w, x->description);
    for (int k = 0; k < shots; k++) {
        const char *text, *gold;
        shot_parts(pool, idx[k], &text, &gold);
        w = stpcpy(stpcpy(stpcpy(w, text), gold), t->fewshot_sep);
    }
    *w = 0;
    free(idx);
    *prefix = p;
    return JM_OK;
}

/* ============================================================ the reader */


static jm_status no_memory(jm_error *err, const char *where)
{
    return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", where);
}

enum { LINE_END = 0, LINE_OK = 1, LINE_LONG = -1, LINE_ERROR = -2 };

/* The next line, without its '\n', NUL-terminated in *buf (NUL bytes inside
 * are kept and counted in *len: the JSON parser refuses them). */
static int next_line(FILE *f, char **buf, size_t *cap, size_t *len)
{
    size_t n = 0;
    int c;
    while ((c = getc_unlocked(f)) != EOF && c != '\n') {
        if (n == MAX_LINE) return LINE_LONG;
        if (n + 1 >= *cap) {
            size_t grown = *cap ? 2 * *cap : 4096;
            if (grown > MAX_LINE + 1) grown = MAX_LINE + 1;
            char *b = realloc(*buf, grown);
            if (!b) return LINE_ERROR;
            *buf = b, *cap = grown;
        }
        (*buf)[n++] = (char)c;
    }
    if (c == EOF && ferror(f)) return LINE_ERROR;
    if (c == EOF && n == 0) return LINE_END;
    if (!*buf && !(*buf = malloc(*cap = 1))) return LINE_ERROR; /* an empty first line */
    (*buf)[n] = 0;
    *len = n;
    return LINE_OK;
}

static bool blank(const char *p, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r') return false;
    return true;
}

/* The fields of a record that tells no layout, for the message. */
static void field_names(const cJSON *r, char *buf, size_t cap)
{
    size_t n = 0;
    buf[0] = 0;
    for (const cJSON *c = r->child; c && n + 8 < cap; c = c->next)
        n += (size_t)snprintf(buf + n, cap - n, "%s\"%.40s\"", n ? ", " : "", c->string);
    if (!r->child) snprintf(buf, cap, "none");
}

static jm_status unknown_layout(const cJSON *r, const char *where, jm_error *err)
{
    char got[256], want[1024];
    size_t n = 0;
    field_names(r, got, sizeof got);
    for (int k = 0; k < NLAYOUTS; k++)
        n += (size_t)snprintf(want + n, sizeof want - n, "%s%s %s", k ? "; " : "", layouts[k].name, layouts[k].fields);
    return jm_fail_at(err, JM_ERR_FORMAT, where, "no task layout has these fields (%s); expected one of: %s", got, want);
}

/* One record of t, at line (where = "FILE:LINE"); the first fixes the layout. */
static jm_status one_record(jm_eval_task *t, const char *line, size_t len, int lineno, const char *where,
                            const layout **lay, int *first, jm_error *err)
{
    cJSON *r = NULL;
    jm_status s = jm_json_parse(line, len, where, &r, err);
    if (!s) s = jm_json_no_nul(line, len, where, err);
    if (!s && !cJSON_IsObject(r))
        s = jm_fail_at(err, JM_ERR_FORMAT, where, "a record is a JSON object, not %s", cJSON_IsArray(r) ? "an array" : "a single value");
    if (!s && !*lay) {
        *lay = detect(r);
        if (!*lay) s = unknown_layout(r, where, err);
        else *first = lineno;
    }
    if (!s && t->n == INT_MAX) s = jm_fail_at(err, JM_ERR_FORMAT, where, "more than %d records", INT_MAX);
    if (!s && t->n % 256 == 0) {
        jm_eval_example *ex = realloc(t->ex, ((size_t)t->n + 256) * sizeof *ex);
        if (!ex) s = no_memory(err, where);
        else t->ex = ex;
    }
    if (!s) {
        jm_eval_example *ex = &t->ex[t->n];
        memset(ex, 0, sizeof *ex);
        ex->line = lineno;
        s = (*lay)->read(r, ex, where, err);
        if (s) {
            free_example(ex);
            const layout *other = s == JM_ERR_FORMAT ? detect(r) : NULL;
            if (other && other != *lay)
                s = jm_fail_at(err, JM_ERR_FORMAT, where, "a %s record (fields %s), but the file's first record (line %d) is %s: every "
                        "record must have the first's layout", other->name, other->fields, *first, (*lay)->name);
        } else {
            t->n++;
        }
    }
    cJSON_Delete(r);
    return s;
}

static jm_status read_records(FILE *f, jm_eval_task *t, jm_error *err)
{
    char *where = malloc(strlen(t->path) + 32), *line = NULL;
    size_t cap = 0, len = 0;
    if (!where) return no_memory(err, t->path);
    const layout *lay = NULL;
    int lineno = 0, first = 0;
    jm_status s = JM_OK;
    while (!s) {
        int got = next_line(f, &line, &cap, &len);
        if (got == LINE_END) break;
        if (lineno == INT_MAX) {
            s = jm_fail(err, JM_ERR_FORMAT, "%s: more than %d lines", t->path, INT_MAX);
            break;
        }
        sprintf(where, "%s:%d", t->path, ++lineno);
        if (got == LINE_LONG) {
            s = jm_fail_at(err, JM_ERR_FORMAT, where, "a line longer than %zu MB: not a task record", MAX_LINE >> 20);
        } else if (got == LINE_ERROR) {
            s = ferror(f) ? jm_fail(err, JM_ERR_IO, "%s: %s", where, strerror(errno ? errno : EIO))
                          : no_memory(err, where);
        } else {
            const char *p = line;
            if (lineno == 1 && len >= 3 && memcmp(p, "\xEF\xBB\xBF", 3) == 0) p += 3, len -= 3; /* a BOM */
            if (!blank(p, len)) s = one_record(t, p, len, lineno, where, &lay, &first, err);
        }
    }
    if (!s && t->n == 0)
        s = jm_fail(err, JM_ERR_FORMAT,
                    "%s: no records (%d line%s, all blank): a task file holds one JSON object a line",
                    t->path, lineno, lineno == 1 ? "" : "s");
    if (!s) {
        snprintf(t->layout, sizeof t->layout, "%s", lay->name);
        t->kind = lay->kind;
        for (int k = 0; k < lay->nstop; k++) t->stop[k] = lay->stop[k];
        t->nstop = lay->nstop;
        t->regex = lay->regex;
        /* The task's description: the one all examples share, if they do. */
        bool shared = true;
        for (int i = 1; i < t->n && shared; i++) shared = same_text(t->ex[i].description, t->ex[0].description);
        if (shared && t->ex[0].description && !(t->description = strdup(t->ex[0].description)))
            s = no_memory(err, t->path);
    }
    free(line);
    free(where);
    return s;
}

static const layout *detect(const cJSON *r)
{
    for (int k = 0; k < NLAYOUTS; k++)
        if (cJSON_HasObjectItem(r, layouts[k].key) && (!layouts[k].key2 || cJSON_HasObjectItem(r, layouts[k].key2)))
            return &layouts[k];
    return NULL;
}

static void free_example(jm_eval_example *ex)
{
    for (int c = 0; c < ex->nchoices; c++) {
        if (ex->choices) free(ex->choices[c]);
        if (ex->contexts) free(ex->contexts[c]);
    }
    free(ex->choices);
    free(ex->contexts);
    free(ex->choice_bytes);
    free(ex->choice_chars);
    free(ex->context);
    free(ex->prompt);
    free(ex->answer);
    free(ex->target);
    free(ex->description);
    memset(ex, 0, sizeof *ex);
}

/* ========================================================= record fields */


static const cJSON *field(const cJSON *obj, const char *key)
{
    return cJSON_GetObjectItemCaseSensitive(obj, key);
}

/* obj[key] as a string (name is how messages call it: "question.stem"). */
static jm_status get_string(const cJSON *obj, const char *key, const char *name, const char *where, const char **out,
                            jm_error *err)
{
    const cJSON *j = field(obj, key);
    char got[64];
    *out = NULL;
    if (!cJSON_IsString(j))
        return jm_fail_at(err, JM_ERR_FORMAT, where, "\"%s\" is %s: expected a string", name, jm_json_describe(j, got, sizeof got));
    *out = j->valuestring;
    return JM_OK;
}

/* arr as a list of strings, *texts malloc'd (pointers into arr). */
static jm_status get_strings(const cJSON *arr, const char *name, const char *where, const char ***texts, int *n,
                             jm_error *err)
{
    char got[64];
    *texts = NULL, *n = 0;
    if (!cJSON_IsArray(arr))
        return jm_fail_at(err, JM_ERR_FORMAT, where, "\"%s\" is %s: expected a list of strings", name, jm_json_describe(arr, got, sizeof got));
    int k = cJSON_GetArraySize(arr);
    const char **v = malloc((size_t)(k ? k : 1) * sizeof *v);
    if (!v) return no_memory(err, where);
    int i = 0;
    for (const cJSON *c = arr->child; c; c = c->next, i++) {
        if (!cJSON_IsString(c)) {
            free(v);
            return jm_fail_at(err, JM_ERR_FORMAT, where, "\"%s\"[%d] is %s: expected a string", name, i, jm_json_describe(c, got, sizeof got));
        }
        v[i] = c->valuestring;
    }
    *texts = v, *n = k;
    return JM_OK;
}

/* obj[key] as an index: a whole number, or a string of one (HF keeps
 * HellaSwag's label and WinoGrande's answer as "2"), in [base, base + n). */
static jm_status get_index(const cJSON *obj, const char *key, int base, int n, const char *where, int *out,
                           jm_error *err)
{
    const cJSON *j = field(obj, key);
    double d = NAN;
    if (cJSON_IsNumber(j)) {
        d = j->valuedouble;
    } else if (cJSON_IsString(j) && j->valuestring[0]) {
        char *end;
        errno = 0;
        long v = strtol(j->valuestring, &end, 10);
        if (!*end && !errno && j->valuestring[0] != ' ' && j->valuestring[0] != '+') d = (double)v;
    }
    if (!isfinite(d) || d != floor(d) || d < base || d >= (double)base + n) {
        char got[64];
        return jm_fail_at(err, JM_ERR_FORMAT, where, "\"%s\" is %s: expected a whole number from %d to %d (the record has %d choices)", key,
                   jm_json_describe(j, got, sizeof got), base, base + n - 1, n);
    }
    *out = (int)d - base;
    return JM_OK;
}

/* s1 + s2 + ... (NULL ends the list), malloc'd; NULL when out of memory. */
__attribute__((sentinel))
static char *concat(const char *s, ...)
{
    va_list ap;
    size_t len = 0;
    va_start(ap, s);
    for (const char *p = s; p; p = va_arg(ap, const char *)) len += strlen(p);
    va_end(ap);
    char *out = malloc(len + 1), *w = out;
    if (!out) return NULL;
    va_start(ap, s);
    for (const char *p = s; p; p = va_arg(ap, const char *)) w = stpcpy(w, p);
    va_end(ap);
    *w = 0;
    return out;
}

/* Code points of valid UTF-8 (jm_json_parse checked it): what Python's len() counts. */
static int utf8_chars(const char *s)
{
    int n = 0;
    for (; *s; s++) n += ((unsigned char)*s & 0xC0) != 0x80;
    return n;
}

/* The example's choices: delim + texts[c], with the lengths of texts[c]. */
static jm_status set_choices(jm_eval_example *ex, const char *delim, const char *const *texts, int n,
                             const char *name, const char *where, jm_error *err)
{
    if (n == 0) return jm_fail_at(err, JM_ERR_FORMAT, where, "\"%s\" is an empty list: nothing to choose from", name);
    if (n < 2) return jm_fail_at(err, JM_ERR_FORMAT, where, "\"%s\" has 1 choice: a multiple-choice example needs at least 2", name);
    for (int c = 0; c < n; c++)
        if (!texts[c][0]) return jm_fail_at(err, JM_ERR_FORMAT, where, "\"%s\"[%d] is an empty string: nothing to score", name, c);
    ex->choices = calloc((size_t)n, sizeof *ex->choices);
    ex->choice_bytes = malloc((size_t)n * sizeof *ex->choice_bytes);
    ex->choice_chars = malloc((size_t)n * sizeof *ex->choice_chars);
    if (!ex->choices || !ex->choice_bytes || !ex->choice_chars) return no_memory(err, where);
    ex->nchoices = n;
    for (int c = 0; c < n; c++) {
        size_t bytes = strlen(texts[c]);
        if (bytes > INT_MAX) return jm_fail_at(err, JM_ERR_FORMAT, where, "\"%s\"[%d] is longer than %d bytes", name, c, INT_MAX);
        if (!(ex->choices[c] = concat(delim, texts[c], NULL))) return no_memory(err, where);
        ex->choice_bytes[c] = (int)bytes;
        ex->choice_chars[c] = utf8_chars(texts[c]);
    }
    return JM_OK;
}

/* ============================================================== layouts */

static jm_status read_mc(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err)
{
    const char *context, **texts = NULL;
    int n = 0;
    jm_status s = get_string(r, "context", "context", where, &context, err);
    if (!s) s = get_strings(field(r, "choices"), "choices", where, &texts, &n, err);
    if (!s) s = set_choices(ex, "", texts, n, "choices", where, err);
    if (!s) s = get_index(r, "gold", 0, n, where, &ex->gold, err);
    if (!s && !(ex->context = strdup(context))) s = no_memory(err, where);
    free(texts);
    return s;
}

static jm_status read_gen(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err)
{
    const char *prompt, *answer;
    jm_status s = get_string(r, "prompt", "prompt", where, &prompt, err);
    if (!s) s = get_string(r, "answer", "answer", where, &answer, err);
    if (s) return s;
    if (strspn(answer, " \t\r\n") == strlen(answer))
        return jm_fail_at(err, JM_ERR_FORMAT, where, "\"answer\" is blank: expected the reference answer");
    ex->prompt = strdup(prompt);
    ex->answer = strdup(answer);
    ex->target = concat(" ", answer, NULL);
    return ex->prompt && ex->answer && ex->target ? JM_OK : no_memory(err, where);
}

/* "Question: {question}\nAnswer:" - ARC and PIQA share it. */
static jm_status question_answer(jm_eval_example *ex, const char *question, const char *where, jm_error *err)
{
    ex->context = concat("Question: ", question, "\nAnswer:", NULL);
    return ex->context ? JM_OK : no_memory(err, where);
}

/* AI2's {"question": {"stem", "choices": [{"text", "label"}, ...]}} or HF's
 * {"question", "choices": {"text": [...], "label": [...]}}, and "answerKey". */
static jm_status read_arc(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err)
{
    const cJSON *q = field(r, "question");
    const char *question, *key, **texts = NULL, **labels = NULL;
    int n = 0, nlabels = 0;
    char got[64];
    jm_status s;
    if (cJSON_IsObject(q)) { /* AI2 */
        const cJSON *list = field(q, "choices");
        s = get_string(q, "stem", "question.stem", where, &question, err);
        if (!s && !cJSON_IsArray(list))
            s = jm_fail_at(err, JM_ERR_FORMAT, where, "\"question.choices\" is %s: expected a list of {\"text\", \"label\"}",
                    jm_json_describe(list, got, sizeof got));
        if (!s) {
            n = nlabels = cJSON_GetArraySize(list);
            texts = malloc((size_t)(n ? n : 1) * sizeof *texts);
            labels = malloc((size_t)(n ? n : 1) * sizeof *labels);
            if (!texts || !labels) s = no_memory(err, where);
        }
        int i = 0;
        for (const cJSON *c = s ? NULL : list->child; c && !s; c = c->next, i++) {
            char name[64];
            snprintf(name, sizeof name, "question.choices[%d].text", i);
            s = get_string(c, "text", name, where, &texts[i], err);
            snprintf(name, sizeof name, "question.choices[%d].label", i);
            if (!s) s = get_string(c, "label", name, where, &labels[i], err);
        }
    } else { /* HF */
        const cJSON *ch = field(r, "choices");
        s = get_string(r, "question", "question", where, &question, err);
        if (!s && !cJSON_IsObject(ch))
            s = jm_fail_at(err, JM_ERR_FORMAT, where, "\"choices\" is %s: expected {\"text\": [...], \"label\": [...]}",
                    jm_json_describe(ch, got, sizeof got));
        if (!s) s = get_strings(field(ch, "text"), "choices.text", where, &texts, &n, err);
        if (!s) s = get_strings(field(ch, "label"), "choices.label", where, &labels, &nlabels, err);
        if (!s && nlabels != n)
            s = jm_fail_at(err, JM_ERR_FORMAT, where, "\"choices\" has %d texts and %d labels: one label a text", n, nlabels);
    }
    if (!s) s = set_choices(ex, " ", texts, n, cJSON_IsObject(q) ? "question.choices" : "choices.text", where, err);
    if (!s) s = get_string(r, "answerKey", "answerKey", where, &key, err);
    if (!s) {
        ex->gold = -1;
        for (int c = 0; c < n && ex->gold < 0; c++)
            if (strcmp(labels[c], key) == 0) ex->gold = c;
        if (ex->gold < 0) s = jm_fail_at(err, JM_ERR_FORMAT, where, "\"answerKey\" \"%.40s\" is not one of the choices' labels", key);
    }
    if (!s) s = question_answer(ex, question, where, err);
    free(texts);
    free(labels);
    return s;
}

static bool py_space(char c) /* Python's str.strip() whitespace, the ASCII part */
{
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

/* Python's s.strip(), in place. */
static char *strip(char *s)
{
    char *b = s, *e = s + strlen(s);
    while (b < e && py_space(*b)) b++;
    while (e > b && py_space(e[-1])) e--;
    memmove(s, b, (size_t)(e - b));
    s[e - b] = 0;
    return s;
}

/* hellaswag/utils.py preprocess, in place (the text only shrinks). */
static char *hellaswag_preprocess(char *s)
{
    strip(s);
    char *w = s;
    for (const char *p = s; *p;) /* " [title]" -> ". " */
        if (strncmp(p, " [title]", 8) == 0) w = stpcpy(w, ". "), p += 8;
        else *w++ = *p++;
    *w = 0;
    w = s;
    for (const char *p = s; *p;) { /* re.sub("\\[.*?\\]", ""): '.' does not cross a newline */
        const char *close = NULL;
        if (*p == '[')
            for (const char *q = p + 1; *q && *q != '\n' && !close; q++)
                if (*q == ']') close = q;
        if (close) p = close + 1;
        else *w++ = *p++;
    }
    *w = 0;
    w = s;
    for (const char *p = s; *p;) /* .replace("  ", " "): one pass, left to right */
        if (p[0] == ' ' && p[1] == ' ') *w++ = ' ', p += 2;
        else *w++ = *p++;
    *w = 0;
    return s;
}

static jm_status read_hellaswag(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err)
{
    const char *act, *ctx_a, *ctx_b, **endings = NULL;
    int n = 0;
    jm_status s = get_string(r, "activity_label", "activity_label", where, &act, err);
    if (!s) s = get_string(r, "ctx_a", "ctx_a", where, &ctx_a, err);
    if (!s) s = get_string(r, "ctx_b", "ctx_b", where, &ctx_b, err);
    if (!s) s = get_strings(field(r, "endings"), "endings", where, &endings, &n, err);
    char **pre = s ? NULL : calloc((size_t)(n ? n : 1), sizeof *pre);
    if (!s && !pre) s = no_memory(err, where);
    for (int c = 0; c < n && !s; c++)
        if (!(pre[c] = strdup(endings[c]))) s = no_memory(err, where);
        else if (!hellaswag_preprocess(pre[c])[0] && endings[c][0])
            s = jm_fail_at(err, JM_ERR_FORMAT, where, "\"endings\"[%d] is empty once preprocessed (as the harness does): nothing to score",
                    c);
    if (!s) s = set_choices(ex, " ", (const char *const *)pre, n, "endings", where, err);
    if (!s) s = get_index(r, "label", 0, n, where, &ex->gold, err);
    char *b = s ? NULL : strdup(ctx_b);
    if (!s && !b) s = no_memory(err, where);
    if (!s) { /* Python's capitalize(): the first character upper, the rest lower */
        for (char *p = b; *p; p++)
            if (*p >= 'A' && *p <= 'Z') *p = (char)(*p - 'A' + 'a');
        if (b[0] >= 'a' && b[0] <= 'z') b[0] = (char)(b[0] - 'a' + 'A');
        if (!(ex->context = concat(act, ": ", ctx_a, " ", b, NULL))) s = no_memory(err, where);
        else hellaswag_preprocess(ex->context);
    }
    free(b);
    for (int c = 0; pre && c < n; c++) free(pre[c]);
    free(pre);
    free(endings);
    return s;
}

static jm_status read_winogrande(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err)
{
    const char *sentence, *opt[2];
    jm_status s = get_string(r, "sentence", "sentence", where, &sentence, err);
    if (!s) s = get_string(r, "option1", "option1", where, &opt[0], err);
    if (!s) s = get_string(r, "option2", "option2", where, &opt[1], err);
    if (s) return s;
    const char *blank_at = strchr(sentence, '_');
    if (!blank_at) return jm_fail_at(err, JM_ERR_FORMAT, where, "\"sentence\" has no \"_\": the blank the options fill");
    char *rest = strdup(blank_at + 1);
    if (!rest) return no_memory(err, where);
    strip(rest);
    if (!rest[0]) s = jm_fail_at(err, JM_ERR_FORMAT, where, "\"sentence\" has nothing after its \"_\": no continuation to score");
    if (!s) s = set_choices(ex, " ", (const char *const[]){rest, rest}, 2, "sentence", where, err);
    free(rest);
    if (!s) s = get_index(r, "answer", 1, 2, where, &ex->gold, err);
    if (!s && !(ex->contexts = calloc(2, sizeof *ex->contexts))) s = no_memory(err, where);
    int head = (int)(blank_at - sentence);
    for (int c = 0; c < 2 && !s; c++) {
        if (!opt[c][0]) s = jm_fail_at(err, JM_ERR_FORMAT, where, "\"option%d\" is an empty string", c + 1);
        else if (!(ex->contexts[c] = malloc((size_t)head + strlen(opt[c]) + 1))) s = no_memory(err, where);
        else strcpy(stpncpy(ex->contexts[c], sentence, (size_t)head), opt[c]); /* sentence[:idx] + option */
    }
    return s;
}

static jm_status read_piqa(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err)
{
    const char *goal, *sol[2];
    jm_status s = get_string(r, "goal", "goal", where, &goal, err);
    if (!s) s = get_string(r, "sol1", "sol1", where, &sol[0], err);
    if (!s) s = get_string(r, "sol2", "sol2", where, &sol[1], err);
    if (!s && !sol[0][0]) s = jm_fail_at(err, JM_ERR_FORMAT, where, "\"sol1\" is an empty string: nothing to score");
    if (!s && !sol[1][0]) s = jm_fail_at(err, JM_ERR_FORMAT, where, "\"sol2\" is an empty string: nothing to score");
    if (!s) s = set_choices(ex, " ", sol, 2, "sol", where, err);
    if (!s) s = get_index(r, "label", 0, 2, where, &ex->gold, err);
    if (!s) s = question_answer(ex, goal, where, err);
    return s;
}

static jm_status read_truthfulqa(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err)
{
    const cJSON *t = field(r, "mc1_targets"), *labels = field(t, "labels");
    const char *question, **texts = NULL;
    int n = 0;
    char got[64];
    jm_status s = get_string(r, "question", "question", where, &question, err);
    if (!s && !cJSON_IsObject(t))
        s = jm_fail_at(err, JM_ERR_FORMAT, where, "\"mc1_targets\" is %s: expected {\"choices\": [...], \"labels\": [...]}",
                jm_json_describe(t, got, sizeof got));
    if (!s) s = get_strings(field(t, "choices"), "mc1_targets.choices", where, &texts, &n, err);
    if (!s) s = set_choices(ex, " ", texts, n, "mc1_targets.choices", where, err);
    if (!s && (!cJSON_IsArray(labels) || cJSON_GetArraySize(labels) != n))
        s = jm_fail_at(err, JM_ERR_FORMAT, where, "\"mc1_targets.labels\" is %s: expected a list of %d labels, 1 for the true choice",
                cJSON_IsArray(labels) ? "a list of another length" : jm_json_describe(labels, got, sizeof got), n);
    int i = 0;
    for (const cJSON *c = s ? NULL : labels->child; c && !s; c = c->next, i++)
        if (!cJSON_IsNumber(c) || c->valuedouble != (i == 0))
            s = jm_fail_at(err, JM_ERR_FORMAT, where, "\"mc1_targets.labels\"[%d] is %s: the harness scores the first choice as the only "
                    "true one, so labels must be [1, 0, ...]", i, jm_json_describe(c, got, sizeof got));
    ex->gold = 0;
    if (!s && !(ex->context = concat(PRIMER, "\n\nQ: ", question, "\nA:", NULL))) s = no_memory(err, where);
    free(texts);
    return s;
}

static jm_status read_mmlu(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err)
{
    static const char *const letters[] = {"A", "B", "C", "D"};
    const char *question, *subject, **c = NULL;
    int n = 0;
    jm_status s = get_string(r, "question", "question", where, &question, err);
    if (!s) s = get_string(r, "subject", "subject", where, &subject, err);
    if (!s) s = get_strings(field(r, "choices"), "choices", where, &c, &n, err);
    if (!s && n != 4) s = jm_fail_at(err, JM_ERR_FORMAT, where, "\"choices\" has %d: the MMLU template shows exactly 4 (A to D)", n);
    if (!s) s = set_choices(ex, " ", letters, 4, "choices", where, err);
    if (!s) { /* a letter "A".."D" too: some dumps keep the key, not its index */
        const cJSON *a = field(r, "answer");
        if (cJSON_IsString(a) && strlen(a->valuestring) == 1 && a->valuestring[0] >= 'A' && a->valuestring[0] <= 'D')
            ex->gold = a->valuestring[0] - 'A';
        else s = get_index(r, "answer", 0, 4, where, &ex->gold, err);
    }
    char *q = s ? NULL : strdup(question), *subj = s ? NULL : strdup(subject);
    if (!s && (!q || !subj)) s = no_memory(err, where);
    if (!s) {
        for (char *p = subj; *p; p++)
            if (*p == '_') *p = ' ';
        ex->context = concat(strip(q), "\nA. ", c[0], "\nB. ", c[1], "\nC. ", c[2], "\nD. ", c[3], "\nAnswer:", NULL);
        ex->description = concat("The following are multiple choice questions (with answers) about ", subj, ".\n\n",
                                 NULL);
        if (!ex->context || !ex->description) s = no_memory(err, where);
    }
    free(q);
    free(subj);
    free(c);
    return s;
}

/* What gsm8k.yaml's exact_match compares: the answer field after its
 * regexes_to_ignore ",", "\$", "(?s).*#### " (greedy: up to the last "#### ")
 * and "\.$" (a final '.', or one before a final newline). */
static char *gsm8k_reference(const char *answer)
{
    const char *mark = NULL;
    for (const char *p = strstr(answer, "#### "); p; p = strstr(p + 1, "#### ")) mark = p;
    if (!mark) return NULL;
    char *out = malloc(strlen(mark) + 1), *w = out;
    if (!out) return NULL;
    for (const char *p = mark + 5; *p; p++) /* and ignore_case: lower case (ASCII; the answers are numbers) */
        if (*p != ',' && *p != '$') *w++ = *p >= 'A' && *p <= 'Z' ? (char)(*p - 'A' + 'a') : *p;
    *w = 0;
    size_t n = (size_t)(w - out);
    if (n >= 1 && out[n - 1] == '.') out[n - 1] = 0;
    else if (n >= 2 && out[n - 1] == '\n' && out[n - 2] == '.') out[n - 2] = '\n', out[n - 1] = 0;
    return out;
}

static jm_status read_gsm8k(const cJSON *r, jm_eval_example *ex, const char *where, jm_error *err)
{
    const char *question, *answer;
    jm_status s = get_string(r, "question", "question", where, &question, err);
    if (!s) s = get_string(r, "answer", "answer", where, &answer, err);
    if (s) return s;
    if (!strstr(answer, "#### "))
        return jm_fail_at(err, JM_ERR_FORMAT, where, "\"answer\" has no \"#### \" line: GSM8K's answer ends \"#### <number>\"");
    if (!(ex->answer = gsm8k_reference(answer))) return no_memory(err, where);
    if (!ex->answer[0]) return jm_fail_at(err, JM_ERR_FORMAT, where, "\"answer\" has nothing after its last \"#### \"");
    ex->prompt = concat("Question: ", question, "\nAnswer:", NULL);
    ex->target = concat(" ", answer, NULL);
    return ex->prompt && ex->target ? JM_OK : no_memory(err, where);
}
