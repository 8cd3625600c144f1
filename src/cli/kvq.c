/* kvq: command-line front end. Runs a GGUF Llama-family model with its KV cache stored by libkvq in 16/8/4/2 bits.
 *   kvq run         generate text (streams tokens, then a speed and KV memory footer)
 *   kvq perplexity  perplexity of a text file, one KV type or a comparison table of several
 *   kvq capacity    the longest context each KV type fits in a memory budget
 *   kvq tokenize    token ids of a text (for checking the tokenizer) */
#define _POSIX_C_SOURCE 200809L
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "gguf.h"
#include "kvq.h"
#include "llama.h"
#include "model_err.h"
#include "tokenizer.h"

/* OpenBLAS extension: not in every cblas.h. */
void openblas_set_num_threads(int num_threads);

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int die(const char *what, kvq_status st) {
    const char *msg = kvqm_last_error();
    fprintf(stderr, "kvq: %s: %s%s%s\n", what, kvq_strerror(st), *msg ? ": " : "", msg);
    return 1;
}

/* ----------------------------------------------------------------------------------------------------------
 * Options shared by the subcommands
 * -------------------------------------------------------------------------------------------------------- */
typedef struct opts {
    const char *model, *prompt, *file, *compare, *mem, *system;
    int n_predict, ctx, chunks, chat, threads, batch, residual, group, ids, quiet;
    float temp, top_p;
    uint64_t seed;
    kvq_type type_k, type_v;
} opts;

static const char *const KV_HELP =
    "  --kv-type T        KV cache type for keys and values: f16, bf16, q8, fp8, q4, q2 (default f16)\n"
    "  --kv-type-k T      key type alone\n"
    "  --kv-type-v T      value type alone\n"
    "  --residual R       fp16 residual window of the grouped types q4/q2 (default: libkvq's, 64)\n"
    "  --group G          q4/q2 group size: 16, 32, 64 or 128 (default: libkvq's, 64)\n"
    "  -t, --threads N    threads for BLAS and attention (default: all cores)\n"
    "  --batch N          tokens per forward call in prefill (default 256)\n";

static void usage_main(FILE *o) {
    fprintf(o, "usage: kvq <command> [options]   (kvq <command> --help for its options)\n\n"
               "commands:\n"
               "  run         generate text from a prompt with a quantized KV cache\n"
               "  perplexity  perplexity of a text file (--compare f16,q8,q4,q2 for a table)\n"
               "  capacity    longest context each KV type fits in a memory budget\n"
               "  tokenize    print the token ids of a text\n"
               "  version     print the library version\n");
}

static void usage_run(FILE *o) {
    fprintf(o, "usage: kvq run -m MODEL -p PROMPT [options]\n"
               "Generates text and streams it to stdout; then prints prefill/decode speed and KV memory on stderr.\n\n"
               "  -m, --model FILE   GGUF model (Llama family, byte-level BPE vocabulary)\n"
               "  -p, --prompt TEXT  prompt\n"
               "  -n, --n-predict N  tokens to generate at most (default 256)\n"
               "  --chat             wrap the prompt in the model's chat template (ChatML)\n"
               "  --system TEXT      system prompt for --chat (default: the model's)\n"
               "  --temp T           sampling temperature; 0 = greedy (default 0.7)\n"
               "  --top-p P          nucleus sampling threshold (default 0.9)\n"
               "  --seed S           random seed (default 42)\n"
               "  --ctx N            context size to reserve (default: prompt + n-predict)\n"
               "%s", KV_HELP);
}

static void usage_ppl(FILE *o) {
    fprintf(o, "usage: kvq perplexity -m MODEL -f TEXTFILE [options]\n"
               "Cuts the text's tokens into chunks of --ctx tokens, runs each chunk from an empty cache and scores the\n"
               "second half of each chunk (every scored token sees at least ctx/2 tokens of context). Prints the\n"
               "perplexity with its standard error.\n\n"
               "  -m, --model FILE   GGUF model\n"
               "  -f, --file FILE    UTF-8 text\n"
               "  --ctx N            tokens per chunk (default 2048, at most the model's context_length)\n"
               "  --chunks N         use the first N chunks only (default: all)\n"
               "  --compare LIST     comma-separated KV configs run on the same tokens, one table; an entry is a type\n"
               "                     (q4) or K/V mix (q8/q4 = keys q8, values q4), optionally with :rR (residual\n"
               "                     window) and :gG (group size), e.g. f16,q8,q4,q4:r128,q4:g32,q2\n"
               "  -q, --quiet        no progress bar\n"
               "%s", KV_HELP);
}

static void usage_capacity(FILE *o) {
    fprintf(o, "usage: kvq capacity -m MODEL --mem SIZE\n"
               "Prints, for each KV type, the longest context (tokens of one sequence) whose KV cache fits in SIZE,\n"
               "as libkvq pages it (kvq_cache_capacity_tokens; the small fp16 residual window of q4/q2 is extra).\n\n"
               "  -m, --model FILE   GGUF model (only its shape is read)\n"
               "  --mem SIZE         memory for the KV cache: 4GiB, 512MiB, 2G, 1000000 (bytes)\n");
}

static void usage_tokenize(FILE *o) {
    fprintf(o, "usage: kvq tokenize -m MODEL (-p TEXT | -f FILE) [--ids]\n"
               "Prints the token count and an FNV-1a checksum of the ids (little-endian int32), or the ids with --ids.\n\n"
               "  --chat   apply the chat template to the text first\n");
}

static int parse_type(const char *s, kvq_type *t) {
    if (kvq_type_from_name(s, t) != KVQ_OK) {
        fprintf(stderr, "kvq: unknown KV type '%s' (f16, bf16, q8, fp8, q4, q2)\n", s);
        return -1;
    }
    return 0;
}

static int parse_int(const char *s, int lo, int hi, int *out, const char *name) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "kvq: %s: '%s' is not an integer in %d..%d\n", name, s, lo, hi);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse_float(const char *s, float *out, const char *name) {
    char *end;
    float v = strtof(s, &end);
    if (*end || end == s || !isfinite(v)) {
        fprintf(stderr, "kvq: %s: '%s' is not a number\n", name, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* "4GiB", "512MiB", "2G", "1.5GB", "123456": bytes; -1 if not parseable. */
static double parse_size(const char *s) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || !(v >= 0)) return -1;
    while (*end == ' ') end++;
    static const struct { const char *suf; double mul; } sufs[] = {
        {"", 1}, {"B", 1}, {"K", 1024.0}, {"KB", 1e3}, {"KiB", 1024.0}, {"M", 1048576.0}, {"MB", 1e6},
        {"MiB", 1048576.0}, {"G", 1073741824.0}, {"GB", 1e9}, {"GiB", 1073741824.0}, {"T", 1099511627776.0},
        {"TB", 1e12}, {"TiB", 1099511627776.0}};
    for (size_t i = 0; i < sizeof sufs / sizeof sufs[0]; i++)
        if (strcasecmp(end, sufs[i].suf) == 0 && (strcmp(end, sufs[i].suf) == 0 || strlen(end) > 1))
            return v * sufs[i].mul;
    return -1;
}

enum { CMD_RUN, CMD_PPL, CMD_CAP, CMD_TOK };

/* Returns 0 to go on, 1 for --help (printed), -1 on a bad option (message printed). */
static int parse_opts(int cmd, int argc, char **argv, opts *o) {
    memset(o, 0, sizeof *o);
    o->n_predict = 256;
    o->ctx = cmd == CMD_PPL ? 2048 : 0;
    o->temp = 0.7f;
    o->top_p = 0.9f;
    o->seed = 42;
    o->residual = -1;
    o->batch = 256;
    o->type_k = o->type_v = KVQ_TYPE_F16;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (strcmp(a, name) == 0)
#define NEED()                                                                                                    \
    do {                                                                                                          \
        if (!v) {                                                                                                 \
            fprintf(stderr, "kvq: option %s needs a value\n", a);                                                 \
            return -1;                                                                                            \
        }                                                                                                         \
        i++;                                                                                                      \
    } while (0)
        if (ARG("-h") || ARG("--help")) {
            void (*u[])(FILE *) = {usage_run, usage_ppl, usage_capacity, usage_tokenize};
            u[cmd](stdout);
            return 1;
        } else if (ARG("-m") || ARG("--model")) { NEED(); o->model = v; }
        else if (ARG("-p") || ARG("--prompt")) { NEED(); o->prompt = v; }
        else if (ARG("-f") || ARG("--file")) { NEED(); o->file = v; }
        else if (ARG("--system")) { NEED(); o->system = v; }
        else if (ARG("--compare")) { NEED(); o->compare = v; }
        else if (ARG("--mem")) { NEED(); o->mem = v; }
        else if (ARG("--chat")) o->chat = 1;
        else if (ARG("--ids")) o->ids = 1;
        else if (ARG("-q") || ARG("--quiet")) o->quiet = 1;
        else if (ARG("-n") || ARG("--n-predict")) { NEED(); if (parse_int(v, 0, 1 << 20, &o->n_predict, a)) return -1; }
        else if (ARG("--ctx")) { NEED(); if (parse_int(v, 2, 1 << 22, &o->ctx, a)) return -1; }
        else if (ARG("--chunks")) { NEED(); if (parse_int(v, 1, 1 << 20, &o->chunks, a)) return -1; }
        else if (ARG("-t") || ARG("--threads")) { NEED(); if (parse_int(v, 1, 1024, &o->threads, a)) return -1; }
        else if (ARG("--batch")) { NEED(); if (parse_int(v, 1, 8192, &o->batch, a)) return -1; }
        else if (ARG("--residual")) { NEED(); if (parse_int(v, 0, 4096, &o->residual, a)) return -1; }
        else if (ARG("--group")) { NEED(); if (parse_int(v, 16, 128, &o->group, a)) return -1; }
        else if (ARG("--temp")) { NEED(); if (parse_float(v, &o->temp, a)) return -1; }
        else if (ARG("--top-p")) { NEED(); if (parse_float(v, &o->top_p, a)) return -1; }
        else if (ARG("--seed")) { NEED(); o->seed = strtoull(v, NULL, 10); }
        else if (ARG("--kv-type")) { NEED(); if (parse_type(v, &o->type_k)) return -1; o->type_v = o->type_k; }
        else if (ARG("--kv-type-k")) { NEED(); if (parse_type(v, &o->type_k)) return -1; }
        else if (ARG("--kv-type-v")) { NEED(); if (parse_type(v, &o->type_v)) return -1; }
        else {
            fprintf(stderr, "kvq: unknown option '%s' (see --help)\n", a);
            return -1;
        }
#undef ARG
#undef NEED
    }
    if (!o->model) {
        fprintf(stderr, "kvq: -m MODEL is required (see --help; scripts/fetch-model.sh gets SmolLM2-135M-Instruct)\n");
        return -1;
    }
    if (o->threads > 0) openblas_set_num_threads(o->threads);
    return 0;
}

/* Model + tokenizer, loaded together. */
typedef struct loaded {
    gguf_file *gf;
    llama_model *m;
    kvq_tokenizer *tok;
} loaded;

static void unload(loaded *L) {
    tok_free(L->tok);
    llama_free(L->m);
    gguf_close(L->gf);
}

static int load(const opts *o, loaded *L, int need_weights) {
    memset(L, 0, sizeof *L);
    kvq_status st = gguf_open(o->model, &L->gf);
    if (st) return die("loading the model", st);
    if ((st = tok_load(L->gf, &L->tok))) {
        unload(L);
        return die("loading the tokenizer", st);
    }
    if (need_weights && (st = llama_load(L->gf, &L->m))) {
        unload(L);
        return die("loading the weights", st);
    }
    return 0;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (n < cap) break;
        char *nb = realloc(buf, cap * 2 + 1);
        if (!nb) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = nb;
        cap *= 2;
    }
    int err = ferror(f);
    fclose(f);
    if (!buf || err) {
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

static llama_ctx_params ctx_params(const opts *o, int n_ctx, kvq_type tk, kvq_type tv) {
    llama_ctx_params p = {.n_ctx = n_ctx, .max_batch = o->batch, .type_k = tk, .type_v = tv,
                          .residual = o->residual, .group = o->group, .n_threads = o->threads};
    return p;
}

static const char *type_name(kvq_type t) {
    const kvq_type_traits *tr = kvq_type_get_traits(t);
    return tr ? tr->name : "?";
}

static void fmt_bytes(double b, char *out, size_t n) {
    if (b >= 1073741824.0) snprintf(out, n, "%.2f GiB", b / 1073741824.0);
    else if (b >= 1048576.0) snprintf(out, n, "%.2f MiB", b / 1048576.0);
    else if (b >= 1024.0) snprintf(out, n, "%.1f KiB", b / 1024.0);
    else snprintf(out, n, "%.0f B", b);
}

/* ----------------------------------------------------------------------------------------------------------
 * run
 * -------------------------------------------------------------------------------------------------------- */
static uint64_t rng_next(uint64_t *s) { /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

typedef struct prob_idx {
    float p;
    int32_t i;
} prob_idx;

static int cmp_prob_desc(const void *a, const void *b) {
    float x = ((const prob_idx *)a)->p, y = ((const prob_idx *)b)->p;
    return x < y ? 1 : x > y ? -1 : 0;
}

static int32_t sample(const float *logits, int V, float temp, float top_p, uint64_t *rng, prob_idx *scratch) {
    int32_t best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    if (temp <= 0) return best;
    double sum = 0;
    for (int i = 0; i < V; i++) {
        scratch[i].p = expf((logits[i] - logits[best]) / temp);
        scratch[i].i = i;
        sum += scratch[i].p;
    }
    int n = V;
    if (top_p > 0 && top_p < 1) {
        /* Only candidates that can be in the nucleus need sorting: a token with p < (1 - top_p) / (V - 1) cannot be. */
        float cut = (float)((1.0 - top_p) / (V - 1) * sum);
        n = 0;
        for (int i = 0; i < V; i++)
            if (scratch[i].p >= cut) scratch[n++] = scratch[i];
        qsort(scratch, (size_t)n, sizeof *scratch, cmp_prob_desc);
        double acc = 0;
        int keep = n;
        for (int i = 0; i < n; i++) {
            acc += scratch[i].p;
            if (acc >= top_p * sum) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
        sum = acc;
    }
    double r = (double)(rng_next(rng) >> 11) / 9007199254740992.0 * sum, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += scratch[i].p;
        if (r < acc) return scratch[i].i;
    }
    return scratch[n - 1].i;
}

static int cmd_run(int argc, char **argv) {
    opts o;
    int r = parse_opts(CMD_RUN, argc, argv, &o);
    if (r) return r > 0 ? 0 : 2;
    if (!o.prompt) {
        fprintf(stderr, "kvq run: -p PROMPT is required\n");
        return 2;
    }
    loaded L;
    if (load(&o, &L, 1)) return 1;
    tok_ids prompt = {0};
    kvq_status st = KVQ_OK;
    if (tok_add_bos(L.tok) && tok_bos(L.tok) >= 0) st = tok_ids_push(&prompt, tok_bos(L.tok));
    if (!st) st = o.chat ? tok_encode_chat(L.tok, o.system, o.prompt, &prompt)
                         : tok_encode(L.tok, o.prompt, strlen(o.prompt), 1, &prompt);
    if (st) {
        unload(&L);
        return die("tokenizing the prompt", st);
    }
    if (prompt.n == 0) {
        fprintf(stderr, "kvq run: the prompt is empty\n");
        unload(&L);
        return 2;
    }
    int n_ctx = o.ctx ? o.ctx : (int)prompt.n + o.n_predict;
    if ((int)prompt.n >= n_ctx) {
        fprintf(stderr, "kvq run: prompt of %zu tokens does not fit --ctx %d\n", prompt.n, n_ctx);
        unload(&L);
        return 2;
    }
    if (n_ctx > L.m->cfg.ctx_len)
        fprintf(stderr, "kvq run: warning: context %d exceeds the model's trained context_length %d\n", n_ctx, L.m->cfg.ctx_len);
    llama_ctx_params cp = ctx_params(&o, n_ctx, o.type_k, o.type_v);
    llama_ctx *c = NULL;
    if ((st = llama_ctx_create(L.m, &cp, &c))) {
        unload(&L);
        return die("creating the context", st);
    }
    int V = L.m->cfg.vocab_size;
    float *logits = malloc((size_t)V * sizeof *logits);
    prob_idx *scratch = malloc((size_t)V * sizeof *scratch);
    int rc = 0;
    if (!logits || !scratch) {
        rc = die("allocating logits", KVQ_ERR_OUT_OF_MEMORY);
        goto done;
    }
    if (!o.chat) fwrite(o.prompt, 1, strlen(o.prompt), stdout);
    fflush(stdout);

    double t0 = now_s();
    for (size_t i = 0; i < prompt.n; i += (size_t)o.batch) {
        int n = (int)(prompt.n - i < (size_t)o.batch ? prompt.n - i : (size_t)o.batch);
        if ((st = llama_forward(c, prompt.ids + i, n, logits, n - 1))) {
            rc = die("prefill", st);
            goto done;
        }
    }
    double t1 = now_s();
    uint64_t rng = o.seed ? o.seed : 0x9e3779b97f4a7c15ull;
    int generated = 0;
    for (; generated < o.n_predict && llama_ctx_pos(c) < n_ctx; generated++) {
        int32_t tok = sample(logits, V, o.temp, o.top_p, &rng, scratch);
        if (tok_is_eog(L.tok, tok)) break;
        size_t len;
        const char *piece = tok_piece(L.tok, tok, &len);
        if (!tok_is_control(L.tok, tok)) fwrite(piece, 1, len, stdout);
        fflush(stdout);
        if (generated + 1 == o.n_predict || llama_ctx_pos(c) + 1 > n_ctx) {
            generated++;
            break;
        }
        if ((st = llama_forward(c, &tok, 1, logits, 0))) {
            rc = die("decode", st);
            goto done;
        }
    }
    double t2 = now_s();
    printf("\n");
    fflush(stdout);

    kvq_cache_stats s;
    kvq_cache_get_stats(llama_ctx_cache(c), &s);
    int64_t toks = llama_ctx_pos(c);
    char used[32], f16[32], res[32];
    fmt_bytes(s.bytes_per_token * (double)toks, used, sizeof used);
    fmt_bytes(s.f16_bytes_per_token * (double)toks, f16, sizeof f16);
    fmt_bytes((double)s.page_bytes_in_use + (double)s.window_bytes, res, sizeof res);
    int decoded = generated > 0 ? generated - 1 : 0; /* the first sampled token came from the prefill logits */
    fprintf(stderr, "\n--- kvq run: KV cache %s keys / %s values\n", type_name(o.type_k), type_name(o.type_v));
    fprintf(stderr, "prefill: %zu tokens in %.2f s (%.1f tok/s)   decode: %d tokens in %.2f s (%.1f tok/s)\n", prompt.n,
            t1 - t0, (double)prompt.n / (t1 - t0), decoded, t2 - t1, decoded > 0 ? decoded / (t2 - t1) : 0.0);
    fprintf(stderr, "KV cache: %lld tokens, %s (%.0f B/token) vs %s in F16 (%.0f B/token): %.2fx smaller\n",
            (long long)toks, used, s.bytes_per_token, f16, s.f16_bytes_per_token,
            s.bytes_per_token > 0 ? s.f16_bytes_per_token / s.bytes_per_token : 0.0);
    fprintf(stderr, "          resident now: %s (pages in use + fp16 residual windows)\n", res);
done:
    free(logits);
    free(scratch);
    tok_ids_free(&prompt);
    llama_ctx_free(c);
    unload(&L);
    return rc;
}

/* ----------------------------------------------------------------------------------------------------------
 * perplexity
 * -------------------------------------------------------------------------------------------------------- */
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
    double el = now_s() - t0, eta = done ? el / done * (total - done) : 0;
    fprintf(stderr, "\r%-8s [", label);
    for (int i = 0; i < w; i++) fputc(i < k ? '#' : '.', stderr);
    fprintf(stderr, "] %d/%d chunks  %.0fs elapsed, ~%.0fs left ", done, total, el, eta);
    if (done == total) fputc('\n', stderr);
    fflush(stderr);
}

static int run_ppl(const opts *o, const loaded *L, const int32_t *ids, int n_chunks, kvq_type tk, kvq_type tv,
                   int residual, int group, const char *label, ppl_result *res) {
    int ctx = o->ctx, V = L->m->cfg.vocab_size, first = ctx / 2;
    llama_ctx_params cp = ctx_params(o, ctx, tk, tv);
    cp.residual = residual;
    cp.group = group;
    llama_ctx *c = NULL;
    kvq_status st = llama_ctx_create(L->m, &cp, &c);
    if (st) return die("creating the context", st);
    float *logits = malloc((size_t)o->batch * (size_t)V * sizeof *logits);
    if (!logits) {
        llama_ctx_free(c);
        return die("allocating logits", KVQ_ERR_OUT_OF_MEMORY);
    }
    double sum = 0, sum2 = 0, t0 = now_s();
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
    kvq_cache_get_stats(llama_ctx_cache(c), &s);
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
    return die("perplexity", st);
}

/* "q4" -> q4/q4, "q8/q4" -> keys q8, values q4; optional ":r128" (residual) and ":g32" (group) suffixes. */
static int parse_mix(const char *s, kvq_type *tk, kvq_type *tv, int *residual, int *group) {
    char buf[48];
    if (strlen(s) >= sizeof buf) return -1;
    strcpy(buf, s);
    for (char *colon; (colon = strrchr(buf, ':')) != NULL; *colon = '\0') {
        int *dst = colon[1] == 'r' ? residual : colon[1] == 'g' ? group : NULL;
        if (!dst || parse_int(colon + 2, colon[1] == 'r' ? 0 : 16, colon[1] == 'r' ? 4096 : 128, dst, "--compare entry"))
            return -1;
    }
    char *slash = strchr(buf, '/');
    if (slash) *slash = '\0';
    if (parse_type(buf, tk)) return -1;
    return slash ? parse_type(slash + 1, tv) : (*tv = *tk, 0);
}

static int cmd_perplexity(int argc, char **argv) {
    opts o;
    int r = parse_opts(CMD_PPL, argc, argv, &o);
    if (r) return r > 0 ? 0 : 2;
    if (!o.file) {
        fprintf(stderr, "kvq perplexity: -f TEXTFILE is required\n");
        return 2;
    }
    size_t len;
    char *text = read_file(o.file, &len);
    if (!text) {
        fprintf(stderr, "kvq perplexity: cannot read '%s': %s\n", o.file, strerror(errno));
        return 1;
    }
    loaded L;
    if (load(&o, &L, 1)) {
        free(text);
        return 1;
    }
    int rc = 0;
    tok_ids ids = {0};
    kvq_status st = tok_encode(L.tok, text, len, 1, &ids);
    free(text);
    if (st) {
        rc = die("tokenizing", st);
        goto done;
    }
    if (o.ctx > L.m->cfg.ctx_len) {
        fprintf(stderr, "kvq perplexity: --ctx %d exceeds the model's context_length %d\n", o.ctx, L.m->cfg.ctx_len);
        rc = 2;
        goto done;
    }
    int n_chunks = (int)(ids.n / (size_t)o.ctx);
    if (o.chunks && o.chunks < n_chunks) n_chunks = o.chunks;
    if (n_chunks < 1) {
        fprintf(stderr, "kvq perplexity: the text has %zu tokens, fewer than one chunk of %d\n", ids.n, o.ctx);
        rc = 1;
        goto done;
    }
    fprintf(stderr, "kvq perplexity: %zu tokens; %d chunks of %d, scoring the last %d of each\n", ids.n, n_chunks, o.ctx,
            o.ctx - o.ctx / 2);
    if (!o.compare) {
        ppl_result res;
        char label[24];
        snprintf(label, sizeof label, "%s/%s", type_name(o.type_k), type_name(o.type_v));
        if ((rc = run_ppl(&o, &L, ids.ids, n_chunks, o.type_k, o.type_v, o.residual, o.group, label, &res))) goto done;
        printf("PPL = %.4f +/- %.4f  (KV %s, ctx %d, %d chunks, %lld scored tokens, %.0f KV bytes/token)\n", res.ppl,
               res.err, label, o.ctx, n_chunks, (long long)res.n, res.bytes_per_token);
        goto done;
    }
    /* --compare: one row per entry, same tokens; deltas against the first f16/f16 row if any, else the first row. */
    char list[256];
    snprintf(list, sizeof list, "%s", o.compare);
    ppl_result rs[16];
    char names[16][48];
    int nr = 0, base = -1;
    for (char *save = NULL, *e = strtok_r(list, ",", &save); e && nr < 16; e = strtok_r(NULL, ",", &save)) {
        kvq_type tk, tv;
        int res = o.residual, grp = o.group;
        if (parse_mix(e, &tk, &tv, &res, &grp)) {
            fprintf(stderr, "kvq perplexity: bad --compare entry '%s' (TYPE[/TYPE][:rRESIDUAL][:gGROUP])\n", e);
            rc = 2;
            goto done;
        }
        snprintf(names[nr], sizeof names[nr], "%s", e);
        if ((rc = run_ppl(&o, &L, ids.ids, n_chunks, tk, tv, res, grp, e, &rs[nr]))) goto done;
        if (base < 0 && tk == KVQ_TYPE_F16 && tv == KVQ_TYPE_F16) base = nr;
        nr++;
    }
    if (base < 0) base = 0;
    printf("ctx %d, %d chunks, %lld scored tokens\n", o.ctx, n_chunks, (long long)rs[0].n);
    printf("| KV (K/V)  | PPL                  | dPPL vs %-5s | KV bytes/token | vs F16 |\n", names[base]);
    printf("|-----------|----------------------|---------------|----------------|--------|\n");
    for (int i = 0; i < nr; i++)
        printf("| %-9s | %8.4f +/- %-7.4f | %+12.3f%% | %14.0f | %5.3fx |\n", names[i], rs[i].ppl, rs[i].err,
               100.0 * (rs[i].ppl / rs[base].ppl - 1.0), rs[i].bytes_per_token,
               rs[i].bytes_per_token / rs[i].f16_bytes_per_token);
done:
    tok_ids_free(&ids);
    unload(&L);
    return rc;
}

/* ----------------------------------------------------------------------------------------------------------
 * capacity
 * -------------------------------------------------------------------------------------------------------- */
static int cmd_capacity(int argc, char **argv) {
    opts o;
    int r = parse_opts(CMD_CAP, argc, argv, &o);
    if (r) return r > 0 ? 0 : 2;
    if (!o.mem) {
        fprintf(stderr, "kvq capacity: --mem SIZE is required\n");
        return 2;
    }
    double mem = parse_size(o.mem);
    if (mem <= 0) {
        fprintf(stderr, "kvq capacity: cannot parse size '%s' (e.g. 4GiB, 512MiB)\n", o.mem);
        return 2;
    }
    gguf_file *gf;
    kvq_status st = gguf_open(o.model, &gf);
    if (st) return die("loading the model", st);
    /* Only the shape is needed: read it without dequantizing weights. */
    char key[96];
    int64_t L, H, Hkv, dim, ctx_len;
    gguf_str arch = gguf_get_str(gf, "general.architecture");
    int al = arch.ptr ? (int)(arch.len > 32 ? 32 : arch.len) : 0;
    const char *ap = arch.ptr ? arch.ptr : "";
#define GET(var, suffix, def)                                                                                     \
    snprintf(key, sizeof key, "%.*s.%s", al, ap, suffix);                                                         \
    var = gguf_get_i64_or(gf, key, def);
    GET(L, "block_count", -1)
    GET(H, "attention.head_count", -1)
    GET(Hkv, "attention.head_count_kv", H)
    GET(dim, "embedding_length", -1)
    GET(ctx_len, "context_length", 0)
#undef GET
    gguf_close(gf);
    if (L < 1 || H < 1 || Hkv < 1 || dim < 1 || dim % H || L > 1 << 16 || Hkv > 1 << 16) {
        fprintf(stderr, "kvq capacity: model metadata lacks a usable shape\n");
        return 1;
    }
    int hd = (int)(dim / H);
    char ms[32];
    fmt_bytes(mem, ms, sizeof ms);
    printf("KV memory %s; model: %lld layers x %lld KV heads x head_dim %d, trained context %lld\n", ms, (long long)L,
           (long long)Hkv, hd, (long long)ctx_len);
    printf("| KV (K/V) | bytes/token | max context tokens | vs F16 |\n|----------|-------------|--------------------|--------|\n");
    static const char *const mixes[] = {"f16", "bf16", "fp8", "q8", "q8/q4", "q4", "q4/q2", "q2"};
    int64_t f16cap = 0;
    for (size_t i = 0; i < sizeof mixes / sizeof mixes[0]; i++) {
        kvq_type tk, tv;
        int unused_r = -1, unused_g = 0;
        parse_mix(mixes[i], &tk, &tv, &unused_r, &unused_g);
        kvq_cache_config cc = kvq_cache_config_default();
        cc.n_layers = (int)L;
        cc.n_kv_heads = (int)Hkv;
        cc.head_dim = hd;
        cc.type_k = tk;
        cc.type_v = tv;
        cc.arena_bytes = (size_t)mem;
        cc.max_seqs = 1;
        int64_t cap = kvq_cache_capacity_tokens(&cc);
        if (cap < 0) {
            printf("| %-8s | %s: %s |\n", mixes[i], kvq_strerror((kvq_status)cap), kvq_last_error());
            continue;
        }
        double bpt = (kvq_type_bytes_per_token(tk, KVQ_KEY, hd, 0) + kvq_type_bytes_per_token(tv, KVQ_VALUE, hd, 0)) *
                     (double)(Hkv * L);
        if (i == 0) f16cap = cap;
        printf("| %-8s | %11.0f | %18lld | %5.2fx |\n", mixes[i], bpt, (long long)cap, f16cap ? (double)cap / f16cap : 0.0);
    }
    return 0;
}

/* ----------------------------------------------------------------------------------------------------------
 * tokenize
 * -------------------------------------------------------------------------------------------------------- */
static int cmd_tokenize(int argc, char **argv) {
    opts o;
    int r = parse_opts(CMD_TOK, argc, argv, &o);
    if (r) return r > 0 ? 0 : 2;
    if (!o.prompt == !o.file) {
        fprintf(stderr, "kvq tokenize: give exactly one of -p TEXT or -f FILE\n");
        return 2;
    }
    size_t len;
    char *text = o.file ? read_file(o.file, &len) : strdup(o.prompt);
    if (!text) {
        fprintf(stderr, "kvq tokenize: cannot read '%s'\n", o.file);
        return 1;
    }
    if (!o.file) len = strlen(text);
    loaded L;
    if (load(&o, &L, 0)) {
        free(text);
        return 1;
    }
    tok_ids ids = {0};
    kvq_status st = o.chat ? tok_encode_chat(L.tok, o.system, text, &ids) : tok_encode(L.tok, text, len, 1, &ids);
    free(text);
    int rc = 0;
    if (st) rc = die("tokenizing", st);
    else if (o.ids) {
        for (size_t i = 0; i < ids.n; i++) printf("%d%c", ids.ids[i], i + 1 == ids.n ? '\n' : ' ');
    } else {
        uint64_t h = 1469598103934665603ull;
        for (size_t i = 0; i < ids.n; i++)
            for (int b = 0; b < 4; b++) h = (h ^ (((uint32_t)ids.ids[i] >> (8 * b)) & 0xff)) * 1099511628211ull;
        printf("tokens %zu fnv1a %016llx\n", ids.n, (unsigned long long)h);
    }
    tok_ids_free(&ids);
    unload(&L);
    return rc;
}

int main(int argc, char **argv) {
    /* OpenBLAS and libkvq's OpenMP attention take turns on the same cores; OpenMP's default active wait would spin
     * through every BLAS call (measured: decode 2 tok/s instead of 15 on 2 cores). libgomp reads the policy when
     * it is loaded, before main, so set it and re-exec once; a user's own setting is kept. */
    if (!getenv("OMP_WAIT_POLICY") && setenv("OMP_WAIT_POLICY", "PASSIVE", 1) == 0) execv("/proc/self/exe", argv);
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "help") == 0) {
        usage_main(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "run") == 0) return cmd_run(argc - 2, argv + 2);
    if (strcmp(cmd, "perplexity") == 0 || strcmp(cmd, "ppl") == 0) return cmd_perplexity(argc - 2, argv + 2);
    if (strcmp(cmd, "capacity") == 0) return cmd_capacity(argc - 2, argv + 2);
    if (strcmp(cmd, "tokenize") == 0) return cmd_tokenize(argc - 2, argv + 2);
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        printf("kvq %s (CPU attention: %s)\n", kvq_version_string(), kvq_cpu_backend());
        return 0;
    }
    fprintf(stderr, "kvq: unknown command '%s'\n", cmd);
    usage_main(stderr);
    return 2;
}
