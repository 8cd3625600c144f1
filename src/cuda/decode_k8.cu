// Decode kernels with Q8 and FP8 keys, every value type and head dim (see decode.cu)
#include "decode.cuh"

namespace kvqc {
template cudaError_t launch_decode_k<KVQ_TYPE_Q8>(int, int, const DecodeArgs &, cudaStream_t, bool);
template cudaError_t launch_decode_k<KVQ_TYPE_FP8>(int, int, const DecodeArgs &, cudaStream_t, bool);
}  // namespace kvqc
