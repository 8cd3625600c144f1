/* cli.h: what the kvq command's files share (the static library kvq_cli_core: everything but main()).
 *
 * options.c   the option table, the strict parsers of numbers, sizes, KV types and --compare lists, the help texts
 * common.c    model loading, bounded file reading, formatting, thread settings
 * run.c       kvq run (samplers, --compare)
 * perplexity.c, capacity.c, tokenize.c, passkey.c: the other subcommands
 * gen_model.c kvq gen-model (synthetic GGUF models of real shapes)
 * bench.c     kvq bench (end-to-end prefill/decode speed per KV type and depth, CPU or --gpu)
 *
 * The parser prints nothing: a rejected argv leaves its message in the caller's buffer, so the fuzz target
 * (tests/fuzz_cli.c) and the unit test (tests/test_cli_parse.c) can check that every rejection says why. */
#ifndef KVQ_CLI_H
#define KVQ_CLI_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kvq.h"
#include "llama.h"

enum kvq_cli_cmd { KVQ_CLI_RUN = 0, KVQ_CLI_PPL = 1, KVQ_CLI_CAP = 2, KVQ_CLI_TOK = 3, KVQ_CLI_PASSKEY = 4, KVQ_CLI_NCMD = 5 };

#define KVQ_CLI_MAX_COMPARE 16
/* kvq_cli_opts.cmd of kvq bench, which parses its own options (no entry in the option table): names its messages */
#define KVQ_CLI_BENCH 100
#define KVQ_CLI_CALIBRATE 101 /* likewise kvq calibrate's (its runs go through kvq perplexity's scoring) */
#define KVQ_CLI_MAX_LENGTHS 16 /* passkey --lengths entries */
#define KVQ_CLI_MAX_DEPTHS 101 /* passkey --depths entries: 0..100, each once */
#define KVQ_CLI_ERR_LEN 512
/* Default limit on the size of an input file (-f): 64 MiB; --max-file-size changes it. */
#define KVQ_CLI_DEFAULT_MAX_FILE ((size_t)64 << 20)

/* One --compare entry: TYPE[/TYPE] then, each at most once and in any order, :rRESIDUAL :gGROUP :rot=ROLES
 * :sinks=N :nuq=ROLES :qnorm=ROLES :outl=ROLES :seed=N :pre=0|1 :squat=R :lambda=X :local=TYPE[/TYPE] :layers=SPEC (ROLES: none, k, v,
 * kv; SPEC
 * as --kv-layers: A[-B]@TYPE[/TYPE] joined by '+'). Fields an entry does not give come from the global options. */
#define KVQ_CLI_MIX_NAME 256
typedef struct kvq_cli_mix {
    kvq_type type_k, type_v;
    int residual; /* -1: the library's default */
    int group;    /* 0: the library's default */
    /* kvq.h section 10, passed to kvq_cache_config as they are: -1 the library's default for the types, 0 off */
    int rotate;             /* KVQ_ROLES_* */
    int sinks;              /* 0..1024 */
    int nonuniform;         /* KVQ_ROLES_* */
    int qnorm;              /* Q-Norm: KVQ_ROLES_*, -1 the engine's default (llama_default_qnorm) */
    int outliers;           /* dense-and-sparse outliers: KVQ_ROLES_*, 0 none, -1 the engine's (llama_default_outliers) */
    int params8;            /* 8-bit group parameters: KVQ_ROLES_*, 0 and -1 none */
    int window8;            /* 8-bit residual windows: KVQ_ROLES_*, 0 and -1 none */
    uint32_t rotation_seed; /* 0: the library's fixed default seed */
    int prerope;            /* pre-RoPE keys: 1 on, 0 off, -1 the engine's default (llama_default_prerope) */
    int local_types;        /* 1: sliding-window layers (Gemma 3's local ones) use type_k_local/type_v_local */
    kvq_type type_k_local, type_v_local;
    int squat_rank;         /* SQuat keys: r, 0 off, -1 the engine's default (llama_default_squat) */
    float squat_lambda;     /* <= 0: libkvq's auto rule */
    int n_layer_types;      /* per-layer types (llama_ctx_params.layer_types), 0: none */
    llama_layer_types layer_types[LLAMA_MAX_LAYER_TYPES];
    int plan_layers;        /* the types came from a kvq-plan file for this many layers (checked against the model
                             * by kvq_cli_check_plans); 0: not from a plan */
    char name[KVQ_CLI_MIX_NAME];
} kvq_cli_mix;

typedef struct kvq_cli_opts {
    int cmd;
    const char *model, *prompt, *file, *system, *csv; /* borrowed from argv */
    int n_predict, ctx, chunks, chat, threads, batch, residual, group, ids, quiet, parallel;
    int decode_attn; /* --decode-attn: a forward call's queries attend token by token (llama_ctx_params.decode_attn) */
    int prefill_attn; /* --prefill-attn: 1 exact, 0 cache, -1 the engine's default (llama_ctx_params.exact_batch) */
    float temp, top_p, min_p, repeat_penalty;
    int top_k, repeat_last_n;
    uint64_t seed;
    int rotate, sinks, nonuniform; /* --kv-rotate, --kv-sinks, --kv-nuq: -1 (default) = the library's default */
    int qnorm;                     /* --kv-qnorm: -1 (default) = the engine's default (llama_default_qnorm) */
    int outliers;                  /* --kv-outliers: -1 (default) = none */
    int params8;                   /* --kv-params8: -1 (default) = none */
    int window8;                   /* --kv-window8: -1 (default) = none */
    uint32_t rotation_seed;        /* --rotation-seed; 0 = the library's fixed default seed */
    int prerope;                   /* --kv-prerope: 1, 0, -1 (default) = the engine's default for the key type */
    int squat_rank;                /* --kv-squat: 0..32, -1 (default) = the engine's default for the key type */
    float squat_lambda;            /* --kv-squat-lambda: X > 0, 0 (default, "auto") = libkvq's auto rule */
    kvq_type type_k, type_v;
    int local_types;                    /* --kv-type-local given */
    kvq_type type_k_local, type_v_local; /* --kv-type-local TYPE[/TYPE] */
    const char *kv_layers;              /* --kv-layers SPEC as given (borrowed from argv), or NULL */
    int n_layer_types;                  /* ... parsed, or read from --kv-plan */
    llama_layer_types layer_types[LLAMA_MAX_LAYER_TYPES];
    const char *kv_plan;                /* --kv-plan FILE (borrowed from argv), or NULL */
    int plan_layers;                    /* its n_layers */
    double mem; /* bytes; 0: not given */
    size_t max_file;
    int gpu; /* --gpu, or -ngl N with N > 0: every layer on the GPU (no partial offload) */
    int ngl; /* -ngl as given; -1 when not */
    int n_compare;
    kvq_cli_mix compare[KVQ_CLI_MAX_COMPARE];
    /* passkey: prompt lengths in tokens (the answer's tokens included), depths of the key in % of the filler,
     * keys per cell */
    int n_lengths, n_depths, trials;
    int lengths[KVQ_CLI_MAX_LENGTHS], depths[KVQ_CLI_MAX_DEPTHS];
} kvq_cli_opts;

/* "run", "perplexity" (or "ppl"), "capacity", "tokenize", "passkey" -> KVQ_CLI_*; -1 otherwise. */
int kvq_cli_cmd_from_name(const char *name);
const char *kvq_cli_cmd_name(int cmd);
/* The defaults of subcommand `cmd` (what an empty argv gives). */
void kvq_cli_defaults(int cmd, kvq_cli_opts *o);
/* Parses argv[0..argc-1] (the options after the subcommand's name). Returns 0 (go on), 1 (--help was asked: the
 * caller prints kvq_cli_usage) or -1 (rejected: `err` holds a message naming the option and the problem). */
int kvq_cli_parse(int cmd, int argc, char **argv, kvq_cli_opts *o, char *err, size_t errlen);
void kvq_cli_usage(int cmd, FILE *out);
void kvq_cli_usage_main(FILE *out);

/* Writes the message into err (n bytes, either may be 0) and returns -1: how the parsers below and plan.c refuse. */
int kvq_cli_fail(char *err, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Strict parsers (0 ok, -1 with a message in err): the whole string, decimal digits only, no sign unless lo < 0,
 * no spaces, in lo..hi. */
int kvq_cli_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out, const char *name, char *err, size_t n);
int kvq_cli_parse_u64(const char *s, uint64_t *out, const char *name, char *err, size_t n);
/* A finite decimal number in lo..hi (no inf, nan or hex). */
int kvq_cli_parse_float(const char *s, double lo, double hi, float *out, const char *name, char *err, size_t n);
/* "4GiB", "512MiB", "2G", "1.5GB", "123456": bytes in 1 .. 2^60 (no exponent, inf or nan). */
int kvq_cli_parse_size(const char *s, double *out, const char *name, char *err, size_t n);
/* kvq's type names (f16, bf16, q8, fp8, q4, q3, q2) and llama.cpp's where the meaning is close: f16, bf16, q8_0 -> q8,
 * q4_1 -> q4 (4-bit with scale and min; kvq's groups differ, see the help). */
int kvq_cli_parse_type(const char *s, kvq_type *t, const char *name, char *err, size_t n);
/* A comma-separated list of 1..max distinct integers in lo..hi, in the order given. */
int kvq_cli_parse_int_list(const char *s, int lo, int hi, int max, int *out, int *n_out, const char *name, char *err, size_t n);
/* "none", "k", "v", "kv" -> KVQ_ROLES_*; with allow_default, "default" -> -1. */
int kvq_cli_parse_roles(const char *s, int allow_default, int *out, const char *name, char *err, size_t n);
/* A comma-separated list of 1..KVQ_CLI_MAX_COMPARE entries. */
int kvq_cli_parse_compare(const char *s, kvq_cli_opts *o, char *err, size_t n);

/* The library's defaults, read back from a tiny cache (kvq_cache_get_config): the residual window of a grouped type
 * (q4) and of a per-token type (f16), the group size. -1 where the library refused. */
typedef struct kvq_cli_libdefaults {
    int residual_grouped, residual_per_token, group, page_tokens;
} kvq_cli_libdefaults;
kvq_cli_libdefaults kvq_cli_lib_defaults(void);

/* Reads a whole file ("-": stdin) of at most `limit` bytes, NUL-terminated. Regular files, pipes, character devices;
 * NULL with a message naming the file when it cannot be read, is a directory, or is larger than the limit. */
char *kvq_cli_read_file(const char *path, size_t limit, size_t *len, char *err, size_t errlen);

/* Sampling: repeat penalty over `recent` (the last n_recent tokens), then greedy if temp <= 0, else top-k (0: off),
 * softmax at temp, top-p (1: off), min-p (0: off), and a draw. Modifies logits (the penalty). scratch: [V]. */
typedef struct kvq_cli_sampler {
    float temp, top_p, min_p, repeat_penalty;
    int top_k;
} kvq_cli_sampler;
typedef struct kvq_cli_prob {
    float p;
    int32_t i;
} kvq_cli_prob;
int32_t kvq_cli_sample(float *logits, int V, const kvq_cli_sampler *s, const int32_t *recent, int n_recent, uint64_t *rng,
                       kvq_cli_prob *scratch);

/* Subcommands: return the process exit status (0 ok, 1 failure, 2 bad usage). */
int kvq_cli_run(int argc, char **argv);
int kvq_cli_perplexity(int argc, char **argv);
int kvq_cli_capacity(int argc, char **argv);
int kvq_cli_tokenize(int argc, char **argv);
int kvq_cli_passkey(int argc, char **argv);
/* Subcommands with their own option parsers (options of their own only): gen_model.c, bench.c */
int kvq_cli_gen_model(int argc, char **argv);
int kvq_cli_bench(int argc, char **argv);

/* --- common.c, for the subcommands --- */
struct gguf_file;
struct llama_model;
struct kvq_tokenizer;
struct llama_gpu_model;
struct llama_config;
typedef struct kvq_cli_loaded {
    struct gguf_file *gf;
    struct llama_model *m;        /* CPU engine (NULL with --gpu) */
    struct llama_gpu_model *gm;   /* GPU engine (--gpu / -ngl N > 0) */
    struct kvq_tokenizer *tok;
    const struct llama_config *cfg; /* the loaded engine's shape (NULL without weights) */
    double weight_bytes;            /* bytes the engine holds for the weights (host fp32, or device fp16) */
} kvq_cli_loaded;

/* One sequence on the loaded engine, CPU or GPU: the same calls as llama_ctx (llama.h), dispatched. */
struct llama_ctx;
struct llama_gpu_ctx;
typedef struct kvq_cli_ctx {
    struct llama_ctx *cpu;
    struct llama_gpu_ctx *gpu;
} kvq_cli_ctx;
struct llama_ctx_params;
kvq_status kvq_cli_ctx_create(const kvq_cli_loaded *L, const struct llama_ctx_params *cp, kvq_cli_ctx *out);
void kvq_cli_ctx_free(kvq_cli_ctx *c); /* and zeroes it */
kvq_status kvq_cli_ctx_reset(kvq_cli_ctx *c);
int64_t kvq_cli_ctx_pos(const kvq_cli_ctx *c);
/* The KV cache's statistics (the GPU cache's in the CPU cache's terms: llama_gpu_ctx_stats). */
kvq_status kvq_cli_ctx_stats(const kvq_cli_ctx *c, kvq_cache_stats *st);
kvq_status kvq_cli_forward(kvq_cli_ctx *c, const int32_t *tokens, int n, float *logits, int logits_from);

double kvq_cli_now(void);
/* Prints "kvq <cmd>: <what>: <status>: <library message>" and returns 1. */
int kvq_cli_die(int cmd, const char *what, kvq_status st);
/* Parses, prints help or the error; returns -1 to go on, else the exit status. Applies -t to BLAS. */
int kvq_cli_parse_or_exit(int cmd, int argc, char **argv, kvq_cli_opts *o);
int kvq_cli_load(const kvq_cli_opts *o, kvq_cli_loaded *L, int need_weights);
/* For the subcommands that parse their own options (bench, calibrate, gen-model): 0 when `a` is one of the n_valued
 * options that take a value and v (the next argument, or NULL) is there; else 2 after a message naming `cmd`. */
int kvq_cli_valued_option(const char *cmd, const char *a, const char *v, const char *const *valued, size_t n_valued);
/* perplexity.c: scores mixes[0 .. n_mix) (n_mix <= KVQ_CLI_MAX_COMPARE + 1; mixes[0] the base, f16) on n_chunks chunks
 * of o->ctx tokens of ids as kvq perplexity --compare does: kld[i], the mean KL divergence from the base's next-token
 * distributions, and bits[i], stored bits per K/V element. 0, or an exit code after a printed message. */
/* perplexity.c: the chunks of o->ctx tokens that ids (the whole text) holds, at most o->chunks of them (0: all), each
 * starting with BOS where the model's tokenizer adds one (*bos = 1; written into ids). Returns their number (>= 1), or
 * minus an exit code after a message naming o->cmd (a ctx past the model's context_length, a text under one chunk). */
struct tok_ids;
int kvq_cli_ppl_chunks(const kvq_cli_opts *o, const kvq_cli_loaded *L, struct tok_ids *ids, int *bos);
int kvq_cli_ppl_eval(const kvq_cli_opts *o, const kvq_cli_loaded *L, const int32_t *ids, int n_chunks,
                     const kvq_cli_mix *mixes, int n_mix, double *kld, double *bits);
/* calibrate.c: kvq calibrate (per-layer KV types for a bit budget, from each layer's measured sensitivity) */
int kvq_cli_calibrate(int argc, char **argv);
void kvq_cli_unload(kvq_cli_loaded *L);
const char *kvq_cli_type_name(kvq_type t);
void kvq_cli_fmt_bytes(double b, char *out, size_t n);
/* KV memory of one sequence of `tokens` tokens with this model shape and config, as the engine allocates it:
 * `pages` = kvq_cache_arena_bytes_for, `windows` = fp16 residual windows at their largest (R+G tokens per layer,
 * keys and values; R and G as the library resolves them). Returns 0, or a kvq_status with the library's reason
 * (head dim, group, residual, type) in kvq_last_error(). max_seqs: for validation only. */
kvq_status kvq_cli_kv_bytes(int n_layers, int n_kv_heads, int head_dim, const kvq_cli_mix *mix, int max_seqs,
                            int64_t tokens, double *pages, double *windows);
/* The single KV config of the global options (--kv-type..., --residual, --group, --kv-rotate, ...). */
struct llama_config;
/* kvq_cli_kv_bytes for a model as the engine holds it: its global layers at `tokens`, its sliding-window (local)
 * layers with their own types (mix->local_types), no sinks, and only the pages of the window and one batch. */
kvq_status kvq_cli_model_kv_bytes(const struct llama_config *mc, const kvq_cli_mix *mix, int max_seqs, int64_t tokens,
                                  int batch, double *pages, double *windows);
kvq_cli_mix kvq_cli_single_mix(const kvq_cli_opts *o);
/* llama_ctx_params for `mix`, every field set (section 10's included: a zero-initialized one means "off"). */
struct llama_ctx_params;
void kvq_cli_ctx_params(const kvq_cli_opts *o, const kvq_cli_mix *mix, int n_ctx, struct llama_ctx_params *cp);
/* Physical memory of the machine in bytes (0 if unknown). */
double kvq_cli_phys_mem(void);

/* plan.c: kvq-plan files, every layer's KV types (docs/kv-plan.md; python/kvq/plan.py reads and writes the same). */
#define KVQ_PLAN_VERSION 1
#define KVQ_PLAN_MAX_LAYERS 4096
#define KVQ_PLAN_MAX_BYTES (1 << 20)
#define KVQ_PLAN_MAX_LINE 1024
/* Parses a plan held in text[0..len): *n_layers and the types of layers 0..*n_layers-1 in tk[], tv[]
 * (KVQ_PLAN_MAX_LAYERS entries each). 0, or -1 with a message (naming the line) in err. */
int kvq_cli_plan_parse(const char *text, size_t len, int *n_layers, kvq_type *tk, kvq_type *tv, char *err, size_t n);
/* Per-layer types -> m's type_k/type_v (the most used pair) and layer_types (the other layers' ranges); m->local_types
 * = 0, m->plan_layers = NL; the other fields of m are left as they are. -1 past LLAMA_MAX_LAYER_TYPES ranges. */
int kvq_cli_plan_to_mix(int NL, const kvq_type *tk, const kvq_type *tv, kvq_cli_mix *m, char *err, size_t n);
/* Reads the plan file at `path` into m (both of the above); `name` (the option) heads the message. */
int kvq_cli_plan_read(const char *path, kvq_cli_mix *m, const char *name, char *err, size_t n);
/* Writes the version line, n_layers and the layer lines; the caller may append lines of its own. 0 or -1. */
int kvq_cli_plan_write(FILE *f, int NL, const kvq_type *tk, const kvq_type *tv);
/* 0 when every plan among o's KV configs (--kv-plan, --compare's plan= entries) has n_layers layers; else 1 after a
 * message. kvq_cli_load calls it once the model is known. */
int kvq_cli_check_plans(const kvq_cli_opts *o, int n_layers);

#endif
