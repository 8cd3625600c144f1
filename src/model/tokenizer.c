#include "tokenizer.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model_err.h"
#include "unicode_tables.h"

/* ----------------------------------------------------------------------------------------------------------
 * Small open-addressing hash tables: vocab string -> id, and (left id, right id) -> (rank, merged id).
 * -------------------------------------------------------------------------------------------------------- */
static uint64_t fnv1a(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

typedef struct pair_slot {
    uint64_t key; /* (a << 32 | b) + 1; 0 = empty */
    int32_t rank, merged;
} pair_slot;

struct kvq_tokenizer {
    int32_t n_vocab;
    gguf_str *tokens;   /* byte-level spellings, pointing into the GGUF file */
    int32_t *types;     /* tokenizer.ggml.token_type (1 normal, 3 control, 4 user defined, 6 byte) */
    char **pieces;      /* decoded bytes of each token */
    size_t *piece_len;
    int32_t *vocab_tab; /* hash table of ids, size vocab_cap, -1 = empty */
    size_t vocab_cap;
    pair_slot *pairs;
    size_t pairs_cap;
    int32_t byte_id[256]; /* id of the single-symbol token for each byte; -1: none (the byte is dropped) */
    int32_t *specials;    /* ids matched whole in text (control and user-defined): by first byte, longest first */
    int n_specials;
    /* Specials are found by length: at a text position starting with byte b, each length in
     * spec_lens[spec_len_first[b] .. spec_len_first[b + 1]) (the lengths of the specials starting with b, longest
     * first) is looked up in the vocabulary: a few hash lookups per position, however many specials share a first
     * byte (Gemma has 6000+ starting with '<'). */
    int32_t *spec_lens;
    int spec_len_first[257];
    uint8_t *spec_mark;   /* [n_vocab]: 1 for the ids in specials */
    int32_t bos, eos, im_start, im_end, endoftext;
    int32_t start_turn, end_turn; /* Gemma's <start_of_turn>, <end_of_turn>; -1: none */
    int32_t unk;
    int add_bos;
    int digits_split; /* pre-tokenizer cuts \p{N} into single code points first */
    int spm;          /* tokenizer.ggml.model "llama": SentencePiece-style BPE (see tok_load_spm) */
    int space_prefix; /* spm: "▁" before the text (tokenizer.ggml.add_space_prefix) */
    char *respelled;  /* spm: storage of the spellings tok_load_spm rewrote (space runs as U+2581 runs) */
};

static int32_t vocab_find(const kvq_tokenizer *t, const char *s, size_t n) {
    if (n == 0) return -1;
    size_t mask = t->vocab_cap - 1;
    for (size_t i = fnv1a(s, n) & mask;; i = (i + 1) & mask) {
        int32_t id = t->vocab_tab[i];
        if (id < 0) return -1;
        if (t->tokens[id].len == n && memcmp(t->tokens[id].ptr, s, n) == 0) return id;
    }
}

static const pair_slot *pair_find(const kvq_tokenizer *t, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    size_t mask = t->pairs_cap - 1;
    for (size_t i = mix64(key) & mask;; i = (i + 1) & mask) {
        if (t->pairs[i].key == 0) return NULL;
        if (t->pairs[i].key == key) return &t->pairs[i];
    }
}

/* ----------------------------------------------------------------------------------------------------------
 * GPT-2's byte <-> symbol map: printable Latin-1 bytes stand for themselves, the other 68 bytes are moved to
 * U+0100.. in byte order, so that every byte has a visible, non-space symbol.
 * -------------------------------------------------------------------------------------------------------- */
static int byte_is_printable(int b) { return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255); }

static void byte_symbols(uint32_t sym[256]) {
    int extra = 0;
    for (int b = 0; b < 256; b++) sym[b] = byte_is_printable(b) ? (uint32_t)b : (uint32_t)(256 + extra++);
}

static int utf8_put(uint32_t cp, char *out) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xC0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    out[0] = (char)(0xE0 | (cp >> 12));
    out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
}

/* Decodes one code point at s[0..n); invalid or truncated sequences give the lone byte as a code point in the
 * U+DC80.. range (never a letter, number or space) and length 1. */
static int utf8_next(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned c = s[0];
    int len;
    uint32_t v;
    if (c < 0x80) { *cp = c; return 1; }
    if ((c & 0xE0) == 0xC0) { len = 2; v = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; v = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; v = c & 0x07; }
    else goto bad;
    if ((size_t)len > n) goto bad;
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) goto bad;
        v = v << 6 | (s[i] & 0x3F);
    }
    if ((len == 2 && v < 0x80) || (len == 3 && v < 0x800) || (len == 4 && (v < 0x10000 || v > 0x10FFFF)) ||
        (v >= 0xD800 && v <= 0xDFFF))
        goto bad;
    *cp = v;
    return len;
bad:
    *cp = 0xDC00 | c;
    return 1;
}

static bool in_ranges(const uint32_t (*r)[2], size_t n, uint32_t cp) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < r[mid][0]) hi = mid;
        else if (cp > r[mid][1]) lo = mid + 1;
        else return true;
    }
    return false;
}

static bool is_letter(uint32_t cp) {
    if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
    return in_ranges(kvq_uni_letter, sizeof kvq_uni_letter / sizeof kvq_uni_letter[0], cp);
}

static bool is_number(uint32_t cp) {
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    return in_ranges(kvq_uni_number, sizeof kvq_uni_number / sizeof kvq_uni_number[0], cp);
}

/* Unicode White_Space, which is what \s matches in the regex engines of HF tokenizers. */
static bool is_space(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
           cp == 0x3000;
}

/* ----------------------------------------------------------------------------------------------------------
 * Loading
 * -------------------------------------------------------------------------------------------------------- */
void tok_free(kvq_tokenizer *t) {
    if (!t) return;
    if (t->pieces)
        for (int32_t i = 0; i < t->n_vocab; i++) free(t->pieces[i]);
    free(t->pieces);
    free(t->piece_len);
    free(t->tokens);
    free(t->types);
    free(t->vocab_tab);
    free(t->pairs);
    free(t->specials);
    free(t->spec_lens);
    free(t->spec_mark);
    free(t->respelled);
    free(t);
}

static size_t pow2_at_least(size_t n) {
    size_t c = 1;
    while (c < n) c <<= 1;
    return c;
}

/* Maps a byte-level spelling back to bytes; returns the byte count, or -1 if a symbol is not in the map. */
static long unmap_symbols(const gguf_str *s, const int16_t *sym_to_byte, char *out) {
    size_t i = 0;
    long n = 0;
    while (i < s->len) {
        uint32_t cp;
        i += (size_t)utf8_next((const unsigned char *)s->ptr + i, s->len - i, &cp);
        if (cp >= 324 || sym_to_byte[cp] < 0) return -1;
        out[n++] = (char)sym_to_byte[cp];
    }
    return n;
}

static const kvq_tokenizer *g_sort_ctx; /* qsort has no context argument in C17 */
static int cmp_special(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint8_t fx = (uint8_t)g_sort_ctx->tokens[x].ptr[0], fy = (uint8_t)g_sort_ctx->tokens[y].ptr[0];
    if (fx != fy) return fx < fy ? -1 : 1;
    uint64_t lx = g_sort_ctx->tokens[x].len, ly = g_sort_ctx->tokens[y].len;
    return lx < ly ? 1 : lx > ly ? -1 : (x > y) - (x < y);
}

/* Sorts the specials by first byte, longest first, and makes the per-first-byte length lists (see the struct). */
static kvq_status finish_specials(kvq_tokenizer *t) {
    g_sort_ctx = t;
    qsort(t->specials, (size_t)t->n_specials, sizeof *t->specials, cmp_special);
    t->spec_lens = malloc((size_t)(t->n_specials ? t->n_specials : 1) * sizeof *t->spec_lens);
    t->spec_mark = calloc((size_t)t->n_vocab, 1);
    if (!t->spec_lens || !t->spec_mark) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
    int n_lens = 0;
    for (int b = 0, k = 0; b < 256; b++) {
        t->spec_len_first[b] = n_lens;
        for (; k < t->n_specials && (uint8_t)t->tokens[t->specials[k]].ptr[0] == b; k++) {
            int32_t id = t->specials[k], len = (int32_t)t->tokens[id].len;
            t->spec_mark[id] = 1;
            if (n_lens == t->spec_len_first[b] || t->spec_lens[n_lens - 1] != len) t->spec_lens[n_lens++] = len;
        }
    }
    t->spec_len_first[256] = n_lens;
    return KVQ_OK;
}

/* Inserts (a, b) -> merged with rank r unless the pair is there already (the first, best rank wins). */
static void pair_insert(kvq_tokenizer *t, int32_t a, int32_t b, int32_t r, int32_t merged) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    size_t mask = t->pairs_cap - 1, j = mix64(key) & mask;
    while (t->pairs[j].key != 0 && t->pairs[j].key != key) j = (j + 1) & mask;
    if (t->pairs[j].key == 0) {
        t->pairs[j].key = key;
        t->pairs[j].rank = r;
        t->pairs[j].merged = merged;
    }
}

/* Adds vocabulary entry i to the hash table; a spelling seen before now names i (the last one wins, as a Python dict
 * built over the vocabulary in order: transformers' rule, which the spm tokenizer follows). */
static void vocab_insert_last(kvq_tokenizer *t, int32_t i) {
    const gguf_str *s = &t->tokens[i];
    if (s->len == 0) return;
    size_t mask = t->vocab_cap - 1, j = fnv1a(s->ptr, s->len) & mask;
    for (; t->vocab_tab[j] >= 0; j = (j + 1) & mask) {
        const gguf_str *o = &t->tokens[t->vocab_tab[j]];
        if (o->len == s->len && memcmp(o->ptr, s->ptr, s->len) == 0) break;
    }
    t->vocab_tab[j] = i;
}

/* Merges "A B" of the file -> rank, in file order. */
static kvq_status add_file_merges(kvq_tokenizer *t, const gguf_kv *kmerge) {
    kvq_status st = KVQ_OK;
    uint64_t nm = kmerge->v.arr.n;
    gguf_str *merges = calloc(nm ? nm : 1, sizeof *merges);
    if (!merges) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
    if ((st = gguf_arr_strings(kmerge, merges))) {
        free(merges);
        return st;
    }
    t->pairs_cap = pow2_at_least((size_t)nm * 2 + 2);
    t->pairs = calloc(t->pairs_cap, sizeof *t->pairs);
    if (!t->pairs) {
        free(merges);
        return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
    }
    char *buf = NULL;
    size_t buf_cap = 0;
    for (uint64_t r = 0; r < nm; r++) {
        const gguf_str *m = &merges[r];
        const char *sp = memchr(m->ptr, ' ', m->len);
        if (!sp || sp == m->ptr || (size_t)(sp - m->ptr) + 1 >= m->len) {
            st = kvqm_fail(KVQ_ERR_FORMAT, "tokenizer: merge %llu is not 'A B'", (unsigned long long)r);
            break;
        }
        size_t la = (size_t)(sp - m->ptr), lb = m->len - la - 1;
        int32_t a = vocab_find(t, m->ptr, la), b = vocab_find(t, sp + 1, lb);
        if (buf_cap < la + lb) {
            free(buf);
            buf_cap = (la + lb) * 2;
            if (!(buf = malloc(buf_cap))) {
                st = kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
                break;
            }
        }
        memcpy(buf, m->ptr, la);
        memcpy(buf + la, sp + 1, lb);
        int32_t ab = vocab_find(t, buf, la + lb);
        if (a < 0 || b < 0 || ab < 0) continue; /* a merge whose parts are not tokens can never apply */
        pair_insert(t, a, b, (int32_t)r, ab); /* keeps the first (best) rank of a duplicate merge */
    }
    free(buf);
    free(merges);
    return st;
}

typedef struct spm_merge {
    double score;     /* of the merged token: higher merges first */
    int32_t len_l, len_r; /* code points of the two parts: longer first on equal scores */
    int32_t a, b, ab;
    int64_t order;    /* generation order: the tie-break of a stable sort */
} spm_merge;

static int cmp_spm_merge(const void *x, const void *y) {
    const spm_merge *p = x, *q = y;
    if (p->score != q->score) return p->score > q->score ? -1 : 1;
    if (p->len_l != q->len_l) return p->len_l > q->len_l ? -1 : 1;
    if (p->len_r != q->len_r) return p->len_r > q->len_r ? -1 : 1;
    return (p->order > q->order) - (p->order < q->order);
}

static int32_t utf8_count(const char *s, size_t n) {
    int32_t c = 0;
    for (size_t i = 0; i < n; c++) {
        uint32_t cp;
        i += (size_t)utf8_next((const unsigned char *)s + i, n - i, &cp);
    }
    return c;
}

/* SentencePiece-style BPE (tokenizer.ggml.model "llama": Gemma, Llama 2, Mistral v0.1). The reference is what
 * transformers builds from the same GGUF (integrations/gguf/gguf_tokenizer_mapping.py), checked id for id on the
 * whole dev corpus with Gemma 3 (tests/data/make_golden.py --model gemma3):
 *   - control (type 3) and user-defined (type 4) tokens are matched whole in the raw text, leftmost-longest, before
 *     anything else; user-defined always, control only with parse_special;
 *   - a token made only of whitespace with a space in it ("  ": Gemma stores its space runs as real spaces) is
 *     respelled as that many U+2581 "▁" and is an ordinary vocabulary entry, not matched whole;
 *   - the text between matches: ' ' -> "▁" ("▁" prepended first when tokenizer.ggml.add_space_prefix says so),
 *     one symbol per code point, a code point the vocabulary lacks becomes its UTF-8 bytes as <0xNN> tokens (byte
 *     fallback; <unk> where even that is missing), then BPE merges, lowest rank first, leftmost on ties;
 *   - the file has no merges: every split l + r of a token with both parts in the vocabulary is one, ranked by the
 *     token's score (Gemma: by its position in the file, earlier first: its scores do not follow its merge order,
 *     as transformers found), then longer l first. Merges in the file (tokenizer.ggml.merges) are used instead
 *     when present. */
static kvq_status tok_load_spm(const gguf_file *f, kvq_tokenizer **out) {
    const gguf_kv *ktok = gguf_find_kv(f, "tokenizer.ggml.tokens");
    const gguf_kv *kscore = gguf_find_kv(f, "tokenizer.ggml.scores");
    const gguf_kv *ktype = gguf_find_kv(f, "tokenizer.ggml.token_type");
    const gguf_kv *kmerge = gguf_find_kv(f, "tokenizer.ggml.merges");
    if (!ktok || ktok->type != GGUF_ARRAY || ktok->v.arr.type != GGUF_STRING || ktok->v.arr.n == 0 ||
        ktok->v.arr.n > (1u << 24))
        return kvqm_fail(KVQ_ERR_FORMAT, "tokenizer: tokenizer.ggml.tokens missing or not a string array of 1..2^24");
    if (ktype && (ktype->type != GGUF_ARRAY || gguf_vtype_size(ktype->v.arr.type) == 0 || ktype->v.arr.n != ktok->v.arr.n))
        return kvqm_fail(KVQ_ERR_FORMAT, "tokenizer: tokenizer.ggml.token_type must be a numeric array of n_vocab entries");
    if (kscore && (kscore->type != GGUF_ARRAY || gguf_vtype_size(kscore->v.arr.type) == 0 || kscore->v.arr.n != ktok->v.arr.n))
        return kvqm_fail(KVQ_ERR_FORMAT, "tokenizer: tokenizer.ggml.scores must be a numeric array of n_vocab entries");
    if (kmerge && (kmerge->type != GGUF_ARRAY || kmerge->v.arr.type != GGUF_STRING))
        return kvqm_fail(KVQ_ERR_FORMAT, "tokenizer: tokenizer.ggml.merges is not a string array");
    gguf_str arch = gguf_get_str(f, "general.architecture");
    int by_position = !kscore || (arch.ptr && arch.len >= 5 && memcmp(arch.ptr, "gemma", 5) == 0);

    kvq_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
    t->spm = 1;
    kvq_status st = KVQ_OK;
    spm_merge *mg = NULL;
    gguf_str *orig = NULL;
    int32_t n = t->n_vocab = (int32_t)ktok->v.arr.n;
    t->tokens = calloc((size_t)n, sizeof *t->tokens);
    orig = calloc((size_t)n, sizeof *orig);
    t->types = calloc((size_t)n, sizeof *t->types);
    t->pieces = calloc((size_t)n, sizeof *t->pieces);
    t->piece_len = calloc((size_t)n, sizeof *t->piece_len);
    t->vocab_cap = pow2_at_least((size_t)n * 2);
    t->vocab_tab = malloc(t->vocab_cap * sizeof *t->vocab_tab);
    t->specials = calloc((size_t)n, sizeof *t->specials);
    if (!t->tokens || !orig || !t->types || !t->pieces || !t->piece_len || !t->vocab_tab || !t->specials) goto oom;
    if ((st = gguf_arr_strings(ktok, orig))) goto fail;
    /* Respelled space runs: 3 bytes of "▁" per code point, in one buffer. */
    size_t resp_bytes = 0;
    for (int32_t i = 0; i < n; i++) {
        bool ws = orig[i].len > 0, has_sp = false;
        for (uint64_t k = 0; k < orig[i].len && ws; k++) {
            uint8_t c = (uint8_t)orig[i].ptr[k];
            ws = c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F);
            has_sp |= c == ' ';
        }
        if (ws && has_sp) resp_bytes += 3 * orig[i].len;
    }
    if (resp_bytes && !(t->respelled = malloc(resp_bytes))) goto oom;
    size_t resp_at = 0;
    for (int32_t i = 0; i < n; i++) {
        t->types[i] = ktype ? (int32_t)gguf_arr_i64(ktype, (uint64_t)i) : 1;
        t->tokens[i] = orig[i];
        bool ws = orig[i].len > 0, has_sp = false;
        for (uint64_t k = 0; k < orig[i].len && ws; k++) {
            uint8_t c = (uint8_t)orig[i].ptr[k];
            ws = c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F);
            has_sp |= c == ' ';
        }
        if (ws && has_sp) {
            char *p = t->respelled + resp_at;
            for (uint64_t k = 0; k < orig[i].len; k++) memcpy(p + 3 * k, "\xE2\x96\x81", 3);
            t->tokens[i] = (gguf_str){p, 3 * orig[i].len};
            resp_at += 3 * orig[i].len;
        }
    }
    for (size_t i = 0; i < t->vocab_cap; i++) t->vocab_tab[i] = -1;
    for (int32_t i = 0; i < n; i++) vocab_insert_last(t, i);

    /* Byte fallback tokens <0xNN>, and the pieces (what a token decodes to: "▁" -> ' ', <0xNN> -> its byte). */
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_id[b] = vocab_find(t, name, 6);
    }
    for (int32_t i = 0; i < n; i++) {
        const gguf_str *s = &orig[i];
        char *p = t->pieces[i] = malloc(s->len + 1);
        if (!p) goto oom;
        size_t l = 0;
        if (t->types[i] == 6 && s->len == 6 && memcmp(s->ptr, "<0x", 3) == 0 && t->byte_id[strtol(s->ptr + 3, NULL, 16) & 255] == i) {
            p[l++] = (char)strtol(s->ptr + 3, NULL, 16);
        } else {
            for (uint64_t k = 0; k < s->len;) {
                if (t->types[i] != 3 && k + 3 <= s->len && memcmp(s->ptr + k, "\xE2\x96\x81", 3) == 0) {
                    p[l++] = ' ';
                    k += 3;
                } else {
                    p[l++] = s->ptr[k++];
                }
            }
        }
        p[l] = '\0';
        t->piece_len[i] = l;
        /* matched whole in the text: control tokens and the user-defined ones whose spelling was kept */
        if ((t->types[i] == 3 || t->types[i] == 4) && s->len > 0 && t->tokens[i].ptr == s->ptr && vocab_find(t, s->ptr, s->len) == i)
            t->specials[t->n_specials++] = i;
    }
    if ((st = finish_specials(t))) goto fail;

    if (kmerge) {
        if ((st = add_file_merges(t, kmerge))) goto fail;
    } else {
        /* Every split of every token into two vocabulary entries, then sorted into rank order. */
        size_t n_mg = 0, cap_mg = (size_t)n * 2 + 16;
        mg = malloc(cap_mg * sizeof *mg);
        if (!mg) goto oom;
        for (int32_t i = 0; i < n; i++) {
            const gguf_str *s = &t->tokens[i];
            if (vocab_find(t, s->ptr, s->len) != i) continue; /* a spelling named by a later entry */
            double score = by_position ? -(double)i : gguf_arr_f64(kscore, (uint64_t)i);
            int32_t len_all = utf8_count(s->ptr, s->len), len_l = 0;
            for (size_t k = 0; k < s->len;) {
                uint32_t cp;
                k += (size_t)utf8_next((const unsigned char *)s->ptr + k, s->len - k, &cp);
                len_l++;
                if (k >= s->len) break;
                int32_t a = vocab_find(t, s->ptr, k), b = vocab_find(t, s->ptr + k, s->len - k);
                if (a < 0 || b < 0) continue;
                if (n_mg == cap_mg) {
                    spm_merge *nm = realloc(mg, 2 * cap_mg * sizeof *mg);
                    if (!nm) goto oom;
                    mg = nm;
                    cap_mg *= 2;
                }
                mg[n_mg] = (spm_merge){score, len_l, len_all - len_l, a, b, i, (int64_t)n_mg};
                n_mg++;
            }
        }
        qsort(mg, n_mg, sizeof *mg, cmp_spm_merge);
        t->pairs_cap = pow2_at_least(n_mg * 2 + 2);
        if (n_mg > (size_t)INT32_MAX || !(t->pairs = calloc(t->pairs_cap, sizeof *t->pairs))) goto oom;
        for (size_t r = 0; r < n_mg; r++) pair_insert(t, mg[r].a, mg[r].b, (int32_t)r, mg[r].ab);
        free(mg);
        mg = NULL;
    }

    int64_t bos = gguf_get_i64_or(f, "tokenizer.ggml.bos_token_id", -1);
    int64_t eos = gguf_get_i64_or(f, "tokenizer.ggml.eos_token_id", -1);
    int64_t unk = gguf_get_i64_or(f, "tokenizer.ggml.unknown_token_id", -1);
    t->bos = bos >= 0 && bos < n ? (int32_t)bos : -1;
    t->eos = eos >= 0 && eos < n ? (int32_t)eos : -1;
    t->unk = unk >= 0 && unk < n ? (int32_t)unk : vocab_find(t, "<unk>", 5);
    const gguf_kv *kab = gguf_find_kv(f, "tokenizer.ggml.add_bos_token");
    /* llama.cpp and transformers add BOS to a SentencePiece vocabulary whose file does not say otherwise */
    t->add_bos = kab && kab->type == GGUF_BOOL ? (int)kab->v.u : 1;
    const gguf_kv *ksp = gguf_find_kv(f, "tokenizer.ggml.add_space_prefix");
    t->space_prefix = ksp && ksp->type == GGUF_BOOL ? (int)ksp->v.u : 0;
    t->im_start = vocab_find(t, "<|im_start|>", 12);
    t->im_end = vocab_find(t, "<|im_end|>", 10);
    t->endoftext = vocab_find(t, "<|endoftext|>", 13);
    t->start_turn = vocab_find(t, "<start_of_turn>", 15);
    t->end_turn = vocab_find(t, "<end_of_turn>", 13);
    free(orig);
    *out = t;
    return KVQ_OK;
oom:
    st = kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
fail:
    free(mg);
    free(orig);
    tok_free(t);
    return st;
}

kvq_status tok_load(const gguf_file *f, kvq_tokenizer **out) {
    if (!f || !out) return kvqm_fail(KVQ_ERR_NULL, "tok_load: NULL argument");
    *out = NULL;
    gguf_str model = gguf_get_str(f, "tokenizer.ggml.model");
    if (model.ptr && model.len == 5 && memcmp(model.ptr, "llama", 5) == 0) return tok_load_spm(f, out);
    if (!model.ptr || model.len != 4 || memcmp(model.ptr, "gpt2", 4) != 0)
        return kvqm_fail(KVQ_ERR_FORMAT,
                         "tokenizer: tokenizer.ggml.model is '%.*s'; supported: byte-level BPE ('gpt2'), SentencePiece-style BPE ('llama')",
                         model.ptr ? (int)(model.len > 32 ? 32 : model.len) : 0, model.ptr ? model.ptr : "");
    const gguf_kv *ktok = gguf_find_kv(f, "tokenizer.ggml.tokens");
    const gguf_kv *kmerge = gguf_find_kv(f, "tokenizer.ggml.merges");
    const gguf_kv *ktype = gguf_find_kv(f, "tokenizer.ggml.token_type");
    if (!ktok || ktok->type != GGUF_ARRAY || ktok->v.arr.type != GGUF_STRING || ktok->v.arr.n == 0 ||
        ktok->v.arr.n > (1u << 24))
        return kvqm_fail(KVQ_ERR_FORMAT, "tokenizer: tokenizer.ggml.tokens missing or not a string array of 1..2^24");
    if (!kmerge || kmerge->type != GGUF_ARRAY || kmerge->v.arr.type != GGUF_STRING)
        return kvqm_fail(KVQ_ERR_FORMAT, "tokenizer: tokenizer.ggml.merges missing or not a string array");
    if (ktype && (ktype->type != GGUF_ARRAY || gguf_vtype_size(ktype->v.arr.type) == 0 || ktype->v.arr.n != ktok->v.arr.n))
        return kvqm_fail(KVQ_ERR_FORMAT, "tokenizer: tokenizer.ggml.token_type must be a numeric array of n_vocab entries");

    kvq_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
    kvq_status st = KVQ_OK;
    int32_t n = t->n_vocab = (int32_t)ktok->v.arr.n;
    t->tokens = calloc((size_t)n, sizeof *t->tokens);
    t->types = calloc((size_t)n, sizeof *t->types);
    t->pieces = calloc((size_t)n, sizeof *t->pieces);
    t->piece_len = calloc((size_t)n, sizeof *t->piece_len);
    t->vocab_cap = pow2_at_least((size_t)n * 2);
    t->vocab_tab = malloc(t->vocab_cap * sizeof *t->vocab_tab);
    t->specials = calloc((size_t)n, sizeof *t->specials);
    if (!t->tokens || !t->types || !t->pieces || !t->piece_len || !t->vocab_tab || !t->specials) goto oom;
    if ((st = gguf_arr_strings(ktok, t->tokens))) goto fail;
    for (size_t i = 0; i < t->vocab_cap; i++) t->vocab_tab[i] = -1;
    for (int32_t i = 0; i < n; i++) {
        t->types[i] = ktype ? (int32_t)gguf_arr_i64(ktype, (uint64_t)i) : 1;
        if (vocab_find(t, t->tokens[i].ptr, t->tokens[i].len) >= 0) continue; /* first spelling wins */
        size_t mask = t->vocab_cap - 1, j = fnv1a(t->tokens[i].ptr, t->tokens[i].len) & mask;
        while (t->vocab_tab[j] >= 0) j = (j + 1) & mask;
        t->vocab_tab[j] = i;
    }

    /* Byte symbols: each byte's one-symbol token must exist, or some text could not be encoded. */
    uint32_t sym[256];
    int16_t sym_to_byte[324];
    byte_symbols(sym);
    for (int i = 0; i < 324; i++) sym_to_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        char buf[4];
        int l = utf8_put(sym[b], buf);
        sym_to_byte[sym[b]] = (int16_t)b;
        t->byte_id[b] = vocab_find(t, buf, (size_t)l);
    }
    /* Pieces: normal tokens map back to bytes; control/user-defined ones (or any not in the byte alphabet) are
     * their own text. */
    for (int32_t i = 0; i < n; i++) {
        const gguf_str *s = &t->tokens[i];
        t->pieces[i] = malloc(s->len + 1);
        if (!t->pieces[i]) goto oom;
        long l = t->types[i] == 3 || t->types[i] == 4 ? -1 : unmap_symbols(s, sym_to_byte, t->pieces[i]);
        if (l < 0) {
            memcpy(t->pieces[i], s->ptr, s->len);
            l = (long)s->len;
        }
        t->pieces[i][l] = '\0';
        t->piece_len[i] = (size_t)l;
        if ((t->types[i] == 3 || t->types[i] == 4) && s->len > 0) t->specials[t->n_specials++] = i;
    }
    if ((st = finish_specials(t))) goto fail;

    if ((st = add_file_merges(t, kmerge))) goto fail;

    int64_t bos = gguf_get_i64_or(f, "tokenizer.ggml.bos_token_id", -1);
    int64_t eos = gguf_get_i64_or(f, "tokenizer.ggml.eos_token_id", -1);
    t->bos = bos >= 0 && bos < n ? (int32_t)bos : -1;
    t->eos = eos >= 0 && eos < n ? (int32_t)eos : -1;
    const gguf_kv *kab = gguf_find_kv(f, "tokenizer.ggml.add_bos_token");
    t->add_bos = kab && kab->type == GGUF_BOOL ? (int)kab->v.u : 0;
    t->im_start = vocab_find(t, "<|im_start|>", 12);
    t->im_end = vocab_find(t, "<|im_end|>", 10);
    t->endoftext = vocab_find(t, "<|endoftext|>", 13);
    t->start_turn = t->end_turn = t->unk = -1;
    gguf_str pre = gguf_get_str(f, "tokenizer.ggml.pre");
    static const char *const digit_pres[] = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"};
    for (size_t i = 0; pre.ptr && i < sizeof digit_pres / sizeof digit_pres[0]; i++)
        if (pre.len == strlen(digit_pres[i]) && memcmp(pre.ptr, digit_pres[i], pre.len) == 0) t->digits_split = 1;
    *out = t;
    return KVQ_OK;
oom:
    st = kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
fail:
    tok_free(t);
    return st;
}

/* ----------------------------------------------------------------------------------------------------------
 * Encoding
 * -------------------------------------------------------------------------------------------------------- */
kvq_status tok_ids_push(tok_ids *v, int32_t id) {
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 256;
        int32_t *p = realloc(v->ids, cap * sizeof *p);
        if (!p) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
        v->ids = p;
        v->cap = cap;
    }
    v->ids[v->n++] = id;
    return KVQ_OK;
}

void tok_ids_free(tok_ids *v) {
    free(v->ids);
    v->ids = NULL;
    v->n = v->cap = 0;
}

/* BPE on one pre-token's bytes: start from one symbol per byte, then repeatedly merge the adjacent pair of lowest
 * rank, leftmost on ties, until no adjacent pair has a merge (HF tokenizers' and llama.cpp's rule).
 *
 * O(n log n) in the pre-token's length n, so a crafted text (one "word" of a million letters) cannot stall the
 * encoder: the symbols form a doubly linked list over their original byte positions, and a binary min-heap holds a
 * candidate (rank, left position) for every adjacent pair that has a merge. Each merge pushes at most two new
 * candidates (the merged symbol with its two neighbours), so the heap sees at most 3n pushes. Entries made stale by
 * a merge are not removed but skipped when popped: an entry is current iff its left symbol is alive, has a right
 * neighbour, and that pair's rank is the entry's rank (a rank names exactly one pair, and a merge always changes the
 * left symbol's id, so a stale entry never passes). Ordering the heap by (rank, left position) reproduces "lowest
 * rank, leftmost first", since positions keep their order along the list. */
typedef struct bpe_sym {
    int32_t id;         /* -1: merged into its left neighbour */
    int32_t prev, next; /* positions in the list; -1 at the ends */
} bpe_sym;

typedef struct bpe_cand {
    int32_t rank, left;
} bpe_cand;

/* Working memory of bpe_word, grown on demand and reused across pre-tokens of one tok_encode call. */
typedef struct bpe_work {
    bpe_sym *sym;
    bpe_cand *heap;
    size_t cap; /* symbols; the heap holds 3 * cap */
} bpe_work;

static bool cand_less(bpe_cand a, bpe_cand b) { return a.rank < b.rank || (a.rank == b.rank && a.left < b.left); }

static void heap_push(bpe_cand *h, size_t *n, bpe_cand c) {
    size_t i = (*n)++;
    while (i > 0 && cand_less(c, h[(i - 1) / 2])) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h[i] = c;
}

static bpe_cand heap_pop(bpe_cand *h, size_t *n) {
    bpe_cand top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && cand_less(h[c + 1], h[c])) c++;
        if (!cand_less(h[c], last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = last;
    return top;
}

/* Pushes the pair starting at position `left` if its two symbols have a merge. */
static void push_pair(const kvq_tokenizer *t, const bpe_sym *sym, int32_t left, bpe_cand *heap, size_t *nh) {
    if (left < 0 || sym[left].next < 0) return;
    const pair_slot *p = pair_find(t, sym[left].id, sym[sym[left].next].id);
    if (p) heap_push(heap, nh, (bpe_cand){p->rank, left});
}

/* Room for n symbols. */
static kvq_status bpe_reserve(bpe_work *w, size_t n) {
    if (n > (size_t)INT32_MAX / 4)
        return kvqm_fail(KVQ_ERR_INVALID_ARG, "tokenizer: one pre-token of %zu bytes (at most %d)", n, INT32_MAX / 4);
    if (n > w->cap) {
        size_t cap = n < 256 ? 256 : n;
        bpe_sym *sym = malloc(cap * sizeof *sym);
        bpe_cand *heap = malloc(3 * cap * sizeof *heap);
        if (!sym || !heap) {
            free(sym);
            free(heap);
            return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
        }
        free(w->sym);
        free(w->heap);
        w->sym = sym;
        w->heap = heap;
        w->cap = cap;
    }
    return KVQ_OK;
}

/* Appends symbol id to the list w->sym[0 .. *m). */
static void bpe_add(bpe_work *w, int32_t *m, int32_t id) {
    w->sym[*m] = (bpe_sym){id, *m - 1, -1};
    if (*m > 0) w->sym[*m - 1].next = *m;
    (*m)++;
}

/* Merges the m symbols of w->sym and appends the resulting ids. */
static kvq_status bpe_merge(const kvq_tokenizer *t, bpe_work *w, int32_t m, tok_ids *out) {
    bpe_sym *sym = w->sym;
    bpe_cand *heap = w->heap;
    size_t nh = 0;
    for (int32_t i = 0; i + 1 < m; i++) push_pair(t, sym, i, heap, &nh);
    while (nh > 0) {
        bpe_cand c = heap_pop(heap, &nh);
        bpe_sym *l = &sym[c.left];
        if (l->id < 0 || l->next < 0) continue;
        const pair_slot *p = pair_find(t, l->id, sym[l->next].id);
        if (!p || p->rank != c.rank) continue; /* stale: a merge changed this pair since it was pushed */
        int32_t r = l->next;
        l->id = p->merged;
        l->next = sym[r].next;
        if (l->next >= 0) sym[l->next].prev = c.left;
        sym[r].id = -1;
        push_pair(t, sym, l->prev, heap, &nh);
        push_pair(t, sym, c.left, heap, &nh);
    }
    for (int32_t i = 0; i >= 0 && i < m; i = sym[i].next) {
        kvq_status st = tok_ids_push(out, sym[i].id);
        if (st) return st;
    }
    return KVQ_OK;
}

static kvq_status bpe_word(const kvq_tokenizer *t, const unsigned char *s, size_t n, bpe_work *w, tok_ids *out) {
    kvq_status st = bpe_reserve(w, n);
    if (st) return st;
    int32_t m = 0;
    /* A byte with no token of its own is dropped, as HF's BPE does when the model has no unk token. */
    for (size_t i = 0; i < n; i++)
        if (t->byte_id[s[i]] >= 0) bpe_add(w, &m, t->byte_id[s[i]]);
    return bpe_merge(t, w, m, out);
}

/* SentencePiece-style: the text s[0..n) between special tokens as one word (tok_load_spm says how). */
static kvq_status encode_spm(const kvq_tokenizer *t, const unsigned char *s, size_t n, int at_start, tok_ids *out) {
    if (n == 0) return KVQ_OK;
    bpe_work w = {0};
    int prefix = t->space_prefix && at_start;
    kvq_status st = bpe_reserve(&w, n + 3 * (size_t)prefix);
    int32_t m = 0, space = vocab_find(t, "\xE2\x96\x81", 3);
    for (size_t i = 0; st == KVQ_OK && i < n + (size_t)prefix;) {
        /* one code point: "▁" for a space (and for the prefix), else its UTF-8 bytes (one byte when invalid) */
        const unsigned char *c;
        size_t cl;
        uint32_t cp = ' ';
        if (prefix && i == 0) {
            c = (const unsigned char *)" ", cl = 1;
        } else {
            size_t at = i - (size_t)prefix;
            c = s + at;
            cl = (size_t)utf8_next(s + at, n - at, &cp);
        }
        i += cl;
        int32_t id = cp == ' ' ? space : cp >= 0xD800 && cp <= 0xDFFF ? -1 : vocab_find(t, (const char *)c, cl);
        if (cp == ' ') c = (const unsigned char *)"\xE2\x96\x81", cl = 3;
        if (id >= 0) {
            bpe_add(&w, &m, id);
            continue;
        }
        /* byte fallback: a code point the vocabulary lacks is its bytes as <0xNN> tokens; <unk> (once for a run)
         * where one is missing, as HF's BPE with byte_fallback and fuse_unk */
        bool all = true;
        for (size_t k = 0; k < cl; k++) all = all && t->byte_id[c[k]] >= 0;
        if (all) {
            for (size_t k = 0; k < cl; k++) bpe_add(&w, &m, t->byte_id[c[k]]);
        } else if (t->unk >= 0 && (m == 0 || w.sym[m - 1].id != t->unk)) {
            bpe_add(&w, &m, t->unk);
        }
    }
    if (st == KVQ_OK) st = bpe_merge(t, &w, m, out);
    free(w.sym);
    free(w.heap);
    return st;
}

/* The GPT-2 regex on text[0..n): returns the byte length of the match at the start (always >= 1). */
static size_t gpt2_match(const unsigned char *s, size_t n) {
    uint32_t c, c2;
    int l = utf8_next(s, n, &c);
    if (c == '\'' && n >= 2) { /* 's 't 're 've 'm 'll 'd, case-sensitive */
        unsigned char a = s[1], b = n >= 3 ? s[2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
    size_t i = 0;
    uint32_t head = c;
    if (c == ' ' && n > 1) { /* optional leading space of ` ?X+` */
        utf8_next(s + 1, n - 1, &c2);
        if (!is_space(c2)) {
            i = 1;
            head = c2;
        }
    }
    if (!is_space(head)) {
        /* ` ?\p{L}+`, ` ?\p{N}+` or ` ?[^\s\p{L}\p{N}]+`: the class of the first char decides which. */
        int cls = is_letter(head) ? 0 : is_number(head) ? 1 : 2;
        while (i < n) {
            uint32_t d;
            int dl = utf8_next(s + i, n - i, &d);
            int dc = is_letter(d) ? 0 : is_number(d) ? 1 : is_space(d) ? 3 : 2;
            if (dc != cls) break;
            i += (size_t)dl;
        }
        return i;
    }
    /* Whitespace run [0, end): `\s+(?!\S)` takes all of it at the end of the text, else all but its last code
     * point (which then leads the next match); a single space before a non-space falls to `\s+`. */
    size_t end = 0, last = 0;
    while (end < n) {
        uint32_t d;
        int dl = utf8_next(s + end, n - end, &d);
        if (!is_space(d)) break;
        last = end;
        end += (size_t)dl;
    }
    (void)l;
    if (end == n || last == 0) return end;
    return last;
}

/* Pre-tokenizes and BPE-encodes a stretch of text with no special tokens in it. */
static kvq_status encode_plain(const kvq_tokenizer *t, const unsigned char *s, size_t n, tok_ids *out) {
    bpe_work w = {0};
    kvq_status st = KVQ_OK;
    size_t pos = 0;
    while (pos < n && st == KVQ_OK) {
        /* Piece [pos, pend): with digit splitting, one \p{N} code point or a run without any. */
        size_t pend = pos;
        if (t->digits_split) {
            uint32_t c;
            int l = utf8_next(s + pos, n - pos, &c);
            if (is_number(c)) pend = pos + (size_t)l;
            else
                while (pend < n) {
                    int l2 = utf8_next(s + pend, n - pend, &c);
                    if (is_number(c)) break;
                    pend += (size_t)l2;
                }
        } else {
            pend = n;
        }
        while (pos < pend && st == KVQ_OK) {
            size_t len = gpt2_match(s + pos, pend - pos);
            st = bpe_word(t, s + pos, len, &w, out);
            pos += len;
        }
    }
    free(w.sym);
    free(w.heap);
    return st;
}

kvq_status tok_encode(const kvq_tokenizer *t, const char *text, size_t len, int parse_special, tok_ids *out) {
    if (!t || (!text && len) || !out) return kvqm_fail(KVQ_ERR_NULL, "tok_encode: NULL argument");
    const unsigned char *s = (const unsigned char *)text;
    size_t start = 0, i = 0;
    kvq_status st;
    /* spm: user-defined tokens are matched whole in any mode (as llama.cpp and transformers do), control tokens
     * only with parse_special */
    while ((parse_special || t->spm) && i < len) {
        int32_t hit = -1;
        for (int k = t->spec_len_first[s[i]]; k < t->spec_len_first[s[i] + 1]; k++) { /* longest first */
            size_t l = (size_t)t->spec_lens[k];
            if (l > len - i) continue;
            int32_t id = vocab_find(t, (const char *)s + i, l);
            if (id < 0 || !t->spec_mark[id] || (!parse_special && t->types[id] == 3)) continue;
            hit = id;
            break;
        }
        if (hit < 0) {
            i++;
            continue;
        }
        st = t->spm ? encode_spm(t, s + start, i - start, start == 0, out) : encode_plain(t, s + start, i - start, out);
        if (st || (st = tok_ids_push(out, hit))) return st;
        i += t->tokens[hit].len;
        start = i;
    }
    return t->spm ? encode_spm(t, s + start, len - start, start == 0, out) : encode_plain(t, s + start, len - start, out);
}

kvq_status tok_encode_chat(const kvq_tokenizer *t, const char *system, const char *user, tok_ids *out) {
    if (!t || !user || !out) return kvqm_fail(KVQ_ERR_NULL, "tok_encode_chat: NULL argument");
    if (t->start_turn >= 0 && t->end_turn >= 0) {
        /* Gemma's turns (its chat template): no system role, a system prompt opens the user's turn */
        const char *parts[] = {"<start_of_turn>user\n", system ? system : "", system ? "\n\n" : "", user,
                               "<end_of_turn>\n<start_of_turn>model\n"};
        size_t total = 1;
        for (int i = 0; i < 5; i++) total += strlen(parts[i]);
        char *buf = malloc(total);
        if (!buf) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
        buf[0] = '\0';
        for (int i = 0; i < 5; i++) strcat(buf, parts[i]);
        kvq_status st = tok_encode(t, buf, strlen(buf), 1, out);
        free(buf);
        return st;
    }
    if (t->im_start < 0 || t->im_end < 0)
        return kvqm_fail(KVQ_ERR_FORMAT, "tokenizer: vocabulary has neither <|im_start|>/<|im_end|> (ChatML) nor "
                                         "<start_of_turn>/<end_of_turn> (Gemma): no chat template");
    if (!system) system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
    const char *parts[] = {"<|im_start|>system\n", system, "<|im_end|>\n<|im_start|>user\n", user,
                           "<|im_end|>\n<|im_start|>assistant\n"};
    size_t total = 1;
    for (int i = 0; i < 5; i++) total += strlen(parts[i]);
    char *buf = malloc(total);
    if (!buf) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
    buf[0] = '\0';
    for (int i = 0; i < 5; i++) strcat(buf, parts[i]);
    kvq_status st = tok_encode(t, buf, strlen(buf), 1, out);
    free(buf);
    return st;
}

const char *tok_piece(const kvq_tokenizer *t, int32_t id, size_t *len) {
    if (!t || id < 0 || id >= t->n_vocab) {
        if (len) *len = 0;
        return "";
    }
    if (len) *len = t->piece_len[id];
    return t->pieces[id];
}

int tok_is_control(const kvq_tokenizer *t, int32_t id) { return id >= 0 && id < t->n_vocab && t->types[id] == 3; }
int tok_is_eog(const kvq_tokenizer *t, int32_t id) {
    return id >= 0 && (id == t->eos || id == t->im_end || id == t->endoftext || id == t->end_turn);
}
int32_t tok_n_vocab(const kvq_tokenizer *t) { return t->n_vocab; }
int32_t tok_byte_token(const kvq_tokenizer *t, uint8_t b) { return t->byte_id[b]; }
int32_t tok_bos(const kvq_tokenizer *t) { return t->bos; }
int32_t tok_eos(const kvq_tokenizer *t) { return t->eos; }
int tok_add_bos(const kvq_tokenizer *t) { return t->add_bos; }
