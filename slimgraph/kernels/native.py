"""Native CPU kernels for weight-only quantized linears, compiled on first use.

Batch-1 inference on a CPU is memory bound, so a linear that reads int8 or int4
weights and widens them in registers beats fp32 ``F.linear`` by roughly the ratio
of bytes read (see ``benchmarks/native_gemv.py``). aten's ``_weight_int8pack_mm``
does not: it is 5-20x slower than fp32 on AVX2 machines, hence this module.

``load()`` compiles ``csrc/quant_gemm.cpp`` with the system C++ compiler (AVX2/FMA
inner loops when the CPU has them, scalar loops otherwise) and returns the module,
or ``None`` when it cannot, after one warning. Callers keep a torch reference and
use it when ``load()`` is ``None``::

    native = load()
    if native is not None:
        y = native.int8_linear(x, qweight, scales, bias)
    else:
        y = F.linear(x, qweight.float() * scales[:, None], bias)

Both kernels take float32 ``x`` of any shape ``[..., in]`` and return float32
``[..., out]``; batches of 16 rows and more go through a dequantize-a-tile-then-GEMM
path inside the extension, so there is no batch size the caller must special-case.
They are for inference: the output carries no autograd history.

Set ``SLIMGRAPH_NO_NATIVE=1`` to disable the kernels (``load()`` returns ``None``
silently), e.g. to test the fallback.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch

DISABLE_ENV = "SLIMGRAPH_NO_NATIVE"
SOURCE = Path(__file__).parent / "csrc" / "quant_gemm.cpp"
AVX2_FLAGS = ["-mavx2", "-mfma"]

_module: ModuleType | None = None
_failure: str | None = None


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
            _module = _build()
        except Exception as error:  # any build failure: fall back, never break the caller
            _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[-1:]}"
            warnings.warn(
                f"slimgraph: native quantized kernels unavailable ({_failure}); using the "
                "torch reference, which is slower. Install g++ to enable them.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _module


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


def _require() -> ModuleType:
    module = load()
    if module is None:
        reason = "disabled by SLIMGRAPH_NO_NATIVE=1" if _failure is None else _failure
        raise RuntimeError(
            f"slimgraph native kernels are unavailable ({reason}); "
            "call slimgraph.kernels.native.load() first and use the torch reference when it is None."
        )
    return module


def _build() -> ModuleType:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found ({compiler!r} is not on PATH)")
    from torch.utils import cpp_extension  # imported late: it is slow and only needed here

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    simd = AVX2_FLAGS if _cpu_has_avx2() else []
    return cpp_extension.load(
        name="slimgraph_quant_gemm" if simd else "slimgraph_quant_gemm_scalar",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", *simd, "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _cpu_has_avx2() -> bool:
    """ATen's own dispatch check, which requires both AVX2 and FMA."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
