// adamcpp: the chunked multi-tensor driver and the GIL-free core of a step,
// shared by every ISA target (the kernels come from the dispatch table).
#include "core/multi_tensor.h"

#include <algorithm>
#include <atomic>
#include <cmath>

#include "core/dispatch.h"
#include "core/step_scalars.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#define ADAMCPP_HAVE_MXCSR 1
#else
#include <cfenv>
#endif

namespace adamcpp {
namespace {

// The calling thread's floating-point modes (rounding, flush-to-zero,
// denormals-are-zero), carried into every worker of a parallel region: a
// caller that flushes denormals gets the same bits at any thread count.
class FloatModes {
 public:
  static FloatModes current() {
    FloatModes m;
#ifdef ADAMCPP_HAVE_MXCSR
    m.csr_ = _mm_getcsr();
#else
    std::fegetenv(&m.env_);
#endif
    return m;
  }

 private:
#ifdef ADAMCPP_HAVE_MXCSR
  // Control bits (DAZ, exception masks, rounding, FTZ); the status flags stay the worker's own.
  static constexpr unsigned kControl = 0xFFC0u;
  void apply(const FloatModes& own) const {
    if ((csr_ ^ own.csr_) & kControl) _mm_setcsr((own.csr_ & ~kControl) | (csr_ & kControl));
  }
  void restore() const { _mm_setcsr(csr_); }
  unsigned csr_ = 0;
#else
  void apply(const FloatModes&) const { std::fesetenv(&env_); }
  void restore() const { std::fesetenv(&env_); }
  std::fenv_t env_{};
#endif
  friend class FloatModeScope;
};

// Applies a thread's modes to this thread until the end of the scope.
class FloatModeScope {
 public:
  explicit FloatModeScope(const FloatModes& modes) : saved_(FloatModes::current()) { modes.apply(saved_); }
  ~FloatModeScope() { saved_.restore(); }
  FloatModeScope(const FloatModeScope&) = delete;
  FloatModeScope& operator=(const FloatModeScope&) = delete;

 private:
  FloatModes saved_;
};

// Index of a parameter's compute type in the kernel table: float64 for
// float64 parameters, float32 for the others.
inline int compute_index(DType d) { return d == DType::f64 ? 1 : 0; }

// Fills ws.offsets with the first global element of each tensor, then the total; returns the total.
template <typename Tensor>
std::size_t tensor_offsets(const Tensor* tensors, std::size_t count, Workspace& ws) {
  std::vector<std::size_t>& offsets = ws.offsets;
  offsets.resize(count + 1);
  std::size_t total = 0;
  for (std::size_t i = 0; i < count; ++i) {
    offsets[i] = total;
    total += tensors[i].numel;
  }
  offsets[count] = total;
  return total;
}

// Calls run(c0, c1) over the chunks of `total` elements: each thread of the team takes one contiguous run
// of whole chunks (the calling thread alone below kParallelMinElements).
template <typename Run>
void over_chunks(std::size_t total, Run&& run) {
  const std::size_t chunks = (total + kChunkElements - 1) / kChunkElements;
  int threads = get_num_threads();
  if (static_cast<std::size_t>(threads) > chunks) threads = static_cast<int>(chunks);
#ifdef _OPENMP
  if (threads > 1 && total >= kParallelMinElements) {
    const FloatModes caller = FloatModes::current();
#pragma omp parallel num_threads(threads)
    {
      const FloatModeScope modes(caller);
      const std::size_t tid = static_cast<std::size_t>(omp_get_thread_num());
      const std::size_t team = static_cast<std::size_t>(omp_get_num_threads());
      run(chunks * tid / team, chunks * (tid + 1) / team);
    }
    return;
  }
#endif
  run(std::size_t(0), chunks);
}

// The tensor holding global element `at` < total (offsets as tensor_offsets left them: the last of the
// tensors that start at or before it, so never an empty one).
inline std::size_t tensor_at(const std::size_t* off, std::size_t count, std::size_t at) {
  return static_cast<std::size_t>(std::upper_bound(off, off + count + 1, at) - off) - 1;
}

// Calls body(tensor_index, begin, end, chunk) for every non-empty piece of
// every tensor; a piece never crosses a chunk boundary, and each thread takes
// one contiguous run of whole chunks.
template <typename Tensor, typename Body>
void for_each_piece(const Tensor* tensors, std::size_t count, Workspace& ws, Body&& body) {
  const std::size_t total = tensor_offsets(tensors, count, ws);
  if (total == 0) return;
  const std::size_t* off = ws.offsets.data();
  over_chunks(total, [&](std::size_t c0, std::size_t c1) {
    if (c0 >= c1) return;
    std::size_t i = tensor_at(off, count, c0 * kChunkElements);
    for (std::size_t c = c0; c < c1; ++c) {
      const std::size_t start = c * kChunkElements;
      const std::size_t stop = std::min(start + kChunkElements, total);
      while (off[i + 1] <= start) ++i;
      for (std::size_t j = i; j < count && off[j] < stop; ++j) {
        const std::size_t lo = std::max(start, off[j]) - off[j];
        const std::size_t hi = std::min(stop, off[j + 1]) - off[j];
        if (hi > lo) body(j, lo, hi, c);
      }
    }
  });
}

// Index of the first tensor whose scaled gradient has a NaN or Inf, or -1.
template <typename Tensor>
std::ptrdiff_t find_nonfinite(const Tensor* tensors, std::size_t count, Workspace& ws) {
  const KernelTable& k = active_kernels();
  std::atomic<std::ptrdiff_t> first{-1};
  for_each_piece(tensors, count, ws, [&](std::size_t i, std::size_t lo, std::size_t hi, std::size_t) {
    const std::ptrdiff_t idx = static_cast<std::ptrdiff_t>(i);
    std::ptrdiff_t cur = first.load(std::memory_order_relaxed);
    if (cur >= 0 && cur <= idx) return;
    const TensorRef& t = tensors[i];
    if (k.nonfinite[static_cast<int>(t.grad_dtype)][compute_index(t.dtype)](t.grad, lo, hi, t.grad_scale)) {
      cur = first.load();
      while ((cur < 0 || idx < cur) && !first.compare_exchange_weak(cur, idx)) {
      }
    }
  });
  return first.load();
}

template <typename Tensor>
double sum_squares_of(const Tensor* tensors, std::size_t count, Workspace& ws) {
  const KernelTable& k = active_kernels();
  std::size_t total = 0;
  for (std::size_t i = 0; i < count; ++i) total += tensors[i].numel;
  ws.partial.assign((total + kChunkElements - 1) / kChunkElements, 0.0);
  double* part = ws.partial.data();
  for_each_piece(tensors, count, ws, [&](std::size_t i, std::size_t lo, std::size_t hi, std::size_t chunk) {
    const TensorRef& t = tensors[i];
    part[chunk] += k.sum_squares[static_cast<int>(t.grad_dtype)](t.grad, lo, hi);
  });
  double sum = 0.0;
  for (double p : ws.partial) sum += p;
  return sum;
}

// The loop of an Adam tensor: its compute-type loop when every array holds
// the compute type, a fused 16-bit layout (kernels.h) when it has one, else
// the blocked conversion around the compute-type loop (the same bits).
#if defined(__GNUC__) || defined(__clang__)
__attribute__((always_inline))
#endif
inline AdamChunkFn adam_fn(const KernelTable& k, const AdamTensor& t, bool fused) {
  const int wd = static_cast<int>(t.weight_decay_mode);
  const int e = static_cast<int>(t.eps_style);
  const DType d = t.dtype;
  if (t.native) return k.adam[static_cast<int>(d)][wd][t.amsgrad ? 1 : 0][e];
  if (fused && !t.amsgrad && t.eps_style == EpsStyle::torch && t.state_dtype == DType::bf16 &&
      t.state_rounding == Rounding::stochastic) {
    if (d == DType::f32 && t.grad_dtype == DType::f32) {
      return k.adam_fused[static_cast<int>(FusedLayout::bf16_state)][wd];
    }
    if (d == DType::bf16 && t.grad_dtype == DType::bf16 && t.master_param != nullptr) {
      return k.adam_fused[static_cast<int>(FusedLayout::bf16_master)][wd];
    }
    if (d == DType::bf16 && t.grad_dtype == DType::bf16 && t.param_rounding == Rounding::stochastic) {
      return k.adam_fused[static_cast<int>(FusedLayout::bf16)][wd];
    }
  }
  return k.adam_blocked[compute_index(d)];
}

SgdChunkFn sgd_fn(const KernelTable& k, const SgdTensor& t) {
  const int c = compute_index(t.dtype);
  if (t.grad_dtype != t.dtype) return k.sgd_blocked[c];
  return k.sgd[c][t.weight_decay_on ? 1 : 0][static_cast<int>(t.momentum_mode)][t.first ? 1 : 0];
}

// The update: each thread takes the elements of its chunks (for_each_piece's split, so an element's arithmetic
// never depends on the thread count) and walks them tensor by tensor, a run of tensors that share one loop and
// one step's scalars (run_after) in one call: single(t, lo, hi) for a tensor alone, run(head, first, count, lo,
// hi) for a run, `head` its first tensor (a range that starts inside a run takes its first tensor's scalars).
template <typename Tensor, typename Single, typename Run>
void update_in_runs(const Tensor* tensors, std::size_t count, Workspace& ws, Single&& single, Run&& run) {
  const std::size_t total = tensor_offsets(tensors, count, ws);
  if (total == 0) return;
  const std::size_t* off = ws.offsets.data();
  over_chunks(total, [&](std::size_t c0, std::size_t c1) {
    if (c0 >= c1) return;
    const std::size_t start = c0 * kChunkElements;
    const std::size_t stop = std::min(c1 * kChunkElements, total);
    const std::size_t last = tensor_at(off, count, stop - 1);  // the tensor of the range's last element
    std::size_t j = tensor_at(off, count, start);
    std::size_t head = j;
    while (head > 0 && tensors[head - 1].run_after >= j - (head - 1)) --head;
    while (j <= last) {
      const Tensor& t = tensors[j];
      const std::size_t end = std::min<std::size_t>(last, j + t.run_after);
      const std::size_t lo = std::max(start, off[j]) - off[j];
      const std::size_t hi = std::min(stop, off[end + 1]) - off[end];
      if (end > j || head != j) {
        run(tensors[head], &t, end - j + 1, lo, hi);
      } else if (hi > lo) {
        single(t, lo, hi);
      }
      j = end + 1;
      head = j;
    }
  });
}

void update(const AdamTensor* tensors, std::size_t count, Workspace& ws) {
  const KernelTable& k = active_kernels();
  const bool fused = fused_layouts_enabled();
  update_in_runs(
      tensors, count, ws, [&](const AdamTensor& t, std::size_t lo, std::size_t hi) { adam_fn(k, t, fused)(t, lo, hi); },
      [&](const AdamTensor& head, const AdamTensor* first, std::size_t n, std::size_t lo, std::size_t hi) {
        k.adam_run[compute_index(head.dtype)][static_cast<int>(head.weight_decay_mode)][head.amsgrad ? 1 : 0]
                  [static_cast<int>(head.eps_style)](head, first, n, lo, hi);
      });
}

void update(const SgdTensor* tensors, std::size_t count, Workspace& ws) {
  const KernelTable& k = active_kernels();
  update_in_runs(
      tensors, count, ws, [&](const SgdTensor& t, std::size_t lo, std::size_t hi) { sgd_fn(k, t)(t, lo, hi); },
      [&](const SgdTensor& head, const SgdTensor* first, std::size_t n, std::size_t lo, std::size_t hi) {
        k.sgd_run[compute_index(head.dtype)][head.weight_decay_on ? 1 : 0][static_cast<int>(head.momentum_mode)]
                 [head.first ? 1 : 0](head, first, n, lo, hi);
      });
}

template <typename Tensor>
StepOutcome run_any_step(Tensor* tensors, std::size_t count, const StepPolicy& policy, Workspace& ws) {
  StepOutcome out{false, -1, std::nan("")};
  const bool clip = policy.max_grad_norm >= 0.0;
  double sum = 0.0;
  if (clip) {
    sum = policy.norm_tensors != nullptr ? sum_squares_of(policy.norm_tensors, policy.norm_count, ws)
                                         : sum_squares_of(tensors, count, ws);
  }
  const AfterNorm after = after_norm(sum, policy.grad_scale, policy.max_grad_norm, policy.nonfinite);
  if (after.check == NonfiniteCheck::at_grad_scale) out.nonfinite_tensor = find_nonfinite(tensors, count, ws);
  if (clip) {
    out.grad_norm = after.grad_norm;
    for (std::size_t i = 0; i < count; ++i) tensors[i].grad_scale *= after.coef;
  }
  if (after.check == NonfiniteCheck::at_clipped_scale) out.nonfinite_tensor = find_nonfinite(tensors, count, ws);
  if (out.nonfinite_tensor < 0) {
    update(tensors, count, ws);
    out.applied = true;
  }
  return out;
}

}  // namespace

StepOutcome run_step(AdamTensor* tensors, std::size_t count, const StepPolicy& policy, Workspace& ws) {
  return run_any_step(tensors, count, policy, ws);
}

StepOutcome run_step(SgdTensor* tensors, std::size_t count, const StepPolicy& policy, Workspace& ws) {
  return run_any_step(tensors, count, policy, ws);
}

double sum_squares(const TensorRef* tensors, std::size_t count, Workspace& ws) {
  return sum_squares_of(tensors, count, ws);
}

void chunk_sum_squares(const TensorRef* tensors, std::size_t count, Workspace& ws) {
  sum_squares_of(tensors, count, ws);
}

std::ptrdiff_t first_nonfinite(const TensorRef* tensors, std::size_t count, Workspace& ws) {
  return find_nonfinite(tensors, count, ws);
}

}  // namespace adamcpp
