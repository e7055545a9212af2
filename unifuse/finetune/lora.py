"""Low-rank adapters for fine-tuning (LoRA, Hu et al. 2021), through the optional `peft` package.

A frozen weight W [out, in] (a convolution's W [out, in, k, k]) gains a trainable low-rank update

    W' = W + (alpha / r) B A,      A [r, in] (Kaiming-uniform at start),  B [out, r] (zero at start)

so the adapted network computes exactly the base network until the first update. Only A and B train: DPOK and DDPO
fine-tune Stable Diffusion this way (rank 4). `merged_state_dict` folds B A back into W without touching the
adapted network, so a fine-tuning run saves a plain checkpoint that every loader of the base reads.

    net = add_adapters(net, rank=8)          # in place; only lora_A / lora_B require grad
    plain.load_state_dict(merged_state_dict(net))     # or: merge_into(plain, net)
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import UnifuseError

ADAPTER = "default"            # peft's adapter name: one adapter per network
ADAPTED_KINDS = (nn.Linear, nn.Conv2d)


def _peft():
    try:
        import peft
    except ImportError:
        raise UnifuseError("LoRA needs the peft package: pip install 'unifuse[peft]'") from None
    return peft


def _lora_layers(net: nn.Module) -> dict:
    """name -> peft LoRA layer (a module that holds lora_A / lora_B and wraps `base_layer`)."""
    return {name: m for name, m in net.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer") and ADAPTER in getattr(m, "lora_A", {})}


def is_adapted(net: nn.Module) -> bool:
    """True when `net` carries LoRA adapters (from `add_adapters`)."""
    return bool(_lora_layers(net))


def adapter_parameters(net: nn.Module) -> list:
    """The adapters' parameters (every lora_A and lora_B weight): what the optimizer trains."""
    return [p for name, p in net.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def _targets(net: nn.Module, targets) -> list:
    """Full names of the modules to adapt: every nn.Linear and nn.Conv2d, or those whose name is one of `targets`
    or ends with "." + a target (peft's rule, e.g. "q" matches "mid.attn.q")."""
    layers = [name for name, m in net.named_modules() if isinstance(m, ADAPTED_KINDS) and name]
    if targets is None:
        chosen = layers
    else:
        targets = [targets] if isinstance(targets, str) else list(targets)
        chosen = [n for n in layers if any(n == t or n.endswith("." + t) for t in targets)]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
        if missing:
            shown = ", ".join(layers[:20]) + (", ..." if len(layers) > 20 else "")
            raise UnifuseError(f"LoRA targets {missing} name no nn.Linear or nn.Conv2d of the network; "
                               f"its adaptable layers are: {shown}")
    if not chosen:
        raise UnifuseError(f"the network {type(net).__name__} has no nn.Linear or nn.Conv2d layer to adapt with LoRA")
    return chosen


def add_adapters(net: nn.Module, rank: int = 8, alpha: float | None = None, targets=None,
                 dropout: float = 0.0) -> nn.Module:
    """Inject LoRA (W + (alpha / rank) B A, B = 0 at start) into every nn.Linear and nn.Conv2d of `net`, or the
    layers named in `targets`, and freeze everything else. Adapts `net` in place and returns it.

    rank     r, the rank of the update (>= 1)
    alpha    the update's scale numerator; default alpha = rank (scale 1)
    targets  module names (full, or a suffix after a dot like "q"); default: all Linear and Conv2d layers
    dropout  dropout on the adapters' input (0: none)
    """
    peft = _peft()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UnifuseError(f"LoRA rank must be a positive integer, got {rank!r}; e.g. rank=8")
    if not 0.0 <= float(dropout) < 1.0:
        raise UnifuseError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if is_adapted(net):
        raise UnifuseError(f"the network {type(net).__name__} already has LoRA adapters; add them once "
                           "(merge_into a plain copy first to stack a second round)")
    names = _targets(net, targets)
    pattern = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"   # exactly these modules (peft: re.fullmatch)
    config = peft.LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), lora_dropout=float(dropout),
                             target_modules=pattern, bias="none")
    peft.inject_adapter_in_model(config, net, adapter_name=ADAPTER)
    for name, p in net.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return net


def _plain_key(key: str) -> str:
    """An adapted state-dict key back to the plain network's: "layers.0.base_layer.weight" -> "layers.0.weight"."""
    return key.replace(".base_layer.", ".")


@torch.no_grad()
def merged_state_dict(net: nn.Module) -> dict:
    """The plain network's state dict (the keys it had before `add_adapters`) with every adapted weight merged:
    W + (alpha / r) B A (peft's own `get_delta_weight`, convolutions included). `net` is not modified; the
    tensors are fresh copies (detached), so training continues undisturbed."""
    if not is_adapted(net):
        raise UnifuseError(f"the network {type(net).__name__} has no LoRA adapters to merge; "
                           "call add_adapters(net) first (or save its state_dict() as it is)")
    layers = _lora_layers(net)
    state = {}
    for key, value in net.state_dict().items():
        if ".lora_" in key:
            continue
        state[_plain_key(key)] = value.detach().clone()
    for name, layer in layers.items():
        if layer.merged:
            raise UnifuseError(f"LoRA layer {name!r} is merged in place (peft merge_adapter); unmerge it first")
        weight = f"{name}.weight"
        delta = layer.get_delta_weight(ADAPTER)
        state[weight] = (state[weight] + delta.to(state[weight].dtype)).contiguous()
    return state


def merge_into(plain: nn.Module, adapted: nn.Module) -> nn.Module:
    """Load `merged_state_dict(adapted)` into `plain`, a copy of the network without adapters; returns `plain`."""
    if is_adapted(plain):
        raise UnifuseError("merge_into needs a plain network (without adapters) as its first argument, "
                           "e.g. a fresh build of the same net")
    try:
        plain.load_state_dict(merged_state_dict(adapted))
    except RuntimeError as err:
        raise UnifuseError(f"the adapted network does not fit the plain one ({err}); build the plain network with "
                           "the same configuration as the adapted one") from None
    return plain


__all__ = ["add_adapters", "adapter_parameters", "is_adapted", "merge_into", "merged_state_dict"]
