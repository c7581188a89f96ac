/* test_data.c — token shards (round trip, malformed files), the mixture
 * sampler (determinism, shares, phases, resume, wrap-around, validation) and
 * prepare (thread-count independence, documents and EOS, JSONL errors).
 * Prints "PASS <name>" or "FAIL <name>: <why>" per check; exits 0 iff nothing
 * failed. Run from the repository root. */
#include "train/data.h"
#include "harness.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <math.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* paths here are short mkdtemp names; gcc cannot know that */
#pragma GCC diagnostic ignored "-Wformat-truncation"

static void mkdir_or_die(const char *path)
{
    if (mkdir(path, 0777) != 0) {
        fprintf(stderr, "cannot mkdir %s\n", path);
        exit(2);
    }
}

static uint64_t rng_next(uint64_t *s)
{
    *s += 0x9e3779b97f4a7c15ull;
    uint64_t z = *s;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ================================================================ shards */

static void test_roundtrip(const char *dir, const char *name, uint32_t vocab, int want_bpt)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s.bin", dir, name);
    uint64_t n = 10007, seed = vocab;
    int32_t *ids = malloc(n * sizeof *ids);
    for (uint64_t i = 0; i < n; i++) ids[i] = (int32_t)(rng_next(&seed) % vocab);
    ids[0] = 0;
    ids[1] = (int32_t)(vocab - 1); /* both ends of the range */
    jm_error err = {{0}};
    jm_shard sh;
    jm_status s = jm_shard_write(path, ids, n, vocab, 2, &err);
    if (!s) s = jm_shard_open(path, &sh, &err);
    if (s) {
        check(false, name, "%s", err.msg);
        goto done;
    }
    bool same = sh.n == n && sh.bytes_per_token == want_bpt && sh.vocab_size == vocab && sh.eos_id == 2;
    for (uint64_t i = 0; same && i < n; i++) same = jm_shard_token(&sh, i) == (uint32_t)ids[i];
    struct stat st;
    stat(path, &st);
    check(same && (uint64_t)st.st_size == JM_SHARD_HEADER + n * (uint64_t)want_bpt && count_entries(dir, ".tmp.") == 0,
          name, "n %" PRIu64 " bpt %d vocab %u eos %u size %lld", sh.n, sh.bytes_per_token, sh.vocab_size,
          sh.eos_id, (long long)st.st_size);
    jm_shard_close(&sh);
done:
    free(ids);
}

static void test_write_rejects(const char *dir)
{
    char path[512];
    snprintf(path, sizeof path, "%s/reject.bin", dir);
    int32_t ids[4] = {5, 7, 1000, 3};
    jm_error err = {{0}};
    jm_status s = jm_shard_write(path, ids, 4, 1000, 2, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "reject.bin") && strstr(err.msg, "token 2 is id 1000") &&
              access(path, F_OK) != 0 && count_entries(dir, ".tmp.") == 0,
          "shard_write_rejects_id_ge_vocab", "status %s: %s", jm_status_name(s), err.msg);
    ids[2] = -1;
    s = jm_shard_write(path, ids, 4, 1000, 2, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "id -1") && access(path, F_OK) != 0, "shard_write_rejects_negative_id",
          "status %s: %s", jm_status_name(s), err.msg);
    s = jm_shard_write(path, ids, 0, 1000, 1000, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "EOS id 1000"), "shard_write_rejects_eos_ge_vocab", "status %s: %s",
          jm_status_name(s), err.msg);
    s = jm_shard_write(path, ids, 0, 1000, 2, &err);
    jm_shard sh;
    if (!s) s = jm_shard_open(path, &sh, &err);
    if (check(s == JM_OK, "shard_empty_roundtrip", "%s", err.msg)) {
        check(sh.n == 0, "shard_empty_count", "n = %" PRIu64, sh.n);
        jm_shard_close(&sh);
    }
}

/* A valid 4-token u16 header image to mutate. */
static void good_shard(uint8_t *b, size_t *len)
{
    memset(b, 0, 128);
    memcpy(b, JM_SHARD_MAGIC, 8);
    b[8] = 1;          /* version */
    b[12] = 2;         /* bytes per token */
    b[16] = 4;         /* count */
    b[24] = 0xe8, b[25] = 0x03; /* vocab 1000 */
    b[28] = 2;         /* eos */
    for (int i = 0; i < 4; i++) b[64 + 2 * i] = (uint8_t)(10 + i);
    *len = 64 + 8;
}

static void expect_bad(const char *dir, const char *name, const uint8_t *b, size_t len, const char *want)
{
    char path[512], test[128];
    snprintf(path, sizeof path, "%s/%s.bin", dir, name);
    snprintf(test, sizeof test, "bad_shard_%s", name);
    write_bytes(path, b, len);
    jm_shard sh;
    jm_error err = {{0}};
    jm_status s = jm_shard_open(path, &sh, &err);
    if (s == JM_OK) {
        check(false, test, "accepted (%" PRIu64 " tokens)", sh.n);
        jm_shard_close(&sh);
        return;
    }
    check(s == JM_ERR_FORMAT && strncmp(err.msg, path, strlen(path)) == 0 && strstr(err.msg, want) &&
              sh.map == NULL,
          test, "status %s, message %s (want the path and \"%s\")", jm_status_name(s), err.msg, want);
    unlink(path);
}

static void test_malformed(const char *dir)
{
    uint8_t b[128];
    size_t len;
    good_shard(b, &len);
    char path[512];
    snprintf(path, sizeof path, "%s/good.bin", dir);
    write_bytes(path, b, len);
    jm_shard sh;
    jm_error err = {{0}};
    jm_status s = jm_shard_open(path, &sh, &err);
    if (check(s == JM_OK, "bad_shard_control_is_good", "%s", err.msg)) jm_shard_close(&sh);

    good_shard(b, &len), b[0] = 'X';
    expect_bad(dir, "magic", b, len, "bad magic");
    good_shard(b, &len), b[8] = 2;
    expect_bad(dir, "version", b, len, "unsupported shard version 2");
    good_shard(b, &len), b[12] = 3;
    expect_bad(dir, "bytes_per_token", b, len, "bytes per token is 3");
    good_shard(b, &len);
    expect_bad(dir, "truncated_header", b, 40, "truncated");
    expect_bad(dir, "empty_file", b, 0, "truncated");
    good_shard(b, &len);
    expect_bad(dir, "truncated_tokens", b, len - 2, "header says 4 tokens");
    good_shard(b, &len);
    expect_bad(dir, "trailing_bytes", b, len + 2, "header says 4 tokens");
    good_shard(b, &len);
    expect_bad(dir, "odd_byte", b, len + 1, "token count mismatch");
    good_shard(b, &len), b[16] = 0xff, b[23] = 0xff; /* a count whose byte size overflows 64 bits */
    expect_bad(dir, "huge_count", b, len, "token count mismatch");
    good_shard(b, &len), b[28] = 0xe8, b[29] = 0x03;
    expect_bad(dir, "eos_eq_vocab", b, len, "EOS id 1000 is not below the vocab size 1000");
    good_shard(b, &len), b[24] = b[25] = 0;
    expect_bad(dir, "zero_vocab", b, len, "vocab size is 0");
    good_shard(b, &len), b[24] = 1, b[25] = 0, b[26] = 1; /* 65537 */
    expect_bad(dir, "u16_vocab_too_big", b, len, "does not fit 2-byte tokens");
    good_shard(b, &len), b[40] = 1;
    expect_bad(dir, "reserved_nonzero", b, len, "reserved header bytes");
    good_shard(b, &len), b[64 + 4] = 0xe8, b[64 + 5] = 0x03; /* token 2 = 1000 */
    expect_bad(dir, "token_ge_vocab", b, len, "token 2 is id 1000");
    /* u32 tokens with an id beyond the vocabulary */
    good_shard(b, &len), b[12] = 4, memset(b + 64, 0, 16), b[64 + 12] = 0xff, b[64 + 15] = 0x7f, len = 64 + 16;
    expect_bad(dir, "u32_token_ge_vocab", b, len, "token 3 is id 2130706687");

    snprintf(path, sizeof path, "%s/no_such.bin", dir);
    s = jm_shard_open(path, &sh, &err);
    check(s == JM_ERR_IO && strstr(err.msg, "no_such.bin"), "bad_shard_missing_file", "status %s: %s",
          jm_status_name(s), err.msg);
    s = jm_shard_open(dir, &sh, &err);
    check(s == JM_ERR_IO && strstr(err.msg, "not a regular file"), "bad_shard_directory", "status %s: %s",
          jm_status_name(s), err.msg);
}

/* ================================================================ sampler */

/* Writes one source directory whose stream is ids base, base+1, ... (mod
 * vocab, skipping nothing) split into shards of the given sizes. */
static void make_source(const char *dir, const uint64_t *sizes, int nshards, uint32_t vocab, uint32_t eos,
                        int32_t base)
{
    mkdir_or_die(dir);
    int32_t next = base;
    for (int k = 0; k < nshards; k++) {
        int32_t *ids = malloc((sizes[k] + 1) * sizeof *ids);
        for (uint64_t i = 0; i < sizes[k]; i++) ids[i] = next++ % (int32_t)vocab;
        char path[600];
        snprintf(path, sizeof path, "%s/part_%03d.bin", dir, k);
        jm_error err;
        if (jm_shard_write(path, ids, sizes[k], vocab, eos, &err)) {
            fprintf(stderr, "make_source: %s\n", err.msg);
            exit(2);
        }
        free(ids);
    }
}

typedef struct {
    char dirs[4][512];
    const char *names[4];
    const char *dptr[4];
    uint64_t tokens[4];
} fixture;

static const uint32_t V = 5000;

static void make_fixture(const char *root, fixture *fx)
{
    static const char *nm[4] = {"prose", "code", "math", "chat"};
    /* distinct sizes, several shards, an empty shard, seq_len never divides */
    static const uint64_t s0[3] = {3001, 0, 2999}, s1[2] = {1777, 1234}, s2[1] = {997}, s3[4] = {100, 200, 300, 411};
    const uint64_t *sz[4] = {s0, s1, s2, s3};
    int ns[4] = {3, 2, 1, 4};
    for (int i = 0; i < 4; i++) {
        snprintf(fx->dirs[i], sizeof fx->dirs[i], "%s/%s", root, nm[i]);
        make_source(fx->dirs[i], sz[i], ns[i], V, 2, 1000 * i + 3);
        fx->names[i] = nm[i];
        fx->dptr[i] = fx->dirs[i];
        fx->tokens[i] = 0;
        for (int k = 0; k < ns[i]; k++) fx->tokens[i] += sz[i][k];
    }
}

static jm_sampler *open_fixture(const fixture *fx, int seq_len, uint64_t seed, const double *w)
{
    jm_sampler *s = NULL;
    jm_error err = {{0}};
    if (jm_sampler_open(fx->names, fx->dptr, 4, seq_len, seed, V, &s, &err) ||
        (w && jm_sampler_set_mixture(s, w, &err))) {
        check(false, "sampler_open", "%s", err.msg);
        jm_sampler_free(s);
        return NULL;
    }
    return s;
}

static void test_sampler_determinism(const fixture *fx)
{
    const double w[4] = {0.4, 0.3, 0.2, 0.1};
    const int L = 64, N = 3000;
    jm_sampler *a = open_fixture(fx, L, 42, w), *b = open_fixture(fx, L, 42, w), *c = open_fixture(fx, L, 43, w);
    if (!a || !b || !c) goto done;
    int32_t ta[64], tb[64], tc[64];
    bool same = true, differ = false;
    for (int i = 0; i < N; i++) {
        int sa, sb, sc;
        jm_sampler_next(a, ta, &sa);
        jm_sampler_next(b, tb, &sb);
        jm_sampler_next(c, tc, &sc);
        same &= sa == sb && memcmp(ta, tb, sizeof ta) == 0;
        differ |= memcmp(ta, tc, sizeof ta) != 0;
    }
    check(same, "sampler_deterministic_same_seed", "two samplers with seed 42 drew different sequences");
    check(differ, "sampler_seed_changes_offsets", "seeds 42 and 43 drew the same %d sequences", N);
done:
    jm_sampler_free(a);
    jm_sampler_free(b);
    jm_sampler_free(c);
}

/* Draws n sequences, counting tokens per source; returns the largest
 * |share - weight| and writes the shares into detail. */
static double draw_shares(jm_sampler *s, const double *w, int n, int L, char *detail, size_t dlen)
{
    uint64_t count[4] = {0};
    int32_t *buf = malloc((size_t)L * sizeof *buf);
    for (int i = 0; i < n; i++) {
        int src;
        jm_sampler_next(s, buf, &src);
        count[src] += (uint64_t)L;
    }
    free(buf);
    double worst = 0;
    size_t off = 0;
    for (int i = 0; i < 4; i++) {
        double share = (double)count[i] / ((double)n * L);
        worst = fmax(worst, fabs(share - w[i]));
        off += (size_t)snprintf(detail + off, dlen - off, "%s%.4f/%.2f", i ? " " : "", share, w[i]);
    }
    return worst;
}

static void test_sampler_shares(const fixture *fx)
{
    const double w[4] = {0.5, 0.25, 0.1, 0.15};
    jm_sampler *s = open_fixture(fx, 32, 7, w);
    if (!s) return;
    char detail[256];
    double worst = draw_shares(s, w, 20000, 32, detail, sizeof detail);
    check_detail(worst < 0.01, "sampler_shares_20000_draws", "token shares/weights %s, max deviation %.5f", detail,
                 worst);
    /* a new phase: positions kept, accounting restarts, shares follow the new weights */
    jm_sampler_state before;
    jm_error err = {{0}};
    jm_sampler_get_state(s, &before, &err);
    const double w2[4] = {0.1, 0.2, 0.3, 0.4};
    jm_status st = jm_sampler_set_mixture(s, w2, &err);
    jm_sampler_state after;
    jm_sampler_get_state(s, &after, &err);
    bool kept = st == JM_OK;
    for (int i = 0; i < 4 && kept; i++)
        kept = after.position[i] == before.position[i] && after.total[i] == before.total[i] && after.drawn[i] == 0;
    check(kept, "sampler_mixture_change_keeps_positions", "status %s: %s", jm_status_name(st), err.msg);
    worst = draw_shares(s, w2, 5000, 32, detail, sizeof detail);
    check_detail(worst < 0.01, "sampler_mixture_change_shares", "after the change %s, max deviation %.5f", detail,
                 worst);
    /* the first draw of each source after the change continues its stream */
    jm_sampler_state_free(&before);
    jm_sampler_state_free(&after);
    jm_sampler_free(s);

    /* a zero weight is never drawn, and the others split the rest */
    const double w3[4] = {0, 0.5, 0, 0.5};
    s = open_fixture(fx, 32, 7, w3);
    if (!s) return;
    worst = draw_shares(s, w3, 1000, 32, detail, sizeof detail);
    check_detail(worst < 0.002, "sampler_zero_weight_never_drawn", "%s", detail);
    /* exact in the short run too: after every draw each source is within one draw of its share */
    const double w4[4] = {0.37, 0.33, 0.2, 0.1};
    jm_sampler_set_mixture(s, w4, &err);
    uint64_t cnt[4] = {0};
    double dev = 0;
    int32_t buf[32];
    for (int i = 1; i <= 2000; i++) {
        int src;
        jm_sampler_next(s, buf, &src);
        cnt[src]++;
        for (int k = 0; k < 4; k++) dev = fmax(dev, fabs((double)cnt[k] - w4[k] * i));
    }
    check_detail(dev <= 1.0, "sampler_within_one_draw_always", "largest |drawn - w*n| over 2000 draws = %.3f", dev);
    jm_sampler_free(s);
}

static void test_sampler_resume(const fixture *fx)
{
    const double w[4] = {0.3, 0.3, 0.3, 0.1};
    const int L = 50;
    jm_sampler *a = open_fixture(fx, L, 99, w), *b = open_fixture(fx, L, 99, w);
    if (!a || !b) goto done;
    int32_t ta[50], tb[50];
    for (int i = 0; i < 777; i++) jm_sampler_next(a, ta, NULL);
    jm_sampler_state st;
    jm_error err = {{0}};
    jm_status s = jm_sampler_get_state(a, &st, &err);
    if (!s) s = jm_sampler_set_state(b, &st, &err);
    bool same = s == JM_OK;
    for (int i = 0; i < 3000 && same; i++) {
        int sa, sb;
        jm_sampler_next(a, ta, &sa);
        jm_sampler_next(b, tb, &sb);
        same = sa == sb && memcmp(ta, tb, sizeof ta) == 0;
    }
    check(same, "sampler_state_resume_identical", "status %s: %s", jm_status_name(s), err.msg);

    /* set_state validation */
    uint64_t saved = st.position[1];
    st.position[1] = fx->tokens[1];
    s = jm_sampler_set_state(b, &st, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "\"code\"") && strstr(err.msg, "beyond"),
          "sampler_state_rejects_position", "status %s: %s", jm_status_name(s), err.msg);
    st.position[1] = (saved + 1) % fx->tokens[1];
    s = jm_sampler_set_state(b, &st, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "shards"), "sampler_state_rejects_moved_cursor", "status %s: %s",
          jm_status_name(s), err.msg);
    st.position[1] = saved;
    st.total[2] += 1;
    s = jm_sampler_set_state(b, &st, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "\"math\""), "sampler_state_rejects_total", "status %s: %s",
          jm_status_name(s), err.msg);
    st.total[2] -= 1;
    st.drawn[0] = st.total[0] / L + 1;
    s = jm_sampler_set_state(b, &st, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "sequences drawn"), "sampler_state_rejects_drawn", "status %s: %s",
          jm_status_name(s), err.msg);
    st.nsources = 3;
    s = jm_sampler_set_state(b, &st, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "3 sources"), "sampler_state_rejects_nsources", "status %s: %s",
          jm_status_name(s), err.msg);
    jm_sampler_state_free(&st);
done:
    jm_sampler_free(a);
    jm_sampler_free(b);
}

/* Every draw equals the source's underlying stream from the cursor on,
 * wrapping from its last shard back to its first. */
static void test_sampler_wrap(const fixture *fx)
{
    const double w[4] = {0.25, 0.25, 0.25, 0.25};
    const int L = 97;
    jm_sampler *s = open_fixture(fx, L, 5, w);
    if (!s) return;
    jm_sampler_state st;
    jm_error err;
    jm_sampler_get_state(s, &st, &err);
    uint64_t pos[4];
    for (int i = 0; i < 4; i++) pos[i] = st.position[i];
    jm_sampler_state_free(&st);
    bool ok = true;
    int wraps = 0;
    char why[256] = "";
    int32_t buf[97];
    for (int d = 0; d < 800 && ok; d++) {
        int src;
        jm_sampler_next(s, buf, &src);
        int32_t base = 1000 * src + 3;
        for (int j = 0; j < L && ok; j++) {
            uint64_t p = (pos[src] + (uint64_t)j) % fx->tokens[src];
            int32_t want = (int32_t)((base + (int64_t)p) % (int64_t)V);
            if (buf[j] != want) {
                ok = false;
                snprintf(why, sizeof why, "draw %d source %d token %d: %d, stream has %d", d, src, j, buf[j], want);
            }
        }
        if (pos[src] + (uint64_t)L > fx->tokens[src]) wraps++;
        pos[src] = (pos[src] + (uint64_t)L) % fx->tokens[src];
    }
    check_detail(ok && wraps >= 8, "sampler_wraparound_matches_stream", "%s%d wrap-arounds checked", why, wraps);
    check(jm_sampler_num_sources(s) == 4 && jm_sampler_source_tokens(s, 0) == 6000 &&
              jm_sampler_source_tokens(s, 3) == 1011 && jm_sampler_source_tokens(s, 4) == 0,
          "sampler_source_tokens", "got %" PRIu64 " %" PRIu64, jm_sampler_source_tokens(s, 0),
          jm_sampler_source_tokens(s, 3));
    jm_sampler_free(s);
}

static void expect_open_fail(const char *test, const char *const *names, const char *const *dirs, int n, int L,
                             uint32_t vocab, jm_status want, const char *want1, const char *want2)
{
    jm_sampler *s = NULL;
    jm_error err = {{0}};
    jm_status st = jm_sampler_open(names, dirs, n, L, 1, vocab, &s, &err);
    check(st == want && s == NULL && strstr(err.msg, want1) && (!want2 || strstr(err.msg, want2)), test,
          "status %s: %s (want \"%s\")", jm_status_name(st), err.msg, want1);
    jm_sampler_free(s);
}

static void test_sampler_rejects(const char *root, const fixture *fx)
{
    char other[512], eos[512], empty[512], small[512], mixed[512];
    snprintf(other, sizeof other, "%s/vocab4000", root);
    snprintf(eos, sizeof eos, "%s/eos3", root);
    snprintf(empty, sizeof empty, "%s/noshards", root);
    snprintf(small, sizeof small, "%s/small", root);
    snprintf(mixed, sizeof mixed, "%s/mixed", root);
    uint64_t sz[1] = {500};
    make_source(other, sz, 1, 4000, 2, 0);
    make_source(eos, sz, 1, V, 3, 0);
    make_source(small, sz, 1, V, 2, 0);
    mkdir_or_die(empty);
    char note[600];
    snprintf(note, sizeof note, "%s/README.txt", empty);
    write_text(note, "not a shard\n");
    /* a source whose second shard has another vocab */
    make_source(mixed, sz, 1, V, 2, 0);
    int32_t ids[3] = {1, 2, 3};
    char path[600];
    snprintf(path, sizeof path, "%s/part_001.bin", mixed);
    jm_shard_write(path, ids, 3, V + 1, 2, NULL);

    const char *names[2] = {"prose", "other"};
    const char *dirs[2] = {fx->dirs[0], other};
    expect_open_fail("sampler_rejects_other_vocab", names, dirs, 2, 16, V, JM_ERR_ARG, "vocab4000/part_000.bin",
                     "vocab size 4000 does not match the model's 5000");
    dirs[1] = eos;
    expect_open_fail("sampler_rejects_other_eos", names, dirs, 2, 16, V, JM_ERR_ARG, "eos3/part_000.bin",
                     "EOS id 3 differs");
    dirs[1] = mixed;
    expect_open_fail("sampler_rejects_mixed_vocab_in_source", names, dirs, 2, 16, V, JM_ERR_ARG,
                     "mixed/part_001.bin", "5001");
    dirs[1] = empty;
    expect_open_fail("sampler_rejects_dir_without_shards", names, dirs, 2, 16, V, JM_ERR_ARG, "noshards",
                     "no token shards");
    dirs[1] = small;
    expect_open_fail("sampler_rejects_source_shorter_than_seq_len", names, dirs, 2, 501, V, JM_ERR_ARG, "small",
                     "fewer than seq_len 501");
    snprintf(path, sizeof path, "%s/missing", root);
    dirs[1] = path;
    expect_open_fail("sampler_rejects_missing_dir", names, dirs, 2, 16, V, JM_ERR_IO, "missing", NULL);
    names[1] = "prose";
    dirs[1] = small;
    expect_open_fail("sampler_rejects_duplicate_name", names, dirs, 2, 16, V, JM_ERR_ARG, "given twice", NULL);
    names[1] = "other";
    expect_open_fail("sampler_rejects_seq_len_0", names, dirs, 2, 0, V, JM_ERR_ARG, "seq_len", NULL);

    /* a corrupt shard inside a source: the shard's own message */
    snprintf(path, sizeof path, "%s/part_000.bin", small);
    FILE *f = fopen(path, "r+b");
    fputc('X', f);
    fclose(f);
    expect_open_fail("sampler_rejects_corrupt_shard", names, dirs, 2, 16, V, JM_ERR_FORMAT, "small/part_000.bin",
                     "bad magic");

    jm_sampler *s = open_fixture(fx, 16, 1, NULL);
    if (!s) return;
    jm_error err = {{0}};
    const double neg[4] = {0.5, -0.1, 0.3, 0.3}, zero[4] = {0, 0, 0, 0}, nan_[4] = {NAN, 1, 1, 1};
    jm_status a = jm_sampler_set_mixture(s, neg, &err);
    bool ok_a = a == JM_ERR_ARG && strstr(err.msg, "\"code\"");
    jm_status b = jm_sampler_set_mixture(s, zero, &err);
    jm_status c = jm_sampler_set_mixture(s, nan_, &err);
    check(ok_a && b == JM_ERR_ARG && c == JM_ERR_ARG, "sampler_mixture_rejects_bad_weights", "%s %s %s",
          jm_status_name(a), jm_status_name(b), jm_status_name(c));
    /* before any mixture is set the sources are drawn uniformly */
    char detail[256];
    const double u[4] = {0.25, 0.25, 0.25, 0.25};
    double worst = draw_shares(s, u, 400, 16, detail, sizeof detail);
    check_detail(worst < 0.01, "sampler_default_uniform", "%s", detail);
    jm_sampler_free(s);
}

/* ================================================================ prepare */

static const char *PROSE =
    "It was the best of times, it was the worst of times, it was the age of wisdom,\n"
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of\n"
    "incredulity, it was the season of Light, it was the season of Darkness.\n\n"
    "There were a king with a large jaw and a queen with a plain face, on the throne\n"
    "of England; there were a king with a large jaw and a queen with a fair face, on\n"
    "the throne of France. Numbers: 1234 and 56.78; symbols: {}[]<>#@!\n";

static const char *CODE =
    "def fib(n):\n"
    "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a\n\n\n"
    "if __name__ == \"__main__\":\n"
    "\tprint(fib(30))  # tab-indented\n";

static const char *JSONL =
    "{\"text\": \"Question: Tom has 3 apples and buys 4 more. How many?\\nAnswer: 3 + 4 = 7\\n#### 7\"}\n"
    "\n"
    "{\"id\": 2, \"text\": \"caf\\u00e9 na\\u00efve \\u2603 \\ud83d\\ude00 \\t tabs\"}\n"
    "   \n"
    "{\"text\": \"<|user|>\\nHi!</s>\\n<|assistant|>\\nHello.</s>\\n\"}\n";

/* Text of every document, in prepare's order, for the check. */
typedef struct {
    const char *text;
    size_t len;
    int jsonl; /* JSONL records are encoded with special tokens ("</s>" -> EOS id) */
} doc_ref;

static bool train_tokenizer(const char *dir, char *model, size_t model_len)
{
    char corpus[600], cmd[2048];
    snprintf(corpus, sizeof corpus, "%s/spm_corpus.txt", dir);
    FILE *f = fopen(corpus, "w");
    for (int i = 0; i < 40; i++) fprintf(f, "%s%s line %d caf\xc3\xa9 na\xc3\xafve\n", PROSE, CODE, i);
    fclose(f);
    snprintf(cmd, sizeof cmd,
             "spm_train --input=%s --model_prefix=%s/tokenizer --vocab_size=400 --model_type=bpe "
             "--byte_fallback=true --normalization_rule_name=identity --remove_extra_whitespaces=false "
             "--unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --num_threads=1 >%s/spm.log 2>&1",
             corpus, dir, dir);
    snprintf(model, model_len, "%s/tokenizer.model", dir);
    return system(cmd) == 0 && access(model, R_OK) == 0;
}

/* All shards of dir (shard_00000.bin, ...) concatenated; NULL on failure. */
static int32_t *read_shards(const char *dir, uint64_t *n, int *nshards, uint32_t *eos)
{
    int32_t *out = NULL;
    *n = 0;
    *nshards = 0;
    for (int k = 0;; k++) {
        char path[600];
        snprintf(path, sizeof path, "%s/shard_%05d.bin", dir, k);
        if (access(path, F_OK) != 0) break;
        jm_shard sh;
        jm_error err;
        if (jm_shard_open(path, &sh, &err)) {
            printf("# %s\n", err.msg);
            free(out);
            return NULL;
        }
        out = realloc(out, (*n + sh.n + 1) * sizeof *out);
        for (uint64_t i = 0; i < sh.n; i++) out[*n + i] = (int32_t)jm_shard_token(&sh, i);
        *n += sh.n;
        *eos = sh.eos_id;
        (*nshards)++;
        jm_shard_close(&sh);
    }
    return out;
}

static jm_status run_prepare(const char *tok, const char *const *inputs, int n, const char *out, uint64_t shard,
                             int threads, uint64_t *written, jm_error *err)
{
    /* re-runs into out1 replace its shards */
    jm_prepare_opts o = {.tokenizer = tok, .inputs = inputs, .ninputs = n, .out_dir = out, .shard_tokens = shard,
                         .threads = threads, .overwrite = 1};
    return jm_prepare(&o, written, err);
}

static void test_prepare(const char *root)
{
    char tokdir[512], model[600];
    snprintf(tokdir, sizeof tokdir, "%s/tok", root);
    mkdir_or_die(tokdir);
    if (!check(train_tokenizer(tokdir, model, sizeof model), "prepare_train_tokenizer",
               "spm_train failed (see %s/spm.log)", tokdir))
        return;
    jm_tokenizer *tok = NULL;
    jm_error err = {{0}};
    if (!check(jm_tokenizer_load(model, &tok, &err) == JM_OK, "prepare_load_tokenizer", "%s", err.msg)) return;

    /* inputs: prose, code in a subdirectory, JSONL with blank lines, and
     * things to skip: a hidden file, a binary file, an empty file */
    char in[512], p[700];
    snprintf(in, sizeof in, "%s/in", root);
    mkdir_or_die(in);
    snprintf(p, sizeof p, "%s/a_prose.txt", in), write_text(p, PROSE);
    snprintf(p, sizeof p, "%s/c_docs.jsonl", in), write_text(p, JSONL);
    snprintf(p, sizeof p, "%s/.hidden.txt", in), write_text(p, "hidden text must not appear\n");
    snprintf(p, sizeof p, "%s/b_blob.dat", in), write_bytes(p, "\x7f" "ELF\0\0\1", 7);
    snprintf(p, sizeof p, "%s/d_empty.txt", in), write_text(p, "");
    snprintf(p, sizeof p, "%s/sub", in), mkdir_or_die(p);
    snprintf(p, sizeof p, "%s/sub/fib.py", in), write_text(p, CODE);
    snprintf(p, sizeof p, "%s/.git", in), mkdir_or_die(p);
    snprintf(p, sizeof p, "%s/.git/config", in), write_text(p, "hidden dir\n");
    doc_ref docs[] = {
        {PROSE, strlen(PROSE), 0},
        {"Question: Tom has 3 apples and buys 4 more. How many?\nAnswer: 3 + 4 = 7\n#### 7", 0, 1},
        {"caf\xc3\xa9 na\xc3\xafve \xe2\x98\x83 \xf0\x9f\x98\x80 \t tabs", 0, 1},
        {"<|user|>\nHi!</s>\n<|assistant|>\nHello.</s>\n", 0, 1},
        {CODE, strlen(CODE), 0},
    };
    int ndocs = (int)(sizeof docs / sizeof docs[0]);
    uint64_t nexp = 0;
    int32_t *expect = NULL;
    bool enc_ok = true;
    for (int i = 0; i < ndocs && enc_ok; i++) {
        if (!docs[i].len) docs[i].len = strlen(docs[i].text);
        int32_t *ids;
        size_t n;
        enc_ok = (docs[i].jsonl ? jm_tokenizer_encode_special(tok, docs[i].text, docs[i].len, &ids, &n, &err)
                                : jm_tokenizer_encode(tok, docs[i].text, docs[i].len, &ids, &n, &err)) == JM_OK;
        if (!enc_ok) break;
        expect = realloc(expect, (nexp + n + 1) * sizeof *expect);
        memcpy(expect + nexp, ids, n * sizeof *ids);
        nexp += n;
        expect[nexp++] = jm_tokenizer_eos_id(tok);
        free(ids);
    }
    check(enc_ok, "prepare_reference_encode", "%s", err.msg);

    const char *inputs[1] = {in};
    char out1[512], out2[512];
    snprintf(out1, sizeof out1, "%s/out1", root);
    snprintf(out2, sizeof out2, "%s/out2/nested", root);
    uint64_t w1 = 0, w2 = 0;
    jm_status s1 = run_prepare(model, inputs, 1, out1, 64, 1, &w1, &err);
    check(s1 == JM_OK, "prepare_1_thread", "%s", err.msg);
    jm_status s2 = run_prepare(model, inputs, 1, out2, 64, 2, &w2, &err);
    check(s2 == JM_OK, "prepare_2_threads", "%s", err.msg);
    if (s1 || s2) goto done;

    uint64_t n1, n2;
    int k1, k2;
    uint32_t eos = 0;
    int32_t *t1 = read_shards(out1, &n1, &k1, &eos), *t2 = read_shards(out2, &n2, &k2, &eos);
    bool same = t1 && t2 && k1 == k2 && k1 > 1;
    for (int k = 0; same && k < k1; k++) {
        char a[700], b[700];
        snprintf(a, sizeof a, "%s/shard_%05d.bin", out1, k);
        snprintf(b, sizeof b, "%s/shard_%05d.bin", out2, k);
        same = same_file(a, b);
    }
    check_detail(same, "prepare_identical_for_1_and_2_threads", "%d shards of <= 64 tokens, %" PRIu64 " tokens", k1,
                 n1);
    bool eq = t1 && n1 == nexp && n1 == w1 && memcmp(t1, expect, nexp * sizeof *expect) == 0;
    uint64_t first_diff = 0;
    while (t1 && !eq && first_diff < n1 && first_diff < nexp && t1[first_diff] == expect[first_diff]) first_diff++;
    check(eq, "prepare_tokens_equal_encode_plus_eos", "%" PRIu64 " tokens (%" PRIu64 " reported), want %" PRIu64
          "; first difference at %" PRIu64, n1, w1, nexp, first_diff);
    uint64_t neos = 0;
    for (uint64_t i = 0; t1 && i < n1; i++) neos += t1[i] == (int32_t)eos;
    /* one EOS after every document, plus the chat record's two "</s>" turn ends */
    check(t1 && neos == (uint64_t)ndocs + 2 && n1 && t1[n1 - 1] == (int32_t)eos &&
              eos == (uint32_t)jm_tokenizer_eos_id(tok),
          "prepare_eos_after_every_document", "%" PRIu64 " EOS for %d documents + 2 turn ends", neos, ndocs);
    free(t1);
    free(t2);

    /* the manifest: valid JSON, counts that add up, skipped files absent */
    snprintf(p, sizeof p, "%s/manifest.json", out1);
    size_t mlen;
    char *mtext = slurp(p, &mlen);
    cJSON *man = NULL;
    bool mok = mtext && jm_json_parse(mtext, mlen, p, &man, &err) == JM_OK;
    if (mok) {
        const cJSON *tokens = cJSON_GetObjectItem(man, "tokens"), *src = cJSON_GetObjectItem(man, "sources");
        const cJSON *vs = cJSON_GetObjectItem(man, "vocab_size"), *sh = cJSON_GetObjectItem(man, "shards");
        mok = cJSON_IsNumber(tokens) && tokens->valuedouble == (double)n1 && cJSON_GetArraySize(src) == 4 &&
              cJSON_IsNumber(vs) && vs->valueint == jm_tokenizer_vocab_size(tok) && cJSON_GetArraySize(sh) == k1 &&
              !strstr(mtext, "hidden") && !strstr(mtext, "b_blob") && strstr(mtext, "tokenizer.model");
    }
    check(mok, "prepare_manifest", "%s", mtext ? mtext : "missing");
    cJSON_Delete(man);
    free(mtext);
    check(count_entries(out1, ".prepare.") == 0 && count_entries(out1, ".tmp.") == 0, "prepare_no_scratch_left",
          "scratch files remain in %s", out1);

    /* the output feeds the sampler */
    {
        const char *nm[1] = {"all"}, *dr[1] = {out1};
        jm_sampler *smp = NULL;
        jm_status ss = jm_sampler_open(nm, dr, 1, 16, 1, (uint32_t)jm_tokenizer_vocab_size(tok), &smp, &err);
        check(ss == JM_OK && jm_sampler_source_tokens(smp, 0) == n1, "prepare_output_opens_in_sampler", "%s",
              err.msg);
        jm_sampler_free(smp);
    }

    /* a single file input, re-run into out1 with fewer tokens: stale shards go */
    snprintf(p, sizeof p, "%s/sub/fib.py", in);
    const char *one[1] = {p};
    uint64_t w3 = 0;
    jm_status s3 = run_prepare(model, one, 1, out1, 64, 2, &w3, &err);
    uint64_t n3;
    int k3;
    int32_t *t3 = s3 ? NULL : read_shards(out1, &n3, &k3, &eos);
    char stale[700];
    snprintf(stale, sizeof stale, "%s/shard_%05d.bin", out1, k3);
    check(s3 == JM_OK && t3 && n3 == w3 && k3 < k1 && access(stale, F_OK) != 0, "prepare_rerun_removes_stale",
          "status %s: %s", jm_status_name(s3), err.msg);
    free(t3);

    /* malformed JSONL: the error names file:line, and the previous output stays whole */
    char bad[600];
    snprintf(bad, sizeof bad, "%s/bad", root);
    mkdir_or_die(bad);
    snprintf(p, sizeof p, "%s/a.txt", bad), write_text(p, PROSE);
    snprintf(p, sizeof p, "%s/b.jsonl", bad);
    write_text(p, "{\"text\": \"one\"}\n\n{\"text\": \"two\",}\n{\"text\": \"four\"}\n");
    const char *bin[1] = {bad};
    jm_status s4 = run_prepare(model, bin, 1, out1, 64, 2, NULL, &err);
    char want[700];
    snprintf(want, sizeof want, "%s/b.jsonl:3:", bad);
    uint64_t n5;
    int k5;
    int32_t *t5 = read_shards(out1, &n5, &k5, &eos);
    check(s4 == JM_ERR_FORMAT && strstr(err.msg, want) && strstr(err.msg, "malformed JSON") && t5 && n5 == n3 &&
              k5 == k3 && count_entries(out1, ".prepare.") == 0,
          "prepare_malformed_jsonl_names_line", "status %s: %s", jm_status_name(s4), err.msg);
    free(t5);
    write_text(p, "{\"text\": \"one\"}\n{\"body\": \"two\"}\n");
    s4 = run_prepare(model, bin, 1, out1, 64, 1, NULL, &err);
    snprintf(want, sizeof want, "%s/b.jsonl:2: no \"text\" string field", bad);
    check(s4 == JM_ERR_FORMAT && strstr(err.msg, want), "prepare_jsonl_missing_text", "status %s: %s",
          jm_status_name(s4), err.msg);
    write_text(p, "[\"text\"]\n");
    s4 = run_prepare(model, bin, 1, out1, 64, 1, NULL, &err);
    check(s4 == JM_ERR_FORMAT && strstr(err.msg, "b.jsonl:1: not a JSON object"), "prepare_jsonl_not_object",
          "status %s: %s", jm_status_name(s4), err.msg);
    write_text(p, "{\"text\": 5}\n");
    s4 = run_prepare(model, bin, 1, out1, 64, 1, NULL, &err);
    check(s4 == JM_ERR_FORMAT && strstr(err.msg, "b.jsonl:1: no \"text\" string"), "prepare_jsonl_text_not_string",
          "status %s: %s", jm_status_name(s4), err.msg);

    /* bad arguments */
    snprintf(p, sizeof p, "%s/nothing_here", root);
    const char *missing[1] = {p};
    s4 = run_prepare(model, missing, 1, out1, 0, 1, NULL, &err);
    check(s4 == JM_ERR_IO && strstr(err.msg, "nothing_here"), "prepare_missing_input", "status %s: %s",
          jm_status_name(s4), err.msg);
    snprintf(p, sizeof p, "%s/d_empty.txt", in);
    s4 = run_prepare(model, missing, 0, out1, 0, 1, NULL, &err);
    check(s4 == JM_ERR_ARG, "prepare_no_inputs", "status %s", jm_status_name(s4));
    const char *empty1[1] = {p};
    s4 = run_prepare(model, empty1, 1, out1, 0, 1, NULL, &err);
    check(s4 == JM_ERR_ARG && strstr(err.msg, "no text"), "prepare_only_empty_input", "status %s: %s",
          jm_status_name(s4), err.msg);
    snprintf(p, sizeof p, "%s/no_tokenizer.model", root);
    s4 = run_prepare(p, inputs, 1, out1, 0, 1, NULL, &err);
    check(s4 != JM_OK && strstr(err.msg, "no_tokenizer.model"), "prepare_bad_tokenizer", "status %s: %s",
          jm_status_name(s4), err.msg);
done:
    free(expect);
    jm_tokenizer_free(tok);
}

int main(void)
{
    char root[] = "/tmp/jm_test_data_XXXXXX";
    temp_dir(root);
    char d[600];
    snprintf(d, sizeof d, "%s/shards", root);
    mkdir_or_die(d);
    test_roundtrip(d, "shard_roundtrip_u16", 32000, 2);
    test_roundtrip(d, "shard_roundtrip_u16_vocab_65536", 65536, 2);
    test_roundtrip(d, "shard_roundtrip_u32", 100000, 4);
    test_write_rejects(d);
    test_malformed(d);

    fixture fx;
    snprintf(d, sizeof d, "%s/sources", root);
    mkdir_or_die(d);
    make_fixture(d, &fx);
    test_sampler_determinism(&fx);
    test_sampler_shares(&fx);
    test_sampler_resume(&fx);
    test_sampler_wrap(&fx);
    test_sampler_rejects(d, &fx);

    snprintf(d, sizeof d, "%s/prepare", root);
    mkdir_or_die(d);
    test_prepare(d);

    temp_dir_done(root);
    return exit_status();
}
