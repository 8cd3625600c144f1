/* kvq bench: end-to-end speed of the engine (CPU, or the GPU with --gpu) per KV type: prefill tokens/s, decode
 * tokens/s at each depth (tokens already in the cache), peak host RSS and device memory, and each type's decode
 * speed-up over F16 beside the bound (W + d K_f16) / (W + d K_t) (W: weight bytes the engine reads per token, K_t:
 * KV bytes per cached token of type t, d: depth): a decode step that reads the weights and the cache once at full
 * bandwidth cannot beat it.
 *
 * Per type: one context of max(depths) + n + prefill tokens. Prefill: --prefill tokens from an empty cache in chunks
 * of -b, timed, then the cache is reset. Then for each depth in increasing order: fill the cache up to the depth with
 * synthetic tokens in chunks of -b (real forward passes: projections, RoPE, append, attention), then decode -n tokens
 * one at a time, each step's logits copied to the host as kvq run does, timed. On the GPU the fill's attention may
 * use a sliding window (--fill-window, default 1024): the CUDA prefill reads the cache once per query row
 * (kvq_cuda.h), so an exact fill of 32k tokens would take most of an hour; the window changes the fill's activations
 * (what the cache holds), not its size, and decode is always exact. The CSV says which fill each row had. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "cli.h"
#include "gguf.h"
#include "llama.h"
#include "llama_gpu.h"
#include "model_err.h"

void openblas_set_num_threads(int num_threads);

#define MAX_DEPTHS 16
#define WARM 2 /* untimed decode steps before the timed ones at each depth */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct bench_row {
    int depth;
    double decode_s; /* per token */
    double prefill_tok_s;
    double kv_bpt, f16_bpt; /* K+V page bytes per cached token (all layers) */
} bench_row;

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvq bench -m MODEL [--gpu] [--types LIST] [--depths LIST] [-n N] [--prefill N] [-b N] [--out DIR]\n"
            "End-to-end prefill and decode speed per KV type at several depths, with each type's decode speed-up over\n"
            "f16 and the bound (W + d K_f16) / (W + d K_t) beside it (src/cli/bench.c says how it measures).\n\n"
            "  -m, --model FILE        GGUF model (kvq gen-model writes ones of real shapes)\n"
            "  --gpu, -ngl N           the GPU engine (-ngl N > 0: every layer; no partial offload)\n"
            "  --types LIST            KV configs as in kvq perplexity --compare (default f16,q8,q4,q2); the ratios\n"
            "                          are to the first f16 entry (none without one)\n"
            "  --depths LIST           tokens in the cache before decoding (default 0,4096,32768)\n"
            "  -n N                    decode steps timed per depth, after 2 untimed ones (default 32; the median counts)\n"
            "  --prefill N             tokens of the timed prefill from an empty cache (default 2048 GPU, 256 CPU)\n"
            "  -b, --batch-size N      tokens per forward call in prefill and fill (default 512 GPU, 256 CPU)\n"
            "  --batch N, --parallel N sequences decoded at once (GPU; default 1): each filled to the depth with its own\n"
            "                          tokens, then one decode step of all of them per forward (llama_gpu_decode_batch)\n"
            "  --fill-window W         GPU: sliding attention window of the fill, 0 = exact (default 1024)\n"
            "  -t, --threads N         CPU threads (BLAS and attention)\n"
            "  -s, --seed N            seed of the synthetic tokens (default 1)\n"
            "  --out DIR               write DIR/bench-e2e-{cpu,gpu}.csv and .md\n");
}

static double peak_rss(void) {
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) == 0 ? (double)ru.ru_maxrss * 1024.0 : 0;
}

static double dev_used(int gpu, double *peak) {
    size_t fr, tot;
    if (!gpu || llama_gpu_mem_info(0, &fr, &tot)) return 0;
    double u = (double)(tot - fr);
    if (u > *peak) *peak = u;
    return u;
}

static int die(const char *what, kvq_status st) {
    fprintf(stderr, "kvq bench: %s: %s: %s\n", what, kvq_strerror(st), kvq_last_error());
    return 1;
}

int kvq_cli_bench(int argc, char **argv) {
    kvq_cli_opts o;
    kvq_cli_defaults(KVQ_CLI_RUN, &o);
    o.cmd = KVQ_CLI_BENCH;
    const char *types = "f16,q8,q4,q2", *outdir = NULL;
    int depths[MAX_DEPTHS] = {0, 4096, 32768}, n_depths = 3, n_dec = 32, prefill = -1, batch = -1, fill_window = 1024, n_seq = 1;
    uint64_t seed = 1;
    char err[KVQ_CLI_ERR_LEN];
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(a, "--gpu")) {
            o.gpu = 1;
            continue;
        }
        static const char *const valued[] = {"-m", "--model", "--types", "--depths", "-n", "--prefill", "-b", "--batch-size",
                                             "--batch", "--parallel", "--fill-window", "-t", "--threads", "-s", "--seed", "--out", "-ngl",
                                             "--n-gpu-layers"};
        if (kvq_cli_valued_option("bench", a, v, valued, sizeof valued / sizeof valued[0])) return 2;
        i++;
        int64_t x = 0;
        int bad = 0;
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) o.model = v;
        else if (!strcmp(a, "--types")) types = v;
        else if (!strcmp(a, "--out")) outdir = v;
        else if (!strcmp(a, "--depths")) bad = kvq_cli_parse_int_list(v, 0, 1 << 22, MAX_DEPTHS, depths, &n_depths, a, err, sizeof err);
        else if (!strcmp(a, "-s") || !strcmp(a, "--seed")) bad = kvq_cli_parse_u64(v, &seed, a, err, sizeof err);
        else {
            int64_t lo = 1, hi = 1 << 20;
            if (!strcmp(a, "--fill-window") || !strcmp(a, "-ngl") || !strcmp(a, "--n-gpu-layers")) lo = 0;
            if (!strcmp(a, "-t") || !strcmp(a, "--threads")) hi = 1024;
            if (!strcmp(a, "-b") || !strcmp(a, "--batch-size")) hi = 8192;
            if (!strcmp(a, "--batch") || !strcmp(a, "--parallel")) hi = LLAMA_GPU_MAX_SEQS;
            if (!(bad = kvq_cli_parse_i64(v, lo, hi, &x, a, err, sizeof err))) {
                if (!strcmp(a, "-n")) n_dec = (int)x;
                else if (!strcmp(a, "--prefill")) prefill = (int)x;
                else if (!strcmp(a, "-b") || !strcmp(a, "--batch-size")) o.batch = (int)x, batch = (int)x;
                else if (!strcmp(a, "--fill-window")) fill_window = (int)x;
                else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) o.threads = (int)x;
                else if (!strcmp(a, "--batch") || !strcmp(a, "--parallel")) n_seq = (int)x;
                else o.ngl = (int)x, o.gpu = x > 0;
            }
        }
        if (bad) {
            fprintf(stderr, "kvq bench: %s\n", err);
            return 2;
        }
    }
    if (!o.model) {
        fprintf(stderr, "kvq bench: -m MODEL is required (kvq gen-model --shape llama3-8b -o FILE writes one)\n");
        return 2;
    }
    if (kvq_cli_parse_compare(types, &o, err, sizeof err)) {
        fprintf(stderr, "kvq bench: --types: %s\n", err + (strncmp(err, "--compare: ", 11) ? 0 : 11));
        return 2;
    }
    /* the first f16/f16 config is the base of the ratios; without one (a context f16 cannot hold) there are none */
    kvq_cli_mix mixes[KVQ_CLI_MAX_COMPARE];
    int n_mix = 0, base = -1;
    for (int i = 0; i < o.n_compare; i++) {
        if (base < 0 && o.compare[i].type_k == KVQ_TYPE_F16 && o.compare[i].type_v == KVQ_TYPE_F16) base = i;
        mixes[n_mix++] = o.compare[i];
    }
    /* depths ascending: one context per type goes from one to the next */
    for (int i = 1; i < n_depths; i++)
        for (int j = i; j > 0 && depths[j] < depths[j - 1]; j--) {
            int t = depths[j];
            depths[j] = depths[j - 1], depths[j - 1] = t;
        }
    if (n_seq > 1 && !o.gpu) {
        fprintf(stderr, "kvq bench: --batch %d: several sequences at once is the GPU engine's (--gpu); the CPU engine runs one\n",
                n_seq);
        return 2;
    }
    if (batch < 0) o.batch = o.gpu ? 512 : 256;
    if (prefill < 0) prefill = o.gpu ? 2048 : 256;
    if (!o.gpu) fill_window = 0;
    if (o.threads > 0) openblas_set_num_threads(o.threads);
    if (outdir && mkdir(outdir, 0777) != 0 && errno != EEXIST) {
        fprintf(stderr, "kvq bench: --out: cannot create '%s': %s\n", outdir, strerror(errno));
        return 1;
    }

    kvq_cli_loaded L;
    double t_load = kvq_cli_now();
    if (kvq_cli_load(&o, &L, 1)) return 1;
    t_load = kvq_cli_now() - t_load;
    const llama_config *mc = L.cfg;
    const int V = mc->vocab_size, max_depth = depths[n_depths - 1];
    const int per_depth = n_dec + WARM, n_ctx = max_depth + per_depth * n_depths +
                                             (prefill > max_depth + per_depth ? prefill - max_depth - per_depth : 0) + 1;
    double dev_peak = 0;
    dev_used(o.gpu, &dev_peak);
    fprintf(stderr, "kvq bench: %s on the %s: dim %d, %d layers, %d/%d heads of %d, vocab %d; weights %.2f GiB (%s), "
                    "loaded in %.1f s\n", o.model, o.gpu ? "GPU" : "CPU", mc->dim, mc->n_layers, mc->n_heads,
            mc->n_kv_heads, mc->head_dim, V, L.weight_bytes / 1073741824.0, o.gpu ? "fp16 on the device" : "quantized as in the file",
            t_load);
    int32_t *tok = malloc((size_t)(n_ctx > o.batch ? n_ctx : o.batch) * sizeof *tok);
    int32_t *chunk = malloc((size_t)(o.batch > n_seq ? o.batch : n_seq) * sizeof *chunk);
    float *logits = malloc((size_t)V * n_seq * sizeof *logits);
    double *steps = malloc((size_t)n_dec * sizeof *steps);
    bench_row *rows = calloc((size_t)n_mix * n_depths, sizeof *rows);
    int rc = 0;
    if (!tok || !chunk || !logits || !rows || !steps) {
        rc = die("buffers", kvq_set_error(KVQ_ERR_OUT_OF_MEMORY, "%d tokens", n_ctx));
        goto done;
    }
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    for (int i = 0; i < n_ctx; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = (int32_t)((s >> 33) % (uint64_t)V);
    }
    for (int m = 0; m < n_mix; m++) {
        llama_ctx_params cp;
        kvq_cli_ctx_params(&o, &mixes[m], n_ctx, &cp);
        kvq_cli_ctx c = {0};
        kvq_status st = n_seq > 1 ? llama_gpu_ctx_create_par(L.gm, &cp, n_seq, &c.gpu) : kvq_cli_ctx_create(&L, &cp, &c);
        if (st) {
            char what[KVQ_CLI_MIX_NAME + 64];
            snprintf(what, sizeof what, "creating the context of %s (%d tokens)", mixes[m].name, n_ctx);
            rc = die(what, st);
            goto done;
        }
        /* warm-up (cuBLAS's first calls, the attention workspace), then the timed prefill from an empty cache, exact
         * attention */
        const int nw = o.batch < prefill ? o.batch : prefill;
        st = kvq_cli_forward(&c, tok, nw, logits, nw - 1);
        if (!st) st = kvq_cli_ctx_reset(&c);
        double t0 = kvq_cli_now();
        for (int b = 0; b < prefill && !st; b += o.batch) {
            int n = prefill - b < o.batch ? prefill - b : o.batch;
            st = kvq_cli_forward(&c, tok + b, n, logits, n - 1);
        }
        double pre_tok_s = prefill / (kvq_cli_now() - t0);
        if (!st) st = kvq_cli_ctx_reset(&c);
        dev_used(o.gpu, &dev_peak);
        int pos = 0;
        for (int d = 0; d < n_depths && !st; d++) {
            if (c.gpu && (st = llama_gpu_ctx_set_window(c.gpu, fill_window))) break;
            double tf = kvq_cli_now();
            /* sequence q reads the token stream from offset 7919 q: every sequence its own tokens */
            while (pos < depths[d] && !st) {
                int n = depths[d] - pos < o.batch ? depths[d] - pos : o.batch;
                for (int q = 0; q < n_seq && !st; q++) {
                    for (int i = 0; i < n; i++) chunk[i] = tok[((int64_t)pos + i + 7919 * q) % n_ctx];
                    st = n_seq > 1 ? llama_gpu_forward_seq(c.gpu, q, chunk, n, logits, n - 1)
                                   : kvq_cli_forward(&c, chunk, n, logits, n - 1);
                }
                pos += n;
            }
            tf = kvq_cli_now() - tf;
            if (c.gpu && !st) st = llama_gpu_ctx_set_window(c.gpu, 0);
            /* WARM untimed steps, then n_dec timed ones; the median step time (each step ends with its logits on the
             * host) */
            for (int i = 0; i < WARM + n_dec && !st; i++, pos++) {
                for (int q = 0; q < n_seq; q++) chunk[q] = tok[((int64_t)pos + 7919 * q) % n_ctx];
                double t1 = kvq_cli_now();
                st = n_seq > 1 ? llama_gpu_decode_batch(c.gpu, chunk, logits) : kvq_cli_forward(&c, chunk, 1, logits, 0);
                if (i >= WARM) steps[i - WARM] = kvq_cli_now() - t1;
            }
            if (st) break;
            kvq_cache_stats cs;
            if ((st = kvq_cli_ctx_stats(&c, &cs))) break;
            dev_used(o.gpu, &dev_peak);
            bench_row *r = &rows[m * n_depths + d];
            r->depth = depths[d];
            qsort(steps, (size_t)n_dec, sizeof *steps, cmp_double);
            r->decode_s = n_dec % 2 ? steps[n_dec / 2] : 0.5 * (steps[n_dec / 2 - 1] + steps[n_dec / 2]);
            r->prefill_tok_s = pre_tok_s;
            r->kv_bpt = cs.bytes_per_token;
            r->f16_bpt = cs.f16_bytes_per_token;
            fprintf(stderr, "kvq bench: %-10s depth %7d x %d: fill %.1f s, decode %.2f ms/step (median; %.1f tok/s); prefill %.0f tok/s\n",
                    mixes[m].name, depths[d], n_seq, tf, 1e3 * r->decode_s, n_seq / r->decode_s, pre_tok_s);
        }
        kvq_cli_ctx_free(&c);
        if (st) {
            rc = die(mixes[m].name, st);
            goto done;
        }
    }
    /* the table */
    const char *eng = o.gpu ? "gpu" : "cpu";
    FILE *csv = NULL, *md = NULL;
    if (outdir) {
        char p[1024];
        snprintf(p, sizeof p, "%s/bench-e2e-%s.csv", outdir, eng);
        csv = fopen(p, "w");
        snprintf(p, sizeof p, "%s/bench-e2e-%s.md", outdir, eng);
        md = fopen(p, "w");
        if (!csv || !md) {
            fprintf(stderr, "kvq bench: --out: cannot write '%s': %s\n", p, strerror(errno));
            if (csv) fclose(csv);
            if (md) fclose(md);
            rc = 1;
            goto done;
        }
        fprintf(csv, "engine,model,kv,type_k,type_v,depth,decode_tok_s,decode_ms,ratio_f16,bound,pct_of_bound,prefill_tok_s,"
                     "weight_bytes,kv_bytes_per_token,f16_kv_bytes_per_token,read_gb_s,fill_window,peak_host_rss,"
                     "peak_device_bytes,batch\n");
    }
    const double W = L.weight_bytes;
    char head[512];
    snprintf(head, sizeof head,
             "kvq bench (%s engine): %s; weights W = %.2f GiB; decode of %d sequence%s, -n %d steps per depth; fill window "
             "%d; peak host RSS %.2f GiB%s",
             eng, o.model, W / 1073741824.0, n_seq, n_seq > 1 ? "s at once" : "", n_dec, fill_window,
             peak_rss() / 1073741824.0, o.gpu ? ", " : "");
    char devs[96] = "";
    if (o.gpu) snprintf(devs, sizeof devs, "peak device memory in use %.2f GiB", dev_peak / 1073741824.0);
    FILE *outs[2] = {stdout, md};
    for (int k = 0; k < 2; k++) {
        FILE *f = outs[k];
        if (!f) continue;
        fprintf(f, "%s%s\n\n", head, devs);
        fprintf(f, "| KV | depth | decode tok/s | ms/step | vs f16 | bound (W+BdK_f16)/(W+BdK_t) | %% of bound | prefill tok/s "
                   "| KV B/token | read GB/s |\n");
        fprintf(f, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for (int m = 0; m < n_mix; m++)
            for (int d = 0; d < n_depths; d++) {
                const bench_row *r = &rows[m * n_depths + d];
                double ratio = base >= 0 ? rows[base * n_depths + d].decode_s / r->decode_s : NAN;
                const double bd = (double)n_seq * r->depth; /* cached tokens one step reads */
                double bound = (W + bd * r->f16_bpt) / (W + bd * r->kv_bpt);
                double gbs = (W + bd * r->kv_bpt) / r->decode_s / 1e9;
                char rs[32] = "-", ps[32] = "-"; /* no f16 row: no ratio */
                if (!isnan(ratio)) snprintf(rs, sizeof rs, "%.3fx", ratio), snprintf(ps, sizeof ps, "%.0f%%", 100.0 * ratio / bound);
                fprintf(f, "| %s | %d | %.1f | %.3f | %s | %.3fx | %s | %.0f | %.0f | %.0f |\n", mixes[m].name, r->depth,
                        n_seq / r->decode_s, 1e3 * r->decode_s, rs, bound, ps, r->prefill_tok_s, r->kv_bpt, gbs);
                if (k == 0 && csv)
                    fprintf(csv, "%s,%s,%s,%s,%s,%d,%.3f,%.4f,%.4f,%.4f,%.2f,%.1f,%.0f,%.1f,%.1f,%.1f,%d,%.0f,%.0f,%d\n", eng,
                            o.model, mixes[m].name, kvq_cli_type_name(mixes[m].type_k),
                            kvq_cli_type_name(mixes[m].type_v), r->depth, n_seq / r->decode_s, 1e3 * r->decode_s, ratio, bound,
                            100.0 * ratio / bound, r->prefill_tok_s, W, r->kv_bpt, r->f16_bpt, gbs,
                            r->depth ? fill_window : 0, peak_rss(), dev_peak, n_seq);
            }
        fprintf(f, "\nbound: a decode step reads the weights (W) and B x d tokens of K+V (B sequences, K_t bytes per token, "
                   "all layers) once; read GB/s = (W + B d K_t) / step time. Fill: %s.\n",
                fill_window ? "forward passes with a sliding attention window (decode exact)" : "exact forward passes");
    }
    if (csv && fclose(csv)) rc = 1;
    if (md && fclose(md)) rc = 1;
done:
    free(tok);
    free(chunk);
    free(steps);
    free(logits);
    free(rows);
    kvq_cli_unload(&L);
    return rc;
}
