/* What the kernels share: bfloat16 conversion, and the split of work over OpenMP threads.
 * Each kernel file includes it once and is compiled into its own library.
 */
#ifndef EANET_KERNELS_COMMON_H
#define EANET_KERNELS_COMMON_H

#include <stdint.h>
#include <stdlib.h>
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
