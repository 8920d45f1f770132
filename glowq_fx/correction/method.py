"""What ``correction.decompose.solve`` needs to know about a correction method (``CorrectionMethod``)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from glowq_fx.correction.decompose import Whitening

WhitenFn = Callable[[Tensor, torch.dtype, float], Whitening]  # (S, dtype, shrinkage) -> a factor of S


@dataclass(frozen=True)
class CorrectionMethod:
    """One correction method.

    Attributes:
        name: its ``GlowQConfig(method=...)`` name.
        whiten: ``(S, dtype, shrinkage) -> Whitening``; None: the method corrects nothing.
        shared: one ``B`` for the whole group (its members' stacked error) instead of one per member.
        alone: the method for a weight with no group to share ``B`` with (None: this one).
        summary: one line for listings.
    """

    name: str
    whiten: WhitenFn | None
    shared: bool = False
    alone: str | None = None
    summary: str = ""

    @property
    def corrects(self) -> bool:
        return self.whiten is not None

    def rank_for(self, rank: int, in_features: int, out_features: tuple[int, ...]) -> int:
        """The rank solved for a group: 0 without a correction; a shared ``B`` is capped by what the
        stacked error can hold (independent members are capped one by one in the solve)."""
        if not self.corrects:
            return 0
        return min(rank, in_features, sum(out_features)) if self.shared else rank
