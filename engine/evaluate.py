"""Downstream benchmark: does adding synthetic pairs help a nuclei segmenter? (the paper's Table 1)

For each labeled fraction (10 %, 20 %, 50 %, 100 % of nuclei by default) the paper's subset of real
training tiles is selected (:func:`engine.subset.select_subset`: tile features, KMeans, tiles nearest the
cluster centres until the fraction of nuclei is reached). A segmenter (:mod:`engine.segment`) is trained
on the subset ("labeled") and, with the same seed and number of steps, on the subset plus synthetic
pairs ("augmented"). Both are tested on held-out real images at full size (tiled inference); Dice, AJI,
AJI+ and PQ are averaged over the test images (and over repeats with different training seeds).

Output folder::

    results.csv / results.md / results.png   the table (CSV, Markdown) and a grouped bar plot
    results.json                             settings (and the ExperimentConfig as "config"), table rows and
                                             per-image metrics of every run
    runs/<run>/metrics.json                  one run (fraction x arm x repeat): settings and metrics
    runs/<run>/predictions/<stem>.tif        predicted instance maps of the test images (int32)
    runs/<run>/segmenter.safetensors/.json   the trained segmenter (save_models=True)
    runs/<run>/training-snapshot.safetensors a run in progress (every 200 steps; removed when it is done)

Finished runs are skipped when the experiment is started again with the same settings (resume), and a run
that was interrupted continues from its last snapshot, to the same model an uninterrupted run makes. The settings
are one :class:`ExperimentConfig` record; :func:`run_experiment` goes through named steps (load the inputs,
the settings all runs share, the plan of runs, each run's specification, train and test it, write the results).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from engine.data import LabeledImage, Tile, load_folder, tile_image
from engine.subset import SubsetSelection, plan_subset
from engine.errors import DataError, NuDiffError
from engine.fileio import atomic_write_bytes
from engine.metrics import aji, aji_plus, dice, pq
from engine.segment import AUGMENTS, Segmenter, SegmenterConfig, as_image_label_pairs, train_segmenter

__all__ = ["METRICS", "ARMS", "ExperimentConfig", "ExperimentResult", "parse_fractions", "resolve_synthetic",
           "evaluate_segmenter", "image_metrics", "run_experiment", "collect_results", "labeled_subset",
           "table_rows", "format_markdown", "format_gain", "format_image_gains", "write_table", "plot_results",
           "CSV_FIELDS"]

METRICS = ("dice", "aji", "aji_plus", "pq")
ARMS = ("labeled", "augmented")
CSV_FIELDS = ("training_data", "fraction", "arm", "repeats", "n_real_tiles", "n_synthetic", "nuclei_fraction",
              *[c for m in METRICS for c in (m, f"{m}_std", f"{m}_se")])
Log = Callable[[str], None]
SyntheticSpec = str | Path | Mapping[Any, Any] | None


# ----------------------------------------------------------------------------- inputs


def parse_fractions(values: str | Sequence[float | int | str]) -> list[float]:
    """'10,20,50,100' or [0.1, 0.2] or [10, 20] -> sorted unique fractions in (0, 1].
    Values above 1 are percentages. NuDiffError for anything else."""
    items = values.split(",") if isinstance(values, str) else list(values)
    out = set()
    for v in items:
        try:
            f = float(str(v).strip().rstrip("%"))
        except ValueError:
            raise NuDiffError(f"not a fraction: {v!r} (use e.g. 10,20,50,100 or 0.1,0.2)") from None
        f = f / 100.0 if f > 1.0 else f
        if not 0.0 < f <= 1.0:
            raise NuDiffError(f"fraction {v!r} is not in (0, 100] %")
        out.add(round(f, 6))
    if not out:
        raise NuDiffError("no fractions given")
    return sorted(out)


def _pct(fraction: float) -> str:
    """0.1 -> '10', 0.125 -> '12.5'."""
    return f"{fraction * 100:g}"


def resolve_synthetic(spec: SyntheticSpec, fractions: Sequence[float]) -> dict[float, Path | None]:
    """Synthetic folder of every fraction (None: no augmented arm for it).

    ``spec``: None (labeled only); one folder for all fractions; a template with ``{pct}`` (e.g.
    ``synth_{pct}`` -> synth_10, synth_20, ...) or ``{fraction}``; or a mapping from fraction (0.1), percent
    (10) or its string ('10', '10%') to a folder; fractions missing from a mapping get no augmented arm.
    DataError if a folder does not exist.
    """
    if spec is None:
        return {f: None for f in fractions}
    if isinstance(spec, Mapping):
        given = {}
        for key, folder in spec.items():
            given[parse_fractions([key])[0]] = Path(folder) if folder else None
        out = {f: given.get(round(f, 6)) for f in fractions}
    elif "{" in str(spec):
        try:
            out = {f: Path(str(spec).format(pct=_pct(f), fraction=f"{f:g}")) for f in fractions}
        except (KeyError, IndexError, ValueError) as e:
            raise NuDiffError(f"synthetic template {spec!r} may only use {{pct}} or {{fraction}} ({e})") from None
    else:
        out = {f: Path(spec) for f in fractions}
    for f, folder in out.items():
        if folder is not None and not folder.is_dir():
            raise DataError(f"synthetic folder for {_pct(f)}% not found: {folder}")
    return out


def _as_items(source: Any, what: str) -> list[LabeledImage]:
    """A folder, or a sequence of LabeledImage / (image, inst) pairs -> LabeledImages with stems."""
    if isinstance(source, (str, Path)):
        return load_folder(source)[0]
    items = []
    for k, item in enumerate(source):
        if isinstance(item, LabeledImage):
            items.append(item)
            continue
        (image, inst), = as_image_label_pairs([item], what)
        stem = str(getattr(item, "stem", None) or f"{what.replace(' ', '_')}_{k:04d}")
        items.append(LabeledImage(stem, image, inst, Path(stem), Path(stem)))
    if not items:
        raise DataError(f"no {what}")
    return items


# ----------------------------------------------------------------------------- metrics


def image_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Dice, AJI, AJI+, DQ, SQ, PQ of one predicted (H, W) instance map against the truth."""
    dq, sq, pq_ = pq(true, pred)
    return {"dice": dice(true, pred), "aji": aji(true, pred), "aji_plus": aji_plus(true, pred),
            "dq": dq, "sq": sq, "pq": pq_}


def evaluate_segmenter(segmenter: Segmenter, test_items: Sequence[LabeledImage],
                       predictions_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """Predict every test image (full size, tiled) -> {stem: image_metrics}; optionally save each
    prediction as ``predictions_dir/<stem>.tif`` (int32)."""
    import tifffile

    out = {}
    for item in test_items:
        pred = segmenter.predict(item.image)
        if predictions_dir is not None:
            buf = io.BytesIO()
            tifffile.imwrite(buf, pred.astype(np.int32))
            atomic_write_bytes(predictions_dir / f"{item.stem}.tif", buf.getvalue())
        out[item.stem] = image_metrics(item.inst, pred)
    return out


# ----------------------------------------------------------------------------- runner


@dataclass
class ExperimentResult:
    """Table rows (one per fraction x arm, see CSV_FIELDS), every run's record and the files written."""

    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _content_digest(items: Sequence[LabeledImage]) -> str:
    """Digest of the pairs' pixels (images and labels, in order): pairs regenerated under the same names
    (another w, seed or model) make another digest, so runs trained on the old pairs are not reused."""
    h = hashlib.sha256()
    for it in items:
        for a in (it.image, it.inst):
            a = np.ascontiguousarray(a)
            h.update(f"{it.stem}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def run_name(fraction: float, arm: str, repeat: int) -> str:
    """The folder of one run under ``runs/``, e.g. ``10pct_labeled_r0``."""
    return f"{_pct(fraction)}pct_{arm}_r{repeat}"


@dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of :func:`run_experiment` but its data, output folder and callbacks.

    Checked on construction (NuDiffError); ``fractions`` and ``arms`` are normalised (fractions as
    :func:`parse_fractions`, e.g. '10,20,50,100' -> (0.1, 0.2, 0.5, 1.0); arms deduplicated, in order).
    :meth:`to_dict` / :meth:`from_dict` round-trip it through JSON (results.json holds it as "config").
    """

    #: fractions of nuclei for the labeled subsets ('10,20,50,100', [10, 20] or [0.1, 0.2])
    fractions: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0)
    #: trainings per fraction and arm, with seeds ``seed + r``; the table reports mean and std
    repeats: int = 1
    #: run only this repeat (0-based, < repeats) of each fraction and arm, so that one arm's repeats can be
    #: split over processes into one output folder (its runs are the same as in a call that runs them all)
    only_repeat: int | None = None
    #: subset selection (KMeans) seed and first training seed
    seed: int = 0
    #: segmenter training steps (both arms)
    steps: int = 2000
    #: segmenter training crop size in px
    size: int = 128
    #: segmenter training batch size
    batch_size: int = 8
    #: segmenter learning rate
    lr: float = 1e-3
    #: real training images are cut into tiles of this size for subset selection (the paper: 256)
    tile_size: int = 256
    #: ... at this stride (the paper: 128)
    stride: int = 128
    #: KMeans clusters of the subset selection
    n_clusters: int = 6
    #: torch device of the segmenters ("auto", "cpu", "cuda", ...)
    device: str = "auto"
    #: segmenter architecture, inference and post-processing (same for both arms)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    #: augmented arm: share of the training crops drawn from synthetic pairs, in (0, 1); None pools real
    #: and synthetic pairs (crops area-weighted), as the paper does
    synthetic_share: float | None = None
    #: augmented arm: repeat r trains on the r-th block of this many synthetic pairs (folder order), so the
    #: spread over repeats includes which pairs were drawn (docs/benchmarks.md §6i); needs repeats x this
    #: many pairs. None: all pairs every repeat
    pairs_per_repeat: int | None = None
    #: segmenter training augmentation of both arms, "light" or "strong" (engine.segment.train_segmenter)
    augment: str = "light"
    #: arms to run; runs split over several calls into one folder are merged by :func:`collect_results`
    arms: tuple[str, ...] = ARMS
    #: save each trained segmenter in its run folder
    save_models: bool = True
    #: reuse finished runs with identical settings found in the output folder
    resume: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "fractions", tuple(parse_fractions(self.fractions)))
        arms = tuple(dict.fromkeys([self.arms] if isinstance(self.arms, str) else self.arms))
        object.__setattr__(self, "arms", arms)
        if self.synthetic_share is not None and not 0.0 < self.synthetic_share < 1.0:
            raise NuDiffError(f"synthetic_share must be in (0, 1), got {self.synthetic_share}")
        if self.repeats < 1:
            raise NuDiffError(f"repeats must be >= 1, got {self.repeats}")
        if self.only_repeat is not None and not 0 <= self.only_repeat < self.repeats:
            raise NuDiffError(f"only_repeat must be in 0..{self.repeats - 1}, got {self.only_repeat}")
        if self.augment not in AUGMENTS:
            raise NuDiffError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if self.pairs_per_repeat is not None and self.pairs_per_repeat < 1:
            raise NuDiffError(f"pairs_per_repeat must be >= 1, got {self.pairs_per_repeat}")
        if not arms or any(a not in ARMS for a in arms):
            raise NuDiffError(f"arms must be among {', '.join(ARMS)}, got {', '.join(map(str, arms)) or 'none'}")
        if not isinstance(self.segmenter, SegmenterConfig):
            raise NuDiffError(f"segmenter must be a SegmenterConfig, got {type(self.segmenter).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (equal to its own JSON round trip): tuples as lists, the segmenter config as a dict."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["segmenter"] = self.segmenter.to_dict()
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        """Inverse of :meth:`to_dict` (missing keys take their defaults); NuDiffError on unknown keys."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise NuDiffError(f"unknown experiment settings: {', '.join(unknown)}")
        kwargs = dict(data)
        if isinstance(kwargs.get("segmenter"), Mapping):
            kwargs["segmenter"] = SegmenterConfig.from_dict(dict(kwargs["segmenter"]))
        return cls(**kwargs)


@dataclass
class _Inputs:
    """The data of one experiment, loaded and checked (step 1 of :func:`run_experiment`)."""

    synth_dirs: dict[float, Path | None]  # synthetic folder of every fraction (None: no augmented arm)
    real_items: list[LabeledImage]
    test_items: list[LabeledImage]
    tiles: list[Tile]  # the real training tiles subsets are chosen from
    synth_cache: dict[Path, list[LabeledImage]] = field(default_factory=dict)


def run_experiment(real: str | Path | Sequence[Any], synthetic: SyntheticSpec, test: str | Path | Sequence[Any],
                   out_dir: str | Path, config: ExperimentConfig | None = None, *, log: Log | None = print,
                   progress: Callable[[int, int], None] | None = None) -> ExperimentResult:
    """Train and test segmenters on every fraction x {labeled, augmented} x repeat; write the table.

    Args:
        real: folder (or LabeledImages / (image, inst) pairs) of real training images; they are cut into
            ``config.tile_size`` tiles at ``config.stride`` for subset selection, as in the paper.
        synthetic: synthetic folders, see :func:`resolve_synthetic` (None: labeled arms only).
        test: folder (or pairs) of held-out real images, tested at full size.
        out_dir: output folder (created; finished runs in it are reused when ``config.resume``).
        config: the settings (:class:`ExperimentConfig`; None: its defaults).
        log: called with one line per event (None: silent). progress: (runs done, runs total).
    Returns:
        ExperimentResult; files results.csv / .md / .png / .json are in ``out_dir``.
    """
    config = config or ExperimentConfig()
    say = log or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = _load_inputs(real, synthetic, test, config, say)
    settings = _shared_settings(config, inputs.test_items)
    plan = _plan_runs(config, inputs.synth_dirs)
    runs: list[dict[str, Any]] = []
    for f in config.fractions:
        selection = plan_subset(inputs.tiles, f, n_clusters=config.n_clusters, seed=config.seed)
        subset = [inputs.tiles[i] for i in selection.indices]
        say(f"{_pct(f)}%: {len(subset)} of {len(inputs.tiles)} tiles, {selection.fraction_reached:.1%} of nuclei "
            f"({selection.feature_kind} features)")
        for arm, r in [(arm, r) for (g, arm, r) in plan if g == f]:
            folder = inputs.synth_dirs[f]
            pool = [] if arm == "labeled" else _load_synthetic(folder, inputs.synth_cache)
            spec, extra = _run_spec(settings, config, f, arm, r, subset, folder, pool)
            runs.append(_one_run(out / "runs" / run_name(f, arm, r), spec, subset, extra, inputs.test_items,
                                 selection.fraction_reached, device=config.device, cfg=config.segmenter,
                                 save_model=config.save_models, resume=config.resume, say=say))
            if progress is not None:
                progress(len(runs), len(plan))
    rows = table_rows(runs, list(config.fractions))
    files = _write_results(out, config, settings, inputs, rows, runs)
    say(f"results: {files['md']}")
    return ExperimentResult(rows, runs, out, files)


def _load_inputs(real: Any, synthetic: SyntheticSpec, test: Any, config: ExperimentConfig, say: Log) -> _Inputs:
    """Step 1: synthetic folders per fraction, real and test images, real tiles; a synthetic folder too short
    for ``pairs_per_repeat`` blocks is refused here, before any training (a usage error)."""
    synth_dirs = resolve_synthetic(synthetic, config.fractions)
    real_items = _as_items(real, "real training images")
    test_items = _as_items(test, "test images")
    tiles = _tiles(real_items, config.tile_size, config.stride)
    say(f"real: {len(real_items)} images -> {len(tiles)} tiles of {config.tile_size} px; "
        f"test: {len(test_items)} images")
    inputs = _Inputs(synth_dirs, real_items, test_items, tiles)
    last = config.repeats if config.only_repeat is None else config.only_repeat + 1
    need = last * (config.pairs_per_repeat or 0)
    if need and "augmented" in config.arms:
        for folder in dict.fromkeys(d for d in synth_dirs.values() if d is not None):
            have = len(_load_synthetic(folder, inputs.synth_cache))
            if have < need:
                raise NuDiffError(f"{folder} has {have} synthetic pairs; {last} repeats of "
                                  f"{config.pairs_per_repeat} disjoint pairs need {need}")
    return inputs


def _shared_settings(config: ExperimentConfig, test_items: Sequence[LabeledImage]) -> dict[str, Any]:
    """Step 2: the settings every run shares (part of each run's resume key, so their form is fixed)."""
    return {"steps": config.steps, "size": config.size, "batch_size": config.batch_size, "lr": config.lr,
            "config": config.segmenter.to_dict(), "tile_size": config.tile_size, "stride": config.stride,
            "n_clusters": config.n_clusters, "seed": config.seed, "synthetic_share": config.synthetic_share,
            # named only when not the default, so runs finished before the setting existed stay reusable
            **({"augment": config.augment} if config.augment != "light" else {}),
            "test": [(t.stem, t.inst.shape, int(t.inst.max())) for t in test_items]}


def _plan_runs(config: ExperimentConfig, synth_dirs: Mapping[float, Path | None]) -> list[tuple[float, str, int]]:
    """Step 3: (fraction, arm, repeat) of every run, in order; an augmented arm needs a synthetic folder."""
    repeats = range(config.repeats) if config.only_repeat is None else [config.only_repeat]
    plan = [(f, arm, r) for f in config.fractions for arm in config.arms for r in repeats
            if arm == "labeled" or synth_dirs[f] is not None]
    if not plan:
        raise NuDiffError("nothing to run: the augmented arm needs a synthetic folder for its fractions")
    return plan


def _run_spec(settings: dict[str, Any], config: ExperimentConfig, fraction: float, arm: str, repeat: int,
              subset: Sequence[Tile], folder: Path | None,
              pool: list[LabeledImage]) -> tuple[dict[str, Any], list[LabeledImage]]:
    """Step 4, per run: its full specification (the resume key is made from it) and its synthetic pairs."""
    # the share and the blocks only shape the augmented arm: labeled runs stay reusable
    share = config.synthetic_share if arm == "augmented" else None
    extra, block = pool, {}
    if config.pairs_per_repeat and arm == "augmented":
        lo = repeat * config.pairs_per_repeat
        extra = pool[lo:lo + config.pairs_per_repeat]
        block = {"pairs_per_repeat": config.pairs_per_repeat, "synthetic_block": [lo, lo + len(extra)]}
    spec = {**settings, **block, "synthetic_share": share, "fraction": fraction, "arm": arm, "repeat": repeat,
            "train_seed": config.seed + repeat,
            "subset": [(t.stem, t.y, t.x, int(t.inst.max())) for t in subset],
            "synthetic": None if folder is None else str(folder.resolve()),
            "synthetic_items": _content_digest(extra),
            "n_synthetic": len(extra)}
    return spec, extra


def _write_results(out: Path, config: ExperimentConfig, settings: dict[str, Any], inputs: _Inputs,
                   rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Path]:
    """Step 5: results.csv / .md / .png and results.json (settings, config, rows, runs)."""
    files = write_table(rows, out)
    files["png"] = plot_results(rows, out / "results.png")
    shown = {k: v for k, v in settings.items() if k != "test"}
    if config.pairs_per_repeat:
        shown["pairs_per_repeat"] = config.pairs_per_repeat  # (only the augmented runs' specs carry it)
    record = {"settings": shown, "config": config.to_dict(), "fractions": list(config.fractions),
              "repeats": config.repeats,
              "synthetic": {_pct(f): (str(d) if d else None) for f, d in inputs.synth_dirs.items()},
              "test_images": [t.stem for t in inputs.test_items], "rows": rows, "runs": runs}
    atomic_write_bytes(out / "results.json", json.dumps(record, indent=2, default=str).encode())
    files["json"] = out / "results.json"
    return files


def labeled_subset(real: str | Path | Sequence[Any], fraction: float | str, *, tile_size: int = 256,
                   stride: int = 128, n_clusters: int = 6, seed: int = 0) -> tuple[list[Tile], SubsetSelection]:
    """The subset tiles :func:`run_experiment` trains its segmenters on for ``fraction`` (same tiling,
    selection and seed), e.g. to train the diffusion models that augment that subset on it alone.
    Returns (selected tiles in selection order, the SubsetSelection)."""
    f, = parse_fractions([fraction])
    tiles = _tiles(_as_items(real, "real training images"), tile_size, stride)
    selection = plan_subset(tiles, f, n_clusters=n_clusters, seed=seed)
    return [tiles[i] for i in selection.indices], selection


def collect_results(out_dir: str | Path, log: Log | None = print) -> ExperimentResult:
    """Build the table from every finished run in ``out_dir/runs`` (e.g. arms run by separate processes
    or calls of :func:`run_experiment` into one folder): writes results.csv / .md / .png / .json.

    Runs whose settings differ from the others (other steps, crop size, test images, ...) would not be
    comparable: DataError naming them. DataError if no finished run is found.
    """
    out = Path(out_dir)
    runs, keys = [], {}
    for path in sorted((out / "runs").glob("*/metrics.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"unreadable run record {path}: {e}") from None
        runs.append(run)
        settings = dict(run.get("settings") or {})
        # the augmented arm's own settings are compared among augmented runs only: labeled runs are
        # reused across them (run_experiment), so they carry None there
        own = {k: settings.pop(k, None) for k in _AUGMENTED_ONLY}
        keys[run.get("name", path.parent.name)] = (_fingerprint(settings),
                                                   _fingerprint(own) if run.get("arm") == "augmented" else None)
    if not runs:
        raise DataError(f"no finished runs in {out / 'runs'}")
    if len({k[0] for k in keys.values()}) > 1 or len({k[1] for k in keys.values()} - {None}) > 1:
        raise DataError("runs in " + str(out) + " were made with different settings: "
                        + ", ".join(sorted(keys)) + " (use one output folder per experiment)")
    fracs = sorted({float(r["fraction"]) for r in runs})
    rows = table_rows(runs, fracs)
    files = write_table(rows, out)
    files["png"] = plot_results(rows, out / "results.png")
    shown = next((r for r in runs if r["arm"] == "augmented"), runs[0])  # holds the augmented-only settings
    record = {"settings": shown.get("settings"), "fractions": fracs,
              "repeats": max(r["repeats"] for r in rows),
              "synthetic": {_pct(r["fraction"]): r.get("synthetic") for r in runs if r["arm"] == "augmented"},
              "test_images": sorted(runs[0].get("per_image", {})), "rows": rows, "runs": runs}
    atomic_write_bytes(out / "results.json", json.dumps(record, indent=2, default=str).encode())
    files["json"] = out / "results.json"
    if log:
        log(f"results of {len(runs)} runs: {files['md']}")
    return ExperimentResult(rows, runs, out, files)


def _tiles(items: list[LabeledImage], size: int, stride: int) -> list[Tile]:
    """All tiles of the real training images (images smaller than ``size`` become one tile each)."""
    tiles: list[Tile] = []
    for item in items:
        if min(item.inst.shape) < size:
            tiles.append(Tile(item.image, item.inst, item.stem, 0, 0))
        else:
            tiles.extend(tile_image(item, size, stride))
    if not tiles:
        raise DataError("no real training tiles")
    return tiles


def _load_synthetic(folder: Path, cache: dict[Path, list[LabeledImage]]) -> list[LabeledImage]:
    if folder not in cache:
        cache[folder] = load_folder(folder)[0]
    return cache[folder]


def _one_run(run_dir: Path, spec: dict[str, Any], subset: list[Tile], extra: list[LabeledImage],
             test_items: Sequence[LabeledImage], nuclei_fraction: float, *, device: str, cfg: SegmenterConfig,
             save_model: bool, resume: bool, say: Log) -> dict[str, Any]:
    """Train one segmenter, test it, write runs/<name>/metrics.json; reuse a finished identical run
    (same settings, subset and synthetic pairs, wherever the synthetic folder now lies)."""
    key = _fingerprint({k: v for k, v in spec.items() if k != "synthetic"})
    metrics_path = run_dir / "metrics.json"
    name = run_dir.name
    if resume and metrics_path.is_file():
        try:
            done = json.loads(metrics_path.read_text())
            if done.get("key") == key:
                say(f"{name}: reusing finished run")
                return done
        except (OSError, json.JSONDecodeError):
            pass
    snapshot = run_dir / SNAPSHOT if resume else None
    if snapshot is not None and snapshot.is_file():
        say(f"{name}: continuing from its last snapshot, if it was made with these settings and pairs")
    say(f"{name}: training on {len(subset)} real tiles + {len(extra)} synthetic pairs, {spec['steps']} steps")
    seg = train_segmenter(list(subset) + list(extra), size=spec["size"], steps=spec["steps"],
                          batch_size=spec["batch_size"], lr=spec["lr"], seed=spec["train_seed"], device=device,
                          config=cfg, pair_weights=_pair_weights(subset, extra, spec["synthetic_share"]),
                          augment=spec.get("augment", "light"), snapshot=snapshot)
    train_s = float(seg.record["seconds"])  # over all sessions of a resumed run
    if save_model:
        seg.save(run_dir / "segmenter")
    per_image = evaluate_segmenter(seg, test_items, run_dir / "predictions")
    mean = {m: float(np.mean([v[m] for v in per_image.values()])) for m in (*METRICS, "dq", "sq")}
    loss = seg.record.get("loss", [])
    run = {"key": key, "name": name, "fraction": spec["fraction"], "arm": spec["arm"], "repeat": spec["repeat"],
           "train_seed": spec["train_seed"], "n_real_tiles": len(subset), "n_synthetic": len(extra),
           "nuclei_fraction": nuclei_fraction, "synthetic": spec["synthetic"], "train_seconds": round(train_s, 1),
           "final_loss": float(np.mean(loss[-20:])) if loss else None, "mean": mean, "per_image": per_image,
           "settings": {k: spec[k] for k in _SHARED if k in spec}}
    if "synthetic_block" in spec:
        run["synthetic_block"] = spec["synthetic_block"]  # [first, stop) of the folder's pairs
    atomic_write_bytes(metrics_path, json.dumps(run, indent=2).encode())
    if snapshot is not None:
        snapshot.unlink(missing_ok=True)
    say(f"{name}: " + ", ".join(f"{m} {mean[m]:.4f}" for m in METRICS) + f" ({train_s:.0f} s training)")
    return run


#: a run's training snapshot (engine.segment.train_segmenter), kept until its metrics.json is written
SNAPSHOT = "training-snapshot.safetensors"

_SHARED = ("steps", "size", "batch_size", "lr", "config", "tile_size", "stride", "n_clusters", "seed",
           "synthetic_share", "pairs_per_repeat", "augment", "test")
_AUGMENTED_ONLY = ("synthetic_share", "pairs_per_repeat")  # settings of the augmented arm alone (None in labeled runs)


def _pair_weights(real: Sequence[Tile], synthetic: Sequence[LabeledImage],
                  share: float | None) -> list[float] | None:
    """Per-pair sampling weights giving synthetic pairs ``share`` of the (area-weighted) crops."""
    if share is None or not synthetic:
        return None
    real_area = float(sum(t.inst.size for t in real))
    synth_area = float(sum(s.inst.size for s in synthetic))
    return [(1.0 - share) / real_area] * len(real) + [share / synth_area] * len(synthetic)


def table_rows(runs: list[dict[str, Any]], fractions: Sequence[float]) -> list[dict[str, Any]]:
    """One row per fraction x arm: metric = mean over repeats of the per-run mean over test images,
    metric_std = their standard deviation, metric_se = the standard error of that mean (sample standard
    deviation / sqrt(repeats); both 0 with one repeat)."""
    rows = []
    for f in fractions:
        for arm in ARMS:
            group = [r for r in runs if r["fraction"] == f and r["arm"] == arm]
            if not group:
                continue
            row: dict[str, Any] = {"training_data": f"{_pct(f)}% {arm}", "fraction": f, "arm": arm,
                                   "repeats": len(group), "n_real_tiles": group[0]["n_real_tiles"],
                                   "n_synthetic": group[0]["n_synthetic"],
                                   "nuclei_fraction": round(group[0]["nuclei_fraction"], 4)}
            for m in METRICS:
                vals = np.array([r["mean"][m] for r in group], np.float64)
                row[m] = float(vals.mean())
                row[f"{m}_std"] = float(vals.std())
                row[f"{m}_se"] = float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- outputs


_HEADERS = {"dice": "Dice", "aji": "AJI", "aji_plus": "AJI+", "pq": "PQ"}


def format_markdown(rows: Sequence[Mapping[str, Any]],
                    reference: Mapping[tuple[str, str], Mapping[str, float]] | None = None,
                    reference_name: str = "paper") -> str:
    """Paper-style Markdown table (mean, '± std' with repeats) plus, where both arms exist, the gain of
    augmentation per fraction (with repeats: '± its standard error', sqrt(se_augmented² + se_labeled²), the
    arms' repeats taken as independent).

    reference: published figures to set beside them, {(percent, arm): {metric: value}} (e.g. ("10",
    "labeled"): {"dice": 0.7969, "aji": 0.6344}); their metrics become columns "<reference_name> Dice", ...
    in both tables, the gains' being the reference's own gains ("–" where a figure is missing)."""
    spread = any(r["repeats"] > 1 for r in rows)
    ref = dict(reference or {})
    ref_metrics = [m for m in METRICS if any(m in v for v in ref.values())]
    ref_head = [f"{reference_name} {_HEADERS[m]}" for m in ref_metrics]

    def ref_cells(pct: str, arm: str) -> list[str]:
        v = ref.get((pct, arm), {})
        return [f"{v[m]:.4f}" if m in v else "–" for m in ref_metrics]

    head = ["Training data", *[_HEADERS[m] for m in METRICS], "Real tiles", "Synthetic pairs", *ref_head]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [str(r["training_data"])]
        cells += [f"{r[m]:.4f}" + (f" ± {r[m + '_std']:.4f}" if spread else "") for m in METRICS]
        cells += [str(r["n_real_tiles"]), str(r["n_synthetic"]), *ref_cells(_pct(r["fraction"]), r["arm"])]
        lines.append("| " + " | ".join(cells) + " |")
    gains = []
    for f in sorted({r["fraction"] for r in rows}):
        pair = {r["arm"]: r for r in rows if r["fraction"] == f}
        if len(pair) == 2:
            aug, lab = ref.get((_pct(f), "augmented"), {}), ref.get((_pct(f), "labeled"), {})
            ref_gains = [f"{aug[m] - lab[m]:+.4f}" if m in aug and m in lab else "–" for m in ref_metrics]
            gains.append("| " + " | ".join([f"{_pct(f)}%"] + [format_gain(pair["augmented"], pair["labeled"], m, spread)
                                                            for m in METRICS] + ref_gains) + " |")
    if gains:
        gain_head = ["Fraction", *[_HEADERS[m] for m in METRICS], *ref_head]
        lines += ["", "Gain of augmentation (augmented − labeled"
                  + (", ± its standard error over the repeats" if spread else "") + "):", "",
                  "| " + " | ".join(gain_head) + " |", "|" + "|".join("---" for _ in gain_head) + "|", *gains]
    return "\n".join(lines) + "\n"


def format_image_gains(runs: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of the gain of augmentation on each test image: per fraction with both arms, each
    image's metric averaged over each arm's repeats, augmented − labeled. The table's standard error is over
    repeats; this shows whether the gain holds across the test images or rests on a few. "" when no fraction
    has both arms with per-image figures."""
    lines = []
    for f in sorted({float(r["fraction"]) for r in runs}):
        arms = {a: [r for r in runs if float(r["fraction"]) == f and r["arm"] == a and r.get("per_image")]
                for a in ARMS}
        if not all(arms.values()):
            continue
        images = sorted(set.intersection(*(set(r["per_image"]) for g in arms.values() for r in g)))
        for im in images:
            mean = {a: {m: float(np.mean([r["per_image"][im][m] for r in g])) for m in METRICS}
                    for a, g in arms.items()}
            lines.append(f"| {_pct(f)}% | {im} | " + " | ".join(
                f"{mean['augmented'][m] - mean['labeled'][m]:+.4f}" for m in METRICS) + " |")
    if not lines:
        return ""
    head = ["Fraction", "Test image", *[_HEADERS[m] for m in METRICS]]
    return "\n".join(["Gain per test image (augmented − labeled, each image's mean over the repeats):", "",
                      "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|", *lines]) + "\n"


def format_gain(aug: Mapping[str, Any], lab: Mapping[str, Any], m: str, spread: bool) -> str:
    """Gain of metric m of two table rows (augmented − labeled), '± its standard error' when spread."""
    text = f"{aug[m] - lab[m]:+.4f}"
    if spread:
        text += f" ± {float(np.hypot(aug.get(f'{m}_se', 0.0), lab.get(f'{m}_se', 0.0))):.4f}"
    return text


def write_table(rows: Sequence[Mapping[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.csv`` (columns CSV_FIELDS) and ``results.md`` atomically; returns their paths."""
    out = Path(out_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in CSV_FIELDS})
    atomic_write_bytes(out / "results.csv", buf.getvalue().encode())
    atomic_write_bytes(out / "results.md", format_markdown(rows).encode())
    return {"csv": out / "results.csv", "md": out / "results.md"}


def plot_results(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Grouped bar plot (one panel per metric, labeled vs augmented per fraction, std error bars) as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fracs = sorted({r["fraction"] for r in rows})
    fig = Figure(figsize=(3.2 * len(METRICS), 3.2), dpi=110)
    axes = fig.subplots(1, len(METRICS))
    x = np.arange(len(fracs))
    width = 0.38
    colours = {"labeled": "#8c8c8c", "augmented": "#7b3f9e"}
    for ax, m in zip(np.atleast_1d(axes), METRICS):
        for k, arm in enumerate(ARMS):
            by_f = {r["fraction"]: r for r in rows if r["arm"] == arm}
            if not by_f:
                continue
            vals = [by_f[f][m] if f in by_f else np.nan for f in fracs]
            errs = [by_f[f][f"{m}_std"] if f in by_f else 0.0 for f in fracs]
            spread = any(r["repeats"] > 1 for r in by_f.values())
            ax.bar(x + (k - 0.5) * width, vals, width, yerr=errs if spread else None, capsize=2, label=arm,
                   color=colours[arm])
        ax.set_xticks(x, [f"{_pct(f)}%" for f in fracs])
        ax.set_title(_HEADERS[m])
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
