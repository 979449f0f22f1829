"""One writer per run folder (RUN/lock.json), resume compares data and settings, and the train commands
refuse bad numbers while parsing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.checkpoint import file_sha256, load_checkpoint
from engine.cli import build_parser, main
from engine.config import TrainConfig
from engine.errors import TrainingError
from engine.runlock import RunFolderBusy, host_name, lock_holder, process_start
from engine.synthetic import make_tile
from engine.run_status import budget_reached, read_status, write_status
from engine.train import Trainer, TrainingSet

ROOT = Path(__file__).resolve().parents[1]
WAIT = 600  # seconds; generous for a loaded CI machine


@pytest.fixture(scope="module")
def data() -> TrainingSet:
    tiles = [make_tile(32, seed=i) for i in range(6)]
    return TrainingSet.from_arrays([t[0] for t in tiles], [t[1] for t in tiles])


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory) -> Path:
    """Another 3-tile labeled folder (different tiles than labeled_folder)."""
    from engine.synthetic import write_folder

    return write_folder(tmp_path_factory.mktemp("other") / "data", n_images=3, size=64, seed=7)


def cfg(**kw) -> TrainConfig:
    base = dict(kind="structure", preset="test", steps=2, batch_size=2, lr=1e-3, save_every=1, preview_every=0,
                log_every=1, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train-structure", "--data", str(data), "--run-dir", str(run), "--preset", "test", "--image-size", "32",
            "--batch-size", "2", "--save-every", "1", "--preview-every", "0", "--log-every", "1", "--quiet", *extra]


def events(run: Path) -> list[str]:
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["event"] for line in lines if '"event"' in line]


# ----------------------------------------------------------------------------- one writer


def test_two_trainers_on_one_folder_one_is_refused_at_once(labeled_folder, tmp_path):
    """The issue's case: two CLI trainers started together on one run folder."""
    run = tmp_path / "R"
    cmd = [sys.executable, "-m", "engine", *train_args(labeled_folder, run, "--steps", "100000")]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline = time.time() + WAIT
        while all(p.poll() is None for p in procs):
            assert time.time() < deadline, "neither trainer ended"
            time.sleep(0.2)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        out, err = loser.communicate()
        assert loser.returncode == 2, err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and err.strip().endswith(lines[0]) and "Traceback" not in err, err
        assert lines[0].startswith(f"error: run folder {run} is in use by training process {winner.pid} on "
                                   f"{host_name()} since "), err
        assert lines[0].endswith(f"stop it (touch {run / 'STOP'}) or wait"), err
        assert winner.poll() is None, "the refusal must not disturb the running trainer"
        # the winner works on: let it save a few steps, then end it with SIGTERM (save, export, release)
        while (json.loads((run / "latest.json").read_text())["step"] if (run / "latest.json").exists() else 0) < 2:
            assert winner.poll() is None and time.time() < deadline, winner.communicate()
            time.sleep(0.2)
        assert read_status(run)["state"] == "running" and read_status(run)["pid"] == winner.pid
        winner.send_signal(signal.SIGTERM)
        out, err = winner.communicate(timeout=WAIT)
        assert winner.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    st = read_status(run)
    assert st["state"] == "stopped" and "terminated" in st["message"] and st["reason"] == "terminated"
    assert not budget_reached(run)  # SIGTERM (a session's end) is not the run's budget: it is resumed
    latest = load_checkpoint(run / "latest")  # intact (sha checked)
    assert latest.step == st["step"] >= 2
    assert load_checkpoint(run / f"step_{latest.step:07d}").step == latest.step
    assert load_checkpoint(run / "model").step == latest.step
    assert not (run / "lock.json").exists()  # released on SIGTERM


def test_second_trainer_in_process_is_refused_and_touches_nothing(data, tmp_path):
    Trainer(cfg(), tmp_path, data, show_progress=False).run()
    first = Trainer(cfg(steps=3), tmp_path, data, show_progress=False)
    before = {p.name: file_sha256(p) for p in tmp_path.iterdir() if p.is_file()}
    lock = json.loads((tmp_path / "lock.json").read_text())
    assert lock["pid"] == os.getpid() and lock["host"] == host_name() and lock["pid_start"] == process_start(os.getpid())
    assert lock_holder(tmp_path)["pid"] == os.getpid()
    with pytest.raises(RunFolderBusy, match=f"in use by training process {os.getpid()} on "):
        Trainer(cfg(steps=3), tmp_path, data, show_progress=False)
    after = {p.name: file_sha256(p) for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # the refused trainer wrote nothing (status, log, lock, checkpoints)
    first.run()
    assert not (tmp_path / "lock.json").exists() and lock_holder(tmp_path) is None
    assert load_checkpoint(tmp_path / "latest").step == 3
    # released: the folder can be trained in again; a trainer that is never run releases on close(), and
    # one that is run again takes the folder again
    again = Trainer(cfg(steps=3), tmp_path, data, show_progress=False)
    again.close()
    assert not (tmp_path / "lock.json").exists()
    held = Trainer(cfg(steps=3), tmp_path, data, show_progress=False)
    with pytest.raises(RunFolderBusy):
        again.run()
    held.close()
    again.cfg.steps = 4
    again.run()
    assert not (tmp_path / "lock.json").exists() and load_checkpoint(tmp_path / "latest").step == 4


@pytest.mark.parametrize("who", ["dead", "recycled"])
def test_stale_lock_is_taken_over_and_said_in_the_log(data, tmp_path, who):
    if who == "dead":
        pid, keeper = dead_pid(), None
    else:  # a live PID that is not a python engine process (a recycled one)
        keeper = subprocess.Popen(["sleep", "60"])
        pid = keeper.pid
    try:
        (tmp_path / "lock.json").write_text(json.dumps({"pid": pid, "host": host_name(), "started": 1.0e9}))
        assert lock_holder(tmp_path) is None  # what the studio asks before launching: nobody
        write_status(tmp_path, {"state": "running", "step": 5, "total": 9})
        Trainer(cfg(), tmp_path, data, show_progress=False).run()
    finally:
        if keeper is not None:
            keeper.kill()
            keeper.wait()
    log = events(tmp_path)
    assert any(e.startswith(f"took over the lock of training process {pid} on {host_name()}") and
               "no longer running" in e for e in log), log
    assert any("previous training process" in e and "interrupted at step 5" in e for e in log), log
    assert read_status(tmp_path)["state"] == "finished"
    assert not (tmp_path / "lock.json").exists()


def test_lock_of_another_host_is_not_judged_stale(data, tmp_path):
    (tmp_path / "lock.json").write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere-42", "started": 1.0e9}))
    with pytest.raises(RunFolderBusy, match="on elsewhere-42 since .*delete .*lock.json"):
        Trainer(cfg(), tmp_path, data, show_progress=False)
    assert json.loads((tmp_path / "lock.json").read_text())["host"] == "elsewhere-42"


def test_read_status_says_interrupted_when_the_running_process_is_gone(tmp_path):
    write_status(tmp_path, {"state": "running", "step": 7, "total": 10})
    assert read_status(tmp_path)["state"] == "running"  # written by this (live) process
    st = json.loads((tmp_path / "status.json").read_text())
    for changed, state in [({"pid": dead_pid()}, "interrupted"), ({"pid_start": st["pid_start"] + 1}, "interrupted"),
                           ({"pid": dead_pid(), "host": "elsewhere-42"}, "running")]:
        (tmp_path / "status.json").write_text(json.dumps({**st, **changed}))
        got = read_status(tmp_path)
        assert got["state"] == state and got["step"] == 7
        if state == "interrupted":
            assert "interrupted at step 7" in got["message"] and "run again to resume" in got["message"]


# ----------------------------------------------------------------------------- resume compares


def test_resume_with_other_data_is_refused_unless_allowed(labeled_folder, other_folder, tmp_path, capsys):
    run = tmp_path / "R"
    assert main(train_args(labeled_folder, run, "--steps", "2")) == 0
    sha = file_sha256(run / "latest.safetensors")
    capsys.readouterr()
    assert main(train_args(other_folder, run, "--steps", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"error: {run} was trained with other settings: data {labeled_folder} -> {other_folder} "
                          f"(fingerprint "), err
    assert "--allow-changes" in err
    assert file_sha256(run / "latest.safetensors") == sha and load_checkpoint(run / "latest").step == 2
    st = read_status(run)
    assert st["state"] == "failed" and st["step"] == 2 and "other settings" in st["message"]
    assert not (run / "lock.json").exists()
    # explicitly allowed: goes on, and the log says what changed
    assert main(train_args(other_folder, run, "--steps", "3", "--allow-changes")) == 0
    assert load_checkpoint(run / "latest").step == 3 and read_status(run)["state"] == "finished"
    assert any(e.startswith("resumed with changes (allowed): data ") for e in events(run)), events(run)
    changed = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "with changes" in line]
    assert [r["step"] for r in changed] == [2]  # logged at the step the run resumed from
    # the run now goes on with the new data without the flag
    assert main(train_args(other_folder, run, "--steps", "4")) == 0


def test_resume_with_other_lr_is_refused_and_more_steps_are_allowed(labeled_folder, tmp_path, capsys):
    run = tmp_path / "R"
    assert main(train_args(labeled_folder, run, "--steps", "2", "--lr", "1e-3")) == 0
    capsys.readouterr()
    assert main(train_args(labeled_folder, run, "--steps", "3", "--lr", "2e-3", "--batch-size", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "lr 0.001 -> 0.002" in err and "batch_size 2 -> 3" in err, err
    assert load_checkpoint(run / "latest").step == 2
    # raising the steps (and changing the save / log cadence) extends the run; the same tiles under
    # another path are the same data
    copy = shutil.copytree(labeled_folder, tmp_path / "copy")
    assert main(train_args(copy, run, "--steps", "4", "--lr", "1e-3", "--log-every", "2")) == 0
    assert load_checkpoint(run / "latest").step == 4 and read_status(run)["state"] == "finished"


def test_image_run_may_not_go_back_to_stage_one(data, tmp_path):
    Trainer(cfg(kind="image", steps=1, finetune_steps=1), tmp_path, data, show_progress=False).run()
    with pytest.raises(TrainingError, match=r"steps 1 -> 5 \(stage-2 fine-tuning began at step 1"):
        Trainer(cfg(kind="image", steps=5, finetune_steps=1), tmp_path, data, show_progress=False)
    with pytest.raises(TrainingError, match="drop_rate 0.2 -> 0.5"):
        Trainer(cfg(kind="image", steps=1, finetune_steps=3, finetune_drop_rate=0.5), tmp_path, data,
                show_progress=False)
    t = Trainer(cfg(kind="image", steps=1, finetune_steps=2), tmp_path, data, show_progress=False)  # more stage 2
    assert t.run() and load_checkpoint(tmp_path / "latest").step == 3


# ----------------------------------------------------------------------------- parse-time ranges

BAD = [("structure", ["--save-every", "0"]), ("structure", ["--lr", "nan"]), ("structure", ["--lr", "inf"]),
       ("structure", ["--lr", "0"]), ("structure", ["--lr", "-1e-4"]), ("structure", ["--image-size", "0"]),
       ("structure", ["--image-size", "-32"]), ("structure", ["--batch-size", "0"]),
       ("structure", ["--ema-decay", "2"]), ("structure", ["--ema-decay", "1"]), ("structure", ["--keep-last", "-1"]),
       ("structure", ["--tile-stride", "0"]), ("structure", ["--fraction", "5"]), ("structure", ["--fraction", "0"]),
       ("structure", ["--fraction", "nan"]), ("structure", ["--steps", "0"]), ("structure", ["--steps", "-5"]),
       ("structure", ["--log-every", "0"]), ("structure", ["--time-limit", "0"]), ("structure", ["--grad-clip", "-1"]),
       ("image", ["--steps", "-1"]), ("image", ["--finetune-steps", "-1"]), ("image", ["--drop-rate", "1"]),
       ("image", ["--drop-rate", "-0.1"]), ("image", ["--finetune-lr", "nan"])]


@pytest.mark.parametrize("kind,bad", BAD, ids=[f"{k}{' '.join(b)}" for k, b in BAD])
def test_bad_train_argument_is_refused_while_parsing(labeled_folder, tmp_path, capsys, kind, bad):
    run = tmp_path / "R"
    args = [f"train-{kind}", "--data", str(labeled_folder), "--run-dir", str(run), "--preset", "test", *bad]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: ")
    assert f"error: argument {bad[0]}: " in err, err
    assert not run.exists()


def test_bad_train_argument_from_the_command_line(labeled_folder, tmp_path):
    run = tmp_path / "R"
    r = subprocess.run([sys.executable, "-m", "engine", *train_args(labeled_folder, run, "--steps", "3"),
                        "--batch-size", "0"], cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "argument --batch-size: must be at least 1, got 0" in r.stderr and "learning rate" not in r.stderr
    assert not run.exists()
    r = subprocess.run([sys.executable, "-m", "engine", "train-image", "--data", str(labeled_folder), "--run-dir",
                        str(run), "--steps", "0", "--finetune-steps", "0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=WAIT)
    assert r.returncode == 2 and r.stderr.strip() == "error: --steps and --finetune-steps are both 0: nothing to train"
    assert not run.exists()


def test_good_train_arguments_parse():
    p = build_parser()
    a = p.parse_args(["train-image", "--data", "d", "--run-dir", "r", "--fraction", "10%", "--steps", "0",
                      "--ema-decay", "0", "--drop-rate", "0", "--keep-last", "0", "--grad-clip", "0"])
    assert a.fraction == pytest.approx(0.1) and a.steps == 0 and a.finetune_steps == 500 and not a.allow_changes
    a = p.parse_args(["train-structure", "--data", "d", "--run-dir", "r", "--fraction", "1", "--allow-changes"])
    assert a.fraction == 1.0 and a.allow_changes
