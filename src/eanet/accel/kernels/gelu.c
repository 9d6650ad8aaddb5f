/* GELU with the tanh approximation (the reference's ops.gelu), forward and backward.
 *
 *   y = x / 2 * (1 + tanh(u)),  u = sqrt(2/pi) * (x + 0.044715 x^3)
 *   dy/dx = (1 + t) / 2 + x / 2 * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 x^2),  t = tanh(u)
 *
 * 1 + tanh(u) and 1 - tanh(u)^2 come from e = e^(-2|u|) (the vectorised exponential of
 * common.h), exact in the tails where torch's go through tanh itself. bfloat16 tensors go through a small fp32 buffer per thread, 256 elements at
 * a time (in and out in bf16, the arithmetic in fp32, as torch's own bf16 GELU). Built by
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

int gelu_forward(const void *x, void *y, int bf16, long n, long i0, long i1) {
    (void)n;
    PARALLEL {
        long lo, hi;
        share(i0, i1, &lo, &hi);
        float xs[CHUNK], ys[CHUNK];
        for (long i = lo; i < hi; i += CHUNK) {
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
