"""Writing files so that no reader ever sees half of one: write a temporary sibling, then rename.

`atomic_write(path, write)` is the one place this is spelled out; every module that writes a file a later
run reads (checkpoints, caches, configs, sample archives, pictures) goes through it, and `atomic_folder` does
the same for a folder of files (a checkpoint). The temporary name keeps
the file's extension (numpy and PIL choose the format from it) and starts with a dot, so a folder listing or
an image-folder scan never picks it up; on any failure it is removed and the old file is left as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable

from .errors import UnifuseError


def atomic_write(path, write: Callable[[str], object], *, sync: bool = False) -> str:
    """Call write(tmp_path) for a temporary file beside `path`, then rename it onto `path` in one step.

    sync: flush the file to disk before the rename (for files a crash must not lose, e.g. checkpoint
    metadata). The parent folder is created when missing. Returns `path`."""
    path = os.fspath(path)
    tmp = _temporary(path, os.path.splitext(path)[1])
    try:
        write(tmp)
        if sync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_folder(path, write: Callable[[str], object]) -> str:
    """Call write(tmp_folder) for a new temporary folder beside `path`, then rename it onto `path`; a folder
    already at `path` (the same checkpoint saved again) is replaced. Returns `path`."""
    path = os.fspath(path)
    tmp = _temporary(path, "")
    os.makedirs(tmp)
    try:
        write(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _temporary(path: str, ext: str) -> str:
    """A fresh hidden name beside `path` (pid and random bits) ending in `ext`; the parent folder is created."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{ext}")


def remove_temporaries(folder) -> list:
    """Remove the temporary files and folders that `atomic_write` / `atomic_folder` left in `folder` when their
    process was killed mid-write (a name `.NAME.tmp-PID-HEX`, PID no longer running); returns what it removed."""
    folder = os.fspath(folder)
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if not name.startswith(".") or ".tmp-" not in name:
            continue
        pid = name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another process is writing it now
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def write_text(path, text: str, *, sync: bool = False) -> str:
    """A text file written atomically."""
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    return atomic_write(path, write, sync=sync)


def write_json(path, obj, *, indent: int = 1, sync: bool = False) -> str:
    """A JSON file written atomically."""
    return write_text(path, json.dumps(obj, indent=indent), sync=sync)


__all__ = ["atomic_folder", "atomic_write", "remove_temporaries", "write_json", "write_text"]


def read_json(path, what: str, fix: str) -> dict:
    """The JSON object in `path`; one UnifuseError naming `what`, the file and `fix` if it is missing, not JSON, or
    not an object."""
    try:
        with open(path) as fh:
            value = json.load(fh)
    except (OSError, ValueError) as err:
        raise UnifuseError(f"{what} {path} is missing or not valid JSON ({type(err).__name__}); {fix}") from None
    if not isinstance(value, dict):
        raise UnifuseError(f"{what} {path} must hold a JSON object; {fix}")
    return value
