"""The embedded demo checkpoints load and produce correctly shaped output (not that they are good)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine import pipeline
from engine.demo import DEMO_IMAGE, DEMO_STRUCTURE

pytestmark = pytest.mark.skipif(not (DEMO_STRUCTURE.exists() and DEMO_IMAGE.exists()),
                                reason="demo checkpoints not shipped in checkpoints/")


def test_demo_checkpoints_load_and_sample():
    s = pipeline.load_model(DEMO_STRUCTURE, kind="structure", device="cpu")
    i = pipeline.load_model(DEMO_IMAGE, kind="image", device="cpu")
    assert s.config.cond_channels == 0 and i.config.cond_channels == 3
    assert s.image_size == i.image_size  # default sampling size recorded in the records
    structures = pipeline.sample_structures(s, 1, steps=2, size=64)
    assert structures[0].structure.shape == (64, 64, 3) and structures[0].inst.dtype == np.int32
    images = pipeline.synthesize(i, [structures[0].structure], steps=2)
    assert images[0].shape == (64, 64, 3) and images[0].dtype == np.uint8


def test_demo_records_state_provenance():
    for path in (DEMO_STRUCTURE, DEMO_IMAGE):
        rec = json.loads(path.read_text())
        assert rec["contents"] == "inference" and rec["model"]["channels"]
        assert "CC BY-NC-SA" in rec.get("license", "")
        assert rec.get("training_data")


def test_the_stand_in_models_are_cached_per_engine_source(tmp_path, monkeypatch):
    """A version number alone let a machine's tests keep using stand-ins that older code had trained (a test
    passed on such a cache and failed on a new machine): the cache folder is named by the engine's sources."""
    import shutil
    from pathlib import Path

    import engine
    from engine import demo

    src = tmp_path / "engine"
    shutil.copytree(Path(engine.__file__).resolve().parent, src, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(engine, "__file__", str(src / "__init__.py"))
    before = demo.engine_source_digest()
    assert before == demo.engine_source_digest() and len(before) == 12
    (src / "train.py").write_text((src / "train.py").read_text() + "\n# a change\n")
    assert demo.engine_source_digest() != before
    monkeypatch.setattr(demo, "_build_test_models", lambda out, steps, size: [
        (out / f"{k}.json").write_text("{}") for k in ("structure", "image")])
    monkeypatch.setenv("NUDIFF_CACHE", str(tmp_path / "cache"))
    s, _ = demo.standin_checkpoints()
    assert s.parent.name == f"test-models-{engine.__version__}-32-60-{demo.engine_source_digest()}"
