"""What a kill -9 leaves behind is cleaned up by the next start of the same job: a training run reads as
interrupted, its temporary files and lock are taken care of when it resumes; a killed export's temporary
file is removed by the next export to the same target."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from engine.checkpoint import load_checkpoint
from engine.export import write_folder, write_zip
from engine.fileio import remove_stale_temps
from engine.synthetic import make_tile
from engine.run_status import read_status

ROOT = Path(__file__).resolve().parents[1]
WAIT = 600  # seconds; generous for a loaded CI machine


@contextmanager
def reaped(proc: subprocess.Popen):
    """The block runs with `proc`; whatever happens in it, the process is not left running."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(cond, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + WAIT
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def latest_step(run: Path) -> int:
    try:
        return json.loads((run / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_training_reads_interrupted_and_resume_cleans_up(labeled_folder, tmp_path):
    from nudiff_app.jobs import TrainingJobs

    runs = tmp_path / "runs"
    runs.mkdir()
    run = runs / "r1" / "structure"
    cmd = [sys.executable, "-m", "engine", "train-structure", "--data", str(labeled_folder), "--run-dir", str(run),
           "--preset", "test", "--image-size", "32", "--batch-size", "2", "--steps", "100000", "--save-every", "1",
           "--log-every", "1", "--preview-every", "0", "--quiet"]
    jobs = TrainingJobs(runs)
    jobs._spawn(run, "structure", cmd)  # as the Train tab launches a job (active.json records it)
    proc = jobs.proc
    with reaped(proc):
        wait_for(lambda: latest_step(run) >= 1 and read_status(run).get("state") == "running", proc,
                 "a checkpoint")
        # the moment of a kill inside a checkpoint / preview write: their temporary files exist
        planted = [run / ".latest.safetensors.abc.tmp", run / ".latest.json.x1y2_z.tmp",
                   run / ".step_0000003.safetensors.q9.tmp", run / ".status.json.k2.tmp"]
        (run / "previews").mkdir(exist_ok=True)
        planted.append(run / "previews" / ".latest.png.tmp")
        for p in planted:
            p.write_bytes(b"\0" * 1000)
        kept = [run / ".notes.txt.abc.tmp", run / "mine.tmp", run / ".latest.safetensors.tmp"]  # not ours
        for p in kept:
            p.write_text("user file")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(WAIT)
    killed_at = latest_step(run)
    assert killed_at >= 1
    lock = json.loads((run / "lock.json").read_text())  # left behind by kill -9
    assert lock["pid"] == proc.pid
    st = read_status(run)
    assert st["state"] == "interrupted" and f"training process {proc.pid}" in st["message"], st
    rep = jobs.report()
    assert rep["state"] == "interrupted" and not rep["alive"], rep
    assert "**interrupted**" in rep["text"] and "press Resume" in rep["text"], rep["text"]

    # the Train tab's Resume re-runs the same command: it takes over the stale lock, removes the temporaries
    rec = jobs.resume()
    proc = jobs.proc
    with reaped(proc):
        assert rec["cmd"] == cmd
        wait_for(lambda: latest_step(run) >= killed_at + 2, proc, "the resumed run's checkpoints")
        assert jobs.report()["state"] == "running"
        assert "is already running" in _error(lambda: jobs.resume())
        assert jobs.stop().startswith("Asked structure training to save and stop")
        proc.wait(WAIT)
    assert proc.returncode == 0, (run / "process.log").read_text()[-3000:]
    st = read_status(run)
    assert st["state"] == "stopped" and st["step"] > killed_at
    assert jobs.report()["state"] == "stopped"
    assert not any(p.exists() for p in planted) and all(p.exists() for p in kept)
    assert not (run / "lock.json").exists()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    notes = [r["event"] for r in log if "event" in r]
    assert any(n.startswith(f"took over the lock of training process {lock['pid']} on ") for n in notes), notes
    removed = [n for n in notes if n.startswith("removed ")]  # ours, and any the kill caught mid-write
    assert len(removed) == 1 and re.match(r"removed (\d+) temporary file\(s\) left by an interrupted write",
                                          removed[0]) and int(removed[0].split()[1]) >= 5, notes
    assert any(n.startswith(f"the previous training process ({lock['pid']}) was interrupted") for n in notes), notes
    assert any(n.startswith("resumed from step ") for n in notes), notes
    assert load_checkpoint(run / "latest").step == st["step"] == load_checkpoint(run / "model").step


def _error(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return str(e)
    return ""


EXPORT_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    import engine.export as ex

    out, marker = Path(sys.argv[1]), Path(sys.argv[2])
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(6):
        inst = np.kron(np.arange(1, 65).reshape(8, 8), np.ones((32, 32), np.int32))  # 64 nuclei, 256 px
        pairs.append((rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), inst, {}))
    manifest = ex._manifest

    def slow_manifest(*a, **k):  # every pair is in the temporary zip by now: hold the write open
        marker.write_text("writing")
        time.sleep(600)
        return manifest(*a, **k)

    ex._manifest = slow_manifest
    ex.write_zip(pairs, out)
    print("finished")
""")


def test_killed_export_leaves_no_zip_and_the_next_export_removes_its_temp(tmp_path):
    out, marker = tmp_path / "out.zip", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", EXPORT_SCRIPT, str(out), str(marker)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with reaped(proc):
        wait_for(marker.exists, proc, "the export to write")
        temps = list(tmp_path.glob(".out.zip.*.tmp"))
        assert len(temps) == 1 and temps[0].stat().st_size > 100_000
        assert remove_stale_temps(out) == []  # a live writer's temporary is left alone
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(WAIT)
    assert not out.exists() and temps[0].exists()  # no final zip, the killed write's temporary is left
    # a writer that is alive (holds its temporary locked) is not disturbed by another write
    live = tmp_path / ".out.zip.live01.tmp"
    fd = os.open(live, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        image, inst = make_tile(32, seed=0)
        path = write_zip([(image, inst, {})], out)
        assert path == out and not temps[0].exists() and live.exists()
    finally:
        os.close(fd)
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None and "manifest.csv" in zf.namelist() and "images/pair_0001.png" in zf.namelist()
    assert remove_stale_temps(out) == [live]  # once its writer is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zip", "writing"]


def test_write_folder_removes_a_killed_writers_temp_folder(tmp_path):
    stale = tmp_path / ".pairs.k1ll3d.tmp"
    (stale / "images").mkdir(parents=True)
    (stale / "images" / "pair_0001.png").write_bytes(b"half")
    other = tmp_path / ".other.k1ll3d.tmp"  # another target's: not touched
    other.mkdir()
    image, inst = make_tile(32, seed=1)
    write_folder([(image, inst, {}), (image, np.zeros_like(inst), {})], tmp_path / "pairs")
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in (tmp_path / "pairs" / "images").iterdir()) == ["pair_0001.png", "pair_0002.png"]


def test_resume_survives_a_kill_between_the_two_renames_of_a_save(tmp_path):
    """save_checkpoint renames the weights, then the record: a kill in between leaves latest torn (new
    weights, old record); the trainer resumes from the newest intact step snapshot instead of failing."""
    import shutil

    from engine.config import TrainConfig
    from engine.train import Trainer, TrainingSet

    tiles = [make_tile(32, seed=i) for i in range(4)]
    data = TrainingSet.from_arrays([t[0] for t in tiles], [t[1] for t in tiles])
    cfg = dict(kind="structure", preset="test", batch_size=2, save_every=1, preview_every=0, log_every=1)
    Trainer(TrainConfig(steps=2, **cfg), tmp_path, data, show_progress=False).run()
    torn = tmp_path / ".torn"
    shutil.copyfile(tmp_path / "step_0000001.safetensors", torn)
    os.replace(torn, tmp_path / "latest.safetensors")  # step 1's weights under step 2's record
    t = Trainer(TrainConfig(steps=3, **cfg), tmp_path, data, show_progress=False)
    assert t.step == 2
    t.run()
    assert load_checkpoint(tmp_path / "latest").step == 3
    notes = [json.loads(line).get("event", "") for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any(n.startswith("latest.json is unreadable (") and n.endswith("resuming from step_0000002.json")
               for n in notes), notes
