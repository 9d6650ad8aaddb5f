/* Softmax over the last axis of a bfloat16 (rows, L) tensor: fp32 inside, bf16 out.
 *
 *   y[r, :] = e^(x[r, :] - max) / sum of e^(x[r, :] - max)
 *
 * What self-attention's weights take in CPU bf16 inference (eanet.accel.modules,
 * attention_in_chunks): torch's bf16 softmax makes the same fp32 computation with a more
 * expensive exponential; e^x here is the polynomial of common.h (about 1 ulp of fp32, far
 * below bf16's rounding). On AVX-512 a row of L <= 256 stays in registers (max, e^x, sum,
 * scale, round to bf16 without leaving them); elsewhere, and for longer rows, the scalar
 * loops through a row of fp32 scratch, which the compiler vectorises. Built by
 * eanet.accel.native (see double_normalize.c); softmax_forward does rows [r0, r1), split
 * over OpenMP threads where the library has them, and returns 0, or 1 where its scratch row
 * could not be had.
 *
 * Training (CPU bf16 autocast, attention dropout p > 0): softmax_dropout_forward writes
 * y = softmax(x) (kept for the backward) and d = y where dropout keeps it, else 0, in one
 * pass; the mask is dropout.c's (element r * L + j's decision from two seeds, `kept` in
 * common.h; t = 0 keeps all), recomputed by softmax_dropout_backward, which turns dL/dd into
 *   dL/dx = y * (gy - sum_j gy * y),  gy = dL/dd where kept, else 0,
 * in one pass, where torch's softmax, its backward and the dropout make four.
 */
#include <math.h>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define REGISTER_ROW 16 /* vectors of a row kept in registers */

/* One row of L = 16 * k floats, k <= REGISTER_ROW, in registers. */
static inline __attribute__((always_inline)) void row_in_registers(const uint16_t *R x,
                                                                   uint16_t *R y, long k) {
    __m512 v[REGISTER_ROW], m = _mm512_set1_ps(-INFINITY), t = _mm512_setzero_ps();
    for (long j = 0; j < k; j++) m = _mm512_max_ps(m, v[j] = load16(x, 1, 16 * j));
    __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    for (long j = 0; j < k; j++) t = _mm512_add_ps(t, v[j] = exp16(_mm512_sub_ps(v[j], mx)));
    __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_set1_ps(_mm512_reduce_add_ps(t)));
    for (long j = 0; j < k; j++) store16(y, 1, 16 * j, _mm512_mul_ps(v[j], inv));
}

/* Training, one row in registers: y, and d = y where kept (element `at` onwards). */
static inline __attribute__((always_inline)) void train_row_in_registers(
    const uint16_t *R x, uint16_t *R y, uint16_t *R d, long k, uint32_t at, uint32_t s1,
    uint32_t s2, uint32_t t) {
    __m512 v[REGISTER_ROW], m = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (long j = 0; j < k; j++) m = _mm512_max_ps(m, v[j] = load16(x, 1, 16 * j));
    __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    for (long j = 0; j < k; j++) sum = _mm512_add_ps(sum, v[j] = exp16(_mm512_sub_ps(v[j], mx)));
    __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_set1_ps(_mm512_reduce_add_ps(sum)));
    __mmask32 keep = 0;
    for (long j = 0; j < k; j++) {
        __m256i h = bf16x16(_mm512_mul_ps(v[j], inv));
        _mm256_storeu_si256((__m256i *)(y + 16 * j), h);
        keep = j % 2 ? keep >> 16 : keep32(at + 16 * (uint32_t)j, s1, s2, t);
        _mm256_storeu_si256((__m256i *)(d + 16 * j), _mm256_maskz_mov_epi16((__mmask16)keep, h));
    }
}

/* The backward of one row in registers: gx = y * (gy - sum(gy * y)), gy = g where kept. */
static inline __attribute__((always_inline)) void grad_row_in_registers(
    const uint16_t *R g, const uint16_t *R y, uint16_t *R gx, long k, uint32_t at, uint32_t s1,
    uint32_t s2, uint32_t t) {
    __m512 gy[REGISTER_ROW], dot = _mm512_setzero_ps();
    __mmask32 keep = 0;
    for (long j = 0; j < k; j++) {
        keep = j % 2 ? keep >> 16 : keep32(at + 16 * (uint32_t)j, s1, s2, t);
        gy[j] = _mm512_maskz_mov_ps((__mmask16)keep, load16(g, 1, 16 * j));
        dot = _mm512_fmadd_ps(gy[j], load16(y, 1, 16 * j), dot);
    }
    __m512 s = _mm512_set1_ps(_mm512_reduce_add_ps(dot));
    for (long j = 0; j < k; j++)
        store16(gx, 1, 16 * j, _mm512_mul_ps(load16(y, 1, 16 * j), _mm512_sub_ps(gy[j], s)));
}
#define VECTOR_ROWS 1
#else
#define REGISTER_ROW 0
#define VECTOR_ROWS 0
static inline void row_in_registers(const uint16_t *R x, uint16_t *R y, long k) {
    (void)x, (void)y, (void)k;
}
static inline void train_row_in_registers(const uint16_t *R x, uint16_t *R y, uint16_t *R d,
                                          long k, uint32_t at, uint32_t s1, uint32_t s2,
                                          uint32_t t) {
    (void)x, (void)y, (void)d, (void)k, (void)at, (void)s1, (void)s2, (void)t;
}
static inline void grad_row_in_registers(const uint16_t *R g, const uint16_t *R y,
                                         uint16_t *R gx, long k, uint32_t at, uint32_t s1,
                                         uint32_t s2, uint32_t t) {
    (void)g, (void)y, (void)gx, (void)k, (void)at, (void)s1, (void)s2, (void)t;
}
#endif

/* One row of any length through fp32 scratch e (L floats). */
static inline void row_scalar(const uint16_t *R x, uint16_t *R y, float *R e, long L) {
    float mx = -INFINITY, sum = 0.0f;
    from_bf16(x, e, L);
    for (long i = 0; i < L; i++) mx = e[i] > mx ? e[i] : mx;
    for (long i = 0; i < L; i++) sum += e[i] = exp_nonpositive(e[i] - mx);
    float inv = 1.0f / sum;
    for (long i = 0; i < L; i++) e[i] *= inv;
    to_bf16(e, y, L);
}

/* Training, one row of any length: y by row_scalar, then d from the same fp32 row. */
static inline void train_row_scalar(const uint16_t *R x, uint16_t *R y, uint16_t *R d,
                                    float *R e, long L, uint32_t at, uint32_t s1, uint32_t s2,
                                    uint32_t t) {
    row_scalar(x, y, e, L);
    drop_row(e, at, L, s1, s2, t);
    to_bf16(e, d, L);
}

/* The backward of one row of any length through scratch e (2 L floats). */
static inline void grad_row_scalar(const uint16_t *R g, const uint16_t *R y, uint16_t *R gx,
                                   float *R e, long L, uint32_t at, uint32_t s1, uint32_t s2,
                                   uint32_t t) {
    float *R gy = e, *R yf = e + L, dot = 0.0f;
    from_bf16(g, gy, L);
    from_bf16(y, yf, L);
    drop_row(gy, at, L, s1, s2, t);
    for (long i = 0; i < L; i++) dot += gy[i] * yf[i];
    for (long i = 0; i < L; i++) gy[i] = yf[i] * (gy[i] - dot);
    to_bf16(gy, gx, L);
}

/* Rows [r0, r1): with y, the training backward (x = dL/dd and y -> dL/dx: out); else with
 * out2, the training forward (x -> y, d: out, out2); else inference (x -> y: out). */
static int rows(const uint16_t *x, const uint16_t *y, uint16_t *out, uint16_t *out2,
                      uint32_t s1, uint32_t s2, uint32_t t, long L, long r0, long r1) {
    int failed = 0;
    PARALLEL_OR_FAILED
    {
        long lo, hi;
        share(r0, r1, &lo, &hi);
        int vector = VECTOR_ROWS && L % 16 == 0 && L / 16 <= REGISTER_ROW;
        float *e = vector ? NULL : malloc(sizeof(float) * 2 * (size_t)L);
        if (!vector && !e && lo < hi) failed = 1;
        for (long r = lo; r < hi && !failed; r++) {
            long i = r * L;
            uint32_t at = (uint32_t)i;
            if (vector && y)
                grad_row_in_registers(x + i, y + i, out + i, L / 16, at, s1, s2, t);
            else if (vector && out2)
                train_row_in_registers(x + i, out + i, out2 + i, L / 16, at, s1, s2, t);
            else if (vector)
                row_in_registers(x + i, out + i, L / 16);
            else if (y)
                grad_row_scalar(x + i, y + i, out + i, e, L, at, s1, s2, t);
            else if (out2)
                train_row_scalar(x + i, out + i, out2 + i, e, L, at, s1, s2, t);
            else
                row_scalar(x + i, out + i, e, L);
        }
        free(e);
    }
    return failed;
}

int softmax_forward(const uint16_t *x, uint16_t *y, long L, long r0, long r1) {
    return rows(x, NULL, y, NULL, 0, 0, 0, L, r0, r1);
}

int softmax_dropout_forward(const uint16_t *x, uint16_t *y, uint16_t *d, uint32_t s1,
                            uint32_t s2, uint32_t t, long L, long r0, long r1) {
    return rows(x, NULL, y, d, s1, s2, t, L, r0, r1);
}

int softmax_dropout_backward(const uint16_t *g, const uint16_t *y, uint16_t *gx, uint32_t s1,
                             uint32_t s2, uint32_t t, long L, long r0, long r1) {
    return rows(g, y, gx, NULL, s1, s2, t, L, r0, r1);
}
