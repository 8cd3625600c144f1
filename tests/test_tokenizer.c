/* Tokenizer tests that need no model: BPE merge order on the small vocabulary of tests/tok_tiny.h (expected ids
 * derived by hand from its merge list, in the comments), special tokens, dropped bytes, the round trip, and the
 * encoder's running time on long inputs.
 *
 * Time bound, on the thread's CPU time (so that other jobs on the machine do not count). Merging is O(n log n) in
 * the length n of one pre-token (tokenizer.c, bpe_word). Each input below is 512 KiB; one letter or spaces make one
 * pre-token of 2^19 bytes. Measured (release, this 2-core machine): at most 0.33 us per byte (random letters with
 * SmolLM2's vocabulary, 0.17 s; the test prints each figure). The quadratic encoder this replaces (a rescan of the
 * pre-token per merge) took 2.38 s of CPU for 40 kB of one letter (`kvq tokenize` of 'a' x 40000; 0.01 s now), so
 * ~410 s for 512 KiB by its n^2 growth ((2^19 / 40000)^2 x 2.38 s), 780 us per byte. The bound, TIME_PER_BYTE_S =
 * 100 us per byte, leaves 300x over the release figure for sanitizers (ASan+UBSan: a few x) and is still ~8x under
 * the quadratic time.
 * usage: test_tokenizer [MODEL.gguf]   (with the model, the timing inputs also run on its vocabulary) */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gguf.h"
#include "model_err.h"
#include "tok_tiny.h"
#include "tokenizer.h"

#define TIME_PER_BYTE_S 100e-6 /* 100 us per byte: 52 s for the 512 KiB inputs */
#define INPUT_BYTES (1u << 19)

static int failures, checks;
#define CHECK(cond, ...)                                                                                          \
    do {                                                                                                          \
        checks++;                                                                                                 \
        if (!(cond)) {                                                                                            \
            failures++;                                                                                           \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                                   \
            fprintf(stderr, __VA_ARGS__);                                                                         \
            fputc('\n', stderr);                                                                                  \
        }                                                                                                         \
    } while (0)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Encodes `text` and compares with the expected ids (n_want of them). */
static void expect_ids(const kvq_tokenizer *t, const char *text, int special, const int32_t *want, size_t n_want) {
    tok_ids ids = {0};
    kvq_status st = tok_encode(t, text, strlen(text), special, &ids);
    int same = st == KVQ_OK && ids.n == n_want && (n_want == 0 || memcmp(ids.ids, want, n_want * sizeof *want) == 0);
    if (!same) {
        char got[512] = "";
        for (size_t i = 0; i < ids.n && strlen(got) < 480; i++) snprintf(got + strlen(got), 16, " %d", ids.ids[i]);
        CHECK(0, "'%s' (special %d): got%s (status %d)", text, special, got, st);
    } else {
        checks++;
    }
    tok_ids_free(&ids);
}
#define EXPECT(t, text, special, ...)                                                                              \
    do {                                                                                                          \
        static const int32_t w_[] = {__VA_ARGS__};                                                                \
        expect_ids(t, text, special, w_, sizeof w_ / sizeof w_[0]);                                               \
    } while (0)

/* Pieces concatenate back to the input minus the bytes without a token. */
static int round_trips(const kvq_tokenizer *t, const uint8_t *s, size_t n, const tok_ids *ids) {
    size_t i = 0, k = 0;
    for (; k < ids->n; k++) {
        size_t len;
        const char *p = tok_piece(t, ids->ids[k], &len);
        for (size_t j = 0; j < len; j++) {
            while (i < n && tok_byte_token(t, s[i]) < 0) i++;
            if (i >= n || (uint8_t)p[j] != s[i]) return 0;
            i++;
        }
    }
    while (i < n && tok_byte_token(t, s[i]) < 0) i++;
    return i == n;
}

static void test_tiny_ids(const kvq_tokenizer *t) {
    /* tok_tiny.h ids: byte b -> b; merge k -> 256 + k; <|im_start|> 286, <|im_end|> 287, <tool> 288. */
    EXPECT(t, "a", 0, 97);
    EXPECT(t, "aaaa", 0, 257);                      /* a a -> aa (256), aa aa -> aaaa (257) */
    EXPECT(t, "aaaaaaa", 0, 257, 256, 97);          /* 7 = 4 + 2 + 1, left to right by rank */
    EXPECT(t, "hello", 0, 278);                     /* h e, l l, he ll, hell o */
    EXPECT(t, " hello", 0, 279);                    /* ... then Ġ hello */
    EXPECT(t, " the", 0, 267);                      /* t h (9) before Ġ t (12): th, the, Ġthe */
    EXPECT(t, "ther", 0, 266, 114);                 /* t h (9), th e (10) win over e r (15): the + r */
    EXPECT(t, "eee", 0, 281, 101);                  /* e e twice at rank 25: the leftmost merges; no "ee e" */
    EXPECT(t, "x12", 0, 120, 49, 50);               /* smollm: every digit is its own piece */
    EXPECT(t, "<|im_start|>hi", 1, 286, 104, 105);  /* control token parsed */
    EXPECT(t, "<|im_start|>", 0, 284, 105, 109, 95, 115, 116, 97, 114, 116, 285); /* < | (284), | > (285), bytes */
    EXPECT(t, "a<tool>", 1, 97, 288);               /* user-defined token parsed too */
    size_t len;
    const char *p = tok_piece(t, 286, &len);
    CHECK(len == 12 && memcmp(p, "<|im_start|>", 12) == 0, "control piece is its text");
    CHECK(tok_byte_token(t, 0xFF) == 255 && tok_byte_token(t, 'a') == 97, "tiny vocabulary has every byte");
}

/* Encodes each input, checks the round trip and the time bound. */
static void test_timing(const kvq_tokenizer *t, const char *name) {
    const size_t n = INPUT_BYTES;
    uint8_t *buf = malloc(n);
    if (!buf) abort();
    uint64_t r = 0x9E3779B97F4A7C15ull;
    static const char *const kinds[] = {"one letter", "random letters", "random bytes", "digits", "spaces",
                                        "'<' (special scan)"};
    for (int kind = 0; kind < 6; kind++) {
        for (size_t i = 0; i < n; i++) {
            r ^= r << 13, r ^= r >> 7, r ^= r << 17; /* xorshift64 */
            buf[i] = kind == 0 ? 'a' : kind == 1 ? (uint8_t)('a' + r % 26) : kind == 2 ? (uint8_t)r
                   : kind == 3 ? (uint8_t)('0' + r % 10) : kind == 4 ? ' ' : '<';
        }
        tok_ids ids = {0};
        double t0 = now_s();
        kvq_status st = tok_encode(t, (const char *)buf, n, kind == 5, &ids);
        double dt = now_s() - t0;
        printf("%s: %zu KiB of %s: %zu ids in %.3f s (%.2f us per byte)\n", name, n >> 10, kinds[kind], ids.n, dt,
               dt / (double)n * 1e6);
        CHECK(st == KVQ_OK, "%s, %s: %s", name, kinds[kind], kvqm_last_error());
        CHECK(dt < TIME_PER_BYTE_S * (double)n, "%s: %zu bytes of %s took %.1f s (bound %.0f s)", name, n, kinds[kind],
              dt, TIME_PER_BYTE_S * (double)n);
        CHECK(st != KVQ_OK || round_trips(t, buf, n, &ids), "%s, %s: the pieces do not give the text back", name,
              kinds[kind]);
        tok_ids_free(&ids);
    }
    free(buf);
}

int main(int argc, char **argv) {
    size_t n;
    uint8_t *tiny = tok_tiny_gguf(&n, NULL);
    gguf_file *f = NULL;
    kvq_tokenizer *t = NULL;
    if (gguf_parse(tiny, n, &f) != KVQ_OK || tok_load(f, &t) != KVQ_OK) {
        fprintf(stderr, "FAIL: the tiny tokenizer does not load: %s\n", kvqm_last_error());
        return 1;
    }
    test_tiny_ids(t);
    test_timing(t, "tiny vocabulary");
    tok_free(t);
    gguf_close(f);
    free(tiny);
    if (argc > 1 && access(argv[1], R_OK) == 0) {
        if (gguf_open(argv[1], &f) != KVQ_OK || tok_load(f, &t) != KVQ_OK) {
            fprintf(stderr, "FAIL: %s: %s\n", argv[1], kvqm_last_error());
            return 1;
        }
        /* Bytes whose GPT-2 symbol is not in SmolLM2's tokenizer.ggml.tokens, listed with the `gguf` Python package
         * (GGUFReader): they are dropped from text, as HF does. */
        for (int b = 0; b < 256; b++) {
            int absent = b == 0x04 || b == 0x06 || b == 0x13 || b == 0x14 || b == 0x16 || b == 0x1D || b == 0xC0 ||
                         b == 0xC1 || b == 0xF1 || b == 0xF2 || b >= 0xF5;
            CHECK((tok_byte_token(t, (uint8_t)b) < 0) == absent, "byte 0x%02X token %d", b, tok_byte_token(t, (uint8_t)b));
        }
        test_timing(t, "SmolLM2 vocabulary");
        tok_free(t);
        gguf_close(f);
    } else {
        printf("(model not present: the SmolLM2 timing inputs are skipped; the rest ran)\n");
    }
    printf("%d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
