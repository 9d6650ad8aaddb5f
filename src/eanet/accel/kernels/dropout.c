/* Dropout on the CPU in one pass, with no mask stored: y = x where the draw keeps, else 0.
 *
 * The draws come from a counter-based generator (`draw` and `kept` in common.h): one hash of
 * a pair index and two 32-bit seeds decides two neighbouring elements, each by 16 of its
 * bits against the threshold t = round(p * 2^16), so the keep probability is 1 - t / 2^16
 * (p to 1/65536). The same seeds give the same draws, so the backward recomputes the mask
 * from them (dL/dx = dL/dy where kept, else 0) instead of reading a saved one. No 1/(1-p)
 * rescale: the caller folds it into the next layer's weights. Dropped elements become +0 by
 * selection, whatever x was (x * 0 would keep a NaN, or make one of an inf). At most 2^31
 * elements per call.
 *
 * Built by eanet.accel.native (see double_normalize.c); keep_*(..., n, p0, p1) does the
 * pairs of elements [p0, p1) of n, split over OpenMP threads where the library has them,
 * and returns 0 (as every kernel here: nonzero would be a failure). On AVX-512 (with BW) 32
 * elements at a time from 16 hashes; for fp32 on AVX2, 16 from 8; elsewhere loops that the
 * compiler vectorises.
 */
#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define WIDE 1
#else
#define WIDE 0
#endif

/* By element size: the selection moves bits, so float32 and bfloat16 need no conversion.
 * [p0, p1) counts pairs of elements (elements 2 p0 .. 2 p1 - 1, the last pair may be half). */
int keep_32bit(const uint32_t *R x, uint32_t *R y, uint32_t s1, uint32_t s2, uint32_t t,
               long n, long p0, long p1) {
    PARALLEL {
        long lo, hi;
        share(p0, p1, &lo, &hi);
        long k = lo;
#if WIDE
        for (long full = hi < n / 2 ? hi : n / 2; k + 16 <= full; k += 16) {
            __mmask32 m = keep32((uint32_t)(2 * k), s1, s2, t);
            __m512i a = _mm512_maskz_mov_epi32((__mmask16)m, _mm512_loadu_si512(x + 2 * k));
            __m512i b = _mm512_maskz_mov_epi32((__mmask16)(m >> 16),
                                               _mm512_loadu_si512(x + 2 * k + 16));
            _mm512_storeu_si512(y + 2 * k, a);
            _mm512_storeu_si512(y + 2 * k + 16, b);
        }
#endif
#if !WIDE && defined(__AVX2__)
        for (long full = hi < n / 2 ? hi : n / 2; k + 8 <= full; k += 8) {
            __m256i k1, k2;
            keep16((uint32_t)(2 * k), s1, s2, t, &k1, &k2);
            __m256i *out = (__m256i *)(y + 2 * k);
            const __m256i *in = (const __m256i *)(x + 2 * k);
            _mm256_storeu_si256(out, _mm256_and_si256(k1, _mm256_loadu_si256(in)));
            _mm256_storeu_si256(out + 1, _mm256_and_si256(k2, _mm256_loadu_si256(in + 1)));
        }
#endif
        uint32_t end = (uint32_t)(2 * hi < n ? 2 * hi : n);
        for (uint32_t i = (uint32_t)(2 * k); i < end; i++) y[i] = kept(i, s1, s2, t) ? x[i] : 0u;
    }
    return 0;
}

/* Two bfloat16 elements at a time as one 32-bit word, so that every vector lane is 32 bits
 * wide: mixed 16- and 32-bit lanes did not vectorise for AVX2 (6x slower there). */
int keep_16bit(const uint16_t *R x, uint16_t *R y, uint32_t s1, uint32_t s2, uint32_t t,
               long n, long p0, long p1) {
    PARALLEL {
        long lo, hi;
        share(p0, p1, &lo, &hi);
        long full = hi < n / 2 ? hi : n / 2; /* pairs with both elements */
        long k = lo;
#if WIDE
        for (; k + 16 <= full; k += 16) {
            __mmask32 m = keep32((uint32_t)(2 * k), s1, s2, t);
            _mm512_storeu_si512(y + 2 * k, _mm512_maskz_mov_epi16(m, _mm512_loadu_si512(x + 2 * k)));
        }
#endif
        const uint32_t *R x2 = (const uint32_t *)x;
        uint32_t *R y2 = (uint32_t *)y;
        for (; k < full; k++) {
            uint32_t d = draw((uint32_t)k, s1, s2);
            uint32_t low = (d & 0xFFFFu) >= t ? 0x0000FFFFu : 0u;
            uint32_t high = (d >> 16) >= t ? 0xFFFF0000u : 0u;
            y2[k] = x2[k] & (low | high); /* little-endian: element 2k is the low half */
        }
        if (hi > full && n % 2) y[n - 1] = kept((uint32_t)(n - 1), s1, s2, t) ? x[n - 1] : 0;
    }
    return 0;
}
