"""``slimgraph.optimize``: capture a model, run a pipeline, return the optimized module."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from slimgraph.ir.analyses import AnalysisManager
from slimgraph.ir.capture import capture
from slimgraph.passes import DEFAULT_PIPELINE
from slimgraph.passes.instruments import default_instruments
from slimgraph.passes.manager import Pass, PassContext, Pipeline
from slimgraph.passes.runner import Instrument, run_pipeline
from slimgraph.report import OptimizeReport
from slimgraph.tools.dump.recorder import TraceRecorder


def optimize(
    model: nn.Module,
    passes: Pipeline | str | Sequence[Pass | str] = DEFAULT_PIPELINE,
    example_inputs: tuple = (),
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    calibration: Iterable[tuple | Mapping[str, Any]] | None = None,
    tolerance: float | None = None,
    inplace: bool = False,
    dynamic_shapes: Any = None,
    instruments: Sequence[Instrument] | None = None,
    strict: bool = False,
    dump_dir: str | Path | None = None,
) -> fx.GraphModule:
    """Return an optimized copy of ``model``; ``result.report`` says what each pass did.

    Example::

        fast = slimgraph.optimize(model, "cleanup, fold_constants", (x,), tolerance=1e-4)
        print(fast.report)

    - ``calibration``: example inputs (args tuples or kwargs dicts) for passes that
      read activations; available to passes as ``ctx.calibration``.
    - ``tolerance``: largest relative L2 output error (``‖y − y_ref‖ / ‖y_ref‖`` on the
      example inputs) a pass may introduce; a pass that exceeds it is rolled back.
    - ``inplace=False`` (default) works on a deep copy, so ``model`` is left exactly as it
      was and the result owns its weights; ``inplace=True`` skips the copy (saves
      memory) and the result shares weight tensors with ``model``.
    - The model is captured in eval mode: the result is for inference (dropout off,
      batch norm reading its running statistics) whatever ``model.training`` was.
    - ``strict=True`` lets an exception inside a pass propagate instead of rolling back.
    - ``dump_dir``: write a trace of the run to ``dump_dir/trace.jsonl`` for ``slimgraph dump``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() expects an nn.Module, got {type(model).__name__}")
    pipeline = Pipeline.coerce(passes)
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    calibration_batches = normalize_calibration(calibration)  # bad data fails before the slow part
    # Outside inference mode even when called inside it, so the copy and everything the
    # passes build are normal tensors, whose version counters prove the user's were never
    # written (the runner's check; inference tensors have none, but torch refuses to write
    # them outside inference mode). Eval mode: a training-mode reference (live dropout) is
    # random, so no pass could match it.
    with torch.inference_mode(False):
        work = model if inplace else copy.deepcopy(model)
    with torch.inference_mode(False), torch.no_grad(), _eval_mode(work):
        reference = work(*args, **kwargs)
        start = time.perf_counter()
        gm = capture(work, args, kwargs, dynamic_shapes)
        capture_seconds = time.perf_counter() - start
        ctx = PassContext(AnalysisManager.for_captured(gm), args, kwargs, calibration_batches,
                          tolerance, reference)
        chosen = default_instruments() if instruments is None else list(instruments)
        if dump_dir is not None:
            chosen.append(TraceRecorder(Path(dump_dir) / "trace.jsonl", model=type(model).__name__,
                                        pipeline=str(pipeline), entry="optimize",
                                        capture={"strategy": _strategy(gm), "seconds": capture_seconds}))
        start = time.perf_counter()
        records = run_pipeline(pipeline, gm, ctx, chosen, strict=strict)
        pipeline_seconds = time.perf_counter() - start
    gm.report = OptimizeReport(str(pipeline), records, capture_seconds, _strategy(gm), pipeline_seconds)
    return gm


def _strategy(gm: fx.GraphModule) -> str:
    return gm.meta.get("slimgraph_capture", {}).get("strategy", "")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def normalize_calibration(batches: Iterable[tuple | Mapping[str, Any]] | None) -> list[tuple[tuple, dict]]:
    """``[(args, kwargs), ...]`` from an iterable of args tuples, kwargs dicts or single tensors."""
    normalized = []
    for index, batch in enumerate(batches or ()):
        if isinstance(batch, Mapping):
            normalized.append(((), dict(batch)))
        elif isinstance(batch, tuple | list):
            normalized.append((tuple(batch), {}))
        elif isinstance(batch, torch.Tensor):
            normalized.append(((batch,), {}))
        else:
            raise TypeError(f"calibration item {index} is a {type(batch).__name__}; "
                            "give an args tuple, a kwargs dict or a tensor")
    return normalized
