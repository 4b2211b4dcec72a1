// adamcpp: the CUDA unit's interface (cuda_unit.h) in a build without nvcc
// (ADAMCPP_CUDA=OFF, or AUTO with no nvcc found). The CUDA entries, their
// reading of DLPack and CUDA-array-interface headers and DeviceArray are
// compiled in every build, so every build's module has the same names (and
// _core.pyi is true of all of them); here the probe reports the unit absent
// and everything that would touch a device throws, naming how to build it.
#include <stdexcept>

#include "cuda/cuda_unit.h"

namespace adamcpp {
namespace cuda {
namespace {

constexpr const char* kAbsent =
    "adamcpp was built without the CUDA unit (no nvcc was found when it was built, or ADAMCPP_CUDA=OFF); "
    "reinstall with nvcc on the PATH (or CUDACXX set) to build it";

[[noreturn]] void absent() { throw std::runtime_error(kAbsent); }

}  // namespace

bool unit_compiled() { return false; }

const RuntimeInfo& runtime_info() {
  static const RuntimeInfo info = [] {
    RuntimeInfo r;
    r.reason = kAbsent;
    return r;
  }();
  return info;
}

void require_device(int) { absent(); }
int pointer_device(const void*) { absent(); }
void* device_alloc(int, std::size_t) { absent(); }
void device_free(int, void*) noexcept {}
void copy_to_host(int, void*, const void*, std::size_t, StreamId) { absent(); }
void copy_from_host(int, void*, const void*, std::size_t, StreamId) { absent(); }
void copy_device(int, void*, const void*, std::size_t, StreamId) { absent(); }
void fill_zero(int, void*, std::size_t, StreamId) { absent(); }
void stream_wait(int, StreamId, StreamId) { absent(); }
void stream_synchronize(int, StreamId) { absent(); }
void device_synchronize(int) { absent(); }
std::vector<std::pair<std::string, std::uint64_t>> launch_counts() { return {}; }

struct Workspace::Impl {};

Workspace::Workspace() = default;
Workspace::~Workspace() = default;

StepResult Workspace::adam_step(int, StreamId, const AdamTensor*, std::size_t, const StepPolicy&) { absent(); }
StepResult Workspace::sgd_step(int, StreamId, const SgdTensor*, std::size_t, const StepPolicy&) { absent(); }
double Workspace::global_norm(int, StreamId, const AdamTensor*, std::size_t) { absent(); }
double Workspace::pending_norm() { absent(); }

}  // namespace cuda
}  // namespace adamcpp
