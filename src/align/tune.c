/* tune.c — what `jetmoe sft` and `jetmoe dpo` share: the recipe with the
 * command line's overrides, the starting checkpoint's config and tokenizer,
 * the record reader's options, and --dump-grad's file. */
#include "align/align.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int has_tokenizer(const char *dir)
{
    static const char *const names[] = {"tokenizer.model", "tokenizer.json"};
    for (int i = 0; i < 2; i++) {
        char *p = jm_path_join(dir, names[i]);
        int ok = p && access(p, R_OK) == 0;
        free(p);
        if (ok) return 1;
    }
    return 0;
}

jm_status jm_tune_setup_open(const jm_tune_opts *o, jm_task_kind kind, jm_tune_setup *t, jm_error *err)
{
    memset(t, 0, sizeof *t);
    if (!o->model && !o->run.resume)
        return jm_fail(err, JM_ERR_ARG, "--model DIR is needed: the checkpoint to fine-tune");
    if (!o->dump_grad && !o->run.out_dir)
        return jm_fail(err, JM_ERR_ARG, "--out RUN_DIR is needed (or --dump-grad FILE for one batch's gradients)");
    if (o->dump_grad && (o->run.resume || !o->model))
        return jm_fail(err, JM_ERR_ARG, "--dump-grad takes one batch through --model DIR%s",
                       o->run.resume ? "; --resume continues a run: drop it" : ", which is missing");
    if (o->run.resume && o->run.overwrite) /* before DPO reads the run's cached reference log-probs */
        return jm_fail(err, JM_ERR_ARG, "%s: --resume continues the run there, --overwrite replaces it: pass one",
                       o->run.out_dir);
    jm_status s;
    if (o->dump_grad) { /* refused before any work, as every output is */
        const char *inputs[64];
        char target[4096];
        if ((s = jm_output_file(o->dump_grad, inputs, jm_tune_inputs(o, inputs, 64), o->run.overwrite, target,
                                sizeof target, err)))
            return s;
    }
    if ((s = jm_recipe_load_kind(o->recipe, kind, &t->r, err))) return s;
    if (o->beta >= 0) t->r->beta = o->beta;
    if (o->label_smoothing >= 0) t->r->label_smoothing = o->label_smoothing;
    if (kind == JM_TASK_DPO) { /* the command line's values are the run's too: a resume with others is refused */
        jm_recipe_hash_more(t->r, &t->r->beta, sizeof t->r->beta);
        jm_recipe_hash_more(t->r, &t->r->label_smoothing, sizeof t->r->label_smoothing);
    }

    /* the checkpoint the run starts from, or on --resume the run's newest */
    char dir[4096];
    if (o->run.resume && o->run.out_dir) {
        char ck[4200];
        snprintf(ck, sizeof ck, "%s/checkpoints", o->run.out_dir);
        if ((s = jm_read_latest(ck, dir, sizeof dir, err))) goto fail;
    } else if ((s = jm_checkpoint_resolve(o->model, dir, sizeof dir, err))) {
        goto fail;
    }
    jm_tensor_info *info = NULL;
    int ninfo;
    if ((s = jm_checkpoint_inspect(dir, &t->cfg, &info, &ninfo, err))) goto fail;
    free(info);
    if (t->r->has_aux_coef) t->cfg.aux_loss_coef = t->r->model.aux_loss_coef;
    if (t->r->has_z_coef) t->cfg.z_loss_coef = t->r->model.z_loss_coef;
    if (t->r->seq_len > t->cfg.max_position_embeddings) {
        if (!o->run.quiet && o->recipe) /* the default (2048, the report's) quietly fits a smaller model */
            fprintf(stderr, "%s: max_len %d is past the model's context: sequences are at most %d tokens\n",
                    jm_task_name(kind), t->r->seq_len, t->cfg.max_position_embeddings);
        t->r->seq_len = t->cfg.max_position_embeddings;
    }
    if (has_tokenizer(dir)) {
        if ((s = jm_tokenizer_load(dir, &t->tok, err))) goto fail;
        snprintf(t->tok_dir, sizeof t->tok_dir, "%s", dir);
    }
    t->ropts = (jm_records_opts){t->r->seq_len, t->r->truncate, o->skip_bad, t->cfg.vocab_size, o->run.quiet};
    return JM_OK;
fail:
    jm_tune_setup_close(t);
    return s;
}

void jm_tune_setup_close(jm_tune_setup *t)
{
    jm_recipe_free(t->r);
    jm_tokenizer_free(t->tok);
    memset(t, 0, sizeof *t);
}

jm_status jm_tune_load_model(const jm_tune_opts *o, const jm_tune_setup *t, jm_model **m, jm_error *err)
{
    *m = NULL;
    if (o->run.resume) return JM_OK;
    jm_status s = jm_model_load(o->model, m, err);
    if (!s) s = jm_model_reconfigure(*m, &t->cfg, err);
    if (s) {
        jm_model_free(*m);
        *m = NULL;
    }
    return s;
}

int jm_tune_inputs(const jm_tune_opts *o, const char **inputs, int cap)
{
    int n = 0;
    if (o->model && n < cap) inputs[n++] = o->model;
    if (o->ref && n < cap) inputs[n++] = o->ref;
    if (o->recipe && n < cap) inputs[n++] = o->recipe;
    for (int i = 0; i < o->ndata && n < cap; i++) inputs[n++] = o->data[i];
    for (int i = 0; i < o->neval && n < cap; i++) inputs[n++] = o->eval_data[i];
    return n;
}

jm_status jm_dump_grads(const char *path, const jm_model *m, const char *const *names, const double *values, int n,
                        const jm_tune_opts *o, jm_error *err)
{
    const char *inputs[64];
    int ni = jm_tune_inputs(o, inputs, 64);
    char target[4096];
    jm_status s = jm_output_file(path, inputs, ni, o->run.overwrite, target, sizeof target, err);
    if (s) return s;
    const int np = jm_model_num_params(m), nt = n + np;
    jm_tensor_out *t = calloc((size_t)nt, sizeof *t);
    char (*gname)[112] = calloc((size_t)np, sizeof *gname);
    float *scalar = calloc((size_t)(n ? n : 1), sizeof *scalar);
    if (!t || !gname || !scalar) {
        s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (int i = 0; i < n; i++) {
        scalar[i] = (float)values[i];
        t[i] = (jm_tensor_out){names[i], "F32", 1, {1}, &scalar[i]};
    }
    for (int i = 0; i < np; i++) {
        const jm_param *p = jm_model_param(m, i);
        snprintf(gname[i], sizeof gname[i], "grad.%s", p->name);
        t[n + i] = (jm_tensor_out){gname[i], "F32", p->ndim, {0}, p->grad};
        for (int d = 0; d < p->ndim; d++) t[n + i].shape[d] = p->shape[d];
    }
    s = jm_save_tensors(target, t, nt, err);
done:
    free(t);
    free(gname);
    free(scalar);
    return s;
}

int jm_tune_count_state(st_out *out, int cap, const char *name, const int64_t *n, jm_error *err)
{
    if (cap < 1) return jm_fail(err, JM_ERR_NOMEM, "no room for %s in the trainer state", name), -1;
    out[0] = (st_out){name, ST_I64, 1, {1}, n};
    return 1;
}

jm_status jm_tune_count_restore(const st_file *f, const char *name, const char *what, int64_t n, jm_error *err)
{
    int64_t had;
    jm_status s = jm_state_tensor(f, name, ST_I64, 1, &had, err);
    if (!s && had != n)
        s = jm_fail(err, JM_ERR_ARG, "%s: the run had %lld %s, the data now has %lld: resume with the same data",
                    f->path, (long long)had, what, (long long)n);
    return s;
}
