"""Shared fixtures: procedural labeled data and tiny test-preset checkpoints (trained once per session)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoints() -> tuple[Path, Path]:
    """(structure, image) checkpoints of the 'test' preset (32 px), trained once on procedural tiles and
    cached by engine.demo (a few seconds the first time on a machine)."""
    from engine.demo import standin_checkpoints

    return standin_checkpoints()


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
