/* kvq capacity: what fits in a memory budget (--mem), or what N tokens need (--ctx), per KV type, counting what
 * `kvq run` holds: the weights (the GGUF's matrices as they are in the file, mapped, and fp32 norms), its activation,
 * weight-product and logits buffers, the KV pages (libkvq's arena for the tokens) and the fp16 residual windows (at
 * their largest), for --parallel sequences. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "gguf.h"
#include "llama.h"
#include "model_err.h"

static const char *const MIXES[] = {"f16", "bf16", "fp8", "q8", "q8/q4", "q4", "q4/q2", "q2"};
#define N_MIXES (int)(sizeof MIXES / sizeof MIXES[0])

int kvq_cli_capacity(int argc, char **argv) {
    kvq_cli_opts o;
    int r = kvq_cli_parse_or_exit(KVQ_CLI_CAP, argc, argv, &o);
    if (r >= 0) return r;
    gguf_file *gf = NULL;
    kvq_status st = gguf_open(o.model, &gf);
    if (st) return kvq_cli_die(KVQ_CLI_CAP, "loading the model", st);
    llama_config mc;
    size_t weights = 0, file_bytes = gf->size;
    if (!(st = llama_read_config(gf, &mc))) st = llama_weight_bytes(gf, &mc, &weights);
    gguf_close(gf);
    if (st) return kvq_cli_die(KVQ_CLI_CAP, "reading the model's shape", st);

    /* What kvq run allocates besides the cache: the context's scratch, the logits and the sampler's scratch. */
    double buffers = (double)llama_ctx_scratch_bytes(&mc, o.batch) + (double)mc.vocab_size * (sizeof(float) + sizeof(kvq_cli_prob));
    double fixed = (double)weights + buffers;
    int P = o.parallel;
    char w[32], b[32], fb[32], tot[32];
    kvq_cli_fmt_bytes((double)weights, w, sizeof w);
    kvq_cli_fmt_bytes(buffers, b, sizeof b);
    kvq_cli_fmt_bytes((double)file_bytes, fb, sizeof fb);
    printf("model: %d layers x %d KV heads x head_dim %d, trained context %d tokens\n", mc.n_layers, mc.n_kv_heads,
           mc.head_dim, mc.ctx_len);
    printf("fixed: weights %s (the matrices as stored in the GGUF file of %s, mapped, + fp32 norms) + buffers %s\n", w,
           fb, b);
    kvq_cli_mix mixes[N_MIXES];
    for (int i = 0; i < N_MIXES; i++) {
        kvq_cli_opts tmp = o;
        char err[KVQ_CLI_ERR_LEN];
        if (kvq_cli_parse_compare(MIXES[i], &tmp, err, sizeof err)) {
            fprintf(stderr, "kvq capacity: internal error: %s\n", err);
            return 1;
        }
        mixes[i] = tmp.compare[0];
    }
    int rc = 0, n_growing = 0; /* layers whose KV grows with the context: a sliding-window layer's stops at its window */
    for (int l = 0; l < mc.n_layers; l++) n_growing += !llama_layer_is_local(&mc, l);
    if (o.ctx) {
        /* The reverse question: memory for --ctx tokens in each of --parallel sequences. */
        printf("memory for %d sequence%s of %d tokens:\n", P, P > 1 ? "s" : "", o.ctx);
        printf("| KV (K/V) | KV pages     | residual windows | total (with fixed) | KV vs f16 |\n"
               "|----------|--------------|------------------|--------------------|-----------|\n");
        double f16kv = 0;
        for (int i = 0; i < N_MIXES; i++) {
            double pg, win;
            if ((st = kvq_cli_model_kv_bytes(&mc, &mixes[i], P, o.ctx, o.batch, &pg, &win))) {
                printf("| %-8s | rejected: %s: %s |\n", mixes[i].name, kvq_strerror(st), kvq_last_error());
                rc = 1;
                continue;
            }
            pg *= P, win *= P;
            if (i == 0) f16kv = pg + win;
            char a[32], c[32];
            kvq_cli_fmt_bytes(pg, a, sizeof a);
            kvq_cli_fmt_bytes(win, c, sizeof c);
            kvq_cli_fmt_bytes(fixed + pg + win, tot, sizeof tot);
            printf("| %-8s | %12s | %16s | %18s | %8.3fx |\n", mixes[i].name, a, c, tot, f16kv > 0 ? (pg + win) / f16kv : 0.0);
        }
        if (o.ctx > mc.ctx_len)
            fprintf(stderr, "kvq capacity: warning: %d tokens is past the model's trained context (%d): quality beyond it "
                            "is not what the model was trained for\n", o.ctx, mc.ctx_len);
        return rc;
    }
    char ms[32];
    kvq_cli_fmt_bytes(o.mem, ms, sizeof ms);
    printf("budget %s for %d sequence%s:\n", ms, P, P > 1 ? "s" : "");
    printf("| KV (K/V) | KV bytes/token | max tokens/seq | used (with fixed) | vs f16 |\n"
           "|----------|----------------|----------------|-------------------|--------|\n");
    int64_t f16max = 0, best = 0;
    int past = 0;
    for (int i = 0; i < N_MIXES; i++) {
        double pg, win;
        if ((st = kvq_cli_model_kv_bytes(&mc, &mixes[i], P, 1, o.batch, &pg, &win))) {
            printf("| %-8s | rejected: %s: %s |\n", mixes[i].name, kvq_strerror(st), kvq_last_error());
            rc = 1;
            continue;
        }
        double bpt = (kvq_type_bytes_per_token(mixes[i].type_k, KVQ_KEY, mc.head_dim, mixes[i].group) +
                      kvq_type_bytes_per_token(mixes[i].type_v, KVQ_VALUE, mc.head_dim, mixes[i].group)) *
                     mc.n_kv_heads * n_growing;
        /* Largest n whose pages and windows fit: kvq_cache_arena_bytes_for is monotone in n. */
        int64_t lo = 0, hi = (int64_t)1 << 40;
        while (lo < hi) {
            int64_t mid = lo + (hi - lo + 1) / 2;
            /* the config is valid (1 token passed above): a failure here means more pages than a cache can have
             * (kvq_cache_arena_bytes_for's INT32_MAX-page limit), which does not fit either */
            if (kvq_cli_model_kv_bytes(&mc, &mixes[i], P, mid, o.batch, &pg, &win)) hi = mid - 1;
            else if (fixed + P * (pg + win) <= o.mem) lo = mid;
            else hi = mid - 1;
        }
        if (lo < 1) {
            printf("| %-8s | %14.0f | does not fit   |                   |        |\n", mixes[i].name, bpt);
            continue;
        }
        kvq_cli_model_kv_bytes(&mc, &mixes[i], P, lo, o.batch, &pg, &win);
        if (i == 0) f16max = lo;
        if (lo > best) best = lo;
        past |= lo > mc.ctx_len;
        kvq_cli_fmt_bytes(fixed + P * (pg + win), tot, sizeof tot);
        char vs[16] = "     -";
        if (f16max) snprintf(vs, sizeof vs, "%5.2fx", (double)lo / (double)f16max);
        printf("| %-8s | %14.0f | %13lld%s | %17s | %6s |\n", mixes[i].name, bpt, (long long)lo, lo > mc.ctx_len ? "*" : " ",
               tot, vs);
    }
    if (past)
        fprintf(stderr, "kvq capacity: warning: * = past the model's trained context (%d tokens): the memory holds more "
                        "than the model was trained to use\n", mc.ctx_len);
    if (best < 1) {
        double pg = 0, win = 0;
        const kvq_cli_mix *q2 = &mixes[N_MIXES - 1];
        kvq_cli_model_kv_bytes(&mc, q2, P, 1, o.batch, &pg, &win);
        char need[32];
        kvq_cli_fmt_bytes(fixed + P * (pg + win), need, sizeof need);
        fprintf(stderr, "kvq capacity: --mem %s is too small: the weights (%s), buffers (%s) and %d sequence%s of one q2 "
                        "token need %s\n", ms, w, b, P, P > 1 ? "s" : "", need);
        return 1;
    }
    return rc;
}
