/* tool_read_records — reads a JSONL file back with the library's readers
 * (align.h), for tests/distill_tests.py:
 *     tool_read_records sft|pref FILE TOKENIZER_DIR MAX_LEN
 * prints {"examples": N, "lines": N, "bad": N, "tokens": N} and exits 0, or
 * the reader's error on stderr and exits 1. */
#include "align/align.h"

#include <string.h>

int main(int argc, char **argv)
{
    if (argc != 5 || (strcmp(argv[1], "sft") && strcmp(argv[1], "pref"))) {
        fprintf(stderr, "usage: tool_read_records sft|pref FILE TOKENIZER_DIR MAX_LEN\n");
        return 2;
    }
    jm_error err;
    jm_tokenizer *t;
    if (jm_tokenizer_load(argv[3], &t, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    const char *files[1] = {argv[2]};
    jm_records_opts o = {.max_len = atoi(argv[4]), .vocab_size = jm_tokenizer_vocab_size(t)};
    jm_records_stats st;
    jm_status s;
    int64_t n = 0;
    if (!strcmp(argv[1], "sft")) {
        jm_sft_set set;
        s = jm_sft_load(files, 1, t, &o, &set, &st, &err);
        n = set.n;
        jm_sft_free(&set);
    } else {
        jm_pref_set set;
        s = jm_pref_load(files, 1, t, &o, &set, &st, &err);
        n = set.n;
        jm_pref_free(&set);
    }
    jm_tokenizer_free(t);
    if (s) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    printf("{\"examples\": %lld, \"lines\": %lld, \"bad\": %lld, \"tokens\": %lld}\n", (long long)n,
           (long long)st.lines, (long long)st.bad, (long long)st.tokens);
    return 0;
}
