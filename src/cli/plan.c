/* kvq-plan files: every layer's KV types, as kvq calibrate writes them and --kv-plan / ':plan=' (and Python's
 * KVQCache(plan=...)) read them. The format is docs/kv-plan.md; python/kvq/plan.py is the other reader. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

/* Splits the line at blanks into at most `max` words (the line is modified); a '#' ends it. */
static int words(char *s, char **w, int max) {
    int k = 0;
    char *hash = strchr(s, '#');
    if (hash) *hash = '\0';
    for (char *p = s;;) {
        while (*p == ' ' || *p == '\t' || *p == '\r') p++;
        if (!*p) break;
        if (k == max) return max + 1;
        w[k++] = p;
        while (*p && *p != ' ' && *p != '\t' && *p != '\r') p++;
        if (*p) *p++ = '\0';
    }
    return k;
}

int kvq_cli_plan_parse(const char *text, size_t len, int *n_layers, kvq_type *tk, kvq_type *tv, char *err, size_t n) {
    char line[KVQ_PLAN_MAX_LINE + 1], msg[KVQ_CLI_ERR_LEN];
    int version = 0, NL = 0, got = 0, lineno = 0;
    unsigned char *seen = NULL;
    size_t i = 0;
    int rc = 0;
    *n_layers = 0;
    if (len > KVQ_PLAN_MAX_BYTES) return kvq_cli_fail(err, n, "%zu bytes, more than a plan's %d", len, KVQ_PLAN_MAX_BYTES);
    while (i < len && !rc) {
        size_t e = i;
        while (e < len && text[e] != '\n') e++;
        lineno++;
        if (e - i > KVQ_PLAN_MAX_LINE) {
            rc = kvq_cli_fail(err, n, "line %d is longer than %d characters", lineno, KVQ_PLAN_MAX_LINE);
            break;
        }
        for (size_t j = i; j < e; j++)
            if ((unsigned char)text[j] < 0x20 && text[j] != '\t' && text[j] != '\r') {
                rc = kvq_cli_fail(err, n, "line %d: a control character (byte %d)", lineno, (int)(unsigned char)text[j]);
                break;
            }
        if (rc) break;
        memcpy(line, text + i, e - i);
        line[e - i] = '\0';
        i = e + 1;
        char *w[4];
        int k = words(line, w, 3);
        if (k == 0) continue;
        if (!version) { /* the first directive says what the file is */
            int64_t v;
            if (k != 2 || strcmp(w[0], "kvq-plan")) {
                rc = kvq_cli_fail(err, n, "line %d: not a kvq plan (its first line must be 'kvq-plan %d')", lineno, KVQ_PLAN_VERSION);
                break;
            }
            if (kvq_cli_parse_i64(w[1], 1, 1000000, &v, "version", msg, sizeof msg)) {
                rc = kvq_cli_fail(err, n, "line %d: 'kvq-plan %s': the version is not a number >= 1", lineno, w[1]);
                break;
            }
            if (v > KVQ_PLAN_VERSION) {
                rc = kvq_cli_fail(err, n, "version %lld: written by a newer kvq (this one reads version %d)", (long long)v,
                          KVQ_PLAN_VERSION);
                break;
            }
            version = (int)v;
        } else if (!strcmp(w[0], "n_layers")) {
            int64_t v;
            if (NL) {
                rc = kvq_cli_fail(err, n, "line %d: n_layers given twice", lineno);
                break;
            }
            if (k != 2 || kvq_cli_parse_i64(w[1], 1, KVQ_PLAN_MAX_LAYERS, &v, "n_layers", msg, sizeof msg)) {
                rc = kvq_cli_fail(err, n, "line %d: n_layers must be one number in 1..%d", lineno, KVQ_PLAN_MAX_LAYERS);
                break;
            }
            NL = (int)v;
            seen = calloc((size_t)NL, 1);
            if (!seen) rc = kvq_cli_fail(err, n, "out of memory");
        } else if (!strcmp(w[0], "layer")) {
            int64_t l;
            if (!NL) {
                rc = kvq_cli_fail(err, n, "line %d: a layer line before n_layers", lineno);
                break;
            }
            if (k != 3 || kvq_cli_parse_i64(w[1], 0, NL - 1, &l, "layer", msg, sizeof msg)) {
                rc = kvq_cli_fail(err, n, "line %d: not 'layer L TYPE[/TYPE]' with L in 0..%d", lineno, NL - 1);
                break;
            }
            if (seen[l]) {
                rc = kvq_cli_fail(err, n, "line %d: layer %lld given twice", lineno, (long long)l);
                break;
            }
            char *slash = strchr(w[2], '/');
            if (slash) *slash = '\0';
            if (kvq_cli_parse_type(w[2], &tk[l], "type", msg, sizeof msg) ||
                kvq_cli_parse_type(slash ? slash + 1 : w[2], &tv[l], "type", msg, sizeof msg)) {
                rc = kvq_cli_fail(err, n, "line %d: layer %lld: %s", lineno, (long long)l, msg);
                break;
            }
            seen[l] = 1, got++;
        }
        /* any other keyword (budget, bits, candidates, sensitivity, ...) says how the plan was made: ignored here */
    }
    if (!rc && !version) rc = kvq_cli_fail(err, n, "empty: not a kvq plan (its first line must be 'kvq-plan %d')", KVQ_PLAN_VERSION);
    if (!rc && !NL) rc = kvq_cli_fail(err, n, "no n_layers line");
    if (!rc && got < NL) {
        int l = 0;
        while (seen[l]) l++;
        rc = kvq_cli_fail(err, n, "%d of its %d layers have no 'layer' line (the first: layer %d)", NL - got, NL, l);
    }
    free(seen);
    if (!rc) *n_layers = NL;
    return rc;
}

int kvq_cli_plan_to_mix(int NL, const kvq_type *tk, const kvq_type *tv, kvq_cli_mix *m, char *err, size_t n) {
    /* the most used (keys, values) pair is the context's type, the layers of other pairs are ranges over it */
    int best = 0, best_cnt = 0;
    for (int l = 0; l < NL; l++) {
        int c = 0;
        for (int j = 0; j < NL; j++) c += tk[j] == tk[l] && tv[j] == tv[l];
        if (c > best_cnt) best = l, best_cnt = c;
    }
    m->type_k = tk[best], m->type_v = tv[best];
    int k = 0;
    for (int l = 0; l < NL; l++) {
        if (tk[l] == m->type_k && tv[l] == m->type_v) continue;
        if (k > 0 && m->layer_types[k - 1].last == l - 1 && m->layer_types[k - 1].type_k == tk[l] &&
            m->layer_types[k - 1].type_v == tv[l]) {
            m->layer_types[k - 1].last = l;
            continue;
        }
        if (k == LLAMA_MAX_LAYER_TYPES)
            return kvq_cli_fail(err, n, "its layers change type more than %d times (the engine takes %d ranges)",
                        LLAMA_MAX_LAYER_TYPES, LLAMA_MAX_LAYER_TYPES);
        m->layer_types[k++] = (llama_layer_types){l, l, tk[l], tv[l]};
    }
    m->n_layer_types = k;
    m->local_types = 0; /* the plan names every layer's types, local ones included */
    m->plan_layers = NL;
    return 0;
}

int kvq_cli_plan_read(const char *path, kvq_cli_mix *m, const char *name, char *err, size_t n) {
    char msg[KVQ_CLI_ERR_LEN];
    size_t len = 0;
    if (!strcmp(path, "-")) return kvq_cli_fail(err, n, "%s: a plan is read from a file, not from standard input", name);
    char *text = kvq_cli_read_file(path, KVQ_PLAN_MAX_BYTES, &len, msg, sizeof msg);
    if (!text) return kvq_cli_fail(err, n, "%s: %s", name, msg);
    kvq_type *t = malloc(2 * sizeof *t * KVQ_PLAN_MAX_LAYERS);
    int NL = 0, rc = -1;
    if (!t) snprintf(msg, sizeof msg, "out of memory");
    else if (!kvq_cli_plan_parse(text, len, &NL, t, t + KVQ_PLAN_MAX_LAYERS, msg, sizeof msg))
        rc = kvq_cli_plan_to_mix(NL, t, t + KVQ_PLAN_MAX_LAYERS, m, msg, sizeof msg);
    free(t);
    free(text);
    return rc ? kvq_cli_fail(err, n, "%s: '%s': %s", name, path, msg) : 0;
}

int kvq_cli_plan_write(FILE *f, int NL, const kvq_type *tk, const kvq_type *tv) {
    int ok = fprintf(f, "kvq-plan %d\n# every layer's KV cache types (docs/kv-plan.md): kvq run/perplexity --kv-plan FILE, "
                        "kvq.KVQCache(config, plan=FILE)\nn_layers %d\n", KVQ_PLAN_VERSION, NL) > 0;
    for (int l = 0; ok && l < NL; l++)
        ok = fprintf(f, "layer %d %s/%s\n", l, kvq_cli_type_name(tk[l]), kvq_cli_type_name(tv[l])) > 0;
    return ok ? 0 : -1;
}

int kvq_cli_check_plans(const kvq_cli_opts *o, int n_layers) {
    const char *cmd = o->cmd == KVQ_CLI_CALIBRATE ? "calibrate" : kvq_cli_cmd_name(o->cmd);
    kvq_cli_mix single = kvq_cli_single_mix(o);
    for (int i = -1; i < o->n_compare; i++) {
        const kvq_cli_mix *m = i < 0 ? &single : &o->compare[i];
        if (m->plan_layers && m->plan_layers != n_layers) {
            fprintf(stderr, "kvq %s: %s: the plan is for %d layers, the model has %d\n", cmd,
                    i < 0 ? "--kv-plan" : m->name, m->plan_layers, n_layers);
            return 1;
        }
    }
    return 0;
}
