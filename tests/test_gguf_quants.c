/* Dequantization of every ggml weight type kvq reads (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
 * Q4_K, Q5_K, Q6_K) against the `gguf` Python package's numpy implementation: the golden GGUF, written at test time
 * by tests/test_gguf_quants.sh, holds random blocks of each type and their dequantization by gguf.quants (tests/data/make_quant_golden.py). Both the
 * whole-tensor and the per-row function must reproduce it bit for bit: every product in these formats is exact in
 * fp32 and the one addition of a min rounds the same way in both (gguf.h), so the bound is 0.
 * usage: test_gguf_quants QUANT_GOLDEN.gguf */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "model_err.h"

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

/* Elements of out that differ from want (== comparison: -0 and +0 are equal; NaN never occurs in the file). */
static int mismatches(const float *out, const float *want, uint64_t n, uint64_t *first) {
    int bad = 0;
    for (uint64_t i = 0; i < n; i++)
        if (!(out[i] == want[i]) && !bad++) *first = i;
    return bad;
}

static void check_type(const gguf_file *f, uint32_t type, const char *name) {
    char gname[32];
    snprintf(gname, sizeof gname, "%s.f32", name);
    const gguf_tensor *t = gguf_find_tensor(f, name), *g = gguf_find_tensor(f, gname);
    CHECK(t && g, "%s: tensor or golden missing in the file", name);
    if (!t || !g) return;
    uint64_t be = 0, bb = 0;
    CHECK(ggml_type_block(type, &be, &bb) && t->type == type, "%s: stored as type %u (%s)", name, t->type,
          ggml_type_name(t->type));
    CHECK(strcmp(ggml_type_name(type), "unknown") && t->n_elements == g->n_elements && t->ne[0] == g->ne[0] &&
              t->nbytes == t->n_elements / be * bb && g->type == GGML_F32,
          "%s: shape/size %llu x %llu, %llu bytes", name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
          (unsigned long long)t->nbytes);
    const float *want = (const float *)g->data; /* F32 data is 32-byte aligned in the file */
    uint64_t n = t->n_elements, nonzero = 0;
    for (uint64_t i = 0; i < n; i++) nonzero += want[i] != 0;
    CHECK(nonzero > n / 2, "%s: golden values mostly zero (%llu of %llu nonzero)", name, (unsigned long long)nonzero,
          (unsigned long long)n);
    float *out = malloc(n * sizeof *out);
    if (!out) abort();
    uint64_t first = 0;
    memset(out, 0xff, n * sizeof *out);
    kvq_status st = gguf_tensor_to_f32(t, out);
    int bad = st ? -1 : mismatches(out, want, n, &first);
    CHECK(bad == 0, "%s: gguf_tensor_to_f32: %s, %d mismatches, first [%llu] %.9g vs gguf.quants %.9g", name,
          kvq_strerror(st), bad, (unsigned long long)first, bad > 0 ? out[first] : 0.0, bad > 0 ? want[first] : 0.0);
    /* row by row, as the engine reads weights */
    memset(out, 0xff, n * sizeof *out);
    uint64_t row_bytes = t->ne[0] / be * bb;
    bad = 0;
    for (uint64_t r = 0; r < n / t->ne[0]; r++) {
        st = gguf_dequantize_row(t->type, t->data + r * row_bytes, out + r * t->ne[0], t->ne[0]);
        if (st) bad = -1;
    }
    if (!bad) bad = mismatches(out, want, n, &first);
    CHECK(bad == 0, "%s: gguf_dequantize_row: %d mismatches, first [%llu]", name, bad, (unsigned long long)first);
    printf("%-5s %4llu x %llu: %llu values equal to gguf.quants'\n", ggml_type_name(type), (unsigned long long)t->ne[0],
           (unsigned long long)(n / t->ne[0]), (unsigned long long)n);
    free(out);
}

static void check_errors(const gguf_file *f) {
    const gguf_tensor *t = gguf_find_tensor(f, "q4_k");
    float out[512];
    if (!t) return;
    kvqm_clear_error();
    CHECK(gguf_dequantize_row(GGML_Q4_K, t->data, out, 255) == KVQ_ERR_INVALID_ARG &&
              strstr(kvqm_last_error(), "Q4_K block (256)"),
          "row of 255 Q4_K elements: %s", kvqm_last_error());
    CHECK(gguf_dequantize_row(15, t->data, out, 256) == KVQ_ERR_FORMAT && strstr(kvqm_last_error(), "15 (Q8_K)"),
          "Q8_K (not a file type): %s", kvqm_last_error());
    CHECK(gguf_dequantize_row(200, t->data, out, 256) == KVQ_ERR_FORMAT && strstr(kvqm_last_error(), "200 (unknown)"),
          "type 200: %s", kvqm_last_error());
    CHECK(gguf_dequantize_row(GGML_Q4_K, NULL, out, 256) == KVQ_ERR_NULL, "NULL source");
    CHECK(gguf_dequantize_row(GGML_Q4_K, t->data, NULL, 256) == KVQ_ERR_NULL, "NULL destination");
    CHECK(gguf_tensor_to_f32(NULL, out) == KVQ_ERR_NULL, "NULL tensor");
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s quant_golden.gguf\n", argv[0]);
        return 2;
    }
    gguf_file *f;
    if (gguf_open(argv[1], &f)) {
        fprintf(stderr, "%s: %s\n", argv[1], kvqm_last_error());
        return 1;
    }
    static const struct {
        uint32_t type;
        const char *name;
    } types[] = {{GGML_F32, "f32"},   {GGML_F16, "f16"},   {GGML_BF16, "bf16"}, {GGML_Q4_0, "q4_0"},
                 {GGML_Q4_1, "q4_1"}, {GGML_Q5_0, "q5_0"}, {GGML_Q5_1, "q5_1"}, {GGML_Q8_0, "q8_0"},
                 {GGML_Q2_K, "q2_k"}, {GGML_Q3_K, "q3_k"}, {GGML_Q4_K, "q4_k"}, {GGML_Q5_K, "q5_k"},
                 {GGML_Q6_K, "q6_k"}};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) check_type(f, types[i].type, types[i].name);
    check_errors(f);
    gguf_close(f);
    printf("%d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
