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
 */
#ifndef CX_T
#include <math.h>
#include <stdint.h>

#define CX_T float
#define CX_SUF(name) name##_f32
#include "gather.c"
#undef CX_T
#undef CX_SUF

#define CX_T double
#define CX_SUF(name) name##_f64
#include "gather.c"
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
            for (int64_t i = 0; i < n; i++) {
                T v = pk[i * c + t[i]];
                qk[i] = v < lo ? lo : v;
            }
            continue;
        }
        int bad = 0;
        for (int64_t i = 0; i < n; i++) {
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
