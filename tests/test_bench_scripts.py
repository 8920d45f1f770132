"""The GPU benchmark scripts' code paths, run small on the CPU (their numbers come from the GPU)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_selective_decode_benchmark_runs_every_variant_on_a_tiny_model(capsys):
    bench = _load("bench_selective_decode")
    assert bench.main(["--tiny", "--layers", "1", "--new-tokens", "4", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    for variant in ("float32", "W4A16", "independent (QERA)", "GlowQ", "GlowQ-S (keep 0.5)"):
        assert f"{variant}: " in printed


def test_selective_decode_benchmark_refuses_a_cpu_only_full_run(monkeypatch):
    bench = _load("bench_selective_decode")
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA machine"):
        bench.main([])
