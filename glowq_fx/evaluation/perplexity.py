"""Perplexity with the WikiText-2 protocol of the GPTQ/GlowQ papers.

Protocol: the documents are joined (``data.corpus.DOC_SEPARATOR``) and tokenized once
(``data.batches.tokenize``); the token
stream is cut into non-overlapping windows of ``seq_len`` tokens, the last partial window
included; each window is scored on its own (no context carried over), token ``t`` predicted from
tokens ``< t`` of its window. Perplexity is ``exp`` of the token-weighted mean negative
log-likelihood over every predicted token: a window of ``L`` tokens contributes ``L - 1``.
The GPTQ reference drops the partial window and weights windows equally, which is the same thing
when every window is full.

With a ``bos`` token (``data.batches.bos_token``: by default when the tokenizer adds one, as
lm-eval does) each window is that token followed by ``seq_len - 1`` text tokens, and every text
token is predicted, the first one from the BOS; the papers' protocol is ``bos=None``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def windows(tokens: Tensor, seq_len: int, max_tokens: int | None = None, bos: int | None = None) -> list[Tensor]:
    """Non-overlapping windows of ``seq_len`` tokens, the last partial one included; with a
    ``bos`` token id each is that token and ``seq_len - 1`` text tokens.

    ``max_tokens`` keeps a prefix of the stream first (a cheaper, still deterministic estimate).
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor of ids, got shape {tuple(tokens.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a window predicts its tokens after the first), got {seq_len}")
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
        tokens = tokens[:max_tokens]
    if bos is None:
        pieces = list(tokens.split(seq_len))
        return [w for w in pieces if w.numel() >= 2]  # a 1-token tail predicts nothing
    start = tokens.new_full((1,), bos)
    return [torch.cat([start, w]) for w in tokens.split(seq_len - 1)]


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # token-weighted mean negative log-likelihood (nats)
    n_tokens: int  # predicted tokens
    n_windows: int
    seq_len: int
    time_s: float
    bos: int | None = None  # the token each window started with (None: the papers' protocol)

    def to_dict(self) -> dict:
        return asdict(self)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def token_nll(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """NLL of every predicted token (B, L - 1) of a causal LM returning ``.logits``: token t scored
    from tokens < t, in float32 at least (half-precision logits are upcast)."""
    out = model(input_ids=input_ids) if attention_mask is None else model(input_ids=input_ids,
                                                                          attention_mask=attention_mask)
    logits = getattr(out, "logits", None)
    if logits is None or logits.shape[:2] != input_ids.shape:
        got = "no .logits" if logits is None else f"logits of shape {tuple(logits.shape)}"
        raise ValueError(f"expected a causal LM returning .logits (B, T, vocab) for input {tuple(input_ids.shape)}, "
                         f"got {got}")
    return F.cross_entropy(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).transpose(1, 2),
                           input_ids[:, 1:], reduction="none")


def window_nll(model: nn.Module, batch: Tensor) -> Tensor:
    """Summed NLL of each row of ``batch`` (B, L) (``token_nll`` per row)."""
    return token_nll(model, batch).sum(dim=1)


def perplexity(model: nn.Module, tokens: Tensor, seq_len: int = 2048, *, batch_size: int = 1,
               max_tokens: int | None = None, progress: bool = True, desc: str = "perplexity",
               bos: int | None = None) -> PerplexityResult:
    """Perplexity of ``model`` (a causal LM returning ``.logits``) on the token stream ``tokens``.

    Full windows are batched ``batch_size`` at a time; the partial last window runs alone. With
    a ``bos`` token id every window starts with it (module docstring).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pieces = windows(tokens, seq_len, max_tokens, bos)
    if not pieces:
        raise ValueError("the token stream is shorter than 2 tokens: nothing to score")
    device = _model_device(model)
    full = [w for w in pieces if w.numel() == seq_len]
    batches = [torch.stack(full[i:i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in pieces if w.numel() != seq_len]
    total, count = 0.0, 0
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                nll = window_nll(model, batch.to(device))
                total += nll.double().sum().item()
                count += batch.shape[0] * (batch.shape[1] - 1)
    finally:
        model.train(was_training)
    mean = total / count
    if not math.isfinite(mean):
        raise ValueError(f"the model's loss is not finite ({mean}); check its dtype and weights")
    return PerplexityResult(math.exp(mean), mean, count, len(pieces), seq_len, time.perf_counter() - t0, bos)
