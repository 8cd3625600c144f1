/* The threading contract of kvq.h section 2, exercised with pthreads (and checked by TSan in the tsan tier):
 *   1. readers: several threads run the const calls (decode, prefill, read, stats, lengths, views) on one shared
 *      cache at once; every result must equal the single-threaded one, bit for bit.
 *   2. writer then readers: one thread appends and forks (exclusive access), then hands the cache to the readers
 *      through a barrier; every round the readers must see exactly the writer's new state.
 *   3. independent caches: threads create, fill, fork, truncate and free private caches while others read the
 *      shared one (no hidden global state: table init, kernel choice, error messages).
 *   4. kvq_last_error is per thread: a thread's failing call never shows another thread's message.
 * Under TSan a data race in kvq makes the run fail (TSAN_OPTIONS=halt_on_error=1 in the tier, exitcode 66 else). */
#define _POSIX_C_SOURCE 200809L /* pthread barriers under -std=c17 */
#include "testutil.h"

#include <pthread.h>
#include <sched.h>

enum { NT = 4, L = 2, H = 2, D = 64, NQH = 4, NSEQ = 3, ROUNDS = 12, NPRE = 5 };

static kvq_cache *g_cache;
static int32_t g_seq[NSEQ + 1]; /* the last one is a fork */
static const int g_nseq = NSEQ + 1;
static float g_q[(NSEQ + 1) * NQH * D], g_qp[NPRE * NQH * D];
static pthread_barrier_t g_bar;

/* Everything a reader computes from the shared cache, compared bitwise across threads. */
typedef struct snap {
    float dec[L][(NSEQ + 1) * NQH * D];
    float pre[L][NPRE * NQH * D];
    float rd[L][8 * H * D];
    int64_t len[NSEQ + 1][L];
    int64_t pages_free, tokens;
    int n_seqs;
    int64_t view_tokens;
    int32_t view_pages, view_page0;
    kvq_status st;
} snap;

static void take(snap *s) {
    memset(s, 0, sizeof *s);
    kvq_attn_params p = kvq_attn_params_default(NQH);
    for (int l = 0; l < L && !s->st; l++) {
        s->st = kvq_attn_decode(g_cache, l, g_nseq, g_seq, g_q, s->dec[l], &p);
        if (!s->st) s->st = kvq_attn_prefill(g_cache, l, g_seq[0], NPRE, g_qp, s->pre[l], &p);
        if (!s->st) s->st = kvq_read(g_cache, g_seq[1], l, 3, 8, s->rd[l], NULL);
        for (int i = 0; i < g_nseq && !s->st; i++) s->st = kvq_seq_length(g_cache, g_seq[i], l, &s->len[i][l]);
    }
    kvq_cache_stats st;
    if (!s->st) s->st = kvq_cache_get_stats(g_cache, &st);
    if (!s->st) s->pages_free = st.pages_free, s->tokens = st.tokens, s->n_seqs = st.n_seqs;
    kvq_seq_view v;
    if (!s->st) s->st = kvq_seq_view_get(g_cache, g_seq[g_nseq - 1], 1, &v);
    if (!s->st) {
        s->view_tokens = v.paged_tokens + v.window_tokens;
        s->view_pages = v.n_pages;
        s->view_page0 = v.n_pages ? v.pages[0] : -1;
    }
    kvq_cache_config cfg;
    if (!s->st) s->st = kvq_cache_get_config(g_cache, &cfg, NULL);
    (void)kvq_cpu_backend();
}

static int same(const snap *a, const snap *b) { return memcmp(a, b, sizeof *a) == 0; }

static void append_all(int n, uint64_t seed) {
    float *k = malloc((size_t)n * g_nseq * H * D * sizeof *k), *v = malloc((size_t)n * g_nseq * H * D * sizeof *v);
    int32_t nt[NSEQ + 1];
    tu_seed(seed);
    tu_fill_kv(k, v, (size_t)n * g_nseq, H, D);
    for (int i = 0; i < g_nseq; i++) nt[i] = n;
    for (int l = 0; l < L; l++) CHECK_OK(kvq_append(g_cache, l, g_nseq, g_seq, nt, KVQ_DTYPE_F32, k, v));
    free(k);
    free(v);
}

/* ---- 1 and 4: concurrent readers ---- */
typedef struct reader_arg {
    int id;
    const snap *ref;
    int bad;
} reader_arg;

static void *reader(void *p) {
    reader_arg *a = p;
    snap *s = malloc(sizeof *s);
    for (int it = 0; it < 3; it++) {
        take(s);
        if (s->st || !same(s, a->ref)) a->bad++;
        /* a failing call's message must be this thread's own, whatever the others are doing */
        int64_t len;
        int32_t bogus = 1000 + a->id;
        char want[32];
        snprintf(want, sizeof want, "sequence %d ", (int)bogus);
        if (kvq_seq_length(g_cache, bogus, 0, &len) != KVQ_ERR_NO_SEQ) a->bad++;
        sched_yield();
        if (!strstr(kvq_last_error(), want)) a->bad++;
    }
    free(s);
    return NULL;
}

/* ---- 2: one writer, then readers, through a barrier ---- */
static snap g_round_ref, g_round_out[NT];

static void *round_reader(void *p) {
    int id = *(int *)p;
    for (int r = 0; r < ROUNDS; r++) {
        pthread_barrier_wait(&g_bar); /* the writer finished round r */
        take(&g_round_out[id]);
        pthread_barrier_wait(&g_bar); /* readers done: the writer may change the cache again */
    }
    return NULL;
}

/* ---- 3: private caches in other threads ---- */
static void *private_cache(void *p) {
    int *bad = p;
    kvq_cache_config c = kvq_cache_config_default();
    c.n_layers = 1, c.n_kv_heads = H, c.head_dim = D, c.type_k = KVQ_TYPE_Q2, c.type_v = KVQ_TYPE_FP8;
    c.residual = 16, c.group = 16, c.page_tokens = 16, c.max_seqs = 4, c.n_threads = 2;
    c.arena_bytes = kvq_cache_arena_bytes_for(&c, 256) * 3;
    enum { T = 100 };
    float *k = malloc(T * H * D * sizeof *k), *v = malloc(T * H * D * sizeof *v), q[NQH * D], out[NQH * D];
    for (int i = 0; i < T * H * D; i++) k[i] = (float)((i * 7919) % 61 - 30) / 8, v[i] = (float)((i * 104729) % 53 - 26) / 8;
    for (int i = 0; i < NQH * D; i++) q[i] = (float)(i % 13 - 6) / 4;
    kvq_attn_params ap = kvq_attn_params_default(NQH);
    for (int it = 0; it < 4; it++) {
        kvq_cache *cc = NULL;
        int32_t s, f, n = T;
        if (kvq_cache_create(&c, &cc) || kvq_seq_new(cc, &s) || kvq_append(cc, 0, 1, &s, &n, KVQ_DTYPE_F32, k, v) ||
            kvq_seq_fork(cc, s, &f) || kvq_seq_truncate(cc, f, 37) || kvq_attn_decode(cc, 0, 1, &f, q, out, &ap) ||
            kvq_seq_free(cc, s))
            (*bad)++;
        kvq_cache_free(cc);
    }
    free(k);
    free(v);
    return NULL;
}

int main(void) {
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = L, cfg.n_kv_heads = H, cfg.head_dim = D;
    cfg.type_k = KVQ_TYPE_Q4, cfg.type_v = KVQ_TYPE_Q8; /* grouped keys: pages and residual windows both read */
    cfg.residual = 32, cfg.group = 32, cfg.page_tokens = 32, cfg.max_seqs = 8;
    cfg.n_threads = 2; /* OpenMP regions inside each reader's call, where OpenMP is on */
    cfg.arena_bytes = kvq_cache_arena_bytes_for(&cfg, 1024) * (NSEQ + 2);
    CHECK_OK(kvq_cache_create(&cfg, &g_cache));
    if (!g_cache) return tu_finish("test_threads");
    for (int i = 0; i < NSEQ; i++) CHECK_OK(kvq_seq_new(g_cache, &g_seq[i]));
    g_seq[NSEQ] = g_seq[0]; /* placeholder until the fork exists: append_all appends to NSEQ distinct sequences */
    {
        /* 200 tokens in each of NSEQ sequences, then a fork of the first with 40 more of its own */
        float *k = malloc(200 * NSEQ * H * D * sizeof *k), *v = malloc(200 * NSEQ * H * D * sizeof *v);
        int32_t nt[NSEQ] = {200, 200, 200};
        tu_fill_kv(k, v, 200 * NSEQ, H, D);
        for (int l = 0; l < L; l++) CHECK_OK(kvq_append(g_cache, l, NSEQ, g_seq, nt, KVQ_DTYPE_F32, k, v));
        free(k);
        free(v);
    }
    CHECK_OK(kvq_seq_fork(g_cache, g_seq[0], &g_seq[NSEQ]));
    append_all(40, 7);
    for (size_t i = 0; i < sizeof g_q / sizeof g_q[0]; i++) g_q[i] = (float)tu_normal();
    for (size_t i = 0; i < sizeof g_qp / sizeof g_qp[0]; i++) g_qp[i] = (float)tu_normal();

    /* 1, 3, 4: readers on the shared cache alongside private-cache writers */
    snap *ref = malloc(sizeof *ref);
    take(ref);
    CHECK(ref->st == KVQ_OK, "reference snapshot: %s", kvq_last_error());
    pthread_t th[NT], pw[2];
    reader_arg ra[NT];
    int pbad[2] = {0, 0};
    for (int i = 0; i < 2; i++) CHECK(pthread_create(&pw[i], NULL, private_cache, &pbad[i]) == 0, "pthread_create");
    for (int i = 0; i < NT; i++) {
        ra[i] = (reader_arg){.id = i, .ref = ref};
        CHECK(pthread_create(&th[i], NULL, reader, &ra[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < NT; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++) pthread_join(pw[i], NULL);
    for (int i = 0; i < NT; i++) CHECK(ra[i].bad == 0, "reader %d: %d results differ from the single-threaded ones", i, ra[i].bad);
    for (int i = 0; i < 2; i++) CHECK(pbad[i] == 0, "private cache thread %d: %d failing calls", i, pbad[i]);
    snap *again = malloc(sizeof *again);
    take(again);
    CHECK(same(again, ref), "the readers changed the shared cache");

    /* 2: writer then readers */
    int ids[NT];
    CHECK(pthread_barrier_init(&g_bar, NULL, NT + 1) == 0, "barrier");
    for (int i = 0; i < NT; i++) {
        ids[i] = i;
        CHECK(pthread_create(&th[i], NULL, round_reader, &ids[i]) == 0, "pthread_create");
    }
    int64_t len0 = ref->len[0][0];
    for (int r = 0; r < ROUNDS; r++) {
        append_all(1 + r % 3 * 13, 100 + r); /* crosses page and group boundaries over the rounds */
        len0 += 1 + r % 3 * 13;
        take(&g_round_ref);
        CHECK(g_round_ref.st == KVQ_OK && g_round_ref.len[0][0] == len0, "round %d: writer's state", r);
        pthread_barrier_wait(&g_bar);
        pthread_barrier_wait(&g_bar);
        for (int i = 0; i < NT; i++) CHECK(same(&g_round_out[i], &g_round_ref), "round %d: reader %d saw another state", r, i);
    }
    for (int i = 0; i < NT; i++) pthread_join(th[i], NULL);
    pthread_barrier_destroy(&g_bar);
    free(ref);
    free(again);
    kvq_cache_free(g_cache);
    return tu_finish("test_threads");
}
