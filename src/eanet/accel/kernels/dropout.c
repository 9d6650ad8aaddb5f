/* Dropout on the CPU in one pass, with no mask stored: y = x where the draw keeps, else 0.
 *
 * The draws come from a counter-based generator: element i's 32-bit draw is a hash (two
 * rounds of Wellons' lowbias32, `draw` in common.h) of i and two 32-bit seeds. The same seeds give the same
 * draws, so the backward recomputes the mask from them (dL/dx = dL/dy where kept, else 0)
 * instead of reading a saved one. An element is kept when its draw is >= threshold =
 * round(p * 2^32): probability 1 - threshold / 2^32. No 1/(1-p) rescale: the caller folds
 * it into the next layer's weights. Dropped elements become +0 by selection, whatever x
 * was (x * 0 would keep a NaN, or make one of an inf). At most 2^31 elements per call.
 *
 * Built by eanet.models.native (see double_normalize.c); keep_*(..., n, p0, p1) does the
 * pairs of elements [p0, p1) of n, split over OpenMP threads where the library has them,
 * and returns 0 (as every kernel here: nonzero would be a failure).
 */
#include "common.h"

/* By element size: the selection moves bits, so float32 and bfloat16 need no conversion.
 * [p0, p1) counts pairs of elements (elements 2 p0 .. 2 p1 - 1, the last pair may be half). */
int keep_32bit(const uint32_t *R x, uint32_t *R y, uint32_t s1, uint32_t s2, uint32_t t,
               long n, long p0, long p1) {
    PARALLEL {
        long lo, hi;
        share(p0, p1, &lo, &hi);
        uint32_t end = (uint32_t)(2 * hi < n ? 2 * hi : n);
        for (uint32_t i = (uint32_t)(2 * lo); i < end; i++)
            y[i] = draw(i, s1, s2) >= t ? x[i] : 0u;
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
        const uint32_t *R x2 = (const uint32_t *)x;
        uint32_t *R y2 = (uint32_t *)y;
        for (uint32_t k = (uint32_t)lo; k < (uint32_t)full; k++) {
            uint32_t low = draw(2 * k, s1, s2) >= t ? 0x0000FFFFu : 0u;
            uint32_t high = draw(2 * k + 1, s1, s2) >= t ? 0xFFFF0000u : 0u;
            y2[k] = x2[k] & (low | high); /* little-endian: element 2k is the low half */
        }
        if (hi > full && n % 2) y[n - 1] = draw((uint32_t)(n - 1), s1, s2) >= t ? x[n - 1] : 0;
    }
    return 0;
}
