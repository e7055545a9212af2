"""A new user's first hour, from the command line: happy paths, bad input and faults, each checked.

    python bench/robustness.py                 # every case; prints a table and writes runs/robustness/report.md
    python bench/robustness.py --only seeds    # cases whose name contains "seeds"

Each case runs `python -m unifuse.cli ...` in a fresh process and records the exit code, the last line of
stderr, the seconds it took and the files it left behind (temporary files anywhere under the work folder,
anything new inside the training image folder). A refusal passes when it exits non-zero with one line and no
traceback; a success passes when it exits 0 and its own check holds (e.g. samples are not saturated noise,
the same seed gives the same sample whatever the batch). The fixtures (a short digits run, an image folder
with class sub-folders and one unreadable file, a run on that folder) are made first, under --work.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREE = [ROOT]  # the unifuse source tree the CLI runs from (--tree)


class Case(NamedTuple):
    name: str
    argv: list                          # arguments of `unifuse` ({W} is the work folder)
    expect: str                         # "ok" or "refused"
    check: Callable | None = None    # check(work, proc) -> (passed, note)
    setup: Callable | None = None    # setup(work) before the run


def cli(argv, work, timeout=600, env=None, signal_after=None):
    """Run the CLI; with signal_after=(seconds, signum) send that signal once the run has started."""
    argv = [a.replace("{W}", work) for a in argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=TREE[0], **(env or {}))
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "unifuse.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=work)
    if signal_after is not None:
        time.sleep(signal_after[0])
        proc.send_signal(signal_after[1])
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), time.time() - start


# --- fixtures ---------------------------------------------------------------------------------------------
def make_fixtures(work: str) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    os.makedirs(work, exist_ok=True)
    if not os.path.isdir(os.path.join(work, "run", "ckpt")):
        proc, _ = cli(["train", "digits", "--out", "{W}/run", "--steps", "60", "--set", "train.ckpt_every=30",
                       "--set", "train.precision=fp32", "--no-progress"], work)
        assert proc.returncode == 0, proc.stderr
    folder = os.path.join(work, "folder")
    if not os.path.isdir(folder):
        d = load_digits()
        for i in range(200):
            cls = os.path.join(folder, str(d.target[i]))
            os.makedirs(cls, exist_ok=True)
            Image.fromarray((d.images[i] * 15).astype(np.uint8)).save(os.path.join(cls, f"{i}.png"))
        with open(os.path.join(folder, "3", "broken.png"), "wb") as fh:
            fh.write(b"not a png")
    with open(os.path.join(work, "afile"), "w") as fh:
        fh.write("a file, not a folder\n")


def folder_files(work):
    return set(glob.glob(os.path.join(work, "folder", "**", "*"), recursive=True))


def temporary_files(work):
    pats = ("**/*.tmp*", "**/.tmp*", "**/*.tmp")
    return sorted({os.path.relpath(p, work) for pat in pats for p in glob.glob(os.path.join(work, pat), recursive=True)})


# --- checks -----------------------------------------------------------------------------------------------
def saturation(out_dir):
    images = np.load(os.path.join(out_dir, "samples.npz"))["images"]
    return float(((images == 0) | (images == 255)).mean())


def not_noise(sub):
    def check(work, proc):
        frac = saturation(os.path.join(work, sub))
        return frac < 0.6, f"{100 * frac:.0f}% of pixels saturated"
    return check


def same_samples(sub_a, sub_b, argv_b):
    def check(work, proc):
        proc_b, _ = cli(argv_b, work)
        if proc_b.returncode != 0:
            return False, f"second run failed: {proc_b.stderr.strip().splitlines()[-1:]}"
        a = np.load(os.path.join(work, sub_a, "samples.npz"))["images"].astype(int)
        b = np.load(os.path.join(work, sub_b, "samples.npz"))["images"].astype(int)
        diff = [i for i in range(len(a)) if not np.array_equal(a[i], b[i])]
        return not diff, "identical" if not diff else f"samples {diff[:6]} differ"
    return check


def stderr_says(*words):
    def check(work, proc):
        text = proc.stderr.lower()
        ok = all(w in text for w in words)
        return ok, "" if ok else f"stderr does not mention {words}"
    return check


def sigterm_checkpoint(work, proc):
    ckpts = sorted(glob.glob(os.path.join(work, "term", "ckpt", "step-*")))
    hint = "--resume" in proc.stderr and os.path.join(work, "term") in proc.stderr.replace("{W}", work)
    return bool(ckpts) and hint, f"{len(ckpts)} checkpoint(s); resume hint {'names' if hint else 'does not name'} the run"


def family_taken(work, proc):
    meta = json.load(open(glob.glob(os.path.join(work, "fam", "ckpt", "step-*", "checkpoint.json"))[-1]))
    model = meta["config"]["model"]
    return model["path"] == "rf" and model["prediction"] == "velocity", f"path {model['path']}, prediction {model['prediction']}"


def break_sidecar(work):
    shutil.rmtree(os.path.join(work, "bad-sidecar"), ignore_errors=True)
    shutil.copytree(os.path.join(work, "run"), os.path.join(work, "bad-sidecar"))
    for f in glob.glob(os.path.join(work, "bad-sidecar", "ckpt", "step-*", "checkpoint.json")):
        meta = json.load(open(f))
        meta["step"] = "sixty"
        json.dump(meta, open(f, "w"))


SAMPLE = ["sample", "--ckpt", "{W}/run", "--n", "64"]
CASES = [
    Case("sample euler_maruyama nfe 10", SAMPLE + ["--out", "{W}/s-em", "--sampler", "euler_maruyama", "--nfe", "10"],
         "ok", not_noise("s-em")),
    Case("sample pc nfe 20", SAMPLE + ["--out", "{W}/s-pc", "--sampler", "pc", "--nfe", "20"], "ok", not_noise("s-pc")),
    Case("sample heun nfe 3", SAMPLE + ["--out", "{W}/s-h3", "--sampler", "heun", "--nfe", "3"], "ok", not_noise("s-h3")),
    Case("sample dpm_solver_2 nfe 3", SAMPLE + ["--out", "{W}/s-d3", "--sampler", "dpm_solver_2", "--nfe", "3"], "ok",
         not_noise("s-d3")),
    Case("seeds heun batch 4 vs 16", ["sample", "--ckpt", "{W}/run", "--n", "16", "--seed", "5", "--batch", "4",
                                      "--sampler", "heun", "--out", "{W}/seed-a"], "ok",
         same_samples("seed-a", "seed-b", ["sample", "--ckpt", "{W}/run", "--n", "16", "--seed", "5", "--batch", "16",
                                           "--sampler", "heun", "--out", "{W}/seed-b"])),
    Case("seeds euler_maruyama batch 4 vs 16", ["sample", "--ckpt", "{W}/run", "--n", "16", "--seed", "5", "--batch", "4",
                                                "--sampler", "euler_maruyama", "--nfe", "50", "--out", "{W}/seed-c"], "ok",
         same_samples("seed-c", "seed-d", ["sample", "--ckpt", "{W}/run", "--n", "16", "--seed", "5", "--batch", "16",
                                           "--sampler", "euler_maruyama", "--nfe", "50", "--out", "{W}/seed-d"])),
    Case("sample --out unwritable", ["sample", "--ckpt", "{W}/run", "--n", "3000", "--out", "/proc/unifuse-out"], "refused",
         lambda work, proc: ("%|" not in proc.stderr, "refused before sampling" if "%|" not in proc.stderr
                             else "refused only after sampling")),
    Case("sample --out is a file", SAMPLE + ["--out", "{W}/afile"], "refused"),
    Case("sample --out inside the data folder", ["sample", "--ckpt", "{W}/frun", "--n", "8", "--out", "{W}/folder/s"],
         "refused"),
    Case("sample --batch 0", SAMPLE + ["--out", "{W}/b0", "--batch", "0"], "refused"),
    Case("sample --batch -3", SAMPLE + ["--out", "{W}/b3", "--batch", "-3"], "refused"),
    Case("sample --threshold-percentile alone", SAMPLE + ["--out", "{W}/tp", "--threshold-percentile", "0.99"], "refused"),
    Case("sample --clip-denoised -1", SAMPLE + ["--out", "{W}/cd", "--clip-denoised", "-1"], "refused"),
    Case("sample a sidecar with a non-integer step", ["sample", "--ckpt", "{W}/bad-sidecar", "--out", "{W}/bs"], "refused",
         setup=break_sidecar),
    Case("sample --device cpu", SAMPLE + ["--out", "{W}/dev", "--device", "cpu"], "ok"),
    Case("eval --n 0", ["eval", "--ckpt", "{W}/run", "--n", "0"], "refused"),
    Case("eval --nfe 0", ["eval", "--ckpt", "{W}/run", "--nfe", "0"], "refused"),
    Case("eval --n 5 warns", ["eval", "--ckpt", "{W}/run", "--n", "5"], "ok", stderr_says("warn")),
    Case("train --set model.family=rf", ["train", "digits", "--out", "{W}/fam", "--steps", "5", "--set", "model.family=rf",
                                         "--no-progress"], "ok", family_taken),
    Case("train data.size=2048", ["train", "digits", "--out", "{W}/big", "--steps", "5", "--set",
                                  "data.name={W}/folder", "--set", "data.size=2048", "--no-progress"], "refused"),
    Case("train on a folder with an unreadable file", ["train", "digits", "--out", "{W}/frun", "--steps", "20", "--set",
                                                       "data.name={W}/folder", "--set", "data.size=8", "--no-progress"],
         "ok", stderr_says("broken.png")),
    Case("eval a folder run", ["eval", "--ckpt", "{W}/frun", "--n", "200"], "ok"),
    Case("train --resume with another width", ["train", "--resume", "{W}/run", "--steps", "70", "--set",
                                               "model.net_options.width=64", "--no-progress"], "refused"),
    Case("train SIGTERM", ["train", "digits", "--out", "{W}/term", "--steps", "100000", "--no-progress"], "refused",
         sigterm_checkpoint),
    # added with issue 12's CLI features (engineer H2)
    Case("sample --png --gif --dtype float64 metadata", SAMPLE + ["--out", "{W}/meta", "--png", "--gif", "--dtype",
                                                                  "float64", "--nfe", "8"], "ok",
         lambda work, proc: (lambda m: (m["nfe"] == 8 and m["dtype"] == "float64" and m["seed"] == 0
                                        and len(os.listdir(os.path.join(work, "meta", "png"))) == 64
                                        and os.path.isfile(os.path.join(work, "meta", "trajectory.gif")),
                                        f"samples.json: {m['sampler']}, {m['nfe']} NFE, {m['spacing']}"))(
             json.load(open(os.path.join(work, "meta", "samples.json"))))),
    Case("samplers lists every sampler", ["samplers"], "ok",
         lambda work, proc: ("heun" in proc.stdout and "euler_maruyama" in proc.stdout, "")),
    Case("eval --out is a folder", ["eval", "--ckpt", "{W}/run", "--out", "{W}"], "refused"),
    Case("train --out inside the data folder", ["train", "digits", "--out", "{W}/folder/run", "--steps", "5", "--set",
                                                "data.name={W}/folder", "--set", "data.size=8", "--no-progress"],
         "refused"),
    Case("train --out is a file", ["train", "digits", "--out", "{W}/afile", "--steps", "5", "--no-progress"], "refused"),
    Case("train data.heldout on digits", ["train", "digits", "--out", "{W}/ho", "--steps", "5", "--set",
                                          "data.heldout=0.3", "--no-progress"], "refused"),
    Case("train a folder with data.strict=true", ["train", "digits", "--out", "{W}/strict", "--steps", "5", "--set",
                                                  "data.name={W}/folder", "--set", "data.size=8", "--set",
                                                  "data.strict=true", "--no-progress"], "refused"),
    Case("sample --dtype float16", SAMPLE + ["--out", "{W}/f16", "--dtype", "float16"], "refused"),
]


def run_case(case: Case, work: str) -> dict:
    if case.setup:
        case.setup(work)
    for flag, value in zip(case.argv, case.argv[1:]):  # a case's own output starts empty, so the bench reruns
        out = value.replace("{W}", work)
        if flag == "--out" and os.path.dirname(out) == work and os.path.basename(out) not in ("run", "folder"):
            shutil.rmtree(out, ignore_errors=True)
    before = folder_files(work)
    sig = (8.0, signal.SIGTERM) if "SIGTERM" in case.name else None
    proc, seconds = cli(case.argv, work, signal_after=sig)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if case.expect == "refused":  # one line of ours: no traceback, no raw exception passed through
        raw = re.search(r"\b[A-Z]\w*(Error|Exception): |run with --debug", last)
        passed = proc.returncode != 0 and "Traceback" not in proc.stderr and bool(last) and raw is None
    else:
        passed = proc.returncode == 0
    note = ""
    if passed and case.check is not None:
        try:
            passed, note = case.check(work, proc)
        except Exception as err:  # a check that cannot run is a failed check
            passed, note = False, f"check failed: {type(err).__name__}: {err}"
    left = sorted(os.path.relpath(p, work) for p in folder_files(work) - before) + temporary_files(work)
    return {"case": case.name, "exit": proc.returncode, "seconds": round(seconds, 1), "passed": passed,
            "message": last.replace(work, "W")[:220], "note": note, "left": left[:5]}


def table(rows) -> str:
    out = ["| case | exit | s | pass | message (last stderr line) | check | files left behind |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        msg = r["message"].replace("|", "\\|")
        out.append(f"| {r['case']} | {r['exit']} | {r['seconds']} | {'yes' if r['passed'] else '**no**'} | {msg} | "
                   f"{r['note']} | {', '.join(r['left']) or '-'} |")
    out.append(f"\n{sum(r['passed'] for r in rows)} of {len(rows)} cases pass")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "robustness"))
    ap.add_argument("--only", default="", help="run the cases whose name contains this text")
    ap.add_argument("--fresh", action="store_true", help="rebuild the fixtures")
    ap.add_argument("--tree", default=ROOT, help="run the CLI of the unifuse package under this folder (e.g. an "
                                                  "older commit extracted by bench/equivalence.py)")
    args = ap.parse_args(argv)
    TREE[0] = os.path.abspath(args.tree)
    work = os.path.abspath(args.work)
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    make_fixtures(work)
    cases = [c for c in CASES if args.only in c.name]
    # the folder run is a fixture of later cases: run its case first
    cases.sort(key=lambda c: 0 if "unreadable" in c.name else 1)
    rows = []
    for case in cases:
        rows.append(run_case(case, work))
        r = rows[-1]
        print(f"{'PASS' if r['passed'] else 'FAIL'} {r['case']}: exit {r['exit']}, {r['seconds']} s; {r['message'][:120]} "
              f"{r['note']}", file=sys.stderr)
    text = table(rows)
    print(text)
    with open(os.path.join(work, "report.md"), "w") as fh:
        fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
