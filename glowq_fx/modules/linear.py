"""The modules a quantized model runs: a 4-bit linear with a low-rank correction, and the
projection ``R = x B^T`` its group shares.

GlowQ's correction of member ``i`` is ``A_i (B x)``: ``B`` belongs to the group, ``A_i`` to the
member. So ``B`` lives in one ``SharedProjection``, registered once in the module tree (on the
members' closest common ancestor, see ``install``), and every ``QuantizedLinear`` of the group
holds a plain reference to it. In eager mode each member computes ``B x`` itself, which is
correct but repeats work (on CUDA each member is one Triton launch with the correction in its
epilogue, see ``glowq_fx.ops``); ``glowq_backend`` finds the members that read one input and one
``B`` in the graph and computes ``R`` once.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from glowq_fx import ops
from glowq_fx.kernels import cpu_int4
from glowq_fx.kernels.layout import PackedW4, dequantize_packed, group_size_of, pack
from glowq_fx.quant.rtn import QuantizedWeight


class SharedProjection(nn.Module):
    """``R = x B^T``: the right factor of one group's correction.

    Args:
        B: (rank, in_features) in the factor dtype (``GlowQConfig.factor_dtype``).
        members: qualified names of the linears that read ``R`` (for display and checks).
    """

    def __init__(self, B: Tensor, members: tuple[str, ...]):
        super().__init__()
        if B.dim() != 2:
            raise ValueError(f"B must be (rank, in_features), got shape {tuple(B.shape)}")
        self.register_buffer("B", B.contiguous())
        self.members = tuple(members)

    @property
    def rank(self) -> int:
        return self.B.shape[0]

    @property
    def in_features(self) -> int:
        return self.B.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        return ops.shared_projection(x, self.B)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, in_features={self.in_features}, members={list(self.members)}"


class QuantizedLinear(nn.Module):
    """``y = deq(codes) x + A_i (B x) + bias``, with 4-bit packed codes.

    Buffers (layout of ``glowq_fx.kernels.layout``):
        qweight: int32 (K_pad / 8, out_features).
        scales, zeros: model dtype (n_groups, out_features); zeros as uint8 16 * zero where every
            zero point fits (``kernels.layout``).
        bias: model dtype (out_features,) or None.
        A: (out_features, rank) in the factor dtype (``GlowQConfig.factor_dtype``), or None.

    ``projection`` is the group's ``SharedProjection`` (not a registered child: it is registered
    once, on the group's common ancestor, so its ``B`` is stored once).

    On the CPU, ``use_cpu_int4_kernel`` adds the codes in the layout of a CPU int4 kernel, our
    GEMV or PyTorch's (``int4pack``, ``scales_zeros``: non-persistent, since the layout depends on
    the CPU that converts them; see ``glowq_fx.kernels.cpu_int4``), and the forward runs that
    kernel. The canonical buffers stay: checkpoints and prefill (dequantize + GEMM) read them.
    """

    glowq_quantized = True  # capture.run.check_model: not quantized twice

    def __init__(self, packed: PackedW4, bias: Tensor | None = None, A: Tensor | None = None,
                 projection: SharedProjection | None = None):
        super().__init__()
        N = packed.out_features
        if bias is not None and tuple(bias.shape) != (N,):
            raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
        self.in_features = packed.in_features
        self.out_features = N
        self.group_size = packed.group_size
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().to(packed.scales.dtype).clone())
        self.register_buffer("A", None)
        self.register_buffer("int4pack", None, persistent=False)
        self.register_buffer("scales_zeros", None, persistent=False)
        self.cpu_kernel = "auto"  # the CPU kernel asked for (cpu_int4.KERNELS), kept across moves
        object.__setattr__(self, "projection", None)
        self.set_correction(A, projection)

    def cpu_int4_unsupported(self, kernel: str = "auto") -> str | None:
        """Why this linear cannot run a CPU int4 kernel (``kernel``: cpu_int4.KERNELS) here, or None when it can."""
        q = self.qweight
        if q.device.type != "cpu":
            return f"on {q.device.type}, not the CPU"
        if hasattr(q, "to_local"):
            return "a tensor-parallel shard"
        return cpu_int4.unsupported_reason(self.out_features, group_size_of(q, self.scales), kernel)

    def use_cpu_int4_kernel(self, enable: bool = True, kernel: str = "auto") -> str | None:
        """Convert the codes for a CPU int4 kernel: ``kernel`` "auto" (our GEMV where it loads,
        else PyTorch's), "glowq" or "aten" (``enable=False``: drop that copy and run the reference
        path). Returns why the kernel cannot be used, or None when it is."""
        cpu_int4.chosen_kernel(kernel)  # a bad name raises here, whatever the device
        self.cpu_kernel = kernel
        why = self.cpu_int4_unsupported(kernel) if enable else "disabled"
        if why is None:
            self.int4pack, self.scales_zeros = cpu_int4.convert(self.qweight, self.scales, self.zeros, kernel)
        else:
            self.int4pack = self.scales_zeros = None
        return why

    def _apply(self, fn, recurse=True):
        # the kernel's layout belongs to the device and dtype it was made for: made again after a
        # move or cast (or dropped, off the CPU), never moved with the rest
        converted = self.int4pack is not None
        self.int4pack = self.scales_zeros = None
        out = super()._apply(fn, recurse)
        if converted:
            self.use_cpu_int4_kernel(kernel=self.cpu_kernel)
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self.int4pack is not None:  # the codes changed under the converted copy
            self.use_cpu_int4_kernel(kernel=self.cpu_kernel)

    def set_correction(self, A: Tensor | None, projection: SharedProjection | None) -> None:
        """Attach ``A_i`` and the group's projection, or remove the correction with ``(None, None)``
        (GlowQ-S restores only some groups; the sweep switches corrections in place)."""
        if (A is None) != (projection is None):
            raise ValueError("a correction needs both A and its projection (or neither)")
        if A is not None:
            N = self.out_features
            if A.shape[0] != N or A.shape[1] != projection.rank:
                raise ValueError(f"A must be ({N}, {projection.rank}) to match the projection, got {tuple(A.shape)}")
            if projection.in_features != self.in_features:
                raise ValueError(f"projection reads {projection.in_features} features, the linear {self.in_features}")
            if not A.is_floating_point():
                raise ValueError(f"A must be floating point, got {A.dtype}")
            A = A.contiguous()  # kept in its dtype: factors may be stored narrower (GlowQConfig.factor_dtype)
        self.A = A
        object.__setattr__(self, "projection", projection)  # a reference, not a child (see above)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None = None, A: Tensor | None = None,
                       projection: SharedProjection | None = None) -> "QuantizedLinear":
        return cls(pack(qw), bias, A, projection)

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[1]

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W_q`` (out_features, in_features), without the correction; under tensor parallelism,
        this rank's shard of it."""
        q, s, z = (t.to_local() if hasattr(t, "to_local") else t for t in (self.qweight, self.scales, self.zeros))
        return dequantize_packed(q, s, z, group_size_of(q, s), self.in_features, dtype or s.dtype)

    @property
    def weight(self) -> Tensor:
        """``W_q``, dequantized on each access: for model code that reads ``.weight.dtype`` or
        ``.weight.device`` of its linears (common in transformers)."""
        return self.dequantized_weight()

    def forward(self, x: Tensor) -> Tensor:
        R = None if self.A is None else self.projection(x)
        if self.int4pack is not None:
            return ops.w4a16_linear_int4pack(x, self.qweight, self.scales, self.zeros, self.bias, self.A, R,
                                             self.int4pack, self.scales_zeros)
        return ops.w4a16_linear(x, self.qweight, self.scales, self.zeros, self.bias, self.A, R)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, rank={self.rank}, bias={self.bias is not None}"
                + (f", kernel={self.kernel_name}" if self.int4pack is not None else ""))

    @property
    def kernel_name(self) -> str:
        """"cpu_gemv" (ours), "cpu_int4" (PyTorch's int4 kernel) or "reference" (dequantize + matmul)."""
        if self.int4pack is None:
            return "reference"
        return "cpu_gemv" if cpu_int4.kernel_of(self.scales_zeros) == "glowq" else "cpu_int4"
