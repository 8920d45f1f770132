"""The shared-projection GEMV (``R = x B^T`` for decode rows) against a float64 reference.

Runs in Triton's interpreter on CPU (conftest sets ``TRITON_INTERPRET=1``), compiled on a GPU.
Fresh random inputs every run; the output is filled with NaN before the launch. Tolerance, per
element: one rounding of the output (``2 u |ref|``; the interpreter truncates bfloat16) plus
``8 u sqrt(sum_k (x_k b_k)^2)`` for the float32 accumulation order; a wrong row, column or K
offset moves an element by about the latter's square root term itself.
"""
import pytest
import torch

from glowq_fx.kernels import launch, projection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def check(M, K, rank, dtype, gen, kernel, batch=()):
    x = torch.randn(*batch, M, K, generator=gen).to(dtype).to(DEVICE)
    B = (torch.randn(rank, K, generator=gen) / K**0.5).to(dtype).to(DEVICE)
    rows = x.numel() // K
    out = torch.full((rows, rank), float("nan"), dtype=dtype, device=DEVICE)
    R = launch.launch_projection(x, B, kernel=kernel, out=out)
    assert R.shape == (*batch, M, rank) and R.data_ptr() == out.data_ptr()
    x64, B64 = x.double().reshape(rows, K), B.double()
    ref, spread = x64 @ B64.T, ((x64**2) @ (B64**2).T).sqrt()
    u = UNIT_ROUNDOFF[dtype]
    err = (R.reshape(rows, rank).double() - ref).abs()
    assert not torch.isnan(R).any(), "elements left unwritten"
    worst = (err / (2 * u * ref.abs() + 8 * u * spread)).max().item()
    assert worst <= 1, f"error {worst:.2f}x the tolerance"


# K not a multiple of any K tile, ranks not multiples of the row block; 16 rows is the most the
# GEMV takes, 17 goes to cuBLAS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,K,rank", [(1, 1000, 64), (1, 37, 7), (3, 600, 5), (16, 520, 33)])
def test_projection_gemv_matches_float64_reference(M, K, rank, dtype, gen):
    check(M, K, rank, dtype, gen, kernel=True)


def test_projection_of_a_batch_keeps_its_leading_dims(gen):
    check(2, 300, 9, torch.float16, gen, kernel=True, batch=(1,))


@pytest.mark.parametrize("M", [2, projection.MAX_ROWS + 1], ids=["cublas-forced", "many-rows"])
def test_projection_matmul_path(M, gen):
    check(M, 300, 9, torch.bfloat16, gen, kernel=False if M <= projection.MAX_ROWS else None)


@pytest.mark.parametrize("index", range(len(projection.CONFIGS)))
def test_every_autotune_configuration_is_right(index, gen, monkeypatch):
    """The GPU's autotuner picks by speed alone, the interpreter runs only the first entry: each
    configuration on its own, with a K longer than every K tile and a rank over several row blocks."""
    import triton

    only = triton.autotune(configs=[projection.CONFIGS[index]], key=["K", "RANK"])(projection._projection_gemv_kernel)
    monkeypatch.setattr(projection, "projection_gemv_kernel", only)
    check(3, 5000, 19, torch.bfloat16, gen, kernel=True)
