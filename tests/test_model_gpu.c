/* The GPU engine (llama_gpu.h) against the CPU engine (llama.h) on the same GGUF, for each KV type:
 *   - prefill of N_POS positions in chunks of CHUNK (kvq_cuda_attn_prefill over a growing cache): every position's
 *     logits; max |logit difference| <= the type's bound, the RMS of the differences <= the type's share of the RMS
 *     of the logits (a zero, mis-scaled or shifted output fails that), and top-1 agreement judged against each
 *     position's own logit differences (below: "Top-1");
 *   - decode after prefill: a second GPU context prefills N_POS - N_DEC tokens and decodes the last N_DEC one at a
 *     time (kvq_cuda_attn_decode); their logits equal the prefill-only ones within DEC_BOUND;
 *   - several sequences at once: NS sequences of different lengths and tokens decode STEPS steps together
 *     (llama_gpu_decode_batch: one GEMM row and one kvq_cuda decode entry per sequence); each one's logits equal those
 *     of the same sequence run alone in a one-sequence context, within DEC_BOUND;
 *   - CUDA graphs on vs off (llama_gpu_ctx_set_graph, llama_gpu_ctx_set_static): one sequence decoding G_STEPS
 *     tokens one at a time, and NS sequences decoding G_STEPS steps together, each in three contexts: whole-step
 *     graphs (the default: append and attention captured through a kvq_cuda static plan), segment graphs with eager
 *     kvq_cuda calls, and no graphs; the same kernels with the same arguments, so the logits should be identical:
 *     max |difference| <= GRAPH_BOUND (1e-4, far below any stale buffer or position, which moves logits by O(1));
 *     the default context must hold one whole-step graph, the segment one segment graphs only, the eager one none.
 *     G_STEPS crosses pages and window flushes (inside the whole-step graph: decided on the device);
 *   - q4 with decode_attn (llama_ctx_params): chunks of CHUNK attended token by token give the logits of the same
 *     tokens fed one at a time, within 0.06 (Bounds).
 * usage: test_model_gpu --probe                 exit 0 when a usable GPU is there, 77 (skip) when not
 *        test_model_gpu MODEL.gguf [TYPES]      TYPES: comma list of f16,q8,q4,q3,q2,layers (default all six; layers:
 *                                               per-layer types, one GPU cache per group of layers, main() says which)
 * Bounds. The GPU rounds every GEMM input (activations, and weights stored other than F16) to fp16: a relative error
 * of ~2.8e-4 RMS per element, where the CPU engine stays in fp32 (its scalar reference kernels, KVQ_FORCE_SCALAR=1).
 * A CPU-only proxy with a 14x larger perturbation (the same SmolLM2-shaped model with q8_0 instead of f16 weights:
 * ~4e-3 relative per weight) gave logit differences of 2.2% RMS of the logits (f16 KV), 2.8% (q4), max |diff| 0.28
 * and 0.49. Measured on an H200 (model_gpu.log, both shapes): max |diff| f16 0.0105, q8 0.129, q4 0.141, q2 0.266;
 * RMS share f16 0.00094, q8 0.0075, q4 0.0044, q2 0.0080; decode after prefill <= 0.0071 for every type; batched
 * decode 0. With Q-Norm on both sides (the engines' default since 2026-12-05; Q2 takes its codes again under the
 * normalized pair, so one code that flips moves its group's whole pair) q2 on the SmolLM2 shape measured max 0.667
 * and RMS share 0.0125 (q4 0.149 and 0.0044; the Llama-3-8B shape q2 0.078 and 0.0035). A quantized KV type differs more than f16: a K that differs in its last bit can round to another level,
 * which moves that position's whole logit vector. The bounds leave 3-5x over those figures (q8's max: 1.5x, kept
 * at 0.2): f16 max 0.04 and RMS share 0.005, the others max 0.2/0.5/1.0 and RMS share 0.02; decode after prefill
 * and batched decode run the same attention kernel and differ only in the GEMMs' summation order: 0.03 for every
 * type (a 1% mis-scale of logits ~N(0, 2^2) fails it). decode_attn's check compares 320 positions, not 32, whose
 * K and V come from 64-row GEMMs against 1-row ones, so more q4 codes can flip at a level boundary: its first run
 * (H200) measured max 0.0309 on the SmolLM2 shape, 0.0137 on the Llama-3-8B one; its bound is 0.06 (a 1% mis-scale
 * moves the largest of 320 x 49152 logits ~N(0, 2^2), ~11.5, by ~0.1; a wrong position or mask moves them by O(1)).
 * Top-1. kvq gen-model's logits are ~N(0, 2^2) over 49152 or 128256 tokens: the top-1 vs top-2 margin is about
 * exponential with mean 2 / sqrt(2 ln V) ~ 0.43, often below the legitimate difference, so raw agreement flips
 * at random (97.8-100% measured) and is only printed. With random output weights the differences of one position
 * are ~i.i.d. across the vocabulary with that position's standard deviation s_i, so the GPU picks token j over the
 * CPU's top-1 t with probability ~Phi(-(a_t - a_j) / (sqrt2 s_i)). Two checks follow: (1) no disagreement where the
 * CPU's margin a_t - a_(GPU's pick) exceeds Z_TOP1 = 6 of those standard deviations (a chance of ~1e-9 each): a
 * wrong token where the CPU's choice was clear fails; (2) the count of disagreements <= E + 4 sqrt(E) + 2, E the
 * sum of those probabilities over positions and tokens (a Poisson count; E matched the H200's counts: SmolLM2 q8
 * 6.2 expected from s_i vs 7 seen, q4 3.7 vs 4): flips more often than the differences explain fail. A zero or
 * scaled output is the max and RMS checks' to catch (its s_i is large).
 * The exact figures are printed on every run. */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "kvq.h"
#include "llama.h"
#include "llama_gpu.h"
#include "model_err.h"

static int fails = 0;

static void check(int ok, const char *fmt, double a, double b, const char *what) {
    printf("%s %s: ", ok ? "ok  " : "FAIL", what);
    printf(fmt, a, b);
    printf("\n");
    fails += !ok;
}

enum { N_POS = 320, CHUNK = 64, N_DEC = 32, NS = 4, STEPS = 8, G_STEPS = 80 };
static const double GRAPH_BOUND = 1e-4;

/* max |a - b| over n values; a NaN gives INFINITY */
static double maxabs(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t j = 0; j < n; j++) {
        double d = fabs((double)a[j] - b[j]);
        if (!(d <= m)) m = isnan(d) ? INFINITY : d;
    }
    return m;
}

/* graphs on vs off: one sequence (prefill 100, G_STEPS single-token decodes) and NS sequences (prefill 60 + 13 q each,
 * G_STEPS batched steps); returns 0 or a status */
static kvq_status graph_ab(const llama_gpu_model *gm, const llama_ctx_params *p, const int32_t *tok, int V, const char *name) {
    llama_gpu_ctx *g[3] = {NULL, NULL, NULL};
    kvq_status st = KVQ_OK;
    float *la = malloc((size_t)NS * V * sizeof(float)), *lb = malloc((size_t)NS * V * sizeof(float));
    if (!la || !lb) {
        free(la), free(lb);
        return KVQ_ERR_OUT_OF_MEMORY;
    }
    for (int batch = 0; batch < 2 && !st; batch++) {
        const int ns = batch ? NS : 1;
        double maxd = 0;
        for (int i = 0; i < 3 && !st; i++) {
            st = batch ? llama_gpu_ctx_create_par(gm, p, NS, &g[i]) : llama_gpu_ctx_create(gm, p, &g[i]);
            /* 0: whole-step graphs (the default), 1: eager, 2: segment graphs with eager kvq_cuda calls */
            if (!st) st = llama_gpu_ctx_set_graph(g[i], i != 1);
            if (!st) st = llama_gpu_ctx_set_static(g[i], i == 0);
            for (int q = 0; q < ns && !st; q++) {
                const int len = batch ? 60 + 13 * q : 100;
                for (int b = 0; b < len && !st; b += CHUNK) {
                    int n = len - b < CHUNK ? len - b : CHUNK;
                    st = llama_gpu_forward_seq(g[i], q, tok + 7 * q + b, n, NULL, n);
                }
            }
        }
        for (int k = 0; k < G_STEPS && !st; k++) {
            int32_t bt[NS];
            for (int q = 0; q < ns; q++) bt[q] = tok[(7 * q + (batch ? 60 + 13 * q : 100) + k) % N_POS];
            for (int i = 0; i < 3 && !st; i++) {
                st = batch ? llama_gpu_decode_batch(g[i], bt, i ? lb : la) : llama_gpu_forward(g[i], bt, 1, i ? lb : la, 0);
                if (!st && i) {
                    double d = maxabs(la, lb, (size_t)ns * V);
                    if (!(d <= maxd)) maxd = d;
                }
            }
        }
        if (!st) {
            char what[160];
            snprintf(what, sizeof what, "%s: CUDA graphs (whole step / segments) vs none, %s, max |logit difference| over %d decode steps", name,
                     batch ? "4 sequences together" : "one sequence", G_STEPS);
            check(maxd <= GRAPH_BOUND, "%.4g (<= %.1g)", maxd, GRAPH_BOUND, what);
            snprintf(what, sizeof what, "%s: graphs held with graphs on / off (%s)", name, batch ? "batch" : "one sequence");
            int hon = llama_gpu_ctx_graphs(g[0]), hoff = llama_gpu_ctx_graphs(g[1]);
            printf("%s %s: %d / %d\n", hon > 0 && hoff == 0 ? "ok  " : "FAIL", what, hon, hoff);
            fails += !(hon > 0 && hoff == 0);
            /* the default took the whole-step graph (append and attention captured), the segment-only context not */
            snprintf(what, sizeof what, "%s: whole-step graphs held, default / segment graphs only (%s)", name,
                     batch ? "batch" : "one sequence");
            int w0 = llama_gpu_ctx_step_graphs(g[0]), w2 = llama_gpu_ctx_step_graphs(g[2]), s2 = llama_gpu_ctx_graphs(g[2]);
            printf("%s %s: %d / %d (segment graphs %d)\n", w0 == 1 && w2 == 0 && s2 > 0 ? "ok  " : "FAIL", what, w0, w2, s2);
            fails += !(w0 == 1 && w2 == 0 && s2 > 0);
        }
        llama_gpu_ctx_free(g[0]), llama_gpu_ctx_free(g[1]), llama_gpu_ctx_free(g[2]);
        g[0] = g[1] = NULL;
    }
    free(la), free(lb);
    return st;
}
static const double Z_TOP1 = 6.0;

static llama_ctx_params params(kvq_type t) {
    llama_ctx_params p;
    memset(&p, 0, sizeof p);
    p.n_ctx = N_POS;
    p.max_batch = CHUNK;
    p.type_k = p.type_v = t;
    p.residual = -1;
    p.rotate = -1, p.sinks = -1; /* the library's defaults: the same on both backends (kvq_cuda.h section 4) */
    p.nonuniform = -1;           /* the library's default: q3's non-uniform levels, on both backends */
    p.qnorm = -1;                /* the engine's default (Q-Norm of the grouped roles), the same bytes on both */
    p.prerope = 0;
    return p;
}

static int die(const char *what, kvq_status st) {
    fprintf(stderr, "FAIL %s: %s: %s\n", what, kvq_strerror(st), kvq_last_error());
    return 1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc == 2 && !strcmp(argv[1], "--probe")) {
        size_t fr, tot;
        kvq_status st = llama_gpu_mem_info(0, &fr, &tot);
        if (st) {
            printf("SKIP: %s\n", kvq_last_error());
            return 77;
        }
        printf("GPU 0: %.1f of %.1f GiB free\n", fr / 1073741824.0, tot / 1073741824.0);
        return 0;
    }
    if (argc < 2) {
        fprintf(stderr, "usage: %s --probe | MODEL.gguf [TYPES]\n", argv[0]);
        return 2;
    }
    const char *types = argc > 2 ? argv[2] : "f16,q8,q4,q3,q2,layers";
    gguf_file *gf;
    llama_model *cm;
    llama_gpu_model *gm;
    kvq_status st;
    if ((st = gguf_open(argv[1], &gf))) return die("gguf_open", st);
    if ((st = llama_gpu_load(gf, 0, &gm))) {
        if (st == KVQ_ERR_NO_DEVICE) {
            printf("SKIP: %s\n", kvq_last_error());
            return 77;
        }
        return die("llama_gpu_load", st);
    }
    if ((st = llama_load(gf, &cm))) return die("llama_load", st);
    const llama_config *c = &cm->cfg;
    const int V = c->vocab_size;
    printf("%s: dim %d, %d layers, %d/%d heads of %d, vocab %d; GPU weights %.1f MiB\n", argv[1], c->dim, c->n_layers,
           c->n_heads, c->n_kv_heads, c->head_dim, V, llama_gpu_weight_bytes(gm) / 1048576.0);
    int32_t tok[N_POS];
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < N_POS; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = (int32_t)((s >> 33) % (uint64_t)V);
    }
    float *lc = malloc((size_t)N_POS * V * sizeof(float)), *lg = malloc((size_t)N_POS * V * sizeof(float));
    float *ld = malloc((size_t)V * sizeof(float));
    if (!lc || !lg || !ld) return die("malloc", KVQ_ERR_OUT_OF_MEMORY);
    char list[64];
    snprintf(list, sizeof list, "%s", types);
    for (char *name = strtok(list, ","); name; name = strtok(NULL, ",")) {
        kvq_type t;
        /* "layers": per-layer types (llama_ctx_params.layer_types): layer 0 q8 keys / q2 values, the second half of
         * the layers q2, the rest q4; one GPU cache per group, each layer's rotation seeded by its model number */
        const bool layers = !strcmp(name, "layers");
        if (layers) t = KVQ_TYPE_Q2; /* the bounds of its lowest type */
        else if (kvq_type_from_name(name, &t)) return die(name, KVQ_ERR_UNSUPPORTED_TYPE);
        /* the types' own bounds on max |difference| and the RMS share (logits ~N(0, 4)); the header says why */
        double bound = t == KVQ_TYPE_F16 ? 0.04 : t == KVQ_TYPE_Q8 ? 0.2 : t == KVQ_TYPE_Q4 ? 0.5 : 1.0; /* q3: q2's (new) */
        double rms_bound = t == KVQ_TYPE_F16 ? 0.005 : 0.02;
        llama_ctx_params p = params(layers ? KVQ_TYPE_Q4 : t);
        llama_layer_types lt[2] = {{0, 0, KVQ_TYPE_Q8, KVQ_TYPE_Q2}, {c->n_layers / 2, c->n_layers - 1, KVQ_TYPE_Q2, KVQ_TYPE_Q2}};
        if (layers) p.n_layer_types = c->n_layers / 2 > 0 ? 2 : 1, p.layer_types = lt;
        llama_ctx *cc;
        llama_gpu_ctx *gc, *gd;
        if ((st = llama_ctx_create(cm, &p, &cc))) return die("llama_ctx_create", st);
        if ((st = llama_gpu_ctx_create(gm, &p, &gc))) return die("llama_gpu_ctx_create", st);
        if ((st = llama_gpu_ctx_create(gm, &p, &gd))) return die("llama_gpu_ctx_create (decode)", st);
        for (int b = 0; b < N_POS; b += CHUNK) {
            if ((st = llama_forward(cc, tok + b, CHUNK, lc + (size_t)b * V, 0))) return die("llama_forward", st);
            if ((st = llama_gpu_forward(gc, tok + b, CHUNK, lg + (size_t)b * V, 0))) return die("llama_gpu_forward", st);
        }
        int agree = 0, clear_flips = 0;
        int64_t bad = 0; /* NaN or Inf on either side */
        double maxd = 0, sd2 = 0, sl2 = 0, expect = 0, worst_z = 0;
        for (int i = 0; i < N_POS; i++) {
            const float *a = lc + (size_t)i * V, *g = lg + (size_t)i * V;
            int ia = 0, ig = 0;
            double m1 = 0, m2 = 0; /* this position's differences: mean, mean square */
            int64_t nf = 0;
            for (int j = 0; j < V; j++) {
                if (a[j] > a[ia]) ia = j;
                if (g[j] > g[ig]) ig = j;
                double d = (double)g[j] - a[j];
                if (!isfinite(d)) {
                    bad++;
                    continue;
                }
                if (fabs(d) > maxd) maxd = fabs(d);
                sd2 += d * d;
                sl2 += (double)a[j] * a[j];
                m1 += d, m2 += d * d, nf++;
            }
            agree += ia == ig;
            if (!nf) continue;
            m1 /= nf, m2 /= nf;
            /* the spread of this position's differences; a shift common to every token changes no choice */
            double sg = sqrt(fmax(m2 - m1 * m1, 0)) * sqrt(2.0);
            if (!(sg > 0)) sg = 1e-30;
            for (int j = 0; j < V; j++) /* P(GPU ranks j above the CPU's top-1), summed: the expected flips */
                if (j != ia && a[ia] - a[j] < 10 * sg) expect += 0.5 * erfc((a[ia] - a[j]) / sg / sqrt(2.0));
            if (ia != ig) {
                double z = ((double)a[ia] - a[ig]) / sg;
                if (z > worst_z) worst_z = z;
                clear_flips += !(z <= Z_TOP1); /* NaN counts */
            }
        }
        char what[160];
        double top1 = 100.0 * agree / N_POS, rel = sqrt(sd2 / sl2);
        int flips = N_POS - agree;
        printf("info %s: top-1 agreement over %d positions: %.2f%% raw (%d disagree; the largest CPU margin among them "
               "%.2f standard deviations of the difference)\n",
               name, N_POS, top1, flips, worst_z);
        snprintf(what, sizeof what, "%s: top-1 disagreements where the CPU's margin exceeds %.0f standard deviations", name,
                 Z_TOP1);
        check(clear_flips == 0, "%.0f (expected %.0f)", clear_flips, 0, what);
        double flip_max = expect + 4 * sqrt(expect) + 2;
        snprintf(what, sizeof what, "%s: top-1 disagreements vs %.2f expected from the differences", name, expect);
        check(flips <= flip_max, "%.0f (<= %.1f)", flips, flip_max, what);
        snprintf(what, sizeof what, "%s: non-finite logits", name);
        check(bad == 0, "%.0f (expected %.0f)", (double)bad, 0.0, what);
        snprintf(what, sizeof what, "%s: max |logit GPU - CPU|", name);
        check(maxd <= bound, "%.4g (<= %.3g)", maxd, bound, what);
        snprintf(what, sizeof what, "%s: RMS difference / RMS logit", name);
        check(rel <= rms_bound && sl2 > 0, "%.3g (<= %.3g)", rel, rms_bound, what);
        /* decode after prefill: the same GPU logits, a token at a time through the decode kernel */
        const double dec_bound = 0.03;
        for (int b = 0; b < N_POS - N_DEC; b += CHUNK) {
            int n = N_POS - N_DEC - b < CHUNK ? N_POS - N_DEC - b : CHUNK;
            if ((st = llama_gpu_forward(gd, tok + b, n, NULL, n))) return die("llama_gpu_forward (prefill)", st);
        }
        double maxdd = 0;
        for (int i = N_POS - N_DEC; i < N_POS; i++) {
            if ((st = llama_gpu_forward(gd, tok + i, 1, ld, 0))) return die("llama_gpu_forward (decode)", st);
            const float *g = lg + (size_t)i * V;
            for (int j = 0; j < V; j++) {
                double d = fabs((double)ld[j] - g[j]);
                if (!(d <= maxdd)) maxdd = isnan(d) ? INFINITY : d; /* a NaN fails the bound */
            }
        }
        snprintf(what, sizeof what, "%s: decode after prefill vs prefill, max |difference| over %d tokens", name, N_DEC);
        check(maxdd <= dec_bound, "%.4g (<= %.3g)", maxdd, dec_bound, what);
        if (llama_gpu_ctx_pos(gd) != N_POS) {
            printf("FAIL %s: GPU context at position %lld, expected %d\n", name, (long long)llama_gpu_ctx_pos(gd), N_POS);
            fails++;
        }
        /* a context that is full says so, with the CPU engine's error */
        st = llama_gpu_forward(gd, tok, 1, ld, 0);
        check(st == KVQ_ERR_CACHE_FULL, "status %.0f (expected %.0f, KVQ_ERR_CACHE_FULL)", st, KVQ_ERR_CACHE_FULL,
              "a full context refuses the next token");
        /* several sequences at once against each alone */
        llama_gpu_ctx *gp;
        if ((st = llama_gpu_ctx_create_par(gm, &p, NS, &gp))) return die("llama_gpu_ctx_create_par", st);
        float *lb = malloc((size_t)STEPS * NS * V * sizeof(float));
        if (!lb) return die("malloc", KVQ_ERR_OUT_OF_MEMORY);
        int len[NS], off[NS];
        for (int q = 0; q < NS; q++) {
            len[q] = 100 + 37 * q, off[q] = 11 * q; /* tokens off .. off + len + STEPS - 1 < N_POS */
            for (int b = 0; b < len[q]; b += CHUNK) {
                int n = len[q] - b < CHUNK ? len[q] - b : CHUNK;
                if ((st = llama_gpu_forward_seq(gp, q, tok + off[q] + b, n, NULL, n))) return die("forward_seq", st);
            }
        }
        for (int k = 0; k < STEPS; k++) {
            int32_t bt[NS];
            for (int q = 0; q < NS; q++) bt[q] = tok[off[q] + len[q] + k];
            if ((st = llama_gpu_decode_batch(gp, bt, lb + (size_t)k * NS * V))) return die("llama_gpu_decode_batch", st);
        }
        double maxdb = 0;
        for (int q = 0; q < NS; q++) {
            if ((st = llama_gpu_ctx_reset(gd))) return die("reset", st);
            for (int b = 0; b < len[q]; b += CHUNK) {
                int n = len[q] - b < CHUNK ? len[q] - b : CHUNK;
                if ((st = llama_gpu_forward(gd, tok + off[q] + b, n, NULL, n))) return die("forward (alone)", st);
            }
            for (int k = 0; k < STEPS; k++) {
                if ((st = llama_gpu_forward(gd, tok + off[q] + len[q] + k, 1, ld, 0))) return die("decode (alone)", st);
                const float *g = lb + ((size_t)k * NS + q) * V;
                for (int j = 0; j < V; j++) {
                    double d = fabs((double)ld[j] - g[j]);
                    if (!(d <= maxdb)) maxdb = isnan(d) ? INFINITY : d;
                }
            }
            if (llama_gpu_ctx_seq_pos(gp, q) != len[q] + STEPS) {
                printf("FAIL %s: sequence %d at %lld, expected %d\n", name, q, (long long)llama_gpu_ctx_seq_pos(gp, q),
                       len[q] + STEPS);
                fails++;
            }
        }
        snprintf(what, sizeof what, "%s: %d sequences decoded together vs alone, max |difference| over %d steps", name, NS,
                 STEPS);
        check(maxdb <= dec_bound, "%.4g (<= %.3g)", maxdb, dec_bound, what);
        free(lb);
        llama_gpu_ctx_free(gp);
        if (t == KVQ_TYPE_Q4 && !layers) {
            /* decode_attn: a chunk's queries attend token by token (its q4 early tokens still exact, where a prefill
             * flushes them first): the logits of the same tokens fed one at a time, within dec_bound */
            llama_ctx_params pd = p;
            pd.decode_attn = 1;
            llama_gpu_ctx *ga, *gb;
            if ((st = llama_gpu_ctx_create(gm, &pd, &ga))) return die("llama_gpu_ctx_create (decode_attn)", st);
            if ((st = llama_gpu_ctx_create(gm, &p, &gb))) return die("llama_gpu_ctx_create (one at a time)", st);
            for (int b = 0; b < N_POS; b += CHUNK)
                if ((st = llama_gpu_forward(ga, tok + b, CHUNK, lg + (size_t)b * V, 0))) return die("forward (decode_attn)", st);
            double maxda = 0;
            for (int i = 0; i < N_POS; i++) {
                if ((st = llama_gpu_forward(gb, tok + i, 1, ld, 0))) return die("forward (one at a time)", st);
                for (int j = 0; j < V; j++) {
                    double d = fabs((double)ld[j] - lg[(size_t)i * V + j]);
                    if (!(d <= maxda)) maxda = isnan(d) ? INFINITY : d;
                }
            }
            snprintf(what, sizeof what, "%s: decode_attn chunks of %d vs one token at a time, max |difference|", name, CHUNK);
            const double da_bound = 0.06; /* see Bounds above */
            check(maxda <= da_bound, "%.4g (<= %.3g)", maxda, da_bound, what);
            llama_gpu_ctx_free(ga);
            llama_gpu_ctx_free(gb);
        }
        if ((st = graph_ab(gm, &p, tok, V, name))) return die("CUDA graphs on vs off", st);
        llama_ctx_free(cc);
        llama_gpu_ctx_free(gc);
        llama_gpu_ctx_free(gd);
    }
    /* bad arguments: named errors, nothing run */
    llama_ctx_params p = params(KVQ_TYPE_Q4);
    llama_gpu_ctx *gx = NULL;
    p.prerope = 1;
    st = llama_gpu_ctx_create(gm, &p, &gx);
    check(st == KVQ_ERR_INVALID_ARG && !gx, "status %.0f (expected %.0f)", st, KVQ_ERR_INVALID_ARG, "prerope = 1 refused");
    p.prerope = 0;
    llama_layer_types over[2] = {{0, 1, KVQ_TYPE_Q8, KVQ_TYPE_Q8}, {1, 1, KVQ_TYPE_Q2, KVQ_TYPE_Q2}};
    p.n_layer_types = 2, p.layer_types = over;
    st = llama_gpu_ctx_create(gm, &p, &gx);
    check(st == KVQ_ERR_INVALID_ARG && !gx, "status %.0f (expected %.0f)", st, KVQ_ERR_INVALID_ARG,
          "overlapping per-layer types refused");
    over[1].first = over[1].last = c->n_layers;
    st = llama_gpu_ctx_create(gm, &p, &gx);
    check(st == KVQ_ERR_INVALID_ARG && !gx, "status %.0f (expected %.0f)", st, KVQ_ERR_INVALID_ARG,
          "per-layer types past the model's layers refused");
    p.n_layer_types = 0, p.layer_types = NULL;
    if ((st = llama_gpu_ctx_create(gm, &p, &gx))) return die("llama_gpu_ctx_create", st);
    int32_t badtok = V;
    st = llama_gpu_forward(gx, &badtok, 1, ld, 0);
    check(st == KVQ_ERR_INVALID_ARG && llama_gpu_ctx_pos(gx) == 0, "status %.0f (expected %.0f), nothing appended", st,
          KVQ_ERR_INVALID_ARG, "token id out of range");
    st = llama_gpu_forward(gx, tok, CHUNK + 1, ld, 0);
    check(st == KVQ_ERR_INVALID_ARG, "status %.0f (expected %.0f)", st, KVQ_ERR_INVALID_ARG, "more tokens than max_batch");
    llama_gpu_ctx_free(gx);
    free(lc), free(lg), free(ld);
    llama_free(cm);
    llama_gpu_free(gm);
    gguf_close(gf);
    printf("%s\n", fails ? "FAILED" : "all passed");
    return fails ? 1 : 0;
}
