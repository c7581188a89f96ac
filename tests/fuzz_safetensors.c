/* fuzz_safetensors.c — deterministic mutation fuzzer for st_parse.
 *
 * Starts from a valid image (several dtypes, metadata, a scalar, a zero-size tensor), mutates a
 * copy (byte flips, inserts, deletes, length-prefix changes, truncation, JSON token splices), and
 * parses it from a malloc'd buffer of exactly the mutated length, so AddressSanitizer sees any
 * read past the end. Accepted images must satisfy the reader's promises (ranges in bounds, exact
 * tiling, unique sorted names); rejected ones must carry a one-line message naming the file.
 *
 * Usage: fuzz_safetensors [iterations [seed]]   (defaults: 20000, 0x5eed)
 * Prints "PASS <name>" or "FAIL <name>: <why>" per check; exits 0 iff nothing failed. */
#include "base/safetensors.h"
#include "fuzz_rng.h"

#include <string.h>

#define FUZZ_NAME "fuzz.safetensors"
#define MAX_IMAGE 8192

/* ---- the image being mutated ---- */

typedef struct {
    uint8_t p[MAX_IMAGE];
    size_t len;
} image;

static uint64_t get_prefix(const image *im)
{
    uint64_t n = 0;
    for (int i = 7; i >= 0 && (size_t)i < im->len; i--) n = (n << 8) | im->p[i];
    return im->len >= 8 ? n : 0;
}

static void set_prefix(image *im, uint64_t n)
{
    for (int i = 0; i < 8 && (size_t)i < im->len; i++) im->p[i] = (uint8_t)(n >> (8 * i));
}

/* The header's extent as far as the image allows: [8, 8 + hlen). */
static size_t header_len(const image *im)
{
    if (im->len <= 8) return 0;
    uint64_t n = get_prefix(im);
    return n < im->len - 8 ? (size_t)n : im->len - 8;
}

/* Replaces im->p[at, at + del) by ins[0, n_ins); keeps the length prefix in step when the edit
 * lies inside the header and adjust is set, so the parser sees the whole edited JSON. */
static void splice(image *im, size_t at, size_t del, const void *ins, size_t n_ins, bool adjust)
{
    if (at > im->len) at = im->len;
    if (del > im->len - at) del = im->len - at;
    if (im->len - del + n_ins > MAX_IMAGE) return;
    bool in_header = im->len >= 8 && at >= 8 && at <= 8 + header_len(im);
    memmove(im->p + at + n_ins, im->p + at + del, im->len - at - del);
    if (n_ins) memcpy(im->p + at, ins, n_ins);
    im->len = im->len - del + n_ins;
    if (adjust && in_header) set_prefix(im, get_prefix(im) + n_ins - del);
}

static const char *const tokens[] = {
    "0", "1", "-1", "-", "1.5", "1e308", "1e999", "-0", "2e0", "9007199254740992",
    "9007199254740993", "18446744073709551616", "4294967296", "99999999999999999999999999",
    "\"", "{", "}", "[", "]", ",", ":", "\"\"", "{}", "[]", "null", "true", "\"x\"",
    "\"F32\"", "\"BF16\"", "\"F16\"", "\"I64\"", "\"Q8\"", "\"__metadata__\"", "\"emb\"",
    "[0,0]", "[1,2,3,4,5,6,7,8,9]", "\"\\u0000\"", "\"\\ud800\"", "\"\\u00e9\"", " ", "\n",
    "\xc3\xa9", "\xc0\x80", "\xed\xa0\x80", "\xff", "\xf4\x90\x80\x80", "\xe2\x82",
};
static const char interesting[] = "\"{}[],:-.0123456789eE \\\x00\x01\x7f\x80\xbf\xc0\xc2\xe0\xed\xf0\xf4\xff";

/* Finds the next run of digits at or after a random point of the header; 0 if none. */
static size_t find_run(rng *r, const image *im, bool (*in_run)(uint8_t), size_t *start)
{
    size_t h = header_len(im);
    if (h == 0) return 0;
    size_t i = 8 + below(r, h), end = 8 + h;
    while (i < end && !in_run(im->p[i])) i++;
    size_t j = i;
    while (j < end && in_run(im->p[j])) j++;
    *start = i;
    return j - i;
}

static bool is_digit(uint8_t c) { return c >= '0' && c <= '9'; }
static bool in_string(uint8_t c) { return c != '"'; }

/* Offset of a random occurrence of needle inside the header, or 0 if there is none. */
static size_t find_any(rng *r, const image *im, const char *needle)
{
    size_t h = header_len(im), n = strlen(needle), count = 0;
    for (size_t i = 8; i + n <= 8 + h; i++) count += memcmp(im->p + i, needle, n) == 0;
    if (count == 0) return 0;
    size_t k = below(r, count);
    for (size_t i = 8; i + n <= 8 + h; i++)
        if (memcmp(im->p + i, needle, n) == 0 && k-- == 0) return i;
    return 0;
}

static const char *const shapes_tok[] = {
    "[]", "[0]", "[1]", "[-1]", "[3,4,0]", "[1,1,1,1,1,1,1,1,1]", "[1,1,1,1,1,1,1,12]",
    "[4294967296,4294967296,4294967296]", "[9007199254740992,9007199254740992]", "[12]", "[2,5]",
};
static const char *const names_tok[] = {"emb", "w.bf16", "w.f16", "idx", "mask", "sc", "z", "b", ""};

/* Mutations that keep the JSON well-formed, to reach the checks behind the parser: moving a
 * tensor's range (overlaps, gaps), changing a shape (dims, overflow), renaming (duplicates). */
static void mutate_structure(rng *r, image *im)
{
    char text[64];
    switch (below(r, 3)) {
    case 0: { /* shift "data_offsets":[b,e] by the same amount: the span stays right */
        size_t at = find_any(r, im, "\"data_offsets\":[");
        if (!at) return;
        at += strlen("\"data_offsets\":[");
        char *end;
        char tmp[48] = {0};
        size_t h = header_len(im);
        memcpy(tmp, im->p + at, 8 + h - at < sizeof tmp - 1 ? 8 + h - at : sizeof tmp - 1);
        unsigned long long b = strtoull(tmp, &end, 10);
        if (*end != ',') return;
        unsigned long long e = strtoull(end + 1, &end, 10);
        if (*end != ']') return;
        long d = (long)below(r, 17) - 8;
        if ((long long)b + d < 0) d = -(long)b;
        int k = snprintf(text, sizeof text, "%llu,%llu", b + (unsigned long long)d,
                         e + (unsigned long long)d);
        splice(im, at, (size_t)(end - tmp), text, (size_t)k, true);
        return;
    }
    case 1: { /* a new shape */
        size_t at = find_any(r, im, "\"shape\":");
        if (!at) return;
        at += strlen("\"shape\":");
        size_t h = header_len(im), j = at;
        while (j < 8 + h && im->p[j] != ']') j++;
        if (j == 8 + h) return;
        const char *t = shapes_tok[below(r, sizeof shapes_tok / sizeof shapes_tok[0])];
        splice(im, at, j + 1 - at, t, strlen(t), true);
        return;
    }
    default: { /* rename a tensor, often to a name already taken */
        size_t at = find_any(r, im, "\":{\"dtype\"");
        if (!at) return;
        size_t i = at;
        while (i > 8 && im->p[i - 1] != '"') i--;
        const char *t = names_tok[below(r, sizeof names_tok / sizeof names_tok[0])];
        splice(im, i, at - i, t, strlen(t), true);
        return;
    }
    }
}

static void mutate(rng *r, image *im)
{
    size_t h = header_len(im);
    size_t hpos = 8 + (h ? below(r, h) : 0); /* a position inside the header */
    bool adjust = below(r, 10) != 0;         /* mostly keep the prefix consistent */
    uint8_t buf[16];
    switch (below(r, 16)) {
    case 0: /* flip a bit in the header */
        if (h) im->p[hpos] ^= (uint8_t)(1u << below(r, 8));
        break;
    case 1: /* set a header byte to a character the parser cares about */
        if (h) im->p[hpos] = (uint8_t)interesting[below(r, sizeof interesting - 1)];
        break;
    case 2: /* set a header byte to anything */
        if (h) im->p[hpos] = (uint8_t)rnd(r);
        break;
    case 3: { /* insert a few bytes */
        size_t n = 1 + below(r, 8);
        for (size_t i = 0; i < n; i++)
            buf[i] = below(r, 2) ? (uint8_t)interesting[below(r, sizeof interesting - 1)] : (uint8_t)rnd(r);
        splice(im, hpos, 0, buf, n, adjust);
        break;
    }
    case 4: /* delete a few bytes */
        splice(im, hpos, 1 + below(r, 8), NULL, 0, adjust);
        break;
    case 5: { /* a new length prefix */
        uint64_t n = get_prefix(im), room = im->len >= 8 ? im->len - 8 : 0;
        const uint64_t choices[] = {0, 1, 2, n + 1, n - 1, n + 8, room, room + 1,
                                    (uint64_t)1 << 63, UINT64_MAX, rnd(r), below(r, room + 1)};
        set_prefix(im, choices[below(r, sizeof choices / sizeof choices[0])]);
        break;
    }
    case 6: /* truncate */
        im->len = below(r, im->len + 1);
        break;
    case 7: { /* replace a number by another token */
        size_t at, n = find_run(r, im, is_digit, &at);
        const char *t = tokens[below(r, sizeof tokens / sizeof tokens[0])];
        if (n) splice(im, at, n, t, strlen(t), adjust);
        break;
    }
    case 8: { /* replace a string's contents (a name, dtype, key or value) */
        size_t at, n = find_run(r, im, in_string, &at);
        if (!n || at >= im->len || im->p[at - 1] != '"') break;
        const char *t = tokens[below(r, sizeof tokens / sizeof tokens[0])];
        if (t[0] == '"' && strlen(t) >= 2) splice(im, at, n, t + 1, strlen(t) - 2, adjust);
        else splice(im, at, n, t, strlen(t), adjust);
        break;
    }
    case 9: /* change a data byte: the data section is opaque, so this must still parse */
        if (im->len > 8 + h) im->p[8 + h + below(r, im->len - 8 - h)] ^= (uint8_t)(1 + below(r, 255));
        break;
    case 10: { /* append bytes */
        size_t n = 1 + below(r, 8);
        for (size_t i = 0; i < n; i++) buf[i] = (uint8_t)rnd(r);
        splice(im, im->len, 0, buf, n, false);
        break;
    }
    case 11: /* swap two header bytes */
        if (h) {
            size_t other = 8 + below(r, h);
            uint8_t c = im->p[hpos];
            im->p[hpos] = im->p[other];
            im->p[other] = c;
        }
        break;
    case 12: { /* duplicate a chunk of the header elsewhere in it */
        if (!h) break;
        size_t from = 8 + below(r, h), n = 1 + below(r, 24);
        if (n > 8 + h - from) n = 8 + h - from;
        uint8_t chunk[24];
        memcpy(chunk, im->p + from, n);
        splice(im, hpos, 0, chunk, n, adjust);
        break;
    }
    default: /* 13-15 */
        mutate_structure(r, im);
        break;
    }
}

/* ---- invariants of an accepted image ---- */

static int cmp_range(const void *a, const void *b)
{
    const uint64_t *x = a, *y = b;
    if (x[0] != y[0]) return x[0] < y[0] ? -1 : 1;
    return x[1] < y[1] ? -1 : x[1] > y[1];
}

/* Returns NULL if f keeps every promise st_parse makes about buf, else what broke. */
static const char *verify(const uint8_t *buf, size_t len, const st_file *f, char *why, size_t why_len)
{
    if (len < 8) return "accepted an image shorter than 8 bytes";
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | buf[i];
    if (n > len - 8) return "accepted an image whose header runs past the end";
    const uint8_t *base = buf + 8 + n;
    uint64_t data_len = len - 8 - n;
    uint64_t(*ranges)[2] = malloc((size_t)(f->n ? f->n : 1) * sizeof *ranges);
    const char *bad = NULL;
    for (int i = 0; i < f->n && !bad; i++) {
        const st_tensor *t = &f->t[i];
        uint64_t numel = 1, esize = st_dtype_size(t->dtype);
        bool dims_ok = t->ndim >= 0 && t->ndim <= ST_MAX_DIMS;
        for (int d = 0; dims_ok && d < t->ndim; d++) {
            dims_ok = t->shape[d] >= 0 &&
                      (t->shape[d] == 0 || numel <= (uint64_t)INT64_MAX / (uint64_t)t->shape[d]);
            numel *= (uint64_t)t->shape[d];
        }
        if (!t->name || !t->name[0]) bad = "empty name";
        else if (esize == 0) bad = "bad dtype";
        else if (!dims_ok || (int64_t)numel != t->numel) bad = "shape and numel disagree";
        else if (t->begin > t->end || t->end > data_len) bad = "range outside the data section";
        else if (t->end - t->begin != numel * esize) bad = "span is not numel * dtype size";
        else if (t->data != base + t->begin) bad = "data pointer is not base + begin";
        else if (i > 0 && strcmp(f->t[i - 1].name, t->name) >= 0) bad = "names not sorted and unique";
        else if (st_find(f, t->name) != t) bad = "st_find misses a tensor";
        if (bad) {
            snprintf(why, why_len, "tensor '%s': %s", t->name ? t->name : "(null)", bad);
            bad = why;
            break;
        }
        /* Touch every byte (ASan checks the range) and convert the float tensors. */
        unsigned sum = 0;
        for (uint64_t k = 0; k < t->end - t->begin; k++) sum += t->data[k];
        (void)sum;
        float *out = malloc((size_t)numel * sizeof *out + 1);
        jm_error err = {{0}};
        jm_status s = st_to_f32(t, out, &err);
        bool is_float = t->dtype == ST_F32 || t->dtype == ST_BF16 || t->dtype == ST_F16;
        if (s != (is_float ? JM_OK : JM_ERR_FORMAT)) {
            snprintf(why, why_len, "tensor '%s': st_to_f32 returned %s", t->name, jm_status_name(s));
            bad = why;
        }
        free(out);
        ranges[i][0] = t->begin;
        ranges[i][1] = t->end;
    }
    if (!bad && f->n > 0) {
        qsort(ranges, (size_t)f->n, sizeof *ranges, cmp_range);
        uint64_t pos = 0;
        for (int i = 0; i < f->n && !bad; i++) {
            if (ranges[i][0] != pos) bad = "tensors do not tile the data section";
            pos = ranges[i][1];
        }
        if (!bad && pos != data_len) bad = "data section has bytes no tensor covers";
    } else if (!bad && data_len != 0) {
        bad = "no tensors but a non-empty data section";
    }
    for (int i = 0; i < f->n_meta && !bad; i++)
        if (!f->meta_key[i] || !f->meta_val[i] || st_meta(f, f->meta_key[i]) == NULL)
            bad = "metadata lookup fails";
    free(ranges);
    return bad;
}

/* Error messages with numbers, quoted names and parenthesised details blanked, to count how many kinds of error the
 * fuzzer reached. */
static void message_shape(const char *msg, char *out, size_t cap)
{
    const char *p = msg;
    if (strncmp(p, FUZZ_NAME ": ", strlen(FUZZ_NAME) + 2) == 0) p += strlen(FUZZ_NAME) + 2;
    size_t k = 0;
    while (*p && *p != '(' && k + 2 < cap) { /* details in parentheses vary too much */
        if (*p >= '0' && *p <= '9') {
            while (*p >= '0' && *p <= '9') p++;
            out[k++] = '#';
        } else if (*p == '\'' || *p == '"') {
            char q = *p++;
            while (*p && *p != q) p++;
            if (*p) p++;
            out[k++] = 'Q';
        } else {
            out[k++] = *p++;
        }
    }
    out[k] = 0;
}

/* ---- the seed ---- */

static void make_seed(image *im)
{
    const char *json =
        "{\"__metadata__\":{\"format\":\"pt\",\"author\":\"jm \\u00e9\"},"
        "\"emb\":{\"dtype\":\"F32\",\"shape\":[3,4],\"data_offsets\":[0,48]},"
        "\"w.bf16\":{\"dtype\":\"BF16\",\"shape\":[5],\"data_offsets\":[48,58]},"
        "\"w.f16\":{\"dtype\":\"F16\",\"shape\":[2,3],\"data_offsets\":[58,70]},"
        "\"idx\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[70,78]},"
        "\"mask\":{\"dtype\":\"BOOL\",\"shape\":[3],\"data_offsets\":[78,81]},"
        "\"sc\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[81,89]},"
        "\"z\":{\"dtype\":\"U8\",\"shape\":[0,4],\"data_offsets\":[89,89]},"
        "\"b\":{\"dtype\":\"U8\",\"shape\":[1,7],\"data_offsets\":[89,96]}}     ";
    size_t n = strlen(json), data_len = 96;
    im->len = 8 + n + data_len;
    set_prefix(im, n);
    memcpy(im->p + 8, json, n);
    for (size_t i = 0; i < data_len; i++) im->p[8 + n + i] = (uint8_t)(i * 37 + 11);
}

int main(int argc, char **argv)
{
    long iters = argc > 1 ? strtol(argv[1], NULL, 0) : 20000;
    uint64_t seed = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x5eed;
    rng r = {seed ? seed : 1};
    int fails = 0;

    static image seed_img, im; /* static: large, and main runs once */
    make_seed(&seed_img);
    st_file f;
    jm_error err = {{0}};
    jm_status s = st_parse(seed_img.p, seed_img.len, FUZZ_NAME, &f, &err);
    if (s != JM_OK || f.n != 8) {
        printf("FAIL fuzz_seed_valid: %s\n", s != JM_OK ? err.msg : "wrong tensor count");
        return 1;
    }
    st_close(&f);
    printf("PASS fuzz_seed_valid\n");

    long accepted = 0, rejected = 0;
    char first_bad[600] = "";
    char shapes[128][80];
    int n_shapes = 0;
    for (long it = 0; it < iters; it++) {
        im = seed_img;
        int n_mut = 1 + (int)below(&r, 3);
        for (int m = 0; m < n_mut; m++) mutate(&r, &im);

        uint8_t *buf = malloc(im.len ? im.len : 1); /* exactly len bytes: ASan guards the end */
        memcpy(buf, im.p, im.len);
        err.msg[0] = 0;
        s = st_parse(buf, im.len, FUZZ_NAME, &f, &err);
        if (s == JM_OK) {
            accepted++;
            char why[300];
            const char *bad = verify(buf, im.len, &f, why, sizeof why);
            if (bad && !first_bad[0])
                snprintf(first_bad, sizeof first_bad, "iteration %ld: %s", it, bad);
            fails += bad != NULL;
            st_close(&f);
        } else {
            rejected++;
            bool ok_msg = strncmp(err.msg, FUZZ_NAME ": ", strlen(FUZZ_NAME) + 2) == 0 &&
                          !strchr(err.msg, '\n') && f.n == 0 && f.t == NULL;
            if (!ok_msg && !first_bad[0])
                snprintf(first_bad, sizeof first_bad, "iteration %ld: bad rejection: %.400s", it,
                         err.msg);
            fails += !ok_msg;
            char shape[80];
            message_shape(err.msg, shape, sizeof shape);
            int k = 0;
            while (k < n_shapes && strcmp(shapes[k], shape) != 0) k++;
            if (k == n_shapes && n_shapes < 128) strcpy(shapes[n_shapes++], shape);
        }
        free(buf);
    }

    int n_fail = 0;
    if (fails) {
        printf("FAIL fuzz_safetensors_mutations: %d broken results; first: %s\n", fails, first_bad);
        n_fail++;
    } else if (rejected < iters / 5 || accepted < iters / 100) {
        printf("FAIL fuzz_safetensors_mutations: %ld accepted, %ld rejected of %ld: the mutations "
               "are not exercising both paths\n", accepted, rejected, iters);
        n_fail++;
    } else {
        printf("PASS fuzz_safetensors_mutations (%ld iterations, %ld accepted, %ld rejected)\n", iters,
               accepted, rejected);
    }
    /* The validation is deep only if mutations reach many different checks. */
    if (n_shapes >= 20) {
        printf("PASS fuzz_safetensors_error_variety (%d kinds of error reached)\n", n_shapes);
    } else {
        printf("FAIL fuzz_safetensors_error_variety: only %d kinds of error reached\n", n_shapes);
        n_fail++;
    }
    if (getenv("JM_FUZZ_VERBOSE"))
        for (int k = 0; k < n_shapes; k++) printf("  %s\n", shapes[k]);
    return n_fail ? 1 : 0;
}
