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
