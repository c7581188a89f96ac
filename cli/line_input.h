/* line_input.h — the chat REPL's input lines (line_input.c). */
#ifndef JM_CLI_LINE_INPUT_H
#define JM_CLI_LINE_INPUT_H

#include <stdio.h>

typedef struct line_input line_input;

/* Editing and history when stdin and stderr are terminals (the prompt is
 * shown then only); plain lines otherwise. NULL when out of memory. */
line_input *line_input_open(const char *prompt);
void line_input_close(line_input *li);
int line_input_is_tty(const line_input *li);
/* The next line without its newline (valid until the next call), or NULL at
 * the end of input (Ctrl-D). A SIGINT during the read gives "" with
 * *interrupted = 1. */
const char *line_input_read(line_input *li, int *interrupted);

#endif
