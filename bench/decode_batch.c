/* bench/decode_batch — decode throughput of K sequences batched in one
 * jm_infer_batch step against the same K decoded one after another, for
 * K = 1, 4, 8, on the bench config (common.h), F32 and Q8 weights.
 *
 *   build/bench/decode_batch [--threads 2] [--prompt 64] [--new 64] [--reps 3]
 *
 * A decode step is bound by reading the active weights, so decoding K
 * sequences in one step (each weight matrix read once for all K tokens)
 * should approach K times the tokens/s of one at a time, until the step
 * turns compute bound or attention (per sequence) dominates. Each K: every
 * sequence gets its own --prompt random tokens, prefilled (not timed), then
 * --new greedy tokens are timed; sequential is one slot, the K sequences in
 * turn; batched is K slots advanced together. Best of --reps. Prints the CPU
 * (lscpu's model name) and the load average, a table on stderr and a JSON
 * line per row on stdout. On a machine shared with other work, OpenMP's
 * spinning barriers make every figure noise: run it idle, or with
 * OMP_WAIT_POLICY=passive. Not a test: it never passes or fails. */
#include "common.h"

#include <unistd.h>

static int32_t argmax(const float *x, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* The 1-minute load average: figures taken while other work runs are not the machine's. */
static double load_average(void)
{
    double l = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f && fscanf(f, "%lf", &l) != 1) l = -1;
    if (f) fclose(f);
    return l;
}

/* Seconds for `steps` decode steps of K sequences: batched (one call per
 * step, K items) or sequential (one slot, each sequence's steps in turn). */
static double decode(jm_model *m, int K, int batched, int32_t **prompts, int n_prompt, int steps, jm_error *err)
{
    const int V = jm_model_config(m)->vocab_size;
    int32_t next[8];
    const float *lg;
    double t = 0;
    if (jm_set_slots(m, batched ? K : 1, n_prompt + steps, err)) return -1;
    if (batched) {
        for (int k = 0; k < K; k++) {
            jm_infer_item pre = {k, 0, n_prompt, prompts[k], 1};
            if (jm_infer_batch(m, &pre, 1, &lg, err)) return -1;
            next[k] = argmax(lg, V);
        }
        double t0 = now();
        for (int i = 0; i < steps; i++) {
            jm_infer_item it[8];
            for (int k = 0; k < K; k++) it[k] = (jm_infer_item){k, n_prompt + i, 1, &next[k], 1};
            if (jm_infer_batch(m, it, K, &lg, err)) return -1;
            for (int k = 0; k < K; k++) next[k] = argmax(lg + (size_t)k * V, V);
        }
        return now() - t0;
    }
    for (int k = 0; k < K; k++) {
        if (jm_infer(m, prompts[k], n_prompt, 0, &lg, err)) return -1;
        next[0] = argmax(lg, V);
        double t0 = now();
        for (int i = 0; i < steps; i++) {
            if (jm_infer(m, &next[0], 1, n_prompt + i, &lg, err)) return -1;
            next[0] = argmax(lg, V);
        }
        t += now() - t0;
    }
    return t;
}

int main(int argc, char **argv)
{
    int threads = 2, n_prompt = 64, steps = 64, reps = 3;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--prompt")) n_prompt = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--new")) steps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: bench/decode_batch [--threads N] [--prompt N] [--new N] [--reps N]\n");
            return 2;
        }
    }
    if (argc % 2 == 0 || threads < 1 || n_prompt < 1 || steps < 1 || reps < 1) {
        fprintf(stderr, "bench/decode_batch: --threads, --prompt, --new and --reps >= 1, flags with values\n");
        return 2;
    }
    jm_set_threads(threads);
    char cpu[256], tmp[] = "/tmp/jm_bench_decode_batch_XXXXXX", f32dir[300], q8dir[300];
    cpu_model(cpu, sizeof cpu);
    if (!mkdtemp(tmp)) return 1;
    snprintf(f32dir, sizeof f32dir, "%s/f32", tmp);
    snprintf(q8dir, sizeof q8dir, "%s/q8", tmp);
    jm_config c;
    bench_config(&c);
    jm_error err;
    jm_model *made = NULL, *models[2] = {NULL, NULL};
    jm_status s = jm_model_create(&c, 1, &made, &err);
    if (!s) s = jm_model_save(made, f32dir, &err);
    if (!s) s = jm_quantize(f32dir, q8dir, 8, 0, &err);
    if (!s) s = jm_model_open(f32dir, &models[0], &err);
    if (!s) s = jm_model_open(q8dir, &models[1], &err);
    jm_model_free(made);
    if (s) {
        fprintf(stderr, "bench/decode_batch: %s\n", err.msg);
        return 1;
    }
    int32_t *prompts[8];
    uint64_t seed = 1;
    for (int k = 0; k < 8; k++) {
        prompts[k] = malloc(sizeof(int32_t) * (size_t)n_prompt);
        for (int i = 0; i < n_prompt; i++) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            prompts[k][i] = (int32_t)((seed >> 33) % (uint64_t)c.vocab_size);
        }
    }
    const char *wait = getenv("OMP_WAIT_POLICY");
    fprintf(stderr, "CPU: %s; %d threads (OMP_WAIT_POLICY %s); load average %.2f; bench config (vocab 32000, "
            "hidden 256, 4 layers, 8 experts top-2); %d-token prompts, %d decode steps timed, best of %d\n", cpu,
            threads, wait ? wait : "unset", load_average(), n_prompt, steps, reps);
    fprintf(stderr, "%-8s %3s %16s %16s %8s\n", "weights", "K", "sequential tok/s", "batched tok/s", "ratio");
    const int Ks[3] = {1, 4, 8};
    for (int w = 0; w < 2 && !s; w++) {
        jm_model *m = models[w];
        decode(m, 1, 1, prompts, n_prompt, 8, &err); /* warm-up: arenas planned, pages touched */
        for (int i = 0; i < 3; i++) {
            const int K = Ks[i];
            double best[2] = {1e30, 1e30};
            for (int r = 0; r < reps; r++)
                for (int b = 0; b < 2; b++) {
                    double t = decode(m, K, b, prompts, n_prompt, steps, &err);
                    if (t < 0) {
                        fprintf(stderr, "bench/decode_batch: %s\n", err.msg);
                        return 1;
                    }
                    best[b] = t < best[b] ? t : best[b];
                }
            const double seq = K * steps / best[0], bat = K * steps / best[1];
            fprintf(stderr, "%-8s %3d %16.1f %16.1f %7.2fx\n", jm_model_weight_type(m), K, seq, bat, bat / seq);
            printf("{\"impl\":\"c\",\"what\":\"decode_batch\",\"cpu\":\"%s\",\"threads\":%d,\"weight_type\":\"%s\","
                   "\"kernels\":\"%s\",\"k\":%d,\"prompt\":%d,\"new\":%d,\"sequential_tok_s\":%.2f,"
                   "\"batched_tok_s\":%.2f,\"ratio\":%.3f}\n", cpu, threads, jm_model_weight_type(m), jm_kernels(m),
                   K, n_prompt, steps, seq, bat, bat / seq);
            fflush(stdout);
        }
    }
    fprintf(stderr, "load average at the end %.2f\n", load_average());
    for (int k = 0; k < 8; k++) free(prompts[k]);
    jm_model_free(models[0]);
    jm_model_free(models[1]);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd) != 0) fprintf(stderr, "bench/decode_batch: could not remove %s\n", tmp);
    return 0;
}
