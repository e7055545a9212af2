"""Diffusion-DPO (Wallace et al. 2023, eq. 14) and its IPO variant (Azar et al. 2023) on preference pairs (card 22).

A pair (x_w, x_l) shares its condition, and one time t and one noise draw are SHARED by winner and loser. With L the
policy's and R the frozen reference's weighted per-sample denoising loss (the base objective's own
w(t) * mean_dims(target_hat - target)^2, so "per sample" means the mean over dimensions):

    u    = -0.5 * ((L_w - L_l) - (R_w - R_l))         the implicit margin (h below), per pair
    DPO  = -log sigmoid(beta * u)                     SalesforceAIResearch/DiffusionDPO `inside = -0.5 beta (...)`
    IPO  = (u - 1 / (2 beta))^2                       Azar et al.'s (h - 1/(2 tau))^2 with h = u, tau = beta

Units. Wallace et al. bound the log-likelihood ratio by the ELBO: log p_theta(x)/p_ref(x) ~ -T * D * E_t[w (L - R)] / 2
for T steps and D dimensions, so u is that log-ratio difference divided by T * D. beta therefore multiplies a
difference of mean-over-dims losses; the paper's KL weight beta_KL (the optimum p_ref exp(r / beta_KL) / Z of
DPO's derivation) is beta / (T * D). SD1.5/SDXL use beta = 5000 on 4x64x64 latents (T = 1000, beta_KL ~ 3e-4).
This beta is DPO's only regulariser toward the reference, hence `kl` is None in the logged scalars: there is no
separate KL term. diffusers' SD1.5 script writes -log sigmoid(beta' * (ref_diff - model_diff)) with
beta' = beta / 2: the same loss and gradient (ref_diff - model_diff = 2 u). Its IPO, (2 u - 1 / (2 beta'))^2, is
4 (u - 1/(2 beta))^2: the same minimiser u* = 1 / (2 beta) and 4x our loss.

Default beta = 50 for the small bases here (IPO: 5, see DiffusionIPO). At theta = ref the loss is log 2 and its gradient
0.25 * beta * grad(L_w - L_l) whatever beta is; beta sets where the sigmoid saturates (|beta u| ~ 3) and how
tightly the policy stays at the reference. Measured on the 1-D Gaussian check (base N(0, 1), pairs ranked by
r(x) = x, policy mean moved by delta base standard deviations): with DDPM's index-time eps loss u has mean ~0.09
delta and spread (std) ~0.14 delta; with the rectified-flow velocity loss ~1.0 delta both. beta = 50 thus
saturates DDPM pairs once the policy has moved ~0.5 standard deviations (velocity: ~0.05). On 8x8 digits
(T = 1000, D = 64) beta_KL = 50 / 64000 ~ 8e-4, 2.6x SD's 5000 / (1000 * 16384) ~ 3e-4 (larger is closer to
the reference); the paper's 5000 there would hold the policy 100x tighter (saturation after ~0.005 std).

Pair sources (`pairs`):
    "reward"   each round, `pairs_per_step` conditions, `candidates` samples each from the REFERENCE (offline DPO,
               the paper) or the current policy (online=True), ranked by ctx.reward: best vs worst. pool = N > 0
               draws N pairs once in setup (registered with ctx.add_state: a resume is exact) and samples rounds
               from them. Ties are kept (their gradient pulls L_w and L_l equally, i.e. not at all on average).
    "DIR"      DIR/preferred/NAME.png against DIR/rejected/NAME.png (same relative name, any image extension),
               converted to the base's channels, resized to its shape (inside its padding, MNIST-style) and
               scaled to [-1, 1]. A class-conditional base reads the class from the first sub-folder
               (DIR/preferred/<class>/NAME.png, <class> an index or a class name); an unconditional base ignores
               sub-folders; a caption-conditional base is refused (the folders carry no captions).

The denoising loss is the base's objective when it is a `DenoisingLoss` (its time density, target and weighting;
its noise coupling is not used: DPO needs the same noise for both images). Any other objective (HybridLoss,
consistency losses) or none falls back to DenoisingLoss(): eps-MSE, unit weight, t uniform on the path's training
range.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UnifuseError
from ..objectives.losses import DenoisingLoss


# --- the losses ------------------------------------------------------------------------------------------------
def implicit_margin(l_w, l_l, r_w, r_l) -> torch.Tensor:
    """u = -0.5 * ((L_w - L_l) - (R_w - R_l)) per pair: the log-likelihood-ratio difference of winner and loser,
    policy against reference, per step and dimension (h of IPO). u > 0: the policy prefers the winner more than
    the reference does."""
    return -0.5 * ((l_w - l_l) - (r_w - r_l))


def dpo_loss(l_w, l_l, r_w, r_l, beta: float) -> torch.Tensor:
    """Diffusion-DPO per pair: -log sigmoid(beta * u) (Wallace et al. 2023, eq. 14; beta: see the module)."""
    return -F.logsigmoid(beta * implicit_margin(l_w, l_l, r_w, r_l))


def ipo_loss(l_w, l_l, r_w, r_l, beta: float) -> torch.Tensor:
    """IPO per pair: (u - 1 / (2 beta))^2 (Azar et al. 2023, eq. 17 with h = u and tau = beta)."""
    return (implicit_margin(l_w, l_l, r_w, r_l) - 1.0 / (2.0 * beta)) ** 2


def denoising_objective(objective) -> DenoisingLoss:
    """The base's objective when it is a DenoisingLoss, else DenoisingLoss() (eps-MSE, t uniform)."""
    return objective if isinstance(objective, DenoisingLoss) else DenoisingLoss()


def denoising_losses(model, objective: DenoisingLoss, x, noise, t, cond: dict) -> torch.Tensor:
    """w(t) * mean_dims(target_hat - target)^2 per sample [B] at the given t and noise."""
    c, mse = objective.errors(model, x, noise, t, cond)
    return objective.weight(model, t, c).to(mse.dtype) * mse


def pair_losses(policy, reference, objective: DenoisingLoss, x_w, x_l, cond: dict, generator=None) -> tuple:
    """(L_w, L_l, R_w, R_l), each [n]: one t (the objective's density) and one noise per pair, shared by winner
    and loser and by policy and reference; R without gradients."""
    n = x_w.shape[0]
    where = generator.device if generator is not None else torch.device("cpu")
    t = objective.sample_time(n, policy.path, generator, where).to(x_w.device)
    noise = torch.randn(x_w.shape, generator=generator, device=where, dtype=x_w.dtype).to(x_w.device)
    x, t2, noise2, cond2 = torch.cat([x_w, x_l]), torch.cat([t, t]), torch.cat([noise, noise]), repeat(cond, 2, 0)
    l_w, l_l = denoising_losses(policy, objective, x, noise2, t2, cond2).chunk(2)
    with torch.no_grad():
        r_w, r_l = denoising_losses(reference, objective, x, noise2, t2, cond2).chunk(2)
    return l_w, l_l, r_w, r_l


def repeat(cond: dict, k: int, mode: int = 1) -> dict:
    """Each condition tensor repeated k times along the batch: mode 1 interleaved (a a b b), 0 tiled (a b a b)."""
    if mode:
        return {key: v.repeat_interleave(k, 0) for key, v in cond.items()}
    return {key: torch.cat([v] * k) for key, v in cond.items()}


# --- the pairs -------------------------------------------------------------------------------------------------
class Pairs:
    """Preference pairs: x_w, x_l [N, ...], their condition dict (tensors [N, ...]) and, when ranked by a reward,
    r_w, r_l [N]. state_dict / load_state_dict make a pool part of a checkpoint."""

    def __init__(self, x_w, x_l, cond: dict | None = None, r_w=None, r_l=None):
        self.x_w, self.x_l, self.cond, self.r_w, self.r_l = x_w, x_l, dict(cond or {}), r_w, r_l

    def __len__(self) -> int:
        return self.x_w.shape[0]

    def select(self, idx) -> Pairs:
        pick = (lambda v: None if v is None else v[idx.to(v.device)])
        return Pairs(pick(self.x_w), pick(self.x_l), {k: pick(v) for k, v in self.cond.items()},
                     pick(self.r_w), pick(self.r_l))

    def state_dict(self) -> dict:
        out = {"x_w": self.x_w, "x_l": self.x_l, **{f"cond.{k}": v for k, v in self.cond.items()}}
        return out | ({"r_w": self.r_w, "r_l": self.r_l} if self.r_w is not None else {})

    def load_state_dict(self, state: dict) -> None:
        self.x_w, self.x_l = state["x_w"], state["x_l"]
        self.cond = {k[len("cond."):]: v for k, v in state.items() if k.startswith("cond.")}
        self.r_w, self.r_l = state.get("r_w"), state.get("r_l")


@torch.no_grad()
def reward_pairs(ctx, n: int, candidates: int, model, generator=None) -> Pairs:
    """n pairs: `candidates` samples of `model` for each of n conditions, ranked by ctx.reward, best vs worst."""
    cond = ctx.condition(n, generator)
    cond_k = repeat(cond, candidates)
    x = ctx.generate(n * candidates, model=model, cond=cond_k)
    r = ctx.reward(x, cond_k).reshape(n, candidates)
    rows = torch.arange(n, device=r.device)
    best, worst = r.argmax(1), r.argmin(1)
    x = x.reshape(n, candidates, *x.shape[1:])
    return Pairs(x[rows, best], x[rows, worst], cond, r[rows, best], r[rows, worst])


def folder_pairs(folder: str, info: dict, conditioning: str = "none") -> Pairs:
    """Pairs from DIR/preferred and DIR/rejected (same relative names), resized to info["shape"] in [-1, 1]."""
    from ..data.images import IMAGE_EXTENSIONS

    root = Path(folder).expanduser()
    sides = [root / "preferred", root / "rejected"]
    missing = [str(p) for p in sides if not p.is_dir()]
    if missing:
        raise UnifuseError(f"preference folder {folder!r} lacks {', '.join(missing)}; put the winners in "
                           "DIR/preferred/NAME.png and the losers in DIR/rejected/NAME.png")
    if conditioning == "text":
        raise UnifuseError("folder pairs carry no captions, so a caption-conditional base cannot use them; use "
                           "pairs='reward' or an unconditional / class-conditional base")
    files = [{f.relative_to(s).with_suffix("").as_posix(): f for f in sorted(s.rglob("*"))
              if f.suffix.lower() in IMAGE_EXTENSIONS} for s in sides]
    unmatched = sorted(set(files[0]) ^ set(files[1]))
    if unmatched:
        raise UnifuseError(f"{len(unmatched)} image(s) under {folder!r} have no partner of the same name in the "
                           f"other folder (preferred/ vs rejected/): {', '.join(unmatched[:5])}; add or remove them")
    names = sorted(files[0])
    if not names:
        raise UnifuseError(f"no preference pairs under {folder!r}: add images DIR/preferred/NAME.png with "
                           "DIR/rejected/NAME.png")
    shape = list(info["shape"])
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise UnifuseError(f"folder pairs need an image base with 1 or 3 channels, got data shape {shape}; use "
                           "pairs='reward'")
    x_w, x_l = (_load_images([side[k] for k in names], shape, int(info.get("pad", 0))) for side in files)
    cond = {}
    if conditioning == "class":
        cond = {"class_labels": torch.tensor([_class_of(k, info, folder) for k in names], dtype=torch.long)}
    return Pairs(x_w, x_l, cond)


def _load_images(paths: list, shape: list, pad: int) -> torch.Tensor:
    """Images -> float32 [N, C, H, W] in [-1, 1], resized inside `pad` pixels of background -1 (MNIST-style)."""
    from PIL import Image

    from ..data.images import from_uint8

    c, h, w = shape
    out = []
    for p in paths:
        try:
            with Image.open(p) as f:
                im = f.convert("L" if c == 1 else "RGB")
        except (OSError, ValueError, SyntaxError) as err:
            raise UnifuseError(f"cannot read preference image {str(p)!r} ({err}); fix or remove it") from None
        a = np.asarray(im.resize((w - 2 * pad, h - 2 * pad), Image.Resampling.LANCZOS), dtype=np.uint8)
        out.append(a.reshape(h - 2 * pad, w - 2 * pad, c))
    return from_uint8(np.stack(out), pad)


def _class_of(name: str, info: dict, folder: str) -> int:
    """The class of a pair DIR/preferred/<class>/NAME: <class> an index or one of info["class_names"]."""
    parts, k = name.split("/"), int(info.get("num_classes", 0))
    names = [str(c) for c in info.get("class_names", [])]
    if len(parts) > 1 and parts[0] in names:
        return names.index(parts[0])
    if len(parts) > 1 and parts[0].isdigit() and int(parts[0]) < k:
        return int(parts[0])
    raise UnifuseError(f"pair {name!r} under {folder!r} needs a class sub-folder for this class-conditional base: "
                       f"DIR/preferred/<class>/NAME.png with <class> in 0..{k - 1} or a class name")


# --- the methods -----------------------------------------------------------------------------------------------
@dataclass
class DiffusionDPO:
    """Diffusion-DPO on preference pairs (Wallace et al. 2023).

    beta            the inverse temperature on u (mean-over-dims loss differences; the module states its units)
    pairs           "reward" (ranked samples) or a folder DIR with preferred/ and rejected/
    pairs_per_step  pairs per update (0: half the loop's batch, at least 1)
    candidates      samples per condition when ranking by reward; the best is paired with the worst
    online          rank samples of the current policy instead of the reference (pairs "reward", pool 0)
    pool            pairs drawn once in setup and reused (0: fresh pairs every round; folders are always stored)

    There is no `kl` option: beta is DPO's regulariser toward the reference (beta_KL = beta / (T D), module).
    Logged: loss, reward (mean over winners and losers), reward_w, reward_l, reward_margin (mean r_w - r_l, for
    ranked pairs), implicit_acc (share of pairs with u > 0), implicit_margin (mean u), grad_norm, kl = None.
    """

    name: ClassVar[str] = "dpo"
    differentiable: ClassVar[bool] = False

    beta: float = 50.0
    pairs: str = "reward"
    pairs_per_step: int = 0
    candidates: int = 2
    online: bool = False
    pool: int = 0

    def __post_init__(self):
        if not self.beta > 0:
            raise UnifuseError(f"{self.name}: beta must be > 0, got {self.beta}")
        if self.candidates < 2:
            raise UnifuseError(f"{self.name}: candidates must be >= 2 (a pair needs two samples), got "
                               f"{self.candidates}")
        if self.pool < 0 or self.pairs_per_step < 0:
            raise UnifuseError(f"{self.name}: pool and pairs_per_step must be >= 0, got {self.pool}, "
                               f"{self.pairs_per_step}")
        if self.online and (self.pool or self.pairs != "reward"):
            raise UnifuseError(f"{self.name}: online=True ranks fresh samples of the policy each round; it needs "
                               f"pairs='reward' and pool=0 (got pairs={self.pairs!r}, pool={self.pool})")

    def loss(self, l_w, l_l, r_w, r_l) -> torch.Tensor:
        return dpo_loss(l_w, l_l, r_w, r_l, self.beta)

    def setup(self, ctx) -> None:
        self.stored = None
        if self.pairs != "reward":
            self.stored = _to(folder_pairs(self.pairs, ctx.info, ctx.conditioning), ctx.device)
        elif self.pool:
            gen = torch.Generator().manual_seed(int(ctx.seed) + 22)
            n, chunks = self._per_step(ctx), []
            for start in range(0, self.pool, n):
                chunks.append(reward_pairs(ctx, min(n, self.pool - start), self.candidates, ctx.reference, gen))
            self.stored = _concat(chunks)
            ctx.add_state("dpo_pairs", self.stored)

    def _per_step(self, ctx) -> int:
        return self.pairs_per_step or max(1, ctx.batch // 2)

    def step(self, ctx, generator, step: int) -> dict:
        n = self._per_step(ctx)
        # 1. the round's pairs: fresh ranked samples, or a draw from the pool / folder
        if self.stored is None:
            batch = reward_pairs(ctx, n, self.candidates, ctx.policy if self.online else ctx.reference, generator)
        else:
            batch = self.stored.select(torch.randint(len(self.stored), (n,), generator=generator))
        # 2. shared t and noise per pair; policy and reference denoising losses; one update
        objective = denoising_objective(ctx.objective)
        l_w, l_l, r_w, r_l = pair_losses(ctx.policy, ctx.reference, objective, batch.x_w, batch.x_l, batch.cond,
                                         generator)
        loss = self.loss(l_w, l_l, r_w, r_l).mean()
        grad_norm = ctx.update(loss)
        u = implicit_margin(l_w, l_l, r_w, r_l).detach()
        out = {"loss": float(loss.detach()), "grad_norm": grad_norm, "implicit_acc": float((u > 0).double().mean()),
               "implicit_margin": float(u.mean()), "kl": None}
        out.update(_reward_scalars(ctx, batch))
        return out


@dataclass
class DiffusionIPO(DiffusionDPO):
    """IPO on preference pairs: (u - 1/(2 beta))^2 (Azar et al. 2023), the same pairs and units as DiffusionDPO.

    Where DPO keeps pushing pairs that are always ranked the same way (its loss only tends to 0), IPO stops where
    E[(u - c)^2] is least, c = 1/(2 beta). When u = delta * g is linear in a parameter delta (the Gaussian check's
    mean: the quadratic part of L cancels in L_w - L_l), that is delta* = c E[g] / E[g^2] over pairs, t and noise:
    the per-pair noise of u (E[g^2] > E[g]^2) makes IPO more conservative than its margin target suggests. On the
    1-D Gaussian check E[g] ~ 0.08, std(g) ~ 0.12, so delta* ~ 3.7 c; beta = 5 (c = 0.1) gives delta* ~ 0.37 base
    standard deviations (tests/finetune/test_dpo.py), hence the default."""

    name: ClassVar[str] = "ipo"
    beta: float = 5.0

    def loss(self, l_w, l_l, r_w, r_l) -> torch.Tensor:
        return ipo_loss(l_w, l_l, r_w, r_l, self.beta)


def _to(pairs: Pairs, device) -> Pairs:
    move = (lambda v: None if v is None else v.to(device))
    return Pairs(move(pairs.x_w), move(pairs.x_l), {k: move(v) for k, v in pairs.cond.items()},
                 move(pairs.r_w), move(pairs.r_l))


def _concat(chunks: list) -> Pairs:
    cat = (lambda vs: None if vs[0] is None else torch.cat(vs))
    first = chunks[0]
    return Pairs(cat([c.x_w for c in chunks]), cat([c.x_l for c in chunks]),
                 {k: cat([c.cond[k] for c in chunks]) for k in first.cond},
                 cat([c.r_w for c in chunks]), cat([c.r_l for c in chunks]))


@torch.no_grad()
def _reward_scalars(ctx, batch: Pairs) -> dict:
    """reward (mean over winners and losers), reward_w, reward_l and, for ranked pairs, reward_margin
    (mean r_w - r_l); folder pairs are scored by ctx.reward when there is one (reward None otherwise)."""
    r_w, r_l, ranked = batch.r_w, batch.r_l, batch.r_w is not None
    if not ranked:
        if ctx.reward is None:
            return {"reward": None}
        r_w, r_l = ctx.reward(batch.x_w, batch.cond), ctx.reward(batch.x_l, batch.cond)
    r_w, r_l = r_w.double(), r_l.double()
    out = {"reward": float(torch.cat([r_w, r_l]).mean()), "reward_w": float(r_w.mean()), "reward_l": float(r_l.mean())}
    return out | ({"reward_margin": float((r_w - r_l).mean())} if ranked else {})


__all__ = ["DiffusionDPO", "DiffusionIPO", "Pairs", "denoising_losses", "denoising_objective", "dpo_loss",
           "folder_pairs", "implicit_margin", "ipo_loss", "pair_losses", "reward_pairs"]
