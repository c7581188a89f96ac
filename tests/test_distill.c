/* test_distill.c — distill pairs' verifier and ranking (align.h:
 * jm_distill_verify, jm_distill_rank) on controlled cases: a known-right
 * answer is chosen over a wrong one, ties go to the teacher or are counted,
 * empty answers and identical texts never make a pair. */
#include "harness.h"
#include "align/align.h"

#include <math.h>

static void verify(void)
{
    static const struct {
        const char *text, *answer;
        int right;
    } cases[] = {
        {"She had 12 and bought 7, so 12 + 7 = 19.\n#### 19", "12 + 7 = 19 apples.\n#### 19", 1},
        {"12 + 7 = 18\n#### 18", "#### 19", 0},
        {"The total is 1,234.", "1234", 1},
        {"It costs 5.0 dollars.", "5", 1},
        {"It costs 5.5 dollars.", "5", 0},
        {"no number in this answer", "#### 5", 0},
        {"The answer is 19, not 7.", "19", 0}, /* the last number decides */
        {"#### Paris", "Paris", 1},            /* no number: the reference is compared whole */
        {"#### 3", "", 0},
    };
    int bad = -1;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (jm_distill_verify(cases[i].text, cases[i].answer) != cases[i].right) bad = (int)i;
    check(bad < 0, "distill_verify_final_answers", "case %d: '%s' vs '%s' should be %s", bad,
          bad < 0 ? "" : cases[bad].text, bad < 0 ? "" : cases[bad].answer,
          bad >= 0 && cases[bad].right ? "right" : "wrong");
}

static void rank(void)
{
    int c = -1, w = -1;
    /* the verifier: the first right answer over the first wrong one, whatever the teacher thinks */
    const char *four[4] = {"#### 18", "so #### 19", "#### 20", "it is #### 19"};
    int right[4];
    for (int i = 0; i < 4; i++) right[i] = jm_distill_verify(four[i], "#### 19");
    const double prefers_wrong[4] = {-0.1, -5.0, -0.2, -4.0};
    jm_rank r = jm_distill_rank(4, four, right, prefers_wrong, &c, &w);
    check(r == JM_RANK_VERIFIER && c == 1 && w == 0, "distill_rank_right_over_wrong", "rank %d, chosen %d, rejected %d",
          r, c, w);

    /* all right or all wrong: no pair without a teacher, the teacher's best and worst with one */
    const int all_right[4] = {1, 1, 1, 1}, all_wrong[4] = {0, 0, 0, 0};
    int ok = jm_distill_rank(4, four, all_right, NULL, &c, &w) == JM_RANK_ALL_RIGHT &&
             jm_distill_rank(4, four, all_wrong, NULL, &c, &w) == JM_RANK_ALL_WRONG;
    r = jm_distill_rank(4, four, all_wrong, prefers_wrong, &c, &w);
    check(ok && r == JM_RANK_TEACHER && c == 0 && w == 1, "distill_rank_tie_to_teacher",
          "no-teacher verdicts %d; with the teacher rank %d, chosen %d, rejected %d", ok, r, c, w);

    /* the teacher alone: best over worst, the worst never the best's text; NaN (unscored) left out */
    const char *texts[4] = {"a", "b", "a", "c"};
    const double sc[4] = {-1.0, NAN, -3.0, -2.0};
    r = jm_distill_rank(4, texts, NULL, sc, &c, &w);
    int ok1 = r == JM_RANK_TEACHER && c == 0 && w == 3; /* "a" at -3 is the best's own text */
    const char *same[3] = {"x", "x", "x"};
    const double sc3[3] = {-1, -2, -3};
    int ok2 = jm_distill_rank(3, same, NULL, sc3, &c, &w) == JM_RANK_TIED;
    check(ok1 && ok2, "distill_rank_teacher", "rank %d chosen %d rejected %d; identical texts tied %d", r, c, w, ok2);

    /* empty answers take no part */
    const char *empty[3] = {"", "#### 19", "#### 4"};
    const int er[3] = {1, 1, 0};
    r = jm_distill_rank(3, empty, er, NULL, &c, &w);
    const char *one[3] = {"", NULL, "#### 4"};
    int few = jm_distill_rank(3, one, NULL, sc3, &c, &w) == JM_RANK_TOO_FEW &&
              jm_distill_rank(2, four, NULL, NULL, &c, &w) == JM_RANK_TIED; /* nothing to rank by */
    check(r == JM_RANK_VERIFIER && c == 1 && w == 2 && few, "distill_rank_skips_empty", "rank %d chosen %d rejected %d, "
          "too few / nothing to rank by %d", r, c, w, few);
}

int main(void)
{
    verify();
    rank();
    return exit_status();
}
