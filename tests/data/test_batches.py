"""data.batches: seeded calibration windows of a token stream."""
import pytest
import torch

from glowq_fx.data.batches import calibration_batches, text_calibration_batches


def _stream(n, vocab=128, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.randint(0, vocab, (n,), generator=gen)


def test_calibration_batches_are_seeded_windows_of_the_stream():
    tokens = _stream(5000)
    a = calibration_batches(tokens, n_samples=10, seq_len=64, batch_size=4, seed=3)
    b = calibration_batches(tokens, n_samples=10, seq_len=64, batch_size=4, seed=3)
    c = calibration_batches(tokens, n_samples=10, seq_len=64, batch_size=4, seed=4)
    assert [x["input_ids"].shape[0] for x in a] == [4, 4, 2]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    stream = tokens.tolist()
    for batch in a:
        assert torch.equal(batch["attention_mask"], torch.ones_like(batch["input_ids"]))
        for row in batch["input_ids"].tolist():  # each row is a contiguous piece of the stream
            starts = [i for i in range(len(stream) - 63) if stream[i] == row[0]]
            assert any(stream[i:i + 64] == row for i in starts)


def test_calibration_batches_refuse_short_streams():
    with pytest.raises(ValueError, match="at least seq_len=64"):
        calibration_batches(_stream(10), seq_len=64)


class _CharTokenizer:
    """Token id = byte value, with a BOS of 0: enough of a tokenizer for ``tokenize``."""

    def __call__(self, text, return_tensors, add_special_tokens):
        ids = [0] * add_special_tokens + list(text.encode())
        return {"input_ids": torch.tensor([ids])}


def test_text_calibration_batches_are_the_windows_of_the_tokenized_text(tmp_path):
    text = "".join(f"sentence {i} of a calibration text. " for i in range(200))
    path = tmp_path / "calib.txt"
    path.write_text(text)
    got = text_calibration_batches(_CharTokenizer(), str(path), n_samples=5, seq_len=32, batch_size=2, seed=4)
    stream = torch.tensor([0] + list(text.encode()))
    expected = calibration_batches(stream, 5, 32, batch_size=2, seed=4)
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    with pytest.raises(ValueError):
        text_calibration_batches(_CharTokenizer(), str(tmp_path / "missing.txt"))
