/* tpool.c: the engine's thread pool (tpool.h). A job is published by bumping a generation counter; idle workers poll
 * it for spin_us, then sleep on a condition variable. The caller takes tasks too, then waits for the workers. */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "tpool.h"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "model_err.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

typedef struct worker {
    tpool *p;
    int id;
} worker;

struct tpool {
    int n;           /* threads, the caller included */
    int64_t spin_ns; /* how long a waiting thread polls before it sleeps */
    int adaptive;    /* jobs run on the caller alone while the machine is oversubscribed (contended()) */
    pthread_t *th;   /* [n - 1] */
    worker *w;       /* [n - 1] */
    /* the job: written by tpool_run before it bumps gen (release), read by workers after they see gen (acquire) */
    kvq_task_fn fn;
    void *arg;
    int n_tasks;
    _Atomic int next;     /* the next task to take */
    _Atomic int busy;     /* workers that have not finished the job */
    _Atomic unsigned gen; /* bumped for each job and for stop */
    _Atomic int stop;
    _Atomic int sleepers;       /* workers in (or entering) the condition wait */
    _Atomic int caller_waiting; /* tpool_run sleeps on `done` until busy is 0 */
    pthread_mutex_t mu;
    pthread_cond_t cv, done;
};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void take_tasks(tpool *p, int id) {
    for (;;) {
        int i = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (i >= p->n_tasks) return;
        p->fn(p->arg, i, id);
    }
}

/* Polling with a back-off, then sleep. A wait first polls with pause (a decode step's products are 10-100 us apart,
 * so a worker polling finds the next one awake), then from YIELD_NS with sched_yield between polls, and after
 * spin_ns it sleeps on the condition variable. On a machine with spare cores the yield returns at once; on an
 * oversubscribed one (another job, more threads than cores) the yields and the sleep give the core back to whoever
 * can use it, maybe the very worker this thread waits for: polling without them made decode steps ~10-70x slower
 * beside another 2-thread job on 2 cores (measured: SmolLM2 q4 at 87-844 ms/step). */
#define YIELD_NS 50000
#define CALLER_SPIN_NS 20000
static void backoff(unsigned it, int64_t *t0, int64_t *waited) {
    if (it % 16) {
        cpu_relax();
        return;
    }
    int64_t t = now_ns();
    if (!*t0) *t0 = t;
    *waited = t - *t0;
    if (*waited >= YIELD_NS) sched_yield();
}

/* Whether the machine has more runnable threads than CPUs (the 4th field of /proc/loadavg, "running/total", counts
 * this pool's polling threads too), read at most every 20 ms. Polling on such a machine costs more than it saves:
 * the scheduler is fair to the threads that slept, so a thread that burnt its share polling is the last to get a core
 * when its task is ready (measured beside another 2-thread job on 2 cores: SmolLM2 q4 decode 87-844 ms/step with
 * unbounded polling, 11-20 ms/step with this pool, 12-39 ms/step with libgomp's passive threads, 37 on one thread).
 * There the caller runs the job alone, and the idle workers go to sleep. Without /proc/loadavg: never contended. */
static int contended(void) {
    static _Atomic int64_t checked;
    static _Atomic int busy_machine;
    static _Atomic int n_cpus;
    int64_t t = now_ns(), c = atomic_load_explicit(&checked, memory_order_relaxed);
    if (t - c < 20000000 || !atomic_compare_exchange_strong(&checked, &c, t))
        return atomic_load_explicit(&busy_machine, memory_order_relaxed);
    int nc = atomic_load_explicit(&n_cpus, memory_order_relaxed);
    if (!nc) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        atomic_store_explicit(&n_cpus, nc = n > 0 ? (int)n : 1, memory_order_relaxed);
    }
    int running = 0, fd = open("/proc/loadavg", O_RDONLY);
    if (fd >= 0) {
        char buf[128];
        ssize_t len = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (len > 0) {
            buf[len] = 0;
            double a, b, d;
            if (sscanf(buf, "%lf %lf %lf %d/", &a, &b, &d, &running) != 4) running = 0;
        }
    }
    atomic_store_explicit(&busy_machine, running > nc, memory_order_relaxed);
    return running > nc;
}

/* Waits until gen differs from `seen`; returns it. */
static unsigned wait_job(tpool *p, unsigned seen) {
    unsigned g;
    int64_t t0 = 0, waited = 0;
    for (unsigned it = 1;; it++) {
        if ((g = atomic_load_explicit(&p->gen, memory_order_acquire)) != seen) return g;
        if (waited >= p->spin_ns) break;
        backoff(it, &t0, &waited);
    }
    /* Sleep. sleepers is raised before gen is read again and tpool_run bumps gen before it reads sleepers (both
     * sequentially consistent), so either this thread sees the new gen or tpool_run sees a sleeper and signals
     * under the mutex, which this thread holds until it waits. */
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->sleepers, 1);
    while ((g = atomic_load(&p->gen)) == seen) pthread_cond_wait(&p->cv, &p->mu);
    atomic_fetch_sub(&p->sleepers, 1);
    pthread_mutex_unlock(&p->mu);
    return g;
}

static void *worker_main(void *a) {
    worker *w = a;
    tpool *p = w->p;
    unsigned seen = 0;
    for (;;) {
        seen = wait_job(p, seen);
        if (atomic_load_explicit(&p->stop, memory_order_acquire)) return NULL;
        take_tasks(p, w->id);
        if (atomic_fetch_sub(&p->busy, 1) == 1 && atomic_load(&p->caller_waiting)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

static int cpus_available(void) {
#ifdef CPU_COUNT
    cpu_set_t s;
    if (sched_getaffinity(0, sizeof s, &s) == 0 && CPU_COUNT(&s) > 0) return CPU_COUNT(&s);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)(n < 1024 ? n : 1024) : 1;
}

/* Wakes every worker for a new generation (a job or stop). */
static void publish(tpool *p) {
    atomic_fetch_add(&p->gen, 1);
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
}

static void stop_workers(tpool *p, int started) {
    atomic_store_explicit(&p->stop, 1, memory_order_release);
    publish(p);
    for (int i = 0; i < started; i++) pthread_join(p->th[i], NULL);
}

kvq_status tpool_create(int n_threads, int spin_us, tpool **out) {
    if (!out) return kvqm_fail(KVQ_ERR_NULL, "tpool_create: NULL out");
    *out = NULL;
    if (n_threads < 0 || n_threads > 1024)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "threads %d outside 0..1024", n_threads);
    if (spin_us < -1 || spin_us > 1000000)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "spin %d us outside -1..1000000", spin_us);
    if (spin_us == -1) {
        const char *e = getenv("KVQ_SPIN_US");
        char *end;
        long v = e && *e ? strtol(e, &end, 10) : -1;
        spin_us = e && *e && !*end && v >= 0 && v <= 1000000 ? (int)v : TPOOL_SPIN_US;
    }
    tpool *p = calloc(1, sizeof *p);
    if (!p) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "out of memory for the thread pool");
    p->n = n_threads ? n_threads : cpus_available();
    p->spin_ns = (int64_t)spin_us * 1000;
    p->adaptive = 1;
    if (pthread_mutex_init(&p->mu, NULL)) {
        free(p);
        return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "thread pool: pthread_mutex_init failed");
    }
    if (pthread_cond_init(&p->cv, NULL)) {
        pthread_mutex_destroy(&p->mu);
        free(p);
        return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "thread pool: pthread_cond_init failed");
    }
    if (pthread_cond_init(&p->done, NULL)) {
        pthread_cond_destroy(&p->cv);
        pthread_mutex_destroy(&p->mu);
        free(p);
        return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "thread pool: pthread_cond_init failed");
    }
    int started = 0;
    if (p->n > 1) {
        p->th = malloc((size_t)(p->n - 1) * sizeof *p->th);
        p->w = malloc((size_t)(p->n - 1) * sizeof *p->w);
        if (p->th && p->w)
            for (; started < p->n - 1; started++) {
                p->w[started] = (worker){p, started + 1};
                if (pthread_create(&p->th[started], NULL, worker_main, &p->w[started])) break;
            }
        if (started < p->n - 1) {
            int want = p->n;
            stop_workers(p, started);
            p->n = 1; /* tpool_free: no workers left to stop */
            tpool_free(p);
            return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "thread pool: %d of %d threads started", started + 1, want);
        }
    }
    *out = p;
    return KVQ_OK;
}

void tpool_free(tpool *p) {
    if (!p) return;
    stop_workers(p, p->n - 1);
    pthread_cond_destroy(&p->done);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p->th), free(p->w), free(p);
}

int tpool_threads(const tpool *p) { return p ? p->n : 1; }

void tpool_set_adaptive(tpool *p, int on) {
    if (p) p->adaptive = on != 0;
}

void tpool_run(void *pp, int n_tasks, kvq_task_fn fn, void *arg) {
    tpool *p = pp;
    if (!p || p->n == 1 || n_tasks <= 1 || (p->adaptive && contended())) {
        for (int i = 0; i < n_tasks; i++) fn(arg, i, 0);
        return;
    }
    p->fn = fn, p->arg = arg, p->n_tasks = n_tasks;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    atomic_store_explicit(&p->busy, p->n - 1, memory_order_relaxed);
    publish(p);
    take_tasks(p, 0);
    /* The caller polls only briefly for the workers' last tasks, then sleeps: a worker that holds a task but has no
     * core (another job, or this very thread on its core) finishes sooner when the caller gives its core up; a
     * caller that polled until it was preempted cost a scheduler time slice (~3.5 ms) per product (SmolLM2 q4:
     * 844 ms per decode step beside another job). */
    int64_t t0 = 0, waited = 0;
    for (unsigned it = 1; atomic_load_explicit(&p->busy, memory_order_acquire) > 0; it++) {
        if (waited >= CALLER_SPIN_NS) {
            /* the same handshake as the workers' sleep, on caller_waiting and busy */
            pthread_mutex_lock(&p->mu);
            atomic_store(&p->caller_waiting, 1);
            while (atomic_load(&p->busy) > 0) pthread_cond_wait(&p->done, &p->mu);
            atomic_store(&p->caller_waiting, 0);
            pthread_mutex_unlock(&p->mu);
            break;
        }
        backoff(it, &t0, &waited);
    }
}

kvq_thread_pool tpool_as_kvq(tpool *p) {
    return (kvq_thread_pool){.n_threads = tpool_threads(p), .run = tpool_run, .ctx = p};
}
