"""``glowq_backend``, the torch.compile backend (``compile``), and the Inductor entry points it
uses (``_inductor``)."""
from glowq_fx.backend.compile import glowq_backend

__all__ = ["glowq_backend"]
