/* jetmoe — the command-line tool: thin commands over libjetmoe.
 *
 * main.c dispatches to the commands (cmd_*.c, each with its flag table, see
 * flags.h) and holds the two that are about the tool itself: help and
 * version. A command named "tokenizer encode" is a subcommand of the group
 * "tokenizer". Every error is one line on stderr and a non-zero exit. */
#include "flags.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Passed by the Makefile on this file's compile line. */
#ifndef JM_BUILD_CC
#define JM_BUILD_CC "?"
#endif
#ifndef JM_BUILD_OPT
#define JM_BUILD_OPT "?"
#endif
#ifndef JM_BUILD_SAN
#define JM_BUILD_SAN ""
#endif
#ifndef JM_BUILD_BLAS
#define JM_BUILD_BLAS "?"
#endif

static int run_help(const cli_command *self, int argc, char **argv);
static int run_version(const cli_command *self, int argc, char **argv);

/* help reads its own arguments (COMMAND may be two words); the table is its usage */
static const cli_flag help_flags[] = {
    {"--flags", {NULL}, FLAG_BOOL, 0, .help = "list every spelling of every flag COMMAND accepts, one a line"},
};

static const cli_command cmd_help = {
    "help", "[COMMAND]", "the commands, or one command's usage",
    "Without COMMAND, lists the commands; with one (\"generate\", \"tokenizer\", \"tokenizer encode\"),\n"
    "shows its usage, as 'jetmoe COMMAND --help' does.",
    help_flags, 1, run_help};

static const cli_command cmd_version = {
    "version", NULL, "the version and how this binary was built (also --version)",
    "Prints the version, then the compiler, optimisation flags, sanitizers and BLAS library of\n"
    "this build.",
    NULL, 0, run_version};

static const cli_command *const commands[] = {
    &cmd_info,     &cmd_forward,  &cmd_init,  &cmd_tokenizer_encode, &cmd_tokenizer_decode,
    &cmd_tokenizer_chat, &cmd_tokenizer_train, &cmd_prepare, &cmd_pretrain, &cmd_sft, &cmd_dpo, &cmd_generate,
    &cmd_chat,     &cmd_eval,     &cmd_distill_sft, &cmd_distill_pairs, &cmd_quantize, &cmd_serve, &cmd_help,
    &cmd_version,
};
#define NCOMMANDS (int)(sizeof commands / sizeof commands[0])

/* The command named by words[0] (and words[1] for a subcommand), or NULL;
 * *used gets how many words the name took. */
static const cli_command *find_command(int nwords, char **words, int *used)
{
    for (int i = 0; i < NCOMMANDS; i++) {
        const char *name = commands[i]->name, *space = strchr(name, ' ');
        size_t head = space ? (size_t)(space - name) : strlen(name);
        if (strlen(words[0]) != head || strncmp(name, words[0], head) != 0) continue;
        if (!space) {
            *used = 1;
            return commands[i];
        }
        if (nwords > 1 && strcmp(space + 1, words[1]) == 0) {
            *used = 2;
            return commands[i];
        }
    }
    return NULL;
}

/* Whether word is a group of subcommands ("tokenizer"); lists them in buf. */
static int is_group(const char *word, char *buf, size_t cap)
{
    size_t len = strlen(word), used = 0;
    buf[0] = 0;
    for (int i = 0; i < NCOMMANDS; i++) {
        const char *name = commands[i]->name;
        if (strncmp(name, word, len) == 0 && name[len] == ' ' && used < cap)
            used += (size_t)snprintf(buf + used, cap - used, "%s%s", used ? ", " : "", name + len + 1);
    }
    return used > 0;
}

/* A group's usage: each subcommand's, one after the other. */
static void group_usage(const char *group)
{
    size_t len = strlen(group);
    int first = 1;
    for (int i = 0; i < NCOMMANDS; i++)
        if (strncmp(commands[i]->name, group, len) == 0 && commands[i]->name[len] == ' ') {
            if (!first) fputs("\n", stdout);
            cli_usage(stdout, commands[i]);
            first = 0;
        }
}

static void overview(void)
{
    printf("jetmoe — JetMoE mixture-of-experts language models in C\n\n"
           "usage: jetmoe COMMAND [ARGS]   ('jetmoe COMMAND --help' shows a command's flags)\n\n");
    for (int i = 0; i < NCOMMANDS; i++)
        printf("  %-18s %-9s %s\n", commands[i]->name, commands[i]->positional ? commands[i]->positional : "",
               commands[i]->summary);
    printf("\n  jetmoe --version    the version and build flags\n");
}

static int run_help(const cli_command *self, int argc, char **argv)
{
    int list = 0, nwords = 0;
    char *words[2];
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            cli_usage(stdout, self);
            return 0;
        }
        if (strcmp(argv[i], help_flags[0].name) == 0) list = 1;
        else if (argv[i][0] == '-') return cli_error(self, "unknown flag %s (see 'jetmoe help --help')", argv[i]);
        else if (nwords < 2) words[nwords++] = argv[i];
        else return cli_error(self, "unexpected argument '%s'", argv[i]);
    }
    if (!nwords) {
        if (list) return cli_error(self, "--flags wants a COMMAND");
        overview();
        return 0;
    }
    char subs[256];
    int used;
    const cli_command *c = find_command(nwords, words, &used);
    if (c && used == nwords) {
        if (list) cli_list_flags(stdout, c);
        else cli_usage(stdout, c);
        return 0;
    }
    if (nwords == 1 && !list && is_group(words[0], subs, sizeof subs)) {
        group_usage(words[0]);
        return 0;
    }
    return cli_error(self, "unknown command '%s%s%s' (see 'jetmoe help')", words[0], nwords > 1 ? " " : "",
                     nwords > 1 ? words[1] : "");
}

static int run_version(const cli_command *self, int argc, char **argv)
{
    int rc = cli_parse(self, argc, argv, NULL, NULL);
    if (rc != CLI_RUN) return rc;
#if defined(__clang__)
    const char *compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
    const char *compiler = "gcc " __VERSION__;
#else
    const char *compiler = "unknown compiler";
#endif
    printf("jetmoe %s\n", JM_VERSION);
    printf("compiler  %s (CC=%s)\n", compiler, JM_BUILD_CC);
    printf("OPT       %s\n", JM_BUILD_OPT);
    printf("SAN       %s\n", JM_BUILD_SAN[0] ? JM_BUILD_SAN : "none");
    printf("BLAS      %s\n", JM_BUILD_BLAS);
    return 0;
}

/* OpenMP threads that wait at a barrier spin by default (libgomp), and on a
 * busy machine a barrier then waits a whole time slice for a sibling the OS
 * has put aside: a 64-token prefill took 0.78 s on 2 threads beside one
 * spinning process, 0.09 s with passive waiting (and 0.06 s on 1 thread).
 * libgomp reads OMP_WAIT_POLICY once, as it loads, before main runs, so the
 * CLI sets it and starts itself again; a policy the user set is kept. Decode
 * steps do not depend on it: they run on the library's own pool. */
static void passive_openmp(char **argv)
{
    if (getenv("OMP_WAIT_POLICY")) return;
    if (setenv("OMP_WAIT_POLICY", "passive", 1) == 0) execv("/proc/self/exe", argv);
    /* no exec: carry on with the default policy */
}

int main(int argc, char **argv)
{
    passive_openmp(argv);
    if (argc < 2) {
        overview();
        return 2;
    }
    const char *a = argv[1];
    if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
        overview();
        return 0;
    }
    if (strcmp(a, "--version") == 0) return run_version(&cmd_version, argc - 1, argv + 1);
    int used;
    const cli_command *c = find_command(argc - 1, argv + 1, &used);
    if (c) return c->run(c, argc - used, argv + used);
    char subs[256];
    if (is_group(a, subs, sizeof subs)) {
        const char *sub = argc > 2 ? argv[2] : NULL;
        if (sub && (strcmp(sub, "-h") == 0 || strcmp(sub, "--help") == 0)) {
            group_usage(a);
            return 0;
        }
        if (!sub || sub[0] == '-') {
            fprintf(stderr, "jetmoe %s: missing subcommand (%s; see 'jetmoe %s --help')\n", a, subs, a);
            return 2;
        }
        jm_error e;
        fprintf(stderr, "jetmoe %s: unknown subcommand '%s' (%s)\n", a, cli_shown(&e, sub), subs);
        return 2;
    }
    jm_error e;
    fprintf(stderr, "jetmoe: unknown command '%s' (see 'jetmoe help')\n", cli_shown(&e, a));
    return 2;
}
