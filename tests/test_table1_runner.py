"""bench/table1_monuseg.py: the job graph it plans, the runner's ordering, skipping, caching and Ctrl-C, and
the whole experiment on tiny procedural data with a split, a separate test folder and recorded models."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.table1_monuseg import (Job, build_parser, choose_models, main, plan, read_recorded_models,  # noqa: E402
                                  run_jobs)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_plan_trains_diffusion_models_on_each_subset_and_reuses_given_models(tmp_path):
    args = build_parser().parse_args(["--work", str(tmp_path), "--augment", "10", "--augment", "100=s.json,i.json",
                                      "--labeled", "10,100", "--diffusion-minutes", "8"])
    jobs = {j.name: j for j in plan(args, tmp_path / "real", tmp_path / "test")}
    assert set(jobs) == {"subset 10%", "structure 10%", "image 10% stage 1", "image 10% stage 2", "generate 10%",
                         "segmenter 10% augmented", "generate 100%", "segmenter 100% augmented",
                         "segmenter 10% labeled", "segmenter 100% labeled"}
    # the 10 % models learn from the 10 % subset only; their budget splits 8 min and 6 + 2 min
    for name in ("structure 10%", "image 10% stage 1"):
        cmd = jobs[name].cmd
        assert jobs[name].after == ["subset 10%"] and cmd[cmd.index("--data") + 1] == str(tmp_path / "subset_10")
    assert jobs["structure 10%"].cmd[jobs["structure 10%"].cmd.index("--time-limit") + 1] == "8"
    stage2 = jobs["image 10% stage 2"].cmd
    assert stage2[stage2.index("--time-limit") + 1] == "2" and "--init-from" in stage2
    assert stage2[stage2.index("--drop-rate") + 1] == "0.2"
    assert jobs["generate 10%"].after == ["structure 10%", "image 10% stage 2"]
    assert jobs["generate 100%"].after == [] and str(Path("s.json").resolve()) in jobs["generate 100%"].cmd
    assert "512" in jobs["generate 10%"].cmd and "1024" in jobs["generate 100%"].cmd  # the paper's counts
    gen = jobs["generate 10%"].cmd
    assert gen[gen.index("--oversample") + 1] == "1"  # the paper's protocol: no realism filter by default
    assert gen[gen.index("--w") + 1] == "2"  # and its guidance scale
    args = build_parser().parse_args(["--work", str(tmp_path), "--augment", "10", "--oversample", "3", "--w", "1"])
    gen = {j.name: j for j in plan(args, tmp_path / "real", tmp_path / "test")}["generate 10%"].cmd
    assert gen[gen.index("--oversample") + 1] == "3" and gen[gen.index("--w") + 1] == "1"
    # every segmenter shares one setting, so the arms are comparable
    seg = [j.cmd[j.cmd.index("--out"):j.cmd.index("--fractions")] for j in jobs.values() if "segmenter" in j.name]
    assert len(seg) == 4 and all(s == seg[0] for s in seg)
    assert seg[0][seg[0].index("--augment") + 1] == "light"
    args = build_parser().parse_args(["--work", str(tmp_path), "--labeled", "10", "--seg-augment", "strong"])
    cmd = {j.name: j for j in plan(args, tmp_path / "real", tmp_path / "test")}["segmenter 10% labeled"].cmd
    assert cmd[cmd.index("--augment") + 1] == "strong"


def test_runner_orders_skips_and_caches(tmp_path):
    log = tmp_path / "order.txt"
    done = tmp_path / "already.txt"
    done.write_text("x")

    def step(name: str, code: str = "") -> list[str]:
        return py(f"{code}\nopen({str(log)!r}, 'a').write({name!r} + '\\n')")

    jobs = [Job("a", step("a")),
            Job("b", step("b"), after=["a"]),
            Job("fails", py("raise SystemExit(3)"), after=["a"]),
            Job("after fail", step("after fail"), after=["fails"]),
            Job("cached", step("cached"), done=done),
            Job("c", step("c"), after=["b", "cached"])]
    run_jobs(jobs, parallel=2, logs=tmp_path / "logs", threads=1)
    state = {j.name: j.state for j in jobs}
    assert state == {"a": "ok", "b": "ok", "fails": "failed", "after fail": "skipped", "cached": "cached", "c": "ok"}
    order = log.read_text().split()
    assert order.index("a") < order.index("b") < order.index("c") and "cached" not in order
    assert (tmp_path / "logs" / "fails.log").read_text().startswith("$ ")


def test_ctrl_c_stops_running_jobs_and_marks_them_interrupted(tmp_path):
    jobs = [Job("sleeper", py("import time; time.sleep(60)")), Job("next", py("pass"), after=["sleeper"])]

    def interrupt() -> None:
        while jobs[0].state != "running":
            time.sleep(0.05)
        time.sleep(0.5)
        signal.raise_signal(signal.SIGINT)  # as `timeout -s INT` or Ctrl-C would

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT is delivered to the main thread")
    # the process may hold another SIGINT disposition (ignored in a shell's background job, or a handler left by
    # earlier code; which one made this fail once in CI is not known): test Ctrl-C as a terminal delivers it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        t = threading.Thread(target=interrupt)
        t.start()
        run_jobs(jobs, parallel=1, logs=tmp_path / "logs", threads=1)
        t.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert jobs[0].state == "interrupted" and jobs[1].state == "waiting"
    assert jobs[0].proc.returncode not in (None, 0)  # stopped by the signal, not run to its end
    assert "KeyboardInterrupt" in (tmp_path / "logs" / "sleeper.log").read_text()


TINY_RUN = ["--augment", "100", "--labeled", "100", "--preset", "test", "--diffusion-size", "32",
            "--diffusion-steps", "2", "--diffusion-batch", "2", "--diffusion-minutes", "5", "--pairs", "2",
            "--pair-size", "32", "--sampler-steps", "2", "--seg-steps", "2", "--seg-size", "32", "--seg-batch", "2",
            "--seg-channels", "8", "--seg-depth", "2", "--parallel", "2"]


def _tiny_data(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(training folder of 5 tiles, split file: 3 train, 1 validation, 1 test, separate test folder of 2)."""
    from engine.synthetic import write_folder

    train = write_folder(tmp_path / "train", n_images=5, size=64, seed=0)
    other = write_folder(tmp_path / "other", n_images=2, size=64, seed=50)
    for f in sorted(other.glob("*/synth_*")):  # a test set of its own, with its own image names
        f.rename(f.with_name(f.name.replace("synth_", "other_")))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["synth_000", "synth_001", "synth_002"], "validation": ["synth_003"],
                                 "test": ["synth_004"]}))
    return train, split, other


def test_experiment_on_another_test_set_records_its_models_and_reuses_them(tmp_path, capsys):
    from engine.fileio import file_sha256

    train, split, other = _tiny_data(tmp_path)
    work = tmp_path / "work"
    argv = ["--train", str(train), "--split", str(split), "--test", str(other), "--work", str(work), *TINY_RUN]
    rc = main(argv)
    first = capsys.readouterr().out
    assert rc == 0, first + "".join(p.read_text() for p in (work / "logs").glob("*.log"))
    record = json.loads((work / "evaluate" / "results.json").read_text())
    # roles: trained on the split's train images, scored on the separate test folder, validation kept apart
    assert record["test_images"] == ["other_000", "other_001"]
    assert record["split"]["train"] == ["synth_000", "synth_001", "synth_002"]
    assert record["split"]["validation"] == ["synth_003"] and record["split"]["test"] == ["other_000", "other_001"]
    assert sorted(p.stem for p in (work / "real" / "images").iterdir()) == record["split"]["train"]
    assert [p.stem for p in (work / "validation" / "images").iterdir()] == ["synth_003"]
    assert sorted(p.stem for p in (work / "test" / "images").iterdir()) == ["other_000", "other_001"]
    assert {r["training_data"] for r in record["rows"]} == {"100% labeled", "100% augmented"}
    # the diffusion models of the subset: files and sha256 named in results.json
    models = record["diffusion_models"]["100"]
    assert models["source"] == "trained" and models["seed"] == 0 and models["fraction"] == 1.0
    files = {}
    for kind, folder in (("structure", "structure_100"), ("image", "image_100_stage2")):
        assert sorted(models[kind]) == ["model.json", "model.safetensors"]
        for name, f in models[kind].items():
            assert f["path"] == f"{folder}/{name}"
            assert f["sha256"] == file_sha256(work / f["path"])
            files[work / f["path"]] = (work / f["path"]).stat().st_mtime_ns
    jobs = json.loads((work / "jobs.json").read_text())
    assert jobs["structure 100%"]["state"] == "ok" and jobs["image 100% stage 2"]["state"] == "ok"

    # again (--reuse-models is the default): the recorded models are verified and reused, nothing retrained
    rc = main(argv)
    second = capsys.readouterr().out
    assert rc == 0, second
    assert "models 100%: reuse (files present with the recorded sha256)" in second
    jobs = json.loads((work / "jobs.json").read_text())
    assert jobs["models 100%"]["state"] == "reused"
    assert not any(name.startswith(("subset", "structure", "image")) for name in jobs)
    assert {path: path.stat().st_mtime_ns for path in files} == files
    again = json.loads((work / "evaluate" / "results.json").read_text())["diffusion_models"]["100"]
    assert again["source"] == "reused" and again["structure"] == models["structure"]
    assert again["image"] == models["image"]
    assert not (work / "replaced").exists()

    # when the recorded hashes do not match (or with --no-reuse-models) the models would be retrained, their old
    # outputs set aside first
    recorded = read_recorded_models(work / "evaluate" / "results.json")
    args = build_parser().parse_args([*argv, "--reuse-models"])
    train_sha256 = recorded["100"]["train_data_sha256"]
    tampered = json.loads(json.dumps(recorded))
    tampered["100"]["image"]["model.safetensors"]["sha256"] = "0" * 64
    choice, = choose_models(args, tampered, train_sha256)
    assert choice.action == "train" and "does not have the sha256 results.json records" in choice.reason
    assert work / "structure_100" in choice.set_aside and work / "synthetic_100" in choice.set_aside
    assert work / "evaluate" / "runs" / "100pct_augmented_r0" in choice.set_aside
    choice, = choose_models(args, recorded, "another training set")
    assert choice.action == "train" and "training images differ" in choice.reason
    choice, = choose_models(build_parser().parse_args([*argv, "--no-reuse-models"]), recorded, train_sha256)
    assert choice.action == "train" and "--no-reuse-models retrains" in choice.reason
    choice, = choose_models(build_parser().parse_args(argv), recorded, train_sha256)  # reuse is the default
    assert choice.action == "reuse"
    choice, = choose_models(args, recorded, train_sha256)
    assert choice.action == "reuse" and choice.set_aside == []


def test_split_roles_are_checked(tmp_path, capsys):
    from bench.table1_monuseg import assign_roles, read_split

    train, split, other = _tiny_data(tmp_path)
    roles = assign_roles(train, read_split(split))
    assert [it.stem for it in roles.test] == ["synth_004"] and roles.unused == []
    roles = assign_roles(train, read_split(split), other)
    assert [it.stem for it in roles.test] == ["other_000", "other_001"] and roles.unused == ["synth_004"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": ["synth_000", "synth_001"], "validation": ["synth_001"], "test": []}))
    with pytest.raises(SystemExit, match="synth_001 is both a train and a validation image"):
        assign_roles(train, read_split(bad), other)
    with pytest.raises(SystemExit, match="test images"):
        assign_roles(train, read_split(bad))
    bad.write_text(json.dumps({"train": ["nope"]}))
    with pytest.raises(SystemExit, match="not found"):
        assign_roles(train, read_split(bad), other)
    with pytest.raises(SystemExit, match="train"):
        bad.write_text(json.dumps({"validation": []}))
        read_split(bad)
    # the same stem in the training folder and the separate test folder is refused (a leak or a name clash)
    with pytest.raises(SystemExit, match="synth_000 is both a train and a test image"):
        assign_roles(train, read_split(split), train)
