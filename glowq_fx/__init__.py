"""glowq-fx: GlowQ group-shared low-rank correction for 4-bit LLMs, as a PyTorch library."""
from glowq_fx.config import GlowQConfig

__version__ = "0.1.0"
__all__ = ["GlowQConfig", "__version__"]
