/* Allocation failure in the cache API: a scripted workload (create, seq_new, appends across pages and groups, fork,
 * copy-on-write append, truncate, decode, prefill, exact prefill, read, free) where each call is first run with its
 * 1st, 2nd, ... allocation failing (tests/failalloc.c) until it runs through without reaching the failing one.
 * Every failed call must return KVQ_ERR_OUT_OF_MEMORY with a message and leave the cache exactly as it was (full
 * read-back snapshot); a call whose allocation failed must not report success. LSan (sanitizer tier) checks that
 * nothing leaks.
 *   test_failalloc_cache create     kvq_cache_create alone, several configurations
 *   test_failalloc_cache workload   the workload above, on a grouped (q4/q8) and a per-token (f16/fp8) cache, and a
 *                                   pre-RoPE q3/q4 cache (kvq.h section 10), and a q4/q8 cache with SQuat subspaces */
#include "failalloc.h"
#include "testutil.h"

enum { H = 2, D = 64, NQH = 4, MAXS = 4, LAYERS = 2 };

static kvq_cache *C;
static long g_calls, g_injected; /* calls checked, injected failures */

/* Everything observable through the const API. */
typedef struct snap {
    int live[MAXS];
    int64_t len[MAXS][LAYERS];
    float *kv[MAXS][LAYERS][2];
    kvq_cache_stats st;
} snap;

static void snap_take(snap *s) {
    memset(s, 0, sizeof *s);
    CHECK_OK(kvq_cache_get_stats(C, &s->st));
    for (int q = 0; q < MAXS; q++) {
        s->live[q] = kvq_seq_length(C, q, 0, &s->len[q][0]) == KVQ_OK;
        if (!s->live[q]) continue;
        for (int l = 0; l < LAYERS; l++) {
            CHECK_OK(kvq_seq_length(C, q, l, &s->len[q][l]));
            size_t n = (size_t)s->len[q][l] * H * D;
            for (int r = 0; r < 2; r++) s->kv[q][l][r] = calloc(n ? n : 1, sizeof(float));
            /* all but the tokens kvq_seq_drop_front released (left 0): the sinks, then what follows the drop */
            kvq_seq_view v;
            CHECK_OK(kvq_seq_view_get(C, q, l, &v));
            int64_t a = v.sink_tokens, b = v.sink_tokens + v.dropped_tokens;
            if (!v.dropped_tokens) a = b = s->len[q][l];
            size_t off = (size_t)b * H * D;
            CHECK_OK(kvq_read(C, q, l, 0, a, s->kv[q][l][0], s->kv[q][l][1]));
            CHECK_OK(kvq_read(C, q, l, b, s->len[q][l] - b, s->kv[q][l][0] + off, s->kv[q][l][1] + off));
        }
    }
}

static int snap_same(const snap *a, const snap *b) {
    if (memcmp(a->live, b->live, sizeof a->live) || memcmp(a->len, b->len, sizeof a->len)) return 0;
    if (memcmp(&a->st, &b->st, sizeof a->st)) return 0;
    for (int q = 0; q < MAXS; q++)
        for (int l = 0; a->live[q] && l < LAYERS; l++)
            for (int r = 0; r < 2; r++)
                if (memcmp(a->kv[q][l][r], b->kv[q][l][r], (size_t)a->len[q][l] * H * D * sizeof(float))) return 0;
    return 1;
}

static void snap_free(snap *s) {
    for (int q = 0; q < MAXS; q++)
        for (int l = 0; l < LAYERS; l++)
            for (int r = 0; r < 2; r++) free(s->kv[q][l][r]);
}

/* One step of the workload: a single kvq call. */
typedef kvq_status (*step_fn)(void *arg);

/* Runs `fn` with its n-th allocation failing for n = 1, 2, ... until a run reaches no failure; that last run is the
 * step's real effect. Returns its status. */
static kvq_status run_step(const char *name, step_fn fn, void *arg) {
    for (long n = 1;; n++) {
        snap before, after;
        snap_take(&before);
        kvq_failalloc_arm(n);
        kvq_status s = fn(arg);
        int fired = kvq_failalloc_fired();
        kvq_failalloc_arm(0);
        g_calls++;
        if (!fired) {
            CHECK(s == KVQ_OK, "%s: %s (%s)", name, kvq_strerror(s), kvq_last_error());
            snap_free(&before);
            return s;
        }
        g_injected++;
        CHECK(s == KVQ_ERR_OUT_OF_MEMORY, "%s, allocation %ld failed: returned %s (%s), expected out of memory", name,
              n, kvq_strerror(s), kvq_last_error());
        CHECK(s == KVQ_OK || kvq_last_error()[0], "%s, allocation %ld failed: no message", name, n);
        snap_take(&after);
        if (s != KVQ_OK) CHECK(snap_same(&before, &after), "%s, allocation %ld failed: the cache changed", name, n);
        snap_free(&before);
        snap_free(&after);
        if (s == KVQ_OK) return s; /* already reported; the state moved on, so stop retrying */
    }
}

/* ---- steps ---- */
typedef struct app {
    int n_seqs;
    int32_t ids[MAXS], n[MAXS];
    uint64_t seed;
} app;

static kvq_status st_seq_new(void *a) { return kvq_seq_new(C, (int32_t *)a); }
static kvq_status st_fork(void *a) { return kvq_seq_fork(C, ((int32_t *)a)[0], &((int32_t *)a)[1]); }
static kvq_status st_free_seq(void *a) { return kvq_seq_free(C, *(int32_t *)a); }
static kvq_status st_truncate(void *a) { return kvq_seq_truncate(C, ((int32_t *)a)[0], ((int32_t *)a)[1]); }

static float *g_k, *g_v, *g_q, *g_out;
static int g_layer;
static kvq_status st_append_layer(void *a) {
    app *p = a;
    return kvq_append(C, g_layer, p->n_seqs, p->ids, p->n, KVQ_DTYPE_F32, g_k, g_v);
}
static kvq_status st_decode(void *a) {
    app *p = a;
    kvq_attn_params ap = kvq_attn_params_default(NQH);
    return kvq_attn_decode(C, 1, p->n_seqs, p->ids, g_q, g_out, &ap);
}
static kvq_status st_prefill(void *a) {
    kvq_attn_params ap = kvq_attn_params_default(NQH);
    ap.window = 20;
    return kvq_attn_prefill(C, 0, *(int32_t *)a, 9, g_q, g_out, &ap);
}
static kvq_status st_prefill_exact(void *a) { /* 9 new tokens' queries (g_q) over the cache and their own K/V */
    kvq_attn_params ap = kvq_attn_params_default(NQH);
    return kvq_attn_prefill_exact(C, 1, *(int32_t *)a, 9, g_q, KVQ_DTYPE_F32, g_k, g_v, g_out, &ap);
}
static kvq_status st_drop(void *a) { return kvq_seq_drop_front(C, ((int32_t *)a)[0], 0, ((int32_t *)a)[1]); }
static kvq_status st_read(void *a) { return kvq_read(C, *(int32_t *)a, 1, 2, 30, g_out, g_out + 30 * H * D); }
static kvq_status st_stats(void *a) {
    kvq_cache_stats s;
    return kvq_cache_get_stats(C, &s);
}

static void append(const char *name, int n_seqs, const int32_t *ids, const int32_t *n) {
    app p = {.n_seqs = n_seqs};
    size_t tot = 0;
    for (int i = 0; i < n_seqs; i++) p.ids[i] = ids[i], p.n[i] = n[i], tot += (size_t)n[i];
    tu_fill_kv(g_k, g_v, tot, H, D);
    for (g_layer = 0; g_layer < LAYERS; g_layer++) run_step(name, st_append_layer, &p);
}

/* sinks: kvq_cache_config.sinks (-1: the default, 1 with a grouped type; 20 puts the cuts below inside the sinks
 * (truncate to 3), past them (27), and makes the first append cross them) */
static float g_basis[D * 4]; /* SQuat (kvq.h section 10): columns e_0 .. e_3 */
static kvq_status st_subspace(void *a) {
    int *lh = a;
    return kvq_seq_set_key_subspace(C, lh[0], lh[1], lh[2], g_basis);
}

/* squat: kvq_cache_config.squat_rank (0 or 4): every (layer, head) of the first sequence gets a subspace (its block
 * is allocated by the first), which the forks copy */
static void workload(kvq_type tk, kvq_type tv, int residual, int sinks, int prerope, int squat) {
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.squat_rank = squat;
    cfg.sinks = sinks;
    cfg.prerope = prerope, cfg.rope_theta = 10000.0f; /* pre-RoPE keys (kvq.h section 10): their tables */
    cfg.n_layers = LAYERS, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = tk, cfg.type_v = tv;
    cfg.page_tokens = 16, cfg.group = 16, cfg.residual = residual, cfg.max_seqs = MAXS, cfg.n_threads = 2;
    cfg.arena_bytes = kvq_cache_arena_bytes_for(&cfg, 512) * 3;
    CHECK_OK(kvq_cache_create(&cfg, &C));
    if (!C) return;
    int32_t s0 = -1, s1 = -1, s2 = -1, pair[2], tr[2];
    run_step("seq_new", st_seq_new, &s0);
    for (int l = 0; l < LAYERS * H && squat; l++) {
        for (int j = 0; j < 4; j++) g_basis[j * 4 + j] = 1;
        run_step("set_key_subspace", st_subspace, (int[]){s0, l / H, l % H});
    }
    append("append 40 (pages, groups)", 1, &s0, (int32_t[]){40});
    pair[0] = s0;
    run_step("fork", st_fork, pair);
    s1 = pair[1];
    append("append 21 to the fork (copy on write)", 1, &s1, (int32_t[]){21});
    append("append to both (multi-sequence)", 2, (int32_t[]){s0, s1}, (int32_t[]){3, 17});
    run_step("seq_new 2", st_seq_new, &s2);
    append("append 70 to a fresh sequence", 1, &s2, (int32_t[]){70});
    tr[0] = s1, tr[1] = 27;
    run_step("truncate inside a group", st_truncate, tr);
    append("append after truncate", 1, &s1, (int32_t[]){5});
    app dec = {.n_seqs = 3, .ids = {s0, s1, s2}};
    for (size_t i = 0; i < 3 * NQH * D; i++) g_q[i] = (float)tu_normal();
    run_step("decode", st_decode, &dec);
    run_step("prefill", st_prefill, &s2);
    tu_fill_kv(g_k, g_v, 9, H, D);
    run_step("prefill_exact", st_prefill_exact, &s2);
    run_step("read", st_read, &s2);
    run_step("stats", st_stats, NULL);
    pair[0] = s2;
    run_step("fork 2", st_fork, pair);
    run_step("free seq", st_free_seq, &s0);
    tr[0] = pair[1], tr[1] = 3;
    run_step("truncate the fork", st_truncate, tr);
    append("append to the truncated fork", 1, &pair[1], (int32_t[]){33});
    /* a sliding-window layer's front released (layer 0 of s2: 70 tokens), then a windowed prefill over what is left,
     * a fork that shares the rest, appends that reuse the pages, and the fork's end */
    tr[0] = s2, tr[1] = 40;
    run_step("drop the front of layer 0", st_drop, tr);
    run_step("prefill after the drop", st_prefill, &s2);
    pair[0] = s2;
    run_step("fork after the drop", st_fork, pair);
    append("append after the drop", 2, (int32_t[]){s2, pair[1]}, (int32_t[]){20, 7});
    run_step("free the fork of the dropped sequence", st_free_seq, &pair[1]);
    kvq_cache_free(C);
    C = NULL;
}

/* kvq_cache_create with its n-th allocation failing: out of memory, *out NULL, no leak. */
static void create_all(kvq_type tk, kvq_type tv, int max_seqs, int prerope) {
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.prerope = prerope, cfg.rope_theta = 10000.0f;
    cfg.n_layers = 3, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = tk, cfg.type_v = tv, cfg.max_seqs = max_seqs;
    cfg.arena_bytes = kvq_cache_arena_bytes_for(&cfg, 300);
    for (long n = 1;; n++) {
        kvq_cache *c = (kvq_cache *)&cfg; /* must become NULL on failure */
        kvq_failalloc_arm(n);
        kvq_status s = kvq_cache_create(&cfg, &c);
        int fired = kvq_failalloc_fired();
        kvq_failalloc_arm(0);
        g_calls++;
        if (!fired) {
            CHECK(s == KVQ_OK && c, "kvq_cache_create: %s (%s)", kvq_strerror(s), kvq_last_error());
            kvq_cache_free(c);
            return;
        }
        g_injected++;
        CHECK(s == KVQ_ERR_OUT_OF_MEMORY, "kvq_cache_create, allocation %ld failed: returned %s", n, kvq_strerror(s));
        CHECK(kvq_last_error()[0], "kvq_cache_create, allocation %ld failed: no message", n);
        CHECK(c == NULL, "kvq_cache_create, allocation %ld failed: *out not NULL", n);
        if (s == KVQ_OK) kvq_cache_free(c);
    }
}

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "workload";
    if (strcmp(what, "create") == 0) {
        create_all(KVQ_TYPE_F16, KVQ_TYPE_F16, 1, 0);
        create_all(KVQ_TYPE_Q4, KVQ_TYPE_Q2, 8, 0);
        create_all(KVQ_TYPE_Q3, KVQ_TYPE_Q2, 2, 1);
    } else if (strcmp(what, "workload") == 0) {
        g_k = malloc(128 * H * D * sizeof(float)), g_v = malloc(128 * H * D * sizeof(float));
        g_q = malloc(3 * 9 * NQH * D * sizeof(float)), g_out = malloc(3 * 30 * H * D * sizeof(float));
        for (size_t i = 0; i < 3 * 9 * NQH * D; i++) g_q[i] = (float)tu_normal();
        workload(KVQ_TYPE_Q4, KVQ_TYPE_Q8, 16, -1, 0, 0);
        workload(KVQ_TYPE_F16, KVQ_TYPE_FP8, 0, 0, 0, 0);
        workload(KVQ_TYPE_Q2, KVQ_TYPE_Q2, 0, 20, 0, 0);
        workload(KVQ_TYPE_Q3, KVQ_TYPE_Q4, 16, -1, 1, 0);
        workload(KVQ_TYPE_Q4, KVQ_TYPE_Q8, 16, -1, 0, 4);
        free(g_k), free(g_v), free(g_q), free(g_out);
    } else {
        fprintf(stderr, "usage: test_failalloc_cache create|workload\n");
        return 2;
    }
    printf("%s: %ld calls checked, %ld with an injected allocation failure\n", what, g_calls, g_injected);
    CHECK(g_injected > 0, "no allocation was ever failed: the wrappers are not linked in");
    return tu_finish("test_failalloc_cache");
}
