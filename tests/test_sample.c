/* test_sample.c — the repetition penalty and temperature 0, against values
 * computed by hand from the HF / llama.cpp definition: for each distinct id
 * among the last repeat_last_n tokens, a positive logit is divided by the
 * penalty and a negative one multiplied by it; other logits are untouched.
 * Prints "PASS <name>" or "FAIL <name>: <why>" per check; exits 0 iff nothing
 * failed. */
#include "harness.h"

#include <math.h>

static jm_sample_opts penalty(double r, int last_n)
{
    return (jm_sample_opts){.temperature = 0, .top_p = 1, .max_new = 1, .repetition_penalty = r,
                            .repeat_last_n = last_n};
}

static void penalty_by_hand(void)
{
    const float logits[6] = {2.0f, -1.5f, 0.0f, 3.0f, -4.0f, 1.0f};
    /* ids 0 and 1 twice (penalised once), 4 once, 9 and -1 outside the vocabulary */
    const int32_t seq[7] = {0, 1, 0, 4, 1, 9, -1};
    const float want[6] = {2.0f / 1.25f, -1.5f * 1.25f, 0.0f, 3.0f, -4.0f * 1.25f, 1.0f};
    float out[6];
    jm_sample_opts o = penalty(1.25, -1);
    const float *got = jm_apply_repetition_penalty(logits, out, 6, seq, 7, &o);
    int bad = -1;
    for (int i = 0; i < 6; i++)
        if (got[i] != want[i]) bad = i;
    check(got == out && bad < 0, "repetition_penalty_by_hand", "logit %d: %g, want %g", bad, bad < 0 ? 0 : got[bad],
          bad < 0 ? 0 : want[bad]);

    /* the window: the last 5 tokens (0, 4, 1, 9, -1) penalise 0, 1 and 4, the last 4 only 4 and 1,
     * the last 2 (9, -1) nothing */
    o = penalty(2.0, 5);
    got = jm_apply_repetition_penalty(logits, out, 6, seq, 7, &o);
    int five = got[0] == 1.0f && got[1] == -3.0f && got[4] == -8.0f && got[3] == 3.0f;
    o = penalty(2.0, 4);
    got = jm_apply_repetition_penalty(logits, out, 6, seq, 7, &o);
    int four = got[0] == 2.0f && got[1] == -3.0f && got[4] == -8.0f;
    o = penalty(2.0, 2);
    got = jm_apply_repetition_penalty(logits, out, 6, seq, 7, &o);
    int two = memcmp(got, logits, sizeof logits) == 0;
    o = penalty(2.0, 100); /* longer than the sequence: all of it */
    got = jm_apply_repetition_penalty(logits, out, 6, seq, 3, &o);
    int longer = got[0] == 1.0f && got[1] == -3.0f && got[4] == -4.0f;
    check(five && four && two && longer, "repetition_penalty_window",
          "last 5 %d, last 4 %d, last 2 %d, longer than the sequence %d", five, four, two, longer);

    /* a penalty below 1 favours repetition: the same rule */
    o = penalty(0.5, 1);
    got = jm_apply_repetition_penalty(logits, out, 6, seq, 1, &o);
    check(got[0] == 4.0f && got[1] == -1.5f && got[3] == 3.0f, "repetition_penalty_below_one", "%g %g %g", got[0],
          got[1], got[3]);

    /* off: penalty 1, 0 (unset) or a window of 0 give the logits themselves, not a copy */
    jm_sample_opts off[3] = {penalty(1.0, 64), penalty(0, 64), penalty(3.0, 0)};
    int same = 1;
    for (int i = 0; i < 3; i++) same &= jm_apply_repetition_penalty(logits, out, 6, seq, 7, &off[i]) == logits;
    check(same, "repetition_penalty_off", "penalty 1, 0 or window 0 did not return the logits");
}

/* The penalty changes greedy's choice exactly when the hand computation says. */
static void penalty_in_sampling(void)
{
    const float logits[4] = {1.0f, 2.4f, 2.0f, -0.5f};
    const int32_t seq[2] = {1, 3};
    float out[4], scratch[8];
    uint64_t rng = 1;
    jm_sample_opts o = penalty(1, 64), strong = penalty(1.3, 64), mild = penalty(1.1, 64);
    int32_t plain = jm_sample(logits, 4, &o, &rng, scratch);
    /* 2.4 / 1.3 = 1.846 < 2.0; 2.4 / 1.1 = 2.18 > 2.0 */
    int32_t a = jm_sample(jm_apply_repetition_penalty(logits, out, 4, seq, 2, &strong), 4, &strong, &rng, scratch);
    int32_t b = jm_sample(jm_apply_repetition_penalty(logits, out, 4, seq, 2, &mild), 4, &mild, &rng, scratch);
    check(plain == 1 && a == 2 && b == 1, "repetition_penalty_changes_greedy_choice",
          "argmax %d, with 1.3: %d (want 2), with 1.1: %d (want 1)", plain, a, b);
}

/* Temperature 0 is greedy (llama.cpp, HF): the argmax, without touching the generator. */
static void temperature_zero(void)
{
    float logits[50], scratch[100];
    for (int i = 0; i < 50; i++) logits[i] = sinf((float)i * 1.7f);
    int32_t best = 0;
    for (int i = 1; i < 50; i++)
        if (logits[i] > logits[best]) best = i;
    jm_sample_opts zero = {.temperature = 0, .top_p = 0.9, .top_k = 5, .max_new = 1};
    uint64_t rng = 7;
    int ok = 1;
    for (int k = 0; k < 20; k++) ok &= jm_sample(logits, 50, &zero, &rng, scratch) == best;
    jm_error err;
    check(ok && rng == 7 && jm_sample_validate(&zero, &err) == JM_OK, "temperature_zero_is_greedy",
          "argmax %d; rng %llu", best, (unsigned long long)rng);
}

/* Greedy's edges, against the plain scan it replaced: equal maxima go to the
 * lowest id, a NaN never wins, a row of NaNs gives 0, -0 and +0 tie; at
 * lengths around the vector widths, the maximum at every position. */
static void greedy_edges(void)
{
    const jm_sample_opts g = {.greedy = 1};
    int bad = 0, cases = 0;
    float x[70];
    for (int n = 1; n <= 70; n++)
        for (int at = 0; at < n; at++, cases++) {
            for (int i = 0; i < n; i++) x[i] = (float)((i * 37) % 11) - 20.0f;
            x[at] = 5.0f;
            if (at + 3 < n) x[at + 3] = 5.0f;          /* a tie after it */
            if (at > 0) x[at - 1] = NAN;               /* a NaN beside it */
            bad += jm_sample(x, n, &g, NULL, NULL) != at;
        }
    for (int i = 0; i < 20; i++) x[i] = NAN;
    bad += jm_sample(x, 20, &g, NULL, NULL) != 0;
    x[0] = NAN, x[1] = -0.0f, x[2] = 0.0f, x[3] = -1.0f;
    bad += jm_sample(x, 4, &g, NULL, NULL) != 1;
    x[0] = -INFINITY, x[1] = -INFINITY, x[2] = NAN;
    bad += jm_sample(x, 3, &g, NULL, NULL) != 0;
    check(bad == 0, "greedy_ties_nans_and_lengths", "%d of %d cases wrong", bad, cases + 3);
}

static void validation(void)
{
    jm_error err;
    jm_sample_opts o = {.temperature = 0.8, .top_p = 0.9, .max_new = 1, .repetition_penalty = -1};
    int neg = jm_sample_validate(&o, &err) == JM_ERR_ARG && strstr(err.msg, "repetition penalty");
    o.repetition_penalty = INFINITY;
    int inf = jm_sample_validate(&o, &err) == JM_ERR_ARG;
    o.repetition_penalty = 1.1;
    o.repeat_last_n = -2;
    int window = jm_sample_validate(&o, &err) == JM_ERR_ARG && strstr(err.msg, "repeat_last_n");
    o.repeat_last_n = -1;
    int ok = jm_sample_validate(&o, &err) == JM_OK;
    o.temperature = -0.1;
    int temp = jm_sample_validate(&o, &err) == JM_ERR_ARG;
    check(neg && inf && window && ok && temp, "sample_options_validated",
          "negative penalty %d, infinite %d, window -2 %d, valid %d, temperature -0.1 %d", neg, inf, window, ok, temp);
}

int main(void)
{
    penalty_by_hand();
    penalty_in_sampling();
    temperature_zero();
    greedy_edges();
    validation();
    return exit_status();
}
