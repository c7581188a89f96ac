/* test_suggest.c — jm_edit_distance and jm_closest_name (src/base/suggest.c),
 * the "did you mean ...?" behind unknown recipe keys. */
#include "harness.h"

static void test_distance(void)
{
    static const struct {
        const char *a, *b;
        size_t d;
    } cases[] = {
        {"steps", "steps", 0}, {"", "", 0}, {"", "abc", 3}, {"abc", "", 3}, {"stpes", "steps", 1},
        {"lerning_rate", "learning_rate", 1}, {"kitten", "sitting", 3}, {"ab", "ba", 1}, {"abc", "ca", 3},
        {"seq_length", "seq_len", 3}, {"lr", "learning_rate", 11},
    };
    int bad = -1;
    size_t got = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0] && bad < 0; i++)
        if ((got = jm_edit_distance(cases[i].a, cases[i].b)) != cases[i].d ||
            jm_edit_distance(cases[i].b, cases[i].a) != cases[i].d)
            bad = (int)i;
    check(bad < 0, "suggest_edit_distance", "case %d: \"%s\" -> \"%s\" is %zu edits, want %zu (both ways)", bad,
          bad >= 0 ? cases[bad].a : "", bad >= 0 ? cases[bad].b : "", got, bad >= 0 ? cases[bad].d : 0);
    /* names are compared up to 64 bytes: a longer one costs no more time or memory */
    char long_a[200], long_b[200];
    memset(long_a, 'a', 199), long_a[199] = 0;
    memset(long_b, 'a', 199), long_b[199] = 0;
    long_b[150] = 'b';
    check(jm_edit_distance(long_a, long_b) == 0 && jm_edit_distance(long_a, "") == 64, "suggest_edit_distance_long",
          "%zu, %zu", jm_edit_distance(long_a, long_b), jm_edit_distance(long_a, ""));
}

static void test_closest(void)
{
    static const char *const keys[] = {"lr", "beta1", "beta2", "weight_decay", "learning_rate", "steps", "seq_len"};
    const int n = (int)(sizeof keys / sizeof keys[0]);
    static const struct {
        const char *word;
        int want; /* index in keys, or -1: no hint */
    } cases[] = {
        {"lerning_rate", 4}, {"weight_decy", 3}, {"stpes", 5}, {"Steps", 5}, {"seq_length", 6}, {"beta3", 1},
        {"lr", 0}, {"l", 0}, {"x", -1}, {"comment", -1}, {"", -1}, {"totally_unrelated_name", -1}, {"b", -1},
    };
    int bad = -1, got = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0] && bad < 0; i++)
        if ((got = jm_closest_name(cases[i].word, keys, n)) != cases[i].want) bad = (int)i;
    check(bad < 0, "suggest_closest_name", "\"%s\" -> %d, want %d", bad >= 0 ? cases[bad].word : "", got,
          bad >= 0 ? cases[bad].want : 0);
    /* no hint: a 299-byte word, an empty list, or a name every byte of which would change ("a" for "z") */
    char huge[300];
    memset(huge, 's', sizeof huge - 1), huge[sizeof huge - 1] = 0;
    static const char *const one[] = {"a"};
    check(jm_closest_name(huge, keys, n) == -1 && jm_closest_name("steps", keys, 0) == -1 &&
              jm_closest_name("z", one, 1) == -1 && jm_closest_name("ab", one, 1) == 0,
          "suggest_closest_name_edges", "a hint where none is close, or none where one is");
}

int main(void)
{
    test_distance();
    test_closest();
    return exit_status();
}
