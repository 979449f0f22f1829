"""bench/copy_check.py: each check in its own process; the blocked check agrees with the whole-matrix baseline."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.copy_check import main  # noqa: E402


def test_bench_prints_both_checks_with_the_same_figures(tmp_path, capsys, one_torch_thread):
    # one procedural 1000 px field (no data folder): 49 tiles of 256 px, 64 of 224 px
    main(["--data", str(tmp_path / "none"), "--images", "1", "--small", "256", "--large", "224", "--synthetic", "3",
          "--threads", "1"])
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| whole") or line.startswith("| blocked"):
            rows[(cells[0], cells[1])] = cells
    assert set(rows) == {("whole matrix (baseline)", "256"), ("blocked", "256"), ("blocked", "224")}, out
    whole, blocked = rows[("whole matrix (baseline)", "256")], rows[("blocked", "256")]
    assert whole[2] == blocked[2] == "49" and rows[("blocked", "224")][2] == "64"
    assert whole[5:] == blocked[5:]  # threshold and median distance: the same figures
    assert float(blocked[3]) >= 0 and float(blocked[4].replace(",", "")) > 100  # s; MB of a process with torch
    assert "blocked / whole matrix at 256 px: time x" in out
