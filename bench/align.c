/* bench/align — one optimizer step's forward and backward of SFT or DPO on a
 * checkpoint and pre-tokenized records, timed: the step `jetmoe sft|dpo
 * --dump-grad` runs (jm_sft_set_grads, jm_dpo_set_grads: the whole file as one
 * micro-batch, packed into rows of --max-len), after jm_zero_grad, without the
 * optimizer. bench/align.py prepares the model and the data and compares the
 * figures with the PyTorch reference. Not a test.
 *
 *   build/bench/align sft MODEL DATA.jsonl [--threads 2] [--warmup 1] [--iters 5] [--max-len 2048]
 *   build/bench/align dpo MODEL DATA.jsonl --ref-logps FILE [--beta 0.1] [--label-smoothing 0] [...]
 *
 * DPO's reference log-probs are precomputed, as `jetmoe dpo` caches them:
 * FILE holds one number a line, each pair's chosen then rejected summed
 * completion log-prob. Prints one JSON line: every timed step's seconds, the
 * tokens of a step (every token of every sequence, prompts included), the
 * packed shape, the losses and the BLAS. */
#include "common.h"

#include "align/align.h"

typedef struct {
    jm_model *m;
    int dpo, max_len;
    jm_sft_set sft;
    jm_pref_set pref;
    double *ref, beta, eps, loss[4];
    jm_error err;
} align_ctx;

static int align_step(void *p)
{
    align_ctx *c = p;
    if (jm_zero_grad(c->m, &c->err)) return 1;
    if (c->dpo) return jm_dpo_set_grads(c->m, &c->pref, c->ref, c->max_len, c->beta, c->eps, c->loss, &c->err) != 0;
    return jm_sft_set_grads(c->m, &c->sft, c->max_len, c->loss, &c->err) != 0;
}

/* n doubles, one a line */
static int read_numbers(const char *path, double *x, int64_t n, jm_error *err)
{
    FILE *f = fopen(path, "r");
    if (!f) return jm_fail(err, JM_ERR_IO, "%s: cannot open", path);
    int64_t i = 0;
    while (i < n && fscanf(f, "%lf", &x[i]) == 1) i++;
    double extra;
    int more = fscanf(f, "%lf", &extra) == 1;
    fclose(f);
    if (i < n || more)
        return jm_fail(err, JM_ERR_FORMAT, "%s: %s numbers, want %lld (2 per pair)", path, more ? "more" : "fewer",
                       (long long)n);
    return 0;
}

static int usage(void)
{
    fprintf(stderr, "usage: bench/align sft|dpo MODEL DATA.jsonl [--threads N] [--warmup N] [--iters N] "
                    "[--max-len N] [--ref-logps FILE] [--beta B] [--label-smoothing E]\n");
    return 2;
}

/* The tokens of one step (a pair's prompt twice: it is in both sequences),
 * and the rows they pack into (pk). */
static int64_t step_shape(const align_ctx *c, jm_packed *pk, jm_error *err)
{
    const int64_t nseq = c->dpo ? 2 * c->pref.n : c->sft.n;
    jm_seq_ref *seq = calloc((size_t)nseq, sizeof *seq);
    if (!seq) return jm_fail(err, JM_ERR_NOMEM, "out of memory"), -1;
    int64_t tokens = 0;
    for (int64_t i = 0; i < nseq; i++) {
        const jm_pref_example *e = c->dpo ? &c->pref.ex[i / 2] : NULL;
        const int32_t *ids = e ? (i % 2 ? e->rejected.ids : e->chosen.ids) : c->sft.ex[i].ids;
        int n = e ? (i % 2 ? e->rejected.n : e->chosen.n) : c->sft.ex[i].n;
        seq[i] = (jm_seq_ref){ids, ids, n}; /* the targets do not change the shape */
        tokens += n;
    }
    jm_status s = jm_pack(pk, seq, (int)nseq, c->max_len, err);
    free(seq);
    return s ? -1 : tokens;
}

int main(int argc, char **argv)
{
    if (argc < 4 || (strcmp(argv[1], "sft") && strcmp(argv[1], "dpo"))) return usage();
    align_ctx c = {.dpo = !strcmp(argv[1], "dpo"), .max_len = 2048, .beta = 0.1};
    const char *model = argv[2], *data = argv[3], *ref_path = NULL;
    int threads = 2, warmup = 1, iters = 5;
    for (int i = 4; i < argc; i += 2) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) return usage();
        if (!strcmp(a, "--threads")) threads = atoi(v);
        else if (!strcmp(a, "--warmup")) warmup = atoi(v);
        else if (!strcmp(a, "--iters")) iters = atoi(v);
        else if (!strcmp(a, "--max-len")) c.max_len = atoi(v);
        else if (!strcmp(a, "--ref-logps")) ref_path = v;
        else if (!strcmp(a, "--beta")) c.beta = atof(v);
        else if (!strcmp(a, "--label-smoothing")) c.eps = atof(v);
        else return usage();
    }
    if (iters < 1 || warmup < 0 || (c.dpo && !ref_path)) return usage();
    jm_set_threads(threads);

    double *t = malloc(sizeof *t * (size_t)iters);
    jm_records_stats st = {0};
    jm_records_opts o = {c.max_len, 0, 0, 0, 1}; /* truncate 0: a longer record is dropped, and counted */
    jm_packed pk = {0};
    int64_t tokens = -1;
    int rc = 1;
    if (!t) {
        jm_fail(&c.err, JM_ERR_NOMEM, "out of memory");
        goto done;
    }
    if (jm_model_load(model, &c.m, &c.err)) goto done;
    o.vocab_size = jm_model_config(c.m)->vocab_size;
    if (c.dpo ? jm_pref_load(&data, 1, NULL, &o, &c.pref, &st, &c.err)
              : jm_sft_load(&data, 1, NULL, &o, &c.sft, &st, &c.err))
        goto done;
    if (st.too_long) {
        jm_fail(&c.err, JM_ERR_ARG, "%s: %lld records longer than --max-len %d", data, (long long)st.too_long,
                c.max_len);
        goto done;
    }
    if ((tokens = step_shape(&c, &pk, &c.err)) < 0) goto done;
    if (c.dpo) {
        if (!(c.ref = malloc(sizeof *c.ref * (size_t)(2 * c.pref.n)))) {
            jm_fail(&c.err, JM_ERR_NOMEM, "out of memory");
            goto done;
        }
        if (read_numbers(ref_path, c.ref, 2 * c.pref.n, &c.err)) goto done;
    }
    if (bench_times(align_step, &c, warmup, iters, t)) goto done;

    printf("{\"impl\":\"c\",\"what\":\"%s\",\"threads\":%d,\"tokens\":%lld,\"loss_tokens\":%lld,\"sequences\":%d,"
           "\"rows\":%d,\"row_len\":%d,\"max_len\":%d,\"loss\":%.9g,\"%s\":%.9g,\"aux_loss\":%.9g,\"z_loss\":%.9g,"
           "\"blas\":\"%s\",\"blas_core\":\"%s\",\"warmup\":%d,\"times\":[",
           argv[1], threads, (long long)tokens, (long long)st.loss_tokens, pk.n, pk.batch.B, pk.batch.T, c.max_len,
           c.loss[0], c.dpo ? "dpo_loss" : "ce_loss", c.loss[1], c.loss[2], c.loss[3], openblas_get_config(),
           openblas_get_corename(), warmup);
    for (int i = 0; i < iters; i++) printf("%s%.6f", i ? "," : "", t[i]);
    printf("]}\n");
    rc = 0;
done:
    if (rc) fprintf(stderr, "bench/align: %s\n", c.err.msg);
    free(t);
    free(c.ref);
    jm_packed_free(&pk);
    jm_sft_free(&c.sft);
    jm_pref_free(&c.pref);
    jm_model_free(c.m);
    return rc;
}
