"""Small models shared by several pass tests (importable: pytest puts this folder on sys.path)."""

import torch
from torch import nn


class TransposedWeight(nn.Module):
    """``x @ w.t()``: the transpose of a weight is the simplest constant subexpression."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        return x @ self.w.t()
