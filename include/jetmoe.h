/* jetmoe.h — the one public header of libjetmoe.
 *
 * JetMoE: a decoder-only transformer whose every layer has a Mixture of
 * Attention heads (MoA) and a Mixture of MLP experts (MoE). The exact math
 * is ../shared/docs/jetmoe-spec.md; this header is the library's contract.
 *
 * Conventions: every fallible call returns jm_status and, on failure, fills
 * the caller's jm_error with one line that names the file, tensor or field.
 * Handles are opaque and owned by the caller (free with the matching _free).
 * There is no global mutable state. */
#ifndef JETMOE_H
#define JETMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define JM_VERSION "0.1.0"

typedef enum {
    JM_OK = 0,
    JM_ERR_IO,      /* open/read/write/mmap failed */
    JM_ERR_FORMAT,  /* malformed file (safetensors, JSON, ...) */
    JM_ERR_CONFIG,  /* a config field is missing, mistyped or out of range */
    JM_ERR_SHAPE,   /* a tensor is missing, extra or has the wrong shape */
    JM_ERR_ARG,     /* a bad argument from the caller (e.g. token id out of range) */
    JM_ERR_NOMEM,   /* allocation failed or a size overflowed */
} jm_status;

/* One line, NUL-terminated. Control characters and bytes that are not UTF-8
 * (from file content and paths) are shown as \xNN; a message longer than
 * msg loses its middle ("...") so that its end, the cause, survives. */
typedef struct {
    char msg[1024];
} jm_error;

const char *jm_status_name(jm_status s);
/* Fills err (may be NULL) with a printf-style message, shown as above, and
 * returns s: for callers that report their own errors the library's way. */
jm_status jm_fail(jm_error *err, jm_status s, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ---- configuration (HF config.json) ---------------------------------- */

typedef struct {
    int vocab_size;          /* HF: vocab_size */
    int hidden_size;         /* HF: hidden_size (H) */
    int num_layers;          /* HF: num_hidden_layers (L) */
    int num_kv_heads;        /* HF: num_key_value_heads (Hkv) */
    int head_dim;            /* HF: kv_channels, alias head_dim (D) */
    int intermediate_size;   /* HF: intermediate_size; authors: ffn_hidden_size (F) */
    int num_experts;         /* HF: num_local_experts; authors: moe_num_experts (E) */
    int top_k;               /* HF: num_experts_per_tok; authors: moe_top_k (k) */
    int max_position_embeddings;
    int tie_word_embeddings; /* 0 or 1 */
    int bos_token_id, eos_token_id;
    double rope_theta;
    double rms_norm_eps;
    double aux_loss_coef;    /* HF: aux_loss_coef */
    double z_loss_coef;      /* authors' recipe: 0.001 (not an HF field; kept in our config.json) */
    double initializer_range;
    char activation_function[16]; /* only "silu" is supported */
} jm_config;

/* JetMoE-8B's values: the defaults for any field config.json leaves out. */
void jm_config_default(jm_config *c);
jm_status jm_config_validate(const jm_config *c, jm_error *err);
jm_status jm_config_load(const char *path, jm_config *c, jm_error *err);
jm_status jm_config_parse(const char *json, size_t len, const char *name, jm_config *c, jm_error *err);
/* Writes the HF spelling, atomically. */
jm_status jm_config_save(const char *path, const jm_config *c, jm_error *err);

/* config.json's architectures as jetmoe writes it: transformers' class name
 * (what vLLM's registry looks up). The authors' "JetMoEForCausalLM" is read too. */
#define JM_ARCHITECTURE "JetMoeForCausalLM"
/* The transformers_version jetmoe's generation_config.json says it follows. */
#define JM_TRANSFORMERS_VERSION "4.47.0"

/* generation_config.json: the sampling defaults a checkpoint carries (HF
 * names). Each has_* is 1 when the file gives the field. */
typedef struct {
    int found; /* the file exists */
    /* do_sample false: greedy. Absent, the other fields apply as given (transformers
     * would decode greedily and ignore them: its do_sample defaults to false). */
    int has_do_sample, do_sample;
    int has_temperature, has_top_p, has_top_k, has_repetition_penalty, has_max_new_tokens;
    double temperature, top_p, repetition_penalty;
    int top_k, max_new_tokens;
} jm_generation_config;
/* Reads DIR/generation_config.json, every sampling field range-checked (an
 * error names the file and the field); no file: found = 0 and JM_OK. */
jm_status jm_generation_config_load(const char *dir, jm_generation_config *g, jm_error *err);
/* Writes generation_config.json as transformers' save_pretrained does for a
 * model config (bos/eos ids, no sampling defaults), atomically. */
jm_status jm_generation_config_save(const char *path, const jm_config *c, jm_error *err);

/* Bytes of the training activation arena (forward activations kept for the
 * backward, and its scratch) for B rows of T tokens: what jm_forward_batch
 * allocates. With 4 bytes per parameter each for the weights and gradients
 * and 8 for AdamW's moments, the memory a full fine-tune needs. */
size_t jm_activation_bytes(const jm_config *c, int B, int T);

/* Parameter counts: total, and active per token (k of E experts in both blocks). */
int64_t jm_config_num_params(const jm_config *c);
int64_t jm_config_active_params(const jm_config *c);

/* ---- model ----------------------------------------------------------- */

typedef struct jm_model jm_model;

/* The model directory (config.json + *.safetensors) a user means by path: the
 * directory itself; a training run or its checkpoints/ folder (its newest
 * checkpoint, named by checkpoints/latest, which must say "step_N"); or the
 * checkpoints/latest file. A file such as model.safetensors or config.json is
 * an error that says a directory is expected. The loaders below resolve
 * their dir argument this way too. */
jm_status jm_checkpoint_resolve(const char *path, char *out, size_t cap, jm_error *err);

/* Loads an HF checkpoint directory: config.json plus model.safetensors or
 * model.safetensors.index.json + shards. F32/BF16/F16 are converted to fp32. */
jm_status jm_model_load(const char *dir, jm_model **out, jm_error *err);
/* Opens a checkpoint for inference (generate, chat, eval): the weight
 * matrices are used in place from the file mapping - F32, BF16, or the Q8/Q4
 * blocks jm_quantize writes - so an 8B model needs no fp32 copy. Norms,
 * biases and routers (small, and the routers decide everything downstream)
 * become fp32; an F16 matrix is converted to fp32. Such a model runs
 * jm_forward, jm_infer and jm_generate; jm_backward refuses it. */
jm_status jm_model_open(const char *dir, jm_model **out, jm_error *err);
/* A fresh model initialised as the spec says (N(0, initializer_range), norms 1, biases 0). */
jm_status jm_model_create(const jm_config *c, uint64_t seed, jm_model **out, jm_error *err);
/* Writes config.json + model.safetensors (F32) into dir, atomically. */
jm_status jm_model_save(const jm_model *m, const char *dir, jm_error *err);
void jm_model_free(jm_model *m);
const jm_config *jm_model_config(const jm_model *m);

/* The parameter table, in checkpoint order, with HF names. */
typedef struct {
    char name[96];
    int ndim;
    int64_t shape[3];
    int64_t numel;
    float *data;             /* points into the model's parameter arena */
    float *grad;             /* its gradient (NULL until the first jm_backward / jm_zero_grad) */
} jm_param;
int jm_model_num_params(const jm_model *m);
const jm_param *jm_model_param(const jm_model *m, int i);

/* A checkpoint's tensors as stored, for `jetmoe info`. */
typedef struct {
    char name[96];
    char dtype[8];     /* "F32", "BF16", ... */
    int ndim;
    int64_t shape[8];
    char file[256];    /* the (shard) file that holds it */
} jm_tensor_info;

/* Validates a checkpoint directory against its config.json — every tensor
 * present, known and of the right shape and a float dtype — without loading
 * the weights. *tensors (malloc'd, caller frees) lists what is stored. */
jm_status jm_checkpoint_inspect(const char *dir, jm_config *c, jm_tensor_info **tensors, int *n, jm_error *err);

/* Writes named tensors to a safetensors file, atomically. dtype: "F32" or "I32". */
typedef struct {
    const char *name;
    const char *dtype;
    int ndim;
    int64_t shape[8];
    const void *data;
} jm_tensor_out;
jm_status jm_save_tensors(const char *path, const jm_tensor_out *t, int n, jm_error *err);

/* ---- outputs (README: What writes where) ------------------------------ */

/* No command replaces or removes what it did not write. inputs are the paths
 * a command reads (files, or directories standing for every file under them):
 * none is ever replaced or removed, even with overwrite. */

/* A file the user named (forward --dump). Nothing at path: it is created. A
 * regular file: replaced, atomically, only with overwrite. A FIFO or a
 * character device (/dev/null): written through, never renamed over. A
 * symlink: followed to the file it names, which is judged the same way and
 * written atomically where it is (the link stays a link; a link to nothing is
 * refused). A directory or any other node: refused. target receives the path
 * to write: path, or the file the link names. */
jm_status jm_output_file(const char *path, const char *const *inputs, int ninputs, int overwrite, char *target,
                         size_t cap, jm_error *err);

/* A model directory written whole (init, quantize). jm_output_dir_open checks
 * dir: absent or empty, or, with overwrite, a checkpoint jetmoe wrote
 * (config.json and the weights, and nothing but the names jetmoe writes into a
 * model directory); never a directory that is, or holds, an input. It makes a
 * fresh directory, jm_output_dir_stage(o), to write the model into: beside
 * dir, or inside it when dir is empty. Commit puts the model in place: a new
 * dir by one rename; an empty one by moving the files in, config.json last; a
 * checkpoint by exchanging the two directories in one rename, then removing
 * the old files. A reader sees the old model or the new one, never a mix;
 * abort removes the stage. Both free o. */
typedef struct jm_output_dir jm_output_dir;
jm_status jm_output_dir_open(const char *dir, const char *const *inputs, int ninputs, int overwrite,
                             jm_output_dir **out, jm_error *err);
const char *jm_output_dir_stage(const jm_output_dir *o);
jm_status jm_output_dir_commit(jm_output_dir *o, jm_error *err);
void jm_output_dir_abort(jm_output_dir *o);

/* ---- forward --------------------------------------------------------- */

typedef struct {
    double loss;      /* mean cross-entropy over predicted positions */
    double aux_loss;  /* sum over the 2L routers of the switch load-balancing loss */
    double z_loss;    /* sum over the 2L routers of mean (logsumexp z)^2 */
    int64_t count;    /* predicted positions the loss averages over */
} jm_losses;

/* Runs B sequences of T tokens each (tokens is B*T ids, row-major), each
 * sequence starting at position 0. losses (optional) receives the three
 * training losses; with T == 1 there is nothing to predict and loss is 0.
 * Activation memory is planned once per (B, T) and reused. */
jm_status jm_forward(jm_model *m, const int32_t *tokens, int B, int T,
                     jm_losses *losses, jm_error *err);

/* After jm_forward: the logits, B*T rows of vocab floats, valid until the
 * next forward or jm_model_free. */
const float *jm_logits(const jm_model *m);

/* A batch for fine-tuning: B rows of T tokens, each row holding one sequence
 * or several packed one after another, with padding anywhere after them.
 *   positions (B*T, or NULL: every row is one sequence at 0 .. T-1): each
 *     token's position in its sequence. 0 starts a new sequence, which sees
 *     nothing before it (attention and RoPE restart: packing is exact); a
 *     token that continues one has the previous token's position + 1; -1 is
 *     padding, which no loss and no router statistic counts.
 *   targets (B*T, or NULL: each token's next token in its sequence): the id
 *     the logits at t predict, -1 for none (prompt tokens, a sequence's last).
 * Losses: loss is the mean cross-entropy over the positions with a target;
 * aux_loss and z_loss count every token that is not padding. */
typedef struct {
    int B, T;
    const int32_t *tokens;
    const int32_t *positions;
    const int32_t *targets;
} jm_batch;
jm_status jm_forward_batch(jm_model *m, const jm_batch *b, jm_losses *losses, jm_error *err);
/* After a forward: log p(target) at each of the B*T positions (0 where there
 * is no target), valid until the next forward. DPO sums these per completion. */
const float *jm_token_logprobs(const jm_model *m);

/* Gradients of loss_total = loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss
 * (coefficients from the config) for the batch of the last jm_forward, ADDED
 * to each jm_param.grad (so micro-batches accumulate; jm_zero_grad clears).
 * Consumes the forward's activations: jm_logits is invalid afterwards. */
jm_status jm_backward(jm_model *m, jm_error *err);
/* The same for objectives built on the token log-probabilities (DPO): the
 * gradient of  sum_t -weight[t] * log p(target_t)  + the router losses, with
 * weight (B*T floats) chosen by the caller; jm_backward is weight = 1/count.
 * router_scale multiplies the aux and z coefficients (1 = the config's). */
jm_status jm_backward_weighted(jm_model *m, const float *weight, double router_scale, jm_error *err);
jm_status jm_zero_grad(jm_model *m, jm_error *err);

/* Decoding with a KV cache: one batched step for every caller (generate,
 * chat, eval --decode, distillation; later the server).
 *
 * The cache holds `slots` independent sequences, each of up to ctx positions:
 * K (after RoPE) and V, 2*Hkv*D floats per token per layer, and the ids they
 * came from. jm_set_slots sizes it and empties every slot; until it is called
 * the first decoding call makes one slot of max_position_embeddings.
 *
 * jm_infer_batch advances any set of slots in one call. Each item is one
 * slot's new tokens at consecutive positions pos .. pos+n-1 (pos <= the
 * slot's cached length: a smaller pos rewinds it, keeping the prefix); a slot
 * appears in at most one item. All the call's tokens go through each layer
 * together - the expert products see them as one batch, so each weight matrix
 * is read once per call however many sequences advance - while every token
 * gets its own position's RoPE and attends to its own slot's cache only. A
 * prompt is an item of many tokens (batched GEMMs), and may ride beside other
 * slots' one-token decode steps. *logits receives, item after item, the
 * logits (vocab floats each) of the last `logits` tokens of each item, valid
 * until the next call: 1 when decoding, 0 for none (a prefill whose
 * continuation comes later), n to score every token of the item.
 * A token's logits are those of its sequence decoded alone, up to rounding:
 * BLAS sums a product in another order for another row count (about 1e-6
 * relative), and a Q8/Q4 matrix given more than 8 rows in one call (a
 * prefill, or more than 8 sequences on one expert) multiplies fp32
 * activations by its dequantized weights, where up to 8 rows take the int8
 * kernels (activations quantized per block of 32: about 0.5% per product). */
typedef struct {
    int slot;              /* [0, jm_slots) */
    int pos;               /* position of tokens[0]: at most the slot's cached length */
    int n;                 /* tokens, >= 1 */
    const int32_t *tokens;
    int logits;            /* logits for the item's last `logits` tokens: [0, n] */
} jm_infer_item;
jm_status jm_set_slots(jm_model *m, int slots, int ctx, jm_error *err);
jm_status jm_infer_batch(jm_model *m, const jm_infer_item *items, int nitems, const float **logits, jm_error *err);
/* Makes slot dst hold the first n positions of slot src (n <= its cached
 * length; dst == src truncates): K samples of one prompt prefill it once. */
jm_status jm_slot_copy(jm_model *m, int src, int dst, int n, jm_error *err);
int jm_slots(const jm_model *m);               /* 0 before the cache exists */
int jm_slot_len(const jm_model *m, int slot);  /* cached positions of slot */
const int32_t *jm_slot_tokens(const jm_model *m, int slot); /* the jm_slot_len ids cached in slot */
int jm_context(const jm_model *m);             /* positions per slot */
/* One sequence, slot 0: jm_infer runs n tokens at positions pos .. pos+n-1
 * and gives the last one's logits; jm_set_context(m, ctx) is
 * jm_set_slots(m, 1, ctx); jm_cached is slot 0's length. */
jm_status jm_infer(jm_model *m, const int32_t *tokens, int n, int pos, const float **logits, jm_error *err);
jm_status jm_set_context(jm_model *m, int ctx, jm_error *err);
/* The KV cache's element type: "f32" (the default; decoding equals the
 * forward pass to fp32 rounding) or "bf16" (half the bytes, so half the
 * cache traffic of a decode step; keys and values rounded once when stored).
 * Changing it empties the cache. */
jm_status jm_set_kv_cache(jm_model *m, const char *type, jm_error *err);
const char *jm_kv_cache(const jm_model *m);
int jm_cached(const jm_model *m);

/* Bytes of weights one decoded token reads, at the dtypes held: its
 * embedding row; per layer both norms, both routers, the shared KV projection,
 * k attention experts' query and output projections, k MLP experts, the two
 * biases; the final norm and the lm_head. The numerator of the decode roofline. */
int64_t jm_active_weight_bytes(const jm_model *m);
/* The dtype of the expert matrices: "f32", "bf16", "q8", "q4" (or "mixed"). */
const char *jm_model_weight_type(const jm_model *m);
/* Kernels of the decode products: "auto" (the best this CPU runs), "avx512"
 * (F/BW/VL + VNNI), "avx2" (+FMA+F16C), each in this CPU's tuning
 * (":stream" on AMD family 0x19, Zen 3 and 4; ":prefetch" elsewhere; either
 * can be named, as "avx2:stream"), or
 * "portable" (plain C, any CPU). A set this CPU cannot run is an error naming
 * the features it lacks. jm_kernels names the set in use, tuning and all. */
jm_status jm_set_kernels(jm_model *m, const char *name, jm_error *err);
/* For benchmarks only: decode products replaced by plain reads of the bytes
 * they would read (jm_kernels then says "read"). A step then costs what its
 * memory traffic costs; the logits are no longer the model's. Undone by
 * jm_set_kernels. */
void jm_set_read_only_products(jm_model *m);
/* Copies a model opened in place (jm_model_open) into anonymous memory in
 * 2 MB pages (transparent huge pages, where the system allows them), and uses
 * that copy: decoding streams the weights up to 2x faster on machines where
 * page walks are costly, at the price of the copy's memory and time. The
 * checkpoint's mapped pages are then let go (they stay in the page cache,
 * out of the process's resident set). */
jm_status jm_weights_to_ram(jm_model *m, jm_error *err);
/* Where decoding reads the weights: "map" (in place), "ram" (jm_weights_to_ram)
 * or "auto" (the copy when it takes at most 3/4 of the memory available now;
 * in place otherwise). Bad names are an error; a model not opened in place
 * stays as it is. jm_weights_in_ram: whether the model reads a copy. */
jm_status jm_weights_place(jm_model *m, const char *where, jm_error *err);
int jm_weights_in_ram(const jm_model *m);
const char *jm_kernels(const jm_model *m);

/* Writes a quantized copy of checkpoint dir as out_dir (jm_output_dir_open's
 * rule: an existing out_dir is replaced only with overwrite): every weight matrix
 * whose input width is a multiple of 32 (all of JetMoE-8B's) as blocks of 32
 * values with one F16 scale each - int8 for bits = 8 (tensor dtype I8), int4
 * for bits = 4 (two per byte, U8) - next to "<name>_scale"; routers, norms
 * and biases keep their dtype. Sharded (<= 2 GB per file, with an index) and
 * atomic per file; config.json and tokenizer files are copied. Reads through
 * jm_model_open, so an 8B BF16 input needs no fp32 copy. */
jm_status jm_quantize(const char *dir, const char *out_dir, int bits, int overwrite, jm_error *err);

/* After jm_forward: the experts each router chose, in router order.
 * block 0 = MoA, 1 = MoE. Returns a pointer to B*T*k ints (valid until the
 * next forward), or NULL when the arguments are out of range. */
const int32_t *jm_routing(const jm_model *m, int layer, int block);
/* The number of ints jm_routing points to (B*T*k of the last forward). */
int64_t jm_routing_count(const jm_model *m);

/* Gives a model another config with the same parameter shapes: training
 * settings (aux_loss_coef, z_loss_coef), the context or rope_theta. A field
 * that would change a shape is an error naming it. */
jm_status jm_model_reconfigure(jm_model *m, const jm_config *c, jm_error *err);

/* ---- generation ------------------------------------------------------ */

typedef struct {
    double temperature;  /* [0, 100]; 0 = greedy */
    int top_k;           /* 0 = off */
    double top_p;        /* (0, 1]; 1 = off */
    uint64_t seed;
    int max_new;         /* tokens to generate at most */
    int greedy;          /* argmax, ignores the rest */
    double repetition_penalty; /* > 0; 1 (or 0, left unset) = off. HF / llama.cpp semantics */
    int repeat_last_n;   /* the penalty's window: the last N tokens, prompt included; -1 = all, 0 = off */
} jm_sample_opts;
jm_status jm_sample_validate(const jm_sample_opts *o, jm_error *err);
/* One token from a row of V logits; *rng is the caller's generator state,
 * scratch holds V (float, int32) pairs. The repetition penalty is not applied
 * here: pass the logits through jm_apply_repetition_penalty first. */
int32_t jm_sample(const float *logits, int V, const jm_sample_opts *o, uint64_t *rng, void *scratch);
/* The repetition penalty (HF RepetitionPenaltyLogitsProcessor, llama.cpp
 * repeat_penalty) of o, for the token after seq[0..n) (prompt + generated):
 * returns logits itself when the penalty is off, else out (V floats, not
 * aliasing logits) holding the logits with each distinct id among the last
 * o->repeat_last_n of seq penalised once: a positive logit divided by
 * o->repetition_penalty, a negative one multiplied (ids outside [0, V) are
 * ignored). */
const float *jm_apply_repetition_penalty(const float *logits, float *out, int V, const int32_t *seq, int n,
                                         const jm_sample_opts *o);
/* Generates after the prompt until EOS, max_new tokens, or on_token (called
 * with each new id; may be NULL) returns non-zero. out holds max_new ids.
 * Applies the repetition penalty over the last repeat_last_n tokens. One
 * sequence of jm_generate_batch (below), its stream seeded by o->seed. */
jm_status jm_generate(jm_model *m, const int32_t *prompt, int n_prompt, const jm_sample_opts *o, int32_t *out,
                      int *n_out, int (*on_token)(void *ctx, int32_t id), void *ctx, jm_error *err);

/* Many generations at once, on the model's slots (jm_set_slots; one slot of
 * the whole context when it has none): up to jm_slots sequences decode
 * together, one jm_infer_batch step for all of them, and a slot whose
 * sequence ends takes the next waiting one (continuous batching). A sequence
 * starts from the longest prefix of its prompt that some slot holds
 * (jm_slot_copy): K samples of one prompt prefill it once. Each sequence
 * samples from its own random stream, seeded by its seed (o->seed and
 * o->max_new are not used), so what it generates does not depend on which
 * sequences run beside it or how many slots there are (up to the summation
 * order of jm_infer_batch). Each ends at EOS, its max_new tokens, or when
 * on_token (called with its index and each new id; may be NULL) returns
 * non-zero. The repetition penalty applies per sequence. */
typedef struct {
    const int32_t *prompt;
    int n_prompt;        /* >= 1; n_prompt + max_new <= jm_context */
    int max_new;         /* tokens at most (out holds them); 0 = o->max_new */
    uint64_t seed;       /* this sequence's random stream: jm_seed_stream(run seed, i) */
    int32_t *out;
    int n_out;           /* set: tokens generated, the EOS included when it came */
} jm_gen_seq;
jm_status jm_generate_batch(jm_model *m, jm_gen_seq *seqs, int n, const jm_sample_opts *o,
                            int (*on_token)(void *ctx, int seq, int32_t id), void *ctx, jm_error *err);
/* Continuous batching, a step at a time (jm_generate_batch runs on it; so
 * does the server): the model's slots each hold a running sequence or are
 * free. jm_batcher_start puts a prompt in a free slot - the longest prefix any
 * slot holds is copied, the rest prefilled at once - and each
 * jm_batcher_step advances every running sequence by one sampled token in one
 * jm_infer_batch call, so each weight is read once per step for all of them.
 * on_token sees each new token with whether the sequence ends there (EOS, or
 * its max_new-th token); returning nonzero ends it too (a stop string, a
 * client gone). A sequence's tokens are those it would get alone (rows are
 * computed independently up to 8 tokens a step: WSMALL_N). */
typedef enum { JM_GEN_MORE, JM_GEN_EOS, JM_GEN_LENGTH } jm_gen_end;
typedef struct jm_batcher jm_batcher;
jm_status jm_batcher_new(jm_model *m, jm_batcher **out, jm_error *err);
void jm_batcher_free(jm_batcher *b);
int jm_batcher_free_slot(const jm_batcher *b); /* a free slot, or -1 */
int jm_batcher_running(const jm_batcher *b);
jm_status jm_batcher_start(jm_batcher *b, int slot, const int32_t *prompt, int n_prompt, const jm_sample_opts *o,
                           uint64_t seed, int max_new, jm_error *err);
jm_status jm_batcher_step(jm_batcher *b, int (*on_token)(void *ctx, int slot, int32_t id, jm_gen_end end),
                          void *ctx, jm_error *err);
void jm_batcher_stop(jm_batcher *b, int slot); /* ends slot's sequence now; its cache stays for prefix reuse */
/* The seed of stream i of a run seeded with seed (both mixed by splitmix64). */
uint64_t jm_seed_stream(uint64_t seed, uint64_t i);

/* The log-likelihood of continuations, on the same slots and the same way:
 * for each sequence, logp = the sum over t in [n_prompt, n) of
 * log p(ids[t] | ids[0..t)). A prompt a slot holds whole is not recomputed:
 * each prompt is prefilled when its sequence takes a slot, so sequences
 * given one after another with the same prompt (a question's choices) read
 * it from the cache. Only whole prompts are reused, so that each is prefilled
 * in the same call whatever ran before: with one slot, a score is bit for bit
 * the one its sequence gets alone. */
typedef struct {
    const int32_t *ids;
    int n, n_prompt;     /* 1 <= n_prompt < n, n - 1 <= jm_context */
    double logp;         /* set */
} jm_score_seq;
jm_status jm_score_batch(jm_model *m, jm_score_seq *seqs, int n, jm_error *err);

/* Streaming the text of a generation. Each pushed id is appended and the
 * sequence decoded again; text and len receive the new bytes that can no longer
 * change (valid until the next call): a character whose bytes are still
 * arriving, and a tail that may begin the stop string, are held back. Push
 * returns 1 once the continuation holds one of the nstop stop strings (the
 * bytes before the earliest have been given; none after), 0 to go on, -1 on
 * error. Flush gives what
 * was held back at the end. The prompt's own text is not streamed. */
typedef struct jm_text_stream jm_text_stream;
typedef struct jm_tokenizer jm_tokenizer;
jm_status jm_text_stream_new(const jm_tokenizer *t, const int32_t *prompt, size_t n_prompt, const char *const *stop,
                             int nstop, jm_text_stream **out, jm_error *err);
int jm_text_stream_push(jm_text_stream *s, int32_t id, const char **text, size_t *len, jm_error *err);
void jm_text_stream_flush(jm_text_stream *s, const char **text, size_t *len);
void jm_text_stream_free(jm_text_stream *s);

/* ---- evaluation tasks (README: Evaluation) ---------------------------- */

/* A task file (JSONL) read into examples, each rendered the way
 * lm-evaluation-harness renders that data set. The layout is told by the
 * first record's fields and every record must have it:
 *   "mc"          {"context", "choices": [...], "gold"}: context + choice as written
 *   "gen"         {"prompt", "answer"}: target " " + answer, stop "\n\n", group 1 = the generation trimmed
 *   "arc"         ARC (AI2's {"question": {"stem", "choices"}} or HF's {"question", "choices": {"text", "label"}}, "answerKey")
 *   "hellaswag"   {"activity_label", "ctx_a", "ctx_b", "endings", "label"}
 *   "mmlu"        {"question", "subject", "choices", "answer"}
 *   "winogrande"  {"sentence", "option1", "option2", "answer"}
 *   "piqa"        {"goal", "sol1", "sol2", "label"}
 *   "truthfulqa_mc1" {"question", "mc1_targets": {"choices", "labels"}}
 *   "gsm8k"       {"question", "answer"} (the answer's "#### N" line is the target)
 * A multiple-choice example is scored as the log-likelihood of
 * contexts[i] + choices[i] (contexts[i] = context unless the layout varies
 * it per choice: WinoGrande). Errors name the file and line. */
typedef enum { JM_EVAL_MC, JM_EVAL_GEN } jm_eval_kind;
typedef struct {
    int line;             /* 1-based line of the record in its file */
    /* multiple choice */
    char *context;        /* the text before every choice (NULL when per-choice) */
    char **contexts;      /* per-choice contexts (WinoGrande), else NULL */
    char **choices;       /* each choice's continuation, with the delimiter the layout puts before it (" Paris") */
    int *choice_bytes;    /* bytes of each choice's text, without that delimiter (acc_bytes' length) */
    int *choice_chars;    /* the same text's code points: what the harness' acc_norm divides by (Python's len) */
    int nchoices, gold;
    /* generative */
    char *prompt;         /* what the model continues */
    char *answer;         /* the reference answer ("72"). GSM8K: as the harness' exact_match compares it: the
                           * text after the last "#### " without ',' '$' and a final '.', lower-cased (the
                           * scorer does the same to the regex's group 1) */
    char *target;         /* the gold continuation for few-shot examples, with the layout's delimiter (" ... #### 72") */
    char *description;    /* said before the shots (MMLU: "The following are ... about <subject>.\n\n"), or NULL;
                           * per example, since one file may hold every subject */
} jm_eval_example;
typedef struct {
    char path[1024];
    char layout[32];      /* "mc", "gen", "arc", ... as above */
    jm_eval_kind kind;
    jm_eval_example *ex;
    int n;
    char *description;    /* the description every example shares, or NULL (none, or they differ: ex[i].description) */
    const char *fewshot_sep;   /* between a shot and what follows it: "\n\n" */
    const char *stop[4];  /* generative: the layout's stop strings */
    int nstop;
    const char *regex;    /* generative: extended POSIX regex whose group 1 (first match) is the answer */
} jm_eval_task;
jm_status jm_eval_task_load(const char *path, jm_eval_task **out, jm_error *err);
void jm_eval_task_free(jm_eval_task *t);
/* What the model reads before example i's own context (or prompt) when it
 * is given `shots` distinct examples drawn with seed from pool (a train file's
 * task of the same layout, or t itself, never example i of t; only those with
 * example i's description: MMLU's shots are of its subject): ex[i].description,
 * then each shot rendered with its gold continuation (MC: its context, or
 * contexts[gold], + choices[gold]; generative: prompt + target) followed by
 * fewshot_sep. "" with no shots and no description; pool may be NULL with no
 * shots. The draw depends on seed and i only. *prefix is malloc'd; the
 * caller frees it. */
jm_status jm_eval_fewshot(const jm_eval_task *t, int i, const jm_eval_task *pool, int shots, uint64_t seed, char **prefix,
                          jm_error *err);

/* Scoring a model on a task (README: Evaluation): multiple choice by the
 * log-likelihood of each choice after its context ([BOS] + enc(context) +
 * cont, cont = enc(context + choice)[len(enc(context)):], the context's
 * trailing whitespace moved to the choice), each context prefilled once; generative
 * by greedy generation to a stop string and the task's regex. Sets the
 * model's slots: o->slots (4) of the whole context (1 with one_by_one). */
typedef struct {
    int shots;                  /* few-shot examples before each scored one */
    int limit;                  /* the first `limit` examples, 0 = all */
    uint64_t seed;              /* the shots' draw */
    const jm_eval_task *pool;   /* where shots come from: NULL = the task itself */
    int max_gen;                /* generative: new tokens at most (0 = 256) */
    int one_by_one;             /* each (context, choice) from an empty cache, one at a time (what prefix reuse must equal) */
    int slots;                  /* sequences side by side (0 = 4); with 1, reuse is bit for bit one_by_one */
} jm_eval_opts;
typedef struct {                /* one scored example, in file order */
    int index, line;
    int nchoices;               /* multiple choice: */
    const double *loglik;       /*   each choice's summed log-likelihood */
    int pred, pred_norm, gold;  /*   argmax, argmax over bytes, the answer (-1: generative) */
    const char *output;         /* generative: the text generated (up to the stop string) */
    const char *extracted;      /*   group 1 of the regex, or "[invalid]" */
    const char *answer;         /*   the reference */
    int correct;
} jm_eval_record;
typedef struct {
    int n;                      /* examples scored */
    double acc, acc_stderr, acc_norm, acc_norm_stderr; /* multiple choice */
    double exact_match, exact_match_stderr;            /* generative */
    int truncated;              /* examples whose context lost tokens on the left to fit */
} jm_eval_result;
/* on_record (optional) sees each example as it is scored; nonzero stops the run. */
jm_status jm_eval_run(jm_model *m, const jm_tokenizer *tok, const jm_eval_task *t, const jm_eval_opts *o,
                      jm_eval_result *r, int (*on_record)(void *ctx, const jm_eval_record *rec), void *ctx,
                      jm_error *err);

/* The rolling log-likelihood of text files: [BOS] + enc(file) each, every
 * token but the BOS predicted once, in windows of at most `window` tokens (a
 * window predicting tokens [a, b) reads the window tokens before b: one of
 * context when full, as lm-evaluation-harness's rolling windows). Stops after
 * max_tokens predicted tokens (0 = all). decode: a token at a time through
 * the KV cache, else a window per call; both score the same tokens. Token
 * perplexity exp(-loglik / tokens), byte perplexity exp(-loglik / bytes),
 * bits per byte -loglik / bytes / ln 2. Uses slot 0 of one slot. */
typedef struct {
    double loglik;
    int64_t tokens, bytes, docs;
} jm_ppl_result;
jm_status jm_eval_text(jm_model *m, const jm_tokenizer *tok, const char *const *paths, int npaths, int window,
                       int64_t max_tokens, int decode, jm_ppl_result *r,
                       void (*progress)(void *ctx, int64_t done, int64_t total), void *ctx, jm_error *err);
/* One window in slot 0 (emptied first): adds to *loglik the log p of
 * ids[first .. n) given what precedes each; decode as above. */
jm_status jm_score_window(jm_model *m, const int32_t *ids, int n, int first, int decode, double *loglik,
                          jm_error *err);

/* ---- optimizer ------------------------------------------------------- */

typedef struct {
    double lr;           /* peak learning rate (the schedule scales it) */
    double beta1, beta2, eps;
    double weight_decay; /* decoupled; not applied to norms and biases */
    double grad_clip;    /* global gradient-norm clip, 0 = off */
} jm_adamw_config;

typedef struct jm_optimizer jm_optimizer;
jm_status jm_optimizer_create(const jm_model *m, const jm_adamw_config *c, jm_optimizer **out, jm_error *err);
void jm_optimizer_free(jm_optimizer *o);
/* One AdamW update of every parameter from its .grad, at learning rate lr. */
jm_status jm_optimizer_step(jm_optimizer *o, jm_model *m, double lr, jm_error *err);
int64_t jm_optimizer_steps(const jm_optimizer *o);
double jm_grad_norm(const jm_model *m);         /* global L2 norm of all gradients */
void jm_scale_grads(jm_model *m, float scale);

typedef enum { JM_SCHEDULE_CONSTANT, JM_SCHEDULE_WSD, JM_SCHEDULE_COSINE } jm_schedule_type;
typedef struct {
    jm_schedule_type type;
    double peak_lr, min_lr_ratio;
    int64_t warmup_steps, total_steps, decay_steps; /* decay_steps: WSD's final decay phase */
} jm_schedule;
/* The learning rate for update number step + 1 (step counts from 0): linear
 * warmup, then constant | WSD (stable, exponential decay to the floor over the
 * last decay_steps) | cosine to the floor. */
double jm_schedule_lr(const jm_schedule *s, int64_t step);

/* ---- data ------------------------------------------------------------ */

/* `jetmoe prepare`: tokenizes text files (.txt/.md and anything else as text),
 * JSON lines (.jsonl, and compressed .jsonl.gz / .jsonl.zst or Dolma's
 * .json.gz / .json.zst, read as streams: a string field per line, "text"
 * unless text_field says) and source code into shards of at most
 * shard_tokens tokens under out_dir (out_dir/shard_00000.bin, ...), with a
 * progress line on stderr. Documents: a JSONL record, or a whole text/code
 * file (a .txt file's blank-line-separated paragraphs are NOT split: one file
 * = one document). Runs on `threads` threads; output is identical for any
 * thread count. With nparts > 0 it prepares part `part` (1-based) of the
 * inputs: the sorted input list cut into nparts runs of consecutive files of
 * about equal bytes, written as part-IIIII-of-NNNNN.* (data.h), so that all
 * parts, on any hosts, in one directory make the set one prepare makes. */
typedef struct {
    const char *tokenizer;      /* tokenizer.model / tokenizer.json / directory */
    const char *const *inputs;  /* files or directories (walked recursively, sorted) */
    int ninputs;
    const char *out_dir;
    uint64_t shard_tokens;      /* 0 = 100M */
    int threads;                /* 0 = all cores */
    int overwrite;              /* replace a previous prepare's shards and manifest in out_dir (its part's only) */
    const char *text_field;     /* NULL = "text": the JSONL string field that holds a document */
    int part, nparts;           /* 0, 0: all inputs; else 1 <= part <= nparts <= 99999 */
} jm_prepare_opts;
jm_status jm_prepare(const jm_prepare_opts *o, uint64_t *tokens_written, jm_error *err);

/* ---- training -------------------------------------------------------- */

/* A recipe (JSON): the model config, data sources and mixture phases,
 * sequence length, batch, optimizer and schedule. Documented in README.md.
 * jm_recipe_load checks it whole before it returns: the text (types, whole
 * numbers, known keys) and what a run reads (the tokenizer, every shard). */
typedef struct jm_recipe jm_recipe;
jm_status jm_recipe_load(const char *path, jm_recipe **out, jm_error *err);
void jm_recipe_free(jm_recipe *r);
const jm_config *jm_recipe_model(const jm_recipe *r);
int64_t jm_recipe_total_steps(const jm_recipe *r);

typedef struct {
    const char *recipe;          /* recipe.json */
    const char *out_dir;         /* run directory */
    int resume;                  /* continue from out_dir's latest checkpoint */
    int64_t stop_after;          /* > 0: save and stop after this many steps in total (tests) */
    const volatile int *stop;    /* set asynchronously (SIGINT/SIGTERM): save and return */
    int quiet;                   /* no progress line */
    int overwrite;               /* without resume: replace a run already in out_dir (its results go first) */
    const char *init;            /* pretrain: start from this checkpoint's weights (a new run: fresh optimizer) */
    /* scale-out (README: Scaling out): launched by mpirun/srun as N ranks, pp
     * pipeline stages x N/pp data-parallel replicas; one process is 1 x 1 */
    int pp;                      /* pipeline stages (0 or 1: none) */
    double timeout;              /* seconds a rank waits for the others before stopping the job (0: 600) */
    int threads;                 /* the --threads given (0: this host's cores shared among its ranks) */
} jm_train_opts;
/* Pretrains as the recipe says. On a stop request it writes a checkpoint and
 * returns JM_OK with *stopped = 1. */
jm_status jm_pretrain(const jm_train_opts *o, int *stopped, jm_error *err);

/* One optimizer step on accum micro-batches of B x T tokens (tokens holds
 * accum*B*T ids): forward, backward (gradients averaged over micro-batches),
 * global-norm clip, AdamW at lr, zero the gradients. load (optional, 2*L*E)
 * receives each router's expert load of the last micro-batch as a fraction
 * of the fair share (MoA layers first). */
typedef struct {
    double loss, aux_loss, z_loss, grad_norm; /* grad_norm before clipping */
} jm_step_stats;
jm_status jm_train_step(jm_model *m, jm_optimizer *opt, const int32_t *tokens, int B, int T, int accum, double lr,
                        double grad_clip, double *load, jm_step_stats *st, jm_error *err);

/* Mean cross-entropy of the model over max_tokens tokens of the shards in
 * dir (0 = all), in windows of seq_len spread over the shards (perplexity =
 * exp of it). Every path scores the same tokens: JM_EVAL_FORWARD batched
 * jm_forward passes (the trainer's: the activation arena), JM_EVAL_CACHED a
 * window per jm_infer_batch call (no activation arena: a mapped BF16/Q8/Q4
 * model), JM_EVAL_DECODE one cached step per token, as generation runs.
 * progress (optional) sees the tokens scored so far and the total. */
typedef enum { JM_EVAL_FORWARD, JM_EVAL_CACHED, JM_EVAL_DECODE } jm_eval_path;
jm_status jm_eval_shards(jm_model *m, const char *dir, int seq_len, int64_t max_tokens, jm_eval_path path,
                         double *loss, int64_t *tokens, void (*progress)(void *ctx, int64_t done, int64_t total),
                         void *ctx, jm_error *err);

/* ---- tokenizer (SentencePiece BPE, Llama-2 family) ---------------------- */

typedef struct jm_tokenizer jm_tokenizer;

/* Loads tokenizer.model (SentencePiece protobuf) or HF tokenizer.json; given a
 * directory, loads tokenizer.model or else tokenizer.json from it, and the chat
 * template from its tokenizer_config.json when present. */
jm_status jm_tokenizer_load(const char *path, jm_tokenizer **out, jm_error *err);
void jm_tokenizer_free(jm_tokenizer *t);
int jm_tokenizer_vocab_size(const jm_tokenizer *t);
int jm_tokenizer_bos_id(const jm_tokenizer *t); /* -1 when the model has none */
int jm_tokenizer_eos_id(const jm_tokenizer *t);
int jm_tokenizer_unk_id(const jm_tokenizer *t);
const char *jm_tokenizer_piece(const jm_tokenizer *t, int id); /* NULL when out of range */

/* Text (len bytes, any bytes) -> ids exactly as spm_encode --output_format=id:
 * the model's normalisation, no BOS/EOS. *ids is malloc'd (caller frees). */
jm_status jm_tokenizer_encode(const jm_tokenizer *t, const char *text, size_t len, int32_t **ids, size_t *n,
                              jm_error *err);
/* Like jm_tokenizer_encode, but the EOS and BOS token strings ("</s>", "<s>")
 * in the text become their ids, as Hugging Face tokenizes special tokens;
 * each stretch of text between them is encoded on its own (with the dummy
 * prefix, as transformers' Llama tokenizers do by default). */
jm_status jm_tokenizer_encode_special(const jm_tokenizer *t, const char *text, size_t len, int32_t **ids,
                                      size_t *n_ids, jm_error *err);
/* Ids -> text exactly as spm_decode --input_format=id. *text is malloc'd and
 * NUL-terminated; an id outside the vocabulary is an error. */
jm_status jm_tokenizer_decode(const jm_tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len,
                              jm_error *err);
/* Writes the equivalent HF tokenizer.json, atomically. */
jm_status jm_tokenizer_save_json(const jm_tokenizer *t, const char *path, jm_error *err);

/* Trains a tokenizer with Debian's spm_train, Llama-style (BPE, byte fallback,
 * split digits, identity normalisation, unk=0 bos=1 eos=2), and writes
 * tokenizer.model, tokenizer.json and tokenizer_config.json (with the chat
 * template) into out_dir. */
typedef struct {
    const char *const *inputs; /* text files */
    int ninputs;
    int vocab_size;
    const char *out_dir;
    int byte_fallback;         /* 1 (Llama) or 0 */
    int threads;               /* 0 = all cores */
    int64_t max_sentences;     /* input_sentence_size; 0 = spm_train's default */
    int overwrite;             /* replace tokenizer files already in out_dir */
} jm_tokenizer_train_opts;
jm_status jm_tokenizer_train(const jm_tokenizer_train_opts *o, jm_error *err);

/* ---- chat template ----------------------------------------------------- */

typedef struct {
    const char *role;    /* "system", "user" or "assistant" */
    const char *content;
} jm_chat_message;

/* Renders a conversation with the tokenizer's chat template (from
 * tokenizer_config.json, else JetMoE-chat's Zephyr format):
 * <|system|>\n{system}</s>\n<|user|>\n{user}</s>\n<|assistant|>\n{reply}</s>\n
 * and, with add_generation_prompt, a final <|assistant|>\n. *text is malloc'd. */
jm_status jm_chat_render(const jm_tokenizer *t, const jm_chat_message *msgs, int n, int add_generation_prompt,
                         char **text, jm_error *err);
/* The same as token ids: BOS first, the EOS token string rendered by the
 * template becomes the EOS id, the text between is encoded. *ids is malloc'd. */
jm_status jm_chat_encode(const jm_tokenizer *t, const jm_chat_message *msgs, int n, int add_generation_prompt,
                         int32_t **ids, size_t *n_ids, jm_error *err);
/* The same for a conversation as JSON text, as transformers' apply_chat_template
 * takes it: a list of messages, or {"messages": [...], "tools": [...]}. A message
 * is an object with a string "role" (any) and other fields passed to the template
 * as they are; a "content" list of {"type": "text", "text": ...} parts is joined
 * into one string (other part types are refused). "tools" reaches the template
 * as `tools` (none when absent). Numbers must be integers. */
jm_status jm_chat_render_json(const jm_tokenizer *t, const char *json, size_t len, int add_generation_prompt,
                              char **text, jm_error *err);
jm_status jm_chat_encode_json(const jm_tokenizer *t, const char *json, size_t len, int add_generation_prompt,
                              int32_t **ids, size_t *n_ids, jm_error *err);

/* ---- the OpenAI-compatible HTTP server (README: Serving) --------------- */

/* jm_serve runs an HTTP server (libmicrohttpd) over model m and tokenizer t
 * until o->should_stop says so (a signal handler's flag): POST
 * /v1/chat/completions and /v1/completions (streaming or not), GET /v1/models,
 * /health and / (the page given). One decode thread owns the model and
 * batches every running request in one jm_batcher step (continuous batching
 * over `parallel` slots of `ctx` positions); the HTTP threads parse, validate
 * and tokenize, and wait for their text. On stop it stops accepting, lets the
 * requests in flight finish for up to grace_ms, cancels the rest and returns
 * JM_OK. m and t must not be used by anyone else meanwhile. */
typedef struct {
    const char *host;        /* address to bind; NULL = "127.0.0.1" */
    int port;                /* 0 = any free port */
    int parallel;            /* slots decoding at once; 0 = 4 */
    int ctx;                 /* positions per slot; 0 = max_position_embeddings */
    int queue;               /* requests waiting for a slot at most (then 503); 0 = 64 */
    int64_t max_body;        /* request body bytes at most (then 413); 0 = 1 MB */
    int grace_ms;            /* shutdown: how long requests in flight may run on; 0 = 10000 */
    const char *api_key;     /* NULL or "": no key; else "Authorization: Bearer KEY" on /v1/ */
    const char *model_id;    /* the model's name in responses and /v1/models; NULL = "jetmoe" */
    const jm_generation_config *defaults; /* a request's sampling defaults (temperature, top_p, max_tokens, and
                              * top_k, repetition_penalty, which requests cannot set); NULL = OpenAI's */
    const char *page;        /* GET / (text/html), page_len bytes; NULL = 404 */
    size_t page_len;
    /* on_listen (may be NULL) is called once the socket listens, with the
     * port bound (the real one for port 0); should_stop is polled every
     * 100 ms, and a nonzero answer starts the shutdown. Both get cb_ctx. */
    void (*on_listen)(void *cb_ctx, const char *host, int port);
    int (*should_stop)(void *cb_ctx);
    void *cb_ctx;
} jm_server_opts;
jm_status jm_serve(jm_model *m, const jm_tokenizer *t, const jm_server_opts *o, jm_error *err);

/* Threads used by the library's OpenMP loops and BLAS, and by a model's
 * decode steps (0 = all cores; more than the cores this process may run on
 * counts as all of them). This sets the process-wide OpenMP and OpenBLAS
 * thread counts: the one setting that is not per handle, because those
 * runtimes have no other. */
void jm_set_threads(int n);

#ifdef __cplusplus
}
#endif
#endif
