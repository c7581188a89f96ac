/* matmul.c — dense products through OpenBLAS (fp32 SGEMM). */
#include "ops.h"

#include <cblas.h>

/* out (N,O) = inp (N,C) @ W(O,C)^T — weights are stored [out, in] like torch. */
void matmul_forward(float *out, const float *inp, const float *W, int64_t N, int64_t C, int64_t O, int accumulate)
{
    if (N == 0 || O == 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, (int)O, (int)C, 1.0f, inp, (int)C, W, (int)C,
                accumulate ? 1.0f : 0.0f, out, (int)O);
}
