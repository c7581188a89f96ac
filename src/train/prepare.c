/* prepare.c — `jetmoe prepare`: text, JSONL and source files -> token shards.
 *
 * prepare tokenizes files on several threads but appends the results in input
 * order, so the shards are byte-identical for any thread count. */
#include "train/data.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <omp.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SHARD_TOKENS 100000000ull
#define MAX_SHARDS 99999        /* shard_%05d.bin must sort in numeric order */
#define BINARY_PROBE 8192       /* a NUL byte in this many leading bytes = binary file */
#define BATCH_BYTES (2u << 20)  /* prepare encodes this much text per parallel batch */
#define BATCH_DOCS 4096

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
    jm_shard_writer w;
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
static const jm_output_set prepare_outputs;
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
    /* an earlier prepare's shards are replaced only with overwrite, nobody else's ever (README: What writes where) */
    const char **reads = malloc(((size_t)o->ninputs + 1) * sizeof *reads);
    if (!reads) return jm_fail(err, JM_ERR_NOMEM, "prepare: out of memory");
    memcpy(reads, o->inputs, (size_t)o->ninputs * sizeof *reads);
    reads[o->ninputs] = o->tokenizer;
    jm_status chk = jm_output_entries_check(o->out_dir, &prepare_outputs, reads, o->ninputs + 1, o->overwrite,
                                            err);
    free(reads);
    if (chk) return chk;
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
        jm_status s = jm_list_dir(path, &names, &n, err);
        for (int i = 0; i < n && !s; i++) {
            char *p = jm_path_join(path, names[i]);
            s = p ? add_path(fl, p, false, depth + 1, err) : jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
            free(p);
        }
        jm_free_names(names, n);
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
    if (!(f->path = strdup(path))) return jm_fail(err, JM_ERR_NOMEM, "prepare: out of memory");
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
    return strdup(buf);
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
    char name[4200], *text;
    size_t n;
    snprintf(name, sizeof name, "%s:%" PRIu64, file, d->line);
    if (jm_jsonl_text(d->p, d->len, name, &text, &n, &e)) {
        d->error = strdup(e.msg);
    } else if (n == 0) {
        d->len = 0; /* "text": "" is an empty document: skipped like a blank line */
    } else if (jm_tokenizer_encode_special(tok, text, n, &d->ids, &d->n, &e)) {
        /* JSONL records are tokenized as Hugging Face does, special tokens
         * included: a chat record's "</s>" turn ends become EOS ids, as in
         * jm_chat_encode. Text and code files stay plain text ("</s>" is an
         * HTML tag there). */
        d->error = fmt_dup("%s: %s", name, e.msg);
    }
    free(text);
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
            char *path = jm_path_join(os->dir, name);
            if (!path) return jm_fail(err, JM_ERR_NOMEM, "prepare: out of memory");
            jm_status st = jm_shard_writer_open(&os->w, path, os->vocab_size, os->eos_id, err);
            free(path);
            if (st) return st;
            os->open = true;
        }
        uint64_t room = os->shard_tokens - os->w.n, k = n < room ? n : room;
        jm_status st = jm_shard_writer_put(&os->w, ids, k, err);
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
    jm_status st = jm_shard_writer_commit(&os->w, err);
    if (st) return st;
    os->shard_n[os->nshards++] = n;
    return JM_OK;
}

static void stream_abort(out_stream *os)
{
    if (os->open) jm_atomic_abort(&os->w.a);
    os->open = false;
}

#define MANIFEST_FORMAT "jetmoe.c token shards v1"

/* What prepare writes into its output directory, and the proof that an
 * existing one is a previous prepare's: a shard's magic, the manifest's format. */
static int prepare_proof(const char *path, const char *name)
{
    if (strcmp(name, "manifest.json") != 0) {
        char magic[8];
        FILE *f = fopen(path, "rb");
        bool ours = f && fread(magic, 1, 8, f) == 8 && memcmp(magic, JM_SHARD_MAGIC, 8) == 0;
        if (f) fclose(f);
        return ours;
    }
    char *text;
    size_t len;
    cJSON *root = NULL;
    if (jm_read_file(path, (size_t)1 << 28, &text, &len, NULL)) return 0;
    jm_status s = jm_json_parse(text, len, path, &root, NULL);
    free(text);
    const cJSON *format = s ? NULL : cJSON_GetObjectItemCaseSensitive(root, "format");
    int ours = cJSON_IsString(format) && strcmp(format->valuestring, MANIFEST_FORMAT) == 0;
    cJSON_Delete(root);
    return ours;
}

static const char *const prepare_names[] = {"manifest.json", "shard_#####.bin"};
static const jm_output_set prepare_outputs = {"token shards", prepare_names, 2, prepare_proof};

/* A re-run with less text must not leave the old run's later shards behind
 * for the sampler to read: remove shard_NNNNN.bin from index `keep` on (only
 * token shards: the check before the run refused anything else of that name). */
static void remove_stale_shards(const char *dir, int keep)
{
    char **names;
    int n;
    if (jm_list_dir(dir, &names, &n, NULL)) return;
    for (int i = 0; i < n; i++) {
        const char *s = names[i];
        int idx = 0;
        bool ours = strlen(s) == 15 && strncmp(s, "shard_", 6) == 0 && strcmp(s + 11, ".bin") == 0;
        for (int j = 6; ours && j < 11; j++) {
            ours = s[j] >= '0' && s[j] <= '9';
            idx = idx * 10 + (s[j] - '0');
        }
        if (ours && idx >= keep) {
            char *p = jm_path_join(dir, s);
            if (p && prepare_proof(p, s) && unlink(p) == 0) fprintf(stderr, "prepare: removed stale %s\n", p);
            free(p);
        }
    }
    jm_free_names(names, n);
}

static jm_status move_shards(const char *from, const char *to, int n, jm_error *err)
{
    for (int i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof name, "shard_%05d.bin", i);
        char *a = jm_path_join(from, name), *b = jm_path_join(to, name);
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
        char *p = jm_path_join(dir, name);
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
    ok = ok && cJSON_AddStringToObject(root, "format", MANIFEST_FORMAT);
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
    char *path = jm_path_join(o->out_dir, "manifest.json");
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

/* ====================================================== JSONL records */

/* Past the JSON whitespace at p. */
static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

static int hex4(const char *p, const char *end)
{
    int v = 0;
    for (int i = 0; i < 4; i++) {
        if (p + i >= end) return -1;
        char c = p[i];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* Decodes the JSON string whose opening quote is at *p into out (room for
 * end - *p bytes: decoding never lengthens) and moves *p past its closing
 * quote. Returns the decoded length, or -1 if the string is malformed. */
static long decode_string(const char **p, const char *end, char *out)
{
    const char *q = *p + 1;
    long n = 0;
    while (q < end && *q != '"') {
        if (*q != '\\') {
            out[n++] = *q++;
            continue;
        }
        if (q + 1 >= end) return -1;
        char c = q[1];
        q += 2;
        const char *simple = strchr("\"\\/bfnrt", c);
        if (c && simple) {
            out[n++] = "\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"];
            continue;
        }
        if (c != 'u') return -1;
        long cp = hex4(q, end);
        q += 4;
        if (cp >= 0xd800 && cp <= 0xdbff) { /* a surrogate pair */
            long lo = q + 1 < end && q[0] == '\\' && q[1] == 'u' ? hex4(q + 2, end) : -1;
            if (lo < 0xdc00 || lo > 0xdfff) return -1;
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            q += 6;
        } else if (cp < 0 || (cp >= 0xdc00 && cp <= 0xdfff)) {
            return -1;
        }
        if (cp < 0x80) {
            out[n++] = (char)cp;
        } else if (cp < 0x800) {
            out[n++] = (char)(0xc0 | cp >> 6);
            out[n++] = (char)(0x80 | (cp & 0x3f));
        } else if (cp < 0x10000) {
            out[n++] = (char)(0xe0 | cp >> 12);
            out[n++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            out[n++] = (char)(0x80 | (cp & 0x3f));
        } else {
            out[n++] = (char)(0xf0 | cp >> 18);
            out[n++] = (char)(0x80 | ((cp >> 12) & 0x3f));
            out[n++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            out[n++] = (char)(0x80 | (cp & 0x3f));
        }
    }
    if (q >= end) return -1;
    *p = q + 1;
    return n;
}

/* Past the JSON value at p (a string, an object or array however nested, or
 * a scalar), in text that has parsed; NULL if it runs off the end. */
static const char *skip_value(const char *p, const char *end)
{
    long depth = 0;
    do {
        if (p >= end) return NULL;
        if (*p == '"') {
            for (p++; p < end && *p != '"'; p++)
                if (*p == '\\') p++;
            if (p >= end) return NULL;
            p++;
        } else if (*p == '{' || *p == '[') {
            depth++, p++;
        } else if (*p == '}' || *p == ']') {
            depth--, p++;
        } else if (depth > 0) {
            p++;
        } else {
            while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\t' && *p != '\n' &&
                   *p != '\r')
                p++;
        }
    } while (depth > 0);
    return p;
}

jm_status jm_jsonl_text(const char *line, size_t len, const char *where, char **text, size_t *n, jm_error *err)
{
    *text = NULL;
    *n = 0;
    cJSON *root = NULL;
    jm_status s = jm_json_parse(line, len, where, &root, err); /* strict: UTF-8, no NUL byte, no duplicate key */
    if (s) return s;
    const cJSON *t = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "text") : NULL;
    if (!cJSON_IsString(t)) {
        s = jm_fail(err, JM_ERR_FORMAT, "%s: %s", where,
                    cJSON_IsObject(root) ? "no \"text\" string field" : "not a JSON object");
        cJSON_Delete(root);
        return s;
    }
    /* cJSON decodes "\u0000" to a NUL that ends its string; decode the field
     * again from the line, whole: find "text" among the top-level keys. */
    char *out = malloc(len + 1);
    const char *p = skip_ws(line, line + len), *end = line + len;
    long got = -1;
    if (out && p < end && *p == '{') p = skip_ws(p + 1, end);
    while (out && p && p < end && *p == '"') {
        long kl = decode_string(&p, end, out);
        bool is_text = kl == 4 && memcmp(out, "text", 4) == 0;
        p = kl < 0 ? NULL : skip_ws(p, end);
        if (!p || p >= end || *p != ':') break;
        p = skip_ws(p + 1, end);
        if (is_text) {
            got = p < end && *p == '"' ? decode_string(&p, end, out) : -1;
            break;
        }
        p = skip_value(p, end);
        p = p ? skip_ws(p, end) : NULL;
        if (p && p < end && *p == ',') p = skip_ws(p + 1, end);
    }
    /* the two readings must agree up to the first NUL: anything else is a bug here */
    size_t head = strlen(t->valuestring);
    if (!out) {
        s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", where);
    } else if (got < 0 || (size_t)got < head || memcmp(out, t->valuestring, head) != 0 ||
               ((size_t)got > head && out[head] != 0)) {
        s = jm_fail(err, JM_ERR_FORMAT, "%s: cannot read the \"text\" field", where);
    } else {
        out[got] = 0;
        *text = out;
        *n = (size_t)got;
        out = NULL;
    }
    free(out);
    cJSON_Delete(root);
    return s;
}
