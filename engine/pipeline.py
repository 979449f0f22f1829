"""Generation API shared by the CLI and the studio: load models, sample structures, synthesize images.

Everything is reproducible from a seed: sample i of a call with seed s uses seed s + i, whatever the
batch size (see engine.samplers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engine.canvas import CanvasPlan, plan_canvas, sample_canvas
from engine.checkpoint import load_checkpoint, recommended_w
from engine.colour_prior import COLOUR_KEY, colour_targets
from engine.conditioning import Condition, Provenance
from engine.config import PAPER_W, DiffusionConfig, UNetConfig
from engine.curate import CURATE_MODES, REFERENCE_KEY, curate, layout_features
from engine.errors import CheckpointError, NuDiffError
from engine.fileio import resolve_device
from engine.memory import Plan, plan_windows
from engine.precision import PRECISIONS, bf16_is_fast
from engine.samplers import SAMPLERS, sample
from engine.structure import instances_to_structure, smooth_outlines, structure_to_instances
from engine.tiling import TilingOptions
from engine.unet import UNet

__all__ = ["LoadedModel", "load_model", "check_precision", "StructureSample", "Pair", "sample_structures", "synthesize",
           "generate_pairs", "PairSettings", "sampler_steps", "resolve_device", "Progress", "curate_structures",
           "candidate_count", "shard_range", "TilingOptions", "plan_structure_canvas", "plan_image_canvas"]

Progress = Callable[[int, int], None]


@dataclass
class LoadedModel:
    """A model ready for sampling (EMA weights, eval mode)."""

    kind: str
    model: UNet
    config: UNetConfig
    diffusion: DiffusionConfig
    path: Path
    sha256: str
    step: int
    sample_size: int | None = None
    layout_reference: np.ndarray | None = None  # (N, 5) float32 engine.curate features of the training tiles
    recommended_w: float | None = None  # image models: calibrated guidance scale (engine.guidance), if any
    autocast: bool = True  # bf16 autocast where it is fast (engine.precision.bf16_is_fast); False: fp32
    colour_reference: np.ndarray | None = None  # image models: (K, 3|4) training tiles' colours (colour_prior)

    @property
    def image_size(self) -> int:
        """Default tile size for sampling (a model trained on small crops may sample larger tiles)."""
        return int(self.sample_size or self.config.image_size)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def device(self) -> torch.device:
        """Where the model's weights (and its sampling's tensors) are."""
        return next(self.model.parameters()).device

    def stored_colours(self) -> np.ndarray:
        """The training tiles' colours stored with this image model (engine.colour_prior): (K, 3|4) float32;
        CheckpointError if it stores none. The one check behind every "colour prior: model" request."""
        if self.colour_reference is None:
            raise CheckpointError(f"{self.path.name} stores no training colours: add them with `python -m engine "
                                  "export-model --reference DIR`, or synthesize without the model's colours")
        return self.colour_reference

    @property
    def precision(self) -> str:
        """What sampling with this model computes in here: "bf16" (autocast) or "fp32"; recorded with every
        pair, since the two give samples that differ by rounding."""
        return "bf16" if self.autocast and bf16_is_fast(self.device) else "fp32"


def check_precision(precision: str) -> str:
    """``precision`` if it is one of PRECISIONS ("auto", "fp32"), else a NuDiffError naming them."""
    if precision not in PRECISIONS:
        raise NuDiffError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def load_model(path: str | os.PathLike, kind: str | None = None, device: str = "auto",
               precision: str = "auto") -> LoadedModel:
    """Load a checkpoint (inference or training) as a sampling-ready model; CheckpointError if unfit.

    precision: "auto" samples with bf16 autocast where that is fast (a GPU, a CPU with native bf16: about
    twice as fast, layouts and images as real as in fp32, docs/benchmarks.md §3), else in fp32; "fp32"
    always in fp32 (bit-for-bit the same samples on every CPU of the same kind)."""
    check_precision(precision)
    ck = load_checkpoint(path, kind=kind)
    model = UNet(ck.model_config)
    try:
        model.load_state_dict(ck.weights_for_inference())
    except RuntimeError as e:
        raise CheckpointError(f"{ck.path}: weights do not fit its model config ({str(e).splitlines()[0]})") from None
    dev = resolve_device(device)
    model.to(dev).eval().requires_grad_(False)
    ref, colours = ck.tensors.get(REFERENCE_KEY), ck.tensors.get(COLOUR_KEY)
    return LoadedModel(ck.kind, model, ck.model_config, ck.diffusion_config, ck.path, ck.sha256, ck.step,
                       ck.record.get("sample_size"), None if ref is None else ref.float().numpy(),
                       recommended_w(ck.record), precision == "auto",
                       None if colours is None else colours.float().numpy())


@dataclass
class StructureSample:
    """A sampled nuclei structure (H, W, 3) float32 in [-1, 1] and its instance map (H, W) int32;
    ``outline_sigma`` > 0: the map's outlines were smoothed (engine.structure.smooth_outlines) after the
    watershed, so the structure images are conditioned on is rebuilt from the map."""

    structure: np.ndarray
    inst: np.ndarray
    seed: int
    outline_sigma: float = 0.0

    @property
    def n_nuclei(self) -> int:
        return int(self.inst.max())

    @property
    def sampled_structure(self) -> np.ndarray | None:
        """The structure to condition images on as it is: the sampled one, or None where the map's outlines
        were smoothed (the structure is then rebuilt from the map, so image and label stay aligned)."""
        return self.structure if self.outline_sigma <= 0 else None

    def origin(self) -> dict:
        """Where this sample's map came from (engine.conditioning.ORIGIN_KEYS): sampled, its seed, and the sigma
        of its outline smoothing where it had one."""
        smoothed = {"outline_sigma": float(self.outline_sigma)} if self.outline_sigma > 0 else {}
        return {"source": "sampled", "structure_seed": self.seed, **smoothed}

    def condition(self, model: "LoadedModel", **origin) -> Condition:
        """This sample as the image model's condition (:attr:`sampled_structure`, else rebuilt from the map),
        with its provenance."""
        origin = {**self.origin(), "structure_checkpoint": model.path.name, "structure_sha256": model.sha256,
                  **origin}
        if self.sampled_structure is None:
            return Condition.from_instances(self.inst, **origin)
        return Condition.sampled(self.sampled_structure, self.inst, **origin)


@dataclass
class Pair:
    """An aligned synthetic pair: image (H, W, 3) uint8 RGB, instance map (H, W) int32, provenance."""

    image: np.ndarray
    inst: np.ndarray
    meta: dict = field(default_factory=dict)


def sampler_steps(sampler: str, steps: int | None) -> int:
    """The denoising steps a call will run: ``steps``, or the sampler's default; NuDiffError for an unknown
    sampler or steps outside 1..1000."""
    if sampler not in SAMPLERS:
        raise NuDiffError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = int(steps or SAMPLERS[sampler].steps)
    if not 1 <= steps <= 1000:
        raise NuDiffError(f"steps must be between 1 and 1000, got {steps}")
    return steps


def plan_structure_canvas(model: LoadedModel, size: int | None = None,
                          tiling: TilingOptions | None = None) -> CanvasPlan:
    """How a structure of `size` px (default: the model's) is sampled: one pass or windows; memory checked."""
    size = int(size or model.image_size)
    return plan_canvas(model.config, model.image_size, size, size, guided=False, options=tiling, watershed=True,
                       what="structure", device=model.device)


def plan_image_canvas(model: LoadedModel, shape: tuple[int, int], w: float = 2.0,
                      tiling: TilingOptions | None = None) -> CanvasPlan:
    """How an image for an (H, W) structure is synthesized: one pass or windows; memory checked."""
    return plan_canvas(model.config, model.image_size, shape[0], shape[1], guided=float(w) != 0, options=tiling,
                       what="image", device=model.device)


def _direct_batch(model: LoadedModel, plan: CanvasPlan, batch_size: int, guided: bool,
                  tiling: TilingOptions | None) -> Plan:
    """Samples per pass for canvases that take one window each (``window_batch``: batch_size, lowered to fit
    the budget), and the memory left for the condition's SPADE modulation (``cache_bytes``)."""
    if batch_size < 1:
        raise NuDiffError(f"batch size must be at least 1, got {batch_size}")
    budget = (tiling or TilingOptions()).max_memory_gb
    return plan_windows(model.config, plan.padded, plan.padded, guided=guided, max_window_batch=batch_size,
                        budget_gb=budget, canvases=None, what="batch", device=model.device)


class _StepCounter:
    """Turns per-batch progress into overall progress over all batches."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def batch(self, steps: int) -> Progress:
        base = self.done
        self.done += steps

        def cb(i: int, _n: int) -> None:
            if self.progress is not None:
                self.progress(base + i, self.total)
        return cb

    def tick(self) -> None:
        """One unit of work done (a window batch of a tiled canvas)."""
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


def candidate_count(n: int, oversample: float) -> int:
    """Structures sampled to keep n with the realism filter at factor oversample (n when it is off)."""
    return max(n, int(np.ceil(n * oversample - 1e-9)))


def sample_structures(
    model: LoadedModel,
    n: int,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    seed: int = 0,
    size: int | None = None,
    batch_size: int = 8,
    oversample: float = 1.0,
    reference: np.ndarray | None = None,
    filter_mode: str = "sample",
    merge_below: float = 0.0,
    outline_sigma: float = 0.0,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    tiling: TilingOptions | None = None,
) -> list[StructureSample]:
    """Sample n nuclei structures and their instance maps (watershed).

    oversample > 1 turns on the layout realism filter (engine.curate): ceil(n * oversample) structures
    are sampled (seeds seed, seed+1, ...) and n of them kept, those whose layout statistics best follow
    ``reference`` ((N, 5) engine.curate.layout_features of real tiles; default: the one stored in the
    checkpoint); ``filter_mode`` "sample" (rejection sampling, keeps the set diverse) or "top" (the n most
    realistic, deterministic), engine.curate. Without it, sample i uses seed + i. ``merge_below``:
    fragments under this fraction of the median nucleus area that touch another nucleus join it in the
    instance map (0 = off, the paper's watershed; 0.2 removes most watershed fragments,
    docs/benchmarks.md §6d). The structure itself, on which images are conditioned, is left as sampled.
    ``outline_sigma`` > 0 rounds each nucleus's outline (engine.structure.smooth_outlines, Gaussian sigma in
    px; 0 = off, the paper's maps; 3 brings the demo model's nucleus solidity to real tiles', docs/benchmarks.md
    §13); such a sample's condition is then rebuilt from its map (:meth:`StructureSample.condition`).

    ``size`` larger than the model's tile: each structure is sampled as overlapping windows fused at every
    step (engine.tiling; ``tiling`` sets tile, overlap, window batch and memory budget, checked before any
    work), then one watershed runs over the whole map, so nuclei on window borders are not cut. Sizes that
    are not a multiple of the U-Net's downsampling factor are padded and cropped back. progress counts
    steps (window batches x steps for a tiled canvas).
    """
    _check_structure_args(model, n, oversample, merge_below, filter_mode, outline_sigma)
    total = candidate_count(n, oversample)
    ref = reference if reference is not None else model.layout_reference
    _require_reference(model, ref, total > n)
    steps = sampler_steps(sampler, steps)
    plan = plan_structure_canvas(model, size, tiling)
    out: list[StructureSample] = []
    if plan.tiled or plan.padded != (plan.height, plan.width):
        counter = _StepCounter(progress, steps * plan.units_per_step() * total)
        for i in range(total):
            arr = sample_canvas(model.model, plan, channels=3, seed=seed + i, sampler=sampler, steps=steps,
                                diffusion=model.diffusion, progress=counter.tick, cancel=cancel,
                                autocast=model.autocast)
            out.append(_structure_sample(arr, seed + i, merge_below, outline_sigma))
        return curate_structures(out, n, ref, seed=seed, mode=filter_mode) if total > n else out
    size = plan.height
    batch_size = _direct_batch(model, plan, batch_size, False, tiling).window_batch
    counter = _StepCounter(progress, steps * ((total + batch_size - 1) // batch_size))
    for start in range(0, total, batch_size):
        seeds = [seed + i for i in range(start, min(total, start + batch_size))]
        x = sample(model.model, (len(seeds), 3, size, size), sampler=sampler, steps=steps, seeds=seeds,
                   diffusion=model.diffusion, progress=counter.batch(steps), cancel=cancel, autocast=model.autocast)
        for s, arr in zip(seeds, x.permute(0, 2, 3, 1).float().cpu().numpy()):
            out.append(_structure_sample(arr.astype(np.float32), s, merge_below, outline_sigma))
    if total > n:
        out = curate_structures(out, n, ref, seed=seed, mode=filter_mode)
    return out


def _structure_sample(structure: np.ndarray, seed: int, merge_below: float, outline_sigma: float) -> StructureSample:
    """A sampled structure with its instance map: watershed, fragment merge, outline smoothing."""
    inst = structure_to_instances(structure, merge_below=merge_below)
    if outline_sigma > 0:
        inst = smooth_outlines(inst, outline_sigma)
    return StructureSample(structure, inst, seed, float(outline_sigma))


def _check_structure_args(model: LoadedModel, n: int, oversample: float, merge_below: float,
                          filter_mode: str, outline_sigma: float) -> None:
    if model.kind != "structure":
        raise CheckpointError(f"{model.path.name} is a {model.kind} model, not a structure model")
    if n < 1:
        raise NuDiffError("number of structures must be at least 1")
    check_layout_options(oversample, outline_sigma)
    if not 0.0 <= merge_below < 1.0:
        raise NuDiffError(f"merge_below must be in [0, 1) (a fraction of the median nucleus area), got {merge_below}")
    if filter_mode not in CURATE_MODES:
        raise NuDiffError(f"unknown realism filter mode {filter_mode!r}; choose one of {', '.join(CURATE_MODES)}")


def check_layout_options(oversample: float, outline_sigma: float) -> None:
    """The bounds of the realism filter's oversampling (1 = off, up to 100) and of outline smoothing (sigma in px,
    0 = off, up to 10); NuDiffError outside them. Callers that spend time before sampling check them first."""
    if not oversample >= 1.0 or oversample > 100:
        raise NuDiffError(f"oversample must be between 1 (filter off) and 100, got {oversample}")
    if not 0.0 <= outline_sigma <= 10.0:
        raise NuDiffError(f"outline smoothing must be a sigma in px between 0 (off) and 10, got {outline_sigma}")


def _require_reference(model: LoadedModel, ref: np.ndarray | None, filtering: bool) -> None:
    if filtering and ref is None:
        raise NuDiffError(f"{model.path.name} stores no layout reference for the realism filter: give a folder "
                          f"of real labeled tiles as reference, re-export the model with one, or set oversample to 1")


def curate_structures(samples: list[StructureSample], keep: int, reference: np.ndarray,
                      seed: int = 0, mode: str = "sample") -> list[StructureSample]:
    """The `keep` samples kept by the layout realism filter against `reference` (engine.curate)."""
    idx = curate(reference, layout_features([s.inst for s in samples]), keep, seed=seed, mode=mode)
    return [samples[i] for i in idx]


def _structure_shape(item: np.ndarray | Condition) -> tuple[int, int]:
    """(H, W) of a structure (H, W, 3), an instance map (H, W) or a Condition; NuDiffError for anything else."""
    shape = np.shape(item.inst if isinstance(item, Condition) else item)
    if len(shape) == 2 or (len(shape) == 3 and shape[-1] == 3):
        return int(shape[0]), int(shape[1])
    raise NuDiffError(f"expected a structure (H, W, 3) or an instance map (H, W), got shape {tuple(shape)}")


def as_structure(item: np.ndarray | Condition) -> np.ndarray:
    """The structure to condition on: a Condition's, a structure (H, W, 3) float as it is, or one rebuilt
    from an instance map (H, W) int (engine.conditioning says when which)."""
    if isinstance(item, Condition):
        return np.asarray(item.structure, np.float32)
    a = np.asarray(item)
    if a.ndim == 2:
        return instances_to_structure(a)
    if a.ndim == 3 and a.shape[-1] == 3:
        return a.astype(np.float32)
    raise NuDiffError(f"expected a structure (H, W, 3) or an instance map (H, W), got shape {a.shape}")


def synthesize(
    model: LoadedModel,
    structures: list[np.ndarray | Condition],
    *,
    w: float = 2.0,
    sampler: str = "ddim",
    steps: int | None = None,
    seed: int = 0,
    variants: int = 1,
    batch_size: int = 4,
    seeds: list[int] | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    tiling: TilingOptions | None = None,
    colour_prior: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Images for the given structures with classifier-free guidance scale w.

    structures: each an engine.conditioning.Condition (its structure is used), an (H, W, 3) float
    structure or an (H, W) instance map (its structure is rebuilt), of any size and shape (at least 8 px
    a side). Returns len(structures) * variants uint8 (H, W, 3) RGB images, ordered structure-major;
    variant v of structure j uses seed + j * variants + v, or seeds[j] + v when per-structure seeds are
    given. An image depends only on its structure and seed, up to float rounding (at most 1 gray level)
    when it is batched with different neighbours.

    Structures of one square size up to the model's tile run batch_size at a time, in one pass each. A
    structure larger than the tile is synthesized as overlapping windows whose guided noise predictions
    are fused at every step (engine.tiling; ``tiling`` sets tile, overlap, window batch and the memory
    budget, checked before any work: MemoryBudgetError when it cannot fit). Other shapes are padded with
    background to a size the U-Net takes and cropped back. progress counts steps (window batches x steps
    for a tiled canvas). colour_prior: (K, 3) mean colours of training tiles in [-1, 1], or (K, 4) with
    their foreground fractions (engine.colour_prior.tile_mean_colours; a model's own is
    ``model.colour_reference``): each image's mean colour, which the model cannot see at the first steps, is
    then that of one of them, drawn by its seed (with fractions: among those nearest its layout's nucleus
    area). None: the model's own guess, as trained.
    """
    if model.kind != "image":
        raise CheckpointError(f"{model.path.name} is a {model.kind} model, not an image model")
    if not structures:
        raise NuDiffError("no structure to synthesize from")
    if not 0 <= float(w) <= 50:
        raise NuDiffError(f"guidance scale w must be between 0 and 50, got {w}")
    if variants < 1:
        raise NuDiffError("variants must be at least 1")
    if seeds is not None and len(seeds) != len(structures):
        raise NuDiffError(f"{len(seeds)} seeds for {len(structures)} structures")
    steps = sampler_steps(sampler, steps)
    shapes = [_structure_shape(s) for s in structures]
    plans = [plan_image_canvas(model, hw, w, tiling) for hw in shapes]  # all checked before any work
    conds = [as_structure(s) for s in structures]
    jobs = [(j, v) for j in range(len(conds)) for v in range(variants)]

    def job_seed(j: int, v: int) -> int:
        return (seed + j * variants if seeds is None else int(seeds[j])) + v

    foreground = [float((c[..., 0] > 0).mean()) for c in conds]  # layouts' nucleus area, for colour_targets

    def targets(job_seeds: list[int], structure_ids: list[int]) -> torch.Tensor | None:
        if colour_prior is None:
            return None
        return colour_targets(colour_prior, job_seeds, [foreground[j] for j in structure_ids]).to(model.device)

    p0 = plans[0]
    if any(p.tiled or p.padded != (p.height, p.width) or p.padded != p0.padded for p in plans):
        counter = _StepCounter(progress, steps * sum(plans[j].units_per_step() for j, _ in jobs))
        images: list[np.ndarray] = []
        for j, v in jobs:
            target = targets([job_seed(j, v)], [j])
            x = sample_canvas(model.model, plans[j], channels=3, seed=job_seed(j, v), sampler=sampler, steps=steps,
                              diffusion=model.diffusion, cond=conds[j], w=float(w), progress=counter.tick,
                              cancel=cancel, autocast=model.autocast,
                              colour_target=None if target is None else target[0])
            images.append(((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
        return images
    size = p0.height
    mem = _direct_batch(model, p0, batch_size, float(w) != 0, tiling)
    batch_size = mem.window_batch
    counter = _StepCounter(progress, steps * ((len(jobs) + batch_size - 1) // batch_size))
    dev = model.device
    images = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        cond = torch.stack([torch.from_numpy(conds[j]).permute(2, 0, 1) for j, _ in chunk]).to(dev)
        chunk_seeds = [job_seed(j, v) for j, v in chunk]
        x = sample(model.model, (len(chunk), 3, size, size), sampler=sampler, steps=steps, seeds=chunk_seeds,
                   cond=cond, w=float(w), diffusion=model.diffusion, progress=counter.batch(steps),
                   cancel=cancel, autocast=model.autocast, cache_bytes=mem.cache_bytes,
                   colour_targets=targets(chunk_seeds, [j for j, _ in chunk]))
        arr = ((x.permute(0, 2, 3, 1).float().cpu().numpy() + 1) * 127.5).round().clip(0, 255)
        images.extend(a.astype(np.uint8) for a in arr)
    return images


def shard_range(n: int, index: int, count: int) -> tuple[int, int]:
    """[lo, hi) of shard ``index`` of ``count`` when n items are split into contiguous, near-equal shards."""
    per = -(-n // count)
    lo = min(n, index * per)
    return lo, min(n, lo + per)


@dataclass(frozen=True)
class PairSettings:
    """How :func:`generate_pairs` makes pairs; each setting is recorded in the pairs' provenance.

    w: guidance scale (engine.config.PAPER_W = 2 is the paper's). sampler / steps: the image's denoising
    (engine.samplers; steps None = the sampler's default); structure_steps: the structure's (None = steps).
    seed: candidate i uses seed + i for its structure and its image. batch_size: samples per pass.
    min_nuclei: structures with fewer are kept but flagged (meta few_nuclei). size: side in px (None = the
    image model's sampling size; larger than the models' tile: fused overlapping windows).
    oversample / filter_mode: the layout realism filter of :func:`sample_structures` (1 = off).
    merge_below: its watershed fragment merge (0 = off). outline_sigma: its outline smoothing (0 = off).
    """

    w: float = PAPER_W
    sampler: str = "ddim"
    steps: int | None = None
    structure_steps: int | None = None
    seed: int = 0
    batch_size: int = 4
    min_nuclei: int = 1
    size: int | None = None
    oversample: float = 1.0
    filter_mode: str = "sample"
    merge_below: float = 0.0
    outline_sigma: float = 0.0


def generate_pairs(
    structure_model: LoadedModel,
    image_model: LoadedModel,
    n: int,
    settings: PairSettings | None = None,
    *,
    reference: np.ndarray | None = None,
    colour_prior: np.ndarray | None = None,
    colour_source: str = "",
    shard: tuple[int, int] = (0, 1),
    all_gather: Callable[[object], list] | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    tiling: TilingOptions | None = None,
) -> list[Pair]:
    """n synthetic pairs: sample structures, then synthesize an image for each (paper's two steps).

    Each image is conditioned on its structure as sampled (engine.conditioning.Condition; rebuilt from the map
    where ``settings.outline_sigma`` smoothed its outlines), with the structure's seed, so ``sample-structures``
    + ``synthesize`` and the studio give the same pair.
    ``settings``: :class:`PairSettings` (default: its defaults). ``reference``: real tiles' layout features
    for the realism filter (default: the structure model's own). ``colour_prior``: (K, 3|4) training tiles'
    mean colours for the images (:func:`synthesize`; None: off), recorded in the provenance as
    ``colour_source``. ``tiling``: engine.tiling.TilingOptions (windows, memory budget, checked before any
    work).

    ``shard=(index, count)`` with ``all_gather`` (object -> list of every shard's object, e.g.
    torch.distributed.all_gather_object) splits the work over ``count`` processes: each samples a
    contiguous share of the candidate structures, the realism filter runs once on all candidates' layout
    features (shard 0 decides), and each synthesizes images for its own kept candidates. Returns this
    shard's pairs; concatenated in shard order they equal a single-process call (up to float rounding
    between batch compositions).
    """
    st = settings or PairSettings()
    index, count = shard
    if not 0 <= index < count:
        raise NuDiffError(f"shard {index} of {count} does not exist")
    if count > 1 and all_gather is None:
        raise NuDiffError("a sharded generation needs all_gather")
    steps = sampler_steps(st.sampler, st.steps)
    structure_steps = sampler_steps(st.sampler, st.structure_steps or steps)
    size = int(st.size or image_model.image_size)
    _check_structure_args(structure_model, n, st.oversample, st.merge_below, st.filter_mode, st.outline_sigma)
    splan = plan_structure_canvas(structure_model, size, tiling)  # refused here, before any work, if too big
    iplan = plan_image_canvas(image_model, (size, size), st.w, tiling)
    total = candidate_count(n, st.oversample)
    ref = reference if reference is not None else structure_model.layout_reference
    _require_reference(structure_model, ref, total > n)
    share = (structure_steps * max(1.0, st.oversample)
             / (structure_steps * max(1.0, st.oversample) + steps))  # fraction of the work spent on structures

    def scaled(lo: float, hi: float) -> Progress | None:
        """Report a sub-task's (i, m) as permille of the whole generation."""
        if progress is None:
            return None
        return lambda i, m: progress(int(1000 * (lo + (hi - lo) * i / max(m, 1))), 1000)

    lo, hi = shard_range(total, index, count)
    structs = sample_structures(structure_model, hi - lo, sampler=st.sampler, steps=structure_steps,
                                seed=st.seed + lo, size=size, batch_size=st.batch_size, merge_below=st.merge_below,
                                outline_sigma=st.outline_sigma, progress=scaled(0, share), cancel=cancel,
                                tiling=tiling) if hi > lo else []
    if total > n:  # filter on every shard's layout features (5 numbers each), never moving the structures
        feats = layout_features([s.inst for s in structs])
        if count > 1:
            feats = np.concatenate(all_gather(feats))
        keep = curate(ref, feats, n, seed=st.seed, mode=st.filter_mode) if index == 0 else None
        if count > 1:
            keep = all_gather(keep)[0]
        kept = {int(i) for i in keep}
        structs = [s for j, s in enumerate(structs) if lo + j in kept]
    if not structs:
        return []
    conds = [s.condition(structure_model, structure_sampler=st.sampler, structure_steps=structure_steps)
             for s in structs]
    imgs = synthesize(image_model, conds, w=st.w, sampler=st.sampler, steps=steps, seeds=[s.seed for s in structs],
                      batch_size=st.batch_size, progress=scaled(share, 1), cancel=cancel, tiling=tiling,
                      colour_prior=colour_prior)
    pairs = []
    for s, cond, img in zip(structs, conds, imgs):
        prov = Provenance.of(cond, image_checkpoint=image_model.path.name, image_sha256=image_model.sha256,
                             seed=s.seed, w=st.w, sampler=st.sampler, steps=steps, precision=image_model.precision,
                             few_nuclei=s.n_nuclei < st.min_nuclei, oversample=float(st.oversample),
                             filter_mode=st.filter_mode if total > n else None, merge_below=float(st.merge_below),
                             colour_prior=colour_source if colour_prior is not None else "",
                             **_tiling_meta(splan, iplan))
        pairs.append(Pair(img, s.inst, prov.to_dict()))
    return pairs


def _tiling_meta(splan: CanvasPlan, iplan: CanvasPlan) -> dict:
    """Provenance of tiled sampling: the image's tile, overlap, windows; the structure's as structure_*."""
    out = {f"structure_{k}": v for k, v in splan.meta().items()}
    out.update(iplan.meta())
    return out
