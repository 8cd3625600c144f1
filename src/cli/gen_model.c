/* kvq gen-model: writes a GGUF of a named Llama-family shape with seeded random weights, so that the engines (CPU and
 * GPU) and the benchmarks run on models of real sizes where the real files cannot be carried.
 *
 * Weights: every value of a projection W[out][in] is uniform on +-sqrt(3 / in) (variance 1/in, the fan-in init), so
 * an RMS-normalized input gives outputs of unit variance: q, k, v, gate, up ~ 1 per element, attention scores
 * q.k / sqrt(head_dim) ~ 1 (softmax neither uniform nor one-hot), and each block adds O(1) to the residual stream
 * (its RMS grows like sqrt(layers): ~6 after 32). token_embd is uniform with variance 1 when the output head is its
 * own tensor, and 4 / dim when it is tied (tok_embd is then also the head); output.weight has variance 4 / dim: logits
 * ~ N(0, 2^2). Norm weights are 1. RoPE base, epsilon and context are the real model's (--ctx overrides the context).
 * Uniform rather than normal: same variance, one multiply per value (the 8B shape has 8e9 of them).
 *
 * Tokenizer: a byte-level BPE vocabulary of the shape's real size (embedding and head sizes count in memory
 * figures): 3 control tokens (<|endoftext|>, <|im_start|>, <|im_end|>), the 256 byte symbols, then every
 * two-symbol string and as many three-symbol strings as the size needs, each with its merge (prefix, last symbol).
 * The text they spell is synthetic; the engine's tokenizer and llama.cpp's load it.
 *
 * The file is written as it is generated (one slab of rows at a time): memory stays at a few MiB whatever the
 * shape (the 8B shape is 16 GB in F16). */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "gguf.h"
#include "gguf_write.h"

typedef struct shape {
    const char *name, *pre;
    int dim, layers, heads, kv_heads, hidden, vocab, ctx, tied;
    double rope_base, eps;
} shape;

/* The real models' hyper-parameters (their config.json). */
static const shape SHAPES[] = {
    {"smollm2-135m", "smollm", 576, 30, 9, 3, 1536, 49152, 8192, 1, 100000.0, 1e-5},
    {"llama3-8b", "llama-bpe", 4096, 32, 32, 8, 14336, 128256, 8192, 0, 500000.0, 1e-5},
    {"llama2-7b", "default", 4096, 32, 32, 32, 11008, 32000, 4096, 0, 10000.0, 1e-5},
};

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvq gen-model --shape NAME -o FILE [--wtype f16|q8_0|q4_0] [--seed N] [--ctx N] [--layers N]\n"
            "Writes a GGUF with the shape, hyper-parameters and vocabulary size of a real model and seeded random\n"
            "weights of unit-variance activations (src/cli/gen_model.c says how), streamed to disk.\n\n"
            "  --shape NAME            smollm2-135m (dim 576, 30 layers, 9/3 heads of 64, vocab 49152, tied head),\n"
            "                          llama3-8b (4096, 32 layers, 32/8 heads of 128, ffn 14336, vocab 128256),\n"
            "                          llama2-7b (4096, 32 layers, 32/32 heads of 128, ffn 11008, vocab 32000)\n"
            "  -o, --output FILE       the GGUF to write\n"
            "  --wtype T               weight type of the matrices and the embedding: f16 (default), q8_0, q4_0\n"
            "                          (norms stay f32, as llama.cpp writes them)\n"
            "  -s, --seed N            seed of the weights (default 1)\n"
            "  -c, --ctx N             context_length written (default: the real model's)\n"
            "  --layers N              fewer (or more) layers than the real model (tests: a 2-layer 8B shape)\n");
}

/* splitmix64: a seeded stream per tensor, so a tensor's values do not depend on the others' sizes */
static uint64_t mix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

typedef struct tensor_plan {
    char name[48];
    int64_t in, out; /* ne0 (contiguous), ne1 (1 for a norm) */
    uint32_t type;
    double scale; /* uniform on +-scale; 0: all ones (norms) */
} tensor_plan;

/* Symbol code points of GPT-2's byte-level alphabet, in byte order. */
static void byte_symbols(uint32_t sym[256]) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        sym[b] = printable ? (uint32_t)b : (uint32_t)(256 + n++);
    }
}

static int utf8(uint32_t c, char *o) {
    if (c < 0x80) return o[0] = (char)c, 1;
    o[0] = (char)(0xC0 | (c >> 6));
    o[1] = (char)(0x80 | (c & 0x3F));
    return 2; /* the symbols are < 0x800 */
}

int kvq_cli_gen_model(int argc, char **argv) {
    const char *shape_name = NULL, *outp = NULL, *wname = "f16";
    uint64_t seed = 1;
    int64_t ctx = 0, layers = 0;
    char err[KVQ_CLI_ERR_LEN];
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        static const char *const valued[] = {"--shape", "-o", "--output", "--wtype", "-s", "--seed", "-c", "--ctx", "--layers"};
        if (kvq_cli_valued_option("gen-model", a, v, valued, sizeof valued / sizeof valued[0])) return 2;
        i++;
        int bad = 0;
        if (!strcmp(a, "--shape")) shape_name = v;
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) outp = v;
        else if (!strcmp(a, "--wtype")) wname = v;
        else if (!strcmp(a, "-s") || !strcmp(a, "--seed")) bad = kvq_cli_parse_u64(v, &seed, a, err, sizeof err);
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx")) bad = kvq_cli_parse_i64(v, 16, 1 << 24, &ctx, a, err, sizeof err);
        else bad = kvq_cli_parse_i64(v, 1, 1024, &layers, a, err, sizeof err);
        if (bad) {
            fprintf(stderr, "kvq gen-model: %s\n", err);
            return 2;
        }
    }
    const shape *sh = NULL;
    for (size_t i = 0; shape_name && i < sizeof SHAPES / sizeof SHAPES[0]; i++)
        if (!strcmp(shape_name, SHAPES[i].name)) sh = &SHAPES[i];
    if (!sh) {
        fprintf(stderr, "kvq gen-model: --shape %s: %s (smollm2-135m, llama3-8b, llama2-7b)\n",
                shape_name ? shape_name : "is required", shape_name ? "unknown shape" : "give one of");
        return 2;
    }
    uint32_t wtype;
    if (!strcmp(wname, "f16")) wtype = GGML_F16;
    else if (!strcmp(wname, "q8_0")) wtype = GGML_Q8_0;
    else if (!strcmp(wname, "q4_0")) wtype = GGML_Q4_0;
    else {
        fprintf(stderr, "kvq gen-model: --wtype: '%s' is not f16, q8_0 or q4_0\n", wname);
        return 2;
    }
    if (!outp) {
        fprintf(stderr, "kvq gen-model: -o FILE is required\n");
        return 2;
    }
    const int L = layers ? (int)layers : sh->layers, dim = sh->dim, hd = dim / sh->heads, kvd = sh->kv_heads * hd;
    const int hid = sh->hidden, V = sh->vocab;

    /* ---- the tensors, in llama.cpp's order ---- */
    int n_t = 2 + !sh->tied + 9 * L;
    tensor_plan *tp = calloc((size_t)n_t, sizeof *tp);
    gguf_wtensor *wt = calloc((size_t)n_t, sizeof *wt);
    /* vocabulary */
    char **toks = calloc((size_t)V, sizeof *toks), **merges = calloc((size_t)V, sizeof *merges);
    int32_t *ttype = calloc((size_t)V, sizeof *ttype);
    FILE *f = NULL;
    float *fbuf = NULL;
    uint8_t *qbuf = NULL;
    int rc = 1, n_merges = 0;
    if (!tp || !wt || !toks || !merges || !ttype) goto oom;
    int k = 0;
#define PLAN(nm, i_, o_, ty, sc) (snprintf(tp[k].name, sizeof tp[k].name, "%s", nm), tp[k].in = (i_), tp[k].out = (o_), \
                                   tp[k].type = (ty), tp[k].scale = (sc), k++)
    PLAN("token_embd.weight", dim, V, wtype, sh->tied ? sqrt(3.0 * 4.0 / dim) : sqrt(3.0));
    PLAN("output_norm.weight", dim, 1, GGML_F32, 0.0);
    if (!sh->tied) PLAN("output.weight", dim, V, wtype, sqrt(3.0 * 4.0 / dim));
    for (int l = 0; l < L; l++) {
        char nm[48];
#define BLK(suf, i_, o_, ty, sc) (snprintf(nm, sizeof nm, "blk.%d.%s.weight", l, suf), PLAN(nm, i_, o_, ty, sc))
        BLK("attn_norm", dim, 1, GGML_F32, 0.0);
        BLK("attn_q", dim, dim, wtype, sqrt(3.0 / dim));
        BLK("attn_k", dim, kvd, wtype, sqrt(3.0 / dim));
        BLK("attn_v", dim, kvd, wtype, sqrt(3.0 / dim));
        BLK("attn_output", dim, dim, wtype, sqrt(3.0 / dim));
        BLK("ffn_norm", dim, 1, GGML_F32, 0.0);
        BLK("ffn_gate", dim, hid, wtype, sqrt(3.0 / dim));
        BLK("ffn_up", dim, hid, wtype, sqrt(3.0 / dim));
        BLK("ffn_down", hid, dim, wtype, sqrt(3.0 / hid));
#undef BLK
    }
#undef PLAN
    for (int i = 0; i < n_t; i++) {
        wt[i].name = tp[i].name;
        wt[i].n_dims = tp[i].out > 1 ? 2 : 1;
        wt[i].ne[0] = (uint64_t)tp[i].in;
        wt[i].ne[1] = (uint64_t)tp[i].out;
        wt[i].ne[2] = wt[i].ne[3] = 1;
        wt[i].type = tp[i].type;
    }

    /* ---- vocabulary: controls, bytes, then 2- and 3-symbol strings with their merges ---- */
    static const char *const ctl[3] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
    uint32_t sym[256];
    byte_symbols(sym);
    int id = 0;
    for (int i = 0; i < 3; i++, id++) {
        if (!(toks[id] = strdup(ctl[i]))) goto oom;
        ttype[id] = 3;
    }
    for (int b = 0; b < 256 && id < V; b++, id++) {
        char s[4];
        s[utf8(sym[b], s)] = '\0';
        if (!(toks[id] = strdup(s))) goto oom;
        ttype[id] = 1;
    }
    for (int len = 2; len <= 3 && id < V; len++) {
        uint64_t count = len == 2 ? 256u * 256u : 256u * 256u * 256u;
        for (uint64_t c = 0; c < count && id < V; c++, id++) {
            int s0 = (int)(c / (len == 2 ? 256 : 65536)), s1 = (int)(c / (len == 2 ? 1 : 256) % 256), s2 = (int)(c % 256);
            char s[8], m[12];
            int p = utf8(sym[s0], s);
            p += utf8(sym[s1], s + p);
            int pre = len == 2 ? utf8(sym[s0], s) : p; /* bytes of the prefix token */
            if (len == 3) p += utf8(sym[s2], s + p);
            s[p] = '\0';
            memcpy(m, s, (size_t)pre);
            m[pre] = ' ';
            memcpy(m + pre + 1, s + pre, (size_t)(p - pre) + 1);
            if (!(toks[id] = strdup(s)) || !(merges[n_merges++] = strdup(m))) goto oom;
            ttype[id] = 1;
        }
    }

    char arch_key[12][64];
    static const char *const keys[] = {"context_length", "embedding_length", "block_count", "feed_forward_length",
                                       "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                                       "attention.layer_norm_rms_epsilon", "rope.dimension_count"};
    for (int i = 0; i < 9; i++) snprintf(arch_key[i], sizeof arch_key[i], "llama.%s", keys[i]);
    char gname[64];
    snprintf(gname, sizeof gname, "kvq synthetic %s (seed %llu)", sh->name, (unsigned long long)seed);
    uint32_t file_type = wtype == GGML_F16 ? 1 : wtype == GGML_Q8_0 ? 7 : 2; /* llama_ftype: MOSTLY_F16/Q8_0/Q4_0 */
    gguf_wkv kv[] = {
        {.key = "general.architecture", .type = GGUF_STRING, .s = "llama"},
        {.key = "general.name", .type = GGUF_STRING, .s = gname},
        {.key = "general.alignment", .type = GGUF_U32, .u = 32},
        {.key = "general.file_type", .type = GGUF_U32, .u = file_type},
        {.key = arch_key[0], .type = GGUF_U32, .u = (uint64_t)(ctx ? ctx : sh->ctx)},
        {.key = arch_key[1], .type = GGUF_U32, .u = (uint64_t)dim},
        {.key = arch_key[2], .type = GGUF_U32, .u = (uint64_t)L},
        {.key = arch_key[3], .type = GGUF_U32, .u = (uint64_t)hid},
        {.key = arch_key[4], .type = GGUF_U32, .u = (uint64_t)sh->heads},
        {.key = arch_key[5], .type = GGUF_U32, .u = (uint64_t)sh->kv_heads},
        {.key = arch_key[6], .type = GGUF_F32, .f = sh->rope_base},
        {.key = arch_key[7], .type = GGUF_F32, .f = sh->eps},
        {.key = arch_key[8], .type = GGUF_U32, .u = (uint64_t)hd},
        {.key = "tokenizer.ggml.model", .type = GGUF_STRING, .s = "gpt2"},
        {.key = "tokenizer.ggml.pre", .type = GGUF_STRING, .s = sh->pre},
        {.key = "tokenizer.ggml.tokens", .type = GGUF_ARRAY, .arr_type = GGUF_STRING, .arr_n = (uint64_t)V,
         .arr_strs = (const char *const *)toks},
        {.key = "tokenizer.ggml.token_type", .type = GGUF_ARRAY, .arr_type = GGUF_I32, .arr_n = (uint64_t)V, .arr_i32 = ttype},
        {.key = "tokenizer.ggml.merges", .type = GGUF_ARRAY, .arr_type = GGUF_STRING, .arr_n = (uint64_t)n_merges,
         .arr_strs = (const char *const *)merges},
        {.key = "tokenizer.ggml.bos_token_id", .type = GGUF_U32, .u = 0},
        {.key = "tokenizer.ggml.eos_token_id", .type = GGUF_U32, .u = 0},
        {.key = "tokenizer.ggml.add_bos_token", .type = GGUF_BOOL, .u = 0},
    };
    double t0 = kvq_cli_now();
    f = fopen(outp, "wb");
    if (!f) {
        perror(outp);
        fprintf(stderr, "kvq gen-model: cannot write '%s'\n", outp);
        goto done;
    }
    setvbuf(f, NULL, _IOFBF, 1 << 22);
    uint64_t data_bytes, params = 0;
    if (gguf_write_header(f, kv, sizeof kv / sizeof kv[0], wt, (size_t)n_t, &data_bytes)) goto werr;
    /* slabs of whole rows, ~4M values */
    const int64_t slab_vals = 1 << 22;
    fbuf = malloc((size_t)(slab_vals + hid + V) * sizeof *fbuf);
    qbuf = malloc(gguf_row_bytes(GGML_F32, (size_t)(slab_vals + hid + V)));
    if (!fbuf || !qbuf) goto oom;
    for (int i = 0; i < n_t; i++) {
        const tensor_plan *p = &tp[i];
        uint64_t written = 0;
        int64_t rows = p->out, per = slab_vals / p->in > 0 ? slab_vals / p->in : 1;
        const float a = (float)p->scale;
        const size_t rb = gguf_row_bytes(p->type, (size_t)p->in);
        for (int64_t r0 = 0; r0 < rows; r0 += per) {
            int64_t nr = rows - r0 < per ? rows - r0 : per;
            /* rows in parallel: each row its own stream (seed, tensor, row), so the bytes do not depend on threads */
#pragma omp parallel for schedule(static)
            for (int64_t r = 0; r < nr; r++) {
                uint64_t s = seed * 0x100000001b3ull ^ ((uint64_t)i << 40) ^ (uint64_t)(r0 + r) * 0x9e3779b97f4a7c15ull;
                float *x = fbuf + (size_t)(r * p->in);
                for (int64_t j = 0; j < p->in; j++)
                    x[j] = a == 0 ? 1.0f : a * (float)((double)(mix(&s) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
                gguf_quantize_row(p->type, x, (size_t)p->in, qbuf + (size_t)r * rb); /* valid: ne0 % 32 == 0 */
            }
            size_t nb = (size_t)nr * rb;
            if (fwrite(qbuf, 1, nb, f) != nb) goto werr;
            written += nb;
        }
        if (gguf_write_pad(f, written)) goto werr;
        params += (uint64_t)(p->in * p->out);
    }
    if (fclose(f)) {
        f = NULL;
        goto werr;
    }
    f = NULL;
    double dt = kvq_cli_now() - t0;
    char sz[32];
    kvq_cli_fmt_bytes((double)data_bytes, sz, sizeof sz);
    printf("kvq gen-model: %s: %s shape, %d layers, %.3fe9 parameters (%s), vocab %d, %s of tensor data in %.1f s "
           "(%.0f MB/s)\n", outp, sh->name, L, (double)params / 1e9, wname, V, sz, dt, (double)data_bytes / 1e6 / dt);
    rc = 0;
    goto done;
werr:
    fprintf(stderr, "kvq gen-model: writing '%s' failed (disk full?)\n", outp);
    goto done;
oom:
    fprintf(stderr, "kvq gen-model: out of memory\n");
done:
    if (f) fclose(f);
    if (rc && outp) remove(outp);
    free(fbuf);
    free(qbuf);
    for (int i = 0; toks && i < V; i++) free(toks[i]);
    for (int i = 0; merges && i < n_merges; i++) free(merges[i]);
    free(toks);
    free(merges);
    free(ttype);
    free(tp);
    free(wt);
    return rc;
}
