/* A Q4 KV cache for a model with Llama-3-8B attention shapes (32 layers, 32 query heads, 8 KV heads of 128):
 * 256 decode steps of one sequence, each appending the token's K/V to every layer and running attention on the
 * quantized pages. Build: cc app.c $(pkg-config --cflags --libs kvq) -lm */
#include <kvq.h>
#include <math.h>
#include <stdio.h>

enum { LAYERS = 32, Q_HEADS = 32, KV_HEADS = 8, D = 128, STEPS = 256 };

static int fail(const char *what) {
    fprintf(stderr, "%s: %s\n", what, kvq_last_error());
    return 1;
}

int main(void) {
    kvq_cache_config cfg = kvq_cache_config_default();
    cfg.n_layers = LAYERS, cfg.n_kv_heads = KV_HEADS, cfg.head_dim = D;
    cfg.type_k = KVQ_TYPE_Q4, cfg.type_v = KVQ_TYPE_Q4;
    cfg.arena_bytes = kvq_cache_arena_bytes_for(&cfg, STEPS); /* pages for STEPS tokens in every layer */
    kvq_cache *cache;
    int32_t seq;
    if (kvq_cache_create(&cfg, &cache) || kvq_seq_new(cache, &seq)) return fail("create");

    static float k[KV_HEADS * D], v[KV_HEADS * D], q[Q_HEADS * D], out[Q_HEADS * D];
    kvq_attn_params p = kvq_attn_params_default(Q_HEADS);
    for (int step = 0; step < STEPS; step++) {
        for (int layer = 0; layer < LAYERS; layer++) {
            /* stand-ins for the model's K, V (in [-1, 1]) and Q of this token and layer */
            for (int i = 0; i < KV_HEADS * D; i++) k[i] = sinf(0.1f * i + step), v[i] = cosf(0.3f * i * (step + layer));
            for (int i = 0; i < Q_HEADS * D; i++) q[i] = sinf(0.7f * i + layer);
            int32_t n = 1;
            if (kvq_append(cache, layer, 1, &seq, &n, KVQ_DTYPE_F32, k, v)) return fail("append");
            if (kvq_attn_decode(cache, layer, 1, &seq, q, out, &p)) return fail("attention");
            /* out is a softmax-weighted mean of V rows, so it stays within their range (plus rounding) */
            for (int i = 0; i < Q_HEADS * D; i++)
                if (!isfinite(out[i]) || fabsf(out[i]) > 1.01f) {
                    fprintf(stderr, "bad output %g at step %d, layer %d, [%d]\n", out[i], step, layer, i);
                    return 1;
                }
        }
    }
    kvq_cache_stats st;
    kvq_cache_get_stats(cache, &st);
    printf("kvq %s (%s kernels): %lld tokens, %.0f KV bytes/token (F16: %.0f), out[0] = %.4f\n", kvq_version_string(),
           kvq_cpu_backend(), (long long)st.tokens, st.bytes_per_token, st.f16_bytes_per_token, out[0]);
    kvq_cache_free(cache);
    return 0;
}
