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
    with pytest.raises(ValueError, match="at least 64 tokens for windows of 64"):
        calibration_batches(_stream(10), seq_len=64)
    with pytest.raises(ValueError, match="at least 63 tokens for windows of 64"):
        calibration_batches(_stream(10), seq_len=64, bos=1)


def test_with_a_bos_each_window_is_the_bos_and_a_piece_of_the_stream():
    tokens = _stream(3000)
    plain = calibration_batches(tokens, n_samples=6, seq_len=48, batch_size=4, seed=2)
    started = calibration_batches(tokens, n_samples=6, seq_len=48, batch_size=4, seed=2, bos=127)
    stream = tokens.tolist()
    for a, b in zip(plain, started):
        assert b["input_ids"].shape == a["input_ids"].shape and torch.equal(b["attention_mask"], a["attention_mask"])
        assert (b["input_ids"][:, 0] == 127).all()
        for row in b["input_ids"][:, 1:].tolist():
            assert any(stream[i:i + 47] == row for i in range(len(stream) - 46))


class _CharTokenizer:
    """Token id = byte value, with a BOS of 0 it adds by default (``adds_bos``): enough of a
    tokenizer for ``tokenize`` and ``bos_token``."""

    def __init__(self, adds_bos=True, bos_token_id=0):
        self.adds_bos, self.bos_token_id = adds_bos, bos_token_id

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [self.bos_token_id] * (add_special_tokens and self.adds_bos) + list(text.encode())
        return {"input_ids": torch.tensor([ids]) if return_tensors else ids}


def test_bos_token_follows_the_tokenizer_unless_told():
    from glowq_fx.data.batches import bos_token

    assert bos_token(_CharTokenizer()) == 0 and bos_token(_CharTokenizer(), "off") is None
    assert bos_token(_CharTokenizer(adds_bos=False)) is None and bos_token(_CharTokenizer(adds_bos=False), "on") == 0
    with pytest.raises(ValueError, match="no BOS token; use bos='off'"):
        bos_token(_CharTokenizer(adds_bos=False, bos_token_id=None), "on")
    with pytest.raises(ValueError, match="bos must be one of"):
        bos_token(_CharTokenizer(), "yes")


def test_text_calibration_batches_are_the_windows_of_the_tokenized_text(tmp_path):
    text = "".join(f"sentence {i} of a calibration text. " for i in range(200))
    path = tmp_path / "calib.txt"
    path.write_text(text)
    stream = torch.tensor(list(text.encode()))  # no special tokens in the stream
    for bos, token in (("auto", 0), ("off", None)):  # the tokenizer adds a BOS: auto starts each window with it
        got = text_calibration_batches(_CharTokenizer(), str(path), n_samples=5, seq_len=32, batch_size=2, seed=4,
                                       bos=bos)
        expected = calibration_batches(stream, 5, 32, batch_size=2, seed=4, bos=token)
        assert len(got) == len(expected) == 3
        for a, b in zip(got, expected):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    with pytest.raises(ValueError):
        text_calibration_batches(_CharTokenizer(), str(tmp_path / "missing.txt"))
