"""Sampling jobs in a child process, so that running out of memory ends the job, not the caller.

The studio sends every heavy sampling call (structures, images) to one long-lived child process. The
child keeps the models it has loaded, reports progress, honours cancel, and watches its own resident
memory: past the job's budget it exits at once (status :data:`EXIT_OVER_BUDGET`), and the kernel's OOM
killer is told to pick it first (oom_score_adj). Either way the parent raises a one-line
:class:`WorkerError` and starts a fresh child for the next job. Results come back through a
multiprocessing queue (in-memory arrays of our own processes; no user file is ever unpickled).

While no job runs the parent does nothing (no polling) and the child blocks on its queue.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from engine.errors import CheckpointError, DataError, NuDiffError
from engine.memory import GiB, MemoryBudgetError, check_budget_gb

__all__ = ["ComputeWorker", "WorkerError", "EXIT_OVER_BUDGET", "rss_bytes"]

EXIT_OVER_BUDGET = 75
_ERRORS = {"MemoryBudgetError": MemoryBudgetError, "CheckpointError": CheckpointError, "DataError": DataError}


class WorkerError(NuDiffError):
    """The job's process ended before finishing (out of memory, killed); the caller keeps running."""


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ----------------------------------------------------------------------------- child side


def _load(models: dict, path: str, kind: str, device: str, precision: str):
    from engine.checkpoint import checkpoint_paths
    from engine.pipeline import load_model

    weights, record = checkpoint_paths(path)
    try:
        key = (str(record.resolve()), record.stat().st_mtime_ns, weights.stat().st_mtime_ns, kind)
    except OSError:
        key = None
    m = models.get(key) if key else None
    if m is None:
        m = load_model(record, kind=kind, device=device, precision=precision)
        models.clear()  # keep one model per kind at most: memory stays bounded across jobs
        if key:
            models[key] = m
    return m


def _task_sample_structures(models, device, precision, kw, progress, cancel):
    from engine.pipeline import sample_structures

    model = _load(models, kw.pop("checkpoint"), "structure", device, precision)
    return sample_structures(model, progress=progress, cancel=cancel, **kw)


def _task_synthesize(models, device, precision, kw, progress, cancel):
    from engine.pipeline import synthesize

    model = _load(models, kw.pop("checkpoint"), "image", device, precision)
    if kw.get("colour_prior") == "model":  # the colours stored with the model (engine.colour_prior)
        kw["colour_prior"] = model.stored_colours()
    return synthesize(model, progress=progress, cancel=cancel, **kw)


def _task_rss(models, device, precision, kw, progress, cancel):
    """Test hook: allocate `mb` MiB and hold it for `seconds` (checks the memory watchdog); or ask torch's
    allocator for `torch_bytes` at once (checks that a failed allocation is reported as the size's fault)."""
    import numpy as np

    if "torch_bytes" in kw:
        import torch

        return torch.empty(int(kw["torch_bytes"]), dtype=torch.uint8).numel()
    block = np.ones(int(kw["mb"]) * 1024 * 1024 // 8)
    deadline = time.time() + float(kw.get("seconds", 2))
    while time.time() < deadline:
        time.sleep(0.05)
    return float(block[0])


TASKS: dict[str, Callable] = {"sample_structures": _task_sample_structures, "synthesize": _task_synthesize,
                              "allocate": _task_rss}


def _watchdog(cap: int, interval: float = 0.2) -> None:
    while True:
        if rss_bytes() > cap:
            sys.stderr.write(f"nudiff worker: resident memory over the budget of {cap / GiB:.1f} GiB; exiting\n")
            sys.stderr.flush()
            os._exit(EXIT_OVER_BUDGET)
        time.sleep(interval)


def _child(requests, responses, cancel_event, cap: int, device: str, precision: str) -> None:
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")  # the OOM killer takes this process first
    except OSError:
        pass
    threading.Thread(target=_watchdog, args=(cap,), daemon=True).start()
    from engine.memory import is_out_of_memory, reuse_freed_memory
    from engine.samplers import Cancelled

    reuse_freed_memory()

    models: dict = {}
    while True:
        msg = requests.get()
        if msg is None:
            return
        job, task, kwargs = msg
        last = [0.0]

        def progress(i, n, job=job):
            now = time.monotonic()
            if now - last[0] >= 0.1 or i >= n:  # at most ~10 messages a second
                last[0] = now
                responses.put(("progress", job, int(i), int(n)))

        try:
            result = TASKS[task](models, device, precision, dict(kwargs), progress, cancel_event.is_set)
            responses.put(("done", job, result))
        except Cancelled:
            responses.put(("cancelled", job))
        except NuDiffError as e:
            responses.put(("error", job, type(e).__name__, str(e)))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which logs it
            if is_out_of_memory(e):  # MemoryError, a GPU's or the CPU allocator's: the size, not a bug
                responses.put(("error", job, "MemoryBudgetError", "the job ran out of memory; choose a smaller size"))
            else:
                responses.put(("crash", job, f"{type(e).__name__}: {e}", traceback.format_exc()))


# ----------------------------------------------------------------------------- parent side


class ComputeWorker:
    """Runs :data:`TASKS` in one child process (started on first use, restarted after a death).

    max_memory_gb: the child's resident-memory cap in GiB (default engine.memory.default_budget_gb());
    device, precision: where and in what the child samples (engine.pipeline.load_model's arguments).
    One job at a time; callers from several threads queue on a lock.
    """

    def __init__(self, max_memory_gb: float | None = None, device: str = "auto", precision: str = "auto"):
        from engine.pipeline import check_precision

        self.budget_gb = check_budget_gb(max_memory_gb)
        self.device = device
        self.precision = check_precision(precision)
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._lock = threading.Lock()
        self._jobs = itertools.count(1)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def _start(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self._requests, self._responses = self._ctx.Queue(), self._ctx.Queue()
        self._cancel = self._ctx.Event()
        cap = int(self.budget_gb * GiB)
        self._proc = self._ctx.Process(target=_child, args=(self._requests, self._responses, self._cancel, cap,
                                                            self.device, self.precision),
                                      daemon=True, name="nudiff-worker")
        self._proc.start()

    def start(self) -> "ComputeWorker":
        """Start the child now (it is started on the first job otherwise)."""
        with self._lock:
            self._start()
        return self

    def _died(self) -> WorkerError:
        code = self._proc.exitcode
        self._proc = None
        if code == EXIT_OVER_BUDGET:
            return WorkerError(f"the job was stopped: it needed more than the memory budget of "
                               f"{self.budget_gb:.1f} GiB (choose a smaller size, or raise --max-memory-gb); "
                               f"the studio keeps running")
        if code is not None and code < 0 and -code == 9:
            return WorkerError("the job was stopped by the system, most likely out of memory; the studio keeps "
                               "running: try a smaller size")
        return WorkerError(f"the job's process ended unexpectedly (exit status {code}); the studio keeps running")

    def run(self, task: str, kwargs: dict[str, Any], *, progress: Callable[[int, int], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> Any:
        """Run `task` with `kwargs` in the child; returns its result or raises its error here."""
        from engine.samplers import Cancelled

        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        with self._lock:
            self._start()
            self._cancel.clear()
            job = next(self._jobs)
            self._requests.put((job, task, kwargs))
            while True:
                if cancel is not None and cancel():
                    self._cancel.set()
                try:
                    msg = self._responses.get(timeout=0.1)
                except queue.Empty:
                    if not self._proc.is_alive():
                        raise self._died() from None
                    continue
                if msg[1] != job:
                    continue
                kind = msg[0]
                if kind == "progress":
                    if progress is not None:
                        progress(msg[2], msg[3])
                elif kind == "done":
                    return msg[2]
                elif kind == "cancelled":
                    raise Cancelled("cancelled")
                elif kind == "error":
                    raise _ERRORS.get(msg[2], NuDiffError)(msg[3])
                else:  # crash: a bug, not the user's fault
                    sys.stderr.write(msg[3])
                    raise RuntimeError(msg[2])

    def close(self) -> None:
        with self._lock:
            p = self._proc
            self._proc = None
        if p is None:
            return
        try:
            self._requests.put(None)
            p.join(5)
        except (OSError, ValueError):
            pass
        if p.is_alive():
            p.kill()
            p.join(5)
