"""A ledger of finished segmenter runs, kept in the repository, so that a long experiment outlives its work folder.

bench/table1_monuseg.py keeps its models, pairs and snapshots in a work folder outside the repository
(hundreds of MB), which is lost whenever a session's machine is not kept. What a finished run adds to the
table is small: one metrics.json. The runner therefore writes each finished run into a ledger folder that is
committed with the code, as ``<run>.json``::

    {"run": "10pct_augmented_r0", "job": "segmenter 10% augmented r0",
     "chain": sha256 of every command the run came from (its own and those it waited on, transitively, with the
              work folder, the interpreter and the repository written as WORK, PY and ROOT) and of the
              training and test images,
     "metrics": the run's metrics.json, "models": the diffusion models' files and sha256 (augmented runs)}

On the next call every run whose chain is unchanged is restored into the work folder and counts as done, and
a job that no unfinished run needs (a fraction's trainings and pairs once all its augmented runs are in the
ledger) is not run. A chain that changed in any command or image is run again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol, Sequence


class _Job(Protocol):  # bench.table1_monuseg.Job
    name: str
    cmd: list[str]
    after: list[str]


def normalise(cmd: Sequence[str], subs: dict[str, str]) -> list[str]:
    """``cmd`` with each key of ``subs`` replaced by its value in every argument, longest key first (so that
    an interpreter inside the repository becomes PY, not ROOT/...)."""
    keys = sorted((k for k in subs if k), key=len, reverse=True)
    out = []
    for arg in cmd:
        for k in keys:
            arg = arg.replace(k, subs[k])
        out.append(arg)
    return out


def ancestors(jobs: Sequence[_Job], name: str) -> list[_Job]:
    """The jobs ``name`` waits on, directly or through others, in plan order."""
    by_name = {j.name: j for j in jobs}
    found: set[str] = set()
    todo = list(by_name[name].after)
    while todo:
        n = todo.pop()
        if n not in found:
            found.add(n)
            todo.extend(by_name[n].after)
    return [j for j in jobs if j.name in found]


def chain_fingerprint(jobs: Sequence[_Job], name: str, subs: dict[str, str], context: dict[str, Any]) -> str:
    """sha256 of job ``name``'s command and those of every job it waits on (normalised), and ``context``
    (e.g. fingerprints of the training and test images)."""
    by_name = {j.name: j for j in jobs}
    cmds = sorted(json.dumps(normalise(j.cmd, subs)) for j in [*ancestors(jobs, name), by_name[name]])
    return hashlib.sha256(json.dumps({"commands": cmds, "context": context}, sort_keys=True).encode()).hexdigest()


def read_entry(ledger: Path, run: str) -> dict[str, Any] | None:
    """The ledger's entry of ``run``, or None when there is none or it is unreadable."""
    try:
        entry = json.loads((ledger / f"{run}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("metrics"), dict) else None


def write_entry(ledger: Path, run: str, job: str, chain: str, metrics: dict[str, Any],
                models: dict[str, Any] | None = None) -> Path:
    """Write ``run``'s entry (atomically: a crash leaves the old entry or the new one)."""
    from engine.fileio import atomic_write_bytes

    ledger.mkdir(parents=True, exist_ok=True)
    entry = {"run": run, "job": job, "chain": chain, "metrics": metrics}
    if models:
        entry["models"] = models
    path = ledger / f"{run}.json"
    atomic_write_bytes(path, (json.dumps(entry, indent=1, sort_keys=True) + "\n").encode())
    return path


def restore(ledger: Path, runs: dict[str, str], chains: dict[str, str], runs_dir: Path,
            write: bool = True) -> dict[str, dict[str, Any]]:
    """Entries of the jobs in ``runs`` ({job name: run name}) whose recorded chain is ``chains[job]``, by job
    name; with ``write`` each one's metrics is written to ``runs_dir/<run>/metrics.json`` (where it differs)."""
    from engine.fileio import atomic_write_bytes

    found = {}
    for job, run in runs.items():
        entry = read_entry(ledger, run)
        if entry is None or entry.get("chain") != chains.get(job):
            continue
        found[job] = entry
        if write:
            data = json.dumps(entry["metrics"], indent=2).encode()
            path = runs_dir / run / "metrics.json"
            if not path.is_file() or path.read_bytes() != data:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data)
    return found


def weights(models: dict[str, Any] | None) -> tuple[str, str] | None:
    """(structure, image) sha256 of the diffusion models' weights (model.safetensors) that an augmented run's
    ``models`` record names; None without a record. The model.json files are left out: they hold a time."""
    try:
        return models["structure"]["model.safetensors"]["sha256"], models["image"]["model.safetensors"]["sha256"]
    except (KeyError, TypeError):
        return None


def trainings(entries: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    """The runs of ``entries`` grouped by the model weights they came from (:func:`weights`), in order of first
    appearance; entries without a models record are left out. More than one group for a fraction means its
    models were trained again between its runs (a new machine) and came out with other bits."""
    groups: dict[tuple[str, str], list[str]] = {}
    for e in entries:
        key = weights(e.get("models"))
        if key is not None:
            groups.setdefault(key, []).append(str(e.get("run")))
    return groups


def needed(jobs: Sequence[_Job], done: set[str], targets: set[str]) -> list[_Job]:
    """The jobs still worth running: the ``targets`` not in ``done`` and every job they wait on; plus the
    ``done`` targets themselves (so that they are reported), in plan order."""
    keep = set(done)
    for name in targets - done:
        keep.add(name)
        keep.update(j.name for j in ancestors(jobs, name))
    return [j for j in jobs if j.name in keep]
