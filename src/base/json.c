/* json.c — strict JSON parsing (over cJSON) and atomic JSON writes. */
#include "base/base.h"

#include <cjson/cJSON.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <string.h>

static bool valid_utf8(const unsigned char *s, size_t len, size_t *bad)
{
    for (size_t i = 0; i < len;) {
        unsigned c = s[i];
        size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!n || i + n > len || (n == 2 && c < 0xc2) || (n == 4 && c > 0xf4)) goto fail;
        for (size_t k = 1; k < n; k++)
            if ((s[i + k] >> 6) != 2) goto fail;
        if (n == 3) { /* overlong and surrogates */
            unsigned cp = ((c & 0x0fu) << 12) | ((s[i + 1] & 0x3fu) << 6) | (s[i + 2] & 0x3fu);
            if (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff)) goto fail;
        }
        if (n == 4) {
            unsigned cp = ((c & 0x07u) << 18) | ((s[i + 1] & 0x3fu) << 12);
            if (cp < 0x10000 || cp > 0x10ffff) goto fail;
        }
        i += n;
        continue;
    fail:
        *bad = i;
        return false;
    }
    return true;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* cJSON keeps every duplicate key; Python's json (and so Hugging Face) keeps
 * the last. Rather than silently pick one, reject them. Sorting the keys keeps
 * this O(n log n) for 32000-entry vocabularies. Returns 1 when found (*dup set),
 * -1 when out of memory. */
static int duplicate_key(const cJSON *j, const char **dup)
{
    size_t n = 0;
    for (const cJSON *a = j->child; a; a = a->next) {
        n++;
        if (a->child) {
            int r = duplicate_key(a, dup);
            if (r) return r;
        }
    }
    if (!cJSON_IsObject(j) || n < 2) return 0;
    const char **keys = malloc(n * sizeof *keys);
    if (!keys) return -1;
    n = 0;
    for (const cJSON *a = j->child; a; a = a->next) keys[n++] = a->string;
    qsort(keys, n, sizeof *keys, cmp_str);
    int found = 0;
    for (size_t i = 1; i < n && !found; i++)
        if (strcmp(keys[i - 1], keys[i]) == 0) {
            *dup = keys[i]; /* points into the tree, which outlives this call */
            found = 1;
        }
    free(keys);
    return found;
}

/* One pass over JSON text that follows strings and escapes, for the two
 * things cJSON does not check. SCAN_STRICT: the first byte JSON does not allow
 * and cJSON lets through - a control character in a string, or outside one
 * other than tab, CR and LF (cJSON takes them all for whitespace), and an
 * escape other than \" \\ \/ \b \f \n \r \t \uXXXX (cJSON reads "\uZZZZ" as a
 * NUL, which quietly ends the string). SCAN_NUL_ESCAPE: the first \u0000, a
 * NUL that would cut a C string short. Returns its offset, or len. */
typedef enum { SCAN_STRICT, SCAN_NUL_ESCAPE } scan_rule;

static size_t json_scan(const char *text, size_t len, scan_rule rule)
{
    const bool strict = rule == SCAN_STRICT;
    bool in_string = false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)text[i];
        if (!in_string) {
            if (strict && c < 0x20 && c != '\t' && c != '\n' && c != '\r') return i;
            in_string = c == '"';
        } else if (c == '"') {
            in_string = false;
        } else if (c < 0x20) {
            if (strict) return i;
        } else if (c == '\\') {
            char e = i + 1 < len ? text[i + 1] : 0;
            bool hex4 = e == 'u' && i + 5 < len;
            for (size_t k = i + 2; hex4 && k < i + 6; k++) hex4 = text[k] && strchr("0123456789abcdefABCDEF", text[k]);
            if (hex4 && !strict && memcmp(text + i + 2, "0000", 4) == 0) return i;
            if (hex4) i += 5;
            else if (e && strchr("\"\\/bfnrt", e)) i++;
            else if (strict) return i;
            else i++; /* not JSON: jm_json_parse refuses it; only the escaped byte is skipped here */
        }
    }
    return len;
}

jm_status jm_json_parse(const char *text, size_t len, const char *file, cJSON **out, jm_error *err)
{
    *out = NULL;
    size_t bad = 0;
    if (memchr(text, 0, len)) return jm_fail(err, JM_ERR_FORMAT, "%s: NUL byte in JSON", file);
    if (!valid_utf8((const unsigned char *)text, len, &bad))
        return jm_fail(err, JM_ERR_FORMAT, "%s: not valid UTF-8 at byte %zu", file, bad);
    if ((bad = json_scan(text, len, SCAN_STRICT)) < len)
        return jm_fail(err, JM_ERR_FORMAT, "%s: malformed JSON at byte %zu (%s)", file, bad,
                       text[bad] == '\\' ? "not a JSON escape" : "a raw control character");
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!root) {
        size_t at = end && end >= text ? (size_t)(end - text) : 0;
        return jm_fail(err, JM_ERR_FORMAT, "%s: malformed JSON near byte %zu", file, at);
    }
    while (end < text + len && (*end == ' ' || *end == '\n' || *end == '\r' || *end == '\t')) end++;
    if (end < text + len) {
        cJSON_Delete(root);
        return jm_fail(err, JM_ERR_FORMAT, "%s: malformed JSON: trailing data at byte %zu", file,
                       (size_t)(end - text));
    }
    const char *dup = NULL;
    int d = duplicate_key(root, &dup);
    if (d) {
        jm_status s = d < 0 ? jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", file)
                            : jm_fail(err, JM_ERR_FORMAT, "%s: duplicate key \"%s\"", file, dup);
        cJSON_Delete(root);
        return s;
    }
    *out = root;
    return JM_OK;
}

jm_status jm_json_no_nul(const char *text, size_t len, const char *file, jm_error *err)
{
    size_t at = json_scan(text, len, SCAN_NUL_ESCAPE);
    if (at < len)
        return jm_fail(err, JM_ERR_FORMAT, "%s: a string holds \\u0000 (NUL) at byte %zu of the JSON; names "
                       "and values cannot hold NUL", file, at);
    return JM_OK;
}

jm_status jm_write_json(const char *path, const cJSON *root, jm_error *err)
{
    char *text = root ? cJSON_Print(root) : NULL;
    if (!text) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
    jm_atomic_file a;
    jm_status s = jm_atomic_open(&a, path, err);
    if (!s) {
        if ((s = jm_atomic_write(&a, text, strlen(text), err)) || (s = jm_atomic_write(&a, "\n", 1, err)))
            jm_atomic_abort(&a);
        else
            s = jm_atomic_commit(&a, err);
    }
    cJSON_free(text);
    return s;
}

const char *jm_json_describe(const cJSON *j, char *buf, size_t cap)
{
    if (!j) snprintf(buf, cap, "missing");
    else if (cJSON_IsString(j))
        snprintf(buf, cap, "\"%.40s%s\"", j->valuestring, strlen(j->valuestring) > 40 ? "..." : "");
    else if (cJSON_IsNumber(j)) snprintf(buf, cap, "%.15g", j->valuedouble);
    else if (cJSON_IsBool(j)) snprintf(buf, cap, cJSON_IsTrue(j) ? "true" : "false");
    else if (cJSON_IsNull(j)) snprintf(buf, cap, "null");
    else snprintf(buf, cap, cJSON_IsArray(j) ? "an array" : "an object");
    return buf;
}

jm_status jm_fail_at(jm_error *err, jm_status s, const char *where, const char *fmt, ...)
{
    char why[sizeof err->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    return jm_fail(err, s, "%s: %s", where, why);
}
