"""Tensors on disk in transformers-style safetensors shards, each with its size and SHA-256.

One shard is ``model.safetensors``; more are ``model-0000i-of-0000N.safetensors`` with a
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {key: file}}``),
as transformers writes them, so its loaders find every tensor. Shards are cut in state-dict order,
each at most ``max_shard_size`` bytes of tensor data (a tensor larger than that gets a shard of its
own). Reading checks every shard before any tensor is used: present, of the recorded size and
SHA-256, no key in two shards; then ``iter_shards`` hands them out one at a time, so loading holds
one shard's tensors at once.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from glowq_fx.data.cache import sha256_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded (into this model); the message says why."""


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"`` (10^9) or ``"500MiB"`` (2^20), as transformers."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
        if match is None:
            raise ValueError(f"max_shard_size must be a number of bytes or a size like '5GB' or '500MiB', got {size!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


class ShardWriter:
    """Shards written as tensors arrive (``add``): each tensor's bytes go to disk at once, so a model
    quantized block by block holds none of its result, whatever ``max_shard_size``; ``close`` gives
    the shards their final names, writes the index, removes what an earlier save left, and returns
    ``[{"file", "bytes", "sha256"}]``.

    A shard is assembled from one temporary data file per element size (8, 4, 2, 1 bytes) when it
    is full: the safetensors header, then the data files widest first, so every tensor starts at a
    multiple of its element size, as ``safetensors.torch.save_file`` lays them out.

    Args:
        directory: where the shards go (created if needed).
        max_shard_size: bytes of tensor data per shard at most (int, or ``"5GB"``, ``"500MiB"``);
            a tensor larger than that gets a shard of its own.
        metadata: the safetensors header's metadata of every shard.
    """

    def __init__(self, directory: Path, max_shard_size: int | str, metadata: dict[str, str] | None = None):
        self.directory, self.limit, self.metadata = Path(directory), parse_size(max_shard_size), metadata
        self.directory.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, tuple[str, list[int], int, int]] = {}  # key -> (dtype, shape, element size, bytes)
        self._data: dict[int, object] = {}  # element size -> open temporary data file of the shard being filled
        self._size = 0
        self._parts: list[tuple[Path, list[str], int]] = []  # (temporary file, its keys, tensor bytes)

    def add(self, tensors: Mapping[str, Tensor]) -> None:
        for key, t in tensors.items():
            if key in self._pending or any(key in keys for _, keys, _ in self._parts):
                raise ValueError(f"tensor {key} was written twice")
            if t.dtype not in _NAMES:
                raise ValueError(f"tensor {key} has dtype {t.dtype}, which a safetensors shard cannot hold here "
                                 f"(one of {sorted(map(str, _NAMES))})")
            n = t.numel() * t.element_size()
            if self._pending and self._size + n > self.limit:
                self._flush()
            size = t.element_size()
            if size not in self._data:
                self._data[size] = open(self._data_path(size), "wb")
            t = t.detach().contiguous().cpu()
            self._data[size].write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if n else b"")
            self._pending[key] = (_NAMES[t.dtype], list(t.shape), size, n)
            self._size += n

    def _data_path(self, size: int) -> Path:
        return self.directory / f".glowq-part-{len(self._parts):05d}.data{size}"

    def _flush(self) -> None:
        path = self.directory / f".glowq-part-{len(self._parts):05d}.safetensors"
        header: dict[str, object] = {} if self.metadata is None else {"__metadata__": dict(self.metadata)}
        offset = 0
        for size in sorted(self._data, reverse=True):
            self._data[size].close()
            for key, (dtype, shape, key_size, n) in self._pending.items():
                if key_size == size:
                    header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
                    offset += n
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors pads its header
        with open(path, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little"))
            out.write(encoded)
            for size in sorted(self._data, reverse=True):
                with open(self._data_path(size), "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 24)
                self._data_path(size).unlink()
        self._parts.append((path, list(self._pending), self._size))
        self._pending, self._data, self._size = {}, {}, 0

    def close(self) -> list[dict]:
        if self._pending or not self._parts:
            self._flush()
        n = len(self._parts)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for stale in self.directory.iterdir():
            if (_SHARD.fullmatch(stale.name) or stale.name in (SINGLE_FILE, INDEX_FILE)) and stale.name not in names:
                stale.unlink()
        records = []
        for name, (part, _, _) in zip(names, self._parts):
            path = part.replace(self.directory / name)
            records.append({"file": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        if n > 1:
            weight_map = {key: name for name, (_, keys, _) in zip(names, self._parts) for key in keys}
            total = sum(size for _, _, size in self._parts)
            (self.directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}, indent=1))
        return records


def write_shards(tensors: Mapping[str, Tensor], directory: Path, max_shard_size: int | str,
                 metadata: dict[str, str] | None = None) -> list[dict]:
    """Write ``tensors`` (distinct storages) as the shards of ``directory`` (``ShardWriter``)."""
    writer = ShardWriter(directory, max_shard_size, metadata)
    writer.add(tensors)
    return writer.close()


def check_shards(directory: Path, shards: list[dict], description: str) -> None:
    """Every shard present, of its recorded size and SHA-256 (recorded in ``description``)."""
    for shard in shards:
        path = directory / shard["file"]
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {len(shards)} shard(s) are listed in {description}, nothing "
                                  "was loaded")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise CheckpointError(f"{path} is {size} bytes but was written with {shard['bytes']}: the file is "
                                  "truncated or was replaced")
        if sha256_file(path) != shard["sha256"]:
            raise CheckpointError(f"{path} does not match its SHA-256 in {description}: the file is corrupted")


def read_headers(directory: Path, shards: list[dict]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor's shape and dtype from the shards' headers (no tensor is read); a key in two
    shards is an error."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    owner: dict[str, str] = {}
    for shard in shards:
        path = directory / shard["file"]
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key in owner:
                        raise CheckpointError(f"{key} is in both {owner[key]} and {shard['file']}")
                    sl = f.get_slice(key)
                    out[key], owner[key] = (tuple(sl.get_shape()), _DTYPES[sl.get_dtype()]), shard["file"]
        except (SafetensorError, OSError, KeyError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    return out


def iter_shards(directory: Path, shards: list[dict], device: str | torch.device) -> Iterator[dict[str, Tensor]]:
    """The tensors of each shard in turn, on ``device``."""
    from safetensors.torch import load_file

    for shard in shards:
        yield load_file(str(directory / shard["file"]), device=str(device))
