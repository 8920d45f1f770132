import os

import pytest
import torch
import transformers as T

from glowq_fx import GlowQConfig, calibrate
from tests_helpers import tiny_llama_config


@pytest.fixture(scope="module")
def llama():
    """``tests_helpers.random_llama()``, built once per test module."""
    from tests_helpers import random_llama

    return random_llama()


@pytest.fixture(scope="module")
def glowq_s_model():
    """A 2-layer Llama calibrated once per test module (the GlowQ-S and study tests' model):
    (model, calibration, batches)."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(tiny_llama_config(hidden_size=96, intermediate_size=160, num_hidden_layers=2)).eval()
    batches = [{"input_ids": torch.randint(0, 128, (2, 32))} for _ in range(2)]
    cal = calibrate(model, batches, GlowQConfig(group_size=32), progress=False)
    return model, cal, batches


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


# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores:
# two workers each running two intra-op threads on a 2-core machine would fight for them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# Without a GPU the Triton kernels run in Triton's CPU interpreter. triton.jit reads this when
# glowq_fx.kernels.w4a16 is imported, which only the kernel tests (and CUDA launches) do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
