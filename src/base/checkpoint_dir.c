/* checkpoint_dir.c — where a checkpoint is: the path a user gives (a model
 * directory, a training run, its checkpoints/ folder or checkpoints/latest)
 * -> the model directory (config.json + *.safetensors) it means.
 *
 * A run directory's checkpoints/latest holds "step_N", the newest complete
 * checkpoint (src/train/train.c writes it). Only that exact form is followed:
 * a latest file naming "../elsewhere" or an absolute path is refused, so a
 * run directory can never send a reader (or a resume) outside itself. */
#include "base/base.h"

#include <dirent.h>
#include <errno.h>
#include <string.h>
#include <sys/stat.h>

static bool is_dir(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static bool is_file(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* "step_N": N decimal digits, no sign, no leading zeros beyond "0", at most 18. */
static bool is_step_name(const char *s, size_t n)
{
    if (n < 6 || n > 5 + 18 || memcmp(s, "step_", 5) != 0) return false;
    for (size_t i = 5; i < n; i++)
        if (s[i] < '0' || s[i] > '9') return false;
    return !(s[5] == '0' && n > 6);
}

static jm_status join(char *out, size_t cap, const char *a, const char *b, jm_error *err)
{
    if ((size_t)snprintf(out, cap, "%s/%s", a, b) >= cap) return jm_fail(err, JM_ERR_ARG, "%s: path too long", a);
    return JM_OK;
}

jm_status jm_read_latest(const char *ckpt_dir, char *out, size_t cap, jm_error *err)
{
    char path[4200], buf[64];
    jm_status s = join(path, sizeof path, ckpt_dir, "latest", err);
    if (s) return s;
    FILE *f = fopen(path, "rb");
    if (!f) return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) n--;
    if (!is_step_name(buf, n))
        return jm_fail(err, JM_ERR_FORMAT, "%s: expected one line \"step_N\" (the newest checkpoint's folder)", path);
    buf[n] = 0;
    if ((s = join(out, cap, ckpt_dir, buf, err))) return s;
    if (!is_dir(out)) return jm_fail(err, JM_ERR_IO, "%s names %s, which is not a directory", path, out);
    return JM_OK;
}

/* A run's checkpoints/ folder as the trainer leaves it: latest (and its
 * temporary files), step_N and step_N.tmp.XXXXXX directories that hold only
 * checkpoint files. A fresh run over an old one (overwrite) removes it whole. */
int jm_checkpoints_dir_proof(const char *path, const char *name)
{
    (void)name;
    DIR *d = opendir(path);
    if (!d) return 0;
    int ok = 1;
    for (struct dirent *e; ok && (e = readdir(d));) {
        const char *n = e->d_name, *tmp = strstr(n, ".tmp.");
        if (!strcmp(n, ".") || !strcmp(n, "..")) continue;
        size_t base = tmp ? (size_t)(tmp - n) : strlen(n);
        char p[4400];
        struct stat st;
        ok = (!tmp || strlen(tmp) == 11) && (size_t)snprintf(p, sizeof p, "%s/%s", path, n) < sizeof p &&
             lstat(p, &st) == 0;
        if (ok && base == 6 && !strncmp(n, "latest", 6)) ok = S_ISREG(st.st_mode);
        else if (ok && is_step_name(n, base)) ok = S_ISDIR(st.st_mode) && jm_dir_holds_only(p, &jm_checkpoint_files);
        else ok = 0;
    }
    closedir(d);
    return ok;
}

jm_status jm_checkpoint_resolve(const char *path, char *out, size_t cap, jm_error *err)
{
    char probe[4200];
    jm_status s;
    struct stat st;
    if (stat(path, &st) != 0) return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    const char *slash = strrchr(path, '/'), *base = slash ? slash + 1 : path;
    if (!S_ISDIR(st.st_mode)) {
        if (strcmp(base, "latest") == 0) { /* RUN/checkpoints/latest */
            char dir[4096];
            size_t dl = slash ? (size_t)(slash - path) : 1;
            if (dl >= sizeof dir) return jm_fail(err, JM_ERR_ARG, "%s: path too long", path);
            memcpy(dir, slash ? path : ".", dl);
            dir[dl] = 0;
            return jm_read_latest(dir, out, cap, err);
        }
        return jm_fail(err, JM_ERR_ARG, "%s is a file: expected a model directory (config.json + *.safetensors)%s",
                       path, slash ? ", such as the folder that holds it" : "");
    }
    if ((s = join(probe, sizeof probe, path, "config.json", err))) return s;
    if (is_file(probe)) {
        if (strlen(path) >= cap) return jm_fail(err, JM_ERR_ARG, "%s: path too long", path);
        memcpy(out, path, strlen(path) + 1);
        return JM_OK;
    }
    /* a run directory, or its checkpoints/ folder */
    if ((s = join(probe, sizeof probe, path, "checkpoints/latest", err))) return s;
    if (is_file(probe)) {
        if ((s = join(probe, sizeof probe, path, "checkpoints", err))) return s;
        return jm_read_latest(probe, out, cap, err);
    }
    if ((s = join(probe, sizeof probe, path, "latest", err))) return s;
    if (is_file(probe)) return jm_read_latest(path, out, cap, err);
    return jm_fail(err, JM_ERR_ARG,
                   "%s: expected a model directory (config.json + *.safetensors) or a training run (checkpoints/latest)",
                   path);
}
