// adamcpp: the work of one thread of each CUDA kernel of a step, written as
// __host__ __device__ functions of (block, thread): the update of one block
// of one tensor, the non-finite check, the norm's lanes, chunks and decision.
// cuda_unit.cu wraps each in a __global__ kernel; a test runs the very same
// functions on the host over every block and thread. Per-element math comes
// from optim_math.h (the CPU kernels' definition), so results match the CPU
// bit for bit (no FMA contraction: nvcc --fmad=false).
//
// The including unit defines ADAMCPP_MATH_NS before including this file.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/optim_math.h"
#include "core/step_scalars.h"
#include "cuda/launch_plan.h"

namespace adamcpp {
namespace cuda {
namespace ADAMCPP_MATH_NS {

using adamcpp::ADAMCPP_MATH_NS::adam_element;
using adamcpp::ADAMCPP_MATH_NS::adam_scalars;
using adamcpp::ADAMCPP_MATH_NS::sgd_element;
using adamcpp::ADAMCPP_MATH_NS::sgd_scalars;

// The largest k in [lo, hi) with starts[k] <= x, for ascending `starts` where
// equal neighbours belong to empty tensors (the last of them is the non-empty
// one). Needs starts[lo] <= x.
ADAMCPP_HD std::uint32_t last_at_or_below(const std::uint64_t* starts, std::uint32_t lo, std::uint32_t hi,
                                          std::uint64_t x) {
  while (lo < hi) {
    const std::uint32_t mid = lo + (hi - lo) / 2;
    if (starts[mid] <= x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo - 1;
}

ADAMCPP_HD std::uint64_t min_u64(std::uint64_t a, std::uint64_t b) { return a < b ? a : b; }
ADAMCPP_HD std::uint64_t max_u64(std::uint64_t a, std::uint64_t b) { return a < b ? b : a; }

// Four consecutive elements, with one 16-byte load or store per float32 group
// (two per float64 group). The pointer is 16-byte aligned.
template <typename T>
struct Quad {
  T v[4];
};

ADAMCPP_HD Quad<float> load4(const float* p) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  return Quad<float>{{x.x, x.y, x.z, x.w}};
}

ADAMCPP_HD Quad<double> load4(const double* p) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  return Quad<double>{{a.x, a.y, b.x, b.y}};
}

ADAMCPP_HD void store4(float* p, const Quad<float>& q) {
  *reinterpret_cast<float4*>(p) = make_float4(q.v[0], q.v[1], q.v[2], q.v[3]);
}

ADAMCPP_HD void store4(double* p, const Quad<double>& q) {
  reinterpret_cast<double2*>(p)[0] = make_double2(q.v[0], q.v[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(q.v[2], q.v[3]);
}

// The elements [first, last) that one block of the element kernels covers,
// the tensor they belong to and its position in the launch order.
struct BlockRange {
  std::uint32_t tensor;
  std::uint64_t first;
  std::uint64_t last;
};

// Block `block` of the positions [begin, end) (one launch group, or all).
template <typename Step>
ADAMCPP_HD BlockRange block_range(const TableView<Step>& tab, std::uint32_t begin, std::uint32_t end,
                                  std::uint64_t block) {
  const std::uint32_t pos = last_at_or_below(tab.block_start, begin, end, block);
  BlockRange r;
  r.tensor = tab.order[pos];
  r.first = (block - tab.block_start[pos]) * kBlockElements;
  r.last = min_u64(r.first + kBlockElements, tab.tensors[r.tensor].numel);
  return r;
}

// Calls visit(k) for the vector groups (k the first element of 4) and then
// visit_one(k) for the single elements this thread owns in [first, last):
// with vector loads when the tensor allows them, one element at a time otherwise.
template <typename Group, typename One>
ADAMCPP_HD void for_each_element(const DeviceTensor& d, const BlockRange& r, unsigned thread, unsigned threads,
                                 Group&& visit, One&& visit_one) {
  std::uint64_t scalar_from = r.first;
  if (d.flags & kFlagVector) {
    const std::uint64_t groups = (r.last - r.first) / kVector;
    for (std::uint64_t k = thread; k < groups; k += threads) visit(r.first + k * kVector);
    scalar_from = r.first + groups * kVector;
  }
  for (std::uint64_t k = scalar_from + thread; k < r.last; k += threads) visit_one(k);
}

// ------------------------------------------------------------------ update

// One thread's part of block `block` of an Adam launch group.
template <typename T, WeightDecay WD, bool Amsgrad, EpsStyle Eps>
ADAMCPP_HD void adam_block(const TableView<AdamStepScalars>& tab, std::uint32_t begin, std::uint32_t end,
                           std::uint64_t block, unsigned thread, unsigned threads) {
  const BlockRange r = block_range(tab, begin, end, block);
  const DeviceTensor& d = tab.tensors[r.tensor];
  const ScalarSet<AdamStepScalars>& set = tab.scalars[d.scalars];
  // The clipping coefficient (1 without clipping) joins the multiplier in double, as on the CPU.
  const AdamScalars<T> s = adam_scalars<T>(set.step, set.grad_scale * tab.status->coef);
  T* param = static_cast<T*>(d.param);
  const T* grad = static_cast<const T*>(d.grad);
  T* exp_avg = static_cast<T*>(d.state[0]);
  T* exp_avg_sq = static_cast<T*>(d.state[1]);
  T* max_exp_avg_sq = static_cast<T*>(d.state[2]);
  for_each_element(
      d, r, thread, threads,
      [&](std::uint64_t k) {
        Quad<T> p = load4(param + k);
        const Quad<T> g = load4(grad + k);
        Quad<T> m = load4(exp_avg + k);
        Quad<T> v = load4(exp_avg_sq + k);
        Quad<T> vmax{};
        if constexpr (Amsgrad) vmax = load4(max_exp_avg_sq + k);
        for (int j = 0; j < 4; ++j) {
          adam_element<T, WD, Amsgrad, Eps>(p.v[j], g.v[j], m.v[j], v.v[j], Amsgrad ? &vmax.v[j] : nullptr, s);
        }
        store4(param + k, p);
        store4(exp_avg + k, m);
        store4(exp_avg_sq + k, v);
        if constexpr (Amsgrad) store4(max_exp_avg_sq + k, vmax);
      },
      [&](std::uint64_t k) {
        adam_element<T, WD, Amsgrad, Eps>(param[k], grad[k], exp_avg[k], exp_avg_sq[k],
                                          Amsgrad ? &max_exp_avg_sq[k] : nullptr, s);
      });
}

// One thread's part of block `block` of an SGD launch group.
template <typename T, bool WeightDecayOn, Momentum Mom, bool First>
ADAMCPP_HD void sgd_block(const TableView<SgdStepScalars>& tab, std::uint32_t begin, std::uint32_t end,
                          std::uint64_t block, unsigned thread, unsigned threads) {
  const BlockRange r = block_range(tab, begin, end, block);
  const DeviceTensor& d = tab.tensors[r.tensor];
  const ScalarSet<SgdStepScalars>& set = tab.scalars[d.scalars];
  const SgdScalars<T> s = sgd_scalars<T>(set.step, set.grad_scale * tab.status->coef);
  T* param = static_cast<T*>(d.param);
  const T* grad = static_cast<const T*>(d.grad);
  T* buffer = static_cast<T*>(d.state[0]);
  constexpr bool kBuffer = Mom != Momentum::none;
  for_each_element(
      d, r, thread, threads,
      [&](std::uint64_t k) {
        Quad<T> p = load4(param + k);
        const Quad<T> g = load4(grad + k);
        Quad<T> b{};
        if constexpr (kBuffer && !First) b = load4(buffer + k);
        for (int j = 0; j < 4; ++j) {
          sgd_element<T, WeightDecayOn, Mom, First>(p.v[j], g.v[j], kBuffer ? &b.v[j] : nullptr, s);
        }
        store4(param + k, p);
        if constexpr (kBuffer) store4(buffer + k, b);
      },
      [&](std::uint64_t k) {
        sgd_element<T, WeightDecayOn, Mom, First>(param[k], grad[k], kBuffer ? &buffer[k] : nullptr, s);
      });
}

// ------------------------------------------------------- non-finite check

ADAMCPP_HD std::uint64_t read_first_nonfinite(const StepStatus* st) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const volatile std::uint64_t*>(&st->first_nonfinite);
#else
  return st->first_nonfinite;
#endif
}

ADAMCPP_HD void lower_first_nonfinite(StepStatus* st, std::uint64_t tensor) {
#if defined(__CUDA_ARCH__)
  atomicMin(reinterpret_cast<unsigned long long*>(&st->first_nonfinite), static_cast<unsigned long long>(tensor));
#else
  if (tensor < st->first_nonfinite) st->first_nonfinite = tensor;
#endif
}

// Whether any of this thread's elements of the block has a NaN or Inf
// gradient after the multiplier rounded to T: (g * scale) * 0 is 0 for a
// finite product and NaN otherwise (the CPU kernels' test).
template <typename T>
ADAMCPP_HD bool thread_has_nonfinite(const DeviceTensor& d, const BlockRange& r, double scale_d, unsigned thread,
                                     unsigned threads) {
  const T* grad = static_cast<const T*>(d.grad);
  const T scale = static_cast<T>(scale_d);
  bool bad = false;
  for_each_element(
      d, r, thread, threads,
      [&](std::uint64_t k) {
        const Quad<T> g = load4(grad + k);
        for (int j = 0; j < 4; ++j) bad = bad || (g.v[j] * scale) * T(0) != T(0);
      },
      [&](std::uint64_t k) { bad = bad || (grad[k] * scale) * T(0) != T(0); });
  return bad;
}

// One thread's part of block `block` of the check over every tensor: lowers
// status.first_nonfinite to the tensor's index when it finds one.
template <typename Step>
ADAMCPP_HD void nonfinite_block(const TableView<Step>& tab, std::uint64_t block, unsigned thread, unsigned threads) {
  StepStatus* st = tab.status;
  const std::int32_t mode = st->check_mode;
  if (mode == kCheckNone) return;
  const BlockRange r = block_range(tab, 0, tab.count, block);
  if (read_first_nonfinite(st) <= r.tensor) return;  // a tensor at or before this one is already known
  const DeviceTensor& d = tab.tensors[r.tensor];
  double scale = tab.scalars[d.scalars].grad_scale;
  if (mode == kCheckClipped) scale *= st->coef;
  const bool bad = (d.flags & kFlagFloat64) ? thread_has_nonfinite<double>(d, r, scale, thread, threads)
                                            : thread_has_nonfinite<float>(d, r, scale, thread, threads);
  if (bad) lower_first_nonfinite(st, r.tensor);
}

// --------------------------------------------------------------- the norm

// Thread `index` of the first norm kernel: lane (index % 8) of piece (index / 8),
// summed exactly as the CPU's sum_squares sums that lane: element k of the
// piece goes to lane k % 8, each lane in element order, squares in double.
template <typename Step>
ADAMCPP_HD void norm_lane(const TableView<Step>& tab, std::uint64_t index) {
  if (index >= tab.pieces * kNormLanes) return;
  const std::uint64_t piece = index / kNormLanes;
  const unsigned lane = static_cast<unsigned>(index % kNormLanes);
  const std::uint32_t i = last_at_or_below(tab.piece_start, 0, tab.count, piece);
  const DeviceTensor& d = tab.tensors[i];
  const std::uint64_t offset = tab.elem_offset[i];
  const std::uint64_t chunk = offset / kNormChunk + (piece - tab.piece_start[i]);
  const std::uint64_t lo = max_u64(chunk * kNormChunk, offset) - offset;
  const std::uint64_t hi = min_u64((chunk + 1) * kNormChunk, offset + d.numel) - offset;
  double sum = 0.0;
  if (d.flags & kFlagFloat64) {
    const double* g = static_cast<const double*>(d.grad);
    for (std::uint64_t k = lo + lane; k < hi; k += kNormLanes) {
      const double x = g[k];
      sum += x * x;
    }
  } else {
    const float* g = static_cast<const float*>(d.grad);
    for (std::uint64_t k = lo + lane; k < hi; k += kNormLanes) {
      const double x = static_cast<double>(g[k]);
      sum += x * x;
    }
  }
  tab.lane_sums[piece * kNormLanes + lane] = sum;
}

// The CPU's combination of a piece's lanes.
ADAMCPP_HD double combine_lanes(const double* l) {
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// Thread `chunk` of the second norm kernel: the chunk's pieces added in tensor order from 0.
template <typename Step>
ADAMCPP_HD void norm_chunk(const TableView<Step>& tab, std::uint64_t chunk) {
  if (chunk >= tab.chunks) return;
  const std::uint64_t start = chunk * kNormChunk;
  const std::uint64_t stop = min_u64(start + kNormChunk, tab.elem_offset[tab.count]);
  double part = 0.0;
  for (std::uint32_t j = last_at_or_below(tab.elem_offset, 0, tab.count, start);
       j < tab.count && tab.elem_offset[j] < stop; ++j) {
    if (tab.tensors[j].numel == 0) continue;
    const std::uint64_t piece = tab.piece_start[j] + (chunk - tab.elem_offset[j] / kNormChunk);
    part += combine_lanes(tab.lane_sums + piece * kNormLanes);
  }
  tab.chunk_sums[chunk] = part;
}

// The check modes are after_norm's decisions (step_scalars.h), by value.
static_assert(kCheckNone == static_cast<std::int32_t>(NonfiniteCheck::none) &&
                  kCheckUnclipped == static_cast<std::int32_t>(NonfiniteCheck::at_grad_scale) &&
                  kCheckClipped == static_cast<std::int32_t>(NonfiniteCheck::at_clipped_scale),
              "CheckMode must number NonfiniteCheck's values");

// What a step does after the norm: after_norm's decision (step_scalars.h, the
// CPU step's), written into the status: the coefficient, and which scale the
// non-finite check uses (if any). max_grad_norm < 0 (global_norm): only the
// sum is kept.
ADAMCPP_HD void decide_after_norm(StepStatus* st, double sum_squares) {
  st->sum_squares = sum_squares;
  if (st->max_grad_norm < 0.0) return;
  const AfterNorm after =
      after_norm(sum_squares, st->call_grad_scale, st->max_grad_norm, static_cast<Nonfinite>(st->policy));
  st->grad_norm = after.grad_norm;
  st->coef = after.coef;
  st->check_mode = static_cast<std::int32_t>(after.check);
}

// A value another block of the same kernel wrote (read from L2, never a stale L1 line).
ADAMCPP_HD double load_from_other_block(const double* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// The last step of the norm (one thread): the chunks added in order from 0, then the decision.
template <typename Step>
ADAMCPP_HD void norm_finish(const TableView<Step>& tab) {
  double sum = 0.0;
  const double* part = tab.chunk_sums;
  std::uint64_t c = 0;
  // Loads run ahead of the (necessarily sequential) additions.
  for (; c + 8 <= tab.chunks; c += 8) {
    double x[8];
    for (int k = 0; k < 8; ++k) x[k] = load_from_other_block(part + c + static_cast<std::uint64_t>(k));
    for (int k = 0; k < 8; ++k) sum += x[k];
  }
  for (; c < tab.chunks; ++c) sum += load_from_other_block(part + c);
  decide_after_norm(tab.status, sum);
}

}  // namespace ADAMCPP_MATH_NS
}  // namespace cuda
}  // namespace adamcpp
