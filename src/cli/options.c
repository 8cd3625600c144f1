/* The kvq command's options: one table says which subcommands take each option (an option that a subcommand does
 * not use is an error naming the subcommand), strict parsers of every value, and the help texts, whose defaults are
 * printed from kvq_cli_defaults() and from the library itself (kvq_cli_lib_defaults), never written by hand. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cli.h"
#include "llama.h"

int kvq_cli_fail(char *err, size_t n, const char *fmt, ...) {
    if (err && n) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, n, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static const char *const CMD_NAMES[KVQ_CLI_NCMD] = {"run", "perplexity", "capacity", "tokenize", "passkey"};

int kvq_cli_cmd_from_name(const char *name) {
    if (!name) return -1;
    for (int i = 0; i < KVQ_CLI_NCMD; i++)
        if (strcmp(name, CMD_NAMES[i]) == 0) return i;
    return strcmp(name, "ppl") == 0 ? KVQ_CLI_PPL : -1;
}

const char *kvq_cli_cmd_name(int cmd) {
    return cmd >= 0 && cmd < KVQ_CLI_NCMD ? CMD_NAMES[cmd] : cmd == KVQ_CLI_BENCH     ? "bench"
           : cmd == KVQ_CLI_CALIBRATE ? "calibrate"
                                      : "?";
}

void kvq_cli_defaults(int cmd, kvq_cli_opts *o) {
    memset(o, 0, sizeof *o);
    o->cmd = cmd;
    o->n_predict = 256;
    o->ctx = cmd == KVQ_CLI_PPL ? 2048 : 0;
    o->temp = 0.7f;
    o->top_p = 0.9f;
    o->top_k = 0;
    o->min_p = 0.0f;
    o->repeat_penalty = 1.0f;
    o->repeat_last_n = 64;
    o->seed = 42;
    o->residual = -1;
    o->group = 0;
    o->batch = 256;
    o->parallel = 1;
    o->max_file = KVQ_CLI_DEFAULT_MAX_FILE;
    o->type_k = o->type_v = KVQ_TYPE_F16;
    o->rotate = o->sinks = o->nonuniform = o->qnorm = o->outliers = o->params8 = o->window8 = -1;
    o->rotation_seed = 0;
    o->prerope = -1;
    o->squat_rank = -1;
    o->ngl = -1;
    /* perplexity scores what the cache stores (its default prefill reads every token back from the cache, as
     * llama.cpp's does); run and passkey read a prompt batch's own tokens exact, as HF's QuantizedCache does */
    o->prefill_attn = cmd == KVQ_CLI_PPL ? 0 : -1;
    if (cmd == KVQ_CLI_PASSKEY) {
        /* 5 digits are 5 tokens (SmolLM2's pre-tokenizer splits digits); 8 leaves room for a leading space and '.' */
        o->n_predict = 8;
        static const int len[] = {1024, 2048, 4096, 8192}, dep[] = {0, 25, 50, 75, 100};
        o->n_lengths = 4;
        memcpy(o->lengths, len, sizeof len);
        o->n_depths = 5;
        memcpy(o->depths, dep, sizeof dep);
        o->trials = 1;
    }
}

static int parse_int(const char *s, int lo, int hi, int *out, const char *name, char *err, size_t n);

int kvq_cli_parse_int_list(const char *s, int lo, int hi, int max, int *out, int *n_out, const char *name, char *err, size_t n) {
    int k = 0;
    if (!*s) return kvq_cli_fail(err, n, "%s: the list is empty", name);
    for (const char *p = s;;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        char buf[32];
        if (len == 0) return kvq_cli_fail(err, n, "%s: entry %d of '%s' is empty", name, k + 1, s);
        if (k == max) return kvq_cli_fail(err, n, "%s: more than %d entries", name, max);
        if (len >= sizeof buf) return kvq_cli_fail(err, n, "%s: '%.*s' is not an integer in %d..%d", name, (int)len, p, lo, hi);
        memcpy(buf, p, len);
        buf[len] = '\0';
        int v;
        if (parse_int(buf, lo, hi, &v, name, err, n)) return -1;
        for (int i = 0; i < k; i++)
            if (out[i] == v) return kvq_cli_fail(err, n, "%s: %d is listed twice", name, v);
        out[k++] = v;
        if (!e) break;
        p = e + 1;
    }
    *n_out = k;
    return 0;
}

kvq_cli_mix kvq_cli_single_mix(const kvq_cli_opts *o) {
    kvq_cli_mix m = {.type_k = o->type_k, .type_v = o->type_v, .residual = o->residual, .group = o->group,
                     .rotate = o->rotate, .sinks = o->sinks, .nonuniform = o->nonuniform, .qnorm = o->qnorm,
                     .outliers = o->outliers, .params8 = o->params8, .window8 = o->window8,
                     .rotation_seed = o->rotation_seed, .prerope = o->prerope, .local_types = o->local_types,
                     .type_k_local = o->type_k_local, .type_v_local = o->type_v_local, .squat_rank = o->squat_rank,
                     .squat_lambda = o->squat_lambda, .n_layer_types = o->n_layer_types,
                     .plan_layers = o->plan_layers};
    memcpy(m.layer_types, o->layer_types, sizeof m.layer_types);
    if (o->kv_plan) {
        snprintf(m.name, sizeof m.name, "plan=%s", o->kv_plan);
        return m;
    }
    snprintf(m.name, sizeof m.name, "%s", kvq_cli_type_name(o->type_k));
    if (o->type_v != o->type_k)
        snprintf(m.name + strlen(m.name), sizeof m.name - strlen(m.name), "/%s", kvq_cli_type_name(o->type_v));
    if (o->local_types) {
        snprintf(m.name + strlen(m.name), sizeof m.name - strlen(m.name), ":local=%s", kvq_cli_type_name(o->type_k_local));
        if (o->type_v_local != o->type_k_local)
            snprintf(m.name + strlen(m.name), sizeof m.name - strlen(m.name), "/%s", kvq_cli_type_name(o->type_v_local));
    }
    if (o->n_layer_types) snprintf(m.name + strlen(m.name), sizeof m.name - strlen(m.name), ":layers=%s", o->kv_layers);
    return m;
}

/* ---------------------------------------------------------------------------------------------------------
 * Strict value parsers
 * ------------------------------------------------------------------------------------------------------- */
int kvq_cli_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out, const char *name, char *err, size_t n) {
    const char *p = s;
    int neg = 0;
    if (*p == '-' && lo < 0) neg = 1, p++;
    if (*p < '0' || *p > '9') goto bad;
    uint64_t v = 0;
    for (; *p; p++) {
        if (*p < '0' || *p > '9') goto bad;
        unsigned d = (unsigned)(*p - '0');
        if (v > (UINT64_MAX - d) / 10) goto bad; /* overflow */
        v = v * 10 + d;
    }
    if (!neg && v > (uint64_t)INT64_MAX) goto bad;
    if (neg && v > (uint64_t)INT64_MAX + 1) goto bad;
    int64_t x = neg ? (int64_t)(0 - v) : (int64_t)v;
    if (x < lo || x > hi) goto bad;
    *out = x;
    return 0;
bad:
    return kvq_cli_fail(err, n, "%s: '%s' is not an integer in %" PRId64 "..%" PRId64, name, s, lo, hi);
}

int kvq_cli_parse_u64(const char *s, uint64_t *out, const char *name, char *err, size_t n) {
    const char *p = s;
    if (*p < '0' || *p > '9') goto bad;
    uint64_t v = 0;
    for (; *p; p++) {
        if (*p < '0' || *p > '9') goto bad;
        unsigned d = (unsigned)(*p - '0');
        if (v > (UINT64_MAX - d) / 10) goto bad;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
bad:
    return kvq_cli_fail(err, n, "%s: '%s' is not an integer in 0..%" PRIu64, name, s, UINT64_MAX);
}

static int parse_int(const char *s, int lo, int hi, int *out, const char *name, char *err, size_t n) {
    int64_t v;
    if (kvq_cli_parse_i64(s, lo, hi, &v, name, err, n)) return -1;
    *out = (int)v;
    return 0;
}

/* [digits][.digits] with at least one digit; returns the end, or NULL. */
static const char *scan_decimal(const char *s, double *out) {
    const char *p = s;
    int digits = 0;
    while (*p >= '0' && *p <= '9') p++, digits++;
    if (*p == '.') {
        p++;
        while (*p >= '0' && *p <= '9') p++, digits++;
    }
    if (!digits || (p - s) > 64) return NULL;
    char buf[72];
    memcpy(buf, s, (size_t)(p - s));
    buf[p - s] = '\0';
    errno = 0;
    double v = strtod(buf, NULL);
    if (errno || !isfinite(v)) return NULL;
    *out = v;
    return p;
}

int kvq_cli_parse_float(const char *s, double lo, double hi, float *out, const char *name, char *err, size_t n) {
    const char *p = s;
    int neg = 0;
    if (*p == '-') neg = 1, p++;
    double v;
    const char *end = scan_decimal(p, &v);
    if (!end || *end) return kvq_cli_fail(err, n, "%s: '%s' is not a decimal number", name, s);
    if (neg) v = -v;
    if (!(v >= lo && v <= hi)) return kvq_cli_fail(err, n, "%s: %s is outside %g..%g", name, s, lo, hi);
    *out = (float)v;
    return 0;
}

int kvq_cli_parse_size(const char *s, double *out, const char *name, char *err, size_t n) {
    double v;
    const char *end = scan_decimal(s, &v);
    if (!end) return kvq_cli_fail(err, n, "%s: '%s' is not a size (e.g. 4GiB, 512MiB, 2G, 1000000)", name, s);
    static const struct {
        const char *suf;
        double mul;
    } sufs[] = {{"", 1},      {"B", 1},           {"K", 1024.0},       {"KB", 1e3},  {"KiB", 1024.0},
                {"M", 1048576.0}, {"MB", 1e6},    {"MiB", 1048576.0},  {"G", 1073741824.0}, {"GB", 1e9},
                {"GiB", 1073741824.0}, {"T", 1099511627776.0}, {"TB", 1e12}, {"TiB", 1099511627776.0}};
    for (size_t i = 0; i < sizeof sufs / sizeof sufs[0]; i++) {
        if (strcasecmp(end, sufs[i].suf) != 0) continue;
        double b = v * sufs[i].mul;
        if (!(b >= 1)) return kvq_cli_fail(err, n, "%s: '%s' is less than one byte", name, s);
        if (!(b <= 1152921504606846976.0)) return kvq_cli_fail(err, n, "%s: '%s' is more than 2^60 bytes (1 EiB)", name, s);
        *out = floor(b);
        return 0;
    }
    return kvq_cli_fail(err, n, "%s: '%s': unknown unit '%s' (B, K/KiB, KB, M/MiB, MB, G/GiB, GB, T/TiB, TB)", name, s, end);
}

int kvq_cli_parse_type(const char *s, kvq_type *t, const char *name, char *err, size_t n) {
    /* llama.cpp's --cache-type names, mapped only where kvq has a type of the same kind. */
    static const struct {
        const char *llama, *kvq;
    } alias[] = {{"q8_0", "q8"}, {"q4_1", "q4"}};
    for (size_t i = 0; i < sizeof alias / sizeof alias[0]; i++)
        if (strcasecmp(s, alias[i].llama) == 0) s = alias[i].kvq;
    static const char *const unmapped[] = {"f32", "q4_0", "q5_0", "q5_1", "iq4_nl"};
    for (size_t i = 0; i < sizeof unmapped / sizeof unmapped[0]; i++)
        if (strcasecmp(s, unmapped[i]) == 0)
            return kvq_cli_fail(err, n, "%s: llama.cpp's type '%s' has no kvq equivalent (kvq: f16, bf16, q8, fp8, q4, q3, q2; "
                                "q8_0 and q4_1 map to q8 and q4)", name, s);
    const kvq_type_traits *tr;
    if (kvq_type_from_name(s, t) != KVQ_OK || !(tr = kvq_type_get_traits(*t)) || !tr->implemented)
        return kvq_cli_fail(err, n, "%s: unknown KV type '%s' (f16, bf16, q8, fp8, q4, q3, q2; llama.cpp's q8_0, q4_1)", name, s);
    return 0;
}

int kvq_cli_parse_roles(const char *s, int allow_default, int *out, const char *name, char *err, size_t n) {
    static const struct {
        const char *s;
        int v;
    } roles[] = {{"none", KVQ_ROLES_NONE}, {"k", KVQ_ROLES_K}, {"v", KVQ_ROLES_V}, {"kv", KVQ_ROLES_KV}};
    for (size_t i = 0; i < sizeof roles / sizeof roles[0]; i++)
        if (strcmp(s, roles[i].s) == 0) return *out = roles[i].v, 0;
    if (allow_default && strcmp(s, "default") == 0) return *out = -1, 0;
    return kvq_cli_fail(err, n, "%s: '%s' is not one of none, k, v, kv%s", name, s, allow_default ? ", default" : "");
}

/* "q4" or "q8/q4" (keys q8, values q4) -> *k, *v. */
static int parse_type_pair(char *s, kvq_type *k, kvq_type *v, const char *name, char *err, size_t n) {
    char *slash = strchr(s, '/');
    if (slash) *slash = '\0';
    if (kvq_cli_parse_type(s, k, name, err, n)) return -1;
    if (!slash) {
        *v = *k;
        return 0;
    }
    return kvq_cli_parse_type(slash + 1, v, name, err, n);
}

/* Per-layer types, clauses "LAYERS@TYPE[/TYPE]" joined by '+', LAYERS one or more of A or A-B joined by '.' (e.g.
 * "0-1.5@q8+29@q4/q8"): those layers (0-based) store keys and values as those types. Ranges must not overlap; the
 * engine checks them against the model's layers. */
static int parse_layer_types(const char *spec, int *count, llama_layer_types *out, const char *name, char *err, size_t n) {
    char buf[1024];
    if (strlen(spec) >= sizeof buf) return kvq_cli_fail(err, n, "%s: '%.40s...' is too long", name, spec);
    strcpy(buf, spec);
    int k = 0;
    for (char *p = buf, *e;; p = e + 1) {
        e = strchr(p, '+');
        if (e) *e = '\0';
        char *at = strchr(p, '@');
        if (!*p || !at) return kvq_cli_fail(err, n, "%s: '%s' is not A[-B]@TYPE[/TYPE] (e.g. 0-1.5@q8+29@q4)", name, p);
        *at = '\0';
        kvq_type tk, tv;
        if (parse_type_pair(at + 1, &tk, &tv, name, err, n)) return -1;
        for (char *q = p, *d;; q = d + 1) {
            d = strchr(q, '.');
            if (d) *d = '\0';
            if (k == LLAMA_MAX_LAYER_TYPES) return kvq_cli_fail(err, n, "%s: more than %d ranges", name, LLAMA_MAX_LAYER_TYPES);
            char *dash = strchr(q, '-');
            if (dash) *dash = '\0';
            int64_t a, b;
            if (kvq_cli_parse_i64(q, 0, 4095, &a, name, err, n)) return -1;
            b = a;
            if (dash && kvq_cli_parse_i64(dash + 1, 0, 4095, &b, name, err, n)) return -1;
            if (b < a)
                return kvq_cli_fail(err, n, "%s: layers %lld-%lld: the range ends before it starts", name, (long long)a, (long long)b);
            for (int j = 0; j < k; j++)
                if (a <= out[j].last && out[j].first <= b)
                    return kvq_cli_fail(err, n, "%s: layers %lld-%lld overlap %d-%d", name, (long long)a, (long long)b,
                                out[j].first, out[j].last);
            out[k].first = (int)a, out[k].last = (int)b, out[k].type_k = tk, out[k].type_v = tv;
            k++;
            if (!d) break;
        }
        if (!e) break;
    }
    *count = k;
    return 0;
}

/* "q4" -> q4/q4, "q8/q4" -> keys q8, values q4; then suffixes, each at most once, in any order: ":r128" (residual),
 * ":g32" (group), ":rot=kv", ":sinks=4", ":nuq=k", ":seed=7", ":pre=1", ":squat=8", ":lambda=0.05" (kvq.h section 10), ":local=q4" or
 * ":local=q8/q4" (the sliding-window layers' types). The entry's defaults are the global options' (`g`). */
static int parse_mix(const char *s, size_t len, kvq_cli_mix *m, const kvq_cli_mix *g, char *err, size_t n) {
    char buf[KVQ_CLI_MIX_NAME];
    if (len >= sizeof buf) return kvq_cli_fail(err, n, "--compare: entry '%.*s' is longer than %zu characters", (int)len, s, sizeof buf - 1);
    memcpy(buf, s, len);
    buf[len] = '\0';
    *m = *g;
    memcpy(m->name, buf, len + 1);
    enum { S_R, S_G, S_ROT, S_SINKS, S_NUQ, S_SEED, S_PRE, S_LOCAL, S_SQUAT, S_LAMBDA, S_LAYERS, S_QNORM, S_OUTL, S_P8, S_W8, S_N };
    static const char *const what[S_N] = {":rR", ":gG", ":rot=", ":sinks=", ":nuq=", ":seed=", ":pre=", ":local=",
                                           ":squat=", ":lambda=", ":layers=", ":qnorm=", ":outl=", ":p8=", ":w8="};
    int seen[S_N] = {0};
    for (char *colon; (colon = strrchr(buf, ':')) != NULL; *colon = '\0') {
        const char *x = colon + 1;
        int k;
        if (strncmp(x, "rot=", 4) == 0) k = S_ROT, x += 4;
        else if (strncmp(x, "sinks=", 6) == 0) k = S_SINKS, x += 6;
        else if (strncmp(x, "nuq=", 4) == 0) k = S_NUQ, x += 4;
        else if (strncmp(x, "seed=", 5) == 0) k = S_SEED, x += 5;
        else if (strncmp(x, "pre=", 4) == 0) k = S_PRE, x += 4;
        else if (strncmp(x, "local=", 6) == 0) k = S_LOCAL, x += 6;
        else if (strncmp(x, "squat=", 6) == 0) k = S_SQUAT, x += 6;
        else if (strncmp(x, "lambda=", 7) == 0) k = S_LAMBDA, x += 7;
        else if (strncmp(x, "layers=", 7) == 0) k = S_LAYERS, x += 7;
        else if (strncmp(x, "qnorm=", 6) == 0) k = S_QNORM, x += 6;
        else if (strncmp(x, "outl=", 5) == 0) k = S_OUTL, x += 5;
        else if (strncmp(x, "p8=", 3) == 0) k = S_P8, x += 3;
        else if (strncmp(x, "w8=", 3) == 0) k = S_W8, x += 3;
        else if (x[0] == 'r' && x[1] >= '0' && x[1] <= '9') k = S_R, x += 1;
        else if (x[0] == 'g' && x[1] >= '0' && x[1] <= '9') k = S_G, x += 1;
        else if ((x[0] == 'r' || x[0] == 'g') && x[1] == '-') k = x[0] == 'r' ? S_R : S_G, x += 1; /* named range error */
        else
            return kvq_cli_fail(err, n,
                        "--compare: entry '%s': '%s' is not a suffix (:rRESIDUAL, :gGROUP, :rot=none|k|v|kv, :sinks=N, "
                        ":nuq=none|k|v|kv, :qnorm=none|k|v|kv, :outl=none|k|v|kv, :p8=none|k|v|kv, :w8=none|k|v|kv, :seed=N, :pre=0|1, :squat=R, :lambda=auto|X, :local=TYPE[/TYPE], "
                        ":layers=A[-B]@TYPE[/TYPE]+...)", m->name, colon);
        if (seen[k]++) return kvq_cli_fail(err, n, "--compare: entry '%s' gives %s more than once (each at most once)", m->name, what[k]);
        int64_t v;
        switch (k) {
        case S_R: if (parse_int(x, 0, 4096, &m->residual, "--compare: residual (:rR)", err, n)) return -1; break;
        case S_G: if (parse_int(x, 16, 128, &m->group, "--compare: group (:gG)", err, n)) return -1; break;
        case S_ROT: if (kvq_cli_parse_roles(x, 0, &m->rotate, "--compare: rotation (:rot=)", err, n)) return -1; break;
        case S_SINKS: if (parse_int(x, 0, 1024, &m->sinks, "--compare: sinks (:sinks=)", err, n)) return -1; break;
        case S_NUQ: if (kvq_cli_parse_roles(x, 0, &m->nonuniform, "--compare: non-uniform levels (:nuq=)", err, n)) return -1; break;
        case S_QNORM: if (kvq_cli_parse_roles(x, 0, &m->qnorm, "--compare: Q-Norm (:qnorm=)", err, n)) return -1; break;
        case S_OUTL: if (kvq_cli_parse_roles(x, 0, &m->outliers, "--compare: outliers (:outl=)", err, n)) return -1; break;
        case S_P8: if (kvq_cli_parse_roles(x, 0, &m->params8, "--compare: 8-bit parameters (:p8=)", err, n)) return -1; break;
        case S_W8: if (kvq_cli_parse_roles(x, 0, &m->window8, "--compare: 8-bit windows (:w8=)", err, n)) return -1; break;
        case S_PRE: if (parse_int(x, 0, 1, &m->prerope, "--compare: pre-RoPE keys (:pre=)", err, n)) return -1; break;
        case S_SQUAT: if (parse_int(x, 0, 32, &m->squat_rank, "--compare: SQuat rank (:squat=)", err, n)) return -1; break;
        case S_LAMBDA:
            if (strcmp(x, "auto") == 0) m->squat_lambda = 0;
            else if (kvq_cli_parse_float(x, 1e-6, 1e6, &m->squat_lambda, "--compare: SQuat lambda (:lambda=)", err, n)) return -1;
            break;
        case S_LOCAL:
            if (parse_type_pair((char *)x, &m->type_k_local, &m->type_v_local, "--compare: local layers' types (:local=)", err, n))
                return -1;
            m->local_types = 1;
            break;
        case S_LAYERS:
            if (parse_layer_types(x, &m->n_layer_types, m->layer_types, "--compare: per-layer types (:layers=)", err, n))
                return -1;
            break;
        case S_SEED:
            if (kvq_cli_parse_i64(x, 0, UINT32_MAX, &v, "--compare: rotation seed (:seed=)", err, n)) return -1;
            m->rotation_seed = (uint32_t)v;
            break;
        }
    }
    if (strncmp(buf, "plan=", 5) == 0) { /* a kvq-plan file gives every layer's types */
        if (seen[S_LAYERS] || seen[S_LOCAL])
            return kvq_cli_fail(err, n, "--compare: entry '%s': a plan gives every layer's types: no %s with it", m->name,
                        seen[S_LAYERS] ? ":layers=" : ":local=");
        return kvq_cli_plan_read(buf + 5, m, "--compare: plan=", err, n);
    }
    return parse_type_pair(buf, &m->type_k, &m->type_v, "--compare", err, n);
}

int kvq_cli_parse_compare(const char *s, kvq_cli_opts *o, char *err, size_t n) {
    o->n_compare = 0;
    if (!*s) return kvq_cli_fail(err, n, "--compare: the list is empty (e.g. --compare f16,q8,q4)");
    kvq_cli_mix g = kvq_cli_single_mix(o);
    int count = 1;
    for (const char *p = s; *p; p++) count += *p == ',';
    if (count > KVQ_CLI_MAX_COMPARE)
        return kvq_cli_fail(err, n, "--compare: %d entries, at most %d", count, KVQ_CLI_MAX_COMPARE);
    for (const char *p = s;;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == 0) return kvq_cli_fail(err, n, "--compare: entry %d of '%s' is empty", o->n_compare + 1, s);
        if (parse_mix(p, len, &o->compare[o->n_compare], &g, err, n)) {
            o->n_compare = 0;
            return -1;
        }
        o->n_compare++;
        if (!e) break;
        p = e + 1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * The option table
 * ------------------------------------------------------------------------------------------------------- */
enum {
    O_HELP, O_MODEL, O_PROMPT, O_FILE, O_MAXFILE, O_SYSTEM, O_CHAT, O_IDS, O_QUIET, O_NPRED, O_CTX, O_CHUNKS,
    O_THREADS, O_BATCH, O_DECODE_ATTN, O_PREFILL_ATTN, O_RESIDUAL, O_GROUP, O_KVTYPE, O_KVTYPE_K, O_KVTYPE_V, O_TEMP, O_TOP_P, O_TOP_K, O_MIN_P,
    O_REPEAT_PEN, O_REPEAT_N, O_SEED, O_COMPARE, O_MEM, O_PARALLEL, O_KV_ROTATE, O_KV_SINKS, O_KV_NUQ, O_KV_QNORM, O_KV_OUTLIERS, O_KV_PARAMS8, O_KV_WINDOW8, O_KV_PREROPE, O_KV_SQUAT, O_KV_SQUAT_LAMBDA, O_KV_TYPE_LOCAL, O_KV_LAYERS, O_KV_PLAN, O_ROT_SEED, O_CSV, O_LENGTHS, O_DEPTHS, O_TRIALS, O_GPU, O_NGL
};
#define R (1u << KVQ_CLI_RUN)
#define P (1u << KVQ_CLI_PPL)
#define C (1u << KVQ_CLI_CAP)
#define T (1u << KVQ_CLI_TOK)
#define K (1u << KVQ_CLI_PASSKEY)

typedef struct optdef {
    int id;
    unsigned cmds;
    int takes_value;
    const char *names[4];
} optdef;

static const optdef OPTS[] = {
    {O_HELP, R | P | C | T | K, 0, {"-h", "--help"}},
    {O_MODEL, R | P | C | T | K, 1, {"-m", "--model"}},
    {O_PROMPT, R | T, 1, {"-p", "--prompt"}},
    {O_FILE, R | P | T, 1, {"-f", "--file"}},
    {O_MAXFILE, R | P | T, 1, {"--max-file-size"}},
    {O_SYSTEM, R | T | K, 1, {"--system", "--system-prompt", "-sys"}},
    {O_CHAT, R | T | K, 0, {"--chat"}},
    {O_IDS, T, 0, {"--ids"}},
    {O_QUIET, P | K, 0, {"-q", "--quiet"}},
    {O_NPRED, R | K, 1, {"-n", "--n-predict"}},
    {O_CTX, R | P | C, 1, {"-c", "--ctx", "--ctx-size"}},
    {O_CHUNKS, P, 1, {"--chunks"}},
    {O_THREADS, R | P | K, 1, {"-t", "--threads"}},
    {O_BATCH, R | P | C | K, 1, {"-b", "--batch", "--batch-size"}},
    {O_DECODE_ATTN, P, 0, {"--decode-attn"}},
    {O_PREFILL_ATTN, R | P | K, 1, {"--prefill-attn"}},
    {O_RESIDUAL, R | P | C | K, 1, {"--residual"}},
    {O_GROUP, R | P | C | K, 1, {"--group"}},
    {O_KVTYPE, R | P | K, 1, {"--kv-type"}},
    {O_KVTYPE_K, R | P | K, 1, {"--kv-type-k", "-ctk", "--cache-type-k"}},
    {O_KVTYPE_V, R | P | K, 1, {"--kv-type-v", "-ctv", "--cache-type-v"}},
    {O_TEMP, R, 1, {"--temp"}},
    {O_TOP_P, R, 1, {"--top-p"}},
    {O_TOP_K, R, 1, {"--top-k"}},
    {O_MIN_P, R, 1, {"--min-p"}},
    {O_REPEAT_PEN, R, 1, {"--repeat-penalty"}},
    {O_REPEAT_N, R, 1, {"--repeat-last-n"}},
    {O_SEED, R | K, 1, {"-s", "--seed"}},
    {O_COMPARE, R | P | C | K, 1, {"--compare"}},
    {O_MEM, C, 1, {"--mem"}},
    {O_PARALLEL, C, 1, {"--parallel", "-np"}},
    {O_KV_ROTATE, R | P | C | K, 1, {"--kv-rotate"}},
    {O_KV_SINKS, R | P | C | K, 1, {"--kv-sinks"}},
    {O_KV_NUQ, R | P | C | K, 1, {"--kv-nuq"}},
    {O_KV_QNORM, R | P | C | K, 1, {"--kv-qnorm"}},
    {O_KV_OUTLIERS, R | P | C | K, 1, {"--kv-outliers"}},
    {O_KV_PARAMS8, R | P | C | K, 1, {"--kv-params8"}},
    {O_KV_WINDOW8, R | P | C | K, 1, {"--kv-window8"}},
    {O_KV_PREROPE, R | P | C | K, 1, {"--kv-prerope"}},
    {O_KV_SQUAT, R | P | K, 1, {"--kv-squat"}},
    {O_KV_SQUAT_LAMBDA, R | P | K, 1, {"--kv-squat-lambda"}},
    {O_KV_TYPE_LOCAL, R | P | C | K, 1, {"--kv-type-local"}},
    {O_KV_LAYERS, R | P | C | K, 1, {"--kv-layers"}},
    {O_KV_PLAN, R | P | K, 1, {"--kv-plan"}},
    {O_ROT_SEED, R | P | C | K, 1, {"--rotation-seed"}},
    {O_CSV, P | K, 1, {"--csv"}},
    {O_LENGTHS, K, 1, {"--lengths"}},
    {O_DEPTHS, K, 1, {"--depths"}},
    {O_TRIALS, K, 1, {"--trials"}},
    {O_GPU, R | P, 0, {"--gpu"}},
    {O_NGL, R | P, 1, {"-ngl", "--n-gpu-layers", "--gpu-layers"}},
};

static const optdef *find_opt(const char *a) {
    for (size_t i = 0; i < sizeof OPTS / sizeof OPTS[0]; i++)
        for (int j = 0; j < 4 && OPTS[i].names[j]; j++)
            if (strcmp(a, OPTS[i].names[j]) == 0) return &OPTS[i];
    return NULL;
}

int kvq_cli_parse(int cmd, int argc, char **argv, kvq_cli_opts *o, char *err, size_t n) {
    if (err && n) err[0] = '\0';
    if (cmd < 0 || cmd >= KVQ_CLI_NCMD) return kvq_cli_fail(err, n, "unknown command %d", cmd);
    kvq_cli_defaults(cmd, o);
    const char *cname = CMD_NAMES[cmd], *compare = NULL, *kv_type_given = NULL;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!a) return kvq_cli_fail(err, n, "argument %d is NULL", i);
        const optdef *d = find_opt(a);
        if (!d) return kvq_cli_fail(err, n, "unknown option '%s' (kvq %s --help lists its options)", a, cname);
        if (!(d->cmds & (1u << cmd))) {
            char users[64] = "";
            for (int c = 0; c < KVQ_CLI_NCMD; c++)
                if (d->cmds & (1u << c))
                    snprintf(users + strlen(users), sizeof users - strlen(users), "%s%s", users[0] ? ", " : "", CMD_NAMES[c]);
            return kvq_cli_fail(err, n, "option '%s' is not used by 'kvq %s' (it is an option of: %s)", a, cname, users);
        }
        const char *v = NULL;
        if (d->takes_value) {
            if (i + 1 >= argc || !argv[i + 1]) return kvq_cli_fail(err, n, "option '%s' needs a value", a);
            v = argv[++i];
        }
        float f;
        switch (d->id) {
        case O_HELP: return 1;
        case O_MODEL: o->model = v; break;
        case O_PROMPT: o->prompt = v; break;
        case O_FILE: o->file = v; break;
        case O_SYSTEM: o->system = v; break;
        case O_CHAT: o->chat = 1; break;
        case O_IDS: o->ids = 1; break;
        case O_GPU: o->gpu = 1; break;
        case O_NGL:
            if (parse_int(v, 0, 1 << 20, &o->ngl, a, err, n)) return -1;
            o->gpu = o->ngl > 0;
            break;
        case O_QUIET: o->quiet = 1; break;
        case O_MAXFILE: {
            double b;
            if (kvq_cli_parse_size(v, &b, a, err, n)) return -1;
            if (b > (double)(SIZE_MAX / 2)) return kvq_cli_fail(err, n, "%s: '%s' is too large", a, v);
            o->max_file = (size_t)b;
            break;
        }
        case O_NPRED: if (parse_int(v, cmd == KVQ_CLI_PASSKEY ? 1 : 0, 1 << 20, &o->n_predict, a, err, n)) return -1; break;
        case O_LENGTHS:
            if (kvq_cli_parse_int_list(v, 64, 1 << 22, KVQ_CLI_MAX_LENGTHS, o->lengths, &o->n_lengths, a, err, n)) return -1;
            break;
        case O_DEPTHS:
            if (kvq_cli_parse_int_list(v, 0, 100, KVQ_CLI_MAX_DEPTHS, o->depths, &o->n_depths, a, err, n)) return -1;
            break;
        case O_TRIALS: if (parse_int(v, 1, 10000, &o->trials, a, err, n)) return -1; break;
        case O_CTX: if (parse_int(v, cmd == KVQ_CLI_CAP ? 1 : 2, 1 << 22, &o->ctx, a, err, n)) return -1; break;
        case O_CHUNKS: if (parse_int(v, 1, 1 << 20, &o->chunks, a, err, n)) return -1; break;
        case O_THREADS: if (parse_int(v, 1, 1024, &o->threads, a, err, n)) return -1; break;
        case O_BATCH: if (parse_int(v, 1, 8192, &o->batch, a, err, n)) return -1; break;
        case O_DECODE_ATTN: o->decode_attn = 1; break;
        case O_PREFILL_ATTN:
            if (!strcmp(v, "exact")) o->prefill_attn = 1;
            else if (!strcmp(v, "cache")) o->prefill_attn = 0;
            else return kvq_cli_fail(err, n, "%s: '%s' is not exact or cache", a, v);
            break;
        case O_RESIDUAL: if (parse_int(v, 0, 4096, &o->residual, a, err, n)) return -1; break;
        case O_GROUP: if (parse_int(v, 16, 128, &o->group, a, err, n)) return -1; break;
        case O_KVTYPE:
            if (kvq_cli_parse_type(v, &o->type_k, a, err, n)) return -1;
            o->type_v = o->type_k;
            kv_type_given = a;
            break;
        case O_KVTYPE_K: if (kvq_cli_parse_type(v, &o->type_k, a, err, n)) return -1; kv_type_given = a; break;
        case O_KVTYPE_V: if (kvq_cli_parse_type(v, &o->type_v, a, err, n)) return -1; kv_type_given = a; break;
        case O_TEMP: if (kvq_cli_parse_float(v, 0, 100, &o->temp, a, err, n)) return -1; break;
        case O_TOP_P: if (kvq_cli_parse_float(v, 0, 1, &o->top_p, a, err, n)) return -1; break;
        case O_MIN_P: if (kvq_cli_parse_float(v, 0, 1, &o->min_p, a, err, n)) return -1; break;
        case O_TOP_K: if (parse_int(v, 0, 1 << 24, &o->top_k, a, err, n)) return -1; break;
        case O_REPEAT_PEN:
            if (kvq_cli_parse_float(v, 0, 100, &f, a, err, n)) return -1;
            if (!(f > 0)) return kvq_cli_fail(err, n, "%s: %s must be > 0 (1 = off)", a, v);
            o->repeat_penalty = f;
            break;
        case O_REPEAT_N: if (parse_int(v, -1, 1 << 22, &o->repeat_last_n, a, err, n)) return -1; break;
        case O_SEED: if (kvq_cli_parse_u64(v, &o->seed, a, err, n)) return -1; break;
        case O_COMPARE: compare = v; break;
        case O_CSV:
            if (!*v) return kvq_cli_fail(err, n, "%s: the file name is empty", a);
            o->csv = v;
            break;
        case O_MEM: if (kvq_cli_parse_size(v, &o->mem, a, err, n)) return -1; break;
        case O_PARALLEL: if (parse_int(v, 1, 65536, &o->parallel, a, err, n)) return -1; break;
        case O_KV_ROTATE: if (kvq_cli_parse_roles(v, 1, &o->rotate, a, err, n)) return -1; break;
        case O_KV_NUQ: if (kvq_cli_parse_roles(v, 1, &o->nonuniform, a, err, n)) return -1; break;
        case O_KV_QNORM: if (kvq_cli_parse_roles(v, 1, &o->qnorm, a, err, n)) return -1; break;
        case O_KV_OUTLIERS: if (kvq_cli_parse_roles(v, 1, &o->outliers, a, err, n)) return -1; break;
        case O_KV_PARAMS8: if (kvq_cli_parse_roles(v, 1, &o->params8, a, err, n)) return -1; break;
        case O_KV_WINDOW8: if (kvq_cli_parse_roles(v, 1, &o->window8, a, err, n)) return -1; break;
        case O_KV_TYPE_LOCAL: {
            char tb[64];
            if (strlen(v) >= sizeof tb) return kvq_cli_fail(err, n, "%s: '%.40s...' is too long", a, v);
            strcpy(tb, v);
            if (parse_type_pair(tb, &o->type_k_local, &o->type_v_local, a, err, n)) return -1;
            o->local_types = 1;
            break;
        }
        case O_KV_LAYERS:
            if (parse_layer_types(v, &o->n_layer_types, o->layer_types, a, err, n)) return -1;
            o->kv_layers = v;
            break;
        case O_KV_PLAN:
            if (!*v) return kvq_cli_fail(err, n, "%s: the file name is empty", a);
            o->kv_plan = v;
            break;
        case O_KV_PREROPE:
            if (strcmp(v, "default") == 0) o->prerope = -1;
            else if (parse_int(v, 0, 1, &o->prerope, a, err, n)) return kvq_cli_fail(err, n, "%s: '%s' is not 0, 1 or default", a, v);
            break;
        case O_KV_SQUAT:
            if (strcmp(v, "default") == 0) o->squat_rank = -1;
            else if (parse_int(v, 0, 32, &o->squat_rank, a, err, n)) return kvq_cli_fail(err, n, "%s: '%s' is not 0..32 or default", a, v);
            break;
        case O_KV_SQUAT_LAMBDA:
            if (strcmp(v, "auto") == 0) o->squat_lambda = 0;
            else if (kvq_cli_parse_float(v, 1e-6, 1e6, &o->squat_lambda, a, err, n)) return -1;
            break;
        case O_KV_SINKS:
            if (strcmp(v, "default") == 0) o->sinks = -1;
            else if (parse_int(v, 0, 1024, &o->sinks, a, err, n)) return kvq_cli_fail(err, n, "%s: '%s' is not 0..1024 or default", a, v);
            break;
        case O_ROT_SEED: {
            int64_t x;
            if (kvq_cli_parse_i64(v, 0, UINT32_MAX, &x, a, err, n)) return -1;
            o->rotation_seed = (uint32_t)x;
            break;
        }
        default: return kvq_cli_fail(err, n, "option '%s': internal error (no handler)", a);
        }
    }
    if (o->kv_plan) { /* the plan gives every layer's types: nothing else may */
        const char *other = kv_type_given ? kv_type_given : o->kv_layers ? "--kv-layers" : o->local_types ? "--kv-type-local"
                                                          : compare ? "--compare" : NULL;
        if (other)
            return kvq_cli_fail(err, n, "--kv-plan gives every layer's types: not with %s%s", other,
                        compare ? " (in --compare, an entry plan=FILE)" : "");
        kvq_cli_mix pm = kvq_cli_single_mix(o);
        if (kvq_cli_plan_read(o->kv_plan, &pm, "--kv-plan", err, n)) return -1;
        o->type_k = pm.type_k, o->type_v = pm.type_v, o->plan_layers = pm.plan_layers;
        o->n_layer_types = pm.n_layer_types;
        memcpy(o->layer_types, pm.layer_types, sizeof o->layer_types);
    }
    /* --compare entries inherit --residual/--group/--kv-rotate/... wherever they come on the line. */
    if (compare && kvq_cli_parse_compare(compare, o, err, n)) return -1;
    if (!o->model)
        return kvq_cli_fail(err, n, "-m MODEL is required (see kvq %s --help; scripts/fetch-model.sh gets SmolLM2-135M-Instruct)", cname);
    switch (cmd) {
    case KVQ_CLI_RUN:
    case KVQ_CLI_TOK:
        if (!o->prompt == !o->file) return kvq_cli_fail(err, n, "give exactly one of -p TEXT or -f FILE");
        break;
    case KVQ_CLI_PPL:
        if (!o->file) return kvq_cli_fail(err, n, "-f TEXTFILE is required");
        break;
    case KVQ_CLI_PASSKEY:
        for (int i = 0; i < o->n_lengths; i++)
            if (o->lengths[i] <= o->n_predict)
                return kvq_cli_fail(err, n, "--lengths: %d leaves no room for a prompt before -n %d answer tokens", o->lengths[i],
                            o->n_predict);
        break;
    case KVQ_CLI_CAP:
        if (!o->mem == !o->ctx)
            return kvq_cli_fail(err, n, "give exactly one of --mem SIZE (what fits in SIZE) or --ctx N (memory for N tokens)");
        break;
    }
    if (o->n_compare && (o->type_k != KVQ_TYPE_F16 || o->type_v != KVQ_TYPE_F16))
        return kvq_cli_fail(err, n, "--compare lists the KV types itself: drop --kv-type/-ctk/-ctv");
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * Help
 * ------------------------------------------------------------------------------------------------------- */
kvq_cli_libdefaults kvq_cli_lib_defaults(void) {
    kvq_cli_libdefaults d = {-1, -1, -1, -1};
    for (int pass = 0; pass < 2; pass++) {
        kvq_cache_config cc = kvq_cache_config_default();
        cc.n_layers = 1;
        cc.n_kv_heads = 1;
        cc.head_dim = 64;
        cc.max_seqs = 1;
        if (pass == 0) cc.type_k = cc.type_v = KVQ_TYPE_Q4;
        cc.arena_bytes = kvq_cache_arena_bytes_for(&cc, 1);
        kvq_cache *c = NULL;
        kvq_cache_config got;
        kvq_page_layout lay;
        if (cc.arena_bytes && kvq_cache_create(&cc, &c) == KVQ_OK && kvq_cache_get_config(c, &got, &lay) == KVQ_OK) {
            if (pass == 0) {
                d.residual_grouped = got.residual;
                d.group = got.group;
                d.page_tokens = got.page_tokens;
            } else {
                d.residual_per_token = got.residual;
            }
        }
        kvq_cache_free(c);
    }
    return d;
}

static void kv_help(FILE *f, int cmd) {
    kvq_cli_opts d;
    kvq_cli_defaults(cmd, &d);
    kvq_cli_libdefaults lib = kvq_cli_lib_defaults();
    if (cmd != KVQ_CLI_CAP)
        fprintf(f,
                "  --kv-type T             KV cache type of keys and values: f16, bf16, q8, fp8, q4, q3, q2 (default %s)\n"
                "  --kv-type-k T, -ctk T, --cache-type-k T   key type alone\n"
                "  --kv-type-v T, -ctv T, --cache-type-v T   value type alone\n"
                "                          llama.cpp's names are accepted where kvq has a type of the same kind:\n"
                "                          q8_0 = q8 (8-bit, fp16 scale; kvq scales per token and head, not per 32),\n"
                "                          q4_1 = q4 (4-bit, fp16 scale and min; kvq groups keys per channel over G\n"
                "                          tokens, KIVI); f32, q4_0, q5_0, q5_1 and iq4_nl have no kvq equivalent\n",
                kvq_cli_type_name(d.type_k));
    fprintf(f,  "  --kv-type-local T[/T]   types (keys[/values]) of the sliding-window layers of a model that has them\n"
                "                          (Gemma 3: 5 local layers of window 512 for each global one); the global layers\n"
                "                          keep --kv-type. Default: the same types as the global layers. In --compare:\n"
                "                          ':local=T[/T]' (e.g. --compare f16,q8:local=q4). A model without local\n"
                "                          layers ignores it. Local layers never have sinks (the window leaves token 0)\n"
                "  --kv-layers A[-B]@T[/T][+...]  per-layer types: layers A..B (0-based) store keys[/values] as T, the\n"
                "                          others --kv-type (e.g. --kv-layers 0-1@q8+29@q8 with --kv-type q2: mixed\n"
                "                          precision where the error costs most). In --compare: ':layers=...'. CPU\n"
                "                          engine only; pre-RoPE keys and SQuat follow each layer's key type\n");
    if (cmd != KVQ_CLI_CAP)
        fprintf(f, "  --kv-plan FILE          every layer's types from a kvq-plan file (kvq calibrate -o FILE writes one;\n"
                   "                          format: docs/kv-plan.md), instead of --kv-type/--kv-layers. In --compare: an\n"
                   "                          entry plan=FILE\n");
    fprintf(f,
            "  --residual R            fp16 residual window: the newest R..R+G-1 tokens stay exact (default: libkvq's,\n"
            "                          %d for q4/q3/q2, %d for the per-token types)\n"
            "  --group G               q4/q3/q2 group size: 16, 32, 64 or 128 (default: libkvq's, %d)\n"
            "  --kv-rotate R           randomized Hadamard rotation of none|k|v|kv before quantizing (kvq.h section 10;\n"
            "                          default: libkvq's for the types)\n"
            "  --rotation-seed N       seed of the rotation's random signs, 0..2^32-1 (default 0: libkvq's fixed seed)\n"
            "  --kv-sinks N            the first N tokens (0..1024) stay exact fp16 (kvq.h section 10; default: libkvq's)\n"
            "  --kv-nuq R              non-uniform quantization levels for the q4/q3/q2 roles none|k|v|kv (kvq.h section 10;\n"
            "                          default: libkvq's)\n"
            "  --kv-qnorm R            Q-Norm for the q4/q3/q2 roles none|k|v|kv: each group's (scale, min) matched to\n"
            "                          its mean and std (kvq.h section 10; CPU and GPU; default: every q4/q3/q2 role)\n"
            "  --kv-outliers R         dense-and-sparse outliers for the q4/q3/q2 roles none|k|v|kv: each group keeps its\n"
            "                          most range-widening value exact on the side (+3 bytes per group; kvq.h section\n"
            "                          10; CPU only; default: k for q4/q3/q2 keys on the CPU, none on the GPU)\n"
            "  --kv-params8 R          8-bit group parameters for the q4/q3/q2 roles none|k|v|kv: each group's (scale,\n"
            "                          min) in two bytes, 0.25 bits per element less at G = 64 (kvq.h sections 5, 10;\n"
            "                          CPU only; default: none)\n"
            "  --kv-window8 R          8-bit residual windows for the roles none|k|v|kv: the window's rows (the keys'\n"
            "                          partial group too) as int8 with a scale per token and head, half of fp16's bytes\n"
            "                          (kvq.h section 10; CPU only; default: none)\n"
            "  --kv-prerope 0|1        1: the cache stores keys before RoPE and applies it in attention (kvq.h section 10;\n"
            "                          default: 1 for q2 keys on the CPU, else 0)\n",
            lib.residual_grouped, lib.residual_per_token, lib.group);
    if (cmd == KVQ_CLI_RUN || cmd == KVQ_CLI_PPL || cmd == KVQ_CLI_PASSKEY)
        fprintf(f, "  --kv-squat R            SQuat keys (kvq.h section 10): quantize q4/q3/q2 keys so that their error is\n"
                   "                          nearly orthogonal to the rank-R subspace of the first prefill batch's queries;\n"
                   "                          0..32, 0 off (default: %d for q2 keys on the CPU, else off: it costs prefill)\n"
                   "  --kv-squat-lambda auto|X   its ridge lambda > 0 (default auto: R / head_dim)\n",
                llama_default_squat(KVQ_TYPE_Q2));
    if (cmd != KVQ_CLI_CAP)
        fprintf(f, "  -t, --threads N         threads for BLAS and attention (default: all cores; at most the online CPUs)\n");
    if (cmd == KVQ_CLI_RUN || cmd == KVQ_CLI_PPL)
        fprintf(f, "  --gpu                   run the engine on the GPU (a CUDA build; sm_90): fp16 weights, cuBLAS, the KV cache\n"
                   "                          and attention in libkvq's CUDA backend (no --kv-prerope, no --kv-nuq there)\n"
                   "  -ngl N, --n-gpu-layers N   llama.cpp's spelling: N > 0 means --gpu with every layer on the GPU\n"
                   "                          (partial offload is not supported), 0 the CPU\n");
    fprintf(f, "  -b, --batch-size N      tokens per forward call in prefill (default %d)%s\n", d.batch,
            cmd == KVQ_CLI_CAP ? ": sizes the activation buffers" : "");
    if (cmd == KVQ_CLI_RUN || cmd == KVQ_CLI_PPL || cmd == KVQ_CLI_PASSKEY)
        fprintf(f, "  --prefill-attn MODE     how a batch of prompt tokens attends (default %s):\n"
                   "                          exact: its queries read the cache as it was and the batch's own K/V in fp16,\n"
                   "                          then the batch is stored (kvq_attn_prefill_exact; CPU engine only);\n"
                   "                          cache: the batch is stored first and read back as stored: with q4/q3/q2 a\n"
                   "                          batch longer than the fp16 window reads its early tokens quantized\n",
                cmd == KVQ_CLI_PPL ? "cache: the error the cache's contents cause" : "exact on the CPU, cache with --gpu");
}

static void file_help(FILE *f) {
    char lim[32];
    kvq_cli_fmt_bytes((double)KVQ_CLI_DEFAULT_MAX_FILE, lim, sizeof lim);
    fprintf(f, "  --max-file-size SIZE    largest input file read (default %s; files, pipes, '-' = stdin)\n", lim);
}

void kvq_cli_usage_main(FILE *f) {
    fprintf(f, "usage: kvq <command> [options]   (kvq <command> --help for its options)\n\n"
               "commands:\n"
               "  run         generate text from a prompt with a quantized KV cache (--compare f16,q4: side by side)\n"
               "  perplexity  perplexity of a text file (--compare f16,q8,q4,q2 for a table)\n"
               "  capacity    what fits in a memory budget (--mem), or the memory N tokens need (--ctx)\n"
               "  tokenize    print the token ids of a text\n"
               "  passkey     find a pass key hidden in filler text: a depth x length grid per KV type\n"
               "  bench       end-to-end prefill and decode speed per KV type and depth, CPU or --gpu\n"
               "  calibrate   per-layer KV types for a bit budget, from each layer's measured sensitivity\n"
               "  gen-model   write a GGUF of a real model's shape with seeded random weights (tests, benchmarks)\n"
               "  version     print the library version\n");
}

void kvq_cli_usage(int cmd, FILE *f) {
    kvq_cli_opts d;
    kvq_cli_defaults(cmd, &d);
    switch (cmd) {
    case KVQ_CLI_RUN:
        fprintf(f,
                "usage: kvq run -m MODEL (-p PROMPT | -f FILE) [options]\n"
                "Generates text and streams it to stdout; then prints prefill/decode speed and KV memory on stderr.\n\n"
                "  -m, --model FILE        GGUF model (Llama family, byte-level BPE vocabulary)\n"
                "  -p, --prompt TEXT       prompt\n"
                "  -f, --file FILE         read the prompt from FILE\n"
                "  -n, --n-predict N       tokens to generate at most (default %d)\n"
                "  --chat                  wrap the prompt in the model's chat template (ChatML)\n"
                "  --system TEXT, --system-prompt TEXT   system prompt for --chat (default: the model's)\n"
                "  -c, --ctx-size N        context size to reserve (default: prompt + n-predict, at most the model's\n"
                "                          trained context_length)\n"
                "  --compare LIST          run the prompt once per KV config (as in perplexity --compare, e.g.\n"
                "                          f16,q4) and print the answers and a table: resident KV bytes, ratio to the\n"
                "                          f16 row, prefill and decode tokens/s, and where each answer first differs\n"
                "                          from the first row's (use with --temp 0: greedy)\n"
                "sampling (order: repeat penalty, top-k, temperature, top-p, min-p):\n"
                "  --temp T                temperature; 0 = greedy (default %g)\n"
                "  --top-k K               keep the K most likely tokens; 0 = off (default %d)\n"
                "  --top-p P               nucleus threshold; 1 = off (default %g)\n"
                "  --min-p P               drop tokens below P x the top probability; 0 = off (default %g)\n"
                "  --repeat-penalty X      divide positive logits (multiply negative ones) of recent tokens by X;\n"
                "                          1 = off (default %g)\n"
                "  --repeat-last-n N       tokens the penalty looks back over; 0 = none, -1 = whole context (default %d)\n"
                "  -s, --seed S            random seed, 0..2^64-1 (default %llu)\n",
                d.n_predict, (double)d.temp, d.top_k, (double)d.top_p, (double)d.min_p, (double)d.repeat_penalty,
                d.repeat_last_n, (unsigned long long)d.seed);
        kv_help(f, cmd);
        file_help(f);
        break;
    case KVQ_CLI_PPL:
        fprintf(f,
                "usage: kvq perplexity -m MODEL -f TEXTFILE [options]\n"
                "Cuts the text's tokens into chunks of --ctx tokens, runs each chunk from an empty cache and scores the\n"
                "second half of each chunk (every scored token sees at least ctx/2 tokens of context). Prints the\n"
                "perplexity with its standard error. With --compare, also each config's KL divergence from the F16\n"
                "cache's next-token distribution on the same tokens (as llama.cpp's --kl-divergence): its mean (nats),\n"
                "99th percentile over tokens, and top-1 agreement (%% of tokens whose most likely next token is F16's).\n"
                "The base is the first f16 entry; a list without one runs f16 first anyway (said on stderr). All configs\n"
                "run side by side batch by batch (one context each), so the base's logits are never stored.\n\n"
                "  -m, --model FILE        GGUF model\n"
                "  -f, --file FILE         UTF-8 text\n"
                "  -c, --ctx-size N        tokens per chunk (default %d, at most the model's context_length)\n"
                "  --chunks N              use the first N chunks only (default: all)\n"
                "  --compare LIST          comma-separated KV configs run on the same tokens, one table (at most %d);\n"
                "                          an entry is a type (q4) or K/V mix (q8/q4 = keys q8, values q4), optionally\n"
                "                          with suffixes, each at most once: :rR (residual window), :gG (group size),\n"
                "                          :rot=none|k|v|kv, :sinks=N, :nuq=none|k|v|kv, :qnorm=none|k|v|kv,\n"
                "                          :outl=none|k|v|kv, :p8=none|k|v|kv, :w8=none|k|v|kv, :seed=N, :pre=0|1,\n"
                "                          :squat=R,\n"
                "                          :lambda=auto|X (kvq.h section 10; unset: the --kv-* options), :local=T[/T]\n"
                "                          (sliding-window layers' types, as --kv-type-local), :layers=SPEC (as\n"
                "                          --kv-layers); or plan=FILE (a kvq-plan file, as --kv-plan), e.g.\n"
                "                          f16,q8,q4,q4:r64,q4:rot=kv:sinks=4,q3:outl=k,q3:p8=kv,q8:local=q4\n"
                "  --csv FILE              one row per config: kv,type_k,type_v,ctx,chunks,tokens,ppl,ppl_se,dppl_pct,\n"
                "                          kld_mean,kld_p99,top1_pct,bytes_per_token,f16_bytes_per_token,\n"
                "                          bits_per_element,batch,decode_attn,prefill_exact (bytes_per_token: K+V pages in use, scales\n"
                "                          included, + the fp16 windows and sinks, after a full chunk, / ctx;\n"
                "                          bits_per_element = 8 x that / (2 x layers x KV heads x head_dim); without\n"
                "                          --compare the dppl/kld/top1 cells are empty)\n"
                "  --decode-attn           attend token by token, as generation does: each token's query right after its\n"
                "                          own token is appended (the weight products still go by -b batches). Without it\n"
                "                          a batch attends as a prefill, after all its tokens are appended: with q4/q3/q2\n"
                "                          the batch's early tokens are then flushed from the fp16 window into pages before\n"
                "                          its early queries read them, so the figures depend on -b and overstate the error\n"
                "                          that decode sees (per-token types and f16 do not change). Slower: every token\n"
                "                          reads the whole cache\n"
                "  -q, --quiet             no progress bar\n",
                d.ctx, KVQ_CLI_MAX_COMPARE);
        kv_help(f, cmd);
        file_help(f);
        break;
    case KVQ_CLI_CAP:
        fprintf(f,
                "usage: kvq capacity -m MODEL (--mem SIZE | --ctx N) [--parallel N] [options]\n"
                "For each KV type: with --mem, the most tokens per sequence that fit in SIZE; with --ctx, the memory N\n"
                "tokens per sequence need. Memory = the weights as the engine holds them (quantized, as in the GGUF) + buffers +\n"
                "KV pages (as libkvq sizes its arena) + fp16 residual windows at their largest (R+G tokens per layer).\n"
                "Warns past the model's trained context. A budget that holds no token is an error.\n\n"
                "  -m, --model FILE        GGUF model (its metadata is read; the weights are not loaded)\n"
                "  --mem SIZE              memory budget: 4GiB, 512MiB, 2G, 1.5GB, 1000000 (bytes)\n"
                "  -c, --ctx-size N        tokens per sequence\n"
                "  --parallel N, -np N     sequences at once, each with its own pages and windows (default %d)\n"
                "  --compare LIST          the KV configs to list, in perplexity --compare's grammar (e.g.\n"
                "                          f16,q8/q4,q4:r64,q3:sinks=4,q8:local=q4); default\n"
                "                          f16,bf16,fp8,q8,q8/q4,q4,q3,q4/q2,q2. \"vs f16\" is against an f16 cache with\n"
                "                          the same options\n",
                d.parallel);
        kv_help(f, cmd);
        break;
    case KVQ_CLI_PASSKEY:
        fprintf(f,
                "usage: kvq passkey -m MODEL [--lengths L,...] [--depths D,...] [--trials N] [--compare LIST] [options]\n"
                "The pass-key retrieval test of Landmark Attention / LongLoRA: a random 5-digit key (from --seed) is hidden\n"
                "at a depth of the filler text (\"The grass is green. The sky is blue. The sun is yellow. Here we go. There\n"
                "and back again.\" repeated) of a prompt of L tokens, followed by the question; -n tokens are decoded\n"
                "greedily and a trial passes when the key's digits are in the answer. Every KV config gets the same\n"
                "prompts and keys. Prints a depth x length grid of passed/trials per config (and the seconds per cell).\n\n"
                "  -m, --model FILE        GGUF model\n"
                "  --lengths LIST          context lengths in tokens, prompt and answer (default %d,%d,%d,%d; at most\n"
                "                          the model's context_length)\n"
                "  --depths LIST           where the key sits, in %% of the filler: 0 = first, 100 = last (default\n"
                "                          %d,%d,%d,%d,%d)\n"
                "  --trials N              keys per cell (default %d)\n"
                "  -n, --n-predict N       answer tokens decoded (default %d)\n"
                "  -s, --seed S            seed of the keys (default %llu)\n"
                "  --chat                  ask in the model's chat template (ChatML) instead of as plain text\n"
                "  --system TEXT           system prompt for --chat (default: the model's)\n"
                "  --compare LIST          KV configs as in perplexity --compare; f16 runs first (added if missing): a\n"
                "                          cell that f16 fails is beyond the model, and says nothing about quantization\n"
                "  --csv FILE              one row per config and cell: kv,length,depth_pct,trials,passed\n"
                "  -q, --quiet             no progress lines\n",
                d.lengths[0], d.lengths[1], d.lengths[2], d.lengths[3], d.depths[0], d.depths[1], d.depths[2], d.depths[3],
                d.depths[4], d.trials, d.n_predict, (unsigned long long)d.seed);
        kv_help(f, cmd);
        break;
    case KVQ_CLI_TOK:
        fprintf(f,
                "usage: kvq tokenize -m MODEL (-p TEXT | -f FILE) [--ids]\n"
                "Prints the token count and an FNV-1a checksum of the ids (little-endian int32), or the ids with --ids.\n\n"
                "  --ids                   print the ids\n"
                "  --chat                  apply the chat template to the text first\n"
                "  --system TEXT           system prompt for --chat (default: the model's)\n");
        file_help(f);
        break;
    }
}
