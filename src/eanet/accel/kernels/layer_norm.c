/* LayerNorm over the last axis (D) of a float32 (rows, D) tensor, forward and backward.
 *
 *   forward:  y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps) (biased variance)
 *   backward: with xh = (x - mean) * rstd and gh = g * w,
 *             dL/dx = rstd * (gh - mean_D(gh) - xh * mean_D(gh * xh)),
 *             dL/dw = sum over rows of g * xh,  dL/db = sum over rows of g.
 *
 * Why a kernel: under bfloat16 autocast torch runs LayerNorm in fp32 and writes fp32, and
 * the next linear layer casts that to bfloat16 in a second pass; here the fp32 residual
 * stream x is read once and y written once in bf16 (`y_bf16`, else fp32), and the backward
 * reads the gradient g as it comes (`g_bf16`: bf16, else fp32). dL/dx is fp32 as x; w, b,
 * mean, rstd and all sums are fp32. A row's sums are short (D = 64) and each waits on the
 * last, so rows go in groups of G: the means of G rows, then their variances, then G square
 * roots at once, then the outputs (twice as fast as row by row, measured).
 *
 * With a residual h (bf16, the output of the block's previous branch) the kernel also does
 * the residual add before the norm, s = x + h (fp32, as torch promotes it), writing s and
 * y in the one pass; its backward adds the stream's own gradient and writes dL/dh in bf16,
 * where torch would add and cast in two more passes.
 *
 * The sums of dL/dw and dL/db over rows go by fixed blocks of BLOCK rows: block k writes its
 * partial sums to part[k] (2 x D floats) and the caller adds the blocks up, so threads never
 * share an accumulator and the result does not depend on the number of threads. Built by
 * eanet.models.native (see double_normalize.c); ln_forward's range is of rows, ln_backward's
 * of blocks; both split it over OpenMP threads where the library has them, and return 0.
 */
#include <math.h>

#include "common.h"

#define G 16
#define BLOCK 256

int ln_block_rows(void) { return BLOCK; }

static inline __attribute__((always_inline)) float row_sum(const float *R a, long D) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long d = 0; d < D; d++) s += a[d];
    return s;
}

/* Rows [i0, i0 + n), n <= G, of x, or of x + h where h (bf16) is given (then written to
 * s as fp32: the residual stream); out and sb are G x D floats of scratch. */
static inline __attribute__((always_inline)) void forward_group(
    const float *x, const uint16_t *R h, const float *R w, const float *R b, float *s,
    void *y, float *R mean, float *R rstd, int y_bf16, long D, float eps, long i0, long n,
    float *R out, float *R sb) {
    const float *R src = x + i0 * D;
    if (h) {
        for (long j = 0; j < n * D; j++) sb[j] = x[i0 * D + j] + load_f32(h, 1, i0 * D + j);
        for (long j = 0; j < n * D; j++) s[i0 * D + j] = sb[j];
        src = sb;
    }
    float m[G], v[G] = {0.0f}, r[G];
    for (long k = 0; k < n; k++) m[k] = row_sum(src + k * D, D) / (float)D;
    for (long k = 0; k < n; k++) {
        const float *R xr = src + k * D;
        float t = 0.0f;
#pragma omp simd reduction(+ : t)
        for (long d = 0; d < D; d++) t += (xr[d] - m[k]) * (xr[d] - m[k]);
        v[k] = t;
    }
    for (long k = 0; k < G; k++) r[k] = 1.0f / sqrtf(v[k] / (float)D + eps);
    for (long k = 0; k < n; k++) {
        const float *R xr = src + k * D;
        float *R o = y_bf16 ? out + k * D : (float *)y + (i0 + k) * D;
        for (long d = 0; d < D; d++) o[d] = (xr[d] - m[k]) * r[k] * w[d] + b[d];
        mean[i0 + k] = m[k], rstd[i0 + k] = r[k];
    }
    if (y_bf16) to_bf16(out, (uint16_t *)y + i0 * D, n * D);
}

#if defined(__AVX512F__)
/* forward_group for 16 rows of D = 64 in registers: each row is 4 vectors, the 16 rows'
 * sums come out as one vector from the tree, and y goes out in its type from the
 * registers (the scalar loops went through fp32 scratch); sb is 16 x 64 floats. */
static inline __attribute__((always_inline)) void forward_group64(
    const float *x, const uint16_t *R h, const float *R w, const float *R b, float *s,
    void *y, float *R mean, float *R rstd, int y_bf16, float eps, long i0, float *R sb) {
    __m512 acc[16], ww[4], bb[4];
    for (int k = 0; k < 16; k++) {
        __m512 a[4];
        for (int j = 0; j < 4; j++) {
            long i = (i0 + k) * 64 + 16 * j;
            a[j] = _mm512_loadu_ps(x + i);
            if (h) {
                a[j] = _mm512_add_ps(a[j], load16(h, 1, i));
                _mm512_storeu_ps(s + i, a[j]);
            }
            _mm512_storeu_ps(sb + 64 * k + 16 * j, a[j]);
        }
        acc[k] = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    }
    __m512 m = _mm512_div_ps(sums16(acc), _mm512_set1_ps(64.0f));
    for (int k = 0; k < 16; k++) {
        __m512 mk = lane(m, k), t = _mm512_setzero_ps();
        for (int j = 0; j < 4; j++) {
            __m512 d = _mm512_sub_ps(_mm512_loadu_ps(sb + 64 * k + 16 * j), mk);
            t = _mm512_fmadd_ps(d, d, t);
        }
        acc[k] = t;
    }
    __m512 var = _mm512_div_ps(sums16(acc), _mm512_set1_ps(64.0f));
    __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_sqrt_ps(_mm512_add_ps(var, _mm512_set1_ps(eps))));
    _mm512_storeu_ps(mean + i0, m);
    _mm512_storeu_ps(rstd + i0, r);
    for (int j = 0; j < 4; j++) ww[j] = _mm512_loadu_ps(w + 16 * j), bb[j] = _mm512_loadu_ps(b + 16 * j);
    for (int k = 0; k < 16; k++) {
        __m512 mk = lane(m, k), rk = lane(r, k);
        for (int j = 0; j < 4; j++) {
            __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(sb + 64 * k + 16 * j), mk), rk);
            store16(y, y_bf16, (i0 + k) * 64 + 16 * j, _mm512_fmadd_ps(xh, ww[j], bb[j]));
        }
    }
}
#define VECTOR_ROWS 1
#else
#define VECTOR_ROWS 0
static inline void forward_group64(const float *x, const uint16_t *R h, const float *R w,
                                   const float *R b, float *s, void *y, float *R mean,
                                   float *R rstd, int y_bf16, float eps, long i0, float *R sb) {
    (void)x, (void)h, (void)w, (void)b, (void)s, (void)y, (void)mean, (void)rstd;
    (void)y_bf16, (void)eps, (void)i0, (void)sb;
}
#endif

static inline __attribute__((always_inline)) void forward_rows(
    const float *x, const uint16_t *R h, const float *R w, const float *R b, float *s,
    void *y, float *R mean, float *R rstd, int y_bf16, long D, float eps, long r0, long r1,
    float *R scratch) {
    for (long i = r0; i < r1; i += G) {
        long n = r1 - i < G ? r1 - i : G;
        if (VECTOR_ROWS && D == 64 && n == 16) {
            forward_group64(x, h, w, b, s, y, mean, rstd, y_bf16, eps, i, scratch);
            continue;
        }
        forward_group(x, h, w, b, s, y, mean, rstd, y_bf16, D, eps, i, n, scratch,
                      scratch + G * D);
    }
}

/* y = LayerNorm(x), or with h (else NULL): s = x + h and y = LayerNorm(s); s may be x
 * itself (in place: each element of x is read before its sum is written, so x and s carry
 * no `restrict`). */
int ln_forward(const float *x, const uint16_t *h, const float *w, const float *b, float *s,
               void *y, float *mean, float *rstd, int y_bf16, long D, float eps, long r0,
               long r1) {
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel reduction(| : failed)
#endif
    {
        long lo, hi;
        share(r0, r1, &lo, &hi);
        float *scratch = malloc(sizeof(float) * 2 * G * D);
        if (!scratch)
            failed = 1;
        else if (D == 64 && y_bf16) /* EANet's and ViT's width under bf16: loops unrolled */
            forward_rows(x, h, w, b, s, y, mean, rstd, 1, 64, eps, lo, hi, scratch);
        else
            forward_rows(x, h, w, b, s, y, mean, rstd, y_bf16, D, eps, lo, hi, scratch);
        free(scratch);
    }
    return failed;
}

/* dL/dx of rows [i0, i0 + n), n <= G, plus gs (dL/dx from elsewhere, fp32) where given, and
 * a bf16 copy in gh where given; the rows' g * xh and g added into gw and gb. */
static inline __attribute__((always_inline)) void backward_group(
    const void *g, const float *R gs, const float *R x, const float *R w,
    const float *R mean, const float *R rstd, float *R gx, uint16_t *R gh, float *R gw,
    float *R gb, int g_bf16, long D, long i0, long n) {
    float sg[G], sgx[G];
    for (long k = 0; k < n; k++) {
        long i = i0 + k;
        const float *R xr = x + i * D;
        float m = mean[i], r = rstd[i], s1 = 0.0f, s2 = 0.0f;
#pragma omp simd reduction(+ : s1, s2)
        for (long d = 0; d < D; d++) {
            float gd = load_f32(g, g_bf16, i * D + d), xh = (xr[d] - m) * r;
            gw[d] += gd * xh, gb[d] += gd;
            s1 += gd * w[d], s2 += gd * w[d] * xh;
        }
        sg[k] = s1 / (float)D, sgx[k] = s2 / (float)D;
    }
    for (long k = 0; k < n; k++) {
        long i = i0 + k;
        const float *R xr = x + i * D;
        float m = mean[i], r = rstd[i];
        for (long d = 0; d < D; d++) {
            float xh = (xr[d] - m) * r;
            float v = r * (load_f32(g, g_bf16, i * D + d) * w[d] - sg[k] - xh * sgx[k]);
            gx[i * D + d] = gs ? v + gs[i * D + d] : v;
        }
    }
    if (gh) to_bf16(gx + i0 * D, gh + i0 * D, n * D);
}

static inline __attribute__((always_inline)) void backward_block(
    const void *g, const float *R gs, const float *R x, const float *R w,
    const float *R mean, const float *R rstd, float *R gx, uint16_t *R gh, float *R gw,
    float *R gb, int g_bf16, long D, long r0, long r1) {
    for (long d = 0; d < D; d++) gw[d] = 0.0f, gb[d] = 0.0f;
    for (long i = r0; i < r1; i += G) {
        long n = r1 - i < G ? r1 - i : G;
        backward_group(g, gs, x, w, mean, rstd, gx, gh, gw, gb, g_bf16, D, i, n);
    }
}

/* From g = dL/dy: dL/dx (+ gs where given; a bf16 copy in gh where given) and the blocks'
 * partial sums of dL/dw, dL/db in part. x is LayerNorm's input (s of ln_forward). */
int ln_backward(const void *g, const float *gs, const float *x, const float *w,
                const float *mean, const float *rstd, float *gx, uint16_t *gh, float *part,
                int g_bf16, long D, long rows, long k0, long k1) {
    PARALLEL {
        long lo, hi;
        share(k0, k1, &lo, &hi);
        for (long k = lo; k < hi; k++) {
            float *gw = part + k * 2 * D, *gb = gw + D;
            long r0 = k * BLOCK, r1 = r0 + BLOCK < rows ? r0 + BLOCK : rows;
            if (D == 64 && g_bf16)
                backward_block(g, gs, x, w, mean, rstd, gx, gh, gw, gb, 1, 64, r0, r1);
            else
                backward_block(g, gs, x, w, mean, rstd, gx, gh, gw, gb, g_bf16, D, r0, r1);
        }
    }
    return 0;
}
