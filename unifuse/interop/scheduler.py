"""A diffusers scheduler config read as a unifuse path, prediction kind and time grid, and written back.

A discrete scheduler is a beta table: alphas_cumprod[n] = prod_{k<=n} (1 - beta_k) for n = 0..N-1, and the network
sees x_n = sqrt(abar_n) x + sqrt(1 - abar_n) noise with the integer timestep n. That is this library's `DDPM` path
(native time = the index n, index -1 the data), so the diffusers timestep IS the native time (time_scale 1) and
every sampler runs on it. The table is taken from diffusers' own float32 arithmetic (every beta_schedule, trained
betas, Lin et al.'s zero-terminal-SNR rescaling, and the 2^-24 last entry the Euler/DPM-Solver/UniPC classes put
there), so our abar equals theirs to float32 rounding.

A flow-match scheduler (Esser et al. 2024) is rectified flow, x_t = (1 - t) x + t noise, predicting the velocity
noise - x; the network sees the timestep N t (time_scale N). Its `shift` bends the sampling grid only (our "shift"
spacing), never the path.

Keys are sorted into what defines the model (mapped), what chooses the grid (mapped by `diffusers_grid`), and what
chooses a solver (ignored: pick ours with sampler=). A key in none of these lists, or a solver key set to a value
that would change the model, is refused in one message naming it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnifuseError
from ..paths import DDPM, RectifiedFlow

F64 = torch.float64
TABLE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
              "rescale_betas_zero_snr")
MODEL_KEYS = TABLE_KEYS + ("prediction_type", "variance_type", "clip_sample", "clip_sample_range", "thresholding",
                           "dynamic_thresholding_ratio", "sample_max_value", "shift")
GRID_KEYS = ("timestep_spacing", "steps_offset", "set_alpha_to_one")
HARMLESS_KEYS = ("_class_name", "_diffusers_version", "_use_default_values", "kwargs")
# A solver's own choices: they pick a sampler and its grid, not the model (choose ours with sampler= and spacing=).
SOLVER_KEYS = ("solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
               "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "final_sigmas_type",
               "lambda_min_clipped", "skip_prk_steps", "predict_x0", "disable_corrector", "solver_p",
               "interpolation_type", "timestep_type", "sigma_min", "sigma_max", "stochastic_sampling",
               "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type", "flow_shift")
# Solver keys that change the model (or a grid no fixed time can give) unless they keep these values.
MUST_BE = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None, "use_flow_sigmas": False}

TABLE_CLASSES = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "UniPCMultistepScheduler", "DEISMultistepScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
                 "KDPM2DiscreteScheduler")
FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
ZERO_SNR_EPS_CLASSES = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                        "UniPCMultistepScheduler")  # they set abar[-1] = 2^-24 instead of 0 (finite sigma)
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCES = {"fixed_small": "small", "fixed_small_log": "small", "fixed_large": "large", "fixed_large_log": "large",
             "learned_range": "learned"}
SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")


@dataclass(frozen=True)
class SchedulerSpec:
    """What a scheduler config means here. time_scale: the diffusers timestep is time_scale * native t.
    clip: the range x0_hat is clipped to (None: no clipping); percentile: dynamic thresholding's quantile.
    variance: the DDPM sampler's variance (small, large, learned). spacing, steps_offset, set_alpha_to_one, shift:
    how diffusers builds its sampling grid (`diffusers_grid`)."""

    class_name: str
    config: dict
    path: object
    prediction: str
    time_scale: float
    num_train_timesteps: int
    spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip: float | None = None
    percentile: float | None = None
    variance: str = "small"
    shift: float = 1.0

    @property
    def flow(self) -> bool:
        return self.class_name in FLOW_CLASSES


def check_keys(config: dict, class_name: str) -> None:
    """Refuse keys this module does not know and solver keys set to values that change the model."""
    known = set(MODEL_KEYS) | set(GRID_KEYS) | set(HARMLESS_KEYS) | set(SOLVER_KEYS) | set(MUST_BE)
    unknown = sorted(k for k in config if k not in known)
    bad = sorted(f"{k}={config[k]!r}" for k, v in MUST_BE.items() if k in config and config[k] != v)
    if unknown or bad:
        what = ", ".join(unknown + bad)
        raise UnifuseError(f"scheduler {class_name}: unsupported key(s) {what}; they change the model or its grid in "
                           "a way unifuse cannot reproduce; remove them from scheduler_config.json (only if the model "
                           "was trained without them) or use a supported scheduler config")


def alphas_cumprod(config: dict, class_name: str) -> torch.Tensor:
    """diffusers' own float32 abar table for the table keys (computed by DDPMScheduler, which takes all of them)."""
    from diffusers import DDPMScheduler

    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is None and schedule not in SCHEDULES:
        raise UnifuseError(f"scheduler {class_name}: beta_schedule={schedule!r} is not supported; use one of "
                           f"{', '.join(SCHEDULES)} or trained_betas")
    kw = {k: config[k] for k in TABLE_KEYS if k in config}
    abar = DDPMScheduler(**kw).alphas_cumprod.clone()
    if config.get("rescale_betas_zero_snr") and class_name in ZERO_SNR_EPS_CLASSES:
        abar[-1] = 2.0**-24
    return abar


def path_from_table(abar: torch.Tensor, name: str = "diffusers") -> DDPM:
    """The DDPM path whose abar is exactly `abar` (betas recovered in float64: beta_n = 1 - abar_n / abar_{n-1})."""
    abar = abar.to(F64)
    prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    return DDPM(1.0 - abar / prev, name)


def read_scheduler(config: dict) -> SchedulerSpec:
    """A diffusers scheduler config (the dict of scheduler_config.json) as a `SchedulerSpec`."""
    if not isinstance(config, dict):
        raise UnifuseError(f"a scheduler config must be a JSON object, got {type(config).__name__}")
    name = config.get("_class_name", "DDPMScheduler")
    if name not in TABLE_CLASSES + FLOW_CLASSES:
        raise UnifuseError(f"scheduler class {name!r} is not supported; supported: "
                           f"{', '.join(TABLE_CLASSES + FLOW_CLASSES)}")
    check_keys(config, name)
    n_train = int(config.get("num_train_timesteps", 1000))
    if name in FLOW_CLASSES:
        return SchedulerSpec(name, dict(config), RectifiedFlow(), "velocity", float(n_train), n_train,
                             spacing="shift", shift=float(config.get("shift", 1.0)))
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTIONS:
        raise UnifuseError(f"scheduler {name}: prediction_type={kind!r} is not supported; use one of "
                           f"{', '.join(PREDICTIONS)}")
    variance = config.get("variance_type") or "fixed_small"
    if variance not in VARIANCES:
        raise UnifuseError(f"scheduler {name}: variance_type={variance!r} is not supported (unifuse's learned variance "
                           f"is Improved DDPM's interpolation, learned_range); use one of {', '.join(VARIANCES)}")
    clip, percentile = None, None
    if config.get("thresholding"):  # diffusers caps s at sample_max_value: with 1.0 that is plain clipping
        clip = 1.0
        percentile = float(config.get("dynamic_thresholding_ratio", 0.995)) \
            if float(config.get("sample_max_value", 1.0)) > 1.0 else None
    elif config.get("clip_sample", name in ("DDPMScheduler", "DDIMScheduler")):
        clip = float(config.get("clip_sample_range", 1.0))
    path = path_from_table(alphas_cumprod(config, name))
    return SchedulerSpec(name, dict(config), path, PREDICTIONS[kind], 1.0, path.N,  # trained_betas set the length
                         spacing=config.get("timestep_spacing", "leading"),
                         steps_offset=int(config.get("steps_offset", 0)),
                         set_alpha_to_one=bool(config.get("set_alpha_to_one", True)), clip=clip, percentile=percentile,
                         variance=VARIANCES[variance])


def diffusers_grid(spec: SchedulerSpec, steps: int) -> torch.Tensor:
    """The native times diffusers' own loop visits with `steps` inference steps, ending on the data end (float64).

    DDPM/DDIM tables: scheduler.set_timesteps(steps).timesteps, then the end DDIM steps to (-1 = the data with
    set_alpha_to_one, else index 0, after which unifuse's grid adds one denoising step to the data). DDIM steps from
    t to t - N // steps; a spacing on which that is not the next timestep (linspace) is refused. Flow match: the
    scheduler's own float32 sigmas (shift included) and 0."""
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if spec.flow:
        sch = FlowMatchEulerDiscreteScheduler.from_config(spec.config)
        sch.set_timesteps(steps)
        return sch.sigmas.to(F64)
    ddim = spec.class_name != "DDPMScheduler"
    sch = (DDIMScheduler if ddim else DDPMScheduler).from_config(
        {k: v for k, v in spec.config.items() if k in TABLE_KEYS + GRID_KEYS})
    sch.set_timesteps(steps)
    ts = sch.timesteps.to(F64)
    if ddim:
        jump = spec.num_train_timesteps // steps
        if ts.numel() > 1 and not bool((ts[:-1] - ts[1:] == jump).all()):
            raise UnifuseError(f"diffusers' DDIM with timestep_spacing={spec.spacing!r} at {steps} steps steps from t "
                               f"to t - {jump}, not to its next timestep; no single grid reproduces it: use leading or "
                               "trailing spacing, or a step count that divides num_train_timesteps")
        end = -1.0 if spec.set_alpha_to_one else 0.0
    else:
        end = -1.0
    return torch.cat([ts, torch.tensor([end], dtype=F64)]) if end < float(ts[-1]) else ts


# --- the other way: a unifuse path and prediction as a diffusers scheduler config -----------------------------
def scheduler_config(path, prediction: str, *, learned_variance: bool = False, sigma_data: float = 0.5) -> dict:
    """The diffusers scheduler config that reproduces (path, prediction), or one message naming what it cannot say.

    DDPM paths become DDIMScheduler configs with trained_betas (the table, exact), eps/x0/v predictions; a learned
    variance becomes DDPMScheduler's learned_range. Rectified flow with velocity prediction becomes
    FlowMatchEulerDiscreteScheduler (shift 1). The EDM path with EDM preconditioning becomes EDMEulerScheduler
    (its network takes 0.25 log sigma, not unifuse's noise label: export the scheduler, not a unifuse network)."""
    inverse = {v: k for k, v in PREDICTIONS.items()}
    if isinstance(path, DDPM):
        if prediction not in inverse:
            raise UnifuseError(f"diffusers' DDPM/DDIM schedulers predict epsilon, sample or v_prediction; a "
                               f"{prediction!r} model on a DDPM path cannot be expressed (re-express it with "
                               "model.predict(kind='eps'))")
        common = dict(num_train_timesteps=path.N, beta_schedule="linear", trained_betas=path.betas.tolist(),
                      prediction_type=inverse[prediction], clip_sample=False, timestep_spacing="trailing",
                      steps_offset=0, rescale_betas_zero_snr=False)
        if learned_variance:
            return dict(_class_name="DDPMScheduler", variance_type="learned_range", **common)
        return dict(_class_name="DDIMScheduler", set_alpha_to_one=True, **common)
    if learned_variance:
        raise UnifuseError("a learned variance exists in diffusers only on a DDPM table (DDPMScheduler learned_range)")
    if isinstance(path, RectifiedFlow) and prediction == "velocity":
        return dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=1.0)
    from ..paths import EDM

    if isinstance(path, EDM) and prediction == "edm":
        return dict(_class_name="EDMEulerScheduler", sigma_min=path.sigma_min, sigma_max=path.sigma_max,
                    sigma_data=float(sigma_data), sigma_schedule="karras", num_train_timesteps=1000,
                    prediction_type="epsilon", rho=7.0, final_sigmas_type="zero")
    raise UnifuseError(f"diffusers has no scheduler for path {path!r} with {prediction!r} prediction: it expresses "
                       "DDPM tables (eps, x0, v), rectified flow with velocity prediction and EDM with EDM "
                       "preconditioning; train the model on one of those (e.g. --set model.family=ddpm or rf)")


__all__ = ["SchedulerSpec", "read_scheduler", "diffusers_grid", "scheduler_config", "path_from_table", "alphas_cumprod"]
