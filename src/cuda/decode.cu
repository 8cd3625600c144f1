// launch_decode: the decode kernels (decode.cuh) for a cache's key type, value type and head dim. Each key type's
// kernels are instantiated in one of decode_k*.cu, so that the 72 kernels compile in parallel.
#include "common.cuh"

namespace kvqc {

cudaError_t launch_decode(int tk, int tv, int D, const DecodeArgs &a, cudaStream_t st) {
    switch (tk) {
    case KVQ_TYPE_F16: return launch_decode_k<KVQ_TYPE_F16>(tv, D, a, st);
    case KVQ_TYPE_BF16: return launch_decode_k<KVQ_TYPE_BF16>(tv, D, a, st);
    case KVQ_TYPE_Q8: return launch_decode_k<KVQ_TYPE_Q8>(tv, D, a, st);
    case KVQ_TYPE_FP8: return launch_decode_k<KVQ_TYPE_FP8>(tv, D, a, st);
    case KVQ_TYPE_Q4: return launch_decode_k<KVQ_TYPE_Q4>(tv, D, a, st);
    default: return launch_decode_k<KVQ_TYPE_Q2>(tv, D, a, st);
    }
}

}  // namespace kvqc
