/* model.c — JetMoE parameters, activations and the forward pass.
 *
 * Parameters live in one fp32 arena, activations in another, each carved
 * into named pointers once (llm.c style). jm_forward is a straight walk
 * through the spec: embed -> per layer [norm -> MoA -> residual -> norm ->
 * MoE -> residual] -> norm -> logits -> losses. */
#include "base/safetensors.h"
#include "model/model.h"
#include "model/ops/ops.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

/* Weight matrices are views of the weights as stored (wview: fp32 in the
 * arena for training, BF16/Q8/Q4 in the file mapping for inference); norms,
 * biases and routers are always fp32. */
typedef struct {
    float *ln1, *moa_router, *moa_bias, *ln2, *moe_router, *moe_bias;
    wview kv_proj, moa_in, moa_out, moe_in, moe_out;
} layer_params;

/* What one layer keeps from its forward for the backward pass. */
typedef struct {
    float *x;             /* (N,H) the layer's input (residual stream) */
    float *a, *rstd1;     /* (N,H), (N) normed input to MoA */
    float *kv;            /* (N,2A) shared keys (after RoPE) and values */
    float *moa_z, *moa_gate;
    int32_t *moa_idx, *moa_sorted, *moa_pos;
    int64_t *moa_off;     /* (E+1) */
    float *q;             /* (N,k,A) queries after RoPE, pair order */
    float *att, *att_lse; /* (N,k,A) attention output, (N,k*Hkv) softmax normalisers */
    float *x_mid;         /* (N,H) residual after MoA */
    float *b, *rstd2;     /* (N,H), (N) normed input to MoE */
    float *moe_z, *moe_gate;
    int32_t *moe_idx, *moe_sorted, *moe_pos;
    int64_t *moe_off;
    float *u, *h;         /* (N*k,2F), (N*k,F) expert hidden, sorted order */
    float *moa_y, *moe_y; /* (N*k,H) each expert's output before the gates, sorted order */
} layer_acts;

/* Gradient scratch for jm_backward, planned beside the activations. */
typedef struct {
    float *dres;          /* (N,H) gradient of the residual stream, updated in place layer by layer */
    float *dnorm;         /* (N,H) gradient of a normed block input (a or b) */
    float *dys, *dxs;     /* (N*k, wide) sorted-order gradients */
    float *dh, *du;       /* (N*k,F), (N*k,2F) */
    float *dq, *datt;     /* (N,k,A) pair order */
    float *dkv;           /* (N,2A) */
    float *dz, *dgate;    /* (N,E), (N*k) */
} grad_scratch;

/* The decoder: a KV cache of `slots` independent sequences and a small arena
 * for the tokens of one call, whose activations every layer reuses (nothing
 * is kept for a backward pass). */
typedef struct {
    int slots, ctx;         /* sequences, and positions each can hold */
    int *len;               /* (slots) cached positions of each */
    int32_t *tok;           /* (slots, ctx) the ids whose keys and values are cached */
    void *kv;               /* (L, slots, 2, Hkv, ctx, D): K after RoPE, then V (ops.h, attention_cached) */
    int kv_bf16;            /* kv holds bf16 (jm_set_kv_cache), else fp32 */
    float *rope_cos, *rope_sin; /* (ctx, D/2) */
    int n_cap, r_cap, att_threads; /* tokens and logit rows per call the arena is planned for */
    void *mem;
    size_t cap;
    layer_acts a;           /* shared by every layer */
    float *x0, *x1, *hf, *logits, *xs, *ys, *att_scratch; /* hf (r_cap, H), logits (r_cap, V) */
    int32_t *pos;           /* (n_cap) each token's position */
    att_run *runs;          /* (n_cap) one per item of the call */
    void *wscratch;         /* stored-weight products (qmatmul.c) */
    jm_pool *pool;          /* the threads of decode steps (a few tokens per call) */
} decoder;

/* A jm_infer_batch call as the MoA block sees it: its runs over this layer's
 * part of the cache, the few-token ones (decoding) first. */
typedef struct {
    const att_run *runs;
    int nruns, nsmall, ctx;
    jm_pool *pool;          /* where the few-token runs attend */
    kv_cache cache;         /* (slots, ctx, 2A) of the layer being computed */
} dec_step;

/* A parameter's place in the model: an fp32 vector (or router), or a matrix view. */
typedef struct {
    float **f;
    wview *w;
} param_slot;

struct jm_model {
    jm_config cfg;
    decoder dec;
    int nparams;
    jm_param *params;
    float *param_mem;
    int64_t param_numel;
    layer_params *lp;
    wview embed, lm_head;
    void *ram;            /* jm_weights_to_ram: the matrices' copy in huge pages */
    float *norm;
    param_slot *slot;     /* where each table entry's pointer goes (build_params) */
    st_set map;           /* jm_model_open: the mapped files the views point into */
    int mapped;           /* some weights live in the mapping: inference only */
    int stored;           /* some matrix is not fp32: products need wscratch */
    int stored_bf16;      /* some matrix is BF16: wscratch holds rounded inputs as fp32 */
    const wkernels *kern; /* BF16/Q8/Q4 dot kernels */
    const jm_model *owner; /* jm_model_share: whose weights, gradients and tables these are (NULL: its own) */

    int B, T;         /* the shape the activation arena is planned for */
    int act_l0, act_l1; /* and the layers [act_l0, act_l1) it holds */
    void *act_mem;
    size_t act_cap;   /* its size in bytes */
    layer_acts *la;
    float *x_out, *hf, *rstdf, *logits; /* final residual, normed, (N), (N,V) */
    int32_t *targets, *tokens;
    int32_t *pos, *kstart; /* (N) RoPE position, first visible key in the row (packing); pos == NULL: 0..T-1 */
    uint8_t *valid;   /* (N) 0 for padding: left out of the router losses */
    float *logp;      /* (N) log p(target) */
    int packed;       /* this forward had positions: pos/kstart/valid are in use */
    float *xs, *ys;   /* dispatch scratch, (N*k, max width) */
    grad_scratch g;
    float *grad_mem;  /* gradients, laid out like param_mem (jm_param.grad) */
    float *att_scratch, *rope_cos, *rope_sin;
    void *wscratch;
    int att_threads;
    double aux_loss, z_loss;
    int64_t loss_count;
    int fwd_valid;    /* activations hold a completed forward (jm_backward needs one) */
    jm_grads_done_fn on_done; /* told as each part's gradients of a backward are complete */
    void *on_done_ctx;
    int fwd_l0, fwd_l1; /* the layers that forward ran */
    int dx_in_valid;  /* g.dres holds d loss / d (input of layer fwd_l0) from a completed backward */
};

/* ---- parameter table ---- */

enum { LAYER_PARAMS = 11 }; /* table entries per layer (build_params) */

/* Floats a parameter takes in the arena: each starts 64-byte aligned. */
static int64_t padded(int64_t numel) { return (numel + 15) & ~(int64_t)15; }

static void add_param(jm_param *p, int *n, param_slot *slot, param_slot target, const char *name, int ndim, int64_t d0,
                      int64_t d1, int64_t d2)
{
    jm_param *q = &p[*n];
    snprintf(q->name, sizeof q->name, "%s", name);
    q->ndim = ndim;
    q->shape[0] = d0;
    q->shape[1] = d1;
    q->shape[2] = d2;
    q->numel = d0 * (ndim > 1 ? d1 : 1) * (ndim > 2 ? d2 : 1);
    slot[*n] = target;
    (*n)++;
}

/* Lists every parameter in checkpoint order with its HF name and shape, and
 * where its pointer goes; then (when alloc) carves them from one arena. */
static jm_status alloc_params(jm_model *m, const char *need, jm_error *err);

static jm_status build_params(jm_model *m, int alloc, jm_error *err)
{
    const jm_config *c = &m->cfg;
    const int L = c->num_layers;
    const int64_t H = c->hidden_size, V = c->vocab_size, E = c->num_experts, F = c->intermediate_size;
    const int64_t A = (int64_t)c->num_kv_heads * c->head_dim;
    int cap = 3 + LAYER_PARAMS * L;
    m->params = calloc((size_t)cap, sizeof *m->params);
    m->lp = calloc((size_t)L, sizeof *m->lp);
    param_slot *slot = calloc((size_t)cap, sizeof *slot);
    if (!m->params || !m->lp || !slot) {
        free(slot);
        return jm_fail(err, JM_ERR_NOMEM, "cannot allocate the parameter table");
    }
    int n = 0;
    char name[96];
    add_param(m->params, &n, slot, (param_slot){NULL, &m->embed}, "model.embed_tokens.weight", 2, V, H, 0);
    for (int i = 0; i < L; i++) {
        layer_params *l = &m->lp[i];
#define P(slot_, suffix, ndim, d0, d1, d2)                                  \
    snprintf(name, sizeof name, "model.layers.%d.%s", i, suffix);           \
    add_param(m->params, &n, slot, slot_, name, ndim, d0, d1, d2)
#define F32(field) ((param_slot){&l->field, NULL})
#define MAT(field) ((param_slot){NULL, &l->field})
        P(F32(ln1), "input_layernorm.weight", 1, H, 0, 0);
        P(MAT(kv_proj), "self_attention.kv_proj.weight", 2, 2 * A, H, 0);
        P(F32(moa_router), "self_attention.experts.router.layer.weight", 2, E, H, 0);
        P(MAT(moa_in), "self_attention.experts.input_linear.weight", 3, E, A, H);
        P(MAT(moa_out), "self_attention.experts.output_linear.weight", 3, E, H, A);
        P(F32(moa_bias), "self_attention.experts.bias", 1, H, 0, 0);
        P(F32(ln2), "post_attention_layernorm.weight", 1, H, 0, 0);
        P(F32(moe_router), "mlp.router.layer.weight", 2, E, H, 0);
        P(MAT(moe_in), "mlp.input_linear.weight", 3, E, 2 * F, H);
        P(MAT(moe_out), "mlp.output_linear.weight", 3, E, H, F);
        P(F32(moe_bias), "mlp.bias", 1, H, 0, 0);
#undef P
#undef F32
#undef MAT
    }
    add_param(m->params, &n, slot, (param_slot){&m->norm, NULL}, "model.norm.weight", 1, H, 0, 0);
    if (!c->tie_word_embeddings)
        add_param(m->params, &n, slot, (param_slot){NULL, &m->lm_head}, "lm_head.weight", 2, V, H, 0);
    m->nparams = n;
    m->slot = slot;
    return alloc ? alloc_params(m, NULL, err) : JM_OK;
}

/* Carves the parameters from one 64-byte aligned fp32 arena: all of them, or
 * those with need[i] (jm_model_open: the rest stay in the mapping). */
static jm_status alloc_params(jm_model *m, const char *need, jm_error *err)
{
    const int n = m->nparams;
    const param_slot *slot = m->slot;
    int64_t total = 0;
    for (int i = 0; i < n; i++)
        if (!need || need[i]) total += padded(m->params[i].numel);
    if ((uint64_t)total > SIZE_MAX / sizeof(float)) {
        return jm_fail(err, JM_ERR_NOMEM, "model too large for this machine (%lld parameters)", (long long)total);
    }
    m->param_mem = aligned_alloc(64, (size_t)(total ? total : 16) * sizeof(float));
    if (!m->param_mem) {
        return jm_fail(err, JM_ERR_NOMEM, "cannot allocate %.1f GB for %lld parameters", total * 4.0 / 1e9,
                       (long long)total);
    }
    m->param_numel = total;
    float *p = m->param_mem;
    for (int i = 0; i < n; i++) {
        if (need && !need[i]) continue;
        m->params[i].data = p;
        if (slot[i].f)
            *slot[i].f = p;
        else
            *slot[i].w = wview_f32(p);
        p += padded(m->params[i].numel);
    }
    if (m->cfg.tie_word_embeddings) m->lm_head = m->embed;
    return JM_OK;
}

static jm_status model_new(const jm_config *c, int alloc, jm_model **out, jm_error *err)
{
    *out = NULL;
    jm_status s = jm_config_validate(c, err);
    if (s) return s;
    jm_model *m = calloc(1, sizeof *m);
    if (!m) return jm_fail(err, JM_ERR_NOMEM, "cannot allocate the model");
    m->cfg = *c;
    m->kern = wkernels_get("auto");
    if ((s = build_params(m, alloc, err))) {
        jm_model_free(m);
        return s;
    }
    *out = m;
    return JM_OK;
}

void jm_model_free(jm_model *m)
{
    if (!m) return;
    if (!m->owner) { /* a shared handle's weights, gradients and tables are its owner's */
        free(m->params);
        free(m->slot);
        st_set_close(&m->map);
        free(m->lp);
        free(m->param_mem);
        free(m->grad_mem);
    }
    free(m->la);
    free(m->act_mem);
    free(m->dec.kv);
    free(m->dec.len);
    free(m->dec.tok);
    free(m->dec.rope_cos);
    free(m->dec.rope_sin);
    free(m->dec.mem);
    free(m->ram);
    jm_pool_free(m->dec.pool);
    free(m);
}

const jm_config *jm_model_config(const jm_model *m) { return &m->cfg; }
int jm_model_num_params(const jm_model *m) { return m->nparams; }
const jm_param *jm_model_param(const jm_model *m, int i)
{
    return i >= 0 && i < m->nparams ? &m->params[i] : NULL;
}
const float *jm_logits(const jm_model *m) { return m->logits; }
const float *jm_token_logprobs(const jm_model *m) { return m->logp; }

const int32_t *jm_routing(const jm_model *m, int layer, int block)
{
    if (!m->la || layer < 0 || layer >= m->cfg.num_layers || block < 0 || block > 1) return NULL;
    return block == 0 ? m->la[layer].moa_idx : m->la[layer].moe_idx;
}

int64_t jm_routing_count(const jm_model *m) { return m->la ? (int64_t)m->B * m->T * m->cfg.top_k : 0; }

jm_status jm_model_reconfigure(jm_model *m, const jm_config *c, jm_error *err)
{
    jm_status s = jm_config_validate(c, err);
    if (s) return s;
    const jm_config *o = &m->cfg;
    static const char *const names[] = {"vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads",
                                        "kv_channels", "intermediate_size", "num_local_experts",
                                        "num_experts_per_tok", "tie_word_embeddings"};
    const int have[] = {o->vocab_size, o->hidden_size, o->num_layers, o->num_kv_heads, o->head_dim,
                        o->intermediate_size, o->num_experts, o->top_k, o->tie_word_embeddings};
    const int want[] = {c->vocab_size, c->hidden_size, c->num_layers, c->num_kv_heads, c->head_dim,
                        c->intermediate_size, c->num_experts, c->top_k, c->tie_word_embeddings};
    for (int i = 0; i < 9; i++)
        if (have[i] != want[i])
            return jm_fail(err, JM_ERR_CONFIG, "%s is %d in the model but %d in the new config: the weights have "
                           "another shape", names[i], have[i], want[i]);
    const int ctx = m->dec.ctx < c->max_position_embeddings ? m->dec.ctx : c->max_position_embeddings;
    const int same_positions = c->max_position_embeddings == o->max_position_embeddings &&
                               c->rope_theta == o->rope_theta;
    m->cfg = *c;
    m->fwd_valid = 0;
    /* a KV cache holds keys rotated with the old RoPE: start it afresh */
    if (!same_positions && m->dec.kv) return jm_set_context(m, ctx, err);
    return JM_OK;
}

void jm_set_threads(int n)
{
    /* never more than the cores this process may run on: an extra thread
     * only waits for one of them (at every barrier, on a shared machine) */
    const int cores = jm_cpu_count();
    if (n <= 0 || n > cores) n = cores;
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
}

/* ---- initialisation (spec, "Initialisation") ---- */

/* splitmix64 + Box-Muller: a small, seedable generator with no global state */
static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double uniform01(uint64_t *s) { return ((splitmix(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

jm_status jm_model_create(const jm_config *c, uint64_t seed, jm_model **out, jm_error *err)
{
    jm_status s = model_new(c, 1, out, err);
    if (s) return s;
    jm_model *m = *out;
    uint64_t rng = seed;
    for (int i = 0; i < m->nparams; i++) {
        jm_param *p = &m->params[i];
        if (p->ndim == 1) { /* norms 1, biases 0 */
            float v = strstr(p->name, "bias") ? 0.0f : 1.0f;
            for (int64_t j = 0; j < p->numel; j++) p->data[j] = v;
            continue;
        }
        for (int64_t j = 0; j < p->numel; j += 2) {
            double r = sqrt(-2.0 * log(uniform01(&rng))), th = 2.0 * M_PI * uniform01(&rng);
            p->data[j] = (float)(c->initializer_range * r * cos(th));
            if (j + 1 < p->numel) p->data[j + 1] = (float)(c->initializer_range * r * sin(th));
        }
    }
    return JM_OK;
}

/* ---- checkpoints ---- */

static int param_index(const jm_model *m, const char *name)
{
    for (int i = 0; i < m->nparams; i++)
        if (strcmp(m->params[i].name, name) == 0) return i;
    return -1;
}

static void shape_str(char *buf, size_t n, int ndim, const int64_t *shape)
{
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int d = 0; d < ndim && o < n; d++) o += (size_t)snprintf(buf + o, n - o, d ? ", %lld" : "%lld", (long long)shape[d]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

/* How a parameter is stored: F32/BF16/F16 as its shape says, or quantized by
 * jm_quantize - Q8 (I8, same shape) or Q4 (U8, last dimension halved) with
 * "<name>_scale" (F16, last dimension C/32) beside it. */
typedef enum { STORED_F32, STORED_BF16, STORED_F16, STORED_Q8, STORED_Q4 } stored_kind;

typedef struct {
    stored_kind kind;
    const st_tensor *t, *scale;
    const char *file;
    int ilv; /* Q8/Q4 rows interleaved (quantize.c: jetmoe.quant_interleave) */
} stored;

static int same_shape(const st_tensor *t, int ndim, const int64_t *shape)
{
    if (t->ndim != ndim) return 0;
    for (int d = 0; d < ndim; d++)
        if (t->shape[d] != shape[d]) return 0;
    return 1;
}

static jm_status shape_error(const char *file, const char *name, const st_tensor *t, int ndim, const int64_t *want,
                             jm_error *err)
{
    char got[128], exp[128];
    shape_str(got, sizeof got, t->ndim, t->shape);
    shape_str(exp, sizeof exp, ndim, want);
    return jm_fail(err, JM_ERR_SHAPE, "%s: tensor %s has shape %s, expected %s from config.json", file, name, got, exp);
}

static jm_status find_stored(const st_set *set, const char *dir, const jm_param *p, stored *st, jm_error *err)
{
    memset(st, 0, sizeof *st);
    const st_tensor *t = st_set_find(set, p->name, &st->file);
    if (!t) return jm_fail(err, JM_ERR_SHAPE, "%s: tensor %s is missing", dir, p->name);
    st->t = t;
    int64_t want[3] = {p->shape[0], p->shape[1], p->shape[2]};
    const int64_t C = p->shape[p->ndim - 1];
    switch (t->dtype) {
    case ST_F32: st->kind = STORED_F32; break;
    case ST_BF16: st->kind = STORED_BF16; break;
    case ST_F16: st->kind = STORED_F16; break;
    case ST_I8: st->kind = STORED_Q8; break;
    case ST_U8: st->kind = STORED_Q4; break;
    default:
        return jm_fail(err, JM_ERR_FORMAT,
                       "%s: tensor %s has dtype %s; weights must be F32, BF16, F16, or I8/U8 from jetmoe quantize",
                       st->file, p->name, st_dtype_name(t->dtype));
    }
    if (st->kind < STORED_Q8) return same_shape(t, p->ndim, want) ? JM_OK : shape_error(st->file, p->name, t, p->ndim, want, err);

    if (p->ndim < 2 || C % QBLOCK)
        return jm_fail(err, JM_ERR_FORMAT, "%s: tensor %s is %s, but only matrices with a multiple of %d inputs are "
                       "stored quantized", st->file, p->name, st_dtype_name(t->dtype), QBLOCK);
    if (st->kind == STORED_Q4) want[p->ndim - 1] = C / 2;
    if (!same_shape(t, p->ndim, want)) return shape_error(st->file, p->name, t, p->ndim, want, err);
    char sname[128];
    snprintf(sname, sizeof sname, "%s_scale", p->name);
    const char *sfile;
    const st_tensor *sc = st_set_find(set, sname, &sfile);
    if (!sc)
        return jm_fail(err, JM_ERR_SHAPE, "%s: tensor %s is %s (quantized) but its scales %s are missing", st->file,
                       p->name, st_dtype_name(t->dtype), sname);
    want[p->ndim - 1] = C / QBLOCK;
    if (sc->dtype != ST_F16)
        return jm_fail(err, JM_ERR_FORMAT, "%s: tensor %s has dtype %s, expected F16", sfile, sname,
                       st_dtype_name(sc->dtype));
    if (!same_shape(sc, p->ndim, want)) return shape_error(sfile, sname, sc, p->ndim, want, err);
    /* a scale that is not finite would make every weight of its block garbage */
    for (int64_t i = 0; i < sc->numel; i++)
        if ((((sc->data[2 * i + 1] << 8) | sc->data[2 * i]) & 0x7c00) == 0x7c00)
            return jm_fail(err, JM_ERR_FORMAT, "%s: tensor %s holds a non-finite scale at element %lld", sfile, sname,
                           (long long)i);
    st->scale = sc;
    for (int f = 0; f < set->nfiles; f++)
        if (set->files[f].path == st->file && st_meta(&set->files[f], "jetmoe.quant_interleave"))
            st->ilv = wrows_interleave(st->kind == STORED_Q8 ? WT_Q8 : WT_Q4, p->shape[p->ndim - 2], C);
    return JM_OK;
}

/* The view of a parameter stored as BF16/Q8/Q4, or F32 aligned for SGEMM, in
 * place in the mapping; 0 when it has to be converted to fp32 instead. */
static int view_in_place(const stored *st, wview *w)
{
    switch (st->kind) {
    case STORED_F32:
        if ((uintptr_t)st->t->data % sizeof(float)) return 0;
        *w = (wview){WT_F32, st->t->data, NULL, 0};
        return 1;
    case STORED_BF16: *w = (wview){WT_BF16, st->t->data, NULL, 0}; return 1;
    case STORED_Q8: *w = (wview){WT_Q8, st->t->data, st->scale->data, st->ilv}; return 1;
    case STORED_Q4: *w = (wview){WT_Q4, st->t->data, st->scale->data, st->ilv}; return 1;
    default: return 0;
    }
}

/* Reads a stored parameter into its fp32 storage and checks every value. */
static jm_status convert_param(const jm_param *p, const stored *st, jm_error *err)
{
    wview w;
    if (st->kind >= STORED_Q8 && view_in_place(st, &w)) {
        const int64_t C = p->shape[p->ndim - 1];
        dequant_rows(p->data, w, 0, p->numel / C, C);
    } else {
        jm_status s = st_to_f32(st->t, p->data, err);
        if (s) {
            char inner[sizeof err->msg];
            snprintf(inner, sizeof inner, "%s", err->msg);
            return jm_fail(err, s, "%s: %s", st->file, inner);
        }
    }
    for (int64_t j = 0; j < p->numel; j++)
        if (!isfinite(p->data[j]))
            return jm_fail(err, JM_ERR_FORMAT, "%s: tensor %s holds a non-finite value at element %lld", st->file,
                           p->name, (long long)j);
    return JM_OK;
}

/* jm_quantize's metadata, jetmoe.quant = q8|q4 and jetmoe.quant_block = 32:
 * a file that has it must say both, with values we know, and hold no
 * quantized tensor of the other kind. (A file without it is read by dtype.)
 * jetmoe.quant_interleave = 4, where present, goes with them: its matrices'
 * rows are interleaved (quantize.c); files from before it have none. */
static jm_status check_quant_meta(const st_file *f, jm_error *err)
{
    const char *q = st_meta(f, "jetmoe.quant"), *b = st_meta(f, "jetmoe.quant_block");
    const char *ilv = st_meta(f, "jetmoe.quant_interleave");
    char block[16], group[16];
    snprintf(block, sizeof block, "%d", QBLOCK);
    snprintf(group, sizeof group, "%d", WILV);
    if (q && strcmp(q, "q8") != 0 && strcmp(q, "q4") != 0)
        return jm_fail(err, JM_ERR_FORMAT, "%s: metadata jetmoe.quant is \"%.40s\"; expected \"q8\" or \"q4\"",
                       f->path, q);
    if (b && strcmp(b, block) != 0)
        return jm_fail(err, JM_ERR_FORMAT, "%s: metadata jetmoe.quant_block is \"%.40s\"; expected \"%s\"", f->path,
                       b, block);
    if (!q != !b)
        return jm_fail(err, JM_ERR_FORMAT, "%s: metadata has %s but not %s", f->path,
                       q ? "jetmoe.quant" : "jetmoe.quant_block", q ? "jetmoe.quant_block" : "jetmoe.quant");
    if (ilv && strcmp(ilv, group) != 0)
        return jm_fail(err, JM_ERR_FORMAT, "%s: metadata jetmoe.quant_interleave is \"%.40s\"; expected \"%s\"",
                       f->path, ilv, group);
    if (ilv && !q)
        return jm_fail(err, JM_ERR_FORMAT, "%s: metadata has jetmoe.quant_interleave but not jetmoe.quant", f->path);
    st_dtype other = q && strcmp(q, "q8") == 0 ? ST_U8 : ST_I8;
    for (int i = 0; q && i < f->n; i++)
        if (f->t[i].dtype == other)
            return jm_fail(err, JM_ERR_FORMAT, "%s: tensor %s is %s, but metadata jetmoe.quant is \"%s\"", f->path,
                           f->t[i].name, st_dtype_name(other), q);
    return JM_OK;
}

/* Every tensor in the files must be a parameter or the scales of a quantized one. */
static jm_status check_extra(const jm_model *m, const st_set *set, jm_error *err)
{
    for (int f = 0; f < set->nfiles; f++)
        for (int t = 0; t < set->files[f].n; t++) {
            const char *name = set->files[f].t[t].name;
            if (param_index(m, name) >= 0) continue;
            if (m->cfg.tie_word_embeddings && strcmp(name, "lm_head.weight") == 0) continue; /* tied: HF ignores it too */
            size_t len = strlen(name);
            if (len > 6 && strcmp(name + len - 6, "_scale") == 0) {
                char base[128];
                snprintf(base, sizeof base, "%.*s", (int)(len - 6), name);
                const st_tensor *b = param_index(m, base) >= 0 ? st_set_find(set, base, NULL) : NULL;
                if (b && (b->dtype == ST_I8 || b->dtype == ST_U8)) continue;
            }
            return jm_fail(err, JM_ERR_SHAPE, "%s: unexpected tensor %s (not a JetMoE parameter for this config)",
                           set->files[f].path, name);
        }
    return JM_OK;
}

typedef enum { OPEN_CHECK, OPEN_FP32, OPEN_MAPPED } open_mode;

/* Matches the stored tensors to the parameter table; then OPEN_FP32 reads all
 * of them into the fp32 arena, OPEN_MAPPED points the matrices it can into the
 * mapping and converts the rest (vectors, routers, F16, unaligned F32). */
static jm_status match_tensors(jm_model *m, const st_set *set, const char *dir, open_mode mode, jm_error *err)
{
    jm_status s = JM_OK;
    for (int f = 0; f < set->nfiles && !s; f++) s = check_quant_meta(&set->files[f], err);
    if (!s) s = check_extra(m, set, err);
    if (s) return s;
    stored *st = calloc((size_t)m->nparams, sizeof *st);
    char *need = calloc((size_t)m->nparams, 1);
    if (!st || !need) {
        free(st);
        free(need);
        return jm_fail(err, JM_ERR_NOMEM, "cannot allocate the tensor table");
    }
    wview w;
    for (int i = 0; i < m->nparams && !s; i++) {
        s = find_stored(set, dir, &m->params[i], &st[i], err);
        if (!s && m->slot[i].f && st[i].kind >= STORED_Q8) /* what jm_quantize leaves as stored */
            s = jm_fail(err, JM_ERR_FORMAT, "%s: tensor %s is quantized, but routers stay as stored (F32/BF16/F16)",
                        st[i].file, m->params[i].name);
        need[i] = !s && (mode == OPEN_FP32 || m->slot[i].f || !view_in_place(&st[i], &w));
    }
    if (!s && mode != OPEN_CHECK) s = alloc_params(m, need, err);
    for (int i = 0; i < m->nparams && !s && mode != OPEN_CHECK; i++) {
        if (need[i]) {
            s = convert_param(&m->params[i], &st[i], err);
        } else {
            view_in_place(&st[i], m->slot[i].w);
            m->mapped = 1;
            if (m->slot[i].w->type != WT_F32) m->stored = 1;
            if (m->slot[i].w->type == WT_BF16) m->stored_bf16 = 1;
        }
    }
    if (!s && m->cfg.tie_word_embeddings) m->lm_head = m->embed;
    free(st);
    free(need);
    return s;
}

/* Opens dir's config and tensors and matches them (see match_tensors). */
static jm_status open_checkpoint(const char *where, open_mode mode, jm_model **out, st_set *set, jm_error *err)
{
    *out = NULL;
    char dir[4096], path[4200];
    jm_status s = jm_checkpoint_resolve(where, dir, sizeof dir, err);
    if (s) return s;
    snprintf(path, sizeof path, "%s/config.json", dir);
    jm_config c;
    if ((s = jm_config_load(path, &c, err))) return s;
    if ((s = st_set_open(dir, set, err))) return s;
    jm_model *m;
    /* shapes are checked before the arena is allocated: a config with huge
     * dimensions over a small file fails on the mismatch, not on memory */
    if ((s = model_new(&c, 0, &m, err)) || (s = match_tensors(m, set, dir, mode, err))) {
        jm_model_free(m);
        st_set_close(set);
        return s;
    }
    *out = m;
    return JM_OK;
}

jm_status jm_model_load(const char *dir, jm_model **out, jm_error *err)
{
    st_set set;
    jm_status s = open_checkpoint(dir, OPEN_FP32, out, &set, err);
    if (!s) st_set_close(&set);
    return s;
}

jm_status jm_model_open(const char *dir, jm_model **out, jm_error *err)
{
    st_set set;
    jm_status s = open_checkpoint(dir, OPEN_MAPPED, out, &set, err);
    if (s) return s;
    if ((*out)->mapped)
        (*out)->map = set; /* the views point into it: it lives as long as the model */
    else
        st_set_close(&set);
    return JM_OK;
}

jm_status jm_checkpoint_inspect(const char *dir, jm_config *c, jm_tensor_info **tensors, int *n, jm_error *err)
{
    *tensors = NULL;
    *n = 0;
    st_set set;
    jm_model *m;
    jm_status s = open_checkpoint(dir, OPEN_CHECK, &m, &set, err);
    if (s) return s;
    *c = m->cfg;
    jm_model_free(m);
    int total = 0;
    for (int f = 0; f < set.nfiles; f++) total += set.files[f].n;
    jm_tensor_info *ti = calloc(total ? (size_t)total : 1, sizeof *ti);
    if (!ti) {
        st_set_close(&set);
        return jm_fail(err, JM_ERR_NOMEM, "cannot allocate the tensor list");
    }
    int i = 0;
    for (int f = 0; f < set.nfiles; f++) {
        const char *base = strrchr(set.files[f].path, '/');
        base = base ? base + 1 : set.files[f].path;
        for (int t = 0; t < set.files[f].n; t++, i++) {
            const st_tensor *st = &set.files[f].t[t];
            snprintf(ti[i].name, sizeof ti[i].name, "%s", st->name);
            snprintf(ti[i].dtype, sizeof ti[i].dtype, "%s", st_dtype_name(st->dtype));
            snprintf(ti[i].file, sizeof ti[i].file, "%.255s", base);
            ti[i].ndim = st->ndim;
            memcpy(ti[i].shape, st->shape, sizeof ti[i].shape);
        }
    }
    st_set_close(&set);
    *tensors = ti;
    *n = total;
    return JM_OK;
}

jm_status jm_save_tensors(const char *path, const jm_tensor_out *t, int n, jm_error *err)
{
    st_out *o = calloc(n > 0 ? (size_t)n : 1, sizeof *o);
    if (!o) return jm_fail(err, JM_ERR_NOMEM, "cannot allocate the tensor list");
    jm_status s = JM_OK;
    for (int i = 0; i < n && !s; i++) {
        o[i].name = t[i].name;
        o[i].ndim = t[i].ndim;
        o[i].data = t[i].data;
        memcpy(o[i].shape, t[i].shape, sizeof t[i].shape);
        if (strcmp(t[i].dtype, "F32") == 0)
            o[i].dtype = ST_F32;
        else if (strcmp(t[i].dtype, "I32") == 0)
            o[i].dtype = ST_I32;
        else
            s = jm_fail(err, JM_ERR_ARG, "%s: tensor %s: unsupported dtype %s", path, t[i].name, t[i].dtype);
    }
    if (!s) s = st_write(path, o, n, NULL, NULL, 0, err);
    free(o);
    return s;
}

jm_status jm_model_save(const jm_model *m, const char *dir, jm_error *err)
{
    if (m->mapped)
        return jm_fail(err, JM_ERR_ARG, "%s: a model opened for inference keeps its weights in its checkpoint "
                       "file; jm_model_save needs jm_model_load", dir);
    jm_status s = jm_mkdir_p(dir, err);
    if (s) return s;
    st_out *t = calloc((size_t)m->nparams, sizeof *t);
    if (!t) return jm_fail(err, JM_ERR_NOMEM, "cannot allocate the tensor list");
    for (int i = 0; i < m->nparams; i++) {
        const jm_param *p = &m->params[i];
        t[i].name = p->name;
        t[i].dtype = ST_F32;
        t[i].ndim = p->ndim;
        for (int d = 0; d < p->ndim; d++) t[i].shape[d] = p->shape[d];
        t[i].data = p->data;
    }
    char path[4096];
    static const char *const meta_k[] = {"format"}, *const meta_v[] = {"pt"}; /* what HF loaders expect */
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    s = st_write(path, t, m->nparams, meta_k, meta_v, 1, err);
    free(t);
    if (s) return s;
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    if ((s = jm_generation_config_save(path, &m->cfg, err))) return s;
    snprintf(path, sizeof path, "%s/config.json", dir);
    return jm_config_save(path, &m->cfg, err);
}

/* ---- activations ---- */

/* Two passes over the same plan: with base == NULL it only measures. */
static void *carve(char *base, size_t *off, size_t bytes)
{
    void *p = base ? base + *off : NULL;
    *off += (bytes + 63) & ~(size_t)63;
    return p;
}

/* One layer's activations for N tokens (a->x is the caller's). */
static void plan_layer(const jm_config *c, layer_acts *a, char *base, size_t *offp, size_t N)
{
    const size_t H = c->hidden_size, E = c->num_experts, k = c->top_k;
    const size_t A = (size_t)c->num_kv_heads * c->head_dim, F = c->intermediate_size, Nk = N * k;
    const size_t f = sizeof(float), i32 = sizeof(int32_t), i64 = sizeof(int64_t);
    size_t off = *offp;
    a->a = carve(base, &off, N * H * f);
    a->rstd1 = carve(base, &off, N * f);
    a->kv = carve(base, &off, N * 2 * A * f);
    a->moa_z = carve(base, &off, N * E * f);
    a->moa_gate = carve(base, &off, Nk * f);
    a->moa_idx = carve(base, &off, Nk * i32);
    a->moa_sorted = carve(base, &off, Nk * i32);
    a->moa_pos = carve(base, &off, Nk * i32);
    a->moa_off = carve(base, &off, (E + 1) * i64);
    a->q = carve(base, &off, Nk * A * f);
    a->att = carve(base, &off, Nk * A * f);
    a->att_lse = carve(base, &off, N * k * c->num_kv_heads * f);
    a->x_mid = carve(base, &off, N * H * f);
    a->b = carve(base, &off, N * H * f);
    a->rstd2 = carve(base, &off, N * f);
    a->moe_z = carve(base, &off, N * E * f);
    a->moe_gate = carve(base, &off, Nk * f);
    a->moe_idx = carve(base, &off, Nk * i32);
    a->moe_sorted = carve(base, &off, Nk * i32);
    a->moe_pos = carve(base, &off, Nk * i32);
    a->moe_off = carve(base, &off, (E + 1) * i64);
    a->u = carve(base, &off, Nk * 2 * F * f);
    a->h = carve(base, &off, Nk * F * f);
    a->moa_y = carve(base, &off, Nk * H * f);
    a->moe_y = carve(base, &off, Nk * H * f);
    *offp = off;
}

static size_t wide_width(const jm_config *c)
{
    size_t H = c->hidden_size, A = (size_t)c->num_kv_heads * c->head_dim, F = c->intermediate_size;
    size_t wide = H > A ? H : A;
    return wide > 2 * F ? wide : 2 * F;
}

/* The arena of a forward over layers [l0, l1): those layers' activations,
 * and the final norm's and the logits only when l1 is the last layer (a
 * pipeline stage keeps just its own). Layers outside the range stay NULL. */
static size_t plan_acts(jm_model *m, char *base, int B, int T, int l0, int l1)
{
    const jm_config *c = &m->cfg;
    const size_t N = (size_t)B * T, H = c->hidden_size, V = c->vocab_size, E = c->num_experts, k = c->top_k;
    const size_t A = (size_t)c->num_kv_heads * c->head_dim, F = c->intermediate_size, Nk = N * k;
    const size_t f = sizeof(float), i32 = sizeof(int32_t);
    const int head = l1 == c->num_layers;
    size_t off = 0;
    if (base) memset(m->la, 0, (size_t)c->num_layers * sizeof *m->la);
    for (int l = l0; l < l1; l++) {
        layer_acts *a = base ? &m->la[l] : &(layer_acts){0};
        a->x = carve(base, &off, N * H * f);
        plan_layer(c, a, base, &off, N);
    }
    const size_t wide = wide_width(c);
    m->x_out = carve(base, &off, N * H * f);
    m->hf = head ? carve(base, &off, N * H * f) : NULL;
    m->rstdf = head ? carve(base, &off, N * f) : NULL;
    m->logits = head ? carve(base, &off, N * V * f) : NULL;
    m->targets = carve(base, &off, N * i32);
    m->tokens = carve(base, &off, N * i32);
    m->pos = carve(base, &off, N * i32);
    m->kstart = carve(base, &off, N * i32);
    m->valid = carve(base, &off, N);
    m->logp = head ? carve(base, &off, N * f) : NULL;
    grad_scratch *g = base ? &m->g : &(grad_scratch){0};
    g->dres = carve(base, &off, N * H * f);
    g->dnorm = carve(base, &off, N * H * f);
    g->dys = carve(base, &off, Nk * wide * f);
    g->dxs = carve(base, &off, Nk * wide * f);
    g->dh = carve(base, &off, Nk * F * f);
    g->du = carve(base, &off, Nk * 2 * F * f);
    g->dq = carve(base, &off, Nk * A * f);
    g->datt = carve(base, &off, Nk * A * f);
    g->dkv = carve(base, &off, N * 2 * A * f);
    g->dz = carve(base, &off, N * E * f);
    g->dgate = carve(base, &off, Nk * f);
    m->xs = carve(base, &off, Nk * wide * f);
    m->ys = carve(base, &off, Nk * wide * f);
    m->att_threads = omp_get_max_threads();
    m->att_scratch = carve(base, &off, (size_t)m->att_threads * attention_scratch_floats(T, c->top_k) * f);
    m->wscratch = m->stored ? carve(base, &off, wmatmul_scratch_bytes((int64_t)Nk, (int64_t)wide, m->att_threads, m->stored_bf16)) : NULL;
    m->rope_cos = carve(base, &off, (size_t)T * (c->head_dim / 2) * f);
    m->rope_sin = carve(base, &off, (size_t)T * (c->head_dim / 2) * f);
    return off;
}

size_t jm_activation_bytes(const jm_config *c, int B, int T)
{
    return jm_stage_activation_bytes(c, B, T, 0, c->num_layers);
}

size_t jm_stage_activation_bytes(const jm_config *c, int B, int T, int l0, int l1)
{
    jm_model plan = {.cfg = *c}; /* plan_acts only measures when given no base */
    return plan_acts(&plan, NULL, B, T, l0, l1);
}

static jm_status ensure_acts(jm_model *m, int B, int T, int l0, int l1, jm_error *err)
{
    if (m->act_mem && m->B == B && m->T == T && m->act_l0 == l0 && m->act_l1 == l1 &&
        m->att_threads >= omp_get_max_threads())
        return JM_OK;
    m->fwd_valid = 0;
    size_t bytes = plan_acts(m, NULL, B, T, l0, l1);
    if (!m->act_mem || bytes > m->act_cap) { /* grow; a smaller batch re-carves the same block */
        free(m->act_mem);
        free(m->la);
        m->act_mem = NULL;
        m->B = m->T = 0;
        m->act_cap = 0;
        m->la = calloc((size_t)m->cfg.num_layers, sizeof *m->la);
        m->act_mem = aligned_alloc(64, bytes);
        if (!m->la || !m->act_mem)
            return jm_fail(err, JM_ERR_NOMEM, "cannot allocate %.2f GB of activations for batch %d x %d tokens",
                           bytes / 1e9, B, T);
        m->act_cap = bytes;
    }
    plan_acts(m, m->act_mem, B, T, l0, l1);
    m->B = B;
    m->T = T;
    m->act_l0 = l0;
    m->act_l1 = l1;
    return JM_OK;
}

/* ---- forward ---- */

/* What the block forwards borrow: dispatch/attention scratch and RoPE tables
 * covering every position they see (the training arena's or the decoder's). */
typedef struct {
    float *xs, *ys, *att_scratch;
    const float *rope_cos, *rope_sin;
    const wkernels *K; /* and what products with stored (BF16/Q8/Q4) weights use */
    void *wscratch;
    jm_pool *pool;     /* decoding a few tokens: products and attention run on it, light ops inline */
    const int32_t *pos, *kstart; /* each token's position: packed rows (training) or decoding; else NULL */
} fwd_scratch;

/* MoA (spec, "MoA"): shared K/V, per-slot expert queries, causal attention,
 * per-slot expert output projections weighted by the gates. The tokens'
 * keys and values go to a->kv; training (step NULL) attends within each of
 * the B rows of T tokens, decoding stores them in the step's sequences'
 * caches and attends over those. */
static void moa_forward(const jm_config *c, const fwd_scratch *S, const layer_params *p, layer_acts *a, int B,
                        int T, const dec_step *step)
{
    const int64_t N = (int64_t)B * T, H = c->hidden_size, A = (int64_t)c->num_kv_heads * c->head_dim;
    const int E = c->num_experts, k = c->top_k;
    float *kv_new = a->kv;

    wmatmul_forward(kv_new, a->a, p->kv_proj, N, H, 2 * A, S->K, S->wscratch, S->pool);
    router_forward(a->moa_z, a->moa_idx, a->moa_gate, a->a, p->moa_router, N, (int)H, E, k);
    dispatch_build(a->moa_sorted, a->moa_pos, a->moa_off, a->moa_idx, N, k, E);

    dispatch_gather(S->xs, a->a, a->moa_sorted, N * k, k, H, 0);
    wexperts_forward(S->ys, S->xs, p->moa_in, a->moa_off, E, H, A, S->K, S->wscratch, S->pool);
    dispatch_scatter(a->q, S->ys, a->moa_sorted, N * k, A);

    rope_forward(a->q, N, T, 0, S->pos, k * c->num_kv_heads, c->head_dim, k * A, S->rope_cos, S->rope_sin);
    rope_forward(kv_new, N, T, 0, S->pos, c->num_kv_heads, c->head_dim, 2 * A, S->rope_cos, S->rope_sin);
    if (step) {
        /* a run attends the same way whatever else is in the call, so a
         * sequence's logits do not depend on its batch-mates */
        attention_decode(a->att, a->q, kv_new, step->cache, step->runs, step->nsmall, S->att_scratch, step->ctx, k,
                         c->num_kv_heads, c->head_dim, S->K, step->pool);
        if (step->nruns > step->nsmall)
            attention_cached(a->att, a->att_lse, a->q, kv_new, step->cache, step->runs + step->nsmall,
                             step->nruns - step->nsmall, S->att_scratch, step->ctx, k, c->num_kv_heads, c->head_dim);
    }
    else
        attention_forward(a->att, a->att_lse, a->q, kv_new, S->kstart, S->att_scratch, B, T, T, k, c->num_kv_heads,
                          c->head_dim);

    dispatch_gather(S->xs, a->att, a->moa_sorted, N * k, k, A, 1);
    wexperts_forward(a->moa_y, S->xs, p->moa_out, a->moa_off, E, A, H, S->K, S->wscratch, S->pool);
    combine_forward(a->x_mid, a->x, a->moa_y, a->moa_pos, a->moa_gate, p->moa_bias, N, k, H);
}

/* MoE (spec, "MoE"): top-k SiLU-GLU experts, gate-weighted, plus bias. */
static void moe_forward(const jm_config *c, const fwd_scratch *S, const layer_params *p, layer_acts *a,
                        float *x_out, int64_t N)
{
    const int64_t H = c->hidden_size, F = c->intermediate_size;
    const int E = c->num_experts, k = c->top_k;

    router_forward(a->moe_z, a->moe_idx, a->moe_gate, a->b, p->moe_router, N, (int)H, E, k);
    dispatch_build(a->moe_sorted, a->moe_pos, a->moe_off, a->moe_idx, N, k, E);
    dispatch_gather(S->xs, a->b, a->moe_sorted, N * k, k, H, 0);
    wexperts_forward(a->u, S->xs, p->moe_in, a->moe_off, E, H, 2 * F, S->K, S->wscratch, S->pool);
    swiglu_forward(a->h, a->u, N * k, F);
    wexperts_forward(a->moe_y, a->h, p->moe_out, a->moe_off, E, F, H, S->K, S->wscratch, S->pool);
    combine_forward(x_out, a->x_mid, a->moe_y, a->moe_pos, a->moe_gate, p->moe_bias, N, k, H);
}

/* A batch's positions and targets -> the arena's pos/kstart/valid/targets,
 * checked: positions run 0, 1, 2, ... within each sequence (-1: padding),
 * targets are ids or -1. */
static jm_status plan_batch(jm_model *m, const jm_batch *b, jm_error *err)
{
    const int B = b->B, T = b->T;
    const int64_t V = m->cfg.vocab_size;
    m->packed = b->positions != NULL;
    for (int r = 0; r < B; r++)
        for (int t = 0; t < T; t++) {
            const int64_t i = (int64_t)r * T + t;
            int p = b->positions ? b->positions[i] : t;
            if (b->positions) {
                int prev = t ? b->positions[i - 1] : -1;
                if (p < -1 || (p > 0 && p != prev + 1))
                    return jm_fail(err, JM_ERR_ARG, "row %d, token %d: position %d must be 0 (a new sequence), -1 "
                                   "(padding) or the previous token's position + 1 (%d)", r, t, p, prev + 1);
                m->valid[i] = p >= 0;
                m->pos[i] = p >= 0 ? p : 0;
                m->kstart[i] = p >= 0 ? t - p : t; /* padding sees only itself */
            }
            int next = t + 1 < T ? (b->positions ? b->positions[i + 1] : t + 1) : -1;
            int32_t y = b->targets ? b->targets[i] : (p >= 0 && next == p + 1 ? b->tokens[i + 1] : -1);
            if (y < -1 || y >= V)
                return jm_fail(err, JM_ERR_ARG, "row %d, token %d: target %d is outside the vocabulary [0, %lld) "
                               "(-1: none)", r, t, y, (long long)V);
            if (b->positions && p < 0 && y >= 0)
                return jm_fail(err, JM_ERR_ARG, "row %d, token %d: padding cannot have a target", r, t);
            m->targets[i] = y;
        }
    return JM_OK;
}

jm_status jm_forward(jm_model *m, const int32_t *tokens, int B, int T, jm_losses *losses, jm_error *err)
{
    return jm_forward_batch(m, &(jm_batch){B, T, tokens, NULL, NULL}, losses, err);
}

jm_status jm_forward_batch(jm_model *m, const jm_batch *b, jm_losses *losses, jm_error *err)
{
    return jm_forward_layers(m, b, 0, m->cfg.num_layers, NULL, losses, err);
}

/* The whole model is the range [0, L): embed -> layers -> norm -> logits ->
 * cross-entropy. A pipeline stage runs a part of it: from x_in instead of the
 * embedding when l0 > 0, and stopping at the residual x_out when l1 < L. */
jm_status jm_forward_layers(jm_model *m, const jm_batch *b, int l0, int l1, const float *x_in, jm_losses *losses,
                            jm_error *err)
{
    const jm_config *c = &m->cfg;
    const int L = c->num_layers;
    if (l0 < 0 || l1 > L || l0 >= l1)
        return jm_fail(err, JM_ERR_ARG, "layers [%d, %d): need 0 <= first < end <= num_hidden_layers = %d", l0, l1,
                       L);
    if (l0 == 0 && x_in)
        return jm_fail(err, JM_ERR_ARG, "layers [0, %d) start at the embedding of the tokens: x_in must be NULL", l1);
    if (l0 > 0 && !x_in)
        return jm_fail(err, JM_ERR_ARG, "layers [%d, %d) start mid-model: x_in must hold the residual stream "
                       "entering layer %d", l0, l1, l0);
    if (!b || !b->tokens) return jm_fail(err, JM_ERR_ARG, "the batch has no tokens");
    const int32_t *tokens = b->tokens;
    const int B = b->B, T = b->T;
    if (B < 1 || T < 1) return jm_fail(err, JM_ERR_ARG, "batch %d x %d: need at least one token", B, T);
    if (T > c->max_position_embeddings)
        return jm_fail(err, JM_ERR_ARG, "sequence of %d tokens exceeds max_position_embeddings = %d", T,
                       c->max_position_embeddings);
    const int64_t N = (int64_t)B * T, H = c->hidden_size, V = c->vocab_size;
    /* dispatch indices are int32 and BLAS dimensions int: keep every count in range */
    if (N * c->top_k > INT32_MAX || (int64_t)B * c->top_k * c->num_kv_heads > INT32_MAX)
        return jm_fail(err, JM_ERR_ARG, "batch %d x %d tokens is too large for one forward pass", B, T);
    for (int64_t t = 0; t < N; t++)
        if (tokens[t] < 0 || tokens[t] >= V)
            return jm_fail(err, JM_ERR_ARG, "token id %d at position %lld is outside the vocabulary [0, %lld)",
                           tokens[t], (long long)t, (long long)V);
    m->fwd_valid = 0;
    m->dx_in_valid = 0;
    m->fwd_l0 = m->fwd_l1 = 0; /* no output until this forward completes */
    jm_status s = ensure_acts(m, B, T, l0, l1, err);
    if (s) return s;
    if ((s = plan_batch(m, b, err))) return s;
    rope_tables(m->rope_cos, m->rope_sin, T, c->head_dim, c->rope_theta);

    const float eps = (float)c->rms_norm_eps;
    const uint8_t *valid = m->packed ? m->valid : NULL;
    const fwd_scratch S = {m->xs, m->ys, m->att_scratch, m->rope_cos, m->rope_sin, m->kern, m->wscratch, NULL,
                           m->packed ? m->pos : NULL, m->packed ? m->kstart : NULL};
    double aux = 0.0, zl = 0.0;
    if (l0 == 0)
        embedding_forward(m->la[0].x, tokens, m->embed, N, H);
    else /* kept: the first layer's backward needs its input */
        memcpy(m->la[l0].x, x_in, (size_t)N * H * sizeof *x_in);
    for (int l = l0; l < l1; l++) {
        const layer_params *p = &m->lp[l];
        layer_acts *a = &m->la[l];
        float *x_next = l + 1 < l1 ? m->la[l + 1].x : m->x_out;
        double sw, zr;

        rmsnorm_forward(a->a, a->rstd1, a->x, p->ln1, N, H, eps);
        moa_forward(c, &S, p, a, B, T, NULL);
        router_losses(&sw, &zr, a->moa_z, a->moa_idx, valid, N, c->num_experts, c->top_k);
        aux += sw;
        zl += zr;

        rmsnorm_forward(a->b, a->rstd2, a->x_mid, p->ln2, N, H, eps);
        moe_forward(c, &S, p, a, x_next, N);
        router_losses(&sw, &zr, a->moe_z, a->moe_idx, valid, N, c->num_experts, c->top_k);
        aux += sw;
        zl += zr;
    }
    memcpy(m->tokens, tokens, (size_t)N * sizeof *tokens);
    int64_t count = 0;
    double loss = 0.0;
    if (l1 == L) {
        rmsnorm_forward(m->hf, m->rstdf, m->x_out, m->norm, N, H, eps);
        wmatmul_forward(m->logits, m->hf, m->lm_head, N, H, V, m->kern, m->wscratch, NULL);
        loss = cross_entropy_forward(m->logits, m->targets, N, V, &count, m->logp);
    }
    m->aux_loss = aux;
    m->z_loss = zl;
    m->loss_count = count;
    m->fwd_l0 = l0;
    m->fwd_l1 = l1;
    m->fwd_valid = 1;
    if (losses) {
        losses->loss = loss;
        losses->aux_loss = aux;
        losses->z_loss = zl;
        losses->count = count;
    }
    return JM_OK;
}

/* ---- decoding with a KV cache ---- */

/* Memory that decoding streams through every step (the KV cache, weights
 * copied into RAM), on 2 MB pages where the kernel gives them (free() frees
 * it). In a virtual machine each 4 KB page a step reads is a nested TLB
 * miss, and once the step's weights have streamed past, the page tables'
 * lines are out of the caches too: bench/attention's 24 layers over a
 * 512-position bf16 cache, with 55 MB of other memory read between layers
 * as a q4 8B step does, took 9.5-11 ms a step on average with 4 KB pages
 * (a long tail: medians 4.5, steps up to 160) and 5.0-5.1 on 2 MB pages
 * (AMD EPYC family 26 model 2). Small blocks stay on malloc. */
static void *alloc_huge(size_t bytes)
{
    const size_t huge = (size_t)2 << 20;
    if (bytes < huge) return malloc(bytes ? bytes : 1);
    void *p = NULL;
    if (posix_memalign(&p, huge, (bytes + huge - 1) / huge * huge)) return NULL;
    madvise(p, bytes, MADV_HUGEPAGE); /* best effort: 4 KB pages work too, slower */
    return p;
}

jm_status jm_set_slots(jm_model *m, int slots, int ctx, jm_error *err)
{
    const jm_config *c = &m->cfg;
    if (m->owner)
        return jm_fail(err, JM_ERR_ARG, "this handle shares another model's weights for pipelined training "
                       "(jm_model_share) and has no KV cache: decode with the model it was shared from");
    if (ctx < 1 || ctx > c->max_position_embeddings)
        return jm_fail(err, JM_ERR_ARG, "context %d must be in [1, max_position_embeddings = %d]", ctx,
                       c->max_position_embeddings);
    if (slots < 1) return jm_fail(err, JM_ERR_ARG, "%d slots: the KV cache needs at least one", slots);
    decoder *d = &m->dec;
    free(d->kv);
    free(d->len);
    free(d->tok);
    free(d->rope_cos);
    free(d->rope_sin);
    d->kv = NULL;
    d->rope_cos = d->rope_sin = NULL;
    d->len = NULL;
    d->tok = NULL;
    d->slots = d->ctx = 0;
    d->n_cap = d->r_cap = 0; /* the arena's attention scratch is sized by the context: plan it again */
    const size_t A = (size_t)c->num_kv_heads * c->head_dim, half = (size_t)c->head_dim / 2;
    const size_t esize = d->kv_bf16 ? sizeof(uint16_t) : sizeof(float);
    const double gb = (double)c->num_layers * slots * ctx * 2 * A * esize / 1e9;
    if (gb * 1e9 > (double)(SIZE_MAX / 2))
        return jm_fail(err, JM_ERR_NOMEM, "a KV cache of %d slots of %d positions (%.0f GB) is too large", slots,
                       ctx, gb);
    d->kv = alloc_huge((size_t)c->num_layers * slots * ctx * 2 * A * esize);
    d->len = calloc((size_t)slots, sizeof *d->len);
    d->tok = malloc((size_t)slots * ctx * sizeof *d->tok);
    d->rope_cos = malloc((size_t)ctx * half * sizeof(float));
    d->rope_sin = malloc((size_t)ctx * half * sizeof(float));
    if (!d->kv || !d->len || !d->tok || !d->rope_cos || !d->rope_sin) {
        free(d->kv), free(d->len), free(d->tok), free(d->rope_cos), free(d->rope_sin);
        d->kv = NULL;
        d->rope_cos = d->rope_sin = NULL;
        d->len = NULL;
        d->tok = NULL;
        return jm_fail(err, JM_ERR_NOMEM, "cannot allocate a %.2f GB KV cache for %d slot%s of %d positions", gb,
                       slots, slots > 1 ? "s" : "", ctx);
    }
    rope_tables(d->rope_cos, d->rope_sin, ctx, c->head_dim, c->rope_theta);
    d->slots = slots;
    d->ctx = ctx;
    return JM_OK;
}

jm_status jm_set_context(jm_model *m, int ctx, jm_error *err) { return jm_set_slots(m, 1, ctx, err); }

jm_status jm_set_kv_cache(jm_model *m, const char *type, jm_error *err)
{
    const int bf16 = type && strcmp(type, "bf16") == 0;
    if (!type || (!bf16 && strcmp(type, "f32") != 0))
        return jm_fail(err, JM_ERR_ARG, "KV cache type '%s': use f32 or bf16", type ? type : "(null)");
    decoder *d = &m->dec;
    if (d->kv_bf16 == bf16) return JM_OK;
    d->kv_bf16 = bf16;
    return d->kv ? jm_set_slots(m, d->slots, d->ctx, err) : JM_OK; /* a new cache, empty */
}

const char *jm_kv_cache(const jm_model *m) { return m->dec.kv_bf16 ? "bf16" : "f32"; }
int jm_context(const jm_model *m) { return m->dec.ctx; }
int jm_slots(const jm_model *m) { return m->dec.slots; }
int jm_cached(const jm_model *m) { return jm_slot_len(m, 0); }
int jm_slot_len(const jm_model *m, int slot)
{
    return slot >= 0 && slot < m->dec.slots ? m->dec.len[slot] : 0;
}
const int32_t *jm_slot_tokens(const jm_model *m, int slot)
{
    return slot >= 0 && slot < m->dec.slots ? m->dec.tok + (int64_t)slot * m->dec.ctx : NULL;
}

/* "slot 3: " when there are several, for messages; "" with one. */
static const char *slot_name(const decoder *d, int slot, char *buf, size_t cap)
{
    if (d->slots > 1) snprintf(buf, cap, "slot %d: ", slot);
    else buf[0] = 0;
    return buf;
}

jm_status jm_slot_copy(jm_model *m, int src, int dst, int n, jm_error *err)
{
    decoder *d = &m->dec;
    if (src < 0 || src >= d->slots || dst < 0 || dst >= d->slots)
        return jm_fail(err, JM_ERR_ARG, "slot %d is outside the %d slots (jm_set_slots)",
                       src < 0 || src >= d->slots ? src : dst, d->slots);
    if (n < 0 || n > d->len[src])
        return jm_fail(err, JM_ERR_ARG, "slot %d holds %d positions: cannot copy %d of them", src, d->len[src], n);
    /* a slot's cache is (2, Hkv, ctx, D) per layer (ops.h): the first n
     * positions of each of its 2*Hkv head blocks */
    const size_t esize = d->kv_bf16 ? sizeof(uint16_t) : sizeof(float), D = (size_t)m->cfg.head_dim;
    const size_t heads = 2 * (size_t)m->cfg.num_kv_heads, per_slot = heads * d->ctx * D * esize;
    if (src != dst)
        for (int l = 0; l < m->cfg.num_layers; l++) {
            char *layer = (char *)d->kv + (size_t)l * d->slots * per_slot;
            for (size_t b = 0; b < heads; b++)
                memcpy(layer + dst * per_slot + b * d->ctx * D * esize, layer + src * per_slot + b * d->ctx * D * esize,
                       (size_t)n * D * esize);
        }
    memmove(d->tok + (int64_t)dst * d->ctx, d->tok + (int64_t)src * d->ctx, (size_t)n * sizeof *d->tok);
    d->len[dst] = n;
    return JM_OK;
}

/* The decoder's arena for up to n tokens and r rows of logits per call (grows, never shrinks). */
static jm_status ensure_decoder(jm_model *m, int n, int r, jm_error *err)
{
    decoder *d = &m->dec;
    /* the library's thread count, and never more threads than the cores
     * this process may run on (OMP_NUM_THREADS may ask for more) */
    const int cores = jm_cpu_count(), want = omp_get_max_threads() < cores ? omp_get_max_threads() : cores;
    if (jm_pool_threads(d->pool) != want || !d->pool) {
        jm_pool_free(d->pool);
        if (!(d->pool = jm_pool_create(want)))
            return jm_fail(err, JM_ERR_NOMEM, "cannot start %d decoding threads", want);
    }
    if (d->mem && n <= d->n_cap && r <= d->r_cap && d->att_threads >= omp_get_max_threads()) return JM_OK;
    n = n > d->n_cap ? n : d->n_cap;
    r = r > d->r_cap ? r : d->r_cap;
    const jm_config *c = &m->cfg;
    const size_t N = (size_t)n, R = (size_t)r, H = c->hidden_size, V = c->vocab_size, k = c->top_k, f = sizeof(float);
    for (int pass = 0; pass < 2; pass++) {
        char *base = pass ? d->mem : NULL;
        size_t off = 0;
        layer_acts a = {0};
        plan_layer(c, &a, base, &off, N);
        float *x0 = carve(base, &off, N * H * f), *x1 = carve(base, &off, N * H * f);
        float *hf = carve(base, &off, R * H * f), *logits = carve(base, &off, R * V * f);
        float *xs = carve(base, &off, N * k * wide_width(c) * f), *ys = carve(base, &off, N * k * wide_width(c) * f);
        int32_t *pos = carve(base, &off, N * sizeof *pos);
        att_run *runs = carve(base, &off, N * sizeof *runs);
        int threads = omp_get_max_threads();
        float *att = carve(base, &off, (size_t)threads * attention_cache_scratch_floats(d->ctx, c->top_k, c->head_dim) * f);
        void *ws = m->stored ? carve(base, &off, wmatmul_scratch_bytes((int64_t)(N * k), (int64_t)wide_width(c), threads,
                                                                  m->stored_bf16))
                             : NULL;
        if (!pass) {
            free(d->mem);
            d->n_cap = d->r_cap = 0;
            d->mem = aligned_alloc(64, off);
            if (!d->mem) return jm_fail(err, JM_ERR_NOMEM, "cannot allocate %.2f GB for decoding", off / 1e9);
            d->cap = off;
        } else {
            d->a = a;
            d->x0 = x0, d->x1 = x1, d->hf = hf, d->logits = logits, d->xs = xs, d->ys = ys, d->att_scratch = att;
            d->pos = pos, d->runs = runs;
            d->att_threads = threads;
            d->wscratch = ws;
            d->n_cap = n;
            d->r_cap = r;
        }
    }
    return JM_OK;
}

/* An item's place in the cache: in range, contiguous with what the slot holds, ids in the vocabulary. */
static jm_status check_item(const jm_model *m, const jm_infer_item *items, int i, jm_error *err)
{
    const decoder *d = &m->dec;
    const jm_infer_item *it = &items[i];
    char at[32];
    if (it->slot < 0 || it->slot >= d->slots)
        return jm_fail(err, JM_ERR_ARG, "item %d: slot %d is outside the %d slot%s (jm_set_slots)", i, it->slot,
                       d->slots, d->slots > 1 ? "s" : "");
    slot_name(d, it->slot, at, sizeof at);
    if (it->n < 1 || !it->tokens) return jm_fail(err, JM_ERR_ARG, "%sno tokens to process", at);
    if (it->pos < 0 || it->pos > d->len[it->slot])
        return jm_fail(err, JM_ERR_ARG, "%sposition %d is past the %d cached tokens", at, it->pos, d->len[it->slot]);
    if ((int64_t)it->pos + it->n > d->ctx)
        return jm_fail(err, JM_ERR_ARG, "%s%d + %d tokens exceed the context of %d", at, it->pos, it->n, d->ctx);
    if (it->logits < 0 || it->logits > it->n)
        return jm_fail(err, JM_ERR_ARG, "%slogits for %d of its %d tokens", at, it->logits, it->n);
    for (int j = 0; j < i; j++)
        if (items[j].slot == it->slot)
            return jm_fail(err, JM_ERR_ARG, "slot %d appears twice in one call (items %d and %d)", it->slot, j, i);
    for (int t = 0; t < it->n; t++)
        if (it->tokens[t] < 0 || it->tokens[t] >= m->cfg.vocab_size)
            return jm_fail(err, JM_ERR_ARG, "%stoken id %d at position %d is outside the vocabulary [0, %d)", at,
                           it->tokens[t], it->pos + t, m->cfg.vocab_size);
    return JM_OK;
}

jm_status jm_infer_batch(jm_model *m, const jm_infer_item *items, int nitems, const float **logits, jm_error *err)
{
    const jm_config *c = &m->cfg;
    decoder *d = &m->dec;
    jm_status s;
    *logits = NULL;
    if (!d->kv && (s = jm_set_slots(m, 1, c->max_position_embeddings, err))) return s;
    if (nitems < 1 || !items) return jm_fail(err, JM_ERR_ARG, "no tokens to process");
    int64_t N = 0, R = 0;
    for (int i = 0; i < nitems; i++) {
        if ((s = check_item(m, items, i, err))) return s;
        N += items[i].n;
        R += items[i].logits;
    }
    /* dispatch indices are int32 and BLAS dimensions int */
    if (N * c->top_k > INT32_MAX || R * c->vocab_size > INT32_MAX)
        return jm_fail(err, JM_ERR_ARG, "%lld tokens (%lld rows of logits) are too many for one call", (long long)N,
                       (long long)R);
    if ((s = ensure_decoder(m, (int)N, (int)R, err))) return s;

    const int64_t H = c->hidden_size, V = c->vocab_size, A = (int64_t)c->num_kv_heads * c->head_dim;
    const float eps = (float)c->rms_norm_eps;
    float *x = d->x0, *x_next = d->x1;
    int nsmall = 0; /* runs of up to WSMALL_N tokens first, then the prefills' */
    for (int i = 0; i < nitems; i++) nsmall += items[i].n <= WSMALL_N;
    for (int i = 0, row = 0, small = 0, large = nsmall; i < nitems; row += items[i].n, i++) {
        const jm_infer_item *it = &items[i];
        d->runs[it->n <= WSMALL_N ? small++ : large++] = (att_run){row, it->n, it->pos, (int64_t)it->slot * d->ctx * 2 * A};
        for (int t = 0; t < it->n; t++) d->pos[row + t] = it->pos + t;
        embedding_forward(x + (int64_t)row * H, it->tokens, m->embed, it->n, H);
    }
    dec_step step = {.runs = d->runs, .nruns = nitems, .nsmall = nsmall, .ctx = d->ctx, .pool = d->pool};
    /* a few tokens (decoding) run on the pool; a prefill's GEMMs on OpenMP and OpenBLAS */
    jm_pool *pool = N <= WSMALL_N ? d->pool : NULL;
    const fwd_scratch S = {d->xs, d->ys, d->att_scratch, d->rope_cos, d->rope_sin, m->kern, d->wscratch, pool,
                           d->pos, NULL};
    layer_acts *a = &d->a;
    for (int l = 0; l < c->num_layers; l++) {
        const layer_params *p = &m->lp[l];
        const size_t at = (size_t)l * d->slots * d->ctx * 2 * A * (d->kv_bf16 ? sizeof(uint16_t) : sizeof(float));
        step.cache = (kv_cache){(char *)d->kv + at, d->kv_bf16};
        a->x = x;
        rmsnorm_forward(a->a, a->rstd1, x, p->ln1, N, H, eps);
        moa_forward(c, &S, p, a, 1, (int)N, &step);
        rmsnorm_forward(a->b, a->rstd2, a->x_mid, p->ln2, N, H, eps);
        moe_forward(c, &S, p, a, x_next, N);
        float *t = x;
        x = x_next;
        x_next = t;
    }
    /* only the rows asked for: a prefill never pays for the others */
    int64_t r = 0;
    for (int i = 0, row = 0; i < nitems; row += items[i].n, i++)
        for (int t = items[i].n - items[i].logits; t < items[i].n; t++, r++)
            rmsnorm_forward(d->hf + r * H, NULL, x + (row + t) * H, m->norm, 1, H, eps);
    if (R) wmatmul_forward(d->logits, d->hf, m->lm_head, R, H, V, m->kern, d->wscratch, d->pool);
    for (int i = 0; i < nitems; i++) {
        memcpy(d->tok + (int64_t)items[i].slot * d->ctx + items[i].pos, items[i].tokens,
               (size_t)items[i].n * sizeof *d->tok);
        d->len[items[i].slot] = items[i].pos + items[i].n;
    }
    /* in-place weights are not scanned at open (it would read all 17 GB of an
     * 8B model before the first token); bad ones show up here */
    r = 0;
    for (int i = 0; i < nitems; i++)
        for (int t = items[i].n - items[i].logits; t < items[i].n; t++, r++)
            for (int64_t v = 0; v < V; v++)
                if (!isfinite(d->logits[r * V + v])) {
                    char at[32];
                    for (int j = 0; j < nitems; j++) d->len[items[j].slot] = items[j].pos; /* garbage past here */
                    return jm_fail(err, JM_ERR_FORMAT, "%sthe logits at position %d are not finite: the checkpoint's "
                                   "weights hold NaN or infinity", slot_name(d, items[i].slot, at, sizeof at),
                                   items[i].pos + t);
                }
    *logits = d->logits;
    return JM_OK;
}

jm_status jm_infer(jm_model *m, const int32_t *tokens, int n, int pos, const float **logits, jm_error *err)
{
    const jm_infer_item it = {0, pos, n, tokens, 1};
    return jm_infer_batch(m, &it, 1, logits, err);
}


/* ---- backward ---- */

static jm_status not_trainable(jm_error *err)
{
    return jm_fail(err, JM_ERR_ARG, "this model was opened for inference (weights used in place from the checkpoint "
                   "file); training needs jm_model_load");
}

static jm_status ensure_grads(jm_model *m, jm_error *err)
{
    if (m->mapped) return not_trainable(err);
    if (m->grad_mem) return JM_OK;
    m->grad_mem = aligned_alloc(64, (size_t)m->param_numel * sizeof(float));
    if (!m->grad_mem)
        return jm_fail(err, JM_ERR_NOMEM, "cannot allocate %.2f GB of gradients", m->param_numel * 4.0 / 1e9);
    memset(m->grad_mem, 0, (size_t)m->param_numel * sizeof(float));
    for (int i = 0; i < m->nparams; i++) m->params[i].grad = m->grad_mem + (m->params[i].data - m->param_mem);
    return JM_OK;
}

jm_status jm_zero_grad(jm_model *m, jm_error *err)
{
    jm_status s = ensure_grads(m, err);
    if (!s) memset(m->grad_mem, 0, (size_t)m->param_numel * sizeof(float));
    return s;
}

/* The gradient of a parameter in the grad arena, found by its data pointer. */
static float *grad_of(const jm_model *m, const float *param)
{
    return m->grad_mem + (param - m->param_mem);
}

/* Training has every matrix in the fp32 arena (jm_backward refuses the rest). */
static const float *f32(wview w) { return w.data; }

/* MoE backward: dres holds d loss / d (layer output); on return it holds
 * d loss / d x_mid (residual path plus the norm path into the experts). */
static void moe_backward(jm_model *m, const layer_params *p, layer_acts *a, int64_t N, double aux_w, double zl_w,
                         const uint8_t *valid)
{
    const jm_config *c = &m->cfg;
    const int64_t H = c->hidden_size, F = c->intermediate_size;
    const int E = c->num_experts, k = c->top_k;
    grad_scratch *g = &m->g;

    combine_backward(g->dys, g->dgate, grad_of(m, p->moe_bias), g->dres, a->moe_y, a->moe_pos, a->moe_gate, N, k, H);
    experts_backward(g->dh, grad_of(m, f32(p->moe_out)), g->dys, a->h, f32(p->moe_out), a->moe_off, E, F, H);
    swiglu_backward(g->du, g->dh, a->u, N * k, F);
    dispatch_gather(m->xs, a->b, a->moe_sorted, N * k, k, H, 0);
    experts_backward(g->dxs, grad_of(m, f32(p->moe_in)), g->du, m->xs, f32(p->moe_in), a->moe_off, E, H, 2 * F);
    dispatch_gather_backward(g->dnorm, g->dxs, a->moe_pos, N, k, H, 0, 0);
    router_backward(g->dz, g->dgate, a->moe_z, a->moe_idx, a->moe_gate, valid, N, E, k, aux_w, zl_w);
    matmul_backward(g->dnorm, grad_of(m, p->moe_router), g->dz, a->b, p->moe_router, N, H, E, 1);
    rmsnorm_backward(g->dres, grad_of(m, p->ln2), g->dnorm, a->x_mid, p->ln2, a->rstd2, N, H);
}

/* MoA backward: dres holds d loss / d x_mid; on return d loss / d x (layer input). */
static void moa_backward(jm_model *m, const layer_params *p, layer_acts *a, int B, int T, double aux_w, double zl_w,
                         const uint8_t *valid, const int32_t *pos, const int32_t *kstart)
{
    const jm_config *c = &m->cfg;
    const int64_t N = (int64_t)B * T, H = c->hidden_size, A = (int64_t)c->num_kv_heads * c->head_dim;
    const int E = c->num_experts, k = c->top_k;
    grad_scratch *g = &m->g;

    combine_backward(g->dys, g->dgate, grad_of(m, p->moa_bias), g->dres, a->moa_y, a->moa_pos, a->moa_gate, N, k, H);
    dispatch_gather(m->xs, a->att, a->moa_sorted, N * k, k, A, 1);
    experts_backward(g->dxs, grad_of(m, f32(p->moa_out)), g->dys, m->xs, f32(p->moa_out), a->moa_off, E, A, H);
    dispatch_scatter(g->datt, g->dxs, a->moa_sorted, N * k, A);

    memset(g->dkv, 0, (size_t)N * 2 * A * sizeof(float));
    attention_backward(g->dq, g->dkv, g->datt, a->att, a->att_lse, a->q, a->kv, kstart, m->att_scratch, B, T, k,
                       c->num_kv_heads, c->head_dim);
    rope_backward(g->dq, N, T, pos, k * c->num_kv_heads, c->head_dim, k * A, m->rope_cos, m->rope_sin);
    rope_backward(g->dkv, N, T, pos, c->num_kv_heads, c->head_dim, 2 * A, m->rope_cos, m->rope_sin);

    dispatch_gather(g->dys, g->dq, a->moa_sorted, N * k, k, A, 1);
    dispatch_gather(m->xs, a->a, a->moa_sorted, N * k, k, H, 0);
    experts_backward(g->dxs, grad_of(m, f32(p->moa_in)), g->dys, m->xs, f32(p->moa_in), a->moa_off, E, H, A);
    dispatch_gather_backward(g->dnorm, g->dxs, a->moa_pos, N, k, H, 0, 0);
    matmul_backward(g->dnorm, grad_of(m, f32(p->kv_proj)), g->dkv, a->a, f32(p->kv_proj), N, H, 2 * A, 1);
    router_backward(g->dz, g->dgate, a->moa_z, a->moa_idx, a->moa_gate, valid, N, E, k, aux_w, zl_w);
    matmul_backward(g->dnorm, grad_of(m, p->moa_router), g->dz, a->a, p->moa_router, N, H, E, 1);
    rmsnorm_backward(g->dres, grad_of(m, p->ln1), g->dnorm, a->x, p->ln1, a->rstd1, N, H);
}

jm_status jm_backward(jm_model *m, jm_error *err)
{
    return jm_backward_weighted(m, NULL, 1.0, err);
}

jm_status jm_backward_weighted(jm_model *m, const float *weight, double router_scale, jm_error *err)
{
    return jm_backward_layers(m, NULL, weight, router_scale, err);
}

/* The backward of the last jm_forward_layers, from the cross-entropy (the
 * range ends at the head) or from dx_out (the next stage's d loss / d input),
 * down to the embedding or, mid-model, to d loss / d x_in left in g.dres. */
jm_status jm_backward_layers(jm_model *m, const float *dx_out, const float *weight, double router_scale,
                             jm_error *err)
{
    if (m->mapped) return not_trainable(err);
    if (!m->fwd_valid) return jm_fail(err, JM_ERR_ARG, "jm_backward needs a completed jm_forward first");
    const jm_config *c = &m->cfg;
    const int l0 = m->fwd_l0, l1 = m->fwd_l1;
    if (l1 == c->num_layers && dx_out)
        return jm_fail(err, JM_ERR_ARG, "the last forward (layers [%d, %d)) ended at the loss: its backward starts "
                       "from the cross-entropy, dx_out must be NULL", l0, l1);
    if (l1 < c->num_layers && !dx_out)
        return jm_fail(err, JM_ERR_ARG, "the last forward (layers [%d, %d)) stopped before the head: dx_out must hold "
                       "d loss / d (output of layer %d)", l0, l1, l1 - 1);
    jm_status s = ensure_grads(m, err);
    if (s) return s;
    const int B = m->B, T = m->T;
    const int64_t N = (int64_t)B * T, H = c->hidden_size, V = c->vocab_size;
    grad_scratch *g = &m->g;
    m->fwd_valid = 0; /* the logits become their gradient below */

    if (l1 == c->num_layers) {
        /* d loss / d logits, in place; then through the lm_head and the final norm */
        float scale = m->loss_count ? 1.0f / (float)m->loss_count : 0.0f;
        cross_entropy_backward(m->logits, m->logits, m->targets, weight, N, V, scale);
        matmul_backward(g->dnorm, grad_of(m, f32(m->lm_head)), m->logits, m->hf, f32(m->lm_head), N, H, V, 0);
        memset(g->dres, 0, (size_t)N * H * sizeof(float));
        rmsnorm_backward(g->dres, grad_of(m, m->norm), g->dnorm, m->x_out, m->norm, m->rstdf, N, H);
        if (m->on_done) m->on_done(m->on_done_ctx, c->num_layers);
    } else {
        memcpy(g->dres, dx_out, (size_t)N * H * sizeof *dx_out);
    }

    const double aux_w = c->aux_loss_coef * router_scale, zl_w = c->z_loss_coef * router_scale;
    const uint8_t *valid = m->packed ? m->valid : NULL;
    const int32_t *pos = m->packed ? m->pos : NULL, *kstart = m->packed ? m->kstart : NULL;
    for (int l = l1 - 1; l >= l0; l--) {
        moe_backward(m, &m->lp[l], &m->la[l], N, aux_w, zl_w, valid);
        moa_backward(m, &m->lp[l], &m->la[l], B, T, aux_w, zl_w, valid, pos, kstart);
        if (m->on_done) m->on_done(m->on_done_ctx, l);
    }
    if (l0 == 0) {
        embedding_backward(grad_of(m, f32(m->embed)), g->dres, m->tokens, N, H);
        if (m->on_done) m->on_done(m->on_done_ctx, -1);
    }
    m->dx_in_valid = l0 > 0;
    return JM_OK;
}

/* ---- pipeline stages ----
 * Pipeline-parallel training gives each stage a contiguous range of layers
 * (jm_balance_stages) and runs jm_forward_layers / jm_backward_layers on it,
 * one handle per micro-batch in flight (jm_model_share), all adding into one
 * gradient arena; the optimizer shards work on flat arena offsets. */

jm_status jm_model_share(jm_model *m, jm_model **out, jm_error *err)
{
    *out = NULL;
    if (m->mapped) return not_trainable(err);
    jm_status s = ensure_grads(m, err); /* first: every handle must add into this one arena */
    if (s) return s;
    jm_model *h = calloc(1, sizeof *h);
    if (!h) return jm_fail(err, JM_ERR_NOMEM, "cannot allocate a model handle");
    h->cfg = m->cfg;
    h->nparams = m->nparams;
    h->params = m->params; /* .data and .grad already point into the shared arenas */
    h->param_mem = m->param_mem;
    h->param_numel = m->param_numel;
    h->grad_mem = m->grad_mem;
    h->lp = m->lp;
    h->embed = m->embed;
    h->lm_head = m->lm_head;
    h->norm = m->norm;
    h->slot = m->slot;
    h->kern = m->kern;
    h->owner = m->owner ? m->owner : m;
    *out = h;
    return JM_OK;
}

const float *jm_layers_output(const jm_model *m)
{
    return m->fwd_l1 > 0 && m->fwd_l1 < m->cfg.num_layers ? m->x_out : NULL;
}
int64_t jm_model_batch_tokens(const jm_model *m) { return (int64_t)m->B * m->T; }

void jm_model_on_grads_done(jm_model *m, jm_grads_done_fn fn, void *ctx)
{
    m->on_done = fn;
    m->on_done_ctx = ctx;
}
const float *jm_layers_input_grad(const jm_model *m) { return m->dx_in_valid ? m->g.dres : NULL; }

int64_t jm_param_offset(const jm_model *m, int i)
{
    if (i < 0 || i > m->nparams) return -1;
    int64_t off = 0;
    for (int j = 0; j < i; j++) off += padded(m->params[j].numel);
    return off;
}

/* Table order is embed, layer 0 .. L-1 (LAYER_PARAMS each), norm, lm_head:
 * a stage's parameters are one run of it, and so one run of the arena. */
void jm_stage_params(const jm_model *m, int l0, int l1, int64_t *first, int64_t *end)
{
    const int L = m->cfg.num_layers;
    *first = *end = 0;
    if (l0 < 0 || l1 > L || l0 >= l1) return;
    *first = jm_param_offset(m, l0 == 0 ? 0 : 1 + LAYER_PARAMS * l0);
    *end = jm_param_offset(m, l1 == L ? m->nparams : 1 + LAYER_PARAMS * l1);
}

const float *jm_param_arena(const jm_model *m, int64_t *numel)
{
    *numel = m->mapped ? 0 : m->param_numel;
    return m->mapped ? NULL : m->param_mem;
}

float *jm_param_arena_mut(jm_model *m, int64_t *numel)
{
    *numel = m->mapped ? 0 : m->param_numel;
    return m->mapped ? NULL : m->param_mem;
}

float *jm_grad_arena(jm_model *m, int64_t *numel)
{
    *numel = m->grad_mem ? m->param_numel : 0;
    return m->grad_mem;
}

/* Forward FLOPs per token: a multiply-add counts 2. Every layer costs the
 * same: projections and experts (k of E active), and attention over the
 * (T+1)/2 keys a causal row sees on average. Norms, routers, the combine and
 * the softmax are small but counted; RoPE is left out. */
void jm_stage_costs(const jm_config *c, int T, double *layer_cost, double *embed_cost, double *head_cost)
{
    const double H = c->hidden_size, V = c->vocab_size, E = c->num_experts, k = c->top_k;
    const double F = c->intermediate_size, A = (double)c->num_kv_heads * c->head_dim;
    const double keys = (T + 1) / 2.0;
    const double norms = 2 * 4 * H, routers = 2 * (2 * H * E), combines = 2 * (2 * k * H + H);
    const double moa = 2 * H * 2 * A      /* kv_proj */
                       + k * 2 * (2 * H * A) /* expert input and output projections */
                       + k * 4 * A * keys;   /* q.k and p.v for each of the k*Hkv query heads */
    const double moe = k * (2 * H * 2 * F + 2 * F * H + 4 * F); /* input, output, SiLU-GLU */
    *layer_cost = norms + routers + combines + moa + moe;
    *embed_cost = H;                      /* a row gathered */
    *head_cost = 4 * H + 2 * V * H + 4 * V; /* final norm, lm_head, softmax and cross-entropy */
}

/* Exact: best[p][l], the least max stage cost of layers [0, l) in p stages,
 * over every place the p-th stage can start. Ties go to the later stages
 * (the last stage's start is the earliest that is optimal): under 1F1B the
 * earlier stages hold more micro-batches' activations. */
jm_status jm_balance_stages(const jm_config *c, int T, int P, int *first_layer, jm_error *err)
{
    const int L = c->num_layers;
    if (P < 1 || P > L)
        return jm_fail(err, JM_ERR_ARG, "%d pipeline stages for %d layers: need 1 <= stages <= num_hidden_layers "
                       "(every stage holds at least one layer)", P, L);
    if (T < 1) return jm_fail(err, JM_ERR_ARG, "sequence length %d: need at least one token", T);
    double layer, embed, head;
    jm_stage_costs(c, T, &layer, &embed, &head);
    double *best = malloc((size_t)(P + 1) * (L + 1) * sizeof *best);
    int *start = malloc((size_t)(P + 1) * (L + 1) * sizeof *start);
    if (!best || !start) {
        free(best);
        free(start);
        return jm_fail(err, JM_ERR_NOMEM, "cannot allocate the stage balancing table");
    }
#define AT(p, l) ((p) * (L + 1) + (l))
    for (int p = 1; p <= P; p++)
        for (int l = p; l <= L; l++) {
            best[AT(p, l)] = INFINITY;
            const int j_end = p == 1 ? 1 : l; /* the first stage starts at layer 0 */
            for (int j = p - 1; j < j_end; j++) {
                double cost = (l - j) * layer + (j == 0 ? embed : 0.0) + (l == L ? head : 0.0);
                double worst = p == 1 ? cost : fmax(best[AT(p - 1, j)], cost);
                if (worst < best[AT(p, l)]) {
                    best[AT(p, l)] = worst;
                    start[AT(p, l)] = j;
                }
            }
        }
    first_layer[P] = L;
    for (int p = P; p >= 1; p--) first_layer[p - 1] = start[AT(p, first_layer[p])];
#undef AT
    free(best);
    free(start);
    return JM_OK;
}

/* ---- inference weights ---- */

jm_status jm_set_kernels(jm_model *m, const char *name, jm_error *err)
{
    const wkernels *k = wkernels_get(name);
    char missing[128];
    if (!k && wkernels_missing(name, missing, sizeof missing) < 0)
        return jm_fail(err, JM_ERR_ARG,
                       "kernels '%s': unknown (use auto, avx512, avx512:stream, avx512:prefetch, avx2, avx2:stream, "
                       "avx2:prefetch or portable)",
                       name);
    if (!k) return jm_fail(err, JM_ERR_ARG, "kernels '%s': this CPU lacks %s", name, missing);
    m->kern = k;
    return JM_OK;
}

void jm_set_read_only_products(jm_model *m) { m->kern = wkernels_read(); }

const char *jm_kernels(const jm_model *m) { return m->kern->name; }

/* View w (rows x C, a stack of matrices of `each` rows) moves into base
 * (carve's two passes: base NULL only sizes), its rows interleaved with
 * their scales inline (ops.h: WILV_INLINE) when `ilv`, it is Q8 or Q4, and
 * its rows split into whole lines and groups: decoding then reads each group
 * as one stream. Interleaving alone (ilv 1), bench/kernels then, one
 * thread, timed in turn (AMD EPYC family 26 model 2, AVX-512): Q4 56-60% ->
 * 70-77% of a plain read, Q8 62-74% -> 74-76%, but BF16 74-85% -> 61-66%
 * (its passes read faster than the int8 ones, and one stream seems to cap
 * what the hardware prefetches), so BF16 stays row-major; with the kernels'
 * page-ahead prefetch, whole 8B decodes in RAM still said so (one thread:
 * 53-58% of the roofline interleaved, 62-65% row-major). So do F32
 * matrices, which prefill multiplies in place with SGEMM, and the embedding
 * table, read by rows. Q8/Q4 files hold them interleaved with scales of
 * their own (quantize.c), which the copy takes inline. */
static void move_view(wview *w, int64_t rows, int64_t each, int64_t C, int ilv, char *base, size_t *off)
{
    if (ilv && wrows_interleave(w->type, each, C)) { /* rows: whole matrices of each, so whole groups */
        const wview to = {w->type, NULL, NULL, WILV_INLINE};
        const size_t bytes = (size_t)wview_bytes(to, rows, C);
        uint8_t *d = carve(base, off, bytes);
        if (!base) return;
        inline_rows(d, *w, rows, C);
        *w = (wview){w->type, d, NULL, WILV_INLINE};
        return;
    }
    const size_t data = (size_t)(rows * wtype_row_bytes(w->type, C));
    const size_t sc = w->scales ? (size_t)(rows * 2 * (C / QBLOCK)) : 0;
    uint8_t *d = carve(base, off, data);
    void *s = carve(base, off, sc);
    if (!base) return;
    if (sc) w->scales = memcpy(s, w->scales, sc);
    w->data = memcpy(d, w->data, data); /* as stored */
}

/* Every matrix view, in one order, for both passes of jm_weights_to_ram. */
static size_t move_views(jm_model *m, char *base)
{
    const jm_config *c = &m->cfg;
    const int64_t H = c->hidden_size, E = c->num_experts, F = c->intermediate_size, V = c->vocab_size;
    const int64_t A = (int64_t)c->num_kv_heads * c->head_dim;
    size_t off = 0;
    const int tied = m->lm_head.data == m->embed.data;
    move_view(&m->embed, V, V, H, 0, base, &off);
    if (tied) m->lm_head = m->embed;
    else move_view(&m->lm_head, V, V, H, 1, base, &off);
    for (int l = 0; l < c->num_layers; l++) {
        layer_params *p = &m->lp[l];
        move_view(&p->kv_proj, 2 * A, 2 * A, H, 1, base, &off);
        move_view(&p->moa_in, E * A, A, H, 1, base, &off);
        move_view(&p->moa_out, E * H, H, A, 1, base, &off);
        move_view(&p->moe_in, E * 2 * F, 2 * F, H, 1, base, &off);
        move_view(&p->moe_out, E * H, H, F, 1, base, &off);
    }
    return off;
}

jm_status jm_weights_to_ram(jm_model *m, jm_error *err)
{
    if (!m->mapped || m->ram || m->owner) return JM_OK; /* only views into a checkpoint's mapping move */
    const size_t bytes = move_views(m, NULL);
    void *ram = alloc_huge(bytes);
    if (!ram) return jm_fail(err, JM_ERR_NOMEM, "cannot allocate %.2f GB for the weights in memory", bytes / 1e9);
    move_views(m, ram);
    m->ram = ram;
    /* The copy read every page of the checkpoint through our mapping; left
     * mapped, they count in our resident set and the kernel reclaims them
     * last (it must unmap each first). The 8B layout's BF16 copy (16.1 GB)
     * on a 24 GB machine, 2 threads: 22.5 GB resident, the first decode
     * step 0.19 s (later ones 0.08), kswapd reclaiming 5.5M pages during
     * the run; released, 16.3 GB, 0.10 s and 2.6M (AMD EPYC family 26 model
     * 2). Nothing of ours reads the mapping now (every view moved; norms,
     * routers and biases were converted at load); whatever would, faults its
     * page back in. */
    st_set_release_pages(&m->map);
    return JM_OK;
}

/* MemAvailable of /proc/meminfo in bytes (free memory and what the kernel
 * can reclaim without swapping, clean page cache among it); -1 where there
 * is no such file. */
static double mem_available_bytes(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return -1;
    char line[256];
    double kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lf kB", &kb) == 1) break;
    fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

/* "auto" copies when the copy leaves a quarter of the available memory for
 * the KV cache, the activations and everyone else. The page cache the copy
 * reads through counts as available: it is clean, and the kernel reclaims it
 * as the copy grows. Why copy at all: the copy is on 2 MB pages, where a
 * mapped checkpoint is on 2 MB pages only as far as the page cache happens
 * to hold it in 2 MB folios (about half of it, often), and the rest costs a
 * page-table entry per 4 KB. On a virtual machine whose kernel samples page
 * accesses (DAMON, clearing each sampled folio's accessed bits: here every
 * 0.5 s, on up to 8192 regions) each cleared 4 KB entry is a trap to the host
 * when it is next read. One thread, the 8B layout's q4 (AMD EPYC family 26
 * model 2): mapped, 82-86% of the roofline just after DAMON started, 33-50%
 * two minutes later; the copy in RAM 60-80% throughout (q8: mapped 15-49%,
 * in RAM 76-80%). */
jm_status jm_weights_place(jm_model *m, const char *where, jm_error *err)
{
    if (!where || (strcmp(where, "auto") && strcmp(where, "map") && strcmp(where, "ram")))
        return jm_fail(err, JM_ERR_ARG, "'%s' is no place for the weights: use auto, map or ram",
                       where ? where : "(null)");
    if (!strcmp(where, "map") || !m->mapped || m->ram || m->owner) return JM_OK;
    if (!strcmp(where, "auto")) {
        const double avail = mem_available_bytes();
        if (avail < 0 || (double)move_views(m, NULL) > 0.75 * avail) return JM_OK;
    }
    return jm_weights_to_ram(m, err);
}

int jm_weights_in_ram(const jm_model *m) { return m->ram != NULL; }


int64_t jm_active_weight_bytes(const jm_model *m)
{
    const jm_config *c = &m->cfg;
    const int64_t H = c->hidden_size, E = c->num_experts, k = c->top_k, F = c->intermediate_size;
    const int64_t A = (int64_t)c->num_kv_heads * c->head_dim, f = sizeof(float);
    int64_t bytes = wview_bytes(m->embed, 1, H) + H * f + wview_bytes(m->lm_head, c->vocab_size, H);
    for (int l = 0; l < c->num_layers; l++) {
        const layer_params *p = &m->lp[l];
        bytes += 4 * H * f + 2 * E * H * f; /* norms, biases, routers */
        bytes += wview_bytes(p->kv_proj, 2 * A, H);
        bytes += k * (wview_bytes(p->moa_in, A, H) + wview_bytes(p->moa_out, H, A));
        bytes += k * (wview_bytes(p->moe_in, 2 * F, H) + wview_bytes(p->moe_out, H, F));
    }
    return bytes;
}

const char *jm_model_weight_type(const jm_model *m)
{
    static const char *const names[] = {"f32", "bf16", "q8", "q4"};
    wtype t = m->lp[0].moe_in.type;
    for (int l = 0; l < m->cfg.num_layers; l++) {
        const layer_params *p = &m->lp[l];
        if (p->kv_proj.type != t || p->moa_in.type != t || p->moa_out.type != t || p->moe_in.type != t ||
            p->moe_out.type != t)
            return "mixed";
    }
    return names[t];
}

/* For quantize.c: parameter i's matrix view (0 for vectors and routers). */
int model_param_view(const jm_model *m, int i, wview *w)
{
    if (i < 0 || i >= m->nparams || !m->slot[i].w) return 0;
    *w = *m->slot[i].w;
    return 1;
}

/* ---- scoring a window through the KV cache (eval, the held-out loss) ---- */


jm_status jm_score_window(jm_model *m, const int32_t *ids, int n, int first, int decode, double *loglik,
                          jm_error *err)
{
    /* predicts ids[first .. n) from what precedes each, in slot 0 */
    const int V = jm_model_config(m)->vocab_size;
    if (first < 1 || first >= n || n - 1 > jm_context(m))
        return jm_fail(err, JM_ERR_ARG, "window of %d tokens scoring from %d (context %d)", n, first, jm_context(m));
    jm_status s = jm_slot_copy(m, 0, 0, 0, err);
    if (s) return s;
    const float *logits;
    if (decode) {
        for (int p = 0; p < n - 1 && !s; p++) {
            const jm_infer_item it = {0, p, 1, ids + p, 1};
            if (!(s = jm_infer_batch(m, &it, 1, &logits, err)) && p + 1 >= first)
                *loglik += log_prob_row(logits, V, ids[p + 1]);
        }
        return s;
    }
    const jm_infer_item it = {0, 0, n - 1, ids, n - first};
    if ((s = jm_infer_batch(m, &it, 1, &logits, err))) return s;
    for (int p = first; p < n; p++) *loglik += log_prob_row(logits + (int64_t)(p - first) * V, V, ids[p]);
    return JM_OK;
}
