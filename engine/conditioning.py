"""What an image is conditioned on, and the provenance record every route writes beside it.

One :class:`Condition` travels from the structure sampler to the image model, whichever route a tile
takes (``generate``, ``sample-structures`` then ``synthesize``, the studio's Structures -> Synthesize):
the sampled 3-channel structure together with the instance map that watershed made of it. The
structure is rebuilt from the instance map (engine.structure.instances_to_structure) only where no
sampled one exists or it no longer fits the map: a label file, a blank or drawn map, a hand edit, a sampled
map whose outlines were smoothed. The
provenance says so (``structure_rebuilt``), so the same models, structure and seed give the same image
on every route, and a rebuilt one is never passed off as sampled.

On disk (``sample-structures``): ``labels/<stem>.tif`` (the instance map), ``structures/<stem>.npy``
((H, W, 3) float32) and ``structures/<stem>.json`` (its origin and the instance map's sha256).
:func:`load_condition` of the label file finds the sampled structure again, unless the label was
edited since (its hash no longer matches): then the structure is rebuilt and marked as edited.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import DataError
from engine.fileio import atomic_output, atomic_write_bytes
from engine.structure import instances_to_structure

__all__ = ["Condition", "Provenance", "inst_sha256", "load_condition", "save_condition", "ORIGIN_KEYS"]

ORIGIN_KEYS = ("source", "structure_seed", "structure_checkpoint", "structure_sha256", "structure_sampler",
               "structure_steps", "label_file", "outline_sigma")


def inst_sha256(inst: np.ndarray) -> str:
    """sha256 of an instance map's shape and int32 values (how a saved label is matched to its structure)."""
    a = np.ascontiguousarray(inst, dtype=np.int32)
    h = hashlib.sha256(f"{a.shape[0]}x{a.shape[1]}:".encode())
    h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class Condition:
    """An image model's condition: ``structure`` (H, W, 3) float32 in [-1, 1] and ``inst`` (H, W) int32.

    ``origin``: where the map came from (keys of ORIGIN_KEYS: source "sampled" / "label" / "uploaded" /
    "blank", the structure model's seed, name and sha256, the label file, the sigma of the outline smoothing
    a sampled map got, engine.structure.smooth_outlines). ``rebuilt``: the structure was
    computed from ``inst`` rather than sampled. ``edited``: the map was changed by hand.
    """

    structure: np.ndarray
    inst: np.ndarray
    origin: dict = field(default_factory=dict)
    rebuilt: bool = False
    edited: bool = False

    @classmethod
    def sampled(cls, structure: np.ndarray, inst: np.ndarray, **origin: Any) -> "Condition":
        """The structure model's output as sampled: its structure is used as it is."""
        s = np.asarray(structure, np.float32)
        i = np.asarray(inst, np.int32)
        if s.ndim != 3 or s.shape[-1] != 3 or s.shape[:2] != i.shape:
            raise DataError(f"a structure (H, W, 3) and its instance map (H, W) must match, got {s.shape} and {i.shape}")
        return cls(s, i, {"source": "sampled", **origin})

    @classmethod
    def from_instances(cls, inst: np.ndarray, *, edited: bool = False, **origin: Any) -> "Condition":
        """A condition for an instance map that has no sampled structure: the structure is rebuilt."""
        i = np.asarray(inst, np.int32)
        if i.ndim != 2:
            raise DataError(f"an instance map must be (H, W), got shape {i.shape}")
        return cls(instances_to_structure(i), i, dict(origin), rebuilt=True, edited=edited)

    @classmethod
    def of(cls, inst: np.ndarray, structure: np.ndarray | None, origin: dict, *, edited: bool = False) -> "Condition":
        """The sampled structure when there is one (and it fits the map), otherwise a rebuilt one."""
        if structure is not None and np.shape(structure) == (*np.shape(inst), 3):
            return cls(np.asarray(structure, np.float32), np.asarray(inst, np.int32), dict(origin), edited=edited)
        return cls.from_instances(inst, edited=edited, **origin)

    def with_instances(self, inst: np.ndarray) -> "Condition":
        """This condition after a hand edit: the new map, its structure rebuilt, marked as edited."""
        return Condition.from_instances(inst, edited=True, **self.origin)

    @property
    def n_nuclei(self) -> int:
        return int(self.inst.max()) if self.inst.size else 0


@dataclass(frozen=True)
class Provenance:
    """Where one synthetic pair came from: the same record from ``generate``, ``synthesize`` and the studio.

    Written as the pair's meta (export manifest columns, basket entries). ``extra`` holds route-specific
    settings (realism filter, tiling windows) and is merged into the dict flat.
    """

    seed: int
    w: float
    sampler: str
    steps: int
    image_checkpoint: str
    image_sha256: str
    n_nuclei: int
    variant: int = 0
    source: str | None = None
    structure_seed: int | None = None
    structure_checkpoint: str | None = None
    structure_sha256: str | None = None
    structure_sampler: str | None = None
    structure_steps: int | None = None
    label_file: str | None = None
    outline_sigma: float | None = None
    edited: bool = False
    structure_rebuilt: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, cond: Condition, *, image_checkpoint: str, image_sha256: str, seed: int, w: float, sampler: str,
           steps: int, variant: int = 0, **extra: Any) -> "Provenance":
        origin = {k: cond.origin.get(k) for k in ORIGIN_KEYS}
        return cls(seed=int(seed), w=float(w), sampler=sampler, steps=int(steps), image_checkpoint=image_checkpoint,
                   image_sha256=image_sha256, n_nuclei=cond.n_nuclei, variant=int(variant), edited=bool(cond.edited),
                   structure_rebuilt=bool(cond.rebuilt), extra=dict(extra), **origin)

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {**d, **extra}

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "extra")


def save_condition(cond: Condition, folder: str | Path, stem: str) -> None:
    """Write ``structures/<stem>.npy`` and ``structures/<stem>.json`` under ``folder`` (the label itself,
    ``labels/<stem>.tif``, is the caller's)."""
    sub = Path(folder) / "structures"
    sub.mkdir(parents=True, exist_ok=True)
    with atomic_output(sub / f"{stem}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(cond.structure, np.float32), allow_pickle=False)
    record = {"format": 1, "inst_sha256": inst_sha256(cond.inst), "rebuilt": cond.rebuilt, "edited": cond.edited,
              "origin": cond.origin}
    atomic_write_bytes(sub / f"{stem}.json", json.dumps(record, indent=1).encode())


def load_condition(label_file: str | Path, inst: np.ndarray) -> Condition:
    """The condition for a label file's instance map ``inst``: its sampled structure when the file was
    written by ``sample-structures`` (``../structures/<stem>.npy`` + ``.json``) and the map is unchanged
    since; otherwise a rebuilt one (``edited`` when a sampled structure existed but the map changed)."""
    path = Path(label_file)
    sub = path.parent.parent / "structures"
    rec_path, arr_path = sub / f"{path.stem}.json", sub / f"{path.stem}.npy"
    base = {"source": "label", "label_file": path.name}
    if not (rec_path.is_file() and arr_path.is_file()):
        return Condition.from_instances(inst, **base)
    try:
        record = json.loads(rec_path.read_text())
        structure = np.load(arr_path, allow_pickle=False)
        origin = {k: v for k, v in dict(record.get("origin") or {}).items() if k in ORIGIN_KEYS}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{arr_path.name} / {rec_path.name} beside {path.name} are unreadable ({e}); move them away "
                        f"to synthesize from the label alone") from None
    origin["label_file"] = path.name
    if record.get("inst_sha256") != inst_sha256(inst) or structure.shape != (*np.shape(inst), 3):
        return Condition.from_instances(inst, edited=True, **origin)
    return Condition(np.asarray(structure, np.float32), np.asarray(inst, np.int32), origin,
                     rebuilt=bool(record.get("rebuilt")), edited=bool(record.get("edited")))
