/* gguf.h: a hardened reader for GGUF v2/v3 files (the llama.cpp model format).
 *
 * Layout of a file (little endian):
 *   u32 magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
 *   n_kv x      { string key | u32 value_type | value }
 *   n_tensors x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset }
 *   padding to `general.alignment` (default 32) | tensor data (offsets are relative to its start)
 * with string = { u64 len | len bytes, no NUL } and array = { u32 elem_type | u64 n | n elements }.
 *
 * The whole file is parsed and validated when it is opened: every count, length, offset and size is checked
 * against the bytes that are really there before it is used, so later accessors never fail on a bad file.
 * A corrupt file gives KVQ_ERR_FORMAT, a short one KVQ_ERR_TRUNCATED, an unreadable one KVQ_ERR_IO, each with a
 * message in kvqm_last_error(). */
#ifndef KVQ_GGUF_H
#define KVQ_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "kvq.h"

enum gguf_vtype {
    GGUF_U8 = 0, GGUF_I8 = 1, GGUF_U16 = 2, GGUF_I16 = 3, GGUF_U32 = 4, GGUF_I32 = 5, GGUF_F32 = 6,
    GGUF_BOOL = 7, GGUF_STRING = 8, GGUF_ARRAY = 9, GGUF_U64 = 10, GGUF_I64 = 11, GGUF_F64 = 12,
    GGUF_VTYPE_COUNT
};

/* ggml tensor types this reader can size and dequantize (the numbers are ggml's). Legacy formats have blocks of 32
 * elements, K-quants super-blocks of 256 (QK_K). Q8_K (15) exists only inside ggml as an activation format, never in
 * a file; it and the IQ/TQ/MXFP4 types are refused by number and name at parse time. */
enum ggml_ttype {
    GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7, GGML_Q8_0 = 8,
    GGML_Q2_K = 10, GGML_Q3_K = 11, GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14, GGML_BF16 = 30
};
#define GGML_QK_K 256

typedef struct gguf_str {
    const char *ptr; /* points into the file: not NUL terminated */
    uint64_t len;
} gguf_str;

typedef struct gguf_kv {
    gguf_str key;
    uint32_t type; /* enum gguf_vtype */
    union {
        uint64_t u;   /* unsigned integers and bool */
        int64_t i;    /* signed integers */
        double f;     /* F32, F64 */
        gguf_str str; /* STRING */
        struct {
            uint32_t type;       /* element type: never ARRAY (nested arrays are rejected) */
            uint64_t n;          /* element count */
            const uint8_t *data; /* first element, in the file */
            uint64_t nbytes;     /* bytes the elements occupy */
        } arr;
    } v;
} gguf_kv;

#define GGUF_MAX_DIMS 4

typedef struct gguf_tensor {
    gguf_str name;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS]; /* ne[0] is the contiguous dimension; unused dims are 1 */
    uint32_t type;              /* enum ggml_ttype */
    uint64_t offset;            /* relative to the data section */
    uint64_t n_elements;
    uint64_t nbytes;
    const uint8_t *data; /* in the file */
} gguf_tensor;

typedef struct gguf_file {
    uint32_t version;
    uint64_t n_kv;
    gguf_kv *kv;
    uint64_t n_tensors;
    gguf_tensor *tensors;
    uint64_t alignment;
    uint64_t data_offset; /* start of the tensor data section in the file */
    const uint8_t *base;
    size_t size;
    int mapped; /* 1: base is an mmap of `size` bytes that gguf_close unmaps */
} gguf_file;

/* Maps and parses a file. */
kvq_status gguf_open(const char *path, gguf_file **out);
/* Parses a buffer, which must outlive the returned file (used by the fuzz target and tests). */
kvq_status gguf_parse(const uint8_t *data, size_t size, gguf_file **out);
void gguf_close(gguf_file *f);

const gguf_kv *gguf_find_kv(const gguf_file *f, const char *key);
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name);

/* Typed getters: KVQ_OK and *out set when the key exists with a compatible numeric type and the value fits; else
 * KVQ_ERR_FORMAT (wrong type or range) or KVQ_ERR_INVALID_ARG (missing key), with a message. */
kvq_status gguf_get_i64(const gguf_file *f, const char *key, int64_t *out);
kvq_status gguf_get_f64(const gguf_file *f, const char *key, double *out);
/* Missing key: returns `def`. Present but not numeric/in range: returns `def` too (callers treat it as advisory). */
int64_t gguf_get_i64_or(const gguf_file *f, const char *key, int64_t def);
double gguf_get_f64_or(const gguf_file *f, const char *key, double def);
/* A string value, or {NULL, 0} when missing or not a string. */
gguf_str gguf_get_str(const gguf_file *f, const char *key);

/* Fills out[0 .. arr.n-1] with the strings of a string array (validated at parse time). */
kvq_status gguf_arr_strings(const gguf_kv *kv, gguf_str *out);
/* Element i of a numeric array, as int64 / double. */
int64_t gguf_arr_i64(const gguf_kv *kv, uint64_t i);
double gguf_arr_f64(const gguf_kv *kv, uint64_t i); /* NaN reads as -HUGE_VAL */

/* ggml's name of a type number ("Q4_K", "IQ2_XXS", ...), also for types this reader refuses; "unknown" past them. */
const char *ggml_type_name(uint32_t t);
/* 1 and the elements and bytes of one block of a supported type (1 and 4 for F32); 0 for any other type. */
int ggml_type_block(uint32_t t, uint64_t *blk_elems, uint64_t *blk_bytes);
/* Dequantizes the whole tensor into out[n_elements]. */
kvq_status gguf_tensor_to_f32(const gguf_tensor *t, float *out);
/* Dequantizes n elements of a supported type from src (n / blk_elems blocks, e.g. one row of a weight matrix) into
 * dst[n]. KVQ_ERR_NULL, KVQ_ERR_FORMAT for an unsupported type, KVQ_ERR_INVALID_ARG when n is not a multiple of the
 * type's block. The arithmetic is ggml's (x = d*q, d*q + m or (d*sc)*q - dmin*m in fp32): every product there is
 * exact in fp32 (an fp16 scale has 11 significant bits, a sub-scale at most 8, a code at most 7; no product of one
 * type needs more than 24), so the result is ggml's bit for bit; only the final addition of a min rounds, the same
 * way in both. */
kvq_status gguf_dequantize_row(uint32_t type, const uint8_t *src, float *dst, uint64_t n);

/* Bytes of one element of a scalar value type; 0 for STRING/ARRAY or unknown. */
size_t gguf_vtype_size(uint32_t t);

#endif
