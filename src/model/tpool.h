/* tpool.h: the engine's thread pool. One set of threads runs every weight product and (through
 * kvq_cache_set_thread_pool) every attention call of a forward pass.
 *
 * Why not OpenMP: a decode step is ~250 short parallel regions (7 weight products and an attention call per layer,
 * 10-100 us each on a small model). Workers that sleep between regions pay a futex wake-up each time: SmolLM2-135M
 * on 2 cores (`kvq bench --types f16 --depths 0 -n 64 -t 2`) ran at 50 tok/s with libgomp's passive threads and
 * 175 tok/s with GOMP_SPINCOUNT=100000 (`perf`: ~40% of the step in the scheduler). But libgomp's spinning is a
 * process-wide setting read when it loads, and OpenBLAS's own threads (prefill's sgemm) then fight the spinning
 * workers for the cores (prefill 190 -> 35 tok/s). This pool polls for a bounded time after each job, so a decode
 * step's next product finds its workers awake, then sleeps; it runs prefill's sgemm itself (rows split over its
 * threads, each calling a single-threaded BLAS); and on an oversubscribed machine (more runnable threads than CPUs)
 * it runs jobs on the caller alone, since polling threads lose their cores there (tpool.c, contended()).
 *
 * Threads: n (the caller included); the caller runs tasks too and returns when every task has returned. One job at
 * a time: tpool_run is not reentrant and must be called from one thread at a time. */
#ifndef KVQ_TPOOL_H
#define KVQ_TPOOL_H

#include "kvq.h"

typedef struct tpool tpool;

/* n_threads: 1..1024, or 0 for the CPUs this process may run on. spin_us: how long a waiting thread (an idle worker,
 * or the caller waiting for the workers) polls before it sleeps (-1: TPOOL_SPIN_US, or KVQ_SPIN_US from the
 * environment). KVQ_ERR_INVALID_ARG, KVQ_ERR_OUT_OF_MEMORY (also when a thread cannot be started). */
#define TPOOL_SPIN_US 1000
kvq_status tpool_create(int n_threads, int spin_us, tpool **out);
void tpool_free(tpool *p);
int tpool_threads(const tpool *p);
/* On (the default): while the machine has more runnable threads than CPUs, jobs run on the caller alone (tpool.c,
 * contended(): polling threads lose their cores there). Off: every job on all threads (tests). */
void tpool_set_adaptive(tpool *p, int on);
/* fn(arg, task, thread) for every task in 0..n_tasks-1 (taken dynamically, in increasing order), thread in
 * 0..n-1 (0 is the caller). p NULL: every task on the caller, thread 0. The signature of kvq_thread_pool.run. */
void tpool_run(void *p, int n_tasks, kvq_task_fn fn, void *arg);
/* The pool as libkvq's attention takes it (kvq_cache_set_thread_pool). */
kvq_thread_pool tpool_as_kvq(tpool *p);

#endif
