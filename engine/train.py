"""Training of the structure model and the two-stage image model, with EMA, exact resume and
multi-process data parallelism through HuggingFace accelerate.

A run lives in one folder:

    latest.safetensors / latest.json     full training state (model, EMA, AdamW, RNG, step), atomic
    step_0001000.safetensors / .json     snapshots, the last `keep_last` kept (hard links of latest)
    model.safetensors / model.json       EMA weights for inference, written at the end (or on stop)
    log.jsonl                            one line per `log_every` steps: step, loss, lr, drop_rate, time;
                                         structure runs: one per preview, layout statistics vs the data
    previews/step_0000500.png, latest.png   samples from the EMA model every `preview_every` steps
    status.json                          state (running/finished/stopped/failed/interrupted), step, total,
                                         message (engine.run_status); read_status says "interrupted" for a
                                         running state whose process is gone (killed)
    lock.json                            held by the training process (engine.runlock): a second trainer on
                                         the folder is refused; a killed one's lock is taken over
    STOP                                 create this file to ask a running job to save and stop

Resuming compares the data and the settings with those the run was trained with and refuses a change
(see TRAINED_FIELDS) unless allowed (``allow_changes``, CLI ``--allow-changes``); raising the steps is how
a run is extended and is always allowed. SIGTERM saves and stops like STOP.

Run it single-process (`python -m engine train-structure ...`) or on many GPUs / processes with
`accelerate launch -m engine train-structure ...` (one process per device; gloo on CPU).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from engine import render
from engine.checkpoint import (checkpoint_paths, export_inference, load_checkpoint, load_optimizer,
                               optimizer_tensors, save_checkpoint)
from engine.config import DiffusionConfig, TrainConfig, preset
from engine.curate import REFERENCE_KEY, layout_features, reference_from_insts
from engine.diffusion import NoiseSchedule
from engine.errors import CheckpointError, DataError, NuDiffError, TrainingError
from engine.fileio import atomic_output, atomic_write_bytes
from engine.precision import cpu_has_native_bf16, machine_description, resolve_precision  # noqa: F401 (2 re-exported)
from engine.run_status import read_status, write_status
from engine.runlock import PREVIEW_TEMP, RunFolderBusy, RunLock, clean_temp_files
from engine.structure import dihedral_batch, instances_to_structure, structure_to_instances
from engine.unet import UNet

__all__ = ["TrainingSet", "Trainer", "resolve_precision", "cpu_has_native_bf16",
           "MAX_DEVICE_BYTES", "TRAINED_FIELDS", "RunFolderBusy"]

# record fields a resumed or fine-tuned model keeps ("trained_on": every machine its weights were trained on)
INHERITED = ("license", "sample_size", "init_from_sha256", "trained_on")
STOP_POLL_STEPS = 10  # with many processes, a stop request is looked at every this many steps
MAX_DEVICE_BYTES = 4 << 30  # a training set up to this size is kept on the GPU (TrainingSet.tensors)
# TrainConfig fields that change what a run trains: resuming with other values is refused unless allowed.
# (kind and the model config are checked apart and can never change; steps / finetune_steps may, except
# that an image run may not go back to stage 1 once fine-tuning began; save / log / preview cadence,
# keep_last, mixed precision and sample_size may change freely.)
TRAINED_FIELDS = ("tile_stride", "fraction", "batch_size", "lr", "weight_decay", "ema_decay", "grad_clip",
                  "seed", "warmup_steps", "init_from", "min_snr_gamma")
IMAGE_TRAINED_FIELDS = ("finetune_lr", "drop_rate", "finetune_drop_rate")
# trained settings added later, with the value every run before them was trained with: a record without one
# compares as that value (the other fields of an old record that lacks them are not compared)
_NEWER_FIELDS = {"min_snr_gamma": 0.0}


@dataclass
class TrainingSet:
    """Tiles held in memory: images (N, S, S, 3) uint8 and instance maps (N, S, S) int32.

    The nuclei structure of each tile is computed once and kept as float16; augmented batches transform
    it with :func:`engine.structure.dihedral_batch`, which gives exactly the structure of the transformed
    instance map without recomputing the distance maps every step, on the training device.
    """

    images: np.ndarray
    insts: np.ndarray
    fingerprint: str
    structures: np.ndarray | None = field(default=None, repr=False)
    _have: np.ndarray | None = field(default=None, repr=False)
    _tensors: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_arrays(cls, images: list[np.ndarray], insts: list[np.ndarray]) -> "TrainingSet":
        if not images:
            raise DataError("no training tiles")
        imgs = np.stack([np.asarray(i, np.uint8) for i in images])
        labs = np.stack([np.asarray(i, np.int32) for i in insts])
        h = hashlib.sha256()
        h.update(imgs.tobytes())
        h.update(labs.tobytes())
        return cls(imgs, labs, h.hexdigest()[:16])

    @classmethod
    def from_folder(cls, folder: str, size: int, stride: int | None = None, fraction: float = 1.0,
                    seed: int = 0) -> "TrainingSet":
        """Tiles of a labeled folder (engine.data), optionally the paper's subset of `fraction` nuclei."""
        from engine.data import load_tiles
        from engine.subset import select_subset

        tiles, _problems = load_tiles(folder, size=size, stride=stride or size // 2)
        if not tiles:
            raise DataError(f"no usable {size}x{size} tiles in {folder}")
        if fraction < 1.0:
            keep = select_subset(tiles, fraction, seed=seed)
            tiles = [tiles[i] for i in keep]
        return cls.from_arrays([t.image for t in tiles], [t.inst for t in tiles])

    def __len__(self) -> int:
        return len(self.images)

    def structure(self, i: int) -> np.ndarray:
        """(S, S, 3) float32 structure of tile i (computed once, kept as float16)."""
        if self.structures is None:
            self.structures = np.zeros(self.images.shape[:3] + (3,), np.float16)
            self._have = np.zeros(len(self.images), bool)
        if not self._have[i]:
            self.structures[i] = instances_to_structure(self.insts[i])
            self._have[i] = True
        return self.structures[i].astype(np.float32)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """All tiles as tensors: images (N, 3, S, S) uint8 and structures (N, 3, S, S) float16.

        Built once per device and kept there, so that a training step on a GPU gathers and augments its
        batch on the GPU (no per-step host work or copies). A set larger than ``MAX_DEVICE_BYTES`` stays in
        host memory and its batches are copied to the device.
        """
        device = torch.device(device)
        if device.type != "cpu" and self.images.nbytes * 3 > MAX_DEVICE_BYTES:  # uint8 + float16 maps
            device = torch.device("cpu")
        key = str(device)
        if key not in self._tensors:
            sts = np.stack([self.structure(i) for i in range(len(self))]).astype(np.float16)
            self._tensors[key] = (torch.from_numpy(self.images).permute(0, 3, 1, 2).contiguous().to(device),
                                  torch.from_numpy(sts).permute(0, 3, 1, 2).contiguous().to(device))
        return self._tensors[key]

    def batch(self, idx: Sequence[int] | torch.Tensor, gen: torch.Generator | None = None, *,
              k: torch.Tensor | None = None, flip: torch.Tensor | None = None,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented batch: images (B, 3, S, S) and structures (B, 3, S, S), float32 in [-1, 1], on `device`.

        The same flip / quarter turns (given, or drawn from `gen`) are applied to image and structure
        (distance maps transformed with them, engine.structure.dihedral_batch), so they stay aligned
        and exact.
        """
        idx = torch.as_tensor(idx, dtype=torch.long)
        if k is None or flip is None:
            if gen is None:
                raise ValueError("give k and flip, or a generator to draw them")
            k = torch.randint(0, 4, (len(idx),), generator=gen)
            flip = torch.randint(0, 2, (len(idx),), generator=gen).bool()
        images, structures = self.tensors(device)
        home = images.device
        x, y = dihedral_batch(images.index_select(0, idx.to(home)), structures.index_select(0, idx.to(home)),
                              k.to(home), flip.to(home))
        x = x.to(device, non_blocking=True).float() / 127.5 - 1
        return x, y.to(device, non_blocking=True).float()


def _same_path(a, b) -> bool:
    if a == b:
        return True
    if not a or not b:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


class Trainer:
    """Trains one model per TrainConfig in run_dir; resumes from run_dir/latest if present.

    ``stop`` (polled every step), a file ``run_dir/STOP``, SIGTERM (while :meth:`run` runs in the main
    thread) or ``time_limit`` (seconds of this invocation) end training early: the state is saved and the
    model exported, and running again resumes.

    The trainer holds the run folder's lock (engine.runlock) from construction until :meth:`run` ends (or
    :meth:`close`): a second trainer on the folder raises RunFolderBusy at once, touching nothing. On
    taking the folder it removes the temporary files a killed write left there and marks a status that a
    killed trainer left "running" as interrupted. Resuming with other data or settings (TRAINED_FIELDS)
    raises TrainingError naming them, unless ``allow_changes`` (then the change is logged).
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, data: TrainingSet | None = None,
                 *, stop: Callable[[], bool] | None = None, show_progress: bool = True,
                 time_limit: float | None = None, allow_changes: bool = False):
        from accelerate import Accelerator

        if time_limit is not None and not time_limit > 0:
            raise TrainingError(f"time limit must be positive, got {time_limit} s")
        if cfg.kind not in ("structure", "image"):
            raise TrainingError(f"unknown model kind {cfg.kind!r}")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.stop_requested = stop or (lambda: False)
        self.time_limit = time_limit  # seconds of this invocation; then save, export and stop (resumable)
        self.allow_changes = allow_changes
        self._started = time.time()
        self._terminated = False  # SIGTERM received during run()
        self.show_progress = show_progress
        self.precision = resolve_precision(cfg.mixed_precision)
        self.acc = Accelerator(mixed_precision=self.precision, cpu=not torch.cuda.is_available())
        self.main = self.acc.is_main_process
        self._lock: RunLock | None = None
        self._released = False
        self.step = 0
        try:
            self._take_folder()
            self._setup(cfg, data)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (done by :meth:`run` at its end; for a trainer that is not run). A later
        :meth:`run` takes it again."""
        self._released = True
        if self._lock is not None:
            self._lock.release()

    def _take_folder(self) -> None:
        """Take the run folder's lock (main process; all processes fail together), then clean up after a
        killed predecessor: its temporary files, and a status it left "running"."""
        busy: RunFolderBusy | None = None
        if self.main:
            try:
                self._lock = RunLock.acquire(self.run_dir, kind=self.cfg.kind)
                weakref.finalize(self, self._lock.release)
            except RunFolderBusy as e:
                busy = e
        if self.acc.num_processes > 1:
            flag = torch.tensor([1.0 if busy else 0.0], device=self.acc.device)
            if self.acc.reduce(flag, reduction="sum").item() > 0 and busy is None:
                raise RunFolderBusy(f"run folder {self.run_dir} is in use by another training process "
                                    f"(see the main process's message)")
        if busy is not None:
            raise busy
        if not self.main:
            return
        notes = [self._lock.note] if self._lock.note else []
        removed = clean_temp_files(self.run_dir)
        if removed:
            notes.append(f"removed {len(removed)} temporary file(s) left by an interrupted write: "
                         + ", ".join(str(p.relative_to(self.run_dir)) for p in removed))
        old = read_status(self.run_dir)
        if old.get("state") in ("running", "interrupted"):  # we hold the lock: whoever wrote it is gone
            notes.append(f"the previous training process ({old.get('pid')}) was interrupted at step "
                         f"{old.get('step', 0)}")
            write_status(self.run_dir, {**{k: old.get(k) for k in ("kind", "step", "total", "loss")},
                                        "state": "interrupted", "message": (
                                            f"interrupted at step {old.get('step', 0)}; resuming")})
        for note in notes:
            self._log_event(note)
            if self.show_progress:
                print(note, file=sys.stderr)

    def _setup(self, cfg: TrainConfig, data: TrainingSet | None) -> None:
        self.model_cfg = preset(cfg.preset, cfg.kind, cfg.image_size)
        size = self.model_cfg.image_size
        if data is None:
            if not cfg.data:
                raise DataError("no training data folder given")
            data = TrainingSet.from_folder(cfg.data, size, cfg.tile_stride, cfg.fraction, cfg.seed)
        if data.images.shape[1] != size:
            raise DataError(f"training tiles are {data.images.shape[1]} px but the model is {size} px")
        self.data = data
        self._reference: np.ndarray | None = None
        self.diffusion = DiffusionConfig()
        self.schedule = NoiseSchedule(self.diffusion)
        torch.manual_seed(cfg.seed)
        model = UNet(self.model_cfg)
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self._inherited: dict = {}  # record fields carried from the checkpoint this run started from
        self.gen = torch.Generator().manual_seed(cfg.seed * 1009 + self.acc.process_index)
        self.noise_gen = torch.Generator(device=self.acc.device)  # re-seeded from self.gen every step
        self._load_start(model, opt)
        self.model, self.opt = self.acc.prepare(model, opt)
        self.ema.to(self.acc.device)

    # --- state -------------------------------------------------------------------------------------

    def _load_start(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        latest = self.run_dir / "latest.json"
        if latest.exists():
            ck = self._load_latest(latest)
            if ck.kind != self.cfg.kind:
                raise CheckpointError(f"{latest} holds a {ck.kind} model, not a {self.cfg.kind} model")
            if ck.model_config != self.model_cfg:
                raise CheckpointError(f"{latest} was trained with another model config/preset; "
                                      f"use a new run folder")
            self._check_changes(ck.record, ck.step)
            model.load_state_dict(ck.state_dict("model."))
            self.ema.load_state_dict(ck.state_dict("ema."))
            load_optimizer(opt, ck.tensors, ck.record["optimizer"]["param_groups"])
            self.step = ck.step
            rng = ck.tensors.get(f"rng.gen.{self.acc.process_index}")
            if rng is None:
                rng = ck.tensors["rng.gen.0"]
            self.gen.set_state(rng.to(torch.uint8))
            self._inherited = {k: ck.record[k] for k in INHERITED if k in ck.record}
            if self.main:
                self._log_event(f"resumed from step {self.step}")
        elif self.cfg.init_from:
            ck = load_checkpoint(self.cfg.init_from, kind=self.cfg.kind)
            # the U-Net is fully convolutional: the same weights train on tiles of another size
            if replace(ck.model_config, image_size=self.model_cfg.image_size) != self.model_cfg:
                raise CheckpointError(f"{self.cfg.init_from} has another model config than preset "
                                      f"{self.cfg.preset!r}")
            sd = ck.weights_for_inference()
            model.load_state_dict(sd)
            self.ema.load_state_dict(sd)
            # a model fine-tuned from another is derived from it (and from its training data): its licence
            # travels with it, and the record says which weights it started from
            self._inherited = {k: ck.record[k] for k in INHERITED if k in ck.record}
            self._inherited["init_from_sha256"] = ck.sha256

    def _load_latest(self, latest: Path):
        """The run's latest training checkpoint; if a kill tore it (its weights replaced, its record not
        yet: save_checkpoint renames the two files one after the other), the newest intact step snapshot
        (a hard link of an earlier complete latest), said in the log."""
        try:
            return load_checkpoint(latest)
        except CheckpointError as e:
            for snap in sorted(self.run_dir.glob("step_*.json"), reverse=True):
                try:
                    ck = load_checkpoint(snap)
                except CheckpointError:
                    continue
                if self.main:
                    self._log_event(f"{latest.name} is unreadable ({e}); resuming from {snap.name}")
                    if self.show_progress:
                        print(f"{latest.name} is unreadable; resuming from {snap.name}", file=sys.stderr)
                return ck
            raise

    def _check_changes(self, record: dict, step: int) -> None:
        """Refuse (TrainingError, one line) to resume with other data or trained settings than the run's
        checkpoint record says, unless allow_changes (then log them)."""
        old = record.get("train")
        changes: list[str] = []
        c = self.cfg
        if isinstance(old, dict):
            fields = TRAINED_FIELDS + (IMAGE_TRAINED_FIELDS if c.kind == "image" else ())
            size = self.model_cfg.image_size
            for name in fields:
                if name not in old and name not in _NEWER_FIELDS:
                    continue
                was, now = old.get(name, _NEWER_FIELDS.get(name)), getattr(c, name)
                if name == "tile_stride":
                    was, now = was or size // 2, now or size // 2
                if name == "init_from" and _same_path(was, now):
                    continue
                if was != now:
                    changes.append(f"{name} {was} -> {now}")
            if c.kind == "image" and isinstance(old.get("steps"), int) and old["steps"] <= step < c.steps:
                changes.append(f"steps {old['steps']} -> {c.steps} (stage-2 fine-tuning began at step "
                               f"{old['steps']}; this would go back to stage 1)")
        was_fp = record.get("data_fingerprint")
        if was_fp and was_fp != self.data.fingerprint:
            was_data = old.get("data") if isinstance(old, dict) else None
            fps = f"fingerprint {was_fp} -> {self.data.fingerprint}"
            if was_data and c.data and not _same_path(was_data, c.data):
                changes.append(f"data {was_data} -> {c.data} ({fps})")
            else:
                changes.append(f"data {c.data + ' ' if c.data else ''}changed ({fps})")
        if not changes:
            return
        if not self.allow_changes:
            raise TrainingError(f"{self.run_dir} was trained with other settings: {'; '.join(changes)}. Use a "
                                f"new run folder, or pass --allow-changes to continue this run with them")
        if self.main:
            self._log_event("resumed with changes (allowed): " + "; ".join(changes), step=step)
            if self.show_progress:
                print(f"resuming with changes: {'; '.join(changes)}", file=sys.stderr)

    def _training_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        model = self.acc.unwrap_model(self.model)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        optim, groups = optimizer_tensors(self.opt)
        tensors.update(optim)
        if self.cfg.kind == "structure":
            tensors[REFERENCE_KEY] = torch.from_numpy(self._layout_reference())
        gen_states = self.acc.gather(self.gen.get_state().to(self.acc.device)[None]).cpu()
        for r in range(gen_states.shape[0]):
            tensors[f"rng.gen.{r}"] = gen_states[r]
        return tensors, {"param_groups": groups}

    def _layout_reference(self) -> np.ndarray:
        """(N, 5) layout features of (up to 1000 of) the training tiles, computed once (engine.curate)."""
        if self._reference is None:
            self._reference = reference_from_insts(list(self.data.insts), seed=self.cfg.seed)
        return self._reference

    def trained_on(self) -> list[str]:
        """Every machine this run's weights were trained on (engine.precision.machine_description): those the
        checkpoint it resumed or started from names, then this one."""
        here = machine_description(self.acc.device)
        return [m for m in self._inherited.get("trained_on", []) if m != here] + [here]

    def save(self) -> Path | None:
        """Write latest (atomic) and a snapshot hard link; prune old snapshots. Main process only."""
        tensors, optim = self._training_tensors()
        if not self.main:
            return None
        extra = {**self._inherited, "train": self.cfg.to_dict(), "optimizer": optim,
                 "data_fingerprint": self.data.fingerprint, "num_processes": self.acc.num_processes,
                 "precision": self.precision, "trained_on": self.trained_on()}
        path = save_checkpoint(self.run_dir / "latest", tensors, kind=self.cfg.kind, model=self.model_cfg,
                               diffusion=self.diffusion, contents="training", step=self.step, extra=extra)
        snap = self.run_dir / f"step_{self.step:07d}"
        for src, dst in zip(checkpoint_paths(self.run_dir / "latest"), checkpoint_paths(snap)):
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                atomic_write_bytes(dst, src.read_bytes())
        snaps = sorted(self.run_dir.glob("step_*.json"))
        for old in snaps[: max(0, len(snaps) - self.cfg.keep_last)]:
            for p in checkpoint_paths(old):
                p.unlink(missing_ok=True)
        return path

    def export(self) -> Path:
        """EMA weights as run_dir/model (inference checkpoint)."""
        size = self.cfg.extra.get("sample_size")
        return export_inference(self.run_dir / "latest", self.run_dir / "model", half=False,
                                extra={"sample_size": int(size)} if size else None)

    # --- logging -----------------------------------------------------------------------------------

    def _status(self, state: str, message: str = "", loss: float | None = None, **extra) -> None:
        if not self.main:
            return
        write_status(self.run_dir, {"state": state, "kind": self.cfg.kind, "step": self.step,
                                    "total": self.cfg.total_steps, "loss": loss, "message": message, **extra})

    def _log_event(self, message: str, step: int | None = None) -> None:
        """Append {"step", "event", "time"} to log.jsonl (step: default the trainer's current step)."""
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step if step is None else step, "event": message,
                                "time": time.time()}) + "\n")

    def preview(self, n: int | None = None) -> Path | None:
        """Sample n tiles from the EMA model as the CLI and studio do (DDIM 20 steps, eta = 1; the image
        model with w = 2 on the structures of the first n training tiles) and save them as a PNG grid,
        previews/step_*.png and latest.png. Default n: 8 layouts for a structure run, 4 images otherwise.

        A structure run also appends a ``preview`` line to log.jsonl: the layouts' mean nuclei per tile
        and foreground fraction, next to the training tiles' (``real``). Too many nuclei per tile is how an
        undertrained structure model shows (docs/benchmarks.md §6i); the Train tab prints the comparison.
        """
        from PIL import Image

        from engine.samplers import sample

        if not self.main:
            return None
        size = self.model_cfg.image_size
        structure = self.cfg.kind == "structure"
        n = min(n or (8 if structure else 4), len(self.data))
        cond = None
        if not structure:
            cond = torch.stack([torch.from_numpy(instances_to_structure(self.data.insts[i])).permute(2, 0, 1)
                                for i in range(n)])
        x = sample(self.ema, (n, 3, size, size), sampler="ddim", seeds=list(range(n)), cond=cond,
                   w=0.0 if structure else 2.0, diffusion=self.diffusion)
        pics, layouts = [], []
        for i in range(n):
            arr = x[i].permute(1, 2, 0).cpu().numpy()
            if structure:
                layouts.append(structure_to_instances(arr))
                pics.append(render.colorize_instances(layouts[-1]))
            else:
                img = render.to_uint8_image(arr)
                pics.append(render.overlay_contours(img, self.data.insts[i], opacity=0.6, color=(0, 255, 0)))
        if structure:
            self._log_layouts(layouts)
        out = self.run_dir / "previews"
        out.mkdir(parents=True, exist_ok=True)
        pic = Image.fromarray(render.grid(pics, cols=min(n, 4)))
        path = out / f"step_{self.step:07d}.png"
        pic.save(path)
        with atomic_output(out / "latest.png", temp=out / PREVIEW_TEMP) as tmp:
            pic.save(tmp, format="PNG")
        return path

    def _log_layouts(self, layouts: list[np.ndarray]) -> None:
        """Append {"step", "preview": {...}, "real": {...}} (nuclei_per_tile, fg_fraction) to log.jsonl."""
        def summary(features: np.ndarray, area: int) -> dict:
            return {"nuclei_per_tile": round(float(np.mean(np.expm1(features[:, 0]))) * area / 1e4, 3),
                    "fg_fraction": round(float(np.mean(features[:, 1])), 4), "n": int(len(features))}

        area = self.model_cfg.image_size ** 2
        row = {"step": self.step, "preview": summary(layout_features(layouts), area),
               "real": summary(self._layout_reference(), area)}
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    # --- loop --------------------------------------------------------------------------------------

    def _stage(self) -> tuple[float, float]:
        """(lr, drop_rate) at the current step: stage 1, then the classifier-free fine-tune; the lr is
        warmed up linearly over the run's first ``warmup_steps`` (whichever stage they fall in).

        Kept over torch's lr schedulers: this closed form resumes exactly with no saved state, where LinearLR /
        SequentialLR recompute the lr recursively (other last bits) and LambdaLR has one base lr, not two."""
        c = self.cfg
        warm = min(1.0, (self.step + 1) / c.warmup_steps) if c.warmup_steps > 0 else 1.0
        if c.kind == "image" and self.step >= c.steps:
            return c.finetune_lr * warm, c.finetune_drop_rate
        return c.lr * warm, c.drop_rate if c.kind == "image" else 0.0

    def _out_of_time(self) -> bool:
        return self.time_limit is not None and time.time() - self._started >= self.time_limit

    def _should_stop(self) -> bool:
        """Stop asked (callback, STOP file) or time up: polled every step; with many processes every
        ``STOP_POLL_STEPS`` steps, when all of them agree (a collective, which waits for the devices)."""
        if self.acc.num_processes > 1 and self.step % STOP_POLL_STEPS:
            return False
        local = (bool(self.stop_requested()) or self._terminated or (self.run_dir / "STOP").exists()
                 or self._out_of_time())
        flag = torch.tensor([1.0 if local else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0) if self.acc.num_processes > 1 else local

    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA, decay min(ema_decay, (1 + step) / (10 + step)), in the module self.ema (saved as ``ema.*``).
        Kept over the libraries': AveragedModel has no decay warm-up and copies at its first update; diffusers'
        EMAModel warms up a step later, updates by sub/mul (other last bits) and keeps its own state format."""
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        model = self.acc.unwrap_model(self.model)
        ema, live = list(self.ema.parameters()), [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, live, 1 - decay)  # one fused update instead of a kernel per tensor
        for e, b in zip(self.ema.buffers(), model.buffers()):
            e.copy_(b)

    def _check_losses(self, unchecked: list[torch.Tensor]) -> list[float]:
        """Read back the losses of the steps since the last check (all processes'); empties `unchecked`.

        Returns this process's values; raises TrainingError naming the first step whose loss (on any
        process) was not finite. Called before every save, so no checkpoint holds weights it reached.
        """
        if not unchecked:
            return []
        vals = torch.stack(unchecked)[None]
        unchecked.clear()
        rows = (self.acc.gather(vals) if self.acc.num_processes > 1 else vals).cpu()  # (processes, steps)
        finite = torch.isfinite(rows).all(0)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0, 0])
            bad = rows[:, first][~torch.isfinite(rows[:, first])][0].item()
            step = self.step - rows.shape[1] + first + 1
            msg = (f"loss became {bad} at step {step}; stopped. The last good checkpoint "
                   f"(step {self._last_saved_step()}) is intact; try a lower learning rate.")
            self._status("failed", msg)
            raise TrainingError(msg)
        return rows[self.acc.process_index].tolist()

    def run(self) -> Path:
        """Train to cfg.total_steps (or until stopped); returns the inference checkpoint's record path.

        Releases the run folder at the end, however it ends (and takes it again when run again)."""
        if self._released:
            self._take_folder()
            self._released = False
        previous = None
        if threading.current_thread() is threading.main_thread():
            def on_term(signum, frame):  # save and stop at the next step, as STOP does
                self._terminated = True
            previous = signal.signal(signal.SIGTERM, on_term)
        try:
            return self._run()
        except Exception as e:
            if not isinstance(e, NuDiffError):  # (a NuDiffError already said why)
                self._status("failed", f"{type(e).__name__}: {e}".splitlines()[0][:500])
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.close()

    def _run(self) -> Path:
        from tqdm.auto import tqdm

        c = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.main:
            (self.run_dir / "STOP").unlink(missing_ok=True)
            atomic_write_bytes(self.run_dir / "train_config.json", json.dumps(c.to_dict(), indent=2).encode())
        self.acc.wait_for_everyone()
        self._started = time.time()
        total = c.total_steps
        bar = tqdm(total=total, initial=self.step, disable=not (self.main and self.show_progress),
                   desc=f"train {c.kind}", dynamic_ncols=True)
        self._status("running", "training")
        window: list[float] = []  # checked losses of this process since the last log line
        unchecked: list[torch.Tensor] = []  # losses on the device, read back (one sync) every log/save
        t0 = time.time()
        stopped = False
        try:
            while self.step < total:
                if self._should_stop():
                    stopped = True
                    break
                lr, drop = self._stage()
                for g in self.opt.param_groups:
                    g["lr"] = lr
                idx = torch.randint(0, len(self.data), (c.batch_size,), generator=self.gen)
                x, y = self.data.batch(idx, self.gen, device=self.acc.device)
                x0, cond = (x, y) if c.kind == "image" else (y, None)
                # timesteps and noise are drawn on the device, from a seed drawn from self.gen (saved, so
                # resume is exact) -- no host-to-device copy of a batch of noise every step
                self.noise_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.gen)))
                self.model.train()
                with self.acc.autocast():
                    loss = self.schedule.loss(self.model, x0, cond, drop_rate=drop, generator=self.noise_gen,
                                              min_snr_gamma=c.min_snr_gamma)
                self.opt.zero_grad(set_to_none=True)
                self.acc.backward(loss)
                if c.grad_clip > 0:
                    self.acc.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                self.opt.step()
                self.step += 1
                self._update_ema()
                unchecked.append(loss.detach().float())
                bar.update(1)
                if self.step % c.log_every == 0 or self.step == total:
                    window += self._check_losses(unchecked)
                    mean = float(np.mean(window))
                    window.clear()
                    bar.set_postfix(loss=f"{mean:.4f}")
                    if self.main:
                        with open(self.run_dir / "log.jsonl", "a") as f:
                            f.write(json.dumps({"step": self.step, "loss": mean, "lr": lr, "drop_rate": drop,
                                                "elapsed": round(time.time() - t0, 2)}) + "\n")
                    self._status("running", "training", mean)
                if self.step % c.save_every == 0 and self.step < total:
                    window += self._check_losses(unchecked)
                    self.save()
                if c.preview_every and self.step % c.preview_every == 0:
                    self.preview()
        except KeyboardInterrupt:
            stopped = True
        finally:
            bar.close()
        self._check_losses(unchecked)  # never save weights that a non-finite loss has reached
        self.save()
        self.acc.wait_for_everyone()
        out = self.export() if self.main else self.run_dir / "model.json"
        if stopped:
            reason = "time_limit" if self._out_of_time() else "terminated" if self._terminated else "requested"
            why = {"time_limit": " (time limit)", "terminated": " (terminated)", "requested": ""}[reason]
            self._status("stopped", f"stopped at step {self.step}{why}; run again to resume", reason=reason)
        else:
            if self.main and c.preview_every and self.step % c.preview_every:
                self.preview()  # (a preview at this step was already made in the loop otherwise)
            self._status("finished", f"finished {self.step} steps")
        return out

    def _last_saved_step(self) -> int:
        try:
            return int(json.loads((self.run_dir / "latest.json").read_text())["step"])
        except (OSError, KeyError, json.JSONDecodeError):
            return 0

