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

// Calls body(tensor_index, begin, end) for every non-empty piece of every
// tensor, split over threads in whole chunks.
template <typename Body>
void for_each_piece(const AdamTensor* tensors, std::size_t count, Body&& body) {
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
  auto run_range = [&](std::size_t start, std::size_t stop) {
    std::size_t i = static_cast<std::size_t>(std::upper_bound(off, off + count + 1, start) - off) - 1;
    for (; i < count && off[i] < stop; ++i) {
      const std::size_t lo = std::max(start, off[i]) - off[i];
      const std::size_t hi = std::min(stop, off[i + 1]) - off[i];
      if (hi > lo) body(i, lo, hi);
    }
  };

  const std::size_t chunks = (total + kChunkElements - 1) / kChunkElements;
  int threads = get_num_threads();
  if (static_cast<std::size_t>(threads) > chunks) threads = static_cast<int>(chunks);
#ifdef _OPENMP
  if (threads > 1 && total >= kParallelMinElements) {
#pragma omp parallel num_threads(threads)
    {
      const std::size_t tid = static_cast<std::size_t>(omp_get_thread_num());
      const std::size_t team = static_cast<std::size_t>(omp_get_num_threads());
      const std::size_t c0 = chunks * tid / team;
      const std::size_t c1 = chunks * (tid + 1) / team;
      run_range(c0 * kChunkElements, std::min(c1 * kChunkElements, total));
    }
    return;
  }
#endif
  run_range(0, total);
}

}  // namespace

std::ptrdiff_t find_nonfinite(const AdamTensor* tensors, std::size_t count) {
  const KernelTable& k = active_kernels();
  std::atomic<std::ptrdiff_t> first{-1};
  for_each_piece(tensors, count, [&](std::size_t i, std::size_t lo, std::size_t hi) {
    const std::ptrdiff_t known = first.load(std::memory_order_relaxed);
    if (known >= 0 && known <= static_cast<std::ptrdiff_t>(i)) return;
    const AdamTensor& t = tensors[i];
    if (k.nonfinite[static_cast<int>(t.dtype)](t.grad, lo, hi, t.scalars.grad_scale)) {
      std::ptrdiff_t cur = first.load();
      const std::ptrdiff_t idx = static_cast<std::ptrdiff_t>(i);
      while ((cur < 0 || idx < cur) && !first.compare_exchange_weak(cur, idx)) {
      }
    }
  });
  return first.load();
}

void adam_multi_tensor(const AdamTensor* tensors, std::size_t count) {
  const KernelTable& k = active_kernels();
  for_each_piece(tensors, count, [&](std::size_t i, std::size_t lo, std::size_t hi) {
    const AdamTensor& t = tensors[i];
    k.adam[static_cast<int>(t.dtype)][t.weight_decay_mode][t.amsgrad ? 1 : 0][t.eps_style](t, lo, hi);
  });
}

}  // namespace adamcpp
