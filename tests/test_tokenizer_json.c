/* test_tokenizer_json.c — HF tokenizer.json in and out, and tokenizer
 * training: a tokenizer trained with spm_train loads the same from
 * tokenizer.model and tokenizer.json and encodes the same; save -> load ->
 * save is byte-identical; malformed files and bad training options fail with
 * messages that name the field. With ../shared/fixtures/llama2-tokenizer
 * present, the Llama-2 tokenizer goes through JSON too. (Exactness against
 * spm_encode over a large corpus is tests/tokenizer_exact.py.)
 * Run from the repository root. Prints `PASS name` / `FAIL name: why`;
 * exits 1 on any failure. */
#include "tokenizer/tokenizer.h"
#include "harness.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

extern const char jm_default_chat_template[];

#define LLAMA2 "../shared/fixtures/llama2-tokenizer/tokenizer.model"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(uint32_t n)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)((rng_state >> 11) % n);
}

static bool file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Words from syllables (Latin, accented, CJK, emoji), numbers, punctuation,
 * runs of spaces, indentation and tabs: what a BPE model has to get right. */
static const char *const SYL[] = {"ka", "to", "ri", "men", "sha", "lo", "pe", "qua", "zi", "ber", "ston", "ing",
                                  "the", "and", "\xc3\xa9", "\xc3\xbc", "\xc3\xb1", "\xe4\xb8\xad", "\xe6\x96\x87",
                                  "\xf0\x9f\x98\x80", "\xc3\x9f", "th", "er", "on"};

static void random_line(char *out, size_t cap, int words)
{
    size_t n = 0;
    if (rnd(20) == 0) n += (size_t)snprintf(out + n, cap - n, "    ");
    for (int w = 0; w < words && n + 64 < cap; w++) {
        if (w) {
            int sp = rnd(8) == 0 ? 2 + (int)rnd(3) : 1;
            for (int k = 0; k < sp; k++) out[n++] = rnd(40) == 0 ? '\t' : ' ';
        }
        if (rnd(10) == 0) {
            n += (size_t)snprintf(out + n, cap - n, "%u", rnd(100000));
            continue;
        }
        int s = 1 + (int)rnd(3);
        for (int k = 0; k < s; k++) {
            const char *y = SYL[rnd(sizeof SYL / sizeof SYL[0])];
            size_t l = strlen(y);
            memcpy(out + n, y, l);
            if (k == 0 && rnd(8) == 0 && out[n] >= 'a' && out[n] <= 'z') out[n] = (char)(out[n] - 32);
            n += l;
        }
        if (rnd(10) == 0) out[n++] = ",.!?;:"[rnd(6)];
    }
    out[n] = 0;
}

static bool make_corpus(const char *path, size_t bytes)
{
    FILE *f = fopen(path, "wb");
    if (!f) return false;
    char line[2048];
    for (size_t n = 0; n < bytes;) {
        random_line(line, sizeof line, 3 + (int)rnd(18));
        n += strlen(line) + 1;
        fprintf(f, "%s\n", line);
    }
    return fclose(f) == 0;
}

/* Texts the two loaders must encode alike: corpus-like lines plus edge cases
 * (empty, spaces only, leading/trailing/multiple spaces, control characters,
 * characters the model has never seen, invalid UTF-8, special-token text). */
static const char *const EDGE[] = {
    "", " ", "  ", "   ", "hello", " hello", "hello ", "hello  world", "a\tb\nc\r\nd",
    "    indented(code);\n        deeper();", "x   y    z     w      v       u        t",
    "na\xc3\xafve caf\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\x98\x80 stra\xc3\x9f" "e",
    "\xe1\x9a\xa0\xe1\x9b\x87\xe1\x9a\xbb \xe2\x88\xae \xe2\x85\x8b \xd0\x96\xd0\xb8\xd0\xb2",
    "\xff\xfe invalid \xc3 utf8 \xe4\xb8", "<s> </s> <unk> <0x41> \xe2\x96\x81\xe2\x96\x81 literal",
    "1234567890 3.14159 2024-01-01", "THE AND ING KAMEN", "                                 many spaces",
    "\xe2\x96\x81" "already\xe2\x96\x81" "escaped", "emoji \xf0\x9f\xa6\x80\xf0\x9f\xa6\x80\xf0\x9f\xa6\x80 run",
};

static bool same_ids(const jm_tokenizer *a, const jm_tokenizer *b, const char *text, size_t len, char *why,
                     size_t cap)
{
    int32_t *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    jm_error err;
    if (jm_tokenizer_encode(a, text, len, &x, &nx, &err) || jm_tokenizer_encode(b, text, len, &y, &ny, &err)) {
        snprintf(why, cap, "encode failed: %.400s", err.msg);
        free(x);
        return false;
    }
    bool same = nx == ny && (nx == 0 || memcmp(x, y, nx * sizeof *x) == 0);
    if (!same) {
        size_t i = 0;
        while (i < nx && i < ny && x[i] == y[i]) i++;
        snprintf(why, cap, "text \"%.60s\": %zu vs %zu ids, first difference at %zu (%d vs %d)", text, nx, ny, i,
                 i < nx ? x[i] : -1, i < ny ? y[i] : -1);
    }
    char *ta = NULL, *tb = NULL;
    size_t la = 0, lb = 0;
    if (same && nx && (jm_tokenizer_decode(a, x, nx, &ta, &la, &err) || jm_tokenizer_decode(b, x, nx, &tb, &lb, &err))) {
        snprintf(why, cap, "decode failed: %.400s", err.msg);
        same = false;
    } else if (same && nx && (la != lb || memcmp(ta, tb, la) != 0)) {
        snprintf(why, cap, "text \"%.60s\": decodes differ", text);
        same = false;
    }
    free(ta);
    free(tb);
    free(x);
    free(y);
    return same;
}

/* Encodes EDGE, 300 random lines and 100 random strings over a small
 * alphabet heavy in spaces with both; returns the number of texts checked,
 * -1 on the first difference. */
static int compare_encodings(const jm_tokenizer *a, const jm_tokenizer *b, char *why, size_t cap)
{
    int count = 0;
    for (size_t i = 0; i < sizeof EDGE / sizeof EDGE[0]; i++, count++)
        if (!same_ids(a, b, EDGE[i], strlen(EDGE[i]), why, cap)) return -1;
    char line[2048];
    for (int i = 0; i < 300; i++, count++) {
        random_line(line, sizeof line, 1 + (int)rnd(30));
        if (!same_ids(a, b, line, strlen(line), why, cap)) return -1;
    }
    static const char *const ALPHA[] = {" ", " ", " ", "a", "t", "h", "e", "\n", ".", "\xe2\x96\x81", "\xc3\xa9"};
    for (int i = 0; i < 100; i++, count++) {
        size_t n = 0, len = 1 + rnd(40);
        for (size_t k = 0; k < len; k++) {
            const char *s = ALPHA[rnd(sizeof ALPHA / sizeof ALPHA[0])];
            memcpy(line + n, s, strlen(s));
            n += strlen(s);
        }
        line[n] = 0;
        if (!same_ids(a, b, line, n, why, cap)) return -1;
    }
    return count;
}

/* Same vocabulary, types and special ids; scores too when exact. */
static bool same_vocab(const jm_tokenizer *a, const jm_tokenizer *b, bool scores, char *why, size_t cap)
{
    if (a->n != b->n) return snprintf(why, cap, "%d vs %d pieces", a->n, b->n), false;
    for (int i = 0; i < a->n; i++) {
        if (a->piece_len[i] != b->piece_len[i] || memcmp(a->piece[i], b->piece[i], a->piece_len[i]) != 0)
            return snprintf(why, cap, "piece %d: \"%s\" vs \"%s\"", i, a->piece[i], b->piece[i]), false;
        if (a->type[i] != b->type[i])
            return snprintf(why, cap, "piece %d (\"%s\"): type %d vs %d", i, a->piece[i], a->type[i], b->type[i]),
                   false;
        if (scores && a->score[i] != b->score[i])
            return snprintf(why, cap, "piece %d (\"%s\"): score %g vs %g", i, a->piece[i], a->score[i], b->score[i]),
                   false;
    }
    if (a->unk_id != b->unk_id || a->bos_id != b->bos_id || a->eos_id != b->eos_id || a->pad_id != b->pad_id)
        return snprintf(why, cap, "special ids unk/bos/eos/pad %d/%d/%d/%d vs %d/%d/%d/%d", a->unk_id, a->bos_id,
                        a->eos_id, a->pad_id, b->unk_id, b->bos_id, b->eos_id, b->pad_id),
               false;
    if (a->byte_fallback != b->byte_fallback || a->add_dummy_prefix != b->add_dummy_prefix ||
        a->escape_whitespaces != b->escape_whitespaces || a->remove_extra_whitespaces != b->remove_extra_whitespaces)
        return snprintf(why, cap, "flags differ"), false;
    return true;
}

static int count_merges(const char *path)
{
    size_t n;
    char *text = slurp(path, &n);
    cJSON *root = text ? cJSON_ParseWithLength(text, n) : NULL;
    free(text);
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "model"), "merges");
    int count = cJSON_IsArray(m) ? cJSON_GetArraySize(m) : -1;
    cJSON_Delete(root);
    return count;
}

/* ---------------------------------------------------------------- training */

static void test_trained(const char *tmp, const char *corpus, int vocab, int byte_fallback)
{
    char name[128], out[4200], path[4300], why[512];
    snprintf(out, sizeof out, "%s/tok%d_%s", tmp, vocab, byte_fallback ? "bf" : "nobf");
    const char *inputs[] = {corpus};
    jm_tokenizer_train_opts o = {.inputs = inputs, .ninputs = 1, .vocab_size = vocab, .out_dir = out,
                                 .byte_fallback = byte_fallback, .threads = 2};
    jm_error err = {{0}};
    double t0 = now();
    jm_status s = jm_tokenizer_train(&o, &err);
    double secs = now() - t0;
    snprintf(name, sizeof name, "train_v%d_bf%d", vocab, byte_fallback);
    check(s == JM_OK, name, "status %d: %s", s, err.msg);
    if (s) return;
    printf("# %s: %.2fs\n", name, secs);

    const char *files[] = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"};
    bool all = true;
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", out, files[i]);
        all = all && file_exists(path);
    }
    int extra = 0;
    DIR *d = opendir(out);
    for (struct dirent *e; d && (e = readdir(d));)
        if (e->d_name[0] != '.' || strstr(e->d_name, "tokenizer-train")) extra++;
    if (d) closedir(d);
    snprintf(name, sizeof name, "train_v%d_bf%d_files", vocab, byte_fallback);
    check(all && extra == 4, name, "four files expected, %d entries in %s", extra, out);

    jm_tokenizer *m = NULL, *j = NULL;
    snprintf(path, sizeof path, "%s/tokenizer.model", out);
    s = jm_tokenizer_load(path, &m, &err);
    if (!s) {
        snprintf(path, sizeof path, "%s/tokenizer.json", out);
        s = jm_tokenizer_load(path, &j, &err);
    }
    snprintf(name, sizeof name, "train_v%d_bf%d_load_both", vocab, byte_fallback);
    check(s == JM_OK, name, "%s", err.msg);
    if (s) goto done;
    int nbytes = 0;
    for (int i = 0; i < m->n; i++) nbytes += m->type[i] == TK_BYTE;
    snprintf(name, sizeof name, "train_v%d_bf%d_model", vocab, byte_fallback);
    check(m->n == vocab && nbytes == (byte_fallback ? 256 : 0) && m->unk_id == 0 && m->bos_id == 1 && m->eos_id == 2 &&
              m->pad_id == -1 && m->add_dummy_prefix && !m->remove_extra_whitespaces,
          name, "n %d, %d byte pieces, unk/bos/eos/pad %d/%d/%d/%d", m->n, nbytes, m->unk_id, m->bos_id, m->eos_id,
          m->pad_id);
    /* for spm_train's models the merge-rank rule gives back the scores exactly */
    snprintf(name, sizeof name, "train_v%d_bf%d_json_vocab", vocab, byte_fallback);
    check(same_vocab(m, j, true, why, sizeof why), name, "%s", why);
    snprintf(name, sizeof name, "train_v%d_bf%d_json_encode", vocab, byte_fallback);
    int texts = compare_encodings(m, j, why, sizeof why);
    check(texts > 0, name, "%s", why);

    /* save -> load -> save */
    char a[4300], b[4300];
    snprintf(a, sizeof a, "%s/a.json", tmp);
    snprintf(b, sizeof b, "%s/b.json", tmp);
    jm_tokenizer *k = NULL;
    s = jm_tokenizer_save_json(m, a, &err);
    if (!s) s = jm_tokenizer_load(a, &k, &err);
    if (!s) s = jm_tokenizer_save_json(k, b, &err);
    snprintf(name, sizeof name, "train_v%d_bf%d_roundtrip", vocab, byte_fallback);
    snprintf(path, sizeof path, "%s/tokenizer.json", out);
    check(s == JM_OK && same_file(a, b) && same_file(a, path), name, "%s", s ? err.msg : "files differ");
    jm_tokenizer_free(k);

    /* the directory loads (tokenizer.model + tokenizer_config.json) */
    jm_tokenizer *dir = NULL;
    s = jm_tokenizer_load(out, &dir, &err);
    snprintf(name, sizeof name, "train_v%d_bf%d_config", vocab, byte_fallback);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", out);
    size_t n;
    char *text = slurp(path, &n);
    cJSON *cfg = text ? cJSON_ParseWithLength(text, n) : NULL;
    const cJSON *tpl = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
    bool ok = s == JM_OK && cJSON_IsString(tpl) && strcmp(tpl->valuestring, jm_default_chat_template) == 0 &&
              cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cfg, "add_bos_token")) &&
              cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(cfg, "pad_token")) &&
              dir->chat_template && strcmp(dir->chat_template, jm_default_chat_template) == 0;
    check(ok, name, "%s", s ? err.msg : "tokenizer_config.json content");
    cJSON_Delete(cfg);
    free(text);
    jm_tokenizer_free(dir);
done:
    jm_tokenizer_free(m);
    jm_tokenizer_free(j);
}

static void test_train_errors(const char *tmp, const char *corpus)
{
    char out[4400], missing[4400], under_file[4400], tiny[4400];
    snprintf(out, sizeof out, "%s/bad_out", tmp);
    snprintf(missing, sizeof missing, "%s/no_such_corpus.txt", tmp);
    snprintf(under_file, sizeof under_file, "%s/sub", corpus); /* a directory under a regular file */
    snprintf(tiny, sizeof tiny, "%s/tiny.txt", tmp);
    write_bytes(tiny, "just a few words here\nand some more there\n", 41);
    const char *good[] = {corpus}, *bad[] = {missing}, *dir[] = {tmp}, *small[] = {tiny};
    /* each case changes one option of a good set */
    const struct {
        const char *name;
        const char *const *inputs;
        int ninputs, vocab_size;
        const char *out_dir, *want;
    } cases[] = {
        {"train_error_missing_input", bad, 1, 400, out, "no_such_corpus.txt: No such file"},
        {"train_error_input_is_dir", dir, 1, 400, out, "not a regular file"},
        {"train_error_vocab_5", good, 1, 5, out, "vocab_size 5 is out of range"},
        {"train_error_vocab_too_small_for_bytes", good, 1, 200, out, "too small for byte fallback"},
        {"train_error_unwritable_out_dir", good, 1, 400, under_file, "Not a directory"},
        {"train_error_no_inputs", good, 0, 400, out, "no input files"},
        {"train_error_spm_message", small, 1, 5000, out, "Vocabulary size too high"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        jm_tokenizer_train_opts o = {.inputs = cases[i].inputs, .ninputs = cases[i].ninputs,
                                     .vocab_size = cases[i].vocab_size, .out_dir = cases[i].out_dir,
                                     .byte_fallback = 1, .threads = 1};
        jm_error err = {{0}};
        jm_status s = jm_tokenizer_train(&o, &err);
        check(s != JM_OK && strstr(err.msg, cases[i].want), cases[i].name, "status %d, message \"%s\" (want \"%s\")", s,
              err.msg, cases[i].want);
    }
    check(!file_exists(out) || rmdir(out) == 0, "train_error_left_nothing", "%s is not empty", out);
}

/* ---------------------------------------------------------- malformed files */

/* A small valid tokenizer.json; each case below replaces one substring. */
static const char BASE[] =
    "{\"version\": \"1.0\", \"added_tokens\": ["
    "{\"id\": 0, \"content\": \"<unk>\", \"special\": true},"
    "{\"id\": 1, \"content\": \"<s>\", \"special\": true},"
    "{\"id\": 2, \"content\": \"</s>\", \"special\": true}],"
    " \"normalizer\": {\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Prepend\", \"prepend\": \"\xe2\x96\x81\"},"
    " {\"type\": \"Replace\", \"pattern\": {\"String\": \" \"}, \"content\": \"\xe2\x96\x81\"}]},"
    " \"pre_tokenizer\": null,"
    " \"decoder\": {\"type\": \"Sequence\", \"decoders\": [{\"type\": \"Replace\", \"pattern\": {\"String\": "
    "\"\xe2\x96\x81\"}, \"content\": \" \"}, {\"type\": \"ByteFallback\"}, {\"type\": \"Fuse\"}, {\"type\": \"Strip\", "
    "\"content\": \" \", \"start\": 1, \"stop\": 0}]},"
    " \"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": \"<unk>\", \"fuse_unk\": true, "
    "\"byte_fallback\": false,"
    " \"vocab\": {\"<unk>\": 0, \"<s>\": 1, \"</s>\": 2, \"\xe2\x96\x81\": 3, \"a\": 4, \"b\": 5, \"ab\": 6, "
    "\"\xe2\x96\x81\x61\x62\": 7, \"c\": 8},"
    " \"merges\": [\"a b\", \"\xe2\x96\x81 ab\"]}}";

static jm_status load_variant(const char *from, const char *to, jm_tokenizer **t, jm_error *err)
{
    char buf[8192];
    const char *at = from ? strstr(BASE, from) : NULL;
    if (from && !at) return jm_fail(err, JM_ERR_ARG, "test bug: \"%s\" not in BASE", from);
    size_t head = at ? (size_t)(at - BASE) : strlen(BASE);
    snprintf(buf, sizeof buf, "%.*s%s%s", (int)head, BASE, at ? to : "", at ? at + strlen(from) : "");
    return tk_load_json(buf, strlen(buf), "t.json", t, err);
}

static void expect_json_error(const char *name, const char *from, const char *to, const char *want)
{
    jm_tokenizer *t = NULL;
    jm_error err = {{0}};
    jm_status s = load_variant(from, to, &t, &err);
    check(s != JM_OK && !t && strstr(err.msg, want) && strstr(err.msg, "t.json"), name,
          "status %d, message \"%s\" (want \"%s\")", s, err.msg, want);
    jm_tokenizer_free(t);
}

static void test_json_variants(void)
{
    jm_tokenizer *t = NULL;
    jm_error err = {{0}};
    jm_status s = load_variant(NULL, NULL, &t, &err);
    check(s == JM_OK && t->n == 9 && t->type[0] == TK_UNKNOWN && t->type[1] == TK_CONTROL && t->type[4] == TK_NORMAL &&
              t->bos_id == 1 && t->eos_id == 2 && t->add_dummy_prefix && t->merges && tk_merge_allowed(t, 4, 5) &&
              !tk_merge_allowed(t, 5, 4) && t->score[6] == 0.0f && t->score[7] == -1.0f && t->score[3] < t->score[7],
          "json_base_loads", "status %d: %s", s, err.msg);
    if (!s) {
        int32_t *ids = NULL;
        size_t n = 0;
        s = jm_tokenizer_encode(t, "ab abc c", 8, &ids, &n, &err);
        /* ▁ab ▁ab c ▁ c: "▁ab" via a+b then ▁+ab; no merge makes "▁c" */
        int32_t want[] = {7, 7, 8, 3, 8};
        check(s == JM_OK && n == 5 && memcmp(ids, want, sizeof want) == 0, "json_base_encodes", "%zu ids", n);
        free(ids);
    }
    jm_tokenizer_free(t);

    /* accepted spellings */
    s = load_variant("[\"a b\", \"\xe2\x96\x81 ab\"]", "[[\"a\", \"b\"], [\"\xe2\x96\x81\", \"ab\"]]", &t, &err);
    check(s == JM_OK && tk_merge_allowed(t, 4, 5) && tk_merge_allowed(t, 3, 6), "json_merges_as_pairs", "%s", err.msg);
    jm_tokenizer_free(t);
    const char *metaspace_first = "\"normalizer\": null, \"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": "
                                  "\"\xe2\x96\x81\", \"prepend_scheme\": \"first\", \"split\": false},";
    const char *norm_from = strstr(BASE, " \"normalizer\"");
    const char *norm_to = strstr(BASE, " \"decoder\"");
    char span[1024];
    snprintf(span, sizeof span, "%.*s", (int)(norm_to - norm_from), norm_from);
    s = load_variant(span, metaspace_first, &t, &err);
    check(s == JM_OK && t->add_dummy_prefix && t->escape_whitespaces, "json_metaspace_first", "%s", err.msg);
    jm_tokenizer_free(t);
    char never[1024];
    snprintf(never, sizeof never, "%s", metaspace_first);
    memcpy(strstr(never, "first"), "never", 5);
    s = load_variant(span, never, &t, &err);
    check(s == JM_OK && !t->add_dummy_prefix, "json_metaspace_never", "%s", err.msg);
    jm_tokenizer_free(t);
    s = load_variant("{\"type\": \"Prepend\", \"prepend\": \"\xe2\x96\x81\"},", "", &t, &err);
    check(s == JM_OK && !t->add_dummy_prefix, "json_no_prepend", "%s", err.msg);
    jm_tokenizer_free(t);
    s = load_variant("{\"id\": 2, \"content\": \"</s>\", \"special\": true}",
                     "{\"id\": 2, \"content\": \"</s>\", \"special\": true}, {\"id\": 9, \"content\": \"<|user|>\", "
                     "\"special\": false}, {\"id\": 10, \"content\": \"<pad>\", \"special\": true}",
                     &t, &err);
    check(s == JM_OK && t->n == 11 && t->type[9] == TK_USER_DEFINED && t->type[10] == TK_CONTROL && t->pad_id == 10,
          "json_added_beyond_vocab", "%s", err.msg);
    jm_tokenizer_free(t);

    /* malformed: each names the field */
    expect_json_error("json_bad_syntax", "\"version\": \"1.0\",", "\"version\": ,", "malformed JSON");
    expect_json_error("json_bad_duplicate_key", "\"version\": \"1.0\",", "\"version\": \"1.0\", \"version\": 1,",
                      "duplicate key");
    expect_json_error("json_bad_no_model", "\"model\":", "\"modell\":", "model: missing");
    expect_json_error("json_bad_unigram", "\"type\": \"BPE\"", "\"type\": \"Unigram\"", "model.type: \"Unigram\"");
    expect_json_error("json_bad_vocab_array", "\"vocab\": {", "\"vocab\": [], \"x\": {", "model.vocab: missing or not");
    expect_json_error("json_bad_id_fraction", "\"c\": 8", "\"c\": 7.5", "model.vocab[\"c\"]: id is not an integer");
    expect_json_error("json_bad_id_negative", "\"c\": 8", "\"c\": -1", "model.vocab[\"c\"]: id is not an integer");
    expect_json_error("json_bad_id_string", "\"c\": 8", "\"c\": \"8\"", "model.vocab[\"c\"]");
    expect_json_error("json_bad_id_range", "\"c\": 8", "\"c\": 99", "model.vocab[\"c\"]: id is not an integer in 0..11");
    expect_json_error("json_bad_id_duplicate", "\"c\": 8", "\"c\": 5", "id 5 is given to both");
    expect_json_error("json_bad_id_gap", "\"c\": 8}", "\"c\": 8, \"d\": 10}", "no piece has id 9");
    expect_json_error("json_bad_merge_unknown", "\"a b\"", "\"a z\"", "model.merges[0]: \"z\" is not in model.vocab");
    expect_json_error("json_bad_merge_two_spaces", "\"a b\"", "\"a b c\"", "model.merges[0]: \"a b c\" is not two");
    expect_json_error("json_bad_merge_no_space", "\"a b\"", "\"ab\"", "model.merges[0]: \"ab\" is not two");
    expect_json_error("json_bad_merge_arity", "\"a b\"", "[\"a\"]", "model.merges[0]: neither");
    expect_json_error("json_bad_merge_product", "\"a b\"", "\"b a\"", "merged piece \"ba\" is not in");
    expect_json_error("json_bad_merge_repeat", "\"a b\", ", "\"a b\", \"a b\", ", "model.merges[1]: \"a\" \"b\" repeats");
    expect_json_error("json_bad_merges_type", "\"merges\": [", "\"merges\": 3, \"m\": [", "model.merges: not an array");
    expect_json_error("json_bad_bytelevel", "\"pre_tokenizer\": null",
                      "\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false}",
                      "pre_tokenizer: type \"ByteLevel\" is not supported");
    expect_json_error("json_bad_nfkc", "{\"type\": \"Prepend\"", "{\"type\": \"NFKC\"}, {\"type\": \"Prepend\"",
                      "normalizer: unsupported step 0 (type \"NFKC\")");
    expect_json_error("json_bad_no_space_escape", span, "\"normalizer\": null, \"pre_tokenizer\": null,",
                      "spaces are never replaced");
    char split[1024];
    snprintf(split, sizeof split, "%s", metaspace_first);
    memcpy(strstr(split, "false"), "true ", 5);
    expect_json_error("json_bad_metaspace_split", span, split, "pre_tokenizer.split: must be false");
    expect_json_error("json_bad_decoder", "{\"type\": \"Fuse\"}", "{\"type\": \"ByteLevel\"}",
                      "decoder: unsupported step 2 (type \"ByteLevel\")");
    expect_json_error("json_bad_added_mismatch", "\"content\": \"<s>\"", "\"content\": \"<bos>\"",
                      "added_tokens[1]: id 1 is \"<s>\" in model.vocab, not \"<bos>\"");
    expect_json_error("json_bad_added_two_ids", "{\"id\": 2, \"content\": \"</s>\", \"special\": true}",
                      "{\"id\": 2, \"content\": \"</s>\", \"special\": true}, {\"id\": 9, \"content\": \"a\"}",
                      "\"a\" has two ids, 4 and 9");
    expect_json_error("json_bad_added_id", "{\"id\": 1,", "{\"id\": true,", "added_tokens[1].id");
    expect_json_error("json_bad_unk", "\"unk_token\": \"<unk>\"", "\"unk_token\": \"<UNK>\"",
                      "model.unk_token: \"<UNK>\" is not in model.vocab");
    expect_json_error("json_bad_no_unk", "\"unk_token\": \"<unk>\"", "\"unk_token\": null", "model.unk_token: missing");
    expect_json_error("json_bad_byte_fallback", "\"byte_fallback\": false", "\"byte_fallback\": true",
                      "model.byte_fallback is true but \"<0x00>\" is not in model.vocab");
    expect_json_error("json_bad_dropout", "\"dropout\": null", "\"dropout\": 0.1", "model.dropout");
    expect_json_error("json_bad_fuse_unk", "\"fuse_unk\": true", "\"fuse_unk\": false", "model.fuse_unk");
    expect_json_error("json_bad_nul", "\"c\": 8", "\"c\\u0000\": 8", "\\u0000");
    expect_json_error("json_bad_empty_piece", "\"c\": 8", "\"\": 8", "id 8 is an empty piece");
    expect_json_error("json_bad_not_object", BASE, "[1, 2]", "not a JSON object");
}

/* jm_tokenizer_load picks the format by content, then by name: an empty file
 * is called empty, a byte order mark before '{' is JSON, and a *.json that is
 * not JSON is reported as JSON, not as a broken protobuf. */
static void test_file_formats(const char *tmp)
{
    char path[4200], dir[4200];
    jm_tokenizer *t = NULL, *u = NULL;
    jm_error err = {{0}};
    snprintf(path, sizeof path, "%s/plain.json", tmp);
    write_text(path, BASE);
    jm_status s = jm_tokenizer_load(path, &t, &err);
    check(s == JM_OK, "load_json_plain", "%s", err.msg);

    static const char *const prefixes[] = {"\xef\xbb\xbf", "\xef\xbb\xbf \n\t", " \r\n"};
    for (int i = 0; i < 3; i++) {
        char *text = malloc(strlen(BASE) + 16), name[64];
        snprintf(text, strlen(BASE) + 16, "%s%s", prefixes[i], BASE);
        snprintf(path, sizeof path, "%s/prefixed%d.model", tmp, i); /* content decides, not the name */
        write_text(path, text);
        free(text);
        s = jm_tokenizer_load(path, &u, &err);
        int32_t *a = NULL, *b = NULL;
        size_t na = 0, nb = 0;
        bool same = !s && t && !jm_tokenizer_encode(t, "ab abc c", 8, &a, &na, &err) &&
                    !jm_tokenizer_encode(u, "ab abc c", 8, &b, &nb, &err) && na == nb && !memcmp(a, b, na * sizeof *a);
        snprintf(name, sizeof name, "load_json_%s", i == 0 ? "bom" : i == 1 ? "bom_and_whitespace" : "whitespace");
        check(same, name, "%s", s ? err.msg : "encodes differently");
        free(a), free(b);
        jm_tokenizer_free(u);
        u = NULL;
    }
    jm_tokenizer_free(t);

    static const struct {
        const char *name, *file, *content, *want;
    } bad[] = {
        {"load_empty_model", "empty/tokenizer.model", "", "tokenizer.model: the file is empty (not a SentencePiece model)"},
        {"load_empty_json", "empty2/tokenizer.json", "", "tokenizer.json: the file is empty (not a tokenizer.json)"},
        {"load_bom_only_json", "bom/tokenizer.json", "\xef\xbb\xbf", "tokenizer.json: malformed JSON near byte"},
        {"load_json_name_not_json", "junk/tokenizer.json", "x\x05hello", "tokenizer.json: malformed JSON"},
        {"load_text_as_model", "text/tokenizer.model", "hello world\n", "tokenizer.model: ModelProto: field 13"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        snprintf(dir, sizeof dir, "%s/%.*s", tmp, (int)(strchr(bad[i].file, '/') - bad[i].file), bad[i].file);
        mkdir(dir, 0755);
        snprintf(path, sizeof path, "%s/%s", tmp, bad[i].file);
        write_text(path, bad[i].content);
        t = NULL;
        err.msg[0] = 0;
        s = jm_tokenizer_load(dir, &t, &err); /* the directory, as every command passes it */
        check(s == JM_ERR_FORMAT && !t && strstr(err.msg, bad[i].want) && strstr(err.msg, dir) &&
                  !strstr(err.msg, "UNIGRAM"),
              bad[i].name, "status %s: %s", jm_status_name(s), err.msg);
        jm_tokenizer_free(t);
    }
}

/* Pieces that need escaping survive save -> load -> save. */
static void test_escaping(const char *tmp)
{
    static const char *const pieces[] = {"<unk>", "<s>", "</s>", "\"", "\\", "\x01", "\t", "\n", "\x1f", "\x7f",
                                         "\xc3\xa9", "\xe2\x96\x81", "a\"b\\c", "/", "\xf0\x9f\x98\x80"};
    int n = (int)(sizeof pieces / sizeof pieces[0]);
    jm_tokenizer *t = NULL, *u = NULL;
    jm_error err = {{0}};
    jm_status s = tk_alloc(&t, n, "escape-test", &err);
    for (int i = 0; i < n && !s; i++)
        s = tk_set_piece(t, i, pieces[i], strlen(pieces[i]), i < 3 ? 0.0f : -(float)i,
                         i == 0 ? TK_UNKNOWN : i < 3 ? TK_CONTROL : TK_NORMAL, &err);
    if (!s) {
        t->bos_id = 1, t->eos_id = 2;
        t->remove_extra_whitespaces = false;
        s = tk_finish(t, &err);
    }
    char a[4200], b[4200];
    snprintf(a, sizeof a, "%s/esc_a.json", tmp);
    snprintf(b, sizeof b, "%s/esc_b.json", tmp);
    if (!s) s = jm_tokenizer_save_json(t, a, &err);
    if (!s) s = jm_tokenizer_load(a, &u, &err);
    if (!s) s = jm_tokenizer_save_json(u, b, &err);
    char why[512] = "";
    check(s == JM_OK && same_vocab(t, u, false, why, sizeof why) && same_file(a, b), "json_escaping_roundtrip",
          "%s %s", s ? err.msg : "", why);
    size_t len;
    char *text = s ? NULL : slurp(a, &len);
    check(text && strstr(text, "\"\\u0001\": 5") && strstr(text, "\"\\t\": 6") && strstr(text, "\"\\n\": 7") &&
              strstr(text, "\"\\u001f\": 8") && strstr(text, "\"a\\\"b\\\\c\": 12") && strstr(text, "\"\\\"\": 3"),
          "json_escaping_spelling", "unexpected escapes in %s", a);
    free(text);
    /* what the format cannot say */
    t->remove_extra_whitespaces = true;
    s = jm_tokenizer_save_json(t, a, &err);
    check(s != JM_OK && strstr(err.msg, "remove_extra_whitespaces"), "json_save_rejects_extra_ws", "%s", err.msg);
    jm_tokenizer_free(t);
    jm_tokenizer_free(u);
}

/* ----------------------------------------------------------------- Llama-2 */

static void test_llama2(const char *tmp)
{
    if (!file_exists(LLAMA2)) {
        printf("# skip llama2: %s not found\n", LLAMA2);
        return;
    }
    jm_tokenizer *m = NULL, *j = NULL, *k = NULL;
    jm_error err = {{0}};
    char a[4200], b[4200], why[512];
    snprintf(a, sizeof a, "%s/llama2.json", tmp);
    snprintf(b, sizeof b, "%s/llama2_again.json", tmp);
    jm_status s = jm_tokenizer_load(LLAMA2, &m, &err);
    double t0 = now(), t_save = 0, t_load = 0;
    if (!s) s = jm_tokenizer_save_json(m, a, &err);
    t_save = now() - t0;
    t0 = now();
    if (!s) s = jm_tokenizer_load(a, &j, &err);
    t_load = now() - t0;
    check(s == JM_OK, "llama2_json_convert", "%s", err.msg);
    if (s) goto done;
    printf("# llama2: save_json %.3fs, load json %.3fs\n", t_save, t_load);
    /* transformers' converter gives 61249 merges for this model, the count
     * in meta-llama/Llama-2-7b-hf's tokenizer.json */
    int merges = count_merges(a);
    check(merges == 61249, "llama2_json_merges", "%d merges", merges);
    check(t_save < 3.0, "llama2_json_save_fast", "%.2fs to write tokenizer.json", t_save);
    check(same_vocab(m, j, false, why, sizeof why), "llama2_json_vocab", "%s", why);
    int texts = compare_encodings(m, j, why, sizeof why);
    check(texts > 0, "llama2_json_encode", "%s", why);
    s = jm_tokenizer_save_json(j, b, &err);
    if (!s) s = jm_tokenizer_load(b, &k, &err);
    check(s == JM_OK && same_file(a, b), "llama2_json_roundtrip", "%s", s ? err.msg : "files differ");
done:
    jm_tokenizer_free(m);
    jm_tokenizer_free(j);
    jm_tokenizer_free(k);
}

int main(void)
{
    char tmp[] = "/tmp/jm-test-tokjson-XXXXXX";
    temp_dir(tmp);
    char corpus[4200];
    snprintf(corpus, sizeof corpus, "%s/corpus.txt", tmp);
    check(make_corpus(corpus, 400000), "corpus", "cannot write %s", corpus);

    test_json_variants();
    test_file_formats(tmp);
    test_escaping(tmp);
    test_trained(tmp, corpus, 1000, 1);
    test_trained(tmp, corpus, 600, 0);
    test_train_errors(tmp, corpus);
    test_llama2(tmp);

    temp_dir_done(tmp);
    return exit_status();
}
