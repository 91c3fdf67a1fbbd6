"""Samplers vs diffusers' schedulers on a toy analytic denoiser, guidance, determinism, img2img.

The toy data distribution is Gaussian, x0 ~ N(MU, S^2) per element, so the exact denoiser is
D(x, sigma) = MU + S^2 / (S^2 + sigma^2) * (x - MU). Diffusers is driven by the epsilon model
derived from the same D: eps = (x - D(x, sigma)) / sigma, prediction_type="epsilon".
"""
import math

import mindspore as ms
import numpy as np
import pytest
import torch

from gm.modules.diffusionmodules import sampling
from gm.modules.diffusionmodules.discretizer import KarrasDiscretization, LegacyDDPMDiscretization
from gm.modules.diffusionmodules.sampler import sigmas_for_img2img
from gm.util import instantiate_from_config

SHAPE = (2, 4, 8, 8)
S = 0.5
MU = np.random.default_rng(11).standard_normal(SHAPE[1:]) * 0.7
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon")
LEGACY = {"target": "gm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}
KARRAS = {"target": "gm.modules.diffusionmodules.discretizer.KarrasDiscretization"}
SAMPLERS = "gm.modules.diffusionmodules.sampler."


def toy_denoise(x, sigma):
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def x_noise(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def assert_rel_close(got, ref, rtol=1e-4):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < rtol, f"relative error {err:.2e}"


def ve_eps(sched, x_in, i, vp):
    """Epsilon for diffusers' model input at step i. Euler-type schedulers hand the model
    x / sqrt(sigma^2 + 1) (VE sample scaled); DPM-Solver works on the VP sample x / sqrt(sigma^2 + 1)."""
    sigma = float(sched.sigmas[i])
    x = x_in.double().numpy() * math.sqrt(sigma**2 + 1)
    eps = (x - toy_denoise(x, sigma)) / sigma
    return torch.from_numpy(eps.astype(np.float32))


def run_diffusers(sched, x, vp=False, generator=None):
    x = torch.from_numpy(x)
    for i, t in enumerate(sched.timesteps):
        model_in = x if vp else sched.scale_model_input(x, t)
        kwargs = {"generator": generator} if generator is not None else {}
        x = sched.step(ve_eps(sched, model_in, i, vp), t, x, **kwargs).prev_sample
    return x.numpy()


def test_euler_matches_diffusers():
    from diffusers import EulerDiscreteScheduler

    disc = LegacyDDPMDiscretization()
    sigmas = disc(20)
    sched = EulerDiscreteScheduler(**SCHEDULE)
    sched.set_timesteps(timesteps=disc.timesteps(20)[::-1].tolist())
    np.testing.assert_allclose(sched.sigmas.numpy(), sigmas, rtol=2e-5)
    x0 = x_noise() * math.sqrt(1 + float(sigmas[0]) ** 2)
    ours = sampling.sample_euler(toy_denoise, x0.astype(np.float64), sigmas)
    assert_rel_close(ours, run_diffusers(sched, x0))


def test_heun_matches_diffusers():
    from diffusers import HeunDiscreteScheduler

    disc = LegacyDDPMDiscretization()
    sigmas = disc(15)
    sched = HeunDiscreteScheduler(**SCHEDULE)
    sched.set_timesteps(timesteps=disc.timesteps(15)[::-1].tolist())
    x0 = x_noise(1) * math.sqrt(1 + float(sigmas[0]) ** 2)
    calls = []
    ours = sampling.sample_heun(lambda x, s: calls.append(s) or toy_denoise(x, s), x0.astype(np.float64), sigmas)
    assert len(calls) == 2 * 15 - 1  # the last step into sigma = 0 is plain Euler, in both
    assert len(sched.timesteps) == len(calls)
    assert_rel_close(ours, run_diffusers(sched, x0))


def test_euler_ancestral_matches_diffusers_with_same_noise():
    from diffusers import EulerAncestralDiscreteScheduler

    sigmas = LegacyDDPMDiscretization()(20)
    sched = EulerAncestralDiscreteScheduler(**SCHEDULE, timestep_spacing="trailing")
    sched.set_timesteps(20)  # "trailing" spacing = sgm's timesteps for 20 steps
    np.testing.assert_allclose(sched.sigmas.numpy(), sigmas, rtol=2e-5)
    x0 = x_noise(2) * math.sqrt(1 + float(sigmas[0]) ** 2)

    ours_gen = torch.Generator().manual_seed(123)  # diffusers draws torch.randn(shape, generator) per step

    def noise_fn(x):
        return torch.randn(x.shape, generator=ours_gen, dtype=torch.float32).double().numpy()

    ours = sampling.sample_euler_ancestral(toy_denoise, x0.astype(np.float64), sigmas, noise_fn=noise_fn)
    ref = run_diffusers(sched, x0, generator=torch.Generator().manual_seed(123))
    assert_rel_close(ours, ref)
    # and the noise matters: another seed gives another sample
    other = torch.Generator().manual_seed(124)
    moved = sampling.sample_euler_ancestral(
        toy_denoise, x0.astype(np.float64), sigmas,
        noise_fn=lambda x: torch.randn(x.shape, generator=other).double().numpy())
    assert np.abs(moved - ours).max() > 1e-2


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [10, 20])  # diffusers' lower_order_final applies below 15 steps only
def test_dpmpp_2m_matches_diffusers(karras, steps):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                        use_karras_sigmas=karras)
    if karras:
        sigmas = KarrasDiscretization()(steps)
        sched.set_timesteps(steps)
    else:
        disc = LegacyDDPMDiscretization()
        sigmas = disc(steps)
        sched.set_timesteps(timesteps=disc.timesteps(steps)[::-1].tolist())
    np.testing.assert_allclose(sched.sigmas.numpy(), sigmas, rtol=2e-5)
    noise = x_noise(3)
    # our VE start x_noise * sqrt(1 + sigma_0^2) is diffusers' VP start x_noise; at sigma = 0 they agree
    ours = sampling.sample_dpmpp_2m(toy_denoise, noise.astype(np.float64) * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas)
    assert_rel_close(ours, run_diffusers(sched, noise, vp=True))


def test_euler_churn_follows_edm_formula():
    sigmas = LegacyDDPMDiscretization()(10)
    x0 = x_noise(4).astype(np.float64) * math.sqrt(1 + float(sigmas[0]) ** 2)
    draws = np.random.default_rng(9).standard_normal((10,) + SHAPE)
    it = iter(draws)
    s_churn, s_tmin, s_tmax, s_noise = 3.0, 0.5, 5.0, 1.003
    ours = sampling.sample_euler(toy_denoise, x0, sigmas, s_churn, s_tmin, s_tmax, s_noise, noise_fn=lambda x: next(it))

    # EDM Algorithm 2 (Euler part), gamma = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax]
    x, k = x0, 0
    for i in range(10):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / 10, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * draws[k]
            k += 1
        x = x + (s_next - s_hat) * (x - toy_denoise(x, s_hat)) / s_hat
    assert 0 < k < 10  # churn applied to some steps only
    np.testing.assert_allclose(ours, x, rtol=1e-12, atol=1e-12)
    # outside [s_tmin, s_tmax] nothing is added: equal to the deterministic sampler
    plain = sampling.sample_euler(toy_denoise, x0, sigmas)
    np.testing.assert_allclose(sampling.sample_euler(toy_denoise, x0, sigmas, s_churn=3.0, s_tmax=1e-3), plain)


def test_ancestral_with_eta_zero_is_euler():
    sigmas = LegacyDDPMDiscretization()(12)
    x0 = x_noise(5).astype(np.float64) * 10
    np.testing.assert_allclose(sampling.sample_euler_ancestral(toy_denoise, x0, sigmas, eta=0.0),
                               sampling.sample_euler(toy_denoise, x0, sigmas), rtol=1e-12)


def test_bad_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="descending"):
        sampling.sample_euler(toy_denoise, x_noise(), [0.0, 1.0])


# ---- sampler classes on MindSpore Tensors, with guidance ----

def ms_toy_denoiser_fn(x, sigma, cond):
    """denoiser_fn(x, sigma (B,), cond): the toy D with a mean shifted by cond['vector'] (so cond matters)."""
    mu = ms.Tensor(MU.astype(np.float32)) + cond["vector"].mean(axis=1).reshape(-1, 1, 1, 1)
    s2 = (sigma**2).reshape(-1, 1, 1, 1)
    return mu + (S**2) / (S**2 + s2) * (x - mu)


COND = {"vector": ms.Tensor(np.full((2, 3), 0.4, np.float32)), "crossattn": ms.Tensor(np.ones((2, 5, 6), np.float32))}
UC = {"vector": ms.Tensor(np.full((2, 3), -0.2, np.float32)), "crossattn": ms.Tensor(np.zeros((2, 5, 6), np.float32))}


def np_guided_denoise(scale):
    def denoise(x, sigma):
        d_c = MU + 0.4 + S**2 / (S**2 + sigma**2) * (x - MU - 0.4)
        d_u = MU - 0.2 + S**2 / (S**2 + sigma**2) * (x - MU + 0.2)
        return d_u + scale * (d_c - d_u)
    return denoise


def build(name, discretization=LEGACY, num_steps=12, scale=5.0, **params):
    guider = {"target": "gm.modules.diffusionmodules.guiders.VanillaCFG", "params": {"scale": scale}}
    return instantiate_from_config({"target": SAMPLERS + name, "params": dict(
        num_steps=num_steps, discretization_config=discretization, guider_config=guider, **params)})


def test_vanilla_cfg_order_and_formula():
    from gm.modules.diffusionmodules.guiders import VanillaCFG

    guider = VanillaCFG(7.5)
    x = ms.Tensor(x_noise(6))
    sigma = ms.Tensor(np.array([3.0, 3.0], np.float32))
    x_in, s_in, c_in = guider.prepare_inputs(x, sigma, COND, UC)
    assert x_in.shape == (4,) + SHAPE[1:] and s_in.shape == (4,)
    np.testing.assert_array_equal(c_in["vector"].asnumpy()[:2], UC["vector"].asnumpy())  # uncond first (sgm)
    np.testing.assert_array_equal(c_in["vector"].asnumpy()[2:], COND["vector"].asnumpy())
    out = guider(ms_toy_denoiser_fn(x_in, s_in, c_in), s_in).asnumpy()
    d_u = ms_toy_denoiser_fn(x, sigma, UC).asnumpy()
    d_c = ms_toy_denoiser_fn(x, sigma, COND).asnumpy()
    np.testing.assert_allclose(out, d_u + 7.5 * (d_c - d_u), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="uc"):
        guider.prepare_inputs(x, sigma, COND, {"vector": UC["vector"]})


@pytest.mark.parametrize("name,fn,disc", [
    ("EulerEDMSampler", sampling.sample_euler, LEGACY),
    ("HeunEDMSampler", sampling.sample_heun, LEGACY),
    ("DPMPP2MSampler", sampling.sample_dpmpp_2m, KARRAS),
])
def test_sampler_class_on_tensors_matches_function(name, fn, disc):
    sampler = build(name, disc)
    steps = []
    out = sampler(ms_toy_denoiser_fn, ms.Tensor(x_noise(7)), COND, UC, callback=lambda info: steps.append(info["i"]))
    assert isinstance(out, ms.Tensor) and steps == list(range(12))
    sigmas = instantiate_from_config(disc)(12)
    start = x_noise(7).astype(np.float64) * math.sqrt(1 + float(sigmas[0]) ** 2)  # sgm's prepare_sampling_loop
    assert_rel_close(out.asnumpy(), fn(np_guided_denoise(5.0), start, sigmas))


def test_sampler_is_deterministic():
    for name in ("EulerEDMSampler", "EulerAncestralSampler"):
        sampler = build(name)
        a = sampler(ms_toy_denoiser_fn, ms.Tensor(x_noise(8)), COND, UC, rng=np.random.default_rng(1)).asnumpy()
        b = sampler(ms_toy_denoiser_fn, ms.Tensor(x_noise(8)), COND, UC, rng=np.random.default_rng(1)).asnumpy()
        np.testing.assert_array_equal(a, b)
    c = sampler(ms_toy_denoiser_fn, ms.Tensor(x_noise(8)), COND, UC, rng=np.random.default_rng(2)).asnumpy()
    assert np.abs(c - a).max() > 1e-3  # the ancestral sampler's per-step noise comes from rng


def test_ancestral_class_matches_function_with_rng_noise():
    sampler = build("EulerAncestralSampler", scale=1.0)  # scale 1: the conditional prediction
    out = sampler(ms_toy_denoiser_fn, ms.Tensor(x_noise(9)), COND, UC, rng=np.random.default_rng(4)).asnumpy()
    sigmas = LegacyDDPMDiscretization()(12)
    rng = np.random.default_rng(4)
    ref = sampling.sample_euler_ancestral(np_guided_denoise(1.0), x_noise(9).astype(np.float64) * math.sqrt(1 + float(sigmas[0]) ** 2),
                                          sigmas, noise_fn=lambda x: rng.standard_normal(x.shape).astype(np.float32))
    assert_rel_close(out, ref)


def test_img2img_schedule_and_start():
    sigmas = LegacyDDPMDiscretization()(10)  # 11 values with the 0
    np.testing.assert_array_equal(sigmas_for_img2img(sigmas, 1.0), sigmas)
    np.testing.assert_array_equal(sigmas_for_img2img(sigmas, 0.5), sigmas[-5:])  # int(0.5 * 11) = 5
    np.testing.assert_array_equal(sigmas_for_img2img(sigmas, 0.01), [0.0])
    with pytest.raises(ValueError, match="strength"):
        sigmas_for_img2img(sigmas, 0.0)

    sampler = build("EulerEDMSampler", num_steps=10)
    init = x_noise(10) * 0.3
    out = sampler(ms_toy_denoiser_fn, ms.Tensor(x_noise(11)), COND, UC, init_latents=ms.Tensor(init), strength=0.5)
    cut = sigmas[-5:]
    ref = sampling.sample_euler(np_guided_denoise(5.0), init.astype(np.float64) + x_noise(11) * float(cut[0]), cut)
    assert_rel_close(out.asnumpy(), ref)
    with pytest.raises(ValueError, match="init_latents"):
        sampler(ms_toy_denoiser_fn, ms.Tensor(x_noise(11)), COND, UC, strength=0.5)
