/* tok_tiny.h: a small byte-level BPE tokenizer as an in-memory GGUF file, for tests and fuzz targets that must run
 * without the real model (tests/fuzz_tokenizer.c, tests/test_tokenizer.c).
 *
 * Vocabulary: the 256 GPT-2 byte symbols (ids 0..255 in byte order), then tokens made by the merges below, then two
 * control tokens <|im_start|> and <|im_end|> and one user-defined token "<tool>". Merges: a doubling chain for 'a'
 * (a a, aa aa, ..., 64 a's), so a run of one letter merges hierarchically like a real vocabulary's, a chain for
 * spaces, and a handful of English pairs ("t h", "th e", "Ġ the", "i n", "in g", "e r", ...), so ordinary text
 * gives merges of many ranks that compete; "e e" and "e ee" without "ee e" make "eee" depend on the leftmost-first
 * rule for equal ranks. tokenizer.ggml.pre = "smollm" (digits split into single code points).
 * Header-only; the buffer is malloc'ed and must outlive the gguf_file parsed from it. */
#ifndef KVQ_TOK_TINY_H
#define KVQ_TOK_TINY_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct tt_buf {
    uint8_t *p;
    size_t n, cap;
} tt_buf;

static void tt_put(tt_buf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) abort();
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void tt_u32(tt_buf *b, uint32_t v) { tt_put(b, &v, 4); }
static void tt_u64(tt_buf *b, uint64_t v) { tt_put(b, &v, 8); }
static void tt_str(tt_buf *b, const char *s) {
    tt_u64(b, strlen(s));
    tt_put(b, s, strlen(s));
}

/* GPT-2's symbol of byte b as UTF-8 (printable Latin-1 stands for itself, the rest moves to U+0100.. in order). */
static void tt_byte_symbol(int b, char out[4]) {
#define TT_PRINTABLE(i) (((i) >= 33 && (i) <= 126) || ((i) >= 161 && (i) <= 172) || ((i) >= 174 && (i) <= 255))
    int extra = 0;
    for (int i = 0; i < b; i++) extra += !TT_PRINTABLE(i);
    unsigned cp = TT_PRINTABLE(b) ? (unsigned)b : 256u + (unsigned)extra;
#undef TT_PRINTABLE
    if (cp < 0x80) out[0] = (char)cp, out[1] = 0;
    else out[0] = (char)(0xC0 | (cp >> 6)), out[1] = (char)(0x80 | (cp & 0x3F)), out[2] = 0;
}

/* Builds the GGUF; *n_vocab receives the vocabulary size. */
static uint8_t *tok_tiny_gguf(size_t *size, int *n_vocab) {
    /* "Ġ" is the symbol of ' ' (U+0120), "Ċ" of '\n' (U+010A). */
    static const char *const merges[] = {
        "a a", "aa aa", "aaaa aaaa", "aaaaaaaa aaaaaaaa", "aaaaaaaaaaaaaaaa aaaaaaaaaaaaaaaa",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "Ġ Ġ", "ĠĠ ĠĠ", "ĠĠĠĠ ĠĠĠĠ", "t h", "th e", "Ġ the", "Ġ t", "i n", "in g", "e r", "Ġ a", "o n", "r e",
        "h e", "l l", "he ll", "hell o", "Ġ hello", "Ċ Ċ", "e e", "e ee", "Ġ <", "< |", "| >",
    };
    static const char *const specials[] = {"<|im_start|>", "<|im_end|>", "<tool>"};
    const int n_merge = (int)(sizeof merges / sizeof merges[0]), n_spec = 3;
    int n_tok = 256 + n_merge + n_spec;
    tt_buf b = {0};
    tt_u32(&b, 0x46554747u); /* "GGUF" */
    tt_u32(&b, 3);
    tt_u64(&b, 0); /* tensors */
    tt_u64(&b, 6); /* metadata entries */
    tt_str(&b, "tokenizer.ggml.model");
    tt_u32(&b, 8 /* STRING */);
    tt_str(&b, "gpt2");
    tt_str(&b, "tokenizer.ggml.pre");
    tt_u32(&b, 8);
    tt_str(&b, "smollm");
    tt_str(&b, "tokenizer.ggml.tokens");
    tt_u32(&b, 9 /* ARRAY */);
    tt_u32(&b, 8);
    tt_u64(&b, (uint64_t)n_tok);
    for (int i = 0; i < 256; i++) {
        char s[4];
        tt_byte_symbol(i, s);
        tt_str(&b, s);
    }
    for (int i = 0; i < n_merge; i++) { /* the merged spelling: "A B" without the space */
        char m[160];
        const char *sp = strchr(merges[i], ' ');
        size_t la = (size_t)(sp - merges[i]);
        memcpy(m, merges[i], la);
        strcpy(m + la, sp + 1);
        tt_str(&b, m);
    }
    for (int i = 0; i < n_spec; i++) tt_str(&b, specials[i]);
    tt_str(&b, "tokenizer.ggml.token_type");
    tt_u32(&b, 9);
    tt_u32(&b, 5 /* I32 */);
    tt_u64(&b, (uint64_t)n_tok);
    for (int i = 0; i < n_tok; i++) tt_u32(&b, i < 256 + n_merge ? 1u : i < n_tok - 1 ? 3u : 4u);
    tt_str(&b, "tokenizer.ggml.merges");
    tt_u32(&b, 9);
    tt_u32(&b, 8);
    tt_u64(&b, (uint64_t)n_merge);
    for (int i = 0; i < n_merge; i++) tt_str(&b, merges[i]);
    tt_str(&b, "tokenizer.ggml.eos_token_id");
    tt_u32(&b, 4 /* U32 */);
    tt_u32(&b, (uint32_t)(n_tok - 2));
    while (b.n % 32) tt_put(&b, "", 1); /* data section (empty) at the default alignment */
    *size = b.n;
    if (n_vocab) *n_vocab = n_tok;
    return b.p;
}

/* A small SentencePiece-style vocabulary (tokenizer.ggml.model "llama", general.architecture "gemma3", no merges:
 * they come from the vocabulary order, src/model/tokenizer.c tok_load_spm), shaped like Gemma's: <pad> <eos> <bos>
 * <unk> and <start_of_turn> (control), "\n", "\n\n", "<b>" (user defined), "  " (user defined, two real spaces:
 * respelled "▁▁" and then an ordinary entry), the 256 byte tokens <0xNN>, then ordinary pieces: "▁" runs, a doubling
 * chain of 'a', English pairs, and a few multi-byte characters; other characters fall back to bytes. */
static inline uint8_t *tok_tiny_spm_gguf(size_t *size, int *n_vocab) {
    static const char *const head[] = {"<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "\n", "\n\n", "<b>", "  "};
    static const uint32_t head_type[] = {3, 3, 3, 3, 3, 4, 4, 4, 4};
    static const char *const pieces[] = {
        "\xE2\x96\x81", "a", "aa", "aaaa", "aaaaaaaa", "t", "h", "e", "th", "the", "\xE2\x96\x81t", "\xE2\x96\x81the",
        "\xE2\x96\x81\xE2\x96\x81", "i", "n", "g", "in", "ing", "\xE2\x96\x81" "a", "ee", "eee", "b", "<", ">", "\xC3\xA9",
        "\xE6\x97\xA5", "\xE2\x96\x81\xE6\x97\xA5", "r", "er", "o", "on"};
    const int n_head = 9, n_piece = (int)(sizeof pieces / sizeof pieces[0]);
    int n_tok = n_head + 256 + n_piece;
    tt_buf b = {0};
    tt_u32(&b, 0x46554747u);
    tt_u32(&b, 3);
    tt_u64(&b, 0);
    tt_u64(&b, 8);
    tt_str(&b, "general.architecture");
    tt_u32(&b, 8);
    tt_str(&b, "gemma3");
    tt_str(&b, "tokenizer.ggml.model");
    tt_u32(&b, 8);
    tt_str(&b, "llama");
    tt_str(&b, "tokenizer.ggml.tokens");
    tt_u32(&b, 9);
    tt_u32(&b, 8);
    tt_u64(&b, (uint64_t)n_tok);
    for (int i = 0; i < n_head; i++) tt_str(&b, head[i]);
    for (int i = 0; i < 256; i++) {
        char s[8];
        static const char hex[] = "0123456789ABCDEF";
        memcpy(s, "<0x", 3);
        s[3] = hex[i >> 4], s[4] = hex[i & 15], s[5] = '>', s[6] = 0;
        tt_str(&b, s);
    }
    for (int i = 0; i < n_piece; i++) tt_str(&b, pieces[i]);
    tt_str(&b, "tokenizer.ggml.token_type");
    tt_u32(&b, 9);
    tt_u32(&b, 5);
    tt_u64(&b, (uint64_t)n_tok);
    for (int i = 0; i < n_tok; i++) tt_u32(&b, i < n_head ? head_type[i] : i < n_head + 256 ? 6u : 1u);
    tt_str(&b, "tokenizer.ggml.scores");
    tt_u32(&b, 9);
    tt_u32(&b, 6 /* F32 */);
    tt_u64(&b, (uint64_t)n_tok);
    for (int i = 0; i < n_tok; i++) {
        float f = -(float)i;
        tt_put(&b, &f, 4);
    }
    tt_str(&b, "tokenizer.ggml.bos_token_id");
    tt_u32(&b, 4);
    tt_u32(&b, 2);
    tt_str(&b, "tokenizer.ggml.eos_token_id");
    tt_u32(&b, 4);
    tt_u32(&b, 1);
    tt_str(&b, "tokenizer.ggml.unknown_token_id");
    tt_u32(&b, 4);
    tt_u32(&b, 3);
    while (b.n % 32) tt_put(&b, "", 1);
    *size = b.n;
    if (n_vocab) *n_vocab = n_tok;
    return b.p;
}

#endif
