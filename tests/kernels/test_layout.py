import pytest
import torch

from glowq_fx.kernels import pack, unpack
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
    assert p.qweight.shape == (qw.codes.shape[1] // 8, N)
    assert p.scales.shape == (qw.scales.shape[1], N)
    back = unpack(p)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.scales, qw.scales) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.dequantize(), qw.dequantize())
    # the storage the quantized weight reports is exactly what the packed tensors occupy
    packed_bytes = sum(t.numel() * t.element_size() for t in (p.qweight, p.scales, p.zeros))
    assert qw.nbytes() == packed_bytes


def test_pack_rejects_bad_codes():
    qw = QuantizedWeight(torch.full((2, 8), 16, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1), 8, 8)
    with pytest.raises(ValueError, match="4 bits"):
        pack(qw)
    qw = QuantizedWeight(torch.zeros(2, 12, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1), 12, 12)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(qw)
