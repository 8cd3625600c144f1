/* kvq perplexity: perplexity of a text file with one KV config, or a table of several (--compare) with the KL
 * divergence of each config's next-token distributions from the F16 cache's (llama.cpp's --kl-divergence).
 *
 * --compare runs batch-major: every config has its own context, all alive at once, and each batch of a chunk goes
 * through the F16 base first, then through every other config. The base's logits for the batch are still in memory
 * when a config's come out, so the KL divergence is computed from both fp32 logit rows exactly, with nothing stored
 * between batches (no fp16 log-prob file as in llama.cpp). Peak memory: the weights, one context per config (KV
 * arena for ctx tokens + activation scratch for -b tokens) and three [b][vocab] fp32 buffers (base logits, base
 * probabilities, a config's logits): -b 256 x 49152 (SmolLM2) x 4 B x 3 = 151 MB. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "gguf.h"
#include "llama.h"
#include "model_err.h"
#include "tokenizer.h"

typedef struct ppl_acc {
    kvq_cli_ctx c;
    double nll, nll2, kld;
    int64_t n, top1;
    double *kld_tok; /* per scored token, for the 99th percentile (NULL for the base) */
    double bytes_per_token, f16_bytes_per_token; /* pages in use + windows (and sinks), / ctx, after a full chunk */
    int stats_done;
} ppl_acc;

/* log-sum-exp of logits[V] (double) and the index of the largest logit (the first one on ties). */
static double lse_argmax(const float *logits, int V, int *arg) {
    int a = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[a]) a = i;
    float mx = logits[a];
    double s = 0;
    for (int i = 0; i < V; i++) s += exp((double)(logits[i] - mx));
    *arg = a;
    return (double)mx + log(s);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The p-quantile (0..1) of v[0..n-1] (sorted in place), linear between order statistics. */
static double quantile(double *v, int64_t n, double p) {
    if (n <= 0) return 0;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    double x = p * (double)(n - 1);
    int64_t i = (int64_t)x;
    if (i >= n - 1) return v[n - 1];
    return v[i] + (x - (double)i) * (v[i + 1] - v[i]);
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

/* Runs every config of mixes[0..n_mix-1] over the chunks; mixes[base] is the KLD reference (base < 0: no KLD). */
static int run_all(const kvq_cli_opts *o, const kvq_cli_loaded *L, const int32_t *ids, int n_chunks, const kvq_cli_mix *mixes,
                   int n_mix, int base, ppl_acc *acc) {
    int ctx = o->ctx, V = L->cfg->vocab_size, first = ctx / 2, rc = 0;
    kvq_status st = KVQ_OK;
    float *lb = NULL, *pb = NULL, *lq = NULL;
    double *lse_b = NULL, *psum_b = NULL;
    int *arg_b = NULL;
    int64_t per_cfg = (int64_t)n_chunks * (ctx - first);
    /* Every context is created before anything runs: a config the library rejects stops the command at once. */
    for (int i = 0; i < n_mix; i++) {
        llama_ctx_params cp;
        kvq_cli_ctx_params(o, &mixes[i], ctx, &cp);
        if ((st = kvq_cli_ctx_create(L, &cp, &acc[i].c))) {
            char what[KVQ_CLI_MIX_NAME + 64];
            snprintf(what, sizeof what, "creating the context of %s", mixes[i].name);
            rc = kvq_cli_die(o->cmd, what, st);
            goto done;
        }
        if (base >= 0 && i != base && !(acc[i].kld_tok = malloc((size_t)per_cfg * sizeof(double)))) goto oom;
    }
    size_t rowsz = (size_t)o->batch * (size_t)V;
    lb = malloc(rowsz * sizeof *lb);
    lq = malloc(rowsz * sizeof *lq);
    pb = base >= 0 ? malloc(rowsz * sizeof *pb) : NULL;
    lse_b = malloc((size_t)o->batch * sizeof *lse_b);
    psum_b = malloc((size_t)o->batch * sizeof *psum_b);
    arg_b = malloc((size_t)o->batch * sizeof *arg_b);
    if (!lb || !lq || (base >= 0 && !pb) || !lse_b || !psum_b || !arg_b) goto oom;
    double t0 = kvq_cli_now();
    const char *label = n_mix > 1 ? "all" : mixes[0].name;
    if (!o->quiet) progress(label, 0, n_chunks, t0);
    for (int ch = 0; ch < n_chunks; ch++) {
        const int32_t *tk = ids + (size_t)ch * ctx;
        for (int i = 0; i < n_mix; i++)
            if ((st = kvq_cli_ctx_reset(&acc[i].c))) goto fail;
        for (int b = 0; b < ctx; b += o->batch) {
            int nb = ctx - b < o->batch ? ctx - b : o->batch;
            /* logits at position j predict token j+1; tokens first..ctx-1 are scored, so positions first-1..ctx-2 */
            int from = first - 1 - b;
            if (from < 0) from = 0;
            int rows = 0; /* scored rows of this batch: positions b+from .. min(b+nb, ctx-1)-1 */
            for (int j = b + from; j < b + nb && j + 1 < ctx; j++) rows++;
            /* the base first (its rows stay in lb/pb for the others), then the rest in list order */
            for (int k = -1; k < n_mix; k++) {
                int i = k < 0 ? (base >= 0 ? base : 0) : k;
                if (k >= 0 && i == (base >= 0 ? base : 0)) continue;
                int is_base = base >= 0 && i == base;
                float *lg = is_base ? lb : lq;
                if ((st = kvq_cli_forward(&acc[i].c, tk + b, nb, rows ? lg : NULL, rows ? from : nb))) goto fail;
                for (int r = 0; r < rows; r++) {
                    const float *row = lg + (size_t)r * V;
                    int j = b + from + r, arg;
                    double lse = lse_argmax(row, V, &arg);
                    double nll = lse - (double)row[tk[j + 1]];
                    acc[i].nll += nll;
                    acc[i].nll2 += nll * nll;
                    if (base < 0) {
                        acc[i].n++;
                        continue;
                    }
                    if (is_base) {
                        /* p = softmax of the base row, kept as fp32: KLD = sum p (lb - lq) - (lse_b - lse_q) sum p,
                         * exactly 0 for identical rows, and p's rounding (6e-8 relative) scales with the KLD itself */
                        float *p = pb + (size_t)r * V;
                        double ps = 0;
                        for (int v = 0; v < V; v++) ps += (p[v] = (float)exp((double)row[v] - lse));
                        lse_b[r] = lse;
                        psum_b[r] = ps;
                        arg_b[r] = arg;
                        acc[i].top1++;
                        acc[i].n++;
                        continue;
                    }
                    const float *p = pb + (size_t)r * V, *rb = lb + (size_t)r * V;
                    double s = 0;
                    for (int v = 0; v < V; v++) s += (double)p[v] * ((double)rb[v] - (double)row[v]);
                    double kld = (s - (lse_b[r] - lse) * psum_b[r]) / psum_b[r];
                    acc[i].kld += kld;
                    acc[i].kld_tok[acc[i].n++] = kld;
                    acc[i].top1 += arg == arg_b[r];
                }
            }
        }
        for (int i = 0; i < n_mix; i++) {
            if (acc[i].stats_done) continue;
            kvq_cache_stats s;
            if ((st = kvq_cli_ctx_stats(&acc[i].c, &s))) goto fail;
            /* a full chunk: pages in use (scales included) + fp16 windows and sinks, amortized over ctx tokens */
            acc[i].bytes_per_token = ((double)s.page_bytes_in_use + (double)s.window_bytes) / (double)ctx;
            acc[i].f16_bytes_per_token = s.f16_bytes_per_token;
            acc[i].stats_done = 1;
        }
        if (!o->quiet) progress(label, ch + 1, n_chunks, t0);
    }
    goto done;
oom:
    st = kvq_set_error(KVQ_ERR_OUT_OF_MEMORY, "logit buffers of %d x %d floats", o->batch, V);
fail:
    if (!o->quiet) fputc('\n', stderr);
    rc = kvq_cli_die(o->cmd, "perplexity", st);
done:
    for (int i = 0; i < n_mix; i++) {
        kvq_cli_ctx_free(&acc[i].c);
    }
    free(lb);
    free(lq);
    free(pb);
    free(lse_b);
    free(psum_b);
    free(arg_b);
    return rc;
}

typedef struct ppl_row {
    double ppl, err, dppl, kld, kld99, top1, bpt, f16bpt, bits;
    int64_t n;
} ppl_row;

static ppl_row finish(const ppl_acc *a, int is_base, int have_kld, double bits_den) {
    ppl_row r = {0};
    r.n = a->n;
    double m = a->n ? a->nll / (double)a->n : 0;
    r.ppl = exp(m);
    double var = a->n > 1 ? (a->nll2 / (double)a->n - m * m) * a->n / (a->n - 1) : 0;
    r.err = r.ppl * sqrt(var > 0 ? var / (double)a->n : 0); /* delta method: d exp(m) = exp(m) dm */
    r.kld = r.kld99 = NAN;
    r.top1 = NAN;
    if (have_kld) {
        r.kld = is_base ? 0 : a->kld / (double)a->n;
        r.kld99 = is_base ? 0 : quantile(a->kld_tok, a->n, 0.99);
        r.top1 = a->n ? 100.0 * (double)a->top1 / (double)a->n : 0;
    }
    r.bpt = a->bytes_per_token;
    r.f16bpt = a->f16_bytes_per_token;
    r.bits = 8.0 * r.bpt / bits_den;
    return r;
}

int kvq_cli_ppl_chunks(const kvq_cli_opts *o, const kvq_cli_loaded *L, tok_ids *ids, int *bos) {
    const char *cmd = kvq_cli_cmd_name(o->cmd);
    if (o->ctx > L->cfg->ctx_len) {
        fprintf(stderr, "kvq %s: -c/--ctx-size %d exceeds the model's context_length %d\n", cmd, o->ctx, L->cfg->ctx_len);
        return -2;
    }
    int n_chunks = (int)(ids->n / (size_t)o->ctx);
    if (o->chunks && o->chunks < n_chunks) n_chunks = o->chunks;
    if (n_chunks < 1) {
        fprintf(stderr, "kvq %s: the text has %zu tokens, fewer than one chunk of %d\n", cmd, ids->n, o->ctx);
        return -1;
    }
    /* A model whose tokenizer adds BOS (Gemma: add_bos_token) is lost without it: each chunk starts with BOS in
     * place of its first token, as llama.cpp's perplexity does (the first token is never scored) */
    *bos = tok_add_bos(L->tok) && tok_bos(L->tok) >= 0;
    for (int ch = 0; *bos && ch < n_chunks; ch++) ids->ids[(size_t)ch * o->ctx] = tok_bos(L->tok);
    return n_chunks;
}

int kvq_cli_ppl_eval(const kvq_cli_opts *o, const kvq_cli_loaded *L, const int32_t *ids, int n_chunks,
                     const kvq_cli_mix *mixes, int n_mix, double *kld, double *bits) {
    ppl_acc acc[KVQ_CLI_MAX_COMPARE + 1];
    if (n_mix < 1 || n_mix > KVQ_CLI_MAX_COMPARE + 1) return 2;
    memset(acc, 0, sizeof acc);
    const llama_config *mc = L->cfg;
    double bits_den = 2.0 * mc->n_layers * mc->n_kv_heads * mc->head_dim;
    int rc = run_all(o, L, ids, n_chunks, mixes, n_mix, 0, acc);
    for (int i = 0; !rc && i < n_mix; i++) {
        ppl_row r = finish(&acc[i], i == 0, 1, bits_den);
        kld[i] = r.kld, bits[i] = r.bits;
    }
    for (int i = 0; i < n_mix; i++) free(acc[i].kld_tok);
    return rc;
}

/* One CSV row per config; the columns are a contract with the bench scripts (see kvq perplexity --help). */
static int write_csv(const char *path, const kvq_cli_opts *o, int n_chunks, const kvq_cli_mix *mixes, const ppl_row *rows,
                     int n) {
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        fprintf(stderr, "kvq perplexity: --csv: cannot write '%s'\n", path);
        return 1;
    }
    fprintf(f, "kv,type_k,type_v,ctx,chunks,tokens,ppl,ppl_se,dppl_pct,kld_mean,kld_p99,top1_pct,bytes_per_token,"
               "f16_bytes_per_token,bits_per_element,batch,decode_attn,prefill_exact\n");
    for (int i = 0; i < n; i++) {
        const ppl_row *r = &rows[i];
        fprintf(f, "%s,%s,%s,%d,%d,%lld,%.6f,%.6f,", mixes[i].name, kvq_cli_type_name(mixes[i].type_k),
                kvq_cli_type_name(mixes[i].type_v), o->ctx, n_chunks, (long long)r->n, r->ppl, r->err);
        /* without --compare there is no base: dppl and the KLD columns are empty */
        if (isnan(r->kld)) fprintf(f, ",,,,");
        else fprintf(f, "%.6f,%.8f,%.8f,%.4f,", r->dppl, r->kld, r->kld99, r->top1);
        fprintf(f, "%.2f,%.2f,%.6f,%d,%d,%d\n", r->bpt, r->f16bpt, r->bits, o->batch, o->decode_attn,
                o->prefill_attn > 0);
    }
    if (fclose(f)) {
        fprintf(stderr, "kvq perplexity: --csv: writing '%s' failed\n", path);
        return 1;
    }
    return 0;
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
    ppl_acc acc[KVQ_CLI_MAX_COMPARE + 1];
    memset(acc, 0, sizeof acc);
    tok_ids ids = {0};
    kvq_status st = tok_encode(L.tok, text, len, 1, &ids);
    free(text);
    if (st) {
        rc = kvq_cli_die(KVQ_CLI_PPL, "tokenizing", st);
        goto done;
    }
    if (o.batch > o.ctx) o.batch = o.ctx;
    int bos, n_chunks = kvq_cli_ppl_chunks(&o, &L, &ids, &bos);
    if (n_chunks < 0) {
        rc = -n_chunks;
        goto done;
    }
    fprintf(stderr, "kvq perplexity: %zu tokens; %d chunks of %d%s, scoring the last %d of each\n", ids.n, n_chunks, o.ctx,
            bos ? " (BOS first)" : "", o.ctx - o.ctx / 2);
    const llama_config *mc = L.cfg;
    double bits_den = 2.0 * mc->n_layers * mc->n_kv_heads * mc->head_dim; /* K and V elements per token */
    kvq_cli_mix mixes[KVQ_CLI_MAX_COMPARE + 1];
    ppl_row rows[KVQ_CLI_MAX_COMPARE + 1];
    int n_mix = 0, base = -1;
    if (!o.n_compare) {
        mixes[n_mix++] = kvq_cli_single_mix(&o);
    } else {
        /* F16 is the KLD base: the first f16/f16 entry, else an f16 config (libkvq's defaults) run first anyway */
        for (int i = 0; i < o.n_compare; i++)
            if (base < 0 && o.compare[i].type_k == KVQ_TYPE_F16 && o.compare[i].type_v == KVQ_TYPE_F16) base = i;
        if (base < 0) {
            kvq_cli_opts f = o;
            f.type_k = f.type_v = KVQ_TYPE_F16;
            f.rotate = f.sinks = f.nonuniform = f.prerope = -1;
            mixes[n_mix++] = kvq_cli_single_mix(&f);
            base = 0;
            fprintf(stderr, "kvq perplexity: --compare has no f16 entry: running f16 first as the base of dPPL and KLD\n");
        }
        for (int i = 0; i < o.n_compare; i++) mixes[n_mix++] = o.compare[i];
    }
    if ((rc = run_all(&o, &L, ids.ids, n_chunks, mixes, n_mix, base, acc))) goto done;
    for (int i = 0; i < n_mix; i++) rows[i] = finish(&acc[i], i == base, base >= 0, bits_den);
    for (int i = 0; i < n_mix; i++) rows[i].dppl = base >= 0 ? 100.0 * (rows[i].ppl / rows[base].ppl - 1.0) : NAN;
    if (!o.n_compare) {
        printf("PPL = %.4f +/- %.4f  (KV %s, ctx %d, %d chunks, %lld scored tokens, %.0f KV bytes/token, %.3f bits/element, "
               "batch %d, %s attention)\n", rows[0].ppl, rows[0].err, mixes[0].name, o.ctx, n_chunks, (long long)rows[0].n,
               rows[0].bpt, rows[0].bits, o.batch, o.decode_attn ? "decode" : o.prefill_attn > 0 ? "exact-batch prefill" : "prefill");
    } else {
        int w = 9;
        for (int i = 0; i < n_mix; i++)
            if ((int)strlen(mixes[i].name) > w) w = (int)strlen(mixes[i].name);
        char dash[KVQ_CLI_MIX_NAME + 2];
        memset(dash, '-', (size_t)w + 2);
        dash[w + 2] = '\0';
        printf("ctx %d, %d chunks, %lld scored tokens, batch %d, %s attention; KLD and top-1 against %s\n", o.ctx, n_chunks,
               (long long)rows[0].n, o.batch, o.decode_attn ? "decode" : o.prefill_attn > 0 ? "exact-batch prefill" : "prefill", mixes[base].name);
        printf("| %-*s | PPL                  | dPPL     | KLD mean  | KLD p99   | top-1   | KV bytes/token | bits/elem | vs F16 |\n",
               w, "KV (K/V)");
        printf("|%s|----------------------|----------|-----------|-----------|---------|----------------|-----------|--------|\n",
               dash);
        for (int i = 0; i < n_mix; i++) {
            const ppl_row *x = &rows[i];
            printf("| %-*s | %8.4f +/- %-7.4f | %+7.3f%% | %9.6f | %9.6f | %6.2f%% | %14.1f | %9.3f | %5.3fx |\n", w,
                   mixes[i].name, x->ppl, x->err, x->dppl, x->kld, x->kld99, x->top1, x->bpt, x->bits, x->bpt / x->f16bpt);
        }
    }
    if (o.csv && (rc = write_csv(o.csv, &o, n_chunks, mixes, rows, n_mix))) goto done;
done:
    for (int i = 0; i <= KVQ_CLI_MAX_COMPARE; i++) free(acc[i].kld_tok);
    tok_ids_free(&ids);
    kvq_cli_unload(&L);
    return rc;
}
