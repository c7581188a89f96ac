/* train.c — the training loop: recipe, mixture phases, AdamW with the
 * schedule, gradient accumulation, metrics, checkpoints and exact resume.
 *
 * A run directory holds:
 *   recipe.json                 the resolved recipe (what the run used)
 *   metrics.jsonl               one JSON line per logged step and per held-out evaluation
 *   loss.svg                    loss, held-out loss, learning rate and expert load over the steps
 *   checkpoints/step_N/         config.json + model.safetensors (HF) + trainer_state.safetensors
 *                               + the tokenizer files; the two newest are kept
 *   checkpoints/latest          "step_N" of the newest complete checkpoint
 * A checkpoint directory is written as step_N.tmp.XXXXXX, synced, then renamed:
 * a crash leaves the previous checkpoint as it was. */
#include "train/train.h"
#include "train/parallel.h"
#include "model/ops/ops.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <omp.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_SOURCES JM_MAX_SOURCES
#define MAX_PHASES JM_MAX_PHASES
typedef jm_phase phase;

const char *jm_task_name(jm_task_kind k)
{
    return k == JM_TASK_SFT ? "sft" : k == JM_TASK_DPO ? "dpo" : "pretrain";
}

/* ---- recipe: the text ---- */

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

/* The keys of each object of a recipe (README: Training). An entry with
 * `belongs` set is no key of that object, only a hint: where a key written
 * there goes, or the recipe's name for another common spelling. */
typedef struct {
    const char *name;
    const char *belongs;
} recipe_key;

static const recipe_key top_keys[] = {
    {"model", NULL}, {"tokenizer", NULL}, {"sources", NULL}, {"heldout", NULL}, {"phases", NULL},
    {"seq_len", NULL}, {"batch_size", NULL}, {"grad_accum", NULL}, {"optimizer", NULL}, {"schedule", NULL},
    {"aux_loss_coef", NULL}, {"z_loss_coef", NULL}, {"seed", NULL}, {"checkpoint_every", NULL},
    {"log_every", NULL}, {"eval_every", NULL}, {"eval_tokens", NULL},
    {"lr", "optimizer.lr"}, {"learning_rate", "optimizer.lr"}, {"beta1", "optimizer.beta1"},
    {"beta2", "optimizer.beta2"}, {"eps", "optimizer.eps"}, {"weight_decay", "optimizer.weight_decay"},
    {"grad_clip", "optimizer.grad_clip"}, {"warmup_steps", "schedule.warmup_steps"},
    {"decay_steps", "schedule.decay_steps"}, {"min_lr_ratio", "schedule.min_lr_ratio"},
    {"steps", "phases[i].steps"}, {"mixture", "phases[i].mixture"},
};
static const recipe_key optimizer_keys[] = {
    {"lr", NULL}, {"beta1", NULL}, {"beta2", NULL}, {"eps", NULL}, {"weight_decay", NULL}, {"grad_clip", NULL},
    {"learning_rate", "lr"},
};
static const recipe_key schedule_keys[] = {
    {"type", NULL}, {"warmup_steps", NULL}, {"warmup_ratio", NULL}, {"decay_steps", NULL}, {"min_lr_ratio", NULL},
};
/* SFT and DPO recipes (README: Fine-tuning): the data and the model come from the command line */
static const recipe_key tune_keys[] = {
    {"epochs", NULL}, {"max_len", NULL}, {"batch_size", NULL}, {"grad_accum", NULL}, {"optimizer", NULL},
    {"schedule", NULL}, {"aux_loss_coef", NULL}, {"z_loss_coef", NULL}, {"seed", NULL},
    {"checkpoint_every", NULL}, {"log_every", NULL}, {"truncation", NULL}, {"beta", NULL},
    {"label_smoothing", NULL}, {"eval_every", NULL},
    {"lr", "optimizer.lr"}, {"learning_rate", "optimizer.lr"}, {"weight_decay", "optimizer.weight_decay"},
    {"grad_clip", "optimizer.grad_clip"}, {"warmup_steps", "schedule.warmup_steps"},
    {"warmup_ratio", "schedule.warmup_ratio"}, {"seq_len", "max_len"}, {"max_length", "max_len"},
    {"num_train_epochs", "epochs"}, {"model", "--model on the command line"},
};
static const recipe_key phase_keys[] = {{"name", NULL}, {"steps", NULL}, {"mixture", NULL}};
/* the model's keys are config.json's (jm_config_keys); these are other names for them */
static const recipe_key model_keys[] = {
    {"num_layers", "num_hidden_layers"}, {"num_experts", "num_local_experts"}, {"top_k", "num_experts_per_tok"},
};
#define NKEYS(a) ((int)(sizeof a / sizeof a[0]))

/* s for a message: control characters as \xNN, cut (at a character) after about 60 bytes. */
static const char *printable(const char *s, char *buf, size_t cap)
{
    size_t k = 0;
    for (; *s && k + 8 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (k > 60 && (c & 0xc0) != 0x80) {
            k += (size_t)snprintf(buf + k, cap - k, "...");
            break;
        }
        if (c < 0x20 || c == 0x7f) k += (size_t)snprintf(buf + k, cap - k, "\\x%02x", c);
        else buf[k++] = (char)c;
    }
    buf[k] = 0;
    return buf;
}

static bool has_control(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f) return true;
    return false;
}

/* A key of o that the object does not have is an error, with a hint when a
 * known key is close ("did you mean ..."). model: o is the model object, whose
 * keys are config.json's; top: the recipe itself, whose hints include the
 * model's keys ("model.vocab_size"). */
static jm_status unknown_keys(const cJSON *o, const char *where, const recipe_key *keys, int n, bool model, bool top,
                              jm_error *err)
{
    int nc;
    const char *const *ck = jm_config_keys(&nc);
    for (const cJSON *c = o->child; c; c = c->next) {
        bool known = false;
        for (int i = 0; i < n && !known; i++) known = !keys[i].belongs && strcmp(c->string, keys[i].name) == 0;
        for (int i = 0; i < nc && model && !known; i++) known = strcmp(c->string, ck[i]) == 0;
        if (known) continue;
        const char *names[128];
        int k = 0;
        for (int i = 0; i < n && k < 128; i++) names[k++] = keys[i].name;
        for (int i = 0; i < nc && (model || top) && k < 128; i++) names[k++] = ck[i];
        int best = jm_closest_name(c->string, names, k);
        char hint[128] = "", shown[96];
        if (best >= 0 && best < n)
            snprintf(hint, sizeof hint, " (did you mean \"%s\"?)",
                     keys[best].belongs ? keys[best].belongs : names[best]);
        else if (best >= n)
            snprintf(hint, sizeof hint, " (did you mean \"%s%s\"?)", top ? "model." : "", names[best]);
        return jm_fail(err, JM_ERR_CONFIG, "%s: unknown field \"%s\"%s", where,
                       printable(c->string, shown, sizeof shown), hint);
    }
    return JM_OK;
}

/* What a value is, for "must be ..., not <this>". */
static const char *describe(const cJSON *j, char *buf, size_t cap)
{
    if (cJSON_IsNumber(j)) snprintf(buf, cap, "%.15g", j->valuedouble);
    else if (cJSON_IsString(j)) snprintf(buf, cap, "a string");
    else if (cJSON_IsBool(j)) snprintf(buf, cap, cJSON_IsTrue(j) ? "true" : "false");
    else if (cJSON_IsNull(j)) snprintf(buf, cap, "null");
    else snprintf(buf, cap, cJSON_IsArray(j) ? "an array" : "an object");
    return buf;
}

static jm_status get_num(const cJSON *o, const char *key, const char *where, double lo, double hi, int required,
                         double *out, jm_error *err)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    char got[48];
    if (!j) return required ? jm_fail(err, JM_ERR_CONFIG, "%s: missing field %s", where, key) : JM_OK;
    if (!cJSON_IsNumber(j) || !isfinite(j->valuedouble) || j->valuedouble < lo || j->valuedouble > hi)
        return jm_fail(err, JM_ERR_CONFIG, "%s: field %s must be a number in [%g, %g], not %s", where, key, lo, hi,
                       describe(j, got, sizeof got));
    *out = j->valuedouble;
    return JM_OK;
}

/* A count of steps, tokens or sequences: a whole number ("steps": 2.5 is
 * refused, not truncated to 2). */
static jm_status get_int(const cJSON *o, const char *key, const char *where, int64_t lo, int64_t hi, int required,
                         int64_t *out, jm_error *err)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    char got[48];
    if (!j) return required ? jm_fail(err, JM_ERR_CONFIG, "%s: missing field %s", where, key) : JM_OK;
    double v = j->valuedouble;
    if (!cJSON_IsNumber(j) || !isfinite(v) || v != floor(v) || v < (double)lo || v > (double)hi)
        return jm_fail(err, JM_ERR_CONFIG, "%s: field %s must be an integer in [%lld, %lld], not %s", where, key,
                       (long long)lo, (long long)hi, describe(j, got, sizeof got));
    *out = (int64_t)v;
    return JM_OK;
}

static jm_status get_str(const cJSON *o, const char *key, const char *where, char *out, size_t cap, int required,
                         jm_error *err)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!j) return required ? jm_fail(err, JM_ERR_CONFIG, "%s: missing field %s", where, key) : JM_OK;
    if (!cJSON_IsString(j) || !j->valuestring[0] || strlen(j->valuestring) >= cap || has_control(j->valuestring))
        return jm_fail(err, JM_ERR_CONFIG, "%s: field %s must be a non-empty string (printable, under %zu bytes)",
                       where, key, cap);
    snprintf(out, cap, "%s", j->valuestring);
    return JM_OK;
}

/* Where the first \u0000 escape is in JSON text that parsed, or len: cJSON
 * ends a string there, so "dir\u0000junk" would quietly name "dir". In valid
 * JSON a backslash only occurs in strings, escaping the character after it. */
static size_t nul_escape(const char *text, size_t len)
{
    for (size_t i = 0; i + 1 < len; i++)
        if (text[i] == '\\') {
            if (i + 5 < len && memcmp(text + i + 1, "u0000", 5) == 0) return i;
            i++;
        }
    return len;
}

/* An object-valued field: absent (NULL), or an object; anything else is an error. */
static jm_status get_object(const cJSON *o, const char *key, const char *where, const cJSON **out, jm_error *err)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    char got[48];
    *out = NULL;
    if (j && !cJSON_IsObject(j))
        return jm_fail(err, JM_ERR_CONFIG, "%s: field %s must be an object, not %s", where, key,
                       describe(j, got, sizeof got));
    *out = j;
    return JM_OK;
}

/* What every recipe has: batch, optimizer, schedule, router-loss weights,
 * seed, logging and checkpoint cadence. total: the run's steps (0 when only
 * the data will tell: fine-tuning). Defaults: the JetMoE report's AdamW for
 * pretraining (WSD), its chat recipe for SFT and DPO (cosine, 10% warmup). */
static jm_status parse_steps(jm_recipe *r, const cJSON *root, const char *file, int64_t total, jm_error *err)
{
    jm_status s;
    int64_t n;
    char key[4200];
    const int tune = r->kind != JM_TASK_PRETRAIN;
    n = tune ? 8 : 1;
    if ((s = get_int(root, "batch_size", file, 1, 65536, !tune, &n, err))) return s;
    r->batch_size = (int)n;
    n = 1;
    if ((s = get_int(root, "grad_accum", file, 1, 65536, 0, &n, err))) return s;
    r->grad_accum = (int)n;

    r->adamw = (jm_adamw_config){5e-4, 0.9, 0.95, 1e-8, 0.1, 1.0};
    if (r->kind == JM_TASK_SFT) r->adamw = (jm_adamw_config){2e-5, 0.9, 0.999, 1e-8, 0.0, 1.0};
    if (r->kind == JM_TASK_DPO) r->adamw = (jm_adamw_config){5e-7, 0.9, 0.999, 1e-8, 0.0, 1.0};
    const cJSON *opt, *sch;
    if ((s = get_object(root, "optimizer", file, &opt, err))) return s;
    if (opt) {
        snprintf(key, sizeof key, "%s: optimizer", file);
        if ((s = unknown_keys(opt, key, optimizer_keys, NKEYS(optimizer_keys), false, false, err)) ||
            (s = get_num(opt, "lr", key, 0, 10, 0, &r->adamw.lr, err)) ||
            (s = get_num(opt, "beta1", key, 0, 0.999999, 0, &r->adamw.beta1, err)) ||
            (s = get_num(opt, "beta2", key, 0, 0.999999, 0, &r->adamw.beta2, err)) ||
            (s = get_num(opt, "eps", key, 1e-30, 1, 0, &r->adamw.eps, err)) ||
            (s = get_num(opt, "weight_decay", key, 0, 10, 0, &r->adamw.weight_decay, err)) ||
            (s = get_num(opt, "grad_clip", key, 0, 1e9, 0, &r->adamw.grad_clip, err)))
            return s;
    }
    r->schedule = (jm_schedule){tune ? JM_SCHEDULE_COSINE : JM_SCHEDULE_WSD, r->adamw.lr, tune ? 0.0 : 0.1, 0,
                                total, 0};
    r->warmup_ratio = tune ? 0.1 : -1;
    const int64_t most = tune ? 1000000000 : total; /* a fine-tune's length is known once its data is read */
    if ((s = get_object(root, "schedule", file, &sch, err))) return s;
    if (sch) {
        snprintf(key, sizeof key, "%s: schedule", file);
        if ((s = unknown_keys(sch, key, schedule_keys, NKEYS(schedule_keys), false, false, err))) return s;
        char type[16] = "";
        if ((s = get_str(sch, "type", key, type, sizeof type, 0, err))) return s;
        if (strcmp(type, "wsd") == 0) r->schedule.type = JM_SCHEDULE_WSD;
        else if (strcmp(type, "cosine") == 0) r->schedule.type = JM_SCHEDULE_COSINE;
        else if (strcmp(type, "constant") == 0) r->schedule.type = JM_SCHEDULE_CONSTANT;
        else if (type[0])
            return jm_fail(err, JM_ERR_CONFIG, "%s: type must be wsd, cosine or constant, not %s", key, type);
        if (cJSON_GetObjectItemCaseSensitive(sch, "warmup_steps")) {
            if (cJSON_GetObjectItemCaseSensitive(sch, "warmup_ratio"))
                return jm_fail(err, JM_ERR_CONFIG, "%s: give warmup_steps or warmup_ratio, not both", key);
            r->warmup_ratio = -1;
        }
        if ((s = get_int(sch, "warmup_steps", key, 0, most, 0, &r->schedule.warmup_steps, err))) return s;
        if ((s = get_num(sch, "warmup_ratio", key, 0, 1, 0, &r->warmup_ratio, err))) return s;
        /* WSD's decay defaults to the last phase: the paper decays during phase 2 */
        r->schedule.decay_steps = r->nphases > 1 ? r->phases[r->nphases - 1].steps : 0;
        if ((s = get_int(sch, "decay_steps", key, 0, most, 0, &r->schedule.decay_steps, err))) return s;
        if ((s = get_num(sch, "min_lr_ratio", key, 0, 1, 0, &r->schedule.min_lr_ratio, err))) return s;
    }
    if (r->warmup_ratio >= 0 && total > 0) r->schedule.warmup_steps = (int64_t)(r->warmup_ratio * total);
    r->has_aux_coef = cJSON_GetObjectItemCaseSensitive(root, "aux_loss_coef") != NULL;
    r->has_z_coef = cJSON_GetObjectItemCaseSensitive(root, "z_loss_coef") != NULL;
    if ((s = get_num(root, "aux_loss_coef", file, 0, 1e6, 0, &r->model.aux_loss_coef, err))) return s;
    if ((s = get_num(root, "z_loss_coef", file, 0, 1e6, 0, &r->model.z_loss_coef, err))) return s;
    n = 1234;
    if ((s = get_int(root, "seed", file, 0, 9007199254740991ll, 0, &n, err))) return s; /* 2^53 - 1: exact in JSON */
    r->seed = (uint64_t)n;
    r->checkpoint_every = 100;
    r->log_every = tune ? 1 : 10;
    if ((s = get_int(root, "checkpoint_every", file, 1, 1000000000, 0, &r->checkpoint_every, err)) ||
        (s = get_int(root, "log_every", file, 1, 1000000000, 0, &r->log_every, err)))
        return s;
    return JM_OK;
}

/* An SFT or DPO recipe: the shared part plus epochs, max_len, truncation and
 * DPO's beta and label smoothing. One phase, named after the task. */
static jm_status parse_tune(jm_recipe *r, const cJSON *root, const char *file, jm_error *err)
{
    jm_status s;
    int64_t n;
    if ((s = unknown_keys(root, file, tune_keys, NKEYS(tune_keys), false, false, err))) return s;
    r->nphases = 1;
    snprintf(r->phases[0].name, sizeof r->phases[0].name, "%s", jm_task_name(r->kind));
    r->phases[0].weights[0] = 1;
    r->epochs = r->kind == JM_TASK_DPO ? 1 : 3;
    if ((s = get_int(root, "epochs", file, 1, 1000000, 0, &r->epochs, err))) return s;
    n = 2048;
    if ((s = get_int(root, "max_len", file, 2, 1 << 20, 0, &n, err))) return s;
    r->seq_len = (int)n;
    char trunc[16] = "truncate";
    if ((s = get_str(root, "truncation", file, trunc, sizeof trunc, 0, err))) return s;
    if (strcmp(trunc, "truncate") && strcmp(trunc, "drop"))
        return jm_fail(err, JM_ERR_CONFIG, "%s: truncation must be \"truncate\" or \"drop\", not \"%s\"", file,
                       trunc);
    r->truncate = strcmp(trunc, "truncate") == 0;
    r->beta = 0.1;
    r->label_smoothing = 0;
    if ((s = get_num(root, "beta", file, 1e-6, 1e6, 0, &r->beta, err)) ||
        (s = get_num(root, "label_smoothing", file, 0, 0.5, 0, &r->label_smoothing, err)))
        return s;
    if ((s = get_int(root, "eval_every", file, 0, 1000000000, 0, &r->eval_every, err))) return s;
    if (r->kind != JM_TASK_DPO)
        for (const char *k = "beta"; k; k = strcmp(k, "beta") ? NULL : "label_smoothing")
            if (cJSON_GetObjectItemCaseSensitive(root, k))
                return jm_fail(err, JM_ERR_CONFIG, "%s: field %s is DPO's; an SFT recipe has none", file, k);
    return parse_steps(r, root, file, 0, err);
}

static jm_status parse_recipe(jm_recipe *r, size_t len, const char *file, jm_error *err)
{
    cJSON *root;
    jm_status s = jm_json_parse(r->text, len, file, &root, err); /* refuses a NUL byte, so strlen(text) == len */
    if (s) return s;
    int64_t n;
    char key[4200], shown[96];
    size_t nul = nul_escape(r->text, len);
    if (nul < len) {
        s = jm_fail(err, JM_ERR_CONFIG, "%s: \\u0000 (a NUL character) at byte %zu: no name or path can hold one",
                    file, nul);
        goto done;
    }
    if (!cJSON_IsObject(root)) {
        s = jm_fail(err, JM_ERR_CONFIG, "%s: expected a JSON object", file);
        goto done;
    }
    if (r->kind != JM_TASK_PRETRAIN) {
        s = parse_tune(r, root, file, err);
        goto done;
    }
    if ((s = unknown_keys(root, file, top_keys, NKEYS(top_keys), false, true, err))) goto done;
    /* model: an HF config object, validated like config.json, but only with keys that mean something */
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!cJSON_IsObject(model)) {
        s = jm_fail(err, JM_ERR_CONFIG, "%s: field model must be an object of config.json fields", file);
        goto done;
    }
    snprintf(key, sizeof key, "%s: model", file);
    if ((s = unknown_keys(model, key, model_keys, NKEYS(model_keys), true, false, err))) goto done;
    char *mtext = cJSON_PrintUnformatted(model);
    s = mtext ? jm_config_parse(mtext, strlen(mtext), key, &r->model, err)
              : jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", file);
    cJSON_free(mtext);
    if (s) goto done;
    if ((s = get_str(root, "tokenizer", file, r->tokenizer, sizeof r->tokenizer, 0, err))) goto done;
    if ((s = get_str(root, "heldout", file, r->heldout, sizeof r->heldout, 0, err))) goto done;

    const cJSON *src = cJSON_GetObjectItemCaseSensitive(root, "sources");
    if (!cJSON_IsObject(src) || !src->child) {
        s = jm_fail(err, JM_ERR_CONFIG, "%s: field sources must map source names to shard directories", file);
        goto done;
    }
    for (const cJSON *c = src->child; c; c = c->next) {
        if (r->nsources == MAX_SOURCES) {
            s = jm_fail(err, JM_ERR_CONFIG, "%s: more than %d sources", file, MAX_SOURCES);
            goto done;
        }
        if (!c->string[0] || strlen(c->string) >= 64 || has_control(c->string)) {
            s = jm_fail(err, JM_ERR_CONFIG, "%s: sources: \"%s\" is not a source name (printable, 1 to 63 bytes)",
                        file, printable(c->string, shown, sizeof shown));
            goto done;
        }
        if (!cJSON_IsString(c) || !c->valuestring[0] || strlen(c->valuestring) >= 4096 || has_control(c->valuestring)) {
            s = jm_fail(err, JM_ERR_CONFIG, "%s: sources.%s must be a directory path", file, c->string);
            goto done;
        }
        snprintf(r->source_name[r->nsources], 64, "%s", c->string);
        snprintf(r->source_dir[r->nsources], 4096, "%s", c->valuestring);
        r->nsources++;
    }

    const cJSON *ph = cJSON_GetObjectItemCaseSensitive(root, "phases");
    if (!cJSON_IsArray(ph) || !ph->child) {
        s = jm_fail(err, JM_ERR_CONFIG, "%s: field phases must be a non-empty array", file);
        goto done;
    }
    int64_t total = 0;
    for (const cJSON *c = ph->child; c; c = c->next) {
        if (r->nphases == MAX_PHASES || !cJSON_IsObject(c)) {
            s = jm_fail(err, JM_ERR_CONFIG, "%s: phases must be at most %d objects", file, MAX_PHASES);
            goto done;
        }
        phase *p = &r->phases[r->nphases];
        snprintf(key, sizeof key, "%s: phases[%d]", file, r->nphases);
        if ((s = unknown_keys(c, key, phase_keys, NKEYS(phase_keys), false, false, err))) goto done;
        snprintf(p->name, sizeof p->name, "phase%d", r->nphases + 1);
        if ((s = get_str(c, "name", key, p->name, sizeof p->name, 0, err))) goto done;
        if ((s = get_int(c, "steps", key, 1, 1000000000, 1, &p->steps, err))) goto done;
        const cJSON *mix = cJSON_GetObjectItemCaseSensitive(c, "mixture");
        if (!cJSON_IsObject(mix)) {
            s = jm_fail(err, JM_ERR_CONFIG, "%s: field mixture must map source names to weights", key);
            goto done;
        }
        double sum = 0;
        for (const cJSON *w = mix->child; w; w = w->next) {
            int i = 0;
            while (i < r->nsources && strcmp(r->source_name[i], w->string) != 0) i++;
            if (i == r->nsources) {
                const char *names[MAX_SOURCES];
                for (int k = 0; k < r->nsources; k++) names[k] = r->source_name[k];
                int best = jm_closest_name(w->string, names, r->nsources);
                char hint[100] = "";
                if (best >= 0) snprintf(hint, sizeof hint, " (did you mean \"%s\"?)", names[best]);
                s = jm_fail(err, JM_ERR_CONFIG, "%s: mixture names unknown source \"%s\"%s", key,
                            printable(w->string, shown, sizeof shown), hint);
                goto done;
            }
            if (!cJSON_IsNumber(w) || !(w->valuedouble >= 0) || !isfinite(w->valuedouble)) {
                s = jm_fail(err, JM_ERR_CONFIG, "%s: mixture weight of %s must be >= 0", key, w->string);
                goto done;
            }
            p->weights[i] = w->valuedouble;
            sum += w->valuedouble;
        }
        if (!(sum > 0)) {
            s = jm_fail(err, JM_ERR_CONFIG, "%s: mixture weights must not all be 0", key);
            goto done;
        }
        total += p->steps;
        r->nphases++;
    }

    if ((s = get_int(root, "seq_len", file, 2, r->model.max_position_embeddings, 1, &n, err))) goto done;
    r->seq_len = (int)n;
    if ((s = parse_steps(r, root, file, total, err))) goto done;
    r->eval_tokens = 65536;
    r->eval_every = 0;
    if ((s = get_int(root, "eval_tokens", file, 0, 1000000000000ll, 0, &r->eval_tokens, err)) ||
        (s = get_int(root, "eval_every", file, 0, 1000000000, 0, &r->eval_every, err)))
        goto done;
    if (r->eval_every > 0 && !r->heldout[0]) {
        s = jm_fail(err, JM_ERR_CONFIG, "%s: field eval_every needs heldout, the shard directory to evaluate on",
                    file);
        goto done;
    }
done:
    cJSON_Delete(root);
    return s;
}

static jm_status recipe_parse_kind(const char *text, size_t len, const char *name, jm_task_kind kind,
                                   jm_recipe **out, jm_error *err)
{
    *out = NULL;
    jm_recipe *r = calloc(1, sizeof *r);
    if (!r || !(r->text = malloc(len + 1))) {
        free(r);
        return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", name);
    }
    r->kind = kind;
    memcpy(r->text, text, len);
    r->text[len] = 0;
    jm_status s = parse_recipe(r, len, name, err);
    if (s) {
        jm_recipe_free(r);
        return s;
    }
    r->hash = fnv1a(r->text, len);
    *out = r;
    return JM_OK;
}

jm_status jm_recipe_parse(const char *text, size_t len, const char *name, jm_recipe **out, jm_error *err)
{
    return recipe_parse_kind(text, len, name, JM_TASK_PRETRAIN, out, err);
}

jm_status jm_recipe_load_kind(const char *path, jm_task_kind kind, jm_recipe **out, jm_error *err)
{
    if (kind == JM_TASK_PRETRAIN) return jm_recipe_load(path, out, err);
    if (!path) return recipe_parse_kind("{}", 2, "the default recipe", kind, out, err);
    char *text;
    size_t len;
    jm_status s = jm_read_file(path, (size_t)1 << 26, &text, &len, err);
    if (s) return s;
    s = recipe_parse_kind(text, len, path, kind, out, err);
    free(text);
    return s;
}

void jm_recipe_set_steps(jm_recipe *r, int64_t total_steps)
{
    r->phases[0].steps = total_steps;
    r->schedule.total_steps = total_steps;
    if (r->warmup_ratio >= 0) r->schedule.warmup_steps = (int64_t)(r->warmup_ratio * total_steps);
    if (r->schedule.warmup_steps > total_steps) r->schedule.warmup_steps = total_steps;
    if (r->schedule.decay_steps > total_steps) r->schedule.decay_steps = total_steps;
}

void jm_recipe_hash_more(jm_recipe *r, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) r->hash = (r->hash ^ p[i]) * 1099511628211ull;
}

/* ---- recipe: what the run needs, checked before its first step ---- */

/* Prefixes err's message: "<recipe>: field heldout: <the reader's message>". */
static jm_status in_field(jm_status s, const char *file, const char *field, jm_error *err)
{
    if (!err) return s;
    char inner[sizeof err->msg];
    snprintf(inner, sizeof inner, "%s", err->msg);
    return jm_fail(err, s, "%s: field %s: %s", file, field, inner);
}

/* tokenizer_config.json as every checkpoint gets it: model_max_length set to
 * the model's context (spm-trained tokenizers say 4096, Llama-2's), every
 * other field kept. Run once before training (the check) and at each checkpoint. */
static jm_status tokenizer_config_for(const char *src, int max_len, cJSON **out, jm_error *err)
{
    char *text;
    size_t len;
    cJSON *root;
    *out = NULL;
    jm_status s = jm_read_file(src, 1 << 24, &text, &len, err);
    if (s) return s;
    s = jm_json_parse(text, len, src, &root, err);
    free(text);
    if (s) return s;
    cJSON *n = cJSON_IsObject(root) ? cJSON_CreateNumber(max_len) : NULL;
    if (!cJSON_IsObject(root))
        s = jm_fail(err, JM_ERR_FORMAT, "%s: expected a JSON object", src);
    else if (!n)
        s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", src);
    else if (cJSON_GetObjectItemCaseSensitive(root, "model_max_length")
                 ? !cJSON_ReplaceItemInObjectCaseSensitive(root, "model_max_length", n)
                 : !cJSON_AddItemToObject(root, "model_max_length", n)) {
        cJSON_Delete(n);
        s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", src);
    }
    if (s) cJSON_Delete(root);
    else *out = root;
    return s;
}

/* The tokenizer a checkpoint copies: a directory with tokenizer.model or
 * tokenizer.json that loads; no more pieces than the model has embedding rows
 * (a model may have spare rows, never an id without one); its EOS is the
 * model's; its tokenizer_config.json, if any, copies. */
static jm_status check_tokenizer(const jm_recipe *r, const char *file, jm_error *err)
{
    const char *dir = r->tokenizer;
    char path[4200];
    struct stat st;
    if (stat(dir, &st) != 0)
        return jm_fail(err, JM_ERR_CONFIG, "%s: field tokenizer: %s: %s", file, dir, strerror(errno));
    bool has_model = false, has_json = false;
    if (S_ISDIR(st.st_mode)) {
        snprintf(path, sizeof path, "%s/tokenizer.model", dir);
        has_model = access(path, R_OK) == 0;
        snprintf(path, sizeof path, "%s/tokenizer.json", dir);
        has_json = access(path, R_OK) == 0;
    }
    if (!has_model && !has_json)
        return jm_fail(err, JM_ERR_CONFIG, "%s: field tokenizer: %s is not a directory holding tokenizer.model or "
                       "tokenizer.json (the files every checkpoint copies)", file, dir);
    jm_tokenizer *t;
    jm_status s = jm_tokenizer_load(dir, &t, err);
    if (s) return in_field(s, file, "tokenizer", err);
    int pieces = jm_tokenizer_vocab_size(t), eos = jm_tokenizer_eos_id(t);
    jm_tokenizer_free(t);
    const jm_config *c = &r->model;
    if (pieces > c->vocab_size)
        return jm_fail(err, JM_ERR_CONFIG, "%s: the tokenizer %s has %d pieces, more than model.vocab_size %d: ids "
                       "from %d on would have no embedding row", file, dir, pieces, c->vocab_size, c->vocab_size);
    if (eos < 0)
        return jm_fail(err, JM_ERR_CONFIG, "%s: the tokenizer %s has no EOS token to end documents with", file, dir);
    if (eos != c->eos_token_id)
        return jm_fail(err, JM_ERR_CONFIG, "%s: model.eos_token_id is %d but the tokenizer %s ends documents with %d",
                       file, c->eos_token_id, dir, eos);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    if (access(path, F_OK) != 0) return JM_OK;
    cJSON *tc;
    if ((s = tokenizer_config_for(path, c->max_position_embeddings, &tc, err)))
        return in_field(s, file, "tokenizer", err);
    cJSON_Delete(tc);
    return JM_OK;
}

/* The held-out shards as jm_eval_shards reads them: every *.bin opens, made
 * for the model's vocabulary and EOS, and one holds a whole seq_len window. */
static jm_status check_heldout(const jm_recipe *r, const char *file, jm_error *err)
{
    char **names;
    int n, nbin = 0;
    bool window = false;
    jm_status s = jm_shard_list(r->heldout, &names, &n, err);
    if (s) return in_field(s, file, "heldout", err);
    for (int i = 0; i < n && !s; i++) {
        nbin++;
        const char *path = names[i];
        jm_shard sh;
        if ((s = jm_shard_open(path, &sh, err))) s = in_field(s, file, "heldout", err);
        else {
            if (sh.vocab_size != (uint32_t)r->model.vocab_size)
                s = jm_fail(err, JM_ERR_CONFIG, "%s: field heldout: %s: vocab size %u, but model.vocab_size is %d "
                            "(prepared with another tokenizer?)", file, path, sh.vocab_size, r->model.vocab_size);
            else if (sh.eos_id != (uint32_t)r->model.eos_token_id)
                s = jm_fail(err, JM_ERR_CONFIG, "%s: field heldout: %s: EOS id %u, but model.eos_token_id is %d",
                            file, path, sh.eos_id, r->model.eos_token_id);
            window |= sh.n >= (uint64_t)r->seq_len;
            jm_shard_close(&sh);
        }
    }
    jm_free_names(names, n);
    if (!s && nbin == 0)
        s = jm_fail(err, JM_ERR_CONFIG, "%s: field heldout: %s has no token shards (*.bin)", file, r->heldout);
    if (!s && !window)
        s = jm_fail(err, JM_ERR_CONFIG, "%s: field heldout: no shard in %s holds a whole window of seq_len %d tokens",
                    file, r->heldout, r->seq_len);
    return s;
}

/* Everything a run reads, before it writes anything: the tokenizer, the
 * held-out shards, then the sources (read whole, the longest: the sampler
 * that checks them is the one the run uses). */
static jm_status check_inputs(jm_recipe *r, const char *file, jm_error *err)
{
    jm_status s;
    if (r->tokenizer[0] && (s = check_tokenizer(r, file, err))) return s;
    if (r->heldout[0] && (s = check_heldout(r, file, err))) return s;
    const char *names[MAX_SOURCES], *dirs[MAX_SOURCES];
    for (int i = 0; i < r->nsources; i++) {
        names[i] = r->source_name[i];
        dirs[i] = r->source_dir[i];
    }
    if ((s = jm_sampler_open(names, dirs, r->nsources, r->seq_len, r->seed, (uint32_t)r->model.vocab_size,
                             &r->sampler, err)))
        return in_field(s, file, "sources", err);
    if (jm_sampler_eos_id(r->sampler) != (uint32_t)r->model.eos_token_id)
        return jm_fail(err, JM_ERR_CONFIG, "%s: field sources: the shards end documents with EOS id %u, but "
                       "model.eos_token_id is %d", file, jm_sampler_eos_id(r->sampler), r->model.eos_token_id);
    return JM_OK;
}

jm_status jm_recipe_load(const char *path, jm_recipe **out, jm_error *err)
{
    *out = NULL;
    char *text;
    size_t len;
    jm_status s = jm_read_file(path, 1 << 20, &text, &len, err);
    if (s) return s;
    s = jm_recipe_parse(text, len, path, out, err);
    free(text);
    if (!s && (s = check_inputs(*out, path, err))) {
        jm_recipe_free(*out);
        *out = NULL;
    }
    return s;
}

void jm_recipe_free(jm_recipe *r)
{
    if (!r) return;
    jm_sampler_free(r->sampler);
    free(r->text);
    free(r);
}

const jm_config *jm_recipe_model(const jm_recipe *r) { return &r->model; }
int64_t jm_recipe_total_steps(const jm_recipe *r) { return r->schedule.total_steps; }

/* ---- trainer state ---- */

typedef struct {
    jm_recipe *r;
    jm_model *m;
    jm_optimizer *opt;
    jm_comm *comm;         /* the process grid */
    jm_par *par;           /* and how a step runs on it */
    int rank;              /* rank 0 writes the run directory */
    jm_task *task;
    const char *tokenizer; /* the directory whose files go into each checkpoint ("" : none) */
    char tokenizer_ck[4300]; /* ... once it was one of this run's checkpoints: the newest (save_checkpoint) */
    int64_t step;          /* completed optimizer steps */
    char dir[4096];
    /* the end-of-run expert-load summary, in the checkpoint so that a resumed run reports what a straight one does */
    double *tail;          /* 2*L*E: summed loads of the logged steps among the last ten logs */
    int64_t n_tail;        /* how many */
    double last_min_share; /* of the last logged step; NaN before one */
    int64_t saved_layout[3]; /* world size, replicas, stages of the run that wrote the resumed checkpoint */
} trainer;

static int phase_of(const jm_recipe *r, int64_t step)
{
    int64_t end = 0;
    for (int p = 0; p < r->nphases; p++) {
        end += r->phases[p].steps;
        if (step < end) return p;
    }
    return r->nphases - 1;
}

#define MAX_STATE 32 /* tensors in trainer_state.safetensors */

/* Every rank takes part (the optimizer state is gathered onto rank 0); rank 0 writes. */
static jm_status save_trainer_state(trainer *t, const char *path, jm_error *err)
{
    int64_t *stepp, lo, hi;
    float *om, *ov;
    jm_optimizer_shard(t->opt, &stepp, &om, &ov, &lo, &hi);
    const int64_t numel = jm_config_num_params(jm_model_config(t->m));
    float *m = NULL, *v = NULL;
    if (t->rank == 0 && (!(m = malloc(sizeof(float) * (size_t)numel)) || !(v = malloc(sizeof(float) * (size_t)numel)))) {
        free(m);
        return jm_fail(err, JM_ERR_NOMEM, "out of memory for the optimizer state (%.2f GB)", numel * 8e-9);
    }
    jm_status s = jm_par_gather_adamw(t->par, t->opt, m, v, err);
    if (s || t->rank != 0) {
        free(m);
        free(v);
        return s;
    }
    int64_t step = t->step, layout[3] = {jm_comm_size(t->comm), jm_comm_dp(t->comm), jm_comm_pp(t->comm)};
    uint64_t hash = t->r->hash;
    const jm_config *c = jm_model_config(t->m);
    st_out o[MAX_STATE] = {
        {"step", ST_I64, 1, {1}, &step},
        {"recipe_hash", ST_U64, 1, {1}, &hash},
        {"adamw.step", ST_I64, 1, {1}, stepp},
        {"adamw.m", ST_F32, 1, {numel}, m},
        {"adamw.v", ST_F32, 1, {numel}, v},
        {"loop.tail_load", ST_F64, 1, {2 * (int64_t)c->num_layers * c->num_experts}, t->tail},
        {"loop.tail_count", ST_I64, 1, {1}, &t->n_tail},
        {"loop.last_min_share", ST_F64, 1, {1}, &t->last_min_share},
        /* the layout that wrote it (world size, replicas, stages): informative, any layout resumes */
        {"layout", ST_I64, 1, {3}, layout},
    };
    int n = t->task->state(t->task->ctx, o + 9, MAX_STATE - 9, err);
    s = n < 0 ? JM_ERR_NOMEM : st_write(path, o, 9 + n, NULL, NULL, 0, err);
    free(m);
    free(v);
    return s;
}

/* Copies a tensor of the expected dtype and element count out of a state file. */
jm_status jm_state_tensor(const st_file *f, const char *name, st_dtype dt, int64_t numel, void *out, jm_error *err)
{
    const st_tensor *t = st_find(f, name);
    if (!t || t->dtype != dt || t->numel != numel)
        return jm_fail(err, JM_ERR_FORMAT, "%s: tensor %s missing or of the wrong type/size", f->path, name);
    memcpy(out, t->data, (size_t)numel * st_dtype_size(dt));
    return JM_OK;
}

/* Every rank reads the state and keeps its shard of the optimizer's. */
static jm_status load_trainer_state(trainer *t, const char *path, jm_error *err)
{
    st_file f;
    jm_status s = st_open(path, &f, err);
    if (s) return s;
    int64_t *stepp, lo, hi, step;
    float *om, *ov;
    uint64_t hash;
    jm_optimizer_shard(t->opt, &stepp, &om, &ov, &lo, &hi);
    const int64_t numel = jm_config_num_params(jm_model_config(t->m));
    if (!s) s = jm_state_tensor(&f, "step", ST_I64, 1, &step, err);
    if (!s) s = jm_state_tensor(&f, "recipe_hash", ST_U64, 1, &hash, err);
    if (!s && hash != t->r->hash)
        s = jm_fail(err, JM_ERR_ARG, "%s: the run was made with another recipe%s; resume with the same one, or start "
                    "a new run from this checkpoint's weights (%s)", path,
                    t->r->kind == JM_TASK_PRETRAIN ? "" : " or data",
                    t->r->kind == JM_TASK_PRETRAIN ? "pretrain --init" : "--model");
    if (!s) s = jm_state_tensor(&f, "adamw.step", ST_I64, 1, stepp, err);
    const st_tensor *m = st_find(&f, "adamw.m"), *v = st_find(&f, "adamw.v");
    if (!s && (!m || !v || m->dtype != ST_F32 || v->dtype != ST_F32 || m->numel != numel || v->numel != numel))
        s = jm_fail(err, JM_ERR_FORMAT, "%s: tensor adamw.m or adamw.v missing or of the wrong type/size", path);
    if (!s) jm_par_scatter_adamw(t->par, t->opt, (const float *)m->data, (const float *)v->data);
    const jm_config *c = jm_model_config(t->m);
    if (!s && st_find(&f, "loop.tail_load")) { /* absent from checkpoints written before it was kept */
        s = jm_state_tensor(&f, "loop.tail_load", ST_F64, 2 * (int64_t)c->num_layers * c->num_experts, t->tail, err);
        if (!s) s = jm_state_tensor(&f, "loop.tail_count", ST_I64, 1, &t->n_tail, err);
        if (!s) s = jm_state_tensor(&f, "loop.last_min_share", ST_F64, 1, &t->last_min_share, err);
    }
    if (!s && st_find(&f, "layout")) s = jm_state_tensor(&f, "layout", ST_I64, 3, t->saved_layout, err);
    if (!s) s = t->task->restore(t->task->ctx, &f, step, err);
    if (!s) t->step = step;
    st_close(&f);
    return s;
}

/* Writes checkpoints/step_N (model + trainer state) and points `latest` at it. */
static jm_status save_checkpoint(trainer *t, jm_error *err)
{
    char ck[4200], tmp[4300], final[4300], path[8192];
    snprintf(ck, sizeof ck, "%s/checkpoints", t->dir);
    jm_status s = jm_par_sync_params(t->par, err); /* rank 0 writes the weights of every stage */
    if (!s && t->rank != 0) return save_trainer_state(t, NULL, err); /* its part of the optimizer state */
    if (!s) s = jm_mkdir_p(ck, err);
    if (s) return s;
    snprintf(tmp, sizeof tmp, "%s/step_%lld.tmp.XXXXXX", ck, (long long)t->step);
    if (!mkdtemp(tmp)) return jm_fail(err, JM_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
    s = jm_model_save(t->m, tmp, err);
    snprintf(path, sizeof path, "%s/trainer_state.safetensors", tmp);
    if (!s) s = save_trainer_state(t, path, err);
    /* the tokenizer travels with the weights, as in any HF model directory */
    static const char *const tok_files[] = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                            "special_tokens_map.json"};
    for (int i = 0; i < 4 && !s && t->tokenizer[0]; i++) {
        char src[8192], dst[8192];
        snprintf(src, sizeof src, "%s/%s", t->tokenizer, tok_files[i]);
        snprintf(dst, sizeof dst, "%s/%s", tmp, tok_files[i]);
        if (access(src, R_OK) != 0) continue;
        cJSON *tc = NULL;
        if (i != 2) s = jm_copy_file(src, dst, err);
        else if (!(s = tokenizer_config_for(src, jm_model_config(t->m)->max_position_embeddings, &tc, err)))
            s = jm_write_json(dst, tc, err);
        cJSON_Delete(tc);
    }
    if (s) {
        jm_remove_dir(tmp);
        return s;
    }
    jm_fsync_path(tmp);
    snprintf(final, sizeof final, "%s/step_%lld", ck, (long long)t->step);
    jm_remove_dir(final); /* a checkpoint of this step from an earlier, interrupted run */
    if (rename(tmp, final) != 0) {
        s = jm_fail(err, JM_ERR_IO, "%s: %s", final, strerror(errno));
        jm_remove_dir(tmp);
        return s;
    }
    jm_fsync_path(ck);
    jm_atomic_file a;
    char name[64];
    int n = snprintf(name, sizeof name, "step_%lld\n", (long long)t->step);
    snprintf(path, sizeof path, "%s/latest", ck);
    if ((s = jm_atomic_open(&a, path, err))) return s;
    if ((s = jm_atomic_write(&a, name, (size_t)n, err))) {
        jm_atomic_abort(&a);
        return s;
    }
    if ((s = jm_atomic_commit(&a, err))) return s;
    /* a resumed fine-tune copies the tokenizer from the checkpoint it resumed from, which the pruning below
     * removes in time: from now on it comes from this one, which holds the same files */
    size_t nck = strlen(ck);
    if (t->tokenizer[0] && strncmp(t->tokenizer, ck, nck) == 0 && t->tokenizer[nck] == '/') {
        snprintf(t->tokenizer_ck, sizeof t->tokenizer_ck, "%s", final);
        t->tokenizer = t->tokenizer_ck;
    }
    /* keep the two newest checkpoints: this one and the newest of an earlier
     * step. Older step_N go, as do *.tmp.* left by a killed run; later steps
     * (only a fresh run over an old run's directory has them) stay until this
     * run rewrites them. */
    long long prev = -1, st;
    char rest[8];
    for (int pass = 0; pass < 2; pass++) {
        DIR *d = opendir(ck);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            int stale_tmp = strstr(e->d_name, ".tmp.") != NULL;
            int is_step = sscanf(e->d_name, "step_%lld%7s", &st, rest) == 1;
            if (pass == 0 && is_step && st < t->step && st > prev) prev = st;
            if (pass == 1 && (stale_tmp || (is_step && st < prev))) {
                snprintf(path, sizeof path, "%s/%s", ck, e->d_name);
                jm_remove_dir(path);
            }
        }
        if (d) closedir(d);
    }
    return JM_OK;
}

/* ---- metrics, progress and plot ---- */

/* Keeps metrics.jsonl lines up to step (a resumed run rewrites what follows),
 * but not a held-out record at the final step: resuming a finished run
 * evaluates again and would repeat it. */
static jm_status truncate_metrics(const char *path, int64_t step, int64_t final_step, jm_error *err)
{
    char *text;
    size_t len;
    if (access(path, F_OK) != 0) return JM_OK;
    jm_status s = jm_read_file(path, (size_t)1 << 30, &text, &len, err);
    if (s) return s;
    jm_atomic_file a;
    if ((s = jm_atomic_open(&a, path, err))) {
        free(text);
        return s;
    }
    for (char *line = text; *line && !s;) {
        char *nl = strchr(line, '\n');
        size_t n = nl ? (size_t)(nl - line + 1) : strlen(line);
        long long st = -1;
        int keep = sscanf(line, "{\"step\":%lld", &st) == 1 && st <= step;
        if (keep && st == final_step && memmem(line, n, "\"heldout_loss\"", 14)) keep = 0;
        if (keep) s = jm_atomic_write(&a, line, n, err);
        line += n;
    }
    free(text);
    if (s) {
        jm_atomic_abort(&a);
        return s;
    }
    return jm_atomic_commit(&a, err);
}

static void format_eta(char *buf, size_t n, double secs)
{
    if (!(secs >= 0) || secs > 1e7) snprintf(buf, n, "--");
    else if (secs >= 3600) snprintf(buf, n, "%dh%02dm", (int)(secs / 3600), (int)fmod(secs / 60, 60));
    else snprintf(buf, n, "%dm%02ds", (int)(secs / 60), (int)fmod(secs, 60));
}

/* ---- the plot ---- */

typedef struct {
    double *x, *y;
    size_t n, cap;
} series;

static int series_push(series *s, double x, double y)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 256;
        double *nx = realloc(s->x, cap * sizeof *nx);
        if (!nx) return -1;
        s->x = nx;
        double *ny = realloc(s->y, cap * sizeof *ny);
        if (!ny) return -1;
        s->y = ny;
        s->cap = cap;
    }
    s->x[s->n] = x;
    s->y[s->n++] = y;
    return 0;
}

static void series_free(series *s)
{
    free(s->x);
    free(s->y);
}

/* Where things go: every panel shares the x axis (optimizer steps 0..total). */
typedef struct {
    double left, width, total;
} x_axis;
typedef struct {
    double top, height, lo, hi; /* hi maps to top, lo to top + height */
} panel;

static double px(const x_axis *a, double step) { return a->left + step / a->total * a->width; }
static double py(const panel *p, double v)
{
    double f = (v - p->lo) / (p->hi - p->lo);
    return p->top + p->height * (1 - fmin(fmax(f, 0), 1));
}

/* A round tick spacing (1, 2 or 5 x 10^k) giving about n ticks over span. */
static double tick_step(double span, int n)
{
    double raw = span / n, p = pow(10, floor(log10(raw))), f = raw / p;
    return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

static void format_count(char *buf, size_t n, double v)
{
    if (v >= 1e9) snprintf(buf, n, "%.3gB", v / 1e9);
    else if (v >= 1e6) snprintf(buf, n, "%.3gM", v / 1e6);
    else if (v >= 1e3) snprintf(buf, n, "%.3gk", v / 1e3);
    else snprintf(buf, n, "%.0f", v);
}

static void svg_escaped(FILE *f, const char *s)
{
    for (; *s; s++) {
        if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if (*s == '&') fputs("&amp;", f);
        else if (*s == '\'') fputs("&apos;", f);
        else if (*s == '"') fputs("&quot;", f);
        else fputc(*s, f);
    }
}

static void polyline(FILE *f, const char *cls, const char *style, const x_axis *a, const panel *p, const double *x,
                     const double *y, size_t n)
{
    fprintf(f, "<polyline class='%s' fill='none' %s points='", cls, style);
    for (size_t i = 0; i < n; i++) fprintf(f, "%.2f,%.2f ", px(a, x[i]), py(p, y[i]));
    fprintf(f, "'/>\n");
}

/* The panel's frame, its y-axis title (rotated, at the left) and n_ticks labelled ticks. */
static void panel_frame(FILE *f, const char *name, const char *title, const x_axis *a, const panel *p,
                        const double *ticks, int n_ticks, int grid)
{
    fprintf(f, "<rect class='panel' data-panel='%s' x='%.2f' y='%.2f' width='%.2f' height='%.2f' fill='none' "
               "stroke='#999'/>\n", name, a->left, p->top, a->width, p->height);
    double cy = p->top + p->height / 2;
    fprintf(f, "<text x='14' y='%.1f' transform='rotate(-90 14 %.1f)' text-anchor='middle'>%s</text>\n", cy, cy,
            title);
    for (int i = 0; i < n_ticks; i++) {
        double y = py(p, ticks[i]);
        if (grid)
            fprintf(f, "<line x1='%.2f' x2='%.2f' y1='%.2f' y2='%.2f' stroke='#eee'/>\n", a->left, a->left + a->width,
                    y, y);
        fprintf(f, "<line x1='%.2f' x2='%.2f' y1='%.2f' y2='%.2f' stroke='#999'/>"
                   "<text x='%.2f' y='%.2f' text-anchor='end' font-size='10'>%.3g</text>\n",
                a->left - 4, a->left, y, y, a->left - 6, y + 3.5, ticks[i]);
    }
}

/* loss.svg from metrics.jsonl and the recipe: training loss (raw, faint, and
 * its EMA), held-out loss, the unigram entropy, the learning rate and the
 * least-loaded expert's share of its fair load (1 = balanced), over the steps,
 * with the phase boundaries. Best effort: a plot is never worth failing a run. */
static void write_plot(const char *dir, const jm_recipe *r)
{
    char path[4200], *text;
    size_t len;
    jm_error err;
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    if (jm_read_file(path, (size_t)1 << 30, &text, &len, &err)) return;
    series loss = {0}, bal = {0}, held = {0};
    double unigram = NAN;
    int oom = 0;
    for (char *line = text; line && *line && !oom;) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        cJSON *j = cJSON_Parse(line);
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(j, "step"), *l = cJSON_GetObjectItemCaseSensitive(j, "loss");
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(j, "min_expert_share");
        const cJSON *h = cJSON_GetObjectItemCaseSensitive(j, "heldout_loss");
        const cJSON *u = cJSON_GetObjectItemCaseSensitive(j, "unigram_entropy");
        if (cJSON_IsNumber(st) && cJSON_IsNumber(l))
            oom |= series_push(&loss, st->valuedouble, l->valuedouble) ||
                   series_push(&bal, st->valuedouble, cJSON_IsNumber(b) ? b->valuedouble : 1.0);
        if (cJSON_IsNumber(st) && cJSON_IsNumber(h)) oom |= series_push(&held, st->valuedouble, h->valuedouble);
        if (cJSON_IsNumber(u)) unigram = u->valuedouble;
        cJSON_Delete(j);
        line = nl ? nl + 1 : NULL;
    }
    free(text);
    const int64_t total = r->schedule.total_steps;
    const double tokens_per_step = (double)r->batch_size * r->seq_len * r->grad_accum;
    /* the schedule's learning rate at every step (at most ~1000 samples): step s ran at lr(s - 1) */
    series lr = {0};
    double lr_max = 0;
    const int64_t inc = total / 1000 + 1;
    for (int64_t s = 1; s <= total && !oom; s = s < total && s + inc > total ? total : s + inc) {
        double v = jm_schedule_lr(&r->schedule, s - 1);
        lr_max = fmax(lr_max, v);
        oom |= series_push(&lr, (double)s, v);
    }
    double *ema = loss.n && !oom ? malloc(loss.n * sizeof *ema) : NULL;
    char *svg = NULL;
    size_t svg_len = 0;
    FILE *f = ema ? open_memstream(&svg, &svg_len) : NULL;
    if (f) {
        /* EMA with bias correction, spanning about a tenth of the logged points */
        double beta = 1 - 2 / (fmax(2.0, loss.n / 10.0) + 1), m = 0, lo = 1e30, hi = -1e30;
        for (size_t i = 0; i < loss.n; i++) {
            m = beta * m + (1 - beta) * loss.y[i];
            ema[i] = m / (1 - pow(beta, (double)(i + 1)));
            lo = fmin(lo, loss.y[i]);
            hi = fmax(hi, loss.y[i]);
        }
        for (size_t i = 0; i < held.n; i++) lo = fmin(lo, held.y[i]), hi = fmax(hi, held.y[i]);
        if (isfinite(unigram)) lo = fmin(lo, unigram), hi = fmax(hi, unigram);
        if (hi - lo < 1e-9) hi = lo + 1;
        double pad = 0.04 * (hi - lo);
        const double W = 800, H = 610;
        const x_axis ax = {70, W - 70 - 24, total > 0 ? (double)total : 1};
        const panel pl = {48, 300, lo - pad, hi + pad}, pr = {372, 80, 0, lr_max > 0 ? lr_max : 1},
                    pb = {476, 70, 0, 1};
        fprintf(f, "<svg xmlns='http://www.w3.org/2000/svg' width='%g' height='%g' font-family='sans-serif' "
                   "font-size='12'>\n<rect width='100%%' height='100%%' fill='white'/>\n", W, H);
        fprintf(f, "<text x='%g' y='20' font-size='14'>training loss, held-out loss, learning rate and expert load"
                   "</text>\n", ax.left);
        double ticks[64];
        int nt = 0;
        double ts = tick_step(pl.hi - pl.lo, 5);
        for (double v = ceil(pl.lo / ts) * ts; v <= pl.hi && nt < 64; v += ts) ticks[nt++] = v;
        panel_frame(f, "loss", r->kind == JM_TASK_DPO ? "DPO loss (per pair)" : "loss (nats/token)", &ax, &pl, ticks,
                    nt, 1);
        const double lr_ticks[] = {0, pr.hi / 2, pr.hi}, bal_ticks[] = {0, 0.5, 1};
        panel_frame(f, "lr", "learning rate", &ax, &pr, lr_ticks, 3, 1);
        panel_frame(f, "expert-load", "min expert share", &ax, &pb, bal_ticks, 3, 1);

        /* x axis: steps, and tokens seen beneath them */
        double bottom = pb.top + pb.height, xs = tick_step(ax.total, 8);
        for (double v = 0; v <= ax.total + 1e-9; v += xs) {
            char tok[32];
            format_count(tok, sizeof tok, v * tokens_per_step);
            fprintf(f, "<line x1='%.2f' x2='%.2f' y1='%.2f' y2='%.2f' stroke='#999'/>"
                       "<text x='%.2f' y='%.2f' text-anchor='middle'>%.0f</text>"
                       "<text x='%.2f' y='%.2f' text-anchor='middle' font-size='10' fill='#666'>%s</text>\n",
                    px(&ax, v), px(&ax, v), bottom, bottom + 4, px(&ax, v), bottom + 17, v, px(&ax, v), bottom + 30,
                    tok);
        }
        fprintf(f, "<text x='%.2f' y='%.2f' text-anchor='middle'>optimizer step (grey: tokens %s, %.0f per step)"
                   "</text>\n", ax.left + ax.width / 2, bottom + 50,
                r->kind == JM_TASK_PRETRAIN ? "seen" : "of packed-row capacity", tokens_per_step);

        /* phases: a dashed line where each one after the first begins, names above */
        int64_t start = 0;
        for (int p = 0; p < r->nphases; p++) {
            double x = px(&ax, (double)start);
            if (p > 0)
                fprintf(f, "<line class='phase-boundary' data-step='%lld' x1='%.2f' x2='%.2f' y1='%.2f' y2='%.2f' "
                           "stroke='#555' stroke-dasharray='4 3'/>\n", (long long)start, x, x, pl.top - 12, bottom);
            fprintf(f, "<text class='phase-name' data-step='%lld' x='%.2f' y='%.2f' fill='#555'>", (long long)start,
                    x + 4, pl.top - 4);
            svg_escaped(f, r->phases[p].name);
            fprintf(f, "</text>\n");
            start += r->phases[p].steps;
        }

        /* loss panel: raw faint, EMA solid, held-out points, unigram entropy dashed */
        polyline(f, "loss-raw", "stroke='#2c7fb8' stroke-opacity='0.3' stroke-width='1'", &ax, &pl, loss.x, loss.y,
                 loss.n);
        polyline(f, "loss-ema", "stroke='#2c7fb8' stroke-width='2'", &ax, &pl, loss.x, ema, loss.n);
        if (isfinite(unigram)) /* labelled at the right, where the loss has fallen below it */
            fprintf(f, "<line class='unigram' x1='%.2f' x2='%.2f' y1='%.2f' y2='%.2f' stroke='#888' "
                       "stroke-dasharray='2 3'/><text x='%.2f' y='%.2f' font-size='10' fill='#666' "
                       "text-anchor='end'>unigram entropy of the training data %.2f</text>\n", ax.left,
                    ax.left + ax.width, py(&pl, unigram), py(&pl, unigram), ax.left + ax.width - 4,
                    py(&pl, unigram) - 4, unigram);
        for (size_t i = 0; i < held.n; i++)
            fprintf(f, "<circle class='heldout' data-step='%.0f' cx='%.2f' cy='%.2f' r='4' fill='#d95f02'/>\n",
                    held.x[i], px(&ax, held.x[i]), py(&pl, held.y[i]));
        double lx = ax.left + ax.width - 262, ly = pl.top + 16;
        fprintf(f, "<g font-size='11'><line x1='%.2f' x2='%.2f' y1='%.2f' y2='%.2f' stroke='#2c7fb8' "
                   "stroke-opacity='0.3'/><text x='%.2f' y='%.2f'>training loss (logged steps)</text>\n",
                lx, lx + 20, ly, ly, lx + 26, ly + 4);
        fprintf(f, "<line x1='%.2f' x2='%.2f' y1='%.2f' y2='%.2f' stroke='#2c7fb8' stroke-width='2'/>"
                   "<text x='%.2f' y='%.2f'>its moving average (EMA)</text>\n",
                lx, lx + 20, ly + 16, ly + 16, lx + 26, ly + 20);
        fprintf(f, "<circle cx='%.2f' cy='%.2f' r='4' fill='#d95f02'/><text x='%.2f' y='%.2f'>held-out loss",
                lx + 10, ly + 32, lx + 26, ly + 36);
        if (held.n && r->kind == JM_TASK_DPO) /* a perplexity means nothing for a pairwise loss */
            fprintf(f, " (step %.0f: %.3f)", held.x[held.n - 1], held.y[held.n - 1]);
        else if (held.n)
            fprintf(f, " (step %.0f: %.3f, ppl %.1f)", held.x[held.n - 1], held.y[held.n - 1],
                    exp(held.y[held.n - 1]));
        fprintf(f, "</text></g>\n");

        polyline(f, "lr", "stroke='#1b9e77' stroke-width='1.5'", &ax, &pr, lr.x, lr.y, lr.n);
        polyline(f, "expert-load", "stroke='#e67e22' stroke-width='1.5'", &ax, &pb, bal.x, bal.y, bal.n);
        fprintf(f, "<text x='%.2f' y='%.2f' font-size='10' fill='#666' text-anchor='end'>least-loaded expert of any "
                   "router, share of its fair load (1 = balanced)</text>\n", ax.left + ax.width - 4, pb.top + 12);
        fprintf(f, "</svg>\n");
        if (fclose(f) == 0) {
            jm_atomic_file a;
            snprintf(path, sizeof path, "%s/loss.svg", dir);
            if (!jm_atomic_open(&a, path, &err)) {
                if (jm_atomic_write(&a, svg, svg_len, &err)) jm_atomic_abort(&a);
                else jm_atomic_commit(&a, &err);
            }
        }
        free(svg);
    }
    free(ema);
    series_free(&loss);
    series_free(&bal);
    series_free(&held);
    series_free(&lr);
}

/* ---- evaluation ---- */


/* The windows scored are spread evenly over all of dir's shards (window
 * floor(i * W / k) of the W there are, for i < k), so that a capped
 * evaluation sees every part of a held-out set made of several kinds of text
 * one after another, not only the first. A window of seq_len tokens predicts
 * its last seq_len - 1; with a cap, k = ceil(max_tokens / (seq_len - 1))
 * windows and the last predicts only what is left, so exactly max_tokens are
 * scored whatever the path. Without a cap, k = W: every window. */
jm_status jm_eval_shards(jm_model *m, const char *dir, int seq_len, int64_t max_tokens, jm_eval_path path,
                         double *loss, int64_t *tokens, void (*progress)(void *ctx, int64_t done, int64_t total),
                         void *ctx, jm_error *err)
{
    *loss = 0;
    *tokens = 0;
    if (seq_len < 2) return jm_fail(err, JM_ERR_ARG, "%s: windows of %d tokens predict nothing", dir, seq_len);
    if (seq_len > jm_model_config(m)->max_position_embeddings)
        return jm_fail(err, JM_ERR_ARG, "%s: windows of %d tokens are longer than the model's context (%d)", dir,
                       seq_len, jm_model_config(m)->max_position_embeddings);
    char **names;
    int nnames;
    jm_status s = jm_shard_list(dir, &names, &nnames, err);
    if (s) return s;
    jm_shard *sh = calloc((size_t)nnames + 1, sizeof *sh);
    int64_t *first = calloc((size_t)nnames + 1, sizeof *first); /* global index of each shard's first window */
    int nsh = 0;
    if (!sh || !first) s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", dir);
    for (int i = 0; i < nnames && !s; i++) {
        const char *p = names[i];
        if (!(s = jm_shard_open(p, &sh[nsh], err))) {
            if (sh[nsh].vocab_size > (uint32_t)jm_model_config(m)->vocab_size)
                s = jm_fail(err, JM_ERR_ARG, "%s: made for vocab %u, the model has %d", p, sh[nsh].vocab_size,
                            jm_model_config(m)->vocab_size);
            first[nsh + 1] = first[nsh] + (int64_t)(sh[nsh].n / (uint64_t)seq_len);
            nsh++;
        }
    }
    jm_free_names(names, nnames);
    const int64_t W = s ? 0 : first[nsh], per = seq_len - 1;
    int64_t k = W, total = W * per;
    if (max_tokens > 0 && (max_tokens + per - 1) / per < W) k = (max_tokens + per - 1) / per, total = max_tokens;
    if (!s && path != JM_EVAL_FORWARD) s = jm_set_slots(m, 1, seq_len, err);
    const int B = 4;
    int32_t *buf = s ? NULL : malloc(sizeof(int32_t) * (size_t)B * seq_len);
    if (!s && !buf) s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
    double sum = 0; /* log-likelihood */
    int64_t count = 0;
    int filled = 0, f = 0;
    for (int64_t i = 0; i < k && !s; i++) {
        const int64_t w = i * (W / k) + i * (W % k) / k; /* floor(i * W / k) without overflow */
        while (first[f + 1] <= w) f++;
        const uint64_t p = (uint64_t)(w - first[f]) * (uint64_t)seq_len;
        const int n = (int)(total - (count + (int64_t)filled * per) < per ? total - (count + (int64_t)filled * per) + 1
                                                                           : seq_len); /* the tokens this window reads */
        int32_t *row = buf + (int64_t)filled * seq_len;
        for (int j = 0; j < n; j++) row[j] = (int32_t)jm_shard_token(&sh[f], p + j);
        if (path != JM_EVAL_FORWARD) {
            s = jm_score_window(m, row, n, 1, path == JM_EVAL_DECODE, &sum, err);
            count += n - 1;
        } else if (n < seq_len || ++filled == B || i + 1 == k) {
            /* full windows go B at a time; a short last one by itself */
            const int rows = n < seq_len ? 1 : filled, T = n < seq_len ? n : seq_len;
            jm_losses L;
            if (n < seq_len && filled) { /* the full ones before it first */
                if (!(s = jm_forward(m, buf, filled, seq_len, &L, err))) sum -= L.loss * (double)L.count, count += L.count;
                memmove(buf, row, sizeof(int32_t) * (size_t)n);
            }
            if (!s && !(s = jm_forward(m, buf, rows, T, &L, err))) sum -= L.loss * (double)L.count, count += L.count;
            filled = 0;
        }
        if (!s && progress) progress(ctx, count, total);
    }
    for (int i = 0; i < nsh; i++) jm_shard_close(&sh[i]);
    free(sh);
    free(first);
    free(buf);
    if (!s && count == 0) s = jm_fail(err, JM_ERR_ARG, "%s: no shard holds a full window of %d tokens", dir, seq_len);
    if (s) return s;
    *loss = -sum / (double)count;
    *tokens = count;
    return JM_OK;
}

/* Entropy (nats/token) of the unigram distribution of all training sources'
 * tokens: the loss a model that ignores context would reach. */
static double unigram_entropy(const jm_recipe *r)
{
    int64_t V = r->model.vocab_size, n = 0;
    int64_t *count = calloc((size_t)V, sizeof *count);
    if (!count) return NAN;
    for (int i = 0; i < r->nsources; i++) {
        char **paths;
        int np;
        jm_error err;
        if (jm_shard_list(r->source_dir[i], &paths, &np, &err)) continue;
        for (int k = 0; k < np; k++) {
            jm_shard sh;
            if (jm_shard_open(paths[k], &sh, &err)) continue;
            for (uint64_t j = 0; j < sh.n; j++) {
                uint32_t tok = jm_shard_token(&sh, j);
                if (tok < (uint64_t)V) count[tok]++, n++;
            }
            jm_shard_close(&sh);
        }
        jm_free_names(paths, np);
    }
    double h = 0;
    for (int64_t v = 0; v < V; v++)
        if (count[v]) h -= (double)count[v] / n * log((double)count[v] / n);
    free(count);
    return h;
}

/* ---- one optimizer step ---- */

/* Share of routed slots per expert for one router, as a fraction of the fair share. */
/* Language modelling on accum micro-batches of B x T tokens: the mean of the
 * micro-batches' mean token losses (pretraining's objective). */
typedef struct {
    const int32_t *tokens; /* accum * B * T */
    int B, T, accum;
    float *weight;         /* (B * T) */
} lm_task;

static jm_status lm_micro(void *ctx, int j, jm_micro *mb, jm_error *err)
{
    (void)err;
    lm_task *k = ctx;
    mb->batch = (jm_batch){k->B, k->T, k->tokens + (size_t)j * k->B * k->T, NULL, NULL};
    mb->router_scale = 1.0 / k->accum;
    return JM_OK;
}

static jm_status lm_objective(void *ctx, int j, const float *logp, const jm_losses *L, const float **weight,
                              double *acc, jm_error *err)
{
    (void)j, (void)logp, (void)err;
    lm_task *k = ctx;
    const float w = L->count ? 1.0f / ((float)L->count * (float)k->accum) : 0.0f;
    for (int64_t t = 0; t < (int64_t)k->B * k->T; t++) k->weight[t] = w;
    *weight = k->weight;
    acc[JM_ACC_LOOP] += L->loss / k->accum;
    return JM_OK;
}

static void lm_finish(void *ctx, int64_t step, const double *acc, jm_task_step *st)
{
    (void)ctx, (void)step;
    st->loss = acc[JM_ACC_LOOP];
}

static jm_status lm_plan(void *ctx, int64_t step, int *nmicro, jm_error *err)
{
    (void)step, (void)err;
    *nmicro = ((lm_task *)ctx)->accum;
    return JM_OK;
}

/* Clip to the global norm, AdamW at lr, zero the gradients. */
static jm_status apply_step(jm_model *m, jm_optimizer *opt, double lr, double grad_clip, double *grad_norm,
                            jm_error *err)
{
    *grad_norm = jm_grad_norm(m);
    if (grad_clip > 0 && *grad_norm > grad_clip)
        jm_scale_grads(m, (float)(grad_clip / (*grad_norm + 1e-6))); /* as torch's clip_grad_norm_ */
    jm_status s = jm_optimizer_step(opt, m, lr, err);
    return s ? s : jm_zero_grad(m, err);
}

jm_status jm_train_step(jm_model *m, jm_optimizer *opt, const int32_t *tokens, int B, int T, int accum, double lr,
                        double grad_clip, double *load, jm_step_stats *st, jm_error *err)
{
    memset(st, 0, sizeof *st);
    lm_task k = {tokens, B, T, accum, malloc(sizeof(float) * (size_t)B * T)};
    if (!k.weight) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    jm_task task = {.ctx = &k, .plan = lm_plan, .micro = lm_micro, .objective = lm_objective, .finish = lm_finish};
    jm_task_step ts;
    jm_status s = jm_task_grads(&task, m, 0, &ts, err);
    free(k.weight);
    if (s) return s;
    if (load) jm_routers_load(m, 0, jm_model_config(m)->num_layers, load); /* of the last micro-batch */
    st->loss = ts.loss;
    st->aux_loss = ts.aux_loss;
    st->z_loss = ts.z_loss;
    return apply_step(m, opt, lr, grad_clip, &st->grad_norm, err);
}

/* ---- pretraining, a task of the loop ---- */

typedef struct {
    jm_recipe *r;
    jm_sampler *sampler;
    int phase;           /* index of the phase whose mixture is set */
    int32_t *batch;      /* batch_size * grad_accum sequences of seq_len */
    jm_sampler_state ss; /* the state the last checkpoint wrote */
    lm_task lm;          /* over batch */
} pretrain_task;

/* Every rank draws the whole global batch (the sampler's state stays one for
 * all of them) and runs its share of the micro-batches. */
static jm_status pretrain_plan(void *ctx, int64_t step, int *nmicro, jm_error *err)
{
    pretrain_task *p = ctx;
    const jm_recipe *r = p->r;
    int ph = phase_of(r, step);
    jm_status s;
    if (ph != p->phase) {
        p->phase = ph;
        if ((s = jm_sampler_set_mixture(p->sampler, r->phases[ph].weights, err))) return s;
    }
    const int T = r->seq_len;
    for (int64_t i = 0; i < (int64_t)r->batch_size * r->grad_accum; i++) {
        int src;
        jm_sampler_next(p->sampler, p->batch + (size_t)i * T, &src);
    }
    *nmicro = r->grad_accum;
    return JM_OK;
}

static jm_status pretrain_micro(void *ctx, int j, jm_micro *mb, jm_error *err)
{
    return lm_micro(&((pretrain_task *)ctx)->lm, j, mb, err);
}

static jm_status pretrain_objective(void *ctx, int j, const float *logp, const jm_losses *L, const float **weight,
                                    double *acc, jm_error *err)
{
    return lm_objective(&((pretrain_task *)ctx)->lm, j, logp, L, weight, acc, err);
}

static int pretrain_state(void *ctx, st_out *out, int cap, jm_error *err)
{
    pretrain_task *p = ctx;
    jm_sampler_state_free(&p->ss);
    if (cap < 3 || jm_sampler_get_state(p->sampler, &p->ss, err)) return -1;
    int64_t S = p->ss.nsources;
    out[0] = (st_out){"sampler.position", ST_U64, 1, {S}, p->ss.position};
    out[1] = (st_out){"sampler.drawn", ST_U64, 1, {S}, p->ss.drawn};
    out[2] = (st_out){"sampler.total", ST_U64, 1, {S}, p->ss.total};
    return 3;
}

static jm_status pretrain_restore(void *ctx, const st_file *f, int64_t step, jm_error *err)
{
    pretrain_task *p = ctx;
    int S = jm_sampler_num_sources(p->sampler);
    jm_sampler_state ss = {S, calloc((size_t)S, 8), calloc((size_t)S, 8), calloc((size_t)S, 8)};
    jm_status s = !ss.position || !ss.drawn || !ss.total ? jm_fail(err, JM_ERR_NOMEM, "out of memory") : JM_OK;
    if (!s) s = jm_state_tensor(f, "sampler.position", ST_U64, S, ss.position, err);
    if (!s) s = jm_state_tensor(f, "sampler.drawn", ST_U64, S, ss.drawn, err);
    if (!s) s = jm_state_tensor(f, "sampler.total", ST_U64, S, ss.total, err);
    if (!s) {
        /* the sampler's counts belong to the phase of the last step taken; at a
         * phase boundary the loop then switches (and resets them) as a straight
         * run does */
        p->phase = phase_of(p->r, step > 0 ? step - 1 : 0);
        s = jm_sampler_set_mixture(p->sampler, p->r->phases[p->phase].weights, err);
        if (!s) s = jm_sampler_set_state(p->sampler, &ss, err);
    }
    jm_sampler_state_free(&ss);
    return s;
}

/* Held-out loss on the first eval_tokens tokens of the recipe's heldout shards.
 * A forward pass only: no gradient, optimizer or sampler state is touched, so
 * a run evaluates (or resumes) to the same weights as one that does not. */
static jm_status pretrain_heldout(void *ctx, jm_model *m, int final, jm_task_step *st, jm_error *err)
{
    pretrain_task *p = ctx;
    const jm_recipe *r = p->r;
    double t0 = omp_get_wtime(), loss;
    int64_t tokens;
    jm_status s = jm_eval_shards(m, r->heldout, r->seq_len, r->eval_tokens, JM_EVAL_FORWARD, &loss, &tokens, NULL, NULL, err);
    if (s) return s;
    st->loss = loss;
    int n = 0;
    st->metric_name[n] = "heldout_loss", st->metric[n++] = loss;
    st->metric_name[n] = "heldout_perplexity", st->metric[n++] = exp(loss);
    st->metric_name[n] = "heldout_tokens", st->metric[n++] = (double)tokens;
    st->metric_name[n] = "eval_seconds", st->metric[n++] = omp_get_wtime() - t0;
    if (final) {
        double h1 = unigram_entropy(r);
        fprintf(stderr, "held-out: %lld tokens, loss %.4f nats/token, perplexity %.2f (unigram entropy of the "
                        "training sources: %.4f nats/token)\n", (long long)tokens, loss, exp(loss), h1);
        st->metric_name[n] = "unigram_entropy", st->metric[n++] = h1;
    }
    st->nmetrics = n;
    return JM_OK;
}

/* ---- the run directory ---- */

static const char *const run_names[] = {"metrics.jsonl", "loss.svg", "checkpoints", "recipe.json"};

int jm_run_entry_proof(const char *path, const char *name)
{
    return strcmp(name, "checkpoints") == 0 ? jm_checkpoints_dir_proof(path, name) : 1;
}

/* dir/recipe.json already holds the recipe's text: it is not rewritten (it
 * may be the very file the run was started from). */
static bool recipe_saved(const char *dir, const jm_recipe *r)
{
    char path[4200], *text;
    size_t len;
    snprintf(path, sizeof path, "%s/recipe.json", dir);
    if (jm_read_file(path, (size_t)1 << 26, &text, &len, NULL)) return false;
    bool same = len == strlen(r->text) && memcmp(text, r->text, len) == 0;
    free(text);
    return same;
}

/* A fresh run never lands on an old run's results (README: What writes
 * where): refused unless overwrite, and then they are removed once the new run
 * has opened; files of anyone else in the directory stay. --resume continues
 * the run that is there. *set receives the run's entries. */
static jm_status check_run_dir(const jm_train_opts *o, const jm_recipe *r, const char *const *inputs, int ninputs,
                               jm_output_set *set, jm_error *err)
{
    if (o->resume && o->overwrite)
        return jm_fail(err, JM_ERR_ARG, "%s: --resume continues the run there, --overwrite replaces it: pass one",
                       o->out_dir);
    *set = (jm_output_set){"a training run", run_names, recipe_saved(o->out_dir, r) ? 3 : 4, jm_run_entry_proof};
    return o->resume ? JM_OK : jm_output_entries_check(o->out_dir, set, inputs, ninputs, o->overwrite, err);
}

/* The model a run trains: a resumed run's latest checkpoint, else init; its
 * place on the grid, the optimizer for its shard, and a resumed run's state. */
static jm_status open_trainer(trainer *t, const jm_train_opts *o, jm_model *init, jm_error *err)
{
    jm_recipe *r = t->r;
    jm_status s;
    char path[4400], ck[4200];
    if (o->resume) { /* checkpoints/latest names step_N, nothing else: never a path out of the run */
        jm_model_free(init);
        snprintf(ck, sizeof ck, "%s/checkpoints", o->out_dir);
        snprintf(path, sizeof path, "%s/latest", ck);
        if (access(path, F_OK) != 0) return jm_fail(err, JM_ERR_ARG, "%s: no checkpoint to resume from", path);
        if ((s = jm_read_latest(ck, path, sizeof path, err))) return s;
        if ((s = jm_model_load(path, &t->m, err))) return s;
        const jm_config *c = jm_model_config(t->m);
        if (r->kind == JM_TASK_PRETRAIN && (c->vocab_size != r->model.vocab_size ||
                                            c->hidden_size != r->model.hidden_size ||
                                            c->num_layers != r->model.num_layers))
            return jm_fail(err, JM_ERR_ARG, "%s: checkpoint does not match the recipe's model", path);
    } else {
        t->m = init;
    }
    if ((s = jm_par_open(t->comm, t->m, r->seq_len, &t->par, err))) return s;
    int64_t lo, hi;
    jm_par_shard(t->par, &lo, &hi);
    if ((s = jm_optimizer_create_range(t->m, &r->adamw, lo, hi, &t->opt, err))) return s;
    if ((s = jm_zero_grad(t->m, err))) return s;
    const jm_config *c = jm_model_config(t->m);
    t->last_min_share = NAN;
    if (!(t->tail = calloc(2 * (size_t)c->num_layers * c->num_experts, sizeof *t->tail)))
        return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    if (o->resume) {
        char state[4500];
        snprintf(state, sizeof state, "%s/trainer_state.safetensors", path);
        if ((s = load_trainer_state(t, state, err))) return s;
    }
    return JM_OK;
}

/* The run's layout, as metrics.jsonl's first line (and again where a resume changes it). */
static void write_layout(FILE *metrics, const trainer *t, int resumed)
{
    const int64_t now[3] = {jm_comm_size(t->comm), jm_comm_dp(t->comm), jm_comm_pp(t->comm)};
    if (resumed && (!t->saved_layout[0] || !memcmp(now, t->saved_layout, sizeof now))) return;
    fprintf(metrics, "{\"step\":%lld,\"world_size\":%lld,\"dp\":%lld,\"pp\":%lld,\"threads\":%d%s}\n",
            (long long)t->step, (long long)now[0], (long long)now[1], (long long)now[2], omp_get_max_threads(),
            resumed ? ",\"resumed\":true" : "");
    fflush(metrics);
}

/* ,"key":v in a metrics record; null when v is not a number (JSON has no NaN) */
static void json_number(FILE *f, const char *key, double v)
{
    if (isfinite(v)) fprintf(f, ",\"%s\":%.6g", key, v);
    else fprintf(f, ",\"%s\":null", key);
}

/* A held-out record of metrics.jsonl: the task's fields; the caller closes the object. */
static void write_heldout(FILE *metrics, const trainer *t, const jm_task_step *h)
{
    const jm_recipe *r = t->r;
    fprintf(metrics, "{\"step\":%lld", (long long)t->step);
    for (int i = 0; i < h->nmetrics; i++) json_number(metrics, h->metric_name[i], h->metric[i]);
    fprintf(metrics, ",\"tokens\":%lld", (long long)(t->step * r->batch_size * r->seq_len * r->grad_accum));
}

static jm_status save_recipe(const char *dir, const jm_recipe *r, jm_error *err)
{
    char path[4400];
    snprintf(path, sizeof path, "%s/recipe.json", dir);
    jm_atomic_file a;
    if (recipe_saved(dir, r)) return JM_OK;
    jm_status s = jm_atomic_open(&a, path, err);
    if (s) return s;
    if ((s = jm_atomic_write(&a, r->text, strlen(r->text), err))) {
        jm_atomic_abort(&a);
        return s;
    }
    return jm_atomic_commit(&a, err);
}

/* ---- the loop ---- */
/* "held-out loss 4.5, perplexity 93.1, ...": the task's fields without their prefix */
static void print_heldout(const jm_task_step *h)
{
    for (int i = 0; i < h->nmetrics; i++) {
        const char *name = h->metric_name[i];
        if (strncmp(name, "heldout_", 8) == 0) name += 8;
        fprintf(stderr, "%s %s %.4g", i ? "," : "", name, h->metric[i]);
    }
}


/* Held-out evaluation of the model as it is: rank 0 scores, with every
 * stage's weights (the others go on to the next step and wait for it there). */
static jm_status run_heldout(trainer *t, int final, jm_task_step *h, jm_error *err)
{
    jm_status s = jm_par_sync_params(t->par, err);
    return s || t->rank != 0 ? s : t->task->heldout(t->task->ctx, t->m, final, h, err);
}

/* With several ranks on a host, each takes its share of the cores unless
 * told (--threads, or OMP_NUM_THREADS as MPI users set it): N ranks each
 * spinning on every core would take turns on them (README: Scaling out). */
static void share_cores(const jm_train_opts *o, const jm_comm *c)
{
    const int local = jm_comm_local_size(c);
    if (o->threads > 0 || local <= 1) return;
    const char *env = getenv("OMP_NUM_THREADS");
    const int n = env && atoi(env) > 0 ? atoi(env) : omp_get_num_procs() / local;
    jm_set_threads(n > 0 ? n : 1);
}

jm_status jm_train_run(const jm_train_opts *o, jm_recipe *r, jm_model *init, jm_task *task, const char *tokenizer,
                       const char *const *inputs, int ninputs, int *stopped, jm_error *err)
{
    *stopped = 0;
    trainer t = {.r = r, .task = task, .tokenizer = tokenizer ? tokenizer : ""};
    snprintf(t.dir, sizeof t.dir, "%s", o->out_dir);
    char path[4400];
    FILE *metrics = NULL;
    double *load = NULL;
    jm_output_set run_set;
    jm_status s;
    const char *kind = jm_task_name(r->kind);
    if ((s = jm_comm_open(o->pp > 0 ? o->pp : 1, o->timeout, &t.comm, err))) {
        jm_model_free(init);
        return s;
    }
    t.rank = jm_comm_rank(t.comm);
    share_cores(o, t.comm);
    /* rank 0 owns the run directory: the others only read a resumed checkpoint from it */
    if (t.rank == 0 && ((s = check_run_dir(o, r, inputs, ninputs, &run_set, err)) ||
                        (s = jm_mkdir_p(o->out_dir, err)))) {
        jm_model_free(init);
        goto done;
    }
    if ((s = open_trainer(&t, o, init, err))) goto done;
    const int quiet = o->quiet || t.rank != 0;
    if (t.rank == 0) {
        if (o->overwrite) jm_output_entries_clear(o->out_dir, &run_set); /* the old run's results */
        if ((s = save_recipe(o->out_dir, r, err))) goto done; /* the recipe the run used, beside its results */
        snprintf(path, sizeof path, "%s/metrics.jsonl", o->out_dir);
        if (o->resume) {
            if ((s = truncate_metrics(path, t.step, r->schedule.total_steps, err))) goto done;
        } else {
            unlink(path);
        }
        metrics = fopen(path, "a");
        if (!metrics) {
            s = jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
            goto done;
        }
        write_layout(metrics, &t, o->resume);
    }

    const jm_config *c = jm_model_config(t.m);
    const int L = c->num_layers, E = c->num_experts;
    const int64_t total = r->schedule.total_steps;
    load = malloc(sizeof(double) * 2 * (size_t)L * E);
    if (!load) {
        s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
        goto done;
    }
    const int tty = isatty(2) && !quiet;
    const int64_t first = t.step;
    int64_t trained = 0; /* tokens of this session's steps, for the rate */
    double t0 = omp_get_wtime(), last_log = t0, eval_secs = 0; /* time spent on held-out evaluation */
    if (!quiet) {
        fprintf(stderr, "%s: %lld parameters, %lld steps of up to %lld tokens, %s %lld\n", kind,
                (long long)jm_config_num_params(c), (long long)total,
                (long long)r->batch_size * r->seq_len * r->grad_accum * (r->kind == JM_TASK_DPO ? 2 : 1),
                o->resume ? "resuming at step" : "from step", (long long)t.step);
        if (jm_comm_size(t.comm) > 1)
            fprintf(stderr, "%s: %d ranks = %d pipeline stages x %d data-parallel replicas, %d threads each\n", kind,
                    jm_comm_size(t.comm), jm_comm_pp(t.comm), jm_comm_dp(t.comm), omp_get_max_threads());
    }
    if (task->heldout && task->eval_at_start && !o->resume && t.rank == 0) { /* the starting point, to compare with */
        jm_task_step h = {0};
        if ((s = task->heldout(task->ctx, t.m, 0, &h, err))) goto done;
        write_heldout(metrics, &t, &h);
        fprintf(metrics, "}\n");
        fflush(metrics);
        if (!quiet) {
            fprintf(stderr, "step 0: held-out");
            print_heldout(&h);
            fputc('\n', stderr);
        }
    }
    int stop_agreed = 0;
    while (t.step < total) {
        /* one process stops at once; several agree on the step first (jm_par_step) */
        if (stop_agreed || (jm_comm_size(t.comm) == 1 && o->stop && *o->stop)) {
            *stopped = 1;
            break;
        }
        const int log_now = (t.step + 1) % r->log_every == 0;
        jm_par_step_in in = {jm_schedule_lr(&r->schedule, t.step), r->adamw.grad_clip, log_now,
                             o->stop && *o->stop};
        jm_par_step_out out;
        if ((s = jm_par_step(t.par, task, t.opt, t.step, &in, load, &out, err))) goto done;
        const jm_task_step st = out.st;
        const double lr = in.lr, gnorm = out.grad_norm;
        stop_agreed = out.stop;
        trained += st.tokens;
        if (log_now && metrics) {
            fprintf(metrics, "{\"step\":%lld", (long long)(t.step + 1));
            double worst = 1e30;
            for (int blk = 0; blk < 2; blk++) {
                fprintf(metrics, ",\"%s_load\":[", blk ? "moe" : "moa");
                for (int l = 0; l < L; l++) {
                    fprintf(metrics, "%s[", l ? "," : "");
                    for (int e = 0; e < E; e++) {
                        double v = load[((size_t)blk * L + l) * E + e];
                        fprintf(metrics, "%s%.4f", e ? "," : "", v);
                        worst = fmin(worst, v);
                    }
                    fprintf(metrics, "]");
                }
                fprintf(metrics, "]");
            }
            fprintf(metrics, ",\"min_expert_share\":%.4f", worst);
            t.last_min_share = worst;
            if (total - (t.step + 1) < 10 * r->log_every) {
                for (size_t i = 0; i < 2 * (size_t)L * E; i++) t.tail[i] += load[i];
                t.n_tail++;
            }
        }
        t.step++;

        /* tokens/s of training alone; the ETA counts the evaluations too */
        double now = omp_get_wtime(), rate = (double)trained / (now - t0 - eval_secs);
        double step_rate = (double)(t.step - first) / (now - t0);
        if (log_now && metrics) {
            fprintf(metrics, ",\"phase\":\"%s\",\"loss\":%.6f,\"aux_loss\":%.6f,\"z_loss\":%.6f,\"lr\":%.6g,"
                             "\"grad_norm\":%.6g",
                    r->phases[phase_of(r, t.step - 1)].name, st.loss, st.aux_loss, st.z_loss, lr, gnorm);
            for (int i = 0; i < st.nmetrics; i++) json_number(metrics, st.metric_name[i], st.metric[i]);
            if (jm_comm_size(t.comm) > 1) /* MB all ranks sent; seconds a rank waited for others, the mean */
                fprintf(metrics, ",\"comm_mb\":%.3f,\"comm_wait\":%.4f", out.comm_bytes / 1e6, out.comm_wait);
            fprintf(metrics, ",\"tokens_per_s\":%.1f,\"tokens\":%lld}\n", rate,
                    (long long)(t.step * r->batch_size * r->seq_len * r->grad_accum));
            fflush(metrics);
        }
        char eta[32];
        format_eta(eta, sizeof eta, (double)(total - t.step) / step_rate);
        if (tty) {
            int width = 24, done_w = (int)((double)t.step / total * width);
            fprintf(stderr, "\r[%.*s%*s] step %lld/%lld  loss %.4f  %.0f tok/s  ETA %s   ", done_w,
                    "########################", width - done_w, "", (long long)t.step, (long long)total, st.loss,
                    rate, eta);
        } else if (!quiet && (now - last_log > 10 || t.step == total || t.step % r->log_every == 0)) {
            fprintf(stderr, "step %lld/%lld  loss %.4f  lr %.3g  %.0f tok/s  ETA %s\n", (long long)t.step,
                    (long long)total, st.loss, lr, rate, eta);
            last_log = now;
        }
        /* before the checkpoint of the same step, so a resume from it does not repeat it;
         * the final step's evaluation is the one after the loop */
        if (task->heldout && r->eval_every > 0 && t.step % r->eval_every == 0 && t.step < total) {
            jm_task_step h = {0};
            double e0 = omp_get_wtime();
            if ((s = run_heldout(&t, 0, &h, err))) goto done;
            eval_secs += omp_get_wtime() - e0;
            if (metrics) {
                write_heldout(metrics, &t, &h);
                fprintf(metrics, "}\n");
                fflush(metrics);
            }
            if (!quiet) {
                fprintf(stderr, "%sstep %lld: held-out", tty ? "\n" : "", (long long)t.step);
                print_heldout(&h);
                fprintf(stderr, " (%.1f s)\n", omp_get_wtime() - e0);
            }
        }
        if (t.step % r->checkpoint_every == 0 || t.step == total) {
            if ((s = save_checkpoint(&t, err))) goto done;
        }
        if (o->stop_after > 0 && t.step >= o->stop_after && t.step < total) {
            *stopped = 1;
            break;
        }
    }
    if (tty) fputc('\n', stderr);
    /* a stop at a step with no checkpoint yet saves one; step 0 too, so that --resume has one to start from */
    if (*stopped && (t.step % r->checkpoint_every != 0 || t.step == 0) && (s = save_checkpoint(&t, err))) goto done;
    if (*stopped && !quiet)
        fprintf(stderr, "%s: stopped at step %lld; continue with --resume\n", kind, (long long)t.step);
    if (!*stopped && task->heldout) {
        jm_task_step h = {0};
        if ((s = run_heldout(&t, 1, &h, err))) goto done;
        double tail_min = NAN;
        const double n_tail = (double)t.n_tail;
        for (size_t i = 0; n_tail && i < 2 * (size_t)L * E; i++)
            tail_min = i ? fmin(tail_min, t.tail[i] / n_tail) : t.tail[i] / n_tail;
        if (n_tail && !quiet)
            fprintf(stderr, "expert load at the end: the least-used expert of any router got %.0f%% of its fair "
                            "share (last logged batch), %.0f%% (mean over the last %d logged batches)\n",
                    100 * t.last_min_share, 100 * tail_min, (int)n_tail);
        if (metrics) {
            write_heldout(metrics, &t, &h);
            json_number(metrics, "final_min_expert_share", t.last_min_share);
            json_number(metrics, "tail_min_expert_share", tail_min);
            fprintf(metrics, "}\n");
        }
    }
    if (!*stopped && task->summary && t.rank == 0) task->summary(task->ctx, metrics);
done:
    if (metrics) { /* only a run that started plots: a refused one touches nothing */
        fclose(metrics);
        write_plot(o->out_dir, r);
    }
    free(load);
    free(t.tail);
    jm_optimizer_free(t.opt);
    jm_par_close(t.par);
    if (s && jm_comm_size(t.comm) > 1) /* the others may wait for this rank: say why it stops, stop them */
        fprintf(stderr, "jetmoe: rank %d of %d: %s\n", t.rank, jm_comm_size(t.comm), err->msg);
    jm_comm_close(t.comm, s != JM_OK);
    jm_model_free(t.m);
    return s;
}

/* pretrain --init: a new run from a checkpoint's weights. The recipe's model
 * must have the checkpoint's shapes; its training settings (router-loss
 * weights, context) replace the checkpoint's. */
static jm_status init_from(const char *dir, const jm_recipe *r, jm_model **out, jm_error *err)
{
    jm_status s = jm_model_load(dir, out, err);
    if (s) return s;
    if ((s = jm_model_reconfigure(*out, &r->model, err))) {
        char inner[sizeof err->msg];
        snprintf(inner, sizeof inner, "%s", err->msg);
        jm_fail(err, s, "--init %s: the recipe's model does not fit this checkpoint: %s", dir, inner);
        jm_model_free(*out);
        *out = NULL;
    }
    return s;
}

jm_status jm_pretrain(const jm_train_opts *o, int *stopped, jm_error *err)
{
    *stopped = 0;
    if (o->init && o->resume)
        return jm_fail(err, JM_ERR_ARG, "%s: --resume continues the run there from its own checkpoint; --init starts "
                       "a new run from %s: pass one", o->out_dir, o->init);
    jm_recipe *r;
    jm_status s = jm_recipe_load(o->recipe, &r, err);
    if (s) return s;
    pretrain_task p = {.r = r, .sampler = r->sampler};
    r->sampler = NULL; /* opened and checked with the recipe; the task owns it now */
    jm_model *init = NULL;
    const char *inputs[MAX_SOURCES + 4];
    int n = 0;
    inputs[n++] = o->recipe;
    if (o->init) inputs[n++] = o->init;
    if (r->tokenizer[0]) inputs[n++] = r->tokenizer;
    if (r->heldout[0]) inputs[n++] = r->heldout;
    for (int i = 0; i < r->nsources; i++) inputs[n++] = r->source_dir[i];
    p.batch = malloc(sizeof(int32_t) * (size_t)r->batch_size * r->seq_len * r->grad_accum);
    if (!p.batch) s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
    if (!s && !o->resume && o->init) s = init_from(o->init, r, &init, err);
    else if (!s && !o->resume) s = jm_model_create(&r->model, r->seed, &init, err);
    if (!s && !o->resume) s = jm_sampler_set_mixture(p.sampler, r->phases[0].weights, err);
    p.lm = (lm_task){p.batch, r->batch_size, r->seq_len, r->grad_accum,
                     malloc(sizeof(float) * (size_t)r->batch_size * r->seq_len)};
    if (!s && !p.lm.weight) s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
    jm_task task = {.ctx = &p,
                    .plan = pretrain_plan,
                    .micro = pretrain_micro,
                    .objective = pretrain_objective,
                    .finish = lm_finish,
                    .state = pretrain_state,
                    .restore = pretrain_restore,
                    .heldout = r->heldout[0] ? pretrain_heldout : NULL};
    if (!s) s = jm_train_run(o, r, init, &task, r->tokenizer, inputs, n, stopped, err);
    else jm_model_free(init);
    free(p.batch);
    free(p.lm.weight);
    jm_sampler_state_free(&p.ss);
    jm_sampler_free(p.sampler);
    jm_recipe_free(r);
    return s;
}
