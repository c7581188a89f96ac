/* flags.c — the one parser of the CLI's flags, and the usage text, both
 * driven by a command's table (flags.h). */
#include "flags.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define MAX_FLAGS 32 /* per command */

static int is_help(const char *a)
{
    return strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0;
}

/* The flag spelled a: "--top-k", an alias ("-n"), or "--top-k=5" (then
 * *inline_value points past the '='; else it is NULL). */
static const cli_flag *find_flag(const cli_command *c, const char *a, const char **inline_value)
{
    const char *eq = strncmp(a, "--", 2) == 0 ? strchr(a, '=') : NULL;
    size_t len = eq ? (size_t)(eq - a) : strlen(a);
    *inline_value = eq ? eq + 1 : NULL;
    for (int i = 0; i < c->nflags; i++) {
        const char *spellings[3] = {c->flags[i].name, c->flags[i].alias[0], c->flags[i].alias[1]};
        for (int k = 0; k < 3; k++)
            if (spellings[k] && strlen(spellings[k]) == len && strncmp(spellings[k], a, len) == 0)
                return &c->flags[i];
    }
    return NULL;
}

/* "[0, 4096]" or "(0, 1]" */
static void range_text(const cli_flag *f, char *buf, size_t cap)
{
    if (f->kind == FLAG_INT)
        snprintf(buf, cap, "[%lld, %lld]", (long long)f->lo, (long long)f->hi);
    else
        snprintf(buf, cap, "%c%g, %g]", f->open_lo ? '(' : '[', f->lo, f->hi);
}

/* Stores one value of flag f (spelled as the user did) at its offset in opts.
 * Returns 0, or the exit code after printing the error. */
static int set_value(const cli_command *c, const cli_flag *f, const char *spelled, const char *text, void *opts)
{
    char *field = (char *)opts + f->offset, *end, range[80];
    errno = 0;
    switch (f->kind) {
    case FLAG_STR:
        *(const char **)field = text;
        return 0;
    case FLAG_BOOL:
        *(int *)field = 1;
        return 0;
    case FLAG_LIST: {
        cli_list *l = (cli_list *)field;
        if (l->n == CLI_MAX_REPEAT)
            return cli_error(c, "%s given too many times (at most %d)", spelled, CLI_MAX_REPEAT);
        l->v[l->n++] = text;
        return 0;
    }
    case FLAG_INT: {
        long long v = strtoll(text, &end, 10);
        if (errno || end == text || *end || v < (long long)f->lo || v > (long long)f->hi) break;
        *(int64_t *)field = v;
        return 0;
    }
    case FLAG_REAL: {
        double v = strtod(text, &end);
        if (errno || end == text || *end || !(f->open_lo ? v > f->lo : v >= f->lo) || !(v <= f->hi)) break;
        *(double *)field = v;
        return 0;
    }
    }
    range_text(f, range, sizeof range);
    return cli_error(c, "%s wants %s in %s, got '%s'", spelled, f->kind == FLAG_INT ? "an integer" : "a number",
                     range, text);
}

/* "jetmoe CMD: <what>; usage: <synopsis>" */
static int usage_error(const cli_command *c, const char *what)
{
    fprintf(stderr, "jetmoe %s: %s; usage: ", c->name, what);
    cli_synopsis(stderr, c);
    fputc('\n', stderr);
    return 2;
}

int cli_parse(const cli_command *c, int argc, char **argv, void *opts, const char **positional)
{
    const char *value;
    /* -h/--help wins over everything else, wherever it is (but not as a flag's value) */
    for (int i = 1; i < argc; i++) {
        if (is_help(argv[i])) {
            cli_usage(stdout, c);
            return 0;
        }
        const cli_flag *f = find_flag(c, argv[i], &value);
        if (f && f->kind != FLAG_BOOL && !value) i++;
    }
    if (c->nflags > MAX_FLAGS) return cli_error(c, "more than %d flags in the table", MAX_FLAGS);
    int given[MAX_FLAGS] = {0}, npos = 0;
    for (int i = 0; i < c->nflags; i++) {
        int rc = c->flags[i].def ? set_value(c, &c->flags[i], c->flags[i].name, c->flags[i].def, opts) : 0;
        if (rc) return rc;
    }
    if (positional) *positional = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] != '-' || !a[1]) {
            if (!c->positional || !positional || npos++) return cli_error(c, "unexpected argument '%s'", a);
            *positional = a;
            continue;
        }
        const cli_flag *f = find_flag(c, a, &value);
        if (!f) return cli_error(c, "unknown flag %s (see 'jetmoe %s --help')", a, c->name);
        given[f - c->flags] = 1;
        char spelled[64]; /* as the user wrote it, without "=value" */
        snprintf(spelled, sizeof spelled, "%.*s", value ? (int)(value - 1 - a) : (int)strlen(a), a);
        if (f->kind == FLAG_BOOL) {
            if (value) return cli_error(c, "%s takes no value", spelled);
            set_value(c, f, spelled, NULL, opts);
            continue;
        }
        if (!value) {
            if (i + 1 >= argc) return cli_error(c, "%s needs a value", spelled);
            value = argv[++i];
        }
        int rc = set_value(c, f, spelled, value, opts);
        if (rc) return rc;
    }
    char what[128];
    if (c->positional && !npos) {
        snprintf(what, sizeof what, "missing %s", c->positional);
        return usage_error(c, what);
    }
    for (int i = 0; i < c->nflags; i++)
        if (c->flags[i].required && !given[i]) {
            snprintf(what, sizeof what, "%s is required", c->flags[i].name);
            return usage_error(c, what);
        }
    return CLI_RUN;
}

/* ---- usage, generated from the table ---- */

/* "-n, --max-new N", "--temperature, --temp T": short aliases, the name, long aliases */
static int spellings(char *buf, size_t cap, const cli_flag *f)
{
    const char *sorted[3];
    int n = 0, len = 0;
    for (int k = 0; k < 2; k++)
        if (f->alias[k] && f->alias[k][1] != '-') sorted[n++] = f->alias[k];
    sorted[n++] = f->name;
    for (int k = 0; k < 2; k++)
        if (f->alias[k] && f->alias[k][1] == '-') sorted[n++] = f->alias[k];
    for (int k = 0; k < n; k++) len += snprintf(buf + len, cap - (size_t)len, k ? ", %s" : "%s", sorted[k]);
    if (f->kind != FLAG_BOOL) len += snprintf(buf + len, cap - (size_t)len, " %s", f->meta);
    return len;
}

void cli_synopsis(FILE *out, const cli_command *c)
{
    int optional = 0;
    fprintf(out, "jetmoe %s", c->name);
    if (c->positional) fprintf(out, " %s", c->positional);
    for (int i = 0; i < c->nflags; i++) {
        if (c->flags[i].required) fprintf(out, " %s %s", c->flags[i].name, c->flags[i].meta);
        else optional = 1;
    }
    if (optional) fputs(" [options]", out);
}

/* "N in [0, 4096], default 0": what the table says of a flag besides its help */
static void details(char *buf, size_t cap, const cli_flag *f)
{
    int len = 0;
    buf[0] = 0;
    if (f->kind == FLAG_INT || f->kind == FLAG_REAL) {
        len = snprintf(buf, cap, "%s in ", f->meta);
        range_text(f, buf + len, cap - (size_t)len);
        len = (int)strlen(buf);
    }
    const char *sep = len ? ", " : "";
    if (f->required) snprintf(buf + len, cap - (size_t)len, "%srequired", sep);
    else if (f->kind == FLAG_LIST)
        snprintf(buf + len, cap - (size_t)len, "%srepeatable, up to %d", sep, CLI_MAX_REPEAT);
    else if (f->def) snprintf(buf + len, cap - (size_t)len, "%sdefault %s", sep, f->def);
}

/* Flags whose spellings are longer than this put their help on the next line. */
#define USAGE_COLUMN 26

void cli_usage(FILE *out, const cli_command *c)
{
    char left[96], more[160];
    int width = (int)strlen("-h, --help");
    for (int i = 0; i < c->nflags; i++) {
        int len = spellings(left, sizeof left, &c->flags[i]);
        width = len > width && len <= USAGE_COLUMN ? len : width;
    }
    fputs("usage: ", out);
    cli_synopsis(out, c);
    fprintf(out, "\n\n%s\n\noptions:\n", c->about);
    for (int i = 0; i < c->nflags; i++) {
        if (spellings(left, sizeof left, &c->flags[i]) > width) fprintf(out, "  %s\n%*s", left, width + 2, "");
        else fprintf(out, "  %-*s", width, left);
        details(more, sizeof more, &c->flags[i]);
        fprintf(out, more[0] ? "  %s (%s)\n" : "  %s%s\n", c->flags[i].help, more);
    }
    fprintf(out, "  %-*s  show this help\n", width, "-h, --help");
}

void cli_list_flags(FILE *out, const cli_command *c)
{
    for (int i = 0; i < c->nflags; i++) {
        fprintf(out, "%s\n", c->flags[i].name);
        for (int k = 0; k < 2; k++)
            if (c->flags[i].alias[k]) fprintf(out, "%s\n", c->flags[i].alias[k]);
    }
    fputs("-h\n--help\n", out);
}

/* ---- errors and shared argument formats ---- */

const char *cli_shown(jm_error *e, const char *s)
{
    jm_fail(e, JM_OK, "%s", s);
    return e->msg;
}

int cli_error(const cli_command *c, const char *fmt, ...)
{
    va_list ap;
    char *text = NULL;
    jm_error e;
    va_start(ap, fmt);
    int n = vasprintf(&text, fmt, ap);
    va_end(ap);
    fprintf(stderr, "jetmoe %s: %s\n", c->name, n < 0 ? "out of memory" : cli_shown(&e, text));
    free(n < 0 ? NULL : text);
    return 2;
}

int cli_fail(const cli_command *c, jm_status s, const jm_error *err)
{
    jm_error e; /* the library's messages are shown already; the CLI's own ones too, then */
    fprintf(stderr, "jetmoe %s: %s: %s\n", c->name, jm_status_name(s), cli_shown(&e, err->msg));
    return 1;
}

int cli_parse_ids(const char *list, int32_t **out, int *n)
{
    int cap = 1;
    for (const char *p = list; *p; p++) cap += *p == ',';
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    if (!ids) return -1;
    /* strtok would skip empty fields ("1,,2"); each field must be a whole number */
    int k = 0;
    for (const char *p = list;; p++) {
        char *end;
        errno = 0;
        long long v = strtoll(p, &end, 10);
        if (errno || end == p || (*end && *end != ',') || v < INT32_MIN || v > INT32_MAX) {
            free(ids);
            return -1;
        }
        ids[k++] = (int32_t)v;
        if (!*end) break;
        p = end;
    }
    *out = ids;
    *n = k;
    return 0;
}

int cli_model_dir(const cli_command *c, const char *path, char *out, size_t cap)
{
    jm_error err;
    jm_status s = jm_checkpoint_resolve(path, out, cap, &err);
    if (s) return cli_fail(c, s, &err);
    if (strcmp(out, path) != 0) fprintf(stderr, "jetmoe %s: using %s\n", c->name, cli_shown(&err, out));
    return CLI_RUN;
}

jm_sample_opts cli_sample_opts(const cli_sampling *s, int max_new)
{
    uint64_t seed = (uint64_t)s->seed;
    if (s->seed < 0) {
        uint32_t r;
        if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r) r = (uint32_t)time(NULL) ^ ((uint32_t)getpid() << 16);
        seed = r & 0x7fffffff;
        if (!s->greedy && s->temperature > 0) fprintf(stderr, "seed: %llu\n", (unsigned long long)seed);
    }
    return (jm_sample_opts){.temperature = s->temperature, .top_k = (int)s->top_k, .top_p = s->top_p,
                            .seed = seed, .max_new = max_new, .greedy = s->greedy,
                            .repetition_penalty = s->repeat_penalty, .repeat_last_n = (int)s->repeat_last_n};
}

int cli_flag_given(const cli_command *c, int argc, char **argv, const char *name)
{
    const char *value;
    for (int i = 1; i < argc; i++) {
        const cli_flag *f = argv[i][0] == '-' && argv[i][1] ? find_flag(c, argv[i], &value) : NULL;
        if (f && !strcmp(f->name, name)) return 1;
        if (f && f->kind != FLAG_BOOL && !value) i++; /* its value, which may start with '-' */
    }
    return 0;
}

int cli_sampling_defaults(const cli_command *c, int argc, char **argv, const char *dir, cli_sampling *s)
{
    jm_generation_config g;
    jm_error err;
    jm_status st = jm_generation_config_load(dir, &g, &err);
    if (st) return cli_fail(c, st, &err);
#define UNGIVEN(flag) !cli_flag_given(c, argc, argv, flag)
    if (g.has_do_sample && !g.do_sample && UNGIVEN("--temperature")) s->temperature = 0; /* HF: greedy */
    else if (g.has_temperature && UNGIVEN("--temperature")) s->temperature = g.temperature;
    if (g.has_top_p && UNGIVEN("--top-p")) s->top_p = g.top_p;
    if (g.has_top_k && UNGIVEN("--top-k")) s->top_k = g.top_k;
    if (g.has_repetition_penalty && UNGIVEN("--repeat-penalty")) s->repeat_penalty = g.repetition_penalty;
    if (g.has_max_new_tokens && UNGIVEN("--max-new")) s->max_new = g.max_new_tokens;
#undef UNGIVEN
    return CLI_RUN;
}
