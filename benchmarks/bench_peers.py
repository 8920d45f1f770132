"""GlowQ beside the 4-bit quantizers people pick, at equal bits per weight, in one harness.

SmolLM2-135M (the packaged model, float32), every method given the same calibration windows
(32 x 512 tokens of the news text, where it calibrates) and scored by the same perplexity harness
(``glowq_fx.evaluation.perplexity``) on the demo's Wikipedia text in windows of 1024, with and
without a BOS token starting each window. Peers (each at its library's recommended 4-bit settings,
at group size 128 and 32; a peer that cannot install or run here gets its row with the reason):

- AutoRound (``auto-round``, SignRound: its ``W4A16`` scheme, symmetric)
- GPTQ as llm-compressor runs it (``GPTQModifier``, ``W4A16``: symmetric); GPTQModel itself needs
  a newer torch than our pin (its row says so)
- AWQ (llm-compressor ``AWQModifier`` with ``W4A16_ASYM``)
- HQQ (``hqq``: its ``BaseQuantizeConfig(nbits=4)``, half-quadratic zero/scale search)
- torchao's int4 weight-only on the CPU (``PrototypeInt4WeightOnlyConfig``: its CPU int4 tensor, on a
  bfloat16 copy; torchao leaves a linear whose width is not a multiple of the group in bfloat16)
- optimum-quanto ``qint4`` (its per-layer group size: 128, or the largest multiple of 32 dividing
  the input width, as ``QModuleMixin`` picks)

and ours: RTN, GlowQ at the default (r64 g128), and GlowQ at the ranks and group sizes whose bytes
match each peer's (``glowq_configs_for``), on RTN, clipped-RTN (``quant.clip``), fitted-grid RTN
(``quant.fitted``: least-squares scale, fractional zero point) and GPTQ codes, each
with the ``first_position_weight`` chosen on held-out calibration windows.

Bits per weight count, over the transformer blocks' linears (the tied embedding/head stays float
for every method), the 4-bit codes as each format stores them (ours keep a partial last group as whole words:
``kernels.layout.packed_columns``), and the per-group scales and zero points as each library's
checkpoint of a 16-bit model stores them (fp16/bf16 scales; 4-bit packed zero points in the
GPTQ/compressed-tensors formats; 16-bit zero points in HQQ, torchao and quanto; 8-bit in ours), plus
our factors ``A``, ``B`` in bfloat16. A linear a peer leaves unquantized counts 16 bits.

Note on group 32: SmolLM2's float weights are a dequantized Q4_1 GGUF (group 32, a min/max grid
with a float minimum). A group-32 quantizer with a float zero point (HQQ, torchao, quanto) can
find that grid again; integer zero points (GPTQ-style, ours) cannot represent it exactly.

    python benchmarks/bench_peers.py                      # every row (hours on 2 CPU cores)
    python benchmarks/bench_peers.py --max-tokens 8192 --rows "HQQ g128,RTN g128"
    make bench-peers                                      # the peers' environment, then every row

Each row runs in its own process (the peers patch modules and keep global state); writes
``benchmarks/results/peers.{json,md,png}`` after every row.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from glowq_fx import GlowQConfig, quantize_  # noqa: E402
from glowq_fx.data.batches import bos_token, text_calibration_batches, tokenize  # noqa: E402
from glowq_fx.data.corpus import load_text  # noqa: E402
from glowq_fx.data.models import load_model  # noqa: E402
from glowq_fx.evaluation.perplexity import perplexity  # noqa: E402
from glowq_fx.kernels.layout import packed_columns  # noqa: E402
from glowq_fx.modules.linear import QuantizedLinear  # noqa: E402
from glowq_fx.studies.accuracy import factor_bytes  # noqa: E402

PEERS = ("AutoRound", "GPTQ (llm-compressor)", "GPTQModel", "AWQ (llm-compressor)", "HQQ", "torchao int4",
         "quanto qint4")
PACKAGES = {"AutoRound": "auto-round", "GPTQ (llm-compressor)": "llmcompressor", "GPTQModel": "gptqmodel",
            "AWQ (llm-compressor)": "llmcompressor", "HQQ": "hqq", "torchao int4": "torchao",
            "quanto qint4": "optimum-quanto"}
# per-group bits of scale + zero point in each format's checkpoint of a 16-bit model
META_BITS = {"AutoRound": 16 + 4, "GPTQ (llm-compressor)": 16, "GPTQModel": 16 + 4, "AWQ (llm-compressor)": 16 + 4,
             "HQQ": 16 + 16, "torchao int4": 16 + 16, "quanto qint4": 16 + 16}
STORAGE = {"AutoRound": "fp16 scale + packed 4-bit zero per group (GPTQ-style export)",
           "GPTQ (llm-compressor)": "bf16 scale per group, symmetric (no zero point)",
           "GPTQModel": "fp16 scale + packed 4-bit zero per group",
           "AWQ (llm-compressor)": "bf16 scale + packed 4-bit zero per group",
           "HQQ": "fp16 scale + fp16 zero per group",
           "torchao int4": "bf16 scale + bf16 zero per group",
           "quanto qint4": "fp16 scale + fp16 shift per group",
           "ours": "bf16 scale + uint8 zero (16 z: an integer, or a multiple of 1/16 for RTN-fitted) per group; "
                   "a partial last group in whole words; A, B bf16"}
GROUP_SIZES = (128, 32)
FLOAT_BITS = 16  # a linear left unquantized, in a 16-bit deployment


# ---------------------------------------------------------------- the model, the texts, the windows

def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears inside the transformer blocks (every method quantizes these, and only these)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def setting(args):
    """(float model, tokenizer, evaluation tokens, calibration batches): the same for every row."""
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    tokens = tokenize(tokenizer, load_text(args.text))
    batches = text_calibration_batches(tokenizer, args.calib_text, args.calib_samples, args.calib_len, bos="off")
    return model, tokenizer, tokens, batches


def calibration_ids(batches) -> torch.Tensor:
    return torch.cat([b["input_ids"] for b in batches])


# ---------------------------------------------------------------- bits per weight

def peer_bits(shapes: dict[str, tuple[int, int]], group_of: dict[str, int], meta_bits: int) -> float:
    """Bits per weight over the block linears ``shapes``: those in ``group_of`` (name -> the group
    size the peer used) as 4-bit codes plus ``meta_bits`` per group, the others ``FLOAT_BITS``."""
    bits = 0
    for n, (N, K) in shapes.items():
        g = group_of.get(n)
        bits += FLOAT_BITS * N * K if g is None else 4 * N * K + meta_bits * N * math.ceil(K / g)
    return bits / sum(N * K for N, K in shapes.values())


def our_bits(model: nn.Module, shapes: dict[str, tuple[int, int]]) -> float:
    """Bits per weight of our quantized block linears as stored: packed codes (whole words, or
    whole groups where the layout keeps them: ``kernels.layout.packed_columns``), a 16-bit scale
    and a zero point per group (uint8 where the zero points are on the 1/16 grid, as every one of
    our quantizers' are), factors in their stored dtype (a group's shared ``B`` once); a block
    linear left float counts ``FLOAT_BITS``."""
    bits, done, shared = 0, set(), set()
    for n, m in model.named_modules():
        if isinstance(m, QuantizedLinear) and n in shapes:
            done.add(n)
            # a 16-bit model's scales (whatever dtype this one runs in), zero points as stored or 16-bit
            zero_bits = 8 if m.zeros.dtype == torch.uint8 else 16
            bits += m.qweight.numel() * m.qweight.element_size() * 8 + (16 + zero_bits) * m.scales.numel()
            if m.A is not None:
                bits += m.A.numel() * m.A.element_size() * 8
                if id(m.projection) not in shared:
                    shared.add(id(m.projection))
                    bits += m.projection.B.numel() * m.projection.B.element_size() * 8
    bits += sum(FLOAT_BITS * N * K for n, (N, K) in shapes.items() if n not in done)
    return bits / sum(N * K for N, K in shapes.values())


def planned_bits(groups, group_size: int, rank: int) -> float:
    """``our_bits`` of GlowQ at ``group_size`` and ``rank`` before quantizing, from the groups."""
    bits = weights = 0
    for g in groups:
        K = g.in_features
        n_groups = 1 if group_size == -1 else math.ceil(K / group_size)
        K_pad = K if group_size == -1 else packed_columns(K, group_size)
        for N in g.out_features:
            weights += N * K
            bits += 4 * N * math.ceil(K_pad / 8) * 8 + (16 + 8) * N * n_groups  # 16-bit scale, 8-bit zero
    return (bits + 8 * factor_bytes(groups, "glowq", rank)) / weights


def glowq_configs_for(groups, targets: list[float], tolerance: float = 0.02) -> list[tuple[int, int]]:
    """(group size, rank) of GlowQ to run against peers at bits per weight ``targets``: targets
    within ``tolerance`` of each other are met once, at the smallest; for each, every group size
    whose codes fit under it, with the largest rank that keeps the total at most ``tolerance``
    above it (configurations left with rank 0 are plain RTN rows, run only where asked)."""
    found, met = set(), []
    for t in sorted(targets):
        if met and t <= met[-1] * (1 + tolerance):
            continue
        met.append(t)
        for g in (32, 64, 128, 256, -1):
            if planned_bits(groups, g, 0) > t * (1 + tolerance):
                continue
            rank = 0
            while rank < 512 and planned_bits(groups, g, rank + 1) <= t * (1 + tolerance):
                rank += 1
            if rank:
                found.add((g, rank))
    return sorted(found, key=lambda c: (c[0] if c[0] > 0 else 1 << 20, c[1]))


# ---------------------------------------------------------------- the peers: each returns the model
# to score (dequantized or native, float32 activations), the group size of every linear it
# quantized, and its settings in words

def run_autoround(model, tokenizer, batches, g: int, args):
    from auto_round import AutoRound

    ids = calibration_ids(batches)
    rounder = AutoRound(model, tokenizer, scheme="W4A16", group_size=g, dataset=[ids[i:i + 8] for i in
                                                                                 range(0, len(ids), 8)],
                        iters=args.autoround_iters, nsamples=len(ids), seqlen=ids.shape[1], batch_size=8,
                        device_map="cpu", enable_torch_compile=False)
    model, _ = rounder.quantize()  # weights replaced by their quantize-dequantize values (no export format)
    return model, {n: g for n in block_linears(model)}, (f"W4A16 (symmetric), iters={args.autoround_iters}, "
                                                         f"nsamples={len(ids)}, seqlen={ids.shape[1]}")


def _llmcompressor(model, batches, recipe):
    from datasets import Dataset
    from llmcompressor import oneshot

    ids = calibration_ids(batches)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(ids), max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False)
    return model


def _w4_scheme(g: int, symmetric: bool) -> dict:
    return {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric,
                                                           "strategy": "group", "group_size": g}}}


def _divisible(model, g: int) -> tuple[dict[str, int], list[str]]:
    """(block linears whose width is a multiple of ``g`` -> ``g``, the others' names): llm-compressor
    refuses the others (its fake-quantized forward cannot take a partial last group, even with
    ``bypass_divisibility_checks``), and its error says to list them in ``ignore``: they stay float."""
    linears = block_linears(model)
    return ({n: g for n, m in linears.items() if m.in_features % g == 0},
            [n for n, m in linears.items() if m.in_features % g])


def run_llmc_gptq(model, tokenizer, batches, g: int, args):
    from llmcompressor.modifiers.gptq import GPTQModifier

    group_of, indivisible = _divisible(model, g)
    recipe = GPTQModifier(config_groups=_w4_scheme(g, True), ignore=["lm_head", *indivisible])
    return (_llmcompressor(model, batches, recipe), group_of,
            "GPTQModifier W4A16 (symmetric), its default dampening and ordering")


@contextlib.contextmanager
def _no_pinning_without_accelerator():
    """llm-compressor 0.14's AWQ pins its cached activations before each grid search, with or
    without an accelerator, and ``Tensor.pin_memory`` raises "Cannot access accelerator device
    when none is available" on a CPU-only machine. Pinning only speeds host-to-device copies, so
    without an accelerator the step is left out (for this call only); the search is unchanged."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield False
        return
    pin = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = pin


def run_llmc_awq(model, tokenizer, batches, g: int, args):
    from llmcompressor.modifiers.awq import AWQModifier

    group_of, indivisible = _divisible(model, g)
    recipe = AWQModifier(config_groups=_w4_scheme(g, False), ignore=["lm_head", *indivisible])
    with _no_pinning_without_accelerator() as unpinned:
        model = _llmcompressor(model, batches, recipe)
    return (model, group_of, "AWQModifier W4A16_ASYM, its default grid (n_grid=20, duo scaling)"
            + ("; its memory pinning left out (no accelerator here)" if unpinned else ""))


@torch.no_grad()
def run_hqq(model, tokenizer, batches, g: int, args):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=4, group_size=g)
    for n, linear in block_linears(model).items():
        q = HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu", del_orig=False)
        linear.weight.copy_(q.dequantize().reshape(linear.weight.shape).float())
    return model, {n: g for n in block_linears(model)}, f"BaseQuantizeConfig(nbits=4, group_size={g}) (axis=1)"


@torch.no_grad()
def run_torchao(model, tokenizer, batches, g: int, args):
    """torchao's CPU int4 weight-only tensor on a bfloat16 copy of each linear (the dtype its CPU
    kernel takes); the weights scored are what that kernel multiplies by (one-hot rows through it)."""
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_ as ao_quantize_
    from torchao.utils import TorchAOBaseTensor

    done = {}
    for n, linear in block_linears(model).items():
        N, K = linear.weight.shape
        shadow = nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
        shadow.weight.copy_(linear.weight)
        ao_quantize_(shadow, PrototypeInt4WeightOnlyConfig(group_size=g, set_inductor_config=False))
        if isinstance(shadow.weight, TorchAOBaseTensor):
            linear.weight.copy_(shadow(torch.eye(K, dtype=torch.bfloat16)).T.float())
            done[n] = g
        else:  # torchao leaves a weight whose width is not a multiple of the group in bfloat16
            linear.weight.copy_(shadow.weight.float())
    return model, done, f"PrototypeInt4WeightOnlyConfig(group_size={g}) (its CPU int4 tensor) on a bfloat16 copy"


@torch.no_grad()
def run_quanto(model, tokenizer, batches, g: int, args):
    """quanto's ``qint4`` on each block linear (through a one-module container, as ``quantize``
    replaces children), frozen, and its dequantized weight scored (quanto's own CPU matmul fails
    under ``torch.inference_mode``: "Cannot set version_counter for inference tensor")."""
    from optimum.quanto import freeze, qint4, quantize

    group_of = {}
    for n, linear in block_linears(model).items():
        holder = nn.Sequential(nn.Linear(linear.in_features, linear.out_features, bias=False))
        holder[0].weight.copy_(linear.weight)
        quantize(holder, weights=qint4)
        if g != 128 and linear.in_features % g == 0:
            holder[0].weight_group_size = g  # quanto picks 128, or the largest multiple of 32 dividing the width
        freeze(holder)
        linear.weight.copy_(holder[0].qweight.dequantize().float())
        if holder[0].weight_group_size:
            group_of[n] = holder[0].weight_group_size
    return model, group_of, f"quantize(weights=qint4), freeze (group sizes used: {sorted(set(group_of.values()))})"


RUNNERS = {"AutoRound": run_autoround, "GPTQ (llm-compressor)": run_llmc_gptq, "AWQ (llm-compressor)": run_llmc_awq,
           "HQQ": run_hqq, "torchao int4": run_torchao, "quanto qint4": run_quanto}


# ---------------------------------------------------------------- ours

# our base quantizers' names in the rows
BASES = {"rtn": "RTN", "clip": "RTN-clip", "fitted": "RTN-fitted", "gptq": "GPTQ", "fitted-gptq": "GPTQ-fitted"}


def glowq_row_name(quantizer: str, g: int, rank: int, alternations: int = 0) -> str:
    base = BASES[quantizer]
    name = f"{base} g{g}" if rank == 0 else f"{base} + GlowQ g{g} r{rank}"
    return name + (f" a{alternations}" if alternations else "")


def parse_ours(name: str) -> tuple[str, int, int, int]:
    """(quantizer, group size, rank, alternations) of one of our rows' names (``glowq_row_name``)."""
    words = name.replace("+ GlowQ ", "").split()
    quantizer = {name: q for q, name in BASES.items()}[words[0]]
    g = int(words[1][1:])
    rank = int(words[2][1:]) if len(words) > 2 and words[2].startswith("r") else 0
    alternations = int(words[-1][1:]) if len(words) > 2 and words[-1].startswith("a") else 0
    if len(words) > 2 + bool(rank) + bool(alternations):
        raise ValueError(f"not one of our rows: {name}")
    return quantizer, g, rank, alternations


def is_ours(name: str) -> bool:
    try:
        parse_ours(name)
    except (KeyError, ValueError, IndexError):
        return False
    return True


def run_ours(name: str, model, tokenizer, batches, args):
    quantizer, g, rank, alternations = parse_ours(name)
    weight = args.first_position_weight.get(quantizer, 1.0)
    config = GlowQConfig(group_size=g, rank=rank, method="glowq" if rank else "none", quantizer=quantizer,
                         output_head_bits=None, first_position_weight=weight, alternations=alternations)
    quantize_(model, batches, config, progress=False)
    return model, None, (f"quantize_({quantizer}, group {g}, " + (f"GlowQ rank {rank}" if rank else "no correction")
                         + (f", {alternations} alternations" if alternations else "")
                         + f", first position x{weight:g})")


def choose_first_position_weight(quantizer: str, args) -> dict:
    """The ``first_position_weight`` for our rows on ``quantizer`` codes, chosen on calibration
    data only: GlowQ r64 g128 quantized with each candidate, scored by its NLL on held-out windows
    of the calibration text (other seeded offsets than the calibration windows)."""
    import copy

    if len(args.first_position_candidates) == 1:  # nothing to choose
        return {"row": f"choose first_position_weight ({quantizer})", "choice": args.first_position_candidates[0],
                "held_out_nll": {}, "held_out": "not scored: one candidate"}
    model, tokenizer, _, batches = setting(args)
    held_out = text_calibration_batches(tokenizer, args.calib_text, args.held_out_samples, args.calib_len, seed=1,
                                        bos="off")
    stream = torch.cat([b["input_ids"] for b in held_out]).reshape(-1)
    nll = {}
    for c in args.first_position_candidates:
        subject = copy.deepcopy(model)
        quantize_(subject, batches, GlowQConfig(group_size=128, rank=64, quantizer=quantizer, output_head_bits=None,
                                                first_position_weight=c), progress=False)
        nll[c] = perplexity(subject, stream, args.calib_len, batch_size=args.batch_size, progress=False).nll
    best = min(nll, key=nll.get)
    return {"row": f"choose first_position_weight ({quantizer})", "choice": best, "held_out_nll": nll,
            "held_out": f"{args.held_out_samples} x {args.calib_len} tokens of {args.calib_text} (seed 1)"}


# ---------------------------------------------------------------- one row, in its own process

def install_failure(peer: str) -> str | None:
    """Why ``peer``'s package is not here: the make target's record of its failed install, or
    that it is missing."""
    package = PACKAGES[peer]
    try:
        importlib.metadata.version(package)
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    record = Path(sys.prefix) / "install-failures.txt"
    for line in record.read_text().splitlines() if record.is_file() else []:
        if line.startswith(package + " "):
            return f"{package} did not install: {line[len(package) + 1:]}"
    return f"{package} is not installed in {sys.prefix} (make bench-peers installs the peers)"


def not_driven(peer: str) -> str | None:
    return None if peer in RUNNERS else (f"{PACKAGES[peer]} is installed, but this harness runs GPTQ through "
                                         "llm-compressor (its row); no GPTQModel runner")


def run_row(name: str, args) -> dict:
    if name.startswith("choose first_position_weight ("):
        return choose_first_position_weight(name[len("choose first_position_weight ("):-1], args)
    model, tokenizer, tokens, batches = setting(args)
    shapes = {n: tuple(m.weight.shape) for n, m in block_linears(model).items()}
    peer, _, g = name.rpartition(" g")
    t0 = time.perf_counter()
    if name == "float32 reference":
        settings, bits, storage = "the float model", 32.0, "float32"
    elif peer in RUNNERS:
        model, group_of, settings = RUNNERS[peer](model, tokenizer, batches, int(g), args)
        bits, storage = peer_bits(shapes, group_of, META_BITS[peer]), STORAGE[peer]
        settings += f"; {len(group_of)} of {len(shapes)} block linears quantized"
    else:
        model, _, settings = run_ours(name, model, tokenizer, batches, args)
        bits, storage = our_bits(model, shapes), STORAGE["ours"]
    quantize_s = time.perf_counter() - t0
    if model.get_input_embeddings().weight.dtype != torch.float32:
        model = model.float()  # every row is scored with float32 activations
    model.eval()
    row = {"row": name, "settings": settings, "storage": storage, "bits_per_weight": bits, "quantize_s": quantize_s}
    t0 = time.perf_counter()
    for protocol, bos in (("bos", bos_token(tokenizer, "on")), ("no_bos", None)):
        result = perplexity(model, tokens, args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                            progress=False, bos=bos)
        row[f"ppl_{protocol}"] = result.perplexity
    row["evaluate_s"] = time.perf_counter() - t0
    return row


def in_own_process(name: str, argv: list[str]) -> dict:
    peer = name.rpartition(" g")[0]
    if peer in PACKAGES and (why := install_failure(peer) or not_driven(peer)) is not None:
        return {"row": name, "skipped": why}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        done = subprocess.run([sys.executable, __file__, *argv, "--one-row", name, "--row-out", str(out)],
                              capture_output=True, text=True)
        if done.returncode or not out.is_file():
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            return {"row": name, "skipped": f"failed here: {tail}"}
        return json.loads(out.read_text())


# ---------------------------------------------------------------- the table

def peer_rows(group_sizes) -> list[str]:
    return [f"{p} g{g}" for g in group_sizes for p in PEERS]


def versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "transformers", *sorted(set(PACKAGES.values()))):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def best_below(rows: list[dict], bits: float, protocol: str, tolerance: float = 0.02) -> dict | None:
    """Our row with the lowest perplexity at most ``tolerance`` above ``bits`` per weight."""
    ours = [r for r in rows if r.get("ours") and f"ppl_{protocol}" in r
            and r["bits_per_weight"] <= bits * (1 + tolerance)]
    return min(ours, key=lambda r: r[f"ppl_{protocol}"], default=None)


def markdown(meta: dict) -> str:
    rows = meta["rows"]
    lines = [f"# GlowQ beside the peers: {meta['model']}, {meta['evaluated_tokens']:,} tokens of {meta['text']} "
             f"in windows of {meta['seq_len']}", "",
             f"`{meta['command']}`", "",
             f"{meta['machine']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
             + f"; calibration {meta['calibration']} for every method that calibrates; {meta['date']}.", "",
             "Bits per weight over the block linears, scales and zero points as each format stores them for a "
             "16-bit model, our factors in bfloat16 (benchmarks/bench_peers.py says how each is counted). "
             "`vs GlowQ`: our best row at no more than 2% above the peer's bits per weight, and its perplexity "
             "(BOS protocol).", "",
             *[line for note in meta.get("notes", []) for line in (note, "")],  # how merged or resumed runs were made
             "| row | bits/weight | perplexity (BOS) | perplexity (no BOS) | quantize s | vs GlowQ at <= bytes "
             "| settings |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "choice" in r:
            continue
        if "skipped" in r:
            lines.append(f"| {r['row']} | - | - | - | - | - | {r['skipped']} |")
            continue
        mate = "" if r.get("ours") or r["row"] == "float32 reference" else best_below(rows, r["bits_per_weight"], "bos")
        versus = "" if not mate else f"{mate['row']} ({mate['bits_per_weight']:.3f}): {mate['ppl_bos']:.3f}"
        lines.append(f"| {r['row']} | {r['bits_per_weight']:.3f} | {r['ppl_bos']:.3f} | {r['ppl_no_bos']:.3f} | "
                     f"{r['quantize_s']:.0f} | {versus} | {r['settings']} |")
    for r in rows:
        if "choice" in r:
            nll = ", ".join(f"x{float(c):g}: {v:.4f}" for c, v in r["held_out_nll"].items())
            how = (f", by the NLL of GlowQ r64 g128 on {r['held_out']} ({nll}).") if nll else " (the one given)."
            lines += ["", f"{r['row']}: x{r['choice']:g}{how}"]
    return "\n".join(lines) + "\n"


def plot(meta: dict, path: Path) -> None:
    """Perplexity (BOS protocol) against bits per weight: each peer a point per group size, our
    rows a curve per base quantizer, the float model a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    done = [r for r in meta["rows"] if "ppl_bos" in r]
    for r in done:
        if r["row"] == "float32 reference":
            ax.axhline(r["ppl_bos"], color="gray", linestyle="--", label=f"float32 {r['ppl_bos']:.2f}")
    for base in BASES.values():
        ours = sorted((r for r in done if r.get("ours") and r["row"].split()[0] == base),
                      key=lambda r: r["bits_per_weight"])
        if ours:
            ax.plot([r["bits_per_weight"] for r in ours], [r["ppl_bos"] for r in ours], "o-",
                    label=f"ours on {base} codes (rank 0 = {base})")
    for r in done:
        if not r.get("ours") and r["row"] != "float32 reference":
            ax.scatter(r["bits_per_weight"], r["ppl_bos"], marker="s", s=30)
            ax.annotate(r["row"], (r["bits_per_weight"], r["ppl_bos"]), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)
    ax.set_xlabel("bits per weight (block linears, as stored)")
    ax.set_ylabel(f"perplexity, BOS protocol ({meta['evaluated_tokens']:,} tokens)")
    ax.set_title(f"{meta['model']}: GlowQ and the peers at equal bytes", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--text", default="wikipedia")
    p.add_argument("--calib-text", default="news")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--group-sizes", default="128,32")
    p.add_argument("--autoround-iters", type=int, default=200, help="AutoRound's default: 200")
    p.add_argument("--base-quantizers", default="rtn,clip,fitted,gptq,fitted-gptq",
                   help="our base quantizers under GlowQ")
    p.add_argument("--first-position-candidates", default="1,32",
                   help="first_position_weight values tried per base quantizer (chosen on held-out calibration text)")
    p.add_argument("--held-out-samples", type=int, default=8)
    p.add_argument("--first-position-weight", default="", help=argparse.SUPPRESS)  # internal: quantizer=c,...
    p.add_argument("--rows", default="all", help="comma-separated row names (peers as 'HQQ g128'), or all")
    p.add_argument("--resume", action="store_true", help="keep the rows --out already holds (not the skipped)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "peers")
    p.add_argument("--one-row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.group_sizes = [int(g) for g in args.group_sizes.split(",")]
    args.first_position_candidates = [float(c) for c in args.first_position_candidates.split(",")]
    args.first_position_weight = {q: float(c) for q, c in (kv.split("=") for kv in args.first_position_weight.split(",")
                                                           if kv)}
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.one_row:
        try:
            row = run_row(args.one_row, args)
        except Exception as err:  # a peer that cannot run here: its row says why, in its own words
            lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()] or [""]
            row = {"row": args.one_row, "skipped": f"failed here: {type(err).__name__}: {lines[0][:300]}"}
        Path(args.row_out).write_text(json.dumps(row))
        return 0
    wanted = None if args.rows == "all" else set(args.rows.split(","))
    model, tokenizer, tokens, batches = setting(args)
    from glowq_fx import find_groups

    groups = [g for g in find_groups(model, batches[0]).groups if all(".layers." in m for m in g.members)]
    meta = {"command": " ".join(["python", Path(sys.argv[0]).name, *argv]),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)",
            "versions": versions(), "model": args.model, "text": args.text,
            "evaluated_tokens": min(args.max_tokens, tokens.numel()), "seq_len": args.seq_len,
            "calibration": f"{args.calib_samples} x {args.calib_len} tokens of {args.calib_text}",
            "date": time.strftime("%Y-%m-%d"), "rows": []}
    del model
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def add(name: str, ours: bool = False, argv: list[str] = argv) -> None:
        if (wanted is not None and name not in wanted) or name in done:
            return
        row = {**in_own_process(name, argv), **({"ours": True} if ours else {})}
        meta["rows"].append(row)
        print(f"{name}: " + (row["skipped"] if "skipped" in row else
                             f"{row['bits_per_weight']:.3f} bits/weight, ppl {row['ppl_bos']:.3f} (BOS) "
                             f"{row['ppl_no_bos']:.3f} (no BOS), {row['quantize_s']:.0f} s"), flush=True)
        args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        args.out.with_suffix(".md").write_text(markdown(meta))

    if args.resume and args.out.with_suffix(".json").is_file():  # a long run goes on where it stopped
        before = json.loads(args.out.with_suffix(".json").read_text())
        meta["rows"] = [r for r in before["rows"] if "skipped" not in r]
        meta["notes"] = before.get("notes", [])  # how the earlier parts were run
    done = {r["row"] for r in meta["rows"]}
    add("float32 reference")
    for name in peer_rows(args.group_sizes):
        add(name)
    targets = sorted({r["bits_per_weight"] for r in meta["rows"] if "bits_per_weight" in r
                      and r["row"] != "float32 reference" and r["bits_per_weight"] < 8})
    configs = {(128, 64), *[(g, 0) for g in args.group_sizes], *glowq_configs_for(groups, targets)}
    chosen = {}
    for quantizer in args.base_quantizers.split(","):
        pick = next((r for r in meta["rows"] if r["row"] == f"choose first_position_weight ({quantizer})"), None)
        if pick is None:
            pick = in_own_process(f"choose first_position_weight ({quantizer})", argv)
            meta["rows"].append(pick)
            print(f"{pick['row']}: " + (pick.get("skipped") or f"{pick['choice']:g} (held-out NLL "
                                        f"{pick['held_out_nll']})"), flush=True)
        chosen[quantizer] = pick.get("choice", 1.0)
    with_weights = [*argv, "--first-position-weight", ",".join(f"{q}={c:g}" for q, c in chosen.items())]
    names = [glowq_row_name(q, g, rank) for q in args.base_quantizers.split(",")
             for g, rank in sorted(configs, key=lambda c: (c[0] if c[0] > 0 else 1 << 20, c[1]))]
    if wanted is not None:  # rows named: ours in the order given (a long run does the first ones first)
        names = [n for n in args.rows.split(",") if is_ours(n)]
    for name in names:
        add(name, ours=True, argv=with_weights)
    if any("ppl_bos" in r for r in meta["rows"]):
        plot(meta, args.out.with_suffix(".png"))
    print(markdown(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
