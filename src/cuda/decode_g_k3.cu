// Decode kernels of static plans (arguments in device memory, kvq_cuda.h section 5) with Q3 keys, every value type and
// head dim: their own file so that they compile in parallel with decode_k3.cu
#include "decode.cuh"

namespace kvqc {
template cudaError_t launch_decode_gk<KVQ_TYPE_Q3>(int, int, const DecodeArgs *, int, cudaStream_t, bool, bool);
}  // namespace kvqc
