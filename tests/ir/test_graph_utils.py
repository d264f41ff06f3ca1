"""Graph housekeeping: dead attributes go, and a caller's module is never stripped."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from slimgraph.ir.graph_utils import eliminate_dead_code


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        self.unused(x)
        return self.used(x)


def test_a_detached_module_of_the_caller_keeps_its_tensors():
    model = Branches()
    gm = fx.symbolic_trace(model)  # shares `used` and `unused` with the caller's model
    nodes_removed, tensors_freed = eliminate_dead_code(gm)
    assert nodes_removed == 1 and tensors_freed == 2
    assert not hasattr(gm, "unused")
    assert model.unused.weight.shape == (4, 4) and model.unused.bias.shape == (4,)
    x = torch.randn(2, 4)
    gm.recompile()
    torch.testing.assert_close(gm(x), model.used(x))
