"""The warning category glowq-fx raises: at the bottom of the package, so every stage can warn
without importing another stage."""
from __future__ import annotations

import warnings


class GlowQWarning(UserWarning):
    """Something glowq-fx did differently from the plain path (fallbacks, skipped modules)."""


def warn(message: str, stacklevel: int = 3) -> None:
    """Emit ``message`` as a ``GlowQWarning`` (``stacklevel`` counted from the caller of the caller)."""
    warnings.warn(message, GlowQWarning, stacklevel=stacklevel)
