/* Fuzz target of the tokenizer's encoder: any bytes must encode, in both modes (special-token strings parsed or
 * not), into ids of the vocabulary whose pieces concatenate back to exactly the input (byte-level BPE maps every
 * byte to a symbol and merges only concatenate, so decode(encode(text)) == text for any text), and within a time
 * bound per input byte. One exception, found by this target: a byte whose one-symbol token the vocabulary lacks is
 * dropped (SmolLM2 has none for 21 bytes, listed in tokenizer.h; HF drops them too), so the pieces must give the
 * input minus those bytes (tok_byte_token() < 0).
 *
 * Tokenizer: the GGUF named by $KVQ_FUZZ_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf when it is there (the
 * real 49152-token vocabulary), else the small one of tests/tok_tiny.h (built in memory). Every input also goes
 * through a SentencePiece-style tokenizer: $KVQ_FUZZ_MODEL_SPM, else models/gemma-3-270m-q4_k_m.gguf when it is there
 * (262144 tokens, 6000+ control tokens starting with '<'), else tok_tiny_spm_gguf. Its round trip: the pieces give
 * the input with every U+2581 "▁" as a space (the spelling of a space in the vocabulary; byte fallback covers
 * every other byte, so nothing is dropped).
 *
 * Time bound (thread CPU time): TIME_BASE_NS + TIME_PER_BYTE_NS per input byte, checked twice before failing.
 * The O(n log n) encoder costs at most 0.33 us per byte uninstrumented (tests/test_tokenizer.c) and 3.7 us per byte
 * for one encode and its check in this target under -fsanitize=fuzzer,address,undefined (512 KiB of random letters,
 * SmolLM2's vocabulary: 3.9 s of CPU for the two modes). The quadratic encoder this guards against (a rescan of the whole pre-token per merge) cost 2.38 s
 * of CPU for 40 kB of one letter uninstrumented, i.e. 1.5e-9 s x n per byte for a pre-token of n bytes: over 20 us
 * per byte from n = 13 kB on, 100 us per byte at 64 kB. 20 us per byte is 5x the instrumented linear cost and
 * is missed by the quadratic one from ~16 kB (run with -max_len=65536 to let the fuzzer reach that).
 *
 * libFuzzer: clang -O1 -g -fsanitize=fuzzer,address,undefined -Iinclude -Isrc/model tests/fuzz_tokenizer.c
 *            src/model/gguf.c src/model/tokenizer.c src/model/model_err.c src/core/errors.c -lm
 * Seeds: tests/corpus/tokenizer/. */
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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define TIME_BASE_NS 20000000.0   /* 20 ms: page faults of the first large allocations, scheduler noise */
#define TIME_PER_BYTE_NS 20000.0  /* 20 us per byte: see above */

static kvq_tokenizer *g_tok, *g_tok_spm;
static gguf_file *g_file, *g_file_spm;
static uint8_t *g_tiny, *g_tiny_spm;

static void load_spm(void) {
    const char *path = getenv("KVQ_FUZZ_MODEL_SPM");
    if (!path || !*path)
        path = access("models/gemma-3-270m-q4_k_m.gguf", R_OK) == 0 ? "models/gemma-3-270m-q4_k_m.gguf" : NULL;
    if (path) {
        if (gguf_open(path, &g_file_spm) != KVQ_OK || tok_load(g_file_spm, &g_tok_spm) != KVQ_OK) {
            fprintf(stderr, "fuzz_tokenizer: cannot load the tokenizer of %s: %s\n", path, kvqm_last_error());
            abort();
        }
        fprintf(stderr, "fuzz_tokenizer: SentencePiece-style tokenizer of %s (%d tokens)\n", path, tok_n_vocab(g_tok_spm));
        return;
    }
    size_t n;
    g_tiny_spm = tok_tiny_spm_gguf(&n, NULL);
    if (gguf_parse(g_tiny_spm, n, &g_file_spm) != KVQ_OK || tok_load(g_file_spm, &g_tok_spm) != KVQ_OK) {
        fprintf(stderr, "fuzz_tokenizer: the built-in SentencePiece-style tokenizer does not load: %s\n", kvqm_last_error());
        abort();
    }
    fprintf(stderr, "fuzz_tokenizer: built-in SentencePiece-style tokenizer of tests/tok_tiny.h (%d tokens)\n",
            tok_n_vocab(g_tok_spm));
}

static void load_once(void) {
    if (g_tok) return;
    load_spm();
    const char *path = getenv("KVQ_FUZZ_MODEL");
    if (!path || !*path) path = access("models/SmolLM2-135M-Instruct.Q4_1.gguf", R_OK) == 0
                                    ? "models/SmolLM2-135M-Instruct.Q4_1.gguf"
                                    : NULL;
    if (path) {
        if (gguf_open(path, &g_file) != KVQ_OK || tok_load(g_file, &g_tok) != KVQ_OK) {
            fprintf(stderr, "fuzz_tokenizer: cannot load the tokenizer of %s: %s\n", path, kvqm_last_error());
            abort();
        }
        fprintf(stderr, "fuzz_tokenizer: tokenizer of %s (%d tokens)\n", path, tok_n_vocab(g_tok));
        return;
    }
    size_t n;
    g_tiny = tok_tiny_gguf(&n, NULL);
    if (gguf_parse(g_tiny, n, &g_file) != KVQ_OK || tok_load(g_file, &g_tok) != KVQ_OK) {
        fprintf(stderr, "fuzz_tokenizer: the built-in tokenizer does not load: %s\n", kvqm_last_error());
        abort();
    }
    fprintf(stderr, "fuzz_tokenizer: built-in tokenizer of tests/tok_tiny.h (%d tokens)\n", tok_n_vocab(g_tok));
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* Encodes and checks the round trip; returns the encode time in ns. */
static double encode_check(const kvq_tokenizer *tok, int spm, const uint8_t *data, size_t size, int parse_special) {
    tok_ids ids = {0};
    double t0 = now_ns();
    kvq_status st = tok_encode(tok, (const char *)data, size, parse_special, &ids);
    double dt = now_ns() - t0;
    if (st != KVQ_OK) {
        fprintf(stderr, "tok_encode failed on %zu bytes: %s\n", size, kvqm_last_error());
        abort();
    }
    /* The expected text: the input without the bytes that have no token (byte-level); with "▁" as ' ' (spm). */
    uint8_t *want = malloc(size ? size : 1);
    size_t n_want = 0;
    if (!want) abort();
    for (size_t i = 0; i < size; i++)
        if (spm && i + 3 <= size && memcmp(data + i, "\xE2\x96\x81", 3) == 0) want[n_want++] = ' ', i += 2;
        else if (spm || tok_byte_token(tok, data[i]) >= 0) want[n_want++] = data[i];
    size_t pos = 0;
    for (size_t i = 0; i < ids.n; i++) {
        if (ids.ids[i] < 0 || ids.ids[i] >= tok_n_vocab(tok)) {
            fprintf(stderr, "id %d out of the vocabulary\n", ids.ids[i]);
            abort();
        }
        size_t len;
        const char *p = tok_piece(tok, ids.ids[i], &len);
        if (len > n_want - pos || memcmp(p, want + pos, len) != 0) {
            fprintf(stderr, "round trip: token %zu (id %d, %zu bytes) does not match the input at byte %zu of %zu "
                            "(parse_special %d)\n", i, ids.ids[i], len, pos, n_want, parse_special);
            abort();
        }
        pos += len;
    }
    if (pos != n_want) {
        fprintf(stderr, "round trip: the pieces give %zu bytes of %zu (parse_special %d)\n", pos, n_want,
                parse_special);
        abort();
    }
    free(want);
    tok_ids_free(&ids);
    return dt;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    load_once();
    double bound = TIME_BASE_NS + TIME_PER_BYTE_NS * (double)size;
    for (int spm = 0; spm < 2; spm++)
        for (int special = 0; special < 2; special++) {
            const kvq_tokenizer *tok = spm ? g_tok_spm : g_tok;
            double dt = encode_check(tok, spm, data, size, special);
            if (dt > bound && (dt = encode_check(tok, spm, data, size, special)) > bound) {
                fprintf(stderr, "tok_encode (%s) took %.1f ms for %zu bytes twice, over the bound of %.1f ms\n",
                        spm ? "spm" : "byte-level", dt / 1e6, size, bound / 1e6);
                abort();
            }
        }
    return 0;
}
