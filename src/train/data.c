/* data.c — token shards, the mixture sampler, and `jetmoe prepare`.
 *
 * A shard is a 64-byte header and a flat array of little-endian token ids
 * (format in data.h). Every shard is validated whole when opened — header
 * fields, size, and every id below the vocabulary size — so that nothing
 * downstream (the embedding lookup, the loss) ever sees an id it cannot index.
 *
 * The sampler reads each source (a directory of shards) as one stream and
 * serves seq_len-token windows from it; which source serves the next draw is
 * a deterministic deficit rule, so the realised mixture tracks the weights to
 * within a draw at every step, and the whole cursor is a few integers.
 *
 * prepare tokenizes files on several threads but appends the results in input
 * order, so the shards are byte-identical for any thread count. */
#include "data.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <omp.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "data.c assumes a little-endian host (shards are little-endian)"
#endif

#define SHARD_VERSION 1
#define DEFAULT_SHARD_TOKENS 100000000ull
#define MAX_SHARDS 99999        /* shard_%05d.bin must sort in numeric order */
#define BINARY_PROBE 8192       /* a NUL byte in this many leading bytes = binary file */
#define BATCH_BYTES (2u << 20)  /* prepare encodes this much text per parallel batch */
#define BATCH_DOCS 4096

typedef struct {
    jm_atomic_file a;
    int bytes_per_token;
    uint32_t vocab_size, eos_id;
    uint64_t n;
} shard_writer;

typedef struct {
    char *name;
    char *dir;
    int nshards;
    jm_shard *shards;    /* non-empty shards only, in file-name order */
    uint64_t *start;     /* stream offset of each shard's first token */
    uint64_t tokens;     /* stream length */
    uint64_t origin;     /* seed-derived first position */
    double weight;       /* normalised */
    uint64_t position;   /* next token to serve, < tokens */
    uint64_t drawn;      /* sequences drawn since the mixture was set */
    uint64_t total;      /* tokens drawn ever */
} source;

struct jm_sampler {
    int n;
    int seq_len;
    source *src;
};

static uint32_t rd32(const uint8_t *p);
static uint64_t rd64(const uint8_t *p);
static void wr32(uint8_t *p, uint32_t v);
static void wr64(uint8_t *p, uint64_t v);
static uint64_t splitmix64(uint64_t x);
static char *dupstr(const char *s);
static char *join_path(const char *dir, const char *name);
static int cmp_str(const void *a, const void *b);
static jm_status list_dir(const char *dir, char ***names, int *n, jm_error *err);
static void free_names(char **names, int n);
static jm_status writer_open(shard_writer *w, const char *path, uint32_t vocab_size, uint32_t eos_id,
                             jm_error *err);
static jm_status writer_put(shard_writer *w, const int32_t *ids, uint64_t n, jm_error *err);
static jm_status writer_commit(shard_writer *w, jm_error *err);
static jm_status open_source(source *src, const char *name, const char *dir, uint32_t vocab_size,
                             uint32_t *eos, char *eos_from, size_t eos_from_len, jm_error *err);
static void free_source(source *src);
static void read_window(const source *src, uint64_t pos, int32_t *out, int len);

/* ==================================================================== shards */

jm_status jm_shard_open(const char *path, jm_shard *s, jm_error *err)
{
    memset(s, 0, sizeof *s);
    if (strlen(path) >= sizeof s->path) return jm_fail(err, JM_ERR_ARG, "%s: path too long", path);
    snprintf(s->path, sizeof s->path, "%s", path);
    int fd;
    size_t size;
    jm_status st = jm_open_regular(path, &fd, &size, err);
    if (st) return st;
    if (size < JM_SHARD_HEADER) {
        close(fd);
        return jm_fail(err, JM_ERR_FORMAT, "%s: truncated token shard (%zu bytes, the header alone is %d)", path,
                       size, JM_SHARD_HEADER);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return jm_fail(err, JM_ERR_IO, "%s: mmap failed: %s", path, strerror(errno));
    const uint8_t *h = map;
    uint32_t version = rd32(h + 8), bpt = rd32(h + 12), vocab = rd32(h + 24), eos = rd32(h + 28);
    uint64_t n = rd64(h + 16);
    uint64_t have = size - JM_SHARD_HEADER;
    bool reserved_zero = true;
    for (int i = 32; i < JM_SHARD_HEADER; i++) reserved_zero &= h[i] == 0;
    if (memcmp(h, JM_SHARD_MAGIC, 8) != 0)
        st = jm_fail(err, JM_ERR_FORMAT, "%s: bad magic (not a %s token shard)", path, JM_SHARD_MAGIC);
    else if (version != SHARD_VERSION)
        st = jm_fail(err, JM_ERR_FORMAT, "%s: unsupported shard version %" PRIu32 " (expected %d)", path, version,
                     SHARD_VERSION);
    else if (bpt != 2 && bpt != 4)
        st = jm_fail(err, JM_ERR_FORMAT, "%s: bytes per token is %" PRIu32 " (expected 2 or 4)", path, bpt);
    else if (vocab == 0)
        st = jm_fail(err, JM_ERR_FORMAT, "%s: vocab size is 0", path);
    else if (vocab > (uint32_t)INT32_MAX)
        st = jm_fail(err, JM_ERR_FORMAT, "%s: vocab size %" PRIu32 " too large (ids are int32)", path, vocab);
    else if (bpt == 2 && vocab > 65536)
        st = jm_fail(err, JM_ERR_FORMAT, "%s: vocab size %" PRIu32 " does not fit 2-byte tokens (max 65536)", path,
                     vocab);
    else if (eos >= vocab)
        st = jm_fail(err, JM_ERR_FORMAT, "%s: EOS id %" PRIu32 " is not below the vocab size %" PRIu32, path, eos,
                     vocab);
    else if (!reserved_zero)
        st = jm_fail(err, JM_ERR_FORMAT, "%s: reserved header bytes 32..63 are not zero", path);
    else if (have % bpt != 0 || n != have / bpt)
        st = jm_fail(err, JM_ERR_FORMAT,
                     "%s: token count mismatch: header says %" PRIu64 " tokens, the file holds %" PRIu64
                     " bytes of %" PRIu32 "-byte tokens",
                     path, n, have, bpt);
    if (st) {
        munmap(map, size);
        return st;
    }
    s->map = map;
    s->map_len = size;
    s->bytes_per_token = (int)bpt;
    s->n = n;
    s->vocab_size = vocab;
    s->eos_id = eos;
    s->tokens = h + JM_SHARD_HEADER;
    /* one pass over the ids (a vectorisable max, memory-bound): the sampler can
     * then hand ids to the model without checking each draw */
    uint32_t mx = 0;
    if (bpt == 2) {
        const uint16_t *t = (const uint16_t *)(const void *)s->tokens;
        for (uint64_t i = 0; i < n; i++) mx = t[i] > mx ? t[i] : mx;
    } else {
        const uint32_t *t = (const uint32_t *)(const void *)s->tokens;
        for (uint64_t i = 0; i < n; i++) mx = t[i] > mx ? t[i] : mx;
    }
    if (n && mx >= vocab) {
        uint64_t i = 0;
        while (jm_shard_token(s, i) < vocab) i++;
        st = jm_fail(err, JM_ERR_FORMAT, "%s: token %" PRIu64 " is id %" PRIu32 ", not below the vocab size %" PRIu32,
                     path, i, jm_shard_token(s, i), vocab);
        jm_shard_close(s);
        return st;
    }
    return JM_OK;
}

void jm_shard_close(jm_shard *s)
{
    if (s->map) munmap(s->map, s->map_len);
    s->map = NULL;
    s->tokens = NULL;
}

jm_status jm_shard_write(const char *path, const int32_t *ids, uint64_t n, uint32_t vocab_size, uint32_t eos_id,
                         jm_error *err)
{
    shard_writer w;
    jm_status st = writer_open(&w, path, vocab_size, eos_id, err);
    if (st) return st;
    st = writer_put(&w, ids, n, err);
    if (st) {
        jm_atomic_abort(&w.a);
        return st;
    }
    return writer_commit(&w, err);
}

/* ===================================================================== sampler */

jm_status jm_sampler_open(const char *const *names, const char *const *dirs, int nsources, int seq_len,
                          uint64_t seed, uint32_t vocab_size, jm_sampler **out, jm_error *err)
{
    *out = NULL;
    if (nsources < 1) return jm_fail(err, JM_ERR_ARG, "sampler: no data sources");
    if (seq_len < 1) return jm_fail(err, JM_ERR_ARG, "sampler: seq_len %d must be >= 1", seq_len);
    if (vocab_size == 0 || vocab_size > (uint32_t)INT32_MAX)
        return jm_fail(err, JM_ERR_ARG, "sampler: vocab size %" PRIu32 " out of range", vocab_size);
    for (int i = 0; i < nsources; i++) {
        if (!names[i] || !names[i][0] || !dirs[i])
            return jm_fail(err, JM_ERR_ARG, "sampler: source %d has no name or directory", i);
        for (int j = 0; j < i; j++)
            if (strcmp(names[i], names[j]) == 0)
                return jm_fail(err, JM_ERR_ARG, "sampler: source name \"%s\" given twice", names[i]);
    }
    jm_sampler *s = calloc(1, sizeof *s);
    if (!s || !(s->src = calloc((size_t)nsources, sizeof *s->src))) {
        free(s);
        return jm_fail(err, JM_ERR_NOMEM, "sampler: out of memory");
    }
    s->n = nsources;
    s->seq_len = seq_len;
    /* every source must come from the same tokenizer: same vocab (checked
     * against the model's) and the same document separator */
    uint32_t eos = 0;
    char eos_from[4096] = ""; /* the first shard read, named when another differs */
    for (int i = 0; i < nsources; i++) {
        source *src = &s->src[i];
        jm_status st = open_source(src, names[i], dirs[i], vocab_size, &eos, eos_from, sizeof eos_from, err);
        if (!st && src->tokens < (uint64_t)seq_len)
            st = jm_fail(err, JM_ERR_ARG, "%s: source \"%s\" has %" PRIu64 " tokens, fewer than seq_len %d",
                         dirs[i], names[i], src->tokens, seq_len);
        if (st) {
            jm_sampler_free(s);
            return st;
        }
        src->origin = splitmix64(seed ^ (uint64_t)i) % src->tokens;
        src->position = src->origin;
        src->weight = 1.0 / nsources; /* until jm_sampler_set_mixture */
    }
    *out = s;
    return JM_OK;
}

void jm_sampler_free(jm_sampler *s)
{
    if (!s) return;
    for (int i = 0; i < s->n; i++) free_source(&s->src[i]);
    free(s->src);
    free(s);
}

jm_status jm_sampler_set_mixture(jm_sampler *s, const double *weights, jm_error *err)
{
    double sum = 0;
    for (int i = 0; i < s->n; i++) {
        if (!isfinite(weights[i]) || weights[i] < 0)
            return jm_fail(err, JM_ERR_ARG, "mixture: weight of \"%s\" is %g (must be finite and >= 0)",
                           s->src[i].name, weights[i]);
        sum += weights[i];
    }
    if (!(sum > 0) || !isfinite(sum)) return jm_fail(err, JM_ERR_ARG, "mixture: no source has a weight > 0");
    for (int i = 0; i < s->n; i++) {
        s->src[i].weight = weights[i] / sum;
        s->src[i].drawn = 0;
    }
    return JM_OK;
}

void jm_sampler_next(jm_sampler *s, int32_t *tokens, int *source_out)
{
    /* The source that lags its share the most after this draw would be counted:
     * argmax_s w_s * (D + 1) - drawn_s over w_s > 0, D = draws since the
     * mixture was set. The deficits sum to 1, so the winner's is > 0, and no
     * source ever drifts more than about one draw from its share. */
    uint64_t D = 0;
    for (int i = 0; i < s->n; i++) D += s->src[i].drawn;
    int best = -1;
    double best_v = 0;
    for (int i = 0; i < s->n; i++) {
        const source *src = &s->src[i];
        if (!(src->weight > 0)) continue;
        double v = src->weight * ((double)D + 1.0) - (double)src->drawn;
        if (best < 0 || v > best_v) {
            best = i;
            best_v = v;
        }
    }
    source *src = &s->src[best];
    read_window(src, src->position, tokens, s->seq_len);
    src->position = (src->position + (uint64_t)s->seq_len) % src->tokens;
    src->drawn++;
    src->total += (uint64_t)s->seq_len;
    if (source_out) *source_out = best;
}

int jm_sampler_num_sources(const jm_sampler *s)
{
    return s->n;
}

uint64_t jm_sampler_source_tokens(const jm_sampler *s, int i)
{
    return i >= 0 && i < s->n ? s->src[i].tokens : 0;
}

jm_status jm_sampler_get_state(const jm_sampler *s, jm_sampler_state *st, jm_error *err)
{
    memset(st, 0, sizeof *st);
    size_t bytes = (size_t)s->n * sizeof(uint64_t);
    st->position = malloc(bytes);
    st->drawn = malloc(bytes);
    st->total = malloc(bytes);
    if (!st->position || !st->drawn || !st->total) {
        jm_sampler_state_free(st);
        return jm_fail(err, JM_ERR_NOMEM, "sampler state: out of memory");
    }
    st->nsources = s->n;
    for (int i = 0; i < s->n; i++) {
        st->position[i] = s->src[i].position;
        st->drawn[i] = s->src[i].drawn;
        st->total[i] = s->src[i].total;
    }
    return JM_OK;
}

jm_status jm_sampler_set_state(jm_sampler *s, const jm_sampler_state *st, jm_error *err)
{
    if (st->nsources != s->n)
        return jm_fail(err, JM_ERR_ARG, "sampler state: %d sources, the sampler has %d", st->nsources, s->n);
    uint64_t L = (uint64_t)s->seq_len;
    for (int i = 0; i < s->n; i++) {
        const source *src = &s->src[i];
        if (st->position[i] >= src->tokens)
            return jm_fail(err, JM_ERR_ARG, "sampler state: source \"%s\": position %" PRIu64 " beyond its %" PRIu64
                           " tokens", src->name, st->position[i], src->tokens);
        if (st->total[i] % L != 0 || st->drawn[i] > st->total[i] / L)
            return jm_fail(err, JM_ERR_ARG, "sampler state: source \"%s\": %" PRIu64 " sequences drawn but %" PRIu64
                           " tokens in total (seq_len %d)", src->name, st->drawn[i], st->total[i], s->seq_len);
        /* the cursor is determined by the seed, the stream length and the tokens
         * drawn; a mismatch means different shards (or seed) than the saved run */
        uint64_t expect = (uint64_t)(((unsigned __int128)src->origin + st->total[i]) % src->tokens);
        if (st->position[i] != expect)
            return jm_fail(err, JM_ERR_ARG, "sampler state: source \"%s\": position %" PRIu64 " is not where %"
                           PRIu64 " drawn tokens lead (%" PRIu64 "): the shards in %s or the seed changed",
                           src->name, st->position[i], st->total[i], expect, src->dir);
    }
    for (int i = 0; i < s->n; i++) {
        s->src[i].position = st->position[i];
        s->src[i].drawn = st->drawn[i];
        s->src[i].total = st->total[i];
    }
    return JM_OK;
}

void jm_sampler_state_free(jm_sampler_state *st)
{
    free(st->position);
    free(st->drawn);
    free(st->total);
    memset(st, 0, sizeof *st);
}

/* ===================================================================== prepare */

typedef struct {
    char *path;
    uint64_t size;
    bool jsonl;
    uint64_t docs, tokens; /* filled while preparing, for the manifest */
} in_file;

typedef struct {
    in_file *v;
    int n, cap;
    int skipped;
    uint64_t bytes;
} file_list;

/* One document of a batch: a whole text file, or one JSONL line. */
typedef struct {
    const char *p;
    size_t len;
    int file;
    uint64_t line;  /* 1-based JSONL line, 0 for a whole file */
    size_t bytes;   /* input bytes it accounts for (progress) */
    int32_t *ids;
    size_t n;
    char *error;    /* malloc'd message when encoding failed */
} doc;

typedef struct {
    void *map;
    size_t len;
} mapping;

typedef struct {
    doc *d;
    int n, cap;
    size_t bytes;
    mapping *release; /* files finished with once this batch is encoded */
    int nrelease, cap_release;
} batch;

typedef struct {
    double t0, last;
    bool tty, drawn;
    int nfiles, files_done;
    uint64_t total_bytes, bytes_done, tokens;
} progress;

/* the shard stream being written */
typedef struct {
    const char *dir;
    uint64_t shard_tokens;
    uint32_t vocab_size, eos_id;
    shard_writer w;
    bool open;
    int nshards;
    uint64_t *shard_n; /* tokens per finished shard */
    uint64_t total;
} out_stream;

static jm_status collect_inputs(const jm_prepare_opts *o, file_list *fl, jm_error *err);
static jm_status add_path(file_list *fl, const char *path, bool top, int depth, jm_error *err);
static void free_files(file_list *fl);
static jm_status map_file(const char *path, mapping *m, jm_error *err);
static jm_status batch_add(batch *b, const doc *d, jm_error *err);
static jm_status batch_flush(batch *b, const jm_tokenizer *tok, int threads, file_list *fl, out_stream *os,
                             progress *pg, jm_error *err);
static jm_status batch_release_later(batch *b, mapping *m, jm_error *err);
static void batch_free(batch *b);
static void encode_doc(const jm_tokenizer *tok, const file_list *fl, doc *d);
static jm_status stream_put(out_stream *os, const int32_t *ids, uint64_t n, jm_error *err);
static jm_status stream_finish(out_stream *os, jm_error *err);
static void stream_abort(out_stream *os);
static void remove_stale_shards(const char *dir, int keep);
static jm_status move_shards(const char *from, const char *to, int n, jm_error *err);
static void remove_scratch(const char *dir, int n);
static jm_status write_manifest(const jm_prepare_opts *o, const jm_tokenizer *tok, const file_list *fl,
                                const out_stream *os, uint64_t docs, jm_error *err);
static double now_s(void);
static void progress_show(progress *pg, bool final);

jm_status jm_prepare(const jm_prepare_opts *o, uint64_t *tokens_written, jm_error *err)
{
    if (tokens_written) *tokens_written = 0;
    if (!o->tokenizer || !o->out_dir || o->ninputs < 1 || !o->inputs)
        return jm_fail(err, JM_ERR_ARG, "prepare: needs a tokenizer, inputs and an output directory");
    int threads = o->threads > 0 ? o->threads : omp_get_num_procs();
    jm_tokenizer *tok = NULL;
    jm_status st = jm_tokenizer_load(o->tokenizer, &tok, err);
    if (st) return st;
    int vocab = jm_tokenizer_vocab_size(tok), eos = jm_tokenizer_eos_id(tok);
    if (eos < 0 || eos >= vocab) {
        jm_tokenizer_free(tok);
        return jm_fail(err, JM_ERR_ARG, "%s: the tokenizer has no EOS token to separate documents", o->tokenizer);
    }

    file_list fl = {0};
    batch b = {0};
    char tmpdir[4200] = "";
    out_stream os = {.dir = tmpdir, .shard_tokens = o->shard_tokens ? o->shard_tokens : DEFAULT_SHARD_TOKENS,
                     .vocab_size = (uint32_t)vocab, .eos_id = (uint32_t)eos};
    progress pg = {.t0 = now_s(), .tty = isatty(2)};
    uint64_t ndocs = 0;
    st = collect_inputs(o, &fl, err);
    if (!st && fl.n == 0)
        st = jm_fail(err, JM_ERR_ARG, "prepare: no input files to tokenize (%d skipped)", fl.skipped);
    if (!st) st = jm_mkdir_p(o->out_dir, err);
    /* Shards are written to a hidden scratch directory and moved into out_dir
     * only when all succeeded: a failed run (a malformed line halfway) leaves
     * the previous output whole. The sampler never reads hidden entries. */
    if (!st) {
        snprintf(tmpdir, sizeof tmpdir, "%s/.prepare.XXXXXX", o->out_dir);
        if (strlen(o->out_dir) > 4000 || !mkdtemp(tmpdir))
            st = jm_fail(err, JM_ERR_IO, "%s: cannot create a scratch directory: %s", o->out_dir,
                         strlen(o->out_dir) > 4000 ? "path too long" : strerror(errno));
        if (st) tmpdir[0] = 0;
    }
    pg.nfiles = fl.n;
    pg.total_bytes = fl.bytes;
    pg.last = pg.t0;

    for (int fi = 0; fi < fl.n && !st; fi++) {
        in_file *f = &fl.v[fi];
        mapping m = {0};
        st = map_file(f->path, &m, err);
        if (st) break;
        const char *p = m.map, *end = p + m.len;
        if (!f->jsonl) {
            doc d = {.p = p, .len = m.len, .file = fi, .bytes = m.len};
            if (m.len) st = batch_add(&b, &d, err);
        } else {
            uint64_t line = 0;
            while (p < end && !st) {
                const char *nl = memchr(p, '\n', (size_t)(end - p));
                const char *le = nl ? nl : end;
                size_t adv = (size_t)(le - p) + (nl ? 1 : 0);
                line++;
                const char *q = p;
                while (q < le && (*q == ' ' || *q == '\t' || *q == '\r')) q++;
                /* blank lines (a trailing newline, spacing) are not documents */
                doc d = {.p = p, .len = (size_t)(le - p), .file = fi, .line = line, .bytes = adv};
                if (q == le) d.len = 0;
                st = batch_add(&b, &d, err);
                p += adv;
                if (!st && (b.bytes >= BATCH_BYTES || b.n >= BATCH_DOCS))
                    st = batch_flush(&b, tok, threads, &fl, &os, &pg, err);
            }
        }
        jm_status rs = batch_release_later(&b, &m, err);
        st = st ? st : rs;
        if (!st && (b.bytes >= BATCH_BYTES || b.n >= BATCH_DOCS))
            st = batch_flush(&b, tok, threads, &fl, &os, &pg, err);
        pg.files_done = fi + 1;
        if (!st) progress_show(&pg, false);
    }
    if (!st) st = batch_flush(&b, tok, threads, &fl, &os, &pg, err);
    for (int fi = 0; fi < fl.n; fi++) ndocs += fl.v[fi].docs;
    if (!st && os.total == 0) st = jm_fail(err, JM_ERR_ARG, "prepare: the inputs hold no text (all files empty)");
    if (!st) st = stream_finish(&os, err);
    if (!st) st = move_shards(tmpdir, o->out_dir, os.nshards, err);
    if (!st) {
        progress_show(&pg, true);
        remove_stale_shards(o->out_dir, os.nshards);
        st = write_manifest(o, tok, &fl, &os, ndocs, err);
    } else {
        stream_abort(&os);
        if (pg.drawn && pg.tty) fputc('\n', stderr);
    }
    if (tmpdir[0]) remove_scratch(tmpdir, os.nshards);
    if (!st && tokens_written) *tokens_written = os.total;
    batch_free(&b);
    free(os.shard_n);
    free_files(&fl);
    jm_tokenizer_free(tok);
    return st;
}

/* ===================================================== helpers: bytes, names */

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd64(const uint8_t *p)
{
    return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32;
}

static void wr32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void wr64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Steele, Lea & Flood's SplitMix64 finaliser: a seed-and-index hash with
 * every output bit depending on every input bit. */
static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static char *dupstr(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static char *join_path(const char *dir, const char *name)
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

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Entries of dir except hidden ones ("." and ".." included), sorted bytewise
 * so every run, file system and locale sees the same order. */
static jm_status list_dir(const char *dir, char ***names, int *n, jm_error *err)
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
        if (!(v[cnt] = dupstr(e->d_name))) goto oom;
        cnt++;
    }
    closedir(d);
    if (cnt) qsort(v, (size_t)cnt, sizeof *v, cmp_str);
    *names = v;
    *n = cnt;
    return JM_OK;
oom:
    closedir(d);
    free_names(v, cnt);
    return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory listing the directory", dir);
}

static void free_names(char **names, int n)
{
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
}

/* ============================================ helpers: streaming shard writer */

/* The header goes first with a zero count, the ids stream after it, and the
 * count is patched in before the rename: no shard is ever held in memory. */
static jm_status writer_open(shard_writer *w, const char *path, uint32_t vocab_size, uint32_t eos_id,
                             jm_error *err)
{
    memset(w, 0, sizeof *w);
    if (vocab_size == 0 || vocab_size > (uint32_t)INT32_MAX)
        return jm_fail(err, JM_ERR_ARG, "%s: vocab size %" PRIu32 " out of range", path, vocab_size);
    if (eos_id >= vocab_size)
        return jm_fail(err, JM_ERR_ARG, "%s: EOS id %" PRIu32 " is not below the vocab size %" PRIu32, path, eos_id,
                       vocab_size);
    w->bytes_per_token = vocab_size <= 65536 ? 2 : 4;
    w->vocab_size = vocab_size;
    w->eos_id = eos_id;
    uint8_t h[JM_SHARD_HEADER] = {0};
    memcpy(h, JM_SHARD_MAGIC, 8);
    wr32(h + 8, SHARD_VERSION);
    wr32(h + 12, (uint32_t)w->bytes_per_token);
    wr32(h + 24, vocab_size);
    wr32(h + 28, eos_id);
    jm_status st = jm_atomic_open(&w->a, path, err);
    if (st) return st;
    st = jm_atomic_write(&w->a, h, sizeof h, err);
    if (st) jm_atomic_abort(&w->a);
    return st;
}

static jm_status writer_put(shard_writer *w, const int32_t *ids, uint64_t n, jm_error *err)
{
    uint8_t buf[1 << 16];
    size_t per = sizeof buf / (size_t)w->bytes_per_token;
    for (uint64_t i = 0; i < n;) {
        size_t k = n - i < per ? (size_t)(n - i) : per;
        for (size_t j = 0; j < k; j++) {
            int32_t id = ids[i + j];
            if (id < 0 || (uint32_t)id >= w->vocab_size)
                return jm_fail(err, JM_ERR_ARG, "%s: token %" PRIu64 " is id %" PRId32 ", outside [0, %" PRIu32 ")",
                               w->a.path, w->n + i + j, id, w->vocab_size);
            if (w->bytes_per_token == 2) {
                buf[2 * j] = (uint8_t)id;
                buf[2 * j + 1] = (uint8_t)(id >> 8);
            } else {
                wr32(buf + 4 * j, (uint32_t)id);
            }
        }
        jm_status st = jm_atomic_write(&w->a, buf, k * (size_t)w->bytes_per_token, err);
        if (st) return st;
        i += k;
    }
    w->n += n;
    return JM_OK;
}

static jm_status writer_commit(shard_writer *w, jm_error *err)
{
    uint8_t cnt[8];
    wr64(cnt, w->n);
    if (fseek(w->a.f, 16, SEEK_SET) != 0 || fwrite(cnt, 1, 8, w->a.f) != 8) {
        jm_status st = jm_fail(err, JM_ERR_IO, "%s: write failed: %s", w->a.tmp, strerror(errno));
        jm_atomic_abort(&w->a);
        return st;
    }
    return jm_atomic_commit(&w->a, err);
}

/* ====================================================== helpers: the sampler */

static jm_status open_source(source *src, const char *name, const char *dir, uint32_t vocab_size,
                             uint32_t *eos, char *eos_from, size_t eos_from_len, jm_error *err)
{
    if (!(src->name = dupstr(name)) || !(src->dir = dupstr(dir)))
        return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dir);
    char **names;
    int n;
    jm_status st = list_dir(dir, &names, &n, err);
    if (st) return st;
    int nbin = 0;
    for (int i = 0; i < n; i++) {
        size_t len = strlen(names[i]);
        if (len > 4 && strcmp(names[i] + len - 4, ".bin") == 0) names[nbin++] = names[i];
        else free(names[i]);
    }
    if (nbin == 0) {
        free(names);
        return jm_fail(err, JM_ERR_ARG, "%s: source \"%s\" has no token shards (*.bin)", dir, name);
    }
    src->shards = calloc((size_t)nbin, sizeof *src->shards);
    src->start = calloc((size_t)nbin, sizeof *src->start);
    if (!src->shards || !src->start) st = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dir);
    for (int i = 0; i < nbin && !st; i++) {
        char *path = join_path(dir, names[i]);
        if (!path) {
            st = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dir);
            break;
        }
        jm_shard sh;
        st = jm_shard_open(path, &sh, err);
        if (!st && sh.vocab_size != vocab_size)
            st = jm_fail(err, JM_ERR_ARG, "%s: vocab size %" PRIu32 " does not match the model's %" PRIu32
                         " (prepared with another tokenizer?)", path, sh.vocab_size, vocab_size);
        if (!st && eos_from[0] && sh.eos_id != *eos)
            st = jm_fail(err, JM_ERR_ARG, "%s: EOS id %" PRIu32 " differs from %s's %" PRIu32
                         " (prepared with another tokenizer?)", path, sh.eos_id, eos_from, *eos);
        if (!st && !eos_from[0]) {
            *eos = sh.eos_id;
            snprintf(eos_from, eos_from_len, "%s", path);
        }
        if (st) {
            if (sh.map) jm_shard_close(&sh);
        } else if (sh.n == 0) {
            jm_shard_close(&sh); /* contributes nothing to the stream */
        } else {
            src->start[src->nshards] = src->tokens;
            src->tokens += sh.n;
            src->shards[src->nshards++] = sh;
        }
        free(path);
    }
    for (int i = 0; i < nbin; i++) free(names[i]);
    free(names);
    return st;
}

static void free_source(source *src)
{
    for (int i = 0; i < src->nshards; i++) jm_shard_close(&src->shards[i]);
    free(src->shards);
    free(src->start);
    free(src->name);
    free(src->dir);
}

/* len consecutive stream tokens from pos, wrapping from the end to the start. */
static void read_window(const source *src, uint64_t pos, int32_t *out, int len)
{
    int lo = 0, hi = src->nshards - 1; /* last shard starting at or before pos */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (src->start[mid] <= pos) lo = mid;
        else hi = mid - 1;
    }
    int k = lo;
    uint64_t off = pos - src->start[k];
    for (int i = 0; i < len;) {
        const jm_shard *sh = &src->shards[k];
        uint64_t take = sh->n - off;
        if (take > (uint64_t)(len - i)) take = (uint64_t)(len - i);
        for (uint64_t j = 0; j < take; j++) out[i + (int)j] = (int32_t)jm_shard_token(sh, off + j);
        i += (int)take;
        off += take;
        if (off == sh->n) {
            k = k + 1 == src->nshards ? 0 : k + 1;
            off = 0;
        }
    }
}

/* ====================================================== helpers: prepare */

static jm_status collect_inputs(const jm_prepare_opts *o, file_list *fl, jm_error *err)
{
    for (int i = 0; i < o->ninputs; i++) {
        if (!o->inputs[i]) return jm_fail(err, JM_ERR_ARG, "prepare: input %d is NULL", i);
        jm_status st = add_path(fl, o->inputs[i], true, 0, err);
        if (st) return st;
    }
    return JM_OK;
}

/* Adds a file, or a directory's files recursively (hidden entries skipped;
 * symlinked directories not followed, so a link cycle cannot loop). Files
 * with a NUL byte in their first 8 KB are binary and skipped with a note. */
static jm_status add_path(file_list *fl, const char *path, bool top, int depth, jm_error *err)
{
    struct stat lst, st_;
    if (lstat(path, &lst) != 0 || stat(path, &st_) != 0)
        return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    if (S_ISDIR(st_.st_mode)) {
        if (!top && S_ISLNK(lst.st_mode)) {
            fprintf(stderr, "prepare: note: not following the directory symlink %s\n", path);
            return JM_OK;
        }
        if (depth > 64) return jm_fail(err, JM_ERR_ARG, "%s: directories nested too deeply", path);
        char **names;
        int n;
        jm_status s = list_dir(path, &names, &n, err);
        for (int i = 0; i < n && !s; i++) {
            char *p = join_path(path, names[i]);
            s = p ? add_path(fl, p, false, depth + 1, err) : jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
            free(p);
        }
        free_names(names, n);
        return s;
    }
    if (!S_ISREG(st_.st_mode)) {
        if (top) return jm_fail(err, JM_ERR_ARG, "%s: not a regular file or directory", path);
        fprintf(stderr, "prepare: note: skipping %s (not a regular file)\n", path);
        fl->skipped++;
        return JM_OK;
    }
    int fd;
    size_t size;
    jm_status s = jm_open_regular(path, &fd, &size, err);
    if (s) return s;
    char probe[BINARY_PROBE];
    ssize_t got = pread(fd, probe, sizeof probe, 0);
    close(fd);
    if (got < 0) return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    if (memchr(probe, 0, (size_t)got)) {
        fprintf(stderr, "prepare: note: skipping binary file %s (NUL byte in its first 8 KB)\n", path);
        fl->skipped++;
        return JM_OK;
    }
    if (fl->n == fl->cap) {
        int cap = fl->cap ? 2 * fl->cap : 256;
        in_file *v = realloc(fl->v, (size_t)cap * sizeof *v);
        if (!v) return jm_fail(err, JM_ERR_NOMEM, "prepare: out of memory");
        fl->v = v;
        fl->cap = cap;
    }
    size_t len = strlen(path);
    in_file *f = &fl->v[fl->n];
    memset(f, 0, sizeof *f);
    if (!(f->path = dupstr(path))) return jm_fail(err, JM_ERR_NOMEM, "prepare: out of memory");
    f->size = size;
    f->jsonl = len > 6 && strcasecmp(path + len - 6, ".jsonl") == 0;
    fl->n++;
    fl->bytes += size;
    return JM_OK;
}

static void free_files(file_list *fl)
{
    for (int i = 0; i < fl->n; i++) free(fl->v[i].path);
    free(fl->v);
}

static jm_status map_file(const char *path, mapping *m, jm_error *err)
{
    m->map = NULL;
    m->len = 0;
    int fd;
    size_t size;
    jm_status st = jm_open_regular(path, &fd, &size, err);
    if (st) return st;
    if (size) {
        void *p = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            st = jm_fail(err, JM_ERR_IO, "%s: mmap failed: %s", path, strerror(errno));
        } else {
            madvise(p, size, MADV_SEQUENTIAL);
            m->map = p;
            m->len = size;
        }
    }
    close(fd);
    return st;
}

static jm_status batch_add(batch *b, const doc *d, jm_error *err)
{
    if (b->n == b->cap) {
        int cap = b->cap ? 2 * b->cap : 256;
        doc *v = realloc(b->d, (size_t)cap * sizeof *v);
        if (!v) return jm_fail(err, JM_ERR_NOMEM, "prepare: out of memory");
        b->d = v;
        b->cap = cap;
    }
    b->d[b->n++] = *d;
    b->bytes += d->bytes;
    return JM_OK;
}

/* Encodes the batch's documents in parallel, then appends them (each followed
 * by EOS) in input order; the first failing document in that order decides
 * the error, so the message too is the same for any thread count. */
static jm_status batch_flush(batch *b, const jm_tokenizer *tok, int threads, file_list *fl, out_stream *os,
                             progress *pg, jm_error *err)
{
    jm_status st = JM_OK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int i = 0; i < b->n; i++) encode_doc(tok, fl, &b->d[i]);
    for (int i = 0; i < b->n && !st; i++) {
        doc *d = &b->d[i];
        if (d->error) {
            st = jm_fail(err, JM_ERR_FORMAT, "%s", d->error);
            break;
        }
        if (d->len == 0) { /* empty: no document, not even an EOS */
            pg->bytes_done += d->bytes;
            continue;
        }
        int32_t e = (int32_t)os->eos_id;
        st = stream_put(os, d->ids, d->n, err);
        if (!st) st = stream_put(os, &e, 1, err);
        fl->v[d->file].docs++;
        fl->v[d->file].tokens += d->n + 1;
        pg->tokens += d->n + 1;
        pg->bytes_done += d->bytes;
    }
    for (int i = 0; i < b->n; i++) {
        free(b->d[i].ids);
        free(b->d[i].error);
    }
    for (int i = 0; i < b->nrelease; i++)
        if (b->release[i].map) munmap(b->release[i].map, b->release[i].len);
    b->n = 0;
    b->bytes = 0;
    b->nrelease = 0;
    if (!st) progress_show(pg, false);
    return st;
}

/* A file's mapping lives until the batch holding its last document is
 * encoded; on failure it is unmapped here. */
static jm_status batch_release_later(batch *b, mapping *m, jm_error *err)
{
    if (b->nrelease == b->cap_release) {
        int cap = b->cap_release ? 2 * b->cap_release : 16;
        mapping *r = realloc(b->release, (size_t)cap * sizeof *r);
        if (!r) {
            if (m->map) munmap(m->map, m->len);
            return jm_fail(err, JM_ERR_NOMEM, "prepare: out of memory");
        }
        b->release = r;
        b->cap_release = cap;
    }
    b->release[b->nrelease++] = *m;
    return JM_OK;
}

static void batch_free(batch *b)
{
    for (int i = 0; i < b->n; i++) {
        free(b->d[i].ids);
        free(b->d[i].error);
    }
    for (int i = 0; i < b->nrelease; i++)
        if (b->release[i].map) munmap(b->release[i].map, b->release[i].len);
    free(b->d);
    free(b->release);
}

__attribute__((format(printf, 1, 2)))
static char *fmt_dup(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return dupstr(buf);
}

/* Runs on a worker thread: touches only *d (and reads tok, fl). */
static void encode_doc(const jm_tokenizer *tok, const file_list *fl, doc *d)
{
    const char *file = fl->v[d->file].path;
    d->ids = NULL;
    d->n = 0;
    d->error = NULL;
    if (d->len == 0) return;
    jm_error e;
    if (!d->line) {
        if (jm_tokenizer_encode(tok, d->p, d->len, &d->ids, &d->n, &e))
            d->error = fmt_dup("%s: %s", file, e.msg);
        return;
    }
    char name[4200];
    snprintf(name, sizeof name, "%s:%" PRIu64, file, d->line);
    cJSON *root = NULL;
    if (jm_json_parse(d->p, d->len, name, &root, &e)) {
        d->error = dupstr(e.msg);
        return;
    }
    const cJSON *text = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "text") : NULL;
    if (!cJSON_IsString(text)) {
        d->error = fmt_dup("%s:%" PRIu64 ": %s", file, d->line,
                           cJSON_IsObject(root) ? "no \"text\" string field" : "not a JSON object");
    } else if (text->valuestring[0] == 0) {
        d->len = 0; /* "text": "" is an empty document: skipped like a blank line */
    } else if (jm_tokenizer_encode_special(tok, text->valuestring, strlen(text->valuestring), &d->ids, &d->n, &e)) {
        /* JSONL records are tokenized as Hugging Face does, special tokens
         * included: a chat record's "</s>" turn ends become EOS ids, as in
         * jm_chat_encode. Text and code files stay plain text ("</s>" is an
         * HTML tag there). */
        d->error = fmt_dup("%s:%" PRIu64 ": %s", file, d->line, e.msg);
    }
    cJSON_Delete(root);
}

static jm_status stream_put(out_stream *os, const int32_t *ids, uint64_t n, jm_error *err)
{
    while (n) {
        if (!os->open) {
            if (os->nshards >= MAX_SHARDS)
                return jm_fail(err, JM_ERR_ARG, "%s: more than %d shards (raise the tokens per shard)", os->dir,
                               MAX_SHARDS);
            char name[32];
            snprintf(name, sizeof name, "shard_%05d.bin", os->nshards);
            char *path = join_path(os->dir, name);
            if (!path) return jm_fail(err, JM_ERR_NOMEM, "prepare: out of memory");
            jm_status st = writer_open(&os->w, path, os->vocab_size, os->eos_id, err);
            free(path);
            if (st) return st;
            os->open = true;
        }
        uint64_t room = os->shard_tokens - os->w.n, k = n < room ? n : room;
        jm_status st = writer_put(&os->w, ids, k, err);
        if (st) return st;
        ids += k;
        n -= k;
        os->total += k;
        if (os->w.n == os->shard_tokens) {
            st = stream_finish(os, err);
            if (st) return st;
        }
    }
    return JM_OK;
}

/* Commits the open shard, if any. */
static jm_status stream_finish(out_stream *os, jm_error *err)
{
    if (!os->open) return JM_OK;
    uint64_t *v = realloc(os->shard_n, (size_t)(os->nshards + 1) * sizeof *v);
    if (!v) return jm_fail(err, JM_ERR_NOMEM, "prepare: out of memory");
    os->shard_n = v;
    uint64_t n = os->w.n;
    os->open = false;
    jm_status st = writer_commit(&os->w, err);
    if (st) return st;
    os->shard_n[os->nshards++] = n;
    return JM_OK;
}

static void stream_abort(out_stream *os)
{
    if (os->open) jm_atomic_abort(&os->w.a);
    os->open = false;
}

/* A re-run with less text must not leave the old run's later shards behind
 * for the sampler to read: remove shard_NNNNN.bin from index `keep` on. */
static void remove_stale_shards(const char *dir, int keep)
{
    char **names;
    int n;
    if (list_dir(dir, &names, &n, NULL)) return;
    for (int i = 0; i < n; i++) {
        const char *s = names[i];
        int idx = 0;
        bool ours = strlen(s) == 15 && strncmp(s, "shard_", 6) == 0 && strcmp(s + 11, ".bin") == 0;
        for (int j = 6; ours && j < 11; j++) {
            ours = s[j] >= '0' && s[j] <= '9';
            idx = idx * 10 + (s[j] - '0');
        }
        if (ours && idx >= keep) {
            char *p = join_path(dir, s);
            if (p && unlink(p) == 0) fprintf(stderr, "prepare: removed stale %s\n", p);
            free(p);
        }
    }
    free_names(names, n);
}

static jm_status move_shards(const char *from, const char *to, int n, jm_error *err)
{
    for (int i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof name, "shard_%05d.bin", i);
        char *a = join_path(from, name), *b = join_path(to, name);
        int rc = a && b ? rename(a, b) : -1;
        jm_status st = rc == 0 ? JM_OK
                               : jm_fail(err, JM_ERR_IO, "%s: cannot move the new shard into place: %s",
                                         b ? b : to, a && b ? strerror(errno) : "out of memory");
        free(a);
        free(b);
        if (st) return st;
    }
    return JM_OK;
}

/* Removes the scratch directory and whatever shards of a failed run it holds. */
static void remove_scratch(const char *dir, int n)
{
    for (int i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof name, "shard_%05d.bin", i);
        char *p = join_path(dir, name);
        if (p) unlink(p);
        free(p);
    }
    rmdir(dir);
}

static jm_status write_manifest(const jm_prepare_opts *o, const jm_tokenizer *tok, const file_list *fl,
                                const out_stream *os, uint64_t docs, jm_error *err)
{
    cJSON *root = cJSON_CreateObject(), *shards = NULL, *files = NULL;
    bool ok = root != NULL;
    ok = ok && cJSON_AddStringToObject(root, "format", "jetmoe.c token shards v1");
    ok = ok && cJSON_AddStringToObject(root, "tokenizer", o->tokenizer);
    ok = ok && cJSON_AddNumberToObject(root, "vocab_size", jm_tokenizer_vocab_size(tok));
    ok = ok && cJSON_AddNumberToObject(root, "eos_id", jm_tokenizer_eos_id(tok));
    ok = ok && cJSON_AddNumberToObject(root, "bytes_per_token", os->vocab_size <= 65536 ? 2 : 4);
    ok = ok && cJSON_AddNumberToObject(root, "tokens", (double)os->total);
    ok = ok && cJSON_AddNumberToObject(root, "documents", (double)docs);
    ok = ok && (shards = cJSON_AddArrayToObject(root, "shards")) && (files = cJSON_AddArrayToObject(root, "sources"));
    for (int i = 0; i < os->nshards && ok; i++) {
        char name[32];
        snprintf(name, sizeof name, "shard_%05d.bin", i);
        cJSON *s = cJSON_CreateObject();
        ok = s && cJSON_AddItemToArray(shards, s) && cJSON_AddStringToObject(s, "file", name) &&
             cJSON_AddNumberToObject(s, "tokens", (double)os->shard_n[i]);
    }
    for (int i = 0; i < fl->n && ok; i++) {
        cJSON *f = cJSON_CreateObject();
        ok = f && cJSON_AddItemToArray(files, f) && cJSON_AddStringToObject(f, "path", fl->v[i].path) &&
             cJSON_AddNumberToObject(f, "bytes", (double)fl->v[i].size) &&
             cJSON_AddNumberToObject(f, "documents", (double)fl->v[i].docs) &&
             cJSON_AddNumberToObject(f, "tokens", (double)fl->v[i].tokens);
    }
    char *path = join_path(o->out_dir, "manifest.json");
    jm_status st = ok && path ? jm_write_json(path, root, err)
                              : jm_fail(err, JM_ERR_NOMEM, "%s/manifest.json: out of memory", o->out_dir);
    cJSON_Delete(root);
    free(path);
    return st;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* On a terminal, one line redrawn at most 10 times a second; otherwise a
 * plain line every 5 seconds. Both end with a final summary line. */
static void progress_show(progress *pg, bool final)
{
    double t = now_s();
    if (!final && t - pg->last < (pg->tty ? 0.1 : 5.0)) return;
    pg->last = t;
    pg->drawn = true;
    double el = t - pg->t0, frac = pg->total_bytes ? (double)pg->bytes_done / (double)pg->total_bytes : 1.0;
    double mbs = el > 0 ? (double)pg->bytes_done / 1e6 / el : 0;
    char eta[32] = "--:--";
    if (final) {
        snprintf(eta, sizeof eta, "done in %.1fs", el);
    } else if (frac > 0 && el > 0.5) {
        int r = (int)(el / frac - el + 0.5);
        snprintf(eta, sizeof eta, "ETA %d:%02d", r / 60, r % 60);
    }
    if (pg->tty) {
        char bar[21];
        int fill = (int)(frac * 20 + 0.5);
        for (int i = 0; i < 20; i++) bar[i] = i < fill ? '#' : '.';
        bar[20] = 0;
        fprintf(stderr, "\rprepare [%s] %d/%d files  %.1f MB/s  %" PRIu64 " tokens  %s\033[K%s", bar,
                pg->files_done, pg->nfiles, mbs, pg->tokens, eta, final ? "\n" : "");
    } else {
        fprintf(stderr, "prepare: %d/%d files (%.0f%%)  %.1f MB/s  %" PRIu64 " tokens  %s\n", pg->files_done,
                pg->nfiles, 100 * frac, mbs, pg->tokens, eta);
    }
    fflush(stderr);
}
