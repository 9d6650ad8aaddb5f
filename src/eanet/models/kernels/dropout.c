/* Dropout on the CPU in one pass, with no mask stored: y = x where the draw keeps, else 0.
 *
 * The draws come from a counter-based generator: element i's 32-bit draw is a hash (two
 * rounds of Wellons' lowbias32) of i and two 32-bit seeds. The same seeds give the same
 * draws, so the backward recomputes the mask from them (dL/dx = dL/dy where kept, else 0)
 * instead of reading a saved one. An element is kept when its draw is >= threshold =
 * round(p * 2^32): probability 1 - threshold / 2^32. No 1/(1-p) rescale: the caller folds
 * it into the next layer's weights. Dropped elements become +0 by selection, whatever x
 * was (x * 0 would keep a NaN, or make one of an inf). At most 2^31 elements per call.
 *
 * Built by eanet.models.native (see double_normalize.c); keep_*(..., i0, i1) does the
 * elements [i0, i1), split over OpenMP threads where the library has them, and returns 0
 * (as every kernel here: nonzero would be a failure).
 */
#include "common.h"

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

static inline uint32_t draw(uint32_t i, uint32_t s1, uint32_t s2) {
    return lowbias32(lowbias32(i ^ s1) + s2);
}

/* By element size: the selection moves bits, so float32 and bfloat16 need no conversion. */
int keep_32bit(const uint32_t *R x, uint32_t *R y, uint32_t s1, uint32_t s2, uint32_t t,
               long i0, long i1) {
    PARALLEL {
        long lo, hi;
        share(i0, i1, &lo, &hi);
        for (uint32_t i = (uint32_t)lo; i < (uint32_t)hi; i++)
            y[i] = draw(i, s1, s2) >= t ? x[i] : 0u;
    }
    return 0;
}

int keep_16bit(const uint16_t *R x, uint16_t *R y, uint32_t s1, uint32_t s2, uint32_t t,
               long i0, long i1) {
    PARALLEL {
        long lo, hi;
        share(i0, i1, &lo, &hi);
        for (uint32_t i = (uint32_t)lo; i < (uint32_t)hi; i++)
            y[i] = draw(i, s1, s2) >= t ? x[i] : (uint16_t)0;
    }
    return 0;
}
