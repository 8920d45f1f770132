"""From text to model inputs: the token stream, calibration windows, and the one recipe that
turns a named text into ``quantize_``'s batches for a tokenizer.

BOS: a model trained to always see its BOS token at position 0 (Gemma, Llama) is in a state it
never sees in use when a window starts mid-text. ``bos_token`` says which token starts every
window: ``"auto"`` (the default) the tokenizer's BOS when the tokenizer adds one by default (as
lm-eval does), ``"on"`` the BOS whatever the tokenizer does, ``"off"`` none (the GPTQ and GlowQ
papers' protocol: windows cut straight from the stream). The stream itself carries no special
tokens; with a BOS, a window is the BOS followed by ``seq_len - 1`` text tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor

from glowq_fx.data.corpus import load_text

BOS_CHOICES = ("auto", "on", "off")


def bos_token(tokenizer, bos: str = "auto") -> int | None:
    """The token id every window starts with for ``bos`` (module docstring), or None."""
    if bos not in BOS_CHOICES:
        raise ValueError(f"bos must be one of {list(BOS_CHOICES)}, got {bos!r}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos == "off":
        return None
    if bos == "on":
        if bos_id is None:
            raise ValueError("bos='on', but the tokenizer has no BOS token; use bos='off'")
        return int(bos_id)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos_id) if bos_id is not None and len(probe) and probe[0] == bos_id else None


def tokenize(tokenizer, text: str) -> Tensor:
    """The text's token ids as one 1-D int64 tensor, without special tokens (tokenized once, as
    the protocol says; a BOS, when wanted, starts each window: ``bos_token``)."""
    if not text:
        raise ValueError("the text to tokenize is empty")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return ids.reshape(-1).to(torch.long)


def calibration_batches(tokens: Tensor, n_samples: int = 32, seq_len: int = 512, *, batch_size: int = 8,
                        seed: int = 0, device: torch.device | str = "cpu",
                        bos: int | None = None) -> list[dict[str, Tensor]]:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random offsets (the GPTQ recipe), as
    ``quantize_`` batches ``{"input_ids", "attention_mask"}`` of up to ``batch_size`` windows, on
    ``device`` (the model's). With a ``bos`` token id each window is that token followed by
    ``seq_len - 1`` text tokens."""
    if n_samples < 1 or seq_len < 1 + (bos is not None) or batch_size < 1:
        raise ValueError(f"n_samples, seq_len and batch_size must be positive (seq_len at least 2 with a BOS), got "
                         f"{n_samples}, {seq_len}, {batch_size}")
    text_len = seq_len - (bos is not None)
    if tokens.dim() != 1 or tokens.numel() < text_len:
        raise ValueError(f"need a 1-D token stream of at least {text_len} tokens for windows of {seq_len}, got shape "
                         f"{tuple(tokens.shape)}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - text_len + 1, (n_samples,), generator=gen)
    rows = torch.stack([tokens[s:s + text_len] for s in starts.tolist()])
    if bos is not None:
        rows = torch.cat([torch.full((n_samples, 1), bos, dtype=rows.dtype), rows], dim=1)
    rows = rows.to(device)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in rows.split(batch_size)]


def text_calibration_batches(tokenizer, text: str, n_samples: int = 32, seq_len: int = 512, *, batch_size: int = 8,
                             seed: int = 0, device: torch.device | str = "cpu",
                             bos: str = "auto") -> list[dict[str, Tensor]]:
    """``quantize_`` batches from a text: ``text`` is a built-in name (``news``, ``wikipedia``) or a
    file (``data.corpus.load_text``), tokenized once with ``tokenizer``, then ``n_samples`` windows
    of ``seq_len`` tokens at seeded offsets (``calibration_batches``), each started by the BOS
    that ``bos`` asks for (``bos_token``)."""
    return calibration_batches(tokenize(tokenizer, load_text(text)), n_samples, seq_len, batch_size=batch_size,
                               seed=seed, device=device, bos=bos_token(tokenizer, bos))
