/* data.h — token shards and the mixture sampler (data.c), used by the
 * training loop (train.c) and `jetmoe prepare` (prepare.c). */
#ifndef JM_DATA_H
#define JM_DATA_H

#include "base/base.h"

/* Token shard file (*.bin), little-endian:
 *   offset 0  char[8]  magic "JMTOKENS"
 *          8  u32      version (1)
 *         12  u32      bytes per token: 2 (u16, vocab <= 65536) or 4 (u32)
 *         16  u64      token count n
 *         24  u32      vocab size the ids were made with
 *         28  u32      EOS id (separates documents)
 *         32  u8[32]   zero (reserved)
 *         64  tokens   n * bytes-per-token
 * Documents are concatenated, each followed by EOS. */
#define JM_SHARD_MAGIC "JMTOKENS"
#define JM_SHARD_HEADER 64

typedef struct {
    void *map;
    size_t map_len;
    int bytes_per_token;
    uint64_t n;
    uint32_t vocab_size, eos_id;
    const uint8_t *tokens;
    char path[4096];
} jm_shard;

jm_status jm_shard_open(const char *path, jm_shard *s, jm_error *err);
void jm_shard_close(jm_shard *s);
static inline uint32_t jm_shard_token(const jm_shard *s, uint64_t i)
{
    if (s->bytes_per_token == 2) return (uint32_t)s->tokens[2 * i] | (uint32_t)s->tokens[2 * i + 1] << 8;
    const uint8_t *p = s->tokens + 4 * i;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
/* The token shards of dir: the paths of its *.bin files in name order
 * (hidden entries left out), as the sampler, the recipe check and evaluation
 * read them; free with jm_free_names. A directory of `prepare --part` pieces
 * must be a whole set: every part's manifest there and agreeing with the
 * others (the same inputs and tokenizer), every shard it lists present at
 * its size and no other part shard; else an error such as
 * "DIR: part 2/4 missing". */
jm_status jm_shard_list(const char *dir, char ***paths, int *n, jm_error *err);

/* The names prepare writes into a shard directory (prepare.c writes them,
 * jm_shard_list reads them):
 *   shard_SSSSS.bin, manifest.json                       one prepare's set
 *   part-IIIII-of-NNNNN.shard_SSSSS.bin,                  part I of N
 *   part-IIIII-of-NNNNN.manifest.json                     (prepare --part I/N)
 * Shards sort in stream order by name: part 1's before part 2's. The kind of
 * the entry called name; *part, *nparts (1 <= part <= nparts <= JM_MAX_PARTS)
 * and *shard are set where the name has them. */
typedef enum {
    JM_ENTRY_OTHER,
    JM_ENTRY_SHARD,
    JM_ENTRY_MANIFEST,
    JM_ENTRY_PART_SHARD,
    JM_ENTRY_PART_MANIFEST,
} jm_shard_entry;
#define JM_MAX_PARTS 99999
#define JM_MAX_SHARDS 99999 /* SSSSS */
#define JM_MANIFEST_FORMAT "jetmoe.c token shards v1"
jm_shard_entry jm_shard_entry_kind(const char *name, int *part, int *nparts, int *shard);

/* A shard written as a stream: the header first with a zero count, the ids
 * after it, the count patched in before the atomic rename, so no shard is
 * ever held in memory. Ids are checked against the vocabulary as they come. */
typedef struct {
    jm_atomic_file a;
    int bytes_per_token;
    uint32_t vocab_size, eos_id;
    uint64_t n;
} jm_shard_writer;
jm_status jm_shard_writer_open(jm_shard_writer *w, const char *path, uint32_t vocab_size, uint32_t eos_id,
                               jm_error *err);
jm_status jm_shard_writer_put(jm_shard_writer *w, const int32_t *ids, uint64_t n, jm_error *err);
jm_status jm_shard_writer_commit(jm_shard_writer *w, jm_error *err); /* on error the temp file is gone */

/* Writes ids as a shard, atomically. */
jm_status jm_shard_write(const char *path, const int32_t *ids, uint64_t n, uint32_t vocab_size, uint32_t eos_id,
                         jm_error *err);

/* The mixture sampler: named sources, each a directory of shards (read in
 * file-name order as one stream). Each draw takes the next seq_len
 * consecutive tokens of one source (wrapping around at its end), choosing the
 * source whose realised share lags its weight the most (deterministic, and
 * exact in the long run; ties go to the lower index). The seed offsets each
 * source's starting position. Its whole state is a few numbers per source
 * (jm_sampler_state), saved in checkpoints so a resumed run draws exactly
 * what the uninterrupted run would have. */
typedef struct jm_sampler jm_sampler;

jm_status jm_sampler_open(const char *const *names, const char *const *dirs, int nsources, int seq_len,
                          uint64_t seed, uint32_t vocab_size, jm_sampler **out, jm_error *err);
void jm_sampler_free(jm_sampler *s);
/* Weights per source (>= 0, at least one > 0; normalised inside). Changing
 * the mixture (a new phase) keeps positions and restarts the share accounting. */
jm_status jm_sampler_set_mixture(jm_sampler *s, const double *weights, jm_error *err);
/* Fills tokens[0 .. seq_len-1]; *source gets the source index. */
void jm_sampler_next(jm_sampler *s, int32_t *tokens, int *source);
int jm_sampler_num_sources(const jm_sampler *s);
uint32_t jm_sampler_eos_id(const jm_sampler *s); /* the EOS id every source's shards share */
uint64_t jm_sampler_source_tokens(const jm_sampler *s, int i); /* tokens available in source i */

/* Cursor state as plain numbers, for the trainer's checkpoint: per source
 * (position, drawn sequences since the mixture was set, total drawn tokens). */
typedef struct {
    int nsources;
    uint64_t *position, *drawn, *total;
} jm_sampler_state;
jm_status jm_sampler_get_state(const jm_sampler *s, jm_sampler_state *st, jm_error *err); /* arrays malloc'd */
jm_status jm_sampler_set_state(jm_sampler *s, const jm_sampler_state *st, jm_error *err);
void jm_sampler_state_free(jm_sampler_state *st);

/* jm_prepare (`jetmoe prepare`) is declared in include/jetmoe.h and implemented in prepare.c. */

/* One JSONL record (a line without its newline) -> its string field named
 * field (a top-level key), all of it: a "\u0000" escape is kept as a NUL byte
 * (cJSON's strings would end there). *text is malloc'd, NUL-terminated, *n
 * bytes long (0: "text": ""). where ("file:line") begins every message; a
 * record without that string field is an error naming it. prepare reads
 * each record through this (prepare.c, --text-field); jm_jsonl_text is it
 * for "text". */
jm_status jm_jsonl_field(const char *line, size_t len, const char *field, const char *where, char **text, size_t *n,
                         jm_error *err);
jm_status jm_jsonl_text(const char *line, size_t len, const char *where, char **text, size_t *n, jm_error *err);

/* A recipe's JSON -> jm_recipe, everything in the text checked (types,
 * integers, ranges, unknown keys) but nothing opened; name begins every
 * message. jm_recipe_load is this plus the files the run needs (train.c). */
jm_status jm_recipe_parse(const char *text, size_t len, const char *name, jm_recipe **out, jm_error *err);

#endif
