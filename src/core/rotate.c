/* Randomized Walsh-Hadamard rotation of head vectors (kvq.h section 10).
 *
 * R = H diag(s) / sqrt(n) on each block of n channels: orthonormal, so q.k = Rq.Rk and sum p_i v_i =
 * R^T sum p_i R v_i, which lets the cache store rotated keys/values and attention rotate only the query and the
 * output. The random signs s spread a channel outlier over the whole block, which quantizes better.
 *
 * Signs come from splitmix64 seeded by (seed, layer, role): different per layer and per role at no cost (nothing
 * is stored), so a vector that one rotation happens to leave concentrated is not concentrated in every layer.
 * D = 64, 128, 256: one block. D = 80, 96: block-diagonal, blocks [0,64) and [64,D) (16 or 32 channels). Measured
 * against two stages (those blocks, then [0,D-64) + [D-64,D) with fresh signs, which mixes every channel with 64 or
 * more): on Gaussian rows with 4 channels 20x larger, per-row NMSE of Q8 / Q4 / Q2 (values: groups of Gv = 16 or 32
 * channels) at D = 80: none 2.4e-4 / 6.3e-3 / 0.112, block-diagonal 2.4e-5 / 3.0e-3 / 0.073, two stages
 * 3.7e-5 / 4.3e-3 / 0.108; D = 96: none 2.9e-4 / 1.4e-2 / 0.283, block-diagonal 2.4e-5 / 3.6e-3 / 0.091, two stages
 * 4.2e-5 / 6.2e-3 / 0.156. The block-diagonal one quantizes better (its blocks never split a value group) and costs
 * half. */
#include "internal.h"

#define KVQ_ROT_DEFAULT_SEED 0x6b7671u /* "kvq" */

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void kvq__rot_init(kvq__rot *r, uint32_t seed, int layer, kvq_role role, int D) {
    uint64_t st = ((uint64_t)(seed ? seed : KVQ_ROT_DEFAULT_SEED) << 32) ^ ((uint64_t)(uint32_t)layer << 1) ^ (uint64_t)role;
    splitmix64(&st); /* one step: nearby (layer, role) states start far apart */
    for (int i = 0; i < KVQ_ROT_SIGN_WORDS; i++) r->s[i] = splitmix64(&st);
    r->D = D;
}

/* One block of n (a power of two) channels at x, signs from bit `bit0` of s. Forward: x <- H diag(s) x / sqrt(n);
 * inverse: x <- diag(s) H x / sqrt(n). The 1/sqrt(n) is applied first so that no intermediate sum exceeds
 * sqrt(n) max|x|. */
static void fwht_block(float *x, int n, const uint64_t *s, int bit0, int inverse) {
    float f = kvq__rot_scale(n);
    if (!inverse)
        for (int i = 0; i < n; i++) {
            int b = bit0 + i;
            x[i] *= (s[b >> 6] >> (b & 63)) & 1 ? -f : f;
        }
    else
        for (int i = 0; i < n; i++) x[i] *= f;
    for (int h = 1; h < n; h <<= 1)
        for (int i = 0; i < n; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    if (inverse)
        for (int i = 0; i < n; i++) {
            int b = bit0 + i;
            if ((s[b >> 6] >> (b & 63)) & 1) x[i] = -x[i];
        }
}

void kvq__rot_apply(const kvq__rot *r, float *x, int inverse) {
    int D = r->D;
    if (!(D & (D - 1))) {
        fwht_block(x, D, r->s, 0, inverse);
        return;
    }
    fwht_block(x, 64, r->s, 0, inverse); /* D = 80, 96: block-diagonal 64 + (D - 64) */
    fwht_block(x + 64, D - 64, r->s, 64, inverse);
}

kvq_status kvq_rotation_apply(const kvq_cache *c, int layer, kvq_role role, int inverse, float *x, int n_vectors) {
    const char *fn = "kvq_rotation_apply";
    KVQ_CHECK_NULL(c, fn);
    kvq_status s = kvq__check_layer(c, layer, fn);
    if (s) return s;
    if (role != KVQ_KEY && role != KVQ_VALUE) return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: role %d is not a kvq_role", fn, (int)role);
    if (inverse != 0 && inverse != 1) return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: inverse %d is not 0 or 1", fn, inverse);
    if (n_vectors < 0) return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: n_vectors %d is negative", fn, n_vectors);
    if (n_vectors == 0) return KVQ_OK;
    KVQ_CHECK_NULL(x, fn);
    if (!kvq__rotated(c, role)) return KVQ_OK; /* this role is stored as it came: R = I */
    kvq__rot r;
    kvq__rot_init(&r, c->cfg.rotation_seed, kvq__rot_layer(c, layer), role, c->L.head_dim);
    for (int i = 0; i < n_vectors; i++) kvq__rot_apply(&r, x + (size_t)i * r.D, inverse);
    return KVQ_OK;
}
