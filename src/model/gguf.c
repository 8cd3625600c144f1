#include "gguf.h"

#include <fcntl.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model_err.h"

#define GGUF_MAGIC 0x46554747u /* "GGUF" read as little-endian u32 */
#define GGUF_DEFAULT_ALIGNMENT 32

/* Cursor over the file: every read checks the remaining bytes first. */
typedef struct cursor {
    const uint8_t *p;
    size_t size, pos;
} cursor;

static bool need(cursor *c, uint64_t n) { return n <= c->size - c->pos; }

#define READ_FN(name, T)                                                                                          \
    static kvq_status name(cursor *c, T *out, const char *what) {                                                 \
        if (!need(c, sizeof(T))) {                                                                                \
            memset(out, 0, sizeof(T));                                                                            \
            return kvqm_fail(KVQ_ERR_TRUNCATED, "gguf: file ends at byte %zu while reading %s", c->size, what);   \
        }                                                                                                         \
        memcpy(out, c->p + c->pos, sizeof(T));                                                                    \
        c->pos += sizeof(T);                                                                                      \
        return KVQ_OK;                                                                                            \
    }
READ_FN(rd_u32, uint32_t)
READ_FN(rd_u64, uint64_t)

static kvq_status rd_str(cursor *c, gguf_str *s, const char *what) {
    uint64_t len = 0;
    kvq_status st = rd_u64(c, &len, what);
    if (st) return st;
    if (!need(c, len))
        return kvqm_fail(KVQ_ERR_TRUNCATED, "gguf: %s at byte %zu declares %llu bytes, only %zu left", what,
                         c->pos, (unsigned long long)len, c->size - c->pos);
    s->ptr = (const char *)c->p + c->pos;
    s->len = len;
    c->pos += len;
    return KVQ_OK;
}

size_t gguf_vtype_size(uint32_t t) {
    switch (t) {
    case GGUF_U8: case GGUF_I8: case GGUF_BOOL: return 1;
    case GGUF_U16: case GGUF_I16: return 2;
    case GGUF_U32: case GGUF_I32: case GGUF_F32: return 4;
    case GGUF_U64: case GGUF_I64: case GGUF_F64: return 8;
    default: return 0;
    }
}

/* Decodes one scalar of type t at p into the kv union. */
static void scalar_decode(uint32_t t, const uint8_t *p, gguf_kv *kv) {
    switch (t) {
    case GGUF_U8: kv->v.u = p[0]; break;
    case GGUF_BOOL: kv->v.u = p[0] != 0; break;
    case GGUF_I8: { int8_t x; memcpy(&x, p, 1); kv->v.i = x; break; }
    case GGUF_U16: { uint16_t x; memcpy(&x, p, 2); kv->v.u = x; break; }
    case GGUF_I16: { int16_t x; memcpy(&x, p, 2); kv->v.i = x; break; }
    case GGUF_U32: { uint32_t x; memcpy(&x, p, 4); kv->v.u = x; break; }
    case GGUF_I32: { int32_t x; memcpy(&x, p, 4); kv->v.i = x; break; }
    case GGUF_F32: { float x; memcpy(&x, p, 4); kv->v.f = x; break; }
    case GGUF_U64: { uint64_t x; memcpy(&x, p, 8); kv->v.u = x; break; }
    case GGUF_I64: { int64_t x; memcpy(&x, p, 8); kv->v.i = x; break; }
    case GGUF_F64: { double x; memcpy(&x, p, 8); kv->v.f = x; break; }
    default: break;
    }
}

static kvq_status parse_kv(cursor *c, uint64_t idx, gguf_kv *kv) {
    kvq_status st = rd_str(c, &kv->key, "metadata key");
    if (st) return st;
    if ((st = rd_u32(c, &kv->type, "metadata value type"))) return st;
    int klen = kv->key.len > 64 ? 64 : (int)kv->key.len;
    if (kv->type == GGUF_STRING) return rd_str(c, &kv->v.str, "metadata string value");
    if (kv->type == GGUF_ARRAY) {
        uint32_t et = 0;
        uint64_t n = 0;
        if ((st = rd_u32(c, &et, "array element type"))) return st;
        if ((st = rd_u64(c, &n, "array length"))) return st;
        kv->v.arr.type = et;
        kv->v.arr.n = n;
        kv->v.arr.data = c->p + c->pos;
        size_t start = c->pos;
        if (et == GGUF_STRING) {
            /* Each string needs at least its 8-byte length: reject impossible counts before walking them. */
            if (n > (c->size - c->pos) / 8)
                return kvqm_fail(KVQ_ERR_TRUNCATED, "gguf: key '%.*s': array of %llu strings cannot fit in %zu bytes",
                                 klen, kv->key.ptr, (unsigned long long)n, c->size - c->pos);
            for (uint64_t i = 0; i < n; i++) {
                gguf_str s;
                if ((st = rd_str(c, &s, "array string"))) return st;
            }
        } else {
            size_t es = gguf_vtype_size(et);
            if (es == 0)
                return kvqm_fail(KVQ_ERR_FORMAT, "gguf: key '%.*s': bad array element type %u (nested arrays are not supported)",
                                 klen, kv->key.ptr, et);
            if (n > (c->size - c->pos) / es)
                return kvqm_fail(KVQ_ERR_TRUNCATED, "gguf: key '%.*s': array of %llu elements of %zu bytes exceeds the file",
                                 klen, kv->key.ptr, (unsigned long long)n, es);
            c->pos += n * es;
        }
        kv->v.arr.nbytes = c->pos - start;
        return KVQ_OK;
    }
    size_t es = gguf_vtype_size(kv->type);
    if (es == 0)
        return kvqm_fail(KVQ_ERR_FORMAT, "gguf: metadata entry %llu ('%.*s'): unknown value type %u",
                         (unsigned long long)idx, klen, kv->key.ptr, kv->type);
    if (!need(c, es)) return kvqm_fail(KVQ_ERR_TRUNCATED, "gguf: file ends inside the value of '%.*s'", klen, kv->key.ptr);
    scalar_decode(kv->type, c->p + c->pos, kv);
    c->pos += es;
    return KVQ_OK;
}

int ggml_type_block(uint32_t t, uint64_t *blk_elems, uint64_t *blk_bytes) {
    uint64_t e, b;
    switch (t) {
    case GGML_F32: e = 1, b = 4; break;
    case GGML_F16: case GGML_BF16: e = 1, b = 2; break;
    case GGML_Q4_0: e = 32, b = 18; break; /* fp16 d, 16 bytes of nibbles */
    case GGML_Q4_1: e = 32, b = 20; break; /* fp16 d, fp16 m, 16 bytes of nibbles */
    case GGML_Q5_0: e = 32, b = 22; break; /* fp16 d, u32 high bits, 16 bytes of nibbles */
    case GGML_Q5_1: e = 32, b = 24; break; /* fp16 d, fp16 m, u32 high bits, 16 bytes of nibbles */
    case GGML_Q8_0: e = 32, b = 34; break; /* fp16 d, 32 int8 */
    case GGML_Q2_K: e = GGML_QK_K, b = 84; break;  /* 16 scale|min bytes, 64 bytes of 2-bit codes, fp16 d, dmin */
    case GGML_Q3_K: e = GGML_QK_K, b = 110; break; /* 32 bytes high bits, 64 of 2-bit codes, 12 of scales, fp16 d */
    case GGML_Q4_K: e = GGML_QK_K, b = 144; break; /* fp16 d, dmin, 12 bytes of 6-bit scales|mins, 128 of nibbles */
    case GGML_Q5_K: e = GGML_QK_K, b = 176; break; /* as Q4_K + 32 bytes of high bits before the nibbles */
    case GGML_Q6_K: e = GGML_QK_K, b = 210; break; /* 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d */
    default: return 0;
    }
    if (blk_elems) *blk_elems = e;
    if (blk_bytes) *blk_bytes = b;
    return 1;
}

const char *ggml_type_name(uint32_t t) {
    /* ggml's numbering (ggml.h): 4 and 5 (Q4_2, Q4_3) were removed long ago. */
    static const char *const names[] = {
        "F32",     "F16",    "Q4_0",  "Q4_1",  "Q4_2 (removed)", "Q4_3 (removed)", "Q5_0",  "Q5_1",   "Q8_0",
        "Q8_1",    "Q2_K",   "Q3_K",  "Q4_K",  "Q5_K",           "Q6_K",           "Q8_K",  "IQ2_XXS", "IQ2_XS",
        "IQ3_XXS", "IQ1_S",  "IQ4_NL", "IQ3_S", "IQ2_S",          "IQ4_XS",         "I8",    "I16",     "I32",
        "I64",     "F64",    "IQ1_M", "BF16",  "Q4_0_4_4 (removed)", "Q4_0_4_8 (removed)", "Q4_0_8_8 (removed)",
        "TQ1_0",   "TQ2_0",  "IQ4_NL_4_4 (removed)", "IQ4_NL_4_8 (removed)", "IQ4_NL_8_8 (removed)", "MXFP4"};
    return t < sizeof names / sizeof names[0] ? names[t] : "unknown";
}

static kvq_status parse_tensor(cursor *c, uint64_t idx, gguf_tensor *t) {
    kvq_status st = rd_str(c, &t->name, "tensor name");
    if (st) return st;
    int nlen = t->name.len > 64 ? 64 : (int)t->name.len;
    if ((st = rd_u32(c, &t->n_dims, "tensor n_dims"))) return st;
    if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS)
        return kvqm_fail(KVQ_ERR_FORMAT, "gguf: tensor %llu ('%.*s'): n_dims %u not in 1..%d", (unsigned long long)idx,
                         nlen, t->name.ptr, t->n_dims, GGUF_MAX_DIMS);
    uint64_t n = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if ((st = rd_u64(c, &t->ne[d], "tensor dimension"))) return st;
        /* Dimensions above 2^40 or products above 2^56 elements cannot be in any file we can map. */
        if (t->ne[d] == 0 || t->ne[d] > (1ull << 40) || n > (1ull << 56) / t->ne[d])
            return kvqm_fail(KVQ_ERR_FORMAT, "gguf: tensor '%.*s': dimension %u = %llu is invalid", nlen, t->name.ptr, d,
                             (unsigned long long)t->ne[d]);
        n *= t->ne[d];
    }
    t->n_elements = n;
    if ((st = rd_u32(c, &t->type, "tensor type"))) return st;
    if ((st = rd_u64(c, &t->offset, "tensor offset"))) return st;
    uint64_t be, bb;
    if (!ggml_type_block(t->type, &be, &bb))
        return kvqm_fail(KVQ_ERR_FORMAT,
                         "gguf: tensor '%.*s': ggml type %u (%s) is not supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, "
                         "Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)",
                         nlen, t->name.ptr, t->type, ggml_type_name(t->type));
    if (t->ne[0] % be != 0)
        return kvqm_fail(KVQ_ERR_FORMAT, "gguf: tensor '%.*s': row of %llu elements is not a multiple of the %s block (%llu)",
                         nlen, t->name.ptr, (unsigned long long)t->ne[0], ggml_type_name(t->type), (unsigned long long)be);
    t->nbytes = n / be * bb;
    return KVQ_OK;
}

static int str_eq(gguf_str s, const char *z) {
    size_t n = strlen(z);
    return s.len == n && memcmp(s.ptr, z, n) == 0;
}

static int cmp_str(const void *a, const void *b) {
    const gguf_str *x = a, *y = b;
    if (x->len != y->len) return x->len < y->len ? -1 : 1;
    return x->len ? memcmp(x->ptr, y->ptr, x->len) : 0;
}

/* Finds a name that occurs twice among n strings (keys or tensor names) in O(n log n): sorted copies, adjacent
 * pairs compared. A pairwise scan would let a crafted file of a million tensors cost 5e11 comparisons. Returns 1 and
 * sets *dup when there is one, 0 when there is none, -1 when out of memory. */
static int find_duplicate(const gguf_str *names, size_t stride, uint64_t n, gguf_str *dup) {
    if (n < 2) return 0;
    gguf_str *s = malloc(n * sizeof *s);
    if (!s) return -1;
    for (uint64_t i = 0; i < n; i++) memcpy(&s[i], (const char *)names + i * stride, sizeof *s);
    qsort(s, n, sizeof *s, cmp_str);
    int found = 0;
    for (uint64_t i = 1; i < n && !found; i++)
        if (cmp_str(&s[i - 1], &s[i]) == 0) {
            *dup = s[i];
            found = 1;
        }
    free(s);
    return found;
}

kvq_status gguf_parse(const uint8_t *data, size_t size, gguf_file **out) {
    if (!out) return kvqm_fail(KVQ_ERR_NULL, "gguf_parse: out is NULL");
    *out = NULL;
    if (!data && size) return kvqm_fail(KVQ_ERR_NULL, "gguf_parse: data is NULL");
    cursor c = {data, size, 0};
    uint32_t magic = 0, version = 0;
    uint64_t n_tensors = 0, n_kv = 0;
    kvq_status st;
    if ((st = rd_u32(&c, &magic, "magic"))) return st;
    if (magic != GGUF_MAGIC) return kvqm_fail(KVQ_ERR_FORMAT, "gguf: bad magic 0x%08x (not a GGUF file)", magic);
    if ((st = rd_u32(&c, &version, "version"))) return st;
    if (version != 2 && version != 3)
        return kvqm_fail(KVQ_ERR_FORMAT, "gguf: version %u is not supported (2 or 3)", version);
    if ((st = rd_u64(&c, &n_tensors, "tensor count")) || (st = rd_u64(&c, &n_kv, "metadata count"))) return st;
    /* Minimum encoded sizes (kv: key length + type + 1 byte; tensor: name length + n_dims + 1 dim + type + offset)
     * bound the counts by the file size, so a huge count fails here instead of in calloc. */
    if (n_kv > (size - c.pos) / 13)
        return kvqm_fail(KVQ_ERR_FORMAT, "gguf: metadata count %llu cannot fit in a %zu-byte file", (unsigned long long)n_kv, size);
    if (n_tensors > (size - c.pos) / 32)
        return kvqm_fail(KVQ_ERR_FORMAT, "gguf: tensor count %llu cannot fit in a %zu-byte file", (unsigned long long)n_tensors, size);

    gguf_file *f = calloc(1, sizeof *f);
    if (!f) return kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "gguf: out of memory");
    f->version = version;
    f->base = data;
    f->size = size;
    f->n_kv = n_kv;
    f->n_tensors = n_tensors;
    f->kv = calloc(n_kv ? n_kv : 1, sizeof *f->kv);
    f->tensors = calloc(n_tensors ? n_tensors : 1, sizeof *f->tensors);
    if (!f->kv || !f->tensors) {
        st = kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "gguf: out of memory for %llu entries", (unsigned long long)(n_kv + n_tensors));
        goto fail;
    }
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    for (uint64_t i = 0; i < n_kv; i++) {
        if ((st = parse_kv(&c, i, &f->kv[i]))) goto fail;
        if (str_eq(f->kv[i].key, "general.alignment")) {
            const gguf_kv *kv = &f->kv[i];
            uint64_t a = kv->type == GGUF_U32 || kv->type == GGUF_U64 ? kv->v.u : 0;
            if (a == 0 || (a & (a - 1)) != 0 || a > (1u << 20)) {
                st = kvqm_fail(KVQ_ERR_FORMAT, "gguf: general.alignment must be a power of two up to 1 MiB");
                goto fail;
            }
            f->alignment = a;
        }
    }
    gguf_str dup;
    int d = find_duplicate(&f->kv[0].key, sizeof *f->kv, n_kv, &dup);
    if (d) { /* llama.cpp rejects duplicate keys too: which value would count is not defined */
        st = d < 0 ? kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "gguf: out of memory")
                   : kvqm_fail(KVQ_ERR_FORMAT, "gguf: duplicate metadata key '%.*s'", dup.len > 64 ? 64 : (int)dup.len,
                               dup.ptr);
        goto fail;
    }
    for (uint64_t i = 0; i < n_tensors; i++)
        if ((st = parse_tensor(&c, i, &f->tensors[i]))) goto fail;
    uint64_t data_off = (c.pos + f->alignment - 1) / f->alignment * f->alignment;
    if (data_off > size && n_tensors > 0) {
        st = kvqm_fail(KVQ_ERR_TRUNCATED, "gguf: file ends (%zu bytes) before its tensor data section (byte %llu)", size,
                       (unsigned long long)data_off);
        goto fail;
    }
    f->data_offset = data_off;
    uint64_t avail = data_off <= size ? size - data_off : 0;
    for (uint64_t i = 0; i < n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        int nlen = t->name.len > 64 ? 64 : (int)t->name.len;
        if (t->offset % f->alignment != 0) {
            st = kvqm_fail(KVQ_ERR_FORMAT, "gguf: tensor '%.*s': offset %llu is not aligned to %llu", nlen, t->name.ptr,
                           (unsigned long long)t->offset, (unsigned long long)f->alignment);
            goto fail;
        }
        if (t->offset > avail || t->nbytes > avail - t->offset) {
            st = kvqm_fail(KVQ_ERR_TRUNCATED, "gguf: tensor '%.*s': bytes %llu..%llu of the data section are past its end (%llu bytes)",
                           nlen, t->name.ptr, (unsigned long long)t->offset,
                           (unsigned long long)(t->offset + t->nbytes), (unsigned long long)avail);
            goto fail;
        }
        t->data = data + data_off + t->offset;
    }
    if ((d = find_duplicate(&f->tensors[0].name, sizeof *f->tensors, n_tensors, &dup))) {
        st = d < 0 ? kvqm_fail(KVQ_ERR_OUT_OF_MEMORY, "gguf: out of memory")
                   : kvqm_fail(KVQ_ERR_FORMAT, "gguf: duplicate tensor name '%.*s'", dup.len > 64 ? 64 : (int)dup.len,
                               dup.ptr);
        goto fail;
    }
    *out = f;
    return KVQ_OK;
fail:
    free(f->kv);
    free(f->tensors);
    free(f);
    return st;
}

kvq_status gguf_open(const char *path, gguf_file **out) {
    if (!path || !out) return kvqm_fail(KVQ_ERR_NULL, "gguf_open: NULL argument");
    *out = NULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return kvqm_fail(KVQ_ERR_IO, "gguf: cannot open '%s'", path);
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return kvqm_fail(KVQ_ERR_IO, "gguf: '%s' is not a regular file", path);
    }
    size_t size = (size_t)sb.st_size;
    if (size < 24) {
        close(fd);
        return kvqm_fail(KVQ_ERR_TRUNCATED, "gguf: '%s' has %zu bytes, fewer than a GGUF header", path, size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd); /* the mapping keeps the file alive */
    if (map == MAP_FAILED) return kvqm_fail(KVQ_ERR_IO, "gguf: cannot mmap '%s'", path);
    gguf_file *f;
    kvq_status st = gguf_parse(map, size, &f);
    if (st) {
        munmap(map, size);
        return st;
    }
    f->mapped = 1;
    *out = f;
    return KVQ_OK;
}

void gguf_close(gguf_file *f) {
    if (!f) return;
    if (f->mapped) munmap((void *)f->base, f->size);
    free(f->kv);
    free(f->tensors);
    free(f);
}

const gguf_kv *gguf_find_kv(const gguf_file *f, const char *key) {
    if (!f || !key) return NULL;
    for (uint64_t i = 0; i < f->n_kv; i++)
        if (str_eq(f->kv[i].key, key)) return &f->kv[i];
    return NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name) {
    if (!f || !name) return NULL;
    for (uint64_t i = 0; i < f->n_tensors; i++)
        if (str_eq(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

static int is_unsigned(uint32_t t) { return t == GGUF_U8 || t == GGUF_U16 || t == GGUF_U32 || t == GGUF_U64 || t == GGUF_BOOL; }
static int is_signed(uint32_t t) { return t == GGUF_I8 || t == GGUF_I16 || t == GGUF_I32 || t == GGUF_I64; }
static int is_float(uint32_t t) { return t == GGUF_F32 || t == GGUF_F64; }

kvq_status gguf_get_i64(const gguf_file *f, const char *key, int64_t *out) {
    const gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv) return kvqm_fail(KVQ_ERR_INVALID_ARG, "gguf: missing metadata key '%s'", key);
    if (is_unsigned(kv->type)) {
        if (kv->v.u > INT64_MAX) return kvqm_fail(KVQ_ERR_FORMAT, "gguf: '%s' is out of range", key);
        *out = (int64_t)kv->v.u;
        return KVQ_OK;
    }
    if (is_signed(kv->type)) {
        *out = kv->v.i;
        return KVQ_OK;
    }
    return kvqm_fail(KVQ_ERR_FORMAT, "gguf: '%s' has type %u, expected an integer", key, kv->type);
}

kvq_status gguf_get_f64(const gguf_file *f, const char *key, double *out) {
    const gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv) return kvqm_fail(KVQ_ERR_INVALID_ARG, "gguf: missing metadata key '%s'", key);
    if (is_float(kv->type)) *out = kv->v.f;
    else if (is_unsigned(kv->type)) *out = (double)kv->v.u;
    else if (is_signed(kv->type)) *out = (double)kv->v.i;
    else return kvqm_fail(KVQ_ERR_FORMAT, "gguf: '%s' has type %u, expected a number", key, kv->type);
    return KVQ_OK;
}

int64_t gguf_get_i64_or(const gguf_file *f, const char *key, int64_t def) {
    int64_t v;
    return gguf_find_kv(f, key) && gguf_get_i64(f, key, &v) == KVQ_OK ? v : def;
}

double gguf_get_f64_or(const gguf_file *f, const char *key, double def) {
    double v;
    return gguf_find_kv(f, key) && gguf_get_f64(f, key, &v) == KVQ_OK ? v : def;
}

gguf_str gguf_get_str(const gguf_file *f, const char *key) {
    const gguf_kv *kv = gguf_find_kv(f, key);
    gguf_str none = {NULL, 0};
    return kv && kv->type == GGUF_STRING ? kv->v.str : none;
}

kvq_status gguf_arr_strings(const gguf_kv *kv, gguf_str *out) {
    if (!kv || kv->type != GGUF_ARRAY || kv->v.arr.type != GGUF_STRING)
        return kvqm_fail(KVQ_ERR_FORMAT, "gguf: not a string array");
    /* Bounds were checked at parse time; the cursor re-checks anyway, it costs nothing. */
    cursor c = {kv->v.arr.data, kv->v.arr.nbytes, 0};
    for (uint64_t i = 0; i < kv->v.arr.n; i++) {
        kvq_status st = rd_str(&c, &out[i], "array string");
        if (st) return st;
    }
    return KVQ_OK;
}

int64_t gguf_arr_i64(const gguf_kv *kv, uint64_t i) {
    gguf_kv tmp;
    memset(&tmp, 0, sizeof tmp);
    size_t es = gguf_vtype_size(kv->v.arr.type);
    if (es == 0 || i >= kv->v.arr.n) return 0;
    tmp.type = kv->v.arr.type;
    scalar_decode(kv->v.arr.type, kv->v.arr.data + i * es, &tmp);
    if (is_unsigned(tmp.type)) return (int64_t)tmp.v.u;
    if (is_signed(tmp.type)) return tmp.v.i;
    /* Float elements truncate toward zero; NaN or beyond int64 gives 0, where a cast would be undefined behaviour
     * (found by the fuzzer). */
    return tmp.v.f > -9.2e18 && tmp.v.f < 9.2e18 ? (int64_t)tmp.v.f : 0;
}

double gguf_arr_f64(const gguf_kv *kv, uint64_t i) {
    gguf_kv tmp;
    memset(&tmp, 0, sizeof tmp);
    size_t es = gguf_vtype_size(kv->v.arr.type);
    if (es == 0 || i >= kv->v.arr.n) return 0;
    tmp.type = kv->v.arr.type;
    scalar_decode(kv->v.arr.type, kv->v.arr.data + i * es, &tmp);
    if (is_unsigned(tmp.type)) return (double)tmp.v.u;
    if (is_signed(tmp.type)) return (double)tmp.v.i;
    return tmp.v.f == tmp.v.f ? tmp.v.f : -HUGE_VAL; /* NaN: last, so that sorting by it stays a total order */
}

/* IEEE half to float, subnormals included. */
static float half_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        float v = ldexpf((float)man, -24);
        return sign ? -v : v;
    }
    if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* Sub-block j (0..7) scale and min of Q4_K/Q5_K: 6 bits each, packed in 12 bytes (ggml's get_scale_min_k4):
 * bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; bytes 8-11 the low 4 bits of scales 4-7
 * (low nibble) and mins 4-7 (high nibble), whose top 2 bits are the top bits of bytes 0-3 / 4-7. */
static void k4_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* One block of each type: src -> y[blk_elems]. Codes are ggml's; comments give the element order. */
static void deq_q4_0(const uint8_t *p, float *y) { /* x = d * (q - 8); byte j: element j (low), j + 16 (high) */
    float d = half_to_f32(rd16(p));
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((p[2 + j] & 0x0f) - 8);
        y[j + 16] = d * (float)((p[2 + j] >> 4) - 8);
    }
}
static void deq_q4_1(const uint8_t *p, float *y) { /* x = d * q + m, same order as Q4_0 */
    float d = half_to_f32(rd16(p)), m = half_to_f32(rd16(p + 2));
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)(p[4 + j] & 0x0f) + m;
        y[j + 16] = d * (float)(p[4 + j] >> 4) + m;
    }
}
static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static void deq_q5_0(const uint8_t *p, float *y) { /* x = d * (q - 16); bit j of qh is bit 4 of element j */
    float d = half_to_f32(rd16(p));
    uint32_t qh = rd32(p + 2);
    for (int j = 0; j < 16; j++) {
        int lo = (p[6 + j] & 0x0f) | (int)((qh >> j) & 1) << 4, hi = (p[6 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (float)(lo - 16);
        y[j + 16] = d * (float)(hi - 16);
    }
}
static void deq_q5_1(const uint8_t *p, float *y) { /* x = d * q + m, bits as Q5_0 */
    float d = half_to_f32(rd16(p)), m = half_to_f32(rd16(p + 2));
    uint32_t qh = rd32(p + 4);
    for (int j = 0; j < 16; j++) {
        int lo = (p[8 + j] & 0x0f) | (int)((qh >> j) & 1) << 4, hi = (p[8 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (float)lo + m;
        y[j + 16] = d * (float)hi + m;
    }
}
static void deq_q8_0(const uint8_t *p, float *y) { /* x = d * q */
    float d = half_to_f32(rd16(p));
    for (int j = 0; j < 32; j++) y[j] = d * (float)(int8_t)p[2 + j];
}
/* Q2_K: 16 sub-blocks of 16; x = d * sc * q - dmin * m with q in 0..3. Each 32-byte half of qs holds 128
 * elements: bits 2s..2s+1 of byte l are element 32 s + l of that half. */
static void deq_q2_k(const uint8_t *p, float *y) {
    const uint8_t *sc = p, *qs = p + 16;
    float d = half_to_f32(rd16(p + 80)), dmin = half_to_f32(rd16(p + 82));
    for (int half = 0; half < 2; half++, qs += 32)
        for (int s = 0; s < 4; s++)
            for (int k = 0; k < 2; k++) { /* sub-block of 16: bytes 16 k .. 16 k + 15 of this half */
                int is = half * 8 + s * 2 + k;
                float dl = d * (float)(sc[is] & 0x0f), ml = dmin * (float)(sc[is] >> 4);
                for (int l = 0; l < 16; l++) *y++ = dl * (float)((qs[16 * k + l] >> (2 * s)) & 3) - ml;
            }
}
/* Q3_K: the low 2 bits laid out as Q2_K's; element i's high bit is bit i / 32 of hmask[i % 32], and a clear high
 * bit means q - 4. Sub-block scales are 6-bit, offset by 32: low
 * nibbles in bytes 0-7 (scales 0-7 low, 8-15 high nibble), top 2 bits in bytes 8-11 (bits 2k..2k+1 of byte 8 + j
 * belong to scale j + 4 k). */
static void deq_q3_k(const uint8_t *p, float *y) {
    const uint8_t *hm = p, *qs = p + 32, *sb = p + 96;
    float d = half_to_f32(rd16(p + 108));
    int8_t sc[16];
    for (int j = 0; j < 16; j++) {
        int lo = j < 8 ? sb[j] & 0x0f : sb[j - 8] >> 4, hi = (sb[8 + j % 4] >> (2 * (j / 4))) & 3;
        sc[j] = (int8_t)((lo | hi << 4) - 32);
    }
    for (int half = 0; half < 2; half++, qs += 32)
        for (int s = 0; s < 4; s++)
            for (int k = 0; k < 2; k++) {
                float dl = d * (float)sc[half * 8 + s * 2 + k];
                for (int l = 0; l < 16; l++) {
                    int q = (qs[16 * k + l] >> (2 * s)) & 3, h = (hm[16 * k + l] >> (half * 4 + s)) & 1;
                    *y++ = dl * (float)(q - (h ? 0 : 4));
                }
            }
}
/* Q4_K: 8 sub-blocks of 32; x = d * sc * q - dmin * m. Each 32 bytes of qs hold two sub-blocks: low nibbles the
 * first, high nibbles the second. */
static void deq_q4_k(const uint8_t *p, float *y) {
    float d = half_to_f32(rd16(p)), dmin = half_to_f32(rd16(p + 2));
    const uint8_t *scales = p + 4, *qs = p + 16;
    for (int j = 0; j < 8; j += 2, qs += 32) {
        uint8_t s0, m0, s1, m1;
        k4_scale_min(j, scales, &s0, &m0);
        k4_scale_min(j + 1, scales, &s1, &m1);
        float d0 = d * (float)s0, dm0 = dmin * (float)m0, d1 = d * (float)s1, dm1 = dmin * (float)m1;
        for (int l = 0; l < 32; l++) y[l] = d0 * (float)(qs[l] & 0x0f) - dm0;
        for (int l = 0; l < 32; l++) y[32 + l] = d1 * (float)(qs[l] >> 4) - dm1;
        y += 64;
    }
}
/* Q5_K: Q4_K plus a fifth bit: bit j of qh[l] is the high bit of element 32 j + l. */
static void deq_q5_k(const uint8_t *p, float *y) {
    float d = half_to_f32(rd16(p)), dmin = half_to_f32(rd16(p + 2));
    const uint8_t *scales = p + 4, *qh = p + 16, *qs = p + 48;
    for (int j = 0; j < 8; j += 2, qs += 32) {
        uint8_t s0, m0, s1, m1;
        k4_scale_min(j, scales, &s0, &m0);
        k4_scale_min(j + 1, scales, &s1, &m1);
        float d0 = d * (float)s0, dm0 = dmin * (float)m0, d1 = d * (float)s1, dm1 = dmin * (float)m1;
        for (int l = 0; l < 32; l++) y[l] = d0 * (float)((qs[l] & 0x0f) | ((qh[l] >> j) & 1) << 4) - dm0;
        for (int l = 0; l < 32; l++) y[32 + l] = d1 * (float)((qs[l] >> 4) | ((qh[l] >> (j + 1)) & 1) << 4) - dm1;
        y += 64;
    }
}
/* Q6_K: 16 sub-blocks of 16 with int8 scales; x = d * sc * (q - 32), q 6 bits. Per 128 elements: 64 bytes of ql
 * (elements l and l + 64 in byte l's low/high nibble, l + 32 and l + 96 in byte l + 32's) and 32 of qh (bits 2s..2s+1
 * of byte l are the top bits of element 32 s + l). */
static void deq_q6_k(const uint8_t *p, float *y) {
    const uint8_t *ql = p, *qh = p + 128;
    const int8_t *sc = (const int8_t *)(p + 192);
    float d = half_to_f32(rd16(p + 208));
    for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, y += 128)
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            int q1 = ((ql[l] & 0x0f) | ((qh[l] >> 0) & 3) << 4) - 32;
            int q2 = ((ql[l + 32] & 0x0f) | ((qh[l] >> 2) & 3) << 4) - 32;
            int q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
            int q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
            y[l] = d * (float)sc[is] * (float)q1;
            y[l + 32] = d * (float)sc[is + 2] * (float)q2;
            y[l + 64] = d * (float)sc[is + 4] * (float)q3;
            y[l + 96] = d * (float)sc[is + 6] * (float)q4;
        }
}

kvq_status gguf_dequantize_row(uint32_t type, const uint8_t *src, float *dst, uint64_t n) {
    if (!src || !dst) return kvqm_fail(KVQ_ERR_NULL, "gguf_dequantize_row: NULL argument");
    uint64_t be, bb;
    if (!ggml_type_block(type, &be, &bb))
        return kvqm_fail(KVQ_ERR_FORMAT, "gguf: cannot dequantize ggml type %u (%s)", type, ggml_type_name(type));
    if (n % be != 0)
        return kvqm_fail(KVQ_ERR_INVALID_ARG,
                         "gguf_dequantize_row: %llu elements is not a multiple of the %s block (%llu)", (unsigned long long)n,
                         ggml_type_name(type), (unsigned long long)be);
    void (*blk)(const uint8_t *, float *) = NULL;
    switch (type) {
    case GGML_F32: memcpy(dst, src, n * 4); return KVQ_OK;
    case GGML_F16:
        for (uint64_t i = 0; i < n; i++) dst[i] = half_to_f32(rd16(src + 2 * i));
        return KVQ_OK;
    case GGML_BF16:
        for (uint64_t i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)rd16(src + 2 * i) << 16;
            memcpy(&dst[i], &bits, 4);
        }
        return KVQ_OK;
    case GGML_Q4_0: blk = deq_q4_0; break;
    case GGML_Q4_1: blk = deq_q4_1; break;
    case GGML_Q5_0: blk = deq_q5_0; break;
    case GGML_Q5_1: blk = deq_q5_1; break;
    case GGML_Q8_0: blk = deq_q8_0; break;
    case GGML_Q2_K: blk = deq_q2_k; break;
    case GGML_Q3_K: blk = deq_q3_k; break;
    case GGML_Q4_K: blk = deq_q4_k; break;
    case GGML_Q5_K: blk = deq_q5_k; break;
    case GGML_Q6_K: blk = deq_q6_k; break;
    }
    for (uint64_t b = 0; b < n / be; b++) blk(src + b * bb, dst + b * be);
    return KVQ_OK;
}

kvq_status gguf_tensor_to_f32(const gguf_tensor *t, float *out) {
    if (!t || !out) return kvqm_fail(KVQ_ERR_NULL, "gguf_tensor_to_f32: NULL argument");
    /* The parser checked the type and that ne[0] is a multiple of its block, so the whole tensor is whole blocks. */
    return gguf_dequantize_row(t->type, t->data, out, t->n_elements);
}
