/* Unit test of the kvq command's option parser, samplers, help texts and file reader (kvq_cli_core), without a model.
 *   test_cli_parse                      run the checks
 *   test_cli_parse --print-lib-defaults print the library's defaults, found through libkvq's public API alone
 *                                       (tests/test_cli.sh compares them with what `kvq run --help` prints) */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"

static int g_fail, g_pass;

#define EXPECT(c, ...)                                                                                            \
    do {                                                                                                          \
        if (c) g_pass++;                                                                                          \
        else {                                                                                                    \
            g_fail++;                                                                                             \
            printf("FAIL line %d: %s: ", __LINE__, #c);                                                          \
            printf(__VA_ARGS__);                                                                                  \
            printf("\n");                                                                                         \
        }                                                                                                         \
    } while (0)

/* Splits "a|b|c" into argv (an empty field is an empty argument). */
static int split(const char *s, char *buf, size_t n, char **argv) {
    snprintf(buf, n, "%s", s);
    int argc = 0;
    if (!*buf) return 0;
    for (char *p = buf;;) {
        argv[argc++] = p;
        char *bar = strchr(p, '|');
        if (!bar) break;
        *bar = '\0';
        p = bar + 1;
    }
    return argc;
}

static int parse(int cmd, const char *args, kvq_cli_opts *o, char *err) {
    static char buf[4096];
    char *argv[128];
    int argc = split(args, buf, sizeof buf, argv);
    return kvq_cli_parse(cmd, argc, argv, o, err, KVQ_CLI_ERR_LEN);
}

/* A rejected argv: rc -1 and a message containing `want`. */
static void rejects(int cmd, const char *args, const char *want) {
    kvq_cli_opts o;
    char err[KVQ_CLI_ERR_LEN] = "";
    int r = parse(cmd, args, &o, err);
    EXPECT(r == -1 && strstr(err, want), "kvq %s %s -> rc %d, message '%s' (wanted one with '%s')", kvq_cli_cmd_name(cmd),
           args, r, err, want);
}

static kvq_cli_opts accepts(int cmd, const char *args) {
    kvq_cli_opts o;
    char err[KVQ_CLI_ERR_LEN] = "";
    int r = parse(cmd, args, &o, err);
    EXPECT(r == 0, "kvq %s %s -> rc %d: %s", kvq_cli_cmd_name(cmd), args, r, err);
    return o;
}

/* The library's defaults, through the public API only (not kvq_cli_lib_defaults): a q4 and an f16 cache, read back. */
static void lib_defaults(int *res_q4, int *res_f16, int *group) {
    for (int pass = 0; pass < 2; pass++) {
        kvq_cache_config cc = kvq_cache_config_default();
        cc.n_layers = 2;
        cc.n_kv_heads = 2;
        cc.head_dim = 128;
        if (pass == 0) cc.type_k = cc.type_v = KVQ_TYPE_Q4;
        cc.arena_bytes = (size_t)8 << 20;
        kvq_cache *c = NULL;
        kvq_cache_config got;
        kvq_page_layout lay;
        if (kvq_cache_create(&cc, &c) || kvq_cache_get_config(c, &got, &lay)) {
            fprintf(stderr, "cannot create a cache: %s\n", kvq_last_error());
            exit(1);
        }
        if (pass == 0) *res_q4 = got.residual, *group = got.group;
        else *res_f16 = got.residual;
        kvq_cache_free(c);
    }
}

static char *help_text(int cmd) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    kvq_cli_usage(cmd, f);
    fclose(f);
    return text;
}

static void test_help_defaults(void) {
    int rq4, rf16, g;
    lib_defaults(&rq4, &rf16, &g);
    char want[160];
    for (int cmd = 0; cmd < KVQ_CLI_NCMD; cmd++) {
        char *h = help_text(cmd);
        kvq_cli_opts d;
        kvq_cli_defaults(cmd, &d);
        if (cmd != KVQ_CLI_TOK) {
            snprintf(want, sizeof want, "%d for q4/q3/q2, %d for the per-token types", rq4, rf16);
            EXPECT(strstr(h, want), "kvq %s --help lacks the library's residual defaults '%s'", kvq_cli_cmd_name(cmd), want);
            snprintf(want, sizeof want, "(default: libkvq's, %d)", g);
            EXPECT(strstr(h, want), "kvq %s --help lacks the library's group '%s'", kvq_cli_cmd_name(cmd), want);
            snprintf(want, sizeof want, "prefill (default %d)", d.batch);
            EXPECT(strstr(h, want), "kvq %s --help: batch default '%s'", kvq_cli_cmd_name(cmd), want);
        }
        if (cmd == KVQ_CLI_RUN) {
            snprintf(want, sizeof want, "at most (default %d)", d.n_predict);
            EXPECT(strstr(h, want), "run help: '%s'", want);
            snprintf(want, sizeof want, "greedy (default %g)", (double)d.temp);
            EXPECT(strstr(h, want), "run help: '%s'", want);
            snprintf(want, sizeof want, "(default %llu)", (unsigned long long)d.seed);
            EXPECT(strstr(h, want), "run help: '%s'", want);
            snprintf(want, sizeof want, "1 = off (default %g)", (double)d.top_p);
            EXPECT(strstr(h, want), "run help: '%s'", want);
        }
        if (cmd == KVQ_CLI_PPL) {
            snprintf(want, sizeof want, "tokens per chunk (default %d", d.ctx);
            EXPECT(strstr(h, want), "perplexity help: '%s'", want);
        }
        if (cmd != KVQ_CLI_CAP && cmd != KVQ_CLI_PASSKEY)
            EXPECT(strstr(h, "(default 64.00 MiB;"), "kvq %s --help: file limit", kvq_cli_cmd_name(cmd));
        if (cmd == KVQ_CLI_PASSKEY) {
            snprintf(want, sizeof want, "(default %d,%d,%d,%d;", d.lengths[0], d.lengths[1], d.lengths[2], d.lengths[3]);
            EXPECT(strstr(h, want) && d.n_lengths == 4 && d.lengths[3] == 8192, "passkey help: '%s'", want);
            snprintf(want, sizeof want, "keys per cell (default %d)", d.trials);
            EXPECT(strstr(h, want), "passkey help: '%s'", want);
            snprintf(want, sizeof want, "answer tokens decoded (default %d)", d.n_predict);
            EXPECT(strstr(h, want) && d.n_predict == 8, "passkey help: '%s'", want);
            EXPECT(strstr(h, "--kv-rotate R") && strstr(h, "kvq.h section 10"), "passkey help: the section 10 options");
        }
        free(h);
    }
    /* The file limit the help states is the one the parser sets. */
    kvq_cli_opts d;
    kvq_cli_defaults(KVQ_CLI_RUN, &d);
    EXPECT(d.max_file == (size_t)64 << 20, "max_file %zu", d.max_file);
}

static void test_rejections(void) {
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--bogus", "unknown option '--bogus'");
    rejects(KVQ_CLI_CAP, "-m|m|--mem|1G|--kv-type|q4", "'--kv-type' is not used by 'kvq capacity'");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--mem|1G", "'--mem' is not used by 'kvq run'");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--chunks|2", "'--chunks' is not used by 'kvq run'");
    rejects(KVQ_CLI_TOK, "-m|m|-p|x|--kv-type|q4", "not used by 'kvq tokenize'");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--temp|0", "'--temp' is not used by 'kvq perplexity'");
    rejects(KVQ_CLI_RUN, "-m|m|-p", "option '-p' needs a value");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|-n", "option '-n' needs a value");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--seed|abc", "--seed: 'abc' is not an integer");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|-s|12x", "-s: '12x' is not an integer");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--seed|-1", "--seed: '-1'");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--seed|18446744073709551616", "--seed");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--seed| 5", "--seed");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--seed|", "--seed");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|-n|99999999999999999999", "-n");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|-n|-5", "-n: '-5'");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|-n|+5", "-n: '+5'");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|-t|0", "-t: '0' is not an integer in 1..1024");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|-t|1025", "-t");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|-c|4194305", "-c: '4194305'");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--temp|nan", "--temp: 'nan' is not a decimal number");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--temp|inf", "--temp");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--temp|0x1p3", "--temp");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--temp|-1", "--temp: -1 is outside");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--top-p|1.5", "--top-p");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--min-p|2", "--min-p");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--repeat-penalty|0", "--repeat-penalty: 0 must be > 0");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--top-k|-1", "--top-k");
    rejects(KVQ_CLI_CAP, "-m|m|--mem|inf", "--mem: 'inf' is not a size");
    rejects(KVQ_CLI_CAP, "-m|m|--mem|1e30", "--mem: '1e30'");
    rejects(KVQ_CLI_CAP, "-m|m|--mem|nan", "--mem");
    rejects(KVQ_CLI_CAP, "-m|m|--mem|-1G", "--mem");
    rejects(KVQ_CLI_CAP, "-m|m|--mem|0", "less than one byte");
    rejects(KVQ_CLI_CAP, "-m|m|--mem|2000000TiB", "more than 2^60 bytes");
    rejects(KVQ_CLI_CAP, "-m|m|--mem|4QB", "unknown unit 'QB'");
    rejects(KVQ_CLI_CAP, "-m|m", "exactly one of --mem SIZE");
    rejects(KVQ_CLI_CAP, "-m|m|--mem|1G|--ctx|100", "exactly one of --mem SIZE");
    rejects(KVQ_CLI_CAP, "-m|m|--mem|1G|--parallel|0", "--parallel");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--compare|", "--compare: the list is empty");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--compare|q4,,q8", "entry 2 of 'q4,,q8' is empty");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--compare|q4,", "is empty");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16",
            "--compare: 17 entries, at most 16");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:x", "':x' is not a suffix (:rRESIDUAL");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:r1:r2", "gives :rR more than once");
    /* kvq.h section 10 suffixes: values, duplicates, names that are near misses */
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:rot=kv:rot=k", "gives :rot= more than once");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:sinks=4:r64:sinks=4", "gives :sinks= more than once");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:nuq=k:nuq=v", "gives :nuq= more than once");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:seed=1:seed=1", "gives :seed= more than once");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:rot=kq", "rotation (:rot=): 'kq' is not one of none, k, v, kv");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:rot=default", "'default' is not one of none, k, v, kv");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:rot=", "rotation (:rot=): '' is not");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:rot", "':rot' is not a suffix");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:nuq=KV", "non-uniform levels (:nuq=): 'KV'");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:sinks=1025", "sinks (:sinks=): '1025' is not an integer in 0..1024");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:sinks=-1", "sinks (:sinks=): '-1'");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:sinks=4x", "sinks (:sinks=): '4x'");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:seed=4294967296", "rotation seed (:seed=): '4294967296' is not an integer in 0..4294967295");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:seed=-1", "rotation seed (:seed=)");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:Rot=kv", "':Rot=kv' is not a suffix");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:r64:rot=kv:x", "':x' is not a suffix");
    /* the local (sliding-window) layers' types */
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q8:local=q5", "local layers' types (:local=)");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q8:local=q4:local=q2", "gives :local= more than once");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--kv-type-local|q4/", "--kv-type-local");
    rejects(KVQ_CLI_CAP, "-m|m|--mem|1G|--kv-type-local|q4/", "--kv-type-local");
    /* per-layer types */
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-layers|0-1", "--kv-layers: '0-1' is not A[-B]@TYPE[/TYPE]");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-layers|3-1@q8", "--kv-layers: layers 3-1: the range ends before it starts");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-layers|0-3@q8+3@q4", "--kv-layers: layers 3-3 overlap 0-3");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-layers|0@q5", "--kv-layers");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-layers|x@q8", "--kv-layers: 'x'");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-layers|0@q8+", "--kv-layers: '' is not A[-B]@TYPE[/TYPE]");
    {   /* 65 one-layer ranges: one more than LLAMA_MAX_LAYER_TYPES */
        char a[512];
        int k = snprintf(a, sizeof a, "-m|m|-f|t|--kv-layers|0");
        for (int i = 1; i <= LLAMA_MAX_LAYER_TYPES; i++) k += snprintf(a + k, sizeof a - (size_t)k, ".%d", 2 * i);
        snprintf(a + k, sizeof a - (size_t)k, "@q8");
        rejects(KVQ_CLI_PPL, a, "more than 64 ranges");
    }
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-layers|0.@q8", "--kv-layers: ''");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-layers|0-2.1@q8", "--kv-layers: layers 1-1 overlap 0-2");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q2:layers=0@q8:layers=1@q8", "gives :layers= more than once");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q2:layers=0@", "per-layer types (:layers=)");
    rejects(KVQ_CLI_TOK, "-m|m|-p|x|--kv-layers|0@q8", "--kv-layers");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-rotate|all", "--kv-rotate: 'all' is not one of none, k, v, kv, default");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-rotate|", "--kv-rotate: '' is not one of");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--kv-nuq|-1", "--kv-nuq: '-1' is not one of none, k, v, kv, default");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--kv-qnorm|all", "--kv-qnorm: 'all' is not one of none, k, v, kv, default");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-outliers|2", "--kv-outliers: '2' is not one of none, k, v, kv, default");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:outl=k:outl=v", "gives :outl= more than once");
    rejects(KVQ_CLI_TOK, "-m|m|-p|x|--kv-outliers|kv", "option '--kv-outliers' is not used by 'kvq tokenize'");
    {
        kvq_cli_opts oo = accepts(KVQ_CLI_PPL, "-m|m|-f|t|--kv-outliers|v|--compare|q4,q2:outl=kv,q3:outl=none");
        EXPECT(oo.outliers == KVQ_ROLES_V && oo.compare[0].outliers == KVQ_ROLES_V &&
                   oo.compare[1].outliers == KVQ_ROLES_KV && oo.compare[2].outliers == KVQ_ROLES_NONE,
               "--kv-outliers / :outl=: %d %d %d %d", oo.outliers, oo.compare[0].outliers, oo.compare[1].outliers,
               oo.compare[2].outliers);
        oo = accepts(KVQ_CLI_PPL, "-m|m|-f|t|--decode-attn");
        EXPECT(oo.decode_attn == 1 && oo.outliers == -1, "--decode-attn %d, outliers default %d", oo.decode_attn,
               oo.outliers);
        oo = accepts(KVQ_CLI_PPL, "-m|m|-f|t");
        EXPECT(oo.decode_attn == 0, "--decode-attn defaults to off (%d)", oo.decode_attn);
        /* --prefill-attn: perplexity reads back what the cache stores unless asked; run and passkey take the engine's
         * default (exact on the CPU) */
        EXPECT(oo.prefill_attn == 0, "perplexity's --prefill-attn defaults to cache (%d)", oo.prefill_attn);
        oo = accepts(KVQ_CLI_PPL, "-m|m|-f|t|--prefill-attn|exact");
        EXPECT(oo.prefill_attn == 1, "--prefill-attn exact: %d", oo.prefill_attn);
        oo = accepts(KVQ_CLI_RUN, "-m|m|-p|x");
        EXPECT(oo.prefill_attn == -1, "run's --prefill-attn defaults to the engine's (%d)", oo.prefill_attn);
        oo = accepts(KVQ_CLI_PASSKEY, "-m|m|--prefill-attn|cache");
        EXPECT(oo.prefill_attn == 0, "--prefill-attn cache: %d", oo.prefill_attn);
    }
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--prefill-attn|fast", "--prefill-attn: 'fast' is not exact or cache");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--prefill-attn", "--prefill-attn");
    rejects(KVQ_CLI_CAP, "-m|m|--ctx|8|--prefill-attn|exact", "option '--prefill-attn' is not used by 'kvq capacity'");
    /* 8-bit group parameters and 8-bit windows: role sets, per entry too, each suffix once */
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-window8|3", "--kv-window8: '3' is not one of none, k, v, kv, default");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:w8=k:w8=v", "gives :w8= more than once");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:w8=all", "8-bit windows (:w8=)");
    rejects(KVQ_CLI_TOK, "-m|m|-p|x|--kv-window8|kv", "option '--kv-window8' is not used by 'kvq tokenize'");
    {
        kvq_cli_opts oo = accepts(KVQ_CLI_PPL, "-m|m|-f|t|--kv-window8|k|--kv-params8|v|--compare|q4,q2:w8=kv:p8=k,q3:w8=none");
        EXPECT(oo.window8 == KVQ_ROLES_K && oo.compare[0].window8 == KVQ_ROLES_K && oo.compare[1].window8 == KVQ_ROLES_KV &&
                   oo.compare[2].window8 == KVQ_ROLES_NONE && oo.params8 == KVQ_ROLES_V &&
                   oo.compare[1].params8 == KVQ_ROLES_K && oo.compare[2].params8 == KVQ_ROLES_V,
               "--kv-window8 / :w8= %d %d %d %d, --kv-params8 / :p8= %d %d %d", oo.window8, oo.compare[0].window8,
               oo.compare[1].window8, oo.compare[2].window8, oo.params8, oo.compare[1].params8, oo.compare[2].params8);
        oo = accepts(KVQ_CLI_RUN, "-m|m|-p|x");
        EXPECT(oo.window8 == -1 && oo.params8 == -1, "window8 / params8 default %d %d", oo.window8, oo.params8);
    }
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--decode-attn", "option '--decode-attn' is not used by 'kvq run'");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:qnorm=k:qnorm=v", "gives :qnorm= more than once");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:qnorm=default", "Q-Norm (:qnorm=): 'default'");
    {
        kvq_cli_opts of = accepts(KVQ_CLI_PPL, "-m|m|-f|t|--kv-qnorm|v|--compare|q4,q2:qnorm=kv,q3:qnorm=none");
        EXPECT(of.qnorm == KVQ_ROLES_V && of.compare[0].qnorm == KVQ_ROLES_V && of.compare[1].qnorm == KVQ_ROLES_KV &&
               of.compare[2].qnorm == KVQ_ROLES_NONE, "--kv-qnorm / :qnorm=: %d %d %d %d", of.qnorm, of.compare[0].qnorm,
               of.compare[1].qnorm, of.compare[2].qnorm);
        of = accepts(KVQ_CLI_PPL, "-m|m|-f|t");
        EXPECT(of.qnorm == -1, "--kv-qnorm defaults to the engine's (-1), got %d", of.qnorm);
    }
    rejects(KVQ_CLI_CAP, "-m|m|--ctx|9|--kv-sinks|1025", "--kv-sinks: '1025' is not 0..1024 or default");
    rejects(KVQ_CLI_CAP, "-m|m|--ctx|9|--kv-sinks|-1", "--kv-sinks: '-1' is not 0..1024 or default");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--rotation-seed|4294967296", "--rotation-seed: '4294967296' is not an integer in 0..4294967295");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--rotation-seed|-3", "--rotation-seed");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--kv-sinks", "option '--kv-sinks' needs a value");
    rejects(KVQ_CLI_TOK, "-m|m|-p|x|--kv-rotate|kv", "option '--kv-rotate' is not used by 'kvq tokenize'");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--csv|", "--csv: the file name is empty");
    /* passkey */
    rejects(KVQ_CLI_PASSKEY, "-m|m|--lengths|", "--lengths: the list is empty");
    rejects(KVQ_CLI_PASSKEY, "-m|m|--lengths|1024,,2048", "--lengths: entry 2 of '1024,,2048' is empty");
    rejects(KVQ_CLI_PASSKEY, "-m|m|--lengths|1024,", "--lengths: entry 2 of '1024,' is empty");
    rejects(KVQ_CLI_PASSKEY, "-m|m|--lengths|63", "--lengths: '63' is not an integer in 64..4194304");
    rejects(KVQ_CLI_PASSKEY, "-m|m|--lengths|1k", "--lengths: '1k' is not an integer");
    rejects(KVQ_CLI_PASSKEY, "-m|m|--lengths|1024,2048,1024", "--lengths: 1024 is listed twice");
    rejects(KVQ_CLI_PASSKEY, "-m|m|--lengths|64,65,66,67,68,69,70,71,72,73,74,75,76,77,78,79,80", "--lengths: more than 16 entries");
    rejects(KVQ_CLI_PASSKEY, "-m|m|--lengths|100|-n|100", "--lengths: 100 leaves no room for a prompt before -n 100");
    rejects(KVQ_CLI_PASSKEY, "-m|m|--depths|101", "--depths: '101' is not an integer in 0..100");
    rejects(KVQ_CLI_PASSKEY, "-m|m|--depths|-5", "--depths: '-5'");
    rejects(KVQ_CLI_PASSKEY, "-m|m|--depths|50,50", "--depths: 50 is listed twice");
    rejects(KVQ_CLI_PASSKEY, "-m|m|--depths|1111111111111111111111111111111111", "--depths: '1111111111111111111111111111111111' is not");
    rejects(KVQ_CLI_PASSKEY, "-m|m|--trials|0", "--trials: '0' is not an integer in 1..10000");
    rejects(KVQ_CLI_PASSKEY, "-m|m|-n|0", "-n: '0' is not an integer in 1..");
    rejects(KVQ_CLI_PASSKEY, "-m|m|--compare|q4:rot=x", "rotation (:rot=): 'x'");
    rejects(KVQ_CLI_PASSKEY, "-m|m|-p|x", "option '-p' is not used by 'kvq passkey'");
    rejects(KVQ_CLI_PASSKEY, "--lengths|256", "-m MODEL is required");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--trials|3", "option '--trials' is not used by 'kvq run' (it is an option of: passkey)");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--csv", "option '--csv' needs a value");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--csv|a.csv", "option '--csv' is not used by 'kvq run'");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:r-1", "residual");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:g8", "group");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4/zz", "unknown KV type 'zz'");
    {   /* an entry one character longer than KVQ_CLI_MIX_NAME - 1 */
        char a[KVQ_CLI_MIX_NAME + 64], want[64];
        int k = snprintf(a, sizeof a, "-m|m|-f|t|--compare|q4:r");
        for (int i = 0; i < KVQ_CLI_MIX_NAME - 4; i++) a[k++] = '1';
        a[k] = '\0';
        snprintf(want, sizeof want, "longer than %d", KVQ_CLI_MIX_NAME - 1);
        rejects(KVQ_CLI_PPL, a, want);
    }
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q5", "unknown KV type 'q5'");
    {   /* q3 parses through kvq_type_from_name (llama.cpp has no alias for it) */
        kvq_cli_opts o3;
        char e3[KVQ_CLI_ERR_LEN];
        int r3 = parse(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q3,q4/q3", &o3, e3);
        EXPECT(r3 == 0 && o3.n_compare == 2 && o3.compare[0].type_k == KVQ_TYPE_Q3 && o3.compare[0].type_v == KVQ_TYPE_Q3 &&
                   o3.compare[1].type_k == KVQ_TYPE_Q4 && o3.compare[1].type_v == KVQ_TYPE_Q3,
               "--compare q3,q4/q3: rc %d '%s'", r3, e3);
    }
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--kv-type|q4|--compare|f16,q8", "--compare lists the KV types itself");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|-ctk|q4_0", "llama.cpp's type 'q4_0' has no kvq equivalent");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--cache-type-v|f32", "'f32' has no kvq equivalent");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--kv-type|q5", "unknown KV type 'q5'");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|-f|y", "exactly one of -p TEXT or -f FILE");
    rejects(KVQ_CLI_RUN, "-m|m", "exactly one of -p TEXT or -f FILE");
    rejects(KVQ_CLI_RUN, "-p|x", "-m MODEL is required");
    rejects(KVQ_CLI_PPL, "-m|m", "-f TEXTFILE is required");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|-c|1", "-c: '1' is not an integer in 2..");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--max-file-size|0", "--max-file-size");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--residual|4097", "--residual");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--group|8", "--group");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|-b|0", "-b");
    rejects(KVQ_CLI_RUN, "-m|m|-p|x|--repeat-last-n|-2", "--repeat-last-n");
}

static void test_aliases(void) {
    kvq_cli_opts o = accepts(KVQ_CLI_RUN, "-m|m|-f|p.txt|-c|4096|-ctk|q8_0|-ctv|q4_1|-b|64|-s|7|-t|2|--top-k|40|--min-p|0.05|"
                                          "--repeat-penalty|1.1|--repeat-last-n|32|--top-p|0.95|-n|9|--temp|0.5");
    EXPECT(o.ctx == 4096 && o.type_k == KVQ_TYPE_Q8 && o.type_v == KVQ_TYPE_Q4 && o.batch == 64 && o.seed == 7 &&
               o.threads == 2 && o.top_k == 40 && fabsf(o.min_p - 0.05f) < 1e-7f && fabsf(o.repeat_penalty - 1.1f) < 1e-6f &&
               o.repeat_last_n == 32 && fabsf(o.top_p - 0.95f) < 1e-7f && o.n_predict == 9 && o.temp == 0.5f &&
               strcmp(o.file, "p.txt") == 0,
           "short llama.cpp spellings");
    o = accepts(KVQ_CLI_RUN, "--model|m|--file|p|--ctx-size|100|--cache-type-k|f16|--cache-type-v|bf16|--batch-size|8|"
                             "--seed|18446744073709551615|--threads|1|--system-prompt|S|--chat");
    EXPECT(o.ctx == 100 && o.type_k == KVQ_TYPE_F16 && o.type_v == KVQ_TYPE_BF16 && o.batch == 8 && o.seed == UINT64_MAX &&
               o.threads == 1 && strcmp(o.system, "S") == 0 && o.chat,
           "long llama.cpp spellings");
    o = accepts(KVQ_CLI_RUN, "-m|m|-p|x|--kv-type-k|Q4|--kv-type-v|fp8");
    EXPECT(o.type_k == KVQ_TYPE_Q4 && o.type_v == KVQ_TYPE_FP8, "kvq spellings");
    o = accepts(KVQ_CLI_RUN, "-m|m|-p|x");
    EXPECT(!o.local_types, "local layers' types default to the global ones");
    o = accepts(KVQ_CLI_PPL, "-m|m|-f|t|--kv-type-local|q8/q4|--compare|f16,q8:local=q2,q4");
    EXPECT(o.local_types && o.type_k_local == KVQ_TYPE_Q8 && o.type_v_local == KVQ_TYPE_Q4 && o.n_compare == 3 &&
               o.compare[0].local_types && o.compare[0].type_k_local == KVQ_TYPE_Q8 &&
               o.compare[0].type_v_local == KVQ_TYPE_Q4 && o.compare[1].type_k_local == KVQ_TYPE_Q2 &&
               o.compare[1].type_v_local == KVQ_TYPE_Q2 && o.compare[2].type_k_local == KVQ_TYPE_Q8 &&
               strcmp(o.compare[1].name, "q8:local=q2") == 0,
           "--kv-type-local and :local= (entries inherit the global option, :local= overrides it)");
    o = accepts(KVQ_CLI_PPL, "-m|m|-f|t|--kv-layers|0-1@q8+29@q4/q8|--compare|q2,q2:layers=3@f16,q4");
    EXPECT(o.n_layer_types == 2 && o.layer_types[0].first == 0 && o.layer_types[0].last == 1 &&
               o.layer_types[0].type_k == KVQ_TYPE_Q8 && o.layer_types[0].type_v == KVQ_TYPE_Q8 &&
               o.layer_types[1].first == 29 && o.layer_types[1].last == 29 && o.layer_types[1].type_k == KVQ_TYPE_Q4 &&
               o.layer_types[1].type_v == KVQ_TYPE_Q8 && o.n_compare == 3 && o.compare[0].n_layer_types == 2 &&
               o.compare[0].layer_types[1].type_v == KVQ_TYPE_Q8 && o.compare[1].n_layer_types == 1 &&
               o.compare[1].layer_types[0].first == 3 && o.compare[1].layer_types[0].type_k == KVQ_TYPE_F16 &&
               strcmp(o.compare[1].name, "q2:layers=3@f16") == 0 && o.compare[2].n_layer_types == 2,
           "--kv-layers and :layers= (entries inherit the global option, :layers= replaces it)");
    o = accepts(KVQ_CLI_PPL, "-m|m|-f|t|--kv-layers|1.3-4.9@q4+7@q8");
    EXPECT(o.n_layer_types == 4 && o.layer_types[0].first == 1 && o.layer_types[0].last == 1 &&
               o.layer_types[1].first == 3 && o.layer_types[1].last == 4 && o.layer_types[2].first == 9 &&
               o.layer_types[2].type_k == KVQ_TYPE_Q4 && o.layer_types[3].first == 7 && o.layer_types[3].type_v == KVQ_TYPE_Q8,
           "--kv-layers: a clause's '.'-joined layers and ranges");
    o = accepts(KVQ_CLI_RUN, "-m|m|-p|x|--kv-type|q2|--kv-layers|0@q8");
    {
        kvq_cli_mix m = kvq_cli_single_mix(&o);
        EXPECT(m.n_layer_types == 1 && strcmp(m.name, "q2:layers=0@q8") == 0, "--kv-layers names the single mix: '%s'",
               m.name);
    }
    o = accepts(KVQ_CLI_PPL, "-m|m|-f|t|--compare|f16,q8/q4,q4:r64:g32,Q2|--residual|32|--group|128");
    EXPECT(o.n_compare == 4 && o.compare[1].type_k == KVQ_TYPE_Q8 && o.compare[1].type_v == KVQ_TYPE_Q4 &&
               o.compare[2].residual == 64 && o.compare[2].group == 32 && o.compare[3].residual == 32 &&
               o.compare[3].group == 128 && strcmp(o.compare[2].name, "q4:r64:g32") == 0,
           "--compare entries (and --residual/--group after the list apply to its entries)");
    /* section 10: defaults -1 (the library's), 0 = off; entries inherit the global options, suffixes override them */
    o = accepts(KVQ_CLI_PPL, "-m|m|-f|t");
    EXPECT(o.rotate == -1 && o.sinks == -1 && o.nonuniform == -1 && o.rotation_seed == 0 && !o.csv, "section 10 defaults");
    o = accepts(KVQ_CLI_PASSKEY, "-m|m|--lengths|512,256|--depths|100,0,33|--trials|3|--chat|--compare|f16,q4:sinks=0|"
                                 "--kv-rotate|none|--csv|p.csv|-n|6|-s|9|-t|2|-b|64|-q");
    EXPECT(o.n_lengths == 2 && o.lengths[0] == 512 && o.lengths[1] == 256 && o.n_depths == 3 && o.depths[0] == 100 &&
               o.depths[2] == 33 && o.trials == 3 && o.chat && o.n_compare == 2 && o.compare[1].sinks == 0 &&
               o.compare[1].rotate == 0 && o.rotate == 0 && strcmp(o.csv, "p.csv") == 0 && o.n_predict == 6 && o.seed == 9 &&
               o.batch == 64 && o.quiet,
           "passkey options");
    o = accepts(KVQ_CLI_PASSKEY, "-m|m");
    EXPECT(o.n_lengths == 4 && o.n_depths == 5 && o.depths[4] == 100 && o.trials == 1 && o.n_predict == 8, "passkey defaults");
    EXPECT(kvq_cli_cmd_from_name("passkey") == KVQ_CLI_PASSKEY && strcmp(kvq_cli_cmd_name(KVQ_CLI_PASSKEY), "passkey") == 0,
           "passkey name");
    o = accepts(KVQ_CLI_PPL, "-m|m|-f|t|--csv|out.csv");
    EXPECT(o.csv && strcmp(o.csv, "out.csv") == 0, "--csv");
    o = accepts(KVQ_CLI_PPL, "-m|m|-f|t|--compare|q4:seed=4294967295:nuq=v:sinks=1024:rot=k:g32:r0,q2/q4:rot=none:sinks=0:nuq=kv,"
                             "q8|--kv-rotate|kv|--kv-sinks|4|--kv-nuq|k|--rotation-seed|77");
    EXPECT(o.n_compare == 3 && o.compare[0].rotate == KVQ_ROLES_K && o.compare[0].sinks == 1024 &&
               o.compare[0].nonuniform == KVQ_ROLES_V && o.compare[0].rotation_seed == 4294967295u &&
               o.compare[0].group == 32 && o.compare[0].residual == 0 &&
               strcmp(o.compare[0].name, "q4:seed=4294967295:nuq=v:sinks=1024:rot=k:g32:r0") == 0,
           "suffixes in any order: %d %d %d %u", o.compare[0].rotate, o.compare[0].sinks, o.compare[0].nonuniform,
           o.compare[0].rotation_seed);
    EXPECT(o.compare[1].rotate == 0 && o.compare[1].sinks == 0 && o.compare[1].nonuniform == KVQ_ROLES_KV &&
               o.compare[1].rotation_seed == 77 && o.compare[1].type_k == KVQ_TYPE_Q2 && o.compare[1].type_v == KVQ_TYPE_Q4,
           "q2/q4:rot=none:sinks=0:nuq=kv (seed inherited)");
    EXPECT(o.compare[2].rotate == KVQ_ROLES_KV && o.compare[2].sinks == 4 && o.compare[2].nonuniform == KVQ_ROLES_K &&
               o.compare[2].rotation_seed == 77 && o.compare[2].residual == -1,
           "an entry without suffixes takes the global --kv-* options");
    o = accepts(KVQ_CLI_RUN, "-m|m|-p|x|--kv-rotate|v|--kv-rotate|default|--kv-nuq|none|--kv-sinks|default|--kv-sinks|0");
    EXPECT(o.rotate == -1 && o.nonuniform == 0 && o.sinks == 0, "default / none / 0 (the last one given wins)");
    o = accepts(KVQ_CLI_CAP, "-m|m|--mem|1G|--kv-rotate|k|--kv-nuq|kv|--kv-sinks|1024|--rotation-seed|0");
    EXPECT(o.rotate == KVQ_ROLES_K && o.nonuniform == KVQ_ROLES_KV && o.sinks == 1024 && o.rotation_seed == 0, "capacity");
    {
        kvq_cli_mix m = kvq_cli_single_mix(&o);
        EXPECT(m.rotate == KVQ_ROLES_K && m.nonuniform == KVQ_ROLES_KV && m.sinks == 1024 && strcmp(m.name, "f16") == 0,
               "kvq_cli_single_mix");
    }
    o = accepts(KVQ_CLI_PPL, "-m|m|-f|t|--compare|f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,f16,q2");
    EXPECT(o.n_compare == 16 && o.compare[15].type_k == KVQ_TYPE_Q2, "16 entries");
    o = accepts(KVQ_CLI_CAP, "-m|m|--mem|1.5GiB|-np|4|--residual|0|-b|32");
    EXPECT(o.mem == 1610612736.0 && o.parallel == 4 && o.residual == 0 && o.batch == 32, "capacity");
    o = accepts(KVQ_CLI_CAP, "-m|m|--ctx-size|131072");
    EXPECT(o.ctx == 131072 && o.mem == 0, "capacity --ctx");
    o = accepts(KVQ_CLI_CAP, "-m|m|--mem|1000000");
    EXPECT(o.mem == 1e6, "plain bytes");
    o = accepts(KVQ_CLI_CAP, "-m|m|--ctx|4096|--kv-sinks|4|--compare|q3,q8/q4:r64,q8:local=q4|--kv-type-local|q2");
    EXPECT(o.n_compare == 3 && o.compare[0].type_k == KVQ_TYPE_Q3 && o.compare[0].sinks == 4 &&
               o.compare[0].local_types && o.compare[0].type_k_local == KVQ_TYPE_Q2 &&
               o.compare[1].type_v == KVQ_TYPE_Q4 && o.compare[1].residual == 64 && o.compare[2].type_k_local == KVQ_TYPE_Q4,
           "capacity --compare inherits --kv-sinks and --kv-type-local; :local= overrides it");
    rejects(KVQ_CLI_CAP, "-m|m|--mem|1G|--compare|q4|-ctk|q8", "option '-ctk' is not used by 'kvq capacity'");
    rejects(KVQ_CLI_CAP, "-m|m|--mem|1G|--compare|q4,q5", "unknown KV type 'q5'");
    o = accepts(KVQ_CLI_RUN, "-m|m|-p|x|--max-file-size|1KiB");
    EXPECT(o.max_file == 1024, "--max-file-size");
    kvq_cli_opts h;
    char err[KVQ_CLI_ERR_LEN];
    EXPECT(parse(KVQ_CLI_CAP, "--help", &h, err) == 1, "--help");
    EXPECT(parse(KVQ_CLI_TOK, "-m|m|-h", &h, err) == 1, "-h");
}

static void test_sampler(void) {
    enum { V = 6 };
    kvq_cli_prob sc[V];
    uint64_t rng = 1;
    float base[V] = {1.0f, 3.0f, 2.9f, -1.0f, 0.5f, 2.95f};
    float l[V];
    kvq_cli_sampler s = {.temp = 0, .top_p = 1, .min_p = 0, .repeat_penalty = 1, .top_k = 0};
    memcpy(l, base, sizeof l);
    EXPECT(kvq_cli_sample(l, V, &s, NULL, 0, &rng, sc) == 1, "greedy");
    /* repeat penalty: token 1 was seen (twice: penalized once), 3.0 / 1.5 = 2.0 < 2.95 */
    int32_t recent[3] = {1, 1, 3};
    s.repeat_penalty = 1.5f;
    memcpy(l, base, sizeof l);
    EXPECT(kvq_cli_sample(l, V, &s, recent, 3, &rng, sc) == 5, "repeat penalty moves greedy off token 1");
    EXPECT(fabsf(l[1] - 2.0f) < 1e-6f && fabsf(l[3] + 1.5f) < 1e-6f, "penalty once per token: l1 %g l3 %g", l[1], l[3]);
    s.repeat_penalty = 1;
    /* top-k 1 at a high temperature: always the top token */
    s.temp = 50;
    s.top_k = 1;
    int ok = 1;
    for (int i = 0; i < 200; i++) {
        memcpy(l, base, sizeof l);
        ok &= kvq_cli_sample(l, V, &s, NULL, 0, &rng, sc) == 1;
    }
    EXPECT(ok, "top-k 1");
    /* top-k 3: only tokens 1, 5, 2; all of them show up */
    s.top_k = 3;
    int seen[V] = {0};
    for (int i = 0; i < 2000; i++) {
        memcpy(l, base, sizeof l);
        seen[kvq_cli_sample(l, V, &s, NULL, 0, &rng, sc)]++;
    }
    EXPECT(seen[1] && seen[2] && seen[5] && !seen[0] && !seen[3] && !seen[4], "top-k 3: %d %d %d %d %d %d", seen[0],
           seen[1], seen[2], seen[3], seen[4], seen[5]);
    /* min-p: at temp 1, p(2)/p(1) = e^-0.1 = 0.905, p(5)/p(1) = 0.951, p(0)/p(1) = e^-2: min-p 0.5 keeps 1, 2, 5 */
    s.top_k = 0;
    s.temp = 1;
    s.min_p = 0.5f;
    memset(seen, 0, sizeof seen);
    for (int i = 0; i < 2000; i++) {
        memcpy(l, base, sizeof l);
        seen[kvq_cli_sample(l, V, &s, NULL, 0, &rng, sc)]++;
    }
    EXPECT(seen[1] && seen[2] && seen[5] && !seen[0] && !seen[3] && !seen[4], "min-p 0.5: %d %d %d %d %d %d", seen[0],
           seen[1], seen[2], seen[3], seen[4], seen[5]);
    s.min_p = 0.92f; /* drops token 2 (0.905) */
    memset(seen, 0, sizeof seen);
    for (int i = 0; i < 2000; i++) {
        memcpy(l, base, sizeof l);
        seen[kvq_cli_sample(l, V, &s, NULL, 0, &rng, sc)]++;
    }
    EXPECT(seen[1] && seen[5] && !seen[2], "min-p 0.92: %d %d %d", seen[1], seen[2], seen[5]);
    /* top-p small: the top token only */
    s.min_p = 0;
    s.top_p = 0.01f;
    ok = 1;
    for (int i = 0; i < 200; i++) {
        memcpy(l, base, sizeof l);
        ok &= kvq_cli_sample(l, V, &s, NULL, 0, &rng, sc) == 1;
    }
    EXPECT(ok, "top-p 0.01");
}

static void test_read_file(void) {
    char dir[] = "/tmp/kvq_cli_testXXXXXX";
    if (!mkdtemp(dir)) {
        EXPECT(0, "mkdtemp");
        return;
    }
    char path[128], err[KVQ_CLI_ERR_LEN];
    snprintf(path, sizeof path, "%s/t.txt", dir);
    FILE *f = fopen(path, "wb");
    for (int i = 0; i < 100; i++) fputc('a' + i % 26, f);
    fclose(f);
    size_t len = 0;
    char *t = kvq_cli_read_file(path, 100, &len, err, sizeof err);
    EXPECT(t && len == 100 && t[100] == '\0' && t[0] == 'a', "100 bytes at the limit");
    free(t);
    t = kvq_cli_read_file(path, 99, &len, err, sizeof err);
    EXPECT(!t && strstr(err, path) && strstr(err, "more than the limit of 99"), "over the limit: %s", err);
    t = kvq_cli_read_file(dir, 1000, &len, err, sizeof err);
    EXPECT(!t && strstr(err, "is a directory"), "directory: %s", err);
    t = kvq_cli_read_file("/nonexistent/kvq", 1000, &len, err, sizeof err);
    EXPECT(!t && strstr(err, "cannot open '/nonexistent/kvq'"), "missing: %s", err);
    t = kvq_cli_read_file("/dev/zero", 100000, &len, err, sizeof err);
    EXPECT(!t && strstr(err, "'/dev/zero' is longer than the limit of 100000"), "stream: %s", err);
    t = kvq_cli_read_file("/dev/null", 10, &len, err, sizeof err);
    EXPECT(t && len == 0, "empty stream");
    free(t);
    remove(path);
    rmdir(dir);
}

/* kvq-plan files (src/cli/plan.c, docs/kv-plan.md): the parser on texts, the config it makes, and --kv-plan / plan=
 * through the option parser on files. */
static int plan_text(const char *text, int *NL, kvq_type *tk, kvq_type *tv, char *err) {
    return kvq_cli_plan_parse(text, strlen(text), NL, tk, tv, err, KVQ_CLI_ERR_LEN);
}

static void plan_rejects(const char *text, const char *want) {
    static kvq_type tk[KVQ_PLAN_MAX_LAYERS], tv[KVQ_PLAN_MAX_LAYERS];
    char err[KVQ_CLI_ERR_LEN] = "";
    int NL = -1, r = plan_text(text, &NL, tk, tv, err);
    EXPECT(r == -1 && NL == 0 && strstr(err, want), "plan '%s' -> rc %d, '%s' (wanted '%s')", text, r, err, want);
}

static void test_plan(void) {
    static kvq_type tk[KVQ_PLAN_MAX_LAYERS], tv[KVQ_PLAN_MAX_LAYERS];
    char err[KVQ_CLI_ERR_LEN] = "";
    int NL = 0;
    /* comments, blank lines, tabs, CR, any layer order, llama.cpp's names, unknown keywords ignored */
    int r = plan_text("# a plan\n\nkvq-plan 1   # version\n n_layers\t5\r\nlayer 4 q8/q4\nlayer 0 q4\nlayer 2 q2\n"
                      "budget 3.5\nlayer 1 q8_0/q4_1\nlayer 3 q2\nsensitivity 0 q2 0.1 2.8\nfuture_field a b c d\n",
                      &NL, tk, tv, err);
    EXPECT(r == 0 && NL == 5, "plan parsed: rc %d, %d layers, '%s'", r, NL, err);
    EXPECT(tk[0] == KVQ_TYPE_Q4 && tv[0] == KVQ_TYPE_Q4 && tk[1] == KVQ_TYPE_Q8 && tv[1] == KVQ_TYPE_Q4 &&
           tk[2] == KVQ_TYPE_Q2 && tk[3] == KVQ_TYPE_Q2 && tk[4] == KVQ_TYPE_Q8 && tv[4] == KVQ_TYPE_Q4,
           "plan types");
    kvq_cli_mix m;
    memset(&m, 0, sizeof m);
    m.local_types = 1;
    r = kvq_cli_plan_to_mix(NL, tk, tv, &m, err, sizeof err);
    /* q2 (layers 2-3) ties q8/q4 (1 and 4) at two layers: the first pair of the most used count is the context's */
    EXPECT(r == 0 && m.type_k == KVQ_TYPE_Q8 && m.type_v == KVQ_TYPE_Q4 && m.n_layer_types == 2 && m.plan_layers == 5 &&
           !m.local_types, "plan -> config: %d, %d/%d, %d ranges", r, m.type_k, m.type_v, m.n_layer_types);
    EXPECT(m.layer_types[0].first == 0 && m.layer_types[0].last == 0 && m.layer_types[0].type_k == KVQ_TYPE_Q4 &&
           m.layer_types[1].first == 2 && m.layer_types[1].last == 3 && m.layer_types[1].type_k == KVQ_TYPE_Q2,
           "plan ranges: %d-%d, %d-%d", m.layer_types[0].first, m.layer_types[0].last, m.layer_types[1].first,
           m.layer_types[1].last);
    /* 130 layers alternating: 65 ranges over the most used type, one more than the engine takes */
    char big[8192];
    int o = snprintf(big, sizeof big, "kvq-plan 1\nn_layers 130\n");
    for (int l = 0; l < 130; l++) o += snprintf(big + o, sizeof big - (size_t)o, "layer %d %s\n", l, l % 2 ? "q2" : "q4");
    EXPECT(plan_text(big, &NL, tk, tv, err) == 0 && NL == 130, "130 layers: %s", err);
    EXPECT(kvq_cli_plan_to_mix(NL, tk, tv, &m, err, sizeof err) == -1 && strstr(err, "more than 64 times"), "%s", err);
    plan_rejects("", "empty: not a kvq plan");
    plan_rejects("# only a comment\n", "empty: not a kvq plan");
    plan_rejects("n_layers 2\n", "line 1: not a kvq plan");
    plan_rejects("kvq-plan 2\nn_layers 1\nlayer 0 q4\n", "written by a newer kvq (this one reads version 1)");
    plan_rejects("kvq-plan 0\n", "line 1: 'kvq-plan 0': the version is not a number >= 1");
    plan_rejects("kvq-plan x\n", "the version is not a number");
    plan_rejects("kvq-plan 1\n", "no n_layers line");
    plan_rejects("kvq-plan 1\nlayer 0 q4\n", "line 2: a layer line before n_layers");
    plan_rejects("kvq-plan 1\nn_layers 0\n", "line 2: n_layers must be one number in 1..4096");
    plan_rejects("kvq-plan 1\nn_layers 4097\n", "n_layers must be one number in 1..4096");
    plan_rejects("kvq-plan 1\nn_layers 2\nn_layers 2\n", "line 3: n_layers given twice");
    plan_rejects("kvq-plan 1\nn_layers 2\nlayer 0 q4\n", "1 of its 2 layers have no 'layer' line (the first: layer 1)");
    plan_rejects("kvq-plan 1\nn_layers 2\nlayer 2 q4\n", "line 3: not 'layer L TYPE[/TYPE]' with L in 0..1");
    plan_rejects("kvq-plan 1\nn_layers 2\nlayer -1 q4\n", "line 3: not 'layer L");
    plan_rejects("kvq-plan 1\nn_layers 2\nlayer 0\n", "line 3: not 'layer L");
    plan_rejects("kvq-plan 1\nn_layers 2\nlayer 0 q4 q2\n", "line 3: not 'layer L");
    plan_rejects("kvq-plan 1\nn_layers 2\nlayer 0 q4\nlayer 0 q2\n", "line 4: layer 0 given twice");
    plan_rejects("kvq-plan 1\nn_layers 1\nlayer 0 q5\n", "line 3: layer 0: type: unknown KV type 'q5'");
    plan_rejects("kvq-plan 1\nn_layers 1\nlayer 0 q4/\n", "line 3: layer 0: type: unknown KV type ''");
    plan_rejects("kvq-plan 1\nn_layers 1\nlayer 0 q4_0\n", "has no kvq equivalent");
    plan_rejects("kvq-plan 1\nn_layers 1\nlayer 0 q4\x01\n", "line 3: a control character (byte 1)");
    {
        char nul[] = "kvq-plan 1\nn_layers 1\nlayer 0 q4\0 junk\n";
        EXPECT(kvq_cli_plan_parse(nul, sizeof nul - 1, &NL, tk, tv, err, sizeof err) == -1 &&
               strstr(err, "line 3: a control character (byte 0)"), "NUL: %s", err);
    }
    {
        static char longl[KVQ_PLAN_MAX_LINE + 64];
        memset(longl, ' ', sizeof longl - 1);
        memcpy(longl, "kvq-plan 1\n", 11);
        longl[sizeof longl - 1] = '\0';
        plan_rejects(longl, "line 2 is longer than 1024 characters");
    }
    /* through the options: a file, its conflicts, its name as the config's */
    char dir[] = "/tmp/kvq_plan_testXXXXXX";
    if (!mkdtemp(dir)) {
        EXPECT(0, "mkdtemp");
        return;
    }
    char path[128], args[512];
    snprintf(path, sizeof path, "%s/p.plan", dir);
    FILE *f = fopen(path, "w");
    fputs("kvq-plan 1\nn_layers 3\nlayer 0 q8\nlayer 1 q2\nlayer 2 q2\n", f);
    fclose(f);
    snprintf(args, sizeof args, "-m|m|-f|t|--kv-plan|%s", path);
    kvq_cli_opts ok = accepts(KVQ_CLI_PPL, args);
    kvq_cli_mix sm = kvq_cli_single_mix(&ok);
    EXPECT(ok.type_k == KVQ_TYPE_Q2 && ok.type_v == KVQ_TYPE_Q2 && ok.n_layer_types == 1 && ok.plan_layers == 3 &&
           ok.layer_types[0].first == 0 && ok.layer_types[0].last == 0 && ok.layer_types[0].type_k == KVQ_TYPE_Q8 &&
           sm.plan_layers == 3 && strstr(sm.name, "plan=") && strstr(sm.name, "p.plan"), "--kv-plan: %s", sm.name);
    snprintf(args, sizeof args, "-m|m|-f|t|--compare|f16,plan=%s:rot=none", path);
    ok = accepts(KVQ_CLI_PPL, args);
    EXPECT(ok.n_compare == 2 && ok.compare[1].plan_layers == 3 && ok.compare[1].type_k == KVQ_TYPE_Q2 &&
           ok.compare[1].rotate == 0 && ok.compare[1].n_layer_types == 1, "plan= entry");
    /* each argv below has the plan file's path at its %s */
    static const struct {
        int cmd;
        const char *args, *want;
    } conflicts[] = {
        {KVQ_CLI_PPL, "-m|m|-f|t|--kv-plan|%s|--kv-type|q4", "--kv-plan gives every layer's types: not with --kv-type"},
        {KVQ_CLI_PPL, "-m|m|-f|t|-ctv|q4|--kv-plan|%s", "not with -ctv"},
        {KVQ_CLI_PPL, "-m|m|-f|t|--kv-plan|%s|--kv-layers|0@q4", "not with --kv-layers"},
        {KVQ_CLI_PPL, "-m|m|-f|t|--kv-plan|%s|--compare|f16,q4", "not with --compare (in --compare, an entry plan=FILE)"},
        {KVQ_CLI_PPL, "-m|m|-f|t|--compare|f16,plan=%s:layers=0@q4", "a plan gives every layer's types: no :layers= with it"},
        {KVQ_CLI_CAP, "-m|m|--mem|1G|--kv-plan|%s", "'--kv-plan' is not used by 'kvq capacity'"},
    };
    for (size_t i = 0; i < sizeof conflicts / sizeof conflicts[0]; i++) {
        snprintf(args, sizeof args, conflicts[i].args, path);
        rejects(conflicts[i].cmd, args, conflicts[i].want);
    }
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-plan|-", "--kv-plan: a plan is read from a file, not from standard input");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-plan|", "--kv-plan: the file name is empty");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--kv-plan|/nonexistent/p", "--kv-plan: cannot open '/nonexistent/p'");
    rejects(KVQ_CLI_PPL, "-m|m|-f|t|--compare|plan=/nonexistent/p", "--compare: plan=: cannot open");
    /* the layer count is checked once the model is known */
    ok = accepts(KVQ_CLI_PPL, "-m|m|-f|t");
    snprintf(args, sizeof args, "-m|m|-f|t|--kv-plan|%s", path);
    ok = accepts(KVQ_CLI_PPL, args);
    EXPECT(kvq_cli_check_plans(&ok, 3) == 0 && kvq_cli_check_plans(&ok, 4) == 1, "plan layers checked");
    remove(path);
    rmdir(dir);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--print-lib-defaults") == 0) {
        int rq4, rf16, g;
        lib_defaults(&rq4, &rf16, &g);
        printf("%d %d %d\n", rq4, rf16, g);
        return 0;
    }
    test_help_defaults();
    test_rejections();
    test_aliases();
    test_sampler();
    test_read_file();
    test_plan();
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
