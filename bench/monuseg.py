"""The MoNuSeg data of the benchmarks: where it lies, its licence, and the split of its images into roles.

The split file (default bench/splits/monuseg.json) lists image stems per role: "train" (models and
labeled fractions), "validation" (every choice) and "test" (scored once, after the choices). Its "rule"
says how the roles were drawn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "monuseg" / "train"
SPLIT = ROOT / "bench" / "splits" / "monuseg.json"
ROLES = ("train", "validation", "test")
LICENCE = ("MoNuSeg data: CC BY-NC-SA 4.0 (Kumar et al., IEEE TMI 2017 / 2019). The segmenters in this folder "
           "were trained on it and inherit these terms (non-commercial, share-alike, attribution).\n")

#: The paper's Table 1, MoNuSeg columns (HoVer-Net): (percent, arm) -> {metric: value}
PAPER_TABLE1 = {(pct, arm): {"dice": dice, "aji": aji} for pct, arm, dice, aji in (
    ("10", "labeled", 0.7969, 0.6344), ("10", "augmented", 0.8291, 0.6785),
    ("20", "labeled", 0.8118, 0.6501), ("20", "augmented", 0.8219, 0.6657),
    ("50", "labeled", 0.8182, 0.6603), ("50", "augmented", 0.8291, 0.6764),
    ("100", "labeled", 0.8206, 0.6652), ("100", "augmented", 0.8336, 0.6810))}


def read_split(path: Path = SPLIT) -> dict[str, list[str]]:
    """The split file's stems per role; "validation" may be absent (none), "test" too (then a test folder
    is needed). SystemExit with the reason for a file that is not a split."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"split file {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), list):
        raise SystemExit(f"split file {path}: needs a \"train\" list of image stems")
    out = {}
    for role in ROLES:
        stems = data.get(role) or []
        if not isinstance(stems, list) or not all(isinstance(s, str) for s in stems):
            raise SystemExit(f"split file {path}: \"{role}\" must be a list of image stems")
        out[role] = list(stems)
    return out


def link_files(folder: Path, files: list[Path]) -> None:
    """FOLDER/<name of each file> as a link to it (made once, kept); links there that name other files (an
    earlier call's) are removed, other files left alone."""
    want = {f.name: Path(f).resolve() for f in files}
    folder.mkdir(parents=True, exist_ok=True)
    for link in folder.iterdir():
        if link.is_symlink() and Path(os.readlink(link)) != want.get(link.name):
            link.unlink()
    for name, src in want.items():
        if not os.path.lexists(folder / name):
            (folder / name).symlink_to(src)


def link_role(role: str, out: Path, data: Path = DATA, split: Path = SPLIT) -> Path:
    """OUT/ROLE/{images,labels}/: links to the split's ROLE images of ``data`` (:func:`link_files`); returns
    OUT/ROLE. SystemExit when an image of the role is missing from ``data``."""
    if role not in ROLES:
        raise SystemExit(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    data, folder, stems = Path(data).resolve(), Path(out) / role, read_split(split)[role]
    for kind in ("images", "labels"):
        files = [data / kind / f"{stem}.png" for stem in stems]
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            raise SystemExit(f"{missing} is missing: {data} does not hold the split's {role} images")
        link_files(folder / kind, files)
    return folder


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="The split's images of one role as a folder of links.")
    ap.add_argument("action", choices=["link"])
    ap.add_argument("role", choices=ROLES)
    ap.add_argument("out", type=Path, help="the links go to OUT/ROLE/{images,labels}")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--split", type=Path, default=SPLIT)
    a = ap.parse_args()
    print(link_role(a.role, a.out, a.data, a.split))
