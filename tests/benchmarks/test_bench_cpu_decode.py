"""The CPU decode benchmark's code path on a tiny model (its numbers come from `make bench-cpu`)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_writes_its_table(tmp_path):
    rows = "float32 eager,GlowQ eager,GlowQ compiled"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cpu_decode.py"), "--tiny", "--rows", rows,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((tmp_path / "cpu_decode_tiny.json").read_text())
    measured = {r["row"]: r for r in meta["rows"] if "decode_tok_s" in r}
    assert set(measured) == set(rows.split(","))
    assert all(r["decode_tok_s"]["1"] > 0 and r["ttft_s"] > 0 for r in measured.values())
    assert measured["GlowQ compiled"]["kernels"] == {"cpu_int4": 14}  # every linear of the tiny Llama
    assert "vs float32 eager" in measured["GlowQ compiled"]
    assert "| GlowQ compiled |" in (tmp_path / "cpu_decode_tiny.md").read_text()
    assert any(r["row"] == "torchao int4" and "skipped" in r for r in meta["rows"])
