"""Server-side state shared by the tabs: the app context, per-session work, the curation basket.

Everything a user builds lives on the server, keyed by a session id that the browser keeps in
localStorage (gr.BrowserState), so a page reload finds the same session. The basket is also written
to disk under ``<work_dir>/sessions/<sid>/basket`` so it survives errors and server restarts.
API clients without a browser id use Gradio's session hash instead.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import numpy as np

from engine.errors import NuDiffError
from engine.fileio import atomic_output, atomic_write_bytes
from engine.samplers import Cancelled

log = logging.getLogger("nudiff_app")

_SID = re.compile(r"^[A-Za-z0-9_-]{6,64}$")


# ----------------------------------------------------------------------------- errors at the UI boundary


def warn(message: str) -> str:
    """Show a toast and return the same text formatted for a status Markdown."""
    gr.Warning(message)
    return f"**Error:** {message}"


def ui_action(n_outputs: int, status_index: int = 0) -> Callable:
    """Decorator for event handlers: NuDiffError -> readable message, anything else -> short message
    plus the traceback in the server log. Other outputs are left unchanged (gr.skip())."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Cancelled:
                msg = "Cancelled."
                gr.Info(msg)
            except NuDiffError as e:
                msg = warn(str(e))
            except Exception as e:  # noqa: BLE001 - the UI boundary
                log.exception("unexpected error in %s", fn.__name__)
                msg = warn(f"Unexpected error ({type(e).__name__}: {str(e)[:200]}). Details are in the server log.")
            out = [gr.skip()] * n_outputs
            out[status_index] = msg
            return out[0] if n_outputs == 1 else tuple(out)

        return wrapper

    return deco


# ----------------------------------------------------------------------------- basket


@dataclass
class BasketItem:
    id: str
    status: str  # "pending" | "accepted" | "rejected"
    meta: dict
    added: float = field(default_factory=time.time)


class Basket:
    """Curated synthetic pairs, stored as one .npz per pair plus an index JSON (atomic writes)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.items: list[BasketItem] = []
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._load()

    def _index_path(self) -> Path:
        return self.folder / "basket.json"

    def _load(self) -> None:
        try:
            data = json.loads(self._index_path().read_text())
            self.items = [BasketItem(**d) for d in data]
        except FileNotFoundError:
            self.items = []
        except (OSError, ValueError, TypeError):
            log.exception("basket index %s unreadable; starting empty", self._index_path())
            self.items = []
        self.items = [it for it in self.items if (self.folder / f"{it.id}.npz").exists()]

    def _save_index(self) -> None:
        atomic_write_bytes(self._index_path(), json.dumps([it.__dict__ for it in self.items], indent=1).encode())

    def add(self, image: np.ndarray, inst: np.ndarray, meta: dict, status: str = "pending") -> BasketItem:
        self.folder.mkdir(parents=True, exist_ok=True)
        n = 1 + max([int(it.id.split("_")[-1]) for it in self.items if it.id.split("_")[-1].isdigit()] or [0])
        item = BasketItem(f"pair_{n:04d}", status, dict(meta))
        with atomic_output(self.folder / f"{item.id}.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, image=np.asarray(image, np.uint8), inst=np.asarray(inst, np.int32))
        self.items.append(item)
        self._arrays[item.id] = (np.asarray(image, np.uint8), np.asarray(inst, np.int32))
        self._save_index()
        return item

    def arrays(self, item_id: str) -> tuple[np.ndarray, np.ndarray]:
        if item_id not in self._arrays:
            with np.load(self.folder / f"{item_id}.npz") as z:
                self._arrays[item_id] = (z["image"], z["inst"])
        return self._arrays[item_id]

    def set_status(self, index: int, status: str) -> BasketItem:
        item = self.items[index]
        item.status = status
        self._save_index()
        return item

    def remove(self, index: int) -> None:
        item = self.items.pop(index)
        self._save_index()
        self._arrays.pop(item.id, None)
        (self.folder / f"{item.id}.npz").unlink(missing_ok=True)

    def counts(self) -> dict[str, int]:
        c = {"pending": 0, "accepted": 0, "rejected": 0}
        for it in self.items:
            c[it.status] = c.get(it.status, 0) + 1
        return c


# ----------------------------------------------------------------------------- session


@dataclass
class Current:
    """The structure being edited / synthesized from: the instance map, where it came from, and the
    sampled 3-channel structure while the map is as sampled (None after a hand edit, or for an uploaded or
    blank map: then engine.conditioning rebuilds it from the map and says so in the provenance)."""

    inst: np.ndarray
    meta: dict  # engine.conditioning.ORIGIN_KEYS, edited
    structure: np.ndarray | None = None

    def condition(self):
        """The engine.conditioning.Condition an image is synthesized from."""
        from engine.conditioning import ORIGIN_KEYS, Condition

        origin = {k: self.meta[k] for k in ORIGIN_KEYS if self.meta.get(k) is not None}
        return Condition.of(self.inst, self.structure, origin, edited=bool(self.meta.get("edited")))

    def replace(self, inst: np.ndarray) -> tuple:
        """Put a hand-edited map in place; returns the undo entry (inst, structure, edited) of the old one."""
        entry = (self.inst, self.structure, bool(self.meta.get("edited")))
        self.inst, self.structure = np.asarray(inst, np.int32), None
        self.meta["edited"] = True
        return entry

    def restore(self, entry: tuple) -> None:
        """Undo: the map, its sampled structure (if it had one) and its edited flag as they were."""
        self.inst, self.structure, self.meta["edited"] = entry


@dataclass
class Result:
    image: np.ndarray
    inst: np.ndarray
    meta: dict


class Session:
    """One user's work: sampled structures, the current structure and its undo stack, synthesized
    results, the basket, and a cancel flag for the running job."""

    MAX_UNDO = 50

    def __init__(self, sid: str, folder: Path):
        self.sid = sid
        self.folder = folder
        self.lock = threading.RLock()
        self.cancel = threading.Event()
        self.samples: list = []  # engine.pipeline.StructureSample
        self.sample_meta: dict = {}
        self.selected_sample: int | None = None
        self.current: Current | None = None
        self.undo: list[tuple] = []  # Current.replace entries, oldest first
        self.results: list[Result] = []
        self.selected_result: int | None = None
        self.basket = Basket(folder / "basket")
        self.selected_pair: int = 0
        self.last_export: Path | None = None

    def set_current(self, inst: np.ndarray, meta: dict, *, structure: np.ndarray | None = None,
                    keep_undo: bool = False) -> None:
        with self.lock:
            if not keep_undo:
                self.undo = []
            self.current = Current(np.asarray(inst, np.int32), dict(meta), structure)

    def replace_current(self, inst: np.ndarray, max_undo: int | None = None) -> None:
        """A hand edit of the current map, undoable (at most max_undo, default MAX_UNDO, steps kept)."""
        if self.current is not None:
            self.undo.append(self.current.replace(inst))
            del self.undo[: -min(self.MAX_UNDO, max_undo or self.MAX_UNDO)]


# ----------------------------------------------------------------------------- app context


class AppContext:
    """Paths, default checkpoints, a model cache and the session registry."""

    def __init__(self, work_dir: str | os.PathLike, structure_checkpoint: str | os.PathLike | None = None,
                 image_checkpoint: str | os.PathLike | None = None, max_memory_gb: float | None = None,
                 precision: str = "auto"):
        from engine.memory import check_budget_gb
        from engine.pipeline import check_precision
        from engine.tiling import TilingOptions

        self.work_dir = Path(work_dir).expanduser().resolve()
        self.max_memory_gb = check_budget_gb(max_memory_gb)
        self.precision = check_precision(precision)  # what every sampling job computes in (load_model's)
        self.tiling = TilingOptions(max_memory_gb=self.max_memory_gb)
        self._worker = None
        self._worker_lock = threading.Lock()
        for sub in ("runs", "uploads", "exports", "sessions"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        self._defaults = (structure_checkpoint, image_checkpoint)
        self._models: dict[tuple, Any] = {}
        self._model_lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()
        from nudiff_app.jobs import TrainingJobs

        self.jobs = TrainingJobs(self.runs_dir)

    @property
    def worker(self):
        """The process that runs sampling jobs (engine.worker): out of memory ends the job, not the studio."""
        from engine.worker import ComputeWorker

        with self._worker_lock:
            if self._worker is None:
                self._worker = ComputeWorker(self.max_memory_gb, precision=self.precision)
            return self._worker

    def close(self) -> None:
        """Stop the worker and any training job (app shutdown, tests)."""
        with self._worker_lock:
            w, self._worker = self._worker, None
        if w is not None:
            w.close()
        self.jobs.kill()

    @property
    def runs_dir(self) -> Path:
        return self.work_dir / "runs"

    @property
    def uploads_dir(self) -> Path:
        return self.work_dir / "uploads"

    @property
    def exports_dir(self) -> Path:
        return self.work_dir / "exports"

    def secret(self) -> str:
        """A stable secret for the browser-side session key (kept in the work folder)."""
        p = self.work_dir / ".browser_secret"
        try:
            return p.read_text().strip()
        except FileNotFoundError:
            value = uuid.uuid4().hex
            p.write_text(value)
            return value

    # --- checkpoints ---------------------------------------------------------------------------

    def default_checkpoint(self, kind: str) -> Path:
        i = 0 if kind == "structure" else 1
        if self._defaults[i] is None:
            from engine.demo import default_checkpoints

            s, im = default_checkpoints()
            self._defaults = (self._defaults[0] or s, self._defaults[1] or im)
        return Path(self._defaults[i])

    def list_checkpoints(self, kind: str) -> list[tuple[str, str]]:
        """(label, path) choices: the default model first, then finished runs' model.json of this kind."""
        out: list[tuple[str, str]] = []
        try:
            d = self.default_checkpoint(kind)
            out.append((f"default: {d.stem}", str(d)))
        except Exception as e:  # noqa: BLE001 - listing must never break the UI
            log.warning("no default %s checkpoint: %s", kind, e)
        for rec in sorted(self.runs_dir.glob("**/model.json")):
            try:
                data = json.loads(rec.read_text())
            except (OSError, ValueError):
                continue
            if data.get("kind") == kind:
                rel = rec.parent.relative_to(self.runs_dir)
                out.append((f"{rel} (step {data.get('step', '?')})", str(rec)))
        return out

    def model(self, path: str | os.PathLike | None, kind: str):
        """Load (cached) a checkpoint for sampling; CheckpointError if missing or of the wrong kind."""
        from engine.checkpoint import checkpoint_paths
        from engine.errors import CheckpointError
        from engine.pipeline import load_model

        if not path:
            path = self.default_checkpoint(kind)
        weights, record = checkpoint_paths(str(path).strip())
        try:
            key = (str(record.resolve()), record.stat().st_mtime_ns, weights.stat().st_mtime_ns)
        except OSError:
            key = None
        with self._model_lock:
            m = self._models.get(key) if key else None
            if m is None:
                m = load_model(record, device="auto", precision=self.precision)
                if key:
                    self._models = {k: v for k, v in self._models.items() if k[0] != key[0]}
                    self._models[key] = m
        if m.kind != kind:
            raise CheckpointError(f"{m.path.name} is a {m.kind} model, but {'an' if kind[0] in 'aeiou' else 'a'} "
                                  f"{kind} model is needed here")
        return m

    def checkpoint_name(self, model) -> str:
        """How a loaded model is named in the UI and the manifest: run-relative path or file name."""
        try:
            return str(Path(model.path).resolve().relative_to(self.runs_dir))
        except ValueError:
            return Path(model.path).name

    # --- sessions --------------------------------------------------------------------------------

    def session(self, sid: str | None, request: gr.Request | None = None) -> Session:
        key = sid if sid and _SID.match(str(sid)) else None
        if key is None:
            key = getattr(request, "session_hash", None) or "default"
            key = re.sub(r"[^A-Za-z0-9_-]", "", str(key))[:64] or "default"
        with self._sessions_lock:
            s = self._sessions.get(key)
            if s is None:
                s = Session(key, self.work_dir / "sessions" / key)
                self._sessions[key] = s
            return s

    def new_sid(self) -> str:
        return uuid.uuid4().hex
