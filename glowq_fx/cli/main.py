"""The ``glowq`` command."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from glowq_fx._console import format_table
from glowq_fx.config import GlowQConfig
from glowq_fx.data.cache import MissingResourceError
from glowq_fx.registry import CORRECTIONS, QUANTIZERS

_DTYPES = ("float32", "bfloat16", "float16")


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _head_bits(value: str) -> int | None:
    return None if value.lower() == "none" else int(value)


def _check_devices(args: argparse.Namespace) -> None:
    """Each device named on the command line exists here (before any model loads)."""
    from glowq_fx._devices import check_device

    for option in ("device", "compute_device"):
        if getattr(args, option, None) is not None:
            check_device(getattr(args, option), "--" + option.replace("_", "-"))


def _check_text(name: str, option: str) -> None:
    """The text ``name`` (built in or a file) exists and holds text (before any model loads)."""
    from glowq_fx.data.corpus import load_text

    try:
        text = load_text(name)
    except ValueError as exc:
        raise ValueError(f"{option} {name!r}: {exc}") from None
    if not text.strip():
        raise ValueError(f"{option} {name!r} is empty: give a text file with text in it (or news, wikipedia)")


def _demo(args: argparse.Namespace) -> int:
    from glowq_fx.cli.demo import DemoSettings, run_demo

    run_demo(DemoSettings(eval_tokens=args.eval_tokens, rank=args.rank, group_size=args.group_size,
                          calib_samples=args.calib_samples, compile=not args.no_compile, out=args.out))
    return 0


@dataclass
class _SelectStudy:
    """What ``glowq select`` measured: the sweeps, the lower-rank baselines, the 'auto' pick."""
    config: GlowQConfig
    evaluated_tokens: int
    studies: list
    ranks: dict
    latency: object
    auto_point: object
    auto_groups: list[str]
    auto_selection: object

    @property
    def full(self):
        return self.studies[0].points[-1]

    @property
    def none(self):
        return self.studies[0].points[0]


def _select(args: argparse.Namespace) -> int:
    """GlowQ-S study: full GlowQ once, each score's top-k sweep, elbows, the quantize-time 'auto' pick."""
    import time

    t_start = time.perf_counter()
    run = _select_study(args)
    headers, rows = _select_table(run)
    print(f"\nfull GlowQ {run.full.perplexity:.3f}, none restored (RTN) {run.none.perplexity:.3f}")
    print(format_table(headers, rows))
    meta = _select_meta(args, run, time.perf_counter() - t_start)
    _write_select(args, run, meta, headers, rows)
    return 0


def _select_study(args: argparse.Namespace) -> _SelectStudy:
    import copy
    import dataclasses

    from glowq_fx import calibrate, quantize_
    from glowq_fx.data.batches import text_calibration_batches, tokenize
    from glowq_fx.data.corpus import load_text
    from glowq_fx.data.models import load_model
    from glowq_fx.evaluation.perplexity import perplexity
    from glowq_fx.selective.corrections import Corrections
    from glowq_fx.studies.selective import SweepPoint, correction_latency, rank_sweep, study

    config = GlowQConfig(group_size=args.group_size, rank=args.rank, method="glowq")
    _check_devices(args)
    _check_text(args.text, "--text")
    _check_text(args.calib, "--calib")
    model, tokenizer = load_model(args.model, dtype=_torch_dtype(args.dtype), device=args.device)
    tokens = tokenize(tokenizer, load_text(args.text))
    batches = text_calibration_batches(tokenizer, args.calib, args.calib_samples, args.calib_len, device=args.device,
                                       bos=args.bos)
    calibrated = calibrate(model, batches, config)
    # the equal-bytes baseline, every group at another rank; first, so a bad rank fails before the study
    ranks = rank_sweep(model, calibrated, config, args.compare_rank or [], tokens, seq_len=args.seq_len,
                       max_tokens=args.eval_tokens, batch_size=args.batch_size,
                       latency_tokens=args.latency_tokens or None)
    quantized = copy.deepcopy(model)
    report = quantize_(quantized, calibrated, config)
    measure = text_calibration_batches(tokenizer, args.calib, args.measure_samples, args.measure_len, seed=1,
                                       device=args.device, bos=args.bos)
    corrections = Corrections(quantized)
    latency, unit_ms = (correction_latency(corrections, tokens=args.latency_tokens) if args.latency_tokens
                        else (None, None))
    studies = study(quantized, report, tokens, args.score or ["gain"], step=args.step, batches=measure,
                    seq_len=args.seq_len, max_tokens=args.eval_tokens, batch_size=args.batch_size,
                    latency_ms=unit_ms)
    # what GlowQConfig(selective="auto") keeps: quantize_ itself, on the same calibration
    auto_report = quantize_(model, calibrated, dataclasses.replace(config, selective="auto"))
    auto = [g.name for g in auto_report.groups if g.restored]
    auto_ppl = perplexity(model, tokens, args.seq_len, batch_size=args.batch_size, max_tokens=args.eval_tokens,
                          desc="selective='auto'").perplexity
    auto_point = SweepPoint(len(auto), auto_report.total("factor_bytes"), auto_ppl,
                            None if unit_ms is None else sum(unit_ms[n] for n in auto))
    return _SelectStudy(config, int(min(tokens.numel(), args.eval_tokens or tokens.numel())), studies, ranks, latency,
                        auto_point, auto, auto_report.selection)


def _select_table(run: _SelectStudy) -> tuple[list[str], list[list[str]]]:
    """Each elbow, the 'auto' pick and the lower ranks against full GlowQ."""
    full, none, first = run.full, run.none, run.studies[0]
    elbows = [(f"elbow of the {st.score} sweep (bytes)", st.elbow) for st in run.studies]
    if run.latency is not None:
        elbows += [(f"elbow of the {st.score} sweep (latency)", st.latency_elbow) for st in run.studies]
    lower = [(f"every group at rank {r}", run.ranks[r]) for r in sorted(run.ranks, reverse=True)]
    rows = []
    for label, point in [*elbows, ("selective='auto' (at quantization)", run.auto_point), *lower]:
        if point is None:
            rows.append([label] + ["-"] * 6)
            continue
        rows.append([label, f"{point.k}/{first.units}", f"{point.factor_bytes / first.total_bytes:.2f}",
                     "-" if point.latency_ms is None else f"{point.latency_ms / full.latency_ms:.2f}",
                     f"{point.perplexity:.3f}", f"{100 * (point.perplexity / full.perplexity - 1):+.2f}%",
                     f"{100 * (none.perplexity - point.perplexity) / (none.perplexity - full.perplexity):.0f}%"])
    headers = ["selection", "groups kept", "bytes kept", "latency kept", "perplexity", "vs full GlowQ",
               "of GlowQ's gain"]
    return headers, rows


def _select_meta(args: argparse.Namespace, run: _SelectStudy, seconds: float) -> dict:
    import platform
    import time

    import torch

    return {"command": "glowq " + " ".join(args.argv),
            "machine": (f"{torch.cuda.get_device_name(args.device)}, {args.dtype}" if args.device.startswith("cuda")
                        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
                             f"(CPU), {args.dtype}"),
            "torch": torch.__version__, "model": args.model, "config": run.config.to_dict(),
            "evaluated_tokens": run.evaluated_tokens, "seq_len": args.seq_len,
            "calibration": f"{args.calib_samples} x {args.calib_len} tokens of {args.calib}",
            "measured_score_batches": f"{args.measure_samples} x {args.measure_len} tokens of {args.calib}",
            "full_glowq_perplexity": run.full.perplexity, "rtn_perplexity": run.none.perplexity,
            "auto": {**run.auto_point.to_dict(), "groups": run.auto_groups, "loss_curve": run.auto_selection},
            "studies": [st.to_dict() for st in run.studies],
            "lower_ranks": {str(r): p.to_dict() for r, p in sorted(run.ranks.items())},
            "latency": None if run.latency is None else run.latency.to_dict(),
            "time_s": seconds, "date": time.strftime("%Y-%m-%d")}


def _write_select(args: argparse.Namespace, run: _SelectStudy, meta: dict, headers: list[str],
                  rows: list[list[str]]) -> None:
    """The study's JSON, markdown table and plot at ``args.out``."""
    import json

    from glowq_fx.studies.selective import plot_studies

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    full = run.full
    md = [f"# GlowQ-S on {args.model}", "", f"`{meta['command']}`", "",
          f"GlowQ rank {args.rank}, W4 g{args.group_size}; perplexity over {meta['evaluated_tokens']:,} tokens of "
          f"{args.text} (windows of {args.seq_len}); sweep step {args.step}; {meta['machine']}, torch "
          f"{meta['torch']}, {meta['date']}. Full GlowQ {full.perplexity:.3f}, RTN {run.none.perplexity:.3f}.", "",
          *_latency_lines(run.latency, full),
          "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot_studies(run.studies, out.with_suffix(".png"), f"GlowQ-S, {args.model}, rank {args.rank}",
                 latency_device=meta["machine"], marks=[("selective='auto'", run.auto_point)],
                 ranks={**run.ranks, args.rank: full} if run.ranks else None)
    print(f"wrote {out.with_suffix('.json')}, .md, .png ({meta['time_s']:.0f} s)")


def _latency_lines(latency, full) -> list[str]:
    if latency is None:
        return []
    shapes = "; ".join(f"{d['shape']}: {1e3 * d['correction_ms']:.1f} us over {1e3 * d['uncorrected_ms']:.1f} us"
                       for d in latency.to_dict()["shapes"])
    where = ("the pure-torch CPU path, not a GPU figure" if latency.device == "cpu"
             else "CUDA-graph replays of the kernels")
    return [f"Correction latency per unit shape at {latency.tokens} token(s), measured on {latency.device} "
            f"({where}): {shapes}. All corrections: {full.latency_ms:.3f} ms per step; 'latency kept' is the "
            "fraction of that.", ""]


def _config_from_args(args: argparse.Namespace) -> GlowQConfig:
    return GlowQConfig(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric, quantizer=args.quantizer,
                       method=args.method, rank=args.rank, svd=args.svd, seed=args.seed, exclude=tuple(args.exclude),
                       quantize_output_head=args.quantize_output_head, embedding_bits=args.embedding_bits,
                       output_head_bits=args.output_head_bits, factor_dtype=args.factor_dtype,
                       calibration=args.calibration,
                       block_inputs=args.block_inputs, activations=args.activations, offload_dir=args.offload_dir)


def _quantize(args: argparse.Namespace) -> int:
    from glowq_fx import quantize_, save_quantized
    from glowq_fx.data.batches import text_calibration_batches
    from glowq_fx.data.models import load_model

    config = _config_from_args(args)
    _check_devices(args)
    _check_text(args.calib, "--calib")
    if args.from_disk:
        return _quantize_from_disk(args, config)
    model, tokenizer = load_model(args.model, dtype=_torch_dtype(args.dtype), device=args.device)
    batches = text_calibration_batches(tokenizer, args.calib, args.calib_samples, args.calib_len, seed=args.seed,
                                       device=args.device, bos=args.bos)
    report = quantize_(model, batches, config, device=args.compute_device)
    print(report)
    out = save_quantized(model, args.out, report=report, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
    print(f"saved to {out}")
    return 0


def _quantize_from_disk(args: argparse.Namespace, config: GlowQConfig) -> int:
    """The float weights stay in MODEL's safetensors; one block at a time is read, quantized and written."""
    from transformers import AutoTokenizer

    from glowq_fx.data.batches import text_calibration_batches
    from glowq_fx.data.models import resolve_model
    from glowq_fx.quantize.from_disk import quantize_checkpoint

    directory = resolve_model(args.model)  # a GGUF is converted to a checkpoint directory first
    if not Path(directory).is_dir():
        raise ValueError(f"--from-disk reads a local checkpoint directory (or a GGUF); {args.model!r} is neither")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batches = text_calibration_batches(tokenizer, args.calib, args.calib_samples, args.calib_len, seed=args.seed,
                                       bos=args.bos)
    report = quantize_checkpoint(directory, args.out, batches, config, device=args.compute_device or args.device,
                                 dtype=_torch_dtype(args.dtype), tokenizer=tokenizer,
                                 max_shard_size=args.max_shard_size)
    print(report)
    print(f"saved to {args.out}")
    return 0


def _load_any(name: str, dtype: str, device: str):
    """A quantized checkpoint directory, or a floating-point model (built-in name, directory, hub name)."""
    from glowq_fx.checkpoint import is_checkpoint, load_quantized
    from glowq_fx.data.models import load_model

    if is_checkpoint(name):
        from transformers import AutoTokenizer

        return load_quantized(name, device=device), AutoTokenizer.from_pretrained(name), "quantized checkpoint"
    model, tokenizer = load_model(name, dtype=_torch_dtype(dtype), device=device)
    return model, tokenizer, f"{dtype} model"


def _eval(args: argparse.Namespace) -> int:
    from glowq_fx.data.batches import bos_token, tokenize
    from glowq_fx.data.corpus import load_text
    from glowq_fx.evaluation.perplexity import perplexity

    _check_devices(args)
    _check_text(args.text, "--text")
    model, tokenizer, kind = _load_any(args.model, args.dtype, args.device)
    tokens = tokenize(tokenizer, load_text(args.text))
    bos = bos_token(tokenizer, args.bos)
    r = perplexity(model, tokens, args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens, bos=bos)
    print(format_table(["model", "kind", "text", "perplexity", "nll", "tokens", "windows", "seq_len", "BOS", "seconds"],
                       [[args.model, kind, args.text, f"{r.perplexity:.3f}", f"{r.nll:.4f}", f"{r.n_tokens:,}",
                         str(r.n_windows), str(r.seq_len), "-" if bos is None else str(bos), f"{r.time_s:.0f}"]]))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from glowq_fx.checkpoint import is_checkpoint
    from glowq_fx.evaluation.speed import decode_eager_vs_compiled

    if not is_checkpoint(args.model):
        raise ValueError(f"{args.model} is not a quantized checkpoint; make one with "
                         f"`glowq quantize MODEL --out DIR` and bench DIR")
    model, _, _ = _load_any(args.model, "float32", args.device)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    t = decode_eager_vs_compiled(model, ids.to(args.device), args.new_tokens, args.repeats)
    print(format_table(["run", "decode tokens/s", "first token s", "vs eager"], t.rows()))
    print(f"greedy decoding on {args.device}: batch {args.batch}, prompt {args.tokens} tokens, {args.new_tokens} new "
          f"(static cache), torch {torch.__version__}, median of {args.repeats}; compile {t.compile_s:.0f} s; "
          f"greedy tokens agree {t.tokens_agree:.0%}")
    return 0


def _build_from_config(model: str, layers: int | None):
    """A transformers model at its real layer shapes, from a model type or a local directory.

    Weights are never loaded or initialised: the model is built on the meta device and then
    given zero-filled CPU storage in bfloat16 (groups depend on shapes only). The meta device
    alone is not enough: some forwards index with CPU tensors or branch on mask values.
    """
    import os

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from glowq_fx.data.models import resolve_model

    if model in CONFIG_MAPPING and not os.path.exists(model):
        config = AutoConfig.for_model(model)
    else:
        where = resolve_model(model)  # the built-in model, a GGUF (converted once) or a directory
        if not os.path.isdir(where):
            raise ValueError(f"{model!r} is neither a local model directory, a GGUF file nor a transformers model type "
                             "(e.g. llama, gpt2, gptj, falcon); hub names need a download, which glowq does not do")
        config = AutoConfig.from_pretrained(where)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be positive, got {layers}")
        config.num_hidden_layers = min(layers, config.num_hidden_layers)
    with torch.device("meta"):
        try:
            net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        except ValueError:
            net = AutoModel.from_config(config, dtype=torch.bfloat16)
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            t.zero_()
    if hasattr(net, "tie_weights"):
        net.tie_weights()  # to_empty replaced tied parameters one module at a time
    return net.eval(), config


def _groups(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from glowq_fx import GlowQWarning, find_groups
    from glowq_fx.capture.experts import expert_weight
    from glowq_fx.quantize.experts import find_experts

    net, config = _build_from_config(args.model, args.layers)
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    glowq_config = GlowQConfig(min_out_features=args.min_out_features, exclude=tuple(args.exclude),
                               quantize_output_head=args.quantize_output_head)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = find_groups(net, batch, glowq_config)
    print(f"glowq groups: {type(net).__name__} ({config.model_type}, {config.num_hidden_layers} layers), "
          f"{found.pieces} captured graph(s)")
    rows = [[g.name, str(len(g.members)), str(g.in_features), "/".join(map(str, g.out_features))]
            for g in found.groups]
    experts, experts_skipped = find_experts(net, glowq_config)
    for name, p in experts.items():  # the experts' first weight is one group (one B); each second weight its own
        module = net.get_submodule(name)
        (n1, k1), (n2, k2) = (expert_weight(module, w, 0, p.is_transposed).shape for w in p.weights)
        rows.append([f"{name}.{p.first}", f"{p.num_experts} experts", str(k1), f"{p.num_experts} x {n1}"])
        rows.append([f"{name}.{p.second}", f"{p.num_experts} x 1", str(k2), str(n2)])
    print(format_table(["group", "k", "d_in", "d_out"], rows))
    shared = sum(len(g.members) > 1 for g in found.groups)
    print(f"{len(found.groups)} groups ({shared} shared by 2+ linears), "
          f"{sum(len(g.members) for g in found.groups)} linears"
          + (f"; {len(experts)} experts modules (their first weight shares one B across the experts, each expert's "
             "second weight reads its own input)" if experts else ""))
    for name, why in {**found.skipped, **experts_skipped}.items():
        print(f"not quantized: {name}: {why}")
    for w in caught:
        if issubclass(w.category, GlowQWarning):
            print(f"warning: {w.message}")
    return 0


def _quantization_args(p: argparse.ArgumentParser) -> None:
    d = GlowQConfig()
    p.add_argument("--method", default=d.method, choices=CORRECTIONS.names(),
                   help="correction: GlowQ's shared B, an independent baseline, or none")
    p.add_argument("--rank", type=int, default=d.rank, help="correction rank")
    p.add_argument("--group-size", type=int, default=d.group_size, help="32..256, or -1 for per-channel")
    p.add_argument("--bits", type=int, default=d.bits, help="weight bits")
    p.add_argument("--quantizer", default=d.quantizer, choices=QUANTIZERS.names(), help="base 4-bit quantizer")
    p.add_argument("--symmetric", action="store_true", help="symmetric groups (no zero point)")
    p.add_argument("--svd", default=d.svd, choices=["randomized", "exact"], help="SVD of the correction solve")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the calibration windows and the sketch")
    p.add_argument("--exclude", action="append", default=[], help="regex of modules to leave out (repeatable)")
    p.add_argument("--quantize-output-head", action="store_true",
                   help="quantize the output head too (its own correction; a tied head needs --embedding-bits 4)")
    p.add_argument("--output-head-bits", type=_head_bits, default=d.output_head_bits, choices=[8, None],
                   help="8 (default): the output head int8, one scale per row (a tied table reads its codes); "
                        "none: floating point")
    p.add_argument("--embedding-bits", type=int, default=d.embedding_bits, choices=[4, 8],
                   help="store the input embedding table in 4 or 8 bits (default: floating point)")
    p.add_argument(
        "--factor-dtype",
        default=d.factor_dtype,
        choices=["auto", "model", "float32", "bfloat16", "float16"],
        help="dtype of the correction factors (auto: bfloat16 for a float32 model, else the model's)",
    )
    p.add_argument("--calib", default="news", help="calibration text: news, wikipedia or a text file")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window")
    _bos_arg(p)
    p.add_argument("--calibration", default=d.calibration, choices=["auto", "blocks", "model"],
                   help="block by block (auto: when the model has repeated blocks) or the whole model at once")
    p.add_argument("--block-inputs", default=d.block_inputs, choices=["float", "quantized"],
                   help="what feeds the next block: the float or the quantized block's outputs")
    p.add_argument("--activations", default=d.activations, choices=["auto", "device", "cpu", "disk"],
                   help="where the cached block inputs live")
    p.add_argument("--offload-dir", default=None, help="directory for --activations disk")
    p.add_argument("--compute-device", default=None,
                   help="where blocks compute, one at a time (default: --device); the weights stay on --device")


def _bos_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bos", default="auto", choices=["auto", "on", "off"],
                   help="start every window with the BOS token: auto when the tokenizer adds one (as lm-eval), off "
                        "for the GPTQ/GlowQ papers' protocol")


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=_DTYPES, help="dtype the model is loaded in")
    p.add_argument("--device", default="cpu", help="where the model lives (cpu, cuda, cuda:N)")


def _add_demo(sub, formatter) -> None:
    demo = sub.add_parser(
        "demo",
        formatter_class=formatter,
        help="SmolLM2 on Wikipedia text: groups, perplexity of RTN / independent / GlowQ, "
        "eager vs compiled, a PNG plot",
    )
    demo.add_argument("--eval-tokens", type=int, default=8192, help="prefix of the text to score")
    demo.add_argument("--rank", type=int, default=64, help="correction rank")
    demo.add_argument("--group-size", type=int, default=64, help="quantization group size")
    demo.add_argument("--calib-samples", type=int, default=16, help="calibration windows of 512 news tokens")
    demo.add_argument("--no-compile", action="store_true", help="skip the eager vs compiled timing")
    demo.add_argument("--out", type=Path, default=Path("glowq-demo"), help="where the table and the plot go")
    demo.set_defaults(func=_demo)


def _add_quantize(sub, formatter) -> None:
    quantize = sub.add_parser("quantize", formatter_class=formatter, help="quantize a model and save the checkpoint")
    quantize.add_argument("model", help="smollm2 (built in), a local model directory, a .gguf file (or a directory "
                                        "holding one) or a hub name")
    quantize.add_argument("--out", type=Path, required=True, help="the checkpoint directory to write")
    quantize.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (bytes, 5GB, 500MiB)")
    quantize.add_argument("--from-disk", action="store_true",
                          help="leave the float weights in MODEL's safetensors and read one block at a time (for a "
                               "model larger than memory); the checkpoint is written as it goes")
    _quantization_args(quantize)
    _device_args(quantize)
    quantize.set_defaults(func=_quantize)


def _add_eval(sub, formatter) -> None:
    evaluate = sub.add_parser("eval", formatter_class=formatter, help="perplexity of a model or a quantized checkpoint")
    evaluate.add_argument("model", help="a quantized checkpoint directory, smollm2, a model directory, a .gguf file or "
                                        "a hub name")
    evaluate.add_argument("--text", default="wikipedia", help="wikipedia, news or a text file")
    evaluate.add_argument("--seq-len", type=int, default=2048, help="tokens per scored window")
    evaluate.add_argument("--max-tokens", type=int, default=None, help="score a prefix of the text")
    evaluate.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    _bos_arg(evaluate)
    _device_args(evaluate)
    evaluate.set_defaults(func=_eval)


def _add_bench(sub, formatter) -> None:
    bench = sub.add_parser("bench", formatter_class=formatter,
                           help="greedy decoding speed of a quantized checkpoint, eager vs glowq_backend")
    bench.add_argument("model", help="a quantized checkpoint directory")
    bench.add_argument("--tokens", type=int, default=128, help="prompt tokens per row")
    bench.add_argument("--new-tokens", type=int, default=32, help="tokens generated after the prompt")
    bench.add_argument("--batch", type=int, default=1, help="rows of the timed input")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs (the median is shown)")
    bench.add_argument("--device", default="cpu", help="where the model runs")
    bench.set_defaults(func=_bench)


def _add_select(sub, formatter) -> None:
    select = sub.add_parser(
        "select",
        formatter_class=formatter,
        help="GlowQ-S: sweep top-k restored groups per score, find the elbows, write a table and a PNG",
    )
    select.add_argument("model", nargs="?", default="smollm2", help="as for quantize")
    select.add_argument("--score", action="append", choices=["gain", "weight_error", "measured"],
                        help="ranking score (repeatable; default gain)")
    select.add_argument("--rank", type=int, default=64, help="correction rank")
    select.add_argument("--group-size", type=int, default=64, help="quantization group size")
    select.add_argument("--step", type=int, default=8, help="sweep k = 0, step, 2 step, ..., all")
    select.add_argument("--compare-rank", type=int, action="append",
                        help="also quantize every group at this rank (repeatable): the equal-bytes "
                             "baseline a selection has to beat")
    select.add_argument("--text", default="wikipedia", help="evaluation text: wikipedia, news or a text file")
    select.add_argument("--eval-tokens", type=int, default=8192, help="prefix of the text to score")
    select.add_argument("--seq-len", type=int, default=1024, help="tokens per scored window")
    select.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    select.add_argument("--calib", default="news", help="calibration text: news, wikipedia or a text file")
    select.add_argument("--calib-samples", type=int, default=32, help="calibration windows")
    select.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window")
    select.add_argument("--measure-samples", type=int, default=2, help="batches of the measured score")
    select.add_argument("--measure-len", type=int, default=256, help="tokens per batch of the measured score")
    select.add_argument("--latency-tokens", type=int, default=1,
                        help="rows of the timed input for the latency cost model (1 = decode); 0 skips timing")
    _bos_arg(select)
    _device_args(select)
    select.add_argument("--out", type=Path, default=Path("glowq-select") / "selective",
                        help="path stem of the JSON, markdown and PNG written")
    select.set_defaults(func=_select)


def _add_groups(sub, formatter) -> None:
    groups = sub.add_parser(
        "groups", formatter_class=formatter, help="print the input-sharing groups found in a model's graph"
    )
    groups.add_argument(
        "model", help="smollm2, a transformers model type (llama, gpt2, ...), a local model directory or a .gguf file"
    )
    groups.add_argument("--layers", type=int, default=2,
                        help="layers to build (default 2: the groups repeat per layer)")
    groups.add_argument("--all-layers", dest="layers", action="store_const", const=None,
                        help="build every layer of the config")
    groups.add_argument("--min-out-features", type=int, default=GlowQConfig.min_out_features,
                        help="linears with fewer outputs (routers, gates) stay in floating point")
    groups.add_argument("--exclude", action="append", default=[], help="regex of modules to leave out (repeatable)")
    groups.add_argument("--quantize-output-head", action="store_true", help="count the output head as a group")
    groups.set_defaults(func=_groups)


def parser() -> argparse.ArgumentParser:
    """The ``glowq`` command line: one sub-command per job."""
    top = argparse.ArgumentParser(prog="glowq", description="GlowQ: 4-bit LLMs with group-shared low-rank correction")
    sub = top.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_quantize, _add_eval, _add_bench, _add_select, _add_groups):
        add(sub, argparse.ArgumentDefaultsHelpFormatter)  # --help shows every default
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])  # for the command line written with results
    try:
        return args.func(args)
    except (ValueError, MissingResourceError) as exc:
        print(f"glowq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
