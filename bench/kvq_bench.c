/* kvq-bench: decode-attention benchmarks. `kvq-bench cpu` times CPU decode attention on Llama-3-8B head shapes
 * (32 query heads, 8 KV heads, D = 128) for each KV type and prints the table; with `--out DIR` it also writes
 * DIR/bench-cpu.csv, DIR/bench-cpu.md and DIR/bench-cpu.png (bench/plot.py). `--out docs` updates the tracked
 * tables: only the part between the markers of docs/bench-cpu.md is rewritten, the reading around it is kept.
 * `kvq-bench cuda` runs the GPU benchmark when the CUDA backend was built. */
#define _POSIX_C_SOURCE 200809L
#include "kvq.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#ifdef KVQ_HAVE_CUDA_BENCH
int kvq_bench_cuda_main(int argc, char **argv);
#endif

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static uint64_t rng = 88172645463325252ull;
static float frand(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / 16777216.0) * 2 - 1);
}

/* The largest CPU cache of this machine in bytes (sysfs: cpu0's cache/indexN/size, "48K" .. "300M"; a shared L3
 * reports its whole size), 0 when unknown. The flush below must exceed it: a 96 MiB flush left part of a 38 MB Q4
 * cache resident in a 300 MiB L3 (docs/bench-cpu.md, 2026-12-07 stop 53). */
static size_t largest_cache_bytes(void) {
    size_t best = 0;
    for (int idx = 0; idx < 8; idx++) {
        char path[96], buf[32];
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", idx);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        if (fgets(buf, sizeof buf, f)) {
            char *end;
            unsigned long long v = strtoull(buf, &end, 10);
            v <<= *end == 'K' ? 10 : *end == 'M' ? 20 : *end == 'G' ? 30 : 0;
            if (v > best) best = (size_t)v;
        }
        fclose(f);
    }
    return best;
}

/* Evicts the caches between timed runs: reads and writes a buffer larger than any LLC. */
static volatile float flush_sink;
static void flush_caches(float *buf, size_t n) {
    float s = 0;
    for (size_t i = 0; i < n; i += 16) s += buf[i], buf[i] = s;
    flush_sink = s;
}

/* Draws DIR's PNGs with bench/plot.py (matplotlib): a missing python3 or matplotlib costs the plot, not the run. */
static void plot(const char *dir, const char *which) {
    char cmd[1536];
    snprintf(cmd, sizeof cmd, "python3 '%s/bench/plot.py' --dir '%s' %s", KVQ_SOURCE_DIR, dir, which);
    if (system(cmd) != 0) fprintf(stderr, "kvq-bench: no plot (%s failed)\n", cmd);
}

#define MD_BEGIN "<!-- kvq-bench cpu: begin (generated: the text outside these markers is kept) -->\n"
#define MD_END "<!-- kvq-bench cpu: end -->\n"

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    long n = fseek(f, 0, SEEK_END) ? -1 : ftell(f);
    if (n >= 0 && !fseek(f, 0, SEEK_SET) && (buf = malloc((size_t)n + 1))) buf[fread(buf, 1, (size_t)n, f)] = 0;
    fclose(f);
    return buf;
}

/* Writes `gen` (the generated table) into path between MD_BEGIN and MD_END, keeping what the file has before and
 * after them (the title, a hand-written reading); a file without the markers is replaced by `title` and `gen`. */
static int write_md(const char *path, const char *title, const char *gen) {
    char *old = slurp(path), *b = old ? strstr(old, MD_BEGIN) : NULL, *e = b ? strstr(b, MD_END) : NULL;
    FILE *f = fopen(path, "w");
    if (!f) {
        free(old);
        return -1;
    }
    if (e) fwrite(old, 1, (size_t)(b - old), f);
    else fputs(title, f);
    fputs(MD_BEGIN, f);
    fputs(gen, f);
    fputs(MD_END, f);
    if (e) fputs(e + strlen(MD_END), f);
    free(old);
    return fclose(f);
}

/* A --types entry: TYPE[:rot=none|k|v|kv][:sinks=N][:nuq=none|k|v|kv][:pre=0|1][:outl=none|k|v|kv][:p8=none|k|v|kv]
 * [:w8=none|k|v|kv]
 * (kvq.h section 10; unset: the type's default; pre=1: pre-RoPE keys with Llama-3's theta 500000, NeoX pairs; outl:
 * dense-and-sparse outliers; p8: 8-bit group parameters), so that what each mechanism costs is timed in the same run
 * as F16 */
typedef struct entry {
    char label[48];
    kvq_type type;
    int rotate, sinks, nonuniform, prerope, outliers, params8, window8;
} entry;

static int parse_roles(const char *x, int *out) {
    static const char *const names[4] = {"none", "k", "v", "kv"};
    for (int i = 0; i < 4; i++)
        if (!strcmp(x, names[i])) return *out = i, 0;
    return -1;
}

static int parse_entry(const char *tok, entry *e) {
    char buf[48];
    snprintf(buf, sizeof buf, "%s", tok);
    snprintf(e->label, sizeof e->label, "%s", tok);
    e->rotate = e->sinks = e->nonuniform = e->outliers = e->params8 = e->window8 = -1;
    e->prerope = 0;
    char *suf = strchr(buf, ':');
    if (suf) *suf++ = 0;
    if (kvq_type_from_name(buf, &e->type) != KVQ_OK) return fprintf(stderr, "kvq-bench: %s\n", kvq_last_error()), -1;
    for (char *x = suf; x && *x;) {
        char *next = strchr(x, ':');
        if (next) *next++ = 0;
        char *end = NULL;
        if (!strncmp(x, "rot=", 4) && !parse_roles(x + 4, &e->rotate)) {
        } else if (!strncmp(x, "nuq=", 4) && !parse_roles(x + 4, &e->nonuniform)) {
        } else if (!strncmp(x, "outl=", 5) && !parse_roles(x + 5, &e->outliers)) {
        } else if (!strncmp(x, "p8=", 3) && !parse_roles(x + 3, &e->params8)) {
        } else if (!strncmp(x, "w8=", 3) && !parse_roles(x + 3, &e->window8)) {
        } else if (!strncmp(x, "sinks=", 6) && (e->sinks = (int)strtol(x + 6, &end, 10), end != x + 6 && !*end)) {
        } else if (!strcmp(x, "pre=0") || !strcmp(x, "pre=1")) {
            e->prerope = x[4] - '0';
        } else return fprintf(stderr, "kvq-bench: '%s': '%s' is not :rot=none|k|v|kv, :sinks=N, :nuq=none|k|v|kv, :pre=0|1, "
                              ":outl=none|k|v|kv, :p8=none|k|v|kv or :w8=none|k|v|kv\n", tok, x), -1;
        x = next;
    }
    return 0;
}

static int usage(void) {
    fprintf(stderr,
            "usage: kvq-bench cpu [--ctx 4096,16384,32768] [--types f16,bf16,q8,fp8,q4,q2] [--runs N] [--threads N]\n"
            "                     [--out DIR] [--no-flush] [--prerope]\n"
            "       a --types entry may switch kvq.h section 10's mechanisms: TYPE[:rot=none|k|v|kv][:sinks=N]\n"
            "       [:nuq=none|k|v|kv][:pre=0|1][:outl=none|k|v|kv][:p8=none|k|v|kv][:w8=none|k|v|kv] (unset: the type's\n"
            "       default; pre=1: pre-RoPE keys, Llama-3's theta 500000, NeoX pairs; outl: dense-and-sparse outliers;\n"
            "       p8: 8-bit group parameters; w8: 8-bit residual windows), e.g. q4,q4:rot=none,q4:outl=k,q4:p8=kv;\n"
            "       --prerope: every entry also with :pre=1\n"
            "       (without --out: the table on stdout only; --out docs: the tracked docs/bench-cpu.{md,csv,png})\n"
            "       kvq-bench cuda [options of the CUDA benchmark]\n");
    return 2;
}

static int bench_cpu(int argc, char **argv) {
    const char *ctx_list = "4096,16384,32768", *type_list = "f16,bf16,q8,fp8,q4,q2", *out = NULL;
    int runs = 15, threads = 0, flush_between = 1, with_prerope = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--ctx") && i + 1 < argc) ctx_list = argv[++i];
        else if (!strcmp(argv[i], "--types") && i + 1 < argc) type_list = argv[++i];
        else if (!strcmp(argv[i], "--runs") && i + 1 < argc) runs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
        else if (!strcmp(argv[i], "--no-flush")) flush_between = 0; /* hot caches: measures compute alone */
        else if (!strcmp(argv[i], "--prerope")) with_prerope = 1;
        else return usage();
    }
    if (runs < 1) runs = 1;
    const int H = 8, NQH = 32, D = 128;
    int64_t ctxs[16];
    int nctx = 0;
    for (char *s = strdup(ctx_list), *tok = strtok(s, ","); tok && nctx < 16; tok = strtok(NULL, ",")) ctxs[nctx++] = atoll(tok);
    enum { MAX_ENTRIES = 32 };
    entry ents[MAX_ENTRIES];
    kvq_type types[MAX_ENTRIES];
    int ntypes = 0;
    for (char *s = strdup(type_list), *tok = strtok(s, ","); tok && ntypes < (with_prerope ? MAX_ENTRIES / 2 : MAX_ENTRIES); tok = strtok(NULL, ",")) {
        if (parse_entry(tok, &ents[ntypes])) return 2;
        ntypes++;
    }
    if (with_prerope) /* each entry again with pre-RoPE keys, right after it */
        for (int i = ntypes - 1; i >= 0; i--) {
            ents[2 * i] = ents[2 * i + 1] = ents[i];
            ents[2 * i + 1].prerope = 1;
            snprintf(ents[2 * i + 1].label, sizeof ents[0].label, "%.40s:pre", ents[i].label);
        }
    if (with_prerope) ntypes *= 2;
    for (int i = 0; i < ntypes; i++) types[i] = ents[i].type;
    int64_t maxT = 0;
    for (int i = 0; i < nctx; i++) maxT = ctxs[i] > maxT ? ctxs[i] : maxT;
    size_t chunk_tokens = 1024, row = (size_t)H * D;
    float *k = malloc(chunk_tokens * row * 4), *v = malloc(chunk_tokens * row * 4);
    float *q = malloc((size_t)NQH * D * 4), *o = malloc((size_t)NQH * D * 4);
    /* twice the largest cache, at least 96 MiB and at most 2 GiB (a flush of LLC bytes can leave lines of the
     * data in a cache that does not replace in strict LRU order) */
    size_t llc = largest_cache_bytes(), flush_bytes = (size_t)96 << 20;
    if (2 * llc > flush_bytes) flush_bytes = 2 * llc < ((size_t)2 << 30) ? 2 * llc : (size_t)2 << 30;
    size_t flush_n = flush_bytes / 4;
    float *flush = flush_between ? calloc(flush_n, 4) : NULL;
    if (flush_between && !flush) {
        fprintf(stderr, "kvq-bench: cannot allocate the %zu MiB cache flush buffer\n", flush_bytes >> 20);
        return 1;
    }
    for (size_t i = 0; i < chunk_tokens * row; i++) k[i] = frand() * 2, v[i] = frand();
    for (int i = 0; i < NQH * D; i++) q[i] = frand();
    /* the CSV and markdown are built in memory and written only with --out */
    char *csv_buf = NULL, *md_buf = NULL;
    size_t csv_len = 0, md_len = 0;
    FILE *csv = open_memstream(&csv_buf, &csv_len), *md = open_memstream(&md_buf, &md_len);
    if (!csv || !md) return 1;
    char flush_note[96];
    if (flush_between) snprintf(flush_note, sizeof flush_note, "caches flushed (%zu MiB written) before each run", flush_bytes >> 20);
    else snprintf(flush_note, sizeof flush_note, "hot caches (--no-flush)");
    printf("CPU decode attention, 32 query heads, 8 KV heads, D=128, batch 1; kernels: %s; median of %d runs, %s\n",
           kvq_cpu_backend(), runs, flush_note);
    printf("%8s %6s %10s %12s %10s %12s\n", "ctx", "type", "ms/step", "KV MB read", "GB/s", "vs F16");
    fprintf(csv, "ctx,type,ms_per_step,kv_bytes_read,gb_per_s,speedup_vs_f16\n");
    fprintf(md, "Made by `kvq-bench cpu");
    for (int i = 0; i < argc; i++) fprintf(md, " %s", argv[i]);
    fprintf(md, "` (kvq %s). Llama-3-8B attention "
                "shapes: 32 query heads, 8 KV heads, head dim 128, batch 1, one layer. Kernels: %s. Median of %d runs, "
                "%s, the types' runs interleaved. \"KV MB read\" counts the page bytes (data, scales, "
                "mins) and the fp16 residual window that one step reads. \"vs F16\" is the F16 time over this type's "
                "time, same run.\n\n| ctx | type | ms/step | KV MB read | GB/s | speedup vs F16 |\n|---:|---|---:|---:|---:|---:|\n",
            kvq_version_string(), kvq_cpu_backend(), runs, flush_note);
    for (int ci = 0; ci < nctx; ci++) {
        int64_t T = ctxs[ci];
        /* every type's cache is filled first and the runs are interleaved (type 1, type 2, ..., type 1, ...), so that
         * a slow phase of the machine hits all types alike and the ratios stay meaningful */
        kvq_cache *caches[MAX_ENTRIES];
        int32_t seqs[MAX_ENTRIES];
        double bytes[MAX_ENTRIES], *ms = malloc((size_t)runs * ntypes * sizeof *ms);
        for (int ti = 0; ti < ntypes; ti++) {
            kvq_cache_config cfg = kvq_cache_config_default();
            cfg.n_layers = 1, cfg.n_kv_heads = H, cfg.head_dim = D, cfg.type_k = types[ti], cfg.type_v = types[ti];
            cfg.n_threads = threads;
            cfg.rotate = ents[ti].rotate, cfg.sinks = ents[ti].sinks, cfg.nonuniform = ents[ti].nonuniform;
            cfg.outliers = ents[ti].outliers, cfg.params8 = ents[ti].params8, cfg.window8 = ents[ti].window8;
            if (ents[ti].prerope) cfg.prerope = 1, cfg.rope_neox = 1, cfg.rope_theta = 500000.0f;
            kvq_page_layout L; /* the cache's own (outliers make pages larger) */
            if (kvq_cache_config_layout(&cfg, &L)) return fprintf(stderr, "kvq-bench: %s\n", kvq_last_error()), 1;
            cfg.arena_bytes = (size_t)((T + 2 * 64) / L.page_tokens + 2) * L.page_bytes;
            if (ents[ti].sinks > 0) /* sink pages: SR = page_bytes / (4 H D) sink tokens each (kvq.h section 5) */
                cfg.arena_bytes += (size_t)(ents[ti].sinks / (L.page_bytes / (4 * row)) + 1) * L.page_bytes;
            if (kvq_cache_create(&cfg, &caches[ti]) || kvq_seq_new(caches[ti], &seqs[ti])) {
                fprintf(stderr, "kvq-bench: %s\n", kvq_last_error());
                return 1;
            }
            for (int64_t t = 0; t < T; t += (int64_t)chunk_tokens) {
                int32_t n = (int32_t)(T - t < (int64_t)chunk_tokens ? T - t : (int64_t)chunk_tokens);
                if (kvq_append(caches[ti], 0, 1, &seqs[ti], &n, KVQ_DTYPE_F32, k, v)) {
                    fprintf(stderr, "kvq-bench: %s\n", kvq_last_error());
                    return 1;
                }
            }
            kvq_seq_view view;
            kvq_seq_view_get(caches[ti], seqs[ti], 0, &view);
            /* window rows: fp16, or 8-bit codes + a scale per head (window8) */
            double wk = view.window8_k ? (double)view.window8_row_bytes : (double)row * 2;
            double wv = view.window8_v ? (double)view.window8_row_bytes : (double)row * 2;
            bytes[ti] = (double)view.paged_tokens / L.page_tokens * L.page_bytes + (double)view.window_tokens * (wk + wv);
        }
        kvq_attn_params ap = kvq_attn_params_default(NQH);
        for (int ti = 0; ti < ntypes; ti++)
            for (int w = 0; w < 2; w++) kvq_attn_decode(caches[ti], 0, 1, &seqs[ti], q, o, &ap);
        for (int r = 0; r < runs; r++)
            for (int ti = 0; ti < ntypes; ti++) {
                if (flush_between) flush_caches(flush, flush_n);
                double t0 = now_ms();
                kvq_attn_decode(caches[ti], 0, 1, &seqs[ti], q, o, &ap);
                ms[(size_t)ti * runs + r] = now_ms() - t0;
            }
        double f16_ms = 0, med[MAX_ENTRIES];
        for (int ti = 0; ti < ntypes; ti++) {
            qsort(ms + (size_t)ti * runs, (size_t)runs, sizeof *ms, cmp_double);
            med[ti] = ms[(size_t)ti * runs + runs / 2];
            if (types[ti] == KVQ_TYPE_F16 && !ents[ti].prerope && !f16_ms) f16_ms = med[ti];
        }
        for (int ti = 0; ti < ntypes; ti++) {
            const char *name = ents[ti].label;
            char ratio[32] = "-";
            if (f16_ms > 0) snprintf(ratio, sizeof ratio, "%.2fx", f16_ms / med[ti]);
            printf("%8lld %6s %10.3f %12.1f %10.2f %12s\n", (long long)T, name, med[ti], bytes[ti] / 1e6,
                   bytes[ti] / med[ti] / 1e6, ratio);
            fprintf(csv, "%lld,%s,%.4f,%.0f,%.3f,%.4f\n", (long long)T, name, med[ti], bytes[ti], bytes[ti] / med[ti] / 1e6,
                    f16_ms > 0 ? f16_ms / med[ti] : 0.0);
            fprintf(md, "| %lld | %s | %.3f | %.1f | %.2f | %s |\n", (long long)T, name, med[ti], bytes[ti] / 1e6,
                    bytes[ti] / med[ti] / 1e6, ratio);
            kvq_cache_free(caches[ti]);
        }
        fflush(stdout);
        free(ms);
    }
    fprintf(md, "\nBytes per token per head at D=128 (K or V, scales included): ");
    for (int t = 0; t < KVQ_TYPE_COUNT; t++)
        if (kvq_type_get_traits((kvq_type)t)->implemented)
            fprintf(md, "%s %.1f (%.3fx)%s", kvq_type_get_traits((kvq_type)t)->name,
                    kvq_type_bytes_per_token((kvq_type)t, KVQ_KEY, 128, 0),
                    kvq_type_bytes_per_token((kvq_type)t, KVQ_KEY, 128, 0) / 256.0, t + 1 < KVQ_TYPE_Q3 ? ", " : ".\n");
    fclose(csv);
    fclose(md);
    int rc = 0;
    if (out) {
        char path[1024];
        mkdir(out, 0777); /* the folder may be new (scripts pass $OUT/bench-TABLE); an error shows at fopen below */
        snprintf(path, sizeof path, "%s/bench-cpu.csv", out);
        FILE *f = fopen(path, "w");
        if (!f || fputs(csv_buf, f) < 0 || fclose(f)) {
            fprintf(stderr, "kvq-bench: cannot write %s\n", path);
            rc = 1;
        }
        snprintf(path, sizeof path, "%s/bench-cpu.md", out);
        if (!rc && write_md(path, "# CPU decode attention\n\n", md_buf)) {
            fprintf(stderr, "kvq-bench: cannot write %s\n", path);
            rc = 1;
        }
        if (!rc) {
            printf("wrote %s/bench-cpu.md and %s/bench-cpu.csv\n", out, out);
            plot(out, "cpu");
        }
    }
    free(csv_buf), free(md_buf);
    free(k), free(v), free(q), free(o), free(flush);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2) return usage();
    if (!strcmp(argv[1], "cpu")) return bench_cpu(argc - 2, argv + 2);
    if (!strcmp(argv[1], "cuda")) {
#ifdef KVQ_HAVE_CUDA_BENCH
        int rc = kvq_bench_cuda_main(argc - 1, argv + 1);
        for (int i = 2; rc == 0 && i + 1 < argc; i++)
            if (!strcmp(argv[i], "--out")) plot(argv[i + 1], "cuda");
        return rc;
#else
        fprintf(stderr, "kvq-bench: built without the CUDA backend (no nvcc at configure time)\n");
        return 1;
#endif
    }
    return usage();
}
