/* test_eval.c — prefix reuse in jm_eval_run is exact: multiple-choice
 * log-likelihoods with each context prefilled once (the default: an
 * example's choices one after another through jm_score_batch, the context
 * found in a slot's cache) against each (context, choice) from an empty cache
 * (jm_eval_opts.one_by_one).
 *
 * A 300-piece tokenizer from spm_train (as test_chat.c makes one) and a fresh
 * jm_model_create model with its vocabulary; a generic task of 20 examples
 * (2-5 choices, contexts of 1-65 words, some shared by neighbours, trailing
 * spaces, newlines, non-ASCII), more than one of eval.c's groups of 16.
 *   eval_one_slot_reuse           one slot: default vs one_by_one bit for bit
 *                                 (only whole prompts are reused, so each is
 *                                 prefilled in the same call either way)
 *   eval_four_slots_reuse         4 slots (sequences side by side in one call,
 *                                 a context copied between slots): within 1e-5
 *                                 relative, the largest printed
 *   eval_shots_four_slots_reuse   the same with 2 shots before each context
 *   eval_records                  every example seen once, in order, preds agree */
#include "harness.h"

#include "jetmoe.h"

#include <math.h>
#include <unistd.h>

#define N_EX 20
#define MAX_LL 256

typedef struct {
    double ll[MAX_LL];
    int n_ll, n_rec, pred[N_EX], pred_norm[N_EX], index_ok;
} collected;

static int on_record(void *p, const jm_eval_record *r)
{
    collected *c = p;
    if (r->index != c->n_rec) c->index_ok = 0;
    if (c->n_rec < N_EX) c->pred[c->n_rec] = r->pred, c->pred_norm[c->n_rec] = r->pred_norm;
    c->n_rec++;
    for (int i = 0; i < r->nchoices && c->n_ll < MAX_LL; i++) c->ll[c->n_ll++] = r->loglik[i];
    return 0;
}

static bool run_quiet(const char *cmd)
{
    char full[2200];
    snprintf(full, sizeof full, "%s >/dev/null 2>&1", cmd);
    return system(full) == 0;
}

static const char *const WORDS[] = {"the", "model", "user", "reads", "expert", "router", "token", "mixture",
                                    "attention", "héllo", "日本", "42", "!", "?", "license", "copy", "answer"};
#define NWORDS ((int)(sizeof WORDS / sizeof *WORDS))

static void write_corpus(const char *path)
{
    FILE *f = fopen(path, "wb");
    if (!f) exit(2);
    uint32_t r = 777;
    for (int line = 0; line < 3000; line++) {
        for (int w = 0, n = 3 + line % 9; w < n; w++) {
            r = r * 1103515245u + 12345u;
            fprintf(f, "%s%s", w ? " " : "", WORDS[(r >> 16) % NWORDS]);
        }
        fputc('\n', f);
    }
    fclose(f);
}

/* n words from the generator into buf (JSON-safe: no quotes or backslashes). */
static void words(char *buf, size_t cap, uint32_t *r, int n)
{
    size_t o = 0;
    buf[0] = 0;
    for (int w = 0; w < n && o + 32 < cap; w++) {
        *r = *r * 1103515245u + 12345u;
        o += (size_t)snprintf(buf + o, cap - o, "%s%s", w ? " " : "", WORDS[(*r >> 16) % NWORDS]);
    }
}

static void write_task(const char *path)
{
    FILE *f = fopen(path, "wb");
    if (!f) exit(2);
    uint32_t r = 4242;
    char ctx[4096] = "", choice[512];
    for (int i = 0; i < N_EX; i++) {
        if (i % 3 != 1) { /* every third example shares its neighbour's context */
            words(ctx, sizeof ctx, &r, i == 0 ? 1 : 5 + (i * 37) % 60);
            if (i % 4 == 2) strcat(ctx, " ");  /* a trailing space moves to the choices */
            if (i % 5 == 3) strcat(ctx, "\\n"); /* a newline (JSON-escaped) */
        }
        const int nch = 2 + i % 4;
        fprintf(f, "{\"context\": \"%s\", \"choices\": [", ctx);
        for (int c = 0; c < nch; c++) {
            words(choice, sizeof choice, &r, 1 + (i + c) % 6);
            fprintf(f, "%s\"%s%s\"", c ? ", " : "", (i + c) % 2 ? " " : "", choice);
        }
        fprintf(f, "], \"gold\": %d}\n", i % nch);
    }
    fclose(f);
}

static double max_rel(const collected *a, const collected *b)
{
    double worst = 0;
    for (int i = 0; i < a->n_ll && i < b->n_ll; i++) {
        double d = fabs(a->ll[i] - b->ll[i]) / fmax(fabs(b->ll[i]), 1e-30);
        worst = d > worst ? d : worst;
    }
    return a->n_ll == b->n_ll ? worst : INFINITY;
}

static double max_abs(const collected *a, const collected *b)
{
    double worst = 0;
    for (int i = 0; i < a->n_ll && i < b->n_ll; i++) worst = fmax(worst, fabs(a->ll[i] - b->ll[i]));
    return a->n_ll == b->n_ll ? worst : INFINITY;
}

static bool run(jm_model *m, const jm_tokenizer *tok, const jm_eval_task *t, int shots, int one_by_one, int slots,
                collected *c, const char *what)
{
    jm_error err = {{0}};
    memset(c, 0, sizeof *c);
    c->index_ok = 1;
    jm_eval_opts o = {.shots = shots, .seed = 9, .one_by_one = one_by_one, .slots = slots};
    jm_eval_result res;
    double t0 = now();
    if (jm_eval_run(m, tok, t, &o, &res, on_record, c, &err)) return check(false, what, "jm_eval_run: %s", err.msg);
    printf("# %s: shots %d, one_by_one %d, slots %d: %.2f s\n", what, shots, one_by_one, jm_slots(m), now() - t0);
    return true;
}

int main(void)
{
    char dir[] = "/tmp/jm_test_eval_XXXXXX", corpus[256], cmd[2048], task_path[256];
    temp_dir(dir);
    snprintf(corpus, sizeof corpus, "%s/corpus.txt", dir);
    snprintf(task_path, sizeof task_path, "%s/task.jsonl", dir);
    write_corpus(corpus);
    write_task(task_path);
    snprintf(cmd, sizeof cmd,
             "spm_train --input=%s --model_prefix=%s/tokenizer --vocab_size=300 --model_type=bpe --byte_fallback=true "
             "--normalization_rule_name=identity --remove_extra_whitespaces=false --split_digits=true "
             "--unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --num_threads=1",
             corpus, dir);
    jm_error err = {{0}};
    jm_tokenizer *tok = NULL;
    jm_eval_task *task = NULL;
    jm_model *m = NULL;
    char tok_path[256];
    snprintf(tok_path, sizeof tok_path, "%s/tokenizer.model", dir);
    if (!check(run_quiet(cmd), "eval_spm_train", "spm_train failed (is Debian's sentencepiece installed?)") ||
        !check(!jm_tokenizer_load(tok_path, &tok, &err), "eval_tokenizer_load", "%s", err.msg) ||
        !check(!jm_eval_task_load(task_path, &task, &err), "eval_task_load", "%s", err.msg))
        goto done;
    jm_config c;
    jm_config_default(&c);
    c.vocab_size = jm_tokenizer_vocab_size(tok);
    c.hidden_size = 32, c.num_layers = 2, c.num_kv_heads = 2, c.head_dim = 8, c.intermediate_size = 24;
    c.num_experts = 4, c.top_k = 2, c.max_position_embeddings = 512;
    if (!check(!jm_model_create(&c, 5, &m, &err), "eval_model_create", "%s", err.msg)) goto done;

    static collected four, one, reuse1, shots4, shots1;
    if (run(m, tok, task, 0, 0, 4, &four, "eval_four_slots_reuse") &&
        run(m, tok, task, 0, 1, 0, &one, "eval_one_by_one") &&
        run(m, tok, task, 0, 0, 1, &reuse1, "eval_one_slot_reuse")) {
        int choices = 0;
        for (int i = 0; i < task->n; i++) choices += task->ex[i].nchoices;
        const double d1 = max_rel(&reuse1, &one), d4 = max_rel(&four, &one);
        check_detail(d1 == 0 && one.n_ll == choices, "eval_one_slot_reuse",
                     "%d examples, %d choices: largest relative difference %.3g, absolute %.3g%s", task->n, one.n_ll,
                     d1, max_abs(&reuse1, &one), d1 == 0 ? " (bit for bit)" : "");
        check_detail(d4 <= 1e-5, "eval_four_slots_reuse", "%d choices: largest relative difference %.3g, absolute %.3g",
                     four.n_ll, d4, max_abs(&four, &one));
        bool same = four.n_rec == N_EX && one.n_rec == N_EX && reuse1.n_rec == N_EX && four.index_ok && one.index_ok &&
                    reuse1.index_ok;
        for (int i = 0; i < N_EX && same; i++)
            same = four.pred[i] == one.pred[i] && four.pred_norm[i] == one.pred_norm[i] && reuse1.pred[i] == one.pred[i];
        check(same, "eval_records", "%d/%d/%d records, in order %d/%d/%d, or preds differ", four.n_rec, one.n_rec,
              reuse1.n_rec, four.index_ok, one.index_ok, reuse1.index_ok);
    }
    if (run(m, tok, task, 2, 0, 4, &shots4, "eval_shots_four_slots_reuse") &&
        run(m, tok, task, 2, 1, 0, &shots1, "eval_shots_four_slots_reuse")) {
        const double d = max_rel(&shots4, &shots1);
        check_detail(d <= 1e-5 && max_abs(&shots4, &four) > 0, "eval_shots_four_slots_reuse",
                     "2 shots, %d choices: largest relative difference %.3g", shots4.n_ll, d);
    }
done:
    jm_model_free(m);
    jm_eval_task_free(task);
    jm_tokenizer_free(tok);
    temp_dir_done(dir);
    return exit_status();
}
