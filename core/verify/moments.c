/* One pass over a record for its statistics row: count, min, max, mean, std and l2, from the sum
 * and the sum of squares in double, min and max.
 *
 * Built by isthmus.verify.native on first use, with -fassociative-math and -ffinite-math-only so
 * that the compiler may vectorize the four reductions (the order of a double sum of float32 values
 * is free here: its rounding stays far below float32's). numpy needs five passes for the same
 * numbers (a float64 copy, sum, dot, min, max). The sums restart every BLOCK values and are added
 * into the totals. A NaN or an infinity shows in the sums; such a record, and one whose variance
 * E[x^2] - mean^2 cancelled most of its digits, is marked not final and the caller computes it
 * with numpy (min and max are undefined in the first case). The finiteness test reads the bits, which
 * -ffinite-math-only cannot fold away.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 4096

/* With -DISTHMUS_CLONES on x86-64, AVX-512 and AVX2 copies of each loop beside the baseline one,
 * the best the CPU runs chosen when the library loads (AVX2 about twice as fast as the baseline,
 * AVX-512 a further 1.4x on 33 float32 records of 9,268 values); the build retries without them where
 * the compiler or the C library cannot (no ifunc). */
#if defined(ISTHMUS_CLONES) && defined(__x86_64__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
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

static int bits_finite(double value) {
    uint64_t bits;
    memcpy(&bits, &value, sizeof bits);
    return ((bits >> 52) & 0x7ff) != 0x7ff;
}

/* The row {count, min, max, mean, std, l2, nan = 0, inf = 0} from {sum, sum of squares, min, max} of n
 * values; whether it is final (see the top of this file). The same formulas as the numpy path's. */
static int finish(double *row, double n, double centre_below) {
    double total = row[0], squares = row[1], low = row[2], high = row[3];
    if (!bits_finite(total) || !bits_finite(squares) || fabs(total / n) > 1e150)
        return 0;
    double mean = total / n;
    double variance = squares / n - mean * mean;
    row[0] = n;
    row[1] = low;
    row[2] = high;
    row[3] = mean;
    row[4] = sqrt(variance > 0.0 ? variance : 0.0);
    row[5] = sqrt(squares);
    row[6] = 0.0;
    row[7] = 0.0;
    return !(variance < centre_below * mean * mean);
}

/* Records i < count: data[i] holds sizes[i] > 0 contiguous values of kind kinds[i] (0: float32,
 * 1: float64); rows[8 * i ...] receives the record's row and final[i] whether it is final (a row
 * that is not final holds nothing usable). Returns the version. */
int isthmus_stats(int64_t count, const uintptr_t *data, const int64_t *sizes, const int32_t *kinds,
                  double *rows, uint8_t *final, double centre_below) {
    for (int64_t i = 0; i < count; i++) {
        double *row = rows + 8 * i;
        if (kinds[i] == 0)
            moments_float32((const float *)data[i], sizes[i], row);
        else
            moments_float64((const double *)data[i], sizes[i], row);
        final[i] = (uint8_t)finish(row, (double)sizes[i], centre_below);
    }
    return 2;
}
