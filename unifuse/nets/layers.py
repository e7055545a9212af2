"""Pieces shared by the network families: the noise-label embedding, the condition embedding and attention.

Two-time networks (few-step models: MeanFlow, Geng et al. 2025; shortcut models, Frans et al. 2024) also take the
end time r of a jump, in the same units as t: emb += Z(MLP([sinusoidal(t), sinusoidal(t - r)])) with Z a
zero-initialised layer, so a two-time net loaded from a one-time net's weights (strict=False) computes the same
function, and r = None means r = t (the instantaneous field).

Sinusoidal embedding as in the Transformer (Vaswani et al. 2017) and DDPM (Ho et al. 2020); class labels added to the
time embedding with a null class for classifier-free guidance (Ho & Salimans 2022); text cross-attention as in latent
diffusion (Rombach et al. 2022, ALGORITHMS card 12).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnifuseError

ATTENTION_IMPLS = ("auto", "sdpa", "math")


def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] noise labels -> [B, dim] features cos/sin(t f_i), f_i = max_period^(-i/half): from 1 to ~1/max_period."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # never lower: labels reach |t| ~ 1500
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    arg = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
    return F.pad(emb, (0, dim % 2))


def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters (the residual branch then starts as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def num_groups(channels: int) -> int:
    """GroupNorm groups: 32 at most, at least 4 channels per group."""
    g = min(32, max(1, channels // 4))
    while channels % g:
        g -= 1
    return g


def as_batch_labels(t, x: torch.Tensor) -> torch.Tensor:
    """Noise labels as a float [B] tensor on x's device (a scalar is broadcast to the batch)."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise UnifuseError(f"the noise label t must be a scalar or have shape [batch] = [{x.shape[0]}], "
                           f"got {tuple(t.shape)}")
    return t if t.dtype == torch.float64 else t.to(torch.float32)


class ConditionEmbedding(nn.Module):
    """emb = MLP(sinusoidal(t)) + E[class] + W pooled(text) [+ Z(MLP(sinusoidal(t), sinusoidal(t - r)))]: the
    vector that modulates every block.

    class_labels -1 is the null class (row num_classes of the table). text [B, L, d] is pooled by a masked mean;
    text [B, d] is taken as already pooled. two_times=True adds the end-time term (zero at initialisation; r = None
    means r = t).
    """

    def __init__(self, dim: int, freq_dim: int, num_classes: int = 0, text_dim: int = 0, two_times: bool = False):
        super().__init__()
        self.freq_dim, self.num_classes, self.text_dim = freq_dim, num_classes, text_dim
        self.time = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.classes = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.text = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim)) if text_dim else None
        self.gap = None
        if two_times:
            self.gap = nn.Sequential(nn.Linear(2 * freq_dim, dim), nn.SiLU(), zero_(nn.Linear(dim, dim)))

    def forward(self, t, x, class_labels=None, text=None, text_mask=None, r=None) -> torch.Tensor:
        t = as_batch_labels(t, x)
        emb = self.time(sinusoidal(t, self.freq_dim).to(self.time[0].weight.dtype))
        if r is not None or self.gap is not None:
            emb = emb + self.embed_gap(t, r, x)
        if class_labels is not None or self.classes is not None:
            emb = emb + self.embed_classes(class_labels, x)
        if text is not None:
            pooled = pool_text(self.check_text(text, x), text_mask)
            emb = emb + self.text(pooled.to(self.text[1].weight.dtype))
        return emb

    def embed_gap(self, t, r, x):
        """Z(MLP([sinusoidal(t), sinusoidal(t - r)])), r in t's units (None: r = t)."""
        if self.gap is None:
            raise UnifuseError("an end time r was given to a one-time network; build it with two_times=True "
                               "(a few-step MeanFlow / shortcut model)")
        r = t if r is None else as_batch_labels(r, x).to(t.dtype)
        feats = torch.cat([sinusoidal(t, self.freq_dim), sinusoidal(t - r, self.freq_dim)], 1)
        return self.gap(feats.to(self.gap[0].weight.dtype))

    def embed_classes(self, class_labels, x):
        if self.classes is None:
            raise UnifuseError("class_labels were given to an unconditional network; build it with num_classes=K")
        if class_labels is None:  # a conditional net called without labels is the null (unconditional) model
            class_labels = torch.full((x.shape[0],), -1, device=x.device, dtype=torch.long)
        labels = torch.as_tensor(class_labels, device=x.device).long().reshape(-1)
        if labels.shape[0] != x.shape[0]:
            raise UnifuseError(f"class_labels must have shape [batch] = [{x.shape[0]}], got {tuple(labels.shape)}")
        if labels.device.type == "cpu" and bool(((labels < -1) | (labels >= self.num_classes)).any()):
            raise UnifuseError(f"class_labels must lie in -1..{self.num_classes - 1} (-1 = null class), "
                               f"got {labels.min().item()}..{labels.max().item()}")
        return self.classes(torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels))

    def check_text(self, text, x):
        if self.text is None:
            raise UnifuseError("text was given to a network without text conditioning; build it with text_dim=D")
        if text.ndim not in (2, 3) or text.shape[0] != x.shape[0] or text.shape[-1] != self.text_dim:
            raise UnifuseError(f"text must be [batch, {self.text_dim}] (pooled) or [batch, L, {self.text_dim}] "
                               "(tokens) "
                               f"with batch {x.shape[0]}, got {tuple(text.shape)}")
        return text


def pool_text(text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Masked mean of token embeddings [B, L, d] -> [B, d] (a 2-D input is returned as is)."""
    if text.ndim == 2:
        return text
    if mask is None:
        return text.mean(1)
    m = mask.to(text.dtype)[..., None]
    return (text * m).sum(1) / m.sum(1).clamp_min(1.0)


def attend(q, k, v, mask=None, impl: str = "auto"):
    """softmax(q k^T / sqrt(d)) v over [B, heads, N, d]; mask [B, 1, 1, M] True = attend.

    "auto" uses the fused kernel and falls back to the explicit formula where the kernel lacks forward-mode AD
    (torch.func.jvp, as sCM training needs: demands item 13)."""
    if impl != "math":
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        except NotImplementedError:
            if impl == "sdpa":
                raise
    w = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        w = w.masked_fill(~mask, float("-inf"))
    return w.softmax(-1) @ v


class Attention(nn.Module):
    """Multi-head attention: self-attention, or cross-attention to a context with a learned null token
    (so a fully masked caption still has one key to attend to)."""

    def __init__(self, dim: int, heads: int, context_dim: int = 0, impl: str = "auto"):
        super().__init__()
        if dim % heads:
            raise UnifuseError(f"attention width {dim} is not divisible by heads={heads}; choose heads dividing it")
        if impl not in ATTENTION_IMPLS:
            raise UnifuseError(f"unknown attention impl {impl!r}; valid: {', '.join(ATTENTION_IMPLS)}")
        self.heads, self.impl = heads, impl
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.null = nn.Parameter(torch.zeros(1, 1, context_dim)) if context_dim else None

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """h [B, N, dim]; context [B, M, context_dim] and mask [B, M] (True = real token) for cross-attention."""
        B, N, dim = h.shape
        mask4 = None
        if self.null is not None:
            context = torch.cat([self.null.to(context.dtype).expand(B, 1, -1), context], 1)
            if mask is not None:
                keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=h.device), mask.bool()], 1)
                mask4 = keep[:, None, None, :]
        else:
            context = h
        k, v = self.kv(context.to(self.kv.weight.dtype)).chunk(2, dim=-1)
        def heads(z):  # [B, N, dim] -> [B, heads, N, dim / heads]
            return z.reshape(B, z.shape[1], self.heads, dim // self.heads).transpose(1, 2)

        o = attend(heads(self.q(h)), heads(k), heads(v), mask4, self.impl)
        return self.out(o.transpose(1, 2).reshape(B, N, dim))
