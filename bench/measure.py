"""Measuring tools: allocator trim, resident memory and its peak, other processes' CPU share,
FLOP counting and the matmul ceiling.

Everything here is independent of what is measured; ``bench.py`` decides what to time.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: no malloc_trim, memory figures are then less tight
    _LIBC = None

CEILING_N = 1024  # the ceiling case multiplies two CEILING_N x CEILING_N fp32 matrices ...
CEILING_REPS = 8  # ... this many times per sample
CEILING_FLOPS = CEILING_REPS * 2 * CEILING_N**3


def trim() -> None:
    """Collect garbage and hand freed heap back to the OS, so resident memory means live memory."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def rss_mb() -> float:
    """Resident memory of this process, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Highest resident memory while the block runs, sampled every millisecond.

    ``peak`` is the process's high-water mark (interpreter, torch, every model of the run, and
    the block's working set); ``rise`` is ``peak`` minus the resident memory just before the
    block, after :func:`trim`.
    """

    def __enter__(self) -> PeakRSS:
        trim()
        self.base = self.peak = rss_mb()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        self.rise = self.peak - self.base


def _cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, CPU s busy on the whole machine, CPU s used by this process)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return time.monotonic(), busy, own.user + own.system


def _foreign_share(start, end) -> float:
    wall = end[0] - start[0]
    if wall <= 0:
        return 0.0
    foreign = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, foreign / (wall * (os.cpu_count() or 1)))


class ForeignCPU:
    """Share of the machine's CPUs that other processes used while the block ran
    (0: they were idle; 1: they took every CPU). Resolution is the kernel tick (10 ms)."""

    def __enter__(self) -> ForeignCPU:
        self._start = _cpu_snapshot()
        return self

    def __exit__(self, *exc) -> None:
        self.share = _foreign_share(self._start, _cpu_snapshot())


def wait_idle(max_seconds: float, threshold: float = 0.1, window: float = 0.25) -> None:
    """Wait (at most `max_seconds`) until other processes use less than `threshold` of the CPUs."""
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        with ForeignCPU() as probe:
            time.sleep(window)
        if probe.share < threshold:
            return


def timed(fn, *args) -> float:
    """Wall seconds of ``fn(*args)``."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _sdpa_flops(shapes, backward: bool) -> int:
    """Matmul FLOPs of attention over q (B, H, L, E), k (B, H, S, E); causal counts half."""
    q, k, is_causal = shapes[0], shapes[1], shapes[2]
    b, h, length, e = q
    flops = 2 * 2 * b * h * length * k[-2] * e  # q @ k^T and p @ v
    if backward:
        flops = flops * 5 // 2  # recomputed scores, dV, dP, dQ, dK
    return flops // 2 if is_causal else flops


def _cpu_flash_forward(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_flops((query, key, is_causal), backward=False)


def _cpu_flash_backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *args,
                        out_shape=None, **kwargs) -> int:
    return _sdpa_flops((query, key, is_causal), backward=True)


# torch's FLOP counter knows the CUDA SDPA kernels but not the CPU flash kernel that SDPA uses here.
_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def count_flops(fn, *args) -> int:
    """Matmul-class FLOPs (mm/bmm/addmm/baddbmm/conv/SDPA) of one call; elementwise work is not counted."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        fn(*args)
    return counter.get_total_flops()


_CEILING_OPERANDS: list[torch.Tensor] = []


def matmul_ceiling() -> float:
    """Seconds for CEILING_REPS fp32 CEILING_N^3 matmuls: this machine's practical GFLOP/s limit."""
    if not _CEILING_OPERANDS:
        gen = torch.Generator().manual_seed(0)
        _CEILING_OPERANDS.extend(torch.randn(CEILING_N, CEILING_N, generator=gen) for _ in range(3))
    a, b, out = _CEILING_OPERANDS
    start = time.perf_counter()
    for _ in range(CEILING_REPS):
        torch.mm(a, b, out=out)
    return time.perf_counter() - start
