// Decode kernels of static plans (arguments in device memory, kvq_cuda.h section 5) with Q4 and Q2 keys, every value
// type and head dim: their own file so that they compile in parallel with decode_k42.cu
#include "decode.cuh"

namespace kvqc {
template cudaError_t launch_decode_gk<KVQ_TYPE_Q4>(int, int, const DecodeArgs *, int, cudaStream_t, bool, bool);
template cudaError_t launch_decode_gk<KVQ_TYPE_Q2>(int, int, const DecodeArgs *, int, cudaStream_t, bool, bool);
}  // namespace kvqc
