// adamcpp: the element loops. This one source is compiled once per ISA
// target (CMake defines ADAMCPP_ISA and the -march flags); everything here
// lives in the namespace adamcpp::<ADAMCPP_ISA>.
#include "kernels.h"
#include "isa_unit.h"

namespace adamcpp {
namespace ADAMCPP_ISA {
namespace {

// One fused pass: read p, g, m, v (and v_max), write p, m, v (and v_max).
// The vector body and its scalar tail are the same loop, vectorised by the
// compiler for this translation unit's ISA.
template <typename T, WeightDecay WD, bool Amsgrad, EpsStyle Eps>
void adam_chunk(const AdamTensor& t, std::size_t begin, std::size_t end) {
  const AdamScalars<T> s = adam_scalars<T>(t.scalars, t.grad_scale);
  T* ADAMCPP_RESTRICT param = static_cast<T*>(t.param);
  const T* ADAMCPP_RESTRICT grad = static_cast<const T*>(t.grad);
  T* ADAMCPP_RESTRICT exp_avg = static_cast<T*>(t.exp_avg);
  T* ADAMCPP_RESTRICT exp_avg_sq = static_cast<T*>(t.exp_avg_sq);
  if constexpr (Amsgrad) {
    T* ADAMCPP_RESTRICT max_exp_avg_sq = static_cast<T*>(t.max_exp_avg_sq);
#pragma omp simd
    for (std::size_t i = begin; i < end; ++i) {
      adam_element<T, WD, true, Eps>(param[i], grad[i], exp_avg[i], exp_avg_sq[i], &max_exp_avg_sq[i], s);
    }
  } else {
#pragma omp simd
    for (std::size_t i = begin; i < end; ++i) {
      adam_element<T, WD, false, Eps>(param[i], grad[i], exp_avg[i], exp_avg_sq[i], nullptr, s);
    }
  }
}

template <typename T, bool WeightDecayOn, Momentum Mom, bool First>
void sgd_chunk(const SgdTensor& t, std::size_t begin, std::size_t end) {
  const SgdScalars<T> s = sgd_scalars<T>(t.scalars, t.grad_scale);
  T* ADAMCPP_RESTRICT param = static_cast<T*>(t.param);
  const T* ADAMCPP_RESTRICT grad = static_cast<const T*>(t.grad);
  if constexpr (Mom == Momentum::none) {
#pragma omp simd
    for (std::size_t i = begin; i < end; ++i) {
      sgd_element<T, WeightDecayOn, Mom, First>(param[i], grad[i], nullptr, s);
    }
  } else {
    T* ADAMCPP_RESTRICT buffer = static_cast<T*>(t.momentum_buffer);
#pragma omp simd
    for (std::size_t i = begin; i < end; ++i) {
      sgd_element<T, WeightDecayOn, Mom, First>(param[i], grad[i], &buffer[i], s);
    }
  }
}

// Sum of squares in double with a fixed summation order: eight interleaved
// partial sums (element i of the range goes to lane i % 8), combined pairwise.
// Every ISA target vectorises the lanes differently but adds the same numbers
// in the same order, so the norm (and any clipped step) has the same bits on
// every target.
template <typename T>
double sum_squares(const void* grad_ptr, std::size_t begin, std::size_t end) {
  constexpr std::size_t kLanes = 8;
  const T* ADAMCPP_RESTRICT grad = static_cast<const T*>(grad_ptr) + begin;
  const std::size_t n = end - begin;
  double lane[kLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  std::size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (std::size_t l = 0; l < kLanes; ++l) {
      const double x = static_cast<double>(grad[i + l]);
      lane[l] += x * x;
    }
  }
  for (std::size_t l = 0; i < n; ++i, ++l) {
    const double x = static_cast<double>(grad[i]);
    lane[l] += x * x;
  }
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// x * 0 is 0 for every finite x and NaN for NaN or +-Inf, so the sum of
// (g * scale) * 0 over a range is 0 exactly when every scaled gradient is
// finite. Summation order cannot change that, which lets the loop vectorise.
template <typename T>
bool any_nonfinite(const void* grad_ptr, std::size_t begin, std::size_t end, double scale_d) {
  const T* ADAMCPP_RESTRICT grad = static_cast<const T*>(grad_ptr);
  const T scale = static_cast<T>(scale_d);
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (std::size_t i = begin; i < end; ++i) {
    acc += (grad[i] * scale) * T(0);
  }
  return acc != T(0);
}

template <typename T, int WD, int A, int E>
constexpr AdamChunkFn pick() {
  return &adam_chunk<T, static_cast<WeightDecay>(WD), A != 0, static_cast<EpsStyle>(E)>;
}

template <typename T>
struct AdamRow {
  AdamChunkFn fns[3][2][2] = {
      {{pick<T, 0, 0, 0>(), pick<T, 0, 0, 1>()}, {pick<T, 0, 1, 0>(), pick<T, 0, 1, 1>()}},
      {{pick<T, 1, 0, 0>(), pick<T, 1, 0, 1>()}, {pick<T, 1, 1, 0>(), pick<T, 1, 1, 1>()}},
      {{pick<T, 2, 0, 0>(), pick<T, 2, 0, 1>()}, {pick<T, 2, 1, 0>(), pick<T, 2, 1, 1>()}},
  };
};

template <typename T, int WD, int M, int F>
constexpr SgdChunkFn pick_sgd() {
  return &sgd_chunk<T, WD != 0, static_cast<Momentum>(M), F != 0>;
}

template <typename T>
struct SgdRow {
  SgdChunkFn fns[2][3][2] = {
      {{pick_sgd<T, 0, 0, 0>(), pick_sgd<T, 0, 0, 1>()},
       {pick_sgd<T, 0, 1, 0>(), pick_sgd<T, 0, 1, 1>()},
       {pick_sgd<T, 0, 2, 0>(), pick_sgd<T, 0, 2, 1>()}},
      {{pick_sgd<T, 1, 0, 0>(), pick_sgd<T, 1, 0, 1>()},
       {pick_sgd<T, 1, 1, 0>(), pick_sgd<T, 1, 1, 1>()},
       {pick_sgd<T, 1, 2, 0>(), pick_sgd<T, 1, 2, 1>()}},
  };
};

KernelTable make_table() {
  KernelTable table{};
  table.name = ADAMCPP_STR(ADAMCPP_ISA);
  const AdamRow<float> f32;
  const AdamRow<double> f64;
  for (int wd = 0; wd < 3; ++wd) {
    for (int a = 0; a < 2; ++a) {
      for (int e = 0; e < 2; ++e) {
        table.adam[0][wd][a][e] = f32.fns[wd][a][e];
        table.adam[1][wd][a][e] = f64.fns[wd][a][e];
      }
    }
  }
  const SgdRow<float> sgd32;
  const SgdRow<double> sgd64;
  for (int wd = 0; wd < 2; ++wd) {
    for (int mo = 0; mo < 3; ++mo) {
      for (int f = 0; f < 2; ++f) {
        table.sgd[0][wd][mo][f] = sgd32.fns[wd][mo][f];
        table.sgd[1][wd][mo][f] = sgd64.fns[wd][mo][f];
      }
    }
  }
  table.sum_squares[0] = &sum_squares<float>;
  table.sum_squares[1] = &sum_squares<double>;
  table.nonfinite[0] = &any_nonfinite<float>;
  table.nonfinite[1] = &any_nonfinite<double>;
  return table;
}

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table = make_table();
  return table;
}

}  // namespace ADAMCPP_ISA
}  // namespace adamcpp
