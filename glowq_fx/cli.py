"""The ``glowq`` command."""
from __future__ import annotations

import argparse
import sys

from glowq_fx.config import GlowQConfig


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


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
    print(_table(headers, body))
    print("err: whitened error tr(E S E^T) = E||E x||^2 per token, summed over members; "
          "bytes: fp16 correction factors (GlowQ stores one B per group).")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glowq", description="GlowQ: 4-bit LLMs with group-shared low-rank correction")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compare RTN, independent QERA and GlowQ on a small random Llama")
    demo.add_argument("--rank", type=int, default=32)
    demo.add_argument("--group-size", type=int, default=64)
    demo.add_argument("--batches", type=int, default=8)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"glowq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
