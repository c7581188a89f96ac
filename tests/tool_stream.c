/* tool_stream.c — drives jm_text_stream for run_tests.py: pushes the given
 * continuation ids one at a time after the prompt ids and writes exactly the
 * bytes the stream hands out (then the flush) to stdout; "stopped" on stderr
 * when the stop string ended it.
 *     tool_stream TOKENIZER PROMPT_IDS CONT_IDS [STOP...]     (ids comma-separated) */
#include "jetmoe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int parse_ids(char *s, int32_t *out, int cap)
{
    int n = 0;
    for (char *t = strtok(s, ","); t && n < cap; t = strtok(NULL, ",")) out[n++] = (int32_t)atoi(t);
    return n;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: tool_stream TOKENIZER PROMPT_IDS CONT_IDS [STOP...]\n");
        return 2;
    }
    static int32_t prompt[4096], cont[4096];
    int np = parse_ids(argv[2], prompt, 4096), nc = parse_ids(argv[3], cont, 4096);
    jm_error err;
    jm_tokenizer *tok;
    jm_text_stream *s;
    if (jm_tokenizer_load(argv[1], &tok, &err) || jm_text_stream_new(tok, prompt, (size_t)np, (const char *const *)argv + 4, argc - 4, &s, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    const char *bytes;
    size_t len;
    int r = 0;
    for (int i = 0; i < nc && r == 0; i++) {
        r = jm_text_stream_push(s, cont[i], &bytes, &len, &err);
        if (r < 0) {
            fprintf(stderr, "%s\n", err.msg);
            return 1;
        }
        fwrite(bytes, 1, len, stdout);
    }
    if (r == 1) {
        fprintf(stderr, "stopped\n");
    } else {
        jm_text_stream_flush(s, &bytes, &len);
        fwrite(bytes, 1, len, stdout);
    }
    jm_text_stream_free(s);
    jm_tokenizer_free(tok);
    return 0;
}
