"""Kernel side, one file per job:

- ``layout``: the packed W4 storage (pack / unpack, the shapes others need); the only file that
  knows how codes sit in words.
- ``w4a16``, ``projection``: the Triton kernels and their configurations (4-bit matmul with the
  low-rank epilogue; ``R = x B^T`` for decode).
- ``launch``: which kernel a call runs (by rows), with what scratch memory.
- ``fastest_path``: the run-time choice between equivalent paths (agreement, then timing).
- ``timing``: CUDA-graph and wall-clock timing.

Importing this package needs no Triton: the kernel modules are imported on the first launch.
"""
from glowq_fx.kernels.layout import PackedW4, dequantize_packed, pack, unpack

__all__ = ["PackedW4", "dequantize_packed", "pack", "unpack"]
