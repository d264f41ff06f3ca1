"""Statistics of the inputs some nodes see on calibration data, gathered in one run.

Data-aware passes need what flows into a layer, not just its weight: GPTQ needs
the Gram matrix ``Σ xᵀx`` of a linear's input, Wanda the column norms ``‖X_j‖``.
``input_statistics`` runs the graph once per calibration batch (an
``fx.Interpreter``, so nothing is hooked into the caller's modules) and folds each
chosen node's input into a running statistic (a linear's ``x``, also in GPT-2's
``addmm(bias, x, W)``; any other node's first argument)::

    grams = input_statistics(gm, ["linear_1", "linear_2"], ctx.calibration, gram)
    grams["linear_1"]  # float64 [in, in], summed over every token of every batch
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from rich.progress import track
from torch.fx._pytree import tree_flatten_spec

from slimgraph.ir.views import LinearView

Statistic = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
PROGRESS_AFTER_BATCHES = 4  # a progress bar is worth showing from about this many batches


def input_statistics(gm: fx.GraphModule, node_names: Sequence[str],
                     calibration: Sequence[tuple[tuple, dict[str, Any]]], statistic: Statistic,
                     description: str = "gathering activations") -> dict[str, torch.Tensor]:
    """``{node name: statistic}`` accumulated over the input of each named node.

    ``statistic(x, running)`` gets the node's input (any shape ``[..., features]``) and
    the running value (``None`` on the first call) and returns the new running value.
    A node never reached on the calibration inputs is missing from the result.
    """
    wanted = set(node_names)
    missing = wanted - {node.name for node in gm.graph.nodes}
    if missing:
        raise KeyError(f"input_statistics: no node named {', '.join(sorted(missing))} in the graph")
    recorder = _Recorder(gm, wanted, statistic)
    with torch.no_grad():
        for args, kwargs in track(calibration, description=description, transient=True,
                                  disable=len(calibration) < PROGRESS_AFTER_BATCHES):
            recorder.run(*_flat_inputs(gm, args, kwargs))
    return recorder.values


def gram(x: torch.Tensor, running: torch.Tensor | None) -> torch.Tensor:
    """``Σ xᵀx`` over every row of ``x`` (flattened to ``[rows, features]``), float64."""
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    update = rows.T @ rows
    return update if running is None else running + update


def squared_column_norms(x: torch.Tensor, running: torch.Tensor | None) -> torch.Tensor:
    """``Σ x_j²`` per feature ``j`` over every row of ``x``, float64 (``sqrt`` gives ``‖X_j‖``)."""
    update = x.detach().reshape(-1, x.shape[-1]).double().pow(2).sum(0)
    return update if running is None else running + update


def node_outputs(
    gm: fx.GraphModule,
    node_names: Sequence[str],
    calibration: Sequence[tuple[tuple, dict[str, Any]]],
    description: str = "capturing activations",
) -> Iterator[dict[str, Any]]:
    """Per calibration batch, ``{node name: output}`` of each named node (one batch held at a time).

    For statistics that pair values of several nodes on the same batch, such as the angular
    distance between a block's input and output::

        for values in node_outputs(gm, ["add_7", "add_11"], ctx.calibration):
            distance(values["add_7"], values["add_11"])
    """
    wanted = set(node_names)
    missing = wanted - {node.name for node in gm.graph.nodes}
    if missing:
        raise KeyError(f"node_outputs: no node named {', '.join(sorted(missing))} in the graph")
    for args, kwargs in track(
        calibration,
        description=description,
        transient=True,
        disable=len(calibration) < PROGRESS_AFTER_BATCHES,
    ):
        recorder = _OutputRecorder(gm, wanted)
        with torch.no_grad():  # not around the yield: grad mode is the caller's between batches
            recorder.run(*_flat_inputs(gm, args, kwargs))
        yield recorder.values


class _OutputRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, Any] = {}

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.wanted:
            self.values[node.name] = value
        return value


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str], statistic: Statistic):
        super().__init__(gm)
        self.wanted, self.statistic = wanted, statistic
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, node: fx.Node) -> Any:
        if node.name in self.wanted:
            x = self.env[_input_of(node)]
            self.values[node.name] = self.statistic(x, self.values.get(node.name))
        return super().run_node(node)


def _input_of(node: fx.Node) -> fx.Node:
    view = LinearView.match(node)
    return view.input if view is not None else node.args[0]


def _flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
    """The placeholder values ``gm(*args, **kwargs)`` binds: export's graphs flatten a pytree."""
    pytree_info = getattr(gm.graph._codegen, "pytree_info", None)
    if pytree_info is None or pytree_info.in_spec is None:
        return [*args, *kwargs.values()]
    return tree_flatten_spec((tuple(args), kwargs), pytree_info.in_spec)
