/* quantize.c — `jetmoe quantize`: a checkpoint's weight matrices as blocks of
 * 32 int8 (Q8) or int4 (Q4) values with one F16 scale each.
 *
 * Format (read back by model.c's find_stored): the matrix keeps its HF name,
 * as dtype I8 with its own shape (Q8) or U8 with the last dimension halved
 * (Q4: two values per byte, see qmatmul.c), and "<name>_scale" holds the F16
 * scales, last dimension C/32. Every file's __metadata__ says
 * jetmoe.quant = q8|q4, jetmoe.quant_block = 32 and jetmoe.quant_interleave
 * = 4: the rows of every tensor wrows_interleave allows (ops.h: rows of
 * whole 64-byte lines, matrices of whole groups of 4 rows) are stored
 * interleaved in groups of 4, line l of row i at the group's start + (l * 4
 * + i % 4) * 64, as decoding reads them best (one stream a pass, where 4
 * row-major rows are 4 streams: bench/kernels, one thread, a Q4 matrix of 2
 * GB streamed at 87% of a plain read row-major, 98% interleaved; Q8 73%
 * against 94%, AMD EPYC family 26 model 2). Files without the key (written
 * before it) hold every matrix row-major. Routers, norms and
 * biases are copied as stored: they are a sliver of the bytes, and a router
 * that flips its choice changes everything after it.
 *
 * The input is opened with jm_model_open, so an 8B BF16 checkpoint is read
 * through its mapping a row at a time; output goes out in shards of at most
 * 2 GB, each quantized, written and freed before the next, into a new
 * directory that takes out_dir's place at the end. */
#include "base/safetensors.h"
#include "model/model.h"
#include "model/ops/ops.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <omp.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#define SHARD_BYTES (2000ull << 20)

typedef struct {
    const jm_param *p;
    int quantize;            /* else copied as stored */
    wview w;                 /* the matrix as held (quantize) */
    const st_tensor *src;    /* the stored tensor (copy) */
    uint64_t bytes;          /* in the output, scales included */
    int shard;
} plan_entry;

static jm_status quantize_tensor(const plan_entry *e, int bits, void **q, uint8_t **scales, jm_error *err)
{
    const jm_param *p = e->p;
    const int64_t C = p->shape[p->ndim - 1], rows = p->numel / C, nb = C / QBLOCK;
    const int64_t row_bytes = bits == 8 ? C : C / 2;
    *q = malloc((size_t)(rows * row_bytes));
    *scales = malloc((size_t)(rows * nb * 2));
    int threads = omp_get_max_threads();
    float *buf = malloc((size_t)threads * C * sizeof(float));
    if (!*q || !*scales || !buf) {
        free(buf);
        return jm_fail(err, JM_ERR_NOMEM, "cannot allocate %.2f GB to quantize %s", rows * row_bytes / 1e9, p->name);
    }
    /* the first row holding a non-finite value, or whose scales overflow F16 */
    int64_t bad_value = -1, bad_scale = -1;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *row = buf + (int64_t)omp_get_thread_num() * C;
        dequant_rows(row, e->w, r, 1, C);
        int finite = 1;
        for (int64_t i = 0; i < C; i++) finite &= isfinite(row[i]) != 0;
        if (!finite) {
#pragma omp critical
            if (bad_value < 0 || r < bad_value) bad_value = r;
            continue;
        }
        uint8_t *sc = *scales + r * nb * 2;
        if (bits == 8)
            quantize_row_q8((int8_t *)*q + r * C, sc, row, C);
        else
            quantize_row_q4((uint8_t *)*q + r * C / 2, sc, row, C);
        for (int64_t b = 0; b < nb; b++)
            if ((sc[2 * b + 1] & 0x7c) == 0x7c) { /* exponent all ones: the scale is infinite */
#pragma omp critical
                if (bad_scale < 0 || r < bad_scale) bad_scale = r;
                break;
            }
    }
    free(buf);
    if (bad_value < 0 && bad_scale < 0 && wrows_interleave(bits == 8 ? WT_Q8 : WT_Q4, p->shape[p->ndim - 2], C)) {
        uint8_t *ilv = malloc((size_t)(rows * row_bytes));
        if (!ilv) return jm_fail(err, JM_ERR_NOMEM, "cannot allocate %.2f GB to quantize %s", rows * row_bytes / 1e9,
                                 p->name);
        interleave_rows(ilv, *q, rows, row_bytes);
        free(*q);
        *q = ilv;
    }
    if (bad_value >= 0)
        return jm_fail(err, JM_ERR_FORMAT, "%s: row %lld holds a non-finite value; nothing to quantize it to",
                       p->name, (long long)bad_value);
    if (bad_scale >= 0)
        return jm_fail(err, JM_ERR_FORMAT, "%s: row %lld has values too large for an F16 block scale (|w| > %g)",
                       p->name, (long long)bad_scale, bits == 8 ? 65504.0 * 127 : 65504.0 * 8);
    return JM_OK;
}

/* Writes the tensors of one shard. */
static jm_status write_shard(const char *path, const plan_entry *plan, int n, int shard, int bits, jm_error *err)
{
    int cap = 0;
    for (int i = 0; i < n; i++) cap += plan[i].shard == shard ? 2 : 0;
    st_out *out = calloc((size_t)cap + 1, sizeof *out);
    void **owned = calloc((size_t)cap + 1, sizeof *owned);
    char (*names)[128] = calloc((size_t)cap + 1, sizeof *names);
    jm_status s = out && owned && names ? JM_OK : jm_fail(err, JM_ERR_NOMEM, "out of memory");
    int k = 0;
    for (int i = 0; i < n && !s; i++) {
        const plan_entry *e = &plan[i];
        if (e->shard != shard) continue;
        const jm_param *p = e->p;
        st_out *o = &out[k];
        o->name = p->name;
        o->ndim = p->ndim;
        for (int d = 0; d < p->ndim; d++) o->shape[d] = p->shape[d];
        if (!e->quantize) {
            o->dtype = e->src->dtype;
            o->data = e->src->data;
            k++;
            continue;
        }
        void *q;
        uint8_t *sc;
        s = quantize_tensor(e, bits, &q, &sc, err);
        owned[k] = q;
        owned[k + 1] = sc;
        if (s) break;
        const int64_t C = p->shape[p->ndim - 1];
        o->dtype = bits == 8 ? ST_I8 : ST_U8;
        if (bits == 4) o->shape[p->ndim - 1] = C / 2;
        o->data = q;
        st_out *so = &out[k + 1];
        snprintf(names[k + 1], sizeof names[k + 1], "%s_scale", p->name);
        so->name = names[k + 1];
        so->dtype = ST_F16;
        so->ndim = p->ndim;
        for (int d = 0; d < p->ndim; d++) so->shape[d] = p->shape[d];
        so->shape[p->ndim - 1] = C / QBLOCK;
        so->data = sc;
        k += 2;
    }
    if (!s) {
        static const char *const keys[] = {"format", "jetmoe.quant", "jetmoe.quant_block", "jetmoe.quant_interleave"};
        const char *vals[] = {"pt", bits == 8 ? "q8" : "q4", "32", "4"};
        _Static_assert(WILV == 4, "the metadata says groups of 4");
        s = st_write(path, out, k, keys, vals, 4, err);
    }
    for (int i = 0; i < cap; i++) free(owned ? owned[i] : NULL);
    free(owned);
    free(out);
    free(names);
    return s;
}

static jm_status write_index(const char *out_dir, const plan_entry *plan, int n, int nshards, uint64_t total,
                             jm_error *err)
{
    cJSON *root = cJSON_CreateObject(), *meta = cJSON_AddObjectToObject(root, "metadata"),
          *map = cJSON_AddObjectToObject(root, "weight_map");
    if (meta) cJSON_AddNumberToObject(meta, "total_size", (double)total);
    char file[64], name[128];
    for (int i = 0; i < n && map; i++) {
        snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", plan[i].shard + 1, nshards);
        cJSON_AddStringToObject(map, plan[i].p->name, file);
        if (plan[i].quantize) {
            snprintf(name, sizeof name, "%s_scale", plan[i].p->name);
            cJSON_AddStringToObject(map, name, file);
        }
    }
    char path[4400];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", out_dir);
    jm_status s = jm_write_json(path, map ? root : NULL, err);
    cJSON_Delete(root);
    return s;
}

/* The source's config.json with transformers' names: architectures and model_type
 * as jm_config_save writes them (a checkpoint from the authors' code says
 * JetMoEForCausalLM, which vLLM's registry does not know); every other field as
 * it was. */
static jm_status copy_config(const char *src, const char *dst, jm_error *err)
{
    char *buf;
    size_t len;
    cJSON *root = NULL;
    jm_status s = jm_read_file(src, 1u << 20, &buf, &len, err);
    if (s) return s;
    s = jm_json_parse(buf, len, src, &root, err);
    free(buf);
    if (!s && !cJSON_IsObject(root)) s = jm_fail(err, JM_ERR_CONFIG, "%s: expected a JSON object", src);
    cJSON *arch = s ? NULL : cJSON_CreateArray(), *type = s ? NULL : cJSON_CreateString("jetmoe");
    if (!s && (!arch || !type || !cJSON_AddItemToArray(arch, cJSON_CreateString(JM_ARCHITECTURE))))
        s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dst);
    if (!s) { /* in place when there, else added */
        if (cJSON_GetObjectItemCaseSensitive(root, "architectures"))
            cJSON_ReplaceItemInObjectCaseSensitive(root, "architectures", arch);
        else
            cJSON_AddItemToObject(root, "architectures", arch);
        arch = NULL;
        if (cJSON_GetObjectItemCaseSensitive(root, "model_type"))
            cJSON_ReplaceItemInObjectCaseSensitive(root, "model_type", type);
        else
            cJSON_AddItemToObject(root, "model_type", type);
        type = NULL;
        s = jm_write_json(dst, root, err);
    }
    cJSON_Delete(arch), cJSON_Delete(type), cJSON_Delete(root);
    return s;
}

/* config.json and the tokenizer files travel with the weights; a model without
 * generation_config.json gets one from its config (as jm_model_save writes it). */
static jm_status copy_side_files(const char *dir, const char *out_dir, const jm_config *c, jm_error *err)
{
    static const char *const files[] = {"config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                        "special_tokens_map.json", "generation_config.json"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char src[4400], dst[4400];
        snprintf(src, sizeof src, "%s/%s", dir, files[i]);
        snprintf(dst, sizeof dst, "%s/%s", out_dir, files[i]);
        jm_status s = JM_OK;
        if (i == 0) {
            s = copy_config(src, dst, err);
        } else if (access(src, F_OK) != 0) {
            if (!strcmp(files[i], "generation_config.json")) s = jm_generation_config_save(dst, c, err);
        } else {
            s = jm_copy_file(src, dst, err);
        }
        if (s) return s;
    }
    return JM_OK;
}

jm_status jm_quantize(const char *dir, const char *out_dir, int bits, int overwrite, jm_error *err)
{
    if (bits != 8 && bits != 4) return jm_fail(err, JM_ERR_ARG, "quantize: bits must be 8 or 4, got %d", bits);
    if (strlen(out_dir) > 4000 || strlen(dir) > 4000) return jm_fail(err, JM_ERR_ARG, "quantize: path too long");
    /* everything goes into a fresh directory beside out_dir, which then takes
     * out_dir's place: no mix with an earlier output's files, a failure part-way
     * leaves out_dir as it was, and only a checkpoint jetmoe wrote is replaced,
     * never one holding the input */
    jm_output_dir *od;
    jm_status s = jm_output_dir_open(out_dir, &dir, 1, overwrite, &od, err);
    if (s) return s;
    const char *tmp = jm_output_dir_stage(od);
    jm_model *m;
    if ((s = jm_model_open(dir, &m, err))) {
        jm_output_dir_abort(od);
        return s;
    }
    st_set set; /* the stored bytes of what is copied as is */
    if ((s = st_set_open(dir, &set, err))) {
        jm_model_free(m);
        jm_output_dir_abort(od);
        return s;
    }
    const int n = jm_model_num_params(m);
    plan_entry *plan = calloc((size_t)n, sizeof *plan);
    if (!plan) s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
    uint64_t total = 0, in_shard = 0;
    int shard = 0;
    for (int i = 0; i < n && !s; i++) {
        plan_entry *e = &plan[i];
        e->p = jm_model_param(m, i);
        const int64_t C = e->p->shape[e->p->ndim - 1];
        e->quantize = model_param_view(m, i, &e->w) && C % QBLOCK == 0;
        if (e->quantize) {
            e->bytes = (uint64_t)(e->p->numel / C) * ((bits == 8 ? C : C / 2) + 2 * (C / QBLOCK));
        } else {
            e->src = st_set_find(&set, e->p->name, NULL);
            e->bytes = e->src->end - e->src->begin;
        }
        if (in_shard > 0 && in_shard + e->bytes > SHARD_BYTES) shard++, in_shard = 0;
        e->shard = shard;
        in_shard += e->bytes;
        total += e->bytes;
    }
    const int nshards = shard + 1;
    char path[4300];
    snprintf(path, sizeof path, "%s/model.safetensors", tmp);
    for (int k = 0; k < nshards && !s; k++) {
        if (nshards > 1) snprintf(path, sizeof path, "%s/model-%05d-of-%05d.safetensors", tmp, k + 1, nshards);
        s = write_shard(path, plan, n, k, bits, err);
    }
    if (!s && nshards > 1) s = write_index(tmp, plan, n, nshards, total, err);
    if (!s) s = copy_side_files(dir, tmp, jm_model_config(m), err);
    if (!s) s = jm_output_dir_commit(od, err);
    else jm_output_dir_abort(od);
    free(plan);
    st_set_close(&set);
    jm_model_free(m);
    return s;
}
