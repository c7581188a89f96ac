/* base.h — the base room's declarations shared by every other room: errors,
 * files, JSON, half-precision conversion. Not installed; the public contract
 * is include/jetmoe.h. */
#ifndef JM_BASE_H
#define JM_BASE_H

#include "jetmoe.h"
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- errors (error.c) ---- */
/* jm_fail is in jetmoe.h. The length (1-4) of the well-formed UTF-8 character
 * at s (n bytes left), or 0: no overlongs, surrogates or code points past U+10FFFF. */
size_t jm_utf8_char(const uint8_t *s, size_t n);

/* ---- files (file.c) ---- */
/* Opens a regular file for reading (never blocks on a FIFO); *size from fstat. */
jm_status jm_open_regular(const char *path, int *fd, size_t *size, jm_error *err);
/* jm_open_regular as a stdio stream, for reading line by line. */
jm_status jm_fopen_regular(const char *path, FILE **f, jm_error *err);
/* Reads a whole file into a malloc'd, NUL-terminated buffer (max_len bounds it). */
jm_status jm_read_file(const char *path, size_t max_len, char **out, size_t *len, jm_error *err);

/* Atomic writes: write to "<path>.tmp.XXXXXX", fsync, rename over path, fsync the directory.
 * A crash at any point leaves either the old file or the new one, never a mix.
 * A FIFO or character device at path (a reader's pipe, /dev/null) is written
 * through instead, never renamed over: the node stays what it is; any other
 * kind of node (a directory, a block device, a socket) is refused. */
typedef struct {
    FILE *f;
    char path[4096];
    char tmp[4200]; /* "<path>.tmp.XXXXXX" from mkstemp; "" when writing through */
    int through;    /* path is a FIFO or character device, written in place */
} jm_atomic_file;
jm_status jm_atomic_open(jm_atomic_file *a, const char *path, jm_error *err);
jm_status jm_atomic_write(jm_atomic_file *a, const void *buf, size_t len, jm_error *err);
jm_status jm_atomic_commit(jm_atomic_file *a, jm_error *err); /* closes; renames on success */
void jm_atomic_abort(jm_atomic_file *a);                      /* closes and removes the temp */
jm_status jm_mkdir_p(const char *dir, jm_error *err);
jm_status jm_copy_file(const char *src, const char *dst, jm_error *err); /* atomic at dst */
void jm_remove_dir(const char *dir);   /* a directory of plain files (or a plain file) */
void jm_fsync_path(const char *path); /* best effort: a file or directory */
/* Entries of dir except hidden ones (names starting with '.'), sorted bytewise
 * so every run, file system and locale sees the same order; free with jm_free_names. */
jm_status jm_list_dir(const char *dir, char ***names, int *n, jm_error *err);
void jm_free_names(char **names, int n);
/* What a node that is not a regular file is, for messages ("a directory", "a
 * block device", "a socket", else "not a regular file"); mode is st_mode. */
const char *jm_node_kind(unsigned mode);
/* "dir/name" (one '/' between), malloc'd; NULL when out of memory. */
char *jm_path_join(const char *dir, const char *name);
/* A run's checkpoints/latest -> "<ckpt_dir>/step_N" in out; only the exact
 * form step_N is accepted, and it must be a directory (checkpoint_dir.c). */
jm_status jm_read_latest(const char *ckpt_dir, char *out, size_t cap, jm_error *err);

/* ---- outputs a user names (output.c; README: What writes where) ---- */
/* The entries a command writes into an output directory, by name ('#' in a
 * name matches one digit). proof, when not NULL, says whether the existing
 * entry at path is provably this program's (a shard's magic, a manifest's
 * format field): only such an entry is replaced or removed, even with overwrite. */
typedef struct {
    const char *what;          /* for messages: "a tokenizer", "token shards", "a training run" */
    const char *const *names;
    int nnames;
    int (*proof)(const char *path, const char *name);
} jm_output_set;
/* What jetmoe writes into a model directory: config.json, model.safetensors or
 * its index and shards, the tokenizer files, trainer_state.safetensors. */
extern const jm_output_set jm_checkpoint_files;
/* Checks dir before a command writes set's entries into it (tokenizer train,
 * prepare, pretrain); the rest of the directory is never touched. Refused: an
 * existing dir that is not a directory; an entry of the set that is or holds
 * one of the inputs, or that fails set->proof (both even with overwrite); any
 * entry of the set present, unless overwrite. */
jm_status jm_output_entries_check(const char *dir, const jm_output_set *set, const char *const *inputs,
                                  int ninputs, int overwrite, jm_error *err);
/* Removes the entries of set found in dir (files, and directories with what
 * they hold), after a jm_output_entries_check with overwrite passed. */
void jm_output_entries_clear(const char *dir, const jm_output_set *set);
/* True when every entry of dir (hidden ones included) is one of set's names
 * or a temporary file of one ("NAME.tmp.XXXXXX"). */
bool jm_dir_holds_only(const char *dir, const jm_output_set *set);
/* The proof for a run's checkpoints/ folder: only latest, step_N and
 * step_N.tmp.XXXXXX checkpoint directories of jm_checkpoint_files (checkpoint_dir.c). */
int jm_checkpoints_dir_proof(const char *path, const char *name);

/* ---- JSON (json.c) ---- */
/* Strict JSON: valid UTF-8, no NUL, no raw control character or unknown
 * escape in a string, nothing but whitespace after the value, no duplicate
 * keys in any object. file names the source in messages. */
struct cJSON;
jm_status jm_json_parse(const char *text, size_t len, const char *file, struct cJSON **out, jm_error *err);
/* cJSON ends a string at an escaped NUL (\u0000) without a word, which would
 * silently shorten a name or a value: refuses valid JSON text that has one. */
jm_status jm_json_no_nul(const char *text, size_t len, const char *file, jm_error *err);
/* Writes root as indented JSON plus a final newline, atomically; root may be NULL
 * (a tree that could not be built for lack of memory), which fails as out of memory. */
jm_status jm_write_json(const char *path, const struct cJSON *root, jm_error *err);
/* What a JSON value is, for "... is <this>: expected ...": missing, "a
 * string" (quoted, cut at 40 bytes), a number, true, null, an array ... */
const char *jm_json_describe(const struct cJSON *j, char *buf, size_t cap);
/* jm_fail with "where: " before the message ("FILE:LINE: why"). */
__attribute__((format(printf, 4, 5))) jm_status jm_fail_at(jm_error *err, jm_status s, const char *where,
                                                           const char *fmt, ...);

/* ---- names (suggest.c, config.c) ---- */
/* Edits (insert, delete, substitute, swap two neighbours) from a to b;
 * each name is taken up to its first 64 bytes. */
size_t jm_edit_distance(const char *a, const char *b);
/* Index of the name in names[0..n) that word is most likely a typo of (few
 * edits for its length), or -1 when none is close: for "did you mean ...?". */
int jm_closest_name(const char *word, const char *const *names, int n);
/* The keys of a config.json object that mean something: those jm_config_parse
 * reads (HF and authors' spellings) and the descriptive ones jm_config_save
 * writes. *n gets the count. */
const char *const *jm_config_keys(int *n);

/* ---- bf16/f16 <-> f32 (half.c) ---- */
/* A bf16 is the top half of an fp32: inline, as the kernels' scalar code and
 * prefill's inputs widen one per element. */
static inline float jm_bf16_to_f32(uint16_t h)
{
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* Rounded to nearest even, NaN kept NaN (quiet). Inline and branch-free, so
 * that a loop of them vectorizes: a decode step stores each new K/V row
 * through it, and one call per value made those stores 1.2 us of each head's
 * 10 us of attention (bench/attention, AMD EPYC family 26 model 2). */
static inline uint16_t jm_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t even = (u + 0x7fffu + (u >> 16 & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? u >> 16 | 0x40u : even);
}
float jm_f16_to_f32(uint16_t h);
uint16_t jm_f32_to_f16(float f); /* round to nearest even */

/* ---- the decode step's threads (pool.c) ---- */
/* A job is nchunks chunks, run by calls fn(ctx, first, count, thread) of
 * chunks first .. first + count - 1, which one thread claimed together
 * (thread in [0, threads): 0 is the caller, which takes chunks too and
 * returns when all are done). Runs come in any order, each chunk once; a
 * run is consecutive chunks, so fn can treat it as one stream, and a
 * thread's runs mostly follow each other (each starts on a contiguous share
 * of the job, the caller's first). NULL (or threads 1) runs the whole job
 * inline as one run. */
typedef struct jm_pool jm_pool;
typedef void (*jm_pool_fn)(void *ctx, int64_t first, int64_t count, int thread);
jm_pool *jm_pool_create(int threads); /* NULL when out of memory or threads */
void jm_pool_free(jm_pool *p);
int jm_pool_threads(const jm_pool *p);
void jm_pool_run(jm_pool *p, int64_t nchunks, jm_pool_fn fn, void *ctx);
int jm_cpu_count(void); /* the cores this process may run on */

#endif
