"""Plain SVD of each member's error (ZeroQuant-V2's LoRC): no statistics used."""
import torch
from torch import Tensor

from glowq_fx.correction.decompose import Whitening
from glowq_fx.correction.method import CorrectionMethod
from glowq_fx.registry import CORRECTIONS


def no_whitening(S: Tensor, dtype: torch.dtype, shrinkage: float = 0.0) -> Whitening:
    return Whitening("identity")


SVD = CORRECTIONS.register("svd", CorrectionMethod("svd", no_whitening, summary="each member alone, plain SVD"))
