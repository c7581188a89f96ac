/* train.h — the training loop (train.c) as the rooms above use it: one loop
 * for pretraining, SFT and DPO. A task says what a step trains on and what
 * its loss is; the loop owns everything else - the optimizer and schedule,
 * gradient clipping, metrics.jsonl, loss.svg, progress, atomic checkpoints
 * with the tokenizer and the task's state, SIGINT save and bit-exact resume. */
#ifndef JM_TRAIN_H
#define JM_TRAIN_H

#include "base/safetensors.h"
#include "train/data.h"

#define JM_MAX_SOURCES 64
#define JM_MAX_PHASES 16

typedef enum { JM_TASK_PRETRAIN, JM_TASK_SFT, JM_TASK_DPO } jm_task_kind;
const char *jm_task_name(jm_task_kind k); /* "pretrain", "sft", "dpo" */

typedef struct {
    char name[64];
    int64_t steps;
    double weights[JM_MAX_SOURCES];
} jm_phase;

/* A recipe as parsed (README: Training, Fine-tuning). Pretraining fills the
 * model, sources and phases; SFT and DPO have one phase, named after the
 * task, whose steps the task sets from its data (jm_recipe_set_steps). */
struct jm_recipe {
    jm_task_kind kind;
    jm_config model;
    char tokenizer[4096];
    int nsources;
    char source_name[JM_MAX_SOURCES][64];
    char source_dir[JM_MAX_SOURCES][4096];
    char heldout[4096];
    int nphases;
    jm_phase phases[JM_MAX_PHASES];
    int seq_len, batch_size, grad_accum; /* SFT/DPO: seq_len is max_len; batch_size rows (SFT) or pairs (DPO) */
    jm_adamw_config adamw;
    jm_schedule schedule;
    double warmup_ratio; /* < 0: warmup_steps as given; else that share of the total steps */
    uint64_t seed;
    int64_t checkpoint_every, log_every, eval_tokens;
    int64_t eval_every; /* held-out loss every this many steps (0: only at the end) */
    /* fine-tuning */
    int64_t epochs;
    int truncate;                 /* too-long records: 1 cut, 0 dropped */
    int has_aux_coef, has_z_coef; /* set in the recipe; else the checkpoint's config values */
    double beta, label_smoothing; /* DPO */
    char *text;    /* the recipe as written, saved into the run directory */
    uint64_t hash; /* of the text (and what the task adds): a resume with another recipe is refused */
    jm_sampler *sampler; /* pretraining's sources, opened and checked by jm_recipe_load; the trainer takes it */
};

/* A tensor of a trainer state file, of the expected dtype and count, copied to out. */
jm_status jm_state_tensor(const st_file *f, const char *name, st_dtype dt, int64_t numel, void *out, jm_error *err);

/* A fine-tuning recipe (path NULL: every default), checked whole. */
jm_status jm_recipe_load_kind(const char *path, jm_task_kind kind, jm_recipe **out, jm_error *err);
/* Fine-tuning: the run's length once the data is known; warmup_ratio applies here. */
void jm_recipe_set_steps(jm_recipe *r, int64_t total_steps);
/* Folds more into the recipe's hash (the data files a fine-tune reads). */
void jm_recipe_hash_more(jm_recipe *r, const void *data, size_t n);

/* What one optimizer step reports to the loop. */
#define JM_TASK_MAX_METRICS 12
typedef struct {
    double loss, aux_loss, z_loss; /* the objective's parts, for the log */
    int64_t tokens;                /* tokens (not padding) the step trained on */
    int nmetrics;                  /* the task's own metrics.jsonl fields */
    const char *metric_name[JM_TASK_MAX_METRICS];
    double metric[JM_TASK_MAX_METRICS];
} jm_task_step;

/* One micro-batch of a step: the unit that data parallelism deals out to the
 * replicas and the pipeline streams through its stages. */
typedef struct {
    jm_batch batch;      /* its rows (valid until the task's next call) */
    double router_scale; /* the weight of its router losses in the step's objective */
} jm_micro;

/* Sums over a step's micro-batches that the loop keeps for every task
 * (reduced over the ranks with the task's own, then handed to finish). */
enum { JM_ACC_AUX, JM_ACC_Z, JM_ACC_TOKENS, JM_ACC_LOOP };
#define JM_TASK_MAX_ACC 16

/* A task: what a step trains on and what its loss is. A step is plan's
 * micro-batches: micro builds batch j (every rank that runs part of it asks;
 * the answer depends only on the step and j); after j's forward, objective
 * turns the token log-probs into the loss, the backward's per-token weights
 * (the gradient of sum_t -weight[t] log p(target_t)) and sums into
 * acc[JM_ACC_LOOP ..]; finish makes the step's report from the sums over all
 * of its micro-batches. state/restore put the task's data cursor into the
 * checkpoint (st_out entries valid until the next call) and read it back;
 * heldout (may be NULL) scores held-out data with the model as it is,
 * touching no state, and names its fields. */
typedef struct jm_task {
    void *ctx;
    jm_status (*plan)(void *ctx, int64_t step, int *nmicro, jm_error *err);
    jm_status (*micro)(void *ctx, int j, jm_micro *mb, jm_error *err);
    jm_status (*objective)(void *ctx, int j, const float *logp, const jm_losses *L, const float **weight, double *acc,
                           jm_error *err);
    void (*finish)(void *ctx, int64_t step, const double *acc, jm_task_step *st);
    int (*state)(void *ctx, st_out *out, int cap, jm_error *err); /* < 0: failed */
    jm_status (*restore)(void *ctx, const st_file *f, int64_t step, jm_error *err);
    jm_status (*heldout)(void *ctx, jm_model *m, int final, jm_task_step *st, jm_error *err);
    /* summary lines on stderr at the end of a run that was not stopped (may be NULL) */
    void (*summary)(void *ctx, FILE *metrics);
    int eval_at_start; /* a fresh run scores the held-out data before its first step too (step 0) */
} jm_task;

/* This process's rank as its launcher (mpirun, srun) numbers it, 0 when not
 * launched by one: before a run opens its grid, only rank 0 writes. */
int jm_launch_rank(void);

/* Gradients of one step, every micro-batch in turn on this process alone,
 * added to the model's (for --dump-grad and benches: the loop deals them out). */
jm_status jm_task_grads(jm_task *task, jm_model *m, int64_t step, jm_task_step *st, jm_error *err);

/* The optimizer over a range of the parameter arena (ZeRO-1 shards); the
 * arena's size; the squared gradient norm of a range; a shard's state. */
int64_t jm_arena_numel(const jm_model *m);
jm_status jm_optimizer_create_range(const jm_model *m, const jm_adamw_config *c, int64_t lo, int64_t hi,
                                    jm_optimizer **out, jm_error *err);
double jm_grad_sumsq(const jm_model *m, int64_t lo, int64_t hi);
void jm_optimizer_shard(jm_optimizer *o, int64_t **step, float **m, float **v, int64_t *lo, int64_t *hi);

/* jm_output_set's proof for a run directory's entries: checkpoints/ only when
 * it holds nothing but checkpoints jetmoe writes; the files are the run's by name. */
int jm_run_entry_proof(const char *path, const char *name);

/* Runs the recipe's steps of the task. The model: o->resume ? the run's
 * latest checkpoint : init (a fresh or loaded model, which the loop takes
 * over and frees). tokenizer: the directory whose files go into every
 * checkpoint (may be ""). inputs: paths the run reads (never replaced). */
jm_status jm_train_run(const jm_train_opts *o, jm_recipe *r, jm_model *init, jm_task *task, const char *tokenizer,
                       const char *const *inputs, int ninputs, int *stopped, jm_error *err);


#endif
