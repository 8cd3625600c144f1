// llama_gpu.cu: the Llama forward pass on the GPU (llama_gpu.h is the manual).
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <new>
#include <vector>

#include "kvq_cuda.h"
extern "C" {  // the model layer's C headers have no C++ guards
#include "gguf.h"
#include "llama.h"
}
#include "gemv_gpu.h"
#include "llama_gpu.h"
#include "model_err.h"

namespace {

// ------------------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------------------
__global__ void f32_to_f16_kernel(const float *__restrict__ in, __half *__restrict__ out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2half_rn(in[i]);
}

// x[t][:] = emb[tok[t]][:]
__global__ void embed_kernel(const __half *__restrict__ emb, const int32_t *__restrict__ tok, float *__restrict__ x, int dim) {
    const __half *row = emb + (size_t)tok[blockIdx.x] * dim;
    float *o = x + (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = __half2float(row[i]);
}

// out[r][:] = fp16(x[r][:] / rms(x[r]) * w), one block per row
__global__ void rmsnorm_kernel(const float *__restrict__ x, const float *__restrict__ w, __half *__restrict__ out, int dim,
                               float eps) {
    const float *a = x + (size_t)blockIdx.x * dim;
    float ss = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += a[i] * a[i];
    __shared__ float red[32];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        ss = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (threadIdx.x == 0) red[0] = ss;
    }
    __syncthreads();
    const float r = rsqrtf(red[0] / dim + eps);
    __half *b = out + (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) b[i] = __float2half_rn(a[i] * r * w[i]);
}

// qkv[t] = [q (nh*hd) | k (nkv*hd) | v (nkv*hd)] -> q16[t] (roped, fp16), k[t] (roped, fp32), v[t] (fp32).
// RoPE as llama.c: adjacent pairs (2i, 2i+1) of every head turn by pos[t] * inv_freq[i], the angle and its sine and
// cosine in fp64. pos: one position per row (the rows of a prefill, or one row per sequence of a batched decode).
__global__ void rope_split_kernel(const float *__restrict__ qkv, __half *__restrict__ q16, float *__restrict__ k,
                                  float *__restrict__ v, const float *__restrict__ inv_freq, const int32_t *__restrict__ posv,
                                  int nh, int nkv, int hd) {
    const int t = blockIdx.x, qd = nh * hd, kd = nkv * hd, half_hd = hd / 2;
    const int tid = blockIdx.y * blockDim.x + threadIdx.x, nthr = gridDim.y * blockDim.x;  // blocks of a row
    const float *row = qkv + (size_t)t * (qd + 2 * kd);
    const double pos = (double)posv[t];
    for (int p = tid; p < (nh + nkv) * half_hd; p += nthr) {
        const int head = p / half_hd, i = p % half_hd;
        double s, c;
        sincos(pos * (double)inv_freq[i], &s, &c);
        const float cs = (float)c, sn = (float)s;
        const float *src = row + (size_t)head * hd + 2 * i;  // q heads then k heads: contiguous in the row
        const float x0 = src[0], x1 = src[1];
        const float y0 = x0 * cs - x1 * sn, y1 = x0 * sn + x1 * cs;
        if (head < nh) {
            __half *d = q16 + (size_t)t * qd + (size_t)head * hd + 2 * i;
            d[0] = __float2half_rn(y0), d[1] = __float2half_rn(y1);
        } else {
            float *d = k + (size_t)t * kd + (size_t)(head - nh) * hd + 2 * i;
            d[0] = y0, d[1] = y1;
        }
    }
    for (int i = tid; i < kd; i += nthr) v[(size_t)t * kd + i] = row[qd + kd + i];
}

// a[t][i] = fp16(silu(g) * u), gu[t] = [g (hid) | u (hid)], t < n: one element per thread over the whole grid
// (one block per row left a decode step's 14336 elements to one multiprocessor)
__global__ void swiglu_kernel(const float *__restrict__ gu, __half *__restrict__ a, int n, int hid) {
    const size_t total = (size_t)n * hid;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / (size_t)hid, j = i % (size_t)hid;
        const float g = gu[t * 2 * hid + j];
        a[i] = __float2half_rn(g / (1.0f + expf(-g)) * gu[t * 2 * hid + hid + j]);
    }
}

// Launch shapes of the small kernels. Decode has one to eight rows: one 256-thread block per row left RMSNorm's
// 4096 and RoPE's 2560 pairs to one multiprocessor each, ~10 dependent load rounds (latency, not bandwidth).
constexpr int NORM_THREADS = 1024, ROPE_SPLIT = 8, EW_THREADS = 256;
inline unsigned ew_blocks(size_t total) {
    const size_t b = (total + EW_THREADS - 1) / EW_THREADS;
    return (unsigned)(b < 8192 ? (b ? b : 1) : 8192);
}

struct Layer {
    float *attn_norm = nullptr, *ffn_norm = nullptr;
    __half *wqkv = nullptr, *wo = nullptr, *wgu = nullptr, *wd = nullptr;
};

const char *cublas_name(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "cuBLAS error";
    }
}

}  // namespace

struct llama_gpu_model {
    llama_config cfg;
    int device = 0;
    cudaStream_t stream = nullptr;
    cublasHandle_t blas = nullptr;
    __half *tok_embd = nullptr, *output = nullptr;  // output == tok_embd when tied
    float *output_norm = nullptr;
    std::vector<Layer> layers;
    size_t weight_bytes = 0;
    // products of <= KVQM_GEMV_MAX_ROWS rows: gemv_gpu.cu's kernel of this shape, or cuBLAS (gemv_unroll 0);
    // KVQ_GPU_GEMV at load (llama_gpu.h)
    int gemv_unroll = KVQM_GEMV_UNROLL, gemv_warps = KVQM_GEMV_WARPS;
    // launch shapes of RMSNorm, RoPE and SwiGLU: 1 = one 256-thread block per row, as before (KVQ_GPU_ONEBLOCK=1, a
    // measurement switch, llama_gpu.h)
    int one_block = 0;
};

// One kvq CUDA cache per group of layers with the same key and value types (llama_layer_groups, as the CPU engine
// groups them: per-layer types, llama_ctx_params.layer_types); without per-layer types, one group of every layer.
struct GpuKV {
    kvq_cuda_cache *cache = nullptr;
    int32_t seq[LLAMA_GPU_MAX_SEQS] = {0};  // kvq_cuda sequence ids of the context's sequences in this cache
    kvq_cache_config cc;
    std::vector<int32_t> layers;            // the model's layer numbers of the cache's layers (their rotation seeds)
};

struct llama_gpu_ctx {
    const llama_gpu_model *m = nullptr;
    GpuKV kv[LLAMA_MAX_CACHES];
    int n_kv = 0;
    std::vector<int8_t> lg;   // [n_layers] layer l's group
    std::vector<int32_t> li;  // [n_layers] its layer index in the group's cache
    int n_seqs = 1, max_batch = 0, n_ctx = 0;
    int decode_attn = 0;  // llama_ctx_params.decode_attn: a prefill chunk attends token by token
    kvq_attn_params ap;
    size_t act_bytes = 0;
    // device buffers, sized for max_batch tokens
    float *inv_freq = nullptr, *x = nullptr, *qkv = nullptr, *k = nullptr, *v = nullptr, *gu = nullptr, *logits = nullptr;
    __half *h = nullptr, *q16 = nullptr, *o16 = nullptr, *a16 = nullptr;
    int32_t *tok = nullptr;  // [2 B]: token ids, then positions
    // CUDA graphs (llama_gpu.h, KVQ_GPU_GRAPH): graphs[n - 1][k] replays segment k of a step of n rows
    // (segment(): the kernels between two kvq_cuda calls), instantiated on first use; 0 = every launch eager
    int graph = 1;
    std::vector<cudaGraphExec_t> graphs[KVQM_GEMV_MAX_ROWS];
    // Whole decode steps as one graph (llama_gpu_ctx_set_graph): the decoding sequences are lent to a kvq_cuda static
    // plan (kvq_cuda.h section 5), whose steps a graph can capture, until something else needs them (a prefill, a
    // reset, a window change, stats). plan_seq: -1 the batch of every sequence, >= 0 that sequence alone.
    // step_graph[with logits]; lent_pos: the lent sequences' lengths (the cache's host state is stale meanwhile).
    // mutable: the const queries (stats, positions) end the plan or read lent_pos.
    mutable kvq_cuda_static *plan[LLAMA_MAX_CACHES] = {nullptr};  // one per group, all or none
    mutable bool planned = false;
    mutable int plan_seq = -2;
    mutable cudaGraphExec_t step_graph[2] = {nullptr, nullptr};
    mutable int64_t lent_pos[LLAMA_GPU_MAX_SEQS] = {0};
    int static_on = 0;  // KVQ_GPU_STATIC=1: whole-step graphs (off by default: measured no faster, llama_gpu.h)
};

#define CU(call, what)                                                                                           \
    do {                                                                                                         \
        cudaError_t e_ = (call);                                                                                 \
        if (e_ != cudaSuccess)                                                                                   \
            return kvqm_fail(e_ == cudaErrorMemoryAllocation ? KVQ_ERR_OUT_OF_MEMORY : KVQ_ERR_CUDA, "%s: %s", \
                             what, cudaGetErrorString(e_));                                                      \
    } while (0)

static kvq_status dev_alloc(void **p, size_t bytes, size_t *count, const char *what) {
    cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess) {
        *p = nullptr;
        cudaGetLastError();  // cudaMalloc's error is not sticky; clear it
        return kvqm_fail(e == cudaErrorMemoryAllocation ? KVQ_ERR_OUT_OF_MEMORY : KVQ_ERR_CUDA,
                         "GPU: %zu bytes for %s: %s", bytes, what, cudaGetErrorString(e));
    }
    if (count) *count += bytes;
    return KVQ_OK;
}

// Converts rows [0, ne1) of tensor `name` ([ne1][ne0], checked) to fp16 at dst (ne0 per row), via the CPU
// dequantizer one slab of rows at a time; F16 tensors are copied as they are. stage: host slab buffer, dstage: device
// fp32 slab buffer, both of `slab` floats.
static kvq_status upload(const gguf_file *f, const char *name, int64_t ne0, int64_t ne1, __half *dst, float *stage,
                         float *dstage, size_t slab, cudaStream_t st) {
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) return kvqm_fail(KVQ_ERR_FORMAT, "model: tensor '%s' is missing", name);
    if ((int64_t)t->ne[0] != ne0 || (int64_t)t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1)
        return kvqm_fail(KVQ_ERR_FORMAT, "model: tensor '%s' has shape [%llu, %llu, %llu, %llu], expected [%lld, %lld]", name,
                         (unsigned long long)t->ne[0], (unsigned long long)t->ne[1], (unsigned long long)t->ne[2],
                         (unsigned long long)t->ne[3], (long long)ne0, (long long)ne1);
    const size_t row_bytes = (size_t)(t->nbytes / (uint64_t)ne1);
    int64_t per = (int64_t)(slab / (size_t)ne0);
    if (per < 1) return kvqm_fail(KVQ_ERR_INTERNAL, "model: row of %lld elements exceeds the upload slab", (long long)ne0);
    for (int64_t r0 = 0; r0 < ne1; r0 += per) {
        const int64_t nr = ne1 - r0 < per ? ne1 - r0 : per;
        const size_t n = (size_t)(nr * ne0);
        if (t->type == GGML_F16) {  // already what the device holds
            CU(cudaMemcpyAsync(dst + (size_t)r0 * ne0, t->data + (size_t)r0 * row_bytes, n * 2, cudaMemcpyHostToDevice, st),
               "upload");
            CU(cudaStreamSynchronize(st), "upload");
            continue;
        }
        gguf_tensor view = *t;  // rows r0 .. r0+nr-1: whole blocks, since ne0 is a multiple of the block
        view.data = t->data + (size_t)r0 * row_bytes;
        view.n_elements = n;
        view.ne[1] = (uint64_t)nr;
        view.nbytes = (uint64_t)nr * row_bytes;
        kvq_status s = gguf_tensor_to_f32(&view, stage);
        if (s) return s;
        // on the stream of the conversion: a pageable cudaMemcpy may return before its DMA is done, and this stream
        // does not wait for the legacy default stream
        CU(cudaMemcpyAsync(dstage, stage, n * sizeof(float), cudaMemcpyHostToDevice, st), "upload");
        f32_to_f16_kernel<<<1024, 256, 0, st>>>(dstage, dst + (size_t)r0 * ne0, n);
        CU(cudaGetLastError(), "upload: conversion kernel");
        CU(cudaStreamSynchronize(st), "upload");  // dstage is reused by the next slab
    }
    return KVQ_OK;
}

static kvq_status upload_f32(const gguf_file *f, const char *name, int64_t n, float **dst, float *stage, size_t *count,
                             cudaStream_t st) {
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) return kvqm_fail(KVQ_ERR_FORMAT, "model: tensor '%s' is missing", name);
    if ((int64_t)t->n_elements != n || (int64_t)t->ne[0] != n)
        return kvqm_fail(KVQ_ERR_FORMAT, "model: tensor '%s' is not a vector of %lld", name, (long long)n);
    kvq_status s = gguf_tensor_to_f32(t, stage);
    if (s) return s;
    if ((s = dev_alloc((void **)dst, (size_t)n * sizeof(float), count, name))) return s;
    CU(cudaMemcpyAsync(*dst, stage, (size_t)n * sizeof(float), cudaMemcpyHostToDevice, st), "upload");
    CU(cudaStreamSynchronize(st), "upload");
    return KVQ_OK;
}

extern "C" int llama_gpu_built(void) { return 1; }

extern "C" kvq_status llama_gpu_mem_info(int device, size_t *free_bytes, size_t *total_bytes) {
    if (!free_bytes || !total_bytes) return kvqm_fail(KVQ_ERR_NULL, "llama_gpu_mem_info: NULL argument");
    int n = 0;
    kvq_status s = kvq_cuda_device_count(&n);
    if (s) return kvqm_fail(s, "no usable GPU: %s", kvq_last_error());
    if (device < 0 || device >= n) return kvqm_fail(KVQ_ERR_INVALID_ARG, "GPU %d: %d usable", device, n);
    CU(cudaSetDevice(device), "cudaSetDevice");
    CU(cudaMemGetInfo(free_bytes, total_bytes), "cudaMemGetInfo");
    return KVQ_OK;
}

extern "C" void llama_gpu_free(llama_gpu_model *m) {
    if (!m) return;
    cudaSetDevice(m->device);
    if (m->stream) cudaStreamSynchronize(m->stream);
    for (Layer &L : m->layers) {
        cudaFree(L.attn_norm), cudaFree(L.ffn_norm), cudaFree(L.wqkv), cudaFree(L.wo), cudaFree(L.wgu), cudaFree(L.wd);
    }
    if (m->output != m->tok_embd) cudaFree(m->output);
    cudaFree(m->tok_embd);
    cudaFree(m->output_norm);
    if (m->blas) cublasDestroy(m->blas);
    if (m->stream) cudaStreamDestroy(m->stream);
    delete m;
}

extern "C" kvq_status llama_gpu_load(const gguf_file *f, int device, llama_gpu_model **out) {
    if (!f || !out) return kvqm_fail(KVQ_ERR_NULL, "llama_gpu_load: NULL argument");
    *out = nullptr;
    gguf_str arch = gguf_get_str(f, "general.architecture");
    if (!arch.ptr || arch.len != 5 || memcmp(arch.ptr, "llama", 5) != 0)
        return kvqm_fail(KVQ_ERR_FORMAT, "GPU engine: architecture '%.*s' is not supported (llama only)",
                         arch.ptr ? (int)(arch.len > 32 ? 32 : arch.len) : 0, arch.ptr ? arch.ptr : "");
    llama_config c;
    kvq_status s = llama_read_config(f, &c);
    if (s) return s;
    int n = 0;
    if ((s = kvq_cuda_device_count(&n))) return kvqm_fail(s, "no usable GPU: %s", kvq_last_error());
    if (device < 0 || device >= n) return kvqm_fail(KVQ_ERR_INVALID_ARG, "GPU %d: this machine has %d usable", device, n);
    llama_gpu_model *m = new (std::nothrow) llama_gpu_model;
    if (!m) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "GPU engine: out of memory");
    m->cfg = c;
    m->device = device;
    if (const char *ob = getenv("KVQ_GPU_ONEBLOCK")) m->one_block = strcmp(ob, "1") == 0;
    if (const char *g = getenv("KVQ_GPU_GEMV")) {  // "0": cuBLAS for every product; "U,W": the GEMV's shape
        int u = 0, w = 0;
        if (strcmp(g, "0") == 0) {
            m->gemv_unroll = 0;
        } else if (sscanf(g, "%d,%d", &u, &w) == 2 && (u == 2 || u == 4 || u == 8) && (w == 4 || w == 8)) {
            m->gemv_unroll = u, m->gemv_warps = w;
        } else {
            delete m;
            return kvqm_fail(KVQ_ERR_INVALID_ARG, "KVQ_GPU_GEMV='%.32s': 0, or U,W with U 2/4/8 and W 4/8", g);
        }
    }
    const int64_t dim = c.dim, kvd = (int64_t)c.n_kv_heads * c.head_dim, hid = c.hidden_dim, V = c.vocab_size;
    const size_t slab = (size_t)16 << 20;  // floats: 64 MiB on each side
    float *stage = nullptr, *dstage = nullptr;
    cudaError_t e;
    cublasStatus_t bs;
    if ((e = cudaSetDevice(device)) != cudaSuccess || (e = cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking)) != cudaSuccess) {
        s = kvqm_fail(KVQ_ERR_CUDA, "GPU %d: %s", device, cudaGetErrorString(e));
        goto fail;
    }
    if ((bs = cublasCreate(&m->blas)) != CUBLAS_STATUS_SUCCESS || (bs = cublasSetStream(m->blas, m->stream)) != CUBLAS_STATUS_SUCCESS) {
        m->blas = bs == CUBLAS_STATUS_SUCCESS ? m->blas : nullptr;
        s = kvqm_fail(KVQ_ERR_CUDA, "cuBLAS: %s", cublas_name(bs));
        goto fail;
    }
    if (!(stage = (float *)malloc(slab * sizeof(float)))) {
        s = kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "GPU engine: no host memory for the upload slab");
        goto fail;
    }
    if ((s = dev_alloc((void **)&dstage, slab * sizeof(float), nullptr, "the upload slab"))) goto fail;
    if ((s = dev_alloc((void **)&m->tok_embd, (size_t)V * dim * 2, &m->weight_bytes, "token_embd")) ||
        (s = upload(f, "token_embd.weight", dim, V, m->tok_embd, stage, dstage, slab, m->stream)) ||
        (s = upload_f32(f, "output_norm.weight", dim, &m->output_norm, stage, &m->weight_bytes, m->stream)))
        goto fail;
    if (gguf_find_tensor(f, "output.weight")) {
        if ((s = dev_alloc((void **)&m->output, (size_t)V * dim * 2, &m->weight_bytes, "output")) ||
            (s = upload(f, "output.weight", dim, V, m->output, stage, dstage, slab, m->stream)))
            goto fail;
    } else {
        m->output = m->tok_embd;  // tied embeddings
    }
    try {
        m->layers.resize((size_t)c.n_layers);
    } catch (...) {
        s = kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "GPU engine: out of memory");
        goto fail;
    }
    for (int l = 0; l < c.n_layers; l++) {
        Layer &L = m->layers[(size_t)l];
        char nm[9][64];
        static const char *const suffix[9] = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                              "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"};
        for (int i = 0; i < 9; i++) snprintf(nm[i], sizeof nm[i], "blk.%d.%s.weight", l, suffix[i]);
        if ((s = upload_f32(f, nm[0], dim, &L.attn_norm, stage, &m->weight_bytes, m->stream)) ||
            (s = upload_f32(f, nm[5], dim, &L.ffn_norm, stage, &m->weight_bytes, m->stream)) ||
            (s = dev_alloc((void **)&L.wqkv, (size_t)(dim + 2 * kvd) * dim * 2, &m->weight_bytes, nm[1])) ||
            (s = upload(f, nm[1], dim, dim, L.wqkv, stage, dstage, slab, m->stream)) ||
            (s = upload(f, nm[2], dim, kvd, L.wqkv + (size_t)dim * dim, stage, dstage, slab, m->stream)) ||
            (s = upload(f, nm[3], dim, kvd, L.wqkv + (size_t)(dim + kvd) * dim, stage, dstage, slab, m->stream)) ||
            (s = dev_alloc((void **)&L.wo, (size_t)dim * dim * 2, &m->weight_bytes, nm[4])) ||
            (s = upload(f, nm[4], dim, dim, L.wo, stage, dstage, slab, m->stream)) ||
            (s = dev_alloc((void **)&L.wgu, (size_t)2 * hid * dim * 2, &m->weight_bytes, nm[6])) ||
            (s = upload(f, nm[6], dim, hid, L.wgu, stage, dstage, slab, m->stream)) ||
            (s = upload(f, nm[7], dim, hid, L.wgu + (size_t)hid * dim, stage, dstage, slab, m->stream)) ||
            (s = dev_alloc((void **)&L.wd, (size_t)dim * hid * 2, &m->weight_bytes, nm[8])) ||
            (s = upload(f, nm[8], hid, dim, L.wd, stage, dstage, slab, m->stream)))
            goto fail;
    }
    free(stage);
    cudaFree(dstage);
    *out = m;
    return KVQ_OK;
fail:
    free(stage);
    if (dstage) cudaFree(dstage);
    llama_gpu_free(m);
    return s;
}

extern "C" const llama_config *llama_gpu_config(const llama_gpu_model *m) { return m ? &m->cfg : nullptr; }
extern "C" size_t llama_gpu_weight_bytes(const llama_gpu_model *m) { return m ? m->weight_bytes : 0; }

// Gives the lent sequences back (their state to the host) and drops the step graphs that captured the plan.
static kvq_status end_plan(const llama_gpu_ctx *c) {
    if (!c->planned) return KVQ_OK;
    for (cudaGraphExec_t &g : c->step_graph)
        if (g) cudaGraphExecDestroy(g), g = nullptr;
    kvq_status s = KVQ_OK;
    for (kvq_cuda_static *&pl : c->plan) {
        kvq_status e = kvq_cuda_static_end(pl, (kvq_cuda_stream)c->m->stream);  // NULL: nothing to do
        if (!s) s = e;
        pl = nullptr;
    }
    c->planned = false;
    c->plan_seq = -2;
    return s ? kvqm_fail(s, "kvq_cuda_static_end: %s", kvq_last_error()) : KVQ_OK;
}

static void free_graphs(llama_gpu_ctx *c) {
    for (auto &v : c->graphs) {
        for (cudaGraphExec_t g : v)
            if (g) cudaGraphExecDestroy(g);
        v.clear();
    }
    end_plan(c);
}

extern "C" void llama_gpu_ctx_free(llama_gpu_ctx *c) {
    if (!c) return;
    cudaSetDevice(c->m->device);
    cudaStreamSynchronize(c->m->stream);
    free_graphs(c);
    for (GpuKV &g : c->kv) kvq_cuda_cache_free(g.cache);
    void *bufs[] = {c->inv_freq, c->x, c->qkv, c->k, c->v, c->gu, c->logits, c->h, c->q16, c->o16, c->a16, c->tok};
    for (void *b : bufs) cudaFree(b);
    delete c;
}

extern "C" kvq_status llama_gpu_ctx_create(const llama_gpu_model *m, const llama_ctx_params *p, llama_gpu_ctx **out) {
    return llama_gpu_ctx_create_par(m, p, 1, out);
}

extern "C" kvq_status llama_gpu_ctx_create_par(const llama_gpu_model *m, const llama_ctx_params *p, int n_seqs,
                                               llama_gpu_ctx **out) {
    if (!m || !p || !out) return kvqm_fail(KVQ_ERR_NULL, "llama_gpu_ctx_create: NULL argument");
    *out = nullptr;
    if (p->n_ctx < 1) return kvqm_fail(KVQ_ERR_INVALID_ARG, "context size %d must be >= 1", p->n_ctx);
    if (n_seqs < 1 || n_seqs > LLAMA_GPU_MAX_SEQS)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "%d sequences (1..%d)", n_seqs, LLAMA_GPU_MAX_SEQS);
    if (p->prerope == 1) return kvqm_fail(KVQ_ERR_INVALID_ARG, "GPU engine: pre-RoPE keys (--kv-prerope 1) are CPU only");
    if (p->outliers > 0)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "GPU engine: dense-and-sparse outliers (--kv-outliers) are CPU only");
    if (p->params8 > 0)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "GPU engine: 8-bit group parameters (--kv-params8) are CPU only");
    if (p->window8 > 0)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "GPU engine: 8-bit residual windows (--kv-window8) are CPU only");
    if (p->exact_batch > 0)  // -1 (the engine's default) is off here
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "GPU engine: the exact-batch prefill (--prefill-attn exact) is CPU only");
    const llama_config &c = m->cfg;
    CU(cudaSetDevice(m->device), "cudaSetDevice");  // the activation buffers go to the model's GPU
    llama_gpu_ctx *x = new (std::nothrow) llama_gpu_ctx;
    if (!x) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "out of memory");
    x->m = m;
    x->n_ctx = p->n_ctx;
    x->max_batch = p->max_batch > 0 ? p->max_batch : 256;
    x->decode_attn = p->decode_attn != 0;
    x->n_seqs = n_seqs;
    if (const char *g = getenv("KVQ_GPU_GRAPH")) {  // "0": every launch eager; "1": graphs (the default)
        if (strcmp(g, "0") && strcmp(g, "1")) {
            delete x;
            return kvqm_fail(KVQ_ERR_INVALID_ARG, "KVQ_GPU_GRAPH=%s: 0 or 1", g);
        }
        x->graph = g[0] == '1';
    }
    if (const char *g = getenv("KVQ_GPU_STATIC")) {  // "1": whole-step graphs through a static plan
        if (strcmp(g, "0") && strcmp(g, "1")) {
            delete x;
            return kvqm_fail(KVQ_ERR_INVALID_ARG, "KVQ_GPU_STATIC=%s: 0 or 1", g);
        }
        x->static_on = g[0] == '1';
    }
    x->ap = kvq_attn_params_default(c.n_heads);
    kvq_status s;
    // rows per call: a prefill chunk of one sequence, or one token of every sequence
    const size_t B = (size_t)(x->max_batch > n_seqs ? x->max_batch : n_seqs), dim = (size_t)c.dim, kvd = (size_t)c.n_kv_heads * c.head_dim,
                 hid = (size_t)c.hidden_dim, V = (size_t)c.vocab_size;
    float inv[128];  // head_dim / 2 <= 128 (llama_read_config: head_dim divides dim <= 65536; kvq_cuda: 64, 128, 256)
    int8_t kind[LLAMA_MAX_CACHES];
    kvq_type gk[LLAMA_MAX_CACHES], gv[LLAMA_MAX_CACHES];
    if (c.head_dim > 256 || c.head_dim % 2) {
        s = kvqm_fail(KVQ_ERR_UNSUPPORTED_HEAD_DIM, "GPU engine: head_dim %d (64, 128 or 256)", c.head_dim);
        goto fail;
    }
    try {
        x->lg.resize((size_t)c.n_layers), x->li.resize((size_t)c.n_layers);
    } catch (...) {
        s = kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "out of memory");
        goto fail;
    }
    // the layers' caches, grouped as the CPU engine groups them
    if ((s = llama_check_layer_types(&c, p))) goto fail;
    if ((x->n_kv = llama_layer_groups(&c, p, x->lg.data(), kind, gk, gv)) < 0) {
        s = (kvq_status)x->n_kv, x->n_kv = 0;
        goto fail;
    }
    for (int l = 0; l < c.n_layers; l++) {
        GpuKV &g = x->kv[x->lg[(size_t)l]];
        x->li[(size_t)l] = (int32_t)g.layers.size();
        try {
            g.layers.push_back(l);
        } catch (...) {
            s = kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "out of memory");
            goto fail;
        }
    }
    for (int gi = 0; gi < x->n_kv; gi++) {
        GpuKV &g = x->kv[gi];
        kvq_cache_config &cc = g.cc;
        cc = llama_cache_config(&c, p, kind[gi], gk[gi], gv[gi], (int)g.layers.size(), g.layers.data());
        // -1: the CPU cache's default, resolved the same way by kvq_cuda_cache_create (non-uniform levels for Q3 roles);
        // Q3 roles take either, Q4 and Q2 roles with non-uniform levels are refused there, with a message
        cc.nonuniform = p->nonuniform;
        cc.outliers = 0;  // nor outliers (-1 is off here; other values were refused above)
        cc.params8 = 0;   // nor 8-bit parameters (likewise)
        cc.window8 = 0;   // nor 8-bit windows (likewise)
        cc.max_seqs = n_seqs;
        cc.arena_bytes = kvq_cache_arena_bytes_for(&cc, p->n_ctx);  // one sequence's pages (sinks included)
        if (cc.arena_bytes > SIZE_MAX / (size_t)n_seqs) {
            s = kvqm_fail(KVQ_ERR_INVALID_ARG, "KV cache of %d x %d tokens: too large", n_seqs, p->n_ctx);
            goto fail;
        }
        cc.arena_bytes *= (size_t)n_seqs;
        if (cc.arena_bytes == 0) {
            int64_t why = kvq_cache_capacity_tokens(&cc);
            s = kvqm_fail(why < 0 ? (kvq_status)why : KVQ_ERR_INTERNAL, "KV cache (%d tokens): %s", p->n_ctx, kvq_last_error());
            goto fail;
        }
        if ((s = kvq_cuda_cache_create(&cc, m->device, p->n_ctx, &g.cache))) {
            s = kvqm_fail(s, "GPU KV cache of %d tokens (%zu bytes of pages): %s", p->n_ctx, cc.arena_bytes, kvq_last_error());
            goto fail;
        }
        for (int i = 0; i < n_seqs; i++)
            if ((s = kvq_cuda_seq_new(g.cache, &g.seq[i]))) {
                s = kvqm_fail(s, "kvq_cuda_seq_new: %s", kvq_last_error());
                goto fail;
            }
    }
    for (int i = 0; i < c.head_dim / 2; i++) inv[i] = (float)pow((double)c.rope_theta, -2.0 * i / c.head_dim);
    if ((s = dev_alloc((void **)&x->inv_freq, (size_t)c.head_dim / 2 * 4, &x->act_bytes, "RoPE table")) ||
        (s = dev_alloc((void **)&x->x, B * dim * 4, &x->act_bytes, "activations")) ||
        (s = dev_alloc((void **)&x->qkv, B * (dim + 2 * kvd) * 4, &x->act_bytes, "activations")) ||
        (s = dev_alloc((void **)&x->k, B * kvd * 4, &x->act_bytes, "activations")) ||
        (s = dev_alloc((void **)&x->v, B * kvd * 4, &x->act_bytes, "activations")) ||
        (s = dev_alloc((void **)&x->gu, B * 2 * hid * 4, &x->act_bytes, "activations")) ||
        (s = dev_alloc((void **)&x->logits, B * V * 4, &x->act_bytes, "logits")) ||
        (s = dev_alloc((void **)&x->h, B * (dim > hid ? dim : hid) * 2, &x->act_bytes, "activations")) ||
        (s = dev_alloc((void **)&x->q16, B * dim * 2, &x->act_bytes, "activations")) ||
        (s = dev_alloc((void **)&x->o16, B * dim * 2, &x->act_bytes, "activations")) ||
        (s = dev_alloc((void **)&x->a16, B * hid * 2, &x->act_bytes, "activations")) ||
        (s = dev_alloc((void **)&x->tok, 2 * B * 4, &x->act_bytes, "token ids and positions")))
        goto fail;
    {
        cudaError_t e = cudaMemcpyAsync(x->inv_freq, inv, (size_t)c.head_dim / 2 * 4, cudaMemcpyHostToDevice, m->stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(m->stream);
        if (e != cudaSuccess) {
            s = kvqm_fail(KVQ_ERR_CUDA, "RoPE table: %s", cudaGetErrorString(e));
            goto fail;
        }
    }
    *out = x;
    return KVQ_OK;
fail:
    llama_gpu_ctx_free(x);
    return s;
}

extern "C" kvq_status llama_gpu_ctx_set_graph(llama_gpu_ctx *c, int on) {
    if (!c) return kvqm_fail(KVQ_ERR_NULL, "llama_gpu_ctx_set_graph: NULL");
    if (!on) {
        cudaSetDevice(c->m->device);
        cudaStreamSynchronize(c->m->stream);
        free_graphs(c);
    }
    c->graph = on != 0;
    return KVQ_OK;
}

extern "C" int llama_gpu_ctx_graphs(const llama_gpu_ctx *c) {
    int n = 0;
    if (c) {
        for (auto &v : c->graphs)
            for (cudaGraphExec_t g : v) n += g != nullptr;
        for (cudaGraphExec_t g : c->step_graph) n += g != nullptr;
    }
    return n;
}

extern "C" int llama_gpu_ctx_step_graphs(const llama_gpu_ctx *c) {
    return c ? (c->step_graph[0] != nullptr) + (c->step_graph[1] != nullptr) : 0;
}

extern "C" kvq_status llama_gpu_ctx_set_static(llama_gpu_ctx *c, int on) {
    if (!c) return kvqm_fail(KVQ_ERR_NULL, "llama_gpu_ctx_set_static: NULL");
    if (!on) {
        kvq_status s = end_plan(c);
        if (s) return s;
    }
    c->static_on = on != 0;
    return KVQ_OK;
}

extern "C" kvq_status llama_gpu_ctx_reset(llama_gpu_ctx *c) {
    if (!c) return kvqm_fail(KVQ_ERR_NULL, "llama_gpu_ctx_reset: NULL");
    kvq_status s = end_plan(c);
    if (s == KVQ_ERR_CACHE_FULL) s = KVQ_OK;  // (cannot happen: run() checks the room first) the sequences go anyway
    for (int g = 0; g < c->n_kv; g++)
        for (int i = 0; i < c->n_seqs && !s; i++) {
            s = kvq_cuda_seq_free(c->kv[g].cache, c->kv[g].seq[i]);
            if (!s) s = kvq_cuda_seq_new(c->kv[g].cache, &c->kv[g].seq[i]);
        }
    return s ? kvqm_fail(s, "reset: %s", kvq_last_error()) : KVQ_OK;
}

extern "C" int64_t llama_gpu_ctx_seq_pos(const llama_gpu_ctx *c, int seq) {
    int64_t len = 0;
    if (!c || seq < 0 || seq >= c->n_seqs) return 0;
    if (c->planned && (c->plan_seq < 0 || c->plan_seq == seq)) return c->lent_pos[seq];
    const GpuKV &g = c->kv[c->lg[0]];  // layer 0's cache: every layer holds the same tokens
    kvq_cuda_seq_length(g.cache, g.seq[seq], c->li[0], &len);
    return len;
}

extern "C" int64_t llama_gpu_ctx_pos(const llama_gpu_ctx *c) { return llama_gpu_ctx_seq_pos(c, 0); }

extern "C" kvq_status llama_gpu_ctx_set_window(llama_gpu_ctx *c, int window) {
    if (!c) return kvqm_fail(KVQ_ERR_NULL, "llama_gpu_ctx_set_window: NULL");
    if (window < 0) return kvqm_fail(KVQ_ERR_INVALID_ARG, "attention window %d must be >= 0", window);
    if (window != c->ap.window) {  // a plan's steps have the window it was made with
        kvq_status s = end_plan(c);
        if (s) return s;
    }
    c->ap.window = window;
    return KVQ_OK;
}

extern "C" size_t llama_gpu_ctx_device_bytes(const llama_gpu_ctx *c) {
    if (!c) return 0;
    size_t b = c->act_bytes;
    for (int g = 0; g < c->n_kv; g++) {
        kvq_cuda_stats st;
        if (!kvq_cuda_cache_get_stats(c->kv[g].cache, &st)) b += st.arena_bytes + st.window_bytes + st.table_bytes + st.workspace_bytes;
    }
    return b;
}

extern "C" kvq_status llama_gpu_ctx_stats(const llama_gpu_ctx *c, kvq_cache_stats *out) {
    if (!c || !out) return kvqm_fail(KVQ_ERR_NULL, "llama_gpu_ctx_stats: NULL argument");
    kvq_status es = end_plan(c);  // the pages a plan reserved are not the sequences' (and lengths come from the host)
    if (es) return es;
    memset(out, 0, sizeof *out);
    // the caches' sums (each holds its own layers); bytes_per_token and f16_bytes_per_token are properties of each
    // layout: read from a one-page CPU cache of the same configuration (the page layout is the same, kvq_cuda.h)
    for (int g = 0; g < c->n_kv; g++) {
        kvq_cuda_stats st;
        kvq_status s = kvq_cuda_cache_get_stats(c->kv[g].cache, &st);
        if (s) return s;
        kvq_cache_config cc = c->kv[g].cc;
        cc.arena_bytes = kvq_cache_arena_bytes_for(&cc, 1);
        kvq_cache *tmp = nullptr;
        kvq_cache_stats cs;
        if ((s = kvq_cache_create(&cc, &tmp)) || (s = kvq_cache_get_stats(tmp, &cs))) {
            kvq_cache_free(tmp);
            return kvqm_fail(s, "stats: %s", kvq_last_error());
        }
        kvq_cache_free(tmp);
        out->pages_total += st.pages_total, out->pages_free += st.pages_free, out->pages_shared += st.pages_shared;
        out->page_bytes = st.page_bytes, out->arena_bytes += st.arena_bytes;  // page_bytes: the last cache's
        out->page_bytes_in_use += (size_t)(st.pages_total - st.pages_free) * st.page_bytes;
        // the window rings as allocated (R + G fp16 K and V rows per sequence and layer, up front): the device memory
        // they take, and what the CPU engine's windows hold once full (kvq_cache_stats counts allocated rows), so that
        // kvq perplexity's KV bytes per token agree between the engines. A ring of one row is the direct path (R = 0,
        // per-token types: tokens go straight to pages), which never uses it and has no CPU counterpart: not counted.
        const size_t ring = (size_t)cc.max_seqs * cc.n_layers * 2 * cc.n_kv_heads * cc.head_dim * sizeof(uint16_t);
        if (st.window_bytes > ring) out->window_bytes += st.window_bytes;
        out->n_seqs = st.n_seqs;
        out->bytes_per_token += cs.bytes_per_token;
        out->f16_bytes_per_token += cs.f16_bytes_per_token;
    }
    for (int i = 0; i < c->n_seqs; i++) out->tokens += llama_gpu_ctx_seq_pos(c, i);
    out->capacity_tokens = c->n_ctx;  // per sequence
    return KVQ_OK;
}

// Y[n][out] (fp32) = X[n][in] (fp16) W^T, W [out][in] fp16 row-major; beta 1 adds into Y. Up to 8 rows (decode):
// gemv_gpu.cu's kernel, each weight row read once for all rows; more rows (prefill), or arguments it does not take
// (kvqm_gemv_f16_ok): cuBLAS.
static kvq_status gemm(const llama_gpu_model *m, float *Y, const __half *X, const __half *W, int n, int in, int out, float beta) {
    if (m->gemv_unroll && kvqm_gemv_f16_ok(Y, X, W, n, in, out, beta))
        return kvqm_gemv_f16_shape(Y, X, W, n, in, out, beta, m->stream, m->gemv_unroll, m->gemv_warps);
    const float alpha = 1.0f;
    cublasStatus_t s = cublasGemmEx(m->blas, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &alpha, W, CUDA_R_16F, in, X, CUDA_R_16F,
                                    in, &beta, Y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    return s == CUBLAS_STATUS_SUCCESS ? KVQ_OK : kvqm_fail(KVQ_ERR_CUDA, "cublasGemmEx (%d x %d x %d): %s", n, out, in, cublas_name(s));
}

extern "C" kvq_status llama_gpu_sync(llama_gpu_ctx *c) {
    if (!c) return kvqm_fail(KVQ_ERR_NULL, "llama_gpu_sync: NULL");
    CU(cudaStreamSynchronize(c->m->stream), "GPU forward");
    return KVQ_OK;
}

// Segment k of the layers over n rows: the kernels between two kvq_cuda calls, which read and write only the
// context's buffers (the token ids and positions in c->tok, copied before segment 0). k = 0: the embedding and
// layer 0's attention input (RMSNorm, QKV product, RoPE); 1 <= k < n_layers: layer k-1's output product and FFN, then
// layer k's attention input; k = n_layers: the last layer's output product and FFN; k = n_layers + 1: the final
// RMSNorm and the logits of rows first .. n-1 (to c->logits).
static kvq_status segment(llama_gpu_ctx *c, int k, int n, int first) {
    const llama_gpu_model *m = c->m;
    const llama_config &cf = m->cfg;
    const int dim = cf.dim, hd = cf.head_dim, kvd = cf.n_kv_heads * hd, hid = cf.hidden_dim, V = cf.vocab_size;
    cudaStream_t st = m->stream;
    kvq_status s;
    const int norm_threads = m->one_block ? 256 : NORM_THREADS, rope_split = m->one_block ? 1 : ROPE_SPLIT;
    const unsigned swiglu_blocks = m->one_block ? (unsigned)n : ew_blocks((size_t)n * hid);
    if (k == cf.n_layers + 1) {
        const int rows = n - first;
        rmsnorm_kernel<<<rows, norm_threads, 0, st>>>(c->x + (size_t)first * dim, m->output_norm, c->h, dim, cf.norm_eps);
        CU(cudaGetLastError(), "GPU forward: kernel launch");
        return gemm(m, c->logits, c->h, m->output, rows, dim, V, 0.0f);
    }
    if (k == 0) {
        embed_kernel<<<n, NORM_THREADS, 0, st>>>(m->tok_embd, c->tok, c->x, dim);
    } else {  // layer k - 1 after its attention
        const Layer &L = m->layers[(size_t)(k - 1)];
        if ((s = gemm(m, c->x, c->o16, L.wo, n, dim, dim, 1.0f))) return s;  // x += o Wo^T
        rmsnorm_kernel<<<n, norm_threads, 0, st>>>(c->x, L.ffn_norm, c->h, dim, cf.norm_eps);
        if ((s = gemm(m, c->gu, c->h, L.wgu, n, dim, 2 * hid, 0.0f))) return s;
        swiglu_kernel<<<swiglu_blocks, EW_THREADS, 0, st>>>(c->gu, c->a16, n, hid);
        CU(cudaGetLastError(), "GPU forward: kernel launch");
        if ((s = gemm(m, c->x, c->a16, L.wd, n, hid, dim, 1.0f))) return s;  // x += ... Wd^T
    }
    if (k < cf.n_layers) {  // layer k up to its attention
        const Layer &L = m->layers[(size_t)k];
        rmsnorm_kernel<<<n, norm_threads, 0, st>>>(c->x, L.attn_norm, c->h, dim, cf.norm_eps);
        if ((s = gemm(m, c->qkv, c->h, L.wqkv, n, dim, dim + 2 * kvd, 0.0f))) return s;
        rope_split_kernel<<<dim3(n, rope_split), 256, 0, st>>>(c->qkv, c->q16, c->k, c->v, c->inv_freq, c->tok + n, cf.n_heads,
                                                              cf.n_kv_heads, hd);
    }
    CU(cudaGetLastError(), "GPU forward: kernel launch");
    return KVQ_OK;
}

// Segment k (above) as a CUDA graph: captured from the stream on first use and instantiated, then replayed with
// cudaGraphLaunch. Its kernels' arguments are fixed per context and row count (buffers, weights, n), so a graph
// needs no update between steps; the kvq_cuda calls between segments (their arguments change every step: page
// tables, window heads, lengths, passed by value from the cache's host state) stay eager. Graphs for n <=
// KVQM_GEMV_MAX_ROWS (decode) and the logits of every row; otherwise, with graphs off, or when a capture fails (the
// context then stays eager), the kernels are launched directly.
static kvq_status launch_segment(llama_gpu_ctx *c, int k, int n, int first) {
    if (!c->graph || n > KVQM_GEMV_MAX_ROWS || first != 0) return segment(c, k, n, first);
    std::vector<cudaGraphExec_t> &v = c->graphs[n - 1];
    cudaStream_t st = c->m->stream;
    if (v.empty()) {
        try {
            v.assign((size_t)c->m->cfg.n_layers + 2, nullptr);
        } catch (...) {
            return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "forward: no host memory");
        }
    }
    if (!v[(size_t)k]) {
        cudaGraph_t g = nullptr;
        cudaGraphExec_t ge = nullptr;
        cudaError_t e = cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
        kvq_status s = KVQ_OK;
        if (e == cudaSuccess) {
            s = segment(c, k, n, first);
            e = cudaStreamEndCapture(st, &g);
        }
        if (!s && e == cudaSuccess && g) e = cudaGraphInstantiateWithFlags(&ge, g, 0);
        if (g) cudaGraphDestroy(g);
        if (s || e != cudaSuccess || !ge) {  // not capturable here (e.g. a library call that allocates): stay eager
            cudaGetLastError();
            c->graph = 0;
            free_graphs(c);
            return segment(c, k, n, first);
        }
        v[(size_t)k] = ge;
    }
    CU(cudaGraphLaunch(v[(size_t)k], st), "cudaGraphLaunch");
    return KVQ_OK;
}

// A decode step as ONE graph: the segments and, between them, kvq_cuda_static_step of every layer, captured on first
// use per plan (its device blocks are the graph's arguments) and per logits (with / without the final segment).
// Returns false (nothing enqueued, graphs off for this context) when the plan or the capture is not possible here.
static bool static_step(llama_gpu_ctx *c, int seq, int n, bool logits) {
    const llama_config &cf = c->m->cfg;
    cudaStream_t st = c->m->stream;
    const int want = seq < 0 ? -1 : seq;
    if (c->planned && c->plan_seq != want && end_plan(c)) return c->static_on = 0, false;
    if (!c->planned) {
        for (int i = 0; i < n; i++) c->lent_pos[seq < 0 ? i : seq] = llama_gpu_ctx_seq_pos(c, seq < 0 ? i : seq);
        c->planned = true;  // end_plan gives back the plans made so far
        for (int g = 0; g < c->n_kv; g++) {
            const int32_t *ids = seq < 0 ? c->kv[g].seq : &c->kv[g].seq[seq];
            if (kvq_cuda_static_create(c->kv[g].cache, n, ids, c->n_ctx, &c->ap, KVQ_DTYPE_F32, KVQ_DTYPE_F16,
                                       (kvq_cuda_stream)st, &c->plan[g])) {
                end_plan(c);
                return c->static_on = 0, false;  // e.g. too few free pages for the reservation: stay eager
            }
        }
        c->plan_seq = want;
    }
    cudaGraphExec_t &ge = c->step_graph[logits];
    if (!ge) {
        cudaGraph_t g = nullptr;
        cudaError_t e = cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
        kvq_status s = KVQ_OK;
        if (e == cudaSuccess) {
            s = segment(c, 0, n, 0);
            for (int l = 0; l < cf.n_layers && !s; l++) {
                s = kvq_cuda_static_step(c->plan[c->lg[(size_t)l]], c->li[(size_t)l], c->k, c->v, c->q16, c->o16,
                                         (kvq_cuda_stream)st);
                if (!s) s = segment(c, l + 1, n, 0);
            }
            if (!s && logits) s = segment(c, cf.n_layers + 1, n, 0);
            e = cudaStreamEndCapture(st, &g);
        }
        if (!s && e == cudaSuccess && g) e = cudaGraphInstantiateWithFlags(&ge, g, 0);
        if (g) cudaGraphDestroy(g);
        if (s || e != cudaSuccess || !ge) {
            cudaGetLastError();
            ge = nullptr;
            end_plan(c);
            return c->static_on = 0, false;
        }
    }
    if (cudaGraphLaunch(ge, st) != cudaSuccess) {  // nothing ran: the step goes the eager way
        cudaGetLastError();
        end_plan(c);
        return c->static_on = 0, false;
    }
    for (int i = 0; i < n; i++) c->lent_pos[seq < 0 ? i : seq]++;
    return true;
}

// The layers over n rows: a prefill chunk of sequence `seq` (rows at its next positions), or (seq < 0) one token of
// every sequence (row i: sequence i, at its next position). Checks first: an error leaves the cache as it was.
static kvq_status run(llama_gpu_ctx *c, int seq, const int32_t *tokens, int n, float *logits, int logits_from) {
    const llama_gpu_model *m = c->m;
    const llama_config &cf = m->cfg;
    const int V = cf.vocab_size;
    int32_t hostbuf[2 * 512], *pos;  // ids then positions; larger batches allocate
    std::vector<int32_t> big;
    if (n > 512) {
        try {
            big.resize(2 * (size_t)n);
        } catch (...) {
            return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "forward: %d tokens", n);
        }
    }
    int32_t *ids = n > 512 ? big.data() : hostbuf;
    pos = ids + n;
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= V) return kvqm_fail(KVQ_ERR_INVALID_ARG, "forward: token id %d out of range", tokens[t]);
        ids[t] = tokens[t];
        const int64_t p = seq >= 0 ? llama_gpu_ctx_seq_pos(c, seq) + t : llama_gpu_ctx_seq_pos(c, t);
        if (p + (seq >= 0 ? n - t : 1) > c->n_ctx)
            return kvqm_fail(KVQ_ERR_CACHE_FULL, "forward: context full (sequence %d: %lld + %d > %d tokens)",
                             seq >= 0 ? seq : t, (long long)(seq >= 0 ? p - t : p), seq >= 0 ? n : 1, c->n_ctx);
        pos[t] = (int32_t)p;
    }
    CU(cudaSetDevice(m->device), "cudaSetDevice");
    cudaStream_t st = m->stream;
    // decode steps (one token per sequence, <= 8 rows, logits of every row or none) go whole through a static plan
    const bool want_logits = logits && logits_from < n;
    const bool decode = (seq < 0 || (n == 1 && c->n_seqs == 1)) && n <= KVQM_GEMV_MAX_ROWS &&
                        (logits_from <= 0 || !want_logits);
    kvq_status s;
    if (!(c->graph && c->static_on && decode) && (s = end_plan(c))) return s;
    CU(cudaMemcpyAsync(c->tok, ids, (size_t)n * 2 * 4, cudaMemcpyHostToDevice, st), "token ids");
    if (c->graph && c->static_on && decode && static_step(c, seq, n, want_logits)) {
        if (!want_logits) return KVQ_OK;
        CU(cudaMemcpyAsync(logits, c->logits, (size_t)n * V * 4, cudaMemcpyDeviceToHost, st), "logits");
        CU(cudaStreamSynchronize(st), "GPU forward");
        return KVQ_OK;
    }
    int32_t n_tok[LLAMA_GPU_MAX_SEQS];
    const int n_app = seq >= 0 ? 1 : n;  // sequences appended to
    for (int i = 0; i < n_app; i++) n_tok[i] = seq >= 0 ? n : 1;
    if ((s = launch_segment(c, 0, n, 0))) return s;  // the embedding, layer 0's attention input
    for (int l = 0; l < cf.n_layers; l++) {
        const GpuKV &g = c->kv[c->lg[(size_t)l]];
        const int gl = c->li[(size_t)l];  // the layer's index in its group's cache
        const int32_t *app_ids = seq >= 0 ? &g.seq[seq] : g.seq;
        if (seq >= 0 && n > 1 && c->decode_attn) {  // token by token, as generation runs (llama.h)
            const size_t kvd = (size_t)cf.n_kv_heads * cf.head_dim, qd = (size_t)cf.q_dim;
            const int32_t one = 1;
            for (int t = 0; t < n && !s; t++) {
                s = kvq_cuda_append(g.cache, gl, 1, app_ids, &one, KVQ_DTYPE_F32, c->k + t * kvd, c->v + t * kvd,
                                    (kvq_cuda_stream)st);
                if (s) return kvqm_fail(s, "layer %d: kvq_cuda_append: %s", l, kvq_last_error());
                s = kvq_cuda_attn_decode(g.cache, gl, 1, app_ids, KVQ_DTYPE_F16, c->q16 + t * qd, c->o16 + t * qd, &c->ap,
                                         (kvq_cuda_stream)st);
            }
            if (s) return kvqm_fail(s, "layer %d: kvq CUDA attention: %s", l, kvq_last_error());
            if ((s = launch_segment(c, l + 1, n, 0))) return s;
            continue;
        }
        if ((s = kvq_cuda_append(g.cache, gl, n_app, app_ids, n_tok, KVQ_DTYPE_F32, c->k, c->v, (kvq_cuda_stream)st)))
            return kvqm_fail(s, "layer %d: kvq_cuda_append: %s", l, kvq_last_error());
        if (seq < 0 || n == 1)  // one query per sequence: the split decode kernel
            s = kvq_cuda_attn_decode(g.cache, gl, n_app, app_ids, KVQ_DTYPE_F16, c->q16, c->o16, &c->ap, (kvq_cuda_stream)st);
        else
            s = kvq_cuda_attn_prefill(g.cache, gl, g.seq[seq], n, KVQ_DTYPE_F16, c->q16, c->o16, &c->ap, (kvq_cuda_stream)st);
        if (s) return kvqm_fail(s, "layer %d: kvq CUDA attention: %s", l, kvq_last_error());
        if ((s = launch_segment(c, l + 1, n, 0))) return s;  // layer l's output and FFN, layer l + 1's attention input
    }
    if (!logits || logits_from >= n) return KVQ_OK;
    const int first = logits_from < 0 ? 0 : logits_from, rows = n - first;
    if ((s = launch_segment(c, cf.n_layers + 1, n, first))) return s;  // final norm, logits
    CU(cudaMemcpyAsync(logits, c->logits, (size_t)rows * V * 4, cudaMemcpyDeviceToHost, st), "logits");
    CU(cudaStreamSynchronize(st), "GPU forward");
    return KVQ_OK;
}

extern "C" kvq_status llama_gpu_forward_seq(llama_gpu_ctx *c, int seq, const int32_t *tokens, int n, float *logits,
                                            int logits_from) {
    if (!c) return kvqm_fail(KVQ_ERR_NULL, "llama_gpu_forward: NULL context");
    if (seq < 0 || seq >= c->n_seqs) return kvqm_fail(KVQ_ERR_INVALID_ARG, "forward: sequence %d (0..%d)", seq, c->n_seqs - 1);
    if (!tokens || n < 1 || n > c->max_batch)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "forward: %d tokens (1..%d per call)", n, c->max_batch);
    return run(c, seq, tokens, n, logits, logits_from);
}

extern "C" kvq_status llama_gpu_forward(llama_gpu_ctx *c, const int32_t *tokens, int n, float *logits, int logits_from) {
    return llama_gpu_forward_seq(c, 0, tokens, n, logits, logits_from);
}

extern "C" kvq_status llama_gpu_decode_batch(llama_gpu_ctx *c, const int32_t *tokens, float *logits) {
    if (!c) return kvqm_fail(KVQ_ERR_NULL, "llama_gpu_decode_batch: NULL context");
    if (!tokens) return kvqm_fail(KVQ_ERR_NULL, "llama_gpu_decode_batch: tokens is NULL");
    return run(c, -1, tokens, c->n_seqs, logits, 0);
}
