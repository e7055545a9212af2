"""Run configuration: typed frozen dataclasses, named presets, dotted overrides, YAML (DESIGN rule 10).

Pure data: nothing here builds a network or touches a file system except `load_config`/`save_config`.
The core library never imports this module; `unifuse.training` and `unifuse.cli` read it.

    cfg = get_config("digits", overrides=["optim.lr=2e-3", "train.steps=500"])
    save_config(cfg, "run/config.yaml"); cfg == load_config("run/config.yaml")

Overrides are strict: an unknown key, a value of the wrong type or a contradictory combination stops
with one message naming the key and the valid choices (no setting is ever silently ignored).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

from .config_sections import (  # the sections, re-exported (unifuse.config.DataConfig, ...)
    Config,
    DataConfig,
    DistillConfig,
    EvalConfig,
    FinetuneConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
)
from .errors import UnifuseError, choose
from .io import write_text
from .parameterization import defined_at_zero_snr
from .presets_latent import AE_FAMILY, AE_OBJECTIVE, latent_presets

FAMILIES = ("ddpm", "iddpm", "vpsde", "vesde", "edm", "rf", "trigflow", "ct", "sct", "meanflow", "shortcut")
OBJECTIVES = ("ddpm", "hybrid", "dsm", "edm", "flow", "trigflow", "ct", "sct", "meanflow", "shortcut")
CONDITIONS = ("none", "class", "text")
PRECISIONS = ("auto", "fp32", "bf16")
MAX_IMAGE_SIZE = 512        # data.size above this is refused before any image is decoded
TOYS = ("moons", "8gaussians", "checkerboard", "swissroll")


# --- families and presets ---------------------------------------------------------------------

# family -> (path, prediction, objective, learned variance, objective options, sampler, nfe). The eps families sample
# with the DPM-Solver++(2M) SDE: their 20-NFE ODE leaves pixel noise (VE-SDE, MNIST-5k: FD 49 against 5.8; training.md).
FAMILY_PARTS = {
    "ddpm":     ("ddpm-linear", "eps", "ddpm", False, {}, "dpmpp_2m_sde", 20),
    "iddpm":    ("ddpm-cosine", "eps", "hybrid", True, {}, "dpmpp_2m_sde", 20),
    "vpsde":    ("vp-linear", "eps", "dsm", False, {}, "dpmpp_2m_sde", 20),
    "vesde":    ("ve", "eps", "dsm", False, {}, "dpmpp_2m_sde", 20),
    "edm":      ("edm", "edm", "edm", False, {}, "heun", 20),
    "rf":       ("rf", "velocity", "flow", False, {}, "heun", 20),
    "trigflow": ("trigflow", "trigflow", "trigflow", False, {}, "heun", 20),
    "ct":       ("edm", "consistency", "ct", False, {"schedule": "ect"}, "consistency", 2),
    "sct":      ("trigflow", "trigflow", "sct", False, {}, "consistency", 2),
    "meanflow": ("rf", "velocity", "meanflow", False, {"r_equals_t": 0.5}, "average", 1),
    "shortcut": ("rf", "velocity", "shortcut", False, {}, "average", 1),
}
TWO_TIME_FAMILIES = ("meanflow", "shortcut")  # few-step models: the network also takes the end time r of a jump
NATIVE_TIME_FAMILIES = ("meanflow",)  # plain t in [0, 1]: with 1000 t MeanFlow's 1 step is no better than flow matching

# Per data set: network, batch, optimizer and precision. Chosen by measurement on the 2-core CPU
# (docs/benchmarks/training.md): on 8x8 digits an MLP on the flattened image learns far more per CPU-second than
# the U-Net, bf16 autocast is ~1.7x faster at equal quality where the CPU runs bf16 natively (precision "auto": fp32
# elsewhere, where bf16 is emulated and 18x slower), and an inverse-square-root learning-rate decay
# after 150 steps with a 50k-image EMA halves the Frechet distance of a constant rate. The digits MLP runs
# 1.5x faster on one thread than on two (its matrices are too small to split). At batch 512 it sees 1.5x more
# images per CPU-second than at 128; with Adam's beta2 = 0.99 (EDM2) and EDM noise levels centred higher (log sigma
# ~ N(-0.4, 1.0), EDM2's default for its latent ImageNet-512 models; `edm_noise`), the Frechet distance after
# 2.5 minutes fell from 1.33x the floor to 1.01x (batch 512, beta2 0.99) and 0.89x (batch 512, those noise levels).
DATASET_PARTS = {
    "digits": dict(net="mlp-toy", net_options={"width": 512}, batch=512, lr=2e-3, decay_after=150, steps=8000,
                   ema_halflife=50000.0, precision="auto", threads=1, betas=(0.9, 0.99), edm_noise=(-0.4, 1.0)),
    "mnist":  dict(net="unet-mnist", net_options={}, batch=64, lr=1e-3, decay_after=150, steps=6000,
                   ema_halflife=50000.0, precision="auto", threads=0),
    "toy":    dict(net="mlp-toy", net_options={}, batch=256, lr=2e-3, decay_after=0, steps=2000,
                   ema_halflife=20000.0, precision="fp32", threads=0),
}
DEFAULT_FAMILY = {"digits": "edm", "mnist": "edm", "toy": "edm"}
# At 20 CPU-minutes on 2 cores the latent recipe (autoencoder, then EDM on its 7x7x4 latents) reached 2.45x the real-vs-real
# floor where the best pixel-space recipe (DDPM, U-Net) reached 9.17x (docs/benchmarks/latent.md, bench/latent.py):
# the default mnist, mnist-cond and mnist-text presets are the latent ones.
DEFAULT_MNIST = "mnist-latent"
CT_STAGE_FRACTION = 8          # ECT: the consistency gap halves 8 times over the preset's steps


def family_config(family: str, dataset: str = "digits", *, cond: str = "none", name: str | None = None) -> Config:
    """A preset: `family` (FAMILIES) on `dataset` (digits, mnist or a toy name), optionally conditional."""
    choose("family", family, FAMILY_PARTS)
    kind = "toy" if dataset in TOYS or dataset.startswith("toy-") else choose("dataset", dataset, DATASET_PARTS)
    data_name = dataset.removeprefix("toy-")
    d = DATASET_PARTS[kind]
    steps = d["steps"]
    model, objective, sample = family_sections(family, kind, steps)
    cfg = Config(
        name=name or f"{dataset}-{family}",
        description=f"{family} on {data_name}" + ("" if cond == "none" else f", {cond}-conditional"),
        data=DataConfig(name=data_name, batch=d["batch"], cond=cond, p_uncond=0.1),
        model=replace(model, net=d["net"], net_options=net_options(family, d["net_options"])),
        objective=objective,
        optim=OptimConfig(lr=d["lr"], betas=d.get("betas", (0.9, 0.999)), ema_halflife=d["ema_halflife"],
                          warmup_steps=min(200, steps // 10), decay_after=d["decay_after"]),
        train=TrainConfig(steps=steps, ckpt_every=max(100, steps // 8), log_every=max(1, min(25, steps // 100)),
                          precision=d["precision"], threads=d["threads"]),
        sample=sample,
    )
    return validate(cfg)


def family_sections(family: str, kind: str, steps: int, sample: SampleConfig | None = None):
    """(ModelConfig, ObjectiveConfig, SampleConfig) of `family` on a data set of kind digits, mnist or toy: the
    path, prediction, objective and sampler a preset of that family has (the network fields are defaults)."""
    path, prediction, objective, learned_variance, options, sampler, nfe = FAMILY_PARTS[family]
    d = DATASET_PARTS[kind]
    options = dict(options)
    if objective == "edm" and "edm_noise" in d:
        options.update(mean=d["edm_noise"][0], std=d["edm_noise"][1])
    if family == "ct":
        options["stage_every"] = max(1, steps // CT_STAGE_FRACTION)
    if kind == "toy" and sampler not in ("consistency", "average"):
        sampler, nfe = "heun", 31
    model = ModelConfig(family=family, path=path, path_options={"sigma_d": 0.5} if path == "trigflow" else {},
                        prediction=prediction, sigma_data=0.5, learned_variance=learned_variance,
                        time_input="native" if family in NATIVE_TIME_FAMILIES else "c_noise")
    # kinds undefined at zero SNR (eps: x0 = (x - sigma eps) / alpha) blow up there: on images in [-1, 1] they
    # clip the denoised estimate, as improved-diffusion's clip_denoised does (unifuse.thresholding)
    clip = 1.0 if kind != "toy" and not defined_at_zero_snr(prediction) else 0.0
    sample = replace(sample or SampleConfig(), sampler=sampler, nfe=nfe, spacing="", clip_denoised=clip)
    return model, ObjectiveConfig(name=objective, options=options), sample


def net_options(family: str, options: Mapping) -> dict:
    """The network options of a family's preset: the few-step families' networks take a second time."""
    out = {k: v for k, v in options.items() if k != "two_times"}
    return dict(out, two_times=True) if family in TWO_TIME_FAMILIES else out


def switch_family(cfg: Config, family: str) -> Config:
    """cfg as a run of `family`: path, prediction, objective and sampler of the family's presets (network, data,
    optimizer and training settings kept). What `--set model.family=F` does."""
    choose("model.family", family, FAMILY_PARTS)
    name = cfg.data.name
    kind = "toy" if name in TOYS else name if name in DATASET_PARTS else "digits"
    model, objective, sample = family_sections(family, kind, cfg.train.steps, cfg.sample)
    model = replace(model, net=cfg.model.net, net_options=net_options(family, cfg.model.net_options))
    if cfg.data.latent:  # unit-variance latents: keep the run's sigma_data; nothing to clip to [-1, 1]
        model = replace(model, sigma_data=cfg.model.sigma_data,
                        path_options={"sigma_d": cfg.model.sigma_data} if model.path == "trigflow" else {})
        sample = replace(sample, clip_denoised=0.0)
    return replace(cfg, model=model, objective=objective, sample=sample)


def _presets() -> dict:
    out = {}
    for ds in ("digits", "mnist"):
        out[ds] = replace(family_config(DEFAULT_FAMILY[ds], ds, name=ds),
                          description=f"the default {ds} model ({DEFAULT_FAMILY[ds]})")
        for fam in FAMILIES:
            out[f"{ds}-{fam}"] = family_config(fam, ds)
        out[f"{ds}-cond"] = family_config(DEFAULT_FAMILY[ds], ds, cond="class", name=f"{ds}-cond")
        out[f"{ds}-text"] = family_config(DEFAULT_FAMILY[ds], ds, cond="text", name=f"{ds}-text")
    for toy in TOYS:
        out[f"toy-{toy}"] = family_config(DEFAULT_FAMILY["toy"], toy, name=f"toy-{toy}")
    out.update({k: validate(v) for k, v in latent_presets(out["mnist"], out["mnist-cond"], out["mnist-text"]).items()})
    # The default MNIST models are the latent ones (DEFAULT_MNIST); the pixel-space ones stay as mnist-pixel(-cond, -text).
    for suffix in ("", "-cond", "-text"):
        pixel = out[f"mnist{suffix}"]
        out[f"mnist-pixel{suffix}"] = replace(pixel, name=f"mnist-pixel{suffix}",
                                              description=pixel.description.replace("the default mnist model",
                                                                                    "mnist in pixel space"))
        out[f"mnist{suffix}"] = replace(out[f"{DEFAULT_MNIST}{suffix}"], name=f"mnist{suffix}")
    out["mnist"] = replace(out["mnist"], description=f"the default mnist model: {out['mnist'].description}")
    return out


# --- validation -------------------------------------------------------------------------------

def validate(cfg: Config) -> Config:
    """Reject unknown names and contradictory settings with one clear message; return cfg."""
    m, o, t, d = cfg.model, cfg.objective, cfg.train, cfg.data
    choose("family", m.family, (*FAMILY_PARTS, AE_FAMILY))
    choose("objective", o.name, (*OBJECTIVES, AE_OBJECTIVE))
    choose("data.cond", d.cond, CONDITIONS)
    choose("train.precision", t.precision, PRECISIONS)
    choose("train.clock", t.clock, ("wall", "process"))
    choose("model.time_input", m.time_input, ("c_noise", "native"))
    checks = [
        (d.batch >= 1, f"data.batch must be >= 1, got {d.batch}"),
        (d.size >= 4, f"data.size must be at least 4 pixels, got {d.size}"),
        (d.size <= MAX_IMAGE_SIZE, f"data.size={d.size} is above the limit of {MAX_IMAGE_SIZE} pixels (the images and "
                                   f"the network would not fit in memory); use data.size={MAX_IMAGE_SIZE} or less"),
        (d.heldout >= 0, f"data.heldout must be a fraction in [0, 1) or a count >= 1, got {d.heldout}"),
        (d.channels in (0, 1, 3), f"data.channels must be 1 (grayscale), 3 (RGB) or 0 (automatic), got {d.channels}"),
        (0.0 <= d.p_uncond < 1.0, f"data.p_uncond must be in [0, 1), got {d.p_uncond}"),
        (cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}"),
        (cfg.optim.accumulate >= 1, f"optim.accumulate must be >= 1, got {cfg.optim.accumulate}"),
        (d.batch % cfg.optim.accumulate == 0,
         f"data.batch ({d.batch}) must be divisible by optim.accumulate ({cfg.optim.accumulate})"),
        (cfg.optim.ema_halflife >= 0, f"optim.ema_halflife must be >= 0, got {cfg.optim.ema_halflife}"),
        (cfg.sample.clip_denoised >= 0, f"sample.clip_denoised must be >= 0 (0 = off, 1 = images in [-1, 1]), "
                                        f"got {cfg.sample.clip_denoised}"),
        (0.0 <= cfg.sample.threshold_percentile < 1.0,
         f"sample.threshold_percentile must be in [0, 1) (0 = static clipping), got {cfg.sample.threshold_percentile}"),
        (0.0 <= cfg.optim.cooldown <= 1.0, f"optim.cooldown must be a fraction in [0, 1], got {cfg.optim.cooldown}"),
        (t.steps >= 0, f"train.steps must be >= 0, got {t.steps}"),
        (t.minutes >= 0, f"train.minutes must be >= 0, got {t.minutes}"),
        (cfg.sample.nfe >= 1, f"sample.nfe must be >= 1, got {cfg.sample.nfe}"),
        (m.sigma_data > 0, f"model.sigma_data must be > 0, got {m.sigma_data}"),
        ((o.name == "hybrid") == m.learned_variance,
         "objective 'hybrid' and model.learned_variance=true go together (Improved DDPM); "
         f"got objective {o.name!r} with learned_variance={m.learned_variance}"),
        (not m.learned_variance or m.path.startswith("ddpm"),
         f"a learned variance needs a discrete DDPM path (ddpm-linear, ddpm-cosine), got {m.path!r}"),
        (o.name != "ddpm" or m.path.startswith("ddpm"),
         f"objective 'ddpm' samples integer steps and needs a DDPM path, got {m.path!r}; use 'dsm' for continuous "
         "paths"),
        (bool(cfg.distill.method) or (o.name == "ct") == (m.prediction == "consistency"),  # a student has no objective
         f"objective 'ct' and prediction 'consistency' go together; got objective {o.name!r} with prediction "
         f"{m.prediction!r}"),
    ] + finetune_checks(cfg.finetune) + latent_checks(cfg)
    for ok, message in checks:
        if not ok:
            raise UnifuseError(message)
    return cfg


def latent_checks(cfg: Config) -> list:
    """(ok, message) pairs of autoencoder runs and latent runs."""
    m, d = cfg.model, cfg.data
    return [
        ((m.family == AE_FAMILY) == (cfg.objective.name == AE_OBJECTIVE),
         f"model.family 'ae' and objective 'autoencoder' go together; got {m.family!r} with {cfg.objective.name!r}"),
        (m.family != AE_FAMILY or not d.latent, f"an autoencoder trains on pixels; drop data.latent={d.latent!r}"),
        (not d.latent or cfg.sample.clip_denoised == 0,
         f"sample.clip_denoised={cfg.sample.clip_denoised:g} clips to the pixel range, but a latent run's data are "
         "unit-variance latents; set sample.clip_denoised=0"),
        (0 < d.latent_share < 1, f"data.latent_share={d.latent_share:g} is the autoencoder stage's share of "
         "train.minutes; use a number between 0 and 1, e.g. 0.3"),
        (not d.latent_options or d.latent.startswith("train:"),
         "data.latent_options are overrides of the autoencoder stage that data.latent=train:PRESET runs; set "
         "data.latent=train:mnist-ae or drop them"),
    ]


def finetune_checks(f) -> list:
    """(ok, message) pairs of the finetune section (a reward fine-tuned run)."""
    return [
        (f.batch >= 1, f"finetune.batch must be >= 1 (rollouts per round), got {f.batch}"),
        (f.steps >= 2, f"finetune.steps must be >= 2 (stochastic sampler steps of a rollout), got {f.steps}"),
        (f.sampler in ("ddim", "sde"), f"finetune.sampler must be 'ddim' or 'sde', got {f.sampler!r}"),
        (f.eta > 0, f"finetune.eta must be > 0 (a rollout's steps need noise for their densities), got {f.eta}"),
        (f.lora_rank >= 0, f"finetune.lora_rank must be >= 0 (0: train every weight), got {f.lora_rank}"),
        (f.eval_n >= 0, f"finetune.eval_n must be >= 0, got {f.eval_n}"),
    ]


PRESETS = _presets()


def list_presets() -> list:
    """(name, description) for every preset, in a stable order."""
    return [(k, v.description) for k, v in PRESETS.items()]


# --- dictionaries, overrides, YAML ------------------------------------------------------------

def to_dict(cfg) -> dict:
    """Plain nested dict (tuples become lists) for YAML and JSON."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def _coerce(key: str, value, current, kind):
    """value converted to the type of the field `key` (whose default is `current`), or a clear error."""
    if kind is dict or isinstance(current, dict):
        if not isinstance(value, Mapping):
            raise UnifuseError(f"config key {key!r} needs a mapping like {{a: 1}}, got {value!r}")
        return dict(value)
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise UnifuseError(f"config key {key!r} needs true or false, got {value!r}")
    if isinstance(current, int):
        integral = (isinstance(value, int) or (isinstance(value, float) and value.is_integer())
                    or (isinstance(value, str) and _is_number(value) and float(value).is_integer()))
        if isinstance(value, bool) or not integral:
            raise UnifuseError(f"config key {key!r} needs an integer, got {value!r}")
        return int(float(value))
    if isinstance(current, float):
        numeric = isinstance(value, (int, float)) or (isinstance(value, str) and _is_number(value))
        if isinstance(value, bool) or not numeric:
            raise UnifuseError(f"config key {key!r} needs a number, got {value!r}")
        return float(value)
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(current):
            raise UnifuseError(f"config key {key!r} needs a list of {len(current)} values like {list(current)}, got "
                               f"{value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, c, type(c)) for i, (v, c) in enumerate(zip(value, current)))
    if isinstance(current, str):
        if isinstance(value, (dict, list, tuple)) or value is None:
            raise UnifuseError(f"config key {key!r} needs a string, got {value!r}")
        return str(value)
    return value


def _is_number(s: str) -> bool:
    try:
        return float(s) is not None
    except ValueError:
        return False


def _merge(obj, updates: Mapping, prefix: str = ""):
    """A copy of dataclass `obj` with nested `updates` applied, type-checked key by key."""
    if not isinstance(updates, Mapping):
        raise UnifuseError(f"config section {prefix.rstrip('.') or 'root'!r} needs a mapping, got {updates!r}")
    valid = {f.name: f for f in fields(obj)}
    changes = {}
    for key, value in updates.items():
        full = prefix + str(key)
        if key not in valid:
            raise UnifuseError(f"unknown config key {full!r}; valid "
                               f"keys{' under ' + prefix.rstrip('.') if prefix else ''}: "
                               f"{', '.join(sorted(valid))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value, full + ".")
        else:
            changes[key] = _coerce(full, value, current, None)
    return replace(obj, **changes)


def parse_override(text: str) -> tuple:
    """'a.b=c' -> (['a', 'b'], parsed c); the value is read as YAML (numbers, true/false, lists, strings)."""
    import yaml

    if "=" not in text:
        raise UnifuseError(f"override {text!r} must look like key.sub=value (e.g. optim.lr=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UnifuseError(f"override {text!r} has an empty key; write key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cfg: Config, overrides: Sequence[str] = ()) -> Config:
    """Apply dotted `key.sub=value` overrides; dict fields accept sub-keys (model.net_options.channels=32).
    `model.family=F` first makes the run one of family F (`switch_family`: its path, prediction, objective and
    sampler), then the other overrides apply on top of it."""
    overrides = list(overrides or ())
    families = [text for text in overrides if text.split("=", 1)[0].strip() == "model.family"]
    for text in families:
        family = parse_override(text)[1]
        if not isinstance(family, str):
            raise UnifuseError(f"override {text!r}: model.family needs a family name, one of {', '.join(FAMILIES)}")
        cfg = switch_family(cfg, family)
    for text in (t for t in overrides if t not in families):
        parts, value = parse_override(text)
        obj, path = cfg, []
        # Walk to the deepest dataclass; remaining parts address keys inside a dict field.
        while parts and dataclasses.is_dataclass(obj) and parts[0] in {f.name for f in fields(obj)} \
                and dataclasses.is_dataclass(getattr(obj, parts[0])):
            path.append(parts.pop(0))
            obj = getattr(obj, path[-1])
        if not parts:
            raise UnifuseError(f"override {text!r} names a whole section; set one key like "
                               f"{'.'.join(path)}.<key>=value")
        head = parts[0]
        if len(parts) > 1:
            names = {f.name for f in fields(obj)}
            if head not in names or not isinstance(getattr(obj, head), dict):
                where = ".".join(path + [head])
                raise UnifuseError(f"unknown config key {where!r}; valid "
                                   f"keys{' under ' + '.'.join(path) if path else ''}: "
                                   f"{', '.join(sorted(names))}")
            inner = dict(getattr(obj, head))
            node = inner
            for p in parts[1:-1]:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise UnifuseError(f"override {text!r}: {p!r} is not a mapping")
            node[parts[-1]] = value
            value = inner
        update: Any = {head: value}
        for p in reversed(path):
            update = {p: update}
        cfg = _merge(cfg, update)
    if cfg.model.family in TWO_TIME_FAMILIES and "two_times" not in cfg.model.net_options:  # net_options replaced
        cfg = replace(cfg, model=replace(cfg.model, net_options=net_options(cfg.model.family, cfg.model.net_options)))
    return validate(cfg)


def from_dict(d: Mapping, base: Config | None = None) -> Config:
    """A Config from a nested dict (strict: unknown keys are an error), on top of `base`."""
    return validate(_merge(base or Config(), d))


def get_config(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
    """A preset by name, or a YAML file (a full config, or `base: PRESET` plus changed keys)."""
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        cfg = PRESETS[name_or_path]
    elif isinstance(name_or_path, str) and (name_or_path.endswith((".yaml", ".yml")) or os.path.sep in name_or_path):
        cfg = load_config(name_or_path)
    else:
        choose("preset", name_or_path, PRESETS)
    return apply_overrides(cfg, overrides)


def load_config(path) -> Config:
    """Read a YAML config written by `save_config` or by hand (`base: digits` then changed keys)."""
    import yaml

    if not os.path.isfile(path):
        raise UnifuseError(f"config file {os.fspath(path)!r} does not exist; give a preset name (unifuse presets) or a "
                           "YAML path")
    try:
        with open(path) as fh:
            d = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise UnifuseError(f"config file {os.fspath(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(d, Mapping):
        raise UnifuseError(f"config file {os.fspath(path)!r} must hold a mapping of sections, got {type(d).__name__}")
    d = dict(d)
    base = d.pop("base", None)
    if base is not None:
        choose("preset", base, PRESETS)
        family = (d.get("model") or {}).get("family") if isinstance(d.get("model"), Mapping) else None
        if isinstance(family, str) and family != PRESETS[base].model.family:  # base: digits + model.family: rf
            return from_dict(d, switch_family(PRESETS[base], family))
    return from_dict(d, PRESETS[base] if base is not None else None)


def save_config(cfg: Config, path) -> str:
    """Write the resolved config as YAML (`unifuse.io.write_text`: temporary file, then rename)."""
    import yaml

    return write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = ["Config", "DataConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig", "TrainConfig", "SampleConfig", "EvalConfig",
           "DistillConfig", "FinetuneConfig", "PRESETS", "FAMILIES", "FAMILY_PARTS", "family_config", "family_sections",
           "switch_family",
           "list_presets", "validate", "apply_overrides", "parse_override", "from_dict", "to_dict", "get_config",
           "load_config", "save_config"]
