/* Fuzz target of the kvq command's option parser: the input is split into an argv (at NUL bytes and newlines) and
 * given to the parser of every subcommand (parse only: no model is loaded; the only files read are --kv-plan's and
 * --compare plan='s, tests/fuzz_plan.c fuzzes their contents). A rejected argv must
 * leave a message; an accepted one must satisfy what the subcommands rely on (a model, exactly one prompt source,
 * values in range, at most KVQ_CLI_MAX_COMPARE valid --compare entries). --help renders the help text (which asks
 * the library for its defaults). ASan/UBSan and LeakSanitizer catch the rest.
 *
 * libFuzzer build by hand (the parser instrumented, the libraries of a release build linked as they are), seeded with
 * tests/corpus/cli/:
 *   clang -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Iinclude -Isrc/model -Isrc/cli \
 *     -I/usr/include/x86_64-linux-gnu/openblas-pthread tests/fuzz_cli.c src/cli/options.c src/cli/common.c \
 *     build/src/model/libkvq_model.a build/src/model/libkvq_gguf.a build/src/core/libkvq.a -lopenblas -lgomp -lm \
 *     -o fuzz_cli && ./fuzz_cli -max_total_time=420 -max_len=2048 corpus/   (corpus/: a copy of tests/corpus/cli) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(c)                                                                                                  \
    do {                                                                                                          \
        if (!(c)) {                                                                                               \
            fprintf(stderr, "fuzz_cli: check failed: %s (line %d)\n", #c, __LINE__);                            \
            abort();                                                                                              \
        }                                                                                                         \
    } while (0)

static void check_accepted(int cmd, const kvq_cli_opts *o) {
    CHECK(o->cmd == cmd);
    CHECK(o->model != NULL);
    if (cmd == KVQ_CLI_RUN || cmd == KVQ_CLI_TOK) CHECK(!o->prompt != !o->file);
    if (cmd == KVQ_CLI_PPL) CHECK(o->file != NULL && o->ctx >= 2);
    if (cmd == KVQ_CLI_CAP) CHECK(!o->ctx != !(o->mem > 0));
    CHECK(o->mem == 0 || (o->mem >= 1 && o->mem <= 1152921504606846976.0));
    CHECK(o->n_predict >= 0 && o->n_predict <= (1 << 20));
    CHECK(o->ctx >= 0 && o->ctx <= (1 << 22));
    CHECK(o->threads >= 0 && o->threads <= 1024);
    CHECK(o->batch >= 1 && o->batch <= 8192);
    CHECK(o->residual >= -1 && o->residual <= 4096);
    CHECK(o->group == 0 || (o->group >= 16 && o->group <= 128));
    CHECK(o->temp >= 0 && o->temp <= 100);
    CHECK(o->top_p >= 0 && o->top_p <= 1 && o->min_p >= 0 && o->min_p <= 1);
    CHECK(o->repeat_penalty > 0 && o->repeat_penalty <= 100);
    CHECK(o->parallel >= 1 && o->parallel <= 65536);
    CHECK(o->max_file >= 1);
    CHECK(o->n_compare >= 0 && o->n_compare <= KVQ_CLI_MAX_COMPARE);
    for (int i = 0; i < o->n_compare; i++) {
        const kvq_cli_mix *m = &o->compare[i];
        const kvq_type_traits *tk = kvq_type_get_traits(m->type_k), *tv = kvq_type_get_traits(m->type_v);
        CHECK(tk && tk->implemented && tv && tv->implemented);
        CHECK(m->name[0] != '\0' && strlen(m->name) < sizeof m->name);
        CHECK(m->residual >= -1 && m->residual <= 4096);
        CHECK(m->rotate >= -1 && m->rotate <= KVQ_ROLES_KV && m->nonuniform >= -1 && m->nonuniform <= KVQ_ROLES_KV);
        CHECK(m->sinks >= -1 && m->sinks <= 1024);
    }
    CHECK(o->rotate >= -1 && o->rotate <= KVQ_ROLES_KV && o->nonuniform >= -1 && o->nonuniform <= KVQ_ROLES_KV);
    CHECK(o->sinks >= -1 && o->sinks <= 1024);
    if (cmd == KVQ_CLI_PASSKEY) {
        CHECK(o->n_lengths >= 1 && o->n_lengths <= KVQ_CLI_MAX_LENGTHS && o->n_depths >= 1 &&
              o->n_depths <= KVQ_CLI_MAX_DEPTHS && o->trials >= 1 && o->n_predict >= 1);
        for (int i = 0; i < o->n_lengths; i++) CHECK(o->lengths[i] > o->n_predict && o->lengths[i] <= (1 << 22));
        for (int i = 0; i < o->n_depths; i++) CHECK(o->depths[i] >= 0 && o->depths[i] <= 100);
    }
    const kvq_type_traits *k = kvq_type_get_traits(o->type_k), *v = kvq_type_get_traits(o->type_v);
    CHECK(k && k->implemented && v && v->implemented);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 8192) return 0;
    char *buf = malloc(size + 1);
    if (!buf) return 0;
    memcpy(buf, data, size);
    buf[size] = '\0';
    char *argv[257];
    int argc = 0;
    char *start = buf;
    for (size_t i = 0; i <= size && argc < 256; i++) {
        if (i == size || buf[i] == '\0' || buf[i] == '\n') {
            buf[i] = '\0';
            if (i < size || start < buf + size) argv[argc++] = start; /* empty arguments count, a trailing one not */
            start = buf + i + 1;
        }
    }
    argv[argc] = NULL;
    static FILE *devnull;
    if (!devnull) devnull = fopen("/dev/null", "w");
    for (int cmd = 0; cmd < KVQ_CLI_NCMD; cmd++) {
        kvq_cli_opts o;
        char err[KVQ_CLI_ERR_LEN];
        memset(err, 'x', sizeof err);
        int r = kvq_cli_parse(cmd, argc, argv, &o, err, sizeof err);
        CHECK(r == -1 || r == 0 || r == 1);
        if (r < 0) CHECK(err[0] != '\0' && memchr(err, '\0', sizeof err) != NULL);
        if (r == 0) check_accepted(cmd, &o);
        if (r == 1 && devnull) kvq_cli_usage(cmd, devnull);
    }
    free(buf);
    return 0;
}
