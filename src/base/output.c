/* output.c — what a command may write where (README: "What writes where").
 *
 * Every output a user names is judged here before a byte is written:
 *   a file (forward --dump)                        jm_output_file
 *   a model directory, replaced whole              jm_output_dir_open / _commit / _abort  (init, quantize)
 *   named entries in a directory                   jm_output_entries_check / _clear       (tokenizer train,
 *                                                                                          prepare, pretrain)
 * The rule is the same for all: nothing the command reads (its inputs) is
 * ever replaced or removed; an existing file or result is replaced only with
 * overwrite, and only when it is provably this program's; a FIFO or character
 * device is written through, never renamed over (file.c); a symlink the user
 * names is followed to the file it names.
 *
 * Inputs are compared by device and inode (a symlink or hard link to a model
 * file is that file) and by real path (a directory stands for every file
 * under it). */
#include "base/base.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- the inputs ---- */

typedef struct {
    dev_t dev;
    ino_t ino;
    int input; /* index into the caller's inputs */
    int self;  /* the input itself, not a file in it */
} file_id;

typedef struct {
    const char *const *paths;
    int n;
    file_id *ids; /* each input, and each regular file directly in an input directory */
    int nids, capids;
    char **real;  /* real path of each input (NULL when it does not exist) */
    int *is_dir;
} input_set;

#define MAX_DIR_ENTRIES 100000 /* per input directory, for the inode table; deeper files go by real path */

static bool add_id(input_set *in, const struct stat *st, int input, int self)
{
    if (in->nids == in->capids) {
        int cap = in->capids ? 2 * in->capids : 64;
        file_id *v = realloc(in->ids, (size_t)cap * sizeof *v);
        if (!v) return false;
        in->ids = v;
        in->capids = cap;
    }
    in->ids[in->nids++] = (file_id){st->st_dev, st->st_ino, input, self};
    return true;
}

static void inputs_free(input_set *in)
{
    for (int i = 0; in->real && i < in->n; i++) free(in->real[i]);
    free(in->real);
    free(in->is_dir);
    free(in->ids);
    memset(in, 0, sizeof *in);
}

/* Inputs that do not exist are skipped: the command's reader reports them. */
static jm_status inputs_collect(input_set *in, const char *const *paths, int n, jm_error *err)
{
    memset(in, 0, sizeof *in);
    in->paths = paths;
    in->n = n;
    in->real = calloc(n > 0 ? (size_t)n : 1, sizeof *in->real);
    in->is_dir = calloc(n > 0 ? (size_t)n : 1, sizeof *in->is_dir);
    bool ok = in->real && in->is_dir;
    for (int i = 0; i < n && ok; i++) {
        struct stat st;
        if (!paths[i] || stat(paths[i], &st) != 0) continue;
        ok = add_id(in, &st, i, 1);
        in->real[i] = realpath(paths[i], NULL);
        in->is_dir[i] = S_ISDIR(st.st_mode);
        DIR *d = in->is_dir[i] ? opendir(paths[i]) : NULL;
        int count = 0;
        for (struct dirent *e; ok && d && count < MAX_DIR_ENTRIES && (e = readdir(d)); count++) {
            char *p = jm_path_join(paths[i], e->d_name);
            struct stat es;
            if (!p) ok = false;
            else if (stat(p, &es) == 0 && S_ISREG(es.st_mode)) ok = add_id(in, &es, i, 0);
            free(p);
        }
        if (d) closedir(d);
    }
    if (!ok) {
        inputs_free(in);
        return jm_fail(err, JM_ERR_NOMEM, "out of memory listing the inputs");
    }
    return JM_OK;
}

/* real is under (or is) the directory dir_real */
static bool under(const char *real, const char *dir_real)
{
    size_t n = strlen(dir_real);
    if (n == 1 && dir_real[0] == '/') return real[0] == '/';
    return strncmp(real, dir_real, n) == 0 && (real[n] == 0 || real[n] == '/');
}

/* The input that the existing path (stat st, real path real) is, or -1: the
 * same file, or a file under an input directory (then *inside = 1). */
static int input_at(const input_set *in, const struct stat *st, const char *real, int *inside)
{
    for (int i = 0; i < in->nids; i++)
        if (in->ids[i].dev == st->st_dev && in->ids[i].ino == st->st_ino) {
            *inside = !in->ids[i].self;
            return in->ids[i].input;
        }
    *inside = 1;
    for (int i = 0; real && !S_ISDIR(st->st_mode) && i < in->n; i++)
        if (in->real[i] && in->is_dir[i] && under(real, in->real[i])) return i;
    return -1;
}

/* The input that lies in the directory real (or is it), or -1. */
static int input_within(const input_set *in, const char *real)
{
    for (int i = 0; real && i < in->n; i++)
        if (in->real[i] && under(in->real[i], real)) return i;
    return -1;
}

/* The input that path (stat st, real path real) is, is in or holds, or -1;
 * the refusal, when there is one, says which. */
static int input_clash(const input_set *in, const struct stat *st, const char *real, const char *path,
                       jm_status *s, jm_error *err)
{
    int inside, k = input_at(in, st, real, &inside);
    const char *how = k < 0 ? "holds" : inside ? "is a file of" : "is";
    if (k < 0) k = input_within(in, real);
    if (k >= 0)
        *s = jm_fail(err, JM_ERR_ARG, "%s %s %s, which this command reads; it is never replaced: write the output "
                     "elsewhere", path, how, in->paths[k]);
    return k;
}

/* ---- a file ---- */

jm_status jm_output_file(const char *path, const char *const *inputs, int ninputs, int overwrite, char *target,
                         size_t cap, jm_error *err)
{
    struct stat lst, st;
    if (!path || !path[0]) return jm_fail(err, JM_ERR_ARG, "an empty output path");
    if (strlen(path) >= cap) return jm_fail(err, JM_ERR_ARG, "%s: path too long", path);
    if (lstat(path, &lst) != 0) {
        if (errno != ENOENT) return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
        memcpy(target, path, strlen(path) + 1); /* a new file */
        return JM_OK;
    }
    const bool link = S_ISLNK(lst.st_mode);
    if (stat(path, &st) != 0) {
        if (link && errno == ENOENT)
            return jm_fail(err, JM_ERR_ARG, "%s is a symlink to nothing; name the file to write itself", path);
        return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    }
    char *real = realpath(path, NULL);
    if (!real) return jm_fail(err, JM_ERR_IO, "%s: cannot resolve it: %s", path, strerror(errno));
    input_set in;
    jm_status s = inputs_collect(&in, inputs, ninputs, err);
    if (s) {
        free(real);
        return s;
    }
    int inside;
    if (input_at(&in, &st, real, &inside) >= 0)
        input_clash(&in, &st, real, path, &s, err);
    else if (S_ISDIR(st.st_mode) || !(S_ISREG(st.st_mode) || S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode)))
        s = jm_fail(err, JM_ERR_ARG, "%s is %s; name a file (a FIFO or a character device is written through)", path,
                    jm_node_kind(st.st_mode));
    else if (S_ISREG(st.st_mode) && !overwrite)
        s = jm_fail(err, JM_ERR_ARG, "%s exists%s%s%s; pass --overwrite to replace it", path,
                    link ? " (a symlink to " : "", link ? real : "", link ? ")" : "");
    else if (strlen(real) >= cap)
        s = jm_fail(err, JM_ERR_ARG, "%s: path too long", real);
    else /* the file itself, where it is: the temp file goes beside it, a link stays a link */
        memcpy(target, link ? real : path, strlen(link ? real : path) + 1);
    inputs_free(&in);
    free(real);
    return s;
}

/* ---- names of a set ---- */

static const char *const checkpoint_names[] = {
    "config.json", "model.safetensors", "model.safetensors.index.json", "model-#####-of-#####.safetensors",
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "trainer_state.safetensors"};
const jm_output_set jm_checkpoint_files = {"a checkpoint", checkpoint_names,
                                           (int)(sizeof checkpoint_names / sizeof *checkpoint_names), NULL};

/* name matches pattern ('#' = one digit) over pattern's whole length; returns
 * the length of name it took, or 0 */
static size_t match_prefix(const char *pattern, const char *name)
{
    size_t i = 0;
    for (; pattern[i]; i++) {
        if (!name[i]) return 0;
        if (pattern[i] == '#' ? !(name[i] >= '0' && name[i] <= '9') : pattern[i] != name[i]) return 0;
    }
    return i;
}

/* "NAME.tmp.XXXXXX" from mkstemp/mkdtemp (jm_atomic_open, the trainer's checkpoints) */
static bool temp_suffix(const char *s)
{
    if (strncmp(s, ".tmp.", 5) != 0 || strlen(s + 5) != 6) return false;
    for (const char *p = s + 5; *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z'))) return false;
    return true;
}

/* 1: name is one of set's names; 2: a temporary file of one; 0: neither */
static int set_match(const jm_output_set *set, const char *name)
{
    for (int i = 0; i < set->nnames; i++) {
        size_t n = match_prefix(set->names[i], name);
        if (n && !name[n]) return 1;
        if (n && temp_suffix(name + n)) return 2;
    }
    return 0;
}

bool jm_dir_holds_only(const char *dir, const jm_output_set *set)
{
    DIR *d = opendir(dir);
    if (!d) return false;
    bool ok = true;
    for (struct dirent *e; ok && (e = readdir(d));)
        ok = !strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") || set_match(set, e->d_name);
    closedir(d);
    return ok;
}

/* ---- named entries in a directory ---- */

/* An existing output directory: a directory (a symlink to one is followed). */
static jm_status existing_dir(const char *dir, bool *exists, jm_error *err)
{
    struct stat st;
    *exists = false;
    if (stat(dir, &st) != 0) {
        struct stat lst;
        if (errno == ENOENT && lstat(dir, &lst) == 0)
            return jm_fail(err, JM_ERR_ARG, "%s is a symlink to nothing; name the directory itself", dir);
        return errno == ENOENT ? JM_OK : jm_fail(err, JM_ERR_IO, "%s: %s", dir, strerror(errno));
    }
    if (!S_ISDIR(st.st_mode))
        return jm_fail(err, JM_ERR_ARG, "%s exists and is not a directory; name a new or existing directory", dir);
    *exists = true;
    return JM_OK;
}

jm_status jm_output_entries_check(const char *dir, const jm_output_set *set, const char *const *inputs,
                                  int ninputs, int overwrite, jm_error *err)
{
    bool exists;
    int nfound = 0;
    jm_status s = existing_dir(dir, &exists, err);
    if (s || !exists) return s;
    input_set in;
    if ((s = inputs_collect(&in, inputs, ninputs, err))) return s;
    DIR *d = opendir(dir);
    if (!d) s = jm_fail(err, JM_ERR_IO, "%s: %s", dir, strerror(errno));
    char first[256] = "";
    for (struct dirent *e; !s && d && (e = readdir(d));) {
        if (set_match(set, e->d_name) != 1) continue; /* another's file, or a temp of ours: left as it is */
        char *p = jm_path_join(dir, e->d_name), *real = p ? realpath(p, NULL) : NULL;
        struct stat st;
        if (!p) s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dir);
        else if (lstat(p, &st) != 0) s = jm_fail(err, JM_ERR_IO, "%s: %s", p, strerror(errno));
        else if (input_clash(&in, &st, real, p, &s, err) >= 0)
            ;
        else if (set->proof && !set->proof(p, e->d_name))
            s = jm_fail(err, JM_ERR_ARG, "%s was not written by jetmoe; it is never replaced, even with --overwrite: "
                        "move it or choose another output directory", p);
        else if (!nfound++)
            snprintf(first, sizeof first, "%s", e->d_name);
        free(real);
        free(p);
    }
    if (d) closedir(d);
    inputs_free(&in);
    if (!s && nfound && !overwrite)
        s = jm_fail(err, JM_ERR_ARG, "%s already holds %s (%s%s); pass --overwrite to replace it", dir, set->what,
                    first, nfound > 1 ? ", ..." : "");
    return s;
}

/* Removes path: a file, or a directory with what it holds (no symlink is
 * followed; depth-bounded: what is removed was proven ours, a shallow tree). */
static void remove_tree(const char *path, int depth)
{
    struct stat st;
    if (lstat(path, &st) != 0) return;
    if (!S_ISDIR(st.st_mode) || depth > 4) {
        if (!S_ISDIR(st.st_mode)) unlink(path);
        return;
    }
    DIR *d = opendir(path);
    for (struct dirent *e; d && (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *p = jm_path_join(path, e->d_name);
        if (p) remove_tree(p, depth + 1);
        free(p);
    }
    if (d) closedir(d);
    rmdir(path);
}

void jm_output_entries_clear(const char *dir, const jm_output_set *set)
{
    char **names;
    int n;
    if (jm_list_dir(dir, &names, &n, NULL)) return;
    for (int i = 0; i < n; i++) {
        if (!set_match(set, names[i])) continue;
        char *p = jm_path_join(dir, names[i]);
        if (p) remove_tree(p, 0);
        free(p);
    }
    jm_free_names(names, n);
    jm_fsync_path(dir);
}

/* ---- a model directory, replaced whole ---- */

/* How the stage takes dir's place at commit. */
enum { PUT_RENAME, PUT_MOVE_IN, PUT_EXCHANGE };

struct jm_output_dir {
    char dir[4096];   /* where the model goes: the path given, or an existing directory's real path */
    char stage[4200]; /* being written: "<dir>.tmp.XXXXXX" beside it, or "<dir>/.tmp.XXXXXX" in an empty one */
    int put;          /* dir absent: renamed; empty: the files moved into it (the user's directory, its
                       * inode and a shell's working directory in it, stays); a checkpoint: exchanged */
};

/* mkdtemp's name, but mkdir's mode (0777 less the umask, as any new
 * directory; mkdtemp's is 0700): the stage becomes the user's model directory. */
static int make_stage(char *path)
{
    static const char digits[] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    char *x = path + strlen(path) - 6;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t v = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ ((uint64_t)getpid() << 40);
    for (int tries = 0; tries < 1000; tries++) {
        v = v * 6364136223846793005ull + 1442695040888963407ull; /* Knuth's LCG step */
        for (int i = 0; i < 6; i++) x[i] = digits[(v >> (16 + 6 * i)) % 62];
        if (mkdir(path, 0777) == 0) return 0;
        if (errno != EEXIST) return -1;
    }
    return -1;
}

/* An existing dir may be replaced when it is empty or a checkpoint jetmoe
 * wrote: every entry (hidden ones too) one of jm_checkpoint_files' names, and
 * config.json with the weights among them. */
static jm_status check_replaceable(const char *real, const char *dir, int overwrite, int *empty, jm_error *err)
{
    DIR *d = opendir(real);
    if (!d) return jm_fail(err, JM_ERR_IO, "%s: %s", dir, strerror(errno));
    int entries = 0, config = 0, weights = 0;
    jm_status s = JM_OK;
    for (struct dirent *e; !s && (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        entries++;
        char *p = jm_path_join(real, e->d_name);
        struct stat st;
        if (!p) s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dir);
        else if (!set_match(&jm_checkpoint_files, e->d_name) || lstat(p, &st) != 0 || !S_ISREG(st.st_mode))
            s = jm_fail(err, JM_ERR_ARG, "%s holds %s, which jetmoe did not write; only a checkpoint jetmoe wrote is "
                        "replaced: choose another output directory", dir, e->d_name);
        config |= !strcmp(e->d_name, "config.json");
        weights |= !strcmp(e->d_name, "model.safetensors") || !strcmp(e->d_name, "model.safetensors.index.json");
        free(p);
    }
    closedir(d);
    if (!s && entries && !(config && weights))
        s = jm_fail(err, JM_ERR_ARG, "%s holds files but no checkpoint (config.json + model.safetensors); only a "
                    "checkpoint jetmoe wrote is replaced: choose another output directory", dir);
    if (!s && entries && !overwrite)
        s = jm_fail(err, JM_ERR_ARG, "%s holds a checkpoint; pass --overwrite to replace it", dir);
    *empty = entries == 0;
    return s;
}

jm_status jm_output_dir_open(const char *dir, const char *const *inputs, int ninputs, int overwrite,
                             jm_output_dir **out, jm_error *err)
{
    *out = NULL;
    size_t len = dir ? strlen(dir) : 0;
    while (len > 1 && dir[len - 1] == '/') len--; /* "out/" -> "out": the stage goes beside it */
    if (!len) return jm_fail(err, JM_ERR_ARG, "an empty output directory");
    if (len > 4000) return jm_fail(err, JM_ERR_ARG, "%s: path too long", dir);
    jm_output_dir *o = calloc(1, sizeof *o);
    if (!o) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    memcpy(o->dir, dir, len);
    bool exists;
    mode_t mode = 0;
    jm_status s = existing_dir(o->dir, &exists, err);
    if (!s && exists) {
        input_set in;
        char *real = realpath(o->dir, NULL);
        struct stat st = {0};
        if (!real || strlen(real) > 4000) s = jm_fail(err, JM_ERR_IO, "%s: cannot resolve it", o->dir);
        else if (!(s = inputs_collect(&in, inputs, ninputs, err))) {
            if (stat(real, &st) == 0) input_clash(&in, &st, real, o->dir, &s, err);
            inputs_free(&in);
        }
        int empty = 0;
        if (!s) s = check_replaceable(real, o->dir, overwrite, &empty, err);
        if (!s) snprintf(o->dir, sizeof o->dir, "%s", real); /* the exchange works on the directory itself */
        o->put = empty ? PUT_MOVE_IN : PUT_EXCHANGE;
        mode = st.st_mode & 07777; /* an exchanged directory keeps the permissions it had */
        free(real);
    }
    if (!s && !exists) { /* the stage goes beside it: its parent must exist */
        char parent[4096];
        snprintf(parent, sizeof parent, "%s", o->dir);
        char *slash = strrchr(parent, '/');
        if (slash && slash != parent) {
            *slash = 0;
            s = jm_mkdir_p(parent, err);
        }
    }
    if (!s) {
        snprintf(o->stage, sizeof o->stage, o->put == PUT_MOVE_IN ? "%s/.tmp.XXXXXX" : "%s.tmp.XXXXXX", o->dir);
        if (make_stage(o->stage) != 0)
            s = jm_fail(err, JM_ERR_IO, "%s: cannot create a directory to write into: %s", o->dir, strerror(errno));
        else if (o->put == PUT_EXCHANGE)
            chmod(o->stage, mode);
    }
    if (s) {
        free(o);
        return s;
    }
    *out = o;
    return JM_OK;
}

const char *jm_output_dir_stage(const jm_output_dir *o)
{
    return o->stage;
}

void jm_output_dir_abort(jm_output_dir *o)
{
    if (!o) return;
    if (o->stage[0]) jm_remove_dir(o->stage); /* made by make_stage and written only by us */
    free(o);
}

/* The stage's files into the empty dir, config.json last: until it is there
 * the directory is no checkpoint any reader would take. */
static jm_status move_in(const jm_output_dir *o, jm_error *err)
{
    char **names;
    int n;
    jm_status s = jm_list_dir(o->stage, &names, &n, err);
    for (int last = 0; last < 2 && !s; last++)
        for (int i = 0; i < n && !s; i++) {
            if ((strcmp(names[i], "config.json") == 0) != last) continue;
            char *from = jm_path_join(o->stage, names[i]), *to = jm_path_join(o->dir, names[i]);
            if (!from || !to) s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", o->dir);
            else if (rename(from, to) != 0) s = jm_fail(err, JM_ERR_IO, "%s: %s", to, strerror(errno));
            free(from);
            free(to);
        }
    jm_free_names(names, n);
    if (!s) rmdir(o->stage);
    return s;
}

jm_status jm_output_dir_commit(jm_output_dir *o, jm_error *err)
{
    jm_status s = JM_OK;
    jm_fsync_path(o->stage);
    if (o->put == PUT_MOVE_IN) {
        if (!(s = move_in(o, err))) o->stage[0] = 0;
    } else if (o->put == PUT_EXCHANGE) {
        if (renameat2(AT_FDCWD, o->stage, AT_FDCWD, o->dir, RENAME_EXCHANGE) != 0) {
            s = jm_fail(err, JM_ERR_IO, "%s: cannot replace it: %s", o->dir, strerror(errno));
        } else { /* the stage now holds the old checkpoint: its files go (only those: anyone else's stay) */
            jm_output_entries_clear(o->stage, &jm_checkpoint_files);
            if (rmdir(o->stage) == 0) o->stage[0] = 0;
        }
    } else if (rename(o->stage, o->dir) != 0) {
        s = jm_fail(err, JM_ERR_IO, "%s: cannot put the new directory in place: %s", o->dir, strerror(errno));
    } else {
        o->stage[0] = 0;
    }
    if (s) {
        jm_output_dir_abort(o);
        return s;
    }
    char parent[4200];
    snprintf(parent, sizeof parent, "%s/..", o->dir);
    jm_fsync_path(o->dir);
    jm_fsync_path(parent);
    free(o);
    return JM_OK;
}
