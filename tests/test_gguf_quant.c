/* Writes the inputs and outputs of kvq's GGUF row quantizers (src/model/gguf_write.c) for
 * tests/test_gguf_quant.py, which checks them byte for byte against the gguf Python package (gguf.quants).
 * usage: test_gguf_quant OUTDIR  ->  OUTDIR/in.f32, OUTDIR/out.{f16,q8_0,q4_0} */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "gguf_write.h"

enum { BLOCKS = 4096, N = BLOCKS * 32 };

static int write_file(const char *dir, const char *name, const void *p, size_t n) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, n, f) != n || fclose(f)) {
        fprintf(stderr, "cannot write %s\n", path);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUTDIR\n", argv[0]);
        return 2;
    }
    static float x[N];
    static uint8_t out[N * 4];
    uint64_t s = 12345;
    for (int b = 0; b < BLOCKS; b++) {
        /* each block its own scale (1e-8 .. 1e4: f16 subnormals, underflow and overflow of the scales included) */
        double scale = pow(10.0, -8.0 + 12.0 * (b % 97) / 96.0);
        for (int j = 0; j < 32; j++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            double u = (double)(s >> 11) / 9007199254740992.0 * 2.0 - 1.0;
            float v = (float)(u * scale);
            switch (b % 7) {
            case 1: v = 0.0f; break;                                /* an all-zero block */
            case 2: v = (float)((int)(u * 16.0)) * 0.5f; break;     /* halves: the rounding ties */
            case 3: if (j == 5 || j == 9) v = j == 5 ? 3.0f : -3.0f; else v = (float)u; break; /* |max| tie, signs differ */
            default: break;
            }
            x[b * 32 + j] = v;
        }
    }
    if (write_file(argv[1], "in.f32", x, sizeof x)) return 1;
    static const struct {
        uint32_t t;
        const char *name;
    } types[] = {{GGML_F16, "out.f16"}, {GGML_Q8_0, "out.q8_0"}, {GGML_Q4_0, "out.q4_0"}};
    for (int i = 0; i < 3; i++) {
        size_t nb = gguf_row_bytes(types[i].t, N);
        if (!nb || gguf_quantize_row(types[i].t, x, N, out)) {
            fprintf(stderr, "gguf_quantize_row(%s) failed\n", types[i].name);
            return 1;
        }
        if (write_file(argv[1], types[i].name, out, nb)) return 1;
    }
    /* what the dequantizer (gguf.c) reads back: within half a step (and the fp16 rounding of the scale) */
    gguf_tensor t;
    memset(&t, 0, sizeof t);
    t.type = GGML_Q8_0, t.n_elements = N, t.data = out;
    gguf_quantize_row(GGML_Q8_0, x, N, out);
    static float y[N];
    if (gguf_tensor_to_f32(&t, y)) return 1;
    for (int b = 0; b < BLOCKS; b++) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        for (int j = 0; j < 32; j++)
            if (amax > 1e-2f && amax < 6e4f /* d = amax / 127 a normal fp16 */ && fabsf(y[b * 32 + j] - x[b * 32 + j]) > amax / 127.0f * 0.51f + amax * 1e-3f) {
                fprintf(stderr, "q8_0 round trip: block %d [%d]: %g -> %g\n", b, j, x[b * 32 + j], y[b * 32 + j]);
                return 1;
            }
    }
    printf("wrote %d values and their f16, q8_0, q4_0 rows to %s\n", N, argv[1]);
    return 0;
}
