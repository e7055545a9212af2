"""Guidance as model -> model transforms (DESIGN rule 7, after EDM2): the guided object is a
`DiffusionModel` whose `evaluate` returns the guided (x0_hat, eps_hat), so every sampler and every path
(`guided.on(other_path)`) works with it unchanged.

- `classifier_free`: Ho & Salimans (2022), `D = D_u + w (D_c - D_u)` with w = 1 the conditional model
  (ALGORITHMS card 11), optional rescale of Lin et al. (2023) (card 4) and a noise-level interval of
  Kynkaanniemi et al. (2024) (card 11b).
- `autoguidance`: Karras et al. (2024), "Guiding a diffusion model with a bad version of itself":
  `D = D_weak + w (D - D_weak)`.
- `classifier_guidance`: Dhariwal & Nichol (2021), score += s * grad_x log p(y | x_t) (card 10).

The interval is a set of EDM noise levels `sigma_lo < sigma/alpha <= sigma_hi` (or of log-SNR values),
never a fraction of steps, so it means the same on every grid, sampler and path. Outside it only the
conditional network runs. Each guided model counts its network evaluations (`cond_evals`,
`uncond_evals`, `weak_evals`, `classifier_evals`; one batched call counts once per role).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from .errors import UnifuseError, choose
from .model import DiffusionModel, Evaluation, WrappedModel, batch_times
from .parameterization.convert import KINDS, coefficients, compute_dtype, from_pair, to_pair
from .paths.base import as_time

COMBINE_KINDS = KINDS + ("edm", "trigflow")
COUNTERS = ("cond_evals", "uncond_evals", "weak_evals", "classifier_evals")


# --- what a model was trained on ---------------------------------------------------------------
def conditioning(model) -> dict:
    """{"num_classes": K or None, "text_dim": d or None} read off the network; None = unknown, 0 = not trained."""
    for _ in range(16):  # unwrap re-expressed and guided models
        inner = getattr(model, "source", None) or getattr(model, "inner", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    net = getattr(model, "net", model)
    net = getattr(net, "module", net)  # DDP / compiled wrappers
    net = getattr(net, "_orig_mod", net)
    config = getattr(net, "config", None)
    if isinstance(config, Mapping) and ("num_classes" in config or "text_dim" in config):
        return {"num_classes": int(config.get("num_classes") or 0), "text_dim": int(config.get("text_dim") or 0)}
    if hasattr(net, "gm") and hasattr(net, "conditional"):  # the Gaussian-mixture oracle
        return {"num_classes": net.gm.K if net.conditional else 0, "text_dim": 0}
    return {"num_classes": None, "text_dim": None}


def check_condition(model, class_labels=None, text=None, **_) -> None:
    """Raise one clear error when a class or a prompt does not fit what `model` was trained on."""
    info = conditioning(model)
    k, d = info["num_classes"], info["text_dim"]
    if class_labels is not None:
        if k == 0:
            raise UnifuseError("class labels were given but this model was trained without classes; "
                               "train a class-conditional preset (digits-cond, mnist-cond) or drop --class")
        labels = torch.as_tensor(class_labels)
        if k and labels.device.type == "cpu" and labels.numel() and bool(((labels < -1) | (labels >= k)).any()):
            bad = int(labels[(labels < -1) | (labels >= k)][0])
            raise UnifuseError(f"class {bad} is outside the trained range 0..{k - 1} of this model; "
                               f"choose a class in 0..{k - 1} (or -1 for unconditional)")
    if text is not None and d == 0:
        raise UnifuseError("a prompt was given but this model was trained without text; "
                           "train a caption-conditional preset (digits-text, mnist-text) or use --class / no prompt")
    if text is not None and d and torch.as_tensor(text).shape[-1] != d:
        raise UnifuseError(f"text embeddings have width {torch.as_tensor(text).shape[-1]} but the model expects {d}; "
                           "encode prompts with unifuse.data.text (all-MiniLM-L6-v2, 384) as in training")


# --- the null condition --------------------------------------------------------------------------
def null_condition(cond: Mapping, batch: int) -> dict:
    """The unconditional input for `cond`: class -1, and the encoding of "" for text (ALGORITHMS card 11)."""
    if "class_labels" not in cond and "text" not in cond:
        raise UnifuseError("classifier-free guidance needs a condition to guide towards: pass class_labels "
                           "(--class) or a prompt (--prompt); an unconditional model cannot be guided this way "
                           "(use classifier_guidance with a noise-conditional classifier instead)")
    out = {k: v for k, v in cond.items() if k not in ("class_labels", "text", "text_mask")}
    if "class_labels" in cond:
        ref = torch.as_tensor(cond["class_labels"])
        out["class_labels"] = torch.full((batch,), -1, dtype=torch.long, device=ref.device)
    if cond.get("text") is not None:
        from .data.text import null_text  # lazy: only text models need the encoder

        text = cond["text"]
        tokens, mask, pooled = null_text(text.shape[-1], device=text.device, dtype=text.dtype)
        if text.ndim == 2:
            out["text"] = pooled.expand(batch, -1)
        else:
            out["text"], out["text_mask"] = tokens.expand(batch, -1, -1), mask.expand(batch, -1)
    return out


def drop_condition(cond: Mapping, p: float, generator: Optional[torch.Generator] = None, uncond=None) -> dict:
    """Conditioning dropout for classifier-free guidance training (Ho & Salimans 2022): each sample's
    condition becomes the null (class -1, the encoding of "" for text) with probability p."""
    if not cond or p <= 0:
        return dict(cond)
    ref = next(torch.as_tensor(v) for v in cond.values() if v is not None)
    batch = ref.shape[0] if ref.ndim else 1
    null = dict(uncond) if uncond is not None else null_condition(cond, batch)
    drop = torch.rand(batch, generator=generator) < p
    out = dict(cond)
    for key, value in null.items():
        if key not in cond or cond[key] is None:
            continue
        a, b = _batch_value(cond[key], batch), _batch_value(value, batch).to(torch.as_tensor(cond[key]).device)
        if key in ("text", "text_mask") and a.ndim >= 2 and a.shape[1] != b.shape[1] and (key == "text_mask" or a.ndim == 3):
            L = max(a.shape[1], b.shape[1])
            a, b = _pad_tokens(a, L), _pad_tokens(b, L)
        m = drop.to(a.device).reshape((-1,) + (1,) * (a.ndim - 1))
        out[key] = torch.where(m, b.to(a.dtype), a)
    if "text_mask" not in cond and "text_mask" in null and torch.as_tensor(cond.get("text", 0)).ndim == 3:
        mine = torch.ones(out["text"].shape[:2], dtype=torch.bool, device=out["text"].device)
        nm = _pad_tokens(_batch_value(null["text_mask"], batch), mine.shape[1]).to(mine.device)
        out["text_mask"] = torch.where(drop.to(mine.device)[:, None], nm, mine)
    return out


def _batch_value(v, batch: int):
    """A condition value as a [batch, ...] tensor (a scalar or a [1, ...] value is broadcast)."""
    v = torch.as_tensor(v)
    if v.ndim == 0:
        return v.expand(batch)
    return v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 and batch != 1 else v


def _pad_tokens(v: torch.Tensor, L: int) -> torch.Tensor:
    """Pad dim 1 (tokens) with zeros (False for masks) up to length L."""
    zeros = torch.zeros((v.shape[0], L - v.shape[1]) + tuple(v.shape[2:]), dtype=v.dtype, device=v.device)
    return torch.cat([v, zeros], 1)


def stack_conditions(first: Mapping, second: Mapping, b1: int, b2: int) -> dict:
    """One condition dict for the batch [first; second] (token sequences padded, masks padded with False)."""
    first, second = _with_mask(first, b1), _with_mask(second, b2)
    out = {}
    for key in dict.fromkeys(list(first) + list(second)):
        a, b = first.get(key), second.get(key)
        if a is None and b is None:
            continue
        if a is None or b is None:
            raise UnifuseError(f"condition {key!r} is given for one half of a guided batch only; pass it in both "
                               "cond and uncond")
        a, b = _batch_value(a, b1), _batch_value(b, b2)
        if key in ("text", "text_mask") and a.ndim >= 2 and b.ndim >= 2 and a.shape[1] != b.shape[1] and \
                (key == "text_mask" or a.ndim == 3):
            L = max(a.shape[1], b.shape[1])
            a, b = _pad_tokens(a, L), _pad_tokens(b, L)
        out[key] = torch.cat([a.to(device=b.device, dtype=torch.promote_types(a.dtype, b.dtype)), b.to(torch.promote_types(a.dtype, b.dtype))])
    return out


def _with_mask(cond: Mapping, batch: int) -> dict:
    """Give token text an all-True mask when it has none, so it can be stacked with a masked half."""
    cond = dict(cond)
    text = cond.get("text")
    if text is not None and torch.as_tensor(text).ndim == 3 and cond.get("text_mask") is None:
        text = _batch_value(text, batch)
        cond["text_mask"] = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    return cond


def _select(cond: Mapping, idx: torch.Tensor, batch: int) -> dict:
    return {k: (_batch_value(v, batch)[idx.to(torch.as_tensor(v).device)] if v is not None else None)
            for k, v in cond.items()}


# --- the guided model ------------------------------------------------------------------------------
class GuidedModel(WrappedModel):
    """Base of the guided models: a DiffusionModel on `inner.path` whose `evaluate` is guided.

    interval: (sigma_lo, sigma_hi] in EDM noise level sigma/alpha; interval_log_snr: [lam_lo, lam_hi)
    in log-SNR (the same set). Outside it the plain conditional model is returned.
    """

    what = "guidance"

    def __init__(self, inner: DiffusionModel, scale: float, interval=None, interval_log_snr=None, kind: str = "x0"):
        super().__init__(inner)
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise UnifuseError(f"guidance scale must be a number (1 = no guidance), got {scale!r}") from None
        if not math.isfinite(scale):
            raise UnifuseError(f"guidance scale must be finite, got {scale}")
        self.scale, self.kind = scale, choose("guidance kind", kind, COMBINE_KINDS)
        self.interval = _interval(interval, interval_log_snr)
        self.reset_counts()

    def reset_counts(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)

    def counts(self) -> dict:
        """Network evaluations so far by role (a batched cond+uncond call counts once for each)."""
        return {name: getattr(self, name) for name in COUNTERS}

    def inside(self, t, batch: int) -> torch.Tensor:
        """[batch] bool on t's own device: where guidance is on (sigma_lo < sigma/alpha <= sigma_hi)."""
        t = as_time(t).to(torch.float64)
        t = t.expand(batch) if t.ndim == 0 else t
        if self.interval is None:
            return torch.ones(t.shape, dtype=torch.bool, device=t.device)
        lo, hi = self.interval
        s = self.path.sigma_edm(t)
        return (s > lo) & (s <= hi)

    def combine(self, x, t, low: Evaluation, high: Evaluation, weight: float) -> Evaluation:
        """low + weight (high - low), taken in prediction kind `self.kind` (card 11; affine, so kind-free)."""
        c = coefficients(self.path, t, x)
        xc = x.to(compute_dtype(x))
        p_low = from_pair(self.kind, low.x0, low.eps, xc, c, self.sigma_data)
        p_high = from_pair(self.kind, high.x0, high.eps, xc, c, self.sigma_data)
        guided = p_low + weight * (p_high - p_low)
        guided = self.adjust(guided, p_high)
        # where `kind` cannot be converted back (eps at alpha = 0, x0 at sigma = 0), the affine
        # combination of the pair itself is the exact answer of plain guidance
        fallback = (low.x0 + weight * (high.x0 - low.x0), low.eps + weight * (high.eps - low.eps))
        x0, eps = _pair_of(self.kind, guided, xc, c, self.sigma_data, fallback)
        return Evaluation(x0, eps, high.var_frac)

    def adjust(self, guided, reference):
        return guided

    def extra_repr(self) -> str:
        return f"scale={self.scale}, interval={self.interval}, kind={self.kind!r}, path={self.path!r}"


def _pair_of(kind, out, xc, c, sigma_data, fallback):
    """to_pair, except where it divides by zero at an end of the path: there `fallback` (x0, eps) is used."""
    if kind == "x0":
        pos = c.sigma > 0
        eps = torch.where(pos, (xc - c.alpha * out) / torch.where(pos, c.sigma, torch.ones_like(c.sigma)), fallback[1])
        return out, eps
    if kind == "eps":
        pos = c.alpha > 0
        x0 = torch.where(pos, (xc - c.sigma * out) / torch.where(pos, c.alpha, torch.ones_like(c.alpha)), fallback[0])
        return x0, out
    if kind in ("score", "edm", "trigflow") and c.sigma.device.type == "cpu" and bool((c.sigma == 0).any()):
        return fallback  # these kinds are singular at the data end
    return to_pair(kind, out, xc, c, sigma_data)


def _interval(interval, interval_log_snr):
    """(sigma_lo, sigma_hi] from either form; None when guidance is on everywhere."""
    if interval is not None and interval_log_snr is not None:
        raise UnifuseError("give the guidance interval once: interval=(sigma_lo, sigma_hi) or interval_log_snr=(lam_lo, lam_hi)")
    if interval is None and interval_log_snr is None:
        return None
    pair = interval if interval is not None else interval_log_snr
    try:
        a, b = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise UnifuseError(f"a guidance interval is two numbers (low, high), got {pair!r}") from None
    if interval_log_snr is not None:  # lam in [lam_lo, lam_hi)  <=>  sigma_edm = exp(-lam/2) in (e^-hi/2, e^-lo/2]
        if not a < b:
            raise UnifuseError(f"log-SNR interval must have lam_lo < lam_hi, got ({a}, {b})")
        a, b = math.exp(-b / 2), math.exp(-a / 2)
    if a < 0 or b < a:
        raise UnifuseError(f"guidance interval must satisfy 0 <= sigma_lo <= sigma_hi (EDM sigma = sigma/alpha), got ({a}, {b})")
    return (a, b)


def parse_interval(text: str) -> tuple:
    """"LO,HI" (EDM sigma = sigma/alpha; "inf" allowed) -> (LO, HI), checked."""
    parts = str(text).replace(" ", "").split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return _interval((float(parts[0]), float(parts[1])), None)
    except ValueError:
        raise UnifuseError(f"guidance interval must be 'LO,HI' in EDM sigma (e.g. 0.3,5), got {text!r}") from None


class ClassifierFree(GuidedModel):
    """Classifier-free guidance: D = D(null) + w (D(c) - D(null)) inside the interval, D(c) outside."""

    def __init__(self, inner, scale, uncond=None, rescale: float = 0.0, interval=None, interval_log_snr=None,
                 kind: str = "x0", batch: bool = True):
        super().__init__(inner, scale, interval, interval_log_snr, kind)
        if not 0.0 <= float(rescale) <= 1.0:
            raise UnifuseError(f"guidance rescale phi must lie in [0, 1] (Lin et al. use 0.7), got {rescale}")
        info = conditioning(inner)
        if info["num_classes"] == 0 and info["text_dim"] == 0:
            raise UnifuseError("classifier-free guidance needs a conditional model, but this one was trained without "
                               "classes or text; train digits-cond / digits-text (or use classifier_guidance)")
        self.uncond, self.rescale, self.batch = uncond, float(rescale), bool(batch)

    def unconditional(self, cond: Mapping, batch: int) -> dict:
        """The null condition for this batch (values with batch 1 are broadcast)."""
        if self.uncond is None:
            out = null_condition(cond, batch)
        elif callable(self.uncond):
            out = dict(self.uncond(cond))
        elif isinstance(self.uncond, Mapping):
            out = {**{k: v for k, v in cond.items() if k not in self.uncond}, **self.uncond}
        else:
            raise UnifuseError(f"uncond must be a dict of condition values or a callable, got {type(self.uncond).__name__}")
        return {k: (None if v is None else _batch_value(v, batch)) for k, v in out.items()}

    def adjust(self, guided, reference):
        """Lin et al. (2023) rescale: match the std of the conditional prediction, blended by phi."""
        if self.rescale == 0.0:
            return guided
        dims = tuple(range(1, guided.ndim))
        ratio = reference.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
        return self.rescale * guided * ratio + (1 - self.rescale) * guided

    def evaluate(self, x: torch.Tensor, t, **cond) -> Evaluation:
        """Guided (x0_hat, eps_hat) at (x_t, t); cond and null batched in one call where possible."""
        check_condition(self.inner, **cond)
        on = self.inside(t, x.shape[0])  # decided where t lives (CPU for samplers: no device sync)
        t = batch_times(t, x)
        if self.scale == 1.0:  # exactly the conditional model
            self.cond_evals += 1
            return self.inner.evaluate(x, t, **cond)
        B = x.shape[0]
        uncond = self.unconditional(cond, B)
        if self.scale == 0.0:  # exactly the unconditional model
            self.uncond_evals += 1
            return self.inner.evaluate(x, t, **uncond)
        if on.device.type == "cpu" and not bool(on.any()):
            self.cond_evals += 1
            return self.inner.evaluate(x, t, **cond)
        if on.device.type != "cpu" or bool(on.all()):
            idx = None
        else:
            idx = on.nonzero().reshape(-1)
        xu, tu, cu = (x, t, uncond) if idx is None else (x[idx], t[idx], _select(uncond, idx, B))
        if self.batch:
            both = stack_conditions(cu, cond, xu.shape[0], B)
            ev = self.inner.evaluate(torch.cat([xu, x]), torch.cat([tu, t]), **both)
            n = xu.shape[0]
            e_u = Evaluation(ev.x0[:n], ev.eps[:n], None if ev.var_frac is None else ev.var_frac[:n])
            e_c = Evaluation(ev.x0[n:], ev.eps[n:], None if ev.var_frac is None else ev.var_frac[n:])
        else:
            e_u, e_c = self.inner.evaluate(xu, tu, **cu), self.inner.evaluate(x, t, **cond)
        self.cond_evals += 1
        self.uncond_evals += 1
        if idx is None:
            out = self.combine(x, t, e_u, e_c, self.scale)
            if on.device.type != "cpu":  # a device-side mask: keep the conditional output outside
                m = on.to(x.device).reshape((-1,) + (1,) * (x.ndim - 1))
                out = Evaluation(torch.where(m, out.x0, e_c.x0), torch.where(m, out.eps, e_c.eps), out.var_frac)
            return out
        sub = self.combine(x[idx], t[idx], e_u, _take(e_c, idx), self.scale)
        x0, eps = e_c.x0.clone(), e_c.eps.clone()
        x0[idx], eps[idx] = sub.x0, sub.eps
        return Evaluation(x0, eps, e_c.var_frac)


def _take(e: Evaluation, idx) -> Evaluation:
    return Evaluation(e.x0[idx], e.eps[idx], None if e.var_frac is None else e.var_frac[idx])


class AutoGuided(GuidedModel):
    """Autoguidance (Karras et al. 2024): D = D_weak + w (D - D_weak), both with the same condition."""

    def __init__(self, inner, weak: DiffusionModel, scale, interval=None, interval_log_snr=None, kind: str = "x0"):
        super().__init__(inner, scale, interval, interval_log_snr, kind)
        if not isinstance(weak, DiffusionModel):
            raise UnifuseError(f"the weak model must be a uf.DiffusionModel, got {type(weak).__name__}")
        self.weak = weak if weak.path == inner.path else weak.on(inner.path)

    def evaluate(self, x: torch.Tensor, t, **cond) -> Evaluation:
        on = self.inside(t, x.shape[0])  # decided where t lives (CPU for samplers: no device sync)
        t = batch_times(t, x)
        self.cond_evals += 1
        e_c = self.inner.evaluate(x, t, **cond)
        if self.scale == 1.0:
            return e_c
        if on.device.type == "cpu" and not bool(on.any()):
            return e_c
        self.weak_evals += 1
        e_w = self.weak.evaluate(x, t, **cond)
        out = self.combine(x, t, e_w, e_c, self.scale)
        m = on.to(x.device).reshape((-1,) + (1,) * (x.ndim - 1))
        return Evaluation(torch.where(m, out.x0, e_c.x0), torch.where(m, out.eps, e_c.eps), e_c.var_frac)


class ClassifierGuided(GuidedModel):
    """Classifier guidance (Dhariwal & Nichol 2021): score_y = score + s grad_x log p(y | x_t), i.e.
    eps -= s sigma grad and x0 += s (sigma^2 / alpha) grad (ALGORITHMS card 10)."""

    def __init__(self, inner, classifier: Callable, scale, interval=None, interval_log_snr=None,
                 pass_labels: bool = False):
        super().__init__(inner, scale, interval, interval_log_snr, "eps")
        if not callable(classifier):
            raise UnifuseError(f"classifier must be callable as classifier(x_t, t) -> logits, got {type(classifier).__name__}")
        self.classifier, self.pass_labels = classifier, bool(pass_labels)

    def log_prob_grad(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, **cond) -> torch.Tensor:
        """grad_x log p(y | x_t) from the classifier's logits (on its own path when it has one)."""
        path = getattr(self.classifier, "path", None)
        with torch.enable_grad():
            xg = x.detach().to(compute_dtype(x)).requires_grad_(True)
            xin, tin = xg, t
            if path is not None and path != self.path:  # equal log-SNR, x rescaled (NOTATION section 5)
                tin = path.t_from_log_snr(self.path.log_snr(t))
                scale = torch.sqrt((path.alpha(tin) ** 2 + path.sigma(tin) ** 2) /
                                   (self.path.alpha(t) ** 2 + self.path.sigma(t) ** 2))
                xin = xg * scale.to(xg.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            logits = self.classifier(xin, tin, **cond)
            logp = torch.log_softmax(logits.to(xg.dtype), dim=-1)
            picked = logp.gather(1, labels.clamp(min=0).reshape(-1, 1)).reshape(-1)
            picked = torch.where(labels >= 0, picked, torch.zeros_like(picked))  # -1: no guidance
            (grad,) = torch.autograd.grad(picked.sum(), xg)
        self.classifier_evals += 1
        return grad.detach()

    def evaluate(self, x: torch.Tensor, t, **cond) -> Evaluation:
        on = self.inside(t, x.shape[0])  # decided where t lives (CPU for samplers: no device sync)
        t = batch_times(t, x)
        if cond.get("class_labels") is None:
            raise UnifuseError("classifier guidance needs the target classes: pass class_labels (--class)")
        labels = _batch_value(cond["class_labels"], x.shape[0]).to(x.device).long()
        rest = {k: v for k, v in cond.items() if k != "class_labels"}
        self.cond_evals += 1
        e = self.inner.evaluate(x, t, **(cond if self.pass_labels else rest))
        if self.scale == 0.0:
            return e
        if on.device.type == "cpu" and not bool(on.any()):
            return e
        grad = self.log_prob_grad(x, t, labels, **rest) * self.scale
        c = coefficients(self.path, t, x)
        m = on.to(x.device).reshape((-1,) + (1,) * (x.ndim - 1))
        eps = e.eps - c.sigma * grad
        pos = c.alpha > 0  # at alpha = 0 (pure noise) p(y | x_t) is the prior and the gradient vanishes
        x0 = e.x0 + torch.where(pos, c.sigma**2 / torch.where(pos, c.alpha, torch.ones_like(c.alpha)), torch.zeros_like(c.alpha)) * grad
        return Evaluation(torch.where(m, x0, e.x0), torch.where(m, eps, e.eps), e.var_frac)


# --- public constructors -----------------------------------------------------------------------------
def classifier_free(model: DiffusionModel, scale: float, *, uncond=None, rescale: float = 0.0, interval=None,
                    interval_log_snr=None, kind: str = "x0", batch: bool = True) -> ClassifierFree:
    """Classifier-free guidance of `model` with scale w (1 = conditional, 0 = unconditional; Ho & Salimans 2022).

    uncond: the null condition (default: class -1, the encoding of "" for text), as a dict or cond -> dict.
    rescale: Lin et al. (2023) phi in [0, 1], applied in prediction `kind`.
    interval: (sigma_lo, sigma_hi] in EDM sigma = sigma/alpha; interval_log_snr: [lam_lo, lam_hi).
    kind: the prediction kind the combination is taken in (plain CFG gives the same result in every kind).
    batch: evaluate the conditional and null inputs in one forward pass.
    """
    return ClassifierFree(model, scale, uncond, rescale, interval, interval_log_snr, kind, batch)


def autoguidance(model: DiffusionModel, weak_model: DiffusionModel, scale: float, *, interval=None,
                 interval_log_snr=None, kind: str = "x0") -> AutoGuided:
    """Autoguidance (Karras et al. 2024): guide `model` away from a weaker version of itself."""
    return AutoGuided(model, weak_model, scale, interval, interval_log_snr, kind)


def classifier_guidance(model: DiffusionModel, classifier: Callable, scale: float = 1.0, *, interval=None,
                        interval_log_snr=None, pass_labels: bool = False) -> ClassifierGuided:
    """Classifier guidance (Dhariwal & Nichol 2021) with a noise-conditional classifier(x_t, t) -> logits.

    The target classes come from `class_labels` at sampling time (-1 = no guidance for that sample);
    pass_labels=True also gives them to `model` (guidance on top of a class-conditional model).
    """
    return ClassifierGuided(model, classifier, scale, interval, interval_log_snr, pass_labels)


__all__ = ["classifier_free", "autoguidance", "classifier_guidance", "GuidedModel", "ClassifierFree",
           "AutoGuided", "ClassifierGuided", "null_condition", "drop_condition", "parse_interval", "stack_conditions", "check_condition", "conditioning"]
