#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local char last_error[512];

_Thread_local int64_t kvq__alloc_fail_in = 0;

/* true when the test hook says this allocation fails */
static bool fail_now(void) { return kvq__alloc_fail_in > 0 && --kvq__alloc_fail_in == 0; }

void *kvq__malloc(size_t n) { return fail_now() ? NULL : malloc(n); }
void *kvq__calloc(size_t n, size_t size) { return fail_now() ? NULL : calloc(n, size); }
void *kvq__realloc(void *p, size_t n) { return fail_now() ? NULL : realloc(p, n); }
void *kvq__aligned_alloc(size_t align, size_t n) { return fail_now() ? NULL : aligned_alloc(align, n); }

kvq_status kvq_set_error_v(kvq_status s, const char *fmt, va_list ap) {
    /* formatted aside first: callers often pass kvq_last_error() itself as an argument ("ctx: %s") */
    char msg[sizeof last_error];
    vsnprintf(msg, sizeof msg, fmt, ap);
    memcpy(last_error, msg, sizeof msg);
    return s;
}

kvq_status kvq_set_error(kvq_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    kvq_set_error_v(s, fmt, ap);
    va_end(ap);
    return s;
}

const char *kvq_last_error(void) { return last_error; }

const char *kvq_strerror(kvq_status s) {
    switch (s) {
    case KVQ_OK: return "ok";
    case KVQ_ERR_NULL: return "NULL argument";
    case KVQ_ERR_INVALID_ARG: return "invalid argument";
    case KVQ_ERR_UNSUPPORTED_TYPE: return "unsupported KV type";
    case KVQ_ERR_UNSUPPORTED_HEAD_DIM: return "unsupported head dimension";
    case KVQ_ERR_SHAPE: return "shape mismatch";
    case KVQ_ERR_NO_SEQ: return "no such sequence";
    case KVQ_ERR_CACHE_FULL: return "cache full";
    case KVQ_ERR_TOO_MANY_SEQS: return "too many sequences";
    case KVQ_ERR_NONFINITE: return "non-finite or out-of-range value in K/V";
    case KVQ_ERR_OUT_OF_MEMORY: return "out of memory";
    case KVQ_ERR_RANGE: return "token range out of bounds";
    case KVQ_ERR_CUDA: return "CUDA error";
    case KVQ_ERR_NO_DEVICE: return "no CUDA device";
    case KVQ_ERR_IO: return "I/O error";
    case KVQ_ERR_FORMAT: return "corrupt file";
    case KVQ_ERR_TRUNCATED: return "truncated file";
    case KVQ_ERR_INTERNAL: return "internal error";
    }
    return "unknown status code";
}

unsigned kvq_version_number(void) { return KVQ_VERSION_NUMBER; }

const char *kvq_version_string(void) {
#define KVQ_STR2(x) #x
#define KVQ_STR(x) KVQ_STR2(x)
    return KVQ_STR(KVQ_VERSION_MAJOR) "." KVQ_STR(KVQ_VERSION_MINOR) "." KVQ_STR(KVQ_VERSION_PATCH);
}
