"""One conditioning record on every route: the same models, structure and seed give the same image through
`generate`, `sample-structures` + `synthesize`, and the studio's API; a rebuilt structure says so."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from gradio_client import Client
from PIL import Image

from engine import cli
from engine.conditioning import Condition, Provenance, inst_sha256, load_condition, save_condition
from engine.precision import bf16_is_fast
from engine.structure import instances_to_structure
from engine.synthetic import make_tile

SEED, STEPS, W = 5, 3, "2"
# the routes below are compared bit for bit, the studio's with the CLI's: in fp32 on both sides (bf16 kernels
# may round differently in another process); tests/conftest.py's studio fixture reads STUDIO_PRECISION
STUDIO_PRECISION = PRECISION = "fp32"


def _manifest(folder: Path) -> list[dict]:
    return list(csv.DictReader(open(folder / "manifest.csv", newline="")))


def _says(out: tuple, text: str) -> bool:
    """Whether one of an API call's text outputs contains text (the Synthesize tab's description)."""
    return any(isinstance(x, str) and text in x for x in out)


def _image(folder: Path, row: dict) -> np.ndarray:
    return np.asarray(Image.open(folder / row["image"]).convert("RGB"))


def _studio_pair(c: Client, tiny_checkpoints, how: str, *sampling) -> tuple[dict, np.ndarray, np.ndarray, str]:
    """Through the studio's API: sample one structure (seed SEED; ``sampling``: the endpoint's further inputs),
    send it to Synthesize (whose description must say ``how``), synthesize, export; (manifest row, image, label,
    the sampling's status line)."""
    s_ckpt, i_ckpt = map(str, tiny_checkpoints)
    sampled, gallery = c.predict(s_ckpt, 1, "ddim", STEPS, SEED, *sampling, api_name="/sample_structures")
    assert sampled.startswith("Sampled 1 structures") and f"seed {SEED}" in gallery[0]["caption"], sampled
    assert _says(c.predict(0, api_name="/send_to_synthesize"), how)
    status, _ = c.predict(i_ckpt, float(W), "ddim", STEPS, SEED, 1, api_name="/synthesize")
    assert status.startswith("Synthesized 1 image(s)"), status
    c.predict(0, 0.8, api_name="/add_to_basket")
    _, download = c.predict(["COCO json"], True, api_name="/export_zip")
    path = download["value"] if isinstance(download, dict) else download
    with zipfile.ZipFile(path) as zf:
        row = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))[0]
        img = np.asarray(Image.open(io.BytesIO(zf.read(row["image"]))).convert("RGB"))
        return row, img, tifffile.imread(io.BytesIO(zf.read(row["label"]))), sampled


@pytest.fixture(scope="module")
def cli_routes(tiny_checkpoints, tmp_path_factory):
    """generate, and sample-structures then synthesize, for one structure with seed SEED."""
    s_ckpt, i_ckpt = map(str, tiny_checkpoints)
    root = tmp_path_factory.mktemp("routes")
    common = ["--sampler", "ddim", "--steps", str(STEPS), "--seed", str(SEED), "--precision", PRECISION]
    assert cli.main(["generate", "--structure-checkpoint", s_ckpt, "--image-checkpoint", i_ckpt, "--n", "1",
                     "--w", W, "--out", str(root / "generate"), *common]) == 0
    assert cli.main(["sample-structures", "--checkpoint", s_ckpt, "--n", "1", "--out", str(root / "structures"),
                     *common]) == 0
    assert cli.main(["synthesize", "--checkpoint", i_ckpt, "--labels", str(root / "structures" / "labels"),
                     "--w", W, "--out", str(root / "synthesize"), *common]) == 0
    return root


def test_generate_and_synthesize_condition_on_the_same_sampled_structure(cli_routes):
    gen, syn = _manifest(cli_routes / "generate"), _manifest(cli_routes / "synthesize")
    assert len(gen) == len(syn) == 1
    assert np.array_equal(_image(cli_routes / "generate", gen[0]), _image(cli_routes / "synthesize", syn[0]))
    for row in (gen[0], syn[0]):
        assert row["structure_rebuilt"] == "false" and row["edited"] == "false"
        assert row["source"] == "sampled" and row["structure_seed"] == str(SEED) and row["seed"] == str(SEED)
        assert row["structure_sha256"] and row["image_sha256"]
    assert syn[0]["label_file"] == f"structure_{SEED:05d}.tif"
    same = ("n_nuclei", "structure_checkpoint", "structure_sha256", "image_checkpoint", "image_sha256", "w", "steps",
            "precision")
    assert {k: gen[0][k] for k in same} == {k: syn[0][k] for k in same}
    assert gen[0]["precision"] == PRECISION  # what the images were computed in, for reproducing them elsewhere


def test_the_manifest_records_the_default_precision(cli_routes, tiny_checkpoints, tmp_path):
    """Without --precision, sampling runs in "auto": bf16 autocast where it is fast, and the manifest says so."""
    assert cli.main(["synthesize", "--checkpoint", str(tiny_checkpoints[1]), "--labels",
                     str(cli_routes / "structures" / "labels"), "--w", W, "--out", str(tmp_path / "auto"),
                     "--sampler", "ddim", "--steps", str(STEPS), "--seed", str(SEED)]) == 0
    assert _manifest(tmp_path / "auto")[0]["precision"] == ("bf16" if bf16_is_fast("cpu") else "fp32")


@pytest.fixture(scope="module")
def smoothed_routes(tiny_checkpoints, tmp_path_factory):
    """cli_routes with --smooth-outlines 2."""
    s_ckpt, i_ckpt = map(str, tiny_checkpoints)
    root = tmp_path_factory.mktemp("smoothed")
    common = ["--sampler", "ddim", "--steps", str(STEPS), "--seed", str(SEED), "--precision", PRECISION]
    smooth = ["--smooth-outlines", "2"]
    assert cli.main(["generate", "--structure-checkpoint", s_ckpt, "--image-checkpoint", i_ckpt, "--n", "1",
                     "--w", W, "--out", str(root / "generate"), *common, *smooth]) == 0
    assert cli.main(["sample-structures", "--checkpoint", s_ckpt, "--n", "1", "--out", str(root / "structures"),
                     *common, *smooth]) == 0
    assert cli.main(["synthesize", "--checkpoint", i_ckpt, "--labels", str(root / "structures" / "labels"),
                     "--w", W, "--out", str(root / "synthesize"), *common]) == 0
    return root


def test_smoothed_outlines_are_one_condition_on_every_route(cli_routes, smoothed_routes):
    """--smooth-outlines: the label is the watershed's map with rounded outlines, and the image is conditioned
    on the structure rebuilt from that label: generate and sample-structures + synthesize give the same pair,
    and the manifests say how it was made."""
    from engine.structure import smooth_outlines

    root, stem = smoothed_routes, f"structure_{SEED:05d}"
    plain = tifffile.imread(cli_routes / "structures" / "labels" / f"{stem}.tif").astype(np.int32)
    smoothed = tifffile.imread(root / "structures" / "labels" / f"{stem}.tif").astype(np.int32)
    np.testing.assert_array_equal(smoothed, smooth_outlines(plain, 2.0))
    assert not np.array_equal(smoothed, plain)
    np.testing.assert_array_equal(np.load(root / "structures" / "structures" / f"{stem}.npy"),
                                  instances_to_structure(smoothed))
    gen, syn = _manifest(root / "generate"), _manifest(root / "synthesize")
    assert np.array_equal(_image(root / "generate", gen[0]), _image(root / "synthesize", syn[0]))
    assert not np.array_equal(_image(root / "generate", gen[0]),
                              _image(cli_routes / "generate", _manifest(cli_routes / "generate")[0]))
    for row in (gen[0], syn[0]):
        assert row["source"] == "sampled" and row["structure_rebuilt"] == "true" and row["edited"] == "false"
        assert row["outline_sigma"] == "2.0" and row["structure_seed"] == str(SEED)
    assert _manifest(cli_routes / "generate")[0]["outline_sigma"] == ""  # off: the paper's maps, as sampled


def test_the_studio_smooths_outlines_as_the_cli_does(studio, tiny_checkpoints, smoothed_routes):
    c = Client(studio[1], verbose=False)
    row, img, label, status = _studio_pair(c, tiny_checkpoints,
                                           "structure rebuilt from the map (outlines smoothed, σ 2 px)", 1.0, 0, 2.0)
    assert "Outlines smoothed (σ 2 px)" in status, status
    ref = _manifest(smoothed_routes / "generate")[0]
    assert np.array_equal(img, _image(smoothed_routes / "generate", ref))
    assert np.array_equal(label, tifffile.imread(smoothed_routes / "generate" / ref["label"]))
    assert (row["outline_sigma"], row["structure_rebuilt"], row["source"], row["edited"]) == \
        ("2.0", "true", "sampled", "false")


def test_a_rebuilt_structure_gives_another_image(cli_routes, tiny_checkpoints, tmp_path):
    """The check above can fail: conditioning on the structure rebuilt from the same map (what the CLI and
    the studio did before) gives a different image."""
    labels = cli_routes / "structures" / "labels"
    plain = tmp_path / "plain" / "labels"
    plain.mkdir(parents=True)
    (plain / "x.tif").write_bytes(next(labels.iterdir()).read_bytes())  # no structures/ beside it
    assert cli.main(["synthesize", "--checkpoint", str(tiny_checkpoints[1]), "--labels", str(plain), "--w", W,
                     "--out", str(tmp_path / "out"), "--sampler", "ddim", "--steps", str(STEPS),
                     "--seed", str(SEED), "--precision", PRECISION]) == 0
    row = _manifest(tmp_path / "out")[0]
    assert row["structure_rebuilt"] == "true" and row["source"] == "label" and row["edited"] == "false"
    ref = _manifest(cli_routes / "generate")[0]
    assert not np.array_equal(_image(tmp_path / "out", row), _image(cli_routes / "generate", ref))


def test_a_label_edited_after_sampling_is_rebuilt_and_marked(cli_routes, tiny_checkpoints, tmp_path):
    src = cli_routes / "structures"
    folder = tmp_path / "edited"
    (folder / "labels").mkdir(parents=True)
    (folder / "structures").mkdir()
    stem = f"structure_{SEED:05d}"
    for ext in ("npy", "json"):
        (folder / "structures" / f"{stem}.{ext}").write_bytes((src / "structures" / f"{stem}.{ext}").read_bytes())
    inst = tifffile.imread(src / "labels" / f"{stem}.tif").astype(np.int32)
    assert inst.max() >= 1
    inst[inst == 1] = 0  # delete a nucleus by hand
    tifffile.imwrite(folder / "labels" / f"{stem}.tif", inst.astype(np.uint16))
    cond = load_condition(folder / "labels" / f"{stem}.tif", inst)
    assert cond.rebuilt and cond.edited and cond.origin["structure_seed"] == SEED
    assert np.array_equal(cond.structure, instances_to_structure(inst))


def test_studio_gives_the_cli_image(studio, tiny_checkpoints, cli_routes):
    s_ckpt, i_ckpt = map(str, tiny_checkpoints)
    c = Client(studio[1], verbose=False)
    row, img, _, _ = _studio_pair(c, tiny_checkpoints, "structure as sampled")
    assert row["structure_rebuilt"] == "false" and row["source"] == "sampled" and row["edited"] == "false"
    ref = _manifest(cli_routes / "generate")[0]
    assert np.array_equal(img, _image(cli_routes / "generate", ref))
    assert row["structure_sha256"] == ref["structure_sha256"] and row["n_nuclei"] == ref["n_nuclei"]
    assert row["precision"] == ref["precision"] == PRECISION  # the studio's --precision reaches its worker

    # after a hand edit the structure is rebuilt, and the provenance says so
    c.predict(0, api_name="/send_to_edit")
    inst = tifffile.imread(Path(cli_routes / "structures" / "labels" / f"structure_{SEED:05d}.tif"))
    ys, xs = np.nonzero(inst == 1)
    out = c.predict(int(xs[0]), int(ys[0]), api_name="/edit_delete_at")
    assert out[0].startswith("Deleted")
    out = c.predict(None, "keep as separate nuclei", 5, api_name="/edit_to_synthesize")
    assert _says(out, "structure rebuilt from the map") and _says(out, "edited by hand")
    c.predict(i_ckpt, float(W), "ddim", STEPS, SEED, 1, api_name="/synthesize")
    c.predict(0, 0.8, api_name="/add_to_basket")
    # undo restores the sampled structure along with the map
    c.predict(0, api_name="/send_to_edit")
    c.predict(int(xs[0]), int(ys[0]), api_name="/edit_delete_at")
    out = c.predict(api_name="/edit_undo")
    assert out[0] == "Undone."
    out = c.predict(None, "keep as separate nuclei", 5, api_name="/edit_to_synthesize")
    assert _says(out, "structure as sampled") and not _says(out, "edited by hand")
    status, download = c.predict(["COCO json"], True, api_name="/export_zip")
    path = download["value"] if isinstance(download, dict) else download
    with zipfile.ZipFile(path) as zf:
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
    assert [(r["edited"], r["structure_rebuilt"]) for r in rows] == [("false", "false"), ("true", "true")]


def test_provenance_is_one_record():
    _, inst = make_tile(32, seed=1)
    cond = Condition.sampled(instances_to_structure(inst), inst, structure_seed=3)
    prov = Provenance.of(cond, image_checkpoint="m", image_sha256="h", seed=3, w=2, sampler="ddim", steps=20,
                         tile=32)
    d = prov.to_dict()
    assert set(Provenance.keys()) <= set(d) and d["tile"] == 32 and d["structure_rebuilt"] is False
    assert d["source"] == "sampled" and d["n_nuclei"] == int(inst.max())
    edited = cond.with_instances(np.where(inst == 1, 0, inst))
    assert edited.rebuilt and edited.edited and edited.origin["structure_seed"] == 3


def test_saved_condition_round_trip(tmp_path):
    _, inst = make_tile(32, seed=2)
    structure = instances_to_structure(inst) * 0.9  # not what a rebuild would give
    save_condition(Condition.sampled(structure, inst, structure_seed=7), tmp_path, "s")
    got = load_condition(tmp_path / "labels" / "s.tif", inst)
    assert not got.rebuilt and np.array_equal(got.structure, structure.astype(np.float32))
    assert got.origin["structure_seed"] == 7 and inst_sha256(got.inst) == inst_sha256(inst)
    other = load_condition(tmp_path / "labels" / "s.tif", np.zeros_like(inst))
    assert other.rebuilt and other.edited
