"""From text to model inputs: the token stream, calibration windows, and the one recipe that
turns a named text into ``quantize_``'s batches for a tokenizer.
"""
from __future__ import annotations

import torch
from torch import Tensor

from glowq_fx.data.corpus import load_text


def tokenize(tokenizer, text: str) -> Tensor:
    """The text's token ids as one 1-D int64 tensor (tokenized once, as the protocol says)."""
    if not text:
        raise ValueError("the text to tokenize is empty")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
    return ids.reshape(-1).to(torch.long)


def calibration_batches(tokens: Tensor, n_samples: int = 32, seq_len: int = 512, *, batch_size: int = 8,
                        seed: int = 0, device: torch.device | str = "cpu") -> list[dict[str, Tensor]]:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random offsets (the GPTQ recipe), as
    ``quantize_`` batches ``{"input_ids", "attention_mask"}`` of up to ``batch_size`` windows, on
    ``device`` (the model's)."""
    if n_samples < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError(f"n_samples, seq_len and batch_size must be positive, got {n_samples}, {seq_len}, {batch_size}")
    if tokens.dim() != 1 or tokens.numel() < seq_len:
        raise ValueError(f"need a 1-D token stream of at least seq_len={seq_len} tokens, got shape {tuple(tokens.shape)}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n_samples,), generator=gen)
    rows = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()]).to(device)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in rows.split(batch_size)]


def text_calibration_batches(tokenizer, text: str, n_samples: int = 32, seq_len: int = 512, *, batch_size: int = 8,
                             seed: int = 0, device: torch.device | str = "cpu") -> list[dict[str, Tensor]]:
    """``quantize_`` batches from a text: ``text`` is a built-in name (``news``, ``wikipedia``) or a
    file (``data.corpus.load_text``), tokenized once with ``tokenizer``, then ``n_samples`` windows
    of ``seq_len`` tokens at seeded offsets (``calibration_batches``)."""
    return calibration_batches(tokenize(tokenizer, load_text(text)), n_samples, seq_len, batch_size=batch_size,
                               seed=seed, device=device)
