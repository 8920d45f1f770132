"""Packed storage of 4-bit weights for the W4A16 Triton kernel.

Only this file knows the layout; quantizers produce plain ``QuantizedWeight`` codes.

Layout (K-major words, N contiguous), chosen so that a kernel tile of ``BLOCK_K x BLOCK_N``
weights is one coalesced load of ``BLOCK_K / 8`` rows of ``BLOCK_N`` consecutive int32 words,
the same addressing for the GEMV (decode) and GEMM (prefill) paths:

- ``qweight``: int32 (K_pad / 8, N). Code ``q[n, k]`` sits in word ``qweight[k // 8, n]``
  at bits ``4 * (k % 8)`` to ``4 * (k % 8) + 3`` (code ``k = 8j`` in the lowest nibble).
  Unpacking is ``(word >> (4 * (k % 8))) & 0xF``; the arithmetic shift of a negative word is
  harmless because of the mask.
- ``scales``: model dtype (n_groups, N), row ``k // group_size`` for column ``k``;
  ``deq = (q - zero) * scale``. ``zeros``: the same shape, uint8 ``16 * zero`` where every zero
  point is a multiple of 1/16 in [0, 16) (integer zero points and the fitted quantizer's 1/16 grid:
  every quantizer of ``glowq_fx.quant``; ``zero_points`` reads them), else the model dtype (a GGUF
  file's float minimum, or a checkpoint written before 8-bit zero points).
- ``K_pad`` (``packed_columns``) is ``in_features`` rounded up to whole words where a last,
  partial group can be told from the shapes, else whole groups, ``n_groups * group_size``:
  columns ``>= in_features`` are padding (kernels mask them against the activations). A partial
  last group saves the padding codes (576 columns in groups of 128: 576 codes, not 640); its group
  size is read back from the shapes as the power of two whose groups cover ``K_pad`` in
  ``n_groups`` (``group_size_of``), so it is written only where that reading is unique. A
  single group (per-channel) whose width is not a multiple of 8 is widened to the next whole
  word by ``pack``: its padding codes are the zero point, and its packed group size is ``K_pad``.

Other modules ask this one for what they need of the layout (``packed_shapes``, ``unpacked_codes``,
``whole_group_codes``, ``padded_in_features``, ``group_size_of``) instead of re-deriving it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glowq_fx.quant.fitted import ZERO_STEPS  # uint8 zero points hold 16 z: the fitted grid's steps, exactly
from glowq_fx.quant.rtn import QuantizedWeight

CODES_PER_WORD = 8  # 4-bit codes in one int32 word


def stored_zeros(zeros: Tensor) -> Tensor:
    """``zeros`` as the layout stores them: uint8 ``16 * zero`` where every one fits, else as given."""
    scaled = zeros.float() * ZERO_STEPS
    if bool((scaled == scaled.round()).all()) and bool(((scaled >= 0) & (scaled <= 255)).all()):
        return scaled.to(torch.uint8)
    return zeros


def zero_points(zeros: Tensor) -> Tensor:
    """float32 zero points of stored ``zeros`` (uint8 ``16 * zero``, or floats)."""
    return zeros.float() / ZERO_STEPS if zeros.dtype == torch.uint8 else zeros.float()


def _shifts(device: torch.device) -> Tensor:
    """Bit offset of code ``k % 8`` in its word, as (1, 8, 1). Made per call, not a module
    constant: a real tensor constant cannot enter a graph traced with fake tensors."""
    return torch.arange(0, 32, 4, dtype=torch.int32, device=device).view(1, -1, 1)


@dataclass
class PackedW4:
    """Kernel-ready 4-bit weight (see the module docstring for the exact bit layout)."""

    qweight: Tensor  # int32 (K_pad // 8, N)
    scales: Tensor  # model dtype (n_groups, N)
    zeros: Tensor  # uint8 16 * zero, or the model dtype (n_groups, N)
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def padded_in_features(qweight: Tensor) -> int:
    """``K_pad``: the columns a packed ``qweight`` (K_pad / 8, N) holds, padding included."""
    return qweight.shape[0] * CODES_PER_WORD


def _whole_words(k: int) -> int:
    return -(-k // CODES_PER_WORD) * CODES_PER_WORD


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def packed_columns(in_features: int, group_size: int) -> int:
    """``K_pad`` of a weight of ``in_features`` columns in groups of ``group_size`` (module
    docstring): whole words with a partial last group where ``group_size_of`` reads it back
    uniquely (a power-of-two group size, and whole words that do not also split evenly into the
    groups), else whole groups."""
    n_groups = -(-in_features // group_size)
    whole = n_groups * group_size
    words = _whole_words(in_features)
    quotient, rest = divmod(words, n_groups)
    if words == whole or not _is_power_of_two(group_size) or (rest == 0 and quotient % CODES_PER_WORD == 0):
        return whole
    return words


def group_size_of(qweight: Tensor, scales: Tensor) -> int:
    """The packed group size implied by the shapes: ``K_pad / n_groups`` for whole groups, else
    (a partial last group) the power of two whose groups cover ``K_pad`` in ``n_groups``."""
    return group_size_for(padded_in_features(qweight), scales.shape[0])


def whole_group_columns(qweight: Tensor, n_groups: int) -> int:
    """The columns of a packed weight's ``n_groups`` groups, whole (what the CPU kernels hold)."""
    return n_groups * group_size_for(padded_in_features(qweight), n_groups)


def group_size_for(K_pad: int, n_groups: int) -> int:
    """``group_size_of`` from the packed columns and the number of groups."""
    quotient, rest = divmod(K_pad, n_groups)
    if rest == 0 and quotient % CODES_PER_WORD == 0:
        return quotient
    group_size = CODES_PER_WORD
    while -(-K_pad // group_size) > n_groups:
        group_size *= 2
    if -(-K_pad // group_size) != n_groups:
        raise ValueError(f"a packed weight of {K_pad} columns with {n_groups} scale groups is no layout glowq-fx "
                         "writes (the checkpoint is corrupted or was not written by glowq-fx)")
    return group_size


def whole_group_codes(qweight: Tensor, scales: Tensor) -> Tensor:
    """The int32 codes (n_groups * group_size, N) of a packed weight, a partial last group filled
    with zero codes to a whole one (for layouts that need whole groups: the CPU kernels')."""
    codes = unpacked_codes(qweight)
    whole = scales.shape[0] * group_size_of(qweight, scales)
    return codes if whole == codes.shape[0] else torch.nn.functional.pad(codes, (0, 0, 0, whole - codes.shape[0]))


def packed_shapes(in_features: int, out_features: int, group_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(qweight shape, scales and zeros shape) of a packed (out_features, in_features) weight in
    groups of ``group_size`` packed columns; ``ValueError`` for a group size the layout cannot hold."""
    if group_size < CODES_PER_WORD or group_size % CODES_PER_WORD:
        raise ValueError(f"packed group size {group_size} is not a positive multiple of {CODES_PER_WORD}")
    K_pad = packed_columns(in_features, group_size)
    return (K_pad // CODES_PER_WORD, out_features), (-(-in_features // group_size), out_features)


def pack(qw: QuantizedWeight) -> PackedW4:
    """Pack ``qw`` (codes (N, K_codes) uint8 in [0, 15]) into the kernel layout."""
    if qw.bits != 4:
        raise ValueError(f"the packed layout holds 4-bit codes, got bits={qw.bits}")
    codes, group_size = qw.codes, qw.group_size
    N, K_pad = codes.shape
    if K_pad % CODES_PER_WORD and K_pad == group_size:  # one group: widen it to whole words
        K_pad = -(-K_pad // CODES_PER_WORD) * CODES_PER_WORD
        codes = torch.cat([codes, qw.zeros.to(codes.dtype).expand(N, K_pad - group_size)], dim=1)
        group_size = K_pad
    if K_pad % CODES_PER_WORD:
        raise ValueError(f"{K_pad} code columns in groups of {group_size}: a group size that is not a multiple of "
                         f"{CODES_PER_WORD} fits the packed words only as a single group")
    if codes.max() > 15:
        raise ValueError("codes exceed 4 bits (max 15)")
    kept = packed_columns(qw.in_features, group_size) if K_pad == qw.scales.shape[1] * group_size else K_pad
    if kept < K_pad:  # a partial last group: its padding codes are not stored
        codes, K_pad = codes[:, :kept], kept
    q = codes.T.reshape(K_pad // CODES_PER_WORD, CODES_PER_WORD, N)  # uint8, word-major
    # one nibble position at a time: temporaries of one word per code group, not eight (a
    # (K/8, 8, N) int32 product took four times the float weight's size at the group's peak)
    words = torch.zeros(K_pad // CODES_PER_WORD, N, dtype=torch.int64, device=codes.device)
    for j in range(CODES_PER_WORD):
        words.bitwise_or_(q[:, j].to(torch.int64).bitwise_left_shift_(4 * j))
    # wrap into int32 two's complement (code 15 in the top nibble sets the sign bit)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return PackedW4(
        qweight=words.contiguous(),
        scales=qw.scales.T.contiguous(),
        zeros=stored_zeros(qw.zeros.T.contiguous()),
        group_size=group_size,
        in_features=qw.in_features,
    )


def unpacked_codes(qweight: Tensor) -> Tensor:
    """The int32 codes (K_pad, N) of a packed ``qweight`` (K_pad / 8, N), column ``k`` in row ``k``."""
    q = (qweight.unsqueeze(1) >> _shifts(qweight.device)) & 0xF  # (K_pad/8, 8, N)
    return q.reshape(padded_in_features(qweight), qweight.shape[1])


def unpack(p: PackedW4) -> QuantizedWeight:
    """Inverse of ``pack``: the same codes, scales and zeros (a single group widened to whole
    words comes back widened, a partial last group filled with each row's rounded zero point, as
    the quantizers code zero weights: the same dequantized weight)."""
    codes = unpacked_codes(p.qweight).T.to(torch.uint8)
    whole = p.scales.shape[0] * group_size_of(p.qweight, p.scales)
    if whole > codes.shape[1]:
        fill = zero_points(p.zeros[-1]).round().clamp(0, 15).to(torch.uint8)  # the last group's zero point, per row
        codes = torch.cat([codes, fill[:, None].expand(-1, whole - codes.shape[1])], dim=1)
    codes = codes.contiguous()
    return QuantizedWeight(
        codes=codes,
        scales=p.scales.T.contiguous(),
        zeros=zero_points(p.zeros).to(p.scales.dtype).T.contiguous(),
        group_size=p.group_size,
        in_features=p.in_features,
        bits=4,
    )


def dequantize_packed(
    qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, in_features: int, dtype: torch.dtype
) -> Tensor:
    """``W_q`` (N, in_features) in ``dtype`` straight from the packed tensors, in pure torch.

    Same arithmetic as ``QuantizedWeight.dequantize`` (float32, then cast), so eager modules
    and the CPU path of the ops reproduce the quantizer's ``W_q`` bit for bit.
    """
    N, G = qweight.shape[1], scales.shape[0]
    q = whole_group_codes(qweight, scales).reshape(G, group_size, N).float()
    w = (q - zero_points(zeros).unsqueeze(1)) * scales.float().unsqueeze(1)  # (G, g, N)
    return w.reshape(G * group_size, N)[:in_features].T.to(dtype)
