/* Sparsemax and 1.5-entmax of the rows of a contiguous tensor, forward and backward
 * (private; called by convexmix/_kernels/native.py for functional/_sparse.py).
 *
 * A tensor of shape (outer, K, inner) holds outer * inner rows of K entries, entry j of
 * row r = (a, b) at a * K * inner + j * inner + b: the map's dim need not be the last.
 * Every function takes the row range [r0, r1), so the caller can split one call over
 * threads (ctypes releases the GIL):
 *
 *   cx_rows_fwd_<t>(x, out, K, inner, total, kind, r0, r1)
 *       kind 0, sparsemax: out = [x - tau]_+ with sum out = total;
 *       kind 1, 1.5-entmax: out = [x / 2 - tau]_+^2 with sum out = total.
 *       Returns 0, or 2 where memory for the scratch ran out.
 *   cx_rows_bwd_<t>(y, g, out, K, inner, kind, r0, r1)
 *       the vector-Jacobian product from the output y: kind 0, the support's centred
 *       gradient 1[y > 0] (g - mean_{y > 0} g); kind 1, with s = sqrt(y),
 *       s g - s sum(s g) / max(sum s, tiny).
 *
 * <t> is f32 or f64; everything is computed in double and rounded once to <t> (but
 * s = sqrt(y) of the backward, taken in <t> as the ATen code does).
 *
 * The forward follows functional/_sparse.py's sort-based code value for value: +inf is
 * the largest finite value of <t> (so +inf entries share the mass), -inf is absent (0), a
 * row with a NaN is all NaN, a row with nothing present is zeros. The threshold is taken
 * relative to the row maximum (d = x - max, exact near the maximum) in float64, in closed
 * form on the final support (sparsemax: tau = (sum_S d - t) / |S|; 1.5-entmax, with
 * y = d / 2: tau = mean_S y - sqrt((t - sum_S (y - mean)^2) / |S|)) with compensated
 * (TwoSum) sums, and any entry the rounded threshold passes is dropped and the closed
 * form retaken. No sort. The support lies above a lower bound of tau at which the
 * maximum alone reaches the total (max - t; max - sqrt(t) on y): the first pass finds
 * the maximum and keeps, in a scratch buffer, the entries within that width of the
 * running maximum (a superset). Among m <= CX_ROWS_SMALL candidates the support is
 * where the mass at tau = c_i is below t (O(m^2), vectorised, no division); among more,
 * Michelot's steps (sparsemax) or Newton's method from the lower bound (1.5-entmax)
 * drop the entries they pass until few are left or the support is stable, O(K)
 * expected. After CX_ROWS_STEPS steps (adversarial rows) the remaining candidates are
 * sorted and scanned as the sort-based code does. A last pass writes the output. The
 * search runs in units of a power of two near t (sparsemax) or sqrt(t) (1.5-entmax),
 * exact, so that no total near the float range overflows a sum.
 */
#ifndef CX_T
/* No FP traps are observed: GCC may then turn the selects (clamps to 0, to the largest
 * float) into min/max and vectorise the loops that hold them (clang does by default).
 * No value changes. setup.py builds with -fno-math-errno, so that sqrt vectorises. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define CX_ROWS_STACK 512 /* candidates kept on the stack up to this row length (>= 16) */
#ifndef CX_ROWS_STEPS
#define CX_ROWS_STEPS 48  /* Newton steps before the candidates are sorted */
#endif
#ifndef CX_ROWS_SMALL
#define CX_ROWS_SMALL 16  /* at most this many candidates: the O(m^2) support test */
#endif
#if CX_ROWS_SMALL < 8
#error "CX_ROWS_SMALL: the support test pads to 4, 8 or CX_ROWS_SMALL entries"
#endif

static int cx_rows_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* A compensated sum (Knuth's TwoSum, branch-free): s + c is the exact sum up to one
 * rounding of the accumulated error terms. */
#define CX_NEU(s, c, v)                                                                    \
    do {                                                                                   \
        double t_ = (s) + (v), b_ = t_ - (s);                                              \
        (c) += ((s) - (t_ - b_)) + ((v) - b_);                                             \
        (s) = t_;                                                                          \
    } while (0)

#ifdef CX_ROWS_COUNT
long cx_steps = 0;
#define CX_STEP() cx_steps++
#else
#define CX_STEP() (void)0
#endif

/* f[i] = the mass at tau = c_i over c[0..m), for the W (a constant: the loop over i
 * becomes W / 4 vector registers) entries of c, the last W - m of them padding that adds
 * nothing. (d + |d|) / 2 = max(d, 0), exactly, and without a branch. */
#define CX_ROWS_MASS(W)                                                                    \
    do {                                                                                   \
        for (int i = 0; i < (W); i++)                                                      \
            f[i] = 0.0;                                                                    \
        if (kind) {                                                                        \
            for (int64_t j = 0; j < m; j++) {                                              \
                double cj = c[j];                                                          \
                for (int i = 0; i < (W); i++) {                                            \
                    double d = cj - c[i];                                                  \
                    d = 0.5 * (d + fabs(d));                                               \
                    f[i] += d * d;                                                         \
                }                                                                          \
            }                                                                              \
        } else {                                                                           \
            for (int64_t j = 0; j < m; j++) {                                              \
                double cj = c[j];                                                          \
                for (int i = 0; i < (W); i++) {                                            \
                    double d = cj - c[i];                                                  \
                    f[i] += 0.5 * (d + fabs(d));                                           \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
    } while (0)

/* The support among m <= CX_ROWS_SMALL candidates c (a superset of it; c has room for
 * CX_ROWS_SMALL), moved to the front; returns its size. Entry i is in it iff the mass at
 * tau = c_i is below the total, sum_j (c_j - c_i)_+ (sparsemax) or sum_j (c_j - c_i)_+^2
 * (1.5-entmax) < t: O(m^2), without sort, division or square root. */
static int64_t cx_rows_small(double *c, int64_t m, double t, int kind)
{
    double f[CX_ROWS_SMALL];
    int w = m <= 4 ? 4 : m <= 8 ? 8 : CX_ROWS_SMALL;
    for (int i = (int)m; i < w; i++)
        c[i] = -1e300; /* far below every candidate (all in (-4, 0]) */
    if (w == 4)
        CX_ROWS_MASS(4);
    else if (w == 8)
        CX_ROWS_MASS(8);
    else
        CX_ROWS_MASS(CX_ROWS_SMALL);
    int64_t kk = 0;
    for (int64_t i = 0; i < m; i++) {
        c[kk] = c[i];
        kk += f[i] < t;
    }
    return kk;
}

/* The threshold in closed form on the support c[0..m), with compensated sums; any entry
 * the rounded threshold passes is dropped and the closed form taken again. Sparsemax:
 * (sum c - t) / m; 1.5-entmax: mean - sqrt((t - sum (c - mean)^2) / m). */
static double cx_rows_exact(double *c, int64_t m, double t, int kind)
{
    for (;;) {
        CX_STEP();
        double s = 0.0, e = 0.0, tau;
        for (int64_t i = 0; i < m; i++)
            CX_NEU(s, e, c[i]);
        if (kind) {
            double mean = (s + e) / (double)m;
            double ss = 0.0, es = 0.0;
            for (int64_t i = 0; i < m; i++) {
                double d = c[i] - mean;
                CX_NEU(ss, es, d * d);
            }
            double r = (t - (ss + es)) / (double)m;
            tau = mean - sqrt(r > 0.0 ? r : 0.0);
        } else {
            tau = ((s + e) - t) / (double)m;
        }
        int64_t kk = 0;
        for (int64_t i = 0; i < m; i++) {
            c[kk] = c[i];
            kk += kind ? c[i] >= tau : c[i] > tau;
        }
        if (kk == m || kk == 0)
            return tau;
        m = kk;
    }
}

/* The sparsemax threshold of candidates c[0..m) (a superset of the support) for total t.
 * Many candidates: Michelot's steps (the closed form on the entries above the previous
 * threshold: from below, since the closed form on any superset of the support is at most
 * the threshold) until no entry drops or few are left. */
static double cx_rows_tau2(double *c, int64_t m, double t)
{
    if (m > CX_ROWS_SMALL) {
        double s = 0.0;
        for (int64_t i = 0; i < m; i++)
            s += c[i];
        double tau = (s - t) / (double)m;
        for (int step = 0;; step++) {
            CX_STEP();
            if (step == CX_ROWS_STEPS) {
                /* sort what is left; the support is where t + k c_(k) > sum_{j<=k} c_(j) */
                qsort(c, (size_t)m, sizeof(double), cx_rows_desc);
                double cs = 0.0;
                int64_t kstar = 0;
                for (int64_t i = 0; i < m; i++) {
                    cs += c[i];
                    kstar += t + (double)(i + 1) * c[i] > cs;
                }
                return cx_rows_exact(c, kstar > 0 ? kstar : 1, t, 0);
            }
            int64_t kk = 0;
            s = 0.0;
            for (int64_t i = 0; i < m; i++) {
                double v = c[i];
                int in = v > tau;
                c[kk] = v;
                kk += in;
                s += in ? v : 0.0;
            }
            if (kk == m || kk == 0)
                return cx_rows_exact(c, m, t, 0);
            m = kk;
            if (m <= CX_ROWS_SMALL)
                break;
            tau = (s - t) / (double)m;
        }
    }
    return cx_rows_exact(c, cx_rows_small(c, m, t, 0), t, 0);
}

/* The 1.5-entmax threshold of candidates c[0..m) (a superset of the support, which lies
 * above lo, a lower bound of the threshold) for total t. Many candidates: Newton's method
 * from lo on the convex h(tau) = ||(c - tau)_+|| - sqrt(t), which stays below the
 * threshold, each step dropping the entries it passes, until the closed form on the
 * entries above tau lies below all of them, or few are left. */
static double cx_rows_tau15(double *c, int64_t m, double t, double lo)
{
    double tau = lo, rt = sqrt(t);
    for (int step = 0; m > CX_ROWS_SMALL; step++) {
        CX_STEP();
        if (step == CX_ROWS_STEPS) {
            /* sort what is left and scan every prefix as the sort-based code does */
            qsort(c, (size_t)m, sizeof(double), cx_rows_desc);
            double s1 = 0.0, s2 = 0.0;
            int64_t kstar = 0;
            for (int64_t i = 0; i < m; i++) {
                double k = (double)(i + 1);
                s1 += c[i];
                s2 += c[i] * c[i];
                double mean = s1 / k, ss = s2 - k * mean * mean;
                double r = (t - ss) / k;
                kstar += mean - sqrt(r > 0.0 ? r : 0.0) <= c[i];
            }
            return cx_rows_exact(c, kstar > 0 ? kstar : 1, t, 1);
        }
        /* entries above tau, with their moments about tau */
        int64_t kk = 0;
        double a = 0.0, b = 0.0, mn = INFINITY;
        for (int64_t i = 0; i < m; i++) {
            double v = c[i], d = v - tau;
            int in = d > 0.0;
            c[kk] = v;
            kk += in;
            d = in ? d : 0.0;
            a += d;
            b += d * d;
            mn = in && v < mn ? v : mn;
        }
        if (kk == 0)
            return tau;
        m = kk;
        double f = b - t; /* >= 0: tau is a lower bound */
        double disc = a * a - (double)m * f;
        double root = tau + f / (a + sqrt(disc > 0.0 ? disc : 0.0));
        if (disc >= 0.0 && mn >= root)
            return cx_rows_exact(c, m, t, 1); /* the closed form keeps them all */
        double next = tau + (b - rt * sqrt(b)) / a;
        if (!(next > tau))
            return cx_rows_exact(c, m, t, 1); /* Newton has stalled at rounding level */
        tau = next;
    }
    return cx_rows_exact(c, cx_rows_small(c, m, t, 1), t, 1);
}

/* What every row of a call shares: the search runs in units of scale = 2^e, exact,
 * with t = total / scale (sparsemax) or total / scale^2 (1.5-entmax) in [1, 4), so that
 * no total near the float range overflows a sum. */
struct cx_rows_par {
    int kind;
    double scale, inv, half; /* half: 1 (sparsemax) or 1/2 (1.5-entmax, on x / 2) */
    double t, lo;            /* the scaled total and lower bound of the threshold */
    double width;            /* candidates: x > max - width (unscaled) */
};

static struct cx_rows_par cx_rows_params(double total, int kind)
{
    struct cx_rows_par p;
    int e;
    frexp(total, &e);
    e -= 1; /* floor(log2(total)) */
    if (kind)
        e = e >= 0 ? e / 2 : -((1 - e) / 2);
    p.kind = kind;
    p.scale = ldexp(1.0, e);
    p.inv = ldexp(1.0, -e);
    p.half = kind ? 0.5 : 1.0;
    p.t = kind ? total * p.inv * p.inv : total * p.inv;
    /* the maximum alone reaches the total at max - lo */
    p.lo = kind ? -sqrt(p.t) : -p.t;
    p.width = kind ? 2.0 * sqrt(total) : total;
    return p;
}

#define CX_T float
#define CX_TMAX FLT_MAX
#define CX_TINY FLT_MIN
#define CX_SQRT sqrtf
#define CX_SUF(name) name##_f32
#include "rows.c"
#undef CX_T
#undef CX_TMAX
#undef CX_TINY
#undef CX_SQRT
#undef CX_SUF

#define CX_T double
#define CX_TMAX DBL_MAX
#define CX_TINY DBL_MIN
#define CX_SQRT sqrt
#define CX_SUF(name) name##_f64
#include "rows.c"
#undef CX_T
#undef CX_TMAX
#undef CX_TINY
#undef CX_SQRT
#undef CX_SUF

#else /* the kernels for one type CX_T */
#define T CX_T

/* One row of K entries at stride st; c is scratch for K doubles. */
static inline __attribute__((always_inline)) void
CX_SUF(cx_rows_row)(const T *x, T *out, int64_t k, int64_t st, const struct cx_rows_par *p,
                    double *c)
{
    double mx = -INFINITY;
    int nan = 0;
    int64_t m = 0;
    const int small = k <= CX_ROWS_SMALL;
    if (small) {
        for (int64_t i = 0; i < k; i++) {
            double v = (double)x[i * st];
            nan |= v != v;
            mx = v > mx ? v : mx;
        }
        mx = mx > CX_TMAX ? CX_TMAX : mx; /* +inf counts as the largest finite value */
    } else {
        /* one pass: NaN, the maximum, and the candidates (entries above the running
         * maximum less the width, a superset of those above the final one) */
        const double width = p->width;
        for (int64_t i = 0; i < k; i++) {
            double v = (double)x[i * st];
            v = v > CX_TMAX ? CX_TMAX : v;
            nan |= v != v;
            c[m] = v;
            m += v >= mx - width; /* >=: at |max| >> width, max - width rounds to max */
            mx = v > mx ? v : mx;
        }
    }
    if (nan || mx == -INFINITY) {
        T fill = nan ? (T)NAN : (T)0;
        for (int64_t i = 0; i < k; i++)
            out[i * st] = fill;
        return;
    }
    /* scaled and relative to the maximum */
    const double f = p->half * p->inv, lo = p->lo;
    double tau;
    if (small) {
        /* the entries above the lower bound: in (lo, 0] */
        for (int64_t i = 0; i < k; i++) {
            double v = (double)x[i * st];
            v = v < CX_TMAX ? v : CX_TMAX;
            double y = (v - mx) * f;
            c[m] = y;
            m += y > lo;
        }
        m = cx_rows_small(c, m, p->t, p->kind);
        tau = cx_rows_exact(c, m, p->t, p->kind);
    } else {
        /* the candidates above the lower bound: in (lo, 0] */
        int64_t kk = 0;
        for (int64_t i = 0; i < m; i++) {
            double y = (c[i] - mx) * f;
            c[kk] = y;
            kk += y > lo;
        }
        m = kk;
        tau = p->kind ? cx_rows_tau15(c, m, p->t, lo) : cx_rows_tau2(c, m, p->t);
    }
    double off = tau * p->scale / p->half; /* in units of x - max */
    /* (selects of the form a < b ? a : b, which compile to min/max without a branch;
     * the row has no NaN) */
    if (p->kind) {
        for (int64_t i = 0; i < k; i++) {
            double v = (double)x[i * st];
            v = v < CX_TMAX ? v : CX_TMAX;
            double o = (v - mx) - off;
            o = o > 0.0 ? o : 0.0;
            out[i * st] = (T)(o * o * 0.25);
        }
    } else {
        for (int64_t i = 0; i < k; i++) {
            double v = (double)x[i * st];
            v = v < CX_TMAX ? v : CX_TMAX;
            double o = (v - mx) - off;
            o = o > 0.0 ? o : 0.0;
            out[i * st] = (T)o;
        }
    }
}

int CX_SUF(cx_rows_fwd)(const T *x, T *out, int64_t k, int64_t inner, double total, int kind,
                        int64_t r0, int64_t r1)
{
    double stack[CX_ROWS_STACK];
    double *c = stack;
    if (k > CX_ROWS_STACK) {
        c = (double *)malloc(sizeof(double) * (size_t)k);
        if (c == NULL)
            return 2;
    }
    const struct cx_rows_par p = cx_rows_params(total, kind);
    if (inner == 1) {
        for (int64_t r = r0; r < r1; r++)
            CX_SUF(cx_rows_row)(x + r * k, out + r * k, k, 1, &p, c);
    } else {
        for (int64_t r = r0; r < r1; r++) {
            int64_t base = (r / inner) * k * inner + r % inner;
            CX_SUF(cx_rows_row)(x + base, out + base, k, inner, &p, c);
        }
    }
    if (c != stack)
        free(c);
    return 0;
}

/* The backward of one row (four partial sums, so that the additions overlap). */
static inline __attribute__((always_inline)) void
CX_SUF(cx_rows_vjp)(const T *y, const T *g, T *out, int64_t k, int64_t st, int kind)
{
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    double b0 = 0.0, b1 = 0.0, b2 = 0.0, b3 = 0.0;
    int64_t i = 0;
    if (kind == 0) {
        for (; i + 3 < k; i += 4) {
            double y0 = (double)y[i * st], y1 = (double)y[(i + 1) * st];
            double y2 = (double)y[(i + 2) * st], y3 = (double)y[(i + 3) * st];
            double g0 = (double)g[i * st], g1 = (double)g[(i + 1) * st];
            double g2 = (double)g[(i + 2) * st], g3 = (double)g[(i + 3) * st];
            s0 += y0 > 0.0 ? g0 : 0.0;
            s1 += y1 > 0.0 ? g1 : 0.0;
            s2 += y2 > 0.0 ? g2 : 0.0;
            s3 += y3 > 0.0 ? g3 : 0.0;
            b0 += y0 > 0.0 ? 1.0 : 0.0;
            b1 += y1 > 0.0 ? 1.0 : 0.0;
            b2 += y2 > 0.0 ? 1.0 : 0.0;
            b3 += y3 > 0.0 ? 1.0 : 0.0;
        }
        for (; i < k; i++) {
            double yi = (double)y[i * st];
            s0 += yi > 0.0 ? (double)g[i * st] : 0.0;
            b0 += yi > 0.0 ? 1.0 : 0.0;
        }
        double n = (b0 + b1) + (b2 + b3);
        double q = ((s0 + s1) + (s2 + s3)) / (n > 0.0 ? n : 1.0);
        for (i = 0; i < k; i++) {
            double o = (double)g[i * st] - q;
            out[i * st] = (T)(y[i * st] > 0 ? o : 0.0);
        }
        return;
    }
    /* s = sqrt(y) in <t> (as the ATen code takes it), kept in out for the second pass */
    for (; i + 3 < k; i += 4) {
        T r0 = CX_SQRT(y[i * st]), r1 = CX_SQRT(y[(i + 1) * st]);
        T r2 = CX_SQRT(y[(i + 2) * st]), r3 = CX_SQRT(y[(i + 3) * st]);
        out[i * st] = r0;
        out[(i + 1) * st] = r1;
        out[(i + 2) * st] = r2;
        out[(i + 3) * st] = r3;
        s0 += (double)r0 * (double)g[i * st];
        s1 += (double)r1 * (double)g[(i + 1) * st];
        s2 += (double)r2 * (double)g[(i + 2) * st];
        s3 += (double)r3 * (double)g[(i + 3) * st];
        b0 += (double)r0;
        b1 += (double)r1;
        b2 += (double)r2;
        b3 += (double)r3;
    }
    for (; i < k; i++) {
        T r = CX_SQRT(y[i * st]);
        out[i * st] = r;
        s0 += (double)r * (double)g[i * st];
        b0 += (double)r;
    }
    double b = (b0 + b1) + (b2 + b3);
    double q = ((s0 + s1) + (s2 + s3)) / (b < (double)CX_TINY ? (double)CX_TINY : b);
    for (i = 0; i < k; i++)
        out[i * st] = (T)((double)out[i * st] * ((double)g[i * st] - q));
}

void CX_SUF(cx_rows_bwd)(const T *y, const T *g, T *out, int64_t k, int64_t inner, int kind,
                         int64_t r0, int64_t r1)
{
    if (inner == 1) {
        for (int64_t r = r0; r < r1; r++)
            CX_SUF(cx_rows_vjp)(y + r * k, g + r * k, out + r * k, k, 1, kind);
    } else {
        for (int64_t r = r0; r < r1; r++) {
            int64_t base = (r / inner) * k * inner + r % inner;
            CX_SUF(cx_rows_vjp)(y + base, g + base, out + base, k, inner, kind);
        }
    }
}

#undef T
#endif
