#include "gguf_write.h"

#include <math.h>
#include <string.h>

#define ALIGN 32

uint16_t gguf_f32_to_f16(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    uint32_t sign = (b >> 16) & 0x8000u, e = (b >> 23) & 0xffu, m = b & 0x7fffffu;
    if (e == 0xff) return (uint16_t)(sign | 0x7c00u | (m ? 0x200u : 0)); /* Inf, NaN (quiet) */
    int ex = (int)e - 127 + 15;
    if (ex >= 31) return (uint16_t)(sign | 0x7c00u);
    if (ex <= 0) {
        if (ex < -10) return (uint16_t)sign; /* below half the smallest subnormal: +-0 */
        m |= 0x800000u;                      /* the implicit bit */
        int shift = 14 - ex;                 /* 24-bit mantissa down to the subnormal's 10 bits at 2^-24 */
        uint32_t h = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)ex << 10) | (m >> 13), rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++; /* a carry into the exponent is the right result */
    return (uint16_t)(sign | h);
}

size_t gguf_row_bytes(uint32_t t, size_t n) {
    switch (t) {
    case GGML_F32: return n * 4;
    case GGML_F16: return n * 2;
    case GGML_Q8_0: return n % 32 ? 0 : n / 32 * 34;
    case GGML_Q4_0: return n % 32 ? 0 : n / 32 * 18;
    default: return 0;
    }
}

static void put16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

int gguf_quantize_row(uint32_t t, const float *x, size_t n, uint8_t *out) {
    if (!gguf_row_bytes(t, n) && n) return -1;
    switch (t) {
    case GGML_F32: memcpy(out, x, n * 4); return 0;
    case GGML_F16:
        for (size_t i = 0; i < n; i++) put16(out + 2 * i, gguf_f32_to_f16(x[i]));
        return 0;
    case GGML_Q8_0: /* d = amax / 127, q = round-half-away(x * (1/d)) */
        for (size_t b = 0; b < n / 32; b++, x += 32, out += 34) {
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
            float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
            put16(out, gguf_f32_to_f16(d));
            for (int j = 0; j < 32; j++) out[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
        }
        return 0;
    case GGML_Q4_0: /* d = (the element of largest |x|, first on ties) / -8, q = min(15, trunc(x / d + 8.5)) */
        for (size_t b = 0; b < n / 32; b++, x += 32, out += 18) {
            float amax = 0, max = 0;
            for (int j = 0; j < 32; j++)
                if (fabsf(x[j]) > amax) amax = fabsf(x[j]), max = x[j];
            float d = max / -8.0f, id = d != 0 ? 1.0f / d : 0.0f;
            put16(out, gguf_f32_to_f16(d));
            for (int j = 0; j < 16; j++) {
                int q0 = (int)(x[j] * id + 8.5f), q1 = (int)(x[j + 16] * id + 8.5f);
                q0 = q0 > 15 ? 15 : q0, q1 = q1 > 15 ? 15 : q1;
                out[2 + j] = (uint8_t)(q0 | (q1 << 4));
            }
        }
        return 0;
    default: return -1;
    }
}

static int w_u32(FILE *f, uint32_t v) { return fwrite(&v, 4, 1, f) == 1 ? 0 : -1; }
static int w_u64(FILE *f, uint64_t v) { return fwrite(&v, 8, 1, f) == 1 ? 0 : -1; }
static int w_str(FILE *f, const char *s) {
    size_t n = strlen(s);
    return w_u64(f, n) || (n && fwrite(s, 1, n, f) != n) ? -1 : 0;
}

int gguf_write_pad(FILE *f, uint64_t written) {
    static const uint8_t zero[ALIGN];
    size_t pad = (size_t)((ALIGN - written % ALIGN) % ALIGN);
    return pad && fwrite(zero, 1, pad, f) != pad ? -1 : 0;
}

int gguf_write_header(FILE *f, const gguf_wkv *kv, size_t n_kv, const gguf_wtensor *t, size_t n_t, uint64_t *data_bytes) {
    uint64_t pos = 0;
    if (fwrite("GGUF", 1, 4, f) != 4 || w_u32(f, 3) || w_u64(f, n_t) || w_u64(f, n_kv)) return -1;
    for (size_t i = 0; i < n_kv; i++) {
        const gguf_wkv *k = &kv[i];
        if (w_str(f, k->key) || w_u32(f, k->type)) return -1;
        int bad = 0;
        switch (k->type) {
        case GGUF_U32: bad = w_u32(f, (uint32_t)k->u); break;
        case GGUF_BOOL: bad = fputc(k->u ? 1 : 0, f) == EOF; break;
        case GGUF_F32: {
            float v = (float)k->f;
            bad = fwrite(&v, 4, 1, f) != 1;
            break;
        }
        case GGUF_STRING: bad = w_str(f, k->s); break;
        case GGUF_ARRAY:
            bad = w_u32(f, k->arr_type) || w_u64(f, k->arr_n);
            for (uint64_t j = 0; j < k->arr_n && !bad; j++)
                bad = k->arr_type == GGUF_STRING ? w_str(f, k->arr_strs[j]) : fwrite(&k->arr_i32[j], 4, 1, f) != 1;
            break;
        default: return -1;
        }
        if (bad) return -1;
    }
    for (size_t i = 0; i < n_t; i++) {
        uint64_t ne = 1;
        if (w_str(f, t[i].name) || w_u32(f, t[i].n_dims)) return -1;
        for (uint32_t d = 0; d < t[i].n_dims; d++) {
            if (w_u64(f, t[i].ne[d])) return -1;
            ne *= t[i].ne[d];
        }
        size_t nb = gguf_row_bytes(t[i].type, (size_t)ne);
        if (!nb || w_u32(f, t[i].type) || w_u64(f, pos)) return -1;
        pos += (nb + ALIGN - 1) / ALIGN * ALIGN;
    }
    long here = ftell(f);
    if (here < 0 || gguf_write_pad(f, (uint64_t)here)) return -1;
    *data_bytes = pos;
    return 0;
}
