"""The IR is torch.fx: capture, op views, analyses and verification on top of it."""

from slimgraph.ir.analyses import ANALYSES, AnalysisManager, dataflow_graph
from slimgraph.ir.blocks import Block, BlockStructure, find_blocks
from slimgraph.ir.capture import capture
from slimgraph.ir.cost import GraphCost, NodeCost, graph_cost, node_cost
from slimgraph.ir.shapes import propagate_shapes
from slimgraph.ir.verify import VerifyResult, relative_error, verify
from slimgraph.ir.views import (
    AttentionView,
    ConvView,
    EmbeddingView,
    LinearView,
    NormView,
    OpView,
    find_all,
    iter_views,
)

__all__ = [
    "ANALYSES", "AnalysisManager", "AttentionView", "Block", "BlockStructure", "ConvView", "EmbeddingView",
    "GraphCost", "LinearView", "NodeCost", "NormView", "OpView", "VerifyResult", "capture", "dataflow_graph",
    "find_all", "find_blocks", "graph_cost", "iter_views", "node_cost", "propagate_shapes", "relative_error",
    "verify",
]
