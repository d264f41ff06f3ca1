"""Errors slimgraph raises. Each one says what happened, where, and what to do.

"Where" is as precise as we can make it: the pass, the node, the module path
(``encoder.layer.3.attention``) and the user's source line. ``describe_node``
builds that phrase for any FX node.
"""

from __future__ import annotations

import torch.fx as fx


class SlimgraphError(Exception):
    """Base class of every error slimgraph raises on purpose."""


class CaptureError(SlimgraphError):
    """The model could not be captured to an FX graph by any strategy."""


class PipelineError(SlimgraphError):
    """A pipeline or pass specification is invalid (unknown pass, bad option, syntax)."""


class PassError(SlimgraphError):
    """A pass failed or broke the graph; carries the pass name and, when known, the node."""

    def __init__(self, pass_name: str, message: str, node: fx.Node | None = None):
        self.pass_name = pass_name
        self.node = node
        where = f" at {describe_node(node)}" if node is not None else ""
        message = message.removeprefix(f"pass '{pass_name}': ")  # a PipelineError raised in run() names it already
        super().__init__(f"pass '{pass_name}'{where}: {message}")


class VerificationError(SlimgraphError):
    """A graph failed verification: lint, shape re-propagation, or the numeric check."""


class SerializationError(SlimgraphError):
    """A graph cannot be saved, or a file cannot be loaded (damaged, tampered, unsupported)."""


def describe_node(node: fx.Node) -> str:
    """One phrase locating ``node`` for a human.

    Example: ``node 'linear_3' (aten.linear.default) in module 'encoder.layer.0.attention.self.query'
    from model.py:42 `return F.linear(x, self.weight)```.
    """
    from slimgraph.ir.nodes import module_path, op_name, user_source_line

    text = f"node '{node.name}' ({op_name(node)})"
    path = module_path(node)
    if path:
        text += f" in module '{path}'"
    line = user_source_line(node)
    if line:
        text += f" from {line}"
    return text
