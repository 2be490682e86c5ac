/* Native CPU kernels for convexmix.functional.convex_combination (private).
 *
 * Built at install time by setup.py, once per instruction set (x86-64: baseline, avx2,
 * avx512; elsewhere one baseline build), never with -march=native, and loaded with
 * ctypes by convexmix/_kernels/native.py: the baseline library says which builds the CPU
 * supports (cx_isa_supported) and the widest of those is loaded. Without them (no
 * compiler at install) convexmix runs its blocked ATen loop instead. Plain C, no Python
 * or torch headers, so one build serves every Python and every torch.
 *
 * Every function works on the flat element range [lo, hi) of contiguous tensors, so the
 * caller can split one call over threads (ctypes releases the GIL):
 *
 *   cx_fwd_<t>(xs, w, K, out, lo, hi, nt)
 *       out[i] = sum_k w[k] * xs[k][i]
 *   cx_bwd_<t>(g, xs, w, K, dots, gxs, lo, hi, nt)
 *       dots[k] += sum_i g[i] * xs[k][i]        when dots != NULL
 *       gxs[k][i] = w[k] * g[i]                 for each gxs[k] != NULL
 *   cx_isa()                 the instruction set this library was built for
 *   cx_source_hash()         the hash of the sources it was built from
 *   cx_isa_supported(name)   1 if this CPU and OS can run the build `name`, else 0
 *
 * <t> is the storage type: f64 (accumulates in double); f32, bf16 and f16 (accumulate in
 * float). The work goes in chunks of CH elements whose accumulators stay in registers
 * while the K inputs stream past, so each input is read once and each output written
 * once. With nt != 0 (large outputs, 64-byte aligned at lo) outputs are written with
 * non-temporal stores, which skip reading the destination line first.
 *
 * The forward sums over k in order with one multiply-add per input. The dot products
 * keep CH float partial sums per input that take at most FLUSH chunks of products before
 * they are added into a double total: each partial sums FLUSH products, so the error is
 * at most about FLUSH float ulps of sum |g x| whatever the length.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#ifndef CX_ISA
#define CX_ISA "unknown"
#endif
#ifndef CX_SOURCE_HASH
#define CX_SOURCE_HASH ""
#endif

const char *cx_isa(void) { return CX_ISA; }

const char *cx_source_hash(void) { return CX_SOURCE_HASH; }

/* Whether the build `name` runs here. On x86 this is cpuid through the compiler's
 * runtime (__builtin_cpu_supports, which also checks that the OS saves the AVX and
 * AVX-512 registers); unknown names and other architectures' builds are 0. */
int cx_isa_supported(const char *name) {
    if (!strcmp(name, CX_ISA)) return 1;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                     __builtin_cpu_supports("f16c");
    if (!strcmp(name, "x86-64")) return 1;
    if (!strcmp(name, "avx2")) return avx2;
    if (!strcmp(name, "avx512"))
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
    return 0;
}

#define CH 64    /* elements per chunk: 4 AVX-512 float registers */
#define FLUSH 16 /* chunks of products per float partial sum */
#define DOT_BLOCK 131072 /* bytes of g kept in (L2) cache while the inputs stream past it */
#define DOT_AHEAD 1024 /* bytes ahead that the one input stream is prefetched */
/* How far ahead (bytes) each of `streams` inputs is prefetched. The hardware prefetchers
 * stop at 4 KiB pages and lose track of many streams, so software prefetch helps, but
 * the lines in flight must fit the core's buffers: about 16 KiB over all streams
 * measured best. The forward with more than 16 inputs runs best with none at all, as
 * its output stores then compete for the same buffers. (The figures are in
 * docs/benchmarks.md.) */
static inline size_t ahead_bytes(int64_t streams, int forward) {
    if (forward && streams > 17) return 0;
    size_t ahead = (size_t)(16384 / streams) & ~(size_t)63;
    return ahead > 4096 ? 4096 : ahead < 256 ? 256 : ahead;
}

/* Asks for the lines of one chunk `ahead` bytes further on (a hint: never faults). */
#define PREFETCH(p, T, ahead)                                                              \
    if (ahead)                                                                             \
        for (size_t b_ = 0; b_ < CH * sizeof(T); b_ += 64)                                 \
    __builtin_prefetch((const char *)(p) + b_ + (ahead), 0, 1)

typedef uint16_t bf16_t;

static inline float bf16_load(bf16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (bf16_t)(u >> 16);
}

/* Copies one chunk (a multiple of 64 bytes) to dst, bypassing the cache when nt. */
static inline void put(void *dst, const void *src, size_t bytes, int nt) {
#if defined(__AVX512F__)
    if (nt) {
        for (size_t b = 0; b < bytes; b += 64)
            _mm512_stream_si512((void *)((char *)dst + b),
                                _mm512_loadu_si512((const void *)((const char *)src + b)));
        return;
    }
#elif defined(__AVX__)
    if (nt) {
        for (size_t b = 0; b < bytes; b += 32)
            _mm256_stream_si256((__m256i *)((char *)dst + b),
                                _mm256_loadu_si256((const __m256i *)((const char *)src + b)));
        return;
    }
#endif
    (void)nt;
    memcpy(dst, src, bytes);
}

static inline void fence(int nt) {
#if defined(__AVX512F__) || defined(__AVX__)
    if (nt) _mm_sfence();
#endif
    (void)nt;
}

#define ID(x) (x)

#define DEFINE_KERNELS(NAME, T, ACC, LOAD, STORE)                                          \
    void cx_fwd_##NAME(const T *const *xs, const ACC *w, int64_t K, T *out, int64_t lo,    \
                       int64_t hi, int nt) {                                               \
        const size_t ahead = ahead_bytes(K + 1, 1);                                        \
        int64_t i = lo;                                                                    \
        for (; i + CH <= hi; i += CH) {                                                    \
            ACC acc[CH];                                                                   \
            T res[CH];                                                                     \
            const T *x0 = xs[0] + i;                                                       \
            const ACC w0 = w[0];                                                           \
            PREFETCH(x0, T, ahead);                                                        \
            for (int j = 0; j < CH; ++j) acc[j] = w0 * LOAD(x0[j]);                        \
            for (int64_t k = 1; k < K; ++k) {                                              \
                const T *xk = xs[k] + i;                                                   \
                const ACC wk = w[k];                                                       \
                PREFETCH(xk, T, ahead);                                                    \
                for (int j = 0; j < CH; ++j) acc[j] += wk * LOAD(xk[j]);                   \
            }                                                                              \
            for (int j = 0; j < CH; ++j) res[j] = STORE(acc[j]);                           \
            put(out + i, res, sizeof res, nt);                                             \
        }                                                                                  \
        for (; i < hi; ++i) {                                                              \
            ACC a = w[0] * LOAD(xs[0][i]);                                                 \
            for (int64_t k = 1; k < K; ++k) a += w[k] * LOAD(xs[k][i]);                    \
            out[i] = STORE(a);                                                             \
        }                                                                                  \
        fence(nt);                                                                         \
    }                                                                                      \
                                                                                           \
    /* The weights' gradient alone: blocks of DOT_BLOCK bytes of g, each kept in cache    \
     * while the K inputs stream past one at a time (one memory stream per inner loop:     \
     * the hardware prefetchers follow it, where K + 1 interleaved streams lose them).     \
     * The same float partial sums of FLUSH chunks, added in double. */                    \
    static int dots_##NAME(const T *g, const T *const *xs, int64_t K, double *dots,        \
                           int64_t lo, int64_t hi) {                                       \
        const int64_t bl = DOT_BLOCK / (int64_t)sizeof(T);                                 \
        for (int64_t b = lo; b < hi; b += bl) {                                            \
            const int64_t e = b + bl < hi ? b + bl : hi;                                   \
            const int64_t full = b + (e - b) / CH * CH;                                    \
            for (int64_t k = 0; k < K; ++k) {                                              \
                const T *xk = xs[k];                                                       \
                ACC p[CH];                                                                 \
                double t = 0.0;                                                            \
                int64_t c = 0;                                                             \
                memset(p, 0, sizeof p);                                                    \
                for (int64_t i = b; i < full; i += CH) {                                   \
                    PREFETCH(xk + i, T, DOT_AHEAD);                                        \
                    for (int j = 0; j < CH; ++j) p[j] += LOAD(g[i + j]) * LOAD(xk[i + j]); \
                    if (++c % FLUSH == 0) {                                                \
                        for (int j = 0; j < CH; ++j) t += (double)p[j];                    \
                        memset(p, 0, sizeof p);                                            \
                    }                                                                      \
                }                                                                          \
                for (int j = 0; j < CH; ++j) t += (double)p[j];                            \
                for (int64_t r = full; r < e; ++r)                                         \
                    t += (double)LOAD(g[r]) * (double)LOAD(xk[r]);                         \
                dots[k] += t;                                                              \
            }                                                                              \
        }                                                                                  \
        return 0;                                                                          \
    }                                                                                      \
                                                                                           \
    int cx_bwd_##NAME(const T *g, const T *const *xs, const ACC *w, int64_t K,             \
                      double *dots, T *const *gxs, int64_t lo, int64_t hi, int nt) {       \
        int any_gx = 0;                                                                    \
        for (int64_t k = 0; gxs && k < K; ++k) any_gx |= gxs[k] != NULL;                   \
        if (dots && !any_gx) return dots_##NAME(g, xs, K, dots, lo, hi);                   \
        ACC *part = NULL;                                                                  \
        if (dots) {                                                                        \
            part = (ACC *)calloc((size_t)K * CH, sizeof(ACC));                             \
            if (!part) return 1;                                                           \
        }                                                                                  \
        const size_t ahead = ahead_bytes(K + 1, 0);                                        \
        int64_t i = lo, chunks = 0;                                                        \
        for (; i + CH <= hi; i += CH) {                                                    \
            ACC gc[CH];                                                                    \
            PREFETCH(g + i, T, ahead);                                                     \
            for (int j = 0; j < CH; ++j) gc[j] = LOAD(g[i + j]);                           \
            const int flush = dots && ++chunks % FLUSH == 0;                               \
            for (int64_t k = 0; k < K; ++k) {                                              \
                if (dots) {                                                                \
                    const T *xk = xs[k] + i;                                               \
                    ACC *p = part + k * CH;                                                \
                    PREFETCH(xk, T, ahead);                                                \
                    for (int j = 0; j < CH; ++j) p[j] += gc[j] * LOAD(xk[j]);              \
                    if (flush) {                                                           \
                        double t = 0.0;                                                    \
                        for (int j = 0; j < CH; ++j) t += (double)p[j];                    \
                        dots[k] += t;                                                      \
                        memset(p, 0, CH * sizeof(ACC));                                    \
                    }                                                                      \
                }                                                                          \
                if (gxs && gxs[k]) {                                                       \
                    T res[CH];                                                             \
                    const ACC wk = w[k];                                                   \
                    for (int j = 0; j < CH; ++j) res[j] = STORE(wk * gc[j]);               \
                    put(gxs[k] + i, res, sizeof res, nt);                                  \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        for (int64_t k = 0; k < K; ++k) {                                                  \
            if (dots) {                                                                    \
                double t = 0.0;                                                            \
                const ACC *p = part + k * CH;                                              \
                for (int j = 0; j < CH; ++j) t += (double)p[j];                            \
                for (int64_t r = i; r < hi; ++r)                                           \
                    t += (double)LOAD(g[r]) * (double)LOAD(xs[k][r]);                      \
                dots[k] += t;                                                              \
            }                                                                              \
            if (gxs && gxs[k])                                                             \
                for (int64_t r = i; r < hi; ++r) gxs[k][r] = STORE(w[k] * LOAD(g[r]));     \
        }                                                                                  \
        free(part);                                                                        \
        fence(nt);                                                                         \
        return 0;                                                                          \
    }

DEFINE_KERNELS(f64, double, double, ID, ID)
DEFINE_KERNELS(f32, float, float, ID, ID)
DEFINE_KERNELS(bf16, bf16_t, float, bf16_load, bf16_store)

#ifdef __FLT16_MAX__
#define F16_LOAD(x) ((float)(x))
#define F16_STORE(x) ((_Float16)(x))
DEFINE_KERNELS(f16, _Float16, float, F16_LOAD, F16_STORE)
#endif
