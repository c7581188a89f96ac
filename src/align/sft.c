/* sft.c — `jetmoe sft`: supervised fine-tuning, a task of the training loop.
 *
 * The objective is the cross-entropy of the learned tokens (the assistant's,
 * records.c) averaged over every learned token of the optimizer step, plus the
 * router losses of the checkpoint (or recipe) weights over every token that
 * is not padding. Each epoch visits the examples in a fresh shuffle of the
 * seed; they are packed into rows of max_len (pack.c) and batch_size rows
 * make a micro-batch. The whole plan follows from the seed, so the loop's
 * step counter is all a checkpoint needs to resume exactly. */
#include "align/align.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    const jm_recipe *r;
    jm_sft_set data, eval;
    jm_seq_ref *seq, *eval_seq; /* per example: ids and targets (labels shifted by one) */
    int32_t *targets;           /* storage of both sets' targets */
    int64_t *plan;              /* epochs * n example indices: each epoch's shuffle, one after another */
    int64_t *row_first;         /* rows + 1: where each row of the plan starts */
    int64_t rows, rows_per_step;
    int64_t r0, r1, count;      /* the planned step: its rows and learned tokens */
    int nmicro;                 /* and micro-batches */
    jm_packed pk;
    jm_seq_ref *scratch;        /* the sequences of one micro-batch */
} sft_task;

/* HF's convention: the logits at t predict labels[t + 1]. */
static int fill_targets(jm_seq_ref *seq, int32_t *tg, const jm_sft_set *s)
{
    int64_t off = 0;
    for (int64_t i = 0; i < s->n; i++) {
        const jm_sft_example *e = &s->ex[i];
        for (int t = 0; t < e->n; t++) tg[off + t] = t + 1 < e->n ? e->labels[t + 1] : -1;
        seq[i] = (jm_seq_ref){e->ids, tg + off, e->n};
        off += e->n;
    }
    return (int)off;
}

static int64_t learned(const jm_seq_ref *q)
{
    int64_t n = 0;
    for (int t = 0; t < q->n; t++) n += q->targets[t] >= 0;
    return n;
}

/* Step planning: rows [r0, r1) of the plan, batch_size rows per micro-batch;
 * every learned token of the step weighs 1 / (learned tokens of all those rows). */
static jm_status sft_plan_rows(sft_task *k, int64_t r0, int64_t r1, int *nmicro)
{
    const int bs = k->r->batch_size;
    int64_t count = 0;
    for (int64_t i = k->row_first[r0]; i < k->row_first[r1]; i++) count += learned(&k->seq[k->plan[i]]);
    k->r0 = r0, k->r1 = r1, k->count = count;
    *nmicro = k->nmicro = (int)((r1 - r0 + bs - 1) / bs);
    return JM_OK;
}

static jm_status sft_plan_step(void *ctx, int64_t step, int *nmicro, jm_error *err)
{
    (void)err;
    sft_task *k = ctx;
    int64_t r0 = step * k->rows_per_step, r1 = r0 + k->rows_per_step < k->rows ? r0 + k->rows_per_step : k->rows;
    return sft_plan_rows(k, r0, r1, nmicro);
}

static jm_status sft_micro(void *ctx, int j, jm_micro *mb, jm_error *err)
{
    sft_task *k = ctx;
    const int bs = k->r->batch_size;
    int64_t a = k->r0 + (int64_t)j * bs, b = a + bs < k->r1 ? a + bs : k->r1;
    int n = 0;
    for (int64_t i = k->row_first[a]; i < k->row_first[b]; i++) k->scratch[n++] = k->seq[k->plan[i]];
    jm_status s = jm_pack(&k->pk, k->scratch, n, k->r->seq_len, err);
    mb->batch = k->pk.batch;
    mb->router_scale = 1.0 / k->nmicro;
    return s;
}

static jm_status sft_objective(void *ctx, int j, const float *logp, const jm_losses *L, const float **weight,
                               double *acc, jm_error *err)
{
    (void)j, (void)logp, (void)err;
    sft_task *k = ctx;
    const size_t N = (size_t)k->pk.batch.B * k->pk.batch.T;
    for (size_t t = 0; t < N; t++) k->pk.weight[t] = k->count ? 1.0f / (float)k->count : 0.0f;
    *weight = k->pk.weight;
    acc[JM_ACC_LOOP] += L->loss * (double)L->count; /* the step's summed token loss */
    return JM_OK;
}

static void sft_finish(void *ctx, int64_t step, const double *acc, jm_task_step *st)
{
    (void)step;
    sft_task *k = ctx;
    st->loss = k->count ? acc[JM_ACC_LOOP] / (double)k->count : 0;
    int64_t done = k->row_first[k->r1]; /* examples visited, over the epochs */
    st->nmetrics = 1;
    st->metric_name[0] = "epoch";
    st->metric[0] = k->data.n ? (double)done / (double)k->data.n : 0;
}

static int sft_state(void *ctx, st_out *out, int cap, jm_error *err)
{
    return jm_tune_count_state(out, cap, "sft.examples", &((sft_task *)ctx)->data.n, err);
}

static jm_status sft_restore(void *ctx, const st_file *f, int64_t step, jm_error *err)
{
    (void)step;
    return jm_tune_count_restore(f, "sft.examples", "examples", ((sft_task *)ctx)->data.n, err);
}

static jm_status sft_heldout(void *ctx, jm_model *m, int final, jm_task_step *st, jm_error *err)
{
    (void)final;
    sft_task *k = ctx;
    const int bs = k->r->batch_size;
    double nll = 0;
    int64_t count = 0;
    int *len = malloc(sizeof *len * (size_t)k->eval.n);
    int64_t *first = malloc(sizeof *first * (size_t)(k->eval.n + 1));
    if (!len || !first) {
        free(len);
        free(first);
        return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    }
    for (int64_t e = 0; e < k->eval.n; e++) len[e] = k->eval_seq[e].n;
    const int64_t rows = jm_pack_rows(len, k->eval.n, k->r->seq_len, NULL, first);
    jm_status s = JM_OK;
    for (int64_t r = 0; r < rows && !s; r += bs) { /* batch_size rows at a time */
        const int64_t a = first[r], b = first[r + bs < rows ? r + bs : rows];
        jm_losses L;
        if (!(s = jm_pack(&k->pk, k->eval_seq + a, (int)(b - a), k->r->seq_len, err)) &&
            !(s = jm_forward_batch(m, &k->pk.batch, &L, err))) {
            nll += L.loss * (double)L.count;
            count += L.count;
        }
    }
    free(len);
    free(first);
    if (s) return s;
    st->loss = count ? nll / (double)count : NAN;
    st->nmetrics = 3;
    st->metric_name[0] = "heldout_loss", st->metric[0] = st->loss;
    st->metric_name[1] = "heldout_perplexity", st->metric[1] = exp(st->loss);
    st->metric_name[2] = "heldout_tokens", st->metric[2] = (double)count;
    return JM_OK;
}

static void sft_free(sft_task *k)
{
    jm_sft_free(&k->data);
    jm_sft_free(&k->eval);
    free(k->seq);
    free(k->eval_seq);
    free(k->targets);
    free(k->plan);
    free(k->row_first);
    free(k->scratch);
    jm_packed_free(&k->pk);
}

static void report_records(const char *what, const jm_records_stats *st, int64_t loss_tokens)
{
    fprintf(stderr, "%s: %lld examples from %lld lines, %lld tokens (%lld learned); %lld truncated, %lld dropped as "
                    "too long, %lld bad lines skipped\n", what, (long long)st->used, (long long)st->lines,
            (long long)st->tokens, (long long)loss_tokens, (long long)st->truncated, (long long)st->too_long,
            (long long)st->bad);
}

/* The epochs' plans: each a shuffle of the examples packed into rows. */
static jm_status plan_epochs(sft_task *k, jm_error *err)
{
    const int64_t n = k->data.n, E = k->r->epochs;
    int64_t *order = malloc(sizeof *order * (size_t)n);
    int *len = malloc(sizeof *len * (size_t)n);
    k->plan = malloc(sizeof *k->plan * (size_t)(n * E));
    k->row_first = malloc(sizeof *k->row_first * (size_t)(n * E + 1));
    if (!order || !len || !k->plan || !k->row_first) {
        free(order);
        free(len);
        return jm_fail(err, JM_ERR_NOMEM, "out of memory planning %lld epochs", (long long)E);
    }
    k->rows = 0;
    for (int64_t e = 0; e < E; e++) { /* the epoch's rows, their starts made indices into the whole plan */
        jm_shuffle(order, n, k->r->seed, e);
        for (int64_t i = 0; i < n; i++) k->plan[e * n + i] = order[i], len[i] = k->seq[order[i]].n;
        int64_t *first = k->row_first + k->rows, rows = jm_pack_rows(len, n, k->r->seq_len, NULL, first);
        for (int64_t r = 0; r <= rows; r++) first[r] += e * n;
        k->rows += rows;
    }
    free(order);
    free(len);
    /* a micro-batch's rows may reach into the next epoch (or several, with few examples): scratch holds
     * the most examples any micro-batch has, which can be more than the n it was made for */
    const int bs = k->r->batch_size;
    int64_t most = n;
    for (int64_t a = 0; a < k->rows; a += bs) {
        int64_t b = a + bs < k->rows ? a + bs : k->rows;
        if (k->row_first[b] - k->row_first[a] > most) most = k->row_first[b] - k->row_first[a];
    }
    jm_seq_ref *sc = most > n ? realloc(k->scratch, sizeof *sc * (size_t)most) : k->scratch;
    if (!sc) return jm_fail(err, JM_ERR_NOMEM, "out of memory for a micro-batch of %lld examples", (long long)most);
    k->scratch = sc;
    return JM_OK;
}

static jm_task sft_task_of(sft_task *k, int64_t neval)
{
    return (jm_task){.ctx = k,
                     .plan = sft_plan_step,
                     .micro = sft_micro,
                     .objective = sft_objective,
                     .finish = sft_finish,
                     .state = sft_state,
                     .restore = sft_restore,
                     .heldout = neval ? sft_heldout : NULL,
                     .eval_at_start = neval > 0};
}

/* The one "row" of jm_sft_set_grads' plan. */
static jm_status sft_plan_whole(void *ctx, int64_t step, int *nmicro, jm_error *err)
{
    (void)step, (void)err;
    return sft_plan_rows(ctx, 0, 1, nmicro);
}

/* The whole set as one optimizer step of one micro-batch (every example
 * packed into rows of max_len, CE over all their learned tokens): what
 * --dump-grad writes and bench/align times. */
jm_status jm_sft_set_grads(jm_model *m, const jm_sft_set *data, int max_len, double loss[4], jm_error *err)
{
    const int64_t n = data->n;
    int64_t tokens = 0;
    for (int64_t i = 0; i < n; i++) tokens += data->ex[i].n;
    jm_recipe *one = calloc(1, sizeof *one);
    sft_task k = {.r = one};
    k.seq = malloc(sizeof *k.seq * (size_t)(n + 1));
    k.targets = malloc(sizeof *k.targets * (size_t)(tokens + 1));
    k.scratch = malloc(sizeof *k.scratch * (size_t)(n + 1));
    k.plan = malloc(sizeof *k.plan * (size_t)(n + 1));
    k.row_first = malloc(sizeof *k.row_first * 2);
    jm_status s = JM_OK;
    if (!one || !k.seq || !k.targets || !k.scratch || !k.plan || !k.row_first) {
        s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
    } else {
        fill_targets(k.seq, k.targets, data);
        for (int64_t i = 0; i < n; i++) k.plan[i] = i;
        /* one "row" of the plan holding every example: one micro-batch of however many packed rows */
        k.row_first[0] = 0, k.row_first[1] = n, k.rows = 1;
        one->batch_size = 1, one->seq_len = max_len; /* all the task reads of the recipe */
        jm_task_step st = {0};
        const jm_config *c = jm_model_config(m);
        jm_task task = sft_task_of(&k, 0);
        task.plan = sft_plan_whole;
        if (!(s = jm_task_grads(&task, m, 0, &st, err))) {
            loss[0] = st.loss + c->aux_loss_coef * st.aux_loss + c->z_loss_coef * st.z_loss;
            loss[1] = st.loss, loss[2] = st.aux_loss, loss[3] = st.z_loss;
        }
    }
    sft_free(&k);
    free(one);
    return s;
}

jm_status jm_sft(const jm_tune_opts *o, int *stopped, jm_error *err)
{
    *stopped = 0;
    jm_tune_setup ts;
    jm_status s = jm_tune_setup_open(o, JM_TASK_SFT, &ts, err);
    if (s) return s;
    sft_task k = {.r = ts.r};
    jm_model *m = NULL;
    jm_records_stats rs, es = {0};
    if ((s = jm_sft_load(o->data, o->ndata, ts.tok, &ts.ropts, &k.data, &rs, err))) goto done;
    if (o->neval && (s = jm_sft_load(o->eval_data, o->neval, ts.tok, &ts.ropts, &k.eval, &es, err))) goto done;
    if (k.data.n == 0) {
        s = jm_fail(err, JM_ERR_ARG, "%s: no example to train on", o->data[0]);
        goto done;
    }
    k.seq = malloc(sizeof *k.seq * (size_t)k.data.n);
    k.eval_seq = malloc(sizeof *k.eval_seq * (size_t)(k.eval.n + 1));
    k.targets = malloc(sizeof *k.targets * (size_t)(rs.tokens + es.tokens + 1));
    k.scratch = malloc(sizeof *k.scratch * (size_t)k.data.n);
    if (!k.seq || !k.eval_seq || !k.targets || !k.scratch) {
        s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
        goto done;
    }
    int off = fill_targets(k.seq, k.targets, &k.data);
    fill_targets(k.eval_seq, k.targets + off, &k.eval);
    int64_t learned_train = 0;
    for (int64_t i = 0; i < k.data.n; i++) learned_train += learned(&k.seq[i]);
    /* records left out are always counted on stderr, --quiet or not: nothing is skipped silently */
    if (!o->run.quiet || rs.bad || rs.too_long) report_records("sft data", &rs, learned_train);
    if (o->neval && (!o->run.quiet || es.bad || es.too_long)) report_records("sft held-out data", &es, 0);

    if (o->dump_grad) { /* the whole file as one batch */
        const char *names[] = {"loss", "ce_loss", "aux_loss", "z_loss"};
        double vals[4];
        if (!(s = jm_tune_load_model(o, &ts, &m, err)) && !(s = jm_zero_grad(m, err)) &&
            !(s = jm_sft_set_grads(m, &k.data, ts.r->seq_len, vals, err)))
            s = jm_dump_grads(o->dump_grad, m, names, vals, 4, o, err);
        goto done;
    }

    if ((s = plan_epochs(&k, err))) goto done;
    k.rows_per_step = (int64_t)ts.r->batch_size * ts.r->grad_accum;
    jm_recipe_set_steps(ts.r, (k.rows + k.rows_per_step - 1) / k.rows_per_step);
    /* the run is these examples: a resume with other data is another run */
    for (int64_t i = 0; i < k.data.n; i++) {
        jm_recipe_hash_more(ts.r, k.seq[i].ids, sizeof(int32_t) * (size_t)k.seq[i].n);
        jm_recipe_hash_more(ts.r, k.seq[i].targets, sizeof(int32_t) * (size_t)k.seq[i].n);
    }
    if (!o->run.quiet)
        fprintf(stderr, "sft: %lld epochs of %lld packed rows of up to %d tokens, %lld steps of %d x %d rows\n",
                (long long)ts.r->epochs, (long long)(k.rows / ts.r->epochs), ts.r->seq_len,
                (long long)ts.r->schedule.total_steps, ts.r->batch_size, ts.r->grad_accum);
    if ((s = jm_tune_load_model(o, &ts, &m, err))) goto done;
    const char *inputs[64];
    int ni = jm_tune_inputs(o, inputs, 64);
    jm_task task = sft_task_of(&k, o->neval);
    s = jm_train_run(&o->run, ts.r, m, &task, ts.tok_dir, inputs, ni, stopped, err);
    m = NULL; /* the loop took it */
done:
    jm_model_free(m);
    sft_free(&k);
    jm_tune_setup_close(&ts);
    return s;
}
