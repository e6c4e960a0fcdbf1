// Mamba-1 selective scan for CPUs, forward and backward, one fused loop per channel block.
//
// Built at first use by bakallm/kernels/cpu_scan.py (torch.utils.cpp_extension), which documents
// the interface; the reference is kernels/reference.py. For row b, channel d and state n:
//
//     h[t] = exp(dt[t] A) h[t-1] + dt[t] x[t] B[t],   y[t] = C[t] . h[t] + D x[t]
//
// Each task owns a block of channels of one row and walks the window once, the states of its
// channels in a small local array, so a step is a few vector instructions per channel instead of
// a handful of PyTorch operations over the whole block. Forward keeps the state entering every
// CHECKPOINT-th step; backward walks the checkpoint segments from the last, recomputes a
// segment's states from its checkpoint, then runs the adjoint recurrence through it.
//
// dB and dC sum over channels: each channel block writes its own part, and the caller sums the
// parts (deterministic, whatever the thread count). dA sums over rows the same way.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t CHECKPOINT = 16;  // steps per stored state in forward, recomputed in backward
constexpr int64_t CHANNELS = 32;    // channels per task

struct Views {
  // Row-major [rows, steps, channels] for x, dt, y and their gradients; [rows, steps, states] for B, C.
  int64_t steps, channels, states;
  int64_t at(int64_t row, int64_t step, int64_t channel) const { return (row * steps + step) * channels + channel; }
  int64_t at_state(int64_t row, int64_t step, int64_t state) const { return (row * steps + step) * states + state; }
};

// One step of a block of `width` channels. Not inlined, so that forward with and without kept
// checkpoints runs the same machine code: under -ffast-math the compiler may otherwise vectorise
// the two loops' sums in different orders, and results with and without gradients would differ.
template <typename scalar_t>
__attribute__((noinline)) void forward_step(const scalar_t* x, const scalar_t* dt, const scalar_t* A,
                                            const scalar_t* B_t, const scalar_t* C_t, const scalar_t* D,
                                            scalar_t* y, scalar_t* h, int64_t width, int64_t states) {
  for (int64_t c = 0; c < width; ++c) {
    const scalar_t step = dt[c], input = step * x[c];
    const scalar_t* A_c = A + c * states;
    scalar_t* h_c = h + c * states;
    scalar_t out = 0;
#pragma omp simd reduction(+ : out)
    for (int64_t n = 0; n < states; ++n) {
      h_c[n] = std::exp(step * A_c[n]) * h_c[n] + input * B_t[n];
      out += C_t[n] * h_c[n];
    }
    y[c] = out + D[c] * x[c];
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& C, const at::Tensor& D, const at::Tensor& h0, at::Tensor& y,
                    at::Tensor& h_last, at::Tensor* checkpoints) {
  const int64_t rows = x.size(0), steps = x.size(1), channels = x.size(2), states = A.size(1);
  const Views view{steps, channels, states};
  const scalar_t *x_ = x.data_ptr<scalar_t>(), *dt_ = dt.data_ptr<scalar_t>(), *A_ = A.data_ptr<scalar_t>();
  const scalar_t *B_ = B.data_ptr<scalar_t>(), *C_ = C.data_ptr<scalar_t>(), *D_ = D.data_ptr<scalar_t>();
  const scalar_t* h0_ = h0.data_ptr<scalar_t>();
  scalar_t *y_ = y.data_ptr<scalar_t>(), *last_ = h_last.data_ptr<scalar_t>();
  scalar_t* saved = checkpoints ? checkpoints->data_ptr<scalar_t>() : nullptr;
  const int64_t n_checkpoints = (steps + CHECKPOINT - 1) / CHECKPOINT;
  const int64_t blocks = (channels + CHANNELS - 1) / CHANNELS;
  at::parallel_for(0, rows * blocks, 1, [&](int64_t first, int64_t end) {
    std::vector<scalar_t> h(CHANNELS * states);
    for (int64_t task = first; task < end; ++task) {
      const int64_t row = task / blocks, d0 = (task % blocks) * CHANNELS;
      const int64_t width = std::min(CHANNELS, channels - d0);
      for (int64_t c = 0; c < width; ++c)
        for (int64_t n = 0; n < states; ++n) h[c * states + n] = h0_[(row * channels + d0 + c) * states + n];
      for (int64_t t = 0; t < steps; ++t) {
        if (saved && t % CHECKPOINT == 0) {
          scalar_t* out = saved + ((row * n_checkpoints + t / CHECKPOINT) * channels + d0) * states;
          std::copy(h.begin(), h.begin() + width * states, out);
        }
        const int64_t i = view.at(row, t, d0);
        forward_step(x_ + i, dt_ + i, A_ + d0 * states, B_ + view.at_state(row, t, 0),
                     C_ + view.at_state(row, t, 0), D_ + d0, y_ + i, h.data(), width, states);
      }
      for (int64_t c = 0; c < width; ++c)
        for (int64_t n = 0; n < states; ++n) last_[(row * channels + d0 + c) * states + n] = h[c * states + n];
    }
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                     const at::Tensor& C, const at::Tensor& D, const at::Tensor& checkpoints,
                     const at::Tensor& grad_y, const at::Tensor& grad_h_last, at::Tensor& grad_x,
                     at::Tensor& grad_dt, at::Tensor& grad_A_parts, at::Tensor& grad_B_parts,
                     at::Tensor& grad_C_parts, at::Tensor& grad_D_parts, at::Tensor& grad_h0) {
  const int64_t rows = x.size(0), steps = x.size(1), channels = x.size(2), states = A.size(1);
  const Views view{steps, channels, states};
  const scalar_t *x_ = x.data_ptr<scalar_t>(), *dt_ = dt.data_ptr<scalar_t>(), *A_ = A.data_ptr<scalar_t>();
  const scalar_t *B_ = B.data_ptr<scalar_t>(), *C_ = C.data_ptr<scalar_t>(), *D_ = D.data_ptr<scalar_t>();
  const scalar_t *saved = checkpoints.data_ptr<scalar_t>(), *gy_ = grad_y.data_ptr<scalar_t>();
  const scalar_t* g_last = grad_h_last.data_ptr<scalar_t>();
  scalar_t *gx_ = grad_x.data_ptr<scalar_t>(), *gdt_ = grad_dt.data_ptr<scalar_t>();
  scalar_t *gA_ = grad_A_parts.data_ptr<scalar_t>(), *gB_ = grad_B_parts.data_ptr<scalar_t>();
  scalar_t *gC_ = grad_C_parts.data_ptr<scalar_t>(), *gD_ = grad_D_parts.data_ptr<scalar_t>();
  scalar_t* gh0_ = grad_h0.data_ptr<scalar_t>();
  const int64_t n_checkpoints = (steps + CHECKPOINT - 1) / CHECKPOINT;
  const int64_t blocks = (channels + CHANNELS - 1) / CHANNELS;
  at::parallel_for(0, rows * blocks, 1, [&](int64_t first, int64_t end) {
    // segment[k] holds the state after step start + k - 1 (segment[0]: the checkpoint).
    std::vector<scalar_t> segment((CHECKPOINT + 1) * CHANNELS * states), g(CHANNELS * states);
    std::vector<scalar_t> decay(CHECKPOINT * CHANNELS * states);
    for (int64_t task = first; task < end; ++task) {
      const int64_t row = task / blocks, block = task % blocks, d0 = block * CHANNELS;
      const int64_t width = std::min(CHANNELS, channels - d0), stride = CHANNELS * states;
      // This task's parts: of dB, dC [blocks, rows, steps, states], dA [rows, channels, states], dD [rows, channels].
      scalar_t* gB_part = gB_ + (block * rows + row) * steps * states;
      scalar_t* gC_part = gC_ + (block * rows + row) * steps * states;
      for (int64_t c = 0; c < width; ++c)
        for (int64_t n = 0; n < states; ++n) g[c * states + n] = g_last[(row * channels + d0 + c) * states + n];
      for (int64_t s = n_checkpoints - 1; s >= 0; --s) {
        const int64_t start = s * CHECKPOINT, stop = std::min(start + CHECKPOINT, steps);
        const scalar_t* entering = saved + ((row * n_checkpoints + s) * channels + d0) * states;
        std::copy(entering, entering + width * states, segment.begin());
        for (int64_t t = start; t < stop; ++t) {
          const int64_t k = t - start;
          const scalar_t* B_t = B_ + view.at_state(row, t, 0);
          for (int64_t c = 0; c < width; ++c) {
            const int64_t i = view.at(row, t, d0 + c);
            const scalar_t step = dt_[i], input = step * x_[i];
            const scalar_t* A_d = A_ + (d0 + c) * states;
            const scalar_t* before = segment.data() + k * stride + c * states;
            scalar_t* after = segment.data() + (k + 1) * stride + c * states;
            scalar_t* a = decay.data() + k * stride + c * states;
#pragma omp simd
            for (int64_t n = 0; n < states; ++n) {
              a[n] = std::exp(step * A_d[n]);
              after[n] = a[n] * before[n] + input * B_t[n];
            }
          }
        }
        for (int64_t t = stop - 1; t >= start; --t) {
          const int64_t k = t - start;
          const scalar_t *B_t = B_ + view.at_state(row, t, 0), *C_t = C_ + view.at_state(row, t, 0);
          scalar_t *gB_t = gB_part + t * states, *gC_t = gC_part + t * states;
          for (int64_t c = 0; c < width; ++c) {
            const int64_t i = view.at(row, t, d0 + c), d = d0 + c;
            const scalar_t step = dt_[i], xv = x_[i], dy = gy_[i], input = step * xv;
            const scalar_t* A_d = A_ + d * states;
            const scalar_t* before = segment.data() + k * stride + c * states;
            const scalar_t* after = segment.data() + (k + 1) * stride + c * states;
            const scalar_t* a = decay.data() + k * stride + c * states;
            scalar_t* g_c = g.data() + c * states;
            scalar_t* gA_d = gA_ + (row * channels + d) * states;
            scalar_t grad_input = 0, grad_step = 0;
#pragma omp simd reduction(+ : grad_input, grad_step)
            for (int64_t n = 0; n < states; ++n) {
              gC_t[n] += after[n] * dy;
              const scalar_t total = g_c[n] + C_t[n] * dy;  // dL/dh[t]
              grad_input += total * B_t[n];
              gB_t[n] += total * input;
              const scalar_t through_decay = total * before[n] * a[n];  // dL/d(dt A), elementwise
              grad_step += through_decay * A_d[n];
              gA_d[n] += through_decay * step;
              g_c[n] = total * a[n];  // dL/dh[t-1] through this step
            }
            gx_[i] = dy * D_[d] + grad_input * step;
            gdt_[i] = grad_step + grad_input * xv;
            gD_[row * channels + d] += dy * xv;
          }
        }
      }
      for (int64_t c = 0; c < width; ++c)
        for (int64_t n = 0; n < states; ++n) gh0_[(row * channels + d0 + c) * states + n] = g[c * states + n];
    }
  });
}

std::vector<at::Tensor> scan_forward(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                     const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                                     const at::Tensor& h0, bool keep_checkpoints) {
  const int64_t rows = x.size(0), steps = x.size(1), channels = x.size(2), states = A.size(1);
  at::Tensor y = at::empty_like(x), h_last = at::empty_like(h0);
  at::Tensor checkpoints = keep_checkpoints
                               ? at::empty({rows, (steps + CHECKPOINT - 1) / CHECKPOINT, channels, states}, x.options())
                               : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bakallm_cpu_scan_forward", [&] {
    forward_kernel<scalar_t>(x, dt, A, B, C, D, h0, y, h_last, keep_checkpoints ? &checkpoints : nullptr);
  });
  return {y, h_last, checkpoints};
}

std::vector<at::Tensor> scan_backward(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                                      const at::Tensor& checkpoints, const at::Tensor& grad_y,
                                      const at::Tensor& grad_h_last) {
  const int64_t rows = x.size(0), steps = x.size(1), channels = x.size(2), states = A.size(1);
  const int64_t blocks = (channels + CHANNELS - 1) / CHANNELS;
  at::Tensor grad_x = at::empty_like(x), grad_dt = at::empty_like(dt), grad_h0 = at::empty_like(grad_h_last);
  at::Tensor grad_A_parts = at::zeros({rows, channels, states}, x.options());
  at::Tensor grad_B_parts = at::zeros({blocks, rows, steps, states}, x.options());
  at::Tensor grad_C_parts = at::zeros({blocks, rows, steps, states}, x.options());
  at::Tensor grad_D_parts = at::zeros({rows, channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bakallm_cpu_scan_backward", [&] {
    backward_kernel<scalar_t>(x, dt, A, B, C, D, checkpoints, grad_y, grad_h_last, grad_x, grad_dt, grad_A_parts,
                              grad_B_parts, grad_C_parts, grad_D_parts, grad_h0);
  });
  return {grad_x, grad_dt, grad_A_parts.sum(0), grad_B_parts.sum(0), grad_C_parts.sum(0), grad_D_parts.sum(0),
          grad_h0};
}

// How many of PyTorch's threads the kernels' tasks run on: 1 when the build lost OpenMP, whatever
// torch.set_num_threads says.
int64_t threads_used(int64_t tasks) {
  std::vector<char> seen(at::get_num_threads(), 0);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) { seen[at::get_thread_num()] = 1; });
  return std::count(seen.begin(), seen.end(), 1);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward", &scan_forward, "selective scan forward (y, last state, checkpoints)");
  module.def("backward", &scan_backward, "selective scan backward (dx, ddt, dA, dB, dC, dD, dh0)");
  module.def("threads_used", &threads_used, "threads that ran `tasks` one-item tasks");
}
