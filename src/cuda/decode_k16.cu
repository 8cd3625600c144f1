// Decode kernels with F16 and BF16 keys, every value type and head dim (see decode.cu)
#include "decode.cuh"

namespace kvqc {
template cudaError_t launch_decode_k<KVQ_TYPE_F16>(int, int, const DecodeArgs &, cudaStream_t, bool);
template cudaError_t launch_decode_k<KVQ_TYPE_BF16>(int, int, const DecodeArgs &, cudaStream_t, bool);
}  // namespace kvqc
