// The hot loops of the input pipeline, each with Pillow's arithmetic where Pillow is what it replaces.
// Bicubic resizing of 8-bit RGB images: the same filter (a = -0.5, support 2 x the scale when shrinking),
// weights from the same double-precision formula rounded to 22-bit fixed point, the same two passes in the
// same order with 8-bit clipping in between, so the pixels equal Image.resize's. Only the loops differ: the
// vertical pass runs along whole rows, which the compiler vectorizes. The horizontal flip; RandAugment's
// affine warps; the per-batch normalisation of uint8 pixels to float32 by table lookup, into the training
// tensor's memory; and random erasing.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BITS 22
#define HALF (1 << (BITS - 1))

static double cubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

static inline uint8_t clip8(int32_t v) {
  v >>= BITS;
  return v < 0 ? 0 : (v > 255 ? 255 : (uint8_t)v);
}

// Per output position: first input index, tap count, and ksize fixed-point weights. Returns ksize or 0.
static int weights(int in_size, int out_size, int **bounds, int32_t **kk) {
  double scale = (double)(float)in_size / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = 2.0 * filterscale;
  int ksize = (int)ceil(support) * 2 + 1;
  double inv = 1.0 / filterscale;
  double *k = malloc(ksize * sizeof(double));
  *bounds = malloc(out_size * 2 * sizeof(int));
  *kk = calloc((size_t)out_size * ksize, sizeof(int32_t));
  if (!k || !*bounds || !*kk) {
    free(k), free(*bounds), free(*kk);
    return 0;
  }
  for (int xx = 0; xx < out_size; xx++) {
    double center = 0.0 + (xx + 0.5) * scale;
    double ww = 0.0;
    int xmin = (int)(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = (int)(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; x++) {
      double w = cubic((x + xmin - center + 0.5) * inv);
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; x++) {
      if (ww != 0.0) k[x] /= ww;
      (*kk)[xx * ksize + x] = k[x] < 0 ? (int32_t)(-0.5 + k[x] * (1 << BITS)) : (int32_t)(0.5 + k[x] * (1 << BITS));
    }
    (*bounds)[xx * 2] = xmin;
    (*bounds)[xx * 2 + 1] = xmax;
  }
  free(k);
  return ksize;
}

// rows x cols pixels of 3 bytes (row stride in_stride) -> cols x rows, in cache-sized tiles.
static void transpose(const uint8_t *in, long in_stride, int rows, int cols, uint8_t *out) {
  const int tile = 32;
  for (int y0 = 0; y0 < rows; y0 += tile)
    for (int x0 = 0; x0 < cols; x0 += tile)
      for (int x = x0; x < x0 + tile && x < cols; x++)
        for (int y = y0; y < y0 + tile && y < rows; y++) {
          const uint8_t *s = in + (long)y * in_stride + x * 3;
          uint8_t *d = out + ((long)x * rows + y) * 3;
          d[0] = s[0], d[1] = s[1], d[2] = s[2];
        }
}

// rows of n bytes (stride in_stride) -> out_h rows: output row yy mixes input rows bounds[2yy] + shift ...
__attribute__((target_clones("avx2", "default")))
static void vertical(const uint8_t *in, long in_stride, int shift, int n, uint8_t *out, int out_h, int ksize,
                     const int *bounds, const int32_t *kk, int32_t *acc) {
  for (int yy = 0; yy < out_h; yy++) {
    const int32_t *k = kk + yy * ksize;
    const uint8_t *src = in + (long)(bounds[yy * 2] - shift) * in_stride;
    for (int i = 0; i < n; i++) acc[i] = HALF;
    for (int y = 0; y < bounds[yy * 2 + 1]; y++) {
      const uint8_t *row = src + (long)y * in_stride;
      int32_t w = k[y];
      for (int i = 0; i < n; i++) acc[i] += row[i] * w;
    }
    uint8_t *dst = out + (long)yy * n;
    for (int i = 0; i < n; i++) dst[i] = clip8(acc[i]);
  }
}

// The horizontal pass (rows x in_w -> rows x out_w, input from row `first`) as the vertical pass of the
// transposed image, whose rows are contiguous: the same sums, vectorized.
static int horizontal(const uint8_t *in, long in_stride, int first, int rows, int in_w, uint8_t *out, int out_w,
                      int ksize, const int *bounds, const int32_t *kk, int32_t *acc) {
  uint8_t *t_in = malloc((size_t)in_w * rows * 3), *t_out = malloc((size_t)out_w * rows * 3);
  if (!t_in || !t_out) {
    free(t_in), free(t_out);
    return -1;
  }
  transpose(in + (long)first * in_stride, in_stride, rows, in_w, t_in);
  vertical(t_in, (long)rows * 3, 0, rows * 3, t_out, out_w, ksize, bounds, kk, acc);
  transpose(t_out, (long)rows * 3, out_w, rows, out);
  free(t_in), free(t_out);
  return 0;
}

// in: in_h x in_w x 3 with row stride in_stride bytes; out: out_h x out_w x 3, contiguous. 0 on success.
int resize_bicubic_rgb(const uint8_t *in, int in_h, int in_w, long in_stride, uint8_t *out, int out_h, int out_w) {
  int need_h = out_w != in_w, need_v = out_h != in_h;
  int horizontal_first = !((in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2);
  int *bh = NULL, *bv = NULL, kh = 0, kv = 0, status = -1;
  int32_t *wh = NULL, *wv = NULL, *acc = NULL;
  uint8_t *tmp = NULL;
  if (!need_h && !need_v) {
    for (int y = 0; y < in_h; y++) memcpy(out + (long)y * in_w * 3, in + (long)y * in_stride, (size_t)in_w * 3);
    return 0;
  }
  if ((need_h && horizontal_first) || need_v) {
    if (!(kv = weights(in_h, out_h, &bv, &wv))) goto end;
  }
  if (need_h && !(kh = weights(in_w, out_w, &bh, &wh))) goto end;
  int longest = in_w > in_h ? in_w : in_h;
  longest = out_w > longest ? out_w : longest;
  longest = out_h > longest ? out_h : longest;
  acc = malloc(sizeof(int32_t) * 3 * (size_t)longest);
  if (!acc) goto end;
  if (horizontal_first) {
    if (!need_v) {
      if (horizontal(in, in_stride, 0, in_h, in_w, out, out_w, kh, bh, wh, acc)) goto end;
    } else if (!need_h) {
      vertical(in, in_stride, 0, in_w * 3, out, out_h, kv, bv, wv, acc);
    } else {
      int first = bv[0], last = bv[out_h * 2 - 2] + bv[out_h * 2 - 1];
      if (!(tmp = malloc((size_t)(last - first) * out_w * 3))) goto end;
      if (horizontal(in, in_stride, first, last - first, in_w, tmp, out_w, kh, bh, wh, acc)) goto end;
      vertical(tmp, (long)out_w * 3, first, out_w * 3, out, out_h, kv, bv, wv, acc);
    }
  } else {
    if (!need_h) {
      vertical(in, in_stride, 0, in_w * 3, out, out_h, kv, bv, wv, acc);
    } else {
      if (!(tmp = malloc((size_t)out_h * in_w * 3))) goto end;
      vertical(in, in_stride, 0, in_w * 3, tmp, out_h, kv, bv, wv, acc);
      if (horizontal(tmp, (long)in_w * 3, 0, out_h, in_w, out, out_w, kh, bh, wh, acc)) goto end;
    }
  }
  status = 0;
end:
  free(bh), free(bv), free(wh), free(wv), free(acc), free(tmp);
  return status;
}

// h x w x 3 uint8 (rows in_stride bytes apart) -> its mirror image, left to right, contiguous: NumPy copies
// a reversed view of 3-byte pixels one byte at a time.
void mirror_rgb(const uint8_t *in, int h, int w, long in_stride, uint8_t *out) {
  for (int y = 0; y < h; y++) {
    const uint8_t *src = in + y * in_stride + (long)(w - 1) * 3;
    uint8_t *dst = out + (long)y * w * 3;
    for (int x = 0; x < w; x++, src -= 3, dst += 3) {
      dst[0] = src[0];
      dst[1] = src[1];
      dst[2] = src[2];
    }
  }
}

/* Affine warp of an h x w x 3 uint8 image onto the same size, with the arithmetic of Pillow's
   Image.transform(AFFINE) for RGB: each output pixel's centre (x + 0.5, y + 0.5) mapped by the 6 coefficients
   in double precision; a point outside the input takes `fill`; else the input pixel centres around it
   (rows and columns clamped to the border) interpolated per channel with the same expressions in the same
   order: bilinear, or the cubic in Horner form (a = -0.5) along the rows from the 8-bit levels, then across
   them, clipped to [0, 255] and truncated. What differs from Pillow is only the loop: the source point and
   its neighbours are found once per pixel for the three channels. */
static inline int floor_int(double v) { return v < 0.0 ? (int)floor(v) : (int)v; }

static inline int clamp_index(int i, int size) { return i < 0 ? 0 : (i >= size ? size - 1 : i); }

static inline double cubic_levels(int v1, int v2, int v3, int v4, double d) {
  double p1 = v2, p2 = -v1 + v3, p3 = 2 * (v1 - v2) + v3 - v4, p4 = -v1 + v2 - v3 + v4;
  return p1 + d * (p2 + d * (p3 + d * p4));
}

static inline double cubic_values(double v1, double v2, double v3, double v4, double d) {
  double p1 = v2, p2 = -v1 + v3, p3 = 2 * (v1 - v2) + v3 - v4, p4 = -v1 + v2 - v3 + v4;
  return p1 + d * (p2 + d * (p3 + d * p4));
}

void affine_rgb(const uint8_t *in, int h, int w, long in_stride, uint8_t *out, const double *a, int bicubic,
                const uint8_t *fill) {
  for (int y = 0; y < h; y++) {
    double yc = y + 0.5;
    for (int x = 0; x < w; x++, out += 3) {
      double xc = x + 0.5;
      double sx = a[0] * xc + a[1] * yc + a[2], sy = a[3] * xc + a[4] * yc + a[5];
      if (sx < 0.0 || sx >= w || sy < 0.0 || sy >= h) {
        out[0] = fill[0], out[1] = fill[1], out[2] = fill[2];
        continue;
      }
      sx -= 0.5, sy -= 0.5;
      int ix = floor_int(sx), iy = floor_int(sy);
      double dx = sx - ix, dy = sy - iy;
      if (!bicubic) {
        const uint8_t *r0 = in + clamp_index(iy, h) * in_stride, *r1 = in + clamp_index(iy + 1, h) * in_stride;
        int c0 = clamp_index(ix, w) * 3, c1 = clamp_index(ix + 1, w) * 3;
        for (int c = 0; c < 3; c++) {
          double top = r0[c0 + c] + (r0[c1 + c] - r0[c0 + c]) * dx;
          if (dy == 0.0) {  // the interpolation at 0 is its first value exactly
            out[c] = (uint8_t)top;
            continue;
          }
          double bottom = r1[c0 + c] + (r1[c1 + c] - r1[c0 + c]) * dx;
          out[c] = (uint8_t)(top + (bottom - top) * dy);
        }
        continue;
      }
      const uint8_t *rows[4];
      int cols[4];
      for (int k = 0; k < 4; k++) {
        rows[k] = in + clamp_index(iy - 1 + k, h) * in_stride;
        cols[k] = clamp_index(ix - 1 + k, w) * 3;
      }
      for (int c = 0; c < 3; c++) {
        double v[4], value;
        if (dy == 0.0) {  // the cubic at 0 is its second value exactly: one row is enough (shears, translations)
          value = cubic_levels(rows[1][cols[0] + c], rows[1][cols[1] + c], rows[1][cols[2] + c],
                               rows[1][cols[3] + c], dx);
        } else {
          for (int k = 0; k < 4; k++)
            v[k] = dx == 0.0 ? rows[k][cols[1] + c]
                             : cubic_levels(rows[k][cols[0] + c], rows[k][cols[1] + c], rows[k][cols[2] + c],
                                            rows[k][cols[3] + c], dx);
          value = cubic_values(v[0], v[1], v[2], v[3], dy);
        }
        out[c] = value <= 0.0 ? 0 : (value >= 255.0 ? 255 : (uint8_t)value);
      }
    }
  }
}

// n x h x w x 3 uint8 -> n x 3 x h x w float32 through a 3 x 256 table (the normalised value of each level).
void normalize_nhwc(const uint8_t *in, long n, long hw, const float *table, float *out) {
  for (long i = 0; i < n; i++) {
    const uint8_t *src = in + i * hw * 3;
    float *r = out + i * hw * 3, *g = r + hw, *b = g + hw;
    for (long p = 0; p < hw; p++) {
      r[p] = table[src[p * 3]];
      g[p] = table[256 + src[p * 3 + 1]];
      b[p] = table[512 + src[p * 3 + 2]];
    }
  }
}

/* Random erasing on an N x C x H x W float32 batch: for each sample, its k boxes (top, left, h, w; h = 0 for
   none), in order, are filled with per-pixel N(0, 1) noise (mode 0), one N(0, 1) value per channel (mode 1)
   or zeros (mode 2). The normals come from a splitmix64 stream of `seed` and the sample's index (polar
   Box-Muller), so that the same seed gives the same pixels. */
static uint64_t splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static float normal(uint64_t *state) {
  for (;;) {
    double u = (splitmix64(state) >> 11) * (2.0 / 9007199254740992.0) - 1.0;
    double v = (splitmix64(state) >> 11) * (2.0 / 9007199254740992.0) - 1.0;
    double s = u * u + v * v;
    if (s > 0.0 && s < 1.0) return (float)(u * sqrt(-2.0 * log(s) / s));
  }
}

void erase_boxes(float *x, const int64_t *boxes, long n, long k, long c, long h, long w, int mode, uint64_t seed) {
  for (long i = 0; i < n; i++) {
    uint64_t state = seed ^ (0x632be59bd9b4e019ULL * (uint64_t)(i + 1));
    for (long b = 0; b < k; b++) {
      const int64_t *box = boxes + (i * k + b) * 4;
      long top = box[0], left = box[1], bh = box[2], bw = box[3];
      if (bh <= 0 || bw <= 0 || top < 0 || left < 0 || top + bh > h || left + bw > w) continue;
      for (long ch = 0; ch < c; ch++) {
        float colour = mode == 1 ? normal(&state) : 0.0f;
        for (long r = top; r < top + bh; r++) {
          float *row = x + ((i * c + ch) * h + r) * w + left;
          for (long q = 0; q < bw; q++) row[q] = mode == 0 ? normal(&state) : colour;
        }
      }
    }
  }
}
