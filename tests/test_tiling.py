"""Large canvases: window grid, fused noise predictions, memory estimate and budget, the worker process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine import pipeline
from engine.config import preset
from engine.diffusion import guided_eps
from engine.errors import NuDiffError
from engine.memory import (GiB, MemoryBudgetError, device_memory_bytes, forward_bytes, is_out_of_memory, job_bytes,
                           plan_windows)
from engine.quality import alignment_score
from engine.synthetic import make_tile
from engine.tiling import TiledDenoiser, TilingOptions, WindowGrid, seam_score, window_positions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    s, i = tiny_checkpoints
    return pipeline.load_model(s, device="cpu"), pipeline.load_model(i, device="cpu")


def test_window_positions_cover_the_canvas_with_the_last_window_flush():
    assert window_positions(80, 32, 8) == [0, 24, 48]
    assert window_positions(100, 32, 8) == [0, 24, 48, 68]
    assert window_positions(32, 32, 8) == [0] and window_positions(20, 32, 8) == [0]
    for length in (33, 64, 97, 1000):
        pos = window_positions(length, 32, 8)
        covered = np.zeros(length, bool)
        for p in pos:
            covered[p:p + 32] = True
        assert covered.all() and pos[-1] == length - 32
        assert all(b - a <= 24 for a, b in zip(pos, pos[1:]))  # never less than the overlap shared
    with pytest.raises(ValueError):
        window_positions(100, 32, 32)


def test_window_weights_are_positive_and_fall_towards_the_edges():
    g = WindowGrid(80, 80, 32, 8)
    w = g.weight()
    assert w.shape == (32, 32) and float(w.min()) > 0 and float(w.max()) == 1.0
    assert float(w[0, 0]) < float(w[4, 4]) < float(w[16, 16])
    assert len(g) == 9 and g.edges() == ([24, 32, 48, 56], [24, 32, 48, 56])


class _Pointwise(nn.Module):
    """A translation-equivariant 'denoiser' (1x1 convolutions): any window sees what the whole canvas does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)

    def forward(self, x, t, cond=None):
        out = self.a(x) * (1 + t.float()[:, None, None, None] / 1000)
        return out + self.b(cond) if cond is not None else out


def test_fusion_reproduces_a_model_that_needs_no_context():
    model = _Pointwise()
    x = torch.randn(2, 3, 80, 72)
    cond = torch.randn(2, 3, 80, 72)
    t = torch.tensor([10, 500])
    grid = WindowGrid(80, 72, 32, 8)
    batches = []
    tiled = TiledDenoiser(model, grid, window_batch=4, on_batch=lambda: batches.append(1))(x, t, cond, 2.0)
    torch.testing.assert_close(tiled, guided_eps(model, x, t, cond, 2.0), rtol=1e-5, atol=1e-5)
    assert len(batches) == -(-2 * len(grid) // 4)
    # uniform guided passes per window: the unconditional half sees the null condition
    torch.testing.assert_close(TiledDenoiser(model, grid, window_batch=3)(x, t, None, 0.0), model(x, t), rtol=1e-5,
                               atol=1e-5)


def test_three_by_three_window_canvas_is_seamless_and_aligned(models):
    """80 px canvas, 32 px windows, overlap 8: 3 x 3 windows. Fused: no seams; naive stitching: seams."""
    _, imodel = models
    _, inst = make_tile(80, seed=1)
    fused = pipeline.synthesize(imodel, [inst], steps=10, seed=1, tiling=TilingOptions(tile=32, overlap=8))[0]
    assert fused.shape == (80, 80, 3) and fused.dtype == np.uint8
    naive = pipeline.synthesize(imodel, [inst[:64, :64]], steps=10, seed=1,
                                tiling=TilingOptions(tile=32, overlap=0))[0]
    fused_seam = seam_score(fused, *WindowGrid(80, 80, 32, 8).edges())
    naive_seam = seam_score(naive, *WindowGrid(64, 64, 32, 0).edges())
    assert fused_seam <= 1.1, fused_seam
    assert naive_seam >= 1.2, naive_seam  # the score can fail: a mosaic is caught
    # nuclei on window borders keep their labels: alignment as good as single windows of the same layout
    crops = [inst[y:y + 32, x:x + 32] for y in (0, 24, 48) for x in (0, 24, 48)]
    single = alignment_score(pipeline.synthesize(imodel, crops, steps=10, seed=1), crops)
    tiled = alignment_score([fused], [inst])
    assert tiled["hematoxylin_dice"] >= single["hematoxylin_dice"] - 0.05
    assert tiled["darker_fraction"] >= single["darker_fraction"] - 0.05


def test_large_structure_is_sampled_in_windows_with_one_watershed(tiny_checkpoints):
    # fp32: the window batch changes float sums only slightly there; under bf16 autocast it changes kernels
    smodel = pipeline.load_model(tiny_checkpoints[0], device="cpu", precision="fp32")
    ticks = []
    s = pipeline.sample_structures(smodel, 1, size=80, steps=4, seed=3,
                                   tiling=TilingOptions(overlap=8, max_window_batch=4),
                                   progress=lambda i, n: ticks.append((i, n)))[0]
    assert s.structure.shape == (80, 80, 3) and s.inst.shape == (80, 80)
    assert ticks[-1] == (4 * 3, 4 * 3)  # 9 windows in batches of 4 -> 3 passes per step
    from engine.structure import structure_to_instances

    np.testing.assert_array_equal(s.inst, structure_to_instances(s.structure))
    again = pipeline.sample_structures(smodel, 1, size=80, steps=4, seed=3, tiling=TilingOptions(overlap=8))[0]
    np.testing.assert_allclose(again.structure, s.structure, atol=1e-4)  # the window batch does not matter


def test_any_size_and_shape_is_padded_and_cropped(models):
    smodel, imodel = models
    imgs = pipeline.synthesize(imodel, [np.zeros((33, 33), np.int32), np.ones((50, 70), np.int32)], steps=2)
    assert [i.shape for i in imgs] == [(33, 33, 3), (50, 70, 3)]
    assert pipeline.sample_structures(smodel, 1, size=31, steps=2)[0].inst.shape == (31, 31)
    with pytest.raises(NuDiffError, match="at least 8 px"):
        pipeline.synthesize(imodel, [np.zeros((4, 40), np.int32)], steps=2)
    with pytest.raises(NuDiffError, match="multiple of 2"):
        pipeline.synthesize(imodel, [np.zeros((64, 64), np.int32)], steps=2, tiling=TilingOptions(tile=33))


def test_budget_lowers_the_window_batch_then_refuses_with_one_line():
    cfg = preset("cpu", "image", 128)
    one = job_bytes(cfg, (1000, 1000), (128, 128), 1, guided=True)
    eight = job_bytes(cfg, (1000, 1000), (128, 128), 8, guided=True)
    assert one < eight
    plan = plan_windows(cfg, (1000, 1000), (128, 128), guided=True, max_window_batch=8,
                        budget_gb=(one + eight) / 2 / GiB)
    assert 1 <= plan.window_batch < 8 and plan.estimate <= plan.budget
    with pytest.raises(MemoryBudgetError) as err:
        plan_windows(cfg, (1000, 1000), (128, 128), guided=True, max_window_batch=8, budget_gb=one / GiB * 0.9,
                     what="image")
    msg = str(err.value)
    assert "\n" not in msg and "1000x1000 px image" in msg and "budget" in msg and "--max-memory-gb" in msg
    # the target for the CPU preset, at the largest CPU size benchmarked (bench/large_fields.py measures)
    assert job_bytes(cfg, (2000, 2000), (128, 128), 8, guided=True) < 4 * GiB


def test_a_model_on_the_cpu_plans_with_the_ram_budget():
    cfg = preset("cpu", "image", 128)
    for device in (None, "cpu", torch.device("cpu")):
        plan = plan_windows(cfg, (1000, 1000), (128, 128), guided=True, max_window_batch=8, budget_gb=3,
                            device=device)
        assert plan.budget == 3 * GiB
    assert device_memory_bytes("cpu") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_model_on_a_gpu_plans_within_the_gpu_memory():
    cfg = preset("paper", "image", 256)
    total = device_memory_bytes("cuda")
    assert total == torch.cuda.get_device_properties(0).total_memory
    plan = plan_windows(cfg, (1000, 1000), (256, 256), guided=True, max_window_batch=64, budget_gb=10 * total / GiB,
                        device="cuda")
    assert plan.budget <= total and plan.estimate <= plan.budget
    with pytest.raises(MemoryBudgetError, match="this GPU can give a job"):
        plan_windows(cfg, (20000, 20000), (20000, 20000), guided=True, max_window_batch=1,
                     budget_gb=10 * total / GiB, device="cuda")


def test_a_failed_allocation_is_told_apart_from_a_bug():
    try:
        torch.empty(2 ** 50, dtype=torch.uint8)  # the CPU allocator refuses at once
    except RuntimeError as e:
        cpu_refusal = e
    assert is_out_of_memory(cpu_refusal) and is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("x"))


def test_cli_reports_a_failed_allocation_in_one_line(monkeypatch, capsys):
    from engine import cli

    monkeypatch.setattr(cli, "_run", lambda args: torch.empty(2 ** 50, dtype=torch.uint8))
    assert cli.main(["inspect", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory") and err.count("\n") == 1 and "smaller" in err


def test_paper_model_at_1000_px_in_one_pass_is_refused_but_tiled_fits(models):
    cfg = preset("paper", "image", 256)
    with pytest.raises(MemoryBudgetError):
        plan_windows(cfg, (1000, 1000), (1000, 1000), guided=True, max_window_batch=1, budget_gb=16)
    assert plan_windows(cfg, (1000, 1000), (256, 256), guided=True, max_window_batch=8, budget_gb=16).window_batch >= 1


_MEASURE = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {root!r})
    from engine.config import preset
    from engine.unet import UNet
    torch.set_num_threads(1)
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    out = []
    for name, kind, b, s in {cases!r}:
        cfg = preset(name, kind, s)
        m = UNet(cfg).eval().requires_grad_(False)
        def run(b, s):
            x = torch.randn(b, 3, s, s); t = torch.randint(0, 1000, (b,))
            c = torch.randn(b, 3, s, s) if cfg.cond_channels else None
            with torch.no_grad():
                m(x, t, c)
        run(1, 16)
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident set (VmHWM) to the current one
        before = hwm()
        run(b, s)
        out.append(hwm() - before)
    print(json.dumps(out))
""")


@pytest.mark.parametrize("cases", [
    [("test", "image", 2, 128)],  # attention over 64 x 64 tokens dominates
    [("cpu", "image", 2, 128)],  # the demo's window pass
    [("test", "structure", 16, 32)],
])
def test_forward_estimate_covers_the_measured_peak(cases):
    """Each case in a fresh process: growth of the peak resident set (VmHWM, reset just before) over one forward."""
    r = subprocess.run([sys.executable, "-c", _MEASURE.format(root=str(ROOT), cases=cases)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    measured = json.loads(r.stdout.strip().splitlines()[-1])
    for (name, kind, b, s), m in zip(cases, measured):
        est = forward_bytes(preset(name, kind, s), b, s, s)
        assert est >= m, (name, kind, b, s, est, m)
        assert est <= 3 * m + 64 * 1024 ** 2, (name, kind, b, s, est, m)  # and not wildly pessimistic


def test_worker_survives_a_job_over_budget_and_runs_the_next(tiny_checkpoints):
    from engine.worker import ComputeWorker, WorkerError

    s, i = tiny_checkpoints
    w = ComputeWorker(max_memory_gb=1.0)
    try:
        with pytest.raises(WorkerError, match="memory budget of 1.0 GiB"):
            w.run("allocate", {"mb": 1500, "seconds": 5})
        got = w.run("synthesize", {"checkpoint": str(i), "structures": [np.zeros((40, 40), np.int32)], "steps": 2})
        assert got[0].shape == (40, 40, 3)
        pid = w.pid
        with pytest.raises(MemoryBudgetError, match="ran out of memory; choose a smaller size"):
            w.run("allocate", {"torch_bytes": 2 ** 50})  # torch's allocator refuses at once: no memory is touched
        assert w.pid == pid  # reported as the size's fault, in the same process: no restart
        from engine.errors import CheckpointError

        with pytest.raises(CheckpointError, match="not an image model|image model is needed"):
            w.run("synthesize", {"checkpoint": str(s), "structures": [np.zeros((40, 40), np.int32)], "steps": 2})
        from engine.samplers import Cancelled

        with pytest.raises(Cancelled):
            w.run("synthesize", {"checkpoint": str(i), "structures": [np.zeros((40, 40), np.int32)], "steps": 50},
                  cancel=lambda: True)
    finally:
        w.close()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_cli_refuses_a_canvas_over_the_budget_before_any_work(tmp_path, tiny_checkpoints):
    s, i = tiny_checkpoints
    out = tmp_path / "big"
    r = _cli("sample-structures", "--checkpoint", str(s), "--n", "1", "--size", "20000", "--max-memory-gb", "1",
             "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "20000x20000 px structure" in lines[0] and "1.0 GiB" in lines[0], r.stderr
    assert not out.exists()
    r = _cli("generate", "--structure-checkpoint", str(s), "--image-checkpoint", str(i), "--n", "1", "--size",
             "100000", "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "largest side" in r.stderr and not out.exists()
    r = _cli("synthesize", "--checkpoint", str(i), "--labels", str(tmp_path), "--max-memory-gb", "0",
             "--out", str(out))
    assert r.returncode == 2 and "--max-memory-gb" in r.stderr and "positive" in r.stderr
    r = _cli("generate", "--structure-checkpoint", str(s), "--image-checkpoint", str(i), "--n", "1", "--size", "72",
             "--tile", "32", "--overlap", "8", "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    import csv

    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert rows and rows[0]["windows"] == "9" and rows[0]["tile"] == "32" and rows[0]["overlap"] == "8"


def test_windows_keep_their_spade_modulation_between_steps_with_the_same_result(models):
    """A TiledDenoiser with a cache keeps each window batch's condition maps for the later steps of the run
    (a new condition or w starts afresh) and gives the samples it gives without one; the pipeline passes the
    memory its plan leaves."""
    from engine.samplers import sample
    from engine.unet import ConditionMaps

    _, imodel = models
    grid = WindowGrid(48, 48, 32, 16)
    cond = torch.rand(1, 3, 48, 48) * 2 - 1
    out = {}
    for cache in (0, 1 << 30):
        den = TiledDenoiser(imodel.model, grid, window_batch=2, cache_bytes=cache)
        out[cache] = sample(imodel.model, (1, 3, 48, 48), steps=3, seeds=[5], cond=cond, w=2.0, denoiser=den)
        if cache:
            kept = den._maps[2]
            assert len(kept) == 2 and all(isinstance(m, ConditionMaps) and m.nbytes > 0 for m in kept.values())
            other = cond.clone()
            den(torch.zeros(1, 3, 48, 48), torch.tensor([10]), other, 2.0)  # another condition: new maps
            assert den._maps[0] is other and den._maps[2] is not kept
    assert torch.equal(out[0], out[1 << 30])
    plan = pipeline.plan_image_canvas(imodel, (80, 80), 2.0, TilingOptions(tile=32, overlap=8))
    assert plan.tiled and 0 < plan.memory.cache_bytes <= plan.memory.budget - plan.memory.estimate
