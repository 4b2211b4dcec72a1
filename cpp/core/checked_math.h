// adamcpp: a * b and a + b in integers, false where the exact result does not
// fit the type (reading the sizes, strides and offsets of foreign headers).
// GCC and Clang have builtins for it; any other compiler (MSVC), or a build
// defining ADAMCPP_STD_MATH (tests/test_portable_source.py compiles that
// branch with GCC), uses the comparisons below, which give the same answers.
#pragma once

#include <limits>
#include <type_traits>

namespace adamcpp {

template <typename T>
bool mul_fits(T a, T b, T* out) {
  static_assert(std::is_integral_v<T>, "mul_fits: integers only");
#if (defined(__GNUC__) || defined(__clang__)) && !defined(ADAMCPP_STD_MATH)
  return !__builtin_mul_overflow(a, b, out);
#else
  constexpr T hi = std::numeric_limits<T>::max(), lo = std::numeric_limits<T>::min();
  bool fits;
  if constexpr (std::is_unsigned_v<T>) {
    fits = a == 0 || b <= hi / a;
  } else if (a > 0) {
    fits = b > 0 ? a <= hi / b : b >= lo / a;
  } else if (a < 0) {
    fits = b > 0 ? a >= lo / b : (b == 0 || a >= hi / b);
  } else {
    fits = true;
  }
  if (fits) *out = static_cast<T>(a * b);
  return fits;
#endif
}

template <typename T>
bool add_fits(T a, T b, T* out) {
  static_assert(std::is_integral_v<T>, "add_fits: integers only");
#if (defined(__GNUC__) || defined(__clang__)) && !defined(ADAMCPP_STD_MATH)
  return !__builtin_add_overflow(a, b, out);
#else
  constexpr T hi = std::numeric_limits<T>::max(), lo = std::numeric_limits<T>::min();
  const bool fits = std::is_unsigned_v<T> ? a <= hi - b : (b >= 0 ? a <= hi - b : a >= lo - b);
  if (fits) *out = static_cast<T>(a + b);
  return fits;
#endif
}

}  // namespace adamcpp
