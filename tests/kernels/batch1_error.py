"""What the native batch-1 paths of the 4-bit formats promise against their torch reference.

Below 16 rows, 4-bit codes (int4, NF4, fp4, HIGGS p=1 and p=2) meet x rounded to int8 per chunk of
32 columns, and NF4 / HIGGS tables are rounded to int8 (csrc/lut_linear.cpp): 4e-3 to 8e-3
of the output's norm on Gaussian inputs, against 0.1-0.2 for the 4-bit rounding itself.
``test_native.py`` checks the kernels entry by entry against the exact bound; the format
tests check the op wiring with this norm-wise one.
"""

from __future__ import annotations

import torch

FOUR_BIT_RELATIVE_ERROR = 1.5e-2


def assert_within_four_bit_error(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype
    error = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
    assert error <= FOUR_BIT_RELATIVE_ERROR, f"relative error {error:.3g} > {FOUR_BIT_RELATIVE_ERROR}"
