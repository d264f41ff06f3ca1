"""The ``torch.compile`` backend: ``torch.compile(model, backend="slimgraph")``.

Dynamo hands us each captured graph (one per graph break) with parameters as
placeholders. We *freeze* them: each parameter/buffer placeholder becomes a
``get_attr`` bound to the real tensor, so passes see weights as constants, just
as after ``optimize()``. Then the same pipeline runs and the result goes to
Inductor or runs eagerly.

Freezing means later changes to the model's weights are not seen by the
compiled code: call ``torch._dynamo.reset()`` (or compile again) after
mutating weights. The backend is for inference; it does not train.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from slimgraph.ir.analyses import AnalysisManager
from slimgraph.passes import DEFAULT_PIPELINE
from slimgraph.passes.instruments import default_instruments
from slimgraph.passes.manager import Pass, PassContext, Pipeline
from slimgraph.passes.runner import Instrument, run_pipeline
from slimgraph.report import OptimizeReport
from slimgraph.tools.dump.recorder import TraceRecorder

Then = Literal["inductor", "eager"]


def backend(
    passes: Pipeline | str | Sequence[Pass | str] = DEFAULT_PIPELINE,
    *,
    then: Then = "inductor",
    tolerance: float | None = None,
    instruments: Callable[[], Sequence[Instrument]] | None = None,
    inductor_config: Mapping[str, Any] | None = None,
) -> Callable:
    """A Dynamo backend running ``passes`` on every graph, then handing off to ``then``.

    Example::

        compiled = torch.compile(model, backend=slimgraph.backend("cleanup", then="eager"))

    ``inductor_config`` patches ``torch._inductor.config`` for the hand-off
    (``{"max_autotune": True}``); it needs ``then="inductor"``.

    The returned callable has ``.reports``: one ``OptimizeReport`` per compiled graph.
    """
    if then not in ("inductor", "eager"):
        raise ValueError(f"then={then!r}: choose 'inductor' (compile with Inductor) or 'eager'")
    if inductor_config and then != "inductor":
        raise ValueError(f"inductor_config={dict(inductor_config)} has no effect with then={then!r}; "
                         "use then='inductor' or drop it")
    pipeline = Pipeline.coerce(passes)
    reports: list[OptimizeReport] = []

    def compile_graph(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        gm, kept = freeze_parameters(gm, example_inputs)
        user_inputs = [example_inputs[i] for i in kept]
        # With dynamic shapes Dynamo passes sizes as SymInts; the graph runs on their example values.
        runnable = tuple(v.node.hint if isinstance(v, torch.SymInt) else v for v in user_inputs)
        with torch.no_grad():
            reference = gm(*runnable)
            ctx = PassContext(AnalysisManager.for_captured(gm), runnable, tolerance=tolerance,
                              reference_outputs=reference)
            chosen = default_instruments() if instruments is None else list(instruments())
            dump_dir = os.environ.get("SLIMGRAPH_DUMP")
            if dump_dir:
                chosen.append(TraceRecorder(Path(dump_dir) / f"graph_{len(reports)}.jsonl", model=gm.__class__.__name__,
                                            pipeline=str(pipeline), entry="compile", graph_index=len(reports),
                                            capture={"strategy": "dynamo", "seconds": 0.0}))
            start = time.perf_counter()
            records = run_pipeline(pipeline, gm, ctx, chosen)
        reports.append(OptimizeReport(str(pipeline), records, 0.0, "dynamo",
                                      pipeline_seconds=time.perf_counter() - start))
        if dump_dir:
            _write_compile_summary(Path(dump_dir), len(reports))
        compiled = _hand_off(gm, user_inputs, then, dict(inductor_config or {}))

        # Both hand-offs take unpacked arguments, as Dynamo calls every backend's result.
        # (compile_fx's result carries a copied `_boxed_call` flag that does not mean it is boxed.)
        def run(*args: Any) -> Any:
            return compiled(*[args[i] for i in kept])

        return run

    compile_graph.reports = reports
    return compile_graph


def slimgraph_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    mode: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Callable:
    """The registered ``"slimgraph"`` backend: default pipeline, then Inductor.

    ``torch.compile(model, backend="slimgraph", options={"then": "eager"})``: options named
    like ``backend()``'s parameters go to it, any other option is an Inductor config
    patch, and ``mode="max-autotune"`` (etc.) selects Inductor's options for that mode.
    """
    options = dict(options or {})
    ours = {k: options.pop(k) for k in ("passes", "then", "tolerance") if k in options}
    inductor_config = {}
    if mode is not None:
        from torch._inductor import list_mode_options

        inductor_config.update(list_mode_options(mode))
    inductor_config.update(options)
    return backend(**ours, inductor_config=inductor_config or None)(gm, example_inputs)


def freeze_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[int]]:
    """Turn parameter/buffer placeholders into ``get_attr`` constants bound to the real tensors.

    Returns a new graph module and the positions of the inputs that remain inputs.
    ``gm`` is left alone: Dynamo reads its placeholders after the backend returns
    to decide which arguments to pass, so erasing them there would drop arguments.
    """
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kept = []
    for index, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if not _is_model_state(node, value):
            kept.append(index)
            node.meta.setdefault("val", node.meta.get("example_value"))
            continue
        name = f"_frozen_{index}"
        gm.register_buffer(name, value.detach()) if not isinstance(value, nn.Parameter) else \
            gm.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))
        with gm.graph.inserting_before(node):
            constant = gm.graph.get_attr(name)
        constant.meta.update(node.meta)
        constant.meta["val"] = node.meta.get("example_value")
        node.replace_all_uses_with(constant)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm, kept


def _is_model_state(node: fx.Node, value: Any) -> bool:
    """Parameters, and buffers reached through a module's ``_buffers``."""
    if isinstance(value, nn.Parameter):
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    return isinstance(value, torch.Tensor) and source is not None and "._buffers[" in source.name


def _write_compile_summary(dump_dir: Path, graphs: int) -> None:
    """``compile.json``: how many graphs Dynamo produced so far and why it broke the graph."""
    from torch._dynamo.utils import counters

    summary = {"graphs": graphs, "traces": [f"graph_{i}.jsonl" for i in range(graphs)],
               "graph_breaks": dict(counters["graph_break"])}
    (dump_dir / "compile.json").write_text(json.dumps(summary, indent=2) + "\n")


def _hand_off(gm: fx.GraphModule, example_inputs: list[Any], then: Then, config: dict[str, Any]) -> Callable:
    if then == "eager":
        return gm
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=config)
