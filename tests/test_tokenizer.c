/* test_tokenizer.c — the tokenizer core: the protobuf reader on crafted
 * bytes (mutations are tests/fuzz_tokenizer.c), BPE on a crafted model, exact ids and text against
 * SentencePiece 0.1.97 on Llama-2's tokenizer.model, and encode/decode of
 * random bytes.
 * Prints "PASS <name>" or "FAIL <name>: <why>" per check; exits 0 iff nothing
 * failed. Run from the repository root: the Llama-2 model is read from
 * ../shared/fixtures/llama2-tokenizer/tokenizer.model (or $JM_LLAMA_TOKENIZER);
 * without it those checks are skipped with a "# skip" line. */
#include "tokenizer/tokenizer.h"
#include "fuzz.h" /* rnd: deterministic inputs for the random checks */
#include "harness.h"

#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Strict UTF-8 (no overlongs, surrogates or values past U+10FFFF). */
static bool valid_utf8(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        size_t len = c < 0x80 ? 1 : c >= 0xc2 && c < 0xe0 ? 2 : c >= 0xe0 && c < 0xf0 ? 3 : c >= 0xf0 && c < 0xf5 ? 4 : 0;
        if (!len || i + len > n) return false;
        uint32_t cp = len == 1 ? c : c & (0xff >> (len + 1));
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return false;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += len;
    }
    return true;
}

/* ---- a protobuf writer for crafted models ---- */

typedef struct {
    uint8_t *p;
    size_t n, cap;
} bytes;

static void put(bytes *b, const void *s, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) exit(2);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

static void put_varint(bytes *b, uint64_t v)
{
    do {
        uint8_t c = (uint8_t)(v & 0x7f);
        v >>= 7;
        if (v) c |= 0x80;
        put(b, &c, 1);
    } while (v);
}

static void put_int(bytes *b, uint32_t field, int64_t v) /* wire type 0 */
{
    put_varint(b, (uint64_t)field << 3);
    put_varint(b, (uint64_t)v);
}

static void put_len(bytes *b, uint32_t field, const void *s, size_t n) /* wire type 2 */
{
    put_varint(b, (uint64_t)field << 3 | 2);
    put_varint(b, n);
    put(b, s, n);
}

static void put_float(bytes *b, uint32_t field, float f) /* wire type 5 */
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint8_t le[4] = {(uint8_t)u, (uint8_t)(u >> 8), (uint8_t)(u >> 16), (uint8_t)(u >> 24)};
    put_varint(b, (uint64_t)field << 3 | 5);
    put(b, le, 4);
}

static void put_piece(bytes *m, const char *s, size_t len, float score, int type)
{
    bytes p = {0};
    put_len(&p, 1, s, len);
    put_float(&p, 2, score);
    if (type != TK_NORMAL) put_int(&p, 3, type);
    put_len(m, 1, p.p, p.n);
    free(p.p);
}

/* The crafted model: a tiny BPE vocabulary (ties between "ab" and "bc"
 * included), identity normalisation, no byte fallback. */
static const struct {
    const char *s;
    float score;
    int type;
} crafted[] = {
    {"<unk>", 0, TK_UNKNOWN}, {"<s>", 0, TK_CONTROL}, {"</s>", 0, TK_CONTROL},
    {"\xe2\x96\x81", -10, TK_NORMAL}, {"a", -11, TK_NORMAL}, {"b", -12, TK_NORMAL}, {"c", -13, TK_NORMAL},
    {"\xe2\x96\x81" "a", -5, TK_NORMAL}, {"ab", -1, TK_NORMAL}, {"\xe2\x96\x81" "ab", -6, TK_NORMAL},
    {"bc", -1, TK_NORMAL}, {"<u>", 0, TK_USER_DEFINED},
};
enum { N_CRAFTED = sizeof crafted / sizeof crafted[0] };

typedef struct {
    int model_type;      /* 0: leave TrainerSpec.model_type out */
    bool no_trainer;
    const char *extra_piece; /* appended (with extra_len bytes) when set */
    size_t extra_len;
    int extra_type;
    float extra_score;
    int skip_piece;      /* index of crafted[] to leave out, -1 none */
    int bos_id;          /* -2: leave out */
    bool byte_fallback;
    const uint8_t *charsmap;
    size_t charsmap_len;
    bool unknown_fields; /* sprinkle fields the schema does not have */
} craft_opts;

static craft_opts defaults(void)
{
    return (craft_opts){.model_type = 2, .skip_piece = -1, .bos_id = -2};
}

static bytes craft(const craft_opts *o)
{
    bytes m = {0};
    if (o->unknown_fields) {
        put_int(&m, 99, 12345);
        put_len(&m, 100, "junk", 4);
        uint8_t f64[8] = {1, 2, 3, 4, 5, 6, 7, 8};
        put_varint(&m, 101 << 3 | 1); /* a fixed64 field */
        put(&m, f64, 8);
        put_float(&m, 102, 1.5f);
    }
    for (int i = 0; i < N_CRAFTED; i++) {
        if (i == o->skip_piece) continue;
        if (o->unknown_fields && i == 4) { /* a piece with extra and mistyped fields */
            bytes p = {0};
            put_len(&p, 1, crafted[i].s, strlen(crafted[i].s));
            put_int(&p, 7, 1);
            put_float(&p, 2, crafted[i].score);
            put_len(&p, 3, "x", 1); /* type with the wrong wire type: skipped, stays NORMAL */
            put_len(&m, 1, p.p, p.n);
            free(p.p);
            continue;
        }
        put_piece(&m, crafted[i].s, strlen(crafted[i].s), crafted[i].score, crafted[i].type);
    }
    if (o->extra_piece) put_piece(&m, o->extra_piece, o->extra_len, o->extra_score, o->extra_type);
    if (!o->no_trainer) {
        bytes tr = {0};
        if (o->model_type) put_int(&tr, 3, o->model_type);
        if (o->byte_fallback) put_int(&tr, 35, 1);
        if (o->bos_id != -2) put_int(&tr, 41, o->bos_id);
        put_int(&tr, 43, -1); /* pad_id = -1: a negative int32 is a 10-byte varint */
        if (o->unknown_fields) put_int(&tr, 150, 3);
        put_len(&m, 2, tr.p, tr.n);
        free(tr.p);
    }
    bytes ns = {0};
    put_len(&ns, 1, "identity", 8);
    if (o->charsmap) put_len(&ns, 2, o->charsmap, o->charsmap_len);
    put_int(&ns, 4, 0); /* remove_extra_whitespaces = false */
    put_len(&m, 3, ns.p, ns.n);
    free(ns.p);
    return m;
}

static jm_status load_bytes(const bytes *b, jm_tokenizer **t, jm_error *err)
{
    err->msg[0] = 0;
    return tk_load_model_proto(b->p, b->n, "crafted.model", t, err);
}

/* Loading must fail with a one-line message naming the file and containing want. */
static void expect_error(const char *name, const bytes *b, const char *want)
{
    jm_tokenizer *t = NULL;
    jm_error err;
    jm_status s = load_bytes(b, &t, &err);
    if (s == JM_OK) {
        jm_tokenizer_free(t);
        check(false, name, "loaded; wanted an error containing '%s'", want);
        return;
    }
    check(t == NULL && strstr(err.msg, want) && strstr(err.msg, "crafted.model") && !strchr(err.msg, '\n'), name,
          "status %s, message '%s' (wanted '%s')", jm_status_name(s), err.msg, want);
}

static bool ids_equal(const int32_t *a, size_t na, const int32_t *b, size_t nb)
{
    return na == nb && (na == 0 || memcmp(a, b, na * sizeof *a) == 0);
}

static void ids_str(char *out, size_t cap, const int32_t *ids, size_t n)
{
    size_t o = 0;
    out[0] = 0;
    for (size_t i = 0; i < n && o + 16 < cap; i++) o += (size_t)snprintf(out + o, cap - o, "%s%d", i ? " " : "", ids[i]);
}

static void expect_ids(const jm_tokenizer *t, const char *name, const char *text, size_t len, const int32_t *want,
                       size_t n_want)
{
    int32_t *ids;
    size_t n;
    jm_error err;
    if (jm_tokenizer_encode(t, text, len, &ids, &n, &err)) {
        check(false, name, "encode failed: %s", err.msg);
        return;
    }
    char got[1024], exp[1024];
    ids_str(got, sizeof got, ids, n);
    ids_str(exp, sizeof exp, want, n_want);
    check(ids_equal(ids, n, want, n_want), name, "got [%s], want [%s]", got, exp);
    free(ids);
}

static void expect_text(const jm_tokenizer *t, const char *name, const int32_t *ids, size_t n, const char *want,
                        size_t want_len)
{
    char *text;
    size_t len;
    jm_error err;
    if (jm_tokenizer_decode(t, ids, n, &text, &len, &err)) {
        check(false, name, "decode failed: %s", err.msg);
        return;
    }
    check(len == want_len && memcmp(text, want, len) == 0 && text[len] == 0, name, "got '%s' (%zu bytes), want '%s'",
          text, len, want);
    free(text);
}

#define IDS(...) (const int32_t[]){__VA_ARGS__}, sizeof((const int32_t[]){__VA_ARGS__}) / sizeof(int32_t)

/* ---- the protobuf reader on crafted bytes ---- */

static void test_crafted(void)
{
    craft_opts o = defaults();
    bytes b = craft(&o);
    jm_tokenizer *t = NULL;
    jm_error err;
    if (!check(load_bytes(&b, &t, &err) == JM_OK, "crafted_loads", "%s", err.msg)) {
        free(b.p);
        return;
    }
    check(jm_tokenizer_vocab_size(t) == N_CRAFTED && t->unk_id == 0 && t->bos_id == 1 && t->eos_id == 2 &&
              t->pad_id == -1 && !t->remove_extra_whitespaces && t->add_dummy_prefix && t->escape_whitespaces &&
              !strcmp(t->normalizer_name, "identity"),
          "crafted_fields", "n=%d unk=%d bos=%d eos=%d pad=%d", t->n, t->unk_id, t->bos_id, t->eos_id, t->pad_id);
    check(tk_find(t, "bc", 2) == 10 && tk_find(t, "zz", 2) == -1 && !strcmp(jm_tokenizer_piece(t, 8), "ab") &&
              jm_tokenizer_piece(t, N_CRAFTED) == NULL && jm_tokenizer_piece(t, -1) == NULL,
          "crafted_find", "lookups wrong");
    /* ids and text checked against spm_encode/spm_decode 0.1.97 on this same model */
    expect_ids(t, "crafted_merge_order", "ab", 2, IDS(9));           /* "ab" (-1) first, then "▁ab" */
    expect_ids(t, "crafted_tie_leftmost", "abc", 3, IDS(9, 6));      /* "ab" and "bc" tie: "ab" is left */
    expect_ids(t, "crafted_no_merge", "ba", 2, IDS(3, 5, 4));
    expect_ids(t, "crafted_unk_run", "xyz a", 5, IDS(3, 0, 7));      /* one <unk> for "xyz", then "▁a" */
    expect_ids(t, "crafted_user_defined", "a<u>b", 5, IDS(7, 11, 5)); /* "<u>" whole, never merged */
    expect_ids(t, "crafted_control_text", "<s>", 3, IDS(3, 0)); /* never the control piece: "▁" and one <unk> */
    expect_ids(t, "crafted_empty", "", 0, NULL, 0);
    expect_text(t, "crafted_decode", IDS(1, 9, 6, 0, 3, 7, 2), "abc \xe2\x81\x87   a", 11);
    jm_tokenizer_free(t);
    free(b.p);

    o = defaults();
    o.unknown_fields = true;
    b = craft(&o);
    jm_status s = load_bytes(&b, &t, &err);
    check(s == JM_OK && t->type[4] == TK_NORMAL, "crafted_unknown_fields_skipped", "%s", err.msg);
    if (!s) jm_tokenizer_free(t);
    free(b.p);

    o = defaults();
    o.extra_piece = "zz";
    o.extra_len = 2;
    o.extra_type = 9; /* an enum value the schema does not have: NORMAL, as protobuf reads it */
    b = craft(&o);
    s = load_bytes(&b, &t, &err);
    check(s == JM_OK && t->type[N_CRAFTED] == TK_NORMAL, "crafted_unknown_enum_is_normal", "%s", err.msg);
    if (!s) jm_tokenizer_free(t);
    free(b.p);

    /* malformed wire format, appended to a valid model */
    struct {
        const char *name, *want;
        uint8_t tail[16];
        size_t n;
    } tails[] = {
        {"pb_truncated_varint", "truncated varint", {0x0a, 0x80}, 2},
        {"pb_truncated_tag", "truncated varint", {0x80}, 1},
        {"pb_length_past_end", "runs past the end", {0x0a, 0x10, 'x'}, 3},
        {"pb_huge_length", "runs past the end", {0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}, 10},
        {"pb_fixed32_past_end", "runs past the end", {0x15, 1, 2}, 3},
        {"pb_wire_type_3", "wire type 3", {0x0b}, 1},
        {"pb_wire_type_4", "wire type 4", {0x0c}, 1},
        {"pb_wire_type_6", "wire type 6", {0x0e}, 1},
        {"pb_wire_type_7", "wire type 7", {0x0f}, 1},
        {"pb_field_zero", "invalid field number 0", {0x02, 0x00}, 2},
        {"pb_varint_11_bytes", "longer than 10 bytes",
         {0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01}, 12},
    };
    for (size_t i = 0; i < sizeof tails / sizeof tails[0]; i++) {
        o = defaults();
        b = craft(&o);
        put(&b, tails[i].tail, tails[i].n);
        expect_error(tails[i].name, &b, tails[i].want);
        free(b.p);
    }

    /* inside a nested message: a piece whose length runs past its own end */
    b = (bytes){0};
    uint8_t bad_piece[] = {0x0a, 0x04, 0x0a, 0x05, 'a', 'b'};
    put(&b, bad_piece, sizeof bad_piece);
    bytes tr = {0};
    put_int(&tr, 3, 2);
    put_len(&b, 2, tr.p, tr.n);
    free(tr.p);
    expect_error("pb_nested_past_end", &b, "pieces[0]");
    free(b.p);

    /* well-formed protobuf, but not a usable model */
    struct {
        const char *name, *want;
        craft_opts o;
    } bad[] = {
        {"model_piece_with_nul", "contains a NUL byte", {.model_type = 2, .skip_piece = -1, .bos_id = -2,
                                                         .extra_piece = "a\0b", .extra_len = 3, .extra_type = 1}},
        {"model_empty_piece", "is empty", {.model_type = 2, .skip_piece = -1, .bos_id = -2, .extra_piece = "",
                                           .extra_len = 0, .extra_type = 1}},
        {"model_duplicate_piece", "duplicate piece \"ab\"", {.model_type = 2, .skip_piece = -1, .bos_id = -2,
                                                              .extra_piece = "ab", .extra_len = 2, .extra_type = 1}},
        {"model_duplicate_across_types", "duplicate piece \"<s>\"",
         {.model_type = 2, .skip_piece = -1, .bos_id = -2, .extra_piece = "<s>", .extra_len = 3, .extra_type = 1}},
        {"model_no_unk", "no piece of type UNKNOWN", {.model_type = 2, .skip_piece = 0, .bos_id = -2}},
        {"model_two_unk", "two unknown pieces", {.model_type = 2, .skip_piece = -1, .bos_id = -2,
                                                 .extra_piece = "<unk2>", .extra_len = 6, .extra_type = TK_UNKNOWN}},
        {"model_unigram", "only BPE models are supported", {.model_type = 1, .skip_piece = -1, .bos_id = -2}},
        {"model_char", "model_type is CHAR", {.model_type = 4, .skip_piece = -1, .bos_id = -2}},
        {"model_type_absent_is_unigram", "model_type is UNIGRAM", {.model_type = 0, .skip_piece = -1, .bos_id = -2}},
        {"model_no_trainer_spec", "only BPE", {.no_trainer = true, .skip_piece = -1, .bos_id = -2}},
        {"model_byte_piece_without_fallback", "byte_fallback is off",
         {.model_type = 2, .skip_piece = -1, .bos_id = -2, .extra_piece = "<0x41>", .extra_len = 6,
          .extra_type = TK_BYTE}},
        {"model_bad_byte_piece", "not of the form <0xNN>",
         {.model_type = 2, .skip_piece = -1, .bos_id = -2, .extra_piece = "<0x4a>", .extra_len = 6,
          .extra_type = TK_BYTE, .byte_fallback = true}},
        {"model_missing_byte_pieces", "only 0 of the 256 byte pieces",
         {.model_type = 2, .skip_piece = -1, .bos_id = -2, .byte_fallback = true}},
        {"model_bos_out_of_range", "bos_id 99 is outside", {.model_type = 2, .skip_piece = -1, .bos_id = 99}},
        {"model_bos_negative", "bos_id -5 is outside", {.model_type = 2, .skip_piece = -1, .bos_id = -5}},
        {"model_nan_score", "NaN score", {.model_type = 2, .skip_piece = -1, .bos_id = -2, .extra_piece = "zz",
                                          .extra_len = 2, .extra_type = 1, .extra_score = __builtin_nanf("")}},
        {"model_charsmap_short", "precompiled_charsmap is broken",
         {.model_type = 2, .skip_piece = -1, .bos_id = -2, .charsmap = (const uint8_t *)"\x01\x00\x00", .charsmap_len = 3}},
        {"model_charsmap_trie_too_big", "does not fit",
         {.model_type = 2, .skip_piece = -1, .bos_id = -2, .charsmap = (const uint8_t *)"\x40\x00\x00\x00xxxx",
          .charsmap_len = 8}},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        b = craft(&bad[i].o);
        expect_error(bad[i].name, &b, bad[i].want);
        free(b.p);
    }
    /* a TrainerSpec and no pieces: not a model at all, whatever model_type defaults to */
    b = (bytes){0};
    bytes spec = {0};
    put_int(&spec, 43, -1);
    put_len(&b, 2, spec.p, spec.n);
    free(spec.p);
    expect_error("model_no_pieces_is_not_a_model", &b, "not a SentencePiece model (no pieces)");
    free(b.p);
    b = (bytes){0};
    expect_error("model_empty_file", &b, "the file is empty (not a SentencePiece model)");
    put(&b, "{\"x\": 1}", 8);
    expect_error("model_json_is_not_protobuf", &b, "ModelProto");
    free(b.p);
}

/* ---- Llama-2: exact values, random bytes, mutations ---- */

/* Expected ids come from Debian's spm_encode 0.1.97:
 *   printf '%s\n' TEXT | spm_encode --model=tokenizer.model --output_format=id */
static void test_llama_exact(const jm_tokenizer *t)
{
    check(t->n == 32000 && t->unk_id == 0 && t->bos_id == 1 && t->eos_id == 2 && t->pad_id == -1 &&
              t->byte_fallback && t->byte_id[0] == 3 && t->byte_id[255] == 258 && !t->remove_extra_whitespaces,
          "llama_fields", "n=%d unk=%d bos=%d eos=%d", t->n, t->unk_id, t->bos_id, t->eos_id);
    expect_ids(t, "llama_hello_world", "Hello world", 11, IDS(15043, 3186));
    expect_ids(t, "llama_leading_spaces", "  leading spaces", 16, IDS(259, 8236, 8162));
    expect_ids(t, "llama_tab_vtab", "tabs\tand\vnewline-free", 21, IDS(18859, 12, 392, 14, 1482, 1220, 29899, 9021));
    expect_ids(t, "llama_cjk", "日本語のテキスト、中文", 33,
               IDS(29871, 30325, 30346, 30968, 30199, 30572, 30454, 30255, 30279, 30330, 30275, 30333));
    expect_ids(t, "llama_emoji_bytes", "😀👍🏽", 12,
               IDS(29871, 243, 162, 155, 131, 243, 162, 148, 144, 243, 162, 146, 192));
    expect_ids(t, "llama_invalid_byte", "\xff", 1, IDS(29871, 30140)); /* U+FFFD */
    expect_ids(t, "llama_digits", "0123 4567.89", 12,
               IDS(29871, 29900, 29896, 29906, 29941, 29871, 29946, 29945, 29953, 29955, 29889, 29947, 29929));
    expect_ids(t, "llama_combining", "cafe\xcc\x81 na\xc3\xafve", 13, IDS(5777, 1725, 30103, 1055, 30085, 345));
    expect_ids(t, "llama_literal_u2581", "x\xe2\x96\x81 \xef\xbf\xbd", 8, IDS(921, 259, 30140));
    expect_ids(t, "llama_sentence", "The quick brown fox jumps over the lazy dog.", 44,
               IDS(450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889));
    expect_ids(t, "llama_nul_byte", "a\0b", 3, IDS(263, 3, 29890));
    expect_ids(t, "llama_empty", "", 0, NULL, 0);

    /* expected text from spm_decode --input_format=id (0.1.97) */
    expect_text(t, "llama_decode_controls", IDS(1, 15043, 3186, 2), "Hello world", 11);
    expect_text(t, "llama_decode_unk", IDS(0, 0, 29871, 15043), " \xe2\x81\x87  \xe2\x81\x87   Hello", 17);
    expect_text(t, "llama_decode_bytes", IDS(229, 153, 132, 15043), "\xe2\x96\x81 Hello", 9);
    expect_text(t, "llama_decode_bad_bytes", IDS(229, 153, 15043), "\xef\xbf\xbd\xef\xbf\xbd Hello", 12);
    expect_text(t, "llama_decode_one_leading_space", IDS(29871, 15043), " Hello", 6);
    expect_text(t, "llama_decode_empty", NULL, 0, "", 0);

    char *text = NULL;
    size_t len;
    jm_error err;
    jm_status s = jm_tokenizer_decode(t, IDS(15043, 32000), &text, &len, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "32000") && !text, "llama_decode_id_out_of_range", "status %d: %s", s,
          err.msg);
    s = jm_tokenizer_decode(t, IDS(-1), &text, &len, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "-1"), "llama_decode_negative_id", "status %d: %s", s, err.msg);
}

static size_t put_utf8(uint8_t *o, uint32_t cp)
{
    if (cp < 0x80) return o[0] = (uint8_t)cp, 1;
    if (cp < 0x800) return o[0] = (uint8_t)(0xc0 | cp >> 6), o[1] = (uint8_t)(0x80 | (cp & 0x3f)), 2;
    if (cp < 0x10000) {
        o[0] = (uint8_t)(0xe0 | cp >> 12), o[1] = (uint8_t)(0x80 | (cp >> 6 & 0x3f)), o[2] = (uint8_t)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (uint8_t)(0xf0 | cp >> 18), o[1] = (uint8_t)(0x80 | (cp >> 12 & 0x3f));
    o[2] = (uint8_t)(0x80 | (cp >> 6 & 0x3f)), o[3] = (uint8_t)(0x80 | (cp & 0x3f));
    return 4;
}

/* A random byte string biased towards what breaks tokenizers; with
 * valid_only, well-formed UTF-8 (any code point but surrogates). */
static size_t random_text(uint64_t *seed, uint8_t *out, size_t cap, bool valid_only)
{
    static const char *const bits[] = {" ", "  ", "\t", "\xe2\x96\x81", "\xef\xbf\xbd", "\xff", "\xc0\x80", "\xed\xa0\x80",
                                       "\xf4\x90\x80\x80", "\xe2\x96", "\x00", "\x80", "日本", "😀", "e\xcc\x81", "<s>",
                                       "<0x41>", "the", "Hello", "1234"};
    size_t n = 0, target = rnd(seed) % cap;
    while (n < target) {
        uint64_t k = rnd(seed) % 10;
        if (valid_only && k >= 7) {
            if (n + 4 > cap) break;
            uint32_t cp = (uint32_t)(rnd(seed) % 3 ? rnd(seed) % 0x3000 : rnd(seed) % 0x110000);
            if (cp >= 0xd800 && cp < 0xe000) cp = 0xfffd;
            n += put_utf8(out + n, cp);
        } else if (k < 4) {
            const char *s = bits[rnd(seed) % (sizeof bits / sizeof bits[0])];
            if (valid_only && !valid_utf8((const uint8_t *)s, s[0] ? strlen(s) : 1)) continue;
            size_t l = s[0] ? strlen(s) : 1;
            if (n + l > cap) break;
            memcpy(out + n, s, l);
            n += l;
        } else if (k < 7) {
            out[n++] = (uint8_t)(0x20 + rnd(seed) % 95);
        } else if (k < 8) {
            size_t run = 1 + rnd(seed) % 64;
            uint8_t c = (uint8_t)rnd(seed);
            while (run-- && n < cap) out[n++] = c;
        } else {
            out[n++] = (uint8_t)rnd(seed);
        }
    }
    return n;
}

/* The charsmap's double-array trie is followed, not validated, at load: any
 * bytes (with a size header that fits) must normalise without a stray read. */
static void test_random_charsmaps(void)
{
    uint64_t seed = 99;
    uint8_t blob[2048], text[256];
    int failures = 0, encoded = 0;
    for (int it = 0; it < 300; it++) {
        /* the root (unit 0) has offset 0, so byte c goes to unit c: units that
         * carry their own index as label match, and any unit can serve as a
         * leaf's value (an offset into the pool, or past it) */
        uint32_t units = 1 + (uint32_t)(rnd(&seed) % 400), pool = 1 + (uint32_t)(rnd(&seed) % 64);
        uint32_t trie = 4 * units;
        blob[0] = (uint8_t)trie, blob[1] = (uint8_t)(trie >> 8), blob[2] = blob[3] = 0;
        for (uint32_t i = 0; i < units; i++) {
            uint32_t u, k = (uint32_t)(rnd(&seed) % 4);
            if (i == 0) u = 0;
            else if (k == 0) u = (i & 0xff) | (uint32_t)(rnd(&seed) % 2) << 8 | (uint32_t)(rnd(&seed) % 8) << 10;
            else if (k == 1) u = 0x80000000u | (uint32_t)(rnd(&seed) % (pool + 2));
            else if (k == 2) u = (uint32_t)(rnd(&seed) % (pool + 2));
            else u = (uint32_t)rnd(&seed);
            memcpy(blob + 4 + 4 * i, &u, 4);
        }
        for (uint32_t i = 0; i < pool; i++) blob[4 + trie + i] = (uint8_t)(rnd(&seed) % 4 ? 0x20 + rnd(&seed) % 95 : 0);
        craft_opts o = defaults();
        o.charsmap = blob;
        o.charsmap_len = 4 + trie + pool;
        bytes b = craft(&o);
        jm_tokenizer *t;
        jm_error err;
        if (load_bytes(&b, &t, &err)) {
            failures++;
            free(b.p);
            continue;
        }
        for (int k = 0; k < 5; k++) {
            size_t n = random_text(&seed, text, sizeof text, false);
            int32_t *ids;
            size_t m;
            char *out;
            size_t len;
            if (jm_tokenizer_encode(t, (const char *)text, n, &ids, &m, &err) == JM_OK) {
                if (jm_tokenizer_decode(t, ids, m, &out, &len, &err) == JM_OK) {
                    free(out);
                    encoded++;
                }
                free(ids);
            }
        }
        jm_tokenizer_free(t);
        free(b.p);
    }
    check(!failures && encoded == 1500, "random_charsmaps", "%d models failed to load, %d of 1500 texts encoded",
          failures, encoded);
}

static void test_llama_random(const jm_tokenizer *t)
{
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    uint8_t buf[512];
    int bad_range = 0, bad_utf8 = 0, bad_trip = 0, fails = 0, trips = 0;
    char first[256] = "";
    for (int it = 0; it < 4000; it++) {
        size_t n = random_text(&seed, buf, sizeof buf, it % 2);
        int32_t *ids;
        size_t m;
        jm_error err;
        if (jm_tokenizer_encode(t, (const char *)buf, n, &ids, &m, &err)) {
            fails++;
            continue;
        }
        for (size_t i = 0; i < m; i++)
            if (ids[i] < 0 || ids[i] >= t->n) bad_range++;
        char *text;
        size_t len;
        if (jm_tokenizer_decode(t, ids, m, &text, &len, &err)) {
            fails++;
            free(ids);
            continue;
        }
        if (!valid_utf8((const uint8_t *)text, len)) bad_utf8++;
        /* Llama keeps every byte (byte fallback, no whitespace removal,
         * identity normalisation): valid UTF-8 comes back unchanged, except
         * that a literal U+2581 comes back as a space */
        if (valid_utf8(buf, n) && !memmem(buf, n, "\xe2\x96\x81", 3)) {
            trips++;
            if (len != n || memcmp(text, buf, n) != 0) {
                if (!bad_trip++) snprintf(first, sizeof first, "%zu bytes in, %zu out", n, len);
            }
        }
        free(text);
        free(ids);
    }
    check(!fails && !bad_range && !bad_utf8, "llama_random_bytes",
          "%d calls failed, %d ids out of range, %d decodes not UTF-8", fails, bad_range, bad_utf8);
    check(!bad_trip && trips > 100, "llama_random_round_trip", "%d of %d valid inputs changed (first: %s)", bad_trip,
          trips, first);
}

static void test_llama_large(const jm_tokenizer *t)
{
    /* 4 MB: prose with long runs of one byte, spaces and CJK in between */
    size_t cap = 4u << 20, n = 0;
    char *buf = malloc(cap);
    const char *prose = "It was the best of times, it was the worst of times, it was the age of wisdom. ";
    uint64_t seed = 42;
    while (n < cap) {
        const char *s = prose;
        size_t l = strlen(prose);
        uint64_t k = rnd(&seed) % 8;
        if (k == 0) s = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", l = 80;
        if (k == 1) s = "                                                                                ", l = 80;
        if (k == 2) s = "中文的文本没有空格所以一段很长", l = 42;
        if (n + l > cap) break; /* whole characters only */
        memcpy(buf + n, s, l);
        n += l;
    }
    int32_t *ids;
    size_t m;
    jm_error err;
    double t0 = now();
    jm_status s = jm_tokenizer_encode(t, buf, n, &ids, &m, &err);
    double dt = now() - t0;
    if (!check(s == JM_OK, "llama_encode_4mb", "%s", err.msg)) {
        free(buf);
        return;
    }
    char *text;
    size_t len;
    s = jm_tokenizer_decode(t, ids, m, &text, &len, &err);
    bool ok = s == JM_OK && len == n && memcmp(text, buf, n) == 0;
    if (ok)
        printf("PASS llama_encode_4mb_round_trip (%zu ids, %.1f MB/s encode)\n", m, (double)n / dt / 1e6);
    else
        check(false, "llama_encode_4mb_round_trip", "%s", s ? err.msg : "text differs");
    if (s == JM_OK) free(text);
    free(ids);

    /* one 1 MB run of a single character: a single segment, no spaces */
    memset(buf, 'a', 1u << 20);
    s = jm_tokenizer_encode(t, buf, 1u << 20, &ids, &m, &err);
    check(s == JM_OK && m > 0 && m < (1u << 20), "llama_encode_1mb_run", "%s", s ? err.msg : "bad id count");
    if (s == JM_OK) free(ids);
    free(buf);
}

static void test_llama_dir(const char *model_path)
{
    char dir[] = "/tmp/jm_tk_XXXXXX", link[4200], abs[4096];
    if (!mkdtemp(dir) || !realpath(model_path, abs)) {
        check(false, "llama_load_dir", "cannot make a temporary directory");
        return;
    }
    snprintf(link, sizeof link, "%s/tokenizer.model", dir);
    jm_tokenizer *t = NULL;
    jm_error err;
    jm_status s = jm_tokenizer_load(dir, &t, &err);
    check(s == JM_ERR_IO && strstr(err.msg, "neither tokenizer.model nor tokenizer.json"), "load_empty_dir", "%s",
          err.msg);
    if (symlink(abs, link) != 0) {
        check(false, "llama_load_dir", "cannot symlink %s", abs);
    } else {
        s = jm_tokenizer_load(dir, &t, &err);
        if (check(s == JM_OK, "llama_load_dir", "%s", err.msg)) {
            check(t->bos_token && !strcmp(t->bos_token, "<s>") && t->eos_token && !strcmp(t->eos_token, "</s>") &&
                      jm_tokenizer_bos_id(t) == 1 && jm_tokenizer_eos_id(t) == 2 && jm_tokenizer_unk_id(t) == 0,
                  "llama_special_tokens", "bos '%s' eos '%s'", t->bos_token ? t->bos_token : "(null)",
                  t->eos_token ? t->eos_token : "(null)");
            jm_tokenizer_free(t);
        }
        unlink(link);
    }
    rmdir(dir);
    s = jm_tokenizer_load("/nonexistent/tokenizer.model", &t, &err);
    check(s == JM_ERR_IO && strstr(err.msg, "/nonexistent/tokenizer.model"), "load_missing_file", "%s", err.msg);
}

int main(void)
{
    test_crafted();
    test_random_charsmaps();

    const char *path = getenv("JM_LLAMA_TOKENIZER");
    if (!path) path = "../shared/fixtures/llama2-tokenizer/tokenizer.model";
    jm_error err;
    if (access(path, R_OK) != 0) {
        printf("# skip llama2: %s not found\n", path);
    } else {
        jm_tokenizer *t;
        if (check(jm_tokenizer_load(path, &t, &err) == JM_OK, "llama_load", "%s", err.msg)) {
            test_llama_exact(t);
            test_llama_random(t);
            test_llama_large(t);
            jm_tokenizer_free(t);
        }
        test_llama_dir(path);
    }
    return exit_status();
}
