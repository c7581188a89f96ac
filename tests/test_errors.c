/* test_errors.c — jm_fail, through which every message of the library (and
 * of the CLI) goes: control characters and bytes that are not UTF-8 shown as
 * \xNN, valid UTF-8 kept, an over-long message cut in its middle so the
 * cause at its end survives, and err->msg usable as an argument.
 * Prints "PASS <name>" or "FAIL <name>: <why>" per check; exits 0 iff nothing failed. */
#include "base/base.h"
#include "harness.h"

#include <string.h>

static void shown_as(const char *name, const char *in, const char *want)
{
    jm_error err;
    jm_status s = jm_fail(&err, JM_ERR_FORMAT, "%s", in);
    check(s == JM_ERR_FORMAT && strcmp(err.msg, want) == 0, name, "got \"%s\", want \"%s\"", err.msg, want);
}

static bool no_raw_control(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f) return false;
    return true;
}

int main(void)
{
    shown_as("error_plain_text_unchanged", "model.safetensors: tensor 'a' is missing", "model.safetensors: tensor 'a' is missing");
    shown_as("error_newline_tab_escaped", "a\nb\tc\rd", "a\\x0ab\\x09c\\x0dd");
    shown_as("error_escape_sequence_escaped", "x\x1b[31mred\x1b[0m\x07", "x\\x1b[31mred\\x1b[0m\\x07");
    shown_as("error_del_escaped", "a\x7f" "b", "a\\x7fb");
    shown_as("error_c1_control_escaped", "a\xc2\x9b" "31m", "a\\xc2\\x9b31m"); /* U+009B: CSI on some terminals */
    shown_as("error_utf8_kept", "caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80 \xc2\xa0",
             "caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80 \xc2\xa0");
    shown_as("error_invalid_utf8_escaped", "\xff\xfe \xc0\x80 \xed\xa0\x80 \xe2\x82", "\\xff\\xfe \\xc0\\x80 \\xed\\xa0\\x80 \\xe2\\x82");
    shown_as("error_backslash_kept", "C:\\dir\\x41", "C:\\dir\\x41");

    /* shown twice = shown once: the CLI shows the library's messages again */
    jm_error a, b;
    jm_fail(&a, JM_ERR_IO, "%s", "p\x01q\xff\n");
    jm_fail(&b, JM_ERR_IO, "%s", a.msg);
    check(strcmp(a.msg, b.msg) == 0, "error_showing_is_idempotent", "\"%s\" then \"%s\"", a.msg, b.msg);

    /* err->msg as an argument: formatted apart, then written */
    jm_fail(&a, JM_ERR_IO, "inner cause");
    jm_fail(&a, JM_ERR_IO, "outer.json: %s", a.msg);
    check(strcmp(a.msg, "outer.json: inner cause") == 0, "error_msg_as_argument", "\"%s\"", a.msg);

    /* a path longer than the message: its middle goes, the start and the cause stay */
    enum { LONG = 6000 };
    char *path = malloc(LONG + 1);
    for (int i = 0; i < LONG; i++) path[i] = i % 50 == 0 ? '/' : (char)('a' + i % 26);
    memcpy(path, "/start", 6);
    path[LONG] = 0;
    jm_status s = jm_fail(&a, JM_ERR_IO, "%s: No such file or directory", path);
    size_t n = strlen(a.msg);
    const char *cause = ": No such file or directory";
    check(s == JM_ERR_IO && n == sizeof a.msg - 1 && strncmp(a.msg, "/start", 6) == 0 && strstr(a.msg, "...") &&
              strcmp(a.msg + n - strlen(cause), cause) == 0,
          "error_long_path_keeps_cause", "%zu bytes: \"%.60s ... %s\"", n, a.msg, n > 60 ? a.msg + n - 60 : a.msg);
    /* the kept tail is the path's own end, byte for byte */
    const char *tail = strstr(a.msg, "...") + 3;
    size_t tail_path = strlen(tail) - strlen(cause);
    check(memcmp(tail, path + LONG - tail_path, tail_path) == 0, "error_long_path_tail_exact", "tail \"%.40s\"", tail);

    /* cut between characters, never inside an escape or a UTF-8 sequence */
    for (int i = 0; i < LONG; i++) path[i] = i % 3 == 0 ? '\x1b' : i % 3 == 1 ? '\xc3' : '\xa9';
    jm_fail(&a, JM_ERR_IO, "%s: cause", path);
    n = strlen(a.msg);
    const char *cut = strstr(a.msg, "...");
    bool whole = cut != NULL;
    size_t i = 0;
    while (whole && a.msg + i < cut) { /* the head: \x1b and é units only */
        if (strncmp(a.msg + i, "\\x1b", 4) == 0) i += 4;
        else if (strncmp(a.msg + i, "\xc3\xa9", 2) == 0) i += 2;
        else whole = false;
    }
    for (i = (size_t)(cut - a.msg) + 3; whole && i < n - strlen(": cause");) { /* and the tail */
        if (strncmp(a.msg + i, "\\x1b", 4) == 0) i += 4;
        else if (strncmp(a.msg + i, "\xc3\xa9", 2) == 0) i += 2;
        else whole = false;
    }
    check(whole && no_raw_control(a.msg) && strcmp(a.msg + n - 7, ": cause") == 0, "error_cut_between_characters",
          "\"%.80s\"", a.msg);
    free(path);

    /* NULL err: only the status */
    check(jm_fail(NULL, JM_ERR_ARG, "x %s", "y") == JM_ERR_ARG, "error_null_err", "wrong status");
    return exit_status();
}
