"""The format registry: what the ``quantize`` pass needs to know about a weight format.

A format is an options dataclass (validated in ``__post_init__``), a function that
packs one ``[out, in]`` float weight into buffers, the reference dequantization,
and the custom op that computes ``x @ W.T + bias`` from the buffers::

    packed = FORMATS["int4"].pack(weight, group_size=32, symmetric=True)
    y = packed(x, bias)                       # the op on the packed buffers
    w_hat = FORMATS["int4"].dequantize(packed)  # what the op multiplies by
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from slimgraph.kernels.gptq import GroupQuantizer


@dataclass
class PackedLinear:
    """One packed weight: its buffers (graph constants), the op, its static params and its cost.

    ``bits_per_weight`` counts everything stored per weight (codes, scales, zeros), so
    ``nbytes * 8 / weight.numel()`` equals it up to rounding.
    """

    op: Callable[..., torch.Tensor]
    buffers: dict[str, torch.Tensor | None]
    params: dict[str, Any] = field(default_factory=dict)
    bits_per_weight: float = 0.0
    format: str = ""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values() if t is not None)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.op(x, *self.buffers.values(), bias, *self.params.values())


@dataclass(frozen=True)
class NoOptions:
    """Options of a format that has none."""


def _takes_any_weight(weight: torch.Tensor, options: Any) -> str | None:
    return None


@dataclass(frozen=True)
class QuantFormat:
    """A registered weight format.

    ``packer(weight, options)`` returns a ``PackedLinear``; ``dequantize(packed)`` the
    reference ``[out, in]`` float weight it encodes; ``rejects(weight, options)`` the
    reason the format cannot take this weight (``None`` when it can). ``options`` is
    the format's frozen options dataclass; its ``__post_init__`` validates values.
    ``group_quantizer(weight, options)``, when given, lets GPTQ choose the codes
    (``slimgraph.kernels.gptq``); formats without one pack with round-to-nearest only.
    """

    name: str
    packer: Callable[[torch.Tensor, Any], PackedLinear]
    dequantize: Callable[[PackedLinear], torch.Tensor]
    options: type = NoOptions
    rejects: Callable[[torch.Tensor, Any], str | None] = _takes_any_weight
    group_quantizer: Callable[[torch.Tensor, Any], GroupQuantizer] | None = None

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.options))

    def make_options(self, **given: Any) -> Any:
        """The options dataclass from keyword values; unknown names raise ``ValueError``.

        >>> FORMATS["int4"].make_options(group_size=32)
        Int4Options(group_size=32, symmetric=False)
        """
        unknown = sorted(set(given) - set(self.option_names))
        if unknown:
            accepted = ", ".join(self.option_names) or "none"
            raise ValueError(f"format '{self.name}' has no option {', '.join(unknown)} (its options: {accepted})")
        return self.options(**given)

    def why_not(self, weight: torch.Tensor, options: Any) -> str | None:
        return self.rejects(weight, options)

    def pack(self, weight: torch.Tensor, options: Any = None, /, **given: Any) -> PackedLinear:
        """Pack ``weight`` with an options instance or keyword options; a rejected weight raises ``ValueError``."""
        options = self.make_options(**given) if options is None else options
        reason = self.rejects(weight, options)
        if reason:
            raise ValueError(f"format '{self.name}' cannot pack a {tuple(weight.shape)} weight: {reason}")
        packed = self.packer(weight.detach(), options)
        packed.format = self.name
        return packed


FORMATS: dict[str, QuantFormat] = {}


def register_format(fmt: QuantFormat) -> QuantFormat:
    FORMATS[fmt.name] = fmt
    return fmt
