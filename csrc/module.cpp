// The dit_fast._C extension module: one bind_<family>(m) call per op family (csrc/bind_<family>.cpp).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_adaln(py::module_& m);
void bind_rope(py::module_& m);
void bind_patchify(py::module_& m);
void bind_galore(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "dit_fast CUDA kernels (torch-free): raw pointers, sizes, dtype codes and stream handles";
  bind_adaln(m);
  bind_rope(m);
  bind_patchify(m);
  bind_galore(m);
}
