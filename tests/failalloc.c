/* Counting allocation wrappers for allocation-failure tests; see failalloc.h. The __real_* functions are the libc
 * (or, in sanitizer builds, the ASan/LSan-intercepted) allocators, so ASan still checks every byte and LSan still
 * reports what an error path forgot to free. */
#define _GNU_SOURCE
#include "failalloc.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t m);
void *__real_realloc(void *p, size_t n);
void *__real_aligned_alloc(size_t a, size_t n);
int __real_posix_memalign(void **p, size_t a, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t n, size_t m);
void *__wrap_realloc(void *p, size_t n);
void *__wrap_aligned_alloc(size_t a, size_t n);
int __wrap_posix_memalign(void **p, size_t a, size_t n);
char *__wrap_strdup(const char *s);
char *__wrap_strndup(const char *s, size_t n);

static atomic_long calls, fail_at;
static atomic_int fired, report;

void kvq_failalloc_arm(long n) {
    atomic_store(&fail_at, 0);
    atomic_store(&calls, 0);
    atomic_store(&fired, 0);
    atomic_store(&fail_at, n);
}
long kvq_failalloc_calls(void) { return atomic_load(&calls); }
int kvq_failalloc_fired(void) { return atomic_load(&fired); }

static void print_count(void) { fprintf(stderr, "failalloc: %ld allocations\n", atomic_load(&calls)); }

/* Before main: nothing of kvq has run yet, so the env decides from the first counted call on. */
__attribute__((constructor)) static void failalloc_init(void) {
    const char *n = getenv("KVQ_FAILALLOC_N"), *c = getenv("KVQ_FAILALLOC_COUNT");
    if (n && *n) kvq_failalloc_arm(strtol(n, NULL, 10));
    if (c && *c && *c != '0' && !atomic_exchange(&report, 1)) atexit(print_count);
}

/* 1 when this call is the one to fail. */
static int should_fail(void) {
    long k = atomic_fetch_add(&calls, 1) + 1, at = atomic_load(&fail_at);
    if (at <= 0 || k != at) return 0;
    atomic_store(&fired, 1);
    if (getenv("KVQ_FAILALLOC_N")) fprintf(stderr, "failalloc: failing allocation #%ld\n", k);
    errno = ENOMEM;
    return 1;
}

void *__wrap_malloc(size_t n) { return should_fail() ? NULL : __real_malloc(n); }
void *__wrap_calloc(size_t n, size_t m) { return should_fail() ? NULL : __real_calloc(n, m); }
/* a failing realloc leaves the block as it was, as the real one does */
void *__wrap_realloc(void *p, size_t n) { return should_fail() ? NULL : __real_realloc(p, n); }
void *__wrap_aligned_alloc(size_t a, size_t n) { return should_fail() ? NULL : __real_aligned_alloc(a, n); }
int __wrap_posix_memalign(void **p, size_t a, size_t n) { return should_fail() ? ENOMEM : __real_posix_memalign(p, a, n); }
char *__wrap_strdup(const char *s) { return __wrap_strndup(s, strlen(s)); }
char *__wrap_strndup(const char *s, size_t n) {
    size_t len = strnlen(s, n);
    char *d = __wrap_malloc(len + 1);
    if (!d) return NULL;
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}
