// pybind11 layer of the standalone 3D RoPE kernel (csrc/rope.cu): raw device pointers as integers,
// sizes, strides in elements, a dtype code (csrc/common.h) and a cudaStream_t as an integer.
// std::invalid_argument -> ValueError, std::runtime_error (CUDA errors) -> RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "rope.h"

namespace py = pybind11;

void bind_rope(py::module_& m) {
  m.def(
      "rope_3d",
      [](uintptr_t x, uintptr_t out, uintptr_t inv_freq, int64_t batch, int64_t tokens, int64_t heads,
         int64_t head_dim, int64_t grid_h, int64_t grid_w, int64_t stride_xb, int64_t stride_xs,
         int64_t stride_xh, int64_t pairs_t, int64_t pairs_th, bool inverse, int dtype, uintptr_t stream) {
        dit_fast::RopeParams p{reinterpret_cast<const void*>(x),
                               reinterpret_cast<void*>(out),
                               reinterpret_cast<const float*>(inv_freq),
                               batch, tokens, heads, head_dim, grid_h, grid_w,
                               stride_xb, stride_xs, stride_xh, pairs_t, pairs_th, inverse};
        dit_fast::rope_3d(p, dtype, reinterpret_cast<cudaStream_t>(stream));
      },
      "3D RoPE (see csrc/rope.h): out = x rotated by +angle, or -angle with inverse",
      py::arg("x"), py::arg("out"), py::arg("inv_freq"), py::arg("batch"), py::arg("tokens"), py::arg("heads"),
      py::arg("head_dim"), py::arg("grid_h"), py::arg("grid_w"), py::arg("stride_xb"), py::arg("stride_xs"),
      py::arg("stride_xh"), py::arg("pairs_t"), py::arg("pairs_th"), py::arg("inverse"), py::arg("dtype"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.attr("ROPE_MAX_HEAD_DIM") = dit_fast::kRopeMaxHeadDim;
}
