"""Checkpoints: safetensors weights + a JSON record, written atomically, never pickled.

A checkpoint is a pair of files with one stem: ``<stem>.safetensors`` (tensors) and ``<stem>.json``
(what they are). The JSON holds ``format`` (this module's version), ``kind`` ('structure' | 'image'),
``model`` (UNetConfig), ``diffusion`` (DiffusionConfig), ``train`` (TrainConfig, for training state),
``step``, ``data_fingerprint``, ``engine_version``, ``weights_sha256`` and ``contents``: either
'inference' (tensors ``model.*``: the EMA weights, possibly fp16) or 'training' (``model.*`` live weights,
``ema.*``, ``optim.*`` AdamW state and RNG state), so training resumes exactly.

Both files are written to temporary names in the same folder and renamed into place, the JSON last
(engine.fileio.atomic_output): a crash leaves either the previous checkpoint or the new one, never half of
one (and at most a temporary ``.NAME.RANDOM.tmp`` beside it, see engine.fileio.TEMP_NAME, which the next
trainer on the folder removes).

This module is storage: it imports no science module. A structure model's layout reference is computed
by the caller (engine.curate) and handed to :func:`export_inference` as an array.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import engine
from engine.config import KINDS, PAPER_W, DiffusionConfig, UNetConfig
from engine.errors import CheckpointError
from engine.fileio import (TEMP_NAME, atomic_output, atomic_write_bytes, check_format, file_sha256, safetensors_bytes,
                           is_whole_number, read_json_record, safetensors_paths)

FORMAT = 1
GUIDANCE_KEY = "guidance"  # record field of an image model's calibrated guidance (engine.guidance)
__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "read_record", "checkpoint_paths",
           "atomic_write_bytes", "file_sha256", "export_inference", "TEMP_NAME", "GUIDANCE_KEY", "recommended_w",
           "sample_size", "optimizer_tensors", "load_optimizer"]


#: (weights, record) paths of a checkpoint given its stem, .safetensors or .json path
checkpoint_paths = safetensors_paths


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer's state for a safetensors file: its per-parameter state as tensors named
    ``optim.<param index>.<name>`` (CPU), and its param groups (JSON-able) for the record."""
    sd = opt.state_dict()
    tensors = {f"optim.{idx}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().to("cpu")
               for idx, st in sd["state"].items() for name, v in st.items()}
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   param_groups: list[dict[str, Any]]) -> None:
    """Restore what :func:`optimizer_tensors` gave (other tensors in ``tensors`` are ignored)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": param_groups})


@dataclass
class Checkpoint:
    """A loaded checkpoint: its record and tensors (on CPU)."""

    path: Path
    record: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def model_config(self) -> UNetConfig:
        return UNetConfig.from_dict(self.record["model"])

    @property
    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig.from_dict(self.record.get("diffusion", {}))

    @property
    def step(self) -> int:
        return int(self.record.get("step", 0))

    @property
    def sha256(self) -> str:
        return self.record.get("weights_sha256", "")

    def state_dict(self, prefix: str = "model.", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Tensors under `prefix`, with the prefix removed, cast to dtype."""
        n = len(prefix)
        return {k[n:]: v.to(dtype) for k, v in self.tensors.items() if k.startswith(prefix)}

    def weights_for_inference(self) -> dict[str, torch.Tensor]:
        """EMA weights of a training checkpoint, or the weights of an inference one."""
        if self.record.get("contents") == "training" and any(k.startswith("ema.") for k in self.tensors):
            return self.state_dict("ema.")
        return self.state_dict("model.")


def stored_tensor_names(path: str | os.PathLike) -> set[str]:
    """Names of the tensors in a checkpoint's weights file, read from its header alone (no weights loaded);
    e.g. whether an image model carries a colour prior ("reference.colour")."""
    from safetensors import safe_open

    weights, _ = checkpoint_paths(path)
    try:
        with safe_open(str(weights), "pt") as f:
            return set(f.keys())
    except Exception as e:  # noqa: BLE001 - any unreadable file is one error
        raise CheckpointError(f"cannot read {weights.name}: {e}") from e


def save_checkpoint(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    *,
    kind: str,
    model: UNetConfig,
    diffusion: DiffusionConfig,
    contents: str = "inference",
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically; returns the record's path. Tensors are saved contiguous on CPU."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    weights, record_path = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_output(weights) as tmp:
        Path(tmp).write_bytes(safetensors_bytes(flat, {"format": str(FORMAT), "kind": kind}))
        sha = file_sha256(tmp)
    record = {
        "format": FORMAT,
        "kind": kind,
        "contents": contents,
        "engine_version": engine.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "step": int(step),
        "model": model.to_dict(),
        "diffusion": diffusion.to_dict(),
        "weights_file": weights.name,
        "weights_sha256": sha,
        **(extra or {}),
    }
    atomic_write_bytes(record_path, json.dumps(record, indent=2, default=str).encode())
    return record_path


def read_record(path: str | os.PathLike, *, kind: str | None = None) -> tuple[Path, dict]:
    """(weights path, record) of a checkpoint, its record checked but its weights not read.

    kind: when given, the checkpoint must be of this kind ('structure' or 'image'). Raises CheckpointError
    with a readable message on any problem.
    """
    weights, record_path = checkpoint_paths(path)
    given = Path(path)
    if given.suffix.lower() not in ("", ".safetensors", ".json") and given.exists():
        raise CheckpointError(f"{given} is not a checkpoint: a checkpoint is NAME.safetensors + NAME.json "
                              f"(give either, or NAME)")
    if not record_path.exists() and not weights.exists():
        raise CheckpointError(f"checkpoint not found: {weights} (and {record_path.name})")
    if not record_path.exists():
        raise CheckpointError(f"checkpoint record missing: {record_path} (a checkpoint is .safetensors + .json)")
    if not weights.exists():
        raise CheckpointError(f"checkpoint weights missing: {weights}")
    record = read_json_record(record_path, "checkpoint record")
    if not isinstance(record, dict) or "kind" not in record or "model" not in record:
        raise CheckpointError(f"{record_path} is not a NuDiff checkpoint record (no 'kind'/'model')")
    check_format(record, FORMAT, record_path)
    if record["kind"] not in KINDS:
        raise CheckpointError(f"{record_path}: unknown model kind {record['kind']!r} (structure or image)")
    if not isinstance(record["model"], dict):
        raise CheckpointError(f"{record_path}: 'model' must be a model config object, got {record['model']!r:.60}")
    _check_diffusion(record.get("diffusion", {}), record_path)
    if kind is not None and record["kind"] != kind:
        raise CheckpointError(
            f"{weights.name} is a{'n' if record['kind'] == 'image' else ''} {record['kind']} model, but "
            f"a{'n' if kind == 'image' else ''} {kind} model is needed here")
    try:
        UNetConfig.from_dict(record["model"])
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{record_path}: invalid model config: {e}") from None
    return weights, record


def _check_diffusion(d: Any, record_path: Path) -> None:
    """CheckpointError unless `d` is a usable DiffusionConfig record (T >= 2, 0 < beta_start < beta_end < 1,
    the linear schedule)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{record_path}: 'diffusion' must be an object, got {d!r:.60}")
    try:
        cfg = DiffusionConfig.from_dict(d)
        t, b0, b1 = cfg.num_timesteps, float(cfg.beta_start), float(cfg.beta_end)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{record_path}: invalid diffusion config: {e}") from None
    if not is_whole_number(t, 2):
        raise CheckpointError(f"{record_path}: diffusion num_timesteps must be a whole number of at least 2, "
                              f"got {t!r}")
    if not 0 < b0 < b1 < 1:
        raise CheckpointError(f"{record_path}: diffusion betas must satisfy 0 < beta_start < beta_end < 1, "
                              f"got {b0} and {b1}")
    if cfg.schedule != "linear":
        raise CheckpointError(f"{record_path}: unknown beta schedule {cfg.schedule!r} (only 'linear')")


def load_checkpoint(path: str | os.PathLike, *, kind: str | None = None, verify: bool = True) -> Checkpoint:
    """Read a checkpoint (no pickle). Raises CheckpointError with a readable message on any problem.

    kind: when given, the checkpoint must be of this kind ('structure' or 'image').
    verify: check the weights file against the SHA-256 in the record (detects torn or swapped files).
    """
    weights, record = read_record(path, kind=kind)
    if verify and record.get("weights_sha256"):
        if file_sha256(weights) != record["weights_sha256"]:
            raise CheckpointError(f"{weights} does not match its record (corrupt or replaced file)")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights {weights}: {e}") from None
    return Checkpoint(path=weights, record=record, tensors=tensors)


def export_inference(src: str | os.PathLike, dst: str | os.PathLike, *, half: bool = True,
                     extra: dict[str, Any] | None = None,
                     reference: torch.Tensor | np.ndarray | None = None,
                     colours: torch.Tensor | np.ndarray | None = None) -> Path:
    """Write the EMA weights of a training (or inference) checkpoint as a small inference checkpoint
    (fp16 if half). Tensors ``reference.*`` (a structure model's layout reference, engine.curate) are
    copied as they are.

    extra: more record fields, e.g. ``sample_size`` (default tile size for sampling).
    reference: layout reference to store as ``reference.layout`` (structure models only), replacing any
    copied one: (N, 5) float32 layout features, e.g. engine.curate.reference_from_folder of a folder of
    real labeled images at the model's :func:`sample_size`.
    colours: an image model's colour prior to store as ``reference.colour``: (K, 3) float32 mean colours of
    training tiles in [-1, 1], or (K, 4) with their foreground fractions (engine.colour_prior.tile_mean_colours).
    """
    ck = load_checkpoint(src)
    if reference is not None and ck.kind != "structure":
        raise CheckpointError("a layout reference applies to structure models only")
    if colours is not None and ck.kind != "image":
        raise CheckpointError("a colour prior applies to image models only")
    if isinstance(reference, (str, os.PathLike)):
        raise TypeError("reference must be an array of layout features (engine.curate.reference_from_folder "
                        "makes one of a folder)")
    sd = ck.weights_for_inference()
    dtype = torch.float16 if half else torch.float32
    tensors = {f"model.{k}": v.to(dtype) for k, v in sd.items()}
    tensors.update({k: v for k, v in ck.tensors.items() if k.startswith("reference.")})
    if reference is not None:
        tensors["reference.layout"] = torch.as_tensor(reference, dtype=torch.float32)
    if colours is not None:
        tensors["reference.colour"] = torch.as_tensor(colours, dtype=torch.float32)
    keep = {k: v for k, v in ck.record.items()
            if k not in ("format", "kind", "contents", "engine_version", "created", "step", "model",
                         "diffusion", "weights_file", "weights_sha256")}
    keep.pop("optimizer", None)
    source = {"path": str(ck.path.name), "sha256": ck.sha256}
    if ck.record.get("contents") == "inference" and "exported_from" in keep:
        keep["reexported_from"] = source  # keep the training checkpoint it first came from
    else:
        keep["exported_from"] = source
    keep.update(extra or {})
    return save_checkpoint(dst, tensors, kind=ck.kind, model=ck.model_config, diffusion=ck.diffusion_config,
                           contents="inference", step=ck.step, extra=keep)


def sample_size(record: dict[str, Any]) -> int:
    """Default tile size for sampling of a checkpoint record: ``sample_size``, else the model's training size."""
    return int(record.get("sample_size") or UNetConfig.from_dict(record["model"]).image_size)


def recommended_w(record: dict[str, Any]) -> float | None:
    """The calibrated guidance scale stored in an image checkpoint's record (``guidance.w``, written by
    engine.guidance.store_calibration), or None when the model was never calibrated."""
    g = record.get(GUIDANCE_KEY)
    if not isinstance(g, dict) or "w" not in g:
        return None
    try:
        w = float(g["w"])
    except (TypeError, ValueError):
        return None
    return w if 0 <= w <= 50 else None


def starting_w(record: dict[str, Any]) -> float:
    """The guidance scale an image model starts from (CLI default, studio slider): its calibrated w, else
    the paper's (engine.config.PAPER_W)."""
    w = recommended_w(record)
    return PAPER_W if w is None else w
