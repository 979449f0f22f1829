"""Numeric precision: where bf16 autocast is worth it (training and sampling share the rule).

bf16 autocast is used on a GPU and on a CPU where oneDNN runs bf16 natively (AVX512-BF16 or AMX); elsewhere
bf16 is emulated and slower than fp32, so fp32 is used. Measured on the cpu preset: training 1.4-1.6x, a
sampling forward about 1.9x as fast as fp32 on an AVX512-BF16 CPU (docs/benchmarks.md §2, §3).
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = ["PRECISIONS", "cpu_has_native_bf16", "resolve_precision", "bf16_is_fast", "machine_description"]

PRECISIONS = ("auto", "fp32")  # sampling precision: bf16 autocast where it is fast, or always fp32


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 autocast speeds up a network on ``device``: CUDA, or a CPU with native bf16."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16())


def resolve_precision(mixed_precision: str) -> str:
    """accelerate's mixed_precision for a TrainConfig value: "auto" is bf16 autocast on a GPU and on a CPU
    with native bf16, fp32 ("no") on other CPUs; any other value is returned as given."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if bf16_is_fast("cuda" if torch.cuda.is_available() else "cpu") else "no"


def _cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else platform's guess, else "unknown CPU"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description(device: torch.device | str) -> str:
    """One line naming what computes on ``device``, for a checkpoint's record: the same commands give other
    bits on another CPU or GPU (bf16 kernels differ by instruction set), so a record says where it was made.
    E.g. "cpu: AMD EPYC (AVX512, native bf16), torch 2.13.0" or "cuda: NVIDIA H200, torch 2.13.0, CUDA 12.8"."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return (f"cuda: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    isa = torch.backends.cpu.get_cpu_capability()
    bf16 = ", native bf16" if cpu_has_native_bf16() else ""
    return f"{dev.type}: {_cpu_name()} ({isa}{bf16}), torch {torch.__version__}"
