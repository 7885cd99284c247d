// pybind11 layer of GaLoreAdamW's Adam step (csrc/galore.cu): device pointers as integers (0 for
// absent), sizes, dtype codes (csrc/common.h), a state code (csrc/galore.h) and a cudaStream_t as an
// integer. std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "galore.h"

namespace py = pybind11;

void bind_galore(py::module_& m) {
  m.def(
      "galore_adam_step",
      [](uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t m_absmax, uintptr_t v_absmax,
         uintptr_t n_out, uintptr_t param, int64_t numel, double beta1, double beta2, double eps, double alpha,
         double pre_decay, double post_decay, int grad_dtype, int state, int param_dtype, uintptr_t stream) {
        dit_fast::GaloreAdamParams p{reinterpret_cast<const void*>(grad), reinterpret_cast<void*>(exp_avg),
                                     reinterpret_cast<void*>(exp_avg_sq), reinterpret_cast<float*>(m_absmax),
                                     reinterpret_cast<float*>(v_absmax), reinterpret_cast<float*>(n_out),
                                     reinterpret_cast<void*>(param), numel,
                                     static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps),
                                     static_cast<float>(alpha), static_cast<float>(pre_decay),
                                     static_cast<float>(post_decay)};
        dit_fast::galore_adam_step(p, grad_dtype, state, param_dtype, reinterpret_cast<cudaStream_t>(stream));
      },
      "Adam step on fp32/bf16 or 8-bit blockwise moments (see csrc/galore.h); writes N to n_out, or "
      "updates param in place",
      py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("m_absmax"), py::arg("v_absmax"),
      py::arg("n_out"), py::arg("param"), py::arg("numel"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
      py::arg("alpha"), py::arg("pre_decay"), py::arg("post_decay"), py::arg("grad_dtype"), py::arg("state"),
      py::arg("param_dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.attr("GALORE_QBLOCK") = dit_fast::kGaloreQBlock;
}
