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
 * where torch would add and cast in two more passes. The branch's dropout (the block's
 * projection or MLP dropout, drawn as dropout.c draws it) goes into the same passes: h's
 * dropped elements are left out of s, and dL/dh is 0 there. The bias of the branch's last
 * linear layer can be left to this kernel too (hb): added to h's rows on the way in, its
 * gradient (dL/dh's rows summed, before the rounding) summed in the backward's blocks beside
 * dL/dw and dL/db, where torch would fill the linear's output with it first and sum dL/dh
 * in a pass of its own.
 *
 * The sums of dL/dw, dL/db (and the residual bias's gradient) over rows go by fixed blocks
 * of BLOCK rows: block k writes its partial sums to part[k] (3 x D floats) and the caller
 * adds the blocks up, so threads never share an accumulator and the result does not depend
 * on the number of threads. Built by eanet.accel.native (see double_normalize.c);
 * ln_forward's range is of rows, ln_backward's of blocks; both split it over OpenMP threads
 * where the library has them, and return 0.
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

/* The dropout of the residual h: (s1, s2, t) as dropout.c draws it (t = 0: none). */
typedef struct {
    uint32_t s1, s2, t;
} drops;

/* Rows [i0, i0 + n), n <= G, of x, or of x + h where h (bf16) is given (then written to
 * s as fp32: the residual stream), h's bias hb (fp32, D; or NULL) added to each of its rows
 * and h's elements dropped where `drop` says; out and sb are G x D floats of scratch. */
static inline __attribute__((always_inline)) void forward_group(
    const float *x, const uint16_t *R h, const float *R hb, const float *R w, const float *R b,
    float *s, void *y, float *R mean, float *R rstd, int y_bf16, long D, float eps,
    drops drop, long i0, long n, float *R out, float *R sb) {
    const float *R src = x + i0 * D;
    if (h) {
        from_bf16(h + i0 * D, sb, n * D);
        if (hb)
            for (long k = 0; k < n; k++)
                for (long d = 0; d < D; d++) sb[k * D + d] += hb[d];
        if (drop.t) drop_row(sb, (uint32_t)(i0 * D), n * D, drop.s1, drop.s2, drop.t);
        for (long j = 0; j < n * D; j++) sb[j] += x[i0 * D + j];
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
/* The 64 keep decisions of row `row` of D = 64 under `drop` (all kept without a dropout). */
static inline uint64_t row_keep64(drops drop, long row) {
    uint64_t keep = ~0ull;
#if defined(__AVX512BW__)
    if (drop.t) {
        uint32_t at = (uint32_t)(row * 64);
        keep = (uint64_t)keep32(at, drop.s1, drop.s2, drop.t) |
               (uint64_t)keep32(at + 32, drop.s1, drop.s2, drop.t) << 32;
    }
#endif
    return keep;
}

/* forward_group for 16 rows of D = 64 in registers: each row is 4 vectors, the 16 rows'
 * sums come out as one vector from the tree, and y goes out in its type from the
 * registers (the scalar loops went through fp32 scratch); sb is 16 x 64 floats. */
static inline __attribute__((always_inline)) void forward_group64(
    const float *x, const uint16_t *R h, const float *R hb, const float *R w, const float *R b,
    float *s, void *y, float *R mean, float *R rstd, int y_bf16, float eps, drops drop,
    long i0, float *R sb) {
    __m512 acc[16], ww[4], bb[4], hv[4];
    for (int j = 0; j < 4; j++) hv[j] = hb ? _mm512_loadu_ps(hb + 16 * j) : _mm512_setzero_ps();
    for (int k = 0; k < 16; k++) {
        __m512 a[4];
        uint64_t keep = h ? row_keep64(drop, i0 + k) : ~0ull;
        for (int j = 0; j < 4; j++) {
            long i = (i0 + k) * 64 + 16 * j;
            a[j] = _mm512_loadu_ps(x + i);
            if (h) {
                __m512 hi = _mm512_add_ps(load16(h, 1, i), hv[j]);
                a[j] = _mm512_mask_add_ps(a[j], (__mmask16)(keep >> (16 * j)), a[j], hi);
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
#if defined(__AVX512BW__)
#define VECTOR_ROWS 1
#else /* keep32 needs AVX-512 BW: the residual's dropout goes by the loops */
#define VECTOR_ROWS 0
#endif
#else
#define VECTOR_ROWS 0
static inline void forward_group64(const float *x, const uint16_t *R h, const float *R hb,
                                   const float *R w, const float *R b, float *s, void *y,
                                   float *R mean, float *R rstd, int y_bf16, float eps,
                                   drops drop, long i0, float *R sb) {
    (void)x, (void)h, (void)hb, (void)w, (void)b, (void)s, (void)y, (void)mean, (void)rstd;
    (void)y_bf16, (void)eps, (void)drop, (void)i0, (void)sb;
}
#endif

static inline __attribute__((always_inline)) void forward_rows(
    const float *x, const uint16_t *R h, const float *R hb, const float *R w, const float *R b,
    float *s, void *y, float *R mean, float *R rstd, int y_bf16, long D, float eps,
    drops drop, long r0, long r1, float *R scratch) {
    for (long i = r0; i < r1; i += G) {
        long n = r1 - i < G ? r1 - i : G;
        if (VECTOR_ROWS && D == 64 && n == 16) {
            forward_group64(x, h, hb, w, b, s, y, mean, rstd, y_bf16, eps, drop, i, scratch);
            continue;
        }
        forward_group(x, h, hb, w, b, s, y, mean, rstd, y_bf16, D, eps, drop, i, n, scratch,
                      scratch + G * D);
    }
}

/* y = LayerNorm(x), or with h (else NULL): s = x + h and y = LayerNorm(s), h's bias hb
 * (fp32, D: the branch's last linear's bias, left to this pass; or NULL) added to its rows,
 * and h's elements dropped where the draws of (s1, s2) say so (t > 0: the branch's
 * dropout); s may be x itself (in place: each element of x is read before its sum is
 * written, so x and s carry no `restrict`). */
int ln_forward(const float *x, const uint16_t *h, const float *hb, const float *w,
               const float *b, float *s, void *y, float *mean, float *rstd, int y_bf16, long D,
               float eps, uint32_t s1, uint32_t s2, uint32_t t, long r0, long r1) {
    drops drop = {s1, s2, t};
    int failed = 0;
    PARALLEL_OR_FAILED
    {
        long lo, hi;
        share(r0, r1, &lo, &hi);
        float *scratch = malloc(sizeof(float) * 2 * G * D);
        if (!scratch)
            failed = 1;
        else if (D == 64 && y_bf16) /* EANet's and ViT's width under bf16: loops unrolled */
            forward_rows(x, h, hb, w, b, s, y, mean, rstd, 1, 64, eps, drop, lo, hi, scratch);
        else
            forward_rows(x, h, hb, w, b, s, y, mean, rstd, y_bf16, D, eps, drop, lo, hi, scratch);
        free(scratch);
    }
    return failed;
}

/* dst = src in bf16, [0, n) being elements at, at + 1, ... of the tensor, those the draws
 * of `drop` dropped set to 0. */
static inline void dropped_bf16(const float *R src, uint16_t *R dst, uint32_t at, long n,
                                drops drop) {
    if (!drop.t) {
        to_bf16(src, dst, n);
        return;
    }
    float buf[256];
    for (long j = 0; j < n; j += 256) {
        long m = n - j < 256 ? n - j : 256;
        memcpy(buf, src + j, sizeof(float) * (size_t)m);
        drop_row(buf, at + (uint32_t)j, m, drop.s1, drop.s2, drop.t);
        to_bf16(buf, dst + j, m);
    }
}

/* dL/dx of rows [i0, i0 + n), n <= G, plus gs (dL/dx from elsewhere, fp32) where given, and
 * a bf16 copy in gh where given (the residual's gradient: 0 where `drop` dropped it, its rows
 * also added into gc: the gradient of the residual's bias); the rows' g * xh and g added
 * into gw and gb. */
static inline __attribute__((always_inline)) void backward_group(
    const void *g, const float *R gs, const float *R x, const float *R w,
    const float *R mean, const float *R rstd, float *R gx, uint16_t *R gh, float *R gw,
    float *R gb, float *R gc, int g_bf16, long D, drops drop, long i0, long n) {
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
    if (!gh) return;
    dropped_bf16(gx + i0 * D, gh + i0 * D, (uint32_t)(i0 * D), n * D, drop);
    for (long k = 0; k < n; k++)
        for (long d = 0; d < D; d++) {
            long i = (i0 + k) * D + d;
            if (!drop.t || kept((uint32_t)i, drop.s1, drop.s2, drop.t)) gc[d] += gx[i];
        }
}

#if VECTOR_ROWS
/* backward_group for 16 rows of D = 64 in registers: the 16 rows' two sums from the tree
 * of shuffles (sums16), dL/dw and dL/db accumulated in registers, dL/dh rounded to bf16
 * (and dropped) from the registers and summed into gc. */
static inline __attribute__((always_inline)) void backward_group64(
    const void *g, const float *R gs, const float *R x, const float *R w,
    const float *R mean, const float *R rstd, float *R gx, uint16_t *R gh, float *R gw,
    float *R gb, float *R gc, int g_bf16, drops drop, long i0) {
    __m512 a1[16], a2[16], ww[4], gwv[4], gbv[4];
    for (int j = 0; j < 4; j++) {
        ww[j] = _mm512_loadu_ps(w + 16 * j);
        gwv[j] = _mm512_loadu_ps(gw + 16 * j), gbv[j] = _mm512_loadu_ps(gb + 16 * j);
    }
    __m512 m = _mm512_loadu_ps(mean + i0), r = _mm512_loadu_ps(rstd + i0);
    for (int k = 0; k < 16; k++) {
        __m512 mk = lane(m, k), rk = lane(r, k), t1 = _mm512_setzero_ps(), t2 = t1;
        for (int j = 0; j < 4; j++) {
            long i = (i0 + k) * 64 + 16 * j;
            __m512 gd = load16(g, g_bf16, i);
            __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), mk), rk);
            gwv[j] = _mm512_fmadd_ps(gd, xh, gwv[j]), gbv[j] = _mm512_add_ps(gbv[j], gd);
            __m512 gdw = _mm512_mul_ps(gd, ww[j]);
            t1 = _mm512_add_ps(t1, gdw), t2 = _mm512_fmadd_ps(gdw, xh, t2);
        }
        a1[k] = t1, a2[k] = t2;
    }
    for (int j = 0; j < 4; j++) {
        _mm512_storeu_ps(gw + 16 * j, gwv[j]);
        _mm512_storeu_ps(gb + 16 * j, gbv[j]);
    }
    __m512 sg = _mm512_div_ps(sums16(a1), _mm512_set1_ps(64.0f));
    __m512 sgx = _mm512_div_ps(sums16(a2), _mm512_set1_ps(64.0f));
    __m512 gcv[4];
    for (int j = 0; j < 4; j++) gcv[j] = gh ? _mm512_loadu_ps(gc + 16 * j) : _mm512_setzero_ps();
    for (int k = 0; k < 16; k++) {
        __m512 mk = lane(m, k), rk = lane(r, k), sgk = lane(sg, k), sgxk = lane(sgx, k);
        uint64_t keep = gh ? row_keep64(drop, i0 + k) : ~0ull;
        for (int j = 0; j < 4; j++) {
            long i = (i0 + k) * 64 + 16 * j;
            __m512 gd = load16(g, g_bf16, i);
            __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), mk), rk);
            __m512 v = _mm512_fnmadd_ps(xh, sgxk, _mm512_sub_ps(_mm512_mul_ps(gd, ww[j]), sgk));
            v = _mm512_mul_ps(rk, v);
            if (gs) v = _mm512_add_ps(v, _mm512_loadu_ps(gs + i));
            _mm512_storeu_ps(gx + i, v);
            if (gh) {
                __m512 kept = _mm512_maskz_mov_ps((__mmask16)(keep >> (16 * j)), v);
                _mm256_storeu_si256((__m256i *)(gh + i), bf16x16(kept));
                gcv[j] = _mm512_add_ps(gcv[j], kept);
            }
        }
    }
    if (gh)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(gc + 16 * j, gcv[j]);
}
#else
static inline void backward_group64(const void *g, const float *R gs, const float *R x,
                                    const float *R w, const float *R mean, const float *R rstd,
                                    float *R gx, uint16_t *R gh, float *R gw, float *R gb,
                                    float *R gc, int g_bf16, drops drop, long i0) {
    (void)g, (void)gs, (void)x, (void)w, (void)mean, (void)rstd, (void)gx, (void)gh;
    (void)gw, (void)gb, (void)gc, (void)g_bf16, (void)drop, (void)i0;
}
#endif

static inline __attribute__((always_inline)) void backward_block(
    const void *g, const float *R gs, const float *R x, const float *R w,
    const float *R mean, const float *R rstd, float *R gx, uint16_t *R gh, float *R gw,
    float *R gb, float *R gc, int g_bf16, long D, drops drop, long r0, long r1) {
    for (long d = 0; d < D; d++) gw[d] = 0.0f, gb[d] = 0.0f, gc[d] = 0.0f;
    for (long i = r0; i < r1; i += G) {
        long n = r1 - i < G ? r1 - i : G;
        if (VECTOR_ROWS && D == 64 && n == 16)
            backward_group64(g, gs, x, w, mean, rstd, gx, gh, gw, gb, gc, g_bf16, drop, i);
        else
            backward_group(g, gs, x, w, mean, rstd, gx, gh, gw, gb, gc, g_bf16, D, drop, i, n);
    }
}

/* From g = dL/dy: dL/dx (+ gs where given; a bf16 copy in gh where given, 0 where the
 * forward's draws (s1, s2, t) dropped the residual) and the blocks' partial sums of dL/dw,
 * dL/db and (with gh) of dL/dh's rows, the residual bias's gradient, in part (3 x D floats
 * a block). x is LayerNorm's input (s of ln_forward). */
int ln_backward(const void *g, const float *gs, const float *x, const float *w,
                const float *mean, const float *rstd, float *gx, uint16_t *gh, float *part,
                int g_bf16, long D, long rows, uint32_t s1, uint32_t s2, uint32_t t, long k0,
                long k1) {
    drops drop = {s1, s2, t};
    PARALLEL {
        long lo, hi;
        share(k0, k1, &lo, &hi);
        for (long k = lo; k < hi; k++) {
            float *gw = part + k * 3 * D, *gb = gw + D, *gc = gb + D;
            long r0 = k * BLOCK, r1 = r0 + BLOCK < rows ? r0 + BLOCK : rows;
            if (D == 64 && g_bf16)
                backward_block(g, gs, x, w, mean, rstd, gx, gh, gw, gb, gc, 1, 64, drop, r0, r1);
            else
                backward_block(g, gs, x, w, mean, rstd, gx, gh, gw, gb, gc, g_bf16, D, drop, r0,
                               r1);
        }
    }
    return 0;
}
