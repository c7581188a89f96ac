/* core.c — the tokenizer core: the pieces and their index, the normaliser,
 * BPE encoding (plain, and with special-token strings) and decoding.
 *
 * The reference is SentencePiece 0.1.97 (Debian's spm_encode/spm_decode) on
 * BPE models; each step says which part of it it reproduces:
 *   normalizer.cc              -> normalize(), next_unit(), charsmap_match()
 *   bpe_model.cc               -> merge_segment(), emit_resegmented()
 *   sentencepiece_processor.cc -> emit_id() (byte fallback, <unk> runs), decode_ids()
 *   model_interface.cc         -> tk_finish()'s checks
 * The core knows no file format: the loaders above it (spm_model.c for
 * tokenizer.model, hf_json.c for tokenizer.json, tokenizer_config.c; load.c
 * picks one) build a jm_tokenizer with tk_alloc/tk_set_piece/tk_finish. */
#include "tokenizer/tokenizer.h"

#include <errno.h>
#include <math.h>
#include <string.h>
#include <sys/stat.h>

#define TK_MAX_INPUT ((size_t)1 << 30) /* bytes per encode call; keeps offsets in 32 bits */

#define SPACE_SYMBOL "\xe2\x96\x81"       /* U+2581, what an escaped space becomes */
#define REPLACEMENT_CHAR "\xef\xbf\xbd"   /* U+FFFD, for malformed UTF-8 */
#define DEFAULT_UNK_SURFACE " \xe2\x81\x87 " /* TrainerSpec.unk_surface default: " ⁇ " */

/* Fields of NormalizerSpec that change the text (also used for DenormalizerSpec). */
typedef struct {
    const uint8_t *trie; /* darts-clone double-array units, uint32 little-endian */
    size_t nunits;
    const char *pool;    /* NUL-separated replacement strings the trie's values point into */
    size_t pool_len;
    bool add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces, ws_suffix;
    const jm_tokenizer *user; /* user-defined pieces pass through untouched; NULL for none */
} norm_spec;

typedef struct {
    uint64_t key; /* left symbol id << 32 | right symbol id; UINT64_MAX = empty */
    int32_t id;   /* the piece their concatenation is */
    float score;  /* its score, here to save a lookup */
} tk_pair;

/* t->priv: what the core derives from the pieces. */
typedef struct {
    uint32_t *slot_hash;    /* beside t->slots: the full hash of each slot's piece */

    /* built by build_encoder_index (see the BPE section) */
    bool has_unused;        /* any TK_UNUSED piece (needs resegmentation) */
    uint8_t user_first[32]; /* bitmap: first bytes of user-defined pieces */
    uint32_t user_lens[64]; /* distinct user-defined piece lengths, longest first */
    int n_user_lens;        /* -1: too many distinct lengths, use all 1..user_max */
    uint32_t user_max;
    int32_t ascii_sym[128]; /* symbol id of each ASCII character, -1 none */
    uint64_t *char_key;     /* other characters: packed bytes -> symbol id (0 = empty) */
    int32_t *char_sym;
    uint32_t char_mask, char_used;
    tk_pair *pairs;         /* (left symbol, right symbol) -> merged piece */
    uint32_t pair_mask;
    uint64_t *pair_bits;    /* filter: which symbol pairs occur inside a piece */
} tk_core;

#define PAIR_BITS 20 /* 2^20-bit filter: 128 KiB, a few % false positives on 32k pieces */

static jm_status encode_text(const jm_tokenizer *t, const char *text, size_t len, int32_t **ids, size_t *n,
                             jm_error *err);
static jm_status decode_ids(const jm_tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len,
                            jm_error *err);
static void quote(char *out, size_t cap, const char *s, size_t len);

/* ======================================================================
 * Public API
 * ====================================================================== */

void jm_tokenizer_free(jm_tokenizer *t)
{
    if (!t) return;
    tk_merges_free(t->merges);
    if (t->piece)
        for (int i = 0; i < t->n; i++) free(t->piece[i]);
    free(t->piece);
    free(t->piece_len);
    free(t->score);
    free(t->type);
    free(t->charsmap);
    free(t->chat_template);
    free(t->eos_token);
    free(t->bos_token);
    free(t->unk_surface);
    free(t->denorm_charsmap);
    free(t->slots);
    tk_core *c = t->priv;
    if (c) {
        free(c->pair_bits);
        free(c->slot_hash);
        free(c->char_key);
        free(c->char_sym);
        free(c->pairs);
        free(c);
    }
    free(t);
}

int jm_tokenizer_vocab_size(const jm_tokenizer *t) { return t->n; }
int jm_tokenizer_bos_id(const jm_tokenizer *t) { return t->bos_id; }
int jm_tokenizer_eos_id(const jm_tokenizer *t) { return t->eos_id; }
int jm_tokenizer_unk_id(const jm_tokenizer *t) { return t->unk_id; }

const char *jm_tokenizer_piece(const jm_tokenizer *t, int id)
{
    return id >= 0 && id < t->n ? t->piece[id] : NULL;
}

jm_status jm_tokenizer_encode(const jm_tokenizer *t, const char *text, size_t len, int32_t **ids, size_t *n,
                              jm_error *err)
{
    *ids = NULL;
    *n = 0;
    if (!text && len) return jm_fail(err, JM_ERR_ARG, "encode: text is NULL");
    if (len > TK_MAX_INPUT)
        return jm_fail(err, JM_ERR_ARG, "encode: input of %zu bytes is over the %zu-byte limit", len, TK_MAX_INPUT);
    return encode_text(t, text, len, ids, n, err);
}

jm_status jm_tokenizer_decode(const jm_tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len,
                              jm_error *err)
{
    *text = NULL;
    if (len) *len = 0;
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= t->n)
            return jm_fail(err, JM_ERR_ARG, "decode: token id %d (position %zu) is outside the vocabulary [0, %d)",
                           (int)ids[i], i, t->n);
    return decode_ids(t, ids, n, text, len, err);
}

/* ======================================================================
 * Builder shared by every loader
 * ====================================================================== */

jm_status tk_alloc(jm_tokenizer **out, int n, const char *source, jm_error *err)
{
    *out = NULL;
    if (n <= 0 || n > TK_MAX_PIECES)
        return jm_fail(err, JM_ERR_FORMAT, "%s: vocabulary of %d pieces (must be 1..%d)", source, n, TK_MAX_PIECES);
    jm_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", source);
    t->n = n;
    t->piece = calloc((size_t)n, sizeof *t->piece);
    t->piece_len = calloc((size_t)n, sizeof *t->piece_len);
    t->score = calloc((size_t)n, sizeof *t->score);
    t->type = calloc((size_t)n, sizeof *t->type);
    t->priv = calloc(1, sizeof(tk_core));
    if (!t->piece || !t->piece_len || !t->score || !t->type || !t->priv) {
        jm_tokenizer_free(t);
        return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory for %d pieces", source, n);
    }
    t->unk_id = t->bos_id = t->eos_id = t->pad_id = -1;
    for (int i = 0; i < 256; i++) t->byte_id[i] = -1;
    /* NormalizerSpec defaults (sentencepiece_model.proto) */
    t->add_dummy_prefix = t->remove_extra_whitespaces = t->escape_whitespaces = true;
    snprintf(t->source, sizeof t->source, "%s", source);
    *out = t;
    return JM_OK;
}

jm_status tk_set_piece(jm_tokenizer *t, int id, const char *s, size_t len, float score, tk_type type,
                       jm_error *err)
{
    char q[80];
    if (id < 0 || id >= t->n) return jm_fail(err, JM_ERR_FORMAT, "%s: piece id %d out of range", t->source, id);
    if (t->piece[id]) return jm_fail(err, JM_ERR_FORMAT, "%s: piece %d given twice", t->source, id);
    /* model_interface.cc rejects the same two */
    if (len == 0) return jm_fail(err, JM_ERR_FORMAT, "%s: piece %d is empty", t->source, id);
    if (memchr(s, 0, len)) {
        quote(q, sizeof q, s, len);
        return jm_fail(err, JM_ERR_FORMAT, "%s: piece %d (%s) contains a NUL byte", t->source, id, q);
    }
    if (len > UINT32_MAX / 2) return jm_fail(err, JM_ERR_FORMAT, "%s: piece %d is too long", t->source, id);
    if (type < TK_NORMAL || type > TK_BYTE)
        return jm_fail(err, JM_ERR_FORMAT, "%s: piece %d has unknown type %d", t->source, id, (int)type);
    /* a NaN score would make the merge order depend on the heap's internals */
    if (isnan(score)) return jm_fail(err, JM_ERR_FORMAT, "%s: piece %d has a NaN score", t->source, id);
    char *p = malloc(len + 1);
    if (!p) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", t->source);
    memcpy(p, s, len);
    p[len] = 0;
    t->piece[id] = p;
    t->piece_len[id] = (uint32_t)len;
    t->score[id] = score;
    t->type[id] = (uint8_t)type;
    return JM_OK;
}

static uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static uint32_t load32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* murmur3's finaliser: every output bit depends on every input bit, which
 * the tables need (they index by the low bits of keys like a << 32 | b). */
static uint64_t mix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

/* The hash of the piece index and of the segment cache: reads words, not
 * bytes (overlapping loads, never past s + len). */
static uint32_t hash_bytes(const uint8_t *s, size_t len)
{
    uint64_t h = len * 0x9e3779b97f4a7c15ull;
    if (len >= 8) {
        size_t i = 0;
        for (; i + 8 < len; i += 8) h = mix64(h ^ load64(s + i)) + 0x632be59bd9b4e019ull;
        h ^= load64(s + len - 8);
    } else if (len >= 4) {
        h ^= (uint64_t)load32(s) << 32 | load32(s + len - 4);
    } else if (len > 0) {
        h ^= (uint64_t)s[0] << 16 | (uint64_t)s[len / 2] << 8 | s[len - 1];
    }
    return (uint32_t)(mix64(h) >> 32);
}

static bool same_bytes(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i]) return false;
    return true;
}

/* Lookups that miss (user-defined matching, loading) are turned away by the
 * stored hash without touching the piece strings. */
int tk_find(const jm_tokenizer *t, const char *s, size_t len)
{
    if (!t->slots) return -1;
    const uint32_t *sh = ((const tk_core *)t->priv)->slot_hash;
    uint32_t mask = t->nslots - 1, hash = hash_bytes((const uint8_t *)s, len);
    for (uint32_t h = hash & mask;; h = (h + 1) & mask) {
        uint32_t v = t->slots[h];
        if (!v) return -1;
        int id = (int)(v - 1);
        if (sh[h] == hash && t->piece_len[id] == len && same_bytes(t->piece[id], s, len)) return id;
    }
}

/* "<0x41>" -> 0x41; -1 unless exactly SentencePiece's spelling (uppercase hex). */
static int byte_of_piece(const char *s, uint32_t len)
{
    static const char hex[] = "0123456789ABCDEF";
    if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    const char *hi = memchr(hex, s[3], 16), *lo = memchr(hex, s[4], 16);
    if (!hi || !lo) return -1;
    return (int)((hi - hex) * 16 + (lo - hex));
}

static uint32_t one_char_len(uint8_t c);
static jm_status build_encoder_index(jm_tokenizer *t, jm_error *err);
static jm_status check_charsmap(const uint8_t *blob, size_t len, const char *source, const char *what,
                                jm_error *err);

static bool is_mergeable(uint8_t type) { return type == TK_NORMAL || type == TK_USER_DEFINED || type == TK_UNUSED; }

jm_status tk_finish(jm_tokenizer *t, jm_error *err)
{
    tk_core *c = t->priv;
    char q[80];
    for (int i = 0; i < t->n; i++)
        if (!t->piece[i]) return jm_fail(err, JM_ERR_FORMAT, "%s: piece %d was never set", t->source, i);

    /* the piece -> id index; unlike SentencePiece, which keeps control, unknown
     * and byte pieces in a second map, one string may name only one piece */
    t->nslots = 16;
    while (t->nslots < 2u * (uint32_t)t->n) t->nslots *= 2;
    free(t->slots);
    free(c->slot_hash);
    t->slots = calloc(t->nslots, sizeof *t->slots);
    c->slot_hash = calloc(t->nslots, sizeof *c->slot_hash);
    if (!t->slots || !c->slot_hash) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", t->source);
    uint32_t mask = t->nslots - 1;
    for (int i = 0; i < t->n; i++) {
        uint32_t hash = hash_bytes((const uint8_t *)t->piece[i], t->piece_len[i]), h = hash & mask;
        for (;; h = (h + 1) & mask) {
            uint32_t v = t->slots[h];
            if (!v) break;
            int j = (int)(v - 1);
            if (t->piece_len[j] == t->piece_len[i] && memcmp(t->piece[j], t->piece[i], t->piece_len[i]) == 0) {
                quote(q, sizeof q, t->piece[i], t->piece_len[i]);
                return jm_fail(err, JM_ERR_FORMAT, "%s: duplicate piece %s (ids %d and %d)", t->source, q, j, i);
            }
        }
        t->slots[h] = (uint32_t)i + 1;
        c->slot_hash[h] = hash;
    }

    /* exactly one unknown piece: every unknown character becomes it */
    int unk = -1;
    for (int i = 0; i < t->n; i++) {
        if (t->type[i] != TK_UNKNOWN) continue;
        if (unk >= 0)
            return jm_fail(err, JM_ERR_FORMAT, "%s: two unknown pieces (ids %d and %d); exactly one is allowed",
                           t->source, unk, i);
        unk = i;
    }
    if (unk < 0) return jm_fail(err, JM_ERR_FORMAT, "%s: no piece of type UNKNOWN (<unk>)", t->source);
    if (t->unk_id >= 0 && t->unk_id != unk)
        return jm_fail(err, JM_ERR_FORMAT, "%s: unk_id is %d but the unknown piece is %d", t->source, t->unk_id, unk);
    t->unk_id = unk;
    const struct { const char *name; int id; } special[] = {
        {"bos_id", t->bos_id}, {"eos_id", t->eos_id}, {"pad_id", t->pad_id}};
    for (int k = 0; k < 3; k++)
        if (special[k].id < -1 || special[k].id >= t->n)
            return jm_fail(err, JM_ERR_FORMAT, "%s: %s %d is outside the vocabulary [0, %d)", t->source,
                           special[k].name, special[k].id, t->n);

    /* byte pieces, checked as model_interface.cc checks them */
    int nbytes = 0;
    for (int i = 0; i < t->n; i++) {
        if (t->type[i] != TK_BYTE) continue;
        int b = byte_of_piece(t->piece[i], t->piece_len[i]);
        if (b < 0 || !t->byte_fallback) quote(q, sizeof q, t->piece[i], t->piece_len[i]);
        if (b < 0)
            return jm_fail(err, JM_ERR_FORMAT, "%s: byte piece %d is %s, not of the form <0xNN> (uppercase hex)",
                           t->source, i, q);
        if (!t->byte_fallback)
            return jm_fail(err, JM_ERR_FORMAT, "%s: byte piece %s (id %d) but byte_fallback is off", t->source, q,
                           i);
        t->byte_id[b] = i;
        nbytes++;
    }
    if (t->byte_fallback && nbytes != 256)
        return jm_fail(err, JM_ERR_FORMAT, "%s: byte_fallback is on but only %d of the 256 byte pieces exist",
                       t->source, nbytes);

    jm_status s;
    if (t->charsmap_len && (s = check_charsmap(t->charsmap, t->charsmap_len, t->source, "normalizer", err)))
        return s;
    if (t->denorm_charsmap_len &&
        (s = check_charsmap(t->denorm_charsmap, t->denorm_charsmap_len, t->source, "denormalizer", err)))
        return s;

    return build_encoder_index(t, err);
}

/* ======================================================================
 * Special-token strings in text (as transformers tokenizes them)
 * ====================================================================== */

/* The strings templates see as eos_token/bos_token: tokenizer_config.json's,
 * else the model's own pieces. Without a tokenizer: Llama's </s> and <s>. */
const char *tk_eos_string(const jm_tokenizer *t)
{
    if (t && t->eos_token) return t->eos_token;
    const char *p = t && t->eos_id >= 0 ? jm_tokenizer_piece(t, t->eos_id) : NULL;
    return p ? p : "</s>";
}

const char *tk_bos_string(const jm_tokenizer *t)
{
    if (!t) return "<s>";
    if (t->bos_token) return t->bos_token;
    return t->bos_id >= 0 ? jm_tokenizer_piece(t, t->bos_id) : NULL; /* NULL: undefined in the template */
}

typedef struct {
    const char *s;
    size_t len;
    int32_t id;
    size_t next; /* its next occurrence in the text; text length: none; SIZE_MAX: not searched yet */
} special;

static jm_status push_ids(int32_t **ids, size_t *n, size_t *cap, const int32_t *add, size_t k, jm_error *err)
{
    if (k == 0) return JM_OK; /* a segment may encode to nothing (add is then NULL) */
    if (*n + k > *cap) {
        size_t c = (*n + k) * 2 + 16;
        int32_t *p = realloc(*ids, c * sizeof *p);
        if (!p) return jm_fail(err, JM_ERR_NOMEM, "chat: out of memory for %zu ids", c);
        *ids = p, *cap = c;
    }
    memcpy(*ids + *n, add, k * sizeof *add);
    *n += k;
    return JM_OK;
}

/* Rendered text -> ids the way transformers tokenizes a rendered template:
 * the special token strings the template wrote (EOS, and BOS when a template
 * such as Llama-2's writes bos_token itself) become their ids, and the text
 * between them is encoded on its own. So a message whose content contains
 * "</s>" gets an EOS id there too, as in HF.
 *
 * Dummy prefix: each piece of text is encoded with jm_tokenizer_encode, that
 * is as spm_encode does, with the model's add_dummy_prefix. After a special
 * token that gives "▁" first: "</s>\n<|user|>" -> </s> ▁ <0x0A> < | user | >
 * (29871 13 ... with Llama's vocabulary). That is what transformers does by
 * default for Llama-family tokenizers: LlamaTokenizer with legacy=True (the
 * default when tokenizer_config.json does not say "legacy": false) encodes
 * each piece between special tokens with sp_model.encode, dummy prefix
 * included, and LlamaTokenizerFast's Prepend("▁") normalizer does the same.
 * Only legacy=False leaves the prefix out (</s> <0x0A> ...). Our sft and chat
 * both encode through here, so training and inference agree either way.
 *
 * BOS: ids start with the BOS id (as HF's tokenizer(text) with its default
 * add_special_tokens=True does after rendering, which is how Zephyr-style SFT
 * data is tokenized) unless the template already wrote bos_token first. */
jm_status jm_tokenizer_encode_special(const jm_tokenizer *t, const char *text, size_t len, int32_t **ids,
                                      size_t *n_ids, jm_error *err)
{
    *ids = NULL, *n_ids = 0;
    size_t nid = 0, cap = 0;
    int32_t *out = NULL;
    jm_status s = JM_OK;
    special sp[2];
    int nsp = 0;
    const char *const names[2] = {"eos_token", "bos_token"}, *strs[2] = {tk_eos_string(t), tk_bos_string(t)};
    for (int i = 0; i < 2; i++) {
        if (!strs[i] || !strs[i][0]) continue;
        size_t sl = strlen(strs[i]);
        int id = tk_find(t, strs[i], sl);
        if (id < 0 && (i == 0 ? t->eos_token : t->bos_token)) { /* only our "</s>" fallback may be absent */
            s = jm_fail(err, JM_ERR_CONFIG, "%s: %s \"%.40s\" is not in the vocabulary", t->source, names[i],
                        strs[i]);
            goto done;
        }
        if (id < 0) continue;
        sp[nsp++] = (special){strs[i], sl, id, SIZE_MAX};
    }
    for (size_t p = 0; p < len;) {
        special *hit = NULL;
        for (int i = 0; i < nsp; i++) {
            if (sp[i].next == SIZE_MAX || sp[i].next < p) { /* stale: each occurrence is searched for once */
                const char *f = memmem(text + p, len - p, sp[i].s, sp[i].len);
                sp[i].next = f ? (size_t)(f - text) : len;
            }
            bool first = !hit || sp[i].next < hit->next || (sp[i].next == hit->next && sp[i].len > hit->len);
            if (sp[i].next < len && first) hit = &sp[i];
        }
        size_t q = hit ? hit->next : len;
        if (q > p) {
            int32_t *seg = NULL;
            size_t k = 0;
            s = jm_tokenizer_encode(t, text + p, q - p, &seg, &k, err);
            if (!s) s = push_ids(&out, &nid, &cap, seg, k, err);
            free(seg);
            if (s) goto done;
        }
        if (!hit) break;
        if ((s = push_ids(&out, &nid, &cap, &hit->id, 1, err))) goto done;
        p = q + hit->len;
    }
done:
    if (s) {
        free(out);
        return s;
    }
    *ids = out, *n_ids = nid;
    return JM_OK;
}

/* ======================================================================
 * Explicit merge list (HF tokenizer.json's model.merges)
 * ====================================================================== */

/* An open-addressing set of (left id, right id) pairs, plus the list in its
 * original order so that a writer can give it back unchanged. */
struct tk_merges {
    uint64_t *key;  /* ((left + 1) << 32 | (right + 1)); 0 = empty slot */
    uint32_t *rank; /* position in the list; top bit set = usable by the encoder */
    uint32_t mask;  /* slots - 1 */
    int32_t *pairs; /* 2 * n ids, in order */
    size_t n, cap;
};

#define MERGE_USABLE 0x80000000u

static uint64_t merge_key(int a, int b) { return ((uint64_t)(uint32_t)(a + 1) << 32) | (uint32_t)(b + 1); }

/* Slot of key, or of the empty slot where it would go. */
static uint32_t merge_slot(const tk_merges *m, uint64_t key)
{
    uint32_t i = (uint32_t)mix64(key) & m->mask;
    while (m->key[i] && m->key[i] != key) i = (i + 1) & m->mask;
    return i;
}

tk_merges *tk_merges_new(size_t cap)
{
    if (cap > TK_MAX_MERGES) return NULL;
    tk_merges *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    uint32_t slots = 16;
    while (slots < 2 * cap + 16) slots <<= 1;
    m->key = calloc(slots, sizeof *m->key);
    m->rank = calloc(slots, sizeof *m->rank);
    m->pairs = malloc((2 * cap + 1) * sizeof *m->pairs);
    m->mask = slots - 1;
    m->cap = cap;
    if (!m->key || !m->rank || !m->pairs) {
        tk_merges_free(m);
        return NULL;
    }
    return m;
}

int64_t tk_merges_add(tk_merges *m, int a, int b, bool usable)
{
    if (m->n == m->cap) return INT64_MAX;
    uint64_t key = merge_key(a, b);
    uint32_t slot = merge_slot(m, key);
    if (m->key[slot]) return m->rank[slot] & ~MERGE_USABLE;
    m->key[slot] = key;
    m->rank[slot] = (uint32_t)m->n | (usable ? MERGE_USABLE : 0);
    m->pairs[2 * m->n] = a;
    m->pairs[2 * m->n + 1] = b;
    m->n++;
    return -1;
}

size_t tk_merges_count(const tk_merges *m) { return m ? m->n : 0; }

void tk_merges_get(const tk_merges *m, size_t i, int *a, int *b)
{
    *a = m->pairs[2 * i];
    *b = m->pairs[2 * i + 1];
}

void tk_merges_free(tk_merges *m)
{
    if (!m) return;
    free(m->key);
    free(m->rank);
    free(m->pairs);
    free(m);
}

bool tk_merge_allowed(const jm_tokenizer *t, int a, int b)
{
    const tk_merges *m = t->merges;
    if (!m || a < 0 || b < 0 || a >= t->n || b >= t->n) return false;
    uint32_t i = merge_slot(m, merge_key(a, b));
    return m->key[i] && (m->rank[i] & MERGE_USABLE);
}

/* ======================================================================
 * UTF-8, as SentencePiece's util.h sees it
 * ====================================================================== */

/* OneCharLen: the length the lead byte announces, never checked. */
static uint32_t one_char_len(uint8_t c)
{
    return c < 0xc0 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
}

static bool is_trail(uint8_t c) { return (c & 0xc0) == 0x80; }

/* IsValidDecodeUTF8: the length of the well-formed character at s, 0 when it
 * is malformed (overlong, surrogate, above U+10FFFF, truncated). */
static size_t utf8_len(const uint8_t *s, size_t n)
{
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    if ((c & 0xe0) == 0xc0) {
        if (n >= 2 && is_trail(s[1]) && c >= 0xc2) return 2;
    } else if ((c & 0xf0) == 0xe0) {
        if (n >= 3 && is_trail(s[1]) && is_trail(s[2])) {
            uint32_t cp = (uint32_t)(c & 0x0f) << 12 | (uint32_t)(s[1] & 0x3f) << 6 | (s[2] & 0x3f);
            if (cp >= 0x800 && (cp < 0xd800 || cp > 0xdfff)) return 3;
        }
    } else if ((c & 0xf8) == 0xf0) {
        if (n >= 4 && is_trail(s[1]) && is_trail(s[2]) && is_trail(s[3])) {
            uint32_t cp = (uint32_t)(c & 0x07) << 18 | (uint32_t)(s[1] & 0x3f) << 12 |
                          (uint32_t)(s[2] & 0x3f) << 6 | (s[3] & 0x3f);
            if (cp >= 0x10000 && cp <= 0x10ffff) return 4;
        }
    }
    return 0;
}

/* ======================================================================
 * Growable output buffer (one per call, never per symbol)
 * ====================================================================== */

typedef struct {
    char *p;
    size_t n, cap;
} tk_buf;

static bool buf_reserve(tk_buf *b, size_t extra)
{
    if (b->cap - b->n >= extra) return true;
    if (extra > SIZE_MAX / 4 - b->n) return false;
    size_t cap = b->cap ? b->cap : 64;
    while (cap - b->n < extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return false;
    b->p = p;
    b->cap = cap;
    return true;
}

static bool buf_put(tk_buf *b, const void *s, size_t n)
{
    if (!buf_reserve(b, n)) return false;
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    return true;
}

/* ======================================================================
 * Normaliser (normalizer.cc)
 * ====================================================================== */

static uint32_t u32le(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* precompiled_charsmap = <uint32 LE trie size><trie units><string pool> */
static jm_status check_charsmap(const uint8_t *blob, size_t len, const char *source, const char *what,
                                jm_error *err)
{
    if (len <= 4)
        return jm_fail(err, JM_ERR_FORMAT, "%s: %s precompiled_charsmap is broken (%zu bytes)", source, what, len);
    uint32_t trie = u32le(blob);
    if (trie < 4 || trie > len - 4)
        return jm_fail(err, JM_ERR_FORMAT, "%s: %s precompiled_charsmap: trie of %u bytes does not fit in %zu",
                       source, what, trie, len);
    return JM_OK;
}

static void charsmap_spec(norm_spec *ns, const uint8_t *blob, size_t len)
{
    ns->trie = NULL;
    ns->nunits = 0;
    ns->pool = NULL;
    ns->pool_len = 0;
    if (!len) return;
    uint32_t trie = u32le(blob); /* checked by check_charsmap */
    ns->trie = blob + 4;
    ns->nunits = trie / 4;
    ns->pool = (const char *)blob + 4 + trie;
    ns->pool_len = len - 4 - trie;
}

/* Longest key of the darts-clone trie that prefixes s (commonPrefixSearch,
 * keeping the longest). Returns its length, 0 for none; *value is its offset
 * into the pool. Every unit index is bounds-checked: a corrupt trie just
 * matches less. */
static size_t charsmap_match(const norm_spec *ns, const uint8_t *s, size_t n, uint32_t *value)
{
    const uint8_t *a = ns->trie;
    size_t nu = ns->nunits, best = 0;
    if (!nu) return 0;
    uint32_t unit = u32le(a);
    /* unit: offset = (u >> 10) << ((u & 512) >> 6); has_leaf = bit 8;
     * label = u & (1<<31 | 0xff); value = u & 0x7fffffff */
    size_t pos = (size_t)(unit >> 10) << ((unit & (1u << 9)) >> 6);
    for (size_t i = 0; i < n; i++) {
        pos ^= s[i];
        if (pos >= nu) break;
        unit = u32le(a + 4 * pos);
        if ((unit & (0x80000000u | 0xffu)) != s[i]) break;
        pos ^= (size_t)(unit >> 10) << ((unit & (1u << 9)) >> 6);
        if ((unit >> 8) & 1) {
            if (pos >= nu) break;
            uint32_t v = u32le(a + 4 * pos) & 0x7fffffffu;
            if (v < ns->pool_len) {
                best = i + 1;
                *value = v;
            }
        }
    }
    return best;
}

/* Longest user-defined piece that prefixes s: its length (0 for none) and id. */
static size_t user_match(const jm_tokenizer *t, const uint8_t *s, size_t n, int *id)
{
    const tk_core *c = t->priv;
    if (!(c->user_first[s[0] >> 3] & (1u << (s[0] & 7)))) return 0;
    if (c->n_user_lens >= 0) {
        for (int k = 0; k < c->n_user_lens; k++) {
            uint32_t L = c->user_lens[k];
            if (L > n) continue;
            *id = tk_find(t, (const char *)s, L);
            if (*id >= 0 && t->type[*id] == TK_USER_DEFINED) return L;
        }
        return 0;
    }
    for (size_t L = c->user_max < n ? c->user_max : n; L > 0; L--) {
        *id = tk_find(t, (const char *)s, L);
        if (*id >= 0 && t->type[*id] == TK_USER_DEFINED) return L;
    }
    return 0;
}

/* NormalizePrefix: how many input bytes the next unit takes, and what it
 * becomes: a user-defined piece verbatim, else the charsmap's replacement for
 * the longest rule, else one character (U+FFFD for one malformed byte). */
static size_t next_unit(const norm_spec *ns, const uint8_t *s, size_t n, const char **out, size_t *out_len)
{
    if (ns->user) {
        int id;
        size_t L = user_match(ns->user, s, n, &id);
        if (L) {
            *out = (const char *)s;
            *out_len = L;
            return L;
        }
    }
    uint32_t v;
    size_t L = charsmap_match(ns, s, n, &v);
    if (L) {
        *out = ns->pool + v;
        *out_len = strnlen(ns->pool + v, ns->pool_len - v);
        return L;
    }
    L = utf8_len(s, n);
    if (!L) {
        *out = REPLACEMENT_CHAR;
        *out_len = 3;
        return 1;
    }
    *out = (const char *)s;
    *out_len = L;
    return L;
}

static bool put_ws(const norm_spec *ns, tk_buf *b)
{
    return ns->escape_whitespaces ? buf_put(b, SPACE_SYMBOL, 3) : buf_put(b, " ", 1);
}

/* Normalizer::Normalize. Only ' ' (after the charsmap) counts as whitespace. */
static bool normalize(const norm_spec *ns, const uint8_t *in, size_t len, tk_buf *b)
{
    b->n = 0;
    /* identity normalisation grows text at most 3x (space -> U+2581, bad byte -> U+FFFD) */
    if (!buf_reserve(b, 3 * len + 6)) return false;
    if (len == 0) return true;
    size_t pos = 0;
    const char *r;
    size_t rlen;
    if (ns->remove_extra_whitespaces) { /* drop leading units that become exactly " " */
        while (pos < len) {
            size_t used = next_unit(ns, in + pos, len - pos, &r, &rlen);
            if (!(rlen == 1 && r[0] == ' ')) break;
            pos += used;
        }
    }
    if (pos == len) return true;
    if (!ns->ws_suffix && ns->add_dummy_prefix && !put_ws(ns, b)) return false;
    bool prev_space = ns->remove_extra_whitespaces;
    while (pos < len) {
        size_t used = next_unit(ns, in + pos, len - pos, &r, &rlen);
        while (prev_space && rlen && r[0] == ' ') r++, rlen--;
        if (rlen) {
            if (!buf_reserve(b, 3 * rlen)) return false;
            char *o = b->p + b->n;
            for (size_t i = 0; i < rlen; i++) {
                if (r[i] == ' ' && ns->escape_whitespaces) {
                    memcpy(o, SPACE_SYMBOL, 3);
                    o += 3;
                } else {
                    *o++ = r[i];
                }
            }
            b->n = (size_t)(o - b->p);
            prev_space = r[rlen - 1] == ' ';
        }
        pos += used;
        if (!ns->remove_extra_whitespaces) prev_space = false;
    }
    if (ns->remove_extra_whitespaces) { /* trailing: even a U+2581 that was in the input */
        const char *ws = ns->escape_whitespaces ? SPACE_SYMBOL : " ";
        size_t wl = ns->escape_whitespaces ? 3 : 1;
        while (b->n >= wl && memcmp(b->p + b->n - wl, ws, wl) == 0) b->n -= wl;
    }
    if (ns->ws_suffix && ns->add_dummy_prefix && !put_ws(ns, b)) return false;
    return true;
}

static void model_norm_spec(const jm_tokenizer *t, norm_spec *ns)
{
    charsmap_spec(ns, t->charsmap, t->charsmap_len);
    ns->add_dummy_prefix = t->add_dummy_prefix;
    ns->remove_extra_whitespaces = t->remove_extra_whitespaces;
    ns->escape_whitespaces = t->escape_whitespaces;
    ns->ws_suffix = t->treat_whitespace_as_suffix;
    const tk_core *c = t->priv;
    ns->user = c->user_max ? t : NULL;
}

/* ======================================================================
 * BPE (bpe_model.cc)
 *
 * SentencePiece splits the normalised text into characters (user-defined
 * pieces whole, and frozen), then repeatedly merges the adjacent pair whose
 * concatenation is a piece (NORMAL, USER_DEFINED or UNUSED) of the highest
 * score, the leftmost on ties, until no pair is a piece.
 *
 * We get the same result faster in three ways:
 * - Symbols carry ids, so "is the concatenation a piece" is one probe of a
 *   table keyed by the two ids, built from every split of every piece into
 *   two symbols. A character that is no piece but occurs inside one gets a
 *   pseudo id >= t->n.
 * - Two neighbours can only end up in one symbol if some piece contains them
 *   side by side; wherever none does, the text splits into segments that
 *   merge independently. pair_bits over-approximates that set (a false
 *   positive only costs a longer segment). Each segment runs the merge loop
 *   with a binary heap of candidates and lazy invalidation, O(n log n).
 * - Segments (mostly words) recur, and their results are cached per call.
 * ====================================================================== */

static uint64_t char_pack(const uint8_t *s, uint32_t len) /* len <= 4; never 0 */
{
    uint64_t v = len;
    for (uint32_t i = 0; i < len; i++) v = v << 8 | s[i];
    return v;
}

/* Symbol id of the character s[0..len), -1 when no piece is or contains it. */
static int32_t char_sym(const tk_core *c, const uint8_t *s, uint32_t len)
{
    if (len == 1 && s[0] < 0x80) return c->ascii_sym[s[0]];
    uint64_t key = char_pack(s, len);
    for (uint32_t h = (uint32_t)mix64(key) & c->char_mask;; h = (h + 1) & c->char_mask) {
        if (c->char_key[h] == key) return c->char_sym[h];
        if (!c->char_key[h]) return -1;
    }
}

static uint64_t pair_of(int32_t a, int32_t b) { return (uint64_t)(uint32_t)a << 32 | (uint32_t)b; }

/* The mergeable piece that symbols a and b make, NULL for none. */
static const tk_pair *pair_find(const tk_core *c, int32_t a, int32_t b)
{
    uint64_t key = pair_of(a, b);
    for (uint32_t h = (uint32_t)mix64(key) & c->pair_mask;; h = (h + 1) & c->pair_mask) {
        const tk_pair *e = &c->pairs[h];
        if (e->key == key) return e;
        if (e->key == UINT64_MAX) return NULL;
    }
}

static bool pair_maybe_inside(const tk_core *c, int32_t a, int32_t b)
{
    uint64_t k = mix64(pair_of(a, b) * 0x9e3779b97f4a7c15ull) >> (64 - PAIR_BITS);
    return c->pair_bits[k >> 6] >> (k & 63) & 1;
}

/* Adds character key -> sym unless present, growing the table at half full. */
static bool char_insert(tk_core *c, uint64_t key, int32_t sym)
{
    if (2 * (c->char_used + 1) > c->char_mask + 1) {
        uint32_t n = 2 * (c->char_mask + 1);
        uint64_t *keys = calloc(n, sizeof *keys);
        int32_t *syms = calloc(n, sizeof *syms);
        if (!keys || !syms) {
            free(keys);
            free(syms);
            return false;
        }
        for (uint32_t i = 0; i <= c->char_mask; i++) {
            if (!c->char_key[i]) continue;
            uint32_t h = (uint32_t)mix64(c->char_key[i]) & (n - 1);
            while (keys[h]) h = (h + 1) & (n - 1);
            keys[h] = c->char_key[i];
            syms[h] = c->char_sym[i];
        }
        free(c->char_key);
        free(c->char_sym);
        c->char_key = keys;
        c->char_sym = syms;
        c->char_mask = n - 1;
    }
    uint32_t h = (uint32_t)mix64(key) & c->char_mask;
    while (c->char_key[h] && c->char_key[h] != key) h = (h + 1) & c->char_mask;
    if (!c->char_key[h]) {
        c->char_key[h] = key;
        c->char_sym[h] = sym;
        c->char_used++;
    }
    return true;
}

static uint32_t pow2_at_least(uint64_t n)
{
    uint32_t p = 16;
    while (p < n && p < (1u << 31)) p *= 2;
    return p;
}

/* The character lengths of piece p, as encode splits text: lens[0..return). */
static uint32_t piece_chars(const uint8_t *p, uint32_t len, uint32_t *lens)
{
    uint32_t n = 0;
    for (uint32_t a = 0; a < len;) {
        uint32_t l = one_char_len(p[a]);
        if (l > len - a) l = len - a;
        lens[n++] = l;
        a += l;
    }
    return n;
}

static jm_status build_encoder_index(jm_tokenizer *t, jm_error *err)
{
    tk_core *c = t->priv;
    c->has_unused = false;
    c->n_user_lens = 0;
    c->user_max = 0;
    memset(c->user_first, 0, sizeof c->user_first);
    for (int i = 0; i < 128; i++) c->ascii_sym[i] = -1;
    free(c->char_key);
    free(c->char_sym);
    free(c->pairs);
    free(c->pair_bits);
    c->char_key = NULL;
    c->char_sym = NULL;
    c->pairs = NULL;

    uint32_t maxlen = 0;
    for (int i = 0; i < t->n; i++)
        if (t->piece_len[i] > maxlen) maxlen = t->piece_len[i];
    uint32_t *lens = malloc(((size_t)maxlen + 1) * sizeof *lens);
    c->char_mask = 1023;
    c->char_used = 0;
    c->char_key = calloc(c->char_mask + 1, sizeof *c->char_key);
    c->char_sym = calloc(c->char_mask + 1, sizeof *c->char_sym);
    c->pair_bits = calloc((size_t)1 << (PAIR_BITS - 6), sizeof(uint64_t));
    if (!lens || !c->char_key || !c->char_sym || !c->pair_bits) {
        free(lens);
        return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", t->source);
    }

    /* characters: single-character pieces (any type) first, then pseudo ids
     * for the characters inside mergeable pieces that are no piece */
    int32_t next_pseudo = t->n;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < t->n; i++) {
            const uint8_t *p = (const uint8_t *)t->piece[i];
            uint32_t len = t->piece_len[i], nl;
            if (pass == 0) {
                if (len > 4 || one_char_len(p[0]) < len) continue;
                nl = 1;
                lens[0] = len;
            } else {
                if (!is_mergeable(t->type[i])) continue;
                nl = piece_chars(p, len, lens);
            }
            for (uint32_t k = 0, o = 0; k < nl; o += lens[k], k++) {
                if (char_sym(c, p + o, lens[k]) >= 0) continue;
                int32_t sym = pass == 0 ? i : next_pseudo++;
                if (!char_insert(c, char_pack(p + o, lens[k]), sym)) {
                    free(lens);
                    return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", t->source);
                }
                if (lens[k] == 1 && p[o] < 0x80) c->ascii_sym[p[o]] = sym;
            }
        }
    }

    /* the pair table: sized for exactly its splits, as it is the hot lookup */
    uint64_t nsplits = 0;
    for (int i = 0; i < t->n; i++)
        if (is_mergeable(t->type[i])) nsplits += piece_chars((const uint8_t *)t->piece[i], t->piece_len[i], lens) - 1;
    uint32_t nslots_p = pow2_at_least(nsplits + nsplits / 2 + 1);
    c->pairs = malloc((size_t)nslots_p * sizeof *c->pairs);
    if (!c->pairs) {
        free(lens);
        return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", t->source);
    }
    c->pair_mask = nslots_p - 1;
    for (uint32_t h = 0; h < nslots_p; h++) c->pairs[h].key = UINT64_MAX;

    for (int i = 0; i < t->n; i++) {
        uint8_t ty = t->type[i];
        if (!is_mergeable(ty)) continue;
        const uint8_t *p = (const uint8_t *)t->piece[i];
        uint32_t len = t->piece_len[i];
        if (ty == TK_UNUSED) c->has_unused = true;
        if (ty == TK_USER_DEFINED) {
            c->user_first[p[0] >> 3] |= (uint8_t)(1u << (p[0] & 7));
            if (len > c->user_max) c->user_max = len;
            if (c->n_user_lens >= 0) {
                int k = 0;
                while (k < c->n_user_lens && c->user_lens[k] > len) k++;
                if (k == c->n_user_lens || c->user_lens[k] != len) {
                    if (c->n_user_lens == (int)(sizeof c->user_lens / sizeof c->user_lens[0])) {
                        c->n_user_lens = -1;
                    } else {
                        memmove(c->user_lens + k + 1, c->user_lens + k,
                                (size_t)(c->n_user_lens - k) * sizeof c->user_lens[0]);
                        c->user_lens[k] = len;
                        c->n_user_lens++;
                    }
                }
            }
        }
        uint32_t nl = piece_chars(p, len, lens);
        /* neighbours inside the piece, for the segment filter */
        for (uint32_t k = 0, o = 0; k + 1 < nl; o += lens[k], k++) {
            int32_t a = char_sym(c, p + o, lens[k]), b = char_sym(c, p + o + lens[k], lens[k + 1]);
            uint64_t bit = mix64(pair_of(a, b) * 0x9e3779b97f4a7c15ull) >> (64 - PAIR_BITS);
            c->pair_bits[bit >> 6] |= (uint64_t)1 << (bit & 63);
        }
        /* every split into two symbols: a merged symbol is a mergeable piece,
         * an unmerged one a single character */
        for (uint32_t k = 1, o = lens[0]; k < nl; o += lens[k], k++) {
            int32_t a = k == 1 ? char_sym(c, p, o) : tk_find(t, (const char *)p, o);
            int32_t b = k == nl - 1 ? char_sym(c, p + o, len - o) : tk_find(t, (const char *)p + o, len - o);
            if (a < 0 || b < 0 || (k > 1 && !is_mergeable(t->type[a])) ||
                (k < nl - 1 && !is_mergeable(t->type[b])))
                continue;
            uint64_t key = pair_of(a, b);
            uint32_t h = (uint32_t)mix64(key) & c->pair_mask;
            while (c->pairs[h].key != UINT64_MAX && c->pairs[h].key != key) h = (h + 1) & c->pair_mask;
            c->pairs[h] = (tk_pair){key, i, t->score[i]};
        }
    }
    free(lens);
    return JM_OK;
}

typedef struct {
    float score;  /* of the merged piece: larger merges first */
    int32_t left; /* symbol index: smaller merges first on equal scores */
    int32_t id;   /* the merged piece */
    uint32_t len; /* its length, which tells a stale entry */
} tk_cand;

typedef struct {
    int32_t id;
    uint32_t len;
} seg_symbol;

typedef struct {
    uint32_t hash, off, nbytes; /* the segment: nbytes at off in the normalised text; 0 = empty slot */
    uint32_t first, count;      /* its final symbols in the arena */
} seg_entry;

typedef struct {
    const jm_tokenizer *t;
    const tk_core *c;
    const uint8_t *text; /* normalised text */
    /* the current segment's symbols (character index) and its candidate
     * heap, carved from one block: a segment of k symbols pushes at most
     * 3(k - 1) candidates (k - 1 pairs, then two per merge) */
    void *block;
    size_t cap; /* symbols */
    uint32_t *start, *len;
    int32_t *prev, *next, *sym; /* sym: symbol id (piece, pseudo or -1) */
    uint8_t *frozen;
    tk_cand *heap;
    size_t nheap;
    int32_t *rev;          /* UNUSED piece id -> left length of its last candidate, -1 none */
    uint32_t *stack;       /* resegmentation: (offset, length) pairs */
    size_t stack_cap;
    int32_t *ids;          /* output; at most one id per normalised byte */
    size_t n_ids;
    seg_entry *cache;      /* segment cache (see encode_segment), NULL when off */
    uint32_t cache_slots, cache_used;
    seg_symbol *arena;     /* the cached segments' final symbols */
    size_t n_arena, arena_cap;
    bool prev_unk;
    bool oom;
} bpe_state;

static bool cand_before(const tk_cand *a, const tk_cand *b)
{
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(bpe_state *st, tk_cand c)
{
    tk_cand *h = st->heap;
    size_t i = st->nheap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_before(&c, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = c;
}

static tk_cand heap_pop(bpe_state *st)
{
    tk_cand *h = st->heap, top = h[0], last = h[--st->nheap];
    size_t n = st->nheap, i = 0;
    for (;;) {
        size_t l = 2 * i + 1;
        if (l >= n) break;
        size_t m = l + 1 < n && cand_before(&h[l + 1], &h[l]) ? l + 1 : l;
        if (!cand_before(&h[m], &last)) break;
        h[i] = h[m];
        i = m;
    }
    if (n) h[i] = last;
    return top;
}

/* MaybeAddNewSymbolPair: neighbours l and r become a candidate when their
 * concatenation is a mergeable piece (and, with an explicit merge list, a
 * listed merge). */
static void maybe_push(bpe_state *st, int32_t l, int32_t r)
{
    if (l < 0 || r < 0 || st->frozen[l] || st->frozen[r]) return;
    int32_t a = st->sym[l], b = st->sym[r];
    if (a < 0 || b < 0) return;
    const tk_pair *m = pair_find(st->c, a, b);
    if (!m) return;
    const jm_tokenizer *t = st->t;
    if (t->merges && !tk_merge_allowed(t, a, b)) return;
    heap_push(st, (tk_cand){m->score, l, m->id, st->len[l] + st->len[r]});
    /* the split SentencePiece resegments an UNUSED piece into: the last one seen */
    if (st->rev && t->type[m->id] == TK_UNUSED) st->rev[m->id] = (int32_t)st->len[l];
}

/* PopulateSentencePieceText for one final symbol: an unknown one becomes
 * byte pieces with byte_fallback, else runs of unknowns become one <unk>. */
static void emit_id(bpe_state *st, int id, const uint8_t *s, uint32_t len)
{
    const jm_tokenizer *t = st->t;
    bool unk = t->type[id] == TK_UNKNOWN;
    if (unk && t->byte_fallback) {
        for (uint32_t i = 0; i < len; i++) st->ids[st->n_ids++] = t->byte_id[s[i]];
    } else if (!(unk && st->prev_unk)) {
        st->ids[st->n_ids++] = id;
    }
    st->prev_unk = unk;
}

static int symbol_id(const jm_tokenizer *t, const uint8_t *s, uint32_t len)
{
    int id = tk_find(t, (const char *)s, len);
    return id >= 0 ? id : t->unk_id;
}

/* A final symbol when the model has UNUSED pieces: an UNUSED one is never
 * output but split back (recursively) into the pair it was merged from. */
static void emit_resegmented(bpe_state *st, const uint8_t *s, uint32_t len)
{
    const jm_tokenizer *t = st->t;
    int id = symbol_id(t, s, len);
    if (t->type[id] != TK_UNUSED || st->rev[id] < 0) {
        emit_id(st, id, s, len);
        return;
    }
    size_t need = 2 * ((size_t)len + 1);
    if (need > st->stack_cap) {
        uint32_t *p = realloc(st->stack, need * sizeof *p);
        if (!p) {
            st->oom = true;
            return;
        }
        st->stack = p;
        st->stack_cap = need;
    }
    /* stack of spans, disjoint and non-empty, so at most len of them */
    size_t sp = 0;
    st->stack[sp++] = 0;
    st->stack[sp++] = len;
    while (sp) {
        uint32_t l = st->stack[--sp], o = st->stack[--sp];
        id = symbol_id(t, s + o, l);
        int32_t cut = t->type[id] == TK_UNUSED ? st->rev[id] : -1;
        if (cut <= 0 || (uint32_t)cut >= l) {
            emit_id(st, id, s + o, l);
            continue;
        }
        st->stack[sp++] = o + (uint32_t)cut; /* right half, after the left */
        st->stack[sp++] = l - (uint32_t)cut;
        st->stack[sp++] = o;
        st->stack[sp++] = (uint32_t)cut;
    }
}

/* The merge loop over the k symbols of a segment; leaves the final symbols
 * as the list from symbol 0. */
static void merge_segment(bpe_state *st, int32_t k)
{
    for (int32_t i = 0; i < k; i++) {
        st->prev[i] = i - 1;
        st->next[i] = i + 1 < k ? i + 1 : -1;
    }
    st->nheap = 0;
    for (int32_t i = 1; i < k; i++) maybe_push(st, i - 1, i);
    while (st->nheap) {
        tk_cand top = heap_pop(st);
        int32_t l = top.left, r = st->next[l];
        /* stale: l was merged away, or l or its neighbour has grown since */
        if (st->len[l] == 0 || r < 0 || st->len[l] + st->len[r] != top.len) continue;
        st->len[l] += st->len[r];
        st->len[r] = 0;
        st->next[l] = st->next[r];
        if (st->next[r] >= 0) st->prev[st->next[r]] = l;
        st->sym[l] = top.id;
        maybe_push(st, st->prev[l], l);
        maybe_push(st, l, st->next[l]);
    }
}

static int final_id(const bpe_state *st, int32_t i)
{
    int32_t s = st->sym[i];
    return s >= 0 && s < st->t->n ? s : st->t->unk_id; /* pseudo: a character no piece is */
}

/* Encodes the k symbols of the segment at seg (nbytes long) and emits them. */
#define SEG_CACHE_MAX_BYTES 64

static void encode_segment(bpe_state *st, const uint8_t *seg, int32_t k, uint32_t nbytes)
{
    if (st->c->has_unused) { /* whole-text mode: resegmentation works on strings */
        merge_segment(st, k);
        for (int32_t i = 0; i >= 0; i = st->next[i]) emit_resegmented(st, seg + st->start[i], st->len[i]);
        return;
    }
    if (k == 1) {
        emit_id(st, final_id(st, 0), seg, st->len[0]);
        return;
    }
    seg_entry *e = NULL;
    uint32_t hash = 0;
    if (st->cache && nbytes <= SEG_CACHE_MAX_BYTES) {
        hash = hash_bytes(seg, nbytes);
        uint32_t mask = st->cache_slots - 1;
        for (uint32_t h = hash & mask;; h = (h + 1) & mask) {
            e = &st->cache[h];
            if (!e->nbytes) break;
            if (e->hash == hash && e->nbytes == nbytes &&
                same_bytes((const char *)st->text + e->off, (const char *)seg, nbytes)) {
                const seg_symbol *sym = st->arena + e->first;
                for (uint32_t i = 0, o = 0; i < e->count; o += sym[i].len, i++)
                    emit_id(st, sym[i].id, seg + o, sym[i].len);
                return;
            }
        }
        if (st->cache_used >= st->cache_slots / 2) e = NULL; /* full: stop adding */
    }
    merge_segment(st, k);
    size_t first = st->n_arena, count = 0;
    for (int32_t i = 0; i >= 0; i = st->next[i]) {
        int id = final_id(st, i);
        emit_id(st, id, seg + st->start[i], st->len[i]);
        if (!e) continue;
        if (st->n_arena == st->arena_cap) {
            size_t cap = st->arena_cap ? 2 * st->arena_cap : 1024;
            seg_symbol *a = realloc(st->arena, cap * sizeof *a);
            if (!a) {
                e = NULL; /* just leave this one out of the cache */
                continue;
            }
            st->arena = a;
            st->arena_cap = cap;
        }
        st->arena[st->n_arena++] = (seg_symbol){id, st->len[i]};
        count++;
    }
    if (e) {
        *e = (seg_entry){hash, (uint32_t)(seg - st->text), nbytes, (uint32_t)first, (uint32_t)count};
        st->cache_used++;
    } else {
        st->n_arena = first;
    }
}

/* Room for need symbols (keeping the first keep), in one block. */
static bool grow_symbols(bpe_state *st, size_t need, size_t keep)
{
    if (need <= st->cap) return true;
    size_t cap = st->cap ? st->cap : 64;
    while (cap < need) cap *= 2;
    /* per symbol: five 4-byte arrays, three heap entries, one flag byte */
    char *b = malloc(cap * (5 * sizeof(uint32_t) + 3 * sizeof(tk_cand) + 1));
    if (!b) return false;
    tk_cand *heap = (tk_cand *)b;
    uint32_t *start = (uint32_t *)(heap + 3 * cap), *len = start + cap;
    int32_t *prev = (int32_t *)(len + cap), *next = prev + cap, *sym = next + cap;
    uint8_t *frozen = (uint8_t *)(sym + cap);
    if (keep) {
        memcpy(start, st->start, keep * sizeof *start);
        memcpy(len, st->len, keep * sizeof *len);
        memcpy(sym, st->sym, keep * sizeof *sym);
        memcpy(frozen, st->frozen, keep);
    }
    free(st->block);
    st->block = b;
    st->heap = heap;
    st->start = start;
    st->len = len;
    st->prev = prev;
    st->next = next;
    st->sym = sym;
    st->frozen = frozen;
    st->cap = cap;
    return true;
}

static jm_status encode_text(const jm_tokenizer *t, const char *text, size_t len, int32_t **ids_out, size_t *n_out,
                             jm_error *err)
{
    const tk_core *c = t->priv;
    norm_spec ns;
    model_norm_spec(t, &ns);
    tk_buf norm = {0};
    bpe_state st = {.t = t, .c = c};
    jm_status s = JM_OK;
    if (!normalize(&ns, (const uint8_t *)text, len, &norm)) goto nomem;
    size_t n = norm.n;
    if (n > INT32_MAX) {
        free(norm.p);
        return jm_fail(err, JM_ERR_ARG, "encode: normalised text of %zu bytes is too long", n);
    }
    st.text = (const uint8_t *)norm.p;
    st.ids = malloc((n ? n : 1) * sizeof *st.ids);
    /* a short text in one allocation; a long one grows to its longest segment */
    if (!st.ids || !grow_symbols(&st, n < 4096 ? n + 1 : 4096, 0)) goto nomem;
    if (c->has_unused) {
        st.rev = malloc((size_t)t->n * sizeof *st.rev);
        if (!st.rev) goto nomem;
        for (int i = 0; i < t->n; i++) st.rev[i] = -1;
    }
    if (n >= 256 && !c->has_unused) { /* room for a distinct word per 16 bytes, at most 32k */
        st.cache_slots = 32;
        while (st.cache_slots < 65536 && st.cache_slots < n / 8) st.cache_slots *= 2;
        st.cache = calloc(st.cache_slots, sizeof *st.cache); /* NULL: no cache, still correct */
    }
    /* With UNUSED pieces the resegmentation depends on the global order of
     * candidates, so the whole text is one segment (as SentencePiece does it). */
    const bool whole = c->has_unused;
    const bool user = c->user_max != 0;
    const uint8_t *p = st.text;
    size_t pos = 0, seg = 0;
    int32_t k = 0;
    int32_t prev_sym = -1;
    bool prev_frozen = false;
    while (pos < n) {
        int32_t sym = -1;
        uint32_t L = user ? (uint32_t)user_match(t, p + pos, n - pos, &sym) : 0;
        bool fz = L != 0;
        if (!fz) {
            L = one_char_len(p[pos]);
            if (L > n - pos) L = (uint32_t)(n - pos);
            sym = char_sym(c, p + pos, L);
        }
        if (k > 0 && !whole) {
            if (fz || prev_frozen || sym < 0 || prev_sym < 0 || !pair_maybe_inside(c, prev_sym, sym)) {
                encode_segment(&st, p + seg, k, (uint32_t)(pos - seg));
                if (st.oom) goto nomem;
                k = 0;
                seg = pos;
            }
        }
        if (!grow_symbols(&st, (size_t)k + 1, (size_t)k)) goto nomem;
        st.start[k] = (uint32_t)(pos - seg);
        st.len[k] = L;
        st.sym[k] = sym;
        st.frozen[k] = fz;
        k++;
        prev_sym = sym;
        prev_frozen = fz;
        pos += L;
    }
    if (k) encode_segment(&st, p + seg, k, (uint32_t)(pos - seg));
    if (st.oom) goto nomem;
    int32_t *ids = realloc(st.ids, (st.n_ids ? st.n_ids : 1) * sizeof *ids);
    *ids_out = ids ? ids : st.ids;
    *n_out = st.n_ids;
    st.ids = NULL;
    goto done;
nomem:
    s = jm_fail(err, JM_ERR_NOMEM, "encode: out of memory (%zu bytes of input)", len);
done:
    free(norm.p);
    free(st.block);
    free(st.rev);
    free(st.stack);
    free(st.ids);
    free(st.cache);
    free(st.arena);
    return s;
}

/* ======================================================================
 * Decoding (SentencePieceProcessor::Decode)
 * ====================================================================== */

/* Byte pieces decode together: each well-formed character as itself, each
 * byte of a malformed sequence as U+FFFD. */
static bool flush_bytes(tk_buf *out, const uint8_t *b, size_t n)
{
    if (!buf_reserve(out, 3 * n)) return false;
    for (size_t i = 0; i < n;) {
        size_t L = utf8_len(b + i, n - i);
        if (L) {
            memcpy(out->p + out->n, b + i, L);
            out->n += L;
            i += L;
        } else {
            memcpy(out->p + out->n, REPLACEMENT_CHAR, 3);
            out->n += 3;
            i++;
        }
    }
    return true;
}

static jm_status decode_ids(const jm_tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len_out,
                            jm_error *err)
{
    tk_buf out = {0}, bytes = {0};
    const char *unk = t->unk_surface ? t->unk_surface : DEFAULT_UNK_SURFACE;
    size_t unk_len = t->unk_surface ? t->unk_surface_len : strlen(DEFAULT_UNK_SURFACE);
    /* The space the normaliser put in front is dropped: the U+2581 that starts
     * the first piece with visible text. With remove_extra_whitespaces every
     * leading U+2581-led piece loses it, as the normaliser never kept a
     * leading space anyway. */
    bool expect_bos_ws = true, bos_ws_seen = false;
    const bool strip = t->add_dummy_prefix || t->remove_extra_whitespaces;
    if (!buf_reserve(&out, 1)) goto nomem;
    for (size_t i = 0; i < n; i++) {
        int id = ids[i];
        uint8_t ty = t->type[id];
        if (ty == TK_BYTE) {
            uint8_t b = (uint8_t)byte_of_piece(t->piece[id], t->piece_len[id]);
            if (!buf_put(&bytes, &b, 1)) goto nomem;
            continue;
        }
        if (bytes.n) {
            if (!flush_bytes(&out, (const uint8_t *)bytes.p, bytes.n)) goto nomem;
            bytes.n = 0;
        }
        if (bos_ws_seen || out.n) expect_bos_ws = false;
        bos_ws_seen = false;
        if (ty == TK_CONTROL) continue;
        if (ty == TK_UNKNOWN) {
            if (!buf_put(&out, unk, unk_len)) goto nomem;
            continue;
        }
        const char *p = t->piece[id];
        size_t L = t->piece_len[id];
        if (expect_bos_ws && strip && L >= 3 && memcmp(p, SPACE_SYMBOL, 3) == 0) {
            p += 3;
            L -= 3;
            bos_ws_seen = !t->remove_extra_whitespaces;
        }
        if (!buf_reserve(&out, L)) goto nomem;
        for (size_t j = 0; j < L;) {
            if (j + 3 <= L && memcmp(p + j, SPACE_SYMBOL, 3) == 0) {
                out.p[out.n++] = ' ';
                j += 3;
            } else {
                out.p[out.n++] = p[j++];
            }
        }
    }
    if (bytes.n && !flush_bytes(&out, (const uint8_t *)bytes.p, bytes.n)) goto nomem;
    free(bytes.p);
    bytes.p = NULL;
    if (t->denorm_charsmap_len) {
        norm_spec dn;
        charsmap_spec(&dn, t->denorm_charsmap, t->denorm_charsmap_len);
        dn.add_dummy_prefix = t->denorm_add_dummy_prefix;
        dn.remove_extra_whitespaces = t->denorm_remove_extra_whitespaces;
        dn.escape_whitespaces = t->denorm_escape_whitespaces;
        dn.ws_suffix = false;
        dn.user = NULL;
        tk_buf d = {0};
        if (!normalize(&dn, (const uint8_t *)out.p, out.n, &d)) {
            free(d.p);
            goto nomem;
        }
        free(out.p);
        out = d;
    }
    if (!buf_reserve(&out, 1)) goto nomem;
    out.p[out.n] = 0;
    *text = out.p;
    if (len_out) *len_out = out.n;
    return JM_OK;
nomem:
    free(out.p);
    free(bytes.p);
    return jm_fail(err, JM_ERR_NOMEM, "decode: out of memory (%zu ids)", n);
}

/* ======================================================================
 * Messages
 * ====================================================================== */

/* A piece for an error message: quoted, control bytes escaped, shortened. */
static void quote(char *out, size_t cap, const char *s, size_t len)
{
    size_t o = 0, i = 0;
    out[o++] = '"';
    /* room for one escape (4), "..." (3), the closing quote and the NUL */
    for (; i < len && o + 9 <= cap; i++) {
        uint8_t ch = (uint8_t)s[i];
        if (ch < 0x20 || ch == 0x7f || ch == '"' || ch == '\\')
            o += (size_t)snprintf(out + o, cap - o, "\\x%02x", ch);
        else
            out[o++] = (char)ch;
    }
    if (i < len) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o++] = '"';
    out[o] = 0;
}
