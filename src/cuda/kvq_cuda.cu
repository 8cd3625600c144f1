// Host side of the CUDA backend: validation, page and window bookkeeping, launch planning (kvq_cuda.h).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <new>
#include <unordered_map>
#include <vector>

#include "common.cuh"
#include "prefill.cuh"
#include "kvq_cuda.h"

using namespace kvqc;

/* messages go to libkvq's kvq_last_error(): one place to read whatever layer failed */
#define fail kvq_set_error
#define CUDA_TRY(call, what)                                                                                   \
    do {                                                                                                       \
        cudaError_t e_ = (call);                                                                               \
        if (e_ != cudaSuccess) return fail(KVQ_ERR_CUDA, "%s: %s (%s)", what, cudaGetErrorString(e_), #call); \
    } while (0)

extern "C" const char *kvq_cuda_last_error(void) { return kvq_last_error(); }

/* Test hook (tests/test_cuda.cu, not in kvq_cuda.h): the n-th device allocation from now fails as a full GPU would
 * (cudaErrorMemoryAllocation); 0 disarms. Returns how many allocations the previous setting still had to go (0: it
 * fired or was off), so a test knows when a workload no longer reaches the n-th allocation. */
static std::atomic<int> g_fail_alloc_in{0};
extern "C" KVQ_API int kvq_cuda__fail_alloc_in(int n) { return g_fail_alloc_in.exchange(n > 0 ? n : 0); }
static bool alloc_should_fail() {
    int n = g_fail_alloc_in.load();
    while (n > 0 && !g_fail_alloc_in.compare_exchange_weak(n, n - 1)) {
    }
    return n == 1;
}
static cudaError_t dev_malloc(void **p, size_t bytes) {
    return alloc_should_fail() ? cudaErrorMemoryAllocation : cudaMalloc(p, bytes);
}
static cudaError_t dev_malloc_async(void **p, size_t bytes, cudaStream_t st) {
    return alloc_should_fail() ? cudaErrorMemoryAllocation : cudaMallocAsync(p, bytes, st);
}

struct SeqLayer {
    std::vector<int32_t> pages;
    int64_t paged = 0;            // tokens in pages: those after the sinks
    int32_t win = 0, whead = 0;
    int32_t sink = 0, spage = -1;  // tokens in sinks, their sink page (-1: none; this backend has S <= SR: one)
};

struct kvq_cuda_static;
static void static_release(kvq_cuda_static *s);

struct kvq_cuda_cache {
    kvq_cache_config cfg;
    kvq_page_layout L;
    int device = 0, n_sm = 0;
    bool portable = false;  // decode with the sm_80 kernel (kvq_cuda.h section 1: KVQ_CUDA_PORTABLE, non-Hopper GPUs)
    // the decode kernel's fused output rotation and window-first order (kvq_cuda.h section 2: KVQ_CUDA_SPLIT_ROT and
    // KVQ_CUDA_WIN_LAST switch them off, for A/B timings)
    bool fuse_rot = true, win_first = true;
    int ww = 0;  // positions per window unit in the decode split (common.cuh, Entry); 0: win_weight's, per call
    int row_tokens = 8;  // the most query tokens of one sequence an entry packs (Entry.ntok; KVQ_CUDA_ROW_TOKENS)
    int wcap = 1, Gf = 1;
    int64_t n_pages = 0, max_pages = 0;  // per (seq, layer)
    uint8_t *arena = nullptr;
    __half *windows = nullptr;  // [max_seqs][n_layers][2][wcap][H][D]
    int32_t *tables = nullptr;  // [max_seqs][n_layers][max_pages]
    std::vector<int32_t> free_list;
    std::vector<int32_t> refcnt;  // per page: (sequence, layer) pairs that reference it
    std::vector<char> live;
    std::vector<std::vector<SeqLayer>> seqs;
    int n_live = 0;
    void *ws = nullptr;
    size_t ws_bytes = 0;
    // kvq.h section 10 on the device: rotation signs per layer (rotated roles only), sinks S and sink rows per page SR,
    // and the scratch buffers of the rotated inputs (append: K and V in fp32) and queries/outputs (attention)
    std::vector<RotSigns> rot_k, rot_v;
    Levels lv{};  // Q3 roles' levels (uniform, or non-uniform where cfg.nonuniform says)
    int S = 0, SR = 0;
    void *aws = nullptr, *qws = nullptr;
    size_t aws_bytes = 0, qws_bytes = 0;
    bool rotated(int role) const { return (cfg.rotate >> role) & 1; }
    size_t win_bytes = 0, table_bytes = 0;
    kvq_cuda_static *plan = nullptr;  // the live static plan (section 5: at most one), whose sequences are lent
    std::vector<char> lent;           // per sequence slot: lent to `plan` (host bookkeeping stale until it ends)

    size_t win_elems() const { return (size_t)wcap * L.n_kv_heads * L.head_dim; }
    __half *wk(int s, int l) const { return windows + ((size_t)s * cfg.n_layers + l) * 2 * win_elems(); }
    __half *wv(int s, int l) const { return wk(s, l) + win_elems(); }
    int32_t *table(int s, int l) const { return tables + ((size_t)s * cfg.n_layers + l) * max_pages; }
};

/* rotate = -1: src/core/cache.c's default_rotate (kvq.h section 10): keys of Q8/Q4/Q3/Q2 and values of Q4/Q3/Q2,
 * but values alone for Q4 keys with Q2 values */
static int default_rotate(int tk, int tv) {
    if (tk == KVQ_TYPE_Q4 && tv == KVQ_TYPE_Q2) return KVQ_ROLES_V;
    int r = KVQ_ROLES_NONE;
    if (tk == KVQ_TYPE_Q8 || tk == KVQ_TYPE_Q4 || tk == KVQ_TYPE_Q3 || tk == KVQ_TYPE_Q2) r |= KVQ_ROLES_K;
    if (tv == KVQ_TYPE_Q4 || tv == KVQ_TYPE_Q3 || tv == KVQ_TYPE_Q2) r |= KVQ_ROLES_V;
    return r;
}

/* The sign bits of (seed, layer, role), as src/core/rotate.c's kvq__rot_init draws them (splitmix64; the tests
 * compare the pages they give with the CPU cache's, byte for byte) */
static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static void rot_signs(uint32_t seed, int layer, int role, RotSigns *r) {
    uint64_t st = ((uint64_t)(seed ? seed : 0x6b7671u) << 32) ^ ((uint64_t)(uint32_t)layer << 1) ^ (uint64_t)role;
    splitmix64(&st);
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&st);
}

/* Grows a scratch buffer to `need` bytes on the stream (stream-ordered: the old one is freed after the work that
 * used it). On failure the buffer is gone (bytes 0) and the error is returned. */
static cudaError_t grow_scratch(void **buf, size_t *bytes, size_t need, cudaStream_t st) {
    if (need <= *bytes) return cudaSuccess;
    if (*buf) cudaFreeAsync(*buf, st);
    *buf = nullptr;
    *bytes = 0;
    cudaError_t e = dev_malloc_async(buf, need, st);
    if (e != cudaSuccess) {
        *buf = nullptr;
        return e;
    }
    *bytes = need;
    return cudaSuccess;
}

#ifndef KVQ_CUDA_ARCHS  // the -gencode list this library was built with (src/cuda/CMakeLists.txt)
#define KVQ_CUDA_ARCHS "?"
#endif
// An empty kernel compiled like every other: which code of the fat binary the driver loads for a device (its
// ptxVersion: 90 for the sm_90a cubin, 80 for sm_80's or for compute_80 PTX JIT-compiled, ...), or that none fits.
// Rotated roles (kvq.h section 10): K and V into the rotated frame as fp32 rows (a role not rotated is converted
// only), before the window and the quantizers; and the attention output rows back from the values' frame.
static cudaError_t rotate_inputs(const kvq_cuda_cache *c, int layer, const void *k, const void *v, kvq_dtype dt,
                                 int64_t rows, float *rk, float *rv, cudaStream_t st) {
    RotArgs ra;
    memset(&ra, 0, sizeof ra);
    ra.j[0].in = k, ra.j[0].out = rk, ra.j[0].apply = c->rotated(KVQ_KEY);
    ra.j[1].in = v, ra.j[1].out = rv, ra.j[1].apply = c->rotated(KVQ_VALUE);
    if (ra.j[0].apply) ra.j[0].sg = c->rot_k[layer];
    if (ra.j[1].apply) ra.j[1].sg = c->rot_v[layer];
    ra.rows = rows, ra.in_dt = dt, ra.out_dt = KVQ_DTYPE_F32, ra.inverse = 0, ra.n_jobs = 2;
    return launch_rotate(ra, c->L.head_dim, st);
}
static cudaError_t unrotate_outputs(const kvq_cuda_cache *c, int layer, const float *so, void *out, kvq_dtype qo,
                                    int64_t rows, cudaStream_t st) {
    RotArgs ra;
    memset(&ra, 0, sizeof ra);
    ra.j[0].in = so, ra.j[0].out = out, ra.j[0].sg = c->rot_v[layer], ra.j[0].apply = 1;
    ra.rows = rows, ra.in_dt = KVQ_DTYPE_F32, ra.out_dt = qo, ra.inverse = 1, ra.n_jobs = 1;
    return launch_rotate(ra, c->L.head_dim, st);
}
// The decode kernel's query scale: the attention scale (default 1/sqrt(D)), times log2(e) unless there is a soft-cap
static float attn_qscale(const kvq_attn_params *p, int D) {
    const float scale = p->scale > 0 ? p->scale : 1.0f / sqrtf((float)D);
    return p->softcap > 0 ? scale : scale * 1.4426950408889634f;
}

__global__ void probe_kernel() {}

/* Whether the build's list (KVQ_CUDA_ARCHS: "sm_90a sm_80 compute_80(PTX)") has code that loads on compute capability
 * major.minor, by the driver's rules: an sm_XY cubin on X.Z with Z >= Y (sm_XYa: X.Y only), compute_XY PTX on any
 * later device. Without creating a context (kvq_cuda_device_count). */
static bool build_covers(int major, int minor) {
    const int cc = major * 10 + minor;
    if (!strcmp(KVQ_CUDA_ARCHS, "?")) return major >= 8;  // list unknown: cache creation's probe decides
    for (const char *s = KVQ_CUDA_ARCHS; (s = strstr(s, "_")) != nullptr; s++) {
        const bool ptx = s >= KVQ_CUDA_ARCHS + 7 && !strncmp(s - 7, "compute", 7);
        int v = atoi(s + 1);
        if (v < 80) continue;
        const int vmaj = v / 10, vmin = v % 10;
        const char *e = s + 1;
        while (*e >= '0' && *e <= '9') e++;
        const bool arch_specific = *e == 'a' || *e == 'f';
        if (ptx ? cc >= v : arch_specific ? (vmaj == major && vmin == minor) : (vmaj == major && minor >= vmin)) return true;
    }
    return false;
}

/* What this build runs on device d: 0 = nothing (message set, KVQ_ERR_NO_DEVICE), else the virtual arch of the
 * loaded code (80, 86, 89, 90, 100, ...). The current device is restored. probe: ask the driver (creates the
 * device's context), else judge from the arch list alone. */
static kvq_status device_code(int d, const cudaDeviceProp &p, int *arch, bool quiet, bool probe = true) {
    *arch = 0;
    if (!probe) {
        if (p.major >= 8 && build_covers(p.major, p.minor)) {
            *arch = p.major * 10 + p.minor;
            return KVQ_OK;
        }
        if (quiet) return KVQ_ERR_NO_DEVICE;
        return fail(KVQ_ERR_NO_DEVICE, "device %d (%s) has compute capability %d.%d; this build has code for %s "
                    "(kvq's CUDA kernels need 8.0 or later; -DKVQ_CUDA_FAT=ON or KVQ_CUDA_GENCODE for other GPUs)", d,
                    p.name, p.major, p.minor, KVQ_CUDA_ARCHS);
    }
    if (p.major < 8) {
        if (quiet) return KVQ_ERR_NO_DEVICE;
        return fail(KVQ_ERR_NO_DEVICE, "device %d (%s) has compute capability %d.%d; kvq's CUDA kernels need 8.0 or "
                    "later (this build has %s)", d, p.name, p.major, p.minor, KVQ_CUDA_ARCHS);
    }
    int prev = 0;
    cudaGetDevice(&prev);
    cudaError_t e = cudaSetDevice(d);
    cudaFuncAttributes fa;
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, probe_kernel);
    cudaSetDevice(prev);
    if (e != cudaSuccess) {
        cudaGetLastError(); /* not sticky: clear it */
        if (quiet) return KVQ_ERR_NO_DEVICE;
        return fail(KVQ_ERR_NO_DEVICE, "device %d (%s) has compute capability %d.%d and this build has no code for it "
                    "(%s: it has %s; rebuild with KVQ_CUDA_GENCODE naming sm_%d%d, e.g. the fat preset "
                    "-DKVQ_CUDA_FAT=ON)", d, p.name, p.major, p.minor, cudaGetErrorString(e), KVQ_CUDA_ARCHS, p.major,
                    p.minor);
    }
    const int code = fa.ptxVersion > 0 ? fa.ptxVersion : fa.binaryVersion;  // the arch the loaded code was built for
    if (code < 80) { /* a compute_7x PTX in a custom gencode: the kernels need sm_80's instructions */
        if (quiet) return KVQ_ERR_NO_DEVICE;
        return fail(KVQ_ERR_NO_DEVICE, "device %d (%s, compute capability %d.%d) would run code for compute_%d; kvq's "
                    "kernels need 8.0 or later (this build has %s)", d, p.name, p.major, p.minor, code, KVQ_CUDA_ARCHS);
    }
    *arch = code;
    return KVQ_OK;
}

// An environment switch: set to anything but "" and "0"
static bool env_on(const char *name) {
    const char *v = getenv(name);
    return v && v[0] && strcmp(v, "0") != 0;
}

/* Device checks of cache creation: *portable says which decode kernel the device gets: the Hopper one where the
 * loaded code is sm_90's (a 9.x device), else (or with KVQ_CUDA_PORTABLE=1) the portable one. */
static kvq_status check_device(int device, int *n_sm, bool *portable) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0)
        return fail(KVQ_ERR_NO_DEVICE, "no CUDA device (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    if (device < 0 || device >= n) return fail(KVQ_ERR_INVALID_ARG, "device %d outside 0..%d", device, n - 1);
    cudaDeviceProp p;
    CUDA_TRY(cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties");
    int arch = 0;
    kvq_status s = device_code(device, p, &arch, false);
    if (s) return s;
    if (portable) *portable = env_on("KVQ_CUDA_PORTABLE") || !(p.major == 9 && arch == 90);
    if (n_sm) *n_sm = p.multiProcessorCount;
    return KVQ_OK;
}

extern "C" kvq_status kvq_cuda_device_count(int *n) {
    if (!n) return fail(KVQ_ERR_NULL, "kvq_cuda_device_count: n is NULL");
    *n = 0;
    int cnt = 0;
    cudaError_t e = cudaGetDeviceCount(&cnt);
    if (e != cudaSuccess || cnt == 0)
        return fail(KVQ_ERR_NO_DEVICE, "no CUDA device (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    int ok = 0;
    for (int d = 0; d < cnt; d++) {
        cudaDeviceProp p;
        int arch = 0;
        if (cudaGetDeviceProperties(&p, d) == cudaSuccess && device_code(d, p, &arch, true, false) == KVQ_OK) ok++;
    }
    *n = ok;
    if (!ok) {
        cudaDeviceProp p;
        int arch = 0;
        char why[512] = "";
        if (cudaGetDeviceProperties(&p, 0) == cudaSuccess && device_code(0, p, &arch, false, false)) /* names device 0 */
            snprintf(why, sizeof why, "%s", kvq_last_error());
        return fail(KVQ_ERR_NO_DEVICE, "%d CUDA device(s), none that this build can run on (compute capability 8.0 or "
                    "later with code in the build: %s); device 0: %s", cnt, KVQ_CUDA_ARCHS, why);
    }
    return KVQ_OK;
}

extern "C" void kvq_cuda_cache_free(kvq_cuda_cache *c) {
    if (!c) return;
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(c->device);
    cudaDeviceSynchronize();
    static_release(c->plan);
    cudaFree(c->arena);
    cudaFree(c->windows);
    cudaFree(c->tables);
    cudaFree(c->ws);
    cudaFree(c->aws);
    cudaFree(c->qws);
    cudaSetDevice(prev);
    delete c;
}

extern "C" kvq_status kvq_cuda_cache_create(const kvq_cache_config *cfg_in, int device, int64_t max_seq_tokens,
                                            kvq_cuda_cache **out) {
    if (!out) return fail(KVQ_ERR_NULL, "kvq_cuda_cache_create: out is NULL");
    *out = nullptr;
    if (!cfg_in) return fail(KVQ_ERR_NULL, "kvq_cuda_cache_create: cfg is NULL");
    kvq_cache_config cfg = *cfg_in;
    if (cfg.group == 0) cfg.group = 64;
    if (cfg.page_tokens == 0) cfg.page_tokens = cfg.group > 64 ? cfg.group : 64;
    kvq_page_layout L;
    kvq_status s = kvq_page_layout_make(cfg.type_k, cfg.type_v, cfg.n_kv_heads, cfg.head_dim, cfg.page_tokens, cfg.group, &L);
    if (s) return fail(s, "kvq_cuda_cache_create: %s", kvq_last_error());
    if (L.head_dim != 64 && L.head_dim != 128 && L.head_dim != 256)
        return fail(KVQ_ERR_UNSUPPORTED_HEAD_DIM, "kvq_cuda_cache_create: head_dim %d (the CUDA backend has 64, 128 and 256)", L.head_dim);
    if (L.page_tokens != PT) return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: page_tokens %d (the CUDA backend needs 64)", L.page_tokens);
    bool grouped = L.group > 1;
    if (grouped && (L.group != GRP || L.value_group != GRP))
        return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: group %d (the CUDA backend needs 64)", L.group);
    if (cfg.residual == -1) cfg.residual = grouped ? 128 : 0; /* same default as the CPU core */
    /* kvq.h section 10: -1 resolves to the CPU core's defaults (cache.c), so that a CPU and a GPU cache of one config
     * hold the same bytes; the GPU has the rotation, the sinks and Q3's non-uniform levels (not Q4's or Q2's) */
    if (cfg.rotate == -1) cfg.rotate = default_rotate(cfg.type_k, cfg.type_v);
    if (cfg.sinks == -1) cfg.sinks = grouped ? 1 : 0;
    const int q3_roles = (cfg.type_k == KVQ_TYPE_Q3 ? KVQ_ROLES_K : 0) | (cfg.type_v == KVQ_TYPE_Q3 ? KVQ_ROLES_V : 0);
    if (cfg.nonuniform == -1) cfg.nonuniform = q3_roles; /* the CPU's default without pre-RoPE keys (cache.c) */
    if (cfg.rotate < 0 || cfg.rotate > KVQ_ROLES_KV)
        return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: rotate %d is not a set of roles 0..3 (or -1)", cfg.rotate);
    for (int l = 0; cfg.rotate && cfg.rotation_layers && l < cfg.n_layers; l++)
        if (cfg.rotation_layers[l] < 0)
            return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: rotation_layers[%d] = %d is negative", l,
                        (int)cfg.rotation_layers[l]);
    /* sink rows per page: page_bytes / (4 H D) (kvq.h section 5), >= 10 for every layout this backend has */
    const int SR = (int)(L.page_bytes / ((size_t)4 * L.n_kv_heads * L.head_dim));
    if (cfg.sinks < 0 || cfg.sinks > SR)
        return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: sinks %d outside 0..%d (the CUDA backend keeps the sinks "
                    "in one sink page of %d rows; -1: the default)", cfg.sinks, SR, SR);
    if (cfg.nonuniform < 0 || cfg.nonuniform > KVQ_ROLES_KV)
        return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: nonuniform %d is not a set of roles 0..3 (or -1)", cfg.nonuniform);
    /* roles of other types ignore the flag, as on the CPU; Q4's and Q2's non-uniform levels would need kernels of their own */
    const int nuq_roles = ((cfg.type_k == KVQ_TYPE_Q4 || cfg.type_k == KVQ_TYPE_Q2) ? KVQ_ROLES_K : 0) |
                          ((cfg.type_v == KVQ_TYPE_Q4 || cfg.type_v == KVQ_TYPE_Q2) ? KVQ_ROLES_V : 0);
    if (cfg.nonuniform & nuq_roles)
        return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: nonuniform %d: the CUDA backend has non-uniform levels for "
                    "q3 only, not for q4 or q2 roles (set 0, or -1 for the default)", cfg.nonuniform);
    if (cfg.outliers == -1) cfg.outliers = KVQ_ROLES_NONE; /* the CPU library's default too */
    if (cfg.outliers != KVQ_ROLES_NONE)
        return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: outliers %d: the CUDA backend has no dense-and-sparse "
                    "outliers (set 0 or -1)", cfg.outliers);
    if (cfg.params8 == -1) cfg.params8 = KVQ_ROLES_NONE; /* the CPU library's default too */
    if (cfg.params8 != KVQ_ROLES_NONE)
        return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: params8 %d: the CUDA backend reads fp16 group parameters "
                    "only (set 0 or -1)", cfg.params8);
    if (cfg.window8 == -1) cfg.window8 = KVQ_ROLES_NONE;
    if (cfg.window8 != KVQ_ROLES_NONE)
        return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: window8 %d: the CUDA backend keeps fp16 windows only "
                    "(set 0 or -1)", cfg.window8);
    if (cfg.qnorm == -1) cfg.qnorm = KVQ_ROLES_NONE; /* the CPU library's default too (kvq.h section 10) */
    if (cfg.qnorm < 0 || cfg.qnorm > KVQ_ROLES_KV)
        return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: qnorm %d is not a set of roles 0..3 (or -1)", cfg.qnorm);
    if (cfg.prerope != 0)
        return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: prerope %d: the CUDA backend's kernels do not apply "
                    "RoPE to the keys (kvq.h section 10); append keys after RoPE with prerope = 0", cfg.prerope);
    if (cfg.squat_rank != 0)
        return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: squat_rank %d: the CUDA backend's append kernels do not "
                    "quantize with a query subspace (SQuat keys, kvq.h section 10); set 0", cfg.squat_rank);
    if (cfg.residual < 0 || cfg.residual > 4096) return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: residual %d outside 0..4096", cfg.residual);
    if (cfg.max_seqs == 0) cfg.max_seqs = 256;
    if (cfg.max_seqs < 1 || cfg.max_seqs > 65536) return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: max_seqs %d outside 1..65536", cfg.max_seqs);
    if (cfg.n_layers < 1 || cfg.n_layers > 4096) return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: n_layers %d outside 1..4096", cfg.n_layers);
    int64_t pages = (int64_t)(cfg.arena_bytes / L.page_bytes);
    if (pages < cfg.n_layers || pages > INT32_MAX)
        return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: arena_bytes %zu gives %lld pages", cfg.arena_bytes, (long long)pages);
    if (max_seq_tokens < 0) return fail(KVQ_ERR_INVALID_ARG, "kvq_cuda_cache_create: max_seq_tokens < 0");
    int n_sm = 0;
    bool portable = false;
    if ((s = check_device(device, &n_sm, &portable))) return s;

    kvq_cuda_cache *c = new (std::nothrow) kvq_cuda_cache();
    if (!c) return fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_cuda_cache_create: no host memory");
    c->cfg = cfg;
    c->cfg.rotation_layers = nullptr;  // read at create only (the signs below): never kept as a borrowed pointer
    {
        static const uint8_t u3[8] = {0, 16, 32, 48, 64, 80, 96, 112}, n3[8] = {6, 24, 38, 50, 62, 74, 88, 106};  // quant.c
        auto pack = [](const uint8_t *t, uint32_t (&w)[2]) {
            for (int i = 0; i < 2; i++) w[i] = t[4 * i] | t[4 * i + 1] << 8 | t[4 * i + 2] << 16 | (uint32_t)t[4 * i + 3] << 24;
        };
        pack(cfg.nonuniform & KVQ_ROLES_K ? n3 : u3, c->lv.k);
        pack(cfg.nonuniform & KVQ_ROLES_V ? n3 : u3, c->lv.v);
    }
    c->L = L;
    c->device = device;
    c->n_sm = n_sm;
    c->portable = portable;
    c->fuse_rot = !env_on("KVQ_CUDA_SPLIT_ROT");
    c->win_first = !env_on("KVQ_CUDA_WIN_LAST");
    if (const char *w = getenv("KVQ_CUDA_WIN_WEIGHT")) {  // A/B timings (kvq_cuda.h section 2); 1: the unweighted split
        const int x = atoi(w);
        if (x >= 1 && x <= 64) c->ww = x;
    }
    if (const char *w = getenv("KVQ_CUDA_ROW_TOKENS")) {  // A/B timings (kvq_cuda.h section 2); 1: a read per token
        const int x = atoi(w);
        if (x >= 1 && x <= 8) c->row_tokens = x;
    }
    c->Gf = L.group;
    c->wcap = cfg.residual + c->Gf;
    c->S = cfg.sinks;
    c->SR = SR;
    c->n_pages = pages;
    int64_t per_layer = pages / cfg.n_layers;
    c->max_pages = max_seq_tokens ? (max_seq_tokens + PT - 1) / PT : per_layer;
    if (c->max_pages < 1) c->max_pages = 1;
    try {
        c->free_list.resize(pages);
        for (int64_t i = 0; i < pages; i++) c->free_list[i] = (int32_t)(pages - 1 - i);  // pop ascending ids
        c->refcnt.assign(pages, 0);
        c->live.assign(cfg.max_seqs, 0);
        c->lent.assign(cfg.max_seqs, 0);
        c->seqs.resize(cfg.max_seqs);
        if (cfg.rotate) {
            c->rot_k.resize(cfg.n_layers);
            c->rot_v.resize(cfg.n_layers);
            for (int l = 0; l < cfg.n_layers; l++) {  // the model's layer numbers where the caller gives them
                const int ln = cfg.rotation_layers ? cfg.rotation_layers[l] : l;
                rot_signs(cfg.rotation_seed, ln, KVQ_KEY, &c->rot_k[l]);
                rot_signs(cfg.rotation_seed, ln, KVQ_VALUE, &c->rot_v[l]);
            }
        }
    } catch (...) {
        delete c;
        return fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_cuda_cache_create: no host memory for the bookkeeping");
    }
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device);
    c->win_bytes = (size_t)cfg.max_seqs * cfg.n_layers * 2 * c->win_elems() * sizeof(__half);
    c->table_bytes = (size_t)cfg.max_seqs * cfg.n_layers * c->max_pages * sizeof(int32_t);
    cudaError_t e = dev_malloc((void **)&c->arena, (size_t)pages * L.page_bytes);
    if (e == cudaSuccess) e = dev_malloc((void **)&c->windows, c->win_bytes);
    if (e == cudaSuccess) e = dev_malloc((void **)&c->tables, c->table_bytes);
    // zeroed so that never-written rows read as finite numbers (masked tokens multiply them by 0)
    if (e == cudaSuccess) e = cudaMemset(c->arena, 0, (size_t)pages * L.page_bytes);
    if (e == cudaSuccess) e = cudaMemset(c->windows, 0, c->win_bytes);
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    cudaSetDevice(prev);
    if (e != cudaSuccess) {
        kvq_cuda_cache_free(c);
        return fail(e == cudaErrorMemoryAllocation ? KVQ_ERR_OUT_OF_MEMORY : KVQ_ERR_CUDA,
                    "kvq_cuda_cache_create: %s (arena %zu B, windows %zu B, tables %zu B)", cudaGetErrorString(e),
                    (size_t)pages * L.page_bytes, c->win_bytes, c->table_bytes);
    }
    *out = c;
    return KVQ_OK;
}

extern "C" kvq_status kvq_cuda_cache_get_config(const kvq_cuda_cache *c, kvq_cache_config *cfg, kvq_page_layout *L) {
    if (!c) return fail(KVQ_ERR_NULL, "kvq_cuda_cache_get_config: cache is NULL");
    if (cfg) *cfg = c->cfg;
    if (L) *L = c->L;
    return KVQ_OK;
}

extern "C" kvq_status kvq_cuda_cache_get_stats(const kvq_cuda_cache *c, kvq_cuda_stats *st) {
    if (!c || !st) return fail(KVQ_ERR_NULL, "kvq_cuda_cache_get_stats: NULL argument");
    st->pages_total = c->n_pages;
    st->pages_free = (int64_t)c->free_list.size();
    st->page_bytes = c->L.page_bytes;
    st->arena_bytes = (size_t)c->n_pages * c->L.page_bytes;
    st->window_bytes = c->win_bytes;
    st->table_bytes = c->table_bytes;
    st->workspace_bytes = c->ws_bytes + c->aws_bytes + c->qws_bytes;  // with the rotation's scratch
    st->n_seqs = c->n_live;
    st->pages_shared = 0;
    for (int32_t r : c->refcnt) st->pages_shared += r > 1;
    return KVQ_OK;
}

static kvq_status check_seq(const kvq_cuda_cache *c, int32_t seq, const char *fn) {
    if (seq < 0 || seq >= c->cfg.max_seqs || !c->live[seq]) return fail(KVQ_ERR_NO_SEQ, "%s: sequence %d is not live", fn, (int)seq);
    if (c->lent[seq])
        return fail(KVQ_ERR_INVALID_ARG, "%s: sequence %d is lent to a static plan (kvq_cuda_static_end gives it back)", fn, (int)seq);
    return KVQ_OK;
}
static kvq_status check_layer(const kvq_cuda_cache *c, int layer, const char *fn) {
    if (layer < 0 || layer >= c->cfg.n_layers) return fail(KVQ_ERR_SHAPE, "%s: layer %d outside 0..%d", fn, layer, c->cfg.n_layers - 1);
    return KVQ_OK;
}

// The smallest free sequence slot, or -1 (the error is recorded).
static int free_slot(const kvq_cuda_cache *c, const char *fn) {
    for (int i = 0; i < c->cfg.max_seqs; i++)
        if (!c->live[i]) return i;
    fail(KVQ_ERR_TOO_MANY_SEQS, "%s: %d sequences live (max_seqs)", fn, c->cfg.max_seqs);
    return -1;
}

// Tokens that an append bringing the window to T tokens flushes into pages: whole flush units, once the window
// holds wcap = R + Gf tokens.
static int64_t flushed_tokens(const kvq_cuda_cache *c, int64_t T) { return flush_count(T, c->wcap, c->Gf); }
// Of n tokens appended to (seq, layer), those that go to its sinks (the first ones; kvq.h section 10)
static int sink_take(const kvq_cuda_cache *c, const SeqLayer &sl, int64_t n) {
    return (int)std::min<int64_t>(n, c->S - sl.sink);
}

extern "C" kvq_status kvq_cuda_seq_new(kvq_cuda_cache *c, int32_t *seq_out) {
    if (!c || !seq_out) return fail(KVQ_ERR_NULL, "kvq_cuda_seq_new: NULL argument");
    const int i = free_slot(c, "kvq_cuda_seq_new");
    if (i < 0) return KVQ_ERR_TOO_MANY_SEQS;
    try {
        c->seqs[i].assign(c->cfg.n_layers, SeqLayer());
    } catch (...) {
        return fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_cuda_seq_new: no host memory");
    }
    c->live[i] = 1;
    c->n_live++;
    *seq_out = i;
    return KVQ_OK;
}

// Drops one reference; a page nobody references goes back to the free list (its capacity is n_pages: no throw).
static void page_unref(kvq_cuda_cache *c, int32_t p) {
    if (--c->refcnt[p] == 0) c->free_list.push_back(p);
}

extern "C" kvq_status kvq_cuda_seq_free(kvq_cuda_cache *c, int32_t seq) {
    if (!c) return fail(KVQ_ERR_NULL, "kvq_cuda_seq_free: cache is NULL");
    kvq_status s = check_seq(c, seq, "kvq_cuda_seq_free");
    if (s) return s;
    for (auto &sl : c->seqs[seq]) {
        for (int32_t p : sl.pages) page_unref(c, p);
        if (sl.spage >= 0) page_unref(c, sl.spage);
    }
    c->seqs[seq].clear();
    c->live[seq] = 0;
    c->n_live--;
    return KVQ_OK;
}

extern "C" kvq_status kvq_cuda_seq_length(const kvq_cuda_cache *c, int32_t seq, int layer, int64_t *len) {
    if (!c || !len) return fail(KVQ_ERR_NULL, "kvq_cuda_seq_length: NULL argument");
    kvq_status s;
    if ((s = check_seq(c, seq, "kvq_cuda_seq_length")) || (s = check_layer(c, layer, "kvq_cuda_seq_length"))) return s;
    const SeqLayer &sl = c->seqs[seq][layer];
    *len = sl.sink + sl.paged + sl.win;
    return KVQ_OK;
}

// ------------------------------------------------------------------------------------------------ append
namespace {
struct DevGuard {
    int prev = 0;
    explicit DevGuard(int d) { cudaGetDevice(&prev), cudaSetDevice(d); }
    ~DevGuard() { cudaSetDevice(prev); }
};
}  // namespace

extern "C" kvq_status kvq_cuda_append(kvq_cuda_cache *c, int layer, int n_seqs, const int32_t *seq_ids,
                                      const int32_t *n_tokens, kvq_dtype dtype, const void *k, const void *v,
                                      kvq_cuda_stream stream) {
    const char *fn = "kvq_cuda_append";
    if (!c) return fail(KVQ_ERR_NULL, "%s: cache is NULL", fn);
    kvq_status s;
    if ((s = check_layer(c, layer, fn))) return s;
    if (n_seqs < 0 || n_seqs > c->cfg.max_seqs) return fail(KVQ_ERR_INVALID_ARG, "%s: n_seqs %d outside 0..%d", fn, n_seqs, c->cfg.max_seqs);
    if (n_seqs == 0) return KVQ_OK;
    if (!seq_ids || !n_tokens) return fail(KVQ_ERR_NULL, "%s: seq_ids or n_tokens is NULL", fn);
    if (dtype != KVQ_DTYPE_F32 && dtype != KVQ_DTYPE_F16 && dtype != KVQ_DTYPE_BF16) return fail(KVQ_ERR_INVALID_ARG, "%s: dtype %d", fn, (int)dtype);
    int64_t total = 0, need = 0;
    std::vector<char> seen(c->cfg.max_seqs, 0);
    for (int i = 0; i < n_seqs; i++) {
        if ((s = check_seq(c, seq_ids[i], fn))) return s;
        if (seen[seq_ids[i]]) return fail(KVQ_ERR_INVALID_ARG, "%s: sequence %d appears twice", fn, (int)seq_ids[i]);
        seen[seq_ids[i]] = 1;
        if (n_tokens[i] < 0) return fail(KVQ_ERR_INVALID_ARG, "%s: n_tokens[%d] = %d is negative", fn, i, (int)n_tokens[i]);
        const SeqLayer &sl = c->seqs[seq_ids[i]][layer];
        // the first tokens go to the sinks (a sink page, or a copy of a shared, partly filled one), the rest as before
        const int ns = sink_take(c, sl, n_tokens[i]);
        if (ns > 0 && (sl.spage < 0 || c->refcnt[sl.spage] > 1)) need++;
        const int64_t FG = flushed_tokens(c, sl.win + (int64_t)(n_tokens[i] - ns));
        int64_t end = sl.paged + FG, np = (end + PT - 1) / PT;
        if (np > c->max_pages)
            return fail(KVQ_ERR_CACHE_FULL, "%s: sequence %d would hold %lld tokens in pages, the page table holds %lld", fn,
                        (int)seq_ids[i], (long long)end, (long long)(c->max_pages * PT));
        need += np - (int64_t)sl.pages.size();
        // copy on write of a shared, partly filled last page: counted as kvq_append counts it (per sequence)
        if (FG > 0 && sl.paged % PT != 0 && c->refcnt[sl.pages.back()] > 1) need++;
        total += n_tokens[i];
    }
    if (total == 0) return KVQ_OK;
    if (!k || !v) return fail(KVQ_ERR_NULL, "%s: k or v is NULL", fn);
    if (need > (int64_t)c->free_list.size())
        return fail(KVQ_ERR_CACHE_FULL, "%s: layer %d needs %lld free pages, %lld are free", fn, layer, (long long)need,
                    (long long)c->free_list.size());
    DevGuard dg(c->device);
    cudaStream_t st = (cudaStream_t)stream;
    const int tk = c->L.type_k, tv = c->L.type_v, D = c->L.head_dim, H = c->L.n_kv_heads;
    // Rotated roles (kvq.h section 10): K and V rotated into fp32 scratch first, as kvq_append rotates each row before
    // it rounds it to fp16 (window) or quantizes it (R = 0); the kernels below then read the scratch as F32 input.
    // Before anything changes: a failure here leaves the cache as it was.
    if (c->cfg.rotate) {
        const int64_t rows = total * H;
        const size_t half = (size_t)rows * D * sizeof(float);
        cudaError_t e = grow_scratch(&c->aws, &c->aws_bytes, 2 * half, st);
        if (e != cudaSuccess)
            return fail(e == cudaErrorMemoryAllocation ? KVQ_ERR_OUT_OF_MEMORY : KVQ_ERR_CUDA,
                        "%s: scratch of %zu bytes for the rotation: %s", fn, 2 * half, cudaGetErrorString(e));
        float *rk = (float *)c->aws, *rv = (float *)((char *)c->aws + half);
        e = rotate_inputs(c, layer, k, v, dtype, rows, rk, rv, st);
        if (e != cudaSuccess) return fail(KVQ_ERR_CUDA, "%s: rotation kernel: %s", fn, cudaGetErrorString(e));
        k = rk, v = rv, dtype = KVQ_DTYPE_F32;
    }
    // per-sequence plan (host state is updated only after every launch is enqueued); the host page lists get their
    // room now, so that committing after the launches cannot fail. in_off: the first input row after the sinks.
    struct Plan { int32_t seq, W0, whead0, T, FG; int64_t in_off; int32_t ns; };
    std::vector<Plan> plan;
    std::vector<int32_t> cow;  // per sequence: the private copy of its shared, partly filled last page, or -1
    std::vector<std::vector<int32_t>> newpages;
    std::unordered_map<int32_t, int32_t> cow_refs;  // references to a shared page given up earlier in this call
    try {
        plan.resize(n_seqs);
        cow.assign(n_seqs, -1);
        newpages.resize(n_seqs);
        int64_t off = 0;
        for (int i = 0; i < n_seqs; i++) {
            SeqLayer &sl = c->seqs[seq_ids[i]][layer];
            const int ns = sink_take(c, sl, n_tokens[i]);
            const int T = sl.win + n_tokens[i] - ns;
            plan[i] = Plan{seq_ids[i], sl.win, sl.whead, T, (int32_t)flushed_tokens(c, T), off + ns, ns};
            off += n_tokens[i];
            sl.pages.reserve((size_t)((sl.paged + plan[i].FG + PT - 1) / PT));
        }
    } catch (...) {
        return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory", fn);
    }
    // Copy on write (as kvq_append's store_unit): a flush into a partly filled last page that another (sequence,
    // layer) still references goes to a fresh copy of that page; the flush kernel points the page table at it.
    // Sequences of this call that share one page: the last of them to write keeps the original.
    size_t fl_pos = c->free_list.size();
    // Sinks first, as kvq_append stores a sequence's tokens in order: a fresh sink page, or a private copy of a shared,
    // partly filled one (the last sequence of this call to write into a shared one keeps it, as for pages below)
    std::vector<int32_t> spage_new;  // per sequence: the sink page it writes (a new one, a copy, or its own), or -1
    std::vector<char> spage_fresh;
    std::unordered_map<int32_t, int32_t> scow_refs;
    SinkArgs *SA = nullptr;
    if (c->S > 0) {
        try {
            spage_new.assign(n_seqs, -1);
            spage_fresh.assign(n_seqs, 0);
            for (int i = 0; i < n_seqs; i++) {
                const SeqLayer &sl = c->seqs[plan[i].seq][layer];
                if (plan[i].ns == 0) continue;
                if (sl.spage < 0) {
                    spage_new[i] = c->free_list[--fl_pos], spage_fresh[i] = 1;
                    continue;
                }
                int32_t gone = 0;
                auto it = scow_refs.find(sl.spage);
                if (it != scow_refs.end()) gone = it->second;
                if (c->refcnt[sl.spage] - gone <= 1) {
                    spage_new[i] = sl.spage;
                    continue;
                }
                spage_new[i] = c->free_list[--fl_pos], spage_fresh[i] = 1;
                scow_refs[sl.spage] = gone + 1;
                cudaError_t e = cudaMemcpyAsync(c->arena + (size_t)spage_new[i] * c->L.page_bytes,
                                                c->arena + (size_t)sl.spage * c->L.page_bytes, c->L.page_bytes,
                                                cudaMemcpyDeviceToDevice, st);
                if (e != cudaSuccess)
                    return fail(KVQ_ERR_CUDA, "%s: copy on write of sink page %d: %s", fn, (int)sl.spage, cudaGetErrorString(e));
            }
        } catch (...) {
            return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory", fn);
        }
        SA = new (std::nothrow) SinkArgs;
        if (!SA) return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory", fn);
        memset(SA, 0, sizeof *SA);
        const size_t HD = (size_t)H * D;
        cudaError_t e = cudaSuccess;
        for (int i = 0; i < n_seqs && e == cudaSuccess; i++) {
            if (plan[i].ns == 0) continue;
            if (SA->n_items == MAXS) e = launch_sinks(*SA, st), SA->n_items = 0;
            const SeqLayer &sl = c->seqs[plan[i].seq][layer];
            __half *pg = (__half *)(c->arena + (size_t)spage_new[i] * c->L.page_bytes);
            SA->it[SA->n_items++] = SinkItem{plan[i].in_off - plan[i].ns, pg + (size_t)sl.sink * HD, plan[i].ns, 0};
        }
        SA->k = k, SA->v = v, SA->dtype = dtype, SA->HD = (int32_t)HD, SA->vo = (int64_t)c->SR * HD;
        if (e == cudaSuccess) e = launch_sinks(*SA, st);
        delete SA;
        if (e != cudaSuccess) return fail(KVQ_ERR_CUDA, "%s: sink kernel launch: %s", fn, cudaGetErrorString(e));
    }
    for (int i = 0; i < n_seqs; i++) {
        const SeqLayer &sl = c->seqs[plan[i].seq][layer];
        if (plan[i].FG == 0 || sl.paged % PT == 0) continue;
        const int32_t last = sl.pages.back();
        int32_t gone = 0;
        auto it = cow_refs.find(last);
        if (it != cow_refs.end()) gone = it->second;
        if (c->refcnt[last] - gone <= 1) continue;
        cow[i] = c->free_list[--fl_pos];
        try {
            cow_refs[last] = gone + 1;
        } catch (...) {
            return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory", fn);
        }
        cudaError_t e = cudaMemcpyAsync(c->arena + (size_t)cow[i] * c->L.page_bytes, c->arena + (size_t)last * c->L.page_bytes,
                                        c->L.page_bytes, cudaMemcpyDeviceToDevice, st);
        if (e != cudaSuccess) return fail(KVQ_ERR_CUDA, "%s: copy on write of page %d: %s", fn, (int)last, cudaGetErrorString(e));
    }
    AppendArgs *A = new (std::nothrow) AppendArgs;
    if (!A) return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory", fn);
    auto reset = [&]() {
        memset(A, 0, sizeof *A);
        A->arena = c->arena;
        A->page_bytes = (int64_t)c->L.page_bytes;
        A->v_off = (int32_t)c->L.v_offset;
        A->H = c->L.n_kv_heads;
        A->wcap = c->wcap;
        A->direct = c->wcap == 1;
        A->dtype = dtype;
        A->qnorm = c->cfg.qnorm;
        A->lv = c->lv;
        const uintptr_t va = dtype == KVQ_DTYPE_F32 ? 16 : 8;
        A->vec = (uintptr_t)k % va == 0 && (uintptr_t)v % va == 0;
        A->k = k, A->v = v;
    };
    auto entry_of = [&](int i) {
        AppendEntry e;
        const Plan &p = plan[i];
        e.pt = c->table(p.seq, layer);
        e.wk = c->wk(p.seq, layer), e.wv = c->wv(p.seq, layer);
        e.W0 = p.W0, e.whead0 = p.whead0, e.T = p.T, e.FG = p.FG;
        e.in_off = p.in_off;
        e.wstart = 0;
        return e;
    };
    // flush launches: items of <= 64 tokens, split at page boundaries
    cudaError_t err = cudaSuccess;
    reset();
    int cur_seq = -1;
    auto flush_launch = [&]() {
        if (A->n_items > 0 && err == cudaSuccess) err = launch_append(tk, tv, D, *A, st);
        reset();
        cur_seq = -1;
    };
    for (int i = 0; i < n_seqs && err == cudaSuccess; i++) {
        const Plan &p = plan[i];
        const SeqLayer &sl = c->seqs[p.seq][layer];
        int32_t cur = cow[i] >= 0 ? cow[i] : sl.pages.empty() ? -1 : sl.pages.back();  // page being filled
        for (int v0 = 0; v0 < p.FG;) {
            int64_t pos = sl.paged + v0;
            int slot = (int)(pos % PT);
            int cnt = (int)std::min<int64_t>(PT - slot, p.FG - v0);
            int32_t page, pt_idx = -1;
            if (slot == 0) {
                page = c->free_list[--fl_pos];
                newpages[i].push_back(page);
                pt_idx = (int32_t)(pos / PT);
                cur = page;
            } else {
                page = cur;
                if (v0 == 0 && cow[i] >= 0) pt_idx = (int32_t)(pos / PT);  // the copy replaces the shared page
            }
            if (A->n_items == MAXF || (cur_seq != i && A->n_entries == MAXA)) flush_launch();
            if (cur_seq != i) {
                A->a[A->n_entries++] = entry_of(i);
                cur_seq = i;
            }
            A->f[A->n_items++] = FlushItem{A->n_entries - 1, v0, cnt, slot, page, pt_idx};
            v0 += cnt;
        }
    }
    flush_launch();
    // window launches
    for (int i = 0; i < n_seqs && err == cudaSuccess; i++) {
        const Plan &p = plan[i];
        int nw = p.T - std::max(p.FG, p.W0);
        if (nw <= 0) continue;
        if (A->n_entries == MAXA) {
            err = launch_append(tk, tv, D, *A, st);
            reset();
        }
        AppendEntry e = entry_of(i);
        e.wstart = A->n_wtok;
        A->a[A->n_entries++] = e;
        A->n_wtok += nw;
    }
    if (err == cudaSuccess && A->n_wtok > 0) err = launch_append(tk, tv, D, *A, st);
    delete A;
    if (err != cudaSuccess) return fail(KVQ_ERR_CUDA, "%s: kernel launch: %s", fn, cudaGetErrorString(err));
    // commit host state (the page lists have their capacity: nothing throws)
    c->free_list.resize(fl_pos);
    for (int i = 0; i < n_seqs; i++) {
        const Plan &p = plan[i];
        SeqLayer &sl = c->seqs[p.seq][layer];
        if (p.ns > 0) {
            if (spage_fresh[i]) {
                if (sl.spage >= 0) c->refcnt[sl.spage]--;  // a copy: others still reference the original
                sl.spage = spage_new[i];
                c->refcnt[sl.spage] = 1;
            }
            sl.sink += p.ns;
        }
        if (cow[i] >= 0) {
            c->refcnt[sl.pages.back()]--;  // others still reference it (checked above): never reaches 0 here
            sl.pages.back() = cow[i];
            c->refcnt[cow[i]] = 1;
        }
        for (int32_t pg : newpages[i]) {
            sl.pages.push_back(pg);
            c->refcnt[pg] = 1;
        }
        sl.paged += p.FG;
        sl.win = p.T - p.FG;
        sl.whead = (p.whead0 + p.FG) % c->wcap;
    }
    return KVQ_OK;
}

// ------------------------------------------------------------------------------------------------ fork, truncate
extern "C" kvq_status kvq_cuda_seq_fork(kvq_cuda_cache *c, int32_t src, int32_t *seq_out, kvq_cuda_stream stream) {
    const char *fn = "kvq_cuda_seq_fork";
    if (!c || !seq_out) return fail(KVQ_ERR_NULL, "%s: cache or seq_out is NULL", fn);
    kvq_status s = check_seq(c, src, fn);
    if (s) return s;
    const int id = free_slot(c, fn);
    if (id < 0) return KVQ_ERR_TOO_MANY_SEQS;
    std::vector<SeqLayer> child;
    try {
        child = c->seqs[src];
    } catch (...) {
        return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory", fn);
    }
    DevGuard dg(c->device);
    cudaStream_t st = (cudaStream_t)stream;
    const int nl = c->cfg.n_layers;
    // Page tables: one row of max_pages entries per layer, the rows of a sequence back to back.
    size_t maxnp = 0;
    for (const SeqLayer &sl : child) maxnp = std::max(maxnp, sl.pages.size());
    const size_t tpitch = (size_t)c->max_pages * sizeof(int32_t);
    if (maxnp)
        CUDA_TRY(cudaMemcpy2DAsync(c->table(id, 0), tpitch, c->table(src, 0), tpitch, maxnp * sizeof(int32_t), nl,
                                   cudaMemcpyDeviceToDevice, st), fn);
    // Windows: the occupied ring rows, at the same ring positions (the child keeps whead). The K and V rings of all
    // layers of a sequence are spaced win_elems apart, so a run of layers with the same (whead, win) is one 2D copy
    // per contiguous piece of the ring (two when the window wraps).
    const size_t row = (size_t)c->L.n_kv_heads * c->L.head_dim, wpitch = c->win_elems() * sizeof(__half);
    for (int l0 = 0; l0 < nl;) {
        int l1 = l0 + 1;
        while (l1 < nl && child[l1].whead == child[l0].whead && child[l1].win == child[l0].win) l1++;
        const int head = child[l0].whead, win = child[l0].win;
        const int n1 = std::min(win, c->wcap - head), n2 = win - n1;
        const size_t rows2 = 2 * (size_t)(l1 - l0);  // K and V rings of layers l0 .. l1-1
        if (n1 > 0)
            CUDA_TRY(cudaMemcpy2DAsync(c->wk(id, l0) + head * row, wpitch, c->wk(src, l0) + head * row, wpitch,
                                       n1 * row * sizeof(__half), rows2, cudaMemcpyDeviceToDevice, st), fn);
        if (n2 > 0)
            CUDA_TRY(cudaMemcpy2DAsync(c->wk(id, l0), wpitch, c->wk(src, l0), wpitch, n2 * row * sizeof(__half), rows2,
                                       cudaMemcpyDeviceToDevice, st), fn);
        l0 = l1;
    }
    // commit: references are taken only once nothing can fail any more
    c->seqs[id].swap(child);
    for (const SeqLayer &sl : c->seqs[id]) {
        for (int32_t p : sl.pages) c->refcnt[p]++;
        if (sl.spage >= 0) c->refcnt[sl.spage]++;  // the sink page is shared too, copied on write
    }
    c->live[id] = 1;
    c->n_live++;
    *seq_out = id;
    return KVQ_OK;
}

namespace {
// A cut inside the pages of a grouped cache: the surviving tokens of the cut group go back to the window.
struct UnflushArgs {
    const uint8_t *arena;
    int64_t page_bytes;
    const int32_t *table;  // page table of (seq, layer 0); layer l's at table + l * table_stride
    int64_t table_stride;
    __half *win;           // K ring of (seq, layer 0); V ring at + win_elems; layer l's at + 2 l win_elems
    int64_t win_elems;
    int32_t v_off, H;
    int32_t page_idx;      // page-table index of the cut group's page (the group is the whole page: G = P = 64)
    int32_t cnt;           // tokens that survive: slots 0 .. cnt-1, to window rows 0 .. cnt-1
    uint32_t mask[128];    // layers to do (bit l); n_layers <= 4096
    Levels lv;             // Q3 roles' levels
};
static_assert(sizeof(UnflushArgs) <= 4096, "unflush parameters");

// Channel ch of token t of a K (ISV = false) or V block of type T, as kvq__dequant_row computes it: fp32 scale * q,
// then + min, no fused multiply-add.
template <int T, int D, bool ISV> __device__ __forceinline__ float dequant(const uint8_t *blk, int t, int ch, const Levels &lv) {
    using TR = Traits<T, D>;
    const uint8_t *row = blk + t * TR::row;
    const __half *par = reinterpret_cast<const __half *>(blk + PT * TR::row);
    if constexpr (T == KVQ_TYPE_F16) return __half2float(reinterpret_cast<const __half *>(row)[ch]);
    else if constexpr (T == KVQ_TYPE_BF16) return __bfloat162float(reinterpret_cast<const __nv_bfloat16 *>(row)[ch]);
    else if constexpr (T == KVQ_TYPE_Q8) return __fmul_rn(__half2float(par[t]), (float)(int8_t)row[ch]);
    else if constexpr (T == KVQ_TYPE_FP8) {
        const __half v = __half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)row[ch], __NV_E4M3));
        return __fmul_rn(__half2float(par[t]), __half2float(v));
    } else {
        constexpr int B = TR::bits;
        float lvl;  // the code's level, scale units: lv16[q] / 16 (uniform Q4/Q2: q itself)
        if constexpr (B == 3) {  // low 2 bits as a Q2 row, the high bit at byte D/4 + ch/8 (kvq.h section 5)
            const int q = ((row[ch / 4] >> ((ch % 4) * 2)) & 3) | (((row[D / 4 + ch / 8] >> (ch % 8)) & 1) << 2);
            lvl = __fmul_rn((float)level_of(ISV ? lv.v : lv.k, q), 0.0625f);
        } else {
            constexpr int PER = 8 / B, QM = (1 << B) - 1;
            lvl = (float)((row[ch / PER] >> ((ch % PER) * B)) & QM);
        }
        if constexpr (!ISV)  // group 0: scale[D], min[D]
            return __fadd_rn(__fmul_rn(__half2float(par[ch]), lvl), __half2float(par[D + ch]));
        const int vp = (t * TR::ng + ch / GRP) * 2;  // per token, per group: (scale, min)
        return __fadd_rn(__fmul_rn(__half2float(par[vp]), lvl), __half2float(par[vp + 1]));
    }
}

// Rounded to fp16 like kvq_seq_truncate's paged_to_window: byte-identical windows.
template <int TK, int TV, int D> __global__ void __launch_bounds__(128) unflush_kernel(const __grid_constant__ UnflushArgs A) {
    const int l = blockIdx.x, h = blockIdx.y;
    if (!((A.mask[l >> 5] >> (l & 31)) & 1u)) return;
    const int32_t page = A.table[(int64_t)l * A.table_stride + A.page_idx];
    const uint8_t *pg = A.arena + (int64_t)page * A.page_bytes;
    const uint8_t *kb = pg + h * Traits<TK, D>::kblk, *vb = pg + A.v_off + h * Traits<TV, D>::vblk;
    __half *wk = A.win + (int64_t)l * 2 * A.win_elems, *wv = wk + A.win_elems;
    for (int e = threadIdx.x; e < A.cnt * D; e += blockDim.x) {
        const int t = e / D, ch = e % D;
        const int64_t o = ((int64_t)t * A.H + h) * D + ch;
        wk[o] = __float2half_rn(dequant<TK, D, false>(kb, t, ch, A.lv));
        wv[o] = __float2half_rn(dequant<TV, D, true>(vb, t, ch, A.lv));
    }
}

template <int D> cudaError_t launch_unflush_d(int tk, int tv, int n_layers, const UnflushArgs &a, cudaStream_t st) {
    return with_type(tk, [&](auto K) {
        return with_type(tv, [&](auto V) {
            unflush_kernel<decltype(K)::value, decltype(V)::value, D><<<dim3(n_layers, a.H), 128, 0, st>>>(a);
            return cudaGetLastError();
        });
    });
}
cudaError_t launch_unflush(int tk, int tv, int D, int n_layers, const UnflushArgs &a, cudaStream_t st) {
    return with_head_dim(D, [&](auto DD) { return launch_unflush_d<decltype(DD)::value>(tk, tv, n_layers, a, st); });
}
}  // namespace

extern "C" kvq_status kvq_cuda_seq_truncate(kvq_cuda_cache *c, int32_t seq, int64_t n, kvq_cuda_stream stream) {
    const char *fn = "kvq_cuda_seq_truncate";
    if (!c) return fail(KVQ_ERR_NULL, "%s: cache is NULL", fn);
    kvq_status s = check_seq(c, seq, fn);
    if (s) return s;
    if (n < 0) return fail(KVQ_ERR_RANGE, "%s: n_tokens %lld is negative", fn, (long long)n);
    const int nl = c->cfg.n_layers;
    // A cut inside the pages keeps the whole flush units before it; the rest of its unit moves back to the window
    // (grouped caches: the unit is one page, G = P), later window tokens are dropped. With sinks, m = n - S counts
    // the tokens after them: a layer with tokens in pages or window has all S sinks.
    const int64_t m = n - c->S;
    const int64_t keep = m > 0 ? m / c->Gf * c->Gf : 0;
    const int cnt = m > 0 ? (int)(m - keep) : 0;
    bool any = false;
    UnflushArgs A;
    memset(&A, 0, sizeof A);
    for (int l = 0; l < nl; l++)
        if (m >= 0 && m < c->seqs[seq][l].paged && cnt > 0) A.mask[l >> 5] |= 1u << (l & 31), any = true;
    if (any) {  // one launch for all layers: either everything is enqueued or nothing
        if (c->Gf != PT || keep % PT != 0) return fail(KVQ_ERR_INTERNAL, "%s: group %d != page %d", fn, c->Gf, PT);
        DevGuard dg(c->device);
        A.arena = c->arena;
        A.page_bytes = (int64_t)c->L.page_bytes;
        A.table = c->table(seq, 0);
        A.table_stride = c->max_pages;
        A.win = c->wk(seq, 0);
        A.win_elems = (int64_t)c->win_elems();
        A.v_off = (int32_t)c->L.v_offset;
        A.H = c->L.n_kv_heads;
        A.page_idx = (int32_t)(keep / PT);
        A.cnt = cnt;
        A.lv = c->lv;
        cudaError_t e = launch_unflush(c->L.type_k, c->L.type_v, c->L.head_dim, nl, A, (cudaStream_t)stream);
        if (e != cudaSuccess) return fail(KVQ_ERR_CUDA, "%s: kernel launch: %s", fn, cudaGetErrorString(e));
    }
    for (int l = 0; l < nl; l++) {
        SeqLayer &sl = c->seqs[seq][l];
        if (n >= sl.sink + sl.paged + sl.win) continue;
        if (n < sl.sink) {  // inside the sinks (kvq.h section 10): the sinks before the cut stay, everything after goes
            for (int32_t p : sl.pages) page_unref(c, p);
            sl.pages.clear();
            sl.paged = 0, sl.win = 0, sl.whead = 0;
            sl.sink = (int32_t)n;
            if (n == 0) page_unref(c, sl.spage), sl.spage = -1;
            continue;
        }
        if (m >= sl.paged) {  // inside the window: the newest tokens go
            sl.win = (int32_t)(m - sl.paged);
            continue;
        }
        sl.paged = keep;
        sl.win = cnt;
        sl.whead = 0;  // the kernel wrote the surviving tokens to rows 0 .. cnt-1
        const size_t np = (size_t)((keep + PT - 1) / PT);
        for (size_t i = np; i < sl.pages.size(); i++) page_unref(c, sl.pages[i]);
        sl.pages.resize(np);
    }
    return KVQ_OK;
}

// ------------------------------------------------------------------------------------------------ attention
static kvq_status check_params(const kvq_cuda_cache *c, const kvq_attn_params *p, const char *fn) {
    if (!p) return fail(KVQ_ERR_NULL, "%s: params is NULL", fn);
    const int H = c->L.n_kv_heads;
    if (p->n_q_heads < H || p->n_q_heads % H)
        return fail(KVQ_ERR_SHAPE, "%s: n_q_heads %d is not a multiple of n_kv_heads %d", fn, p->n_q_heads, H);
    if (p->n_q_heads / H > 8) return fail(KVQ_ERR_INVALID_ARG, "%s: %d query heads per KV head (the CUDA backend has <= 8)", fn, p->n_q_heads / H);
    if (!(p->scale >= 0) || !isfinite(p->scale)) return fail(KVQ_ERR_INVALID_ARG, "%s: scale %g", fn, (double)p->scale);
    if (!(p->softcap >= 0) || !isfinite(p->softcap)) return fail(KVQ_ERR_INVALID_ARG, "%s: softcap %g", fn, (double)p->softcap);
    if (p->window < 0) return fail(KVQ_ERR_INVALID_ARG, "%s: window %d is negative", fn, p->window);
    return KVQ_OK;
}

// hi: the visible end (a position, sinks included); the entry's pages and window count the tokens after the sinks.
// Its window units weigh 1 in the split (common.cuh, Entry): decode weighs them again once it has every entry
// (win_weight needs the call's pages), prefill keeps 1 (its rows' window units were not measured under another weight)
static Entry make_entry(const kvq_cuda_cache *c, int32_t seq, int layer, int64_t hi_pos, int window, int q_row) {
    const SeqLayer &sl = c->seqs[seq][layer];
    const __half *sk = sl.spage >= 0 ? (const __half *)(c->arena + (size_t)sl.spage * c->L.page_bytes) : nullptr;
    return make_entry_at(c->table(seq, layer), c->wk(seq, layer), c->wv(seq, layer), sk, sl.paged, sl.sink, sl.whead,
                         hi_pos, window, q_row);
}

// The entries of a sequence's last n_q tokens as query rows row0 .. row0 + n_q - 1 (causal: row r sees the sequence up
// to its own token), packed ntok tokens an entry: the decode kernel's 8 MMA columns hold ntok x Gq query heads, so the
// pages are read once for ntok tokens (n_q / ntok times in all, not n_q). A sliding window (p->window > 0) starts
// each token's range elsewhere: one token an entry there.
static void add_rows(const kvq_cuda_cache *c, int32_t seq, int layer, int64_t len, int n_q, int row0,
                     const kvq_attn_params *p, std::vector<Entry> &es) {
    const int Gq = p->n_q_heads / c->L.n_kv_heads;
    const int mt = p->window > 0 ? 1 : std::max(1, std::min(c->row_tokens, 8 / Gq));
    for (int r = 0; r < n_q; r += mt) {
        const int nt = std::min(mt, n_q - r);
        Entry e = make_entry(c, seq, layer, len - n_q + r + nt, p->window, row0 + r);
        e.ntok = (int16_t)nt;
        es.push_back(e);
    }
}

// Decode workspace: the pairs' counters (MAXE H, zeroed once: the kernel leaves them at zero), then the partials, one
// slot per CTA and (entry, head) pair it touches.
static size_t ws_counter_bytes(int H) { return ((size_t)MAXE * H * sizeof(int32_t) + 255) & ~(size_t)255; }
static size_t ws_slot_bytes(int Gq, int D) { return ((size_t)Gq * D + 2 * Gq) * sizeof(float); }
// Grows the workspace to `need` bytes on the stream (stream-ordered free of the old one); nothing else changes.
static kvq_status reserve_ws(kvq_cuda_cache *c, size_t need, cudaStream_t st, const char *fn) {
    if (need <= c->ws_bytes) return KVQ_OK;
    const size_t cnt_bytes = ws_counter_bytes(c->L.n_kv_heads);
    if (c->ws) cudaFreeAsync(c->ws, st);
    c->ws = nullptr;
    c->ws_bytes = 0;
    cudaError_t e = dev_malloc_async((void **)&c->ws, need, st);
    if (e == cudaSuccess) e = cudaMemsetAsync(c->ws, 0, cnt_bytes, st);
    if (e != cudaSuccess) {
        if (c->ws) cudaFreeAsync(c->ws, st);
        c->ws = nullptr;
        return fail(e == cudaErrorMemoryAllocation ? KVQ_ERR_OUT_OF_MEMORY : KVQ_ERR_CUDA, "%s: workspace of %zu bytes: %s",
                    fn, need, cudaGetErrorString(e));
    }
    c->ws_bytes = need;
    return KVQ_OK;
}

#ifdef KVQ_DECODE_TRACE
// Diagnostic builds only: the decode kernel's per-CTA stamps (decode.cuh), with $KVQ_TRACE_FILE set one line per CTA
// appended there after each launch (bench/decode_trace.py reads them). The stamps need a synchronisation: never timed.
static unsigned long long *g_trace = nullptr;
static void trace_arm(DecodeArgs &A, cudaStream_t st) {
    constexpr int max_cta = 4096;
    if (!g_trace) cudaMalloc((void **)&g_trace, (size_t)max_cta * KVQ_TRACE_SLOTS * sizeof(unsigned long long));
    A.trace = A.n_cta <= max_cta ? g_trace : nullptr;
    if (A.trace) cudaMemsetAsync(g_trace, 0, (size_t)A.n_cta * KVQ_TRACE_SLOTS * sizeof(unsigned long long), st);
}
static void trace_dump(const DecodeArgs &A, int tk, int tv, int D, cudaStream_t st, bool launched) {
    static long launch_no = 0;  // every launch attempt counts, so that lines keep their numbers across runs
    const long no = launch_no++;
    const char *path = getenv("KVQ_TRACE_FILE");
    if (!launched || !A.trace || !path) return;
    std::vector<unsigned long long> h((size_t)A.n_cta * KVQ_TRACE_SLOTS);
    cudaStreamSynchronize(st);
    cudaMemcpy(h.data(), A.trace, h.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost);
    FILE *f = fopen(path, "a");
    if (!f) return;
    fprintf(f, "L %ld tk %d tv %d D %d ne %d total %lld per_cta %lld n_cta %d\n", no, tk, tv, D, A.n_entries,
            (long long)A.total, (long long)A.L, A.n_cta);
    for (int x = 0; x < A.n_cta; x++) {
        fprintf(f, "C %d", x);
        for (int y = 0; y < KVQ_TRACE_SLOTS; y++) fprintf(f, " %llu", h[(size_t)x * KVQ_TRACE_SLOTS + y]);
        fputc('\n', f);
    }
    fclose(f);
}
#endif

// Runs the decode kernels over entries (chunks of MAXE), growing the workspace on the stream as needed.
// n_rows: rows of q / out (sequences of a decode, queries of a prefill)
static kvq_status run_entries(kvq_cuda_cache *c, int layer, int n_rows, std::vector<Entry> &es, kvq_dtype qo,
                              const void *q, void *out, const kvq_attn_params *p, cudaStream_t st, const char *fn) {
    DevGuard dg(c->device);
    const int H = c->L.n_kv_heads, D = c->L.head_dim, Gq = p->n_q_heads / H, tk = c->L.type_k, tv = c->L.type_v;
    // Rotated roles (kvq.h section 10): the decode kernel rotates each query into the keys' domain as it loads it
    // (q.k = Rq.Rk), and takes the outputs back from the values' domain once per head where it stores them, after the
    // split merge (sum p_i v_i = R^T sum p_i R v_i). With KVQ_CUDA_SPLIT_ROT a small kernel does the latter after the
    // decode kernel, over fp32 scratch rows (the same bits), allocated first: a failure leaves nothing enqueued.
    const bool rv = c->rotated(KVQ_VALUE), ro = rv && !c->fuse_rot;  // ro: the un-rotation as a kernel of its own
    const int64_t qrows = (int64_t)n_rows * p->n_q_heads;
    const size_t rbytes = (size_t)qrows * D * sizeof(float);
    float *so = nullptr;
    if (ro) {
        cudaError_t e = grow_scratch(&c->qws, &c->qws_bytes, rbytes, st);
        if (e != cudaSuccess)
            return fail(e == cudaErrorMemoryAllocation ? KVQ_ERR_OUT_OF_MEMORY : KVQ_ERR_CUDA,
                        "%s: scratch of %zu bytes for the output rotation: %s", fn, rbytes, cudaGetErrorString(e));
        so = (float *)c->qws;
    }
    int Gs = Gq;  // a partial slot's columns: the most of any entry (every launch alike, as the workspace reserves)
    for (const Entry &e : es) Gs = std::max(Gs, e.ntok * Gq);
    DecodeArgs *A = new (std::nothrow) DecodeArgs;
    if (!A) return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory", fn);
    for (size_t b = 0; b < es.size(); b += MAXE) {
        memset(A, 0, sizeof *A);
        const int ne = (int)std::min<size_t>(MAXE, es.size() - b);
        int64_t total = 0;
        for (int i = 0; i < ne; i++) {
            A->e[i] = es[b + i];
            A->e[i].start = total;
            total += (int64_t)H * A->e[i].n;
        }
        int64_t L = (total + c->n_sm - 1) / c->n_sm;
        if (L < 1) L = 1;
        const int n_cta = (int)((total + L - 1) / L);
        const size_t cnt_bytes = ws_counter_bytes(H);
        const size_t slots = (size_t)ne * H + n_cta;
        const size_t need = cnt_bytes + slots * ws_slot_bytes(Gs, D);
        kvq_status ws = reserve_ws(c, need, st, fn);
        if (ws) {
            delete A;
            return ws;
        }
        A->arena = c->arena;
        A->page_bytes = (int64_t)c->L.page_bytes;
        A->v_off = (int32_t)c->L.v_offset;
        A->H = H, A->Gq = Gq, A->Gs = Gs, A->nqh = p->n_q_heads, A->wcap = c->wcap, A->D = D;
        A->qo_dtype = ro ? KVQ_DTYPE_F32 : qo;
        A->q_dtype = qo;
        A->sink_vo = (int32_t)((int64_t)c->SR * H * D);
        A->rot_q = c->rotated(KVQ_KEY);
        if (A->rot_q) A->rq = c->rot_k[layer];
        A->rot_o = rv && c->fuse_rot;
        if (A->rot_o) A->ro = c->rot_v[layer];
        A->win_first = c->win_first;
        A->lv = c->lv;
        A->qscale = attn_qscale(p, D);
        A->softcap = p->softcap;
        A->q = q, A->out = ro ? (void *)so : out;
        A->cnt = (int32_t *)c->ws;
        A->part = (float *)((char *)c->ws + cnt_bytes);
        A->part_ml = A->part + slots * Gs * D;
        A->n_entries = ne;
        A->n_cta = n_cta;
        A->total = total;
        A->L = L;
#ifdef KVQ_DECODE_TRACE
        trace_arm(*A, st);
#endif
        cudaError_t e = launch_decode(tk, tv, D, *A, st, c->portable);
#ifdef KVQ_DECODE_TRACE
        trace_dump(*A, tk, tv, D, st, e == cudaSuccess);
#endif
        if (e != cudaSuccess) {
            delete A;
            if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction)
                return fail(KVQ_ERR_NO_DEVICE, "%s: no %s decode kernel for device %d in this build (%s): %s", fn,
                            c->portable ? "portable" : "Hopper", c->device, KVQ_CUDA_ARCHS, cudaGetErrorString(e));
            return fail(KVQ_ERR_CUDA, "%s: kernel launch: %s", fn, cudaGetErrorString(e));
        }
    }
    delete A;
    if (ro) {
        cudaError_t e = unrotate_outputs(c, layer, so, out, qo, qrows, st);
        if (e != cudaSuccess) return fail(KVQ_ERR_CUDA, "%s: output rotation kernel: %s", fn, cudaGetErrorString(e));
    }
    return KVQ_OK;
}

extern "C" kvq_status kvq_cuda_attn_decode(kvq_cuda_cache *c, int layer, int n_seqs, const int32_t *seq_ids,
                                           kvq_dtype qo, const void *q, void *out, const kvq_attn_params *p,
                                           kvq_cuda_stream stream) {
    const char *fn = "kvq_cuda_attn_decode";
    if (!c) return fail(KVQ_ERR_NULL, "%s: cache is NULL", fn);
    kvq_status s;
    if ((s = check_layer(c, layer, fn)) || (s = check_params(c, p, fn))) return s;
    if (n_seqs < 0) return fail(KVQ_ERR_INVALID_ARG, "%s: n_seqs %d", fn, n_seqs);
    if (n_seqs == 0) return KVQ_OK;
    if (!seq_ids || !q || !out) return fail(KVQ_ERR_NULL, "%s: seq_ids, q or out is NULL", fn);
    if (qo != KVQ_DTYPE_F32 && qo != KVQ_DTYPE_F16 && qo != KVQ_DTYPE_BF16) return fail(KVQ_ERR_INVALID_ARG, "%s: dtype %d", fn, (int)qo);
    std::vector<Entry> es;
    es.reserve(n_seqs);
    int64_t pages = 0;  // the call's page units, for the window units' weight
    for (int i = 0; i < n_seqs; i++) {
        if ((s = check_seq(c, seq_ids[i], fn))) return s;
        const SeqLayer &sl = c->seqs[seq_ids[i]][layer];
        int64_t len = sl.sink + sl.paged + sl.win;
        if (len < 1) return fail(KVQ_ERR_RANGE, "%s: sequence %d is empty in layer %d (append the token first)", fn, (int)seq_ids[i], layer);
        es.push_back(make_entry(c, seq_ids[i], layer, len, p->window, i));
        pages += (int64_t)es.back().npu * c->L.n_kv_heads;
    }
    const int ww = c->ww > 0 ? c->ww : win_weight((int64_t)n_seqs * c->L.n_kv_heads, pages, c->n_sm);
    for (Entry &e : es) entry_weigh(e, ww);
    return run_entries(c, layer, n_seqs, es, qo, q, out, p, (cudaStream_t)stream, fn);
}

extern "C" kvq_status kvq_cuda_decode_step(kvq_cuda_cache *c, int layer, int n_seqs, const int32_t *seq_ids,
                                           kvq_dtype kv_dtype, const void *k, const void *v, kvq_dtype qo,
                                           const void *q, void *out, const kvq_attn_params *p, kvq_cuda_stream stream) {
    const char *fn = "kvq_cuda_decode_step";
    if (!c) return fail(KVQ_ERR_NULL, "%s: cache is NULL", fn);
    kvq_status s;
    if ((s = check_layer(c, layer, fn)) || (s = check_params(c, p, fn))) return s;
    if (n_seqs < 1 || n_seqs > c->cfg.max_seqs)
        return fail(KVQ_ERR_INVALID_ARG, "%s: n_seqs %d outside 1..%d", fn, n_seqs, c->cfg.max_seqs);
    if (!seq_ids || !k || !v || !q || !out) return fail(KVQ_ERR_NULL, "%s: seq_ids, k, v, q or out is NULL", fn);
    for (kvq_dtype d : {kv_dtype, qo})
        if (d != KVQ_DTYPE_F32 && d != KVQ_DTYPE_F16 && d != KVQ_DTYPE_BF16)
            return fail(KVQ_ERR_INVALID_ARG, "%s: dtype %d", fn, (int)d);
    // The sequences (live, distinct) and the pages are checked by the append before it changes anything; after it,
    // every sequence holds >= 1 token, so the attention's own checks pass. What the attention could still fail on,
    // its device memory, is reserved first for the largest launch a decode of n_seqs rows makes (n_cta <= n_sm).
    std::vector<int32_t> ones;
    try {
        ones.assign((size_t)n_seqs, 1);
    } catch (...) {
        return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory", fn);
    }
    {
        DevGuard dg(c->device);
        cudaStream_t st = (cudaStream_t)stream;
        const int H = c->L.n_kv_heads, D = c->L.head_dim, Gq = p->n_q_heads / H;
        const size_t rows = (size_t)std::min(n_seqs, MAXE);
        if ((s = reserve_ws(c, ws_counter_bytes(H) + (rows * H + c->n_sm) * ws_slot_bytes(Gq, D), st, fn))) return s;
        if (c->rotated(KVQ_VALUE) && !c->fuse_rot) {
            const size_t rbytes = (size_t)n_seqs * p->n_q_heads * D * sizeof(float);
            cudaError_t e = grow_scratch(&c->qws, &c->qws_bytes, rbytes, st);
            if (e != cudaSuccess)
                return fail(e == cudaErrorMemoryAllocation ? KVQ_ERR_OUT_OF_MEMORY : KVQ_ERR_CUDA,
                            "%s: scratch of %zu bytes for the output rotation: %s", fn, rbytes, cudaGetErrorString(e));
        }
    }
    if ((s = kvq_cuda_append(c, layer, n_seqs, seq_ids, ones.data(), kv_dtype, k, v, stream))) return s;
    return kvq_cuda_attn_decode(c, layer, n_seqs, seq_ids, qo, q, out, p, stream);
}

// Which prefill kernel (kvq_cuda.h section 2, KVQ_CUDA_PREFILL_TILES, read per call): the tiled one (prefill.cu) once
// the query rows fill most of its 128-row tile, else the decode kernel's entries (8 columns: fewer wasted MMA rows)
static bool prefill_tiles(int n_q, int Gq) {
    const char *e = getenv("KVQ_CUDA_PREFILL_TILES");
    if (e && *e) return strcmp(e, "0") != 0;
    return (int64_t)n_q * Gq >= 64;
}

// The tiled prefill (prefill.cu) of (seq, layer)'s last n_q tokens. A call with few query tiles splits the positions
// too (blockIdx.z), the partials in the decode workspace after its counters.
static kvq_status prefill_tiled(kvq_cuda_cache *c, int layer, int32_t seq, int n_q, kvq_dtype qo, const void *q, void *out,
                                const kvq_attn_params *p, cudaStream_t st, const char *fn) {
    DevGuard dg(c->device);
    const SeqLayer &sl = c->seqs[seq][layer];
    const int H = c->L.n_kv_heads, D = c->L.head_dim;
    PrefillArgs A;
    memset(&A, 0, sizeof A);
    A.arena = c->arena;
    A.page_bytes = (int64_t)c->L.page_bytes;
    A.pt = c->table(seq, layer);
    A.wk = c->wk(seq, layer), A.wv = c->wv(seq, layer);
    A.sk = sl.spage >= 0 ? (const __half *)(c->arena + (size_t)sl.spage * c->L.page_bytes) : nullptr;
    A.v_off = (int32_t)c->L.v_offset;
    A.sink_vo = (int32_t)((int64_t)c->SR * H * D);
    A.S = sl.sink, A.paged = (int32_t)sl.paged, A.win = sl.win, A.whead = sl.whead, A.wcap = c->wcap;
    A.len = (int32_t)(sl.sink + sl.paged + sl.win), A.n_q = n_q, A.H = H, A.nqh = p->n_q_heads, A.Gq = p->n_q_heads / H;
    A.tpc = prefill_rows(D) / A.Gq;
    A.tk = c->L.type_k, A.tv = c->L.type_v, A.q_dtype = qo, A.o_dtype = qo;
    A.window = p->window;
    A.rot_q = c->rotated(KVQ_KEY);
    if (A.rot_q) A.rq = c->rot_k[layer];
    A.rot_o = c->rotated(KVQ_VALUE);
    if (A.rot_o) A.ro = c->rot_v[layer];
    A.units = (sl.sink > 0) + (int32_t)((sl.paged + PT - 1) / PT) + (sl.win + PT - 1) / PT;
    A.qscale = attn_qscale(p, D), A.softcap = p->softcap;
    A.lv = c->lv;
    A.q = q, A.out = out;
    // Splits: about 4 waves of CTAs (2 per SM at D <= 128), so that the last wave's tail stays short, each split at
    // least 4 units (256 tokens), the partials within 256 MB. (H100, depth 32768, chunk 512: 3 splits made 1.45 waves
    // and q2 took 2566 us where the decode kernel's entries took 2346; 9 splits: 1826 us. docs/bench-cuda.md)
    const int64_t ctas = (int64_t)(n_q + A.tpc - 1) / A.tpc * H, slots = 2 * (int64_t)c->n_sm;
    const size_t part_row = (size_t)n_q * p->n_q_heads * (D + 2) * sizeof(float);
    int64_t splits = 1;
    if (ctas < 4 * slots) splits = std::min(std::min((4 * slots + ctas - 1) / ctas, (int64_t)A.units / 4), (int64_t)64);
    while (splits > 1 && splits * part_row > ((size_t)256 << 20)) splits--;
    if (splits < 1) splits = 1;
    A.per_split = (int32_t)((A.units + splits - 1) / splits);
    splits = (A.units + A.per_split - 1) / A.per_split;
    if (splits > 1) {
        const size_t out_rows = (size_t)n_q * p->n_q_heads, cnt_bytes = ws_counter_bytes(H);
        kvq_status s = reserve_ws(c, cnt_bytes + (size_t)splits * out_rows * (D + 2) * sizeof(float), st, fn);
        if (s) return s;
        A.part_o = (float *)((char *)c->ws + cnt_bytes);
        A.part_ml = A.part_o + (size_t)splits * out_rows * D;
    }
    cudaError_t e = launch_prefill(D, A, (int)splits, st);
    if (e == cudaSuccess && splits > 1) e = launch_prefill_merge(D, A, (int)splits, st);
    static const bool debug = getenv("KVQ_CUDA_DEBUG") != nullptr;  // section 2
    if (e == cudaSuccess && debug && (e = cudaStreamSynchronize(st)) != cudaSuccess)
        fprintf(stderr, "kvq debug: prefill kernel (%d queries, %lld splits) failed: %s\n", n_q, (long long)splits, cudaGetErrorString(e));
    if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction)
        return fail(KVQ_ERR_NO_DEVICE, "%s: no prefill kernel for device %d in this build (%s): %s", fn, c->device, KVQ_CUDA_ARCHS,
                    cudaGetErrorString(e));
    if (e != cudaSuccess) return fail(KVQ_ERR_CUDA, "%s: prefill kernel: %s", fn, cudaGetErrorString(e));
    return KVQ_OK;
}

extern "C" kvq_status kvq_cuda_attn_prefill(kvq_cuda_cache *c, int layer, int32_t seq, int n_q, kvq_dtype qo,
                                            const void *q, void *out, const kvq_attn_params *p, kvq_cuda_stream stream) {
    const char *fn = "kvq_cuda_attn_prefill";
    if (!c) return fail(KVQ_ERR_NULL, "%s: cache is NULL", fn);
    kvq_status s;
    if ((s = check_layer(c, layer, fn)) || (s = check_params(c, p, fn)) || (s = check_seq(c, seq, fn))) return s;
    if (n_q < 0) return fail(KVQ_ERR_INVALID_ARG, "%s: n_q %d", fn, n_q);
    if (n_q == 0) return KVQ_OK;
    if (!q || !out) return fail(KVQ_ERR_NULL, "%s: q or out is NULL", fn);
    if (qo != KVQ_DTYPE_F32 && qo != KVQ_DTYPE_F16 && qo != KVQ_DTYPE_BF16) return fail(KVQ_ERR_INVALID_ARG, "%s: dtype %d", fn, (int)qo);
    const SeqLayer &sl = c->seqs[seq][layer];
    int64_t len = sl.sink + sl.paged + sl.win;
    if (n_q > len) return fail(KVQ_ERR_RANGE, "%s: n_q %d > sequence length %lld", fn, n_q, (long long)len);
    if (prefill_tiles(n_q, p->n_q_heads / c->L.n_kv_heads)) return prefill_tiled(c, layer, seq, n_q, qo, q, out, p, (cudaStream_t)stream, fn);
    std::vector<Entry> es;
    es.reserve(n_q);
    add_rows(c, seq, layer, len, n_q, 0, p, es);
    return run_entries(c, layer, n_q, es, qo, q, out, p, (cudaStream_t)stream, fn);
}

extern "C" kvq_status kvq_cuda_attn_decode_multi(kvq_cuda_cache *c, int layer, int n_seqs, const int32_t *seq_ids,
                                                 int n_q, kvq_dtype qo, const void *q, void *out,
                                                 const kvq_attn_params *p, kvq_cuda_stream stream) {
    const char *fn = "kvq_cuda_attn_decode_multi";
    if (!c) return fail(KVQ_ERR_NULL, "%s: cache is NULL", fn);
    kvq_status s;
    if ((s = check_layer(c, layer, fn)) || (s = check_params(c, p, fn))) return s;
    if (n_seqs < 0) return fail(KVQ_ERR_INVALID_ARG, "%s: n_seqs %d", fn, n_seqs);
    if (n_q < 1) return fail(KVQ_ERR_INVALID_ARG, "%s: n_q %d (1 or more query tokens per sequence)", fn, n_q);
    if (n_seqs == 0) return KVQ_OK;
    if (!seq_ids || !q || !out) return fail(KVQ_ERR_NULL, "%s: seq_ids, q or out is NULL", fn);
    if (qo != KVQ_DTYPE_F32 && qo != KVQ_DTYPE_F16 && qo != KVQ_DTYPE_BF16) return fail(KVQ_ERR_INVALID_ARG, "%s: dtype %d", fn, (int)qo);
    if ((int64_t)n_seqs * n_q > INT32_MAX / p->n_q_heads)
        return fail(KVQ_ERR_INVALID_ARG, "%s: %d sequences x %d query tokens: too many rows", fn, n_seqs, n_q);
    std::vector<Entry> es;
    try {
        es.reserve((size_t)n_seqs * n_q);
    } catch (...) {
        return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory", fn);
    }
    for (int i = 0; i < n_seqs; i++) {
        if ((s = check_seq(c, seq_ids[i], fn))) return s;
        const SeqLayer &sl = c->seqs[seq_ids[i]][layer];
        const int64_t len = sl.sink + sl.paged + sl.win;
        if (n_q > len)
            return fail(KVQ_ERR_RANGE, "%s: n_q %d > length %lld of sequence %d in layer %d (append the tokens first)", fn,
                        n_q, (long long)len, (int)seq_ids[i], layer);
        add_rows(c, seq_ids[i], layer, len, n_q, i * n_q, p, es);
    }
    return run_entries(c, layer, n_seqs * n_q, es, qo, q, out, p, (cudaStream_t)stream, fn);
}

extern "C" kvq_status kvq_cuda_attn_decode_bytes(const kvq_cuda_cache *c, int layer, int n_seqs, const int32_t *seq_ids,
                                                 const kvq_attn_params *p, double *bytes) {
    const char *fn = "kvq_cuda_attn_decode_bytes";
    if (!c || !seq_ids || !p || !bytes) return fail(KVQ_ERR_NULL, "%s: NULL argument", fn);
    kvq_status s;
    if ((s = check_layer(c, layer, fn))) return s;
    double b = 0;
    const int H = c->L.n_kv_heads, D = c->L.head_dim;
    for (int i = 0; i < n_seqs; i++) {
        if ((s = check_seq(c, seq_ids[i], fn))) return s;
        const SeqLayer &sl = c->seqs[seq_ids[i]][layer];
        Entry e = make_entry(c, seq_ids[i], layer, sl.sink + sl.paged + sl.win, p->window, i);
        b += (double)e.npu * H * (c->L.k_block_bytes + c->L.v_block_bytes);
        int64_t wt = e.hi - std::max(e.lo, e.paged);
        if (wt > 0) b += (double)wt * H * D * 2 * 2;
        b += (double)(e.shi - e.slo) * H * D * 2 * 2;  // sinks (fp16 K and V)
    }
    *bytes = b;
    return KVQ_OK;
}

extern "C" kvq_status kvq_cuda_seq_read(const kvq_cuda_cache *c, int32_t seq, int layer, int64_t *paged_tokens,
                                        int32_t *window_tokens, void *pages, uint16_t *window_k, uint16_t *window_v,
                                        kvq_cuda_stream stream) {
    const char *fn = "kvq_cuda_seq_read";
    if (!c) return fail(KVQ_ERR_NULL, "%s: cache is NULL", fn);
    kvq_status s;
    if ((s = check_seq(c, seq, fn)) || (s = check_layer(c, layer, fn))) return s;
    const SeqLayer &sl = c->seqs[seq][layer];
    if (paged_tokens) *paged_tokens = sl.paged;
    if (window_tokens) *window_tokens = sl.win;
    DevGuard dg(c->device);
    cudaStream_t st = (cudaStream_t)stream;
    if (pages)
        for (size_t i = 0; i < sl.pages.size(); i++)
            CUDA_TRY(cudaMemcpyAsync((uint8_t *)pages + i * c->L.page_bytes, c->arena + (size_t)sl.pages[i] * c->L.page_bytes,
                                     c->L.page_bytes, cudaMemcpyDeviceToHost, st), fn);
    const size_t row = (size_t)c->L.n_kv_heads * c->L.head_dim;
    for (int t = 0; t < sl.win; t++) {
        int r = (sl.whead + t) % c->wcap;
        if (window_k) CUDA_TRY(cudaMemcpyAsync(window_k + t * row, c->wk(seq, layer) + r * row, row * 2, cudaMemcpyDeviceToHost, st), fn);
        if (window_v) CUDA_TRY(cudaMemcpyAsync(window_v + t * row, c->wv(seq, layer) + r * row, row * 2, cudaMemcpyDeviceToHost, st), fn);
    }
    CUDA_TRY(cudaStreamSynchronize(st), fn);
    return KVQ_OK;
}

extern "C" kvq_status kvq_cuda_seq_read_sinks(const kvq_cuda_cache *c, int32_t seq, int layer, int32_t *sink_tokens,
                                              uint16_t *k, uint16_t *v, kvq_cuda_stream stream) {
    const char *fn = "kvq_cuda_seq_read_sinks";
    if (!c) return fail(KVQ_ERR_NULL, "%s: cache is NULL", fn);
    kvq_status s;
    if ((s = check_seq(c, seq, fn)) || (s = check_layer(c, layer, fn))) return s;
    const SeqLayer &sl = c->seqs[seq][layer];
    if (sink_tokens) *sink_tokens = sl.sink;
    if (sl.sink == 0 || (!k && !v)) return KVQ_OK;
    DevGuard dg(c->device);
    cudaStream_t st = (cudaStream_t)stream;
    const size_t bytes = (size_t)sl.sink * c->L.n_kv_heads * c->L.head_dim * 2;
    const uint8_t *pg = c->arena + (size_t)sl.spage * c->L.page_bytes;
    if (k) CUDA_TRY(cudaMemcpyAsync(k, pg, bytes, cudaMemcpyDeviceToHost, st), fn);
    if (v) CUDA_TRY(cudaMemcpyAsync(v, pg + (size_t)c->SR * c->L.n_kv_heads * c->L.head_dim * 2, bytes, cudaMemcpyDeviceToHost, st), fn);
    CUDA_TRY(cudaStreamSynchronize(st), fn);
    return KVQ_OK;
}

// ------------------------------------------------------------------------------------------------ static plans
// (kvq_cuda.h section 5) The lent sequences' bookkeeping lives in device memory (DevSeq per (sequence, layer)); the
// host's SeqLayer of those sequences is stale until kvq_cuda_static_end copies it back. Everything a step needs is
// allocated here, once, in one block: the state, the kernels' argument blocks, the attention workspace and the
// rotation scratch (the cache's own workspace may be regrown by eager calls on other sequences meanwhile).
struct kvq_cuda_static {
    kvq_cuda_cache *c = nullptr;
    int n = 0;
    std::vector<int32_t> seqs;
    kvq_attn_params p{};
    kvq_dtype kv_dtype = KVQ_DTYPE_F32, qo = KVQ_DTYPE_F32;
    int64_t max_tokens = 0;
    void *mem = nullptr;
    int32_t *d_seqs = nullptr, *d_spage = nullptr, *d_flag = nullptr;
    DevSeq *d_st = nullptr;
    AppendArgs *d_flush = nullptr, *d_win = nullptr;
    SinkArgs *d_sink = nullptr;
    DecodeArgs *d_dec = nullptr;
    void *ws = nullptr;     // counters, then the partials (run_entries' layout)
    float *rk = nullptr, *rv = nullptr, *so = nullptr;  // rotated K, V (fp32), un-rotated outputs' source (fp32)
    size_t ws_slots = 0;
};

static void static_release(kvq_cuda_static *s) {
    if (!s) return;
    if (s->c) {
        for (int32_t q : s->seqs) s->c->lent[q] = 0;
        s->c->plan = nullptr;
    }
    cudaFree(s->mem);
    delete s;
}

// Tokens of (sequence, layer) that can sit in pages once it holds max_tokens: all but its sinks.
static int64_t static_pages(const kvq_cuda_cache *c, int64_t max_tokens) {
    const int64_t t = max_tokens - std::min<int64_t>(c->S, max_tokens);
    return (t + PT - 1) / PT;
}

extern "C" kvq_status kvq_cuda_static_create(kvq_cuda_cache *c, int n_seqs, const int32_t *seq_ids, int64_t max_tokens,
                                             const kvq_attn_params *p, kvq_dtype kv_dtype, kvq_dtype qo,
                                             kvq_cuda_stream stream, kvq_cuda_static **out) {
    const char *fn = "kvq_cuda_static_create";
    if (!c || !out) return fail(KVQ_ERR_NULL, "%s: cache or out is NULL", fn);
    *out = nullptr;
    kvq_status s;
    if ((s = check_params(c, p, fn))) return s;
    if (c->plan) return fail(KVQ_ERR_INVALID_ARG, "%s: the cache has a static plan already (one at a time)", fn);
    if (n_seqs < 1 || n_seqs > MAXA || n_seqs > c->cfg.max_seqs)
        return fail(KVQ_ERR_INVALID_ARG, "%s: n_seqs %d outside 1..%d", fn, n_seqs, std::min(MAXA, c->cfg.max_seqs));
    if (!seq_ids) return fail(KVQ_ERR_NULL, "%s: seq_ids is NULL", fn);
    for (kvq_dtype d : {kv_dtype, qo})
        if (d != KVQ_DTYPE_F32 && d != KVQ_DTYPE_F16 && d != KVQ_DTYPE_BF16)
            return fail(KVQ_ERR_INVALID_ARG, "%s: dtype %d", fn, (int)d);
    const int nl = c->cfg.n_layers, H = c->L.n_kv_heads, D = c->L.head_dim, Gq = p->n_q_heads / H;
    if (max_tokens < 1) return fail(KVQ_ERR_RANGE, "%s: max_tokens %lld < 1", fn, (long long)max_tokens);
    const int64_t np = static_pages(c, max_tokens);
    if (np > c->max_pages)
        return fail(KVQ_ERR_CACHE_FULL, "%s: max_tokens %lld needs %lld pages per (sequence, layer), the page table holds %lld",
                    fn, (long long)max_tokens, (long long)np, (long long)c->max_pages);
    // Pages to take: the reservation up to max_tokens, a private copy of a shared, partly filled last page (the next
    // flush writes into it) and of a shared sink page with sinks still to come, a sink page where there is none yet.
    int64_t need = 0;
    std::vector<char> seen(c->cfg.max_seqs, 0);
    for (int i = 0; i < n_seqs; i++) {
        if ((s = check_seq(c, seq_ids[i], fn))) return s;
        if (seen[seq_ids[i]]) return fail(KVQ_ERR_INVALID_ARG, "%s: sequence %d appears twice", fn, (int)seq_ids[i]);
        seen[seq_ids[i]] = 1;
        for (int l = 0; l < nl; l++) {
            const SeqLayer &sl = c->seqs[seq_ids[i]][l];
            const int64_t len = sl.sink + sl.paged + sl.win;
            if (len > max_tokens)
                return fail(KVQ_ERR_RANGE, "%s: sequence %d holds %lld tokens in layer %d, more than max_tokens %lld", fn,
                            (int)seq_ids[i], (long long)len, l, (long long)max_tokens);
            need += std::max<int64_t>(0, np - (int64_t)sl.pages.size());
            if (sl.paged % PT && c->refcnt[sl.pages.back()] > 1) need++;
            if (sl.sink < c->S && (sl.spage < 0 || c->refcnt[sl.spage] > 1)) need++;
        }
    }
    if (need > (int64_t)c->free_list.size())
        return fail(KVQ_ERR_CACHE_FULL, "%s: the plan needs %lld free pages, %lld are free", fn, (long long)need,
                    (long long)c->free_list.size());
    kvq_cuda_static *S = new (std::nothrow) kvq_cuda_static;
    if (!S) return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory", fn);
    // the device block: state, arguments, workspace (as run_entries sizes it for n_seqs rows), rotation scratch
    const size_t cnt_bytes = ws_counter_bytes(H);
    S->ws_slots = (size_t)n_seqs * H + c->n_sm;
    auto al = [](size_t x) { return (x + 255) & ~(size_t)255; };
    size_t off[12], tot = 0;
    const size_t sizes[12] = {(size_t)n_seqs * 4, (size_t)n_seqs * nl * 4, 4, (size_t)n_seqs * nl * sizeof(DevSeq),
                              sizeof(AppendArgs), sizeof(AppendArgs), sizeof(SinkArgs), sizeof(DecodeArgs),
                              cnt_bytes + S->ws_slots * ws_slot_bytes(Gq, D),
                              c->cfg.rotate ? (size_t)n_seqs * H * D * 4 : 0, c->cfg.rotate ? (size_t)n_seqs * H * D * 4 : 0,
                              c->rotated(KVQ_VALUE) && !c->fuse_rot ? (size_t)n_seqs * p->n_q_heads * D * 4 : 0};
    for (int i = 0; i < 12; i++) off[i] = tot, tot += al(sizes[i]);
    std::vector<int32_t> h_spage, h_tab;
    std::vector<DevSeq> h_st;
    // per (sequence, layer): its new page list and sink page (committed only when every copy is enqueued)
    std::vector<std::vector<int32_t>> pages;
    std::vector<int32_t> spage;
    std::vector<std::pair<int32_t, int32_t>> copies;  // (from, to) page copies: copy on write
    try {
        S->seqs.assign(seq_ids, seq_ids + n_seqs);
        h_spage.resize((size_t)n_seqs * nl);
        h_st.resize((size_t)n_seqs * nl);
        pages.resize((size_t)n_seqs * nl);
        spage.resize((size_t)n_seqs * nl);
    } catch (...) {
        delete S;
        return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory", fn);
    }
    DevGuard dg(c->device);
    cudaStream_t st = (cudaStream_t)stream;
    cudaError_t e = dev_malloc(&S->mem, tot);
    if (e != cudaSuccess) {
        delete S;
        return fail(e == cudaErrorMemoryAllocation ? KVQ_ERR_OUT_OF_MEMORY : KVQ_ERR_CUDA, "%s: %zu device bytes: %s", fn,
                    tot, cudaGetErrorString(e));
    }
    char *m = (char *)S->mem;
    S->d_seqs = (int32_t *)(m + off[0]), S->d_spage = (int32_t *)(m + off[1]), S->d_flag = (int32_t *)(m + off[2]);
    S->d_st = (DevSeq *)(m + off[3]);
    S->d_flush = (AppendArgs *)(m + off[4]), S->d_win = (AppendArgs *)(m + off[5]);
    S->d_sink = (SinkArgs *)(m + off[6]), S->d_dec = (DecodeArgs *)(m + off[7]);
    S->ws = m + off[8];
    S->rk = (float *)(m + off[9]), S->rv = (float *)(m + off[10]), S->so = (float *)(m + off[11]);
    size_t fl_pos = c->free_list.size();
    auto undo = [&](cudaError_t err, const char *what) {
        cudaStreamSynchronize(st);  // nothing enqueued may still use the block
        cudaFree(S->mem);
        delete S;
        return fail(KVQ_ERR_CUDA, "%s: %s: %s", fn, what, cudaGetErrorString(err));
    };
    try {
        for (int i = 0; i < n_seqs; i++)
            for (int l = 0; l < nl; l++) {
                const size_t x = (size_t)i * nl + l;
                const SeqLayer &sl = c->seqs[seq_ids[i]][l];
                std::vector<int32_t> &pl = pages[x];
                pl = sl.pages;
                if (sl.paged % PT && c->refcnt[pl.back()] > 1) {
                    const int32_t cp = c->free_list[--fl_pos];
                    copies.push_back({pl.back(), cp});
                    pl.back() = cp;
                }
                while ((int64_t)pl.size() < np) pl.push_back(c->free_list[--fl_pos]);
                spage[x] = sl.spage;
                if (sl.sink < c->S) {
                    if (sl.spage < 0) spage[x] = c->free_list[--fl_pos];
                    else if (c->refcnt[sl.spage] > 1) {
                        spage[x] = c->free_list[--fl_pos];
                        copies.push_back({sl.spage, spage[x]});
                    }
                }
                h_spage[x] = spage[x];
                h_st[x] = DevSeq{(int32_t)sl.paged, sl.win, sl.whead, sl.sink};
            }
    } catch (...) {
        cudaFree(S->mem);
        delete S;
        return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory", fn);
    }
    for (auto &cp : copies)
        if ((e = cudaMemcpyAsync(c->arena + (size_t)cp.second * c->L.page_bytes, c->arena + (size_t)cp.first * c->L.page_bytes,
                                 c->L.page_bytes, cudaMemcpyDeviceToDevice, st)) != cudaSuccess)
            return undo(e, "copy on write");
    for (int i = 0; i < n_seqs; i++)
        for (int l = 0; l < nl; l++) {
            const std::vector<int32_t> &pl = pages[(size_t)i * nl + l];
            if (!pl.empty() && (e = cudaMemcpyAsync(c->table(seq_ids[i], l), pl.data(), pl.size() * 4, cudaMemcpyHostToDevice, st)))
                return undo(e, "page table");
        }
    if ((e = cudaMemcpyAsync(S->d_seqs, seq_ids, (size_t)n_seqs * 4, cudaMemcpyHostToDevice, st)) ||
        (e = cudaMemcpyAsync(S->d_spage, h_spage.data(), h_spage.size() * 4, cudaMemcpyHostToDevice, st)) ||
        (e = cudaMemcpyAsync(S->d_st, h_st.data(), h_st.size() * sizeof(DevSeq), cudaMemcpyHostToDevice, st)) ||
        (e = cudaMemsetAsync(S->d_flag, 0, 4, st)) || (e = cudaMemsetAsync(S->ws, 0, cnt_bytes, st)))
        return undo(e, "state upload");
    // the decode kernel's shared-memory attribute now, not inside a capture
    if ((e = launch_decode_g(c->L.type_k, c->L.type_v, D, S->d_dec, 0, st, c->portable, true)))
        return undo(e, "decode kernel attributes");
    if ((e = cudaStreamSynchronize(st))) return undo(e, "synchronise");
    // commit: the page lists, references, sink pages; the sequences are lent from here on
    c->free_list.resize(fl_pos);
    for (int i = 0; i < n_seqs; i++)
        for (int l = 0; l < nl; l++) {
            const size_t x = (size_t)i * nl + l;
            SeqLayer &sl = c->seqs[seq_ids[i]][l];
            for (size_t k = 0; k < pages[x].size(); k++) {
                if (k < sl.pages.size()) {
                    if (sl.pages[k] == pages[x][k]) continue;
                    c->refcnt[sl.pages[k]]--;  // a copy on write: others still reference the original
                }
                c->refcnt[pages[x][k]] = 1;
            }
            sl.pages.swap(pages[x]);
            if (spage[x] != sl.spage) {
                if (sl.spage >= 0) c->refcnt[sl.spage]--;
                sl.spage = spage[x];
                c->refcnt[sl.spage] = 1;
            }
        }
    S->c = c;
    S->n = n_seqs;
    S->p = *p;
    S->kv_dtype = kv_dtype, S->qo = qo;
    S->max_tokens = max_tokens;
    for (int i = 0; i < n_seqs; i++) c->lent[seq_ids[i]] = 1;
    c->plan = S;
    *out = S;
    return KVQ_OK;
}

extern "C" kvq_status kvq_cuda_static_step(kvq_cuda_static *S, int layer, const void *k, const void *v, const void *q,
                                           void *out, kvq_cuda_stream stream) {
    const char *fn = "kvq_cuda_static_step";
    if (!S) return fail(KVQ_ERR_NULL, "%s: plan is NULL", fn);
    kvq_cuda_cache *c = S->c;
    kvq_status s;
    if ((s = check_layer(c, layer, fn))) return s;
    if (!k || !v || !q || !out) return fail(KVQ_ERR_NULL, "%s: k, v, q or out is NULL", fn);
    // no DevGuard unless needed: nothing here may synchronise or allocate (a stream capture may be under way)
    int cur = -1;
    cudaGetDevice(&cur);
    if (cur != c->device) cudaSetDevice(c->device);
    cudaStream_t st = (cudaStream_t)stream;
    const int H = c->L.n_kv_heads, D = c->L.head_dim, n = S->n;
    cudaError_t e = cudaSuccess;
    kvq_dtype dt = S->kv_dtype;
    if (c->cfg.rotate) {  // as kvq_cuda_append: K and V into the rotated frame, fp32
        e = rotate_inputs(c, layer, k, v, dt, (int64_t)n * H, S->rk, S->rv, st);
        k = S->rk, v = S->rv, dt = KVQ_DTYPE_F32;
    }
    const bool rv = c->rotated(KVQ_VALUE), ro = rv && !c->fuse_rot;
    StaticPlanArgs P;
    memset(&P, 0, sizeof P);
    P.arena = c->arena;
    P.page_bytes = (int64_t)c->L.page_bytes, P.max_tokens = S->max_tokens, P.win_elems = (int64_t)c->win_elems();
    P.v_off = (int32_t)c->L.v_offset, P.H = H, P.D = D, P.Gq = S->p.n_q_heads / H, P.nqh = S->p.n_q_heads;
    P.wcap = c->wcap, P.Gf = c->Gf, P.S = c->S, P.SR = c->SR, P.n = n, P.nl = c->cfg.n_layers, P.layer = layer;
    P.max_pages = (int32_t)c->max_pages, P.n_sm = c->n_sm, P.window = S->p.window;
    P.dtype = dt;
    const uintptr_t va = dt == KVQ_DTYPE_F32 ? 16 : 8;
    P.vec = (uintptr_t)k % va == 0 && (uintptr_t)v % va == 0;
    P.qnorm = c->cfg.qnorm;
    P.lv = c->lv;
    P.qo_dtype = ro ? KVQ_DTYPE_F32 : S->qo, P.q_dtype = S->qo;
    P.rot_q = c->rotated(KVQ_KEY);
    if (P.rot_q) P.rq = c->rot_k[layer];
    P.rot_o = rv && c->fuse_rot;
    if (P.rot_o) P.ro = c->rot_v[layer];
    P.win_first = c->win_first;
    P.ww = c->ww;  // 0: plan_kernel takes win_weight's, as kvq_cuda_attn_decode does
    P.qscale = attn_qscale(&S->p, D);
    P.softcap = S->p.softcap;
    P.windows = c->windows, P.tables = c->tables;
    P.seqs = S->d_seqs, P.spage = S->d_spage, P.st = S->d_st, P.flag = S->d_flag;
    P.k = k, P.v = v, P.q = q, P.out = ro ? (void *)S->so : out;
    const size_t cnt_bytes = ws_counter_bytes(H);
    P.cnt = (int32_t *)S->ws;
    P.part = (float *)((char *)S->ws + cnt_bytes);
    P.part_ml = P.part + S->ws_slots * P.Gq * D;
    P.gflush = S->d_flush, P.gwin = S->d_win, P.gsink = S->d_sink, P.gdec = S->d_dec;
    if (e == cudaSuccess) e = launch_plan(P, st);
    if (e == cudaSuccess && c->S > 0) e = launch_sinks_g(S->d_sink, n, st);
    if (e == cudaSuccess) e = launch_append_g(c->L.type_k, c->L.type_v, D, S->d_flush, S->d_win, n, H, st);
    if (e == cudaSuccess) e = launch_decode_g(c->L.type_k, c->L.type_v, D, S->d_dec, c->n_sm, st, c->portable, false);
    if (e == cudaSuccess && ro) {
        e = unrotate_outputs(c, layer, S->so, out, S->qo, (int64_t)n * S->p.n_q_heads, st);
    }
    if (cur >= 0 && cur != c->device) cudaSetDevice(cur);
    if (e != cudaSuccess) return fail(KVQ_ERR_CUDA, "%s: kernel launch: %s", fn, cudaGetErrorString(e));
    return KVQ_OK;
}

extern "C" kvq_status kvq_cuda_static_lengths(kvq_cuda_static *S, int layer, int64_t *len, kvq_cuda_stream stream) {
    const char *fn = "kvq_cuda_static_lengths";
    if (!S || !len) return fail(KVQ_ERR_NULL, "%s: plan or len is NULL", fn);
    kvq_cuda_cache *c = S->c;
    kvq_status s;
    if ((s = check_layer(c, layer, fn))) return s;
    std::vector<DevSeq> h;
    try {
        h.resize((size_t)S->n * c->cfg.n_layers);
    } catch (...) {
        return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory", fn);
    }
    DevGuard dg(c->device);
    cudaStream_t st = (cudaStream_t)stream;
    CUDA_TRY(cudaMemcpyAsync(h.data(), S->d_st, h.size() * sizeof(DevSeq), cudaMemcpyDeviceToHost, st), fn);
    CUDA_TRY(cudaStreamSynchronize(st), fn);
    for (int i = 0; i < S->n; i++) {
        const DevSeq &d = h[(size_t)i * c->cfg.n_layers + layer];
        len[i] = (int64_t)d.sink + d.paged + d.win;
    }
    return KVQ_OK;
}

extern "C" kvq_status kvq_cuda_static_end(kvq_cuda_static *S, kvq_cuda_stream stream) {
    const char *fn = "kvq_cuda_static_end";
    if (!S) return KVQ_OK;
    kvq_cuda_cache *c = S->c;
    const int nl = c->cfg.n_layers;
    std::vector<DevSeq> h;
    int32_t flag = 0;
    try {
        h.resize((size_t)S->n * nl);
    } catch (...) {
        return fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no host memory (the plan stays)", fn);
    }
    DevGuard dg(c->device);
    cudaStream_t st = (cudaStream_t)stream;
    cudaError_t e = cudaMemcpyAsync(h.data(), S->d_st, h.size() * sizeof(DevSeq), cudaMemcpyDeviceToHost, st);
    if (e == cudaSuccess) e = cudaMemcpyAsync(&flag, S->d_flag, 4, cudaMemcpyDeviceToHost, st);
    if (e == cudaSuccess) e = cudaStreamSynchronize(st);
    // On a CUDA error the device state is lost with the context: the sequences go back as they were lent.
    const bool ok = e == cudaSuccess;
    for (int i = 0; i < S->n; i++)
        for (int l = 0; l < nl; l++) {
            SeqLayer &sl = c->seqs[S->seqs[i]][l];
            if (ok) {
                const DevSeq &d = h[(size_t)i * nl + l];
                sl.paged = d.paged, sl.win = d.win, sl.whead = d.whead, sl.sink = d.sink;
            }
            // the reservation past the sequence's end goes back, as does a sink page that received nothing
            const size_t keep = (size_t)((sl.paged + PT - 1) / PT);
            for (size_t k = keep; k < sl.pages.size(); k++) page_unref(c, sl.pages[k]);
            sl.pages.resize(keep);
            if (sl.sink == 0 && sl.spage >= 0) page_unref(c, sl.spage), sl.spage = -1;
        }
    static_release(S);
    if (!ok) return fail(KVQ_ERR_CUDA, "%s: reading the device state: %s", fn, cudaGetErrorString(e));
    if (flag) return fail(KVQ_ERR_CACHE_FULL, "%s: a step found a sequence at max_tokens: its token was not stored", fn);
    return KVQ_OK;
}
