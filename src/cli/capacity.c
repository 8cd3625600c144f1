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

/* The default list; --compare replaces it. */
static const char DEFAULT_MIXES[] = "f16,bf16,fp8,q8,q8/q4,q4,q3,q4/q2,q2";

/* The most tokens per sequence whose pages and windows fit in `mem` with `fixed` bytes besides; 0 if none, -1 if the
 * config is rejected. kvq_cache_arena_bytes_for is monotone in the tokens: a bisection. */
static int64_t max_tokens(const llama_config *mc, const kvq_cli_mix *mix, int P, int batch, double fixed, double mem) {
    double pg, win;
    if (kvq_cli_model_kv_bytes(mc, mix, P, 1, batch, &pg, &win)) return -1;
    int64_t lo = 0, hi = (int64_t)1 << 40;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo + 1) / 2;
        /* the config is valid (1 token passed above): a failure here means more pages than a cache can have
         * (kvq_cache_arena_bytes_for's INT32_MAX-page limit), which does not fit either */
        if (kvq_cli_model_kv_bytes(mc, mix, P, mid, batch, &pg, &win)) hi = mid - 1;
        else if (fixed + P * (pg + win) <= mem) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

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
    if (kvq_cli_check_plans(&o, mc.n_layers)) return 1;

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
    /* The configs: --compare's (parsed with the other options), else the default list parsed the same way. The
     * "vs f16" column divides by an f16 cache with the same options on every layer (local layers' types not
     * inherited): the uncompressed cache a user would otherwise hold. */
    kvq_cli_opts lst = o, ref = o;
    char err[KVQ_CLI_ERR_LEN];
    ref.local_types = 0;
    if ((!o.n_compare && kvq_cli_parse_compare(DEFAULT_MIXES, &lst, err, sizeof err)) ||
        kvq_cli_parse_compare("f16", &ref, err, sizeof err)) {
        fprintf(stderr, "kvq capacity: internal error: %s\n", err);
        return 1;
    }
    const kvq_cli_mix *mixes = lst.compare, *f16 = &ref.compare[0];
    const int n_mixes = lst.n_compare;
    int name_w = 8; /* the name column widens to the longest --compare entry */
    for (int i = 0; i < n_mixes; i++)
        if ((int)strlen(mixes[i].name) > name_w) name_w = (int)strlen(mixes[i].name);
    char dash[KVQ_CLI_MIX_NAME + 1];
    memset(dash, '-', (size_t)name_w);
    dash[name_w] = '\0';
    int rc = 0, n_growing = 0; /* layers whose KV grows with the context: a sliding-window layer's stops at its window */
    for (int l = 0; l < mc.n_layers; l++) n_growing += !llama_layer_is_local(&mc, l);
    if (o.ctx) {
        /* The reverse question: memory for --ctx tokens in each of --parallel sequences. */
        printf("memory for %d sequence%s of %d tokens:\n", P, P > 1 ? "s" : "", o.ctx);
        printf("| %-*s | KV pages     | residual windows | total (with fixed) | KV vs f16 |\n"
               "|-%s-|--------------|------------------|--------------------|-----------|\n", name_w, "KV (K/V)", dash);
        double f16kv = 0, pg, win;
        if (!kvq_cli_model_kv_bytes(&mc, f16, P, o.ctx, o.batch, &pg, &win)) f16kv = P * (pg + win);
        for (int i = 0; i < n_mixes; i++) {
            if ((st = kvq_cli_model_kv_bytes(&mc, &mixes[i], P, o.ctx, o.batch, &pg, &win))) {
                printf("| %-*s | rejected: %s: %s |\n", name_w, mixes[i].name, kvq_strerror(st), kvq_last_error());
                rc = 1;
                continue;
            }
            pg *= P, win *= P;
            char a[32], c[32];
            kvq_cli_fmt_bytes(pg, a, sizeof a);
            kvq_cli_fmt_bytes(win, c, sizeof c);
            kvq_cli_fmt_bytes(fixed + pg + win, tot, sizeof tot);
            printf("| %-*s | %12s | %16s | %18s | %8.3fx |\n", name_w, mixes[i].name, a, c, tot,
                   f16kv > 0 ? (pg + win) / f16kv : 0.0);
        }
        if (o.ctx > mc.ctx_len)
            fprintf(stderr, "kvq capacity: warning: %d tokens is past the model's trained context (%d): quality beyond it "
                            "is not what the model was trained for\n", o.ctx, mc.ctx_len);
        return rc;
    }
    char ms[32];
    kvq_cli_fmt_bytes(o.mem, ms, sizeof ms);
    printf("budget %s for %d sequence%s:\n", ms, P, P > 1 ? "s" : "");
    printf("| %-*s | KV bytes/token | max tokens/seq | used (with fixed) | vs f16 |\n"
           "|-%s-|----------------|----------------|-------------------|--------|\n", name_w, "KV (K/V)", dash);
    int64_t f16max = max_tokens(&mc, f16, P, o.batch, fixed, o.mem), best = 0;
    int past = 0, cheapest = -1; /* cheapest: the config whose one token needs the least memory */
    double cheapest_bytes = 0;
    for (int i = 0; i < n_mixes; i++) {
        double pg, win;
        if ((st = kvq_cli_model_kv_bytes(&mc, &mixes[i], P, 1, o.batch, &pg, &win))) {
            printf("| %-*s | rejected: %s: %s |\n", name_w, mixes[i].name, kvq_strerror(st), kvq_last_error());
            rc = 1;
            continue;
        }
        if (cheapest < 0 || pg + win < cheapest_bytes) cheapest = i, cheapest_bytes = pg + win;
        double bpt = (kvq_type_bytes_per_token(mixes[i].type_k, KVQ_KEY, mc.head_dim, mixes[i].group) +
                      kvq_type_bytes_per_token(mixes[i].type_v, KVQ_VALUE, mc.head_dim, mixes[i].group)) *
                     mc.n_kv_heads * n_growing;
        int64_t lo = max_tokens(&mc, &mixes[i], P, o.batch, fixed, o.mem);
        if (lo < 1) {
            printf("| %-*s | %14.0f | does not fit   |                   |        |\n", name_w, mixes[i].name, bpt);
            continue;
        }
        kvq_cli_model_kv_bytes(&mc, &mixes[i], P, lo, o.batch, &pg, &win);
        if (lo > best) best = lo;
        past |= lo > mc.ctx_len;
        kvq_cli_fmt_bytes(fixed + P * (pg + win), tot, sizeof tot);
        char vs[16] = "     -";
        if (f16max > 0) snprintf(vs, sizeof vs, "%5.2fx", (double)lo / (double)f16max);
        printf("| %-*s | %14.0f | %13lld%s | %17s | %6s |\n", name_w, mixes[i].name, bpt, (long long)lo,
               lo > mc.ctx_len ? "*" : " ", tot, vs);
    }
    if (past)
        fprintf(stderr, "kvq capacity: warning: * = past the model's trained context (%d tokens): the memory holds more "
                        "than the model was trained to use\n", mc.ctx_len);
    if (best < 1) {
        if (cheapest < 0) return 1; /* every config rejected: said in the table */
        char need[32];
        kvq_cli_fmt_bytes(fixed + P * cheapest_bytes, need, sizeof need);
        fprintf(stderr, "kvq capacity: --mem %s is too small: the weights (%s), buffers (%s) and %d sequence%s of one "
                        "token need %s with the cheapest config listed (%s)\n", ms, w, b, P, P > 1 ? "s" : "", need,
                mixes[cheapest].name);
        return 1;
    }
    return rc;
}
