/* cmd_train.c — pretrain: a JetMoE from a recipe, interruptible and resumable. */
#include "align/align.h"
#include "flags.h"

#include <signal.h>
#include <string.h>

typedef struct {
    const char *recipe, *out, *init;
    int resume, quiet, overwrite;
    int64_t threads, stop_after, pp;
    double timeout;
} pretrain_opts;

/* Scale-out (README: Scaling out): under mpirun/srun, N ranks = --pp stages x N/--pp replicas. */
#define GRID_FLAGS(TYPE)                                                                                                 {"--pp", {NULL}, FLAG_INT, offsetof(TYPE, pp), "1", 1, 1024, .meta = "P",                                            .help = "pipeline stages when run as several ranks (mpirun -np N): N/P data-parallel replicas"},                        {"--timeout", {NULL}, FLAG_REAL, offsetof(TYPE, timeout), "600", 1, 1e7, .meta = "S",                                .help = "seconds a rank waits for the others before stopping the job (a rank died or hangs)"}

static const cli_flag pretrain_flags[] = {
    {"--recipe", {NULL}, FLAG_STR, offsetof(pretrain_opts, recipe), .required = 1, .meta = "R",
     .help = "the recipe (JSON: model, sources, mixture phases, optimizer, schedule)"},
    {"--out", {NULL}, FLAG_STR, offsetof(pretrain_opts, out), .required = 1, .meta = "RUN_DIR",
     .help = "the run directory: metrics.jsonl, loss.svg, checkpoints/"},
    {"--init", {NULL}, FLAG_STR, offsetof(pretrain_opts, init), .meta = "DIR",
     .help = "start from this checkpoint's weights (continued pretraining: the recipe's own schedule, a fresh "
             "optimizer; the recipe's model must have the checkpoint's shapes)"},
    {"--resume", {NULL}, FLAG_BOOL, offsetof(pretrain_opts, resume),
     .help = "continue the run in RUN_DIR from its latest checkpoint, bit-exactly"},
    {"--overwrite", {NULL}, FLAG_BOOL, offsetof(pretrain_opts, overwrite),
     .help = "start afresh over a run already in RUN_DIR (its checkpoints and metrics go first)"},
    {"--threads", {NULL}, FLAG_INT, offsetof(pretrain_opts, threads), "0", 0, 4096, .meta = "N",
     .help = "threads, 0 = all cores"},
    {"--stop-after", {NULL}, FLAG_INT, offsetof(pretrain_opts, stop_after), "0", 0, 2000000000, .meta = "N",
     .help = "save and stop after N steps in total, 0 = run the recipe to its end"},
    {"--quiet", {NULL}, FLAG_BOOL, offsetof(pretrain_opts, quiet), .help = "no progress line"},
    GRID_FLAGS(pretrain_opts),
};

static int run_pretrain(const cli_command *self, int argc, char **argv);

const cli_command cmd_pretrain = {
    "pretrain", NULL, "pretrain a JetMoE from a recipe (resumable)",
    "Pretrains a JetMoE as the recipe says (mixture phases, AdamW, warmup-stable-decay schedule,\n"
    "load-balancing and z losses). Writes RUN_DIR/metrics.jsonl, loss.svg and checkpoints in HF\n"
    "format with trainer state; SIGINT/SIGTERM save and exit (status 130); --resume continues\n"
    "bit-exactly. A RUN_DIR that holds a run needs --resume or --overwrite. --init DIR starts a new\n"
    "run from a checkpoint's weights (e.g. JetMoE-8B adapted to a domain corpus).",
    pretrain_flags, (int)(sizeof pretrain_flags / sizeof pretrain_flags[0]), run_pretrain};

/* Set by SIGINT/SIGTERM/SIGUSR1; the trainer polls it between steps, saves and returns.
 * (The one piece of process state a signal handler needs.) */
static volatile int stop_requested;
static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static int run_pretrain(const cli_command *self, int argc, char **argv)
{
    pretrain_opts o = {0};
    int rc = cli_parse(self, argc, argv, &o, NULL);
    if (rc != CLI_RUN) return rc;
    jm_set_threads((int)o.threads);
    struct sigaction sa_int = {0};
    sa_int.sa_handler = on_signal;
    sigaction(SIGINT, &sa_int, NULL);
    sigaction(SIGTERM, &sa_int, NULL);
    sigaction(SIGUSR1, &sa_int, NULL); /* what mpirun forwards to every rank (README: Scaling out) */
    jm_train_opts to = {o.recipe,    o.out,         o.resume, o.stop_after, &stop_requested, o.quiet,
                        o.overwrite, o.init,        (int)o.pp, o.timeout,   (int)o.threads};
    int stopped;
    jm_error err;
    jm_status s = jm_pretrain(&to, &stopped, &err);
    if (s) return cli_fail(self, s, &err);
    return stopped && stop_requested ? 130 : 0;
}

/* ---- sft and dpo: fine-tuning on the same loop ---- */

typedef struct {
    const char *model, *out, *recipe, *ref, *dump_grad, *on_bad_line;
    cli_list data, eval_data;
    int resume, quiet, overwrite;
    int64_t threads, stop_after, pp;
    double beta, label_smoothing, timeout;
} tune_opts;

#define TUNE_FLAGS(DATA_HELP)                                                                                        \
    {"--model", {NULL}, FLAG_STR, offsetof(tune_opts, model), .meta = "DIR",                                        \
     .help = "the checkpoint to start from (any HF JetMoE: F32/BF16, sharded; a run directory means its newest)"},  \
        {"--data", {NULL}, FLAG_LIST, offsetof(tune_opts, data), .required = 1, .meta = "FILE[,FILE...]",          \
         .help = DATA_HELP},                                                                                         \
        {"--out", {NULL}, FLAG_STR, offsetof(tune_opts, out), .meta = "RUN_DIR",                                    \
         .help = "the run directory: metrics.jsonl, loss.svg, checkpoints/ (not needed with --dump-grad)"},          \
        {"--recipe", {NULL}, FLAG_STR, offsetof(tune_opts, recipe), .meta = "R",                                    \
         .help = "the fine-tuning recipe (JSON; README: Fine-tuning); default: the JetMoE chat recipe"},            \
        {"--eval-data", {NULL}, FLAG_LIST, offsetof(tune_opts, eval_data), .meta = "FILE[,FILE...]",               \
         .help = "held-out records, scored before the first step, every eval_every steps and at the end"},          \
        {"--resume", {NULL}, FLAG_BOOL, offsetof(tune_opts, resume),                                                 \
         .help = "continue the run in RUN_DIR from its latest checkpoint, bit-exactly (same data)"},                 \
        {"--overwrite", {NULL}, FLAG_BOOL, offsetof(tune_opts, overwrite),                                           \
         .help = "start afresh over a run already in RUN_DIR; with --dump-grad, replace FILE"},                     \
        {"--on-bad-line", {NULL}, FLAG_STR, offsetof(tune_opts, on_bad_line), "fail", .meta = "skip|fail",         \
         .help = "a bad record: stop with its file and line (fail), or report it, count it and go on (skip)"},      \
        {"--dump-grad", {NULL}, FLAG_STR, offsetof(tune_opts, dump_grad), .meta = "FILE",                          \
         .help = "take all the data as one batch, write loss and grad.<name> of every parameter, take no step"},    \
        {"--threads", {NULL}, FLAG_INT, offsetof(tune_opts, threads), "0", 0, 4096, .meta = "N",                    \
         .help = "threads, 0 = all cores"},                                                                          \
        {"--stop-after", {NULL}, FLAG_INT, offsetof(tune_opts, stop_after), "0", 0, 2000000000, .meta = "N",        \
         .help = "save and stop after N steps in total, 0 = run to the end"},                                       \
        {"--quiet", {NULL}, FLAG_BOOL, offsetof(tune_opts, quiet), .help = "no progress line"},                    \
        GRID_FLAGS(tune_opts)

static const cli_flag sft_flags[] = {
    TUNE_FLAGS("the training records (JSONL): {\"messages\": [...]} or {\"input_ids\": [...], \"labels\": [...]}"),
};
static const cli_flag dpo_flags[] = {
    TUNE_FLAGS("the preference pairs (JSONL): {\"prompt\", \"chosen\", \"rejected\"} (strings or messages) or "
               "TRL's *_input_ids"),
    {"--ref", {NULL}, FLAG_STR, offsetof(tune_opts, ref), .meta = "DIR",
     .help = "the reference model (default: --model); its log-probs are computed once and cached in RUN_DIR"},
    {"--beta", {NULL}, FLAG_REAL, offsetof(tune_opts, beta), "-1", -1, 1e6, .meta = "B",
     .help = "DPO's beta (default: the recipe's, 0.1)"},
    {"--label-smoothing", {NULL}, FLAG_REAL, offsetof(tune_opts, label_smoothing), "-1", -1, 0.5, .meta = "E",
     .help = "conservative DPO's label smoothing in [0, 0.5] (default: the recipe's, 0)"},
};

static int run_tune(const cli_command *self, int argc, char **argv);

const cli_command cmd_sft = {
    "sft", NULL, "supervised fine-tuning (dSFT) of a checkpoint on chat records",
    "Fine-tunes --model on conversations: the loss is on the assistant's tokens only (each turn through\n"
    "its end-of-turn token), averaged over the learned tokens of each step. Conversations are packed into\n"
    "rows of max_len with attention and positions restarting at each one. Same loop as pretrain: AdamW,\n"
    "cosine schedule with warmup, epochs with a seeded shuffle, metrics.jsonl, loss.svg, atomic checkpoints\n"
    "with the tokenizer; SIGINT/SIGTERM save (status 130); --resume continues bit-exactly.",
    sft_flags, (int)(sizeof sft_flags / sizeof sft_flags[0]), run_tune};

const cli_command cmd_dpo = {
    "dpo", NULL, "Direct Preference Optimization (dDPO) of a checkpoint on preference pairs",
    "Trains --model to prefer each pair's chosen completion over the rejected one relative to the\n"
    "reference (--ref, default --model): loss = -(1-e) log sigmoid(D) - e log sigmoid(-D) with\n"
    "D = beta [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))], log-probs summed over the completion,\n"
    "plus the router losses. Logs TRL's rewards/chosen, rewards/rejected, rewards/margins,\n"
    "rewards/accuracies and logps. Same loop, checkpoints and --resume as sft.",
    dpo_flags, (int)(sizeof dpo_flags / sizeof dpo_flags[0]), run_tune};

/* --data a,b --data c -> {a, b, c} (files named by either spelling); the count, which past cap
 * (files left unread) is an error of the caller's */
static int split_list(const cli_list *l, char **buf, const char **out, int cap)
{
    int n = 0;
    size_t len = 0;
    for (int i = 0; i < l->n; i++) len += strlen(l->v[i]) + 1;
    *buf = malloc(len + 1);
    char *p = *buf;
    for (int i = 0; p && i < l->n; i++) {
        strcpy(p, l->v[i]);
        for (char *tok = strtok(p, ","); tok; tok = strtok(NULL, ","), n++)
            if (n < cap) out[n] = tok;
        p += strlen(l->v[i]) + 1;
    }
    return n;
}

static int run_tune(const cli_command *self, int argc, char **argv)
{
    tune_opts o = {0};
    int rc = cli_parse(self, argc, argv, &o, NULL);
    if (rc != CLI_RUN) return rc;
    if (strcmp(o.on_bad_line, "skip") && strcmp(o.on_bad_line, "fail"))
        return cli_error(self, "--on-bad-line wants skip or fail, got '%s'", o.on_bad_line);
    if (!o.model && !o.resume) return cli_error(self, "--model DIR is required (the checkpoint to start from)");
    if (!o.out && !o.dump_grad) return cli_error(self, "--out RUN_DIR is required (or --dump-grad FILE)");
    if (o.out && o.dump_grad) return cli_error(self, "--dump-grad writes one file and trains nothing: drop --out");
    /* a run directory (or its checkpoints/) means its newest checkpoint, named on stderr as everywhere;
     * a resume reads neither (the reference only if the run lost its cached log-probs) */
    char mdir[4096], rdir[4096];
    if (o.model && !o.resume && (rc = cli_model_dir(self, o.model, mdir, sizeof mdir)) != CLI_RUN) return rc;
    if (o.ref && !o.resume && (rc = cli_model_dir(self, o.ref, rdir, sizeof rdir)) != CLI_RUN) return rc;
    if (o.model && !o.resume) o.model = mdir;
    if (o.ref && !o.resume) o.ref = rdir;
    jm_set_threads((int)o.threads);
    struct sigaction sa_int = {0};
    sa_int.sa_handler = on_signal;
    sigaction(SIGINT, &sa_int, NULL);
    sigaction(SIGTERM, &sa_int, NULL);
    sigaction(SIGUSR1, &sa_int, NULL); /* what mpirun forwards to every rank (README: Scaling out) */
    char *dbuf = NULL, *ebuf = NULL;
    const char *data[64], *eval[64];
    int nd = split_list(&o.data, &dbuf, data, 64), ne = split_list(&o.eval_data, &ebuf, eval, 64);
    if (nd > 64 || ne > 64) {
        free(dbuf);
        free(ebuf);
        return cli_error(self, "%s: at most 64 files, got %d", nd > 64 ? "--data" : "--eval-data", nd > 64 ? nd : ne);
    }
    jm_tune_opts to = {o.model, data, nd, eval, ne, o.recipe, o.ref, o.dump_grad, o.beta, o.label_smoothing,
                       strcmp(o.on_bad_line, "skip") == 0,
                       {NULL, o.out, o.resume, o.stop_after, &stop_requested, o.quiet, o.overwrite, NULL, (int)o.pp,
                        o.timeout, (int)o.threads}};
    int stopped = 0;
    jm_error err;
    jm_status s = self == &cmd_sft ? jm_sft(&to, &stopped, &err) : jm_dpo(&to, &stopped, &err);
    free(dbuf);
    free(ebuf);
    if (s) return cli_fail(self, s, &err);
    return stopped && stop_requested ? 130 : 0;
}
