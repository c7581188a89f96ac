/* fuzz_rng.h — the fuzzers' random numbers (tests/fuzz_*.c): xorshift64*,
 * deterministic from a seed, so a failing iteration can be replayed.
 * Header-only and static, like harness.h. */
#ifndef JM_TEST_FUZZ_RNG_H
#define JM_TEST_FUZZ_RNG_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t s; /* never 0 */
} rng;

static inline uint64_t rnd(rng *r) /* xorshift64* */
{
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    return r->s * 2685821657736338717ull;
}

static inline size_t below(rng *r, size_t n) /* uniform enough in [0, n); n > 0 */
{
    return (size_t)(rnd(r) % n);
}

#endif
