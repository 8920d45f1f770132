"""A model whose float weights are larger than 1.5x the memory its process may use, quantized from
disk to a sharded checkpoint that then loads and evaluates, all under that limit.

A random Llama-shaped float32 model (hidden 1536, MLP 4096, vocab 8192: about 100 MB per layer) is
saved as safetensors shards; a child process, in a memory cgroup (v1 ``memory.limit_in_bytes``, no
swap on these machines), runs ``quantize_checkpoint`` (one block in memory at a time), then
``load_quantized`` and a perplexity over random tokens. The cgroup's peak usage
(``memory.max_usage_in_bytes``, page cache of the read shards included) is reported. Needs root
and a writable memory cgroup; says so and stops otherwise.

    python benchmarks/bench_from_disk.py --layers 48 --limit-gb 3   # writes benchmarks/results/from_disk.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

CGROUP = Path("/sys/fs/cgroup/memory")
SHAPE = dict(hidden_size=1536, intermediate_size=4096, num_attention_heads=12, num_key_value_heads=4,
             vocab_size=8192, tie_word_embeddings=False)

CHILD = r"""
import json, resource, sys, time, torch
from glowq_fx import GlowQConfig, load_quantized
from glowq_fx.evaluation.perplexity import perplexity
from glowq_fx.quantize.from_disk import quantize_checkpoint
float_dir, out_dir, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
gen = torch.Generator().manual_seed(1)
batches = [{"input_ids": torch.randint(0, 8192, (1, tokens), generator=gen)} for _ in range(4)]
t0 = time.perf_counter()
report = quantize_checkpoint(float_dir, out_dir, batches, GlowQConfig(group_size=128, rank=32), progress=False,
                             max_shard_size="200MB")
quantize_s = time.perf_counter() - t0
model = load_quantized(out_dir)
ppl = perplexity(model, torch.randint(0, 8192, (2048,), generator=gen), 512, progress=False).perplexity
print(json.dumps({"child_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "quantize_s": quantize_s, "perplexity_random_tokens": ppl, "groups": len(report.groups),
                  "calibration": {k: v for k, v in report.calibration.items() if k != "times"}}))
"""


def _cgroup(limit: int) -> Path:
    if os.geteuid() != 0 or not CGROUP.is_dir():
        raise SystemExit("needs root and a v1 memory cgroup at /sys/fs/cgroup/memory")
    path = CGROUP / f"glowq-bench-{os.getpid()}"
    path.mkdir()
    (path / "memory.limit_in_bytes").write_text(str(limit))
    return path


def main(argv: list[str] | None = None) -> int:
    import torch
    import transformers as T

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--limit-gb", type=float, default=3.0)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "from_disk")
    args = ap.parse_args(argv)
    limit = int(args.limit_gb * 2**30)
    work = Path(tempfile.mkdtemp(prefix="glowq-from-disk-"))
    torch.manual_seed(0)
    config = T.LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=2048, **SHAPE)
    model = T.LlamaForCausalLM(config)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(work / "float", max_shard_size="500MB")
    del model
    group = _cgroup(limit)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", CHILD, str(work / "float"), str(work / "q"), str(args.tokens)],
                              env=env, capture_output=True, text=True,
                              preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        failcnt = int((group / "memory.failcnt").read_text())
    finally:
        group.rmdir()
    if done.returncode != 0:
        raise SystemExit(
            f"the child failed (exit {done.returncode}, peak {peak / 2**30:.2f} GiB):\n{done.stderr[-3000:]}"
        )
    child = json.loads(done.stdout.strip().splitlines()[-1])
    out_bytes = sum(p.stat().st_size for p in (work / "q").glob("*.safetensors"))
    results = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
               "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "shape": {**SHAPE, "layers": args.layers},
               "float_weight_bytes": weight_bytes, "limit_bytes": limit, "peak_bytes": peak, "limit_hits": failcnt,
               "quantized_bytes": out_bytes, **child}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [
        "# Quantizing from disk a model larger than the process's memory",
        "",
        f"`{results['command']}`",
        "",
        f"{results['machine']}, torch {results['torch']}, {results['date']}. Random Llama-shaped float32 model "
        f"({args.layers} layers, {SHAPE}), GlowQ rank 32, W4 g128, calibration 4 x {args.tokens} random tokens.",
        "",
        "| | GiB |",
        "|---|---:|",
        f"| float weights on disk | {weight_bytes / 2**30:.2f} |",
        f"| memory limit of the child process (cgroup) | {limit / 2**30:.2f} |",
        f"| weights / limit | {weight_bytes / limit:.2f}x |",
        f"| peak usage of the cgroup (quantize, load, evaluate; page cache included) | {peak / 2**30:.2f} |",
        f"| peak resident memory of the child (its own pages, ru_maxrss) | "
        f"{child['child_peak_rss_bytes'] / 2**30:.2f} |",
        f"| quantized checkpoint | {out_bytes / 2**30:.2f} |",
        "",
        f"Quantized in {child['quantize_s']:.0f} s ({child['groups']} groups); the loaded checkpoint's perplexity "
        f"on random tokens: {child['perplexity_random_tokens']:.1f} (finite: it runs); the limit was reached "
        f"{failcnt} times (reclaimed page cache, no failure).",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
