"""Where cached activations live during block-by-block calibration: on the compute device, in CPU
memory, or on disk (``GlowQConfig.activations``).

An ``ActivationStore`` keeps one entry per calibration batch: any nest of tuples, lists and dicts
of tensors (a block's stream input, its masks and position embeddings). Tensors shared inside an
entry (one mask passed to every block) are stored once. ``get`` returns the entry on the compute
device. ``choose_place`` turns ``"auto"`` into a place by the measured free memory.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

PLACES = ("device", "cpu", "disk")


def _rebuild(like: tuple | list, items) -> tuple | list:
    items = list(items)
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)  # named tuples too


def move(obj: object, device: torch.device | str, memo: dict[int, Tensor] | None = None) -> object:
    """``obj`` with every tensor moved to ``device`` (a tensor reached twice is moved once)."""
    memo = {} if memo is None else memo
    if isinstance(obj, Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return _rebuild(obj, (move(v, device, memo) for v in obj))
    if isinstance(obj, dict):
        return {k: move(v, device, memo) for k, v in obj.items()}
    return obj


class _Slot(int):
    """Where the k-th distinct tensor of an entry goes back (``_split`` / ``_join``)."""


def _split(obj: object, tensors: list[Tensor], memo: dict[int, int]) -> object:
    """``obj`` with each tensor replaced by its slot in ``tensors`` (appended once per tensor)."""
    if isinstance(obj, Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = len(tensors)
            tensors.append(obj.detach().cpu())
        return _Slot(memo[id(obj)])
    if isinstance(obj, (tuple, list)):
        return _rebuild(obj, (_split(v, tensors, memo) for v in obj))
    if isinstance(obj, dict):
        return {k: _split(v, tensors, memo) for k, v in obj.items()}
    return obj


def _join(skeleton: object, tensors: list[Tensor]) -> object:
    if isinstance(skeleton, _Slot):
        return tensors[skeleton]
    if isinstance(skeleton, (tuple, list)):
        return _rebuild(skeleton, (_join(v, tensors) for v in skeleton))
    if isinstance(skeleton, dict):
        return {k: _join(v, tensors) for k, v in skeleton.items()}
    return skeleton


def nbytes(obj: object) -> int:
    """Bytes of the distinct tensors in ``obj``."""
    seen: dict[int, int] = {}

    def walk(o):
        if isinstance(o, Tensor):
            seen[id(o)] = o.numel() * o.element_size()
        elif isinstance(o, (tuple, list)):
            for v in o:
                walk(v)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)

    walk(obj)
    return sum(seen.values())


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device``: the CUDA allocator's free memory, or for the CPU
    the smaller of ``MemAvailable`` and what this process's cgroup still allows."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text())
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    if available is None:
        raise RuntimeError("cannot measure the free CPU memory (no /proc/meminfo); choose GlowQConfig(activations="
                           "'cpu' or 'disk') instead of 'auto'")
    return available


def choose_place(requested: str, needed: int, device: torch.device) -> str:
    """``requested``, or for ``"auto"`` the first of the compute device, the CPU and the disk whose
    free memory is at least twice ``needed`` bytes."""
    if requested != "auto":
        if requested not in PLACES:
            raise ValueError(f"activations must be one of {['auto', *PLACES]}, got {requested!r}")
        return requested
    if 2 * needed <= free_bytes(device):
        return "device"
    if device.type != "cpu" and 2 * needed <= free_bytes(torch.device("cpu")):
        return "cpu"
    return "disk"


class ActivationStore:
    """Entries by batch index, kept at ``place`` and handed out on ``device``.

    Args:
        place: ``"device"``, ``"cpu"`` or ``"disk"``.
        device: the compute device ``get`` returns entries on.
        directory: for ``"disk"``: the directory (created if needed) in which the store makes a
            temporary directory of its own (the system's temporary directory when None); ``close``
            removes that and every file in it.
    """

    def __init__(self, place: str, device: torch.device, directory: str | os.PathLike | None = None):
        if place not in PLACES:
            raise ValueError(f"place must be one of {list(PLACES)}, got {place!r}")
        self.place, self.device = place, torch.device(device)
        self._entries: dict[int, object] = {}
        self._dir: Path | None = None
        if place == "disk":  # a directory of its own: several stores may share one offload_dir
            if directory is not None:
                Path(directory).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="glowq-activations-", dir=directory))

    def _path(self, i: int) -> Path:
        return self._dir / f"batch-{i:06d}.pt"

    def __setitem__(self, i: int, entry: object) -> None:
        if self.place == "disk":  # tensors to the file, the rest (None, flags, objects) stays here
            tensors: list[Tensor] = []
            self._entries[i] = _split(entry, tensors, {})
            torch.save(tensors, self._path(i))
        else:
            self._entries[i] = move(entry, self.device if self.place == "device" else torch.device("cpu"))

    def __getitem__(self, i: int) -> object:
        if i not in self._entries:
            raise KeyError(f"no cached activations for batch {i}")
        if self.place == "disk":
            tensors = torch.load(self._path(i), map_location=self.device, weights_only=True)
            return _join(self._entries[i], tensors)
        return move(self._entries[i], self.device)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Forget every entry; remove the files written to disk."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._entries.clear()

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
