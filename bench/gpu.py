"""The GPU path measured: training and sampling images/s of the U-Net and DiT presets in fp32, bf16 autocast,
bf16 + channels-last and + torch.compile, and a two-process DDP training run launched by torchrun.

    python bench/gpu.py --out docs/benchmarks            # on a GPU machine: the full table (gpu.json, gpu.md)
    python bench/gpu.py --device cpu --quick             # anywhere: tiny steps, proves every row runs

Training: the EDM objective on the preset's data shape (random images; the speed does not depend on their values),
AdamW, batch --batch; images/s = batch x steps / seconds after --warmup steps (torch.compile compiles during the
warm-up). Sampling: `uf.sample` with dpmpp_2m at --nfe evaluations; images/s = batch / seconds of one call after a
warm-up call. Both time with the device synchronised only at the ends (no host sync inside a step: the training
loop reads one number per step, `unifuse.training.loop`). DDP: `torchrun --standalone --nproc_per_node=2` on this
script (NCCL with two or more GPUs, else gloo on the CPU), the same training step on DistributedDataParallel,
global images/s. Results: JSON and a markdown table naming the device (the GPU's name), torch and unifuse versions.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import unifuse as uf  # noqa: E402
from unifuse.io import write_json, write_text  # noqa: E402

NETS = {"unet-mnist": (1, 32), "dit-mnist": (1, 32)}       # preset -> (channels, resolution) of its data
VARIANTS = ("fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(net_name: str, variant: str, device: torch.device, env=None):
    """(the network's parameters' module, the DiffusionModel over it as run: compiled, DDP-wrapped when env is
    distributed, autocast context, memory format) for one variant."""
    from unifuse.nets import build_net
    from unifuse.training import distributed

    torch.manual_seed(0)
    net = build_net(net_name).to(device)
    fmt = torch.channels_last if "channels_last" in variant else torch.contiguous_format
    net = net.to(memory_format=fmt)
    run_net = torch.compile(net) if "compile" in variant else net
    run_net = distributed.wrap(run_net, env) if env is not None else run_net
    path = uf.paths.get("edm")
    model = uf.DiffusionModel(run_net, path, "edm", time_input=path.c_noise)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in variant else contextlib.nullcontext()
    return net, model, autocast, fmt


def train_rate(net_name, variant, device, batch, steps, warmup, env=None) -> float:
    """Training images/s (global over processes when env is distributed)."""
    net, model, autocast, fmt = build(net_name, variant, device, env)
    c, r = NETS[net_name]
    model.train()
    objective = uf.objectives.get("edm")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, c, r, r, device=device).contiguous(memory_format=fmt)
    gen = torch.Generator(device).manual_seed(0)

    def step():
        with autocast:
            loss = objective(model, x, None, generator=gen).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss.detach()).item():
        raise RuntimeError(f"{net_name} {variant}: the loss is not finite")
    world = env.world if env else 1
    return batch * steps * world / seconds


@torch.no_grad()
def sample_rate(net_name, variant, device, batch, nfe) -> float:
    """Sampling images/s of one `uf.sample` call (dpmpp_2m, nfe evaluations) after a warm-up call."""
    _, model, autocast, fmt = build(net_name, variant, device)
    model.eval()
    c, r = NETS[net_name]
    noise = torch.randn(batch, c, r, r, device=device).contiguous(memory_format=fmt)
    plan = uf.samplers.Plan()
    with autocast:
        uf.sample(model, noise, "dpmpp_2m", nfe=nfe, plan=plan)
        sync(device)
        start = time.perf_counter()
        out = uf.sample(model, noise, "dpmpp_2m", nfe=nfe, plan=plan)
        sync(device)
    if not torch.isfinite(out).all():
        raise RuntimeError(f"{net_name} {variant}: non-finite samples")
    return batch / (time.perf_counter() - start)


def measure(args, device) -> list:
    rows = []
    for net_name in args.nets:
        for variant in args.variants:
            row = {"net": net_name, "variant": variant}
            try:
                row["train_images_per_s"] = round(train_rate(net_name, variant, device, args.batch, args.steps,
                                                             args.warmup), 2)
                row["sample_images_per_s"] = round(sample_rate(net_name, variant, device, args.sample_batch,
                                                               args.nfe), 2)
            except Exception as err:  # a variant the machine cannot run (e.g. compile without a compiler): say so
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def ddp_child(args) -> None:
    """One torchrun process: the same training step under DistributedDataParallel; rank 0 prints the rate."""
    from unifuse.training import distributed

    env = distributed.setup(args.device)
    try:
        rate = train_rate(args.nets[0], args.variants[0], env.device, args.batch // env.world, args.steps,
                          args.warmup, env)
        if env.main:
            print("DDP " + json.dumps({"images_per_s": round(rate, 2), "world": env.world, "backend": env.backend,
                                       "device": str(env.device)}), flush=True)
    finally:
        distributed.teardown(env)


def ddp(args, device) -> dict:
    """Launch two processes with torchrun (NCCL on >= 2 GPUs, else gloo on the CPU) and read rank 0's rate."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    child_device = "cuda" if gpus >= 2 else "cpu"
    variant = "bf16" if child_device == "cuda" else "fp32"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.abspath(__file__),
           "--ddp-child", "--device", child_device, "--nets", args.nets[0], "--variants", variant,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.ddp_timeout, env=env, cwd=ROOT)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("DDP ")), None)
    if done.returncode != 0 or line is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"net": args.nets[0], "variant": variant, "error": f"torchrun exit {done.returncode}: {' | '.join(tail)}"}
    out = json.loads(line[4:])
    note = "" if child_device == "cuda" else (" (one GPU: NCCL needs a GPU per process, so gloo on the CPU)"
                                                if device.type == "cuda" else "")
    return dict(net=args.nets[0], variant=variant, note=note, **out)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({torch.cuda.device_count()} visible)"
    import platform

    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def markdown(report: dict) -> str:
    quick = "; --quick (tiny steps: a check that every row runs, not a measurement)" if report["quick"] else ""
    lines = [f"# GPU path: images/s on {report['device']}", "",
             f"torch {report['torch']}, unifuse {report['unifuse']}; training batch {report['batch']}, {report['steps']} "
             f"timed steps after {report['warmup']}; sampling batch {report['sample_batch']}, dpmpp_2m at "
             f"{report['nfe']} NFE{quick}.",
             "", "| network | variant | training images/s | sampling images/s |", "|---|---|---:|---:|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['net']} | {r['variant']} | failed: {r['error']} | |")
        else:
            lines.append(f"| {r['net']} | {r['variant']} | {r['train_images_per_s']:.1f} | "
                         f"{r['sample_images_per_s']:.1f} |")
    d = report.get("ddp")
    if d:
        lines += ["", "| DDP (torchrun, 2 processes) | variant | backend | device | training images/s (global) |",
                  "|---|---|---|---|---:|"]
        value = f"{d['images_per_s']:.1f}" if "images_per_s" in d else f"failed: {d['error']}"
        lines.append(f"| {d['net']} | {d['variant']} | {d.get('backend', '')} | {d.get('device', '')}{d.get('note', '')} "
                     f"| {value} |")
    return "\n".join(lines) + "\n"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny steps: proves every row runs")
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sample-batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--no-ddp", action="store_true")
    p.add_argument("--ddp-timeout", type=float, default=600.0)
    p.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-gpu"))
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.sample_batch, args.steps, args.warmup, args.nfe = 4, 4, 2, 1, 2
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.ddp_child:
        ddp_child(args)
        return 0
    device = torch.device(args.device)
    report = {"device": describe(device), "torch": torch.__version__, "unifuse": uf.__version__, "quick": args.quick,
              **{k: getattr(args, k) for k in ("batch", "sample_batch", "steps", "warmup", "nfe")}}
    report["rows"] = measure(args, device)
    if not args.no_ddp:
        report["ddp"] = ddp(args, device)
        print(json.dumps(report["ddp"]), flush=True)
    name = "gpu-quick" if args.quick else "gpu"
    write_json(os.path.join(args.out, f"{name}.json"), report)
    write_text(os.path.join(args.out, f"{name}.md"), markdown(report))
    print(f"wrote {os.path.join(args.out, name)}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
