"""from_diffusers: the scheduler's table, kind and grid, and our samplers against diffusers' own loops (float64)."""
import pytest
import torch

pytest.importorskip("diffusers")

import unifuse as uf
from unifuse import interop
from unifuse.interop.scheduler import read_scheduler

from .tiny import SIZE, C, diffusers_loop, float64_tables, save, unet2d, unet_cross

F64 = torch.float64
STEPS = 10


def noise(batch=2, seed=1):
    return torch.randn(batch, C, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("kw", [
    dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"), dict(beta_schedule="sigmoid"),
    dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True), dict(trained_betas=[0.1, 0.2, 0.3, 0.5, 0.9])])
def test_table_is_diffusers_alphas_cumprod(kw):
    """abar of our DDPM path at every integer index is diffusers' own float32 table (the data end -1 has abar 1)."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    for cls in (DDPMScheduler, EulerDiscreteScheduler):
        if cls is EulerDiscreteScheduler and kw.get("beta_schedule") in ("sigmoid", "squaredcos_cap_v2"):
            continue
        sch = cls(**kw)
        path = read_scheduler(dict(sch.config, _class_name=cls.__name__)).path
        n = torch.arange(-1, len(sch.alphas_cumprod), dtype=F64)
        expected = torch.cat([torch.ones(1, dtype=F64), sch.alphas_cumprod.to(F64)])
        torch.testing.assert_close(path.alpha(n) ** 2, expected, rtol=1e-12, atol=1e-15)


CASES = {  # DDIM: (scheduler keys, steps); the tiny unet predicts what prediction_type says
    "eps-linear-leading": dict(prediction_type="epsilon", beta_schedule="linear", timestep_spacing="leading",
                               steps_offset=1),
    "v-scaled-zsnr-trailing": dict(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    "sample-cosine-leading": dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2",
                                  timestep_spacing="leading"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ddim_equals_diffusers_loop(tmp_path, name):
    """Our deterministic DDIM on diffusers_grid(folder, 10) from the same noise = DDIMScheduler's loop, to 1e-10."""
    from diffusers import DDIMScheduler

    unet, sch = unet2d(), DDIMScheduler(clip_sample=False, **CASES[name])
    folder = save(tmp_path / "pipe", unet, sch)
    model = interop.from_diffusers(folder, dtype=F64)
    grid = interop.diffusers_grid(folder, STEPS)
    expected = diffusers_loop(unet.double(), sch, noise(), STEPS)
    with torch.no_grad():
        ours = uf.samplers.sample_ddim(model, noise(), grid)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


def test_set_alpha_to_one_false_ends_on_index_zero(tmp_path):
    """set_alpha_to_one=False: diffusers' last DDIM step lands on index 0 (abar_0), not on the data; so does the grid,
    and our state there equals diffusers' final sample (uf.sample on that grid adds a denoising step to the data)."""
    from diffusers import DDIMScheduler

    unet = unet2d()
    sch = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, prediction_type="sample",
                        beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    folder = save(tmp_path / "pipe", unet, sch, pipeline=False)
    grid = interop.diffusers_grid(folder, STEPS)
    assert grid[-1].item() == 0.0
    expected = diffusers_loop(unet.double(), sch, noise(), STEPS)
    states = []
    with torch.no_grad():
        uf.samplers.sample_ddim(interop.from_diffusers(folder, dtype=F64), noise(), grid,
                                callback=lambda i, t, x, d: states.append((t, x.clone())))
    t, state = states[-1]
    assert t == 0.0
    torch.testing.assert_close(state, expected, rtol=1e-10, atol=1e-10)


def test_flow_match_euler_equals_diffusers_loop(tmp_path):
    """FlowMatchEulerDiscreteScheduler (shift 3): rectified flow, velocity prediction, timestep 1000 t; our Euler on
    the scheduler's own sigmas from the same noise = its loop (to float32 rounding: its step casts the state to
    float32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    unet, sch = unet2d(), FlowMatchEulerDiscreteScheduler(shift=3.0)
    folder = save(tmp_path / "flow", unet, sch)
    model = interop.from_diffusers(folder, dtype=F64)
    assert isinstance(model.path, uf.paths.RectifiedFlow) and model.prediction == "velocity"
    grid = interop.diffusers_grid(folder, STEPS)
    expected = diffusers_loop(unet.double(), sch, noise(), STEPS)
    with torch.no_grad():
        ours = uf.samplers.sample_euler(model, noise(), grid)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_cross_attention_condition_passes_through(tmp_path):
    """A UNet2DConditionModel with encoder_hidden_states in cond: DDIM equals diffusers' loop with the same context,
    and the context matters (another context gives other samples)."""
    from diffusers import DDIMScheduler

    unet, sch = unet_cross(), DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    folder = save(tmp_path / "cross", unet, sch)
    model = interop.from_diffusers(folder, dtype=F64)
    context = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    expected = diffusers_loop(unet.double(), sch, noise(), STEPS, encoder_hidden_states=context)
    grid = interop.diffusers_grid(folder, STEPS)
    with torch.no_grad():
        ours = uf.samplers.sample_ddim(model, noise(), grid, cond={"encoder_hidden_states": context})
        other = uf.samplers.sample_ddim(model, noise(), grid, cond={"encoder_hidden_states": -context})
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    assert (other - ours).abs().max() > 1e-3


def learned_folder(tmp_path, **kw):
    from diffusers import DDPMScheduler

    unet = unet2d(out_channels=2 * C)
    sch = DDPMScheduler(variance_type="learned_range", beta_schedule="squaredcos_cap_v2", **kw)
    return unet, sch, save(tmp_path / "learned", unet, sch)


def test_learned_variance_ddpm_equals_diffusers_loop(tmp_path):
    """variance_type learned_range, out_channels 2C: our ddpm sampler with variance='learned' and one generator
    draws the same noise in the same order as DDPMScheduler.step, and the samples agree (clip_sample on: the
    threshold transform clips x0_hat as diffusers does)."""
    unet, sch, folder = learned_folder(tmp_path, clip_sample=True)
    model = interop.from_diffusers(folder, dtype=F64)
    assert model.learned_variance
    expected = diffusers_loop(unet.double(), sch, noise(), STEPS, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = uf.samplers.sample_ddpm(model, noise(), interop.diffusers_grid(folder, STEPS), variance="learned",
                                       noise=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def test_learned_variance_is_diffusers_log_interpolation(tmp_path):
    """Closed form: the std of our DDPM step is exp(0.5 log var) with diffusers' learned_range log-variance
    frac log(beta_t) + (1 - frac) log(beta_tilde_t), frac = (v + 1) / 2, v the network's second half."""
    unet, sch, folder = learned_folder(tmp_path, clip_sample=False)
    model = interop.from_diffusers(folder, dtype=F64)
    sch.set_timesteps(STEPS)
    float64_tables(sch)
    grid = interop.diffusers_grid(folder, STEPS)
    x = noise()
    for k in (0, 4, 8):
        s, t = float(grid[k]), float(grid[k + 1])
        with torch.no_grad():
            step = uf.samplers.step_ddpm(model, x, s, t, variance="learned")
            v = unet.double()(x, int(s), return_dict=False)[0][:, C:]
        log_var = sch._get_variance(int(s), predicted_variance=v)
        torch.testing.assert_close(step.std, torch.exp(0.5 * log_var), rtol=1e-9, atol=0)


def test_bare_pair_and_threshold(tmp_path):
    """A bare unet/ + scheduler/ pair loads; clip_sample makes the model the threshold transform (x0_hat in [-1, 1])
    and threshold=False gives the plain model."""
    from diffusers import DDPMScheduler

    folder = save(tmp_path / "pair", unet2d(), DDPMScheduler(clip_sample=True, clip_sample_range=0.5), pipeline=False)
    clipped = interop.from_diffusers(folder)
    plain = interop.from_diffusers(folder, threshold=False)
    x, t = 30 * noise().float(), torch.tensor(999.0)
    assert type(plain) is uf.DiffusionModel and plain.denoise(x, t).abs().max() > 0.5
    assert clipped.denoise(x, t).abs().max() <= 0.5
