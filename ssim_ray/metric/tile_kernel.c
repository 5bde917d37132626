/* The tile path's CPU kernel: `ssim_ray.metric.tiles`' arithmetic, op for op, on tiles read straight from
 * the image planes (`ssim_ray.metric.native` builds and calls it).
 *
 * Same bits as the eager torch kernel: every map pixel takes the same IEEE operations in the same order
 * (built with -ffp-contract=off, no -ffast-math: no FMA contraction, no reassociation), each tile's map is
 * summed in float64 by the same pairwise halving over its columns, then its rows, with masked pixels as
 * exact zeros. What it saves is the work around those operations: no tile buffers (s = x + y and d = x - y
 * are formed one input row at a time, from the pixels in their own dtype), no map pixels that the mask
 * drops (columns up to the tile's extent rounded up to a vector, rows up to its extent), the row pass of
 * the halo rows shared by the next tile down the same strip, and short loops that keep several vectors of
 * independent work in flight (the mean's chain, then the second moment's).
 *
 * HALF (the window's half width) is fixed when the library is built (one library per window size), and so
 * is the vector width: 64 bytes where the compiler targets AVX-512, else 32 (AVX2's; other targets split
 * or emulate them). Lanes are independent, so the width moves no bit.
 */
#define _POSIX_C_SOURCE 200112L
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef HALF
#error "build with -DHALF=<window half width>"
#endif
#define WIN (2 * HALF + 1)
#ifndef VECTOR_BYTES
#if defined(__AVX512F__)
#define VECTOR_BYTES 64
#else
#define VECTOR_BYTES 32
#endif
#endif

enum { PIX_U8 = 0, PIX_U16 = 1, PIX_F32 = 2, PIX_F64 = 3 };
enum { SAMPLE_COVARIANCE = 1, WITH_CS = 2, CS_ONLY = 4 };

/* A tile batch's geometry (`tiles.TileGrid`) and its planes (element strides of their own dtype). */
typedef struct {
    const void *x, *y;
    int64_t x_strides[3], y_strides[3];
    int32_t pix, height, width, rows, cols, slots, across;
} planes_t;

typedef double vd4 __attribute__((vector_size(32)));
typedef double uvd4 __attribute__((vector_size(32), aligned(sizeof(double)), may_alias));

/* tiles.pairwise_sum_last: zeros up to a power of two, then the halves added elementwise until one is left. */
static double pairwise(double *v, int n) {
    int size = 1;
    while (size < n) size <<= 1;
    for (int i = n; i < size; i++) v[i] = 0.0;
    for (; size > 4; size >>= 1) {  /* whole vectors: size / 2 is a multiple of 4 */
        int half = size >> 1;
        for (int i = 0; i < half; i += 4) *(uvd4 *)(v + i) = *(const uvd4 *)(v + i) + *(const uvd4 *)(v + i + half);
    }
    for (; size > 1; size >>= 1) {
        int half = size >> 1;
        for (int i = 0; i < half; i++) v[i] = v[i] + v[i + half];
    }
    return v[0];
}

/* form_row's body for pixels of type T: each pixel converted to REAL exactly once, then added and subtracted
 * (the eager kernel's x.to(dtype) + y.to(dtype)); the contiguous case is its own loop, which vectorises. */
#define SUM_AND_DIFFERENCE(T, REAL)                                                                              \
    do {                                                                                                         \
        const T *xp = (const T *)pl->x + xo, *yp = (const T *)pl->y + yo;                                         \
        if (contiguous)                                                                                          \
            for (int j = 0; j < inside; j++) { REAL a = (REAL)xp[j], b = (REAL)yp[j]; s[j] = a + b; d[j] = a - b; } \
        else                                                                                                     \
            for (int j = 0; j < inside; j++) {                                                                   \
                REAL a = (REAL)xp[j * xs[2]], b = (REAL)yp[j * ys[2]];                                           \
                s[j] = a + b;                                                                                    \
                d[j] = a - b;                                                                                    \
            }                                                                                                    \
    } while (0)

#define DEFINE_KERNEL(REAL, VL, SUFFIX)                                                                          \
typedef REAL vec_##SUFFIX __attribute__((vector_size(VECTOR_BYTES)));                                                     \
typedef REAL uvec_##SUFFIX __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(REAL)), may_alias));                  \
static inline vec_##SUFFIX ld_##SUFFIX(const REAL *p) { return *(const uvec_##SUFFIX *)p; }                     \
static inline void st_##SUFFIX(REAL *p, vec_##SUFFIX v) { *(uvec_##SUFFIX *)p = v; }                            \
static inline vec_##SUFFIX bc_##SUFFIX(REAL a) { vec_##SUFFIX v; for (int i = 0; i < VL; i++) v[i] = a; return v; } \
                                                                                                                 \
/* s = x + y, d = x - y for `n` columns of one image row from column `left` (zeros past the image). */          \
static void form_row_##SUFFIX(const planes_t *pl, int64_t plane, int64_t row, int64_t left, int n,              \
                              REAL *s, REAL *d) {                                                                \
    int inside = (int)(pl->width - left < n ? pl->width - left : n);                                             \
    const int64_t *xs = pl->x_strides, *ys = pl->y_strides;                                                      \
    int64_t xo = plane * xs[0] + row * xs[1] + left * xs[2], yo = plane * ys[0] + row * ys[1] + left * ys[2];    \
    const int contiguous = xs[2] == 1 && ys[2] == 1;                                                             \
    switch (pl->pix) {                                                                                           \
    case PIX_U8: SUM_AND_DIFFERENCE(uint8_t, REAL); break;                                                       \
    case PIX_U16: SUM_AND_DIFFERENCE(uint16_t, REAL); break;                                                     \
    case PIX_F32: SUM_AND_DIFFERENCE(float, REAL); break;                                                        \
    default: SUM_AND_DIFFERENCE(double, REAL); break;                                                            \
    }                                                                                                            \
    for (int j = inside < 0 ? 0 : inside; j < n; j++) s[j] = d[j] = 0;                                           \
}                                                                                                                \
                                                                                                                 \
/* Weighted mean and centred second moment of each horizontal window (tiles._row_mean_and_m2). */              \
static void row_pass_##SUFFIX(const REAL *restrict p, int n, const REAL *w, REAL *restrict mo, REAL *restrict qo) { \
    vec_##SUFFIX wv[HALF + 1];                                                                                   \
    for (int k = 0; k <= HALF; k++) wv[k] = bc_##SUFFIX(w[HALF + k]);                                            \
    for (int x = 0; x < n; x += VL) {                                                                            \
        vec_##SUFFIX m = ld_##SUFFIX(p + x + HALF) * wv[0];                                                      \
        _Pragma("GCC unroll 16") for (int k = 1; k <= HALF; k++)                                                 \
            m = m + (ld_##SUFFIX(p + x + HALF - k) + ld_##SUFFIX(p + x + HALF + k)) * wv[k];                     \
        st_##SUFFIX(mo + x, m);                                                                                  \
    }                                                                                                            \
    for (int x = 0; x < n; x += VL) {                                                                            \
        vec_##SUFFIX m = ld_##SUFFIX(mo + x), dv = ld_##SUFFIX(p + x + HALF) - m, q = dv * dv * wv[0];           \
        _Pragma("GCC unroll 16") for (int k = 1; k <= HALF; k++) {                                               \
            vec_##SUFFIX lo = ld_##SUFFIX(p + x + HALF - k) - m, hi = ld_##SUFFIX(p + x + HALF + k) - m;          \
            q = q + (lo * lo + hi * hi) * wv[k];                                                                 \
        }                                                                                                        \
        st_##SUFFIX(qo + x, q);                                                                                  \
    }                                                                                                            \
}                                                                                                                \
                                                                                                                 \
/* Row statistics combined down each column (tiles._column_combine), for one map row. */                      \
static void column_pass_##SUFFIX(const REAL *restrict mr, const REAL *restrict qr, int64_t stride, int n,       \
                                 const REAL *w, REAL *restrict mean, REAL *restrict var) {                       \
    vec_##SUFFIX wv[HALF + 1];                                                                                   \
    for (int k = 0; k <= HALF; k++) wv[k] = bc_##SUFFIX(w[HALF + k]);                                            \
    const REAL *M = mr + HALF * stride, *Q = qr + HALF * stride;                                                 \
    for (int x = 0; x < n; x += VL) {                                                                            \
        vec_##SUFFIX m = ld_##SUFFIX(M + x) * wv[0];                                                             \
        _Pragma("GCC unroll 16") for (int k = 1; k <= HALF; k++)                                                 \
            m = m + (ld_##SUFFIX(M + x - k * stride) + ld_##SUFFIX(M + x + k * stride)) * wv[k];                 \
        st_##SUFFIX(mean + x, m);                                                                                \
    }                                                                                                            \
    for (int x = 0; x < n; x += VL) {                                                                            \
        vec_##SUFFIX m = ld_##SUFFIX(mean + x), dv = ld_##SUFFIX(M + x) - m;                                      \
        vec_##SUFFIX v = (ld_##SUFFIX(Q + x) + dv * dv) * wv[0];                                                 \
        _Pragma("GCC unroll 16") for (int k = 1; k <= HALF; k++) {                                               \
            vec_##SUFFIX lo = ld_##SUFFIX(M + x - k * stride) - m, hi = ld_##SUFFIX(M + x + k * stride) - m;      \
            v = v + (((ld_##SUFFIX(Q + x - k * stride) + lo * lo) + ld_##SUFFIX(Q + x + k * stride)) + hi * hi) * wv[k]; \
        }                                                                                                        \
        st_##SUFFIX(var + x, v);                                                                                 \
    }                                                                                                            \
}                                                                                                                \
                                                                                                                 \
/* The SSIM (or cs) map of one map row from the moments of s and d (tiles._maps). */                           \
static void maps_##SUFFIX(const REAL *mean_s, REAL *var_s, const REAL *mean_d, REAL *var_d, int n,             \
                          const REAL *consts, int variant, REAL *ssim_out, REAL *cs_out) {                        \
    const vec_##SUFFIX c1 = bc_##SUFFIX(consts[0]), c2 = bc_##SUFFIX(consts[1]), half = bc_##SUFFIX((REAL)0.5);  \
    const vec_##SUFFIX scale = bc_##SUFFIX(variant & SAMPLE_COVARIANCE ? consts[2] : (REAL)1);                   \
    for (int x = 0; x < n; x += VL) {                                                                            \
        vec_##SUFFIX vs = ld_##SUFFIX(var_s + x), vd = ld_##SUFFIX(var_d + x);                                    \
        if (variant & SAMPLE_COVARIANCE) { vs = vs * scale; vd = vd * scale; }                                   \
        vec_##SUFFIX big_b = vs * half + c2, small_b = vd * half;                                                \
        vec_##SUFFIX cs_num = big_b - small_b, cs_den = big_b + small_b;                                         \
        if (variant & (WITH_CS | CS_ONLY)) st_##SUFFIX(cs_out + x, cs_num / cs_den);                             \
        if (variant & CS_ONLY) continue;                                                                         \
        vec_##SUFFIX ms = ld_##SUFFIX(mean_s + x), md = ld_##SUFFIX(mean_d + x);                                  \
        vec_##SUFFIX big_a = ms * ms * half + c1, small_a = md * md * half;                                      \
        st_##SUFFIX(ssim_out + x, ((big_a - small_a) * cs_num) / ((big_a + small_a) * cs_den));                   \
    }                                                                                                            \
}                                                                                                                \
                                                                                                                 \
/* The float64 pairwise sum of a map row's first `valid` of `n` pixels, the rest as zeros (torch.where, then  \
 * .to(float64), then tiles.pairwise_sum_last); v: scratch for n (rounded up to a power of two) doubles. */     \
static double masked_sum_##SUFFIX(const REAL *map, int valid, int n, double *v) {                               \
    for (int x = 0; x < valid; x++) v[x] = (double)map[x];                                                       \
    for (int x = valid; x < n; x++) v[x] = 0.0;                                                                  \
    return pairwise(v, n);                                                                                       \
}                                                                                                                \
                                                                                                                 \
/* Tiles start .. start + count - 1 of the batch (strip order, `tiles.TileGrid`): float64 sums of each tile's  \
 * valid SSIM map, [ssim, cs] pairs with WITH_CS, cs sums with CS_ONLY (tiles.tile_sums). rows, cols: those   \
 * tiles' extents. Returns 0, or -1 if scratch memory could not be had. */                                     \
int ssim_tiles_##SUFFIX(const planes_t *pl, int64_t start, int64_t count, const int32_t *rows,                 \
                        const int32_t *cols, const REAL *consts, const REAL *taps, int variant, double *out) {    \
    const int R = pl->rows, C = pl->cols, in_rows = R + 2 * HALF, sums = variant & WITH_CS ? 2 : 1;             \
    const int64_t plane_size = (int64_t)in_rows * C;                                                             \
    const int row_len = (C + 2 * HALF + VL + 15) / 16 * 16;  /* whole cache lines: every buffer stays aligned */ \
    size_t reals = (size_t)4 * plane_size + 2 * (size_t)row_len + 6 * (size_t)C;                                  \
    int pow2 = 1;                                                                                                \
    while (pow2 < (C > R ? C : R)) pow2 <<= 1;                                                                   \
    REAL *work = NULL;  /* 64-byte aligned: the column pass's vectors then never straddle a cache line */        \
    if (posix_memalign((void **)&work, 64, reals * sizeof(REAL))) work = NULL;                                  \
    double *row_sums = NULL;  /* aligned too: pairwise's vectors of four doubles */                               \
    if (posix_memalign((void **)&row_sums, 64, sizeof(double) * (size_t)(3 * pow2))) row_sums = NULL;           \
    if (!work || !row_sums) { free(work); free(row_sums); return -1; }                                            \
    double *cs_sums = row_sums + pow2, *v = cs_sums + pow2;  /* pow2 >= 16: each starts on a cache line */      \
    REAL *ms = work, *qs = ms + plane_size, *md = qs + plane_size, *qd = md + plane_size;                        \
    REAL *srow = qd + plane_size, *drow = srow + row_len;                                                        \
    REAL *mean_s = drow + row_len, *var_s = mean_s + C, *mean_d = var_s + C, *var_d = mean_d + C;      \
    REAL *ssim_map = var_d + C, *cs_map = ssim_map + C;                                                          \
    int64_t done_strip = -1, done_slot = -1;                                                                      \
    for (int64_t i = 0; i < count; i++) {                                                                        \
        const int64_t tile = start + i, strip = tile / pl->slots, slot = tile % pl->slots;                       \
        const int rk = rows[i], ck = cols[i];                                                                    \
        if (rk <= 0 || ck <= 0) {                                                                                \
            for (int j = 0; j < sums; j++) out[i * sums + j] = 0.0;                                               \
            continue;                                                                                            \
        }                                                                                                        \
        const int64_t plane = strip / pl->across, top = slot * (int64_t)R, left = (strip % pl->across) * (int64_t)C; \
        const int n = (ck + VL - 1) / VL * VL;  /* map columns computed: the extent, rounded up to a vector */    \
        int first = 0;                                                                                           \
        if (done_strip == strip && done_slot == slot - 1) {  /* the last tile's bottom halo is this one's top */  \
            for (REAL *b = ms; b < qd + plane_size; b += plane_size) memmove(b, b + (int64_t)R * C, sizeof(REAL) * 2 * HALF * C); \
            first = 2 * HALF;                                                                                    \
        }                                                                                                        \
        for (int r = first; r < rk + 2 * HALF; r++) {                                                            \
            form_row_##SUFFIX(pl, plane, top + r, left, n + 2 * HALF, srow, drow);                               \
            row_pass_##SUFFIX(srow, n, taps, ms + (int64_t)r * C, qs + (int64_t)r * C);                           \
            row_pass_##SUFFIX(drow, n, taps, md + (int64_t)r * C, qd + (int64_t)r * C);                           \
        }                                                                                                        \
        done_strip = rk == R ? strip : -1;                                                                       \
        done_slot = slot;                                                                                        \
        for (int y = 0; y < R; y++) {                                                                            \
            if (y >= rk) { row_sums[y] = cs_sums[y] = 0.0; continue; }                                           \
            column_pass_##SUFFIX(ms + (int64_t)y * C, qs + (int64_t)y * C, C, n, taps, mean_s, var_s);            \
            column_pass_##SUFFIX(md + (int64_t)y * C, qd + (int64_t)y * C, C, n, taps, mean_d, var_d);            \
            maps_##SUFFIX(mean_s, var_s, mean_d, var_d, n, consts, variant, ssim_map, cs_map);                   \
            const REAL *first_map = variant & CS_ONLY ? cs_map : ssim_map;                                       \
            row_sums[y] = masked_sum_##SUFFIX(first_map, ck, C, v);                                              \
            if (variant & WITH_CS) {                                                                             \
                cs_sums[y] = masked_sum_##SUFFIX(cs_map, ck, C, v);                                              \
            }                                                                                                    \
        }                                                                                                        \
        out[i * sums] = pairwise(row_sums, R);                                                                   \
        if (variant & WITH_CS) out[i * sums + 1] = pairwise(cs_sums, R);                                         \
    }                                                                                                            \
    free(work);                                                                                                  \
    free(row_sums);                                                                                              \
    return 0;                                                                                                    \
}

DEFINE_KERNEL(float, (VECTOR_BYTES / 4), f32)
DEFINE_KERNEL(double, (VECTOR_BYTES / 8), f64)

/* The window half width this library was built for (the loader checks it). */
int ssim_tiles_half(void) { return HALF; }
