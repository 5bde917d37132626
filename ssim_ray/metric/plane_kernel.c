/* The plane passes' CPU kernels (`ssim_ray.metric.plane_passes`, built and called by `ssim_ray.metric.native`):
 * MS-SSIM's 2x2 halving and PSNR's exact integer squared-error sums, on planes read in their own dtype.
 *
 * Both give their definitions' bits: the halving takes `window.wang_downsample`'s operations in its order
 * (each row pair added in the compute dtype, then each column pair, then / 4; an odd side's last row or
 * column added to itself), built with -ffp-contract=off; the squared errors of integer pixels are summed
 * in int64, exactly, so no order can move a bit.
 */
#include <stdint.h>
#include <stdlib.h>

enum { PIX_U8 = 0, PIX_U16 = 1, PIX_F32 = 2, PIX_F64 = 3 };

/* Pixel (plane p, row r, column c) of a plane stack of dtype `pix` with element strides s, as a double
 * (exact for every dtype here). */
static inline double pixel(const void *base, int pix, const int64_t *s, int64_t p, int64_t r, int64_t c) {
    int64_t at = p * s[0] + r * s[1] + c * s[2];
    switch (pix) {
    case PIX_U8: return ((const uint8_t *)base)[at];
    case PIX_U16: return ((const uint16_t *)base)[at];
    case PIX_F32: return ((const float *)base)[at];
    default: return ((const double *)base)[at];
    }
}

/* sums[c] = (REAL)a[c] + (REAL)b[c] for rows r0 and r1 of plane p, contiguous pixels of type T. */
#define ADD_CONTIGUOUS_ROWS(T, REAL)                                                                             \
    do {                                                                                                         \
        const T *a = (const T *)src + p * s[0] + r0 * s[1], *b = (const T *)src + p * s[0] + r1 * s[1];          \
        for (int64_t c = 0; c < width; c++) sums[c] = (REAL)a[c] + (REAL)b[c];                                    \
    } while (0)

#define DEFINE_HALVE(REAL, SUFFIX)                                                                              \
/* Row `r0` plus row `r1` of plane p, converted to REAL first, into sums[0 .. width - 1]. */                    \
static void add_rows_##SUFFIX(const void *src, int pix, const int64_t *s, int64_t p, int64_t r0, int64_t r1,     \
                              int64_t width, REAL *sums) {                                                       \
    if (s[2] != 1) {                                                                                             \
        for (int64_t c = 0; c < width; c++)                                                                      \
            sums[c] = (REAL)pixel(src, pix, s, p, r0, c) + (REAL)pixel(src, pix, s, p, r1, c);                   \
    } else if (pix == PIX_U8) {                                                                                  \
        ADD_CONTIGUOUS_ROWS(uint8_t, REAL);                                                                      \
    } else if (pix == PIX_U16) {                                                                                 \
        ADD_CONTIGUOUS_ROWS(uint16_t, REAL);                                                                     \
    } else if (pix == PIX_F32) {                                                                                 \
        ADD_CONTIGUOUS_ROWS(float, REAL);                                                                        \
    } else {                                                                                                     \
        ADD_CONTIGUOUS_ROWS(double, REAL);                                                                       \
    }                                                                                                            \
}                                                                                                                \
                                                                                                                 \
/* One plane halved: `rows` x `width` of `src` (plane p) into contiguous out_h x out_w `out`. */                 \
static void halve_plane_##SUFFIX(const void *src, int pix, const int64_t *s, int64_t p, int64_t height,          \
                                 int64_t width, REAL *sums, REAL *out) {                                          \
    const int64_t out_h = (height + 1) / 2, out_w = (width + 1) / 2, half_w = width / 2;                         \
    for (int64_t i = 0; i < out_h; i++) {                                                                        \
        const int64_t r0 = 2 * i, r1 = 2 * i + 1 < height ? 2 * i + 1 : height - 1;                              \
        add_rows_##SUFFIX(src, pix, s, p, r0, r1, width, sums);                                                  \
        REAL *row = out + i * out_w;                                                                             \
        for (int64_t j = 0; j < half_w; j++) row[j] = (sums[2 * j] + sums[2 * j + 1]) / (REAL)4;                  \
        if (width % 2) row[half_w] = (sums[width - 1] + sums[width - 1]) / (REAL)4;                              \
    }                                                                                                            \
}                                                                                                                \
                                                                                                                 \
/* Planes first .. last - 1 of (P, H, W) `src` halved `levels` times: level l into contiguous `outs[l]`, of     \
 * shape (P, ceil(H / 2^(l+1)), ...), each level from the one before (a plane's whole pyramid while it is in    \
 * cache). Returns 0, or -1 if scratch memory could not be had. */                                             \
int halve_##SUFFIX(const void *src, int pix, const int64_t *s, int64_t first, int64_t last, int64_t height,      \
                   int64_t width, int levels, REAL **outs) {                                                     \
    REAL *sums = malloc(sizeof(REAL) * (size_t)(width > 0 ? width : 1));                                         \
    if (!sums) return -1;                                                                                        \
    for (int64_t p = first; p < last; p++) {                                                                     \
        const void *from = src;                                                                                  \
        int from_pix = pix;                                                                                      \
        int64_t h = height, w = width, from_s[3] = {s[0], s[1], s[2]}, at = p;                                   \
        for (int l = 0; l < levels; l++) {                                                                       \
            const int64_t oh = (h + 1) / 2, ow = (w + 1) / 2;                                                     \
            REAL *out = outs[l] + p * oh * ow;                                                                   \
            halve_plane_##SUFFIX(from, from_pix, from_s, at, h, w, sums, out);                                   \
            from = out; from_pix = sizeof(REAL) == 4 ? PIX_F32 : PIX_F64;                                        \
            from_s[0] = oh * ow; from_s[1] = ow; from_s[2] = 1; at = 0;                                          \
            h = oh; w = ow;                                                                                      \
        }                                                                                                        \
    }                                                                                                            \
    free(sums);                                                                                                  \
    return 0;                                                                                                    \
}

DEFINE_HALVE(float, f32)
DEFINE_HALVE(double, f64)

/* Per plane first .. last - 1 of (P, H, W) uint8 or uint16 x and y: the sum of (x - y)^2 over rows and columns
 * crop .. side - crop - 1, in int64 (exact), stored as a double (exact while under 2^53, which the caller
 * checks). Returns 0, or -1 for another dtype. */
int square_error_sums(const void *x, const void *y, int pix, const int64_t *xs, const int64_t *ys, int64_t first,
                      int64_t last, int64_t height, int64_t width, int64_t crop, double *out) {
    if (pix != PIX_U8 && pix != PIX_U16) return -1;
    for (int64_t p = first; p < last; p++) {
        int64_t total = 0;
        for (int64_t r = crop; r < height - crop; r++) {
            int64_t row = 0;  /* a row's sum: at most width * 65535^2, well inside int64 */
            if (pix == PIX_U8 && xs[2] == 1 && ys[2] == 1) {
                const uint8_t *a = (const uint8_t *)x + p * xs[0] + r * xs[1], *b = (const uint8_t *)y + p * ys[0] + r * ys[1];
                for (int64_t start = crop; start < width - crop; start += 32768) {
                    const int64_t end = start + 32768 < width - crop ? start + 32768 : width - crop;
                    int32_t part = 0;  /* at most 2^15 squares of 255^2: inside int32 */
                    for (int64_t c = start; c < end; c++) {
                        int32_t d = (int32_t)a[c] - (int32_t)b[c];
                        part += d * d;
                    }
                    row += part;
                }
            } else {
                for (int64_t c = crop; c < width - crop; c++) {
                    int64_t d = (int64_t)pixel(x, pix, xs, p, r, c) - (int64_t)pixel(y, pix, ys, p, r, c);
                    row += d * d;
                }
            }
            total += row;
        }
        out[p - first] = (double)total;
    }
    return 0;
}
