"""Factories the CLI tests load by 'module:function' spec."""

import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 4)), (torch.randn(3, 8),)


def not_a_pair():
    return nn.Linear(2, 2)


class _ScaledMLP(nn.Module):
    """Dropout for `cleanup` to remove and a constant subexpression for `fold_constants` to fold."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU())
        self.head = nn.Linear(16, 4)
        self.register_buffer("scale", torch.arange(4.0))

    def forward(self, x):
        return self.head(self.encoder(x)) * (self.scale * 2 + 1)


def scaled_mlp():
    torch.manual_seed(0)
    return _ScaledMLP().eval(), (torch.randn(3, 8),)

