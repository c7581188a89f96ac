/* bench/eval.c — multiple-choice scoring speed of jm_eval_run, the library
 * call under `jetmoe eval --task`:
 *
 *   build/bench/eval MODEL TOKENIZER TASK.jsonl [--threads 2] [--warmup 1] [--iters 3]
 *                    [--slots 4] [--way default|one_by_one|both]
 *
 * Opens MODEL for inference (jm_model_open, as `jetmoe eval` does) and times
 * whole jm_eval_run calls over the task: "default" (each context prefilled
 * once, the choices read it from the cache, --slots sequences side by side)
 * and "one_by_one" (jm_eval_opts.one_by_one: every (context, choice) from an
 * empty cache, one at a time, on one slot). One JSON line per way on stdout
 * (examples/s of the median, every time, and the summed log-likelihood of all
 * choices, so that a driver can see the ways computed the same thing); bench/eval.py
 * runs it beside the PyTorch peers. Not a test. */

#include "common.h"

typedef struct {
    jm_model *m;
    const jm_tokenizer *tok;
    const jm_eval_task *t;
    int one_by_one, slots, choices;
    double loglik;
} run_ctx;

static int add_record(void *p, const jm_eval_record *r)
{
    run_ctx *c = p;
    for (int i = 0; i < r->nchoices; i++) c->loglik += r->loglik[i];
    c->choices += r->nchoices;
    return 0;
}

static int step(void *p)
{
    run_ctx *c = p;
    jm_error err;
    c->loglik = 0, c->choices = 0;
    /* the default path keeps the model's slots: give it --slots afresh (one_by_one sets its own one) */
    if (!c->one_by_one && jm_set_slots(c->m, c->slots, jm_model_config(c->m)->max_position_embeddings, &err)) {
        fprintf(stderr, "bench/eval: %s\n", err.msg);
        return 1;
    }
    jm_eval_opts o = {.one_by_one = c->one_by_one};
    jm_eval_result res;
    if (jm_eval_run(c->m, c->tok, c->t, &o, &res, add_record, c, &err)) {
        fprintf(stderr, "bench/eval: %s\n", err.msg);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: bench/eval MODEL TOKENIZER TASK.jsonl [--threads N] [--warmup N] [--iters N] "
                        "[--slots N] [--way default|one_by_one|both]\n");
        return 2;
    }
    int threads = 2, warmup = 1, iters = 3, slots = 4;
    const char *way = "both";
    for (int i = 4; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup")) warmup = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--iters")) iters = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--slots")) slots = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--way")) way = argv[i + 1];
        else {
            fprintf(stderr, "bench/eval: unknown flag %s\n", argv[i]);
            return 2;
        }
    }
    if (argc % 2 || iters < 1 || iters > 100 || slots < 1) {
        fprintf(stderr, "bench/eval: --iters in [1, 100], --slots >= 1, flags with values\n");
        return 2;
    }
    jm_set_threads(threads);
    jm_error err;
    jm_model *m = NULL;
    jm_tokenizer *tok = NULL;
    jm_eval_task *t = NULL;
    if (jm_model_open(argv[1], &m, &err) || jm_tokenizer_load(argv[2], &tok, &err) ||
        jm_eval_task_load(argv[3], &t, &err)) {
        fprintf(stderr, "bench/eval: %s\n", err.msg);
        jm_model_free(m);
        jm_tokenizer_free(tok);
        return 1;
    }
    int rc = 0;
    for (int w = 0; w < 2 && !rc; w++) {
        const char *name = w ? "one_by_one" : "default";
        if (strcmp(way, "both") && strcmp(way, name)) continue;
        run_ctx c = {m, tok, t, w, slots, 0, 0};
        double times[100];
        if ((rc = bench_times(step, &c, warmup, iters, times))) break;
        double sorted[100];
        memcpy(sorted, times, sizeof(double) * (size_t)iters);
        qsort(sorted, (size_t)iters, sizeof(double), bench_cmp_double);
        const double med = sorted[iters / 2];
        printf("{\"impl\":\"c-%s\",\"examples\":%d,\"choices\":%d,\"slots\":%d,\"threads\":%d,\"median_s\":%.6f,"
               "\"examples_per_s\":%.3f,\"loglik_sum\":%.10g,\"times\":[",
               name, t->n, c.choices, w ? 1 : slots, threads, med, t->n / med, c.loglik);
        for (int i = 0; i < iters; i++) printf("%s%.6f", i ? "," : "", times[i]);
        printf("]}\n");
        fflush(stdout);
    }
    jm_eval_task_free(t);
    jm_tokenizer_free(tok);
    jm_model_free(m);
    return rc;
}
