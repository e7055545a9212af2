"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one, and no temporary
name is left behind, even when the writer fails."""
import os

import pytest

from unifuse.io import atomic_folder, atomic_write, write_json


def _write(folder, name, text):
    with open(os.path.join(folder, name), "w") as fh:
        fh.write(text)


def test_atomic_folder_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ckpt" / "step-1"
    atomic_folder(target, lambda d: _write(d, "a", "1"))
    assert os.listdir(target) == ["a"]

    def broken(d):
        _write(d, "b", "2")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_folder(target, broken)
    assert os.listdir(target) == ["a"] and os.listdir(tmp_path / "ckpt") == ["step-1"]
    atomic_folder(target, lambda d: _write(d, "c", "3"))  # the same checkpoint saved again
    assert os.listdir(target) == ["c"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json(path, {"a": 1}, sync=True)
    with pytest.raises(ValueError):
        atomic_write(path, lambda tmp: (_write(os.path.dirname(tmp), os.path.basename(tmp), "{"), int("x")))
    assert path.read_text() == '{\n "a": 1\n}' and os.listdir(tmp_path / "sub") == ["x.json"]
