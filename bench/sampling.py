"""Sampling cost and quality: U-Net evaluations per pair, wall time per pair, preset latency/size,
training throughput, and what the fast sampler keeps versus 1000-step DDPM.

    python bench/sampling.py                       # cost figures (a few minutes on 2 CPU cores)
    python bench/sampling.py --quality --n 8       # + fast sampler vs DDPM-1000 (slow: ~10 min at 64 px)
    python bench/sampling.py --quality-only --samplers ddim:20,dpm++:20,dpm++sde:20   # quality rows only
    python bench/sampling.py --training-only       # training steps/s, fp32 against bf16 autocast

Prints figures (ratios against the paper's recipe measured in the same run); no pass/fail.
Uses the demo checkpoints when present (engine.demo.default_checkpoints), else randomly initialised
`cpu`-preset networks for the timing figures (timing does not depend on the weights).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import pipeline  # noqa: E402
from engine.config import TrainConfig, preset  # noqa: E402
from engine.diffusion import guided_eps  # noqa: E402
from engine.samplers import sample  # noqa: E402
from engine.unet import UNet, count_parameters  # noqa: E402


class CountingModel(torch.nn.Module):
    """Wraps a U-Net and counts per-sample evaluations (batch rows through forward)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x, t, cond=None):
        self.rows += x.shape[0]
        return self.model(x, t, cond)


def nfe_per_pair(size: int = 32) -> None:
    """Count U-Net rows per synthetic pair for the paper's recipe and ours (test preset: counts only)."""
    s = CountingModel(UNet(preset("test", "structure", size)).eval())
    i = CountingModel(UNet(preset("test", "image", size)).eval())
    cond = torch.zeros(1, 3, size, size)
    rows = {}
    for name, sampler, steps in (("paper: DDPM 1000 + guided DDPM 1000", "ddpm", 1000),
                                 ("ours: DDIM 20 + guided DDIM 20 (batched)", "ddim", 20),
                                 ("ours: DPM-Solver++ 20 + guided 20 (batched)", "dpm++", 20)):
        s.rows = i.rows = 0
        sample(s, (1, 3, size, size), sampler=sampler, steps=steps)
        sample(i, (1, 3, size, size), sampler=sampler, steps=steps, cond=cond, w=2.0)
        rows[name] = (s.rows, i.rows, s.rows + i.rows)
    base = rows["paper: DDPM 1000 + guided DDPM 1000"][2]
    print("\n## U-Net evaluations per synthetic pair")
    for name, (a, b, total) in rows.items():
        print(f"{name:<46} structure {a:5d} + image {b:5d} = {total:5d}  ({base / total:.0f}x fewer than paper)")


def _time(fn, repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def presets(size_cpu: int = 128, paper_latency: bool = False) -> None:
    print("\n## Presets: parameters and forward latency (batch 1, this CPU)")
    for name in ("test", "cpu", "paper"):
        for kind in ("structure", "image"):
            cfg = preset(name, kind, size_cpu if name == "cpu" else None)
            m = UNet(cfg).eval()
            n = count_parameters(m)
            line = f"{name:<6} {kind:<9} {n / 1e6:8.2f} M params"
            if name != "paper" or paper_latency:
                x = torch.randn(1, 3, cfg.image_size, cfg.image_size)
                c = torch.zeros_like(x) if kind == "image" else None
                with torch.no_grad():
                    dt = _time(lambda: m(x, torch.tensor([500]), c), repeat=2)
                line += f"   {cfg.image_size}px forward {1000 * dt:7.1f} ms"
            print(line)


def pair_wall_time(smodel, imodel, size: int, steps: int = 20) -> None:
    import dataclasses

    from engine.precision import bf16_is_fast

    print(f"\n## Wall time per {size}x{size} pair (cpu preset, {torch.get_num_threads()} threads)")
    s = pipeline.sample_structures(smodel, 1, steps=steps, size=size)  # warm-up
    times = {}
    fp32 = dataclasses.replace(smodel, autocast=False), dataclasses.replace(imodel, autocast=False)
    rows = [("ddim", "fp32", fp32), ("dpm++", "fp32", fp32)]
    if bf16_is_fast(next(smodel.model.parameters()).device):  # the default where it is fast
        rows.append(("ddim", "bf16 autocast", (smodel, imodel)))
    for sampler, precision, (sm, im) in rows:
        t0 = time.perf_counter()
        s = pipeline.sample_structures(sm, 1, sampler=sampler, steps=steps, size=size)
        t1 = time.perf_counter()
        pipeline.synthesize(im, [s[0].structure], sampler=sampler, steps=steps, w=2.0)
        t2 = time.perf_counter()
        times[sampler, precision] = t2 - t0
        print(f"{sampler} {steps} steps, {precision}: structure {t1 - t0:.2f} s + image {t2 - t1:.2f} s = "
              f"{t2 - t0:.2f} s per pair")
    if ("ddim", "bf16 autocast") in times:
        print(f"bf16 autocast (the default here) against fp32: "
              f"{times['ddim', 'fp32'] / times['ddim', 'bf16 autocast']:.2f}x as fast")
    # the paper's recipe, extrapolated from the measured per-step cost of the same networks (fp32)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ts = _time(lambda: smodel.model(x, torch.tensor([500])), repeat=2)
        ti = _time(lambda: guided_eps(imodel.model, x, torch.tensor([500]), torch.zeros_like(x), 2.0), repeat=2)
    paper = 1000 * (ts + ti)
    print(f"paper recipe (1000 + 1000 guided steps), from measured step cost: {paper:.0f} s per pair "
          f"({paper / times['ddim', 'fp32']:.0f}x DDIM 20 in fp32)")


def condition_cache(imodel, size: int, steps: int = 20, repeat: int = 3) -> None:
    """Image sampling with the condition's SPADE modulation kept from the first step (the default) against
    recomputing it at every step (cache_bytes=0), on the same structure and seed: time and identity."""
    from engine.samplers import sample
    from engine.structure import instances_to_structure
    from engine.synthetic import make_tile

    print(f"\n## Condition maps kept between steps ({size}x{size} image, DDIM {steps}, w = 2, "
          f"{imodel.precision}, {torch.get_num_threads()} threads)")
    inst = make_tile(size, seed=3)[1]
    cond = torch.from_numpy(instances_to_structure(inst)).permute(2, 0, 1)[None]
    out, best = {}, {}
    for cache in (0, 1 << 30, 0, 1 << 30):  # interleaved, best of `repeat` each
        for _ in range(repeat):
            t0 = time.perf_counter()
            out[cache] = sample(imodel.model, (1, 3, size, size), steps=steps, seeds=[7], cond=cond, w=2.0,
                                diffusion=imodel.diffusion, autocast=imodel.autocast, cache_bytes=cache)
            best[cache] = min(best.get(cache, float("inf")), time.perf_counter() - t0)
    same = torch.equal(out[0], out[1 << 30])
    print(f"recomputed every step: {best[0]:.2f} s; kept: {best[1 << 30]:.2f} s; {best[0] / best[1 << 30]:.2f}x "
          f"as fast; samples {'identical' if same else 'DIFFERENT'}")


def memory_layout(smodel, imodel, size: int, steps: int = 20) -> None:
    """A pair with the networks' weights channels-last against contiguous (load_model's default): time, and
    how far the samples move (rounding of other kernels). Then back to contiguous."""
    print(f"\n## Weights channels-last against contiguous ({size}x{size} pair, DDIM {steps}, "
          f"{imodel.precision}, {torch.get_num_threads()} threads)")
    best, out = {}, {}
    for fmt in ("contiguous", "channels_last", "contiguous", "channels_last"):
        layout = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        for m in (smodel, imodel):
            m.model.to(memory_format=layout)
        t0 = time.perf_counter()
        s = pipeline.sample_structures(smodel, 1, steps=steps, size=size, seed=11)[0]
        img = pipeline.synthesize(imodel, [s.structure], steps=steps, w=2.0, seed=11)[0]
        best[fmt] = min(best.get(fmt, float("inf")), time.perf_counter() - t0)
        out[fmt] = s.structure, img
    for m in (smodel, imodel):
        m.model.to(memory_format=torch.contiguous_format)
    (sa, ia), (sb, ib) = out["contiguous"], out["channels_last"]
    print(f"contiguous: {best['contiguous']:.2f} s; channels-last: {best['channels_last']:.2f} s per pair; "
          f"{best['contiguous'] / best['channels_last']:.2f}x as fast; the layouts' foreground agrees on "
          f"{100 * ((sa[..., 0] > 0) == (sb[..., 0] > 0)).mean():.1f} % of pixels, the images differ by "
          f"{abs(ia.astype(int) - ib.astype(int)).mean():.2f} grey levels on average")


def _training_seconds(name: str, size: int, batch: int, kind: str, mp: str) -> float:
    """Seconds per training step (incl. the final checkpoint write), measured in a fresh process: the
    precision is accelerate's process-wide state, set once per process."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--time-training", f"{name},{size},{batch},{kind},{mp}"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _time_training(spec: str) -> None:
    import tempfile

    from engine.synthetic import make_tile
    from engine.train import Trainer, TrainingSet

    name, size, batch, kind, mp = spec.split(",")
    size, batch = int(size), int(batch)
    tiles = [make_tile(size, seed=i) for i in range(8)]
    data = TrainingSet.from_arrays([t[0] for t in tiles], [t[1] for t in tiles])
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(kind=kind, preset=name, image_size=size, steps=2, finetune_steps=0, batch_size=batch,
                          save_every=10 ** 9, preview_every=0, mixed_precision=mp)
        t = Trainer(cfg, d, data, show_progress=False)
        t.run()  # warm-up 2 steps
        t.cfg.steps = 8
        t0 = time.perf_counter()
        t.run()
        print((time.perf_counter() - t0) / 6)


def training_throughput() -> None:
    """Training s/step of each preset, fp32 against bf16 autocast (``--mixed-precision bf16``) on this
    machine; the speed-up is fp32's time over bf16's, both measured in the same run."""
    print("\n## Training throughput (this machine): fp32 against bf16 autocast")
    from engine.train import cpu_has_native_bf16

    print(f"CPU native bf16 (oneDNN): {cpu_has_native_bf16()}; "
          f"torch threads {torch.get_num_threads()}\n")
    print("| preset | kind | tile | batch | fp32 s/step | bf16 s/step | bf16 speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, size, batch in (("test", 32, 4), ("cpu", 64, 8), ("cpu", 128, 4)):
        for kind in ("structure", "image"):
            secs = {mp: _training_seconds(name, size, batch, kind, mp) for mp in ("no", "bf16")}
            print(f"| {name} | {kind} | {size} px | {batch} | {secs['no']:.3f} | {secs['bf16']:.3f} | "
                  f"{secs['no'] / secs['bf16']:.2f}x |", flush=True)


QUALITY_SAMPLERS = "ddim:20,dpm++:20,dpm++sde:20,ddim:50,ddpm:1000"


def quality(smodel, imodel, real_dir: Path | None, n: int, size: int, samplers: str = QUALITY_SAMPLERS) -> None:
    """Samplers (``name:steps`` list; default: the fast ones vs the paper's DDPM-1000) on the same seeds."""
    from engine import quality as q

    print(f"\n## Samplers on the same seeds ({n} pairs, {size}px): {samplers}")
    real = None
    if real_dir is not None and real_dir.is_dir():
        from engine.data import load_tiles

        tiles, _ = load_tiles(real_dir, size=size, stride=size)
        real = [t.inst for t in tiles]
    for sampler, steps in ((a, int(b)) for a, b in (item.split(":") for item in samplers.split(","))):
        t0 = time.perf_counter()
        st = pipeline.sample_structures(smodel, n, sampler=sampler, steps=steps, size=size, seed=100)
        imgs = pipeline.synthesize(imodel, [s.structure for s in st], sampler=sampler, steps=steps, seed=100)
        dt = time.perf_counter() - t0
        insts = [s.inst for s in st]
        align = q.alignment_score(imgs, insts)
        line = (f"{sampler:<8} {steps:4d} steps: {dt / n:6.1f} s/pair  nuclei/tile {np.mean([s.n_nuclei for s in st]):5.1f}"
                f"  hematoxylin Dice {align['hematoxylin_dice']:.3f}  darker fraction {align['darker_fraction']:.3f}")
        if real:
            dist = q.morphology_distance(real, insts)
            line += f"  morphology distance to real (mean normalised W1) {dist['mean_normalised']:.3f}"
        print(line)
    if real:
        from engine.data import load_tiles

        tiles, _ = load_tiles(real_dir, size=size, stride=size)
        align = q.alignment_score([t.image for t in tiles[:64]], [t.inst for t in tiles[:64]])
        print(f"real tiles (reference): nuclei/tile {np.mean([t.inst.max() for t in tiles]):.1f}  "
              f"hematoxylin Dice {align['hematoxylin_dice']:.3f}  darker fraction {align['darker_fraction']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=128, help="pair size for the wall-time figure")
    ap.add_argument("--quality", action="store_true", help="also compare samplers' quality (slow)")
    ap.add_argument("--quality-only", action="store_true", help="only the quality comparison (no cost figures)")
    ap.add_argument("--quality-size", type=int, default=64)
    ap.add_argument("--samplers", default=QUALITY_SAMPLERS, help="quality rows as sampler:steps,... (default: %(default)s)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--real", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg" / "train")
    ap.add_argument("--paper-latency", action="store_true", help="also time the 500M-parameter paper preset")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--cache-only", action="store_true", help="only the condition-maps and memory-layout rows")
    ap.add_argument("--training-only", action="store_true", help="only the training throughput rows")
    ap.add_argument("--time-training", metavar="PRESET,SIZE,BATCH,KIND,MP", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_training:
        _time_training(args.time_training)
        return

    from engine.demo import DEMO_IMAGE, DEMO_STRUCTURE

    if DEMO_STRUCTURE.exists() and DEMO_IMAGE.exists():
        smodel = pipeline.load_model(DEMO_STRUCTURE, "structure")
        imodel = pipeline.load_model(DEMO_IMAGE, "image")
        print(f"models: demo checkpoints (steps {smodel.step} / {imodel.step})")
    else:
        smodel = imodel = None
        print("models: demo checkpoints absent, timing randomly initialised cpu-preset networks")
    if args.training_only:
        training_throughput()
        return
    if args.cache_only:
        if imodel is None:
            sys.exit("--cache-only needs the demo checkpoints")
        condition_cache(imodel, args.size)
        memory_layout(smodel, imodel, args.size)
        return
    if args.quality_only:
        if smodel is None:
            sys.exit("--quality-only needs the demo checkpoints")
        quality(smodel, imodel, args.real, args.n, args.quality_size, args.samplers)
        return
    nfe_per_pair()
    presets(args.size, args.paper_latency)
    if smodel is None:
        import tempfile

        from engine.checkpoint import save_checkpoint
        from engine.config import DiffusionConfig

        d = Path(tempfile.mkdtemp())
        for kind in ("structure", "image"):
            cfg = preset("cpu", kind, args.size)
            save_checkpoint(d / kind, {f"model.{k}": v for k, v in UNet(cfg).state_dict().items()}, kind=kind,
                            model=cfg, diffusion=DiffusionConfig())
        smodel, imodel = pipeline.load_model(d / "structure"), pipeline.load_model(d / "image")
        quality_ok = False
    else:
        quality_ok = True
    pair_wall_time(smodel, imodel, args.size)
    condition_cache(imodel, args.size)
    memory_layout(smodel, imodel, args.size)
    if not args.skip_training:
        training_throughput()
    if args.quality and quality_ok:
        quality(smodel, imodel, args.real, args.n, args.quality_size, args.samplers)


if __name__ == "__main__":
    main()
