/* GELU with the tanh approximation (the reference's ops.gelu), forward and backward.
 *
 *   y = x / 2 * (1 + tanh(u)),  u = sqrt(2/pi) * (x + 0.044715 x^3)
 *   dy/dx = (1 + t) / 2 + x / 2 * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 x^2),  t = tanh(u)
 *
 * 1 + tanh(u) and 1 - tanh(u)^2 come from e = e^(-2|u|) (the vectorised exponential of
 * common.h), exact in the tails where torch's go through tanh itself. bfloat16 tensors go
 * through a small fp32 buffer per thread, 256 elements at a time (in and out in bf16, the
 * arithmetic in fp32, as torch's own bf16 GELU); on AVX-512 both ways run 16 at a time in
 * registers (forward16, backward16). With a dropout threshold t > 0 the result (and the
 * gradient) is dropped in the same pass where the counter-based draws of common.h (seeds
 * s1, s2) say so: the MLP's dropout after the activation, without a pass of its own each
 * way. Built by
 * eanet.accel.native (see double_normalize.c); *(..., n, i0, i1) does elements [i0, i1)
 * of n, split over OpenMP threads where the library has them, and returns 0.
 */
#include "common.h"

#define CHUNK 256
#define K 0.7978845608028654f /* sqrt(2 / pi) */
#define C 0.044715f

/* 1 + tanh(u) and 1 - tanh(u)^2 from e = e^(-2|u|) directly: no cancellation in the tails
 * (1 + t for u << 0 would round to 0 through t itself). */
static inline void tanh_parts(float u, float *one_plus_t, float *one_minus_t2) {
    float a = u < 0.0f ? -u : u;
    float e = exp_nonpositive(-2.0f * a);
    float r = 1.0f / (1.0f + e);
    float small = 2.0f * e * r, large = 2.0f * r; /* 1 - |t|, 1 + |t| */
    *one_plus_t = u < 0.0f ? small : large;
    *one_minus_t2 = small * large;
}

static void forward_f32(const float *R x, float *R y, long n) {
    for (long i = 0; i < n; i++) {
        float v = x[i], opt, omt2;
        tanh_parts(K * (v + C * v * v * v), &opt, &omt2);
        y[i] = 0.5f * v * opt;
    }
}

static void backward_f32(const float *R g, const float *R x, float *R gx, long n) {
    for (long i = 0; i < n; i++) {
        float v = x[i], opt, omt2;
        tanh_parts(K * (v + C * v * v * v), &opt, &omt2);
        gx[i] = g[i] * (0.5f * opt + 0.5f * v * omt2 * K * (1.0f + 3.0f * C * v * v));
    }
}

#if defined(__AVX512F__)
/* tanh_parts of 16 values x, halved: (1 + t) / 2 = r (u >= 0) or e r (u < 0) and
 * (1 - t^2) / 2 = 2 e r^2, with e = e^(-2|u|), r = 1 / (1 + e). */
static inline void tanh_parts16(__m512 v, __m512 *half_opt, __m512 *half_omt2) {
    __m512 cubic = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(C), v), _mm512_mul_ps(v, v), v);
    __m512 u = _mm512_mul_ps(_mm512_set1_ps(K), cubic);
    __m512 e = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), _mm512_abs_ps(u)));
    __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    __mmask16 negative = _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_LT_OQ);
    *half_opt = _mm512_mask_mul_ps(r, negative, e, r);
    *half_omt2 = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(2.0f), e), _mm512_mul_ps(r, r));
}

/* The forward of 16 values: y = x (1 + t) / 2. */
static inline __m512 forward16(__m512 v) {
    __m512 half_opt, half_omt2;
    tanh_parts16(v, &half_opt, &half_omt2);
    return _mm512_mul_ps(v, half_opt);
}

/* The backward of 16 values: g * dy/dx, dy/dx = (1 + t) / 2 + (1 - t^2) / 2 K x (1 + 3 C x^2). */
static inline __m512 backward16(__m512 g, __m512 v) {
    __m512 half_opt, half_omt2;
    tanh_parts16(v, &half_opt, &half_omt2);
    __m512 slope = _mm512_fmadd_ps(_mm512_set1_ps(3.0f * C), _mm512_mul_ps(v, v), _mm512_set1_ps(1.0f));
    __m512 d = _mm512_fmadd_ps(_mm512_mul_ps(half_omt2, _mm512_set1_ps(K)), _mm512_mul_ps(v, slope), half_opt);
    return _mm512_mul_ps(g, d);
}
#define GELU16 1
#else
#define GELU16 0
#endif

/* GELU of elements [i, i + m) of x, m <= CHUNK, into the fp32 row ys (xs: scratch). */
static inline void forward_chunk(const void *x, int bf16, long i, long m, float *R xs,
                                 float *R ys) {
    long j = 0;
#if GELU16
    for (; j + 16 <= m; j += 16) _mm512_storeu_ps(ys + j, forward16(load16(x, bf16, i + j)));
#endif
    if (j == m) return;
    if (bf16) {
        from_bf16((const uint16_t *)x + i + j, xs, m - j);
        forward_f32(xs, ys + j, m - j);
    } else {
        forward_f32((const float *)x + i + j, ys + j, m - j);
    }
}

/* y = GELU(x), each element then dropped where the draws of (s1, s2) say so (t > 0: the
 * dropout of `masked` after the activation, as dropout.c draws it; t = 0: none). */
int gelu_forward(const void *x, void *y, int bf16, uint32_t s1, uint32_t s2, uint32_t t,
                 long n, long i0, long i1) {
    (void)n;
    PARALLEL {
        long lo, hi;
        share(i0, i1, &lo, &hi);
        float xs[CHUNK], ys[CHUNK];
        long i = lo;
#if GELU16
        if (!t) /* straight from the registers */
            for (; i + 16 <= hi; i += 16) store16(y, bf16, i, forward16(load16(x, bf16, i)));
#endif
        for (; i < hi; i += CHUNK) {
            long m = hi - i < CHUNK ? hi - i : CHUNK;
            float *R out = bf16 ? ys : (float *)y + i;
            forward_chunk(x, bf16, i, m, xs, out);
            if (t) drop_row(out, (uint32_t)i, m, s1, s2, t);
            if (bf16) to_bf16(ys, (uint16_t *)y + i, m);
        }
    }
    return 0;
}

/* y = GELU(x + bias) over rows [r0, r1) of D elements, bias (fp32, D) added to each row: a
 * linear layer's bias applied in the activation's pass (inference, no dropout), where the
 * linear itself would first fill its whole output with the bias and then add the product
 * to it. Rows split over OpenMP threads where the library has them; returns 0. */
int gelu_bias_forward(const void *x, const float *bias, void *y, int bf16, long D, long rows,
                      long r0, long r1) {
    (void)rows;
    PARALLEL {
        long lo, hi;
        share(r0, r1, &lo, &hi);
        float xs[CHUNK], ys[CHUNK];
        for (long r = lo; r < hi; r++)
            for (long j = 0; j < D; j += CHUNK) {
                long i = r * D + j, m = D - j < CHUNK ? D - j : CHUNK, k = 0;
#if GELU16
                for (; k + 16 <= m; k += 16) {
                    __m512 v = _mm512_add_ps(load16(x, bf16, i + k), _mm512_loadu_ps(bias + j + k));
                    store16(y, bf16, i + k, forward16(v));
                }
#endif
                if (k == m) continue;
                for (long e = k; e < m; e++) xs[e - k] = load_f32(x, bf16, i + e) + bias[j + e];
                forward_f32(xs, ys, m - k);
                if (bf16)
                    to_bf16(ys, (uint16_t *)y + i + k, m - k);
                else
                    memcpy((float *)y + i + k, ys, sizeof(float) * (m - k));
            }
    }
    return 0;
}

/* dL/dx of elements [i, i + m), m <= CHUNK, into the fp32 row o (gs, xs: scratch). */
static inline void backward_chunk(const void *g, const void *x, int bf16, long i, long m,
                                  float *R gs, float *R xs, float *R o) {
    long j = 0;
#if GELU16
    for (; j + 16 <= m; j += 16)
        _mm512_storeu_ps(o + j, backward16(load16(g, bf16, i + j), load16(x, bf16, i + j)));
#endif
    if (j == m) return;
    if (bf16) {
        from_bf16((const uint16_t *)g + i + j, gs, m - j);
        from_bf16((const uint16_t *)x + i + j, xs, m - j);
        backward_f32(gs, xs, o + j, m - j);
    } else {
        backward_f32((const float *)g + i + j, (const float *)x + i + j, o + j, m - j);
    }
}

/* dL/dx from dL/dy = g, 0 where the forward's draws (s1, s2, t) dropped the element. */
int gelu_backward(const void *g, const void *x, void *gx, int bf16, uint32_t s1, uint32_t s2,
                  uint32_t t, long n, long i0, long i1) {
    (void)n;
    PARALLEL {
        long lo, hi;
        share(i0, i1, &lo, &hi);
        float gs[CHUNK], xs[CHUNK], out[CHUNK];
        for (long i = lo; i < hi; i += CHUNK) {
            long m = hi - i < CHUNK ? hi - i : CHUNK;
            float *R o = bf16 ? out : (float *)gx + i;
            backward_chunk(g, x, bf16, i, m, gs, xs, o);
            if (t) drop_row(o, (uint32_t)i, m, s1, s2, t);
            if (bf16) to_bf16(out, (uint16_t *)gx + i, m);
        }
    }
    return 0;
}
