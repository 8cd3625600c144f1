// launch_decode: the decode kernels (decode.cuh) for a cache's key type, value type and head dim. Each key type's
// kernels are instantiated in a file of their own, decode_k_<type>.cu (and decode_g_<type>.cu for static plans), which
// src/cuda/CMakeLists.txt generates, so that the 294 kernels (49 type pairs x 3 head dims x Hopper and portable; as
// many again for static plans) compile in parallel.
#include "common.cuh"

namespace kvqc {

cudaError_t launch_decode(int tk, int tv, int D, const DecodeArgs &a, cudaStream_t st, bool portable) {
    return with_type(tk, [&](auto K) { return launch_decode_k<decltype(K)::value>(tv, D, a, st, portable); });
}

cudaError_t launch_decode_g(int tk, int tv, int D, const DecodeArgs *a, int grid, cudaStream_t st, bool portable,
                            bool setup_only) {
    return with_type(tk, [&](auto K) {
        return launch_decode_gk<decltype(K)::value>(tv, D, a, grid, st, portable, setup_only);
    });
}

}  // namespace kvqc
