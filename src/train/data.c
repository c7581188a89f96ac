/* data.c — token shards and the mixture sampler.
 *
 * A shard is a 64-byte header and a flat array of little-endian token ids
 * (format in data.h). Every shard is validated whole when opened — header
 * fields, size, and every id below the vocabulary size — so that nothing
 * downstream (the embedding lookup, the loss) ever sees an id it cannot index.
 *
 * The sampler reads each source (a directory of shards) as one stream and
 * serves seq_len-token windows from it; which source serves the next draw is
 * a deterministic deficit rule, so the realised mixture tracks the weights to
 * within a draw at every step, and the whole cursor is a few integers. */
#include "train/data.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "data.c assumes a little-endian host (shards are little-endian)"
#endif

#define SHARD_VERSION 1

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
    uint32_t eos_id; /* every shard's, the same in all */
    source *src;
};

static uint32_t rd32(const uint8_t *p);
static uint64_t rd64(const uint8_t *p);
static void wr32(uint8_t *p, uint32_t v);
static void wr64(uint8_t *p, uint64_t v);
static uint64_t splitmix64(uint64_t x);
static jm_status open_source(source *src, const char *name, const char *dir, uint32_t vocab_size,
                             uint32_t *eos, char *eos_from, size_t eos_from_len, jm_error *err);
static void free_source(source *src);
static void read_window(const source *src, uint64_t pos, int32_t *out, int len);
static jm_status check_part_set(const char *dir, char *const *names, int n, jm_error *err);

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

jm_status jm_shard_list(const char *dir, char ***paths, int *n, jm_error *err)
{
    char **names;
    int nnames, k = 0;
    jm_status s = jm_list_dir(dir, &names, &nnames, err);
    if (s) return s;
    if ((s = check_part_set(dir, names, nnames, err))) {
        jm_free_names(names, nnames);
        return s;
    }
    for (int i = 0; i < nnames; i++) { /* names[0 .. k) become paths; k <= i */
        char *name = names[i];
        size_t len = strlen(name);
        if (!s && len > 4 && strcmp(name + len - 4, ".bin") == 0) {
            char *path = jm_path_join(dir, name);
            if (path) names[k++] = path;
            else s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dir);
        }
        free(name);
    }
    if (s) {
        jm_free_names(names, k);
        return s;
    }
    *paths = names;
    *n = k;
    return JM_OK;
}

jm_status jm_shard_write(const char *path, const int32_t *ids, uint64_t n, uint32_t vocab_size, uint32_t eos_id,
                         jm_error *err)
{
    jm_shard_writer w;
    jm_status st = jm_shard_writer_open(&w, path, vocab_size, eos_id, err);
    if (st) return st;
    st = jm_shard_writer_put(&w, ids, n, err);
    if (st) {
        jm_atomic_abort(&w.a);
        return st;
    }
    return jm_shard_writer_commit(&w, err);
}

/* Reads the NNNNN digits at s; -1 unless there are exactly n of them. */
static int digits(const char *s, int n)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

jm_shard_entry jm_shard_entry_kind(const char *name, int *part, int *nparts, int *shard)
{
    const char *s = name;
    int p = 0, np = 0, idx = 0;
    bool in_part = strncmp(s, "part-", 5) == 0;
    if (in_part) { /* "part-IIIII-of-NNNNN." */
        p = digits(s + 5, 5); /* each step reads on only past characters that matched */
        np = p >= 1 && strncmp(s + 10, "-of-", 4) == 0 ? digits(s + 14, 5) : -1;
        if (p < 1 || np < p || s[19] != '.') return JM_ENTRY_OTHER;
        s += 20;
    }
    jm_shard_entry k = JM_ENTRY_OTHER;
    if (strcmp(s, "manifest.json") == 0) {
        k = in_part ? JM_ENTRY_PART_MANIFEST : JM_ENTRY_MANIFEST;
    } else if (strlen(s) == 15 && strncmp(s, "shard_", 6) == 0 && strcmp(s + 11, ".bin") == 0 &&
               (idx = digits(s + 6, 5)) >= 0) {
        k = in_part ? JM_ENTRY_PART_SHARD : JM_ENTRY_SHARD;
    }
    if (k != JM_ENTRY_OTHER) {
        if (part) *part = p;
        if (nparts) *nparts = np;
        if (shard) *shard = idx;
    }
    return k;
}

/* ============================================================ part sets */

/* The numbers a part's manifest must hold; the shards it lists are checked
 * against the directory as they are read. */
typedef struct {
    double vocab, eos, bpt, inputs;
    char digest[40];
} part_info;

static int cmp_name(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The index of name among the directory's entries (jm_list_dir sorts them bytewise), or -1. */
static int find_name(char *const *names, int n, const char *name)
{
    char *const *at = n ? bsearch(&name, names, (size_t)n, sizeof *names, cmp_name) : NULL;
    return at ? (int)(at - names) : -1;
}

static const cJSON *field_of(const cJSON *o, const char *key)
{
    return cJSON_GetObjectItemCaseSensitive(o, key);
}

static bool whole(const cJSON *j, double lo, double hi, double *out)
{
    if (!cJSON_IsNumber(j) || !isfinite(j->valuedouble) || j->valuedouble != floor(j->valuedouble) ||
        j->valuedouble < lo || j->valuedouble > hi)
        return false;
    *out = j->valuedouble;
    return true;
}

/* Part p of nparts: its manifest (the entry called mname in dir) read and
 * checked; each shard it lists is marked in listed[] (by index into names). */
static jm_status read_part(const char *dir, const char *mname, int p, int nparts, char *const *names, int n,
                           bool *listed, part_info *pi, jm_error *err)
{
    char *path = jm_path_join(dir, mname), *text = NULL;
    size_t len;
    cJSON *root = NULL;
    if (!path) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dir);
    jm_status s = jm_read_file(path, (size_t)1 << 30, &text, &len, err);
    if (!s) s = jm_json_parse(text, len, path, &root, err);
    free(text);
    const cJSON *format = s ? NULL : field_of(root, "format"), *shards = s ? NULL : field_of(root, "shards");
    const cJSON *digest = s ? NULL : field_of(root, "inputs_digest");
    double part = 0, np = 0;
    if (!s && !(cJSON_IsString(format) && strcmp(format->valuestring, JM_MANIFEST_FORMAT) == 0))
        s = jm_fail(err, JM_ERR_FORMAT, "%s: not a jetmoe token shard manifest (format is not \"%s\")", path,
                    JM_MANIFEST_FORMAT);
    else if (!s && !(whole(field_of(root, "part"), 1, JM_MAX_PARTS, &part) &&
                     whole(field_of(root, "parts"), 1, JM_MAX_PARTS, &np) && part == p && np == nparts))
        s = jm_fail(err, JM_ERR_FORMAT, "%s: its fields part and parts do not say %d and %d, as its name does", path,
                    p, nparts);
    else if (!s && !(whole(field_of(root, "vocab_size"), 1, INT32_MAX, &pi->vocab) &&
                     whole(field_of(root, "eos_id"), 0, INT32_MAX, &pi->eos) &&
                     whole(field_of(root, "bytes_per_token"), 2, 4, &pi->bpt) && pi->bpt != 3 &&
                     whole(field_of(root, "inputs"), 0, 1e15, &pi->inputs) && cJSON_IsString(digest) &&
                     strlen(digest->valuestring) < sizeof pi->digest && cJSON_IsArray(shards)))
        s = jm_fail(err, JM_ERR_FORMAT,
                    "%s: a part manifest needs vocab_size, eos_id, bytes_per_token (2 or 4), inputs, inputs_digest "
                    "and shards",
                    path);
    if (!s) snprintf(pi->digest, sizeof pi->digest, "%s", digest->valuestring);
    const cJSON *sh = s ? NULL : shards->child;
    for (int i = 0; sh && !s; sh = sh->next, i++) {
        const cJSON *file = field_of(sh, "file");
        double tokens = 0;
        int sp = 0, snp = 0, idx = -1;
        if (!cJSON_IsString(file) || !whole(field_of(sh, "tokens"), 0, 9e15, &tokens) ||
            jm_shard_entry_kind(file->valuestring, &sp, &snp, &idx) != JM_ENTRY_PART_SHARD || sp != p ||
            snp != nparts || idx != i) {
            s = jm_fail(err, JM_ERR_FORMAT, "%s: shards[%d] is not {\"file\": \"part-%05d-of-%05d.shard_%05d.bin\", "
                        "\"tokens\": N}", path, i, p, nparts, i);
            break;
        }
        int at = find_name(names, n, file->valuestring);
        char *sp_path = jm_path_join(dir, file->valuestring);
        struct stat st;
        if (!sp_path) {
            s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dir);
        } else if (at < 0 || stat(sp_path, &st) != 0) {
            s = jm_fail(err, JM_ERR_ARG, "%s: part %d/%d is incomplete: %s, which its manifest lists, is missing",
                        dir, p, nparts, file->valuestring);
        } else if ((double)st.st_size != JM_SHARD_HEADER + tokens * pi->bpt) {
            s = jm_fail(err, JM_ERR_ARG, "%s: %lld bytes, but part %d/%d's manifest says %.0f tokens of %.0f bytes "
                        "(a shard of another run?)", sp_path, (long long)st.st_size, p, nparts, tokens, pi->bpt);
        } else {
            listed[at] = true;
        }
        free(sp_path);
    }
    cJSON_Delete(root);
    free(path);
    return s;
}

/* A directory holding --part pieces: all nparts manifests there, agreeing,
 * and their shards exactly; a directory with none is left to the caller as
 * before. names: the directory's entries. */
static jm_status check_part_set(const char *dir, char *const *names, int n, jm_error *err)
{
    int nparts = 0, single = -1, first = -1;
    for (int i = 0; i < n; i++) {
        int p, np;
        jm_shard_entry k = jm_shard_entry_kind(names[i], &p, &np, NULL);
        if (k == JM_ENTRY_SHARD || k == JM_ENTRY_MANIFEST) {
            if (single < 0) single = i;
        } else if (k == JM_ENTRY_PART_SHARD || k == JM_ENTRY_PART_MANIFEST) {
            if (first < 0) {
                first = i;
                nparts = np;
            } else if (np != nparts) {
                return jm_fail(err, JM_ERR_ARG, "%s: holds pieces of a %d-part set (%s) and of a %d-part set (%s): "
                               "one shard set per directory", dir, nparts, names[first], np, names[i]);
            }
        }
    }
    if (first < 0) return JM_OK;
    if (single >= 0)
        return jm_fail(err, JM_ERR_ARG, "%s: holds both a prepare's %s and prepare --part pieces (%s): one shard set "
                       "per directory", dir, names[single], names[first]);
    bool *listed = calloc((size_t)n + 1, sizeof *listed);
    if (!listed) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dir);
    jm_status s = JM_OK;
    part_info first_pi = {0};
    for (int p = 1; p <= nparts && !s; p++) {
        char mname[64];
        snprintf(mname, sizeof mname, "part-%05d-of-%05d.manifest.json", p, nparts);
        if (find_name(names, n, mname) < 0) {
            s = jm_fail(err, JM_ERR_ARG, "%s: part %d/%d missing (no %s): its prepare --part %d/%d has not finished "
                        "here, or its files were not copied here", dir, p, nparts, mname, p, nparts);
            break;
        }
        part_info pi = {0};
        s = read_part(dir, mname, p, nparts, names, n, listed, &pi, err);
        if (s) break;
        if (p == 1) {
            first_pi = pi;
        } else if (pi.inputs != first_pi.inputs || strcmp(pi.digest, first_pi.digest) != 0) {
            s = jm_fail(err, JM_ERR_ARG, "%s: part %d/%d was prepared from other inputs than part 1/%d (%.0f files, "
                        "digest %s; part 1 saw %.0f, digest %s): every part must be given the same --input list",
                        dir, p, nparts, nparts, pi.inputs, pi.digest, first_pi.inputs, first_pi.digest);
        } else if (pi.vocab != first_pi.vocab || pi.eos != first_pi.eos) {
            s = jm_fail(err, JM_ERR_ARG, "%s: part %d/%d was made with another tokenizer than part 1/%d (vocab %.0f, "
                        "EOS %.0f; part 1: vocab %.0f, EOS %.0f)", dir, p, nparts, nparts, pi.vocab, pi.eos,
                        first_pi.vocab, first_pi.eos);
        }
    }
    for (int i = 0; i < n && !s; i++)
        if (!listed[i] && jm_shard_entry_kind(names[i], NULL, NULL, NULL) == JM_ENTRY_PART_SHARD)
            s = jm_fail(err, JM_ERR_ARG, "%s: %s is listed in no part's manifest (left by another run?): move it "
                        "away or prepare that part again with --overwrite", dir, names[i]);
    free(listed);
    return s;
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
    s->eos_id = eos;
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

uint32_t jm_sampler_eos_id(const jm_sampler *s)
{
    return s->eos_id;
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


/* ============================================ helpers: streaming shard writer */

/* The header goes first with a zero count, the ids stream after it, and the
 * count is patched in before the rename: no shard is ever held in memory. */
jm_status jm_shard_writer_open(jm_shard_writer *w, const char *path, uint32_t vocab_size, uint32_t eos_id,
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

jm_status jm_shard_writer_put(jm_shard_writer *w, const int32_t *ids, uint64_t n, jm_error *err)
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

jm_status jm_shard_writer_commit(jm_shard_writer *w, jm_error *err)
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
    if (!(src->name = strdup(name)) || !(src->dir = strdup(dir)))
        return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dir);
    char **paths;
    int nbin;
    jm_status st = jm_shard_list(dir, &paths, &nbin, err);
    if (st) return st;
    if (nbin == 0) {
        free(paths);
        return jm_fail(err, JM_ERR_ARG, "%s: source \"%s\" has no token shards (*.bin)", dir, name);
    }
    src->shards = calloc((size_t)nbin, sizeof *src->shards);
    src->start = calloc((size_t)nbin, sizeof *src->start);
    if (!src->shards || !src->start) st = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dir);
    for (int i = 0; i < nbin && !st; i++) {
        const char *path = paths[i];
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
    }
    jm_free_names(paths, nbin);
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
