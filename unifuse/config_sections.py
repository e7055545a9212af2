"""The sections of a run configuration: typed frozen dataclasses, one per concern (`unifuse.config` assembles them
into `Config`, names presets and applies overrides)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"            # a unifuse.data data set: digits, mnist, moons, 8gaussians, folder:<path>, ...
    batch: int = 128                # images per optimizer step, over all processes and accumulation rounds
    cond: str = "none"              # none | class | text
    p_uncond: float = 0.1           # label dropout: a label becomes -1 (the null class) with this probability
    size: int = 32                  # image folders: side in pixels after the centre crop and resize
    channels: int = 0               # image folders: 1 grayscale, 3 RGB, 0 grayscale if every file is
    heldout: float = 0.15           # image folders: held-out split, a fraction (< 1) or a count (>= 1) per class
    strict: bool = False            # image folders: refuse unreadable files (listing them) instead of skipping them
    latent: str = ""                # "" pixel space; an autoencoder run folder: train on its latents (unifuse.latent);
                                    # "train:PRESET": train that autoencoder preset first, into RUN/autoencoder
    latent_options: dict = field(default_factory=dict)  # with train:PRESET, the autoencoder stage's overrides
                                    # ({train: {steps: 500}})
    latent_share: float = 0.3       # with train:PRESET and train.minutes, the autoencoder stage's share of the minutes


@dataclass(frozen=True)
class ModelConfig:
    family: str = "edm"             # ddpm | iddpm | vpsde | vesde | edm | rf | trigflow | ct | ... | ae (autoencoder)
    net: str = "unet-digits"        # a unifuse.nets preset
    net_options: dict = field(default_factory=dict)   # keyword overrides for build_net
    path: str = "edm"               # a uf.paths name
    path_options: dict = field(default_factory=dict)
    prediction: str = "edm"         # eps | x0 | v | score | velocity | edm | trigflow | consistency
    sigma_data: float = 0.5
    learned_variance: bool = False
    time_input: str = "c_noise"     # what the network receives for t: c_noise (the path's noise label) | native


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "edm"               # ddpm | hybrid | dsm | edm | flow | trigflow | ct
    options: dict = field(default_factory=dict)       # keyword arguments of the objective (see unifuse.objectives)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 100         # linear warm-up from 0
    decay_after: int = 0            # > 0: lr * sqrt(decay_after / step) after that step (EDM2); 0: constant
    cooldown: float = 0.0           # > 0: lr falls linearly to 0 over this last fraction of the budget (steps or time)
    grad_clip: float = 1.0          # max global gradient norm; 0 disables
    accumulate: int = 1             # micro-batches per optimizer step
    ema_halflife: float = 10000.0   # EMA half-life in images (EDM)
    ema_rampup: float = 0.1         # half-life is at most this fraction of the images seen so far
    posthoc_ema: bool = False       # keep EDM2 power-function EMA snapshots for post-hoc reconstruction
    posthoc_every: int = 500        # snapshot interval in steps


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000               # total optimizer steps of the run
    minutes: float = 0.0            # time budget; 0 means none (the run stops at whichever comes first)
    clock: str = "wall"             # wall | process: budget in wall-clock time or in this process's CPU time
    seed: int = 0
    log_every: int = 25
    sample_every: int = 0           # a sample grid every N steps (0: only at the end)
    ckpt_every: int = 500
    keep: int = 2                   # checkpoints kept on disk
    precision: str = "fp32"         # auto | fp32 | bf16 (autocast); auto: bf16 where the hardware runs it natively
    compile: bool = False           # torch.compile the network (GPU)
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    threads: int = 0                # CPU threads per process; 0 leaves torch's default


@dataclass(frozen=True)
class SampleConfig:
    sampler: str = "heun"
    nfe: int = 20
    spacing: str = ""               # "" = the sampler's default grid
    clip_denoised: float = 0.0      # > 0: clip the denoised estimate to [-c, c] (unifuse.thresholding); 0: off
    threshold_percentile: float = 0.0   # > 0 with clip_denoised: dynamic thresholding at this quantile (Imagen 0.995)
    grid: int = 64                  # images in the training grids


@dataclass(frozen=True)
class EvalConfig:
    n: int = 1000                   # samples for the Frechet distance


@dataclass(frozen=True)
class DistillConfig:                # a distilled student's run (unifuse.distill.loop)
    method: str = ""                # "" for a trained run; else a unifuse.distill method (cd, progressive, ...)
    teacher: str = ""               # the teacher's run folder, as given
    options: dict = field(default_factory=dict)       # keyword arguments of the method (see unifuse.distill)
    student_path: str = ""          # the student's path ("" = the teacher's); its prediction is model.prediction
    nfe: str = ""                   # the NFEs the student supports, e.g. "1,2,4" ("" = any)


@dataclass(frozen=True)
class FinetuneConfig:               # a reward fine-tuned run (unifuse.finetune.loop)
    method: str = ""                # "" for a trained run; else a unifuse.finetune method (ddpo, draft, dpo, ...)
    base: str = ""                  # the base run's folder, as given
    reward: str = ""                # a reward name (unifuse.finetune.rewards: class:K, compressibility, module:fn, ...)
    options: dict = field(default_factory=dict)       # keyword arguments of the method (see unifuse.finetune)
    batch: int = 32                 # rollouts (or preference pairs) per round, over all processes
    steps: int = 20                 # stochastic sampler steps of a rollout
    sampler: str = "ddim"           # the rollout sampler: ddim (with eta) | sde (Flow-GRPO's SDE, any path)
    eta: float = 1.0                # its noise level (1: DDPM's posterior step / the memoryless SDE)
    lora_rank: int = 0              # > 0: train low-rank adapters of this rank (peft), merged into plain weights
    eval_every: int = 100           # reward, KL and FD of fresh samples every N rounds (0: only at the end)
    eval_n: int = 256               # samples per evaluation


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
