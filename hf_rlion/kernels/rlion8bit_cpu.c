/* One fused RLion step on 8-bit blockwise-quantised momentum (CPU, float32 or bfloat16 parameters).
 *
 * Loaded by hf_rlion/kernels/cpu_rlion8bit.py through hf_rlion.kernels.native.load(); the pure-torch path in
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
 * Memory: no tensor-sized temporaries (see rlion8bit_step_many).
 */
#include <float.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLOCK 256

/* arctan in float32: rlion_atanf, the fp32 RLion kernel's (rlion_atan.h), so RLion and RLion8bit take
 * identical steps from identical momentum. Within 1 ulp of the correctly rounded arctan. */
#include "rlion_atan.h"

/* The kernel's loops are written so that GCC vectorises them (omp simd, loop-invariant choices
 * hoisted into multiplications that are exact: g * (+-1), c / 1, p * 1). The two table lookups are
 * the exception: qmap[code] uses register permutes under AVX-512 (VBMI byte planes, below), lut[index]
 * stays scalar byte loads. Measured on Zen 4 and dropped: hardware gathers for either table (slower or no
 * faster), and a vpermb lookup of lut by 256-entry buckets (the buckets near v = 0 hold up to 24
 * codes; the fallback for them costs more than the scalar loads it saves). */

/* momentum of one block, dequantised: m[i] = qmap[code[i]] * absmax.
 * With AVX-512 VBMI, 64 codes at a time: each of the 4 bytes of the float32 qmap entries is a 256-byte
 * table (4 registers) looked up by two vpermt2b and a blend on the code's top bit, and the 4 byte
 * planes are interleaved back into floats (codes pre-shuffled so the interleave comes out in order):
 * ~31 instructions per 64 elements. Without VBMI, AVX-512F: 16 codes by 8 two-table permutes of
 * qmap in 16 registers and 7 blends. Same values every way (the three builds were compared). The
 * byte-plane registers are set up once per chunk (qmap_planes_init). Measured on Zen 4 (one thread,
 * 25M elements in 50 tensors): the VBMI planes take the kernel from 49.9 to 41.4 ms; the vpermt2ps
 * tree is 3-5 % faster than the compiler's scalar loads, a hardware gather 10 % slower. */
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define DEQUANT_VBMI 1
typedef struct {
    __m512i plane[4][4]; /* plane[b][k]: byte b of qmap[64k .. 64k + 63] */
    __m512i order;       /* position L*16 + 4k + j takes the code of element 16k + 4L + j */
} qmap_planes;

static inline void qmap_planes_init(qmap_planes *t, const float *qmap) {
    uint8_t bytes[4][256], order[64];
    for (int i = 0; i < 256; ++i) {
        uint32_t u;
        memcpy(&u, qmap + i, sizeof u);
        for (int b = 0; b < 4; ++b)
            bytes[b][i] = (uint8_t)(u >> (8 * b));
    }
    for (int b = 0; b < 4; ++b)
        for (int k = 0; k < 4; ++k)
            t->plane[b][k] = _mm512_loadu_si512(bytes[b] + 64 * k);
    for (int lane = 0; lane < 4; ++lane)
        for (int k = 0; k < 4; ++k)
            for (int j = 0; j < 4; ++j)
                order[lane * 16 + 4 * k + j] = (uint8_t)(16 * k + 4 * lane + j);
    t->order = _mm512_loadu_si512(order);
}

static inline __m512i plane_lookup(const __m512i plane[4], __m512i code, __mmask64 top) {
    return _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(plane[0], code, plane[1]),
                                  _mm512_permutex2var_epi8(plane[2], code, plane[3]));
}
#else
typedef struct {
    int unused;
} qmap_planes;
static inline void qmap_planes_init(qmap_planes *t, const float *qmap) { (void)t, (void)qmap; }
#endif

#if defined(DEQUANT_VBMI)
/* 64 momentum values m[k][j] = qmap[q[16k + j]] * scale, k = 0..3 */
static inline void dequantize64(const qmap_planes *t, const uint8_t *q, __m512 s, __m512 m[4]) {
    const __m512i code = _mm512_permutexvar_epi8(t->order, _mm512_loadu_si512(q));
    const __mmask64 top = _mm512_movepi8_mask(code);
    const __m512i b0 = plane_lookup(t->plane[0], code, top), b1 = plane_lookup(t->plane[1], code, top);
    const __m512i b2 = plane_lookup(t->plane[2], code, top), b3 = plane_lookup(t->plane[3], code, top);
    const __m512i lo01 = _mm512_unpacklo_epi8(b0, b1), hi01 = _mm512_unpackhi_epi8(b0, b1);
    const __m512i lo23 = _mm512_unpacklo_epi8(b2, b3), hi23 = _mm512_unpackhi_epi8(b2, b3);
    m[0] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23)), s);
    m[1] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23)), s);
    m[2] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23)), s);
    m[3] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23)), s);
}
#endif

static inline void dequantize_block(const uint8_t *q, const float *qmap, const qmap_planes *planes, float scale,
                                    int64_t len, float *m) {
    int64_t i = 0;
#if defined(DEQUANT_VBMI)
    const qmap_planes t = *planes;
    const __m512 s = _mm512_set1_ps(scale);
    for (; i + 64 <= len; i += 64) {
        __m512 v[4];
        dequantize64(&t, q + i, s, v);
        for (int k = 0; k < 4; ++k)
            _mm512_storeu_ps(m + i + 16 * k, v[k]);
    }
#elif defined(__AVX512F__)
    (void)planes;
    __m512 table[16];
    for (int k = 0; k < 16; ++k)
        table[k] = _mm512_loadu_ps(qmap + 16 * k);
    const __m512 s = _mm512_set1_ps(scale);
    for (; i + 16 <= len; i += 16) {
        const __m512i code = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i)));
        __m512 r[8];
        for (int k = 0; k < 8; ++k)
            r[k] = _mm512_permutex2var_ps(table[2 * k], code, table[2 * k + 1]);
        const __mmask16 b5 = _mm512_test_epi32_mask(code, _mm512_set1_epi32(32));
        const __mmask16 b6 = _mm512_test_epi32_mask(code, _mm512_set1_epi32(64));
        const __mmask16 b7 = _mm512_test_epi32_mask(code, _mm512_set1_epi32(128));
        for (int k = 0; k < 4; ++k)
            r[k] = _mm512_mask_blend_ps(b5, r[2 * k], r[2 * k + 1]);
        for (int k = 0; k < 2; ++k)
            r[k] = _mm512_mask_blend_ps(b6, r[2 * k], r[2 * k + 1]);
        _mm512_storeu_ps(m + i, _mm512_mul_ps(_mm512_mask_blend_ps(b7, r[0], r[1]), s));
    }
#endif
#if !defined(DEQUANT_VBMI) && !defined(__AVX512F__)
    (void)planes;
#endif
    for (; i < len; ++i)
        m[i] = qmap[(int32_t)q[i]] * scale;
}

/* Codes still to be looked up: one block's indices into the 65536-entry table, and where its codes go. */
typedef struct {
    int32_t index[BLOCK];
    uint8_t *q;
    int64_t len; /* 0: none pending */
} pending_codes;

/* codes [lo, hi) of the pending block (clipped to its length): q[j] = lut[index[j]], scalar byte loads
 * (independent, so unrolled: 8 % less time for the whole step before block_step interleaved them) */
static inline void lookup_codes(const uint8_t *lut, const pending_codes *pend, int64_t lo, int64_t hi) {
    hi = hi < pend->len ? hi : pend->len;
#pragma GCC unroll 8
    for (int64_t j = lo; j < hi; ++j)
        pend->q[j] = lut[pend->index[j]];
}

/* The index into bitsandbytes' 65536-entry code table of a normalised value v = m * (1 / absmax).
 * bitsandbytes computes (int)(((clamp(v, -1, 1) + 1) * 0.5) * 65535 + 0.5), each operation rounded to
 * float32. (int)fmaf(v + 1, 32767.5, 0.5) is the same integer for every float v in [-1, 1] (the * 0.5
 * is exact, and the one rounding of the fma lands on the same side of every integer as the two
 * roundings it replaces: checked over all 2^31 such floats, and tested on a sample through
 * rlion8bit_table_index). The clamp never acts: |m| <= absmax, so m * RN(1 / absmax) rounds to at most
 * 1 in magnitude; above 2^126, where 1 / absmax is subnormal, it can exceed 1 by less than 2^-16,
 * which still gives index 0 or 65535. 16 % less time for the requantisation than bitsandbytes'
 * formula. */
static inline int32_t table_index(float v) { return (int32_t)fmaf(v + 1.0f, 32767.5f, 0.5f); }

/* max |m[i]| over one block (m finite: tensors with NaN/inf gradients are skipped before). A full block
 * under AVX-512 in four independent chains of maxima: 3 % off the whole step (25M parameters and in L2;
 * one chain of 16 dependent maxima stood between the update and the block's table indices). */
static inline float block_absmax(const float *m, int64_t len) {
#if defined(__AVX512F__)
    if (len == BLOCK) {
        __m512 mx[4];
        for (int k = 0; k < 4; ++k)
            mx[k] = _mm512_setzero_ps();
        for (int64_t i = 0; i < BLOCK; i += 64)
            for (int k = 0; k < 4; ++k)
                mx[k] = _mm512_max_ps(mx[k], _mm512_abs_ps(_mm512_loadu_ps(m + i + 16 * k)));
        return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3])));
    }
#endif
    float block_max = 0.0f;
#pragma omp simd reduction(max : block_max)
    for (int64_t i = 0; i < len; ++i) {
        const float a = fabsf(m[i]);
        block_max = a > block_max ? a : block_max; /* not fmaxf: that is a libm call without -ffast-math */
    }
    return block_max;
}

/* bitsandbytes' CPU quantize_blockwise for one block, up to the table lookup: returns the block's absmax
 * and leaves its table indices (table_index) in *pend (lookup_codes turns them into codes at q). The
 * same codes as bitsandbytes' (tested, also at the extremes of float32).
 * A block with absmax below FLT_MIN is first scaled by 2^64 in place (exact), as
 * reference8bit.quantize_blockwise does: 1 / absmax overflows to inf below 2^-128, and a zero would give
 * 0 * inf = NaN, an index outside the table. Above 2^-128 the scaling changes no code. */
static inline float quantize_index(float *m, int64_t len, pending_codes *pend, uint8_t *q) {
    const float block_max = block_absmax(m, len);
    pend->q = q;
    pend->len = len;
    if (block_max == 0.0f) { /* code 0 (lut[0] = 0), as bitsandbytes stores an all-zero block */
        for (int64_t i = 0; i < len; ++i)
            pend->index[i] = 0;
        return block_max;
    }
    float scaled_max = block_max;
    if (block_max < FLT_MIN) {
        for (int64_t i = 0; i < len; ++i)
            m[i] *= 0x1p64f;
        scaled_max = block_max * 0x1p64f;
    }
    const float inv = 1.0f / scaled_max;
    int32_t *index = pend->index;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j)
        index[j] = table_index(m[j] * inv);
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

/* Everything a block needs besides its data (set once per call). */
typedef struct {
    int dtype;
    float grad_sign;             /* -1 if maximize else +1 */
    int small1, small2;          /* |1 - beta| < 0.5: which side torch's lerp computes from */
    float w1, w1_minus_1, w2, w2_minus_1;
    float two_over_pi, decay_factor, neg_lr;
} hyper8;

/* Bytes per parameter or gradient value (they share the dtype). */
static inline int64_t value_bytes(const hyper8 *h) { return h->dtype == DTYPE_BF16 ? 2 : 4; }

/* The gradient of block [start, start + len) of a tensor as float32 (widened into `wide` for bfloat16). */
static inline const float *grad_block(const hyper8 *h, const void *grad, int64_t start, int64_t len, float *wide) {
    if (h->dtype != DTYPE_BF16)
        return (const float *)grad + start;
    const uint16_t *gh = (const uint16_t *)grad + start;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
        wide[i] = bf16_to_f32(gh[i]);
    return wide;
}

/* g * 0 summed over one block: 0 when every g is finite, NaN otherwise */
static inline float block_finite_scan(const float *gr, int64_t len) {
    float zero = 0.0f;
#pragma omp simd reduction(+ : zero)
    for (int64_t i = 0; i < len; ++i)
        zero += gr[i] * 0.0f;
    return zero;
}

/* sum over one block of c_hat^2, c_hat = lerp(m, g, 1 - beta1) / divisor; *nonfinite accumulates
 * g * 0 (0 for finite g, NaN for NaN or +-inf). A NaN or infinite g makes c_hat, hence the sum,
 * non-finite, so g is scanned only when the sum is (it can also overflow with finite g): two fewer
 * operations per element on the usual path.
 * With VBMI, a full block in the usual case is summed straight from the dequantised registers, 64
 * elements at a time into four accumulators (no m buffer, four independent fma chains instead of
 * one): the read pass 17 % faster with its data in L2, the whole step 2-4 % (25M parameters). The
 * order of the additions differs from the loop below, as it differs from torch's anyway. */
static inline float block_sumsq(const float *gr, const uint8_t *q, const float *qmap, const qmap_planes *planes,
                                float scale, int64_t len, const hyper8 *h, float divisor, float *nonfinite) {
#if defined(DEQUANT_VBMI)
    if (len == BLOCK && h->grad_sign == 1.0f && h->small1 && divisor == 1.0f) {
        const qmap_planes t = *planes;
        const __m512 s = _mm512_set1_ps(scale), w1 = _mm512_set1_ps(h->w1);
        __m512 acc[4];
        for (int k = 0; k < 4; ++k)
            acc[k] = _mm512_setzero_ps();
        for (int64_t i = 0; i < BLOCK; i += 64) {
            __m512 m[4];
            dequantize64(&t, q + i, s, m);
            for (int k = 0; k < 4; ++k) {
                const __m512 c = _mm512_fmadd_ps(w1, _mm512_sub_ps(_mm512_loadu_ps(gr + i + 16 * k), m[k]), m[k]);
                acc[k] = _mm512_fmadd_ps(c, c, acc[k]);
            }
        }
        const __m512 total = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        const float partial = _mm512_reduce_add_ps(total);
        if (!isfinite(partial))
            *nonfinite += block_finite_scan(gr, len);
        return partial;
    }
#endif
    float m[BLOCK];
    dequantize_block(q, qmap, planes, scale, len, m);
    const float grad_sign = h->grad_sign, w1 = h->w1, w1_minus_1 = h->w1_minus_1;
    const int small1 = h->small1;
    float partial = 0.0f;
    if (grad_sign == 1.0f && small1 && divisor == 1.0f) { /* the usual case, without the exact *1 and /1 */
#pragma omp simd reduction(+ : partial)
        for (int64_t i = 0; i < len; ++i) {
            const float c = fmaf(w1, gr[i] - m[i], m[i]);
            partial = fmaf(c, c, partial);
        }
    } else {
#pragma omp simd reduction(+ : partial)
        for (int64_t i = 0; i < len; ++i) {
            const float g = gr[i] * grad_sign;
            const float d = g - m[i];
            const float c = (small1 ? fmaf(w1, d, m[i]) : fmaf(w1_minus_1, d, g)) / divisor;
            partial = fmaf(c, c, partial);
        }
    }
    if (!isfinite(partial))
        *nonfinite += block_finite_scan(gr, len);
    return partial;
}

/* The update of elements [lo, hi) of one block: p and m (m holds the dequantised momentum, and gets
 * the new one). update_usual is the usual case (no maximize, bias correction or weight decay, betas
 * above 0.5) without the selects and the exact *1 and /1 of update_general: the same bits, a third
 * less time per element. update_decayed allows weight decay and maximize (8 % less time than
 * update_general with weight decay). */
static inline void update_usual(float *p, const float *gr, float *m, int64_t lo, int64_t hi, const hyper8 *h,
                                float alpha) {
    const float w1 = h->w1, w2 = h->w2, two_over_pi = h->two_over_pi, neg_lr = h->neg_lr;
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
        const float d = gr[i] - m[i];
        const float u = rlion_atanf(fmaf(w1, d, m[i]) * alpha) * two_over_pi;
        p[i] = fmaf(u, neg_lr, p[i]);
        m[i] = fmaf(w2, d, m[i]);
    }
}

static inline void update_decayed(float *p, const float *gr, float *m, int64_t lo, int64_t hi, const hyper8 *h,
                                  float alpha) {
    const float grad_sign = h->grad_sign, w1 = h->w1, w2 = h->w2, two_over_pi = h->two_over_pi;
    const float decay_factor = h->decay_factor, neg_lr = h->neg_lr;
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
        const float g = gr[i] * grad_sign;
        const float d = g - m[i];
        const float u = rlion_atanf(fmaf(w1, d, m[i]) * alpha) * two_over_pi;
        p[i] = fmaf(u, neg_lr, p[i] * decay_factor);
        m[i] = fmaf(w2, d, m[i]);
    }
}

static inline void update_general(float *p, const float *gr, float *m, int64_t lo, int64_t hi, const hyper8 *h,
                                  float divisor, float alpha) {
    const float grad_sign = h->grad_sign, w1 = h->w1, w1_minus_1 = h->w1_minus_1, w2 = h->w2;
    const float w2_minus_1 = h->w2_minus_1, two_over_pi = h->two_over_pi, decay_factor = h->decay_factor;
    const float neg_lr = h->neg_lr;
    const int small1 = h->small1, small2 = h->small2;
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
        const float g = gr[i] * grad_sign;
        const float d = g - m[i];
        const float c = (small1 ? fmaf(w1, d, m[i]) : fmaf(w1_minus_1, d, g)) / divisor;
        const float u = rlion_atanf(c * alpha) * two_over_pi;
        p[i] = fmaf(u, neg_lr, p[i] * decay_factor);
        m[i] = small2 ? fmaf(w2, d, m[i]) : fmaf(w2_minus_1, d, g);
    }
}

#define GROUP 16

/* The step on one block: p updated, the block's new absmax returned, and its code-table indices left
 * in *pend. The codes pending from the previous block are looked up meanwhile, GROUP at a time between
 * groups of GROUP updates: the scalar table loads then run beside the vector arithmetic instead of
 * after it (14 % less time per step, one thread, 25M elements). */
static inline float block_step(float *p, const float *gr, uint8_t *q, const float *qmap, const qmap_planes *planes,
                               const uint8_t *lut, float scale, int64_t len, const hyper8 *h, float divisor,
                               float alpha, pending_codes *pend) {
    float m[BLOCK];
    dequantize_block(q, qmap, planes, scale, len, m);
    const hyper8 hyper = *h; /* a local copy: the stores to p cannot alias it, so no reloads per group */
    h = &hyper;
    const int usual = h->grad_sign == 1.0f && h->small1 && h->small2 && divisor == 1.0f && h->decay_factor == 1.0f;
    if (len == BLOCK && usual) {
        for (int64_t i0 = 0; i0 < BLOCK; i0 += GROUP) {
            update_usual(p, gr, m, i0, i0 + GROUP, h, alpha);
            lookup_codes(lut, pend, i0, i0 + GROUP);
        }
    } else if (len == BLOCK && h->small1 && h->small2 && divisor == 1.0f) {
        for (int64_t i0 = 0; i0 < BLOCK; i0 += GROUP) {
            update_decayed(p, gr, m, i0, i0 + GROUP, h, alpha);
            lookup_codes(lut, pend, i0, i0 + GROUP);
        }
    } else if (len == BLOCK) {
        for (int64_t i0 = 0; i0 < BLOCK; i0 += GROUP) {
            update_general(p, gr, m, i0, i0 + GROUP, h, divisor, alpha);
            lookup_codes(lut, pend, i0, i0 + GROUP);
        }
    } else {
        lookup_codes(lut, pend, 0, BLOCK);
        if (usual)
            update_usual(p, gr, m, 0, len, h, alpha);
        else
            update_general(p, gr, m, 0, len, h, divisor, alpha);
    }
    return quantize_index(m, len, pend, q);
}

/* One tensor's data as the kernel sees it. */
typedef struct {
    void *param;
    const void *grad;
    uint8_t *codes;
    float *absmax;
    const float *qmap;
    const uint8_t *lut;
    int64_t numel;
    float divisor; /* 1 - beta1^t with bias correction, else 1 */
} tensor8;

#define CHUNK_BLOCKS 64
#define CHUNK (CHUNK_BLOCKS * BLOCK)

static int64_t chunks_of(int64_t numel) { return (numel + CHUNK - 1) / CHUNK; }

/* The qmap_planes of the qmap a thread used last, set up again only when the qmap changes (tensors
 * usually share bitsandbytes' one signed dynamic map; setting up is ~2000 instructions, 1 % of a
 * chunk's read pass or update). One per thread and kernel call. */
typedef struct {
    const float *qmap;
    qmap_planes planes;
} planes_cache;

static inline const qmap_planes *planes_of(planes_cache *cache, const float *qmap) {
    if (cache->qmap != qmap) {
        qmap_planes_init(&cache->planes, qmap);
        cache->qmap = qmap;
    }
    return &cache->planes;
}

/* The read pass of chunk c of a tensor, before its update: its sum of c_hat^2 (double across
 * blocks) under "rms", and *finite = 0 if one of its gradients is NaN/inf. Under "fixed" only the
 * finiteness scan. */
static double prepass_chunk(const tensor8 *x, int64_t c, const hyper8 *h, int rms, int *finite,
                            planes_cache *cache) {
    const int64_t n = x->numel, first = c * CHUNK_BLOCKS, blocks = (n + BLOCK - 1) / BLOCK;
    const int64_t last = first + CHUNK_BLOCKS < blocks ? first + CHUNK_BLOCKS : blocks;
    double sum = 0.0;
    float nonfinite = 0.0f;
    float g_wide[BLOCK];
    const qmap_planes *planes = rms ? planes_of(cache, x->qmap) : NULL;
    for (int64_t b = first; b < last; ++b) {
        const int64_t start = b * BLOCK, len = start + BLOCK < n ? BLOCK : n - start;
        const float *gr = grad_block(h, x->grad, start, len, g_wide);
        if (rms)
            sum += (double)block_sumsq(gr, x->codes + start, x->qmap, planes, x->absmax[b], len, h, x->divisor,
                                       &nonfinite);
        else
            nonfinite += block_finite_scan(gr, len);
    }
    *finite = nonfinite == 0.0f;
    return sum;
}

/* Software prefetch distance of the update, in blocks: the parameter is the one stream the update
 * reads from memory (its read pass has just brought g and the codes into cache). Prefetching it
 * 16 blocks ahead took 8-10 % off the step (25M parameters; 4, 8, 16 and 32 blocks measured
 * within 2 % of each other). */
#define PREFETCH_BLOCKS 16

/* While block b of tensor x is updated, the matching share of the gradient and codes of tensor `next`
 * (the one this thread takes next) is prefetched, with the non-temporal hint: its read pass, which is
 * memory-bound, then finds them in cache while the update, which is bound by arithmetic, hides the
 * transfer. This works only after touch_pages (below); the T0-T2 hints measure the same. */
static inline void prefetch_next_read(const tensor8 *x, const tensor8 *next, int64_t b, const hyper8 *h) {
    const int64_t blocks = (x->numel + BLOCK - 1) / BLOCK, next_blocks = (next->numel + BLOCK - 1) / BLOCK;
    const int64_t lo = b * next_blocks / blocks * BLOCK, hi = (b + 1) * next_blocks / blocks * BLOCK;
    const int64_t end = hi < next->numel ? hi : next->numel;
    const int64_t grad_bytes = value_bytes(h);
    for (int64_t k = lo * grad_bytes; k < end * grad_bytes; k += 64)
        __builtin_prefetch((const char *)next->grad + k, 0, 0);
    for (int64_t k = lo; k < end; k += 64)
        __builtin_prefetch(next->codes + k, 0, 0);
}

/* One load from each 4 KiB page of the gradient and codes of tensor `next`, before the update whose
 * blocks prefetch them (prefetch_next_read). On this Zen 4 a software prefetch into a page that is not
 * in the TLB is dropped: the pages of the next tensor are touched by nothing else until its read pass,
 * so without this its prefetches did nothing measurable. The loads are independent (~600 for a
 * 500k-element tensor, a few microseconds against ~0.5 ms of update). Measured (one thread, 25M
 * parameters in 50 tensors): the read pass 0.225 -> 0.193 ns per element (0.16 when its data is in
 * L3), the step 2.5 % faster on two threads and 1-3 % on one. */
static void touch_pages(const tensor8 *next, const hyper8 *h) {
    const int64_t grad_bytes = next->numel * value_bytes(h);
    uint8_t sink = 0;
    for (int64_t k = 0; k < grad_bytes; k += 4096)
        sink ^= *(volatile const uint8_t *)((const char *)next->grad + k);
    for (int64_t k = 0; k < next->numel; k += 4096)
        sink ^= *(volatile const uint8_t *)(next->codes + k);
    (void)sink;
}

/* The update of chunk c of a tensor with multiplier alpha_t; `next`, if not NULL, is prefetched
 * meanwhile (prefetch_next_read). */
static void update_chunk(const tensor8 *x, int64_t c, const hyper8 *h, float alpha_t, const tensor8 *next,
                         planes_cache *cache) {
    const int64_t n = x->numel, first = c * CHUNK_BLOCKS, blocks = (n + BLOCK - 1) / BLOCK;
    const int64_t last = first + CHUNK_BLOCKS < blocks ? first + CHUNK_BLOCKS : blocks;
    float p_wide[BLOCK], g_wide[BLOCK];
    const qmap_planes *planes = planes_of(cache, x->qmap);
    pending_codes pend;
    pend.len = 0;
    const int64_t param_bytes = value_bytes(h);
    for (int64_t b = first; b < last; ++b) {
        const int64_t start = b * BLOCK, len = start + BLOCK < n ? BLOCK : n - start;
        if (start + (PREFETCH_BLOCKS + 1) * BLOCK <= n) {
            const char *ahead = (const char *)x->param + (start + PREFETCH_BLOCKS * BLOCK) * param_bytes;
            for (int64_t k = 0; k < BLOCK * param_bytes; k += 64)
                __builtin_prefetch(ahead + k, 1, 3);
        }
        if (next)
            prefetch_next_read(x, next, b, h);
        const float *gr = grad_block(h, x->grad, start, len, g_wide);
        float *p = (float *)x->param + start;
        if (h->dtype == DTYPE_BF16) {
            const uint16_t *ph = (const uint16_t *)x->param + start;
#pragma omp simd
            for (int64_t i = 0; i < len; ++i)
                p_wide[i] = bf16_to_f32(ph[i]);
            p = p_wide;
        }
        x->absmax[b] = block_step(p, gr, x->codes + start, x->qmap, planes, x->lut, x->absmax[b], len, h, x->divisor,
                                  alpha_t, &pend);
        if (h->dtype == DTYPE_BF16) {
            uint16_t *ph = (uint16_t *)x->param + start;
#pragma omp simd
            for (int64_t i = 0; i < len; ++i)
                ph[i] = f32_to_bf16(p_wide[i]);
        }
    }
    lookup_codes(x->lut, &pend, 0, BLOCK);
}

/* alpha_t of a tensor from its chunk sums (added in chunk order, so independent of the thread
 * count): alpha ("fixed") or alpha / max(RMS(c_hat), FLT_MIN) ("rms"), each intermediate rounded to
 * float32 as torch computes it (norm, norm / sqrt(n), alpha / rms), then capped at
 * FLT_MAX * divisor, so that alpha_t * c_hat multiplies c by at most FLT_MAX (_alpha_cap in
 * hf_rlion/rlion.py). Uncapped, a tensor whose c is all zero has RMS 0 -> FLT_MIN, alpha_t
 * overflows to inf for alpha > ~4 and inf * 0 = NaN; capped, its update is exactly zero. */
static float alpha_of(const double *sums, int64_t nc, int64_t numel, float alpha, int rms, float divisor) {
    const float cap = (float)((double)FLT_MAX * (double)divisor);
    float alpha_t = alpha;
    if (rms) {
        double sum = 0.0;
        for (int64_t c = 0; c < nc; ++c)
            sum += sums[c];
        const float norm = (float)sqrt(sum);
        float rms_value = norm / (float)sqrt((double)(numel > 0 ? numel : 1));
        rms_value = rms_value > FLT_MIN ? rms_value : FLT_MIN;
        alpha_t = alpha / rms_value;
    }
    return alpha_t < cap ? alpha_t : cap;
}

/* Tensors below split_numel (whole[0 .. n_whole), in index order) are done by one thread each, taken
 * in turn from a shared counter, as in the fp32 kernel (take_small there): the next one for the calling
 * thread, or -1 when all are taken. */
static int64_t take_whole(int64_t *counter, const int64_t *whole, int64_t n_whole) {
    const int64_t i = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
    return i < n_whole ? whole[i] : -1;
}

/* One RLion step on `count` tensors with 8-bit state, in one parallel region. Parameters and
 * gradients are all float32 (dtype 0) or all bfloat16 (dtype 1); arithmetic is float32.
 *
 * Per element:  m = qmap[code] * absmax;  c = lerp(m, g, 1 - beta1);  c /= bias_div[t] (if bias_correction)
 *               u = atan(c * alpha_t) * 2/pi;  p = p * decay (if apply_decay);  p = p + (-lr) * u
 *               m' = lerp(m, g, 1 - beta2), requantised per block.
 * alpha_t: see alpha_of (capped there, so that it is finite).
 *
 * Non-finite gradients: each tensor gets a read pass right before its update (the sum of squares
 * under "rms", a scan of g * 0 under "fixed"), chunk by chunk; a tensor with any NaN/inf gradient
 * is left untouched (parameter, codes, absmax) and skipped[t] = 1, else skipped[t] = 0. That pass
 * is what makes the update's second read of g (and the codes) come from cache, instead of a
 * separate pass over every gradient before the step.
 *
 * Work split, as in the fp32 kernel (rlion_cpu.c): tensors below split_numel are each done by
 * one thread from start to end (read pass, then update, both forwards: the hardware prefetchers
 * follow ascending streams, and an update walking backwards from where the read pass ended was 3 %
 * slower), handed out dynamically (take_whole: each thread claims its next tensor when it starts one)
 * with no barrier at all (on a busy machine a barrier can cost milliseconds), each update prefetching
 * the read pass of the tensor claimed next (touch_pages, prefetch_next_read); larger tensors are split
 * into chunks of CHUNK elements across the threads, with one barrier between their two passes.
 *
 * Temporaries: a few 256-float buffers per thread, plus per-call tables (9 bytes per CHUNK elements
 * and 80 bytes per tensor). Returns the number of tensors skipped, or -1 if those tables cannot be
 * allocated (nothing is modified then). */
int rlion8bit_step_many(int64_t count, int dtype, void *const *params, const void *const *grads, uint8_t *const *codes,
                        float *const *absmaxes, const float *const *qmaps, const uint8_t *const *luts,
                        const int64_t *numels, const float *bias_divs, float w1, float w2, int bias_correction,
                        float alpha, int rms_scaling, float two_over_pi, float decay, int apply_decay, float neg_lr,
                        int maximize, int threads, int64_t split_numel, int32_t *skipped) {
    int64_t chunks = 0;
    for (int64_t t = 0; t < count; ++t) {
        skipped[t] = 0;
        chunks += chunks_of(numels[t]);
    }
    if (chunks == 0)
        return 0;
    tensor8 *tensors = malloc(sizeof(tensor8) * (size_t)count);
    int64_t *chunk_offset = malloc(sizeof(int64_t) * (size_t)count);
    double *chunk_sums = malloc(sizeof(double) * (size_t)chunks);
    uint8_t *chunk_finite = malloc((size_t)chunks);
    int64_t *whole = malloc(sizeof(int64_t) * (size_t)count);
    if (!tensors || !chunk_offset || !chunk_sums || !chunk_finite || !whole) {
        free(tensors);
        free(chunk_offset);
        free(chunk_sums);
        free(chunk_finite);
        free(whole);
        return -1;
    }
    int64_t offset = 0, n_whole = 0;
    for (int64_t t = 0; t < count; ++t) {
        tensors[t] = (tensor8){params[t], grads[t], codes[t], absmaxes[t], qmaps[t], luts[t], numels[t],
                               bias_correction ? bias_divs[t] : 1.0f};
        chunk_offset[t] = offset;
        offset += chunks_of(numels[t]);
        if (numels[t] > 0 && numels[t] < split_numel)
            whole[n_whole++] = t;
    }
    hyper8 h;
    h.dtype = dtype;
    h.grad_sign = maximize ? -1.0f : 1.0f;
    h.small1 = fabsf(w1) < 0.5f;
    h.small2 = fabsf(w2) < 0.5f;
    h.w1 = w1;
    h.w1_minus_1 = w1 - 1.0f;
    h.w2 = w2;
    h.w2_minus_1 = w2 - 1.0f;
    h.two_over_pi = two_over_pi;
    h.decay_factor = apply_decay ? decay : 1.0f;
    h.neg_lr = neg_lr;
    if (threads < 1)
        threads = 1;

    int64_t next_whole = 0; /* the counter of take_whole */
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        planes_cache cache = {NULL};
        /* tensors below split_numel: one thread each, no synchronisation */
        int64_t t = take_whole(&next_whole, whole, n_whole);
        while (t >= 0) {
            /* the next tensor is claimed now, so its data can be prefetched during this update */
            const int64_t t_next = take_whole(&next_whole, whole, n_whole);
            const tensor8 *x = &tensors[t];
            const int64_t nc = chunks_of(x->numel);
            double *sums = chunk_sums + chunk_offset[t];
            int finite = 1;
            for (int64_t c = 0; c < nc && finite; ++c)
                sums[c] = prepass_chunk(x, c, &h, rms_scaling, &finite, &cache);
            if (finite) {
                const float alpha_t = alpha_of(sums, nc, x->numel, alpha, rms_scaling, x->divisor);
                const tensor8 *next = t_next >= 0 ? &tensors[t_next] : NULL;
                if (next)
                    touch_pages(next, &h);
                for (int64_t c = 0; c < nc; ++c)
                    update_chunk(x, c, &h, alpha_t, next, &cache);
            } else {
                skipped[t] = 1;
            }
            t = t_next;
        }
        /* larger tensors: both passes split across the threads */
        for (int64_t t = 0; t < count; ++t) {
            const tensor8 *x = &tensors[t];
            if (x->numel < split_numel || x->numel == 0)
                continue;
            const int64_t nc = chunks_of(x->numel);
            double *sums = chunk_sums + chunk_offset[t];
            uint8_t *finite_flags = chunk_finite + chunk_offset[t];
#pragma omp for schedule(dynamic, 1)
            for (int64_t c = 0; c < nc; ++c) {
                int finite;
                sums[c] = prepass_chunk(x, c, &h, rms_scaling, &finite, &cache);
                finite_flags[c] = (uint8_t)finite;
            }
            int finite = 1;
            for (int64_t c = 0; c < nc; ++c)
                finite &= finite_flags[c];
            if (!finite) { /* every thread reads the same flags: all skip */
#pragma omp single nowait
                skipped[t] = 1;
                continue;
            }
            const float alpha_t = alpha_of(sums, nc, x->numel, alpha, rms_scaling, x->divisor);
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t j = 0; j < nc; ++j)
                update_chunk(x, j, &h, alpha_t, NULL, &cache);
        }
    }
    free(tensors);
    free(chunk_offset);
    free(chunk_sums);
    free(chunk_finite);
    free(whole);
    int skipped_count = 0;
    for (int64_t t = 0; t < count; ++t)
        skipped_count += skipped[t];
    return skipped_count;
}

/* table_index alone, for the test against bitsandbytes' formula. */
void rlion8bit_table_index(const float *v, int32_t *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        out[i] = table_index(v[i]);
}

/* arctan alone, for the accuracy test against torch.atan. */
void rlion8bit_atan_f32(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        out[i] = rlion_atanf(x[i]);
}

/* The exported functions' prototypes (i32/i64 integers, f32 floats, p any pointer), which
 * hf_rlion/rlion8bit.py compares with its ctypes declarations before using this library. */
const char *rlion8bit_abi_signature(void) {
    return "i32 rlion8bit_step_many(i64,i32,p,p,p,p,p,p,p,p,f32,f32,i32,f32,i32,f32,f32,i32,f32,i32,i32,i64,p);"
           "void rlion8bit_atan_f32(p,p,i64);"
           "void rlion8bit_table_index(p,p,i64)";
}
