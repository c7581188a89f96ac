/* spm_train.c — jm_tokenizer_train: a Llama-2-style SentencePiece BPE
 * tokenizer, trained by Debian's spm_train and written as tokenizer.model,
 * tokenizer.json, tokenizer_config.json and special_tokens_map.json.
 *
 * spm_train runs as a child process (posix_spawnp, an argv array, no shell)
 * into a temporary directory inside out_dir. Its log comes back through a
 * pipe: we turn it into a progress line and keep the last lines for the error
 * message. Only a model that loads is moved into place; tokenizer.vocab (a
 * listing of pieces and scores that tokenizer.json supersedes) is dropped. */
#include "tokenizer/tokenizer.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define MIN_VOCAB 100
#define MAX_VOCAB 1000000
#define META_PIECES 3     /* <unk> <s> </s> */
#define TAIL_LINES 8

/* What we follow of spm_train's log: the last lines (for errors) and the
 * counts the progress line needs. */
typedef struct {
    char line[TAIL_LINES][512];
    int nlines;               /* lines kept so far, capped by TAIL_LINES */
    char partial[512];        /* the current line while it is being read */
    size_t partial_len;
    int vocab_size, meta;     /* merges to make: vocab_size - meta - alphabet */
    int alphabet;             /* from "Alphabet size=N"; 0 until seen */
    bool tty;
    double t_start, t_last;   /* first merge, last progress print */
    int last_decile, shown;   /* last 10% step and merge count printed */
    bool bar_open;            /* a \r line is on the terminal */
} spm_log;

static jm_status check_opts(const jm_tokenizer_train_opts *o, jm_error *err);
static jm_status run_spm_train(const jm_tokenizer_train_opts *o, const char *tmp, jm_error *err);
static jm_status install(const jm_tokenizer_train_opts *o, const char *tmp, jm_error *err);
static void log_feed(spm_log *lg, const char *buf, size_t n);
static void log_line(spm_log *lg, const char *s);
static void show_progress(spm_log *lg, int done, bool final);
static void log_error(const spm_log *lg, char *out, size_t cap);
static double now_seconds(void);

/* What it writes into out_dir: replaced only with overwrite, never an input (README: What writes where). */
static const char *const tokenizer_names[] = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                              "special_tokens_map.json"};
static const jm_output_set tokenizer_outputs = {"a tokenizer", tokenizer_names, 4, NULL};

jm_status jm_tokenizer_train(const jm_tokenizer_train_opts *o, jm_error *err)
{
    jm_status s = check_opts(o, err);
    if (!s)
        s = jm_output_entries_check(o->out_dir, &tokenizer_outputs, o->inputs, o->ninputs, o->overwrite, err);
    if (s || (s = jm_mkdir_p(o->out_dir, err))) return s;
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s/.tokenizer-train.XXXXXX", o->out_dir) >= (int)sizeof tmp - 64)
        return jm_fail(err, JM_ERR_ARG, "%s: path too long", o->out_dir);
    if (!mkdtemp(tmp))
        return jm_fail(err, JM_ERR_IO, "%s: cannot create a temporary directory: %s", o->out_dir, strerror(errno));
    s = run_spm_train(o, tmp, err);
    if (!s) s = install(o, tmp, err);
    /* whatever is left: the model on failure, the .vocab always */
    const char *leftovers[] = {"tokenizer.model", "tokenizer.vocab"};
    char path[4200];
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", tmp, leftovers[i]);
        unlink(path);
    }
    rmdir(tmp);
    return s;
}

static jm_status check_opts(const jm_tokenizer_train_opts *o, jm_error *err)
{
    if (!o) return jm_fail(err, JM_ERR_ARG, "tokenizer train: no options");
    if (!o->out_dir || !o->out_dir[0]) return jm_fail(err, JM_ERR_ARG, "tokenizer train: no output directory");
    if (o->ninputs < 1 || !o->inputs) return jm_fail(err, JM_ERR_ARG, "tokenizer train: no input files");
    if (o->vocab_size < MIN_VOCAB || o->vocab_size > MAX_VOCAB)
        return jm_fail(err, JM_ERR_ARG, "tokenizer train: vocab_size %d is out of range (%d..%d)", o->vocab_size,
                       MIN_VOCAB, MAX_VOCAB);
    /* byte pieces come on top of <unk> <s> </s> and one piece per character */
    if (o->byte_fallback && o->vocab_size <= META_PIECES + 256)
        return jm_fail(err, JM_ERR_ARG,
                       "tokenizer train: vocab_size %d is too small for byte fallback: <unk>, <s>, </s> and the "
                       "256 byte pieces take %d, and every character of the corpus needs one more",
                       o->vocab_size, META_PIECES + 256);
    if (o->threads < 0) return jm_fail(err, JM_ERR_ARG, "tokenizer train: threads %d < 0", o->threads);
    if (o->max_sentences < 0)
        return jm_fail(err, JM_ERR_ARG, "tokenizer train: max_sentences %lld < 0", (long long)o->max_sentences);
    for (int i = 0; i < o->ninputs; i++) {
        const char *p = o->inputs[i];
        struct stat st;
        if (!p || !p[0]) return jm_fail(err, JM_ERR_ARG, "tokenizer train: input %d is empty", i);
        if (stat(p, &st) != 0) return jm_fail(err, JM_ERR_IO, "%s: %s", p, strerror(errno));
        if (!S_ISREG(st.st_mode)) return jm_fail(err, JM_ERR_IO, "%s: not a regular file", p);
        if (access(p, R_OK) != 0) return jm_fail(err, JM_ERR_IO, "%s: %s", p, strerror(errno));
        /* spm_train splits --input at commas */
        if (strchr(p, ','))
            return jm_fail(err, JM_ERR_ARG, "%s: spm_train cannot read a file whose path contains a comma", p);
    }
    return JM_OK;
}

/* Llama-2's TrainerSpec (read from its tokenizer.model), except for
 * input_sentence_size and max_sentence_length, which depend on the corpus. */
static jm_status run_spm_train(const jm_tokenizer_train_opts *o, const char *tmp, jm_error *err)
{
    size_t in_len = sizeof "--input=";
    for (int i = 0; i < o->ninputs; i++) in_len += strlen(o->inputs[i]) + 1;
    char *input = malloc(in_len);
    if (!input) return jm_fail(err, JM_ERR_NOMEM, "tokenizer train: out of memory");
    char *p = input + sprintf(input, "--input=");
    for (int i = 0; i < o->ninputs; i++) p += sprintf(p, "%s%s", i ? "," : "", o->inputs[i]);

    int threads = o->threads ? o->threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (threads < 1) threads = 1;
    char prefix[4200], vocab[48], bf[48], nthreads[48], sentences[64];
    snprintf(prefix, sizeof prefix, "--model_prefix=%s/tokenizer", tmp);
    snprintf(vocab, sizeof vocab, "--vocab_size=%d", o->vocab_size);
    snprintf(bf, sizeof bf, "--byte_fallback=%s", o->byte_fallback ? "true" : "false");
    snprintf(nthreads, sizeof nthreads, "--num_threads=%d", threads);
    snprintf(sentences, sizeof sentences, "--input_sentence_size=%lld", (long long)o->max_sentences);
    const char *argv[40] = {
        "spm_train", input, prefix, "--model_type=bpe", vocab, bf,
        "--character_coverage=0.99995", /* Llama-2's */
        "--split_digits=true", "--split_by_unicode_script=true", "--split_by_whitespace=true",
        "--split_by_number=true", "--allow_whitespace_only_pieces=true", "--max_sentencepiece_length=16",
        "--normalization_rule_name=identity", "--remove_extra_whitespaces=false", "--add_dummy_prefix=true",
        "--unk_id=0", "--bos_id=1", "--eos_id=2", "--pad_id=-1", nthreads,
        /* spm_train skips longer lines; a paragraph per line is common */
        "--max_sentence_length=65536",
        /* spm seeds from the clock unless told: same corpus, same tokenizer */
        "--random_seed=1",
    };
    int argc = 0;
    while (argv[argc]) argc++;
    if (o->max_sentences > 0) {
        argv[argc++] = sentences;
        argv[argc++] = "--shuffle_input_sentence=true";
    }

    int fd[2];
    if (pipe2(fd, O_CLOEXEC) != 0) {
        free(input);
        return jm_fail(err, JM_ERR_IO, "tokenizer train: pipe: %s", strerror(errno));
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, fd[1], 1);
    posix_spawn_file_actions_adddup2(&fa, fd[1], 2);
    pid_t pid;
    int rc = posix_spawnp(&pid, "spm_train", &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(fd[1]);
    free(input);
    if (rc != 0) {
        close(fd[0]);
        return jm_fail(err, JM_ERR_IO, "spm_train: cannot run it: %s (it is in Debian's sentencepiece package; "
                       "`make setup` installs it)", strerror(rc));
    }

    spm_log lg = {.vocab_size = o->vocab_size, .meta = META_PIECES + (o->byte_fallback ? 256 : 0),
                  .tty = isatty(2), .last_decile = -1};
    char buf[8192];
    for (;;) {
        ssize_t got = read(fd[0], buf, sizeof buf);
        if (got > 0) {
            log_feed(&lg, buf, (size_t)got);
        } else if (got == 0 || errno != EINTR) {
            break;
        }
    }
    close(fd[0]);
    if (lg.partial_len) log_line(&lg, lg.partial);
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return jm_fail(err, JM_ERR_IO, "spm_train: waitpid: %s", strerror(errno));
    bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    /* spm logs every 20th merge: show the last one done */
    if (ok && lg.t_start != 0) show_progress(&lg, lg.vocab_size - lg.meta - lg.alphabet, true);
    if (lg.bar_open) fputc('\n', stderr);
    if (ok) return JM_OK;
    char why[400];
    log_error(&lg, why, sizeof why);
    if (WIFSIGNALED(status))
        return jm_fail(err, JM_ERR_IO, "spm_train: killed by signal %d: %s", WTERMSIG(status), why);
    return jm_fail(err, JM_ERR_IO, "spm_train: exit %d: %s", WEXITSTATUS(status), why);
}

/* The trained model must load; then tokenizer.json, tokenizer_config.json and
 * special_tokens_map.json are written beside it and the model itself is moved in last. */
static jm_status install(const jm_tokenizer_train_opts *o, const char *tmp, jm_error *err)
{
    char model[4200], path[4200];
    snprintf(model, sizeof model, "%s/tokenizer.model", tmp);
    jm_tokenizer *t = NULL;
    jm_status s = jm_tokenizer_load(model, &t, err);
    if (s) return s;
    if (t->n != o->vocab_size)
        s = jm_fail(err, JM_ERR_FORMAT, "spm_train wrote %d pieces, asked for %d", t->n, o->vocab_size);
    if (!s) {
        snprintf(path, sizeof path, "%s/tokenizer.json", o->out_dir);
        s = jm_tokenizer_save_json(t, path, err);
    }
    jm_tokenizer_free(t);
    if (!s) {
        snprintf(path, sizeof path, "%s/tokenizer_config.json", o->out_dir);
        s = tk_save_config(path, err);
    }
    if (!s) {
        snprintf(path, sizeof path, "%s/special_tokens_map.json", o->out_dir);
        s = tk_save_special_tokens_map(path, err);
    }
    if (!s) {
        snprintf(path, sizeof path, "%s/tokenizer.model", o->out_dir);
        if (rename(model, path) != 0) s = jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    }
    return s;
}

/* ---- spm_train's log ---- */

static void log_feed(spm_log *lg, const char *buf, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (buf[i] == '\n' || buf[i] == '\r') {
            lg->partial[lg->partial_len] = 0;
            if (lg->partial_len) log_line(lg, lg->partial);
            lg->partial_len = 0;
        } else if (lg->partial_len + 1 < sizeof lg->partial) {
            lg->partial[lg->partial_len++] = buf[i]; /* a longer line keeps its head */
        }
    }
    lg->partial[lg->partial_len] = 0;
}

static void format_eta(double s, char *out, size_t cap)
{
    long v = s < 0 ? 0 : (long)(s + 0.5);
    if (v >= 3600)
        snprintf(out, cap, "%ldh%02ldm", v / 3600, v / 60 % 60);
    else
        snprintf(out, cap, "%ldm%02lds", v / 60, v % 60);
}

/* One complete line: keep it, and update the progress display. The merge
 * loop logs "Added: ... size=N" every 20 pieces; N counts merged pieces,
 * whose total is vocab_size minus the meta pieces minus the alphabet. */
static void log_line(spm_log *lg, const char *s)
{
    if (lg->nlines == TAIL_LINES)
        memmove(lg->line[0], lg->line[1], sizeof lg->line[0] * (TAIL_LINES - 1));
    else
        lg->nlines++;
    snprintf(lg->line[lg->nlines - 1], sizeof lg->line[0], "%s", s);

    const char *a = strstr(s, "Alphabet size=");
    if (a) lg->alphabet = atoi(a + strlen("Alphabet size="));
    const char *loaded = strstr(s, "Loaded all ");
    if (loaded) fprintf(stderr, "tokenizer: spm_train: %s\n", loaded);
    const char *added = strstr(s, "Added: ");
    const char *size = added ? strstr(added, " size=") : NULL;
    if (size) show_progress(lg, atoi(size + strlen(" size=")), false);
}

/* The merge count as a bar (\r-updated, 4 a second) on a terminal, or a
 * line per 10% otherwise; final prints the end state whatever the timing. */
static void show_progress(spm_log *lg, int done, bool final)
{
    int total = lg->vocab_size - lg->meta - lg->alphabet;
    if (!lg->alphabet || total <= 0) return;
    double t = now_seconds();
    if (lg->t_start == 0) lg->t_start = t;
    double rate = t > lg->t_start ? done / (t - lg->t_start) : 0;
    char eta[32] = "?";
    if (rate > 0) format_eta((total - done) / rate, eta, sizeof eta);
    int pct = (int)(100.0 * done / total);
    if (done == lg->shown) return;
    if (lg->tty) {
        if (t - lg->t_last < 0.25 && !final) return;
        int width = 30, fill = width * done / total;
        char bar[64];
        for (int i = 0; i < width; i++) bar[i] = i < fill ? '#' : '.';
        bar[width] = 0;
        fprintf(stderr, "\rtokenizer: [%s] %d/%d merges %3d%%, %.0f/s, ETA %s ", bar, done, total, pct, rate, eta);
        lg->bar_open = true;
    } else {
        if (pct / 10 == lg->last_decile && !final) return;
        lg->last_decile = pct / 10;
        fprintf(stderr, "tokenizer: %d/%d merges (%d%%), %.0f/s, ETA %s\n", done, total, pct, rate, eta);
    }
    lg->t_last = t;
    lg->shown = done;
}

/* spm_train's last word, e.g. "spm_train_main.cc(275) [_status.ok()]
 * Internal: ./src/trainer_interface.cc(660) [(a) == (b)] Vocabulary size too
 * high (5000). Please set it to a value <= 1217." -> the sentence at the end. */
static void log_error(const spm_log *lg, char *out, size_t cap)
{
    const char *pick = NULL;
    for (int i = lg->nlines - 1; i >= 0 && !pick; i--)
        if (lg->line[i][0] && !strstr(lg->line[i], "Program terminated")) pick = lg->line[i];
    if (!pick) {
        snprintf(out, cap, "no message");
        return;
    }
    const char *m = strstr(pick, "[_status.ok()] ");
    if (m) pick = m + strlen("[_status.ok()] ");
    /* "Internal: file(line) [condition] message": drop the check that failed */
    const char *cond = strstr(pick, ") [(");
    const char *end = cond ? strstr(cond, ")] ") : NULL;
    if (end) pick = end + 3;
    snprintf(out, cap, "%s", pick);
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
