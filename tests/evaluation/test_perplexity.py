"""Perplexity protocol and calibration windows."""
import logging
import math

import pytest
import torch
import transformers as T
from torch import nn

from glowq_fx.evaluation import perplexity as ppl
from glowq_fx.evaluation.perplexity import perplexity, window_nll, windows
from tests_helpers import tiny_llama_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(tiny_llama_config()).double().eval()


def _stream(n, vocab=128, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.randint(0, vocab, (n,), generator=gen)


def test_windows_cover_the_stream_in_order_with_the_partial_tail():
    tokens = _stream(1000)
    pieces = windows(tokens, 128)
    assert [p.numel() for p in pieces] == [128] * 7 + [104]
    assert torch.equal(torch.cat(pieces), tokens)
    assert [p.numel() for p in windows(tokens, 333)] == [333, 333, 333]  # a 1-token tail predicts nothing
    assert torch.equal(torch.cat(windows(tokens, 100, max_tokens=250)), tokens[:250])


@pytest.mark.parametrize("bad", [dict(seq_len=1), dict(seq_len=16, max_tokens=1)])
def test_windows_refuse_bad_sizes(bad):
    with pytest.raises(ValueError, match="at least 2"):
        windows(_stream(10), **bad)


def test_perplexity_is_the_token_weighted_mean_over_windows(model):
    tokens = _stream(300)
    seq = 64
    # by hand: each window alone, every predicted token weighted once
    total, count = 0.0, 0
    with torch.no_grad():
        for w in tokens.split(seq):
            logits = model(input_ids=w[None]).logits[0]
            logp = torch.log_softmax(logits, -1)
            total -= logp[torch.arange(w.numel() - 1), w[1:]].sum().item()
            count += w.numel() - 1
    expected = math.exp(total / count)
    for batch_size in (1, 3):  # batching the full windows changes nothing
        r = perplexity(model, tokens, seq, batch_size=batch_size, progress=False)
        assert r.n_tokens == count == 300 - 5 and r.n_windows == 5
        assert r.perplexity == pytest.approx(expected, rel=1e-9)


def test_with_a_bos_every_window_starts_with_it_and_every_text_token_is_scored(model):
    tokens = _stream(301)
    seq, bos = 64, 127
    pieces = windows(tokens, seq, bos=bos)
    assert [p.numel() for p in pieces] == [64] * 4 + [50] and all(p[0] == bos for p in pieces)
    assert torch.equal(torch.cat([p[1:] for p in pieces]), tokens)
    assert windows(_stream(64), seq, bos=bos)[-1].tolist()[0] == bos and len(windows(_stream(64), seq, bos=bos)) == 2
    total = 0.0
    with torch.no_grad():
        for w in pieces:
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0], -1)
            total -= logp[torch.arange(w.numel() - 1), w[1:]].sum().item()
    r = perplexity(model, tokens, seq, batch_size=2, progress=False, bos=bos)
    assert r.n_tokens == 301 and r.bos == bos and r.n_windows == 5
    assert r.perplexity == pytest.approx(math.exp(total / 301), rel=1e-9)


class _Uniform(nn.Module):
    """A causal LM that knows nothing: equal logits for every token."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return T.modeling_outputs.CausalLMOutput(logits=self.scale * torch.ones(*input_ids.shape, self.vocab))


def test_uniform_model_has_perplexity_equal_to_the_vocabulary():
    vocab = 97
    r = perplexity(_Uniform(vocab), _stream(500, vocab), 100, batch_size=2, progress=False)
    assert r.perplexity == pytest.approx(vocab, rel=1e-6)


def test_window_nll_checks_the_model_output(model):
    class Wrong(nn.Module):
        def forward(self, input_ids):
            return T.modeling_outputs.CausalLMOutput(logits=torch.zeros(1, 3, 5))

    with pytest.raises(ValueError, match="logits of shape"):
        window_nll(Wrong(), torch.zeros(2, 4, dtype=torch.long))


def test_perplexity_refuses_empty_streams_and_batches(model):
    with pytest.raises(ValueError, match="shorter than 2"):
        perplexity(model, _stream(1), 16, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, _stream(50), 16, batch_size=0, progress=False)


def test_chunked_nll_equals_the_whole_logits_one_chunk_at_a_time(model, monkeypatch):
    """The head applied to a few positions at a time (here 2 per chunk at batch 2) gives each
    token's NLL exactly as the whole logits tensor does; no call makes more logits than a chunk."""
    monkeypatch.setattr(ppl, "LOGITS_PER_CHUNK", 2 * 2 * model.config.vocab_size)
    ids = torch.stack([_stream(38), _stream(38)])  # 37 predicted positions: the last chunk holds one
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        with torch.no_grad():
            chunked = ppl.chunked_token_nll(model, ids)
    finally:
        hook.remove()
    with torch.no_grad():
        full = ppl.token_nll(model, ids)
    assert chunked.dtype == full.dtype == torch.float64 and torch.allclose(chunked, full, rtol=1e-12, atol=1e-12)
    assert shapes[0] == (2, 38, 0)  # the model's own call: nothing made
    assert all(s[1] <= 2 for s in shapes[1:]) and sum(s[1] for s in shapes[1:]) == 37


def test_a_softcapped_head_is_scored_in_chunks_like_its_own_logits():
    torch.manual_seed(0)
    config = T.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=2.0)
    gemma = T.Gemma2ForCausalLM(config).double().eval()
    tokens = _stream(200)
    with torch.no_grad():
        assert ppl.chunked_nll_or_none(gemma, tokens[None, :64]) is None
        expected = ppl.token_nll(gemma, tokens[None, :100]).mean()
    r = perplexity(gemma, tokens[:100], 100, progress=False)
    assert r.nll == pytest.approx(float(expected), rel=1e-9)


class _Rescaled(T.LlamaForCausalLM):
    """A head whose output the forward changes in a way glowq does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3 + 1
        return out


def test_an_unknown_logit_change_falls_back_to_the_whole_logits_and_says_so(caplog):
    torch.manual_seed(0)
    rescaled = _Rescaled(tiny_llama_config()).double().eval()
    tokens = _stream(130)
    with torch.no_grad():
        assert "glowq does not know" in ppl.chunked_nll_or_none(rescaled, tokens[None, :64])
        expected = ppl.token_nll(rescaled, tokens[None, :65]).sum() + ppl.token_nll(rescaled, tokens[None, 65:]).sum()
    with caplog.at_level(logging.WARNING, logger="glowq_fx"):
        r = perplexity(rescaled, tokens, 65, progress=False)
    assert r.nll == pytest.approx(float(expected) / 128, rel=1e-9)
    assert "scores the whole logits tensor" in caplog.text and "glowq does not know" in caplog.text
