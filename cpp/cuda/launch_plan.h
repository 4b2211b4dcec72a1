// adamcpp: the host side of one CUDA step, as plain C++: the descriptor table
// (one entry per tensor, the distinct per-step scalar sets, the launch groups),
// the mapping of blocks to tensors and of the global norm's pieces to tensors,
// and the byte layout the table is uploaded in. No CUDA and no Python here, so
// every rule is tested on a CPU; cuda_unit.cu uploads what this builds and the
// kernels (step_kernels.cuh) read it back.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/kernels.h"
#include "core/multi_tensor.h"

namespace adamcpp {
namespace cuda {

// Threads of a block of the element kernels (update, non-finite check), the
// elements each thread loads at once (16 bytes of float32: one vector load),
// and the elements of one block: a block never spans two tensors. Four vector
// rounds per thread: blocks small enough that the last wave of a large tensor
// leaves little of the device idle.
constexpr unsigned kThreads = 256;
constexpr unsigned kVector = 4;
constexpr std::uint64_t kBlockElements = std::uint64_t(1) << 12;
static_assert(kBlockElements % (kThreads * kVector) == 0, "a block is whole vector rounds");

// The global norm sums exactly as the CPU does (multi_tensor.cpp): the
// concatenation of all gradients is cut into chunks of kChunkElements; each
// piece (one tensor's part of one chunk) sums its squares in kNormLanes
// interleaved lanes; pieces add up per chunk, chunks in order. A piece is the
// unit of work of the first norm kernel (one thread per lane).
constexpr std::uint64_t kNormChunk = kChunkElements;
constexpr unsigned kNormLanes = 8;

// Tensor flags.
constexpr std::uint32_t kFlagVector = 1u;   // every pointer of the tensor is 16-byte aligned: vector loads
constexpr std::uint32_t kFlagFloat64 = 2u;  // the element type is double

// One tensor of a step, as the kernels read it (56 bytes).
struct DeviceTensor {
  void* param;
  const void* grad;
  void* state[3];  // Adam: exp_avg, exp_avg_sq, max_exp_avg_sq; SGD: momentum_buffer
  std::uint64_t numel;
  std::uint32_t scalars;  // index of its scalar set
  std::uint32_t flags;
};
static_assert(sizeof(DeviceTensor) == 56, "DeviceTensor is 56 bytes");

// The host's double scalars of one step shared by tensors (usually one set
// per group): step_scalars.h's, and the gradient multiplier (sign included).
template <typename Step>
struct ScalarSet {
  Step step;
  double grad_scale;
};

// What the kernels of one step exchange on the device, uploaded initialised
// with the table. The fold kernel writes the norm and the decision; the check
// kernel writes the first non-finite tensor.
struct StepStatus {
  double call_grad_scale;         // in: the call's grad_scale
  double max_grad_norm;           // in: < 0, no clipping
  double sum_squares;             // the gradients' sum of squares (unscaled)
  double grad_norm;               // |call_grad_scale| * sqrt(sum_squares); NaN without clipping
  double coef;                    // the clipping coefficient folded into every multiplier (1 without clipping)
  std::int32_t policy;            // in: Nonfinite
  std::int32_t check_mode;        // which scale the non-finite check uses (CheckMode)
  std::uint64_t first_nonfinite;  // the lowest tensor index with a non-finite scaled gradient, or kNone
  std::uint32_t blocks_done;      // the fold's last-block ticket
  std::uint32_t unused;
};

constexpr std::uint64_t kNone = ~std::uint64_t(0);

// The non-finite check: none, at each tensor's own multiplier (the clipping
// coefficient is NaN), or at the multiplier times the coefficient.
enum CheckMode : std::int32_t { kCheckNone = 0, kCheckUnclipped = 1, kCheckClipped = 2 };

// One launch of the update kernel: the positions [begin, end) of `order`
// share one variant (`key`), and their blocks are [first_block, first_block + blocks).
struct LaunchGroup {
  int key;
  std::uint32_t begin;
  std::uint32_t end;
  std::uint64_t first_block;
  std::uint64_t blocks;
};

// The variant of a tensor as one number: the template arguments of its update kernel.
constexpr int kAdamKeys = kComputeTypes * kWeightDecayModes * 2 * kEpsStyles;
constexpr int kSgdKeys = kComputeTypes * 2 * kMomentumModes * 2;

inline int launch_key(const AdamTensor& t) {
  return ((static_cast<int>(t.dtype) * kWeightDecayModes + static_cast<int>(t.weight_decay_mode)) * 2 +
          (t.amsgrad ? 1 : 0)) *
             kEpsStyles +
         static_cast<int>(t.eps_style);
}

inline int launch_key(const SgdTensor& t) {
  return ((static_cast<int>(t.dtype) * 2 + (t.weight_decay_on ? 1 : 0)) * kMomentumModes +
          static_cast<int>(t.momentum_mode)) *
             2 +
         (t.first ? 1 : 0);
}

inline int key_count(const AdamTensor*) { return kAdamKeys; }
inline int key_count(const SgdTensor*) { return kSgdKeys; }

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

inline DeviceTensor describe(const AdamTensor& t, std::uint32_t scalars) {
  DeviceTensor d{t.param, t.grad, {t.exp_avg, t.exp_avg_sq, t.max_exp_avg_sq}, t.numel, scalars, 0};
  return d;
}

inline DeviceTensor describe(const SgdTensor& t, std::uint32_t scalars) {
  DeviceTensor d{t.param, t.grad, {t.momentum_buffer, nullptr, nullptr}, t.numel, scalars, 0};
  return d;
}

inline std::uint32_t flags_of(const DeviceTensor& d, DType dtype) {
  bool vector = aligned16(d.param) && aligned16(d.grad);
  for (void* s : d.state) vector = vector && (s == nullptr || aligned16(s));
  return (vector ? kFlagVector : 0u) | (dtype == DType::f64 ? kFlagFloat64 : 0u);
}

// The descriptor table of one step over `count` tensors (in call order).
template <typename Tensor, typename Step>
struct Plan {
  std::vector<DeviceTensor> tensors;       // call order
  std::vector<ScalarSet<Step>> scalars;    // distinct sets
  std::vector<std::uint32_t> order;        // position -> tensor, grouped by launch key (stable)
  std::vector<std::uint64_t> block_start;  // position -> first block; then the total
  std::vector<LaunchGroup> groups;         // one per launch key present, ascending
  std::vector<std::uint64_t> elem_offset;  // tensor -> first element of the concatenation; then the total
  std::vector<std::uint64_t> piece_start;  // tensor -> first norm piece; then the total
  std::uint64_t total_elements = 0;
  std::uint64_t chunks = 0;  // norm chunks (kNormChunk elements of the concatenation)
  std::uint64_t pieces = 0;  // norm pieces
  bool norm = false;         // whether the norm tables were built

  void build(const Tensor* ts, std::size_t count, bool with_norm);
};

// Blocks of one tensor of the element kernels.
inline std::uint64_t blocks_of(std::uint64_t numel) { return (numel + kBlockElements - 1) / kBlockElements; }

// Norm pieces of a tensor that starts at element `offset` of the concatenation.
inline std::uint64_t pieces_of(std::uint64_t offset, std::uint64_t numel) {
  if (numel == 0) return 0;
  return (offset + numel - 1) / kNormChunk - offset / kNormChunk + 1;
}

template <typename Tensor, typename Step>
void Plan<Tensor, Step>::build(const Tensor* ts, std::size_t count, bool with_norm) {
  tensors.resize(count);
  scalars.clear();
  order.resize(count);
  block_start.resize(count + 1);
  groups.clear();
  norm = with_norm;

  // Descriptors and distinct scalar sets (neighbours usually share one: compare with the last).
  const int keys = key_count(ts);
  std::vector<std::uint32_t> per_key(static_cast<std::size_t>(keys) + 1, 0);
  for (std::size_t i = 0; i < count; ++i) {
    const Tensor& t = ts[i];
    ScalarSet<Step> set{t.scalars, t.grad_scale};
    if (scalars.empty() || std::memcmp(&scalars.back(), &set, sizeof(set)) != 0) scalars.push_back(set);
    DeviceTensor d = describe(t, static_cast<std::uint32_t>(scalars.size() - 1));
    d.flags = flags_of(d, t.dtype);
    tensors[i] = d;
    ++per_key[static_cast<std::size_t>(launch_key(t)) + 1];
  }

  // Positions grouped by launch key, call order inside a group (a counting sort).
  for (int k = 0; k < keys; ++k) per_key[static_cast<std::size_t>(k) + 1] += per_key[static_cast<std::size_t>(k)];
  std::vector<std::uint32_t> next(per_key.begin(), per_key.end() - 1);
  for (std::size_t i = 0; i < count; ++i) {
    order[next[static_cast<std::size_t>(launch_key(ts[i]))]++] = static_cast<std::uint32_t>(i);
  }
  std::uint64_t blocks = 0;
  for (std::size_t pos = 0; pos < count; ++pos) {
    block_start[pos] = blocks;
    blocks += blocks_of(ts[order[pos]].numel);
  }
  block_start[count] = blocks;
  for (int k = 0; k < keys; ++k) {
    const std::uint32_t begin = per_key[static_cast<std::size_t>(k)];
    const std::uint32_t end = per_key[static_cast<std::size_t>(k) + 1];
    const std::uint64_t first = block_start[begin];
    if (block_start[end] > first) groups.push_back({k, begin, end, first, block_start[end] - first});
  }

  // The norm's pieces, in call order (the CPU's order).
  total_elements = 0;
  for (std::size_t i = 0; i < count; ++i) total_elements += ts[i].numel;
  chunks = (total_elements + kNormChunk - 1) / kNormChunk;
  pieces = 0;
  elem_offset.clear();
  piece_start.clear();
  if (with_norm) {
    elem_offset.resize(count + 1);
    piece_start.resize(count + 1);
    std::uint64_t offset = 0;
    for (std::size_t i = 0; i < count; ++i) {
      elem_offset[i] = offset;
      piece_start[i] = pieces;
      pieces += pieces_of(offset, ts[i].numel);
      offset += ts[i].numel;
    }
    elem_offset[count] = offset;
    piece_start[count] = pieces;
  }
}

// Where each part of the table lies in the step's device buffer. The upload
// covers [0, upload_bytes): the table and the initialised status; the norm's
// scratch follows and is written by the kernels only.
struct Layout {
  std::size_t tensors, scalars, order, block_start, elem_offset, piece_start, status;
  std::size_t upload_bytes;
  std::size_t lane_sums, chunk_sums;
  std::size_t total_bytes;
};

inline std::size_t align16(std::size_t n) { return (n + 15) & ~std::size_t(15); }

template <typename Tensor, typename Step>
Layout layout_of(const Plan<Tensor, Step>& plan) {
  Layout l{};
  std::size_t at = 0;
  auto place = [&at](std::size_t bytes) {
    const std::size_t here = at;
    at = align16(at + bytes);
    return here;
  };
  l.status = place(sizeof(StepStatus));
  l.tensors = place(plan.tensors.size() * sizeof(DeviceTensor));
  l.scalars = place(plan.scalars.size() * sizeof(ScalarSet<Step>));
  l.order = place(plan.order.size() * sizeof(std::uint32_t));
  l.block_start = place(plan.block_start.size() * sizeof(std::uint64_t));
  l.elem_offset = place(plan.elem_offset.size() * sizeof(std::uint64_t));
  l.piece_start = place(plan.piece_start.size() * sizeof(std::uint64_t));
  l.upload_bytes = at;
  l.lane_sums = place(static_cast<std::size_t>(plan.pieces) * kNormLanes * sizeof(double));
  l.chunk_sums = place(static_cast<std::size_t>(plan.chunks) * sizeof(double));
  l.total_bytes = at;
  return l;
}

// The table as the kernels see it: pointers into one buffer laid out by layout_of.
template <typename Step>
struct TableView {
  const DeviceTensor* tensors;
  const ScalarSet<Step>* scalars;
  const std::uint32_t* order;
  const std::uint64_t* block_start;
  const std::uint64_t* elem_offset;
  const std::uint64_t* piece_start;
  double* lane_sums;
  double* chunk_sums;
  StepStatus* status;
  std::uint32_t count;
  std::uint64_t chunks;
  std::uint64_t pieces;
};

// The initial status of a step.
inline StepStatus initial_status(double call_grad_scale, double max_grad_norm, Nonfinite policy) {
  StepStatus s{};
  s.call_grad_scale = call_grad_scale;
  s.max_grad_norm = max_grad_norm;
  s.sum_squares = 0.0;
  s.grad_norm = 0.0;
  s.coef = 1.0;
  s.policy = static_cast<std::int32_t>(policy);
  s.check_mode = policy == Nonfinite::propagate ? kCheckNone : kCheckClipped;
  s.first_nonfinite = kNone;
  s.blocks_done = 0;
  s.unused = 0;
  return s;
}

// Writes the upload part of the table into `dst` (at least layout.upload_bytes).
template <typename Tensor, typename Step>
void write_upload(const Plan<Tensor, Step>& plan, const Layout& l, const StepStatus& status, void* dst) {
  char* base = static_cast<char*>(dst);
  auto put = [base](std::size_t at, const void* src, std::size_t bytes) {
    if (bytes) std::memcpy(base + at, src, bytes);
  };
  put(l.status, &status, sizeof(status));
  put(l.tensors, plan.tensors.data(), plan.tensors.size() * sizeof(DeviceTensor));
  put(l.scalars, plan.scalars.data(), plan.scalars.size() * sizeof(ScalarSet<Step>));
  put(l.order, plan.order.data(), plan.order.size() * sizeof(std::uint32_t));
  put(l.block_start, plan.block_start.data(), plan.block_start.size() * sizeof(std::uint64_t));
  put(l.elem_offset, plan.elem_offset.data(), plan.elem_offset.size() * sizeof(std::uint64_t));
  put(l.piece_start, plan.piece_start.data(), plan.piece_start.size() * sizeof(std::uint64_t));
}

// The kernels' view of a table laid out at `base` (a device address, or a host
// buffer when the kernels run on the host in a test).
template <typename Tensor, typename Step>
TableView<Step> view_at(const Plan<Tensor, Step>& plan, const Layout& l, void* base) {
  char* b = static_cast<char*>(base);
  TableView<Step> v{};
  v.tensors = reinterpret_cast<const DeviceTensor*>(b + l.tensors);
  v.scalars = reinterpret_cast<const ScalarSet<Step>*>(b + l.scalars);
  v.order = reinterpret_cast<const std::uint32_t*>(b + l.order);
  v.block_start = reinterpret_cast<const std::uint64_t*>(b + l.block_start);
  v.elem_offset = reinterpret_cast<const std::uint64_t*>(b + l.elem_offset);
  v.piece_start = reinterpret_cast<const std::uint64_t*>(b + l.piece_start);
  v.lane_sums = reinterpret_cast<double*>(b + l.lane_sums);
  v.chunk_sums = reinterpret_cast<double*>(b + l.chunk_sums);
  v.status = reinterpret_cast<StepStatus*>(b + l.status);
  v.count = static_cast<std::uint32_t>(plan.tensors.size());
  v.chunks = plan.chunks;
  v.pieces = plan.pieces;
  return v;
}

}  // namespace cuda
}  // namespace adamcpp
