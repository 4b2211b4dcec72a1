// adamcpp: the preamble of a translation unit compiled once per ISA target
// (kernels.cpp, probes.cpp): CMake defines ADAMCPP_ISA and the -march flags,
// and the shared element math lands in the namespace adamcpp::<ADAMCPP_ISA>.
// Include it before anything that includes optim_math.h, and only from such units.
#pragma once

#ifndef ADAMCPP_ISA
#error "ADAMCPP_ISA must name the ISA target of this translation unit"
#endif
#define ADAMCPP_MATH_NS ADAMCPP_ISA
#include "core/optim_math.h"

#define ADAMCPP_STR2(x) #x
#define ADAMCPP_STR(x) ADAMCPP_STR2(x)

// A loop body inlined into each of its callers (each one's own vector code).
#if defined(__GNUC__) || defined(__clang__)
#define ADAMCPP_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define ADAMCPP_INLINE __forceinline
#else
#define ADAMCPP_INLINE inline
#endif

#if defined(__GNUC__) || defined(__clang__)
#define ADAMCPP_RESTRICT __restrict__
#elif defined(_MSC_VER)
#define ADAMCPP_RESTRICT __restrict
#else
#define ADAMCPP_RESTRICT
#endif
