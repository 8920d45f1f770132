"""A model whose float weights are larger than 1.5x the memory its process may use, quantized from
disk to a sharded checkpoint that then loads and evaluates, all under that limit.

A random Llama-shaped float32 model (hidden 1536, MLP 4096, vocab 8192: about 100 MB per layer),
or with ``--arch qwen3_moe`` a random Qwen3-MoE-shaped one (hidden 512, 16 experts of 384, 4 per
token: about 40 MB per layer, its experts stored per expert as transformers writes them), is saved
as safetensors shards; a child process, in a memory cgroup (v1 ``memory.limit_in_bytes``, no swap
on these machines), runs ``quantize_checkpoint`` (one block in memory at a time), then
``load_quantized`` and a perplexity over random tokens. The cgroup's peak usage
(``memory.max_usage_in_bytes``, page cache of the read shards included) is reported. Needs root
and a writable memory cgroup; says so and stops otherwise.

``--depths 8,16,32`` instead quantizes the model at each depth without a limit and reports the
child's peak resident memory per depth, while quantizing (flat in depth if one block is in memory
at a time) and after loading the quantized model whole and evaluating it.

    python benchmarks/bench_from_disk.py --layers 48 --limit-gb 3   # writes benchmarks/results/from_disk.{json,md}
    python benchmarks/bench_from_disk.py --arch qwen3_moe --layers 48 --limit-gb 1.2 \\
        --out benchmarks/results/from_disk_moe
    python benchmarks/bench_from_disk.py --arch qwen3_moe --depths 8,16,32 --out benchmarks/results/from_disk_moe_depth
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
SHAPES = {
    "llama": dict(hidden_size=1536, intermediate_size=4096, num_attention_heads=12, num_key_value_heads=4,
                  vocab_size=8192, tie_word_embeddings=False),
    "qwen3_moe": dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=384, num_experts=16,
                      num_experts_per_tok=4, decoder_sparse_step=1, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, vocab_size=8192, tie_word_embeddings=False),
}

CHILD = r"""
import json, resource, sys, time, torch
from glowq_fx import GlowQConfig, load_quantized
from glowq_fx.evaluation.perplexity import perplexity
from glowq_fx.quantize.from_disk import quantize_checkpoint
float_dir, out_dir, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])


def status_bytes(field):
    # VmHWM: this process's own high-water mark (ru_maxrss would carry the parent's from before exec)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss():
    return status_bytes("VmHWM")

gen = torch.Generator().manual_seed(1)
batches = [{"input_ids": torch.randint(0, 8192, (1, tokens), generator=gen)} for _ in range(4)]
start_rss = status_bytes("VmRSS")  # the interpreter, torch and transformers before any weight is read
t0 = time.perf_counter()
report = quantize_checkpoint(float_dir, out_dir, batches, GlowQConfig(group_size=128, rank=32), progress=False,
                             max_shard_size="200MB")
quantize_s = time.perf_counter() - t0
quantize_peak = peak_rss()  # before the quantized model is loaded and evaluated whole
model = load_quantized(out_dir)
ppl = perplexity(model, torch.randint(0, 8192, (2048,), generator=gen), 512, progress=False).perplexity
experts = sum(".experts." in g.name for g in report.groups)
print(json.dumps({"expert_groups": experts,
                  "child_peak_rss_bytes": peak_rss(), "quantize_peak_rss_bytes": quantize_peak,
                  "start_rss_bytes": start_rss,
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


def _float_dir(work: Path, arch: str, layers: int) -> tuple[Path, int]:
    """A random float32 model of ``arch`` and depth ``layers`` saved in ``work``: (its directory, weight bytes)."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    cls = {"llama": T.LlamaConfig, "qwen3_moe": T.Qwen3MoeConfig}[arch]
    model = T.AutoModelForCausalLM.from_config(cls(num_hidden_layers=layers, max_position_embeddings=2048,
                                                   **SHAPES[arch]))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    path = work / f"float-{layers}"
    model.save_pretrained(path, max_shard_size="500MB")
    return path, weight_bytes


def _child(float_dir: Path, out_dir: Path, tokens: int, group: Path | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    enter = None if group is None else (lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    return subprocess.run([sys.executable, "-c", CHILD, str(float_dir), str(out_dir), str(tokens)], env=env,
                          capture_output=True, text=True, preexec_fn=enter)


def _failed(done, peak: int | None = None) -> SystemExit:
    at = "" if peak is None else f", peak {peak / 2**30:.2f} GiB"
    return SystemExit(f"the child failed (exit {done.returncode}{at}):\n{done.stderr[-3000:]}")


def _meta(args, argv) -> dict:
    import torch

    return {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "arch": args.arch,
            "shape": SHAPES[args.arch]}


def _depths(args, argv) -> int:
    """The child's peak resident memory at each depth, no limit: flat if one block is in memory at a time."""
    work = Path(tempfile.mkdtemp(prefix="glowq-from-disk-"))
    rows = []
    for layers in args.depths:
        float_dir, weight_bytes = _float_dir(work, args.arch, layers)
        done = _child(float_dir, work / f"q-{layers}", args.tokens)
        if done.returncode != 0:
            raise _failed(done)
        child = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"layers": layers, "float_weight_bytes": weight_bytes, **child})
        print(f"{layers} layers: float {weight_bytes / 2**30:.2f} GiB, quantizing peak RSS "
              f"{child['quantize_peak_rss_bytes'] / 2**30:.2f} GiB, with load and evaluation "
              f"{child['child_peak_rss_bytes'] / 2**30:.2f} GiB, {child['quantize_s']:.0f} s", flush=True)
    # flat in depth is judged on the quantizing phase: load_quantized then holds the whole quantized model
    peaks = [r["quantize_peak_rss_bytes"] for r in rows]
    over_start = [r["quantize_peak_rss_bytes"] - r["start_rss_bytes"] for r in rows]
    results = {**_meta(args, argv), "rows": rows, "peak_spread": max(peaks) / min(peaks),
               "peak_over_start_spread": max(over_start) / min(over_start)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    gib = 2**30
    lines = ["# Quantizing from disk: peak memory against depth", "", f"`{results['command']}`", "",
             f"{results['machine']}, torch {results['torch']}, {results['date']}. Random {args.arch} float32 models "
             f"({SHAPES[args.arch]}), GlowQ rank 32, W4 g128, calibration 4 x {args.tokens} random tokens, shards "
             "of 200 MB. The child's resident memory: before quantizing (interpreter, torch, transformers), its "
             "peak (VmHWM) when `quantize_checkpoint` returns, and its peak after it also loads the quantized "
             "model whole and evaluates it.", "",
             "| layers | float weights GiB | RSS at start GiB | peak RSS quantizing GiB | peak over start GiB | "
             "peak RSS with load + evaluation GiB | quantize s | expert groups |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layers']} | {r['float_weight_bytes'] / gib:.2f} | {r['start_rss_bytes'] / gib:.2f} | "
              f"{r['quantize_peak_rss_bytes'] / gib:.2f} | "
              f"{(r['quantize_peak_rss_bytes'] - r['start_rss_bytes']) / gib:.2f} | "
              f"{r['child_peak_rss_bytes'] / gib:.2f} | {r['quantize_s']:.0f} | {r['expert_groups']} |" for r in rows]
    lines += ["", f"Quantizing: largest peak / smallest {results['peak_spread']:.2f}x (over the start: "
              f"{results['peak_over_start_spread']:.2f}x), while the weights grew "
              f"{rows[-1]['float_weight_bytes'] / rows[0]['float_weight_bytes']:.1f}x."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(SHAPES), default="llama")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--limit-gb", type=float, default=3.0)
    ap.add_argument("--depths", default=None, help="comma-separated depths: peak memory per depth, no limit")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "from_disk")
    args = ap.parse_args(argv)
    if args.depths is not None:
        args.depths = [int(d) for d in args.depths.split(",") if d]
        return _depths(args, argv)
    limit = int(args.limit_gb * 2**30)
    work = Path(tempfile.mkdtemp(prefix="glowq-from-disk-"))
    float_dir, weight_bytes = _float_dir(work, args.arch, args.layers)
    group = _cgroup(limit)
    try:
        done = _child(float_dir, work / "q", args.tokens, group)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        failcnt = int((group / "memory.failcnt").read_text())
    finally:
        group.rmdir()
    if done.returncode != 0:
        raise _failed(done, peak)
    child = json.loads(done.stdout.strip().splitlines()[-1])
    out_bytes = sum(p.stat().st_size for p in (work / "q").glob("*.safetensors"))
    results = {**_meta(args, argv), "layers": args.layers, "float_weight_bytes": weight_bytes, "limit_bytes": limit,
               "peak_bytes": peak, "limit_hits": failcnt, "quantized_bytes": out_bytes, **child}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [
        "# Quantizing from disk a model larger than the process's memory",
        "",
        f"`{results['command']}`",
        "",
        f"{results['machine']}, torch {results['torch']}, {results['date']}. Random {args.arch}-shaped float32 model "
        f"({args.layers} layers, {SHAPES[args.arch]}), GlowQ rank 32, W4 g128, calibration 4 x {args.tokens} random "
        "tokens.",
        "",
        "| | GiB |",
        "|---|---:|",
        f"| float weights on disk | {weight_bytes / 2**30:.2f} |",
        f"| memory limit of the child process (cgroup) | {limit / 2**30:.2f} |",
        f"| weights / limit | {weight_bytes / limit:.2f}x |",
        f"| peak usage of the cgroup (quantize, load, evaluate; page cache included) | {peak / 2**30:.2f} |",
        f"| peak resident memory of the child while quantizing (its own pages, VmHWM) | "
        f"{child['quantize_peak_rss_bytes'] / 2**30:.2f} |",
        f"| peak resident memory of the child, with load and evaluation | "
        f"{child['child_peak_rss_bytes'] / 2**30:.2f} |",
        f"| quantized checkpoint | {out_bytes / 2**30:.2f} |",
        "",
        f"Quantized in {child['quantize_s']:.0f} s ({child['groups']} groups, {child['expert_groups']} of them "
        f"experts); the loaded checkpoint's perplexity on random tokens: {child['perplexity_random_tokens']:.1f} "
        f"(finite: it runs); the limit was reached {failcnt} times (reclaimed page cache, no failure).",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
