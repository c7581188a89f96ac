/* model.h — model internals shared with the rooms above (model.c). */
#ifndef JM_MODEL_H
#define JM_MODEL_H

#include "base/base.h"

struct wview;
/* Parameter i's weight-matrix view as held (0 for norms, biases and routers). */
int model_param_view(const jm_model *m, int i, struct wview *w);

/* ---- pipeline stages (pipeline-parallel training, src/train/) ----
 * A stage runs a contiguous range of layers [l0, l1) of L; the first stage
 * (l0 == 0) also embeds the tokens, the last (l1 == L) also has the final
 * norm, the lm_head and the loss. Run stage by stage, the forwards and
 * backwards do exactly what jm_forward_batch and jm_backward_weighted do for
 * the whole model (which are the range [0, L)). */

/* A second handle on m's weights and gradient arena with activations of its
 * own, for one more micro-batch in flight (1F1B). Both handles' backwards add
 * into the one arena (allocated here if m had none). Freeing the handle frees
 * only its activations: m must outlive every handle shared from it. The
 * handle has the config m had when shared; it cannot decode (jm_set_slots
 * refuses). Refused for models from jm_model_open (weights in the mapping). */
jm_status jm_model_share(jm_model *m, jm_model **out, jm_error *err);

/* Forward of layers [l0, l1) on the batch (every stage gets the whole
 * jm_batch: positions and targets set packing and validity everywhere; the
 * tokens are checked everywhere but embedded only when l0 == 0). x_in
 * (B*T, hidden): the residual stream entering layer l0, NULL iff l0 == 0
 * (then the embedding of the tokens); it is copied. losses->aux_loss/z_loss:
 * the router losses of these layers only (stages sum to the whole model's);
 * loss and count: the cross-entropy when l1 == L, else 0. */
jm_status jm_forward_layers(jm_model *m, const jm_batch *b, int l0, int l1, const float *x_in, jm_losses *losses,
                            jm_error *err);
/* The activation arena of one handle running layers [l0, l1) on B rows of T
 * tokens (jm_activation_bytes is the range [0, L)): only the last stage holds
 * the logits. */
size_t jm_stage_activation_bytes(const jm_config *c, int B, int T, int l0, int l1);
/* After a jm_forward_layers with l1 < L: the residual leaving layer l1-1,
 * (B*T, hidden), until the next forward on this handle; else NULL. */
const float *jm_layers_output(const jm_model *m);
/* The backward of the last jm_forward_layers on this handle, adding the
 * gradients of the parameters its layers use to the arena (jm_backward_weighted).
 * dx_out (B*T, hidden): d loss / d (residual leaving layer l1-1), NULL iff
 * l1 == L (then from the cross-entropy with the per-token weight, NULL = 1/count;
 * weight is read only then). Router losses of [l0, l1) weighted by router_scale.
 * With l0 == 0 it ends in the embedding's gradient. With tied embeddings the
 * last stage's lm_head gradient goes to the embedding's slot. */
jm_status jm_backward_layers(jm_model *m, const float *dx_out, const float *weight, double router_scale,
                             jm_error *err);
/* After a jm_backward_layers with l0 > 0: d loss / d x_in, (B*T, hidden),
 * until the next forward on this handle; else NULL. */
const float *jm_layers_input_grad(const jm_model *m);
/* During a jm_backward_layers on this handle, fn(ctx, part) as each part's
 * gradients for this backward are complete: part = L after the head (final
 * norm and lm_head), then each layer from the last down, then -1 after the
 * embedding (data parallelism starts reducing them while the rest runs).
 * fn NULL: none. */
typedef void (*jm_grads_done_fn)(void *ctx, int part);
void jm_model_on_grads_done(jm_model *m, jm_grads_done_fn fn, void *ctx);
/* B*T of the handle's last forward (the rows of its output and input gradient). */
int64_t jm_model_batch_tokens(const jm_model *m);

/* The part of the parameter arena (float offsets into it, and into the
 * gradient arena, laid out the same) that stage [l0, l1) owns: the embedding
 * if l0 == 0, its layers, the final norm and an untied lm_head if l1 == L,
 * with the alignment padding, so consecutive stages tile [0, numel) exactly.
 * Both 0 for a range outside [0, L). With tied embeddings the last stage also
 * reads and adds to the embedding, which stage 0 owns. */
void jm_stage_params(const jm_model *m, int l0, int l1, int64_t *first, int64_t *end);
/* Parameter i's offset in the arena (i == jm_model_num_params: its end), as
 * jm_model_create and jm_model_load carve it; -1 outside. */
int64_t jm_param_offset(const jm_model *m, int i);
/* The arenas and their length in floats: NULL (and 0) for a model from
 * jm_model_open; the gradients NULL until the first backward, jm_zero_grad
 * or jm_model_share. */
const float *jm_param_arena(const jm_model *m, int64_t *numel);
float *jm_param_arena_mut(jm_model *m, int64_t *numel);
float *jm_grad_arena(jm_model *m, int64_t *numel);

/* Forward FLOPs per token of one layer (rows of T tokens), of the embedding
 * and of the head (final norm, lm_head, loss), for balancing stages. */
void jm_stage_costs(const jm_config *c, int T, double *layer_cost, double *embed_cost, double *head_cost);
/* Contiguous stages for P-way pipelining minimising the largest stage cost
 * (the embedding on stage 0, the head on stage P-1): stage s runs layers
 * [first_layer[s], first_layer[s+1]), first_layer has P+1 entries, each stage
 * at least one layer (P <= L). */
jm_status jm_balance_stages(const jm_config *c, int T, int P, int *first_layer, jm_error *err);

#endif
