"""Factories the CLI tests load by 'module:function' spec."""

import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 4)), (torch.randn(3, 8),)


def not_a_pair():
    return nn.Linear(2, 2)
