"""uf.sample and uf.samplers as users meet them: names, bad input, trajectories and pictures, dtypes, and
schedule work kept out of the sampling loop."""
import pytest
import torch
from PIL import Image

import unifuse as uf
from unifuse.testing import GaussianMixture

F64 = torch.float64
GM = GaussianMixture.gaussian([0.3, -0.5, 1.0, 0.0], [0.5, 0.2, 1.5, 0.05])
API_NAMES = {"ddpm", "ddim", "euler", "heun", "edm_stochastic", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3",
             "dpmpp_2s", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "ipndm", "euler_maruyama", "pc", "midpoint",
             "consistency", "adaptive", "average"}


def model_on(name="vp-linear", pred="eps"):
    return GM.model(uf.paths.get(name), pred)


def test_every_api_name_is_available():
    assert set(uf.samplers.available()) == API_NAMES


def test_unknown_names_list_the_valid_ones():
    noise = torch.randn(2, 4, dtype=F64)
    with pytest.raises(uf.UnifuseError, match="unknown sampler 'dpm\\+\\+'.*ddim.*unipc"):
        uf.sample(model_on(), noise, "dpm++", nfe=4)
    with pytest.raises(uf.UnifuseError, match="unknown spacing 'cosine'.*karras.*logsnr"):
        uf.sample(model_on(), noise, "ddim", nfe=4, spacing="cosine")


def test_options_a_sampler_does_not_take():
    noise = torch.randn(2, 4, dtype=F64)
    with pytest.raises(uf.UnifuseError, match="'ddim' does not take option.*'variance'.*'small'.*its options: eta"):
        uf.sample(model_on(), noise, "ddim", nfe=4, variance="small")
    with pytest.raises(uf.UnifuseError, match="eta must lie in"):
        uf.sample(model_on(), noise, "ddim", nfe=4, eta=2.0)
    with pytest.raises(uf.UnifuseError, match="unknown DDPM variance"):
        uf.sample(model_on(), noise, "ddpm", nfe=4, variance="medium")
    for bad in (0, 2.5, True, "10"):
        with pytest.raises(uf.UnifuseError, match="nfe must be a positive integer"):
            uf.sample(model_on(), noise, "ddim", nfe=bad)


def test_noise_the_model_rejects_names_the_step_and_shape():
    with pytest.raises(uf.UnifuseError, match=r"step 0 .*shape \(2, 3\)"):
        uf.sample(model_on(), torch.randn(2, 3, dtype=F64), "dpmpp_2m", nfe=4)


def test_non_finite_value_mid_trajectory_names_the_step():
    base = model_on()

    def net(x, t):  # a network that breaks below t = 0.3
        out = base.net(x, t)
        return torch.where(t.reshape(-1, 1) < 0.3, torch.full_like(out, float("nan")), out)

    model = uf.DiffusionModel(net, base.path, "eps")
    with pytest.raises(uf.UnifuseError, match=r"non-finite value \(nan\).*step 7 of 10"):  # t_7 = 0.22 < 0.3
        uf.sample(model, torch.randn(2, 4, dtype=F64), "ddim", nfe=10, spacing="uniform")


def test_trajectory_gif_and_denoised_grid(tmp_path):
    gm = GaussianMixture.gaussian(torch.linspace(-0.5, 0.5, 16), 0.3)
    model = gm.model(uf.paths.get("rf"), "velocity")
    noise = torch.randn(3, 1, 4, 4, dtype=F64)
    x, traj = uf.sample(model, noise, "midpoint", nfe=8, return_trajectory=True, progress=True)
    assert len(traj.times) == len(traj.states) == len(traj.denoised) + 1 == 6  # orders [2, 2, 2, 1] + final
    torch.testing.assert_close(traj.states[-1], x)
    from unifuse import viz

    gif = viz.save_trajectory_gif(traj.states, tmp_path / "traj.gif")
    png = viz.save_denoised_grid(traj, tmp_path / "denoised.png")
    grid = viz.save_image_grid(x, tmp_path / "grid.png", nrow=3)
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 6
    with Image.open(png) as im:
        assert im.size == (5 * 6 + 2, 3 * 6 + 2)  # 5 steps across, 3 samples down, 4-pixel images, 2-pixel pad
    assert Image.open(grid).size == (3 * 6 + 2, 6 + 2)
    viz.plot_error_vs_nfe({"a": ([1, 2, 4], [1.0, 0.5, 0.25])}, tmp_path / "err.png")
    viz.save_points_gif(traj, tmp_path / "points.gif")
    assert (tmp_path / "err.png").stat().st_size > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_noise_keeps_float32_state(dtype):
    """The state and schedule arithmetic stay in float32/float64 whatever the noise (model input) dtype."""
    model = model_on("ddpm-linear", "v")
    noise = torch.randn(8, 4)
    ref = uf.sample(model, noise, "dpmpp_3m", nfe=10)
    out = uf.sample(model, noise.to(dtype), "dpmpp_3m", nfe=10)
    assert out.dtype == dtype
    assert float((out.float() - ref).abs().max()) < 0.05


def test_schedule_work_is_done_before_the_loop(monkeypatch):
    """Coefficients and grid inversions are computed once per call, not once per step (no per-step
    schedule arithmetic, hence no host-device traffic for it on a GPU)."""
    path = uf.paths.DDPM.linear()
    model = uf.DiffusionModel(lambda x, t: 0.5 * x, path, "eps")  # a network that does no schedule work itself
    calls = {"coefficients": 0, "t_from_log_snr": 0, "log_snr": 0, "alpha": 0, "sigma": 0}
    for name in calls:
        original = getattr(path, name)

        def counted(*a, _name=name, _orig=original, **k):
            calls[_name] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(path, name, counted)
    seen = []
    for nfe in (5, 40):
        for key in calls:
            calls[key] = 0
        uf.samplers.sample_unipc(model, torch.randn(2, 4, dtype=F64), uf.paths.time_grid(path, nfe, "logsnr"))
        seen.append(dict(calls))
    assert seen[0] == seen[1] and seen[0]["coefficients"] >= 1, seen


def test_generator_forms():
    """None, a torch.Generator, an int seed or a list: all accepted; a wrong-length list is refused."""
    model = model_on()
    noise = torch.randn(3, 4, dtype=F64)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    for g in (None, torch.Generator().manual_seed(0), 5, [1, 2, 3], gens):
        assert torch.isfinite(uf.sample(model, noise, "dpmpp_2m_sde", nfe=5, generator=g)).all()
    with pytest.raises(uf.UnifuseError, match="2 generators for a batch of 3"):
        uf.sample(model, noise, "ddpm", nfe=5, generator=[1, 2])
    a = uf.samplers.randn((3, 4), generator=[1, 2, 3], dtype=F64)
    b = uf.samplers.randn((1, 4), generator=[2], dtype=F64)
    torch.testing.assert_close(a[1:2], b)


def test_repeated_calls_with_a_kept_plan_do_no_set_up_and_give_identical_samples(monkeypatch):
    """A second uf.sample call with the same settings and a kept plan does no schedule work, returns the same
    samples as a call with nothing kept, and still stops at a non-finite step."""
    path = uf.paths.DDPM.linear()
    oracle = GM.model(uf.paths.DDPM.linear(), "eps").net  # the exact eps on its own copy of the path
    broken = {"on": False}

    def net(x, t):  # from t < 300 on it returns NaN once broken
        return torch.where(torch.as_tensor(broken["on"]) & (t.reshape(-1, 1) < 300), float("nan"), oracle(x, t))

    model = uf.DiffusionModel(net, path, "eps")
    noise = torch.randn(3, 4)
    plan = uf.samplers.Plan()
    attributes = [dict(vars(o)) for o in (model, path)]
    first = uf.sample(model, noise, "ddim", nfe=10, spacing="trailing", plan=plan)
    assert attributes == [vars(o) for o in (model, path)]  # nothing is hung on the model or the path
    calls = []
    for name in ("coefficients", "alpha", "sigma", "t_from_log_snr", "log_snr"):
        original = getattr(path, name)
        monkeypatch.setattr(path, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    again = uf.sample(model, noise, "ddim", nfe=10, spacing="trailing", plan=plan)
    assert calls == [] and torch.equal(first, again)
    uf.sample(model, noise, "ddim", nfe=10, spacing="trailing")  # without a plan: the call does its own set-up
    assert calls
    monkeypatch.undo()
    assert torch.equal(first, uf.sample(model, noise, "ddim", nfe=10, spacing="trailing"))
    broken["on"] = True  # trailing grid 999, 899, ..., 299, 199, ...: step 7 (from t = 299) is the first NaN
    with pytest.raises(uf.UnifuseError, match=r"non-finite value \(nan\).*step 7 of 10"):
        uf.sample(model, noise, "ddim", nfe=10, spacing="trailing", plan=plan)


def test_a_kept_plan_follows_the_model_path_batch_and_dtype():
    """What a plan keeps is keyed by the model's path and settings and by the batch, dtype and device: changing
    any of them gives the samples of a call with nothing kept."""
    model = GM.model(uf.paths.get("vp-linear"), "eps")
    noise = torch.randn(4, 4, dtype=F64)
    plan = uf.samplers.Plan()
    uf.sample(model, noise, "dpmpp_2m", nfe=6, spacing="uniform", plan=plan)
    model.path = uf.paths.VP.linear(0.5, 10.0)  # the same network read on another path (same uniform grid)
    assert torch.equal(uf.sample(model, noise, "dpmpp_2m", nfe=6, spacing="uniform", plan=plan),
                       uf.sample(model, noise, "dpmpp_2m", nfe=6, spacing="uniform"))
    uf.sample(model, noise, "ddim", nfe=6, plan=plan)
    model.time_input = lambda t: 1000 * t  # another time input (the oracle net then sees other times)
    assert torch.equal(uf.sample(model, noise, "ddim", nfe=6, plan=plan), uf.sample(model, noise, "ddim", nfe=6))
    for x in (noise[:1], noise.float(), noise.reshape(4, 2, 2)):  # batch 1, float32, another shape
        assert torch.equal(uf.sample(model, x, "ddim", nfe=6, plan=plan), uf.sample(model, x, "ddim", nfe=6))
    on_edm = model.on(uf.paths.get("edm"))  # a re-expressed model: kept by its own key, same samples again
    first = uf.sample(on_edm, noise, "heun", nfe=7, plan=plan)
    assert torch.equal(uf.sample(on_edm, noise, "heun", nfe=7, plan=plan), first)
    assert torch.equal(uf.sample(model.on(uf.paths.get("edm")), noise, "heun", nfe=7), first)
    grid = uf.paths.time_grid(model.path, 6, "logsnr")  # the low-level samplers take the same plan
    assert torch.equal(uf.samplers.sample_unipc(model, noise, grid, plan=plan),
                       uf.samplers.sample_unipc(model, noise, grid))


def test_a_kept_plan_is_bounded_and_checked():
    model = model_on()
    plan = uf.samplers.Plan(size=8)
    for nfe in range(1, 12):
        uf.sample(model, torch.randn(2, 4, dtype=F64), "ddim", nfe=nfe, plan=plan)
    assert 0 < len(plan) <= 8
    with pytest.raises(uf.UnifuseError, match="plan must be a uf.samplers.Plan"):
        uf.sample(model, torch.randn(2, 4, dtype=F64), "ddim", nfe=4, plan={})
