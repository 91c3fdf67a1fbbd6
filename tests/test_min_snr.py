"""Min-SNR-gamma loss weighting (--snr_gamma) against diffusers' training scripts: the same timesteps, noise and
model output give the per-sample loss diffusers computes (compute_snr, min(SNR, gamma) / SNR for eps,
/ (SNR + 1) for v), through MindBooth's loss Cell and denoiser; and the flag's validation."""
import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from mindspore import nn

from gm.modules.diffusionmodules.denoiser import DiscreteDenoiser
from gm.modules.diffusionmodules.loss import StandardDiffusionLoss
from mindbooth.config import TRAIN_FLAGS, training_parser, load_training_config

DISCRETIZATION = {"target": "gm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}
WEIGHTING = {"epsilon": "EpsWeighting", "v_prediction": "VWeighting"}
SCALING = {"epsilon": "EpsScaling", "v_prediction": "VScaling"}


class FakeUNet(nn.Cell):
    """A fixed function of the network input and timestep, standing in for the UNet."""

    def construct(self, x, t, cond):
        return ops_tanh(x) * 0.8 + (t / 1000.0).reshape(-1, 1, 1, 1)


def ops_tanh(x):
    return ms.ops.tanh(x)


def mindbooth_loss(prediction_type: str, snr_gamma, latents, noise, timesteps):
    loss = StandardDiffusionLoss(
        sigma_sampler_config={"target": "gm.modules.diffusionmodules.sigma_sampling.DiscreteSampling",
                              "params": {"num_idx": 1000, "discretization_config": DISCRETIZATION}},
        loss_weighting_config={"target": f"gm.modules.diffusionmodules.denoiser_weighting.{WEIGHTING[prediction_type]}"},
        snr_gamma=snr_gamma)
    denoiser = DiscreteDenoiser(1000, DISCRETIZATION, {
        "target": f"gm.modules.diffusionmodules.denoiser_scaling.{SCALING[prediction_type]}"})
    sigmas = loss.sigma_sampler.idx_to_sigma(timesteps).astype(np.float32)
    out = loss(FakeUNet(), denoiser, {}, ms.Tensor(latents), ms.Tensor(noise), ms.Tensor(sigmas))
    return out.asnumpy()


def diffusers_loss(prediction_type: str, snr_gamma, latents, noise, timesteps):
    """diffusers' train_dreambooth_lora*.py loss, per sample."""
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    latents, noise, t = torch.tensor(latents), torch.tensor(noise), torch.tensor(timesteps)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = torch.tanh(noisy) * 0.8 + (t.float() / 1000.0).reshape(-1, 1, 1, 1)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    per_sample = ((pred.float() - target.float()) ** 2).mean(dim=[1, 2, 3])
    if snr_gamma is None:
        return per_sample.numpy()
    snr = compute_snr(scheduler, t)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    return (per_sample * weights).numpy()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0, 1.0])
def test_loss_equals_diffusers(prediction_type, snr_gamma):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)
    timesteps = np.array([0, 10, 150, 400, 700, 999])  # SNR from ~1000 down to ~0.005: both sides of gamma
    got = mindbooth_loss(prediction_type, snr_gamma, latents, noise, timesteps)
    expected = diffusers_loss(prediction_type, snr_gamma, latents, noise, timesteps)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-7)


def test_gamma_changes_the_loss_where_snr_exceeds_it():
    rng = np.random.default_rng(1)
    latents, noise = rng.standard_normal((2, 2, 4, 4, 4)).astype(np.float32)
    timesteps = np.array([5, 990])  # SNR ~ 400 (clipped to gamma) and ~ 0.006 (below gamma: unchanged)
    plain = mindbooth_loss("epsilon", None, latents, noise, timesteps)
    weighted = mindbooth_loss("epsilon", 5.0, latents, noise, timesteps)
    assert weighted[0] < plain[0] / 10
    np.testing.assert_allclose(weighted[1], plain[1], rtol=1e-5)


def test_snr_gamma_needs_an_eps_or_v_weighting():
    with pytest.raises(ValueError, match="snr_gamma weights the eps or v MSE"):
        StandardDiffusionLoss(
            sigma_sampler_config={"target": "gm.modules.diffusionmodules.sigma_sampling.DiscreteSampling",
                                  "params": {"num_idx": 1000, "discretization_config": DISCRETIZATION}},
            loss_weighting_config={"target": "tests.test_min_snr.FakeUNet"}, snr_gamma=5.0)


@pytest.mark.parametrize("value, message", [("0", "greater than 0"), ("-1", "greater than 0"), ("nan", "finite")])
def test_flag_is_checked_before_any_work(value, message):
    from mindbooth.validation import UsageError, check_training_numbers

    args = training_parser().parse_args(["--config", "configs/training/sd_xl_tiny_dreambooth_lora_cpu.yaml",
                                         "--snr_gamma", value, "--instance_data_path", "x", "--instance_prompt", "p"])
    config = load_training_config(args)
    assert config.model.params.loss_fn_config.params.snr_gamma == float(value) or value == "nan"
    with pytest.raises(UsageError, match=f"--snr_gamma must be .*{message}"):
        check_training_numbers(config, args.config)
    assert "snr_gamma" in TRAIN_FLAGS
