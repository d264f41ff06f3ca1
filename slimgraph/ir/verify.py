"""Graph verification: lint, shape re-propagation, and an optional numeric check."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from slimgraph.errors import VerificationError
from slimgraph.ir.shapes import propagate_shapes


@dataclass(frozen=True)
class VerifyResult:
    """``output_error`` is the relative L2 error against the reference (``None`` if not checked)."""

    output_error: float | None


def verify(
    gm: fx.GraphModule,
    *,
    example_inputs: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    reference: Any = None,
    tolerance: float | None = None,
    check_shapes: bool = True,
) -> VerifyResult:
    """Check ``gm`` and raise ``VerificationError`` saying what is wrong.

    1. ``graph.lint()``: well-formed, topologically ordered, targets exist.
    2. Shapes re-propagated with fake tensors from the placeholders' values.
    3. If ``reference`` outputs are given, run ``gm`` on the example inputs and
       compare: ``relative_error(outputs, reference) <= tolerance``.

    Example::

        verify(gm, example_inputs=(x,), reference=model(x), tolerance=1e-5)
    """
    try:
        gm.graph.lint()
    except Exception as error:
        raise VerificationError(f"graph lint failed: {error}") from error
    if check_shapes:
        propagate_shapes(gm)
    if reference is None:
        return VerifyResult(None)
    with torch.no_grad():
        outputs = gm(*example_inputs, **(example_kwargs or {}))
    error = relative_error(outputs, reference)
    if tolerance is not None and not error <= tolerance:
        raise VerificationError(
            f"outputs differ from the reference: relative error {error:.3g} > tolerance {tolerance:.3g}"
        )
    return VerifyResult(error)


def relative_error(outputs: Any, reference: Any) -> float:
    """Largest ``‖out − ref‖₂ / ‖ref‖₂`` over the floating-point tensors of two output trees.

    Non-float tensors must match exactly (error ``inf`` otherwise); NaN anywhere makes
    the error NaN, which fails every tolerance; a structure mismatch raises ``VerificationError``.
    """
    got, got_spec = tree_flatten(outputs)
    want, want_spec = tree_flatten(reference)
    if len(got) != len(want):
        raise VerificationError(f"output structure changed: {got_spec} vs reference {want_spec}")
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if not isinstance(b, torch.Tensor):
            continue
        if not isinstance(a, torch.Tensor) or a.shape != b.shape:
            raise VerificationError(
                f"output shape changed: {getattr(a, 'shape', type(a).__name__)} vs reference {tuple(b.shape)}"
            )
        if not b.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(a, b) else float("inf"))
            continue
        a, b = a.detach().double(), b.detach().double()
        error = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()
        if math.isnan(error) or error > worst:  # max() would drop a NaN and let it pass
            worst = error
    return worst
