"""fold_constants: compute at compile time what does not depend on the inputs.

Matches every call whose inputs are all constants (weights, literals, other
constants): ``weight.t()``, rotary ``cos``/``sin`` tables, causal masks,
``torch.full(...)`` scalars. Rewrites each *frontier* constant (one that a
non-constant node reads) into a ``get_attr`` of a buffer holding its value.

Never folded: random ops, uninitialised ``empty``, in-place ops, anything that
reads an input, values that are expanded views (materialising them would grow
memory; their un-expanded source is folded instead), and values larger than
``max_bytes``. Verified by the runner like every pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from slimgraph.ir.graph_utils import eliminate_dead_code, unique_attribute_name
from slimgraph.ir.nodes import get_attr_value, mutates
from slimgraph.passes.manager import Pass, PassContext, PassResult, register_pass

_NONDETERMINISTIC_NAMES = re.compile(r"(^|_)(rand|randn|randint|randperm|bernoulli|multinomial|normal|"
                                     r"uniform|dropout|empty|poisson|exponential|geometric)(?![a-z])")


@register_pass
@dataclass(frozen=True)
class FoldConstants(Pass):
    """Replace input-independent subgraphs by precomputed buffers."""

    name: ClassVar[str] = "fold_constants"
    preserves: ClassVar[tuple[str, ...]] = ("shapes", "blocks")

    max_bytes: int = 256 * 2**20

    def validate(self) -> None:
        if self.max_bytes <= 0:
            from slimgraph.errors import PipelineError
            raise PipelineError(f"pass 'fold_constants': max_bytes must be positive, got {self.max_bytes}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        values = self._evaluate_constants(gm)
        frontier = [n for n in values if n.op != "get_attr" and any(u not in values for u in n.users)]
        still_read = _storages_read_at_run_time(values)
        buffers: list[tuple[torch.Tensor, str]] = []
        folded = 0
        for node in frontier:
            value = values[node]
            if isinstance(value, torch.Tensor):
                if _storage(value) in still_read:
                    continue  # a view of a weight the graph keeps reading: a buffer would store it twice
                self._replace_with_buffer(gm, node, value, buffers)
            elif isinstance(value, bool | int | float) and not isinstance(value, torch.SymInt):
                for user in list(node.users):
                    user.args = fx.node.map_arg(user.args, lambda n, node=node, v=value: v if n is node else n)
                    user.kwargs = fx.node.map_arg(user.kwargs, lambda n, node=node, v=value: v if n is node else n)
            else:
                continue
            folded += 1
        dead_nodes, freed = eliminate_dead_code(gm) if folded else (0, 0)
        computed = sum(1 for n in values if n.op != "get_attr")
        notes = [f"folded {computed} constant nodes into {len(buffers)} buffers"] if folded else []
        notes += [f"freed {freed} tensors only the folded nodes read"] if freed else []
        return PassResult(matched=computed, rewritten=folded + dead_nodes, notes=notes,
                          stats={"constant_nodes": computed, "buffers": len(buffers), "freed_tensors": freed})

    def _evaluate_constants(self, gm: fx.GraphModule) -> dict[fx.Node, Any]:
        """Values of every node computable without inputs, in graph order."""
        mutated = {a for n in gm.graph.nodes if mutates(n) for a in n.all_input_nodes}
        values: dict[fx.Node, Any] = {}
        with torch.no_grad():
            for node in gm.graph.nodes:
                if node.op == "get_attr" and node not in mutated:
                    values[node] = get_attr_value(gm, node.target)
                elif self._foldable(node, values, mutated):
                    value = _run(node, values)
                    if value is not _UNFOLDABLE and self._worth_keeping(value):
                        values[node] = value
        return values

    def _foldable(self, node: fx.Node, values: dict, mutated: set) -> bool:
        if node.op not in ("call_function", "call_method") or node in mutated or node.is_impure():
            return False
        if _is_nondeterministic(node):
            return False
        return all(a in values for a in node.all_input_nodes)

    def _worth_keeping(self, value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            expanded = value.numel() > 1 and 0 in value.stride()
            return not expanded and value.numel() * value.element_size() <= self.max_bytes
        return True

    def _replace_with_buffer(self, gm: fx.GraphModule, node: fx.Node, value: torch.Tensor,
                             buffers: list[tuple[torch.Tensor, str]]) -> None:
        """Point ``node``'s users at a buffer holding ``value``, reusing an equal buffer if one exists
        (Llama's rotary ``cos``/``sin`` are computed once per layer but are the same tables)."""
        name = next((name for tensor, name in buffers if _equal(tensor, value)), None)
        if name is None:
            name = unique_attribute_name(gm, "_folded_")
            owned = value.detach()
            if not owned.is_contiguous() or owned._base is not None:
                owned = owned.clone(memory_format=torch.contiguous_format)
            gm.register_buffer(name, owned)
            buffers.append((owned, name))
        with gm.graph.inserting_before(node):
            constant = gm.graph.get_attr(name)
        constant.meta.update({k: v for k, v in node.meta.items()
                              if k in ("val", "example_value", "nn_module_stack", "stack_trace")})
        constant.meta["slimgraph_replaces"] = node.name
        node.replace_all_uses_with(constant)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _storages_read_at_run_time(values: dict[fx.Node, Any]) -> set[int]:
    """Storages of constant tensors that some non-constant node reads directly (so they stay)."""
    return {_storage(values[n]) for n in values
            if n.op == "get_attr" and isinstance(values[n], torch.Tensor) and any(u not in values for u in n.users)}


_UNFOLDABLE = object()


def _run(node: fx.Node, values: dict[fx.Node, Any]) -> Any:
    args, kwargs = tree_map(lambda a: values[a] if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
    try:
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a node we cannot evaluate eagerly simply stays in the graph
        return _UNFOLDABLE


def _is_nondeterministic(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
        return True
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return bool(_NONDETERMINISTIC_NAMES.search(name))
