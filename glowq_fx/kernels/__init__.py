"""Kernel side: the packed W4 storage layout (``layout``) and the Triton kernels that read it
(``w4a16``: the 4-bit matmul with its low-rank epilogue; ``projection``: ``R = x B^T`` for decode).
The kernels are imported on demand by ``glowq_fx.ops``, so importing this package needs no Triton."""
from glowq_fx.kernels.layout import PackedW4, dequantize_packed, pack, unpack

__all__ = ["PackedW4", "dequantize_packed", "pack", "unpack"]
