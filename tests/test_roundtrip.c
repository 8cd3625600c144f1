/* Round trip of every type through the cache (append, read back) against the fp64 originals, with the error
 * bounds each format promises (kvq.h section 5), plus the bytes-per-token targets at D = 128. */
#include "testutil.h"

/* NMSE bounds on Gaussian-like data with outlier channels (measured values are printed; bounds ~2x above) */
static const double nmse_bound[KVQ_TYPE_COUNT] = {
    [KVQ_TYPE_F16] = 1e-7, [KVQ_TYPE_BF16] = 1e-5, [KVQ_TYPE_Q8] = 3e-4,
    [KVQ_TYPE_FP8] = 2e-3, [KVQ_TYPE_Q4] = 2e-2,   [KVQ_TYPE_Q2] = 0.4,
};

static void roundtrip(kvq_type t, int D, int H) {
    const int T = 192; /* three key groups of 64 */
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.sinks = 0; /* the layout without attention sinks: pages from token 0 (test_cache covers sinks) */
    cfg.n_layers = 1, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = t, cfg.type_v = t;
    cfg.residual = 0, cfg.arena_bytes = 8u << 20;
    kvq_cache *c = NULL;
    CHECK_OK(kvq_cache_create(&cfg, &c));
    if (!c) return;
    kvq_page_layout L;
    kvq_cache_get_config(c, NULL, &L);
    size_t n = (size_t)T * H * D;
    float *k = malloc(n * 4), *v = malloc(n * 4), *kr = malloc(n * 4), *vr = malloc(n * 4);
    double *kd = malloc(n * 8), *vd = malloc(n * 8);
    tu_fill_kv(k, v, T, H, D);
    for (size_t i = 0; i < n; i++) kd[i] = k[i], vd[i] = v[i];
    int32_t seq, nt = T;
    CHECK_OK(kvq_seq_new(c, &seq));
    CHECK_OK(kvq_append(c, 0, 1, &seq, &nt, KVQ_DTYPE_F32, k, v));
    kvq_seq_view view;
    CHECK_OK(kvq_seq_view_get(c, seq, 0, &view));
    CHECK(view.paged_tokens == T && view.window_tokens == 0, "R=0: all %d tokens paged (got %lld + %d)", T,
          (long long)view.paged_tokens, view.window_tokens);
    CHECK_OK(kvq_read(c, seq, 0, 0, T, kr, vr));
    double ek = tu_nmse(kr, kd, n), ev = tu_nmse(vr, vd, n);
    printf("  %-4s D=%3d  NMSE k %.3e  v %.3e  (bound %.0e)\n", kvq_type_get_traits(t)->name, D, ek, ev,
           nmse_bound[t]);
    CHECK(ek < nmse_bound[t] && ev < nmse_bound[t], "%s D=%d NMSE k %g v %g over %g", kvq_type_get_traits(t)->name,
          D, ek, ev, nmse_bound[t]);
    /* per-element bounds from the format definitions */
    int G = L.group, Gv = L.value_group;
    for (int h = 0; h < H; h++)
        for (int role = 0; role < 2; role++) {
            const float *x = role ? v : k, *y = role ? vr : kr;
            for (int tk = 0; tk < T; tk++)
                for (int d = 0; d < D; d++) {
                    size_t i = ((size_t)tk * H + h) * D + d;
                    double err = fabs((double)y[i] - x[i]), bound = 0;
                    /* range of the values sharing this element's parameters */
                    double lo = INFINITY, hi = -INFINITY, amax = 0;
                    if (t == KVQ_TYPE_Q4 || t == KVQ_TYPE_Q2) {
                        int n0 = role ? d / Gv * Gv : tk / G * G, n1 = role ? n0 + Gv : n0 + G;
                        for (int j = n0; j < n1; j++) {
                            double u = role ? x[((size_t)tk * H + h) * D + j] : x[((size_t)j * H + h) * D + d];
                            lo = fmin(lo, u), hi = fmax(hi, u);
                        }
                        double qmax = t == KVQ_TYPE_Q4 ? 15 : 3;
                        /* half a step, widened for the fp16 rounding of scale (x qmax) and of min */
                        bound = 0.5 * (hi - lo) / qmax * (1 + 4e-3) + (hi - lo) * qmax * 1e-3 + fabs(lo) * 1e-3 + 1e-6;
                    } else {
                        for (int j = 0; j < D; j++) amax = fmax(amax, fabs(x[((size_t)tk * H + h) * D + j]));
                        switch (t) {
                        case KVQ_TYPE_F16: bound = fabs(x[i]) * 0x1p-11 + 0x1p-25; break;
                        case KVQ_TYPE_BF16: bound = fabs(x[i]) * 0x1p-8 + 1e-38; break;
                        case KVQ_TYPE_Q8: bound = 0.5 * amax / 127 * (1 + 2e-3) + amax * 2e-3 / 127 * 127 * 1e-3; break;
                        default: bound = fabs(x[i]) * 0x1p-4 * 1.01 + amax / 448 * 0x1p-9 * 1.01; break; /* FP8 */
                        }
                    }
                    if (err > bound) {
                        CHECK(err <= bound, "%s %s t=%d h=%d d=%d: |%g - %g| = %g > %g", kvq_type_get_traits(t)->name,
                              role ? "v" : "k", tk, h, d, (double)y[i], (double)x[i], err, bound);
                        goto next;
                    }
                }
        next:;
        }
    free(k), free(v), free(kr), free(vr), free(kd), free(vd);
    kvq_cache_free(c);
}

int main(void) {
    static const int dims[] = {64, 80, 96, 128, 256};
    for (int t = 0; t < KVQ_TYPE_COUNT; t++) {
        if (!kvq_type_get_traits((kvq_type)t)->implemented) continue;
        for (int i = 0; i < 5; i++) roundtrip((kvq_type)t, dims[i], 2);
    }
    /* bytes per token per head at D = 128, scales included, relative to F16 (the targets) */
    double f16 = kvq_type_bytes_per_token(KVQ_TYPE_F16, KVQ_KEY, 128, 0);
    CHECK(f16 == 256, "f16 bytes/token %g", f16);
    struct { kvq_type t; double max; } targets[] = {{KVQ_TYPE_Q8, 0.52}, {KVQ_TYPE_FP8, 0.52}, {KVQ_TYPE_Q4, 0.29}, {KVQ_TYPE_Q2, 0.16}};
    for (int i = 0; i < 4; i++)
        for (int role = 0; role < 2; role++) {
            double r = kvq_type_bytes_per_token(targets[i].t, (kvq_role)role, 128, 0) / f16;
            printf("  %-4s %s bytes/token/head at D=128: %.4fx F16 (target <= %.2fx)\n",
                   kvq_type_get_traits(targets[i].t)->name, role ? "V" : "K", r, targets[i].max);
            CHECK(r <= targets[i].max, "%s ratio %g > %g", kvq_type_get_traits(targets[i].t)->name, r, targets[i].max);
        }
    return tu_finish("test_roundtrip");
}
