/* optim.c — AdamW, gradient clipping and learning-rate schedules.
 *
 * AdamW as torch.optim.AdamW computes it (so a run can be checked step by
 * step against the PyTorch reference): decoupled weight decay applied to the
 * parameter first, then the bias-corrected Adam step. Norm weights and biases
 * (every 1-D parameter) get no weight decay. State (m, v) is fp32, laid out
 * like the parameter arena, for all of it or (ZeRO-1: each data-parallel rank
 * updates its shard) a range of it. */
#include "model/model.h"
#include "train/train.h"

#include <math.h>
#include <string.h>

struct jm_optimizer {
    jm_adamw_config cfg;
    int64_t step;      /* steps taken */
    int64_t lo, hi;    /* the range of the parameter arena this optimizer updates */
    float *m, *v;      /* (hi - lo) each, laid out like the arena */
};

/* Parameters live in one arena: offsets into it (jm_param_offset) name a
 * parameter element on every rank alike. */
int64_t jm_arena_numel(const jm_model *model)
{
    int64_t n = 0;
    jm_param_arena(model, &n);
    return n;
}

jm_status jm_optimizer_create_range(const jm_model *model, const jm_adamw_config *c, int64_t lo, int64_t hi,
                                    jm_optimizer **out, jm_error *err)
{
    *out = NULL;
    if (!(c->lr >= 0) || !(c->beta1 >= 0 && c->beta1 < 1) || !(c->beta2 >= 0 && c->beta2 < 1) || !(c->eps > 0) ||
        !(c->weight_decay >= 0) || !(c->grad_clip >= 0))
        return jm_fail(err, JM_ERR_CONFIG, "optimizer: lr, betas in [0,1), eps > 0, weight_decay and grad_clip >= 0");
    for (int i = 0; i < jm_model_num_params(model); i++)
        if (!jm_model_param(model, i)->data)
            return jm_fail(err, JM_ERR_ARG, "optimizer: parameter %s has no fp32 copy (the model was opened for "
                           "inference); training needs jm_model_load", jm_model_param(model, i)->name);
    if (lo < 0 || hi < lo || hi > jm_arena_numel(model))
        return jm_fail(err, JM_ERR_ARG, "optimizer: range [%lld, %lld) is outside the parameters", (long long)lo,
                       (long long)hi);
    jm_optimizer *o = calloc(1, sizeof *o);
    if (!o) return jm_fail(err, JM_ERR_NOMEM, "cannot allocate the optimizer");
    o->cfg = *c;
    o->lo = lo, o->hi = hi;
    o->m = calloc((size_t)(hi - lo) + 1, sizeof(float));
    o->v = calloc((size_t)(hi - lo) + 1, sizeof(float));
    if (!o->m || !o->v) {
        double gb = (hi - lo) * 8.0 / 1e9;
        jm_optimizer_free(o);
        return jm_fail(err, JM_ERR_NOMEM, "cannot allocate %.2f GB of optimizer state", gb);
    }
    *out = o;
    return JM_OK;
}

jm_status jm_optimizer_create(const jm_model *model, const jm_adamw_config *c, jm_optimizer **out, jm_error *err)
{
    return jm_optimizer_create_range(model, c, 0, jm_arena_numel(model), out, err);
}

void jm_optimizer_free(jm_optimizer *o)
{
    if (!o) return;
    free(o->m);
    free(o->v);
    free(o);
}

int64_t jm_optimizer_steps(const jm_optimizer *o) { return o->step; }

double jm_grad_sumsq(const jm_model *model, int64_t lo, int64_t hi)
{
    double ss = 0.0;
    for (int i = 0; i < jm_model_num_params(model); i++) {
        const jm_param *p = jm_model_param(model, i);
        const int64_t a = jm_param_offset(model, i), j0 = lo > a ? lo - a : 0;
        const int64_t j1 = hi < a + p->numel ? hi - a : p->numel;
        double s = 0.0;
#pragma omp parallel for reduction(+ : s) schedule(static)
        for (int64_t j = j0; j < j1; j++) s += (double)p->grad[j] * p->grad[j];
        ss += s;
    }
    return ss;
}

double jm_grad_norm(const jm_model *model) { return sqrt(jm_grad_sumsq(model, 0, jm_arena_numel(model))); }

void jm_scale_grads(jm_model *model, float scale)
{
    for (int i = 0; i < jm_model_num_params(model); i++) {
        const jm_param *p = jm_model_param(model, i);
#pragma omp parallel for schedule(static)
        for (int64_t j = 0; j < p->numel; j++) p->grad[j] *= scale;
    }
}

jm_status jm_optimizer_step(jm_optimizer *o, jm_model *model, double lr, jm_error *err)
{
    if (o->hi > jm_arena_numel(model)) return jm_fail(err, JM_ERR_ARG, "optimizer: model does not match its state");
    o->step++;
    const double b1 = o->cfg.beta1, b2 = o->cfg.beta2;
    const double bc1 = 1.0 - pow(b1, (double)o->step), bc2 = 1.0 - pow(b2, (double)o->step);
    const float step_size = (float)(lr / bc1), bc2_sqrt = (float)sqrt(bc2), eps = (float)o->cfg.eps;
    const float fb1 = (float)b1, fb2 = (float)b2;
    for (int i = 0; i < jm_model_num_params(model); i++) {
        const jm_param *p = jm_model_param(model, i);
        /* the part of this parameter in the range */
        const int64_t a = jm_param_offset(model, i), j0 = o->lo > a ? o->lo - a : 0;
        const int64_t j1 = o->hi < a + p->numel ? o->hi - a : p->numel;
        if (j1 <= j0) continue;
        /* no decay on norms and biases (the 1-D parameters) */
        const float decay = p->ndim >= 2 ? (float)(1.0 - lr * o->cfg.weight_decay) : 1.0f;
        float *w = p->data, *m = o->m + (a - o->lo), *v = o->v + (a - o->lo);
        const float *g = p->grad;
#pragma omp parallel for schedule(static)
        for (int64_t j = j0; j < j1; j++) {
            w[j] *= decay;
            m[j] = fb1 * m[j] + (1.0f - fb1) * g[j];
            v[j] = fb2 * v[j] + (1.0f - fb2) * g[j] * g[j];
            w[j] -= step_size * m[j] / (sqrtf(v[j]) / bc2_sqrt + eps);
        }
    }
    return JM_OK;
}

/* State for checkpoints: the step count and the m/v of the arena range. */
void jm_optimizer_shard(jm_optimizer *o, int64_t **step, float **m, float **v, int64_t *lo, int64_t *hi)
{
    *step = &o->step;
    *m = o->m;
    *v = o->v;
    *lo = o->lo;
    *hi = o->hi;
}

/* ---- schedules ---- */

double jm_schedule_lr(const jm_schedule *s, int64_t step)
{
    /* step counts from 0; the LR for the update that makes step `step + 1` */
    const double peak = s->peak_lr, floor_lr = s->peak_lr * s->min_lr_ratio;
    if (step < s->warmup_steps) return peak * (double)(step + 1) / (double)s->warmup_steps;
    switch (s->type) {
    case JM_SCHEDULE_CONSTANT:
        return peak;
    case JM_SCHEDULE_COSINE: {
        int64_t span = s->total_steps - s->warmup_steps;
        double t = span > 0 ? (double)(step - s->warmup_steps) / (double)span : 1.0;
        t = t > 1.0 ? 1.0 : t;
        return floor_lr + 0.5 * (peak - floor_lr) * (1.0 + cos(M_PI * t));
    }
    case JM_SCHEDULE_WSD: {
        /* warmup, stable at peak, then over the last decay_steps an exponential
         * decay to the floor (MiniCPM's WSD, which JetMoE follows) */
        int64_t decay_start = s->total_steps - s->decay_steps;
        if (step < decay_start || s->decay_steps <= 0) return peak;
        double t = (double)(step - decay_start + 1) / (double)s->decay_steps;
        t = t > 1.0 ? 1.0 : t;
        return peak * pow(s->min_lr_ratio, t);
    }
    }
    return peak;
}
