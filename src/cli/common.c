/* What the subcommands share: parsing with help and errors printed, model loading, bounded file reading,
 * formatting, the thread setting. */
#define _POSIX_C_SOURCE 200809L
#include <cblas.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "gguf.h"
#include "llama.h"
#include "llama_gpu.h"
#include "model_err.h"
#include "tokenizer.h"

/* OpenBLAS extension: not in every cblas.h. */
void openblas_set_num_threads(int num_threads);

double kvq_cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int kvq_cli_die(int cmd, const char *what, kvq_status st) {
    const char *msg = kvqm_last_error();
    fprintf(stderr, "kvq %s: %s: %s%s%s\n", kvq_cli_cmd_name(cmd), what, kvq_strerror(st), *msg ? ": " : "", msg);
    return 1;
}

int kvq_cli_parse_or_exit(int cmd, int argc, char **argv, kvq_cli_opts *o) {
    char err[KVQ_CLI_ERR_LEN];
    int r = kvq_cli_parse(cmd, argc, argv, o, err, sizeof err);
    if (r > 0) {
        kvq_cli_usage(cmd, stdout);
        return 0;
    }
    if (r < 0) {
        fprintf(stderr, "kvq %s: %s\n", kvq_cli_cmd_name(cmd), err);
        return 2;
    }
    /* More threads than CPUs never helps, and OpenBLAS does not survive failing to create them: with -t 1024 under
     * a memory limit (ulimit -v) pthread_create fails after a few threads, OpenBLAS keeps going with the others'
     * handles uninitialized and hangs at exit joining them (blas_thread_shutdown_). So the count is capped. */
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (o->threads > 0 && ncpu > 0 && o->threads > ncpu) {
        fprintf(stderr, "kvq %s: -t %d: this machine has %ld online CPUs; using %ld threads\n", kvq_cli_cmd_name(cmd),
                o->threads, ncpu, ncpu);
        o->threads = (int)ncpu;
    }
    if (o->threads > 0) openblas_set_num_threads(o->threads);
    return -1;
}

void kvq_cli_unload(kvq_cli_loaded *L) {
    tok_free(L->tok);
    llama_free(L->m);
    llama_gpu_free(L->gm);
    gguf_close(L->gf);
    memset(L, 0, sizeof *L);
}

int kvq_cli_load(const kvq_cli_opts *o, kvq_cli_loaded *L, int need_weights) {
    memset(L, 0, sizeof *L);
    kvq_status st = gguf_open(o->model, &L->gf);
    if (st) return kvq_cli_die(o->cmd, "loading the model", st);
    if ((st = tok_load(L->gf, &L->tok))) {
        kvq_cli_unload(L);
        return kvq_cli_die(o->cmd, "loading the tokenizer", st);
    }
    if (need_weights && o->gpu) {
        if ((st = llama_gpu_load(L->gf, 0, &L->gm))) {
            kvq_cli_unload(L);
            return kvq_cli_die(o->cmd, "--gpu: loading the weights to the GPU", st);
        }
        L->cfg = llama_gpu_config(L->gm);
        L->weight_bytes = (double)llama_gpu_weight_bytes(L->gm);
        if (o->ngl > 0 && o->ngl < L->cfg->n_layers)
            fprintf(stderr, "kvq %s: -ngl %d: partial offload is not supported; all %d layers run on the GPU\n",
                    kvq_cli_cmd_name(o->cmd), o->ngl, L->cfg->n_layers);
    } else if (need_weights) {
        if ((st = llama_load(L->gf, &L->m))) {
            kvq_cli_unload(L);
            return kvq_cli_die(o->cmd, "loading the weights", st);
        }
        L->cfg = &L->m->cfg;
        L->weight_bytes = (double)L->m->weight_bytes;
    }
    if (L->cfg && kvq_cli_check_plans(o, L->cfg->n_layers)) {
        kvq_cli_unload(L);
        return 1;
    }
    return 0;
}

char *kvq_cli_read_file(const char *path, size_t limit, size_t *len, char *err, size_t errlen) {
    int is_stdin = strcmp(path, "-") == 0;
    FILE *f = is_stdin ? stdin : fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open '%s': %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    char *buf = NULL;
    if (fstat(fileno(f), &st) == 0) {
        if (S_ISDIR(st.st_mode)) {
            snprintf(err, errlen, "'%s' is a directory", path);
            goto fail;
        }
        if (S_ISREG(st.st_mode) && (uint64_t)st.st_size > (uint64_t)limit) {
            snprintf(err, errlen, "'%s' is %lld bytes, more than the limit of %zu (--max-file-size)", path,
                     (long long)st.st_size, limit);
            goto fail;
        }
    }
    /* Streams (pipes, /dev/urandom) have no size: read at most limit + 1 bytes to tell "too long" from "fits". */
    size_t cap = limit < (1 << 16) ? limit + 1 : (1 << 16), n = 0;
    buf = malloc(cap + 1);
    for (;;) {
        if (!buf) {
            snprintf(err, errlen, "reading '%s': out of memory after %zu bytes", path, n);
            goto fail;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (n > limit) {
            snprintf(err, errlen, "'%s' is longer than the limit of %zu bytes (--max-file-size); stopped reading there",
                     path, limit);
            goto fail;
        }
        if (n < cap) break; /* EOF or error */
        size_t ncap = cap > limit / 2 ? limit + 1 : cap * 2;
        char *nb = realloc(buf, ncap + 1);
        if (!nb) {
            free(buf);
            buf = NULL;
            continue;
        }
        buf = nb;
        cap = ncap;
    }
    if (ferror(f)) {
        snprintf(err, errlen, "reading '%s': %s", path, strerror(errno));
        goto fail;
    }
    if (!is_stdin) fclose(f);
    buf[n] = '\0';
    *len = n;
    return buf;
fail:
    free(buf);
    if (!is_stdin) fclose(f);
    return NULL;
}

const char *kvq_cli_type_name(kvq_type t) {
    const kvq_type_traits *tr = kvq_type_get_traits(t);
    return tr ? tr->name : "?";
}

void kvq_cli_fmt_bytes(double b, char *out, size_t n) {
    if (b >= 1099511627776.0) snprintf(out, n, "%.2f TiB", b / 1099511627776.0);
    else if (b >= 1073741824.0) snprintf(out, n, "%.2f GiB", b / 1073741824.0);
    else if (b >= 1048576.0) snprintf(out, n, "%.2f MiB", b / 1048576.0);
    else if (b >= 1024.0) snprintf(out, n, "%.1f KiB", b / 1024.0);
    else snprintf(out, n, "%.0f B", b);
}

double kvq_cli_phys_mem(void) {
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    return pages > 0 && psz > 0 ? (double)pages * (double)psz : 0;
}

kvq_status kvq_cli_kv_bytes(int n_layers, int n_kv_heads, int head_dim, const kvq_cli_mix *mix, int max_seqs,
                            int64_t tokens, double *pages, double *windows) {
    kvq_cache_config cc = kvq_cache_config_default();
    cc.n_layers = n_layers;
    cc.n_kv_heads = n_kv_heads;
    cc.head_dim = head_dim;
    cc.type_k = mix->type_k;
    cc.type_v = mix->type_v;
    cc.residual = mix->residual;
    cc.group = mix->group;
    cc.max_seqs = max_seqs;
    cc.rotate = mix->rotate;
    cc.rotation_seed = mix->rotation_seed;
    cc.sinks = mix->sinks;
    cc.nonuniform = mix->nonuniform;
    cc.outliers = mix->outliers == -1 ? llama_default_outliers(mix->type_k) : mix->outliers; /* the CPU engine's */
    cc.params8 = mix->params8;
    cc.window8 = mix->window8;
    size_t a = kvq_cache_arena_bytes_for(&cc, tokens);
    if (a == 0) {
        int64_t why = kvq_cache_capacity_tokens(&cc); /* fails at the same check, with its status and message */
        return why < 0 ? (kvq_status)why : kvq_set_error(KVQ_ERR_INVALID_ARG, "%lld tokens", (long long)tokens);
    }
    /* R and G as the library resolves them: read back from a cache of one page per layer. */
    cc.arena_bytes = kvq_cache_arena_bytes_for(&cc, 1);
    cc.max_seqs = 1;
    kvq_cache *c = NULL;
    kvq_cache_config got;
    kvq_page_layout lay;
    kvq_status st = kvq_cache_create(&cc, &c);
    if (!st) st = kvq_cache_get_config(c, &got, &lay);
    kvq_cache_free(c);
    if (st) return st;
    *pages = (double)a;
    /* sinks: the first `sinks` tokens kept exact in fp16 (kvq.h section 10), counted here like the window */
    /* a window row of one role: fp16 [H][D], or 8-bit codes [H][D] + fp16 scales [H] (kvq.h section 10) */
    double rk = got.window8 & KVQ_ROLES_K ? head_dim + 2.0 : 2.0 * head_dim, rv = got.window8 & KVQ_ROLES_V ? head_dim + 2.0 : 2.0 * head_dim;
    *windows = ((double)(got.residual + lay.group) * (rk + rv) + (double)got.sinks * 4.0 * head_dim) * n_kv_heads * n_layers;
    return KVQ_OK;
}

int kvq_cli_valued_option(const char *cmd, const char *a, const char *v, const char *const *valued, size_t n_valued) {
    int known = 0;
    for (size_t k = 0; k < n_valued; k++) known |= !strcmp(a, valued[k]);
    if (!known) {
        fprintf(stderr, "kvq %s: unknown option '%s' (kvq %s --help lists its options)\n", cmd, a, cmd);
        return 2;
    }
    if (!v) {
        fprintf(stderr, "kvq %s: option '%s' needs a value\n", cmd, a);
        return 2;
    }
    return 0;
}

kvq_status kvq_cli_model_kv_bytes(const llama_config *mc, const kvq_cli_mix *mix, int max_seqs, int64_t tokens, int batch,
                                  double *pages, double *windows) {
    *pages = *windows = 0;
    /* llama.c's caches: one per group of layers of one kind and the same types, as llama_ctx_create makes them */
    llama_ctx_params cp;
    memset(&cp, 0, sizeof cp);
    cp.type_k = mix->type_k, cp.type_v = mix->type_v, cp.local_types = mix->local_types;
    cp.type_k_local = mix->type_k_local, cp.type_v_local = mix->type_v_local;
    cp.n_layer_types = mix->n_layer_types, cp.layer_types = mix->layer_types;
    int8_t group[4096], kind[LLAMA_MAX_CACHES];
    int cnt[LLAMA_MAX_CACHES] = {0};
    kvq_type gk[LLAMA_MAX_CACHES], gv[LLAMA_MAX_CACHES];
    if (mc->n_layers > (int)sizeof group) return kvq_set_error(KVQ_ERR_INVALID_ARG, "%d layers", mc->n_layers);
    int ng = llama_layer_groups(mc, &cp, group, kind, gk, gv);
    if (ng < 0) return (kvq_status)ng;
    for (int l = 0; l < mc->n_layers; l++) cnt[group[l]]++;
    for (int g = 0; g < ng; g++) {
        kvq_cli_mix lm = *mix;
        lm.type_k = gk[g], lm.type_v = gv[g];
        int64_t held = tokens;
        if (kind[g]) {
            lm.sinks = 0;
            int64_t P = lm.group > 64 ? lm.group : 64, w = (int64_t)mc->window + (batch > 0 ? batch : 256) + 2 * P;
            if (w < held) held = w;
        }
        double pg = 0, win = 0;
        kvq_status st = kvq_cli_kv_bytes(cnt[g], mc->n_kv_heads, mc->head_dim, &lm, max_seqs, held, &pg, &win);
        if (st) return st;
        *pages += pg, *windows += win;
    }
    return KVQ_OK;
}

void kvq_cli_ctx_params(const kvq_cli_opts *o, const kvq_cli_mix *mix, int n_ctx, llama_ctx_params *cp) {
    memset(cp, 0, sizeof *cp);
    cp->n_ctx = n_ctx;
    cp->max_batch = o->batch;
    cp->decode_attn = o->decode_attn;
    cp->exact_batch = o->prefill_attn;
    cp->type_k = mix->type_k;
    cp->type_v = mix->type_v;
    cp->residual = mix->residual;
    cp->group = mix->group;
    cp->n_threads = o->threads;
    cp->rotate = mix->rotate;
    cp->sinks = mix->sinks;
    cp->nonuniform = mix->nonuniform;
    cp->qnorm = mix->qnorm;
    cp->outliers = mix->outliers;
    cp->params8 = mix->params8;
    cp->window8 = mix->window8;
    cp->rotation_seed = mix->rotation_seed;
    cp->prerope = mix->prerope;
    cp->local_types = mix->local_types;
    cp->type_k_local = mix->type_k_local;
    cp->type_v_local = mix->type_v_local;
    cp->squat_rank = mix->squat_rank;
    cp->squat_lambda = mix->squat_lambda;
    cp->n_layer_types = mix->n_layer_types;
    cp->layer_types = mix->n_layer_types ? mix->layer_types : NULL;
}

kvq_status kvq_cli_ctx_create(const kvq_cli_loaded *L, const llama_ctx_params *cp, kvq_cli_ctx *out) {
    memset(out, 0, sizeof *out);
    if (!L->gm) return llama_ctx_create(L->m, cp, &out->cpu);
    /* SQuat keys are the CPU engine's (kvq.h section 10; the CUDA backend refuses squat_rank > 0): the engine
     * default resolves to off on the GPU, an explicit rank is an error */
    if (cp->squat_rank > 0)
        return kvq_set_error(KVQ_ERR_INVALID_ARG, "--kv-squat %d: SQuat keys run on the CPU engine only (not with --gpu)",
                             cp->squat_rank);
    llama_ctx_params g = *cp;
    g.squat_rank = 0;
    return llama_gpu_ctx_create(L->gm, &g, &out->gpu);
}

void kvq_cli_ctx_free(kvq_cli_ctx *c) {
    llama_ctx_free(c->cpu);
    llama_gpu_ctx_free(c->gpu);
    memset(c, 0, sizeof *c);
}

kvq_status kvq_cli_ctx_reset(kvq_cli_ctx *c) { return c->gpu ? llama_gpu_ctx_reset(c->gpu) : llama_ctx_reset(c->cpu); }

int64_t kvq_cli_ctx_pos(const kvq_cli_ctx *c) { return c->gpu ? llama_gpu_ctx_pos(c->gpu) : llama_ctx_pos(c->cpu); }

kvq_status kvq_cli_ctx_stats(const kvq_cli_ctx *c, kvq_cache_stats *st) {
    return c->gpu ? llama_gpu_ctx_stats(c->gpu, st) : llama_ctx_get_stats(c->cpu, st);
}

kvq_status kvq_cli_forward(kvq_cli_ctx *c, const int32_t *tokens, int n, float *logits, int logits_from) {
    return c->gpu ? llama_gpu_forward(c->gpu, tokens, n, logits, logits_from)
                  : llama_forward(c->cpu, tokens, n, logits, logits_from);
}
