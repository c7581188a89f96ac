/* pack.c — sequences into training rows, for SFT and DPO.
 *
 * Packing, not padding: sequences are laid one after another into rows of at
 * most max_len tokens, each starting at position 0 so that attention and RoPE
 * restart there (jm_batch); a row is closed when the next sequence does not
 * fit, and the rows of a batch are padded to the longest one. Every sequence
 * is whole in one row (the records were truncated to max_len when read). */
#include "align/align.h"

#include <string.h>

/* splitmix64: the shuffles' generator (a stream per seed and epoch) */
static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void jm_shuffle(int64_t *order, int64_t n, uint64_t seed, int64_t epoch)
{
    uint64_t s = seed * 0x2545F4914F6CDD1Dull ^ (uint64_t)epoch * 0x9E3779B97F4A7C15ull;
    for (int64_t i = 0; i < n; i++) order[i] = i;
    for (int64_t i = n - 1; i > 0; i--) { /* Fisher-Yates */
        int64_t j = (int64_t)(splitmix(&s) % (uint64_t)(i + 1));
        int64_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}

int64_t jm_pack_rows(const int *len, int64_t n, int max_len, int64_t *row_of, int64_t *first)
{
    int64_t rows = 0;
    int used = max_len; /* the open row is full: the first sequence opens one */
    for (int64_t i = 0; i < n; i++) {
        if (used + len[i] > max_len) {
            if (first) first[rows] = i;
            rows++;
            used = 0;
        }
        if (row_of) row_of[i] = rows - 1;
        used += len[i];
    }
    if (first) first[rows] = n;
    return rows;
}

void jm_packed_free(jm_packed *p)
{
    free(p->tokens);
    free(p->positions);
    free(p->targets);
    free(p->weight);
    free(p->start);
    memset(p, 0, sizeof *p);
}

jm_status jm_pack(jm_packed *p, const jm_seq_ref *seq, int n, int max_len, jm_error *err)
{
    int64_t *row_of = malloc(sizeof *row_of * (size_t)(n ? n : 1));
    int *len = malloc(sizeof *len * (size_t)(n ? n : 1));
    if (!row_of || !len) {
        free(row_of);
        free(len);
        return jm_fail(err, JM_ERR_NOMEM, "out of memory packing %d sequences", n);
    }
    for (int i = 0; i < n; i++) len[i] = seq[i].n;
    int B = (int)jm_pack_rows(len, n, max_len, row_of, NULL), T = 1;
    int *fill = calloc((size_t)(B ? B : 1), sizeof *fill);
    for (int i = 0; fill && i < n; i++) {
        fill[row_of[i]] += len[i];
        if (fill[row_of[i]] > T) T = fill[row_of[i]];
    }
    const size_t N = (size_t)(B ? B : 1) * T;
    if (fill) memset(fill, 0, sizeof *fill * (size_t)(B ? B : 1));
    if (N > p->cap) {
        jm_packed_free(p);
        p->tokens = malloc(N * sizeof *p->tokens);
        p->positions = malloc(N * sizeof *p->positions);
        p->targets = malloc(N * sizeof *p->targets);
        p->weight = malloc(N * sizeof *p->weight);
        if (p->tokens && p->positions && p->targets && p->weight) p->cap = N;
    }
    free(p->start);
    p->start = malloc(sizeof *p->start * (size_t)(n ? n : 1));
    if (!fill || p->cap < N || !p->start) {
        free(row_of);
        free(len);
        free(fill);
        return jm_fail(err, JM_ERR_NOMEM, "out of memory packing %d sequences", n);
    }
    for (size_t i = 0; i < N; i++) p->tokens[i] = 0, p->positions[i] = -1, p->targets[i] = -1, p->weight[i] = 0;
    for (int i = 0; i < n; i++) {
        int64_t at = row_of[i] * T + fill[row_of[i]];
        fill[row_of[i]] += len[i];
        p->start[i] = at;
        for (int t = 0; t < len[i]; t++) {
            p->tokens[at + t] = seq[i].ids[t];
            p->positions[at + t] = t;
            p->targets[at + t] = seq[i].targets[t];
        }
    }
    p->batch = (jm_batch){B, T, p->tokens, p->positions, p->targets};
    p->n = n;
    free(row_of);
    free(len);
    free(fill);
    return JM_OK;
}
