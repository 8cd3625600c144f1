/* kvq run: generates text from a prompt; --compare runs the same prompt once per KV config and puts the answers,
 * resident KV bytes and speeds side by side. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "cli.h"
#include "gguf.h"
#include "llama.h"
#include "model_err.h"
#include "tokenizer.h"

/* ----------------------------------------------------------------------------------------------------------
 * Sampling
 * -------------------------------------------------------------------------------------------------------- */
static uint64_t rng_next(uint64_t *s) { /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

static int cmp_prob_desc(const void *a, const void *b) {
    const kvq_cli_prob *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return (x->i > y->i) - (x->i < y->i); /* ties by id: the same order on every libc */
}

int32_t kvq_cli_sample(float *logits, int V, const kvq_cli_sampler *s, const int32_t *recent, int n_recent, uint64_t *rng,
                       kvq_cli_prob *sc) {
    if (s->repeat_penalty != 1.0f && n_recent > 0) {
        /* llama.cpp's rule, once per distinct token: positive logits divided, negative ones multiplied. sc[].i marks
         * the tokens already penalized. */
        for (int i = 0; i < V; i++) sc[i].i = 0;
        for (int j = 0; j < n_recent; j++) {
            int32_t t = recent[j];
            if (t < 0 || t >= V || sc[t].i) continue;
            sc[t].i = 1;
            logits[t] = logits[t] > 0 ? logits[t] / s->repeat_penalty : logits[t] * s->repeat_penalty;
        }
    }
    int32_t best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    if (s->temp <= 0) return best;
    for (int i = 0; i < V; i++) {
        sc[i].p = expf((logits[i] - logits[best]) / s->temp);
        sc[i].i = i;
    }
    int n = V;
    int sorted = 0;
    if (s->top_k > 0 && s->top_k < n) {
        qsort(sc, (size_t)n, sizeof *sc, cmp_prob_desc);
        sorted = 1;
        n = s->top_k;
    }
    double sum = 0;
    for (int i = 0; i < n; i++) sum += sc[i].p;
    if (s->top_p > 0 && s->top_p < 1 && n > 1) {
        if (!sorted) {
            /* Only candidates that can be in the nucleus need sorting: the tokens below (1 - top_p) / (n - 1) of the
             * mass have less than 1 - top_p together, so the nucleus lies among the others. */
            float cut = (float)((1.0 - s->top_p) / (n - 1) * sum);
            int m = 0;
            for (int i = 0; i < n; i++)
                if (sc[i].p >= cut) sc[m++] = sc[i];
            n = m;
            qsort(sc, (size_t)n, sizeof *sc, cmp_prob_desc);
            sorted = 1;
        }
        double acc = 0;
        int keep = n;
        for (int i = 0; i < n; i++) {
            acc += sc[i].p;
            if (acc >= s->top_p * sum) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
    }
    if (s->min_p > 0) {
        float pmax = 0;
        for (int i = 0; i < n; i++) pmax = sc[i].p > pmax ? sc[i].p : pmax;
        int m = 0;
        for (int i = 0; i < n; i++)
            if (sc[i].p >= s->min_p * pmax) sc[m++] = sc[i];
        n = m; /* the top token always stays */
    }
    sum = 0;
    for (int i = 0; i < n; i++) sum += sc[i].p;
    double r = (double)(rng_next(rng) >> 11) / 9007199254740992.0 * sum, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += sc[i].p;
        if (r < acc) return sc[i].i;
    }
    return sc[n - 1].i;
}

/* ----------------------------------------------------------------------------------------------------------
 * One generation
 * -------------------------------------------------------------------------------------------------------- */
typedef struct run_result {
    double prefill_s, decode_s;
    int decoded;       /* tokens that went through a decode step */
    int64_t tokens;    /* tokens in the cache at the end */
    kvq_cache_stats stats;
    tok_ids gen;       /* generated ids */
} run_result;

static int generate(const kvq_cli_opts *o, const kvq_cli_loaded *L, const tok_ids *prompt, int n_ctx, const kvq_cli_mix *mix,
                    float *logits, kvq_cli_prob *scratch, tok_ids *hist, run_result *res) {
    llama_ctx_params cp;
    kvq_cli_ctx_params(o, mix, n_ctx, &cp);
    kvq_cli_ctx c = {0};
    kvq_status st = kvq_cli_ctx_create(L, &cp, &c);
    if (st) return kvq_cli_die(KVQ_CLI_RUN, "creating the context", st);
    int V = L->cfg->vocab_size, rc = 0;
    hist->n = 0;
    for (size_t i = 0; i < prompt->n && !st; i++) st = tok_ids_push(hist, prompt->ids[i]);
    double t0 = kvq_cli_now();
    for (size_t i = 0; i < prompt->n && !st; i += (size_t)o->batch) {
        int n = (int)(prompt->n - i < (size_t)o->batch ? prompt->n - i : (size_t)o->batch);
        st = kvq_cli_forward(&c, prompt->ids + i, n, logits, n - 1);
    }
    if (st) {
        rc = kvq_cli_die(KVQ_CLI_RUN, "prefill", st);
        goto done;
    }
    double t1 = kvq_cli_now();
    kvq_cli_sampler smp = {.temp = o->temp, .top_p = o->top_p, .min_p = o->min_p, .repeat_penalty = o->repeat_penalty,
                           .top_k = o->top_k};
    uint64_t rng = o->seed ? o->seed : 0x9e3779b97f4a7c15ull;
    int generated = 0;
    while (generated < o->n_predict) {
        size_t lookback = o->repeat_last_n < 0 ? hist->n : (size_t)o->repeat_last_n;
        if (lookback > hist->n) lookback = hist->n;
        int32_t tok = kvq_cli_sample(logits, V, &smp, hist->ids + hist->n - lookback, (int)lookback, &rng, scratch);
        if (tok_is_eog(L->tok, tok)) break;
        if ((st = tok_ids_push(hist, tok)) || (st = tok_ids_push(&res->gen, tok))) break;
        size_t len;
        const char *piece = tok_piece(L->tok, tok, &len);
        if (!tok_is_control(L->tok, tok)) fwrite(piece, 1, len, stdout);
        fflush(stdout);
        generated++;
        if (generated == o->n_predict || kvq_cli_ctx_pos(&c) + 1 > n_ctx) break;
        if ((st = kvq_cli_forward(&c, &tok, 1, logits, 0))) break;
        res->decoded++;
    }
    double t2 = kvq_cli_now();
    printf("\n");
    fflush(stdout);
    if (st) {
        rc = kvq_cli_die(KVQ_CLI_RUN, "decode", st);
        goto done;
    }
    res->prefill_s = t1 - t0;
    res->decode_s = t2 - t1;
    res->tokens = kvq_cli_ctx_pos(&c);
    if ((st = kvq_cli_ctx_stats(&c, &res->stats))) rc = kvq_cli_die(KVQ_CLI_RUN, "cache statistics", st);
done:
    kvq_cli_ctx_free(&c);
    return rc;
}

static double resident(const kvq_cache_stats *s) { return (double)s->page_bytes_in_use + (double)s->window_bytes; }

static void footer_one(const kvq_cli_mix *mix, size_t n_prompt, const run_result *r) {
    char tot[32], pg[32], win[32];
    kvq_cli_fmt_bytes(resident(&r->stats), tot, sizeof tot);
    kvq_cli_fmt_bytes((double)r->stats.page_bytes_in_use, pg, sizeof pg);
    kvq_cli_fmt_bytes((double)r->stats.window_bytes, win, sizeof win);
    fprintf(stderr, "\n--- kvq run: KV cache %s keys / %s values\n", kvq_cli_type_name(mix->type_k), kvq_cli_type_name(mix->type_v));
    fprintf(stderr, "prefill: %zu tokens in %.2f s (%.1f tok/s)   decode: %d tokens in %.2f s (%.1f tok/s)\n", n_prompt,
            r->prefill_s, r->prefill_s > 0 ? (double)n_prompt / r->prefill_s : 0.0, r->decoded, r->decode_s,
            r->decoded > 0 ? r->decoded / r->decode_s : 0.0);
    fprintf(stderr, "KV cache: %lld tokens; resident %s = pages in use %s + fp16 residual windows %s\n",
            (long long)r->tokens, tot, pg, win);
    fprintf(stderr, "          pages: %.0f B/token vs %.0f B/token in F16 (%.3fx)", r->stats.bytes_per_token,
            r->stats.f16_bytes_per_token,
            r->stats.f16_bytes_per_token > 0 ? r->stats.bytes_per_token / r->stats.f16_bytes_per_token : 0.0);
    if (mix->type_k != KVQ_TYPE_F16 || mix->type_v != KVQ_TYPE_F16)
        fprintf(stderr, "; --compare f16,%s measures an F16 run beside it", mix->name);
    fprintf(stderr, "\n");
}

/* What the process holds besides the KV cache, and the kernel's count of its peak: resident = the weights (their
 * pages of the mapped GGUF) + KV + buffers + the program itself. */
static void footer_memory(const kvq_cli_opts *o, const kvq_cli_loaded *L) {
    const llama_config *mc = L->cfg;
    double buffers = (double)llama_ctx_scratch_bytes(mc, o->batch) + (double)mc->vocab_size * (sizeof(float) + sizeof(kvq_cli_prob));
    char w[32], f[32], b[32], rss[32] = "?";
    kvq_cli_fmt_bytes(L->weight_bytes, w, sizeof w);
    kvq_cli_fmt_bytes((double)L->gf->size, f, sizeof f);
    kvq_cli_fmt_bytes(buffers, b, sizeof b);
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) == 0) kvq_cli_fmt_bytes((double)ru.ru_maxrss * 1024.0, rss, sizeof rss);
    if (o->gpu) /* the weights and the KV cache live on the device: the host holds the mapping it read them from */
        fprintf(stderr, "memory: weights %s (fp16 on the GPU, from the %s GGUF); host peak resident set %s\n", w, f, rss);
    else
        fprintf(stderr, "memory: weights %s (quantized as in the %s GGUF, mapped; fp32 norms) + buffers %s + the KV cache "
                        "above; peak resident set %s\n", w, f, b, rss);
}

static void footer_compare(const kvq_cli_opts *o, size_t n_prompt, const run_result *rs, int nr) {
    int base = 0;
    for (int i = 0; i < nr; i++)
        if (o->compare[i].type_k == KVQ_TYPE_F16 && o->compare[i].type_v == KVQ_TYPE_F16) {
            base = i;
            break;
        }
    fprintf(stderr, "\n--- kvq run --compare: %zu prompt tokens, at most %d generated, %s\n", n_prompt, o->n_predict,
            o->temp <= 0 ? "greedy (--temp 0)" : "sampled with the same seed");
    fprintf(stderr, "| KV (K/V)     | tokens | resident KV (pages + windows)      | vs %-6s | prefill tok/s | decode tok/s | answer vs %-6s |\n",
            o->compare[base].name, o->compare[base].name);
    fprintf(stderr, "|--------------|--------|------------------------------------|-----------|---------------|--------------|------------------|\n");
    for (int i = 0; i < nr; i++) {
        const run_result *r = &rs[i];
        char tot[32], pg[32], win[32], same[48];
        kvq_cli_fmt_bytes(resident(&r->stats), tot, sizeof tot);
        kvq_cli_fmt_bytes((double)r->stats.page_bytes_in_use, pg, sizeof pg);
        kvq_cli_fmt_bytes((double)r->stats.window_bytes, win, sizeof win);
        char parts[72];
        snprintf(parts, sizeof parts, "(%s + %s)", pg, win);
        const tok_ids *a = &rs[base].gen, *b = &r->gen;
        size_t k = 0;
        while (k < a->n && k < b->n && a->ids[k] == b->ids[k]) k++;
        if (i == base) snprintf(same, sizeof same, "(baseline)");
        else if (k == a->n && k == b->n) snprintf(same, sizeof same, "identical");
        else snprintf(same, sizeof same, "same first %zu tok", k);
        double rb = resident(&rs[base].stats);
        fprintf(stderr, "| %-12s | %6lld | %10s %-23s | %8.3fx | %13.1f | %12.1f | %-16s |\n", o->compare[i].name,
                (long long)r->tokens, tot, parts, rb > 0 ? resident(&r->stats) / rb : 0.0,
                r->prefill_s > 0 ? (double)n_prompt / r->prefill_s : 0.0, r->decoded > 0 ? r->decoded / r->decode_s : 0.0,
                same);
    }
    for (int i = 0; i < nr; i++)
        if (i != base && resident(&rs[i].stats) > 0)
        {
            double q = resident(&rs[base].stats) / resident(&rs[i].stats);
            fprintf(stderr, "%s: resident KV %.2fx %s than %s's\n", o->compare[i].name, q >= 1 ? q : 1 / q,
                    q >= 1 ? "smaller" : "larger", o->compare[base].name);
        }
}

int kvq_cli_run(int argc, char **argv) {
    kvq_cli_opts o;
    int r = kvq_cli_parse_or_exit(KVQ_CLI_RUN, argc, argv, &o);
    if (r >= 0) return r;
    char err[KVQ_CLI_ERR_LEN];
    char *text = NULL;
    size_t tlen = 0;
    if (o.file) {
        if (!(text = kvq_cli_read_file(o.file, o.max_file, &tlen, err, sizeof err))) {
            fprintf(stderr, "kvq run: -f: %s\n", err);
            return 1;
        }
        const char *nul = memchr(text, '\0', tlen);
        if (nul) {
            fprintf(stderr, "kvq run: -f: '%s' has a NUL byte at offset %zu: not a text prompt\n", o.file, (size_t)(nul - text));
            free(text);
            return 1;
        }
    }
    const char *ptext = text ? text : o.prompt;
    if (!text) tlen = strlen(o.prompt);

    kvq_cli_loaded L;
    tok_ids prompt = {0}, hist = {0};
    float *logits = NULL;
    kvq_cli_prob *scratch = NULL;
    run_result rs[KVQ_CLI_MAX_COMPARE];
    memset(rs, 0, sizeof rs);
    int rc = 0, nr = 0;
    if (kvq_cli_load(&o, &L, 1)) {
        free(text);
        return 1;
    }
    kvq_status st = KVQ_OK;
    if (tok_add_bos(L.tok) && tok_bos(L.tok) >= 0) st = tok_ids_push(&prompt, tok_bos(L.tok));
    if (!st) st = o.chat ? tok_encode_chat(L.tok, o.system, ptext, &prompt) : tok_encode(L.tok, ptext, tlen, 1, &prompt);
    if (st) {
        rc = kvq_cli_die(KVQ_CLI_RUN, "tokenizing the prompt", st);
        goto done;
    }
    if (prompt.n == 0) {
        fprintf(stderr, "kvq run: the prompt is empty\n");
        rc = 2;
        goto done;
    }
    int64_t want = o.ctx ? o.ctx : (int64_t)prompt.n + o.n_predict;
    if (!o.ctx && want > L.cfg->ctx_len && (int64_t)prompt.n < L.cfg->ctx_len) {
        /* The default reservation stops at the trained context (-c reserves more, with a warning): -n 1048576 must
         * not reserve a 22 GiB arena for a model trained on 8192 tokens. */
        fprintf(stderr, "kvq run: prompt %zu + -n %d tokens is past the model's trained context_length %d: reserving %d "
                        "(generation stops there; -c N reserves more)\n", prompt.n, o.n_predict, L.cfg->ctx_len,
                L.cfg->ctx_len);
        want = L.cfg->ctx_len;
    }
    if ((int64_t)prompt.n >= want) {
        fprintf(stderr, "kvq run: prompt of %zu tokens does not fit -c/--ctx-size %lld (it needs one more token)\n",
                prompt.n, (long long)want);
        rc = 2;
        goto done;
    }
    if (want > (1 << 22)) {
        fprintf(stderr, "kvq run: context of %lld tokens (prompt %zu + -n %d) is more than 4194304\n", (long long)want,
                prompt.n, o.n_predict);
        rc = 2;
        goto done;
    }
    int n_ctx = (int)want;
    if (n_ctx > L.cfg->ctx_len)
        fprintf(stderr, "kvq run: warning: context %d exceeds the model's trained context_length %d\n", n_ctx,
                L.cfg->ctx_len);
    kvq_cli_mix single = kvq_cli_single_mix(&o);
    const kvq_cli_mix *mixes = o.n_compare ? o.compare : &single;
    int n_mix = o.n_compare ? o.n_compare : 1;
    /* Every config is checked before anything runs: the library's reason for a bad one, and a context whose KV cache
     * cannot fit in this machine's memory at all (the arena is allocated up front). */
    double phys = kvq_cli_phys_mem();
    const llama_config *mc = L.cfg;
    for (int i = 0; i < n_mix; i++) {
        double pages, windows;
        /* A config the library rejects is reported by llama_ctx_create (the engine names the reason). */
        if (kvq_cli_model_kv_bytes(mc, &mixes[i], 1, n_ctx, o.batch, &pages, &windows)) continue;
        if (!o.gpu && phys > 0 && pages + windows + (double)L.weight_bytes > phys) { /* --gpu: the arena is on the device */
            char need[32], have[32];
            kvq_cli_fmt_bytes(pages + windows, need, sizeof need);
            kvq_cli_fmt_bytes(phys, have, sizeof have);
            fprintf(stderr, "kvq run: a %s KV cache of %d tokens needs %s, more than this machine's memory (%s) with the "
                            "weights: lower -c/-n or pick a smaller type (kvq capacity says what fits)\n",
                    mixes[i].name, n_ctx, need, have);
            rc = 1;
            goto done;
        }
    }
    int V = mc->vocab_size;
    logits = malloc((size_t)V * sizeof *logits);
    scratch = malloc((size_t)V * sizeof *scratch);
    if (!logits || !scratch) {
        rc = kvq_cli_die(KVQ_CLI_RUN, "allocating logits", kvq_set_error(KVQ_ERR_OUT_OF_MEMORY, "%d floats", V));
        goto done;
    }
    if (!o.n_compare && !o.chat) {
        fwrite(ptext, 1, tlen, stdout);
        fflush(stdout);
    }
    for (nr = 0; nr < n_mix; nr++) {
        if (o.n_compare) {
            printf("%s=== [%d/%d] %s: keys %s, values %s ===\n", nr ? "\n" : "", nr + 1, n_mix, mixes[nr].name,
                   kvq_cli_type_name(mixes[nr].type_k), kvq_cli_type_name(mixes[nr].type_v));
            fflush(stdout);
        }
        if ((rc = generate(&o, &L, &prompt, n_ctx, &mixes[nr], logits, scratch, &hist, &rs[nr]))) {
            nr++; /* its generated ids are freed below */
            goto done;
        }
    }
    if (o.n_compare) footer_compare(&o, prompt.n, rs, nr);
    else footer_one(&single, prompt.n, &rs[0]);
    footer_memory(&o, &L);
done:
    for (int i = 0; i < nr; i++) tok_ids_free(&rs[i].gen);
    free(logits);
    free(scratch);
    tok_ids_free(&hist);
    tok_ids_free(&prompt);
    kvq_cli_unload(&L);
    free(text);
    return rc;
}
