import os

import pytest
import torch


@pytest.fixture(scope="module")
def llama():
    """``tests_helpers.random_llama()``, built once per test module."""
    from tests_helpers import random_llama

    return random_llama()


@pytest.fixture
def gen():
    """A fresh seeded generator per test: reproducible, and the global RNG is untouched."""
    return torch.Generator().manual_seed(torch.initial_seed() % 2**31)


def anisotropic_second_moment(d: int, gen: torch.Generator, *, n_tokens: int = 4096, outliers: int = 4) -> torch.Tensor:
    """S = X^T X / N of LLM-like activations: decaying spectrum plus a few outlier channels."""
    mixing = torch.randn(d, d, generator=gen, dtype=torch.float64)
    decay = torch.arange(1, d + 1, dtype=torch.float64) ** -0.8
    X = torch.randn(n_tokens, d, generator=gen, dtype=torch.float64) @ (decay[:, None] * mixing)
    X[:, torch.randperm(d, generator=gen)[:outliers]] *= 20
    return X.T @ X / n_tokens


# Without a GPU the Triton kernels run in Triton's CPU interpreter. triton.jit reads this when
# glowq_fx.kernels.w4a16 is imported, which only the kernel tests (and CUDA launches) do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
