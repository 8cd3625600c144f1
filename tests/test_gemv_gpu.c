/* The decode GEMV of the GPU engine (src/model/gemv_gpu.h) against cuBLAS and a double-precision host
 * reference. Y[n][out] = X[n][in] W^T (+ Y0 when beta is 1), fp16 X and W, fp32 Y, n = 1..8, beta 0 and 1, on
 *   Llama-3-8B's products (in x out: 4096 x 6144 QKV, 4096 x 4096 Wo, 4096 x 28672 gate/up, 14336 x 4096
 * down, 4096 x 128256 output) and odd shapes (in = 8, out = 1, out not a multiple of the kernel's 16 rows, in
 * not a multiple of its step). X, W and Y0 are uniform in [-1, 1] on a 2^-10 grid (exact in fp16).
 * Tolerances. Every product x[k] w[k] is exact in fp32; the kernel and cuBLAS differ only in the order of
 * their fp32 additions. Against the double reference (every row of the small shapes, 67 rows of each large
 * one, for every n and beta): |y - ref| <= TOL_REF * S, S = sum_k |x[k] w[k]| + |y0|; against cuBLAS (every
 * element): |y - y_cublas| <= TOL_BLAS * (|x| |w| + |y0|) (Euclidean norms of the two rows, >= S). fp32
 * rounding gives about 2^-24 sqrt(terms per partial sum) of S (~1e-6 here); TOL_REF = 1e-4 leaves ~50x, yet a
 * term dropped or paired with the wrong k at in <= 1032 (the odd shapes) moves y by ~S / in >= 1e-3 S, and a
 * wrong pairing of the large shapes' elements by ~S / sqrt(in). The largest ratios seen are printed.
 * Arguments: n 0 and 9, in 0 and 12, out 0, beta 0.5, NULL pointers and a misaligned X are refused with their
 * error and leave Y as it was. usage: test_gemv_gpu                exit 0 pass, 1 fail, 77 (skip) without a
 * usable GPU test_gemv_gpu --bench [REPS] microbenchmark (no checks): GB/s of weights of the kernel (each
 * shape of kvqm_gemv_f16_shape) and of cublasGemmEx on the Llama-3-8B products, n = 1, 2, 4, 8, the weights
 * rotated over copies >= 256 MB (the L2 is 60 MB); then a decode step's 129 products (32 layers +
 * output, 16.06 GB) back to back, launched one by one and as one CUDA graph. */
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gemv_gpu.h"
#include "kvq.h"

static const double TOL_REF = 1e-4, TOL_BLAS = 1e-4;
static int fails = 0;
static double worst_ref = 0, worst_blas = 0;

#define CK(call)                                                                                             \
    do {                                                                                                     \
        cudaError_t e_ = (call);                                                                             \
        if (e_ != cudaSuccess) {                                                                             \
            fprintf(stderr, "FAIL %s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));       \
            exit(1);                                                                                         \
        }                                                                                                    \
    } while (0)

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t next32(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
/* k / 1024, k uniform in [-1024, 1024]: exact in fp16 */
static float rnd(void) {
    return (float)((int)(next32() % 2049) - 1024) / 1024.0f;
}

/* fp16 bits of a float that fp16 holds exactly (|v| <= 1 on the 2^-10 grid, or 0) */
static uint16_t to_half(float v) {
    if (v == 0.0f) return 0;
    uint16_t sign = v < 0 ? 0x8000 : 0;
    float a = fabsf(v);
    int e;
    float m = frexpf(a, &e); /* a = m 2^e, m in [0.5, 1) */
    int he = e - 1 + 15;     /* a = (2m) 2^(e-1) */
    uint16_t mant = (uint16_t)lrintf((2.0f * m - 1.0f) * 1024.0f);
    return (uint16_t)(sign | (he << 10) | mant);
}
static float from_half(uint16_t h) {
    int e = (h >> 10) & 31, mant = h & 1023;
    float v = e == 0 ? ldexpf((float)mant, -24) : ldexpf(1.0f + mant / 1024.0f, e - 15);
    return h & 0x8000 ? -v : v;
}

static uint16_t grid_half[2049]; /* fp16 bits of (k - 1024) / 1024 */
static float half_f32[65536];
static void tables(void) {
    for (int k = 0; k < 2049; k++) grid_half[k] = to_half((float)(k - 1024) / 1024.0f);
    for (int h = 0; h < 65536; h++) half_f32[h] = from_half((uint16_t)h);
}
static void fill_half(uint16_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = grid_half[next32() % 2049];
}

static int probe(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
        cudaGetLastError();
        return 0;
    }
    return 1;
}

/* One shape, every n in 1..8 and beta 0/1. */
static void check_shape(cublasHandle_t blas, int in, int out) {
    const size_t wn = (size_t)in * out, xn = (size_t)8 * in, yn = (size_t)8 * out;
    uint16_t *hw = malloc(wn * 2), *hx = malloc(xn * 2);
    float *hy0 = malloc(yn * 4), *hy = malloc(yn * 4), *hb = malloc(yn * 4);
    double *wnorm = malloc((size_t)out * sizeof(double));
    if (!hw || !hx || !hy0 || !hy || !hb || !wnorm) {
        fprintf(stderr, "FAIL host memory\n");
        exit(1);
    }
    fill_half(hw, wn), fill_half(hx, xn);
    for (size_t i = 0; i < yn; i++) hy0[i] = rnd();
    for (int r = 0; r < out; r++) {
        double s = 0;
        for (int k = 0; k < in; k++) {
            const double w = half_f32[hw[(size_t)r * in + k]];
            s += w * w;
        }
        wnorm[r] = sqrt(s);
    }
    void *dw, *dx;
    float *dy, *db;
    CK(cudaMalloc(&dw, wn * 2));
    CK(cudaMalloc(&dx, xn * 2));
    CK(cudaMalloc((void **)&dy, yn * 4));
    CK(cudaMalloc((void **)&db, yn * 4));
    CK(cudaMemcpy(dw, hw, wn * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dx, hx, xn * 2, cudaMemcpyHostToDevice));
    /* rows checked against the double reference: all of a small shape, else the first and last, both sides of
     * the kernel's 16-row tiles, and random ones */
    int rows[67], nrows = 0;
    const int all = (double)in * out <= 4e6;
    if (!all) {
        const int fixed[] = {0, 1, 7, 8, 15, 16, 17, out / 2, out - 17, out - 16, out - 2, out - 1};
        for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) rows[nrows++] = fixed[i];
        while (nrows < 67) rows[nrows++] = (int)(next32() % (uint32_t)out);
    }
    double shape_ref = 0, shape_blas = 0;
    int shape_fail = 0;
    for (int beta1 = 0; beta1 <= 1; beta1++) {
        for (int n = 1; n <= 8; n++) {
            const float beta = (float)beta1, alpha = 1.0f;
            /* beta 0: Y starts as NaN (the kernel must not read it); beta 1: Y0 */
            if (beta1) {
                CK(cudaMemcpy(dy, hy0, yn * 4, cudaMemcpyHostToDevice));
                CK(cudaMemcpy(db, hy0, yn * 4, cudaMemcpyHostToDevice));
            } else {
                CK(cudaMemset(dy, 0xff, yn * 4));
                CK(cudaMemset(db, 0, yn * 4));
            }
            kvq_status s = kvqm_gemv_f16(dy, dx, dw, n, in, out, beta, 0);
            if (s) {
                printf("FAIL kvqm_gemv_f16 (n %d, in %d, out %d, beta %g): %d %s\n", n, in, out, beta, s,
                       kvq_last_error());
                fails++, shape_fail++;
                continue;
            }
            cublasStatus_t bs = cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &alpha, dw,
                                             CUDA_R_16F, in, dx, CUDA_R_16F, in, &beta, db, CUDA_R_32F, out,
                                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
            if (bs != CUBLAS_STATUS_SUCCESS) {
                printf("FAIL cublasGemmEx %d\n", (int)bs);
                exit(1);
            }
            CK(cudaDeviceSynchronize());
            CK(cudaMemcpy(hy, dy, yn * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(hb, db, yn * 4, cudaMemcpyDeviceToHost));
            /* rows of Y past n must be untouched (beta 0: still NaN; beta 1: still Y0) */
            for (size_t i = (size_t)n * out; i < yn; i++) {
                const int same = beta1 ? hy[i] == hy0[i] : isnan(hy[i]);
                if (!same) {
                    printf("FAIL n %d in %d out %d beta %d: Y row %zu written\n", n, in, out, beta1, i / out);
                    fails++, shape_fail++;
                    break;
                }
            }
            for (int j = 0; j < n; j++) {
                double xnorm = 0;
                for (int k = 0; k < in; k++) {
                    const double x = half_f32[hx[(size_t)j * in + k]];
                    xnorm += x * x;
                }
                xnorm = sqrt(xnorm);
                for (int r = 0; r < out; r++) { /* against cuBLAS, every element */
                    const double y = hy[(size_t)j * out + r], b = hb[(size_t)j * out + r];
                    const double y0 = beta1 ? fabs(hy0[(size_t)j * out + r]) : 0;
                    const double ratio = fabs(y - b) / (xnorm * wnorm[r] + y0 + 1e-30);
                    if (!(ratio <= TOL_BLAS)) {
                        if (shape_fail < 5)
                            printf("FAIL n %d in %d out %d beta %d: y[%d][%d] %.9g, cuBLAS %.9g\n", n, in,
                                   out, beta1, j, r, y, b);
                        fails++, shape_fail++;
                    }
                    if (ratio > shape_blas) shape_blas = ratio;
                }
                for (int q = 0; q < (all ? out : nrows); q++) { /* against double precision */
                    const int r = all ? q : rows[q];
                    double ref = beta1 ? hy0[(size_t)j * out + r] : 0, S = fabs(ref);
                    for (int k = 0; k < in; k++) {
                        const double p =
                            (double)half_f32[hx[(size_t)j * in + k]] * half_f32[hw[(size_t)r * in + k]];
                        ref += p, S += fabs(p);
                    }
                    const double y = hy[(size_t)j * out + r], ratio = fabs(y - ref) / (S + 1e-30);
                    if (!(ratio <= TOL_REF)) {
                        if (shape_fail < 5)
                            printf("FAIL n %d in %d out %d beta %d: y[%d][%d] %.9g, double %.9g (S %.3g)\n",
                                   n, in, out, beta1, j, r, y, ref, S);
                        fails++, shape_fail++;
                    }
                    if (ratio > shape_ref) shape_ref = ratio;
                }
            }
        }
    }
    printf("%s in %6d out %6d, n 1..8, beta 0/1: max |y - ref| / S %.2e (bound %.0e), max |y - cuBLAS| / "
           "(|x||w| + |y0|) "
           "%.2e (bound %.0e)\n",
           shape_fail ? "FAIL" : "ok  ", in, out, shape_ref, TOL_REF, shape_blas, TOL_BLAS);
    if (shape_ref > worst_ref) worst_ref = shape_ref;
    if (shape_blas > worst_blas) worst_blas = shape_blas;
    cudaFree(dw), cudaFree(dx), cudaFree(dy), cudaFree(db);
    free(hw), free(hx), free(hy0), free(hy), free(hb), free(wnorm);
}

static void expect(kvq_status got, kvq_status want, const char *what) {
    printf("%s %s: status %d (want %d)%s%s\n", got == want ? "ok  " : "FAIL", what, got, want,
           got ? ": " : "", got ? kvq_last_error() : "");
    fails += got != want;
}

static void check_args(void) {
    const int in = 64, out = 32;
    void *dw, *dx;
    float *dy, hy[8 * 32], h0[8 * 32];
    CK(cudaMalloc(&dw, (size_t)in * out * 2 + 16));
    CK(cudaMalloc(&dx, (size_t)8 * in * 2 + 16));
    CK(cudaMalloc((void **)&dy, sizeof hy));
    CK(cudaMemset(dw, 0x3c, (size_t)in * out * 2)); /* 0x3c3c: 1.06 */
    CK(cudaMemset(dx, 0x3c, (size_t)8 * in * 2));
    for (int i = 0; i < 8 * 32; i++) h0[i] = (float)i;
    CK(cudaMemcpy(dy, h0, sizeof h0, cudaMemcpyHostToDevice));
    expect(kvqm_gemv_f16(dy, dx, dw, 0, in, out, 0, 0), KVQ_ERR_INVALID_ARG, "n = 0");
    expect(kvqm_gemv_f16(dy, dx, dw, 9, in, out, 0, 0), KVQ_ERR_INVALID_ARG, "n = 9 (cuBLAS's)");
    expect(kvqm_gemv_f16(dy, dx, dw, 1, 0, out, 0, 0), KVQ_ERR_INVALID_ARG, "in = 0");
    expect(kvqm_gemv_f16(dy, dx, dw, 1, 12, out, 0, 0), KVQ_ERR_INVALID_ARG, "in = 12 (not a multiple of 8)");
    expect(kvqm_gemv_f16(dy, dx, dw, 1, in, 0, 0, 0), KVQ_ERR_INVALID_ARG, "out = 0");
    expect(kvqm_gemv_f16(dy, dx, dw, 1, in, out, 0.5f, 0), KVQ_ERR_INVALID_ARG, "beta = 0.5");
    expect(kvqm_gemv_f16(NULL, dx, dw, 1, in, out, 0, 0), KVQ_ERR_NULL, "Y NULL");
    expect(kvqm_gemv_f16(dy, NULL, dw, 1, in, out, 0, 0), KVQ_ERR_NULL, "X NULL");
    expect(kvqm_gemv_f16(dy, dx, NULL, 1, in, out, 0, 0), KVQ_ERR_NULL, "W NULL");
    expect(kvqm_gemv_f16(dy, (char *)dx + 2, dw, 1, in, out, 0, 0), KVQ_ERR_INVALID_ARG,
           "X not 16-byte aligned");
    expect(kvqm_gemv_f16(dy, dx, (char *)dw + 8, 1, in, out, 0, 0), KVQ_ERR_INVALID_ARG,
           "W not 16-byte aligned");
    expect(kvqm_gemv_f16((float *)dw, dx, dw, 1, in, out, 0, 0), KVQ_ERR_INVALID_ARG, "Y overlapping W");
    expect(kvqm_gemv_f16_shape(dy, dx, dw, 1, in, out, 0, 0, 3, 8), KVQ_ERR_INVALID_ARG, "unroll 3");
    expect(kvqm_gemv_f16_shape(dy, dx, dw, 1, in, out, 0, 0, 4, 6), KVQ_ERR_INVALID_ARG, "6 warps");
    int ok = kvqm_gemv_f16_ok(dy, dx, dw, 8, in, out, 1.0f) &&
             !kvqm_gemv_f16_ok(dy, dx, dw, 9, in, out, 1.0f) &&
             !kvqm_gemv_f16_ok(dy, dx, dw, 1, 12, out, 0) &&
             !kvqm_gemv_f16_ok(dy, (char *)dx + 2, dw, 1, in, out, 0);
    printf("%s kvqm_gemv_f16_ok agrees with the checks\n", ok ? "ok  " : "FAIL");
    fails += !ok;
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(hy, dy, sizeof hy, cudaMemcpyDeviceToHost));
    ok = memcmp(hy, h0, sizeof hy) == 0;
    printf("%s Y unchanged after the refused calls\n", ok ? "ok  " : "FAIL");
    fails += !ok;
    cudaFree(dw), cudaFree(dx), cudaFree(dy);
}

/* ----------------------------------------------------------------------------------------------------------
 */
static const int L3[5][2] = {{4096, 6144}, {4096, 4096}, {4096, 28672}, {14336, 4096}, {4096, 128256}};
static const char *L3name[5] = {"QKV", "Wo", "gate/up", "down", "output"};

static int blas_gemm(cublasHandle_t h, float *Y, const void *X, const void *W, int n, int in, int out,
                     float beta) {
    const float alpha = 1.0f;
    return cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &alpha, W, CUDA_R_16F, in, X, CUDA_R_16F, in,
                        &beta, Y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS;
}

static int bench(int reps) {
    cudaStream_t st;
    cublasHandle_t h;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS || cublasSetStream(h, st) != CUBLAS_STATUS_SUCCESS)
        return 1;
    const size_t rnd_bytes = (size_t)4096 * 128256 * 2;
    uint16_t *host = malloc(rnd_bytes);
    if (!host) return 1;
    fill_half(host, rnd_bytes / 2);
    void *x;
    float *y;
    CK(cudaMalloc(&x, (size_t)8 * 14336 * 2));
    CK(cudaMalloc((void **)&y, (size_t)8 * 128256 * 4));
    CK(cudaMemcpy(x, host, (size_t)8 * 14336 * 2, cudaMemcpyHostToDevice));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    static const int shapes[][2] = {{0, 0}, {2, 8}, {4, 8}, {8, 8},
                                    {2, 4}, {4, 4}, {8, 4}}; /* {0,0}: cuBLAS */
    printf("product,in,out,n,kernel,us,GB/s\n");
    for (int s = 0; s < 5; s++) {
        const int in = L3[s][0], out = L3[s][1];
        const size_t wb = (size_t)in * out * 2;
        int copies = (int)((((size_t)256 << 20) + wb - 1) / wb);
        void *w[16];
        for (int c = 0; c < copies; c++) {
            CK(cudaMalloc(&w[c], wb));
            for (size_t off = 0; off < wb; off += rnd_bytes)
                CK(cudaMemcpy((char *)w[c] + off, host, wb - off < rnd_bytes ? wb - off : rnd_bytes,
                              cudaMemcpyHostToDevice));
        }
        const int ns[] = {1, 2, 4, 8};
        for (int ni = 0; ni < 4; ni++) {
            for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
                const int u = shapes[k][0], nw = shapes[k][1], n = ns[ni];
                for (int pass = 0; pass < 2; pass++) { /* pass 0 warms up */
                    const int r = pass ? reps : 3;
                    CK(cudaEventRecord(e0, st));
                    for (int i = 0; i < r; i++) {
                        void *wi = w[i % copies];
                        int bad = u ? kvqm_gemv_f16_shape(y, x, wi, n, in, out, 0.0f, st, u, nw) != KVQ_OK
                                    : blas_gemm(h, y, x, wi, n, in, out, 0.0f);
                        if (bad) return 1;
                    }
                    CK(cudaEventRecord(e1, st));
                    CK(cudaEventSynchronize(e1));
                    float ms;
                    CK(cudaEventElapsedTime(&ms, e0, e1));
                    if (pass) {
                        char kname[32];
                        if (u)
                            snprintf(kname, sizeof kname, "gemv U%d W%d", u, nw);
                        else
                            snprintf(kname, sizeof kname, "cublas");
                        printf("%s,%d,%d,%d,%s,%.2f,%.0f\n", L3name[s], in, out, n, kname, 1e3 * ms / r,
                               (double)wb * r / (ms * 1e-3) / 1e9);
                    }
                }
            }
        }
        for (int c = 0; c < copies; c++) cudaFree(w[c]);
    }
    /* a decode step's products: 32 layers of QKV, Wo (+=), gate/up, down (+=), then the output (16.06 GB) */
    void *lw[32][4], *ow;
    size_t total = 0;
    for (int l = 0; l < 32; l++)
        for (int j = 0; j < 4; j++) {
            const size_t wb = (size_t)L3[j][0] * L3[j][1] * 2;
            CK(cudaMalloc(&lw[l][j], wb));
            CK(cudaMemcpy(lw[l][j], host, wb, cudaMemcpyHostToDevice));
            total += wb;
        }
    CK(cudaMalloc(&ow, rnd_bytes));
    CK(cudaMemcpy(ow, host, rnd_bytes, cudaMemcpyHostToDevice));
    total += rnd_bytes;
    float *ys[4];
    for (int j = 0; j < 4; j++) CK(cudaMalloc((void **)&ys[j], (size_t)8 * 28672 * 4));
    CK(cudaMemset(ys[0], 0, (size_t)8 * 28672 * 4));
    printf("step,n,kernel,launch,ms,GB/s\n");
    for (int ni = 0; ni < 2; ni++) {
        const int n = ni ? 8 : 1;
        for (int useg = 0; useg <= 1; useg++) {
            for (int graph = 0; graph <= 1; graph++) {
                cudaGraph_t gr = NULL;
                cudaGraphExec_t ge = NULL;
                if (graph && cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
                    printf("step,%d,%s,graph,capture failed: %s\n", n, useg ? "gemv" : "cublas",
                           cudaGetErrorString(cudaGetLastError()));
                    continue;
                }
                const int r = graph ? 1 : reps;
                if (!graph) CK(cudaEventRecord(e0, st));
                for (int i = 0; i < r; i++) {
                    for (int l = 0; l < 32; l++)
                        for (int j = 0; j < 4; j++) {
                            const int in = L3[j][0], out = L3[j][1];
                            const float beta = (j == 1 || j == 3) ? 1.0f : 0.0f;
                            float *yy = beta ? ys[0] : ys[1 + (j & 1)];
                            const void *xx = x;
                            int bad = useg ? kvqm_gemv_f16(yy, xx, lw[l][j], n, in, out, beta, st) != KVQ_OK
                                           : blas_gemm(h, yy, xx, lw[l][j], n, in, out, beta);
                            if (bad) return 1;
                        }
                    int bad = useg ? kvqm_gemv_f16(y, x, ow, n, 4096, 128256, 0.0f, st) != KVQ_OK
                                   : blas_gemm(h, y, x, ow, n, 4096, 128256, 0.0f);
                    if (bad) return 1;
                }
                if (graph) {
                    if (cudaStreamEndCapture(st, &gr) != cudaSuccess ||
                        cudaGraphInstantiate(&ge, gr, 0) != cudaSuccess) {
                        printf("step,%d,%s,graph,capture failed: %s\n", n, useg ? "gemv" : "cublas",
                               cudaGetErrorString(cudaGetLastError()));
                        if (gr) cudaGraphDestroy(gr);
                        continue;
                    }
                    CK(cudaGraphLaunch(ge, st)); /* warm-up */
                    CK(cudaEventRecord(e0, st));
                    for (int i = 0; i < reps; i++) CK(cudaGraphLaunch(ge, st));
                }
                CK(cudaEventRecord(e1, st));
                CK(cudaEventSynchronize(e1));
                float ms;
                CK(cudaEventElapsedTime(&ms, e0, e1));
                printf("step,%d,%s,%s,%.3f,%.0f\n", n, useg ? "gemv" : "cublas", graph ? "graph" : "stream",
                       ms / reps, (double)total * reps / (ms * 1e-3) / 1e9);
                if (ge) cudaGraphExecDestroy(ge);
                if (gr) cudaGraphDestroy(gr);
            }
        }
    }
    free(host);
    return 0;
}

int main(int argc, char **argv) {
    tables();
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) {
        if (!probe()) {
            printf("SKIP no usable GPU\n");
            return 77;
        }
        return bench(argc > 2 ? atoi(argv[2]) : 20);
    }
    if (argc > 1) {
        fprintf(stderr, "usage: test_gemv_gpu [--bench [REPS]]\n");
        return 2;
    }
    if (!probe()) {
        printf("SKIP no usable GPU\n");
        return 77;
    }
    cublasHandle_t blas;
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) {
        printf("FAIL cublasCreate\n");
        return 1;
    }
    check_args();
    static const int odd[][2] = {{8, 1},    {8, 17},    {16, 33},   {24, 5},    {136, 100}, {256, 16},
                                 {520, 31}, {1000, 49}, {1032, 47}, {4104, 15}, {8, 4097}};
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) check_shape(blas, odd[i][0], odd[i][1]);
    for (int s = 0; s < 5; s++) check_shape(blas, L3[s][0], L3[s][1]);
    printf("worst: %.2e of S against double, %.2e against cuBLAS\n", worst_ref, worst_blas);
    cublasDestroy(blas);
    printf("%s\n", fails ? "FAILED" : "all passed");
    return fails ? 1 : 0;
}
