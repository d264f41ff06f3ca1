"""prune(kind=structured): remove whole FFN units, attention heads or conv channels, physically.

``prune_structured(gm, ctx, target="ffn", ratio=0.5)`` takes the coupled sets of ``target`` found by
``coupling.find_coupled_sets``, scores every group of each set, keeps the best ``1 - ratio`` of them
(rounded up so each pruned width is a multiple of ``round_to``) and slices every coupled tensor into a
new, smaller tensor at the same attribute path; the literal sizes of views, expands and splits shrink
with them. For BERT's FFN at ``ratio=0.5``, before and after::

    linear_4 = aten.linear(x, intermediate.dense.weight [128, 64], intermediate.dense.bias [128])
    gelu = aten.gelu(linear_4)
    linear_5 = aten.linear(gelu, output.dense.weight [64, 128], output.dense.bias [64])
    # after: the same nodes reading weight [64, 64], bias [64] and weight [64, 64]

Removing a group computes exactly what the original model computes with that group's consumer
columns zeroed. Sets whose coupling cannot be proven are skipped with the reason (``stats["skipped"]``).

Criteria; a group's score adds up over its weights (the producers' rows, the consumers' columns):

- ``l1``: Σ|w|. ``l2`` (also ``magnitude``): √Σw².
- ``wanda``: Σ|w_ij|·‖X_j‖, with ‖X_j‖ the norm of input feature j of the weight's layer on the
  calibration batches.
- ``taylor``: |Σ w·∂L/∂w|, the first-order change of L when the group is removed, with the gradients
  of all calibration batches summed. L is the model's own loss when it returns a scalar (a Hugging
  Face model given ``labels``); otherwise L = Σ mean(y²) over its floating-point outputs, a label-free
  proxy for how far removing the group moves the output.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from rich.progress import track
from torch import nn
from torch.utils._pytree import tree_leaves

from slimgraph.errors import PassError, PipelineError
from slimgraph.ir.nodes import get_attr_value
from slimgraph.ir.shapes import propagate_shapes
from slimgraph.passes.activations import (
    PROGRESS_AFTER_BATCHES,
    input_statistics,
    squared_column_norms,
)
from slimgraph.passes.coupling import CoupledSet, TensorSlice, find_coupled_sets
from slimgraph.passes.manager import PassContext, PassResult

TARGETS = ("ffn", "heads", "channels")
CRITERIA = ("magnitude", "l1", "l2", "wanda", "taylor")
GROUP_NAMES = {"ffn": "units", "heads": "heads", "channels": "channels"}


def prune_structured(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    target: str = "ffn",
    ratio: float = 0.5,
    criterion: str = "magnitude",
    round_to: int = 8,
    include: str | None = None,
    exclude: str | None = None,
) -> PassResult:
    """Remove ``ratio`` of the groups of every ``target`` set (rewrites ``gm``, never its tensors).

    Example::

        result = prune_structured(gm, ctx, target="heads", ratio=0.5, round_to=1)
        result.stats["params_after"]  # the predicted parameter count, which the rewritten gm has
    """
    validate_structured(target, ratio, criterion, round_to, include, exclude)
    if criterion in ("wanda", "taylor") and not ctx.calibration:
        raise PipelineError(
            f"pass 'prune': criterion={criterion} needs calibration inputs to measure "
            f"{'activation norms' if criterion == 'wanda' else 'gradients'}; pass "
            "optimize(..., calibration=[batch, ...]) (a few batches shaped like the example "
            "inputs), or use criterion=l2"
        )
    include_re, exclude_re = (re.compile(p) if p else None for p in (include, exclude))
    sets, unresolved = find_coupled_sets(gm, ctx.analysis("dataflow"))
    skipped = [
        {"layer": u.layer, "reason": _excluded([u.layer], include_re, exclude_re) or u.reason}
        for u in unresolved
        if u.kind == target
    ]
    plans = []
    for coupled in (s for s in sets if s.kind == target):
        kept_count = kept_groups(coupled.groups, coupled.unit, ratio, round_to)
        reason = _excluded(coupled.layers, include_re, exclude_re)
        if reason is None and kept_count == coupled.groups:
            reason = _nothing_to_remove(coupled.groups, ratio, round_to, GROUP_NAMES[target])
        if reason:
            skipped.append({"layer": coupled.path, "reason": reason})
        else:
            plans.append(_Plan(coupled, kept_count))
    for plan, scores in zip(
        plans, score_groups(gm, ctx, [p.coupled for p in plans], criterion), strict=True
    ):
        order = torch.argsort(scores, descending=True, stable=True)
        plan.kept = sorted(order[: plan.kept_count].tolist())
        plan.scores = scores.tolist()
    params_before = parameter_count(gm)
    layers, parameters_removed = _apply(gm, plans, target)
    if plans:
        propagate_shapes(gm)
        gm.recompile()
    params_after = params_before - parameters_removed
    return _result(plans, layers, skipped, target, criterion, params_before, params_after)


def validate_structured(
    target: str,
    ratio: float,
    criterion: str,
    round_to: int,
    include: str | None = None,
    exclude: str | None = None,
) -> None:
    """Raise ``PipelineError`` naming the first bad option of structured pruning."""
    if target not in TARGETS:
        raise PipelineError(f"pass 'prune': target={target!r} must be one of {', '.join(TARGETS)}")
    if criterion not in CRITERIA:
        raise PipelineError(
            f"pass 'prune': kind=structured criterion={criterion!r} must be one of "
            f"{', '.join(CRITERIA)}"
        )
    if not 0 < ratio < 1:
        raise PipelineError(
            f"pass 'prune': ratio={ratio:g} must be in (0, 1): the fraction of each layer's "
            f"{GROUP_NAMES[target]} to remove"
        )
    if round_to < 1:
        raise PipelineError(
            f"pass 'prune': round_to={round_to} must be >= 1 (1 keeps widths as they come)"
        )
    for option, pattern in (("include", include), ("exclude", exclude)):
        try:
            re.compile(pattern or "")
        except re.error as error:
            raise PipelineError(
                f"pass 'prune': {option}={pattern!r} is not a valid regular expression ({error})"
            ) from error


def kept_groups(groups: int, unit: int, ratio: float, round_to: int) -> int:
    """How many of ``groups`` groups (each ``unit`` wide) stay when ``ratio`` of them go.

    The kept width ``kept · unit`` is rounded *up* to a multiple of ``round_to`` (fast kernels like
    multiples of 8), never to zero, and never above ``groups``.

    >>> kept_groups(3072, 1, 0.5, 8), kept_groups(12, 1, 0.5, 8), kept_groups(12, 64, 0.5, 8)
    (1536, 8, 6)
    """
    step = round_to // math.gcd(round_to, unit)  # groups per multiple of round_to
    kept = groups - _removable(groups, ratio)
    return min(groups, max(step, math.ceil(kept / step) * step))


def _removable(groups: int, ratio: float) -> int:
    return math.floor(ratio * groups + 1e-9)  # 0.3 · 10 is 2.9999999999999996 in floating point


def _nothing_to_remove(groups: int, ratio: float, round_to: int, unit_name: str) -> str:
    share = f"ratio={ratio:g} of {groups} {unit_name}"
    if _removable(groups, ratio) == 0:
        return f"nothing to remove: {share} is less than one"
    return f"nothing to remove: {share} keeps all {groups} after rounding widths up to a multiple of {round_to}"


def score_groups(
    gm: fx.GraphModule, ctx: PassContext, sets: list[CoupledSet], criterion: str
) -> list[torch.Tensor]:
    """One float64 score per group of each set; a higher score means more important."""
    weights = [s for coupled in sets for s in coupled.slices if s.role != "param"]
    norms = _input_norms(gm, ctx, weights) if criterion == "wanda" and weights else {}
    grads = (
        _gradients(gm, ctx, sorted({s.source.target for s in weights}))
        if criterion == "taylor" and weights
        else {}
    )
    scores = []
    for coupled in sets:
        total = torch.zeros(coupled.groups, dtype=torch.float64)
        for s in (s for s in coupled.slices if s.role != "param"):
            weight = get_attr_value(gm, s.source.target).detach().double()
            importance = _importance(weight, s, criterion, norms, grads)
            per_index = importance.sum([d for d in range(weight.dim()) if d != s.dim])
            total += per_index.view(s.axis.segments, s.axis.groups, -1).sum((0, 2))
        scores.append(_finish(total, criterion))
    return scores


def _finish(total: torch.Tensor, criterion: str) -> torch.Tensor:
    """Σ|w| and Σ|w|·‖X‖ are scores as they are; Σw² becomes a norm and Σw·∂L/∂w a magnitude."""
    if criterion in ("l2", "magnitude"):
        return total.sqrt()
    return total.abs() if criterion == "taylor" else total


def parameter_count(gm: fx.GraphModule) -> int:
    """Elements of the distinct ``nn.Parameter``s the graph reads.

    Buffers (BatchNorm statistics, position ids) are not counted, so on a freshly captured model
    this is ``sum(p.numel() for p in model.parameters())`` over the parameters ``forward`` uses.
    """
    tensors: dict[int, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            found = [get_attr_value(gm, node.target)]
        elif node.op == "call_module":
            found = list(get_attr_value(gm, node.target).state_dict(keep_vars=True).values())
        else:
            continue
        tensors.update((id(t), t) for t in found if isinstance(t, nn.Parameter))
    return sum(t.numel() for t in tensors.values())


@dataclass
class _Plan:
    coupled: CoupledSet
    kept_count: int
    kept: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def _excluded(
    layers: list[str], include: re.Pattern | None, exclude: re.Pattern | None
) -> str | None:
    if include and not any(include.search(layer) for layer in layers):
        return f"excluded: no layer matches include={include.pattern!r}"
    hit = next((layer for layer in layers if exclude and exclude.search(layer)), None)
    return f"excluded: {hit} matches exclude={exclude.pattern!r}" if hit else None


def _importance(
    weight: torch.Tensor,
    s: TensorSlice,
    criterion: str,
    norms: dict[Any, torch.Tensor],
    grads: dict[str, torch.Tensor],
) -> torch.Tensor:
    if criterion == "l1":
        return weight.abs()
    if criterion in ("l2", "magnitude"):
        return weight.square()
    if criterion == "taylor":
        return weight * grads[s.source.target].double()
    shape = [1] * weight.dim()
    shape[s.input_dim] = -1
    return weight.abs() * norms[s.input, s.input_channels_first].view(shape)


def _input_norms(
    gm: fx.GraphModule, ctx: PassContext, weights: list[TensorSlice]
) -> dict[tuple[fx.Node, bool], torch.Tensor]:
    """‖X_j‖ per input feature of every weighted layer, over the calibration batches.

    The statistic is per input *node* (layers reading the same tensor share it) and a conv's
    features are its channels, dim 1, where ``squared_column_norms`` reduces over the last dim:
    so the statistics run on a copy of the graph with a probe ``alias(x)`` after each input
    (conv inputs moved channels-last first).
    """
    with (
        warnings.catch_warnings()
    ):  # torch's pytree codegen warns about its own deprecated LeafSpec
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    by_name = {node.name: node for node in graph.nodes}
    probes: dict[tuple[fx.Node, bool], str] = {}
    for s in weights:
        key = (s.input, s.input_channels_first)
        if key in probes:
            continue
        with graph.inserting_after(by_name[s.input.name]):
            x = by_name[s.input.name]
            if s.input_channels_first:
                x = graph.call_function(torch.ops.aten.movedim.int, (x, 1, -1))
        with graph.inserting_after(x):
            probes[key] = graph.call_function(torch.ops.aten.alias.default, (x,)).name
    probed = fx.GraphModule(gm, graph)
    sums = input_statistics(
        probed,
        list(probes.values()),
        ctx.calibration,
        squared_column_norms,
        description="prune: input norms",
    )
    missing = [name for name in probes.values() if name not in sums]
    if missing:
        raise PassError(
            "prune", f"criterion=wanda: the calibration batches never reach {missing[0]}"
        )
    return {key: sums[name].sqrt() for key, name in probes.items()}


def _gradients(gm: fx.GraphModule, ctx: PassContext, targets: list[str]) -> dict[str, torch.Tensor]:
    """Σ over calibration batches of ∂L/∂w for each weight in ``targets`` (L: see the module docstring)."""
    leaves = {t: get_attr_value(gm, t).detach().requires_grad_(True) for t in targets}
    totals = {t: torch.zeros_like(leaf) for t, leaf in leaves.items()}
    with torch.enable_grad():
        for args, kwargs in track(ctx.calibration, description="prune: Taylor gradients", transient=True,
                                  disable=len(ctx.calibration) < PROGRESS_AFTER_BATCHES):
            loss = _taylor_loss(torch.func.functional_call(gm, leaves, args, kwargs))
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for target, grad in zip(leaves, grads, strict=True):
                if grad is not None:
                    totals[target] += grad
    return totals


def _taylor_loss(outputs: Any) -> torch.Tensor:
    tensors = [
        t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    losses = [t for t in tensors if t.dim() == 0]
    if not tensors:
        raise PassError(
            "prune", "criterion=taylor: the model returns no floating-point output to differentiate"
        )
    return sum(losses) if losses else sum(t.pow(2).mean() for t in tensors)


def _apply(gm: fx.GraphModule, plans: list[_Plan], target: str) -> tuple[list[dict[str, Any]], int]:
    """Slice every coupled tensor into a new one at the same path, and shrink the literal sizes.

    Returns the per-layer report and how many ``nn.Parameter`` elements went (buffers such as
    BatchNorm statistics are sliced and reported too, but are not parameters).
    """
    cuts: dict[fx.Node, dict[int, torch.Tensor]] = {}
    first_slice: dict[fx.Node, TensorSlice] = {}
    for plan in plans:  # every index is computed from the original sizes before anything changes
        for s in plan.coupled.slices:
            size = get_attr_value(gm, s.source.target).shape[s.dim]
            cuts.setdefault(s.source, {})[s.dim] = s.axis.indices(size, plan.kept)
            first_slice.setdefault(s.source, s)
        for edit in plan.coupled.edits:
            edit.apply(len(plan.kept))
    layers: dict[fx.Node, dict[str, Any]] = {}
    parameters_removed = 0
    for source, dims in cuts.items():
        old = get_attr_value(gm, source.target)
        new = old.detach()
        for dim, index in dims.items():
            new = new.index_select(dim, index)
        _replace_tensor(gm, source.target, old, new)
        s = first_slice[source]
        layer = layers.setdefault(
            s.user,
            {
                "layer": s.layer,
                "kind": "structured",
                "target": target,
                "shape_before": list(old.shape),
                "shape_after": list(new.shape),
                "sparsity": (new == 0).double().mean().item(),
                "params_removed": 0,
                "bytes_removed": 0,
            },
        )
        layer["params_removed"] += old.numel() - new.numel()
        parameters_removed += (old.numel() - new.numel()) * isinstance(old, nn.Parameter)
        layer["bytes_removed"] += (old.numel() - new.numel()) * old.element_size()
    return list(layers.values()), parameters_removed


def _replace_tensor(gm: fx.GraphModule, target: str, old: torch.Tensor, new: torch.Tensor) -> None:
    """Put ``new`` where ``old`` was, as the same kind of attribute; ``old`` itself is left untouched."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    setattr(
        owner, name, nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new
    )


def _result(
    plans: list[_Plan],
    layers: list[dict[str, Any]],
    skipped: list[dict[str, str]],
    target: str,
    criterion: str,
    params_before: int,
    params_after: int,
) -> PassResult:
    unit = GROUP_NAMES[target]
    sets = [
        {
            "layer": p.coupled.path,
            "target": target,
            "groups_before": p.coupled.groups,
            "groups_after": len(p.kept),
            "kept": p.kept,
            "scores": p.scores,
        }
        for p in plans
    ]
    notes = []
    if plans:
        notes.append(
            f"{target}: {len(plans)} set(s) pruned by {criterion}; parameters {params_before:,} → "
            f"{params_after:,} ({1 - params_after / params_before:.1%} fewer)"
        )
    for plan, s in zip(plans, sets, strict=True):
        per_group = plan.coupled.query_heads_per_group
        what = f"key/value heads ({per_group} query heads each)" if per_group > 1 else unit
        notes.append(f"{s['layer']}: {s['groups_before']} → {s['groups_after']} {what}")
    notes += [f"skipped {s['layer']}: {s['reason']}" for s in skipped]
    if not plans and not skipped:
        notes.append(
            f"no {target} sets found: the coupling rules read ATen graphs (slimgraph.ir.capture, "
            "optimize()); a graph of other ops is left as it is"
        )
    stats = {
        "layers": layers,
        "skipped": skipped,
        "sets": sets,
        "params_before": params_before,
        "params_after": params_after,
    }
    return PassResult(
        matched=len(plans) + len(skipped), rewritten=len(plans), notes=notes, stats=stats
    )
