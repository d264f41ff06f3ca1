"""What each quantized layer becomes: format specs, their encodings, and mixed precision.

A *format spec* is ``NAME[+lorc][(option=value, ...)]`` (``int8``, ``nf4+lorc``,
``int4(group_size=32)``, ``nf4+lorc(rank=8)``); ``FormatSpec.encode`` packs one weight in
it and measures the relative weight error ``t² = ‖Ŵ − W‖² / ‖W‖²``.

Mixed precision under a size budget (``quantize(budget_bits=...)``) rests on the
linearity theorem (HIGGS paper, REFERENCES.md): quantizing layer l with error ``t²_l``
raises the model's relative output MSE by about ``α_l · t²_l``, and the increases of
different layers add up. So:

1. ``estimate_sensitivities`` measures ``α_l``: Gaussian noise of known relative size ``t²``
   is added to one layer's weight at a time and the graph runs on the calibration inputs;
   ``α_l = (relative output MSE) / t²``.
2. ``plan_mixed_precision`` then picks one encoding per layer minimising ``Σ α_l t²_{l,f}``
   subject to ``Σ bits_{l,f} ≤ budget``: a multiple-choice knapsack, solved exactly by
   dynamic programming over a discretised budget (``choose_candidates``).

``t²`` is the error of the weights alone: formats that also quantize activations at run
time (``w8a8``, ``llm_int8``) look as good as ``int8`` to the planner, and the measured
output error the pass reports is the check.

Example (the ``quantize`` pass does this for you)::

    int8, int4 = FormatSpec.parse("int8"), FormatSpec.parse("int4")
    layer = PlannedLayer("fc1", "fc1.weight", w.numel(), [int8.encode(w), int4.encode(w)])
    plan = plan_mixed_precision(gm, [layer], budget_bits=6.0, calibration=[((x,), {})])
    plan.choices  # [1]: int4 fits the budget and int8 does not
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from rich.progress import track
from torch.utils._pytree import tree_leaves

from slimgraph.errors import PipelineError
from slimgraph.kernels import FORMATS
from slimgraph.kernels.gptq import PackedLinear, gptq_pack
from slimgraph.kernels.lorc import LowRankCorrection, fit_low_rank_correction
from slimgraph.passes.manager import choices_hint
from slimgraph.passes.options import literal

NOISE_REL_MSE = 0.01  # t² of the probe noise: the size of a 4-bit format's error, inside the linear regime
NOISE_SEEDS = 2  # probes averaged per layer
NOISE_SEED_BASE = 7_000_003  # far from the small seeds people draw test data with: noise must not mirror it
PROGRESS_AFTER_SECONDS = 1.0  # show a progress bar only when the probes will take longer than this
MAX_DP_CELLS = 2**25  # layers × budget steps kept for the back-tracking table (int16: 64 MiB)


@dataclass(frozen=True)
class FormatSpec:
    """A parsed ``NAME[+lorc][(option=value, ...)]``: the format, its options, the LoRC rank.

    >>> FormatSpec.parse("int4(group_size=32)").options
    Int4Options(group_size=32, symmetric=False)
    """

    label: str
    name: str
    options: Any
    lorc_rank: int | None = None

    @classmethod
    def parse(cls, text: str, pass_options: dict[str, Any] | None = None, rank: int = 16,
              where: str = "format") -> FormatSpec:
        """``text`` with the pass-level format options the format has; ``where`` starts error messages."""
        match = _SPEC.fullmatch(text.strip())
        if not match:
            raise PipelineError(f"pass 'quantize': {where}: {text!r} is not a format spec; write NAME, NAME+lorc "
                                "or NAME(option=value, ...), e.g. int8, nf4+lorc, 'int4(group_size=32)'")
        name, lorc = match["name"], bool(match["lorc"])
        if name not in FORMATS:
            skip = " ('skip' leaves a layer in floating point)" if where.startswith("override") else ""
            raise PipelineError(f"pass 'quantize': {where}: unknown format '{name}'. "
                                f"{choices_hint('formats', name, FORMATS)}{skip}")
        own = dict(_option(item, where) for item in (match["options"] or "").split(",") if item.strip())
        rank = own.pop("rank", rank) if lorc else rank
        given = {k: v for k, v in (pass_options or {}).items() if k in FORMATS[name].option_names} | own
        try:
            options = FORMATS[name].make_options(**given)
        except (ValueError, TypeError) as error:
            raise PipelineError(f"pass 'quantize': {where}: {error}") from error
        if not (isinstance(rank, int) and rank >= 1):
            raise PipelineError(f"pass 'quantize': {where}: rank={rank!r} must be an integer >= 1")
        return cls(re.sub(r"\s+", "", text), name, options, rank if lorc else None)

    def why_not(self, weight: torch.Tensor) -> str | None:
        return FORMATS[self.name].why_not(weight, self.options)

    def encode(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> EncodedWeight:
        """Pack ``weight`` (and fit the LoRC factors); measures the relative weight error ``t²``.

        With the layer input's Gram matrix ``hessian`` (``Σ xᵀx``) the codes are chosen by
        GPTQ, which lowers the output error at the same bits; without it, rounded to nearest.
        """
        fmt = FORMATS[self.name]
        packed = fmt.pack(weight, self.options) if hessian is None else gptq_pack(fmt, weight, hessian, self.options)
        approximation = fmt.dequantize(packed).float()
        correction = fit_low_rank_correction(weight, approximation, self.lorc_rank) if self.lorc_rank else None
        if correction is not None:
            approximation = approximation + correction.matrix()
        reference = weight.detach().float()
        rel_mse = ((approximation - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30)).item()
        return EncodedWeight(self, packed, correction, weight.numel(), rel_mse)


@dataclass
class EncodedWeight:
    """One layer's weight in one spec: packed buffers, optional LoRC factors, cost and error."""

    spec: FormatSpec
    packed: PackedLinear
    correction: LowRankCorrection | None
    numel: int
    rel_mse: float  # t² = ‖Ŵ − W‖² / ‖W‖², Ŵ including the correction

    @property
    def bits_per_weight(self) -> float:
        return self.packed.bits_per_weight + (self.correction.bits_per_weight if self.correction else 0.0)

    @property
    def bits(self) -> float:
        return self.bits_per_weight * self.numel


@dataclass
class PlannedLayer:
    """A layer the planner decides for; ``target`` is its weight's attribute name in the graph."""

    path: str
    target: str
    numel: int
    candidates: Sequence[EncodedWeight]


@dataclass
class MixedPrecisionPlan:
    """The chosen candidate per layer, the measured sensitivities, and the predicted output error."""

    choices: list[int]
    sensitivities: list[float]
    predicted_rel_mse: float
    budget_slack_bits_per_weight: float  # the DP may leave up to this much of the budget unused
    reference_outputs: list[Any]


def plan_mixed_precision(gm: fx.GraphModule, layers: Sequence[PlannedLayer], budget_bits: float,
                         calibration: Sequence[tuple[tuple, dict[str, Any]]]) -> MixedPrecisionPlan:
    """Choose an encoding per layer so the layers average at most ``budget_bits`` bits per weight.

    Raises ``PipelineError`` when even the cheapest candidates exceed the budget (before
    any probe runs) and when there are no calibration inputs.
    """
    total_numel = sum(layer.numel for layer in layers)
    _check_budget_reachable(layers, budget_bits, total_numel)
    alphas, reference = estimate_sensitivities(gm, {layer.path: layer.target for layer in layers}, calibration)
    sensitivities = [alphas[layer.path] for layer in layers]
    costs = [[c.bits for c in layer.candidates] for layer in layers]
    errors = [[alpha * c.rel_mse for c in layer.candidates] for alpha, layer in zip(sensitivities, layers, strict=True)]
    choices, slack_bits = choose_within_budget(costs, errors, budget_bits * total_numel)  # reachable: checked
    predicted = sum(errors[index][choice] for index, choice in enumerate(choices))
    return MixedPrecisionPlan(choices, sensitivities, predicted, slack_bits / total_numel, reference)


def estimate_sensitivities(gm: fx.GraphModule, targets: dict[str, str],
                           calibration: Sequence[tuple[tuple, dict[str, Any]]],
                           noise_rel_mse: float = NOISE_REL_MSE, seeds: int = NOISE_SEEDS
                           ) -> tuple[dict[str, float], list[Any]]:
    """``({path: α}, reference outputs)``: output sensitivity of each weight in ``targets``.

    ``targets`` maps a layer path to its weight's attribute name in ``gm``. The noisy weight
    is swapped in with ``torch.func.functional_call``, so no tensor of ``gm`` is written.
    """
    require_calibration(calibration)
    start = time.perf_counter()
    try:
        reference = run_on(gm, calibration)
    except Exception as error:
        raise RuntimeError(f"the graph does not run on the calibration inputs ({error}); give batches shaped "
                           "like the example inputs, or capture with dynamic_shapes") from error
    seconds_per_probe = time.perf_counter() - start
    probes = [(path, seed) for path in targets for seed in range(seeds)]
    slow = len(probes) * seconds_per_probe > PROGRESS_AFTER_SECONDS
    errors: dict[str, float] = dict.fromkeys(targets, 0.0)
    for index, (path, _) in enumerate(track(probes, description="quantize: layer sensitivities",
                                               transient=True, disable=not slow)):
        noisy = _with_noise(_attribute(gm, targets[path]), noise_rel_mse, seed=NOISE_SEED_BASE + index)
        outputs = run_on(gm, calibration, {targets[path]: noisy})
        errors[path] += relative_output_mse(outputs, reference) / seeds
    return {path: error / noise_rel_mse for path, error in errors.items()}, reference


def require_calibration(calibration: Sequence[Any], option: str = "budget_bits") -> None:
    """Sensitivities and GPTQ are measured on real inputs: say which option gives them."""
    if not calibration:
        need = "each layer's sensitivity" if option == "budget_bits" else "each layer's input statistics"
        raise PipelineError(f"pass 'quantize': {option} needs calibration inputs to measure {need}; pass "
                            "optimize(..., calibration=[batch, ...]) (a few batches of real inputs, shaped like "
                            "the example inputs)")


def choose_within_budget(bits: Sequence[Sequence[float]], errors: Sequence[Sequence[float]],
                         budget_bits: float) -> tuple[list[int], float]:
    """``(choice per layer, slack in bits)``: ``choose_candidates`` on a discretised budget.

    What is discretised is the room above the cheapest plan: each candidate costs its bits
    beyond its layer's cheapest candidate, rounded *up* to whole steps of
    ``(budget − cheapest plan) / capacity``. Rounding up keeps every plan inside the real
    budget, and the cheapest plan always fits. It adds less than one step per layer, so the
    plan is at least as good as the exact optimum for a budget smaller by ``layers`` steps:
    the returned slack. With ``capacity = 1000 · layers`` that is 0.1% of the room (at most
    0.004 bits/weight between 4 and 8 bits), far below the gap between formats (≥ 0.1
    bits/weight). Very deep models get fewer steps per layer (the table is capped at
    ``MAX_DP_CELLS``). Raises ``ValueError`` when even the cheapest plan exceeds the budget.
    """
    floors = [min(layer) for layer in bits]
    room = budget_bits - sum(floors)
    if room < 0:
        raise ValueError(f"the cheapest plan needs {sum(floors):.0f} bits, over the budget of {budget_bits:.0f}")
    layers = max(len(bits), 1)
    capacity = max(1, min(1000 * layers, MAX_DP_CELLS // layers))
    step = room / capacity
    costs = [[_steps(b - floor, step) for b in layer] for layer, floor in zip(bits, floors, strict=True)]
    return choose_candidates(costs, errors, capacity), layers * step


def choose_candidates(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]],
                      capacity: int) -> list[int] | None:
    """Multiple-choice knapsack: one candidate per layer, ``Σ cost ≤ capacity``, least ``Σ error``.

    ``best[c]`` is the least error of the layers seen so far within total cost ``c``; each new
    layer takes, for every ``c``, the candidate ``f`` minimising ``best[c − cost_f] + error_f``.
    Exact for integer costs, in O(layers · candidates · capacity). ``None`` when nothing fits.
    Ties go to the earlier candidate.

    >>> choose_candidates([[1, 2], [1, 2]], [[5.0, 1.0], [3.0, 0.0]], capacity=3)
    [1, 0]
    """
    best = torch.zeros(capacity + 1, dtype=torch.float64)
    picks = torch.full((len(costs), capacity + 1), -1, dtype=torch.int16)
    for layer, (layer_costs, layer_errors) in enumerate(zip(costs, errors, strict=True)):
        new = torch.full_like(best, math.inf)
        for index, (cost, error) in enumerate(zip(layer_costs, layer_errors, strict=True)):
            if cost > capacity:
                continue
            candidate = torch.full_like(best, math.inf)
            candidate[cost:] = best[: capacity + 1 - cost] + error
            better = candidate < new
            new = torch.where(better, candidate, new)
            picks[layer, better] = index
        best = new
    if math.isinf(best[capacity].item()):
        return None
    choices, remaining = [], capacity
    for layer in reversed(range(len(costs))):
        choice = int(picks[layer, remaining])
        choices.append(choice)
        remaining -= costs[layer][choice]
    return choices[::-1]


def run_on(gm: fx.GraphModule, calibration: Sequence[tuple[tuple, dict[str, Any]]],
           replacements: dict[str, torch.Tensor] | None = None) -> list[Any]:
    """``gm``'s outputs on every calibration batch, with some attributes swapped (not written)."""
    with torch.no_grad():
        return [torch.func.functional_call(gm, replacements or {}, args, kwargs) for args, kwargs in calibration]


def relative_output_mse(outputs: Sequence[Any], reference: Sequence[Any]) -> float:
    """``Σ ‖out − ref‖² / Σ ‖ref‖²`` over every floating-point output tensor of every batch."""
    squared_error = squared_reference = 0.0
    for got, want in zip(outputs, reference, strict=True):
        for a, b in zip(tree_leaves(got), tree_leaves(want), strict=True):
            if isinstance(b, torch.Tensor) and b.is_floating_point():
                squared_error += (a.double() - b.double()).pow(2).sum().item()
                squared_reference += b.double().pow(2).sum().item()
    return squared_error / squared_reference if squared_reference else 0.0


def _check_budget_reachable(layers: Sequence[PlannedLayer], budget_bits: float, total_numel: int) -> None:
    cheapest = [min(layer.candidates, key=lambda c: c.bits) for layer in layers]
    cheapest_bits = sum(c.bits for c in cheapest) / total_numel
    if cheapest_bits <= budget_bits:
        return
    labels = sorted({c.spec.label for c in cheapest})
    what = (f"cheapest candidate ({labels[0]} at {cheapest_bits:.3f} bits/weight)" if len(labels) == 1 else
            f"cheapest plan ({' + '.join(labels)}: {cheapest_bits:.3f} bits/weight)")
    raise PipelineError(f"pass 'quantize': budget_bits={budget_bits:g} is below the {what}; "
                        "raise it or add a cheaper format to formats=[...]")


def _steps(extra_bits: float, step: float) -> int:
    """``extra_bits`` in whole budget steps, rounded up; past the capacity when there is no room."""
    if extra_bits <= 0:
        return 0
    return math.ceil(extra_bits / step - 1e-9) if step > 0 else MAX_DP_CELLS + 1  # 1e-9: float noise


def _attribute(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _with_noise(weight: torch.Tensor, rel_mse: float, seed: int) -> torch.Tensor:
    """A new tensor ``weight + noise`` with ``‖noise‖² / ‖weight‖² = rel_mse`` exactly (Gaussian direction)."""
    original = weight.detach().float()
    noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(seed)).to(original.device)
    scale = (rel_mse * original.pow(2).sum() / noise.pow(2).sum()).sqrt()
    return (original + scale * noise).to(weight.dtype)


_SPEC = re.compile(r"(?P<name>[\w-]+)(?P<lorc>\+lorc)?(?:\((?P<options>[^()]*)\))?")


def _option(item: str, where: str) -> tuple[str, Any]:
    key, equals, value = (part.strip() for part in item.partition("="))
    if not (equals and key and value):
        raise PipelineError(f"pass 'quantize': {where}: format option {item.strip()!r} is not option=value")
    return key, literal(value)
