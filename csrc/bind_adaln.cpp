// pybind11 layer of the adaLN kernels (csrc/adaln.cu): raw device pointers as integers, sizes,
// a dtype code (csrc/common.h) and a cudaStream_t as an integer. A null pointer (0) means "absent"
// and selects the op, as documented in csrc/adaln.h. C++ exceptions become Python errors:
// std::invalid_argument -> ValueError, std::runtime_error (CUDA errors) -> RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "adaln.h"

namespace py = pybind11;

namespace {

template <typename P>
P* ptr(uintptr_t address) {
  return reinterpret_cast<P*>(address);
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace

void bind_adaln(py::module_& m) {
  m.def(
      "adaln_forward",
      [](uintptr_t x, uintptr_t gate, uintptr_t branch, uintptr_t h, uintptr_t shift, uintptr_t scale,
         uintptr_t weight, uintptr_t bias, uintptr_t out, uintptr_t mean, uintptr_t rstd, int64_t rows,
         int64_t tokens, int64_t groups, int64_t channels, double eps, int dtype, uintptr_t stream) {
        dit_fast::AdalnForwardParams p{ptr<const void>(x),     ptr<const void>(gate),  ptr<const void>(branch),
                                       ptr<void>(h),           ptr<const void>(shift), ptr<const void>(scale),
                                       ptr<const void>(weight), ptr<const void>(bias), ptr<void>(out),
                                       ptr<float>(mean),       ptr<float>(rstd),       rows,
                                       tokens,                 groups,                 channels,
                                       static_cast<float>(eps)};
        dit_fast::adaln_forward(p, dtype, as_stream(stream));
      },
      "adaLN forward (see csrc/adaln.h); pointers are device addresses, 0 for absent tensors",
      py::arg("x"), py::arg("gate"), py::arg("branch"), py::arg("h"), py::arg("shift"), py::arg("scale"),
      py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("mean"), py::arg("rstd"), py::arg("rows"),
      py::arg("tokens"), py::arg("groups"), py::arg("channels"), py::arg("eps"), py::arg("dtype"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "adaln_backward",
      [](uintptr_t dout, uintptr_t dh, uintptr_t x, uintptr_t gate, uintptr_t branch, uintptr_t scale,
         uintptr_t weight, uintptr_t bias, uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t dbranch,
         uintptr_t dshift_part, uintptr_t dscale_part, uintptr_t dgate_part, uintptr_t dweight_part,
         uintptr_t dbias_part, int64_t batch, int64_t tokens, int64_t groups, int64_t channels, int64_t chunks,
         int64_t rows_per_chunk, int dtype, uintptr_t stream) {
        dit_fast::AdalnBackwardParams p{ptr<const void>(dout),   ptr<const void>(dh),     ptr<const void>(x),
                                        ptr<const void>(gate),   ptr<const void>(branch), ptr<const void>(scale),
                                        ptr<const void>(weight), ptr<const void>(bias),   ptr<const float>(mean),
                                        ptr<const float>(rstd),  ptr<void>(dx),           ptr<void>(dbranch),
                                        ptr<float>(dshift_part), ptr<float>(dscale_part), ptr<float>(dgate_part),
                                        ptr<float>(dweight_part), ptr<float>(dbias_part), batch,
                                        tokens,                  groups,                  channels,
                                        chunks,                  rows_per_chunk};
        dit_fast::adaln_backward(p, dtype, as_stream(stream));
      },
      "adaLN backward (see csrc/adaln.h); writes dx, dbranch and fp32 partial sums (B * G, chunks, C)",
      py::arg("dout"), py::arg("dh"), py::arg("x"), py::arg("gate"), py::arg("branch"), py::arg("scale"),
      py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dbranch"),
      py::arg("dshift_part"), py::arg("dscale_part"), py::arg("dgate_part"), py::arg("dweight_part"),
      py::arg("dbias_part"), py::arg("batch"), py::arg("tokens"), py::arg("groups"), py::arg("channels"),
      py::arg("chunks"), py::arg("rows_per_chunk"), py::arg("dtype"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());

  m.def("adaln_backward_blocks_per_sm", &dit_fast::adaln_backward_blocks_per_sm,
        "Backward blocks resident per SM of the current device for this C and dtype code",
        py::arg("channels"), py::arg("dtype"));

  m.attr("ADALN_MAX_CHANNELS") = dit_fast::kAdalnMaxChannels;
}
