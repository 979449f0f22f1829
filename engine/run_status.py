"""A training run's progress record, ``RUN/status.json``: what the trainer is doing, read by the CLI, the
studio and the table runner.

Keys written by the trainer: ``state`` ("running", "finished", "stopped", "failed"), ``kind``, ``step``,
``total``, ``loss``, ``message``, ``reason`` (why a run stopped, e.g. "time_limit"); :func:`write_status`
adds ``updated``, ``pid``, ``pid_start``, ``host`` and ``run_dir``. The file is replaced atomically.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from engine.fileio import atomic_write_bytes
from engine.runlock import host_name, process_running, process_start

__all__ = ["read_status", "write_status", "budget_reached"]


def _status_owner_gone(status: dict) -> bool:
    """Whether the process that wrote a status is known to be gone (only judged on its own host)."""
    if status.get("host") and status["host"] != host_name():
        return False
    if not status.get("pid"):
        return False
    return not process_running(status["pid"], status.get("pid_start"))


def read_status(run_dir: str | os.PathLike) -> dict:
    """The run's status.json, or {} when there is none yet.

    A status that says "running" although the process that wrote it is gone (killed) reads as
    ``state: "interrupted"``, with a message saying so.
    """
    p = Path(run_dir) / "status.json"
    try:
        status = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(status, dict):
        return {}
    if status.get("state") == "running" and _status_owner_gone(status):
        status = {**status, "state": "interrupted", "message": (
            f"interrupted at step {status.get('step', 0)}: the training process {status.get('pid')} ended "
            f"without saving (killed?); run again to resume from the last checkpoint")}
    return status


def budget_reached(run_dir: str | os.PathLike) -> bool:
    """Whether the run's last training ended on its budget: all its steps ("finished") or its time limit
    ("stopped", reason "time_limit"), rather than a stop request, SIGTERM, a crash or a kill. A run that ended
    otherwise has exported the model it had, but resuming it trains on."""
    status = read_status(run_dir)
    if status.get("state") == "finished":
        return True
    if status.get("state") != "stopped":
        return False
    reason = status.get("reason")
    if reason is None:  # statuses written before the reason was recorded
        return "(time limit)" in str(status.get("message", ""))
    return reason == "time_limit"


def write_status(run_dir: str | os.PathLike, status: dict) -> None:
    """Atomically replace the run's status.json (adds 'updated', 'pid', 'pid_start' and 'host')."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    status = {**status, "updated": time.time(), "pid": pid, "pid_start": process_start(pid),
              "host": host_name(), "run_dir": str(run_dir)}
    atomic_write_bytes(run_dir / "status.json", json.dumps(status).encode())
