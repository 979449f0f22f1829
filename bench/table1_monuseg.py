"""The paper's Table 1 end to end: subsets, diffusion models per subset, synthetic pairs, segmenters.

The images play three roles, read from a split file (``--split``, JSON lists of image stems; default
bench/splits/monuseg.json) over the labeled folder ``--train``:

- train: the only images anything here learns from. For every fraction in --augment the paper's subset of
  them is written out (``python -m engine subset``), a structure model and a two-stage image model are
  trained on that subset alone for a wall-clock budget, synthetic pairs are generated, and segmenters are
  trained on subset + pairs; for every fraction in --labeled segmenters are trained on the subset alone.
  All segmenters share one setting; each arm is trained ``--repeats`` times (seeds seed, seed + 1, ...),
  and with ``--fresh-pairs`` (the default) each augmented repeat has its own ``--pairs`` pairs, so the
  spread includes the draw of the pairs. Pairs are generated in chunks (``--generate-chunk``, one job
  each, gathered into WORK/synthetic_PCT), so a stopped call loses at most one chunk.
- validation: for choices (guidance w, checkpoints, settings; e.g. ``python -m engine calibrate-w --real
  WORK/validation`` or ``bench/realism.py --role validation``). Linked into WORK/validation and never
  scored by this script.
- test: scored once per arm (``evaluate --test WORK/test``); the split's test images, or every image of
  ``--test DIR``, a separate labeled folder, so that the same experiment runs unchanged against another
  labeled test set. No image may have two roles.

Each step is a ``python -m engine`` command (logs in WORK/logs); independent steps run concurrently
(--parallel). Running again resumes: finished steps are skipped, interrupted trainings resume. The table
is collected into WORK/evaluate (WORK/evaluate/table1.md: mean ± std per arm, each gain ± its standard
error, beside the paper's HoVer-Net figures); its results.json also names, per augmented fraction, the diffusion models
(files and sha256), the seed and the training images they come from ("diffusion_models"), and the roles
("split"). A later call reuses a finished fraction's recorded models (``--reuse-models``, the default, so
that the table can be finished across sessions) when every file is present with the recorded sha256 and
the seed and training images are the recorded ones, else retrains them; ``--no-reuse-models`` retrains.
Outputs a retraining replaces (models, subset, pairs, augmented segmenters) are moved to
WORK/replaced/<time>/, never deleted.

WORK lies outside the repository and is lost when a session's machine is not kept. With ``--ledger DIR`` (a
folder committed with the code, e.g. bench/results/table1_clean) every finished segmenter run is also kept
in DIR with a fingerprint of the commands and images it came from, and a later call, in any work folder,
restores the runs whose chain is unchanged and runs only what the others need (bench/run_ledger.py). Jobs
run depth first (a fraction's trainings, pairs and segmenters before the next fraction's), each repeat of
an arm as its own job, so that what a session finishes is whole runs. A fraction's models are then trained
again by the same commands on the new machine; ``--status`` and table1.md name, per fraction, the weights
(sha256) each augmented run's pairs came from, so that two trainings with other bits would show.

    python bench/table1_monuseg.py --work ~/.cache/nudiff/table1 --augment 10 \\
        --augment 100=checkpoints/structure-demo.json,checkpoints/image-demo.json --labeled 10,100
    python bench/table1_monuseg.py --work ~/.cache/nudiff/table1 --augment 10 --labeled 10,100 \\
        --test /data/other-labeled-test-set   # same models (verified by sha256), another test set

Models and segmenters trained on MoNuSeg inherit its CC BY-NC-SA 4.0 licence.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.monuseg import DATA, LICENCE, PAPER_TABLE1, ROLES, SPLIT, link_files, read_split  # noqa: E402

RECORD_KEY = "diffusion_models"  # results.json: {pct: record of the fraction's diffusion models}
FINISHED = ("ok", "cached")


@dataclass
class Job:
    """One command; starts when every job in ``after`` has succeeded (skipped if one failed)."""

    name: str
    cmd: list[str]
    after: list[str] = field(default_factory=list)
    done: Path | None = None  # the job is skipped when this file already exists
    priority: int = 0  # lower starts first among ready jobs
    state: str = "waiting"  # waiting | running | ok | failed | skipped | cached | interrupted
    proc: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    run_dir: Path | None = None  # a training's run folder: done only when it ended on its budget (see finished)
    output: Path | None = None  # a job that always runs (done None): the folder it writes, for --status
    run: str | None = None  # a segmenter job: its run's name (engine.evaluate.run_name), for the ledger
    pct: str | None = None  # a segmenter job: its fraction ("10") ...
    arm: str | None = None  # ... and its arm ("labeled" | "augmented")
    brief: bool = False  # a job of seconds (a subset, a merge): while it runs no job of lower priority starts,
    # so that the jobs it unlocks (both trainings of a fraction) find the slots free instead of one of them
    # waiting for a segmenter that took a slot in the seconds between

    def finished(self) -> bool:
        """Whether the job's output is there: its ``done`` file and, for a training, a run that ended on its
        budget (steps or time limit). A training stopped early (STOP file, SIGTERM at a session's end) has
        exported a model.json too, but is resumed, not used."""
        if self.done is None or not self.done.exists():
            return False
        if self.run_dir is None:
            return True
        from engine.run_status import budget_reached

        return training_change(self) is None and budget_reached(self.run_dir)


def training_change(job: Job) -> tuple[str, str] | None:
    """How a training job's command differs from what its run folder was last trained with (its
    train_config.json): ("settings", what) when the preset, tile size or a trained setting
    (engine.train.TRAINED_FIELDS) differs, so the run cannot go on; ("budget", what) when only the steps
    differ, so resuming trains to the new budget; None when they agree or nothing was trained yet."""
    try:
        was = json.loads((job.run_dir / "train_config.json").read_text())
    except (OSError, json.JSONDecodeError, TypeError):
        return None
    return config_change(was, job.cmd)


def config_change(was: dict, cmd: list[str]) -> tuple[str, str] | None:
    """training_change's comparison: ``was`` a TrainConfig record (a train_config.json, or the "train" of a
    model record), ``cmd`` a ``python -m engine train-*`` command."""
    from engine.cli import train_config
    from engine.train import IMAGE_TRAINED_FIELDS, TRAINED_FIELDS

    args = engine_args(cmd)
    now = train_config(args, args.command.split("-")[1]).to_dict()
    fields = ("preset", "image_size", *TRAINED_FIELDS, *(IMAGE_TRAINED_FIELDS if now["kind"] == "image" else ()))
    size = now["image_size"] or 0
    norm = {"tile_stride": lambda v: v or size // 2, "init_from": lambda v: str(Path(v).resolve()) if v else v}
    diff = [f"{k} {was.get(k)} -> {now[k]}" for k in fields
            if k in was and norm.get(k, lambda v: v)(was[k]) != norm.get(k, lambda v: v)(now[k])]
    if diff:
        return "settings", "; ".join(diff)
    budget = [f"{k} {was.get(k)} -> {now[k]}" for k in ("steps", "finetune_steps") if was.get(k) != now[k]]
    return ("budget", "; ".join(budget)) if budget else None


def engine_args(cmd: list[str]) -> argparse.Namespace:
    """A ``python -m engine ...`` job command as the engine's own parser reads it (its defaults included)."""
    from engine.cli import build_parser as engine_parser

    return engine_parser().parse_args(cmd[cmd.index("engine") + 1:])


def dependents(jobs: list[Job], name: str) -> list[Job]:
    """The jobs that wait on ``name``, directly or through others, in plan order."""
    found: set[str] = {name}
    for j in jobs:  # plan order lists a job after those it waits on
        if found.intersection(j.after):
            found.add(j.name)
    return [j for j in jobs if j.name in found and j.name != name]


def changed_trainings(jobs: list[Job]) -> list[tuple[Job, str, str, list[Path]]]:
    """Trainings whose run folder was trained with other settings or another budget than their command
    now asks for, each as (job, "settings" | "budget", what changed, outputs made stale): the run folder
    itself when a trained setting changed (it cannot resume), and the outputs of every job that waits on it
    (a later stage's run folder, generated pairs), which came from the model as it was."""
    out = []
    for j in jobs:
        if j.run_dir is None or (change := training_change(j)) is None:
            continue
        stale = [j.run_dir] if change[0] == "settings" else []
        for d in dependents(jobs, j.name):
            if d.run_dir is not None:
                stale.append(d.run_dir)
            elif d.done is not None:
                stale.append(d.done.parent)
        out.append((j, *change, stale))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--train", "--data", dest="train", type=Path, default=DATA,
                    help="labeled folder (images/ + labels/) holding the split's train and validation images")
    ap.add_argument("--split", type=Path, default=SPLIT,
                    help='JSON file: {"train": [stems], "validation": [stems], "test": [stems]}')
    ap.add_argument("--test", type=Path, default=None, metavar="DIR",
                    help="separate labeled test folder: its images are the test set instead of the split's")
    ap.add_argument("--work", "--out", dest="work", type=Path, default=ROOT / "runs" / "table1_monuseg",
                    help="output folder (all steps, logs, WORK/evaluate/results.*)")
    ap.add_argument("--reuse-models", action=argparse.BooleanOptionalAction, default=True,
                    help="reuse the diffusion models results.json records for a finished fraction when their "
                         "files are present with the recorded sha256 (else retrain; default); "
                         "--no-reuse-models retrains them")
    ap.add_argument("--augment", action="append", default=[], metavar="PCT[=STRUCTURE,IMAGE]",
                    help="fraction with an augmented arm; its diffusion models are trained on its subset, "
                         "or given as two model files (repeatable)")
    ap.add_argument("--labeled", default="10,100", help="fractions with a labeled arm (percent)")
    ap.add_argument("--pairs", type=_positive_int, default=None,
                    help="synthetic pairs each augmented segmenter trains with (default: the paper's 512, 1024 "
                         "for 100%%)")
    ap.add_argument("--repeats", type=_positive_int, default=3,
                    help="segmenter trainings per fraction and arm, seeds seed..seed+repeats-1; the table shows "
                         "their mean, spread, and the gains' standard error")
    ap.add_argument("--fresh-pairs", action=argparse.BooleanOptionalAction, default=True,
                    help="each repeat of an augmented arm trains on its own --pairs pairs (repeats x pairs are "
                         "generated), so the spread includes the draw of the pairs; --no-fresh-pairs: one draw")
    ap.add_argument("--generate-chunk", type=_positive_int, default=64,
                    help="pairs per generate job: a call stopped mid-way loses at most one chunk")
    ap.add_argument("--pair-size", type=int, default=256, help="synthetic tile size in px")
    ap.add_argument("--preset", default="cpu", choices=["test", "cpu", "paper"], help="diffusion model preset")
    ap.add_argument("--diffusion-size", type=int, default=128, help="diffusion training tile size in px")
    ap.add_argument("--diffusion-minutes", type=float, default=30.0,
                    help="wall clock for each structure model and for each image model (its two stages "
                         "share it 3:1), per call: a training resumed after an interruption gets it again, so "
                         "give --diffusion-steps for a budget that does not depend on interruptions")
    ap.add_argument("--diffusion-steps", type=_positive_int, default=None,
                    help="also stop each structure model after this many steps, and each image model after as "
                         "many in all, shared 3:1 by its two stages like the wall clock (default: the wall "
                         "clock alone)")
    ap.add_argument("--diffusion-batch", type=int, default=16)
    ap.add_argument("--diffusion-lr", type=float, default=2e-4)
    ap.add_argument("--sampler-steps", type=int, default=20, help="DDIM steps for structures and images")
    ap.add_argument("--w", type=float, default=2.0,
                    help="guidance scale of the synthetic images (paper: 2; docs/benchmarks.md §6k: 1 here)")
    ap.add_argument("--oversample", type=float, default=1.0,
                    help="layout realism filter of generate (1 = off; the paper has none)")
    ap.add_argument("--seg-steps", type=int, default=4000)
    ap.add_argument("--seg-size", type=int, default=256)
    ap.add_argument("--seg-batch", type=int, default=8)
    ap.add_argument("--seg-channels", type=int, default=32)
    ap.add_argument("--seg-depth", type=int, default=4)
    ap.add_argument("--seg-augment", choices=("light", "strong"), default="light",
                    help="segmenter training augmentation (evaluate --augment)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=None,
                    help="concurrent jobs (default: 4 with a GPU, 1 on CPU; 16 jobs on one H100 with 16 cores "
                         "starved each other, docs/benchmarks.md section 6)")
    ap.add_argument("--threads", type=_positive_int, default=None,
                    help="CPU threads per job (default: the cores / --parallel; 1 when the machine is shared: "
                         "two threads on a core another process also uses wait on each other, ~10x slower here)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the jobs")
    ap.add_argument("--ledger", type=Path, default=None, metavar="DIR",
                    help="keep each finished segmenter run (its metrics, with a fingerprint of every command and "
                         "image it came from) in DIR, a folder committed with the code, and restore from it the "
                         "runs whose chain is unchanged: the table then outlives its --work folder "
                         "(bench/run_ledger.py)")
    ap.add_argument("--status", action="store_true",
                    help="print how far each job of this command has come (from WORK's files), and the table of "
                         "the fractions whose runs are all in, and exit; runs, moves and writes nothing")
    return ap


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _pct_list(text: str) -> list[str]:
    return [f"{float(v.strip().rstrip('%')):g}" for v in text.split(",") if v.strip()]


# ----------------------------------------------------------------------------- roles of the images


@dataclass
class Roles:
    """The images of each role (engine.data.LabeledImage): ``train`` is all that is learned from,
    ``validation`` is for choices only and never scored here, ``test`` is scored once per arm. ``unused``:
    stems of the --train folder in no role."""

    train: list
    validation: list
    test: list
    unused: list[str] = field(default_factory=list)
    test_folder: Path | None = None  # --test, when the test images come from their own folder


def assign_roles(train_dir: Path, split: dict[str, list[str]], test_dir: Path | None = None) -> Roles:
    """Load the images of each role; SystemExit for missing images, an empty train or test set, or an image
    (stem) with two roles."""
    from engine.data import load_folder

    items = {it.stem: it for it in load_folder(train_dir)[0]}
    wanted = ("train", "validation") if test_dir else ROLES
    missing = [s for role in wanted for s in split[role] if s not in items]
    if missing:
        raise SystemExit(f"images of the split not found in {train_dir}: {', '.join(missing)}")
    test = load_folder(test_dir)[0] if test_dir else [items[s] for s in split["test"]]
    roles = Roles([items[s] for s in split["train"]], [items[s] for s in split["validation"]], test,
                  test_folder=test_dir)
    if not roles.train or not roles.test:
        raise SystemExit("the split needs train images, and test images (in the split or --test DIR)")
    seen: dict[str, str] = {}
    for role in ROLES:
        for it in getattr(roles, role):
            if seen.setdefault(it.stem, role) != role:
                raise SystemExit(f"{it.stem} is both a {seen[it.stem]} and a {role} image")
    roles.unused = sorted(set(items) - set(seen))
    return roles


def role_folders(work: Path) -> dict[str, Path]:
    """Where each role's folder of links lies in WORK."""
    return {"train": work / "real", "validation": work / "validation", "test": work / "test"}


def link_roles(roles: Roles, work: Path) -> dict[str, Path]:
    """WORK/real (train), WORK/validation and WORK/test as folders of links to the images (links of an
    earlier call that name other images are removed)."""
    folders = role_folders(work)
    for role, folder in folders.items():
        _link_folder(folder, getattr(roles, role))
    return folders


def _link_folder(dst: Path, items: list) -> None:
    for sub, attr in (("images", "image_path"), ("labels", "label_path")):
        link_files(dst / sub, [getattr(it, attr) for it in items])


def train_fingerprint(items: list) -> str:
    """sha256 of the training images and labels (stem, file hashes): what a fraction's subset is chosen from."""
    from engine.fileio import file_sha256

    rows = sorted((it.stem, file_sha256(it.image_path), file_sha256(it.label_path)) for it in items)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# ----------------------------------------------------------------------------- diffusion models per fraction


@dataclass
class ModelChoice:
    """Where one augmented fraction's diffusion models come from in this call.

    action: "train" (on the fraction's subset; finished steps of an interrupted call resume), "reuse" (the
    models results.json records, verified) or "given" (--augment PCT=STRUCTURE,IMAGE). ``set_aside``: earlier
    outputs this choice makes stale (moved to WORK/replaced/ before any job starts)."""

    pct: str
    action: str
    structure: Path
    image: Path
    reason: str = ""
    set_aside: list[Path] = field(default_factory=list)


def trained_model_paths(work: Path, pct: str) -> tuple[Path, Path]:
    """(structure, image) model records a fraction's training writes: the image model is its second stage."""
    return work / f"structure_{pct}" / "model.json", work / f"image_{pct}_stage2" / "model.json"


def model_files(model: Path, work: Path) -> dict[str, dict[str, str]]:
    """A model's files (record and weights) -> {name: {"path", "sha256"}}; paths relative to ``work`` where
    they lie in it."""
    from engine.checkpoint import checkpoint_paths
    from engine.fileio import file_sha256

    weights, record = checkpoint_paths(model)
    out = {}
    for f in (record, weights):
        try:
            shown = str(f.resolve().relative_to(work.resolve()))
        except ValueError:
            shown = str(f.resolve())
        out[f.name] = {"path": shown, "sha256": file_sha256(f)}
    return out


def _recorded_model(entry: dict, kind: str, work: Path) -> Path:
    files = entry[kind]
    path = Path(next(v["path"] for name, v in files.items() if name.endswith(".json")))
    return path if path.is_absolute() else work / path


def why_not_reusable(entry: dict[str, Any] | None, work: Path, seed: int, train_sha256: str) -> str | None:
    """None when a fraction's recorded models can be reused; else why not."""
    from engine.fileio import file_sha256

    if not entry or not entry.get("structure") or not entry.get("image"):
        return "results.json records no models for it"
    if entry.get("source") == "given":
        return "the recorded models were given (--augment PCT=...), not trained on the subset"
    if entry.get("seed") != seed:
        return f"the recorded models are of seed {entry.get('seed')}, not {seed}"
    if entry.get("train_data_sha256") != train_sha256:
        return "the training images differ from those the recorded models' subset came from"
    for kind in ("structure", "image"):
        for name, f in (entry.get(kind) or {}).items():
            path = Path(f["path"]) if Path(f["path"]).is_absolute() else work / f["path"]
            if not path.is_file():
                return f"{kind} model file {path} is missing"
            if file_sha256(path) != f["sha256"]:
                return f"{kind} model file {path} does not have the sha256 results.json records"
    return None


def choose_models(args: argparse.Namespace, recorded: dict[str, dict], train_sha256: str,
                  previous_train_sha256: str | None = None) -> list[ModelChoice]:
    """Each --augment fraction's models: given, trained (resuming what an unfinished call left) or reused.

    A fraction recorded in results.json has finished; training it again replaces its models, subset, pairs
    and augmented segmenters (set aside), and so do other training images than those of the earlier calls
    (``previous_train_sha256``, from WORK/train_data.json; None: not known). Given models other than the
    recorded ones replace its pairs and augmented segmenters."""
    w = args.work
    if previous_train_sha256 is None:
        previous_train_sha256 = train_sha256
    choices = []
    for spec in args.augment:
        pct, _, given = spec.partition("=")
        pct = _pct_list(pct)[0]
        entry = recorded.get(pct)
        downstream = [w / f"synthetic_{pct}", w / f"synthetic_{pct}_parts",
                      *sorted((w / "evaluate" / "runs").glob(f"{pct}pct_augmented_r*"))]
        if given:
            smodel, imodel = (Path(p).resolve() for p in given.split(","))
            same = entry and all(m.is_file() and model_files(m, w) == entry.get(k)
                                 for k, m in (("structure", smodel), ("image", imodel)))
            choices.append(ModelChoice(pct, "given", smodel, imodel, "given",
                                       [] if same or not entry else downstream))
            continue
        smodel, imodel = trained_model_paths(w, pct)
        stale = [w / f"subset_{pct}", w / f"structure_{pct}", w / f"image_{pct}_stage1", w / f"image_{pct}_stage2"]
        if entry is None:
            if previous_train_sha256 != train_sha256:
                choices.append(ModelChoice(pct, "train", smodel, imodel, "the training images are not those of "
                                           "the earlier calls in this folder", stale + downstream))
            else:
                choices.append(ModelChoice(pct, "train", smodel, imodel, "not trained by a finished call yet"))
            continue
        why = why_not_reusable(entry, w, args.seed, train_sha256) if args.reuse_models else \
            "--no-reuse-models retrains its recorded models"
        if why is None:
            why = recorded_settings_changed(args, pct, entry)
        if why is None:
            choices.append(ModelChoice(pct, "reuse", _recorded_model(entry, "structure", w),
                                       _recorded_model(entry, "image", w), "files present with the recorded sha256"))
            continue
        choices.append(ModelChoice(pct, "train", smodel, imodel, why, stale + downstream))
    return choices


def recorded_settings_changed(args: argparse.Namespace, pct: str, entry: dict) -> str | None:
    """Why a fraction's recorded models are not what this call's diffusion settings would train (another
    --diffusion-size, preset, batch, learning rate or step budget), or None. Compared: the structure model's
    and the image model's (stage 2) training records against the commands that would train them now."""
    probe = plan(args, args.work, args.work, [ModelChoice(pct, "train", *trained_model_paths(args.work, pct))])
    cmds = {j.name: j.cmd for j in probe}
    from engine.checkpoint import read_record
    from engine.errors import NuDiffError

    for kind, name in (("structure", f"structure {pct}%"), ("image", f"image {pct}% stage 2")):
        try:
            was = read_record(_recorded_model(entry, kind, args.work), kind=kind)[1].get("train")
        except (NuDiffError, OSError, KeyError, StopIteration) as e:
            return f"the recorded {kind} model's record is unreadable ({e})"
        change = config_change(was, cmds[name]) if isinstance(was, dict) else None
        if change:
            return f"the recorded {kind} model was trained with other {change[0]} ({change[1]})"
    return None


def set_aside(paths: list[Path], work: Path, stamp: str) -> list[Path]:
    """Move the paths that exist to WORK/replaced/<stamp>/ (same relative paths); returns where they went."""
    moved = []
    for p in paths:
        if p.exists() or p.is_symlink():
            dst = work / "replaced" / stamp / p.relative_to(work)
            dst.parent.mkdir(parents=True, exist_ok=True)
            p.rename(dst)
            moved.append(dst)
    return moved


def read_recorded_models(results: Path) -> dict[str, dict]:
    """The diffusion model records of results.json ({} when there is none)."""
    try:
        return dict(json.loads(results.read_text()).get(RECORD_KEY) or {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def trained_on(model: Path) -> list[str]:
    """The machines a model's record says its weights were trained on (engine.train), [] if it does not."""
    from engine.checkpoint import read_record

    return [str(m) for m in read_record(model)[1].get("trained_on", [])]


def model_record(c: ModelChoice, work: Path, seed: int, train_sha256: str) -> dict[str, Any]:
    """results.json's record of one fraction's diffusion models (files and sha256, seed, training images, the
    machines they were trained on)."""
    return {"fraction": float(c.pct) / 100, "seed": seed, "train_data_sha256": train_sha256,
            "source": {"train": "trained", "reuse": "reused", "given": "given"}[c.action],
            "structure": model_files(c.structure, work), "image": model_files(c.image, work),
            "trained_on": sorted(set(trained_on(c.structure)) | set(trained_on(c.image)))}


def record_models(results: Path, work: Path, choices: list[ModelChoice], jobs: list[Job], recorded: dict,
                  seed: int, train_sha256: str, roles: Roles, split_file: Path,
                  ledger_models: dict[str, dict] | None = None) -> dict[str, dict]:
    """Name in results.json, per augmented fraction that finished in this call, its diffusion model files and
    their sha256, the seed, the training images' fingerprint and where the models came from; records of
    other fractions are kept (also a reused fraction's that did not finish: its models are unchanged).
    A fraction whose runs all came from the ledger, its models not on this machine, gets the record the
    ledger keeps (``ledger_models``, source "ledger"). Also the roles of the images ("split")."""
    state = {j.name: j.state for j in jobs}
    out = dict(recorded)
    for c in choices:
        mine = [n for n in state if f" {c.pct}% " in f" {n} " and "labeled" not in n]
        if all(state[n] in FINISHED for n in mine):
            if c.structure.is_file() and c.image.is_file():
                out[c.pct] = model_record(c, work, seed, train_sha256)
            elif c.pct in (ledger_models or {}):
                out[c.pct] = {**ledger_models[c.pct], "source": "ledger"}
        elif c.action != "reuse":
            out.pop(c.pct, None)
    from engine.fileio import atomic_write_bytes

    data = json.loads(results.read_text())
    data[RECORD_KEY] = dict(sorted(out.items(), key=lambda kv: float(kv[0])))
    data["split"] = {"file": str(split_file), "train": [it.stem for it in roles.train],
                     "validation": [it.stem for it in roles.validation], "test": [it.stem for it in roles.test],
                     "test_folder": str(roles.test_folder) if roles.test_folder else None,
                     "validation_folder": str(work / "validation")}
    atomic_write_bytes(results, json.dumps(data, indent=2, default=str).encode())
    return out


# ----------------------------------------------------------------------------- the job graph


def plan(args: argparse.Namespace, real: Path, test: Path, choices: list[ModelChoice] | None = None) -> list[Job]:
    """The jobs of the experiment: per augmented fraction (subset, models unless reused or given, pairs,
    segmenter), per labeled fraction a segmenter. Segmenters train on ``real`` and are scored on ``test``."""
    py = [args.python, "-m", "engine"]
    w = args.work
    ev = w / "evaluate"
    seg = ["--real", str(real), "--test", str(test), "--out", str(ev), "--steps", str(args.seg_steps),
           "--size", str(args.seg_size), "--batch-size", str(args.seg_batch), "--channels", str(args.seg_channels),
           "--depth", str(args.seg_depth), "--seed", str(args.seed), "--augment", args.seg_augment,
           "--repeats", str(args.repeats)]
    from engine.evaluate import run_name
    from engine.pipeline import candidate_count

    ranks = {pct: i for i, pct in enumerate(sorted({_pct_list(a.partition("=")[0])[0] for a in args.augment}
                                                   | set(_pct_list(args.labeled)), key=float))}

    def prio(pct: str, stage: str) -> int:
        """Depth first: a fraction's jobs go before the next fraction's, so that its whole chain (the part a
        session can finish and the ledger can keep) is done first; within a fraction trainings, pairs, then
        segmenters."""
        return ranks[pct] * 10 + ("train", "pairs", "augmented", "labeled").index(stage)

    cap = str(args.diffusion_steps or 1000000)
    # the image model's steps are shared 3:1 by its stages, as its wall clock is
    cap1, cap2 = (cap, cap) if not args.diffusion_steps else image_stage_steps(args.diffusion_steps)
    jobs: list[Job] = []
    for c in choices if choices is not None else choose_models(args, {}, ""):
        pct = c.pct
        n = args.pairs or (1024 if float(pct) >= 100 else 512)
        gen_after: list[str] = []
        if c.action == "train":
            sub = w / f"subset_{pct}"
            jobs.append(Job(f"subset {pct}%", py + ["subset", str(real), "--fraction", pct, "--out", str(sub),
                                                    "--seed", str(args.seed)], done=sub / "manifest.csv",
                            priority=prio(pct, "train"), brief=True))
            common = ["--data", str(sub), "--preset", args.preset, "--image-size", str(args.diffusion_size),
                      "--tile-stride", str(args.diffusion_size // 2), "--batch-size", str(args.diffusion_batch),
                      "--sample-size", str(args.pair_size), "--save-every", "250", "--preview-every", "0",
                      "--seed", str(args.seed), "--quiet"]
            srun, i1, i2 = w / f"structure_{pct}", w / f"image_{pct}_stage1", w / f"image_{pct}_stage2"
            minutes = args.diffusion_minutes
            jobs.append(Job(f"structure {pct}%", py + ["train-structure", "--run-dir", str(srun), "--steps", cap,
                                                       "--lr", str(args.diffusion_lr), "--time-limit", f"{minutes:g}",
                                                       *common], [f"subset {pct}%"], srun / "model.json",
                            prio(pct, "train"), run_dir=srun))
            jobs.append(Job(f"image {pct}% stage 1", py + [
                "train-image", "--run-dir", str(i1), "--steps", cap1, "--finetune-steps", "0",
                "--lr", str(args.diffusion_lr), "--time-limit", f"{minutes * 0.75:g}", *common],
                [f"subset {pct}%"], i1 / "model.json", prio(pct, "train"), run_dir=i1))
            jobs.append(Job(f"image {pct}% stage 2", py + [
                "train-image", "--run-dir", str(i2), "--init-from", str(i1 / "model.json"), "--steps", "0",
                "--finetune-steps", cap2, "--drop-rate", "0.2", "--finetune-lr", "2e-5",
                "--time-limit", f"{minutes * 0.25:g}", *common], [f"image {pct}% stage 1"], i2 / "model.json",
                prio(pct, "train"), run_dir=i2))
            gen_after = [f"structure {pct}%", f"image {pct}% stage 2"]
        # the pairs, in chunks (a stopped call loses at most one); chunk k's candidates take the seeds after
        # chunk k-1's, and a part's folder is named by a hash of its command, so other settings make new parts
        # (paths in the work folder written relative to it: the same command in another folder, the same name)
        synth = w / f"synthetic_{pct}"
        total = n * args.repeats if args.fresh_pairs and args.repeats > 1 else n
        sizes = [min(args.generate_chunk, total - lo) for lo in range(0, total, args.generate_chunk)]
        stride = candidate_count(args.generate_chunk, args.oversample)
        names, part_dirs = [], []
        for k, size in enumerate(sizes):
            cmd = py + ["generate", "--structure-checkpoint", str(c.structure), "--image-checkpoint", str(c.image),
                        "--n", str(size), "--size", str(args.pair_size), "--steps", str(args.sampler_steps),
                        "--batch-size", "32", "--oversample", f"{args.oversample:g}", "--w", f"{args.w:g}",
                        "--seed", str(args.seed + k * stride)]
            tag = hashlib.sha256(json.dumps([a.replace(str(w), "WORK") for a in cmd[len(py):]]).encode()
                                 ).hexdigest()[:8]
            part = w / f"synthetic_{pct}_parts" / f"part{k:03d}_{tag}"
            names.append(f"generate {pct}% part {k + 1}/{len(sizes)}")
            part_dirs.append(str(part))
            jobs.append(Job(names[-1], cmd + ["--out", str(part)], gen_after, part / "manifest.csv",
                            prio(pct, "pairs")))
        merge = f"from bench.table1_monuseg import merge_parts; merge_parts({part_dirs!r}, {str(synth)!r})"
        jobs.append(Job(f"pairs {pct}%", [args.python, "-c", merge], names, None, prio(pct, "pairs"),
                        output=synth, brief=True))
        per_repeat = ["--pairs-per-repeat", str(n)] if total > n else []
        for r in range(args.repeats):  # one job per repeat: they run side by side and each is kept on its own
            jobs.append(Job(f"segmenter {pct}% augmented r{r}", py + [
                "evaluate", *seg, "--only-repeat", str(r), "--fractions", pct, "--arms", "augmented",
                "--synthetic", f"{pct}={synth}", *per_repeat], [f"pairs {pct}%"], priority=prio(pct, "augmented"),
                run=run_name(float(pct) / 100, "augmented", r), pct=pct, arm="augmented"))
    for pct in _pct_list(args.labeled):
        for r in range(args.repeats):
            jobs.append(Job(f"segmenter {pct}% labeled r{r}", py + [
                "evaluate", *seg, "--only-repeat", str(r), "--fractions", pct, "--arms", "labeled"],
                priority=prio(pct, "labeled"), run=run_name(float(pct) / 100, "labeled", r), pct=pct, arm="labeled"))
    return jobs


# ----------------------------------------------------------------------------- the ledger (bench/run_ledger.py)


def ledger_subs(args: argparse.Namespace) -> dict[str, str]:
    """Machine-specific paths in the commands and what a chain's fingerprint writes instead."""
    return {str(args.work): "WORK", str(args.work.resolve()): "WORK", args.python: "PY", str(ROOT): "ROOT"}


def apply_ledger(args: argparse.Namespace, jobs: list[Job], choices: list[ModelChoice], real: Path, test: Path,
                 context: dict[str, Any], write: bool = True) -> tuple[list[Job], dict[str, str], dict[str, dict]]:
    """Restore from ``args.ledger`` the segmenter runs whose chain is unchanged and drop the jobs no other
    run needs. Returns (jobs left, chain fingerprint by segmenter job, ledger entries restored by job).

    A chain is fingerprinted as if every fraction's models were trained in this call (their commands are
    part of it), so that an entry holds whether a later call trains the models again (a new machine) or
    reuses them (the same work folder). A restored job waits on nothing and is done (its metrics.json
    written to WORK/evaluate/runs/, or with ``write`` False, for --status, its ledger entry)."""
    from bench.run_ledger import chain_fingerprint, needed, restore

    probe = plan(args, real, test, [c if c.action == "given" else
                                    ModelChoice(c.pct, "train", *trained_model_paths(args.work, c.pct))
                                    for c in choices])
    chains = {j.name: chain_fingerprint(probe, j.name, ledger_subs(args), context) for j in probe if j.run}
    runs = {j.name: j.run for j in jobs if j.run}
    found = restore(args.ledger, runs, chains, args.work / "evaluate" / "runs", write=write)
    for j in jobs:
        if j.name in found:
            j.after = []
            j.done = (args.work / "evaluate" / "runs" / j.run / "metrics.json" if write
                      else args.ledger / f"{j.run}.json")
    return needed(jobs, set(found), set(runs)), chains, found


def ledger_keeper(args: argparse.Namespace, chains: dict[str, str], choices: list[ModelChoice],
                  train_sha256: str) -> Callable[[Job], None]:
    """run_jobs' on_done: a finished segmenter job's run goes into the ledger (an augmented run with its
    fraction's model record)."""
    from bench.run_ledger import write_entry

    by_pct = {c.pct: c for c in choices}

    def keep(job: Job) -> None:
        if job.run is None:
            return
        metrics = json.loads((args.work / "evaluate" / "runs" / job.run / "metrics.json").read_text())
        c = by_pct.get(job.pct) if job.arm == "augmented" else None
        models = model_record(c, args.work, args.seed, train_sha256) if c is not None else None
        path = write_entry(args.ledger, job.run, job.name, chains[job.name], metrics, models)
        print(f"ledger: {job.run} kept in {path}", flush=True)

    return keep


def job_progress(job: Job) -> str:
    """How far one job has come, from its files alone (nothing is run): "done", "step S of N" for a
    training, "k of R runs" for a segmenter job (with the step of a run part-way through), or "not started"."""
    if job.finished():
        return "done"
    if job.run_dir is not None:
        try:
            step = int(json.loads((job.run_dir / "latest.json").read_text())["step"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            return "not started"
        from engine.cli import train_config

        args = engine_args(job.cmd)
        total = train_config(args, args.command.split("-")[1]).total_steps
        pace = _training_pace(job.run_dir / "log.jsonl")
        if pace is None:
            return f"step {step} of {total}"
        left = max(0, total - step) * pace
        left_text = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.0f} min"
        return f"step {step} of {total}, {pace:.2f} s/step lately: about {left_text} left"
    if "evaluate" in job.cmd:
        from engine.evaluate import SNAPSHOT, parse_fractions, run_name
        from engine.segment import snapshot_step

        args = engine_args(job.cmd)
        fraction, arm = parse_fractions(args.fractions)[0], args.arms
        repeats = range(args.repeats) if args.only_repeat is None else [args.only_repeat]
        runs = [Path(args.out) / "runs" / run_name(fraction, arm, r) for r in repeats]
        done = sum((r / "metrics.json").is_file() for r in runs)
        if args.only_repeat is not None:  # one run
            if done or not (runs[0] / SNAPSHOT).is_file():
                return "done" if done else "not started"
            return f"at step {snapshot_step(runs[0] / SNAPSHOT) or '?'} of {args.steps}"
        text = f"{done} of {len(runs)} runs"
        for r in runs:
            if not (r / "metrics.json").is_file() and (r / SNAPSHOT).is_file():
                text += f"; {r.name} at step {snapshot_step(r / SNAPSHOT) or '?'} of {args.steps}"
        return text
    if job.output is not None and (job.output / "manifest.csv").is_file():
        return "done"
    return "not started"


def _training_pace(log: Path) -> float | None:
    """Seconds per step over the last stretch of a training's log.jsonl written by one process (its
    "elapsed" restarts when a training resumes): the median over its logging intervals; None without two
    such lines."""
    try:
        rows = [json.loads(line) for line in log.read_text().splitlines()[-30:] if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), (int, float))
            and isinstance(r.get("elapsed"), (int, float))]  # loss lines (event lines have no "elapsed")
    stretch = []
    for row in reversed(rows):
        if stretch and not row["elapsed"] < stretch[-1]["elapsed"]:
            break
        stretch.append(row)
    paces = [(a["elapsed"] - b["elapsed"]) / (a["step"] - b["step"]) for a, b in zip(stretch, stretch[1:])
             if a["step"] > b["step"]]
    return float(statistics.median(paces)) if paces else None  # the median: a pause (a stopped job) is not the pace


def progress_report(jobs: list[Job]) -> str:
    """One line per job (a fraction's pair chunks as one line) and a total: what --status prints."""
    lines, done = [], 0
    chunks: dict[str, list[str]] = {}
    for j in jobs:
        state = job_progress(j)
        done += state == "done"
        if j.name.startswith("generate "):
            chunks.setdefault(j.name.rsplit(" part ", 1)[0], []).append(state)
            continue
        for name, states in list(chunks.items()):  # a fraction's chunks, before the merge that follows them
            lines.append(f"{name} pairs: {states.count('done')} of {len(states)} chunks")
            del chunks[name]
        lines.append(f"{j.name}: {state}")
    return "\n".join(lines + [f"{done} of {len(jobs)} jobs done"])


def table_markdown(rows: list, runs: list[dict]) -> str:
    """Markdown of the table (the paper's figures beside it) and of the gain on each test image."""
    from engine.evaluate import format_image_gains, format_markdown

    table = format_markdown(rows, reference=PAPER_TABLE1, reference_name="paper (HoVer-Net)")
    gains = format_image_gains(runs)
    return table + ("\n" + gains if gains else "")


def format_trainings(ledger: Path, jobs: list[Job], pcts: list[str]) -> str:
    """Markdown lines, one per fraction in ``pcts`` with augmented runs in ``ledger``: which training of its
    diffusion models (sha256 of the weights, first 8 digits) each run's pairs came from. When a machine is lost
    part-way through a fraction, its models are trained again by the same commands; CPU training need not give
    the same bits on another machine, and then the fraction's runs come from two trainings. "" when none."""
    from bench.run_ledger import read_entry, trainings, weights

    lines = []
    for pct in pcts:
        entries = [e for j in jobs if j.pct == pct and j.arm == "augmented" and j.run
                   for e in [read_entry(ledger, j.run)] if e is not None]
        groups = trainings(entries)
        if not groups:
            continue
        machines = {key: e["models"].get("trained_on") for e in entries if (key := weights(e.get("models")))}
        parts = [f"{', '.join(r.rsplit('_', 1)[-1] for r in runs)}: {s[:8]} / {i[:8]}"
                 + (f" (trained on {'; '.join(machines[s, i])})" if machines.get((s, i)) else "")
                 for (s, i), runs in groups.items()]
        lines.append(f"- {pct}%: " + ("one training; " if len(groups) == 1 else
                                      f"{len(groups)} trainings by the same commands; ") + "; ".join(parts))
    return ("Diffusion models of each fraction's augmented runs (sha256 of the structure / image weights):\n\n"
            + "\n".join(lines) + "\n") if lines else ""


def completed_fractions(args: argparse.Namespace, jobs: list[Job], found: dict[str, dict]) -> str:
    """The table (paper beside it) of the fractions whose every segmenter run, both arms and all repeats, has
    finished: from the ledger entries ``found`` or WORK's metrics.json. A fraction part-way through is left
    out, so that no row is read before all its runs are in. "" when none is complete."""
    from engine.evaluate import table_rows

    by_pct: dict[str, list[Job]] = {}
    for j in jobs:
        if j.run:
            by_pct.setdefault(j.pct, []).append(j)
    runs, complete = [], []
    for pct, group in by_pct.items():
        if {j.arm for j in group} != {"labeled", "augmented"} or not all(j.finished() for j in group):
            continue
        complete.append(pct)
        for j in group:
            runs.append(found[j.name]["metrics"] if j.name in found else
                        json.loads((args.work / "evaluate" / "runs" / j.run / "metrics.json").read_text()))
    if not runs:
        return ""
    table = table_markdown(table_rows(runs, sorted({float(r["fraction"]) for r in runs})), runs)
    models = format_trainings(args.ledger, jobs, sorted(complete, key=float)) if args.ledger else ""
    return table + ("\n" + models if models else "")


def image_stage_steps(total: int) -> tuple[str, str]:
    """(conditional, classifier-free) steps of an image model given ``total``: 3:1, each at least 1."""
    first = min(max(1, round(total * 0.75)), max(1, total - 1))
    return str(first), str(max(1, total - first))


def merge_parts(parts: list[str], out: str) -> Path:
    """One labeled folder ``out`` of the generate parts, in order: images/ and labels/ hold links named
    ``<part>_<pair id>`` (so folder order is seed order) and manifest.csv their rows. Built beside ``out``
    and renamed; an earlier merge there (links only) is replaced, an older folder of files is moved to
    WORK/replaced/<time>/ first."""
    import csv
    import shutil

    from engine.fileio import atomic_output

    out = Path(out)
    rows, fields = [], None
    for part in map(Path, parts):
        with open(part / "manifest.csv", newline="") as f:
            reader = csv.DictReader(f)
            fields = fields or reader.fieldnames
            for row in reader:
                pid = f"{part.name}_{row['id']}"
                rows.append((part, row, {**row, "id": pid, "image": f"images/{pid}.png",
                                         "label": f"labels/{pid}{Path(row['label']).suffix}"}))
    with atomic_output(out, folder=True) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        for part, row, new in rows:
            for key in ("image", "label"):
                (tmp / new[key]).symlink_to((part / row[key]).resolve())
        with open(tmp / "manifest.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(new for _, _, new in rows)
        if out.exists():  # replaced only now that its successor is complete
            files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
            if all(p.is_symlink() or p.name == "manifest.csv" for p in files):
                shutil.rmtree(out)
            else:
                set_aside([out], out.parent, time.strftime("%Y%m%d-%H%M%S"))
    print(f"{len(rows)} pairs of {len(parts)} parts in {out}")
    return out


def run_jobs(jobs: list[Job], parallel: int, logs: Path, threads: int,
             on_done: Callable[[Job], None] | None = None) -> None:
    """Run the jobs, at most ``parallel`` at a time, dependencies first; prints one line per event.

    On Ctrl-C, SIGINT (``timeout -s INT``) or SIGTERM (``kill``, the end of a session) the running jobs get
    SIGINT, so trainings save and export their models, and are given 60 s to exit; their state becomes
    "interrupted". This holds also when the runner was started in the background (``nohup ... &``), where the
    shell leaves SIGINT ignored, which the jobs would inherit. ``on_done(job)`` is called when a job has
    succeeded (an exception there is printed, not raised)."""
    def interrupted(signum, frame):
        raise KeyboardInterrupt

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                    signal.SIGTERM: signal.signal(signal.SIGTERM, interrupted)}
    try:
        _run_jobs(jobs, parallel, logs, threads, on_done)
    except KeyboardInterrupt:
        running = [j for j in jobs if j.state == "running"]
        print(f"interrupted: stopping {', '.join(j.name for j in running) or 'nothing'}", flush=True)
        for j in running:
            j.proc.send_signal(signal.SIGINT)
        deadline = time.time() + 60
        for j in running:
            try:
                j.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                j.proc.kill()
            j.seconds, j.state = time.time() - j.started, "interrupted"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_jobs(jobs: list[Job], parallel: int, logs: Path, threads: int,
              on_done: Callable[[Job], None] | None) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    by_name = {j.name: j for j in jobs}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f} s] {msg}", flush=True)

    def ready() -> list[Job]:
        return sorted((j for j in jobs if j.state == "waiting"
                       and all(by_name[a].state in ("ok", "cached") for a in j.after)), key=lambda j: j.priority)

    looked: set[str] = set()  # ready jobs whose output was looked for (once: it is there from the start or not)
    while True:
        for j in jobs:
            if j.state == "waiting" and any(by_name[a].state in ("failed", "skipped", "interrupted")
                                            for a in j.after):
                j.state = "skipped"
                say(f"skip  {j.name} (a step it needs failed)")
        running = [j for j in jobs if j.state == "running"]
        for j in running:
            rc = j.proc.poll()
            if rc is not None:
                j.seconds = time.time() - j.started
                if rc == 0 and j.run_dir is not None and not j.finished():
                    j.state = "interrupted"  # stopped before its budget: what depends on it waits for a resume
                    say(f"stop  {j.name} ({j.seconds:.0f} s): stopped before its budget; run again to resume")
                    continue
                j.state = "ok" if rc == 0 else "failed"
                say(f"{'done ' if rc == 0 else 'FAIL '} {j.name} ({j.seconds:.0f} s)"
                    + ("" if rc == 0 else f", exit {rc}: see {logs / _slug(j.name)}.log"))
                if rc == 0 and on_done is not None:
                    try:
                        on_done(j)
                    except Exception as e:  # noqa: BLE001 - a record that failed must not stop the jobs
                        say(f"note  {j.name}: {type(e).__name__}: {e}")
        # outputs already there first, through whole chains, so that the order of priority is kept among the
        # jobs that really run (a training whose subset is there goes before a job of lower priority)
        while new := [j for j in ready() if j.name not in looked]:
            looked.update(j.name for j in new)
            for j in (j for j in new if j.finished()):
                j.state = "cached"
                say(f"have  {j.name} ({j.done})")
        for j in ready():
            if sum(1 for x in jobs if x.state == "running") >= parallel:
                break
            if any(x.brief and x.priority < j.priority for x in jobs if x.state == "running"):
                break  # a slot is kept for what the brief job unlocks (ready() is sorted: so is the rest)
            log = open(logs / f"{_slug(j.name)}.log", "a")
            log.write(f"$ {' '.join(j.cmd)}\n")
            log.flush()
            j.proc = subprocess.Popen(j.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            j.started, j.state = time.time(), "running"
            say(f"start {j.name}")
        if all(j.state in ("ok", "failed", "skipped", "cached", "interrupted") for j in jobs):
            return
        time.sleep(1.0)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.train / "images").is_dir():
        print(f"skipped: training data not found at {args.train}")
        return 0
    import torch

    from engine.errors import NuDiffError
    from engine.evaluate import collect_results
    from engine.fileio import atomic_write_bytes

    gpu = torch.cuda.is_available()
    parallel = args.parallel or (4 if gpu else 1)
    threads = args.threads or max(1, (os.cpu_count() or 2) // parallel)
    if not args.status:
        args.work.mkdir(parents=True, exist_ok=True)
    # 1. roles: train (learned from), validation (choices only), test (scored once per arm)
    roles = assign_roles(args.train, read_split(args.split), args.test)
    folders = role_folders(args.work) if args.status else link_roles(roles, args.work)
    print(f"train: {len(roles.train)} images; validation (for choices, not scored here): "
          f"{', '.join(it.stem for it in roles.validation) or 'none'} in {folders['validation']}; test: "
          f"{', '.join(it.stem for it in roles.test)}" + (f" (from {args.test})" if args.test else "")
          + (f"; in no role: {len(roles.unused)}" if roles.unused else ""))
    # 2. diffusion models: given, reused (verified against results.json) or trained
    results = args.work / "evaluate" / "results.json"
    recorded = read_recorded_models(results)
    train_sha256 = train_fingerprint(roles.train)
    train_record = args.work / "train_data.json"  # the training images of the outputs in WORK
    try:
        previous = json.loads(train_record.read_text())["train_data_sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        previous = "" if any(args.work.glob("subset_*")) else None  # outputs of unknown training images
    choices = choose_models(args, recorded, train_sha256, previous)
    context = {"train_data_sha256": train_sha256, "test_data_sha256": train_fingerprint(roles.test)}
    if args.status:
        for c in choices:
            print(f"models {c.pct}%: {c.action} ({c.reason})"
                  + (f"; a run would set aside {len(c.set_aside)} outputs" if c.set_aside else ""))
        jobs, found = plan(args, folders["train"], folders["test"], choices), {}
        if args.ledger:
            jobs, _, found = apply_ledger(args, jobs, choices, folders["train"], folders["test"], context, False)
            print(f"ledger {args.ledger}: {len(found)} runs finished by earlier calls")
        print(progress_report(jobs))
        table = completed_fractions(args, jobs, found)
        print(f"\nfractions whose runs are all in (test images):\n\n{table}" if table else
              "\nno fraction has all its runs in yet: no figure to read")
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for c in choices:
        moved = set_aside(c.set_aside, args.work, stamp)
        print(f"models {c.pct}%: {c.action} ({c.reason})" + (f"; replaced outputs moved to "
                                                              f"{args.work / 'replaced' / stamp}" if moved else ""))
    train_record.write_text(json.dumps({"train_data_sha256": train_sha256,
                                        "train": [it.stem for it in roles.train]}, indent=1))
    (args.work / "evaluate").mkdir(exist_ok=True)
    if args.train.resolve() == DATA.resolve():
        (args.work / "evaluate" / "LICENCE-DATA.txt").write_text(LICENCE)
    # 3. the jobs; segmenters are scored on the test images only
    jobs = plan(args, folders["train"], folders["test"], choices)
    for job, kind, what, stale in changed_trainings(jobs):  # e.g. another --diffusion-size than last call
        moved = set_aside(stale, args.work, stamp)
        print(f"{job.name}: trained with other {kind} ({what}); "
              + ("retrained" if kind == "settings" else "resumed to the new budget")
              + (f"; outputs made from it moved to {args.work / 'replaced' / stamp}" if moved else ""))
    keep, ledger_models = None, {}
    if args.ledger:
        planned = len(jobs)
        jobs, chains, found = apply_ledger(args, jobs, choices, folders["train"], folders["test"], context)
        ledger_models = {e["run"].split("pct_")[0]: e["models"] for e in found.values() if e.get("models")}
        print(f"ledger {args.ledger}: {len(found)} runs restored; {planned - len(jobs)} jobs they make unneeded")
        keep = ledger_keeper(args, chains, choices, train_sha256)
    print(f"{len(jobs)} jobs, {parallel} at a time, {threads} CPU threads each, "
          f"{'GPU: ' + torch.cuda.get_device_name(0) if gpu else 'CPU only'}")
    t0 = time.time()
    run_jobs(jobs, parallel, args.work / "logs", threads, keep)
    summary = {j.name: {"state": j.state, "seconds": round(j.seconds, 1)} for j in jobs}
    summary.update({f"models {c.pct}%": {"state": "reused", "seconds": 0.0} for c in choices if c.action == "reuse"})
    (args.work / "jobs.json").write_text(json.dumps(summary, indent=2))
    failed = [j.name for j in jobs if j.state in ("failed", "skipped", "interrupted", "waiting")]
    # 4. the table, then the models and roles named in its results.json
    try:
        result = collect_results(args.work / "evaluate")
    except NuDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record_models(results, args.work, choices, jobs, recorded, args.seed, train_sha256, roles, args.split,
                  ledger_models)
    table = table_markdown(result.rows, result.runs)
    if args.ledger:
        models = format_trainings(args.ledger, jobs, sorted({j.pct for j in jobs if j.run}, key=float))
        table += ("\n" + models) if models else ""
    atomic_write_bytes(args.work / "evaluate" / "table1.md", table.encode())
    print(table)
    print(f"done in {time.time() - t0:.0f} s" + (f"; not finished: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
