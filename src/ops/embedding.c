/* embedding.c — token embedding lookup. Token ids are validated by the caller. */
#include "ops.h"

#include <string.h>

void embedding_forward(float *out, const int32_t *tokens, const float *table, int64_t N, int64_t H)
{
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++)
        memcpy(out + t * H, table + (int64_t)tokens[t] * H, (size_t)H * sizeof(float));
}
