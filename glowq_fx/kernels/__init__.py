"""Kernel side: the packed W4 storage layout (and, later, the Triton kernels that read it)."""
from glowq_fx.kernels.layout import PackedW4, dequantize_packed, pack, unpack

__all__ = ["PackedW4", "dequantize_packed", "pack", "unpack"]
