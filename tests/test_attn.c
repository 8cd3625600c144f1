#define _POSIX_C_SOURCE 200809L
/* CPU attention on the quantized cache, for every (type_k, type_v, head dim, GQA ratio, window, soft-cap):
 *  - against an fp64 reference over the cache's own dequantized contents (the kernel's arithmetic): NMSE < 1e-9;
 *  - against an fp64 reference over the original fp32 K/V (the type's quality): NMSE per type bound;
 *  - each SIMD table the CPU has (AVX2, AVX-512: asked for with KVQ_CPU_KERNELS) against the scalar _ref
 *    kernels: NMSE < 1e-10 for the fp32 kernels, < 2e-8 for the integer kernels of Q8/Q4/Q2, which round
 *    queries and softmax weights to int16 (relative error ~1.5e-5 each), < 4e-5 where the values are Q4/Q2,
 *    whose kernels round the weights to 8 bits; the same bounds for both tables (they share the rounding);
 *  - decode of a ragged batch, and chunked causal prefill. */
#include "testutil.h"

#include <stdbool.h>

static double quality_bound(kvq_type tk, kvq_type tv) {
    /* measured worst cases on this data are about 3x below these */
    static const double b[KVQ_TYPE_COUNT] = {[KVQ_TYPE_F16] = 1e-6, [KVQ_TYPE_BF16] = 5e-5, [KVQ_TYPE_Q8] = 1e-3,
                                             [KVQ_TYPE_FP8] = 1e-2, [KVQ_TYPE_Q4] = 6e-2,  [KVQ_TYPE_Q2] = 1.0};
    return b[tk] + b[tv];
}

typedef struct { kvq_type tk, tv; int D, rep, window; float softcap; int H; } combo;

/* the SIMD tables compared with _ref: those this CPU has (set in main); none: the scalar table alone */
static const char *const simd_names[2] = {"avx2", "avx512"};
static const char *backends[2];
static int n_backends;

static double worst_quality[KVQ_TYPE_COUNT][KVQ_TYPE_COUNT], worst_simd[2][KVQ_TYPE_COUNT][KVQ_TYPE_COUNT];

/* one of the tables above, for the six types of kvq.h section 4 */
static void print_by_types(const char *title, double t[KVQ_TYPE_COUNT][KVQ_TYPE_COUNT]) {
    printf("%s, rows K, columns V:\n      ", title);
    for (int tv = 0; tv < 6; tv++) printf("%10s", kvq_type_get_traits((kvq_type)tv)->name);
    printf("\n");
    for (int tk = 0; tk < 6; tk++) {
        printf("%6s", kvq_type_get_traits((kvq_type)tk)->name);
        for (int tv = 0; tv < 6; tv++) printf("%10.2e", t[tk][tv]);
        printf("\n");
    }
}

static void run_combo(combo cb) {
    const int H = cb.H ? cb.H : 2, nqh = H * cb.rep, B = 3;
    const int64_t lens[3] = {300, 17, 129}; /* ragged: pages + window, window only, a page edge */
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = 2, cfg.n_kv_heads = H, cfg.head_dim = cb.D, cfg.type_k = cb.tk, cfg.type_v = cb.tv;
    cfg.arena_bytes = (size_t)H << 21, cfg.n_threads = 2;
    kvq_cache *c = NULL;
    CHECK_OK(kvq_cache_create(&cfg, &c));
    if (!c) return;
    kvq_attn_params ap = kvq_attn_params_default(nqh);
    ap.window = cb.window, ap.softcap = cb.softcap;
    float scale = 1.0f / sqrtf((float)cb.D);
    int32_t seqs[3];
    size_t row = (size_t)H * cb.D;
    float *orig[3], *deq[3];
    for (int b = 0; b < B; b++) {
        CHECK_OK(kvq_seq_new(c, &seqs[b]));
        size_t n = (size_t)lens[b] * row;
        orig[b] = malloc(2 * n * sizeof(float));
        deq[b] = malloc(2 * n * sizeof(float));
        tu_fill_kv(orig[b], orig[b] + n, lens[b], H, cb.D);
        /* appended in uneven pieces, as a prefill chunk and then single decode steps would be */
        int64_t done = 0;
        while (done < lens[b]) {
            int32_t piece = (int32_t)(done == 0 ? (lens[b] * 2 / 3 > 0 ? lens[b] * 2 / 3 : 1) : 1);
            if (done + piece > lens[b]) piece = (int32_t)(lens[b] - done);
            CHECK_OK(kvq_append(c, 1, 1, &seqs[b], &piece, KVQ_DTYPE_F32, orig[b] + done * row, orig[b] + n + done * row));
            done += piece;
        }
        CHECK_OK(kvq_read(c, seqs[b], 1, 0, lens[b], deq[b], deq[b] + n));
    }
    size_t qn = (size_t)B * nqh * cb.D;
    float *q = malloc(qn * 4), *out = malloc(qn * 4), *out_ref = malloc(qn * 4);
    double *ref = malloc(qn * 8), *refq = malloc(qn * 8);
    for (size_t i = 0; i < qn; i++) q[i] = (float)tu_normal();
    setenv("KVQ_FORCE_SCALAR", "1", 1);
    CHECK_OK(kvq_attn_decode(c, 1, B, seqs, q, out_ref, &ap));
    unsetenv("KVQ_FORCE_SCALAR");
    for (int b = 0; b < B; b++) {
        size_t n = (size_t)lens[b] * row, o = (size_t)b * nqh * cb.D;
        int64_t pos = lens[b] - 1;
        tu_attn_ref(q + o, 1, nqh, &pos, deq[b], deq[b] + n, lens[b], H, cb.D, scale, cb.window, cb.softcap, ref + o);
        tu_attn_ref(q + o, 1, nqh, &pos, orig[b], orig[b] + n, lens[b], H, cb.D, scale, cb.window, cb.softcap, refq + o);
    }
    double *refd = malloc(qn * 8);
    for (size_t i = 0; i < qn; i++) refd[i] = out_ref[i];
    double e_ref = tu_nmse(out_ref, ref, qn);
    const char *nk = kvq_type_get_traits(cb.tk)->name, *nv = kvq_type_get_traits(cb.tv)->name;
    /* int16 rounding of q and p in the integer kernels: NMSE ~ (2^-15)^2 * a few, measured <= 5e-9. The Q4/Q2 value
     * kernels round the softmax weights (times the value scales) to 8 bits per segment of 64 tokens: measured
     * <= 8e-6, about 1% of those types' own error energy at worst (quality NMSE >= 3e-4 on this data). */
    bool int_path = cb.tk == KVQ_TYPE_Q8 || cb.tk == KVQ_TYPE_Q4 || cb.tk == KVQ_TYPE_Q2 || cb.tv == KVQ_TYPE_Q8 ||
                    cb.tv == KVQ_TYPE_Q4 || cb.tv == KVQ_TYPE_Q2;
    bool w8_path = cb.tv == KVQ_TYPE_Q4 || cb.tv == KVQ_TYPE_Q2;
    double simd_bound = w8_path ? 4e-5 : int_path ? 2e-8 : 1e-10, arith_bound = w8_path ? 4e-5 : int_path ? 2e-8 : 1e-9;
    for (int k = 0; k < n_backends; k++) {
        setenv("KVQ_CPU_KERNELS", backends[k], 1);
        CHECK_OK(kvq_attn_decode(c, 1, B, seqs, q, out, &ap));
        double e_arith = tu_nmse(out, ref, qn), e_qual = tu_nmse(out, refq, qn);
        double e_simd = tu_nmse(out, refd, qn);
        if (e_simd > worst_simd[k][cb.tk][cb.tv]) worst_simd[k][cb.tk][cb.tv] = e_simd;
        CHECK(e_arith < arith_bound && e_ref < 1e-9,
              "decode %s/%s D=%d rep=%d win=%d cap=%g: arithmetic NMSE %s %g ref %g", nk, nv, cb.D, cb.rep,
              cb.window, (double)cb.softcap, backends[k], e_arith, e_ref);
        CHECK(e_simd < simd_bound, "decode %s/%s D=%d rep=%d win=%d: %s vs _ref NMSE %g", nk, nv, cb.D,
              cb.rep, cb.window, backends[k], e_simd);
        CHECK(e_qual < quality_bound(cb.tk, cb.tv), "decode %s/%s D=%d rep=%d: %s quality NMSE %g over %g",
              nk, nv, cb.D, cb.rep, backends[k], e_qual, quality_bound(cb.tk, cb.tv));
        if (e_qual > worst_quality[cb.tk][cb.tv]) worst_quality[cb.tk][cb.tv] = e_qual;
    }
    unsetenv("KVQ_CPU_KERNELS");

    /* chunked prefill: the last nq tokens of sequence 0 */
    const int nq = 37;
    size_t pn = (size_t)nq * nqh * cb.D, n0 = (size_t)lens[0] * row;
    float *pq = malloc(pn * 4), *pout = malloc(pn * 4), *pout_ref = malloc(pn * 4);
    double *pref = malloc(pn * 8);
    int64_t pos[37];
    for (int i = 0; i < nq; i++) pos[i] = lens[0] - nq + i;
    for (size_t i = 0; i < pn; i++) pq[i] = (float)tu_normal();
    setenv("KVQ_FORCE_SCALAR", "1", 1);
    CHECK_OK(kvq_attn_prefill(c, 1, seqs[0], nq, pq, pout_ref, &ap));
    unsetenv("KVQ_FORCE_SCALAR");
    tu_attn_ref(pq, nq, nqh, pos, deq[0], deq[0] + n0, lens[0], H, cb.D, scale, cb.window, cb.softcap, pref);
    double p_ref = tu_nmse(pout_ref, pref, pn);
    for (int k = 0; k < n_backends; k++) {
        setenv("KVQ_CPU_KERNELS", backends[k], 1);
        CHECK_OK(kvq_attn_prefill(c, 1, seqs[0], nq, pq, pout, &ap));
        double p_arith = tu_nmse(pout, pref, pn);
        CHECK(p_arith < 1e-9 && p_ref < 1e-9, "prefill %s/%s D=%d rep=%d win=%d: NMSE %s %g ref %g", nk, nv,
              cb.D, cb.rep, cb.window, backends[k], p_arith, p_ref);
    }
    unsetenv("KVQ_CPU_KERNELS");

    free(pq), free(pout), free(pout_ref), free(pref), free(refd);
    free(q), free(out), free(out_ref), free(ref), free(refq);
    for (int b = 0; b < B; b++) free(orig[b]), free(deq[b]);
    kvq_cache_free(c);
}

int main(void) {
    tu_seed(7);
    printf("CPU kernels: %s\n", kvq_cpu_backend());
    for (int k = 0; k < 2; k++) { /* a table the CPU lacks falls back to one below it */
        setenv("KVQ_CPU_KERNELS", simd_names[k], 1);
        if (!strcmp(kvq_cpu_backend(), simd_names[k]))
            backends[n_backends++] = simd_names[k];
        else if (k == 0)
            printf("SKIP avx2: this CPU lacks AVX2/FMA\n");
        else
            printf("SKIP avx512: this CPU lacks AVX-512 (F/BW/VL/DQ)\n");
    }
    unsetenv("KVQ_CPU_KERNELS");
    if (n_backends == 0) backends[n_backends++] = "scalar";
    printf("compared with the _ref kernels:");
    for (int k = 0; k < n_backends; k++) printf(" %s", backends[k]);
    printf("\n");
    static const int dims[] = {64, 80, 96, 128, 256};
    int quick = tu_quick(), n = 0;
    for (int tk = 0; tk < KVQ_TYPE_COUNT; tk++)
        for (int tv = 0; tv < KVQ_TYPE_COUNT; tv++) {
            if (!kvq_type_get_traits((kvq_type)tk)->implemented || !kvq_type_get_traits((kvq_type)tv)->implemented)
                continue;
            for (int di = 0; di < 5; di++) {
                if (quick && (di % 2 || (tk != tv && di != 0))) continue;
                for (int rep = 1; rep <= 4; rep *= 4)
                    for (int w = 0; w < 2; w++) {
                        combo cb = {(kvq_type)tk, (kvq_type)tv, dims[di], rep, w ? 100 : 0, w && rep == 4 ? 30.0f : 0.0f, 2};
                        run_combo(cb);
                        n++;
                    }
            }
        }
    /* more KV heads than one decode work item walks together (16) */
    run_combo((combo){KVQ_TYPE_Q4, KVQ_TYPE_Q8, 64, 2, 0, 0.0f, 18});
    run_combo((combo){KVQ_TYPE_F16, KVQ_TYPE_F16, 128, 1, 0, 0.0f, 17});
    /* 8 query heads per KV head: the fused fp32 kernels for 5 to 8 rows, every type's key and value path */
    run_combo((combo){KVQ_TYPE_Q4, KVQ_TYPE_Q2, 128, 8, 0, 0.0f, 2});
    run_combo((combo){KVQ_TYPE_Q2, KVQ_TYPE_Q4, 64, 8, 100, 0.0f, 2});
    run_combo((combo){KVQ_TYPE_FP8, KVQ_TYPE_Q8, 80, 8, 0, 0.0f, 2});
    run_combo((combo){KVQ_TYPE_Q8, KVQ_TYPE_FP8, 96, 8, 0, 30.0f, 2});
    run_combo((combo){KVQ_TYPE_BF16, KVQ_TYPE_F16, 256, 8, 0, 0.0f, 2});
    n += 7;
    printf("%d combinations; ", n);
    print_by_types("worst quality NMSE (decode vs fp64 on the original K/V)", worst_quality);
    for (int k = 0; k < n_backends; k++) {
        char title[128];
        snprintf(title, sizeof title, "worst NMSE of the %s kernels against the _ref kernels", backends[k]);
        print_by_types(title, worst_simd[k]);
    }
    return tu_finish("test_attn");
}
