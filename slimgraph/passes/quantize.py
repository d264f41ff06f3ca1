"""quantize: weights of Linear (and Conv) layers → packed low-bit buffers read by a custom op.

Matches every ``LinearView`` (aten/torch/call_module linear, GPT-2's ``Conv1D``
addmm) selected by ``include``/``exclude`` regexes on the module path; the output
head and tiny layers are skipped, each with its reason in the notes. Rewrites
``linear(x, W, b)`` into ``slimgraph::linear_<format>(x, *packed buffers, b, ...)``
with the buffers stored as graph constants; the float weights are then freed.
Verified by the runner (numeric check against the reference, ``tolerance``).

A *format spec* names what one layer becomes: ``NAME[+lorc][(option=value, ...)]``,
e.g. ``int8``, ``nf4+lorc``, ``int4(group_size=32)``, ``nf4+lorc(rank=8)``. Pass-level
format options (``group_size=32``) apply to every spec whose format has them; a spec's
own options win. ``+lorc`` adds a rank-``rank`` correction of the quantization error
(``kernels/lorc.py``, ``slimgraph::lorc_correction`` after the quantized op).

- ``format=SPEC`` (default ``int8``): one spec for every layer.
- ``overrides=['REGEX:SPEC', 'REGEX:skip']``: per layer, the first entry whose regex
  matches the layer's path as the report shows it (``re.search``) wins, over
  ``include``/``exclude``, the head rule and ``min_features``.
- ``embeddings=true``: embedding tables become int8 rows (``slimgraph::embedding_int8``,
  one scale per row, only the rows looked up are widened); a table also read elsewhere
  (tied to an output head) stays float, with the reason in the notes.
- ``convs=true``: Conv1d/Conv2d weights become int8 per output channel too
  (``slimgraph::conv_int8``, ``kernels/conv.py``), chosen by the same ``include``/``exclude``/
  ``overrides``/head/``min_features`` rules (the weight seen as ``[out, in/groups·kernel]``); a conv
  whose spec is not ``int8`` is skipped with the reason. Convs round to nearest under
  ``method=gptq`` and cannot be combined with ``budget_bits``.
- ``method=gptq``: choose the codes with GPTQ (``kernels/gptq.py``) from the Gram
  matrix of each layer's input on ``optimize(..., calibration=...)``, instead of
  rounding to nearest: same bits, lower output error.
- ``smooth=α`` (``w8a8``, ``llm_int8``): SmoothQuant (``kernels/w8a8.py``), from each
  layer's per-channel input ``max |x|`` on ``optimize(..., calibration=...)``.
- ``budget_bits=B, formats=[SPEC, ...]``: mixed precision. Each layer gets the
  candidate that minimises the predicted output error with the quantized layers
  averaging at most ``B`` bits per weight (``quantize_plan.py``; needs
  ``optimize(..., calibration=...)``). ``format`` must then be unset; overridden
  layers keep their spec and count against the budget, skipped ones stay float.

In pipeline text (quote specs with parentheses)::

    quantize(format=int4, overrides=[attention:int8, output.dense:skip])
    quantize(format=nf4+lorc, rank=32)
    quantize(format=int4, group_size=32, method=gptq)
    quantize(format=w8a8, smooth=0.5)
    quantize(format=int8, convs=true, overrides=['stem:skip'])
    quantize(budget_bits=5, formats=[int8, 'int4(group_size=32)', nf4], overrides=[lm_head:int8])
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.fx as fx
from torch import nn

from slimgraph.errors import PipelineError
from slimgraph.ir.graph_utils import eliminate_dead_code, unique_attribute_name
from slimgraph.ir.nodes import node_value
from slimgraph.ir.views import ConvView, EmbeddingView, LinearView
from slimgraph.kernels import FORMATS
from slimgraph.kernels.conv import dequantize_conv_int8, explicit_padding, pack_conv_int8
from slimgraph.kernels.int8 import quantize_weight_int8
from slimgraph.kernels.w8a8 import input_absmax, smoothquant_pack
from slimgraph.passes.activations import gram, input_statistics
from slimgraph.passes.manager import Pass, PassContext, PassResult, register_pass
from slimgraph.passes.quantize_plan import (
    EncodedWeight,
    FormatSpec,
    MixedPrecisionPlan,
    PlannedLayer,
    plan_mixed_precision,
    relative_output_mse,
    require_calibration,
    run_on,
)

FORMAT_OPTIONS = ("group_size", "symmetric", "double_quant", "bits", "p", "seed", "variant", "threshold", "smooth")
HEAD_NAMES = {"lm_head", "head", "classifier", "score", "output", "output_projection"}
DEFAULT_FORMAT = "int8"
DEFAULT_CANDIDATES = ("int8", "int4", "nf4")
DEFAULT_LORC_RANK = 16


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """Weight-only quantization of Linear (and Conv) layers: one format, per-layer overrides, or a bit budget."""

    name: ClassVar[str] = "quantize"
    preserves: ClassVar[tuple[str, ...]] = ("shapes", "blocks")

    format: str | None = None  # a format spec; None means int8, or the planner's choice with budget_bits
    # Format options: None means the format's default; setting one no format in use has is an error.
    group_size: int | None = None
    symmetric: bool | None = None
    double_quant: bool | None = None
    bits: int | None = None
    p: int | None = None
    seed: int | None = None
    variant: str | None = None
    threshold: float | None = None
    smooth: float | None = None  # SmoothQuant's α for w8a8/llm_int8 (needs calibration)
    rank: int | None = None  # LoRC rank of +lorc specs (default 16)
    overrides: tuple[str, ...] = ()
    budget_bits: float | None = None
    formats: tuple[str, ...] = ()  # the planner's candidates (default int8, int4, nf4)
    method: Literal["rtn", "gptq"] = "rtn"  # round to nearest, or GPTQ on calibration inputs
    embeddings: bool = False  # also store embedding tables as int8 rows (one scale per row)
    convs: bool = False  # also quantize Conv1d/Conv2d weights (int8 per output channel)
    include: str = ""
    exclude: str = ""
    quantize_head: bool = False
    min_features: int = 16

    def validate(self) -> None:
        if self.budget_bits is not None:
            if self.format is not None:
                raise PipelineError(f"pass 'quantize': format={self.format} and budget_bits={self.budget_bits:g} "
                                    "both given; with a budget each layer's format is chosen from formats=[...], "
                                    "so drop format= (pin single layers with overrides=['REGEX:FORMAT'])")
            if not self.budget_bits > 0:
                raise PipelineError(f"pass 'quantize': budget_bits={self.budget_bits:g} must be > 0 "
                                    "(average bits per weight of the quantized layers, e.g. 4.5)")
            if self.convs:
                raise PipelineError("pass 'quantize': convs=true with budget_bits is not supported (the "
                                    "mixed-precision planner handles linears only); run two passes, e.g. "
                                    "'quantize(budget_bits=..., formats=[...]), quantize(convs=true, include=CONVS)'")
        elif self.formats:
            raise PipelineError("pass 'quantize': formats=[...] lists the candidates of the bit-budget planner; "
                                "add budget_bits=... (or use format=... for one format everywhere)")
        if self.rank is not None and self.rank < 1:
            raise PipelineError(f"pass 'quantize': rank={self.rank} must be >= 1")
        specs = [*self.candidate_specs(), *(rule.spec for rule in self.override_rules() if rule.spec)]
        self._check_pass_level_options(specs)
        if self.method == "gptq":
            _check_gptq_support(specs)
        if any(_smooths(spec) and spec.lorc_rank for spec in specs):
            raise PipelineError("pass 'quantize': smooth=α does not combine with +lorc (the correction would be fit "
                                "to the unsmoothed weight); drop one of them")
        if self.rank is not None and not any(spec.lorc_rank for spec in specs):
            raise PipelineError(f"pass 'quantize': rank={self.rank} only applies to +lorc formats, "
                                "e.g. format=nf4+lorc")
        for option in ("include", "exclude"):
            _compile(getattr(self, option), f"{option}={getattr(self, option)!r}")

    def candidate_specs(self) -> list[FormatSpec]:
        """The specs a layer without override may get: the planner's candidates, or ``format``."""
        if self.budget_bits is None:
            return [self._spec(self.format or DEFAULT_FORMAT, f"format={self.format or DEFAULT_FORMAT}")]
        return [self._spec(text, f"formats entry {text!r}") for text in self.formats or DEFAULT_CANDIDATES]

    def override_rules(self) -> list[_Override]:
        """The ``overrides`` entries, parsed, in order."""
        rules = []
        for entry in self.overrides:
            pattern, colon, spec = (part.strip() for part in entry.rpartition(":"))
            if not (colon and pattern and spec):
                raise PipelineError(f"pass 'quantize': override {entry!r} is not 'REGEX:FORMAT'; write e.g. "
                                    "'attention:int8', 'output.dense:skip' or 'mlp:nf4+lorc'")
            regex = _compile(pattern, f"override {entry!r}")
            rules.append(_Override(regex, None if spec == "skip" else self._spec(spec, f"override {entry!r}"), entry))
        return rules

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        rules, candidates = self.override_rules(), self.candidate_specs()
        smoothing = [spec for spec in [*candidates, *(rule.spec for rule in rules if rule.spec)] if _smooths(spec)]
        need = self._calibration_need(smoothing)
        if need:
            require_calibration(ctx.calibration, need)
        views = _linears(gm)
        hessians = self._hessians(gm, ctx, views) if self.method == "gptq" else {}
        absmax = self._input_absmax(gm, ctx, views) if smoothing else {}
        # Every candidate encoding is kept until the plan is made: with int8, int4 and nf4 about
        # 17 bits per weight on top of the model, half a float32 copy.
        layers = [self._layer(view, rules, candidates, hessians.get(view.node.name), absmax.get(view.node.name))
                  for view in views]
        quantized = [layer for layer in layers if layer.candidates]
        plan = self._plan(gm, ctx, quantized) if self.budget_bits is not None and quantized else None
        if self.convs:  # validate() keeps the planner away: a conv's one candidate is its spec
            layers += [self._layer(view, rules, candidates) for view in _convs(gm)]
        for layer in layers:
            if layer.candidates:
                layer.chosen = layer.chosen or layer.candidates[0]  # without a budget: the one spec it may get
        by_node = {layer.node_name: layer for layer in layers if layer.chosen}
        for node in list(gm.graph.nodes):  # matched again: earlier rewrites changed the inputs
            if node.name in by_node and (view := LinearView.match(node) or ConvView.match(node)) is not None:
                _rewrite(gm, view, by_node[node.name].chosen)
        tables = quantize_embeddings(gm) if self.embeddings else []
        dead_nodes, freed = eliminate_dead_code(gm) if by_node or tables else (0, 0)
        stats = self._measure(gm, ctx, plan) if plan else {}
        result = _result(layers, rules, stats, dead_nodes, freed)
        result.notes += [f"embedding {path}: {note}" for path, note in tables]
        result.stats["embeddings"] = dict(tables)
        if self.method == "gptq" and any(layer.kind == "conv" and layer.chosen for layer in layers):
            result.notes.append("conv layers rounded to nearest (method=gptq applies to linears)")
        return result

    def _plan(self, gm: fx.GraphModule, ctx: PassContext, quantized: list[_Layer]) -> MixedPrecisionPlan:
        """Choose each layer's encoding under ``budget_bits`` (``quantize_plan.py``)."""
        planned = [PlannedLayer(layer.path, layer.weight_target, layer.numel, layer.candidates)
                   for layer in quantized]
        plan = plan_mixed_precision(gm, planned, self.budget_bits, ctx.calibration)
        for layer, choice, alpha in zip(quantized, plan.choices, plan.sensitivities, strict=True):
            layer.chosen, layer.sensitivity = layer.candidates[choice], alpha
        return plan

    def _measure(self, gm: fx.GraphModule, ctx: PassContext, plan: MixedPrecisionPlan) -> dict[str, Any]:
        """The planner's prediction next to the rewritten graph's real error on the calibration inputs."""
        gm.recompile()
        measured = relative_output_mse(run_on(gm, ctx.calibration), plan.reference_outputs)
        return {"budget_bits": self.budget_bits, "predicted_output_rel_mse": plan.predicted_rel_mse,
                "measured_output_rel_mse": measured, "calibration_batches": len(ctx.calibration),
                "dp_slack_bits_per_weight": plan.budget_slack_bits_per_weight}

    def _hessians(self, gm: fx.GraphModule, ctx: PassContext, views: list[LinearView]) -> dict[str, torch.Tensor]:
        """``Σ xᵀx`` of each linear's input over the calibration batches (float64, ``[in, in]``)."""
        return input_statistics(gm, [view.node.name for view in views], ctx.calibration, gram,
                                description="quantize: GPTQ input statistics")

    def _input_absmax(self, gm: fx.GraphModule, ctx: PassContext, views: list[LinearView]) -> dict[str, torch.Tensor]:
        """``max |x_j|`` per input channel of each linear over the calibration batches (SmoothQuant's statistic)."""
        return input_statistics(gm, [view.node.name for view in views], ctx.calibration, input_absmax,
                                description="quantize: SmoothQuant input statistics")

    def _calibration_need(self, smoothing: list[FormatSpec]) -> str | None:
        """The option that needs calibration inputs, as the error names it; ``None`` when none does."""
        if self.method == "gptq":
            return "method=gptq"
        if self.budget_bits is not None:
            return "budget_bits"
        return f"{smoothing[0].label} with smooth={smoothing[0].options.smooth}" if smoothing else None

    def _layer(self, view: LinearView | ConvView, rules: list[_Override], candidates: list[FormatSpec],
               hessian: torch.Tensor | None = None, input_absmax: torch.Tensor | None = None) -> _Layer:
        """Skip (with the reason) or encode ``view``'s weight in each spec it may get."""
        kind = "conv" if isinstance(view, ConvView) else "linear"
        layer = _Layer(view.node.name, view.module_path or view.node.name, view.weight_ref.target,
                       view.weight.numel(), kind)
        rule = next((rule for rule in rules if rule.regex.search(layer.path)), None)
        layer.override = rule.entry if rule else None
        layer.skip_reason = _unusable(view.weight)
        if layer.skip_reason is None and rule is not None and rule.spec is None:
            layer.skip_reason = f"override {rule.entry!r}"
        elif layer.skip_reason is None and rule is None:
            layer.skip_reason = self._skip_reason(view)
        if layer.skip_reason is None:
            specs = [rule.spec] if rule else candidates
            encoded = (_encode_conv(view, specs[0]) if kind == "conv"
                       else _encode(view.weight, specs, hessian, input_absmax))
            layer.candidates, layer.skip_reason = encoded
        return layer

    def _skip_reason(self, view: LinearView | ConvView) -> str | None:
        path = view.module_path
        if self.include and not re.search(self.include, path):
            return f"excluded: path does not match include={self.include!r}"
        if self.exclude and re.search(self.exclude, path):
            return f"excluded: path matches exclude={self.exclude!r}"
        if not self.quantize_head and path.rpartition(".")[2] in HEAD_NAMES:
            return "output head (pass quantize_head=true to include it)"
        if min(view.weight.shape[0], view.weight[0].numel()) < self.min_features:  # conv: [out, in/groups·kernel]
            return f"tiny layer {tuple(view.weight.shape)} (min_features={self.min_features})"
        return None

    def _pass_level_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FORMAT_OPTIONS if getattr(self, name) is not None}

    def _spec(self, text: str, where: str) -> FormatSpec:
        return FormatSpec.parse(text, self._pass_level_options(), self.rank or DEFAULT_LORC_RANK, where)

    def _check_pass_level_options(self, specs: list[FormatSpec]) -> None:
        """Each format option set on the pass must be an option of some format in use."""
        names = sorted({spec.name for spec in specs})
        takes = {name: ", ".join(FORMATS[name].option_names) or "none" for name in names}
        for option, value in self._pass_level_options().items():
            if any(option in FORMATS[name].option_names for name in names):
                continue
            if len(names) == 1:
                raise PipelineError(f"pass 'quantize': format '{names[0]}' has no option {option} "
                                    f"(its options: {takes[names[0]]})")
            raise PipelineError(f"pass 'quantize': {option}={value} applies to none of the formats in use "
                                f"(their options: {'; '.join(f'{n}: {t}' for n, t in takes.items())})")


class _Override(NamedTuple):
    regex: re.Pattern
    spec: FormatSpec | None  # None: skip
    entry: str


@dataclass
class _Layer:
    """What the pass decided for one linear or conv: skip (with the reason) or its candidate encodings."""

    node_name: str
    path: str
    weight_target: str
    numel: int
    kind: Literal["linear", "conv"] = "linear"
    candidates: list[EncodedWeight] = field(default_factory=list)
    chosen: EncodedWeight | None = None
    skip_reason: str | None = None
    override: str | None = None
    sensitivity: float | None = None


def _linears(gm: fx.GraphModule) -> list[LinearView]:
    return [view for view in map(LinearView.match, gm.graph.nodes) if view is not None]


def _convs(gm: fx.GraphModule) -> list[ConvView]:
    return [view for view in map(ConvView.match, gm.graph.nodes) if view is not None]


def _unusable(weight: torch.Tensor) -> str | None:
    """Reasons no format or override can help with."""
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if weight.is_meta:
        return "weight is on the meta device (no data to quantize)"
    return None


def _encode(weight: torch.Tensor, specs: list[FormatSpec], hessian: torch.Tensor | None = None,
            input_absmax: torch.Tensor | None = None) -> tuple[list[EncodedWeight], str | None]:
    """The encodings of ``weight`` in every spec that takes it; the reason when none does."""
    rejections = {spec.label: spec.why_not(weight) for spec in specs}
    choices = [_encode_smoothed(spec, weight, input_absmax) if _smooths(spec) else spec.encode(weight, hessian)
               for spec in specs if rejections[spec.label] is None]
    if choices:
        return choices, None
    if len(specs) == 1:
        return [], rejections[specs[0].label]
    return [], "no candidate format takes it: " + "; ".join(f"{k}: {v}" for k, v in rejections.items())


def _smooths(spec: FormatSpec) -> bool:
    return getattr(spec.options, "smooth", None) is not None


def _encode_smoothed(spec: FormatSpec, weight: torch.Tensor, input_absmax: torch.Tensor | None) -> EncodedWeight:
    """``weight`` in a SmoothQuant spec (w8a8/llm_int8 with ``smooth=α``), from its input's per-channel max |x|."""
    packed = smoothquant_pack(FORMATS[spec.name], weight, input_absmax, spec.options)
    packed.format = spec.name
    rel_mse = _relative_mse(FORMATS[spec.name].dequantize(packed), weight)
    return EncodedWeight(spec, packed, None, weight.numel(), rel_mse)


def _relative_mse(approximation: torch.Tensor, weight: torch.Tensor) -> float:
    """``t² = ‖Ŵ − W‖² / ‖W‖²``."""
    weight = weight.detach().float()
    return ((approximation - weight).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30)).item()


def _encode_conv(view: ConvView, spec: FormatSpec) -> tuple[list[EncodedWeight], str | None]:
    """The conv's weight as int8 per output channel, or why it stays float."""
    if spec.name != "int8" or spec.lorc_rank:
        return [], f"conv layers support int8 only ({spec.label} requested)"
    padding = explicit_padding(view.padding, view.weight.shape[2:], view.dilation)
    if padding is None:
        return [], "padding='same' pads one side more with this kernel; conv_int8 takes symmetric padding"
    packed = pack_conv_int8(view.weight, view.stride, padding, view.dilation, view.groups)
    rel_mse = _relative_mse(dequantize_conv_int8(packed), view.weight)
    return [EncodedWeight(spec, packed, None, view.weight.numel(), rel_mse)], None


def _result(layers: list[_Layer], rules: list[_Override], stats: dict[str, Any], dead_nodes: int,
            freed: int) -> PassResult:
    done = [layer for layer in layers if layer.chosen]
    numel = sum(layer.numel for layer in done)
    bits = sum(layer.chosen.bits for layer in done) / numel if numel else 0.0
    per_layer = {layer.path: _layer_stats(layer) for layer in done}
    skipped = {layer.path: layer.skip_reason for layer in layers if layer.skip_reason}
    used = {layer.override for layer in layers}
    notes = [_summary(done, bits)] if done else []
    if "budget_bits" in stats:
        notes.append(f"budget {stats['budget_bits']:g} bits/weight: output rel. MSE predicted "
                     f"{stats['predicted_output_rel_mse']:.2e} (Σ α·t²), measured {stats['measured_output_rel_mse']:.2e} "
                     f"on {stats['calibration_batches']} calibration batch(es)")
    notes += [f"{path} → {info['format']}: {info['bits_per_weight']:.3f} bits/weight, weight rel. MSE "
              f"{info['rel_mse']:.2e}" + (f", α={info['sensitivity']:.3g}" if "sensitivity" in info else "")
              for path, info in per_layer.items()]
    notes += [f"skipped {path}: {reason}" for path, reason in skipped.items()]
    notes += [f"override {rule.entry!r} matched no layer" for rule in rules if rule.entry not in used]
    return PassResult(matched=len(layers), rewritten=len(done) + dead_nodes, notes=notes,
                      stats={"quantized": len(done), "skipped": skipped, "bits_per_weight": bits,
                             "freed_tensors": freed, "layers": per_layer, **stats})


def _summary(done: list[_Layer], bits: float) -> str:
    """``3 linears → int4 (4.188 bits/weight)``, ``5 linears → int4 ×3, int8 ×2 (…)``, ``2 linears + 4 convs → …``."""
    counts = Counter(layer.chosen.spec.label for layer in done)
    mix = next(iter(counts)) if len(counts) == 1 else ", ".join(f"{label} ×{n}" for label, n in counts.items())
    kinds = " + ".join(f"{n} {kind}s" for kind, n in Counter(layer.kind for layer in done).items())
    return f"{kinds} → {mix} ({bits:.3f} bits/weight)"


def _layer_stats(layer: _Layer) -> dict[str, Any]:
    info = {"format": layer.chosen.spec.label, "bits_per_weight": layer.chosen.bits_per_weight,
            "rel_mse": layer.chosen.rel_mse}
    if layer.sensitivity is not None:
        info["sensitivity"] = layer.sensitivity
    if layer.override:
        info["override"] = layer.override
    return info


def _check_gptq_support(specs: list[FormatSpec]) -> None:
    supported = sorted(name for name, fmt in FORMATS.items() if fmt.group_quantizer is not None)
    for spec in specs:
        if FORMATS[spec.name].group_quantizer is None:
            raise PipelineError(f"pass 'quantize': method=gptq: format '{spec.name}' rounds to nearest only; "
                                f"GPTQ works with {', '.join(supported)} (or drop method=gptq)")


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise PipelineError(f"pass 'quantize': {where}: {pattern!r} is not a valid regular expression "
                            f"({error})") from error


def _rewrite(gm: fx.GraphModule, view: LinearView | ConvView, encoded: EncodedWeight) -> None:
    """Store the packed buffers in a small holder module and call the format's op on them.

    The holder is named after the layer (``encoder_layer_0_attention_self_query_int8``,
    ``features_0_conv_int8``), so the state dict reads ``<holder>.qweight``, ``<holder>.scales``… and, with LoRC,
    ``<holder>.lorc_u``/``lorc_v``, read by ``slimgraph::lorc_correction`` after the op.
    """
    packed, correction = encoded.packed, encoded.correction
    stem = re.sub(r"\W", "_", view.module_path or view.node.name)
    holder_name = unique_attribute_name(gm, f"{stem}_{packed.op.__name__.split('.')[-2].removeprefix('linear_')}_")
    holder = nn.Module()
    lorc = {"lorc_u": correction.u, "lorc_v": correction.v} if correction else {}
    tensors = {**packed.buffers, "bias": view.bias, **lorc}
    for name, tensor in tensors.items():
        if tensor is not None:
            holder.register_buffer(name, tensor.detach().contiguous())
    gm.add_submodule(holder_name, holder)
    with gm.graph.inserting_before(view.node):
        nodes = {name: _get_attr(gm, f"{holder_name}.{name}", t) for name, t in tensors.items()}
    value, x = node_value(view.node), view.input
    args = (x, *(nodes[name] for name in packed.buffers), nodes["bias"], *packed.params.values())
    new = view.replace_with(packed.op, args)
    if value is not None:
        new.meta["val"] = value
    if correction is not None:
        with gm.graph.inserting_after(new):
            corrected = gm.graph.call_function(torch.ops.slimgraph.lorc_correction.default,
                                               (new, x, nodes["lorc_u"], nodes["lorc_v"]))
        new.replace_all_uses_with(corrected, delete_user_cb=lambda user: user is not corrected)
        corrected.meta.update({k: v for k, v in new.meta.items() if k != "slimgraph_replaces"})


def quantize_embeddings(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Embedding lookups → ``slimgraph::embedding_int8`` over int8 rows; ``[(path, what happened)]``.

    A table read anywhere else (tied to an output head, sliced by another op) stays float:
    quantizing it would keep both copies.
    """
    done = []
    for view in [v for v in map(EmbeddingView.match, gm.graph.nodes) if v is not None]:
        path, weight = view.module_path or view.node.name, view.weight
        readers = len(view.weight_ref.node.users) if view.weight_ref.node is not None else 1
        if readers > 1 or not weight.is_floating_point() or weight.is_meta:
            reason = f"table read by {readers} nodes (tied)" if readers > 1 else f"{weight.dtype} table"
            done.append((path, f"skipped: {reason}"))
            continue
        qweight, scales = quantize_weight_int8(weight)
        holder_name = unique_attribute_name(gm, re.sub(r"\W", "_", path) + "_int8_")
        holder = nn.Module()
        holder.register_buffer("qweight", qweight)
        holder.register_buffer("scales", scales)
        gm.add_submodule(holder_name, holder)
        with gm.graph.inserting_before(view.node):
            args = (view.indices, *(_get_attr(gm, f"{holder_name}.{name}", t) for name, t in
                                    (("qweight", qweight), ("scales", scales))))
        value = node_value(view.node)
        new = view.replace_with(torch.ops.slimgraph.embedding_int8.default, args)
        if value is not None:
            new.meta["val"] = value
        done.append((path, f"int8 rows, {8 + 32 / weight.shape[1]:.3f} bits/weight"))
    return done


def _get_attr(gm: fx.GraphModule, target: str, tensor: torch.Tensor | None) -> fx.Node | None:
    if tensor is None:
        return None
    node = gm.graph.get_attr(target)
    node.meta["val"] = torch.empty_like(tensor, device="meta")
    return node
