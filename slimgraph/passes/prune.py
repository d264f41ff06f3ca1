"""prune: zero the least important weights of Linear layers, or slice coupled groups away.

Matches every ``LinearView`` (aten/torch/call_module linear, GPT-2's ``Conv1D`` addmm)
selected by ``include``/``exclude`` regexes on the module path. The output head (named as
quantize names it: ``lm_head``, ``classifier``…), weights shared with an embedding table and
the embedding tables themselves are skipped, each with its reason in the notes.

- ``kind=unstructured`` (default) zeroes ``round(sparsity × count)`` weights.
  ``criterion=magnitude`` ranks ``|W|`` over each layer (``scope=layer``) or over all the
  selected layers together (``scope=global``: layers end with different sparsities).
  ``criterion=wanda`` ranks ``|W_ij|·‖X_j‖₂`` (``‖X_j‖`` over every calibration token
  reaching input ``j``) within each output row, as the Wanda paper does. Its scores carry
  each layer's activation scale, so they are not comparable across layers: ``scope=global``
  with wanda is refused rather than given a made-up normalisation.
- ``kind=N:M`` (``2:4``, ``1:4``, ``4:8``) keeps the N largest scores (``|W|`` or Wanda's) of
  every M consecutive weights along the input dimension; a layer whose ``in_features`` is
  not a multiple of M is skipped. The weight stays masked dense (same bytes, dense matmul)
  except 2:4 on CUDA, which becomes ``torch.sparse.to_sparse_semi_structured`` when torch
  takes its dtype and shape (otherwise masked dense, with torch's reason in the notes).
- ``kind=structured`` hands over to ``prune_structured`` (``prune_structured.py``): coupled
  groups (FFN units, attention heads with GQA groups whole, conv channels) scored by
  ``criterion`` (magnitude = l2, l1, wanda, taylor), ``ratio`` of them sliced away, widths
  rounded to multiples of ``round_to``.

Masked kinds never write in place: each pruned layer reads a new tensor,
``<layer>_pruned_<i>.weight``; the original is freed when nothing else reads it.
``stats["layers"]`` lists per layer the sparsity reached, parameters and bytes removed;
``stats["skipped"]`` the layers left alone, with the reason.

In pipeline text::

    prune(sparsity=0.6, scope=global)
    prune(kind=2:4, criterion=wanda)          # needs optimize(..., calibration=[...])
    prune(kind=structured, target=ffn, ratio=0.5)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
from torch import nn

from slimgraph.errors import PipelineError
from slimgraph.ir.graph_utils import eliminate_dead_code, unique_attribute_name
from slimgraph.ir.views import EmbeddingView, LinearView, find_all
from slimgraph.passes.activations import input_statistics, squared_column_norms
from slimgraph.passes.manager import Pass, PassContext, PassResult, register_pass
from slimgraph.passes.prune_structured import prune_structured, validate_structured
from slimgraph.passes.quantize import HEAD_NAMES

MASK_CRITERIA = ("magnitude", "wanda")
_N_OF_M = re.compile(r"(\d+):(\d+)")


@register_pass
@dataclass(frozen=True)
class Prune(Pass):
    """Unstructured, N:M (masked) or structured (sliced) pruning of Linear layers."""

    name: ClassVar[str] = "prune"
    preserves: ClassVar[tuple[str, ...]] = ()  # kind=structured changes shapes

    kind: str = "unstructured"  # unstructured, structured, or N:M such as 2:4
    sparsity: float = 0.5  # unstructured: fraction of the weights zeroed
    scope: Literal["layer", "global"] = "layer"
    criterion: Literal["magnitude", "l1", "l2", "wanda", "taylor"] = "magnitude"
    target: Literal["ffn", "heads", "channels"] = "ffn"  # structured only
    ratio: float = 0.5  # structured: fraction of each coupled group set removed
    round_to: int = 8  # structured: kept widths rounded to a multiple of this
    include: str | None = None
    exclude: str | None = None
    prune_head: bool = False

    def validate(self) -> None:
        n_of_m = self.n_of_m()
        if self.kind == "structured":
            self._reject_changed(
                ("sparsity", "scope"), "kind=structured removes ratio=... of each group set"
            )
            validate_structured(self.target, self.ratio, self.criterion, self.round_to)
        else:
            self._reject_changed(("target", "ratio", "round_to"), "they apply to kind=structured")
            if self.criterion not in MASK_CRITERIA:
                raise PipelineError(
                    f"pass 'prune': criterion={self.criterion} scores groups of kind=structured; "
                    f"kind={self.kind} ranks single weights: use criterion=magnitude or criterion=wanda"
                )
        if n_of_m is not None:
            n, m = n_of_m
            self._reject_changed(
                ("sparsity", "scope"), f"kind={self.kind} zeroes {m - n} of every {m} weights"
            )
        elif self.kind == "unstructured" and not 0 < self.sparsity < 1:
            raise PipelineError(
                f"pass 'prune': sparsity={self.sparsity:g} must be between 0 and 1 (exclusive): the "
                "fraction of each layer's weights to zero, e.g. sparsity=0.5"
            )
        if self.criterion == "wanda" and self.scope == "global":
            raise PipelineError(
                "pass 'prune': criterion=wanda with scope=global: Wanda scores |W|·‖X‖ carry each "
                "layer's activation scale and are compared within each output row, not across layers; "
                "use scope=layer, or criterion=magnitude for a global ranking"
            )
        for option in ("include", "exclude"):
            _compile(getattr(self, option), option)

    def n_of_m(self) -> tuple[int, int] | None:
        """``(N, M)`` of an ``N:M`` kind; ``None`` for unstructured and structured."""
        if self.kind in ("unstructured", "structured"):
            return None
        match = _N_OF_M.fullmatch(self.kind.replace(" ", ""))
        if match is None:
            raise PipelineError(
                f"pass 'prune': kind={self.kind!r} is not unstructured, structured or N:M with whole "
                "numbers (e.g. kind=2:4, 1:4 or 4:8)"
            )
        n, m = int(match[1]), int(match[2])
        if not 1 <= n < m:
            raise PipelineError(
                f"pass 'prune': kind={self.kind} must keep N of every M weights with 1 <= N < M "
                "(e.g. kind=2:4 keeps 2 of every 4)"
            )
        return n, m

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.kind == "structured":

            return prune_structured(
                gm, ctx, target=self.target, ratio=self.ratio, criterion=self.criterion,
                round_to=self.round_to, include=self.include, exclude=self.exclude,
            )  # fmt: skip
        if self.criterion == "wanda" and not ctx.calibration:
            raise PipelineError(
                "pass 'prune': criterion=wanda weighs each weight by the norm of its input on real "
                "data, and no calibration inputs were given; pass optimize(..., calibration=[batch, "
                "...]) (a few batches shaped like the example inputs) or use criterion=magnitude"
            )
        linears = find_all(gm, LinearView)
        layers, skipped = self._select(gm, linears)
        if self.criterion == "wanda":
            layers = _with_input_norms(gm, ctx, layers, skipped)
        masks = self._masks(layers)
        devices = {layer.view.weight.device.type for layer in layers}
        semi_structured = self.n_of_m() == (2, 4)
        done = [
            _store(gm, layer, keep, self.kind, semi_structured)
            for layer, keep in zip(layers, masks, strict=True)
        ]
        dead_nodes, freed = eliminate_dead_code(gm) if done else (0, 0)
        return PassResult(
            matched=len(linears),
            rewritten=len(done) + dead_nodes,
            notes=self._notes(done, skipped, devices),
            stats={"layers": done, "skipped": skipped, "freed_tensors": freed},
        )

    def _select(
        self, gm: fx.GraphModule, linears: list[LinearView]
    ) -> tuple[list[_Layer], list[dict[str, str]]]:
        """The linears to prune, and ``{"layer", "reason"}`` for everything left alone."""
        tables = {
            _storage(v.weight): v.module_path or v.node.name for v in find_all(gm, EmbeddingView)
        }
        skipped = [
            {"layer": path, "reason": "embedding table (prune works on linear layers)"}
            for path in tables.values()
        ]
        layers = []
        for view in linears:
            layer = _Layer(view, view.module_path or view.node.name)
            reason = self._skip_reason(layer, tables)
            if reason:
                skipped.append({"layer": layer.path, "reason": reason})
            else:
                layers.append(layer)
        return layers, skipped

    def _skip_reason(self, layer: _Layer, tables: dict[int, str]) -> str | None:
        weight, path = layer.view.weight, layer.path
        if not weight.is_floating_point():
            return f"weight dtype {weight.dtype} is not floating point"
        if weight.is_meta:
            return "weight is on the meta device (no data to prune)"
        if self.include and not re.search(self.include, path):
            return f"excluded: path does not match include={self.include!r}"
        if self.exclude and re.search(self.exclude, path):
            return f"excluded: path matches exclude={self.exclude!r}"
        if not self.prune_head and path.rpartition(".")[2] in HEAD_NAMES:
            return "output head (pass prune_head=true to include it)"
        if _storage(weight) in tables:
            return f"weight shared with embedding {tables[_storage(weight)]} (a pruned copy would store it twice)"
        n_of_m = self.n_of_m()
        if n_of_m and weight.shape[1] % n_of_m[1]:
            return f"in_features={weight.shape[1]} is not divisible by M={n_of_m[1]}"
        return None

    def _masks(self, layers: list[_Layer]) -> Iterable[torch.Tensor]:
        """One keep-mask per layer; computed as the layers are stored, except a global ranking."""
        if self.scope == "global":
            return keep_global([layer.scores() for layer in layers], self.sparsity)
        if (n_of_m := self.n_of_m()) is not None:
            return (keep_n_of_m(layer.scores(), *n_of_m) for layer in layers)
        if self.criterion == "wanda":
            return (keep_per_row(layer.scores(), self.sparsity) for layer in layers)
        return (keep_largest(layer.scores(), self.sparsity) for layer in layers)

    def _notes(
        self, done: list[dict[str, Any]], skipped: list[dict[str, str]], devices: set[str]
    ) -> list[str]:
        notes = []
        if done:
            zeroed, total = sum(d["params_removed"] for d in done), sum(_numel(d) for d in done)
            notes.append(
                f"{len(done)} linears → {self._label()}: {zeroed:,} of {total:,} weights zeroed ({zeroed / total:.1%})"
            )
            if self.scope == "global":
                low, high = min(d["sparsity"] for d in done), max(d["sparsity"] for d in done)
                notes.append(f"global ranking: layer sparsity {low:.1%} to {high:.1%}")
            if any(d["storage"] == "masked dense" for d in done):
                notes.append(_dense_note(self.kind, devices))
        notes += [
            f"{d['layer']}: kept masked dense, {d['refused']}" for d in done if "refused" in d
        ]
        return notes + [f"skipped {s['layer']}: {s['reason']}" for s in skipped]

    def _label(self) -> str:
        if self.n_of_m():
            return f"{self.kind} ({self.criterion})"
        group = {"wanda": "per output row", "layer": "per layer", "global": "ranked globally"}[
            "wanda" if self.criterion == "wanda" else self.scope
        ]
        return f"unstructured {self.sparsity:.0%} ({self.criterion}, {group})"

    def _reject_changed(self, options: tuple[str, ...], why: str) -> None:
        """Options left at their default are fine; a changed one that does not apply is an error."""
        defaults = {name: type(self).__dataclass_fields__[name].default for name in options}
        for name, default in defaults.items():
            if getattr(self, name) != default:
                raise PipelineError(
                    f"pass 'prune': {name}={getattr(self, name)} does not apply to kind={self.kind} "
                    f"({why}); drop {name}="
                )


def keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask dropping the ``round(sparsity × numel)`` lowest scores (ties: exactly that many)."""
    drop = round(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.topk(scores.flatten(), drop, largest=False, sorted=False).indices] = False
    return keep.view(scores.shape)


def keep_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask dropping the ``round(sparsity × columns)`` lowest scores of every row."""
    drop = round(sparsity * scores.shape[1])
    lowest = torch.topk(scores, drop, dim=1, largest=False, sorted=False).indices
    return torch.ones_like(scores, dtype=torch.bool).scatter(1, lowest, False)


def keep_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the N highest scores of every M consecutive columns (``columns % M == 0``)."""
    groups = scores.reshape(scores.shape[0], -1, m)
    highest = torch.topk(groups, n, dim=-1, sorted=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter(-1, highest, True).view(scores.shape)


def keep_global(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks dropping the ``round(sparsity × total)`` lowest scores of all tensors ranked together."""
    keep = keep_largest(torch.cat([s.flatten() for s in scores]), sparsity)
    return [
        part.view(s.shape)
        for part, s in zip(keep.split([s.numel() for s in scores]), scores, strict=True)
    ]


@dataclass
class _Layer:
    view: LinearView
    path: str
    input_norms: torch.Tensor | None = None  # ‖X_j‖₂ per input feature (Wanda)

    def scores(self) -> torch.Tensor:
        magnitude = self.view.weight.detach().abs().float()
        return magnitude if self.input_norms is None else magnitude * self.input_norms.to(magnitude)


def _with_input_norms(gm: fx.GraphModule, ctx: PassContext, layers: list[_Layer],
                      skipped: list[dict[str, str]]) -> list[_Layer]:  # fmt: skip
    """Attach ``‖X_j‖₂`` on the calibration inputs to each layer; layers without move to ``skipped``."""
    readers = {layer.path: layer.view.node for layer in layers}
    names = sorted({node.name for node in readers.values()})
    sums = input_statistics(gm, names, ctx.calibration, squared_column_norms,
                            description="prune: Wanda input norms") if names else {}  # fmt: skip
    kept = []
    for layer in layers:
        reader = readers[layer.path]
        if reader.name not in sums:
            skipped.append({"layer": layer.path, "reason": "its input was not reached on the calibration "
                            "inputs (criterion=wanda needs them)"})
            continue
        layer.input_norms = sums[reader.name].sqrt()
        kept.append(layer)
    return kept


def _store(gm: fx.GraphModule, layer: _Layer, keep: torch.Tensor, kind: str, semi_structured: bool
           ) -> dict[str, Any]:  # fmt: skip
    """Point the layer at a masked copy of its weight (never written in place); its report line."""
    view = LinearView.match(layer.view.node)  # matched again: earlier rewrites replaced its input
    weight = view.weight.detach()
    pruned = weight.masked_fill(~keep.to(weight.device), 0)
    zeros = int((pruned == 0).sum())
    info = {"layer": layer.path, "kind": kind, "shape_before": list(weight.shape), "shape_after": list(weight.shape),
            "sparsity": zeros / pruned.numel(), "params_removed": zeros - int((weight == 0).sum()),
            "bytes_removed": 0, "storage": "masked dense"}  # fmt: skip
    stored, sparse = pruned.t().contiguous() if view.weight_ref.transposed else pruned, False
    if semi_structured and _has_sparse_kernels(pruned):
        try:
            stored, sparse = torch.sparse.to_sparse_semi_structured(pruned.contiguous()), True
            info["storage"], info["bytes_removed"] = (
                "semi-structured 2:4",
                _nbytes(pruned) - _nbytes(stored),
            )
        except (RuntimeError, ValueError) as error:  # a dtype or shape torch's kernels do not take
            info["refused"] = (
                f"to_sparse_semi_structured refused it: {str(error).strip().splitlines()[0]}"
            )
    holder_name = unique_attribute_name(gm, re.sub(r"\W", "_", layer.path) + "_pruned_")
    holder = nn.Module()
    holder.register_buffer("weight", stored)
    gm.add_submodule(holder_name, holder)
    with gm.graph.inserting_before(view.node):
        new_weight = _get_attr(gm, f"{holder_name}.weight", pruned if sparse else stored)
    if view.weight_ref.node is not None and not sparse:
        view.node.replace_input_with(view.weight_ref.node, new_weight)
    else:  # an nn.Linear call_module, or a sparse weight: both become aten.linear(x, W, b)
        _as_linear(gm, view, new_weight, layer.path)
    return info


def _as_linear(gm: fx.GraphModule, view: LinearView, weight: fx.Node, path: str) -> None:
    """``aten.linear(x, weight, bias)`` in place of the layer's node, keeping its module path."""
    bias = view.bias_ref
    if bias is not None and bias.node is None:
        with gm.graph.inserting_before(view.node):
            bias_node = _get_attr(gm, bias.target, bias.tensor)
    else:
        bias_node = bias.node if bias is not None else None
    value = view.node.meta.get("val")
    new = view.replace_with(torch.ops.aten.linear.default, (view.input, weight, bias_node))
    new.meta.setdefault("nn_module_stack", {path: (path, nn.Linear)})  # symbolic_trace has none
    if value is not None:
        new.meta["val"] = value


def _has_sparse_kernels(weight: torch.Tensor) -> bool:
    """torch's semi-structured kernels (cuSPARSELt, CUTLASS) run on CUDA only."""
    return weight.is_cuda


def _get_attr(gm: fx.GraphModule, target: str, like: torch.Tensor) -> fx.Node:
    node = gm.graph.get_attr(target)
    node.meta["val"] = torch.empty(like.shape, dtype=like.dtype, device="meta")
    return node


def _dense_note(kind: str, devices: set[str]) -> str:
    if kind == "unstructured":
        return "zeros stay masked dense: the weights keep their bytes and run as dense matmuls"
    where = "CPU" if devices == {"cpu"} else "/".join(sorted(devices))
    if kind != "2:4":
        why = "only 2:4 has sparse kernels"
    else:
        why = "torch refused the sparse format" if "cuda" in devices else "sparse kernels need CUDA"
    return f"{kind} stays masked dense on {where}: same bytes, dense matmuls ({why})"


def _storage(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None or tensor.is_meta else tensor.untyped_storage().data_ptr()


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes held, including a sparse subclass's packed values and metadata."""
    if type(tensor) is torch.Tensor or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(
        _nbytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None
    )


def _numel(info: dict[str, Any]) -> int:
    rows, columns = info["shape_before"]
    return rows * columns


def _compile(pattern: str | None, option: str) -> re.Pattern | None:
    try:
        return None if pattern is None else re.compile(pattern)
    except re.error as error:
        raise PipelineError(
            f"pass 'prune': {option}={pattern!r} is not a valid regular expression ({error})"
        ) from error
