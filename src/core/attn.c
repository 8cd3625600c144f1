/* CPU attention straight from the pages: the driver walks a sequence's pages and window a block at a time,
 * decoding KVQ_TILE rows into an L1-resident tile, with an fp32 online softmax. Work is split over
 * (sequence, KV head, token chunk) items (flash-decoding), whose partial results are merged at the end. */
#include "attn.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- scalar reference kernels ---- */

static void decode_ref(const kvq__blk *b, int j0, int n, float *out) {
    for (int i = 0; i < n; i++)
        kvq__dequant_row(b->type, b->lv16, b->role, b->data + (size_t)(j0 + i) * b->stride, b->par, j0 + i, b->D, b->G, b->Gv,
                         out + (size_t)i * b->D);
}

static void dots_ref(const float *q, int rows, int D, const float *x, int n, float *s, int ss) {
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i++) {
            float a = 0;
            for (int c = 0; c < D; c++) a += q[(size_t)r * D + c] * x[(size_t)i * D + c];
            s[(size_t)r * ss + i] = a;
        }
}

static void axpys_ref(const float *p, int ps, int rows, int D, const float *x, int n, float *acc) {
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i++)
            for (int c = 0; c < D; c++) acc[(size_t)r * D + c] += p[(size_t)r * ps + i] * x[(size_t)i * D + c];
}

static float max_ref(const float *x, int n) {
    float m = x[0];
    for (int i = 0; i < n; i++) {
        if (isnan(x[i])) return NAN; /* a comparison alone would drop it */
        m = x[i] > m ? x[i] : m;
    }
    return m;
}

static float exp_sum_ref(float *x, int n, float m) {
    float sum = 0;
    for (int i = 0; i < n; i++) sum += (x[i] = expf(x[i] - m));
    return sum;
}

static void scale_ref(float *x, int n, float s) {
    for (int i = 0; i < n; i++) x[i] *= s;
}

void kvq__rope_rows_ref(float *x, int n, int D, int neox, const float *C, const float *S) {
    const int h = D / 2;
    for (int i = 0; i < n; i++, x += D, C += D, S += D)
        for (int j = 0; j < h; j++) {
            int c0 = neox ? j : 2 * j, c1 = neox ? j + h : 2 * j + 1;
            float a = x[c0], b = x[c1];
            x[c0] = a * C[c0] + b * S[c0];
            x[c1] = b * C[c1] + a * S[c1];
        }
}

static void unrot_rope_ref(float *x, int n, const kvq__rot *r, int neox, const float *C, const float *S) {
    for (int i = 0; i < n; i++) kvq__rot_apply(r, x + (size_t)i * r->D, 1);
    kvq__rope_rows_ref(x, n, r->D, neox, C, S);
}

const kvq__kernels kvq__kernels_ref = {"scalar", decode_ref, dots_ref, axpys_ref, exp_sum_ref, max_ref, scale_ref, NULL, NULL,
                                       kvq__rope_rows_ref, unrot_rope_ref, kvq__p8_expand_ref, kvq__w8_expand_ref};

/* ---- pre-RoPE keys (kvq.h section 10) ---- */

kvq_status kvq__rope_init(kvq_cache *c) {
    const int h = c->L.head_dim / 2;
    c->rope_f = kvq__malloc((size_t)h * sizeof(float));
    c->rope_kc = kvq__malloc((size_t)KVQ_ROPE_STEPS * h * sizeof(float));
    c->rope_ks = kvq__malloc((size_t)KVQ_ROPE_STEPS * h * sizeof(float));
    if (!c->rope_f || !c->rope_kc || !c->rope_ks)
        return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "kvq_cache_create: no memory for the RoPE tables");
    for (int i = 0; i < h; i++)
        c->rope_f[i] = c->cfg.rope_freqs ? c->cfg.rope_freqs[i]
                                         : (float)pow((double)c->cfg.rope_theta, -2.0 * i / c->L.head_dim);
    for (int k = 0; k < KVQ_ROPE_STEPS; k++)
        for (int i = 0; i < h; i++) {
            double a = (double)k * c->rope_f[i];
            c->rope_kc[(size_t)k * h + i] = (float)cos(a), c->rope_ks[(size_t)k * h + i] = (float)sin(a);
        }
    c->cfg.rope_freqs = c->rope_f; /* the cache's copy: the caller's array is borrowed for the call only */
    return KVQ_OK;
}

kvq_status kvq_rope_apply(const kvq_cache *c, int64_t pos0, int64_t n_tokens, int inverse, float *x) {
    const char *fn = "kvq_rope_apply";
    KVQ_CHECK_NULL(c, fn);
    if (!c->cfg.prerope) return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: the cache has no RoPE (prerope = 0)", fn);
    if (pos0 < 0 || n_tokens < 0 || n_tokens > INT64_MAX - pos0)
        return kvq__fail(KVQ_ERR_RANGE, "%s: positions %lld + %lld tokens: negative or past INT64_MAX", fn, (long long)pos0,
                         (long long)n_tokens);
    if (inverse != 0 && inverse != 1) return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: inverse %d is not 0 or 1", fn, inverse);
    if (n_tokens == 0) return KVQ_OK;
    KVQ_CHECK_NULL(x, fn);
    const int D = c->L.head_dim, h = D / 2, H = c->L.n_kv_heads, neox = c->cfg.rope_neox;
    for (int64_t t = 0; t < n_tokens; t++)
        for (int i = 0; i < h; i++) {
            double a = (double)(pos0 + t) * c->rope_f[i], cs = cos(a), sn = inverse ? -sin(a) : sin(a);
            int c0 = neox ? i : 2 * i, c1 = neox ? i + h : 2 * i + 1;
            for (int hh = 0; hh < H; hh++) {
                float *v = x + ((size_t)t * H + hh) * D;
                double a0 = v[c0], a1 = v[c1];
                v[c0] = (float)(a0 * cs - a1 * sn), v[c1] = (float)(a0 * sn + a1 * cs);
            }
        }
    return KVQ_OK;
}

/* The segment's first angles t0 f_i in double (exact enough past 2^31 positions: cos/sin reduce the full argument),
 * then the steps k f_i of the cache's table by angle addition in fp32 (error ~1e-7, below fp16 keys' 5e-4) */
void kvq__rope_tables(const kvq_cache *c, int64_t t0, int n, float *C, float *S) {
    const int D = c->L.head_dim, h = D / 2, neox = c->cfg.rope_neox;
    float ca[128], sa[128];
    for (int i = 0; i < h; i++) {
        double a = (double)t0 * c->rope_f[i];
        ca[i] = (float)cos(a), sa[i] = (float)sin(a);
    }
    /* per step: the angles, then their layout, in loops without index arithmetic, which the compiler vectorizes (the
     * tables are rebuilt for every 64-token segment of every decode call) */
    float cs[128], sn[128];
    for (int k = 0; k < n; k++) {
        const float *kc = c->rope_kc + (size_t)k * h, *ks = c->rope_ks + (size_t)k * h;
        float *Ck = C + (size_t)k * D, *Sk = S + (size_t)k * D;
        for (int i = 0; i < h; i++) cs[i] = ca[i] * kc[i] - sa[i] * ks[i], sn[i] = sa[i] * kc[i] + ca[i] * ks[i];
        if (neox)
            for (int i = 0; i < h; i++) Ck[i] = Ck[i + h] = cs[i], Sk[i] = -sn[i], Sk[i + h] = sn[i];
        else
            for (int i = 0; i < h; i++) Ck[2 * i] = Ck[2 * i + 1] = cs[i], Sk[2 * i] = -sn[i], Sk[2 * i + 1] = sn[i];
    }
}

/* KVQ_FORCE_SCALAR=1: the _ref kernels. KVQ_CPU_KERNELS=scalar|avx2|avx512: that table, or where the CPU
 * lacks it, the best one below it (other values: ignored). Else the best the CPU has: avx512, avx2, scalar */
static const kvq__kernels *pick_kernels(void) {
    const char *e = getenv("KVQ_FORCE_SCALAR");
    if (e && *e && *e != '0') return &kvq__kernels_ref;
    int level = 2; /* 0 scalar, 1 avx2, 2 avx512 */
    const char *want = getenv("KVQ_CPU_KERNELS");
    if (want && !strcmp(want, "scalar"))
        level = 0;
    else if (want && !strcmp(want, "avx2"))
        level = 1;
    const kvq__kernels *k = NULL;
    if (level >= 2) k = kvq__kernels_avx512();
    if (!k && level >= 1) k = kvq__kernels_avx2();
    return k ? k : &kvq__kernels_ref;
}

const char *kvq_cpu_backend(void) { return pick_kernels()->name; }

kvq_attn_params kvq_attn_params_default(int n_q_heads) {
    kvq_attn_params p = {n_q_heads, 0.0f, 0, 0.0f};
    return p;
}

/* ---- driver ---- */

#define MAX_ROWS 64 /* query rows handled together: heads sharing a KV head x queries of a prefill block */

#define MAX_ITEM_HEADS 16 /* KV heads one decode work item walks together */

typedef struct work {
    const kvq_cache *c;
    const kvq__rot *kunrot; /* pre-RoPE keys stored rotated: R^T per key row before RoPE (NULL: none) */
    const kvq_seq_layer *sl;
    int h, nh;          /* KV heads h .. h + nh - 1 */
    size_t q_stride;    /* floats from one head's q rows to the next head's */
    size_t st_stride;   /* floats from one head's m to the next head's (l and acc move with it) */
    int64_t t0, t1;     /* key tokens */
    const float *q;     /* [rows][D], already multiplied by the attention scale */
    const int64_t *pos; /* [rows] query positions */
    int rows;
    float *m, *l, *acc; /* outputs: [rows], [rows], [rows][D] */
    /* kvq_attn_prefill_exact: the batch's own rows after the cached tokens, fp16 [xn][n_kv_heads][D] in the window's
     * form (rotated roles rotated), at positions xpos .. xpos + xn - 1 (xn = 0: none) */
    const uint16_t *xk, *xv;
    int64_t xpos;
    int xn;
} work;

typedef struct scratch {
    kvq__qstate qst[MAX_ITEM_HEADS];
    float s[MAX_ROWS * KVQ_TILE * 8]; /* scores / probabilities of one segment: rows x up to SEG tokens */
    float x[KVQ_TILE * 256];
    /* pre-RoPE keys: the RoPE tables [SEG][D] of the segment at rope_t0 (rope_n tokens), reused by the heads that
     * follow (same positions); rope_n = 0: none yet */
    float *rope_c, *rope_s;
    int64_t rope_t0;
    int rope_n;
    /* 8-bit parameters: the current key and value blocks' pairs in fp16 (kvq__params_halves each; NULL: none) */
    uint16_t *pk, *pv;
    /* 8-bit windows: one head's window rows in fp16 [W][D] per 8-bit role (NULL: the role's window is fp16) */
    uint16_t *wk, *wv;
} scratch;

#define SEG (KVQ_TILE * 8) /* tokens per softmax segment */

static kvq__blk page_blk(const kvq_cache *c, int32_t pg, int h, kvq_role role) {
    const kvq_page_layout *L = &c->L;
    kvq__blk b;
    b.type = role == KVQ_KEY ? L->type_k : L->type_v;
    b.role = role;
    b.data = role == KVQ_KEY ? kvq__kblock(c, pg, h) : kvq__vblock(c, pg, h);
    b.stride = role == KVQ_KEY ? L->k_row_bytes : L->v_row_bytes;
    b.par = b.type == KVQ_TYPE_F16 || b.type == KVQ_TYPE_BF16 ? NULL : kvq__block_params(b.data, b.stride, L->page_tokens);
    b.D = L->head_dim;
    b.G = L->group;
    b.Gv = L->value_group;
    b.lv16 = kvq__layout_levels(L, role);
    b.pf_k = b.pf_v = NULL, b.pf_k_lines = b.pf_v_lines = 0;
    b.ores = kvq__outlier_res(L, role, b.data);
    b.oidx = kvq__outlier_idx(L, role, b.data);
    return b;
}

static kvq__blk window_blk(const kvq_cache *c, const uint16_t *w, int h) {
    kvq__blk b = {KVQ_TYPE_F16, KVQ_KEY, NULL, 0, NULL, NULL, c->L.head_dim, 1, 1, NULL, NULL, 0, 0, NULL, NULL};
    b.data = (const uint8_t *)(w + (size_t)h * c->L.head_dim);
    b.stride = (size_t)c->L.n_kv_heads * c->L.head_dim * sizeof(uint16_t);
    return b;
}

/* The residual window of one role and head, rows [r0, r1): fp16 in place, or an 8-bit window's rows expanded into
 * out [W][D] at their own row indices (a cost of the window's size, not the context's) */
static kvq__blk res_window_blk(const kvq_cache *c, const kvq__kernels *K, const kvq_seq_layer *sl, kvq_role role, int h,
                               int r0, int r1, uint16_t *out) {
    if (!kvq__win8(c, role)) return window_blk(c, (const uint16_t *)(const void *)(role == KVQ_KEY ? sl->wk : sl->wv), h);
    const int D = c->L.head_dim;
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = kvq__win_row(c, sl, role, r);
        K->w8_expand(kvq__win8_codes(c, row, h), kvq__win8_scale(c, row, h), D, out + (size_t)r * D);
    }
    kvq__blk b = window_blk(c, out, 0);
    b.stride = (size_t)D * sizeof(uint16_t);
    return b;
}

/* fp16 -> fp32 of a residual (finite: clamped to +-65504 when stored), branch-free: the half's sign, exponent and
 * mantissa bits moved into a float's and scaled by 2^112, exact for normals and subnormals alike (no branch, so that
 * a loop of them vectorizes) */
static inline float res_f32(uint16_t h) {
    uint32_t u = (uint32_t)(h & 0x7fff) << 13 | (uint32_t)(h & 0x8000) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f * 0x1p112f;
}

/* Dense-and-sparse outliers (kvq.h section 10): what the kernels' dense decode left out, added by the driver. Keys:
 * s[r][j - a] += q[r][c] e for the outlier (j, c) of each key group and channel with j in [a, a + n); values:
 * acc[r][c] += p[r][j - a] e for each token j and value group. */

/* four rows of a token or channel: plain C vectors (SSE on any x86-64, NEON elsewhere), no dispatch needed */
typedef float v4f __attribute__((vector_size(16)));

/* Keys, up to 4 rows: each outlier is one 4-lane multiply-add into its token's row of t (token-major, so a token's
 * rows are one vector), from the query transposed once per head (st->qo); t then joins s. The scalar form below
 * (rows x a multiply-add strided by ss per outlier) took 0.8 ms of a q4 step's 4.1 at 32k tokens (Llama-3-8B
 * shapes, 4 rows); this one's cost is in kvq.h section 10, "Outliers". */
static void outlier_scores4(const kvq__blk *b, int a, int n, const float *q, int rows, float *s, int ss,
                            kvq__qstate *st) {
    const int D = b->D, G = b->G;
    if (!st->qo_valid) {
        for (int c = 0; c < D; c++)
            for (int r = 0; r < 4; r++) st->qo[4 * c + r] = r < rows ? q[(size_t)r * D + c] : 0.0f;
        st->qo_valid = 1;
    }
    v4f t[SEG];
    memset(t, 0, sizeof(v4f) * (size_t)n);
    for (int g = a / G; g * G < a + n; g++) {
        const uint16_t *res = b->ores + (size_t)g * D;
        const uint8_t *idx = b->oidx + (size_t)g * D;
        float rf[256];
        for (int c = 0; c < D; c++) rf[c] = res_f32(res[c]);
        const int base = g * G - a;
        for (int c = 0; c < D; c++) {
            int j = base + idx[c];
            if ((unsigned)j >= (unsigned)n) continue;
            v4f qc;
            memcpy(&qc, st->qo + 4 * c, sizeof qc);
            t[j] += qc * rf[c];
        }
    }
    for (int j = 0; j < n; j++)
        for (int r = 0; r < rows; r++) s[(size_t)r * ss + j] += t[j][r];
}

static void outlier_scores(const kvq__blk *b, int a, int n, const float *q, int rows, float *s, int ss,
                           kvq__qstate *st) {
    if (rows <= 4) {
        outlier_scores4(b, a, n, q, rows, s, ss, st);
        return;
    }
    const int D = b->D, G = b->G;
    for (int g = a / G; g * G < a + n; g++)
        for (int c = 0; c < D; c++) {
            size_t e = (size_t)g * D + c;
            int j = g * G + b->oidx[e] - a;
            if (j < 0 || j >= n) continue;
            float r = res_f32(b->ores[e]);
            for (int i = 0; i < rows; i++) s[(size_t)i * ss + j] += q[(size_t)i * D + c] * r;
        }
}

static void outlier_accum(const kvq__blk *b, int a, int n, const float *p, int ps, int rows, float *acc) {
    const int D = b->D, Gv = b->Gv, ng = D / Gv;
    for (int j = 0; j < n; j++)
        for (int k = 0; k < ng; k++) {
            size_t e = (size_t)(a + j) * ng + k;
            float r = res_f32(b->ores[e]);
            int c = k * Gv + b->oidx[e];
            for (int i = 0; i < rows; i++) acc[(size_t)i * D + c] += p[(size_t)i * ps + j] * r;
        }
}

/* Pre-RoPE keys: the outliers join the decoded rows before RoPE, tile by tile. They are sorted by tile once per
 * segment: (row in its tile, channel, value), tile t's entries at [start[t], start[t + 1]). Each (token, channel) has
 * at most one, so the order of the additions does not matter. Walking the group's every channel for each tile instead
 * (kvq__outliers_add_rows per tile) took a pre-RoPE q2 step at 32k from 11.1 to 19.2 ms (kvq-bench cpu). */
#define PRE_OUTL_MAX ((SEG / 16 + 1) * 256) /* G >= 16: at most SEG / G + 1 groups of at most 256 channels */
typedef struct pre_outl {
    int start[SEG / KVQ_TILE + 1];
    uint8_t row[PRE_OUTL_MAX];
    uint16_t ch[PRE_OUTL_MAX];
    float val[PRE_OUTL_MAX];
} pre_outl;

static void pre_outliers_sort(const kvq__blk *b, int a, int n, pre_outl *o) {
    const int D = b->D, G = b->G, nt = (n + KVQ_TILE - 1) / KVQ_TILE;
    int pos[SEG / KVQ_TILE + 1] = {0};
    for (int g = a / G; g * G < a + n; g++)
        for (int c = 0; c < D; c++) {
            int j = g * G + b->oidx[(size_t)g * D + c] - a;
            if (j >= 0 && j < n) pos[j / KVQ_TILE + 1]++;
        }
    for (int t = 0; t < nt; t++) pos[t + 1] += pos[t];
    memcpy(o->start, pos, sizeof(int) * (size_t)(nt + 1));
    for (int g = a / G; g * G < a + n; g++)
        for (int c = 0; c < D; c++) {
            size_t e = (size_t)g * D + c;
            int j = g * G + b->oidx[e] - a;
            if (j < 0 || j >= n) continue;
            int k = pos[j / KVQ_TILE]++;
            o->row[k] = (uint8_t)(j % KVQ_TILE), o->ch[k] = (uint16_t)c, o->val[k] = kvq__f16_to_f32(b->ores[e]);
        }
}

/* Processes rows [j0, j1) of one block pair (keys kb, values vb) whose first row is token `tok0`. */
static void attend_block(const kvq__kernels *K, const kvq__blk *kb, const kvq__blk *vb, int j0, int j1, int64_t tok0,
                         const work *w, const kvq_attn_params *p, scratch *sc, kvq__qstate *qst) {
    const int D = kb->D, rows = w->rows;
    const bool prerope = w->c->cfg.prerope;
    for (int a = j0; a < j1; a += SEG) {
        int n = j1 - a < SEG ? j1 - a : SEG;
        int64_t t_first = tok0 + a;
        /* pre-RoPE keys are rotated by their positions after decoding (q . RoPE(t) k): the fp32 path, as the fused
         * integer kernels take one query per key group */
        bool fused = K->key_scores && rows <= KVQ_FUSED_ROWS && !prerope;
        if (fused) K->key_scores(kb, a, n, w->q, rows, sc->s, SEG, qst);
        if (prerope && (sc->rope_n < n || sc->rope_t0 != t_first)) {
            kvq__rope_tables(w->c, t_first, n, sc->rope_c, sc->rope_s);
            sc->rope_t0 = t_first, sc->rope_n = n;
        }
        pre_outl po;
        const bool pre_o = prerope && kb->ores;
        if (pre_o) pre_outliers_sort(kb, a, n, &po);
        for (int i = 0; !fused && i < n; i += KVQ_TILE) {
            int m = n - i < KVQ_TILE ? n - i : KVQ_TILE;
            K->decode(kb, a + i, m, sc->x);
            /* pre-RoPE keys: the outliers join the decoded rows before RoPE; else they are added to the scores */
            if (pre_o)
                for (int e = po.start[i / KVQ_TILE]; e < po.start[i / KVQ_TILE + 1]; e++)
                    sc->x[(size_t)po.row[e] * D + po.ch[e]] += po.val[e];
            if (prerope && w->kunrot)
                K->unrot_rope(sc->x, m, w->kunrot, w->c->cfg.rope_neox, sc->rope_c + (size_t)i * D, sc->rope_s + (size_t)i * D);
            else if (prerope)
                K->rope(sc->x, m, D, w->c->cfg.rope_neox, sc->rope_c + (size_t)i * D, sc->rope_s + (size_t)i * D);
            K->dots(w->q, rows, D, sc->x, m, sc->s + i, SEG);
        }
        if (kb->ores && !prerope) outlier_scores(kb, a, n, w->q, rows, sc->s, SEG, qst);
        for (int r = 0; r < rows; r++) {
            float *s = sc->s + (size_t)r * SEG;
            if (isnan(w->m[r])) { /* the row's result is NaN already: its weights stay 0 */
                for (int i = 0; i < n; i++) s[i] = 0;
                continue;
            }
            /* visible tokens of this segment: t <= pos, and t > pos - window with a window */
            int64_t pos = w->pos[r], hi = pos - t_first + 1, lo = p->window > 0 ? pos - p->window + 1 - t_first : 0;
            int ihi = hi < 0 ? 0 : hi > n ? n : (int)hi, ilo = lo < 0 ? 0 : lo > ihi ? ihi : (int)lo;
            if (ilo == ihi) { /* nothing visible to this row here */
                for (int i = 0; i < n; i++) s[i] = 0;
                continue;
            }
            if (p->softcap > 0)
                for (int i = ilo; i < ihi; i++) s[i] = p->softcap * tanhf(s[i] / p->softcap);
            for (int i = 0; i < ilo; i++) s[i] = -INFINITY;
            for (int i = ihi; i < n; i++) s[i] = -INFINITY;
            float mx = K->max(s + ilo, ihi - ilo);
            if (!(fabsf(mx) < INFINITY)) {
                /* NaN or +-Inf among the visible logits (a non-finite query, or logits beyond fp32): exp(s - mx) has no
                 * meaning, and the SIMD exp would turn NaN into a weight of 0. The row's result is NaN (m = NaN). */
                w->m[r] = NAN;
                for (int i = 0; i < n; i++) s[i] = 0;
                continue;
            }
            /* the running max: the largest logit of every segment so far, so that exp(s - mnew) <= 1 and the
             * correction exp(m - mnew) <= 1 never overflow however far apart the segments' logits are */
            float mnew = mx > w->m[r] ? mx : w->m[r];
            float corr = w->m[r] == -INFINITY ? 0.0f : expf(w->m[r] - mnew);
            float sum = K->exp_sum(s, n, mnew);
            w->l[r] = w->l[r] * corr + sum;
            w->m[r] = mnew;
            if (corr != 1.0f) K->scale(w->acc + (size_t)r * D, D, corr);
        }
        bool fused_v = K->value_accum && rows <= KVQ_FUSED_ROWS;
        if (fused_v) K->value_accum(vb, a, n, sc->s, SEG, rows, w->acc);
        for (int i = 0; !fused_v && i < n; i += KVQ_TILE) {
            int m = n - i < KVQ_TILE ? n - i : KVQ_TILE;
            K->decode(vb, a + i, m, sc->x);
            K->axpys(sc->s + i, SEG, rows, D, sc->x, m, w->acc);
        }
        if (vb->ores) outlier_accum(vb, a, n, sc->s, SEG, rows, w->acc);
    }
}

static void prefetch_blocks(const kvq_cache *c, int32_t pg, int h) {
    const char *k = (const char *)kvq__kblock(c, pg, h), *v = (const char *)kvq__vblock(c, pg, h);
    for (size_t o = 0; o < c->L.k_block_bytes; o += 64) __builtin_prefetch(k + o);
    for (size_t o = 0; o < c->L.v_block_bytes; o += 64) __builtin_prefetch(v + o);
}

/* The view of work item w restricted to its head number hh */
static work head_view(const work *w, int hh) {
    work v = *w;
    v.h = w->h + hh, v.nh = 1;
    v.q += hh * w->q_stride;
    v.m += hh * w->st_stride, v.l += hh * w->st_stride, v.acc += hh * w->st_stride;
    return v;
}

/* Walks the item's tokens a page at a time and, inside a page, its heads in order, so that memory is read as
 * one forward stream per page; the next (page, head) blocks are prefetched while the current ones are computed,
 * as each block starts a new stream that hardware prefetchers would pick up too late. */
static bool row_finite(const float *x, int D) {
    float acc = 0; /* x * 0 is NaN exactly for NaN and +-Inf */
    for (int d = 0; d < D; d++) acc += x[d] * 0.0f;
    return acc == 0;
}

static void run_work(const kvq_cache *c, const kvq__kernels *K, const work *w, const kvq_attn_params *p, scratch *sc) {
    const kvq_seq_layer *sl = w->sl;
    const int P = c->L.page_tokens, D = c->L.head_dim;
    for (int hh = 0; hh < w->nh; hh++) {
        work v = head_view(w, hh);
        /* a query row with NaN or +-Inf (after the scale) starts as NaN (m = NaN): the kernels need not see it
         * right (the integer ones round it to int16 codes that look finite) */
        for (int r = 0; r < w->rows; r++) v.m[r] = row_finite(v.q + (size_t)r * D, D) ? -INFINITY : NAN, v.l[r] = 0;
        memset(v.acc, 0, (size_t)w->rows * c->L.head_dim * sizeof(float));
        sc->qst[hh].valid = 0, sc->qst[hh].qo_valid = 0;
    }
    /* positions: sinks 0 .. S0-1, then the pages (page slot u is position S0 + u), then the window */
    const int64_t S0 = sl->sink, pend = S0 + sl->paged, t1 = w->t1;
    int64_t t = w->t0;
    if (p->window > 0) {
        /* sliding window: no query of the item sees a key before lo, so the pages wholly before it are skipped (they
         * may have been released: kvq_seq_drop_front); the kernels mask the rest of the first page */
        int64_t lo = INT64_MAX;
        for (int r = 0; r < w->rows; r++) lo = w->pos[r] < lo ? w->pos[r] : lo;
        lo = lo - p->window + 1;
        if (lo > S0) {
            int64_t start = S0 + (lo - S0 < sl->paged ? (lo - S0) / P * P : sl->paged);
            if (start > t) t = start;
        }
    }
    while (t < t1 && t < S0) { /* sink pages: fp16 rows [SR][H][D], attended like the window */
        int32_t pg = sl->spages[t / c->SR];
        int64_t base = t / c->SR * c->SR, end = base + c->SR < S0 ? base + c->SR : S0;
        end = end < t1 ? end : t1;
        for (int hh = 0; hh < w->nh; hh++) {
            work v = head_view(w, hh);
            kvq__blk kb = window_blk(c, kvq__sink_k(c, pg, 0, 0), v.h), vb = window_blk(c, kvq__sink_v(c, pg, 0, 0), v.h);
            attend_block(K, &kb, &vb, (int)(t - base), (int)(end - base), base, &v, p, sc, &sc->qst[hh]);
        }
        t = end;
    }
    while (t < t1 && t < pend) {
        int64_t u = t - S0, u1 = t1 - S0; /* page slot coordinates */
        int32_t pg = sl->pages[u / P];
        int64_t base = u / P * P;
        int64_t end = base + P < sl->paged ? base + P : sl->paged;
        end = end < u1 ? end : u1;
        for (int hh = 0; hh < w->nh; hh++) {
            int32_t npg = -1, nh = 0;
            if (hh + 1 < w->nh) npg = pg, nh = w->h + hh + 1;
            else if (end < u1 && end < sl->paged) npg = sl->pages[end / P], nh = w->h;
            work v = head_view(w, hh);
            kvq__blk kb = page_blk(c, pg, v.h, KVQ_KEY), vb = page_blk(c, pg, v.h, KVQ_VALUE);
            if (c->L.params8) { /* 8-bit pairs: the groups read here, to fp16 at their places in the block */
                const int G = c->L.group, g0 = (int)(u - base) / G, g1 = (int)(end - base - 1) / G + 1;
                if (kvq__p8(&c->L, KVQ_KEY)) {
                    uint16_t *o = sc->pk + (size_t)g0 * 2 * kvq__p8_group_n(&c->L, KVQ_KEY);
                    kvq__p8_expand_block(&c->L, KVQ_KEY, kb.data, g0, g1, K->p8_expand, o);
                    kb.par = sc->pk;
                    sc->qst[hh].par = NULL; /* new pairs at the same address: the fused kernel takes them again */
                }
                if (kvq__p8(&c->L, KVQ_VALUE)) {
                    uint16_t *o = sc->pv + (size_t)g0 * 2 * kvq__p8_group_n(&c->L, KVQ_VALUE);
                    kvq__p8_expand_block(&c->L, KVQ_VALUE, vb.data, g0, g1, K->p8_expand, o);
                    vb.par = sc->pv;
                }
            }
            if (npg >= 0) { /* the fused key kernels spread the prefetch over their tokens */
                if (K->key_scores && w->rows <= KVQ_FUSED_ROWS && !c->cfg.prerope) {
                    kb.pf_k = kvq__kblock(c, npg, nh), kb.pf_k_lines = (int)((c->L.k_block_bytes + 63) / 64);
                    kb.pf_v = kvq__vblock(c, npg, nh), kb.pf_v_lines = (int)((c->L.v_block_bytes + 63) / 64);
                } else prefetch_blocks(c, npg, nh);
            }
            attend_block(K, &kb, &vb, (int)(u - base), (int)(end - base), S0 + base, &v, p, sc, &sc->qst[hh]);
        }
        t = S0 + end;
    }
    if (t < t1)
        for (int hh = 0; hh < w->nh; hh++) {
            work v = head_view(w, hh);
            int r0 = (int)(t - pend), r1 = (int)(t1 - pend);
            kvq__blk kb = res_window_blk(c, K, sl, KVQ_KEY, v.h, r0, r1, sc->wk);
            kvq__blk vb = res_window_blk(c, K, sl, KVQ_VALUE, v.h, r0, r1, sc->wv);
            attend_block(K, &kb, &vb, r0, r1, pend, &v, p, sc, &sc->qst[hh]);
        }
    for (int hh = 0; hh < w->nh && w->xn > 0; hh++) { /* the batch itself, read as the window is */
        work v = head_view(w, hh);
        kvq__blk kb = window_blk(c, w->xk, v.h), vb = window_blk(c, w->xv, v.h);
        attend_block(K, &kb, &vb, 0, w->xn, w->xpos, &v, p, sc, &sc->qst[hh]);
    }
}

/* Merges the partial results of n items for `rows` query rows into out[r * out_stride]. Item i's state sits at
 * base + i * per: m[sp], l[sp], acc[sp][D] (sp = row spacing of m and l). */
static void merge(int n, int rows, int D, const float *base, size_t per, int sp, float *out, size_t out_stride) {
    for (int r = 0; r < rows; r++) {
        float M = -INFINITY, L = 0, *o = out + (size_t)r * out_stride;
        bool nan = false; /* fmaxf ignores NaN: a NaN item is looked for explicitly */
        for (int i = 0; i < n; i++) M = fmaxf(M, base[(size_t)i * per + r]), nan |= isnan(base[(size_t)i * per + r]);
        for (int d = 0; d < D; d++) o[d] = nan ? NAN : 0;
        if (nan) continue;
        if (M == -INFINITY) continue; /* no visible key: output 0 */
        for (int i = 0; i < n; i++) {
            const float *it = base + (size_t)i * per;
            if (it[r] == -INFINITY) continue;
            float wgt = expf(it[r] - M);
            L += wgt * it[sp + r];
            const float *a = it + 2 * (size_t)sp + (size_t)r * D;
            for (int d = 0; d < D; d++) o[d] += wgt * a[d];
        }
        for (int d = 0; d < D; d++) o[d] /= L;
    }
}

/* Rotated caches (kvq.h section 10): the query rows go into the keys' rotated domain (q.k = Rq.Rk), the output
 * rows come back from the values' (sum p_i v_i = R^T sum p_i R v_i), once per head: the kernels never see R.
 * A non-finite query row is left as it is: its result is NaN whatever it holds (run_work), and rotating it would
 * spread NaN over the whole row, which the integer kernels do not keep to that row (measured: test_softmax, q4
 * rep = 2, AVX2/AVX-512: the other head of its KV head changed). A NaN output row stays NaN in every channel. */
static void rotate_rows(const kvq_cache *c, int layer, kvq_role role, int inverse, float *x, size_t rows) {
    if (!kvq__rotated(c, role)) return;
    if (role == KVQ_KEY && c->cfg.prerope) return; /* run_work un-rotates each key row instead (work.kunrot) */
    kvq__rot r;
    kvq__rot_init(&r, c->cfg.rotation_seed, kvq__rot_layer(c, layer), role, c->L.head_dim);
    for (size_t i = 0; i < rows; i++)
        if (inverse || row_finite(x + i * (size_t)r.D, r.D)) kvq__rot_apply(&r, x + i * (size_t)r.D, inverse);
}

/* Pre-RoPE keys stored rotated (kvq.h section 10): the rotation each key row is taken back through before RoPE */
static const kvq__rot *key_unrotation(const kvq_cache *c, int layer, kvq__rot *r) {
    if (!c->cfg.prerope || !kvq__rotated(c, KVQ_KEY)) return NULL;
    kvq__rot_init(r, c->cfg.rotation_seed, kvq__rot_layer(c, layer), KVQ_KEY, c->L.head_dim);
    return r;
}

static kvq_status check_params(const kvq_cache *c, const kvq_attn_params *p, const char *fn) {
    KVQ_CHECK_NULL(p, fn);
    int H = c->L.n_kv_heads;
    if (p->n_q_heads < H || p->n_q_heads % H != 0)
        return kvq__fail(KVQ_ERR_SHAPE, "%s: n_q_heads %d is not a positive multiple of n_kv_heads %d", fn, p->n_q_heads, H);
    if (p->n_q_heads / H > MAX_ROWS)
        return kvq__fail(KVQ_ERR_SHAPE, "%s: %d query heads per KV head, at most %d supported", fn, p->n_q_heads / H, MAX_ROWS);
    if (!(p->scale >= 0) || !isfinite(p->scale)) return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: scale %g is not finite and >= 0", fn, (double)p->scale);
    if (!(p->softcap >= 0) || !isfinite(p->softcap)) return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: softcap %g is not finite and >= 0", fn, (double)p->softcap);
    if (p->window < 0) return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: window %d is negative", fn, p->window);
    return KVQ_OK;
}

/* A layer whose first tokens were released (kvq_seq_drop_front) can be attended only by queries (the first at
 * first_pos) whose window starts after them. */
static kvq_status check_dropped(const kvq_seq_layer *sl, int64_t first_pos, const kvq_attn_params *p, int32_t seq,
                                int layer, const char *fn) {
    if (!sl->dropped) return KVQ_OK;
    int64_t kept = sl->sink + sl->dropped;
    if (p->window > 0 && first_pos - p->window + 1 >= kept) return KVQ_OK;
    return kvq__fail(KVQ_ERR_RANGE, "%s: sequence %d, layer %d: tokens %d..%lld were dropped (kvq_seq_drop_front) but the "
                                    "query at %lld sees them (window %d)", fn, (int)seq, layer, sl->sink,
                     (long long)kept - 1, (long long)first_pos, p->window);
}

static int n_threads(const kvq_cache *c) {
#ifdef _OPENMP
    return c->cfg.n_threads > 0 ? c->cfg.n_threads : omp_get_max_threads();
#else
    (void)c;
    return 1;
#endif
}

/* Scratch of thread i: the scratch struct, then with pre-RoPE keys its two RoPE tables [SEG][D] */
typedef struct run_args {
    const kvq_cache *c;
    const kvq__kernels *K;
    work *items;
    const kvq_attn_params *p;
    char *sc;
    size_t stride;
} run_args;

static void run_task(void *arg, int i, int thread) {
    run_args *a = arg;
    run_work(a->c, a->K, &a->items[i], a->p, (scratch *)(void *)(a->sc + a->stride * (size_t)thread));
}

/* Runs items [0, n) in parallel (the cache's thread pool, else OpenMP); each thread has its own scratch. */
static kvq_status run_all(const kvq_cache *c, work *items, int64_t n, const kvq_attn_params *p, const char *fn) {
    const kvq__kernels *K = pick_kernels();
    int nt = c->pool.run ? c->pool.n_threads : n_threads(c);
    if (nt > n) nt = (int)n;
    if (nt < 1) nt = 1;
    if (c->pool.run && n > INT_MAX) return kvq__fail(KVQ_ERR_RANGE, "%s: %lld work items for a thread pool", fn, (long long)n);
    size_t one = (sizeof(scratch) + 63) / 64 * 64, tab = c->cfg.prerope ? (size_t)SEG * c->L.head_dim * sizeof(float) : 0;
    size_t pk = kvq__p8(&c->L, KVQ_KEY) ? (kvq__params_halves(&c->L, KVQ_KEY) * 2 + 63) / 64 * 64 : 0;
    size_t pv = kvq__p8(&c->L, KVQ_VALUE) ? (kvq__params_halves(&c->L, KVQ_VALUE) * 2 + 63) / 64 * 64 : 0;
    size_t wrow = ((size_t)c->W * c->L.head_dim * 2 + 63) / 64 * 64;
    size_t wk = kvq__win8(c, KVQ_KEY) ? wrow : 0, wv = kvq__win8(c, KVQ_VALUE) ? wrow : 0;
    size_t per = one + 2 * tab + pk + pv + wk + wv;
    /* a pool may hand out any of its thread indices */
    int nsc = c->pool.run ? c->pool.n_threads : nt;
    scratch *sc = kvq__aligned_alloc(64, per * (size_t)nsc);
    if (!sc) return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no memory for scratch", fn);
    for (int i = 0; i < nsc; i++) {
        scratch *t = (scratch *)(void *)((char *)sc + per * (size_t)i);
        t->rope_c = tab ? (float *)(void *)((char *)t + one) : NULL;
        t->rope_s = tab ? (float *)(void *)((char *)t + one + tab) : NULL;
        t->rope_n = 0, t->rope_t0 = 0;
        t->pk = pk ? (uint16_t *)(void *)((char *)t + one + 2 * tab) : NULL;
        t->pv = pv ? (uint16_t *)(void *)((char *)t + one + 2 * tab + pk) : NULL;
        t->wk = wk ? (uint16_t *)(void *)((char *)t + one + 2 * tab + pk + pv) : NULL;
        t->wv = wv ? (uint16_t *)(void *)((char *)t + one + 2 * tab + pk + pv + wk) : NULL;
    }
    run_args a = {c, K, items, p, (char *)sc, per};
    if (c->pool.run) {
        if (n == 1) run_task(&a, 0, 0);
        else c->pool.run(c->pool.ctx, (int)n, run_task, &a);
        free(sc);
        return KVQ_OK;
    }
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
    for (int64_t i = 0; i < n; i++) {
#ifdef _OPENMP
        int thread = omp_get_thread_num();
#else
        int thread = 0;
#endif
        run_work(c, K, &items[i], p, (scratch *)(void *)(a.sc + a.stride * (size_t)thread));
    }
    free(sc);
    return KVQ_OK;
}

kvq_status kvq_cache_set_thread_pool(kvq_cache *c, const kvq_thread_pool *pool) {
    const char *fn = "kvq_cache_set_thread_pool";
    KVQ_CHECK_NULL(c, fn);
    if (!pool) {
        memset(&c->pool, 0, sizeof c->pool);
        return KVQ_OK;
    }
    if (!pool->run) return kvq__fail(KVQ_ERR_NULL, "%s: pool->run is NULL", fn);
    if (pool->n_threads < 1 || pool->n_threads > 1024)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: n_threads %d outside 1..1024", fn, pool->n_threads);
    c->pool = *pool;
    return KVQ_OK;
}

kvq_status kvq_attn_decode(const kvq_cache *c, int layer, int n_seqs, const int32_t *seq_ids, const float *q,
                           float *out, const kvq_attn_params *p) {
    const char *fn = "kvq_attn_decode";
    KVQ_CHECK_NULL(c, fn);
    kvq_status s;
    if ((s = kvq__check_layer(c, layer, fn)) || (s = check_params(c, p, fn))) return s;
    if (n_seqs < 0 || n_seqs > c->cfg.max_seqs)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: n_seqs %d outside 0..%d", fn, n_seqs, c->cfg.max_seqs);
    if (n_seqs == 0) return KVQ_OK;
    KVQ_CHECK_NULL(seq_ids, fn);
    KVQ_CHECK_NULL(q, fn);
    KVQ_CHECK_NULL(out, fn);
    const int H = c->L.n_kv_heads, D = c->L.head_dim, rep = p->n_q_heads / H;
    int64_t total = 0;
    for (int i = 0; i < n_seqs; i++) {
        if ((s = kvq__check_seq(c, seq_ids[i], fn))) return s;
        const kvq_seq_layer *sl = &c->seqs[seq_ids[i]].layers[layer];
        if (kvq__seq_len(sl) == 0)
            return kvq__fail(KVQ_ERR_RANGE, "%s: sequence %d is empty in layer %d: append the token's K/V first", fn,
                             (int)seq_ids[i], layer);
        if ((s = check_dropped(sl, kvq__seq_len(sl) - 1, p, seq_ids[i], layer, fn))) return s;
        total += kvq__seq_len(sl);
    }
    /* items: (sequence, token chunk, group of up to MAX_ITEM_HEADS heads); enough of them for every thread several
     * times over, none shorter than 512 tokens */
    const int hg = H < MAX_ITEM_HEADS ? H : MAX_ITEM_HEADS, ngroups = (H + hg - 1) / hg;
    int nt = c->pool.run ? c->pool.n_threads : n_threads(c);
    int64_t want = (int64_t)nt * 4, chunk = total;
    if ((int64_t)n_seqs * ngroups < want) chunk = total * ngroups / want;
    if (chunk < 512) chunk = 512;
    int64_t n_items = 0;
    for (int i = 0; i < n_seqs; i++) {
        const kvq_seq_layer *sl = &c->seqs[seq_ids[i]].layers[layer];
        n_items += ngroups * ((kvq__seq_len(sl) + chunk - 1) / chunk);
    }
    float scale = p->scale > 0 ? p->scale : 1.0f / sqrtf((float)D);
    /* item state: for each of its heads, m[rep], l[rep], acc[rep][D] */
    size_t per = (size_t)rep * (D + 2), nqe = (size_t)n_seqs * p->n_q_heads * D;
    work *items = kvq__malloc((size_t)n_items * sizeof *items);
    float *buf = kvq__malloc(((size_t)n_items * hg * per + nqe) * sizeof(float));
    int64_t *pos = kvq__malloc((size_t)n_seqs * rep * sizeof *pos);
    if (!items || !buf || !pos) {
        free(items), free(buf), free(pos);
        return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no memory for %lld work items", fn, (long long)n_items);
    }
    kvq__rot kr;
    const kvq__rot *kun = key_unrotation(c, layer, &kr);
    float *qs = buf + (size_t)n_items * hg * per;
    for (size_t e = 0; e < nqe; e++) qs[e] = q[e] * scale;
    rotate_rows(c, layer, KVQ_KEY, 0, qs, (size_t)n_seqs * p->n_q_heads);
    int64_t k = 0;
    for (int i = 0; i < n_seqs; i++) {
        const kvq_seq_layer *sl = &c->seqs[seq_ids[i]].layers[layer];
        int64_t len = kvq__seq_len(sl);
        for (int r = 0; r < rep; r++) pos[(size_t)i * rep + r] = len - 1;
        for (int h = 0; h < H; h += hg)
            for (int64_t t0 = 0; t0 < len; t0 += chunk, k++) {
                float *b = buf + (size_t)k * hg * per;
                int nh = H - h < hg ? H - h : hg;
                items[k] = (work){c, kun, sl, h, nh, (size_t)rep * D, per, t0, t0 + chunk < len ? t0 + chunk : len,
                                  qs + ((size_t)i * p->n_q_heads + (size_t)h * rep) * D, pos + (size_t)i * rep, rep,
                                  b, b + rep, b + 2 * rep, NULL, NULL, 0, 0};
            }
    }
    s = run_all(c, items, n_items, p, fn);
    if (s == KVQ_OK) {
        k = 0;
        for (int i = 0; i < n_seqs; i++) {
            const kvq_seq_layer *sl = &c->seqs[seq_ids[i]].layers[layer];
            int nchunks = (int)((kvq__seq_len(sl) + chunk - 1) / chunk);
            for (int h = 0; h < H; h += hg, k += nchunks)
                for (int hh = 0; hh < items[k].nh; hh++)
                    merge(nchunks, rep, D, buf + (size_t)k * hg * per + hh * per, hg * per, rep,
                          out + ((size_t)i * p->n_q_heads + (size_t)(h + hh) * rep) * D, D);
        }
        rotate_rows(c, layer, KVQ_VALUE, 1, out, (size_t)n_seqs * p->n_q_heads);
    }
    free(items), free(buf), free(pos);
    return s;
}

/* Both prefills: queries at positions base .. base + n_q - 1. Without a batch (xk NULL) every key comes from the
 * cache (the queries' own tokens were appended: base = len - n_q); with one, the cache gives tokens 0 .. base - 1
 * (base = len) and xk / xv the batch's own rows. */
static kvq_status prefill_run(const kvq_cache *c, int layer, const kvq_seq_layer *sl, int64_t base, int n_q,
                              const float *q, const uint16_t *xk, const uint16_t *xv, float *out,
                              const kvq_attn_params *p, const char *fn) {
    const int H = c->L.n_kv_heads, D = c->L.head_dim, rep = p->n_q_heads / H;
    const int qb = MAX_ROWS / rep; /* queries per item */
    int64_t nblk = (n_q + qb - 1) / qb, n_items = nblk * H;
    size_t per = (size_t)MAX_ROWS * (D + 2);
    float scale = p->scale > 0 ? p->scale : 1.0f / sqrtf((float)D);
    work *items = kvq__malloc((size_t)n_items * sizeof *items);
    float *buf = kvq__malloc((size_t)n_items * per * 2 * sizeof(float));
    int64_t *pos = kvq__malloc((size_t)n_items * MAX_ROWS * sizeof *pos);
    if (!items || !buf || !pos) {
        free(items), free(buf), free(pos);
        return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no memory for %lld work items", fn, (long long)n_items);
    }
    kvq__rot kr;
    const kvq__rot *kun = key_unrotation(c, layer, &kr);
    float *qs = buf + (size_t)n_items * per; /* per item: rows in (query, head) order, scaled */
    for (int64_t b = 0; b < nblk; b++)
        for (int h = 0; h < H; h++) {
            int64_t k = b * H + h;
            int q0 = (int)(b * qb), nq = n_q - q0 < qb ? n_q - q0 : qb;
            float *qi = qs + (size_t)k * per;
            for (int i = 0; i < nq; i++)
                for (int r = 0; r < rep; r++) {
                    const float *src = q + ((size_t)(q0 + i) * p->n_q_heads + (size_t)h * rep + r) * D;
                    for (int d = 0; d < D; d++) qi[((size_t)i * rep + r) * D + d] = src[d] * scale;
                    pos[k * MAX_ROWS + i * rep + r] = base + q0 + i;
                }
            rotate_rows(c, layer, KVQ_KEY, 0, qi, (size_t)nq * rep);
            float *bb = buf + (size_t)k * per;
            items[k] = (work){c, kun, sl, h, 1, 0, 0, 0, xk ? base : base + q0 + nq, qi, pos + k * MAX_ROWS, nq * rep,
                              bb, bb + MAX_ROWS, bb + 2 * MAX_ROWS, xk, xv, base, xk ? q0 + nq : 0};
        }
    kvq_status s = run_all(c, items, n_items, p, fn);
    if (s == KVQ_OK)
        for (int64_t b = 0; b < nblk; b++)
            for (int h = 0; h < H; h++) {
                const work *w = &items[b * H + h];
                int q0 = (int)(b * qb);
                for (int row = 0; row < w->rows; row++) {
                    int i = row / rep, r = row % rep;
                    float *o = out + ((size_t)(q0 + i) * p->n_q_heads + (size_t)h * rep + r) * D;
                    const float *a = w->acc + (size_t)row * D;
                    float inv = w->l[row] > 0 ? 1.0f / w->l[row] : 0.0f; /* every query sees itself: l > 0 */
                    if (isnan(w->m[row])) inv = NAN; /* a non-finite query or logit (run_work, attend_block) */
                    for (int d = 0; d < D; d++) o[d] = a[d] * inv;
                }
            }
    if (s == KVQ_OK) rotate_rows(c, layer, KVQ_VALUE, 1, out, (size_t)n_q * p->n_q_heads);
    free(items), free(buf), free(pos);
    return s;
}

kvq_status kvq_attn_prefill(const kvq_cache *c, int layer, int32_t seq, int n_q, const float *q, float *out,
                            const kvq_attn_params *p) {
    const char *fn = "kvq_attn_prefill";
    KVQ_CHECK_NULL(c, fn);
    kvq_status s;
    if ((s = kvq__check_layer(c, layer, fn)) || (s = check_params(c, p, fn)) || (s = kvq__check_seq(c, seq, fn)))
        return s;
    const kvq_seq_layer *sl = &c->seqs[seq].layers[layer];
    int64_t len = kvq__seq_len(sl);
    if (n_q < 0 || n_q > len)
        return kvq__fail(KVQ_ERR_RANGE, "%s: n_q %d outside 0..%lld (the sequence's length in layer %d)", fn, n_q,
                         (long long)len, layer);
    if (n_q == 0) return KVQ_OK;
    KVQ_CHECK_NULL(q, fn);
    KVQ_CHECK_NULL(out, fn);
    if ((s = check_dropped(sl, len - n_q, p, seq, layer, fn))) return s;
    return prefill_run(c, layer, sl, len - n_q, n_q, q, NULL, NULL, out, p, fn);
}

kvq_status kvq_attn_prefill_exact(const kvq_cache *c, int layer, int32_t seq, int n_q, const float *q,
                                  kvq_dtype dtype, const void *k, const void *v, float *out, const kvq_attn_params *p) {
    const char *fn = "kvq_attn_prefill_exact";
    KVQ_CHECK_NULL(c, fn);
    kvq_status s;
    if ((s = kvq__check_layer(c, layer, fn)) || (s = check_params(c, p, fn)) || (s = kvq__check_seq(c, seq, fn)))
        return s;
    if (n_q < 0) return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: n_q %d is negative", fn, n_q);
    if (n_q == 0) return KVQ_OK;
    KVQ_CHECK_NULL(q, fn);
    KVQ_CHECK_NULL(k, fn);
    KVQ_CHECK_NULL(v, fn);
    KVQ_CHECK_NULL(out, fn);
    if (dtype != KVQ_DTYPE_F32 && dtype != KVQ_DTYPE_F16 && dtype != KVQ_DTYPE_BF16)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: dtype %d is not a kvq_dtype", fn, (int)dtype);
    const kvq_seq_layer *sl = &c->seqs[seq].layers[layer];
    int64_t len = kvq__seq_len(sl);
    if ((s = check_dropped(sl, len, p, seq, layer, fn))) return s;
    const int H = c->L.n_kv_heads, D = c->L.head_dim;
    size_t row = (size_t)H * D;
    if ((size_t)n_q > SIZE_MAX / 4 / row)
        return kvq__fail(KVQ_ERR_INVALID_ARG, "%s: %d tokens of %d x %d values exceed the address space", fn, n_q, H, D);
    /* the batch as the window would hold it: rotated where the role is, in fp16; K/V that kvq_append would refuse
     * (not finite, or beyond fp16 before or after the rotation) are refused here too */
    uint16_t *xk = kvq__malloc((size_t)n_q * row * 2 * sizeof(uint16_t)), *xv = xk ? xk + (size_t)n_q * row : NULL;
    float *x = kvq__malloc((size_t)D * sizeof(float));
    if (!xk || !x) {
        free(xk), free(x);
        return kvq__fail(KVQ_ERR_OUT_OF_MEMORY, "%s: no memory for a batch of %d tokens", fn, n_q);
    }
    s = KVQ_OK;
    for (int r = 0; r < 2 && !s; r++) {
        const kvq_role role = r ? KVQ_VALUE : KVQ_KEY;
        kvq__rot rot;
        kvq__rot_init(&rot, c->cfg.rotation_seed, kvq__rot_layer(c, layer), role, D);
        for (size_t i = 0; i < (size_t)n_q * row && !s; i += D) {
            if ((s = kvq__kv_row_in(c, role, &rot, dtype, r ? v : k, i, x, fn, ""))) break;
            for (int d = 0; d < D; d++) (r ? xv : xk)[i + d] = kvq__f32_to_f16(x[d]);
        }
    }
    free(x);
    if (!s) s = prefill_run(c, layer, sl, len, n_q, q, xk, xv, out, p, fn);
    free(xk);
    return s;
}
