// The only file that knows about Python. Arrays are typed and dense at the signature, checked,
// then handed to the core as raw pointers; std::invalid_argument surfaces as ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cpu.h"
#include "kernels.h"

namespace py = pybind11;
using namespace seqshare;

template <typename T>
using Dense = py::array_t<T, py::array::c_style | py::array::forcecast>;

static Isa isa_arg(const std::string& name) {
  return name.empty() ? active_isa() : isa_from_name(name);
}

static void check_isa_available(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(best_isa()))
    throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(isa) + " kernels");
}

PYBIND11_MODULE(_native, m) {
  m.doc() = "seqshare native CPU kernels";
  m.attr("__version__") = SEQSHARE_VERSION;

  m.def("cpu_features", [] {
    const CpuFeatures& c = cpu_features();
    py::dict d;
    d["avx2"] = c.avx2; d["fma"] = c.fma; d["f16c"] = c.f16c;
    d["avx512f"] = c.avx512f; d["avx512bw"] = c.avx512bw; d["avx512vl"] = c.avx512vl;
    d["avx512dq"] = c.avx512dq; d["avx512vnni"] = c.avx512vnni; d["avx512bf16"] = c.avx512bf16;
    d["avxvnni"] = c.avxvnni;
    return d;
  }, "CPU features seen at start-up.");
  m.def("best_isa", [] { return std::string(isa_name(best_isa())); },
        "The best kernel variant this CPU can run (capped by SEQSHARE_ISA).");
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); },
        "The kernel variant in force.");
  m.def("set_isa", [](const std::string& name) { set_isa(isa_from_name(name)); }, py::arg("isa"),
        "Select a kernel variant (scalar, avx2, avx512); ValueError if this CPU cannot run it.");

  m.def("dot_f32", [](Dense<float> a, Dense<float> b, const std::string& isa) {
    if (a.ndim() != 1 || b.ndim() != 1 || a.shape(0) != b.shape(0))
      throw std::invalid_argument("dot_f32: a and b must be 1-D of equal length");
    Isa which = isa_arg(isa);
    check_isa_available(which);
    const float* pa = a.data();
    const float* pb = b.data();
    auto n = static_cast<std::size_t>(a.shape(0));
    float r;
    {
      py::gil_scoped_release nogil;
      r = kernel_table(which).dot_f32(pa, pb, n);
    }
    return r;
  }, py::arg("a"), py::arg("b"), py::arg("isa") = "",
     "Dot product of two float32 vectors with the chosen (default: active) kernel variant.");
}
