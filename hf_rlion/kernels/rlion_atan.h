/* The float32 arctangent shared by the C kernels (rlion_cpu.c, rlion8bit_cpu.c), so RLion and
 * RLion8bit take identical steps from identical momentum. The Triton port
 * (hf_rlion/kernels/triton_atan.py) reads its coefficients from the ATAN_Cn / PIO2_* lines below
 * (`static const float NAME = <hexfloat>f;`, one per line): keep that form. */
#ifndef HF_RLION_ATAN_H
#define HF_RLION_ATAN_H

#include <math.h>

/* ------------------------------------------------------------------------------------------
 * arctan in float32, branch-free so that it vectorises.
 *
 * Range reduction: x = |a|; t = x for x < 1, t = 1/x for x >= 1 (atan(x) = pi/2 - atan(1/x)).
 * On [0, 1]: atan(t) = t + t z P(z), z = t^2, P a degree-8 minimax polynomial (relative
 * error of the approximation 2.7e-9 = 0.04 ulp), coefficients fitted with float32 rounding
 * taken into account. For x >= 1, pi/2 = PIO2_HI + PIO2_LO and PIO2_HI - t is split exactly
 * (Fast2Sum), so the errors left are the rounding of 1/x (at most half an ulp of t, damped by
 * d atan/dt <= 1), the small tail term and the final rounding. (Compensating the division's
 * rounding as well halves the 1-ulp cases but costs ~20 % of the kernel's speed.) The tail
 * t z P(z) is rounded once and added, for both ranges: an fma for t + tail would be one rounding
 * fewer (7.0M inputs 1 ulp off instead of 7.65M) but keeps one more operation on the multiply
 * pipes: measured side by side, a 2-3.5 % slower fp32 step and a 2.5 % slower 8-bit update.
 * Measured over all 2^32 inputs (benchmarks/atan_exhaustive.py): at most 1 ulp from the
 * correctly rounded arctan (99.82 % exactly it; 7.65M of 4.28G inputs 1 ulp away). +-0 keep
 * their sign, +-inf give +-pi/2, NaN stays NaN, subnormals come back unchanged (atan(x) = x
 * to float precision there).
 * ---------------------------------------------------------------------------------------- */
static const float ATAN_C0 = -0x1.55553ep-2f;
static const float ATAN_C1 = 0x1.9991e8p-3f;
static const float ATAN_C2 = -0x1.2420d6p-3f;
static const float ATAN_C3 = 0x1.c090f2p-4f;
static const float ATAN_C4 = -0x1.581a50p-4f;
static const float ATAN_C5 = 0x1.da707ap-5f;
static const float ATAN_C6 = -0x1.fe1fe0p-6f;
static const float ATAN_C7 = 0x1.64e846p-7f;
static const float ATAN_C8 = -0x1.d4dc8ap-10f;
static const float PIO2_HI = 0x1.921fb6p+0f;  /* float(pi/2), above pi/2 by 4.37e-8 */
static const float PIO2_LO = -0x1.777a5cp-25f; /* pi/2 - PIO2_HI */

static inline float rlion_atanf(float a) {
    float x = fabsf(a);
    int big = x >= 1.0f;
    float t = big ? 1.0f / x : x;
    float z = t * t;
    float poly = ATAN_C8;
    poly = fmaf(poly, z, ATAN_C7);
    poly = fmaf(poly, z, ATAN_C6);
    poly = fmaf(poly, z, ATAN_C5);
    poly = fmaf(poly, z, ATAN_C4);
    poly = fmaf(poly, z, ATAN_C3);
    poly = fmaf(poly, z, ATAN_C2);
    poly = fmaf(poly, z, ATAN_C1);
    poly = fmaf(poly, z, ATAN_C0);
    float tail = (t * z) * poly;    /* atan(t) - t; both results use it */
    float small_result = t + tail; /* atan(t), t <= 1 */
    /* x >= 1: pi/2 - atan(t), with PIO2_HI - t split exactly (Fast2Sum) */
    float head = PIO2_HI - t;
    float head_err = (PIO2_HI - head) - t;
    float big_result = head + ((head_err + PIO2_LO) - tail);
    return copysignf(big ? big_result : small_result, a);
}

#endif /* HF_RLION_ATAN_H */
