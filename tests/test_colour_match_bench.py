"""bench/colour_match.py end to end on procedural images with the tiny test-preset image model: its three
arms, its figures and that no image of the scored role gives colours."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import colour_match  # noqa: E402


def test_colour_match_scores_three_arms_on_the_roles_crops(tmp_path, tiny_checkpoints, capsys, monkeypatch,
                                                        one_torch_thread):
    from engine import colour_prior
    from engine.synthetic import write_folder

    data = write_folder(tmp_path / "data", n_images=4, size=64, seed=3)
    stems = sorted(p.stem for p in (data / "images").iterdir())
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": stems[:2], "validation": stems[2:3], "test": stems[3:]}))
    seen = []
    real_colours = colour_prior.tile_mean_colours

    def spy(images, *a, **k):  # which images the colours come from
        images = list(images)
        seen.extend(im.sum() for im in images)
        return real_colours(images, *a, **k)

    monkeypatch.setattr(colour_prior, "tile_mean_colours", spy)
    out = tmp_path / "figures.json"
    assert colour_match.main(["--data", str(data), "--split", str(split), "--image", str(tiny_checkpoints[1]),
                              "--size", "32", "--n", "3", "--steps", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| 3 validation layouts, 32 px" in table and table.count("| colour prior: ") == 3
    from engine.data import load_folder

    items = {it.stem: it for it in load_folder(data)[0]}
    assert sorted(seen) == sorted(items[s].image.sum() for s in stems[:2])  # the train images only
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["none", "all tiles", "matched to the layout"]
    assert all(np.isfinite(r["mean_L"]) and r["mae_L"] >= 0 for r in rows.values())
    assert rows["none"]["mean_L"] != rows["all tiles"]["mean_L"]  # the prior changed the images
