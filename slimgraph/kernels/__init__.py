"""Rewritten layers as ``torch.library`` custom ops over packed weight buffers.

Each format lives in one module with everything about it side by side: how a
weight is packed, the torch reference of its linear, the fake (meta)
implementation export and compile need, and its fast CPU path.
"""

from slimgraph.kernels import conv, fp4, fp8, higgs, int4, int8, nf4, w8a8  # noqa: F401 - registers the ops
from slimgraph.kernels.formats import FORMATS, PackedLinear, QuantFormat, register_format

__all__ = ["FORMATS", "PackedLinear", "QuantFormat", "register_format"]
