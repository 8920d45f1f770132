"""A quantized embedding table: rows stored group-wise in 4 or 8 bits, dequantized on lookup.

The table ``(num_embeddings, dim)`` is quantized like a linear weight ``(N, K) = (vocab, dim)``
(RTN, groups of ``group_size`` along ``dim``). At 4 bits it is stored in the packed layout of
``QuantizedLinear`` (``kernels.layout``: ``qweight`` (K_pad / 8, vocab), one column per token),
so a tied output head reads the very same buffers: one quantized table serves both. At 8 bits
the codes are uint8 (K_pad, vocab), scales and zeros (n_groups, vocab). A table tied to an int8
output head (``modules.int8_linear``) is that head's codes: int8 (vocab, dim), one scale per row,
no zeros. A lookup gathers the tokens' rows and dequantizes only those.

The quantized module takes the embedding's class: a subclass of ``nn.Embedding`` with a
forward of its own (Gemma's scaled embedding multiplies by ``embed_scale`` after
``super().forward``) keeps that forward, whose ``super()`` call now reaches the quantized lookup.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from glowq_fx.kernels.layout import dequantize_packed, group_size_of, pack, padded_in_features
from glowq_fx.quant.rtn import quantize_rtn


class QuantizedEmbedding(nn.Embedding):
    """``nn.Embedding`` whose table is quantized (see the module docstring); built by
    ``quantize_embedding`` or ``empty_quantized_embedding``, never directly.

    Buffers:
        qweight: int32 (K_pad / 8, num_embeddings) at 4 bits, uint8 (K_pad, num_embeddings) at 8,
            int8 (num_embeddings, embedding_dim) in the per-row layout of an int8 head.
        scales, zeros: (n_groups, num_embeddings) in the model dtype; per row: scales
            (num_embeddings,) and no zeros.
    """

    glowq_quantized = True  # capture.run.check_model: not quantized twice

    bits: int

    def __init__(self, *args, **kwargs):
        raise TypeError("build a QuantizedEmbedding with quantize_embedding(embedding, bits, group_size)")

    @property
    def per_row(self) -> bool:
        """The per-row int8 layout of a tied int8 head."""
        return self.qweight.dtype == torch.int8

    @property
    def group_size(self) -> int:
        if self.per_row:
            return self.embedding_dim
        if self.bits == 4:
            return group_size_of(self.qweight, self.scales)
        return self.qweight.shape[0] // self.scales.shape[0]

    def rows(self, ids: Tensor) -> Tensor:
        """The dequantized rows of the 1-D ``ids`` (len(ids), dim), in the scales' dtype."""
        if self.per_row:
            s = self.scales.index_select(0, ids)
            return (self.qweight.index_select(0, ids).float() * s.float().unsqueeze(1)).to(s.dtype)
        q, s, z = (t.index_select(1, ids) for t in (self.qweight, self.scales, self.zeros))
        if self.bits == 4:
            return dequantize_packed(q, s, z, group_size_of(q, s), self.embedding_dim, s.dtype)
        g = q.shape[0] // s.shape[0]
        w = (q.reshape(s.shape[0], g, -1).float() - z.float().unsqueeze(1)) * s.float().unsqueeze(1)
        return w.reshape(q.shape[0], -1)[:self.embedding_dim].T.to(s.dtype)

    def forward(self, input: Tensor) -> Tensor:
        return self.rows(input.reshape(-1)).reshape(*input.shape, self.embedding_dim)

    @property
    def weight(self) -> Tensor:
        """The whole dequantized table, built on each access (for code that reads
        ``.weight.dtype`` or ``.weight.device``)."""
        return self.rows(torch.arange(self.num_embeddings, device=self.qweight.device))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


@functools.cache
def _quantized_class(cls: type) -> type:
    if cls is nn.Embedding or issubclass(cls, QuantizedEmbedding):
        return QuantizedEmbedding if cls is nn.Embedding else cls
    return type(f"Quantized{cls.__name__}", (cls, QuantizedEmbedding), {"__module__": __name__})


def _install(embedding: nn.Embedding, bits: int, qweight: Tensor, scales: Tensor,
             zeros: Tensor | None) -> QuantizedEmbedding:
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"expected an nn.Embedding, got {type(embedding).__name__}")
    if embedding.max_norm is not None:
        raise ValueError(f"the embedding renormalises the rows it looks up (max_norm={embedding.max_norm}), which "
                         "needs a float table; leave it unquantized (embedding_bits=None)")
    klass = _quantized_class(type(embedding))
    table = klass.__new__(klass)
    table.__dict__.update(embedding.__dict__)  # its attributes, hooks and extra buffers (embed_scale)
    table._parameters = {k: v for k, v in embedding._parameters.items() if k != "weight"}
    table._buffers, table._modules = dict(embedding._buffers), dict(embedding._modules)
    table.bits = bits
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        table.register_buffer(name, t)
    return table


def tie_to_int8_head(embedding: nn.Embedding, qweight: Tensor, scales: Tensor) -> QuantizedEmbedding:
    """``embedding`` as a ``QuantizedEmbedding`` reading the codes of the ``Int8Linear`` head
    quantized from this very table (tied weights): shared, not quantized again."""
    if qweight.dtype != torch.int8 or tuple(qweight.shape) != (embedding.num_embeddings, embedding.embedding_dim):
        raise ValueError(f"the int8 head's codes {qweight.dtype} {tuple(qweight.shape)} are not this "
                         f"{embedding.num_embeddings} x {embedding.embedding_dim} table")
    return _install(embedding, 8, qweight, scales, None)


def quantize_embedding(embedding: nn.Embedding, bits: int, group_size: int, *,
                       packed: tuple[Tensor, Tensor, Tensor] | None = None) -> QuantizedEmbedding:
    """``embedding`` with its table quantized (RTN, asymmetric, ``group_size`` along the
    embedding dimension, -1: one group per row), as a ``QuantizedEmbedding`` of its class.

    ``packed``: the (qweight, scales, zeros) of a 4-bit ``QuantizedLinear`` holding this very
    table (a tied output head, quantized first): shared, not quantized again (an int8 head:
    ``tie_to_int8_head``).
    """
    if bits not in (4, 8):
        raise ValueError(f"embedding tables are stored in 4 or 8 bits, got {bits}")
    if packed is not None:
        if bits != 4:
            raise ValueError("a table shared with a quantized output head is stored in the head's 4-bit layout")
        qweight, scales, zeros = packed
        if qweight.shape[1] != embedding.num_embeddings or padded_in_features(qweight) < embedding.embedding_dim:
            raise ValueError(f"the head's packed weight {tuple(qweight.shape)} does not hold this "
                             f"{embedding.num_embeddings} x {embedding.embedding_dim} table")
        return _install(embedding, 4, qweight, scales, zeros)
    qw = quantize_rtn(embedding.weight.detach(), group_size, bits=bits)
    if bits == 4:
        p = pack(qw)
        return _install(embedding, 4, p.qweight, p.scales, p.zeros)
    return _install(embedding, 8, qw.codes.T.contiguous(), qw.scales.T.contiguous(), qw.zeros.T.contiguous())


def empty_quantized_embedding(embedding: nn.Embedding, bits: int, shapes: dict[str, tuple[tuple, torch.dtype]],
                              device: torch.device | str) -> QuantizedEmbedding:
    """A ``QuantizedEmbedding`` of ``embedding``'s class with uninitialised buffers of the given
    ``{name: (shape, dtype)}`` (a checkpoint's, read afterwards; no ``zeros``: the per-row layout)."""
    qweight, scales, zeros = (torch.empty(shapes[k][0], dtype=shapes[k][1], device=device) if k in shapes else None
                              for k in ("qweight", "scales", "zeros"))
    return _install(embedding, bits, qweight, scales, zeros)
