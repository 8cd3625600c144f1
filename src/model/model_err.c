#include "model_err.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char g_msg[512];

const char *kvqm_last_error(void) { return g_msg; }

void kvqm_clear_error(void) { g_msg[0] = '\0'; }

kvq_status kvqm_fail(kvq_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_msg, sizeof g_msg, fmt, ap);
    va_end(ap);
    return st;
}
