// Best-fit-decreasing packing of sequence lengths into bins of max_tokens: the C++ twin of
// optsys/data/packing.py::pack_best_fit_decreasing_reference, bin for bin and in the same order.
//
// The rule both follow: longest first (ties: lower index first); each length goes into the open bin with the
// least room that still fits it (ties: the earlier-opened bin), else into a new bin; a bin with no room left
// closes. Bins are returned in the order they opened, each listing its indices in ascending order.
//
// Built lazily by optsys/csrc.py (torch.utils.cpp_extension). It includes only the CPython API: nothing here needs
// ATen, and headers are most of a build (2-core CI machine: a one-function file on torch/extension.h built in ~36 s;
// this file on pybind11 in 25-30 s under load; on Python.h in ~3.5 s).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace {

struct PythonError {};  // thrown when a Python exception is already set: the entry point returns NULL

// An owned reference, released on scope exit (so a C++ exception leaks nothing).
struct Ref {
  PyObject* p;
  explicit Ref(PyObject* p) : p(p) {
    if (!p) throw PythonError{};
  }
  ~Ref() { Py_XDECREF(p); }
  PyObject* release() { return std::exchange(p, nullptr); }
};

using Index = int32_t;  // sequence indices and bin ids: the Python caller keeps n below 2**31

// Smallest set position >= x in [0, size), in a few word scans: level 0 has one bit per position, each level
// above one bit per non-zero word below it.
class NextSet {
 public:
  explicit NextSet(int64_t size) {
    int64_t words = size;
    do {
      words = (words + 63) / 64;
      levels_.emplace_back(words, 0);
    } while (words > 1);
  }
  void set(int64_t x) {
    for (auto& lv : levels_) {
      lv[x >> 6] |= uint64_t{1} << (x & 63);
      x >>= 6;
    }
  }
  void clear(int64_t x) {
    for (auto& lv : levels_) {
      lv[x >> 6] &= ~(uint64_t{1} << (x & 63));
      if (lv[x >> 6]) return;  // the word is still non-zero: levels above keep their bit
      x >>= 6;
    }
  }
  int64_t next(int64_t x) const {  // -1 if no set position >= x
    size_t d = 0;
    while (true) {  // climb until a word has a set bit at or after x
      if ((x >> 6) >= static_cast<int64_t>(levels_[d].size())) return -1;
      uint64_t w = levels_[d][x >> 6] & (~uint64_t{0} << (x & 63));
      if (w) {
        x = (x & ~int64_t{63}) | __builtin_ctzll(w);
        break;
      }
      if (d + 1 == levels_.size()) return -1;
      x = (x >> 6) + 1;
      ++d;
    }
    while (d > 0) {  // descend along the lowest set bits
      --d;
      x = (x << 6) | __builtin_ctzll(levels_[d][x]);
    }
    return x;
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

// Dense: one min-heap of bin ids per remaining room r in [1, max_tokens), and a NextSet over non-empty rooms.
// O(max_tokens) memory, O(1) word scans plus a small heap operation per placement.
void place_dense(const std::vector<int64_t>& sorted_len, int64_t max_tokens, std::vector<Index>& bin_at,
                 Index& num_bins) {
  NextSet nonempty(max_tokens);
  std::vector<std::vector<Index>> bins_with_room(max_tokens);
  const std::greater<Index> min_heap;
  for (size_t k = 0; k < sorted_len.size(); ++k) {
    const int64_t n = sorted_len[k];
    const int64_t r = nonempty.next(n);  // tightest room that fits n
    Index b;
    int64_t left;
    if (r < 0) {
      b = num_bins++;
      left = max_tokens - n;
    } else {
      auto& heap = bins_with_room[r];
      std::pop_heap(heap.begin(), heap.end(), min_heap);  // earliest-opened bin among those with room r
      b = heap.back();
      heap.pop_back();
      if (heap.empty()) nonempty.clear(r);
      left = r - n;
    }
    bin_at[k] = b;
    if (left > 0) {
      auto& heap = bins_with_room[left];
      if (heap.empty()) nonempty.set(left);
      heap.push_back(b);
      std::push_heap(heap.begin(), heap.end(), min_heap);
    }
  }
}

// Sparse: an ordered set of (room, bin id), exactly the reference's sorted list. Any max_tokens, O(log bins).
void place_sparse(const std::vector<int64_t>& sorted_len, int64_t max_tokens, std::vector<Index>& bin_at,
                  Index& num_bins) {
  std::set<std::pair<int64_t, Index>> room;
  for (size_t k = 0; k < sorted_len.size(); ++k) {
    const int64_t n = sorted_len[k];
    auto it = room.lower_bound({n, -1});  // tightest room >= n, lowest bin id among equal rooms
    Index b;
    int64_t left;
    if (it == room.end()) {
      b = num_bins++;
      left = max_tokens - n;
    } else {
      b = it->second;
      left = it->first - n;
      room.erase(it);
    }
    bin_at[k] = b;
    if (left > 0) room.emplace(left, b);
  }
}

// Reads lengths from a list/tuple of ints or a 1-D int64 buffer (numpy; torch tensors via .numpy()).
// Returns the index of the first length outside [1, max_tokens], or -1.
int64_t read_lengths(PyObject* obj, int64_t max_tokens, std::vector<int64_t>& len) {
  if (PyList_Check(obj) || PyTuple_Check(obj)) {
    len.reserve(PySequence_Fast_GET_SIZE(obj));
    // Size and item re-read each step, the item held: a non-int's __index__ may run code that changes the list.
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(obj); ++i) {
      Ref item(Py_NewRef(PySequence_Fast_GET_ITEM(obj, i)));
      const long long n = PyLong_AsLongLong(item.p);  // TypeError for non-integers, OverflowError past int64
      if (n == -1 && PyErr_Occurred()) throw PythonError{};
      len.push_back(n);
      if (n < 1 || n > max_tokens) return i;
    }
    return -1;
  }
  Py_buffer view;
  if (PyObject_GetBuffer(obj, &view, PyBUF_FORMAT | PyBUF_STRIDES) != 0) {
    PyErr_SetString(PyExc_TypeError, "lengths must be a list or tuple of ints, or a 1-D int64 buffer");
    throw PythonError{};
  }
  struct Release {
    Py_buffer* v;
    ~Release() { PyBuffer_Release(v); }
  } release{&view};
  const std::string fmt = view.format ? view.format : "B";
  if (view.ndim != 1 || view.itemsize != 8 || (fmt != "l" && fmt != "q")) {
    PyErr_Format(PyExc_TypeError, "lengths buffer must be 1-D int64, got format '%s' with %d dims", fmt.c_str(),
                 view.ndim);
    throw PythonError{};
  }
  const char* base = static_cast<const char*>(view.buf);
  len.resize(view.shape[0]);
  for (Py_ssize_t i = 0; i < view.shape[0]; ++i) {
    len[i] = *reinterpret_cast<const int64_t*>(base + i * view.strides[0]);
    if (len[i] < 1 || len[i] > max_tokens) return i;
  }
  return -1;
}

// Bins as a list of lists of ints. The cyclic GC is paused while the lists are made: they hold only ints, and
// otherwise a full collection every few hundred thousand new lists makes this step ~3x slower.
PyObject* to_lists(const std::vector<Index>& flat, const std::vector<int64_t>& offsets) {
  struct PauseGC {
    int was_on = PyGC_Disable();
    ~PauseGC() {
      if (was_on) PyGC_Enable();
    }
  } pause;
  const Py_ssize_t num_bins = static_cast<Py_ssize_t>(offsets.size()) - 1;
  Ref out(PyList_New(num_bins));
  for (Py_ssize_t b = 0; b < num_bins; ++b) {
    PyObject* bin = PyList_New(offsets[b + 1] - offsets[b]);
    if (!bin) throw PythonError{};
    PyList_SET_ITEM(out.p, b, bin);  // owned by `out` from here on: an error below frees it with `out`
    for (int64_t k = offsets[b]; k < offsets[b + 1]; ++k) {
      PyObject* i = PyLong_FromLong(flat[k]);
      if (!i) throw PythonError{};
      PyList_SET_ITEM(bin, k - offsets[b], i);
    }
  }
  return out.release();
}

// Sorts and packs with the GIL released; returns the bins as flat indices (ascending within each bin) + offsets.
void pack(const std::vector<int64_t>& len, int64_t max_tokens, bool dense, std::vector<Index>& flat,
          std::vector<int64_t>& offsets) {
  struct NoGIL {
    PyThreadState* state = PyEval_SaveThread();  // other Python threads may run meanwhile
    ~NoGIL() { PyEval_RestoreThread(state); }
  } no_gil;
  const size_t n = len.size();
  // order: longest first, ties by index (a counting sort when dense, a stable sort otherwise). The placement
  // loop reads the lengths in that order from sorted_len, sequentially: gathering len[order[k]] inside the loop
  // made it ~10x slower at 1M lengths (each cache miss stalls the loop's dependent steps).
  std::vector<Index> order(n);
  std::vector<int64_t> sorted_len(n);
  if (dense) {
    std::vector<int64_t> start(max_tokens + 2, 0);  // start[max_tokens - v + 1] counts length v
    for (int64_t v : len) ++start[max_tokens - v + 1];
    std::partial_sum(start.begin(), start.end(), start.begin());
    for (int64_t v = max_tokens; v >= 1; --v)  // start[max_tokens - v] .. start[max_tokens - v + 1]: length v
      std::fill(sorted_len.begin() + start[max_tokens - v], sorted_len.begin() + start[max_tokens - v + 1], v);
    for (size_t i = 0; i < n; ++i) order[start[max_tokens - len[i]]++] = static_cast<Index>(i);
  } else {
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return len[a] > len[b]; });
    for (size_t k = 0; k < n; ++k) sorted_len[k] = len[order[k]];
  }
  std::vector<Index> bin_at(n);  // bin of the k-th sequence in `order`
  Index num_bins = 0;
  if (dense)
    place_dense(sorted_len, max_tokens, bin_at, num_bins);
  else
    place_sparse(sorted_len, max_tokens, bin_at, num_bins);

  // Bucket indices by bin, scanning indices in ascending order: each bin's slice comes out sorted.
  std::vector<Index> bin_of(n);
  for (size_t k = 0; k < n; ++k) bin_of[order[k]] = bin_at[k];
  offsets.assign(static_cast<size_t>(num_bins) + 1, 0);
  for (Index b : bin_of) ++offsets[b + 1];
  std::partial_sum(offsets.begin(), offsets.end(), offsets.begin());
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  flat.resize(n);
  for (size_t i = 0; i < n; ++i) flat[fill[bin_of[i]]++] = static_cast<Index>(i);
}

// pack_bfd(lengths, max_tokens, structure="auto", lists=True) -> (bins, -1), or (None, i) when length i is
// outside [1, max_tokens] (the Python caller raises the shared error). bins: a list of lists of ints, or with
// lists=False (flat, offsets) as bytearrays of int32 indices and int64 offsets (bin b is flat[offsets[b]:
// offsets[b+1]]; torch.frombuffer reads them). structure: "dense", "sparse" or "auto" (dense when its per-room
// arrays cost no more than the per-sequence ones).
PyObject* pack_bfd(PyObject*, PyObject* args) {
  PyObject* lengths;
  long long max_tokens;
  const char* structure_arg = "auto";
  int lists = 1;
  if (!PyArg_ParseTuple(args, "OL|sp:pack_bfd", &lengths, &max_tokens, &structure_arg, &lists)) return nullptr;
  const std::string structure = structure_arg;
  if (structure != "auto" && structure != "dense" && structure != "sparse") {
    PyErr_Format(PyExc_ValueError, "structure must be 'auto', 'dense' or 'sparse', got '%s'", structure_arg);
    return nullptr;
  }
  try {
    std::vector<int64_t> len;
    const int64_t bad = read_lengths(lengths, max_tokens, len);
    if (bad >= 0) return Py_BuildValue("(OL)", Py_None, static_cast<long long>(bad));
    const size_t n = len.size();
    if (n > static_cast<size_t>(INT32_MAX)) {
      PyErr_SetString(PyExc_ValueError, "the C++ packer takes fewer than 2**31 lengths");
      return nullptr;
    }
    const bool dense = structure == "dense" ||
                       (structure == "auto" && max_tokens <= std::max<int64_t>(int64_t{1} << 16, n));
    std::vector<Index> flat;
    std::vector<int64_t> offsets{0};
    if (n > 0) pack(len, max_tokens, dense, flat, offsets);
    if (!lists) {
      Ref flat_bytes(PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(flat.data()),
                                                   static_cast<Py_ssize_t>(flat.size() * sizeof(Index))));
      Ref offset_bytes(PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(offsets.data()),
                                                     static_cast<Py_ssize_t>(offsets.size() * sizeof(int64_t))));
      return Py_BuildValue("((OO)i)", flat_bytes.p, offset_bytes.p, -1);
    }
    Ref bins(to_lists(flat, offsets));
    return Py_BuildValue("(Oi)", bins.p, -1);
  } catch (const PythonError&) {
    return nullptr;
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"pack_bfd", pack_bfd, METH_VARARGS,
     "pack_bfd(lengths, max_tokens, structure='auto', lists=True) -> (bins, -1), or (None, i) when length i is "
     "outside [1, max_tokens]. bins: a list of lists, or (flat int32, offsets int64) bytearrays if not lists."},
    {nullptr, nullptr, 0, nullptr}};

#define OPTSYS_STR_(x) #x
#define OPTSYS_STR(x) OPTSYS_STR_(x)
#define OPTSYS_CAT_(a, b) a##b
#define OPTSYS_CAT(a, b) OPTSYS_CAT_(a, b)

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, OPTSYS_STR(TORCH_EXTENSION_NAME),
                          "Best-fit-decreasing packing (csrc/packing.cpp), the twin of optsys.data.packing's reference.",
                          -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

// torch.utils.cpp_extension.load defines TORCH_EXTENSION_NAME (the module name it imports).
PyMODINIT_FUNC OPTSYS_CAT(PyInit_, TORCH_EXTENSION_NAME)() { return PyModule_Create(&module_def); }
