/* suggest.c — "did you mean ...?": the known name closest to a mistyped one.
 *
 * For unknown keys in recipes today (src/train/train.c), and for any other
 * parser that meets a name it does not know (config keys, CLI flags). */
#include "base/base.h"

#include <string.h>

/* Longest name compared: a longer one is no typo of a key. */
#define SUGGEST_MAX 64

size_t jm_edit_distance(const char *a, const char *b)
{
    /* Levenshtein with adjacent transpositions counted as one edit (optimal
     * string alignment): "stpes" is one edit from "steps". Three rows of the
     * (|a|+1) x (|b|+1) table, names truncated at SUGGEST_MAX bytes. */
    size_t n = strnlen(a, SUGGEST_MAX), m = strnlen(b, SUGGEST_MAX);
    size_t rows[3][SUGGEST_MAX + 1], *pp = rows[0], *prev = rows[1], *cur = rows[2];
    for (size_t j = 0; j <= m; j++) prev[j] = j;
    for (size_t i = 1; i <= n; i++) {
        cur[0] = i;
        for (size_t j = 1; j <= m; j++) {
            size_t cost = a[i - 1] != b[j - 1];
            size_t best = prev[j - 1] + cost;
            if (prev[j] + 1 < best) best = prev[j] + 1;
            if (cur[j - 1] + 1 < best) best = cur[j - 1] + 1;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] && pp[j - 2] + 1 < best)
                best = pp[j - 2] + 1;
            cur[j] = best;
        }
        size_t *t = pp;
        pp = prev;
        prev = cur;
        cur = t;
    }
    return prev[m];
}

int jm_closest_name(const char *word, const char *const *names, int n)
{
    size_t len = strlen(word);
    if (len == 0 || len > SUGGEST_MAX) return -1;
    /* how far a typo may be: one edit in a short name, up to three in a long one */
    size_t limit = len <= 4 ? 1 : len <= 8 ? 2 : 3;
    int best = -1;
    size_t best_d = limit + 1;
    for (int i = 0; i < n; i++) {
        size_t d = jm_edit_distance(word, names[i]), longer = strlen(names[i]);
        if (longer < len) longer = len;
        /* rewriting every byte ("z" for "a") is no resemblance */
        if (d < best_d && d < longer) {
            best = i;
            best_d = d;
        }
    }
    return best;
}
