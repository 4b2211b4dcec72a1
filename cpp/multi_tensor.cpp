// adamcpp: the chunked multi-tensor driver, shared by every ISA target.
#include "multi_tensor.h"

#include <algorithm>
#include <atomic>
#include <vector>

#include "dispatch.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace adamcpp {
namespace {

// Calls body(tensor_index, begin, end, chunk) for every non-empty piece of
// every tensor; a piece never crosses a chunk boundary, and each thread takes
// one contiguous run of whole chunks.
template <typename Tensor, typename Body>
void for_each_piece(const Tensor* tensors, std::size_t count, Body&& body) {
  // offsets[i] = first global element of tensor i; reused between calls so the
  // steady-state step does not allocate.
  thread_local std::vector<std::size_t> offsets;
  offsets.resize(count + 1);
  std::size_t total = 0;
  for (std::size_t i = 0; i < count; ++i) {
    offsets[i] = total;
    total += tensors[i].numel;
  }
  offsets[count] = total;
  if (total == 0) return;

  const std::size_t* off = offsets.data();
  const std::size_t chunks = (total + kChunkElements - 1) / kChunkElements;
  auto run_chunks = [&](std::size_t c0, std::size_t c1) {
    if (c0 >= c1) return;
    std::size_t i = static_cast<std::size_t>(std::upper_bound(off, off + count + 1, c0 * kChunkElements) - off) - 1;
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
  };

  int threads = get_num_threads();
  if (static_cast<std::size_t>(threads) > chunks) threads = static_cast<int>(chunks);
#ifdef _OPENMP
  if (threads > 1 && total >= kParallelMinElements) {
#pragma omp parallel num_threads(threads)
    {
      const std::size_t tid = static_cast<std::size_t>(omp_get_thread_num());
      const std::size_t team = static_cast<std::size_t>(omp_get_num_threads());
      run_chunks(chunks * tid / team, chunks * (tid + 1) / team);
    }
    return;
  }
#endif
  run_chunks(0, chunks);
}

}  // namespace

template <typename Tensor>
std::ptrdiff_t find_nonfinite(const Tensor* tensors, std::size_t count) {
  const KernelTable& k = active_kernels();
  std::atomic<std::ptrdiff_t> first{-1};
  for_each_piece(tensors, count, [&](std::size_t i, std::size_t lo, std::size_t hi, std::size_t) {
    const std::ptrdiff_t idx = static_cast<std::ptrdiff_t>(i);
    std::ptrdiff_t cur = first.load(std::memory_order_relaxed);
    if (cur >= 0 && cur <= idx) return;
    const TensorRef& t = tensors[i];
    if (k.nonfinite[static_cast<int>(t.dtype)](t.grad, lo, hi, t.grad_scale)) {
      cur = first.load();
      while ((cur < 0 || idx < cur) && !first.compare_exchange_weak(cur, idx)) {
      }
    }
  });
  return first.load();
}

template <typename Tensor>
double sum_squares(const Tensor* tensors, std::size_t count) {
  const KernelTable& k = active_kernels();
  std::size_t total = 0;
  for (std::size_t i = 0; i < count; ++i) total += tensors[i].numel;
  thread_local std::vector<double> partial;
  partial.assign((total + kChunkElements - 1) / kChunkElements, 0.0);
  double* part = partial.data();
  for_each_piece(tensors, count, [&](std::size_t i, std::size_t lo, std::size_t hi, std::size_t chunk) {
    const TensorRef& t = tensors[i];
    part[chunk] += k.sum_squares[static_cast<int>(t.dtype)](t.grad, lo, hi);
  });
  double sum = 0.0;
  for (double p : partial) sum += p;
  return sum;
}

template std::ptrdiff_t find_nonfinite<AdamTensor>(const AdamTensor*, std::size_t);
template std::ptrdiff_t find_nonfinite<SgdTensor>(const SgdTensor*, std::size_t);
template double sum_squares<AdamTensor>(const AdamTensor*, std::size_t);
template double sum_squares<SgdTensor>(const SgdTensor*, std::size_t);
template double sum_squares<TensorRef>(const TensorRef*, std::size_t);

void adam_multi_tensor(const AdamTensor* tensors, std::size_t count) {
  const KernelTable& k = active_kernels();
  for_each_piece(tensors, count, [&](std::size_t i, std::size_t lo, std::size_t hi, std::size_t) {
    const AdamTensor& t = tensors[i];
    k.adam[static_cast<int>(t.dtype)][t.weight_decay_mode][t.amsgrad ? 1 : 0][t.eps_style](t, lo, hi);
  });
}

void sgd_multi_tensor(const SgdTensor* tensors, std::size_t count) {
  const KernelTable& k = active_kernels();
  for_each_piece(tensors, count, [&](std::size_t i, std::size_t lo, std::size_t hi, std::size_t) {
    const SgdTensor& t = tensors[i];
    k.sgd[static_cast<int>(t.dtype)][t.weight_decay_on ? 1 : 0][t.momentum_mode][t.first ? 1 : 0](t, lo, hi);
  });
}

}  // namespace adamcpp
