/* One fused RLion step on 8-bit blockwise-quantised momentum (CPU, float32 or bfloat16 parameters).
 *
 * Loaded by hf_rlion/rlion8bit.py through hf_rlion.native.load(); the pure-torch path in
 * rlion8bit.py (bitsandbytes' dequantize_blockwise -> rlion_update_ -> quantize_blockwise) is the
 * reference this kernel is tested against.
 *
 * State layout (bitsandbytes'): codes[n] (uint8 indices into the 256-entry signed dynamic map
 * qmap), absmax[ceil(n / 256)] (float32, one per block of 256). A momentum value is
 * qmap[code] * absmax[block].
 *
 * Requantisation reproduces bitsandbytes' CPU quantize_blockwise code for code: per block,
 * absmax = max |m|, v = clamp(m * (1 / absmax), -1, 1), then a 65536-entry table (built in
 * Python exactly as bitsandbytes builds it) maps round((v + 1) / 2 * 65535) to the nearest code.
 *
 * The element-wise arithmetic mirrors the torch reference operation by operation (torch's
 * vectorised lerp is fma(w, end - start, start) for |w| < 0.5 and fma(w - 1, end - start, end)
 * otherwise, and add-with-alpha is an fma, so fmaf is used in the same places); this file is
 * compiled with -std=c11, so the compiler contracts nothing on its own. The only differences
 * from the reference are the arctangent (within 1 ulp of the correctly rounded value, like
 * torch.atan, so the two differ by at most 2 ulp) and the order in which the sum of squares of
 * the "rms" scaling is accumulated (float per chunk and double across chunks here, float32 in
 * torch).
 *
 * Memory: no tensor-sized temporaries (see rlion8bit_step_many_f32).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 256

/* arctan in float32, branch-free so that it vectorises: the same function, coefficients and
 * error compensation as rlion_atanf in _rlion_kernel.c (the fp32 RLion kernel), so RLion and
 * RLion8bit take identical steps from identical momentum. Kept as a copy because each kernel
 * file is compiled on its own; tests/test_rlion8bit.py checks that both agree bit for bit
 * (it caught the fp32 kernel dropping its division-error compensation: update both together).
 * Within 1 ulp of the correctly rounded arctan; +-0 keep their sign, +-inf -> +-pi/2, NaN stays NaN. */
static const float ATAN_C0 = -0x1.55553ep-2f;
static const float ATAN_C1 = 0x1.9991e8p-3f;
static const float ATAN_C2 = -0x1.2420d6p-3f;
static const float ATAN_C3 = 0x1.c090f2p-4f;
static const float ATAN_C4 = -0x1.581a50p-4f;
static const float ATAN_C5 = 0x1.da707ap-5f;
static const float ATAN_C6 = -0x1.fe1fe0p-6f;
static const float ATAN_C7 = 0x1.64e846p-7f;
static const float ATAN_C8 = -0x1.d4dc8ap-10f;
static const float PIO2_HI = 0x1.921fb6p+0f;
static const float PIO2_LO = -0x1.777a5cp-25f;

static inline float fast_atanf(float a) {
    const float x = fabsf(a);
    const int big = x >= 1.0f;
    const float t = big ? 1.0f / x : x;
    const float z = t * t;
    float poly = ATAN_C8;
    poly = fmaf(poly, z, ATAN_C7);
    poly = fmaf(poly, z, ATAN_C6);
    poly = fmaf(poly, z, ATAN_C5);
    poly = fmaf(poly, z, ATAN_C4);
    poly = fmaf(poly, z, ATAN_C3);
    poly = fmaf(poly, z, ATAN_C2);
    poly = fmaf(poly, z, ATAN_C1);
    poly = fmaf(poly, z, ATAN_C0);
    const float tz = t * z;
    const float small_result = fmaf(tz, poly, t);
    const float head = PIO2_HI - t;
    const float head_err = (PIO2_HI - head) - t;
    const float big_result = head + ((head_err + PIO2_LO) - tz * poly);
    return copysignf(big ? big_result : small_result, a);
}

/* The kernel's loops are written so that GCC vectorises them (omp simd, loop-invariant choices
 * hoisted into multiplications that are exact: g * (+-1), c / 1, p * 1). */

/* momentum of one block, dequantised: m[i] = qmap[code[i]] * absmax */
static inline void dequantize_block(const uint8_t *q, const float *qmap, float scale, int64_t len, float *m) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
        m[i] = qmap[(int32_t)q[i]] * scale;
}

/* bitsandbytes' CPU quantize_blockwise for one block; returns its absmax */
static inline float quantize_block(const float *m, const uint8_t *lut, int64_t len, uint8_t *q) {
    float block_max = 0.0f;
#pragma omp simd reduction(max : block_max)
    for (int64_t i = 0; i < len; ++i) {
        const float a = fabsf(m[i]); /* finite: gradients are checked before the step */
        block_max = a > block_max ? a : block_max; /* not fmaxf: that is a libm call without -ffast-math */
    }
    if (block_max == 0.0f) {
        for (int64_t i = 0; i < len; ++i)
            q[i] = 0;
        return block_max;
    }
    const float inv = 1.0f / block_max;
    int32_t index[BLOCK];
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
        float v = m[i] * inv;
        v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
        const float t = (v + 1.0f) * 0.5f;
        const float s = t * 65535.0f;
        index[i] = (int32_t)(s + 0.5f);
    }
    for (int64_t i = 0; i < len; ++i)
        q[i] = lut[index[i]];
    return block_max;
}

/* bfloat16 parameters/gradients: widened to float32 for the arithmetic, the parameter rounded
 * back once (round to nearest even, as torch's .to(torch.bfloat16) / copy_ does; values are finite). */
static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };

/* Per-block work of the two passes. */

/* sum over one block of c_hat^2, c_hat = lerp(m, g, 1 - beta1) / divisor */
static inline float block_sumsq(const float *gr, const uint8_t *q, const float *qmap, float scale, int64_t len,
                                float grad_sign, int small1, float w1, float w1_minus_1, float divisor) {
    float m[BLOCK];
    dequantize_block(q, qmap, scale, len, m);
    float partial = 0.0f;
#pragma omp simd reduction(+ : partial)
    for (int64_t i = 0; i < len; ++i) {
        const float g = gr[i] * grad_sign;
        const float d = g - m[i];
        const float c = (small1 ? fmaf(w1, d, m[i]) : fmaf(w1_minus_1, d, g)) / divisor;
        partial = fmaf(c, c, partial);
    }
    return partial;
}

/* the step on one block; returns the block's new absmax (its codes are written to q) */
static inline float block_step(float *p, const float *gr, uint8_t *q, const float *qmap, const uint8_t *lut,
                               float scale, int64_t len, float grad_sign, int small1, float w1, float w1_minus_1,
                               int small2, float w2, float w2_minus_1, float divisor, float alpha, float two_over_pi,
                               float decay_factor, float neg_lr) {
    float m[BLOCK];
    dequantize_block(q, qmap, scale, len, m);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
        const float g = gr[i] * grad_sign;
        const float d = g - m[i];
        const float c = (small1 ? fmaf(w1, d, m[i]) : fmaf(w1_minus_1, d, g)) / divisor;
        const float u = fast_atanf(c * alpha) * two_over_pi;
        p[i] = fmaf(u, neg_lr, p[i] * decay_factor);
        m[i] = small2 ? fmaf(w2, d, m[i]) : fmaf(w2_minus_1, d, g);
    }
    return quantize_block(m, lut, len, q);
}

/* One RLion step on `count` tensors with 8-bit state, in one parallel region. Parameters and
 * gradients are all float32 (dtype 0) or all bfloat16 (dtype 1); arithmetic is float32.
 *
 * Per element:  m = qmap[code] * absmax;  c = lerp(m, g, 1 - beta1);  c /= bias_div[t] (if bias_correction)
 *               u = atan(c * alpha_t) * 2/pi;  p = p * decay (if apply_decay);  p = p + (-lr) * u
 *               m' = lerp(m, g, 1 - beta2), requantised per block.
 * alpha_t = alpha ("fixed") or alpha / max(RMS(c_hat), FLT_MIN) over tensor t ("rms"), with each
 * intermediate rounded to float32 as torch computes it (norm, norm / sqrt(n), alpha / rms); the
 * sum of squares is accumulated per chunk in float and across chunks in double, in chunk order
 * (the result does not depend on the number of threads).
 *
 * Work is split into chunks of CHUNK_BLOCKS blocks handed out dynamically, so a thread that the
 * OS deschedules on a busy machine does not hold the others up. Temporaries: 256 floats per
 * thread, plus per-call arrays of chunk descriptors and partial sums (24 bytes per 16384
 * elements). Returns 0, or -1 if those arrays cannot be allocated (nothing is modified then). */
#define CHUNK_BLOCKS 64

int rlion8bit_step_many(int64_t count, int dtype, void *const *params, const void *const *grads, uint8_t *const *codes,
                            float *const *absmaxes, const float *const *qmaps, const uint8_t *const *luts,
                            const int64_t *numels, const float *bias_divs, float w1, float w2, int bias_correction,
                            float alpha, int rms_scaling, float two_over_pi, float decay, int apply_decay,
                            float neg_lr, int maximize, int threads) {
    int64_t chunks = 0;
    for (int64_t t = 0; t < count; ++t)
        chunks += ((numels[t] + BLOCK - 1) / BLOCK + CHUNK_BLOCKS - 1) / CHUNK_BLOCKS;
    if (chunks == 0)
        return 0;
    int64_t *chunk_tensor = malloc(sizeof(int64_t) * chunks);
    int64_t *chunk_block = malloc(sizeof(int64_t) * chunks);
    double *chunk_sumsq = malloc(sizeof(double) * chunks);
    float *alphas = malloc(sizeof(float) * count);
    if (!chunk_tensor || !chunk_block || !chunk_sumsq || !alphas) {
        free(chunk_tensor);
        free(chunk_block);
        free(chunk_sumsq);
        free(alphas);
        return -1;
    }
    int64_t k = 0;
    for (int64_t t = 0; t < count; ++t) {
        const int64_t blocks = (numels[t] + BLOCK - 1) / BLOCK;
        for (int64_t b = 0; b < blocks; b += CHUNK_BLOCKS) {
            chunk_tensor[k] = t;
            chunk_block[k] = b;
            ++k;
        }
    }
    const float grad_sign = maximize ? -1.0f : 1.0f;
    const float decay_factor = apply_decay ? decay : 1.0f;
    const int small1 = fabsf(w1) < 0.5f, small2 = fabsf(w2) < 0.5f;
    const float w1_minus_1 = w1 - 1.0f, w2_minus_1 = w2 - 1.0f;

#pragma omp parallel num_threads(threads)
    {
        if (rms_scaling) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t c = 0; c < chunks; ++c) {
                const int64_t t = chunk_tensor[c], n = numels[t];
                const float divisor = bias_correction ? bias_divs[t] : 1.0f;
                const int64_t last = chunk_block[c] + CHUNK_BLOCKS < (n + BLOCK - 1) / BLOCK
                                         ? chunk_block[c] + CHUNK_BLOCKS
                                         : (n + BLOCK - 1) / BLOCK;
                double sum = 0.0;
                for (int64_t b = chunk_block[c]; b < last; ++b) {
                    const int64_t start = b * BLOCK;
                    const int64_t len = start + BLOCK < n ? BLOCK : n - start;
                    const float *gr = (const float *)grads[t] + start;
                    float g_wide[BLOCK];
                    if (dtype == DTYPE_BF16) {
                        const uint16_t *gh = (const uint16_t *)grads[t] + start;
                        for (int64_t i = 0; i < len; ++i)
                            g_wide[i] = bf16_to_f32(gh[i]);
                        gr = g_wide;
                    }
                    sum += (double)block_sumsq(gr, codes[t] + start, qmaps[t], absmaxes[t][b], len, grad_sign, small1,
                                               w1, w1_minus_1, divisor);
                }
                chunk_sumsq[c] = sum;
            }
#pragma omp single
            {
                int64_t c = 0;
                for (int64_t t = 0; t < count; ++t) {
                    double sum = 0.0;
                    for (; c < chunks && chunk_tensor[c] == t; ++c)
                        sum += chunk_sumsq[c];
                    const float norm = (float)sqrt(sum);
                    float rms = norm / (float)sqrt((double)(numels[t] > 0 ? numels[t] : 1));
                    rms = rms > FLT_MIN ? rms : FLT_MIN;
                    alphas[t] = alpha / rms;
                }
            }
        } else {
#pragma omp single
            for (int64_t t = 0; t < count; ++t)
                alphas[t] = alpha;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t t = chunk_tensor[c], n = numels[t];
            const float divisor = bias_correction ? bias_divs[t] : 1.0f;
            const int64_t blocks = (n + BLOCK - 1) / BLOCK;
            const int64_t last = chunk_block[c] + CHUNK_BLOCKS < blocks ? chunk_block[c] + CHUNK_BLOCKS : blocks;
            for (int64_t b = chunk_block[c]; b < last; ++b) {
                const int64_t start = b * BLOCK;
                const int64_t len = start + BLOCK < n ? BLOCK : n - start;
                float *p = (float *)params[t] + start;
                const float *gr = (const float *)grads[t] + start;
                float p_wide[BLOCK], g_wide[BLOCK];
                if (dtype == DTYPE_BF16) {
                    const uint16_t *ph = (const uint16_t *)params[t] + start, *gh = (const uint16_t *)grads[t] + start;
                    for (int64_t i = 0; i < len; ++i) {
                        p_wide[i] = bf16_to_f32(ph[i]);
                        g_wide[i] = bf16_to_f32(gh[i]);
                    }
                    p = p_wide;
                    gr = g_wide;
                }
                absmaxes[t][b] = block_step(p, gr, codes[t] + start, qmaps[t], luts[t], absmaxes[t][b], len, grad_sign,
                                            small1, w1, w1_minus_1, small2, w2, w2_minus_1, divisor, alphas[t],
                                            two_over_pi, decay_factor, neg_lr);
                if (dtype == DTYPE_BF16) {
                    uint16_t *ph = (uint16_t *)params[t] + start;
                    for (int64_t i = 0; i < len; ++i)
                        ph[i] = f32_to_bf16(p_wide[i]);
                }
            }
        }
    }
    free(chunk_tensor);
    free(chunk_block);
    free(chunk_sumsq);
    free(alphas);
    return 0;
}

/* arctan alone, for the accuracy test against torch.atan. */
void rlion8bit_atan_f32(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        out[i] = fast_atanf(x[i]);
}
