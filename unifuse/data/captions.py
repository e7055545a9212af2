"""Captions for labelled digit images, and captions files for image folders.

The bundled digit sets have labels, not text; for caption-conditional training (Rombach et al. 2022,
ALGORITHMS card 12) each image gets a caption drawn from varied templates ("a handwritten seven",
"the digit 7", ...). The held-out templates are never used in training, so sampling with them measures
whether the model follows the meaning of a prompt rather than memorised strings.

An image folder brings its own captions (`folder_captions`): a captions.jsonl at the top of the folder with
one {"file": "cats/1.png", "caption": "..."} per line (or captions.json / .csv / .tsv / .txt), and/or a .txt
beside an image holding its caption (cats/1.png -> cats/1.txt).
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..errors import UnifuseError, choose

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "number {word} written by hand",
    "the number {word}",
    "a {word}",
    "{word}",
    "{digit}",
    "an image of the digit {digit}",
    "handwritten digit {digit}",
    "a drawing of the number {word}",
    "the numeral {word}",
    "a scanned handwritten {digit}",
    "a black and white picture of a {word}",
    "someone wrote the number {digit}",
    "a small image of a {word}",
    "digit {word}",
)

HELDOUT_TEMPLATES = (
    "a picture of a handwritten {word}",
    "the number {digit} written by hand",
    "an image showing the digit {word}",
    "a hand-drawn {digit}",
    "{word}, written with a pen",
)

SPLITS = ("train", "heldout", "all")


def templates(split: str = "train") -> tuple:
    """The caption templates of a split: "train", "heldout" (never seen in training) or "all"."""
    choose("caption split", split, SPLITS)
    return {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES, "all": TRAIN_TEMPLATES + HELDOUT_TEMPLATES}[split]


def caption(label: int, template: str) -> str:
    """Fill one template for a digit label 0..9."""
    label = int(label)
    if not 0 <= label <= 9:
        raise UnifuseError(f"digit captions exist for labels 0..9, got {label}")
    return template.format(word=WORDS[label], digit=label)


def captions_for(labels, split: str = "train", generator: torch.Generator | None = None) -> list:
    """One caption per label, each from a template drawn uniformly from the split."""
    labels = torch.as_tensor(labels).reshape(-1)
    pool = templates(split)
    picks = torch.randint(len(pool), (labels.shape[0],), generator=generator)
    return [caption(int(y), pool[int(i)]) for y, i in zip(labels, picks)]


def sample_captions(labels, split: str = "heldout", seed: int = 0, start: int = 0) -> list:
    """One caption per label for samples start, start + 1, ...: sample i's template depends only on (seed, i),
    so a caption does not change with how many samples are drawn or how they are batched."""
    pool = templates(split)
    labels = torch.as_tensor(labels).reshape(-1)
    picks = [int(np.random.SeedSequence([seed, start + i]).generate_state(1)[0]) % len(pool)
             for i in range(labels.shape[0])]
    return [caption(int(y), pool[k]) for y, k in zip(labels, picks)]


class CaptionBank(NamedTuple):
    """Every (class, template) caption of a split, encoded once: row i is class labels[i]."""

    captions: list
    labels: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def draw(self, labels, generator: torch.Generator | None = None, pooled: bool = False) -> dict:
        """Network conditions for `labels`, a random caption of the right class each: {text, text_mask}
        (tokens, for cross-attention) or, with pooled=True, {text: [B, 384]}."""
        labels = torch.as_tensor(labels).reshape(-1).cpu()
        per_class = torch.bincount(self.labels, minlength=int(self.labels.max()) + 1)
        outside = (labels < 0) | (labels >= per_class.shape[0])
        if bool(outside.any()) or bool((per_class[labels.clamp(min=0, max=per_class.shape[0] - 1)] == 0).any()):
            raise UnifuseError(f"the caption bank has classes 0..{per_class.shape[0] - 1}; got labels {labels.unique().tolist()}")
        start = torch.cumsum(per_class, 0) - per_class
        # rows are grouped by class (see caption_bank), so pick an offset inside each class's block
        offset = (torch.rand(labels.shape[0], generator=generator) * per_class[labels]).long()
        rows = (start[labels] + offset).to(self.tokens.device)
        if pooled:
            return {"text": self.pooled[rows]}
        return {"text": self.tokens[rows], "text_mask": self.mask[rows]}

    def to(self, device) -> CaptionBank:
        return CaptionBank(self.captions, self.labels, self.tokens.to(device), self.mask.to(device), self.pooled.to(device))


def caption_bank(encoder, split: str = "train", num_classes: int = 10) -> CaptionBank:
    """Encode every caption of a split for classes 0..num_classes-1 (grouped by class)."""
    pool = templates(split)
    caps = [caption(y, tpl) for y in range(num_classes) for tpl in pool]
    labels = torch.arange(num_classes).repeat_interleave(len(pool))
    emb = encoder.encode(caps)
    return CaptionBank(caps, labels, emb.tokens, emb.mask, emb.pooled)


# --- captions files for image folders --------------------------------------------------------------
CAPTION_FILES = ("captions.jsonl", "captions.json", "captions.csv", "captions.tsv", "captions.txt")


def find_captions(folder: str) -> str | None:
    """The captions file of an image folder, if it has one (names in CAPTION_FILES)."""
    for name in CAPTION_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def read_captions(path: str) -> dict[str, str]:
    """{file name: caption} from a captions file.

    .jsonl: one {"file": ..., "caption": ...} per line ("image"/"text" also accepted); .json: an object
    {file: caption}; .csv / .tsv: rows "file,caption" (a header row "file,caption" is skipped);
    .txt: lines "file<TAB>caption" or "file: caption".
    """
    if not os.path.isfile(path):
        raise UnifuseError(f"captions file {path} does not exist; give one of {', '.join(CAPTION_FILES)}")
    ext = os.path.splitext(path)[1].lower()
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        if ext == ".json":
            data = json.load(f)
            if not isinstance(data, dict):
                raise UnifuseError(f"{path}: a .json captions file must be an object {{file: caption}}")
            out = {str(k): str(v) for k, v in data.items()}
        elif ext == ".jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    name, text = row.get("file", row.get("image")), row.get("caption", row.get("text"))
                except (json.JSONDecodeError, AttributeError):
                    name = text = None
                if name is None or text is None:
                    raise UnifuseError(f"{path}:{n}: each line must be {{\"file\": ..., \"caption\": ...}}")
                out[str(name)] = str(text)
        elif ext in (".csv", ".tsv"):
            for n, row in enumerate(csv.reader(f, delimiter="\t" if ext == ".tsv" else ","), 1):
                if not row or (n == 1 and [c.strip().lower() for c in row[:2]] in (["file", "caption"], ["image", "text"])):
                    continue
                if len(row) < 2:
                    raise UnifuseError(f"{path}:{n}: each row must be file,caption")
                out[row[0].strip()] = ",".join(row[1:]).strip() if ext == ".csv" else row[1].strip()
        else:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                sep = "\t" if "\t" in line else ": " if ": " in line else None
                if sep is None:
                    raise UnifuseError(f"{path}:{n}: each line must be 'file<TAB>caption' or 'file: caption'")
                name, text = line.split(sep, 1)
                out[name.strip()] = text.strip()
    if not out:
        raise UnifuseError(f"captions file {path} has no captions")
    return out


SIDECAR = ".txt"  # a caption beside an image: photos/cat1.png -> photos/cat1.txt


def _norm(name: str) -> str:
    """A file name as written in a captions file -> a '/'-separated path relative to the folder."""
    name = str(name).strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def folder_captions(folder: str, files: Sequence[str]) -> list:
    """The caption of every image of a folder (files: paths relative to `folder`, '/'-separated).

    Convention: one captions file at the top of the folder (captions.jsonl with {"file": ..., "caption": ...}
    per line, or captions.json / .csv / .tsv / .txt, see `read_captions`), its names relative to the folder
    (a bare file name is enough when it is unique), and/or a .txt file beside an image holding that image's
    caption (cat1.png -> cat1.txt). The captions file wins where both give one. Every image needs a
    non-empty caption and every name in the captions file must be an image of the folder."""
    files = [_norm(f) for f in files]
    present = [name for name in CAPTION_FILES if os.path.isfile(os.path.join(folder, name))]
    if len(present) > 1:
        raise UnifuseError(f"image folder {folder} has several captions files ({', '.join(present)}); keep one")
    by_name: dict[str, str] = {}
    if present:
        path = os.path.join(folder, present[0])
        index = set(files)
        by_base: dict[str, list] = {}
        for f in files:
            by_base.setdefault(os.path.basename(f), []).append(f)
        for key, text in read_captions(path).items():
            name = _norm(key)
            if name not in index:
                hits = by_base.get(name, []) if "/" not in name else []
                if len(hits) > 1:
                    raise UnifuseError(f"{path} names {key!r}, which matches {len(hits)} images ({', '.join(hits[:3])}); "
                                       "write the path relative to the folder, e.g. " + repr(hits[0]))
                if not hits:
                    raise UnifuseError(f"{path} names {key!r}, which is not an image in {folder}; fix the name "
                                       "(paths are relative to the folder) or remove that entry")
                name = hits[0]
            by_name[name] = text
    out, missing = [], []
    for f in files:
        text = by_name.get(f)
        if text is None:
            side = os.path.join(folder, os.path.splitext(f)[0] + SIDECAR)
            if os.path.isfile(side):
                with open(side, encoding="utf-8") as fh:
                    text = " ".join(fh.read().split())
        if text is None:
            missing.append(f)
        elif not text.strip():
            raise UnifuseError(f"image {f} in {folder} has an empty caption (the empty caption is the unconditional "
                               "input of guidance); write a caption for it or remove the image")
        out.append(text)
    if missing and len(missing) == len(files):
        raise UnifuseError(f"data.cond='text' needs captions, but image folder {folder} has none; add captions.jsonl "
                           'with lines {"file": "cat1.png", "caption": "..."} or a .txt beside each image '
                           "(cat1.png -> cat1.txt), or train with data.cond=none")
    if missing:
        where = present[0] if present else f"{os.path.splitext(missing[0])[0] + SIDECAR} beside the image"
        raise UnifuseError(f"{len(missing)} of {len(files)} images in {folder} have no caption (first: {missing[0]}); "
                           f"add them to {where} or remove those images")
    return out


def caption_vocabulary(captions: Sequence[str]):
    """(the distinct captions, sorted; LongTensor of each item's index into them)."""
    vocab = sorted(set(captions))
    index = {c: i for i, c in enumerate(vocab)}
    return vocab, torch.tensor([index[c] for c in captions], dtype=torch.long)


def captions_for_files(files: Sequence[str], captions: dict[str, str], path: str = "the captions file") -> list:
    """The caption of each image file (matched by relative path, then by base name)."""
    by_base = {os.path.basename(k): v for k, v in captions.items()}
    out = []
    for name in files:
        text = captions.get(name, by_base.get(os.path.basename(name)))
        if text is None:
            raise UnifuseError(f"image {name} has no caption in {path}; add a line for it or remove the image")
        out.append(text)
    return out


__all__ = ["WORDS", "TRAIN_TEMPLATES", "HELDOUT_TEMPLATES", "templates", "caption", "captions_for", "sample_captions",
           "CaptionBank", "caption_bank", "find_captions", "read_captions", "captions_for_files", "folder_captions",
           "caption_vocabulary", "SIDECAR"]
