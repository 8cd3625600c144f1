/* kvq perplexity: perplexity of a text file with one KV config, or a table of several (--compare). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "gguf.h"
#include "llama.h"
#include "model_err.h"
#include "tokenizer.h"

typedef struct ppl_result {
    double ppl, err, nll_mean;
    int64_t n;
    double bytes_per_token, f16_bytes_per_token;
} ppl_result;

/* log-softmax of logits[V] at index `target`. */
static double log_prob(const float *logits, int V, int target) {
    float mx = logits[0];
    for (int i = 1; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    double s = 0;
    for (int i = 0; i < V; i++) s += exp((double)(logits[i] - mx));
    return (double)(logits[target] - mx) - log(s);
}

static void progress(const char *label, int done, int total, double t0) {
    int w = 30, k = total ? done * w / total : w;
    double el = kvq_cli_now() - t0, eta = done ? el / done * (total - done) : 0;
    fprintf(stderr, "\r%-8s [", label);
    for (int i = 0; i < w; i++) fputc(i < k ? '#' : '.', stderr);
    fprintf(stderr, "] %d/%d chunks  %.0fs elapsed, ~%.0fs left ", done, total, el, eta);
    if (done == total) fputc('\n', stderr);
    fflush(stderr);
}

static int run_ppl(const kvq_cli_opts *o, const kvq_cli_loaded *L, const int32_t *ids, int n_chunks, const kvq_cli_mix *mix,
                   ppl_result *res) {
    int ctx = o->ctx, V = L->m->cfg.vocab_size, first = ctx / 2;
    const char *label = mix->name;
    llama_ctx_params cp;
    kvq_cli_ctx_params(o, mix, ctx, &cp);
    llama_ctx *c = NULL;
    kvq_status st = llama_ctx_create(L->m, &cp, &c);
    if (st) return kvq_cli_die(KVQ_CLI_PPL, "creating the context", st);
    float *logits = malloc((size_t)o->batch * (size_t)V * sizeof *logits);
    if (!logits) {
        llama_ctx_free(c);
        return kvq_cli_die(KVQ_CLI_PPL, "allocating logits", kvq_set_error(KVQ_ERR_OUT_OF_MEMORY, "%d x %d floats", o->batch, V));
    }
    double sum = 0, sum2 = 0, t0 = kvq_cli_now();
    int64_t n = 0;
    if (!o->quiet) progress(label, 0, n_chunks, t0);
    for (int ch = 0; ch < n_chunks; ch++) {
        const int32_t *tk_ = ids + (size_t)ch * ctx;
        if ((st = llama_ctx_reset(c))) goto fail;
        for (int b = 0; b < ctx; b += o->batch) {
            int nb = ctx - b < o->batch ? ctx - b : o->batch;
            /* logits at position j predict token j+1; we score tokens first..ctx-1, so need positions first-1.. */
            int from = first - 1 - b;
            if (from < 0) from = 0;
            if ((st = llama_forward(c, tk_ + b, nb, logits, from))) goto fail;
            for (int j = b + from; j < b + nb && j + 1 < ctx; j++) {
                double nll = -log_prob(logits + (size_t)(j - b - from) * V, V, tk_[j + 1]);
                sum += nll;
                sum2 += nll * nll;
                n++;
            }
        }
        if (!o->quiet) progress(label, ch + 1, n_chunks, t0);
    }
    kvq_cache_stats s;
    if ((st = kvq_cache_get_stats(llama_ctx_cache(c), &s))) goto fail;
    res->n = n;
    res->nll_mean = sum / (double)n;
    res->ppl = exp(res->nll_mean);
    double var = n > 1 ? (sum2 / (double)n - res->nll_mean * res->nll_mean) * n / (n - 1) : 0;
    res->err = res->ppl * sqrt(var > 0 ? var / (double)n : 0); /* delta method: d exp(m) = exp(m) dm */
    res->bytes_per_token = s.bytes_per_token;
    res->f16_bytes_per_token = s.f16_bytes_per_token;
    free(logits);
    llama_ctx_free(c);
    return 0;
fail:
    if (!o->quiet) fputc('\n', stderr);
    free(logits);
    llama_ctx_free(c);
    return kvq_cli_die(KVQ_CLI_PPL, "perplexity", st);
}


int kvq_cli_perplexity(int argc, char **argv) {
    kvq_cli_opts o;
    int r = kvq_cli_parse_or_exit(KVQ_CLI_PPL, argc, argv, &o);
    if (r >= 0) return r;
    char err[KVQ_CLI_ERR_LEN];
    size_t len;
    char *text = kvq_cli_read_file(o.file, o.max_file, &len, err, sizeof err);
    if (!text) {
        fprintf(stderr, "kvq perplexity: -f: %s\n", err);
        return 1;
    }
    kvq_cli_loaded L;
    if (kvq_cli_load(&o, &L, 1)) {
        free(text);
        return 1;
    }
    int rc = 0;
    tok_ids ids = {0};
    kvq_status st = tok_encode(L.tok, text, len, 1, &ids);
    free(text);
    if (st) {
        rc = kvq_cli_die(KVQ_CLI_PPL, "tokenizing", st);
        goto done;
    }
    if (o.ctx > L.m->cfg.ctx_len) {
        fprintf(stderr, "kvq perplexity: -c/--ctx-size %d exceeds the model's context_length %d\n", o.ctx, L.m->cfg.ctx_len);
        rc = 2;
        goto done;
    }
    if (o.batch > o.ctx) o.batch = o.ctx;
    int n_chunks = (int)(ids.n / (size_t)o.ctx);
    if (o.chunks && o.chunks < n_chunks) n_chunks = o.chunks;
    if (n_chunks < 1) {
        fprintf(stderr, "kvq perplexity: the text has %zu tokens, fewer than one chunk of %d\n", ids.n, o.ctx);
        rc = 1;
        goto done;
    }
    fprintf(stderr, "kvq perplexity: %zu tokens; %d chunks of %d, scoring the last %d of each\n", ids.n, n_chunks, o.ctx,
            o.ctx - o.ctx / 2);
    if (!o.n_compare) {
        ppl_result res;
        kvq_cli_mix single = kvq_cli_single_mix(&o);
        const char *label = single.name;
        if ((rc = run_ppl(&o, &L, ids.ids, n_chunks, &single, &res))) goto done;
        printf("PPL = %.4f +/- %.4f  (KV %s, ctx %d, %d chunks, %lld scored tokens, %.0f KV bytes/token)\n", res.ppl,
               res.err, label, o.ctx, n_chunks, (long long)res.n, res.bytes_per_token);
        goto done;
    }
    /* --compare: one row per entry, same tokens; deltas against the first f16/f16 row if any, else the first row. */
    ppl_result rs[KVQ_CLI_MAX_COMPARE];
    int base = -1;
    for (int i = 0; i < o.n_compare; i++) {
        const kvq_cli_mix *m = &o.compare[i];
        if ((rc = run_ppl(&o, &L, ids.ids, n_chunks, m, &rs[i])))
            goto done;
        if (base < 0 && m->type_k == KVQ_TYPE_F16 && m->type_v == KVQ_TYPE_F16) base = i;
    }
    if (base < 0) base = 0;
    printf("ctx %d, %d chunks, %lld scored tokens\n", o.ctx, n_chunks, (long long)rs[0].n);
    printf("| KV (K/V)  | PPL                  | dPPL vs %-5s | KV bytes/token | vs F16 |\n", o.compare[base].name);
    printf("|-----------|----------------------|---------------|----------------|--------|\n");
    for (int i = 0; i < o.n_compare; i++)
        printf("| %-9s | %8.4f +/- %-7.4f | %+12.3f%% | %14.0f | %5.3fx |\n", o.compare[i].name, rs[i].ppl, rs[i].err,
               100.0 * (rs[i].ppl / rs[base].ppl - 1.0), rs[i].bytes_per_token,
               rs[i].bytes_per_token / rs[i].f16_bytes_per_token);
done:
    tok_ids_free(&ids);
    kvq_cli_unload(&L);
    return rc;
}
