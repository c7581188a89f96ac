/* tool_train_steps — runs N optimizer steps (jm_train_step) from a checkpoint on
 * given token batches and dumps each step's losses and the final weights, for
 * comparison with the PyTorch reference's training (run_tests.py). Not a test
 * by itself.
 *   tool_train_steps CKPT BATCHES.safetensors OUT.safetensors lr warmup decay min_ratio
 *                    beta1 beta2 eps wd clip schedule(wsd|cosine|constant)
 * BATCHES holds I32 "tokens" of shape (steps, accum, B, T). */
#include "base/safetensors.h"

#include <string.h>

int main(int argc, char **argv)
{
    if (argc != 14) {
        fprintf(stderr, "usage: tool_train_steps CKPT BATCHES OUT lr warmup decay min_ratio b1 b2 eps wd clip schedule\n");
        return 2;
    }
    jm_error err;
    jm_model *m;
    st_file bf;
    jm_status s = jm_model_load(argv[1], &m, &err);
    if (!s) s = st_open(argv[2], &bf, &err);
    if (s) {
        fprintf(stderr, "tool_train_steps: %s\n", err.msg);
        return 1;
    }
    const st_tensor *tt = st_find(&bf, "tokens");
    if (!tt || tt->dtype != ST_I32 || tt->ndim != 4) {
        fprintf(stderr, "tool_train_steps: %s needs I32 tokens (steps, accum, B, T)\n", argv[2]);
        return 1;
    }
    int steps = (int)tt->shape[0], accum = (int)tt->shape[1], B = (int)tt->shape[2], T = (int)tt->shape[3];
    int32_t *tok = malloc((size_t)tt->numel * sizeof *tok);
    memcpy(tok, tt->data, (size_t)tt->numel * sizeof *tok);
    jm_adamw_config ac = {atof(argv[4]), atof(argv[8]), atof(argv[9]), atof(argv[10]), atof(argv[11]), atof(argv[12])};
    jm_schedule sch = {strcmp(argv[13], "cosine") == 0 ? JM_SCHEDULE_COSINE
                       : strcmp(argv[13], "constant") == 0 ? JM_SCHEDULE_CONSTANT : JM_SCHEDULE_WSD,
                       ac.lr, atof(argv[7]), atoll(argv[5]), steps, atoll(argv[6])};
    jm_optimizer *opt;
    if ((s = jm_optimizer_create(m, &ac, &opt, &err)) || (s = jm_zero_grad(m, &err))) {
        fprintf(stderr, "tool_train_steps: %s\n", err.msg);
        return 1;
    }
    float *losses = malloc(sizeof(float) * 5 * steps);
    for (int i = 0; i < steps && !s; i++) {
        jm_step_stats st;
        double lr = jm_schedule_lr(&sch, i);
        s = jm_train_step(m, opt, tok + (size_t)i * accum * B * T, B, T, accum, lr, ac.grad_clip, NULL, &st, &err);
        losses[5 * i + 0] = (float)st.loss;
        losses[5 * i + 1] = (float)st.aux_loss;
        losses[5 * i + 2] = (float)st.z_loss;
        losses[5 * i + 3] = (float)st.grad_norm;
        losses[5 * i + 4] = (float)lr;
    }
    if (s) {
        fprintf(stderr, "tool_train_steps: %s\n", err.msg);
        return 1;
    }
    int np = jm_model_num_params(m);
    st_out *o = calloc((size_t)np + 1, sizeof *o);
    o[0] = (st_out){"steps", ST_F32, 2, {steps, 5}, losses}; /* loss, aux, z, grad_norm, lr */
    for (int i = 0; i < np; i++) {
        const jm_param *p = jm_model_param(m, i);
        o[i + 1] = (st_out){p->name, ST_F32, p->ndim, {p->shape[0], p->shape[1], p->shape[2]}, p->data};
    }
    if ((s = st_write(argv[3], o, np + 1, NULL, NULL, 0, &err))) {
        fprintf(stderr, "tool_train_steps: %s\n", err.msg);
        return 1;
    }
    free(o);
    free(losses);
    free(tok);
    st_close(&bf);
    jm_optimizer_free(opt);
    jm_model_free(m);
    return 0;
}
