/* One pass over a record for its statistics: sum and sum of squares in double, min and max.
 *
 * Built by isthmus.verify.native on first use, with -fassociative-math and -ffinite-math-only so
 * that the compiler may vectorize the four reductions (the order of a double sum of float32 values
 * is free here: its rounding stays far below float32's). numpy needs five passes for the same
 * numbers (a float64 copy, sum, dot, min, max). The sums restart every BLOCK values and are added
 * into the totals. A NaN or an infinity shows in the sums, and the caller then takes its numpy path
 * for that record (min and max are undefined in that case).
 */
#include <stdint.h>

#define BLOCK 4096

/* With -DISTHMUS_CLONES on x86-64, an AVX2 copy of each loop beside the baseline one, chosen when
 * the library loads (about twice as fast where AVX2 exists); the build retries without it where the
 * compiler or the C library cannot (no ifunc). */
#if defined(ISTHMUS_CLONES) && defined(__x86_64__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#define DEFINE_MOMENTS(NAME, T)                                                      \
    CLONES static void NAME(const T *x, int64_t n, double *out) {                         \
        double total = 0.0, squares = 0.0;                                           \
        T low = x[0], high = x[0];                                                   \
        for (int64_t start = 0; start < n; start += BLOCK) {                         \
            int64_t stop = n - start < BLOCK ? n : start + BLOCK;                    \
            double sum = 0.0, sum_squares = 0.0;                                     \
            for (int64_t i = start; i < stop; i++) {                                 \
                T v = x[i];                                                          \
                double d = (double)v;                                                \
                sum += d;                                                            \
                sum_squares += d * d;                                                \
                low = v < low ? v : low;                                             \
                high = v > high ? v : high;                                          \
            }                                                                        \
            total += sum;                                                            \
            squares += sum_squares;                                                  \
        }                                                                            \
        out[0] = total;                                                              \
        out[1] = squares;                                                            \
        out[2] = (double)low;                                                        \
        out[3] = (double)high;                                                       \
    }

DEFINE_MOMENTS(moments_float32, float)
DEFINE_MOMENTS(moments_float64, double)

/* Records i < count: data[i] holds sizes[i] > 0 contiguous values of kind kinds[i] (0: float32,
 * 1: float64); out[4 * i ...] receives {sum, sum of squares, min, max}. Returns the version. */
int isthmus_moments(int64_t count, const uintptr_t *data, const int64_t *sizes, const int32_t *kinds,
                    double *out) {
    for (int64_t i = 0; i < count; i++) {
        if (kinds[i] == 0)
            moments_float32((const float *)data[i], sizes[i], out + 4 * i);
        else
            moments_float64((const double *)data[i], sizes[i], out + 4 * i);
    }
    return 1;
}
