"""Bad input to the sampling and data commands: one line, exit status 2, nothing written (argparse ranges)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("sample-structures", ["--n", "0"]), ("sample-structures", ["--n", "-3"]), ("sample-structures", ["--steps", "0"]),
    ("sample-structures", ["--batch-size", "0"]), ("sample-structures", ["--size", "0"]),
    ("sample-structures", ["--size", "abc"]), ("sample-structures", ["--tile", "4"]),
    ("sample-structures", ["--overlap", "-1"]), ("sample-structures", ["--window-batch", "0"]),
    ("sample-structures", ["--max-memory-gb", "0"]), ("sample-structures", ["--max-memory-gb", "nan"]),
    ("generate", ["--n", "0"]), ("generate", ["--steps", "0"]), ("generate", ["--size", "0"]),
    ("generate", ["--batch-size", "0"]), ("generate", ["--w", "-1"]), ("generate", ["--w", "abc"]),
    ("synthesize", ["--variants", "0"]), ("synthesize", ["--steps", "-2"]), ("synthesize", ["--w", "99"]),
]


def _run(args: list[str]):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("command,extra", CASES, ids=[f"{c} {' '.join(e)}" for c, e in CASES])
def test_sampling_arguments_are_refused_while_parsing(command, extra, tmp_path):
    out = tmp_path / "out"
    base = {"sample-structures": ["--out", str(out)], "generate": ["--out", str(out)],
            "synthesize": ["--labels", str(tmp_path), "--out", str(out)]}[command]
    r = _run([command, *base, *extra])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "error:" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--tile-size", "0"], ["--stride", "0"], ["--tile-size", "-8"]])
def test_inspect_tile_arguments(extra, tmp_path):
    r = _run(["inspect", str(tmp_path), *extra])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "must be at least 1" in r.stderr


RECORD_CASES = [({"format": "abc"}, "'format' must be a whole number"), ({"format": True}, "'format'"),
                ({"model": "hello"}, "'model' must be a model config"), ({"kind": "x"}, "unknown model kind"),
                ({"diffusion": {"num_timesteps": 0}}, "num_timesteps"),
                ({"diffusion": {"schedule": "bogus"}}, "unknown beta schedule"),
                ({"diffusion": {"beta_start": 0.5, "beta_end": 0.1}}, "betas"),
                ({"diffusion": "x"}, "'diffusion' must be an object")]


@pytest.mark.parametrize("change,message", RECORD_CASES, ids=[m for _, m in RECORD_CASES])
def test_a_damaged_checkpoint_record_is_refused_in_one_line(change, message, tmp_path, tiny_checkpoints):
    import json
    import shutil

    src = Path(tiny_checkpoints[0])
    shutil.copy(src.with_suffix(".safetensors"), tmp_path / "structure.safetensors")
    rec = json.loads(src.read_text())
    for key, value in change.items():
        if isinstance(value, dict):
            rec[key].update(value)
        else:
            rec[key] = value
    (tmp_path / "structure.json").write_text(json.dumps(rec))
    out = tmp_path / "out"
    r = _run(["sample-structures", "--checkpoint", str(tmp_path / "structure.json"), "--n", "1", "--steps", "2",
              "--out", str(out)])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1 and message in lines[0], r.stderr
    assert not out.exists()


def test_an_empty_label_map_is_refused(tmp_path, tiny_checkpoints):
    import numpy as np

    np.save(tmp_path / "empty.npy", np.zeros((0, 0), np.int32))
    r = _run(["synthesize", "--checkpoint", str(tiny_checkpoints[1]), "--labels", str(tmp_path / "empty.npy"),
              "--out", str(tmp_path / "out")])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "at least 8 px" in r.stderr
    assert not (tmp_path / "out").exists()


def test_an_unusable_out_is_refused_before_any_sampling(tmp_path, tiny_checkpoints):
    s, i = map(str, tiny_checkpoints)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (busy, a_file):
        r = _run(["generate", "--structure-checkpoint", s, "--image-checkpoint", i, "--n", "1", "--steps", "200",
                  "--out", str(out)])
        assert r.returncode == 2 and "already exists and is not empty" in r.stderr and "Traceback" not in r.stderr
        assert "pairs:" not in r.stderr  # refused before the progress bar: nothing was sampled
    r = _run(["synthesize", "--checkpoint", i, "--labels", str(tmp_path), "--out", str(busy)])
    assert r.returncode == 2 and "already exists and is not empty" in r.stderr
    assert (busy / "keep.txt").read_text() == "mine" and a_file.read_text() == "x"
