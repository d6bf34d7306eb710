"""Measuring this machine: the usable fp32 matmul peak, the denominator of a CPU's MFU."""

from __future__ import annotations

import time


def matmul_peak_flops(*, threads: int, size: int = 1024, repeats: int = 20) -> float:
    """Best FLOP/s of an n x n fp32 matmul over `repeats` timed runs, with `threads` threads.

    Blocks for a second or so; changes torch's thread count (callers that care restore it).
    """
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best
