"""Diffusion math (sgm semantics): schedules vs diffusers and the formulas, denoiser, loss, sigma sampling."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from gm.modules.diffusionmodules.denoiser_scaling import EpsScaling
from gm.modules.diffusionmodules.denoiser_weighting import EpsWeighting
from gm.modules.diffusionmodules.discretizer import KarrasDiscretization, LegacyDDPMDiscretization
from gm.util import instantiate_from_config

LEGACY = {"target": "gm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}
DENOISER = {
    "target": "gm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
    "params": {"num_idx": 1000, "discretization_config": LEGACY,
               "scaling_config": {"target": "gm.modules.diffusionmodules.denoiser_scaling.EpsScaling"}},
}
LOSS = {
    "target": "gm.modules.diffusionmodules.loss.StandardDiffusionLoss",
    "params": {"sigma_sampler_config": {"target": "gm.modules.diffusionmodules.sigma_sampling.DiscreteSampling",
                                        "params": {"num_idx": 1000, "discretization_config": LEGACY}}},
}


def formula_table():
    """sigma_t = sqrt((1 - prod(1 - beta)) / prod(1 - beta)), betas linear in sqrt space, float64."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1 - betas)
    return np.sqrt((1 - acp) / acp)


def test_full_table_matches_diffusers_and_formula():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref = np.sqrt((1 - sched.alphas_cumprod.numpy()) / sched.alphas_cumprod.numpy())
    disc = LegacyDDPMDiscretization()
    np.testing.assert_allclose(disc.betas, sched.betas.numpy(), rtol=1e-5)
    ascending = disc(1000, do_append_zero=False, flip=True)
    assert ascending.dtype == np.float32 and ascending.shape == (1000,)
    np.testing.assert_allclose(ascending, ref, rtol=2e-5)
    np.testing.assert_allclose(ascending, formula_table(), rtol=1e-6)
    assert abs(ascending[-1] - 14.6146) < 1e-3 and abs(ascending[0] - 0.0292) < 1e-4
    # default: descending with a trailing zero; flip reverses that whole array
    full = disc(1000)
    assert full.shape == (1001,) and full[-1] == 0 and np.all(np.diff(full) < 0)
    np.testing.assert_array_equal(disc(1000, flip=True), full[::-1])


@pytest.mark.parametrize("n", [40, 7, 1])
def test_step_schedule_matches_sgm_formula(n):
    table = formula_table()
    timesteps = np.linspace(999, 0, n, endpoint=False).astype(int)[::-1]
    expected = np.append(table[timesteps][::-1], 0.0)
    got = LegacyDDPMDiscretization()(n)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(LegacyDDPMDiscretization()(n, do_append_zero=False), expected[:-1], rtol=1e-6)


def test_step_schedule_matches_diffusers_trailing_spacing():
    # For a step count dividing 1000, sgm's timesteps are diffusers' "trailing" ones (999, 974, ...).
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   timestep_spacing="trailing")
    sched.set_timesteps(40)
    disc = LegacyDDPMDiscretization()
    np.testing.assert_array_equal(sched.timesteps.numpy().astype(int), disc.timesteps(40)[::-1])
    np.testing.assert_allclose(disc(40), sched.sigmas.numpy(), rtol=2e-5)


def test_too_many_steps_is_a_clear_error():
    with pytest.raises(ValueError, match="at most 1000"):
        LegacyDDPMDiscretization()(1001)


@pytest.mark.parametrize("n", [10, 25])
def test_karras_matches_diffusers(n):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        use_karras_sigmas=True)
    sched.set_timesteps(n)
    got = KarrasDiscretization()(n)
    np.testing.assert_allclose(got, sched.sigmas.numpy(), rtol=2e-5)
    # formula with explicit ends
    ramp = np.linspace(0, 1, n)
    table = formula_table()
    ref = (table[-1] ** (1 / 7) + ramp * (table[0] ** (1 / 7) - table[-1] ** (1 / 7))) ** 7
    np.testing.assert_allclose(got[:-1], ref, rtol=1e-6)


def test_eps_scaling_and_weighting():
    sigma = np.array([0.03, 1.0, 14.6], np.float32)
    c_skip, c_out, c_in, c_noise = (t.asnumpy() for t in EpsScaling()(ms.Tensor(sigma)))
    np.testing.assert_allclose(c_skip, 1.0)
    np.testing.assert_allclose(c_out, -sigma)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma.astype(np.float64) ** 2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_noise, sigma)
    np.testing.assert_allclose(EpsWeighting()(ms.Tensor(sigma)).asnumpy(), sigma.astype(np.float64) ** -2, rtol=1e-6)


class ToyNet(nn.Cell):
    """network(x, t, cond): a small function of all three inputs, with a trainable weight."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Dense(3, 4)
        self.proj.weight.set_data(ms.Tensor(np.linspace(-0.5, 0.5, 12, dtype=np.float32).reshape(4, 3)))
        self.proj.bias.set_data(ms.Tensor(np.full((4,), 0.1, np.float32)))

    def construct(self, x, t, cond):
        scale = self.proj(cond["vector"]).reshape(x.shape[0], -1, 1, 1)
        return ops.tanh(x * scale) + t.reshape(-1, 1, 1, 1) * 1e-3 + cond["crossattn"].mean(axis=(1, 2)).reshape(-1, 1, 1, 1)


def toy_net_np(x, t, vector, crossattn):
    w = np.linspace(-0.5, 0.5, 12).reshape(4, 3)
    scale = (vector @ w.T + 0.1).reshape(x.shape[0], -1, 1, 1)
    return np.tanh(x * scale) + t.reshape(-1, 1, 1, 1) * 1e-3 + crossattn.mean(axis=(1, 2)).reshape(-1, 1, 1, 1)


def toy_inputs(seed=0, batch=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, 5, 6)).astype(np.float32)
    cond = {"vector": rng.standard_normal((batch, 3)).astype(np.float32),
            "crossattn": rng.standard_normal((batch, 7, 8)).astype(np.float32)}
    return x, cond


def test_denoiser_matches_hand_formula():
    denoiser = instantiate_from_config(DENOISER)
    table = formula_table()
    idx = np.array([0, 417, 999])
    sigma = (table[idx] * np.array([1.0003, 0.9997, 1.0])).astype(np.float32)  # off-table: must snap back
    x, cond = toy_inputs()
    out = denoiser(ToyNet(), ms.Tensor(x), ms.Tensor(sigma), {k: ms.Tensor(v) for k, v in cond.items()}).asnumpy()

    s = table[idx].reshape(-1, 1, 1, 1)  # quantized sigma
    expected = toy_net_np(x / np.sqrt(s**2 + 1), idx.astype(np.float64), cond["vector"], cond["crossattn"]) * -s + x
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(denoiser.sigma_to_idx(ms.Tensor(sigma)).asnumpy(), idx)
    np.testing.assert_allclose(denoiser.idx_to_sigma(ms.Tensor(idx)).asnumpy(), table[idx], rtol=1e-6)


def test_loss_is_eps_mse():
    loss_fn = instantiate_from_config(LOSS)
    denoiser = instantiate_from_config(DENOISER)
    net = ToyNet()
    rng = np.random.default_rng(3)
    x0, cond = toy_inputs(1)
    sigmas = loss_fn.sample_sigmas(3, rng)
    noise = loss_fn.sample_noise(x0.shape, rng)
    ms_cond = {k: ms.Tensor(v) for k, v in cond.items()}
    loss = loss_fn(net, denoiser, ms_cond, ms.Tensor(x0), ms.Tensor(noise), ms.Tensor(sigmas)).asnumpy()

    s = sigmas.astype(np.float64).reshape(-1, 1, 1, 1)
    idx = np.argmin(np.abs(formula_table()[:, None] - sigmas[None]), axis=0)
    eps_pred = toy_net_np((x0 + noise * s) / np.sqrt(s**2 + 1), idx.astype(np.float64), cond["vector"], cond["crossattn"])
    assert loss.shape == (3,)
    np.testing.assert_allclose(loss, ((eps_pred - noise) ** 2).mean(axis=(1, 2, 3)), rtol=1e-4)

    # l1: w * |D - x0| = |noise - eps_pred| / sigma
    params = dict(LOSS["params"], loss_type="l1")
    l1 = instantiate_from_config({"target": LOSS["target"], "params": params})
    got = l1(net, denoiser, ms_cond, ms.Tensor(x0), ms.Tensor(noise), ms.Tensor(sigmas)).asnumpy()
    np.testing.assert_allclose(got, (np.abs(eps_pred - noise) / s).mean(axis=(1, 2, 3)), rtol=1e-4)

    with pytest.raises(ValueError, match="loss_type"):
        instantiate_from_config({"target": LOSS["target"], "params": dict(LOSS["params"], loss_type="l3")})


def test_offset_noise_is_per_channel_constant_from_rng():
    params = dict(LOSS["params"], offset_noise_level=0.1)
    loss_fn = instantiate_from_config({"target": LOSS["target"], "params": params})
    noise = loss_fn.sample_noise((2, 4, 3, 3), np.random.default_rng(5))
    rng = np.random.default_rng(5)
    expected = rng.standard_normal((2, 4, 3, 3)) + 0.1 * rng.standard_normal((2, 4))[:, :, None, None]
    np.testing.assert_allclose(noise, expected, rtol=1e-6)


def test_discrete_sampling_reproducible_and_in_table():
    sampler = instantiate_from_config(LOSS["params"]["sigma_sampler_config"])
    a = sampler(4096, np.random.default_rng(7))
    b = sampler(4096, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.shape == (4096,)
    table = formula_table()
    np.testing.assert_allclose(a, table[np.random.default_rng(7).integers(0, 1000, 4096)], rtol=1e-6)
    assert not np.array_equal(a, sampler(4096, np.random.default_rng(8)))
    with pytest.raises(TypeError, match="Generator"):
        sampler(4, 7)


class TrainStep(nn.Cell):
    """Shape of the real training step: loss of the network through denoiser and loss Cells."""

    def __init__(self, net, denoiser, loss_fn):
        super().__init__(auto_prefix=False)
        self.net, self.denoiser, self.loss_fn = net, denoiser, loss_fn

    def construct(self, x0, noise, sigmas, cond):
        return self.loss_fn(self.net, self.denoiser, cond, x0, noise, sigmas).mean()


def test_graph_mode_equals_pynative():
    net = ToyNet()
    step = TrainStep(net, instantiate_from_config(DENOISER), instantiate_from_config(LOSS))
    assert sorted(n for n, _ in step.parameters_and_names()) == ["net.proj.bias", "net.proj.weight"]
    x0, cond = toy_inputs(2)
    rng = np.random.default_rng(0)
    args = (ms.Tensor(x0), ms.Tensor(rng.standard_normal(x0.shape).astype(np.float32)),
            ms.Tensor(step.loss_fn.sample_sigmas(3, rng)), {k: ms.Tensor(v) for k, v in cond.items()})
    grad_fn = ms.value_and_grad(step, None, net.trainable_params())
    loss_py, grads_py = grad_fn(*args)
    try:
        ms.set_context(mode=ms.GRAPH_MODE)
        loss_graph, grads_graph = grad_fn(*args)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    np.testing.assert_allclose(loss_graph.asnumpy(), loss_py.asnumpy(), rtol=1e-5)
    assert float(np.abs(grads_py[0].asnumpy()).max()) > 0
    for g_graph, g_py in zip(grads_graph, grads_py):
        np.testing.assert_allclose(g_graph.asnumpy(), g_py.asnumpy(), rtol=1e-4, atol=1e-7)
