"""The README runs as written: every ```python block executes top to bottom on its own (in a fresh namespace, in a
scratch folder holding a briefly trained `runs/d` for the blocks that load one), and every command of its ```bash
blocks exists: `make` targets in the Makefile, `unifuse` subcommands in `unifuse --help`, each flag in the
subcommand's `--help`, and the presets and samplers named there.

A block may be skipped only with `<!-- readme-test: skip (reason) -->` on the line above it, for what cannot run
offline (e.g. the `[text]` extra)."""
import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"(?:<!--(?P<note>[^\n]*?)-->\s*\n)?```(?P<lang>[a-z]*)\n(?P<code>.*?)```", re.S)


def blocks(lang: str) -> list:
    """(line number, code, note of the HTML comment above it or "") of every ```lang block of the README."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start("code")), m.group("code"), (m.group("note") or "").strip())
            for m in FENCE.finditer(text) if m.group("lang") == lang]


PYTHON = blocks("python")
BASH = blocks("bash")


def test_the_readme_has_the_blocks_it_promises():
    codes = [code for _, code, _ in PYTHON]
    assert len(PYTHON) >= 5 and len(BASH) >= 2
    assert any("uf.load(" in c for c in codes), "a block must load a trained run"
    assert any("grad=True" in c for c in codes) and any("uf.samplers.generators(" in c for c in codes)
    for line, _, note in PYTHON:
        assert "skip" not in note or "(" in note, f"README.md:{line}: a skipped block must say why"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch folder; `runs/d` in it is trained on first use (digits, a few fp32 steps)."""
    return tmp_path_factory.mktemp("readme")


def trained_run(workdir: Path) -> None:
    from unifuse.config import get_config
    from unifuse.training import train

    if not (workdir / "runs" / "d" / "ckpt" / "latest.json").exists():
        cfg = get_config("digits", ["train.steps=5", "train.precision=fp32", "data.batch=64", "sample.grid=16"])
        train(cfg, str(workdir / "runs" / "d"), progress=False)


@pytest.mark.parametrize("line,code,note", PYTHON, ids=[f"line{line}" for line, _, _ in PYTHON])
def test_python_block_runs_as_written(line, code, note, workdir, monkeypatch):
    if note.startswith("readme-test: skip"):
        pytest.skip(f"README.md:{line}: {note}")
    if "uf.load(" in code:
        trained_run(workdir)
    monkeypatch.chdir(workdir)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def commands(code: str):
    """(line, words) of each command in a bash block: comments and the brackets of optional flags removed."""
    for raw in code.splitlines():
        words = shlex.split(raw.split("#", 1)[0].replace("[", " ").replace("]", " "))
        if words:
            yield raw, words


def _help(sub: str) -> str:
    """What `unifuse SUB --help` prints, from the CLI's own parser (in process: a subprocess per command is slow)."""
    from unifuse.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([sub, "--help"])
    assert exit_.value.code == 0, f"unifuse {sub} --help failed"
    return out.getvalue()


def test_bash_commands_exist_with_their_flags():
    from unifuse.config import PRESETS
    from unifuse.nets.classifier import CLASSIFIER_PRESETS
    from unifuse.samplers import available

    makefile = (ROOT / "Makefile").read_text()
    top = subprocess.run([sys.executable, "-m", "unifuse.cli", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300).stdout
    helps = {}
    for raw, words in (c for _, code, _ in BASH for c in commands(code)):
        if words[0] == "make":
            assert all(re.search(rf"^{re.escape(t)}:", makefile, re.M) for t in words[1:]), raw
            continue
        start = next((i for i, w in enumerate(words) if w in ("unifuse", "unifuse.cli")), None)
        assert start is not None, f"README bash line runs neither make nor unifuse: {raw}"
        sub, rest = words[start + 1], words[start + 2:]
        assert re.search(rf"^\s+{sub}\s", top, re.M), f"`unifuse --help` does not list {sub!r} ({raw})"
        helps.setdefault(sub, _help(sub))
        for flag in (w.split("=", 1)[0] for w in rest if w.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[sub]), \
                f"`unifuse {sub} --help` has no {flag} ({raw})"
        if sub == "train" and rest and not rest[0].startswith("-"):
            assert rest[0] in PRESETS or rest[0] in CLASSIFIER_PRESETS, raw
        if "--sampler" in rest:
            assert rest[rest.index("--sampler") + 1] in available(), raw
