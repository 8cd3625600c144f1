/* kvq passkey: the pass-key retrieval test (Landmark Attention, Mohtashami & Jaggi 2023; LongLoRA's
 * passkey_retrivial.py): a 5-digit key hidden at a depth of repeated filler text, then the question; greedy decoding
 * of a few tokens; a trial passes when the key's digits are in the answer.
 *
 * The prompt of a (length, depth) cell is built from whole filler sentences: the most that fit in length - n_predict
 * tokens (measured by tokenizing the whole prompt, so it holds with --chat too), the key after round(depth% x count)
 * of them. The keys come from --seed and the cell's position in the grid, so every KV config sees the same prompts.
 * Each config has one context, sized for the longest length and reset between trials: one prefill per trial. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "gguf.h"
#include "llama.h"
#include "model_err.h"
#include "tokenizer.h"

static const char TASK[] = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                           "them. I will quiz you about the important information there.";
static const char *const FILLER[] = {"The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                                     "There and back again."};
#define N_FILLER 5
static const char QUESTION[] = "What is the pass key?";
static const char ANSWER_START[] = "The pass key is";

typedef struct sbuf {
    char *p;
    size_t n, cap;
} sbuf;

static int sb_add(sbuf *b, const char *s) {
    size_t l = strlen(s);
    if (b->n + l + 1 > b->cap) {
        size_t c = (b->cap ? b->cap * 2 : 4096) + l;
        char *q = realloc(b->p, c);
        if (!q) return -1;
        b->p = q;
        b->cap = c;
    }
    memcpy(b->p + b->n, s, l + 1);
    b->n += l;
    return 0;
}

/* The text of a prompt with `n_fill` filler sentences, the key after `at` of them (LongLoRA's layout: task, filler,
 * key line, filler, question, lines joined by newlines; the filler's sentences joined by spaces). Plain prompts end
 * with "The pass key is"; --chat asks the question in the user turn and starts the assistant's answer with it. */
static int build_text(sbuf *b, int n_fill, int at, const char *key, int chat) {
    b->n = 0;
    char info[128];
    snprintf(info, sizeof info, "The pass key is %s. Remember it. %s is the pass key.", key, key);
    if (sb_add(b, TASK)) return -1;
    for (int part = 0; part < 2; part++) {
        int lo = part ? at : 0, hi = part ? n_fill : at;
        if (hi > lo && sb_add(b, "\n")) return -1;
        for (int i = lo; i < hi; i++)
            if ((i > lo && sb_add(b, " ")) || sb_add(b, FILLER[i % N_FILLER])) return -1;
        if (!part && (sb_add(b, "\n") || sb_add(b, info))) return -1;
    }
    if (sb_add(b, "\n") || sb_add(b, QUESTION)) return -1;
    if (!chat && (sb_add(b, " ") || sb_add(b, ANSWER_START))) return -1;
    return 0;
}

static kvq_status encode(const kvq_cli_opts *o, const kvq_tokenizer *tok, const char *text, tok_ids *ids) {
    ids->n = 0;
    kvq_status st = KVQ_OK;
    if (tok_add_bos(tok) && tok_bos(tok) >= 0) st = tok_ids_push(ids, tok_bos(tok));
    if (st) return st;
    if (!o->chat) return tok_encode(tok, text, strlen(text), 0, ids);
    if ((st = tok_encode_chat(tok, o->system, text, ids))) return st;
    return tok_encode(tok, ANSWER_START, strlen(ANSWER_START), 0, ids);
}

/* The most filler sentences whose prompt fits in `budget` tokens (depth 50: the count barely depends on it). */
static kvq_status fit_filler(const kvq_cli_opts *o, const kvq_tokenizer *tok, int budget, int *n_fill, sbuf *b, tok_ids *ids) {
    kvq_status st;
    int lo = 0, hi = budget; /* a sentence is more than one token */
    if (build_text(b, 0, 0, "00000", o->chat)) return kvq_set_error(KVQ_ERR_OUT_OF_MEMORY, "prompt text");
    if ((st = encode(o, tok, b->p, ids))) return st;
    if ((int64_t)ids->n > budget) {
        *n_fill = -1;
        return KVQ_OK;
    }
    while (lo < hi) {
        int mid = lo + (hi - lo + 1) / 2;
        if (build_text(b, mid, mid / 2, "00000", o->chat)) return kvq_set_error(KVQ_ERR_OUT_OF_MEMORY, "prompt text");
        if ((st = encode(o, tok, b->p, ids))) return st;
        if ((int64_t)ids->n <= budget) lo = mid;
        else hi = mid - 1;
    }
    *n_fill = lo;
    return KVQ_OK;
}

static uint64_t mix64(uint64_t x) { /* splitmix64's finalizer */
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

int kvq_cli_passkey(int argc, char **argv) {
    kvq_cli_opts o;
    int r = kvq_cli_parse_or_exit(KVQ_CLI_PASSKEY, argc, argv, &o);
    if (r >= 0) return r;
    kvq_cli_loaded L;
    if (kvq_cli_load(&o, &L, 1)) return 1;
    int rc = 0, n_mix = 0, V = L.m->cfg.vocab_size, max_len = 0;
    int *n_fill = NULL, *passed = NULL;
    double *secs = NULL;
    float *logits = NULL;
    sbuf text = {0};
    tok_ids ids = {0};
    llama_ctx *c = NULL;
    FILE *csv = NULL;
    kvq_status st = KVQ_OK;
    kvq_cli_mix mixes[KVQ_CLI_MAX_COMPARE + 1];
    if (!o.n_compare) {
        mixes[n_mix++] = kvq_cli_single_mix(&o);
    } else {
        /* f16 first: where it fails, the model cannot do the task, whatever the cache */
        int f16 = -1;
        for (int i = 0; i < o.n_compare && f16 < 0; i++)
            if (o.compare[i].type_k == KVQ_TYPE_F16 && o.compare[i].type_v == KVQ_TYPE_F16) f16 = i;
        if (f16 < 0) {
            kvq_cli_opts f = o;
            f.type_k = f.type_v = KVQ_TYPE_F16;
            f.rotate = f.sinks = f.nonuniform = f.prerope = -1;
            mixes[n_mix++] = kvq_cli_single_mix(&f);
            fprintf(stderr, "kvq passkey: --compare has no f16 entry: running f16 first\n");
        } else {
            mixes[n_mix++] = o.compare[f16];
        }
        for (int i = 0; i < o.n_compare; i++)
            if (i != f16) mixes[n_mix++] = o.compare[i];
    }
    for (int i = 0; i < o.n_lengths; i++) {
        if (o.lengths[i] > L.m->cfg.ctx_len) {
            fprintf(stderr, "kvq passkey: --lengths %d exceeds the model's context_length %d\n", o.lengths[i],
                    L.m->cfg.ctx_len);
            rc = 2;
            goto done;
        }
        if (o.lengths[i] > max_len) max_len = o.lengths[i];
    }
    int NL = o.n_lengths, ND = o.n_depths, T = o.trials;
    n_fill = malloc((size_t)NL * sizeof *n_fill);
    passed = calloc((size_t)n_mix * NL * ND, sizeof *passed);
    secs = calloc((size_t)n_mix, sizeof *secs);
    logits = malloc((size_t)V * sizeof *logits);
    if (!n_fill || !passed || !secs || !logits) {
        rc = kvq_cli_die(KVQ_CLI_PASSKEY, "allocating", kvq_set_error(KVQ_ERR_OUT_OF_MEMORY, "%d floats", V));
        goto done;
    }
    for (int li = 0; li < NL; li++) {
        if ((st = fit_filler(&o, L.tok, o.lengths[li] - o.n_predict, &n_fill[li], &text, &ids))) {
            rc = kvq_cli_die(KVQ_CLI_PASSKEY, "tokenizing the prompt", st);
            goto done;
        }
        if (n_fill[li] < 1) {
            fprintf(stderr, "kvq passkey: --lengths %d: the task, key and question alone take more than %d tokens\n",
                    o.lengths[li], o.lengths[li] - o.n_predict);
            rc = 2;
            goto done;
        }
    }
    fprintf(stderr, "kvq passkey: %d lengths x %d depths x %d trial%s per config, %d answer tokens, %s prompts\n", NL, ND, T,
            T > 1 ? "s" : "", o.n_predict, o.chat ? "chat" : "plain");
    for (int m = 0; m < n_mix; m++) {
        llama_ctx_params cp;
        kvq_cli_ctx_params(&o, &mixes[m], max_len, &cp);
        if ((st = llama_ctx_create(L.m, &cp, &c))) {
            char what[KVQ_CLI_MIX_NAME + 64];
            snprintf(what, sizeof what, "creating the context of %s", mixes[m].name);
            rc = kvq_cli_die(KVQ_CLI_PASSKEY, what, st);
            goto done;
        }
        double t0 = kvq_cli_now();
        for (int li = 0; li < NL; li++)
            for (int di = 0; di < ND; di++) {
                double tc = kvq_cli_now();
                int *pass = &passed[((size_t)m * NL + li) * ND + di];
                for (int t = 0; t < T; t++) {
                    char key[8], answer[256];
                    uint64_t h = mix64(o.seed ^ mix64(((uint64_t)li << 40) ^ ((uint64_t)di << 20) ^ (uint64_t)t));
                    snprintf(key, sizeof key, "%05u", (unsigned)(10000 + h % 90000));
                    /* the depth moves a newline between sentences: a token more or less than fit_filler's count */
                    for (int nf = n_fill[li];; nf--) {
                        int at = (int)(((int64_t)o.depths[di] * nf + 50) / 100);
                        if (build_text(&text, nf, at, key, o.chat)) {
                            st = kvq_set_error(KVQ_ERR_OUT_OF_MEMORY, "prompt text");
                            goto fail;
                        }
                        if ((st = encode(&o, L.tok, text.p, &ids))) goto fail;
                        if ((int64_t)ids.n + o.n_predict <= o.lengths[li] || nf == 0) break;
                    }
                    if ((st = llama_ctx_reset(c))) goto fail;
                    for (size_t i = 0; i < ids.n; i += (size_t)o.batch) {
                        int nb = (int)(ids.n - i < (size_t)o.batch ? ids.n - i : (size_t)o.batch);
                        /* logits of the last prompt token only */
                        if ((st = llama_forward(c, ids.ids + i, nb, logits, i + (size_t)nb == ids.n ? nb - 1 : nb))) goto fail;
                    }
                    size_t an = 0;
                    answer[0] = '\0';
                    for (int g = 0; g < o.n_predict; g++) {
                        int32_t best = 0;
                        for (int v = 1; v < V; v++)
                            if (logits[v] > logits[best]) best = v;
                        if (tok_is_eog(L.tok, best)) break;
                        size_t pl;
                        const char *piece = tok_piece(L.tok, best, &pl);
                        if (!tok_is_control(L.tok, best) && an + pl < sizeof answer) {
                            memcpy(answer + an, piece, pl);
                            answer[an += pl] = '\0';
                        }
                        if (g + 1 < o.n_predict && (st = llama_forward(c, &best, 1, logits, 0))) goto fail;
                    }
                    int ok = strstr(answer, key) != NULL;
                    *pass += ok;
                    if (!o.quiet && !ok) {
                        for (char *q = answer; *q; q++)
                            if (*q == '\n') *q = ' ';
                        fprintf(stderr, "  %s: length %d depth %d%%: key %s, answer '%s'\n", mixes[m].name, o.lengths[li],
                                o.depths[di], key, answer);
                    }
                }
                if (!o.quiet)
                    fprintf(stderr, "kvq passkey: %s length %d depth %d%%: %d/%d in %.1f s (%zu prompt tokens)\n",
                            mixes[m].name, o.lengths[li], o.depths[di], *pass, T, kvq_cli_now() - tc, ids.n);
            }
        secs[m] = kvq_cli_now() - t0;
        llama_ctx_free(c);
        c = NULL;
    }
    for (int m = 0; m < n_mix; m++) {
        int tot = 0;
        for (int i = 0; i < NL * ND; i++) tot += passed[(size_t)m * NL * ND + i];
        printf("%sKV %s: passed/trials by depth (rows) and length in tokens (columns); %d/%d in all, %.1f s per cell\n",
               m ? "\n" : "", mixes[m].name, tot, NL * ND * T, secs[m] / (NL * ND));
        printf("| depth |");
        for (int li = 0; li < NL; li++) printf(" %7d |", o.lengths[li]);
        printf("\n|-------|");
        for (int li = 0; li < NL; li++) printf("---------|");
        printf("\n");
        for (int di = 0; di < ND; di++) {
            printf("| %4d%% |", o.depths[di]);
            for (int li = 0; li < NL; li++) {
                char cell[24];
                snprintf(cell, sizeof cell, "%d/%d", passed[((size_t)m * NL + li) * ND + di], T);
                printf(" %7s |", cell);
            }
            printf("\n");
        }
    }
    if (mixes[0].type_k == KVQ_TYPE_F16 && mixes[0].type_v == KVQ_TYPE_F16 && n_mix > 1)
        printf("\nnote: a cell that %s fails is beyond the model itself: it says nothing about quantization there.\n",
               mixes[0].name);
    if (o.csv) {
        if (!(csv = fopen(o.csv, "w"))) {
            perror(o.csv);
            fprintf(stderr, "kvq passkey: --csv: cannot write '%s'\n", o.csv);
            rc = 1;
            goto done;
        }
        fprintf(csv, "kv,length,depth_pct,trials,passed\n");
        for (int m = 0; m < n_mix; m++)
            for (int li = 0; li < NL; li++)
                for (int di = 0; di < ND; di++)
                    fprintf(csv, "%s,%d,%d,%d,%d\n", mixes[m].name, o.lengths[li], o.depths[di], T,
                            passed[((size_t)m * NL + li) * ND + di]);
        int bad = fclose(csv);
        csv = NULL;
        if (bad) {
            fprintf(stderr, "kvq passkey: --csv: writing '%s' failed\n", o.csv);
            rc = 1;
        }
    }
    goto done;
fail:
    rc = kvq_cli_die(KVQ_CLI_PASSKEY, "passkey", st);
done:
    llama_ctx_free(c);
    free(n_fill);
    free(passed);
    free(secs);
    free(logits);
    free(text.p);
    tok_ids_free(&ids);
    kvq_cli_unload(&L);
    return rc;
}
