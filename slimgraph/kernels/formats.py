"""The format registry: what the ``quantize`` pass needs to know about a weight format.

A format packs one ``[out, in]`` float weight into buffers and names the custom op
that computes ``x @ W.T + bias`` from them::

    packed = FORMATS["int8"].pack(weight, group_size=128, symmetric=True)
    y = packed.op(x, *packed.buffers.values(), bias, *packed.params.values())
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PackedLinear:
    """One packed weight: its buffers (graph constants), the op, its static params and its cost."""

    op: Callable[..., torch.Tensor]
    buffers: dict[str, torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)
    bits_per_weight: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values() if t is not None)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.op(x, *self.buffers.values(), bias, *self.params.values())


@dataclass(frozen=True)
class QuantFormat:
    """A registered weight format.

    ``pack(weight, **options)`` returns a ``PackedLinear``; ``dequantize(packed)`` the
    reference ``[out, in]`` float weight it encodes; ``why_not(weight, **options)`` a
    reason the format cannot take this weight (``None`` when it can).
    """

    name: str
    pack: Callable[..., PackedLinear]
    dequantize: Callable[[PackedLinear], torch.Tensor]
    why_not: Callable[..., str | None]


FORMATS: dict[str, QuantFormat] = {}


def register_format(fmt: QuantFormat) -> QuantFormat:
    FORMATS[fmt.name] = fmt
    return fmt
