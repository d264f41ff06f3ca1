// CPU kernels of the slimgraph:: linear ops, registered with the dispatcher from C++.
//
// A torch.library.custom_op runs its body through Python: about 25 µs a call before
// any kernel work, an eighth of an 8-layer 4-bit model's time at batch 1. Once the
// extension loads, slimgraph.kernels.native registers the boxed kernel below for the
// ops' CPU key (register_cpu_op), which costs about 2 µs. It reads the arguments off
// the dispatcher's stack and takes the native path for float32 x; everything else
// (other dtypes, formats without a kernel of their own, SLIMGRAPH_NO_NATIVE=1 set
// after loading) goes to the op's Python body, so an op behaves as its body does.
//
// custom_op's autograd kernel is Python too: under torch.no_grad() (not inference_mode)
// every call passed through it, ~10 µs. The ops have no derivative, so their AutogradCPU
// kernel is torch's C++ not-implemented fallback: with nothing requiring grad it goes
// straight on to the CPU kernel; otherwise the output's grad_fn raises on backward, as
// custom_op's did. A runtime key's own kernel takes precedence over the Autograd alias
// key custom_op registered, so other devices keep custom_op's.

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <unordered_map>

#include "common.h"

namespace {

using Args = c10::ArrayRef<c10::IValue>;
using Tables = std::vector<at::Tensor>;
// The native result, or nothing when these arguments are for the Python body.
using FastPath = c10::optional<at::Tensor> (*)(Args, const Tables&);

// Argument positions follow the ops' Python signatures (slimgraph/kernels/*.py).
c10::optional<at::Tensor> linear_int8_fast(Args a, const Tables&) {
  return int8_linear(a[0].toTensor(), a[1].toTensor(), a[2].toTensor(),
                     a[3].toOptional<at::Tensor>());
}

c10::optional<at::Tensor> linear_int4_fast(Args a, const Tables&) {
  return int4_linear(a[0].toTensor(), a[1].toTensor(), a[2].toTensor(),
                     a[3].toOptional<at::Tensor>(), a[4].toOptional<at::Tensor>(), a[5].toInt());
}

// tables: the NF4 code. Double-quantized absmaxes (absmax_scales given) are expanded
// by the body.
c10::optional<at::Tensor> linear_nf4_fast(Args a, const Tables& tables) {
  if (!a[3].isNone()) return c10::nullopt;
  const at::Tensor &packed = a[1].toTensor(), &absmax = a[2].toTensor();
  int64_t rows = packed.size(0), blocks = rows ? absmax.numel() / rows : 0;
  TORCH_CHECK(blocks > 0 && blocks * rows == absmax.numel(), "slimgraph linear_nf4: absmax has ",
              absmax.numel(), " entries, not a whole number of blocks per row of ", rows, ".");
  return lut4_linear(a[0].toTensor(), packed, tables[0], absmax.reshape({rows, blocks}),
                     a[5].toOptional<at::Tensor>(), packed.size(1) * 2 / blocks);
}

// tables: the e2m1 values. NV's per-tensor global scale multiplies x: folded into the
// table instead, it would make the entries inexact in the kernel's int8.
c10::optional<at::Tensor> linear_fp4_fast(Args a, const Tables& tables) {
  at::Tensor x = a[3].isNone() ? a[0].toTensor() : a[0].toTensor() * a[3].toTensor();
  return lut4_linear(x, a[1].toTensor(), tables[0], a[2].toTensor(), a[4].toOptional<at::Tensor>(),
                     a[5].toInt());
}

// tables: the 256 decoded bytes of float8_e4m3fn, then of float8_e5m2, each [256, 1].
c10::optional<at::Tensor> linear_fp8_fast(Args a, const Tables& tables) {
  const at::Tensor& qweight = a[1].toTensor();
  if (qweight.scalar_type() != at::kFloat8_e4m3fn && qweight.scalar_type() != at::kFloat8_e5m2)
    return c10::nullopt;
  const at::Tensor& lut = tables[qweight.scalar_type() == at::kFloat8_e4m3fn ? 0 : 1];
  return lut8_linear(a[0].toTensor(), qweight.view(at::kByte), lut, a[2].toTensor().unsqueeze(1),
                     a[3].toOptional<at::Tensor>(), qweight.size(1));
}

// tables: the 4-bit grid [16] (p=1), then the 4-bit pair grid [256, 2] (p=2). Other
// widths are bit-packed and go to the body, which unpacks them.
c10::optional<at::Tensor> linear_higgs_fast(Args a, const Tables& tables) {
  int64_t bits = a[6].toInt(), p = a[7].toInt();
  if (bits != 4 || (p != 1 && p != 2)) return c10::nullopt;
  at::Tensor rotated = hadamard_rotate(a[0].toTensor(), a[3].toTensor());
  auto linear = p == 1 ? lut4_linear : lut8_linear;
  return linear(rotated, a[1].toTensor(), tables[p - 1], a[2].toTensor(),
                a[4].toOptional<at::Tensor>(), a[5].toInt());
}

const std::unordered_map<std::string, FastPath> FAST_PATHS = {
    {"slimgraph::linear_int8", linear_int8_fast}, {"slimgraph::linear_int4", linear_int4_fast},
    {"slimgraph::linear_nf4", linear_nf4_fast},   {"slimgraph::linear_fp4", linear_fp4_fast},
    {"slimgraph::linear_fp8", linear_fp8_fast},   {"slimgraph::linear_higgs", linear_higgs_fast},
};

struct CpuOp {
  FastPath fast;
  Tables tables;
  PyObject* body;  // a strong reference, never released: ops live as long as the process
};

std::unordered_map<std::string, CpuOp>& cpu_ops() {
  static auto* ops = new std::unordered_map<std::string, CpuOp>();  // leaked: see CpuOp::body
  return *ops;
}

at::Tensor call_body(PyObject* body, Args args) {
  py::gil_scoped_acquire gil;
  py::tuple py_args(args.size());
  for (size_t i = 0; i < args.size(); ++i) py_args[i] = torch::jit::toPyObject(args[i]);
  return py::reinterpret_borrow<py::object>(body)(*py_args).cast<at::Tensor>();
}

bool disabled() {
  const char* flag = std::getenv("SLIMGRAPH_NO_NATIVE");  // native.DISABLE_ENV
  return flag != nullptr && std::string(flag) == "1";
}

void run_cpu_op(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const CpuOp& entry = cpu_ops().at(op.schema().name());
  size_t count = op.schema().arguments().size();
  Args args = torch::jit::last(*stack, count);
  c10::optional<at::Tensor> y;
  if (args[0].toTensor().scalar_type() == at::kFloat && !disabled())
    y = entry.fast(args, entry.tables);
  at::Tensor result = y ? *std::move(y) : call_body(entry.body, args);
  torch::jit::drop(*stack, count);
  torch::jit::push(*stack, std::move(result));
}

}  // namespace

// Makes the extension the CPU kernel of op `name` (e.g. "linear_nf4"), with `body` the op's
// Python function (its fallback) and `tables` the constants its fast path reads. Calling it
// again for the same op replaces the body and tables: the dispatcher entry is made once.
void register_cpu_op(const std::string& name, py::function body, std::vector<at::Tensor> tables) {
  std::string qualified = "slimgraph::" + name;
  auto fast = FAST_PATHS.find(qualified);
  TORCH_CHECK(fast != FAST_PATHS.end(), "slimgraph: no native CPU kernel for op ", qualified,
              "; the ones built are linear_int8, int4, nf4, fp4, fp8 and higgs.");
  bool known = cpu_ops().count(qualified) > 0;
  PyObject* previous = known ? cpu_ops()[qualified].body : nullptr;
  cpu_ops()[qualified] = CpuOp{fast->second, std::move(tables), body.inc_ref().ptr()};
  Py_XDECREF(previous);
  if (known) return;
  static auto* library = new torch::Library(torch::Library::IMPL, "slimgraph",
                                            c10::DispatchKey::CPU, __FILE__, __LINE__);
  static auto* autograd = new torch::Library(torch::Library::IMPL, "slimgraph",
                                             c10::DispatchKey::AutogradCPU, __FILE__, __LINE__);
  library->impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&run_cpu_op>());
  autograd->impl(name.c_str(), torch::autograd::autogradNotImplementedFallback());
}
