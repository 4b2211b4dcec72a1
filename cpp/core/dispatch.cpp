// adamcpp: capability detection and the dispatch table.
#include "core/dispatch.h"

#include <atomic>
#include <stdexcept>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(ADAMCPP_X86) && defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#endif

namespace adamcpp {
namespace {

struct Target {
  const char* name;
  const KernelTable& (*table)();
  const ProbeTable& (*probes)();
};

const std::vector<Target>& targets() {
#if defined(ADAMCPP_X86)
  static const std::vector<Target> list = {
      {"baseline", &baseline::kernel_table, &baseline::probe_table},
      {"avx2", &avx2::kernel_table, &avx2::probe_table},
      {"avx512", &avx512::kernel_table, &avx512::probe_table},
  };
#else
  static const std::vector<Target> list = {
      {"generic", &generic::kernel_table, &generic::probe_table},
  };
#endif
  return list;
}

std::atomic<const Target*> g_active{nullptr};

// The count set by set_num_threads, or 0: follow OpenMP's limit for the calling
// thread, read at every step (OMP_NUM_THREADS, omp_set_num_threads, and so
// threadpoolctl's threadpool_limits).
std::atomic<int> g_num_threads{0};

}  // namespace

std::vector<std::string> compiled_targets() {
  std::vector<std::string> names;
  for (const auto& t : targets()) names.emplace_back(t.name);
  return names;
}

#if defined(ADAMCPP_X86)
namespace {

// What the x86 targets need of the CPU and the operating system: AVX2 + FMA +
// BMI2 (x86-64-v3), and AVX-512 F/VL/BW/DQ on top (x86-64-v4).
struct X86Features {
  bool avx2 = false;
  bool avx512 = false;
};

#if defined(__GNUC__) || defined(__clang__)
X86Features detect_x86() {
  __builtin_cpu_init();
  X86Features f;
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  return f;
}
#elif defined(_MSC_VER)
// MSVC has no __builtin_cpu_supports: CPUID leaves 1 and 7, and XGETBV for the
// register state the operating system saves (YMM for AVX2; opmask, ZMM for AVX-512).
X86Features detect_x86() {
  X86Features f;
  int r[4];
  __cpuid(r, 0);
  const int max_leaf = r[0];
  __cpuid(r, 1);
  const bool fma = (r[2] >> 12) & 1, osxsave = (r[2] >> 27) & 1, avx = (r[2] >> 28) & 1;
  if (max_leaf < 7 || !osxsave || !avx) return f;
  const unsigned long long xcr0 = _xgetbv(0);
  __cpuidex(r, 7, 0);
  const unsigned ebx = static_cast<unsigned>(r[1]);
  f.avx2 = (xcr0 & 0x6) == 0x6 && fma && ((ebx >> 5) & 1) && ((ebx >> 8) & 1);
  f.avx512 = f.avx2 && (xcr0 & 0xE6) == 0xE6 && ((ebx >> 16) & 1) && ((ebx >> 17) & 1) && ((ebx >> 30) & 1) &&
             ((ebx >> 31) & 1);
  return f;
}
#else
#error "adamcpp's x86 targets need GCC, Clang or MSVC to detect the CPU"
#endif

}  // namespace
#endif

bool target_supported(const std::string& name) {
#if defined(ADAMCPP_X86)
  static const X86Features cpu = detect_x86();
  if (name == "baseline") return true;
  if (name == "avx2") return cpu.avx2;
  if (name == "avx512") return cpu.avx512;
  return false;
#else
  return name == "generic";
#endif
}

std::string best_target() {
  std::string best;
  for (const auto& t : targets()) {
    if (target_supported(t.name)) best = t.name;
  }
  return best;
}

void select_target(const std::string& name) {
  for (const auto& t : targets()) {
    if (name == t.name) {
      if (!target_supported(name)) {
        throw std::runtime_error("SIMD target '" + name + "' is not supported by this CPU");
      }
      g_active.store(&t);
      return;
    }
  }
  std::string known;
  for (const auto& t : targets()) known += (known.empty() ? "" : ", ") + std::string(t.name);
  throw std::invalid_argument("unknown SIMD target '" + name + "'; compiled targets: " + known);
}

namespace {

const Target& active_target() {
  const Target* target = g_active.load();
  if (target == nullptr) {
    select_target(best_target());
    target = g_active.load();
  }
  return *target;
}

}  // namespace

const KernelTable& active_kernels() { return active_target().table(); }

const ProbeTable& active_probes() { return active_target().probes(); }

namespace {
std::atomic<bool> g_fused_layouts{true};
}  // namespace

bool fused_layouts_enabled() { return g_fused_layouts.load(std::memory_order_relaxed); }

void set_fused_layouts(bool enabled) { g_fused_layouts.store(enabled); }

int get_num_threads() {
  const int n = g_num_threads.load(std::memory_order_relaxed);
  if (n > 0) return n;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_num_threads(int n) {
  if (n < 0)
    throw std::invalid_argument("set_num_threads: n must be >= 1 (or 0: follow OpenMP), got " + std::to_string(n));
  g_num_threads.store(n);
}

bool have_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace adamcpp
