"""Decompression bombs: a small file declaring a huge raster is refused from its header, before decoding."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import png_bomb
from engine.data import DEFAULT_MAX_PIXELS, raster_size, read_image, read_label
from engine.inspection import inspect_folder
from engine.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_png_bomb_is_refused_from_its_header(tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png", 12000, 12000)  # 144 MP, > the 100 MP default
    assert bomb.stat().st_size < 2_000_000 and raster_size(bomb) == (12000, 12000)
    t0 = time.perf_counter()
    for read in (read_image, read_label):
        with pytest.raises(DataError) as err:
            read(bomb)
        msg = str(err.value)
        assert "12000x12000 px" in msg and "100 MP" in msg and "NUDIFF_MAX_PIXELS" in msg and "\n" not in msg
    assert time.perf_counter() - t0 < 2.0  # never decoded (decoding 144 MP takes seconds and 144 MB+)


def test_tiff_header_is_checked_too(tmp_path):
    path = tmp_path / "big.tif"
    with tifffile.TiffWriter(path) as tw:  # declares 11000 x 10000 without writing the pixels
        tw.write(shape=(11000, 10000), dtype=np.uint8)
    assert raster_size(path) == (11000, 10000)
    with pytest.raises(DataError, match="over the limit of 100 MP"):
        read_label(path)


def test_the_limit_can_be_raised_and_small_files_pass(tmp_path, monkeypatch):
    bomb = png_bomb(tmp_path / "wide.png", 4000, 3000)  # 12 MP
    monkeypatch.setenv("NUDIFF_MAX_PIXELS", "10000000")
    with pytest.raises(DataError, match="over the limit of 10 MP"):
        read_label(bomb)
    monkeypatch.setenv("NUDIFF_MAX_PIXELS", "20000000")
    assert read_label(bomb).shape == (3000, 4000)
    assert DEFAULT_MAX_PIXELS == 100_000_000


def test_cli_inspect_refuses_the_bomb_in_a_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    png_bomb(tmp_path / "images" / "a.png", 12000, 12000)
    png_bomb(tmp_path / "labels" / "a.png", 12000, 12000)
    r = subprocess.run([sys.executable, "-m", "engine", "inspect", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "NUDIFF_MAX_PIXELS" in r.stdout + r.stderr
    with pytest.raises(DataError):
        inspect_folder(tmp_path)
