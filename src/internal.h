/* internal.h — declarations shared by the library's files; not installed.
 * The public contract is include/jetmoe.h. */
#ifndef JM_INTERNAL_H
#define JM_INTERNAL_H

#include "jetmoe.h"
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

/* ---- errors (util.c) ---- */
/* Fills err (may be NULL) with a printf-style message and returns s. */
jm_status jm_fail(jm_error *err, jm_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- files (util.c) ---- */
/* Opens a regular file for reading (never blocks on a FIFO); *size from fstat. */
jm_status jm_open_regular(const char *path, int *fd, size_t *size, jm_error *err);
/* Reads a whole file into a malloc'd, NUL-terminated buffer (max_len bounds it). */
jm_status jm_read_file(const char *path, size_t max_len, char **out, size_t *len, jm_error *err);

/* Atomic writes: write to "<path>.tmp.<pid>", fsync, rename over path, fsync the directory.
 * A crash at any point leaves either the old file or the new one, never a mix. */
typedef struct {
    FILE *f;
    char path[4096];
    char tmp[4200]; /* "<path>.tmp.XXXXXX" from mkstemp */
} jm_atomic_file;
jm_status jm_atomic_open(jm_atomic_file *a, const char *path, jm_error *err);
jm_status jm_atomic_write(jm_atomic_file *a, const void *buf, size_t len, jm_error *err);
jm_status jm_atomic_commit(jm_atomic_file *a, jm_error *err); /* closes; renames on success */
void jm_atomic_abort(jm_atomic_file *a);                      /* closes and removes the temp */
jm_status jm_mkdir_p(const char *dir, jm_error *err);
jm_status jm_copy_file(const char *src, const char *dst, jm_error *err); /* atomic at dst */
void jm_remove_dir(const char *dir);   /* a directory of plain files (or a plain file) */
void jm_fsync_path(const char *path); /* best effort: a file or directory */

/* Strict JSON: valid UTF-8, no NUL, nothing but whitespace after the value,
 * no duplicate keys in any object. file names the source in messages. */
struct cJSON;
jm_status jm_json_parse(const char *text, size_t len, const char *file, struct cJSON **out, jm_error *err);
/* Writes root as indented JSON plus a final newline, atomically; root may be NULL
 * (a tree that could not be built for lack of memory), which fails as out of memory. */
jm_status jm_write_json(const char *path, const struct cJSON *root, jm_error *err);

/* bf16/f16 <-> f32 */
float jm_bf16_to_f32(uint16_t h);
uint16_t jm_f32_to_bf16(float f); /* round to nearest even, NaN kept NaN */
float jm_f16_to_f32(uint16_t h);
uint16_t jm_f32_to_f16(float f); /* round to nearest even */

/* ---- safetensors (safetensors.c) ---- */
typedef enum {
    ST_BOOL, ST_U8, ST_I8, ST_I16, ST_U16, ST_F16, ST_BF16, ST_I32, ST_U32, ST_F32,
    ST_I64, ST_U64, ST_F64, ST_NUM_DTYPES
} st_dtype;

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER (100u << 20) /* 100 MiB, as the reference implementation bounds it */

typedef struct {
    char *name; /* owned, NUL-terminated */
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;
    uint64_t begin, end;  /* byte offsets within the data section */
    const uint8_t *data;  /* points into the buffer/mapping */
} st_tensor;

typedef struct {
    int n;
    st_tensor *t;
    int n_meta;            /* __metadata__ string pairs, owned */
    char **meta_key, **meta_val;
    void *map;             /* mmap'd file (NULL when parsed from a caller's buffer) */
    size_t map_len;
    char path[4096];
} st_file;

size_t st_dtype_size(st_dtype d);
const char *st_dtype_name(st_dtype d);
/* Validates and indexes a safetensors image held in memory; buf must outlive f.
 * name is used in messages. */
jm_status st_parse(const uint8_t *buf, size_t len, const char *name, st_file *f, jm_error *err);
jm_status st_open(const char *path, st_file *f, jm_error *err); /* mmap + st_parse */
void st_close(st_file *f);
const st_tensor *st_find(const st_file *f, const char *name);
const char *st_meta(const st_file *f, const char *key);
/* Converts an F32/BF16/F16 tensor's numel elements to fp32; other dtypes are an error. */
jm_status st_to_f32(const st_tensor *t, float *out, jm_error *err);

typedef struct {
    const char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data; /* numel * dtype size bytes */
} st_out;
/* Writes tensors (in the given order) + optional metadata pairs, atomically. */
jm_status st_write(const char *path, const st_out *t, int n, const char *const *meta_keys,
                   const char *const *meta_vals, int n_meta, jm_error *err);

/* A checkpoint directory: model.safetensors, or model.safetensors.index.json + shards. */
typedef struct {
    int nfiles;
    st_file *files;
} st_set;
jm_status st_set_open(const char *dir, st_set *s, jm_error *err);
void st_set_close(st_set *s);
/* Finds a tensor across the set; *file (optional) gets its file's path. */
const st_tensor *st_set_find(const st_set *s, const char *name, const char **file);

/* ---- model internals shared with quantize.c (model.c) ---- */
struct wview;
/* Parameter i's weight-matrix view as held (0 for norms, biases and routers). */
int model_param_view(const jm_model *m, int i, struct wview *w);

#endif
