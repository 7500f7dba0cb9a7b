/* One fused RLion step on 8-bit blockwise-quantised momentum (CPU, float32 parameters).
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
 * vectorised lerp and add-with-alpha are fused multiply-adds, so fmaf is used in the same
 * places); this file is compiled with -std=c11, so the compiler contracts nothing on its own.
 * The only differences from the reference are the arctangent (within 1 ulp of the correctly
 * rounded value, like torch.atan, so the two differ by at most 2 ulp) and the order in which the sum of squares for the
 * "rms" scaling is accumulated (double here, float32 in torch).
 *
 * Memory: no temporaries beyond 256 floats per thread.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 256

static inline float lerp_like_torch(float start, float end, float weight) {
    /* aten lerp_vec: small weight -> fma(w, end - start, start); else fma(w - 1, end - start, end) */
    float diff = end - start;
    return fabsf(weight) < 0.5f ? fmaf(weight, diff, start) : fmaf(weight - 1.0f, diff, end);
}

/* arctan in float32, branch-free so that it vectorises: the same function, coefficients and
 * error compensation as rlion_atanf in _rlion_kernel.c (the fp32 RLion kernel), so RLion and
 * RLion8bit take identical steps from identical momentum. Kept as a copy because each kernel
 * file is compiled on its own; tests/test_rlion8bit.py checks that both agree bit for bit.
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
    const int big = x > 1.0f;
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
    const float e = fmaf(-t, x, 1.0f);
    const float t_lo = (x <= FLT_MAX) ? t * e : 0.0f;
    const float one_over_1pz = fmaf(fmaf(0.3274011f, z, -0.80405105f), z, 0.98603903f);
    const float head = PIO2_HI - t;
    const float head_err = (PIO2_HI - head) - t;
    const float tail = (head_err + PIO2_LO) - fmaf(tz, poly, t_lo * one_over_1pz);
    const float big_result = head + tail;
    return copysignf(big ? big_result : small_result, a);
}

/* Pass 1 of the "rms" scaling: sum over the tensor of c_hat^2 (c_hat as in pass 2). */
double rlion8bit_sumsq_f32(const float *grad, const uint8_t *codes, const float *absmax, const float *qmap,
                           int64_t n, float w1, float bias_div, int bias_correction, int maximize, int threads) {
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * BLOCK;
        const int64_t end = start + BLOCK < n ? start + BLOCK : n;
        const float scale = absmax[b];
        float partial = 0.0f;
        for (int64_t i = start; i < end; ++i) {
            const float m = qmap[codes[i]] * scale;
            const float g = maximize ? -grad[i] : grad[i];
            float c = lerp_like_torch(m, g, w1);
            if (bias_correction)
                c = c / bias_div;
            partial = fmaf(c, c, partial);
        }
        total += (double)partial;
    }
    return total;
}

/* Pass 2: the step. Per element:
 *   m = qmap[code] * absmax;  c = lerp(m, g, 1 - beta1);  c /= bias_div (if bias_correction)
 *   u = atan(c * alpha) * 2/pi;  p = p * decay (if apply_decay);  p = p + (-lr) * u
 *   m' = lerp(m, g, 1 - beta2), requantised per block. */
void rlion8bit_step_f32(float *param, const float *grad, uint8_t *codes, float *absmax, const float *qmap,
                        const uint8_t *lut, int64_t n, float w1, float w2, float bias_div, int bias_correction,
                        float alpha, float two_over_pi, float decay, int apply_decay, float neg_lr, int maximize,
                        int threads) {
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * BLOCK;
        const int64_t len = start + BLOCK < n ? BLOCK : n - start;
        float *p = param + start;
        const float *gr = grad + start;
        uint8_t *q = codes + start;
        const float scale = absmax[b];
        float fresh[BLOCK];
        float block_max = 0.0f;
        for (int64_t i = 0; i < len; ++i) {
            const float m = qmap[q[i]] * scale;
            const float g = maximize ? -gr[i] : gr[i];
            float c = lerp_like_torch(m, g, w1);
            if (bias_correction)
                c = c / bias_div;
            const float u = fast_atanf(c * alpha) * two_over_pi;
            const float decayed = apply_decay ? p[i] * decay : p[i];
            p[i] = fmaf(u, neg_lr, decayed);
            const float m_new = lerp_like_torch(m, g, w2);
            fresh[i] = m_new;
            block_max = fmaxf(block_max, fabsf(m_new));
        }
        absmax[b] = block_max;
        if (block_max == 0.0f) {
            for (int64_t i = 0; i < len; ++i)
                q[i] = 0;
            continue;
        }
        const float inv = 1.0f / block_max;
        for (int64_t i = 0; i < len; ++i) {
            float v = fresh[i] * inv;
            v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
            const float t = (v + 1.0f) * 0.5f;
            const float s = t * 65535.0f;
            q[i] = lut[(uint16_t)(s + 0.5f)];
        }
    }
}

/* arctan alone, for the accuracy test against torch.atan. */
void rlion8bit_atan_f32(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        out[i] = fast_atanf(x[i]);
}
