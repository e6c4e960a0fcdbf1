// Mamba-1 selective scan for CPUs, forward and backward, one fused loop per channel block.
//
// Built with the other CPU kernels by bakallm/kernels/cpu_build.py; kernels/cpu_scan.py documents
// the interface; the reference is kernels/reference.py. For row b, channel d and state n:
//
//     h[t] = exp(dt[t] A) h[t-1] + dt[t] x[t] B[t],   y[t] = C[t] . h[t] + D x[t]
//
// Each task owns a block of 64 channels of one row and walks the window once, the states of its
// channels in a small local array laid out [state][channel]: the inner loops run over channels,
// one channel per vector lane, so a step is a few vector instructions per state with no sum across
// lanes, instead of a handful of PyTorch operations over the whole block. Forward keeps the state
// entering every CHECKPOINT-th step; backward walks the checkpoint segments from the last,
// recomputes a segment's states from its checkpoint, then runs the adjoint recurrence through it.
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
// Channels per task, the length of every vector loop: 64 ran celp18's window (552 steps, 1536
// channels) forward and backward in 28 ms on one thread, 32 in 33 ms, 128 in 30 ms, and the
// earlier loops over the 16 states of one channel in 44 ms.
constexpr int64_t CHANNELS = 64;

struct Views {
  // Row-major [rows, steps, channels] for x, dt, y and their gradients; [rows, steps, states] for B, C.
  int64_t steps, channels, states;
  int64_t at(int64_t row, int64_t step, int64_t channel) const { return (row * steps + step) * channels + channel; }
  int64_t at_state(int64_t row, int64_t step, int64_t state) const { return (row * steps + step) * states + state; }
};

// A task's per-state arrays are [states][CHANNELS]: a sum over the 16 states of one channel, as in
// y[t], is then a sum of vectors, where loops over the states of one channel paid a reduction
// across lanes at every step.

// Copies a [width, states] block of a [channels, states] tensor into [states][CHANNELS], or back.
template <typename scalar_t>
void to_lanes(const scalar_t* block, scalar_t* lanes, int64_t width, int64_t states) {
  for (int64_t c = 0; c < width; ++c)
    for (int64_t n = 0; n < states; ++n) lanes[n * CHANNELS + c] = block[c * states + n];
}
template <typename scalar_t>
void from_lanes(const scalar_t* lanes, scalar_t* block, int64_t width, int64_t states) {
  for (int64_t c = 0; c < width; ++c)
    for (int64_t n = 0; n < states; ++n) block[c * states + n] = lanes[n * CHANNELS + c];
}

// One step of a block of `width` channels. Not inlined, so that forward with and without kept
// checkpoints runs the same machine code: under -ffast-math the compiler may otherwise vectorise
// the two loops differently, and results with and without gradients would differ.
template <typename scalar_t>
__attribute__((noinline)) void forward_step(const scalar_t* x, const scalar_t* dt, const scalar_t* A,
                                            const scalar_t* B_t, const scalar_t* C_t, const scalar_t* D,
                                            scalar_t* y, scalar_t* h, int64_t width, int64_t states) {
  scalar_t input[CHANNELS], out[CHANNELS];
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) {
    input[c] = dt[c] * x[c];
    out[c] = D[c] * x[c];
  }
  for (int64_t n = 0; n < states; ++n) {
    const scalar_t b = B_t[n], read = C_t[n];
    const scalar_t* A_n = A + n * CHANNELS;
    scalar_t* h_n = h + n * CHANNELS;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) {
      h_n[c] = std::exp(dt[c] * A_n[c]) * h_n[c] + input[c] * b;
      out[c] += read * h_n[c];
    }
  }
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) y[c] = out[c];
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
    std::vector<scalar_t> h(states * CHANNELS), A_lanes(states * CHANNELS);
    for (int64_t task = first; task < end; ++task) {
      const int64_t row = task / blocks, d0 = (task % blocks) * CHANNELS;
      const int64_t width = std::min(CHANNELS, channels - d0);
      to_lanes(A_ + d0 * states, A_lanes.data(), width, states);
      to_lanes(h0_ + (row * channels + d0) * states, h.data(), width, states);
      for (int64_t t = 0; t < steps; ++t) {
        if (saved && t % CHECKPOINT == 0) {
          // Kept in lane order: only backward reads them.
          scalar_t* out = saved + ((row * n_checkpoints + t / CHECKPOINT) * channels + d0) * states;
          for (int64_t n = 0; n < states; ++n) std::copy_n(h.data() + n * CHANNELS, width, out + n * width);
        }
        const int64_t i = view.at(row, t, d0);
        forward_step(x_ + i, dt_ + i, A_lanes.data(), B_ + view.at_state(row, t, 0), C_ + view.at_state(row, t, 0),
                     D_ + d0, y_ + i, h.data(), width, states);
      }
      from_lanes(h.data(), last_ + (row * channels + d0) * states, width, states);
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
  const int64_t lanes = states * CHANNELS;  // one step's states of a block
  at::parallel_for(0, rows * blocks, 1, [&](int64_t first, int64_t end) {
    // segment[k] holds the states after step start + k - 1 (segment[0]: the checkpoint); decay[k]
    // the factors of step start + k.
    std::vector<scalar_t> segment((CHECKPOINT + 1) * lanes), decay(CHECKPOINT * lanes);
    std::vector<scalar_t> g(lanes), A_lanes(lanes), grad_A(lanes);
    for (int64_t task = first; task < end; ++task) {
      const int64_t row = task / blocks, block = task % blocks, d0 = block * CHANNELS;
      const int64_t width = std::min(CHANNELS, channels - d0);
      // This task's parts: of dB, dC [blocks, rows, steps, states], dA [rows, channels, states], dD [rows, channels].
      scalar_t* gB_part = gB_ + (block * rows + row) * steps * states;
      scalar_t* gC_part = gC_ + (block * rows + row) * steps * states;
      to_lanes(A_ + d0 * states, A_lanes.data(), width, states);
      to_lanes(g_last + (row * channels + d0) * states, g.data(), width, states);
      std::fill(grad_A.begin(), grad_A.end(), scalar_t(0));
      scalar_t grad_D[CHANNELS] = {};
      for (int64_t s = n_checkpoints - 1; s >= 0; --s) {
        const int64_t start = s * CHECKPOINT, stop = std::min(start + CHECKPOINT, steps);
        const scalar_t* entering = saved + ((row * n_checkpoints + s) * channels + d0) * states;
        for (int64_t n = 0; n < states; ++n) std::copy_n(entering + n * width, width, segment.data() + n * CHANNELS);
        for (int64_t t = start; t < stop; ++t) {
          const int64_t k = t - start, i = view.at(row, t, d0);
          const scalar_t *step = dt_ + i, *xv = x_ + i, *B_t = B_ + view.at_state(row, t, 0);
          scalar_t input[CHANNELS];
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) input[c] = step[c] * xv[c];
          for (int64_t n = 0; n < states; ++n) {
            const scalar_t b = B_t[n];
            const scalar_t* A_n = A_lanes.data() + n * CHANNELS;
            const scalar_t* before = segment.data() + k * lanes + n * CHANNELS;
            scalar_t* after = segment.data() + (k + 1) * lanes + n * CHANNELS;
            scalar_t* a = decay.data() + k * lanes + n * CHANNELS;
#pragma omp simd
            for (int64_t c = 0; c < width; ++c) {
              a[c] = std::exp(step[c] * A_n[c]);
              after[c] = a[c] * before[c] + input[c] * b;
            }
          }
        }
        for (int64_t t = stop - 1; t >= start; --t) {
          const int64_t k = t - start, i = view.at(row, t, d0);
          const scalar_t *step = dt_ + i, *xv = x_ + i, *dy = gy_ + i;
          const scalar_t *B_t = B_ + view.at_state(row, t, 0), *C_t = C_ + view.at_state(row, t, 0);
          scalar_t *gB_t = gB_part + t * states, *gC_t = gC_part + t * states;
          scalar_t input[CHANNELS], grad_input[CHANNELS] = {}, grad_step[CHANNELS] = {};
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) input[c] = step[c] * xv[c];
          for (int64_t n = 0; n < states; ++n) {
            const scalar_t b = B_t[n], read = C_t[n];
            const scalar_t* A_n = A_lanes.data() + n * CHANNELS;
            const scalar_t* before = segment.data() + k * lanes + n * CHANNELS;
            const scalar_t* after = segment.data() + (k + 1) * lanes + n * CHANNELS;
            const scalar_t* a = decay.data() + k * lanes + n * CHANNELS;
            scalar_t* g_n = g.data() + n * CHANNELS;
            scalar_t* grad_A_n = grad_A.data() + n * CHANNELS;
            scalar_t grad_read = 0, grad_b = 0;
#pragma omp simd reduction(+ : grad_read, grad_b)
            for (int64_t c = 0; c < width; ++c) {
              grad_read += after[c] * dy[c];
              const scalar_t total = g_n[c] + read * dy[c];  // dL/dh[t]
              grad_input[c] += total * b;
              grad_b += total * input[c];
              const scalar_t through_decay = total * before[c] * a[c];  // dL/d(dt A), elementwise
              grad_step[c] += through_decay * A_n[c];
              grad_A_n[c] += through_decay * step[c];
              g_n[c] = total * a[c];  // dL/dh[t-1] through this step
            }
            gC_t[n] += grad_read;
            gB_t[n] += grad_b;
          }
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) {
            gx_[i + c] = dy[c] * D_[d0 + c] + grad_input[c] * step[c];
            gdt_[i + c] = grad_step[c] + grad_input[c] * xv[c];
            grad_D[c] += dy[c] * xv[c];
          }
        }
      }
      from_lanes(grad_A.data(), gA_ + (row * channels + d0) * states, width, states);
      from_lanes(g.data(), gh0_ + (row * channels + d0) * states, width, states);
      for (int64_t c = 0; c < width; ++c) gD_[row * channels + d0 + c] = grad_D[c];
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
  // Every task writes its channels' dA and dD whole; dB and dC parts are summed into.
  at::Tensor grad_A_parts = at::empty({rows, channels, states}, x.options());
  at::Tensor grad_B_parts = at::zeros({blocks, rows, steps, states}, x.options());
  at::Tensor grad_C_parts = at::zeros({blocks, rows, steps, states}, x.options());
  at::Tensor grad_D_parts = at::empty({rows, channels}, x.options());
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

void bind_scan(pybind11::module_& module) {
  module.def("scan_forward", &scan_forward, "selective scan forward (y, last state, checkpoints)");
  module.def("scan_backward", &scan_backward, "selective scan backward (dx, ddt, dA, dB, dC, dD, dh0)");
  module.def("threads_used", &threads_used, "threads that ran `tasks` one-item tasks");
}
