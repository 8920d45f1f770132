"""The ``glowq`` command."""
from __future__ import annotations

import argparse
import sys

from glowq_fx._text import format_table
from glowq_fx.config import GlowQConfig


def _demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from glowq_fx.demo import run_demo

    config = GlowQConfig(group_size=args.group_size, rank=args.rank)
    print(f"glowq demo: random 4-layer Llama (hidden 256), RTN W4 g{config.group_size}, rank {config.rank}, "
          f"{args.batches} calibration batches of 2x128 random tokens")
    rows = run_demo(config, n_batches=args.batches, progress=lambda it: tqdm(it, desc="calibration", leave=False))
    headers = ["group", "k", "d_in", "sum d_out", "RTN err", "QERA err", "GlowQ err",
               "QERA bytes", "GlowQ bytes", "GlowQ/QERA bytes"]
    body = [[r.group, str(r.members), str(r.in_features), str(r.out_features), f"{r.rtn_error:.4g}",
             f"{r.qera_error:.4g}", f"{r.glowq_error:.4g}", f"{r.qera_bytes:,}", f"{r.glowq_bytes:,}",
             f"{r.glowq_bytes / r.qera_bytes:.2f}"] for r in rows]
    tot = lambda f: sum(getattr(r, f) for r in rows)
    body.append(["total", str(tot("members")), "", str(tot("out_features")), f"{tot('rtn_error'):.4g}",
                 f"{tot('qera_error'):.4g}", f"{tot('glowq_error'):.4g}", f"{tot('qera_bytes'):,}",
                 f"{tot('glowq_bytes'):,}", f"{tot('glowq_bytes') / tot('qera_bytes'):.2f}"])
    print(format_table(headers, body))
    print("err: whitened error tr(E S E^T) = E||E x||^2 per token, summed over members; "
          "bytes: fp16 correction factors (GlowQ stores one B per group).")
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

    if os.path.isdir(model):
        config = AutoConfig.from_pretrained(model)
    elif model in CONFIG_MAPPING:
        config = AutoConfig.for_model(model)
    else:
        raise ValueError(f"{model!r} is neither a local model directory nor a transformers model type "
                         "(e.g. llama, gpt2, gptj, falcon); hub names need a download, which glowq does not do")
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

    from glowq_fx.capture import GlowQWarning, find_groups

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
    print(format_table(["group", "k", "d_in", "d_out"], rows))
    shared = sum(len(g.members) > 1 for g in found.groups)
    print(f"{len(found.groups)} groups ({shared} shared by 2+ linears), "
          f"{sum(len(g.members) for g in found.groups)} linears")
    for name, why in found.skipped.items():
        print(f"not quantized: {name}: {why}")
    for w in caught:
        if issubclass(w.category, GlowQWarning):
            print(f"warning: {w.message}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glowq", description="GlowQ: 4-bit LLMs with group-shared low-rank correction")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compare RTN, independent QERA and GlowQ on a small random Llama")
    demo.add_argument("--rank", type=int, default=32)
    demo.add_argument("--group-size", type=int, default=64)
    demo.add_argument("--batches", type=int, default=8)
    demo.set_defaults(func=_demo)
    groups = sub.add_parser("groups", help="print the input-sharing groups found in a model's graph")
    groups.add_argument("model", help="a transformers model type (llama, gpt2, ...) or a local model directory")
    groups.add_argument("--layers", type=int, default=2,
                        help="layers to build (default 2: the groups repeat per layer)")
    groups.add_argument("--all-layers", dest="layers", action="store_const", const=None,
                        help="build every layer of the config")
    groups.add_argument("--min-out-features", type=int, default=GlowQConfig.min_out_features)
    groups.add_argument("--exclude", action="append", default=[], help="regex of modules to leave out (repeatable)")
    groups.add_argument("--quantize-output-head", action="store_true")
    groups.set_defaults(func=_groups)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"glowq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
