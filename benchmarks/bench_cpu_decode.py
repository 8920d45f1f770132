"""Greedy decoding on the CPU: our 4-bit models against float and llama.cpp, ratios from one run.

Rows (each on the same model, the same prompt, ``glowq_fx.evaluation.speed.time_decode``: static
KV cache, the model's forward called directly, greedy):

- ``llama.cpp``: ``llama-cpp-python`` on the model's GGUF (SmolLM2's packaged Q4_1 file), run by
  ``--llama-python`` (the benchmark environment ``make bench-cpu`` builds; not a dependency);
- ``float32 eager`` / ``float32 compiled`` / ``bfloat16 eager`` / ``bfloat16 compiled``: the
  float model, compiled with Inductor;
- ``W4 compiled`` (``method="none"``), ``independent compiled`` (QERA, one ``B_i`` per linear),
  ``GlowQ eager``, ``GlowQ compiled``, ``GlowQ-S compiled`` (``selective="auto"``): ours, W4
  ``--group-size``, rank ``--rank``, compiled with ``glowq_backend`` (PyTorch's CPU int4 kernel
  lowered by Inductor);
- ``torchao int4`` when torchao is importable (else its row says why not).

Columns: decode tokens/s at each ``--batches`` (prompt ``--prompt`` tokens, ``--new-tokens`` new),
time to first token of the ``--ttft-prompt``-token prompt at batch 1, resident memory after the
row (``VmRSS``), ratios to float32 eager and to llama.cpp. Writes ``cpu_decode.json`` and
``cpu_decode.md`` to ``--out`` with the machine, versions and the command.

    python benchmarks/bench_cpu_decode.py --llama-python .bench-venv/bin/python
    python benchmarks/bench_cpu_decode.py --tiny     # a tiny random Llama: checks the code path (CI)
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from glowq_fx import GlowQConfig, calibrate, glowq_backend, quantize_  # noqa: E402
from glowq_fx.evaluation.speed import compile_model, time_decode  # noqa: E402

LLAMA_CPP = r"""
import json, sys, time
from llama_cpp import Llama
path, prompt_len, new_tokens, ttft_prompt, threads = sys.argv[1], *map(int, sys.argv[2:6])
llm = Llama(model_path=path, n_ctx=max(prompt_len, ttft_prompt) + new_tokens + 8, n_threads=threads,
            n_batch=512, verbose=False)
def run(n_prompt):
    llm.reset()
    tokens = [(i * 7919) % 1000 + 100 for i in range(n_prompt)]
    t0 = time.perf_counter(); llm.eval(tokens); t1 = time.perf_counter()
    tok = llm.sample(temp=0.0)
    for _ in range(new_tokens - 1):
        llm.eval([tok]); tok = llm.sample(temp=0.0)
    return t1 - t0, (new_tokens - 1) / (time.perf_counter() - t1)
run(prompt_len)
rates = sorted(run(prompt_len)[1] for _ in range(3))
ttft = sorted(run(ttft_prompt)[0] for _ in range(3))
print(json.dumps({"decode": rates[1], "ttft": ttft[1]}))
"""


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def llama_cpp_row(args, gguf: Path) -> dict:
    row = {"row": "llama.cpp", "kind": "llama.cpp"}
    if not args.llama_python:
        return {**row, "skipped": "no --llama-python (make bench-cpu builds llama-cpp-python in .bench-venv)"}
    done = subprocess.run([args.llama_python, "-c", LLAMA_CPP, str(gguf), str(args.prompt), str(args.new_tokens),
                           str(args.ttft_prompt), str(torch.get_num_threads())], capture_output=True, text=True)
    if done.returncode:
        return {**row, "skipped": f"llama-cpp-python failed: {done.stderr.strip().splitlines()[-1:]}"}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {**row, "decode_tok_s": {"1": out["decode"]}, "ttft_s": out["ttft"]}


def measure(name: str, model, step, args, kind: str) -> dict:
    rates = {}
    top = min(1000, model.config.vocab_size)
    for b in args.batches:
        prompt = torch.randint(0, top, (b, args.prompt), generator=torch.Generator().manual_seed(b))
        rates[str(b)] = time_decode(model, prompt, args.new_tokens, step=step, repeats=args.repeats).decode_tokens_per_s
    ttft_prompt = torch.randint(0, top, (1, args.ttft_prompt), generator=torch.Generator().manual_seed(0))
    ttft = time_decode(model, ttft_prompt, 2, step=step, repeats=args.repeats).ttft_s
    row = {"row": name, "kind": kind, "decode_tok_s": rates, "ttft_s": ttft, "rss_mib": rss_mib()}
    print(f"{name:28s} " + " ".join(f"b{b} {r:7.2f} tok/s" for b, r in rates.items()) + f"  ttft {ttft:.3f} s",
          flush=True)
    return row


def load(args):
    if args.tiny:
        import transformers as T

        from tests_helpers import tiny_llama_config  # the test suite's tiny config
        torch.manual_seed(0)
        return T.LlamaForCausalLM(tiny_llama_config()).eval(), None
    from glowq_fx.data.models import load_model, smollm2_gguf

    model, _ = load_model(args.model)
    return model, smollm2_gguf() if args.model == "smollm2" else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before the timed decoding")
    p.add_argument("--ttft-prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--rows", default="all", help="comma-separated row names, or all")
    p.add_argument("--llama-python", default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        args.batches, args.prompt, args.ttft_prompt, args.new_tokens, args.repeats = [1], 4, 24, 4, 1
        args.rank, args.group_size, args.calib_batches = 8, 32, 2
    model, gguf = load(args)
    want = None if args.rows == "all" else set(args.rows.split(","))
    rows = []
    if gguf is not None and (want is None or "llama.cpp" in want):
        rows.append(llama_cpp_row(args, gguf))
    for dtype in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(model).to(dtype)
        for compiled in (False, True):
            name = f"{str(dtype).split('.')[-1]} {'compiled' if compiled else 'eager'}"
            if want is None or name in want:
                rows.append(measure(name, m, compile_model(m, "inductor") if compiled else None, args, "float"))
        del m
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, vocab, (1, 256 if not args.tiny else 16), generator=g)}
               for _ in range(args.calib_batches)]
    calibrated = calibrate(model, batches, GlowQConfig(group_size=args.group_size))
    int8 = dict(output_head_bits=8)
    cpp_wrapper = {"cpp_wrapper": True}  # Inductor's C++ wrapper: no Python between the kernels of a step
    # (row, GlowQConfig options, glowq_backend options: None runs eager)
    ours = [("W4 compiled", dict(method="none"), {}), ("independent compiled", dict(method="qera"), {}),
            ("GlowQ eager", dict(method="glowq"), None), ("GlowQ compiled", dict(method="glowq"), {}),
            ("GlowQ-S compiled", dict(method="glowq", selective="auto"), {}),
            ("W4 compiled int8-head", dict(method="none", **int8), {}),
            ("GlowQ compiled int8-head", dict(method="glowq", **int8), {}),
            ("GlowQ compiled int8-head cpp_wrapper", dict(method="glowq", **int8), cpp_wrapper)]
    for name, options, backend_options in ours:
        if want is not None and name not in want:
            continue
        q = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = quantize_(q, calibrated if "selective" not in options else batches,
                           GlowQConfig(group_size=args.group_size, rank=args.rank, **options), progress=False)
        step = None if backend_options is None else compile_model(q, glowq_backend, options=backend_options)
        row = measure(name, q, step, args, "ours")
        row["quantize_s"] = time.perf_counter() - t0
        row["kernels"] = {k: sum(v == k for v in report.kernels.values()) for k in set(report.kernels.values())}
        rows.append(row)
        del q
    try:
        import torchao  # noqa: F401
        rows.append({"row": "torchao int4", "kind": "peer", "skipped": "torchao row not written yet"})
    except ImportError:
        rows.append({"row": "torchao int4", "kind": "peer", "skipped": "torchao is not installed here"})
    meta = {"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "model": "tiny" if args.tiny else args.model,
            "rows": rows}
    add_ratios(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "cpu_decode_tiny" if args.tiny else "cpu_decode"
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=1))
    (out / f"{stem}.md").write_text(markdown(meta))
    print(markdown(meta))
    return 0


def add_ratios(rows: list[dict]) -> None:
    base = {r["row"]: r for r in rows if "decode_tok_s" in r}
    for r in rows:
        for ref in ("float32 eager", "llama.cpp"):
            if "decode_tok_s" in r and ref in base and "1" in base[ref]["decode_tok_s"] and "1" in r["decode_tok_s"]:
                r[f"vs {ref}"] = r["decode_tok_s"]["1"] / base[ref]["decode_tok_s"]["1"]


def markdown(meta: dict) -> str:
    batches = sorted({b for r in meta["rows"] for b in r.get("decode_tok_s", {})}, key=int)
    head = ["row"] + [f"decode tok/s b{b}" for b in batches] + ["TTFT s", "RSS MiB", "vs float32 eager", "vs llama.cpp"]
    lines = [f"CPU decode, {meta['model']}: {meta['machine']} ({meta['cpu_capability']}, {meta['threads']} threads), "
             f"torch {meta['torch']}; `{meta['command']}`", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in meta["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['row']} | " + " | ".join(["-"] * (len(head) - 2)) + f" | {r['skipped']} |")
            continue
        cells = [f"{r['decode_tok_s'][b]:.2f}" if b in r["decode_tok_s"] else "-" for b in batches]
        cells += [f"{r['ttft_s']:.3f}", f"{r['rss_mib']:.0f}" if "rss_mib" in r else "-",
                  f"{r['vs float32 eager']:.2f}x" if "vs float32 eager" in r else "-",
                  f"{r['vs llama.cpp']:.2f}x" if "vs llama.cpp" in r else "-"]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
