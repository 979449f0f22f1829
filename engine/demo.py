"""Default models: the embedded demo checkpoints, or tiny stand-ins trained on procedural tiles.

The repository ships `checkpoints/structure-demo.*` and `checkpoints/image-demo.*` (see
checkpoints/README.md). Where they are absent (or NUDIFF_TEST_MODELS=1 is set, as the test suite does),
:func:`default_checkpoints` trains `test`-preset models for a few seconds on procedural tiles, once, into
a cache folder (NUDIFF_CACHE, default ~/.cache/nudiff), and returns those.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import engine
from engine.fileio import commit

CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints"
DEMO_STRUCTURE = CHECKPOINT_DIR / "structure-demo.json"
DEMO_IMAGE = CHECKPOINT_DIR / "image-demo.json"

__all__ = ["default_checkpoints", "standin_checkpoints", "cache_dir", "CHECKPOINT_DIR"]


def cache_dir() -> Path:
    return Path(os.environ.get("NUDIFF_CACHE", Path.home() / ".cache" / "nudiff"))


def default_checkpoints() -> tuple[Path, Path]:
    """(structure, image) checkpoint record paths the app and CLI use when none is chosen."""
    if os.environ.get("NUDIFF_TEST_MODELS") != "1" and DEMO_STRUCTURE.exists() and DEMO_IMAGE.exists():
        return DEMO_STRUCTURE, DEMO_IMAGE
    return standin_checkpoints()


def engine_source_digest() -> str:
    """The first 12 hex digits of a sha256 over the engine package's Python sources (names and contents):
    it changes whenever the code that trains the stand-ins may have."""
    h = hashlib.sha256()
    for f in sorted(Path(engine.__file__).resolve().parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def standin_checkpoints(steps: int = 60, size: int = 32) -> tuple[Path, Path]:
    """Tiny `test`-preset models trained on procedural tiles; built once per engine source (a version
    number alone let a machine's tests keep using stand-ins that older code had trained) and cached (those of
    other sources are left alone: another checkout may be using them; each is about 1 MB)."""
    prefix = f"test-models-{engine.__version__}-{size}-{steps}-"
    folder = cache_dir() / f"{prefix}{engine_source_digest()}"
    s, i = folder / "structure.json", folder / "image.json"
    if s.exists() and i.exists():
        return s, i
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        _build_test_models(tmp, steps, size)
        try:
            commit(tmp, folder)  # atomic publish; fails if another process won the race
        except OSError:
            if not (s.exists() and i.exists()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return s, i


def _build_test_models(out: Path, steps: int, size: int) -> None:
    import torch

    from engine.checkpoint import export_inference
    from engine.config import TrainConfig
    from engine.synthetic import make_tile
    from engine.train import Trainer, TrainingSet

    tiles = [make_tile(size, seed=i) for i in range(16)]
    data = TrainingSet.from_arrays([t[0] for t in tiles], [t[1] for t in tiles])
    threads = torch.get_num_threads()
    for kind in ("structure", "image"):
        cfg = TrainConfig(kind=kind, preset="test", image_size=size, steps=steps,
                          finetune_steps=steps // 3, batch_size=4, lr=1e-3, save_every=10 ** 9,
                          preview_every=0, log_every=10, seed=0)
        Trainer(cfg, out / f"run-{kind}", data, show_progress=False).run()
        export_inference(out / f"run-{kind}" / "latest", out / kind, half=False,
                         extra={"note": "test-preset stand-in trained on procedural tiles"})
        shutil.rmtree(out / f"run-{kind}")
    torch.set_num_threads(threads)
