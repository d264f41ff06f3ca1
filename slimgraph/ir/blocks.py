"""Block structure: the repeated layers of a model, found from ``nn_module_stack``.

A transformer is a container of identical blocks (``encoder.layer.0`` …
``encoder.layer.5``). We find every container whose children are numbered
0..n-1 with one module type and group the graph's nodes by block. The main
stack is the container that covers the most nodes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch.fx as fx

from slimgraph.ir.nodes import module_stack

_NUMBERED = re.compile(r"^(?:(?P<container>.+)\.)?(?P<index>\d+)$")  # container "" = the root


@dataclass
class Block:
    """One repeated block: its path, position, module type and the nodes traced inside it."""

    path: str
    index: int
    module_type: str
    nodes: list[fx.Node] = field(default_factory=list)

    @property
    def inputs(self) -> list[fx.Node]:
        """Nodes outside the block that the block reads (activations and weights)."""
        inside = set(self.nodes)
        seen = {a: None for n in self.nodes for a in n.all_input_nodes if a not in inside}
        return list(seen)

    @property
    def outputs(self) -> list[fx.Node]:
        """Nodes of the block read by something outside it."""
        inside = set(self.nodes)
        return [n for n in self.nodes if any(u not in inside for u in n.users)]


@dataclass
class BlockStructure:
    """``containers`` maps a container path (``encoder.layer``) to its blocks in order."""

    containers: dict[str, list[Block]]

    @property
    def main(self) -> list[Block]:
        """Blocks of the container covering the most nodes (the transformer stack)."""
        if not self.containers:
            return []
        return max(self.containers.values(), key=lambda blocks: sum(len(b.nodes) for b in blocks))

    def block_of(self, node: fx.Node) -> Block | None:
        """The main-stack block ``node`` belongs to, if any."""
        return next((b for b in self.main if node in set(b.nodes)), None)


def find_blocks(gm: fx.GraphModule) -> BlockStructure:
    """Group ``gm``'s nodes into repeated blocks.

    Example: for BERT with 6 layers, ``find_blocks(gm).main`` is six ``Block``s with
    paths ``encoder.layer.0`` … ``encoder.layer.5``.
    """
    candidates: dict[str, dict[int, Block]] = defaultdict(dict)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue  # a block holds computation; the weights it reads are among its inputs
        for path, module_type in module_stack(node):
            match = _NUMBERED.match(path)
            if not match:
                continue
            index = int(match["index"])
            block = candidates[match["container"] or ""].setdefault(index, Block(path, index, module_type))
            if not block.nodes or block.nodes[-1] is not node:
                block.nodes.append(node)
    containers = {}
    for container, by_index in candidates.items():
        blocks = [by_index[i] for i in sorted(by_index)]
        numbered_from_zero = [b.index for b in blocks] == list(range(len(blocks)))
        one_type = len({b.module_type for b in blocks}) == 1
        if len(blocks) >= 2 and numbered_from_zero and one_type:
            containers[container] = blocks
    return BlockStructure(containers)
