/* fuzz_tokenizer.c — deterministic mutation fuzzer of the tokenizer's readers.
 *
 *   model     tokenizer.model (protobuf): BPE models trained here with spm_train (identity
 *             normalisation with byte fallback; custom normalisation rules), and Llama-2's,
 *             cut to 600 pieces, when ../shared/fixtures has it; mutated anywhere (fuzz.h)
 *   charsmap  the precompiled charsmap (double-array trie + string pool) of the rules model
 *             (and, less often, of the full nmt_nfkc one): units, pool and the trie size
 *             rewritten in place, then texts that hit the rules normalised through it
 *   json      tokenizer.json as jm_tokenizer_save_json writes it, mutated with JSON tokens
 *   template  tokenizer_config.json (chat_template, eos/bos strings, the list form): the
 *             template mutated with Jinja tokens, the file now and then too; read with
 *             tk_load_config, then rendered and encoded on a conversation
 *
 * Every input is parsed from a buffer of exactly its length, so AddressSanitizer sees any read
 * past the end. A refusal must be one line that names the file, with nothing returned; an
 * accepted tokenizer must encode texts to ids in range and decode them to valid UTF-8; an
 * accepted template must render a non-empty text for a non-empty conversation and encode it.
 *
 * Usage: fuzz_tokenizer [scale [seed]]: scale multiplies every target's count (default 1).
 * Prints "PASS <name> (<count> inputs, ...)" or "FAIL <name>: <why>" per check. Run from the
 * repository root (the Llama-2 fixture is ../shared/fixtures/llama2-tokenizer). */
#include "tokenizer/tokenizer.h"
#include "fuzz.h"
#include "harness.h"

#include <cjson/cJSON.h>
#include <unistd.h>

/* Inputs per target at scale 1: with fuzz_safetensors, over 90,000 in `make test-asan`. */
#define N_MODEL 20000
#define N_CHARSMAP 10000
#define N_JSON 10000
#define N_TEMPLATE 10000
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

/* One change to the parsed tree that keeps it JSON, so the reader's checks
 * behind the parser are reached: a value replaced, removed, duplicated (a
 * duplicate key in an object), a key renamed, two array items swapped, a
 * number moved by one. */
static void mutate_tree(uint64_t *r, cJSON *x, cJSON *p)
{
    switch (below(r, 6)) {
    case 0: { /* replace */
        cJSON *v = some_value(r);
        if (x->string) cJSON_ReplaceItemInObjectCaseSensitive(p, x->string, v);
        else cJSON_ReplaceItemViaPointer(p, x, v);
        break;
    }
    case 1: cJSON_Delete(cJSON_DetachItemViaPointer(p, x)); break;
    case 2: { /* duplicate, next to itself */
        cJSON *d = cJSON_Duplicate(x, 1);
        if (x->string) cJSON_AddItemToObject(p, x->string, d);
        else cJSON_AddItemToArray(p, d);
        break;
    }
    case 3: /* rename a key */
        if (x->string) {
            const char *t = json_tokens[below(r, FZ_COUNT(json_tokens))];
            char *k = strdup(t[0] == '"' && strlen(t) > 2 ? "x" : t);
            if (k) cJSON_free(x->string), x->string = k;
        }
        break;
    case 4: /* swap with the next sibling's value */
        if (x->next && !x->string) {
            cJSON *a = cJSON_Duplicate(x, 1), *b = cJSON_Duplicate(x->next, 1);
            cJSON_ReplaceItemViaPointer(p, x->next, a);
            cJSON_ReplaceItemViaPointer(p, x, b);
        }
        break;
    default:
        if (cJSON_IsNumber(x)) cJSON_SetNumberValue(x, x->valuedouble + (below(r, 2) ? 1 : -1));
        break;
    }
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

/* Templates in the forms real tokenizer_config.json files use. */
static const char *const templates[] = {
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

static void fuzz_template(const seeds *sd, long count, uint64_t *r)
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
    long rendered = 0;
    for (long it = 0; it < count; it++) {
        /* the tokenizer as loaded, before this input's config */
        free(t->chat_template), free(t->eos_token), free(t->bos_token);
        t->chat_template = NULL, t->eos_token = strdup(eos0), t->bos_token = strdup(bos0);
        const char *s0 = templates[below(r, FZ_COUNT(templates))], *s1 = templates[below(r, FZ_COUNT(templates))];
        s0 = s0 ? s0 : jm_default_chat_template, s1 = s1 ? s1 : jm_default_chat_template;
        fz_assign(&tmpl, s0, strlen(s0));
        fz_assign(&other, s1, strlen(s1));
        for (int k = 1 + (int)below(r, 2); k > 0; k--) {
            if (below(r, 4)) { /* a Jinja token over a few bytes, or between them */
                const char *tok = jinja_tokens[below(r, FZ_COUNT(jinja_tokens))];
                fz_splice(&tmpl, below(r, tmpl.len + 1), below(r, 3) ? 0 : below(r, 8), tok, strlen(tok));
            } else {
                fz_mutate(r, &tmpl, &other, jinja_tokens, FZ_COUNT(jinja_tokens));
            }
        }
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
        int n = (int)below(r, FZ_COUNT(conversation) + 1), agp = (int)below(r, 2);
        char *text = NULL;
        jm_status s = jm_chat_render(t, conversation, n, agp, &text, &err);
        if (s) { /* a template error: one line; tk_load_config accepted the file */
            tg.accepted++;
            if (!err.msg[0] || strchr(err.msg, '\n') || text) bad(&tg, it, "bad render failure: \"%.400s\"", err.msg);
            fz_shapes_add(&tg.shapes, err.msg, NULL);
            continue;
        }
        tg.accepted++, rendered++;
        if (n > 0 && !text[0]) bad(&tg, it, "rendered nothing for %d messages without an error", n);
        free(text);
        int32_t *ids = NULL;
        size_t nids = 0;
        if (!jm_chat_encode(t, conversation, n, agp, &ids, &nids, &err))
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
    /* most mutations break a template (about 1 in 10 renders, with the baseline near that): 1 in 20 must */
    check_detail(rendered > count / 20, "fuzz_tokenizer_chat_template_rendered", "%ld of %ld inputs rendered", rendered,
                 count);
}

int main(int argc, char **argv)
{
    double scale = argc > 1 ? strtod(argv[1], NULL) : 1.0;
    uint64_t seed = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x70c5eed;
    uint64_t r = seed ? seed : 1;
    seeds sd;
    if (!make_seeds(&sd)) return exit_status();
    double t0 = now();
    fuzz_model(&sd, (long)(N_MODEL * scale), &r);
    double t1 = now();
    fuzz_charsmap(&sd, (long)(N_CHARSMAP * scale), &r);
    double t2 = now();
    fuzz_json(&sd, (long)(N_JSON * scale), &r);
    double t3 = now();
    fuzz_template(&sd, (long)(N_TEMPLATE * scale), &r);
    printf("# fuzz_tokenizer: model %.1f s, charsmap %.1f s, json %.1f s, template %.1f s\n", t1 - t0, t2 - t1,
           t3 - t2, now() - t3);
    free_seeds(&sd);
    temp_dir_done(sd.dir);
    return exit_status();
}
