/* prepare.c — `jetmoe prepare`: text, JSONL and source files -> token shards.
 *
 * prepare tokenizes files on several threads but appends the results in input
 * order, so the shards are byte-identical for any thread count. Plain files
 * are mapped; compressed JSON lines (.gz through zlib, .zst through libzstd)
 * are decompressed as a stream and each line is copied into the batch that
 * encodes it, so memory holds a batch and a line, whatever a file's size.
 *
 * With --part I/N a run prepares one run of consecutive files of the input
 * list into names of its own (part-IIIII-of-NNNNN.*, data.h), so that N runs
 * on several hosts, into one directory or copied together, make the shard set
 * that one run over all the inputs makes: the same tokens in the same order. */
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
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#define DEFAULT_SHARD_TOKENS 100000000ull
#define BINARY_PROBE 8192       /* a NUL byte in this many leading bytes = binary file */
#define BATCH_BYTES (2u << 20)  /* prepare encodes this much text per parallel batch */
#define BATCH_DOCS 4096
#define MAX_LINE ((size_t)64 << 20)   /* a streamed record longer than this is refused rather than held */
#define STREAM_START ((size_t)1 << 20) /* the decompression buffer; it grows only for a longer line */
#define ARENA_CHUNK ((size_t)4 << 20)  /* streamed lines are copied into chunks this big (or one line's) */
#define MAX_FIELD 256                  /* bytes of a --text-field name */

typedef enum { IN_TEXT, IN_JSONL, IN_JSONL_GZ, IN_JSONL_ZST } in_kind;

typedef struct {
    char *path;
    size_t rel;    /* path + rel: its name under the --input entry it came from (the parts' digest) */
    uint64_t size;
    in_kind kind;
    int part;      /* the part (1-based) that prepares it; 1 without --part */
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
    size_t bytes;   /* input bytes it accounts for (progress; compressed bytes for a stream) */
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
    size_t held;      /* text bytes of its documents: encoded once this reaches BATCH_BYTES */
    mapping *release; /* files finished with once this batch is encoded */
    int nrelease, cap_release;
    char **arena;     /* the streamed lines' copies, freed once this batch is encoded */
    int narena, cap_arena;
    size_t arena_used, arena_size; /* of the last chunk */
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
    const char *prefix; /* "" or "part-IIIII-of-NNNNN." */
    uint64_t shard_tokens;
    uint32_t vocab_size, eos_id;
    jm_shard_writer w;
    bool open;
    int nshards;
    uint64_t *shard_n; /* tokens per finished shard */
    uint64_t total;
} out_stream;

/* One run of prepare: what every step reads or fills. */
typedef struct {
    const jm_prepare_opts *o;
    const jm_tokenizer *tok;
    const char *field; /* the JSONL field holding a document */
    int threads;
    int part;          /* the files this run prepares: those of this part (1 without --part) */
    file_list fl;
    batch b;
    out_stream os;
    progress pg;
} prep;

/* A compressed JSONL file being read: decompressed bytes buf[start, end)
 * not yet handed out; no newline in buf[start, scan). */
typedef struct {
    const char *path;
    in_kind kind;
    gzFile gz;
    FILE *f;        /* zstd: the compressed input */
    ZSTD_DCtx *zd;
    uint8_t *in;    /* zstd: compressed bytes in[in_pos, in_len) not yet decoded */
    size_t in_cap, in_len, in_pos;
    size_t frame_left; /* zstd: ZSTD_decompressStream's last hint, 0 at a frame's end */
    char *buf;
    size_t cap, start, scan, end;
    bool eof;
    uint64_t raw;   /* compressed bytes read (progress) */
} zstream;

static jm_status check_set_kind(const jm_prepare_opts *o, jm_error *err);
static jm_status collect_inputs(const jm_prepare_opts *o, file_list *fl, jm_error *err);
static jm_status add_path(file_list *fl, const char *path, size_t rel, bool top, int depth, jm_error *err);
static void free_files(file_list *fl);
static void assign_parts(file_list *fl, int nparts);
static void inputs_digest(const file_list *fl, char *out, size_t cap);
static jm_status read_mapped(prep *P, int fi, jm_error *err);
static jm_status read_stream(prep *P, int fi, jm_error *err);
static jm_status batch_add(batch *b, const doc *d, jm_error *err);
static jm_status flush_if_full(prep *P, jm_error *err);
static jm_status batch_flush(prep *P, jm_error *err);
static void batch_free(batch *b);
static void encode_doc(const prep *P, doc *d);
static void shard_name(char *buf, size_t cap, const char *prefix, int i);
static jm_status stream_put(out_stream *os, const int32_t *ids, uint64_t n, jm_error *err);
static jm_status stream_finish(out_stream *os, jm_error *err);
static void stream_abort(out_stream *os);
static int prepare_proof(const char *path, const char *name);
static void remove_stale_shards(const prep *P, int keep);
static jm_status move_shards(const char *from, const char *to, const char *prefix, int n, jm_error *err);
static void remove_scratch(const char *dir, const char *prefix, int n);
static jm_status write_manifest(const prep *P, uint64_t docs, jm_error *err);
static double now_s(void);
static void progress_show(progress *pg, bool final);

jm_status jm_prepare(const jm_prepare_opts *o, uint64_t *tokens_written, jm_error *err)
{
    if (tokens_written) *tokens_written = 0;
    if (!o->tokenizer || !o->out_dir || o->ninputs < 1 || !o->inputs)
        return jm_fail(err, JM_ERR_ARG, "prepare: needs a tokenizer, inputs and an output directory");
    const char *field = o->text_field ? o->text_field : "text";
    bool field_ok = field[0] && strlen(field) <= MAX_FIELD;
    for (const char *c = field; *c && field_ok; c++) field_ok = (unsigned char)*c >= 0x20 && *c != 0x7f;
    if (!field_ok)
        return jm_fail(err, JM_ERR_ARG, "prepare: the text field must be a name of 1 to %d printable bytes",
                       MAX_FIELD);
    if (o->nparts < 0 || o->nparts > JM_MAX_PARTS || (o->nparts ? o->part < 1 || o->part > o->nparts : o->part != 0))
        return jm_fail(err, JM_ERR_ARG, "prepare: part %d of %d: a part is 1 to N of N parts, N at most %d", o->part,
                       o->nparts, JM_MAX_PARTS);
    /* What this run writes, and so may replace with overwrite: its own part's
     * names only, never another part's (README: What writes where). */
    char prefix[32] = "", manifest_name[64], shard_pattern[64], what[64] = "token shards";
    if (o->nparts) {
        snprintf(prefix, sizeof prefix, "part-%05d-of-%05d.", o->part, o->nparts);
        snprintf(what, sizeof what, "the token shards of part %d/%d", o->part, o->nparts);
    }
    snprintf(manifest_name, sizeof manifest_name, "%smanifest.json", prefix);
    snprintf(shard_pattern, sizeof shard_pattern, "%sshard_#####.bin", prefix);
    const char *const names[2] = {manifest_name, shard_pattern};
    const jm_output_set outputs = {what, names, 2, prepare_proof};
    const char **reads = malloc(((size_t)o->ninputs + 1) * sizeof *reads);
    if (!reads) return jm_fail(err, JM_ERR_NOMEM, "prepare: out of memory");
    memcpy(reads, o->inputs, (size_t)o->ninputs * sizeof *reads);
    reads[o->ninputs] = o->tokenizer;
    jm_status chk = jm_output_entries_check(o->out_dir, &outputs, reads, o->ninputs + 1, o->overwrite, err);
    free(reads);
    if (chk || (chk = check_set_kind(o, err))) return chk;
    jm_tokenizer *tok = NULL;
    jm_status st = jm_tokenizer_load(o->tokenizer, &tok, err);
    if (st) return st;
    int vocab = jm_tokenizer_vocab_size(tok), eos = jm_tokenizer_eos_id(tok);
    if (eos < 0 || eos >= vocab) {
        jm_tokenizer_free(tok);
        return jm_fail(err, JM_ERR_ARG, "%s: the tokenizer has no EOS token to separate documents", o->tokenizer);
    }

    char tmpdir[4200] = "";
    prep P = {.o = o, .tok = tok, .field = field, .threads = o->threads > 0 ? o->threads : omp_get_num_procs(),
              .part = o->nparts ? o->part : 1,
              .os = {.dir = tmpdir, .prefix = prefix,
                     .shard_tokens = o->shard_tokens ? o->shard_tokens : DEFAULT_SHARD_TOKENS,
                     .vocab_size = (uint32_t)vocab, .eos_id = (uint32_t)eos},
              .pg = {.t0 = now_s(), .tty = isatty(2)}};
    uint64_t ndocs = 0;
    st = collect_inputs(o, &P.fl, err);
    if (!st && P.fl.n == 0)
        st = jm_fail(err, JM_ERR_ARG, "prepare: no input files to tokenize (%d skipped)", P.fl.skipped);
    if (!st && o->nparts) assign_parts(&P.fl, o->nparts);
    for (int fi = 0; !st && fi < P.fl.n; fi++)
        if (P.fl.v[fi].part == P.part) {
            P.pg.nfiles++;
            P.pg.total_bytes += P.fl.v[fi].size;
        }
    if (!st && o->nparts && P.pg.nfiles == 0)
        fprintf(stderr, "prepare: note: part %d/%d has none of the %d input files (more parts than files, or "
                "large files): it writes an empty part\n", o->part, o->nparts, P.fl.n);
    if (!st) st = jm_mkdir_p(o->out_dir, err);
    /* Shards are written to a hidden scratch directory and moved into out_dir
     * only when all succeeded: a failed run (a malformed line halfway) leaves
     * the previous output whole. The sampler never reads hidden entries, and
     * each run has its own, so parts can share out_dir. */
    if (!st) {
        snprintf(tmpdir, sizeof tmpdir, "%s/.prepare.XXXXXX", o->out_dir);
        if (strlen(o->out_dir) > 4000 || !mkdtemp(tmpdir))
            st = jm_fail(err, JM_ERR_IO, "%s: cannot create a scratch directory: %s", o->out_dir,
                         strlen(o->out_dir) > 4000 ? "path too long" : strerror(errno));
        if (st) tmpdir[0] = 0;
    }
    P.pg.last = P.pg.t0;

    for (int fi = 0; fi < P.fl.n && !st; fi++) {
        const in_file *f = &P.fl.v[fi];
        if (f->part != P.part) continue;
        st = f->kind == IN_JSONL_GZ || f->kind == IN_JSONL_ZST ? read_stream(&P, fi, err) : read_mapped(&P, fi, err);
        if (!st) st = flush_if_full(&P, err);
        P.pg.files_done++;
        if (!st) progress_show(&P.pg, false);
    }
    if (!st) st = batch_flush(&P, err);
    for (int fi = 0; fi < P.fl.n; fi++) ndocs += P.fl.v[fi].docs;
    if (!st && P.os.total == 0 && !o->nparts)
        st = jm_fail(err, JM_ERR_ARG, "prepare: the inputs hold no text (all files empty)");
    if (!st) st = stream_finish(&P.os, err);
    if (!st) st = move_shards(tmpdir, o->out_dir, prefix, P.os.nshards, err);
    if (!st) {
        progress_show(&P.pg, true);
        remove_stale_shards(&P, P.os.nshards);
        st = write_manifest(&P, ndocs, err);
    } else {
        stream_abort(&P.os);
        if (P.pg.drawn && P.pg.tty) fputc('\n', stderr);
    }
    if (tmpdir[0]) remove_scratch(tmpdir, prefix, P.os.nshards);
    if (!st && tokens_written) *tokens_written = P.os.total;
    batch_free(&P.b);
    free(P.os.shard_n);
    free_files(&P.fl);
    jm_tokenizer_free(tok);
    return st;
}

/* ====================================================== helpers: the inputs */

/* One shard set per directory (the sampler refuses a mix): a prepare of all
 * the inputs does not write beside --part pieces, nor a part beside a whole
 * set or beside the pieces of a set cut into another number of parts. The
 * other parts' pieces of its own set are no concern of a part: they may be
 * written at the same time, and are never touched. */
static jm_status check_set_kind(const jm_prepare_opts *o, jm_error *err)
{
    struct stat st;
    char **names;
    int n;
    if (stat(o->out_dir, &st) != 0) return JM_OK; /* created later; jm_output_entries_check judged the path */
    jm_status s = jm_list_dir(o->out_dir, &names, &n, err);
    if (s) return s;
    for (int i = 0; i < n && !s; i++) {
        int p, np;
        jm_shard_entry k = jm_shard_entry_kind(names[i], &p, &np, NULL);
        bool piece = k == JM_ENTRY_PART_SHARD || k == JM_ENTRY_PART_MANIFEST;
        if (!o->nparts && piece)
            s = jm_fail(err, JM_ERR_ARG, "%s holds prepare --part pieces (%s); a prepare of all the inputs does not "
                        "join them: prepare into another directory, or give --part", o->out_dir, names[i]);
        else if (o->nparts && (k == JM_ENTRY_SHARD || k == JM_ENTRY_MANIFEST))
            s = jm_fail(err, JM_ERR_ARG, "%s holds the token shards of a prepare without --part (%s); part %d/%d "
                        "does not join them: prepare into another directory", o->out_dir, names[i], o->part,
                        o->nparts);
        else if (o->nparts && piece && np != o->nparts)
            s = jm_fail(err, JM_ERR_ARG, "%s holds pieces of a %d-part set (%s); part %d/%d is of a %d-part set: "
                        "prepare into another directory", o->out_dir, np, names[i], o->part, o->nparts, o->nparts);
    }
    jm_free_names(names, n);
    return s;
}

static jm_status collect_inputs(const jm_prepare_opts *o, file_list *fl, jm_error *err)
{
    for (int i = 0; i < o->ninputs; i++) {
        if (!o->inputs[i]) return jm_fail(err, JM_ERR_ARG, "prepare: input %d is NULL", i);
        jm_status st = add_path(fl, o->inputs[i], 0, true, 0, err);
        if (st) return st;
    }
    return JM_OK;
}

/* JSON lines by name: .jsonl, compressed .jsonl.gz / .jsonl.zst, and
 * Dolma's .json.gz / .json.zst (JSON lines too); anything else is text. */
static in_kind kind_of(const char *path)
{
    static const struct {
        const char *ext;
        in_kind kind;
    } ext[] = {{".jsonl", IN_JSONL},        {".jsonl.gz", IN_JSONL_GZ}, {".json.gz", IN_JSONL_GZ},
               {".jsonl.zst", IN_JSONL_ZST}, {".json.zst", IN_JSONL_ZST}};
    size_t len = strlen(path);
    for (size_t i = 0; i < sizeof ext / sizeof ext[0]; i++) {
        size_t k = strlen(ext[i].ext);
        if (len > k && strcasecmp(path + len - k, ext[i].ext) == 0) return ext[i].kind;
    }
    return IN_TEXT;
}

/* Adds a file, or a directory's files recursively (hidden entries skipped;
 * symlinked directories not followed, so a link cycle cannot loop). Files
 * with a NUL byte in their first 8 KB are binary and skipped with a note,
 * but for compressed JSONL, which is binary. rel: where the name under the
 * --input entry starts in path (set here for the entry itself). */
static jm_status add_path(file_list *fl, const char *path, size_t rel, bool top, int depth, jm_error *err)
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
        if (top) { /* the names below the entry: "dir/a/b.jsonl" -> "a/b.jsonl" (as jm_path_join joins) */
            rel = strlen(path);
            rel += rel && path[rel - 1] != '/';
        }
        char **names;
        int n;
        jm_status s = jm_list_dir(path, &names, &n, err);
        for (int i = 0; i < n && !s; i++) {
            char *p = jm_path_join(path, names[i]);
            s = p ? add_path(fl, p, rel, false, depth + 1, err)
                  : jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
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
    if (top) { /* a file named on its own: its base name */
        const char *slash = strrchr(path, '/');
        rel = slash ? (size_t)(slash - path) + 1 : 0;
    }
    in_kind kind = kind_of(path);
    int fd;
    size_t size;
    jm_status s = jm_open_regular(path, &fd, &size, err);
    if (s) return s;
    char probe[BINARY_PROBE];
    ssize_t got = kind == IN_JSONL_GZ || kind == IN_JSONL_ZST ? 0 : pread(fd, probe, sizeof probe, 0);
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
    in_file *f = &fl->v[fl->n];
    memset(f, 0, sizeof *f);
    if (!(f->path = strdup(path))) return jm_fail(err, JM_ERR_NOMEM, "prepare: out of memory");
    f->rel = rel <= strlen(path) ? rel : 0;
    f->size = size;
    f->kind = kind;
    f->part = 1;
    fl->n++;
    fl->bytes += size;
    return JM_OK;
}

static void free_files(file_list *fl)
{
    for (int i = 0; i < fl->n; i++) free(fl->v[i].path);
    free(fl->v);
}

/* The input list in nparts runs of consecutive files, of about equal bytes:
 * a file goes to the part its middle byte falls in (by count when all are
 * empty). Consecutive runs keep the set's token stream that of one prepare
 * over all the inputs; every host computes the same cut from the same list. */
static void assign_parts(file_list *fl, int nparts)
{
    unsigned __int128 before = 0, total = fl->bytes;
    for (int i = 0; i < fl->n; i++) {
        unsigned __int128 mid2 = 2 * before + fl->v[i].size; /* twice the middle byte's offset */
        uint64_t k = total ? (uint64_t)(mid2 * (unsigned)nparts / (2 * total))
                           : (uint64_t)i * (unsigned)nparts / (unsigned)fl->n;
        fl->v[i].part = (int)(k < (uint64_t)nparts ? k : (uint64_t)nparts - 1) + 1;
        before += fl->v[i].size;
    }
}

/* FNV-1a over every input's name under its --input entry and size, in order:
 * parts that saw the same list (however mounted) agree, the reader checks. */
static void inputs_digest(const file_list *fl, char *out, size_t cap)
{
    uint64_t h = 1469598103934665603ull;
    for (int i = 0; i < fl->n; i++) {
        char size[32];
        snprintf(size, sizeof size, "%" PRIu64, fl->v[i].size);
        const char *parts[3] = {fl->v[i].path + fl->v[i].rel, size, NULL};
        for (int k = 0; parts[k]; k++)
            for (const char *c = parts[k];; c++) { /* the NUL too: "ab"+"1" differs from "a"+"b1" */
                h = (h ^ (unsigned char)*c) * 1099511628211ull;
                if (!*c) break;
            }
    }
    snprintf(out, cap, "%016" PRIx64, h);
}

/* ====================================================== helpers: reading */

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

/* blank lines (a trailing newline, spacing) are not documents */
static bool blank(const char *p, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r') return false;
    return true;
}

/* JSONL line number `line` of file fi (without its '\n') into the batch;
 * bytes: the input it accounts for. A blank line counts, but is no document. */
static jm_status add_line(batch *b, int fi, uint64_t line, const char *p, size_t len, size_t bytes, jm_error *err)
{
    bool none = blank(p, len);
    doc d = {.p = none ? NULL : p, .len = none ? 0 : len, .file = fi, .line = line, .bytes = bytes};
    return batch_add(b, &d, err);
}

/* A plain file, mapped: a text file is one document, a JSONL file one a line. */
static jm_status read_mapped(prep *P, int fi, jm_error *err)
{
    mapping m = {0};
    jm_status st = map_file(P->fl.v[fi].path, &m, err);
    if (st) return st;
    const char *p = m.map, *end = p + m.len;
    if (P->fl.v[fi].kind == IN_TEXT) {
        doc d = {.p = p, .len = m.len, .file = fi, .bytes = m.len};
        if (m.len) st = batch_add(&P->b, &d, err);
    } else {
        uint64_t line = 0;
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        size_t dropped = 0; /* bytes at the mapping's start given back */
        while (p < end && !st) {
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            size_t len = (size_t)((nl ? nl : end) - p), adv = len + (nl ? 1 : 0);
            st = add_line(&P->b, fi, ++line, p, len, adv, err);
            p += adv;
            if (!st) st = flush_if_full(P, err);
            /* once a batch is encoded, no document points before p: the pages
             * read so far go back, so a file of any size costs a batch of RSS */
            size_t done = (size_t)(p - (const char *)m.map) / page * page;
            if (!st && P->b.n == 0 && done > dropped) {
                madvise(m.map, done, MADV_DONTNEED);
                dropped = done;
            }
        }
    }
    jm_status rs = batch_release_later(&P->b, &m, err);
    return st ? st : rs;
}

static void zs_close(zstream *z)
{
    if (z->gz) gzclose_r(z->gz);
    if (z->f) fclose(z->f);
    ZSTD_freeDCtx(z->zd);
    free(z->in);
    free(z->buf);
    memset(z, 0, sizeof *z);
}

static jm_status zs_open(zstream *z, const in_file *f, jm_error *err)
{
    memset(z, 0, sizeof *z);
    z->path = f->path;
    z->kind = f->kind;
    int fd;
    size_t size;
    jm_status st = jm_open_regular(f->path, &fd, &size, err);
    if (st) return st;
    z->cap = STREAM_START;
    if (!(z->buf = malloc(z->cap))) {
        close(fd);
        return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", f->path);
    }
    z->eof = size == 0; /* an empty file holds no records, compressed or not */
    if (f->kind == IN_JSONL_GZ) {
        if (!(z->gz = gzdopen(fd, "rb"))) {
            close(fd);
            return jm_fail(err, JM_ERR_NOMEM, "%s: cannot set up gzip reading: out of memory", f->path);
        }
        gzbuffer(z->gz, 1u << 17);
        /* zlib would pass bytes that are not gzip through as they are */
        if (size && gzdirect(z->gz))
            return jm_fail(err, JM_ERR_FORMAT, "%s: not gzip data (no gzip header at its start)", f->path);
        return JM_OK;
    }
    if (!(z->f = fdopen(fd, "rb"))) {
        st = jm_fail(err, JM_ERR_IO, "%s: %s", f->path, strerror(errno));
        close(fd);
        return st;
    }
    z->in_cap = ZSTD_DStreamInSize();
    if (!(z->zd = ZSTD_createDCtx()) || !(z->in = malloc(z->in_cap)))
        return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", f->path);
    return JM_OK;
}

/* Decompresses more into buf[end, cap): at least a byte, or sets eof. The
 * window a zstd frame may ask for stays at libzstd's default limit (128 MB),
 * so a file needing more (zstd --long=31) is refused, not obeyed. */
static jm_status zs_fill(zstream *z, jm_error *err)
{
    if (z->start) { /* keep the unfinished line at the front */
        memmove(z->buf, z->buf + z->start, z->end - z->start);
        z->end -= z->start;
        z->scan -= z->start;
        z->start = 0;
    }
    if (z->end == z->cap) { /* a line longer than the buffer (zs_line caps it) */
        size_t cap = 2 * z->cap < MAX_LINE + STREAM_START ? 2 * z->cap : MAX_LINE + STREAM_START;
        char *b = realloc(z->buf, cap);
        if (!b) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory for a %zu-byte line", z->path, z->end);
        z->buf = b;
        z->cap = cap;
    }
    size_t room = z->cap - z->end;
    if (z->kind == IN_JSONL_GZ) {
        int errnum = Z_OK;
        int got = gzread(z->gz, z->buf + z->end, (unsigned)(room < (1u << 30) ? room : (1u << 30)));
        z_off_t off = gzoffset(z->gz);
        if (off >= 0) z->raw = (uint64_t)off;
        const char *msg = gzerror(z->gz, &errnum);
        if (strncmp(msg, "<fd:", 4) == 0 && strstr(msg, ": ")) msg = strstr(msg, ": ") + 2; /* gzdopen's name */
        if (got < 0)
            return jm_fail(err, errnum == Z_ERRNO ? JM_ERR_IO : JM_ERR_FORMAT, "%s: %s: %s", z->path,
                           errnum == Z_ERRNO ? "read failed" : "corrupt gzip data",
                           errnum == Z_ERRNO ? strerror(errno) : msg);
        /* zlib reports a stream cut short only through gzerror, after the data */
        if (got == 0 && errnum == Z_BUF_ERROR)
            return jm_fail(err, JM_ERR_FORMAT, "%s: truncated gzip data (it ends inside a compressed stream)",
                           z->path);
        z->end += (size_t)got;
        z->eof = got == 0;
        return JM_OK;
    }
    for (;;) {
        if (z->in_pos == z->in_len) {
            z->in_len = fread(z->in, 1, z->in_cap, z->f);
            z->in_pos = 0;
            z->raw += z->in_len;
            if (z->in_len == 0 && ferror(z->f))
                return jm_fail(err, JM_ERR_IO, "%s: read failed: %s", z->path, strerror(errno));
        }
        bool no_input = z->in_pos == z->in_len;
        ZSTD_inBuffer in = {z->in, z->in_len, z->in_pos};
        ZSTD_outBuffer out = {z->buf + z->end, room, 0};
        size_t r = ZSTD_decompressStream(z->zd, &out, &in);
        if (ZSTD_isError(r) && ZSTD_getErrorCode(r) == ZSTD_error_frameParameter_windowTooLarge)
            return jm_fail(err, JM_ERR_FORMAT, "%s: a zstd frame that needs a window over 128 MB (made with zstd "
                           "--long?): recompress it without --long", z->path);
        if (ZSTD_isError(r))
            return jm_fail(err, JM_ERR_FORMAT, "%s: corrupt zstd data: %s", z->path, ZSTD_getErrorName(r));
        /* with nothing to read, the hint is the next frame's header size: only
         * a call that moved says whether the frame so far is complete */
        if (out.pos || in.pos != z->in_pos) z->frame_left = r;
        z->in_pos = in.pos;
        z->end += out.pos;
        if (out.pos) return JM_OK;
        if (no_input) { /* the file is read and nothing more comes out */
            if (z->frame_left)
                return jm_fail(err, JM_ERR_FORMAT, "%s: truncated zstd data (it ends inside a frame)", z->path);
            z->eof = true;
            return JM_OK;
        }
    }
}

/* The next line (without its '\n') at *p, valid until the next call; *got = 0
 * at the end of the file. lineno is the line's number, for messages. */
static jm_status zs_line(zstream *z, uint64_t lineno, const char **p, size_t *len, int *got, jm_error *err)
{
    *got = 0;
    for (;;) {
        char *nl = memchr(z->buf + z->scan, '\n', z->end - z->scan);
        size_t e = nl ? (size_t)(nl - z->buf) : z->end; /* the line's end, or what has come of it */
        if (e - z->start > MAX_LINE)
            return jm_fail(err, JM_ERR_FORMAT, "%s:%" PRIu64 ": a line longer than %zu MB (not JSON lines?)", z->path,
                           lineno, MAX_LINE >> 20);
        if (nl || (z->eof && z->end > z->start)) {
            *p = z->buf + z->start;
            *len = e - z->start;
            z->start = z->scan = nl ? e + 1 : e;
            *got = 1;
            return JM_OK;
        }
        z->scan = z->end;
        if (z->eof) return JM_OK;
        jm_status st = zs_fill(z, err);
        if (st) return st;
    }
}

/* A copy of a streamed line, kept until its batch is encoded. */
static jm_status arena_copy(batch *b, const char *p, size_t len, const char **out, jm_error *err)
{
    if (b->narena == 0 || len > b->arena_size - b->arena_used) {
        if (b->narena == b->cap_arena) {
            int cap = b->cap_arena ? 2 * b->cap_arena : 8;
            char **v = realloc(b->arena, (size_t)cap * sizeof *v);
            if (!v) return jm_fail(err, JM_ERR_NOMEM, "prepare: out of memory");
            b->arena = v;
            b->cap_arena = cap;
        }
        size_t size = len > ARENA_CHUNK ? len : ARENA_CHUNK;
        if (!(b->arena[b->narena] = malloc(size))) return jm_fail(err, JM_ERR_NOMEM, "prepare: out of memory");
        b->narena++;
        b->arena_used = 0;
        b->arena_size = size;
    }
    char *dst = b->arena[b->narena - 1] + b->arena_used;
    memcpy(dst, p, len);
    b->arena_used += len;
    *out = dst;
    return JM_OK;
}

/* A compressed JSONL file, decompressed as a stream through the same batches. */
static jm_status read_stream(prep *P, int fi, jm_error *err)
{
    zstream z;
    jm_status st = zs_open(&z, &P->fl.v[fi], err);
    uint64_t line = 0, counted = 0; /* compressed bytes already given to a document */
    while (!st) {
        const char *p = NULL;
        size_t len = 0;
        int got = 0;
        if ((st = zs_line(&z, line + 1, &p, &len, &got, err)) || !got) break;
        line++;
        if (!blank(p, len)) st = arena_copy(&P->b, p, len, &p, err);
        if (!st) st = add_line(&P->b, fi, line, p, len, (size_t)(z.raw - counted), err);
        counted = z.raw;
        if (!st) st = flush_if_full(P, err);
    }
    if (!st && z.raw > counted) { /* the rest of the file's bytes, for the progress line */
        doc d = {.file = fi, .bytes = (size_t)(z.raw - counted)};
        st = batch_add(&P->b, &d, err);
    }
    zs_close(&z);
    return st;
}

/* ====================================================== helpers: batches */

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
    b->held += d->len;
    return JM_OK;
}

static jm_status flush_if_full(prep *P, jm_error *err)
{
    return P->b.held >= BATCH_BYTES || P->b.n >= BATCH_DOCS ? batch_flush(P, err) : JM_OK;
}

/* What a batch holds besides its documents' ids: mappings and line copies. */
static void batch_release(batch *b)
{
    for (int i = 0; i < b->n; i++) {
        free(b->d[i].ids);
        free(b->d[i].error);
    }
    for (int i = 0; i < b->nrelease; i++)
        if (b->release[i].map) munmap(b->release[i].map, b->release[i].len);
    for (int i = 0; i < b->narena; i++) free(b->arena[i]);
    b->n = 0;
    b->held = 0;
    b->nrelease = 0;
    b->narena = 0;
}

/* Encodes the batch's documents in parallel, then appends them (each followed
 * by EOS) in input order; the first failing document in that order decides
 * the error, so the message too is the same for any thread count. */
static jm_status batch_flush(prep *P, jm_error *err)
{
    batch *b = &P->b;
    jm_status st = JM_OK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(P->threads)
    for (int i = 0; i < b->n; i++) encode_doc(P, &b->d[i]);
    for (int i = 0; i < b->n && !st; i++) {
        doc *d = &b->d[i];
        if (d->error) {
            st = jm_fail(err, JM_ERR_FORMAT, "%s", d->error);
            break;
        }
        if (d->len == 0) { /* empty: no document, not even an EOS */
            P->pg.bytes_done += d->bytes;
            continue;
        }
        int32_t e = (int32_t)P->os.eos_id;
        st = stream_put(&P->os, d->ids, d->n, err);
        if (!st) st = stream_put(&P->os, &e, 1, err);
        P->fl.v[d->file].docs++;
        P->fl.v[d->file].tokens += d->n + 1;
        P->pg.tokens += d->n + 1;
        P->pg.bytes_done += d->bytes;
    }
    batch_release(b);
    if (!st) progress_show(&P->pg, false);
    return st;
}

static void batch_free(batch *b)
{
    batch_release(b);
    free(b->d);
    free(b->release);
    free(b->arena);
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

/* Runs on a worker thread: touches only *d (and reads the tokenizer and the file list). */
static void encode_doc(const prep *P, doc *d)
{
    const char *file = P->fl.v[d->file].path;
    d->ids = NULL;
    d->n = 0;
    d->error = NULL;
    if (d->len == 0) return;
    jm_error e;
    if (!d->line) {
        if (jm_tokenizer_encode(P->tok, d->p, d->len, &d->ids, &d->n, &e))
            d->error = fmt_dup("%s: %s", file, e.msg);
        return;
    }
    char name[4200], *text;
    size_t n;
    snprintf(name, sizeof name, "%s:%" PRIu64, file, d->line);
    if (jm_jsonl_field(d->p, d->len, P->field, name, &text, &n, &e)) {
        d->error = strdup(e.msg);
    } else if (n == 0) {
        d->len = 0; /* "text": "" is an empty document: skipped like a blank line */
    } else if (jm_tokenizer_encode_special(P->tok, text, n, &d->ids, &d->n, &e)) {
        /* JSONL records are tokenized as Hugging Face does, special tokens
         * included: a chat record's "</s>" turn ends become EOS ids, as in
         * jm_chat_encode. Text and code files stay plain text ("</s>" is an
         * HTML tag there). */
        d->error = fmt_dup("%s: %s", name, e.msg);
    }
    free(text);
}

/* ====================================================== helpers: writing */

static void shard_name(char *buf, size_t cap, const char *prefix, int i)
{
    snprintf(buf, cap, "%sshard_%05d.bin", prefix, i);
}

static jm_status stream_put(out_stream *os, const int32_t *ids, uint64_t n, jm_error *err)
{
    while (n) {
        if (!os->open) {
            if (os->nshards >= JM_MAX_SHARDS)
                return jm_fail(err, JM_ERR_ARG, "%s: more than %d shards (raise the tokens per shard)", os->dir,
                               JM_MAX_SHARDS);
            char name[64];
            shard_name(name, sizeof name, os->prefix, os->nshards);
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

/* The proof that an existing entry of prepare's names is a previous
 * prepare's: a shard's magic, a manifest's format. */
static int prepare_proof(const char *path, const char *name)
{
    jm_shard_entry k = jm_shard_entry_kind(name, NULL, NULL, NULL);
    if (k != JM_ENTRY_MANIFEST && k != JM_ENTRY_PART_MANIFEST) {
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
    int ours = cJSON_IsString(format) && strcmp(format->valuestring, JM_MANIFEST_FORMAT) == 0;
    cJSON_Delete(root);
    return ours;
}

/* A re-run with less text must not leave the old run's later shards behind
 * for the sampler to read: remove this run's shard names (its part's only)
 * from index `keep` on (only token shards: the check before the run refused
 * anything else of those names). */
static void remove_stale_shards(const prep *P, int keep)
{
    const char *dir = P->o->out_dir;
    char **names;
    int n;
    if (jm_list_dir(dir, &names, &n, NULL)) return;
    for (int i = 0; i < n; i++) {
        int p = 0, np = 0, idx = 0;
        jm_shard_entry k = jm_shard_entry_kind(names[i], &p, &np, &idx);
        bool ours = P->o->nparts ? k == JM_ENTRY_PART_SHARD && p == P->o->part && np == P->o->nparts
                                 : k == JM_ENTRY_SHARD;
        if (ours && idx >= keep) {
            char *path = jm_path_join(dir, names[i]);
            if (path && prepare_proof(path, names[i]) && unlink(path) == 0)
                fprintf(stderr, "prepare: removed stale %s\n", path);
            free(path);
        }
    }
    jm_free_names(names, n);
}

static jm_status move_shards(const char *from, const char *to, const char *prefix, int n, jm_error *err)
{
    for (int i = 0; i < n; i++) {
        char name[64];
        shard_name(name, sizeof name, prefix, i);
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
static void remove_scratch(const char *dir, const char *prefix, int n)
{
    for (int i = 0; i < n; i++) {
        char name[64];
        shard_name(name, sizeof name, prefix, i);
        char *p = jm_path_join(dir, name);
        if (p) unlink(p);
        free(p);
    }
    rmdir(dir);
}

/* manifest.json (or this part's): the tokenizer, the counts, the shards and
 * the files they came from. A part's adds part, parts and the whole input
 * list's size and digest, which jm_shard_list compares across the parts. */
static jm_status write_manifest(const prep *P, uint64_t docs, jm_error *err)
{
    const jm_prepare_opts *o = P->o;
    const file_list *fl = &P->fl;
    const out_stream *os = &P->os;
    cJSON *root = cJSON_CreateObject(), *shards = NULL, *files = NULL;
    bool ok = root != NULL;
    ok = ok && cJSON_AddStringToObject(root, "format", JM_MANIFEST_FORMAT);
    ok = ok && cJSON_AddStringToObject(root, "tokenizer", o->tokenizer);
    ok = ok && cJSON_AddNumberToObject(root, "vocab_size", jm_tokenizer_vocab_size(P->tok));
    ok = ok && cJSON_AddNumberToObject(root, "eos_id", jm_tokenizer_eos_id(P->tok));
    ok = ok && cJSON_AddNumberToObject(root, "bytes_per_token", os->vocab_size <= 65536 ? 2 : 4);
    ok = ok && cJSON_AddStringToObject(root, "text_field", P->field);
    ok = ok && cJSON_AddNumberToObject(root, "tokens", (double)os->total);
    ok = ok && cJSON_AddNumberToObject(root, "documents", (double)docs);
    if (o->nparts) {
        char digest[32];
        inputs_digest(fl, digest, sizeof digest);
        ok = ok && cJSON_AddNumberToObject(root, "part", o->part) && cJSON_AddNumberToObject(root, "parts", o->nparts);
        ok = ok && cJSON_AddNumberToObject(root, "inputs", fl->n) &&
             cJSON_AddNumberToObject(root, "input_bytes", (double)fl->bytes) &&
             cJSON_AddStringToObject(root, "inputs_digest", digest);
    }
    ok = ok && (shards = cJSON_AddArrayToObject(root, "shards")) && (files = cJSON_AddArrayToObject(root, "sources"));
    for (int i = 0; i < os->nshards && ok; i++) {
        char name[64];
        shard_name(name, sizeof name, os->prefix, i);
        cJSON *s = cJSON_CreateObject();
        ok = s && cJSON_AddItemToArray(shards, s) && cJSON_AddStringToObject(s, "file", name) &&
             cJSON_AddNumberToObject(s, "tokens", (double)os->shard_n[i]);
    }
    for (int i = 0; i < fl->n && ok; i++) {
        if (fl->v[i].part != P->part) continue;
        cJSON *f = cJSON_CreateObject();
        ok = f && cJSON_AddItemToArray(files, f) && cJSON_AddStringToObject(f, "path", fl->v[i].path) &&
             cJSON_AddNumberToObject(f, "bytes", (double)fl->v[i].size) &&
             cJSON_AddNumberToObject(f, "documents", (double)fl->v[i].docs) &&
             cJSON_AddNumberToObject(f, "tokens", (double)fl->v[i].tokens);
    }
    char name[64];
    snprintf(name, sizeof name, "%smanifest.json", os->prefix);
    char *path = jm_path_join(o->out_dir, name);
    jm_status st = ok && path ? jm_write_json(path, root, err)
                              : jm_fail(err, JM_ERR_NOMEM, "%s/%s: out of memory", o->out_dir, name);
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
    return jm_jsonl_field(line, len, "text", where, text, n, err);
}

jm_status jm_jsonl_field(const char *line, size_t len, const char *field, const char *where, char **text, size_t *n,
                         jm_error *err)
{
    *text = NULL;
    *n = 0;
    cJSON *root = NULL;
    jm_status s = jm_json_parse(line, len, where, &root, err); /* strict: UTF-8, no NUL byte, no duplicate key */
    if (s) return s;
    const cJSON *t = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, field) : NULL;
    if (!cJSON_IsString(t)) {
        if (cJSON_IsObject(root)) s = jm_fail(err, JM_ERR_FORMAT, "%s: no \"%s\" string field", where, field);
        else s = jm_fail(err, JM_ERR_FORMAT, "%s: not a JSON object", where);
        cJSON_Delete(root);
        return s;
    }
    /* cJSON decodes "\u0000" to a NUL that ends its string; decode the field
     * again from the line, whole: find it among the top-level keys. */
    char *out = malloc(len + 1);
    const char *p = skip_ws(line, line + len), *end = line + len;
    const size_t flen = strlen(field);
    long got = -1;
    if (out && p < end && *p == '{') p = skip_ws(p + 1, end);
    while (out && p && p < end && *p == '"') {
        long kl = decode_string(&p, end, out);
        bool is_text = kl >= 0 && (size_t)kl == flen && memcmp(out, field, flen) == 0;
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
        s = jm_fail(err, JM_ERR_FORMAT, "%s: cannot read the \"%s\" field", where, field);
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
