/* embedding.c — token embedding lookup. Token ids are validated by the caller. */
#include "ops.h"

#include <omp.h>
#include <string.h>

/* The table as stored (fp32 when training; BF16/Q8/Q4 rows are dequantized). */
void embedding_forward(float *out, const int32_t *tokens, wview table, int64_t N, int64_t H)
{
    if (N * H < JM_OMP_GRAIN) /* no OpenMP region (ops.h) */
        for (int64_t t = 0; t < N; t++) dequant_rows(out + t * H, table, tokens[t], 1, H);
    else {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < N; t++) dequant_rows(out + t * H, table, tokens[t], 1, H);
    }
}

/* dtable[tokens[t]] += dout[t]. Threads own disjoint column ranges, so
 * repeated tokens never race. */
void embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int64_t N, int64_t H)
{
#pragma omp parallel
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t c0 = H * id / nt, c1 = H * (id + 1) / nt;
        for (int64_t t = 0; t < N; t++) {
            float *d = dtable + (int64_t)tokens[t] * H;
            const float *g = dout + t * H;
            for (int64_t i = c0; i < c1; i++) d[i] += g[i];
        }
    }
}
