"""L2QER's scaling: each member alone, the error scaled by the per-channel RMS ``sqrt(diag S)``
(taken from the same statistics as the whitened methods)."""
import torch
from torch import Tensor

from glowq_fx.correction.decompose import EIG_FLOOR, Whitening
from glowq_fx.correction.method import CorrectionMethod
from glowq_fx.registry import CORRECTIONS


def diagonal_whitening(S: Tensor, dtype: torch.dtype, shrinkage: float = 0.0) -> Whitening:
    """``H = diag(sqrt(diag S))``, floored like the eigenvalues of the full whitening (``shrinkage``
    does not apply: a diagonal scaling has nothing to regularise)."""
    rms = torch.diagonal(S).to(torch.float64).clamp_min(0).sqrt()
    rms = rms.clamp_min(max(float(rms.max()) * EIG_FLOOR**0.5, torch.finfo(torch.float64).tiny))
    return Whitening("diagonal", rms.to(dtype), (1 / rms).to(dtype))


LQER = CORRECTIONS.register("lqer", CorrectionMethod(
    "lqer", diagonal_whitening, summary="each member alone, scaled by the channel RMS"))
