/* The type traits table and the page layout of kvq.h section 5. */
#include "internal.h"

#include <ctype.h>
#include <string.h>

static const kvq_type_traits traits[KVQ_TYPE_COUNT] = {
    [KVQ_TYPE_F16] = {"f16", 16, 0, 1},
    [KVQ_TYPE_BF16] = {"bf16", 16, 0, 1},
    [KVQ_TYPE_Q8] = {"q8", 8, 0, 1},
    [KVQ_TYPE_FP8] = {"fp8", 8, 0, 1},
    [KVQ_TYPE_Q4] = {"q4", 4, 1, 1},
    [KVQ_TYPE_Q2] = {"q2", 2, 1, 1},
    [KVQ_TYPE_Q3] = {"q3", 3, 1, 1},
};

const kvq_type_traits *kvq_type_get_traits(kvq_type t) {
    if ((int)t < 0 || (int)t >= KVQ_TYPE_COUNT) return NULL;
    return &traits[t];
}

kvq_status kvq_type_from_name(const char *name, kvq_type *out) {
    KVQ_CHECK_NULL(name, "kvq_type_from_name");
    KVQ_CHECK_NULL(out, "kvq_type_from_name");
    for (int t = 0; t < KVQ_TYPE_COUNT; t++) {
        const char *a = traits[t].name, *b = name;
        while (*a && *b && tolower((unsigned char)*b) == *a) a++, b++;
        if (!*a && !*b) {
            if (!traits[t].implemented)
                return kvq__fail(KVQ_ERR_UNSUPPORTED_TYPE, "kv type '%s' is reserved, not implemented", name);
            *out = (kvq_type)t;
            return KVQ_OK;
        }
    }
    return kvq__fail(KVQ_ERR_UNSUPPORTED_TYPE, "unknown kv type '%s' (expected f16, bf16, q8, fp8, q4, q3, q2)", name);
}

/* Q3: D/4 bytes of low 2 bits then D/8 bytes of high bits, 3D/8 in all (D is a multiple of 16) */
size_t kvq__row_bytes(kvq_type t, int D) { return (size_t)D * (size_t)traits[t].bits / 8; }

int kvq__value_group(int D, int G) {
    if (D % G == 0) return G;
    int g = 1;
    while (g * 2 <= G && D % (g * 2) == 0) g *= 2;
    return g;
}

static bool head_dim_ok(int D) { return D == 64 || D == 80 || D == 96 || D == 128 || D == 256; }

static size_t pad16(size_t n) { return (n + 15) & ~(size_t)15; }

/* p8: 8-bit parameters (an fp16 base per group of G tokens and two bytes per pair) */
static size_t param_bytes(kvq_type t, kvq_role role, int P, int D, int G, int Gv, bool p8) {
    switch (t) {
    case KVQ_TYPE_Q8:
    case KVQ_TYPE_FP8: return (size_t)P * 2;
    case KVQ_TYPE_Q4:
    case KVQ_TYPE_Q3:
    case KVQ_TYPE_Q2: {
        size_t pairs = kvq__param_pairs(role, P, D, G, Gv);
        return p8 ? (size_t)(P / G) * 2 + pairs * 2 : pairs * 4;
    }
    default: return 0;
    }
}

static kvq_status check_type(kvq_type t, const char *what) {
    const kvq_type_traits *tr = kvq_type_get_traits(t);
    if (!tr) return kvq__fail(KVQ_ERR_UNSUPPORTED_TYPE, "%s: %d is not a kvq_type", what, (int)t);
    if (!tr->implemented)
        return kvq__fail(KVQ_ERR_UNSUPPORTED_TYPE, "%s: type '%s' is reserved, not implemented", what, tr->name);
    return KVQ_OK;
}

kvq_status kvq_page_layout_make(kvq_type tk, kvq_type tv, int H, int D, int P, int G, kvq_page_layout *out) {
    KVQ_CHECK_NULL(out, "kvq_page_layout_make");
    kvq_status s;
    if ((s = check_type(tk, "type_k")) || (s = check_type(tv, "type_v"))) return s;
    if (!head_dim_ok(D))
        return kvq__fail(KVQ_ERR_UNSUPPORTED_HEAD_DIM, "head_dim %d is not one of 64, 80, 96, 128, 256", D);
    if (H < 1 || H > 1024) return kvq__fail(KVQ_ERR_INVALID_ARG, "n_kv_heads %d outside 1..1024", H);
    if (G == 0) G = 64;
    if (G != 16 && G != 32 && G != 64 && G != 128)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "group %d is not one of 16, 32, 64, 128", G);
    if (P == 0) P = 64;
    bool grouped = traits[tk].grouped || traits[tv].grouped;
    if (P < 16 || P > 4096 || P % 16 != 0 || (grouped && P % G != 0))
        return kvq__fail(KVQ_ERR_INVALID_ARG, "page_tokens %d must be a multiple of 16%s in 16..4096", P,
                         grouped ? " and of the group size" : "");
    kvq_page_layout L;
    memset(&L, 0, sizeof L); /* padding too: layouts compare equal with memcmp */
    L.page_tokens = P;
    L.head_dim = D;
    L.n_kv_heads = H;
    L.group = grouped ? G : 1;
    L.value_group = kvq__value_group(D, G);
    L.type_k = tk;
    L.type_v = tv;
    L.k_row_bytes = kvq__row_bytes(tk, D);
    L.v_row_bytes = kvq__row_bytes(tv, D);
    L.k_block_bytes = pad16(L.k_row_bytes * (size_t)P + param_bytes(tk, KVQ_KEY, P, D, G, L.value_group, false));
    L.v_block_bytes = pad16(L.v_row_bytes * (size_t)P + param_bytes(tv, KVQ_VALUE, P, D, G, L.value_group, false));
    L.k_offset = 0;
    L.v_offset = (size_t)H * L.k_block_bytes;
    L.page_bytes = L.v_offset + (size_t)H * L.v_block_bytes;
    *out = L;
    return KVQ_OK;
}

/* byte offset of a block's outlier section: its data rows and params */
size_t kvq__outlier_offset(const kvq_page_layout *L, kvq_role role) {
    kvq_type t = role == KVQ_KEY ? L->type_k : L->type_v;
    size_t rb = role == KVQ_KEY ? L->k_row_bytes : L->v_row_bytes;
    return rb * (size_t)L->page_tokens +
           param_bytes(t, role, L->page_tokens, L->head_dim, L->group, L->value_group, kvq__p8(L, role));
}

void kvq__layout_set_sections(kvq_page_layout *L, int params8, int outliers) {
    int grouped = (traits[L->type_k].grouped ? KVQ_ROLES_K : 0) | (traits[L->type_v].grouped ? KVQ_ROLES_V : 0);
    L->params8 = params8 & grouped;
    L->outliers = outliers & grouped;
    L->k_block_bytes = pad16(kvq__outlier_offset(L, KVQ_KEY) + 3 * kvq__outlier_count(L, KVQ_KEY));
    L->v_block_bytes = pad16(kvq__outlier_offset(L, KVQ_VALUE) + 3 * kvq__outlier_count(L, KVQ_VALUE));
    L->v_offset = (size_t)L->n_kv_heads * L->k_block_bytes;
    L->page_bytes = L->v_offset + (size_t)L->n_kv_heads * L->v_block_bytes;
}

double kvq_type_bytes_per_token(kvq_type t, kvq_role role, int head_dim, int group) {
    if (role != KVQ_KEY && role != KVQ_VALUE) return 0;
    kvq_page_layout L;
    /* a page of 128 tokens is a multiple of every group size, so the amortization is exact */
    if (kvq_page_layout_make(t, t, 1, head_dim, 128, group, &L) != KVQ_OK) return 0;
    return (double)(role == KVQ_KEY ? L.k_block_bytes : L.v_block_bytes) / L.page_tokens;
}
