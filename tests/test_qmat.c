/* Quantized weight products (src/model/qmat.h): every weight type x every kernel table the CPU has, against
 * dequantize-then-multiply in double (gguf_dequantize_row is checked bit for bit against the gguf package by
 * test_gguf_quants).
 *
 * Bound. A kernel sums the products q_j x_j of a block in fp32, scales the block sum once (d, d*sc) and adds the
 * min term m * sum(x) from per-32 block sums; each of those fp32 sums of k terms is off by at most k u sum|terms|
 * (u = 2^-24), and a term is at most (|w_j| + |m|) |x_j| with |m| <= max|w| of the row for the random blocks used
 * here (a code 0 occurs in every block with probability 1 - (15/16)^32). The sums are nested over at most
 * 32 (in a block or lane) + cols / 8 (lanes, blocks) + 16 (horizontal) terms, so
 *     |y - y_exact| <= (48 + cols / 8) u sum_j (|w_j| + max|w|) |x_j|,
 * about 1e-5 of that sum at cols 512: a scale off by one fp16 step (1e-3), a wrong block or a zero output fails.
 * Shapes: odd row counts (threads get unequal shares), 1..4 blocks per row, n = 1..17 tokens and a prefill batch
 * (the dequantize + sgemm path), = and +=.
 * usage: test_qmat [model.gguf ...]  (real matrices of each GGUF given: a slice of every weight type it has)
 *        test_qmat --bench model.gguf [threads]  (times the two paths of qmat_mul per token count on the model's
 *                                                 layer-0 matrices: how QMAT_SGEMM_MIN_N was chosen) */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gguf.h"
#include "model_err.h"
#include "qmat.h"

static int failures, checks;
#define CHECK(cond, ...)                                                                                          \
    do {                                                                                                          \
        checks++;                                                                                                 \
        if (!(cond)) {                                                                                            \
            failures++;                                                                                           \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                                   \
            fprintf(stderr, __VA_ARGS__);                                                                         \
            fputc('\n', stderr);                                                                                  \
        }                                                                                                         \
    } while (0)

static uint64_t rng = 0x853c49e6748fea9bull;
static uint32_t rnd(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static float urand(void) { return (float)((rnd() & 0xffffff) / 8388608.0 - 1.0); } /* [-1, 1) */

static uint16_t to_f16(float f) { /* finite normal values only (the scales below) */
    uint32_t b;
    memcpy(&b, &f, 4);
    uint32_t sign = (b >> 16) & 0x8000, e = (b >> 23) & 0xff, m = b & 0x7fffff;
    return (uint16_t)(sign | (e - 112) << 10 | m >> 13);
}

/* Byte offsets of the fp16 scale fields of one block (ggml's layouts; tests/data/make_quant_golden.py) */
static int fp16_fields(uint32_t t, int off[2]) {
    switch (t) {
    case GGML_Q4_0: case GGML_Q5_0: case GGML_Q8_0: off[0] = 0; return 1;
    case GGML_Q4_1: case GGML_Q5_1: case GGML_Q4_K: case GGML_Q5_K: off[0] = 0, off[1] = 2; return 2;
    case GGML_Q2_K: off[0] = 80, off[1] = 82; return 2;
    case GGML_Q3_K: off[0] = 108; return 1;
    case GGML_Q6_K: off[0] = 208; return 1;
    default: return 0;
    }
}

/* Random rows of type t: random codes, scales of magnitude 2^-10 .. 2^-4 with either sign (float types: values). */
static uint8_t *random_matrix(uint32_t t, int rows, int cols, size_t *row_bytes) {
    uint64_t be, bb;
    ggml_type_block(t, &be, &bb);
    *row_bytes = (size_t)((uint64_t)cols / be * bb);
    size_t n = *row_bytes * (size_t)rows;
    uint8_t *p = malloc(n);
    if (!p) abort();
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)rnd();
    if (t == GGML_F32 || t == GGML_F16 || t == GGML_BF16) {
        for (size_t i = 0; i < (size_t)rows * cols; i++) {
            float v = urand() * 0.1f;
            uint32_t b;
            memcpy(&b, &v, 4);
            if (t == GGML_F32) memcpy(p + 4 * i, &v, 4);
            else if (t == GGML_BF16) { uint16_t h = (uint16_t)(b >> 16); memcpy(p + 2 * i, &h, 2); }
            else { uint16_t h = to_f16(fabsf(v) < 1e-3f ? 1e-3f : v); memcpy(p + 2 * i, &h, 2); }
        }
        return p;
    }
    int off[2], nf = fp16_fields(t, off);
    for (size_t b = 0; b < n / bb; b++)
        for (int k = 0; k < nf; k++) {
            float v = ldexpf(1.0f + 0.5f * urand(), -4 - (int)(rnd() % 7)) * (rnd() & 1 ? 1.0f : -1.0f);
            uint16_t h = to_f16(v);
            memcpy(p + b * bb + (size_t)off[k], &h, 2);
        }
    return p;
}

/* y_exact[n][rows] in double and the bound of each output (see the top of the file). */
static void reference(const qmat *w, const float *x, int n, double *ye, double *bound) {
    float *row = malloc((size_t)w->cols * sizeof *row);
    if (!row) abort();
    for (int r = 0; r < w->rows; r++) {
        qmat_row(w, r, row);
        double wmax = 0;
        for (int j = 0; j < w->cols; j++) wmax = fmax(wmax, fabs(row[j]));
        for (int t = 0; t < n; t++) {
            double s = 0, a = 0;
            for (int j = 0; j < w->cols; j++) {
                s += (double)row[j] * x[(size_t)t * w->cols + j];
                a += (fabs(row[j]) + wmax) * fabs(x[(size_t)t * w->cols + j]);
            }
            ye[(size_t)t * w->rows + r] = s;
            bound[(size_t)t * w->rows + r] = (48.0 + w->cols / 8.0) * ldexp(1.0, -24) * a;
        }
    }
    free(row);
}

/* Worst error / bound over the outputs (> 1 fails); y holds y0 + the product when accumulating. */
static double worst(const float *y, const float *y0, const double *ye, const double *bound, size_t m) {
    double q = 0;
    for (size_t i = 0; i < m; i++) {
        double e = fabs((double)y[i] - (y0 ? (double)y0[i] : 0.0) - ye[i]);
        double r = isfinite(y[i]) ? e / bound[i] : INFINITY;
        if (r > q) q = r;
    }
    return q;
}

enum { MAXN = 64 };
static tpool *g_pools[3]; /* NULL (the caller), 2 threads, 3 threads (more than this machine may have cores) */

static void check_matrix(const qmat *w, const char *what, const qmat_kernels *const *tabs, int ntab, int nmax) {
    size_t xs_n = (size_t)MAXN * (size_t)w->cols, ys_n = (size_t)MAXN * (size_t)w->rows;
    float *x = malloc(xs_n * sizeof *x), *y = malloc(ys_n * sizeof *y), *y0 = malloc(ys_n * sizeof *y0);
    double *ye = malloc(ys_n * sizeof *ye), *bd = malloc(ys_n * sizeof *bd);
    void *wbuf = malloc(qmat_work_bytes(MAXN, w->cols, 3)), *wbuf1 = malloc(qmat_work_bytes(MAXN, w->cols, 1));
    if (!x || !y || !y0 || !ye || !bd || !wbuf || !wbuf1) abort();
    qmat_work wk, wk1;
    qmat_work_init(&wk, wbuf, MAXN, w->cols, 3);
    qmat_work_init(&wk1, wbuf1, MAXN, w->cols, 1);
    for (size_t i = 0; i < xs_n; i++) x[i] = urand();
    for (size_t i = 0; i < ys_n; i++) y0[i] = urand();
    reference(w, x, MAXN, ye, bd);
    double q_all = 0;
    for (int k = 0; k < ntab; k++) {
        double q = 0;
        for (int n = 1; n <= nmax; n++) {
            int acc = n % 3 == 0;
            if (acc) memcpy(y, y0, ys_n * sizeof *y);
            else memset(y, 0xff, ys_n * sizeof *y); /* NaN: every output must be written */
            qmat_mul_dot(tabs[k], w, x, n, y, acc, wk.xsum, g_pools[n % 3]);
            double qn = worst(y, acc ? y0 : NULL, ye, bd, (size_t)n * w->rows);
            CHECK(qn <= 1.0, "%s, %s kernels, n = %d%s: error %.3g x the bound", what, tabs[k]->name, n,
                  acc ? " (+=)" : "", qn);
            if (qn > q) q = qn;
        }
        if (q > q_all) q_all = q;
    }
    /* the public entry: the active table below the crossover, dequantize + sgemm at and above it, on each pool;
     * the last: a work sized for one thread with the 3-thread pool (the sgemm path then runs on the caller) */
    int ns[3] = {1, qmat_sgemm_min_n(), MAXN};
    for (int i = 0; i < 3; i++)
        for (int pi = 0; pi < 4; pi++) {
            int nn = pi == 3 ? MAXN : ns[i];
            memset(y, 0xff, ys_n * sizeof *y);
            kvq_status st = qmat_mul(w, x, nn, y, 0, pi == 3 ? &wk1 : &wk, g_pools[pi % 3]);
            double qn = st ? INFINITY : worst(y, NULL, ye, bd, (size_t)nn * w->rows);
            CHECK(qn <= 1.0, "%s, qmat_mul n = %d, pool %d: %s, error %.3g x the bound", what, nn, pi, kvq_strerror(st), qn);
            if (qn > q_all) q_all = qn;
            memcpy(y, y0, ys_n * sizeof *y);
            st = qmat_mul(w, x, nn, y, 1, pi == 3 ? &wk1 : &wk, g_pools[pi % 3]);
            qn = st ? INFINITY : worst(y, y0, ye, bd, (size_t)nn * w->rows);
            CHECK(qn <= 1.0, "%s, qmat_mul n = %d (+=), pool %d: %s, error %.3g x the bound", what, nn, pi, kvq_strerror(st), qn);
            if (qn > q_all) q_all = qn;
        }
    printf("%-28s %5d x %-5d %s: worst error %.3f of the bound\n", what, w->rows, w->cols, ggml_type_name(w->type), q_all);
    free(x), free(y), free(y0), free(ye), free(bd), free(wbuf), free(wbuf1);
}

static void check_errors(void) {
    qmat w;
    uint8_t buf[256] = {0};
    kvqm_clear_error();
    CHECK(qmat_init(&w, GGML_Q4_K, 2, 255, buf) == KVQ_ERR_FORMAT && strstr(kvqm_last_error(), "Q4_K block (256)"),
          "Q4_K row of 255: %s", kvqm_last_error());
    CHECK(qmat_init(&w, 15, 2, 256, buf) == KVQ_ERR_FORMAT && strstr(kvqm_last_error(), "15 (Q8_K)"), "Q8_K: %s",
          kvqm_last_error());
    CHECK(qmat_init(&w, 99, 2, 256, buf) == KVQ_ERR_FORMAT, "type 99");
    CHECK(qmat_init(&w, GGML_Q8_0, 0, 32, buf) == KVQ_ERR_INVALID_ARG, "0 rows");
    CHECK(qmat_init(NULL, GGML_Q8_0, 1, 32, buf) == KVQ_ERR_NULL && qmat_init(&w, GGML_Q8_0, 1, 32, NULL) == KVQ_ERR_NULL,
          "NULL");
    CHECK(qmat_init(&w, GGML_Q8_0, 3, 64, buf) == KVQ_OK && w.row_bytes == 68 && qmat_bytes(&w) == 204, "Q8_0 sizes");
    float x[64 * 3] = {0}, y[8];
    void *wkbuf = malloc(qmat_work_bytes(2, 64, 1));
    if (!wkbuf) abort();
    qmat_work wk;
    qmat_work_init(&wk, wkbuf, 2, 64, 1);
    CHECK(qmat_mul(&w, x, 3, y, 0, &wk, NULL) == KVQ_ERR_INVALID_ARG, "n beyond the work's max_n");
    CHECK(qmat_mul(&w, x, 0, y, 0, &wk, NULL) == KVQ_ERR_INVALID_ARG, "n = 0");
    CHECK(qmat_mul(&w, NULL, 1, y, 0, &wk, NULL) == KVQ_ERR_NULL, "NULL x");
    CHECK(qmat_mul(&w, x, 2, y, 0, &wk, NULL) == KVQ_OK && y[0] == 0 && y[5] == 0, "zero x, zero y");
    free(wkbuf);
    /* the table follows the library's choice */
    CHECK(!strcmp(qmat_kernels_active()->name, kvq_cpu_backend()), "active table %s, library's %s",
          qmat_kernels_active()->name, kvq_cpu_backend());
}

/* Real weights: the first rows of one matrix of every weight type in the file. */
static void check_file(const char *path, const qmat_kernels *const *tabs, int ntab) {
    gguf_file *f;
    if (gguf_open(path, &f)) {
        printf("(%s: %s; skipped)\n", path, kvqm_last_error());
        return;
    }
    int seen[QMAT_NTYPES] = {0};
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *t = &f->tensors[i];
        if (t->n_dims != 2 || t->type >= QMAT_NTYPES || seen[t->type] || t->type == GGML_F32) continue;
        seen[t->type] = 1;
        int rows = t->ne[1] < 67 ? (int)t->ne[1] : 67;
        qmat w;
        if (qmat_init(&w, t->type, rows, (int)t->ne[0], t->data)) continue;
        char what[96];
        snprintf(what, sizeof what, "%.*s", t->name.len > 27 ? 27 : (int)t->name.len, t->name.ptr);
        check_matrix(&w, what, tabs, ntab, 5);
    }
    gguf_close(f);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Seconds per call of one path (dot: 1, tiles: 0), the best of 5 runs of >= 20 ms each. */
static double time_path(const qmat *w, const float *x, int n, float *y, qmat_work *wk, tpool *thr, int dot) {
    double best = 1e9;
    for (int rep = 0; rep < 5; rep++) {
        int calls = 0;
        double t0 = now(), t;
        do {
            if (dot) qmat_mul_dot(qmat_kernels_active(), w, x, n, y, 0, wk->xsum, thr);
            else qmat_mul_tiles(w, x, n, y, 0, wk, thr);
            calls++;
        } while ((t = now() - t0) < 0.02);
        if (t / calls < best) best = t / calls;
    }
    return best;
}

static int bench(const char *path, int thr) {
    gguf_file *f;
    if (gguf_open(path, &f)) {
        fprintf(stderr, "%s: %s\n", path, kvqm_last_error());
        return 1;
    }
    static const char *const names[] = {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_gate.weight",
                                        "blk.0.ffn_down.weight"};
    static const int ns[] = {1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64};
    tpool *pool = NULL;
    if (tpool_create(thr, -1, &pool)) {
        fprintf(stderr, "%s\n", kvqm_last_error());
        return 1;
    }
    printf("%s, %d threads, %s kernels: microseconds per call, dot path / dequantize + sgemm path\n", path, thr,
           qmat_kernels_active()->name);
    printf("%-24s", "matrix");
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) printf(" %13d", ns[i]);
    printf("\n");
    for (size_t m = 0; m < sizeof names / sizeof names[0]; m++) {
        const gguf_tensor *t = gguf_find_tensor(f, names[m]);
        qmat w;
        if (!t || qmat_init(&w, t->type, (int)t->ne[1], (int)t->ne[0], t->data)) continue;
        float *x = malloc((size_t)64 * w.cols * sizeof *x), *y = malloc((size_t)64 * w.rows * sizeof *y);
        void *buf = malloc(qmat_work_bytes(64, w.cols, tpool_threads(pool)));
        if (!x || !y || !buf) abort();
        qmat_work wk;
        qmat_work_init(&wk, buf, 64, w.cols, tpool_threads(pool));
        for (size_t i = 0; i < (size_t)64 * w.cols; i++) x[i] = urand();
        printf("%-18s %-5s", names[m] + 6, ggml_type_name(w.type));
        for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
            printf(" %6.0f/%-6.0f", 1e6 * time_path(&w, x, ns[i], y, &wk, pool, 1), 1e6 * time_path(&w, x, ns[i], y, &wk, pool, 0));
        printf("\n");
        fflush(stdout);
        free(x), free(y), free(buf);
    }
    gguf_close(f);
    tpool_free(pool);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "--bench")) return bench(argv[2], argc > 3 ? atoi(argv[3]) : 2);
    if (tpool_create(2, -1, &g_pools[1]) || tpool_create(3, -1, &g_pools[2])) {
        fprintf(stderr, "test_qmat: thread pools: %s\n", kvqm_last_error());
        return 1;
    }
    const qmat_kernels *tabs[3] = {&qmat_kernels_ref};
    int ntab = 1;
    if (qmat_kernels_avx2()) tabs[ntab++] = qmat_kernels_avx2();
    else printf("(this CPU has no AVX2: the avx2 kernels are not tested)\n");
    if (qmat_kernels_avx512()) tabs[ntab++] = qmat_kernels_avx512();
    else printf("(this CPU has no AVX-512: the avx512 kernels are not tested)\n");
    static const uint32_t types[] = {GGML_F32,  GGML_F16,  GGML_BF16, GGML_Q4_0, GGML_Q4_1, GGML_Q5_0, GGML_Q5_1,
                                     GGML_Q8_0, GGML_Q2_K, GGML_Q3_K, GGML_Q4_K, GGML_Q5_K, GGML_Q6_K};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        uint32_t t = types[i];
        uint64_t be, bb;
        ggml_type_block(t, &be, &bb);
        /* rows odd; legacy: 1 and 3 blocks, K-quants: 1 and 2 super-blocks, float types: 37 and 96 columns */
        int shapes[2][2] = {{67, be == 1 ? 37 : (int)be}, {131, be == 1 ? 96 : be == 32 ? 96 : 512}};
        for (int s = 0; s < 2; s++) {
            size_t rb;
            uint8_t *data = random_matrix(t, shapes[s][0], shapes[s][1], &rb);
            qmat w;
            CHECK(qmat_init(&w, t, shapes[s][0], shapes[s][1], data) == KVQ_OK && w.row_bytes == rb, "%s init: %s",
                  ggml_type_name(t), kvqm_last_error());
            char what[40];
            snprintf(what, sizeof what, "random %s", ggml_type_name(t));
            check_matrix(&w, what, tabs, ntab, 17);
            free(data);
        }
    }
    check_errors();
    for (int a = 1; a < argc; a++) check_file(argv[a], tabs, ntab);
    printf("%d checks, %d failed (kernel tables:", checks, failures);
    for (int k = 0; k < ntab; k++) printf(" %s", tabs[k]->name);
    printf(")\n");
    tpool_free(g_pools[1]), tpool_free(g_pools[2]);
    return failures ? 1 : 0;
}
