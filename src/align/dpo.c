/* dpo.c — `jetmoe dpo`: Direct Preference Optimization, a task of the training loop.
 *
 * Per pair, with log pi summed over the completion tokens only,
 *   D = beta [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]
 *   loss = -(1 - eps) log sigmoid(D) - eps log sigmoid(-D)      (eps: label smoothing)
 * averaged over the pairs of the optimizer step, plus the router losses of
 * the policy over every token of both sequences. The reference's log-probs
 * are computed once, before training, with the reference loaded as the
 * policy is (fp32: the same function, so that a reference that is the
 * policy's checkpoint gives D = 0 at the first step, where a BF16 checkpoint
 * used in place would round its activations), freed, and cached in the run
 * directory (ref_logps.safetensors): training then holds one model. A pair's chosen
 * and rejected sequences are packed together (pack.c); batch_size pairs
 * make a micro-batch. */
#include "align/align.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    const jm_recipe *r;
    jm_pref_set data, eval;
    jm_seq_ref *seq, *eval_seq;   /* 2 per pair: chosen, rejected */
    int32_t *targets;             /* storage: ids[t+1] on the completion, -1 elsewhere */
    double *ref, *eval_ref;       /* 2 per pair: the reference's log-probs */
    int64_t *plan;                /* epochs * pairs: each epoch's shuffle */
    int64_t pairs_per_step, total_pairs;
    jm_packed pk;
    jm_seq_ref *scratch;
    int64_t p0, p1, micro_first;  /* the planned step: pairs plan[p0 .. p1); the packed micro-batch's first */
    int nmicro;
} dpo_task;

static void fill_side(jm_seq_ref *q, int32_t *tg, const jm_pref_seq *s)
{
    for (int t = 0; t < s->n; t++) tg[t] = t + 1 < s->n && t + 1 >= s->n_prompt ? s->ids[t + 1] : -1;
    *q = (jm_seq_ref){s->ids, tg, s->n};
}

static int64_t fill_targets(jm_seq_ref *seq, int32_t *tg, const jm_pref_set *s)
{
    int64_t off = 0;
    for (int64_t i = 0; i < s->n; i++) {
        fill_side(&seq[2 * i], tg + off, &s->ex[i].chosen);
        off += s->ex[i].chosen.n;
        fill_side(&seq[2 * i + 1], tg + off, &s->ex[i].rejected);
        off += s->ex[i].rejected.n;
    }
    return off;
}

/* After a forward of k->pk: each packed sequence's summed completion log-prob. */
static void sequence_logps(const jm_packed *pk, const jm_seq_ref *seq, const float *lp, double *out)
{
    for (int i = 0; i < pk->n; i++) {
        double sum = 0;
        for (int t = 0; t < seq[i].n; t++)
            if (seq[i].targets[t] >= 0) sum += lp[pk->start[i] + t];
        out[i] = sum;
    }
}

/* Summed completion log-probs of the 2n sequences under m, batch_size pairs at a time. */
static jm_status score(jm_model *m, const jm_seq_ref *seq, int64_t n, int bs, int max_len, jm_packed *pk,
                       double *out, jm_error *err)
{
    for (int64_t i = 0; i < n; i += bs) {
        int k = (int)(n - i < bs ? n - i : bs);
        jm_status s = jm_pack(pk, seq + 2 * i, 2 * k, max_len, err);
        if (!s) s = jm_forward_batch(m, &pk->batch, NULL, err);
        if (s) return s;
        sequence_logps(pk, seq + 2 * i, jm_token_logprobs(m), out + 2 * i);
    }
    return JM_OK;
}

typedef struct {
    double loss, chosen, rejected, acc, margin, logp_c, logp_r, logp_acc;
} dpo_sums;

/* The pair's loss and d loss / d D; sums receives TRL's metrics. */
static double pair_loss(double beta, double eps, double pc, double pr, double rc, double rr, dpo_sums *m,
                        double *dD)
{
    double rwc = beta * (pc - rc), rwr = beta * (pr - rr), D = rwc - rwr;
    /* log sigmoid(x) = -log1p(exp(-x)), stable on both sides */
    double ls_pos = D >= 0 ? -log1p(exp(-D)) : D - log1p(exp(D));
    double ls_neg = ls_pos - D; /* log sigmoid(-D) */
    double sig_pos = exp(ls_pos), sig_neg = exp(ls_neg);
    *dD = -(1 - eps) * sig_neg + eps * sig_pos;
    double loss = -(1 - eps) * ls_pos - eps * ls_neg;
    m->loss += loss;
    m->chosen += rwc;
    m->rejected += rwr;
    m->margin += rwc - rwr;
    m->acc += rwc > rwr;
    m->logp_c += pc;
    m->logp_r += pr;
    m->logp_acc += pc > pr;
    return loss;
}

static void put_metrics(jm_task_step *st, const dpo_sums *m, double n, const char *const *names)
{
    const double v[] = {m->chosen / n, m->rejected / n, m->margin / n, m->acc / n, m->logp_c / n, m->logp_r / n,
                        m->logp_acc / n};
    for (int i = 0; i < 7; i++) {
        st->metric_name[st->nmetrics] = names[i];
        st->metric[st->nmetrics++] = v[i];
    }
}

static const char *const train_names[] = {"rewards/chosen", "rewards/rejected", "rewards/margins",
                                          "rewards/accuracies", "logps/chosen", "logps/rejected", "logps/accuracies"};
static const char *const heldout_names[] = {
    "heldout_rewards/chosen",     "heldout_rewards/rejected", "heldout_rewards/margins",
    "heldout_rewards/accuracies", "heldout_logps/chosen",     "heldout_logps/rejected",
    "heldout_logps/accuracies"};

/* The sums a step keeps: dpo_sums' fields, in order, from JM_ACC_LOOP on. */
#define DPO_NSUMS 8

/* A step is plan entries [p0, p1) (pair indices), batch_size pairs per
 * micro-batch; every pair weighs 1 / (p1 - p0). */
static jm_status dpo_plan_step(void *ctx, int64_t step, int *nmicro, jm_error *err)
{
    (void)err;
    dpo_task *k = ctx;
    const int bs = k->r->batch_size;
    k->p0 = step * k->pairs_per_step;
    k->p1 = k->p0 + k->pairs_per_step < k->total_pairs ? k->p0 + k->pairs_per_step : k->total_pairs;
    *nmicro = k->nmicro = (int)((k->p1 - k->p0 + bs - 1) / bs);
    return JM_OK;
}

/* A micro-batch packs each pair's chosen and rejected sequences together. */
static jm_status dpo_micro(void *ctx, int j, jm_micro *mb, jm_error *err)
{
    dpo_task *k = ctx;
    const int bs = k->r->batch_size;
    int64_t a = k->p0 + (int64_t)j * bs, b = a + bs < k->p1 ? a + bs : k->p1;
    int n = 0;
    for (int64_t i = a; i < b; i++) {
        k->scratch[n++] = k->seq[2 * k->plan[i]];
        k->scratch[n++] = k->seq[2 * k->plan[i] + 1];
    }
    k->micro_first = a;
    jm_status s = jm_pack(&k->pk, k->scratch, n, k->r->seq_len, err);
    mb->batch = k->pk.batch;
    mb->router_scale = 1.0 / k->nmicro;
    return s;
}

static jm_status dpo_objective(void *ctx, int j, const float *logp, const jm_losses *L, const float **weight,
                               double *acc, jm_error *err)
{
    (void)j, (void)L;
    dpo_task *k = ctx;
    const double beta = k->r->beta, eps = k->r->label_smoothing, P = (double)(k->p1 - k->p0);
    const int n = k->pk.n;
    double lp[2 * 256], *lps = n <= 2 * 256 ? lp : malloc(sizeof *lps * (size_t)n);
    if (!lps) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    sequence_logps(&k->pk, k->scratch, logp, lps);
    dpo_sums sums = {0};
    /* d loss / d log pi(c) = beta dD / P, d loss / d log pi(r) = -beta dD / P; the backward's
     * weight is minus that on each completion token (it differentiates -w log p) */
    for (int q = 0; q < n / 2; q++) {
        int64_t pair = k->plan[k->micro_first + q];
        double dD;
        pair_loss(beta, eps, lps[2 * q], lps[2 * q + 1], k->ref[2 * pair], k->ref[2 * pair + 1], &sums, &dD);
        for (int side = 0; side < 2; side++) {
            const jm_seq_ref *sq = &k->scratch[2 * q + side];
            float w = (float)(-(side ? -beta : beta) * dD / P);
            for (int t = 0; t < sq->n; t++)
                if (sq->targets[t] >= 0) k->pk.weight[k->pk.start[2 * q + side] + t] = w;
        }
    }
    if (lps != lp) free(lps);
    const double *v = &sums.loss;
    for (int i = 0; i < DPO_NSUMS; i++) acc[JM_ACC_LOOP + i] += v[i];
    *weight = k->pk.weight;
    return JM_OK;
}

static void dpo_sums_of(const double *acc, dpo_sums *sums)
{
    double *v = &sums->loss;
    for (int i = 0; i < DPO_NSUMS; i++) v[i] = acc[JM_ACC_LOOP + i];
}

static void dpo_finish(void *ctx, int64_t step, const double *acc, jm_task_step *st)
{
    (void)step;
    dpo_task *k = ctx;
    dpo_sums sums;
    dpo_sums_of(acc, &sums);
    const double P = (double)(k->p1 - k->p0);
    st->loss = sums.loss / P;
    put_metrics(st, &sums, P, train_names);
    st->metric_name[st->nmetrics] = "epoch";
    st->metric[st->nmetrics++] = k->data.n ? (double)k->p1 / (double)k->data.n : 0;
}

static int dpo_state(void *ctx, st_out *out, int cap, jm_error *err)
{
    return jm_tune_count_state(out, cap, "dpo.pairs", &((dpo_task *)ctx)->data.n, err);
}

static jm_status dpo_restore(void *ctx, const st_file *f, int64_t step, jm_error *err)
{
    (void)step;
    return jm_tune_count_restore(f, "dpo.pairs", "pairs", ((dpo_task *)ctx)->data.n, err);
}

/* Held-out pairs: the DPO loss and TRL's metrics, no gradient. */
static jm_status dpo_heldout(void *ctx, jm_model *m, int final, jm_task_step *st, jm_error *err)
{
    (void)final;
    dpo_task *k = ctx;
    const int64_t n = k->eval.n;
    double *lp = malloc(sizeof *lp * (size_t)(2 * n));
    if (!lp) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    jm_status s = score(m, k->eval_seq, n, k->r->batch_size, k->r->seq_len, &k->pk, lp, err);
    if (!s) {
        dpo_sums sums = {0};
        double dD;
        for (int64_t i = 0; i < n; i++)
            pair_loss(k->r->beta, k->r->label_smoothing, lp[2 * i], lp[2 * i + 1], k->eval_ref[2 * i],
                      k->eval_ref[2 * i + 1], &sums, &dD);
        st->loss = sums.loss / (double)n;
        st->metric_name[0] = "heldout_loss";
        st->metric[0] = st->loss;
        st->nmetrics = 1;
        put_metrics(st, &sums, (double)n, heldout_names);
    }
    free(lp);
    return s;
}

/* The reference's log-probs of both sets: read from the run's cache when it
 * holds them for this data, else computed with the reference loaded (fp32,
 * as the policy; no more memory than the policy takes) and, for a run, cached. */
static jm_status reference_logps(dpo_task *k, const jm_tune_opts *o, const jm_recipe *r, jm_error *err)
{
    const int64_t n = 2 * (k->data.n + k->eval.n);
    double *all = malloc(sizeof *all * (size_t)n);
    if (!all) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    k->ref = all;
    k->eval_ref = all + 2 * k->data.n;
    char cache[4200] = "";
    if (o->run.out_dir && !o->dump_grad) snprintf(cache, sizeof cache, "%s/ref_logps.safetensors", o->run.out_dir);
    uint64_t hash = r->hash;
    if (cache[0] && o->run.resume && access(cache, F_OK) == 0) {
        st_file f;
        jm_status s = st_open(cache, &f, err);
        if (s) return s;
        uint64_t h;
        s = jm_state_tensor(&f, "data_hash", ST_U64, 1, &h, err);
        if (!s && h != hash) s = jm_fail(err, JM_ERR_ARG, "%s: made for other data or another reference", cache);
        if (!s) s = jm_state_tensor(&f, "logps", ST_F64, n, all, err);
        st_close(&f);
        return s;
    }
    const char *ref = o->ref ? o->ref : o->model;
    if (!ref) return jm_fail(err, JM_ERR_ARG, "%s: no reference log-probs cached: give --ref or --model", cache);
    double t0 = omp_get_wtime();
    jm_model *m;
    jm_status s = jm_model_load(ref, &m, err);
    if (s) return s;
    s = score(m, k->seq, k->data.n, r->batch_size, r->seq_len, &k->pk, k->ref, err);
    if (!s) s = score(m, k->eval_seq, k->eval.n, r->batch_size, r->seq_len, &k->pk, k->eval_ref, err);
    jm_model_free(m);
    if (s) return s;
    if (!o->run.quiet)
        fprintf(stderr, "dpo: reference log-probs of %lld sequences from %s in %.1f s\n", (long long)n, ref,
                omp_get_wtime() - t0);
    if (!cache[0] || jm_launch_rank() != 0) return JM_OK; /* every rank scores; rank 0 keeps them */
    if ((s = jm_mkdir_p(o->run.out_dir, err))) return s;
    st_out t[] = {{"data_hash", ST_U64, 1, {1}, &hash}, {"logps", ST_F64, 1, {n}, all}};
    return st_write(cache, t, 2, NULL, NULL, 0, err);
}

static void dpo_free(dpo_task *k)
{
    jm_pref_free(&k->data);
    jm_pref_free(&k->eval);
    free(k->seq); /* eval_seq is its tail */
    free(k->targets);
    free(k->ref);
    free(k->plan);
    free(k->scratch);
    jm_packed_free(&k->pk);
}

static jm_task dpo_task_of(dpo_task *k, int64_t neval)
{
    return (jm_task){.ctx = k,
                     .plan = dpo_plan_step,
                     .micro = dpo_micro,
                     .objective = dpo_objective,
                     .finish = dpo_finish,
                     .state = dpo_state,
                     .restore = dpo_restore,
                     .heldout = neval ? dpo_heldout : NULL,
                     .eval_at_start = neval > 0};
}

/* Every pair of the set as one optimizer step of one micro-batch (both
 * sequences of each pair packed into rows of max_len): what --dump-grad
 * writes and bench/align times. */
jm_status jm_dpo_set_grads(jm_model *m, const jm_pref_set *data, const double *ref, int max_len, double beta,
                           double eps, double loss[4], jm_error *err)
{
    const int64_t n = data->n;
    int64_t tokens = 0;
    for (int64_t i = 0; i < n; i++) tokens += data->ex[i].chosen.n + data->ex[i].rejected.n;
    jm_recipe *one = calloc(1, sizeof *one);
    dpo_task k = {.r = one};
    k.seq = malloc(sizeof *k.seq * (size_t)(2 * n + 1));
    k.targets = malloc(sizeof *k.targets * (size_t)(tokens + 1));
    k.scratch = malloc(sizeof *k.scratch * (size_t)(2 * n + 1));
    k.ref = malloc(sizeof *k.ref * (size_t)(2 * n + 1));
    k.plan = malloc(sizeof *k.plan * (size_t)(n + 1));
    jm_status s = JM_OK;
    if (!one || !k.seq || !k.targets || !k.scratch || !k.ref || !k.plan) {
        s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
    } else {
        fill_targets(k.seq, k.targets, data);
        memcpy(k.ref, ref, sizeof *k.ref * (size_t)(2 * n));
        for (int64_t i = 0; i < n; i++) k.plan[i] = i;
        /* all the task reads of the recipe */
        one->batch_size = (int)n, one->seq_len = max_len, one->beta = beta, one->label_smoothing = eps;
        k.pairs_per_step = k.total_pairs = n;
        jm_task_step st = {0};
        jm_task task = dpo_task_of(&k, 0);
        const jm_config *c = jm_model_config(m);
        if (!(s = jm_task_grads(&task, m, 0, &st, err))) {
            loss[0] = st.loss + c->aux_loss_coef * st.aux_loss + c->z_loss_coef * st.z_loss;
            loss[1] = st.loss, loss[2] = st.aux_loss, loss[3] = st.z_loss;
        }
    }
    dpo_free(&k);
    free(one);
    return s;
}

jm_status jm_dpo(const jm_tune_opts *o, int *stopped, jm_error *err)
{
    *stopped = 0;
    jm_tune_setup ts;
    jm_status s = jm_tune_setup_open(o, JM_TASK_DPO, &ts, err);
    if (s) return s;
    dpo_task k = {.r = ts.r};
    jm_model *m = NULL;
    jm_records_stats rs, es = {0};
    if ((s = jm_pref_load(o->data, o->ndata, ts.tok, &ts.ropts, &k.data, &rs, err))) goto done;
    if (o->neval && (s = jm_pref_load(o->eval_data, o->neval, ts.tok, &ts.ropts, &k.eval, &es, err))) goto done;
    if (k.data.n == 0) {
        s = jm_fail(err, JM_ERR_ARG, "%s: no pair to train on", o->data[0]);
        goto done;
    }
    /* records left out are always counted on stderr, --quiet or not: nothing is skipped silently */
    for (int set = 0; set < 2; set++) {
        const jm_records_stats *st = set ? &es : &rs;
        if ((set && !o->neval) || (o->run.quiet && !st->bad && !st->too_long)) continue;
        fprintf(stderr, "dpo %s: %lld pairs from %lld lines, %lld tokens (%lld in completions); %lld truncated, "
                        "%lld dropped as too long, %lld bad lines skipped\n", set ? "held-out data" : "data",
                (long long)st->used, (long long)st->lines, (long long)st->tokens, (long long)st->loss_tokens,
                (long long)st->truncated, (long long)st->too_long, (long long)st->bad);
    }
    const int64_t ns = 2 * (k.data.n + k.eval.n);
    k.seq = malloc(sizeof *k.seq * (size_t)ns);
    k.eval_seq = k.seq + 2 * k.data.n;
    k.targets = malloc(sizeof *k.targets * (size_t)(rs.tokens + es.tokens + 1));
    /* a micro-batch is batch_size pairs of the plan, which runs on into the next epoch: more pairs than
     * the data has when batch_size is larger (--dump-grad takes them all at once) */
    const int64_t most = k.data.n * ts.r->epochs < ts.r->batch_size ? k.data.n * ts.r->epochs : ts.r->batch_size;
    k.scratch = malloc(sizeof *k.scratch * (size_t)(2 * (most > k.data.n ? most : k.data.n)));
    if (!k.seq || !k.targets || !k.scratch) {
        s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
        goto done;
    }
    int64_t off = fill_targets(k.seq, k.targets, &k.data);
    fill_targets(k.eval_seq, k.targets + off, &k.eval);
    for (int64_t i = 0; i < ns; i++) { /* the run is this data (and its reference's log-probs) */
        jm_recipe_hash_more(ts.r, k.seq[i].ids, sizeof(int32_t) * (size_t)k.seq[i].n);
        jm_recipe_hash_more(ts.r, k.seq[i].targets, sizeof(int32_t) * (size_t)k.seq[i].n);
    }
    if (o->run.out_dir && !o->dump_grad && !o->run.resume && jm_launch_rank() == 0) {
        /* refused before the reference is run (by rank 0, which owns the run directory) */
        const char *inputs[64];
        int ni = jm_tune_inputs(o, inputs, 64);
        static const char *const names[] = {"metrics.jsonl", "loss.svg", "checkpoints", "ref_logps.safetensors"};
        jm_output_set set = {"a training run", names, 4, jm_run_entry_proof};
        if ((s = jm_output_entries_check(o->run.out_dir, &set, inputs, ni, o->run.overwrite, err))) goto done;
    }
    if ((s = reference_logps(&k, o, ts.r, err))) goto done;

    if (o->dump_grad) { /* every pair as one batch */
        const char *names[] = {"loss", "dpo_loss", "aux_loss", "z_loss"};
        double vals[4];
        if (!(s = jm_tune_load_model(o, &ts, &m, err)) && !(s = jm_zero_grad(m, err)) &&
            !(s = jm_dpo_set_grads(m, &k.data, k.ref, ts.r->seq_len, ts.r->beta, ts.r->label_smoothing, vals, err)))
            s = jm_dump_grads(o->dump_grad, m, names, vals, 4, o, err);
        goto done;
    }

    const int64_t E = ts.r->epochs, P = k.data.n;
    k.plan = malloc(sizeof *k.plan * (size_t)(P * E));
    if (!k.plan) {
        s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (int64_t e = 0; e < E; e++) jm_shuffle(k.plan + e * P, P, ts.r->seed, e);
    k.total_pairs = P * E;
    k.pairs_per_step = (int64_t)ts.r->batch_size * ts.r->grad_accum;
    jm_recipe_set_steps(ts.r, (k.total_pairs + k.pairs_per_step - 1) / k.pairs_per_step);
    if (!o->run.quiet)
        fprintf(stderr, "dpo: beta %g, label smoothing %g, %lld epochs of %lld pairs, %lld steps of %d x %d pairs\n",
                ts.r->beta, ts.r->label_smoothing, (long long)E, (long long)P, (long long)ts.r->schedule.total_steps,
                ts.r->batch_size, ts.r->grad_accum);
    if ((s = jm_tune_load_model(o, &ts, &m, err))) goto done;
    const char *inputs[64];
    int ni = jm_tune_inputs(o, inputs, 64);
    jm_task task = dpo_task_of(&k, o->neval);
    s = jm_train_run(&o->run, ts.r, m, &task, ts.tok_dir, inputs, ni, stopped, err);
    m = NULL;
done:
    jm_model_free(m);
    dpo_free(&k);
    jm_tune_setup_close(&ts);
    return s;
}
