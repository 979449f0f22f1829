"""Low-level helpers every other engine module may use: atomic file output, file hashes, JSON records,
the compute device. This module imports nothing of the engine but engine.errors (the bottom of the
import graph, docs/architecture.md).

Atomic output: a file (or folder) is written under a temporary name in the same folder and renamed onto
its real name only when complete (``os.replace``; files are fsynced first), so a reader sees the old
version or the new one, never half of one. The temporary is ``.<name>.<random>.tmp`` (:data:`TEMP_NAME`)
unless a caller names its own; a killed writer leaves it behind, and the clean-ups that remove such
leftovers (engine.runlock.clean_temp_files, :func:`remove_stale_temps`) recognise it by that name. A writer
that may race others for one target (an export, an upload's unpacking) takes its temporary with
:func:`held_temp`, which holds a ``flock`` on it while in use.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError, NuDiffError

__all__ = ["TEMP_NAME", "process_umask", "temp_beside", "commit", "discard", "atomic_output", "atomic_write_bytes",
           "held_temp", "remove_stale_temps", "file_sha256", "read_json_record", "is_whole_number", "check_format",
           "resolve_device", "safetensors_paths"]

#: Name of the temporary file a write of ``<target>`` goes through (made by :func:`temp_beside`):
#: ``.<target>.<random>.tmp``.
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<random>[A-Za-z0-9_]+)\.tmp$")


def process_umask() -> int:
    """This process's umask (from /proc on Linux, without changing it; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_beside(target: str | os.PathLike, *, folder: bool = False) -> Path:
    """A new, empty temporary file (or folder) in target's folder, named ``.<target name>.<random>.tmp``,
    with the permissions a plain ``open`` (``mkdir``) would give it: 0o666 (0o777) less the umask. tempfile
    makes them private (0o600, 0o700), and the rename would carry that onto the finished file, so that a
    checkpoint or an export shared in a lab's folder could be read by its writer alone."""
    target = Path(target)
    if folder:
        path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        path = Path(name)
    os.chmod(path, (0o777 if folder else 0o666) & ~process_umask())
    return path


def commit(tmp: str | os.PathLike, target: str | os.PathLike, *, fsync: bool = True) -> None:
    """Rename a finished temporary file or folder onto target (fsyncing a file first unless fsync=False).

    A folder replaces only an empty (or missing) target folder: OSError when the target holds anything.
    """
    tmp, target = Path(tmp), Path(target)
    if tmp.is_dir():
        if target.exists():
            target.rmdir()
    elif fsync:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, target)


def discard(tmp: str | os.PathLike) -> None:
    """Remove a temporary file or folder, if it is still there."""
    tmp = Path(tmp)
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, *, temp: str | os.PathLike | None = None, folder: bool = False,
                  fsync: bool = True) -> Iterator[Path]:
    """Write target all at once: yields a temporary path beside it to write; when the block ends without an
    error the temporary is committed onto target (:func:`commit`), otherwise it is removed.

    temp: the temporary to write to (default: a new one from :func:`temp_beside`; give one to keep a
    name that a clean-up looks for, or one that is held locked). folder: target is a folder (the default
    temporary is then an empty folder).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp) if temp is not None else temp_beside(target, folder=folder)
    try:
        yield tmp
        commit(tmp, target, fsync=fsync)
    except BaseException:
        discard(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data to path via a temporary file in the same folder, fsync and an atomic rename."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
STALE_UNLOCKABLE_S = 3600  # where there is no flock, a temporary this old is taken as a killed writer's


def _flock(fd: int, *, wait: bool) -> bool | None:
    """Exclusive flock on fd: True when taken, False when another holds it, None when unsupported."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return None
        raise


@contextlib.contextmanager
def held_temp(target: Path, *, folder: bool):
    """A new temporary file (or folder) beside `target`, ``.<name>.<random>.tmp``, locked while in use so
    that remove_stale_temps leaves it alone; stale temporaries of the same target are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    while True:
        tmp = temp_beside(target, folder=folder)
        fd = os.open(tmp, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
        _flock(fd, wait=True)
        try:  # another writer's clean-up may have taken it between creation and lock: make another
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield tmp
    finally:
        os.close(fd)


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers of `target` left beside it (``.<name>.<random>.tmp``
    files or folders nobody holds locked); returns them. Those of a live writer are left alone."""
    target = Path(target)
    removed = []
    try:
        names = [p for p in target.parent.iterdir() if (m := TEMP_NAME.match(p.name)) and m["target"] == target.name]
    except OSError:
        return removed
    for p in names:
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            continue
        try:
            fd = os.open(p, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if p.is_dir() else 0))
        except OSError:
            continue
        try:
            got = _flock(fd, wait=False)
            if got is None:  # no flock here: only what is surely abandoned
                got = time.time() - os.fstat(fd).st_mtime > STALE_UNLOCKABLE_S
            if got:
                discard(p)
                removed.append(p)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def safetensors_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights ``<stem>.safetensors``, record ``<stem>.json``) of a saved model given its stem or either file:
    diffusion checkpoints (engine.checkpoint) and segmenters (engine.segment) are stored this way."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """``safetensors.torch.save(tensors, metadata)`` with the metadata in sorted key order, so that the same
    tensors and metadata always give the same bytes (and sha256). The library writes its metadata in hash
    order, which differs between processes; the header is rewritten at its own length (JSON, padded with
    spaces as the format allows), tensors and offsets untouched."""
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # not expected (the same JSON, compact); the library's bytes are valid as they are
        return blob
    return blob[:8] + text + b" " * (n - len(text)) + blob[8 + n:]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- JSON records


def read_json_record(path: Path, what: str, error: type[NuDiffError] = CheckpointError) -> Any:
    """The parsed JSON of a record file; `error` ("<what> <path> is not valid JSON: ...") if unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what} {path} is not valid JSON: {e}") from None


def is_whole_number(value: Any, minimum: int | None = None) -> bool:
    """True for an int (not a bool) that is at least minimum (when given)."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def check_format(record: dict, current: int, path: Path, error: type[NuDiffError] = CheckpointError) -> int:
    """A record's ``format`` (0 when absent); `error` unless it is a whole number this code can read."""
    fmt = record.get("format", 0)
    if not is_whole_number(fmt, 0):
        raise error(f"{path}: 'format' must be a whole number, got {fmt!r}")
    if fmt > current:
        raise error(f"{path} was written by a newer NuDiff (format {fmt})")
    return fmt


# ----------------------------------------------------------------------------- device


def resolve_device(device: Any = "auto") -> Any:
    """torch.device for a name; "auto" is the first CUDA device where there is one, else the CPU."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
