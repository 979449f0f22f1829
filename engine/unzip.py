"""Unpacking a user's zip (a labeled-tile folder uploaded to the studio) without trusting it.

Nothing is extracted from an archive with an absolute path, a ``..`` component, a symbolic link or a special
file, with too many entries, or that unpacks to too many bytes (declared sizes, and again while
decompressing); the folder appears whole, by rename, or not at all.
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

from engine.errors import DataError
from engine.fileio import atomic_output, held_temp

__all__ = ["safe_extract_zip", "MAX_EXTRACT_BYTES", "MAX_EXTRACT_FILES"]

#: Default caps for :func:`safe_extract_zip` (total uncompressed bytes, number of entries).
MAX_EXTRACT_BYTES = 2 * 1024 ** 3
MAX_EXTRACT_FILES = 20000

_JUNK = ("__MACOSX/",)


def _check_member(info: zipfile.ZipInfo, zip_name: str) -> PurePosixPath | None:
    """Relative path to extract a member to, None to skip it; DataError if it is unsafe."""
    name = info.filename
    if any(name.startswith(j) for j in _JUNK) or PurePosixPath(name).name in (".DS_Store", "Thumbs.db"):
        return None
    mode = (info.external_attr >> 16) & 0xFFFF
    if stat.S_ISLNK(mode):
        raise DataError(f"{zip_name}: refusing to extract symbolic link {name!r}")
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DataError(f"{zip_name}: refusing to extract special file {name!r}")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise DataError(f"{zip_name}: refusing absolute path {name!r} in the archive")
    parts = PurePosixPath(norm).parts
    if any(part == ".." for part in parts):
        raise DataError(f"{zip_name}: refusing path {name!r} that leaves the extraction folder")
    if "\x00" in norm:
        raise DataError(f"{zip_name}: refusing member name with a NUL byte")
    parts = tuple(p for p in parts if p not in ("", "."))
    if not parts:
        return None
    return PurePosixPath(*parts)


def safe_extract_zip(zip_path: str | os.PathLike, dest: str | os.PathLike, *,
                     max_bytes: int = MAX_EXTRACT_BYTES, max_files: int = MAX_EXTRACT_FILES) -> Path:
    """Extract a user-supplied zip into ``dest`` (which must not exist or be empty); returns ``dest``.

    Rejects, with a DataError and nothing extracted: corrupt archives, absolute paths, ``..``
    components, symbolic links and special files, more than ``max_files`` entries, and more than
    ``max_bytes`` uncompressed in total (checked against the declared sizes and again while
    decompressing, so a lying header cannot be used as a zip bomb). macOS ``__MACOSX/`` and
    ``.DS_Store`` entries are skipped.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    name = zip_path.name
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"extraction folder {dest} already exists and is not empty")
    try:
        zf = zipfile.ZipFile(zip_path)
    except FileNotFoundError:
        raise DataError(f"zip file not found: {zip_path}") from None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise DataError(f"{name} is not a readable zip file ({e})") from None
    with held_temp(dest, folder=True) as tmp:
        _extract(zf, name, dest, tmp, max_bytes=max_bytes, max_files=max_files)
    return dest


def _extract(zf: zipfile.ZipFile, name: str, dest: Path, tmp: Path, *, max_bytes: int, max_files: int) -> None:
    try:
        with atomic_output(dest, temp=tmp), zf:
            infos = zf.infolist()
            if len(infos) > max_files:
                raise DataError(f"{name} holds {len(infos)} entries; at most {max_files} are accepted")
            plan = [(info, rel) for info in infos if (rel := _check_member(info, name)) is not None]
            declared = sum(info.file_size for info, _ in plan)
            if declared > max_bytes:
                raise DataError(f"{name} would unpack to {declared / 1e6:.0f} MB; at most "
                                f"{max_bytes / 1e6:.0f} MB are accepted")
            total = 0
            for info, rel in plan:
                target = tmp.joinpath(*rel.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        total += len(chunk)
                        if total > max_bytes:
                            raise DataError(f"{name} unpacks to more than {max_bytes / 1e6:.0f} MB; "
                                            "refusing (possible zip bomb)")
                        out.write(chunk)
    except DataError:
        raise  # (atomic_output has removed the temporary folder)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as e:
        raise DataError(f"{name} could not be unpacked: {e}") from None
