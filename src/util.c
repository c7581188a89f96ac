/* util.c — errors, whole-file reads, atomic writes, half-precision conversion. */
#include "internal.h"

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

jm_status jm_read_file(const char *path, size_t max_len, char **out, size_t *len, jm_error *err)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return jm_fail(err, JM_ERR_IO, "%s: not a regular file", path);
    }
    if ((uint64_t)st.st_size > max_len) {
        fclose(f);
        return jm_fail(err, JM_ERR_FORMAT, "%s: file too large (%lld bytes, limit %zu)", path,
                       (long long)st.st_size, max_len);
    }
    size_t n = (size_t)st.st_size;
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
    snprintf(a->tmp, sizeof a->tmp, "%s.tmp.%ld", path, (long)getpid());
    a->f = fopen(a->tmp, "wb");
    if (!a->f) return jm_fail(err, JM_ERR_IO, "%s: %s", a->tmp, strerror(errno));
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
