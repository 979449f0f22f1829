"""Data-parallel training and split generation with 2 CPU processes (gloo) through `accelerate launch`."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from engine.checkpoint import load_checkpoint
from engine.demo import standin_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def _launch(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "engine", *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_two_process_training_and_resume(tmp_path, labeled_folder):
    common = ["train-structure", "--data", str(labeled_folder), "--run-dir", str(tmp_path), "--preset", "test",
              "--save-every", "2", "--preview-every", "0", "--batch-size", "2", "--quiet"]
    r = _launch(*common, "--steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(tmp_path / "latest")
    assert ck.record["num_processes"] == 2 and ck.step == 4
    # each process has its own data/noise stream, both saved for an exact resume
    assert not torch.equal(ck.tensors["rng.gen.0"], ck.tensors["rng.gen.1"])
    r = _launch(*common, "--steps", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_checkpoint(tmp_path / "latest").step == 6


@pytest.mark.parametrize("extra", [[], ["--oversample", "2.5"]], ids=["plain", "realism-filter"])
def test_two_process_generation_equals_single_process(tmp_path, extra):
    """Split over two processes, generation gives the pairs of one process, with the realism filter too
    (it runs once over all candidates, not per process: 8 candidates for 3 pairs, 4 sampled by each).
    In fp32: the processes' batches differ in size from the one process's, which bf16 kernels can feel."""
    s, i = standin_checkpoints()
    args = ["generate", "--structure-checkpoint", str(s), "--image-checkpoint", str(i), "--n", "3", "--steps", "3",
            "--seed", "7", "--precision", "fp32", *extra]
    r = _launch(*args, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    r1 = subprocess.run([sys.executable, "-m", "engine", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    one = sorted((tmp_path / "one" / "labels").glob("*.tif"))
    two = sorted((tmp_path / "two" / "labels").glob("*.tif"))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a.name == b.name
        np.testing.assert_array_equal(tifffile.imread(a), tifffile.imread(b))
    seeds = [int(row["seed"]) for row in csv.DictReader(open(tmp_path / "two" / "manifest.csv"))]
    assert seeds == [int(row["seed"]) for row in csv.DictReader(open(tmp_path / "one" / "manifest.csv"))]
    assert len(set(seeds)) == 3 and all(7 <= x < 7 + (8 if extra else 3) for x in seeds)
