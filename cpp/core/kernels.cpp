// adamcpp: the element loops. This one source is compiled once per ISA
// target (CMake defines ADAMCPP_ISA and the -march flags); everything here
// lives in the namespace adamcpp::<ADAMCPP_ISA>.
//
// One Adam loop (adam_loop) serves every storage layout: how each array is
// read into the compute type and written back (with rounding) is a template
// parameter composed around the one element update of optim_math.h. It is
// instantiated for the compute-type layouts (float32, float64) and for the
// three fused 16-bit layouts of kernels.h; any other combination (a float64
// gradient for a float32 parameter, float16 parameters, rounding to nearest,
// amsgrad or the keras epsilon with bfloat16 state, ...) runs adam_blocked: the
// arrays that are not of the compute type are converted in L1-sized blocks
// around the same loop, which gives the same bits. Per ISA target: 24
// compute-type loops, 12 compact-arithmetic ones (inside adam_blocked's blocks),
// 9 fused, 2 blocked drivers and their converters.
#include "core/kernels.h"
#include "core/isa_unit.h"

namespace adamcpp {
namespace ADAMCPP_ISA {
namespace {

// ------------------------------------------------------------------ storage
// The C++ type that holds a value of each DType, and its conversions to and
// from a compute type C (float or double).
template <DType D>
struct Storage;
template <>
struct Storage<DType::f32> {
  using type = float;
};
template <>
struct Storage<DType::f64> {
  using type = double;
};
template <>
struct Storage<DType::f16> {
  using type = std::uint16_t;
};
template <>
struct Storage<DType::bf16> {
  using type = std::uint16_t;
};
template <DType D>
using storage_t = typename Storage<D>::type;

template <typename C, DType D>
ADAMCPP_HD C load(storage_t<D> x) {
  if constexpr (D == DType::f16) {
    return static_cast<C>(float_from_f16(x));
  } else if constexpr (D == DType::bf16) {
    return static_cast<C>(float_from_bf16(x));
  } else {
    return static_cast<C>(x);  // exact, or float64 -> float32 to nearest
  }
}

// A compute-type value stored as D; `r` holds the 16 random bits of a stochastic rounding.
template <DType D, Rounding R, typename C>
ADAMCPP_HD storage_t<D> store(C x, std::uint32_t r) {
  if constexpr (D == DType::f16) {
    return R == Rounding::stochastic ? f16_stochastic(x, r) : f16_nearest(x);
  } else if constexpr (D == DType::bf16) {
    return R == Rounding::stochastic ? bf16_stochastic(x, r) : bf16_nearest(x);
  } else {
    return static_cast<storage_t<D>>(x);
  }
}

template <typename C>
constexpr DType compute_dtype() {
  return sizeof(C) == 8 ? DType::f64 : DType::f32;
}

// Calls body(begin, end, shift, state_key, param_key) for each run of
// [begin, end) that stays within one 2^32-element segment of the generator's
// element index and within one rounding piece: element i of the run takes the
// generator's bits of index i + shift (modulo 2^32) under the run's keys. The
// generator hashes the low 32 bits of the index, and a segment's key folds in
// the high bits. Without pieces the index is the element's own (shift 0).
template <typename Body>
void for_each_segment(const AdamTensor& t, std::size_t begin, std::size_t end, Body&& body) {
  auto run = [&](std::uint64_t key, std::size_t b, std::size_t e, std::uint64_t offset) {
    // offset: the generator index of element 0 of the tensor's memory (modulo 2^64)
    const auto state_key = static_cast<std::uint32_t>(key);
    const auto param_key = static_cast<std::uint32_t>(key >> 32);
    const auto shift = static_cast<std::uint32_t>(offset);
    while (b < e) {
      const std::uint64_t index = static_cast<std::uint64_t>(b) + offset;
      const std::uint64_t high = index >> 32;
      const std::uint64_t left = (std::uint64_t(1) << 32) - (index & 0xFFFFFFFFull);
      const std::size_t stop = static_cast<std::uint64_t>(e - b) <= left ? e : b + static_cast<std::size_t>(left);
      // One call site: the body (the whole element loop) is inlined once.
      const std::uint32_t sk = high == 0 ? state_key : segment_key(state_key, high);
      const std::uint32_t pk = high == 0 ? param_key : segment_key(param_key, high);
      body(b, stop, shift, sk, pk);
      b = stop;
    }
  };
  if (t.piece_count == 0) {
    run(t.rounding_key, begin, end, 0);
    return;
  }
  // The last piece that starts at or before `begin` (pieces[0] starts at 0).
  std::size_t lo = 0;
  std::size_t hi = t.piece_count;
  while (hi - lo > 1) {
    const std::size_t mid = lo + (hi - lo) / 2;
    if (t.pieces[mid].start <= begin) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  for (std::size_t k = lo; k < t.piece_count && begin < end; ++k) {
    const RoundingPiece& piece = t.pieces[k];
    const std::size_t stop = k + 1 < t.piece_count && t.pieces[k + 1].start < end ? t.pieces[k + 1].start : end;
    if (stop > begin) run(piece.key, begin, stop, piece.first - static_cast<std::uint64_t>(piece.start));
    begin = stop > begin ? stop : begin;
  }
}

// ---------------------------------------------------------------- Adam loop
// One fused pass: read p (or its master copy), g, m, v (and v_max) in their
// storage types, update in C, write p (and its master copy), m, v (and v_max)
// back, rounded as the layout says. The vector body and its scalar tail are
// the same loop, vectorised by the compiler for this translation unit's ISA.
// P: parameter dtype; G: gradient dtype; S: state dtype; Master: the
// parameter is written from a float32 master copy (to nearest); PR, SR: the
// roundings of the parameter (without master) and of the state; Compact: the
// bfloat16-state arithmetic (optim_math.h's compact_element).
// `s` are the step's scalars in C (adam_scalars of t's, or of the tensor whose run t is in).
template <typename C, DType P, DType G, DType S, bool Master, Rounding PR, Rounding SR, bool Compact, WeightDecay WD,
          bool Amsgrad, EpsStyle Eps>
ADAMCPP_INLINE void adam_loop_with(const AdamScalars<C>& s, const AdamTensor& t, std::size_t begin, std::size_t end) {
  constexpr bool state_random = S != compute_dtype<C>() && SR == Rounding::stochastic;
  constexpr bool param_random = !Master && P != compute_dtype<C>() && PR == Rounding::stochastic;
  storage_t<P>* ADAMCPP_RESTRICT param = static_cast<storage_t<P>*>(t.param);
  const storage_t<G>* ADAMCPP_RESTRICT grad = static_cast<const storage_t<G>*>(t.grad);
  storage_t<S>* ADAMCPP_RESTRICT exp_avg = static_cast<storage_t<S>*>(t.exp_avg);
  storage_t<S>* ADAMCPP_RESTRICT exp_avg_sq = static_cast<storage_t<S>*>(t.exp_avg_sq);
  storage_t<S>* ADAMCPP_RESTRICT max_exp_avg_sq = static_cast<storage_t<S>*>(t.max_exp_avg_sq);
  float* ADAMCPP_RESTRICT master = static_cast<float*>(t.master_param);
  // Element i; `index` is its index modulo 2^32 for the generator.
  auto element = [&](std::size_t i, std::uint32_t index, std::uint32_t state_key, std::uint32_t param_key) {
    (void)index;
    (void)state_key;
    (void)param_key;
    C p;
    if constexpr (Master) {
      p = master[i];
    } else {
      p = load<C, P>(param[i]);
    }
    C m = load<C, S>(exp_avg[i]);
    C v = load<C, S>(exp_avg_sq[i]);
    C v_max = C(0);
    if constexpr (Amsgrad) v_max = load<C, S>(max_exp_avg_sq[i]);
    adam_element<C, WD, Amsgrad, Eps, Compact>(p, load<C, G>(grad[i]), m, v, &v_max, s);
    std::uint32_t r = 0;
    if constexpr (state_random) r = random_bits(index, state_key);
    exp_avg[i] = store<S, SR>(m, r);
    exp_avg_sq[i] = store<S, SR>(v, r >> 16);
    if constexpr (Amsgrad) max_exp_avg_sq[i] = store<S, SR>(v_max, r >> 16);
    if constexpr (Master) {
      master[i] = p;
      param[i] = store<P, Rounding::nearest>(p, 0);
    } else if constexpr (param_random) {
      param[i] = store<P, PR>(p, random_bits(index, param_key));
    } else {
      param[i] = store<P, PR>(p, 0);
    }
  };
  if constexpr (state_random || param_random) {
    // Runs of at most 2^31 elements counted by a 32-bit index: the generator
    // hashes the index modulo 2^32, and a 64-bit one costs shuffles in every vector.
    for_each_segment(
        t, begin, end,
        [&](std::size_t b, std::size_t e, std::uint32_t shift, std::uint32_t state_key, std::uint32_t param_key) {
          constexpr std::size_t kMaxRun = std::size_t(1) << 31;
          for (std::size_t b0 = b; b0 < e; b0 += kMaxRun) {
            const auto count = static_cast<std::uint32_t>(e - b0 < kMaxRun ? e - b0 : kMaxRun);
            const auto first = static_cast<std::uint32_t>(b0) + shift;
#pragma omp simd
            for (std::uint32_t k = 0; k < count; ++k) element(b0 + k, first + k, state_key, param_key);
          }
        });
  } else {
#pragma omp simd
    for (std::size_t i = begin; i < end; ++i) element(i, 0, 0, 0);
  }
}

template <typename C, DType P, DType G, DType S, bool Master, Rounding PR, Rounding SR, bool Compact, WeightDecay WD,
          bool Amsgrad, EpsStyle Eps>
void adam_loop(const AdamTensor& t, std::size_t begin, std::size_t end) {
  adam_loop_with<C, P, G, S, Master, PR, SR, Compact, WD, Amsgrad, Eps>(adam_scalars<C>(t.scalars, t.grad_scale), t,
                                                                        begin, end);
}

// Fetches the first lines of a tensor's arrays ahead of its loop (a null array is skipped): a run's tensors are
// separate allocations, and the hardware's stream prefetch starts afresh at each one.
template <typename C>
ADAMCPP_INLINE void fetch_start(std::size_t numel, const void* a, const void* b, const void* c = nullptr,
                                const void* d = nullptr, const void* e = nullptr) {
#if defined(__GNUC__) || defined(__clang__)
  constexpr std::size_t kLines = 4;
  const void* arrays[5] = {a, b, c, d, e};
  for (std::size_t k = 0; k < kLines; ++k) {
    const std::size_t at = k * (64 / sizeof(C));
    if (at >= numel) break;
    for (const void* x : arrays) {
      if (x != nullptr) __builtin_prefetch(static_cast<const C*>(x) + at);
    }
  }
#else
  (void)numel, (void)a, (void)b, (void)c, (void)d, (void)e;
#endif
}

// A run of tensors that share one loop and one step's scalars (AdamTensor::run_after): the scalars are
// converted once and the tensors' loops follow each other, each one's arrays fetched while the previous runs.
template <typename C, WeightDecay WD, bool Amsgrad, EpsStyle Eps>
void adam_native_run(const AdamTensor& head, const AdamTensor* tensors, std::size_t count, std::size_t begin,
                     std::size_t end) {
  constexpr DType D = compute_dtype<C>();
  const AdamScalars<C> s = adam_scalars<C>(head.scalars, head.grad_scale);
  for (std::size_t k = 0; k < count; ++k) {
    if (k + 1 < count) {
      const AdamTensor& next = tensors[k + 1];
      fetch_start<C>(next.numel, next.param, next.grad, next.exp_avg, next.exp_avg_sq,
                     Amsgrad ? next.max_exp_avg_sq : nullptr);
    }
    const std::size_t b = k == 0 ? begin : 0;
    const std::size_t e = k + 1 == count ? end : tensors[k].numel;
    adam_loop_with<C, D, D, D, false, Rounding::nearest, Rounding::nearest, false, WD, Amsgrad, Eps>(s, tensors[k], b,
                                                                                                     e);
  }
}

// Every array of the compute type C: the loop of a float32/float64 tensor,
// and (Compact) the update inside adam_blocked's blocks of a bfloat16-state one.
template <typename C, bool Compact, WeightDecay WD, bool Amsgrad, EpsStyle Eps>
void adam_native(const AdamTensor& t, std::size_t begin, std::size_t end) {
  constexpr DType D = compute_dtype<C>();
  adam_loop<C, D, D, D, false, Rounding::nearest, Rounding::nearest, Compact, WD, Amsgrad, Eps>(t, begin, end);
}

// The fused 16-bit layouts (kernels.h, FusedLayout): bfloat16 state rounded
// stochastically, no amsgrad, the "torch" epsilon style.
template <FusedLayout L, WeightDecay WD>
void adam_fused(const AdamTensor& t, std::size_t begin, std::size_t end) {
  constexpr Rounding sr = Rounding::stochastic;
  constexpr Rounding rne = Rounding::nearest;
  constexpr EpsStyle eps = EpsStyle::torch;
  if constexpr (L == FusedLayout::bf16_state) {
    adam_loop<float, DType::f32, DType::f32, DType::bf16, false, rne, sr, true, WD, false, eps>(t, begin, end);
  } else if constexpr (L == FusedLayout::bf16_master) {
    adam_loop<float, DType::bf16, DType::bf16, DType::bf16, true, rne, sr, true, WD, false, eps>(t, begin, end);
  } else {
    adam_loop<float, DType::bf16, DType::bf16, DType::bf16, false, sr, sr, true, WD, false, eps>(t, begin, end);
  }
}

// ------------------------------------------------------------- blocked path
// Values per block: five compute-type scratch arrays (p, g, m, v, v_max) of
// 512 elements take 10 KB (float32) or 20 KB (float64) of the stack: L1-resident.
constexpr std::size_t kBlock = 512;

template <typename C, DType D>
void read_as(const void* src, std::size_t begin, std::size_t n, C* ADAMCPP_RESTRICT out) {
  const storage_t<D>* ADAMCPP_RESTRICT in = static_cast<const storage_t<D>*>(src) + begin;
#pragma omp simd
  for (std::size_t k = 0; k < n; ++k) out[k] = load<C, D>(in[k]);
}

// n values of dtype `from` at src[begin, begin + n), in the compute type.
template <typename C>
void read_block(const void* src, DType from, std::size_t begin, std::size_t n, C* out) {
  switch (from) {
    case DType::f32:
      read_as<C, DType::f32>(src, begin, n, out);
      break;
    case DType::f64:
      read_as<C, DType::f64>(src, begin, n, out);
      break;
    case DType::f16:
      read_as<C, DType::f16>(src, begin, n, out);
      break;
    case DType::bf16:
      read_as<C, DType::bf16>(src, begin, n, out);
      break;
  }
}

// Element begin + k takes the bits of random_bits(begin + k + index_shift, key) >> shift.
template <typename C, DType D, Rounding R>
void write_as(void* dst, std::size_t begin, std::size_t n, const C* ADAMCPP_RESTRICT in, std::uint32_t key,
              unsigned shift, std::uint32_t index_shift) {
  storage_t<D>* ADAMCPP_RESTRICT out = static_cast<storage_t<D>*>(dst) + begin;
  if constexpr (R == Rounding::stochastic) {
    const std::uint32_t first = static_cast<std::uint32_t>(begin) + index_shift;
#pragma omp simd
    for (std::size_t k = 0; k < n; ++k) {
      out[k] = store<D, R>(in[k], random_bits(first + static_cast<std::uint32_t>(k), key) >> shift);
    }
  } else {
    (void)key;
    (void)shift;
    (void)index_shift;
#pragma omp simd
    for (std::size_t k = 0; k < n; ++k) out[k] = store<D, R>(in[k], 0);
  }
}

// n compute-type values stored into dst[begin, begin + n) as dtype `to`.
template <typename C>
void write_block(void* dst, DType to, Rounding rounding, std::size_t begin, std::size_t n, const C* in,
                 std::uint32_t key, unsigned shift, std::uint32_t index_shift) {
  const bool sr = rounding == Rounding::stochastic;
  switch (to) {
    case DType::f32:
      write_as<C, DType::f32, Rounding::nearest>(dst, begin, n, in, key, shift, index_shift);
      break;
    case DType::f64:
      write_as<C, DType::f64, Rounding::nearest>(dst, begin, n, in, key, shift, index_shift);
      break;
    case DType::f16:
      if (sr) {
        write_as<C, DType::f16, Rounding::stochastic>(dst, begin, n, in, key, shift, index_shift);
      } else {
        write_as<C, DType::f16, Rounding::nearest>(dst, begin, n, in, key, shift, index_shift);
      }
      break;
    case DType::bf16:
      if (sr) {
        write_as<C, DType::bf16, Rounding::stochastic>(dst, begin, n, in, key, shift, index_shift);
      } else {
        write_as<C, DType::bf16, Rounding::nearest>(dst, begin, n, in, key, shift, index_shift);
      }
      break;
  }
}

const KernelTable& table();

// The update of a block once its arrays hold the compute type.
template <typename C>
AdamChunkFn block_update(const AdamTensor& t);

// Any Adam tensor: each array that is not of the compute type (a 16-bit
// parameter, a gradient of another type, bfloat16 state) is converted into a
// block of scratch, the compute-type loop updates the block, and the written
// arrays are stored back with their rounding. The arithmetic and the random
// bits are those of the fused loops: the results are the same bits.
template <typename C>
void adam_blocked(const AdamTensor& t, std::size_t begin, std::size_t end) {
  constexpr DType D = compute_dtype<C>();
  const AdamChunkFn update = block_update<C>(t);
  const bool master = t.master_param != nullptr;  // float32: the compute type of a 16-bit parameter
  const bool param_direct = master || t.dtype == D;
  const bool grad_direct = t.grad_dtype == D;
  const bool state_direct = t.state_dtype == D;
  alignas(64) C p[kBlock];
  alignas(64) C g[kBlock];
  alignas(64) C m[kBlock];
  alignas(64) C v[kBlock];
  alignas(64) C v_max[kBlock];
  for_each_segment(
      t, begin, end,
      [&](std::size_t b0, std::size_t e0, std::uint32_t index_shift, std::uint32_t state_key, std::uint32_t param_key) {
        for (std::size_t b = b0; b < e0; b += kBlock) {
          const std::size_t n = e0 - b < kBlock ? e0 - b : kBlock;
          AdamTensor block = t;
          block.master_param = nullptr;
          if (master) {
            block.param = static_cast<C*>(t.master_param) + b;
          } else if (param_direct) {
            block.param = static_cast<C*>(t.param) + b;
          } else {
            read_block(t.param, t.dtype, b, n, p);
            block.param = p;
          }
          if (grad_direct) {
            block.grad = static_cast<const C*>(t.grad) + b;
          } else {
            read_block(t.grad, t.grad_dtype, b, n, g);
            block.grad = g;
          }
          if (state_direct) {
            block.exp_avg = static_cast<C*>(t.exp_avg) + b;
            block.exp_avg_sq = static_cast<C*>(t.exp_avg_sq) + b;
            if (t.amsgrad) block.max_exp_avg_sq = static_cast<C*>(t.max_exp_avg_sq) + b;
          } else {
            read_block(t.exp_avg, t.state_dtype, b, n, m);
            read_block(t.exp_avg_sq, t.state_dtype, b, n, v);
            block.exp_avg = m;
            block.exp_avg_sq = v;
            if (t.amsgrad) {
              read_block(t.max_exp_avg_sq, t.state_dtype, b, n, v_max);
              block.max_exp_avg_sq = v_max;
            }
          }
          update(block, 0, n);
          if (master) {
            write_block(t.param, t.dtype, Rounding::nearest, b, n, static_cast<const C*>(block.param), 0, 0, 0);
          } else if (!param_direct) {
            write_block(t.param, t.dtype, t.param_rounding, b, n, p, param_key, 0, index_shift);
          }
          if (!state_direct) {
            write_block(t.exp_avg, t.state_dtype, t.state_rounding, b, n, m, state_key, 0, index_shift);
            write_block(t.exp_avg_sq, t.state_dtype, t.state_rounding, b, n, v, state_key, 16, index_shift);
            if (t.amsgrad) {
              write_block(t.max_exp_avg_sq, t.state_dtype, t.state_rounding, b, n, v_max, state_key, 16, index_shift);
            }
          }
        }
      });
}

// ----------------------------------------------------------------------- SGD
template <typename T, bool WeightDecayOn, Momentum Mom, bool First>
ADAMCPP_INLINE void sgd_chunk_with(const SgdScalars<T>& s, const SgdTensor& t, std::size_t begin, std::size_t end) {
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

template <typename T, bool WeightDecayOn, Momentum Mom, bool First>
void sgd_chunk(const SgdTensor& t, std::size_t begin, std::size_t end) {
  sgd_chunk_with<T, WeightDecayOn, Mom, First>(sgd_scalars<T>(t.scalars, t.grad_scale), t, begin, end);
}

// A run of SGD tensors (SgdTensor::run_after), as adam_native_run.
template <typename T, bool WeightDecayOn, Momentum Mom, bool First>
void sgd_run(const SgdTensor& head, const SgdTensor* tensors, std::size_t count, std::size_t begin, std::size_t end) {
  const SgdScalars<T> s = sgd_scalars<T>(head.scalars, head.grad_scale);
  for (std::size_t k = 0; k < count; ++k) {
    if (k + 1 < count) {
      const SgdTensor& next = tensors[k + 1];
      fetch_start<T>(next.numel, next.param, next.grad, Mom == Momentum::none ? nullptr : next.momentum_buffer);
    }
    sgd_chunk_with<T, WeightDecayOn, Mom, First>(s, tensors[k], k == 0 ? begin : 0,
                                                 k + 1 == count ? end : tensors[k].numel);
  }
}

// An SGD tensor whose gradient is not of its compute type: the gradient is
// converted block by block, the compute-type loop updates the block in place.
template <typename C>
void sgd_blocked(const SgdTensor& t, std::size_t begin, std::size_t end) {
  const KernelTable& k = table();
  const int c = static_cast<int>(compute_dtype<C>());
  const SgdChunkFn update = k.sgd[c][t.weight_decay_on ? 1 : 0][static_cast<int>(t.momentum_mode)][t.first ? 1 : 0];
  alignas(64) C g[kBlock];
  for (std::size_t b = begin; b < end; b += kBlock) {
    const std::size_t n = end - b < kBlock ? end - b : kBlock;
    read_block(t.grad, t.grad_dtype, b, n, g);
    SgdTensor block = t;
    block.param = static_cast<C*>(t.param) + b;
    block.grad = g;
    if (t.momentum_buffer != nullptr) block.momentum_buffer = static_cast<C*>(t.momentum_buffer) + b;
    update(block, 0, n);
  }
}

// ------------------------------------------------------------------ gradients
// Sum of squares in double with a fixed summation order: eight interleaved
// partial sums (element i of the range goes to lane i % 8), combined pairwise.
// Every ISA target vectorises the lanes differently but adds the same numbers
// in the same order, so the norm (and any clipped step) has the same bits on
// every target.
template <DType G>
double sum_squares(const void* grad_ptr, std::size_t begin, std::size_t end) {
  constexpr std::size_t kLanes = 8;
  const storage_t<G>* ADAMCPP_RESTRICT grad = static_cast<const storage_t<G>*>(grad_ptr) + begin;
  const std::size_t n = end - begin;
  double lane[kLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  std::size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (std::size_t l = 0; l < kLanes; ++l) {
      const double x = load<double, G>(grad[i + l]);
      lane[l] += x * x;
    }
  }
  for (std::size_t l = 0; i < n; ++i, ++l) {
    const double x = load<double, G>(grad[i]);
    lane[l] += x * x;
  }
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// x * 0 is 0 for every finite x and NaN for NaN or +-Inf, so the sum of
// (g * scale) * 0 over a range (g converted to the compute type C, as the
// update reads it) is 0 exactly when every scaled gradient is finite.
// Summation order cannot change that, which lets the loop vectorise.
template <DType G, typename C>
bool any_nonfinite(const void* grad_ptr, std::size_t begin, std::size_t end, double scale_d) {
  const storage_t<G>* ADAMCPP_RESTRICT grad = static_cast<const storage_t<G>*>(grad_ptr);
  const C scale = static_cast<C>(scale_d);
  C acc = C(0);
#pragma omp simd reduction(+ : acc)
  for (std::size_t i = begin; i < end; ++i) {
    acc += (load<C, G>(grad[i]) * scale) * C(0);
  }
  return acc != C(0);
}

// ---------------------------------------------------------------- the table
// The compute-type loops of the bfloat16-state arithmetic ([wd][amsgrad][eps]),
// used by adam_blocked only.
struct CompactTable {
  AdamChunkFn fns[kWeightDecayModes][2][kEpsStyles];
};

template <typename C, bool Compact, int WD, int A, int E>
constexpr AdamChunkFn pick() {
  return &adam_native<C, Compact, static_cast<WeightDecay>(WD), A != 0, static_cast<EpsStyle>(E)>;
}

template <typename C, int WD, int A, int E>
constexpr AdamRunFn pick_run() {
  return &adam_native_run<C, static_cast<WeightDecay>(WD), A != 0, static_cast<EpsStyle>(E)>;
}

template <typename C>
void fill_adam_runs(AdamRunFn (&fns)[kWeightDecayModes][2][kEpsStyles]) {
  const AdamRunFn all[kWeightDecayModes][2][kEpsStyles] = {
      {{pick_run<C, 0, 0, 0>(), pick_run<C, 0, 0, 1>()}, {pick_run<C, 0, 1, 0>(), pick_run<C, 0, 1, 1>()}},
      {{pick_run<C, 1, 0, 0>(), pick_run<C, 1, 0, 1>()}, {pick_run<C, 1, 1, 0>(), pick_run<C, 1, 1, 1>()}},
      {{pick_run<C, 2, 0, 0>(), pick_run<C, 2, 0, 1>()}, {pick_run<C, 2, 1, 0>(), pick_run<C, 2, 1, 1>()}},
  };
  for (int wd = 0; wd < kWeightDecayModes; ++wd) {
    for (int a = 0; a < 2; ++a) {
      for (int e = 0; e < kEpsStyles; ++e) fns[wd][a][e] = all[wd][a][e];
    }
  }
}

template <typename C, bool Compact>
void fill_adam(AdamChunkFn (&fns)[kWeightDecayModes][2][kEpsStyles]) {
  const AdamChunkFn all[kWeightDecayModes][2][kEpsStyles] = {
      {{pick<C, Compact, 0, 0, 0>(), pick<C, Compact, 0, 0, 1>()},
       {pick<C, Compact, 0, 1, 0>(), pick<C, Compact, 0, 1, 1>()}},
      {{pick<C, Compact, 1, 0, 0>(), pick<C, Compact, 1, 0, 1>()},
       {pick<C, Compact, 1, 1, 0>(), pick<C, Compact, 1, 1, 1>()}},
      {{pick<C, Compact, 2, 0, 0>(), pick<C, Compact, 2, 0, 1>()},
       {pick<C, Compact, 2, 1, 0>(), pick<C, Compact, 2, 1, 1>()}},
  };
  for (int wd = 0; wd < kWeightDecayModes; ++wd) {
    for (int a = 0; a < 2; ++a) {
      for (int e = 0; e < kEpsStyles; ++e) fns[wd][a][e] = all[wd][a][e];
    }
  }
}

template <FusedLayout L>
void fill_fused(AdamChunkFn (&fns)[kWeightDecayModes]) {
  fns[0] = &adam_fused<L, WeightDecay::none>;
  fns[1] = &adam_fused<L, WeightDecay::coupled>;
  fns[2] = &adam_fused<L, WeightDecay::decoupled>;
}

template <typename T, int WD, int M, int F>
constexpr SgdChunkFn pick_sgd() {
  return &sgd_chunk<T, WD != 0, static_cast<Momentum>(M), F != 0>;
}

template <typename T, int WD, int M, int F>
constexpr SgdRunFn pick_sgd_run() {
  return &sgd_run<T, WD != 0, static_cast<Momentum>(M), F != 0>;
}

template <typename T>
void fill_sgd_runs(SgdRunFn (&fns)[2][kMomentumModes][2]) {
  const SgdRunFn all[2][kMomentumModes][2] = {
      {{pick_sgd_run<T, 0, 0, 0>(), pick_sgd_run<T, 0, 0, 1>()},
       {pick_sgd_run<T, 0, 1, 0>(), pick_sgd_run<T, 0, 1, 1>()},
       {pick_sgd_run<T, 0, 2, 0>(), pick_sgd_run<T, 0, 2, 1>()}},
      {{pick_sgd_run<T, 1, 0, 0>(), pick_sgd_run<T, 1, 0, 1>()},
       {pick_sgd_run<T, 1, 1, 0>(), pick_sgd_run<T, 1, 1, 1>()},
       {pick_sgd_run<T, 1, 2, 0>(), pick_sgd_run<T, 1, 2, 1>()}},
  };
  for (int wd = 0; wd < 2; ++wd) {
    for (int mo = 0; mo < kMomentumModes; ++mo) {
      for (int f = 0; f < 2; ++f) fns[wd][mo][f] = all[wd][mo][f];
    }
  }
}

template <typename T>
void fill_sgd(SgdChunkFn (&fns)[2][kMomentumModes][2]) {
  const SgdChunkFn all[2][kMomentumModes][2] = {
      {{pick_sgd<T, 0, 0, 0>(), pick_sgd<T, 0, 0, 1>()},
       {pick_sgd<T, 0, 1, 0>(), pick_sgd<T, 0, 1, 1>()},
       {pick_sgd<T, 0, 2, 0>(), pick_sgd<T, 0, 2, 1>()}},
      {{pick_sgd<T, 1, 0, 0>(), pick_sgd<T, 1, 0, 1>()},
       {pick_sgd<T, 1, 1, 0>(), pick_sgd<T, 1, 1, 1>()},
       {pick_sgd<T, 1, 2, 0>(), pick_sgd<T, 1, 2, 1>()}},
  };
  for (int wd = 0; wd < 2; ++wd) {
    for (int mo = 0; mo < kMomentumModes; ++mo) {
      for (int f = 0; f < 2; ++f) fns[wd][mo][f] = all[wd][mo][f];
    }
  }
}

template <typename C>
void fill_gradient_checks(KernelTable& table) {
  const int c = static_cast<int>(compute_dtype<C>());
  table.nonfinite[static_cast<int>(DType::f32)][c] = &any_nonfinite<DType::f32, C>;
  table.nonfinite[static_cast<int>(DType::f64)][c] = &any_nonfinite<DType::f64, C>;
  table.nonfinite[static_cast<int>(DType::f16)][c] = &any_nonfinite<DType::f16, C>;
  table.nonfinite[static_cast<int>(DType::bf16)][c] = &any_nonfinite<DType::bf16, C>;
}

KernelTable make_table() {
  KernelTable table{};
  table.name = ADAMCPP_STR(ADAMCPP_ISA);
  fill_adam<float, false>(table.adam[static_cast<int>(DType::f32)]);
  fill_adam<double, false>(table.adam[static_cast<int>(DType::f64)]);
  fill_adam_runs<float>(table.adam_run[static_cast<int>(DType::f32)]);
  fill_adam_runs<double>(table.adam_run[static_cast<int>(DType::f64)]);
  fill_fused<FusedLayout::bf16_state>(table.adam_fused[static_cast<int>(FusedLayout::bf16_state)]);
  fill_fused<FusedLayout::bf16_master>(table.adam_fused[static_cast<int>(FusedLayout::bf16_master)]);
  fill_fused<FusedLayout::bf16>(table.adam_fused[static_cast<int>(FusedLayout::bf16)]);
  table.adam_blocked[static_cast<int>(DType::f32)] = &adam_blocked<float>;
  table.adam_blocked[static_cast<int>(DType::f64)] = &adam_blocked<double>;
  fill_sgd<float>(table.sgd[static_cast<int>(DType::f32)]);
  fill_sgd<double>(table.sgd[static_cast<int>(DType::f64)]);
  fill_sgd_runs<float>(table.sgd_run[static_cast<int>(DType::f32)]);
  fill_sgd_runs<double>(table.sgd_run[static_cast<int>(DType::f64)]);
  table.sgd_blocked[static_cast<int>(DType::f32)] = &sgd_blocked<float>;
  table.sgd_blocked[static_cast<int>(DType::f64)] = &sgd_blocked<double>;
  fill_gradient_checks<float>(table);
  fill_gradient_checks<double>(table);
  table.sum_squares[static_cast<int>(DType::f32)] = &sum_squares<DType::f32>;
  table.sum_squares[static_cast<int>(DType::f64)] = &sum_squares<DType::f64>;
  table.sum_squares[static_cast<int>(DType::f16)] = &sum_squares<DType::f16>;
  table.sum_squares[static_cast<int>(DType::bf16)] = &sum_squares<DType::bf16>;
  return table;
}

const CompactTable& compact_table() {
  static const CompactTable compact = [] {
    CompactTable c{};
    fill_adam<float, true>(c.fns);
    return c;
  }();
  return compact;
}

const KernelTable& table() {
  static const KernelTable t = make_table();
  return t;
}

template <typename C>
AdamChunkFn block_update(const AdamTensor& t) {
  const int wd = static_cast<int>(t.weight_decay_mode);
  const int a = t.amsgrad ? 1 : 0;
  const int e = static_cast<int>(t.eps_style);
  if constexpr (sizeof(C) == 4) {
    if (t.state_dtype == DType::bf16) return compact_table().fns[wd][a][e];
  }
  return table().adam[static_cast<int>(compute_dtype<C>())][wd][a][e];
}

}  // namespace

const KernelTable& kernel_table() { return table(); }

}  // namespace ADAMCPP_ISA
}  // namespace adamcpp
