/* Small helpers shared by the C tests: a seeded RNG, checks that count failures, fp64 references. */
#ifndef KVQ_TESTUTIL_H
#define KVQ_TESTUTIL_H

#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* setenv: tests select kernel tables; before any system header */
#endif
#include "kvq.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int tu_failures = 0;
#define CHECK(cond, ...)                                                                                   \
    do {                                                                                                   \
        if (!(cond)) {                                                                                     \
            tu_failures++;                                                                                 \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                                \
            fprintf(stderr, __VA_ARGS__);                                                                  \
            fprintf(stderr, "\n");                                                                         \
        }                                                                                                  \
    } while (0)
#define CHECK_OK(expr)                                                                                     \
    do {                                                                                                   \
        kvq_status s_ = (expr);                                                                            \
        CHECK(s_ == KVQ_OK, "%s -> %s (%s)", #expr, kvq_strerror(s_), kvq_last_error());                   \
    } while (0)
#define CHECK_ERR(expr, code)                                                                              \
    do {                                                                                                   \
        kvq_status s_ = (expr);                                                                            \
        CHECK(s_ == (code), "%s -> %s, expected %s", #expr, kvq_strerror(s_), kvq_strerror(code));         \
        CHECK(s_ == KVQ_OK || kvq_last_error()[0] != 0, "%s: no error message", #expr);                    \
    } while (0)

static uint64_t tu_rng = 0x9e3779b97f4a7c15ull;
static inline void tu_seed(uint64_t s) { tu_rng = s * 0x9e3779b97f4a7c15ull + 1; }
static inline double tu_uniform(void) {
    tu_rng ^= tu_rng << 13, tu_rng ^= tu_rng >> 7, tu_rng ^= tu_rng << 17;
    return ((tu_rng >> 11) + 0.5) / 9007199254740992.0;
}
static inline double tu_normal(void) { return sqrt(-2 * log(tu_uniform())) * cos(6.283185307179586 * tu_uniform()); }

/* Keys with the structure real keys have: a few outlier channels with large, consistent offsets. */
static inline void tu_fill_kv(float *k, float *v, size_t tokens, int H, int D) {
    for (size_t t = 0; t < tokens; t++)
        for (int h = 0; h < H; h++)
            for (int d = 0; d < D; d++) {
                size_t i = (t * H + h) * D + d;
                double off = (d % 17 == 3) ? 4.0 * (1 + h % 3) : 0.0;
                k[i] = (float)(tu_normal() * (d % 17 == 3 ? 2.0 : 1.0) + off);
                v[i] = (float)tu_normal();
            }
}

static inline double tu_nmse(const float *x, const double *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = x[i] - ref[i];
        num += d * d, den += ref[i] * ref[i];
    }
    return den > 0 ? num / den : num;
}

/* fp64 attention of nq query rows at positions pos[] over keys/values [T][H][D] (GQA, window, softcap). */
static inline void tu_attn_ref(const float *q, int nq, int nqh, const int64_t *pos, const float *k, const float *v,
                               int64_t T, int H, int D, float scale, int window, float softcap, double *out) {
    int rep = nqh / H;
    double *s = malloc((size_t)T * sizeof *s);
    for (int i = 0; i < nq; i++)
        for (int qh = 0; qh < nqh; qh++) {
            int h = qh / rep;
            const float *qq = q + ((size_t)i * nqh + qh) * D;
            double mx = -INFINITY;
            for (int64_t t = 0; t < T; t++) {
                if (t > pos[i] || (window > 0 && t <= pos[i] - window)) {
                    s[t] = -INFINITY;
                    continue;
                }
                double a = 0;
                for (int d = 0; d < D; d++) a += (double)qq[d] * k[((size_t)t * H + h) * D + d];
                a *= scale;
                if (softcap > 0) a = softcap * tanh(a / softcap);
                s[t] = a;
                mx = a > mx ? a : mx;
            }
            double l = 0, *o = out + ((size_t)i * nqh + qh) * D;
            for (int d = 0; d < D; d++) o[d] = 0;
            for (int64_t t = 0; t < T; t++) {
                if (s[t] == -INFINITY) continue;
                double p = exp(s[t] - mx);
                l += p;
                for (int d = 0; d < D; d++) o[d] += p * v[((size_t)t * H + h) * D + d];
            }
            for (int d = 0; d < D; d++) o[d] /= l;
        }
    free(s);
}

/* The CPU kernel tables to run: scalar always, then avx2 and avx512 where this CPU has them (a SKIP line says why one
 * is missing, so a log shows what ran). tu_use_table(name) selects one through KVQ_CPU_KERNELS. */
static const char *tu_tables[3];
static int tu_n_tables;
static inline void tu_find_tables(void) {
    static const char *const want[3] = {"scalar", "avx2", "avx512"};
    unsetenv("KVQ_FORCE_SCALAR");
    tu_n_tables = 0;
    for (int k = 0; k < 3; k++) {
        setenv("KVQ_CPU_KERNELS", want[k], 1);
        if (!strcmp(kvq_cpu_backend(), want[k])) tu_tables[tu_n_tables++] = want[k];
        else printf("SKIP %s: this CPU lacks %s\n", want[k], k == 1 ? "AVX2/FMA" : "AVX-512 (F/BW/VL/DQ)");
    }
    unsetenv("KVQ_CPU_KERNELS");
    printf("kernel tables run:");
    for (int k = 0; k < tu_n_tables; k++) printf(" %s", tu_tables[k]);
    printf("\n");
}
static inline void tu_use_table(const char *name) { setenv("KVQ_CPU_KERNELS", name, 1); }

static inline int tu_quick(void) {
    const char *e = getenv("KVQ_TEST_QUICK");
    return e && *e && *e != '0';
}

static inline int tu_finish(const char *name) {
    if (tu_failures) {
        fprintf(stderr, "%s: %d check(s) failed\n", name, tu_failures);
        return 1;
    }
    printf("%s: all checks passed\n", name);
    return 0;
}

#endif
