// adamcpp: run-time choice of the ISA target and of the thread count.
#pragma once

#include <string>
#include <vector>

#include "core/kernels.h"
#include "core/probes.h"

namespace adamcpp {

// Names of the targets compiled into this build, best last.
std::vector<std::string> compiled_targets();

// Whether this CPU (and its OS) can run the named target.
bool target_supported(const std::string& name);

// The best compiled target this CPU supports.
std::string best_target();

// Selects a target by name; throws std::invalid_argument for an unknown name
// and std::runtime_error for one this CPU lacks.
void select_target(const std::string& name);

// The kernel table in use (selected target, or the best one by default).
const KernelTable& active_kernels();

// The benchmark probes of the same target.
const ProbeTable& active_probes();

// Whether the fused 16-bit layouts run (default), or every mixed-precision
// tensor takes the blocked path (for tests and adamcpp-bench: both give the same bits).
bool fused_layouts_enabled();
void set_fused_layouts(bool enabled);

int get_num_threads();
void set_num_threads(int n);
bool have_openmp();

}  // namespace adamcpp
