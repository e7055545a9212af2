"""Conditions: what a model was trained on, the null condition, conditioning dropout and stacking.

A condition is the keyword arguments a network takes besides (x, t): `class_labels` ([B] ints, -1 the null
class) and `text` (pooled [B, d] or tokens [B, L, d] with `text_mask` [B, L]). Classifier-free guidance
(Ho & Salimans 2022; ALGORITHMS card 11) trains with the condition dropped to the null and samples with both;
the errors here name the CLI flags that set each condition.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import UnifuseError


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
        from .text import null_text  # lazy: only text models need the encoder

        text = cond["text"]
        tokens, mask, pooled = null_text(text.shape[-1], device=text.device, dtype=text.dtype)
        if text.ndim == 2:
            out["text"] = pooled.expand(batch, -1)
        else:
            out["text"], out["text_mask"] = tokens.expand(batch, -1, -1), mask.expand(batch, -1)
    return out


def drop_condition(cond: Mapping, p: float, generator: torch.Generator | None = None, uncond=None) -> dict:
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
        a, b = batch_value(cond[key], batch), batch_value(value, batch).to(torch.as_tensor(cond[key]).device)
        a, b = _same_length(key, a, b)
        m = drop.to(a.device).reshape((-1,) + (1,) * (a.ndim - 1))
        out[key] = torch.where(m, b.to(a.dtype), a)
    if "text_mask" not in cond and "text_mask" in null and torch.as_tensor(cond.get("text", 0)).ndim == 3:
        mine = torch.ones(out["text"].shape[:2], dtype=torch.bool, device=out["text"].device)
        nm = _pad_tokens(batch_value(null["text_mask"], batch), mine.shape[1]).to(mine.device)
        out["text_mask"] = torch.where(drop.to(mine.device)[:, None], nm, mine)
    return out


def batch_value(v, batch: int):
    """A condition value as a [batch, ...] tensor (a scalar or a [1, ...] value is broadcast)."""
    v = torch.as_tensor(v)
    if v.ndim == 0:
        return v.expand(batch)
    return v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 and batch != 1 else v


def _pad_tokens(v: torch.Tensor, L: int) -> torch.Tensor:
    """Pad dim 1 (tokens) with zeros (False for masks) up to length L."""
    zeros = torch.zeros((v.shape[0], L - v.shape[1]) + tuple(v.shape[2:]), dtype=v.dtype, device=v.device)
    return torch.cat([v, zeros], 1)


def _same_length(key: str, a: torch.Tensor, b: torch.Tensor):
    """Token text (and its mask) of two halves padded to one length; other values as they are."""
    if key in ("text", "text_mask") and a.ndim >= 2 and b.ndim >= 2 and a.shape[1] != b.shape[1] and \
            (key == "text_mask" or a.ndim == 3):
        L = max(a.shape[1], b.shape[1])
        return _pad_tokens(a, L), _pad_tokens(b, L)
    return a, b


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
        a, b = _same_length(key, batch_value(a, b1), batch_value(b, b2))
        dtype = torch.promote_types(a.dtype, b.dtype)
        out[key] = torch.cat([a.to(device=b.device, dtype=dtype), b.to(dtype)])
    return out


def _with_mask(cond: Mapping, batch: int) -> dict:
    """Give token text an all-True mask when it has none, so it can be stacked with a masked half."""
    cond = dict(cond)
    text = cond.get("text")
    if text is not None and torch.as_tensor(text).ndim == 3 and cond.get("text_mask") is None:
        text = batch_value(text, batch)
        cond["text_mask"] = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    return cond


def select(cond: Mapping, idx: torch.Tensor, batch: int) -> dict:
    """The rows `idx` of every condition value (values with batch 1 are broadcast first)."""
    return {k: (batch_value(v, batch)[idx.to(torch.as_tensor(v).device)] if v is not None else None)
            for k, v in cond.items()}


__all__ = ["conditioning", "check_condition", "null_condition", "drop_condition", "stack_conditions",
           "batch_value", "select"]
