/* Paged cache semantics: page accounting, fork with copy on write, truncate (rewind), free, running out of pages,
 * and every class of bad input, each of which must return its own code, say what was wrong, and leave the cache
 * exactly as it was (checked by comparing a full read back and the stats before and after). */
#include "testutil.h"

#include <stdbool.h>

enum { H = 2, D = 64, NL = 2 };

/* fp16 rounding done by the compiler (_Float16: GCC >= 12, clang >= 15 on x86-64), independent of the core's own */
static float tu_f16_round(float x) { return (float)(_Float16)x; }
static float tu_f16_to_f32(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}

static int g_sinks = 0; /* cfg.sinks of the caches make() creates: the tests below count pages and window rows of the
                         * layout without sinks unless they set it */
static int g_window8 = 0; /* cfg.window8 of the caches make() creates */

static kvq_cache *make(kvq_type tk, kvq_type tv, size_t arena, int residual, int max_seqs) {
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = NL, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = tk, cfg.type_v = tv;
    cfg.arena_bytes = arena, cfg.residual = residual, cfg.max_seqs = max_seqs, cfg.sinks = g_sinks;
    cfg.window8 = g_window8;
    cfg.rotate = 0; /* the checks below read back exact fp16 or the formats' own bounds; test_rotate covers R */
    kvq_cache *c = NULL;
    CHECK_OK(kvq_cache_create(&cfg, &c));
    return c;
}

static void append_all(kvq_cache *c, int32_t seq, const float *k, const float *v, int n) {
    for (int l = 0; l < NL; l++) CHECK_OK(kvq_append(c, l, 1, &seq, &n, KVQ_DTYPE_F32, k, v));
}

/* A snapshot of everything observable: stats and the full contents of every live sequence. */
typedef struct { kvq_cache_stats st; float *data; size_t n; } snap;

static snap take(const kvq_cache *c, const int32_t *seqs, int ns) {
    snap s = {0};
    kvq_cache_get_stats(c, &s.st);
    size_t total = 0;
    for (int i = 0; i < ns; i++)
        for (int l = 0; l < NL; l++) {
            int64_t len;
            kvq_seq_length(c, seqs[i], l, &len);
            total += (size_t)len * H * D * 2 + 1;
        }
    s.data = calloc(total + 1, sizeof(float));
    size_t off = 0;
    for (int i = 0; i < ns; i++)
        for (int l = 0; l < NL; l++) {
            int64_t len;
            kvq_seq_length(c, seqs[i], l, &len);
            s.data[off++] = (float)len;
            kvq_read(c, seqs[i], l, 0, len, s.data + off, s.data + off + (size_t)len * H * D);
            off += (size_t)len * H * D * 2;
        }
    s.n = off;
    return s;
}

static int same(snap a, snap b) {
    return a.n == b.n && !memcmp(a.data, b.data, a.n * sizeof(float)) && a.st.pages_free == b.st.pages_free &&
           a.st.n_seqs == b.st.n_seqs && a.st.tokens == b.st.tokens && a.st.pages_shared == b.st.pages_shared &&
           a.st.window_bytes == b.st.window_bytes;
}

static void test_accounting_fork_truncate(kvq_type t) {
    const char *name = kvq_type_get_traits(t)->name;
    kvq_cache *c = make(t, t, 1u << 20, -1, 8);
    kvq_page_layout L;
    kvq_cache_config cfg;
    kvq_cache_get_config(c, &cfg, &L);
    kvq_cache_stats st;
    kvq_cache_get_stats(c, &st);
    int64_t total = st.pages_total;
    CHECK(st.pages_free == total && total == (int64_t)((1u << 20) / L.page_bytes), "%s: fresh cache has all pages free", name);
    CHECK(kvq_cache_capacity_tokens(&cfg) == st.capacity_tokens, "%s: capacity agrees", name);
    /* sizing by token count: exactly enough pages for n tokens in every layer, and capacity says so */
    for (int64_t want = 1; want <= 1000; want += 333) {
        kvq_cache_config sized = cfg;
        sized.arena_bytes = kvq_cache_arena_bytes_for(&cfg, want);
        int64_t cap = kvq_cache_capacity_tokens(&sized);
        CHECK(cap >= want && cap < want + L.page_tokens, "%s: arena for %lld tokens holds %lld", name, (long long)want,
              (long long)cap);
    }
    CHECK(kvq_cache_arena_bytes_for(&cfg, -1) == 0 && kvq_cache_arena_bytes_for(NULL, 5) == 0, "%s: bad sizing", name);

    const int n = 300;
    float *k = malloc((size_t)n * H * D * 4), *v = malloc((size_t)n * H * D * 4);
    float *rk = malloc((size_t)n * H * D * 4), *rv = malloc((size_t)n * H * D * 4);
    float *fk = malloc((size_t)n * H * D * 4), *fv = malloc((size_t)n * H * D * 4);
    tu_fill_kv(k, v, n, H, D);
    int32_t a, b;
    CHECK_OK(kvq_seq_new(c, &a));
    append_all(c, a, k, v, 200);
    kvq_seq_view va;
    CHECK_OK(kvq_seq_view_get(c, a, 0, &va));
    CHECK(va.paged_tokens + va.window_tokens == 200, "%s: length", name);
    CHECK(va.window_tokens <= cfg.residual + L.group - 1 && va.paged_tokens % L.group == 0, "%s: window %d paged %lld",
          name, va.window_tokens, (long long)va.paged_tokens);
    int64_t used = (va.paged_tokens + L.page_tokens - 1) / L.page_tokens * NL;
    kvq_cache_get_stats(c, &st);
    CHECK(st.pages_free == total - used, "%s: %lld pages used, expected %lld", name, (long long)(total - st.pages_free),
          (long long)used);

    /* fork shares every page; the parent's content is unchanged by the child's appends (copy on write) */
    CHECK_OK(kvq_read(c, a, 1, 0, 200, rk, rv));
    CHECK_OK(kvq_seq_fork(c, a, &b));
    kvq_cache_get_stats(c, &st);
    CHECK(st.pages_free == total - used && st.pages_shared == used, "%s: fork shares pages (shared %lld)", name,
          (long long)st.pages_shared);
    append_all(c, b, k + (size_t)200 * H * D, v + (size_t)200 * H * D, 100);
    CHECK_OK(kvq_read(c, a, 1, 0, 200, fk, fv));
    CHECK(!memcmp(rk, fk, (size_t)200 * H * D * 4) && !memcmp(rv, fv, (size_t)200 * H * D * 4),
          "%s: parent unchanged after child appends", name);
    /* the parent's paged tokens are the child's too; its window tokens got quantized in the child */
    CHECK_OK(kvq_read(c, b, 1, 0, 200, fk, fv));
    CHECK(!memcmp(rk, fk, (size_t)va.paged_tokens * H * D * 4), "%s: child's paged prefix equals parent's", name);
    int64_t len;
    CHECK_OK(kvq_seq_length(c, b, 0, &len));
    CHECK(len == 300, "%s: child length %lld", name, (long long)len);

    /* truncate (speculative-decoding rewind) inside the window: exact */
    CHECK_OK(kvq_read(c, b, 0, 0, 300, fk, fv));
    CHECK_OK(kvq_seq_truncate(c, b, 290));
    CHECK_OK(kvq_seq_length(c, b, 1, &len));
    CHECK(len == 290, "%s: truncated length %lld", name, (long long)len);
    CHECK_OK(kvq_read(c, b, 0, 0, 290, rk, rv));
    CHECK(!memcmp(rk, fk, (size_t)290 * H * D * 4) && !memcmp(rv, fv, (size_t)290 * H * D * 4),
          "%s: tokens before a window cut are unchanged", name);
    /* re-appending after a rewind gives the same content as never having rewound */
    append_all(c, b, k + (size_t)290 * H * D, v + (size_t)290 * H * D, 10);
    CHECK_OK(kvq_read(c, b, 0, 0, 300, rk, rv));
    CHECK(!memcmp(rk, fk, (size_t)300 * H * D * 4), "%s: rewind + re-append reproduces the keys", name);

    /* truncate deep into the pages: the prefix stays within the type's accuracy, the pages beyond are freed */
    CHECK_OK(kvq_seq_truncate(c, b, 70));
    CHECK_OK(kvq_read(c, b, 0, 0, 70, rk, rv));
    double err = 0, ref = 0;
    for (size_t i = 0; i < (size_t)70 * H * D; i++) err += (rk[i] - fk[i]) * (rk[i] - fk[i]), ref += fk[i] * fk[i];
    CHECK(err / ref < 1e-5, "%s: deep truncate keeps the prefix (rel. change %g)", name, err / ref);
    CHECK_OK(kvq_seq_free(c, b));
    CHECK_OK(kvq_seq_free(c, a));
    kvq_cache_get_stats(c, &st);
    CHECK(st.pages_free == total && st.pages_shared == 0 && st.n_seqs == 0, "%s: all pages back after free (%lld/%lld)",
          name, (long long)st.pages_free, (long long)total);
    free(k), free(v), free(rk), free(rv), free(fk), free(fv);
    kvq_cache_free(c);
}

static void test_bad_input(void) {
    kvq_cache_config cfg = kvq_cache_config_default();
    kvq_cache *c = NULL;
    /* creation */
    CHECK_ERR(kvq_cache_create(NULL, &c), KVQ_ERR_NULL);
    CHECK_ERR(kvq_cache_create(&cfg, NULL), KVQ_ERR_NULL);
    cfg.n_layers = 1, cfg.n_kv_heads = 2, cfg.head_dim = 72, cfg.arena_bytes = 1 << 20;
    CHECK_ERR(kvq_cache_create(&cfg, &c), KVQ_ERR_UNSUPPORTED_HEAD_DIM);
    cfg.head_dim = 64, cfg.type_k = KVQ_TYPE_COUNT;
    CHECK_ERR(kvq_cache_create(&cfg, &c), KVQ_ERR_UNSUPPORTED_TYPE);
    cfg.type_k = (kvq_type)99;
    CHECK_ERR(kvq_cache_create(&cfg, &c), KVQ_ERR_UNSUPPORTED_TYPE);
    cfg.type_k = KVQ_TYPE_Q4, cfg.page_tokens = 48;
    CHECK_ERR(kvq_cache_create(&cfg, &c), KVQ_ERR_INVALID_ARG);
    cfg.page_tokens = 0, cfg.group = 48;
    CHECK_ERR(kvq_cache_create(&cfg, &c), KVQ_ERR_INVALID_ARG);
    cfg.group = 0, cfg.arena_bytes = 100;
    CHECK_ERR(kvq_cache_create(&cfg, &c), KVQ_ERR_INVALID_ARG);
    cfg.arena_bytes = 1 << 20, cfg.n_kv_heads = 0;
    CHECK_ERR(kvq_cache_create(&cfg, &c), KVQ_ERR_INVALID_ARG);
    CHECK(c == NULL, "no cache on failure");
    kvq_type t;
    CHECK_ERR(kvq_type_from_name("q5", &t), KVQ_ERR_UNSUPPORTED_TYPE);
    CHECK_OK(kvq_type_from_name("Q4", &t));
    CHECK(t == KVQ_TYPE_Q4, "parse q4");
    CHECK_OK(kvq_type_from_name("q3", &t));
    CHECK(t == KVQ_TYPE_Q3, "parse q3");
    CHECK(kvq_type_bytes_per_token(KVQ_TYPE_Q3, KVQ_KEY, 128, 0) == 56, "q3 keys: 48 + 512 / 64 bytes per token");
    CHECK(kvq_type_get_traits((kvq_type)-1) == NULL, "traits of a bad type");

    /* a cache with content, snapshotted around every bad call */
    for (int ty = 0; ty < 3; ty++) {
        kvq_type tt = ty == 2 ? KVQ_TYPE_Q3 : ty ? KVQ_TYPE_Q4 : KVQ_TYPE_Q8;
        c = make(tt, tt, 200u << 10, -1, 3);
        kvq_page_layout L;
        kvq_cache_get_config(c, NULL, &L);
        int32_t a, b, seqs[2];
        CHECK_OK(kvq_seq_new(c, &a));
        CHECK_OK(kvq_seq_new(c, &b));
        seqs[0] = a, seqs[1] = b;
        const int n = 100;
        float *k = malloc((size_t)20 * n * H * D * 4), *v = malloc((size_t)20 * n * H * D * 4);
        tu_fill_kv(k, v, 20 * n, H, D);
        append_all(c, a, k, v, n);
        append_all(c, b, k, v, 30);
        snap s0 = take(c, seqs, 2);
        int32_t nt = 10, two[2] = {a, b}, nts[2] = {10, 10}, dup[2] = {a, a}, bad_seq = 7, freed;
        float q[2 * 4 * D], o[2 * 4 * D];
        for (int i = 0; i < 2 * 4 * D; i++) q[i] = 0.1f * (float)(i % 7);
        kvq_attn_params ap = kvq_attn_params_default(4);
#define KEEPS(expr, code)                                                                                   \
    do {                                                                                                   \
        CHECK_ERR(expr, code);                                                                             \
        snap s1 = take(c, seqs, 2);                                                                        \
        CHECK(same(s0, s1), "cache changed by failing %s", #expr);                                        \
        free(s1.data);                                                                                     \
    } while (0)
        KEEPS(kvq_append(NULL, 0, 1, &a, &nt, KVQ_DTYPE_F32, k, v), KVQ_ERR_NULL);
        KEEPS(kvq_append(c, 0, 1, NULL, &nt, KVQ_DTYPE_F32, k, v), KVQ_ERR_NULL);
        KEEPS(kvq_append(c, 0, 1, &a, &nt, KVQ_DTYPE_F32, NULL, v), KVQ_ERR_NULL);
        KEEPS(kvq_append(c, NL, 1, &a, &nt, KVQ_DTYPE_F32, k, v), KVQ_ERR_SHAPE);
        KEEPS(kvq_append(c, -1, 1, &a, &nt, KVQ_DTYPE_F32, k, v), KVQ_ERR_SHAPE);
        KEEPS(kvq_append(c, 0, 1, &bad_seq, &nt, KVQ_DTYPE_F32, k, v), KVQ_ERR_NO_SEQ);
        KEEPS(kvq_append(c, 0, 2, dup, nts, KVQ_DTYPE_F32, k, v), KVQ_ERR_INVALID_ARG);
        KEEPS(kvq_append(c, 0, 1, &a, &nt, (kvq_dtype)9, k, v), KVQ_ERR_INVALID_ARG);
        int32_t neg = -1;
        KEEPS(kvq_append(c, 0, 1, &a, &neg, KVQ_DTYPE_F32, k, v), KVQ_ERR_INVALID_ARG);
        /* NaN / Inf / beyond fp16 in the second sequence's data: the first sequence must not change either */
        float keep = v[(size_t)15 * H * D + 3];
        v[(size_t)15 * H * D + 3] = NAN;
        KEEPS(kvq_append(c, 0, 2, two, nts, KVQ_DTYPE_F32, k, v), KVQ_ERR_NONFINITE);
        v[(size_t)15 * H * D + 3] = INFINITY;
        KEEPS(kvq_append(c, 0, 2, two, nts, KVQ_DTYPE_F32, k, v), KVQ_ERR_NONFINITE);
        v[(size_t)15 * H * D + 3] = 1e6f;
        KEEPS(kvq_append(c, 0, 2, two, nts, KVQ_DTYPE_F32, k, v), KVQ_ERR_NONFINITE);
        v[(size_t)15 * H * D + 3] = keep;
        /* cache full: far more tokens than the arena holds, for two sequences at once */
        int32_t big[2] = {n, 19 * n};
        KEEPS(kvq_append(c, 0, 2, two, big, KVQ_DTYPE_F32, k, v), KVQ_ERR_CACHE_FULL);
        /* sequences */
        KEEPS(kvq_seq_free(c, bad_seq), KVQ_ERR_NO_SEQ);
        KEEPS(kvq_seq_truncate(c, a, -5), KVQ_ERR_RANGE);
        KEEPS(kvq_seq_fork(c, bad_seq, &freed), KVQ_ERR_NO_SEQ);
        KEEPS(kvq_seq_fork(c, a, NULL), KVQ_ERR_NULL);
        int32_t third;
        CHECK_OK(kvq_seq_new(c, &third));
        free(s0.data);
        s0 = take(c, seqs, 2);
        KEEPS(kvq_seq_new(c, &freed), KVQ_ERR_TOO_MANY_SEQS);
        KEEPS(kvq_seq_fork(c, a, &freed), KVQ_ERR_TOO_MANY_SEQS);
        /* attention and reads */
        KEEPS(kvq_attn_decode(c, 0, 1, &third, q, o, &ap), KVQ_ERR_RANGE); /* empty sequence */
        CHECK_OK(kvq_seq_free(c, third));
        free(s0.data);
        s0 = take(c, seqs, 2);
        kvq_attn_params bad = ap;
        bad.n_q_heads = 3;
        KEEPS(kvq_attn_decode(c, 0, 1, &a, q, o, &bad), KVQ_ERR_SHAPE);
        bad = ap, bad.scale = NAN;
        KEEPS(kvq_attn_decode(c, 0, 1, &a, q, o, &bad), KVQ_ERR_INVALID_ARG);
        bad = ap, bad.window = -1;
        KEEPS(kvq_attn_decode(c, 0, 1, &a, q, o, &bad), KVQ_ERR_INVALID_ARG);
        KEEPS(kvq_attn_decode(c, 0, 1, &a, q, o, NULL), KVQ_ERR_NULL);
        KEEPS(kvq_attn_decode(c, 0, 1, &a, NULL, o, &ap), KVQ_ERR_NULL);
        KEEPS(kvq_attn_decode(c, 5, 1, &a, q, o, &ap), KVQ_ERR_SHAPE);
        KEEPS(kvq_attn_prefill(c, 0, a, n + 1, q, o, &ap), KVQ_ERR_RANGE);
        KEEPS(kvq_read(c, a, 0, 90, 20, k, v), KVQ_ERR_RANGE);
        KEEPS(kvq_read(c, a, 0, -1, 2, k, v), KVQ_ERR_RANGE);
        KEEPS(kvq_seq_view_get(c, a, 0, NULL), KVQ_ERR_NULL);
        /* after all that, the cache still works */
        CHECK_OK(kvq_attn_decode(c, 0, 2, two, q, o, &ap));
        for (int i = 0; i < 2 * 4 * D; i++) CHECK(isfinite(o[i]), "finite output");
        free(s0.data);
        free(k), free(v);
        kvq_cache_free(c);
    }
    kvq_cache_free(NULL);
    CHECK(strcmp(kvq_strerror(KVQ_ERR_CACHE_FULL), "cache full") == 0, "strerror");
    /* layered code wraps the current message in its own context */
    CHECK_ERR(kvq_seq_free(NULL, 0), KVQ_ERR_NULL);
    CHECK(kvq_set_error(KVQ_ERR_IO, "loading: %s", kvq_last_error()) == KVQ_ERR_IO, "kvq_set_error returns its code");
    CHECK(strncmp(kvq_last_error(), "loading: kvq_seq_free: ", 23) == 0, "wrapped message: '%s'", kvq_last_error());
    CHECK(kvq_version_number() == KVQ_VERSION_NUMBER, "version");
}

/* Running out of pages mid-generation: the failing step changes nothing, and freeing a sequence makes room. */
static void test_full_then_free(void) {
    kvq_cache *c = make(KVQ_TYPE_Q8, KVQ_TYPE_Q8, 40u << 10, 0, 4);
    int32_t a, b;
    CHECK_OK(kvq_seq_new(c, &a));
    CHECK_OK(kvq_seq_new(c, &b));
    float k[H * D], v[H * D];
    for (int i = 0; i < H * D; i++) k[i] = (float)(i % 13) * 0.1f, v[i] = (float)(i % 5);
    int32_t one = 1, steps = 0;
    kvq_status s = KVQ_OK;
    while (s == KVQ_OK && steps < 100000) {
        s = kvq_append(c, 0, 1, &a, &one, KVQ_DTYPE_F32, k, v);
        steps += s == KVQ_OK;
    }
    CHECK(s == KVQ_ERR_CACHE_FULL, "fills up with CACHE_FULL, got %s", kvq_strerror(s));
    kvq_cache_stats st;
    kvq_cache_get_stats(c, &st);
    int64_t expect = st.capacity_tokens * NL;
    if (g_sinks) { /* layer 0 alone: its sink pages, then pages of P tokens */
        kvq_page_layout L;
        kvq_cache_get_config(c, NULL, &L);
        int64_t SR = (int64_t)(L.page_bytes / (4 * (size_t)H * D)), SP = (g_sinks + SR - 1) / SR;
        expect = st.pages_total <= SP ? (st.pages_total * SR < g_sinks ? st.pages_total * SR : g_sinks)
                                      : g_sinks + (st.pages_total - SP) * L.page_tokens;
    }
    CHECK(steps == expect, "layer 0 alone took %d tokens, expected %lld; capacity per sequence %lld (2 layers)", steps,
          (long long)expect, (long long)st.capacity_tokens);
    CHECK_ERR(kvq_append(c, 0, 1, &b, &one, KVQ_DTYPE_F32, k, v), KVQ_ERR_CACHE_FULL);
    CHECK_OK(kvq_seq_free(c, a));
    CHECK_OK(kvq_append(c, 0, 1, &b, &one, KVQ_DTYPE_F32, k, v));
    kvq_cache_free(c);
}

/* The core's allocation hook (src/core/errors.c; hidden, linkable from the static library): the n-th allocation
 * from now on this thread fails. */
extern _Thread_local int64_t kvq__alloc_fail_in;

/* Issue 16: kvq_cache_create read the freed cache for its out-of-memory message (ASan: heap-use-after-free). Each
 * of its four allocations fails in turn: KVQ_ERR_OUT_OF_MEMORY, no cache, the message names the arena's size when
 * the arena is what failed, and nothing leaks (LeakSanitizer in the ASan build). */
static void test_create_oom(void) {
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = NL, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = KVQ_TYPE_Q4, cfg.type_v = KVQ_TYPE_Q4;
    kvq_page_layout L;
    CHECK_OK(kvq_page_layout_make(KVQ_TYPE_Q4, KVQ_TYPE_Q4, H, D, 64, 64, &L));
    cfg.arena_bytes = 64 * L.page_bytes; /* a multiple of 64: the arena allocated is exactly arena_bytes */
    char size[32];
    snprintf(size, sizeof size, "%zu", cfg.arena_bytes);
    int n;
    for (n = 1; n < 20; n++) {
        kvq_cache *c = (kvq_cache *)&n;
        kvq__alloc_fail_in = n;
        kvq_status s = kvq_cache_create(&cfg, &c);
        int64_t left = kvq__alloc_fail_in;
        kvq__alloc_fail_in = 0;
        if (left > 0) { /* fewer than n allocations: it succeeded */
            CHECK(s == KVQ_OK && c, "create with %d allocations", n - 1);
            kvq_cache_free(c);
            break;
        }
        CHECK(s == KVQ_ERR_OUT_OF_MEMORY && c == NULL, "create, allocation %d fails: %s", n, kvq_strerror(s));
        CHECK(kvq_last_error()[0], "create, allocation %d fails: no message", n);
        if (n == 2) /* the cache object first, then the arena */
            CHECK(strstr(kvq_last_error(), size) != NULL, "message '%s' does not name the arena's %s bytes",
                  kvq_last_error(), size);
    }
    CHECK(n == 6, "kvq_cache_create made %d allocations, expected 5 (object, arena, refcounts, free list, slots)", n - 1);
}

typedef kvq_status (*op_fn)(kvq_cache *c, void *arg);

/* Runs op with its 1st, 2nd, ... allocation failing until it succeeds: each failure must be
 * KVQ_ERR_OUT_OF_MEMORY with a message and leave every snapshotted sequence exactly as it was. Returns the
 * number of allocations the successful call made. */
static int sweep_oom(const char *what, kvq_cache *c, const int32_t *seqs, int ns, op_fn op, void *arg) {
    for (int n = 1; n < 100; n++) {
        snap s0 = take(c, seqs, ns);
        kvq__alloc_fail_in = n;
        kvq_status s = op(c, arg);
        int64_t left = kvq__alloc_fail_in;
        kvq__alloc_fail_in = 0;
        if (left > 0) {
            CHECK(s == KVQ_OK, "%s: succeeds once allocations do (%s: %s)", what, kvq_strerror(s), kvq_last_error());
            if (n > 1) printf("  %-22s each of its %d allocations failed in turn: out of memory, cache unchanged\n", what, n - 1);
            free(s0.data);
            return n - 1;
        }
        CHECK(s == KVQ_ERR_OUT_OF_MEMORY, "%s, allocation %d fails: got %s", what, n, kvq_strerror(s));
        CHECK(kvq_last_error()[0], "%s: no message", what);
        snap s1 = take(c, seqs, ns);
        CHECK(same(s0, s1), "%s: cache changed by a failed allocation %d", what, n);
        free(s0.data), free(s1.data);
    }
    CHECK(0, "%s: still failing after 99 allocations", what);
    return -1;
}

typedef struct op_arg {
    int32_t seq, *out, n;
    const float *k, *v, *q;
    float *o;
    int layer;
    int64_t len;
} op_arg;

static kvq_status op_new(kvq_cache *c, void *a) { return kvq_seq_new(c, ((op_arg *)a)->out); }
static kvq_status op_fork(kvq_cache *c, void *a) { return kvq_seq_fork(c, ((op_arg *)a)->seq, ((op_arg *)a)->out); }
static kvq_status op_append(kvq_cache *c, void *a) {
    op_arg *x = a;
    return kvq_append(c, x->layer, 1, &x->seq, &x->n, KVQ_DTYPE_F32, x->k, x->v);
}
static kvq_status op_truncate(kvq_cache *c, void *a) { return kvq_seq_truncate(c, ((op_arg *)a)->seq, ((op_arg *)a)->len); }
static kvq_status op_decode(kvq_cache *c, void *a) {
    kvq_attn_params p = kvq_attn_params_default(2 * H);
    return kvq_attn_decode(c, 0, 1, &((op_arg *)a)->seq, ((op_arg *)a)->q, ((op_arg *)a)->o, &p);
}
static kvq_status op_prefill(kvq_cache *c, void *a) {
    kvq_attn_params p = kvq_attn_params_default(2 * H);
    return kvq_attn_prefill(c, 0, ((op_arg *)a)->seq, 5, ((op_arg *)a)->q, ((op_arg *)a)->o, &p);
}

/* Every allocation of every mutating call (and of attention) fails in turn, for a grouped type with a window
 * (window growth, truncate into the pages, fork of a window) and a per-token type without one. Before the fix, a
 * fork whose page table allocation failed dropped its parent's page references (pages_free changed). */
static void test_every_oom_path(void) {
    for (int ty = 0; ty < 3; ty++) {
        kvq_type t = ty == 2 ? KVQ_TYPE_Q3 : ty ? KVQ_TYPE_Q8 : KVQ_TYPE_Q4;
        kvq_cache *c = make(t, t, 1u << 20, ty == 1 ? 0 : 32, 4);
        const int n = 400;
        float *k = malloc((size_t)n * H * D * 4), *v = malloc((size_t)n * H * D * 4);
        float q[5 * 2 * H * D], o[5 * 2 * H * D];
        tu_fill_kv(k, v, n, H, D);
        for (int i = 0; i < 5 * 2 * H * D; i++) q[i] = (float)tu_normal();
        int32_t seqs[3] = {-1, -1, -1};
        op_arg a = {.out = &seqs[0], .k = k, .v = v, .q = q, .o = o};
        sweep_oom("seq_new", c, seqs, 0, op_new, &a);
        a.seq = seqs[0];
        for (int l = 0; l < NL; l++) { /* uneven pieces: windows grow several times, pages fill and flush */
            a.layer = l;
            int done = 0;
            for (int piece = 1; done + piece <= 300; done += piece, piece = piece * 3 + 1) {
                a.n = piece, a.k = k + (size_t)done * H * D, a.v = v + (size_t)done * H * D;
                sweep_oom("append", c, seqs, 1, op_append, &a);
            }
        }
        a.out = &seqs[1];
        sweep_oom("fork", c, seqs, 1, op_fork, &a);
        a.seq = seqs[1], a.len = 101; /* inside the pages, not on a group boundary: tokens go back to the window */
        sweep_oom("truncate", c, seqs, 2, op_truncate, &a);
        a.layer = 0, a.n = 50, a.k = k + (size_t)300 * H * D, a.v = v + (size_t)300 * H * D;
        sweep_oom("append after truncate", c, seqs, 2, op_append, &a);
        /* a window that must grow in a truncate: a fork of a 65-token sequence has a 1-row window (Q4), and a cut
         * at 40 moves 40 tokens of its first group back into it */
        a.len = 65;
        sweep_oom("truncate", c, seqs, 2, op_truncate, &a);
        a.out = &seqs[2];
        sweep_oom("fork", c, seqs, 2, op_fork, &a);
        a.seq = seqs[2], a.len = 40;
        sweep_oom("truncate (grows)", c, seqs, 3, op_truncate, &a);
        sweep_oom("decode", c, seqs, 3, op_decode, &a);
        sweep_oom("prefill", c, seqs, 3, op_prefill, &a);
        free(k), free(v);
        kvq_cache_free(c);
    }
}

/* Issue 17: kvq_cache_arena_bytes_for formed n_tokens + P - 1 (signed overflow near INT64_MAX) and multiplied in
 * size_t without a check, returning wrapped sizes. Now: 0 with KVQ_ERR_INVALID_ARG's message whenever the arena would
 * need more pages than a cache can have (INT32_MAX), as for a bad config; at the limit it is exact. */
static void test_sizing_overflow(void) {
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = 1, cfg.n_kv_heads = H, cfg.head_dim = D;
    kvq_page_layout L;
    CHECK_OK(kvq_page_layout_make(KVQ_TYPE_F16, KVQ_TYPE_F16, H, D, 64, 0, &L));
    const int64_t huge[] = {INT64_MAX, INT64_MAX - 1, INT64_MAX / 2, (int64_t)INT32_MAX * 64 + 1};
    for (int i = 0; i < 4; i++) {
        kvq_set_error(KVQ_OK, "%s", "");
        CHECK(kvq_cache_arena_bytes_for(&cfg, huge[i]) == 0, "arena for %lld tokens: not 0", (long long)huge[i]);
        CHECK(strstr(kvq_last_error(), "pages") != NULL, "no message for %lld tokens: '%s'", (long long)huge[i],
              kvq_last_error());
    }
    /* INT32_MAX pages of 64 tokens: the largest arena a cache of one layer can have */
    size_t top = kvq_cache_arena_bytes_for(&cfg, (int64_t)INT32_MAX * 64);
    CHECK(top == (size_t)INT32_MAX * L.page_bytes, "arena for 2^31 - 1 pages: %zu", top);
    kvq_cache_config sized = cfg;
    sized.arena_bytes = top;
    CHECK(kvq_cache_capacity_tokens(&sized) == (int64_t)INT32_MAX * 64, "capacity at the limit %lld",
          (long long)kvq_cache_capacity_tokens(&sized));
    /* two layers: the limit is INT32_MAX pages in all */
    cfg.n_layers = 2;
    CHECK(kvq_cache_arena_bytes_for(&cfg, (int64_t)INT32_MAX * 64) == 0, "2 layers x 2^31 - 1 pages: not 0");
    CHECK(kvq_cache_arena_bytes_for(&cfg, (int64_t)(INT32_MAX / 2) * 64) == (size_t)(INT32_MAX / 2) * 2 * L.page_bytes,
          "2 layers x 2^30 - 1 pages");
    kvq_set_error(KVQ_OK, "%s", "");
    CHECK(kvq_cache_arena_bytes_for(&cfg, -1) == 0 && kvq_last_error()[0], "negative n_tokens: 0 and a message");

    /* kvq_read's message formed start + n (signed overflow under UBSan); it names both now */
    kvq_cache *c = make(KVQ_TYPE_F16, KVQ_TYPE_F16, 1u << 20, 0, 2);
    int32_t s;
    CHECK_OK(kvq_seq_new(c, &s));
    float x[1];
    CHECK_ERR(kvq_read(c, s, 0, INT64_MAX, INT64_MAX, x, x), KVQ_ERR_RANGE);
    CHECK(strstr(kvq_last_error(), "9223372036854775807") != NULL, "read message: '%s'", kvq_last_error());
    CHECK_ERR(kvq_read(c, s, 0, 1, INT64_MAX, x, x), KVQ_ERR_RANGE);
    kvq_cache_free(c);
}

/* Issue 16: residual windows were allocated for R + G rows when a sequence was created, so a short Q4 sequence held
 * 192 rows per layer (2.2x an F16 cache's resident bytes at 10 tokens). They grow with the window now, doubling up to
 * W = R + G rows, and window_bytes reports what is allocated. */
static void test_window_growth(void) {
    /* one window row, K and V, every layer: fp16 [H][D], or 8-bit codes [H][D] and fp16 scales [H] */
    const size_t rk = (g_window8 & KVQ_ROLES_K) ? (size_t)H * (D + 2) : (size_t)H * D * 2;
    const size_t rv = (g_window8 & KVQ_ROLES_V) ? (size_t)H * (D + 2) : (size_t)H * D * 2;
    const size_t row = (rk + rv) * NL;
    kvq_cache *f16 = make(KVQ_TYPE_F16, KVQ_TYPE_F16, 1u << 20, 0, 4), *q4 = make(KVQ_TYPE_Q4, KVQ_TYPE_Q4, 1u << 20, -1, 4);
    const int n = 400;
    float *k = malloc((size_t)n * H * D * 4), *v = malloc((size_t)n * H * D * 4);
    tu_fill_kv(k, v, n, H, D);
    int32_t a, b, cseq;
    CHECK_OK(kvq_seq_new(f16, &a));
    CHECK_OK(kvq_seq_new(q4, &b));
    kvq_cache_stats sf, sq;
    kvq_cache_get_stats(q4, &sq);
    CHECK(sq.window_bytes == 0, "a new sequence holds no window: %zu bytes", sq.window_bytes);
    append_all(f16, a, k, v, 10);
    append_all(q4, b, k, v, 10);
    kvq_cache_get_stats(f16, &sf), kvq_cache_get_stats(q4, &sq);
    /* F16 (R = 0): one 64-token page per layer, no window. Q4: 10 rows per layer, no page */
    CHECK(sf.window_bytes == 0 && sf.page_bytes_in_use == (size_t)NL * 64 * H * D * 4, "f16 resident %zu + %zu",
          sf.page_bytes_in_use, sf.window_bytes);
    CHECK(sq.window_bytes == 10 * row && sq.page_bytes_in_use == 0, "q4: window %zu bytes, expected %zu",
          sq.window_bytes, 10 * row);
    CHECK(sq.window_bytes + sq.page_bytes_in_use <= sf.window_bytes + sf.page_bytes_in_use,
          "q4 resident %zu > f16 %zu at 10 tokens", sq.window_bytes + sq.page_bytes_in_use,
          sf.window_bytes + sf.page_bytes_in_use);
    /* token by token: capacity doubles (10 -> 20 -> 40 ...), never past W = 128 + 64 rows */
    const int32_t expect_cap[] = {20, 20, 40, 80, 160, 192};
    const int at[] = {11, 20, 21, 41, 81, 161};
    int64_t len = 10;
    for (int i = 0; i < 6; i++) {
        for (; len < at[i]; len++) append_all(q4, b, k + (size_t)len * H * D, v + (size_t)len * H * D, 1);
        kvq_seq_view view;
        CHECK_OK(kvq_seq_view_get(q4, b, 1, &view));
        kvq_cache_get_stats(q4, &sq);
        CHECK(view.window_capacity == expect_cap[i] && sq.window_bytes == (size_t)expect_cap[i] * row,
              "at %lld tokens: capacity %d, window bytes %zu; expected %d rows", (long long)len, view.window_capacity,
              sq.window_bytes, expect_cap[i]);
    }
    for (; len < 300; len++) append_all(q4, b, k + (size_t)len * H * D, v + (size_t)len * H * D, 1);
    kvq_seq_view view;
    CHECK_OK(kvq_seq_view_get(q4, b, 0, &view));
    kvq_cache_get_stats(q4, &sq);
    CHECK(view.window_capacity == 192 && sq.window_bytes == 192 * row && view.window_tokens == 300 - view.paged_tokens,
          "at 300 tokens: capacity %d (W = 192), %d tokens in it", view.window_capacity, view.window_tokens);
    /* a fork's window holds what its parent's holds; the tokens read back are the same */
    CHECK_OK(kvq_seq_fork(q4, b, &cseq));
    kvq_cache_stats s2;
    kvq_cache_get_stats(q4, &s2);
    CHECK(s2.window_bytes == sq.window_bytes + (size_t)view.window_tokens * row, "fork's window %zu bytes",
          s2.window_bytes - sq.window_bytes);
    float *r1 = malloc((size_t)300 * H * D * 4), *r2 = malloc((size_t)300 * H * D * 4);
    CHECK_OK(kvq_read(q4, b, 1, 0, 300, r1, NULL));
    CHECK_OK(kvq_read(q4, cseq, 1, 0, 300, r2, NULL));
    CHECK(!memcmp(r1, r2, (size_t)300 * H * D * 4), "fork reads back its parent's tokens");
    /* freeing gives the bytes back */
    CHECK_OK(kvq_seq_free(q4, cseq));
    CHECK_OK(kvq_seq_free(q4, b));
    kvq_cache_get_stats(q4, &sq);
    CHECK(sq.window_bytes == 0, "no window bytes after free: %zu", sq.window_bytes);
    free(k), free(v), free(r1), free(r2);
    kvq_cache_free(f16), kvq_cache_free(q4);
}

/* Attention sinks (kvq.h section 10). The model: tokens < S read back as their fp16 rounding, and the tokens after
 * them read back bit for bit like a cache without sinks that was given only those tokens (its groups start at S),
 * whatever the cuts of the appends, through fork, copy on write and truncate at every boundary. */
static void read_all(kvq_cache *c, int32_t seq, int layer, int64_t n, float *k, float *v) {
    int64_t len = -1;
    CHECK_OK(kvq_seq_length(c, seq, layer, &len));
    CHECK(len == n, "length %lld, expected %lld", (long long)len, (long long)n);
    if (len == n) CHECK_OK(kvq_read(c, seq, layer, 0, n, k, v));
}

/* seq of c (sinks S) against ref (no sinks) holding tokens S.. of the same data; n tokens */
static void check_model(kvq_cache *c, int32_t seq, kvq_cache *ref, int32_t rseq, const float *k, const float *v, int n,
                        int S, const char *what) {
    size_t row = (size_t)H * D;
    float *a = malloc((size_t)n * row * 8 + 8), *b = malloc((size_t)n * row * 8 + 8);
    int ns = n < S ? n : S;
    for (int l = 0; l < NL; l++) {
        read_all(c, seq, l, n, a, a + (size_t)n * row);
        int bad = 0;
        for (size_t i = 0; i < (size_t)ns * row; i++)
            bad += a[i] != tu_f16_round(k[i]) || a[(size_t)n * row + i] != tu_f16_round(v[i]);
        CHECK(bad == 0, "%s: layer %d: %d sink values are not the fp16 of the input", what, l, bad);
        if (n > S) {
            read_all(ref, rseq, l, n - S, b, b + (size_t)(n - S) * row);
            CHECK(!memcmp(a + (size_t)S * row, b, (size_t)(n - S) * row * 4) &&
                      !memcmp(a + (size_t)n * row + (size_t)S * row, b + (size_t)(n - S) * row, (size_t)(n - S) * row * 4),
                  "%s: layer %d: tokens after the %d sinks differ from a cache without sinks given them alone", what, l, S);
        }
    }
    free(a), free(b);
}

static void append_range(kvq_cache *c, int32_t seq, const float *k, const float *v, int from, int to) {
    size_t row = (size_t)H * D;
    if (to > from) append_all(c, seq, k + (size_t)from * row, v + (size_t)from * row, to - from);
}

static void test_sinks(kvq_type t, int S, int residual) {
    const char *name = kvq_type_get_traits(t)->name;
    char what[96];
    g_sinks = S;
    kvq_cache *c = make(t, t, 1u << 20, residual, 8);
    g_sinks = 0;
    kvq_cache *ref = make(t, t, 1u << 20, residual, 8);
    kvq_cache_config cfg;
    kvq_page_layout L;
    kvq_cache_get_config(c, &cfg, &L);
    const int SR = (int)(L.page_bytes / (4 * (size_t)H * D)), SP = (S + SR - 1) / SR, P = L.page_tokens, G = L.group;
    const int n = S + 3 * G + 37;
    size_t row = (size_t)H * D;
    float *k = malloc((size_t)n * row * 4), *v = malloc((size_t)n * row * 4);
    tu_fill_kv(k, v, (size_t)n, H, D);
    for (size_t i = 0; i < (size_t)H * D; i++) k[i] *= 50, v[i] *= 50; /* a BOS-like outlier token */
    kvq_cache_stats st0, st;
    kvq_cache_get_stats(c, &st0);

    /* appends in uneven pieces that cross S inside a call */
    int32_t a, r;
    CHECK_OK(kvq_seq_new(c, &a));
    CHECK_OK(kvq_seq_new(ref, &r));
    static const int pieces[] = {1, 2, 7, 30, 1, 90, 3};
    int done = 0;
    for (int i = 0; done < n; i++) {
        int m = pieces[i % 7] < n - done ? pieces[i % 7] : n - done;
        append_range(c, a, k, v, done, done + m);
        int r0 = done > S ? done : S;
        append_range(ref, r, k, v, r0, done + m);
        done += m;
    }
    snprintf(what, sizeof what, "%s S=%d R=%d: append", name, S, residual);
    check_model(c, a, ref, r, k, v, n, S, what);
    kvq_seq_view view, rview;
    CHECK_OK(kvq_seq_view_get(c, a, 1, &view));
    CHECK_OK(kvq_seq_view_get(ref, r, 1, &rview));
    CHECK(view.sink_tokens == S && view.sink_rows_per_page == SR && view.n_sink_pages == SP &&
              view.paged_tokens == rview.paged_tokens && view.window_tokens == rview.window_tokens,
          "%s: view: %d sinks in %d pages of %d rows, paged %lld window %d", what, view.sink_tokens, view.n_sink_pages,
          view.sink_rows_per_page, (long long)view.paged_tokens, view.window_tokens);
    /* the documented layout: token t, head h: key at page + ((t % SR) * H + h) * D halves, values SR * H * D further */
    int bad = 0;
    for (int t2 = 0; t2 < S; t2++)
        for (int h = 0; h < H; h++) {
            const uint16_t *pg = (const uint16_t *)(const void *)(view.arena + (size_t)view.sink_pages[t2 / SR] * L.page_bytes);
            const uint16_t *kk = pg + ((size_t)(t2 % SR) * H + h) * D, *vv = kk + (size_t)SR * H * D;
            for (int d = 0; d < D; d++)
                bad += tu_f16_to_f32(kk[d]) != tu_f16_round(k[((size_t)t2 * H + h) * D + d]) ||
                       tu_f16_to_f32(vv[d]) != tu_f16_round(v[((size_t)t2 * H + h) * D + d]);
        }
    CHECK(bad == 0, "%s: %d values differ in the view's sink rows", what, bad);
    kvq_cache_get_stats(c, &st);
    int64_t used = (int64_t)NL * (SP + (view.paged_tokens + P - 1) / P);
    CHECK(st0.pages_free - st.pages_free == used && st.tokens == n, "%s: %lld pages used, expected %lld", what,
          (long long)(st0.pages_free - st.pages_free), (long long)used);

    /* capacity and sizing: sink pages first, then pages of P tokens */
    for (int want = 1; want <= S + 2 * P; want += want < S + 2 ? 1 : P / 2) {
        kvq_cache_config sized = cfg;
        sized.arena_bytes = kvq_cache_arena_bytes_for(&cfg, want);
        int64_t cap = kvq_cache_capacity_tokens(&sized), slack = want <= S ? SR : P;
        CHECK(cap >= want && cap < want + slack, "%s: arena for %d tokens holds %lld", what, want, (long long)cap);
    }

    /* fork at every boundary, then cut and re-append: copy on write keeps the parent, the child follows the model */
    const int cuts[] = {0, 1, S / 2, S - 1, S, S + 1, S + G - 1, S + G, S + G + 1, n - 1};
    for (int ci = 0; ci < 10; ci++) {
        int cut = cuts[ci];
        if (cut < 0 || cut > n) continue;
        snprintf(what, sizeof what, "%s S=%d R=%d: truncate to %d", name, S, residual, cut);
        int32_t b, rb;
        CHECK_OK(kvq_seq_fork(c, a, &b));
        CHECK_OK(kvq_seq_fork(ref, r, &rb));
        kvq_cache_get_stats(c, &st);
        CHECK(st.pages_shared == used, "%s: fork shares %lld pages, expected %lld", what, (long long)st.pages_shared,
              (long long)used);
        CHECK_OK(kvq_seq_truncate(c, b, cut));
        CHECK_OK(kvq_seq_truncate(ref, rb, cut > S ? cut - S : 0));
        /* the truncated child: exact sinks, the rest as the reference cut at cut - S */
        check_model(c, b, ref, rb, k, v, cut, S, what);
        /* writes into the shared pages after the cut: the parent must not see them */
        float *k2 = malloc((size_t)n * row * 4), *v2 = malloc((size_t)n * row * 4);
        memcpy(k2, k, (size_t)n * row * 4), memcpy(v2, v, (size_t)n * row * 4);
        for (size_t i = (size_t)cut * row; i < (size_t)n * row; i++) k2[i] = -k2[i] + 0.5f, v2[i] *= 0.5f;
        append_range(c, b, k2, v2, cut, n);
        append_range(ref, rb, k2, v2, cut > S ? cut : S, n);
        check_model(c, b, ref, rb, k2, v2, n, S, what);
        check_model(c, a, ref, r, k, v, n, S, what); /* the parent is unchanged */
        CHECK_OK(kvq_seq_free(c, b));
        CHECK_OK(kvq_seq_free(ref, rb));
        free(k2), free(v2);
        kvq_cache_get_stats(c, &st);
        CHECK(st.pages_shared == 0 && st0.pages_free - st.pages_free == used, "%s: the child's pages came back", what);
    }

    /* all or nothing: a call that crosses S with a NaN in its last token, and one that does not fit */
    snap before = take(c, &a, 1);
    int32_t b;
    CHECK_OK(kvq_seq_fork(c, a, &b));
    CHECK_OK(kvq_seq_truncate(c, b, S > 2 ? S - 2 : 0));
    snap before2 = take(c, (int32_t[]){a, b}, 2);
    float *kb = malloc((size_t)(G + 8) * row * 4), *vb = malloc((size_t)(G + 8) * row * 4);
    tu_fill_kv(kb, vb, (size_t)G + 8, H, D);
    kb[(size_t)(G + 7) * row + 3] = NAN;
    int32_t cnt = G + 8;
    CHECK_ERR(kvq_append(c, 0, 1, &b, &cnt, KVQ_DTYPE_F32, kb, vb), KVQ_ERR_NONFINITE);
    snap after2 = take(c, (int32_t[]){a, b}, 2);
    CHECK(same(before2, after2), "%s S=%d: a NaN after the sinks changes nothing", name, S);
    free(after2.data), free(before2.data);
    CHECK_OK(kvq_seq_free(c, b));
    snap after = take(c, &a, 1);
    CHECK(same(before, after), "%s S=%d: the parent is unchanged", name, S);
    free(before.data), free(after.data), free(kb), free(vb);
    CHECK_OK(kvq_seq_free(c, a));
    kvq_cache_get_stats(c, &st);
    CHECK(st.pages_free == st0.pages_free && st.pages_shared == 0, "%s S=%d: every page back after free", name, S);
    free(k), free(v);
    kvq_cache_free(c), kvq_cache_free(ref);
}

/* A cache too small for the sinks: the call that needs one more sink page than is free fails and changes nothing */
static void test_sinks_full(void) {
    g_sinks = 1024;
    kvq_cache *c = make(KVQ_TYPE_Q4, KVQ_TYPE_Q4, 64u << 10, -1, 2);
    g_sinks = 0;
    kvq_cache_stats st;
    kvq_cache_get_stats(c, &st);
    int32_t a;
    CHECK_OK(kvq_seq_new(c, &a));
    kvq_page_layout L;
    kvq_cache_get_config(c, NULL, &L);
    const int64_t SR = (int64_t)(L.page_bytes / (4 * (size_t)H * D));
    CHECK(st.capacity_tokens == st.pages_total / NL * SR && st.pages_total * SR < 1024,
          "capacity %lld: every page of a layer holds %lld sinks", (long long)st.capacity_tokens, (long long)SR);
    /* layer 0 alone fills the arena with sink pages; a call of 3 tokens that needs one page more fails whole */
    int32_t n = (int32_t)(st.pages_total * SR);
    float *k = malloc((size_t)(n + 3) * H * D * 4), *v = malloc((size_t)(n + 3) * H * D * 4);
    tu_fill_kv(k, v, (size_t)n + 3, H, D);
    int32_t m = n - 1, three = 3;
    CHECK_OK(kvq_append(c, 0, 1, &a, &m, KVQ_DTYPE_F32, k, v));
    snap s0 = take(c, &a, 1);
    CHECK_ERR(kvq_append(c, 0, 1, &a, &three, KVQ_DTYPE_F32, k + (size_t)m * H * D, v + (size_t)m * H * D), KVQ_ERR_CACHE_FULL);
    snap s1 = take(c, &a, 1);
    CHECK(same(s0, s1) && s0.st.pages_free == 0, "a full cache of sinks is unchanged by a failing append");
    int32_t one = 1;
    CHECK_OK(kvq_append(c, 0, 1, &a, &one, KVQ_DTYPE_F32, k + (size_t)m * H * D, v + (size_t)m * H * D));
    free(s0.data), free(s1.data), free(k), free(v);
    kvq_cache_free(c);
}

/* kvq_seq_drop_front: pages wholly before the cut go back to the arena (a fork keeps its shared ones), the rest
 * reads back as before, windowed attention gives bit-identical results (the skipped pages were masked anyway),
 * and every use that would reach a dropped token fails with KVQ_ERR_RANGE, leaving the cache unchanged. */
static void test_drop_front(kvq_type t, int sinks) {
    const int n = 700, Wn = 200, NQ = 2 * H;
    g_sinks = sinks;
    kvq_cache_config probe = kvq_cache_config_default();
    probe.n_layers = NL, probe.n_kv_heads = H, probe.head_dim = D, probe.type_k = t, probe.type_v = t, probe.sinks = sinks;
    kvq_cache *c = make(t, t, kvq_cache_arena_bytes_for(&probe, n) * 2, -1, 2);
    g_sinks = 0;
    if (!c) return;
    kvq_cache_config cfg;
    kvq_page_layout L;
    CHECK_OK(kvq_cache_get_config(c, &cfg, &L));
    const int P = L.page_tokens;
    float *k = malloc((size_t)n * H * D * sizeof *k), *v = malloc((size_t)n * H * D * sizeof *v);
    float *q = malloc((size_t)NQ * D * sizeof *q), *o1 = malloc((size_t)NQ * D * sizeof *o1), *o2 = malloc((size_t)NQ * D * sizeof *o2);
    float *o3 = malloc((size_t)NQ * D * sizeof *o3);
    float *rk = malloc((size_t)n * H * D * sizeof *rk), *rv = malloc((size_t)n * H * D * sizeof *rv);
    float *bk = malloc((size_t)n * H * D * sizeof *bk), *bv = malloc((size_t)n * H * D * sizeof *bv);
    tu_fill_kv(k, v, (size_t)n, H, D);
    for (int i = 0; i < NQ * D; i++) q[i] = (float)tu_normal();
    int32_t a = -1, b = -1;
    CHECK_OK(kvq_seq_new(c, &a));
    append_all(c, a, k, v, n);
    CHECK_OK(kvq_read(c, a, 1, 0, n, bk, bv));
    kvq_attn_params ap = kvq_attn_params_default(NQ);
    ap.window = Wn;
    CHECK_OK(kvq_attn_decode(c, 1, 1, &a, q, o1, &ap));
    CHECK_OK(kvq_attn_prefill(c, 1, a, 1, q, o3, &ap));

    /* bad input: named errors, nothing changed */
    snap s0 = take(c, &a, 1);
    CHECK_ERR(kvq_seq_drop_front(NULL, a, 1, 10), KVQ_ERR_NULL);
    CHECK_ERR(kvq_seq_drop_front(c, 5, 1, 10), KVQ_ERR_NO_SEQ);
    CHECK_ERR(kvq_seq_drop_front(c, a, NL, 10), KVQ_ERR_SHAPE);
    CHECK_ERR(kvq_seq_drop_front(c, a, -1, 10), KVQ_ERR_SHAPE);
    CHECK_ERR(kvq_seq_drop_front(c, a, 1, -1), KVQ_ERR_RANGE);
    CHECK_ERR(kvq_seq_drop_front(c, a, 1, n + 1), KVQ_ERR_RANGE);
    snap s1 = take(c, &a, 1);
    CHECK(same(s0, s1), "%s: a rejected kvq_seq_drop_front changed the cache", kvq_type_get_traits(t)->name);
    free(s0.data), free(s1.data);

    /* a fork shares every page: dropping in one sequence frees none of them */
    CHECK_OK(kvq_seq_fork(c, a, &b));
    kvq_cache_stats st0, st1, st2;
    CHECK_OK(kvq_cache_get_stats(c, &st0));
    int64_t cut = n - 1 - Wn + 1; /* the first key the last query sees */
    CHECK_OK(kvq_seq_drop_front(c, a, 1, cut));
    CHECK_OK(kvq_cache_get_stats(c, &st1));
    CHECK(st1.pages_free == st0.pages_free, "drop with a fork: %lld pages freed, none expected",
          (long long)(st1.pages_free - st0.pages_free));
    kvq_seq_view vw;
    CHECK_OK(kvq_seq_view_get(c, a, 1, &vw));
    int64_t dropped_pages = (cut - vw.sink_tokens) / P, kept = vw.sink_tokens + dropped_pages * P;
    CHECK(vw.dropped_tokens == dropped_pages * P && dropped_pages > 0, "dropped_tokens %lld, expected %lld",
          (long long)vw.dropped_tokens, (long long)(dropped_pages * P));
    for (int64_t i = 0; i < dropped_pages && i < vw.n_pages; i++) CHECK(vw.pages[i] == -1, "page %lld still listed", (long long)i);
    /* the fork still reads everything, and frees the shared pages when it goes */
    CHECK_OK(kvq_read(c, b, 1, 0, n, rk, rv));
    CHECK(!memcmp(rk, bk, (size_t)n * H * D * sizeof *rk) && !memcmp(rv, bv, (size_t)n * H * D * sizeof *rv),
          "the fork's tokens changed after a drop in its source");
    CHECK_OK(kvq_seq_free(c, b));
    CHECK_OK(kvq_cache_get_stats(c, &st2));
    CHECK(st2.pages_free - st0.pages_free >= dropped_pages, "freeing the fork gave back %lld pages, at least %lld expected",
          (long long)(st2.pages_free - st0.pages_free), (long long)dropped_pages);

    /* what is left reads back unchanged; windowed attention is bit-identical */
    CHECK_OK(kvq_read(c, a, 1, kept, n - kept, rk, rv));
    CHECK(!memcmp(rk, bk + (size_t)kept * H * D, (size_t)(n - kept) * H * D * sizeof *rk) &&
              !memcmp(rv, bv + (size_t)kept * H * D, (size_t)(n - kept) * H * D * sizeof *rv),
          "the kept tokens changed");
    if (vw.sink_tokens) CHECK_OK(kvq_read(c, a, 1, 0, vw.sink_tokens, rk, rv));
    CHECK_OK(kvq_attn_decode(c, 1, 1, &a, q, o2, &ap));
    CHECK(!memcmp(o1, o2, (size_t)NQ * D * sizeof *o1), "%s: decode after the drop differs", kvq_type_get_traits(t)->name);
    /* layer 0 was not dropped: it still reads from 0 */
    CHECK_OK(kvq_read(c, a, 0, 0, n, rk, rv));

    /* uses that reach a dropped token */
    s0 = take(c, &a, 1);
    CHECK_ERR(kvq_read(c, a, 1, kept - 1, 1, rk, rv), KVQ_ERR_RANGE);
    CHECK_ERR(kvq_read(c, a, 1, 0, n, rk, rv), KVQ_ERR_RANGE);
    CHECK_ERR(kvq_seq_truncate(c, a, kept - 1), KVQ_ERR_RANGE);
    kvq_attn_params wide = ap;
    wide.window = Wn + P + 1;
    CHECK_ERR(kvq_attn_decode(c, 1, 1, &a, q, o2, &wide), KVQ_ERR_RANGE);
    CHECK_ERR(kvq_attn_prefill(c, 1, a, 1, q, o2, &wide), KVQ_ERR_RANGE);
    CHECK_OK(kvq_attn_prefill(c, 1, a, 1, q, o2, &ap));
    CHECK(!memcmp(o3, o2, (size_t)NQ * D * sizeof *o3), "%s: prefill after the drop differs", kvq_type_get_traits(t)->name);
    wide.window = 0;
    CHECK_ERR(kvq_attn_decode(c, 1, 1, &a, q, o2, &wide), KVQ_ERR_RANGE);
    CHECK_OK(kvq_seq_drop_front(c, a, 1, 0)); /* at or below what was dropped: a no-op */
    s1 = take(c, &a, 1);
    CHECK(s1.st.pages_free == s0.st.pages_free && s1.st.tokens == s0.st.tokens, "a rejected use changed the cache");
    free(s0.data), free(s1.data);

    /* the sequence goes on: appends reuse the freed pages, truncate past the dropped tokens works */
    CHECK_OK(kvq_seq_truncate(c, a, kept + 1));
    append_all(c, a, k, v, 50);
    CHECK_OK(kvq_seq_free(c, a));
    CHECK_OK(kvq_cache_get_stats(c, &st2));
    CHECK(st2.pages_free == st2.pages_total, "%lld pages leaked", (long long)(st2.pages_total - st2.pages_free));
    free(k), free(v), free(q), free(o1), free(o2), free(o3), free(rk), free(rv), free(bk), free(bv);
    kvq_cache_free(c);
}

int main(void) {
    tu_seed(11);
    for (int t = 0; t < KVQ_TYPE_COUNT; t++)
        if (kvq_type_get_traits((kvq_type)t)->implemented) {
            test_drop_front((kvq_type)t, 0);
            test_drop_front((kvq_type)t, 3);
        }
    for (int t = 0; t < KVQ_TYPE_COUNT; t++) {
        if (!kvq_type_get_traits((kvq_type)t)->implemented) continue;
        bool grouped = kvq_type_get_traits((kvq_type)t)->grouped;
        static const int Ss[] = {1, 4, 16, 64, 67};
        for (int i = 0; i < 5; i++) test_sinks((kvq_type)t, Ss[i], grouped ? -1 : i % 2 ? 0 : 5);
    }
    test_sinks(KVQ_TYPE_Q4, 100, 0);
    test_sinks_full();
    g_sinks = 5; /* the same failure paths with sinks */
    test_every_oom_path();
    test_full_then_free();
    g_sinks = 0;
    test_create_oom();
    test_every_oom_path();
    test_sizing_overflow();
    test_window_growth();
    for (int t = 0; t < KVQ_TYPE_COUNT; t++)
        if (kvq_type_get_traits((kvq_type)t)->implemented) test_accounting_fork_truncate((kvq_type)t);
    /* 8-bit windows (kvq.h section 10): the same accounting, growth, fork, truncate (tokens back from the pages are
     * stored at 8 bits again), sinks and failure paths, for each role set */
    for (g_window8 = 1; g_window8 <= 3; g_window8++) {
        test_window_growth();
        test_accounting_fork_truncate(g_window8 == 2 ? KVQ_TYPE_Q3 : KVQ_TYPE_Q4);
        test_accounting_fork_truncate(KVQ_TYPE_Q8); /* no window (R = 0): nothing changes */
        test_sinks(KVQ_TYPE_Q2, 4 * g_window8 - 3, -1);
        if (g_window8 == 3) test_every_oom_path();
    }
    g_window8 = 0;
    test_bad_input();
    test_full_then_free();
    return tu_finish("test_cache");
}
