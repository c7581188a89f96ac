/* error.c — status names and error messages. */
#include "base/base.h"

#include <stdio.h>

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

jm_status jm_fail(jm_error *err, jm_status s, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        /* one line: messages may quote file content */
        for (char *p = err->msg; *p; p++)
            if (*p == '\n' || *p == '\r') *p = ' ';
    }
    return s;
}
