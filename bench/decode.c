/* bench/decode — KV-cached decode throughput of the C model on a checkpoint,
 * against the memory-bandwidth roofline measured in the same run.
 *
 *   build/bench/decode DIR [--threads N] [--prompt 512] [--new 32] [--kernels auto] [--warmup 32]
 *   build/bench/decode --bench-config OUT.json     (writes common.h's bench config)
 *
 * Opens DIR for inference (jm_model_open: weights used in place, at their
 * stored dtype), prefills a --prompt-token prompt in one jm_infer call, then
 * decodes --new tokens greedily, one cached jm_infer step each. A decode step
 * reads every active weight once, so its speed limit is the memory bandwidth
 * over jm_active_weight_bytes: "ratio" is decode tokens/s over that roofline.
 * A step also reads K and V of every position it attends over (at a
 * 512-token prompt with a bf16 cache 8% more bytes than the 8B layout's q4
 * weights, 2% more than its bf16): "kv_ratio" and "paired_kv_ratio" count
 * those bytes too.
 * Prints a summary on stderr and one JSON line on stdout (bench/decode.py
 * compares it with the PyTorch peer, bench/decode_ref.py). Not a test.
 *
 * The roofline's bandwidth is the best of 20 reads of 1 GB, but on shared
 * virtual CPUs what the memory gives comes and goes within seconds (two
 * threads read 38-78 GB/s within one process). With --paired MB each step
 * is also paired with one read of MB right after it: "paired_ratio" is the
 * median over the steps of the step's own bytes/s over that read's rate,
 * decode against the machine as it was at the time: the same steps, the
 * same bytes, a local yardstick. (Off by default: the read empties the
 * caches between steps, which a model whose weights fit in them would feel.)
 *
 * --kernels read: the products only read their bytes (jm_set_read_only_products)
 * and the tokens are garbage: the step's own memory ceiling, for what share
 * of a step's gap to the roofline is the memory system's and what the
 * kernels'. */

#include "common.h"

#include <errno.h>
#include <sys/resource.h>
#include <unistd.h>

/* Greedy choice, the library's (the lowest id among equal maxima, as the
 * reference's). */
static int32_t argmax(const float *x, int n)
{
    const jm_sample_opts greedy = {.greedy = 1};
    return jm_sample(x, n, &greedy, NULL, NULL);
}

/* Linux's "5" to clear_refs resets the peak RSS (VmHWM, what getrusage's
 * ru_maxrss reports) to the current RSS. */
static void reset_peak_rss(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5", f);
        fclose(f);
    }
}

static double peak_rss_mb(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss / 1024.0; /* Linux: KB */
}

/* MB of this process's memory mapped with 2 MB pages: file pages (a
 * checkpoint's mapping, FilePmdMapped) and anonymous ones (weights copied to
 * memory, AnonHugePages). Behind 4 KB pages a virtual machine's address
 * translation can bound decoding well below the memory's bandwidth. */
static double huge_mapped_mb(double *anon_mb)
{
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    double file = 0, anon = 0, v;
    while (f && fgets(line, sizeof line, f)) {
        if (sscanf(line, "FilePmdMapped: %lf", &v) == 1) file += v;
        if (sscanf(line, "AnonHugePages: %lf", &v) == 1) anon += v;
    }
    if (f) fclose(f);
    *anon_mb = anon / 1024;
    return (file + anon) / 1024;
}

/* The median and the fastest of the steady steps (after the first), which
 * it sorts: on a shared machine a few steps the host slowed move the mean,
 * not these. */
static void step_spread(double *step_s, int n, double *median, double *fastest)
{
    const int first = n > 1, m = n - first;
    double *v = step_s + first;
    *median = bench_median(v, m);
    *fastest = v[0];
}

/* Over the steady steps, each step's weight bytes/s over the rate of the
 * read paired with it (gbs, GB/s): -> their median; *kv_ratio the same with
 * the KV cache bytes the step reads too (kv_pos bytes a position, step i at
 * n_prompt + i + 1 positions), *bw_median the reads'. Sorts gbs. */
static double paired_ratio(const double *step_s, double *gbs, int n, double bytes, double kv_pos, int n_prompt,
                           double *kv_ratio, double *bw_median)
{
    const int first = n > 1, m = n - first;
    double *r = malloc(sizeof(double) * 2 * (size_t)m), *rk = r + m;
    *bw_median = *kv_ratio = 0;
    if (!r) return 0;
    for (int i = 0; i < m; i++) {
        const double rate = 1 / step_s[first + i] / 1e9 / gbs[first + i];
        r[i] = bytes * rate;
        rk[i] = (bytes + kv_pos * (n_prompt + first + i + 1)) * rate;
    }
    const double ratio = bench_median(r, m);
    *kv_ratio = bench_median(rk, m);
    free(r);
    *bw_median = bench_median(gbs + first, m);
    return ratio;
}

/* One line per step on a TTY (rewritten in place); plain lines, only for
 * slow steps, otherwise: an 8B BF16 decode takes seconds per token. */
static void progress(int i, int n, double step_s, double elapsed)
{
    double eta = elapsed / (i + 1) * (n - i - 1);
    if (isatty(2))
        fprintf(stderr, "\rdecode %d/%d  %.2f s/token  ETA %.0f s ", i + 1, n, step_s, eta);
    else if (step_s >= 1.0)
        fprintf(stderr, "decode %d/%d  %.2f s/token  ETA %.0f s\n", i + 1, n, step_s, eta);
}

static int usage(void)
{
    fprintf(stderr, "usage: bench/decode DIR [--threads N] [--prompt N] [--new N] "
                    "[--kernels auto|avx512[:stream|:prefetch]|avx2[:stream|:prefetch]|portable|read] "
                    "[--kv-cache f32|bf16] [--warmup N] [--weights map|ram|auto] [--paired MB]\n       bench/decode --bench-config OUT.json\n");
    return 2;
}

static int write_bench_config(const char *path)
{
    jm_config c;
    jm_error err;
    bench_config(&c);
    if (jm_config_save(path, &c, &err)) {
        fprintf(stderr, "bench/decode: %s\n", err.msg);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *dir = NULL, *kernels = "auto", *kv_cache = "f32", *weights = "map";
    int threads = 2, n_prompt = 512, n_new = 32, warmup = 32, paired_mb = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (a[0] != '-') {
            if (dir) return usage();
            dir = a;
            continue;
        }
        if (!v) return usage();
        i++;
        if (!strcmp(a, "--bench-config")) return write_bench_config(v);
        else if (!strcmp(a, "--threads")) threads = atoi(v);
        else if (!strcmp(a, "--prompt")) n_prompt = atoi(v);
        else if (!strcmp(a, "--new")) n_new = atoi(v);
        else if (!strcmp(a, "--kernels")) kernels = v;
        else if (!strcmp(a, "--kv-cache")) kv_cache = v;
        else if (!strcmp(a, "--weights")) weights = v;
        else if (!strcmp(a, "--warmup")) warmup = atoi(v);
        else if (!strcmp(a, "--paired")) paired_mb = atoi(v);
        else return usage();
    }
    if (!dir || threads < 1 || n_prompt < 1 || n_new < 1 || warmup < 0 || paired_mb < 0) return usage();
    /* The paired reads run on OpenMP's threads, which by default spin on
     * after a region: at the next step a spinning one holds the core the
     * decode pool's worker needs. Under libgomp's default policy, --paired
     * made q8 steps at 2 threads 8-10% slower (75-77% of the roofline against
     * 82-85% without; passive: 80-85 against 86-88; AMD EPYC family 26 model
     * 2): the yardstick moved what it measured. So with --paired the wait
     * policy is passive unless the caller set one (bench/decode.py does). */
    if (paired_mb && !getenv("OMP_WAIT_POLICY")) {
        setenv("OMP_WAIT_POLICY", "passive", 1);
        execv("/proc/self/exe", argv);
        fprintf(stderr, "bench/decode: cannot restart with OMP_WAIT_POLICY=passive (%s); run with it set\n",
                strerror(errno));
        return 1;
    }
    jm_set_threads(threads);

    jm_error err;
    jm_model *m = NULL;
    double t0 = now();
    jm_status s = jm_model_open(dir, &m, &err);
    const double open_s = now() - t0;
    const int read_only = !strcmp(kernels, "read");
    if (!s && read_only) jm_set_read_only_products(m);
    if (s || jm_weights_place(m, weights, &err) || (!read_only && jm_set_kernels(m, kernels, &err)) ||
        jm_set_kv_cache(m, kv_cache, &err) || jm_set_context(m, n_prompt + n_new, &err)) {
        fprintf(stderr, "bench/decode: %s\n", err.msg);
        jm_model_free(m);
        return 1;
    }
    const jm_config *c = jm_model_config(m);
    const int V = c->vocab_size;
    int32_t *prompt = bench_tokens(n_prompt, V);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(n_new + 1));
    double *step_s = malloc(sizeof(double) * (size_t)n_new);
    if (!prompt || !ids || !step_s) {
        fprintf(stderr, "bench/decode: out of memory\n");
        return 1;
    }
    const float *logits;
    /* The roofline's read bandwidth, measured before the run and after it, the
     * better of the two: on shared virtual CPUs a second thread's share of
     * the memory comes and goes (two threads measured 44 and 83 GB/s minutes
     * apart), and the roofline is what the machine can do. */
    const double bw_before = read_bandwidth((size_t)1 << 30, 10);
    read_buf pair_buf = {0};
    double *paired_gbs = calloc((size_t)n_new, sizeof(double));
    if ((paired_mb && !read_buf_new(&pair_buf, (size_t)paired_mb << 20)) || !paired_gbs) {
        fprintf(stderr, "bench/decode: out of memory\n");
        return 1;
    }
    reset_peak_rss(); /* the peak RSS reported is the model's (less the paired buffer), not the 1 GB one's */

    /* A short prefill first faults the mapped weights in (nearly every expert
     * is chosen by some token); the timed prefill at position 0 rewinds it. */
    if (warmup > 0) s = jm_infer(m, prompt, warmup < n_prompt ? warmup : n_prompt, 0, &logits, &err);

    t0 = now();
    if (!s) s = jm_infer(m, prompt, n_prompt, 0, &logits, &err);
    const double prefill_s = now() - t0;
    if (!s) ids[0] = argmax(logits, V);

    /* ids[0] comes from the prefill; step i feeds ids[i] at position prompt + i */
    double decode_s = 0;
    for (int i = 0; !s && i < n_new; i++) {
        t0 = now();
        s = jm_infer(m, &ids[i], 1, n_prompt + i, &logits, &err);
        if (s) break;
        ids[i + 1] = argmax(logits, V);
        step_s[i] = now() - t0;
        decode_s += step_s[i];
        progress(i, n_new, step_s[i], decode_s);
        if (paired_mb) paired_gbs[i] = read_pass(&pair_buf);
    }
    if (isatty(2)) fputc('\n', stderr);
    if (s) {
        fprintf(stderr, "bench/decode: %s\n", err.msg);
        return 1;
    }
    /* the first step pays one-off costs (a smaller arena plan, cold caches) */
    const double steady_s = n_new > 1 ? decode_s - step_s[0] : decode_s;
    const double decode_tps = (n_new > 1 ? n_new - 1 : 1) / steady_s, decode_all_tps = n_new / decode_s;
    const int64_t bytes = jm_active_weight_bytes(m);
    /* what a step reads of the cache too: K and V of every position it
     * attends over (its own and each earlier one), on average over the
     * steady steps (1 .. n_new - 1, step i at n_prompt + i + 1 positions) */
    const double kv_pos =
        (double)c->num_layers * 2 * c->num_kv_heads * c->head_dim * (strcmp(jm_kv_cache(m), "bf16") ? 4 : 2);
    const double kv_bytes = kv_pos * (n_prompt + (n_new > 1 ? (n_new + 2) / 2.0 : 1));
    double paired_bw = 0, paired_kv = 0;
    const double paired =
        paired_mb ? paired_ratio(step_s, paired_gbs, n_new, (double)bytes, kv_pos, n_prompt, &paired_kv, &paired_bw) : 0;
    double median_s, fastest_s; /* step_s[1..] sorted from here on */
    step_spread(step_s, n_new, &median_s, &fastest_s);
    double anon_huge_mb; /* of which anonymous: weights copied to RAM, the KV cache, the activations */
    const double rss = peak_rss_mb() - pair_buf.n / 1048576.0; /* before the bandwidth buffer adds its 1 GB */
    read_buf_free(&pair_buf); /* before its 2 MB pages are counted */
    const double huge_mb = huge_mapped_mb(&anon_huge_mb);

    const double bw_after = read_bandwidth((size_t)1 << 30, 10), bw = bw_before > bw_after ? bw_before : bw_after;
    /* A step's weights that fit in the last-level cache stay there from one
     * step to the next (the small config's 56 MB in a large L3), and then the
     * memory's roofline is no ceiling: reads of that cache are. This is the
     * rate of a buffer of the step's active bytes read again and again, the
     * ceiling if every one of them stays cached (its best of 20 passes; 0
     * where the step reads more than the roofline's 1 GB buffer). */
    const double cached_bw = bytes < ((int64_t)1 << 30) ? read_bandwidth((size_t)bytes, 20) : 0;
    const double cached_roofline = cached_bw * 1e9 / (double)bytes;
    const double gemm = gemm_peak_gflops(2048, 3);
    const double roofline = bw * 1e9 / (double)bytes;
    char cpu[160];
    cpu_model(cpu, sizeof cpu);
    /* forward_flops counts logits for every position; jm_infer computes only the last row */
    const double prefill_gflop =
        (forward_flops(c, 1, n_prompt) - 2.0 * (n_prompt - 1) * c->hidden_size * (double)V) / 1e9;

    fprintf(stderr,
            "%s: %s weights, %s kernels, %s KV cache, %d threads, %s\n"
            "  open     %.2f s, peak RSS %.0f MB, %.0f MB of it on 2 MB pages (%.0f MB anonymous)\n"
            "  prefill  %d tokens in %.2f s = %.1f tokens/s (%.1f GFLOP/s, SGEMM peak %.1f)\n"
            "  decode   %d tokens: %.2f tokens/s (%.2f with the first step), %.1f ms/token (median %.1f, fastest %.1f)\n"
            "  roofline %.1f GB/s read (%.1f before the run, %.1f after) / %.1f MB per token = %.2f tokens/s -> "
            "decode at %.0f%% (with the %.1f MB of KV cache a step reads: %.0f%%)\n",
            dir, jm_model_weight_type(m), jm_kernels(m), jm_kv_cache(m), threads, cpu, open_s, rss, huge_mb, anon_huge_mb,
            n_prompt, prefill_s,
            n_prompt / prefill_s, prefill_gflop / prefill_s, gemm, n_new, decode_tps, decode_all_tps,
            1e3 / decode_tps, 1e3 * median_s, 1e3 * fastest_s, bw, bw_before, bw_after, bytes / 1e6, roofline,
            100 * decode_tps / roofline, kv_bytes / 1e6,
            100 * decode_tps * (bytes + kv_bytes) / (bw * 1e9));
    if (cached_bw > 0)
        fprintf(stderr, "  cached   %.1f MB read again and again: %.1f GB/s = %.2f tokens/s -> decode at %.0f%% "
                "(the ceiling if a step's weights all stay in the caches)\n", bytes / 1e6, cached_bw, cached_roofline,
                100 * decode_tps / cached_roofline);
    if (paired_mb)
        fprintf(stderr, "  paired   each step against a %d MB read right after it: median %.0f%%, %.0f%% with the KV cache "
                "(those reads: median %.1f GB/s)\n", paired_mb, 100 * paired, 100 * paired_kv, paired_bw);
    printf("{\"impl\":\"c\",\"what\":\"decode\",\"cpu\":\"%s\",\"kv_cache\":\"%s\",\"kv_bytes\":%.0f,"
           "\"weight_type\":\"%s\",\"kernels\":\"%s\",\"threads\":%d,"
           "\"prompt\":%d,\"new\":%d,\"open_s\":%.3f,\"prefill_s\":%.4f,\"prefill_tok_s\":%.2f,"
           "\"prefill_gflops\":%.2f,\"gemm_peak_gflops\":%.2f,\"decode_tok_s\":%.4f,\"decode_tok_s_all\":%.4f,"
           "\"first_step_s\":%.4f,\"median_step_s\":%.4f,\"active_weight_bytes\":%lld,\"bandwidth_gbs\":%.2f,\"roofline_tok_s\":%.4f,"
           "\"ratio\":%.4f,\"kv_ratio\":%.4f,\"peak_rss_mb\":%.1f,\"huge_page_mb\":%.1f,",
           cpu, jm_kv_cache(m), kv_bytes, jm_model_weight_type(m), jm_kernels(m), threads, n_prompt, n_new, open_s,
           prefill_s,
           n_prompt / prefill_s, prefill_gflop / prefill_s, gemm, decode_tps, decode_all_tps, step_s[0], median_s,
           (long long)bytes, bw, roofline, decode_tps / roofline, decode_tps * (bytes + kv_bytes) / (bw * 1e9), rss,
           huge_mb);
    if (cached_bw > 0)
        printf("\"cached_bandwidth_gbs\":%.2f,\"cached_roofline_tok_s\":%.4f,\"cached_ratio\":%.4f,", cached_bw,
               cached_roofline, decode_tps / cached_roofline);
    if (paired_mb)
        printf("\"paired_ratio\":%.4f,\"paired_kv_ratio\":%.4f,\"paired_bandwidth_gbs\":%.2f,", paired, paired_kv,
               paired_bw);
    printf("\"ids\":[");
    for (int i = 0; i <= n_new; i++) printf(i ? ",%d" : "%d", ids[i]);
    printf("]}\n");
    free(prompt);
    free(ids);
    free(step_s);
    free(paired_gbs);
    jm_model_free(m);
    return 0;
}
