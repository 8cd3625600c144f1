/* The engine's thread pool (src/model/tpool.h) and libkvq's kvq_cache_set_thread_pool (kvq.h section 9):
 *   1. every task of every job runs exactly once, on a thread index < n, for pools of 1..5 threads that always
 *      sleep between jobs (spin 0), briefly spin, or spin the default; jobs of 0..37 tasks; the NULL pool;
 *   2. named errors for bad arguments (tpool_create, kvq_cache_set_thread_pool), the cache's pool unchanged;
 *   3. attention through a pool equals, bit for bit, attention through a serial stand-in with the same thread count
 *      (the same work split), decode and prefill, at several lengths; and the pool's threads really run tasks.
 * Runs in the tsan tier (scripts/test.sh), where a race in the pool's hand-off fails it. */
#include "testutil.h"

#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#include "tpool.h"

enum { MAXT = 37, JOBS = 400 };

typedef struct job {
    _Atomic int hits[MAXT];
    _Atomic int bad_thread;
    _Atomic unsigned long used; /* bit i: thread i ran a task */
    int n;
} job;

static void count_task(void *arg, int task, int thread) {
    job *j = arg;
    atomic_fetch_add(&j->hits[task], 1);
    if (thread < 0 || thread >= j->n) atomic_store(&j->bad_thread, 1);
    else atomic_fetch_or(&j->used, 1ul << thread);
    /* some work (~10 us), so that workers woken from sleep still find tasks */
    volatile double s = 0;
    for (int i = 0; i < 5000; i++) s += i * 0.5;
}

typedef struct rendezvous {
    _Atomic int started1, met;
} rendezvous;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void rendezvous_task(void *arg, int task, int thread) {
    (void)thread;
    rendezvous *r = arg;
    if (task == 1) {
        atomic_store(&r->started1, 1);
        return;
    }
    double t0 = now_s();
    while (!atomic_load(&r->started1) && now_s() - t0 < 5.0) sched_yield();
    atomic_store(&r->met, atomic_load(&r->started1));
}

static void check_pool(int n, int spin_us) {
    tpool *p;
    kvq_status st = tpool_create(n, spin_us, &p);
    CHECK(st == KVQ_OK, "tpool_create(%d, %d): %s", n, spin_us, kvq_last_error());
    if (st) return;
    CHECK(tpool_threads(p) == n, "threads %d, asked %d", tpool_threads(p), n);
    tpool_set_adaptive(p, 0); /* every job on all threads, however busy the machine (the adaptive mode: below) */
    int wrong = 0;
    unsigned long used = 0;
    static job j;
    atomic_store(&j.used, 0);
    for (int r = 0; r < JOBS; r++) {
        int nt = r % (MAXT + 1);
        for (int i = 0; i < MAXT; i++) atomic_store(&j.hits[i], 0);
        atomic_store(&j.bad_thread, 0);
        j.n = n;
        tpool_run(p, nt, count_task, &j);
        for (int i = 0; i < MAXT; i++) wrong += atomic_load(&j.hits[i]) != (i < nt);
        wrong += atomic_load(&j.bad_thread);
        used |= atomic_load(&j.used);
    }
    CHECK(wrong == 0, "%d threads, spin %d us: %d tasks run other than once (or on a bad thread index)", n, spin_us,
          wrong);
    CHECK(n == 1 ? used == 1 : (used & ~(n >= 64 ? 0ul : ~0ul << n)) == used, "%d threads: indices used %#lx", n, used);
    /* the workers take part: task 0 waits (up to 5 s) until task 1 has started, which only another thread can do
     * meanwhile (on a loaded machine a worker may take a while to be scheduled, never forever) */
    if (n > 1) {
        static rendezvous rv;
        int met = 0;
        for (int tries = 0; tries < 3 && !met; tries++) {
            atomic_store(&rv.started1, 0);
            atomic_store(&rv.met, 0);
            tpool_run(p, 2, rendezvous_task, &rv);
            met = atomic_load(&rv.met);
        }
        CHECK(met, "%d threads, spin %d us: task 1 never ran beside task 0 (no worker took part)", n, spin_us);
    }
    /* adaptive (the engine's mode): every task still runs once, wherever */
    tpool_set_adaptive(p, 1);
    for (int r = 0; r < 50; r++) {
        for (int i = 0; i < MAXT; i++) atomic_store(&j.hits[i], 0);
        tpool_run(p, MAXT, count_task, &j);
        for (int i = 0; i < MAXT; i++) wrong += atomic_load(&j.hits[i]) != 1;
    }
    CHECK(wrong == 0, "%d threads, adaptive: %d tasks run other than once", n, wrong);
    tpool_free(p);
}

static void check_errors(void) {
    tpool *p = (tpool *)&p;
    CHECK(tpool_create(-1, -1, &p) == KVQ_ERR_INVALID_ARG && p == NULL, "threads -1");
    CHECK(tpool_create(1025, -1, &p) == KVQ_ERR_INVALID_ARG, "threads 1025");
    CHECK(tpool_create(2, -2, &p) == KVQ_ERR_INVALID_ARG, "spin -2");
    CHECK(tpool_create(2, -1, NULL) == KVQ_ERR_NULL, "NULL out");
    CHECK(tpool_create(0, -1, &p) == KVQ_OK && tpool_threads(p) >= 1, "threads 0: the CPUs (%s)", kvq_last_error());
    tpool_free(p);
    tpool_free(NULL);
    CHECK(tpool_threads(NULL) == 1, "NULL pool: one thread");
    static job j;
    for (int i = 0; i < MAXT; i++) atomic_store(&j.hits[i], 0);
    j.n = 1;
    tpool_run(NULL, 5, count_task, &j);
    int ok = 1;
    for (int i = 0; i < MAXT; i++) ok &= atomic_load(&j.hits[i]) == (i < 5);
    CHECK(ok, "NULL pool runs every task on the caller");
}

/* The serial stand-in: the same thread count as the pool (the same work split in attn.c), tasks on the caller. */
typedef struct serial {
    int n;
    _Atomic int calls;
} serial;
static void serial_run(void *ctx, int n_tasks, kvq_task_fn fn, void *arg) {
    serial *s = ctx;
    atomic_fetch_add(&s->calls, 1);
    for (int i = 0; i < n_tasks; i++) fn(arg, i, i % s->n);
}

enum { L = 1, H = 2, D = 64, NQH = 4, T = 3000, NPRE = 7 };

static void check_attention(void) {
    const int NT = 3;
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = L, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = KVQ_TYPE_Q4, cfg.type_v = KVQ_TYPE_Q4;
    cfg.max_seqs = 2, cfg.n_threads = 1;
    cfg.arena_bytes = 2 * kvq_cache_arena_bytes_for(&cfg, T);
    kvq_cache *c;
    CHECK_OK(kvq_cache_create(&cfg, &c));
    if (!c) return;
    int32_t seq[2];
    CHECK_OK(kvq_seq_new(c, &seq[0]));
    CHECK_OK(kvq_seq_new(c, &seq[1]));
    float *k = malloc((size_t)T * H * D * sizeof *k), *v = malloc((size_t)T * H * D * sizeof *v);
    float *q = malloc((size_t)NPRE * NQH * D * sizeof *q);
    float *o1 = malloc((size_t)NPRE * NQH * D * sizeof *o1), *o2 = malloc((size_t)NPRE * NQH * D * sizeof *o2);
    if (!k || !v || !q || !o1 || !o2) abort();
    tu_seed(7);
    tu_fill_kv(k, v, T, H, D);
    for (int i = 0; i < NPRE * NQH * D; i++) q[i] = (float)tu_normal();
    tpool *p;
    CHECK_OK(tpool_create(NT, 100, &p));
    tpool_set_adaptive(p, 0);
    kvq_thread_pool tp = tpool_as_kvq(p);
    serial ser = {NT, 0};
    kvq_thread_pool sp = {NT, serial_run, &ser};
    kvq_attn_params ap = kvq_attn_params_default(NQH);
    int64_t done = 0, stops[] = {1, 40, 700, 2100, T};
    int mism = 0;
    for (size_t s = 0; s < sizeof stops / sizeof stops[0]; s++) {
        int32_t n = (int32_t)(stops[s] - done);
        for (int i = 0; i < 2; i++)
            CHECK_OK(kvq_append(c, 0, 1, &seq[i], &n, KVQ_DTYPE_F32, k + done * H * D, v + done * H * D));
        done = stops[s];
        int nq = done >= NPRE ? NPRE : 1;
        /* decode for both sequences, prefill of the last nq queries of sequence 0: pool vs serial, bitwise */
        CHECK_OK(kvq_cache_set_thread_pool(c, &tp));
        CHECK_OK(kvq_attn_decode(c, 0, 2, seq, q, o1, &ap));
        CHECK_OK(kvq_cache_set_thread_pool(c, &sp));
        CHECK_OK(kvq_attn_decode(c, 0, 2, seq, q, o2, &ap));
        mism += memcmp(o1, o2, (size_t)2 * NQH * D * sizeof *o1) != 0;
        CHECK_OK(kvq_cache_set_thread_pool(c, &tp));
        CHECK_OK(kvq_attn_prefill(c, 0, seq[0], nq, q, o1, &ap));
        CHECK_OK(kvq_cache_set_thread_pool(c, &sp));
        CHECK_OK(kvq_attn_prefill(c, 0, seq[0], nq, q, o2, &ap));
        mism += memcmp(o1, o2, (size_t)nq * NQH * D * sizeof *o1) != 0;
        /* and against the library's own threads (OpenMP or none): the same values up to the work split */
        CHECK_OK(kvq_cache_set_thread_pool(c, NULL));
        CHECK_OK(kvq_attn_prefill(c, 0, seq[0], nq, q, o2, &ap));
        double e = 0;
        for (int i = 0; i < nq * NQH * D; i++) e = fmax(e, fabs((double)o1[i] - o2[i]));
        CHECK(e < 1e-4, "%lld tokens: pool vs OpenMP prefill differ by %.3g", (long long)done, e);
    }
    CHECK(mism == 0, "%d of 10 attention calls through the pool differ from the serial split", mism);
    CHECK(atomic_load(&ser.calls) >= 5, "the serial stand-in ran %d times: kvq did not use the pool", atomic_load(&ser.calls));

    /* bad pools: named errors, the cache keeps its pool (the serial one: its call count still grows) */
    CHECK_OK(kvq_cache_set_thread_pool(c, &sp));
    kvq_thread_pool bad = sp;
    bad.run = NULL;
    CHECK_ERR(kvq_cache_set_thread_pool(c, &bad), KVQ_ERR_NULL);
    bad = sp, bad.n_threads = 0;
    CHECK_ERR(kvq_cache_set_thread_pool(c, &bad), KVQ_ERR_INVALID_ARG);
    bad.n_threads = 1025;
    CHECK_ERR(kvq_cache_set_thread_pool(c, &bad), KVQ_ERR_INVALID_ARG);
    CHECK_ERR(kvq_cache_set_thread_pool(NULL, &sp), KVQ_ERR_NULL);
    int before = atomic_load(&ser.calls);
    CHECK_OK(kvq_attn_decode(c, 0, 2, seq, q, o1, &ap));
    CHECK(atomic_load(&ser.calls) == before + 1, "after the rejected pools the cache still runs on its own");
    kvq_cache_free(c);
    tpool_free(p);
    free(k), free(v), free(q), free(o1), free(o2);
}

int main(void) {
    check_errors();
    int ns[] = {1, 2, 3, 5}, spins[] = {0, 50, -1};
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
        for (size_t s = 0; s < sizeof spins / sizeof spins[0]; s++) check_pool(ns[i], spins[s]);
    check_attention();
    if (tu_failures) {
        fprintf(stderr, "test_tpool: %d checks failed\n", tu_failures);
        return 1;
    }
    printf("test_tpool: all passed\n");
    return 0;
}
