"""Peak memory of a sampling job, estimated before any work starts, and the budget it must fit.

The estimate is the resident memory a process needs for one sampling call: the torch runtime, the
model's weights, the float32 canvases (noisy sample, fused prediction, noise, condition, scheduler
temporaries), one U-Net forward over a batch of windows (skip connections kept for the decoder, the
largest block's temporaries, attention scores as if materialised), and the watershed of a structure.
It is deliberately on the safe side: tests check it against the measured peak of real forwards.

A call either lowers its window batch until the estimate fits the budget or refuses with a one-line
:class:`MemoryBudgetError` naming the size and the budget. The budget is of RAM (default 40 % of it); a
job whose model sits on a GPU keeps its canvases and activations in the GPU's memory, so there the budget
is also capped at :data:`DEVICE_FRACTION` of that device's memory.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from engine.config import UNetConfig
from engine.errors import NuDiffError

__all__ = ["reuse_freed_memory", "MemoryBudgetError", "Plan", "forward_bytes", "job_bytes", "plan_windows",
           "default_budget_gb", "total_ram_bytes", "device_memory_bytes", "is_out_of_memory",
           "GiB", "CONDITION_CACHE_BYTES"]

GiB = 1024 ** 3
RUNTIME_BYTES = 600 * 1024 ** 2  # torch, numpy, scipy, skimage, cv2 and two demo models: 0.46 GiB measured
CANVAS_COPIES = 12  # float32 (C, H, W) canvases alive during a step (x, eps, noise, cond, scheduler temps)
WATERSHED_BYTES_PER_PX = 120  # structure_to_instances on an (H, W) map, measured ~70 B/px
SAFETY = 1.25  # on the canvases
FORWARD_MARGIN = 1.3  # measured peaks of forwards were 0.6-1.6x the bare tensor count (tests/test_tiling.py)
ALLOCATOR_BYTES = 16 * 1024 ** 2
#: memory a sampling run may keep its condition's SPADE modulation in (engine.unet.ConditionMaps): a call
#: without a plan uses the default, a planned one what its budget leaves, up to the maximum
CONDITION_CACHE_BYTES = 256 * 1024 ** 2
MAX_CONDITION_CACHE_BYTES = 1024 ** 3
#: share of a GPU's memory a sampling job may plan for (the CUDA context and the allocator's cache take
#: the rest)
DEVICE_FRACTION = 0.8


class MemoryBudgetError(NuDiffError):
    """A sampling request would need more memory than its budget."""


def reuse_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the system after every tensor.

    Sampling allocates and frees the same large activations thousands of times; by default glibc serves
    each from fresh mmap'd pages (page faults, zeroing), which made a window pass ~1.8x slower on the 2-core
    CPU (docs/benchmarks.md, large fields). The process's resident memory then stays at its peak, which the
    memory budget bounds. Call once at the start of a sampling or training process. False where not glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, ctypes.c_int(2 ** 31 - 1))
                    and libc.mallopt(m_mmap_threshold, ctypes.c_int(2 ** 30)))
    except (OSError, AttributeError):
        return False


def total_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


def default_budget_gb() -> float:
    """Default memory budget of one job: 40 % of this machine's RAM, at least 2 GiB (env NUDIFF_MAX_MEMORY_GB)."""
    env = os.environ.get("NUDIFF_MAX_MEMORY_GB")
    if env:
        try:
            return float(env)
        except ValueError:
            pass
    return max(2.0, round(0.4 * total_ram_bytes() / GiB, 1))


def device_memory_bytes(device) -> int | None:
    """Total memory of the GPU `device` (torch.device or str, e.g. "cuda:1"), or None for the CPU and any
    other device whose memory is the machine's RAM."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(dev).total_memory)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a failed allocation: Python's MemoryError, torch's OutOfMemoryError (a GPU), or the
    RuntimeError of torch's CPU allocator."""
    if isinstance(exc, MemoryError):
        return True
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def check_budget_gb(value: float | None) -> float:
    """The budget in GiB (default :func:`default_budget_gb`); NuDiffError unless a positive number."""
    if value is None:
        return default_budget_gb()
    v = float(value)
    if not v > 0 or v != v or v == float("inf"):
        raise NuDiffError(f"memory budget must be a positive number of GiB, got {value}")
    return v


def forward_bytes(cfg: UNetConfig, batch: int, height: int, width: int) -> int:
    """Peak bytes of one no-grad float32 forward of a U-Net `cfg` over a (batch, C, height, width) input."""
    n_levels = len(cfg.channels)
    cond = cfg.cond_channels > 0
    hw = [(height >> lv) * (width >> lv) for lv in range(n_levels)]
    ch0 = cfg.channels[0]
    skips = [ch0 * hw[0]]
    skip_ch = [ch0]
    work = [(cfg.in_channels + 2 * ch0) * hw[0]]
    attn = [0]
    c = ch0
    for lv, out in enumerate(cfg.channels):
        for _ in range(cfg.num_res_blocks):
            work.append((3 * c + 4 * out) * hw[lv])
            if lv in cfg.attention_levels:
                heads = max(1, out // cfg.head_channels)
                attn.append(2 * heads * hw[lv] ** 2 + 5 * out * hw[lv])
            c = out
            skips.append(c * hw[lv])
            skip_ch.append(c)
        if lv < n_levels - 1:
            skips.append(c * hw[lv + 1])
            skip_ch.append(c)
    spade = (cfg.spade_hidden + cfg.cond_channels) if cond else 0
    heads = max(1, c // cfg.head_channels)
    attn.append(2 * heads * hw[-1] ** 2 + 5 * c * hw[-1])
    work.append((7 * c + spade) * hw[-1])
    for lv in reversed(range(n_levels)):
        out = cfg.channels[lv]
        for _ in range(cfg.num_res_blocks + 1):
            cin = c + skip_ch.pop()
            # cat input, norm/silu of it, SPADE hidden + gamma + beta (on cin), conv outputs (out)
            work.append((3 * cin + 4 * out + (spade + 3 * cin if cond else 0)) * hw[lv])
            if lv in cfg.attention_levels:
                heads = max(1, out // cfg.head_channels)
                attn.append(2 * heads * hw[lv] ** 2 + 5 * out * hw[lv])
            c = out
    elems = sum(skips) + max(max(work), max(attn))
    return int(FORWARD_MARGIN * 4 * batch * elems + ALLOCATOR_BYTES)


@functools.lru_cache(maxsize=32)  # plan_windows asks once per candidate window batch
def weights_bytes(cfg: UNetConfig) -> int:
    """Bytes of the float32 weights of a U-Net `cfg` (built on the meta device: nothing allocated)."""
    import torch

    from engine.unet import UNet, count_parameters

    with torch.device("meta"):
        return 4 * count_parameters(UNet(cfg))


@dataclass(frozen=True)
class Plan:
    """How a sampling call will run: windows per forward, its estimated peak, the budget."""

    window_batch: int
    estimate: int
    budget: int

    def describe(self) -> str:
        return f"about {self.estimate / GiB:.2f} GiB of a {self.budget / GiB:.1f} GiB budget"

    @property
    def cache_bytes(self) -> int:
        """What the budget leaves beyond the estimate, for the condition's SPADE modulation (at most
        MAX_CONDITION_CACHE_BYTES): the job stays within its budget."""
        return max(0, min(MAX_CONDITION_CACHE_BYTES, self.budget - self.estimate))


def job_bytes(cfg: UNetConfig, canvas: tuple[int, int], tile: tuple[int, int], window_batch: int, *,
              guided: bool, canvases: int | None = 1, watershed: bool = False) -> int:
    """Estimated peak resident bytes of sampling `canvases` canvases of (H, W) px in windows of `tile`
    (canvases=None: one canvas per window, a batch of whole samples)."""
    h, w = canvas
    canvases = window_batch if canvases is None else canvases
    fwd = forward_bytes(cfg, window_batch * (2 if guided else 1), *tile)
    canvas_b = canvases * CANVAS_COPIES * 4 * max(cfg.in_channels, 3) * h * w
    post = WATERSHED_BYTES_PER_PX * h * w if watershed else 0
    return int(RUNTIME_BYTES + weights_bytes(cfg) + fwd + SAFETY * canvas_b + post)


def plan_windows(cfg: UNetConfig, canvas: tuple[int, int], tile: tuple[int, int], *, guided: bool,
                 max_window_batch: int, budget_gb: float | None = None, canvases: int | None = 1,
                 watershed: bool = False, what: str = "canvas", device=None) -> Plan:
    """The largest window batch <= max_window_batch whose estimate fits the budget, or MemoryBudgetError.

    device: where the model sits; on a GPU the budget is at most DEVICE_FRACTION of its memory.
    """
    budget = int(check_budget_gb(budget_gb) * GiB)
    on_device = device_memory_bytes(device) if device is not None else None
    gpu_bound = on_device is not None and int(DEVICE_FRACTION * on_device) < budget
    if gpu_bound:
        budget = int(DEVICE_FRACTION * on_device)
    for wb in range(max(1, int(max_window_batch)), 0, -1):
        est = job_bytes(cfg, canvas, tile, wb, guided=guided, canvases=canvases, watershed=watershed)
        if est <= budget:
            return Plan(wb, est, budget)
    h, w = canvas
    if gpu_bound:
        raise MemoryBudgetError(
            f"a {h}x{w} px {what} needs about {est / GiB:.1f} GiB, more than the {budget / GiB:.1f} GiB this "
            f"GPU can give a job ({DEVICE_FRACTION:.0%} of its {on_device / GiB:.1f} GiB): choose a smaller size, "
            f"or sample on the CPU (--device cpu)")
    raise MemoryBudgetError(
        f"a {h}x{w} px {what} needs about {est / GiB:.1f} GiB, more than the memory budget of "
        f"{budget / GiB:.1f} GiB: choose a smaller size, or raise the budget (--max-memory-gb)")
