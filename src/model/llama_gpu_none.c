/* llama_gpu.h in a build without CUDA: every entry point says so (KVQ_ERR_NO_DEVICE), nothing else. */
#include "llama_gpu.h"

#include "model_err.h"

#define NO_CUDA kvqm_fail(KVQ_ERR_NO_DEVICE, "kvq was built without CUDA (cmake -DKVQ_CUDA=ON on a machine with nvcc)")

int llama_gpu_built(void) { return 0; }
kvq_status llama_gpu_mem_info(int device, size_t *free_bytes, size_t *total_bytes) { return NO_CUDA; }
kvq_status llama_gpu_load(const gguf_file *f, int device, llama_gpu_model **out) {
    if (out) *out = NULL;
    return NO_CUDA;
}
void llama_gpu_free(llama_gpu_model *m) {}
const llama_config *llama_gpu_config(const llama_gpu_model *m) { return NULL; }
size_t llama_gpu_weight_bytes(const llama_gpu_model *m) { return 0; }
kvq_status llama_gpu_ctx_create(const llama_gpu_model *m, const llama_ctx_params *p, llama_gpu_ctx **out) {
    if (out) *out = NULL;
    return NO_CUDA;
}
void llama_gpu_ctx_free(llama_gpu_ctx *c) {}
kvq_status llama_gpu_ctx_reset(llama_gpu_ctx *c) { return NO_CUDA; }
int64_t llama_gpu_ctx_pos(const llama_gpu_ctx *c) { return 0; }
kvq_status llama_gpu_ctx_set_window(llama_gpu_ctx *c, int window) { return NO_CUDA; }
kvq_status llama_gpu_ctx_stats(const llama_gpu_ctx *c, kvq_cache_stats *st) { return NO_CUDA; }
size_t llama_gpu_ctx_device_bytes(const llama_gpu_ctx *c) { return 0; }
kvq_status llama_gpu_forward(llama_gpu_ctx *c, const int32_t *tokens, int n, float *logits, int logits_from) { return NO_CUDA; }
kvq_status llama_gpu_sync(llama_gpu_ctx *c) { return NO_CUDA; }
kvq_status llama_gpu_ctx_create_par(const llama_gpu_model *m, const llama_ctx_params *p, int n_seqs, llama_gpu_ctx **out) {
    if (out) *out = NULL;
    return NO_CUDA;
}
int64_t llama_gpu_ctx_seq_pos(const llama_gpu_ctx *c, int seq) { return 0; }
kvq_status llama_gpu_forward_seq(llama_gpu_ctx *c, int seq, const int32_t *tokens, int n, float *logits, int logits_from) {
    return NO_CUDA;
}
kvq_status llama_gpu_decode_batch(llama_gpu_ctx *c, const int32_t *tokens, float *logits) { return NO_CUDA; }
kvq_status llama_gpu_ctx_set_graph(llama_gpu_ctx *c, int on) { return NO_CUDA; }
int llama_gpu_ctx_graphs(const llama_gpu_ctx *c) { return 0; }
kvq_status llama_gpu_ctx_set_static(llama_gpu_ctx *c, int on) { return NO_CUDA; }
int llama_gpu_ctx_step_graphs(const llama_gpu_ctx *c) { return 0; }
