"""The CPU decode benchmark's code path on a tiny model (its numbers come from `make bench-cpu`)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_writes_its_table(tmp_path):
    rows = "float32 eager,GlowQ eager,GlowQ compiled,torchao int4"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cpu_decode.py"), "--tiny", "--rows", rows,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((tmp_path / "cpu_decode_tiny.json").read_text())
    measured = {r["row"]: r for r in meta["rows"] if "decode_tok_s" in r}
    try:
        import torchao  # noqa: F401
    except ImportError:
        assert any(r["row"] == "torchao int4" and "torchao does not import" in r["skipped"] for r in meta["rows"])
        measured["torchao int4"] = None
    assert set(measured) == set(rows.split(","))
    ours = measured["GlowQ compiled"]
    assert all(r is None or r["decode_tok_s"]["1"] > 0 and r["ttft_s"] > 0 for r in measured.values())
    # the tiny model scores random tokens: a perplexity, of no meaning, on every row
    assert all(r is None or r["ppl"] > 1 for r in measured.values())
    # every linear of the tiny Llama and the int8 head: our GEMVs where they build, else PyTorch's kernels
    assert ours["kernels"] in ({"cpu_gemv": 14, "cpu_gemv8": 1}, {"cpu_int4": 14, "cpu_int8": 1})
    # each row in its own process: its own peak memory; the bytes of its tensors, the int8 head's included
    assert ours["peak_rss_mib"] > 0 and ours["bytes"] < measured["float32 eager"]["bytes"]
    assert "vs float32 eager" in ours
    # GlowQ eager and compiled load the one checkpoint their shared options were quantized to
    assert measured["GlowQ eager"]["quantize_s"] == ours["quantize_s"] > 0
    assert "| GlowQ compiled |" in (tmp_path / "cpu_decode_tiny.md").read_text()
    assert (tmp_path / "cpu_decode_tiny.png").stat().st_size > 0


def test_unknown_rows_are_refused_with_the_list():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cpu_decode.py"), "--tiny", "--rows",
                           "GlowQ fast"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown rows ['GlowQ fast']" in done.stderr and "GlowQ compiled" in done.stderr
