"""Checks on tensors that cost no tensor-sized temporaries."""
from __future__ import annotations

import torch
from torch import Tensor


def all_finite(t: Tensor) -> bool:
    """No NaN or Inf in ``t``. A NaN/Inf makes the sum non-finite, and so does an overflow, which
    the elementwise mask then tells apart: the mask (as large as ``t``, plus temporaries) is built
    only then."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
