// The only file that knows about Python. Arrays are typed and dense at the signature, checked,
// then handed to the core as raw pointers; std::invalid_argument surfaces as ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>

#include "cpu.h"
#include "kernels.h"
#include "kv.h"
#include "model.h"
#include "ops_impl.h"
#include "threadpool.h"

namespace py = pybind11;
using namespace seqshare;

template <typename T>
using Dense = py::array_t<T, py::array::c_style | py::array::forcecast>;

static Isa isa_arg(const std::string& name) {
  return name.empty() ? active_isa() : isa_from_name(name);
}

static void check_isa_available(Isa isa) {
  if (!isa_selectable(isa))
    throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(isa) + " kernels");
}

// ---- kernels: every op of ops.h, for tests and benchmarks ---------------------------------------
static WFmt fmt_arg(const std::string& f) {
  if (f == "f32") return WFmt::F32;
  if (f == "f16") return WFmt::F16;
  if (f == "bf16") return WFmt::BF16;
  if (f == "q8") return WFmt::Q8;
  if (f == "q4") return WFmt::Q4;
  throw std::invalid_argument("unknown weight format '" + f + "' (expected f32, f16, bf16, q8 or q4)");
}

// A dense array of exactly `itemsize`-byte items of the given numpy kind(s); no conversion, since
// float16 bits and float32 values must reach the kernels untouched.
static const void* raw(const py::array& a, const char* what, const std::string& kinds, int itemsize) {
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(what) + " must be C-contiguous");
  if (kinds.find(a.dtype().kind()) == std::string::npos || a.itemsize() != itemsize)
    throw std::invalid_argument(std::string(what) + " has dtype " + std::string(py::str(a.dtype())) +
                                ", expected kind " + kinds + " of " + std::to_string(itemsize) + " bytes");
  return a.data();
}

// `rows` is the logical row count; only q4 needs it (its panels pad the rows to a multiple of 8).
static WeightView weight_arg(const std::string& fmt, const py::array& data, const py::object& scales,
                             const py::object& mins, int group, int rows) {
  WeightView w;
  w.fmt = fmt_arg(fmt);
  if (w.fmt == WFmt::Q4) {
    if (data.ndim() != 3 || data.shape(2) != 128) throw std::invalid_argument("q4 data must be (panels, cols/32, 128)");
    if (rows <= 0 || (rows + 7) / 8 != data.shape(0))
      throw std::invalid_argument("q4 rows must be given and fill the " + std::to_string(data.shape(0)) + " panels");
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
  if (w.fmt == WFmt::Q8 || w.fmt == WFmt::Q4) {
    w.group = group;
    if (w.group <= 0 || w.cols % w.group) throw std::invalid_argument("group must divide the columns");
    const auto groups = static_cast<py::ssize_t>(w.fmt == WFmt::Q4 ? w.panels() * 8 : w.rows) * (w.cols / w.group);
    auto plane = [&](const py::object& o, const char* what) {
      if (o.is_none()) throw std::invalid_argument(std::string(what) + " are required for " + fmt);
      auto a = py::cast<py::array>(o);
      if (a.size() != groups)
        throw std::invalid_argument(std::string(what) + (w.fmt == WFmt::Q4 ? " must be (panels, cols/group, 8)"
                                                                            : " must be (rows, cols/group)"));
      return static_cast<const std::uint16_t*>(raw(a, what, "fu", 2));
    };
    w.scales = plane(scales, "scales");
    if (w.fmt == WFmt::Q4) w.mins = plane(mins, "mins");
  }
  check_weight(w);
  return w;
}

static const KernelTable& table_arg(const std::string& isa) {
  Isa which = isa_arg(isa);
  check_isa_available(which);
  return kernel_table(which);
}

static void bind_kernels(py::module_& m) {
  m.def("set_threads", [](int n) { set_global_threads(n); }, py::arg("n"),
        "Resize the global thread pool (0 = all hardware threads).");
  m.def("get_threads", [] { return global_pool().size(); }, "Size of the global thread pool.");

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
                        float scale, const std::string& isa) {
    if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3) throw std::invalid_argument("attention: q, k, v must be 3-D");
    for (int i = 0; i < 3; ++i)
      if (k.shape(i) != v.shape(i)) throw std::invalid_argument("attention: k and v shapes differ");
    if (k.shape(2) != q.shape(2) || q_pos.size() != q.shape(0))
      throw std::invalid_argument("attention: head_dim or q_pos length mismatch");
    if (pos0 < 0) throw std::invalid_argument("attention: pos0 must be >= 0");
    // The keys go into a real KV cache (its layout is what the kernels read), float16 or float32
    // like the arrays; float16 values survive the float32 round trip exactly.
    const bool f16 = k.itemsize() == 2;
    const int L = static_cast<int>(k.shape(0)), KVH0 = static_cast<int>(k.shape(1));
    KVCache cache(1, KVH0, static_cast<int>(k.shape(2)), L, f16, pos0 % kKVTile);
    {
      auto as_f32 = [](const py::array& a) { return py::array_t<float, py::array::c_style | py::array::forcecast>(a); };
      auto k32 = as_f32(k), v32 = as_f32(v);
      kv_store(cache, 0, 0, k32.data(), v32.data(), L);
      cache.advance(L);
    }
    KVSpan span{cache.k(0), cache.v(0), L, pos0, f16, cache.phase(), cache.head_stride()};
    const KernelTable& kt = table_arg(isa);
    const int N = static_cast<int>(q.shape(0)), H = static_cast<int>(q.shape(1)), D = static_cast<int>(q.shape(2));
    py::array_t<float> out({N, H, D});
    py::array_t<float> lse({N, H});
    const int KVH = static_cast<int>(k.shape(1));
    if (KVH <= 0 || H % KVH) throw std::invalid_argument("attention: n_heads must be a multiple of kv heads");
    float* po = out.mutable_data();
    float* pl = lse.mutable_data();
    {
      py::gil_scoped_release nogil;
      attention_with(kt, q.data(), N, H, KVH, D, q_pos.data(), span, scale, po, pl, global_pool());
    }
    return py::make_tuple(out, lse);
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_pos"), py::arg("pos0"), py::arg("scale"),
     py::arg("isa") = "", "Causal GQA attention over one KV span (k/v float16 or float32): (out, lse).");

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
      rmsnorm_with(kt, px, pw, eps, N, dim, pyy);
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
      rope(p, N, H, D, pp, theta);
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
      kt.silu_mul(p, pu, n);
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
      kt.add(p, px, n);
    }
    return r;
  }, py::arg("y"), py::arg("x"), py::arg("isa") = "", "y + x (the residual add_inplace kernel).");

  m.def("kv_store", [](KVCache& kv, int layer, Dense<float> k, Dense<float> v) {
    if (k.ndim() != 2 || v.ndim() != 2 || k.shape(1) != kv.kv_dim() || v.shape(0) != k.shape(0) ||
        v.shape(1) != kv.kv_dim())
      throw std::invalid_argument("kv_store: k and v must be (N, kv_dim)");
    if (layer < 0 || layer >= kv.n_layers()) throw std::invalid_argument("kv_store: layer out of range");
    const int N = static_cast<int>(k.shape(0));
    kv_store(kv, layer, kv.length(), k.data(), v.data(), N);
    kv.advance(N);
  }, py::arg("kv"), py::arg("layer"), py::arg("k"), py::arg("v"),
     "Append K and V rows (N, kv_dim) float32 to one layer of a KV cache (the model's store; tests).");
}

// ---- model: the forward pass and its KV caches (native/model.h, native/kv.h) -------------------
struct PyModel {
  std::unique_ptr<Model> model;
  py::list keep;  // the weight arrays the views point into
};

static int cfg_int(const py::dict& c, const char* k) { return py::cast<int>(c[k]); }

static ModelWeights model_weights(const ModelDims& d, const py::dict& ws, py::list& keep) {
  auto entry = [&](const std::string& name) -> py::object {
    if (!ws.contains(name)) throw std::invalid_argument("model: weight '" + name + "' is missing");
    py::object o = ws[py::str(name)];
    keep.append(o);
    return o;
  };
  auto mat = [&](const std::string& name, int rows, int cols) {
    auto t = py::cast<py::tuple>(entry(name));
    if (t.size() != 5) throw std::invalid_argument("model: weight '" + name + "' must be (fmt, data, scales, mins, group)");
    WeightView w = weight_arg(py::cast<std::string>(t[0]), py::cast<py::array>(t[1]), t[2], t[3], py::cast<int>(t[4]), rows);
    if (w.rows != rows || w.cols != cols)
      throw std::invalid_argument("model: weight '" + name + "' is (" + std::to_string(w.rows) + ", " +
                                  std::to_string(w.cols) + "), expected (" + std::to_string(rows) + ", " +
                                  std::to_string(cols) + ")");
    return w;
  };
  auto vec = [&](const std::string& name, int n) {
    auto a = py::cast<py::array>(entry(name));
    if (a.ndim() != 1 || a.shape(0) != n)
      throw std::invalid_argument("model: vector '" + name + "' must have " + std::to_string(n) + " values");
    return static_cast<const float*>(raw(a, name.c_str(), "f", 4));
  };
  ModelWeights w;
  w.tok_embeddings = mat("tok_embeddings", d.vocab, d.hidden);
  for (int i = 0; i < d.n_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    LayerWeights L;
    L.attn_norm = vec(p + "attn_norm", d.hidden);
    L.wq = mat(p + "wq", d.q_dim(), d.hidden);
    L.wk = mat(p + "wk", d.kv_dim(), d.hidden);
    L.wv = mat(p + "wv", d.kv_dim(), d.hidden);
    if (d.qkv_bias) {
      L.bq = vec(p + "bq", d.q_dim());
      L.bk = vec(p + "bk", d.kv_dim());
      L.bv = vec(p + "bv", d.kv_dim());
    }
    if (d.qk_norm) {
      L.q_norm = vec(p + "q_norm", d.head_dim);
      L.k_norm = vec(p + "k_norm", d.head_dim);
    }
    L.wo = mat(p + "wo", d.hidden, d.q_dim());
    L.ffn_norm = vec(p + "ffn_norm", d.hidden);
    L.w_gate = mat(p + "w_gate", d.intermediate, d.hidden);
    L.w_up = mat(p + "w_up", d.intermediate, d.hidden);
    L.w_down = mat(p + "w_down", d.hidden, d.intermediate);
    w.layers.push_back(L);
  }
  w.norm = vec("norm", d.hidden);
  w.output = ws.contains("output") ? mat("output", d.vocab, d.hidden) : w.tok_embeddings;
  return w;
}

static PyModel* make_model(const py::dict& cfg, const py::dict& weights, int max_tokens) {
  ModelDims d;
  d.vocab = cfg_int(cfg, "vocab_size");
  d.hidden = cfg_int(cfg, "hidden_size");
  d.intermediate = cfg_int(cfg, "intermediate_size");
  d.n_layers = cfg_int(cfg, "num_layers");
  d.n_heads = cfg_int(cfg, "num_heads");
  d.n_kv_heads = cfg_int(cfg, "num_kv_heads");
  d.head_dim = cfg_int(cfg, "head_dim");
  d.rope_theta = py::cast<float>(cfg["rope_theta"]);
  d.norm_eps = py::cast<float>(cfg["rms_norm_eps"]);
  d.qkv_bias = py::cast<bool>(cfg["qkv_bias"]);
  d.qk_norm = py::cast<bool>(cfg["qk_norm"]);
  auto* pm = new PyModel();
  try {
    pm->model = std::make_unique<Model>(d, model_weights(d, weights, pm->keep), max_tokens);
  } catch (...) {
    delete pm;
    throw;
  }
  return pm;
}

static py::array_t<float> model_forward(PyModel& self, Dense<std::int32_t> tokens, const py::list& seqs,
                                        Dense<std::int32_t> logit_rows, const py::object& dump) {
  const ModelDims& d = self.model->dims();
  std::vector<SeqRef> refs;
  for (const py::handle h : seqs) {
    auto t = py::cast<py::tuple>(h);
    if (t.size() != 3) throw std::invalid_argument("forward: each sequence is (prefix | None, kv, n_tokens)");
    refs.push_back(SeqRef{t[0].is_none() ? nullptr : py::cast<KVCache*>(t[0]), py::cast<KVCache*>(t[1]),
                          py::cast<int>(t[2])});
  }
  const int N = static_cast<int>(tokens.size()), M = static_cast<int>(logit_rows.size());
  int total = 0;
  for (const SeqRef& r : refs) total += r.n_tokens;
  if (total != N) throw std::invalid_argument("forward: the sequences' n_tokens do not add up to len(tokens)");
  float* pdump = nullptr;
  if (!dump.is_none()) {
    auto a = py::cast<py::array>(dump);
    if (a.ndim() != 3 || a.shape(0) != d.n_layers || a.shape(1) != N || a.shape(2) != d.hidden || !a.writeable())
      throw std::invalid_argument("forward: dump must be a writable float32 (n_layers, N, hidden) array");
    pdump = static_cast<float*>(const_cast<void*>(raw(a, "dump", "f", 4)));
  }
  py::array_t<float> logits({static_cast<py::ssize_t>(M), static_cast<py::ssize_t>(d.vocab)});
  const std::int32_t* pt = tokens.data();
  const std::int32_t* pr = logit_rows.data();
  float* pl = logits.mutable_data();
  {
    py::gil_scoped_release nogil;
    self.model->forward(pt, refs.data(), static_cast<int>(refs.size()), pr, M, pl, pdump);
  }
  return logits;
}

static py::bytes kv_export(const KVCache& kv) {
  std::string buf(kv.used_bytes(), '\0');
  {
    py::gil_scoped_release nogil;
    kv.export_to(buf.data());
  }
  return py::bytes(buf);
}

static void kv_import(KVCache& kv, const py::buffer& b, int length) {
  py::buffer_info info = b.request();
  if (info.ndim != 1 && !(info.strides.empty() || info.itemsize == info.strides.back()))
    throw std::invalid_argument("KV import: buffer must be contiguous");
  const auto bytes = static_cast<std::size_t>(info.size * info.itemsize);
  py::gil_scoped_release nogil;
  kv.import_from(info.ptr, bytes, length);
}

static void bind_model(py::module_& m) {
  py::class_<KVCache, std::unique_ptr<KVCache>>(m, "KV", "KV cache rows of every layer (float16 or float32).")
      .def(py::init([](int n_layers, int n_kv_heads, int head_dim, int capacity, const std::string& dtype, int start,
                       bool any_start) {
             if (dtype != "f16" && dtype != "f32") throw std::invalid_argument("KV dtype must be 'f16' or 'f32'");
             if (start < 0) throw std::invalid_argument("KV start must be >= 0");
             // Slots for the largest phase, then the real one: reset() can then move row 0 anywhere.
             // An arena slot (any_start) also keeps to small pages: see KVCache's huge_pages.
             auto kv = std::make_unique<KVCache>(n_layers, n_kv_heads, head_dim, capacity, dtype == "f16",
                                                 any_start ? kKVTile - 1 : start % kKVTile, !any_start);
             if (any_start) kv->reset(start % kKVTile);
             return kv;
           }),
           py::arg("n_layers"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("capacity"),
           py::arg("dtype") = "f16", py::arg("start") = 0, py::arg("any_start") = false,
           "`start`: the absolute position of row 0 (the length of the prefix the rows follow). `any_start`:\n"
           "room to be reset() to any start later (up to 31 more slots) and small pages only: a KV arena slot.")
      .def_property_readonly("n_layers", &KVCache::n_layers)
      .def_property_readonly("kv_dim", &KVCache::kv_dim)
      .def_property_readonly("n_kv_heads", &KVCache::n_kv_heads)
      .def_property_readonly("head_dim", &KVCache::head_dim)
      .def_property_readonly("phase", &KVCache::phase, "start % 32: where row 0 sits in its K tile.")
      .def_property_readonly("capacity", &KVCache::capacity)
      .def_property_readonly("length", &KVCache::length)
      .def_property_readonly("dtype", [](const KVCache& kv) { return std::string(kv.f16() ? "f16" : "f32"); })
      .def_property_readonly("nbytes", &KVCache::nbytes, "Bytes allocated (capacity rows).")
      .def_property_readonly("used_bytes", &KVCache::used_bytes, "Bytes of the valid rows (the export size).")
      .def("truncate", &KVCache::truncate, py::arg("length"), "Forget rows from `length` on.")
      .def("reserve", &KVCache::reserve, py::arg("capacity"), "Grow to `capacity` rows, keeping the valid ones.")
      .def("reset", [](KVCache& kv, int start) {
             if (start < 0) throw std::invalid_argument("KV start must be >= 0");
             kv.reset(start % kKVTile);
           }, py::arg("start") = 0,
           "Empty it for a new sequence whose row 0 is at absolute position `start`, keeping the memory.")
      .def("copy", [](const KVCache& kv, int capacity) { return kv.copy(capacity < 0 ? kv.length() : capacity); },
           py::arg("capacity") = -1, "A copy of the valid rows with room for `capacity` rows (default: exactly them).")
      .def("append", &KVCache::append, py::arg("other"), "Append another cache's valid rows after this one's.")
      .def("export_bytes", &kv_export, "The valid rows as bytes: per layer, K then V, each kv head's rows in turn.")
      .def("import_bytes", &kv_import, py::arg("data"), py::arg("length"),
           "Replace the contents with `length` rows in export_bytes() layout.")
      .def("layer_f32", [](const KVCache& kv, int layer) {
             py::array_t<float> k({kv.length(), kv.kv_dim()}), v({kv.length(), kv.kv_dim()});
             kv.rows_f32(layer, 0, k.mutable_data());
             kv.rows_f32(layer, 1, v.mutable_data());
             return py::make_tuple(k, v);
           }, py::arg("layer"), "(K, V) of one layer's valid rows as float32 (length, kv_dim).");

  py::class_<PyModel>(m, "Model", "The forward pass over weights in runtime layout.")
      .def(py::init(&make_model), py::arg("config"), py::arg("weights"), py::arg("max_tokens"))
      .def_property_readonly("max_tokens", [](const PyModel& p) { return p.model->max_tokens(); })
      .def("forward", &model_forward, py::arg("tokens"), py::arg("seqs"), py::arg("logit_rows"),
           py::arg("dump") = py::none(),
           "Run token rows of sequences [(prefix | None, kv, n_tokens)]; logits (len(logit_rows), vocab).");
}

PYBIND11_MODULE(_native, m) {
  m.doc() = "seqshare native CPU kernels";
  m.attr("__version__") = SEQSHARE_VERSION;
  bind_kernels(m);
  bind_model(m);

  m.def("cpu_features", [] {
    const CpuFeatures& c = cpu_features();
    py::dict d;
    d["avx2"] = c.avx2; d["fma"] = c.fma; d["f16c"] = c.f16c;
    d["avx512f"] = c.avx512f; d["avx512bw"] = c.avx512bw; d["avx512vl"] = c.avx512vl;
    d["avx512dq"] = c.avx512dq; d["avx512vnni"] = c.avx512vnni; d["avx512bf16"] = c.avx512bf16;
    d["avxvnni"] = c.avxvnni;
    d["asimd"] = c.asimd; d["asimddp"] = c.asimddp; d["i8mm"] = c.i8mm;
    return d;
  }, "CPU features seen at start-up.");
  m.def("best_isa", [] { return std::string(isa_name(best_isa())); },
        "The best kernel variant this CPU can run (capped by SEQSHARE_ISA).");
  m.def("runnable_isas", [] {
    py::list out;
    for (int i = 0; i < kIsaCount; ++i)
      if (isa_selectable(static_cast<Isa>(i))) out.append(isa_name(static_cast<Isa>(i)));
    return out;
  }, "The kernel variants this CPU runs, lowest first (capped by SEQSHARE_ISA).");
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); },
        "The kernel variant in force.");
  m.def("set_isa", [](const std::string& name) { set_isa(isa_from_name(name)); }, py::arg("isa"),
        "Select a kernel variant (scalar, avx2, avxvnni, avx512, neon, dotprod, i8mm); ValueError if this CPU "
        "cannot run it.");

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

  // ---- debug: test hooks, never called in normal operation ------------------------------------
  // debug_sleep_ms stands in for a native call that hangs: it releases the GIL and blocks, so the
  // worker's other threads keep running while its main thread makes no progress (the systemd
  // watchdog test relies on this; the worker calls it only under SEQSHARE_DEBUG_HANG_MS).
  m.def("debug_sleep_ms", [](int ms) {
    if (ms < 0) throw std::invalid_argument("debug_sleep_ms: ms must be >= 0");
    py::gil_scoped_release nogil;
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  }, py::arg("ms"), "Debug: block for ms milliseconds with the GIL released (simulates a hung call).");
  // ---- end debug --------------------------------------------------------------------------------
}
