// Decode kernels with Q4 and Q2 keys, every value type and head dim (see decode.cu)
#include "decode.cuh"

namespace kvqc {
template cudaError_t launch_decode_k<KVQ_TYPE_Q4>(int, int, const DecodeArgs &, cudaStream_t, bool);
template cudaError_t launch_decode_k<KVQ_TYPE_Q2>(int, int, const DecodeArgs &, cudaStream_t, bool);
}  // namespace kvqc
