/* harness.h — the plain test harness of the C test programs (tests/test_*.c).
 * Each check prints one line that tests/run_tests.py parses:
 *     PASS name
 *     PASS name (detail)        (check_detail)
 *     FAIL name: why
 * and main returns exit_status(): 0 iff nothing failed.
 * Plus the file helpers every test needs: a temporary directory under /tmp,
 * removed at the end; writing and reading whole files; counting entries.
 * Header-only and all static: include it once, from the test's .c file. */
#ifndef JM_TEST_HARNESS_H
#define JM_TEST_HARNESS_H

#include "base/safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* Checks failed so far. The only mutable global, and only of the test program:
 * each test is its own single-threaded process, so a file-static counter is
 * enough. The library itself has no mutable globals. */
static int n_fail;

/* Prints PASS (with the detail in parentheses if detail) or FAIL with the message
 * formatted from fmt; newlines in it become '|' so each check is one line. */
static inline bool report(bool ok, bool detail, const char *name, const char *fmt, va_list ap)
{
    char msg[4096];
    if (ok && !detail) {
        printf("PASS %s\n", name);
    } else {
        vsnprintf(msg, sizeof msg, fmt, ap);
        for (char *p = msg; *p; p++)
            if (*p == '\n') *p = '|';
        if (ok) printf("PASS %s (%s)\n", name, msg);
        else printf("FAIL %s: %s\n", name, msg);
    }
    fflush(stdout); /* the lines before a crash still reach run_tests.py */
    n_fail += !ok;
    return ok;
}

/* PASS name, or FAIL name: <printf(fmt, ...)>. Returns ok. */
__attribute__((format(printf, 3, 4)))
static inline bool check(bool ok, const char *name, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    report(ok, false, name, fmt, ap);
    va_end(ap);
    return ok;
}

/* As check, but a pass shows the message too: PASS name (<printf(fmt, ...)>). */
__attribute__((format(printf, 3, 4)))
static inline bool check_detail(bool ok, const char *name, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    report(ok, true, name, fmt, ap);
    va_end(ap);
    return ok;
}

/* main's return value. */
static inline int exit_status(void)
{
    return n_fail ? 1 : 0;
}

/* ---- files ---- */

/* Writes n bytes to path; exits 2 if it cannot (the test could not go on). */
static inline void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(p, 1, n, f) != n) || fclose(f) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(2);
    }
}

static inline void write_text(const char *path, const char *s)
{
    write_bytes(path, s, strlen(s));
}

/* The whole file, malloc'd and NUL-terminated, its length in *n; NULL if it cannot be read. */
static inline char *slurp(const char *path, size_t *n)
{
    char *buf = NULL;
    if (jm_read_file(path, (size_t)1 << 30, &buf, n, NULL)) return NULL;
    return buf;
}

/* Whether both files can be read and hold the same bytes. */
static inline bool same_file(const char *a, const char *b)
{
    size_t na, nb;
    char *x = slurp(a, &na), *y = slurp(b, &nb);
    bool same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

/* Entries of dir whose name contains sub (e.g. ".tmp.": left-over atomic-write temps); -1 if dir cannot be read. */
static inline int count_entries(const char *dir, const char *sub)
{
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (strstr(e->d_name, sub)) n++;
    closedir(d);
    return n;
}

/* Seconds on a monotonic clock. */
static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- the temporary directory ---- */

/* Makes a fresh directory from a mkdtemp template ("/tmp/jm_test_x_XXXXXX", edited in
 * place). Without it nothing can be tested: prints a FAIL line and exits 1. */
static inline void temp_dir(char *tmpl)
{
    if (!mkdtemp(tmpl)) {
        printf("FAIL setup: cannot make a temporary directory %s: %s\n", tmpl, strerror(errno));
        exit(1);
    }
}

static inline int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

/* Removes dir and everything under it (no symlinks followed). */
static inline void rm_rf(const char *dir)
{
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* At the end of main: removes the temporary directory if every check passed,
 * keeps it (and says where) for a look otherwise. */
static inline void temp_dir_done(const char *dir)
{
    if (n_fail == 0) rm_rf(dir);
    else printf("# files kept in %s\n", dir);
}

#endif
