"""Peak memory of quantize_ beyond the model's own weights, whole-model vs block by block, by depth.

A random Llama-shaped model of fixed width (hidden 1024, MLP 2816, 16 heads / 4 kv heads, vocab
8192, float32) with 4, 8, 16 and 32 layers is quantized (GlowQ rank 32, W4 g128) on 8 x 512 random
tokens, once with ``calibration="model"`` (every group's S at once) and once with
``calibration="blocks"``. Each run is a fresh child process: its peak resident memory (VmHWM,
reset by ``/proc/self/clear_refs`` once the model and batches are built) minus its resident
memory at that point is the memory quantize_ added. Beside it, the bound block by block should
stay under: one block's weights, one block's S (float32) and the cached block inputs (two copies
with float inputs). The process's first ``torch.compile`` (loading Dynamo, paid once per process
whatever the model) is made before the reset and reported apart. The 32-layer block-by-block run
also gives the time per block and where it goes.

    python benchmarks/bench_blockwise.py                 # writes benchmarks/results/blockwise_memory.{json,md}
    python benchmarks/bench_blockwise.py --layers 2 --tiny   # the code path, small (tests)
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SHAPES = {"full": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                       vocab_size=8192),
          "tiny": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=256)}


PHASES = ("graph capture", "forwards + S", "group quantize + solve")
WARM = "-warm"  # a mode's suffix: measured in a process that quantized a tiny model first
MODES = ("model", "blocks", "blocks" + WARM)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PhasePeaks:
    """Peak resident memory (KiB) within each phase of ``quantize_`` and over the whole call,
    exactly: VmHWM is read and reset (``/proc/self/clear_refs``) at every phase boundary, and the
    whole call's peak is the largest of the pieces. The phases are ``quantize_``'s own steps,
    wrapped here for the measurement: the graph capture, the forwards that collect ``S`` (the whole
    model's at once, or one block's), one group's quantization and solve."""

    def __init__(self):
        import glowq_fx.quantize.api as Q
        from glowq_fx.calibration.blockwise import BlockwiseCalibration

        self.peaks: dict[str, int] = {}
        self.overall = 0
        self.depth = 0
        # the whole model's capture; block by block, the capture outside the blocks and each block's
        self.targets = [(Q, "discover_groups", PHASES[0]), (BlockwiseCalibration, "_find_outside", PHASES[0]),
                        (BlockwiseCalibration, "find_block_groups", PHASES[0]), (Q, "collect_statistics", PHASES[1]),
                        (BlockwiseCalibration, "block_statistics", PHASES[1]), (Q, "_quantize_group", PHASES[2])]
        for owner, attr, label in self.targets:
            setattr(owner, attr, self._wrap(getattr(owner, attr), label))

    def _boundary(self) -> None:
        self.overall = max(self.overall, _rss_kib("VmHWM"))
        Path("/proc/self/clear_refs").write_text("5")

    def _wrap(self, fn, label):
        def wrapped(*args, **kwargs):
            self.depth += 1
            if self.depth == 1:
                self._boundary()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    peak = _rss_kib("VmHWM")
                    self.peaks[label] = max(self.peaks.get(label, 0), peak)
                    self._boundary()
        return wrapped

    def finish(self) -> int:
        self._boundary()
        return self.overall


def run_one(layers: int, mode: str, shape: str, tokens: int, batches: int) -> None:
    """In a child process: build, reset the peak, quantize, print the result as JSON (MiB, s)."""
    import torch
    import transformers as T

    from glowq_fx import GlowQConfig, quantize_

    torch.manual_seed(0)
    config = T.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=tokens, **SHAPES[shape])
    model = T.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(0, config.vocab_size, (1, tokens), generator=gen)}
                   for _ in range(batches)]
    # the process's first torch.compile loads Dynamo (modules, caches): a cost paid once per process,
    # whatever the model (and paid again by compiling the quantized model); measured apart
    loaded = _rss_kib("VmRSS")
    torch.compile(lambda x: torch.relu(x) + 1, backend=lambda gm, _: gm)(torch.randn(4))
    dynamo_kib = _rss_kib("VmRSS") - loaded
    warm = mode.endswith(WARM)
    if warm:  # a process that quantized a model before: what stays of the first quantize_ is not counted
        import gc

        from glowq_fx._heap import trim_heap

        tiny = T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=2, **SHAPES["tiny"])).eval()
        quantize_(tiny, [{"input_ids": torch.randint(0, 256, (1, 16), generator=gen)}],
                  GlowQConfig(group_size=32, rank=4), progress=False)
        del tiny
        gc.collect()
        trim_heap()
    phases = PhasePeaks()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    report = quantize_(model, calibration, GlowQConfig(group_size=128, rank=32, calibration=mode.removesuffix(WARM)),
                       progress=False)
    elapsed = time.perf_counter() - t0
    peak = phases.finish()
    layer = model.model.layers[0]
    H, I = config.hidden_size, config.intermediate_size
    s_bytes = 4 * (3 * H * H + I * I)  # one block's S: q/k/v, o and gate/up read H, down reads I
    block_weight_bytes = 4 * (2 * H * H + 2 * H * config.num_key_value_heads * config.head_dim + 3 * H * I)
    print(json.dumps({"layers": layers, "mode": mode, "added_mib": (peak - before) / 1024, "time_s": elapsed,
               "block_s_mib": s_bytes / 2**20, "block_weights_mib": block_weight_bytes / 2**20,
               "activation_mib": (report.calibration or {}).get("activation_bytes", 0) / 2**20,
               "calibration": report.calibration, "quantized": type(layer.self_attn.q_proj).__name__,
               "whitening_s": sum(g.whitening_time_s for g in report.groups),
                      "phase_peak_mib": {k: (v - before) / 1024 for k, v in phases.peaks.items()},
                      "dynamo_first_compile_mib": dynamo_kib / 1024}))


def measure(layers: int, mode: str, shape: str, tokens: int, batches: int) -> dict:
    """One run in a fresh child process (its own peak): this script with ``--child``."""
    done = subprocess.run([sys.executable, __file__, "--child", str(layers), mode, shape, str(tokens), str(batches)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the run with {layers} layers ({mode}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    rows = results["rows"]
    depths = sorted({r["layers"] for r in rows})
    by = {(r["layers"], r["mode"]): r for r in rows}
    bound = {
        d: by[d, "blocks"]["block_s_mib"] + by[d, "blocks"]["block_weights_mib"] + by[d, "blocks"]["activation_mib"]
        for d in depths
    }
    lines = [f"# quantize_ memory beyond the model's weights, by depth ({results['shape']})", "",
             f"`{results['command']}`", "", f"{results['machine']}, torch {results['torch']}, {results['date']}. "
             f"{results['calibration']}. MiB of peak resident memory added by quantize_ (child process per run; median "
             f"of {len(rows[0]['added_mib_runs'])} runs, all runs in brackets).", "",
             "| layers | whole model | block by block | block by block, warm process | bound: one block's S + weights "
             "+ cached inputs | whole-model s | block s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    spread = lambda r: f"{r['added_mib']:.0f} (" + "/".join(f"{m:.0f}" for m in r["added_mib_runs"]) + ")"  # noqa: E731
    for d in depths:
        w, b, warm = by[d, "model"], by[d, "blocks"], by.get((d, "blocks" + WARM))
        lines.append(f"| {d} | {spread(w)} | {spread(b)} | {spread(warm) if warm else '-'} | {bound[d]:.0f} "
                     f"| {w['time_s']:.0f} | {b['time_s']:.0f} |")
    first = by[depths[0], "blocks"].get("dynamo_first_compile_mib", 0.0)
    lines += [""]
    for mode, what in (("blocks", "Block by block"), ("blocks" + WARM, "In a warm process")):
        if all((d, mode) in by for d in depths):
            peaks = [by[d, mode]["added_mib"] for d in depths]
            lines.append(f"{what}, {depths[0]} to {depths[-1]} layers: {min(peaks):.0f} to {max(peaks):.0f} MiB "
                         f"(largest / smallest {max(peaks) / min(peaks):.2f}).")
    lines += ["", f"Not counted: the process's first torch.compile, made before the measurement ({first:.0f} MiB: "
              "Dynamo's modules and caches, paid once per process). A warm process has also quantized a tiny Llama "
              "before the measurement: what the first quantize_ of a process leaves (modules Dynamo and transformers "
              "load on the first real capture, lazily built state) is not counted there.", ""]
    times = by[depths[-1], "blocks"]["calibration"]["times"]
    n = len(times["forward_s"])
    parts = {
        "block forwards (S included)": sum(times["forward_s"]),
        "of which S accumulation": sum(times["statistics_s"]),
        "next block's inputs": sum(times["next_inputs_s"]),
        "quantizer (RTN)": sum(times["quantize_s"]),
        "correction solve": sum(times["solve_s"]),
        "recording pass": times["record_s"],
    }
    lines += [
        f"Where the {depths[-1]}-layer block-by-block run's time goes (s, all {n} blocks; per block: /{n}):",
        "",
        "| part | s | per block |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v:.1f} | {v / n:.2f} |" for k, v in parts.items()]
    lines += [
        "",
        f"Of the solve, the factorization of S (Cholesky, float32): {by[depths[-1], 'blocks']['whitening_s']:.1f} s.",
    ]
    lines += ["", "Where the peak is reached (MiB above the start, the largest of each phase, in the median run):", "",
              "| layers | mode | " + " | ".join(PHASES) + " |", "|---:|---|" + "---:|" * len(PHASES)]
    for d in depths:
        for mode in (m for m in MODES if (d, m) in by):
            phase = by[d, mode].get("phase_peak_mib", {})
            lines.append(
                f"| {d} | {mode} | " + " | ".join(f"{phase[k]:.0f}" if k in phase else "-" for k in PHASES) + " |"
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    import torch

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        layers, mode, shape, tokens, batches = argv[1:]
        run_one(int(layers), mode, shape, int(tokens), int(batches))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, action="append", help="depths (repeatable; default 4 8 16 32)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="a tiny width: the code path, not a measurement")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs per depth and mode; the median is reported (the allocator's peak varies run to run)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "blockwise_memory")
    args = ap.parse_args(argv)
    shape = "tiny" if args.tiny else "full"
    rows = []
    for layers in args.layers or [4, 8, 16, 32]:
        for mode in MODES:
            runs = sorted((measure(layers, mode, shape, args.tokens, args.batches) for _ in range(args.repeats)),
                          key=lambda r: r["added_mib"])
            rows.append({**runs[len(runs) // 2], "added_mib_runs": [r["added_mib"] for r in runs]})
            print(
                f"{layers} layers, {mode}: +{rows[-1]['added_mib']:.0f} MiB (runs: "
                f"{', '.join(f'{m:.0f}' for m in rows[-1]['added_mib_runs'])}), {rows[-1]['time_s']:.0f} s",
                flush=True,
            )
    results = {"command": "python " + " ".join([sys.argv[0], *argv]),
               "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "shape": f"{shape}: {SHAPES[shape]}",
               "calibration": f"{args.batches} x {args.tokens} random tokens, GlowQ rank 32, W4 g128, float32",
               "rows": rows}
    write(results, args.out)
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
