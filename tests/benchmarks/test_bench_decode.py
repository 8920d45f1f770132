"""The end-to-end decode benchmark (its numbers come from the GPU) and its int4 baseline, on the CPU."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_tinygemm_linear_reproduces_the_quantized_linear_from_its_codes(dtype, tol):
    from glowq_fx.modules.linear import QuantizedLinear
    from glowq_fx.quant.rtn import quantize_rtn

    tinygemm = _load("tinygemm")
    gen = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    for N, K, group_size in ((48, 256, 32), (64, 128, 64), (80, 512, 128)):
        W = torch.randn(N, K, generator=gen).to(dtype)
        q = QuantizedLinear.from_quantized(quantize_rtn(W, group_size), bias=torch.randn(N, generator=gen).to(dtype))
        x = torch.randn(2, 3, K, generator=gen).to(dtype)
        want = q(x).float()
        got = tinygemm.TinygemmLinear.from_quantized(q)(x).float()
        assert got.shape == want.shape
        assert float((got - want).norm() / want.norm()) < tol


def test_tinygemm_refuses_what_it_cannot_run():
    from glowq_fx.modules.linear import QuantizedLinear, SharedProjection
    from glowq_fx.quant.rtn import quantize_rtn

    tinygemm = _load("tinygemm")
    corrected = QuantizedLinear.from_quantized(quantize_rtn(torch.randn(32, 64), 32))
    corrected.set_correction(torch.randn(32, 4), SharedProjection(torch.randn(4, 64), ("m",)))
    with pytest.raises(ValueError, match="method='none'"):
        tinygemm.TinygemmLinear.from_quantized(corrected)
    ragged = QuantizedLinear.from_quantized(quantize_rtn(torch.randn(32, 80), 32))
    with pytest.raises(ValueError, match="whole groups"):
        tinygemm.TinygemmLinear.from_quantized(ragged)
    with pytest.raises(ValueError, match="multiple of 16"):
        tinygemm.TinygemmLinear.from_quantized(QuantizedLinear.from_quantized(quantize_rtn(torch.randn(40, 64), 32)))
    with pytest.raises(ValueError, match="no QuantizedLinear"):
        tinygemm.swap_to_tinygemm(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.slow  # a benchmark script end to end, 35-60 s (make test-slow)
def test_decode_benchmark_runs_every_row_compiled_where_it_says(tmp_path):
    """A tiny Qwen2 (biases: tinygemm adds them itself) through every row on the CPU: each
    compiled row compiled graphs in its warm-up and agrees with its eager model, the ratios in the
    JSON are the measured ones, the 4-bit models are smaller, and the table and chart are written."""
    bench = _load("bench_decode")
    out = tmp_path / "decode"
    assert bench.main(["--tiny", "--models", "qwen2.5-7b", "--batches", "1", "--prompts", "8", "--new-tokens", "3",
                       "--repeats", "1", "--rank", "8", "--out", str(out)]) == 0
    meta = json.loads((out / "decode.json").read_text())
    rows = {r["row"]: r for r in meta["rows"]}
    expected = [r.format(float="fp32") for r in bench.ROWS]
    assert sorted(rows) == sorted(expected)
    for name, r in rows.items():
        compiled = name.endswith("compiled")
        assert (r["graphs_compiled"] > 0) == compiled, name
        # float32 on the CPU: the logits agree closely; a near-tie may still flip a later token
        assert r["logits_error_vs_eager"] < 1e-3 and r["tokens_agree_with_eager"] > 0.5, name
        assert r["decode_vs_float_compiled"] == pytest.approx(
            r["decode_tokens_per_s"] / rows["fp32 compiled"]["decode_tokens_per_s"])
        assert r["ttft_vs_independent_compiled"] == pytest.approx(
            r["ttft_ms"] / rows["independent compiled"]["ttft_ms"])
        assert r["decode_tokens_per_s"] == pytest.approx(2 / r["decode_s"])
        if r["variant"] != "float":
            assert r["weights_mib"] < rows["fp32 eager"]["weights_mib"], name
    # W4A16 runs PyTorch's CPU int4 kernel here (bf16 activations), tinygemm's float reference
    assert rows["int4 tinygemm compiled"]["logits_error_vs_w4a16"] < 2e-2
    assert rows["W4A16 compiled"]["groups_corrected"] == 0
    assert rows["GlowQ compiled"]["groups_corrected"] == rows["GlowQ compiled"]["groups"]
    table = (out / "decode.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    assert [line.split(" | ")[0].lstrip("| ").split(" (")[0] for line in lines] == expected  # the order
    assert (out / "decode.png").stat().st_size > 0
    bench.main(["--write-only", str(out / "decode.json"), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "decode.md").read_text() == table


def test_decode_benchmark_refuses_bad_requests(monkeypatch):
    bench = _load("bench_decode")
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA machine"):
        bench.main([])
    with pytest.raises(SystemExit, match="unknown or no models"):
        bench.main(["--tiny", "--models", "gpt5"])
    with pytest.raises(SystemExit, match="keep both"):
        bench.main(["--tiny", "--variants", "int4 tinygemm"])
    with pytest.raises(SystemExit, match="new-tokens must be"):
        bench.main(["--tiny", "--new-tokens", "1"])
