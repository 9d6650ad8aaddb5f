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
 */
#include <math.h>

#include "common.h"

#if defined(__AVX512F__)
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
#define VECTOR_ROWS 1
#else
#define REGISTER_ROW 0
#define VECTOR_ROWS 0
static inline void row_in_registers(const uint16_t *R x, uint16_t *R y, long k) {
    (void)x, (void)y, (void)k;
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

int softmax_forward(const uint16_t *x, uint16_t *y, long L, long r0, long r1) {
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel reduction(| : failed)
#endif
    {
        long lo, hi;
        share(r0, r1, &lo, &hi);
        int vector = VECTOR_ROWS && L % 16 == 0 && L / 16 <= REGISTER_ROW;
        float *e = vector ? NULL : malloc(sizeof(float) * (size_t)L);
        if (!vector && !e && lo < hi) failed = 1;
        for (long r = lo; r < hi && !failed; r++) {
            if (vector)
                row_in_registers(x + r * L, y + r * L, L / 16);
            else
                row_scalar(x + r * L, y + r * L, e, L);
        }
        free(e);
    }
    return failed;
}
