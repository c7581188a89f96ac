/* bench/forward — forward-pass throughput of the C model, and the machine's
 * fp32 GEMM peak measured in the same process, on the same threads.
 * Prints one JSON line per measurement (bench/run_bench.py compares them
 * with the PyTorch reference). Not a test: nothing here passes or fails. */
#include "common.h"

typedef struct {
    jm_model *m;
    const int32_t *tok;
    int B, T;
    double loss;
    jm_error err;
} forward_ctx;

static int forward_step(void *p)
{
    forward_ctx *c = p;
    jm_losses L;
    if (jm_forward(c->m, c->tok, c->B, c->T, &L, &c->err)) return 1;
    c->loss = L.loss;
    return 0;
}

int main(int argc, char **argv)
{
    int threads = 2, B = 8, T = 256, iters = 5;
    if (bench_args(argc, argv, "bench/forward", &threads, &B, &T, &iters)) return 2;
    jm_set_threads(threads);
    jm_config c;
    bench_config(&c);
    forward_ctx ctx = {.B = B, .T = T};
    int32_t *tok = bench_tokens(B * T, c.vocab_size);
    ctx.tok = tok;
    if (!tok || jm_model_create(&c, 1, &ctx.m, &ctx.err) ||
        bench_run("forward", forward_step, &ctx, iters, forward_flops(&c, B, T), threads, B, T, &ctx.loss)) {
        fprintf(stderr, "bench/forward: %s\n", tok ? ctx.err.msg : "out of memory");
        return 1;
    }
    free(tok);
    jm_model_free(ctx.m);
    return 0;
}
