"""GlowQ-S on SmolLM2: the three scores' top-k sweeps, their elbows and the quantize-time 'auto' pick,
against the equal-bytes baseline of every group at a lower rank (48, 32, 16, 8).

Same as `glowq select --score gain --score weight_error --score measured --compare-rank 48 ...`,
with results written to benchmarks/results/selective.{json,md,png}. Extra arguments go to
`glowq select` (e.g. --step 4).

    python benchmarks/bench_selective.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from glowq_fx.cli.main import main  # noqa: E402

if __name__ == "__main__":
    out = Path(__file__).parent / "results" / "selective"
    sys.exit(main(["select", "--score", "gain", "--score", "weight_error", "--score", "measured",
                   "--compare-rank", "48", "--compare-rank", "32", "--compare-rank", "16", "--compare-rank", "8",
                   "--out", str(out), *sys.argv[1:]]))
