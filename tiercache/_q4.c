/* q4 x int8 matrix-vector products on the int4 kernel's own layout (tiercache/engine/q4.py).

   y[m, r] = sum_k x[m, k] * w[r, k],  w[r, k] = (q[r, k] - 8) * scale[g, r] + zero[g, r],
   g = k / 32. Weights stay as stored: packed nibbles in row blocks of BN (32 or 64) rows, each
   block [K, BN/2] bytes whose byte (k, j) holds row j in its low nibble and row j + BN/2 in its
   high one; scales and zeros bf16 [K/32, N, 2]. Activations are quantized to int8 per group of
   32 (as llama.cpp's q8_0): x = dx[g] * xq[k], so that
     y[r] = sum_g dx[g] * (scale[g, r] * (sum_k q[r, k] xq[k] - 8 S[g]) + zero[g, r] * S[g]),
   S[g] = sum of xq over group g, and the inner sum is integer arithmetic.

   The AVX2 path for row blocks of 32 takes 16 bytes of a column (16 rows in low nibbles, 16 in high) for 4 columns
   at a time, interleaves columns (c, c+2) and (c+1, c+3) byte-wise (one unpack per 8 rows) and
   multiplies pairs with maddubs: a group's 8 steps sum in int16 without overflow
   (8 * 2 * 15 * 127 = 30480). The scalar path is the same arithmetic, for other CPUs and as the
   reference the Python side checks the SIMD ones against.

   The AVX-512 VNNI path (row blocks of 64) sums 4 columns per int32 lane with vpdpbusd: one
   activation row or a pair straight from the packed bytes (decode), and for prompts each block
   unpacked once into 16-row registers that three activation rows at a time then read (see
   "Prompts" below: 2x ORT's MatMulNBits at 128 rows on a Zen 5 core).

   Threads: rows split into row blocks across a small pool of pthreads (the caller is one), which
   spin briefly between calls (a token makes ~100 calls back to back) and then sleep. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>

#define GROUP 32
#define MAX_THREADS 16
enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_VNNI = 2 };

/* ---- activations: int8 per group, and the AVX2 kernel's column-pair patterns ---- */

typedef struct {
    int64_t k;
    int8_t *xq;      /* [K] */
    float *dx;       /* [K/32] */
    int32_t *sq;     /* [K/32]: sum of xq per group */
    uint8_t *pat;    /* [K/4][32]: per 4 columns, lane 0 = (x[c], x[c+2]) x 8, lane 1 = (x[c+1], x[c+3]) x 8 */
} act_t;

static void quantize(const float *x, act_t *a) {
    int64_t groups = a->k / GROUP;
    for (int64_t g = 0; g < groups; g++) {
        const float *xs = x + g * GROUP;
        float amax = 0.f;
        for (int i = 0; i < GROUP; i++) {
            float v = fabsf(xs[i]);
            amax = v > amax ? v : amax;
        }
        float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int32_t s = 0;
        for (int i = 0; i < GROUP; i++) {
            int v = (int)lrintf(xs[i] * id);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            a->xq[g * GROUP + i] = (int8_t)v;
            s += v;
        }
        a->dx[g] = d;
        a->sq[g] = s;
    }
    if (a->pat) {
        for (int64_t c = 0; c < a->k; c += 4) {
            uint8_t *p = a->pat + (c / 4) * 32;
            for (int i = 0; i < 8; i++) {
                p[2 * i] = (uint8_t)a->xq[c];
                p[2 * i + 1] = (uint8_t)a->xq[c + 2];
                p[16 + 2 * i] = (uint8_t)a->xq[c + 1];
                p[16 + 2 * i + 1] = (uint8_t)a->xq[c + 3];
            }
        }
    }
}

static inline float bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- scalar: rows [r0, r1) of one activation row ---- */

static void rows_scalar(const act_t *a, const uint8_t *packed, const uint16_t *sz, int sym,
                        int64_t n, int bn, int64_t r0, int64_t r1, float *y) {
    int64_t k = a->k, half = bn / 2;
    for (int64_t r = r0; r < r1; r++) {
        int64_t b = r / bn, j = r % bn;
        const uint8_t *blk = packed + b * k * half;
        int shift = j >= half ? 4 : 0;
        int64_t byte = j % half;
        float acc = 0.f;
        for (int64_t g = 0; g < k / GROUP; g++) {
            int32_t dot = 0;
            for (int i = 0; i < GROUP; i++) {
                int64_t c = g * GROUP + i;
                dot += ((blk[c * half + byte] >> shift) & 0xF) * a->xq[c];
            }
            float scale = bf16(sym ? sz[g * n + r] : sz[(g * n + r) * 2]);
            float zero = sym ? 0.f : bf16(sz[(g * n + r) * 2 + 1]);
            acc += a->dx[g] * (scale * (float)(dot - 8 * a->sq[g]) + zero * (float)a->sq[g]);
        }
        y[r] = acc;
    }
}

/* ---- AVX2 ---- */

__attribute__((target("avx2,fma")))
static inline __m256 widen(__m256i acc) {  /* int16 [rows 0-7 | rows 0-7] -> f32 rows 0-7 */
    __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc));
    __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc, 1));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
}

__attribute__((target("avx2,fma")))
static inline __m256 scale8(const uint16_t *p, __m256 dot, __m256 a, __m256 b8, __m256 bz,
                            __m256 y) {
    /* 8 rows' (scale, zero) bf16 pairs -> y += scale * (a * dot - b8) + zero * bz */
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    __m256 z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000)));
    y = _mm256_fmadd_ps(s, _mm256_fmsub_ps(a, dot, b8), y);
    return _mm256_fmadd_ps(z, bz, y);
}

__attribute__((target("avx2,fma")))
static inline __m256 scale8g(const uint16_t *sz, int sym, int64_t g, int64_t n, int64_t r,
                             __m256 dot, __m256 a, __m256 b8, __m256 bz, __m256 y) {
    /* rows r..r+7 of group g: (scale, zero) pairs [G, N, 2], or (sym) scales alone [G, N]
       with the zeros 0, as Q4_0's x = (q - 8) * d: 10% fewer bytes than pairs */
    if (!sym)
        return scale8(sz + (g * n + r) * 2, dot, a, b8, bz, y);
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(sz + g * n + r)));
    return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
                           _mm256_fmsub_ps(a, dot, b8), y);
}

/* One stripe: 16 bytes per column at `col` (stride cs), i.e. 16 rows (low nibbles, rows
   lo..lo+15) and 16 more (high nibbles, rows hi..hi+15); writes their 32 outputs. */
__attribute__((target("avx2,fma")))
static void stripe_avx2(const act_t *a, const uint8_t *col, int64_t cs, const uint16_t *sz,
                        int sym, int64_t n, int64_t lo, int64_t hi, float *y) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 y0 = _mm256_setzero_ps(), y1 = y0, y2 = y0, y3 = y0;
    int64_t groups = a->k / GROUP;
    for (int64_t g = 0; g < groups; g++) {
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        const uint8_t *p = col + g * GROUP * cs;
        const __m256i *pat = (const __m256i *)(a->pat + g * GROUP * 8);
        for (int s = 0; s < GROUP / 4; s++, p += 4 * cs) {
            __m256i v, w;
            if (cs == 16) {
                v = _mm256_loadu_si256((const __m256i *)p);
                w = _mm256_loadu_si256((const __m256i *)(p + 32));
            } else {
                v = _mm256_inserti128_si256(_mm256_castsi128_si256(
                        _mm_loadu_si128((const __m128i *)p)),
                        _mm_loadu_si128((const __m128i *)(p + cs)), 1);
                w = _mm256_inserti128_si256(_mm256_castsi128_si256(
                        _mm_loadu_si128((const __m128i *)(p + 2 * cs))),
                        _mm_loadu_si128((const __m128i *)(p + 3 * cs)), 1);
            }
            __m256i x = _mm256_loadu_si256(pat + s);
            __m256i u0 = _mm256_unpacklo_epi8(v, w), u1 = _mm256_unpackhi_epi8(v, w);
            a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(_mm256_and_si256(u0, m4), x));
            a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(_mm256_and_si256(u1, m4), x));
            a2 = _mm256_add_epi16(a2, _mm256_maddubs_epi16(
                     _mm256_and_si256(_mm256_srli_epi16(u0, 4), m4), x));
            a3 = _mm256_add_epi16(a3, _mm256_maddubs_epi16(
                     _mm256_and_si256(_mm256_srli_epi16(u1, 4), m4), x));
        }
        float dx = a->dx[g], sq = (float)a->sq[g];
        __m256 va = _mm256_set1_ps(dx), b8 = _mm256_set1_ps(8.f * dx * sq),
               bz = _mm256_set1_ps(dx * sq);
        y0 = scale8g(sz, sym, g, n, lo, widen(a0), va, b8, bz, y0);
        y1 = scale8g(sz, sym, g, n, lo + 8, widen(a1), va, b8, bz, y1);
        y2 = scale8g(sz, sym, g, n, hi, widen(a2), va, b8, bz, y2);
        y3 = scale8g(sz, sym, g, n, hi + 8, widen(a3), va, b8, bz, y3);
    }
    _mm256_storeu_ps(y + lo, y0);
    _mm256_storeu_ps(y + lo + 8, y1);
    _mm256_storeu_ps(y + hi, y2);
    _mm256_storeu_ps(y + hi + 8, y3);
}

/* Row blocks of 64 (32 bytes per column): both 16-byte halves of a column in one load, lane 0
   rows 0-15 (low nibbles) and 32-47 (high), lane 1 rows 16-31 and 48-63. Columns pair as
   (c, c+2) and (c+1, c+3) into the same accumulators, so the pattern's two lanes are equal. */
__attribute__((target("avx2,fma")))
static inline void scale8x2(const uint16_t *sz, int sym, int64_t g, int64_t n, int64_t r0,
                            int64_t r1, __m256i acc, __m256 a, __m256 b8, __m256 bz, float *y0,
                            float *y1) {
    /* acc int16 [rows r0..r0+7 | rows r1..r1+7]: y[r] += scale * (a * dot - b8) + zero * bz */
    __m256 d0 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc)));
    __m256 d1 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc, 1)));
    _mm256_storeu_ps(y0, scale8g(sz, sym, g, n, r0, d0, a, b8, bz, _mm256_loadu_ps(y0)));
    _mm256_storeu_ps(y1, scale8g(sz, sym, g, n, r1, d1, a, b8, bz, _mm256_loadu_ps(y1)));
}

__attribute__((target("avx2,fma")))
static void block64_avx2(const act_t *a, const uint8_t *blk, const uint16_t *sz, int sym,
                         int64_t n, int64_t r, float *y) {
    /* Two maddubs per step land in each accumulator, so int16 holds half a group (4 steps,
       8 * 3810 = 30480) and each half is scaled on its own; the zero terms go with the first. */
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256 none = _mm256_setzero_ps();
    int64_t groups = a->k / GROUP;
    float *out = y + r;
    for (int i = 0; i < 64; i++)
        out[i] = 0.f;
    for (int64_t g = 0; g < groups; g++) {
        float dx = a->dx[g], sq = (float)a->sq[g];
        __m256 va = _mm256_set1_ps(dx), b8 = _mm256_set1_ps(8.f * dx * sq),
               bz = _mm256_set1_ps(dx * sq);
        for (int half = 0; half < 2; half++) {
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            const uint8_t *p = blk + (g * GROUP + half * 16) * 32;
            const int8_t *xq = a->xq + g * GROUP + half * 16;
            for (int c = 0; c < 16; c += 4, p += 128) {
                __m256i v0 = _mm256_loadu_si256((const __m256i *)p);         /* column c */
                __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + 32));  /* c + 1 */
                __m256i v2 = _mm256_loadu_si256((const __m256i *)(p + 64));  /* c + 2 */
                __m256i v3 = _mm256_loadu_si256((const __m256i *)(p + 96));  /* c + 3 */
                __m256i x02 = _mm256_set1_epi16((int16_t)(((uint16_t)(uint8_t)xq[c + 2] << 8)
                                                          | (uint8_t)xq[c]));
                __m256i x13 = _mm256_set1_epi16((int16_t)(((uint16_t)(uint8_t)xq[c + 3] << 8)
                                                          | (uint8_t)xq[c + 1]));
                __m256i u0 = _mm256_unpacklo_epi8(v0, v2), u1 = _mm256_unpackhi_epi8(v0, v2);
                __m256i w0 = _mm256_unpacklo_epi8(v1, v3), w1 = _mm256_unpackhi_epi8(v1, v3);
                a0 = _mm256_add_epi16(a0, _mm256_add_epi16(
                         _mm256_maddubs_epi16(_mm256_and_si256(u0, m4), x02),
                         _mm256_maddubs_epi16(_mm256_and_si256(w0, m4), x13)));
                a1 = _mm256_add_epi16(a1, _mm256_add_epi16(
                         _mm256_maddubs_epi16(_mm256_and_si256(u1, m4), x02),
                         _mm256_maddubs_epi16(_mm256_and_si256(w1, m4), x13)));
                a2 = _mm256_add_epi16(a2, _mm256_add_epi16(
                         _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(u0, 4), m4), x02),
                         _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w0, 4), m4), x13)));
                a3 = _mm256_add_epi16(a3, _mm256_add_epi16(
                         _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(u1, 4), m4), x02),
                         _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w1, 4), m4), x13)));
            }
            __m256 h8 = half ? none : b8, hz = half ? none : bz;
            /* a0: rows 0-7 | 16-23; a1: 8-15 | 24-31; a2: 32-39 | 48-55; a3: 40-47 | 56-63 */
            scale8x2(sz, sym, g, n, r, r + 16, a0, va, h8, hz, out, out + 16);
            scale8x2(sz, sym, g, n, r + 8, r + 24, a1, va, h8, hz, out + 8, out + 24);
            scale8x2(sz, sym, g, n, r + 32, r + 48, a2, va, h8, hz, out + 32, out + 48);
            scale8x2(sz, sym, g, n, r + 40, r + 56, a3, va, h8, hz, out + 40, out + 56);
        }
    }
}

__attribute__((target("avx2,fma")))
static void rows_avx2(const act_t *a, const uint8_t *packed, const uint16_t *sz, int sym,
                      int64_t n, int bn, int64_t r0, int64_t r1, float *y) {
    int64_t k = a->k, half = bn / 2;
    for (int64_t b = r0 / bn; b < r1 / bn; b++) {
        const uint8_t *blk = packed + b * k * half;
        if (bn == 64) {
            block64_avx2(a, blk, sz, sym, n, b * bn, y);
            continue;
        }
        for (int64_t off = 0; off < half; off += 16)
            stripe_avx2(a, blk + off, half, sz, sym, n, b * bn + off, b * bn + half + off, y);
    }
}

/* ---- int8 rows (q8r: int8 [N, K] with one bf16 scale per row) ---- */

static void rows8_scalar(const act_t *a, const int8_t *q, const uint16_t *scale, int64_t r0,
                         int64_t r1, float *y) {
    int64_t k = a->k;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *row = q + r * k;
        float acc = 0.f;
        for (int64_t g = 0; g < k / GROUP; g++) {
            int32_t dot = 0;
            for (int i = 0; i < GROUP; i++)
                dot += row[g * GROUP + i] * a->xq[g * GROUP + i];
            acc += a->dx[g] * (float)dot;
        }
        y[r] = acc * bf16(scale[r]);
    }
}

__attribute__((target("avx2,fma")))
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma")))
static inline __m256 dot8(__m256i w, __m256i x, __m256 d, __m256 acc) {
    /* int8 x int8 as maddubs(|w|, sign(x, w)), pairs summed to int32, scaled by the group's d */
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1))), d, acc);
}

__attribute__((target("avx2,fma")))
static void rows8_avx2(const act_t *a, const int8_t *q, const uint16_t *scale, int64_t r0,
                       int64_t r1, float *y) {
    /* 4 rows at a time (each group of x loaded once), then one by one */
    int64_t k = a->k, r = r0;
    for (; r + 4 <= r1; r += 4) {
        __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
        const int8_t *w = q + r * k;
        for (int64_t c = 0; c < k; c += GROUP) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(a->xq + c));
            __m256 d = _mm256_set1_ps(a->dx[c / GROUP]);
            c0 = dot8(_mm256_loadu_si256((const __m256i *)(w + c)), x, d, c0);
            c1 = dot8(_mm256_loadu_si256((const __m256i *)(w + k + c)), x, d, c1);
            c2 = dot8(_mm256_loadu_si256((const __m256i *)(w + 2 * k + c)), x, d, c2);
            c3 = dot8(_mm256_loadu_si256((const __m256i *)(w + 3 * k + c)), x, d, c3);
        }
        y[r] = hsum(c0) * bf16(scale[r]);
        y[r + 1] = hsum(c1) * bf16(scale[r + 1]);
        y[r + 2] = hsum(c2) * bf16(scale[r + 2]);
        y[r + 3] = hsum(c3) * bf16(scale[r + 3]);
    }
    for (; r < r1; r++) {
        __m256 c0 = _mm256_setzero_ps();
        for (int64_t c = 0; c < k; c += GROUP)
            c0 = dot8(_mm256_loadu_si256((const __m256i *)(q + r * k + c)),
                      _mm256_loadu_si256((const __m256i *)(a->xq + c)),
                      _mm256_set1_ps(a->dx[c / GROUP]), c0);
        y[r] = hsum(c0) * bf16(scale[r]);
    }
}

/* ---- AVX-512 VNNI (256-bit, AVX512VL): row blocks of 64 ----
   vpdpbusd sums 4 u8 x s8 products into an int32 lane, so a lane must hold 4 consecutive
   columns of one row: two unpack levels turn columns c..c+3 (32 bytes each) into quads, lane
   by lane [rows 0-3 | 16-19], [4-7 | 20-23], [8-11 | 24-27], [12-15 | 28-31] (low nibbles;
   the high ones are the same rows + 32). The int32 sums never overflow (32 * 15 * 127), so a
   whole group is summed before it is scaled; two activation rows share the unpacking. */

__attribute__((target("avx2,fma")))
static inline void quads(const uint8_t *p, __m256i q[4]) {
    /* columns c..c+3 (32 bytes each at p) -> 4 bytes per int32 lane, one row's 4 columns:
       q[0] rows [0-3 | 16-19], q[1] [4-7 | 20-23], q[2] [8-11 | 24-27], q[3] [12-15 | 28-31]
       (low nibbles; the high ones are the same rows + 32) */
    __m256i v0 = _mm256_loadu_si256((const __m256i *)p);
    __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + 32));
    __m256i v2 = _mm256_loadu_si256((const __m256i *)(p + 64));
    __m256i v3 = _mm256_loadu_si256((const __m256i *)(p + 96));
    __m256i l01 = _mm256_unpacklo_epi8(v0, v1), h01 = _mm256_unpackhi_epi8(v0, v1);
    __m256i l23 = _mm256_unpacklo_epi8(v2, v3), h23 = _mm256_unpackhi_epi8(v2, v3);
    q[0] = _mm256_unpacklo_epi16(l01, l23);
    q[1] = _mm256_unpackhi_epi16(l01, l23);
    q[2] = _mm256_unpacklo_epi16(h01, h23);
    q[3] = _mm256_unpackhi_epi16(h01, h23);
}

__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))
static inline __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))
static inline void flush_vnni(const act_t *a, int64_t g, const uint16_t *sz, int sym,
                              int64_t n, int64_t r, const __m256i *acc, float *out) {
    /* acc[0..3] rows {0-3|16-19}, {4-7|20-23}, {8-11|24-27}, {12-15|28-31}; acc[4..7] + 32 */
    float dx = a->dx[g], sq = (float)a->sq[g];
    __m256 va = _mm256_set1_ps(dx), b8 = _mm256_set1_ps(8.f * dx * sq),
           bz = _mm256_set1_ps(dx * sq);
    for (int h = 0; h < 2; h++) {
        const __m256i *c = acc + 4 * h;
        int64_t o = 32 * h;
        __m256i d[4] = {_mm256_permute2x128_si256(c[0], c[1], 0x20),   /* rows o + 0-7 */
                        _mm256_permute2x128_si256(c[2], c[3], 0x20),   /* 8-15 */
                        _mm256_permute2x128_si256(c[0], c[1], 0x31),   /* 16-23 */
                        _mm256_permute2x128_si256(c[2], c[3], 0x31)};  /* 24-31 */
        for (int i = 0; i < 4; i++) {
            float *yo = out + o + 8 * i;
            _mm256_storeu_ps(yo, scale8g(sz, sym, g, n, r + o + 8 * i,
                                         _mm256_cvtepi32_ps(d[i]), va, b8, bz,
                                         _mm256_loadu_ps(yo)));
        }
    }
}

/* rows [r, r + 64) of M (1 or 2) activation rows, y rows `ys` apart */
__attribute__((always_inline, target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))
static inline void block64_vnni_m(const act_t *a, const int M, const uint8_t *blk,
                                  const uint16_t *sz, int sym, int64_t n, int64_t r, float *y,
                                  int64_t ys) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    int64_t groups = a[0].k / GROUP;
    for (int m = 0; m < M; m++)
        for (int i = 0; i < 64; i++)
            y[m * ys + r + i] = 0.f;
    for (int64_t g = 0; g < groups; g++) {
        __m256i acc[2][8];
        for (int m = 0; m < M; m++)
            for (int i = 0; i < 8; i++)
                acc[m][i] = _mm256_setzero_si256();
        const uint8_t *p = blk + g * GROUP * 32;
        for (int c = 0; c < GROUP; c += 4, p += 128) {
            __m256i q[4], w[8];
            quads(p, q);
            for (int i = 0; i < 4; i++) {
                w[i] = _mm256_and_si256(q[i], m4);
                w[4 + i] = _mm256_and_si256(_mm256_srli_epi16(q[i], 4), m4);
            }
            for (int m = 0; m < M; m++) {
                __m256i x = bcast4(a[m].xq + g * GROUP + c);
                for (int i = 0; i < 8; i++)
                    acc[m][i] = _mm256_dpbusd_epi32(acc[m][i], w[i], x);
            }
        }
        for (int m = 0; m < M; m++)
            flush_vnni(&a[m], g, sz, sym, n, r, acc[m], y + m * ys + r);
    }
}

/* Prompts: a block's weights are unpacked once into 512-bit quads of 16 rows in order (64
   rows x K bytes, L2-sized for K <= 8192) that every activation row then reads with one
   vpdpbusd per 16 rows x 4 columns, its 64 sums kept in registers. */
#define UNPACK_MIN_ROWS 4

__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))
static void unpack64(const uint8_t *blk, int64_t k, __m512i *buf) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const uint8_t *p = blk;
    for (int64_t c = 0; c < k; c += 4, p += 128, buf += 4) {
        __m256i q[4];
        quads(p, q);
        /* quads [0-3 | 16-19] [4-7 | 20-23] as one register, [8-11 | 24-27] [12-15 | 28-31]
           as another, then lanes reordered into rows 0-15 and 16-31 */
        __m512i a = _mm512_inserti64x4(_mm512_castsi256_si512(q[0]), q[1], 1);
        __m512i b = _mm512_inserti64x4(_mm512_castsi256_si512(q[2]), q[3], 1);
        __m512i r0 = _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(2, 0, 2, 0));
        __m512i r1 = _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(3, 1, 3, 1));
        _mm512_store_si512(buf, _mm512_and_si512(r0, m4));                              /* 0-15 */
        _mm512_store_si512(buf + 1, _mm512_and_si512(r1, m4));                          /* 16-31 */
        _mm512_store_si512(buf + 2, _mm512_and_si512(_mm512_srli_epi16(r0, 4), m4));  /* 32-47 */
        _mm512_store_si512(buf + 3, _mm512_and_si512(_mm512_srli_epi16(r1, 4), m4));  /* 48-63 */
    }
}

/* M (1 to 3) activation rows on an unpacked block: each weight register serves them all */
__attribute__((always_inline, target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))
static inline void block64_vnni_unpacked(const act_t *a, const int M, const __m512i *buf,
                                         const uint16_t *sz, int sym, int64_t n, int64_t r,
                                         float *y) {
    __m512 yv[3][4];
    for (int m = 0; m < M; m++)
        for (int i = 0; i < 4; i++)
            yv[m][i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < a->k / GROUP; g++) {
        __m512i acc[3][4];
        for (int m = 0; m < M; m++)
            for (int i = 0; i < 4; i++)
                acc[m][i] = _mm512_setzero_si512();
        const __m512i *w = buf + g * 32;
        for (int c = 0; c < GROUP; c += 4, w += 4) {
            __m512i x[3];
            for (int m = 0; m < M; m++) {
                int32_t x4;
                memcpy(&x4, a[m].xq + g * GROUP + c, 4);
                x[m] = _mm512_set1_epi32(x4);
            }
            for (int i = 0; i < 4; i++) {
                __m512i wi = _mm512_load_si512(w + i);
                for (int m = 0; m < M; m++)
                    acc[m][i] = _mm512_dpbusd_epi32(acc[m][i], wi, x[m]);
            }
        }
        for (int i = 0; i < 4; i++) {  /* 16 rows' (scale, zero) bf16 pairs, or scales alone */
            __m512i v = sym ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                  (const __m256i *)(sz + g * n + r + 16 * i)))
                            : _mm512_loadu_si512((const void *)(sz + (g * n + r) * 2 + 32 * i));
            __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            __m512 z = sym ? _mm512_setzero_ps() : _mm512_castsi512_ps(
                                 _mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000)));
            for (int m = 0; m < M; m++) {
                float dx = a[m].dx[g], sq = (float)a[m].sq[g];
                __m512 dot = _mm512_fmsub_ps(_mm512_set1_ps(dx), _mm512_cvtepi32_ps(acc[m][i]),
                                             _mm512_set1_ps(8.f * dx * sq));
                yv[m][i] = _mm512_fmadd_ps(z, _mm512_set1_ps(dx * sq),
                                           _mm512_fmadd_ps(sc, dot, yv[m][i]));
            }
        }
    }
    for (int m = 0; m < M; m++)
        for (int i = 0; i < 4; i++)
            _mm512_storeu_ps(y + m * n + r + 16 * i, yv[m][i]);
}

__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))
static void rows_vnni(const act_t *a, int64_t m, const uint8_t *packed, const uint16_t *sz,
                      int sym, int64_t n, int64_t b0, int64_t b1, float *y) {
    /* blocks [b0, b1) of 64 rows for all m activation rows: two at a time from the packed
       bytes, or, for prompts, every row from the block unpacked once (a buffer per thread) */
    static __thread __m512i *buf;
    static __thread int64_t buf_k;  /* the K it holds a block of */
    int64_t k = a[0].k;
    if (m >= UNPACK_MIN_ROWS && buf_k < k) {
        free(buf);
        buf = aligned_alloc(64, (size_t)k * 64);
        buf_k = buf ? k : 0;
    }
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *blk = packed + b * k * 32;
        int64_t i = 0;
        if (m >= UNPACK_MIN_ROWS && buf) {
            unpack64(blk, k, buf);
            for (; i + 3 <= m; i += 3)
                block64_vnni_unpacked(a + i, 3, buf, sz, sym, n, b * 64, y + i * n);
            if (m - i == 2)
                block64_vnni_unpacked(a + i, 2, buf, sz, sym, n, b * 64, y + i * n);
            else if (m - i == 1)
                block64_vnni_unpacked(a + i, 1, buf, sz, sym, n, b * 64, y + i * n);
            continue;
        }
        for (; i + 2 <= m; i += 2)
            block64_vnni_m(a + i, 2, blk, sz, sym, n, b * 64, y + i * n, n);
        if (i < m)
            block64_vnni_m(a + i, 1, blk, sz, sym, n, b * 64, y + i * n, n);
    }
}

__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))
static void rows8_vnni(const act_t *a, const int8_t *q, const uint16_t *scale, int64_t r0,
                       int64_t r1, float *y) {
    /* int8 rows, two groups per 512-bit register: w ^ 0x80 = w + 128 as u8, so a group's sum
       is sum(w x) + 128 S[g], and sum over g of dx[g] * 128 * S[g] is the same for every row
       (taken off once); each int32 lane is scaled by its group's dx (dv: dx[g] x 8, g x 8) */
    int64_t k = a->k, r = r0;
    if (k % 64) {
        rows8_avx2(a, q, scale, r0, r1, y);
        return;
    }
    float *dv = aligned_alloc(64, (size_t)k / 4 * sizeof(float) + 64);
    if (!dv) {
        rows8_avx2(a, q, scale, r0, r1, y);
        return;
    }
    float off = 0.f;
    for (int64_t g = 0; g < k / GROUP; g++) {
        off += a->dx[g] * 128.f * (float)a->sq[g];
        for (int i = 0; i < 8; i++)
            dv[g * 8 + i] = a->dx[g];
    }
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i z = _mm512_setzero_si512();
    for (; r + 4 <= r1; r += 4) {
        __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
        const int8_t *w = q + r * k;
        for (int64_t c = 0; c < k; c += 64) {
            __m512i x = _mm512_loadu_si512((const void *)(a->xq + c));
            __m512 d = _mm512_load_ps(dv + c / 4);
#define DOT16(acc, row) acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, \
            _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + (row) * k + c)), flip), x)), \
            d, acc)
            DOT16(c0, 0);
            DOT16(c1, 1);
            DOT16(c2, 2);
            DOT16(c3, 3);
#undef DOT16
        }
        y[r] = (_mm512_reduce_add_ps(c0) - off) * bf16(scale[r]);
        y[r + 1] = (_mm512_reduce_add_ps(c1) - off) * bf16(scale[r + 1]);
        y[r + 2] = (_mm512_reduce_add_ps(c2) - off) * bf16(scale[r + 2]);
        y[r + 3] = (_mm512_reduce_add_ps(c3) - off) * bf16(scale[r + 3]);
    }
    free(dv);
    if (r < r1)
        rows8_avx2(a, q, scale, r, r1, y);
}

/* ---- the pool ---- */

#define MAX_MATS 4  /* matrices one call computes on the same activations (q|k|v, gate|up) */

typedef struct {
    const uint8_t *packed;
    const uint16_t *sz;  /* q4: scales and zeros; q8: the rows' scales */
    int64_t n;           /* rows */
    float *y;            /* [m, n] */
    int64_t first;       /* its first block among the job's */
    int sym;             /* q4: sz holds scales alone [K/32, N], the zeros all 0 */
} mat_t;

typedef struct job job_t;
struct job {
    void (*fn)(const job_t *j, int64_t b0, int64_t b1);  /* blocks [b0, b1) of rows */
    const act_t *acts;
    int64_t m;
    mat_t mats[MAX_MATS];
    int nmat;
    int bn;              /* q4: rows per block; q8: rows per block of work */
    int isa;             /* ISA_SCALAR, ISA_AVX2 or ISA_VNNI */
    int threads;         /* as asked */
    int64_t blocks;      /* all the matrices' */
    const void *ctx;     /* what a job other than a product reads (attn_t) */
};

static int vnni_rows(const job_t *j) {
    /* Measured on a Zen 5 core ([1, 2048] x [8192, 2048]): one activation row on the VNNI
       path is ~10% faster than AVX2 on one thread, but on two it stays at one thread's rate
       (0.30-0.32 ms against AVX2's 0.22-0.25; two rows scale), so a lone row on several
       threads goes to the AVX2 path. */
    return j->isa == ISA_VNNI && j->bn == 64 && (j->m > 1 || j->threads == 1);
}

static void q4_range(const job_t *j, const mat_t *t, int64_t b0, int64_t b1) {
    if (vnni_rows(j)) {
        rows_vnni(j->acts, j->m, t->packed, t->sz, t->sym, t->n, b0, b1, t->y);
        return;
    }
    for (int64_t b = b0; b < b1; b++)  /* each row block once from RAM, for every row of x */
        for (int64_t m = 0; m < j->m; m++) {
            const act_t *a = &j->acts[m];
            float *y = t->y + m * t->n;
            if (j->isa != ISA_SCALAR)
                rows_avx2(a, t->packed, t->sz, t->sym, t->n, j->bn, b * j->bn, (b + 1) * j->bn,
                          y);
            else
                rows_scalar(a, t->packed, t->sz, t->sym, t->n, j->bn, b * j->bn,
                            (b + 1) * j->bn, y);
        }
}

static void q4_blocks(const job_t *j, int64_t b0, int64_t b1) {
    for (int i = 0; i < j->nmat; i++) {  /* the part of [b0, b1) in each matrix */
        const mat_t *t = &j->mats[i];
        int64_t end = t->first + t->n / j->bn;
        int64_t lo = b0 > t->first ? b0 : t->first, hi = b1 < end ? b1 : end;
        if (lo < hi)
            q4_range(j, t, lo - t->first, hi - t->first);
    }
}

static void q8_blocks(const job_t *j, int64_t b0, int64_t b1) {
    const mat_t *t = &j->mats[0];
    int64_t r0 = b0 * j->bn, r1 = b1 * j->bn < t->n ? b1 * j->bn : t->n;
    for (int64_t m = 0; m < j->m; m++) {
        float *y = t->y + m * t->n;
        if (j->isa == ISA_VNNI)
            rows8_vnni(&j->acts[m], (const int8_t *)t->packed, t->sz, r0, r1, y);
        else if (j->isa == ISA_AVX2)
            rows8_avx2(&j->acts[m], (const int8_t *)t->packed, t->sz, r0, r1, y);
        else
            rows8_scalar(&j->acts[m], (const int8_t *)t->packed, t->sz, r0, r1, y);
    }
}

static void run_part(const job_t *j, int part, int parts) {
    int64_t b0 = j->blocks * part / parts, b1 = j->blocks * (part + 1) / parts;
    if (b0 < b1)
        j->fn(j, b0, b1);
}

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int workers;                  /* threads besides the caller */
    const job_t *job;
    int parts;
    volatile uint64_t generation; /* bumped per job */
    volatile int pending;         /* workers not done with this generation */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, NULL, 1, 0, 0};

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

#define SPIN_US 50  /* a worker polls this long for the next call before it sleeps: a token's
                      calls come tens of us apart, and a sleeping worker took longer to wake
                      (1B shape, 2 threads: 10 tok/s sleeping at once, 14-15 polling 50 us) */

typedef struct {
    int id;         /* 1..workers */
    uint64_t seen;  /* the generation when it was made: it runs only later ones */
} start_t;

static void *worker(void *arg) {
    start_t st = *(start_t *)arg;
    free(arg);
    int id = st.id;
    uint64_t seen = st.seen;
    for (;;) {
        double until = now_us() + SPIN_US;
        for (int i = 0; __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE) == seen; i++) {
            _mm_pause();
            if (i % 256 == 0 && now_us() > until)
                break;
        }
        if (__atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE) == seen) {
            pthread_mutex_lock(&pool.mu);
            while (pool.generation == seen)
                pthread_cond_wait(&pool.cv, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE);
        if (id < pool.parts)
            run_part(pool.job, id, pool.parts);
        __atomic_sub_fetch(&pool.pending, 1, __ATOMIC_ACQ_REL);
    }
    return NULL;
}

static int ensure_workers(int threads) {
    while (pool.workers < threads - 1 && pool.workers < MAX_THREADS - 1) {
        pthread_t t;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        start_t *st = malloc(sizeof(start_t));
        if (!st)
            break;
        st->id = pool.workers + 1;
        st->seen = pool.generation;
        if (pthread_create(&t, &at, worker, st) != 0) {
            free(st);
            pthread_attr_destroy(&at);
            break;
        }
        pthread_attr_destroy(&at);
        pool.workers++;
    }
    return pool.workers + 1;
}

static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;  /* one pooled call at a time */

static void run(const job_t *j, int threads) {
    int parts = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    if (parts > j->blocks)
        parts = (int)j->blocks;
    if (parts <= 1) {
        run_part(j, 0, 1);
        return;
    }
    pthread_mutex_lock(&call_mu);
    parts = ensure_workers(parts);
    pool.job = j;
    pool.parts = parts;
    __atomic_store_n(&pool.pending, pool.workers, __ATOMIC_RELEASE);
    pthread_mutex_lock(&pool.mu);
    __atomic_add_fetch(&pool.generation, 1, __ATOMIC_ACQ_REL);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    run_part(j, 0, parts);
    while (__atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0)
        _mm_pause();
    pthread_mutex_unlock(&call_mu);
}

/* ---- Python ---- */

static int have_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static int have_vnni(void) {  /* libgcc also checks that the OS saves the AVX-512 state */
    return have_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
           && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}

/* x f32 [m, k] -> m act_t in one buffer (*buf, freed by the caller); patterns for q4 AVX2 */
static act_t *prepare(const float *x, long long m, long long k, int patterns, uint8_t **buf) {
    act_t *acts = calloc((size_t)m, sizeof(act_t));
    size_t per = (size_t)k + (size_t)(k / GROUP) * 8 + (patterns ? (size_t)k * 8 : 0);
    *buf = aligned_alloc(64, (per * (size_t)m + 63) / 64 * 64 + 64);
    if (!acts || !*buf) {
        free(acts);
        free(*buf);
        return NULL;
    }
    uint8_t *at = *buf;
    for (long long i = 0; i < m; i++) {
        act_t *a = &acts[i];
        a->k = k;
        a->pat = patterns ? at : NULL;
        at += patterns ? (size_t)k * 8 : 0;
        a->dx = (float *)at;
        at += (size_t)(k / GROUP) * 4;
        a->sq = (int32_t *)at;
        at += (size_t)(k / GROUP) * 4;
        a->xq = (int8_t *)at;
        at += (size_t)k;
        quantize(x + i * k, a);
    }
    return acts;
}

static PyObject *call(job_t *j, const float *x, long long k, int patterns, int threads) {
    uint8_t *buf = NULL;
    act_t *acts;
    Py_BEGIN_ALLOW_THREADS
    acts = prepare(x, j->m, k, patterns, &buf);
    if (acts) {
        j->acts = acts;
        run(j, threads);
    }
    Py_END_ALLOW_THREADS
    if (!acts)
        return PyErr_NoMemory();
    free(buf);
    free(acts);
    Py_RETURN_NONE;
}

static int gemm_run(const float *x, int64_t m, int64_t k, const mat_t *mats, int count, int bn,
                    int isa, int threads) {
    /* q4 products of the same x [m, k] with `count` matrices, in one pooled call; 0: no memory.
       Call it without the GIL. */
    job_t j = {q4_blocks, NULL, m, {{0}}, count, bn, isa, threads, 0};
    for (int i = 0; i < count; i++) {
        j.mats[i] = mats[i];
        j.mats[i].first = j.blocks;
        j.blocks += mats[i].n / bn;
    }
    uint8_t *buf = NULL;
    /* the AVX2 stripes read column-pair patterns; the VNNI path broadcasts xq */
    act_t *acts = prepare(x, m, k, isa != ISA_SCALAR && !vnni_rows(&j), &buf);
    if (!acts)
        return 0;
    j.acts = acts;
    run(&j, threads);
    free(buf);
    free(acts);
    return 1;
}

static int check_cpu(int isa) {
    if (isa < ISA_SCALAR || isa > ISA_VNNI) {
        PyErr_SetString(PyExc_ValueError, "q4: isa is 0 (scalar), 1 (AVX2) or 2 (AVX-512 VNNI)");
        return 0;
    }
    if ((isa == ISA_AVX2 && !have_avx2()) || (isa == ISA_VNNI && !have_vnni())) {
        PyErr_SetString(PyExc_RuntimeError, isa == ISA_AVX2 ? "q4: this CPU has no AVX2/FMA"
                                                            : "q4: this CPU has no AVX-512 VNNI");
        return 0;
    }
    return 1;
}

/* A matrix (packed, sz, n[, sym]) for `layer` and `experts`; sym: sz holds scales alone. */
static int parse_mat(PyObject *t, mat_t *w) {
    unsigned long long pp, zp;
    long long n;
    int sym = 0;
    if (!PyArg_ParseTuple(t, "KKL|i", &pp, &zp, &n, &sym))
        return 0;
    *w = (mat_t){(const uint8_t *)(uintptr_t)pp, (const uint16_t *)(uintptr_t)zp, n, NULL, 0, sym};
    return 1;
}

/* gemm(x, m, k, mats, bn, threads, isa): mats a sequence of 1 to MAX_MATS (packed, sz, n, y
   [, sym]) on the same x, all in one pooled call; addresses as ints (the caller checks shapes,
   dtypes and contiguity). x f32 [m, k], each y f32 [m, n]; sym: sz is bf16 scales alone
   [K/32, N] (zeros 0), else (scale, zero) pairs [K/32, N, 2]. */
static PyObject *py_gemm(PyObject *self, PyObject *args) {
    unsigned long long xp;
    long long m, k;
    int bn, threads, isa;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "KLLOiii", &xp, &m, &k, &seq, &bn, &threads, &isa))
        return NULL;
    if (k % GROUP || (bn != 32 && bn != 64) || m < 1) {
        PyErr_SetString(PyExc_ValueError, "q4 gemm: K % 32, BN 32 or 64 and M >= 1");
        return NULL;
    }
    if (!check_cpu(isa))
        return NULL;
    mat_t mats[MAX_MATS];
    PyObject *fast = PySequence_Fast(seq, "q4 gemm: mats is a sequence of (packed, sz, n, y)");
    if (!fast)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fast);
    if (count < 1 || count > MAX_MATS) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "q4 gemm: 1 to 4 matrices");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned long long pp, sp, yp;
        long long n;
        int sym = 0;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KKLK|i", &pp, &sp, &n, &yp,
                              &sym)) {
            Py_DECREF(fast);
            return NULL;
        }
        if (n < bn || n % bn) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "q4 gemm: N % BN (32 or 64)");
            return NULL;
        }
        mats[i] = (mat_t){(const uint8_t *)(uintptr_t)pp, (const uint16_t *)(uintptr_t)sp, n,
                          (float *)(uintptr_t)yp, 0, sym};
    }
    Py_DECREF(fast);
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = gemm_run((const float *)(uintptr_t)xp, m, k, mats, (int)count, bn, isa, threads);
    Py_END_ALLOW_THREADS
    if (!ok)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* gemm8(x, m, k, q, scale, n, y, threads, isa): int8 rows q [n, k], bf16 scale [n]. */
static PyObject *py_gemm8(PyObject *self, PyObject *args) {
    unsigned long long xp, qp, sp, yp;
    long long m, k, n;
    int threads, isa;
    if (!PyArg_ParseTuple(args, "KLLKKLKii", &xp, &m, &k, &qp, &sp, &n, &yp, &threads, &isa))
        return NULL;
    if (k % GROUP || n < 1 || m < 1) {
        PyErr_SetString(PyExc_ValueError, "q8 gemm: K % 32, N >= 1 and M >= 1");
        return NULL;
    }
    if (!check_cpu(isa))
        return NULL;
    const int rows = 64;  /* rows per block of work */
    job_t j = {q8_blocks, NULL, m, {{(const uint8_t *)(uintptr_t)qp,
               (const uint16_t *)(uintptr_t)sp, n, (float *)(uintptr_t)yp, 0}}, 1, rows, isa,
               threads, (n + rows - 1) / rows};
    return call(&j, (const float *)(uintptr_t)xp, k, 0, threads);
}

/* ---- one dense decoder layer at decode (one position, every weight resident in q4) ----
   x += o(attention(rope(q|k|v(norm1 x)))); x += down(silu(gate h) * up h), h = norm2 x: the
   same arithmetic as the torch modules (the kernels above, f32 elsewhere), in one call, so a
   token pays no Python or torch op between a layer's kernels. The KV cache is f16 or f32
   [Hkv, cap, D]; this position's k and v are written at `pos`. */

static void rmsnorm(const float *x, const float *w, double eps, int64_t d, float *out) {
    float ss = 0.f;
    for (int64_t i = 0; i < d; i++)
        ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / (float)d + (float)eps);
    for (int64_t i = 0; i < d; i++)
        out[i] = w[i] * (x[i] * r);
}

static void rope(float *v, int heads, int dh, const float *cos, const float *sin) {
    /* HF's rotate-half: v * cos + cat(-v2, v1) * sin, per head */
    int half = dh / 2;
    for (int h = 0; h < heads; h++, v += dh)
        for (int i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
}

__attribute__((target("avx2,fma")))
static inline __m256 exp8(__m256 x) {
    /* e^x as 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2], p of degree 6 (Cephes' expf
       coefficients): within 2 ulp of expf, as torch's vectorized exp is */
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)),
                      _mm256_set1_ps(-87.3365447504f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                                  23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma")))
static void silu_mul(float *g, const float *u, int64_t n) {  /* g = g / (1 + e^-g) * u */
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f),
                                   exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, den), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++)
        g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

__attribute__((target("avx2,fma,f16c")))
static inline __m256 load8(const void *base, int f16, int64_t i) {
    if (f16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)));
    return _mm256_loadu_ps((const float *)base + i);
}

__attribute__((target("avx2,fma,f16c")))
static void put_kv(void *cache, int f16, int64_t cap, int64_t pos, const float *v, int heads,
                   int dh) {
    for (int h = 0; h < heads; h++) {
        int64_t at = ((int64_t)h * cap + pos) * dh;
        for (int i = 0; i < dh; i += 8) {
            __m256 x = _mm256_loadu_ps(v + h * dh + i);
            if (f16)
                _mm_storeu_si128((__m128i *)((uint16_t *)cache + at + i),
                                 _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
            else
                _mm256_storeu_ps((float *)cache + at + i, x);
        }
    }
}

typedef struct {  /* one position's attention over the cache: the pool splits the heads */
    const float *q;
    const void *kc, *vc;
    int f16;
    int64_t cap, len;
    int heads, kv_heads, dh;
    float *out, *s;  /* out [H * D]; s: len scores per head */
} attn_t;

__attribute__((target("avx2,fma,f16c")))
static void attend(const job_t *j, int64_t h0, int64_t h1) {
    /* softmax(q k^T / sqrt(D)) v for heads [h0, h1), head h on kv head h / (H / Hkv) */
    const attn_t *a = j->ctx;
    float scale = 1.f / sqrtf((float)a->dh);
    int dh = a->dh, group = a->heads / a->kv_heads;
    for (int64_t h = h0; h < h1; h++) {
        int64_t base = (h / group) * a->cap * dh, len = a->len;
        const float *qh = a->q + h * dh;
        float *s = a->s + h * len, mx = -INFINITY;
        for (int64_t t = 0; t < len; t++) {
            __m256 acc = _mm256_setzero_ps();
            for (int i = 0; i < dh; i += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i),
                                      load8(a->kc, a->f16, base + t * dh + i), acc);
            s[t] = hsum(acc) * scale;
            mx = s[t] > mx ? s[t] : mx;
        }
        __m256 vsum = _mm256_setzero_ps(), vmx = _mm256_set1_ps(mx);
        int64_t t = 0;
        for (; t + 8 <= len; t += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmx));
            _mm256_storeu_ps(s + t, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum(vsum);
        for (; t < len; t++) {
            s[t] = expf(s[t] - mx);
            sum += s[t];
        }
        __m256 acc[32];  /* D <= 256, checked by the caller */
        for (int i = 0; i < dh / 8; i++)
            acc[i] = _mm256_setzero_ps();
        for (t = 0; t < len; t++) {  /* each value row read once */
            __m256 p = _mm256_set1_ps(s[t]);
            for (int i = 0; i < dh / 8; i++)
                acc[i] = _mm256_fmadd_ps(p, load8(a->vc, a->f16, base + t * dh + 8 * i), acc[i]);
        }
        __m256 inv = _mm256_set1_ps(1.f / sum);
        for (int i = 0; i < dh / 8; i++)
            _mm256_storeu_ps(a->out + h * dh + 8 * i, _mm256_mul_ps(acc[i], inv));
    }
}

static int have_f16c(void) {
    __builtin_cpu_init();
    return have_avx2() && __builtin_cpu_supports("f16c");
}

/* layer(x, d, norm1, norm2, eps, mats, H, Hkv, D, F, cos, sin, kcache, vcache, f16, cap, pos,
         bn, threads, isa, h2): mats = 7 (packed, sz, n) for q, k, v, o, gate, up, down; x f32
   [d] updated in place; cos, sin f32 [D]. With 4 mats (q, k, v, o: an MoE layer) it stops
   after attention's residual and writes norm2(x) to h2 [d] for the router and `experts`. */
static PyObject *py_layer(PyObject *self, PyObject *args) {
    unsigned long long xp, n1p, n2p, cp, sp, kp, vp;
    long long d, ff, cap, pos;
    double eps;
    int heads, kvh, dh, f16, bn, threads, isa;
    unsigned long long h2p = 0;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "KLKKdOiiiLKKKKiLLiii|K", &xp, &d, &n1p, &n2p, &eps, &seq,
                          &heads, &kvh, &dh, &ff, &cp, &sp, &kp, &vp, &f16, &cap, &pos, &bn,
                          &threads, &isa, &h2p))
        return NULL;
    if (!check_cpu(isa))
        return NULL;
    if (isa == ISA_SCALAR || !have_f16c()) {
        PyErr_SetString(PyExc_RuntimeError, "q4 layer: needs AVX2, FMA and F16C");
        return NULL;
    }
    mat_t w[7];
    PyObject *fast = PySequence_Fast(seq, "q4 layer: mats is 7 (packed, sz, n)");
    if (!fast)
        return NULL;
    int count = (int)PySequence_Fast_GET_SIZE(fast);
    int ok = count == 7 || (count == 4 && h2p);
    if (count == 4)
        ff = 0;
    for (int i = 0; ok && i < count; i++) {
        ok = parse_mat(PySequence_Fast_GET_ITEM(fast, i), &w[i]);
        ok = ok && w[i].n >= bn && w[i].n % bn == 0;
    }
    Py_DECREF(fast);
    int64_t hd = (int64_t)heads * dh, kd = (int64_t)kvh * dh;
    if (!ok || heads % kvh || dh % 8 || dh > 256 || d % GROUP || hd % GROUP || ff % GROUP || pos >= cap
        || w[0].n != hd || w[1].n != kd || w[2].n != kd || w[3].n != d
        || (count == 7 && (w[4].n != ff || w[5].n != ff || w[6].n != d))
        || (bn != 32 && bn != 64)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "q4 layer: shapes do not fit");
        return NULL;
    }
    float *x = (float *)(uintptr_t)xp, *cos = (float *)(uintptr_t)cp, *sin = (float *)(uintptr_t)sp;
    const float *n1 = (const float *)(uintptr_t)n1p, *n2 = (const float *)(uintptr_t)n2p;
    void *kc = (void *)(uintptr_t)kp, *vc = (void *)(uintptr_t)vp;
    int64_t wide = d > ff ? d : ff;
    size_t floats = (size_t)(wide + hd + 2 * kd + hd + d + 2 * ff + heads * (pos + 1) + 64);
    float *arena = malloc(floats * sizeof(float));
    if (!arena)
        return PyErr_NoMemory();
    float *h = arena, *q = h + wide, *k = q + hd, *v = k + kd, *att = v + kd, *y = att + hd,
          *g = y + d, *u = g + ff, *s = u + ff;
    ok = 1;
    Py_BEGIN_ALLOW_THREADS
    rmsnorm(x, n1, eps, d, h);
    w[0].y = q, w[1].y = k, w[2].y = v;
    ok = ok && gemm_run(h, 1, d, w, 3, bn, isa, threads);
    if (ok) {
        rope(q, heads, dh, cos, sin);
        rope(k, kvh, dh, cos, sin);
        put_kv(kc, f16, cap, pos, k, kvh, dh);
        put_kv(vc, f16, cap, pos, v, kvh, dh);
        attn_t at = {q, kc, vc, f16, cap, pos + 1, heads, kvh, dh, att, s};
        job_t aj = {attend, NULL, 1, {{0}}, 0, 1, isa, threads, heads, &at};
        run(&aj, threads);
        w[3].y = y;
        ok = gemm_run(att, 1, hd, w + 3, 1, bn, isa, threads);
    }
    if (ok) {
        for (int64_t i = 0; i < d; i++)
            x[i] += y[i];
        rmsnorm(x, n2, eps, d, count == 4 ? (float *)(uintptr_t)h2p : h);
    }
    if (ok && count == 7) {
        w[4].y = g, w[5].y = u;
        ok = gemm_run(h, 1, d, w + 4, 2, bn, isa, threads);
    }
    if (ok && count == 7) {
        silu_mul(g, u, ff);
        w[6].y = y;
        ok = gemm_run(g, 1, ff, w + 6, 1, bn, isa, threads);
    }
    if (ok && count == 7)
        for (int64_t i = 0; i < d; i++)
            x[i] += y[i];
    Py_END_ALLOW_THREADS
    free(arena);
    if (!ok)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* experts(x, h, d, experts, F, bn, threads, isa): experts a sequence of (weight, gate, up,
   down), each matrix (packed, sz, n): x += sum of weight * down(silu(gate h) * up h), the MoE
   half of a layer after `layer` stopped at attention. */
static PyObject *py_experts(PyObject *self, PyObject *args) {
    unsigned long long xp, hp;
    long long d, ff;
    int bn, threads, isa;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "KKLOLiii", &xp, &hp, &d, &seq, &ff, &bn, &threads, &isa))
        return NULL;
    if (!check_cpu(isa))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "q4 experts: a sequence of (weight, gate, up, down)");
    if (!fast)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fast);
    int ok = count >= 1 && count <= 8 && d % GROUP == 0 && ff % GROUP == 0
             && (bn == 32 || bn == 64);
    float wt[8];
    mat_t w[8][3];
    for (Py_ssize_t e = 0; ok && e < count; e++) {
        PyObject *m[3];
        ok = PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, e), "fOOO", &wt[e], &m[0], &m[1],
                              &m[2]);
        for (int i = 0; ok && i < 3; i++)
            ok = parse_mat(m[i], &w[e][i]) && w[e][i].n % bn == 0;
        ok = ok && w[e][0].n == ff && w[e][1].n == ff && w[e][2].n == d;
    }
    Py_DECREF(fast);
    if (!ok) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "q4 experts: shapes do not fit");
        return NULL;
    }
    float *x = (float *)(uintptr_t)xp;
    const float *h = (const float *)(uintptr_t)hp;
    float *arena = malloc((size_t)(2 * ff + d + 16) * sizeof(float));
    if (!arena)
        return PyErr_NoMemory();
    float *g = arena, *u = g + ff, *y = u + ff;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t e = 0; ok && e < count; e++) {
        w[e][0].y = g, w[e][1].y = u, w[e][2].y = y;
        ok = gemm_run(h, 1, d, w[e], 2, bn, isa, threads);
        if (ok) {
            silu_mul(g, u, ff);
            ok = gemm_run(g, 1, ff, w[e] + 2, 1, bn, isa, threads);
        }
        if (ok)
            for (int64_t i = 0; i < d; i++)
                x[i] += wt[e] * y[i];
    }
    Py_END_ALLOW_THREADS
    free(arena);
    if (!ok)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_layer_ok(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(have_f16c());
}

static PyObject *py_isas(PyObject *self, PyObject *noargs) {
    /* the paths this CPU can run, best first */
    if (have_vnni())
        return Py_BuildValue("(iii)", ISA_VNNI, ISA_AVX2, ISA_SCALAR);
    if (have_avx2())
        return Py_BuildValue("(ii)", ISA_AVX2, ISA_SCALAR);
    return Py_BuildValue("(i)", ISA_SCALAR);
}

static PyMethodDef methods[] = {
    {"gemm", py_gemm, METH_VARARGS, "y[m, n] = x[m, k] @ dequant(q4)^T (see the source)"},
    {"gemm8", py_gemm8, METH_VARARGS, "y[m, n] = x[m, k] @ (q8 rows * scale)^T"},
    {"layer", py_layer, METH_VARARGS, "one dense decoder layer at decode, in place (see the "
     "source)"},
    {"experts", py_experts, METH_VARARGS, "an MoE layer's routed experts at decode, in place"},
    {"layer_ok", py_layer_ok, METH_NOARGS, "whether this CPU runs `layer` (AVX2, FMA, F16C)"},
    {"isas", py_isas, METH_NOARGS, "the paths this CPU runs, best first (0 scalar, 1 AVX2, "
     "2 AVX-512 VNNI)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_q4", NULL, -1, methods};

static void after_fork_child(void) {
    /* the child has none of the parent's workers: it starts its own when it needs them */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&call_mu, NULL);
    pool.workers = 0;
    pool.pending = 0;
}

PyMODINIT_FUNC PyInit__q4(void) {
    pthread_atfork(NULL, NULL, after_fork_child);
    return PyModule_Create(&module);
}
