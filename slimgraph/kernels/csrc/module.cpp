// The Python module of slimgraph.kernels.native: one entry per kernel.

#include <torch/extension.h>

#include "common.h"

// ops.cpp: the dispatcher's CPU kernels of the slimgraph:: linear ops.
void register_cpu_op(const std::string& name, py::function body, std::vector<at::Tensor> tables);

bool built_with_avx2() {
#ifdef __AVX2__
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "y = x @ (qweight * scales[:, None]).T + bias",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("bias") = py::none());
  m.def("int4_linear", &int4_linear,
        "y = x @ ((q - zeros) * scales).T + bias, 4-bit codes packed two per byte",
        py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("zeros") = py::none(),
        py::arg("bias") = py::none(), py::arg("group_size") = 128);
  m.def("lut4_linear", &lut4_linear,
        "y = x @ (lut[codes] * scales).T + bias, 4-bit codes packed two per byte", py::arg("x"),
        py::arg("packed"), py::arg("lut"), py::arg("scales"), py::arg("bias"),
        py::arg("group_size"));
  m.def("lut8_linear", &lut8_linear,
        "y = x @ (lut[codes] * scales).T + bias, one byte per 1 or 2 weights", py::arg("x"),
        py::arg("codes"), py::arg("lut"), py::arg("scales"), py::arg("bias"),
        py::arg("group_size"));
  m.def("hadamard_rotate", &hadamard_rotate,
        "H_g (signs * x) / sqrt(g) for each group of g = signs.numel() entries", py::arg("x"),
        py::arg("signs"));
  m.def("int8_dynamic_linear", &int8_dynamic_linear,
        "y = (round(x / s) @ qweight.T) * s * weight_scales + bias, s = max|x row| / 127",
        py::arg("x"), py::arg("qweight"), py::arg("weight_scales"), py::arg("bias"));
  m.def("register_cpu_op", &register_cpu_op,
        "make this extension the CPU kernel of op slimgraph::<name>, falling back to body",
        py::arg("name"), py::arg("body"), py::arg("tables"));
  m.def("built_with_avx2", &built_with_avx2, "whether this build uses the AVX2/FMA inner loops");
}
