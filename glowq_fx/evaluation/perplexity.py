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

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

log = logging.getLogger(__name__)


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
    out = _forward(model, input_ids, attention_mask)
    logits = getattr(out, "logits", None)
    if logits is None or logits.shape[:2] != input_ids.shape:
        got = "no .logits" if logits is None else f"logits of shape {tuple(logits.shape)}"
        raise ValueError(f"expected a causal LM returning .logits (B, T, vocab) for input {tuple(input_ids.shape)}, "
                         f"got {got}")
    return _nll(logits[:, :-1], input_ids[:, 1:])


def _forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None):
    return model(input_ids=input_ids) if attention_mask is None else model(input_ids=input_ids,
                                                                           attention_mask=attention_mask)


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Each target's NLL under ``logits`` (B, T, vocab), in float32 at least."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).transpose(1, 2), targets,
                           reduction="none")


def window_nll(model: nn.Module, batch: Tensor) -> Tensor:
    """Summed NLL of each row of ``batch`` (B, L) (``token_nll`` per row)."""
    return token_nll(model, batch).sum(dim=1)


# Logits scored at a time by ``chunked_token_nll``: 64 MB in float32, whatever the vocabulary (a
# 262,144-token head at 1024 positions would otherwise make 1 GB of logits, and more in the softmax).
LOGITS_PER_CHUNK = 2**24


def _logit_transform(model: nn.Module):
    """What transformers' forwards do to the head's output, from the config: Gemma's final
    soft-capping, Granite's ``logits_scaling``, Cohere's ``logit_scale`` (``chunked_nll_or_none``
    checks the result against the model's own logits)."""
    configs = [c for c in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None))
               if c is not None]

    def first(name):
        return next((getattr(c, name) for c in configs if getattr(c, name, None) is not None), None)

    cap, divide, multiply = first("final_logit_softcapping"), first("logits_scaling"), first("logit_scale")

    def transform(logits: Tensor) -> Tensor:
        if multiply is not None:
            logits = logits * multiply
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
    return transform


def chunked_token_nll(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``token_nll`` without the whole logits tensor: the model runs with its output head
    (``get_output_embeddings()``) returning nothing, and the head is applied to the hidden states
    ``LOGITS_PER_CHUNK`` logits at a time, each chunk scored and freed."""
    head = model.get_output_embeddings()
    seen = []

    def capture(x):  # the head's input, kept; its output left empty
        seen.append(x)
        return x.new_empty(*x.shape[:-1], 0)

    head.forward = capture  # this instance only, for this one call
    try:
        _forward(model, input_ids, attention_mask)
    finally:
        del head.forward
    if len(seen) != 1 or seen[0].shape[:2] != input_ids.shape:
        raise ValueError(f"{type(model).__name__}'s output head was called {len(seen)} time(s), not once on every "
                         "position: score it with token_nll")
    hidden, transform = seen[0], _logit_transform(model)
    B, T = input_ids.shape
    vocab = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None) or 1
    step = max(1, LOGITS_PER_CHUNK // (B * vocab))
    nll = torch.empty(B, T - 1, dtype=torch.promote_types(hidden.dtype, torch.float32), device=input_ids.device)
    for t in range(0, T - 1, step):
        logits = transform(head(hidden[:, t:min(t + step, T - 1)]))  # the last position predicts nothing
        end = t + logits.shape[1]
        nll[:, t:end] = _nll(logits, input_ids[:, t + 1:end + 1])
    return nll


def chunked_nll_or_none(model: nn.Module, probe: Tensor, tolerance: float = 1e-3) -> str | None:
    """None when ``chunked_token_nll`` equals ``token_nll`` on ``probe`` (B, L) for ``model``
    (within ``tolerance`` of each token's NLL), else why it cannot be used."""
    heads = getattr(model, "get_output_embeddings", None)
    if not callable(heads) or heads() is None:
        return "the model has no output head module (get_output_embeddings)"
    try:
        chunked = chunked_token_nll(model, probe)
    except (ValueError, RuntimeError, TypeError, IndexError) as exc:
        return f"its forward does not run with the head's output left empty ({type(exc).__name__}: {exc})"
    full = token_nll(model, probe)
    if not torch.allclose(chunked.float(), full.float(), rtol=tolerance, atol=tolerance):
        return (f"its forward changes the head's output in a way glowq does not know (NLL differs by "
                f"{float((chunked.float() - full.float()).abs().max()):.3g})")
    return None


PROBE_TOKENS = 64  # positions on which the chunked NLL is checked against the model's own logits


def _scorer(model: nn.Module, probe: Tensor):
    """``chunked_token_nll`` where it equals the model's own logits on ``probe``, else ``token_nll``
    (said once: the whole logits tensor is then made per batch)."""
    why = chunked_nll_or_none(model, probe)
    if why is None:
        return chunked_token_nll
    log.warning("glowq: perplexity of %s scores the whole logits tensor per batch (batch x positions x vocabulary "
                "in float32): %s", type(model).__name__, why)
    return token_nll


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
            score = _scorer(model, batches[0][:1, :PROBE_TOKENS].to(device))
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                nll = score(model, batch.to(device)).sum(dim=1)
                total += nll.double().sum().item()
                count += batch.shape[0] * (batch.shape[1] - 1)
    finally:
        model.train(was_training)
    mean = total / count
    if not math.isfinite(mean):
        raise ValueError(f"the model's loss is not finite ({mean}); check its dtype and weights")
    return PerplexityResult(math.exp(mean), mean, count, len(pieces), seq_len, time.perf_counter() - t0, bos)
