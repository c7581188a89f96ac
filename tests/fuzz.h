/* fuzz.h — what the mutation fuzzers (tests/fuzz_*.c) and the random checks
 * of the C tests share: a seeded generator, a growable byte buffer, and the
 * generic mutations of a file's bytes — bit flips, bytes a parser branches
 * on, insertions and deletions, a chunk duplicated, a chunk spliced in from
 * another input, truncation, boundary values written as little-endian
 * integers, varints and decimal numbers, and a format's own tokens; and
 * changes to a parsed JSON tree that keep it JSON (fz_mutate_json).
 * Deterministic: the same seed gives the same inputs, so a finding is
 * reproduced by running the program again with its seed.
 * Header-only and all static: include it once, from the program's .c file. */
#ifndef JM_TEST_FUZZ_H
#define JM_TEST_FUZZ_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* xorshift64*: the state must not be 0 */
static inline uint64_t rnd(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545f4914f6cdd1dull;
}

/* Uniform enough in [0, n); 0 when n is 0. */
static inline size_t below(uint64_t *s, size_t n)
{
    return n ? (size_t)(rnd(s) % n) : 0;
}

typedef struct {
    uint8_t *p;
    size_t len, cap;
} fz_bytes;

/* Replaces b->p[at, at + del) by ins[0, n) (both clamped to the buffer); grows b. Exits 2 out of memory. */
static inline void fz_splice(fz_bytes *b, size_t at, size_t del, const void *ins, size_t n)
{
    if (at > b->len) at = b->len;
    if (del > b->len - at) del = b->len - at;
    if (b->len - del + n > b->cap) {
        size_t cap = (b->len - del + n) * 2 + 64;
        uint8_t *p = realloc(b->p, cap);
        if (!p) {
            fprintf(stderr, "fuzz: out of memory\n");
            exit(2);
        }
        b->p = p, b->cap = cap;
    }
    if (b->len - at - del) memmove(b->p + at + n, b->p + at + del, b->len - at - del); /* b->p may still be NULL */
    if (n) memcpy(b->p + at, ins, n);
    b->len = b->len - del + n;
}

static inline void fz_assign(fz_bytes *b, const void *p, size_t n)
{
    b->len = 0;
    fz_splice(b, 0, 0, p, n);
}

/* The bytes exactly, in a fresh allocation of exactly len bytes (at least 1): a
 * parser that reads one byte too far trips AddressSanitizer. */
static inline uint8_t *fz_exact(const fz_bytes *b)
{
    uint8_t *p = malloc(b->len ? b->len : 1);
    if (!p) exit(2);
    if (b->len) memcpy(p, b->p, b->len);
    return p;
}

/* Bytes that readers branch on: structure of JSON, Jinja and protobuf, UTF-8 lead and continuation bytes. */
static const uint8_t fz_interesting[] = {0x00, 0x01, 0x08, 0x0a, 0x12, 0x1a, 0x7f, 0x80, 0xbf, 0xc0, 0xc2, 0xe0,
                                         0xed, 0xef, 0xf0, 0xf4, 0xff, '"', '\\', '{', '}', '[', ']', ',', ':',
                                         '0', '9', '-', '.', 'e', ' ', '\n', '%', '#', '\'', '|', 'u'};

/* Boundary values of the integer widths and their neighbours. */
static const uint64_t fz_bounds[] = {0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x10000, 0x7fffffff,
                                     0x80000000, 0xffffffff, 0x100000000ull, 0x7fffffffffffffffull,
                                     0x8000000000000000ull, 0xffffffffffffffffull};

/* Numbers at the edges of what JSON readers convert exactly (or at all). */
static const char *const fz_numbers[] = {"0", "-0", "1", "-1", "0.5", "1e0", "2147483647", "2147483648",
                                         "-2147483649", "4294967296", "9007199254740992", "9007199254740993",
                                         "18446744073709551616", "1e308", "1e999", "-1e999", "1e-400", "NaN",
                                         "Infinity", "0x10", "01", "1.", ".5", "--1", "99999999999999999999999"};

#define FZ_COUNT(a) (sizeof(a) / sizeof((a)[0]))

static inline size_t fz_varint(uint8_t *out, uint64_t v)
{
    size_t n = 0;
    do {
        out[n] = (uint8_t)(v & 0x7f);
        v >>= 7;
        if (v) out[n] |= 0x80;
        n++;
    } while (v);
    return n;
}

/* One generic mutation of b. other (may be NULL) is another input to splice
 * from; dict (may be NULL) the format's own tokens. */
static inline void fz_mutate(uint64_t *r, fz_bytes *b, const fz_bytes *other, const char *const *dict, size_t ndict)
{
    size_t at = below(r, b->len + 1), n;
    uint8_t buf[16];
    switch (below(r, 11)) {
    case 0: /* flip a bit */
        if (b->len) b->p[below(r, b->len)] ^= (uint8_t)(1u << below(r, 8));
        break;
    case 1: /* a byte the reader branches on */
        if (b->len) b->p[below(r, b->len)] = fz_interesting[below(r, FZ_COUNT(fz_interesting))];
        break;
    case 2: /* insert a few bytes */
        n = 1 + below(r, 8);
        for (size_t i = 0; i < n; i++)
            buf[i] = below(r, 2) ? fz_interesting[below(r, FZ_COUNT(fz_interesting))] : (uint8_t)rnd(r);
        fz_splice(b, at, 0, buf, n);
        break;
    case 3: /* delete a run */
        fz_splice(b, at, 1 + below(r, below(r, 2) ? 8 : 128), NULL, 0);
        break;
    case 4: { /* duplicate a chunk of the input somewhere in it */
        if (!b->len) break;
        size_t from = below(r, b->len);
        n = 1 + below(r, 64);
        if (n > b->len - from) n = b->len - from;
        uint8_t chunk[64];
        memcpy(chunk, b->p + from, n);
        fz_splice(b, at, below(r, 2) ? 0 : n, chunk, n);
        break;
    }
    case 5: { /* splice in a chunk of another input (or of this one, re-read) */
        const fz_bytes *o = other && other->len ? other : b;
        if (!o->len) break;
        size_t from = below(r, o->len);
        n = 1 + below(r, 256);
        if (n > o->len - from) n = o->len - from;
        uint8_t *chunk = malloc(n);
        if (!chunk) exit(2);
        memcpy(chunk, o->p + from, n);
        fz_splice(b, at, below(r, 2 * n + 1), chunk, n);
        free(chunk);
        break;
    }
    case 6: /* truncate */
        b->len = below(r, b->len + 1);
        break;
    case 7: { /* a boundary value as a little-endian integer of 1, 2, 4 or 8 bytes, over what was there */
        size_t w = (size_t)1 << below(r, 4);
        uint64_t v = fz_bounds[below(r, FZ_COUNT(fz_bounds))] + (below(r, 4) == 0 ? (uint64_t)below(r, 3) - 1 : 0);
        if (b->len < w) break;
        size_t pos = below(r, b->len - w + 1);
        for (size_t i = 0; i < w; i++) b->p[pos + i] = (uint8_t)(v >> (8 * i));
        break;
    }
    case 8: /* a boundary value as a varint (protobuf lengths, tags), over 1-3 bytes */
        n = fz_varint(buf, fz_bounds[below(r, FZ_COUNT(fz_bounds))]);
        fz_splice(b, at, 1 + below(r, 3), buf, n);
        break;
    case 9: { /* a run of digits (or the point) replaced by an edge number */
        size_t i = at, j;
        while (i < b->len && !(b->p[i] >= '0' && b->p[i] <= '9')) i++;
        for (j = i; j < b->len && ((b->p[j] >= '0' && b->p[j] <= '9') || b->p[j] == '.' || b->p[j] == '-'); j++) {}
        const char *t = fz_numbers[below(r, FZ_COUNT(fz_numbers))];
        fz_splice(b, i, j - i, t, strlen(t));
        break;
    }
    default: /* a token of the format over a few bytes, or between them */
        if (dict && ndict) {
            const char *t = dict[below(r, ndict)];
            fz_splice(b, at, below(r, 3) ? 0 : below(r, 6), t, strlen(t));
        } else if (b->len) {
            b->p[below(r, b->len)] = (uint8_t)rnd(r);
        }
        break;
    }
}

/* Changes the JSON text in b `times` times with mutate, each time on a random
 * node of the parsed tree other than the root (parent: the node holding it),
 * and puts the tree back as unformatted JSON; text that does not parse stays
 * as it is. For a reader's checks behind the parser. */
static inline void fz_mutate_json(uint64_t *r, fz_bytes *b, int times, void (*mutate)(uint64_t *r, cJSON *x, cJSON *parent))
{
    enum { MAX_NODES = 4096 };
    static cJSON *node[MAX_NODES], *parent[MAX_NODES];
    cJSON *root = cJSON_ParseWithLength((const char *)b->p, b->len);
    for (int k = times; root && k > 0; k--) {
        int n = 0;
        node[n] = root, parent[n++] = NULL;
        for (int i = 0; i < n; i++)
            for (cJSON *c = node[i]->child; c && n < MAX_NODES; c = c->next) node[n] = c, parent[n++] = node[i];
        int i = 1 + (int)below(r, (size_t)(n - 1 > 0 ? n - 1 : 1));
        if (i < n) mutate(r, node[i], parent[i]);
    }
    char *text = root ? cJSON_PrintUnformatted(root) : NULL;
    if (text) fz_assign(b, text, strlen(text));
    cJSON_free(text);
    cJSON_Delete(root);
}

/* Error messages with numbers, quoted parts and parenthesised details
 * blanked, to count how many different checks a fuzzer reached; skip is a
 * prefix to leave out (the file name). */
static inline void fz_message_shape(const char *msg, const char *skip, char *out, size_t cap)
{
    const char *p = msg;
    if (skip && strncmp(p, skip, strlen(skip)) == 0) p += strlen(skip);
    size_t k = 0;
    while (*p && *p != '(' && k + 2 < cap) {
        if (*p >= '0' && *p <= '9') {
            while (*p >= '0' && *p <= '9') p++;
            out[k++] = '#';
        } else if (*p == '\'' || *p == '"') {
            char q = *p++;
            while (*p && *p != q) p++;
            if (*p) p++;
            out[k++] = 'Q';
        } else {
            out[k++] = *p++;
        }
    }
    out[k] = 0;
}

/* The distinct shapes of messages seen so far. */
typedef struct {
    char shape[256][96];
    int n;
} fz_shapes;

static inline void fz_shapes_add(fz_shapes *s, const char *msg, const char *skip)
{
    char shape[96];
    fz_message_shape(msg, skip, shape, sizeof shape);
    for (int k = 0; k < s->n; k++)
        if (strcmp(s->shape[k], shape) == 0) return;
    if (s->n < (int)FZ_COUNT(s->shape)) strcpy(s->shape[s->n++], shape);
}

#endif
