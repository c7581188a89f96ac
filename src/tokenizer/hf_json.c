/* hf_json.c — Hugging Face tokenizer.json for SentencePiece BPE models of
 * the Llama-2 family: tk_load_json reads one into the core's representation,
 * jm_tokenizer_save_json writes one. (Training with spm_train is spm_train.c.)
 *
 * The encoder is SentencePiece's (core.c): at each step it merges the
 * adjacent pair whose concatenation has the highest score, the leftmost on
 * ties. tokenizer.json has no scores, only merges ranked by position, so
 * loading has to turn ranks back into scores:
 *
 *   score[p] = -k  for the k-th distinct piece produced by a merge (k = 0, 1, ..)
 *                  in list order; pieces no merge produces (single characters)
 *                  follow in id order; special, byte and user-defined pieces
 *                  get 0 (BPE never produces them).
 *
 * transformers' converter (convert_slow_tokenizer.py, generate_merges) lists
 * merges by the merged piece's score, best first, so this gives back the
 * .model's order. It is not "-(id)": in Llama-2, 16 whitespace pieces (▁▁ at
 * id 259, ▁▁▁▁ at 268, ...) carry score -1e9, so ids do not order priority,
 * and ranking them by id would merge runs of spaces before anything else. For
 * the models spm_train writes, whose normal pieces score -(id - first normal
 * id), the rule returns exactly the .model's scores.
 *
 * The merge list also restricts which pairs may merge (HF's BPE merges only
 * listed pairs): the list is handed to the core as a tk_merges. A converted file lists every
 * split of every piece, so for those the restriction changes nothing. */
#include "tokenizer/tokenizer.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* The vocabulary while it is being checked, before the tokenizer exists:
 * pieces by id and a string -> id hash (tk_find needs a finished tokenizer). */
typedef struct {
    int n;
    const char **piece;  /* by id; points into the cJSON tree */
    uint32_t *len;
    uint8_t *type;
    bool *added;         /* listed in added_tokens */
    int32_t *slot;       /* id, -1 = empty */
    uint32_t mask;
} vocab_table;

typedef struct {
    char *p;
    size_t len, cap;
    bool oom;
} outbuf;

typedef struct {
    int32_t merged, left, right;
    float score;
    uint32_t left_chars, right_chars;
} merge_rec;

static jm_status read_vocab(const cJSON *root, const cJSON *model, const char *name, bool byte_fallback,
                            vocab_table *v, jm_error *err);
static jm_status check_model_options(const cJSON *model, const char *name, bool *byte_fallback, jm_error *err);
static jm_status read_unk_and_bytes(const cJSON *model, const char *name, bool byte_fallback, vocab_table *v,
                                    int *unk_id, jm_error *err);
static jm_status read_normalization(const cJSON *root, const char *name, jm_tokenizer *t, jm_error *err);
static jm_status check_decoder(const cJSON *root, const char *name, jm_error *err);
static jm_status steps(const cJSON *j, const char *what, const char *list_key, const char *name,
                       const cJSON **first, int *count, jm_error *err);
static jm_status merge_parts(const cJSON *e, const char *name, size_t i, const char **l, size_t *ll, const char **r,
                             size_t *rl, jm_error *err);
static jm_status read_merges(const cJSON *model, const char *name, const vocab_table *v, tk_merges **out,
                             float *score, jm_error *err);
static int vocab_find(const vocab_table *v, const char *s, size_t len);
static uint32_t str_hash(const char *s, size_t len);
static void vocab_free(vocab_table *v);
static const cJSON *field(const cJSON *obj, const char *key);
static bool is_null_or_absent(const cJSON *j);
static bool is_string(const cJSON *j, const char *s);
static const char *type_of(const cJSON *j);
static bool replace_is(const cJSON *j, const char *from, const char *to);
static int64_t json_index(const cJSON *j, int64_t max);
static bool byte_piece(const char *s, size_t len);
static jm_status check_expressible(const jm_tokenizer *t, jm_error *err);
static void put_added_tokens(outbuf *b, const jm_tokenizer *t);
static void put_normalizer(outbuf *b, const jm_tokenizer *t);
static void put_post_processor(outbuf *b, const jm_tokenizer *t);
static void put_template_item(outbuf *b, const char *kind, const char *id, size_t id_len, int type_id, bool last);
static void put_decoder(outbuf *b, const jm_tokenizer *t);
static jm_status put_model(outbuf *b, const jm_tokenizer *t, jm_error *err);
static void put_merge(outbuf *b, const jm_tokenizer *t, int left, int right, bool last);
static jm_status generate_merges(const jm_tokenizer *t, merge_rec **out, size_t *nout, jm_error *err);
static int cmp_merge(const void *pa, const void *pb);
static uint32_t utf8_chars(const char *s, size_t n);
static void put(outbuf *b, const char *s, size_t n);
static void puts_(outbuf *b, const char *s);
static void put_int(outbuf *b, long long v);
static void put_escaped(outbuf *b, const char *s, size_t n);
static void put_string(outbuf *b, const char *s, size_t n);
static void put_piece(outbuf *b, const jm_tokenizer *t, int id);

jm_status tk_load_json(const char *text, size_t len, const char *name, jm_tokenizer **out, jm_error *err)
{
    *out = NULL;
    cJSON *root = NULL;
    vocab_table v = {0};
    tk_merges *merges = NULL;
    float *score = NULL;
    jm_tokenizer *t = NULL;
    jm_status s = jm_json_parse(text, len, name, &root, err);
    if (s) return s;
    bool byte_fallback = false;
    const cJSON *model = field(root, "model");
    if (!cJSON_IsObject(root)) {
        s = jm_fail(err, JM_ERR_FORMAT, "%s: not a JSON object", name);
    } else if (!(s = jm_json_no_nul(text, len, name, err)) && !cJSON_IsObject(model)) {
        s = jm_fail(err, JM_ERR_FORMAT, "%s: model: missing or not an object", name);
    }
    if (s || (s = check_model_options(model, name, &byte_fallback, err)) ||
        (s = read_vocab(root, model, name, byte_fallback, &v, err)))
        goto done;

    int unk_id = -1;
    if ((s = read_unk_and_bytes(model, name, byte_fallback, &v, &unk_id, err))) goto done;
    score = malloc((size_t)v.n * sizeof *score);
    if (!score) {
        s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", name);
        goto done;
    }
    if ((s = read_merges(model, name, &v, &merges, score, err)) || (s = check_decoder(root, name, err)) ||
        (s = tk_alloc(&t, v.n, name, err)) || (s = read_normalization(root, name, t, err)))
        goto done;
    for (int id = 0; id < v.n; id++)
        if ((s = tk_set_piece(t, id, v.piece[id], v.len[id], score[id], (tk_type)v.type[id], err))) goto done;
    t->byte_fallback = byte_fallback;
    t->unk_id = unk_id;
    t->bos_id = vocab_find(&v, "<s>", 3);
    t->eos_id = vocab_find(&v, "</s>", 4);
    t->pad_id = vocab_find(&v, "<pad>", 5);
    if ((s = tk_finish(t, err))) goto done;
    t->merges = merges;
    merges = NULL;
    *out = t;
    t = NULL;
done:
    tk_merges_free(merges);
    jm_tokenizer_free(t);
    free(score);
    vocab_free(&v);
    cJSON_Delete(root);
    return s;
}

/* The layout (field order, two-space indentation) of the tokenizer.json that
 * transformers writes for a converted Llama tokenizer. */
jm_status jm_tokenizer_save_json(const jm_tokenizer *t, const char *path, jm_error *err)
{
    jm_status s = check_expressible(t, err);
    if (s) return s;
    outbuf b = {0};
    puts_(&b, "{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n");
    put_added_tokens(&b, t);
    put_normalizer(&b, t);
    puts_(&b, "  \"pre_tokenizer\": null,\n");
    put_post_processor(&b, t);
    put_decoder(&b, t);
    if ((s = put_model(&b, t, err))) {
        free(b.p);
        return s;
    }
    if (b.oom) {
        free(b.p);
        return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
    }
    jm_atomic_file a;
    if (!(s = jm_atomic_open(&a, path, err))) {
        if ((s = jm_atomic_write(&a, b.p, b.len, err)))
            jm_atomic_abort(&a);
        else
            s = jm_atomic_commit(&a, err);
    }
    free(b.p);
    return s;
}

/* ------------------------------------------------------------------ loading */

/* model.unk_token -> the unknown piece; with byte_fallback, all 256 <0xNN>. */
static jm_status read_unk_and_bytes(const cJSON *model, const char *name, bool byte_fallback, vocab_table *v,
                                    int *unk_id, jm_error *err)
{
    const cJSON *unk = field(model, "unk_token");
    /* SentencePiece models always have one: unknown characters become it */
    if (!cJSON_IsString(unk))
        return jm_fail(err, JM_ERR_FORMAT, "%s: model.unk_token: %s", name,
                       is_null_or_absent(unk) ? "missing (a SentencePiece model needs an unknown piece)"
                                              : "not a string");
    *unk_id = vocab_find(v, unk->valuestring, strlen(unk->valuestring));
    if (*unk_id < 0)
        return jm_fail(err, JM_ERR_FORMAT, "%s: model.unk_token: \"%.60s\" is not in model.vocab", name,
                       unk->valuestring);
    v->type[*unk_id] = TK_UNKNOWN;
    for (int b = 0; b < 256 && byte_fallback; b++) {
        char piece[8];
        snprintf(piece, sizeof piece, "<0x%02X>", b);
        if (vocab_find(v, piece, 6) < 0)
            return jm_fail(err, JM_ERR_FORMAT, "%s: model.byte_fallback is true but \"%s\" is not in model.vocab",
                           name, piece);
    }
    return JM_OK;
}

/* model.vocab and added_tokens -> v, with ids exactly 0..n-1. */
static jm_status read_vocab(const cJSON *root, const cJSON *model, const char *name, bool byte_fallback,
                            vocab_table *v, jm_error *err)
{
    const cJSON *vocab = field(model, "vocab"), *added = field(root, "added_tokens");
    if (!cJSON_IsObject(vocab)) return jm_fail(err, JM_ERR_FORMAT, "%s: model.vocab: missing or not an object", name);
    if (!is_null_or_absent(added) && !cJSON_IsArray(added))
        return jm_fail(err, JM_ERR_FORMAT, "%s: added_tokens: not an array", name);
    int64_t nv = cJSON_GetArraySize(vocab), na = cJSON_IsArray(added) ? cJSON_GetArraySize(added) : 0;
    if (nv + na == 0) return jm_fail(err, JM_ERR_FORMAT, "%s: model.vocab: empty", name);
    if (nv + na > (1 << 24)) return jm_fail(err, JM_ERR_FORMAT, "%s: model.vocab: too many pieces", name);
    /* every id is below the number of entries, or some id in 0..n-1 is missing */
    int64_t max_id = nv + na - 1, n = 0;
    for (const cJSON *e = vocab->child; e; e = e->next) {
        int64_t id = json_index(e, max_id);
        if (id < 0)
            return jm_fail(err, JM_ERR_FORMAT, "%s: model.vocab[\"%.60s\"]: id is not an integer in 0..%lld", name,
                           e->string, (long long)max_id);
        if (id + 1 > n) n = id + 1;
    }
    int k = 0;
    for (const cJSON *a = cJSON_IsArray(added) ? added->child : NULL; a; a = a->next, k++) {
        int64_t id = json_index(field(a, "id"), max_id);
        if (!cJSON_IsObject(a) || id < 0)
            return jm_fail(err, JM_ERR_FORMAT, "%s: added_tokens[%d].id: missing or not an integer in 0..%lld",
                           name, k, (long long)max_id);
        if (!cJSON_IsString(field(a, "content")))
            return jm_fail(err, JM_ERR_FORMAT, "%s: added_tokens[%d].content: missing or not a string", name, k);
        const cJSON *special = field(a, "special");
        if (special && !cJSON_IsBool(special))
            return jm_fail(err, JM_ERR_FORMAT, "%s: added_tokens[%d].special: not a boolean", name, k);
        if (id + 1 > n) n = id + 1;
    }
    v->n = (int)n;
    v->piece = calloc((size_t)n, sizeof *v->piece);
    v->len = calloc((size_t)n, sizeof *v->len);
    v->type = calloc((size_t)n, sizeof *v->type);
    v->added = calloc((size_t)n, sizeof *v->added);
    uint32_t slots = 1;
    while (slots < 2 * (uint32_t)n) slots <<= 1;
    v->slot = malloc(slots * sizeof *v->slot);
    v->mask = slots - 1;
    if (!v->piece || !v->len || !v->type || !v->added || !v->slot)
        return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory for %lld pieces", name, (long long)n);
    memset(v->slot, 0xff, slots * sizeof *v->slot);

    for (const cJSON *e = vocab->child; e; e = e->next) {
        int id = (int)e->valuedouble;
        if (v->piece[id])
            return jm_fail(err, JM_ERR_FORMAT, "%s: model.vocab: id %d is given to both \"%.60s\" and \"%.60s\"",
                           name, id, v->piece[id], e->string);
        v->piece[id] = e->string;
        v->type[id] = TK_NORMAL;
    }
    k = 0;
    for (const cJSON *a = cJSON_IsArray(added) ? added->child : NULL; a; a = a->next, k++) {
        int id = (int)field(a, "id")->valuedouble;
        const char *content = field(a, "content")->valuestring;
        bool special = cJSON_IsTrue(field(a, "special"));
        if (v->added[id])
            return jm_fail(err, JM_ERR_FORMAT, "%s: added_tokens[%d]: id %d is listed twice", name, k, id);
        if (v->piece[id] && strcmp(v->piece[id], content) != 0)
            return jm_fail(err, JM_ERR_FORMAT,
                           "%s: added_tokens[%d]: id %d is \"%.60s\" in model.vocab, not \"%.60s\"", name, k, id,
                           v->piece[id], content);
        /* SentencePiece matches user-defined pieces exactly as written */
        const char *flags[] = {"lstrip", "rstrip", "single_word"};
        for (int f = 0; f < 3 && !special; f++)
            if (cJSON_IsTrue(field(a, flags[f])))
                return jm_fail(err, JM_ERR_FORMAT, "%s: added_tokens[%d].%s: not supported for a non-special token",
                               name, k, flags[f]);
        v->piece[id] = content;
        v->added[id] = true;
        v->type[id] = special ? TK_CONTROL : TK_USER_DEFINED;
    }
    for (int id = 0; id < n; id++) {
        if (!v->piece[id])
            return jm_fail(err, JM_ERR_FORMAT, "%s: model.vocab: no piece has id %d (ids must run 0..%lld)", name,
                           id, (long long)n - 1);
        size_t len = strlen(v->piece[id]);
        if (len == 0) return jm_fail(err, JM_ERR_FORMAT, "%s: model.vocab: id %d is an empty piece", name, id);
        if (len > UINT32_MAX / 2) return jm_fail(err, JM_ERR_FORMAT, "%s: model.vocab: id %d is too long", name, id);
        v->len[id] = (uint32_t)len;
        /* without byte fallback, SentencePiece has no byte pieces and HF's
         * "<0x41>" would be an ordinary token */
        if (byte_fallback && v->type[id] == TK_NORMAL && byte_piece(v->piece[id], len)) v->type[id] = TK_BYTE;
        uint32_t i = str_hash(v->piece[id], len) & v->mask;
        for (; v->slot[i] >= 0; i = (i + 1) & v->mask) {
            int other = v->slot[i];
            if (v->len[other] == len && memcmp(v->piece[other], v->piece[id], len) == 0)
                return jm_fail(err, JM_ERR_FORMAT, "%s: \"%.60s\" has two ids, %d and %d (model.vocab, added_tokens)",
                               name, v->piece[id], other, id);
        }
        v->slot[i] = id;
    }
    return JM_OK;
}

/* model.* other than vocab and merges: everything that must hold for
 * SentencePiece BPE semantics. */
static jm_status check_model_options(const cJSON *model, const char *name, bool *byte_fallback, jm_error *err)
{
    const cJSON *ty = field(model, "type");
    if (ty && !is_string(ty, "BPE"))
        return jm_fail(err, JM_ERR_FORMAT, "%s: model.type: \"%s\" is not supported (only BPE)", name,
                       cJSON_IsString(ty) ? ty->valuestring : "(not a string)");
    if (!ty && !field(model, "merges"))
        return jm_fail(err, JM_ERR_FORMAT, "%s: model.type: missing (and no merges: not a BPE model)", name);
    const cJSON *dropout = field(model, "dropout");
    if (!is_null_or_absent(dropout) && !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0))
        return jm_fail(err, JM_ERR_FORMAT, "%s: model.dropout: must be null (BPE dropout is random)", name);
    const char *affix[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        const cJSON *a = field(model, affix[i]);
        if (!is_null_or_absent(a) && !is_string(a, ""))
            return jm_fail(err, JM_ERR_FORMAT, "%s: model.%s: must be null for a SentencePiece model", name, affix[i]);
    }
    const cJSON *ignore = field(model, "ignore_merges");
    if (ignore && !cJSON_IsFalse(ignore))
        return jm_fail(err, JM_ERR_FORMAT, "%s: model.ignore_merges: must be false", name);
    const cJSON *bf = field(model, "byte_fallback"), *fuse = field(model, "fuse_unk");
    if (bf && !cJSON_IsBool(bf)) return jm_fail(err, JM_ERR_FORMAT, "%s: model.byte_fallback: not a boolean", name);
    if (fuse && !cJSON_IsBool(fuse)) return jm_fail(err, JM_ERR_FORMAT, "%s: model.fuse_unk: not a boolean", name);
    *byte_fallback = cJSON_IsTrue(bf);
    /* SentencePiece emits one <unk> for a run of unknown characters */
    if (!*byte_fallback && !cJSON_IsTrue(fuse))
        return jm_fail(err, JM_ERR_FORMAT,
                       "%s: model.fuse_unk: must be true without byte_fallback (SentencePiece fuses unknown runs)",
                       name);
    return JM_OK;
}

/* Reads the normalizer and pre_tokenizer into t's flags. Two spellings of the
 * Llama normalisation exist: transformers' "legacy" normalizer
 * Sequence[Prepend ▁, Replace " " -> ▁] with no pre-tokenizer, and the newer
 * Metaspace pre-tokenizer (replacement ▁, prepend_scheme first/always/never,
 * split false) with no normalizer. Metaspace prepends only when the text does
 * not already start with ▁; we keep SentencePiece's rule (always prepend), the
 * behaviour of the .model it was converted from. */
static jm_status read_normalization(const cJSON *root, const char *name, jm_tokenizer *t, jm_error *err)
{
    const cJSON *norm = field(root, "normalizer"), *pre = field(root, "pre_tokenizer");
    bool prepend = false, replace = false;
    if (!is_null_or_absent(norm)) {
        const cJSON *one;
        int count;
        jm_status s = steps(norm, "normalizer", "normalizers", name, &one, &count, err);
        if (s) return s;
        for (int i = 0; i < count; i++, one = one->next) {
            const char *ty = type_of(one);
            if (strcmp(ty, "Prepend") == 0 && !prepend && is_string(field(one, "prepend"), "\xe2\x96\x81")) {
                prepend = true;
            } else if (strcmp(ty, "Replace") == 0 && !replace && replace_is(one, " ", "\xe2\x96\x81")) {
                replace = true;
            } else {
                return jm_fail(err, JM_ERR_FORMAT,
                               "%s: normalizer: unsupported step %d (type \"%s\"); only Prepend \"\xe2\x96\x81\" "
                               "and Replace \" \" -> \"\xe2\x96\x81\" reproduce SentencePiece's identity normalisation",
                               name, i, ty);
            }
        }
        if (!replace)
            return jm_fail(err, JM_ERR_FORMAT, "%s: normalizer: no Replace \" \" -> \"\xe2\x96\x81\" step", name);
    }
    bool metaspace = false, meta_prepend = false;
    if (!is_null_or_absent(pre)) {
        const char *ty = cJSON_IsObject(pre) ? type_of(pre) : "(not an object)";
        if (strcmp(ty, "Metaspace") != 0)
            return jm_fail(err, JM_ERR_FORMAT,
                           "%s: pre_tokenizer: type \"%s\" is not supported (only Metaspace, or null)", name, ty);
        if (replace)
            return jm_fail(err, JM_ERR_FORMAT,
                           "%s: pre_tokenizer: Metaspace together with a Replace normalizer is not supported", name);
        if (!is_string(field(pre, "replacement"), "\xe2\x96\x81"))
            return jm_fail(err, JM_ERR_FORMAT, "%s: pre_tokenizer.replacement: must be \"\xe2\x96\x81\"", name);
        /* splitting at every ▁ would keep whitespace-only pieces from forming;
         * before tokenizers 0.14 there was no field and it always split */
        if (!cJSON_IsFalse(field(pre, "split")))
            return jm_fail(err, JM_ERR_FORMAT,
                           "%s: pre_tokenizer.split: must be false (splitting at \xe2\x96\x81 changes "
                           "SentencePiece's segmentation)", name);
        const cJSON *scheme = field(pre, "prepend_scheme"), *aps = field(pre, "add_prefix_space");
        if (is_string(scheme, "first") || is_string(scheme, "always")) {
            meta_prepend = true;
        } else if (is_string(scheme, "never")) {
            meta_prepend = false;
        } else if (!scheme && cJSON_IsBool(aps)) {
            meta_prepend = cJSON_IsTrue(aps);
        } else {
            return jm_fail(err, JM_ERR_FORMAT,
                           "%s: pre_tokenizer.prepend_scheme: must be \"first\", \"always\" or \"never\"", name);
        }
        metaspace = true;
    }
    if (!replace && !metaspace)
        return jm_fail(err, JM_ERR_FORMAT,
                       "%s: normalizer: spaces are never replaced by \"\xe2\x96\x81\" (need a Replace normalizer "
                       "or a Metaspace pre_tokenizer)", name);
    t->add_dummy_prefix = metaspace ? meta_prepend : prepend;
    t->escape_whitespaces = true;
    t->remove_extra_whitespaces = false;
    t->treat_whitespace_as_suffix = false;
    snprintf(t->normalizer_name, sizeof t->normalizer_name, "identity");
    return JM_OK;
}

/* The decoder does not change encoding, but one we do not know (ByteLevel,
 * WordPiece, ...) means a tokenizer of another family. */
static jm_status check_decoder(const cJSON *root, const char *name, jm_error *err)
{
    const cJSON *dec = field(root, "decoder");
    if (is_null_or_absent(dec)) return JM_OK;
    const cJSON *one;
    int count;
    jm_status s = steps(dec, "decoder", "decoders", name, &one, &count, err);
    if (s) return s;
    for (int i = 0; i < count; i++, one = one->next) {
        const char *ty = type_of(one);
        bool ok = strcmp(ty, "ByteFallback") == 0 || strcmp(ty, "Fuse") == 0 || strcmp(ty, "Metaspace") == 0 ||
                  (strcmp(ty, "Replace") == 0 && replace_is(one, "\xe2\x96\x81", " ")) ||
                  (strcmp(ty, "Strip") == 0 && is_string(field(one, "content"), " "));
        if (!ok)
            return jm_fail(err, JM_ERR_FORMAT, "%s: decoder: unsupported step %d (type \"%s\")", name, i, ty);
    }
    return JM_OK;
}

/* The steps of a normalizer or decoder: a Sequence's list, or the one object. */
static jm_status steps(const cJSON *j, const char *what, const char *list_key, const char *name,
                       const cJSON **first, int *count, jm_error *err)
{
    *first = j;
    *count = 1;
    if (!cJSON_IsObject(j)) return jm_fail(err, JM_ERR_FORMAT, "%s: %s: not an object", name, what);
    if (!is_string(field(j, "type"), "Sequence")) return JM_OK;
    const cJSON *list = field(j, list_key);
    if (!cJSON_IsArray(list))
        return jm_fail(err, JM_ERR_FORMAT, "%s: %s.%s: missing or not an array", name, what, list_key);
    *count = cJSON_GetArraySize(list);
    *first = list->child;
    return JM_OK;
}

/* One model.merges entry: "left right" (exactly one space) or ["left", "right"]. */
static jm_status merge_parts(const cJSON *e, const char *name, size_t i, const char **l, size_t *ll, const char **r,
                             size_t *rl, jm_error *err)
{
    if (cJSON_IsString(e)) {
        const char *s = e->valuestring, *sp = strchr(s, ' ');
        if (!sp || sp == s || !sp[1] || strchr(sp + 1, ' '))
            return jm_fail(err, JM_ERR_FORMAT,
                           "%s: model.merges[%zu]: \"%.60s\" is not two pieces separated by one space", name, i, s);
        *l = s, *ll = (size_t)(sp - s), *r = sp + 1, *rl = strlen(sp + 1);
        return JM_OK;
    }
    if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(e->child) &&
        cJSON_IsString(e->child->next)) {
        *l = e->child->valuestring, *ll = strlen(*l);
        *r = e->child->next->valuestring, *rl = strlen(*r);
        return JM_OK;
    }
    return jm_fail(err, JM_ERR_FORMAT, "%s: model.merges[%zu]: neither a \"left right\" string nor a pair of strings",
                   name, i);
}

/* model.merges -> the merge table, and the scores it implies (see the top). */
static jm_status read_merges(const cJSON *model, const char *name, const vocab_table *v, tk_merges **out,
                             float *score, jm_error *err)
{
    const cJSON *merges = field(model, "merges");
    if (!is_null_or_absent(merges) && !cJSON_IsArray(merges))
        return jm_fail(err, JM_ERR_FORMAT, "%s: model.merges: not an array", name);
    size_t n = cJSON_IsArray(merges) ? (size_t)cJSON_GetArraySize(merges) : 0;
    tk_merges *m = tk_merges_new(n);
    int32_t *order = malloc((size_t)v->n * sizeof *order); /* piece -> its rank among merge results */
    char *cat = NULL;
    size_t cat_cap = 0;
    jm_status s = JM_OK;
    if (!m || !order) {
        s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory for %zu merges", name, n);
        goto done;
    }
    for (int i = 0; i < v->n; i++) order[i] = -1;
    int32_t next = 0;
    size_t i = 0;
    for (const cJSON *e = n ? merges->child : NULL; e; e = e->next, i++) {
        const char *l = NULL, *r = NULL;
        size_t ll = 0, rl = 0;
        if ((s = merge_parts(e, name, i, &l, &ll, &r, &rl, err))) goto done;
        int a = vocab_find(v, l, ll), b = vocab_find(v, r, rl);
        if (a < 0 || b < 0) {
            s = jm_fail(err, JM_ERR_FORMAT, "%s: model.merges[%zu]: \"%.*s\" is not in model.vocab", name, i,
                        (int)(a < 0 ? ll : rl), a < 0 ? l : r);
            goto done;
        }
        if (ll + rl + 1 > cat_cap) {
            cat_cap = 2 * (ll + rl + 1);
            char *c = realloc(cat, cat_cap);
            if (!c) {
                s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", name);
                goto done;
            }
            cat = c;
        }
        memcpy(cat, l, ll);
        memcpy(cat + ll, r, rl);
        int c = vocab_find(v, cat, ll + rl);
        if (c < 0) {
            s = jm_fail(err, JM_ERR_FORMAT, "%s: model.merges[%zu]: the merged piece \"%.*s\" is not in model.vocab",
                        name, i, (int)(ll + rl), cat);
            goto done;
        }
        /* SentencePiece only ever merges normal pieces into a normal piece:
         * special and byte pieces are never formed, user-defined ones are
         * matched whole before BPE starts */
        bool usable = v->type[a] == TK_NORMAL && v->type[b] == TK_NORMAL && v->type[c] == TK_NORMAL;
        int64_t earlier = tk_merges_add(m, a, b, usable);
        if (earlier >= 0) {
            s = jm_fail(err, JM_ERR_FORMAT, "%s: model.merges[%zu]: \"%.*s\" \"%.*s\" repeats merges[%lld]", name, i,
                        (int)ll, l, (int)rl, r, (long long)earlier);
            goto done;
        }
        if (usable && order[c] < 0) order[c] = next++;
    }
    for (int id = 0; id < v->n; id++) {
        if (v->type[id] != TK_NORMAL) {
            score[id] = 0.0f;
            continue;
        }
        if (order[id] < 0) order[id] = next++;
        score[id] = -(float)order[id]; /* exact: fewer than 2^24 pieces */
    }
done:
    free(order);
    free(cat);
    if (s) {
        tk_merges_free(m);
        m = NULL;
    }
    *out = m;
    return s;
}

static int vocab_find(const vocab_table *v, const char *s, size_t len)
{
    for (uint32_t i = str_hash(s, len) & v->mask;; i = (i + 1) & v->mask) {
        int id = v->slot[i];
        if (id < 0) return -1;
        if (v->len[id] == len && memcmp(v->piece[id], s, len) == 0) return id;
    }
}

static uint32_t str_hash(const char *s, size_t len)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < len; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

static void vocab_free(vocab_table *v)
{
    free(v->piece);
    free(v->len);
    free(v->type);
    free(v->added);
    free(v->slot);
}

static const cJSON *field(const cJSON *obj, const char *key)
{
    return cJSON_GetObjectItemCaseSensitive(obj, key);
}

static bool is_null_or_absent(const cJSON *j)
{
    return !j || cJSON_IsNull(j);
}

static bool is_string(const cJSON *j, const char *s)
{
    return cJSON_IsString(j) && strcmp(j->valuestring, s) == 0;
}

static const char *type_of(const cJSON *j)
{
    const cJSON *ty = field(j, "type");
    return cJSON_IsString(ty) ? ty->valuestring : "(no type)";
}

/* Replace {"pattern": {"String": from}, "content": to} */
static bool replace_is(const cJSON *j, const char *from, const char *to)
{
    return is_string(field(field(j, "pattern"), "String"), from) && is_string(field(j, "content"), to);
}

/* A JSON number that is an integer in [0, max]; -1 otherwise. */
static int64_t json_index(const cJSON *j, int64_t max)
{
    if (!cJSON_IsNumber(j)) return -1;
    double d = j->valuedouble;
    if (!isfinite(d) || d < 0 || d > (double)max || d != floor(d)) return -1;
    return (int64_t)d;
}

static bool byte_piece(const char *s, size_t len)
{
    /* SentencePiece spells byte pieces <0xNN> with upper-case hex */
    static const char hex[] = "0123456789ABCDEF";
    return len == 6 && memcmp(s, "<0x", 3) == 0 && s[5] == '>' && s[3] && strchr(hex, s[3]) && s[4] &&
           strchr(hex, s[4]);
}

/* ------------------------------------------------------------ the merge table */

/* ------------------------------------------------------------------ saving */

/* What the Llama tokenizer.json format can say: SentencePiece's identity
 * normalisation with ▁ for spaces, an optional dummy prefix, and pieces HF can
 * hold. */
static jm_status check_expressible(const jm_tokenizer *t, jm_error *err)
{
    const char *why = !t->escape_whitespaces          ? "escape_whitespaces is off"
                      : t->remove_extra_whitespaces   ? "remove_extra_whitespaces is on"
                      : t->treat_whitespace_as_suffix ? "treat_whitespace_as_suffix is on"
                      : t->charsmap && t->charsmap_len ? "it has a normalisation rule (precompiled charsmap)"
                                                       : NULL;
    if (why)
        return jm_fail(err, JM_ERR_ARG, "%s: cannot be written as a Llama-style tokenizer.json: %s", t->source, why);
    for (int id = 0; id < t->n; id++) {
        if (t->type[id] == TK_UNUSED)
            return jm_fail(err, JM_ERR_ARG, "%s: piece %d is of type UNUSED, which tokenizer.json cannot express",
                           t->source, id);
        if (!isfinite(t->score[id]))
            return jm_fail(err, JM_ERR_ARG, "%s: piece %d has a non-finite score", t->source, id);
    }
    return JM_OK;
}

static void put_added_tokens(outbuf *b, const jm_tokenizer *t)
{
    puts_(b, "  \"added_tokens\": [");
    bool first = true;
    for (int id = 0; id < t->n; id++) {
        int ty = t->type[id];
        if (ty != TK_CONTROL && ty != TK_UNKNOWN && ty != TK_USER_DEFINED) continue;
        puts_(b, first ? "\n" : ",\n");
        first = false;
        puts_(b, "    {\n      \"id\": ");
        put_int(b, id);
        puts_(b, ",\n      \"content\": ");
        put_piece(b, t, id);
        puts_(b, ",\n      \"single_word\": false,\n      \"lstrip\": false,\n      \"rstrip\": false,\n"
                 "      \"normalized\": false,\n      \"special\": ");
        puts_(b, ty == TK_USER_DEFINED ? "false\n    }" : "true\n    }");
    }
    puts_(b, first ? "],\n" : "\n  ],\n");
}

static void put_normalizer(outbuf *b, const jm_tokenizer *t)
{
    puts_(b, "  \"normalizer\": {\n    \"type\": \"Sequence\",\n    \"normalizers\": [\n");
    if (t->add_dummy_prefix)
        puts_(b, "      {\n        \"type\": \"Prepend\",\n        \"prepend\": \"\xe2\x96\x81\"\n      },\n");
    puts_(b, "      {\n        \"type\": \"Replace\",\n        \"pattern\": {\n          \"String\": \" \"\n        },\n"
             "        \"content\": \"\xe2\x96\x81\"\n      }\n    ]\n  },\n");
}

/* BOS before every sequence, as LlamaTokenizerFast sets it up (add_bos_token). */
static void put_post_processor(outbuf *b, const jm_tokenizer *t)
{
    if (t->bos_id < 0) {
        puts_(b, "  \"post_processor\": null,\n");
        return;
    }
    const char *bos = t->piece[t->bos_id];
    size_t bos_len = t->piece_len[t->bos_id];
    puts_(b, "  \"post_processor\": {\n    \"type\": \"TemplateProcessing\",\n    \"single\": [\n");
    put_template_item(b, "SpecialToken", bos, bos_len, 0, false);
    put_template_item(b, "Sequence", "A", 1, 0, true);
    puts_(b, "    ],\n    \"pair\": [\n");
    put_template_item(b, "SpecialToken", bos, bos_len, 0, false);
    put_template_item(b, "Sequence", "A", 1, 0, false);
    put_template_item(b, "SpecialToken", bos, bos_len, 1, false);
    put_template_item(b, "Sequence", "B", 1, 1, true);
    puts_(b, "    ],\n    \"special_tokens\": {\n      ");
    put_string(b, bos, bos_len);
    puts_(b, ": {\n        \"id\": ");
    put_string(b, bos, bos_len);
    puts_(b, ",\n        \"ids\": [\n          ");
    put_int(b, t->bos_id);
    puts_(b, "\n        ],\n        \"tokens\": [\n          ");
    put_string(b, bos, bos_len);
    puts_(b, "\n        ]\n      }\n    }\n  },\n");
}

/* One TemplateProcessing entry: {"SpecialToken": {"id": "<s>", "type_id": 0}}
 * or {"Sequence": {"id": "A", "type_id": 0}}. */
static void put_template_item(outbuf *b, const char *kind, const char *id, size_t id_len, int type_id, bool last)
{
    puts_(b, "      {\n        \"");
    puts_(b, kind);
    puts_(b, "\": {\n          \"id\": ");
    put_string(b, id, id_len);
    puts_(b, ",\n          \"type_id\": ");
    put_int(b, type_id);
    puts_(b, last ? "\n        }\n      }\n" : "\n        }\n      },\n");
}

static void put_decoder(outbuf *b, const jm_tokenizer *t)
{
    puts_(b, "  \"decoder\": {\n    \"type\": \"Sequence\",\n    \"decoders\": [\n"
             "      {\n        \"type\": \"Replace\",\n        \"pattern\": {\n          \"String\": \"\xe2\x96\x81\"\n"
             "        },\n        \"content\": \" \"\n      },\n"
             "      {\n        \"type\": \"ByteFallback\"\n      },\n"
             "      {\n        \"type\": \"Fuse\"\n      }");
    /* the dummy prefix decodes to a leading space, which SentencePiece drops */
    if (t->add_dummy_prefix)
        puts_(b, ",\n      {\n        \"type\": \"Strip\",\n        \"content\": \" \",\n        \"start\": 1,\n"
                 "        \"stop\": 0\n      }");
    puts_(b, "\n    ]\n  },\n");
}

static jm_status put_model(outbuf *b, const jm_tokenizer *t, jm_error *err)
{
    puts_(b, "  \"model\": {\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": ");
    if (t->unk_id >= 0)
        put_piece(b, t, t->unk_id);
    else
        puts_(b, "null");
    puts_(b, ",\n    \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n"
             "    \"fuse_unk\": true,\n    \"byte_fallback\": ");
    puts_(b, t->byte_fallback ? "true" : "false");
    puts_(b, ",\n    \"vocab\": {\n");
    for (int id = 0; id < t->n; id++) {
        puts_(b, "      ");
        put_piece(b, t, id);
        puts_(b, ": ");
        put_int(b, id);
        puts_(b, id + 1 < t->n ? ",\n" : "\n");
    }
    puts_(b, "    },\n    \"merges\": [\n");
    if (t->merges) {
        /* loaded from tokenizer.json: write the list back as it was */
        size_t n = tk_merges_count(t->merges);
        for (size_t i = 0; i < n; i++) {
            int l, r;
            tk_merges_get(t->merges, i, &l, &r);
            put_merge(b, t, l, r, i + 1 == n);
        }
    } else {
        merge_rec *gen = NULL;
        size_t n = 0;
        jm_status s = generate_merges(t, &gen, &n, err);
        if (s) return s;
        for (size_t i = 0; i < n; i++) put_merge(b, t, gen[i].left, gen[i].right, i + 1 == n);
        free(gen);
    }
    puts_(b, "    ]\n  }\n}\n");
    return JM_OK;
}

static void put_merge(outbuf *b, const jm_tokenizer *t, int left, int right, bool last)
{
    puts_(b, "      \"");
    put_escaped(b, t->piece[left], t->piece_len[left]);
    put(b, " ", 1);
    put_escaped(b, t->piece[right], t->piece_len[right]);
    puts_(b, last ? "\"\n" : "\",\n");
}

/* The merges SentencePiece could make: every split of a normal piece into
 * two normal pieces (at character boundaries; both halves are pieces), as
 * transformers' SentencePieceExtractor lists them. One hash lookup per split. */
static jm_status generate_merges(const jm_tokenizer *t, merge_rec **out, size_t *nout, jm_error *err)
{
    size_t n = 0, cap = 1024;
    merge_rec *m = malloc(cap * sizeof *m);
    if (!m) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", t->source);
    for (int id = 0; id < t->n; id++) {
        if (t->type[id] != TK_NORMAL) continue;
        const char *p = t->piece[id];
        size_t len = t->piece_len[id];
        for (size_t k = 1; k < len; k++) {
            if (((unsigned char)p[k] & 0xc0) == 0x80) continue;
            int a = tk_find(t, p, k), b = tk_find(t, p + k, len - k);
            if (a < 0 || b < 0 || t->type[a] != TK_NORMAL || t->type[b] != TK_NORMAL) continue;
            if (n == cap) {
                merge_rec *g = realloc(m, 2 * cap * sizeof *m);
                if (!g) {
                    free(m);
                    return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", t->source);
                }
                m = g, cap *= 2;
            }
            m[n++] = (merge_rec){id, a, b, t->score[id], utf8_chars(p, k), utf8_chars(p + k, len - k)};
        }
    }
    qsort(m, n, sizeof *m, cmp_merge);
    *out = m;
    *nout = n;
    return JM_OK;
}

/* transformers' order: merged piece's score, best first; then the longer left
 * part, the longer right part (in characters); then piece ids (its sort is
 * stable over a list built in id order). */
static int cmp_merge(const void *pa, const void *pb)
{
    const merge_rec *a = pa, *b = pb;
    if (a->score != b->score) return a->score > b->score ? -1 : 1;
    if (a->left_chars != b->left_chars) return a->left_chars > b->left_chars ? -1 : 1;
    if (a->right_chars != b->right_chars) return a->right_chars > b->right_chars ? -1 : 1;
    if (a->merged != b->merged) return a->merged < b->merged ? -1 : 1;
    if (a->left != b->left) return a->left < b->left ? -1 : 1;
    return (a->right > b->right) - (a->right < b->right);
}

static uint32_t utf8_chars(const char *s, size_t n)
{
    uint32_t c = 0;
    for (size_t i = 0; i < n; i++) c += ((unsigned char)s[i] & 0xc0) != 0x80;
    return c;
}

static void put(outbuf *b, const char *s, size_t n)
{
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1 << 16;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p, b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void puts_(outbuf *b, const char *s)
{
    put(b, s, strlen(s));
}

static void put_int(outbuf *b, long long v)
{
    char tmp[32];
    put(b, tmp, (size_t)snprintf(tmp, sizeof tmp, "%lld", v));
}

/* A JSON string body, escaped as serde_json (and so HF) writes it: \" \\ and
 * \b \f \n \r \t, other control characters as \u00XX, UTF-8 as is. */
static void put_escaped(outbuf *b, const char *s, size_t n)
{
    size_t from = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        put(b, s + from, i - from);
        char e[8];
        const char *named = c == '"' ? "\\\"" : c == '\\' ? "\\\\" : c == '\b' ? "\\b" : c == '\f' ? "\\f"
                          : c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t" : NULL;
        if (!named) snprintf(e, sizeof e, "\\u%04x", c);
        puts_(b, named ? named : e);
        from = i + 1;
    }
    put(b, s + from, n - from);
}

static void put_string(outbuf *b, const char *s, size_t n)
{
    put(b, "\"", 1);
    put_escaped(b, s, n);
    put(b, "\"", 1);
}

static void put_piece(outbuf *b, const jm_tokenizer *t, int id)
{
    put_string(b, t->piece[id], t->piece_len[id]);
}
