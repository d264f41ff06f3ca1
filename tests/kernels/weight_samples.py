"""The issue's four weight distributions, 1024×4096, shared by the HIGGS grid and format tests."""

from __future__ import annotations

import functools

import numpy as np
import torch

KINDS = ("gaussian", "laplace", "student_t3", "outliers")


@functools.cache
def sample_weights(kind: str) -> torch.Tensor:
    """Seeded ``[1024, 4096]`` weights × 0.02: Gaussian, Laplace, Student-t(3), or Gaussian with 0.1% ×20."""
    rng = np.random.default_rng(0)
    shape = (1024, 4096)
    if kind == "gaussian":
        w = rng.standard_normal(shape)
    elif kind == "laplace":
        w = rng.laplace(size=shape)
    elif kind == "student_t3":
        w = rng.standard_t(3, size=shape)
    else:  # gaussian with 0.1% of entries ×20
        w = rng.standard_normal(shape)
        outliers = rng.choice(w.size, size=w.size // 1000, replace=False)
        w.flat[outliers] *= 20
    return torch.from_numpy(w).float() * 0.02
