"""Peak memory of quantize_ on a large-vocabulary model, with and without the logits.

Calibration reads every group's input and never the output head's logits, yet a plain forward
pass computes them: with a 262k vocabulary, a batch of 8 x 512 tokens makes 4.3 GB of float32
logits. glowq-fx now stops each calibration pass at the output head once every group has its
input (``calibration.collect.StopForward``) and captures the graph asking for the last
position's logits only (``capture.run.run_sparing_logits``). "Before" disables both (patched in
the child process), "after" is the library as it is.

A random Gemma-3-270M-shaped model (hidden 640, MLP 2048, 4 heads / 1 kv head of 256, vocab
262,144, tied embeddings, float32; fewer layers than the real 18 to keep the run short: the
logits do not depend on depth) is quantized with the CLI's default calibration (32 x 512 tokens
in batches of 8), block by block and whole-model. Each run is a child process; its peak resident
memory (VmHWM, reset once the model and batches are built) minus its resident memory then is the
memory quantize_ added.

    python benchmarks/bench_calibration_logits.py            # writes benchmarks/results/calibration_logits.{json,md}
    python benchmarks/bench_calibration_logits.py --tiny     # the code path, small (tests)
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

SHAPES = {"full": dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=256),
          "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=16)}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_one(shape: str, layers: int, calibration: str, spare: bool, samples: int, tokens: int) -> None:
    import torch
    import transformers as T

    from glowq_fx import GlowQConfig, quantize_

    if not spare:  # the library before the change: every pass computes the logits
        import glowq_fx.calibration.blockwise as blockwise
        import glowq_fx.calibration.collect as collect
        import glowq_fx.capture.groups as groups
        from glowq_fx.capture.run import run_batch

        collect.output_module = blockwise.output_module = lambda model: None
        groups.run_sparing_logits = run_batch
    torch.manual_seed(0)
    config = T.Gemma3TextConfig(num_hidden_layers=layers, max_position_embeddings=tokens, tie_word_embeddings=True,
                                **SHAPES[shape])
    model = T.Gemma3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (samples, tokens), generator=gen)
    batches = [{"input_ids": chunk} for chunk in ids.split(8)]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current resident size
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    report = quantize_(model, batches, GlowQConfig(group_size=64, rank=32, calibration=calibration), progress=False)
    print(
        json.dumps(
            {
                "calibration": calibration,
                "spare_logits": spare,
                "added_mib": (_rss_kib("VmHWM") - before) / 1024,
                "time_s": time.perf_counter() - t0,
                "groups": len(report.groups),
                "logits_mib_per_batch": 8 * tokens * config.vocab_size * 4 / 2**20,
            }
        )
    )


def measure(*args) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the run {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    import torch

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        shape, layers, calibration, spare, samples, tokens = argv[1:]
        run_one(shape, int(layers), calibration, spare == "True", int(samples), int(tokens))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--tiny", action="store_true", help="a tiny vocabulary: the code path, not a measurement")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "calibration_logits")
    args = ap.parse_args(argv)
    shape = "tiny" if args.tiny else "full"
    rows = []
    for calibration in ("blocks", "model"):
        for spare in (False, True):
            rows.append(measure(shape, args.layers, calibration, spare, args.samples, args.tokens))
            print(f"{calibration}, logits {'spared' if spare else 'computed'}: +{rows[-1]['added_mib']:.0f} MiB, "
                  f"{rows[-1]['time_s']:.0f} s", flush=True)
    results = {"command": "python " + " ".join([sys.argv[0], *argv]),
               "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "shape": {**SHAPES[shape], "layers": args.layers},
               "calibration_tokens": f"{args.samples} x {args.tokens} in batches of 8", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    by = {(r["calibration"], r["spare_logits"]): r for r in rows}
    lines = ["# quantize_ memory on a large-vocabulary model: logits computed vs spared", "", f"`{results['command']}`",
             "", f"{results['machine']}, torch {results['torch']}, {results['date']}. Random Gemma-3-shaped model "
             f"{results['shape']}, float32, GlowQ rank 32, W4 g64; calibration {results['calibration_tokens']} "
             f"tokens (one batch's float32 logits: {rows[0]['logits_mib_per_batch']:.0f} MiB). MiB of peak resident "
             "memory added by quantize_ (a child process per run).", "",
             "| calibration | logits computed (before) | logits spared (now) | now / before | s before | s now |",
             "|---|---:|---:|---:|---:|---:|"]
    for calibration in ("blocks", "model"):
        b, a = by[calibration, False], by[calibration, True]
        lines.append(f"| {calibration} | {b['added_mib']:.0f} | {a['added_mib']:.0f} | "
                     f"{a['added_mib'] / b['added_mib']:.2f} | {b['time_s']:.0f} | {a['time_s']:.0f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
