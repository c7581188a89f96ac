/* parallel.h — how one training step runs on the process grid (parallel.c):
 * the task's micro-batches dealt out to data-parallel replicas and streamed
 * through pipeline stages (1F1B), gradients reduce-scattered, AdamW on each
 * rank's shard (ZeRO-1), parameters gathered back. One process is the grid
 * of one rank: the same code, with no messages. */
#ifndef JM_PARALLEL_H
#define JM_PARALLEL_H

#include "train/comm.h"
#include "train/train.h"

typedef struct jm_par jm_par;

/* Training m (its full parameter arena on every rank) on the grid c, with
 * sequences of up to seq_len tokens (the stages are balanced for them). */
jm_status jm_par_open(jm_comm *c, jm_model *m, int seq_len, jm_par **out, jm_error *err);
void jm_par_close(jm_par *p);
/* This rank's shard of the parameter arena (its optimizer's range). */
void jm_par_shard(const jm_par *p, int64_t *lo, int64_t *hi);

typedef struct {
    double lr, grad_clip;
    int want_load;  /* fill load: each router's expert load of the step's last micro-batch */
    int stop_local; /* this rank was asked to stop (SIGINT/SIGTERM) */
} jm_par_step_in;

typedef struct {
    jm_task_step st;
    double grad_norm;    /* before clipping */
    int stop;            /* some rank was asked to stop: all stop after this step */
    double comm_bytes;   /* sent by all ranks during the step */
    double comm_wait;    /* seconds a rank waited for others during the step, the mean over ranks */
} jm_par_step_out;

/* One optimizer step of the task; load (2*L*E) when want_load. */
jm_status jm_par_step(jm_par *p, jm_task *task, jm_optimizer *opt, int64_t step, const jm_par_step_in *in,
                      double *load, jm_par_step_out *out, jm_error *err);

/* Every parameter on every rank (before an evaluation or a checkpoint). */
jm_status jm_par_sync_params(jm_par *p, jm_error *err);

/* The optimizer state in checkpoint order (parameter table order, no
 * padding: numel floats each): gathered onto rank 0 (m, v: rank 0 only),
 * or each rank's shard taken from the full arrays. */
jm_status jm_par_gather_adamw(jm_par *p, jm_optimizer *opt, float *m, float *v, jm_error *err);
void jm_par_scatter_adamw(jm_par *p, jm_optimizer *opt, const float *m, const float *v);

/* Every router's expert load in layers [l0, l1) of m's last forward, as a
 * share of the fair share (2*L*E: MoA layers first; other layers untouched). */
void jm_routers_load(const jm_model *m, int l0, int l1, double *load);

#endif
