/* External attention's double normalisation on the CPU, one batch element at a time.
 *
 * z is (B, N, C) contiguous, C = heads * S with the S memory slots of a head adjacent.
 *   forward:  p = softmax of z over the N tokens (per column c, in fp32),
 *             q = p / (1e-9 + sum of p over the S slots of its head), q in z's type.
 *   backward: from g = dL/dq, dL/dz = p * (gp - sum_N(gp * p)) with
 *             gp = (g - sum_S(g * p) / D) / D,  D = 1e-9 + sum_S p.
 * One batch element's (N, C) slice of fp32 work (256 x 256 x 4 B = 256 KiB for EANet)
 * stays in the core's cache, so z is read once and q written once, where torch's (and
 * inductor's) kernels make four or five passes over the whole batch through memory.
 * The backward recomputes p from z and the per-column max and 1/sum that the forward
 * keeps (B x C floats), instead of saving p itself (B x N x C floats).
 *
 * Plain C, compiled at first use with -O3 -march=native by eanet.models.native; exp is a
 * polynomial (Cephes' expf, about 1 ulp) that the compiler vectorises. Threads: built with
 * -fopenmp (against the OpenMP runtime torch itself runs on, so that the two share one
 * pool of threads), dn_forward and dn_backward split their range [b0, b1) of the batch
 * over OpenMP's threads; built without, the caller splits the batch over its threads. `bf16`
 * says whether the tensors (z, q, g, dL/dz) are bfloat16 (else float32); the statistics
 * are always float32. They return 0, or 1 where the scratch memory could not be had.
 */
#include "common.h"

/* mx[c] = max_n z[n, c]; inv[c] = 1 / sum_n e^(z - mx); e = e^(z - mx). */
static inline __attribute__((always_inline)) void column_stats(
    const float *R z, float *R mx, float *R inv, float *R e, long N, long C) {
    for (long c = 0; c < C; c++) mx[c] = -3.0e38f, inv[c] = 0.0f;
    for (long n = 0; n < N; n++)
        for (long c = 0; c < C; c++) mx[c] = z[n * C + c] > mx[c] ? z[n * C + c] : mx[c];
    for (long n = 0; n < N; n++)
        for (long c = 0; c < C; c++) {
            float v = exp_nonpositive(z[n * C + c] - mx[c]);
            e[n * C + c] = v;
            inv[c] += v;
        }
    for (long c = 0; c < C; c++) inv[c] = 1.0f / inv[c];
}

/* q = p / (1e-9 + sum_S p) row by row, p = e * inv (in place in e). */
static inline __attribute__((always_inline)) void memory_normalize(
    float *R e, const float *R inv, float *R q, long N, long C, long S) {
    for (long n = 0; n < N; n++) {
        float *R row = e + n * C;
        for (long c = 0; c < C; c++) row[c] *= inv[c];
        for (long h = 0; h < C; h += S) {
            float d = 1e-9f;
            for (long s = 0; s < S; s++) d += row[h + s];
            float r = 1.0f / d;
            for (long s = 0; s < S; s++) q[n * C + h + s] = row[h + s] * r;
        }
    }
}

static inline __attribute__((always_inline)) void forward_slice(
    const float *R z, float *R q, float *R mx, float *R inv, float *R e, long N, long C,
    long S) {
    column_stats(z, mx, inv, e, N, C);
    memory_normalize(e, inv, q, N, C, S);
}

/* dL/dz of one slice from g = dL/dq; p and gp are scratch (N x C), colsum (C). */
static inline __attribute__((always_inline)) void backward_slice(
    const float *R g, const float *R z, const float *R mx, const float *R inv,
    float *R gz, float *R p, float *R gp, float *R colsum, long N, long C, long S) {
    for (long c = 0; c < C; c++) colsum[c] = 0.0f;
    for (long n = 0; n < N; n++) {
        const float *R zr = z + n * C, *R gr = g + n * C;
        float *R pr = p + n * C, *R gpr = gp + n * C;
        for (long c = 0; c < C; c++) pr[c] = exp_nonpositive(zr[c] - mx[c]) * inv[c];
        for (long h = 0; h < C; h += S) {
            float d = 1e-9f, inner = 0.0f;
            for (long s = 0; s < S; s++) d += pr[h + s], inner += gr[h + s] * pr[h + s];
            float r = 1.0f / d;
            inner *= r;
            for (long s = 0; s < S; s++) gpr[h + s] = (gr[h + s] - inner) * r;
        }
        for (long c = 0; c < C; c++) colsum[c] += gpr[c] * pr[c];
    }
    for (long n = 0; n < N; n++)
        for (long c = 0; c < C; c++) gz[n * C + c] = p[n * C + c] * (gp[n * C + c] - colsum[c]);
}

/* S = 16 (EANet's memory) gets its own copy with the slot loops unrolled. */
#define BY_S(CALL16, CALL) \
    if (S == 16) {         \
        CALL16;            \
    } else {               \
        CALL;              \
    }

static int forward_range(const void *z, void *q, float *colmax, float *colinv, int bf16,
                         long N, long C, long S, long b0, long b1) {
    long M = N * C;
    float *e = malloc(sizeof(float) * 3 * M), *zs = e + M, *qs = zs + M;
    if (!e) return 1;
    for (long b = b0; b < b1; b++) {
        const float *zb = bf16 ? zs : (const float *)z + b * M;
        float *qb = bf16 ? qs : (float *)q + b * M;
        float *mx = colmax + b * C, *inv = colinv + b * C;
        if (bf16) from_bf16((const uint16_t *)z + b * M, zs, M);
        BY_S(forward_slice(zb, qb, mx, inv, e, N, C, 16),
             forward_slice(zb, qb, mx, inv, e, N, C, S));
        if (bf16) to_bf16(qs, (uint16_t *)q + b * M, M);
    }
    free(e);
    return 0;
}

static int backward_range(const void *g, const void *z, const float *colmax,
                          const float *colinv, void *gz, int bf16, long N, long C, long S,
                          long b0, long b1) {
    long M = N * C;
    float *p = malloc(sizeof(float) * (5 * M + C)), *gp = p + M, *zs = gp + M;
    float *gs = zs + M, *gzs = gs + M, *colsum = gzs + M;
    if (!p) return 1;
    for (long b = b0; b < b1; b++) {
        const float *zb = bf16 ? zs : (const float *)z + b * M;
        const float *gb = bf16 ? gs : (const float *)g + b * M;
        float *gzb = bf16 ? gzs : (float *)gz + b * M;
        const float *mx = colmax + b * C, *inv = colinv + b * C;
        if (bf16) {
            from_bf16((const uint16_t *)z + b * M, zs, M);
            from_bf16((const uint16_t *)g + b * M, gs, M);
        }
        BY_S(backward_slice(gb, zb, mx, inv, gzb, p, gp, colsum, N, C, 16),
             backward_slice(gb, zb, mx, inv, gzb, p, gp, colsum, N, C, S));
        if (bf16) to_bf16(gzs, (uint16_t *)gz + b * M, M);
    }
    free(p);
    return 0;
}

int dn_forward(const void *z, void *q, float *colmax, float *colinv, int bf16, long N,
               long C, long S, long b0, long b1) {
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel reduction(| : failed)
#endif
    {
        long lo, hi;
        share(b0, b1, &lo, &hi);
        if (lo < hi) failed |= forward_range(z, q, colmax, colinv, bf16, N, C, S, lo, hi);
    }
    return failed;
}

int dn_backward(const void *g, const void *z, const float *colmax, const float *colinv,
                void *gz, int bf16, long N, long C, long S, long b0, long b1) {
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel reduction(| : failed)
#endif
    {
        long lo, hi;
        share(b0, b1, &lo, &hi);
        if (lo < hi) failed |= backward_range(g, z, colmax, colinv, gz, bf16, N, C, S, lo, hi);
    }
    return failed;
}
