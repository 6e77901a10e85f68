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
   reference the Python side checks the AVX2 one against.

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

static void rows_scalar(const act_t *a, const uint8_t *packed, const uint16_t *sz, int64_t n,
                        int bn, int64_t r0, int64_t r1, float *y) {
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
            const uint16_t *p = sz + (g * n + r) * 2;
            acc += a->dx[g] * (bf16(p[0]) * (float)(dot - 8 * a->sq[g]) + bf16(p[1]) * (float)a->sq[g]);
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

/* One stripe: 16 bytes per column at `col` (stride cs), i.e. 16 rows (low nibbles, rows
   lo..lo+15) and 16 more (high nibbles, rows hi..hi+15); writes their 32 outputs. */
__attribute__((target("avx2,fma")))
static void stripe_avx2(const act_t *a, const uint8_t *col, int64_t cs, const uint16_t *sz,
                        int64_t n, int64_t lo, int64_t hi, float *y) {
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
        const uint16_t *s = sz + g * n * 2;
        y0 = scale8(s + lo * 2, widen(a0), va, b8, bz, y0);
        y1 = scale8(s + (lo + 8) * 2, widen(a1), va, b8, bz, y1);
        y2 = scale8(s + hi * 2, widen(a2), va, b8, bz, y2);
        y3 = scale8(s + (hi + 8) * 2, widen(a3), va, b8, bz, y3);
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
static inline void scale8x2(const uint16_t *s, int64_t r0, int64_t r1, __m256i acc, __m256 a,
                            __m256 b8, __m256 bz, float *y0, float *y1) {
    /* acc int16 [rows r0..r0+7 | rows r1..r1+7]: y[r] += scale * (a * dot - b8) + zero * bz */
    __m256 d0 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc)));
    __m256 d1 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc, 1)));
    _mm256_storeu_ps(y0, scale8(s + r0 * 2, d0, a, b8, bz, _mm256_loadu_ps(y0)));
    _mm256_storeu_ps(y1, scale8(s + r1 * 2, d1, a, b8, bz, _mm256_loadu_ps(y1)));
}

__attribute__((target("avx2,fma")))
static void block64_avx2(const act_t *a, const uint8_t *blk, const uint16_t *sz, int64_t n,
                         int64_t r, float *y) {
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
        const uint16_t *s = sz + g * n * 2;
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
            scale8x2(s, r, r + 16, a0, va, h8, hz, out, out + 16);
            scale8x2(s, r + 8, r + 24, a1, va, h8, hz, out + 8, out + 24);
            scale8x2(s, r + 32, r + 48, a2, va, h8, hz, out + 32, out + 48);
            scale8x2(s, r + 40, r + 56, a3, va, h8, hz, out + 40, out + 56);
        }
    }
}

__attribute__((target("avx2,fma")))
static void rows_avx2(const act_t *a, const uint8_t *packed, const uint16_t *sz, int64_t n,
                      int bn, int64_t r0, int64_t r1, float *y) {
    int64_t k = a->k, half = bn / 2;
    for (int64_t b = r0 / bn; b < r1 / bn; b++) {
        const uint8_t *blk = packed + b * k * half;
        if (bn == 64) {
            block64_avx2(a, blk, sz, n, b * bn, y);
            continue;
        }
        for (int64_t off = 0; off < half; off += 16)
            stripe_avx2(a, blk + off, half, sz, n, b * bn + off, b * bn + half + off, y);
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

/* ---- the pool ---- */

typedef struct job job_t;
struct job {
    void (*fn)(const job_t *j, int64_t b0, int64_t b1);  /* blocks [b0, b1) of rows */
    const act_t *acts;
    int64_t m, n;
    const uint8_t *packed;
    const uint16_t *sz;  /* q4: scales and zeros; q8: the rows' scales */
    int bn, avx2;        /* q4: rows per block; q8: rows per block of work */
    float *y;
    int64_t blocks;
};

static void q4_blocks(const job_t *j, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++)  /* each row block once from RAM, for every row of x */
        for (int64_t m = 0; m < j->m; m++) {
            const act_t *a = &j->acts[m];
            float *y = j->y + m * j->n;
            if (j->avx2)
                rows_avx2(a, j->packed, j->sz, j->n, j->bn, b * j->bn, (b + 1) * j->bn, y);
            else
                rows_scalar(a, j->packed, j->sz, j->n, j->bn, b * j->bn, (b + 1) * j->bn, y);
        }
}

static void q8_blocks(const job_t *j, int64_t b0, int64_t b1) {
    int64_t r0 = b0 * j->bn, r1 = b1 * j->bn < j->n ? b1 * j->bn : j->n;
    for (int64_t m = 0; m < j->m; m++) {
        float *y = j->y + m * j->n;
        if (j->avx2)
            rows8_avx2(&j->acts[m], (const int8_t *)j->packed, j->sz, r0, r1, y);
        else
            rows8_scalar(&j->acts[m], (const int8_t *)j->packed, j->sz, r0, r1, y);
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

static int check_cpu(int avx2) {
    if (avx2 && !have_avx2()) {
        PyErr_SetString(PyExc_RuntimeError, "q4: this CPU has no AVX2/FMA");
        return 0;
    }
    return 1;
}

/* gemm(x, m, k, packed, sz, n, bn, y, threads, avx2): addresses as ints (the caller checks
   shapes, dtypes and contiguity). x f32 [m, k], y f32 [m, n]. */
static PyObject *py_gemm(PyObject *self, PyObject *args) {
    unsigned long long xp, pp, sp, yp;
    long long m, k, n;
    int bn, threads, avx2;
    if (!PyArg_ParseTuple(args, "KLLKKLiKip", &xp, &m, &k, &pp, &sp, &n, &bn, &yp, &threads,
                          &avx2))
        return NULL;
    if (k % GROUP || (bn != 32 && bn != 64) || n % bn || m < 1) {
        PyErr_SetString(PyExc_ValueError, "q4 gemm: K % 32, N % BN (32 or 64) and M >= 1");
        return NULL;
    }
    if (!check_cpu(avx2))
        return NULL;
    job_t j = {q4_blocks, NULL, m, n, (const uint8_t *)(uintptr_t)pp,
               (const uint16_t *)(uintptr_t)sp, bn, avx2, (float *)(uintptr_t)yp, n / bn};
    return call(&j, (const float *)(uintptr_t)xp, k, avx2, threads);
}

/* gemm8(x, m, k, q, scale, n, y, threads, avx2): int8 rows q [n, k], bf16 scale [n]. */
static PyObject *py_gemm8(PyObject *self, PyObject *args) {
    unsigned long long xp, qp, sp, yp;
    long long m, k, n;
    int threads, avx2;
    if (!PyArg_ParseTuple(args, "KLLKKLKip", &xp, &m, &k, &qp, &sp, &n, &yp, &threads, &avx2))
        return NULL;
    if (k % GROUP || n < 1 || m < 1) {
        PyErr_SetString(PyExc_ValueError, "q8 gemm: K % 32, N >= 1 and M >= 1");
        return NULL;
    }
    if (!check_cpu(avx2))
        return NULL;
    const int rows = 64;  /* rows per block of work */
    job_t j = {q8_blocks, NULL, m, n, (const uint8_t *)(uintptr_t)qp,
               (const uint16_t *)(uintptr_t)sp, rows, avx2, (float *)(uintptr_t)yp,
               (n + rows - 1) / rows};
    return call(&j, (const float *)(uintptr_t)xp, k, 0, threads);
}

static PyObject *py_avx2(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(have_avx2());
}

static PyMethodDef methods[] = {
    {"gemm", py_gemm, METH_VARARGS, "y[m, n] = x[m, k] @ dequant(q4)^T (see the source)"},
    {"gemm8", py_gemm8, METH_VARARGS, "y[m, n] = x[m, k] @ (q8 rows * scale)^T"},
    {"avx2", py_avx2, METH_NOARGS, "whether this CPU runs the AVX2/FMA kernel"},
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
