"""Op views: one typed handle per op, whatever spelling it arrived in.

The same linear layer is ``aten.linear.default`` after ``torch.export``,
``torch._C._nn.linear`` in a Dynamo graph, ``call_module`` on an ``nn.Linear``
after ``symbolic_trace``, and ``addmm(bias, x, W)`` in GPT-2's ``Conv1D``. A pass
writes its rule once against the view::

    for view in find_all(gm, LinearView):
        print(view.module_path, view.weight.shape)   # weight always [out, in]
        view.replace_with(my_op, (view.input, packed_weight))

``View.match(node)`` returns the view or ``None``, like a rewrite rule.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from slimgraph.ir.nodes import get_attr_value, module_path, node_value, user_source_line

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


def _weight(node: Any, transposed: bool = False) -> Weight | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return Weight(node.graph.owning_module, node.target, node, transposed)
    return None


def _module_weight(node: fx.Node, name: str) -> Weight | None:
    module = get_attr_value(node.graph.owning_module, node.target)
    if getattr(module, name, None) is None:
        return None
    return Weight(node.graph.owning_module, f"{node.target}.{name}")


def _called_module(node: fx.Node) -> nn.Module | None:
    return get_attr_value(node.graph.owning_module, node.target) if node.op == "call_module" else None


def _is_call(node: Any, functions: set, methods: set = frozenset()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# ---- linear --------------------------------------------------------------------------------------

_LINEAR = {aten.linear.default, torch._C._nn.linear, F.linear}
_ADDMM = {aten.addmm.default, torch.addmm}


@dataclass
class LinearView(OpView):
    """``y = x @ weight.T + bias`` with ``weight`` reported as ``[out_features, in_features]``."""

    input: fx.Node = None
    weight_ref: Weight = None
    bias_ref: Weight | None = None

    @classmethod
    def match(cls, node: fx.Node) -> LinearView | None:
        if _is_call(node, _LINEAR):
            weight, bias = _weight(_arg(node, 1, "weight")), _arg(node, 2, "bias")
            if weight is not None and (bias is None or _weight(bias) is not None):
                return cls(node, _arg(node, 0, "input"), weight, _weight(bias))
        if _is_call(node, _ADDMM) and not node.kwargs:  # GPT-2 Conv1D: addmm(bias, x2d, W[in, out])
            bias, weight = _weight(node.args[0]), _weight(node.args[2], transposed=True)
            if weight is not None and bias is not None:
                return cls(node, node.args[1], weight, bias)
        if isinstance(_called_module(node), nn.Linear):
            return cls(node, node.args[0], _module_weight(node, "weight"), _module_weight(node, "bias"))
        return None

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_ref.tensor

    @property
    def bias(self) -> torch.Tensor | None:
        return self.bias_ref.tensor if self.bias_ref else None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


# ---- convolution ---------------------------------------------------------------------------------

_CONV = {aten.conv1d.default: 1, aten.conv2d.default: 2, torch.conv1d: 1, torch.conv2d: 2,
         F.conv1d: 1, F.conv2d: 2}


@dataclass
class ConvView(OpView):
    """1-D or 2-D convolution with its weight, bias and hyper-parameters."""

    input: fx.Node = None
    weight_ref: Weight = None
    bias_ref: Weight | None = None
    spatial_dims: int = 2
    stride: tuple[int, ...] = (1,)
    padding: tuple[int, ...] | str = (0,)  # or "same" / "valid"
    dilation: tuple[int, ...] = (1,)
    groups: int = 1

    @classmethod
    def match(cls, node: fx.Node) -> ConvView | None:
        module = _called_module(node)
        if isinstance(module, nn.Conv1d | nn.Conv2d) and module.padding_mode == "zeros":
            return cls(node, node.args[0], _module_weight(node, "weight"), _module_weight(node, "bias"),
                       1 if isinstance(module, nn.Conv1d) else 2, module.stride, module.padding,
                       module.dilation, module.groups)
        if _is_call(node, set(_CONV)) or _is_call(node, {aten.convolution.default}):
            weight, bias = _weight(_arg(node, 1, "weight")), _arg(node, 2, "bias")
            if weight is None or (bias is not None and _weight(bias) is None):
                return None
            dims = _CONV.get(node.target, weight.tensor.dim() - 2)
            if node.target is aten.convolution.default and (node.args[6] or dims not in (1, 2)):
                return None  # transposed convolution
            groups_index = 8 if node.target is aten.convolution.default else 6
            stride, padding, dilation = (_per_dim(_arg(node, i, name, default), dims) for i, name, default
                                         in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))
            return cls(node, node.args[0], weight, _weight(bias), dims, stride, padding, dilation,
                       _arg(node, groups_index, "groups", 1))
        return None

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_ref.tensor

    @property
    def bias(self) -> torch.Tensor | None:
        return self.bias_ref.tensor if self.bias_ref else None


def _per_dim(value: Any, dims: int) -> tuple[int, ...] | str:
    """One spelling for every graph: ``1``, ``[1]`` and ``[1, 1]`` all become ``(1, 1)`` in 2-D."""
    if isinstance(value, str):
        return value
    values = tuple(value) if isinstance(value, list | tuple) else (value,)
    return values * dims if len(values) == 1 else values


# ---- normalisation -------------------------------------------------------------------------------

_LAYER_NORM = {aten.layer_norm.default, F.layer_norm, torch.layer_norm}
_RMS_NORM = {aten.rms_norm.default, F.rms_norm, getattr(torch, "rms_norm", F.rms_norm)}


@dataclass
class NormView(OpView):
    """LayerNorm or RMSNorm, including the decomposed RMSNorm of Llama-style models."""

    kind: str = "layer_norm"
    input: fx.Node = None
    weight_ref: Weight | None = None
    bias_ref: Weight | None = None
    eps: float = 1e-5
    nodes: list[fx.Node] = field(default_factory=list)

    @classmethod
    def match(cls, node: fx.Node) -> NormView | None:
        module = _called_module(node)
        if isinstance(module, nn.LayerNorm | nn.RMSNorm):
            kind = "layer_norm" if isinstance(module, nn.LayerNorm) else "rms_norm"
            eps = _norm_eps(module.eps, node.args[0])
            return cls(node, kind, node.args[0], _module_weight(node, "weight"),
                       _module_weight(node, "bias") if kind == "layer_norm" else None, eps, [node])
        if _is_call(node, _LAYER_NORM):
            return cls(node, "layer_norm", node.args[0], _weight(_arg(node, 2, "weight")),
                       _weight(_arg(node, 3, "bias")), _arg(node, 4, "eps", 1e-5), [node])
        if _is_call(node, _RMS_NORM):
            return cls(node, "rms_norm", node.args[0], _weight(_arg(node, 2, "weight")), None,
                       _norm_eps(_arg(node, 3, "eps"), node.args[0]), [node])
        return _match_decomposed_rms_norm(cls, node)

    @property
    def weight(self) -> torch.Tensor | None:
        return self.weight_ref.tensor if self.weight_ref else None

    @property
    def bias(self) -> torch.Tensor | None:
        return self.bias_ref.tensor if self.bias_ref else None


def _norm_eps(eps: float | None, input: Any) -> float:
    """``eps=None`` means ``finfo(dtype).eps`` of the input (float32 when its dtype is unknown)."""
    if eps is not None:
        return float(eps)
    value = node_value(input) if isinstance(input, fx.Node) else None
    return torch.finfo(value.dtype if isinstance(value, torch.Tensor) else torch.float32).eps


_MUL = {aten.mul.Tensor, torch.mul, operator.mul}
_ADD = {aten.add.Tensor, aten.add.Scalar, torch.add, operator.add}
_CAST = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
_CAST_METHODS = {"to", "type", "type_as"}  # GPT-2 casts attention probabilities with .type(dtype)


def _match_decomposed_rms_norm(cls: type[NormView], node: fx.Node) -> NormView | None:
    """``weight * (x * rsqrt(mean(x**2, -1, keepdim) + eps)).to(dtype)``, anchored at the final mul."""
    if not _is_call(node, _MUL, {"mul", "__mul__"}):
        return None
    weight_arg = next((a for a in node.args if _weight(a)), None)
    normed = next((a for a in node.args if isinstance(a, fx.Node) and a is not weight_arg), None)
    if weight_arg is None or normed is None:
        return None
    cast = normed if _is_call(normed, _CAST, _CAST_METHODS) else None
    scaled = cast.args[0] if cast else normed
    if not _is_call(scaled, _MUL, {"mul", "__mul__"}):
        return None
    rsqrt = next((a for a in scaled.args if _is_call(a, {aten.rsqrt.default, torch.rsqrt}, {"rsqrt"})), None)
    if rsqrt is None or not _is_call(rsqrt.args[0], _ADD, {"add", "__add__"}):
        return None
    mean, eps = rsqrt.args[0].args
    if not _is_call(mean, {aten.mean.dim, torch.mean}, {"mean"}) or not _is_last_dim_mean(mean):
        return None
    square = mean.args[0]
    if not _is_call(square, {aten.pow.Tensor_Scalar, torch.pow}, {"pow"}) or square.args[1] != 2:
        return None
    x = square.args[0]
    if x not in scaled.args:
        return None
    nodes = [square, mean, rsqrt.args[0], rsqrt, scaled, *([cast] if cast else []), node]
    return cls(node, "rms_norm", x, _weight(weight_arg), None, float(eps), nodes)


def _is_last_dim_mean(mean: fx.Node) -> bool:
    """``mean(..., dim=-1, keepdim=True)``: a mean over any other dim is not an RMSNorm."""
    dims = _arg(mean, 1, "dim")
    dims = list(dims) if isinstance(dims, list | tuple) else [dims]
    value = node_value(mean.args[0])
    last = {-1, value.dim() - 1} if isinstance(value, torch.Tensor) else {-1}
    return len(dims) == 1 and dims[0] in last and bool(_arg(mean, 2, "keepdim", False))


# ---- embedding -----------------------------------------------------------------------------------

@dataclass
class EmbeddingView(OpView):
    """Table lookup ``weight[indices]``."""

    indices: fx.Node = None
    weight_ref: Weight = None
    padding_idx: int | None = None

    @classmethod
    def match(cls, node: fx.Node) -> EmbeddingView | None:
        if isinstance(module := _called_module(node), nn.Embedding):
            return cls(node, node.args[0], _module_weight(node, "weight"), module.padding_idx)
        if _is_call(node, {aten.embedding.default, torch.embedding}) and _weight(node.args[0]):
            padding = _arg(node, 2, "padding_idx", -1)
            return cls(node, node.args[1], _weight(node.args[0]), None if padding == -1 else padding)
        if _is_call(node, {F.embedding}) and _weight(_arg(node, 1, "weight")):
            return cls(node, node.args[0], _weight(_arg(node, 1, "weight")), _arg(node, 2, "padding_idx"))
        return None

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_ref.tensor


# ---- attention -----------------------------------------------------------------------------------

_SDPA = {aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention,
         torch._C._nn.scaled_dot_product_attention}
_MATMUL = {aten.matmul.default, aten.bmm.default, torch.matmul, torch.bmm, operator.matmul}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, torch.softmax, F.softmax}
_TRANSPOSE = {aten.transpose.int, torch.transpose}
_SCALE = {aten.mul.Tensor, aten.div.Tensor, torch.mul, torch.div, operator.mul, operator.truediv}
_DROPOUT = {aten.dropout.default, F.dropout, torch.dropout}


@dataclass
class AttentionView(OpView):
    """Scaled dot-product attention, as one sdpa op or as ``matmul → softmax → matmul``.

    ``query``/``key``/``value`` are ``[..., heads, seq, head_dim]`` nodes. ``scale``
    multiplies the scores; ``None`` means sdpa's default 1/sqrt(head_dim). For the
    subgraph form, ``nodes`` lists every node of the pattern (anchor last) and
    ``scale`` is the literal multiplier found, 1.0 when the scores are not scaled.
    """

    kind: str = "sdpa"
    query: fx.Node = None
    key: fx.Node = None
    value: fx.Node = None
    attn_mask: fx.Node | None = None
    scale: float | None = None
    is_causal: bool = False
    nodes: list[fx.Node] = field(default_factory=list)
    dropout_p: float = 0.0
    enable_gqa: bool = False  # sdpa repeats key/value heads itself (grouped-query attention)

    @classmethod
    def match(cls, node: fx.Node) -> AttentionView | None:
        if _is_call(node, _SDPA):
            return cls(node, "sdpa", node.args[0], node.args[1], node.args[2], _arg(node, 3, "attn_mask"),
                       node.kwargs.get("scale"), bool(_arg(node, 5, "is_causal", False)), [node],
                       float(_arg(node, 4, "dropout_p", 0.0)), bool(node.kwargs.get("enable_gqa", False)))
        return _match_attention_subgraph(cls, node)

    @property
    def num_heads(self) -> int | None:
        value = node_value(self.query)
        return value.shape[-3] if value is not None and value.dim() >= 4 else None  # [..., heads, seq, dim]


def _match_attention_subgraph(cls: type[AttentionView], node: fx.Node) -> AttentionView | None:
    """Anchor: the final ``probs @ value`` matmul."""
    if not _is_call(node, _MATMUL, {"matmul", "__matmul__", "bmm"}):
        return None
    probs, value = node.args[0], node.args[1]
    nodes = [node]
    if _is_call(probs, _DROPOUT, {"dropout"}) or _is_call(probs, _CAST, _CAST_METHODS):
        nodes.append(probs)
        probs = probs.args[0]
    if _is_call(probs, _CAST, _CAST_METHODS):
        nodes.append(probs)
        probs = probs.args[0]
    if not _is_call(probs, _SOFTMAX, {"softmax"}) or _arg(probs, 1, "dim") not in (-1, 3):
        return None
    nodes.append(probs)
    scores, mask, scale = probs.args[0], None, None
    for _ in range(2):  # mask and scale, in either order
        if _is_call(scores, _ADD, {"add", "__add__"}) and mask is None:
            nodes.append(scores)
            scores, mask = scores.args[0], scores.args[1]
        elif _is_call(scores, _SCALE, {"mul", "div", "__mul__", "__truediv__"}) and scale is None:
            divides = scores.target in (aten.div.Tensor, torch.div, operator.truediv, "div", "__truediv__")
            tensor, factor = scores.args[0], scores.args[1]
            if not divides and isinstance(tensor, int | float):  # `0.125 * scores`
                tensor, factor = factor, tensor
            if not isinstance(factor, int | float):
                return None
            nodes.append(scores)
            scores, scale = tensor, 1.0 / factor if divides else float(factor)
    if not _is_call(scores, _MATMUL, {"matmul", "__matmul__", "bmm"}):
        return None
    query, key_t = scores.args[0], scores.args[1]
    if not _is_call(key_t, _TRANSPOSE, {"transpose"}) or sorted(key_t.args[1:]) not in ([-2, -1], [2, 3]):
        return None
    nodes += [scores, key_t]
    scale = 1.0 if scale is None else scale  # unscaled scores: sdpa's default would rescale them
    return cls(node, "matmul_softmax", query, key_t.args[0], value, mask, scale, False, nodes[::-1])


ALL_VIEWS: tuple[type[OpView], ...] = (LinearView, ConvView, NormView, EmbeddingView, AttentionView)


def iter_views(gm: fx.GraphModule) -> Iterator[OpView]:
    """Every view of every known kind in ``gm``."""
    for node in gm.graph.nodes:
        for view_type in ALL_VIEWS:
            if (view := view_type.match(node)) is not None:
                yield view
                break
