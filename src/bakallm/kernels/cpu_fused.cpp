// Fused elementwise passes for CPUs, forward and backward, each one pass through memory where
// PyTorch's operations take several. Built with the other CPU kernels by
// bakallm/kernels/cpu_build.py; kernels/cpu_fused.py documents the interface, and the PyTorch
// operations they replace (model/elephant.py, mamba.py, network.py's RMSNorm, rotary.py) are their
// references.
//
// On a CPU these passes are bound by memory traffic (about 10 GB/s on one core of the machine in
// docs/performance.md), so the time saved is the passes saved: the Elephant gate's backward reads
// three tensors and writes two once, where it took twelve in-place PyTorch operations.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t GRAIN = 16384;  // elements per task of the elementwise loops
constexpr int64_t LANES = 64;     // channels per task of the convolution, one per vector lane

// Elephant gate: f(x) = 1 / (1 + |x/a|^d), out = up * f(gate). For d = 2^k (POWER_OF_TWO, k =
// `squarings`), the powers are repeated squaring: s^(d-1) = s * s^2 * s^4 * ..., s^d = s^(d-1) * s;
// any other d goes through pow.
template <bool POWER_OF_TWO, typename scalar_t>
inline void elephant_powers(scalar_t s, scalar_t d, int64_t squarings, scalar_t& signed_below, scalar_t& full) {
  if constexpr (POWER_OF_TWO) {
    scalar_t product = s, square = s;
    for (int64_t i = 1; i < squarings; ++i) {
      square *= square;
      product *= square;
    }
    signed_below = product;  // s^(d-1), an odd power: its sign is s's
    full = product * s;      // s^d = |s|^d, d even
  } else {
    signed_below = std::copysign(std::pow(std::abs(s), d - 1), s);
    full = std::pow(std::abs(s), d);
  }
}

template <bool POWER_OF_TWO, typename scalar_t>
void elephant_forward_kernel(const scalar_t* up, const scalar_t* gate, scalar_t* out, int64_t size, double a,
                             double d, int64_t squarings) {
  const scalar_t inverse_a = 1.0 / a, power = d;
  at::parallel_for(0, size, GRAIN, [&](int64_t first, int64_t end) {
#pragma omp simd
    for (int64_t i = first; i < end; ++i) {
      scalar_t signed_below, full;
      elephant_powers<POWER_OF_TWO>(gate[i] * inverse_a, power, squarings, signed_below, full);
      out[i] = up[i] / (scalar_t(1) + full);
    }
  });
}

// d out / d up = f; d out / d gate = up * f'(gate), f'(x) = -(d/a) sign(s) |s|^(d-1) f(x)^2, s = x/a.
template <bool POWER_OF_TWO, typename scalar_t>
void elephant_backward_kernel(const scalar_t* grad, const scalar_t* up, const scalar_t* gate, scalar_t* grad_up,
                              scalar_t* grad_gate, int64_t size, double a, double d, int64_t squarings) {
  const scalar_t inverse_a = 1.0 / a, power = d, slope = -d / a;
  at::parallel_for(0, size, GRAIN, [&](int64_t first, int64_t end) {
#pragma omp simd
    for (int64_t i = first; i < end; ++i) {
      scalar_t signed_below, full;
      elephant_powers<POWER_OF_TWO>(gate[i] * inverse_a, power, squarings, signed_below, full);
      const scalar_t value = scalar_t(1) / (scalar_t(1) + full);
      const scalar_t through_up = grad[i] * value;
      grad_up[i] = through_up;
      grad_gate[i] = slope * through_up * up[i] * signed_below * value;
    }
  });
}

// k with d = 2^k (k >= 1), else 0.
int64_t squarings_of(double d) {
  for (int64_t k = 1; k <= 8; ++k)
    if (d == double(int64_t(1) << k)) return k;
  return 0;
}

// The callers (kernels/cpu_fused.py's) pass contiguous tensors of one dtype; shapes are checked here,
// since a wrong one would read out of bounds.
at::Tensor elephant_gate_forward(const at::Tensor& up, const at::Tensor& gate, double a, double d) {
  TORCH_CHECK(up.sizes() == gate.sizes(), "elephant gate: up and gate differ in shape");
  at::Tensor out = at::empty_like(up);
  AT_DISPATCH_FLOATING_TYPES(up.scalar_type(), "bakallm_elephant_gate_forward", [&] {
    const int64_t squarings = squarings_of(d);
    auto kernel = squarings ? elephant_forward_kernel<true, scalar_t> : elephant_forward_kernel<false, scalar_t>;
    kernel(up.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), up.numel(), a, d, squarings);
  });
  return out;
}

std::vector<at::Tensor> elephant_gate_backward(const at::Tensor& grad, const at::Tensor& up, const at::Tensor& gate,
                                               double a, double d) {
  TORCH_CHECK(up.sizes() == gate.sizes() && grad.sizes() == up.sizes(), "elephant gate: shapes differ");
  at::Tensor grad_up = at::empty_like(up), grad_gate = at::empty_like(gate);
  AT_DISPATCH_FLOATING_TYPES(up.scalar_type(), "bakallm_elephant_gate_backward", [&] {
    const int64_t squarings = squarings_of(d);
    auto kernel = squarings ? elephant_backward_kernel<true, scalar_t> : elephant_backward_kernel<false, scalar_t>;
    kernel(grad.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), grad_up.data_ptr<scalar_t>(),
           grad_gate.data_ptr<scalar_t>(), up.numel(), a, d, squarings);
  });
  return {grad_up, grad_gate};
}

// Mamba's causal depthwise convolution and its SiLU: for padded inputs x [rows, k-1 + L, channels]
// (k-1 carried ones, then L new ones), weight w [channels, k] and bias b [channels],
//
//     pre[t, c] = b[c] + sum_j x[t + j, c] w[c, j],   out[t, c] = silu(pre[t, c]).
//
// Each task owns a block of LANES channels of one row and walks the window once, one channel per
// vector lane; backward recomputes pre instead of keeping it, and sums the weight's and bias's
// gradients in local arrays per task (rows' parts are summed by the caller: deterministic, whatever
// the thread count).
struct ConvShape {
  int64_t rows, padded, channels, taps, length, blocks;
  explicit ConvShape(const at::Tensor& x, const at::Tensor& weight)
      : rows(x.size(0)),
        padded(x.size(1)),
        channels(x.size(2)),
        taps(weight.size(1)),
        length(x.size(1) - weight.size(1) + 1),
        blocks((x.size(2) + LANES - 1) / LANES) {}
};

// The weight of a block's channels as [taps][LANES].
template <typename scalar_t>
void weight_lanes(const scalar_t* weight, scalar_t* lanes, int64_t first, int64_t width, int64_t taps) {
  for (int64_t j = 0; j < taps; ++j)
    for (int64_t c = 0; c < width; ++c) lanes[j * LANES + c] = weight[(first + c) * taps + j];
}

// pre-activation of step t of a block: x points at the block's first channel of row's step 0.
template <typename scalar_t>
inline void convolve_step(const scalar_t* x, const scalar_t* lanes, const scalar_t* bias, scalar_t* pre, int64_t t,
                          int64_t width, int64_t taps, int64_t channels) {
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) pre[c] = bias[c];
  for (int64_t j = 0; j < taps; ++j) {
    const scalar_t* input = x + (t + j) * channels;
    const scalar_t* w = lanes + j * LANES;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) pre[c] += input[c] * w[c];
  }
}

template <typename scalar_t>
void conv_silu_forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out) {
  const ConvShape shape(x, weight);
  const scalar_t *x_ = x.data_ptr<scalar_t>(), *w_ = weight.data_ptr<scalar_t>(), *b_ = bias.data_ptr<scalar_t>();
  scalar_t* out_ = out.data_ptr<scalar_t>();
  at::parallel_for(0, shape.rows * shape.blocks, 1, [&](int64_t first, int64_t end) {
    std::vector<scalar_t> lanes(shape.taps * LANES);
    for (int64_t task = first; task < end; ++task) {
      const int64_t row = task / shape.blocks, c0 = (task % shape.blocks) * LANES;
      const int64_t width = std::min(LANES, shape.channels - c0);
      weight_lanes(w_, lanes.data(), c0, width, shape.taps);
      const scalar_t* x_row = x_ + row * shape.padded * shape.channels + c0;
      scalar_t* out_row = out_ + row * shape.length * shape.channels + c0;
      for (int64_t t = 0; t < shape.length; ++t) {
        scalar_t pre[LANES];
        convolve_step(x_row, lanes.data(), b_ + c0, pre, t, width, shape.taps, shape.channels);
        scalar_t* o = out_row + t * shape.channels;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) o[c] = pre[c] / (scalar_t(1) + std::exp(-pre[c]));
      }
    }
  });
}

// silu'(p) = s (1 + p (1 - s)), s = sigmoid(p); then the convolution's adjoint: each step's
// gradient goes to its k inputs (grad_x[t + j] += g[t] w[j]), to w (g[t] x[t + j]) and to b.
template <typename scalar_t>
void conv_silu_backward_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, at::Tensor& grad_x, at::Tensor& grad_weight_parts,
                               at::Tensor& grad_bias_parts) {
  const ConvShape shape(x, weight);
  const scalar_t *x_ = x.data_ptr<scalar_t>(), *w_ = weight.data_ptr<scalar_t>(), *b_ = bias.data_ptr<scalar_t>();
  const scalar_t* grad_ = grad.data_ptr<scalar_t>();
  scalar_t *gx_ = grad_x.data_ptr<scalar_t>(), *gw_ = grad_weight_parts.data_ptr<scalar_t>();
  scalar_t* gb_ = grad_bias_parts.data_ptr<scalar_t>();
  at::parallel_for(0, shape.rows * shape.blocks, 1, [&](int64_t first, int64_t end) {
    std::vector<scalar_t> lanes(shape.taps * LANES), grad_lanes(shape.taps * LANES);
    for (int64_t task = first; task < end; ++task) {
      const int64_t row = task / shape.blocks, c0 = (task % shape.blocks) * LANES;
      const int64_t width = std::min(LANES, shape.channels - c0);
      weight_lanes(w_, lanes.data(), c0, width, shape.taps);
      std::fill(grad_lanes.begin(), grad_lanes.end(), scalar_t(0));
      scalar_t grad_b[LANES] = {};
      const scalar_t* x_row = x_ + row * shape.padded * shape.channels + c0;
      const scalar_t* grad_row = grad_ + row * shape.length * shape.channels + c0;
      scalar_t* gx_row = gx_ + row * shape.padded * shape.channels + c0;
      for (int64_t s = 0; s < shape.padded; ++s) std::fill_n(gx_row + s * shape.channels, width, scalar_t(0));
      for (int64_t t = 0; t < shape.length; ++t) {
        scalar_t pre[LANES], grad_pre[LANES];
        convolve_step(x_row, lanes.data(), b_ + c0, pre, t, width, shape.taps, shape.channels);
        const scalar_t* g = grad_row + t * shape.channels;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) {
          const scalar_t sigmoid = scalar_t(1) / (scalar_t(1) + std::exp(-pre[c]));
          grad_pre[c] = g[c] * sigmoid * (scalar_t(1) + pre[c] * (scalar_t(1) - sigmoid));
          grad_b[c] += grad_pre[c];
        }
        for (int64_t j = 0; j < shape.taps; ++j) {
          const scalar_t* input = x_row + (t + j) * shape.channels;
          const scalar_t* w = lanes.data() + j * LANES;
          scalar_t* grad_w = grad_lanes.data() + j * LANES;
          scalar_t* grad_input = gx_row + (t + j) * shape.channels;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) {
            grad_w[c] += grad_pre[c] * input[c];
            grad_input[c] += grad_pre[c] * w[c];
          }
        }
      }
      for (int64_t j = 0; j < shape.taps; ++j)
        for (int64_t c = 0; c < width; ++c)
          gw_[(row * shape.channels + c0 + c) * shape.taps + j] = grad_lanes[j * LANES + c];
      std::copy_n(grad_b, width, gb_ + row * shape.channels + c0);
    }
  });
}

void check_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 2 && weight.size(0) == x.size(2) && bias.numel() == x.size(2) &&
                  x.size(1) >= weight.size(1),
              "convolution: expected padded [B, k-1 + L, d], weight [d, k], bias [d]");
}

at::Tensor conv_silu_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_conv(x, weight, bias);
  const ConvShape shape(x, weight);
  at::Tensor out = at::empty({shape.rows, shape.length, shape.channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bakallm_conv_silu_forward",
                             [&] { conv_silu_forward_kernel<scalar_t>(x, weight, bias, out); });
  return out;
}

std::vector<at::Tensor> conv_silu_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& bias) {
  check_conv(x, weight, bias);
  const ConvShape shape(x, weight);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == shape.rows && grad.size(1) == shape.length &&
                  grad.size(2) == shape.channels,
              "convolution: the gradient's shape is not the output's");
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight_parts = at::empty({shape.rows, shape.channels, shape.taps}, x.options());
  at::Tensor grad_bias_parts = at::empty({shape.rows, shape.channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bakallm_conv_silu_backward", [&] {
    conv_silu_backward_kernel<scalar_t>(grad, x, weight, bias, grad_x, grad_weight_parts, grad_bias_parts);
  });
  return {grad_x, grad_weight_parts.sum(0), grad_bias_parts.sum(0)};
}

// RMSNorm over the last dimension: y = x r w, r = 1 / sqrt(mean(x^2) + eps), one row at a time;
// forward keeps r per row for backward:
//
//     dx = r g w - x r^3 (sum_k g_k w_k x_k) / width,   dw = sum over rows of g x r.
//
// dw is summed per part of NORM_ROWS rows, then the parts in order (deterministic, whatever the
// thread count).
constexpr int64_t NORM_ROWS = 64;

template <typename scalar_t>
void rms_norm_forward_kernel(const scalar_t* x, const scalar_t* weight, scalar_t* y, scalar_t* rstd, int64_t rows,
                             int64_t width, double eps) {
  at::parallel_for(0, rows, NORM_ROWS, [&](int64_t first, int64_t end) {
    for (int64_t row = first; row < end; ++row) {
      const scalar_t* x_row = x + row * width;
      scalar_t* y_row = y + row * width;
      scalar_t squares = 0;
#pragma omp simd reduction(+ : squares)
      for (int64_t c = 0; c < width; ++c) squares += x_row[c] * x_row[c];
      const scalar_t r = scalar_t(1) / std::sqrt(squares / scalar_t(width) + scalar_t(eps));
      rstd[row] = r;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) y_row[c] = x_row[c] * r * weight[c];
    }
  });
}

template <typename scalar_t>
void rms_norm_backward_kernel(const scalar_t* grad, const scalar_t* x, const scalar_t* weight, const scalar_t* rstd,
                              scalar_t* grad_x, scalar_t* grad_weight_parts, int64_t rows, int64_t width) {
  const int64_t parts = (rows + NORM_ROWS - 1) / NORM_ROWS;
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t end) {
    for (int64_t part = first; part < end; ++part) {
      scalar_t* grad_w = grad_weight_parts + part * width;
      std::fill_n(grad_w, width, scalar_t(0));
      for (int64_t row = part * NORM_ROWS; row < std::min(rows, (part + 1) * NORM_ROWS); ++row) {
        const scalar_t *g = grad + row * width, *x_row = x + row * width;
        scalar_t* gx = grad_x + row * width;
        const scalar_t r = rstd[row];
        scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < width; ++c) dot += g[c] * weight[c] * x_row[c];
        const scalar_t through_r = r * r * r * dot / scalar_t(width);
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) {
          gx[c] = r * g[c] * weight[c] - x_row[c] * through_r;
          grad_w[c] += g[c] * x_row[c] * r;
        }
      }
    }
  });
}

std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() >= 1 && weight.numel() == x.size(-1), "rms norm: the weight is not as wide as x's last dimension");
  const int64_t width = x.size(-1), rows = x.numel() / width;
  at::Tensor y = at::empty_like(x), rstd = at::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bakallm_rms_norm_forward", [&] {
    rms_norm_forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                      rstd.data_ptr<scalar_t>(), rows, width, eps);
  });
  return {y, rstd};
}

std::vector<at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& rstd) {
  TORCH_CHECK(weight.numel() == x.size(-1) && grad.sizes() == x.sizes() && rstd.numel() * x.size(-1) == x.numel(),
              "rms norm: shapes differ from forward's");
  const int64_t width = x.size(-1), rows = x.numel() / width;
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight_parts = at::empty({(rows + NORM_ROWS - 1) / NORM_ROWS, width}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bakallm_rms_norm_backward", [&] {
    rms_norm_backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                       rstd.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                                       grad_weight_parts.data_ptr<scalar_t>(), rows, width);
  });
  return {grad_x, grad_weight_parts.sum(0)};
}

// Rotary embedding, half-split form, of x [B, H, n, head_dim] (any strides but the last, which is
// 1: the query and key are views of the attention's fused projection) by tables cos, sin
// [n, head_dim]: out = x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1]; with `inverse`, the
// transposed rotation (the gradient's), out = x cos + [x2 sin2, -x1 sin1]. out is contiguous.
constexpr int64_t ROTARY_ROWS = 256;  // rows of head_dim per task

template <typename scalar_t>
void rotate_kernel(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse, at::Tensor& out) {
  const int64_t batch = x.size(0), heads = x.size(1), positions = x.size(2), width = x.size(3), half = width / 2;
  const int64_t stride_b = x.stride(0), stride_h = x.stride(1), stride_n = x.stride(2);
  const scalar_t *x_ = x.data_ptr<scalar_t>(), *cos_ = cos.data_ptr<scalar_t>(), *sin_ = sin.data_ptr<scalar_t>();
  scalar_t* out_ = out.data_ptr<scalar_t>();
  // Forward: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2; inverse: out1 = x1 c1 + x2 s2, out2 = x2 c2 - x1 s1.
  const scalar_t sign = inverse ? scalar_t(-1) : scalar_t(1);
  const int64_t first_sin = inverse ? half : 0, second_sin = inverse ? 0 : half;
  at::parallel_for(0, batch * heads * positions, ROTARY_ROWS, [&](int64_t first, int64_t end) {
    for (int64_t row = first; row < end; ++row) {
      const int64_t position = row % positions, head = (row / positions) % heads, b = row / (positions * heads);
      const scalar_t* in = x_ + b * stride_b + head * stride_h + position * stride_n;
      const scalar_t *c = cos_ + position * width, *s = sin_ + position * width;
      scalar_t* o = out_ + row * width;
#pragma omp simd
      for (int64_t k = 0; k < half; ++k) {
        o[k] = in[k] * c[k] - sign * in[half + k] * s[first_sin + k];
        o[half + k] = in[half + k] * c[half + k] + sign * in[k] * s[second_sin + k];
      }
    }
  });
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0, "rotation: expected x [B, H, n, even head_dim]");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) >= x.size(2) && cos.size(1) == x.size(3),
              "rotation: the tables must be [at least n, head_dim]");
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bakallm_rotate", [&] { rotate_kernel<scalar_t>(x, cos, sin, inverse, out); });
  return out;
}

}  // namespace

void bind_fused(pybind11::module_& module) {
  module.def("elephant_gate_forward", &elephant_gate_forward, "up * elephant(gate)");
  module.def("elephant_gate_backward", &elephant_gate_backward, "(d up, d gate) of up * elephant(gate)");
  module.def("conv_silu_forward", &conv_silu_forward, "silu(causal depthwise convolution)");
  module.def("conv_silu_backward", &conv_silu_backward, "(d inputs, d weight, d bias) of conv_silu_forward");
  module.def("rms_norm_forward", &rms_norm_forward, "RMSNorm over the last dimension (y, 1/rms per row)");
  module.def("rms_norm_backward", &rms_norm_backward, "(d x, d weight) of rms_norm_forward");
  module.def("rotate", &rotate, "rotary embedding (half-split) of x [B, H, n, head_dim], or its transpose");
}
