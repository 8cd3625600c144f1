#include "model_err.h"

#include <stdarg.h>
#include <stdio.h>

const char *kvqm_last_error(void) { return kvq_last_error(); }

void kvqm_clear_error(void) { kvq_set_error(KVQ_OK, "%s", ""); }

kvq_status kvqm_fail(kvq_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    kvq_set_error_v(st, fmt, ap);
    va_end(ap);
    return st;
}
