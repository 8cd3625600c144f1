/* kvq calibrate: per-layer KV types for a bit budget.
 *
 * Each layer's sensitivity to a candidate type t is measured alone: the model runs with every layer's cache in f16
 * but layer l's in t, and the mean KL divergence of its next-token distributions from the all-f16 run (kvq
 * perplexity's scoring: chunks of --ctx tokens, the second half of each scored) is s_l(t). Small errors in different
 * layers add up nearly linearly in the KLD (measured: docs/quality.md, "Per-layer types"), so the plan minimizes
 * sum_l s_l(t_l) under the budget: every layer starts at the cheapest candidate and the upgrade with the largest KLD
 * saved per bit added is taken while it fits (the greedy of a multiple-choice knapsack). Bits count pages, scales,
 * the fp16 window and sinks after --bits-ctx tokens, as kvq perplexity's bits/elem column does (measured on a one-layer
 * cache per type, fed as the engine feeds it; a sliding-window layer holds only its window).
 *
 * The one-layer-at-a-time measurement is the point: upgrading one layer of an all-q2 model instead moves the KLD by
 * less than the noise of q2's own error (a rotation seed alone moves it by ~5%), so it ranks nothing.
 *
 * Out: the per-layer table (--csv), the plan as --kv-type/--kv-layers options (stdout) and as a kvq-plan file (-o FILE,
 * docs/kv-plan.md), and the KLD the
 * additive model predicts for it. Use a calibration text other than the evaluation text. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "llama.h"
#include "tokenizer.h"

#define MAX_CAND 6

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvq calibrate -m MODEL -f TEXT --budget BITS [--types LIST] [-c N] [--chunks N] [--bits-ctx N]\n"
            "                     [-t N] [-b N] [--decode-attn] [--csv FILE] [-o FILE]\n"
            "Per-layer KV types whose mean stored bits per element fit BITS and whose summed per-layer KL divergence\n"
            "(each layer measured alone against f16, kvq perplexity's scoring) is lowest (src/cli/calibrate.c says how).\n\n"
            "  -m, --model FILE        GGUF model\n"
            "  -f, --file FILE         calibration text (not the text you evaluate on)\n"
            "  --budget BITS           mean stored bits per K/V element of the plan, scales, window and sinks included\n"
            "  --types LIST            candidate types, TYPE or KEYS/VALUES, 2 to %d (default q2,q4,q8)\n"
            "  -c, --ctx-size N        tokens per chunk of the measurement (default 1024)\n"
            "  --chunks N              chunks measured (default 2)\n"
            "  --bits-ctx N            context length at which the bits are counted (default: -c)\n"
            "  -t, --threads N         CPU threads\n"
            "  -b, --batch-size N      tokens per forward call (default 256)\n"
            "  --decode-attn           score as kvq perplexity --decode-attn: token by token, as generation reads the\n"
            "                          cache (without it a batch's early tokens leave the fp16 window before its queries\n"
            "                          read them: the grouped types' KLD measures 2-3x higher)\n"
            "  --csv FILE              the per-layer sensitivities: layer,type,kld,bits,picked\n"
            "  --load FILE             take the sensitivities from such a CSV or -o plan (same model and --types)\n"
            "                          instead of measuring them: plans for other budgets or --bits-ctx in seconds\n"
            "  -o FILE                 write the plan as a kvq-plan file (docs/kv-plan.md) for --kv-plan FILE, kvq\n"
            "                          perplexity --compare plan=FILE, or Python's kvq.KVQCache(config, plan=FILE)\n"
            "The other KV options (--kv-rotate, --kv-prerope, ...) keep their defaults: each layer's type brings its own.\n",
            MAX_CAND);
}

/* Bytes per token that one layer of kind `local` stores with types (tk, tv) once `tokens` tokens went in, in batches
 * of `batch`: what kvq perplexity's bits/elem column counts (pages in use, sinks included, + the windows' heap bytes,
 * after a chunk of that many tokens), measured on a one-layer cache fed zeros the way the engine feeds its caches (a
 * sliding-window layer drops the tokens before its window first, llama.c's forward). */
static kvq_status layer_bytes(const llama_config *mc, const kvq_cli_mix *m, int local, kvq_type tk, kvq_type tv,
                              int64_t tokens, int batch, double *out) {
    kvq_cache_config cc = kvq_cache_config_default();
    cc.n_layers = 1, cc.n_kv_heads = mc->n_kv_heads, cc.head_dim = mc->head_dim;
    cc.type_k = tk, cc.type_v = tv, cc.residual = m->residual, cc.group = m->group, cc.max_seqs = 1;
    cc.sinks = local ? 0 : m->sinks, cc.n_threads = 1;
    cc.arena_bytes = kvq_cache_arena_bytes_for(&cc, tokens);
    if (!cc.arena_bytes) return kvq_set_error(KVQ_ERR_INVALID_ARG, "sizing a one-layer cache of %lld tokens", (long long)tokens);
    kvq_cache *c = NULL;
    int32_t seq;
    float *z = calloc((size_t)batch * mc->n_kv_heads * mc->head_dim, sizeof *z);
    kvq_status st = z ? kvq_cache_create(&cc, &c) : kvq_set_error(KVQ_ERR_OUT_OF_MEMORY, "a batch of zeros");
    if (!st) st = kvq_seq_new(c, &seq);
    for (int64_t pos = 0; !st && pos < tokens; pos += batch) {
        int32_t n = (int32_t)(tokens - pos < batch ? tokens - pos : batch);
        if (local && mc->window > 0 && pos - mc->window + 1 > 0) st = kvq_seq_drop_front(c, seq, 0, pos - mc->window + 1);
        if (!st) st = kvq_append(c, 0, 1, &seq, &n, KVQ_DTYPE_F32, z, z);
    }
    kvq_cache_stats s;
    if (!st) st = kvq_cache_get_stats(c, &s);
    if (!st) *out = ((double)s.page_bytes_in_use + (double)s.window_bytes) / (double)tokens;
    kvq_cache_free(c);
    free(z);
    return st;
}

int kvq_cli_calibrate(int argc, char **argv) {
    kvq_cli_opts o;
    kvq_cli_defaults(KVQ_CLI_PPL, &o);
    o.cmd = KVQ_CLI_CALIBRATE;
    o.ctx = 1024, o.chunks = 2, o.quiet = 0;
    const char *types = "q2,q4,q8", *csv = NULL, *plan_path = NULL, *load = NULL;
    double budget = -1;
    int64_t bits_ctx = 0;
    char err[KVQ_CLI_ERR_LEN];
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(a, "--decode-attn")) { /* kvq perplexity's: each token attends as in generation */
            o.decode_attn = 1;
            continue;
        }
        static const char *const valued[] = {"-m", "--model", "-f", "--file", "--budget", "--types", "-c", "--ctx-size",
                                             "--chunks", "--bits-ctx", "-t", "--threads", "-b", "--batch-size", "--csv", "-o",
                                             "--load"};
        if (kvq_cli_valued_option("calibrate", a, v, valued, sizeof valued / sizeof valued[0])) return 2;
        i++;
        int64_t x = 0;
        int bad = 0;
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) o.model = v;
        else if (!strcmp(a, "-f") || !strcmp(a, "--file")) o.file = v;
        else if (!strcmp(a, "--types")) types = v;
        else if (!strcmp(a, "--csv")) csv = v;
        else if (!strcmp(a, "-o")) plan_path = v;
        else if (!strcmp(a, "--load")) load = v;
        else if (!strcmp(a, "--budget")) {
            float b;
            if (!(bad = kvq_cli_parse_float(v, 0.5, 32, &b, a, err, sizeof err))) budget = b;
        } else {
            int64_t lo = 1, hi = 1 << 22;
            if (!strcmp(a, "-t") || !strcmp(a, "--threads")) hi = 1024;
            if (!strcmp(a, "-b") || !strcmp(a, "--batch-size")) hi = 8192;
            if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) lo = 16;
            if (!(bad = kvq_cli_parse_i64(v, lo, hi, &x, a, err, sizeof err))) {
                if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) o.ctx = (int)x;
                else if (!strcmp(a, "--chunks")) o.chunks = (int)x;
                else if (!strcmp(a, "--bits-ctx")) bits_ctx = x;
                else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) o.threads = (int)x;
                else o.batch = (int)x;
            }
        }
        if (bad) {
            fprintf(stderr, "kvq calibrate: %s\n", err);
            return 2;
        }
    }
    if (!o.model || (!o.file && !load) || budget < 0) {
        fprintf(stderr, "kvq calibrate: -m MODEL, -f TEXT and --budget BITS are required (kvq calibrate --help)\n");
        return 2;
    }
    if (kvq_cli_parse_compare(types, &o, err, sizeof err)) {
        fprintf(stderr, "kvq calibrate: --types: %s\n", err + (strncmp(err, "--compare: ", 11) ? 0 : 11));
        return 2;
    }
    int nc = o.n_compare;
    kvq_type ck[MAX_CAND], cv[MAX_CAND];
    for (int i = 0; i < nc; i++) {
        if (strchr(o.compare[i].name, ':')) {
            fprintf(stderr, "kvq calibrate: --types: '%s': a candidate is a type or KEYS/VALUES, no options\n",
                    o.compare[i].name);
            return 2;
        }
        ck[i] = o.compare[i].type_k, cv[i] = o.compare[i].type_v;
        for (int j = 0; j < i; j++)
            if (ck[j] == ck[i] && cv[j] == cv[i]) {
                fprintf(stderr, "kvq calibrate: --types: '%s' is listed twice\n", o.compare[i].name);
                return 2;
            }
    }
    if (nc < 2 || nc > MAX_CAND) {
        fprintf(stderr, "kvq calibrate: --types: %d candidates, 2 to %d\n", nc, MAX_CAND);
        return 2;
    }
    if (!bits_ctx) bits_ctx = o.ctx;
    if (o.batch > o.ctx) o.batch = o.ctx;

    size_t len = 0;
    char *text = load ? calloc(1, 1) : kvq_cli_read_file(o.file, o.max_file, &len, err, sizeof err);
    if (!text) {
        fprintf(stderr, "kvq calibrate: -f: %s\n", err);
        return 1;
    }
    kvq_cli_loaded L;
    if (kvq_cli_load(&o, &L, 1)) {
        free(text);
        return 1;
    }
    int rc = 0;
    const llama_config *mc = L.cfg;
    const int NL = mc->n_layers;
    double *s = calloc((size_t)NL * nc, sizeof *s), *cost = calloc((size_t)NL * nc, sizeof *cost);
    int *pick = calloc((size_t)NL, sizeof *pick);
    kvq_cli_mix *mixes = calloc(KVQ_CLI_MAX_COMPARE + 1, sizeof *mixes);
    tok_ids ids = {0};
    kvq_status st = tok_encode(L.tok, text, len, 1, &ids);
    free(text);
    if (!s || !cost || !pick || !mixes) st = kvq_set_error(KVQ_ERR_OUT_OF_MEMORY, "calibration tables");
    if (st) {
        rc = kvq_cli_die(KVQ_CLI_CALIBRATE, "calibrate", st);
        goto done;
    }
    if (load) { /* the sensitivities of an earlier run: its --csv file, or its -o plan's sensitivity lines */
        FILE *lf = fopen(load, "r");
        char line[512];
        int got = 0, plan = 0;
        if (lf && fgets(line, sizeof line, lf) && !strncmp(line, "kvq-plan ", 9)) plan = 1;
        if (!lf || (!plan && strncmp(line, "layer,type,kld", 14))) {
            fprintf(stderr, "kvq calibrate: --load: '%s' is not a kvq calibrate --csv file or -o plan\n", load);
            if (lf) fclose(lf);
            rc = 1;
            goto done;
        }
        while (fgets(line, sizeof line, lf)) {
            char tname[64];
            int l;
            double k;
            if (plan) { /* "sensitivity L TYPE KLD BITS" (docs/kv-plan.md); the other lines say nothing here */
                if (strncmp(line, "sensitivity ", 12)) continue;
                if (sscanf(line + 12, "%d %63s %lf", &l, tname, &k) != 3 || l < 0 || l >= NL || !(k >= 0)) break;
            } else if (sscanf(line, "%d,%63[^,],%lf", &l, tname, &k) != 3 || l < 0 || l >= NL || !(k >= 0)) break;
            int t = 0;
            while (t < nc && strcmp(o.compare[t].name, tname)) t++;
            if (t == nc) continue; /* a type this run does not consider */
            got += !(pick[l] >> t & 1); /* pick[] holds the seen bits meanwhile (reset below) */
            pick[l] |= 1 << t;
            s[(size_t)l * nc + t] = k;
        }
        fclose(lf);
        memset(pick, 0, (size_t)NL * sizeof *pick);
        if (got != NL * nc) {
            fprintf(stderr, "kvq calibrate: --load: '%s' does not hold the %d x %d sensitivities of this model and --types\n",
                    load, NL, nc);
            rc = 1;
            goto done;
        }
    }
    int bos, n_chunks = load ? 0 : kvq_cli_ppl_chunks(&o, &L, &ids, &bos);
    if (n_chunks < 0) {
        rc = -n_chunks;
        goto done;
    }

    /* the base: f16 everywhere, the global options' other fields */
    kvq_cli_opts f = o;
    f.type_k = f.type_v = KVQ_TYPE_F16, f.n_layer_types = 0;
    kvq_cli_mix base = kvq_cli_single_mix(&f);
    for (int t = 0; t < nc && !rc; t++) {
        double b[2] = {0, 0}; /* a global layer's, a local layer's */
        for (int k = 0; k < 2 && !rc; k++)
            if ((k == 0 || mc->window > 0) && (st = layer_bytes(mc, &base, k, ck[t], cv[t], bits_ctx, o.batch, &b[k])))
                rc = kvq_cli_die(KVQ_CLI_CALIBRATE, "counting the bits of a candidate", st);
        for (int l = 0; l < NL; l++) cost[(size_t)l * nc + t] = b[llama_layer_is_local(mc, l)];
    }
    if (rc) goto done;
    /* the cheapest plan must fit before anything is measured */
    const double den = 2.0 * NL * mc->n_kv_heads * mc->head_dim; /* K and V elements per token */
    double bytes = 0;
    for (int l = 0; l < NL; l++) {
        int c = 0;
        for (int t = 1; t < nc; t++)
            if (cost[(size_t)l * nc + t] < cost[(size_t)l * nc + c]) c = t;
        pick[l] = c, bytes += cost[(size_t)l * nc + c];
    }
    if (8.0 * bytes / den > budget * (1 + 1e-9)) {
        fprintf(stderr, "kvq calibrate: --budget %.3f: the cheapest plan (every layer its cheapest candidate) needs %.3f bits\n",
                budget, 8.0 * bytes / den);
        rc = 1;
        goto done;
    }
    /* s_l(t): the (layer, type) configs in batches next to the f16 base (mixes[0]) */
    /* f16/f16 candidates are the base itself: KLD 0, nothing to run */
    int *todo = malloc(sizeof *todo * (size_t)NL * nc), total = 0, done_n = 0;
    if (!todo) {
        rc = kvq_cli_die(KVQ_CLI_CALIBRATE, "calibrate", kvq_set_error(KVQ_ERR_OUT_OF_MEMORY, "the config list"));
        goto done;
    }
    for (int i = 0; !load && i < NL * nc; i++)
        if (ck[i % nc] != KVQ_TYPE_F16 || cv[i % nc] != KVQ_TYPE_F16) todo[total++] = i;
    if (!load) fprintf(stderr, "kvq calibrate: %d layers x %d types: %d configs, %d chunks of %d tokens each\n", NL, nc, total,
            n_chunks, o.ctx);
    while (done_n < total && !rc) {
        int n = total - done_n < KVQ_CLI_MAX_COMPARE ? total - done_n : KVQ_CLI_MAX_COMPARE;
        mixes[0] = base;
        for (int i = 0; i < n; i++) {
            int l = todo[done_n + i] / nc, t = todo[done_n + i] % nc;
            kvq_cli_mix *m = &mixes[1 + i];
            *m = base;
            m->n_layer_types = 1;
            m->layer_types[0] = (llama_layer_types){l, l, ck[t], cv[t]};
            snprintf(m->name, sizeof m->name, "f16:layers=%d@%s", l, o.compare[t].name);
        }
        double kld[KVQ_CLI_MAX_COMPARE + 1], bits[KVQ_CLI_MAX_COMPARE + 1];
        if ((rc = kvq_cli_ppl_eval(&o, &L, ids.ids, n_chunks, mixes, n + 1, kld, bits))) break;
        for (int i = 0; i < n; i++) s[todo[done_n + i]] = kld[1 + i];
        done_n += n;
        fprintf(stderr, "kvq calibrate: %d/%d configs measured\n", done_n, total);
    }
    free(todo);
    if (rc) goto done;

    /* the plan: the cheapest candidate everywhere (pick[], bytes: above), then the best KLD saved per byte added while
     * it fits */
    const double limit = budget * den / 8.0;
    for (;;) {
        int bl = -1, bt = -1;
        double best = 0;
        for (int l = 0; l < NL; l++)
            for (int t = 0; t < nc; t++) {
                double db = cost[(size_t)l * nc + t] - cost[(size_t)l * nc + pick[l]];
                double dk = s[(size_t)l * nc + pick[l]] - s[(size_t)l * nc + t];
                if (db <= 0 || dk <= 0 || bytes + db > limit * (1 + 1e-9)) continue;
                if (dk / db > best) best = dk / db, bl = l, bt = t;
            }
        if (bl < 0) break;
        bytes += cost[(size_t)bl * nc + bt] - cost[(size_t)bl * nc + pick[bl]];
        pick[bl] = bt;
    }
    double pred = 0;
    for (int l = 0; l < NL; l++) pred += s[(size_t)l * nc + pick[l]];

    /* options: the most used type as --kv-type, the others as '.'-joined ranges per type */
    int cnt[MAX_CAND] = {0}, main_t = 0;
    for (int l = 0; l < NL; l++) cnt[pick[l]]++;
    for (int t = 1; t < nc; t++)
        if (cnt[t] > cnt[main_t]) main_t = t;
    char spec[1024] = "";
    size_t sl = 0;
    for (int t = 0; t < nc; t++) {
        if (t == main_t || !cnt[t]) continue;
        if (sl) sl += (size_t)snprintf(spec + sl, sizeof spec - sl, "+");
        int first = 1;
        for (int l = 0; l < NL; l++) {
            if (pick[l] != t || (l > 0 && pick[l - 1] == t)) continue;
            int e = l;
            while (e + 1 < NL && pick[e + 1] == t) e++;
            sl += (size_t)snprintf(spec + sl, sizeof spec - sl, first ? "%d" : ".%d", l);
            if (e > l) sl += (size_t)snprintf(spec + sl, sizeof spec - sl, "-%d", e);
            first = 0;
        }
        sl += (size_t)snprintf(spec + sl, sizeof spec - sl, "@%s", o.compare[t].name);
    }
    char plan[1200];
    if (sl) snprintf(plan, sizeof plan, "--kv-type %s --kv-layers %s", o.compare[main_t].name, spec);
    else snprintf(plan, sizeof plan, "--kv-type %s", o.compare[main_t].name);

    printf("per-layer KLD against f16 (each layer alone at the type; ctx %d, %d chunks), * = the plan's\n", o.ctx, n_chunks);
    printf("| layer |");
    for (int t = 0; t < nc; t++) printf(" %10s |", o.compare[t].name);
    printf("\n|------:|");
    for (int t = 0; t < nc; t++) printf("-----------:|");
    printf("\n");
    for (int l = 0; l < NL; l++) {
        printf("| %5d |", l);
        for (int t = 0; t < nc; t++) printf(" %9.6f%c |", s[(size_t)l * nc + t], pick[l] == t ? '*' : ' ');
        printf("\n");
    }
    printf("bits per element at %lld tokens:", (long long)bits_ctx);
    for (int t = 0; t < nc; t++) {
        double b = 0;
        for (int l = 0; l < NL; l++) b += cost[(size_t)l * nc + t];
        printf(" %s %.3f%s", o.compare[t].name, 8.0 * b / den, t + 1 < nc ? "," : "\n");
    }
    printf("plan: %.3f bits per element (budget %.3f), summed per-layer KLD %.6f\n%s\n", 8.0 * bytes / den, budget, pred,
           plan);
    if (plan_path) { /* the kvq-plan file: the layers' types, then how they were chosen (ignored by its readers) */
        FILE *pf = NL <= KVQ_PLAN_MAX_LAYERS ? fopen(plan_path, "w") : NULL;
        kvq_type ptk[KVQ_PLAN_MAX_LAYERS], ptv[KVQ_PLAN_MAX_LAYERS];
        for (int l = 0; l < NL && l < KVQ_PLAN_MAX_LAYERS; l++) ptk[l] = ck[pick[l]], ptv[l] = cv[pick[l]];
        int ok = pf && kvq_cli_plan_write(pf, NL, ptk, ptv) == 0 &&
                 fprintf(pf, "# how it was chosen: kvq calibrate --budget, the mean stored bits per K/V element at bits_ctx\n"
                             "# tokens, and per layer and candidate the KLD against f16 with that layer alone at it\n"
                             "budget %.4f\nbits %.4f\nbits_ctx %lld\npredicted_kld %.8f\ncandidates", budget,
                         8.0 * bytes / den, (long long)bits_ctx, pred) > 0;
        for (int t = 0; ok && t < nc; t++) ok = fprintf(pf, " %s", o.compare[t].name) > 0;
        ok = ok && fprintf(pf, "\n") > 0;
        for (int l = 0; ok && l < NL; l++)
            for (int t = 0; ok && t < nc; t++)
                ok = fprintf(pf, "sensitivity %d %s %.8f %.6f\n", l, o.compare[t].name, s[(size_t)l * nc + t],
                             8.0 * cost[(size_t)l * nc + t] * NL / den) > 0;
        if (pf && fclose(pf)) ok = 0;
        if (!ok) {
            fprintf(stderr, "kvq calibrate: -o: cannot write '%s'\n", plan_path);
            rc = 1;
        }
    }
    if (csv) {
        FILE *cf = fopen(csv, "w");
        int ok = cf != NULL && fprintf(cf, "layer,type,kld,bits,picked\n") > 0;
        for (int l = 0; ok && l < NL; l++)
            for (int t = 0; ok && t < nc; t++)
                ok = fprintf(cf, "%d,%s,%.8f,%.6f,%d\n", l, o.compare[t].name, s[(size_t)l * nc + t],
                             8.0 * cost[(size_t)l * nc + t] * NL / den, pick[l] == t) > 0;
        if (!cf || !ok || fclose(cf)) {
            fprintf(stderr, "kvq calibrate: --csv: cannot write '%s'\n", csv);
            rc = 1;
        }
    }
done:
    free(s), free(cost), free(pick), free(mixes);
    tok_ids_free(&ids);
    kvq_cli_unload(&L);
    return rc;
}
