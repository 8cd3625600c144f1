/* SQuat keys (kvq.h section 10; "SQuat: Subspace-orthogonal KV cache quantization").
 *
 * Attention reads a key only through q . k. If the queries of a head live mostly in an r-dimensional subspace
 * (basis B, D x r), the part of a key's quantization error e = k - k^ inside that subspace is what moves the logits;
 * the part orthogonal to it barely does. So each key is quantized channel by channel, and after channel j the
 * channels not yet quantized absorb its error so as to minimize, per token,
 *     e^T M e,  M = B B^T + lambda I
 * (the error in the query subspace, plus a ridge that keeps the total error from growing without bound). That is
 * OBQ / GPTQ with M as the "Hessian": with U the upper Cholesky factor of M^-1 (M^-1 = U^T U), quantizing channel j
 * with error d_j updates x[j+1..] -= (d_j / U[j][j]) U[j][j+1..]. For an orthonormal B, M^-1 has the closed form
 * (I - B B^T / (1 + lambda)) / lambda, so U comes from B alone: computed per key group (D^3 / 6 flops, against the
 * group's G D^2 / 2 of updates) instead of stored (D^2 floats per head and sequence).
 *
 * Keys of the grouped types are quantized per channel over G tokens (KIVI), so the channel order is also the order
 * in which per-channel (scale, min) are fixed: channel j's range is taken over its updated values, after channels
 * 0..j-1 pushed their errors into it. Only the values written change: the page layout and every kernel are as for
 * plain quantization. */
#include "internal.h"

#include <stdlib.h>

#define FN_SET "kvq_seq_set_key_subspace"
#define FN_GET "kvq_seq_get_key_subspace"

size_t kvq__squat_bytes(const kvq_cache *c) {
    int r = c->cfg.squat_rank;
    if (r <= 0) return 0;
    size_t n = (size_t)c->cfg.n_layers * c->L.n_kv_heads;
    return n * (size_t)c->L.head_dim * r * sizeof(float) + n;
}

static uint8_t *flags_of(const kvq_cache *c, const kvq_seq *q) {
    size_t n = (size_t)c->cfg.n_layers * c->L.n_kv_heads;
    return (uint8_t *)(q->squat + n * (size_t)c->L.head_dim * c->cfg.squat_rank);
}

const float *kvq__squat_basis(const kvq_cache *c, const kvq_seq *q, int layer, int h) {
    if (!q->squat) return NULL;
    size_t i = (size_t)layer * c->L.n_kv_heads + h;
    return flags_of(c, q)[i] ? q->squat + i * (size_t)c->L.head_dim * c->cfg.squat_rank : NULL;
}

/* auto: r / D, the mean eigenvalue of B B^T (its trace r over D channels): the ridge weighs the total error as much
 * as the subspace's error per dimension. Measured on SmolLM2 (kvq.h section 10, r = 8, D = 64): lambda 0.0125 / 0.1 /
 * 1 gave q4 KLD 0.00317 / 0.00310 / 0.00336 (plain 0.00394), q3 0.0142 / 0.0124 / - (plain 0.0200): smaller lambdas
 * cancel more of the subspace error but widen the later channels' ranges, larger ones cancel less */
float kvq__squat_lambda(const kvq_cache *c) {
    if (c->cfg.squat_lambda > 0) return c->cfg.squat_lambda;
    return (float)c->cfg.squat_rank / (float)c->L.head_dim;
}

void kvq__squat_key_group_ref(kvq_type t, const uint8_t *lv16, bool qnorm, float *x, int G, int D, const float *B, int r,
                              float lambda, uint8_t *rows, size_t row_bytes, uint16_t *scale_min, double *U,
                              uint16_t *ores, uint8_t *oidx, const kvq__p8q *p8) {
    /* M^-1 = (I - B B^T / (1 + lambda)) / lambda, then its Cholesky factor in place (lower L, M^-1 = L L^T; U = L^T:
     * U[j][k] = L[k][j]) */
    double inv1 = 1.0 / (1.0 + (double)lambda), invl = 1.0 / (double)lambda;
    for (int i = 0; i < D; i++)
        for (int j = 0; j <= i; j++) {
            double s = 0;
            for (int k = 0; k < r; k++) s += (double)B[(size_t)i * r + k] * B[(size_t)j * r + k];
            U[(size_t)i * D + j] = ((i == j) - s * inv1) * invl;
        }
    for (int j = 0; j < D; j++) {
        double d = U[(size_t)j * D + j];
        for (int k = 0; k < j; k++) d -= U[(size_t)j * D + k] * U[(size_t)j * D + k];
        d = d > 1e-300 ? sqrt(d) : 1e-150; /* M^-1 is positive definite (eigenvalues >= 1 / (lambda (1 + lambda))) */
        U[(size_t)j * D + j] = d;
        for (int i = j + 1; i < D; i++) {
            double s = U[(size_t)i * D + j];
            for (int k = 0; k < j; k++) s -= U[(size_t)i * D + k] * U[(size_t)j * D + k];
            U[(size_t)i * D + j] = s / d;
        }
    }
    for (int i = 0; i < G; i++) memset(rows + (size_t)i * row_bytes, 0, row_bytes);
    float deq[128]; /* G <= 128 (kvq_page_layout_make) */
    for (int j = 0; j < D; j++) {
        kvq__quant_key_channel(t, lv16, qnorm, x, G, D, j, rows, row_bytes, scale_min, deq, ores ? ores + j : NULL,
                               oidx ? oidx + j : NULL, p8);
        double ujj = U[(size_t)j * D + j];
        for (int i = 0; i < G; i++) {
            float *xi = x + (size_t)i * D;
            double e = ((double)xi[j] - deq[i]) / ujj;
            if (e == 0) continue;
            for (int k = j + 1; k < D; k++) {
                float v = (float)(xi[k] - e * U[(size_t)k * D + j]);
                /* the stored (scale, min) are fp16: an update never takes a value past its range */
                xi[k] = v > 65504.0f ? 65504.0f : v < -65504.0f ? -65504.0f : v;
            }
        }
    }
}

static kvq_status check_args(const kvq_cache *c, int32_t seq, int layer, int kv_head, const char *fn) {
    kvq_status s;
    if ((s = kvq__check_seq(c, seq, fn)) || (s = kvq__check_layer(c, layer, fn))) return s;
    if (kv_head < 0 || kv_head >= c->L.n_kv_heads)
        return kvq__fail(KVQ_ERR_SHAPE, "%s: kv_head %d outside 0..%d", fn, kv_head, c->L.n_kv_heads - 1);
    if (c->cfg.squat_rank == 0)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: the cache has squat_rank = 0 (SQuat off: set it in the config)", fn);
    return KVQ_OK;
}

/* A D x r basis (row-major) between the caller's key frame and the stored one: each column through the keys'
 * rotation of `layer` (inverse 0: into the stored frame, 1: back), copied as is when keys are not rotated. */
static void basis_frame(const kvq_cache *c, int layer, const float *src, float *dst, int inverse) {
    const int D = c->L.head_dim, r = c->cfg.squat_rank;
    float col[256];
    kvq__rot rk;
    kvq__rot_init(&rk, c->cfg.rotation_seed, kvq__rot_layer(c, layer), KVQ_KEY, D);
    for (int j = 0; j < r; j++) {
        for (int i = 0; i < D; i++) col[i] = src[(size_t)i * r + j];
        if (kvq__rotated(c, KVQ_KEY)) kvq__rot_apply(&rk, col, inverse);
        for (int i = 0; i < D; i++) dst[(size_t)i * r + j] = col[i];
    }
}

kvq_status kvq_seq_set_key_subspace(kvq_cache *c, int32_t seq, int layer, int kv_head, const float *basis) {
    KVQ_CHECK_NULL(c, FN_SET);
    kvq_status s = check_args(c, seq, layer, kv_head, FN_SET);
    if (s) return s;
    kvq_seq *q = &c->seqs[seq];
    int D = c->L.head_dim, r = c->cfg.squat_rank;
    size_t idx = (size_t)layer * c->L.n_kv_heads + kv_head;
    if (!basis) {
        if (q->squat) flags_of(c, q)[idx] = 0;
        return KVQ_OK;
    }
    for (int i = 0; i < D * r; i++)
        if (!isfinite(basis[i]))
            return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: basis[%d] = %g is not finite", FN_SET, i, (double)basis[i]);
    for (int a = 0; a < r; a++)
        for (int b = a; b < r; b++) {
            double d = 0;
            for (int i = 0; i < D; i++) d += (double)basis[(size_t)i * r + a] * basis[(size_t)i * r + b];
            if (fabs(d - (a == b)) > 1e-3)
                return kvq__fail(KVQ_ERR_INVALID_ARG,
                                 "%s: the basis is not orthonormal: column %d . column %d = %g (must be %d within 1e-3)",
                                 FN_SET, a, b, d, a == b);
        }
    if (!q->squat) {
        q->squat = kvq__calloc(1, kvq__squat_bytes(c));
        if (!q->squat)
            return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no memory for the subspaces of sequence %d (%zu bytes)", FN_SET,
                             (int)seq, kvq__squat_bytes(c));
    }
    /* into the stored frame: R B (columns rotated like keys) */
    basis_frame(c, layer, basis, q->squat + idx * (size_t)D * r, 0);
    flags_of(c, q)[idx] = 1;
    return KVQ_OK;
}

kvq_status kvq_seq_get_key_subspace(const kvq_cache *c, int32_t seq, int layer, int kv_head, float *basis, int *is_set) {
    KVQ_CHECK_NULL(c, FN_GET);
    KVQ_CHECK_NULL(is_set, FN_GET);
    kvq_status s = check_args(c, seq, layer, kv_head, FN_GET);
    if (s) return s;
    const float *src = kvq__squat_basis(c, &c->seqs[seq], layer, kv_head);
    *is_set = src != NULL;
    if (!src || !basis) return KVQ_OK;
    basis_frame(c, layer, src, basis, 1); /* back to the caller's frame: R^T B */
    return KVQ_OK;
}
