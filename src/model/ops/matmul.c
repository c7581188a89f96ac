/* matmul.c — dense products through OpenBLAS (fp32 SGEMM). */
#include "ops.h"

#include <cblas.h>

/* out (N,O) = inp (N,C) @ W(O,C)^T — weights are stored [out, in] like torch. */
void matmul_forward(float *out, const float *inp, const float *W, int64_t N, int64_t C, int64_t O, int accumulate)
{
    if (N == 0 || O == 0) return;
    if (N == 1) { /* decoding: OpenBLAS's GEMV is several times faster than its one-row GEMM */
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)O, (int)C, 1.0f, W, (int)C, inp, 1, accumulate ? 1.0f : 0.0f,
                    out, 1);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, (int)O, (int)C, 1.0f, inp, (int)C, W, (int)C,
                accumulate ? 1.0f : 0.0f, out, (int)O);
}

/* dinp (N,C) (+)= dout (N,O) @ W (O,C);  dW (O,C) += dout^T @ inp.
 * dinp may be NULL (the input needs no gradient, e.g. token embeddings). */
void matmul_backward(float *dinp, float *dW, const float *dout, const float *inp, const float *W, int64_t N,
                     int64_t C, int64_t O, int accumulate)
{
    if (N == 0 || O == 0) return;
    if (dinp)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)N, (int)C, (int)O, 1.0f, dout, (int)O, W,
                    (int)C, accumulate ? 1.0f : 0.0f, dinp, (int)C);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)O, (int)C, (int)N, 1.0f, dout, (int)O, inp, (int)C,
                1.0f, dW, (int)C);
}
