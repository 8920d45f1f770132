"""Checking that a device a user names exists here, before any work is done."""
from __future__ import annotations

import torch


def check_device(device: str | torch.device, what: str = "device") -> torch.device:
    """``device`` as a ``torch.device``; a ``ValueError`` naming the fix when it is not a device
    name, or names an accelerator this machine does not have."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{what} {device!r} is not a device name ({exc}); use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise ValueError(f"{what} {device!r}: {why}; use cpu (or install a CUDA build of torch on a GPU machine)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); use "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type not in ("cpu", "meta"):
        backend = torch.backends.mps if parsed.type == "mps" else getattr(torch, parsed.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"{what} {device!r}: no {parsed.type} device is available here; use cpu")
    return parsed
