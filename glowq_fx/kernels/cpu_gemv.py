"""Our CPU decode GEMVs (``cpu/gemv.cpp``): 4-bit (and int8) codes against activations rounded to int16.

On x86 CPUs with AVX2 (AVX-512 machines too) it multiplies a few rows of activations by the packed
codes with integer dot products, two ``madd_epi16`` per 32 codes, as llama.cpp does with int8
activations; the activations are rounded to int16 with one scale per 32 columns (relative error
~2e-5, smaller than bfloat16's 4e-3). On the 2-core AVX2 machine it reads a 4096 x 4096 matrix at
one row in 0.48-0.70 ms (noisy machine), where PyTorch's int4 kernel takes 1.17 ms (the bench's run:
0.699 against 1.168 ms).

The C++ source is compiled on first use with the machine's C++ compiler (the one Inductor uses for
its CPU kernels) against this torch, into ``<cache>/cpu_kernels/<hash>/`` (``glowq_fx.data.cache``:
the hash covers the source, torch's version and the flags), and registered as the operator
``torch.ops.glowq_cpu.w4a16_gemv`` (with the bias and the low-rank correction ``R A^T`` added
inside), ``w8a16_gemv`` (int8 codes with one scale per row: the output head's storage,
``int8_matmul``) and ``dense_gemv`` (a group's projection ``R = x B^T``, ``project``), which
Inductor calls as extern kernels. Where they cannot
be built or loaded, ``unavailable_reason`` says why and ``cpu_int4`` / ``cpu_int8`` keep PyTorch's
kernels.

Weight layout (``convert``; made on the machine that runs it, never stored): row ``n`` of ``N`` is
``K_pad / 2`` bytes (the codes' columns, whole groups with zero codes past ``in_features``); in
each block of 32 codes, byte ``j`` holds code ``j`` in its low nibble and code ``j + 16`` in its
high one. Parameters: float32 (2, N, n_groups), ``[s, s z]`` for ``deq(W) = s (q - z)``.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from glowq_fx.data.cache import cache_dir
from glowq_fx.kernels.layout import group_size_of, whole_group_codes, zero_points

SOURCE = Path(__file__).parent / "cpu" / "gemv.cpp"
BLOCK = 32  # codes per integer dot product block (and the activations' scale block)
MAX_ROWS = 16  # rows the kernel takes in one call (its accumulators are per row)
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)
INSTRUCTION_SETS = ("AVX2", "AVX512")  # PyTorch's dispatch capabilities whose CPUs have AVX2 and FMA
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx2", "-mfma", "-w")


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _command(compiler: str, output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    return [compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            str(SOURCE), f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}",
            "-o", str(output)]


def library_path(compiler: str) -> Path:
    """Where the compiled library for this source, torch and compiler lives in the cache."""
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(" ".join([torch.__version__, sys.platform, *_command(compiler, Path("out"))]).encode())
    return cache_dir() / "cpu_kernels" / key.hexdigest()[:16] / "libglowq_cpu.so"


def _build(compiler: str, path: Path) -> None:
    """Compile into a temporary file of this process, then rename: processes building at once
    (test workers) each finish a whole library and the last rename wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="build.", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run(_command(compiler, Path(tmp)), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-2000:] or f"{compiler} exited with {done.returncode}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def unavailable_reason() -> str | None:
    """None once the kernel is loaded in this process (built first if needed), else why it cannot be."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in INSTRUCTION_SETS:
        return (f"this CPU's PyTorch kernels dispatch to {capability}; the GEMV needs AVX2 "
                f"({' or '.join(INSTRUCTION_SETS)})")
    if hasattr(torch.ops.glowq_cpu, "w4a16_gemv_group"):
        return None
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler (g++ or $CXX) to build it with"
    path = library_path(compiler)
    try:
        if not path.is_file():
            _build(compiler, path)
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as err:
        return f"building or loading {path.name} failed: {err}"
    return None


def convert(qweight: Tensor, scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
    """(codes in the kernel's layout, float32 ``[s, s z]`` parameters) of a packed weight."""
    n_groups, N = scales.shape
    group_size = group_size_of(qweight, scales)
    if group_size % BLOCK:
        raise ValueError(f"the CPU GEMV takes group sizes that are multiples of {BLOCK}, got {group_size}")
    K_pad = n_groups * group_size  # the codes' columns: whole groups, zero codes past in_features
    blocks = whole_group_codes(qweight, scales).T.to(torch.uint8).reshape(N, K_pad // BLOCK, BLOCK)
    weight = (blocks[..., :BLOCK // 2] | (blocks[..., BLOCK // 2:] << 4)).reshape(N, K_pad // 2).contiguous()
    s = scales.float().T
    return weight, torch.stack([s, s * zero_points(zeros).T]).contiguous()


def serves(x: Tensor) -> bool:
    """True where these kernels take ``x``: on the CPU, loaded, at most ``MAX_ROWS`` rows (may be
    symbolic: a guard) of float32 or bfloat16."""
    return (x.device.type == "cpu" and x.dtype in ACTIVATION_DTYPES and x.numel() // max(x.shape[-1], 1) <= MAX_ROWS
            and unavailable_reason() is None)


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.dtype in ACTIVATION_DTYPES else x2.float()


def _factor(t: Tensor) -> Tensor:
    return t if t.dtype in ACTIVATION_DTYPES else t.float()


def matmul(x: Tensor, weight: Tensor, params: Tensor, group_size: int, bias: Tensor | None = None,
           A: Tensor | None = None, R: Tensor | None = None) -> Tensor:
    """``x deq(W)^T + bias + R A^T`` in ``x``'s dtype, for at most ``MAX_ROWS`` rows of ``x`` (the
    kernel takes float32 and bfloat16; other dtypes go through float32). The bias and the
    low-rank correction are added in float32 inside the kernel, and the sum rounded once."""
    R2 = None if R is None else _rows(R)
    y = torch.ops.glowq_cpu.w4a16_gemv(_rows(x), weight, params[0], params[1], group_size,
                                       None if bias is None else _factor(bias), None if A is None else _factor(A), R2)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def group_matmul(x: Tensor, weights: list[Tensor], params: list[Tensor], group_sizes: list[int],
                 biases: list[Tensor | None], As: list[Tensor | None], R: Tensor | None = None,
                 B: Tensor | None = None) -> list[Tensor]:
    """``matmul`` of each member of a group reading ``x``, in one call: the activations rounded
    once, and ``R`` given or made from ``B`` inside (rounded to ``x``'s dtype, as ``project``
    returns it), so each member's result equals its own ``matmul``."""
    ys = torch.ops.glowq_cpu.w4a16_gemv_group(
        _rows(x), list(weights), [p[0] for p in params], [p[1] for p in params], list(group_sizes),
        [None if b is None else _factor(b) for b in biases], [None if A is None else _factor(A) for A in As],
        None if R is None else _rows(R), None if B is None else _factor(B))
    return [y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype) for y in ys]


def project(x: Tensor, B: Tensor) -> Tensor:
    """``x B^T`` in ``x``'s dtype for a dense float32 or bfloat16 ``B`` (rank, K): a group's
    projection at decode rows, accumulated in float32."""
    y = torch.ops.glowq_cpu.dense_gemv(_rows(x).float(), _factor(B))
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def int8_matmul(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """``x (qweight * scales[:, None])^T`` in ``x``'s dtype for int8 (N, K) codes and float32 (N,)
    scales, at most ``MAX_ROWS`` rows of ``x``."""
    y = torch.ops.glowq_cpu.w8a16_gemv(_rows(x), qweight, scales)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
