"""Timing a callable the way a server runs it: a CUDA graph replay on the GPU (no launch overhead
from Python), the wall clock on the CPU."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch


def graph_time_ms(fn: Callable[[], object], reps: int) -> float:
    """Mean milliseconds of one replay of ``fn`` captured in a CUDA graph (after two warm-up calls,
    which also run any autotuning outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / reps


def wall_time_ms(fn: Callable[[], object], reps: int) -> float:
    """Mean milliseconds of ``fn`` on the host clock, after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def time_ms(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """``graph_time_ms`` on CUDA, ``wall_time_ms`` elsewhere."""
    if reps < 1:
        raise ValueError(f"reps must be positive, got {reps}")
    return graph_time_ms(fn, reps) if torch.device(device).type == "cuda" else wall_time_ms(fn, reps)
