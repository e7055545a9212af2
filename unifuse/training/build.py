"""From a Config to the library's parts: data set, network, DiffusionModel, objective, batches.

A latent run (data.latent names an autoencoder run) trains on the training set's latents: `build_data` encodes the
images once, in chunks, with the autoencoder's `LatentCodec` (its per-channel scale fitted on the whole training
set), and returns a `LatentData` set of shape [c, h, w]; everything downstream sees an ordinary data set.

The model is `DiffusionModel(net, path, prediction, sigma_data, time_input=path.c_noise, scale_input=True)`:
the network sees unit-scale inputs on every path (EDM's c_in) and the library's noise labels c_noise(t).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..data import Dataset
from ..errors import UnifuseError
from ..model import DiffusionModel


def build_data(cfg, split: str = "train"):
    """The configured data set (unifuse.data.load_dataset). With data.cond=text on an image folder the images'
    captions are read and the labels become each image's index into the sorted distinct captions. With data.latent
    set: the split's latents (`latent_data`)."""
    from ..data import load_dataset
    from ..data.images import folder_path

    if cfg.data.latent:
        return latent_data(cfg, split)
    folder = folder_path(cfg.data.name)
    text_folder = cfg.data.cond == "text" and folder is not None
    if folder is None:
        refuse_folder_keys(cfg)
    options = {} if folder is None else {"size": cfg.data.size, "channels": cfg.data.channels or None,
                                         "heldout": cfg.data.heldout, "strict": cfg.data.strict}
    if text_folder:
        options["captions"] = True
    data = load_dataset(cfg.data.name, split, **options)
    if text_folder:
        from ..data.captions import caption_vocabulary

        return replace(data, labels=caption_vocabulary(data.captions)[1])
    if cfg.data.cond in ("class", "text") and (data.labels is None or data.num_classes < 2):
        by_folder = folder is not None and cfg.data.cond == "class"
        fix = "put the images in one sub-folder per class (two or more)" if by_folder else "use data.cond=none"
        raise UnifuseError(f"data.cond={cfg.data.cond!r} needs class labels, but data set {cfg.data.name!r} has none; "
                           f"{fix}")
    return data


@dataclass(frozen=True, eq=False)
class LatentData(Dataset):
    """A data set of normalised latents `codec.encode(images)` [N, c, h, w] (labels, classes and captions those of
    the images); pixel_shape: the images' shape, what `codec.decode` returns. Not 8-bit images (is_image False: a
    hybrid objective uses a Gaussian decoder, likelihoods are latent-space densities)."""

    codec: object = None
    pixel_shape: tuple = ()

    @property
    def is_image(self) -> bool:
        return False


def latent_source(cfg) -> str:
    """Where a latent run's codec comes from: the teacher or base run it starts from (which carries the codec it was
    trained with), else the autoencoder run data.latent."""
    return cfg.distill.teacher or cfg.finetune.base or cfg.data.latent


def latent_data(cfg, split: str = "train") -> LatentData:
    """The latents of the configured images: encoded once, in chunks, under no_grad, by the codec of
    `latent_source(cfg)`; a fresh autoencoder's shift and scale are fitted on the whole training split first."""
    from ..latent import fit_scale, remember
    from .checkpoint import load_codec

    if cfg.data.latent.startswith("train:"):
        raise UnifuseError(f"data.latent={cfg.data.latent!r} trains the autoencoder inside the run: start it with "
                           "unifuse.training.train(cfg, out) (unifuse train), which names the autoencoder run")
    pixel_cfg = replace(cfg, data=replace(cfg.data, latent="", latent_options={}))
    codec, fitted = load_codec(latent_source(cfg))
    images = build_data(pixel_cfg, split)
    if not fitted:
        fit_scale(codec, images.images if split == "train" else build_data(pixel_cfg, "train").images)
    remember(codec)
    return LatentData(images.name, codec.encode(images.images).cpu(), images.labels, images.num_classes, images.pad,
                      images.class_names, images.captions, codec=codec, pixel_shape=tuple(images.shape))


def refuse_folder_keys(cfg) -> None:
    """data.size, data.channels, data.heldout and data.strict describe image folders; on a bundled set they
    would be silently ignored, so a changed value is refused."""
    from ..config import DataConfig

    default = DataConfig()
    for key in ("size", "channels", "heldout", "strict"):
        if getattr(cfg.data, key) != getattr(default, key):
            raise UnifuseError(f"data.{key}={getattr(cfg.data, key)!r} applies to image folders only, but data.name is "
                               f"{cfg.data.name!r} (a bundled set with a fixed size and split); drop it or set "
                               "data.name=folder:<path>")


def data_info(data) -> dict:
    """What a checkpoint must remember about the data to rebuild and sample the model (with the class names,
    and for a captioned folder the sorted distinct captions that its labels index)."""
    info = {"name": data.name, "shape": list(data.shape), "num_classes": int(data.num_classes), "pad": int(data.pad),
            "class_names": [str(c) for c in data.class_names]}
    if data.captions:
        from ..data.captions import caption_vocabulary

        info["captions"] = caption_vocabulary(data.captions)[0]
    if isinstance(data, LatentData):  # what decodes the samples: the codec's architecture, shift, scale, digest
        info["latent"] = dict(data.codec.meta(), shape=list(data.pixel_shape))
    return info


class Flattened(torch.nn.Module):
    """A vector network (the MLP) applied to images: x [B, C, H, W] is flattened to [B, C*H*W] and back, plus a
    learned linear map from input to output (zero at start), the one layer an MLP lacks to pass pixels through
    unchanged at low noise."""

    def __init__(self, net: torch.nn.Module, skip: bool = True):
        super().__init__()
        self.mlp = net
        self.family, self.config = getattr(net, "family", None), getattr(net, "config", None)
        self.two_times = bool(getattr(net, "two_times", False))  # takes r= (few-step families)
        dim, out_dim = getattr(net, "dim", None), getattr(net, "out_dim", None)
        self.skip = torch.nn.Linear(dim, out_dim, bias=False) if skip and dim and out_dim else None
        if self.skip is not None:
            torch.nn.init.zeros_(self.skip.weight)

    def forward(self, x, t, **cond):
        flat = x.flatten(1)
        out = self.mlp(flat, t, **cond)
        if self.skip is not None:
            out = out + self.skip(flat.to(self.skip.weight.dtype))
        return out.reshape((x.shape[0], -1) + tuple(x.shape[2:]))


def fit_to_data(net: torch.nn.Module, info: dict) -> torch.nn.Module:
    """Wrap a vector network for image data (see `Flattened`); image networks are returned as they are."""
    if getattr(net, "family", None) == "mlp" and len(info["shape"]) > 1:
        return Flattened(net)
    return net


def build_net(cfg, info: dict) -> torch.nn.Module:
    """The configured network, sized for the data (channels, resolution, classes, text width)."""
    from ..nets import NET_PRESETS, TEXT_DIM
    from ..nets import build_net as nets_build

    options = dict(cfg.model.net_options)
    family = NET_PRESETS[cfg.model.net][0] if cfg.model.net in NET_PRESETS else cfg.model.net
    if family == "mlp" and len(info["shape"]) > 1:
        dim = 1
        for s in info["shape"]:
            dim *= int(s)
        options.setdefault("dim", dim)
    elif family in ("unet", "dit") and len(info["shape"]) == 3:  # size the image net for the data (folders too)
        options.setdefault("in_channels", int(info["shape"][0]))
        options.setdefault("resolution", int(info["shape"][-1]))
    if cfg.data.cond == "class":
        options.setdefault("num_classes", info["num_classes"])
    if cfg.data.cond == "text":
        options.setdefault("text_dim", TEXT_DIM)
    if cfg.model.learned_variance:
        options["learned_variance"] = True
    return fit_to_data(nets_build(cfg.model.net, **options), info)


def build_path(cfg):
    from .. import paths

    options = dict(cfg.model.path_options)
    if cfg.model.path == "trigflow":
        options.setdefault("sigma_d", cfg.model.sigma_data)
    if cfg.model.path == "ddpm" and "betas" in options:  # a table given in full (a diffusers model: unifuse.interop)
        return paths.DDPM(**options)
    return paths.get(cfg.model.path, **options)


def student_path(cfg):
    """The path a distilled student lives on (`cfg.distill.student_path`; TrigFlow's sigma_d is the model's)."""
    from .. import paths

    name = cfg.distill.student_path
    return paths.get(name, sigma_d=cfg.model.sigma_data) if name == "trigflow" else paths.get(name)


def build_model(cfg, net) -> DiffusionModel:
    """The DiffusionModel binding `net` to the configured path and prediction (a distilled student: the network on
    its teacher's path, re-expressed on the student's path by `on()`, so the copied teacher weights keep their
    meaning)."""
    path = build_path(cfg)
    time_input = path.c_noise if cfg.model.time_input == "c_noise" else None
    scale_input = getattr(getattr(net, "module", net), "scale_input", True)  # False: a net taking raw x_t (diffusers)
    model = DiffusionModel(net, path, cfg.model.prediction, sigma_data=cfg.model.sigma_data, time_input=time_input,
                           scale_input=scale_input, learned_variance=cfg.model.learned_variance)
    return model.on(student_path(cfg)) if cfg.distill.student_path else model


def build_objective(cfg, data=None):
    """The configured objective (unifuse.objectives.get) with the preset's options."""
    from .. import objectives

    options = dict(cfg.objective.options)
    if cfg.objective.name == "hybrid" and data is not None and not data.is_image:
        options.setdefault("decoder", "gaussian")
    return objectives.get(cfg.objective.name, **options)


@dataclass
class Batches:
    """Endless shuffled mini-batches, identical order on every process: each global micro-batch is a run of
    one epoch's permutation (seed, epoch) and process r takes its r-th slice. State (epoch, position) is all a
    resumed run needs to continue the same stream."""

    data: object
    micro_batch: int            # images per process per micro-batch
    rank: int = 0
    world: int = 1
    seed: int = 0
    epoch: int = 0
    position: int = 0

    def __post_init__(self):
        self.global_micro = self.micro_batch * self.world
        if len(self.data) == 0:
            raise UnifuseError(f"data set {self.data.name!r} has no training items; add data or lower data.heldout")
        if self.global_micro > len(self.data) and self.rank == 0:
            import sys

            print(f"warning: a micro-batch of {self.global_micro} is larger than the data set ({len(self.data)} items): "
                  "each batch takes whole epochs back to back, so it repeats items; lower data.batch to avoid this",
                  file=sys.stderr, flush=True)
        self._perm_epoch, self._perm = None, None

    def _permutation(self):
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.data), generator=g), self.epoch
        return self._perm

    def next(self):
        """(x, labels or None) for this process."""
        if self.global_micro > len(self.data):
            idx = self._spanning()[self.rank * self.micro_batch:][: self.micro_batch]
        else:
            if self.position + self.global_micro > len(self.data):
                self.epoch, self.position = self.epoch + 1, 0
            idx = self._permutation()[self.position + self.rank * self.micro_batch:][: self.micro_batch]
            self.position += self.global_micro
        labels = self.data.labels[idx] if self.data.labels is not None else None
        return self.data.images[idx], labels

    def _spanning(self) -> torch.Tensor:
        """A global micro-batch larger than the data set: the rest of this epoch's permutation, then the next."""
        parts, need = [], self.global_micro
        while need > 0:
            take = self._permutation()[self.position:self.position + need]
            parts.append(take)
            need, self.position = need - len(take), self.position + len(take)
            if self.position >= len(self.data):
                self.epoch, self.position = self.epoch + 1, 0
        return torch.cat(parts)

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


class Conditioner:
    """Labels -> the network's condition dict ({class_labels} or a caption's {text, text_mask}), with
    classifier-free guidance's condition dropout (`unifuse.guidance.drop_condition`, probability p_uncond).
    Digit labels draw a caption from the templates; on a captioned folder (info["captions"]) a label is the
    index of the image's own caption. Every caption is encoded once (the encoder's per-caption cache).
    Draws come from a CPU generator so that CPU and GPU runs make the same choices."""

    def __init__(self, cfg, device, info: dict):
        self.kind, self.p, self.device, self.bank = cfg.data.cond, cfg.data.p_uncond, device, None
        self.captions, self.encoder = info.get("captions"), None
        if self.kind == "text":
            from ..data import text

            if not text.available():
                raise UnifuseError(f"preset {cfg.name!r} trains on captions and needs the text encoder; "
                                   f"{text.INSTALL_HINT}")
            from ..data.captions import caption_bank

            if self.captions:
                self.encoder = text.default_encoder()
                for i in range(0, len(self.captions), 256):  # encode every caption once, up front
                    self.encoder.encode(self.captions[i:i + 256])
            else:
                self.bank = caption_bank(text.default_encoder(), "train", info["num_classes"])

    def __call__(self, labels: torch.Tensor | None, generator: torch.Generator) -> dict:
        from ..data.conditions import drop_condition

        if self.kind == "none" or labels is None:
            return {}
        if self.kind == "class":
            cond = {"class_labels": labels}
        elif self.captions:
            emb = self.encoder.encode([self.captions[i] for i in labels.tolist()])
            cond = {"text": emb.tokens, "text_mask": emb.mask}
        else:
            cond = self.bank.draw(labels, generator)
        cond = drop_condition(cond, self.p, generator)
        return {k: v.to(self.device) for k, v in cond.items()}


__all__ = ["LatentData", "build_data", "data_info", "latent_data", "latent_source",
           "build_net", "Flattened", "fit_to_data", "build_path", "build_model",
           "build_objective", "Batches", "Conditioner"]
