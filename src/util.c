/* util.c — errors, whole-file reads, atomic writes, half-precision conversion. */
#include "internal.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

const char *jm_status_name(jm_status s)
{
    switch (s) {
    case JM_OK: return "ok";
    case JM_ERR_IO: return "I/O error";
    case JM_ERR_FORMAT: return "format error";
    case JM_ERR_CONFIG: return "config error";
    case JM_ERR_SHAPE: return "shape error";
    case JM_ERR_ARG: return "bad argument";
    case JM_ERR_NOMEM: return "out of memory";
    }
    return "unknown error";
}

jm_status jm_fail(jm_error *err, jm_status s, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        /* one line: messages may quote file content */
        for (char *p = err->msg; *p; p++)
            if (*p == '\n' || *p == '\r') *p = ' ';
    }
    return s;
}

jm_status jm_open_regular(const char *path, int *fd_out, size_t *size, jm_error *err)
{
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer
     * before we could see that it is not a regular file */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return jm_fail(err, JM_ERR_IO, "%s: not a regular file", path);
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0) fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    *fd_out = fd;
    *size = (size_t)st.st_size;
    return JM_OK;
}

jm_status jm_read_file(const char *path, size_t max_len, char **out, size_t *len, jm_error *err)
{
    *out = NULL;
    int fd;
    size_t n;
    jm_status s = jm_open_regular(path, &fd, &n, err);
    if (s) return s;
    if (n > max_len) {
        close(fd);
        return jm_fail(err, JM_ERR_FORMAT, "%s: file too large (%zu bytes, limit %zu)", path, n, max_len);
    }
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        close(fd);
        return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    }
    char *buf = malloc(n + 1);
    if (!buf) {
        fclose(f);
        return jm_fail(err, JM_ERR_NOMEM, "%s: cannot allocate %zu bytes", path, n + 1);
    }
    size_t got = fread(buf, 1, n, f);
    fclose(f);
    if (got != n) {
        free(buf);
        return jm_fail(err, JM_ERR_IO, "%s: short read", path);
    }
    buf[n] = 0;
    *out = buf;
    if (len) *len = n;
    return JM_OK;
}

jm_status jm_atomic_open(jm_atomic_file *a, const char *path, jm_error *err)
{
    memset(a, 0, sizeof *a);
    if (strlen(path) >= sizeof a->path) return jm_fail(err, JM_ERR_ARG, "%s: path too long", path);
    snprintf(a->path, sizeof a->path, "%s", path);
    /* a fresh, exclusive temp name beside the target (same filesystem, so the
     * rename is atomic; mkstemp never follows a planted symlink) */
    snprintf(a->tmp, sizeof a->tmp, "%s.tmp.XXXXXX", path);
    int fd = mkstemp(a->tmp);
    if (fd < 0) {
        jm_status s = jm_fail(err, JM_ERR_IO, "%s: cannot create a temporary file: %s", path, strerror(errno));
        a->tmp[0] = 0;
        return s;
    }
    fchmod(fd, 0644);
    a->f = fdopen(fd, "wb");
    if (!a->f) {
        close(fd);
        unlink(a->tmp);
        a->tmp[0] = 0;
        return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    }
    return JM_OK;
}

jm_status jm_atomic_write(jm_atomic_file *a, const void *buf, size_t len, jm_error *err)
{
    if (len && fwrite(buf, 1, len, a->f) != len)
        return jm_fail(err, JM_ERR_IO, "%s: write failed: %s", a->tmp, strerror(errno));
    return JM_OK;
}

void jm_atomic_abort(jm_atomic_file *a)
{
    if (a->f) fclose(a->f);
    a->f = NULL;
    if (a->tmp[0]) unlink(a->tmp);
}

static void fsync_dir_of(const char *path)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    int fd = open(dirname(buf), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd); /* best effort: makes the rename itself durable */
        close(fd);
    }
}

jm_status jm_atomic_commit(jm_atomic_file *a, jm_error *err)
{
    if (fflush(a->f) != 0 || fsync(fileno(a->f)) != 0) {
        jm_status s = jm_fail(err, JM_ERR_IO, "%s: flush failed: %s", a->tmp, strerror(errno));
        jm_atomic_abort(a);
        return s;
    }
    int rc = fclose(a->f);
    a->f = NULL;
    if (rc != 0 || rename(a->tmp, a->path) != 0) {
        jm_status s = jm_fail(err, JM_ERR_IO, "%s: cannot finish write: %s", a->path, strerror(errno));
        unlink(a->tmp);
        return s;
    }
    fsync_dir_of(a->path);
    return JM_OK;
}

jm_status jm_mkdir_p(const char *dir, jm_error *err)
{
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", dir) >= (int)sizeof buf)
        return jm_fail(err, JM_ERR_ARG, "%s: path too long", dir);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0777) != 0 && errno != EEXIST)
            return jm_fail(err, JM_ERR_IO, "%s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0777) != 0 && errno != EEXIST)
        return jm_fail(err, JM_ERR_IO, "%s: %s", buf, strerror(errno));
    return JM_OK;
}

float jm_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t jm_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

float jm_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: renormalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even; overflow becomes infinity, NaN stays NaN, tiny
 * values become F16 subnormals or zero. */
uint16_t jm_f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504 */
    if (a < 0x38800000u) { /* below 2^-14: subnormal, in units of 2^-24 */
        if (a < 0x33000000u) return (uint16_t)sign; /* below half the smallest subnormal */
        uint32_t man = (a & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(a >> 23); /* 14 .. 24: the 24-bit significand in units of 2^-24 */
        uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((a >> 13) - ((127 - 15) << 10)), rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

/* Removes a directory of plain files (a checkpoint), or a plain file. */
void jm_remove_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) { /* a plain file (e.g. a stale temp of `latest`) */
        unlink(dir);
        return;
    }
    struct dirent *e;
    char path[8192];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    rmdir(dir);
}

void jm_fsync_path(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

/* ---- JSON ---- */

static bool valid_utf8(const unsigned char *s, size_t len, size_t *bad)
{
    for (size_t i = 0; i < len;) {
        unsigned c = s[i];
        size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!n || i + n > len || (n == 2 && c < 0xc2) || (n == 4 && c > 0xf4)) goto fail;
        for (size_t k = 1; k < n; k++)
            if ((s[i + k] >> 6) != 2) goto fail;
        if (n == 3) { /* overlong and surrogates */
            unsigned cp = ((c & 0x0fu) << 12) | ((s[i + 1] & 0x3fu) << 6) | (s[i + 2] & 0x3fu);
            if (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff)) goto fail;
        }
        if (n == 4) {
            unsigned cp = ((c & 0x07u) << 18) | ((s[i + 1] & 0x3fu) << 12);
            if (cp < 0x10000 || cp > 0x10ffff) goto fail;
        }
        i += n;
        continue;
    fail:
        *bad = i;
        return false;
    }
    return true;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* cJSON keeps every duplicate key; Python's json (and so Hugging Face) keeps
 * the last. Rather than silently pick one, reject them. Sorting the keys keeps
 * this O(n log n) for 32000-entry vocabularies. Returns 1 when found (*dup set),
 * -1 when out of memory. */
static int duplicate_key(const cJSON *j, const char **dup)
{
    size_t n = 0;
    for (const cJSON *a = j->child; a; a = a->next) {
        n++;
        if (a->child) {
            int r = duplicate_key(a, dup);
            if (r) return r;
        }
    }
    if (!cJSON_IsObject(j) || n < 2) return 0;
    const char **keys = malloc(n * sizeof *keys);
    if (!keys) return -1;
    n = 0;
    for (const cJSON *a = j->child; a; a = a->next) keys[n++] = a->string;
    qsort(keys, n, sizeof *keys, cmp_str);
    int found = 0;
    for (size_t i = 1; i < n && !found; i++)
        if (strcmp(keys[i - 1], keys[i]) == 0) {
            *dup = keys[i]; /* points into the tree, which outlives this call */
            found = 1;
        }
    free(keys);
    return found;
}

jm_status jm_json_parse(const char *text, size_t len, const char *file, cJSON **out, jm_error *err)
{
    *out = NULL;
    size_t bad = 0;
    if (memchr(text, 0, len)) return jm_fail(err, JM_ERR_FORMAT, "%s: NUL byte in JSON", file);
    if (!valid_utf8((const unsigned char *)text, len, &bad))
        return jm_fail(err, JM_ERR_FORMAT, "%s: not valid UTF-8 at byte %zu", file, bad);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!root) {
        size_t at = end && end >= text ? (size_t)(end - text) : 0;
        return jm_fail(err, JM_ERR_FORMAT, "%s: malformed JSON near byte %zu", file, at);
    }
    while (end < text + len && (*end == ' ' || *end == '\n' || *end == '\r' || *end == '\t')) end++;
    if (end < text + len) {
        cJSON_Delete(root);
        return jm_fail(err, JM_ERR_FORMAT, "%s: malformed JSON: trailing data at byte %zu", file,
                       (size_t)(end - text));
    }
    const char *dup = NULL;
    int d = duplicate_key(root, &dup);
    if (d) {
        jm_status s = d < 0 ? jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", file)
                            : jm_fail(err, JM_ERR_FORMAT, "%s: duplicate key \"%s\"", file, dup);
        cJSON_Delete(root);
        return s;
    }
    *out = root;
    return JM_OK;
}

jm_status jm_write_json(const char *path, const cJSON *root, jm_error *err)
{
    char *text = root ? cJSON_Print(root) : NULL;
    if (!text) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
    jm_atomic_file a;
    jm_status s = jm_atomic_open(&a, path, err);
    if (!s) {
        if ((s = jm_atomic_write(&a, text, strlen(text), err)) || (s = jm_atomic_write(&a, "\n", 1, err)))
            jm_atomic_abort(&a);
        else
            s = jm_atomic_commit(&a, err);
    }
    cJSON_free(text);
    return s;
}

jm_status jm_copy_file(const char *src, const char *dst, jm_error *err)
{
    char *buf;
    size_t len = 0;
    jm_status s = jm_read_file(src, (size_t)1 << 30, &buf, &len, err);
    if (s) return s;
    jm_atomic_file a;
    if (!(s = jm_atomic_open(&a, dst, err))) {
        if ((s = jm_atomic_write(&a, buf, len, err)))
            jm_atomic_abort(&a);
        else
            s = jm_atomic_commit(&a, err);
    }
    free(buf);
    return s;
}
