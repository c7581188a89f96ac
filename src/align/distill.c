/* distill.c — distillation from a local teacher (align.h): `distill sft`
 * writes a teacher's answers to prompts as SFT records; `distill pairs`
 * ranks a model's sampled answers (by a verifier, else by the teacher's
 * likelihood) into preference pairs for DPO.
 *
 * Everything decodes on the batched step. The prompts go through
 * jm_generate_batch in chunks of many sequences, `parallel` at a time (a slot
 * whose answer ends takes the next prompt); the K samples of a prompt share
 * its prefill; the teacher scores the answers it has to rank together
 * (jm_score_batch). Each answer samples from its own random stream, derived
 * from the seed, the record's line and the sample's number, so the output is
 * the same for any `parallel` and any chunking.
 *
 * The teacher scores an answer as the preference reader will see it: the
 * conversation rendered with the teacher's own template and tokenizer, the
 * answer's tokens from where the prompt's rendering (with the generation
 * prompt) stops agreeing, through the EOS that ends the turn. */
#include "align/align.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define CHUNK_PER_SLOT 16 /* sequences per jm_generate_batch call, per slot: a chunk's tail idles few slots */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ---- the verifier and the ranking ---- */

int jm_distill_verify(const char *text, const char *answer)
{
    char want_buf[256], got_buf[256];
    if (!text || !answer) return 0;
    const char *want = jm_final_answer(answer, want_buf, sizeof want_buf);
    if (!want) { /* no number and no "####": the answer itself, without spaces as jm_final_answer gives it */
        size_t n = 0;
        for (const char *p = answer; *p && n + 1 < sizeof want_buf; p++)
            if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') want_buf[n++] = *p;
        want_buf[n] = 0;
        want = want_buf;
    }
    const char *got = jm_final_answer(text, got_buf, sizeof got_buf);
    return want[0] && got && strcmp(got, want) == 0;
}

static int usable(const char *text)
{
    return text && text[0];
}

jm_rank jm_distill_rank(int k, const char *const *text, const int *right, const double *score, int *chosen,
                        int *rejected)
{
    int n = 0, nright = 0, first_right = -1, first_wrong = -1;
    for (int i = 0; i < k; i++) {
        if (!usable(text[i])) continue;
        n++;
        if (right && right[i]) nright++, first_right = first_right < 0 ? i : first_right;
        if (right && !right[i]) first_wrong = first_wrong < 0 ? i : first_wrong;
    }
    if (n < 2) return JM_RANK_TOO_FEW;
    if (right && nright > 0 && nright < n) {
        *chosen = first_right;
        *rejected = first_wrong;
        return JM_RANK_VERIFIER;
    }
    if (!score) return !right ? JM_RANK_TIED : nright ? JM_RANK_ALL_RIGHT : JM_RANK_ALL_WRONG;
    int best = -1, worst = -1, scored = 0;
    for (int i = 0; i < k; i++)
        if (usable(text[i]) && isfinite(score[i])) {
            scored++;
            if (best < 0 || score[i] > score[best]) best = i;
        }
    if (scored < 2) return JM_RANK_TOO_FEW;
    for (int i = 0; i < k; i++) /* the worst answer that is not the best one's text */
        if (usable(text[i]) && isfinite(score[i]) && strcmp(text[i], text[best]) != 0 &&
            (worst < 0 || score[i] < score[worst]))
            worst = i;
    if (worst < 0) return JM_RANK_TIED;
    *chosen = best;
    *rejected = worst;
    return JM_RANK_TEACHER;
}

/* ---- checkpoints, prompts, answers ---- */

typedef struct {
    char dir[4096];
    jm_model *m;
    jm_tokenizer *t;
} checkpoint;

/* A resolved checkpoint directory's model (weights in place) and tokenizer,
 * which must agree on the vocabulary and the EOS that ends an answer. */
static jm_status open_checkpoint(checkpoint *ck, const char *kernels, jm_error *err)
{
    jm_status s = jm_tokenizer_load(ck->dir, &ck->t, err);
    if (!s) s = jm_model_open(ck->dir, &ck->m, err);
    if (!s) s = jm_set_kernels(ck->m, kernels ? kernels : "auto", err);
    if (s) return s;
    const jm_config *c = jm_model_config(ck->m);
    if (jm_tokenizer_vocab_size(ck->t) > c->vocab_size)
        return jm_fail(err, JM_ERR_ARG, "%s: the tokenizer has %d pieces, more than the model's vocab_size %d",
                       ck->dir, jm_tokenizer_vocab_size(ck->t), c->vocab_size);
    if (jm_tokenizer_eos_id(ck->t) != c->eos_token_id)
        return jm_fail(err, JM_ERR_ARG, "%s: the tokenizer's EOS is %d but config.json's eos_token_id is %d (an "
                       "answer would not end at the end of its turn)", ck->dir, jm_tokenizer_eos_id(ck->t),
                       c->eos_token_id);
    return JM_OK;
}

static void close_checkpoint(checkpoint *ck)
{
    jm_model_free(ck->m);
    jm_tokenizer_free(ck->t);
    ck->m = NULL;
    ck->t = NULL;
}

/* What a distillation run holds: the prompts, each rendered for the model
 * that answers it, and the output file. */
typedef struct {
    const jm_distill_opts *o;
    jm_distill_stats *st;
    jm_prompt_set set;
    int32_t **ids;  /* (set.n) each prompt with the generation prompt, for the answering model */
    int *n;
    int max_len;    /* the longest */
    jm_atomic_file out;
    int out_open;
    double t0;
    /* a chunk of up to `chunk` sequences: sequence a answers prompt p[a] (sample j[a]) into answers + a * max_new */
    int chunk;
    jm_gen_seq *q;
    int32_t *answers;
    int64_t *p;
    int *j;
} run;

static jm_status check_opts(const jm_distill_opts *o, int pairs, jm_error *err)
{
    if (!o->prompts || !o->out || !(pairs ? o->model : o->teacher))
        return jm_fail(err, JM_ERR_ARG, "distill: the prompts, the output and the %s are needed",
                       pairs ? "model" : "teacher");
    if (o->max_new < 1 || o->parallel < 1 || (pairs && o->samples < 2))
        return jm_fail(err, JM_ERR_ARG, "distill: max_new %d and parallel %d must be >= 1%s", o->max_new,
                       o->parallel, pairs ? ", samples >= 2" : "");
    return jm_sample_validate(&o->sample, err);
}

/* The prompts (rendered by ck's tokenizer, which must leave room for an
 * answer in its context), the slots, chunks of `chunk` sequences, and the
 * output file opened. */
static jm_status begin(run *r, checkpoint *ck, const char *target, int chunk, jm_error *err)
{
    const jm_distill_opts *o = r->o;
    r->chunk = chunk;
    r->q = malloc(sizeof *r->q * (size_t)chunk);
    r->answers = malloc(sizeof *r->answers * (size_t)chunk * (size_t)o->max_new);
    r->p = malloc(sizeof *r->p * (size_t)chunk);
    r->j = calloc((size_t)chunk, sizeof *r->j);
    if (!r->q || !r->answers || !r->p || !r->j) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    const jm_config *c = jm_model_config(ck->m);
    jm_records_opts ro = {.max_len = c->max_position_embeddings, .skip_bad = o->skip_bad,
                          .vocab_size = c->vocab_size};
    jm_records_stats rs;
    jm_status s = jm_prompts_load(&o->prompts, 1, ck->t, &ro, &r->set, &rs, err);
    r->st->bad_lines = rs.bad;
    if (s) return s;
    r->st->prompts = r->set.n;
    r->ids = calloc((size_t)r->set.n, sizeof *r->ids);
    r->n = calloc((size_t)r->set.n, sizeof *r->n);
    if (!r->ids || !r->n) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", o->prompts);
    for (int64_t i = 0; i < r->set.n; i++) {
        const jm_prompt_record *p = &r->set.rec[i];
        size_t n;
        if ((s = jm_chat_encode(ck->t, p->msgs, p->nmsgs, 1, &r->ids[i], &n, err))) return s;
        r->n[i] = (int)n;
        r->max_len = r->n[i] > r->max_len ? r->n[i] : r->max_len;
    }
    /* positions per slot: the longest prompt and its answer, within the model's context */
    int64_t ctx = (int64_t)r->max_len + o->max_new;
    if (ctx > c->max_position_embeddings) ctx = c->max_position_embeddings;
    if ((s = jm_set_slots(ck->m, o->parallel, (int)ctx, err))) return s;
    if ((s = jm_atomic_open(&r->out, target, err))) return s;
    r->out_open = 1;
    return JM_OK;
}

static void end(run *r)
{
    if (r->out_open) jm_atomic_abort(&r->out);
    for (int64_t i = 0; r->ids && i < r->set.n; i++) free(r->ids[i]);
    free(r->ids);
    free(r->n);
    jm_prompts_free(&r->set);
    free(r->q);
    free(r->answers);
    free(r->p);
    free(r->j);
}

static int stop_requested(void *ctx, int seq, int32_t id)
{
    (void)seq, (void)id;
    const volatile int *stop = ctx;
    return stop && *stop;
}

static jm_status interrupted(const run *r, jm_error *err)
{
    return jm_fail(err, JM_ERR_IO, "%s: interrupted; nothing written", r->o->out);
}

/* Generates the chunk's first n sequences (r->p, r->j) into r->q. */
static jm_status answer(run *r, jm_model *m, int n, jm_error *err)
{
    const jm_distill_opts *o = r->o;
    const int ctx = jm_context(m);
    for (int i = 0; i < n; i++) {
        const int64_t p = r->p[i];
        const int room = ctx - r->n[p];
        uint64_t line = jm_seed_stream(o->sample.seed, (uint64_t)r->set.rec[p].line);
        r->q[i] = (jm_gen_seq){r->ids[p], r->n[p], o->max_new < room ? o->max_new : room,
                               jm_seed_stream(line, (uint64_t)r->j[i]), r->answers + (int64_t)i * o->max_new, 0};
    }
    jm_status s = jm_generate_batch(m, r->q, n, &o->sample, stop_requested, (void *)o->stop, err);
    if (!s && o->stop && *o->stop) s = interrupted(r, err);
    for (int i = 0; i < n && !s; i++) r->st->answers++, r->st->tokens += r->q[i].n_out;
    return s;
}

/* An answer's text: its ids without the EOS that ended it. An id the
 * tokenizer does not have (a model may have more rows than pieces) makes it
 * unusable: "" (never written). *text is malloc'd. */
static jm_status answer_text(const checkpoint *ck, const jm_gen_seq *q, char **text, jm_error *err)
{
    int n = q->n_out;
    if (n && q->out[n - 1] == jm_tokenizer_eos_id(ck->t)) n--;
    for (int i = 0; i < n; i++)
        if (q->out[i] >= jm_tokenizer_vocab_size(ck->t)) n = 0;
    size_t len;
    if (n) return jm_tokenizer_decode(ck->t, q->out, (size_t)n, text, &len, err);
    *text = strdup("");
    return *text ? JM_OK : jm_fail(err, JM_ERR_NOMEM, "out of memory");
}

/* ---- the records written ---- */

/* The prompt's messages, then the assistant's answer when there is one. */
static cJSON *conversation(const jm_prompt_record *p, const char *answer_text_)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i <= p->nmsgs; i++) {
        if (i == p->nmsgs && !answer_text_) break;
        cJSON *msg = cJSON_CreateObject();
        if (!msg || !cJSON_AddStringToObject(msg, "role", i < p->nmsgs ? p->msgs[i].role : "assistant") ||
            !cJSON_AddStringToObject(msg, "content", i < p->nmsgs ? p->msgs[i].content : answer_text_) ||
            !cJSON_AddItemToArray(a, msg)) {
            cJSON_Delete(msg);
            cJSON_Delete(a);
            return NULL;
        }
    }
    return a;
}

/* Adds item to obj under key; false (item freed) when either is missing. */
static int add(cJSON *obj, const char *key, cJSON *item)
{
    if (obj && item && cJSON_AddItemToObject(obj, key, item)) return 1;
    cJSON_Delete(item);
    return 0;
}

/* One JSONL line: rec (consumed) plus the prompt's "answer" when it has one. */
static jm_status write_record(run *r, cJSON *rec, const jm_prompt_record *p, jm_error *err)
{
    int ok = rec != NULL;
    if (ok && p->answer) ok = cJSON_AddStringToObject(rec, "answer", p->answer) != NULL;
    char *line = ok ? cJSON_PrintUnformatted(rec) : NULL;
    cJSON_Delete(rec);
    if (!line) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory for a record", r->o->out);
    jm_status s = jm_atomic_write(&r->out, line, strlen(line), err);
    if (!s) s = jm_atomic_write(&r->out, "\n", 1, err);
    cJSON_free(line);
    if (!s) r->st->written++;
    return s;
}

static jm_status finish(run *r, jm_error *err)
{
    r->out_open = 0;
    r->st->seconds = now() - r->t0;
    return jm_atomic_commit(&r->out, err);
}

/* One line per chunk: rewritten in place on a terminal, else plain lines. */
static void progress(const run *r, const char *what, int64_t done)
{
    if (r->o->quiet) return;
    const double el = now() - r->t0, eta = done ? el / (double)done * (double)(r->set.n - done) : 0;
    const int tty = isatty(2);
    fprintf(stderr, "%sdistill %s: %lld/%lld prompts, %lld answers, %.1f tok/s, ETA %.0f s%s", tty ? "\r" : "",
            what, (long long)done, (long long)r->set.n, (long long)r->st->answers,
            el > 0 ? (double)r->st->tokens / el : 0.0, eta, tty && done < r->set.n ? " " : "\n");
}

/* ---- distill sft ---- */

jm_status jm_distill_sft(const jm_distill_opts *o, jm_distill_stats *st, jm_error *err)
{
    memset(st, 0, sizeof *st);
    run r = {.o = o, .st = st, .t0 = now()};
    checkpoint T = {0};
    char target[4096];
    jm_status s = check_opts(o, 0, err);
    if (!s) s = jm_checkpoint_resolve(o->teacher, T.dir, sizeof T.dir, err);
    const char *inputs[] = {o->prompts, T.dir};
    if (!s) s = jm_output_file(o->out, inputs, 2, o->overwrite, target, sizeof target, err);
    if (!s) s = open_checkpoint(&T, o->kernels, err);
    const int chunk = CHUNK_PER_SLOT * o->parallel;
    if (!s) s = begin(&r, &T, target, chunk, err);
    for (int64_t i0 = 0; !s && i0 < r.set.n; i0 += chunk) {
        int n = r.set.n - i0 < chunk ? (int)(r.set.n - i0) : chunk;
        for (int i = 0; i < n; i++) r.p[i] = i0 + i;
        s = answer(&r, T.m, n, err);
        for (int i = 0; i < n && !s; i++) {
            const jm_prompt_record *rec = &r.set.rec[i0 + i];
            char *text;
            if ((s = answer_text(&T, &r.q[i], &text, err))) break;
            if (rec->answer) { /* the teacher's accuracy on checkable prompts: what evaluation reads */
                st->verified++;
                st->right += usable(text) && jm_distill_verify(text, rec->answer);
                st->formatted += usable(text) && strstr(text, "#### ") != NULL;
            }
            if (!usable(text)) {
                st->skip_empty++;
            } else {
                cJSON *obj = cJSON_CreateObject();
                if (!add(obj, "messages", conversation(rec, text))) cJSON_Delete(obj), obj = NULL;
                s = write_record(&r, obj, rec, err);
            }
            free(text);
        }
        if (!s) progress(&r, "sft", i0 + n);
    }
    if (!s) s = finish(&r, err);
    end(&r);
    close_checkpoint(&T);
    return s;
}

/* ---- distill pairs ---- */

/* The teacher's tokens of one answer (see the top of the file): ids[0 .. n),
 * the answer from n_prompt on; n == n_prompt when it renders to nothing. */
static jm_status teacher_tokens(const checkpoint *T, const jm_prompt_record *p, const char *text, jm_score_seq *q,
                                jm_error *err)
{
    jm_chat_message *conv = malloc(sizeof *conv * (size_t)(p->nmsgs + 1));
    if (!conv) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    memcpy(conv, p->msgs, sizeof *conv * (size_t)p->nmsgs);
    conv[p->nmsgs] = (jm_chat_message){"assistant", text};
    int32_t *prompt = NULL, *full = NULL;
    size_t np = 0, nf = 0, k = 0, end_;
    jm_status s = jm_chat_encode(T->t, p->msgs, p->nmsgs, 1, &prompt, &np, err);
    if (!s) s = jm_chat_encode(T->t, conv, p->nmsgs + 1, 0, &full, &nf, err);
    while (!s && k < np && k < nf && prompt[k] == full[k]) k++;
    for (end_ = k; end_ < nf && full[end_] != jm_tokenizer_eos_id(T->t);) end_++;
    if (end_ < nf) end_++; /* the EOS that ends the turn is the teacher's to predict too */
    free(conv);
    free(prompt);
    if (s) {
        free(full);
        return s;
    }
    *q = (jm_score_seq){full, (int)end_, (int)k, 0};
    return JM_OK;
}

/* One chunk's prompts, K answers each (texts[i*K + j]): the verifier's
 * verdicts, the teacher's scores where the ranking needs them, the pairs. */
static jm_status rank_chunk(run *r, checkpoint *T, int64_t i0, int n, char **texts, jm_error *err)
{
    const jm_distill_opts *o = r->o;
    const int K = o->samples;
    int *right = malloc(sizeof *right * (size_t)n * K);
    double *score = malloc(sizeof *score * (size_t)n * K);
    jm_score_seq *sq = calloc((size_t)n * K, sizeof *sq);
    int *sq_of = malloc(sizeof *sq_of * (size_t)n * K); /* answer -> its score sequence, -1 */
    jm_status s = right && score && sq && sq_of ? JM_OK : jm_fail(err, JM_ERR_NOMEM, "out of memory");
    int nsq = 0, need = 0;
    for (int i = 0; i < n && !s; i++) {
        const jm_prompt_record *p = &r->set.rec[i0 + i];
        int nr = 0, nu = 0;
        for (int j = 0; j < K; j++) {
            int a = i * K + j;
            right[a] = p->answer && jm_distill_verify(texts[a], p->answer);
            nu += usable(texts[a]);
            nr += right[a] && usable(texts[a]);
            score[a] = NAN;
            sq_of[a] = -1;
        }
        /* the teacher ranks what the verifier cannot */
        if (!T->m || (p->answer && nr > 0 && nr < nu) || nu < 2) continue;
        for (int j = 0; j < K && !s; j++) {
            int a = i * K + j;
            if (!usable(texts[a])) continue;
            jm_score_seq q;
            if ((s = teacher_tokens(T, p, texts[a], &q, err))) break;
            if (q.n - 1 > jm_model_config(T->m)->max_position_embeddings || q.n == q.n_prompt) {
                r->st->skip_teacher_context += q.n != q.n_prompt;
                free((void *)q.ids);
                continue;
            }
            need = need > q.n - 1 ? need : q.n - 1;
            sq_of[a] = nsq;
            sq[nsq++] = q;
        }
    }
    /* the teacher's slots grow to the longest answer it is given */
    if (!s && nsq && need > jm_context(T->m)) s = jm_set_slots(T->m, o->parallel, need, err);
    if (!s && nsq) s = jm_score_batch(T->m, sq, nsq, err);
    for (int a = 0; a < n * K && !s; a++)
        if (sq_of[a] >= 0) score[a] = sq[sq_of[a]].logp / (sq[sq_of[a]].n - sq[sq_of[a]].n_prompt);
    for (int i = 0; i < n && !s; i++) {
        const jm_prompt_record *p = &r->set.rec[i0 + i];
        const char *const *t = (const char *const *)texts + (int64_t)i * K;
        int c = -1, w = -1;
        jm_rank how = jm_distill_rank(K, t, p->answer ? right + i * K : NULL, T->m ? score + i * K : NULL, &c, &w);
        jm_distill_stats *st = r->st;
        switch (how) {
        case JM_RANK_VERIFIER: st->by_verifier++; break;
        case JM_RANK_TEACHER: st->by_teacher++; break;
        case JM_RANK_ALL_RIGHT: st->skip_all_right++; break;
        case JM_RANK_ALL_WRONG: st->skip_all_wrong++; break;
        case JM_RANK_TIED: st->skip_tied++; break;
        case JM_RANK_TOO_FEW: st->skip_empty++; break;
        }
        if (how != JM_RANK_VERIFIER && how != JM_RANK_TEACHER) continue;
        const int by_v = how == JM_RANK_VERIFIER;
        cJSON *obj = cJSON_CreateObject();
        int ok = add(obj, "prompt", conversation(p, NULL)) && add(obj, "chosen", conversation(p, t[c])) &&
                 add(obj, "rejected", conversation(p, t[w])) &&
                 cJSON_AddNumberToObject(obj, "score_chosen", by_v ? 1.0 : score[i * K + c]) &&
                 cJSON_AddNumberToObject(obj, "score_rejected", by_v ? 0.0 : score[i * K + w]) &&
                 cJSON_AddStringToObject(obj, "ranked_by", by_v ? "verifier" : "teacher");
        if (!ok) cJSON_Delete(obj);
        s = write_record(r, ok ? obj : NULL, p, err);
    }
    for (int k = 0; sq && k < nsq; k++) free((void *)sq[k].ids);
    free(right);
    free(score);
    free(sq);
    free(sq_of);
    return s;
}

jm_status jm_distill_pairs(const jm_distill_opts *o, jm_distill_stats *st, jm_error *err)
{
    memset(st, 0, sizeof *st);
    run r = {.o = o, .st = st, .t0 = now()};
    checkpoint M = {0}, T = {0};
    char target[4096];
    jm_status s = check_opts(o, 1, err);
    if (!s) s = jm_checkpoint_resolve(o->model, M.dir, sizeof M.dir, err);
    if (!s && o->teacher) s = jm_checkpoint_resolve(o->teacher, T.dir, sizeof T.dir, err);
    const char *inputs[] = {o->prompts, M.dir, T.dir};
    if (!s) s = jm_output_file(o->out, inputs, o->teacher ? 3 : 2, o->overwrite, target, sizeof target, err);
    if (!s) s = open_checkpoint(&M, o->kernels, err);
    if (!s && o->teacher) s = open_checkpoint(&T, o->kernels, err);
    const int K = o->samples, per = CHUNK_PER_SLOT * o->parallel / K > 0 ? CHUNK_PER_SLOT * o->parallel / K : 1;
    if (!s) s = begin(&r, &M, target, per * K, err);
    for (int64_t i = 0; !s && !o->teacher && i < r.set.n; i++)
        if (!r.set.rec[i].answer)
            s = jm_fail(err, JM_ERR_ARG, "%s:%lld: the record has no \"answer\" to verify its samples with; pass "
                        "--teacher DIR to rank them by its likelihood", o->prompts, (long long)r.set.rec[i].line);
    if (!s && o->teacher) { /* grown by rank_chunk when an answer needs more */
        int ctx = jm_model_config(T.m)->max_position_embeddings;
        s = jm_set_slots(T.m, o->parallel, ctx < jm_context(M.m) ? ctx : jm_context(M.m), err);
    }
    char **texts = calloc((size_t)per * K, sizeof *texts);
    if (!s && !texts) s = jm_fail(err, JM_ERR_NOMEM, "out of memory");
    for (int64_t i0 = 0; !s && i0 < r.set.n; i0 += per) {
        int n = r.set.n - i0 < per ? (int)(r.set.n - i0) : per;
        for (int a = 0; a < n * K; a++) r.p[a] = i0 + a / K, r.j[a] = a % K;
        s = answer(&r, M.m, n * K, err);
        for (int a = 0; a < n * K && !s; a++) s = answer_text(&M, &r.q[a], &texts[a], err);
        if (!s) s = rank_chunk(&r, &T, i0, n, texts, err);
        for (int a = 0; a < n * K; a++) free(texts[a]), texts[a] = NULL;
        if (!s) progress(&r, "pairs", i0 + n);
    }
    if (!s) s = finish(&r, err);
    free(texts);
    end(&r);
    close_checkpoint(&M);
    close_checkpoint(&T);
    return s;
}
