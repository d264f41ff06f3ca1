"""fuse_activations: an activation spelled out in elementwise ops → its one ATen op.

GPT-2's ``gelu_new`` is eight ops, ``0.5 * x * (1 + tanh(√(2/π) · (x + 0.044715 · x³)))``,
and at batch 1 each op is a dispatcher round trip of about 5 µs: 40 µs a block, as long
as a 4-bit ``Linear(1024, 4096)``. Before and after, for that GELU::

    mul = aten.mul(x, 0.5); pow_1 = aten.pow(x, 3.0); ... tanh = aten.tanh(mul_2); ...
    mul_3 = aten.mul(mul, add_1)            →    gelu = aten.gelu(x, approximate="tanh")

Matches by value, not by spelling, so ``x * x * x`` and ``torch.pow(x, 3)``, ``0.79788456``
and ``math.sqrt(2 / math.pi)``, any operand order and HF's ``FastGELU`` all fuse. Every
elementwise node whose tensor inputs all come from one source ``s`` through elementwise
nodes is evaluated on sample points (float64, ``SAMPLE``) with ``s`` set to them; where
the values equal a known activation of ``s`` (``ACTIVATIONS``) within ``MATCH_RTOL``, the
node becomes that activation of ``s``. Intermediate nodes go with dead-code elimination
unless something else reads them. A sample-point match is not a proof, so the runner's
numeric check against the reference still applies, as after every pass.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from slimgraph.ir.graph_utils import eliminate_dead_code
from slimgraph.ir.nodes import node_value
from slimgraph.passes.manager import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten

# name: (replacement op, its keyword arguments); the op's own float64 values are the reference.
ACTIVATIONS: dict[str, tuple[torch._ops.OpOverload, dict[str, Any]]] = {
    "gelu_tanh": (aten.gelu.default, {"approximate": "tanh"}),
    "gelu": (aten.gelu.default, {}),
    "silu": (aten.silu.default, {}),
    "mish": (aten.mish.default, {}),
}
FUSED_OPS = {op for op, _ in ACTIVATIONS.values()}
# Where the activations above differ from each other and from look-alikes (QuickGELU's
# x·σ(1.702x) is off GELU by 2e-2 at x = -1.7; tanh-GELU off erf-GELU by 2e-4 at x = 2.6).
SAMPLE = torch.tensor([-6.0, -3.1, -1.7, -0.8, -0.3, -0.05, 0.0, 0.07, 0.45, 1.2, 2.6, 5.5],
                      dtype=torch.float64)
MATCH_RTOL = 1e-6  # FastGELU's 0.7978845608 is √(2/π) to 4e-12

# Elementwise functions and methods of symbolic_trace and Dynamo graphs; ATen ops count
# when tagged pointwise (and neither random nor in-place).
TORCH_ELEMENTWISE = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.tanh, torch.erf,
    torch.sigmoid, torch.exp, torch.log, torch.log1p, torch.sqrt, torch.rsqrt, torch.reciprocal,
    torch.nn.functional.softplus,
}
ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "neg", "pow", "tanh", "erf", "sigmoid", "exp", "log",
                       "log1p", "sqrt", "rsqrt", "reciprocal"}


@register_pass
@dataclass(frozen=True)
class FuseActivations(Pass):
    """Replace activations written as chains of elementwise ops by the one ATen op."""

    name: ClassVar[str] = "fuse_activations"
    requires: ClassVar[tuple[str, ...]] = ("shapes",)
    preserves: ClassVar[tuple[str, ...]] = ("shapes", "blocks")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ctx.analysis("shapes")
        references = {name: op(SAMPLE, **kwargs) for name, (op, kwargs) in ACTIVATIONS.items()}
        sources: dict[fx.Node, fx.Node] = {}  # elementwise node → the one node its inputs come from
        values: dict[fx.Node, torch.Tensor] = {}  # its value with the source set to SAMPLE
        counts = dict.fromkeys(ACTIVATIONS, 0)
        for node in list(gm.graph.nodes):
            source = _single_source(node, sources)
            if source is None or (value := _evaluate(node, source, values)) is None:
                continue
            sources[node], values[node] = source, value
            name = _matching_activation(node, source, value, references)
            if name is not None:
                _replace(node, source, *ACTIVATIONS[name])
                counts[name] += 1
        dead_nodes, _ = eliminate_dead_code(gm)
        fused = sum(counts.values())
        notes = [f"fused {n} {name}" for name, n in counts.items() if n]
        notes += [f"dead code: {dead_nodes} nodes"] if dead_nodes else []
        return PassResult(matched=fused, rewritten=fused, notes=notes, stats=dict(counts, dead_nodes=dead_nodes))


def _is_elementwise(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        tags = node.target.tags
        return (torch.Tag.pointwise in tags and torch.Tag.nondeterministic_seeded not in tags
                and not node.target._schema.is_mutable)
    return node.target in TORCH_ELEMENTWISE


def _single_source(node: fx.Node, sources: dict[fx.Node, fx.Node]) -> fx.Node | None:
    """The one node all of ``node``'s tensor inputs come from through elementwise nodes, if any."""
    if not _is_elementwise(node):
        return None
    found = {sources.get(arg, arg) for arg in node.all_input_nodes}
    return found.pop() if len(found) == 1 else None


def _evaluate(node: fx.Node, source: fx.Node, values: dict[fx.Node, torch.Tensor]) -> torch.Tensor | None:
    """``node``'s value on the sample points; ``None`` where it cannot run on a float64 vector."""
    def value_of(arg: fx.Node) -> torch.Tensor:
        return SAMPLE if arg is source else values[arg]

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), value_of)
    try:
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return None
    return out if isinstance(out, torch.Tensor) and out.shape == SAMPLE.shape else None


def _matching_activation(node: fx.Node, source: fx.Node, value: torch.Tensor,
                         references: dict[str, torch.Tensor]) -> str | None:
    if node.target in FUSED_OPS:
        return None  # already the one op
    source_value, node_out = node_value(source), node_value(node)
    if not (isinstance(source_value, torch.Tensor) and isinstance(node_out, torch.Tensor)
            and source_value.is_floating_point() and node_out.dtype == source_value.dtype
            and node_out.shape == source_value.shape):
        return None
    for name, reference in references.items():
        if torch.allclose(value.to(torch.float64), reference, rtol=MATCH_RTOL, atol=MATCH_RTOL):
            return name
    return None


def _replace(node: fx.Node, source: fx.Node, op: torch._ops.OpOverload, kwargs: dict[str, Any]) -> None:
    graph = node.graph
    with graph.inserting_after(node):
        fused = graph.call_function(op, (source,), dict(kwargs))
    fused.meta = dict(node.meta)  # same value, module path and source line as the chain's end
    node.replace_all_uses_with(fused)
