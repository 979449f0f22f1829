"""Shared fixtures: procedural labeled data and tiny test-preset checkpoints (trained once per session)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """(structure, image) inference checkpoints of the 'test' preset (32 px), trained on procedural tiles."""
    from engine.config import TrainConfig
    from engine.synthetic import make_tile
    from engine.train import TrainingSet, train

    root = tmp_path_factory.mktemp("tiny_models")
    tiles = [make_tile(32, seed=i) for i in range(8)]
    data = TrainingSet.from_arrays([t[0] for t in tiles], [t[1] for t in tiles])
    out = []
    for kind in ("structure", "image"):
        cfg = TrainConfig(kind=kind, preset="test", steps=30, finetune_steps=10, batch_size=4, lr=1e-3,
                          save_every=10_000, preview_every=0, log_every=10)
        out.append(Path(train(cfg, root / kind, data, show_progress=False)))
    return out[0], out[1]


@pytest.fixture(scope="session")
def labeled_folder(tmp_path_factory) -> Path:
    """A folder of 3 procedural 64x64 labeled tiles (images/ + labels/)."""
    from engine.synthetic import write_folder

    return write_folder(tmp_path_factory.mktemp("labeled") / "data", n_images=3, size=64, seed=0)


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
