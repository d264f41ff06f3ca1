"""Native CPU kernels for quantized linears and their helpers, compiled on first use.

Batch-1 inference on a CPU is memory bound, so a linear that reads int8 or 4-bit
weights and widens them in registers beats fp32 ``F.linear`` by roughly the ratio
of bytes read (see ``benchmarks/native_gemv.py``). aten's ``_weight_int8pack_mm``
does not: it is 5-20x slower than fp32 on AVX2 machines, hence this module.

``load()`` compiles ``csrc/*.cpp`` with the system C++ compiler (AVX2/FMA
inner loops when the CPU has them, scalar loops otherwise) and returns the module,
or ``None`` when it cannot, after one warning. Callers keep a torch reference and
use it when ``load()`` is ``None``::

    native = load()
    if native is not None:
        y = native.int8_linear(x, qweight, scales, bias)
    else:
        y = F.linear(x, qweight.float() * scales[:, None], bias)

The kernels, each also a function of this module that raises when ``load()`` is ``None``:

* ``int8_linear``: int8 weights, one float32 scale per output row.
* ``int4_linear``: 4-bit integer codes with float16 group scales and uint8 zero points.
* ``lut4_linear``: 4-bit codes into a 16-entry table (NF4, HIGGS p=1, fp4 e2m1), scales
  per group as float32, float16, e8m0 (uint8) or float8_e4m3fn.
* ``lut8_linear``: one byte per weight (fp8) or per pair of weights (HIGGS p=2) into a
  256-entry table, with the same group scales.
* ``int8_dynamic_linear``: W8A8, activations quantized per row on the fly, exact int32 sums.
* ``hadamard_rotate``: the randomised Hadamard rotation HIGGS applies to activations.

Once built, the extension is also the dispatcher's CPU kernel of the ``slimgraph::linear_*``
ops that read these formats (``cpu_kernel``, ``csrc/ops.cpp``): a batch-1 call then costs
~2 µs of dispatch where ``custom_op``'s Python wrapper took ~25 µs. Their AutogradCPU
kernel is C++ as well (torch's not-implemented fallback), so ``torch.no_grad()`` costs
what ``torch.inference_mode()`` does, where ``custom_op``'s Python autograd kernel added
~13 µs a call.

The linears take float32 ``x`` of any shape ``[..., in]`` and return float32
``[..., out]``; batches of 16 rows and more go through a dequantize-a-tile-then-GEMM
path inside the extension, so there is no batch size the caller must special-case.
They are for inference: the output carries no autograd history.

Precision: below 16 rows the kernels multiply integers, never widening a weight to fp32.
``int8_linear`` rounds x per 32 columns to 16 bits, ``round(x * 32767 / max|x|)``: at
most ``max|x| / 65534`` per entry, 2e-5 of the output's norm. ``int4_linear`` and
``lut4_linear`` round x per 32 columns to 8 bits (``round(x * 127 / max|x|)``, as
llama.cpp's Q8_0 and XNNPACK's qd8 activations do; 1.5-1.8x faster than 16 bits) and a
table whose entries are not exact in int8 (NF4, HIGGS; int4 codes and e2m1 are) to
``max|lut| / 254``: 4e-3 to 8e-3 of the output's norm against the float reference,
measured on random layers, a twentieth of the 4-bit rounding itself (0.1-0.2).
``tests/kernels/test_native.py`` asserts both bounds entry by entry. x holding inf or
NaN gives NaN outputs.

Set ``SLIMGRAPH_NO_NATIVE=1`` to disable the kernels (``load()`` returns ``None``
silently), e.g. to test the fallback.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import torch

DISABLE_ENV = "SLIMGRAPH_NO_NATIVE"  # csrc/ops.cpp reads it too
CSRC = Path(__file__).parent / "csrc"
# common.h (scale readers, threading drivers), one file per kernel family, ops.cpp (dispatcher
# registration) and module.cpp (the Python module), compiled as one unit: extension.cpp.
SOURCES = ("extension.cpp",)
# F16C widens float16 scales in one instruction; every x86 CPU with AVX2 has it.
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]

Body = TypeVar("Body", bound=Callable[..., torch.Tensor])
_module: ModuleType | None = None
_failure: str | None = None
# (op name, Python body, tables) of every op with a native CPU kernel; see cpu_kernel.
_cpu_ops: list[tuple[str, Callable[..., torch.Tensor], Callable[[], tuple[torch.Tensor, ...]]]] = []


def load() -> ModuleType | None:
    """The compiled extension, or ``None`` when disabled or it cannot be built.

    The first call compiles (20-40 s; torch caches the build across processes under
    ``TORCH_EXTENSIONS_DIR``); later calls return the cached module. A build failure
    warns once and is remembered.

        >>> native = load()
        >>> native.int8_linear(torch.randn(2, 64), qweight, scales, None).shape
        torch.Size([2, 128])
    """
    global _module, _failure
    if os.environ.get(DISABLE_ENV) == "1":
        return None
    if _module is None and _failure is None:
        try:
            module = _build()
            for name, body, tables in _cpu_ops:
                module.register_cpu_op(name, body, tables())
            _module = module
        except Exception as error:  # any build failure: fall back, never break the caller
            _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[-1:]}"
            warnings.warn(
                f"slimgraph: native quantized kernels unavailable ({_failure}); using the "
                "torch reference, which is slower. Install g++ to enable them.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _module


def cpu_kernel(name: str, tables: Callable[[], tuple[torch.Tensor, ...]] = tuple) -> Callable[[Body], Body]:
    """Give op ``slimgraph::name`` the extension's CPU kernel (``csrc/ops.cpp``) once it loads.

    Goes under ``custom_op``, on the op's Python body, which stays the kernel's fallback
    for every call it does not take natively. ``custom_op`` calls the body through Python
    (~25 µs a call); the dispatcher reaches the C++ kernel in ~2 µs; at batch 1 that was
    an eighth of an 8-layer 4-bit model's time. ``tables()`` returns the constants the C++
    fast path reads (a format's code values); it runs when the kernel is registered::

        @torch.library.custom_op("slimgraph::linear_nf4", mutates_args=())
        @native.cpu_kernel("linear_nf4", lambda: (NF4_CODE,))
        def linear_nf4(x, packed, absmax, absmax_scales, absmax_mean, bias): ...
    """

    def register(body: Body) -> Body:
        _cpu_ops.append((name, body, tables))
        if _module is not None:
            _module.register_cpu_op(name, body, tables())
        return body

    return register


def for_input(x: torch.Tensor) -> ModuleType | None:
    """The kernels when they can take ``x`` (float32 on the CPU), else ``None``: the ops' one dispatch test.

        >>> kernels = for_input(x)
        >>> y = kernels.int8_linear(x, q, s, b) if kernels is not None else reference(x)
    """
    return load() if x.device.type == "cpu" and x.dtype == torch.float32 else None


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T + bias`` with the native kernel.

    ``qweight`` int8 ``[out, in]``, ``scales`` float32 ``[out]``. Raises when the
    kernels are unavailable; check ``load()`` first to pick a fallback.
    """
    return _require().int8_linear(x, qweight, scales, bias)


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """``x @ ((q - zero) * scale).T + bias`` for 4-bit codes packed two per byte.

    ``packed`` uint8 ``[out, in/2]``: column ``2j`` in the low nibble, ``2j+1`` in the
    high one. ``scales`` float16 and ``zeros`` uint8 are ``[out, in/group_size]``;
    ``zeros=None`` means symmetric codes with zero point 8.
    """
    return _require().int4_linear(x, packed, scales, zeros, bias, group_size)


def lut4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    lut: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """``x @ (lut[codes] * scales).T + bias`` for 4-bit codes packed two per byte.

    ``packed`` uint8 ``[out, in/2]`` (column ``2j`` in the low nibble, ``2j+1`` in the
    high one, as for :func:`int4_linear`); ``lut`` float32 ``[16]`` maps a code to its
    value; ``scales`` ``[out, in/group_size]`` is float32, float16, uint8 read as e8m0
    (``2**(s - 127)``, 255 is NaN) or float8_e4m3fn. ``group_size`` is a multiple of 16.
    Weight ``w[o, i] = lut[code(o, i)] * scales[o, i // group_size]``, so NF4 is::

        >>> lut4_linear(x, packed, NF4_CODE, absmax, bias, 64)  # absmax float32 [out, in/64]
    """
    return _require().lut4_linear(x, packed, lut, scales, bias, group_size)


def lut8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    lut: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """``x @ (lut[codes] * scales).T + bias`` with one byte per ``d`` weights.

    ``lut`` float32 ``[256, d]`` with ``d`` 1 or 2; ``codes`` uint8 ``[out, in/d]``;
    ``w[o, d*j + k] = lut[codes[o, j], k] * scales[o, (d*j + k) // group_size]`` with
    ``scales`` as in :func:`lut4_linear`. fp8 weights are ``d = 1`` with the decoded
    float8 table and one scale per row (``group_size = in``); the float8_e4m3fn table
    is recognised and decoded arithmetically, twice as fast as table loads::

        >>> table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        >>> lut8_linear(x, weight_fp8.view(torch.uint8), table[:, None], row_scales[:, None],
        ...             None, x.shape[-1])
    """
    return _require().lut8_linear(x, codes, lut, scales, bias, group_size)


def hadamard_rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``H_g (signs * x_group) / sqrt(g)`` for each group of ``g = signs.numel()`` entries.

    ``signs`` float32 or int8 ``[g]`` of ±1, ``g`` a power of two from 2 to 4096 dividing
    ``x.shape[-1]``; ``H_g`` is the Sylvester-ordered Walsh–Hadamard matrix. Equals
    :func:`slimgraph.kernels.hadamard.rotate` on ``x.reshape(-1, g)`` (bit for bit:
    same butterflies in the same order) in a few microseconds for a 2048-wide row.
    """
    return _require().hadamard_rotate(x, signs)


def int8_dynamic_linear(
    x: torch.Tensor, qweight: torch.Tensor, weight_scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8: ``x`` quantized to int8 per row on the fly, then an exact int32 matmul.

    Per row ``s = max|x| / 127`` (1 for a zero row) and ``xq = round_half_even(x / s)``;
    ``y = (xq @ qweight.T) * s * weight_scales + bias`` with the sum exact in int32.
    ``qweight`` int8 ``[out, in]``, ``weight_scales`` float32 ``[out]``. The torch
    reference, up to the rounding of the final scale multiply::

        >>> s = x.abs().amax(-1, keepdim=True) / 127; s[s == 0] = 1
        >>> xq = torch.round(x / s).clamp(-127, 127)
        >>> (xq.long() @ qweight.long().T) * s * weight_scales + bias
    """
    return _require().int8_dynamic_linear(x, qweight, weight_scales, bias)


def _require() -> ModuleType:
    module = load()
    if module is None:
        reason = "disabled by SLIMGRAPH_NO_NATIVE=1" if _failure is None else _failure
        raise RuntimeError(
            f"slimgraph native kernels are unavailable ({reason}); "
            "call slimgraph.kernels.native.load() first and use the torch reference when it is None."
        )
    return module


def _build(avx2: bool | None = None) -> ModuleType:
    """Compile the extension; ``avx2=None`` follows the CPU, ``False`` forces the scalar
    loops (the tests use it to check the fallback on AVX2 machines)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found ({compiler!r} is not on PATH)")
    from torch.utils import cpp_extension  # imported late: it is slow and only needed here

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    if avx2 is None:
        avx2 = _cpu_has_avx2()
    simd = AVX2_FLAGS if avx2 else []
    return cpp_extension.load(
        name="slimgraph_quant_gemm" if simd else "slimgraph_quant_gemm_scalar",
        sources=[str(CSRC / name) for name in SOURCES],
        extra_cflags=["-O3", *simd, "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _cpu_has_avx2() -> bool:
    """ATen's own dispatch check, which requires both AVX2 and FMA."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
