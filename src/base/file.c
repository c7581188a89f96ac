/* file.c — whole-file reads, atomic writes, directories. */
#include "base/base.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

/* A stdio stream over fd (closed on failure). */
static jm_status stream_of(const char *path, int fd, FILE **f, jm_error *err)
{
    if (!(*f = fdopen(fd, "rb"))) {
        close(fd);
        return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    }
    return JM_OK;
}

jm_status jm_fopen_regular(const char *path, FILE **f, jm_error *err)
{
    int fd = -1;
    size_t n = 0;
    jm_status s = jm_open_regular(path, &fd, &n, err);
    return s ? s : stream_of(path, fd, f, err);
}

jm_status jm_read_file(const char *path, size_t max_len, char **out, size_t *len, jm_error *err)
{
    *out = NULL;
    int fd = -1;
    size_t n = 0;
    jm_status s = jm_open_regular(path, &fd, &n, err);
    if (s) return s;
    if (n > max_len) {
        close(fd);
        return jm_fail(err, JM_ERR_FORMAT, "%s: file too large (%zu bytes, limit %zu)", path, n, max_len);
    }
    FILE *f;
    if ((s = stream_of(path, fd, &f, err))) return s;
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

const char *jm_node_kind(unsigned mode)
{
    return S_ISDIR(mode) ? "a directory" : S_ISBLK(mode) ? "a block device" : S_ISSOCK(mode) ? "a socket"
                                                                           : "not a regular file";
}

/* A FIFO or character device is written in place: renaming over it would
 * replace the node (as root, /dev/null itself). O_NONBLOCK so that a FIFO
 * without a reader is an error, not a wait. */
static jm_status open_through(jm_atomic_file *a, const char *path, mode_t mode, jm_error *err)
{
    if (!S_ISFIFO(mode) && !S_ISCHR(mode))
        return jm_fail(err, JM_ERR_IO, "%s is %s; a file, a FIFO or a character device is written", path,
                       jm_node_kind(mode));
    int fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0 && errno == ENXIO)
        return jm_fail(err, JM_ERR_IO, "%s is a FIFO with no reader; start the reader first", path);
    if (fd < 0) return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0) fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    if (!(a->f = fdopen(fd, "wb"))) {
        close(fd);
        return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    }
    a->through = 1;
    return JM_OK;
}

jm_status jm_atomic_open(jm_atomic_file *a, const char *path, jm_error *err)
{
    memset(a, 0, sizeof *a);
    if (strlen(path) >= sizeof a->path) return jm_fail(err, JM_ERR_ARG, "%s: path too long", path);
    snprintf(a->path, sizeof a->path, "%s", path);
    struct stat st; /* lstat: a symlink itself is replaced, as any file (jm_output_file follows a user's links) */
    if (lstat(path, &st) == 0 && !S_ISREG(st.st_mode) && !S_ISLNK(st.st_mode))
        return open_through(a, path, st.st_mode, err);
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
        return jm_fail(err, JM_ERR_IO, "%s: write failed: %s", a->through ? a->path : a->tmp, strerror(errno));
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
    if (a->through) { /* nothing to sync or rename: a pipe or a device */
        int rc = fflush(a->f);
        rc |= fclose(a->f);
        a->f = NULL;
        return rc ? jm_fail(err, JM_ERR_IO, "%s: write failed: %s", a->path, strerror(errno)) : JM_OK;
    }
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

char *jm_path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    size_t k = a;
    if (a && dir[a - 1] != '/') p[k++] = '/';
    memcpy(p + k, name, b + 1);
    return p;
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Entries of dir except hidden ones ("." and ".." included), sorted bytewise
 * so every run, file system and locale sees the same order. */
jm_status jm_list_dir(const char *dir, char ***names, int *n, jm_error *err)
{
    *names = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d) return jm_fail(err, JM_ERR_IO, "%s: %s", dir, strerror(errno));
    char **v = NULL;
    int cnt = 0, cap = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.') continue;
        if (cnt == cap) {
            cap = cap ? 2 * cap : 64;
            char **nv = realloc(v, (size_t)cap * sizeof *nv);
            if (!nv) goto oom;
            v = nv;
        }
        if (!(v[cnt] = strdup(e->d_name))) goto oom;
        cnt++;
    }
    closedir(d);
    if (cnt) qsort(v, (size_t)cnt, sizeof *v, cmp_name);
    *names = v;
    *n = cnt;
    return JM_OK;
oom:
    closedir(d);
    jm_free_names(v, cnt);
    return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory listing the directory", dir);
}

void jm_free_names(char **names, int n)
{
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
}
