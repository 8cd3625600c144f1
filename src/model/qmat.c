/* qmat.c: quantized weight matrices (qmat.h): the scalar _ref kernels, the table choice and the two product paths.
 * The AVX2 and AVX-512 kernels are in qmat_avx2.c and qmat_avx512.c. */
#include "qmat.h"

#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <string.h>

#include "model_err.h"


/* Measured crossover of the two paths: see qmat_sgemm_min_n. */
#define QMAT_SGEMM_MIN_N 16

static float f16(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | p[1] << 8);
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        float v = ldexpf((float)man, -24);
        return sign ? -v : v;
    }
    bits = exp == 31 ? sign | 0x7f800000u | man << 13 : sign | (exp + 112) << 23 | man << 13;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---- scalar _ref kernels: one row of W against x, block by block, each block's sum(q x) in fp32 scaled once ---- */

static float dot_f32_ref(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    float s = 0;
    for (int i = 0; i < cols; i++) {
        float v;
        memcpy(&v, w + 4 * i, 4);
        s += v * x[i];
    }
    return s;
}
static float dot_f16_ref(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    float s = 0;
    for (int i = 0; i < cols; i++) s += f16(w + 2 * i) * x[i];
    return s;
}
static float dot_bf16_ref(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    float s = 0;
    for (int i = 0; i < cols; i++) {
        uint32_t b = (uint32_t)(w[2 * i] | w[2 * i + 1] << 8) << 16;
        float v;
        memcpy(&v, &b, 4);
        s += v * x[i];
    }
    return s;
}
/* Q4_0: x = d (q - 8); byte j holds element j (low nibble) and j + 16 (high) */
static float dot_q4_0_ref(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    float acc = 0;
    for (int b = 0; b < cols / 32; b++, w += 18, x += 32) {
        float s = 0;
        for (int j = 0; j < 16; j++) s += (float)((w[2 + j] & 15) - 8) * x[j] + (float)((w[2 + j] >> 4) - 8) * x[j + 16];
        acc += f16(w) * s;
    }
    return acc;
}
/* Q4_1: x = d q + m: d sum(q x) + m sum(x) */
static float dot_q4_1_ref(int cols, const uint8_t *w, const float *x, const float *xs) {
    float acc = 0;
    for (int b = 0; b < cols / 32; b++, w += 20, x += 32) {
        float s = 0;
        for (int j = 0; j < 16; j++) s += (float)(w[4 + j] & 15) * x[j] + (float)(w[4 + j] >> 4) * x[j + 16];
        acc += f16(w) * s + f16(w + 2) * xs[b];
    }
    return acc;
}
/* Q5_0: x = d (q - 16), bit j of the u32 at byte 2 is bit 4 of element j */
static float dot_q5_0_ref(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    float acc = 0;
    for (int b = 0; b < cols / 32; b++, w += 22, x += 32) {
        uint32_t qh = (uint32_t)w[2] | (uint32_t)w[3] << 8 | (uint32_t)w[4] << 16 | (uint32_t)w[5] << 24;
        float s = 0;
        for (int j = 0; j < 16; j++) {
            int lo = (w[6 + j] & 15) | (int)((qh >> j) & 1) << 4, hi = (w[6 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            s += (float)(lo - 16) * x[j] + (float)(hi - 16) * x[j + 16];
        }
        acc += f16(w) * s;
    }
    return acc;
}
static float dot_q8_0_ref(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    float acc = 0;
    for (int b = 0; b < cols / 32; b++, w += 34, x += 32) {
        float s = 0;
        for (int j = 0; j < 32; j++) s += (float)(int8_t)w[2 + j] * x[j];
        acc += f16(w) * s;
    }
    return acc;
}
/* Q4_K/Q5_K sub-block scales and mins (gguf.c's k4_scale_min: 6 bits each in 12 bytes) */
static void k4_scales(const uint8_t *q, float *sc, float *mn) {
    for (int j = 0; j < 8; j++) {
        int s, m;
        if (j < 4) s = q[j] & 63, m = q[j + 4] & 63;
        else s = (q[j + 4] & 15) | (q[j - 4] >> 6) << 4, m = (q[j + 4] >> 4) | (q[j] >> 6) << 4;
        sc[j] = (float)s, mn[j] = (float)m;
    }
}
/* Q4_K: 8 sub-blocks of 32: x = d sc q - dmin m; each 32 bytes of nibbles hold sub-blocks 2i (low), 2i+1 (high) */
static float dot_q4_k_ref(int cols, const uint8_t *w, const float *x, const float *xs) {
    float acc = 0;
    for (int b = 0; b < cols / 256; b++, w += 144, x += 256, xs += 8) {
        float sc[8], mn[8], s_all = 0, m_all = 0;
        k4_scales(w + 4, sc, mn);
        const uint8_t *q = w + 16;
        for (int j = 0; j < 8; j += 2, q += 32) {
            float s0 = 0, s1 = 0;
            for (int l = 0; l < 32; l++) s0 += (float)(q[l] & 15) * x[32 * j + l], s1 += (float)(q[l] >> 4) * x[32 * j + 32 + l];
            s_all += sc[j] * s0 + sc[j + 1] * s1;
            m_all += mn[j] * xs[j] + mn[j + 1] * xs[j + 1];
        }
        acc += f16(w) * s_all - f16(w + 2) * m_all;
    }
    return acc;
}
/* Q5_K: Q4_K plus bit j of qh[l] as bit 4 of element 32 j + l */
static float dot_q5_k_ref(int cols, const uint8_t *w, const float *x, const float *xs) {
    float acc = 0;
    for (int b = 0; b < cols / 256; b++, w += 176, x += 256, xs += 8) {
        float sc[8], mn[8], s_all = 0, m_all = 0;
        k4_scales(w + 4, sc, mn);
        const uint8_t *qh = w + 16, *q = w + 48;
        for (int j = 0; j < 8; j += 2, q += 32) {
            float s0 = 0, s1 = 0;
            for (int l = 0; l < 32; l++) {
                s0 += (float)((q[l] & 15) | ((qh[l] >> j) & 1) << 4) * x[32 * j + l];
                s1 += (float)((q[l] >> 4) | ((qh[l] >> (j + 1)) & 1) << 4) * x[32 * j + 32 + l];
            }
            s_all += sc[j] * s0 + sc[j + 1] * s1;
            m_all += mn[j] * xs[j] + mn[j + 1] * xs[j + 1];
        }
        acc += f16(w) * s_all - f16(w + 2) * m_all;
    }
    return acc;
}
/* Q6_K: 16 sub-blocks of 16, int8 scales, x = d sc (q - 32) (layout: gguf.c deq_q6_k) */
static float dot_q6_k_ref(int cols, const uint8_t *w, const float *x, const float *xs) {
    (void)xs;
    float acc = 0;
    for (int b = 0; b < cols / 256; b++, w += 210, x += 256) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192);
        float s_all = 0;
        for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8) {
            const float *xh = x + 128 * half;
            for (int g = 0; g < 2; g++) { /* l in 16 g .. 16 g + 15: sub-blocks is = g (+2, +4, +6) */
                float s[4] = {0, 0, 0, 0};
                for (int l = 16 * g; l < 16 * g + 16; l++) {
                    s[0] += (float)(((ql[l] & 15) | ((qh[l] >> 0) & 3) << 4) - 32) * xh[l];
                    s[1] += (float)(((ql[l + 32] & 15) | ((qh[l] >> 2) & 3) << 4) - 32) * xh[l + 32];
                    s[2] += (float)(((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32) * xh[l + 64];
                    s[3] += (float)(((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32) * xh[l + 96];
                }
                for (int k = 0; k < 4; k++) s_all += (float)sc[g + 2 * k] * s[k];
            }
        }
        acc += f16(w + 208) * s_all;
    }
    return acc;
}
/* The other types gguf.c reads (Q5_1, Q2_K, Q3_K): each block dequantized (gguf_dequantize_row), then multiplied. */
#define DOT_DEQ(name, type, be, bb)                                                                                \
    static float name(int cols, const uint8_t *w, const float *x, const float *xs) {                                \
        (void)xs;                                                                                                  \
        float acc = 0, tmp[be];                                                                                    \
        for (int b = 0; b < cols / (be); b++, w += (bb), x += (be)) {                                              \
            gguf_dequantize_row(type, w, tmp, be);                                                                 \
            float s = 0;                                                                                           \
            for (int j = 0; j < (be); j++) s += tmp[j] * x[j];                                                     \
            acc += s;                                                                                              \
        }                                                                                                          \
        return acc;                                                                                                \
    }
DOT_DEQ(dot_q5_1_deq, GGML_Q5_1, 32, 24)
DOT_DEQ(dot_q2_k_deq, GGML_Q2_K, 256, 84)
DOT_DEQ(dot_q3_k_deq, GGML_Q3_K, 256, 110)

const qmat_kernels qmat_kernels_ref = {
    "scalar",
    {[GGML_F32] = dot_f32_ref, [GGML_F16] = dot_f16_ref, [GGML_BF16] = dot_bf16_ref, [GGML_Q4_0] = dot_q4_0_ref,
     [GGML_Q4_1] = dot_q4_1_ref, [GGML_Q5_0] = dot_q5_0_ref, [GGML_Q5_1] = dot_q5_1_deq, [GGML_Q8_0] = dot_q8_0_ref,
     [GGML_Q2_K] = dot_q2_k_deq, [GGML_Q3_K] = dot_q3_k_deq, [GGML_Q4_K] = dot_q4_k_ref, [GGML_Q5_K] = dot_q5_k_ref,
     [GGML_Q6_K] = dot_q6_k_ref}};

/* The library's choice (attn.c's pick_kernels: KVQ_FORCE_SCALAR, KVQ_CPU_KERNELS, the CPU), read through
 * kvq_cpu_backend() so that weights and attention always run the same table. A missing entry falls back to the
 * scalar kernel of that type. */
const qmat_kernels *qmat_kernels_active(void) {
    const char *b = kvq_cpu_backend();
    const qmat_kernels *k = NULL;
    if (!strcmp(b, "avx512")) k = qmat_kernels_avx512();
    if (!k && (!strcmp(b, "avx512") || !strcmp(b, "avx2"))) k = qmat_kernels_avx2();
    return k ? k : &qmat_kernels_ref;
}

kvq_status qmat_init(qmat *w, uint32_t type, int rows, int cols, const uint8_t *data) {
    if (!w || !data) return kvqm_fail(KVQ_ERR_NULL, "qmat_init: NULL argument");
    if (rows < 1 || cols < 1) return kvqm_fail(KVQ_ERR_INVALID_ARG, "qmat_init: %d x %d matrix", rows, cols);
    uint64_t be, bb;
    if (type >= QMAT_NTYPES || !qmat_kernels_ref.dot[type] || !ggml_type_block(type, &be, &bb))
        return kvqm_fail(KVQ_ERR_FORMAT, "weights of ggml type %u (%s) cannot be multiplied", type, ggml_type_name(type));
    if ((uint64_t)cols % be)
        return kvqm_fail(KVQ_ERR_FORMAT, "a row of %d is not a multiple of the %s block (%llu)", cols, ggml_type_name(type),
                         (unsigned long long)be);
    w->type = type, w->rows = rows, w->cols = cols, w->data = data;
    w->row_bytes = (size_t)((uint64_t)cols / be * bb);
    return KVQ_OK;
}

size_t qmat_bytes(const qmat *w) { return (size_t)w->rows * w->row_bytes; }

void qmat_row(const qmat *w, int r, float *out) {
    gguf_dequantize_row(w->type, w->data + (size_t)r * w->row_bytes, out, (uint64_t)w->cols);
}

/* The tile: QMAT_TILE_FLOATS, and at least one row per thread however long the rows. */
static size_t tile_floats(int max_cols, int n_threads) {
    size_t need = (size_t)max_cols * (size_t)(n_threads > 1 ? n_threads : 1);
    return need > QMAT_TILE_FLOATS ? need : QMAT_TILE_FLOATS;
}

size_t qmat_work_bytes(int max_n, int max_cols, int n_threads) {
    return ((size_t)max_n * (size_t)(max_cols / 32 + 1) + tile_floats(max_cols, n_threads)) * sizeof(float);
}

void qmat_work_init(qmat_work *wk, void *buf, int max_n, int max_cols, int n_threads) {
    wk->tile = buf;
    wk->tile_floats = tile_floats(max_cols, n_threads);
    wk->xsum = wk->tile + wk->tile_floats;
    wk->max_n = max_n, wk->max_cols = max_cols, wk->n_threads = n_threads > 1 ? n_threads : 1;
}

/* Types whose kernels read the block sums of x (a min or an offset applied as m * sum(x)). */
static int needs_xsum(uint32_t t) { return t == GGML_Q4_1 || t == GGML_Q4_K || t == GGML_Q5_K; }

typedef struct dot_job {
    qmat_dot_fn dot;
    const qmat *w;
    const float *x, *xsum;
    float *y;
    int n, accumulate, chunk;
} dot_job;

static void dot_task(void *arg, int task, int thread) {
    (void)thread;
    const dot_job *j = arg;
    const qmat *w = j->w;
    int cols = w->cols, rows = w->rows, nb = cols / 32, r0 = task * j->chunk;
    int r1 = r0 + j->chunk < rows ? r0 + j->chunk : rows;
    for (int r = r0; r < r1; r++) {
        const uint8_t *wr = w->data + (size_t)r * w->row_bytes;
        for (int t = 0; t < j->n; t++) {
            float v = j->dot(cols, wr, j->x + (size_t)t * cols, j->xsum + (size_t)t * nb);
            float *o = j->y + (size_t)t * rows + r;
            *o = j->accumulate ? *o + v : v;
        }
    }
}

void qmat_mul_dot(const qmat_kernels *k, const qmat *w, const float *x, int n, float *y, int accumulate, float *xsum,
                  tpool *pool) {
    int cols = w->cols, rows = w->rows, nb = cols / 32;
    qmat_dot_fn dot = k->dot[w->type] ? k->dot[w->type] : qmat_kernels_ref.dot[w->type];
    if (needs_xsum(w->type))
        for (int t = 0; t < n; t++)
            for (int b = 0; b < nb; b++) {
                const float *p = x + (size_t)t * cols + 32 * b;
                float s = 0;
                for (int j = 0; j < 32; j++) s += p[j];
                xsum[(size_t)t * nb + b] = s;
            }
    /* About 4 chunks per thread, taken dynamically (a thread held up by the OS leaves its share to the others), each
     * a multiple of 16 rows (16 rows of y per token share cache lines: no two threads write one line); small
     * matrices (< 64 rows) run on the calling thread. */
    int nthr = rows < 64 ? 1 : tpool_threads(pool);
    int chunk = (rows + 4 * nthr - 1) / (4 * nthr);
    chunk = (chunk + 15) / 16 * 16;
    dot_job j = {dot, w, x, xsum, y, n, accumulate, chunk};
    tpool_run(nthr > 1 ? pool : NULL, (rows + chunk - 1) / chunk, dot_task, &j);
}

/* Crossover of the dot path and the dequantize + sgemm path, measured with `test_qmat --bench SmolLM2.gguf T` (its
 * layer-0 Q4_1 matrices, AMD EPYC with AVX-512, 1 and 2 threads, a loaded machine): the dot path costs ~120 us per
 * token for a 1536 x 576 matrix (it re-reads the row per token), dequantize + sgemm 0.6 ms at n = 1 growing slowly
 * (1.3-1.6 ms at n = 16, 2.1-2.6 ms at 32); ffn_gate, 1 thread: n = 12 1337 / 1821 us, n = 16 1956 / 1345 us. So
 * n >= 16 takes the sgemm path. */
int qmat_sgemm_min_n(void) { return QMAT_SGEMM_MIN_N; }

/* The pool's threads each call sgemm: OpenBLAS's own threads would only compete with them for the cores. */
static pthread_once_t blas_once = PTHREAD_ONCE_INIT;
static void blas_single_thread(void) { openblas_set_num_threads(1); }

typedef struct tile_job {
    const qmat *w;
    const float *x;
    float *y;
    int n, accumulate, rows_per_task;
    float *tile;
    size_t tile_stride; /* floats of one thread's share of the tile */
} tile_job;

/* One task: rows [r0, r0 + rows_per_task) of W dequantized into this thread's share of the tile, then one sgemm
 * on the calling thread (BLAS single-threaded: qmat_mul_tiles sets it once, the pool being the only threads). */
static void tile_task(void *arg, int task, int thread) {
    const tile_job *j = arg;
    const qmat *w = j->w;
    int cols = w->cols, r0 = task * j->rows_per_task;
    int nr = r0 + j->rows_per_task <= w->rows ? j->rows_per_task : w->rows - r0;
    float *tile = j->tile + j->tile_stride * (size_t)thread;
    for (int r = 0; r < nr; r++) qmat_row(w, r0 + r, tile + (size_t)r * cols);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->n, nr, cols, 1.0f, j->x, cols, tile, cols,
                j->accumulate ? 1.0f : 0.0f, j->y + r0, w->rows);
}

void qmat_mul_tiles(const qmat *w, const float *x, int n, float *y, int accumulate, qmat_work *wk, tpool *pool) {
    int nthr = tpool_threads(pool);
    if (nthr > wk->n_threads) nthr = 1; /* the scratch has tiles for fewer threads than the pool hands out */
    if (nthr > 1) pthread_once(&blas_once, blas_single_thread);
    size_t stride = wk->tile_floats / (size_t)nthr;
    /* rows per task: what one thread's share of the tile holds, and at most an equal share of W per thread */
    int cap = (int)(stride / (size_t)w->cols), even = (w->rows + nthr - 1) / nthr;
    int rpt = cap < even ? cap : even;
    tile_job j = {w, x, y, n, accumulate, rpt, wk->tile, stride};
    int tasks = (w->rows + rpt - 1) / rpt;
    if (nthr == 1) pool = NULL;
    tpool_run(pool, tasks, tile_task, &j);
}

kvq_status qmat_mul(const qmat *w, const float *x, int n, float *y, int accumulate, qmat_work *wk, tpool *pool) {
    if (!w || !x || !y || !wk) return kvqm_fail(KVQ_ERR_NULL, "qmat_mul: NULL argument");
    if (n < 1 || n > wk->max_n || w->cols > wk->max_cols)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "qmat_mul: %d tokens x %d columns (scratch for %d x %d)", n, w->cols,
                         wk->max_n, wk->max_cols);
    if (n < QMAT_SGEMM_MIN_N) {
        qmat_mul_dot(qmat_kernels_active(), w, x, n, y, accumulate, wk->xsum, pool);
        return KVQ_OK;
    }
    qmat_mul_tiles(w, x, n, y, accumulate, wk, pool);
    return KVQ_OK;
}
