"""Before and after a refactor: the same calls must give bit-identical results.

    python bench/equivalence.py --against 7f5b063              # every part, old commit against the working tree
    python bench/equivalence.py --against 7f5b063 --only sample,likelihood
    python bench/equivalence.py --record out.json              # record the importable unifuse only

Parts:
  sample      ~400 `uf.sample` calls (every sampler on 10 path/prediction pairs, fp32 and fp64, several NFEs,
              spacings and generator forms, guided, autoguided, classifier-guided, thresholded, re-expressed
              with `model.on`), low-level `sample_*` calls on explicit grids, `model.predict` in every kind,
              and the error message of every refused call;
  objective   the per-sample loss of every objective on fixed draws;
  likelihood  `uf.log_likelihood` (exact and Hutchinson, dopri5 and rk4), `uf.bits_per_dim` and the DDPM VLB;
  train       fixed 200-step training runs in fp32 (digits EDM, iDDPM with learned variances, consistency training,
              class-conditional, a toy set) and 20 steps of digits in bf16 autocast: the SHA-256 of every
              checkpointed tensor and every logged loss.
Each result is a SHA-256 of the output bytes (dtype and shape included), a list of numbers written with repr,
or the text of the error. `--against REV` extracts REV with `git archive` under runs/equivalence/, records it
there once (cached per commit), records the working tree, and prints every case whose result differs.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("sample", "objective", "likelihood", "train")
F64 = torch.float64


def digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def run_case(fn):
    """The digest of fn()'s tensors, or the error it raised (type and message)."""
    import unifuse as uf

    torch.manual_seed(0)  # draws from the global generator do not depend on which cases ran before
    try:
        out = fn()
    except (uf.UnifuseError, ValueError, TypeError, RuntimeError) as err:
        return f"error {type(err).__name__}: {err}"
    if isinstance(out, torch.Tensor):
        return digest(out)
    if isinstance(out, (list, tuple)):
        return [run_case(lambda v=v: v) if isinstance(v, torch.Tensor) else repr(v) for v in out]
    return repr(out)


# --- models -------------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """A small MLP net(x, t) for [B, 4] data (out_mult=2: learned-variance output)."""

    def __init__(self, out_mult: int = 1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(5, 32, generator=g) * 0.5)
        self.w2 = nn.Parameter(torch.randn(32, 4 * out_mult, generator=g) * 0.2)

    def forward(self, x, t, class_labels=None):
        h = torch.cat([x, t.reshape(-1, 1).to(x.dtype).expand(x.shape[0], 1)], 1)
        return torch.tanh(h @ self.w1.to(x.dtype)) @ self.w2.to(x.dtype)


def models():
    """name -> DiffusionModel over [B, 4] data."""
    import unifuse as uf
    from unifuse.testing import GaussianMixture

    gm = GaussianMixture([0.4, 0.6], [[0.8, -0.4, 0.3, 0.0], [-0.6, 0.5, -0.2, 0.4]], [[0.3], [0.2]])
    P = uf.paths.get
    out = {f"{p}/{k}": gm.model(P(p), k, conditional=True)
           for p, k in [("vp-linear", "eps"), ("ddpm-linear", "eps"), ("edm", "edm"), ("rf", "velocity"),
                        ("trigflow", "trigflow"), ("vp-cosine", "v"), ("ve", "x0"), ("vp-linear", "score")]}
    out["rf/velocity.on(vp-linear)"] = out["rf/velocity"].on(P("vp-linear"))
    edm = P("edm")
    out["edm/consistency-net"] = uf.DiffusionModel(TinyNet(seed=1), edm, "consistency", time_input=edm.c_noise)
    cos = P("ddpm-cosine")
    out["ddpm-cosine/eps-net-learned-var"] = uf.DiffusionModel(TinyNet(2, seed=2), cos, "eps", time_input=cos.c_noise,
                                                               scale_input=True, learned_variance=True)
    return out, gm


# --- part: sample -------------------------------------------------------------------------------------------
NFES = {"adaptive": 400, "consistency": 2, "pc": 8}


def sample_cases(results: dict) -> None:
    import unifuse as uf

    ms, gm = models()
    labels = torch.tensor([0, 1, -1, 0, 1, 1])
    for dtype in (torch.float32, F64):
        noise = torch.randn(6, 4, generator=torch.Generator().manual_seed(7), dtype=F64).to(dtype)
        for mname, model in ms.items():
            for s in uf.samplers.available():
                key = f"sample {s} {mname} {dtype}"
                results[key] = run_case(lambda: uf.sample(model, noise, s, nfe=NFES.get(s, 7), generator=3))
        model = ms["edm/edm"]
        for s in ("ddim", "heun", "dpmpp_2m", "unipc", "euler_maruyama", "dpm_solver_3", "ipndm", "dpmpp_3m"):
            for nfe in (1, 2, 5, 20):
                for spacing in ("uniform", "karras", "logsnr", "trailing", "shift"):
                    key = f"nfe/spacing {s} {nfe} {spacing} {dtype}"
                    results[key] = run_case(lambda: uf.sample(model, noise, s, nfe=nfe, spacing=spacing, generator=5))
        for mname in ("vp-linear/eps", "trigflow/trigflow", "ddpm-cosine/eps-net-learned-var"):
            for s in ("dpmpp_2m", "heun", "ddim", "dpmpp_2m_sde", "ddpm"):
                key = f"guided {s} {mname} {dtype}"
                results[key] = run_case(lambda: uf.sample(ms[mname], noise, s, nfe=6, generator=1, guidance=2.5,
                                                          cond={"class_labels": labels}))
                key = f"guided-interval {s} {mname} {dtype}"
                results[key] = run_case(lambda: uf.sample(
                    uf.guidance.classifier_free(ms[mname], 3.0, interval=(0.2, 2.0), rescale=0.5, kind="eps"),
                    noise, s, nfe=6, generator=1, cond={"class_labels": labels}))
                key = f"thresholded {s} {mname} {dtype}"
                results[key] = run_case(lambda: uf.sample(uf.thresholding.threshold(ms[mname], 0.5), noise, s,
                                                          nfe=6, generator=2))
                key = f"thresholded-dyn {s} {mname} {dtype}"
                results[key] = run_case(lambda: uf.sample(uf.thresholding.threshold(ms[mname], 0.5, 0.9), noise, s,
                                                          nfe=6, generator=2))
        weak = gm.model(uf.paths.get("vp-linear"), "x0")
        for s in ("dpmpp_2m", "heun"):
            results[f"autoguided {s} {dtype}"] = run_case(lambda: uf.sample(
                uf.guidance.autoguidance(ms["vp-linear/eps"], weak.on(uf.paths.get("vp-linear")), 2.0),
                noise, s, nfe=6))

            def classifier(x, t):
                return torch.stack([x.sum(1), -x.sum(1)], 1) * (1 + t.to(x.dtype).reshape(-1, 1))

            results[f"classifier-guided {s} {dtype}"] = run_case(lambda: uf.sample(
                uf.guidance.classifier_guidance(ms["vp-linear/eps"], classifier, 1.5), noise, s, nfe=6,
                cond={"class_labels": labels}))
        low_level_cases(results, ms, noise, dtype)
        generator_cases(results, ms["edm/edm"], noise, dtype)
    predict_cases(results, ms)
    error_cases(results, ms)


def low_level_cases(results, ms, noise, dtype):
    import unifuse as uf

    for mname in ("vp-linear/eps", "rf/velocity", "edm/edm"):
        model = ms[mname]
        ts = uf.paths.time_grid(model.path, 6, "uniform", t_max=float(model.t_max) * 0.9)
        x = noise * float(model.path.sigma(ts[:1])[0])
        for name in ("euler", "heun", "ddim", "dpmpp_2m", "dpm_solver_2", "unipc", "midpoint", "dpmpp_3m"):
            fn = getattr(uf.samplers, f"sample_{name}")
            results[f"low-level {name} {mname} {dtype}"] = run_case(lambda: fn(model, x, ts))
        for s in ("heun", "euler", "ddim"):
            results[f"user-grid {s} {mname} {dtype}"] = run_case(lambda: uf.sample(model, noise, s, spacing=ts))
        out, traj = uf.sample(model, noise, "heun", nfe=5, return_trajectory=True)
        results[f"trajectory {mname} {dtype}"] = [digest(v) for v in traj.states + traj.denoised] + [digest(out)]


def generator_cases(results, model, noise, dtype):
    import unifuse as uf

    for s in ("euler_maruyama", "dpmpp_2m_sde", "edm_stochastic", "pc", "ddpm", "ddim"):
        gens = {"int": 11, "list": [1, 2, 3, 4, 5, 6], "torch": torch.Generator().manual_seed(4),
                "torch-list": [torch.Generator().manual_seed(i) for i in range(6)]}
        for gname, g in gens.items():
            opts = {"S_churn": 10.0} if s == "edm_stochastic" else {"eta": 1.0} if s == "ddim" else {}
            results[f"generator {s} {gname} {dtype}"] = run_case(
                lambda: uf.sample(model, noise, s, nfe=NFES.get(s, 7), generator=g, **opts))


def predict_cases(results, ms):
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    for mname, model in ms.items():
        for t in (0.3, 0.7):
            tt = float(model.t_eps) + t * (float(model.t_max) - float(model.t_eps))
            for kind in ("eps", "x0", "v", "score", "velocity", "edm", "trigflow"):
                results[f"predict {kind} {mname} {t}"] = run_case(lambda: model.predict(x, tt, kind))
                results[f"predict32 {kind} {mname} {t}"] = run_case(lambda: model.predict(x.float(), tt, kind))


def error_cases(results, ms):
    import unifuse as uf

    m, noise = ms["vp-linear/eps"], torch.randn(3, 4)
    cases = {
        "nfe 0": lambda: uf.sample(m, noise, "heun", nfe=0),
        "nfe float": lambda: uf.sample(m, noise, "heun", nfe=2.5),
        "unknown sampler": lambda: uf.sample(m, noise, "dpm++", nfe=3),
        "unknown spacing": lambda: uf.sample(m, noise, "ddim", nfe=3, spacing="cosine"),
        "bad option": lambda: uf.sample(m, noise, "heun", nfe=3, eta=1.0),
        "int noise": lambda: uf.sample(m, torch.ones(3, 4, dtype=torch.long), "heun", nfe=3),
        "increasing grid": lambda: uf.samplers.sample_euler(m, noise, torch.tensor([0.1, 0.5, 0.9])),
        "grid cost": lambda: uf.sample(m, noise, "heun", nfe=9, spacing=torch.tensor([0.9, 0.5, 0.1, 0.0])),
        "eps at zero snr": lambda: uf.samplers.sample_euler(ms["rf/velocity"].on(uf.paths.get("rf")), noise,
                                                            torch.tensor([1.0, 0.5, 0.0])),
        "eps model at rf noise end": lambda: uf.samplers.sample_euler(
            uf.DiffusionModel(TinyNet(), uf.paths.get("rf"), "eps"), noise, torch.tensor([1.0, 0.5, 0.0])),
        "wrong shape": lambda: uf.sample(m, torch.randn(3, 5), "heun", nfe=3),
        "generator count": lambda: uf.sample(m, noise, "euler_maruyama", nfe=3, generator=[1, 2]),
        "bad generator": lambda: uf.sample(m, noise, "euler_maruyama", nfe=3, generator="x"),
        "guidance on unconditional": lambda: uf.sample(uf.DiffusionModel(TinyNet(), uf.paths.get("edm"), "edm"),
                                                       noise, "heun", nfe=3, guidance=2.0),
        "class out of range": lambda: uf.sample(m, noise, "heun", nfe=3, guidance=2.0,
                                                cond={"class_labels": torch.tensor([5, 0, 1])}),
        "threshold limit": lambda: uf.thresholding.threshold(m, -1.0),
        "guidance interval": lambda: uf.guidance.classifier_free(m, 2.0, interval=(3.0, 1.0)),
        "net returns list": lambda: uf.sample(uf.DiffusionModel(lambda x, t: [x], uf.paths.get("edm"), "x0"),
                                              noise, "heun", nfe=3),
        "unknown prediction": lambda: uf.DiffusionModel(TinyNet(), uf.paths.get("edm"), "noise"),
        "t beyond on": lambda: ms["edm/edm"].on(uf.paths.get("rf")).evaluate(noise, torch.tensor(1.0)),
        "nan net": lambda: uf.sample(uf.DiffusionModel(lambda x, t: x * float("nan"), uf.paths.get("edm"), "x0"),
                                     noise, "heun", nfe=3),
    }
    for name, fn in cases.items():
        results[f"error {name}"] = run_case(fn)


# --- part: objective ----------------------------------------------------------------------------------------
def objective_cases(results: dict) -> None:
    import unifuse as uf

    P = uf.paths.get
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    pairs = {"ddpm": ("ddpm-linear", "eps", False), "hybrid": ("ddpm-cosine", "eps", True), "dsm": ("vp-linear", "eps", False),
             "edm": ("edm", "edm", False), "flow": ("rf", "velocity", False), "trigflow": ("trigflow", "trigflow", False),
             "ct": ("edm", "consistency", False), "regression": ("vp-cosine", "v", False)}
    for name, (p, kind, lv) in pairs.items():
        path = P(p)
        model = uf.DiffusionModel(TinyNet(2 if lv else 1), path, kind, time_input=path.c_noise, learned_variance=lv)
        loss = uf.objectives.get(name)
        results[f"objective {name}"] = run_case(lambda: loss(model, x, generator=torch.Generator().manual_seed(1)))
    for kind in ("eps", "x0", "v", "velocity", "score"):
        for weighting in ("uniform", "snr", "min_snr", "sigmoid", "edm"):
            path = P("vp-linear")
            model = uf.DiffusionModel(TinyNet(), path, kind)
            results[f"regression {kind} {weighting}"] = run_case(lambda: uf.objectives.get(
                "regression", target=kind, weighting=weighting)(model, x, generator=torch.Generator().manual_seed(2)))


# --- part: likelihood ---------------------------------------------------------------------------------------
def likelihood_cases(results: dict) -> None:
    import unifuse as uf
    from unifuse.vlb import ddpm_vlb

    ms, _ = models()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(9), dtype=F64) * 0.5
    for mname in ("vp-linear/eps", "edm/edm", "rf/velocity", "trigflow/trigflow", "rf/velocity.on(vp-linear)"):
        for div, solver in (("exact", "dopri5"), ("exact", "rk4"), ("hutchinson", "dopri5")):
            results[f"loglik {mname} {div} {solver}"] = run_case(lambda: uf.log_likelihood(
                ms[mname], x, divergence=div, solver=solver, steps=16, generator=torch.Generator().manual_seed(0)))
    images = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    results["bpd edm"] = run_case(lambda: uf.bits_per_dim(ms["edm/edm"], images, n_dequant=2,
                                                          generator=torch.Generator().manual_seed(5), solver="rk4",
                                                          steps=12))
    img = images.to(F64) / 127.5 - 1
    for mname in ("ddpm-cosine/eps-net-learned-var", "ddpm-linear/eps"):
        results[f"vlb {mname}"] = run_case(lambda: ddpm_vlb(ms[mname], img, steps=50))


# --- part: train --------------------------------------------------------------------------------------------
RUNS = {"digits": 200, "digits-iddpm": 200, "digits-ct": 200, "digits-cond": 200, "toy-moons": 200,
        "digits bf16": 20}  # preset (" bf16": in bf16 autocast) -> steps; fp32 otherwise: bf16 autocast
# is emulated, 25x slower, on CPUs without native bf16


def train_cases(results: dict) -> None:
    from safetensors.torch import load_file

    from unifuse.config import get_config
    from unifuse.training.loop import train

    for name, steps in RUNS.items():
        preset, bf16 = name.removesuffix(" bf16"), name.endswith(" bf16")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = get_config(preset, [f"train.steps={steps}", f"train.sample_every={steps // 2}",
                                      f"train.ckpt_every={steps // 2}", "train.log_every=10", "train.threads=1",
                                      "sample.grid=16", "train.device=cpu", f"train.precision={'bf16' if bf16 else 'fp32'}"])
            train(cfg, os.path.join(tmp, "run"), progress=False, log=lambda *a, **k: None)
            for f in sorted(glob.glob(os.path.join(tmp, "run", "ckpt", "*", "*.safetensors"))):
                rel = os.path.relpath(f, tmp)
                if os.path.basename(f) == "training.safetensors":
                    continue  # run bookkeeping (clocks) besides the RNG states
                tensors = load_file(f)
                results[f"train {name} {rel}"] = {k: digest(v) for k, v in sorted(tensors.items())}
            with open(os.path.join(tmp, "run", "metrics.jsonl")) as fh:
                losses = [json.loads(line).get("loss") for line in fh]
            results[f"train {name} losses"] = [repr(v) for v in losses]


def record(parts) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    results = {}
    for part, fn in (("sample", sample_cases), ("objective", objective_cases), ("likelihood", likelihood_cases),
                     ("train", train_cases)):
        if part in parts:
            start = time.time()
            fn(results)
            print(f"  {part}: {sum(k.split()[0] in PART_KEYS[part] for k in results)} cases in "
                  f"{time.time() - start:.0f} s", file=sys.stderr)
    return results


PART_KEYS = {"sample": {"sample", "nfe/spacing", "guided", "guided-interval", "thresholded", "thresholded-dyn",
                        "autoguided", "classifier-guided", "low-level", "user-grid", "trajectory", "generator",
                        "predict", "predict32", "error"},
             "objective": {"objective", "regression"}, "likelihood": {"loglik", "bpd", "vlb"}, "train": {"train"}}


# --- comparing two trees ------------------------------------------------------------------------------------
def record_tree(src: str, parts, out: str) -> dict:
    """Run this script's recording with the unifuse of folder `src` in a fresh process."""
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--record", out, "--only", ",".join(parts), "--check-import", src]
    subprocess.run(cmd, check=True, env=env, cwd=src)
    with open(out) as fh:
        return json.load(fh)


def extract(rev: str) -> tuple:
    sha = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    folder = os.path.join(ROOT, "runs", "equivalence", sha[:12])
    if not os.path.isdir(os.path.join(folder, "unifuse")):
        os.makedirs(folder, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "unifuse"], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return sha[:12], folder


def compare(old: dict, new: dict) -> list:
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if a != b:
            lines.append(f"DIFF {key}\n   before: {json.dumps(a)[:400]}\n   after:  {json.dumps(b)[:400]}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", help="a git revision to compare the working tree with")
    ap.add_argument("--record", help="only record the importable unifuse's results into this JSON file")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    ap.add_argument("--fresh", action="store_true", help="re-record the old revision even if cached")
    ap.add_argument("--check-import", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {PARTS}")
    if args.record:
        import unifuse

        if args.check_import and not os.path.abspath(unifuse.__file__).startswith(os.path.abspath(args.check_import)):
            raise SystemExit(f"imported {unifuse.__file__}, not the tree under {args.check_import}")
        results = record(parts)
        with open(args.record, "w") as fh:
            json.dump(results, fh, indent=0, sort_keys=True)
        return 0
    if not args.against:
        ap.error("give --against REV or --record FILE")
    sha, folder = extract(args.against)
    print(f"recording {args.against} ({sha}) ...", file=sys.stderr)
    old = {}
    for part in parts:  # cached per part and commit
        cache = os.path.join(folder, f"results-{part}.json")
        old.update(record_tree(folder, [part], cache) if args.fresh or not os.path.exists(cache) else json.load(open(cache)))
    print("recording the working tree ...", file=sys.stderr)
    new = record_tree(ROOT, parts, os.path.join(ROOT, "runs", "equivalence", f"working-tree-{os.getpid()}.json"))
    diffs = compare(old, new)
    os.remove(os.path.join(ROOT, "runs", "equivalence", f"working-tree-{os.getpid()}.json"))
    for line in diffs:
        print(line)
    n_err = sum(isinstance(v, str) and v.startswith("error") for v in old.values())
    print(f"{len(old)} cases ({n_err} of them refused calls whose messages are compared) recorded at {sha}; "
          f"{len(new)} in the working tree; {len(diffs)} differ")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
