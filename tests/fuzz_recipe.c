/* fuzz_recipe.c — deterministic mutation fuzzer for recipes (jm_recipe_parse,
 * jm_recipe_load) and JSONL records (jm_jsonl_text, what prepare reads each
 * line with).
 *
 * Recipes: three valid recipes over a tiny fixture (an 8-piece tokenizer.json,
 * two sources and a held-out directory of shards) are mutated — bit flips,
 * inserts, deletes, splices between recipes, keys renamed to typos, values
 * swapped for other types, huge and fractional numbers, deep nesting — and
 * parsed from a malloc'd buffer of exactly the mutated length, so
 * AddressSanitizer sees any read past the end. A rejected recipe must carry
 * one line naming it; an accepted one must keep the recipe's promises
 * (integers are integers, known keys only, no \u0000, the model config
 * valid) and is then loaded from a file, which opens the fixture: that too
 * either succeeds or fails with one line naming the file.
 *
 * JSONL: records with escapes, surrogate pairs, \u0000 and "text" keys nested
 * inside other fields, mutated the same way. An accepted record's text must
 * equal an independent reading: the line with every \u0000 escape made
 * \u0001, parsed by cJSON, is the text with its NULs made 0x01.
 *
 * Usage: fuzz_recipe [iterations [seed]]   (defaults: 12000 recipes and five times as
 * many JSONL records, which cost far less; 0x5eed)
 * Prints "PASS <name>" or "FAIL <name>: <why>" per check; exits 0 iff nothing failed. */
#include "harness.h"
#include "fuzz.h"
#include "train/data.h"

#include <cjson/cJSON.h>
#include <math.h>

typedef uint64_t rng; /* the state of fuzz.h's rnd */

#define MAX_TEXT 65536
#define RECIPE_NAME "fuzz.json"

#define PICK(r, a) (a[below(r, sizeof a / sizeof a[0])])

typedef struct {
    char p[MAX_TEXT];
    size_t len;
} text;

/* Replaces t->p[at, at + del) by ins[0, n); does nothing if the result would not fit. */
static void splice(text *t, size_t at, size_t del, const char *ins, size_t n)
{
    if (at > t->len) at = t->len;
    if (del > t->len - at) del = t->len - at;
    if (t->len - del + n > MAX_TEXT) return;
    memmove(t->p + at + n, t->p + at + del, t->len - at - del);
    if (n) memcpy(t->p + at, ins, n);
    t->len = t->len - del + n;
}

/* ---- what mutations put in ---- */

static const char *const values[] = {
    "2.5", "0.5", "-1", "0", "1", "-0", "7", "64", "1e999", "-1e999", "1e308", "1e-320", "9007199254740991",
    "9007199254740993", "18446744073709551616", "2147483648", "1000000001", "1e9", "4.0", "true", "false", "null",
    "\"\"", "\"x\"", "\"wsd\"", "\"cosine\"", "\"constant\"", "\"/nonexistent\"", "\"a\"", "\"b\"", "[]", "{}",
    "[1,2]", "{\"a\":1}", "{\"a\":\"b\"}", "[{\"steps\":1,\"mixture\":{\"a\":1}}]", "\"\\u0000\"", "\"a\\u0000b\"",
    "\"\\n\"", "\"\\u001b[31m\"", "\"\\ud83d\\ude00\"", "\"\\\\\"", "\"caf\\u00e9\"",
};
static const char *const keys[] = {
    "model", "tokenizer", "sources", "heldout", "phases", "seq_len", "batch_size", "grad_accum", "optimizer",
    "schedule", "aux_loss_coef", "z_loss_coef", "seed", "checkpoint_every", "log_every", "eval_every",
    "eval_tokens", "lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip", "type", "warmup_steps",
    "decay_steps", "min_lr_ratio", "name", "steps", "mixture", "vocab_size", "hidden_size", "eos_token_id",
    "num_layers", "head_dim", "kv_channels", "rope_scaling", "lerning_rate", "learning_rate", "stpes",
    "seq_length", "vocab_sise", "", "a", "b", "c", "text", "te\\u0000xt", "x\\u0000", "\\n", "\\u00e9",
    "model.lr", "Steps", "SEQ_LEN",
};
static const char interesting[] = "\"{}[],:-.0123456789eE \\ntu\x01\x7f\x80\xc3\xe2\xff";

/* The value (string, number, literal, object or array) starting at i: its end. */
static size_t value_end(const text *t, size_t i)
{
    int depth = 0;
    bool in_str = false;
    for (; i < t->len; i++) {
        char c = t->p[i];
        if (in_str) {
            if (c == '\\') i++;
            else if (c == '"') {
                in_str = false;
                if (depth == 0) return i + 1;
            }
        } else if (c == '"') {
            in_str = true;
        } else if (c == '{' || c == '[') {
            depth++;
        } else if (c == '}' || c == ']') {
            if (depth == 0) return i;
            if (--depth == 0) return i + 1;
        } else if (depth == 0 && (c == ',' || c == ' ' || c == '\n')) {
            return i;
        }
    }
    return t->len;
}

/* A random occurrence of c in t, or t->len when there is none. */
static size_t find_char(rng *r, const text *t, char c)
{
    size_t count = 0;
    for (size_t i = 0; i < t->len; i++) count += t->p[i] == c;
    if (!count) return t->len;
    size_t k = below(r, count);
    for (size_t i = 0; i < t->len; i++)
        if (t->p[i] == c && k-- == 0) return i;
    return t->len;
}

/* Deep nesting: "[[[...1...]]]" or {"a":{"a":...}} of the given depth. */
static void nested(char *out, size_t cap, int depth, bool objects)
{
    size_t k = 0;
    for (int i = 0; i < depth && k + 8 < cap / 2; i++) k += (size_t)snprintf(out + k, cap - k, objects ? "{\"a\":" : "[");
    size_t opened = objects ? k / 5 : k;
    k += (size_t)snprintf(out + k, cap - k, "1");
    for (size_t i = 0; i < opened && k + 2 < cap; i++) out[k++] = objects ? '}' : ']';
    out[k] = 0;
}

static void mutate(rng *r, text *t, const text *other)
{
    size_t pos = t->len ? below(r, t->len) : 0;
    char buf[4096];
    switch (below(r, 16)) {
    case 0: /* flip a bit */
        if (t->len) t->p[pos] ^= (char)(1u << below(r, 8));
        break;
    case 1: /* a character JSON cares about */
        if (t->len) t->p[pos] = interesting[below(r, sizeof interesting - 1)];
        break;
    case 2: { /* insert a few bytes */
        size_t n = 1 + below(r, 6);
        for (size_t i = 0; i < n; i++)
            buf[i] = below(r, 2) ? interesting[below(r, sizeof interesting - 1)] : (char)rnd(r);
        splice(t, pos, 0, buf, n);
        break;
    }
    case 3: /* delete a few bytes */
        splice(t, pos, 1 + below(r, 8), NULL, 0);
        break;
    case 4: { /* a chunk of this text again, elsewhere */
        size_t from = t->len ? below(r, t->len) : 0, n = 1 + below(r, 40);
        if (n > t->len - from) n = t->len - from;
        memcpy(buf, t->p + from, n);
        splice(t, pos, 0, buf, n);
        break;
    }
    case 5: /* truncate */
        t->len = below(r, t->len + 1);
        break;
    case 6: { /* a value swapped for another, often of another type */
        size_t at = find_char(r, t, ':');
        if (at == t->len) break;
        at++;
        while (at < t->len && t->p[at] == ' ') at++;
        const char *v = PICK(r, values);
        splice(t, at, value_end(t, at) - at, v, strlen(v));
        break;
    }
    case 7: { /* a key renamed: to another key, a typo, or a typo of itself */
        size_t colon = find_char(r, t, ':');
        if (colon == t->len || colon == 0 || t->p[colon - 1] != '"') break;
        size_t start = colon - 1;
        while (start > 0 && t->p[start - 1] != '"') start--;
        size_t n = colon - 1 - start;
        if (below(r, 2) && n > 1 && n < sizeof buf) { /* drop, double or swap one letter */
            memcpy(buf, t->p + start, n);
            size_t i = below(r, n - 1);
            switch (below(r, 3)) {
            case 0: memmove(buf + i, buf + i + 1, n - i - 1), n--; break;
            case 1: memmove(buf + i + 1, buf + i, n - i), n++; break;
            default: { char c = buf[i]; buf[i] = buf[i + 1]; buf[i + 1] = c; }
            }
            splice(t, start, colon - 1 - start, buf, n);
        } else {
            const char *k = PICK(r, keys);
            splice(t, start, n, k, strlen(k));
        }
        break;
    }
    case 8: { /* a new key: value pair in an object */
        size_t at = find_char(r, t, '{');
        if (at == t->len) break;
        int n = snprintf(buf, sizeof buf, "\"%s\": %s, ", PICK(r, keys), PICK(r, values));
        splice(t, at + 1, 0, buf, (size_t)n);
        break;
    }
    case 9: { /* a key: value pair removed */
        size_t colon = find_char(r, t, ':');
        if (colon == t->len || colon == 0 || t->p[colon - 1] != '"') break;
        size_t start = colon - 1;
        while (start > 0 && t->p[start - 1] != '"') start--;
        if (start == 0) break;
        start--;
        size_t end = value_end(t, colon + 1 + (colon + 1 < t->len && t->p[colon + 1] == ' '));
        if (end < t->len && t->p[end] == ',') end++;
        splice(t, start, end - start, NULL, 0);
        break;
    }
    case 10: { /* a splice from another text */
        if (!other->len) break;
        size_t from = below(r, other->len), n = 1 + below(r, 200);
        if (n > other->len - from) n = other->len - from;
        splice(t, pos, below(r, 60), other->p + from, n);
        break;
    }
    case 11: { /* a number made huge, negative or fractional */
        size_t i = pos;
        while (i < t->len && !(t->p[i] >= '0' && t->p[i] <= '9')) i++;
        size_t j = i;
        while (j < t->len && ((t->p[j] >= '0' && t->p[j] <= '9') || t->p[j] == '.' || t->p[j] == 'e')) j++;
        if (i == t->len) break;
        size_t n;
        switch (below(r, 4)) {
        case 0: n = 1 + below(r, 400), memset(buf, '9', n); break;
        case 1: n = (size_t)snprintf(buf, sizeof buf, "%.*s.5", (int)(j - i), t->p + i); break;
        case 2: n = (size_t)snprintf(buf, sizeof buf, "-%.*s", (int)(j - i), t->p + i); break;
        default: n = (size_t)snprintf(buf, sizeof buf, "%.*se%d", (int)(j - i), t->p + i, (int)below(r, 700) - 350);
        }
        splice(t, i, j - i, buf, n);
        break;
    }
    case 12: { /* deep nesting in place of a value */
        size_t at = find_char(r, t, ':');
        if (at == t->len) break;
        nested(buf, sizeof buf, 1 + (int)below(r, 1500), below(r, 2));
        splice(t, at + 1, value_end(t, at + 1) - at - 1, buf, strlen(buf));
        break;
    }
    case 13: { /* two bytes swapped */
        if (!t->len) break;
        size_t o = below(r, t->len);
        char c = t->p[pos];
        t->p[pos] = t->p[o];
        t->p[o] = c;
        break;
    }
    default: { /* a string's contents replaced */
        size_t q = find_char(r, t, '"');
        if (q == t->len) break;
        size_t e = q + 1;
        while (e < t->len && t->p[e] != '"') e += t->p[e] == '\\' ? 2 : 1;
        if (e > t->len) e = t->len;
        const char *v = PICK(r, values);
        if (v[0] == '"') splice(t, q + 1, e - q - 1, v + 1, strlen(v) - 2);
        break;
    }
    }
}

/* A class of error: the message's words, leaving out the part before the
 * first ": " (the file) and every word with a digit, a quote, a path or a
 * number in it, up to a parenthesis: how many different checks fired. */
static void error_kind(const char *msg, char *out, size_t cap)
{
    const char *p = strstr(msg, ": ");
    p = p ? p + 2 : msg;
    size_t k = 0;
    while (*p && *p != '(' && k + 1 < cap) {
        size_t n = strcspn(p, " (");
        bool plain = n > 0;
        for (size_t i = 0; i < n && plain; i++) plain = !strchr("0123456789\"'/.-+\\", p[i]);
        if (plain && k + n + 2 < cap) {
            memcpy(out + k, p, n);
            k += n;
            out[k++] = ' ';
        }
        p += n;
        while (*p == ' ') p++;
    }
    out[k] = 0;
}

typedef struct {
    char kinds[256][96];
    int n;
} kind_set;

static void add_kind(kind_set *ks, const char *msg)
{
    char k[96];
    error_kind(msg, k, sizeof k);
    for (int i = 0; i < ks->n; i++)
        if (strcmp(ks->kinds[i], k) == 0) return;
    if (ks->n < 256) snprintf(ks->kinds[ks->n++], sizeof ks->kinds[0], "%s", k);
}

/* A refusal, counted by its kind of error; when it is not as it should be
 * (ok false), what is wrong, in why. */
static const char *refusal(kind_set *ks, const char *msg, bool ok, char *why, size_t cap)
{
    add_kind(ks, msg);
    if (ok) return NULL;
    snprintf(why, cap, "bad rejection: %.400s", msg);
    return why;
}

/* PASS if the mutations reached at least min kinds of error (JM_FUZZ_VERBOSE=1 lists them). */
static void report_kinds(const char *name, const kind_set *ks, int min)
{
    check_detail(ks->n >= min, name, "%d kinds of error reached", ks->n);
    if (getenv("JM_FUZZ_VERBOSE"))
        for (int k = 0; k < ks->n; k++) printf("  %s\n", ks->kinds[k]);
}

/* A rejection's message: starts with who (the file, or file:line), one line, not empty. */
static bool good_message(const char *msg, const char *who)
{
    size_t n = strlen(who);
    return strncmp(msg, who, n) == 0 && msg[n] == ':' && !strchr(msg, '\n') && msg[n + 1];
}

/* The first bytes of an input, escaped, for a failure message. */
static const char *shown(const char *p, size_t len, char *out, size_t cap)
{
    size_t k = 0;
    for (size_t i = 0; i < len && k + 5 < cap; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 0x20 && c < 0x7f && c != '\\') out[k++] = (char)c;
        else k += (size_t)snprintf(out + k, cap - k, "\\x%02x", c);
    }
    out[k] = 0;
    return out;
}

/* Broken results so far, and the first one with its input, for the FAIL line. */
typedef struct {
    long n;
    char first[1000];
} findings;

static void note(findings *f, long it, const char *bad, const char *what, const char *buf, size_t len)
{
    if (!bad) return;
    char in[300];
    if (!f->n++)
        snprintf(f->first, sizeof f->first, "iteration %ld: %.500s; the %s: %s", it, bad, what,
                 shown(buf, len, in, sizeof in));
}

/* ---- the recipe fixture ---- */

static void make_fixture(const char *d)
{
    char path[600];
    const char *dirs[] = {"tok", "a", "b", "held"};
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", d, dirs[i]);
        mkdir(path, 0755);
    }
    /* an 8-piece tokenizer: <unk> <s> </s>, then BPE over x and y */
    snprintf(path, sizeof path, "%s/tok/tokenizer.json", d);
    write_text(path, "{\"version\": \"1.0\", \"added_tokens\": [{\"id\": 0, \"content\": \"<unk>\", \"special\": true}, "
                     "{\"id\": 1, \"content\": \"<s>\", \"special\": true}, {\"id\": 2, \"content\": \"</s>\", "
                     "\"special\": true}], \"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": "
                     "\"\\u2581\", \"prepend_scheme\": \"first\", \"split\": false}, \"model\": {\"type\": \"BPE\", "
                     "\"unk_token\": \"<unk>\", \"byte_fallback\": false, \"fuse_unk\": true, \"vocab\": "
                     "{\"<unk>\": 0, \"<s>\": 1, \"</s>\": 2, \"\\u2581\": 3, \"x\": 4, \"y\": 5, \"xy\": 6, "
                     "\"\\u2581x\": 7}, \"merges\": [\"x y\", \"\\u2581 x\"]}}");
    int32_t ids[300];
    for (int i = 0; i < 300; i++) ids[i] = i % 7 == 6 ? 2 : 3 + i % 5;
    const struct {
        const char *file;
        uint64_t n;
    } shards[] = {{"a/part_0.bin", 300}, {"b/part_0.bin", 120}, {"b/part_1.bin", 40}, {"held/h.bin", 100}};
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", d, shards[i].file);
        jm_error err;
        if (jm_shard_write(path, ids, shards[i].n, 8, 2, &err)) {
            printf("FAIL fuzz_recipe_setup: %s\n", err.msg);
            exit(1);
        }
    }
}

static void make_recipes(const char *d, text seeds[3])
{
    seeds[0].len = (size_t)snprintf(seeds[0].p, MAX_TEXT,
        "{\"model\": {\"vocab_size\": 8, \"hidden_size\": 16, \"num_hidden_layers\": 1, \"num_key_value_heads\": 2, "
        "\"kv_channels\": 4, \"intermediate_size\": 8, \"num_local_experts\": 2, \"num_experts_per_tok\": 1, "
        "\"max_position_embeddings\": 64, \"bos_token_id\": 1, \"eos_token_id\": 2, \"rope_theta\": 10000.0, "
        "\"tie_word_embeddings\": true},\n"
        " \"tokenizer\": \"%s/tok\", \"sources\": {\"a\": \"%s/a\", \"b\": \"%s/b\"}, \"heldout\": \"%s/held\",\n"
        " \"phases\": [{\"name\": \"one\", \"steps\": 7, \"mixture\": {\"a\": 0.5, \"b\": 0.5}}, "
        "{\"name\": \"two\", \"steps\": 3, \"mixture\": {\"b\": 1}}],\n"
        " \"seq_len\": 16, \"batch_size\": 2, \"grad_accum\": 1,\n"
        " \"optimizer\": {\"lr\": 0.001, \"beta1\": 0.9, \"beta2\": 0.95, \"eps\": 1e-8, \"weight_decay\": 0.1, "
        "\"grad_clip\": 1.0},\n"
        " \"schedule\": {\"type\": \"wsd\", \"warmup_steps\": 2, \"decay_steps\": 3, \"min_lr_ratio\": 0.1},\n"
        " \"aux_loss_coef\": 0.01, \"z_loss_coef\": 0.001, \"seed\": 7, \"checkpoint_every\": 5, \"log_every\": 1, "
        "\"eval_every\": 5, \"eval_tokens\": 64}\n", d, d, d, d);
    seeds[1].len = (size_t)snprintf(seeds[1].p, MAX_TEXT,
        "{\"model\": {\"vocab_size\": 8, \"eos_token_id\": 2, \"bos_token_id\": 1}, \"sources\": {\"a\": \"%s/a\"}, "
        "\"phases\": [{\"steps\": 1, \"mixture\": {\"a\": 1}}], \"seq_len\": 4, \"batch_size\": 1}", d);
    seeds[2].len = (size_t)snprintf(seeds[2].p, MAX_TEXT,
        "{\"model\": {\"architectures\": [\"JetMoeForCausalLM\"], \"model_type\": \"jetmoe\", \"torch_dtype\": "
        "\"float32\", \"vocab_size\": 8, \"hidden_size\": 8, \"num_hidden_layers\": 2, \"num_key_value_heads\": 1, "
        "\"head_dim\": 4, \"ffn_hidden_size\": 8, \"moe_num_experts\": 4, \"moe_top_k\": 2, "
        "\"num_attention_heads\": 2, \"max_position_embeddings\": 32, \"rope_parameters\": {\"rope_type\": "
        "\"default\", \"rope_theta\": 500}},\n"
        " \"tokenizer\": \"%s/tok\", \"sources\": {\"b\": \"%s/b\", \"a\": \"%s/a\"}, \"heldout\": \"%s/held\",\n"
        " \"phases\": [{\"name\": \"warm\", \"steps\": 4, \"mixture\": {\"a\": 1, \"b\": 0}}, {\"steps\": 4, "
        "\"mixture\": {\"a\": 0, \"b\": 2}}, {\"name\": \"cool\", \"steps\": 2, \"mixture\": {\"a\": 1e-3, "
        "\"b\": 1}}],\n"
        " \"seq_len\": 8, \"batch_size\": 3, \"grad_accum\": 2, \"optimizer\": {\"lr\": 3e-3}, "
        "\"schedule\": {\"type\": \"cosine\", \"warmup_steps\": 1},\n"
        " \"seed\": 0, \"eval_tokens\": 0}\n", d, d, d, d);
}

/* ---- what an accepted recipe promises ---- */

/* The README's recipe fields: nothing else is accepted at the top level. */
static const char *const readme_fields[] = {
    "model", "tokenizer", "sources", "heldout", "phases", "seq_len", "batch_size", "grad_accum", "optimizer",
    "schedule", "aux_loss_coef", "z_loss_coef", "seed", "checkpoint_every", "log_every", "eval_every",
    "eval_tokens",
};

static bool integral(const cJSON *j)
{
    return !j || (cJSON_IsNumber(j) && isfinite(j->valuedouble) && j->valuedouble == floor(j->valuedouble));
}

/* NULL if the accepted recipe keeps its promises, else what broke. */
static const char *verify_recipe(const char *buf, size_t len, const jm_recipe *r)
{
    cJSON *root = cJSON_ParseWithLength(buf, len);
    const char *bad = NULL;
    if (!cJSON_IsObject(root)) bad = "accepted text that is no JSON object";
    for (const cJSON *c = root ? root->child : NULL; c && !bad; c = c->next) {
        bool known = false;
        for (size_t i = 0; i < sizeof readme_fields / sizeof readme_fields[0]; i++)
            known |= strcmp(c->string, readme_fields[i]) == 0;
        if (!known) bad = "accepted an unknown top-level field";
    }
    static const char *const ints[] = {"seq_len", "batch_size", "grad_accum", "seed", "checkpoint_every",
                                       "log_every", "eval_every", "eval_tokens"};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0] && !bad; i++)
        if (!integral(cJSON_GetObjectItemCaseSensitive(root, ints[i]))) bad = "accepted a fractional integer field";
    const cJSON *sch = cJSON_GetObjectItemCaseSensitive(root, "schedule");
    if (!bad && (!integral(cJSON_GetObjectItemCaseSensitive(sch, "warmup_steps")) ||
                 !integral(cJSON_GetObjectItemCaseSensitive(sch, "decay_steps"))))
        bad = "accepted a fractional schedule step count";
    double total = 0;
    const cJSON *ph = cJSON_GetObjectItemCaseSensitive(root, "phases");
    for (const cJSON *p = ph ? ph->child : NULL; p && !bad; p = p->next) {
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(p, "steps");
        if (!st || !integral(st)) bad = "accepted a phase without whole steps";
        else total += st->valuedouble;
    }
    if (!bad && total != (double)jm_recipe_total_steps(r)) bad = "total steps differ from the phases' sum";
    for (size_t i = 0; i + 5 < len && !bad; i++) {
        if (buf[i] == '\\' && memcmp(buf + i + 1, "u0000", 5) == 0) bad = "accepted a \\u0000";
        if (buf[i] == '\\') i++;
    }
    jm_error err;
    if (!bad && jm_config_validate(jm_recipe_model(r), &err)) bad = "accepted an invalid model config";
    cJSON_Delete(root);
    return bad;
}

static void fuzz_recipes(long iters, uint64_t seed, const char *dir)
{
    static text seeds[3], t;
    rng r = {seed ? seed : 1};
    make_fixture(dir);
    make_recipes(dir, seeds);
    char path[600];
    snprintf(path, sizeof path, "%s/recipe.json", dir);
    for (int i = 0; i < 3; i++) {
        jm_recipe *rc = NULL;
        jm_error err = {{0}};
        write_bytes(path, seeds[i].p, seeds[i].len);
        jm_status s = jm_recipe_load(path, &rc, &err);
        jm_recipe_free(rc);
        if (s) {
            check(false, "fuzz_recipe_seeds_load", "seed %d: %s", i, err.msg);
            return;
        }
    }
    check(true, "fuzz_recipe_seeds_load", " ");
    long accepted = 0, rejected = 0, loaded = 0, load_failed = 0;
    findings found = {0, ""};
    static kind_set kinds;
    double t0 = now();
    for (long it = 0; it < iters; it++) {
        int which = (int)below(&r, 3);
        t = seeds[which];
        int n_mut = 1 + (int)below(&r, 3);
        for (int m = 0; m < n_mut; m++) mutate(&r, &t, &seeds[(which + 1 + below(&r, 2)) % 3]);

        char *buf = malloc(t.len ? t.len : 1); /* exactly len bytes: ASan guards the end */
        memcpy(buf, t.p, t.len);
        jm_recipe *rc = NULL;
        jm_error err = {{0}};
        const char *bad = NULL;
        char why[600];
        jm_status s = jm_recipe_parse(buf, t.len, RECIPE_NAME, &rc, &err);
        if (s == JM_OK) {
            accepted++;
            bad = verify_recipe(buf, t.len, rc);
            jm_recipe_free(rc);
            if (!bad) { /* the same text from a file: now the fixture is opened */
                write_bytes(path, buf, t.len);
                rc = NULL;
                s = jm_recipe_load(path, &rc, &err);
                if (s == JM_OK) loaded++;
                else {
                    load_failed++;
                    bad = refusal(&kinds, err.msg, good_message(err.msg, path), why, sizeof why);
                }
                jm_recipe_free(rc);
            }
        } else {
            rejected++;
            bad = refusal(&kinds, err.msg, !rc && good_message(err.msg, RECIPE_NAME), why, sizeof why);
        }
        note(&found, it, bad, "recipe", buf, t.len);
        free(buf);
    }
    double secs = now() - t0;
    if (found.n) check(false, "fuzz_recipe_mutations", "%ld broken results; first: %s", found.n, found.first);
    else if (rejected < iters / 5 || accepted < iters / 20 || loaded < iters / 100 || load_failed < iters / 200)
        check(false, "fuzz_recipe_mutations", "%ld parsed (%ld loaded, %ld failed to load), %ld rejected of %ld: the "
              "mutations do not exercise every path", accepted, loaded, load_failed, rejected, iters);
    else
        check_detail(true, "fuzz_recipe_mutations", "%ld mutated recipes in %.1f s: %ld rejected, %ld parsed, of "
                     "which %ld loaded and %ld failed on the files", iters, secs, rejected, accepted, loaded,
                     load_failed);
    report_kinds("fuzz_recipe_error_variety", &kinds, 40);
}

/* ---- JSONL records ---- */

static const char *const records[] = {
    "{\"text\": \"hello world\"}",
    "{\"text\": \"a\\u0000b\\u0000\", \"id\": 1}",
    "{\"meta\": {\"text\": \"inner\", \"list\": [1, \"x\\\"\", {\"text\": \"no\"}], \"n\": -1.5e3}, "
    "\"text\": \"outer \\ud83d\\ude00 \\\\u0000 tab\\t\", \"ok\": true}",
    "{\"te\\u0078t\": \"escaped key\", \"other\": null}",
    "{\"id\": \"\\\"text\\\": \\\"fake\\\"\", \"text\": \"\"}",
    "  {\"text\": \"\\u00e9\\u4e2d\\uD834\\uDD1E\\/\\b\\f\\n\\r\"}  ",
    "{\"a\": [[], {}, [{\"b\": [\"text\"]}]], \"text\": \"</s> after <s>\\u0000\"}",
};

/* The independent reading: line with every \u0000 escape made \u0001, parsed
 * by cJSON; its "text" (malloc'd), or NULL. */
static char *reference_text(const char *line, size_t len)
{
    char *copy = malloc(len + 1);
    memcpy(copy, line, len);
    copy[len] = 0;
    for (size_t i = 0; i + 5 < len; i++)
        if (copy[i] == '\\') {
            if (memcmp(copy + i + 1, "u0000", 5) == 0) copy[i + 5] = '1';
            i++;
        }
    cJSON *root = cJSON_ParseWithLength(copy, len);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(root, "text");
    char *out = cJSON_IsString(t) ? strdup(t->valuestring) : NULL;
    cJSON_Delete(root);
    free(copy);
    return out;
}

static bool has_nul_escape(const char *line, size_t len)
{
    for (size_t i = 0; i + 5 < len; i++)
        if (line[i] == '\\') {
            if (memcmp(line + i + 1, "u0000", 5) == 0) return true;
            i++;
        }
    return false;
}

static void fuzz_jsonl(long iters, uint64_t seed)
{
    enum { NREC = sizeof records / sizeof records[0] };
    static text seeds[NREC], t;
    rng r = {seed ? seed : 1};
    const char *where = "data.jsonl:7";
    for (int i = 0; i < NREC; i++) {
        seeds[i].len = strlen(records[i]);
        memcpy(seeds[i].p, records[i], seeds[i].len);
    }
    /* the seeds as they must read (lengths from the literals: some hold NULs) */
#define BYTES(lit) {lit, sizeof lit - 1}
    static const struct {
        const char *text;
        size_t n;
    } want[NREC] = {BYTES("hello world"), BYTES("a\0b\0"), BYTES("outer \xf0\x9f\x98\x80 \\u0000 tab\t"),
                    BYTES("escaped key"), BYTES(""), BYTES("\xc3\xa9\xe4\xb8\xad\xf0\x9d\x84\x9e/\b\f\n\r"),
                    BYTES("</s> after <s>\0")};
#undef BYTES
    int bad_seed = -1;
    char seed_why[sizeof(jm_error) + 64] = "";
    for (int i = 0; i < NREC && bad_seed < 0; i++) {
        char *out = NULL;
        size_t n = 0;
        jm_error err = {{0}};
        jm_status s = jm_jsonl_text(seeds[i].p, seeds[i].len, where, &out, &n, &err);
        if (s || n != want[i].n || memcmp(out, want[i].text, n) != 0 || out[n] != 0) {
            bad_seed = i;
            snprintf(seed_why, sizeof seed_why, "%s, %zu bytes", s ? err.msg : "read", n);
        }
        free(out);
    }
    if (!check(bad_seed < 0, "fuzz_jsonl_seeds_read", "record %d: %s", bad_seed, seed_why)) return;

    long accepted = 0, rejected = 0, with_nul = 0;
    findings found = {0, ""};
    static kind_set kinds;
    double t0 = now();
    for (long it = 0; it < iters; it++) {
        int which = (int)below(&r, NREC);
        t = seeds[which];
        int n_mut = 1 + (int)below(&r, 3);
        for (int m = 0; m < n_mut; m++) mutate(&r, &t, &seeds[below(&r, NREC)]);
        char *buf = malloc(t.len ? t.len : 1);
        memcpy(buf, t.p, t.len);
        char *out = NULL, why[600];
        size_t n = 0;
        jm_error err = {{0}};
        const char *bad = NULL;
        jm_status s = jm_jsonl_text(buf, t.len, where, &out, &n, &err);
        if (s == JM_OK) {
            accepted++;
            char *ref = reference_text(buf, t.len);
            bool same = ref && strlen(ref) == n && out[n] == 0;
            for (size_t i = 0; same && i < n; i++) same = (out[i] ? out[i] : '\x01') == ref[i];
            with_nul += memchr(out, 0, n) != NULL;
            if (!same) {
                snprintf(why, sizeof why, "text of %zu bytes differs from the reference (%s)", n, ref ? "" : "none");
                bad = why;
            }
            free(ref);
            free(out);
        } else {
            rejected++;
            /* the one refusal a valid record may get: a "text" key cut by \u0000 */
            bool cannot_read = strstr(err.msg, "cannot read") != NULL;
            bad = refusal(&kinds, err.msg,
                          !out && good_message(err.msg, where) && (!cannot_read || has_nul_escape(buf, t.len)), why,
                          sizeof why);
        }
        note(&found, it, bad, "record", buf, t.len);
        free(buf);
    }
    double secs = now() - t0;
    if (found.n) check(false, "fuzz_jsonl_mutations", "%ld broken results; first: %s", found.n, found.first);
    else if (rejected < iters / 5 || accepted < iters / 20 || with_nul < iters / 200)
        check(false, "fuzz_jsonl_mutations", "%ld accepted (%ld with a NUL), %ld rejected of %ld: the mutations do "
              "not exercise every path", accepted, with_nul, rejected, iters);
    else
        check_detail(true, "fuzz_jsonl_mutations", "%ld mutated records in %.1f s: %ld read (%ld with a NUL byte, "
                     "kept), %ld rejected", iters, secs, accepted, with_nul, rejected);
    report_kinds("fuzz_jsonl_error_variety", &kinds, 5);
}

int main(int argc, char **argv)
{
    long iters = argc > 1 ? strtol(argv[1], NULL, 0) : 12000;
    uint64_t seed = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x5eed;
    char dir[] = "/tmp/jm_fuzz_recipe_XXXXXX";
    temp_dir(dir);
    fuzz_recipes(iters, seed, dir);
    fuzz_jsonl(5 * iters, seed ^ 0x9e3779b97f4a7c15ull);
    temp_dir_done(dir);
    return exit_status();
}
