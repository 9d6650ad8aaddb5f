/* External attention's double normalisation on the CPU, one batch element at a time.
 *
 * z is (B, N, C) contiguous, C = heads * S with the S memory slots of a head adjacent.
 *   forward:  p = softmax of z over the N tokens (per column c, in fp32),
 *             q = p / (1e-9 + sum of p over the S slots of its head), q in z's type.
 *   backward: from g = dL/dq, dL/dz = p * (gp - sum_N(gp * p)) with
 *             gp = (g - sum_S(g * p) / D) / D,  D = 1e-9 + sum_S p.
 * One batch element's (N, C) slice of fp32 work (256 x 256 x 4 B = 256 KiB for EANet)
 * stays in the core's cache: z is read twice (max, then exp) in its own type and q written
 * once, where torch's (and inductor's) kernels make four or five passes over the whole
 * batch through memory.
 * The backward recomputes p from z and the per-column max and 1/sum that the forward
 * keeps (B x C floats), instead of saving p itself (B x N x C floats). With a dropout
 * threshold t > 0 (training), q is written with the attention dropout applied (element i of
 * the whole tensor kept as `kept` in common.h decides, from two seeds) and g is read with
 * the same mask: no pass of its own either way.
 *
 * C, compiled at first use with -O3 -march=native by eanet.accel.native; exp is a
 * polynomial (Cephes' expf, about 1 ulp) that the compiler vectorises; on AVX-512 the sums
 * over the memory slots use intrinsics (below). Threads: built with
 * -fopenmp (against the OpenMP runtime torch itself runs on, so that the two share one
 * pool of threads), dn_forward and dn_backward split their range [b0, b1) of the batch
 * over OpenMP's threads; built without, the caller splits the batch over its threads. `bf16`
 * says whether the tensors (z, q, g, dL/dz) are bfloat16 (else float32); the statistics
 * are always float32. They return 0, or 1 where the scratch memory could not be had.
 */
#include <math.h>

#include "common.h"

/* The attention dropout applied to q on the way out (and to dL/dq on the way in): element
 * at + i of the whole tensor kept as `kept` (common.h) decides; t = 0 keeps every one. */
struct drop {
    uint32_t at, s1, s2, t;
};

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* AVX-512, S = 16: a row's 16 heads of 16 slots are 16 vectors, and their 16 sums over the
 * slots come out as one vector from a tree of shuffles and adds (45 instructions for all
 * 16, where the compiler's code sums each head on its own, in order), with one division
 * for the row. Elsewhere (AVX2, other S) the plain loops below. */
#define TREE 1
/* A block of 8 vectors (128 columns) from column c0 of the (N, C) slice z: the columns'
 * max, 1 / sum of e^(z - max), and e itself (fp32) into e. */
static inline __attribute__((always_inline)) void column_stats8(
    const void *z, int bf16, float *R mx, float *R inv, float *R e, long N, long C, long c0) {
    __m512 m[8], t[8];
    for (int j = 0; j < 8; j++) m[j] = _mm512_set1_ps(-INFINITY), t[j] = _mm512_setzero_ps();
    for (long n = 0; n < N; n++)
        for (int j = 0; j < 8; j++) m[j] = _mm512_max_ps(m[j], load16(z, bf16, n * C + c0 + 16 * j));
    for (long n = 0; n < N; n++)
        for (int j = 0; j < 8; j++) {
            long i = n * C + c0 + 16 * j;
            __m512 v = exp16(_mm512_sub_ps(load16(z, bf16, i), m[j]));
            _mm512_storeu_ps(e + i, v);
            t[j] = _mm512_add_ps(t[j], v);
        }
    for (int j = 0; j < 8; j++) {
        _mm512_storeu_ps(mx + c0 + 16 * j, m[j]);
        _mm512_storeu_ps(inv + c0 + 16 * j, _mm512_div_ps(_mm512_set1_ps(1.0f), t[j]));
    }
}

/* The forward of one slice for S = 16 and C a multiple of 256, vector by vector: q in z's
 * type straight from the registers (the scalar loops below went through an fp32 row). */
static inline __attribute__((always_inline)) void forward_slice16(
    const void *z, void *q, int bf16, float *R mx, float *R inv, float *R e, long N, long C,
    struct drop d) {
    for (long c0 = 0; c0 < C; c0 += 128) column_stats8(z, bf16, mx, inv, e, N, C, c0);
    for (long n = 0; n < N; n++)
        for (long c = 0; c < C; c += 256) {
            __m512 v[16];
            for (int h = 0; h < 16; h++) {
                long i = n * C + c + 16 * h;
                v[h] = _mm512_mul_ps(_mm512_loadu_ps(e + i), _mm512_loadu_ps(inv + c + 16 * h));
            }
            __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(sums16(v), _mm512_set1_ps(1e-9f)));
            __mmask32 keep = 0xFFFFFFFFu;
            for (int h = 0; h < 16; h++) {
                long i = n * C + c + 16 * h;
                __m512 out = _mm512_mul_ps(v[h], lane(r, h));
                if (d.t) {
                    keep = h % 2 ? keep >> 16 : keep32(d.at + (uint32_t)i, d.s1, d.s2, d.t);
                    out = _mm512_maskz_mov_ps((__mmask16)keep, out);
                }
                store16(q, bf16, i, out);
            }
        }
}
/* The backward of one slice for S = 16 and C a multiple of 256 (see backward_slice): each
 * row's 16 heads in registers, p recomputed with exp16, gp from the trees of sums. */
static inline __attribute__((always_inline)) void backward_slice16(
    const void *g, const void *z, int bf16, const float *R mx, const float *R inv, void *gz,
    float *R p, float *R gp, float *R colsum, long N, long C, struct drop d) {
    for (long c = 0; c < C; c++) colsum[c] = 0.0f;
    for (long n = 0; n < N; n++)
        for (long c = 0; c < C; c += 256) {
            __m512 vp[16], vg[16], pg[16];
            __mmask32 keep = 0xFFFFFFFFu;
            for (int h = 0; h < 16; h++) {
                long i = n * C + c + 16 * h;
                __m512 e = exp16(_mm512_sub_ps(load16(z, bf16, i), _mm512_loadu_ps(mx + c + 16 * h)));
                vp[h] = _mm512_mul_ps(e, _mm512_loadu_ps(inv + c + 16 * h));
                if (d.t) keep = h % 2 ? keep >> 16 : keep32(d.at + (uint32_t)i, d.s1, d.s2, d.t);
                vg[h] = _mm512_maskz_mov_ps((__mmask16)keep, load16(g, bf16, i));
                pg[h] = _mm512_mul_ps(vg[h], vp[h]);
            }
            __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(sums16(vp), _mm512_set1_ps(1e-9f)));
            __m512 inner = _mm512_mul_ps(sums16(pg), r);
            for (int h = 0; h < 16; h++) {
                long i = n * C + c + 16 * h;
                __m512 gh = _mm512_mul_ps(_mm512_sub_ps(vg[h], lane(inner, h)), lane(r, h));
                _mm512_storeu_ps(p + i, vp[h]);
                _mm512_storeu_ps(gp + i, gh);
                float *R cs = colsum + c + 16 * h;
                _mm512_storeu_ps(cs, _mm512_fmadd_ps(gh, vp[h], _mm512_loadu_ps(cs)));
            }
        }
    for (long i = 0; i < N * C; i += 16) {
        __m512 d = _mm512_sub_ps(_mm512_loadu_ps(gp + i), _mm512_loadu_ps(colsum + i % C));
        store16(gz, bf16, i, _mm512_mul_ps(_mm512_loadu_ps(p + i), d));
    }
}
#else
#define TREE 0
static inline void backward_slice16(const void *g, const void *z, int bf16, const float *R mx,
                                    const float *R inv, void *gz, float *R p, float *R gp,
                                    float *R colsum, long N, long C, struct drop d) {
    (void)g, (void)z, (void)bf16, (void)mx, (void)inv, (void)gz, (void)p, (void)gp;
    (void)colsum, (void)N, (void)C, (void)d;
}
static inline void forward_slice16(const void *z, void *q, int bf16, float *R mx, float *R inv,
                                   float *R e, long N, long C, struct drop d) {
    (void)z, (void)q, (void)bf16, (void)mx, (void)inv, (void)e, (void)N, (void)C, (void)d;
}
#endif

/* mx[c] = max_n z[n, c]; inv[c] = 1 / sum_n e^(z - mx); e = e^(z - mx) (fp32). */
static inline __attribute__((always_inline)) void column_stats(
    const void *z, int bf16, float *R mx, float *R inv, float *R e, long N, long C) {
    for (long c = 0; c < C; c++) mx[c] = -INFINITY, inv[c] = 0.0f;  /* the true max, always */
    for (long n = 0; n < N; n++)
        for (long c = 0; c < C; c++) {
            float v = load_f32(z, bf16, n * C + c);
            mx[c] = v > mx[c] ? v : mx[c];
        }
    for (long n = 0; n < N; n++)
        for (long c = 0; c < C; c++) {
            float v = exp_nonpositive(load_f32(z, bf16, n * C + c) - mx[c]);
            e[n * C + c] = v;
            inv[c] += v;
        }
    for (long c = 0; c < C; c++) inv[c] = 1.0f / inv[c];
}

/* One row: out = p / (1e-9 + sum_S p), p = e * inv. */
static inline __attribute__((always_inline)) void normalize_row(
    const float *R e, const float *R inv, float *R out, long C, long S) {
    for (long h = 0; h < C; h += S) {
        float d = 1e-9f;
        for (long s = 0; s < S; s++) d += e[h + s] * inv[h + s];
        float r = 1.0f / d;
        for (long s = 0; s < S; s++) out[h + s] = e[h + s] * inv[h + s] * r;
    }
}

/* One slice: q (z's type) from z; `row` is C floats of scratch, e N x C. */
static inline __attribute__((always_inline)) void forward_slice(
    const void *z, void *q, int bf16, float *R mx, float *R inv, float *R e, float *R row,
    long N, long C, long S, struct drop d) {
    if (TREE && S == 16 && C % 256 == 0) {
        forward_slice16(z, q, bf16, mx, inv, e, N, C, d);
        return;
    }
    column_stats(z, bf16, mx, inv, e, N, C);
    for (long n = 0; n < N; n++) {
        float *R out = bf16 ? row : (float *)q + n * C;
        normalize_row(e + n * C, inv, out, C, S);
        if (d.t) drop_row(out, d.at + (uint32_t)(n * C), C, d.s1, d.s2, d.t);
        if (bf16) to_bf16(row, (uint16_t *)q + n * C, C);
    }
}

/* One row of dL/dp (before the softmax): gp = (g - sum_S(g * p) / D) / D, D = 1e-9 + sum_S p. */
static inline __attribute__((always_inline)) void grad_row(
    const float *R g, const float *R p, float *R gp, long C, long S) {
    for (long h = 0; h < C; h += S) {
        float d = 1e-9f, inner = 0.0f;
        for (long s = 0; s < S; s++) d += p[h + s], inner += g[h + s] * p[h + s];
        float r = 1.0f / d;
        inner *= r;
        for (long s = 0; s < S; s++) gp[h + s] = (g[h + s] - inner) * r;
    }
}

/* dL/dz of one slice (z's type) from g = dL/dq; p and gp are scratch (N x C), colsum and
 * row (C). */
static inline __attribute__((always_inline)) void backward_slice(
    const void *g, const void *z, int bf16, const float *R mx, const float *R inv, void *gz,
    float *R p, float *R gp, float *R colsum, float *R row, long N, long C, long S,
    struct drop d) {
    if (TREE && S == 16 && C % 256 == 0) {
        backward_slice16(g, z, bf16, mx, inv, gz, p, gp, colsum, N, C, d);
        return;
    }
    for (long c = 0; c < C; c++) colsum[c] = 0.0f;
    for (long n = 0; n < N; n++) {
        float *R pr = p + n * C, *R gpr = gp + n * C;
        for (long c = 0; c < C; c++) {
            pr[c] = exp_nonpositive(load_f32(z, bf16, n * C + c) - mx[c]) * inv[c];
            row[c] = load_f32(g, bf16, n * C + c);
        }
        if (d.t) drop_row(row, d.at + (uint32_t)(n * C), C, d.s1, d.s2, d.t);
        grad_row(row, pr, gpr, C, S);
        for (long c = 0; c < C; c++) colsum[c] += gpr[c] * pr[c];
    }
    for (long n = 0; n < N; n++) {
        float *R out = bf16 ? row : (float *)gz + n * C;
        for (long c = 0; c < C; c++) out[c] = p[n * C + c] * (gp[n * C + c] - colsum[c]);
        if (bf16) to_bf16(row, (uint16_t *)gz + n * C, C);
    }
}

/* The slices' types and S = 16 (EANet's memory) get their own copies, loops unrolled. */
#define BY_TYPE_AND_S(CALL)                  \
    if (bf16 && S == 16) {                   \
        CALL(1, 16);                         \
    } else if (S == 16) {                    \
        CALL(0, 16);                         \
    } else {                                 \
        CALL(bf16, S);                       \
    }

static int forward_range(const void *z, void *q, float *colmax, float *colinv, int bf16,
                         long N, long C, long S, struct drop d, long b0, long b1) {
    long M = N * C, size = bf16 ? 2 : 4;
    float *e = malloc(sizeof(float) * (M + C));
    if (!e) return 1;
    for (long b = b0; b < b1; b++) {
        const char *zb = (const char *)z + b * M * size;
        char *qb = (char *)q + b * M * size;
        float *mx = colmax + b * C, *inv = colinv + b * C;
        d.at = (uint32_t)(b * M);
#define FORWARD(T, S_) forward_slice(zb, qb, T, mx, inv, e, e + M, N, C, S_, d)
        BY_TYPE_AND_S(FORWARD)
#undef FORWARD
    }
    free(e);
    return 0;
}

static int backward_range(const void *g, const void *z, const float *colmax,
                          const float *colinv, void *gz, int bf16, long N, long C, long S,
                          struct drop d, long b0, long b1) {
    long M = N * C, size = bf16 ? 2 : 4;
    float *p = malloc(sizeof(float) * (2 * M + 2 * C)), *gp = p + M, *colsum = gp + M;
    if (!p) return 1;
    for (long b = b0; b < b1; b++) {
        long at = b * M * size;
        const char *gb = (const char *)g + at, *zb = (const char *)z + at;
        char *gzb = (char *)gz + at;
        const float *mx = colmax + b * C, *inv = colinv + b * C;
        d.at = (uint32_t)(b * M);
#define BACKWARD(T, S_) \
    backward_slice(gb, zb, T, mx, inv, gzb, p, gp, colsum, colsum + C, N, C, S_, d)
        BY_TYPE_AND_S(BACKWARD)
#undef BACKWARD
    }
    free(p);
    return 0;
}

int dn_forward(const void *z, void *q, float *colmax, float *colinv, int bf16, long N,
               long C, long S, uint32_t s1, uint32_t s2, uint32_t t, long b0, long b1) {
    struct drop d = {0, s1, s2, t};
    int failed = 0;
    PARALLEL_OR_FAILED
    {
        long lo, hi;
        share(b0, b1, &lo, &hi);
        if (lo < hi) failed |= forward_range(z, q, colmax, colinv, bf16, N, C, S, d, lo, hi);
    }
    return failed;
}

int dn_backward(const void *g, const void *z, const float *colmax, const float *colinv,
                void *gz, int bf16, long N, long C, long S, uint32_t s1, uint32_t s2,
                uint32_t t, long b0, long b1) {
    struct drop d = {0, s1, s2, t};
    int failed = 0;
    PARALLEL_OR_FAILED
    {
        long lo, hi;
        share(b0, b1, &lo, &hi);
        if (lo < hi)
            failed |= backward_range(g, z, colmax, colinv, gz, bf16, N, C, S, d, lo, hi);
    }
    return failed;
}
