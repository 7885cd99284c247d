// pybind11 layer of the 3D patchify / unpatchify kernel (csrc/patchify.cu): raw device pointers as
// integers, sizes, video strides in elements, the element size in bytes and a cudaStream_t as an
// integer. std::invalid_argument -> ValueError, std::runtime_error (CUDA errors) -> RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "patchify.h"

namespace py = pybind11;

void bind_patchify(py::module_& m) {
  m.def(
      "patchify_3d",
      [](uintptr_t video, uintptr_t tokens, int64_t batch, int64_t channels, int64_t grid_t, int64_t grid_h,
         int64_t grid_w, int64_t patch_t, int64_t patch_h, int64_t patch_w, int64_t stride_vb, int64_t stride_vc,
         int64_t stride_vt, int64_t stride_vh, int64_t stride_vw, bool channels_last, bool to_tokens,
         int element_size, uintptr_t stream) {
        dit_fast::PatchifyParams p{reinterpret_cast<void*>(video), reinterpret_cast<void*>(tokens),
                                   batch, channels, grid_t, grid_h, grid_w, patch_t, patch_h, patch_w,
                                   stride_vb, stride_vc, stride_vt, stride_vh, stride_vw,
                                   channels_last, to_tokens};
        dit_fast::patchify_3d(p, element_size, reinterpret_cast<cudaStream_t>(stream));
      },
      "3D patchify (to_tokens) or unpatchify (see csrc/patchify.h); tokens contiguous (B, S, K)",
      py::arg("video"), py::arg("tokens"), py::arg("batch"), py::arg("channels"), py::arg("grid_t"),
      py::arg("grid_h"), py::arg("grid_w"), py::arg("patch_t"), py::arg("patch_h"), py::arg("patch_w"),
      py::arg("stride_vb"), py::arg("stride_vc"), py::arg("stride_vt"), py::arg("stride_vh"), py::arg("stride_vw"),
      py::arg("channels_last"), py::arg("to_tokens"), py::arg("element_size"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());

  m.attr("PATCHIFY_MAX_TOKEN_BYTES") = dit_fast::kPatchifyMaxTokenBytes;
}
