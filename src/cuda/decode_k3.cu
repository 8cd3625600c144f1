// Decode kernels with Q3 keys, every value type and head dim (see decode.cu)
#include "decode.cuh"

namespace kvqc {
template cudaError_t launch_decode_k<KVQ_TYPE_Q3>(int, int, const DecodeArgs &, cudaStream_t, bool);
}  // namespace kvqc
