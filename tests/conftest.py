"""Shared fixtures: small models in every shape the passes must handle."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn

from slimgraph import models


class MLP(nn.Module):
    def __init__(self, sizes=(16, 32, 8)):
        super().__init__()
        layers = []
        for a, b in zip(sizes, sizes[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(0.1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, groups=2)
        self.seq = nn.Conv1d(8, 4, 5, padding=2)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = x.flatten(2)
        return self.norm(self.seq(x).transpose(1, 2))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def mlp():
    return MLP().eval(), (torch.randn(4, 16),)


@pytest.fixture
def cnn():
    return SmallCNN().eval(), (torch.randn(2, 3, 16, 16),)


@pytest.fixture(params=["bert", "gpt2", "llama"])
def hf_model(request):
    """``(name, model, kwargs)`` for each small Hugging Face architecture."""
    model = getattr(models, request.param)()
    return request.param, model, {"input_ids": torch.randint(0, 128, (2, 12))}


@pytest.fixture(scope="session")
def minilm():
    model, tokenizer = models.minilm()
    batch = tokenizer(models.sentences(4), padding=True, return_tensors="pt")
    return model, dict(batch)
