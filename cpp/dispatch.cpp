// adamcpp: capability detection and the dispatch table.
#include "dispatch.h"

#include <atomic>
#include <stdexcept>

#ifdef _OPENMP
#include <omp.h>
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

int initial_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

std::atomic<int> g_num_threads{initial_threads()};

}  // namespace

std::vector<std::string> compiled_targets() {
  std::vector<std::string> names;
  for (const auto& t : targets()) names.emplace_back(t.name);
  return names;
}

bool target_supported(const std::string& name) {
#if defined(ADAMCPP_X86)
  __builtin_cpu_init();
  if (name == "baseline") return true;
  if (name == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  }
  if (name == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && target_supported("avx2");
  }
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

int get_num_threads() { return g_num_threads.load(); }

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1, got " + std::to_string(n));
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
