"""The input-size guards of an exported graph, stored as data and rebuilt as a module.

export checks its inputs' sizes in a ``_guards_fn`` submodule whose code is Python, which
a file cannot hold. ``save`` stores what the guards check instead (``guard_inputs``), and
``load`` rebuilds the checks from that data (``rebuild_guards``, ``SavedInputGuards``).
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
import torch.fx as fx
from torch import nn
from torch.export._unlift import GuardsFn

from slimgraph.ir.capture import ExplainedGuards

GuardSpec = dict[str, Any] | None


def is_guards(module: nn.Module) -> bool:
    """Whether ``module`` is export's input guards, or guards a loaded file rebuilt."""
    return isinstance(_unexplained(module), GuardsFn | SavedInputGuards)


def guard_inputs(gm: fx.GraphModule, name: str) -> list[GuardSpec]:
    """The guards of module ``name``, from its call's input shapes and the export range constraints."""
    inner = _unexplained(gm.get_submodule(name))
    if isinstance(inner, SavedInputGuards):
        return inner.inputs
    call = next(iter(gm.graph.find_nodes(op="call_module", target=name)), None)
    ranges = {str(symbol): r for symbol, r in (getattr(gm, "range_constraints", None) or {}).items()}
    inputs = []
    for arg in call.args if call is not None else ():
        value = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        if not isinstance(value, torch.Tensor) or arg.op != "placeholder":
            inputs.append(None)
            continue
        inputs.append({"name": arg.target, "dims": [_guard_dim(size, ranges) for size in value.shape]})
    return inputs


def is_guard_spec(spec: Any) -> bool:
    """Whether ``spec``, read from a file, is one entry that ``guard_inputs`` could have written."""
    return spec is None or (isinstance(spec, dict) and isinstance(spec.get("name"), str)
                            and isinstance(spec.get("dims"), list) and all(_is_dim(d) for d in spec["dims"]))


def rebuild_guards(inputs: list[GuardSpec]) -> nn.Module:
    """The guards module that ``load`` puts where export's was; ``inputs`` are checked specs."""
    first_input = next((spec["name"] for spec in inputs if spec is not None), "x")
    return ExplainedGuards(SavedInputGuards(inputs), first_input)


class SavedInputGuards(nn.Module):
    """export's input-size checks, rebuilt from data: each dimension is a size, a range or free.

    ``inputs`` has one entry per guarded input, ``{"name": "input_ids", "dims": [2, {"symbol":
    "s70", "min": 0, "max": 256}]}`` (``None``: not checked). Inputs that share a symbol
    must have equal sizes there. Failures read like export's: ``Guard failed: x.size()[0] == 2``.
    """

    _is_impure = True  # its checks are the point: dead-code elimination must keep the call

    def __init__(self, inputs: list[GuardSpec]):
        super().__init__()
        self.inputs = inputs

    def forward(self, *args: Any) -> None:
        seen: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for spec, value in zip(self.inputs, args, strict=False):
            if spec is None or not isinstance(value, torch.Tensor):
                continue
            name, dims = spec["name"], spec["dims"]
            _guard(value.dim() == len(dims), f"{name}.dim() == {len(dims)}")
            for index, (dim, size) in enumerate(zip(dims, value.shape, strict=True)):
                where = f"{name}.size()[{index}]"
                if isinstance(dim, int):
                    _guard(size == dim, f"{where} == {dim}")
                elif isinstance(dim, dict):
                    _guard(size >= dim["min"], f"{dim['min']} <= {where}")
                    _guard(dim["max"] is None or size <= dim["max"], f"{where} <= {dim['max']}")
                    symbol = dim["symbol"]
                    _guard(sizes.setdefault(symbol, size) == size, f"{where} == {seen.get(symbol)}")
                    seen.setdefault(symbol, where)


def _guard(condition: bool, text: str) -> None:
    if not condition:
        raise AssertionError(f"Guard failed: {text}")


def _unexplained(module: nn.Module) -> nn.Module:
    """The guards inside capture's ``ExplainedGuards`` wrapper, or ``module`` itself."""
    return module.guards if isinstance(module, ExplainedGuards) else module


def _guard_dim(size: int | torch.SymInt, ranges: dict[str, Any]) -> int | dict[str, Any] | None:
    if isinstance(size, int):
        return size
    expr = size.node.expr
    if not expr.is_Symbol:
        return None  # a derived size (s0 * 2): the graph's own asserts check it
    bounds = ranges.get(str(expr))
    low, high = (bounds.lower, bounds.upper) if bounds is not None else (0, None)
    return {"symbol": str(expr), "min": int(low) if isinstance(low, int | sympy.Integer) else 0,
            "max": int(high) if isinstance(high, int | sympy.Integer) else None}


def _is_dim(dim: Any) -> bool:
    if dim is None or type(dim) is int:
        return True
    return (isinstance(dim, dict) and isinstance(dim.get("symbol"), str) and type(dim.get("min")) is int
            and (dim.get("max") is None or type(dim.get("max")) is int))
