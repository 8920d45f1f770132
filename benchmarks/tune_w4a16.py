"""Explicit configurations of the raw W4A16 kernels on one Llama-3-8B shape: time, registers and
spills of each, to choose the autotune lists in ``glowq_fx/kernels/w4a16.py`` (GEMV with and
without split-K, the several-row GEMV, GEMMs) and ``glowq_fx/kernels/projection.py`` (against
cuBLAS, one row).

    python benchmarks/tune_w4a16.py [--n 4096] [--k 4096] [--rows 1,4,16,512,2048]
"""
from __future__ import annotations

import argparse

import torch
import triton
from triton.testing import do_bench_cudagraph

from glowq_fx.kernels import projection
from glowq_fx.kernels import w4a16 as kernels

GROUP_SIZE, RANK = 128, 64


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--rows", default="1,4,16,512,2048")
    args = p.parse_args(argv)
    N, K = args.n, args.k
    dev = "cuda"
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=dev)
    scales = torch.rand(K // GROUP_SIZE, N, device=dev).to(torch.bfloat16) * 0.01
    zeros = torch.full((K // GROUP_SIZE, N), 8.0, device=dev, dtype=torch.bfloat16)
    W = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    wbytes = qweight.numel() * 4 + 2 * scales.numel() * 2
    for M in [int(m) for m in args.rows.split(",")]:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        y = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
        ms = do_bench_cudagraph(lambda: torch.nn.functional.linear(x, W))
        print(f"M={M} cuBLAS bf16 {ms * 1e3:.1f} us ({W.numel() * 2 / ms / 1e6:.0f} GB/s, "
              f"{2 * M * N * K / ms / 1e9:.0f} TFLOP/s)", flush=True)
        slots = [qweight, scales, zeros, scales, scales, y, N] * 4
        head = (x, x, x.stride(0), 0, M, K, 0)
        common = dict(NUM_MEMBERS=1, GROUP_SIZE=GROUP_SIZE, HAS_A=False, HAS_BIAS=False)
        if M == 1:
            configs = [(bn, bk, w, sk) for sk in (1, 2, 4, 8) for bn in (16, 32, 64) for bk in (256, 512, 1024, 2048)
                       for w in (4, 8) if sk == 1 or bk <= 1024]
            for bn, bk, w, sk in configs:
                ws = torch.empty(sk * triton.cdiv(N, bn) * bn, device=dev, dtype=torch.float32)
                arrivals = torch.zeros(triton.cdiv(N, bn), device=dev, dtype=torch.int32)

                def run():
                    # the kernel puts its arrival counters back to zero, so replays need no memset
                    return kernels._w4a16_gemv_kernel[(triton.cdiv(N, bn), 1, sk)](
                        *head, ws, arrivals, triton.cdiv(N, bn) * bn, *slots, **common, BLOCK_N=bn, BLOCK_K=bk,
                        BLOCK_R=32, TILE_GROUP=GROUP_SIZE, SPLIT_K=sk, num_warps=w)
                report(f"gemv BN={bn} BK={bk} w={w} split={sk}", run, wbytes)
            # the shared projection R = x B^T of a rank-64 group on this K: cuBLAS vs the Triton GEMV
            B = torch.randn(RANK, K, device=dev, dtype=torch.bfloat16)
            R = torch.empty(M, RANK, device=dev, dtype=torch.bfloat16)
            bbytes = B.numel() * 2
            report("projection cuBLAS", lambda: torch.mm(x, B.t(), out=R), bbytes)
            for c in projection.CONFIGS:
                br, bk = c.kwargs["BLOCK_R"], c.kwargs["BLOCK_K"]

                def run_projection():
                    return projection._projection_gemv_kernel[(triton.cdiv(RANK, br), M)](
                        x, B, R, K, RANK, x.stride(0), B.stride(0), R.stride(0), BLOCK_R=br, BLOCK_K=bk,
                        num_warps=c.num_warps)
                report(f"projection BR={br} BK={bk} w={c.num_warps}", run_projection, bbytes)
        else:
            if M <= kernels.SMALL_M:
                configs = [(16, bn, bk, 4, st) for bn in (32, 64, 128) for bk in (64, 128) for st in (3, 4)]
                # the several-row GEMV, the small-M GEMM's rival (the launcher times both per shape)
                top = min(kernels.ROWS_GEMV_MAX_BLOCK_M, 1 << (M - 1).bit_length())
                for bm in sorted({top, min(top, 4)}):
                    for bn, bk, w in [(bn, bk, w) for bn in (16, 32, 64) for bk in (256, 512, 1024) for w in (4, 8)]:

                        def run_rows():
                            return kernels._w4a16_rows_gemv_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm))](
                                *head, *slots, **common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=32,
                                TILE_GROUP=GROUP_SIZE, num_warps=w)
                        report(f"rows gemv BM={bm} BN={bn} BK={bk} w={w}", run_rows, wbytes, flops=2 * M * N * K)
            else:
                configs = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 4), (128, 256, 32, 8, 3), (64, 128, 32, 4, 3),
                           (128, 64, 64, 8, 3), (256, 128, 32, 8, 3), (256, 128, 64, 8, 3)]
                Wt = torch.empty(K, N, device=dev, dtype=torch.bfloat16)

                def dequant_then_cublas():
                    kernels.dequantize_kernel[(triton.cdiv(K, 64), triton.cdiv(N, 128))](
                        qweight, scales, zeros, Wt, N, K, GROUP_SIZE=GROUP_SIZE, BLOCK_N=128, BLOCK_K=64)
                    return torch.mm(x, Wt)
                ms = do_bench_cudagraph(dequant_then_cublas, rep=20)
                print(f"  dequantize + cuBLAS: {ms * 1e3:.1f} us, {2 * M * N * K / ms / 1e9:.0f} TFLOP/s", flush=True)
            for bm, bn, bk, w, st in configs:

                def run():
                    return kernels._w4a16_gemm_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
                        *head,
                        *slots,
                        **common,
                        BLOCK_M=bm,
                        BLOCK_N=bn,
                        BLOCK_K=bk,
                        BLOCK_R=32,
                        UPCAST_DOT=False,
                        num_warps=w,
                        num_stages=st,
                    )
                report(f"gemm BM={bm} BN={bn} BK={bk} w={w} s={st}", run, wbytes, flops=2 * M * N * K)


def report(name, run, wbytes, flops=None):
    try:
        compiled = run()
        ms = do_bench_cudagraph(run, rep=20)  # launch overhead excluded, as in a served model
    except Exception as e:  # out of resources for this configuration
        print(f"  {name}: failed ({type(e).__name__})", flush=True)
        return
    extra = f", {flops / ms / 1e9:.0f} TFLOP/s" if flops else ""
    if hasattr(compiled, "n_regs"):  # a Triton launch (cuBLAS rows return a tensor)
        extra += f", regs {compiled.n_regs}, spills {compiled.n_spills}"
    print(f"  {name}: {ms * 1e3:.1f} us, {wbytes / ms / 1e6:.0f} GB/s{extra}", flush=True)


if __name__ == "__main__":
    main()
