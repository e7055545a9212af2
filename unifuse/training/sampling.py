"""Many samples from a trained model in batches, as the CLI, the training grids and the benchmarks need them.

`generate` draws the noise batch by batch from one seeded generator per sample (sample i depends only on
(seed, i), whatever the batch size), picks the condition (a class, balanced
classes, or a prompt), applies classifier-free guidance when asked, and calls `uf.sample` with the run's
sampler settings (a `SampleConfig`, `cfg.sample`) or the caller's. It takes the built model, the sampler
settings and what it needs to know of the data (the checkpoint's data info and the run's conditioning),
never a whole training config. A latent model's samples are decoded here, in one place: the data info names the
codec (`info["latent"]`, loaded by `load_model`), and the caller gets images of the pixel shape.
"""
from __future__ import annotations

import torch

from ..errors import UnifuseError


def condition_for(model, info: dict, conditioning: str, n: int, *, class_label=None, prompt=None, device="cpu"):
    """(cond dict or None, labels [n] or None) for n samples of a run with data.cond = `conditioning`."""
    kind = conditioning
    if prompt is not None:
        if kind != "text":
            raise UnifuseError("--prompt needs a caption-conditional model (e.g. digits-text); this run has "
                               f"data.cond={kind!r}")
        from ..data.text import encode

        emb = encode([prompt], device=device)
        return {"text": emb.tokens.expand(n, -1, -1), "text_mask": emb.mask.expand(n, -1)}, None
    if kind == "none" and _classifier_guided(model):  # classifier guidance: class labels for an unconditional net
        kind = "class"
    if class_label is not None:
        k = info.get("num_classes", 0)
        if kind != "class":
            raise UnifuseError("--class needs a class-conditional model (e.g. digits-cond) or --classifier DIR; this "
                               "run "
                               f"has data.cond={kind!r}")
        if not 0 <= int(class_label) < k:
            raise UnifuseError(f"--class must be in 0..{k - 1}, got {class_label}")
        labels = torch.full((n,), int(class_label), dtype=torch.long)
        return {"class_labels": labels.to(device)}, labels
    if kind == "class":  # balanced classes, so sample statistics match the data's
        labels = torch.arange(n) % info["num_classes"]
        return {"class_labels": labels.to(device)}, labels
    if kind == "text" and info.get("captions"):  # a captioned image folder: its own captions, in turn
        from ..data.text import encode

        caps = info["captions"]
        emb = encode([caps[i % len(caps)] for i in range(n)], device=device)
        return {"text": emb.tokens, "text_mask": emb.mask}, None
    if kind == "text":  # digit captions: sample i's class and template depend only on i
        from ..data.captions import sample_captions
        from ..data.text import encode

        labels = torch.arange(n) % info["num_classes"]
        emb = encode(sample_captions(labels, "heldout"), device=device)
        return {"text": emb.tokens, "text_mask": emb.mask}, labels
    return None, None


def _classifier_guided(model) -> bool:
    """True when `model` or a model it wraps applies classifier guidance."""
    from ..guidance import ClassifierGuided

    for _ in range(16):
        if isinstance(model, ClassifierGuided):
            return True
        model = getattr(model, "inner", None)
        if model is None:
            return False
    return False


def sampling_model(model, sample_cfg, cond, *, guidance=None, guidance_options=None, clip_denoised=None,
                   threshold_percentile=None):
    """`model` with classifier-free guidance (when asked) and then the run's or the caller's thresholding."""
    if guidance is not None and cond is None:
        raise UnifuseError("--guidance needs a conditional model and a condition (--class or --prompt, or a "
                           "class-conditional run)")
    if guidance is not None:  # wrapped once for every batch, and before the threshold (which clips the guided x0)
        from ..guidance import classifier_free

        model = classifier_free(model, float(guidance), **(guidance_options or {}))
    clip = float(sample_cfg.clip_denoised if clip_denoised is None else clip_denoised)
    percentile = float(sample_cfg.threshold_percentile if threshold_percentile is None else threshold_percentile)
    if clip < 0:
        raise UnifuseError(f"--clip-denoised must be >= 0 (0 = off, 1 = images in [-1, 1]), got {clip:g}")
    if not 0.0 <= percentile < 1.0:
        raise UnifuseError(f"--threshold-percentile must be in [0, 1) (e.g. 0.995), got {percentile:g}")
    if percentile > 0 and clip == 0:
        raise UnifuseError(f"--threshold-percentile {percentile:g} thresholds the clipped denoised estimate, but "
                           "clipping is off for this run; add --clip-denoised 1")
    if clip > 0:
        from ..guidance import threshold

        model = threshold(model, clip, percentile if percentile > 0 else None)
    return model


def generate(model, sample_cfg, info: dict, n: int, *, conditioning: str, seed: int = 0, device="cpu",
             batch: int = 500, sampler=None, nfe=None, spacing=None, class_label=None, prompt=None, guidance=None,
             guidance_options=None, clip_denoised=None, threshold_percentile=None, progress: bool = False,
             dtype=torch.float32, trajectory: bool = False, codec=None, decode: bool = True):
    """(samples [n, *shape] in data units, labels [n] or None) from `model` with the sampler settings
    `sample_cfg` (a run's `cfg.sample`) unless overridden; conditioning is the run's data.cond.
    clip_denoised > 0 (default: sample_cfg.clip_denoised) clips the denoised estimate to that range after any
    guidance, dynamically at quantile threshold_percentile when that is > 0 (`unifuse.thresholding`).
    Sample i (its noise, its stochastic steps, its label or caption) depends only on (seed, i), whatever `batch`.
    dtype: the sampling precision (float32 or float64). trajectory=True adds a third result, the first batch's
    `uf.sample` Trajectory (for a GIF). A latent run (info["latent"]): the samples (and the trajectory's first 64)
    are decoded to images by `codec` (default: the one the data info names, `unifuse.latent.find_codec`) unless
    decode=False, which returns the latents."""
    from tqdm.auto import tqdm

    from ..latent import find_codec
    from ..samplers import Plan, generators, randn
    from ..sampling import sample

    codec = (codec or find_codec(info)) if decode and info.get("latent") else None  # before any work
    if batch < 1:
        raise UnifuseError(f"--batch must be >= 1 (samples per sampler call), got {batch}; e.g. --batch 500")
    sampler = sampler or sample_cfg.sampler
    nfe = int(nfe or sample_cfg.nfe)
    spacing = spacing if spacing is not None else sample_cfg.spacing
    cond, labels = condition_for(model, info, conditioning, n, class_label=class_label, prompt=prompt, device=device)
    model = sampling_model(model, sample_cfg, cond, guidance=guidance, guidance_options=guidance_options,
                           clip_denoised=clip_denoised, threshold_percentile=threshold_percentile)
    model = model.to(device=device, dtype=dtype) if isinstance(model, torch.nn.Module) else model
    shape, out, path = tuple(info["shape"]), [], None
    plan = Plan()  # the grid and its set-up work, made once for all batches
    with torch.no_grad():
        for lo in tqdm(range(0, n, batch), disable=not progress, desc="sample", leave=False):
            m = min(batch, n - lo)
            gens = generators(seed, lo, m)
            noise = randn((m,) + shape, generator=gens).to(device=device, dtype=dtype)
            kw = {"generator": gens, "plan": plan, "return_trajectory": trajectory and lo == 0}
            if not isinstance(spacing, str) or spacing:  # a name, or a tensor of times (a user grid)
                kw["spacing"] = spacing
            if cond is not None:
                kw["cond"] = {k: v[lo:lo + m] for k, v in cond.items()}
            x = sample(model, noise, sampler=sampler, nfe=nfe, **kw)
            if kw["return_trajectory"]:
                x, path = x
            out.append(x.float().cpu())
        x = torch.cat(out)
        if codec is not None:
            x, path = decoded(codec, x, path)
    return (x, labels, path) if trajectory else (x, labels)


def decoded(codec, x: torch.Tensor, path=None):
    """(images, trajectory) of latent samples x [n, c, h, w]: codec.decode, in fp32, on the CPU; the trajectory's
    states and denoised estimates of its first 64 samples decoded too."""
    images = codec.decode(x).float().cpu()
    if path is not None:
        path = path._replace(states=[codec.decode(s[:64]).float().cpu() for s in path.states],
                             denoised=[codec.decode(d[:64]).float().cpu() for d in path.denoised])
    return images, path


__all__ = ["condition_for", "decoded", "generate", "sampling_model"]
