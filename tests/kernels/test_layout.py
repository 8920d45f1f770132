import pytest
import torch

from glowq_fx.kernels import pack, unpack
from glowq_fx.kernels.layout import dequantize_packed, group_size_of, packed_columns, padded_in_features
from glowq_fx.quant import QuantizedWeight, quantize_rtn


def test_documented_bit_positions():
    """Word [k // 8, n] holds code k at bits 4 * (k % 8): codes 0..7 give 0x76543210."""
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [15, 0, 0, 0, 0, 0, 0, 15]], dtype=torch.uint8)
    qw = QuantizedWeight(codes, torch.ones(2, 1), torch.zeros(2, 1), group_size=8, in_features=8)
    words = pack(qw).qweight
    assert words.shape == (1, 2) and words.dtype == torch.int32
    assert int(words[0, 0]) == 0x76543210
    assert int(words[0, 1]) & 0xFFFFFFFF == 0xF000000F


@pytest.mark.parametrize("N, K, g", [(1, 8, -1), (33, 576, 64), (7, 200, 32), (130, 256, 256)])
def test_round_trip_exact_on_random_codes(N, K, g, gen):
    qw = quantize_rtn(torch.randn(N, K, generator=gen, dtype=torch.bfloat16), g)
    qw.codes = torch.randint(0, 16, qw.codes.shape, generator=gen, dtype=torch.uint8)
    p = pack(qw)
    assert p.qweight.shape == (packed_columns(K, qw.group_size) // 8, N)
    assert p.scales.shape == (qw.scales.shape[1], N)
    back = unpack(p)
    assert torch.equal(back.codes[:, :K], qw.codes[:, :K])  # past K: padding, stored only as whole words
    assert torch.equal(back.scales, qw.scales) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.dequantize(), qw.dequantize())
    # stored: whole words of codes (a partial last group's padding is not), scales, and RTN's integer
    # zero points as uint8 16 * zero
    assert p.zeros.dtype == torch.uint8
    packed_bytes = sum(t.numel() * t.element_size() for t in (p.qweight, p.scales, p.zeros))
    scale_bytes = qw.scales.numel() * qw.scales.element_size()
    assert packed_bytes == N * packed_columns(K, qw.group_size) // 2 + scale_bytes + qw.scales.numel()


@pytest.mark.parametrize("K, g, stored", [(576, 128, 576), (300, 64, 304), (200, 32, 200), (576, 256, 768),
                                          (600, 128, 640), (896, 256, 1024), (1536, 128, 1536), (130, 128, 136)])
def test_a_partial_last_group_is_stored_where_its_group_size_reads_back(K, g, stored, gen):
    """Only whole words of codes are stored where the shapes tell the group size back (a power of
    two whose groups cover the words); where whole words also split evenly into the groups (576 in
    groups of 256: 3 x 192) the groups stay whole. Every stored form dequantizes exactly."""
    qw = quantize_rtn(torch.randn(9, K, generator=gen), g)
    p = pack(qw)
    assert padded_in_features(p.qweight) == stored == packed_columns(K, g)
    assert group_size_of(p.qweight, p.scales) == g
    torch.testing.assert_close(dequantize_packed(p.qweight, p.scales, p.zeros, g, K, torch.float32),
                               qw.dequantize().float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no layout glowq-fx writes"):
        group_size_of(torch.zeros(72, 3, dtype=torch.int32), torch.zeros(7, 3))  # 576 columns in 7 groups


def test_pack_rejects_bad_codes():
    qw = QuantizedWeight(torch.full((2, 8), 16, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1), 8, 8)
    with pytest.raises(ValueError, match="4 bits"):
        pack(qw)
    # three groups of 12 columns cannot be cut into whole words
    qw = QuantizedWeight(torch.zeros(2, 36, dtype=torch.uint8), torch.ones(2, 3), torch.zeros(2, 3), 12, 36)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(qw)


@pytest.mark.parametrize("K", [5, 37, 576])
def test_a_single_group_is_widened_to_whole_words_with_zero_point_codes(K, gen):
    """Per-channel codes cover exactly K columns; the packed layout widens the one group to the
    next multiple of 8, the padding codes dequantize to 0, and every layout fact others use agrees."""
    from glowq_fx.kernels.layout import dequantize_packed, group_size_of, packed_shapes, padded_in_features

    qw = quantize_rtn(torch.randn(6, K, generator=gen), -1)
    assert qw.codes.shape == (6, K) and qw.group_size == K
    p = pack(qw)
    K_pad = -(-K // 8) * 8
    assert p.group_size == K_pad == padded_in_features(p.qweight) == group_size_of(p.qweight, p.scales)
    assert (p.qweight.shape, p.scales.shape) == packed_shapes(K, 6, p.group_size)
    assert torch.equal(unpack(p).codes[:, K:], qw.zeros.to(torch.uint8).expand(6, K_pad - K))
    torch.testing.assert_close(dequantize_packed(p.qweight, p.scales, p.zeros, p.group_size, K, torch.float32),
                               qw.dequantize(torch.float32), rtol=0, atol=0)


def test_packed_shapes_refuse_group_sizes_the_words_cannot_hold():
    from glowq_fx.kernels.layout import packed_shapes

    assert packed_shapes(576, 10, 64) == ((72, 10), (9, 10))
    assert packed_shapes(100, 10, 128) == ((16, 10), (1, 10))
    for bad in (0, 4, 12):
        with pytest.raises(ValueError, match="multiple of 8"):
            packed_shapes(100, 10, bad)


def test_zero_points_are_stored_in_eight_bits_where_they_fit(gen):
    """Integer zero points and the fitted 1/16 grid are stored as uint8 16 * zero and read back
    exactly; zero points off that grid (a GGUF file's float minimum) stay floats."""
    from glowq_fx.kernels.layout import stored_zeros, zero_points

    qw = quantize_rtn(torch.randn(16, 96, generator=gen), 32)
    p = pack(qw)
    assert p.zeros.dtype == torch.uint8 and torch.equal(zero_points(p.zeros), qw.zeros.T.float())
    on_grid = torch.tensor([[0.0, 7.5625, 15.9375]])
    assert torch.equal(stored_zeros(on_grid), torch.tensor([[0, 121, 255]], dtype=torch.uint8))
    for off in (torch.tensor([[0.3]]), torch.tensor([[-1.0]]), torch.tensor([[16.0]])):
        assert stored_zeros(off) is off
    qw.zeros = qw.zeros + 0.01  # off the grid: kept in the model dtype, the same dequantized weight
    p = pack(qw)
    assert p.zeros.dtype == qw.scales.dtype
    torch.testing.assert_close(dequantize_packed(p.qweight, p.scales, p.zeros, 32, 96, torch.float32),
                               qw.dequantize().float(), rtol=0, atol=0)
