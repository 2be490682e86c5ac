/* The capped-simplex projection of contiguous rows: p = clip(x - tau, l, u) with
 * sum p = total, exact to float64 rounding, no sort.
 *
 * Per row, the threshold tau of the non-increasing, piecewise-linear mass
 * m(tau) = sum clip(x - tau, l, u) is searched in a bracket [a, b] (m(a) >= total >= m(b))
 * by Illinois' false position, with Newton steps from the partition into lower / free /
 * upper entries where many are free, and a halving when two steps have not halved the
 * bracket. Each step visits only the entries that can still change state inside the
 * bracket: those at their lower bound for every tau >= a, or at their cap for every
 * tau <= b, are counted once and dropped (the others copied into a scratch buffer). The
 * search ends when the partition at tau reproduces tau (tau' = tau + (m(tau) - total) /
 * |free|, exact on that piece), or on a flat piece at the total.
 *
 * Long rows with scalar bounds first solve a strided sample (K / 16 entries, at most
 * CX_SAMPLE) for
 * two thresholds that bracket the row's with high probability, then make one pass over
 * the row that checks the bracket and keeps only the entries between the two: the row is
 * read twice in all (that pass and the output), whatever the search then takes. Where the
 * sample misses, the row is searched from its full bracket.
 *
 * Eight or more rows of at most CX_LANES_MAX_K entries whose bounds do not vary along the
 * row (a scalar, or one value a row) are searched CX_LANES at a time in lockstep
 * instead (cx_capped_lanes): transposed into a scratch of K x CX_LANES doubles, so that
 * each pass and each update of the search is a loop over the lanes that the compiler
 * vectorises, with no branch on the data. A row of ten entries then costs about 6 ns a
 * step instead of a mispredicted branch per decision (~40 ns); every fourth step, rows
 * longer than CX_LANES_COMPACT drop their settled entries as cx_pass does.
 *
 * Absent entries (x = -inf) are 0 and take no part. Bounds come as a pointer with a row
 * stride and a column stride (0 for a bound that does not vary along that axis), so a
 * scalar, a per-column vector, a per-row column and a full matrix need no copy.
 *
 * cx_capped_f32/f64 return 0, or 1 where a row holds NaN or +inf or a bound of -inf or
 * NaN (the caller then runs its torch loop), 2 where memory ran out, or 3 where a row's
 * bounds cannot meet the total (the caller raises its error).
 */
#ifndef CX_T
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define CX_CAPPED_MAX_STEPS 300
#define CX_SAMPLE 2048
#define CX_SAMPLE_MIN 512
#define CX_LANES 16
#define CX_LANES_MAX_K 4096
#define CX_LANES_COMPACT 32
#define CX_EPS64 2.220446049250313e-16

#define CX_T float
#define CX_SUF(name) name##_f32
#include "capped.c"
#undef CX_T
#undef CX_SUF

#define CX_T double
#define CX_SUF(name) name##_f64
#include "capped.c"
#undef CX_T
#undef CX_SUF

#else /* the kernels for one type CX_T */
#define T CX_T

/* One pass at tau over the active entries (x, l, u), with, when drop, the entries settled
 * for every tau in [a, b] counted into *cst and the others copied to (ox, ol, ou) (which
 * may be x, l, u themselves). Branch-free: the classifications of random data would
 * mispredict. Returns the mass over the kept entries and sets *nf to their free count. */
static double CX_SUF(cx_pass)(const T *x, const T *lo, int64_t lcs, const T *up, int64_t ucs,
                              int64_t m, double tau, int drop, double a, double b, double *cst,
                              T *ox, T *ol, T *ou, int64_t *kept, int64_t *nf)
{
    double s0 = 0.0, s1 = 0.0, c = 0.0;
    int64_t n0 = 0, n1 = 0, kk = 0;
    if (lcs == 0 && ucs == 0) {
        const double l = (double)lo[0], u = (double)up[0];
        if (!drop) {
            int64_t i = 0;
            for (; i + 1 < m; i += 2) {
                double d0 = (double)x[i] - tau, d1 = (double)x[i + 1] - tau;
                n0 += (d0 > l) & (d0 < u);
                n1 += (d1 > l) & (d1 < u);
                d0 = d0 < l ? l : d0;
                d1 = d1 < l ? l : d1;
                s0 += d0 > u ? u : d0;
                s1 += d1 > u ? u : d1;
            }
            for (; i < m; i++) {
                double d0 = (double)x[i] - tau;
                n0 += (d0 > l) & (d0 < u);
                d0 = d0 < l ? l : d0;
                s0 += d0 > u ? u : d0;
            }
            *nf = n0 + n1;
            *kept = m;
            return s0 + s1;
        }
        int64_t n_lo = 0, n_up = 0;
        for (int64_t i = 0; i < m; i++) {
            T xv = x[i];
            double v = (double)xv, d = v - tau;
            int at_l = (v - a) <= l, at_u = (v - b) >= u;
            at_u &= !at_l;
            int keep = !(at_l | at_u);
            n_lo += at_l;
            n_up += at_u;
            ox[kk] = xv;
            kk += keep;
            n0 += keep & (d > l) & (d < u);
            d = d < l ? l : d;
            d = d > u ? u : d;
            s0 += (double)keep * d; /* a select would become a branch */
        }
        *cst += (double)n_lo * l + (n_up > 0 ? (double)n_up * u : 0.0);
        *nf = n0;
        *kept = kk;
        return s0;
    }
    for (int64_t i = 0; i < m; i++) {
        T xv = x[i], lv = lo[i * lcs], uv = up[i * ucs];
        double v = (double)xv, l = (double)lv, u = (double)uv;
        double d = v - tau;
        int keep = 1;
        if (drop) {
            int at_l = (v - a) <= l, at_u = !at_l && (v - b) >= u;
            c += (double)at_l * l + (at_u ? u : 0.0);
            keep = !(at_l | at_u);
            ox[kk] = xv;
            ol[kk] = lv;
            ou[kk] = uv;
            kk += keep;
        }
        n0 += keep & (d > l) & (d < u);
        d = d < l ? l : d;
        d = d > u ? u : d;
        s0 += (double)keep * d;
    }
    *cst += c;
    *nf = n0;
    *kept = drop ? kk : m;
    return s0;
}

/* The search on the active entries (ax, al, au) of a bracket [a, b] with m(a) - total = fa
 * >= 0 >= fb = m(b) - total (fa may be inf), cst the mass of the entries already dropped,
 * from tau. Drops into (sx, sl, su) (sl, su used only with per-entry bounds). */
static double CX_SUF(cx_search)(const T *ax, const T *al, int64_t acs_l, const T *au,
                                int64_t acs_u, int64_t m, double total, double a, double b,
                                double fa, double fb, double cst, double tau, int drop0, T *sx,
                                T *sl, T *su, int64_t k)
{
    const double eps = 4.0 * CX_EPS64;
    const double tol =
        4.0 * CX_EPS64 * (fabs(total) > 1.0 ? fabs(total) : 1.0) * (double)(k + 2);
    int per_entry = (acs_l != 0 || acs_u != 0);
    int a_seen = 0, b_seen = 0, side = 0;
    double w1 = INFINITY, w2 = INFINITY; /* the bracket's width 1 and 2 steps ago */
    for (int step = 0; step < CX_CAPPED_MAX_STEPS; step++) {
        int64_t nf = 0, kept = 0;
        int drop = step > 0 || drop0;
        double mass = CX_SUF(cx_pass)(ax, al, acs_l, au, acs_u, m, tau, drop, a, b, &cst, sx,
                                      sl, su, &kept, &nf);
        if (drop) {
            ax = sx;
            m = kept;
            if (per_entry) {
                al = sl;
                au = su;
                acs_l = 1;
                acs_u = 1;
            }
        }
        double f = cst + mass - total; /* m(tau) - total */
        double t2 = nf > 0 ? tau + f / (double)nf : tau; /* Newton on this piece */
        if (nf > 0 ? fabs(t2 - tau) <= eps * (fabs(tau) > 1.0 ? fabs(tau) : 1.0)
                   : fabs(f) <= tol)
            return t2; /* the partition reproduces tau (or a flat piece at the total) */
        if (f > 0) {
            a = tau;
            fa = f;
            a_seen = 1;
            if (side > 0)
                fb *= 0.5; /* Illinois */
            side = 1;
        } else {
            b = tau;
            fb = f;
            b_seen = 1;
            if (side < 0)
                fa *= 0.5;
            side = -1;
        }
        /* false position on the bracket, or Newton inside it where many entries are free
         * (at an end only if not tried there); a halving when two steps have not halved
         * the bracket */
        double fp = a + fa * (b - a) / (fa - fb);
        int ok = (t2 > a && t2 < b) || (t2 == a && !a_seen) || (t2 == b && !b_seen);
        if ((b - a) > 0.5 * w2)
            tau = 0.5 * (a + b);
        else if (nf > 0 && ok && step > 0 && nf * 8 >= m)
            tau = t2;
        else if (fp > a && fp < b)
            tau = fp;
        else if (nf > 0 && ok)
            tau = t2;
        else
            tau = 0.5 * (a + b);
        w2 = w1;
        w1 = b - a;
        if (!(b - a > eps * (fabs(a) > fabs(b) ? fabs(a) : fabs(b))))
            break; /* the bracket is one float wide */
    }
    return tau;
}

/* The row's threshold from a strided sample and one pass (scalar bounds, long rows);
 * returns 0 and sets *tau, or 1 (bad values: NaN, +inf), or -1 (the sample missed: the
 * caller searches the whole row). */
static int CX_SUF(cx_sampled)(const T *x, int64_t k, double l, double u, double total,
                              T *scratch, double *tau_out)
{
    int64_t size = k / 16 < CX_SAMPLE ? k / 16 : CX_SAMPLE;
    int64_t stride = k / size;
    int64_t ns = 0;
    T *s1 = scratch + k, *s2 = s1 + size, *s3 = s2 + size;
    double smin = INFINITY, smax = -INFINITY;
    for (int64_t j = 0; j < size; j++) {
        T v = x[j * stride + stride / 2];
        double dv = (double)v;
        if (!(dv > -INFINITY && dv < INFINITY))
            continue;
        s1[ns] = v;
        s2[ns] = v;
        s3[ns] = v;
        smin = dv < smin ? dv : smin;
        smax = dv > smax ? dv : smax;
        ns++;
    }
    if (ns < size / 2)
        return -1;
    double lv = l, uv = u;
    T lt = (T)l, ut = (T)u;
    double ts = total * (double)ns / (double)k;
    double lim_lo = (double)ns * l, lim_up = isfinite(u) ? (double)ns * u : INFINITY;
    double a = isfinite(u) ? smin - u : smax - l - (ts - lim_lo);
    double b = smax - l;
    if (!(ts > lim_lo && ts < lim_up))
        return -1;
    double fa = isfinite(u) ? lim_up - ts : INFINITY;
    double t_mid = CX_SUF(cx_search)(s1, &lt, 0, &ut, 0, ns, ts, a < b ? a : b, b, fa,
                                     lim_lo - ts, 0.0, 0.5 * (a + b), 0, s1, NULL, NULL, ns);
    /* a margin of about 4 standard deviations of the sample's mass */
    double c2 = 0.0;
    for (int64_t j = 0; j < ns; j++) {
        double d = (double)s2[j] - t_mid;
        d = d < lv ? lv : d;
        d = d > uv ? uv : d;
        c2 += (d - lv) * (d - lv);
    }
    double delta = 4.0 * sqrt(c2 + 1e-300);
    double t_hi_total = ts - delta, t_lo_total = ts + delta;
    if (!(t_hi_total > lim_lo))
        t_hi_total = 0.5 * (lim_lo + ts);
    if (!(t_lo_total < lim_up))
        t_lo_total = isfinite(lim_up) ? 0.5 * (lim_up + ts) : ts + delta;
    double t_lo = CX_SUF(cx_search)(s2, &lt, 0, &ut, 0, ns, t_lo_total, a < b ? a : b, b,
                                    isfinite(u) ? lim_up - t_lo_total : INFINITY,
                                    lim_lo - t_lo_total, 0.0, t_mid, 0, s2, NULL, NULL, ns);
    double t_hi = CX_SUF(cx_search)(s3, &lt, 0, &ut, 0, ns, t_hi_total, a < b ? a : b, b,
                                    isfinite(u) ? lim_up - t_hi_total : INFINITY,
                                    lim_lo - t_hi_total, 0.0, t_mid, 0, s3, NULL, NULL, ns);
    if (!(t_lo < t_hi))
        return -1;
    /* one pass: the masses at t_lo and t_hi, the entries between them kept */
    double m_lo = 0.0, m_hi = 0.0;
    int64_t n_lo = 0, n_up = 0, n_abs = 0, kk = 0, nf_lo = 0, nf_hi = 0;
    int bad = 0;
    for (int64_t i = 0; i < k; i++) {
        T xv = x[i];
        double v = (double)xv;
        bad |= (v != v) | (v == INFINITY);
        n_abs += v == -INFINITY;
        double d1 = v - t_lo, d2 = v - t_hi;
        int at_l = d1 <= lv, at_u = d2 >= uv;
        at_u &= !at_l;
        n_lo += at_l;
        n_up += at_u;
        scratch[kk] = xv;
        kk += !(at_l | at_u);
        nf_lo += (d1 > lv) & (d1 < uv);
        nf_hi += (d2 > lv) & (d2 < uv);
        d1 = d1 < lv ? lv : d1;
        d1 = d1 > uv ? uv : d1;
        d2 = d2 < lv ? lv : d2;
        d2 = d2 > uv ? uv : d2;
        m_lo += d1;
        m_hi += d2;
    }
    if (bad)
        return 1;
    double n = (double)(k - n_abs), ftol = 1e-12 * (fabs(total) > 1.0 ? fabs(total) : 1.0) * k;
    if (n > 0 && (n * lv > total + ftol || (isfinite(uv) && n * uv < total - ftol)))
        return 3;
    double absent = (double)n_abs * lv;
    double f_lo = m_lo - absent - total, f_hi = m_hi - absent - total;
    if (f_lo == 0.0 || f_hi == 0.0) {
        /* exact at a sample threshold if free entries make the piece unique */
        *tau_out = f_lo == 0.0 ? t_lo : t_hi;
        return 0;
    }
    if (!(f_lo > 0.0 && f_hi < 0.0))
        return -1;
    double cst = (double)n_lo * lv + (n_up > 0 ? (double)n_up * uv : 0.0) - absent;
    double tau0 = t_lo + f_lo * (t_hi - t_lo) / (f_lo - f_hi);
    (void)nf_lo;
    (void)nf_hi;
    *tau_out = CX_SUF(cx_search)(scratch, &lt, 0, &ut, 0, kk, total, t_lo, t_hi, f_lo, f_hi,
                                 cst, tau0, 0, scratch, NULL, NULL, k);
    return 0;
}

/* out = clamp(x - tau, l, u) with scalar bounds; -inf entries (absent) get 0. */
static inline void CX_SUF(cx_clip)(const T *x, T *out, int64_t k, double tau, double l,
                                   double u)
{
    for (int64_t i = 0; i < k; i++) {
        double v = (double)x[i];
        double d = v - tau;
        d = d < l ? l : d;
        d = d > u ? u : d;
        out[i] = (T)(v > -INFINITY ? d : 0.0);
    }
}

static int CX_SUF(cx_capped_row)(const T *x, T *out, int64_t k, const T *lo, int64_t lcs,
                                 const T *up, int64_t ucs, double total, T *scratch)
{
    double tau = 0.0;
    int rc = -1;
    int scalar = lcs == 0 && ucs == 0;
    if (scalar && k >= CX_SAMPLE_MIN && (double)lo[0] > -INFINITY && lo[0] == lo[0] &&
        up[0] == up[0])
        rc = CX_SUF(cx_sampled)(x, k, (double)lo[0], (double)up[0], total, scratch, &tau);
    if (rc > 0)
        return rc;
    if (rc < 0) {
        /* pass 0: bracket, counts and sums; absent entries (-inf) count at l (undone by
         * cst's start) until the first drop removes them */
        int64_t n = 0;
        double sx = 0.0, sl = 0.0, sl_abs = 0.0, hi = -INFINITY, lo1 = INFINITY;
        double lo2 = -INFINITY, su = 0.0;
        int any_inf_u = 0, bad = 0;
        for (int64_t i = 0; i < k; i++) {
            double v = (double)x[i], l = (double)lo[i * lcs], u = (double)up[i * ucs];
            int present = v > -INFINITY;
            bad |= (v != v) | (v == INFINITY) | (l == -INFINITY) | (l != l) | (u != u);
            n += present;
            sx += present ? v : 0.0;
            sl += present ? l : 0.0;
            sl_abs += present ? 0.0 : l;
            su += (present && u < INFINITY) ? u : 0.0;
            double vl = present ? v - l : -INFINITY;
            hi = vl > hi ? vl : hi;
            double vu = (present && u < INFINITY) ? v - u : INFINITY;
            lo1 = vu < lo1 ? vu : lo1;
            int inf_u = present && !(u < INFINITY);
            any_inf_u |= inf_u;
            double w = inf_u ? vl : -INFINITY;
            lo2 = w > lo2 ? w : lo2;
        }
        if (bad)
            return 1;
        if (n == 0) {
            for (int64_t i = 0; i < k; i++)
                out[i] = (T)0;
            return 0;
        }
        if (!isfinite(hi) || !isfinite(sl))
            return 1;
        double ftol = 1e-12 * (fabs(total) > 1.0 ? fabs(total) : 1.0) * (double)k;
        if (sl > total + ftol || (!any_inf_u && su < total - ftol))
            return 3;
        double a = lo1;
        if (any_inf_u && lo2 - (total - sl) < a)
            a = lo2 - (total - sl);
        double b = hi;
        if (a > b)
            a = b;
        if (!isfinite(a))
            return 1;
        /* the tau of the hyperplane alone, kept inside the bracket */
        tau = (sx - total) / (double)n;
        if (!(tau > a && tau < b))
            tau = 0.5 * (a + b);
        int per_entry = !scalar;
        tau = CX_SUF(cx_search)(x, lo, lcs, up, ucs, k, total, a, b,
                                any_inf_u ? INFINITY : su - total, sl - total, -sl_abs, tau, 0,
                                scratch, per_entry ? scratch + k : NULL,
                                per_entry ? scratch + 2 * k : NULL, k);
    }
    if (scalar) {
        CX_SUF(cx_clip)(x, out, k, tau, (double)lo[0], (double)up[0]);
        return 0;
    }
    for (int64_t i = 0; i < k; i++) {
        double v = (double)x[i];
        double l = (double)lo[i * lcs], u = (double)up[i * ucs];
        double d = v - tau;
        d = d < l ? l : d;
        d = d > u ? u : d;
        out[i] = (T)(v > -INFINITY ? d : 0.0);
    }
    return 0;
}

/* Drops from each lane of `soa` (ka entries a lane) the entries settled for every tau of
 * the lane's bracket [a, b] (at the lower bound for every tau >= a, at the cap for every
 * tau <= b), counting their mass into cst; the lanes are then padded to the longest with
 * -inf (which the passes count at l, undone in cst). Returns the new length; nk gets each
 * lane's kept count. */
static int64_t CX_SUF(cx_lanes_compact)(double *soa, int64_t ka, const double *l,
                                        const double *u, const double *a, const double *b,
                                        double *cst, double *nk)
{
    enum { L = CX_LANES };
    int64_t len = 0;
    for (int r = 0; r < L; r++) {
        const double lr = l[r], ur = u[r], ar = a[r], br = b[r];
        int64_t j = 0, n_lo = 0, n_up = 0;
        for (int64_t i = 0; i < ka; i++) {
            double v = soa[i * L + r];
            int at_l = (v - ar) <= lr, at_u = (v - br) >= ur;
            at_u &= !at_l;
            n_lo += at_l;
            n_up += at_u;
            soa[j * L + r] = v;
            j += !(at_l | at_u);
        }
        cst[r] += (double)n_lo * lr + (n_up > 0 ? (double)n_up * ur : 0.0);
        nk[r] = (double)j;
        len = j > len ? j : len;
    }
    for (int r = 0; r < L; r++) {
        for (int64_t j = (int64_t)nk[r]; j < len; j++)
            soa[j * L + r] = -INFINITY;
        cst[r] -= (double)(len - (int64_t)nk[r]) * l[r];
    }
    return len;
}

/* CX_LANES rows at once (bounds scalar along each row): the rows are transposed into
 * `soa` (K x CX_LANES doubles, entry i of lane r at soa[i * CX_LANES + r]) and searched
 * in lockstep, so that every pass and every update is a loop over the lanes that the
 * compiler vectorises, with no branch on the data: short rows cost a few nanoseconds a
 * step instead of a mispredicted branch per decision. The search is the same safeguarded
 * false position / Newton as cx_search's, without the drops (every pass visits the whole
 * row). `nrows` <= CX_LANES rows; the lanes past them repeat the first row. */
static int CX_SUF(cx_capped_lanes)(const T *x, T *out, int64_t k, int64_t nrows, const T *lo,
                                   int64_t lrs, const T *up, int64_t urs, double total,
                                   double *soa)
{
    enum { L = CX_LANES };
    double l[L], u[L], n[L], sx[L], mn[L], mx[L], bad[L], tau[L], a[L], b[L], fa[L], fb[L];
    double cst[L], w1[L], w2[L], side[L], done[L], s[L], nf[L], nk[L];
    int64_t ka = k; /* the entries per lane still visited (see cx_lanes_compact) */
    const double eps = 4.0 * CX_EPS64;
    const double tol = 4.0 * CX_EPS64 * (fabs(total) > 1.0 ? fabs(total) : 1.0) * (double)(k + 2);
    const double ftol = 1e-12 * (fabs(total) > 1.0 ? fabs(total) : 1.0) * (double)k;
    for (int r = 0; r < L; r++) {
        int64_t src = r < nrows ? r : 0;
        l[r] = (double)lo[src * lrs];
        u[r] = (double)up[src * urs];
        const T *xr = x + src * k;
        for (int64_t i = 0; i < k; i++)
            soa[i * L + r] = (double)xr[i];
        n[r] = sx[r] = bad[r] = 0.0;
        mn[r] = INFINITY;
        mx[r] = -INFINITY;
    }
    for (int64_t i = 0; i < k; i++) {
        const double *col = soa + i * L;
        for (int r = 0; r < L; r++) {
            double v = col[r];
            int present = v > -INFINITY;
            bad[r] += (double)((v != v) | (v == INFINITY));
            n[r] += (double)present;
            sx[r] += present ? v : 0.0;
            double vmx = present ? v : -INFINITY, vmn = present ? v : INFINITY;
            mx[r] = vmx > mx[r] ? vmx : mx[r];
            mn[r] = vmn < mn[r] ? vmn : mn[r];
        }
    }
    for (int r = 0; r < L; r++) {
        if (bad[r] > 0.0 || !(l[r] > -1e300 && l[r] < 1e300) || u[r] != u[r])
            return 1;
        done[r] = 0.0;
        if (n[r] == 0.0) { /* nothing present: zeros */
            done[r] = 1.0;
            tau[r] = 0.0;
            continue;
        }
        int finite_u = u[r] < INFINITY;
        if (n[r] * l[r] > total + ftol || (finite_u && n[r] * u[r] < total - ftol))
            return 3;
        double hi = mx[r] - l[r];
        double lo1 = finite_u ? mn[r] - u[r] : hi - (total - n[r] * l[r]);
        a[r] = lo1 < hi ? lo1 : hi;
        b[r] = hi;
        if (!isfinite(a[r]) || !isfinite(b[r]))
            return 1;
        fa[r] = finite_u ? n[r] * u[r] - total : INFINITY;
        fb[r] = n[r] * l[r] - total;
        cst[r] = -((double)k - n[r]) * l[r]; /* absent entries count at l in the passes */
        double t0 = (sx[r] - total) / n[r]; /* the hyperplane's tau, kept in the bracket */
        tau[r] = (t0 > a[r] && t0 < b[r]) ? t0 : 0.5 * (a[r] + b[r]);
        w1[r] = w2[r] = INFINITY;
        side[r] = 0.0;
        nk[r] = n[r];
    }
    for (int step = 0; step < CX_CAPPED_MAX_STEPS; step++) {
        int all = 1;
        for (int r = 0; r < L; r++)
            all &= done[r] != 0.0;
        if (all)
            break;
        if (step % 4 == 3 && ka > CX_LANES_COMPACT)
            ka = CX_SUF(cx_lanes_compact)(soa, ka, l, u, a, b, cst, nk);
        for (int r = 0; r < L; r++)
            s[r] = nf[r] = 0.0;
        for (int64_t i = 0; i < ka; i++) {
            const double *col = soa + i * L;
            for (int r = 0; r < L; r++) {
                double d = col[r] - tau[r];
                nf[r] += (double)((d > l[r]) & (d < u[r]));
                d = d < l[r] ? l[r] : d;
                d = d > u[r] ? u[r] : d;
                s[r] += d;
            }
        }
        /* The update, as selects over the lanes (cx_search's rules, except that a Newton
         * step may land on a bracket end already visited: the halving rule then moves on).
         * Every flag is a double 0/1, every value computed unconditionally, and no select
         * nests one with the same fallback: the loop then vectorises. */
        const double late = step > 0 ? 1.0 : 0.0;
        for (int r = 0; r < L; r++) {
            double t = tau[r], f = cst[r] + s[r] - total, m = nf[r], dn = done[r];
            double t2 = t + f / (m > 0.0 ? m : 1.0); /* Newton on this piece (t: none free) */
            double at = fabs(t) > 1.0 ? fabs(t) : 1.0;
            double e = m > 0.0 ? fabs(t2 - t) - eps * at : fabs(f) - tol;
            double conv = e <= 0.0 ? 1.0 : 0.0; /* partition reproduces tau, or flat at total */
            double upd = dn == 0.0 ? 1.0 - conv : 0.0;
            double pos = f > 0.0 ? 1.0 : 0.0;
            double upos = upd * pos, uneg = upd - upos;
            double A = upos != 0.0 ? t : a[r], B = uneg != 0.0 ? t : b[r];
            double sd = side[r];
            double ill_b = sd > 0.0 ? upos : 0.0, ill_a = sd < 0.0 ? uneg : 0.0; /* Illinois */
            double FB = ill_b != 0.0 ? 0.5 * fb[r] : fb[r];
            double FA = ill_a != 0.0 ? 0.5 * fa[r] : fa[r];
            FA = upos != 0.0 ? f : FA;
            FB = uneg != 0.0 ? f : FB;
            double fp = A + FA * (B - A) / (FA - FB);
            double in_lo = t2 >= A ? 1.0 : 0.0, in_hi = t2 <= B ? 1.0 : 0.0;
            double newton = (m > 0.0 ? 1.0 : 0.0) * in_lo * in_hi;
            double mid = 0.5 * (A + B);
            double fp_lo = fp > A ? 1.0 : 0.0, fp_hi = fp < B ? 1.0 : 0.0;
            double pick = newton != 0.0 ? t2 : mid;
            pick = fp_lo * fp_hi != 0.0 ? fp : pick;
            double many = m * 8.0 >= nk[r] ? late : 0.0;
            pick = newton * many != 0.0 ? t2 : pick;
            pick = (B - A) > 0.5 * w2[r] ? mid : pick;
            double wide = fabs(A) > fabs(B) ? fabs(A) : fabs(B);
            double narrow = (B - A) > eps * wide ? 0.0 : upd; /* the bracket is one float wide */
            double next = conv != 0.0 ? t2 : pick;
            tau[r] = dn == 0.0 ? next : t;
            done[r] = dn + conv + narrow > 0.0 ? 1.0 : 0.0;
            a[r] = A;
            b[r] = B;
            fa[r] = FA;
            fb[r] = FB;
            side[r] = upd != 0.0 ? 2.0 * pos - 1.0 : sd;
            double w1r = w1[r];
            w2[r] = upd != 0.0 ? w1r : w2[r];
            w1[r] = upd != 0.0 ? B - A : w1r;
        }
    }
    for (int64_t r = 0; r < nrows; r++) {
        CX_SUF(cx_clip)(x + r * k, out + r * k, k, tau[r], l[r], u[r]);
    }
    return 0;
}

int CX_SUF(cx_capped)(const T *x, T *out, int64_t k, const T *lo, int64_t lrs, int64_t lcs,
                      const T *up, int64_t urs, int64_t ucs, double total, int64_t r0,
                      int64_t r1)
{
    int rc = 0;
    if (lcs == 0 && ucs == 0 && k > 0 && k <= CX_LANES_MAX_K && r1 - r0 >= CX_LANES / 2) {
        double *soa = (double *)malloc(sizeof(double) * (size_t)(CX_LANES * k));
        if (soa == NULL)
            return 2;
        for (int64_t r = r0; r < r1 && rc == 0; r += CX_LANES) {
            int64_t nr = r1 - r < CX_LANES ? r1 - r : CX_LANES;
            rc = CX_SUF(cx_capped_lanes)(x + r * k, out + r * k, k, nr, lo + r * lrs, lrs,
                                         up + r * urs, urs, total, soa);
        }
        free(soa);
        return rc;
    }
    T *scratch = (T *)malloc(sizeof(T) * (size_t)(k > 0 ? 3 * k : 1));
    if (scratch == NULL)
        return 2;
    for (int64_t r = r0; r < r1 && rc == 0; r++)
        rc = CX_SUF(cx_capped_row)(x + r * k, out + r * k, k, lo + r * lrs, lcs, up + r * urs,
                                   ucs, total, scratch);
    free(scratch);
    return rc;
}

#undef T
#endif
