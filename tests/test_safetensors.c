/* test_safetensors.c — round trip, malformed files, sharded sets, atomic writes.
 * Prints "PASS <name>" or "FAIL <name>: <why>" per check; exits 0 iff nothing failed. */
#include "base/safetensors.h"
#include "harness.h"

#include <math.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* A safetensors image: u64 length of json, json, then data_len bytes of a counting pattern. */
typedef struct {
    uint8_t *p;
    size_t len;
} image;

static image make_image(const char *json, size_t json_len, size_t data_len)
{
    image im = {malloc(8 + json_len + data_len + 1), 8 + json_len + data_len};
    for (int i = 0; i < 8; i++) im.p[i] = (uint8_t)((uint64_t)json_len >> (8 * i));
    memcpy(im.p + 8, json, json_len);
    for (size_t i = 0; i < data_len; i++) im.p[8 + json_len + i] = (uint8_t)i;
    return im;
}

static void set_len_prefix(image *im, uint64_t n)
{
    for (int i = 0; i < 8; i++) im->p[i] = (uint8_t)(n >> (8 * i));
}

/* ---- malformed files ---- */

/* Writes the bytes to dir/<name>.safetensors and expects st_open to refuse them with a
 * one-line message that starts with the path and contains want. */
static void expect_bad(const char *dir, const char *name, const uint8_t *p, size_t n,
                       jm_status want_status, const char *want)
{
    char path[512], test[160];
    snprintf(path, sizeof path, "%s/%s.safetensors", dir, name);
    snprintf(test, sizeof test, "bad_%s", name);
    write_bytes(path, p, n);
    st_file f;
    jm_error err = {{0}};
    jm_status s = st_open(path, &f, &err);
    if (s == JM_OK) {
        check(false, test, "st_open accepted it (%d tensors)", f.n);
        st_close(&f);
    } else if (s != want_status) {
        check(false, test, "status %s, want %s (%s)", jm_status_name(s), jm_status_name(want_status),
              err.msg);
    } else if (!strstr(err.msg, want)) {
        check(false, test, "message lacks \"%s\": %s", want, err.msg);
    } else if (strncmp(err.msg, path, strlen(path)) != 0) {
        check(false, test, "message does not start with the file name: %s", err.msg);
    } else {
        check(f.n == 0 && f.t == NULL && f.map == NULL, test, "st_file not cleared after failure");
        st_close(&f); /* harmless on a cleared st_file */
    }
}

static void expect_bad_json(const char *dir, const char *name, const char *json, size_t data_len,
                            const char *want)
{
    image im = make_image(json, strlen(json), data_len);
    expect_bad(dir, name, im.p, im.len, JM_ERR_FORMAT, want);
    free(im.p);
}

static void test_malformed(const char *dir)
{
    static const uint8_t five[5] = {1, 2, 3, 4, 5};
    expect_bad(dir, "empty_file", five, 0, JM_ERR_FORMAT, "shorter than 8 bytes");
    expect_bad(dir, "short_file", five, 5, JM_ERR_FORMAT, "shorter than 8 bytes");

    const char *ok1 = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}";
    image im = make_image(ok1, strlen(ok1), 24);
    set_len_prefix(&im, 0);
    expect_bad(dir, "header_len_zero", im.p, im.len, JM_ERR_FORMAT, "too small");
    set_len_prefix(&im, 1000);
    expect_bad(dir, "header_len_past_eof", im.p, im.len, JM_ERR_FORMAT, "past end of file");
    set_len_prefix(&im, (uint64_t)1 << 63);
    expect_bad(dir, "header_len_2pow63", im.p, im.len, JM_ERR_FORMAT, "past end of file");
    set_len_prefix(&im, UINT64_MAX);
    expect_bad(dir, "header_len_max", im.p, im.len, JM_ERR_FORMAT, "past end of file");
    set_len_prefix(&im, strlen(ok1));
    expect_bad(dir, "truncated_data", im.p, im.len - 4, JM_ERR_FORMAT, "past end of data section");
    free(im.p);

    /* A header longer than the limit, in a file big enough to hold it (sparse: no 100 MiB
     * written). */
    char path[512];
    snprintf(path, sizeof path, "%s/header_over_limit.safetensors", dir);
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)(ST_MAX_HEADER + 1) >> (8 * i));
    write_bytes(path, len8, 8);
    st_file f;
    jm_error err = {{0}};
    jm_status s = truncate(path, (off_t)ST_MAX_HEADER + 16) == 0 ? st_open(path, &f, &err) : JM_ERR_IO;
    check(s == JM_ERR_FORMAT && strstr(err.msg, "exceeds the 104857600-byte limit"),
          "bad_header_over_limit", "status %s: %s", jm_status_name(s), err.msg);
    if (s == JM_OK) st_close(&f);
    unlink(path);

    expect_bad_json(dir, "end_past_data",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                    "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
                    12, "'b': data_offsets end 16 past end of data section (12 bytes)");
    expect_bad_json(dir, "overlap",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                    "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                    12, "tensors 'a' [0, 8) and 'b' [4, 12) overlap");
    expect_bad_json(dir, "overlap_same_range",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                    "\"b\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                    8, "overlap");
    expect_bad_json(dir, "zero_size_inside_other",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                    "\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]}}",
                    8, "overlap");
    expect_bad_json(dir, "gap",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                    "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}",
                    20, "gap of 4 bytes between tensors 'a' (ends at 8) and 'b'");
    expect_bad_json(dir, "gap_before_first",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12,
                    "gap of 4 bytes before the first tensor 'a'");
    expect_bad_json(dir, "trailing_bytes",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 12,
                    "4 trailing bytes after the last tensor 'a'");
    expect_bad_json(dir, "data_but_no_tensors", "{}", 4, "trailing bytes");
    expect_bad_json(dir, "unknown_dtype",
                    "{\"a\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
                    "tensor 'a': unknown dtype \"Q4\"");
    expect_bad_json(dir, "dtype_not_string",
                    "{\"a\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
                    "\"dtype\" is not a string");
    expect_bad_json(dir, "missing_dtype", "{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
                    "tensor 'a': missing \"dtype\"");
    expect_bad_json(dir, "dtype_twice",
                    "{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                    8, "\"dtype\" given twice");
    expect_bad_json(dir, "span_mismatch",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 20,
                    "data_offsets span 20 bytes but 6 elements of F32 need 24");
    expect_bad_json(dir, "negative_dim",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1,2],\"data_offsets\":[0,8]}}", 8,
                    "shape[0] is negative");
    expect_bad_json(dir, "fractional_dim",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5,2],\"data_offsets\":[0,8]}}", 8,
                    "shape[0] is not an integer (1.5)");
    expect_bad_json(dir, "string_dim",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", 8,
                    "shape[0] is not a number");
    expect_bad_json(dir, "dim_too_large",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,8]}}", 8,
                    "shape[0] is too large");
    expect_bad_json(dir, "too_many_dims",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,2],\"data_offsets\":[0,8]}}",
                    8, "more than 8 dims");
    expect_bad_json(dir, "missing_shape", "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8,
                    "missing \"shape\"");
    expect_bad_json(dir, "shape_not_array",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", 8,
                    "non-array \"shape\"");
    expect_bad_json(dir, "numel_overflow",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
                    "\"data_offsets\":[0,8]}}",
                    8, "element count of shape overflows");
    expect_bad_json(dir, "bytes_overflow",
                    "{\"a\":{\"dtype\":\"F64\",\"shape\":[4294967296,1073741824],"
                    "\"data_offsets\":[0,8]}}",
                    8, "byte size of shape overflows"); /* 2^62 elements fit; 2^65 bytes do not */
    expect_bad_json(dir, "begin_after_end",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8,
                    "data_offsets begin 8 > end 0");
    expect_bad_json(dir, "offsets_three",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,8]}}", 8,
                    "\"data_offsets\" must be an array of 2 integers");
    expect_bad_json(dir, "offsets_missing", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8,
                    "\"data_offsets\" must be an array of 2 integers");
    expect_bad_json(dir, "offset_negative",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}", 8,
                    "data_offsets[0] is negative");
    expect_bad_json(dir, "entry_not_object", "{\"a\":5}", 0, "tensor 'a': entry is not a JSON object");
    expect_bad_json(dir, "empty_name", "{\"\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                    8, "empty name");
    expect_bad_json(dir, "duplicate_name",
                    "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
                    16, "duplicate tensor name 'a'");
    expect_bad_json(dir, "metadata_value_not_string", "{\"__metadata__\":{\"format\":1}}", 0,
                    "\"__metadata__\" value for key 'format' is not a string");
    expect_bad_json(dir, "metadata_not_object", "{\"__metadata__\":[\"pt\"]}", 0,
                    "\"__metadata__\" is not a JSON object");
    expect_bad_json(dir, "metadata_twice", "{\"__metadata__\":{},\"__metadata__\":{}}", 0,
                    "duplicate \"__metadata__\"");
    expect_bad_json(dir, "metadata_duplicate_key", "{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0,
                    "duplicate \"__metadata__\" key 'k'");
    expect_bad_json(dir, "bad_json", "{\"a\":{\"dtype\":\"F32\",}}", 0, "not valid JSON");
    expect_bad_json(dir, "unterminated_json", "{\"a\":{\"dtype\":\"F32\"", 0, "not valid JSON");
    expect_bad_json(dir, "json_array", "[1,2]", 0, "not a JSON object");
    expect_bad_json(dir, "leading_space", " {}", 0, "not a JSON object");
    expect_bad_json(dir, "garbage_after_object", "{} x", 0, "unexpected bytes after the JSON object");
    expect_bad_json(dir, "utf8_invalid_byte", "{\"a\xff\":{}}", 0, "not valid UTF-8 (byte 0xff");
    expect_bad_json(dir, "utf8_overlong", "{\"a\xc0\x80\":{}}", 0, "not valid UTF-8");
    expect_bad_json(dir, "utf8_overlong3", "{\"a\xe0\x80\xaf\":{}}", 0, "not valid UTF-8");
    expect_bad_json(dir, "utf8_surrogate", "{\"a\xed\xa0\x80\":{}}", 0, "not valid UTF-8");
    expect_bad_json(dir, "utf8_past_10ffff", "{\"a\xf4\x90\x80\x80\":{}}", 0, "not valid UTF-8");
    expect_bad_json(dir, "utf8_truncated_seq", "{\"a\xe2\x82\":{}}", 0, "not valid UTF-8");
    expect_bad_json(dir, "utf8_truncated_at_end", "{}  \xe2\x82", 0, "not valid UTF-8");
    expect_bad_json(dir, "control_char", "{\x01}", 0, "control character 0x01");
    const char nul[] = "{\"a\0\":{}}";
    im = make_image(nul, sizeof nul - 1, 0);
    expect_bad(dir, "nul_in_header", im.p, im.len, JM_ERR_FORMAT, "NUL byte in header at offset 3");
    free(im.p);

    /* an escaped NUL would end the name early in C: refused wherever it is, never cut */
    expect_bad_json(dir, "nul_escape_in_name",
                    "{\"model.embed_tokens.weight\\u0000junk\":{\"dtype\":\"U8\",\"shape\":[1],"
                    "\"data_offsets\":[0,1]}}", 1, "\\u0000 (NUL) at byte 27");
    expect_bad_json(dir, "nul_escape_alone", "{\"\\u0000\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                    1, "\\u0000");
    expect_bad_json(dir, "nul_escape_in_metadata_key", "{\"__metadata__\":{\"format\\u0000x\":\"pt\"}}", 0,
                    "\\u0000");
    expect_bad_json(dir, "nul_escape_in_metadata_value", "{\"__metadata__\":{\"jetmoe.quant\":\"q8\\u0000junk\"}}",
                    0, "\\u0000");
    expect_bad_json(dir, "nul_escape_in_dtype", "{\"a\":{\"dtype\":\"U8\\u0000\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                    1, "\\u0000");

    snprintf(path, sizeof path, "%s/does-not-exist.safetensors", dir);
    s = st_open(path, &f, &err);
    check(s == JM_ERR_IO && strstr(err.msg, "does-not-exist"), "bad_missing_file", "status %s: %s",
          jm_status_name(s), err.msg);
    s = st_open(dir, &f, &err);
    check(s == JM_ERR_IO && strstr(err.msg, "not a regular file"), "bad_directory", "status %s: %s",
          jm_status_name(s), err.msg);
}

/* ---- files the reader must accept ---- */

static void expect_good(const char *name, const char *json, size_t data_len, int want_n)
{
    image im = make_image(json, strlen(json), data_len);
    st_file f;
    jm_error err = {{0}};
    jm_status s = st_parse(im.p, im.len, name, &f, &err);
    if (s != JM_OK) {
        check(false, name, "st_parse: %s", err.msg);
    } else {
        check(f.n == want_n, name, "%d tensors, want %d", f.n, want_n);
        st_close(&f);
    }
    free(im.p);
}

static void test_good(void)
{
    /* As HF's Python library writes it: metadata first, padded with spaces. */
    expect_good("good_hf_style",
                "{\"__metadata__\":{\"format\":\"pt\"},\"model.norm.weight\":{\"dtype\":\"BF16\","
                "\"shape\":[4],\"data_offsets\":[0,8]}}      ",
                8, 1);
    expect_good("good_empty_header", "{}", 0, 0);
    expect_good("good_json_whitespace",
                "{ \"a\" : { \"dtype\" : \"U8\" ,\n\t\"shape\" : [ 3 ] , \"data_offsets\" : [ 0 , 3 ] } }"
                " \n\t ",
                3, 1);
    expect_good("good_unknown_field_ignored",
                "{\"a\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3],\"extra\":[1]}}", 3, 1);
    expect_good("good_zero_size_at_boundaries",
                "{\"z0\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},"
                "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                "\"z1\":{\"dtype\":\"BF16\",\"shape\":[3,0],\"data_offsets\":[8,8]},"
                "\"z2\":{\"dtype\":\"I64\",\"shape\":[0,7],\"data_offsets\":[8,8]},"
                "\"b\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[8,9]}}",
                9, 5);
    expect_good("good_unicode_name_and_escapes",
                "{\"caf\xc3\xa9 \\u00e9 \\\"q\\\" \xf0\x9f\x98\x80\":{\"dtype\":\"BOOL\",\"shape\":[1],"
                "\"data_offsets\":[0,1]}}",
                1, 1);
    /* names the JSON escapes are kept whole: a backslash then "u0000", control characters */
    const char *kept = "{\"a\\\\u0000b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                       "\"c\\u0001\\u001fd\\n\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}";
    image im = make_image(kept, strlen(kept), 2);
    st_file f;
    jm_error err = {{0}};
    jm_status s = st_parse(im.p, im.len, "kept", &f, &err);
    check(s == JM_OK && f.n == 2 && st_find(&f, "a\\u0000b") && st_find(&f, "c\x01\x1f" "d\n") &&
              !st_find(&f, "a") && !st_find(&f, "c"),
          "good_escaped_names_kept_whole", "%s", s ? err.msg : "names cut or changed");
    if (!s) st_close(&f);
    free(im.p);
    expect_good("good_integral_exponent", /* 2e0 is the integer 2 */
                "{\"a\":{\"dtype\":\"F32\",\"shape\":[2e0],\"data_offsets\":[0,8]}}", 8, 1);
}

/* ---- round trip ---- */

static bool same_float(float got, float want)
{
    if (isnan(want)) return isnan(got);
    return memcmp(&got, &want, sizeof got) == 0; /* bitwise: tells -0 from +0 */
}

static void test_round_trip(const char *dir)
{
    char path[512];
    snprintf(path, sizeof path, "%s/rt.safetensors", dir);

    const uint8_t u8[3] = {7, 0, 255}; /* 3 bytes first, so the F32 data that follows is unaligned */
    float f32[6] = {1.0f, -2.5f, 3.25f, 0.0f, -0.0f, 1e-30f};
    const uint16_t bf16[10] = {0x3f80, 0xc000, 0x8000, 0x7f80, 0xff80, 0x7fc0,
                               0x0001, 0x007f, 0x3e20, 0x4049};
    const float bf16_want[10] = {1.0f, -2.0f, -0.0f, INFINITY, -INFINITY, NAN,
                                 ldexpf(1, -133), 127 * ldexpf(1, -133), 0.15625f, 3.140625f};
    const uint16_t f16[12] = {0x3c00, 0xc000, 0x8000, 0x7c00, 0xfc00, 0x7e00,
                              0x0001, 0x03ff, 0x0400, 0x7bff, 0x3555, 0x8001};
    const float f16_want[12] = {1.0f, -2.0f, -0.0f, INFINITY, -INFINITY, NAN,
                                ldexpf(1, -24), 1023 * ldexpf(1, -24), ldexpf(1, -14), 65504.0f,
                                0.333251953125f, -ldexpf(1, -24)};
    const int32_t i32[4] = {1, -1, INT32_MAX, INT32_MIN};
    const float scalar = 3.5f;
    const char *weird = "w \"q\" \\ caf\xc3\xa9 \x01";
    const uint8_t one = 1;

    st_out out[] = {
        {"u8", ST_U8, 1, {3}, u8},
        {"f32", ST_F32, 2, {2, 3}, f32},
        {"bf16", ST_BF16, 1, {10}, bf16},
        {"f16", ST_F16, 2, {3, 4}, f16},
        {"i32", ST_I32, 2, {2, 2}, i32},
        {"scalar", ST_F32, 0, {0}, &scalar},
        {"empty", ST_F32, 2, {0, 5}, NULL},
        {"wide_empty", ST_F32, 2, {0, 1000000000000LL}, NULL},
        {weird, ST_BOOL, 1, {1}, &one},
    };
    int n = (int)(sizeof out / sizeof out[0]);
    const char *mk[] = {"format", "note"};
    const char *mv[] = {"pt", "line\nbreak \"q\" \xc3\xbc"};
    jm_error err = {{0}};
    jm_status s = st_write(path, out, n, mk, mv, 2, &err);
    if (!check(s == JM_OK, "roundtrip_write", "%s", err.msg)) return;
    check(count_entries(dir, ".tmp.") == 0, "atomic_write_no_temp_left", "%d temp files in %s",
          count_entries(dir, ".tmp."), dir);

    /* The raw header: aligned data, metadata first, keys in the given order, plain integers. */
    char *raw = NULL;
    size_t raw_len = 0;
    s = jm_read_file(path, 1 << 20, &raw, &raw_len, &err);
    if (!check(s == JM_OK && raw_len >= 8, "roundtrip_raw_read", "%s", err.msg)) return;
    uint64_t hn = 0;
    for (int i = 7; i >= 0; i--) hn = (hn << 8) | (uint8_t)raw[i];
    check((8 + hn) % 8 == 0, "roundtrip_header_aligned", "8 + %llu is not a multiple of 8",
          (unsigned long long)hn);
    check(strncmp(raw + 8, "{\"__metadata__\":{\"format\":\"pt\",", 31) == 0,
          "roundtrip_metadata_first", "header starts %.40s", raw + 8);
    char *hdr = strndup(raw + 8, (size_t)hn);
    const char *prev = hdr;
    bool ordered = true;
    for (int i = 0; i < 6; i++) { /* the plain names; each must appear after the previous one */
        char key[64];
        snprintf(key, sizeof key, "\"%s\":{", out[i].name);
        const char *at = strstr(hdr, key);
        if (!at || at < prev) ordered = false;
        if (at) prev = at;
    }
    check(ordered, "roundtrip_key_order", "keys not in the given order: %s", hdr);
    check(strstr(hdr, "[0,1000000000000]") && !strstr(hdr, "e+"), "roundtrip_integers_plain",
          "big dim not written as a plain integer: %s", hdr);
    free(hdr);
    free(raw);

    st_file f;
    s = st_open(path, &f, &err);
    if (!check(s == JM_OK, "roundtrip_open", "%s", err.msg)) return;
    check(f.n == n, "roundtrip_count", "%d tensors, want %d", f.n, n);
    bool all_ok = true;
    for (int i = 0; i < n; i++) {
        const st_tensor *t = st_find(&f, out[i].name);
        if (!t) {
            check(false, "roundtrip_tensors", "'%s' not found", out[i].name);
            all_ok = false;
            continue;
        }
        bool same = t->dtype == out[i].dtype && t->ndim == out[i].ndim;
        int64_t numel = 1;
        for (int d = 0; d < t->ndim && same; d++) {
            same = t->shape[d] == out[i].shape[d];
            numel *= out[i].shape[d];
        }
        uint64_t bytes = (uint64_t)numel * st_dtype_size(out[i].dtype);
        same = same && t->numel == numel && t->end - t->begin == bytes &&
               (bytes == 0 || memcmp(t->data, out[i].data, bytes) == 0);
        if (!same) {
            check(false, "roundtrip_tensors", "'%s' differs after reading back", out[i].name);
            all_ok = false;
        }
    }
    if (all_ok) check(true, "roundtrip_tensors", "-");
    check(st_find(&f, "nope") == NULL, "roundtrip_find_missing", "found a tensor that is not there");
    check(f.n_meta == 2 && st_meta(&f, "format") && strcmp(st_meta(&f, "format"), "pt") == 0 &&
              st_meta(&f, "note") && strcmp(st_meta(&f, "note"), mv[1]) == 0 && !st_meta(&f, "x"),
          "roundtrip_metadata", "metadata differs");

    /* Conversions to fp32, from unaligned data too. */
    const st_tensor *t = st_find(&f, "f32");
    float got[12];
    check(t && ((uintptr_t)t->data % 4) != 0, "roundtrip_f32_unaligned", "test setup: data aligned");
    bool conv = t && st_to_f32(t, got, &err) == JM_OK;
    for (int i = 0; conv && i < 6; i++) conv = same_float(got[i], f32[i]);
    check(conv, "to_f32_from_f32", "%s", err.msg);
    t = st_find(&f, "bf16");
    conv = t && st_to_f32(t, got, &err) == JM_OK;
    for (int i = 0; conv && i < 10; i++)
        if (!same_float(got[i], bf16_want[i])) {
            check(false, "to_f32_from_bf16", "0x%04x -> %g, want %g", bf16[i], got[i], bf16_want[i]);
            conv = false;
            break;
        }
    if (conv) check(true, "to_f32_from_bf16", "-");
    t = st_find(&f, "f16");
    conv = t && st_to_f32(t, got, &err) == JM_OK;
    for (int i = 0; conv && i < 12; i++)
        if (!same_float(got[i], f16_want[i])) {
            check(false, "to_f32_from_f16", "0x%04x -> %g, want %g", f16[i], got[i], f16_want[i]);
            conv = false;
            break;
        }
    if (conv) check(true, "to_f32_from_f16", "-");
    t = st_find(&f, "scalar");
    check(t && t->ndim == 0 && t->numel == 1 && st_to_f32(t, got, &err) == JM_OK && got[0] == 3.5f,
          "to_f32_scalar", "scalar read back wrong");
    t = st_find(&f, "empty");
    check(t && t->numel == 0 && st_to_f32(t, got, &err) == JM_OK, "to_f32_zero_size", "%s", err.msg);
    t = st_find(&f, "i32");
    s = t ? st_to_f32(t, got, &err) : JM_OK;
    check(s == JM_ERR_FORMAT && strstr(err.msg, "'i32'") && strstr(err.msg, "I32"),
          "to_f32_rejects_i32", "status %s: %s", jm_status_name(s), err.msg);
    st_close(&f);
    check(f.n == 0 && f.map == NULL, "close_clears", "st_close left state behind");

    /* Overwrite in place: the new content replaces the old. */
    st_out one_t = {"only", ST_F32, 1, {1}, &scalar};
    s = st_write(path, &one_t, 1, NULL, NULL, 0, &err);
    bool ok = s == JM_OK && st_open(path, &f, &err) == JM_OK;
    check(ok && f.n == 1 && f.n_meta == 0 && st_find(&f, "only"), "overwrite_replaces", "%s", err.msg);
    if (ok) st_close(&f);
    check(count_entries(dir, ".tmp.") == 0, "overwrite_no_temp_left", "temp files left in %s", dir);
}

/* ---- writer argument checks ---- */

static void expect_write_error(const char *dir, const char *name, const st_out *t, int n,
                               const char *const *mk, const char *const *mv, int n_meta,
                               jm_status want, const char *want_msg)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s.safetensors", dir, name);
    jm_error err = {{0}};
    jm_status s = st_write(path, t, n, mk, mv, n_meta, &err);
    if (s != want)
        check(false, name, "status %s, want %s: %s", jm_status_name(s), jm_status_name(want), err.msg);
    else if (!strstr(err.msg, want_msg))
        check(false, name, "message lacks \"%s\": %s", want_msg, err.msg);
    else
        check(access(path, F_OK) != 0 && count_entries(dir, ".tmp.") == 0, name, "a file was left behind");
}

static void test_write_errors(const char *dir)
{
    const float x[4] = {0};
    st_out neg = {"a", ST_F32, 1, {-1}, x};
    expect_write_error(dir, "write_negative_dim", &neg, 1, NULL, NULL, 0, JM_ERR_ARG, "shape[0]");
    st_out deep = {"a", ST_F32, ST_MAX_DIMS + 1, {1}, x};
    expect_write_error(dir, "write_too_many_dims", &deep, 1, NULL, NULL, 0, JM_ERR_ARG, "ndim 9");
    st_out null_data = {"a", ST_F32, 1, {4}, NULL};
    expect_write_error(dir, "write_null_data", &null_data, 1, NULL, NULL, 0, JM_ERR_ARG, "NULL data");
    st_out bad_dtype = {"a", ST_NUM_DTYPES, 1, {1}, x};
    expect_write_error(dir, "write_bad_dtype", &bad_dtype, 1, NULL, NULL, 0, JM_ERR_ARG, "bad dtype");
    st_out dups[2] = {{"a", ST_F32, 1, {1}, x}, {"a", ST_F32, 1, {1}, x}};
    expect_write_error(dir, "write_duplicate_name", dups, 2, NULL, NULL, 0, JM_ERR_ARG,
                       "duplicate tensor name 'a'");
    st_out empty_name = {"", ST_F32, 1, {1}, x};
    expect_write_error(dir, "write_empty_name", &empty_name, 1, NULL, NULL, 0, JM_ERR_ARG,
                       "invalid name");
    st_out bad_utf8 = {"a\xff", ST_F32, 1, {1}, x};
    expect_write_error(dir, "write_name_not_utf8", &bad_utf8, 1, NULL, NULL, 0, JM_ERR_ARG, "UTF-8");
    const char *mk[2] = {"k", "k"}, *mv[2] = {"1", "2"};
    expect_write_error(dir, "write_duplicate_meta", NULL, 0, mk, mv, 2, JM_ERR_ARG,
                       "duplicate metadata key 'k'");
    st_out big_dim = {"a", ST_F32, 2, {INT64_MAX, 2}, x};
    expect_write_error(dir, "write_dim_too_large", &big_dim, 1, NULL, NULL, 0, JM_ERR_ARG, "shape[0]");
    st_out huge = {"a", ST_F32, 3, {1LL << 32, 1LL << 32, 1LL << 32}, x};
    expect_write_error(dir, "write_numel_overflow", &huge, 1, NULL, NULL, 0, JM_ERR_ARG,
                       "element count overflows");

    char path[512];
    snprintf(path, sizeof path, "%s/no/such/dir/x.safetensors", dir);
    jm_error err = {{0}};
    st_out ok = {"a", ST_F32, 1, {1}, x};
    jm_status s = st_write(path, &ok, 1, NULL, NULL, 0, &err);
    check(s == JM_ERR_IO && strstr(err.msg, "no/such/dir"), "write_missing_dir", "status %s: %s",
          jm_status_name(s), err.msg);
}

/* ---- sharded sets ---- */

static const float v4[4] = {1, 2, 3, 4};

static void write_shard(const char *dir, const char *file, const char *const *names, int n)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    st_out t[8];
    for (int i = 0; i < n; i++) t[i] = (st_out){names[i], ST_F32, 1, {4}, v4};
    jm_error err = {{0}};
    if (st_write(path, t, n, NULL, NULL, 0, &err) != JM_OK) {
        fprintf(stderr, "setup: %s\n", err.msg);
        exit(2);
    }
}

#define SHARD1 "model-00001-of-00002.safetensors"
#define SHARD2 "model-00002-of-00002.safetensors"

/* Makes root/<name> with the two standard shards (a, b | c) and the given index text. */
static void make_set(char *dir, size_t cap, const char *root, const char *name, const char *index)
{
    snprintf(dir, cap, "%s/%s", root, name);
    mkdir(dir, 0777);
    const char *s1[] = {"a", "b"}, *s2[] = {"c"};
    write_shard(dir, SHARD1, s1, 2);
    write_shard(dir, SHARD2, s2, 1);
    if (index) {
        char path[600];
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
        write_text(path, index);
    }
}

static void expect_set_error(const char *root, const char *name, const char *index, jm_status want,
                             const char *want_msg)
{
    char dir[512];
    make_set(dir, sizeof dir, root, name, index);
    st_set set;
    jm_error err = {{0}};
    jm_status s = st_set_open(dir, &set, &err);
    if (s == JM_OK) {
        check(false, name, "st_set_open accepted it");
        st_set_close(&set);
        return;
    }
    if (s != want)
        check(false, name, "status %s, want %s: %s", jm_status_name(s), jm_status_name(want), err.msg);
    else
        check(strstr(err.msg, want_msg) != NULL && set.nfiles == 0 && set.files == NULL, name,
              "message lacks \"%s\" (or set not cleared): %s", want_msg, err.msg);
}

static void test_sets(const char *root)
{
    char dir[512];
    make_set(dir, sizeof dir, root, "set_ok",
             "{\"metadata\":{\"total_size\":48},\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1
             "\",\"c\":\"" SHARD2 "\"}}");
    st_set set;
    jm_error err = {{0}};
    jm_status s = st_set_open(dir, &set, &err);
    if (check(s == JM_OK, "set_two_shards_open", "%s", err.msg)) {
        const char *file = NULL;
        const st_tensor *t = st_set_find(&set, "c", &file);
        float got[4];
        check(set.nfiles == 2 && t && file && strstr(file, SHARD2) &&
                  st_to_f32(t, got, &err) == JM_OK && memcmp(got, v4, sizeof got) == 0,
              "set_two_shards_find", "tensor 'c' not found in %s", SHARD2);
        t = st_set_find(&set, "a", &file);
        check(t && file && strstr(file, SHARD1), "set_find_first_shard", "tensor 'a' not in shard 1");
        check(st_set_find(&set, "zz", NULL) == NULL, "set_find_missing", "found 'zz'");
        st_set_close(&set);
    }

    expect_set_error(root, "set_index_names_absent_tensor",
                     "{\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1 "\",\"c\":\"" SHARD2
                     "\",\"d\":\"" SHARD2 "\"}}",
                     JM_ERR_FORMAT, "tensor 'd' listed in index for shard " SHARD2 " but absent");
    expect_set_error(root, "set_shard_has_unlisted_tensor",
                     "{\"weight_map\":{\"a\":\"" SHARD1 "\",\"c\":\"" SHARD2 "\"}}", JM_ERR_FORMAT,
                     "holds tensor 'b' not in the index");
    expect_set_error(root, "set_index_wrong_shard",
                     "{\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD2 "\",\"c\":\"" SHARD2 "\"}}",
                     JM_ERR_FORMAT, "tensor 'b' listed in index for shard " SHARD2 " but absent");
    expect_set_error(root, "set_path_traversal",
                     "{\"weight_map\":{\"a\":\"../x.safetensors\"}}", JM_ERR_FORMAT,
                     "shard '../x.safetensors' for tensor 'a' is not a plain file name");
    expect_set_error(root, "set_path_dotdot", "{\"weight_map\":{\"a\":\"..\"}}", JM_ERR_FORMAT,
                     "not a plain file name");
    expect_set_error(root, "set_path_absolute", "{\"weight_map\":{\"a\":\"/etc/passwd\"}}",
                     JM_ERR_FORMAT, "not a plain file name");
    expect_set_error(root, "set_path_empty", "{\"weight_map\":{\"a\":\"\"}}", JM_ERR_FORMAT,
                     "not a plain file name");
    expect_set_error(root, "set_missing_shard_file",
                     "{\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1 "\",\"c\":\"nope.safetensors\"}}",
                     JM_ERR_IO, "nope.safetensors");
    expect_set_error(root, "set_index_not_json", "{\"weight_map\": {", JM_ERR_FORMAT, "malformed JSON");
    expect_set_error(root, "set_index_not_object", "[]", JM_ERR_FORMAT, "not a JSON object");
    expect_set_error(root, "set_no_weight_map", "{\"metadata\":{}}", JM_ERR_FORMAT,
                     "missing \"weight_map\"");
    expect_set_error(root, "set_weight_map_value_not_string", "{\"weight_map\":{\"a\":1}}",
                     JM_ERR_FORMAT, "entry for tensor 'a' is not a string");
    expect_set_error(root, "set_weight_map_empty", "{\"weight_map\":{}}", JM_ERR_FORMAT,
                     "lists no tensors");
    expect_set_error(root, "set_weight_map_nul_in_name",
                     "{\"weight_map\":{\"a\\u0000x\":\"" SHARD1 "\",\"b\":\"" SHARD1 "\",\"c\":\"" SHARD2 "\"}}",
                     JM_ERR_FORMAT, "\\u0000 (NUL)");
    expect_set_error(root, "set_weight_map_nul_in_shard",
                     "{\"weight_map\":{\"a\":\"" SHARD1 "\\u0000x\",\"b\":\"" SHARD1 "\",\"c\":\"" SHARD2 "\"}}",
                     JM_ERR_FORMAT, "\\u0000 (NUL)");
    expect_set_error(root, "set_weight_map_duplicate",
                     "{\"weight_map\":{\"a\":\"" SHARD1 "\",\"a\":\"" SHARD1 "\"}}", JM_ERR_FORMAT,
                     "duplicate key \"a\"");

    /* One tensor in two shards: the index can name only one of them. */
    make_set(dir, sizeof dir, root, "set_tensor_in_two_shards",
             "{\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1 "\",\"c\":\"" SHARD2 "\"}}");
    const char *s2[] = {"a", "c"};
    write_shard(dir, SHARD2, s2, 2);
    s = st_set_open(dir, &set, &err);
    check(s == JM_ERR_FORMAT && strstr(err.msg, "holds tensor 'a', which the index assigns to shard " SHARD1),
          "set_tensor_in_two_shards", "status %s: %s", jm_status_name(s), err.msg);
    if (s == JM_OK) st_set_close(&set);

    /* A malformed shard: the message names the shard file. */
    make_set(dir, sizeof dir, root, "set_bad_shard",
             "{\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1 "\",\"c\":\"" SHARD2 "\"}}");
    char path[600];
    snprintf(path, sizeof path, "%s/%s", dir, SHARD2);
    write_text(path, "junk");
    s = st_set_open(dir, &set, &err);
    check(s == JM_ERR_FORMAT && strstr(err.msg, SHARD2) && strstr(err.msg, "shorter than 8"),
          "set_bad_shard", "status %s: %s", jm_status_name(s), err.msg);
    if (s == JM_OK) st_set_close(&set);

    /* Neither file: the message names the directory. */
    snprintf(dir, sizeof dir, "%s/set_empty", root);
    mkdir(dir, 0777);
    s = st_set_open(dir, &set, &err);
    check(s != JM_OK && strstr(err.msg, "no model.safetensors or model.safetensors.index.json in") &&
              strstr(err.msg, "set_empty"),
          "set_no_files", "status %s: %s", jm_status_name(s), err.msg);

    /* A single model.safetensors; it takes precedence over an index, as in HF transformers. */
    snprintf(dir, sizeof dir, "%s/set_single", root);
    mkdir(dir, 0777);
    const char *one[] = {"x"};
    write_shard(dir, "model.safetensors", one, 1);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    write_text(path, "not json");
    s = st_set_open(dir, &set, &err);
    if (check(s == JM_OK && set.nfiles == 1, "set_single_file", "%s", err.msg)) {
        const char *file = NULL;
        check(st_set_find(&set, "x", &file) && file && strstr(file, "/model.safetensors"),
              "set_single_file_find", "tensor 'x' not found");
        st_set_close(&set);
    }
}

int main(void)
{
    char root[] = "/tmp/jm_test_st_XXXXXX";
    temp_dir(root);
    test_good();
    test_malformed(root);
    test_round_trip(root);
    test_write_errors(root);
    test_sets(root);
    temp_dir_done(root);
    return exit_status();
}
