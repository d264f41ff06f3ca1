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

from collections.abc import Iterator

import torch.fx as fx

from slimgraph.ir.views.attention import AttentionView
from slimgraph.ir.views.base import OpView, Weight, WeightedView, find_all
from slimgraph.ir.views.conv import ConvView
from slimgraph.ir.views.embedding import EmbeddingView
from slimgraph.ir.views.linear import LinearView
from slimgraph.ir.views.norm import NormView

ALL_VIEWS: tuple[type[OpView], ...] = (LinearView, ConvView, NormView, EmbeddingView, AttentionView)


def iter_views(gm: fx.GraphModule) -> Iterator[OpView]:
    """Every view of every known kind in ``gm``."""
    for node in gm.graph.nodes:
        for view_type in ALL_VIEWS:
            if (view := view_type.match(node)) is not None:
                yield view
                break


__all__ = ["ALL_VIEWS", "AttentionView", "ConvView", "EmbeddingView", "LinearView", "NormView", "OpView",
           "Weight", "WeightedView", "find_all", "iter_views"]
