/* GELU with the tanh approximation (the reference's ops.gelu), forward and backward.
 *
 *   y = x / 2 * (1 + tanh(u)),  u = sqrt(2/pi) * (x + 0.044715 x^3)
 *   dy/dx = (1 + t) / 2 + x / 2 * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 x^2),  t = tanh(u)
 *
 * 1 + tanh(u) and 1 - tanh(u)^2 come from e = e^(-2|u|) (the vectorised exponential of
 * common.h), exact in the tails where torch's go through tanh itself. bfloat16 tensors go
 * through a small fp32 buffer per thread, 256 elements at a time (in and out in bf16, the
 * arithmetic in fp32, as torch's own bf16 GELU); on AVX-512 the forward runs 16 at a time
 * in registers (forward16). Built by
 * eanet.models.native (see double_normalize.c); *(..., n, i0, i1) does elements [i0, i1)
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
/* The forward of 16 values: y = x (1 + t) / 2 with 1 + t = 2 r (u >= 0) or 2 e r (u < 0),
 * e = e^(-2|u|), r = 1 / (1 + e), as tanh_parts computes it. */
static inline __m512 forward16(__m512 v) {
    __m512 cubic = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(C), v), _mm512_mul_ps(v, v), v);
    __m512 u = _mm512_mul_ps(_mm512_set1_ps(K), cubic);
    __m512 a = _mm512_abs_ps(u);
    __m512 e = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), a));
    __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    __mmask16 negative = _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 half_opt = _mm512_mask_mul_ps(r, negative, e, r);
    return _mm512_mul_ps(v, half_opt);
}
#define GELU16 1
#else
#define GELU16 0
#endif

int gelu_forward(const void *x, void *y, int bf16, long n, long i0, long i1) {
    (void)n;
    PARALLEL {
        long lo, hi;
        share(i0, i1, &lo, &hi);
        float xs[CHUNK], ys[CHUNK];
        long i = lo;
#if GELU16
        for (; i + 16 <= hi; i += 16) store16(y, bf16, i, forward16(load16(x, bf16, i)));
#endif
        for (; i < hi; i += CHUNK) {
            long m = hi - i < CHUNK ? hi - i : CHUNK;
            if (!bf16) {
                forward_f32((const float *)x + i, (float *)y + i, m);
                continue;
            }
            from_bf16((const uint16_t *)x + i, xs, m);
            forward_f32(xs, ys, m);
            to_bf16(ys, (uint16_t *)y + i, m);
        }
    }
    return 0;
}

int gelu_backward(const void *g, const void *x, void *gx, int bf16, long n, long i0,
                  long i1) {
    (void)n;
    PARALLEL {
        long lo, hi;
        share(i0, i1, &lo, &hi);
        float gs[CHUNK], xs[CHUNK], out[CHUNK];
        for (long i = lo; i < hi; i += CHUNK) {
            long m = hi - i < CHUNK ? hi - i : CHUNK;
            if (!bf16) {
                backward_f32((const float *)g + i, (const float *)x + i, (float *)gx + i, m);
                continue;
            }
            from_bf16((const uint16_t *)g + i, gs, m);
            from_bf16((const uint16_t *)x + i, xs, m);
            backward_f32(gs, xs, out, m);
            to_bf16(out, (uint16_t *)gx + i, m);
        }
    }
    return 0;
}
