"""Regenerate slimgraph/kernels/data/vector_grids_2d.pt, the shipped 2-D HIGGS grids.

    .venv/bin/python scripts/make_vector_grids.py   # ~8 min on 2 CPU cores

k-means on 2^20 seeded N(0, I₂) samples, 250 iterations, for 1 to 4 bits per
coordinate (4, 16, 64 and 256 points); the 4-bit grid sign-symmetric
(``compute_vector_grid_2d``). Prints the held-out MSE per coordinate.
"""

from __future__ import annotations

import time

import torch

from slimgraph.kernels.grids import VECTOR_GRIDS_PATH, compute_vector_grid_2d, nearest


def main() -> None:
    held_out = torch.randn(1 << 21, 2, generator=torch.Generator().manual_seed(12345))
    grids = {}
    for bits in (1, 2, 3, 4):
        start = time.perf_counter()
        grids[bits] = compute_vector_grid_2d(bits)
        error = held_out - grids[bits][nearest(held_out, grids[bits])]
        mse_per_coordinate = error.pow(2).mean().item()
        print(
            f"{bits} bits: MSE/coord {mse_per_coordinate:.6f} ({time.perf_counter() - start:.0f} s)"
        )
    VECTOR_GRIDS_PATH.parent.mkdir(parents=True, exist_ok=True)
    torch.save(grids, VECTOR_GRIDS_PATH)
    print(f"wrote {VECTOR_GRIDS_PATH}")


if __name__ == "__main__":
    main()
