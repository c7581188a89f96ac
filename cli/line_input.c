/* line_input.c — reading the chat REPL's lines: with line editing and history
 * (libedit, Debian's libedit-dev) on a terminal, plain getline otherwise.
 *
 * libedit rather than hand-written escape handling: arrow keys, Home/End,
 * word motion, history search and the user's ~/.editrc all come for free, and
 * it is BSD-licensed and small, where GNU readline would make the program GPL.
 *
 * Ctrl-C: the caller's SIGINT handler (installed without SA_RESTART) sets its
 * flag; a read it interrupts returns with *interrupted = 1 and an empty line,
 * so the REPL can clear the line instead of dying. */
#include "line_input.h"

#include <errno.h>
#include <histedit.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct line_input {
    EditLine *el;      /* NULL: not a terminal */
    History *hist;
    const char *prompt;
    char *line;        /* getline's buffer, or the copy of libedit's */
    size_t cap;
};

static const char *el_prompt(EditLine *el)
{
    line_input *li = NULL;
    el_get(el, EL_CLIENTDATA, &li);
    return li && li->prompt ? li->prompt : "";
}

line_input *line_input_open(const char *prompt)
{
    line_input *li = calloc(1, sizeof *li);
    if (!li) return NULL;
    li->prompt = prompt;
    if (!isatty(0) || !isatty(2)) return li;
    /* the prompt and the echo go to stderr: stdout carries only the replies */
    li->el = el_init("jetmoe", stdin, stderr, stderr);
    li->hist = history_init();
    if (!li->el || !li->hist) {
        if (li->el) el_end(li->el);
        if (li->hist) history_end(li->hist);
        li->el = NULL, li->hist = NULL;
        return li; /* plain input still works */
    }
    HistEvent ev;
    history(li->hist, &ev, H_SETSIZE, 1000);
    history(li->hist, &ev, H_SETUNIQUE, 1);
    el_set(li->el, EL_CLIENTDATA, li);
    el_set(li->el, EL_PROMPT, el_prompt);
    el_set(li->el, EL_EDITOR, "emacs");
    el_set(li->el, EL_HIST, history, li->hist);
    el_source(li->el, NULL); /* ~/.editrc, as other libedit programs do */
    return li;
}

void line_input_close(line_input *li)
{
    if (!li) return;
    if (li->el) el_end(li->el);
    if (li->hist) history_end(li->hist);
    free(li->line);
    free(li);
}

int line_input_is_tty(const line_input *li) { return li->el != NULL; }

const char *line_input_read(line_input *li, int *interrupted)
{
    *interrupted = 0;
    const char *got;
    size_t len;
    if (li->el) {
        int n = 0;
        errno = 0;
        got = el_gets(li->el, &n);
        if (!got || n < 0) {
            if (errno != EINTR) return NULL; /* Ctrl-D on an empty line, or end of input */
            el_reset(li->el);
            *interrupted = 1;
            return "";
        }
        len = (size_t)n;
        if (len + 1 > li->cap) {
            char *grown = realloc(li->line, len + 1);
            if (!grown) return NULL;
            li->line = grown, li->cap = len + 1;
        }
        memcpy(li->line, got, len);
    } else {
        errno = 0;
        ssize_t n = getline(&li->line, &li->cap, stdin);
        if (n < 0) {
            if (errno != EINTR) return NULL;
            clearerr(stdin);
            *interrupted = 1;
            return "";
        }
        len = (size_t)n;
    }
    while (len && (li->line[len - 1] == '\n' || li->line[len - 1] == '\r')) len--;
    li->line[len] = 0;
    if (li->el && len) {
        HistEvent ev;
        history(li->hist, &ev, H_ENTER, li->line);
    }
    return li->line;
}
