/* Allocation-failure injection (tests/failalloc.c): executables linked through kvq_failalloc_link() (tests/
 * failalloc.cmake) have every malloc, calloc, realloc, aligned_alloc, posix_memalign, strdup and strndup call of
 * their own objects and of the static kvq libraries routed through counting wrappers (ld --wrap). Allocations made
 * inside shared libraries (libc's stdio, libgomp, OpenBLAS) are not counted: the point is kvq's own error paths.
 *   KVQ_FAILALLOC_N=n      the n-th counted call fails (returns NULL, errno ENOMEM); later calls succeed
 *   KVQ_FAILALLOC_COUNT=1  print "failalloc: N allocations" on stderr at exit */
#ifndef KVQ_FAILALLOC_H
#define KVQ_FAILALLOC_H

/* In-process control, for drivers that fail one call at a time: counting restarts, and the n-th call from now
 * fails (n = 0: none). */
void kvq_failalloc_arm(long n);
/* Counted calls since the last kvq_failalloc_arm (or since start). */
long kvq_failalloc_calls(void);
/* 1 once the armed call has failed. */
int kvq_failalloc_fired(void);

#endif
