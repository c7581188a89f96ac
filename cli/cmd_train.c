/* cmd_train.c — pretrain: a JetMoE from a recipe, interruptible and resumable. */
#include "flags.h"

#include <signal.h>

typedef struct {
    const char *recipe, *out, *init;
    int resume, quiet, overwrite;
    int64_t threads, stop_after;
} pretrain_opts;

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

/* Set by SIGINT/SIGTERM; the trainer polls it between steps, saves and returns.
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
    jm_train_opts to = {o.recipe, o.out, o.resume, o.stop_after, &stop_requested, o.quiet, o.overwrite, o.init};
    int stopped;
    jm_error err;
    jm_status s = jm_pretrain(&to, &stopped, &err);
    if (s) return cli_fail(self, s, &err);
    return stopped && stop_requested ? 130 : 0;
}
