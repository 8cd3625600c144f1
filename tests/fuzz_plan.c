/* Fuzz target of the kvq-plan reader (src/cli/plan.c, docs/kv-plan.md): the input is a plan file's text. An accepted
 * plan must name 1..KVQ_PLAN_MAX_LAYERS layers, each with implemented types, and turn into an engine config that
 * gives every layer back its own types (or be refused past the engine's ranges, with a message); a refused one must
 * leave a message. ASan/UBSan and LeakSanitizer catch the rest. scripts/fuzz.sh plan runs it; tests/corpus/plan/ seeds
 * it and is replayed by ctest (fuzz_plan_corpus). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(c)                                                                                                  \
    do {                                                                                                          \
        if (!(c)) {                                                                                               \
            fprintf(stderr, "fuzz_plan: check failed: %s (line %d)\n", #c, __LINE__);                           \
            abort();                                                                                              \
        }                                                                                                         \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > KVQ_PLAN_MAX_BYTES + 1) return 0;
    static kvq_type tk[KVQ_PLAN_MAX_LAYERS], tv[KVQ_PLAN_MAX_LAYERS];
    char err[KVQ_CLI_ERR_LEN];
    memset(err, 'x', sizeof err);
    int NL = -1;
    int r = kvq_cli_plan_parse((const char *)data, size, &NL, tk, tv, err, sizeof err);
    CHECK(r == 0 || r == -1);
    if (r) {
        CHECK(NL == 0 && err[0] != '\0' && memchr(err, '\0', sizeof err) != NULL);
        return 0;
    }
    CHECK(NL >= 1 && NL <= KVQ_PLAN_MAX_LAYERS);
    for (int l = 0; l < NL; l++) {
        const kvq_type_traits *a = kvq_type_get_traits(tk[l]), *b = kvq_type_get_traits(tv[l]);
        CHECK(a && a->implemented && b && b->implemented);
    }
    kvq_cli_mix m;
    memset(&m, 0, sizeof m);
    memset(err, 'x', sizeof err);
    if (kvq_cli_plan_to_mix(NL, tk, tv, &m, err, sizeof err)) {
        CHECK(err[0] != '\0' && memchr(err, '\0', sizeof err) != NULL);
        return 0;
    }
    /* the config gives each layer its plan's types: a range's, else the context's */
    CHECK(m.plan_layers == NL && m.n_layer_types >= 0 && m.n_layer_types <= LLAMA_MAX_LAYER_TYPES && !m.local_types);
    for (int l = 0; l < NL; l++) {
        kvq_type k = m.type_k, v = m.type_v;
        int hits = 0;
        for (int i = 0; i < m.n_layer_types; i++)
            if (m.layer_types[i].first <= l && l <= m.layer_types[i].last) k = m.layer_types[i].type_k, v = m.layer_types[i].type_v, hits++;
        CHECK(hits <= 1 && k == tk[l] && v == tv[l]);
    }
    return 0;
}
