"""Downstream benchmark runner on tiny procedural folders: table, plot, saved predictions, resume, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main
from engine.data import load_folder, read_label
from engine.errors import DataError, NuDiffError
from engine.evaluate import (CSV_FIELDS, METRICS, ExperimentConfig, ExperimentResult, image_metrics,
                             parse_fractions, resolve_synthetic, run_experiment)
from engine.segment import SegmenterConfig
from engine.synthetic import write_folder

TINY = SegmenterConfig(base_channels=8, depth=2, groups=4, tile=48, overlap=8)
FAST = dict(steps=4, size=32, batch_size=2, tile_size=64, stride=64, device="cpu", segmenter=TINY)


def fast(**settings) -> ExperimentConfig:
    """The tests' small, quick experiment settings, with some changed."""
    return ExperimentConfig(**{**FAST, **settings})


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_torch_thread) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    return {"real": write_folder(root / "real", n_images=4, size=64, seed=0),
            "synth": write_folder(root / "synth", n_images=3, size=64, seed=40),
            "test": write_folder(root / "test", n_images=2, size=70, seed=80)}


@pytest.fixture(scope="module")
def experiment(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "out"
    lines: list[str] = []
    result = run_experiment(folders["real"], folders["synth"], folders["test"], out, fast(fractions="50,100"),
                            log=lines.append)
    return result, lines


def test_runner_writes_a_well_formed_table(experiment):
    result, lines = experiment
    out = result.out_dir
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == CSV_FIELDS
    assert [r["training_data"] for r in rows] == ["50% labeled", "50% augmented", "100% labeled", "100% augmented"]
    for r in rows:
        for m in METRICS:
            assert 0.0 <= float(r[m]) <= 1.0 and float(r[f"{m}_std"]) == 0.0
        assert int(r["n_synthetic"]) == (3 if r["arm"] == "augmented" else 0)
    assert int(rows[2]["n_real_tiles"]) == 4 and int(rows[0]["n_real_tiles"]) < 4
    md = (out / "results.md").read_text()
    for name in ("50% labeled", "50% augmented", "100% labeled", "100% augmented"):
        assert sum(line.startswith(f"| {name} |") for line in md.splitlines()) == 1
    assert "| Training data | Dice | AJI | AJI+ | PQ |" in md and "Gain of augmentation" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "results.json").read_text())
    assert len(record["runs"]) == 4 and record["test_images"] == ["synth_000", "synth_001"]
    assert any("training on" in line for line in lines)


def test_reported_metrics_match_metrics_recomputed_on_saved_predictions(experiment, folders):
    result, _ = experiment
    tests = {item.stem: item.inst for item in load_folder(folders["test"])[0]}
    for run in result.runs:
        run_dir = result.out_dir / "runs" / run["name"]
        assert (run_dir / "segmenter.json").is_file() and (run_dir / "segmenter.safetensors").is_file()
        recomputed = {}
        for stem, true in tests.items():
            pred = read_label(run_dir / "predictions" / f"{stem}.tif")
            assert pred.shape == true.shape == (70, 70)
            recomputed[stem] = image_metrics(true, pred)
            for m, v in recomputed[stem].items():
                assert run["per_image"][stem][m] == pytest.approx(v, abs=1e-9)
        row = next(r for r in result.rows if r["fraction"] == run["fraction"] and r["arm"] == run["arm"])
        for m in METRICS:
            assert row[m] == pytest.approx(np.mean([v[m] for v in recomputed.values()]), abs=1e-9)


def test_finished_runs_are_reused(experiment, folders):
    result, _ = experiment
    lines: list[str] = []
    again = run_experiment(folders["real"], folders["synth"], folders["test"], result.out_dir,
                           fast(fractions="50,100"), log=lines.append)
    assert sum("reusing finished run" in line for line in lines) == 4
    assert again.rows == result.rows


def _rerun(experiment, folders, out: Path, **settings) -> tuple[ExperimentResult, list[str], list[str]]:
    """Copy the module experiment's finished runs into ``out`` and run again with other ``settings``:
    (result, names of the runs it reused, names of the runs it trained)."""
    import shutil

    shutil.copytree(experiment[0].out_dir / "runs", out / "runs")
    lines: list[str] = []
    result = run_experiment(folders["real"], folders["synth"], folders["test"], out, fast(**settings),
                            log=lines.append)

    def names(what: str) -> list[str]:
        return sorted(line.split(":")[0] for line in lines if what in line)

    return result, names("reusing finished run"), names("training on")


def test_a_new_synthetic_share_retrains_only_the_augmented_arms(experiment, folders, tmp_path):
    import shutil

    result, _ = experiment
    out = tmp_path / "share"
    shared, reused, trained = _rerun(experiment, folders, out, fractions="50,100", synthetic_share=0.5)
    assert reused == ["100pct_labeled_r0", "50pct_labeled_r0"]
    assert trained == ["100pct_augmented_r0", "50pct_augmented_r0"]
    labeled = [r for r in shared.rows if r["arm"] == "labeled"]
    assert labeled == [r for r in result.rows if r["arm"] == "labeled"]
    # the folder holds labeled runs made without a share and augmented runs with one: one experiment
    from engine.evaluate import collect_results

    collected = collect_results(out, log=None)
    assert collected.rows == shared.rows
    assert json.loads((out / "results.json").read_text())["settings"]["synthetic_share"] == 0.5
    # but augmented runs of two different shares are not one experiment
    shutil.copytree(result.out_dir / "runs" / "50pct_augmented_r0", out / "runs" / "50pct_augmented_r1")
    with pytest.raises(DataError, match="different settings"):
        collect_results(out, log=None)


def test_pairs_regenerated_under_the_same_names_retrain_the_augmented_arms(experiment, folders, tmp_path):
    """Pairs made again (another w or model) keep their file names and labels: only their pixels differ.
    Runs trained on the old pairs must not be reused for them; the labeled runs still are."""
    import shutil

    from PIL import Image

    from engine.data import read_image

    regenerated = tmp_path / "regenerated"
    shutil.copytree(folders["synth"], regenerated)
    for path in sorted((regenerated / "images").iterdir()):
        Image.fromarray(255 - read_image(path)).save(path)
    out = tmp_path / "regen"
    shutil.copytree(experiment[0].out_dir / "runs", out / "runs")
    lines: list[str] = []
    run_experiment(folders["real"], regenerated, folders["test"], out, fast(fractions="50,100"),
                      log=lines.append)
    reused = sorted(line.split(":")[0] for line in lines if "reusing finished run" in line)
    trained = sorted(line.split(":")[0] for line in lines if "training on" in line)
    assert reused == ["100pct_labeled_r0", "50pct_labeled_r0"]
    assert trained == ["100pct_augmented_r0", "50pct_augmented_r0"]


def test_pairs_per_repeat_gives_each_repeat_its_own_disjoint_pairs(experiment, folders, tmp_path, capsys):
    import shutil

    from engine.evaluate import collect_results

    result, _ = experiment
    out = tmp_path / "draws"
    drawn, reused, _ = _rerun(experiment, folders, out, fractions="100", repeats=2, pairs_per_repeat=1)
    assert reused == ["100pct_labeled_r0"]
    aug = {r["repeat"]: r for r in drawn.runs if r["arm"] == "augmented"}
    assert [aug[0]["n_synthetic"], aug[1]["n_synthetic"]] == [1, 1]
    assert [aug[0]["synthetic_block"], aug[1]["synthetic_block"]] == [[0, 1], [1, 2]]
    assert aug[0]["key"] != aug[1]["key"]
    # repeat 0 on block [0, 1) with seed 0 is a different run from repeat 0 on all 3 pairs (the experiment's)
    assert aug[0]["mean"] != next(r for r in result.runs if r["name"] == "100pct_augmented_r0")["mean"]
    assert next(r for r in drawn.rows if r["arm"] == "augmented")["n_synthetic"] == 1
    # labeled runs (no blocks) and augmented runs (blocks) of one call collect into the same table
    shutil.rmtree(out / "runs" / "50pct_labeled_r0")
    shutil.rmtree(out / "runs" / "50pct_augmented_r0")
    assert json.loads((out / "results.json").read_text())["settings"]["pairs_per_repeat"] == 1
    assert collect_results(out, log=None).rows == drawn.rows
    assert json.loads((out / "results.json").read_text())["settings"]["pairs_per_repeat"] == 1
    # one repeat alone (bench/table1_monuseg.py runs an arm's repeats as separate processes): the same run as
    # in the call that ran both, and it needs only the pairs up to its own block
    alone = run_experiment(folders["real"], folders["synth"], folders["test"], tmp_path / "alone",
                           fast(fractions="100", repeats=2, pairs_per_repeat=1, only_repeat=1), log=None)
    assert sorted(r["name"] for r in alone.runs) == ["100pct_augmented_r1", "100pct_labeled_r1"]
    one = next(r for r in alone.runs if r["arm"] == "augmented")
    assert (one["key"], one["mean"], one["synthetic_block"]) == (aug[1]["key"], aug[1]["mean"], [1, 2])
    run_experiment(folders["real"], folders["synth"], folders["test"], tmp_path / "alone",
                   fast(fractions="100", arms="augmented", repeats=9, pairs_per_repeat=1, only_repeat=2), log=None)
    with pytest.raises(NuDiffError, match="3 synthetic pairs; 4 repeats of 1 disjoint pairs need 4"):
        run_experiment(folders["real"], folders["synth"], folders["test"], tmp_path / "alone",
                       fast(fractions="100", repeats=9, pairs_per_repeat=1, only_repeat=3), log=None)
    # too few pairs for the blocks: a clear error before anything trains, from the API and the CLI
    with pytest.raises(NuDiffError, match="3 synthetic pairs; 2 repeats of 2 disjoint pairs need 4"):
        run_experiment(folders["real"], folders["synth"], folders["test"], tmp_path / "short",
                       fast(fractions="100", repeats=2, pairs_per_repeat=2), log=None)
    assert not (tmp_path / "short" / "runs").exists()
    rc = main(["evaluate", "--real", str(folders["real"]), "--synthetic", str(folders["synth"]), "--test",
               str(folders["test"]), "--fractions", "100", "--out", str(tmp_path / "short_cli"), "--repeats", "2",
               "--pairs-per-repeat", "2", "--steps", "2", "--size", "32", "--device", "cpu"])
    assert rc != 0 and "need 4" in capsys.readouterr().err
    assert not (tmp_path / "short_cli" / "runs").exists()


def test_strong_augmentation_is_a_separate_experiment(experiment, folders, tmp_path):
    from engine.evaluate import collect_results

    result, _ = experiment
    out = tmp_path / "strong"
    strong, _, trained = _rerun(experiment, folders, out, fractions="100", augment="strong")
    # both arms retrain (the setting changes what every segmenter sees), and say how they were trained
    assert trained == ["100pct_augmented_r0", "100pct_labeled_r0"]
    assert all(r["settings"]["augment"] == "strong" for r in strong.runs)
    record = json.loads((out / "runs" / "100pct_labeled_r0" / "segmenter.json").read_text())
    assert record["train"]["augment"] == "strong"
    assert json.loads((out / "results.json").read_text())["settings"]["augment"] == "strong"
    light = {r["name"]: r for r in result.runs}
    assert all(r["mean"] != light[r["name"]]["mean"] for r in strong.runs)
    # runs made with the default keep the keys they had before the setting existed, so stay reusable
    assert all("augment" not in r["settings"] for r in result.runs)
    # light and strong runs in one folder are not one experiment
    with pytest.raises(DataError, match="different settings"):
        collect_results(out, log=None)
    with pytest.raises(NuDiffError, match="augment must be one of"):
        fast(fractions="100", augment="heavy")
    with pytest.raises(SystemExit):
        main(["evaluate", "--real", str(folders["real"]), "--test", str(folders["test"]), "--out",
              str(tmp_path / "bad_cli"), "--augment", "heavy"])


def test_synthetic_specs_and_fractions(tmp_path):
    assert parse_fractions("10,20,50,100") == [0.1, 0.2, 0.5, 1.0]
    assert parse_fractions([0.5, 10, "20%"]) == [0.1, 0.2, 0.5]
    with pytest.raises(NuDiffError):
        parse_fractions("0,150")
    for pct in ("10", "20"):
        (tmp_path / f"synth_{pct}").mkdir()
    fr = [0.1, 0.2]
    assert resolve_synthetic(str(tmp_path / "synth_{pct}"), fr) == {0.1: tmp_path / "synth_10",
                                                                   0.2: tmp_path / "synth_20"}
    assert resolve_synthetic({10: tmp_path / "synth_10"}, fr) == {0.1: tmp_path / "synth_10", 0.2: None}
    assert resolve_synthetic(tmp_path / "synth_10", fr)[0.2] == tmp_path / "synth_10"
    assert resolve_synthetic(None, fr) == {0.1: None, 0.2: None}
    with pytest.raises(DataError, match="50%"):
        resolve_synthetic(str(tmp_path / "synth_{pct}"), [0.5])


def test_labeled_only_from_arrays_and_cli(folders, tmp_path, capsys):
    items = load_folder(folders["real"])[0]
    tests = [(t.image, t.inst) for t in load_folder(folders["test"])[0]]
    result = run_experiment(items, None, tests, tmp_path / "arrays", fast(fractions=[1.0]), log=None)
    assert [r["training_data"] for r in result.rows] == ["100% labeled"]
    rc = main(["evaluate", "--real", str(folders["real"]), "--synthetic", f"100={folders['synth']}",
               "--test", str(folders["test"]), "--fractions", "100", "--out", str(tmp_path / "cli"),
               "--steps", "2", "--size", "32", "--batch-size", "2", "--tile-size", "64", "--stride", "64",
               "--channels", "8", "--synthetic-share", "0.5", "--device", "cpu"])
    assert rc == 0
    assert "| 100% augmented |" in capsys.readouterr().out
    rc = main(["evaluate", "--real", str(folders["real"]), "--synthetic", str(tmp_path / "nope"),
               "--test", str(folders["test"]), "--out", str(tmp_path / "bad")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_synthetic_share_weights():
    from engine.data import Tile
    from engine.evaluate import _pair_weights

    real = [Tile(np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.int32), "r", 0, 0)] * 3
    assert _pair_weights(real, [], 0.5) is None and _pair_weights(real, real, None) is None
    w = _pair_weights(real, real[:2], 0.25)
    areas = [64 * 64] * 5
    total = sum(a * x for a, x in zip(areas, w))
    assert sum(a * x for a, x in zip(areas[3:], w[3:])) / total == pytest.approx(0.25)


def test_repeats_give_a_spread_and_the_gain_a_standard_error():
    from engine.evaluate import table_rows, format_markdown

    def run(arm: str, aji: float) -> dict:
        return {"fraction": 0.1, "arm": arm, "n_real_tiles": 5, "n_synthetic": 0 if arm == "labeled" else 8,
                "nuclei_fraction": 0.1, "mean": {"dice": 0.8, "aji": aji, "aji_plus": 0.6, "pq": 0.5}}

    runs = [run("labeled", v) for v in (0.60, 0.62, 0.64)] + [run("augmented", v) for v in (0.63, 0.66, 0.66)]
    rows = {r["arm"]: r for r in table_rows(runs, [0.1])}
    lab, aug = rows["labeled"], rows["augmented"]
    assert lab["repeats"] == 3 and lab["aji"] == pytest.approx(0.62)
    assert lab["aji_std"] == pytest.approx(np.sqrt(0.0008 / 3))  # population std, as the table shows it
    assert lab["aji_se"] == pytest.approx(0.02 / np.sqrt(3))  # sample std 0.02 over sqrt(3)
    assert aug["aji_se"] == pytest.approx(np.sqrt(0.0006 / 2) / np.sqrt(3))
    assert lab["dice_se"] == pytest.approx(0.0, abs=1e-12)  # equal values: no spread
    md = format_markdown(list(rows.values()))
    se = np.hypot(0.02 / np.sqrt(3), np.sqrt(0.0006 / 2) / np.sqrt(3))
    gain_line = next(line for line in md.splitlines() if line.startswith("| 10% |"))
    assert gain_line.split(" | ")[2] == f"+0.0300 ± {se:.4f}"  # AJI: 0.65 - 0.62
    assert "standard error" in md
    # published figures beside them: their metrics as columns, their own gain in the gain table
    md = format_markdown(list(rows.values()), reference={("10", "labeled"): {"aji": 0.60},
                                                         ("10", "augmented"): {"aji": 0.65}})
    assert "| Synthetic pairs | paper AJI |" in md and "paper Dice" not in md
    assert next(line for line in md.splitlines() if line.startswith("| 10% labeled |")).endswith("| 0.6000 |")
    gain_line = next(line for line in md.splitlines() if line.startswith("| 10% |"))
    assert gain_line.endswith(f"| +0.0300 ± {se:.4f} | +0.0000 ± 0.0000 | +0.0000 ± 0.0000 | +0.0500 |")
    one = table_rows([runs[0], runs[3]], [0.1])
    assert one[0]["aji_se"] == 0.0 and "±" not in format_markdown(one)


def test_gain_per_test_image_is_the_difference_of_each_images_means_over_the_repeats():
    from engine.evaluate import format_image_gains

    def run(fraction: float, arm: str, ajis: tuple[float, float]) -> dict:
        per = {name: {"dice": 0.8, "aji": a, "aji_plus": 0.6, "pq": 0.5} for name, a in zip(("img_a", "img_b"), ajis)}
        return {"fraction": fraction, "arm": arm, "per_image": per}

    runs = [run(0.1, "labeled", (0.50, 0.70)), run(0.1, "labeled", (0.52, 0.72)),
            run(0.1, "augmented", (0.58, 0.70)), run(0.1, "augmented", (0.56, 0.70)),
            run(1.0, "labeled", (0.60, 0.80))]  # 100 %: one arm only, no gain
    md = format_image_gains(runs)
    lines = [line for line in md.splitlines() if line.startswith("| 10% |")]
    assert lines == ["| 10% | img_a | +0.0000 | +0.0600 | +0.0000 | +0.0000 |",   # 0.57 - 0.51
                     "| 10% | img_b | +0.0000 | -0.0100 | +0.0000 | +0.0000 |"]   # 0.70 - 0.71
    assert "| Fraction | Test image | Dice | AJI | AJI+ | PQ |" in md and "100%" not in md
    assert format_image_gains(runs[:2] + runs[4:]) == ""  # no fraction with both arms


def test_arms_split_over_calls_are_collected_into_one_table(experiment, folders, tmp_path):
    """Arms run separately (as by parallel processes) into one folder give the table of one run."""
    import shutil

    from engine.evaluate import collect_results

    result, _ = experiment
    moved = tmp_path / "moved_synth"
    shutil.copytree(folders["synth"], moved)  # the synthetic folder's location does not matter to resume
    out = tmp_path / "split"
    first = run_experiment(folders["real"], None, folders["test"], out, fast(fractions="50,100", arms=["labeled"]),
                           log=None)
    assert [r["training_data"] for r in first.rows] == ["50% labeled", "100% labeled"]
    lines: list[str] = []
    second = run_experiment(folders["real"], moved, folders["test"], out,
                            fast(fractions="50,100", arms=["augmented"]), log=lines.append)
    assert [r["training_data"] for r in second.rows] == ["50% augmented", "100% augmented"]
    assert not any("reusing" in line for line in lines)
    merged = collect_results(out, log=None)
    assert merged.rows == result.rows  # same seeds and data: the same numbers as the single call
    assert (out / "results.md").read_text() == (result.out_dir / "results.md").read_text()
    lines.clear()
    run_experiment(folders["real"], moved, folders["test"], result.out_dir, fast(fractions="50,100"),
                   log=lines.append)
    assert sum("reusing finished run" in line for line in lines) == 4
    with pytest.raises(NuDiffError, match="arms"):
        fast(arms=["both"])
    with pytest.raises(NuDiffError, match="nothing to run"):
        run_experiment(folders["real"], None, folders["test"], out, fast(arms=["augmented"]), log=None)


def test_collect_refuses_runs_with_different_settings(experiment, folders, tmp_path):
    import shutil

    from engine.evaluate import collect_results

    result, _ = experiment
    with pytest.raises(DataError, match="no finished runs"):
        collect_results(tmp_path / "empty", log=None)
    out = tmp_path / "mixed"
    shutil.copytree(result.out_dir / "runs", out / "runs")
    run_experiment(folders["real"], None, folders["test"], out, fast(fractions="20", steps=5), log=None)
    with pytest.raises(DataError, match="different settings"):
        collect_results(out, log=None)


def test_subset_command_writes_the_evaluated_subset(folders, tmp_path, capsys):
    from engine.evaluate import labeled_subset

    tiles, sel = labeled_subset(folders["real"], 50, tile_size=64, stride=64)
    rc = main(["subset", str(folders["real"]), "--fraction", "50", "--out", str(tmp_path / "sub"),
               "--tile-size", "64", "--stride", "64"])
    assert rc == 0 and f"wrote {len(tiles)} of 4 tiles" in capsys.readouterr().out
    items = load_folder(tmp_path / "sub")[0]
    assert len(items) == len(tiles) == len(sel.indices) < 4
    for item, tile in zip(sorted(items, key=lambda i: i.stem),
                          sorted(tiles, key=lambda t: f"{t.stem}_y{t.y}_x{t.x}")):
        assert item.stem == f"{tile.stem}_y{tile.y}_x{tile.x}"
        assert np.array_equal(item.image, tile.image)
        assert int(item.inst.max()) == int(tile.inst.max())  # relabelled 1..n on export
        assert np.array_equal(item.inst > 0, tile.inst > 0)
    rc = main(["subset", str(folders["real"]), "--fraction", "50", "--out", str(tmp_path / "sub")])
    assert rc == 2 and "not empty" in capsys.readouterr().err


def test_collect_from_the_cli(experiment, capsys):
    result, _ = experiment
    assert main(["evaluate", "--collect", "--out", str(result.out_dir)]) == 0
    assert "| 100% augmented |" in capsys.readouterr().out
    assert main(["evaluate", "--out", str(result.out_dir)]) == 2
    assert "--real and --test" in capsys.readouterr().err


def test_experiment_config_is_checked_and_round_trips_through_results_json(experiment, folders):
    import dataclasses

    result, _ = experiment
    # (collect_results, run by other tests on this folder, writes no config: run again, every run is reused)
    run_experiment(folders["real"], folders["synth"], folders["test"], result.out_dir, fast(fractions="50,100"),
                   log=None)
    record = json.loads((result.out_dir / "results.json").read_text())
    config = ExperimentConfig.from_dict(record["config"])
    assert config == fast(fractions="50,100") and config.to_dict() == record["config"]
    assert config.fractions == (0.5, 1.0) and config.segmenter == TINY
    default = ExperimentConfig()
    assert ExperimentConfig.from_dict(json.loads(json.dumps(default.to_dict()))) == default
    assert default.fractions == (0.1, 0.2, 0.5, 1.0) and default.arms == ("labeled", "augmented")
    assert ExperimentConfig(arms=["augmented", "augmented"]).arms == ("augmented",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.steps = 1
    with pytest.raises(NuDiffError, match="unknown experiment settings: stepz"):
        ExperimentConfig.from_dict({"stepz": 3})
    for bad, message in ((dict(repeats=0), "repeats"), (dict(synthetic_share=1.0), "synthetic_share"),
                         (dict(pairs_per_repeat=0), "pairs_per_repeat"), (dict(fractions="0"), "fraction"),
                         (dict(arms=()), "arms"), (dict(repeats=2, only_repeat=2), "only_repeat"),
                         (dict(only_repeat=-1), "only_repeat")):
        with pytest.raises(NuDiffError, match=message):
            ExperimentConfig(**bad)


def test_an_interrupted_run_continues_from_its_snapshot(experiment, folders, tmp_path, monkeypatch):
    import functools

    import engine.evaluate as evaluate
    from engine.segment import train_segmenter

    class Killed(Exception):
        pass

    def killed_at_step_3(step: int, steps: int) -> None:
        if step == 3:
            raise Killed

    settings = fast(fractions="100", arms=("labeled",))
    out = tmp_path / "out"
    with monkeypatch.context() as m:  # the real training, stopped at step 3 as a kill would stop it
        m.setattr(evaluate, "train_segmenter",
                  functools.partial(train_segmenter, snapshot_every=2, progress=killed_at_step_3))
        with pytest.raises(Killed):
            run_experiment(folders["real"], folders["synth"], folders["test"], out, settings, log=None)
    run_dir = out / "runs" / "100pct_labeled_r0"
    assert (run_dir / evaluate.SNAPSHOT).is_file() and not (run_dir / "metrics.json").exists()
    lines: list[str] = []
    again = run_experiment(folders["real"], folders["synth"], folders["test"], out, settings, log=lines.append)
    assert any("continuing from its last snapshot" in line for line in lines)
    assert not (run_dir / evaluate.SNAPSHOT).exists()  # removed once the run's metrics are written
    whole = next(r for r in experiment[0].runs if r["name"] == "100pct_labeled_r0")
    assert again.runs[0]["per_image"] == whole["per_image"]  # the uninterrupted run's model, tested alike
    assert not list((experiment[0].out_dir / "runs").glob(f"*/{evaluate.SNAPSHOT}"))
