/* simd.h — what the hand-written kernel sets share (wkernels.c: weight
 * products, and the tables of every set; akernels.c: attention over a bf16
 * KV cache): the target attributes of each x86 set, chosen at run time,
 * never at build time, and the page-ahead prefetch of a stream. */
#ifndef JM_SIMD_H
#define JM_SIMD_H

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define JM_X86 1
#define INLINE inline __attribute__((always_inline))
/* On the loops over rows and inputs: unrolled before gcc's scalar
 * replacement of aggregates runs, which then keeps acc[r][j] in registers;
 * unrolled later (as gcc would by itself), the arrays stay in memory and
 * every FMA's result is stored to the stack. */
#define UNROLL _Pragma("GCC unroll 8")
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))
#endif

#include <stdint.h>

/* Far ahead of the stream, one line of each 4 KB page a pass will read
 * (weights and scales), PAGE_AHEAD bytes before it gets there. What this
 * buys is the address translation, not the line: in a virtual machine whose
 * host maps guest memory with 4 KB pages, every page of a large matrix is a
 * nested TLB miss whatever page size the guest uses, the hardware
 * prefetchers stop at each page's end, and the walk stalls the stream. One
 * thread streaming Q4 experts from a 3 GB arena went from 21-23 to 35-38
 * GB/s (16, 64 and 256 KB ahead did alike), where reading the first 260 MB
 * over and over ran at 41 with or without it (AMD EPYC family 26 model 2). */
#ifndef PAGE_AHEAD
#define PAGE_AHEAD 65536
#endif

/* A prefetch of each `unit`-byte piece (a power of two) of [p + dist, p + n +
 * dist) once over a stream read in consecutive pieces [p, p + n): a unit is
 * prefetched by the piece whose shifted range holds its start. */
static inline void prefetch_each(const uint8_t *p, int64_t n, int64_t dist, uintptr_t unit)
{
    const uintptr_t end = (uintptr_t)p + (uintptr_t)(n + dist);
    for (uintptr_t a = ((uintptr_t)p + (uintptr_t)dist + unit - 1) & ~(unit - 1); a < end; a += unit)
        __builtin_prefetch((const void *)a, 0, 3);
}

/* Each 4 KB page (PAGE_AHEAD, above). */
static inline void prefetch_pages(const uint8_t *p, int64_t n, int64_t dist) { prefetch_each(p, n, dist, 4096); }

/* The same for a stream of len bytes at s read in pieces, in order (the
 * piece [off, off + n) now): the pages PAGE_AHEAD on from the piece, none
 * past the stream's end (what lies there is another stream's or unused).
 * The first PAGE_AHEAD bytes' pages are the caller's to ask for (attend_head
 * does). For the short streams of decode attention, where a burst of them
 * all up front and past the end cost more than it saved (akernels.c). */
static inline void prefetch_stream_pages(const void *s, int64_t len, int64_t off, int64_t n)
{
    const int64_t from = off + PAGE_AHEAD, to = off + n + PAGE_AHEAD < len ? off + n + PAGE_AHEAD : len;
    if (from < to) prefetch_each((const uint8_t *)s + from, to - from, 0, 4096);
}

/* akernels.c, per set (see wkernels in ops.h) */
#define ATT_SCORES_ARGS float *S, int64_t lds, const float *q, int64_t ldq, int nq, const void *K, int bf16, int64_t n, int D, float scale
#define ATT_VALUES_ARGS float *o, int64_t ldo, const float *P, int64_t ldp, int nq, const void *V, int bf16, int64_t n, int D
void att_scores_c(ATT_SCORES_ARGS);
void att_values_c(ATT_VALUES_ARGS);
#ifdef JM_X86
void att_scores_avx2(ATT_SCORES_ARGS);
void att_values_avx2(ATT_VALUES_ARGS);
void att_scores_avx512(ATT_SCORES_ARGS);
void att_values_avx512(ATT_VALUES_ARGS);
#endif

#endif
