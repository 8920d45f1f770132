"""Greedy decoding on the CPU: our 4-bit models against float, torchao and llama.cpp, ratios from one run.

Rows (each on the same model, the same prompts, ``glowq_fx.evaluation.speed.time_decode``: static
KV cache, the model's forward called directly, greedy), each measured in its own process so that
its peak resident memory is its own:

- ``llama.cpp``: ``llama-cpp-python`` on the model's GGUF (SmolLM2's packaged Q4_1 file: our float
  SmolLM2 is that file dequantized, so llama.cpp runs the float model's own 4-bit weights), run by
  ``--llama-python`` (the benchmark environment ``make bench-cpu`` builds; not a dependency);
- ``float32 eager`` / ``float32 compiled`` / ``bfloat16 eager`` / ``bfloat16 compiled``: the
  float model, compiled with Inductor;
- ``torchao int4``: torchao's CPU int4 weight-only tensor (``PrototypeInt4WeightOnlyConfig``, the
  same aten kernel as ours) on the bfloat16 model, compiled with Inductor, when torchao imports;
- ``W4 compiled`` (``method="none"``), ``independent compiled`` (QERA, one ``B_i`` per linear),
  ``GlowQ eager``, ``GlowQ compiled``, ``GlowQ-S compiled`` (``selective="auto"``), ``GlowQ compiled
  float head`` (``output_head_bits=None``), ``GlowQ compiled PyTorch kernels`` (PyTorch's int4 and
  int8 kernels instead of our GEMVs): ours, W4 ``--group-size``, rank ``--rank``, the default int8
  head, compiled with ``glowq_backend`` (our CPU GEMVs called from Inductor's code, one call per
  group; ``compile_model`` leaves out Dynamo's guards on the modules, for every compiled row).
  Each set of options is quantized once, in its
  own process (its time is the row's ``quantize_s``), saved with ``save_quantized``, and each row
  loads it as a user does (``load_quantized``: the CPU layout is made there), so its peak memory is
  the loaded model's.

Columns: decode tokens/s at each ``--batches`` (prompt ``--prompt`` tokens, ``--new-tokens`` new),
time to first token of the ``--ttft-prompt``-token prompt at batch 1, peak resident memory of the
row's process (``VmHWM``), the bytes of the model's tensors (the GGUF file for llama.cpp),
perplexity on the first ``--ppl-tokens`` tokens of the demo text (Wikipedia, windows of 512;
eager forward of the row's model: the same kernels as its compiled step), ratios to float32 eager
and to llama.cpp. Models: ``smollm2`` (calibrated on the news text), ``llama8b-layers`` (Llama-3-8B's
shapes, ``--layers`` random layers: speed and bytes only, no text). Writes ``cpu_decode[_MODEL].json``,
``.md`` and ``.png`` (decode tokens/s at batch 1) to ``--out`` with the machine, versions and command,
and one int4 linear at one row against the machine's read bandwidth (``one_linear_bandwidth``).

    python benchmarks/bench_cpu_decode.py --llama-python .bench-venv/bin/python
    python benchmarks/bench_cpu_decode.py --model llama8b-layers --layers 2 --batches 1
    python benchmarks/bench_cpu_decode.py --tiny     # a tiny random Llama: checks the code path (CI)
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from glowq_fx import GlowQConfig, glowq_backend, load_quantized, quantize_, save_quantized  # noqa: E402
from glowq_fx.evaluation.speed import compile_model, time_decode  # noqa: E402
from glowq_fx.modules.kernels import use_cpu_kernels  # noqa: E402

FLOAT_ROWS = {"float32 eager": (torch.float32, False), "float32 compiled": (torch.float32, True),
              "bfloat16 eager": (torch.bfloat16, False), "bfloat16 compiled": (torch.bfloat16, True)}
# row -> (GlowQConfig options, glowq_backend options: None runs eager, CPU kernels: use_cpu_kernels')
OURS = {"W4 compiled": (dict(method="none"), {}, "auto"),
        "independent compiled": (dict(method="qera"), {}, "auto"),
        "GlowQ eager": (dict(method="glowq"), None, "auto"),
        "GlowQ compiled": (dict(method="glowq"), {}, "auto"),
        "GlowQ-S compiled": (dict(method="glowq", selective="auto"), {}, "auto"),
        "GlowQ compiled float head": (dict(method="glowq", output_head_bits=None), {}, "auto"),
        "GlowQ compiled PyTorch kernels": (dict(method="glowq"), {}, "aten")}
# Not a row: Inductor's C++ wrapper (cpp_wrapper, its wrapper built apart at -O1) compiled SmolLM2's
# GlowQ step in ~6 min and decoded no faster (41.6 against 42.6 tok/s, two probes on 2026-12-04).
ROWS = ["llama.cpp", *FLOAT_ROWS, "torchao int4", *OURS]
# Llama-3-8B's shapes (its config.json), a few layers of them
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
PPL_WINDOW = 512

LLAMA_CPP = r"""
import json, math, sys, time
import numpy as np
from llama_cpp import Llama
path, prompt_len, new_tokens, ttft_prompt, threads, windows_file = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
windows = json.load(open(windows_file)) if windows_file != "-" else []
llm = Llama(model_path=path, n_ctx=max(prompt_len, ttft_prompt, *map(len, windows or [[]])) + new_tokens + 8,
            n_threads=threads, n_batch=512, logits_all=bool(windows), verbose=False)
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
nll, count = 0.0, 0
for w in windows:
    llm.reset(); llm.eval(w)
    logits = np.asarray(llm.scores[:len(w) - 1], dtype=np.float64)
    top = logits.max(1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    nll += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum()); count += len(w) - 1
print(json.dumps({"decode": rates[1], "ttft": ttft[1], "ppl": math.exp(nll / count) if count else None}))
"""


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_linear_bandwidth(shape: tuple[int, int], group_size: int, repeats: int = 50) -> dict:
    """One 4-bit linear at one row, as the decode step runs it (each CPU kernel that loads here:
    our GEMV on float32 activations, PyTorch's int4 kernel on bfloat16 ones), against the
    machine's read bandwidth measured the same way (a sum over a float32 tensor of 512 MB): the
    bytes each reads per second (codes + scales and zeros) and that as a fraction of the bandwidth."""
    from glowq_fx.kernels import cpu_int4
    from glowq_fx.kernels.layout import pack
    from glowq_fx.quant.rtn import quantize_rtn

    def best_of(f) -> float:
        f()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    big = torch.ones(128 * 2**20)  # 512 MB: far past the caches
    read_Bps = big.numel() * 4 / best_of(big.sum)
    del big
    N, K = shape
    result = {"read_GBps": read_Bps / 1e9, "shape": [N, K], "group_size": group_size, "kernels": {}}
    g = torch.Generator().manual_seed(0)
    packed = pack(quantize_rtn(torch.randn(N, K, generator=g), group_size))
    x = torch.randn(1, K, generator=g)
    for kernel in ("glowq", "aten"):
        try:
            reason = cpu_int4.unsupported_reason(N, group_size, kernel)
        except RuntimeError as e:  # ours cannot load here
            reason = str(e)
        if reason is not None:
            result["kernels"][kernel] = {"skipped": reason}
            continue
        weight, params = cpu_int4.convert(packed.qweight, packed.scales, packed.zeros, kernel)
        xk = x if kernel == "glowq" else x.to(cpu_int4.KERNEL_DTYPE)
        seconds = best_of(lambda: cpu_int4.int4_matmul(xk, weight, params, group_size))
        nbytes = weight.numel() * weight.element_size() + params.numel() * params.element_size()
        result["kernels"][kernel] = {"ms": seconds * 1e3, "GBps": nbytes / seconds / 1e9,
                                     "fraction_of_read": nbytes / seconds / read_Bps}
    return result


def tensor_bytes(model: torch.nn.Module) -> int:
    """The bytes of the model's saved tensors: what ``torch.save`` of its state dict writes
    (each storage once, tied tables once; tensor subclasses with their inner tensors)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def load(args):
    """``(model, tokenizer or None, GGUF path or None)``."""
    import transformers as T

    if args.tiny:
        from tests_helpers import tiny_llama_config  # the test suite's tiny config
        torch.manual_seed(0)
        return T.LlamaForCausalLM(tiny_llama_config()).eval(), None, None
    if args.model == "llama8b-layers":
        torch.manual_seed(0)
        config = T.LlamaConfig(**LLAMA_8B, num_hidden_layers=args.layers)
        with torch.device("meta"):
            model = T.LlamaForCausalLM(config)
        model = model.to_empty(device="cpu")
        for p in model.parameters():  # the scale of trained weights; random, so no text is scored
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
        model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers, not left empty
        return model.eval(), None, None
    from glowq_fx.data.models import load_model, smollm2_gguf

    model, tokenizer = load_model(args.model)
    return model, tokenizer, smollm2_gguf() if args.model == "smollm2" else None


def texts(args, model, tokenizer):
    """``(calibration batches, perplexity token stream or None, bos)``: the news text and the
    Wikipedia text for a model with a tokenizer, random tokens (no perplexity) without one."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        length = 16 if args.tiny else 256
        batches = [{"input_ids": torch.randint(0, model.config.vocab_size, (1, length), generator=g)}
                   for _ in range(args.calib_batches)]
        # the tiny model scores random tokens (its perplexity means nothing: the code path is checked)
        stream = torch.randint(0, model.config.vocab_size, (PPL_WINDOW + 88,), generator=g) if args.tiny else None
        return batches, stream, None
    from glowq_fx.data.batches import bos_token, text_calibration_batches, tokenize
    from glowq_fx.data.corpus import load_text

    batches = text_calibration_batches(tokenizer, "news", args.calib_batches, 256, batch_size=1)
    return batches, tokenize(tokenizer, load_text("wikipedia")), bos_token(tokenizer)


def measure(model, step, args) -> dict:
    rates = {}
    top = min(1000, model.config.vocab_size)
    for b in args.batches:
        prompt = torch.randint(0, top, (b, args.prompt), generator=torch.Generator().manual_seed(b))
        rates[str(b)] = time_decode(model, prompt, args.new_tokens, step=step, repeats=args.repeats).decode_tokens_per_s
    ttft_prompt = torch.randint(0, top, (1, args.ttft_prompt), generator=torch.Generator().manual_seed(0))
    ttft = time_decode(model, ttft_prompt, 2, step=step, repeats=args.repeats).ttft_s
    return {"decode_tok_s": rates, "ttft_s": ttft}


def build_row(name: str, model, batches, args):
    """``(model, step or None for eager, extra fields)`` of float or peer row ``name``."""
    if name in FLOAT_ROWS:
        dtype, compiled = FLOAT_ROWS[name]
        m = model.to(dtype)
        return m, compile_model(m, "inductor") if compiled else None, {}
    if name == "torchao int4":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_ as torchao_quantize_

        m = model.to(torch.bfloat16)
        torchao_quantize_(m, PrototypeInt4WeightOnlyConfig(group_size=args.group_size, set_inductor_config=False))
        return m, compile_model(m, "inductor"), {}
    raise ValueError(f"row {name!r} is one of ours: it is loaded from its quantized checkpoint (load_ours)")


def quantize_to(name: str, args, directory: Path) -> None:
    """Quantize the model as row ``name`` asks, save it to ``directory`` and its quantization time
    and kernels beside it (``directory.json``): the rows that share these options load it."""
    model, tokenizer, _ = load(args)
    batches, _, _ = texts(args, model, tokenizer)
    t0 = time.perf_counter()
    report = quantize_(model, batches, GlowQConfig(group_size=args.group_size, rank=args.rank, **OURS[name][0]),
                       progress=False)
    seconds = time.perf_counter() - t0
    save_quantized(model, directory, report=report, tokenizer=tokenizer)
    kernels = dict(Counter(report.kernels.values()))
    directory.with_suffix(".json").write_text(json.dumps({"quantize_s": seconds, "kernels": kernels}))


def load_ours(name: str, directory: Path):
    """``(model, step or None for eager, tokenizer or None, extra fields)`` of our row ``name``,
    from the checkpoint ``quantize_to`` wrote (loaded as a user loads one: the CPU layout is made here)."""
    model = load_quantized(directory)
    if OURS[name][2] != "auto":
        use_cpu_kernels(model, kernel=OURS[name][2])
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(directory)
    backend_options = OURS[name][1]
    step = None if backend_options is None else compile_model(model, glowq_backend, options=backend_options)
    return model, step, tokenizer, json.loads(directory.with_suffix(".json").read_text())


def run_row(name: str, args) -> dict:
    """One row, measured in this process."""
    from glowq_fx.evaluation.perplexity import perplexity

    if name in OURS:
        model, step, tokenizer, extra = load_ours(name, Path(args.checkpoint))
        _, tokens, bos = texts(args, model, tokenizer)
    else:
        model, tokenizer, _ = load(args)
        batches, tokens, bos = texts(args, model, tokenizer)
        if name == "torchao int4":
            try:
                import torchao  # noqa: F401
            except ImportError as e:
                return {"row": name, "kind": "peer", "skipped": f"torchao does not import here ({e})"}
        model, step, extra = build_row(name, model, batches, args)
    row = {"row": name, "kind": "ours" if name in OURS else "peer" if name == "torchao int4" else "float",
           **measure(model, step, args), **extra, "bytes": tensor_bytes(model)}
    if tokens is not None:
        row["ppl"] = perplexity(model, tokens, PPL_WINDOW, max_tokens=args.ppl_tokens, progress=False,
                                 bos=bos).perplexity
    row["peak_rss_mib"] = peak_rss_mib()
    return row


def own_gguf(model, where: Path, args) -> Path | None:
    """A model without a GGUF of its own (random layers) as one, quantized to Q4_1 by llama.cpp
    itself (``llama_gguf``); None, said, where that fails."""
    from llama_gguf import llama_q4_1_gguf

    try:
        return llama_q4_1_gguf(model, where / f"{args.model}.Q4_1.gguf", args.llama_python, torch.get_num_threads())
    except (RuntimeError, ValueError, ImportError) as err:
        print(f"llama.cpp: no GGUF of {args.model}: {err}", flush=True)
        return None


def llama_cpp_row(args, gguf: Path, tokens, bos) -> dict:
    from glowq_fx.evaluation.perplexity import windows

    row = {"row": "llama.cpp", "kind": "llama.cpp"}
    if not args.llama_python:
        return {**row, "skipped": "no --llama-python (make bench-cpu builds llama-cpp-python in .bench-venv)"}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        scored = [] if tokens is None else [w.tolist() for w in windows(tokens, PPL_WINDOW, args.ppl_tokens, bos)]
        json.dump(scored, f)
        f.flush()
        done = subprocess.run([args.llama_python, "-c", LLAMA_CPP, str(gguf), str(args.prompt), str(args.new_tokens),
                               str(args.ttft_prompt), str(torch.get_num_threads()), f.name if scored else "-"],
                              capture_output=True, text=True)
    if done.returncode:
        return {**row, "skipped": f"llama-cpp-python failed: {done.stderr.strip().splitlines()[-1:]}"}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    row = {**row, "decode_tok_s": {"1": out["decode"]}, "ttft_s": out["ttft"], "bytes": gguf.stat().st_size,
           **({"ppl": out["ppl"]} if out["ppl"] is not None else {})}
    print_row(row)
    return row


def in_own_process(name: str, argv: list[str], checkpoint: Path | None) -> dict:
    """Row ``name`` measured by a fresh process running this script (``--one-row``); ours load
    ``checkpoint``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        where = [] if checkpoint is None else ["--checkpoint", str(checkpoint)]
        done = subprocess.run([sys.executable, __file__, *argv, "--one-row", name, "--row-out", str(out), *where],
                              capture_output=True, text=True)
        if done.returncode or not out.is_file():
            print(f"{name:28s} failed: {stderr_tail(done)}", flush=True)
            return {"row": name, "kind": "error", "skipped": f"the row's process failed: {stderr_tail(done)}"}
        row = json.loads(out.read_text())
    print_row(row)
    return row


def stderr_tail(done: subprocess.CompletedProcess) -> str:
    return " | ".join(done.stderr.strip().splitlines()[-3:])


def print_row(row: dict) -> None:
    if "decode_tok_s" in row:
        print(f"{row['row']:28s} " + " ".join(f"b{b} {r:7.2f} tok/s" for b, r in row["decode_tok_s"].items())
              + f"  ttft {row['ttft_s']:.3f} s" + (f"  ppl {row['ppl']:.3f}" if "ppl" in row else ""), flush=True)


def quantize_once(want: list[str], argv: list[str], checkpoints: Path) -> dict[str, Path | None]:
    """Our rows' quantized models, each set of quantization options quantized once (in its own
    process) and saved under ``checkpoints``: row -> checkpoint directory (None: it failed)."""
    by_options: dict[str, Path | None] = {}
    out = {}
    for name in (n for n in want if n in OURS):
        key = json.dumps(OURS[name][0], sort_keys=True)
        if key not in by_options:
            directory = checkpoints / f"quantized{len(by_options)}"
            done = subprocess.run([sys.executable, __file__, *argv, "--one-row", name, "--quantize-to", str(directory)],
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"quantizing as {name!r} failed: {stderr_tail(done)}", flush=True)
            by_options[key] = None if done.returncode else directory
        out[name] = by_options[key]
    return out


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, llama8b-layers, or a model directory")
    p.add_argument("--layers", type=int, default=2, help="layers of llama8b-layers")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before the timed decoding")
    p.add_argument("--ttft-prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib-batches", type=int, default=8, help="calibration windows of 256 tokens")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="tokens of the demo text scored per row")
    p.add_argument("--rows", default="all", help="comma-separated row names, or all")
    p.add_argument("--llama-python", default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--one-row", default=None, help=argparse.SUPPRESS)  # internal: measure one row, here
    p.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)  # internal: our row's quantized model
    p.add_argument("--quantize-to", default=None, help=argparse.SUPPRESS)  # internal: quantize as --one-row asks
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        args.batches, args.prompt, args.ttft_prompt, args.new_tokens, args.repeats = [1], 4, 24, 4, 1
        args.rank, args.group_size, args.calib_batches = 8, 32, 2
    unknown = set() if args.rows == "all" else set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; the rows are {ROWS}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.quantize_to:
        quantize_to(args.one_row, args, Path(args.quantize_to))
        return 0
    if args.one_row:
        Path(args.row_out).write_text(json.dumps(run_row(args.one_row, args)))
        return 0
    want = ROWS if args.rows == "all" else [r for r in ROWS if r in args.rows.split(",")]
    model, tokenizer, gguf = load(args)
    _, tokens, bos = texts(args, model, tokenizer)
    rows = []
    with tempfile.TemporaryDirectory() as checkpoints:
        if gguf is None and "llama.cpp" in want and args.llama_python and not args.tiny:
            gguf = own_gguf(model, Path(checkpoints), args)
        del model
        quantized = quantize_once(want, argv, Path(checkpoints))
        for name in want:
            if name == "llama.cpp":
                if gguf is not None:
                    rows.append(llama_cpp_row(args, gguf, tokens, bos))
                else:
                    rows.append({"row": name, "kind": "llama.cpp", "skipped": f"no GGUF file of {args.model} here"})
            elif name in OURS and quantized.get(name) is None:
                rows.append({"row": name, "kind": "error", "skipped": "its quantization failed (printed above)"})
            else:
                rows.append(in_own_process(name, argv, quantized.get(name)))
    import transformers

    meta = {"command": " ".join([Path(sys.argv[0]).name, *argv]), "machine": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "model": "tiny" if args.tiny else args.model + (f" ({args.layers} layers)" if args.model == "llama8b-layers"
                                                            else ""),
            "ppl_tokens": args.ppl_tokens, "rows": rows,
            "one_linear": one_linear_bandwidth((256, 256) if args.tiny else (4096, 4096), 64 if args.tiny else
                                               args.group_size, repeats=5 if args.tiny else 50)}
    add_ratios(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "cpu_decode_tiny" if args.tiny else "cpu_decode" if args.model == "smollm2" else f"cpu_decode_{args.model}"
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=1))
    (out / f"{stem}.md").write_text(markdown(meta))
    plot(meta, out / f"{stem}.png")
    print(markdown(meta))
    return 0


def add_ratios(rows: list[dict]) -> None:
    base = {r["row"]: r for r in rows if "decode_tok_s" in r}
    for r in rows:
        for ref in ("float32 eager", "llama.cpp"):
            if "decode_tok_s" in r and ref in base and "1" in base[ref]["decode_tok_s"] and "1" in r["decode_tok_s"]:
                r[f"vs {ref}"] = r["decode_tok_s"]["1"] / base[ref]["decode_tok_s"]["1"]
        if "bytes" in r and "llama.cpp" in base:
            r["bytes vs GGUF"] = r["bytes"] / base["llama.cpp"]["bytes"]


def markdown(meta: dict) -> str:
    batches = sorted({b for r in meta["rows"] for b in r.get("decode_tok_s", {})}, key=int)
    head = (["row"] + [f"decode tok/s b{b}" for b in batches]
            + ["TTFT s", "peak RSS MiB", "MB", "bytes vs GGUF", "perplexity", "vs float32 eager", "vs llama.cpp"])
    lines = [f"CPU decode, {meta['model']}: {meta['machine']} ({meta['cpu_capability']}, {meta['threads']} threads), "
             f"torch {meta['torch']}, transformers {meta['transformers']}; "
             + (f"perplexity on the first {meta['ppl_tokens']} Wikipedia tokens in windows of {PPL_WINDOW}; "
                if any("ppl" in r for r in meta["rows"]) else "random weights: no perplexity; ")
             + f"`{meta['command']}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    one = meta.get("one_linear")
    if one is not None:
        names = {"glowq": "our GEMV", "aten": "PyTorch's int4 kernel"}
        said = [f"{names[k]}: not measured ({v['skipped']})" if "skipped" in v else
                f"{names[k]} {v['ms']:.3f} ms, {v['GBps']:.1f} GB/s = {v['fraction_of_read']:.0%}"
                for k, v in one["kernels"].items()]
        lines[1:1] = ["", f"One linear at one row ({one['shape'][0]} x {one['shape'][1]}, group {one['group_size']}): "
                          + "; ".join(said) + f" of the {one['read_GBps']:.1f} GB/s this machine reads "
                          "(a sum over 512 MB)"]
    for r in meta["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['row']} | " + " | ".join(["-"] * (len(head) - 2)) + f" | {r['skipped']} |")
            continue
        cells = [f"{r['decode_tok_s'][b]:.2f}" if b in r["decode_tok_s"] else "-" for b in batches]
        cells += [f"{r['ttft_s']:.3f}", f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "-",
                  f"{r['bytes'] / 1e6:.1f}" if "bytes" in r else "-",
                  f"{r['bytes vs GGUF']:.2f}x" if "bytes vs GGUF" in r else "-",
                  f"{r['ppl']:.3f}" if "ppl" in r else "-",
                  f"{r['vs float32 eager']:.2f}x" if "vs float32 eager" in r else "-",
                  f"{r['vs llama.cpp']:.2f}x" if "vs llama.cpp" in r else "-"]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(meta: dict, path: Path) -> None:
    """A bar chart of decode tokens/s at batch 1 (nothing without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in meta["rows"] if "1" in r.get("decode_tok_s", {})]
    colors = {"llama.cpp": "tab:gray", "float": "tab:blue", "peer": "tab:orange", "ours": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    ax.barh([r["row"] for r in rows], [r["decode_tok_s"]["1"] for r in rows],
            color=[colors.get(r["kind"], "tab:red") for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s, batch 1")
    ax.set_title(f"CPU decode, {meta['model']} ({meta['threads']} threads, torch {meta['torch']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
