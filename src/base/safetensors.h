/* safetensors.h — the validated safetensors reader/writer and checkpoint
 * shard sets (safetensors.c). */
#ifndef JM_SAFETENSORS_H
#define JM_SAFETENSORS_H

#include "base/base.h"

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
/* Drops the files' mapped pages from this process's page tables (the
 * mappings stay valid: a read faults its page back in from the page cache). */
void st_set_release_pages(st_set *s);
/* Finds a tensor across the set; *file (optional) gets its file's path. */
const st_tensor *st_set_find(const st_set *s, const char *name, const char **file);

#endif
