"""One writer per run folder, and the clean-up of what a killed writer leaves behind.

A training process holds ``RUN/lock.json`` for as long as it works on the run folder:

    {"pid": 4242, "host": "gpu-07", "pid_start": 123456, "started": 1718000000.0,
     "started_at": "2024-06-10 08:13:20", "kind": "structure", "argv": [...]}

``pid_start`` is the process's start time in clock ticks since boot (/proc/PID/stat field 22), which
tells a live owner from a recycled PID. Exclusion is an exclusive ``flock`` on the open lock file: the
kernel drops it when the owner exits in any way (kill -9 included), so a lock file nobody holds is stale
and is taken over (the new owner says so in the run's log). The lock file is removed on a normal exit,
an error or SIGTERM. A lock written on another host is never judged stale from here (its PID means
nothing on this machine): the message says to delete it if nothing runs there. Where the file system
has no ``flock``, the lock file is created with ``O_CREAT | O_EXCL`` and judged by its PID instead.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from engine.errors import TrainingError
from engine.fileio import TEMP_NAME

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunFolderBusy", "RunLock", "process_running", "process_start", "host_name",
           "read_lock", "lock_holder", "busy_message", "clean_temp_files", "PREVIEW_TEMP"]

LOCK_NAME = "lock.json"
# files of a run folder that are written through a temporary file (engine.fileio.atomic_output: save_checkpoint,
# atomic_write_bytes); a temporary of any other name is left alone
_RUN_TARGETS = re.compile(r"^(?:(?:latest|model|step_\d+)\.(?:safetensors|json)|(?:status|train_config)\.json)$")
PREVIEW_TEMP = ".latest.png.tmp"  # Trainer.preview writes previews/latest.png through this fixed name


class RunFolderBusy(TrainingError):
    """Another live process holds the run folder."""


def host_name() -> str:
    return socket.gethostname()


def process_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def process_running(pid, start: int | None = None) -> bool:
    """Whether `pid` is a live process on this host and (given `start`, its process_start) the same one.

    Without `start`, a live PID counts only if it is a python process running the engine (a recycled PID
    of another program does not). A zombie is not running.
    """
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass  # exists, another user's
    except OSError:
        return False
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True  # no /proc: the signal test is all there is
    if fields and fields[0] in ("Z", "X"):
        return False
    if start is not None:
        try:
            return int(fields[19]) == int(start)
        except (ValueError, IndexError):
            return True
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True
    return b"python" in os.path.basename(cmd[0]) and any(b"engine" in c for c in cmd)


def read_lock(run_dir: str | os.PathLike, wait: float = 0.0) -> dict:
    """The lock file's owner record ({} when there is none or it cannot be read); `wait` seconds for a
    lock file that is being written to become readable."""
    path = Path(run_dir) / LOCK_NAME
    deadline = time.monotonic() + wait
    while True:
        try:
            info = json.loads(path.read_text())
            if isinstance(info, dict) and "pid" in info:
                return info
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


def _owner_alive(info: dict) -> bool:
    """Whether the process a lock record names may still be working (always True for another host)."""
    if not info:
        return False
    if info.get("host") and info["host"] != host_name():
        return True
    return process_running(info.get("pid"), info.get("pid_start"))


def lock_holder(run_dir: str | os.PathLike) -> dict | None:
    """The owner record of a run folder's lock if it names a live process, else None.

    Reads only (never takes the lock), so it can be asked while a trainer starts; used by the studio to
    refuse a job on a folder another process trains in before launching it.
    """
    info = read_lock(run_dir)
    return info if _owner_alive(info) else None


def _since(info: dict) -> str:
    t = info.get("started")
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))
    except (TypeError, ValueError, OverflowError):
        return "an unknown time"


def busy_message(run_dir: str | os.PathLike, info: dict) -> str:
    """One line: who holds the run folder and what to do."""
    run_dir = Path(run_dir)
    if not info:
        return (f"run folder {run_dir} is in use by another training process; stop it "
                f"(touch {run_dir / 'STOP'}) or wait")
    host = info.get("host") or "?"
    msg = (f"run folder {run_dir} is in use by training process {info.get('pid')} on {host} since "
           f"{_since(info)}; stop it (touch {run_dir / 'STOP'}) or wait")
    if host != host_name():
        msg += f" (if nothing trains there any more, delete {run_dir / LOCK_NAME})"
    return msg


def _describe_previous(info: dict) -> str:
    return (f"took over the lock of training process {info.get('pid')} on {info.get('host') or '?'} "
            f"(since {_since(info)}), which is no longer running")


class RunLock:
    """The lock of one run folder, held by this process until :meth:`release`.

    ``previous``: the stale owner record that was taken over ({} when the folder was free);
    ``note``: a line saying so, for the run's log ('' when nothing was taken over).
    """

    def __init__(self, run_dir: Path, fd: int | None, info: dict, previous: dict):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self.info = info
        self.previous = previous
        self.note = _describe_previous(previous) if previous else ""
        self._fd = fd
        self._held = True

    @property
    def held(self) -> bool:
        return self._held

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike, **fields) -> "RunLock":
        """Take the run folder's lock (creating the folder) or raise RunFolderBusy naming its owner.

        fields: more entries for the owner record (e.g. kind).
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        now = time.time()
        info = {"pid": pid, "host": host_name(), "pid_start": process_start(pid), "started": now,
                "started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                "argv": list(sys.argv), **fields}
        data = json.dumps(info, indent=1).encode()
        path = run_dir / LOCK_NAME
        if fcntl is not None:
            for _ in range(50):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise RunFolderBusy(busy_message(run_dir, read_lock(run_dir, wait=2.0))) from None
                except OSError as e:
                    os.close(fd)
                    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        break  # no flock on this file system
                    raise
                try:  # the file we locked may have been released (unlinked) by its owner meanwhile
                    same = os.path.samestat(os.fstat(fd), os.stat(path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                try:
                    previous = _parse(_read_fd(fd))
                    if previous and previous.get("host") and previous["host"] != info["host"]:
                        # its PID means nothing here: never judged stale from this host
                        raise RunFolderBusy(busy_message(run_dir, previous))
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, data, 0)
                    os.fsync(fd)
                except BaseException:
                    os.close(fd)
                    raise
                return cls(run_dir, fd, info, previous)
            else:  # pragma: no cover - a storm of acquire / release
                raise RunFolderBusy(busy_message(run_dir, read_lock(run_dir)))
        return cls._acquire_exclusive(run_dir, info, data)

    @classmethod
    def _acquire_exclusive(cls, run_dir: Path, info: dict, data: bytes) -> "RunLock":
        """Without flock: create the file with O_EXCL; an existing one is stale when its owner is dead."""
        path = run_dir / LOCK_NAME
        previous: dict = {}
        for _ in range(5):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                prev = read_lock(run_dir, wait=2.0)
                try:
                    young = time.time() - path.stat().st_mtime < 10
                except FileNotFoundError:
                    continue
                if _owner_alive(prev) or (not prev and young):
                    raise RunFolderBusy(busy_message(run_dir, prev)) from None
                previous = prev or {"pid": "?"}
                path.unlink(missing_ok=True)
                continue
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return cls(run_dir, None, info, previous)
        raise RunFolderBusy(busy_message(run_dir, read_lock(run_dir)))

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if not self._held:
            return
        self._held = False
        try:
            if self._fd is not None:
                try:
                    if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                        self.path.unlink()
                except OSError:
                    pass
            elif read_lock(self.run_dir).get("pid") == self.info["pid"]:
                self.path.unlink(missing_ok=True)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_fd(fd: int) -> bytes:
    out = b""
    pos = 0
    while chunk := os.pread(fd, 1 << 16, pos):
        out += chunk
        pos += len(chunk)
    return out


def _parse(raw: bytes) -> dict:
    try:
        info = json.loads(raw.decode("utf-8", "replace")) if raw.strip() else {}
    except ValueError:
        return {"pid": "?"}  # torn by a killed writer
    return info if isinstance(info, dict) else {"pid": "?"}


def clean_temp_files(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed write left in a run folder; returns them.

    Only this project's own temporaries: ``.<file>.<random>.tmp`` of a run-folder file written through
    engine.checkpoint (latest / step_* / model checkpoints, status.json, train_config.json), and
    ``previews/.latest.png.tmp``. Call it only while holding the folder's lock (nobody else writes there).
    """
    run_dir = Path(run_dir)
    removed: list[Path] = []
    candidates: list[Path] = []
    try:
        candidates = [p for p in run_dir.iterdir() if (m := TEMP_NAME.match(p.name)) and
                      _RUN_TARGETS.match(m["target"])]
    except OSError:
        pass
    candidates.append(run_dir / "previews" / PREVIEW_TEMP)
    for p in candidates:
        try:
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed
