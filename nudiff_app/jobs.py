"""Training jobs as background subprocesses (`python -m engine train-structure|train-image`).

The source of truth is the run folder on disk (status.json, log.jsonl, previews/latest.png, process.log),
so the Train tab shows the same thing after a browser reload or an app restart. ``runs/active.json`` names
the run folder of the last job started. One job runs at a time. The problems the trainer finds in its data
folder (files skipped or used with a caveat: engine.data's Problems, one ``[error] ...`` / ``[warning] ...``
line each in process.log) are part of the job's report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine.errors import TrainingError
from engine.fileio import atomic_write_bytes
from engine.runlock import busy_message, lock_holder
from engine.run_status import read_status

REPO_ROOT = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    try:  # a zombie or a recycled pid is not our trainer
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        cmd = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
        return b"engine" in cmd
    except (OSError, IndexError):
        return True


class TrainingJobs:
    def __init__(self, runs_dir: Path):
        self.runs_dir = Path(runs_dir)
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.start_lock = threading.Lock()

    # --- paths -------------------------------------------------------------------------------------

    def run_dir(self, run_name: str, kind: str) -> Path:
        name = (run_name or "").strip()
        if not _NAME.match(name):
            raise TrainingError("run name: use letters, digits, '-', '_' or '.' (up to 64 characters)")
        return self.runs_dir / name / kind

    def active(self) -> dict:
        try:
            return json.loads((self.runs_dir / "active.json").read_text())
        except (OSError, ValueError):
            return {}

    # --- state ---------------------------------------------------------------------------------------

    def running(self) -> dict | None:
        """The active job's record if its process is alive, else None."""
        with self.lock:
            if self.proc is not None:
                if self.proc.poll() is None:
                    return self.active()
                self.proc = None
        act = self.active()
        if act and _pid_alive(act.get("pid")):
            return act
        if act:  # a trainer started by an earlier app instance, reported by its status file
            st = read_status(act.get("run_dir", ""))
            if st.get("state") == "running" and _pid_alive(st.get("pid")):
                return act
        return None

    def start(self, kind: str, *, data: str, run_name: str, preset: str, image_size: int | None,
              fraction: float, steps: int, finetune_steps: int, batch_size: int,
              init_from: str | None = None) -> dict:
        """Launch `python -m engine train-<kind>` in the background; init_from: fine-tune that checkpoint
        (its preset and tile size then replace `preset` and `image_size`)."""
        if kind not in ("structure", "image"):
            raise TrainingError(f"unknown model kind {kind!r}")
        if not data or not Path(data).is_dir():
            raise TrainingError(f"training data folder not found: {data or '(none)'} - inspect a folder first")
        if steps < 1 or batch_size < 1:
            raise TrainingError("steps and batch size must be at least 1")
        if finetune_steps < 0:
            raise TrainingError("fine-tune steps must be 0 or more")
        if image_size is not None and not init_from:
            from engine.config import preset as preset_config

            try:
                preset_config(preset, kind, int(image_size))
            except ValueError as e:
                raise TrainingError(f"tile size {image_size} px does not suit preset {preset!r}: {e}") from None
        run_dir = self.run_dir(run_name, kind)
        from engine.data import find_pairs

        find_pairs(data)  # a folder without images/ + labels/ pairs is refused before any run folder is made
        args = ["--data", str(Path(data).resolve()), "--run-dir", str(run_dir),
                "--steps", str(int(steps)), "--batch-size", str(int(batch_size)), "--fraction", f"{fraction:g}"]
        if init_from:
            args += ["--init-from", str(init_from)]
        else:
            args += ["--preset", preset] + (["--image-size", str(int(image_size))] if image_size else [])
        if kind == "image":
            args += ["--finetune-steps", str(int(finetune_steps))]
        every = max(1, min(500, int(steps) // 10 or 1))
        args += ["--save-every", str(every * 5), "--preview-every", str(every * 5), "--log-every",
                 str(max(1, min(10, every))), "--quiet"]
        cmd = [sys.executable, "-m", "engine", f"train-{kind}", *args]
        return self._launch(run_dir, kind, cmd)

    def resume(self) -> dict:
        act = self.active()
        if not act or not act.get("cmd"):
            raise TrainingError("no training run to resume yet")
        st = read_status(act["run_dir"])
        if st.get("state") == "finished":
            raise TrainingError(f"{act['run_dir']} already finished; start a new run or raise the steps")
        return self._launch(Path(act["run_dir"]), act["kind"], act["cmd"])

    def _launch(self, run_dir: Path, kind: str, cmd: list[str]) -> dict:
        with self.start_lock:
            busy = self.running()
            if busy:
                raise TrainingError(f"a {busy.get('kind', '')} training job is already running "
                                    f"({busy.get('run_dir')}); stop it or wait until it finishes")
            owner = lock_holder(run_dir)  # e.g. a CLI trainer on the same folder
            if owner:
                raise TrainingError(busy_message(run_dir, owner))
            return self._spawn(run_dir, kind, cmd)

    def _spawn(self, run_dir: Path, kind: str, cmd: list[str]) -> dict:
        with self.lock:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "STOP").unlink(missing_ok=True)
            logf = open(run_dir / "process.log", "ab")
            log_offset = logf.tell()  # this launch's output starts here (a resumed run appends)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
            self.proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            logf.close()
            rec = {"run_dir": str(run_dir), "kind": kind, "cmd": cmd, "pid": self.proc.pid,
                   "started": time.time(), "log_offset": log_offset}
            atomic_write_bytes(self.runs_dir / "active.json", json.dumps(rec, indent=1).encode())
            return rec

    def stop(self) -> str:
        act = self.running()
        if not act:
            return "No training job is running."
        Path(act["run_dir"], "STOP").touch()
        return f"Asked {act['kind']} training to save and stop (it finishes its current step first)."

    def kill(self) -> None:
        """Terminate the job (used at app shutdown in tests)."""
        with self.lock:
            p = self.proc
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    # --- report ----------------------------------------------------------------------------------

    def report(self) -> dict:
        """What the Train tab shows: run, state, step/total, loss, message, log points, preview path."""
        act = self.active()
        if not act:
            return {"state": "idle", "text": "No training run yet.", "log": [], "preview": None}
        run_dir = Path(act["run_dir"])
        st = read_status(run_dir)
        alive = self.running() is not None
        state = st.get("state") or ("starting" if alive else "not started")
        msg = st.get("message", "")
        if state in ("running", "interrupted") and not alive:  # read_status says interrupted once it is gone
            state = "interrupted"
            msg = (f"interrupted at step {st.get('step', 0)}: the training process ended without saying why; "
                   f"press Resume to continue from the last checkpoint")
        if not alive and state in ("starting", "not started", "interrupted"):
            tail = _tail(run_dir / "process.log")
            if tail and state != "interrupted":
                state = "failed"
                msg = tail
            elif tail:
                msg += f" - last output: {tail}"
        if alive and state in ("stopped", "finished", "failed", "interrupted"):
            state, msg = "starting", "resuming"
        points, layouts = [], None
        try:
            with open(run_dir / "log.jsonl") as f:
                for line in f:
                    try:
                        d = json.loads(line)
                    except ValueError:
                        continue
                    if "loss" in d and d["loss"] is not None:
                        points.append((int(d["step"]), float(d["loss"])))
                    elif "preview" in d and "real" in d:
                        layouts = d
        except OSError:
            pass
        prev = run_dir / "previews" / "latest.png"
        step, total = st.get("step", 0), st.get("total", "?")
        loss = st.get("loss")
        problems = data_problems(run_dir / "process.log", act.get("log_offset", 0))
        text = (f"**{act['kind']} model** · `{run_dir}`  \n**{state}** · step {step} / {total}"
                + (f" · loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
                + (f"  \n{msg}" if msg else "") + _layout_line(layouts) + _problems_text(problems))
        return {"state": state, "text": text, "log": points, "preview": prev if prev.exists() else None,
                "kind": act["kind"], "run_dir": str(run_dir), "alive": alive, "problems": problems}


def _layout_line(row: dict | None) -> str:
    """The latest preview's layout statistics against the training tiles', as a status line."""
    try:
        p, r = row["preview"], row["real"]
        return (f"  \nPreview layouts (step {int(row['step'])}, {int(p['n'])} tiles): "
                f"{p['nuclei_per_tile']:.1f} nuclei per tile, {100 * p['fg_fraction']:.0f} % foreground; "
                f"training tiles: {r['nuclei_per_tile']:.1f}, {100 * r['fg_fraction']:.0f} %")
    except (TypeError, KeyError, ValueError):
        return ""


_PROBLEM_LINE = re.compile(r"^(\[(error|warning)\] |\.\.\. and \d+ more problems)")
_PROBLEMS_READ = 64 * 1024  # bytes of a launch's output searched for the data's problems (printed first)


def data_problems(log: Path, offset: int = 0) -> list[str]:
    """The data's problems the trainer printed into its process log from ``offset`` (where this launch's
    output starts) on: ``[error] ...`` (a file skipped), ``[warning] ...`` (used with a caveat, or ignored)
    and ``... and N more problems ...``, one line each, in the order printed."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, int(offset or 0)))
            data = f.read(_PROBLEMS_READ).decode("utf-8", "replace")
    except (OSError, ValueError, TypeError):
        return []
    lines = (ln.strip() for ln in data.replace("\r", "\n").splitlines())
    return [ln for ln in lines if _PROBLEM_LINE.match(ln)]


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_\[\]<>#|~])", r"\\\1", text)


def _problems_text(problems: list[str]) -> str:
    """The data's problems as status lines: how many files were skipped, then one line each."""
    if not problems:
        return ""
    errors = sum(p.startswith("[error]") for p in problems)
    warnings = sum(p.startswith("[warning]") for p in problems)
    counts = [f"{errors} file{'s' if errors != 1 else ''} skipped"] if errors else []
    counts += [f"{warnings} warning{'s' if warnings != 1 else ''}"] if warnings else []
    more = " among the first listed" if problems[-1].startswith("...") else ""
    head = (f"  \n**Problems in the training data:** {', '.join(counts)}{more} (files skipped are not trained on; "
            "Inspect folder shows the whole report)")
    return head + "".join(f"  \n{_md_escape(p)}" for p in problems)


def _tail(path: Path, n: int = 600) -> str:
    """Last meaningful line(s) of a process log (an error message rather than a progress bar, or the data's
    problems, which the report lists on their own)."""
    try:
        data = path.read_bytes()[-8000:].decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in data.replace("\r", "\n").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("train ") and "it/s" not in ln
             and not _PROBLEM_LINE.match(ln)]
    return lines[-1][-n:] if lines else ""
