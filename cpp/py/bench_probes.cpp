// adamcpp: the benchmark's probes (the ceiling loops, the STREAM triad, the
// traffic bound; probes.h) and the conversion probes the tests use (narrow,
// widen), over NumPy arrays checked here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "core/dispatch.h"
#include "core/kernels.h"
#include "core/probes.h"
#include "py/array_checks.h"
#include "py/module.h"

namespace py = pybind11;

namespace adamcpp {
namespace {

void ceiling_adam(py::handle param, py::handle grad, py::handle exp_avg, py::handle exp_avg_sq, double step_size,
                  double bias_correction2_sqrt) {
  const ArrayView p = probe_buffer(param, "param", DType::f32, nullptr);
  const ArrayView g = probe_buffer(grad, "grad", DType::f32, &p);
  const ArrayView m = probe_buffer(exp_avg, "exp_avg", DType::f32, &p);
  const ArrayView v = probe_buffer(exp_avg_sq, "exp_avg_sq", DType::f32, &p);
  const int threads = get_num_threads();
  py::gil_scoped_release release;  // the caller's arguments stay alive for the whole call
  active_probes().ceiling_adam(reinterpret_cast<float*>(p.data), reinterpret_cast<const float*>(g.data),
                               reinterpret_cast<float*>(m.data), reinterpret_cast<float*>(v.data), p.numel,
                               static_cast<float>(step_size), static_cast<float>(bias_correction2_sqrt), threads);
}

// The compact ceiling loop (probes.h): layout indexes FusedLayout; param and
// grad are float32 (bf16_state) or bfloat16, exp_avg and exp_avg_sq bfloat16,
// master a float32 array (bf16_master) or None.
void ceiling_compact(int layout, int mode, py::handle param, py::handle grad, py::handle exp_avg, py::handle exp_avg_sq,
                     py::handle master, double step_size, double inv_bias_correction2_sqrt, std::uint32_t key) {
  if (layout < 0 || layout >= kFusedLayouts) value_error("layout: expected a FusedLayout index");
  if (mode != 1 && mode != 2) value_error("mode: expected 1 (stochastic) or 2 (fixed bits)");
  const DType pd = layout == static_cast<int>(FusedLayout::bf16_state) ? DType::f32 : DType::bf16;
  const ArrayView p = probe_buffer(param, "param", pd, nullptr);
  const ArrayView g = probe_buffer(grad, "grad", pd, &p);
  const ArrayView m = probe_buffer(exp_avg, "exp_avg", DType::bf16, &p);
  const ArrayView v = probe_buffer(exp_avg_sq, "exp_avg_sq", DType::bf16, &p);
  float* master_data = nullptr;
  if (layout == static_cast<int>(FusedLayout::bf16_master)) {
    master_data = reinterpret_cast<float*>(probe_buffer(master, "master", DType::f32, &p).data);
  }
  const int threads = get_num_threads();
  py::gil_scoped_release release;
  active_probes().ceiling_compact(
      layout, mode, p.data, g.data, reinterpret_cast<std::uint16_t*>(m.data), reinterpret_cast<std::uint16_t*>(v.data),
      master_data, p.numel, static_cast<float>(step_size), static_cast<float>(inv_bias_correction2_sqrt), key, threads);
}

// The traffic probe (probes.h): float32 param and grad; exp_avg and
// exp_avg_sq both float32 or both bfloat16.
void traffic(py::handle param, py::handle grad, py::handle exp_avg, py::handle exp_avg_sq) {
  const ArrayView p = probe_buffer(param, "param", DType::f32, nullptr);
  const ArrayView g = probe_buffer(grad, "grad", DType::f32, &p);
  const bool bf16 = is_ndarray(exp_avg.ptr()) && raw_view(exp_avg.ptr()).dtype == static_cast<int>(DType::bf16);
  const DType state = bf16 ? DType::bf16 : DType::f32;
  const ArrayView m = probe_buffer(exp_avg, "exp_avg", state, &p);
  const ArrayView v = probe_buffer(exp_avg_sq, "exp_avg_sq", state, &p);
  const int threads = get_num_threads();
  py::gil_scoped_release release;
  active_probes().traffic(reinterpret_cast<float*>(p.data), reinterpret_cast<const float*>(g.data), m.data, v.data,
                          state, p.numel, threads);
}

// A 16-bit array (float16 or bfloat16) for the conversion probes; returns its format.
DType half_buffer(const ArrayView& a, const char* what, bool need_write) {
  using npy = py::detail::npy_api;
  if (a.dtype != static_cast<int>(DType::f16) && a.dtype != static_cast<int>(DType::bf16)) {
    type_error(std::string(what) + ": expected float16 or bfloat16");
  }
  const int need =
      npy::NPY_ARRAY_C_CONTIGUOUS_ | npy::NPY_ARRAY_ALIGNED_ | (need_write ? npy::NPY_ARRAY_WRITEABLE_ : 0);
  if ((a.flags & need) != need) value_error(std::string(what) + ": expected an aligned, C-contiguous array");
  return static_cast<DType>(a.dtype);
}

void narrow(py::handle src, py::handle dst, int rounding, std::uint32_t key) {
  const ArrayView s = probe_buffer(src, "src", DType::f32, nullptr);
  if (!is_ndarray(dst.ptr())) type_error("dst: expected a numpy.ndarray");
  const ArrayView d = raw_view(dst.ptr());
  const DType format = half_buffer(d, "dst", true);
  if (d.numel != s.numel) value_error("dst: size mismatch");
  if (rounding != 0 && rounding != 1) value_error("rounding: expected 0 (nearest) or 1 (stochastic)");
  py::gil_scoped_release release;
  active_probes().narrow(reinterpret_cast<const float*>(s.data), reinterpret_cast<std::uint16_t*>(d.data), s.numel,
                         format, static_cast<Rounding>(rounding), key);
}

void widen(py::handle src, py::handle dst) {
  if (!is_ndarray(src.ptr())) type_error("src: expected a numpy.ndarray");
  const ArrayView s = raw_view(src.ptr());
  const DType format = half_buffer(s, "src", false);
  const ArrayView d = probe_buffer(dst, "dst", DType::f32, &s);
  py::gil_scoped_release release;
  active_probes().widen(reinterpret_cast<const std::uint16_t*>(s.data), reinterpret_cast<float*>(d.data), s.numel,
                        format);
}

void triad(py::handle a, py::handle b, py::handle c, double s) {
  const ArrayView x = probe_buffer(a, "a", DType::f64, nullptr);
  const ArrayView y = probe_buffer(b, "b", DType::f64, &x);
  const ArrayView z = probe_buffer(c, "c", DType::f64, &x);
  const int threads = get_num_threads();
  py::gil_scoped_release release;
  active_probes().triad(reinterpret_cast<double*>(x.data), reinterpret_cast<const double*>(y.data),
                        reinterpret_cast<const double*>(z.data), x.numel, s, threads);
}

}  // namespace

void register_probes(py::module_& m) {
  m.def("ceiling_adam", &ceiling_adam, py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("step_size"), py::arg("bias_correction2_sqrt"),
        "The simplest `omp parallel for simd` float32 Adam loop (benchmark ceiling).");
  m.def("triad", &triad, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("s"),
        "STREAM triad a = b + s * c over float64 arrays (memory-bandwidth probe).");
  m.def("ceiling_compact", &ceiling_compact, py::arg("layout"), py::arg("mode"), py::arg("param"), py::arg("grad"),
        py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("master"), py::arg("step_size"),
        py::arg("inv_bias_correction2_sqrt"), py::arg("key"),
        "The simplest `omp parallel for simd` loop of a compact layout (FUSED_LAYOUTS index) with adamcpp's "
        "numerics for it (benchmark ceiling); mode 1 stochastic rounding, 2 the same with fixed bits.");
  m.def("traffic", &traffic, py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        "The bytes of a float32-parameter Adam step and one addition per array (exp_avg and exp_avg_sq float32: 28 "
        "bytes per element; bfloat16: 20): the memory-traffic bound of a step (benchmark probe).");
  m.attr("FUSED_LAYOUTS") = py::make_tuple("bf16-state", "bf16-master", "bf16");
  m.def("narrow", &narrow, py::arg("src"), py::arg("dst"), py::arg("rounding"), py::arg("key"),
        "The kernels' float32 -> float16/bfloat16 conversion over an array (rounding: ROUNDINGS index; element k "
        "takes the generator's bits for index k under `key`).");
  m.def("widen", &widen, py::arg("src"), py::arg("dst"), "The kernels' float16/bfloat16 -> float32 conversion.");
}

}  // namespace adamcpp
