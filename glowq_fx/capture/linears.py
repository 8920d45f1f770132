"""What counts as a linear in a float model: ``nn.Linear`` and transformers' ``Conv1D``."""
from __future__ import annotations

from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): a linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def linear_weight(module: nn.Module) -> Tensor | None:
    """The (out_features, in_features) weight of an ``nn.Linear`` or ``Conv1D``, else None."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.T
    return None
