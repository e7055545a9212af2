"""Network speed and learning speed on CPU: parameters and training steps per second (batch 128, forward + backward
+ AdamW) at 1 and 2 threads, float32 and bf16 autocast; and, with --learn, the Frechet distance (shipped digits
classifier) of 500 samples after a fixed number of rectified-flow training steps, to compare architectures.

    python bench/nets.py                                 # speed table for unet-digits, unet-mnist, dit-digits
    python bench/nets.py --learn 600 --every 200         # + learning curves of the digits nets (slow)

Steps/s are wall-clock; "cpu" columns divide by the process's CPU time instead, which is what an idle machine
would show when the machine is shared (1-thread runs). Prints markdown tables; the recorded results and their
discussion are in docs/benchmarks/nets.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from unifuse.nets import NET_PRESETS, build_net, num_params  # noqa: E402

SPEED_NETS = ("unet-digits", "unet-mnist", "dit-digits", "dit-mnist", "mlp-toy")
LEARN_NETS = (("unet-digits", {}), ("unet-digits", {"num_res_blocks": 2}), ("dit-digits", {}))  # (preset, overrides)


def example_batch(name: str, batch: int):
    family, kw = NET_PRESETS[name]
    shape = (kw["dim"],) if family == "mlp" else (kw["in_channels"], kw["resolution"], kw["resolution"])
    return torch.randn(batch, *shape), torch.rand(batch) * 1000


def steps_per_second(name: str, threads: int, precision: str, steps: int, batch: int = 128) -> tuple[float, float]:
    """(wall-clock, CPU-time) training steps per second of a fresh net on random data."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_net(name)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, t = example_batch(name, batch)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            wall, cpu = time.perf_counter(), time.process_time()
        with autocast:
            loss = (net(x, t).float() - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - wall), steps / (time.process_time() - cpu)


def learning_curve(name: str, steps: int, every: int, overrides: dict | None = None, log=print) -> list[dict]:
    """Rectified-flow training on digits (velocity prediction, logit-normal t, AdamW 1e-3, EMA 0.999, batch 128);
    FD of 500 EMA samples (20 Euler steps) to the train split every `every` steps."""
    from unifuse.data import load_dataset
    from unifuse.metrics import evaluate_images

    torch.set_num_threads(1)
    data = load_dataset("digits", "train").images
    torch.manual_seed(0)
    net = build_net(name, **(overrides or {}))
    ema = copy.deepcopy(net).eval()
    label = name + "".join(f" {k}={v}" for k, v in (overrides or {}).items())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def sample(n=500, nfe=20):
        x = torch.randn(n, *data.shape[1:], generator=torch.Generator().manual_seed(1))
        ts = torch.linspace(1, 0, nfe + 1)
        for i in range(nfe):
            x = x + (ts[i + 1] - ts[i]) * ema(x, torch.full((n,), 1000 * float(ts[i])))
        return x

    rows, cpu = [], 0.0
    for step in range(1, steps + 1):
        c0 = time.process_time()
        x = data[torch.randint(0, len(data), (128,), generator=g)]
        noise = torch.randn(x.shape, generator=g)
        t = torch.sigmoid(torch.randn(128, generator=g))
        tt = t[:, None, None, None]
        loss = (net((1 - tt) * x + tt * noise, 1000 * t) - (noise - x)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - d)
        cpu += time.process_time() - c0
        if step % every == 0:
            r = evaluate_images(sample(), "digits")
            rows.append(dict(net=label, params=num_params(net), step=step, cpu_s=cpu, fd=r["fd"],
                             precision=r["precision"], recall=r["recall"]))
            log(f"{label} step {step} cpu {cpu:.0f}s fd {r['fd']:.2f} precision {r['precision']:.2f} "
                f"recall {r['recall']:.2f}")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", nargs="*", default=list(SPEED_NETS))
    p.add_argument("--steps", type=int, default=0, help="timed steps (default: 6 at 8x8, 3 at 32x32, 20 for the MLP)")
    p.add_argument("--learn", type=int, default=0, help="also train the digits nets this many steps")
    p.add_argument("--every", type=int, default=200)
    args = p.parse_args()

    lines = ["| net | params | 1 thread fp32 | 1 thread bf16 | 2 threads fp32 | 2 threads bf16 |",
             "|---|---|---|---|---|---|"]
    for name in args.nets:
        family, kw = NET_PRESETS[name]
        steps = args.steps or (20 if family == "mlp" else 6 if kw["resolution"] <= 8 else 3)
        cells = []
        for threads in (1, 2):
            for precision in ("fp32", "bf16"):
                wall, cpu = steps_per_second(name, threads, precision, steps)
                cells.append(f"{wall:.2f} ({cpu:.2f} cpu)" if threads == 1 else f"{wall:.2f}")
                print(name, threads, precision, f"{wall:.2f} steps/s wall, {cpu:.2f} per CPU-second", flush=True)
        lines.append(f"| {name} | {num_params(build_net(name)) / 1e6:.2f}M | " + " | ".join(cells) + " |")
    speed = "\n".join(lines)
    load = os.getloadavg()[0]
    learn = ""
    if args.learn:
        rows = [r for name, over in LEARN_NETS for r in learning_curve(name, args.learn, args.every, over)]
        learn = "\n".join(["| net | params | step | CPU s | FD (500 samples) | precision | recall |",
                           "|---|---|---|---|---|---|---|"]
                          + [f"| {r['net']} | {r['params'] / 1e6:.2f}M | {r['step']} | {r['cpu_s']:.0f} | "
                             f"{r['fd']:.2f} | {r['precision']:.2f} | "
                             f"{r['recall']:.2f} |" for r in rows])
    print(speed)
    print(learn)
    print(f"load average at the end of the speed runs: {load:.1f}")


if __name__ == "__main__":
    main()
