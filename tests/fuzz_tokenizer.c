/* fuzz_tokenizer.c — deterministic mutation fuzzer of the tokenizer's readers.
 *
 *   model     tokenizer.model (protobuf): BPE models trained here with spm_train (identity
 *             normalisation with byte fallback; custom normalisation rules), and Llama-2's,
 *             cut to 600 pieces, when ../shared/fixtures has it; mutated anywhere (fuzz.h)
 *   charsmap  the precompiled charsmap (double-array trie + string pool) of the rules model
 *             (and, less often, of the full nmt_nfkc one): units, pool and the trie size
 *             rewritten in place, then texts that hit the rules normalised through it
 *   json      tokenizer.json as jm_tokenizer_save_json writes it, mutated with JSON tokens
 *   template  tokenizer_config.json (chat_template, eos/bos strings, the list form) around the
 *             real templates of tests/data/templates (and built-in ones): mostly one small
 *             edit (a name, attribute, filter, test, string, number or operator swapped for
 *             another; a tag copied, moved, dropped), now and then Jinja tokens or bytes; the
 *             file now and then too; read with tk_load_config, then rendered and encoded on a
 *             conversation (a third of them as JSON with tools)
 *   chat_json conversations as JSON (jm_chat_render_json, jm_chat_encode_json) with the real
 *             templates: edits inside strings (escapes, surrogates), wrong types, deep nesting,
 *             huge numbers, long strings, NUL bytes, broken JSON
 *
 * Every input is parsed from a buffer of exactly its length, so AddressSanitizer sees any read
 * past the end. A refusal must be one line that names the file, with nothing returned; an
 * accepted tokenizer must encode texts to ids in range and decode them to valid UTF-8; an
 * accepted template must render a non-empty text for a non-empty conversation and encode it;
 * a conversation must render and encode to ids in range or fail with one clean line.
 *
 * Usage: fuzz_tokenizer [scale [seed [targets]]]: scale multiplies every target's count
 * (default 1); targets is a comma-separated subset of model,charsmap,json,template,chat_json.
 * Prints "PASS <name> (<count> inputs, ...)" or "FAIL <name>: <why>" per check. Run from the
 * repository root (the Llama-2 fixture is ../shared/fixtures/llama2-tokenizer). */
#include "tokenizer/tokenizer.h"
#include "fuzz.h"
#include "harness.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <dirent.h>
#include <unistd.h>

/* Inputs per target at scale 1: with fuzz_safetensors, over 90,000 in `make test-asan`. */
#define N_MODEL 20000
#define N_CHARSMAP 10000
#define N_JSON 10000
#define N_TEMPLATE 10000
#define N_CHAT_JSON 10000
#define LLAMA "../shared/fixtures/llama2-tokenizer/tokenizer.model"

typedef struct {
    const char *name;
    long inputs, accepted, rejected;
    int bad;
    char first_bad[700];
    fz_shapes shapes;
} target;

static void bad(target *tg, long it, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void bad(target *tg, long it, const char *fmt, ...)
{
    if (!tg->bad++) {
        va_list ap;
        va_start(ap, fmt);
        int k = snprintf(tg->first_bad, sizeof tg->first_bad, "input %ld: ", it);
        vsnprintf(tg->first_bad + k, sizeof tg->first_bad - (size_t)k, fmt, ap);
        va_end(ap);
    }
}

/* A refusal: one line, naming the file, nothing that a terminal would act on. */
static void refused(target *tg, long it, const char *file, const jm_error *err)
{
    tg->rejected++;
    bool ctl = false;
    for (const char *p = err->msg; *p; p++) ctl |= (unsigned char)*p < 0x20 || *p == 0x7f;
    if (!err->msg[0] || strncmp(err->msg, file, strlen(file)) != 0 || ctl)
        bad(tg, it, "bad refusal: \"%.500s\"", err->msg);
    fz_shapes_add(&tg->shapes, err->msg, file);
}

static bool valid_utf8(const char *s, size_t n)
{
    size_t i = 0, k;
    while (i < n && (k = jm_utf8_char((const uint8_t *)s + i, n - i))) i += k;
    return i == n;
}

/* Texts for a tokenizer that loaded: the charsmap rules' sources, invalid
 * UTF-8, control characters, special strings, and random bytes. */
static const char *const texts[] = {
    "Hello world, the router picks 2 experts!", "  leading and   inner  spaces  ",
    "\xef\xbc\xa1\xef\xbc\xa2 AB caf\xc3\xa9 \xef\xac\x81 \xe2\x84\xa6 \xc3\x85 \xe3\x80\x80x\xe2\x80\xa8y \xf0\x9f\x98\x80",
    "\xff\xfe bad \xc0\x80 bytes \xed\xa0\x80 \xe2\x82", "<s> </s> <unk> <0x41> \xe2\x96\x81\xe2\x96\x81",
    "tab\tnew\nline\r\x01\x7f", "",
};

static void exercise(target *tg, long it, const jm_tokenizer *t, uint64_t *r)
{
    char rand_text[96];
    size_t rn = below(r, sizeof rand_text);
    for (size_t i = 0; i < rn; i++) {
        const char *src = texts[2];
        rand_text[i] = below(r, 3) ? src[below(r, strlen(src))] : (char)rnd(r);
    }
    for (size_t k = 0; k <= FZ_COUNT(texts); k++) {
        const char *text = k < FZ_COUNT(texts) ? texts[k] : rand_text;
        size_t len = k < FZ_COUNT(texts) ? strlen(text) : rn;
        int32_t *ids = NULL;
        size_t n = 0;
        char *out = NULL;
        size_t out_len = 0;
        jm_error err = {{0}};
        if (jm_tokenizer_encode(t, text, len, &ids, &n, &err)) {
            bad(tg, it, "a loaded tokenizer cannot encode text %zu: %s", k, err.msg);
            return;
        }
        for (size_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= t->n) {
                bad(tg, it, "id %d outside [0, %d) for text %zu", ids[i], t->n, k);
                break;
            }
        if (jm_tokenizer_decode(t, ids, n, &out, &out_len, &err)) bad(tg, it, "decode of text %zu: %s", k, err.msg);
        else if (!valid_utf8(out, out_len)) bad(tg, it, "text %zu decodes to invalid UTF-8", k);
        free(out);
        free(ids);
    }
}

static void report_target(const target *tg, int min_shapes)
{
    if (tg->bad)
        check(false, tg->name, "%d broken results; first: %s", tg->bad, tg->first_bad);
    else if (tg->accepted < tg->inputs / 200 || tg->rejected < tg->inputs / 20)
        check(false, tg->name, "%ld accepted, %ld refused of %ld: the mutations do not exercise both paths",
              tg->accepted, tg->rejected, tg->inputs);
    else
        check_detail(true, tg->name, "%ld inputs, %ld accepted, %ld refused", tg->inputs, tg->accepted, tg->rejected);
    char name[96];
    snprintf(name, sizeof name, "%s_error_variety", tg->name);
    check_detail(tg->shapes.n >= min_shapes, name, "%d kinds of error reached (at least %d expected)", tg->shapes.n,
                 min_shapes);
    if (getenv("JM_FUZZ_VERBOSE"))
        for (int k = 0; k < tg->shapes.n; k++) printf("  %s\n", tg->shapes.shape[k]);
}

/* ---- seeds ---- */

static bool run_quiet(const char *cmd)
{
    char full[4400];
    snprintf(full, sizeof full, "%s >/dev/null 2>&1", cmd);
    return system(full) == 0;
}

static void write_corpus(const char *path)
{
    static const char *const words[] = {"the", "model", "router", "expert", "token", "attention", "mixture",
                                        "caf\xc3\xa9", "na\xc3\xafve", "\xef\xac\x81le", "\xe2\x84\xa6hm", "AB",
                                        "\xef\xbc\xa1\xef\xbc\xa2", "\xc3\x85ngstr\xc3\xb6m", "42", "3.14", "!", "?",
                                        "(x)", "\xe6\x97\xa5\xe6\x9c\xac", "\xf0\x9f\x98\x80"};
    FILE *f = fopen(path, "wb");
    if (!f) exit(2);
    uint64_t r = 7;
    for (int line = 0; line < 4000; line++) {
        for (int w = 0, n = 3 + line % 11; w < n; w++)
            fprintf(f, "%s%s", w ? " " : "", words[below(&r, FZ_COUNT(words))]);
        fputc('\n', f);
    }
    fclose(f);
}

static bool read_into(const char *path, fz_bytes *b)
{
    size_t n;
    char *p = slurp(path, &n);
    if (!p) return false;
    fz_assign(b, p, n);
    free(p);
    return true;
}

/* The ModelProto field 3 (NormalizerSpec) -> field 2 (precompiled_charsmap): its
 * offset and length in the file, or 0 if the walk fails. */
static uint64_t pb_varint(const uint8_t *p, size_t n, size_t *i)
{
    uint64_t v = 0;
    for (int s = 0; *i < n && s < 64; s += 7) {
        v |= (uint64_t)(p[*i] & 0x7f) << s;
        if (!(p[(*i)++] & 0x80)) break;
    }
    return v;
}

static bool find_field(const uint8_t *p, size_t n, uint64_t field, size_t *at, size_t *len)
{
    size_t i = 0;
    while (i < n) {
        uint64_t tag = pb_varint(p, n, &i), l;
        switch (tag & 7) {
        case 0: pb_varint(p, n, &i); continue;
        case 1: i += 8; continue;
        case 5: i += 4; continue;
        case 2:
            l = pb_varint(p, n, &i);
            if (l > n - i) return false;
            if (tag >> 3 == field) {
                *at = i, *len = (size_t)l;
                return true;
            }
            i += (size_t)l;
            continue;
        default: return false;
        }
    }
    return false;
}

static bool charsmap_range(const fz_bytes *m, size_t *at, size_t *len)
{
    size_t ns, ns_len, cm, cm_len;
    if (!find_field(m->p, m->len, 3, &ns, &ns_len) || !find_field(m->p + ns, ns_len, 2, &cm, &cm_len)) return false;
    *at = ns + cm, *len = cm_len;
    return cm_len >= 4;
}

/* The first keep pieces of a ModelProto and everything that is not a piece:
 * a real file's bytes, small enough to load thousands of times. */
static void shrink_model(const fz_bytes *in, int keep, fz_bytes *out)
{
    size_t i = 0;
    int pieces = 0;
    out->len = 0;
    while (i < in->len) {
        size_t start = i;
        uint64_t tag = pb_varint(in->p, in->len, &i);
        if ((tag & 7) != 2) return;
        uint64_t l = pb_varint(in->p, in->len, &i);
        if (l > in->len - i) return;
        i += (size_t)l;
        if ((tag >> 3) == 1 && pieces++ >= keep) continue;
        fz_splice(out, out->len, 0, in->p + start, i - start);
    }
}

typedef struct {
    fz_bytes ident, rules, nfkc, llama, llama600, json, json_small;
    char dir[64], ident_path[128];
} seeds;

static bool make_seeds(seeds *sd)
{
    memset(sd, 0, sizeof *sd);
    snprintf(sd->dir, sizeof sd->dir, "/tmp/jm_fuzz_tok_XXXXXX");
    temp_dir(sd->dir);
    char corpus[128], rules[128], cmd[2048], path[160];
    snprintf(corpus, sizeof corpus, "%s/corpus.txt", sd->dir);
    snprintf(rules, sizeof rules, "%s/rules.tsv", sd->dir);
    write_corpus(corpus);
    /* NFKC-like rules and a few more, small enough to be a 1 KB charsmap */
    write_text(rules, "FF21\t41\nFF22\t42\n41 42\t43\n3000\t20\nE9\t65 301\nFB01\t66 69\n2126\t3A9\n1F600\t3A 29\n"
                      "C5\t41 30A\n2028\t20\n");
    static const struct {
        const char *prefix, *opts;
    } models[] = {
        {"ident", "--vocab_size=400 --byte_fallback=true --normalization_rule_name=identity --remove_extra_whitespaces=false"},
        {"small", "--vocab_size=150 --normalization_rule_name=identity --remove_extra_whitespaces=false"},
        {"rules", "--vocab_size=400 --byte_fallback=true --normalization_rule_tsv=%s"},
        {"nfkc", "--vocab_size=400 --byte_fallback=true"},
    };
    for (size_t i = 0; i < FZ_COUNT(models); i++) {
        char opts[512];
        snprintf(opts, sizeof opts, models[i].opts, rules);
        snprintf(cmd, sizeof cmd, "spm_train --input=%s --model_prefix=%s/%s --model_type=bpe %s", corpus, sd->dir,
                 models[i].prefix, opts);
        if (!run_quiet(cmd))
            return check(false, "fuzz_tokenizer_seeds", "spm_train failed: %s (is Debian's sentencepiece installed?)",
                         cmd);
    }
    snprintf(sd->ident_path, sizeof sd->ident_path, "%s/ident.model", sd->dir);
    bool ok = read_into(sd->ident_path, &sd->ident);
    snprintf(path, sizeof path, "%s/rules.model", sd->dir);
    ok = ok && read_into(path, &sd->rules);
    snprintf(path, sizeof path, "%s/nfkc.model", sd->dir);
    ok = ok && read_into(path, &sd->nfkc);
    /* tokenizer.json as we write it, from the byte-fallback model and from the small one */
    const char *json_from[2] = {"ident", "small"};
    fz_bytes *json_to[2] = {&sd->json, &sd->json_small};
    jm_error err = {{0}};
    for (int k = 0; k < 2 && ok; k++) {
        jm_tokenizer *t = NULL;
        char from[160], to[160];
        snprintf(from, sizeof from, "%s/%s.model", sd->dir, json_from[k]);
        snprintf(to, sizeof to, "%s/%s.json", sd->dir, json_from[k]);
        ok = !jm_tokenizer_load(from, &t, &err) && !jm_tokenizer_save_json(t, to, &err) && read_into(to, json_to[k]);
        jm_tokenizer_free(t);
    }
    if (read_into(LLAMA, &sd->llama)) shrink_model(&sd->llama, 600, &sd->llama600);
    else printf("# fuzz_tokenizer: no %s, Llama-2 seeds skipped\n", LLAMA);
    return check(ok, "fuzz_tokenizer_seeds", "cannot read or convert the trained models in %s: %s", sd->dir, err.msg);
}

static void free_seeds(seeds *sd)
{
    fz_bytes *all[] = {&sd->ident, &sd->rules, &sd->nfkc, &sd->llama, &sd->llama600, &sd->json, &sd->json_small};
    for (size_t i = 0; i < FZ_COUNT(all); i++) free(all[i]->p);
}

/* Loads b as tokenizer.model or tokenizer.json, checks the result. */
static void load_one(target *tg, long it, const fz_bytes *b, bool json, uint64_t *r)
{
    const char *file = json ? "fuzz/tokenizer.json" : "fuzz/tokenizer.model";
    uint8_t *buf = fz_exact(b);
    jm_tokenizer *t = (jm_tokenizer *)1; /* must come back NULL on a refusal */
    jm_error err = {{0}};
    jm_status s = json ? tk_load_json((const char *)buf, b->len, file, &t, &err)
                       : tk_load_model_proto(buf, b->len, file, &t, &err);
    tg->inputs++;
    if (s) {
        if (t) bad(tg, it, "refused but returned a tokenizer");
        refused(tg, it, file, &err);
    } else {
        tg->accepted++;
        exercise(tg, it, t, r);
        jm_tokenizer_free(t);
    }
    free(buf);
}

/* ---- the targets ---- */

static void fuzz_model(const seeds *sd, long count, uint64_t *r)
{
    static target tg = {.name = "fuzz_tokenizer_model"};
    const fz_bytes *pool[3] = {&sd->ident, &sd->rules, &sd->llama600};
    int npool = sd->llama600.len ? 3 : 2;
    fz_bytes b = {0};
    for (long it = 0; it < count; it++) {
        const fz_bytes *seed = pool[below(r, (size_t)npool)];
        fz_assign(&b, seed->p, seed->len);
        for (int k = 1 + (int)below(r, 3); k > 0; k--) fz_mutate(r, &b, pool[below(r, (size_t)npool)], NULL, 0);
        load_one(&tg, it, &b, false, r);
    }
    /* the whole Llama-2 file: truncations and a few mutations */
    for (long it = 0; sd->llama.len && it < count / 100; it++) {
        fz_assign(&b, sd->llama.p, sd->llama.len);
        if (it % 4) b.len = below(r, b.len);
        else fz_mutate(r, &b, NULL, NULL, 0);
        load_one(&tg, count + it, &b, false, r);
    }
    free(b.p);
    report_target(&tg, 12);
}

/* A 32-bit unit of the double-array trie (see core.c charsmap_match): a
 * label, an offset with its shift bit, a leaf flag, or a value into the pool. */
static uint32_t trie_unit(uint64_t *r, uint32_t index, uint32_t pool)
{
    switch (below(r, 5)) {
    case 0: return (index & 0xff) | (uint32_t)below(r, 2) << 8 | (uint32_t)below(r, 1024) << 10;
    case 1: return 0x80000000u | (uint32_t)below(r, pool + 4);
    case 2: return (uint32_t)below(r, pool + 4);
    case 3: return (uint32_t)fz_bounds[below(r, FZ_COUNT(fz_bounds))];
    default: return (uint32_t)rnd(r);
    }
}

static void fuzz_charsmap(const seeds *sd, long count, uint64_t *r)
{
    static target tg = {.name = "fuzz_tokenizer_charsmap"};
    size_t at[2], len[2];
    const fz_bytes *models[2] = {&sd->rules, &sd->nfkc};
    for (int k = 0; k < 2; k++)
        if (!charsmap_range(models[k], &at[k], &len[k])) {
            check(false, tg.name, "no precompiled_charsmap found in the %s model", k ? "nmt_nfkc" : "rules");
            return;
        }
    fz_bytes b = {0};
    for (long it = 0; it < count; it++) {
        int k = below(r, 20) == 0; /* the 237 KB nmt_nfkc charsmap now and then */
        fz_assign(&b, models[k]->p, models[k]->len);
        uint8_t *cm = b.p + at[k];
        uint32_t trie = (uint32_t)cm[0] | (uint32_t)cm[1] << 8 | (uint32_t)cm[2] << 16 | (uint32_t)cm[3] << 24;
        uint32_t units = trie / 4 < (len[k] - 4) / 4 ? trie / 4 : (uint32_t)((len[k] - 4) / 4);
        uint32_t pool = (uint32_t)(len[k] - 4 - trie);
        for (int m = 1 + (int)below(r, 4); m > 0; m--) {
            switch (below(r, 6)) {
            case 0: { /* the trie size: the boundaries of the blob */
                const uint64_t sizes[] = {0, 1, 3, 4, trie - 4, trie + 4, len[k] - 4, len[k] - 3, len[k], UINT32_MAX};
                uint32_t v = (uint32_t)sizes[below(r, FZ_COUNT(sizes))];
                for (int i = 0; i < 4; i++) cm[i] = (uint8_t)(v >> (8 * i));
                break;
            }
            case 1:
            case 2: { /* a trie unit */
                if (!units) break;
                uint32_t i = (uint32_t)below(r, units), u = trie_unit(r, i, pool);
                memcpy(cm + 4 + 4 * (size_t)i, &u, 4);
                break;
            }
            case 3: /* a pool byte: its NULs end the replacement strings */
                if (pool) cm[4 + trie + below(r, pool)] = below(r, 3) ? (uint8_t)rnd(r) : 0;
                break;
            case 4: /* a bit anywhere in the charsmap */
                cm[below(r, len[k])] ^= (uint8_t)(1u << below(r, 8));
                break;
            default: { /* two units swapped */
                if (units < 2) break;
                uint32_t i = (uint32_t)below(r, units), j = (uint32_t)below(r, units), u, v;
                memcpy(&u, cm + 4 + 4 * (size_t)i, 4), memcpy(&v, cm + 4 + 4 * (size_t)j, 4);
                memcpy(cm + 4 + 4 * (size_t)i, &v, 4), memcpy(cm + 4 + 4 * (size_t)j, &u, 4);
                break;
            }
            }
        }
        load_one(&tg, it, &b, false, r);
    }
    free(b.p);
    report_target(&tg, 1);
}

static const char *const json_tokens[] = {
    "\"", "\\", "\\u0000", "\\ud800", "\\u00e9", "\\n", "{", "}", "[", "]", ",", ":", "{}", "[]", "null", "true",
    "false", "\"\"", "\"type\"", "\"BPE\"", "\"Unigram\"", "\"vocab\"", "\"merges\"", "\"model\"", "\"normalizer\"",
    "\"pre_tokenizer\"", "\"decoder\"", "\"added_tokens\"", "\"Sequence\"", "\"Prepend\"", "\"Replace\"",
    "\"Metaspace\"", "\"ByteFallback\"", "\"Fuse\"", "\"Strip\"", "\"id\"", "\"content\"", "\"special\"",
    "\"<unk>\"", "\"<s>\"", "\"</s>\"", "\"<0x41>\"", "\"\xe2\x96\x81\"", "\"a b\"", "[\"a\", \"b\"]", "-1", "1e9",
    "0.5", "\xef\xbb\xbf", "\xff", "\xc0\x80", "\"byte_fallback\"", "\"unk_token\"", "\"fuse_unk\"", "\"dropout\"",
};

/* A value to put where another was: each JSON type, edge numbers, the format's strings. */
static cJSON *some_value(uint64_t *r)
{
    switch (below(r, 7)) {
    case 0: return cJSON_CreateNull();
    case 1: return cJSON_CreateBool(below(r, 2));
    case 2: return cJSON_CreateNumber(strtod(fz_numbers[below(r, FZ_COUNT(fz_numbers))], NULL));
    case 3: return cJSON_CreateNumber((double)below(r, 600) - 1);
    case 4: return cJSON_CreateArray();
    case 5: return cJSON_CreateObject();
    default: {
        const char *t = json_tokens[below(r, FZ_COUNT(json_tokens))];
        return cJSON_CreateString(t[0] == '"' && strlen(t) > 1 ? "<s>" : t);
    }
    }
}

/* A key for a renamed member: the format's names, quotes taken off. */
static const char *json_key(uint64_t *r)
{
    const char *t = json_tokens[below(r, FZ_COUNT(json_tokens))];
    return t[0] == '"' && strlen(t) > 2 ? "x" : t;
}

/* The changes to a node x of parent p that keep the tree JSON, for both JSON targets: 0 x
 * replaced by a value from make, 1 removed, 2 duplicated (a duplicate key in an object), 3 its
 * key renamed (to one from key), 4 swapped with the next array item. */
static void tree_change(uint64_t *r, int change, cJSON *x, cJSON *p, cJSON *(*make)(uint64_t *r),
                        const char *(*key)(uint64_t *r))
{
    switch (change) {
    case 0: {
        cJSON *v = make(r);
        if (x->string) cJSON_ReplaceItemInObjectCaseSensitive(p, x->string, v);
        else cJSON_ReplaceItemViaPointer(p, x, v);
        break;
    }
    case 1: cJSON_Delete(cJSON_DetachItemViaPointer(p, x)); break;
    case 2: { /* next to itself */
        cJSON *d = cJSON_Duplicate(x, 1);
        if (x->string) cJSON_AddItemToObject(p, x->string, d);
        else cJSON_AddItemToArray(p, d);
        break;
    }
    case 3:
        if (x->string) {
            char *k = strdup(key(r));
            if (k) cJSON_free(x->string), x->string = k;
        }
        break;
    default:
        if (x->next && !x->string) {
            cJSON *a = cJSON_Duplicate(x, 1), *b = cJSON_Duplicate(x->next, 1);
            cJSON_ReplaceItemViaPointer(p, x->next, a);
            cJSON_ReplaceItemViaPointer(p, x, b);
        }
        break;
    }
}

/* One change to the parsed tree that keeps it JSON, so the reader's checks
 * behind the parser are reached: tree_change's, or a number moved by one. */
static void mutate_tree(uint64_t *r, cJSON *x, cJSON *p)
{
    const int change = (int)below(r, 6);
    if (change < 5) tree_change(r, change, x, p, some_value, json_key);
    else if (cJSON_IsNumber(x)) cJSON_SetNumberValue(x, x->valuedouble + (below(r, 2) ? 1 : -1));
}

static void fuzz_json(const seeds *sd, long count, uint64_t *r)
{
    static target tg = {.name = "fuzz_tokenizer_json"};
    const fz_bytes *pool[2] = {&sd->json_small, &sd->json};
    fz_bytes b = {0};
    for (long it = 0; it < count; it++) {
        const fz_bytes *seed = pool[below(r, 4) == 0]; /* the larger (byte fallback) file a quarter of the time */
        fz_assign(&b, seed->p, seed->len);
        if (below(r, 2)) { /* changes that keep it JSON */
            fz_mutate_json(r, &b, 1 + (int)below(r, 2), mutate_tree);
        } else {
            for (int k = 1 + (int)below(r, 2); k > 0; k--)
                fz_mutate(r, &b, pool[below(r, 2)], json_tokens, FZ_COUNT(json_tokens));
        }
        load_one(&tg, it, &b, true, r);
    }
    free(b.p);
    report_target(&tg, 25);
}

/* ---- chat templates ---- */

/* The real templates (Llama-2, Mistral, Zephyr, ChatML, Qwen2.5 with tools, Gemma, Phi-3 ...,
 * and the Jinja features they use); read at run time, from the repository root. */
#define TEMPLATE_DIR "tests/data/templates"

/* Built-in templates in the forms real tokenizer_config.json files use: seeds too, and the
 * only ones when TEMPLATE_DIR is not there. */
static const char *const builtin_templates[] = {
    NULL, /* jm_default_chat_template */
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "{% if messages[0]['role'] == 'system' %}{% set rest = messages[1:] %}{% set sys = messages[0]['content'] %}"
    "{% else %}{% set rest = messages %}{% set sys = false %}{% endif %}{% for m in rest %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "{% if loop.first and sys %}{% set c = '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' + m['content'] %}"
    "{% else %}{% set c = m['content'] %}{% endif %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + c.strip() + ' [/INST]' }}{% else %}{{ ' ' + c | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}",
    "{{ bos_token }}{%- for m in messages -%}\n  {%- if m.role == 'assistant' -%}{{ m.content ~ eos_token }}\n"
    "  {%- else -%}{{ '<' ~ m.role|upper ~ '>' ~ m['content'][:40] ~ '\\n' }}{%- endif -%}\n{%- endfor -%}\n"
    "{# a comment #}{{ messages|length }}{% if not loop is defined and messages[-1].role in ['user'] %}!{% endif %}",
    "{%- for m in messages %}{{- m.role | tojson }}: {{ m | tojson(indent=2) }}{{ [m.content, 1, none, true] | "
    "tojson }}\n{% endfor %}{{ messages[1:] | tojson(indent=4) }}",
    "{%- set ns = namespace(sys='', n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.sys = m.content %}"
    "{% else %}{% set ns.n = ns.n + 1 %}{{ m.role ~ ':' ~ m.content }}\n{% endif %}{% endfor %}{{ ns.sys }}{{ ns.n }}",
    "{%- macro turn(role, content, sep=': ') -%}{{ role | capitalize }}{{ sep }}{{ content | replace('\\n', ' ') }}"
    "{%- endmacro %}{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
    "{{ strftime_now('%d %b %Y') }}{% for k, v in {'a': 1, 'b': [2]}.items() %}{{ k }}={{ v }}{% endfor %}"
    "{% for m in messages | selectattr('role', 'equalto', 'user') %}{{ turn(m.role, m.content) }}{% endfor %}"
    "{{ messages | map(attribute='role') | unique | join(', ') }}{{ messages | rejectattr('role', 'ne', 'user') | list "
    "| length }}{{ [1, 2, 3] | select('odd') | map('string') | join }}{{ f(messages | length) }}{{ ('a', 1) }}",
};

typedef struct {
    const char *src[96], *name[96];
    char *owned[160]; /* what the file seeds hold: freed at the end */
    int n, nowned, from_files;
} template_seeds;

/* TEMPLATE_DIR's *.jinja in name order, then the built-in ones. */
static void load_template_seeds(template_seeds *ts)
{
    memset(ts, 0, sizeof *ts);
    struct dirent **ents = NULL;
    int ne = scandir(TEMPLATE_DIR, &ents, NULL, alphasort);
    for (int i = 0; i < ne; i++) {
        const char *nm = ents[i]->d_name;
        size_t l = strlen(nm), n;
        char path[512];
        snprintf(path, sizeof path, "%s/%s", TEMPLATE_DIR, nm);
        char *s = l > 6 && !strcmp(nm + l - 6, ".jinja") && ts->n < 64 ? slurp(path, &n) : NULL;
        if (s && strlen(s) == n) {
            char *name = strdup(nm);
            if (!name) exit(2);
            ts->owned[ts->nowned++] = s, ts->owned[ts->nowned++] = name;
            ts->src[ts->n] = s, ts->name[ts->n++] = name, ts->from_files++;
        } else {
            free(s);
        }
        free(ents[i]);
    }
    free(ents);
    if (!ts->from_files) printf("# fuzz_tokenizer: no %s/*.jinja, built-in templates only\n", TEMPLATE_DIR);
    for (size_t i = 0; i < FZ_COUNT(builtin_templates); i++) {
        ts->name[ts->n] = i ? "built-in" : "default";
        ts->src[ts->n++] = builtin_templates[i] ? builtin_templates[i] : jm_default_chat_template;
    }
}

static const char *const jinja_tokens[] = {
    "{{", "}}", "{%", "%}", "{#", "#}", "{%-", "-%}", " for ", " endfor ", " if ", " elif ", " else ", " endif ",
    " set ", " in ", " not ", " and ", " or ", " is ", " defined ", "none", "true", "loop.index0", "loop.last",
    "loop.length", "messages", "message", "m['role']", "m['content']", "m.content", "add_generation_prompt",
    "bos_token", "eos_token", "raise_exception('x')", "|trim", "|length", "|upper", "|lower", ".strip()",
    ".startswith('a')", "[1:]", "[::-1]", "[-1]", "[0]", "+", "~", "==", "!=", "%", "*", "(", ")", "[", "]", ",",
    "'", "\"", "\\n", "\\u00e9", "\\x41", "'x' * 3", "range(3)", "namespace(a=1)", ".items()", "{'a': 1}", "1",
    "-1", "9999999999999999999", "\xff", "\xe2\x96\x81", "|tojson", "|tojson(indent=2)",
    " macro ", " endmacro ", "m(1)", "m(a=1)", "f(n - 1)", " call ", "caller()", ".keys()", ".values()", "k, v",
    "(1, 2)", "('a',)", "|join(', ')", "|join(attribute='role')", "|map(attribute='role')", "|map('upper')",
    "|selectattr('role', 'equalto', 'user')", "|rejectattr('role')", "|select('odd')", "|reject('divisibleby', 2)",
    "|list", "|capitalize", "|title", "|replace('a', 'b')", "|items", "|unique", " divisibleby 2", " is eq 1",
    "strftime_now('%d %b %Y')", "strftime_now('%99999Y')", " if m.role != 'system' ", " recursive ", "range(2, 9, 3)",
    "range(100000)",
};

static const jm_chat_message conversation[] = {
    {"system", "You are \"helpful\" \xe2\x80\x94 caf\xc3\xa9."},
    {"user", "Hello </s> <s> world\n\t{{ not a template }}"},
    {"assistant", "Hi! \xf0\x9f\x98\x80 \xef\xbc\xa1"},
    {"user", ""},
};

/* A tokenizer_config.json around a template: string or list form, special strings as strings or AddedToken dicts. */
static char *config_json(uint64_t *r, const char *tmpl, size_t n)
{
    char *t = malloc(n + 1);
    if (!t) exit(2);
    memcpy(t, tmpl, n), t[n] = 0;
    cJSON *c = cJSON_CreateObject(), *tc;
    if (below(r, 4)) {
        tc = cJSON_CreateString(t);
    } else {
        tc = cJSON_CreateArray();
        cJSON *e = cJSON_CreateObject(), *d = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "name", "tool_use"), cJSON_AddStringToObject(e, "template", "{{ 1 }}");
        cJSON_AddStringToObject(d, "name", "default"), cJSON_AddStringToObject(d, "template", t);
        cJSON_AddItemToArray(tc, e), cJSON_AddItemToArray(tc, d);
    }
    cJSON_AddItemToObject(c, "chat_template", tc);
    if (below(r, 2)) {
        cJSON *bos = cJSON_AddObjectToObject(c, "bos_token");
        cJSON_AddStringToObject(bos, "content", "<s>"), cJSON_AddFalseToObject(bos, "lstrip");
    }
    cJSON_AddStringToObject(c, "eos_token", below(r, 8) ? "</s>" : "<|im_end|>");
    char *text = cJSON_PrintUnformatted(c);
    cJSON_Delete(c);
    free(t);
    if (!text) exit(2);
    return text;
}

/* ---- small edits of a template ----
 * Most mutations change one lexical piece inside a tag for another of its kind (a name, an
 * attribute, a method, a filter, a test, and/or/in, a string, a number, an operator) or move,
 * copy or drop one whole tag, so that most inputs still parse and the renderer's evaluation
 * (undefined names, wrong types, filters on the wrong values, loops over strings ...) is what
 * gets exercised; byte-level mutations are the minority. */
enum { P_NAME, P_ATTR, P_METHOD, P_FILTER, P_TEST, P_LOGIC, P_STRING, P_NUMBER, P_OP, P_TAG, P_KINDS };

typedef struct {
    uint32_t at, len;
    int kind;
} piece;

/* What each piece becomes: mostly what the renderer supports (chat_template.c's list), a few
 * that it refuses (an undefined name, an unsupported filter, method, test, float, operator). */
static const char *const piece_names[] = {
    "messages", "message", "tools", "add_generation_prompt", "bos_token", "eos_token", "loop.index0",
    "loop.first", "loop.last", "loop.length", "none", "None", "true", "false", "True", "nothing_here",
    "messages[0]", "messages[-1]", "messages[0]['content']", "namespace(x=1)", "[1, 'a', none]",
    "{'role': 'user'}", "''", "0",
};
static const char *const piece_attrs[] = {"role", "content", "name", "tool_calls", "function", "arguments", "type",
                                          "text", "index0", "first", "last", "length", "missing"};
static const char *const piece_methods[] = {"strip", "lstrip", "rstrip", "upper", "lower", "startswith",
                                            "endswith", "split", "replace", "get", "title"};
static const char *const piece_filters[] = {"trim", "length", "count", "upper", "lower", "first", "last",
                                            "default", "d", "string", "tojson", "tojson(indent=2)", "join"};
static const char *const piece_tests[] = {"defined", "undefined", "none", "string", "number", "integer", "boolean",
                                          "true", "false", "mapping", "sequence", "iterable", "odd", "even",
                                          "divisibleby(2)"};
static const char *const piece_logic[] = {"and", "or", "in", "not in"};
static const char *const piece_strings[] = {"''", "'x'", "'\\n'", "\"\\\"\"", "'caf\xc3\xa9'", "'</s>'", "'<s>'",
                                            "'{{'", "'%}'", "'user'", "'assistant'", "'system'", "'tool'",
                                            "'\\u00e9'", "'\\x41'", "'\xff'", "'a' ~ 'b'", "\"it's\""};
static const char *const piece_numbers[] = {"0", "1", "-1", "2", "3", "10", "-0", "9999999999999999999", "100000",
                                            "1.5"};
static const char *const piece_ops[] = {"==", "!=", "<", ">", "<=", ">=", "+", "-", "*", "//", "%", "~", "/"};

static bool word_in(const uint8_t *w, size_t n, const char *const *list, size_t nlist)
{
    for (size_t i = 0; i < nlist; i++)
        if (strlen(list[i]) == n && !memcmp(list[i], w, n)) return true;
    return false;
}

/* The pieces of a template (a tag and what is in it), up to cap. */
static int template_pieces(const uint8_t *p, size_t n, piece *out, int cap)
{
    static const char *const structural[] = {"for", "endfor", "if", "elif", "else", "endif", "set", "endset",
                                             "macro", "endmacro", "raw", "endraw", "is", "not", "recursive",
                                             "filter", "endfilter", "call", "generation", "endgeneration"};
    static const char *const logic[] = {"and", "or", "in"};
    int k = 0;
    size_t i = 0;
#define PIECE(a, l, kd) (k < cap ? (void)(out[k++] = (piece){(uint32_t)(a), (uint32_t)(l), (kd)}) : (void)0)
    while (i + 1 < n) {
        if (p[i] == '{' && p[i + 1] == '#') {
            for (i += 2; i + 1 < n && !(p[i] == '#' && p[i + 1] == '}'); i++) {}
            i += 2;
            continue;
        }
        if (p[i] != '{' || (p[i + 1] != '{' && p[i + 1] != '%')) {
            i++;
            continue;
        }
        const uint8_t close = p[i + 1] == '{' ? '}' : '%';
        const size_t tag = i;
        uint8_t prev = 0;
        bool after_is = false, binds = false, in_for = false; /* for/set's names and for's 'in' left alone */
        for (i += 2; i < n && !(p[i] == close && i + 1 < n && p[i + 1] == '}');) {
            const uint8_t c = p[i];
            size_t j = i + 1;
            if (c == '\'' || c == '"') {
                while (j < n && p[j] != c) j += p[j] == '\\' ? 2 : 1;
                if (j >= n) break;
                PIECE(i, j + 1 - i, P_STRING);
                i = j + 1, prev = 's';
                continue;
            }
            if (isalpha(c) || c == '_') {
                while (j < n && (isalnum(p[j]) || p[j] == '_')) j++;
                const size_t wl = j - i;
                int kind = -1;
                if (prev == '.') kind = j < n && p[j] == '(' ? P_METHOD : P_ATTR;
                else if (prev == '|') kind = P_FILTER;
                else if (after_is && !word_in(p + i, wl, (const char *const[]){"not"}, 1)) kind = P_TEST;
                else if (in_for && word_in(p + i, wl, (const char *const[]){"in"}, 1)) in_for = false;
                else if (word_in(p + i, wl, logic, FZ_COUNT(logic))) kind = P_LOGIC;
                else if (!binds && !word_in(p + i, wl, structural, FZ_COUNT(structural))) kind = P_NAME;
                binds = word_in(p + i, wl, (const char *const[]){"for", "set"}, 2);
                in_for |= word_in(p + i, wl, (const char *const[]){"for"}, 1);
                after_is = word_in(p + i, wl, (const char *const[]){"is"}, 1) ||
                           (after_is && word_in(p + i, wl, (const char *const[]){"not"}, 1));
                if (kind >= 0) PIECE(i, wl, kind);
                i = j, prev = 'w';
                continue;
            }
            if (isdigit(c)) {
                while (j < n && (isdigit(p[j]) || p[j] == '.')) j++;
                PIECE(i, j - i, P_NUMBER);
                i = j, prev = '0';
                continue;
            }
            /* an operator, but not the whitespace control next to the delimiters */
            if (strchr("=!<>+*/~%-", c) && !(c == '-' && (i == tag + 2 || (j < n && p[j] == close)))) {
                if (j < n && strchr("=/*", p[j]) && p[j]) j++;
                PIECE(i, j - i, P_OP);
                i = j, prev = c;
                continue;
            }
            if (!isspace(c)) prev = c;
            i++;
        }
        if (i + 1 >= n) break;
        i += 2;
        PIECE(tag, i - tag, P_TAG);
    }
#undef PIECE
    return k;
}

static const char *replacement(uint64_t *r, int kind)
{
#define PICK(list) list[below(r, FZ_COUNT(list))]
    switch (kind) {
    case P_NAME: return PICK(piece_names);
    case P_ATTR: return PICK(piece_attrs);
    case P_METHOD: return PICK(piece_methods);
    case P_FILTER: return PICK(piece_filters);
    case P_TEST: return PICK(piece_tests);
    case P_LOGIC: return PICK(piece_logic);
    case P_STRING: return PICK(piece_strings);
    case P_NUMBER: return PICK(piece_numbers);
    default: return PICK(piece_ops);
    }
#undef PICK
}

/* One edit of the template in b; other is another template to splice from. */
static void template_edit(uint64_t *r, fz_bytes *b, const fz_bytes *other)
{
    static piece pc[8192];
    const int n = template_pieces(b->p, b->len, pc, (int)FZ_COUNT(pc));
    const size_t how = below(r, 100);
    if (how < 88 && n > 0) {
        /* a whole tag 1 time in 8, else a piece inside one */
        const bool want_tag = below(r, 8) == 0;
        piece s = pc[below(r, (size_t)n)];
        for (int tries = 0; tries < 16 && (s.kind == P_TAG) != want_tag; tries++) s = pc[below(r, (size_t)n)];
        if (s.kind != P_TAG) {
            const char *rep = replacement(r, s.kind);
            fz_splice(b, s.at, s.len, rep, strlen(rep));
            return;
        }
        char *copy = malloc(s.len);
        if (!copy) exit(2);
        memcpy(copy, b->p + s.at, s.len);
        switch (below(r, 4)) {
        case 0: fz_splice(b, s.at + s.len, 0, copy, s.len); break; /* twice */
        case 1: fz_splice(b, s.at, s.len, NULL, 0); break;         /* gone */
        case 2:                                                     /* whitespace control on or off */
            if (s.len > 4 && b->p[s.at + 2] == '-') fz_splice(b, s.at + 2, 1, NULL, 0);
            else fz_splice(b, s.at + 2, 0, "-", 1);
            break;
        default: { /* moved before another tag */
            const piece d = pc[below(r, (size_t)n)];
            if (d.kind != P_TAG || d.at == s.at) break;
            fz_splice(b, s.at, s.len, NULL, 0);
            fz_splice(b, d.at > s.at ? d.at - s.len : d.at, 0, copy, s.len);
            break;
        }
        }
        free(copy);
    } else if (how < 94) { /* a Jinja token over a few bytes, or between them */
        const char *tok = jinja_tokens[below(r, FZ_COUNT(jinja_tokens))];
        fz_splice(b, below(r, b->len + 1), below(r, 3) ? 0 : below(r, 8), tok, strlen(tok));
    } else {
        fz_mutate(r, b, other, jinja_tokens, FZ_COUNT(jinja_tokens));
    }
}

/* ---- conversations as JSON (jm_chat_render_json) ---- */

/* Valid conversations in the forms apply_chat_template takes: text and text parts, a system
 * turn, tools with a call and its result, an empty list. */
static const char *const conv_seeds[] = {
    "[{\"role\": \"system\", \"content\": \"You are \\\"helpful\\\" \\u2014 caf\\u00e9.\"}, {\"role\": \"user\", "
    "\"content\": \"Hello </s> <s> world\\n\\t{{ not a template }} \\ud83d\\ude00\"}, {\"role\": \"assistant\", "
    "\"content\": \"Hi!\"}, {\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"part one\"}, "
    "{\"type\": \"text\", \"text\": \" and two\"}]}]",
    "{\"messages\": [{\"role\": \"user\", \"content\": \"What is 2+2?\"}], \"tools\": [{\"type\": \"function\", "
    "\"function\": {\"name\": \"add\", \"description\": \"Adds two numbers\", \"parameters\": {\"type\": \"object\", "
    "\"properties\": {\"a\": {\"type\": \"integer\"}, \"b\": {\"type\": \"integer\"}}, \"required\": [\"a\", \"b\"]}}}]}",
    "{\"messages\": [{\"role\": \"user\", \"content\": \"add 1 and 2\"}, {\"role\": \"assistant\", \"content\": \"\", "
    "\"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}}]}, "
    "{\"role\": \"tool\", \"name\": \"add\", \"content\": \"3\"}, {\"role\": \"assistant\", \"content\": \"3.\"}], "
    "\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"add\", \"parameters\": {}}}]}",
    "[{\"role\": \"user\", \"content\": \"x\"}]",
    "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"\"}]}], \"tools\": null}",
    "[]",
};

static const char *const conv_tokens[] = {
    "\"", "\\", "\\\"", "\\u0000", "\\ud800", "\\udc00", "\\ud83d\\ude00", "\\ud800\\u0041", "\\uDFFF", "\\u00",
    "\\uzzzz", "\\x41", "\\n", "\\/", "{", "}", "[", "]", ",", ":", "{}", "[]", "null", "true", "false", "1e999",
    "-0", "0.5", "123456789012345678901234567890", "-9223372036854775809", "\"role\"", "\"content\"",
    "\"messages\"", "\"tools\"", "\"type\"", "\"text\"", "\"image_url\"", "\"user\"", "\"assistant\"",
    "\"system\"", "\"tool\"", "\"tool_calls\"", "\xff", "\xc0\x80", "\xed\xa0\x80", "\xef\xbb\xbf", "\x01", "\t",
};

static const char *const conv_strings[] = {
    "user", "assistant", "system", "tool", "", "text", "image", "</s>", "<s>", "{{ messages }}", "{% endfor %}",
    "line\nbreak\r\x01\x7f", "caf\xc3\xa9 \xf0\x9f\x98\x80", "\xed\xa0\x80", "\xff\xfe", "<|im_end|>", "\xc2\x85",
};
static const char *const conv_keys[] = {"role", "content", "messages", "tools", "type", "text", "name",
                                        "tool_calls", "function", "arguments", "Role", "", "x", "content "};

/* A value of any JSON type for where another was: edge and huge numbers, nested arrays
 * (past cJSON's nesting limit of 1000 now and then), long strings, text parts. */
static cJSON *conv_value(uint64_t *r)
{
    static const double numbers[] = {0, -0.0, 1, -1, 0.5, 1e300, -1e300, 9007199254740993.0, 2147483648.0,
                                     -9.3e18, 1e19, 4.9e-324};
    switch (below(r, 12)) {
    case 0: return cJSON_CreateNull();
    case 1: return cJSON_CreateBool(below(r, 2));
    case 2: return cJSON_CreateNumber(numbers[below(r, FZ_COUNT(numbers))]);
    case 3: return cJSON_CreateArray();
    case 4: return cJSON_CreateObject();
    case 5: { /* a content part, right or wrong */
        cJSON *o = cJSON_CreateArray(), *p = cJSON_CreateObject();
        cJSON_AddStringToObject(p, "type", below(r, 3) ? "text" : "image_url");
        if (below(r, 4)) cJSON_AddStringToObject(p, "text", conv_strings[below(r, FZ_COUNT(conv_strings))]);
        else cJSON_AddNumberToObject(p, "text", 7);
        cJSON_AddItemToArray(o, p);
        return o;
    }
    case 6: { /* nested lists */
        const size_t depth = below(r, 8) ? 1 + below(r, 64) : 900 + below(r, 200);
        cJSON *root = cJSON_CreateArray(), *at = root;
        for (size_t i = 1; i < depth; i++) {
            cJSON *c = cJSON_CreateArray();
            cJSON_AddItemToArray(at, c);
            at = c;
        }
        cJSON_AddItemToArray(at, cJSON_CreateString("deep"));
        return root;
    }
    case 7: { /* a long string: up to 64 KB, now and then 1 MB */
        const size_t len = below(r, 16) ? 1 + below(r, 65536) : 1 << 20;
        char *s = malloc(len + 1);
        if (!s) exit(2);
        for (size_t i = 0; i < len; i++) s[i] = "ab \xc3\xa9</s>\n"[i % 11];
        s[len] = 0;
        cJSON *v = cJSON_CreateString(s);
        free(s);
        return v;
    }
    default: return cJSON_CreateString(conv_strings[below(r, FZ_COUNT(conv_strings))]);
    }
}

static const char *conv_key(uint64_t *r)
{
    return conv_keys[below(r, FZ_COUNT(conv_keys))];
}

/* One change to a conversation's tree that keeps it JSON (see mutate_tree): a value of
 * another type, gone, twice, under another key, swapped with the next; a string changed. */
static void conv_mutate_tree(uint64_t *r, cJSON *x, cJSON *p)
{
    const int change = (int)below(r, 8); /* a value of another type twice as often */
    if (change < 6) tree_change(r, change ? change - 1 : 0, x, p, conv_value, conv_key);
    else if (cJSON_IsString(x)) cJSON_SetValuestring(x, conv_strings[below(r, FZ_COUNT(conv_strings))]);
}

/* Inside a JSON string: escapes (valid ones mostly, lone surrogates, \u0000, bad ones),
 * special and template strings, raw control and invalid bytes. */
static const char *const string_bits[] = {
    "\\u00e9", "\\ud83d\\ude00", "\\n", "\\\"", "\\\\", "\\/", "\\t", "\\u2028", "</s>", "<s>", "{{ x }}",
    "{% if %}", "<|im_end|>", "caf\xc3\xa9", "\\ud800", "\\udc00", "\\ud800\\u0041", "\\u0000", "\\x41", "\\uzzzz",
    "\x01", "\xff", "\xed\xa0\x80",
};

/* One mutation of a conversation's text: inside one of its strings (so that it stays JSON
 * most of the time), a tree change, a JSON token anywhere, a NUL byte, the whole of it nested
 * deeper, or a generic one. */
static void conv_mutate(uint64_t *r, fz_bytes *b, const fz_bytes *other)
{
    const size_t how = below(r, 20);
    if (how < 10) { /* inside the k-th string */
        size_t quotes = 0;
        for (size_t i = 0; i < b->len; i++) quotes += b->p[i] == '"' && (i == 0 || b->p[i - 1] != '\\');
        if (quotes < 2) return;
        size_t want = below(r, quotes / 2) * 2, i = 0, seen = 0;
        for (; i < b->len; i++)
            if (b->p[i] == '"' && (i == 0 || b->p[i - 1] != '\\') && seen++ == want) break;
        const char *t = string_bits[below(r, below(r, 8) ? 14 : FZ_COUNT(string_bits))]; /* the first 14 valid */
        fz_splice(b, i + 1, 0, t, strlen(t));
    } else if (how < 16) {
        fz_mutate_json(r, b, 1 + (int)below(r, 2), conv_mutate_tree);
    } else if (how == 16) {
        const char *t = conv_tokens[below(r, FZ_COUNT(conv_tokens))];
        fz_splice(b, below(r, b->len + 1), below(r, 3) ? 0 : below(r, 4), t, strlen(t));
    } else if (how == 17) {
        fz_splice(b, below(r, b->len + 1), 0, "", 1); /* a NUL byte */
    } else if (how == 18) { /* nested in lists or objects, shallow or past the parser's limit */
        const size_t depth = below(r, 2) ? 1 + below(r, 8) : 990 + below(r, 30);
        const bool obj = below(r, 2);
        for (size_t i = 0; i < depth; i++) {
            fz_splice(b, 0, 0, obj ? "{\"messages\": " : "[", obj ? 13 : 1);
            fz_splice(b, b->len, 0, obj ? "}" : "]", 1);
        }
    } else {
        fz_mutate(r, b, other, conv_tokens, FZ_COUNT(conv_tokens));
    }
}

/* How many messages a conversation's text holds, as the renderer sees it: -1 if it is not
 * a list of messages or {"messages": [...]}. */
static int conv_messages(const uint8_t *p, size_t n)
{
    cJSON *root = cJSON_ParseWithLength((const char *)p, n);
    const cJSON *m = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "messages") : root;
    int k = cJSON_IsArray(m) ? cJSON_GetArraySize(m) : -1;
    cJSON_Delete(root);
    return k;
}

/* An error: a message of one line with no control characters, nothing returned. */
static void failed_cleanly(target *tg, long it, const char *what, const jm_error *err, const void *out)
{
    bool ctl = !err->msg[0];
    for (const char *p = err->msg; *p; p++) ctl |= (unsigned char)*p < 0x20 || *p == 0x7f;
    if (ctl || out) bad(tg, it, "bad %s failure: \"%.400s\"%s", what, err->msg, out ? " (with a result)" : "");
}

/* Renders the conversation in b (exactly its length) with t and encodes it: a non-empty
 * text and ids in range, or an error; true if it rendered text. An encoding error is allowed
 * (one line) with lenient: the template target's eos_token strings may not be in the
 * vocabulary. An empty text for a non-empty conversation must be refused, as jm_chat_render
 * refuses it. */
static bool chat_json_one(target *tg, long it, const jm_tokenizer *t, const fz_bytes *b, int agp, bool lenient)
{
    char *buf = (char *)fz_exact(b), *text = (char *)1; /* must come back NULL on an error */
    jm_error err = {{0}};
    int32_t *ids = (int32_t *)1;
    size_t nids = 0;
    tg->inputs++;
    if (jm_chat_render_json(t, buf, b->len, agp, &text, &err)) {
        tg->rejected++;
        failed_cleanly(tg, it, "conversation", &err, text);
        fz_shapes_add(&tg->shapes, err.msg, NULL);
        if (!jm_chat_encode_json(t, buf, b->len, agp, &ids, &nids, &err)) bad(tg, it, "encodes what does not render");
        else failed_cleanly(tg, it, "encode", &err, ids);
        if (ids != (int32_t *)1) free(ids);
        free(buf);
        return false;
    }
    tg->accepted++;
    const bool ok = text[0] != 0;
    if (!ok && conv_messages(b->p, b->len) > 0)
        bad(tg, it, "rendered nothing for a non-empty conversation without an error");
    free(text);
    if (jm_chat_encode_json(t, buf, b->len, agp, &ids, &nids, &err)) {
        if (!lenient) bad(tg, it, "renders but does not encode: %.300s", err.msg);
        failed_cleanly(tg, it, "encode", &err, ids);
    } else {
        for (size_t i = 0; i < nids; i++)
            if (ids[i] < 0 || ids[i] >= t->n) {
                bad(tg, it, "chat id %d out of range", ids[i]);
                break;
            }
        if (ok && !nids) bad(tg, it, "a rendered text encodes to no ids");
        free(ids);
    }
    free(buf);
    return ok;
}

/* A tokenizer with the template in src (NULL: the default), as tokenizer_config.json gives it. */
static jm_tokenizer *template_tokenizer(const seeds *sd, const char *src, const char *name, jm_error *err)
{
    jm_tokenizer *t = NULL;
    if (jm_tokenizer_load(sd->ident_path, &t, err)) return NULL;
    if (!src) return t;
    char path[256];
    snprintf(path, sizeof path, "%s/%s.tokenizer_config.json", sd->dir, name);
    cJSON *c = cJSON_CreateObject();
    cJSON_AddStringToObject(c, "chat_template", src);
    cJSON_AddStringToObject(c, "bos_token", "<s>"), cJSON_AddStringToObject(c, "eos_token", "</s>");
    char *text = cJSON_PrintUnformatted(c);
    cJSON_Delete(c);
    if (!text) exit(2);
    write_bytes(path, text, strlen(text));
    free(text);
    if (tk_load_config(t, path, err)) jm_tokenizer_free(t), t = NULL;
    return t;
}

/* ---- the targets ---- */

/* Of the mutated templates, 41-42% rendered (4,187 of 10,000 at the default seed, 4,066-4,140
 * at seeds 1-3; the unmutated seeds render 73%: the rest are Gemma's system turn, an empty
 * conversation, tokenizer_config.json mutations ...). The check asks for a third of that,
 * so that it fails when the mutations stop reaching the evaluation, not when a template or
 * a kind of edit is added. */
#define TEMPLATE_RENDERED_PERCENT 13

static void fuzz_template(const seeds *sd, const template_seeds *ts, long count, uint64_t *r)
{
    static target tg = {.name = "fuzz_tokenizer_chat_template"};
    jm_tokenizer *t = NULL;
    jm_error err = {{0}};
    if (jm_tokenizer_load(sd->ident_path, &t, &err)) {
        check(false, tg.name, "cannot load %s: %s", sd->ident_path, err.msg);
        return;
    }
    char *eos0 = strdup(t->eos_token), *bos0 = strdup(t->bos_token), path[128];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", sd->dir);
    fz_bytes tmpl = {0}, other = {0}, file = {0};
    long rendered = 0, via_json = 0;
    for (long it = 0; it < count; it++) {
        /* the tokenizer as loaded, before this input's config */
        free(t->chat_template), free(t->eos_token), free(t->bos_token);
        t->chat_template = NULL, t->eos_token = strdup(eos0), t->bos_token = strdup(bos0);
        const char *s0 = ts->src[below(r, (size_t)ts->n)], *s1 = ts->src[below(r, (size_t)ts->n)];
        fz_assign(&tmpl, s0, strlen(s0));
        fz_assign(&other, s1, strlen(s1));
        for (int k = below(r, 10) < 7 ? 1 : below(r, 3) ? 2 : 3; k > 0; k--) template_edit(r, &tmpl, &other);
        char *json = config_json(r, (const char *)tmpl.p, strnlen((const char *)tmpl.p, tmpl.len));
        fz_assign(&file, json, strlen(json));
        free(json);
        if (below(r, 5) == 0) fz_mutate(r, &file, NULL, json_tokens, FZ_COUNT(json_tokens));
        write_bytes(path, file.p, file.len);

        tg.inputs++;
        if (tk_load_config(t, path, &err)) {
            refused(&tg, it, path, &err);
            continue;
        }
        tg.accepted++;
        /* with the system turn or without it (Gemma's and others' templates refuse one) */
        const jm_chat_message *msgs = conversation + below(r, 2);
        int n = (int)below(r, FZ_COUNT(conversation) - (size_t)(msgs - conversation) + 1), agp = (int)below(r, 2);
        if (below(r, 3) == 0) { /* a conversation as JSON: tools, tool calls, text parts */
            const char *conv = conv_seeds[below(r, FZ_COUNT(conv_seeds))];
            fz_bytes b = {0};
            fz_assign(&b, conv, strlen(conv));
            target sub = {.name = tg.name};
            bool ok = chat_json_one(&sub, it, t, &b, agp, true);
            free(b.p);
            rendered += ok, via_json += ok;
            if (sub.bad) bad(&tg, it, "%s", sub.first_bad);
            else if (!ok && sub.shapes.n) fz_shapes_add(&tg.shapes, sub.shapes.shape[0], NULL);
            continue;
        }
        char *text = NULL;
        jm_status s = jm_chat_render(t, msgs, n, agp, &text, &err);
        if (s) { /* a template error: one line; tk_load_config accepted the file */
            if (!err.msg[0] || strchr(err.msg, '\n') || text) bad(&tg, it, "bad render failure: \"%.400s\"", err.msg);
            fz_shapes_add(&tg.shapes, err.msg, NULL);
            continue;
        }
        rendered++;
        if (n > 0 && !text[0]) bad(&tg, it, "rendered nothing for %d messages without an error", n);
        free(text);
        int32_t *ids = NULL;
        size_t nids = 0;
        if (!jm_chat_encode(t, msgs, n, agp, &ids, &nids, &err))
            for (size_t i = 0; i < nids; i++)
                if (ids[i] < 0 || ids[i] >= t->n) {
                    bad(&tg, it, "chat id %d out of range", ids[i]);
                    break;
                }
        free(ids);
    }
    free(tmpl.p), free(other.p), free(file.p), free(eos0), free(bos0);
    jm_tokenizer_free(t);
    report_target(&tg, 20);
    check_detail(rendered * 100 > count * TEMPLATE_RENDERED_PERCENT, "fuzz_tokenizer_chat_template_rendered",
                 "%ld of %ld inputs rendered (%ld of them as JSON conversations), more than %d%% expected", rendered,
                 count, via_json, TEMPLATE_RENDERED_PERCENT);
}

/* Of the mutated conversations, 28% rendered to a non-empty text and encoded (2,777 of 10,000
 * at the default seed, 2,816-2,870 at seeds 1-3; the rest: broken JSON, NUL bytes, wrong types
 * and the templates' own refusals, such as Llama-2's alternating roles); the check asks for a
 * third of that. */
#define CHAT_JSON_RENDERED_PERCENT 9

/* Conversations as JSON through jm_chat_render_json and jm_chat_encode_json with several
 * real templates: each a text that encodes to ids in range, or a one-line error. */
static void fuzz_chat_json(const seeds *sd, const template_seeds *ts, long count, uint64_t *r)
{
    static target tg = {.name = "fuzz_tokenizer_chat_json"};
    static const char *const wanted[] = {"chatml.jinja", "llama2.jinja", "zephyr.jinja", "qwen25_tools.jinja",
                                         "mistral.jinja", "tojson_indent.jinja", "gemma.jinja"};
    jm_tokenizer *toks[16];
    int nt = 0;
    jm_error err = {{0}};
    for (int i = 0; i < ts->n && nt < 15; i++) {
        bool use = ts->from_files ? false : strcmp(ts->name[i], "default") != 0; /* the built-ins when no files */
        for (size_t k = 0; k < FZ_COUNT(wanted) && ts->from_files; k++) use |= !strcmp(ts->name[i], wanted[k]);
        if (!use) continue;
        char name[32];
        snprintf(name, sizeof name, "chat%d", nt);
        if (!(toks[nt++] = template_tokenizer(sd, ts->src[i], name, &err))) {
            check(false, tg.name, "cannot load template %s: %s", ts->name[i], err.msg);
            while (--nt > 0) jm_tokenizer_free(toks[nt - 1]);
            return;
        }
    }
    if (!(toks[nt++] = template_tokenizer(sd, NULL, "default", &err))) {
        check(false, tg.name, "cannot load %s: %s", sd->ident_path, err.msg);
        return;
    }
    fz_bytes b = {0}, other = {0};
    long rendered = 0;
    for (long it = 0; it < count; it++) {
        const char *s0 = conv_seeds[below(r, FZ_COUNT(conv_seeds))], *s1 = conv_seeds[below(r, FZ_COUNT(conv_seeds))];
        fz_assign(&b, s0, strlen(s0));
        fz_assign(&other, s1, strlen(s1));
        for (int k = below(r, 10) < 7 ? 1 : below(r, 3) ? 2 : 3; k > 0; k--) conv_mutate(r, &b, &other);
        rendered += chat_json_one(&tg, it, toks[below(r, (size_t)nt)], &b, (int)below(r, 2), false);
    }
    free(b.p), free(other.p);
    for (int i = 0; i < nt; i++) jm_tokenizer_free(toks[i]);
    report_target(&tg, 12);
    check_detail(rendered * 100 > count * CHAT_JSON_RENDERED_PERCENT, "fuzz_tokenizer_chat_json_rendered",
                 "%ld of %ld conversations rendered and encoded, more than %d%% expected (%d templates)", rendered,
                 count, CHAT_JSON_RENDERED_PERCENT, nt);
}

/* Usage: fuzz_tokenizer [scale [seed [targets]]]: targets a comma-separated subset of
 * model,charsmap,json,template,chat_json (default all). */
static bool wanted_target(const char *list, const char *name)
{
    if (!list) return true;
    size_t n = strlen(name);
    for (const char *p = list; (p = strstr(p, name)); p += n)
        if ((p == list || p[-1] == ',') && (p[n] == ',' || !p[n])) return true;
    return false;
}

int main(int argc, char **argv)
{
    double scale = argc > 1 ? strtod(argv[1], NULL) : 1.0;
    uint64_t seed = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x70c5eed;
    const char *only = argc > 3 ? argv[3] : NULL;
    uint64_t r = seed ? seed : 1;
    seeds sd;
    if (!make_seeds(&sd)) return exit_status();
    template_seeds ts;
    load_template_seeds(&ts);
    static const char *const names[] = {"model", "charsmap", "json", "template", "chat_json"};
    double secs[5] = {0};
    for (int k = 0; k < 5; k++) {
        if (!wanted_target(only, names[k])) continue;
        double t0 = now();
        switch (k) {
        case 0: fuzz_model(&sd, (long)(N_MODEL * scale), &r); break;
        case 1: fuzz_charsmap(&sd, (long)(N_CHARSMAP * scale), &r); break;
        case 2: fuzz_json(&sd, (long)(N_JSON * scale), &r); break;
        case 3: fuzz_template(&sd, &ts, (long)(N_TEMPLATE * scale), &r); break;
        default: fuzz_chat_json(&sd, &ts, (long)(N_CHAT_JSON * scale), &r); break;
        }
        secs[k] = now() - t0;
    }
    printf("# fuzz_tokenizer: model %.1f s, charsmap %.1f s, json %.1f s, template %.1f s (%d templates from %s), "
           "chat_json %.1f s\n", secs[0], secs[1], secs[2], secs[3], ts.n, TEMPLATE_DIR, secs[4]);
    for (int i = 0; i < ts.nowned; i++) free(ts.owned[i]);
    free_seeds(&sd);
    temp_dir_done(sd.dir);
    return exit_status();
}
