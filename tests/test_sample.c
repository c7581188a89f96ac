/* test_sample.c — the repetition penalty and temperature 0, against values
 * computed by hand from the HF / llama.cpp definition: for each distinct id
 * among the recent tokens, a positive logit is divided by the penalty and a
 * negative one multiplied by it; other logits are untouched.
 * Prints "PASS <name>" or "FAIL <name>: <why>" per check; exits 0 iff nothing
 * failed. */
#include "harness.h"

#include <math.h>

static void penalty_by_hand(void)
{
    const float logits[6] = {2.0f, -1.5f, 0.0f, 3.0f, -4.0f, 1.0f};
    /* ids 0 and 1 twice (penalised once), 4 once, 9 and -1 outside the vocabulary */
    const int32_t recent[7] = {0, 1, 0, 4, 1, 9, -1};
    const float want[6] = {2.0f / 1.25f, -1.5f * 1.25f, 0.0f, 3.0f, -4.0f * 1.25f, 1.0f};
    float out[6];
    jm_apply_repetition_penalty(logits, out, 6, recent, 7, 1.25);
    int bad = -1;
    for (int i = 0; i < 6; i++)
        if (out[i] != want[i]) bad = i;
    check(bad < 0, "repetition_penalty_by_hand", "logit %d: %g, want %g", bad, bad < 0 ? 0 : out[bad],
          bad < 0 ? 0 : want[bad]);

    /* a penalty below 1 favours repetition: the same rule */
    jm_apply_repetition_penalty(logits, out, 6, recent, 1, 0.5);
    check(out[0] == 4.0f && out[1] == -1.5f && out[3] == 3.0f, "repetition_penalty_below_one",
          "%g %g %g", out[0], out[1], out[3]);

    /* penalty 1 and an empty window are plain copies */
    jm_apply_repetition_penalty(logits, out, 6, recent, 7, 1.0);
    int same = memcmp(out, logits, sizeof out) == 0;
    jm_apply_repetition_penalty(logits, out, 6, recent, 0, 3.0);
    check(same && memcmp(out, logits, sizeof out) == 0, "repetition_penalty_off", "penalty 1 or no recent tokens "
          "changed the logits");
}

/* The penalty changes greedy's choice exactly when the hand computation says. */
static void penalty_in_sampling(void)
{
    const float logits[4] = {1.0f, 2.4f, 2.0f, -0.5f};
    const int32_t recent[2] = {1, 3};
    float out[4];
    uint64_t rng = 1;
    float scratch[8];
    jm_sample_opts o = {.temperature = 0, .top_p = 1, .max_new = 1};
    int32_t plain = jm_sample(logits, 4, &o, &rng, scratch);
    jm_apply_repetition_penalty(logits, out, 4, recent, 2, 1.3); /* 2.4 / 1.3 = 1.846 < 2.0 */
    int32_t pen = jm_sample(out, 4, &o, &rng, scratch);
    jm_apply_repetition_penalty(logits, out, 4, recent, 2, 1.1); /* 2.4 / 1.1 = 2.18 > 2.0 */
    int32_t mild = jm_sample(out, 4, &o, &rng, scratch);
    check(plain == 1 && pen == 2 && mild == 1, "repetition_penalty_changes_greedy_choice",
          "argmax %d, with 1.3: %d (want 2), with 1.1: %d (want 1)", plain, pen, mild);
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
    validation();
    return exit_status();
}
