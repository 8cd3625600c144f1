/* gguf_write.h: what writing a GGUF file needs: ggml's row quantizers (F16, Q8_0, Q4_0), bit-exact with ggml's
 * reference (quantize_row_*_ref) and the gguf Python package's gguf.quants (tests/test_gguf_quant.py checks), and
 * a streaming writer of the header, metadata and tensor infos (the tensor data follows in the declared order). */
#ifndef KVQ_GGUF_WRITE_H
#define KVQ_GGUF_WRITE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "gguf.h"

/* IEEE half of x, round to nearest even (overflow to Inf, subnormals kept): numpy's float32 -> float16. */
uint16_t gguf_f32_to_f16(float x);
/* Bytes of n elements of ggml type t (n a multiple of its block); 0 for a type this writer does not produce. */
size_t gguf_row_bytes(uint32_t t, size_t n);
/* Quantizes n elements (n a multiple of 32 for Q8_0 / Q4_0) of x into out (gguf_row_bytes(t, n) bytes).
 * Returns 0, or -1 for a type other than F32, F16, Q8_0, Q4_0 or a bad n. */
int gguf_quantize_row(uint32_t t, const float *x, size_t n, uint8_t *out);

/* Metadata values for gguf_write_header. */
typedef struct gguf_wkv {
    const char *key;
    uint32_t type;  /* GGUF_U32, GGUF_F32, GGUF_BOOL, GGUF_STRING, or GGUF_ARRAY of arr_type */
    uint64_t u;     /* U32, BOOL */
    double f;       /* F32 */
    const char *s;  /* STRING */
    uint32_t arr_type;            /* ARRAY: GGUF_STRING or GGUF_I32 */
    uint64_t arr_n;
    const char *const *arr_strs;  /* STRING arrays: NUL-terminated strings */
    const int32_t *arr_i32;       /* I32 arrays */
} gguf_wkv;

typedef struct gguf_wtensor {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS];
    uint32_t type;
} gguf_wtensor;

/* Writes the GGUF v3 header, the metadata, the tensor infos (offsets assigned in order, each aligned to 32) and the
 * padding up to the data section. Returns 0, or -1 on a write error. *data_bytes: the size of the data section
 * (every tensor padded to 32 bytes). */
int gguf_write_header(FILE *f, const gguf_wkv *kv, size_t n_kv, const gguf_wtensor *t, size_t n_t, uint64_t *data_bytes);
/* Pads the file with zeros from `written` bytes of a tensor's data to the next multiple of 32. */
int gguf_write_pad(FILE *f, uint64_t written);

#endif
