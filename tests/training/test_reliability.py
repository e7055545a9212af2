"""Issue 12 in the training package: settings take effect or are refused, outputs are checked before work,
signals end in a checkpoint, temporary folders do not outlive their writer, seeds do not depend on the batch."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from unifuse import config as C
from unifuse.errors import UnifuseError
from unifuse.io import remove_temporaries
from unifuse.training import train
from unifuse.training.checkpoint import find_checkpoint, load_error, read_meta
from unifuse.training.distributed import pick_device, resolve_precision
from unifuse.training.outputs import check_out_file, check_out_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.net_options={width: 32, depth: 1, emb_dim: 16}", "data.batch=64", "train.log_every=1",
        "optim.warmup_steps=2", "train.precision=fp32"]


# --- config: every key takes effect or is refused ---------------------------------------------------------
@pytest.mark.parametrize("family", C.FAMILIES)
def test_set_model_family_gives_the_family_preset(family):
    cfg = C.get_config("digits", [f"model.family={family}"])
    want = C.PRESETS[f"digits-{family}"]
    assert (cfg.model, cfg.objective, cfg.sample) == (want.model, want.objective, want.sample)
    assert cfg.optim == C.PRESETS["digits"].optim  # the rest of the run is kept


def test_family_switch_then_other_overrides_win():
    cfg = C.get_config("digits", ["sample.nfe=7", "model.family=rf", "model.net_options.width=64"])
    assert cfg.model.path == "rf" and cfg.model.prediction == "velocity" and cfg.objective.name == "flow"
    assert cfg.sample.nfe == 7 and cfg.model.net_options["width"] == 64


def test_yaml_base_with_another_family(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: digits\nmodel: {family: rf}\n")
    assert C.load_config(str(path)).model == C.PRESETS["digits-rf"].model


def test_bad_family_and_huge_size_are_refused():
    with pytest.raises(UnifuseError, match="model.family"):
        C.get_config("digits", ["model.family=gan"])
    with pytest.raises(UnifuseError, match="data.size=2048 is above the limit of 512"):
        C.get_config("digits", ["data.name=folder:x", "data.size=2048"])


def test_folder_keys_on_a_bundled_set_are_refused():
    from unifuse.training.build import build_data

    for key in ("data.size=16", "data.heldout=0.3", "data.strict=true"):
        with pytest.raises(UnifuseError, match="applies to image folders only"):
            build_data(C.get_config("digits", [key]))


def test_precision_auto_resolves_to_native_bf16_only():
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert C.PRESETS["digits"].train.precision == "auto" and C.PRESETS["mnist"].train.precision == "auto"


def test_resolved_precision_is_recorded(tmp_path):
    cfg = C.get_config("toy-moons", TINY[:-1] + ["train.steps=2", "train.precision=auto"])
    summary = train(cfg, str(tmp_path / "run"), progress=False, log=lambda *a: None)
    meta = read_meta(find_checkpoint(str(tmp_path / "run")))
    end = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")][-1]
    assert summary["precision"] == meta["precision"] == end["precision"] == resolve_precision("auto", "cpu")


def test_device_cuda_without_cuda_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UnifuseError, match="--device cuda but no CUDA GPU is available.*use --device cpu"):
        pick_device("cuda", key="--device")


# --- checkpoints ------------------------------------------------------------------------------------------
def test_sidecar_with_a_non_integer_step_is_refused(tmp_path):
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    (folder / "checkpoint.json").write_text(json.dumps({"format": "unifuse-checkpoint", "config": {}, "step": "six"}))
    with pytest.raises(UnifuseError, match="step='six', not a whole number"):
        read_meta(str(folder))


def test_load_error_names_the_mismatch():
    net = torch.nn.Linear(4, 8)
    with pytest.raises(RuntimeError) as info:
        net.load_state_dict(torch.nn.Linear(4, 2).state_dict())
    text = load_error(info.value)
    assert text.startswith("size mismatch for weight") and "torch.Size([2, 4])" in text


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / ".step-00000010.tmp-999999999-abcd"
    dead.mkdir()
    (dead / "model.safetensors").write_text("half")
    mine = tmp_path / f".x.json.tmp-{os.getpid()}-ab.json"
    mine.write_text("x")
    keep = tmp_path / "step-00000005"
    keep.mkdir()
    removed = remove_temporaries(str(tmp_path))
    assert not dead.exists() and not mine.exists() and keep.exists() and len(removed) == 2


def test_a_run_cleans_the_temporaries_of_a_killed_save(tmp_path):
    run = tmp_path / "run"
    left = run / "ckpt" / ".step-00000002.tmp-999999999-beef"
    left.mkdir(parents=True)
    cfg = C.get_config("toy-moons", TINY + ["train.steps=2"])
    train(cfg, str(run), progress=False, log=lambda *a: None)
    assert not left.exists() and not [n for n in os.listdir(run / "ckpt") if ".tmp-" in n]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_names_the_resume_command(tmp_path, signum):
    run = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    code = ("import os, signal, sys, threading, time; from unifuse.cli import main; import unifuse.training.run as R\n"
            "orig = R.Run.end_step\n"
            "def end_step(self, step, *a, **k):\n"
            f"    if step == 3: os.kill(os.getpid(), {int(signum)})\n"
            "    return orig(self, step, *a, **k)\n"
            "R.Run.end_step = end_step\n"
            f"sys.exit(main(['train', 'toy-moons', '--out', {run!r}, '--steps', '100000', '--no-progress'] + "
            f"[a for s in {TINY!r} for a in ('--set', s)]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 128 + int(signum), proc.stderr
    assert read_meta(find_checkpoint(run))["step"] == 3
    assert f"continue with: unifuse train --resume {run}" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr


# --- outputs ------------------------------------------------------------------------------------------------
def test_outputs_are_checked_before_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UnifuseError, match="is a file, not a folder"):
        check_out_folder(str(afile))
    with pytest.raises(UnifuseError, match="cannot be created"):
        check_out_folder(str(afile / "sub"))
    with pytest.raises(UnifuseError, match="cannot be written"):
        check_out_folder("/proc/unifuse-out")
    with pytest.raises(UnifuseError, match="is a folder"):
        check_out_file(str(tmp_path))
    data = tmp_path / "images"
    data.mkdir()
    for out in (data, data / "samples", data / "a" / "b"):
        with pytest.raises(UnifuseError, match="inside the training image folder"):
            check_out_folder(str(out), data={"name": f"folder:{data}"})
    assert check_out_folder(str(tmp_path / "new" / "deep")) and not (tmp_path / "new").exists()  # creates nothing


def test_generate_sample_i_depends_only_on_seed_and_i():
    from unifuse.training.build import build_model, build_net
    from unifuse.training.sampling import generate

    cfg = C.get_config("toy-moons", TINY)
    info = {"shape": [2], "num_classes": 0, "pad": 0}
    torch.manual_seed(0)
    model = build_model(cfg, build_net(cfg, info)).eval()
    for sampler in ("heun", "euler_maruyama"):
        a = generate(model, cfg.sample, info, 10, conditioning="none", seed=5, batch=3, sampler=sampler, nfe=20)[0]
        b = generate(model, cfg.sample, info, 10, conditioning="none", seed=5, batch=10, sampler=sampler, nfe=20)[0]
        c = generate(model, cfg.sample, info, 4, conditioning="none", seed=5, batch=4, sampler=sampler, nfe=20)[0]
        assert torch.equal(a, b) and torch.equal(a[:4], c), sampler
    with pytest.raises(UnifuseError, match="--batch must be >= 1"):
        generate(model, cfg.sample, info, 4, conditioning="none", batch=0)
    with pytest.raises(UnifuseError, match="add --clip-denoised 1"):
        generate(model, cfg.sample, info, 4, conditioning="none", threshold_percentile=0.99)
