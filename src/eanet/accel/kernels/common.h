/* What the kernels share: bfloat16 conversion, e^x, and the split of work over OpenMP threads.
 * Each kernel file includes it once and is compiled into its own library.
 */
#ifndef EANET_KERNELS_COMMON_H
#define EANET_KERNELS_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define R restrict
#ifdef _OPENMP
#define PARALLEL _Pragma("omp parallel")
#else
#define PARALLEL
#endif

static inline void from_bf16(const uint16_t *R src, float *R dst, long n) {
    uint32_t *R d = (uint32_t *)dst;
    for (long i = 0; i < n; i++) d[i] = (uint32_t)src[i] << 16;
}

static inline void to_bf16(const float *R src, uint16_t *R dst, long n) {
    const uint32_t *R s = (const uint32_t *)src;
    for (long i = 0; i < n; i++) { /* round to nearest even; NaN stays NaN */
        uint32_t u = s[i];
        uint32_t r = u + 0x7FFFu + ((u >> 16) & 1u);
        int nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
        dst[i] = (uint16_t)((nan ? 0x7FC00000u : r) >> 16);
    }
}

/* Element i of a float32 (bf16 = 0) or bfloat16 (1) array, as float32; vectorises. */
static inline float load_f32(const void *p, int bf16, long i) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float exp_nonpositive(float x) { /* e^x for x <= 0; 0 below -87 */
    float xc = x < -87.0f ? -87.0f : x;
    /* n = round(x / ln 2) by the 1.5 * 2^23 trick (floorf would stop vectorisation) */
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return x < -87.0f ? 0.0f : p * scale.f;
}

/* This thread's share [lo, hi) of [b0, b1) (the whole range without OpenMP). */
static inline void share(long b0, long b1, long *lo, long *hi) {
#ifdef _OPENMP
    long t = omp_get_thread_num(), k = omp_get_num_threads();
#else
    long t = 0, k = 1;
#endif
    *lo = b0 + (b1 - b0) * t / k;
    *hi = b0 + (b1 - b0) * (t + 1) / k;
}

/* Whether this build runs its own threads (OpenMP: the runtime torch runs on). */
int kernels_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#endif
