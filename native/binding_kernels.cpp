// Every op of ops.h (and dot_f32) callable from Python in any kernel variant, for the kernel tests
// and bench/kernels.py; the engine itself never goes through these.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "binding_args.h"
#include "kernels.h"
#include "kv.h"
#include "ops_impl.h"
#include "threadpool.h"

namespace py = pybind11;

namespace seqshare {

using namespace py_args;

namespace {

// Causal GQA attention of q (N, n_heads, head_dim) at q_pos over one layer of a cache whose row 0
// is at absolute position pos0: (out, lse).
py::tuple cached_attention(const Dense<float>& q, const KVCache& kv, int layer, const Dense<std::int32_t>& q_pos,
                           int pos0, float scale, const std::string& isa) {
  if (q.ndim() != 3 || q.shape(2) != kv.head_dim())
    throw std::invalid_argument("attention: q must be (N, heads, head_dim)");
  if (q_pos.size() != q.shape(0)) throw std::invalid_argument("attention: q_pos length mismatch");
  const int N = static_cast<int>(q.shape(0)), H = static_cast<int>(q.shape(1)), D = kv.head_dim();
  const int KVH = kv.n_kv_heads();
  if (KVH <= 0 || H % KVH) throw std::invalid_argument("attention: n_heads must be a multiple of kv heads");
  const KVSpan span = kv_span(kv, layer, kv.length(), pos0);
  const KernelTable& kt = table_arg(isa);
  py::array_t<float> out({N, H, D});
  py::array_t<float> lse({N, H});
  float* po = out.mutable_data();
  float* pl = lse.mutable_data();
  {
    py::gil_scoped_release nogil;
    attention_with(kt, q.data(), N, H, KVH, D, q_pos.data(), span, scale, po, pl, global_pool());
  }
  return py::make_tuple(out, lse);
}

}  // namespace

void bind_kernels(py::module_& m) {
  m.def("linear", [](Dense<float> x, const std::string& fmt, py::array data, py::object scales,
                     py::object mins, int group, int rows, const std::string& isa) {
    WeightView w = weight_arg(fmt, data, scales, mins, group, rows);
    if (x.ndim() != 2 || x.shape(1) != w.cols) throw std::invalid_argument("linear: x must be (N, cols)");
    const KernelTable& kt = table_arg(isa);
    const int N = static_cast<int>(x.shape(0));
    py::array_t<float> y({static_cast<py::ssize_t>(N), static_cast<py::ssize_t>(w.rows)});
    const float* px = x.data();
    float* py_ = y.mutable_data();
    {
      py::gil_scoped_release nogil;
      linear_with(kt, w, px, N, py_, global_pool());
    }
    return y;
  }, py::arg("x"), py::arg("fmt"), py::arg("data"), py::arg("scales") = py::none(),
     py::arg("mins") = py::none(), py::arg("group") = 0, py::arg("rows") = 0, py::arg("isa") = "",
     "Y (N, rows) = x (N, cols) @ W^T for a weight in runtime layout (bundle/quant.py planes).");

  m.def("linear_many", [](Dense<float> x, const py::list& weights, const std::string& isa) {
    std::vector<WeightView> ws;
    for (const py::handle& h : weights) {
      const auto kw = h.cast<py::dict>();  // linear's keywords, with its defaults where one is absent
      const auto plane = [&](const char* k) { return kw.contains(k) ? py::object(kw[k]) : py::object(py::none()); };
      const auto number = [&](const char* k) { return kw.contains(k) ? kw[k].cast<int>() : 0; };
      ws.push_back(weight_arg(kw["fmt"].cast<std::string>(), kw["data"].cast<py::array>(), plane("scales"),
                              plane("mins"), number("group"), number("rows")));
    }
    if (ws.empty() || x.ndim() != 2 || x.shape(1) != ws[0].cols)
      throw std::invalid_argument("linear_many: at least one weight, and x must be (N, cols)");
    const KernelTable& kt = table_arg(isa);
    const int N = static_cast<int>(x.shape(0));
    py::list out;
    std::vector<float*> ys;
    for (const WeightView& w : ws) {
      py::array_t<float> y({static_cast<py::ssize_t>(N), static_cast<py::ssize_t>(w.rows)});
      ys.push_back(y.mutable_data());
      out.append(y);
    }
    const float* px = x.data();
    {
      py::gil_scoped_release nogil;
      linear_many_with(kt, ws.data(), ys.data(), static_cast<int>(ws.size()), px, N, global_pool());
    }
    return out;
  }, py::arg("x"), py::arg("weights"), py::arg("isa") = "",
     "[x @ W^T for each weight], computed as one fused op (the model's q/k/v and gate/up): `weights` are\n"
     "`linear`'s keyword arguments as dicts, all with the same columns, format and group.");

  m.def("embedding", [](py::array_t<std::int32_t, py::array::c_style | py::array::forcecast> tokens,
                        const std::string& fmt, py::array data, py::object scales, py::object mins, int group,
                        int rows) {
    WeightView w = weight_arg(fmt, data, scales, mins, group, rows);
    const int N = static_cast<int>(tokens.size());
    py::array_t<float> out({static_cast<py::ssize_t>(N), static_cast<py::ssize_t>(w.cols)});
    const std::int32_t* pt = tokens.data();
    float* po = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      embedding(w, pt, N, po, global_pool());
    }
    return out;
  }, py::arg("tokens"), py::arg("fmt"), py::arg("data"), py::arg("scales") = py::none(),
     py::arg("mins") = py::none(), py::arg("group") = 0, py::arg("rows") = 0,
     "Dequantized rows of an embedding matrix.");

  m.def("attention", [](Dense<float> q, py::array k, py::array v, Dense<std::int32_t> q_pos, int pos0,
                        float scale, const std::string& isa, const py::object& pairs) {
    if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3) throw std::invalid_argument("attention: q, k, v must be 3-D");
    for (int i = 0; i < 3; ++i)
      if (k.shape(i) != v.shape(i)) throw std::invalid_argument("attention: k and v shapes differ");
    if (k.shape(2) != q.shape(2)) throw std::invalid_argument("attention: head_dim mismatch");
    if (pos0 < 0) throw std::invalid_argument("attention: pos0 must be >= 0");
    // The keys go into a real KV cache (its layout is what the kernels read), float16 or float32
    // like the arrays; float16 values survive the float32 round trip exactly.
    const bool f16 = k.itemsize() == 2;
    const int L = static_cast<int>(k.shape(0)), D = static_cast<int>(k.shape(2));
    KVCache cache(1, static_cast<int>(k.shape(1)), D, L, f16, pos0 % kKVTile, false,
                  pairs.is_none() ? kv_keeps_pairs(f16, D) : pairs.cast<bool>());
    {
      auto as_f32 = [](const py::array& a) { return py::array_t<float, py::array::c_style | py::array::forcecast>(a); };
      auto k32 = as_f32(k), v32 = as_f32(v);
      kv_store(cache, 0, 0, k32.data(), v32.data(), L);
      cache.advance(L);
    }
    return cached_attention(q, cache, 0, q_pos, pos0, scale, isa);
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_pos"), py::arg("pos0"), py::arg("scale"),
     py::arg("isa") = "", py::arg("pairs") = py::none(),
     "Causal GQA attention over one KV span (k/v float16 or float32): (out, lse). `pairs`: the cache keeps\n"
     "BF16 pair tiles (KV's `pairs`).");

  // bench/kernels.py times this one: `attention` above spends most of a long span's time building
  // its cache, which the model never does per step.
  m.def("attention_kv", [](Dense<float> q, const KVCache& kv, int layer, Dense<std::int32_t> q_pos, int pos0,
                           float scale, const std::string& isa) {
    if (layer < 0 || layer >= kv.n_layers()) throw std::invalid_argument("attention_kv: no such layer");
    if (pos0 < 0 || pos0 % kKVTile != kv.phase())
      throw std::invalid_argument("attention_kv: pos0 must be >= 0 and pos0 % 32 the cache's phase");
    return cached_attention(q, kv, layer, q_pos, pos0, scale, isa);
  }, py::arg("q"), py::arg("kv"), py::arg("layer"), py::arg("q_pos"), py::arg("pos0"), py::arg("scale"),
     py::arg("isa") = "", "`attention` over one layer of an existing KV cache, its row 0 at position pos0.");

  m.def("attention_merge", [](Dense<float> out_a, Dense<float> lse_a, Dense<float> out_b, Dense<float> lse_b) {
    if (out_a.ndim() != 3 || out_b.ndim() != 3 || lse_a.ndim() != 2 || lse_b.ndim() != 2)
      throw std::invalid_argument("attention_merge: out (N, H, D) and lse (N, H) expected");
    for (int i = 0; i < 3; ++i)
      if (out_a.shape(i) != out_b.shape(i)) throw std::invalid_argument("attention_merge: shapes differ");
    const int N = static_cast<int>(out_a.shape(0)), H = static_cast<int>(out_a.shape(1));
    if (lse_a.shape(0) != N || lse_a.shape(1) != H || lse_b.shape(0) != N || lse_b.shape(1) != H)
      throw std::invalid_argument("attention_merge: lse shape mismatch");
    py::array_t<float> o(py::array(out_a).attr("copy")());
    py::array_t<float> l(py::array(lse_a).attr("copy")());
    float* po = o.mutable_data();
    float* pl = l.mutable_data();
    {
      py::gil_scoped_release nogil;
      attention_merge(po, pl, out_b.data(), lse_b.data(), N, H, static_cast<int>(out_a.shape(2)));
    }
    return py::make_tuple(o, l);
  }, py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"), py::arg("lse_b"),
     "Exact merge of two partial attentions: (out, lse) of the union of their keys.");

  m.def("rmsnorm", [](Dense<float> x, Dense<float> weight, float eps, const std::string& isa) {
    if (x.ndim() != 2 || weight.ndim() != 1 || weight.shape(0) != x.shape(1))
      throw std::invalid_argument("rmsnorm: x (N, dim) and weight (dim) expected");
    const KernelTable& kt = table_arg(isa);
    py::array_t<float> y({x.shape(0), x.shape(1)});
    const int N = static_cast<int>(x.shape(0)), dim = static_cast<int>(x.shape(1));
    const float* px = x.data();
    const float* pw = weight.data();
    float* pyy = y.mutable_data();
    {
      py::gil_scoped_release nogil;
      rmsnorm_with(kt, px, pw, eps, N, dim, pyy, global_pool());
    }
    return y;
  }, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("isa") = "", "RMSNorm of each row.");

  m.def("rope", [](Dense<float> x, Dense<std::int32_t> positions, float theta) {
    if (x.ndim() != 3 || positions.size() != x.shape(0))
      throw std::invalid_argument("rope: x (N, heads, head_dim) and positions (N) expected");
    if (x.shape(2) % 2) throw std::invalid_argument("rope: head_dim must be even");
    py::array_t<float> y(py::array(x).attr("copy")());
    float* p = y.mutable_data();
    const std::int32_t* pp = positions.data();
    const int N = static_cast<int>(x.shape(0)), H = static_cast<int>(x.shape(1)), D = static_cast<int>(x.shape(2));
    {
      py::gil_scoped_release nogil;
      rope(p, H, nullptr, 0, N, D, pp, theta, global_pool());
    }
    return y;
  }, py::arg("x"), py::arg("positions"), py::arg("theta"), "Rotary embedding (rotate_half) of a copy of x.");

  m.def("silu_mul", [](Dense<float> gate, Dense<float> up, const std::string& isa) {
    if (gate.size() != up.size()) throw std::invalid_argument("silu_mul: sizes differ");
    const KernelTable& kt = table_arg(isa);
    py::array_t<float> y(py::array(gate).attr("copy")());
    float* p = y.mutable_data();
    const float* pu = up.data();
    const auto n = static_cast<std::size_t>(gate.size());
    {
      py::gil_scoped_release nogil;
      silu_mul_with(kt, p, pu, n, global_pool());
    }
    return y;
  }, py::arg("gate"), py::arg("up"), py::arg("isa") = "", "silu(gate) * up.");

  m.def("add", [](Dense<float> y, Dense<float> x, const std::string& isa) {
    if (y.size() != x.size()) throw std::invalid_argument("add: sizes differ");
    const KernelTable& kt = table_arg(isa);
    py::array_t<float> r(py::array(y).attr("copy")());
    float* p = r.mutable_data();
    const float* px = x.data();
    const auto n = static_cast<std::size_t>(y.size());
    {
      py::gil_scoped_release nogil;
      add_with(kt, p, px, n, global_pool());
    }
    return r;
  }, py::arg("y"), py::arg("x"), py::arg("isa") = "", "y + x (the residual add_inplace kernel).");

  m.def("kv_store", [](KVCache& kv, int layer, Dense<float> k, Dense<float> v) {
    if (k.ndim() != 2 || v.ndim() != 2 || k.shape(1) != kv.kv_dim() || v.shape(0) != k.shape(0) ||
        v.shape(1) != kv.kv_dim())
      throw std::invalid_argument("kv_store: k and v must be (N, kv_dim)");
    if (layer < 0 || layer >= kv.n_layers()) throw std::invalid_argument("kv_store: layer out of range");
    const int N = static_cast<int>(k.shape(0));
    if (kv.length() + N > kv.capacity())  // before the rows are written, not after
      throw std::invalid_argument("kv_store: " + std::to_string(N) + " rows do not fit after the " +
                                  std::to_string(kv.length()) + " of a KV of " + std::to_string(kv.capacity()));
    kv_store(kv, layer, kv.length(), k.data(), v.data(), N);
    kv.advance(N);
  }, py::arg("kv"), py::arg("layer"), py::arg("k"), py::arg("v"),
     "Append K and V rows (N, kv_dim) float32 to one layer of a KV cache (the model's store; tests).");

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

}  // namespace seqshare
