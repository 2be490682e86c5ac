/* The capped-simplex projection of contiguous rows: p = clip(x - tau, l, u) with
 * sum p = total, exact to float64 rounding, no sort.
 *
 * Per row: one pass for a bracket [a, b] of tau (m(a) >= total >= m(b), m the mass), then
 * safeguarded Newton steps: at tau, the partition into lower / free / upper entries gives
 * tau' = (sum_free x + sum_upper u + sum_lower l - total) / |free| (exact when the
 * partition at tau' is the same), a halving when tau' leaves the bracket. Each step only
 * visits the entries that can still change state inside the bracket: those that are at
 * their lower bound for every tau >= a, or at their cap for every tau <= b, are counted
 * once and dropped (copied out of the way into a scratch buffer). The threshold is taken
 * from the partition in float64 once it reproduces itself.
 *
 * Absent entries (x = -inf) are 0 and take no part. Bounds come as a pointer with a row
 * stride and a column stride (0 for a bound that does not vary along that axis), so a
 * scalar, a per-column vector, a per-row column and a full matrix need no copy.
 *
 * Returns 0, or 1 where the row holds NaN or +inf, or a bound of -inf below a present
 * entry (the caller then runs its torch loop), or 2 where memory ran out.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define CX_CAPPED_MAX_STEPS 300

/* One pass at tau over the active entries (x, l, u), with, when drop, the entries settled
 * for every tau in [a, b] counted into *cst and the others copied to (ox, ol, ou).
 * Branch-free: the classifications of random data would mispredict. Returns the mass
 * sum clip(x - tau, l, u) over the kept entries and sets *nf to their free count. */
#define CX_PASS(T, SUF)                                                                      \
    static double cx_pass_##SUF(const T *x, const T *lo, int64_t lcs, const T *up,          \
                                int64_t ucs, int64_t m, double tau, int drop, double a,      \
                                double b, double *cst, T *ox, T *ol, T *ou, int64_t *kept,   \
                                int64_t *nf)                                                 \
    {                                                                                        \
        double s0 = 0.0, s1 = 0.0, c = 0.0;                                                  \
        int64_t n0 = 0, n1 = 0, kk = 0;                                                      \
        if (!drop && lcs == 0 && ucs == 0) {                                                 \
            const double l = (double)lo[0], u = (double)up[0];                               \
            int64_t i = 0;                                                                   \
            for (; i + 1 < m; i += 2) {                                                      \
                double d0 = (double)x[i] - tau, d1 = (double)x[i + 1] - tau;                 \
                n0 += (d0 > l) & (d0 < u);                                                   \
                n1 += (d1 > l) & (d1 < u);                                                   \
                d0 = d0 < l ? l : d0;                                                        \
                d1 = d1 < l ? l : d1;                                                        \
                s0 += d0 > u ? u : d0;                                                       \
                s1 += d1 > u ? u : d1;                                                       \
            }                                                                                \
            for (; i < m; i++) {                                                             \
                double d0 = (double)x[i] - tau;                                              \
                n0 += (d0 > l) & (d0 < u);                                                   \
                d0 = d0 < l ? l : d0;                                                        \
                s0 += d0 > u ? u : d0;                                                       \
            }                                                                                \
            *nf = n0 + n1;                                                                   \
            *kept = m;                                                                       \
            return s0 + s1;                                                                  \
        }                                                                                    \
        for (int64_t i = 0; i < m; i++) {                                                    \
            T xv = x[i], lv = lo[i * lcs], uv = up[i * ucs];                                 \
            double v = (double)xv, l = (double)lv, u = (double)uv;                           \
            double d = v - tau;                                                              \
            int keep = 1;                                                                    \
            if (drop) {                                                                      \
                int at_l = (v - a) <= l, at_u = !at_l && (v - b) >= u;                       \
                c += at_l ? l : (at_u ? u : 0.0);                                            \
                keep = !(at_l | at_u);                                                       \
                ox[kk] = xv;                                                                 \
                if (ol != NULL) {                                                            \
                    ol[kk] = lv;                                                             \
                    ou[kk] = uv;                                                             \
                }                                                                            \
                kk += keep;                                                                  \
            }                                                                                \
            n0 += keep & (d > l) & (d < u);                                                  \
            d = d < l ? l : d;                                                               \
            d = d > u ? u : d;                                                               \
            s0 += keep ? d : 0.0;                                                            \
        }                                                                                    \
        *cst += c;                                                                           \
        *nf = n0;                                                                            \
        *kept = drop ? kk : m;                                                               \
        return s0;                                                                           \
    }

#define CX_DEFINE_CAPPED(T, SUF)                                                               \
    CX_PASS(T, SUF)                                                                          \
    static int cx_capped_row_##SUF(const T *x, T *out, int64_t k, const T *lo, int64_t lcs,  \
                                   const T *up, int64_t ucs, double total, T *scratch)       \
    {                                                                                        \
        /* pass 0: bracket, counts and sums; absent entries (-inf) count at l (undone by    \
         * cst's start) until the first drop removes them */                                \
        int64_t n = 0;                                                                       \
        double sx = 0.0, sl = 0.0, sl_abs = 0.0, hi = -INFINITY, lo1 = INFINITY;             \
        double lo2 = -INFINITY, su = 0.0;                                                    \
        int any_inf_u = 0, bad = 0;                                                          \
        for (int64_t i = 0; i < k; i++) {                                                    \
            double v = (double)x[i], l = (double)lo[i * lcs], u = (double)up[i * ucs];       \
            int present = v > -INFINITY;                                                     \
            bad |= (v != v) | (v == INFINITY) | (l == -INFINITY) | (l != l) | (u != u);     \
            n += present;                                                                    \
            sx += present ? v : 0.0;                                                         \
            sl += present ? l : 0.0;                                                         \
            sl_abs += present ? 0.0 : l;                                                     \
            su += (present && u < INFINITY) ? u : 0.0;                                       \
            double vl = present ? v - l : -INFINITY;                                         \
            hi = vl > hi ? vl : hi;                                                          \
            double vu = (present && u < INFINITY) ? v - u : INFINITY;                        \
            lo1 = vu < lo1 ? vu : lo1;                                                       \
            int inf_u = present && !(u < INFINITY);                                          \
            any_inf_u |= inf_u;                                                              \
            double w = inf_u ? vl : -INFINITY;                                               \
            lo2 = w > lo2 ? w : lo2;                                                         \
        }                                                                                    \
        if (bad)                                                                             \
            return 1;                                                                        \
        if (n == 0) {                                                                        \
            for (int64_t i = 0; i < k; i++)                                                  \
                out[i] = (T)0;                                                               \
            return 0;                                                                        \
        }                                                                                    \
        if (!isfinite(hi) || !isfinite(sl))                                                  \
            return 1;                                                                        \
        double a = lo1;                                                                      \
        if (any_inf_u && lo2 - (total - sl) < a)                                             \
            a = lo2 - (total - sl);                                                          \
        double b = hi;                                                                       \
        if (a > b)                                                                           \
            a = b;                                                                           \
        if (!isfinite(a))                                                                    \
            return 1;                                                                        \
        /* the tau of the hyperplane alone, kept inside the bracket */                       \
        double tau = (sx - total) / (double)n;                                               \
        if (!(tau > a && tau < b))                                                           \
            tau = 0.5 * (a + b);                                                             \
        double tol = 4.0 * (sizeof(T) == 4 ? 1.1920929e-07 : 2.220446049250313e-16) *        \
                     (fabs(total) > 1.0 ? fabs(total) : 1.0) * (double)(k + 2);              \
        double eps = 4.0 * 2.220446049250313e-16;                                            \
        const T *ax = x, *al = lo, *au = up;                                                 \
        int64_t m = k, acs_l = lcs, acs_u = ucs;                                             \
        double cst = -sl_abs; /* mass of the dropped entries */                              \
        int per_entry = (lcs != 0 || ucs != 0);                                              \
        T *sxv = scratch, *slv = per_entry ? scratch + k : NULL;                             \
        T *suv = per_entry ? scratch + 2 * k : NULL;                                         \
        int a_seen = 0, b_seen = 0, side = 0;                                                \
        double fa = any_inf_u ? INFINITY : su - total, fb = sl - total;                      \
        double w1 = INFINITY, w2 = INFINITY; /* the bracket's width 1 and 2 steps ago */     \
        for (int step = 0; step < CX_CAPPED_MAX_STEPS; step++) {                             \
            int64_t nf = 0, kept = 0;                                                        \
            int drop = step > 0; /* the bracket has moved: drop the settled entries */       \
            double mass = cx_pass_##SUF(ax, al, acs_l, au, acs_u, m, tau, drop, a, b, &cst,  \
                                        sxv, slv, suv, &kept, &nf);                          \
            if (drop) {                                                                      \
                ax = sxv;                                                                    \
                m = kept;                                                                    \
                if (per_entry) {                                                             \
                    al = slv;                                                                \
                    au = suv;                                                                \
                    acs_l = 1;                                                               \
                    acs_u = 1;                                                               \
                }                                                                            \
            }                                                                                \
            double f = cst + mass - total; /* m(tau) - total */                              \
            double t2 = nf > 0 ? tau + f / (double)nf : tau; /* Newton on this piece */     \
            if (nf > 0 ? fabs(t2 - tau) <= eps * (fabs(tau) > 1.0 ? fabs(tau) : 1.0)         \
                       : fabs(f) <= tol) {                                                   \
                tau = t2; /* the partition reproduces tau (or a flat piece at the total) */  \
                break;                                                                       \
            }                                                                                \
            if (f > 0) {                                                                     \
                a = tau;                                                                     \
                fa = f;                                                                      \
                a_seen = 1;                                                                  \
                if (side > 0)                                                                \
                    fb *= 0.5; /* Illinois */                                                \
                side = 1;                                                                    \
            } else {                                                                         \
                b = tau;                                                                     \
                fb = f;                                                                      \
                b_seen = 1;                                                                  \
                if (side < 0)                                                                \
                    fa *= 0.5;                                                               \
                side = -1;                                                                   \
            }                                                                                \
            /* false position on the bracket; else Newton inside it (an end only if not     \
             * tried there); a halving when two steps have not halved the bracket */        \
            double fp = a + fa * (b - a) / (fa - fb);                                        \
            int ok = (t2 > a && t2 < b) || (t2 == a && !a_seen) || (t2 == b && !b_seen);       \
            if ((b - a) > 0.5 * w2)                                                          \
                tau = 0.5 * (a + b);                                                         \
            else if (nf > 0 && ok && step > 0 && nf * 8 >= m)                                \
                tau = t2;                                                                    \
            else if (fp > a && fp < b)                                                       \
                tau = fp;                                                                    \
            else if (nf > 0 && ok)                                                           \
                tau = t2;                                                                    \
            else                                                                             \
                tau = 0.5 * (a + b);                                                         \
            w2 = w1;                                                                         \
            w1 = b - a;                                                                      \
            if (!(b - a > eps * (fabs(a) > fabs(b) ? fabs(a) : fabs(b))))                    \
                break; /* the bracket is one float wide */                                   \
        }                                                                                    \
        if (lcs == 0 && ucs == 0) {                                                          \
            const double l = (double)lo[0], u = (double)up[0];                               \
            for (int64_t i = 0; i < k; i++) {                                                \
                double v = (double)x[i];                                                     \
                double d = v - tau;                                                          \
                d = d < l ? l : d;                                                           \
                d = d > u ? u : d;                                                           \
                out[i] = (T)(v > -INFINITY ? d : 0.0);                                       \
            }                                                                                \
            return 0;                                                                        \
        }                                                                                    \
        for (int64_t i = 0; i < k; i++) {                                                    \
            double v = (double)x[i];                                                         \
            double l = (double)lo[i * lcs], u = (double)up[i * ucs];                         \
            double d = v - tau;                                                              \
            d = d < l ? l : d;                                                               \
            d = d > u ? u : d;                                                               \
            out[i] = (T)(v > -INFINITY ? d : 0.0);                                           \
        }                                                                                    \
        return 0;                                                                            \
    }                                                                                        \
                                                                                             \
    int cx_capped_##SUF(const T *x, T *out, int64_t k, const T *lo, int64_t lrs,             \
                        int64_t lcs, const T *up, int64_t urs, int64_t ucs, double total,    \
                        int64_t r0, int64_t r1)                                              \
    {                                                                                        \
        T *scratch = (T *)malloc(sizeof(T) * (size_t)(k > 0 ? 3 * k : 1));                  \
        if (scratch == NULL)                                                                 \
            return 2;                                                                        \
        int rc = 0;                                                                          \
        for (int64_t r = r0; r < r1 && rc == 0; r++)                                         \
            rc = cx_capped_row_##SUF(x + r * k, out + r * k, k, lo + r * lrs, lcs,           \
                                     up + r * urs, ucs, total, scratch);                     \
        free(scratch);                                                                       \
        return rc;                                                                           \
    }

CX_DEFINE_CAPPED(float, f32)
CX_DEFINE_CAPPED(double, f64)
