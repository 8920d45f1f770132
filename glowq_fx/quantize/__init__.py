"""The verb and the ways into it: ``quantize_`` on a model in memory (``api``), MoE experts inside
it (``experts``), a checkpoint quantized from disk one block at a time (``from_disk``), and
quantizing on load through transformers and optimum (``on_load``)."""
from glowq_fx.quantize.api import quantize_

__all__ = ["quantize_"]
