// The Python module `seqshare._native`: the engine's API (Model, KV, threads, kernel levels). Arrays
// are typed and dense at the signature, checked, then handed to the core as raw pointers;
// std::invalid_argument surfaces as ValueError. The kernel entry points for tests and benchmarks are
// in binding_kernels.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <chrono>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>

#include "binding_args.h"
#include "cpu.h"
#include "kernels.h"
#include "kv.h"
#include "model.h"
#include "ops_impl.h"
#include "threadpool.h"

namespace py = pybind11;
using namespace seqshare;
using namespace seqshare::py_args;

// ---- model: the forward pass and its KV caches (native/model.h, native/kv.h) -------------------
struct PyModel {
  std::unique_ptr<Model> model;
  py::list keep;  // the weight arrays the views point into
};

static int cfg_int(const py::dict& c, const char* k) { return py::cast<int>(c[k]); }

// The names are the contract with bundle/spec.py's tensor_names(): a name missing here or there is an
// error, never a silently unused tensor.
static ModelWeights model_weights(const ModelDims& d, const py::dict& ws, py::list& keep) {
  std::set<std::string> used;
  auto entry = [&](const std::string& name) -> py::object {
    if (!ws.contains(name)) throw std::invalid_argument("model: weight '" + name + "' is missing");
    py::object o = ws[py::str(name)];
    keep.append(o);
    used.insert(name);
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
  for (const auto& kv : ws) {
    const auto name = py::cast<std::string>(kv.first);
    if (!used.count(name)) throw std::invalid_argument("model: weight '" + name + "' is not one this architecture has");
  }
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

// Written straight into the bytes object (nothing else holds it yet): a document's KV is 100+ MB,
// and a std::string in between cost two more passes over it.
static py::bytes kv_export(const KVCache& kv) {
  auto out = py::reinterpret_steal<py::bytes>(PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(kv.used_bytes())));
  if (!out) throw py::error_already_set();
  char* dst = PyBytes_AS_STRING(out.ptr());
  {
    py::gil_scoped_release nogil;
    kv.export_to(dst);
  }
  return out;
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
                       bool slot, const py::object& pairs) {
             if (dtype != "f16" && dtype != "f32") throw std::invalid_argument("KV dtype must be 'f16' or 'f32'");
             if (start < 0) throw std::invalid_argument("KV start must be >= 0");
             const bool f16 = dtype == "f16";
             return std::make_unique<KVCache>(n_layers, n_kv_heads, head_dim, capacity, f16, start % kKVTile, slot,
                                              pairs.is_none() ? kv_keeps_pairs(f16, head_dim) : pairs.cast<bool>());
           }),
           py::arg("n_layers"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("capacity"),
           py::arg("dtype") = "f16", py::arg("start") = 0, py::arg("slot") = false, py::arg("pairs") = py::none(),
           "`start`: the absolute position of row 0 (the length of the prefix the rows follow). `slot`: a KV\n"
           "arena slot, reset() for sequence after sequence (room for any start, small pages only). `pairs`:\n"
           "keep the rows as BF16 pair tiles too (twice the memory; default: where the attention reads them).")
      .def_property_readonly("n_layers", &KVCache::n_layers)
      .def_property_readonly("kv_dim", &KVCache::kv_dim)
      .def_property_readonly("n_kv_heads", &KVCache::n_kv_heads)
      .def_property_readonly("head_dim", &KVCache::head_dim)
      .def_property_readonly("phase", &KVCache::phase, "start % 32: where row 0 sits in its K tile.")
      .def_property_readonly("capacity", &KVCache::capacity)
      .def_property_readonly("length", &KVCache::length)
      .def_property_readonly("dtype", [](const KVCache& kv) { return std::string(kv.f16() ? "f16" : "f32"); })
      .def_property_readonly("nbytes", &KVCache::nbytes, "Bytes allocated (capacity rows, pair tiles included).")
      .def_property_readonly("pairs", [](const KVCache& kv) { return kv.pairs(0) != nullptr; },
                             "Whether it keeps BF16 pair tiles for the avx512 and amx attention.")
      .def_property_readonly("pair_rows",
                             [](const KVCache& kv) {
                               py::list rows;
                               for (int l = 0; kv.pairs(0) && l < kv.n_layers(); ++l)
                                 rows.append(std::max(0, kv.paired(l) * kKVTile - kv.phase()));
                               return rows;
                             },
                             "Per layer, the rows whose pair tiles are current (the attention converts the "
                             "rest's whole tiles at its next call); empty without pairs.")
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
  m.def("set_threads", [](int n) { set_global_threads(n); }, py::arg("n"),
        "Resize the global thread pool (0 = all hardware threads).");
  m.def("get_threads", [] { return global_pool().size(); }, "Size of the global thread pool.");
  bind_model(m);
  bind_kernels(m);

  m.def("cpu_features", [] {
    const CpuFeatures& c = cpu_features();
    py::dict d;
    d["avx2"] = c.avx2; d["fma"] = c.fma; d["f16c"] = c.f16c;
    d["avx512f"] = c.avx512f; d["avx512bw"] = c.avx512bw; d["avx512vl"] = c.avx512vl;
    d["avx512dq"] = c.avx512dq; d["avx512vnni"] = c.avx512vnni; d["avx512bf16"] = c.avx512bf16;
    d["amx_int8"] = c.amx_int8;
    d["amx_bf16"] = c.amx_bf16;
    d["avxvnni"] = c.avxvnni;
    d["asimd"] = c.asimd; d["asimddp"] = c.asimddp; d["i8mm"] = c.i8mm;
    return d;
  }, "CPU features seen at start-up.");
  m.def("kv_keeps_pairs", [](const std::string& dtype, int head_dim) { return kv_keeps_pairs(dtype == "f16", head_dim); },
        py::arg("dtype"), py::arg("head_dim"),
        "Whether new caches of this dtype and head_dim keep BF16 pair tiles (twice the memory): where the kernel\n"
        "variant in force reads them.");
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
        "Select a kernel variant (scalar, avx2, avxvnni, avx512, amx, neon, dotprod, i8mm); ValueError if this CPU "
        "cannot run it.");

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
