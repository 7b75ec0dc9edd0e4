// What both binding files share: typed dense arrays, and the checks that turn Python arguments into
// the core's raw views (std::invalid_argument surfaces as ValueError). Included by binding.cpp and
// binding_kernels.cpp only.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cpu.h"
#include "kernels.h"
#include "ops_impl.h"

namespace seqshare {

// The kernel entry points for tests and benchmarks (binding_kernels.cpp).
void bind_kernels(pybind11::module_& m);

namespace py_args {

namespace py = pybind11;

template <typename T>
using Dense = py::array_t<T, py::array::c_style | py::array::forcecast>;

inline Isa isa_arg(const std::string& name) {
  return name.empty() ? active_isa() : isa_from_name(name);
}

inline void check_isa_available(Isa isa) {
  if (!isa_selectable(isa))
    throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(isa) + " kernels");
}

// ---- kernels: every op of ops.h, for tests and benchmarks ---------------------------------------
inline WFmt fmt_arg(const std::string& f) {
  if (f == "f32") return WFmt::F32;
  if (f == "f16") return WFmt::F16;
  if (f == "bf16") return WFmt::BF16;
  if (f == "q8") return WFmt::Q8;
  if (f == "q4" || f == "q4s" || f == "q4k") return WFmt::Q4;
  if (f == "q5" || f == "q5s" || f == "q5k") return WFmt::Q5;
  if (f == "q6" || f == "q6k") return WFmt::Q6;
  if (f == "q8p") return WFmt::Q8P;
  throw std::invalid_argument("unknown weight format '" + f +
                              "' (expected f32, f16, bf16, q8, q4, q5, q6, q4s, q5s, q8p, q4k, q5k or q6k)");
}

// A dense array of exactly `itemsize`-byte items of the given numpy kind(s); no conversion, since
// float16 bits and float32 values must reach the kernels untouched.
inline const void* raw(const py::array& a, const char* what, const std::string& kinds, int itemsize) {
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(what) + " must be C-contiguous");
  if (kinds.find(a.dtype().kind()) == std::string::npos || a.itemsize() != itemsize)
    throw std::invalid_argument(std::string(what) + " has dtype " + std::string(py::str(a.dtype())) +
                                ", expected kind " + kinds + " of " + std::to_string(itemsize) + " bytes");
  return a.data();
}

// `rows` is the logical row count; only the panels need it (their panels pad the rows to a multiple of 8).
inline WeightView weight_arg(const std::string& fmt, const py::array& data, const py::object& scales,
                             const py::object& mins, int group, int rows) {
  WeightView w;
  w.fmt = fmt_arg(fmt);
  if (is_panel(w.fmt)) {
    const int block = panel_block_bytes(w.fmt);
    if (data.ndim() != 3 || data.shape(2) != block)
      throw std::invalid_argument(fmt + " data must be (panels, cols/32, " + std::to_string(block) + ")");
    if (rows <= 0 || (rows + 7) / 8 != data.shape(0))
      throw std::invalid_argument(fmt + " rows must be given and fill the " + std::to_string(data.shape(0)) +
                                  " panels");
    w.rows = rows;
    w.cols = static_cast<int>(data.shape(1)) * 32;
    w.data = raw(data, "qs", "u", 1);
  } else {
    if (data.ndim() != 2) throw std::invalid_argument("weight data must be 2-D");
    w.rows = static_cast<int>(data.shape(0));
    w.cols = static_cast<int>(data.shape(1));
    switch (w.fmt) {
      case WFmt::F32: w.data = raw(data, "data", "f", 4); break;
      case WFmt::F16: w.data = raw(data, "data", "fu", 2); break;
      case WFmt::BF16: w.data = raw(data, "data", "u", 2); break;
      default: w.data = raw(data, "qs", "i", 1); break;
    }
  }
  if (w.fmt == WFmt::Q8 || is_panel(w.fmt)) {
    w.group = group;
    if (w.group <= 0 || w.cols % w.group) throw std::invalid_argument("group must divide the columns");
    const auto groups = static_cast<py::ssize_t>(is_panel(w.fmt) ? w.panels() * 8 : w.rows) * (w.cols / w.group);
    auto plane = [&](const py::object& o, const char* what) {
      if (o.is_none()) throw std::invalid_argument(std::string(what) + " are required for " + fmt);
      auto a = py::cast<py::array>(o);
      if (a.size() != groups)
        throw std::invalid_argument(std::string(what) + (is_panel(w.fmt) ? " must be (panels, cols/group, 8)"
                                                                            : " must be (rows, cols/group)"));
      return static_cast<const std::uint16_t*>(raw(a, what, "fu", 2));
    };
    if (fmt.size() == 3 && fmt[2] == 'k') {  // K scales: one byte plane per 256-column super-block
      if (w.cols % kSuperCols) throw std::invalid_argument(fmt + " needs whole 256-column super-blocks");
      if (scales.is_none()) throw std::invalid_argument("scales are required for " + fmt);
      if (!mins.is_none()) throw std::invalid_argument(fmt + " keeps its minimums in its scales: it takes no mins");
      auto a = py::cast<py::array>(scales);
      const int kb = kscale_bytes(panel_bits(w.fmt));
      if (a.ndim() != 3 || a.shape(0) != w.panels() || a.shape(1) != w.cols / kSuperCols || a.shape(2) != kb)
        throw std::invalid_argument(fmt + " scales must be (panels, cols/256, " + std::to_string(kb) + ")");
      w.kscales = static_cast<const std::uint8_t*>(raw(a, "scales", "u", 1));
      check_weight(w);
      return w;
    }
    w.scales = plane(scales, "scales");
    // The symmetric panels (q4s, q5s, q6, q8p) have no mins plane (ops.h panel_mins).
    const bool symmetric = fmt == "q4s" || fmt == "q5s" || fmt == "q6" || fmt == "q8p";
    if (is_panel(w.fmt) && !symmetric) w.mins = plane(mins, "mins");
    if (symmetric && !mins.is_none()) throw std::invalid_argument(fmt + " is symmetric: it takes no mins");
  }
  check_weight(w);
  return w;
}

inline const KernelTable& table_arg(const std::string& isa) {
  Isa which = isa_arg(isa);
  check_isa_available(which);
  return kernel_table(which);
}

}  // namespace py_args
}  // namespace seqshare
