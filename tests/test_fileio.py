"""engine.fileio: atomic output (files and folders), temporary names the clean-ups recognise, record checks."""

from __future__ import annotations

import os
import stat

import pytest

from engine.errors import CheckpointError, DataError
from engine.fileio import (TEMP_NAME, atomic_output, atomic_write_bytes, check_format, commit, file_sha256,
                           is_whole_number, process_umask, read_json_record, resolve_device, temp_beside)


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    seen = []
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            seen.append(tmp)
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    m = TEMP_NAME.match(seen[0].name)
    assert seen[0].parent == tmp_path and m and m["target"] == "a.bin"  # the name the clean-ups look for
    assert target.read_bytes() == b"old" and not seen[0].exists()


def test_a_named_temporary_is_used_as_given(tmp_path):
    temp = tmp_path / ".latest.png.tmp"
    with atomic_output(tmp_path / "latest.png", temp=temp) as tmp:
        assert tmp == temp
        tmp.write_bytes(b"png")
    assert (tmp_path / "latest.png").read_bytes() == b"png" and not temp.exists()


def test_folders_replace_only_an_empty_folder(tmp_path):
    with atomic_output(tmp_path / "out", folder=True) as tmp:
        assert tmp.is_dir() and TEMP_NAME.match(tmp.name)
        (tmp / "x.txt").write_text("x")
    assert (tmp_path / "out" / "x.txt").read_text() == "x"
    other = temp_beside(tmp_path / "out", folder=True)
    with pytest.raises(OSError):
        commit(other, tmp_path / "out")  # someone else's output is never replaced
    assert (tmp_path / "out" / "x.txt").exists()
    (tmp_path / "empty").mkdir()
    commit(other, tmp_path / "empty")
    assert (tmp_path / "empty").is_dir() and not other.exists()


def test_file_sha256(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert file_sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_record_checks(tmp_path):
    assert is_whole_number(3) and is_whole_number(0, 0) and not is_whole_number(True)
    assert not is_whole_number(2.0) and not is_whole_number(1, 2) and not is_whole_number("1")
    assert check_format({}, 1, tmp_path) == 0 and check_format({"format": 1}, 1, tmp_path) == 1
    with pytest.raises(CheckpointError, match="newer NuDiff"):
        check_format({"format": 2}, 1, tmp_path)
    with pytest.raises(DataError, match="whole number"):
        check_format({"format": "1"}, 1, tmp_path, DataError)
    bad = tmp_path / "r.json"
    bad.write_text("{nope")
    with pytest.raises(CheckpointError, match=r"segmenter record .*r\.json is not valid JSON"):
        read_json_record(bad, "segmenter record")
    bad.write_text('{"a": [1]}')
    assert read_json_record(bad, "record") == {"a": [1]}


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_the_same_tensors_and_metadata_give_the_same_safetensors_bytes_in_every_process(tmp_path):
    """safetensors writes its metadata in hash order, which differs between processes, so a model trained
    again to the same weights used to get another sha256 (bench/run_ledger.py compares them)."""
    import subprocess
    import sys

    code = ("import hashlib, torch; from engine.fileio import safetensors_bytes; "
            "b = safetensors_bytes({'w': torch.arange(6.0).reshape(2, 3), 'b': torch.ones(2)}, "
            "{'kind': 'structure', 'format': '1', 'state': '{\"step\": 3}', 'extra': 'é'}); "
            "print(hashlib.sha256(b).hexdigest()); open(__import__('sys').argv[1], 'wb').write(b)")
    digests = {subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")], check=True,
                              capture_output=True, text=True).stdout.strip() for i in range(4)}
    assert len(digests) == 1  # 4 keys: 24 orders, one in each of 4 processes by chance (1 in 13,824)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == {"kind": "structure", "format": "1", "state": '{"step": 3}', "extra": "é"}
        assert f.get_tensor("w").tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] and f.get_tensor("b").tolist() == [1, 1]


def test_finished_files_and_folders_get_the_umask_permissions_not_private_ones(tmp_path):
    """A checkpoint or export written through a temporary is readable as any file the user makes: tempfile's
    private 0o600 / 0o700 would otherwise be renamed onto it."""
    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    old = os.umask(0o027)
    try:
        assert process_umask() == 0o027
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        with atomic_output(tmp_path / "d", folder=True) as d:
            (d / "f").write_bytes(b"y")
        assert (mode(tmp_path / "a.bin"), mode(tmp_path / "d")) == (0o640, 0o750)
        os.umask(0o002)
        atomic_write_bytes(tmp_path / "b.bin", b"x")
        assert mode(tmp_path / "b.bin") == 0o664
    finally:
        os.umask(old)
