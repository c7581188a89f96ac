/* safetensors.c — validated reader, atomic writer, and sharded checkpoint sets.
 *
 * Format: u64 little-endian N; N bytes of UTF-8 JSON (an object, maybe padded with spaces);
 * then the data section. Each key but "__metadata__" maps to
 *   {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}
 * with offsets relative to the data section. "__metadata__" is an object of string -> string.
 *
 * Every byte of a file is untrusted: all sizes are checked in 64-bit arithmetic before use, and
 * the tensors must tile the data section exactly (no overlaps, holes or trailing bytes), as the
 * reference implementation (huggingface/safetensors) requires. f->t is kept sorted by name so
 * lookups are a binary search. */
#include "base/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host (the format is little-endian)"
#endif

/* A double holds every integer up to 2^53 exactly; past that, JSON numbers read through cJSON
 * could silently round, so we refuse them rather than guess. */
#define ST_MAX_INT 9007199254740992.0
#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SINGLE_NAME "model.safetensors"
#define ST_MAX_INDEX (64u << 20)

static const char *const dtype_names[ST_NUM_DTYPES] = {
    [ST_BOOL] = "BOOL", [ST_U8] = "U8",   [ST_I8] = "I8",     [ST_I16] = "I16", [ST_U16] = "U16",
    [ST_F16] = "F16",   [ST_BF16] = "BF16", [ST_I32] = "I32", [ST_U32] = "U32", [ST_F32] = "F32",
    [ST_I64] = "I64",   [ST_U64] = "U64", [ST_F64] = "F64",
};
static const unsigned char dtype_sizes[ST_NUM_DTYPES] = {
    [ST_BOOL] = 1, [ST_U8] = 1,  [ST_I8] = 1,  [ST_I16] = 2, [ST_U16] = 2, [ST_F16] = 2, [ST_BF16] = 2,
    [ST_I32] = 4,  [ST_U32] = 4, [ST_F32] = 4, [ST_I64] = 8, [ST_U64] = 8, [ST_F64] = 8,
};

static jm_status parse_header(const cJSON *root, const uint8_t *data, uint64_t data_len,
                              const char *name, st_file *f, jm_error *err);
static jm_status parse_entry(const cJSON *e, uint64_t data_len, const char *name, st_tensor *t,
                             jm_error *err);
static jm_status parse_meta(const cJSON *m, const char *name, st_file *f, jm_error *err);
static jm_status check_tiling(const st_file *f, uint64_t data_len, const char *name, jm_error *err);
static size_t utf8_check(const uint8_t *s, size_t n);
static bool json_uint(const cJSON *v, uint64_t *out, char *why, size_t why_len);
static const char *find_dup(const char **s, int n);
static int cmp_str(const void *a, const void *b);
static int cmp_tensor_name(const void *a, const void *b);
static int cmp_tensor_key(const void *key, const void *elem);
static char *dupstr(const char *s);

size_t st_dtype_size(st_dtype d)
{
    return (unsigned)d < ST_NUM_DTYPES ? dtype_sizes[d] : 0;
}

const char *st_dtype_name(st_dtype d)
{
    return (unsigned)d < ST_NUM_DTYPES ? dtype_names[d] : "?";
}

/* ======================================================================== reader */

jm_status st_parse(const uint8_t *buf, size_t len, const char *name, st_file *f, jm_error *err)
{
    memset(f, 0, sizeof *f);
    if (!name) name = "<buffer>";
    snprintf(f->path, sizeof f->path, "%s", name);

    if (len < 8)
        return jm_fail(err, JM_ERR_FORMAT, "%s: file is shorter than 8 bytes (%zu bytes)", name, len);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | buf[i];
    if (n < 2) /* the smallest header is "{}" */
        return jm_fail(err, JM_ERR_FORMAT, "%s: header length %" PRIu64 " is too small", name, n);
    if (n > (uint64_t)len - 8)
        return jm_fail(err, JM_ERR_FORMAT,
                       "%s: header length %" PRIu64 " past end of file (size %zu)", name, n, len);
    if (n > ST_MAX_HEADER)
        return jm_fail(err, JM_ERR_FORMAT, "%s: header length %" PRIu64 " exceeds the %u-byte limit",
                       name, n, ST_MAX_HEADER);

    const uint8_t *hdr = buf + 8;
    if (hdr[0] != '{')
        return jm_fail(err, JM_ERR_FORMAT,
                       "%s: header is not a JSON object (first byte 0x%02x, expected '{')", name, hdr[0]);
    size_t bad = utf8_check(hdr, (size_t)n);
    if (bad < n)
        return jm_fail(err, JM_ERR_FORMAT,
                       "%s: header is not valid UTF-8 (byte 0x%02x at header offset %zu)", name,
                       hdr[bad], bad);
    /* JSON allows no raw control characters anywhere but whitespace; cJSON would skip them as
     * whitespace, so refuse them here (NUL also ends C strings early). */
    for (size_t i = 0; i < n; i++) {
        uint8_t c = hdr[i];
        if (c == 0)
            return jm_fail(err, JM_ERR_FORMAT, "%s: NUL byte in header at offset %zu", name, i);
        if (c < 0x20 && c != '\t' && c != '\n' && c != '\r')
            return jm_fail(err, JM_ERR_FORMAT,
                           "%s: control character 0x%02x in header at offset %zu", name, c, i);
    }

    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts((const char *)hdr, (size_t)n, &end, 0);
    if (!root) {
        size_t at = end ? (size_t)(end - (const char *)hdr) : 0;
        return jm_fail(err, JM_ERR_FORMAT, "%s: header is not valid JSON (error near header offset %zu)",
                       name, at);
    }
    /* The format pads with spaces; any JSON whitespace is accepted, as serde_json does. */
    for (const char *p = end; p < (const char *)hdr + n; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            cJSON_Delete(root);
            return jm_fail(err, JM_ERR_FORMAT,
                           "%s: unexpected bytes after the JSON object at header offset %zu", name,
                           (size_t)(p - (const char *)hdr));
        }
    }
    if (!cJSON_IsObject(root)) { /* cannot happen after the '{' check; kept for clarity */
        cJSON_Delete(root);
        return jm_fail(err, JM_ERR_FORMAT, "%s: header is not a JSON object", name);
    }
    /* cJSON would end a name at an escaped NUL: "emb\u0000junk" would load as "emb" */
    jm_status nul = jm_json_no_nul((const char *)hdr, (size_t)n, name, err);
    if (nul) {
        cJSON_Delete(root);
        return nul;
    }

    uint64_t data_len = (uint64_t)len - 8 - n;
    jm_status s = parse_header(root, buf + 8 + n, data_len, name, f, err);
    cJSON_Delete(root);
    if (s != JM_OK) st_close(f);
    return s;
}

jm_status st_open(const char *path, st_file *f, jm_error *err)
{
    memset(f, 0, sizeof *f);
    if (strlen(path) >= sizeof f->path) return jm_fail(err, JM_ERR_ARG, "%s: path too long", path);
    int fd;
    size_t len;
    jm_status os = jm_open_regular(path, &fd, &len, err);
    if (os) return os;
    void *map = NULL;
    if (len > 0) { /* mmap of length 0 fails; st_parse reports the short file */
        map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            jm_status s = jm_fail(err, JM_ERR_IO, "%s: mmap failed: %s", path, strerror(errno));
            close(fd);
            return s;
        }
        /* Ask for 2 MB pages: a file not yet in the page cache is then read
         * into 2 MB folios, which the kernel maps with one entry each. Decoding
         * reads gigabytes at scattered offsets, and behind 4 KB entries a
         * virtual machine's address translation, not its memory, bounded one
         * thread to 5 GB/s on the 8B layout's BF16 experts (16 GB mapped; 13 to
         * 21 GB/s from 2 MB folios, AMD EPYC family 26 model 2). Best effort:
         * the kernel may not have transparent huge pages. */
        madvise(map, len, MADV_HUGEPAGE);
    }
    close(fd); /* the mapping keeps the file alive */
    static const uint8_t empty[1];
    jm_status s = st_parse(map ? (const uint8_t *)map : empty, len, path, f, err);
    if (s != JM_OK) {
        if (map) munmap(map, len);
        return s;
    }
    f->map = map;
    f->map_len = len;
    return JM_OK;
}

void st_close(st_file *f)
{
    if (!f) return;
    for (int i = 0; i < f->n; i++) free(f->t[i].name);
    free(f->t);
    for (int i = 0; i < f->n_meta; i++) {
        free(f->meta_key[i]);
        free(f->meta_val[i]);
    }
    free(f->meta_key);
    free(f->meta_val);
    if (f->map) munmap(f->map, f->map_len);
    memset(f, 0, sizeof *f);
}

const st_tensor *st_find(const st_file *f, const char *name)
{
    if (!f || !name || f->n == 0) return NULL;
    return bsearch(name, f->t, (size_t)f->n, sizeof *f->t, cmp_tensor_key);
}

const char *st_meta(const st_file *f, const char *key)
{
    if (!f || !key) return NULL;
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_key[i], key) == 0) return f->meta_val[i];
    return NULL;
}

jm_status st_to_f32(const st_tensor *t, float *out, jm_error *err)
{
    size_t n = (size_t)t->numel;
    const uint8_t *p = t->data; /* may be unaligned: assemble each element from bytes */
    switch (t->dtype) {
    case ST_F32:
        if (n) memcpy(out, p, n * 4);
        return JM_OK;
    case ST_BF16:
        for (size_t i = 0; i < n; i++)
            out[i] = jm_bf16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
        return JM_OK;
    case ST_F16:
        for (size_t i = 0; i < n; i++)
            out[i] = jm_f16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
        return JM_OK;
    default:
        return jm_fail(err, JM_ERR_FORMAT, "tensor '%s': dtype %s cannot be converted to F32 "
                       "(only F32, BF16, F16)", t->name, st_dtype_name(t->dtype));
    }
}

/* ======================================================================== writer */

/* A growable string for the header. */
typedef struct {
    char *p;
    size_t len, cap;
    bool oom;
} strbuf;

static void sb_put(strbuf *b, const char *s, size_t n);
static void sb_puts(strbuf *b, const char *s);
static void sb_printf(strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_json_str(strbuf *b, const char *s);
static jm_status check_out(const char *path, const st_out *t, int n, const char *const *meta_keys,
                           const char *const *meta_vals, int n_meta, jm_error *err);
static uint64_t out_bytes(const st_out *o);

jm_status st_write(const char *path, const st_out *t, int n, const char *const *meta_keys,
                   const char *const *meta_vals, int n_meta, jm_error *err)
{
    jm_status s = check_out(path, t, n, meta_keys, meta_vals, n_meta, err);
    if (s != JM_OK) return s;

    strbuf b = {0};
    sb_puts(&b, "{");
    if (n_meta > 0) {
        sb_puts(&b, "\"__metadata__\":{");
        for (int i = 0; i < n_meta; i++) {
            if (i) sb_puts(&b, ",");
            sb_json_str(&b, meta_keys[i]);
            sb_puts(&b, ":");
            sb_json_str(&b, meta_vals[i]);
        }
        sb_puts(&b, "}");
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        uint64_t bytes = out_bytes(&t[i]);
        if (i || n_meta > 0) sb_puts(&b, ",");
        sb_json_str(&b, t[i].name);
        sb_printf(&b, ":{\"dtype\":\"%s\",\"shape\":[", st_dtype_name(t[i].dtype));
        for (int d = 0; d < t[i].ndim; d++) sb_printf(&b, "%s%" PRId64, d ? "," : "", t[i].shape[d]);
        sb_printf(&b, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", off, off + bytes);
        off += bytes;
    }
    sb_puts(&b, "}");
    /* Pad so the data section starts 8-byte aligned in the file (and in an mmap of it). */
    while ((8 + b.len) % 8) sb_puts(&b, " ");
    if (b.oom) {
        free(b.p);
        return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory building the header", path);
    }

    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)b.len >> (8 * i));
    jm_atomic_file a;
    s = jm_atomic_open(&a, path, err);
    if (s != JM_OK) {
        free(b.p);
        return s;
    }
    s = jm_atomic_write(&a, len8, 8, err);
    if (s == JM_OK) s = jm_atomic_write(&a, b.p, b.len, err);
    for (int i = 0; i < n && s == JM_OK; i++) {
        uint64_t bytes = out_bytes(&t[i]);
        if (bytes) s = jm_atomic_write(&a, t[i].data, (size_t)bytes, err);
    }
    free(b.p);
    if (s != JM_OK) {
        jm_atomic_abort(&a); /* leaves no temp file behind */
        return s;
    }
    return jm_atomic_commit(&a, err);
}

/* ======================================================================== sharded sets */

typedef struct {
    const char *tensor, *shard; /* point into the parsed index */
    int file;                   /* index into s->files */
} index_entry;

static jm_status set_open_index(const char *dir, const char *index_path, st_set *s, jm_error *err);
static int cmp_entry_shard(const void *a, const void *b);
static int cmp_entry_tensor(const void *a, const void *b);

jm_status st_set_open(const char *dir, st_set *s, jm_error *err)
{
    memset(s, 0, sizeof *s);
    char single[4096], index[4096];
    if (snprintf(single, sizeof single, "%s/%s", dir, ST_SINGLE_NAME) >= (int)sizeof single ||
        snprintf(index, sizeof index, "%s/%s", dir, ST_INDEX_NAME) >= (int)sizeof index)
        return jm_fail(err, JM_ERR_ARG, "%s: path too long", dir);

    /* Same precedence as HF transformers: a single model.safetensors wins over an index. */
    struct stat st;
    if (stat(single, &st) == 0) {
        s->files = calloc(1, sizeof *s->files);
        if (!s->files) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", single);
        jm_status r = st_open(single, &s->files[0], err);
        if (r != JM_OK) {
            st_set_close(s);
            return r;
        }
        s->nfiles = 1;
        return JM_OK;
    }
    if (errno != ENOENT) return jm_fail(err, JM_ERR_IO, "%s: %s", single, strerror(errno));
    if (stat(index, &st) == 0) return set_open_index(dir, index, s, err);
    if (errno != ENOENT) return jm_fail(err, JM_ERR_IO, "%s: %s", index, strerror(errno));
    return jm_fail(err, JM_ERR_IO, "no %s or %s in %s", ST_SINGLE_NAME, ST_INDEX_NAME, dir);
}

void st_set_close(st_set *s)
{
    if (!s) return;
    for (int i = 0; i < s->nfiles; i++) st_close(&s->files[i]);
    free(s->files);
    memset(s, 0, sizeof *s);
}

void st_set_release_pages(st_set *s)
{
    /* MADV_DONTNEED on a private mapping nothing wrote to: only the page
     * table entries go, the file's pages stay in the page cache */
    for (int i = 0; s && i < s->nfiles; i++)
        if (s->files[i].map) madvise(s->files[i].map, s->files[i].map_len, MADV_DONTNEED);
}

const st_tensor *st_set_find(const st_set *s, const char *name, const char **file)
{
    /* st_set_open checked that each name lives in exactly one file. */
    for (int i = 0; s && i < s->nfiles; i++) {
        const st_tensor *t = st_find(&s->files[i], name);
        if (t) {
            if (file) *file = s->files[i].path;
            return t;
        }
    }
    return NULL;
}

/* ======================================================================== reader helpers */

static jm_status parse_header(const cJSON *root, const uint8_t *data, uint64_t data_len,
                              const char *name, st_file *f, jm_error *err)
{
    int count = 0;
    const cJSON *meta = NULL;
    for (const cJSON *e = root->child; e; e = e->next) {
        if (strcmp(e->string, "__metadata__") != 0) {
            count++;
        } else if (meta) {
            return jm_fail(err, JM_ERR_FORMAT, "%s: duplicate \"__metadata__\" in header", name);
        } else {
            meta = e;
        }
    }
    if (meta) {
        jm_status s = parse_meta(meta, name, f, err);
        if (s != JM_OK) return s;
    }

    if (count > 0) {
        f->t = calloc((size_t)count, sizeof *f->t);
        if (!f->t) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory for %d tensors", name, count);
    }
    for (const cJSON *e = root->child; e; e = e->next) {
        if (e == meta) continue;
        if (e->string[0] == 0)
            return jm_fail(err, JM_ERR_FORMAT, "%s: tensor with an empty name", name);
        st_tensor *t = &f->t[f->n];
        t->name = dupstr(e->string);
        if (!t->name) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", name);
        f->n++; /* counted now so st_close frees the name on any later failure */
        jm_status s = parse_entry(e, data_len, name, t, err);
        if (s != JM_OK) return s;
        t->data = data + t->begin;
    }

    if (f->n > 1) qsort(f->t, (size_t)f->n, sizeof *f->t, cmp_tensor_name);
    for (int i = 1; i < f->n; i++)
        if (strcmp(f->t[i - 1].name, f->t[i].name) == 0)
            return jm_fail(err, JM_ERR_FORMAT, "%s: duplicate tensor name '%s'", name, f->t[i].name);
    return check_tiling(f, data_len, name, err);
}

static jm_status parse_entry(const cJSON *e, uint64_t data_len, const char *name, st_tensor *t,
                             jm_error *err)
{
    const char *tn = t->name;
    if (!cJSON_IsObject(e))
        return jm_fail(err, JM_ERR_FORMAT, "%s: tensor '%s': entry is not a JSON object", name, tn);
    const cJSON *dtype = NULL, *shape = NULL, *offs = NULL;
    for (const cJSON *c = e->child; c; c = c->next) {
        const cJSON **slot = strcmp(c->string, "dtype") == 0          ? &dtype
                             : strcmp(c->string, "shape") == 0        ? &shape
                             : strcmp(c->string, "data_offsets") == 0 ? &offs
                                                                      : NULL;
        if (!slot) continue; /* unknown fields are ignored, as the reference does */
        if (*slot)
            return jm_fail(err, JM_ERR_FORMAT, "%s: tensor '%s': \"%s\" given twice", name, tn,
                           c->string);
        *slot = c;
    }

    if (!dtype) return jm_fail(err, JM_ERR_FORMAT, "%s: tensor '%s': missing \"dtype\"", name, tn);
    if (!cJSON_IsString(dtype))
        return jm_fail(err, JM_ERR_FORMAT, "%s: tensor '%s': \"dtype\" is not a string", name, tn);
    int d = 0;
    while (d < ST_NUM_DTYPES && strcmp(dtype->valuestring, dtype_names[d]) != 0) d++;
    if (d == ST_NUM_DTYPES)
        return jm_fail(err, JM_ERR_FORMAT, "%s: tensor '%s': unknown dtype \"%s\"", name, tn,
                       dtype->valuestring);
    t->dtype = (st_dtype)d;

    if (!cJSON_IsArray(shape))
        return jm_fail(err, JM_ERR_FORMAT, "%s: tensor '%s': %s \"shape\"", name, tn,
                       shape ? "non-array" : "missing");
    char why[96];
    uint64_t numel = 1;
    bool overflow = false;
    for (const cJSON *c = shape->child; c; c = c->next) {
        if (t->ndim == ST_MAX_DIMS)
            return jm_fail(err, JM_ERR_FORMAT, "%s: tensor '%s': shape has more than %d dims", name,
                           tn, ST_MAX_DIMS);
        uint64_t v;
        if (!json_uint(c, &v, why, sizeof why))
            return jm_fail(err, JM_ERR_FORMAT, "%s: tensor '%s': shape[%d] %s", name, tn, t->ndim, why);
        /* Checked in order, like the reference's checked_mul fold: an overflow is an error even if
         * a later dim is 0. */
        if (v != 0 && numel > (uint64_t)INT64_MAX / v) overflow = true;
        numel *= v;
        t->shape[t->ndim++] = (int64_t)v;
        if (overflow)
            return jm_fail(err, JM_ERR_FORMAT, "%s: tensor '%s': element count of shape overflows",
                           name, tn);
    }
    t->numel = (int64_t)numel;
    size_t esize = dtype_sizes[d];
    if (numel > UINT64_MAX / esize)
        return jm_fail(err, JM_ERR_FORMAT, "%s: tensor '%s': byte size of shape overflows", name, tn);
    uint64_t bytes = numel * esize;

    if (!cJSON_IsArray(offs) || !offs->child || !offs->child->next || offs->child->next->next)
        return jm_fail(err, JM_ERR_FORMAT,
                       "%s: tensor '%s': \"data_offsets\" must be an array of 2 integers", name, tn);
    for (int i = 0; i < 2; i++) {
        const cJSON *c = i ? offs->child->next : offs->child;
        if (!json_uint(c, i ? &t->end : &t->begin, why, sizeof why))
            return jm_fail(err, JM_ERR_FORMAT, "%s: tensor '%s': data_offsets[%d] %s", name, tn, i, why);
    }
    if (t->begin > t->end)
        return jm_fail(err, JM_ERR_FORMAT,
                       "%s: tensor '%s': data_offsets begin %" PRIu64 " > end %" PRIu64, name, tn,
                       t->begin, t->end);
    if (t->end > data_len)
        return jm_fail(err, JM_ERR_FORMAT,
                       "%s: tensor '%s': data_offsets end %" PRIu64
                       " past end of data section (%" PRIu64 " bytes)", name, tn, t->end, data_len);
    if (t->end - t->begin != bytes)
        return jm_fail(err, JM_ERR_FORMAT,
                       "%s: tensor '%s': data_offsets span %" PRIu64 " bytes but %" PRIu64
                       " elements of %s need %" PRIu64, name, tn, t->end - t->begin, numel,
                       dtype_names[d], bytes);
    return JM_OK;
}

static jm_status parse_meta(const cJSON *m, const char *name, st_file *f, jm_error *err)
{
    if (!cJSON_IsObject(m))
        return jm_fail(err, JM_ERR_FORMAT, "%s: \"__metadata__\" is not a JSON object", name);
    int count = 0;
    for (const cJSON *c = m->child; c; c = c->next) {
        if (!cJSON_IsString(c))
            return jm_fail(err, JM_ERR_FORMAT, "%s: \"__metadata__\" value for key '%s' is not a string",
                           name, c->string);
        count++;
    }
    if (count == 0) return JM_OK;
    f->meta_key = calloc((size_t)count, sizeof *f->meta_key);
    f->meta_val = calloc((size_t)count, sizeof *f->meta_val);
    if (!f->meta_key || !f->meta_val) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", name);
    for (const cJSON *c = m->child; c; c = c->next) {
        int i = f->n_meta++;
        f->meta_key[i] = dupstr(c->string);
        f->meta_val[i] = dupstr(c->valuestring);
        if (!f->meta_key[i] || !f->meta_val[i])
            return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", name);
    }
    const char **keys = malloc((size_t)count * sizeof *keys);
    if (!keys) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", name);
    memcpy(keys, f->meta_key, (size_t)count * sizeof *keys);
    const char *dup = find_dup(keys, count);
    jm_status s = dup ? jm_fail(err, JM_ERR_FORMAT, "%s: duplicate \"__metadata__\" key '%s'", name, dup)
                      : JM_OK;
    free(keys);
    return s;
}

static int cmp_by_offset(const void *a, const void *b)
{
    const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name); /* zero-size tensors at one offset: a fixed order */
}

/* Sorted by offset, the tensors must cover [0, data_len) exactly: every byte belongs to exactly
 * one tensor. Zero-size tensors may sit at any boundary. */
static jm_status check_tiling(const st_file *f, uint64_t data_len, const char *name, jm_error *err)
{
    if (f->n == 0) {
        if (data_len == 0) return JM_OK;
        return jm_fail(err, JM_ERR_FORMAT,
                       "%s: %" PRIu64 " trailing bytes in data section but there are no tensors", name,
                       data_len);
    }
    const st_tensor **by = malloc((size_t)f->n * sizeof *by);
    if (!by) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", name);
    for (int i = 0; i < f->n; i++) by[i] = &f->t[i];
    qsort(by, (size_t)f->n, sizeof *by, cmp_by_offset);

    jm_status s = JM_OK;
    uint64_t pos = 0; /* == prev->end: every accepted tensor began at pos */
    const st_tensor *prev = NULL;
    for (int i = 0; i < f->n && s == JM_OK; i++) {
        const st_tensor *t = by[i];
        if (t->begin > pos && prev)
            s = jm_fail(err, JM_ERR_FORMAT,
                        "%s: gap of %" PRIu64 " bytes between tensors '%s' (ends at %" PRIu64
                        ") and '%s' (begins at %" PRIu64 ")", name, t->begin - pos, prev->name, pos,
                        t->name, t->begin);
        else if (t->begin > pos)
            s = jm_fail(err, JM_ERR_FORMAT,
                        "%s: gap of %" PRIu64 " bytes before the first tensor '%s'", name, t->begin,
                        t->name);
        else if (t->begin < pos)
            s = jm_fail(err, JM_ERR_FORMAT,
                        "%s: tensors '%s' [%" PRIu64 ", %" PRIu64 ") and '%s' [%" PRIu64 ", %" PRIu64
                        ") overlap", name, prev->name, prev->begin, prev->end, t->name, t->begin,
                        t->end);
        pos = t->end;
        prev = t;
    }
    if (s == JM_OK && pos != data_len)
        s = jm_fail(err, JM_ERR_FORMAT,
                    "%s: %" PRIu64 " trailing bytes after the last tensor '%s' (data section is %" PRIu64
                    " bytes)", name, data_len - pos, prev->name, data_len);
    free(by);
    return s;
}

/* Returns the offset of the first byte that is not part of well-formed UTF-8, or n. Rejects
 * overlong forms, UTF-16 surrogates, code points past U+10FFFF and truncated sequences. */
static size_t utf8_check(const uint8_t *s, size_t n)
{
    size_t i = 0, k;
    while (i < n && (k = jm_utf8_char(s + i, n - i))) i += k;
    return i;
}

/* A JSON integer in [0, 2^53]. On failure writes the reason (e.g. "is negative (-1)") to why. */
static bool json_uint(const cJSON *v, uint64_t *out, char *why, size_t why_len)
{
    if (!cJSON_IsNumber(v)) {
        snprintf(why, why_len, "is not a number");
        return false;
    }
    double d = v->valuedouble;
    if (!isfinite(d) || d != floor(d)) {
        snprintf(why, why_len, "is not an integer (%.17g)", d);
        return false;
    }
    if (d < 0) {
        snprintf(why, why_len, "is negative (%.17g)", d);
        return false;
    }
    if (d > ST_MAX_INT) {
        snprintf(why, why_len, "is too large (%.17g > 2^53)", d);
        return false;
    }
    *out = (uint64_t)d;
    return true;
}

/* ======================================================================== shared helpers */

/* Sorts s in place and returns a string that occurs twice, or NULL. */
static const char *find_dup(const char **s, int n)
{
    if (n < 2) return NULL;
    qsort(s, (size_t)n, sizeof *s, cmp_str);
    for (int i = 1; i < n; i++)
        if (strcmp(s[i - 1], s[i]) == 0) return s[i];
    return NULL;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int cmp_tensor_name(const void *a, const void *b)
{
    return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

static int cmp_tensor_key(const void *key, const void *elem)
{
    return strcmp((const char *)key, ((const st_tensor *)elem)->name);
}

static char *dupstr(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

/* ======================================================================== writer helpers */

/* Everything the reader would reject is an argument error here, so a file we write always
 * reads back. Checked before the temp file is created. */
static jm_status check_out(const char *path, const st_out *t, int n, const char *const *meta_keys,
                           const char *const *meta_vals, int n_meta, jm_error *err)
{
    if (!path) return jm_fail(err, JM_ERR_ARG, "st_write: NULL path");
    if (n < 0 || (n > 0 && !t) || n_meta < 0 || (n_meta > 0 && (!meta_keys || !meta_vals)))
        return jm_fail(err, JM_ERR_ARG, "%s: bad tensor or metadata list (n=%d, n_meta=%d)", path, n,
                       n_meta);
    for (int i = 0; i < n_meta; i++) {
        if (!meta_keys[i] || !meta_vals[i])
            return jm_fail(err, JM_ERR_ARG, "%s: metadata pair %d has a NULL key or value", path, i);
        if (utf8_check((const uint8_t *)meta_keys[i], strlen(meta_keys[i])) < strlen(meta_keys[i]) ||
            utf8_check((const uint8_t *)meta_vals[i], strlen(meta_vals[i])) < strlen(meta_vals[i]))
            return jm_fail(err, JM_ERR_ARG, "%s: metadata pair %d is not valid UTF-8", path, i);
    }
    uint64_t total = 0;
    for (int i = 0; i < n; i++) {
        const st_out *o = &t[i];
        const char *tn = o->name ? o->name : "(null)";
        if (!o->name || !o->name[0] || strcmp(o->name, "__metadata__") == 0)
            return jm_fail(err, JM_ERR_ARG, "%s: tensor %d has an invalid name '%s'", path, i, tn);
        if (utf8_check((const uint8_t *)o->name, strlen(o->name)) < strlen(o->name))
            return jm_fail(err, JM_ERR_ARG, "%s: tensor %d: name is not valid UTF-8", path, i);
        if ((unsigned)o->dtype >= ST_NUM_DTYPES)
            return jm_fail(err, JM_ERR_ARG, "%s: tensor '%s': bad dtype %d", path, tn, (int)o->dtype);
        if (o->ndim < 0 || o->ndim > ST_MAX_DIMS)
            return jm_fail(err, JM_ERR_ARG, "%s: tensor '%s': ndim %d out of range [0, %d]", path, tn,
                           o->ndim, ST_MAX_DIMS);
        uint64_t numel = 1;
        for (int d = 0; d < o->ndim; d++) {
            int64_t v = o->shape[d];
            if (v < 0 || (double)v > ST_MAX_INT)
                return jm_fail(err, JM_ERR_ARG, "%s: tensor '%s': shape[%d] = %" PRId64 " out of range",
                               path, tn, d, v);
            if (v != 0 && numel > (uint64_t)INT64_MAX / (uint64_t)v)
                return jm_fail(err, JM_ERR_ARG, "%s: tensor '%s': element count overflows", path, tn);
            numel *= (uint64_t)v;
        }
        /* The reader refuses offsets past 2^53, so the whole data section must stay below it. */
        if (numel > (uint64_t)ST_MAX_INT || out_bytes(o) > (uint64_t)ST_MAX_INT - total)
            return jm_fail(err, JM_ERR_ARG, "%s: tensor '%s': data too large", path, tn);
        uint64_t bytes = out_bytes(o);
        total += bytes;
        if (bytes > 0 && !o->data)
            return jm_fail(err, JM_ERR_ARG, "%s: tensor '%s': NULL data for %" PRIu64 " bytes", path,
                           tn, bytes);
    }
    if (n < 2 && n_meta < 2) return JM_OK;
    /* One scan for duplicates among tensor names and metadata keys, separately. */
    const char **names = malloc((size_t)(n > n_meta ? n : n_meta) * sizeof *names);
    if (!names) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
    for (int i = 0; i < n; i++) names[i] = t[i].name;
    const char *dup = find_dup(names, n);
    jm_status s = JM_OK;
    if (dup) {
        s = jm_fail(err, JM_ERR_ARG, "%s: duplicate tensor name '%s'", path, dup);
    } else {
        for (int i = 0; i < n_meta; i++) names[i] = meta_keys[i];
        dup = find_dup(names, n_meta);
        if (dup) s = jm_fail(err, JM_ERR_ARG, "%s: duplicate metadata key '%s'", path, dup);
    }
    free(names);
    return s;
}

/* Byte size of a tensor check_out accepted (so no overflow). */
static uint64_t out_bytes(const st_out *o)
{
    uint64_t bytes = st_dtype_size(o->dtype);
    for (int d = 0; d < o->ndim; d++) bytes *= (uint64_t)o->shape[d];
    return bytes;
}

static void sb_put(strbuf *b, const char *s, size_t n)
{
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void sb_puts(strbuf *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static void sb_printf(strbuf *b, const char *fmt, ...)
{
    char tmp[128]; /* callers format only short numbers and dtype names */
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (k < 0 || (size_t)k >= sizeof tmp) {
        b->oom = true;
        return;
    }
    sb_put(b, tmp, (size_t)k);
}

/* A JSON string literal: quotes, backslashes and control characters escaped; UTF-8 passed as is. */
static void sb_json_str(strbuf *b, const char *s)
{
    sb_puts(b, "\"");
    for (const char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            sb_put(b, esc, 2);
        } else if (c < 0x20) {
            sb_printf(b, "\\u%04x", c);
        } else {
            sb_put(b, p, 1);
        }
    }
    sb_puts(b, "\"");
}

/* ======================================================================== set helpers */

/* A shard must be a plain file name inside dir: no directories, no "." or "..". */
static bool plain_file_name(const char *s)
{
    return s[0] && strchr(s, '/') == NULL && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

static jm_status set_open_index(const char *dir, const char *index_path, st_set *s, jm_error *err)
{
    char *text = NULL;
    size_t len = 0;
    jm_status r = jm_read_file(index_path, ST_MAX_INDEX, &text, &len, err);
    if (r != JM_OK) return r;
    cJSON *root = NULL;
    r = jm_json_parse(text, len, index_path, &root, err);
    if (r == JM_OK && (r = jm_json_no_nul(text, len, index_path, err))) cJSON_Delete(root);
    free(text); /* cJSON copies every string it keeps */
    if (r != JM_OK) return r;

    index_entry *ent = NULL;
    int n = 0;
    const cJSON *wm = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
    if (!cJSON_IsObject(root)) {
        r = jm_fail(err, JM_ERR_FORMAT, "%s: not a JSON object", index_path);
        goto done;
    }
    if (!cJSON_IsObject(wm)) {
        r = jm_fail(err, JM_ERR_FORMAT, "%s: %s \"weight_map\" object", index_path,
                    wm ? "non-object" : "missing");
        goto done;
    }
    for (const cJSON *c = wm->child; c; c = c->next) {
        if (!cJSON_IsString(c)) {
            r = jm_fail(err, JM_ERR_FORMAT, "%s: weight_map entry for tensor '%s' is not a string",
                        index_path, c->string);
            goto done;
        }
        if (!plain_file_name(c->valuestring)) {
            r = jm_fail(err, JM_ERR_FORMAT,
                        "%s: shard '%s' for tensor '%s' is not a plain file name in the directory",
                        index_path, c->valuestring, c->string);
            goto done;
        }
        n++;
    }
    if (n == 0) {
        r = jm_fail(err, JM_ERR_FORMAT, "%s: weight_map lists no tensors", index_path);
        goto done;
    }
    ent = malloc((size_t)n * sizeof *ent);
    if (!ent) {
        r = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", index_path);
        goto done;
    }
    n = 0;
    /* (jm_json_parse already rejected duplicate tensor names) */
    for (const cJSON *c = wm->child; c; c = c->next) ent[n++] = (index_entry){c->string, c->valuestring, -1};

    /* Each distinct shard is opened once: sorted by shard, a new name starts a new file. */
    qsort(ent, (size_t)n, sizeof *ent, cmp_entry_shard);
    int nshards = 0;
    for (int i = 0; i < n; i++)
        if (i == 0 || strcmp(ent[i].shard, ent[i - 1].shard) != 0) nshards++;
    s->files = calloc((size_t)nshards, sizeof *s->files);
    if (!s->files) {
        r = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", index_path);
        goto done;
    }
    for (int i = 0; i < n; i++) {
        if (i == 0 || strcmp(ent[i].shard, ent[i - 1].shard) != 0) {
            char path[4096];
            if (snprintf(path, sizeof path, "%s/%s", dir, ent[i].shard) >= (int)sizeof path) {
                r = jm_fail(err, JM_ERR_ARG, "%s/%s: path too long", dir, ent[i].shard);
                goto done;
            }
            r = st_open(path, &s->files[s->nfiles], err);
            if (r != JM_OK) goto done;
            s->nfiles++;
        }
        ent[i].file = s->nfiles - 1;
        if (!st_find(&s->files[ent[i].file], ent[i].tensor)) {
            r = jm_fail(err, JM_ERR_FORMAT, "%s: tensor '%s' listed in index for shard %s but absent",
                        index_path, ent[i].tensor, ent[i].shard);
            goto done;
        }
    }

    /* The other direction: every tensor in a shard is listed, and listed with that shard. This
     * also rules out a name held by two shards, since the index names only one. */
    qsort(ent, (size_t)n, sizeof *ent, cmp_entry_tensor);
    for (int k = 0; k < s->nfiles; k++) {
        const st_file *f = &s->files[k];
        for (int i = 0; i < f->n; i++) {
            index_entry key = {f->t[i].name, NULL, -1};
            const index_entry *e = bsearch(&key, ent, (size_t)n, sizeof *ent, cmp_entry_tensor);
            if (!e) {
                r = jm_fail(err, JM_ERR_FORMAT, "%s: shard %s holds tensor '%s' not in the index",
                            index_path, f->path, f->t[i].name);
                goto done;
            }
            if (e->file != k) {
                r = jm_fail(err, JM_ERR_FORMAT,
                            "%s: shard %s holds tensor '%s', which the index assigns to shard %s",
                            index_path, f->path, f->t[i].name, e->shard);
                goto done;
            }
        }
    }
    r = JM_OK;
done:
    free(ent);
    cJSON_Delete(root);
    if (r != JM_OK) st_set_close(s);
    return r;
}

static int cmp_entry_shard(const void *a, const void *b)
{
    const index_entry *x = a, *y = b;
    int c = strcmp(x->shard, y->shard);
    return c ? c : strcmp(x->tensor, y->tensor);
}

static int cmp_entry_tensor(const void *a, const void *b)
{
    return strcmp(((const index_entry *)a)->tensor, ((const index_entry *)b)->tensor);
}
