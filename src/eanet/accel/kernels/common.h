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
/* The parallel region of a kernel's entry point: OpenMP threads where the library has them
 * (else one pass on the caller's thread); the _OR_FAILED form ORs each thread's `failed`
 * (an int the entry point declares before it: a scratch buffer not allocated) into it. */
#ifdef _OPENMP
#define PARALLEL _Pragma("omp parallel")
#define PARALLEL_OR_FAILED _Pragma("omp parallel reduction(| : failed)")
#else
#define PARALLEL
#define PARALLEL_OR_FAILED
#endif

static inline void from_bf16(const uint16_t *R src, float *R dst, long n) {
    uint32_t *R d = (uint32_t *)dst;
    for (long i = 0; i < n; i++) d[i] = (uint32_t)src[i] << 16;
}

static inline void to_bf16_from(const float *R src, uint16_t *R dst, long i, long n) {
    const uint32_t *R s = (const uint32_t *)src;
    for (; i < n; i++) { /* round to nearest even; NaN stays NaN */
        uint32_t u = s[i];
        uint32_t r = u + 0x7FFFu + ((u >> 16) & 1u);
        int nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
        dst[i] = (uint16_t)((nan ? 0x7FC00000u : r) >> 16);
    }
}

/* The dropout draws (dropout.c, softmax.c): a hash (two rounds of Wellons' lowbias32) of a
 * pair index k and two 32-bit seeds gives 32 random bits, whose low 16 decide element 2k
 * and whose high 16 element 2k + 1: kept where they are >= a 16-bit threshold t
 * (round(p * 2^16); the keep probability 1 - t / 2^16). One hash for two elements: the hash
 * is most of the kernels' work. */
static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

static inline uint32_t draw(uint32_t k, uint32_t s1, uint32_t s2) {
    return lowbias32(lowbias32(k ^ s1) + s2);
}

/* Whether element i is kept. */
static inline int kept(uint32_t i, uint32_t s1, uint32_t s2, uint32_t t) {
    return ((draw(i >> 1, s1, s2) >> (16 * (i & 1))) & 0xFFFFu) >= t;
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

#if defined(__AVX512F__)
#include <immintrin.h>
/* AVX-512 forms of the above, 16 floats at a time: what the kernels' hot loops use where
 * the compiler's own vectorisation of the scalar code was measured slower (docs/speed.md). */

/* Elements [i, i + 16) of a float32 (bf16 = 0) or bfloat16 (1) array, as float32. */
static inline __m512 load16(const void *p, int bf16, long i) {
    if (!bf16) return _mm512_loadu_ps((const float *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 16 floats rounded to bfloat16 as to_bf16 rounds them. */
static inline __m256i bf16x16(__m512 v) {
#if defined(__AVX512BF16__)
    /* vcvtneps2bf16: round to nearest even in one instruction, NaN stays NaN (quieted);
     * fp32 subnormals become 0 (below 1.2e-38). */
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                              _mm512_set1_epi32(0x7FC00000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
}

/* Store v at elements [i, i + 16), rounded to bfloat16 as to_bf16 does where bf16 = 1. */
static inline void store16(void *p, int bf16, long i, __m512 v) {
    if (!bf16) {
        _mm512_storeu_ps((float *)p + i, v);
        return;
    }
    _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), bf16x16(v));
}

/* exp_nonpositive of 16 floats: the same reduction and polynomial, scaled by 2^n with
 * vscalefps, which gives e^x down to fp32's subnormals (and 0 below them) by itself. */
static inline __m512 exp16(__m512 x) {
    __m512 xc = _mm512_max_ps(_mm512_set1_ps(-104.0f), x); /* NaN stays NaN */
    __m512 big = _mm512_set1_ps(12582912.0f);
    __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), big), big);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

#endif

/* src rounded to bfloat16 (nearest even, NaN stays NaN): 16 at a time by store16 on
 * AVX-512 (one vcvtneps2bf16 each where the CPU has avx512_bf16), the rest by the loop. */
static inline void to_bf16(const float *R src, uint16_t *R dst, long n) {
    long i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) store16(dst, 1, i, _mm512_loadu_ps(src + i));
#endif
    to_bf16_from(src, dst, i, n);
}

#if defined(__AVX512F__)
#if defined(__AVX512BW__)
/* lowbias32 of 16 lanes. */
static inline __m512i lowbias16(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846ca68bu));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
/* The keep decisions of elements i .. i + 31 (i even): 16 hashes, each 32-bit lane's
 * halves compared as 16-bit lanes (little-endian: the low half is the even element). */
static inline __mmask32 keep32(uint32_t i, uint32_t s1, uint32_t s2, uint32_t t) {
    __m512i k = _mm512_add_epi32(_mm512_set1_epi32((int)(i >> 1)),
                                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m512i h = lowbias16(_mm512_xor_si512(k, _mm512_set1_epi32((int)s1)));
    h = lowbias16(_mm512_add_epi32(h, _mm512_set1_epi32((int)s2)));
    return _mm512_cmpge_epu16_mask(h, _mm512_set1_epi16((short)t));
}
#endif

/* Sixteen sums at once: a tree of shuffles and adds (45 instructions for all 16, where
 * summing each vector on its own takes 16 reductions in sequence). */
/* per 128 bits: a0+a2, b0+b2, a1+a3, b1+b3 (two heads, half summed) */
static inline __m512 pair_sums(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}
static inline __m512 quad_sums(__m512 a, __m512 b) {
    __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}
static inline __m512 block_sums(__m512 a, __m512 b) { /* across the 128-bit blocks */
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}
/* lane h of the result = the sum of v[h]'s 16 lanes */
static inline __m512 sums16(const __m512 *v) {
    __m512 w[8], x[4];
    for (int i = 0; i < 8; i++) w[i] = pair_sums(v[2 * i], v[2 * i + 1]);
    for (int i = 0; i < 4; i++) x[i] = quad_sums(w[2 * i], w[2 * i + 1]);
    return block_sums(block_sums(x[0], x[1]), block_sums(x[2], x[3]));
}
static inline __m512 lane(__m512 v, int h) { return _mm512_permutexvar_ps(_mm512_set1_epi32(h), v); }

#endif

#if defined(__AVX2__) && !(defined(__AVX512F__) && defined(__AVX512BW__))
#include <immintrin.h>
/* lowbias32 of 8 lanes. */
static inline __m256i lowbias8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846ca68bu));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
/* AVX2: the keep decisions of elements i .. i + 15 (i even) as two masks of 8 32-bit lanes
 * (all ones where kept), in element order: 8 hashes, their halves interleaved (a loop
 * storing both elements of a pair did not vectorise: fp32 training 25% slower). */
static inline void keep16(uint32_t i, uint32_t s1, uint32_t s2, uint32_t t, __m256i *first,
                          __m256i *second) {
    __m256i k = _mm256_add_epi32(_mm256_set1_epi32((int)(i >> 1)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i h = lowbias8(_mm256_xor_si256(k, _mm256_set1_epi32((int)s1)));
    h = lowbias8(_mm256_add_epi32(h, _mm256_set1_epi32((int)s2)));
    __m256i lo = _mm256_and_si256(h, _mm256_set1_epi32(0xFFFF)), up = _mm256_srli_epi32(h, 16);
    __m256i a = _mm256_unpacklo_epi32(lo, up), b = _mm256_unpackhi_epi32(lo, up);
    __m256i limit = _mm256_set1_epi32((int)t - 1); /* halves < 2^16: a signed compare */
    *first = _mm256_cmpgt_epi32(_mm256_permute2x128_si256(a, b, 0x20), limit);
    *second = _mm256_cmpgt_epi32(_mm256_permute2x128_si256(a, b, 0x31), limit);
}
#endif

/* The dropped elements of the fp32 row x[0, n) set to +0, x[0] being element `at` of the
 * whole tensor: the draws of `kept`, 32 at a time on AVX-512 (with BW), 16 on AVX2. */
static inline void drop_row(float *R x, uint32_t at, long n, uint32_t s1, uint32_t s2,
                            uint32_t t) {
    long c = 0;
    if (at & 1 && n > 0) { /* the vectors start at a pair */
        x[0] = kept(at, s1, s2, t) ? x[0] : 0.0f;
        c = 1;
    }
#if defined(__AVX512F__) && defined(__AVX512BW__)
    for (; c + 32 <= n; c += 32) {
        __mmask32 m = keep32(at + (uint32_t)c, s1, s2, t);
        _mm512_storeu_ps(x + c, _mm512_maskz_loadu_ps((__mmask16)m, x + c));
        _mm512_storeu_ps(x + c + 16, _mm512_maskz_loadu_ps((__mmask16)(m >> 16), x + c + 16));
    }
#elif defined(__AVX2__)
    for (; c + 16 <= n; c += 16) {
        __m256i k1, k2;
        keep16(at + (uint32_t)c, s1, s2, t, &k1, &k2);
        __m256i *v = (__m256i *)(x + c);
        _mm256_storeu_si256(v, _mm256_and_si256(k1, _mm256_loadu_si256(v)));
        _mm256_storeu_si256(v + 1, _mm256_and_si256(k2, _mm256_loadu_si256(v + 1)));
    }
#endif
    for (; c < n; c++) x[c] = kept(at + (uint32_t)c, s1, s2, t) ? x[c] : 0.0f;
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
