"""The view base class, weight handles, and helpers for matching op spellings."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.fx as fx
from torch import nn

from slimgraph.errors import describe_node
from slimgraph.ir.nodes import get_attr_value, module_path, user_source_line

aten = torch.ops.aten
V = TypeVar("V", bound="OpView")

_PROVENANCE_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node")


def find_all(gm: fx.GraphModule, view_type: type[V]) -> list[V]:
    """Every match of ``view_type`` in ``gm``, in graph order."""
    return [v for v in (view_type.match(n) for n in list(gm.graph.nodes)) if v is not None]


@dataclass
class OpView:
    """Common part of every view: the anchor node and how to replace it."""

    node: fx.Node

    def __post_init__(self) -> None:
        """``LinearView(node)`` matches ``node`` itself, and says why when it is not such an op.

        ``match`` builds views with every field given; a view built from the node alone
        (every other field at its default) runs ``match`` and takes its fields.
        """
        rest = dataclasses.fields(self)[1:]
        if any(getattr(self, f.name) != _default(f) for f in rest):
            return
        matched = type(self).match(self.node)
        if matched is None:
            raise ValueError(f"{describe_node(self.node)} is not a {type(self).__name__}; use "
                             f"{type(self).__name__}.match(node), which returns None for other ops")
        for f in rest:
            setattr(self, f.name, getattr(matched, f.name))

    @classmethod
    def match(cls: type[V], node: fx.Node) -> V | None:
        raise NotImplementedError

    @property
    def gm(self) -> fx.GraphModule:
        return self.node.graph.owning_module

    @property
    def module_path(self) -> str:
        return module_path(self.node)

    @property
    def source_line(self) -> str:
        return user_source_line(self.node)

    def replace_with(self, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        """Insert ``target(*args, **kwargs)`` before the anchor, route its users there, erase it.

        The new node inherits the anchor's module path and source line, and records
        ``meta["slimgraph_replaces"]`` (the anchor's name) as provenance.
        """
        graph = self.node.graph
        with graph.inserting_before(self.node):
            new = graph.call_function(target, args, kwargs or {})
        new.meta.update({k: self.node.meta[k] for k in _PROVENANCE_KEYS if k in self.node.meta})
        new.meta["slimgraph_replaces"] = self.node.name
        self.node.replace_all_uses_with(new)
        graph.erase_node(self.node)
        self.node = new
        return new


class WeightedView(OpView):
    """A view whose op reads a constant weight (``weight_ref``) and maybe a bias (``bias_ref``)."""

    @property
    def weight(self) -> torch.Tensor | None:
        return self.weight_ref.tensor if self.weight_ref else None

    @property
    def bias(self) -> torch.Tensor | None:
        bias_ref = getattr(self, "bias_ref", None)
        return bias_ref.tensor if bias_ref else None


def _default(spec: dataclasses.Field) -> Any:
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


@dataclass(frozen=True)
class Weight:
    """Where a weight lives: a ``get_attr`` node, or an attribute of a ``call_module`` target."""

    gm: fx.GraphModule
    target: str
    node: fx.Node | None = None
    transposed: bool = False  # stored [in, out] (GPT-2 Conv1D) rather than [out, in]

    @property
    def tensor(self) -> torch.Tensor:
        value = get_attr_value(self.gm, self.target)
        return value.t() if self.transposed else value


def weight_of(node: Any, transposed: bool = False) -> Weight | None:
    """A ``Weight`` for a ``get_attr`` node; ``None`` for anything computed at run time."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return Weight(node.graph.owning_module, node.target, node, transposed)
    return None


def module_weight(node: fx.Node, name: str) -> Weight | None:
    """The ``name`` tensor (``weight``/``bias``) of a ``call_module`` target, if it has one."""
    module = get_attr_value(node.graph.owning_module, node.target)
    if getattr(module, name, None) is None:
        return None
    return Weight(node.graph.owning_module, f"{node.target}.{name}")


def called_module(node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node runs, else ``None``."""
    return get_attr_value(node.graph.owning_module, node.target) if node.op == "call_module" else None


def is_call(node: Any, functions: set, methods: set = frozenset()) -> bool:
    """``node`` calls one of ``functions`` (``call_function``) or ``methods`` (``call_method``)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of ``node``, passed positionally at ``index`` or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# ---- op spellings shared by several views ----

MUL = {aten.mul.Tensor, torch.mul, operator.mul}
ADD = {aten.add.Tensor, aten.add.Scalar, torch.add, operator.add}
CAST = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
CAST_METHODS = {"to", "type", "type_as"}  # GPT-2 casts attention probabilities with .type(dtype)
