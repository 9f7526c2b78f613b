// Fused float32 CPU kernels for the ViT blocks: bias + exact GELU, layer norm and softmax over the last
// axis, forward and backward; and the AdamW step. One pass over memory each, rows split over OpenMP
// threads, erf/exp from glibc's vector math library. Paddle's own CPU kernels for these run on one
// thread, several passes, or (AdamW without AVX-512) one element at a time.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "paddle/extension.h"

extern "C" {
__attribute__((simd("notinbranch"))) float erff(float) noexcept;
__attribute__((simd("notinbranch"))) float expf(float) noexcept;
}

namespace {

constexpr float kRsqrt2 = 0.70710678118654752f;
constexpr float kRsqrt2Pi = 0.39894228040143268f;

paddle::Tensor dense(const paddle::Tensor& t, const char* name) {
  PD_CHECK(t.is_cpu() && t.dtype() == paddle::DataType::FLOAT32, name, " must be a float32 CPU tensor");
  return t.is_contiguous() ? t : t.contiguous();
}

int64_t last_dim(const paddle::Tensor& t) { return t.shape().empty() ? 1 : t.shape().back(); }

// Column sums of per-thread partial rows, threads x n, into out[n].
void reduce_partials(const std::vector<float>& partial, int threads, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    float s = 0.0f;
    for (int t = 0; t < threads; ++t) s += partial[t * n + j];
    out[j] = s;
  }
}

// The row loops below get an AVX2 clone, picked at load time where the CPU has it (8 floats per vector
// instead of 4, and glibc's 8-wide erf/exp).
#define ROW_KERNEL __attribute__((target_clones("avx2", "default")))

ROW_KERNEL void bias_gelu_row(const float* h, const float* b, float* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float z = h[j] + b[j];
    y[j] = 0.5f * z * (1.0f + erff(z * kRsqrt2));
  }
}

ROW_KERNEL void bias_gelu_grad_row(const float* h, const float* b, const float* gy, float* gh, float* gb_acc,
                                   int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float z = h[j] + b[j];
    const float g = gy[j] * (0.5f * (1.0f + erff(z * kRsqrt2)) + z * kRsqrt2Pi * expf(-0.5f * z * z));
    gh[j] = g;
    gb_acc[j] += g;
  }
}

ROW_KERNEL void softmax_row(const float* x, float* y, int64_t n) {
  float m = x[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    y[j] = expf(x[j] - m);
    s += y[j];
  }
  const float inv = 1.0f / s;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] *= inv;
}

// One AdamW step on n elements, in place, with the arithmetic of Paddle's CPU adamw kernel: decoupled
// decay, moments and step size in float, the update itself in double.
ROW_KERNEL void adamw_span(float* p, const float* g, float* m1, float* m2, int64_t n, float beta1, float beta2,
                           float decay, float step, float eps) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float decayed = p[j] - decay * p[j];
    const float a = beta1 * m1[j] + (1 - beta1) * g[j];
    const float b = beta2 * m2[j] + (1 - beta2) * g[j] * g[j];
    m1[j] = a;
    m2[j] = b;
    p[j] = static_cast<float>(decayed + static_cast<double>(step) * (a / (std::sqrt(static_cast<double>(b)) + eps)));
  }
}

}  // namespace

// y = gelu(h + bias), exact (erf) form, bias broadcast over the last axis.
std::vector<paddle::Tensor> BiasGeluForward(const paddle::Tensor& h_in, const paddle::Tensor& b_in,
                                            int threads) {
  auto h = dense(h_in, "h");
  auto b = dense(b_in, "bias");
  const int64_t n = b.numel(), rows = h.numel() / n;
  PD_CHECK(last_dim(h) == n, "bias size must equal the last dimension");
  auto y = paddle::empty(h.shape(), h.dtype(), h.place());
  const float* hp = h.data<float>();
  const float* bp = b.data<float>();
  float* yp = y.data<float>();
#pragma omp parallel for num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) bias_gelu_row(hp + r * n, bp, yp + r * n, n);
  return {y};
}

std::vector<paddle::Tensor> BiasGeluBackward(const paddle::Tensor& h_in, const paddle::Tensor& b_in,
                                             const paddle::Tensor& gy_in, int threads) {
  auto h = dense(h_in, "h");
  auto b = dense(b_in, "bias");
  auto gy = dense(gy_in, "grad");
  const int64_t n = b.numel(), rows = h.numel() / n;
  auto gh = paddle::empty(h.shape(), h.dtype(), h.place());
  auto gb = paddle::empty(b.shape(), b.dtype(), b.place());
  const float* hp = h.data<float>();
  const float* bp = b.data<float>();
  const float* gp = gy.data<float>();
  float* ghp = gh.data<float>();
  std::vector<float> partial(static_cast<size_t>(threads) * n, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* acc = partial.data() + omp_get_thread_num() * n;
#pragma omp for
    for (int64_t r = 0; r < rows; ++r) bias_gelu_grad_row(hp + r * n, bp, gp + r * n, ghp + r * n, acc, n);
  }
  reduce_partials(partial, threads, n, gb.data<float>());
  return {gh, gb};
}

// y = (x - mean) * rstd * weight + bias over the last axis; also returns mean and rstd per row.
std::vector<paddle::Tensor> LayerNormForward(const paddle::Tensor& x_in, const paddle::Tensor& w_in,
                                             const paddle::Tensor& b_in, float eps, int threads) {
  auto x = dense(x_in, "x");
  auto w = dense(w_in, "weight");
  auto b = dense(b_in, "bias");
  const int64_t n = w.numel(), rows = x.numel() / n;
  PD_CHECK(last_dim(x) == n && b.numel() == n, "weight and bias sizes must equal the last dimension");
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  auto mean = paddle::empty({rows}, x.dtype(), x.place());
  auto rstd = paddle::empty({rows}, x.dtype(), x.place());
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  const float* bp = b.data<float>();
  float* yp = y.data<float>();
  float* mp = mean.data<float>();
  float* rp = rstd.data<float>();
#pragma omp parallel for num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * n;
    float* yr = yp + r * n;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += xr[j];
    const float mu = s / n;
    float v = 0.0f;
#pragma omp simd reduction(+ : v)
    for (int64_t j = 0; j < n; ++j) v += (xr[j] - mu) * (xr[j] - mu);
    const float rs = 1.0f / std::sqrt(v / n + eps);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) yr[j] = (xr[j] - mu) * rs * wp[j] + bp[j];
    mp[r] = mu;
    rp[r] = rs;
  }
  return {y, mean, rstd};
}

std::vector<paddle::Tensor> LayerNormBackward(const paddle::Tensor& x_in, const paddle::Tensor& w_in,
                                              const paddle::Tensor& mean, const paddle::Tensor& rstd,
                                              const paddle::Tensor& gy_in, float eps, int threads) {
  auto x = dense(x_in, "x");
  auto w = dense(w_in, "weight");
  auto gy = dense(gy_in, "grad");
  const int64_t n = w.numel(), rows = x.numel() / n;
  auto gx = paddle::empty(x.shape(), x.dtype(), x.place());
  auto gw = paddle::empty(w.shape(), w.dtype(), w.place());
  auto gb = paddle::empty(w.shape(), w.dtype(), w.place());
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  const float* gp = gy.data<float>();
  const float* mp = mean.data<float>();
  const float* rp = rstd.data<float>();
  float* gxp = gx.data<float>();
  std::vector<float> partial_w(static_cast<size_t>(threads) * n, 0.0f), partial_b(partial_w);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    float* aw = partial_w.data() + t * n;
    float* ab = partial_b.data() + t * n;
#pragma omp for
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = xp + r * n;
      const float* gr = gp + r * n;
      float* gxr = gxp + r * n;
      const float mu = mp[r], rs = rp[r];
      float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t j = 0; j < n; ++j) {
        const float xh = (xr[j] - mu) * rs;
        const float g = gr[j] * wp[j];
        sg += g;
        sgx += g * xh;
        aw[j] += gr[j] * xh;
        ab[j] += gr[j];
      }
      const float mg = sg / n, mgx = sgx / n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float xh = (xr[j] - mu) * rs;
        gxr[j] = rs * (gr[j] * wp[j] - mg - xh * mgx);
      }
    }
  }
  reduce_partials(partial_w, threads, n, gw.data<float>());
  reduce_partials(partial_b, threads, n, gb.data<float>());
  return {gx, gw, gb};
}

// Softmax over the last axis.
std::vector<paddle::Tensor> SoftmaxForward(const paddle::Tensor& x_in, int threads) {
  auto x = dense(x_in, "x");
  const int64_t n = last_dim(x), rows = x.numel() / n;
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
#pragma omp parallel for num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) softmax_row(xp + r * n, yp + r * n, n);
  return {y};
}

std::vector<paddle::Tensor> SoftmaxBackward(const paddle::Tensor& y_in, const paddle::Tensor& gy_in,
                                            int threads) {
  auto y = dense(y_in, "y");
  auto gy = dense(gy_in, "grad");
  const int64_t n = last_dim(y), rows = y.numel() / n;
  auto gx = paddle::empty(y.shape(), y.dtype(), y.place());
  const float* yp = y.data<float>();
  const float* gp = gy.data<float>();
  float* gxp = gx.data<float>();
#pragma omp parallel for num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    const float* yr = yp + r * n;
    const float* gr = gp + r * n;
    float* gxr = gxp + r * n;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += yr[j] * gr[j];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) gxr[j] = yr[j] * (gr[j] - s);
  }
  return {gx};
}

// qkv [B, N, 3 * H * D] -> q * scale, k, v, each [B, H, N, D] (the heads of multi-head attention).
std::vector<paddle::Tensor> SplitHeadsForward(const paddle::Tensor& qkv_in, int heads, float scale, int threads) {
  auto qkv = dense(qkv_in, "qkv");
  const auto& shape = qkv.shape();
  PD_CHECK(shape.size() == 3 && shape[2] % (3 * heads) == 0, "qkv must be [B, N, 3 * heads * head_dim]");
  const int64_t B = shape[0], N = shape[1], D = shape[2] / (3 * heads);
  std::vector<paddle::Tensor> out;
  for (int s = 0; s < 3; ++s) out.push_back(paddle::empty({B, heads, N, D}, qkv.dtype(), qkv.place()));
  const float* src = qkv.data<float>();
  float* dst[3] = {out[0].data<float>(), out[1].data<float>(), out[2].data<float>()};
#pragma omp parallel for num_threads(threads)
  for (int64_t bn = 0; bn < B * N; ++bn) {
    const int64_t b = bn / N, n = bn % N;
    for (int s = 0; s < 3; ++s) {
      const float f = s == 0 ? scale : 1.0f;
      for (int h = 0; h < heads; ++h) {
        const float* from = src + (bn * 3 + s) * heads * D + h * D;
        float* to = dst[s] + ((b * heads + h) * N + n) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) to[d] = from[d] * f;
      }
    }
  }
  return out;
}

std::vector<paddle::Tensor> SplitHeadsBackward(const paddle::Tensor& gq_in, const paddle::Tensor& gk_in,
                                               const paddle::Tensor& gv_in, int heads, float scale,
                                               int threads) {
  const paddle::Tensor g[3] = {dense(gq_in, "grad q"), dense(gk_in, "grad k"), dense(gv_in, "grad v")};
  const auto& shape = g[0].shape();
  const int64_t B = shape[0], N = shape[2], D = shape[3];
  auto gqkv = paddle::empty({B, N, 3 * heads * D}, g[0].dtype(), g[0].place());
  const float* src[3] = {g[0].data<float>(), g[1].data<float>(), g[2].data<float>()};
  float* dst = gqkv.data<float>();
#pragma omp parallel for num_threads(threads)
  for (int64_t bn = 0; bn < B * N; ++bn) {
    const int64_t b = bn / N, n = bn % N;
    for (int s = 0; s < 3; ++s) {
      const float f = s == 0 ? scale : 1.0f;
      for (int h = 0; h < heads; ++h) {
        const float* from = src[s] + ((b * heads + h) * N + n) * D;
        float* to = dst + (bn * 3 + s) * heads * D + h * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) to[d] = from[d] * f;
      }
    }
  }
  return {gqkv};
}

// [B, H, N, D] -> [B, N, H * D] (the heads back side by side), and its inverse.
void swap_middle(const float* src, float* dst, int64_t B, int64_t X, int64_t Y, int64_t D, int threads) {
#pragma omp parallel for num_threads(threads)
  for (int64_t bx = 0; bx < B * X; ++bx) {
    const int64_t b = bx / X, x = bx % X;
    for (int64_t y = 0; y < Y; ++y) {
      const float* from = src + bx * Y * D + y * D;
      float* to = dst + ((b * Y + y) * X + x) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) to[d] = from[d];
    }
  }
}

std::vector<paddle::Tensor> MergeHeadsForward(const paddle::Tensor& x_in, int threads) {
  auto x = dense(x_in, "x");
  const auto& shape = x.shape();
  PD_CHECK(shape.size() == 4, "x must be [B, heads, N, head_dim]");
  const int64_t B = shape[0], H = shape[1], N = shape[2], D = shape[3];
  auto y = paddle::empty({B, N, H * D}, x.dtype(), x.place());
  swap_middle(x.data<float>(), y.data<float>(), B, H, N, D, threads);
  return {y};
}

std::vector<paddle::Tensor> MergeHeadsBackward(const paddle::Tensor& x, const paddle::Tensor& gy_in,
                                               int threads) {
  auto gy = dense(gy_in, "grad");
  const auto& shape = x.shape();
  const int64_t B = shape[0], H = shape[1], N = shape[2], D = shape[3];
  auto gx = paddle::empty(shape, gy.dtype(), gy.place());
  swap_middle(gy.data<float>(), gx.data<float>(), B, N, H, D, threads);
  return {gx};
}

// out = x + y / keep * mask[b]: a residual branch under stochastic depth, mask one 0/1 value per sample.
std::vector<paddle::Tensor> ResidualDropPathForward(const paddle::Tensor& x_in, const paddle::Tensor& y_in,
                                                    const paddle::Tensor& mask_in, float keep, int threads) {
  auto x = dense(x_in, "x");
  auto y = dense(y_in, "branch");
  auto mask = dense(mask_in, "mask");
  const int64_t B = mask.numel(), n = x.numel() / B;
  PD_CHECK(y.numel() == x.numel() && x.shape()[0] == B, "x, branch and mask must agree on the batch");
  auto out = paddle::empty(x.shape(), x.dtype(), x.place());
  const float* xp = x.data<float>();
  const float* yp = y.data<float>();
  const float* mp = mask.data<float>();
  float* op = out.data<float>();
#pragma omp parallel for num_threads(threads)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = b * n;
    const float m = mp[b];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) op[o + j] = xp[o + j] + yp[o + j] / keep * m;
  }
  return {out};
}

std::vector<paddle::Tensor> ResidualDropPathBackward(const paddle::Tensor& mask_in, const paddle::Tensor& g_in,
                                                     float keep, int threads) {
  auto mask = dense(mask_in, "mask");
  auto g = dense(g_in, "grad");
  const int64_t B = mask.numel(), n = g.numel() / B;
  auto gx = paddle::empty(g.shape(), g.dtype(), g.place());
  auto gy = paddle::empty(g.shape(), g.dtype(), g.place());
  const float* gp = g.data<float>();
  const float* mp = mask.data<float>();
  float* gxp = gx.data<float>();
  float* gyp = gy.data<float>();
#pragma omp parallel for num_threads(threads)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = b * n;
    const float m = mp[b];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      gxp[o + j] = gp[o + j];
      gyp[o + j] = gp[o + j] * m / keep;
    }
  }
  return {gx, gy};
}

// AdamW on one parameter, in place: param, moments and the beta powers (as paddle.optimizer.AdamW).
void AdamWStep(paddle::Tensor& param, const paddle::Tensor& grad, const paddle::Tensor& lr,  // NOLINT
               paddle::Tensor& moment1, paddle::Tensor& moment2, paddle::Tensor& beta1_pow,      // NOLINT
               paddle::Tensor& beta2_pow, float beta1, float beta2, float epsilon, float lr_ratio,  // NOLINT
               float coeff, int threads) {
  const std::vector<const paddle::Tensor*> all = {&param, &grad, &lr, &moment1, &moment2, &beta1_pow, &beta2_pow};
  for (const paddle::Tensor* t : all) {
    PD_CHECK(t->is_cpu() && t->dtype() == paddle::DataType::FLOAT32 && t->is_contiguous(),
             "AdamW: parameters, gradients, learning rate and states must be contiguous float32 CPU tensors");
  }
  const int64_t n = param.numel();
  PD_CHECK(grad.numel() == n && moment1.numel() == n && moment2.numel() == n, "AdamW: sizes differ");
  PD_CHECK(lr.numel() == 1, "AdamW: the learning rate must be one value");
  const float old_lr = lr.data<float>()[0];
  const float b1p = beta1_pow.data<float>()[0], b2p = beta2_pow.data<float>()[0];
  const float root = std::sqrt(1 - b2p);
  const float step = -(old_lr * (root / (1 - b1p)));
  const float eps = epsilon * root;
  const float decay = old_lr * lr_ratio * coeff;
  float* p = param.data<float>();
  const float* g = grad.data<float>();
  float* m1 = moment1.data<float>();
  float* m2 = moment2.data<float>();
  constexpr int64_t kSpan = 1 << 14;
  const int64_t spans = (n + kSpan - 1) / kSpan;
#pragma omp parallel for num_threads(threads) if (spans > 1)
  for (int64_t s = 0; s < spans; ++s) {
    const int64_t o = s * kSpan;
    adamw_span(p + o, g + o, m1 + o, m2 + o, std::min(kSpan, n - o), beta1, beta2, decay, step, eps);
  }
  beta1_pow.data<float>()[0] = b1p * beta1;
  beta2_pow.data<float>()[0] = b2p * beta2;
}

std::vector<std::vector<int64_t>> SameAsFirst(const std::vector<int64_t>& x) { return {x}; }
std::vector<std::vector<int64_t>> SameAsFirst2(const std::vector<int64_t>& x, const std::vector<int64_t>&) {
  return {x};
}
std::vector<std::vector<int64_t>> SameAsFirst3(const std::vector<int64_t>& x, const std::vector<int64_t>&,
                                               const std::vector<int64_t>&) {
  return {x};
}
std::vector<std::vector<int64_t>> LayerNormShapes(const std::vector<int64_t>& x, const std::vector<int64_t>&,
                                                  const std::vector<int64_t>&) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) rows *= x[i];
  return {x, {rows}, {rows}};
}
std::vector<std::vector<int64_t>> SplitHeadsShapes(const std::vector<int64_t>& qkv, int heads) {
  const std::vector<int64_t> head = {qkv[0], heads, qkv[1], qkv[2] / (3 * heads)};
  return {head, head, head};
}
std::vector<std::vector<int64_t>> MergeHeadsShapes(const std::vector<int64_t>& x) {
  return {{x[0], x[2], x[1] * x[3]}};
}
std::vector<paddle::DataType> OneDtype(const paddle::DataType& x) { return {x}; }
std::vector<paddle::DataType> OneDtype3(const paddle::DataType& x, const paddle::DataType&, const paddle::DataType&) {
  return {x};
}
std::vector<paddle::DataType> OneDtype2(const paddle::DataType& x, const paddle::DataType&) { return {x}; }
std::vector<paddle::DataType> ThreeSame(const paddle::DataType& x) { return {x, x, x}; }
std::vector<paddle::DataType> ThreeDtypes(const paddle::DataType& x, const paddle::DataType&,
                                          const paddle::DataType&) {
  return {x, x, x};
}

PD_BUILD_OP(mae_bias_gelu)
    .Inputs({"H", "Bias"})
    .Outputs({"Y"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(BiasGeluForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SameAsFirst2))
    .SetInferDtypeFn(PD_INFER_DTYPE(OneDtype2));

PD_BUILD_GRAD_OP(mae_bias_gelu)
    .Inputs({"H", "Bias", paddle::Grad("Y")})
    .Outputs({paddle::Grad("H"), paddle::Grad("Bias")})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(BiasGeluBackward));

PD_BUILD_OP(mae_layer_norm)
    .Inputs({"X", "Weight", "Bias"})
    .Outputs({"Y", "Mean", "Rstd"})
    .Attrs({"epsilon: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(LayerNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(LayerNormShapes))
    .SetInferDtypeFn(PD_INFER_DTYPE(ThreeDtypes));

PD_BUILD_GRAD_OP(mae_layer_norm)
    .Inputs({"X", "Weight", "Mean", "Rstd", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight"), paddle::Grad("Bias")})
    .Attrs({"epsilon: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(LayerNormBackward));

PD_BUILD_OP(mae_softmax)
    .Inputs({"X"})
    .Outputs({"Y"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(SoftmaxForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SameAsFirst))
    .SetInferDtypeFn(PD_INFER_DTYPE(OneDtype));

PD_BUILD_GRAD_OP(mae_softmax)
    .Inputs({"Y", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(SoftmaxBackward));

PD_BUILD_OP(mae_split_heads)
    .Inputs({"QKV"})
    .Outputs({"Q", "K", "V"})
    .Attrs({"heads: int", "scale: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(SplitHeadsForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SplitHeadsShapes))
    .SetInferDtypeFn(PD_INFER_DTYPE(ThreeSame));

PD_BUILD_GRAD_OP(mae_split_heads)
    .Inputs({paddle::Grad("Q"), paddle::Grad("K"), paddle::Grad("V")})
    .Outputs({paddle::Grad("QKV")})
    .Attrs({"heads: int", "scale: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(SplitHeadsBackward));

PD_BUILD_OP(mae_merge_heads)
    .Inputs({"X"})
    .Outputs({"Y"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(MergeHeadsForward))
    .SetInferShapeFn(PD_INFER_SHAPE(MergeHeadsShapes))
    .SetInferDtypeFn(PD_INFER_DTYPE(OneDtype));

PD_BUILD_GRAD_OP(mae_merge_heads)
    .Inputs({"X", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(MergeHeadsBackward));

PD_BUILD_OP(mae_residual_drop_path)
    .Inputs({"X", "Branch", "Mask"})
    .Outputs({"Out"})
    .Attrs({"keep: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(ResidualDropPathForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SameAsFirst3))
    .SetInferDtypeFn(PD_INFER_DTYPE(OneDtype3));

PD_BUILD_GRAD_OP(mae_residual_drop_path)
    .Inputs({"Mask", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Branch")})
    .Attrs({"keep: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(ResidualDropPathBackward));

PD_BUILD_OP(mae_adamw)
    .Inputs({"Param", "Grad", "LearningRate", "Moment1", "Moment2", "Beta1Pow", "Beta2Pow"})
    .Outputs({"ParamOut", "Moment1Out", "Moment2Out", "Beta1PowOut", "Beta2PowOut"})
    .Attrs({"beta1: float", "beta2: float", "epsilon: float", "lr_ratio: float", "coeff: float", "threads: int"})
    .SetInplaceMap({{"Param", "ParamOut"}, {"Moment1", "Moment1Out"}, {"Moment2", "Moment2Out"},
                    {"Beta1Pow", "Beta1PowOut"}, {"Beta2Pow", "Beta2PowOut"}})
    .SetKernelFn(PD_KERNEL(AdamWStep));
