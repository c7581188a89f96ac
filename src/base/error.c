/* error.c — status names and error messages.
 *
 * A message quotes what came from outside (paths, tensor names, pieces, JSON
 * strings), so jm_fail shows it safely: control characters (C0, DEL, C1) and
 * bytes that are not well-formed UTF-8 become \xNN, never raw bytes that a
 * terminal would act on; valid UTF-8 stays as it is. A message longer than
 * jm_error.msg loses its middle, not its end: "<head>...<tail>", so the cause
 * at the end of "<very long path>: <cause>" always survives. */
#include "base/base.h"

#include <stdio.h>
#include <string.h>

#define CUT_MARK "..."

const char *jm_status_name(jm_status s)
{
    switch (s) {
    case JM_OK: return "ok";
    case JM_ERR_IO: return "I/O error";
    case JM_ERR_FORMAT: return "format error";
    case JM_ERR_CONFIG: return "config error";
    case JM_ERR_SHAPE: return "shape error";
    case JM_ERR_ARG: return "bad argument";
    case JM_ERR_NOMEM: return "out of memory";
    }
    return "unknown error";
}

size_t jm_utf8_char(const uint8_t *s, size_t n)
{
    if (n == 0) return 0;
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    size_t k;                     /* continuation bytes */
    uint8_t lo = 0x80, hi = 0xbf; /* allowed range of the first continuation byte */
    if (c >= 0xc2 && c <= 0xdf) k = 1;
    else if (c == 0xe0) k = 2, lo = 0xa0; /* overlong below U+0800 */
    else if ((c >= 0xe1 && c <= 0xec) || c == 0xee || c == 0xef) k = 2;
    else if (c == 0xed) k = 2, hi = 0x9f; /* surrogates D800-DFFF */
    else if (c == 0xf0) k = 3, lo = 0x90; /* overlong below U+10000 */
    else if (c >= 0xf1 && c <= 0xf3) k = 3;
    else if (c == 0xf4) k = 3, hi = 0x8f; /* past U+10FFFF */
    else return 0;                        /* 80-C1, F5-FF */
    if (k > n - 1 || s[1] < lo || s[1] > hi) return 0;
    for (size_t j = 2; j <= k; j++)
        if (s[j] < 0x80 || s[j] > 0xbf) return 0;
    return k + 1;
}

/* The next character of s as a message shows it (at most 8 bytes in out, its
 * length in *shown); returns how many bytes of s it stands for (>= 1). */
static size_t shown_char(const uint8_t *s, size_t n, char *out, size_t *shown)
{
    static const char hex[] = "0123456789abcdef";
    size_t len = jm_utf8_char(s, n);
    bool control = len == 0 || (len == 1 && (s[0] < 0x20 || s[0] == 0x7f)) ||
                   (len == 2 && s[0] == 0xc2 && s[1] < 0xa0); /* C1: U+0080-U+009F */
    if (len == 0) len = 1;
    if (!control) {
        memcpy(out, s, len);
        *shown = len;
        return len;
    }
    for (size_t i = 0; i < len; i++) {
        out[4 * i] = '\\', out[4 * i + 1] = 'x';
        out[4 * i + 2] = hex[s[i] >> 4], out[4 * i + 3] = hex[s[i] & 15];
    }
    *shown = 4 * len;
    return len;
}

/* Writes text (n bytes) into out (cap bytes, cap > 2 * strlen(CUT_MARK)) as
 * shown, its middle cut when it does not fit. */
static void show(const char *text, size_t n, char *out, size_t cap)
{
    const uint8_t *s = (const uint8_t *)text;
    char c[8];
    size_t k, total = 0;
    for (size_t i = 0; i < n; total += k) i += shown_char(s + i, n - i, c, &k);
    size_t room = cap - 1, head = total <= room ? room : room / 4, o = 0, i = 0;
    while (i < n) { /* the head: whole characters while they fit */
        size_t used = shown_char(s + i, n - i, c, &k);
        if (o + k > head) break;
        memcpy(out + o, c, k);
        o += k, i += used;
    }
    if (i < n) { /* cut: the tail is the shortest suffix of whole characters that fits */
        memcpy(out + o, CUT_MARK, strlen(CUT_MARK));
        o += strlen(CUT_MARK);
        size_t budget = room - o, skip = total - (o - strlen(CUT_MARK)); /* shown bytes from i on */
        while (i < n && skip > budget) {
            i += shown_char(s + i, n - i, c, &k);
            skip -= k;
        }
        while (i < n) {
            i += shown_char(s + i, n - i, c, &k);
            memcpy(out + o, c, k);
            o += k;
        }
    }
    out[o] = 0;
}

jm_status jm_fail(jm_error *err, jm_status s, const char *fmt, ...)
{
    if (!err) return s;
    va_list ap;
    va_start(ap, fmt);
    char small[2048], *text = small; /* formatted apart from err->msg: an argument may be err->msg */
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) {
        snprintf(err->msg, sizeof err->msg, "(unprintable message)");
        return s;
    }
    if ((size_t)n >= sizeof small) {
        char *big = malloc((size_t)n + 1);
        if (big) {
            va_start(ap, fmt);
            vsnprintf(big, (size_t)n + 1, fmt, ap);
            va_end(ap);
            text = big;
        } else {
            n = (int)sizeof small - 1; /* out of memory: the first part is all there is */
        }
    }
    show(text, (size_t)n, err->msg, sizeof err->msg);
    if (text != small) free(text);
    return s;
}
