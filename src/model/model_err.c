#include "model_err.h"

#include <stdarg.h>
#include <stdio.h>

const char *kvqm_last_error(void) { return kvq_last_error(); }

void kvqm_clear_error(void) { kvq_set_error(KVQ_OK, "%s", ""); }

kvq_status kvqm_fail(kvq_status st, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return kvq_set_error(st, "%s", msg);
}
