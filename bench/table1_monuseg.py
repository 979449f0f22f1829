"""The paper's Table 1 end to end on MoNuSeg: subsets, diffusion models per subset, synthetic pairs, segmenters.

For every fraction in --augment the paper's subset is written out (``python -m engine subset``), a structure
model and a two-stage image model are trained on that subset alone for a wall-clock budget, ``--pairs``
synthetic pairs are generated, and a segmenter is trained on subset + pairs; for every fraction in
--labeled a segmenter is trained on the subset alone. All segmenters share one setting and are tested on
the three held-out images of bench/evaluate_monuseg.py; the table is collected into WORK/evaluate.

Each step is a ``python -m engine`` command (logs in WORK/logs); independent steps run concurrently
(--parallel). Running again resumes: finished
steps are skipped, interrupted trainings resume.

    python bench/table1_monuseg.py --work ~/.cache/nudiff/table1 --augment 10 \\
        --augment 100=checkpoints/structure-demo.json,checkpoints/image-demo.json --labeled 10,100

Models and segmenters trained on MoNuSeg inherit its CC BY-NC-SA 4.0 licence.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.evaluate_monuseg import DATA, LICENCE, TEST_STEMS  # noqa: E402


@dataclass
class Job:
    """One command; starts when every job in ``after`` has succeeded (skipped if one failed)."""

    name: str
    cmd: list[str]
    after: list[str] = field(default_factory=list)
    done: Path | None = None  # the job is skipped when this file already exists
    priority: int = 0  # lower starts first among ready jobs
    state: str = "waiting"  # waiting | running | ok | failed | skipped | cached | interrupted
    proc: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="MoNuSeg folder (images/ + labels/)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "table1_monuseg")
    ap.add_argument("--augment", action="append", default=[], metavar="PCT[=STRUCTURE,IMAGE]",
                    help="fraction with an augmented arm; its diffusion models are trained on its subset, "
                         "or given as two model files (repeatable)")
    ap.add_argument("--labeled", default="10,100", help="fractions with a labeled arm (percent)")
    ap.add_argument("--pairs", type=int, default=None,
                    help="synthetic pairs per augmented fraction (default: the paper's 512, 1024 for 100%%)")
    ap.add_argument("--pair-size", type=int, default=256, help="synthetic tile size in px")
    ap.add_argument("--preset", default="cpu", choices=["test", "cpu", "paper"], help="diffusion model preset")
    ap.add_argument("--diffusion-size", type=int, default=128, help="diffusion training tile size in px")
    ap.add_argument("--diffusion-minutes", type=float, default=30.0,
                    help="wall clock for each structure model and for each image model (its two stages "
                         "share it 3:1)")
    ap.add_argument("--diffusion-batch", type=int, default=16)
    ap.add_argument("--diffusion-lr", type=float, default=2e-4)
    ap.add_argument("--sampler-steps", type=int, default=20, help="DDIM steps for structures and images")
    ap.add_argument("--w", type=float, default=2.0,
                    help="guidance scale of the synthetic images (paper: 2; docs/benchmarks.md §6k: 1 here)")
    ap.add_argument("--oversample", type=float, default=1.0,
                    help="layout realism filter of generate (1 = off; the paper has none)")
    ap.add_argument("--seg-steps", type=int, default=4000)
    ap.add_argument("--seg-size", type=int, default=256)
    ap.add_argument("--seg-batch", type=int, default=8)
    ap.add_argument("--seg-channels", type=int, default=32)
    ap.add_argument("--seg-depth", type=int, default=4)
    ap.add_argument("--seg-augment", choices=("light", "strong"), default="light",
                    help="segmenter training augmentation (evaluate --augment)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=None,
                    help="concurrent jobs (default: 4 with a GPU, 1 on CPU; 16 jobs on one H100 with 16 cores "
                         "starved each other, docs/benchmarks.md section 6)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the jobs")
    return ap


def _pct_list(text: str) -> list[str]:
    return [f"{float(v.strip().rstrip('%')):g}" for v in text.split(",") if v.strip()]


def prepare_split(data: Path, work: Path) -> tuple[Path, Path]:
    """WORK/real (training images) and WORK/test (held-out images) as folders of links to the data."""
    from engine.data import load_folder

    items = load_folder(data)[0]
    stems = {it.stem for it in items}
    missing = [s for s in TEST_STEMS if s not in stems]
    if missing:
        raise SystemExit(f"held-out images not found in {data}: {', '.join(missing)}")
    real, test = work / "real", work / "test"
    for it in items:
        dst = test if it.stem in TEST_STEMS else real
        for src, sub in ((it.image_path, "images"), (it.label_path, "labels")):
            link = dst / sub / src.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(src.resolve())
    return real, test


def plan(args: argparse.Namespace, real: Path, test: Path) -> list[Job]:
    py = [args.python, "-m", "engine"]
    w = args.work
    ev = w / "evaluate"
    seg = ["--real", str(real), "--test", str(test), "--out", str(ev), "--steps", str(args.seg_steps),
           "--size", str(args.seg_size), "--batch-size", str(args.seg_batch), "--channels", str(args.seg_channels),
           "--depth", str(args.seg_depth), "--seed", str(args.seed), "--augment", args.seg_augment]
    jobs: list[Job] = []
    for spec in args.augment:
        pct, _, models = spec.partition("=")
        pct = _pct_list(pct)[0]
        n = args.pairs or (1024 if float(pct) >= 100 else 512)
        if models:
            smodel, imodel = (str(Path(p).resolve()) for p in models.split(","))
            gen_after: list[str] = []
        else:
            sub = w / f"subset_{pct}"
            jobs.append(Job(f"subset {pct}%", py + ["subset", str(real), "--fraction", pct, "--out", str(sub),
                                                    "--seed", str(args.seed)], done=sub / "manifest.csv"))
            common = ["--data", str(sub), "--preset", args.preset, "--image-size", str(args.diffusion_size),
                      "--tile-stride", str(args.diffusion_size // 2), "--batch-size", str(args.diffusion_batch),
                      "--sample-size", str(args.pair_size), "--save-every", "250", "--preview-every", "0",
                      "--seed", str(args.seed), "--quiet"]
            srun, i1, i2 = w / f"structure_{pct}", w / f"image_{pct}_stage1", w / f"image_{pct}_stage2"
            minutes = args.diffusion_minutes
            jobs.append(Job(f"structure {pct}%", py + ["train-structure", "--run-dir", str(srun), "--steps", "1000000",
                                                       "--lr", str(args.diffusion_lr), "--time-limit", f"{minutes:g}",
                                                       *common], [f"subset {pct}%"], srun / "model.json", -2))
            jobs.append(Job(f"image {pct}% stage 1", py + [
                "train-image", "--run-dir", str(i1), "--steps", "1000000", "--finetune-steps", "0",
                "--lr", str(args.diffusion_lr), "--time-limit", f"{minutes * 0.75:g}", *common],
                [f"subset {pct}%"], i1 / "model.json", -2))
            jobs.append(Job(f"image {pct}% stage 2", py + [
                "train-image", "--run-dir", str(i2), "--init-from", str(i1 / "model.json"), "--steps", "0",
                "--finetune-steps", "1000000", "--drop-rate", "0.2", "--finetune-lr", "2e-5",
                "--time-limit", f"{minutes * 0.25:g}", *common], [f"image {pct}% stage 1"], i2 / "model.json", -2))
            smodel, imodel = str(srun / "model.json"), str(i2 / "model.json")
            gen_after = [f"structure {pct}%", f"image {pct}% stage 2"]
        synth = w / f"synthetic_{pct}"
        jobs.append(Job(f"generate {pct}%", py + [
            "generate", "--structure-checkpoint", smodel, "--image-checkpoint", imodel, "--n", str(n),
            "--size", str(args.pair_size), "--steps", str(args.sampler_steps), "--batch-size", "32",
            "--oversample", f"{args.oversample:g}", "--w", f"{args.w:g}",
            "--seed", str(args.seed), "--out", str(synth)], gen_after, synth / "manifest.csv", -1))
        jobs.append(Job(f"segmenter {pct}% augmented", py + [
            "evaluate", *seg, "--fractions", pct, "--arms", "augmented", "--synthetic", f"{pct}={synth}"],
            [f"generate {pct}%"]))
    for pct in _pct_list(args.labeled):
        jobs.append(Job(f"segmenter {pct}% labeled", py + ["evaluate", *seg, "--fractions", pct,
                                                          "--arms", "labeled"], priority=1))
    return jobs


def run_jobs(jobs: list[Job], parallel: int, logs: Path, threads: int) -> None:
    """Run the jobs, at most ``parallel`` at a time, dependencies first; prints one line per event.

    On Ctrl-C (or ``timeout -s INT``) the running jobs get SIGINT, so trainings save and export their
    models, and are given 60 s to exit; their state becomes "interrupted"."""
    try:
        _run_jobs(jobs, parallel, logs, threads)
    except KeyboardInterrupt:
        running = [j for j in jobs if j.state == "running"]
        print(f"interrupted: stopping {', '.join(j.name for j in running) or 'nothing'}", flush=True)
        for j in running:
            j.proc.send_signal(signal.SIGINT)
        deadline = time.time() + 60
        for j in running:
            try:
                j.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                j.proc.kill()
            j.seconds, j.state = time.time() - j.started, "interrupted"


def _run_jobs(jobs: list[Job], parallel: int, logs: Path, threads: int) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    by_name = {j.name: j for j in jobs}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f} s] {msg}", flush=True)

    while True:
        for j in jobs:
            if j.state == "waiting" and any(by_name[a].state in ("failed", "skipped", "interrupted")
                                            for a in j.after):
                j.state = "skipped"
                say(f"skip  {j.name} (a step it needs failed)")
        running = [j for j in jobs if j.state == "running"]
        for j in running:
            rc = j.proc.poll()
            if rc is not None:
                j.seconds = time.time() - j.started
                j.state = "ok" if rc == 0 else "failed"
                say(f"{'done ' if rc == 0 else 'FAIL '} {j.name} ({j.seconds:.0f} s)"
                    + ("" if rc == 0 else f", exit {rc}: see {logs / _slug(j.name)}.log"))
        ready = sorted((j for j in jobs if j.state == "waiting"
                        and all(by_name[a].state in ("ok", "cached") for a in j.after)), key=lambda j: j.priority)
        for j in ready:
            if j.done is not None and j.done.exists():
                j.state = "cached"
                say(f"have  {j.name} ({j.done})")
                continue
            if sum(1 for x in jobs if x.state == "running") >= parallel:
                break
            log = open(logs / f"{_slug(j.name)}.log", "a")
            log.write(f"$ {' '.join(j.cmd)}\n")
            log.flush()
            j.proc = subprocess.Popen(j.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            j.started, j.state = time.time(), "running"
            say(f"start {j.name}")
        if all(j.state in ("ok", "failed", "skipped", "cached") for j in jobs):
            return
        time.sleep(1.0)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.data / "images").is_dir():
        print(f"skipped: MoNuSeg data not found at {args.data}")
        return 0
    import torch

    from engine.errors import NuDiffError
    from engine.evaluate import collect_results

    gpu = torch.cuda.is_available()
    parallel = args.parallel or (4 if gpu else 1)
    threads = max(1, (os.cpu_count() or 2) // parallel)
    args.work.mkdir(parents=True, exist_ok=True)
    real, test = prepare_split(args.data, args.work)
    (args.work / "evaluate").mkdir(exist_ok=True)
    (args.work / "evaluate" / "LICENCE-DATA.txt").write_text(LICENCE)
    jobs = plan(args, real, test)
    print(f"{len(jobs)} jobs, {parallel} at a time, {threads} CPU threads each, "
          f"{'GPU: ' + torch.cuda.get_device_name(0) if gpu else 'CPU only'}; held out: {', '.join(TEST_STEMS)}")
    t0 = time.time()
    run_jobs(jobs, parallel, args.work / "logs", threads)
    summary = {j.name: {"state": j.state, "seconds": round(j.seconds, 1)} for j in jobs}
    (args.work / "jobs.json").write_text(json.dumps(summary, indent=2))
    failed = [j.name for j in jobs if j.state in ("failed", "skipped", "interrupted", "waiting")]
    try:
        result = collect_results(args.work / "evaluate")
    except NuDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.files["md"].read_text())
    print(f"done in {time.time() - t0:.0f} s" + (f"; not finished: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
