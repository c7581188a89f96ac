/* parallel.c — one training step on the process grid (parallel.h).
 *
 * Data parallel, ZeRO-1. A step's micro-batches are dealt out in contiguous
 * blocks, replica i taking [n*i/dp, n*(i+1)/dp): each micro-batch is computed
 * exactly as one process computes it (its router losses see the same
 * tokens), so only the order of the final sums differs from a single process.
 * Gradients are reduce-scattered in buckets, each rank updates its shard of
 * the parameter arena with its shard of the AdamW state, and the replicas
 * all-gather the shards back. The global gradient norm is the sum of the
 * shards' squared norms.
 *
 * Pipeline parallel. Stage s holds layers [l0, l1) (balanced by cost; the
 * embedding on stage 0, final norm and lm_head on the last) and runs its
 * replica's micro-batches in the 1F1B order: P - s - 1 forwards to fill the
 * pipe, then one forward and one backward in turn, then the remaining
 * backwards. Each micro-batch in flight keeps its activations in its own
 * model handle (jm_model_share: same weights and gradients). Activations go
 * to the next stage and their gradients come back point to point; every rank
 * builds the micro-batch itself from the task (positions and targets are the
 * same everywhere), so no tokens travel. A tied embedding is one parameter:
 * stage 0 owns it, the last stage sends its lm_head gradient there before the
 * reduction and receives the updated weights after it.
 *
 * Every rank holds the whole parameter arena (only its stage's part is kept
 * current between syncs) and its gradients; the AdamW state is sharded. */
#include "train/parallel.h"

#include "model/model.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BUCKET_FLOATS ((int64_t)1 << 24) /* 64 MB per reduce-scatter: a few in flight, counts fit an int */
#define STAT_MAX (JM_TASK_MAX_ACC + 2)

struct jm_par {
    jm_comm *comm;
    jm_model *m;
    const jm_config *c;
    int pp, dp, stage, replica, l0, l1;
    int64_t numel;         /* parameter arena floats */
    int64_t *lo, *hi;      /* per world rank: its shard of the arena */
    int64_t stage_lo, stage_hi;
    int64_t embed_lo, embed_hi; /* the embedding's range (tied lm_head) */
    int tied_split;        /* tied embeddings on different first and last stages */
    float *param, *grad;   /* the arenas */
    float *gshard;         /* reduce-scatter's result, then copied into grad */
    float *tmp;            /* the tied gradient from the last stage */
    double *stats;         /* reduced per step: acc, load, squared norm, stop */
    int nstats;
    /* gradient buckets of this stage, in the order a backward completes them: the
     * head, the layers from the last down, the embedding */
    int nbuckets;
    int64_t *bucket_lo, *bucket_hi;
    int next_bucket;       /* buckets [0, next_bucket) of this step are being reduced */
    int last_micro;        /* the step's last micro-batch on this replica: its backward reduces */
    jm_status hook_status; /* a failure inside the backward's callback */
    jm_error hook_err;
    /* pipeline */
    jm_model **h;          /* pp handles on m: one per micro-batch in flight */
    double *h_scale;       /* the router scale of each handle's micro-batch */
    float *x_in, *dy;      /* received activations and gradients (B*T*H) */
    int64_t x_cap;
};


void jm_par_shard(const jm_par *p, int64_t *lo, int64_t *hi)
{
    const int r = jm_comm_rank(p->comm);
    *lo = p->lo[r];
    *hi = p->hi[r];
}

/* ---- expert load ---- */

static void expert_load(const int32_t *idx, int64_t n, int E, double *share)
{
    for (int e = 0; e < E; e++) share[e] = 0;
    for (int64_t i = 0; i < n; i++) share[idx[i]] += 1;
    for (int e = 0; e < E; e++) share[e] = n ? share[e] * E / (double)n : 0;
}

void jm_routers_load(const jm_model *m, int l0, int l1, double *load)
{
    const jm_config *c = jm_model_config(m);
    int64_t n = jm_routing_count(m);
    for (int blk = 0; blk < 2; blk++)
        for (int l = l0; l < l1; l++)
            expert_load(jm_routing(m, l, blk), n, c->num_experts,
                        load + ((size_t)blk * c->num_layers + l) * c->num_experts);
}

/* ---- the grid ---- */


jm_status jm_par_open(jm_comm *comm, jm_model *m, int seq_len, jm_par **out, jm_error *err)
{
    *out = NULL;
    jm_par *p = calloc(1, sizeof *p);
    if (!p) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    jm_status s = JM_OK;
    int *first = NULL;
    p->comm = comm;
    p->m = m;
    p->c = jm_model_config(m);
    p->pp = jm_comm_pp(p->comm), p->dp = jm_comm_dp(p->comm);
    p->stage = jm_comm_stage(p->comm), p->replica = jm_comm_replica(p->comm);
    const int L = p->c->num_layers, N = jm_comm_size(p->comm);
    if ((s = jm_zero_grad(m, err))) goto fail;
    int64_t n_grad;
    p->param = jm_param_arena_mut(m, &p->numel);
    p->grad = jm_grad_arena(m, &n_grad);
    p->embed_lo = jm_param_offset(m, 0), p->embed_hi = jm_param_offset(m, 1);
    if (p->dp > 1024) {
        s = jm_fail(err, JM_ERR_ARG, "%d data-parallel replicas: at most 1024", p->dp);
        goto fail;
    }
    if (p->pp > L) {
        s = jm_fail(err, JM_ERR_ARG, "--pp %d: the model has only %d layers (a stage needs at least one)", p->pp, L);
        goto fail;
    }
    first = malloc(sizeof(int) * (size_t)(p->pp + 1));
    p->lo = malloc(sizeof(int64_t) * (size_t)N);
    p->hi = malloc(sizeof(int64_t) * (size_t)N);
    if (!first || !p->lo || !p->hi) {
        s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    if ((s = jm_balance_stages(p->c, seq_len, p->pp, first, err))) goto fail;
    p->l0 = first[p->stage], p->l1 = first[p->stage + 1];
    /* each stage's range of the arena, cut into dp shards of whole 16-float blocks */
    for (int st = 0; st < p->pp; st++) {
        int64_t a, b;
        jm_stage_params(m, first[st], first[st + 1], &a, &b);
        if (st == p->stage) p->stage_lo = a, p->stage_hi = b;
        const int64_t blocks = (b - a) / 16;
        for (int i = 0; i < p->dp; i++) {
            int r = jm_comm_rank_of(p->comm, i, st);
            p->lo[r] = a + 16 * (blocks * i / p->dp);
            p->hi[r] = a + 16 * (blocks * (i + 1) / p->dp);
        }
    }
    p->tied_split = p->c->tie_word_embeddings && p->pp > 1;
    /* the buckets: head (final norm, lm_head), layers l1-1 .. l0, embedding; with a tied embedding on
     * another stage than the head, the embedding waits for the lm_head's gradient (reduce_grads) */
    p->bucket_lo = malloc(sizeof(int64_t) * (size_t)(L + 2));
    p->bucket_hi = malloc(sizeof(int64_t) * (size_t)(L + 2));
    if (!p->bucket_lo || !p->bucket_hi) {
        s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    /* the table (model.c): the embedding, per_layer tensors per layer, final norm, lm_head unless tied */
    const int per_layer = (jm_model_num_params(m) - 2 - !p->c->tie_word_embeddings) / L;
    const int64_t head_lo = jm_param_offset(m, 1 + per_layer * L);
    if (p->l1 == L) p->bucket_lo[p->nbuckets] = head_lo, p->bucket_hi[p->nbuckets++] = p->stage_hi;
    for (int l = p->l1 - 1; l >= p->l0; l--)
        p->bucket_lo[p->nbuckets] = jm_param_offset(m, 1 + per_layer * l),
        p->bucket_hi[p->nbuckets++] = jm_param_offset(m, 1 + per_layer * (l + 1));
    if (p->l0 == 0) p->bucket_lo[p->nbuckets] = p->embed_lo, p->bucket_hi[p->nbuckets++] = p->embed_hi;
    const int me = jm_comm_rank(p->comm);
    p->gshard = malloc(sizeof(float) * (size_t)(p->hi[me] - p->lo[me] + 1));
    p->tmp = p->tied_split && p->stage == 0 ? malloc(sizeof(float) * (size_t)(p->embed_hi - p->embed_lo)) : NULL;
    p->nstats = JM_TASK_MAX_ACC + 2 * L * p->c->num_experts + 4;
    p->stats = malloc(sizeof(double) * (size_t)p->nstats);
    if (!p->gshard || !p->stats || (p->tied_split && p->stage == 0 && !p->tmp)) {
        s = jm_fail(err, JM_ERR_NOMEM, "out of memory for a gradient shard of %.2f GB",
                    (p->hi[me] - p->lo[me]) * 4e-9);
        goto fail;
    }
    if (p->pp > 1) {
        p->h = calloc((size_t)p->pp, sizeof *p->h);
        p->h_scale = calloc((size_t)p->pp, sizeof *p->h_scale);
        if (!p->h || !p->h_scale) {
            s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
            goto fail;
        }
        for (int i = 0; i < p->pp && !s; i++) s = jm_model_share(m, &p->h[i], err);
        if (s) goto fail;
    }
    free(first);
    *out = p;
    return JM_OK;
fail:
    free(first);
    jm_par_close(p);
    return s;
}

void jm_par_close(jm_par *p)
{
    if (!p) return;
    for (int i = 0; p->h && i < p->pp; i++) jm_model_free(p->h[i]);
    free(p->h);
    free(p->h_scale);
    free(p->x_in);
    free(p->dy);
    free(p->lo);
    free(p->hi);
    free(p->gshard);
    free(p->tmp);
    free(p->stats);
    free(p->bucket_lo);
    free(p->bucket_hi);
    free(p);
}

/* ---- one step's gradients ---- */

/* Starts the reduce-scatter of bucket b over the replicas, in pieces an int
 * counts: rank i of the stage receives the sum over its shard's part. */
static jm_status start_bucket(jm_par *p, int b, jm_error *err)
{
    int counts[1024];
    const int me = jm_comm_rank(p->comm);
    for (int64_t x = p->bucket_lo[b]; x < p->bucket_hi[b]; x += BUCKET_FLOATS) {
        const int64_t y = x + BUCKET_FLOATS < p->bucket_hi[b] ? x + BUCKET_FLOATS : p->bucket_hi[b];
        for (int i = 0; i < p->dp; i++) {
            int r = jm_comm_rank_of(p->comm, i, p->stage);
            int64_t a = x > p->lo[r] ? x : p->lo[r], e = y < p->hi[r] ? y : p->hi[r];
            counts[i] = e > a ? (int)(e - a) : 0;
        }
        int64_t mine = x > p->lo[me] ? x - p->lo[me] : 0;
        float *recv = p->gshard + (mine < p->hi[me] - p->lo[me] ? mine : 0);
        jm_status s = jm_comm_reduce_scatter_start(p->comm, JM_GROUP_DP, p->grad + x, recv, counts, err);
        if (s) return s;
    }
    return JM_OK;
}

/* Called by the step's last backward as each part's gradients are complete:
 * its bucket is reduced while the backward goes on (parts come in bucket
 * order). A tied embedding on another stage than the head waits for the
 * lm_head's share (reduce_grads). */
static void grads_done(void *ctx, int part)
{
    jm_par *p = ctx;
    if (p->hook_status || (part == -1 && p->tied_split)) return;
    if (p->next_bucket < p->nbuckets) p->hook_status = start_bucket(p, p->next_bucket++, &p->hook_err);
    jm_comm_poll(p->comm);
}

/* The handle running the step's last backward reports its parts (data parallel only). */
static void watch_backward(jm_par *p, jm_model *h, int on)
{
    if (p->dp > 1) jm_model_on_grads_done(h, on ? grads_done : NULL, p);
}

/* Forward of micro-batch j on handle h over layers [l0, l1) (x_in: the
 * stream entering l0, NULL at 0); where the layers reach the loss, the
 * task's objective gives the backward's weights and the step's sums. */
static jm_status micro_forward(jm_task *task, jm_model *h, const jm_micro *mb, int j, int l0, int l1,
                               const float *x_in, double *acc, const float **weight, jm_error *err)
{
    jm_losses L;
    jm_status s = jm_forward_layers(h, &mb->batch, l0, l1, x_in, &L, err);
    if (s) return s;
    acc[JM_ACC_AUX] += L.aux_loss * mb->router_scale;
    acc[JM_ACC_Z] += L.z_loss * mb->router_scale;
    *weight = NULL;
    if (l1 < jm_model_config(h)->num_layers) return JM_OK;
    const int64_t N = (int64_t)mb->batch.B * mb->batch.T;
    if (!mb->batch.positions) acc[JM_ACC_TOKENS] += (double)N;
    for (int64_t t = 0; mb->batch.positions && t < N; t++) acc[JM_ACC_TOKENS] += mb->batch.positions[t] >= 0;
    return task->objective(task->ctx, j, jm_token_logprobs(h), &L, weight, acc, err);
}

/* Micro-batches [j0, j1) through the whole model m: forward, objective,
 * backward each; p (may be NULL: one process) starts reducing the last
 * one's gradients while its backward runs. */
static jm_status run_plain(jm_par *p, jm_task *task, jm_model *m, int j0, int j1, double *acc, jm_error *err)
{
    const int L = jm_model_config(m)->num_layers;
    for (int j = j0; j < j1; j++) {
        jm_micro mb;
        const float *weight;
        jm_status s = task->micro(task->ctx, j, &mb, err);
        if (!s) s = micro_forward(task, m, &mb, j, 0, L, NULL, acc, &weight, err);
        if (p) watch_backward(p, m, j == j1 - 1);
        if (!s) s = jm_backward_weighted(m, weight, mb.router_scale, err);
        if (p) watch_backward(p, m, 0);
        if (s) return s;
    }
    return JM_OK;
}

/* The step's report from its sums over every micro-batch (of every rank). */
static void step_report(jm_task *task, int64_t step, const double *acc, jm_task_step *st)
{
    memset(st, 0, sizeof *st);
    st->aux_loss = acc[JM_ACC_AUX];
    st->z_loss = acc[JM_ACC_Z];
    st->tokens = (int64_t)acc[JM_ACC_TOKENS];
    task->finish(task->ctx, step, acc, st);
}

jm_status jm_task_grads(jm_task *task, jm_model *m, int64_t step, jm_task_step *st, jm_error *err)
{
    double acc[JM_TASK_MAX_ACC] = {0};
    int n;
    jm_status s = task->plan(task->ctx, step, &n, err);
    if (!s) s = run_plain(NULL, task, m, 0, n, acc, err);
    if (!s) step_report(task, step, acc, st);
    return s;
}

static jm_status ensure_buffers(jm_par *p, int64_t n, jm_error *err)
{
    if (n <= p->x_cap) return JM_OK;
    free(p->x_in);
    free(p->dy);
    p->x_in = malloc(sizeof(float) * (size_t)n);
    p->dy = malloc(sizeof(float) * (size_t)n);
    p->x_cap = p->x_in && p->dy ? n : 0;
    return p->x_cap ? JM_OK : jm_fail(err, JM_ERR_NOMEM, "out of memory for pipeline buffers");
}

/* Pipeline messages: tag 2j carries micro-batch j's activations forward,
 * 2j + 1 their gradient back. A send and the receive that pairs with it on
 * the other side are started together and waited for together (as Megatron's
 * send_forward_recv_backward), so neighbouring stages never both block in a
 * send. */
static int64_t acts_of(const jm_par *p, const jm_micro *mb)
{
    return (int64_t)mb->batch.B * mb->batch.T * p->c->hidden_size;
}

/* Starts what the stage exchanges with its neighbours, then waits for it:
 * send_fwd (micro sf's output) / recv_bwd (micro rb's gradient) with the next
 * stage, send_bwd (micro sb's input gradient) / recv_fwd (micro rf, into
 * x_in) with the previous one; -1 = none. A stage builds one micro-batch at
 * a time, into mb, as it receives it. */
static jm_status exchange(jm_par *p, jm_micro *mb, int sf, int rb, int sb, int rf, jm_task *task, int64_t *rf_n,
                          jm_error *err)
{
    const int prev = p->stage > 0 ? jm_comm_rank_of(p->comm, p->replica, p->stage - 1) : -1;
    const int next = p->stage + 1 < p->pp ? jm_comm_rank_of(p->comm, p->replica, p->stage + 1) : -1;
    jm_status s = JM_OK;
    if (rf >= 0) { /* the micro-batch is built here: its size is the message's */
        if ((s = task->micro(task->ctx, rf, mb, err))) return s;
        *rf_n = acts_of(p, mb);
        if ((s = ensure_buffers(p, *rf_n, err))) return s;
    }
    if (next >= 0 && sf >= 0)
        s = jm_comm_send_start(p->comm, next, 2 * sf, jm_layers_output(p->h[sf % p->pp]),
                               (int64_t)jm_model_batch_tokens(p->h[sf % p->pp]) * p->c->hidden_size, err);
    if (!s && next >= 0 && rb >= 0)
        s = jm_comm_recv_start(p->comm, next, 2 * rb + 1, p->dy,
                               (int64_t)jm_model_batch_tokens(p->h[rb % p->pp]) * p->c->hidden_size, err);
    if (!s && prev >= 0 && sb >= 0)
        s = jm_comm_send_start(p->comm, prev, 2 * sb + 1, jm_layers_input_grad(p->h[sb % p->pp]),
                               (int64_t)jm_model_batch_tokens(p->h[sb % p->pp]) * p->c->hidden_size, err);
    if (!s && prev >= 0 && rf >= 0) s = jm_comm_recv_start(p->comm, prev, 2 * rf, p->x_in, *rf_n, err);
    return s ? s : jm_comm_wait(p->comm, "passing activations between pipeline stages", err);
}

static jm_status pipe_forward(jm_par *p, jm_task *task, const jm_micro *mb, int j, double *acc, jm_error *err)
{
    jm_model *h = p->h[j % p->pp];
    const float *weight;
    jm_status s = micro_forward(task, h, mb, j, p->l0, p->l1, p->stage > 0 ? p->x_in : NULL, acc, &weight, err);
    p->h_scale[j % p->pp] = mb->router_scale;
    if (!s && p->l1 == p->c->num_layers) {
        watch_backward(p, h, j == p->last_micro);
        s = jm_backward_layers(h, NULL, weight, mb->router_scale, err);
        watch_backward(p, h, 0);
    }
    return s;
}

static jm_status pipe_backward(jm_par *p, int i, jm_error *err)
{
    if (p->l1 == p->c->num_layers) return JM_OK; /* the last stage's ran with its forward */
    jm_model *h = p->h[i % p->pp];
    watch_backward(p, h, i == p->last_micro);
    jm_status s = jm_backward_layers(h, p->dy, NULL, p->h_scale[i % p->pp], err);
    watch_backward(p, h, 0);
    return s;
}

/* Micro-batches [j0, j1) through the pipeline in the 1F1B order. */
static jm_status run_pipeline(jm_par *p, jm_task *task, int j0, int j1, double *acc, const jm_model **last,
                              jm_error *err)
{
    const int M = j1 - j0, P = p->pp;
    const int warm = P - p->stage - 1 < M ? P - p->stage - 1 : M, steady = M - warm;
    jm_micro mb;
    int64_t n = 0;
    jm_status s = JM_OK;
    for (int i = 0; i < warm && !s; i++) { /* fill the pipe */
        const int j = j0 + i;
        if (!(s = exchange(p, &mb, -1, -1, -1, j, task, &n, err)) && !(s = pipe_forward(p, task, &mb, j, acc, err)))
            s = exchange(p, &mb, j, -1, -1, -1, task, &n, err);
    }
    if (steady > 0 && !s) s = exchange(p, &mb, -1, -1, -1, j0 + warm, task, &n, err);
    for (int i = 0; i < steady && !s; i++) { /* one forward, one backward */
        const int j = j0 + warm + i, bi = j0 + i;
        if (!(s = pipe_forward(p, task, &mb, j, acc, err)) && !(s = exchange(p, &mb, j, bi, -1, -1, task, &n, err)) &&
            !(s = pipe_backward(p, bi, err)))
            s = exchange(p, &mb, -1, -1, bi, i + 1 < steady ? j + 1 : -1, task, &n, err);
    }
    for (int i = steady; i < M && !s; i++) { /* drain it */
        const int bi = j0 + i;
        if (!(s = exchange(p, &mb, -1, bi, -1, -1, task, &n, err)) && !(s = pipe_backward(p, bi, err)))
            s = exchange(p, &mb, -1, -1, bi, -1, task, &n, err);
    }
    if (M > 0) *last = p->h[(j1 - 1) % P];
    return s;
}

/* ---- the update ---- */

static jm_status reduce_grads(jm_par *p, jm_error *err)
{
    jm_status s;
    const int me = jm_comm_rank(p->comm);
    if (p->tied_split) { /* the lm_head's gradient joins the embedding's on stage 0 */
        const int64_t n = p->embed_hi - p->embed_lo;
        if (p->stage == p->pp - 1) {
            int to = jm_comm_rank_of(p->comm, p->replica, 0);
            if ((s = jm_comm_send_start(p->comm, to, 1 << 30, p->grad + p->embed_lo, n, err)) ||
                (s = jm_comm_wait(p->comm, "sending the tied embedding's gradient to stage 0", err)))
                return s;
        } else if (p->stage == 0) {
            int from = jm_comm_rank_of(p->comm, p->replica, p->pp - 1);
            if ((s = jm_comm_recv_start(p->comm, from, 1 << 30, p->tmp, n, err)) ||
                (s = jm_comm_wait(p->comm, "receiving the tied embedding's gradient from the last stage", err)))
                return s;
            float *g = p->grad + p->embed_lo;
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < n; i++) g[i] += p->tmp[i];
        }
    }
    if (p->dp > 1) {
        if (p->hook_status) return jm_fail(err, p->hook_status, "%s", p->hook_err.msg);
        while (p->next_bucket < p->nbuckets)
            if ((s = start_bucket(p, p->next_bucket++, err))) return s;
        if ((s = jm_comm_wait(p->comm, "reducing gradients over the replicas", err))) return s;
        memcpy(p->grad + p->lo[me], p->gshard, sizeof(float) * (size_t)(p->hi[me] - p->lo[me]));
    }
    return JM_OK;
}

jm_status jm_par_step(jm_par *p, jm_task *task, jm_optimizer *opt, int64_t step, const jm_par_step_in *in,
                      double *load, jm_par_step_out *out, jm_error *err)
{
    const int me = jm_comm_rank(p->comm), L = p->c->num_layers, E = p->c->num_experts;
    const int64_t lo = p->lo[me], hi = p->hi[me];
    double *acc = p->stats, *ld = p->stats + JM_TASK_MAX_ACC;
    memset(p->stats, 0, sizeof(double) * (size_t)p->nstats);
    const int64_t bytes0 = jm_comm_bytes_sent(p->comm);
    const double wait0 = jm_comm_wait_seconds(p->comm);
    int n;
    jm_status s = task->plan(task->ctx, step, &n, err);
    if (s) return s;
    const int j0 = (int)((int64_t)n * p->replica / p->dp), j1 = (int)((int64_t)n * (p->replica + 1) / p->dp);
    p->last_micro = j1 - 1;
    p->next_bucket = 0;
    p->hook_status = JM_OK;
    const jm_model *last = p->m;
    s = p->pp > 1 ? run_pipeline(p, task, j0, j1, acc, &last, err) : run_plain(p, task, p->m, j0, j1, acc, err);
    if (s) return s;
    /* the load of the step's last micro-batch, from the replica that ran it */
    if (in->want_load && j1 > j0 && j1 == n) jm_routers_load(last, p->l0, p->l1, ld);
    if ((s = reduce_grads(p, err))) return s;

    double *sumsq = ld + 2 * (size_t)L * E, *stop = sumsq + 1, *bytes = stop + 1, *waited = bytes + 1;
    *sumsq = jm_grad_sumsq(p->m, lo, hi);
    *stop = in->stop_local;
    *bytes = (double)(jm_comm_bytes_sent(p->comm) - bytes0); /* of the step's gradients and activations */
    *waited = jm_comm_wait_seconds(p->comm) - wait0;
    if ((s = jm_comm_allreduce_sum(p->comm, JM_GROUP_WORLD, p->stats, p->nstats, "summing the step's losses", err)))
        return s;
    step_report(task, step, acc, &out->st);
    if (in->want_load) memcpy(load, ld, sizeof(double) * 2 * (size_t)L * E);
    out->stop = *stop > 0;
    out->grad_norm = sqrt(*sumsq);
    out->comm_bytes = *bytes;
    out->comm_wait = *waited / jm_comm_size(p->comm);

    if (in->grad_clip > 0 && out->grad_norm > in->grad_clip) { /* as torch's clip_grad_norm_ */
        const float scale = (float)(in->grad_clip / (out->grad_norm + 1e-6));
        float *g = p->grad;
#pragma omp parallel for schedule(static)
        for (int64_t i = lo; i < hi; i++) g[i] *= scale;
    }
    if ((s = jm_optimizer_step(opt, p->m, in->lr, err))) return s;
    if (p->dp > 1) {
        int64_t counts[1024], displs[1024];
        for (int i = 0; i < p->dp; i++) {
            int r = jm_comm_rank_of(p->comm, i, p->stage);
            counts[i] = p->hi[r] - p->lo[r], displs[i] = p->lo[r];
        }
        if ((s = jm_comm_allgather(p->comm, JM_GROUP_DP, p->param, counts, displs, "gathering the updated "
                                   "parameters", err)))
            return s;
    }
    if (p->tied_split) { /* the updated embedding to the last stage's lm_head */
        const int64_t ne = p->embed_hi - p->embed_lo;
        if (p->stage == 0) {
            s = jm_comm_send_start(p->comm, jm_comm_rank_of(p->comm, p->replica, p->pp - 1), (1 << 30) + 1,
                                   p->param + p->embed_lo, ne, err);
        } else if (p->stage == p->pp - 1) {
            s = jm_comm_recv_start(p->comm, jm_comm_rank_of(p->comm, p->replica, 0), (1 << 30) + 1,
                                   p->param + p->embed_lo, ne, err);
        }
        if (!s) s = jm_comm_wait(p->comm, "passing the tied embedding to the last stage", err);
        if (s) return s;
    }
    return jm_zero_grad(p->m, err);
}

jm_status jm_par_sync_params(jm_par *p, jm_error *err)
{
    const int N = jm_comm_size(p->comm);
    if (N == 1) return JM_OK;
    int64_t *counts = malloc(sizeof(int64_t) * (size_t)N);
    if (!counts) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    for (int r = 0; r < N; r++) counts[r] = p->hi[r] - p->lo[r];
    jm_status s = jm_comm_allgather(p->comm, JM_GROUP_WORLD, p->param, counts, p->lo, "gathering every parameter",
                                    err);
    free(counts);
    return s;
}

/* Between the arena (16-float aligned parameters) and checkpoint order (packed). */
static void copy_packed(const jm_model *m, int64_t lo, int64_t hi, const float *src, float *dst, int to_packed)
{
    int64_t off = 0; /* the parameter's start in checkpoint order */
    for (int i = 0; i < jm_model_num_params(m); i++) {
        const int64_t a = jm_param_offset(m, i), n = jm_model_param(m, i)->numel;
        const int64_t x = a > lo ? a : lo, y = a + n < hi ? a + n : hi;
        if (y > x) {
            const int64_t in_arena = x - lo, in_packed = off + (x - a);
            memcpy(dst + (to_packed ? in_packed : in_arena), src + (to_packed ? in_arena : in_packed),
                   sizeof(float) * (size_t)(y - x));
        }
        off += n;
    }
}

jm_status jm_par_gather_adamw(jm_par *p, jm_optimizer *opt, float *m, float *v, jm_error *err)
{
    int64_t *stepp, lo, hi;
    float *om, *ov;
    jm_optimizer_shard(opt, &stepp, &om, &ov, &lo, &hi);
    const int N = jm_comm_size(p->comm), me = jm_comm_rank(p->comm);
    if (N == 1) {
        copy_packed(p->m, lo, hi, om, m, 1);
        copy_packed(p->m, lo, hi, ov, v, 1);
        return JM_OK;
    }
    int64_t *counts = malloc(sizeof(int64_t) * (size_t)N);
    float *all = me == 0 ? malloc(sizeof(float) * (size_t)p->numel) : NULL;
    jm_status s = !counts || (me == 0 && !all) ? jm_fail(err, JM_ERR_NOMEM, "out of memory gathering the optimizer "
                                                        "state (%.2f GB on rank 0)", p->numel * 4e-9)
                                               : JM_OK;
    for (int r = 0; r < N && !s; r++) counts[r] = p->hi[r] - p->lo[r];
    for (int pass = 0; pass < 2 && !s; pass++) {
        s = jm_comm_gather0(p->comm, pass ? ov : om, all, counts, p->lo, "gathering the optimizer state", err);
        if (!s && me == 0) copy_packed(p->m, 0, p->numel, all, pass ? v : m, 1);
    }
    free(counts);
    free(all);
    return s;
}

void jm_par_scatter_adamw(jm_par *p, jm_optimizer *opt, const float *m, const float *v)
{
    int64_t *stepp, lo, hi;
    float *om, *ov;
    jm_optimizer_shard(opt, &stepp, &om, &ov, &lo, &hi);
    copy_packed(p->m, lo, hi, m, om, 0);
    copy_packed(p->m, lo, hi, v, ov, 0);
}
