"""Shape and dtype propagation with fake tensors.

Every node gets ``meta["val"]``: a ``FakeTensor`` (or a tuple of them, or a
SymInt) with the node's shape, dtype and strides, computed without touching
real data. Graphs from ``torch.export`` and Dynamo already carry fake values on
their placeholders; we reuse their fake mode, so symbolic sizes stay symbolic.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._pytree import tree_map_only

from slimgraph.errors import VerificationError, describe_node
from slimgraph.ir.nodes import has_value, node_value


def propagate_shapes(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """Recompute ``meta["val"]`` for every node of ``gm`` and return ``{node: val}``.

    Raises ``VerificationError`` naming the node whose fake execution failed.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [node_value(p) for p in placeholders]
    # ``None`` is a real value (an optional input left out); only a missing entry is missing.
    missing = [p.name for p in placeholders if not has_value(p)]
    if missing:
        raise VerificationError(
            f"cannot propagate shapes: placeholders {missing} have no example value; "
            "capture the graph with slimgraph.ir.capture(model, example_inputs)"
        )
    mode = detect_fake_mode(inputs) or FakeTensorMode(shape_env=ShapeEnv())
    return _FakePropagation(gm, mode).propagate(inputs)


class _FakePropagation(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode):
        super().__init__(gm, garbage_collect_values=False)
        self.mode = mode
        self.fakes: dict[int, torch.Tensor] = {}
        self.values: dict[fx.Node, Any] = {}

    def propagate(self, inputs: list[Any]) -> dict[fx.Node, Any]:
        allowed = self.mode.allow_non_fake_inputs
        self.mode.allow_non_fake_inputs = True  # call_module nodes read real parameters
        try:
            with self.mode:
                self.run(*inputs)
        finally:
            self.mode.allow_non_fake_inputs = allowed
        return self.values

    def run_node(self, node: fx.Node) -> Any:
        try:
            value = super().run_node(node)
        except Exception as error:
            raise VerificationError(f"shape propagation failed at {describe_node(node)}: {error}") from error
        if node.op != "output":
            node.meta["val"] = value
            self.values[node] = value
        return value

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return tree_map_only(torch.Tensor, self._fake, value)

    def _fake(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, torch._subclasses.FakeTensor):
            return tensor
        key = id(tensor)
        if key not in self.fakes:
            self.fakes[key] = self.mode.from_tensor(tensor, static_shapes=True)
        return self.fakes[key]
