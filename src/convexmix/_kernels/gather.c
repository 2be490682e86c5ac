/* The ensemble job's read of (K, N, C) class probabilities, in one pass: for each model
 * and row, the probability of the true class (floored), and, when asked, the checks that
 * every value is >= 0 (NaN fails it) and that the row sums to 1 within atol (inf and NaN
 * fail it). Each row's C values are read once, while in cache.
 *
 * cx_true_class_f32/f64(p, t, n, c, q, k0, k1, floor, check, atol) handles models
 * [k0, k1) of the contiguous (K, n, c) array p, with targets t (n,) in [0, c), writing the
 * contiguous (K, n) q: q[k, i] = max(p[k, i, t[i]], floor) (NaN stays NaN). It returns -1,
 * or with check the first model in [k0, k1) that fails a check (the caller then finds and
 * reports the offending value with its torch code). The row sums are accumulated in
 * double for both types.
 *
 * With AVX2 or AVX-512 the checks run on vectors of W = 4 or 8 doubles: each row is
 * folded into one vector (its full vectors, then a masked load of the rest, the masked
 * lanes 0), W rows' vectors are reduced together to the vector of their W sums (a
 * transpose of additions: no horizontal sum per row), and the minimum is a vertical one
 * over everything read. A NaN may slip past the minimum (vminpd keeps its second
 * operand) but never past the sums, which it makes NaN; an inf makes a sum inf or NaN.
 * The scalar loop was bound by its ~50 instructions a row of 10 classes, the vector one
 * by memory. Reads are prefetched CX_PREFETCH bytes ahead: with the hardware prefetcher
 * alone, both loops read at about 60% of the rate of a plain sum over the array; with it,
 * the checked vector loop at about 80% (docs/ensemble.md).
 */
#ifndef CX_T
#include <math.h>
#include <stdint.h>
#ifndef CX_PREFETCH
#define CX_PREFETCH 8192 /* bytes; 4 KiB to 64 KiB measured alike, 2 KiB and less slower */
#endif
#if defined(__AVX512F__) && defined(__AVX512VL__)
#include <immintrin.h>
#define CX_GATHER_W 8
typedef __m512d cx_vd;
#define VZERO() _mm512_setzero_pd()
#define VSET1(x) _mm512_set1_pd(x)
#define VADD(a, b) _mm512_add_pd(a, b)
#define VMIN(a, b) _mm512_min_pd(a, b)
#define VLOAD_f64(ptr) _mm512_loadu_pd(ptr)
#define VLOAD_f32(ptr) _mm512_cvtps_pd(_mm256_loadu_ps(ptr))
#define VMASK_TYPE __mmask8
#define VMASK(r) ((__mmask8)((1u << (r)) - 1u))
#define VMLOAD_f64(m, ptr) _mm512_maskz_loadu_pd(m, ptr)
#define VMLOAD_f32(m, ptr) _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, ptr))
/* lanes r of the result: the sum of the 8 lanes of s[r] */
static inline __m512d cx_sums8(const __m512d *s)
{
    __m512d t0 = _mm512_add_pd(_mm512_unpacklo_pd(s[0], s[1]), _mm512_unpackhi_pd(s[0], s[1]));
    __m512d t1 = _mm512_add_pd(_mm512_unpacklo_pd(s[2], s[3]), _mm512_unpackhi_pd(s[2], s[3]));
    __m512d t2 = _mm512_add_pd(_mm512_unpacklo_pd(s[4], s[5]), _mm512_unpackhi_pd(s[4], s[5]));
    __m512d t3 = _mm512_add_pd(_mm512_unpacklo_pd(s[6], s[7]), _mm512_unpackhi_pd(s[6], s[7]));
    __m512d u0 = _mm512_add_pd(_mm512_shuffle_f64x2(t0, t1, 0x88), _mm512_shuffle_f64x2(t0, t1, 0xDD));
    __m512d u1 = _mm512_add_pd(_mm512_shuffle_f64x2(t2, t3, 0x88), _mm512_shuffle_f64x2(t2, t3, 0xDD));
    return _mm512_add_pd(_mm512_shuffle_f64x2(u0, u1, 0x88), _mm512_shuffle_f64x2(u0, u1, 0xDD));
}
#define VSUMS(s) cx_sums8(s)
/* 1 when every lane of s is within atol of 1 and every lane of mn is >= 0 (NaN: 0) */
static inline int cx_ok(__m512d s, __m512d mn, double atol)
{
    __m512d d = _mm512_abs_pd(_mm512_sub_pd(s, _mm512_set1_pd(1.0)));
    return _mm512_cmp_pd_mask(d, _mm512_set1_pd(atol), _CMP_LE_OQ) == 0xFF
           && _mm512_cmp_pd_mask(mn, _mm512_setzero_pd(), _CMP_GE_OQ) == 0xFF;
}
#define VOK(s, mn, atol) cx_ok(s, mn, atol)
#elif defined(__AVX2__)
#include <immintrin.h>
#define CX_GATHER_W 4
typedef __m256d cx_vd;
#define VZERO() _mm256_setzero_pd()
#define VSET1(x) _mm256_set1_pd(x)
#define VADD(a, b) _mm256_add_pd(a, b)
#define VMIN(a, b) _mm256_min_pd(a, b)
#define VLOAD_f64(ptr) _mm256_loadu_pd(ptr)
#define VLOAD_f32(ptr) _mm256_cvtps_pd(_mm_loadu_ps(ptr))
#define VMASK_TYPE __m256i
/* lanes below r all ones: as 64-bit lanes for doubles, as their low 32 bits for floats */
#define VMASK(r) _mm256_cmpgt_epi64(_mm256_set1_epi64x(r), _mm256_setr_epi64x(0, 1, 2, 3))
#define VMLOAD_f64(m, ptr) _mm256_maskload_pd(ptr, m)
#define VMLOAD_f32(m, ptr)                                                                    \
    _mm256_cvtps_pd(_mm_maskload_ps(                                                          \
        ptr, _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(m, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)))))
static inline __m256d cx_sums4(const __m256d *s)
{
    __m256d t0 = _mm256_hadd_pd(s[0], s[1]); /* s0 01, s1 01, s0 23, s1 23 */
    __m256d t1 = _mm256_hadd_pd(s[2], s[3]);
    return _mm256_add_pd(_mm256_permute2f128_pd(t0, t1, 0x20), _mm256_permute2f128_pd(t0, t1, 0x31));
}
#define VSUMS(s) cx_sums4(s)
static inline int cx_ok(__m256d s, __m256d mn, double atol)
{
    const __m256d sign = _mm256_set1_pd(-0.0);
    __m256d d = _mm256_andnot_pd(sign, _mm256_sub_pd(s, _mm256_set1_pd(1.0)));
    __m256d ok = _mm256_and_pd(_mm256_cmp_pd(d, _mm256_set1_pd(atol), _CMP_LE_OQ),
                               _mm256_cmp_pd(mn, _mm256_setzero_pd(), _CMP_GE_OQ));
    return _mm256_movemask_pd(ok) == 0xF;
}
#define VOK(s, mn, atol) cx_ok(s, mn, atol)
#endif

#define CX_T float
#define CX_SUF(name) name##_f32
#define VLOAD VLOAD_f32
#define VMLOAD VMLOAD_f32
#include "gather.c"
#undef VLOAD
#undef VMLOAD
#undef CX_T
#undef CX_SUF

#define CX_T double
#define CX_SUF(name) name##_f64
#define VLOAD VLOAD_f64
#define VMLOAD VMLOAD_f64
#include "gather.c"
#undef VLOAD
#undef VMLOAD
#undef CX_T
#undef CX_SUF

#else /* the kernel for one type CX_T */
#define T CX_T

int64_t CX_SUF(cx_true_class)(const T *p, const int64_t *t, int64_t n, int64_t c, T *q,
                              int64_t k0, int64_t k1, double floor, int check, double atol)
{
    const T lo = (T)floor;
    for (int64_t k = k0; k < k1; k++) {
        const T *pk = p + k * n * c;
        T *qk = q + k * n;
        if (!check) {
            /* only the true class's line of each row: prefetched `ahead` rows early */
            const int64_t ahead = CX_PREFETCH / (int64_t)(c * sizeof(T)) + 1;
            int64_t i = 0;
            for (; i + ahead < n; i++) {
                __builtin_prefetch(pk + (i + ahead) * c + t[i + ahead]);
                T v = pk[i * c + t[i]];
                qk[i] = v < lo ? lo : v;
            }
            for (; i < n; i++) {
                T v = pk[i * c + t[i]];
                qk[i] = v < lo ? lo : v;
            }
            continue;
        }
        int bad = 0;
        int64_t i = 0;
#ifdef CX_GATHER_W
        {
            enum { W = CX_GATHER_W };
            const int64_t full = c - c % W;
            const VMASK_TYPE tail = VMASK(c % W);
            cx_vd mn = VSET1(1.0);
            int ok = 1;
            const int64_t block = (int64_t)(W * c * sizeof(T));
            for (; i + W <= n; i += W) {
                const char *ahead = (const char *)(pk + i * c) + CX_PREFETCH;
                for (int64_t b = 0; b < block; b += 64)
                    __builtin_prefetch(ahead + b);
                cx_vd s[W];
                for (int r = 0; r < W; r++) {
                    const T *row = pk + (i + r) * c;
                    cx_vd acc = VZERO();
                    int64_t j = 0;
                    for (; j < full; j += W) {
                        cx_vd v = VLOAD(row + j);
                        acc = VADD(acc, v);
                        mn = VMIN(mn, v);
                    }
                    if (j < c) {
                        cx_vd v = VMLOAD(tail, row + j);
                        acc = VADD(acc, v);
                        mn = VMIN(mn, v);
                    }
                    s[r] = acc;
                    T v = row[t[i + r]];
                    qk[i + r] = v < lo ? lo : v;
                }
                ok &= VOK(VSUMS(s), mn, atol);
            }
            bad = !ok;
        }
#endif
        for (; i < n; i++) {
            const T *row = pk + i * c;
            /* Four independent sums and minima: a row's operations do not wait on each
             * other. A NaN may slip past the minimum (minsd keeps the other operand) but
             * never past the sum, which it makes NaN; an inf makes the sum inf or NaN. */
            double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
            T m0 = 1, m1 = 1, m2 = 1, m3 = 1;
            int64_t j = 0;
            for (; j + 4 <= c; j += 4) {
                T a = row[j], b = row[j + 1], d = row[j + 2], e = row[j + 3];
                s0 += (double)a;
                s1 += (double)b;
                s2 += (double)d;
                s3 += (double)e;
                m0 = a < m0 ? a : m0;
                m1 = b < m1 ? b : m1;
                m2 = d < m2 ? d : m2;
                m3 = e < m3 ? e : m3;
            }
            for (; j < c; j++) {
                T a = row[j];
                s0 += (double)a;
                m0 = a < m0 ? a : m0;
            }
            double s = (s0 + s1) + (s2 + s3);
            T mn = m0 < m1 ? m0 : m1;
            mn = m2 < mn ? m2 : mn;
            mn = m3 < mn ? m3 : mn;
            bad |= !(mn >= 0) | !(fabs(s - 1.0) <= atol);
            T v = row[t[i]];
            qk[i] = v < lo ? lo : v;
        }
        if (bad)
            return k;
    }
    return -1;
}

#undef T
#endif
