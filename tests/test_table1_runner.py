"""bench/table1_monuseg.py: the job graph it plans, and the runner's ordering, skipping, caching and Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.table1_monuseg import Job, build_parser, plan, run_jobs  # noqa: E402


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
