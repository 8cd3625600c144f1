/* Fuzz target of the GGUF reader and the tokenizer loader: any byte string must parse or fail with a kvq_status
 * and a message, never crash, hang or leak. Everything a parsed file exposes is then walked: metadata strings and
 * arrays, tensor dequantization (small tensors), and, when it has one, the tokenizer on a fixed text.
 *
 * libFuzzer build: scripts/fuzz-gguf.sh (clang -fsanitize=fuzzer,address,undefined). The same entry point runs
 * in ctest over crafted corrupt files (tests/test_gguf_corrupt.c). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "model_err.h"
#include "tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile uint64_t g_sink; /* keeps the walks from being optimized away */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    gguf_file *f = NULL;
    kvq_status st = gguf_parse(data, size, &f);
    if (st != KVQ_OK) {
        if (f != NULL || kvqm_last_error()[0] == '\0') abort(); /* an error must leave no object and say why */
        return 0;
    }
    uint64_t acc = 0;
    for (uint64_t i = 0; i < f->n_kv; i++) {
        const gguf_kv *kv = &f->kv[i];
        acc += kv->key.len ? (uint8_t)kv->key.ptr[kv->key.len - 1] : 0;
        if (kv->type == GGUF_STRING && kv->v.str.len) acc += (uint8_t)kv->v.str.ptr[kv->v.str.len - 1];
        if (kv->type != GGUF_ARRAY) continue;
        if (kv->v.arr.type == GGUF_STRING && kv->v.arr.n <= (1u << 20)) {
            gguf_str *s = malloc((kv->v.arr.n ? kv->v.arr.n : 1) * sizeof *s);
            if (s && gguf_arr_strings(kv, s) == KVQ_OK)
                for (uint64_t j = 0; j < kv->v.arr.n; j++) acc += s[j].len ? (uint8_t)s[j].ptr[s[j].len - 1] : 0;
            free(s);
        } else {
            for (uint64_t j = 0; j < kv->v.arr.n && j < 64; j++) acc += (uint64_t)gguf_arr_i64(kv, j);
        }
    }
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *t = &f->tensors[i];
        if (t->n_elements > (1u << 16)) continue; /* bounded memory per input */
        float *out = malloc(t->n_elements * sizeof *out);
        if (out && gguf_tensor_to_f32(t, out) == KVQ_OK) acc += (uint64_t)(out[0] != out[0]);
        free(out);
    }
    kvq_tokenizer *tok = NULL;
    if (tok_load(f, &tok) == KVQ_OK) {
        static const char text[] = "Hello, world! 123 don't <|im_start|>user\n  \xc3\xa9t\xc3\xa9\xff\n";
        tok_ids ids = {0};
        if (tok_encode(tok, text, sizeof text - 1, 1, &ids) == KVQ_OK)
            for (size_t j = 0; j < ids.n; j++) {
                size_t len;
                tok_piece(tok, ids.ids[j], &len);
                acc += len;
            }
        tok_encode_chat(tok, NULL, "hi", &ids);
        tok_ids_free(&ids);
        tok_free(tok);
    }
    g_sink = acc;
    gguf_close(f);
    return 0;
}
