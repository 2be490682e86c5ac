/* Native value checks for convexmix's maps (private).
 *
 * Built and loaded with the other native kernels (see combine.c). One function per
 * storage type:
 *
 *   cx_first_nan_<t>(x, outer, block, inner)
 *       1 if any x[o * block + i] is NaN (0 <= o < outer, 0 <= i < inner), else 0
 *
 * For a contiguous tensor of shape (outer, K, inner) and block = K * inner, that is the
 * first entry of every slice along the K dimension. softmax asks it whether
 * torch.softmax gave a NaN: a softmax slice is NaN everywhere or nowhere (every entry is
 * divided by the slice's sum, which any NaN, any +inf - +inf or an all--inf slice makes
 * NaN), so the first entry of each slice tells. One ctypes call reads 1/K of the output
 * and costs a fraction of a torch reduction and its read-back.
 */
#include <stdint.h>

#define DEFINE_FIRST_NAN(SUFFIX, T)                                                        \
    int cx_first_nan_##SUFFIX(const T *x, int64_t outer, int64_t block, int64_t inner) {   \
        int found = 0;                                                                     \
        for (int64_t o = 0; o < outer; ++o) {                                              \
            const T *row = x + o * block;                                                  \
            for (int64_t i = 0; i < inner; ++i) found |= (row[i] != row[i]);              \
        }                                                                                  \
        return found;                                                                      \
    }

DEFINE_FIRST_NAN(f64, double)
DEFINE_FIRST_NAN(f32, float)
