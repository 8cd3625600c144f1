/* tpool.h: the engine's thread pool. One set of threads runs every weight product and (through
 * kvq_cache_set_thread_pool) every attention call of a forward pass.
 *
 * Why not OpenMP: a decode step is ~200 short parallel regions (7 weight products and an attention call per layer,
 * 10-100 us each on a small model). libgomp's workers that sleep between regions cost a futex wake-up each time:
 * measured on SmolLM2-135M (2-core AMD EPYC, `kvq bench --types f16 --depths 0 -n 64 -t 2`), 50 tok/s with the
 * workers as libgomp left them, 175 tok/s with GOMP_SPINCOUNT=100000 (~40% of the step was the kernel's scheduler
 * in `perf`). Making OpenMP spin is a process-wide setting read when libgomp loads, and then OpenBLAS's own threads
 * (prefill's sgemm) fight the spinning workers for the cores (prefill 190 -> 35 tok/s). This pool spins for a
 * bounded time after each job (a decode step's next product finds its workers awake), then sleeps, and runs the
 * sgemm of prefill itself: rows split over its threads, each calling a single-threaded BLAS.
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
