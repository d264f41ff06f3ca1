"""quantize: weights of Linear layers → packed low-bit buffers read by a custom op.

Matches every ``LinearView`` (aten/torch/call_module linear, GPT-2's ``Conv1D``
addmm) selected by ``include``/``exclude`` regexes on the module path; the output
head and tiny layers are skipped, each with its reason in the notes. Rewrites
``linear(x, W, b)`` into ``slimgraph::linear_<format>(x, *packed buffers, b, ...)``
with the buffers stored as graph constants; the float weights are then freed.
Verified by the runner (numeric check against the reference, ``tolerance``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from slimgraph.errors import PipelineError
from slimgraph.ir.graph_utils import eliminate_dead_code, unique_attribute_name
from slimgraph.ir.views import LinearView
from slimgraph.kernels import FORMATS, PackedLinear
from slimgraph.passes.manager import Pass, PassContext, PassResult, choices_hint, register_pass

FORMAT_OPTIONS = ("group_size", "symmetric", "double_quant", "bits", "p", "seed", "variant", "threshold")
HEAD_NAMES = {"lm_head", "head", "classifier", "score", "output", "output_projection"}


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """Weight-only quantization of Linear layers to a registered format."""

    name: ClassVar[str] = "quantize"
    preserves: ClassVar[tuple[str, ...]] = ("shapes", "blocks")

    format: str = "int8"
    # Format options: None means the format's default; setting one the format lacks is an error.
    group_size: int | None = None
    symmetric: bool | None = None
    double_quant: bool | None = None
    bits: int | None = None
    p: int | None = None
    seed: int | None = None
    variant: str | None = None
    threshold: float | None = None
    include: str = ""
    exclude: str = ""
    quantize_head: bool = False
    min_features: int = 16

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise PipelineError(f"pass 'quantize': unknown format '{self.format}'. "
                                f"{choices_hint('formats', self.format, FORMATS)}")
        try:
            self.format_options()
        except (ValueError, TypeError) as error:
            raise PipelineError(f"pass 'quantize': {error}") from error
        for option in ("include", "exclude"):
            try:
                re.compile(getattr(self, option))
            except re.error as error:
                raise PipelineError(f"pass 'quantize': {option}={getattr(self, option)!r} is not a "
                                    f"valid regular expression ({error})") from error

    def format_options(self) -> Any:
        """The chosen format's options dataclass, built from the options set on this pass."""
        given = {name: getattr(self, name) for name in FORMAT_OPTIONS if getattr(self, name) is not None}
        return FORMATS[self.format].make_options(**given)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        fmt = FORMATS[self.format]
        options = self.format_options()
        skipped: dict[str, str] = {}
        packed_bits = packed_weights = matched = 0
        for node in list(gm.graph.nodes):
            view = LinearView.match(node)  # matched as we go: earlier rewrites changed its input
            if view is None:
                continue
            matched += 1
            path = view.module_path or view.node.name
            reason = self._skip_reason(view) or fmt.why_not(view.weight, options)
            if reason:
                skipped[path] = reason
                continue
            packed = fmt.pack(view.weight, options)
            _rewrite(gm, view, packed)
            packed_bits += packed.bits_per_weight * view.weight.numel()
            packed_weights += view.weight.numel()
        quantized = matched - len(skipped)
        dead_nodes, freed = eliminate_dead_code(gm) if quantized else (0, 0)
        bits = packed_bits / packed_weights if packed_weights else 0.0
        notes = [f"{quantized} linears → {self.format} ({bits:.3f} bits/weight)"] if quantized else []
        notes += [f"skipped {path}: {reason}" for path, reason in skipped.items()]
        return PassResult(matched=matched, rewritten=quantized + dead_nodes, notes=notes,
                          stats={"quantized": quantized, "skipped": skipped, "bits_per_weight": bits,
                                 "freed_tensors": freed})

    def _skip_reason(self, view: LinearView) -> str | None:
        path = view.module_path
        weight = view.weight
        if not weight.is_floating_point():
            return f"weight dtype {weight.dtype} is not floating point"
        if weight.is_meta:
            return "weight is on the meta device (no data to quantize)"
        if self.include and not re.search(self.include, path):
            return f"excluded: path does not match include={self.include!r}"
        if self.exclude and re.search(self.exclude, path):
            return f"excluded: path matches exclude={self.exclude!r}"
        if not self.quantize_head and path.rpartition(".")[2] in HEAD_NAMES:
            return "output head (pass quantize_head=true to include it)"
        if min(weight.shape) < self.min_features:
            return f"tiny layer {tuple(weight.shape)} (min_features={self.min_features})"
        return None


def _rewrite(gm: fx.GraphModule, view: LinearView, packed: PackedLinear) -> None:
    """Store the packed buffers in a small holder module and call the format's op on them.

    The holder is named after the layer (``encoder_layer_0_attention_self_query_int8``), so
    the state dict reads ``<holder>.qweight``, ``<holder>.scales``…
    """
    stem = re.sub(r"\W", "_", view.module_path or view.node.name)
    holder_name = unique_attribute_name(gm, f"{stem}_{packed.op.__name__.split('.')[-2].removeprefix('linear_')}_")
    holder = nn.Module()
    tensors = {**packed.buffers, "bias": view.bias}
    for name, tensor in tensors.items():
        if tensor is not None:
            holder.register_buffer(name, tensor.detach().contiguous())
    gm.add_submodule(holder_name, holder)
    with gm.graph.inserting_before(view.node):
        nodes = {name: _get_attr(gm, f"{holder_name}.{name}", t) for name, t in tensors.items()}
    value = view.node.meta.get("val")
    args = (view.input, *(nodes[name] for name in packed.buffers), nodes["bias"], *packed.params.values())
    new = view.replace_with(packed.op, args)
    if value is not None:
        new.meta["val"] = value


def _get_attr(gm: fx.GraphModule, target: str, tensor: torch.Tensor | None) -> fx.Node | None:
    if tensor is None:
        return None
    node = gm.graph.get_attr(target)
    node.meta["val"] = torch.empty_like(tensor, device="meta")
    return node
