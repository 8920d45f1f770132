import pytest
import torch

from glowq_fx.calibration.moments import GroupStatistics, SecondMoment


def test_streaming_equals_one_shot(gen):
    X = torch.randn(5, 7, 24, generator=gen, dtype=torch.float64)
    acc = SecondMoment(24, "g", dtype=torch.float64)
    for batch in X.split(2):
        acc.add_batch(batch)
    flat = X.reshape(-1, 24)
    torch.testing.assert_close(acc.value(), flat.T @ flat / flat.shape[0], rtol=1e-12, atol=1e-12)
    assert acc.n_tokens == 35 and acc.n_batches == 3


def test_padding_tokens_are_excluded(gen):
    x = torch.randn(2, 6, 8, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    x_padded = x.clone()
    x_padded[0, 4:] = 1e6  # garbage at padded positions must not leak in
    acc = SecondMoment(8, "g", dtype=torch.float64)
    acc.add_batch(x_padded, attention_mask=mask)
    kept = torch.cat([x[0, :4], x[1]])
    torch.testing.assert_close(acc.value(), kept.T @ kept / 10)
    assert acc.n_tokens == 10


def test_float32_accumulation_of_half_activations(gen):
    x = torch.randn(64, 16, generator=gen).to(torch.bfloat16)
    acc = SecondMoment(16, "g")
    acc.add_batch(x)
    ref = x.double().T @ x.double() / 64
    assert acc.value().dtype == torch.float32
    torch.testing.assert_close(acc.value().double(), ref, rtol=1e-5, atol=1e-6)


def test_errors_name_the_group():
    acc = SecondMoment(4, "layers.3.mlp[gate_proj,up_proj]")
    with pytest.raises(ValueError, match=r"layers\.3\.mlp.*no calibration tokens"):
        acc.value()
    with pytest.raises(ValueError, match=r"layers\.3\.mlp.*NaN or Inf"):
        acc.add_batch(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="5 features, the group expects 4"):
        acc.add_batch(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="floating point"):
        acc.add_batch(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="attention_mask shape"):
        acc.add_batch(torch.zeros(2, 3, 4), attention_mask=torch.ones(2, 4))
    acc.add_batch(torch.ones(1, 2, 4), attention_mask=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="all padding"):
        acc.value()
    with pytest.raises(ValueError, match="float32 or float64"):
        SecondMoment(4, "g", dtype=torch.float16)


def test_group_statistics_keyed_by_group(gen):
    stats = GroupStatistics([("qkv", 8), ("gate_up", 8), ("down", 16)])
    x = torch.randn(3, 8, generator=gen)
    stats.add_batch("qkv", x)
    assert stats["qkv"].n_tokens == 3 and stats["gate_up"].n_tokens == 0
    assert set(stats) == {"qkv", "gate_up", "down"} and len(stats) == 3
    assert stats.nbytes() == (64 + 64 + 256) * 4
    with pytest.raises(KeyError, match="unknown group 'o_proj'"):
        stats.add_batch("o_proj", x)
    with pytest.raises(ValueError, match="stats dtype"):
        GroupStatistics([("a", 4)], dtype="float16")


def test_first_position_weight_counts_each_sequences_first_token_c_times(gen):
    """S * n = sum_t x_t x_t^T + (c - 1) sum_sequences x_first x_first^T, exactly; with left
    padding the first unmasked position is the one weighted."""
    c = 7.0
    x = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64)
    acc = SecondMoment(8, "g", dtype=torch.float64, first_position_weight=c)
    acc.add_batch(x)
    flat, first = x.reshape(-1, 8), x[:, 0]
    torch.testing.assert_close(acc.value() * 15, flat.T @ flat + (c - 1) * first.T @ first, rtol=1e-12, atol=1e-12)
    assert acc.n_tokens == 15

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    padded = SecondMoment(8, "g", dtype=torch.float64, first_position_weight=c)
    padded.add_batch(x, attention_mask=mask)
    kept = x[mask.bool()]
    firsts = torch.stack([x[0, 2], x[1, 0], x[2, 1]])
    torch.testing.assert_close(padded.value() * kept.shape[0], kept.T @ kept + (c - 1) * firsts.T @ firsts,
                               rtol=1e-12, atol=1e-12)


def test_first_position_weight_needs_positions_and_a_positive_number(gen):
    from glowq_fx import GlowQConfig

    acc = SecondMoment(8, "layers.0.attn", first_position_weight=4.0)
    with pytest.raises(ValueError, match=r"layers\.0\.attn.*\(batch, positions, features\).*first_position_weight=1"):
        acc.add_batch(torch.randn(10, 8, generator=gen))
    SecondMoment(8, "g").add_batch(torch.randn(10, 8, generator=gen))  # weight 1: flattened inputs are fine
    for bad in (0, -2.0, float("nan"), True, "32"):
        with pytest.raises(ValueError, match="first_position_weight must be a positive number"):
            GlowQConfig(first_position_weight=bad)
