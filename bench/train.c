/* bench/train — training throughput (forward + backward + AdamW) of the C
 * model on the bench config, and the fp32 GEMM peak measured in the same
 * process. One JSON line per measurement; bench/run_bench.py compares them
 * with the PyTorch reference. Not a test. */
#include "common.h"

typedef struct {
    jm_model *m;
    jm_optimizer *opt;
    const int32_t *tok;
    int B, T;
    double loss;
    jm_error err;
} train_ctx;

static int train_step(void *p)
{
    train_ctx *c = p;
    jm_step_stats st;
    if (jm_train_step(c->m, c->opt, c->tok, c->B, c->T, 1, 5e-4, 1.0, NULL, &st, &c->err)) return 1;
    c->loss = st.loss;
    return 0;
}

int main(int argc, char **argv)
{
    int threads = 2, B = 8, T = 256, iters = 4;
    if (bench_args(argc, argv, "bench/train", &threads, &B, &T, &iters)) return 2;
    jm_set_threads(threads);
    jm_config c;
    bench_config(&c);
    jm_adamw_config ac = {5e-4, 0.9, 0.95, 1e-8, 0.1, 1.0};
    train_ctx ctx = {.B = B, .T = T};
    int32_t *tok = bench_tokens(B * T, c.vocab_size);
    ctx.tok = tok;
    /* model FLOPs: the backward costs twice the forward's products */
    if (!tok || jm_model_create(&c, 1, &ctx.m, &ctx.err) || jm_optimizer_create(ctx.m, &ac, &ctx.opt, &ctx.err) ||
        jm_zero_grad(ctx.m, &ctx.err) ||
        bench_run("train", train_step, &ctx, iters, 3.0 * forward_flops(&c, B, T), threads, B, T, &ctx.loss)) {
        fprintf(stderr, "bench/train: %s\n", tok ? ctx.err.msg : "out of memory");
        return 1;
    }
    free(tok);
    jm_optimizer_free(ctx.opt);
    jm_model_free(ctx.m);
    return 0;
}
