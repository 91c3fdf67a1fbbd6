"""SDXL VAE: equal to diffusers' AutoencoderKL on the same weights, same in GRAPH and PyNative,
official parameter names, and a name-complete diffusers <-> official converter."""
import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import nn
from mindspore.nn.utils import no_init_parameters

from conftest import BACKENDS, BASE_CONFIG, KEYS, TINY_CONFIG, read_key_yaml
from gm.backends import apply_backend
from gm.models.autoencoder import AutoencoderKLInferenceWrapper
from gm.modules.distributions import DiagonalGaussianDistribution
from gm.util import instantiate_from_config, load_params
from mindbooth.config import load_config
from tools.model_conversion.diffusers_vae import vae_from_official, vae_to_official
from tools.model_conversion.keymap import official_to_mindspore_names

HF_VAE_KEYS = KEYS / "diffuser_yaml" / "hf_key_vae.yaml"
OFFICIAL_VAE_KEYS = KEYS / "diffuser_yaml" / "torch_key_vae.yaml"


class Parent(nn.Cell):
    """Gives the VAE its place in the full model, so its names start with `first_stage_model.`."""

    def __init__(self, vae):
        super().__init__()
        self.first_stage_model = vae


class Call(nn.Cell):
    """Runs one method of the VAE as a Cell, so GRAPH mode compiles it."""

    def __init__(self, vae, method):
        super().__init__()
        self.vae = vae
        self.method = method

    def construct(self, *args):
        if self.method == "encode_moments":
            return self.vae.encode_moments(*args)
        if self.method == "encode":
            return self.vae.encode(*args)
        return self.vae.decode(*args)


def vae_config(path):
    return load_config(path).model.params.first_stage_config


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def key_lines(path):
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", params=BACKENDS)
def tiny(request):
    """diffusers AutoencoderKL with the tiny config's sizes and random weights, and ours loaded from it (frozen, in
    the backend of the parameter)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    reference = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64,
    ).eval()  # fmt: skip
    with torch.no_grad():  # move norms and biases off their defaults (ones / zeros), so mixing them up shows
        for param in reference.parameters():
            if param.ndim == 1:
                param.add_(0.3 * torch.randn_like(param))
    official = vae_to_official({name: value.numpy() for name, value in reference.state_dict().items()})
    renamed = official_to_mindspore_names({name: value.shape for name, value in official.items()})
    ours = instantiate_from_config(vae_config(TINY_CONFIG))
    load_params(Parent(ours), {renamed[name]: value for name, value in official.items()}, strict=True)
    for param in ours.get_parameters():
        param.requires_grad = False
    assert apply_backend(ours, request.param) == request.param
    ours.set_train(False)
    return reference, ours


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    latent = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    return image, latent, noise


def test_tiny_vae_matches_diffusers(tiny):
    reference, ours = tiny
    image, latent, noise = inputs()
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(image)).latent_dist
        mean, std = posterior.mean.numpy(), posterior.std.numpy()
        decoded = reference.decode(torch.from_numpy(latent)).sample.numpy()

    ours_posterior = DiagonalGaussianDistribution(ours.encode_moments(ms.Tensor(image)))
    assert rel_err(ours_posterior.mean.asnumpy(), mean) < 1e-4
    assert rel_err(ours_posterior.std.asnumpy(), std) < 1e-4
    assert rel_err(ours_posterior.mode().asnumpy(), mean) < 1e-4
    sample = ours.encode(ms.Tensor(image), ms.Tensor(noise)).asnumpy()
    assert rel_err(sample, mean + std * noise) < 1e-4
    assert rel_err(ours_posterior.sample(ms.Tensor(noise)).asnumpy(), mean + std * noise) < 1e-4
    out = ours.decode(ms.Tensor(latent)).asnumpy()
    assert out.shape == (2, 3, 64, 64)
    assert rel_err(out, decoded) < 1e-4
    assert ours.downsample_factor == 8 == load_config(TINY_CONFIG).model.params.latents_per_pixel


def standardized_noise_is_standard_normal(z, mean, std):
    eps = (z - mean) / std
    return abs(eps.mean()) < 0.2 and 0.8 < eps.std() < 1.2


def test_graph_mode_equals_pynative(tiny):
    _, ours = tiny
    image, latent, noise = (ms.Tensor(a) for a in inputs(seed=2))
    eager = [ours.encode_moments(image).asnumpy(), ours.encode(image, noise).asnumpy(), ours.decode(latent).asnumpy()]
    eager_draw = ours.encode(image).asnumpy()
    syntax_level = ms.get_context("jit_syntax_level")
    try:  # STRICT: the graph must compile without falling back to the Python interpreter
        ms.set_context(mode=ms.GRAPH_MODE, jit_syntax_level=ms.STRICT)
        graph = [
            Call(ours, "encode_moments")(image).asnumpy(),
            Call(ours, "encode")(image, noise).asnumpy(),
            Call(ours, "decode")(latent).asnumpy(),
        ]
        graph_draw = Call(ours, "encode")(image).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE, jit_syntax_level=syntax_level)
    for g, e in zip(graph, eager):
        assert rel_err(g, e) < 1e-5
    # without given noise, both modes draw standard normal noise around the posterior mean
    posterior = DiagonalGaussianDistribution(ms.Tensor(eager[0]))
    mean, std = posterior.mean.asnumpy(), posterior.std.asnumpy()
    assert standardized_noise_is_standard_normal(eager_draw, mean, std)
    assert standardized_noise_is_standard_normal(graph_draw, mean, std)


def test_full_size_names_and_shapes_equal_official_list():
    with no_init_parameters():
        model = Parent(instantiate_from_config(vae_config(BASE_CONFIG)))
    ours = [(name, tuple(param.shape)) for name, param in model.parameters_and_names()]
    official = read_key_yaml(KEYS / "mindspore_key_base.yaml")
    assert ours == [(name, shape) for name, shape in official.items() if name.startswith("first_stage_model.")]
    assert model.first_stage_model.downsample_factor == 8


def reference_diffusers_state():
    """The SDXL VAE's diffusers names, each holding a zero-memory array of its line number, shaped as the
    official checkpoint (2-D for diffusers' Linear attention layers)."""
    hf, official = key_lines(HF_VAE_KEYS), key_lines(OFFICIAL_VAE_KEYS)
    shapes = read_key_yaml(KEYS / "torch_key_base.yaml")
    state = {}
    for i, (name, official_name) in enumerate(zip(hf, official)):
        shape = shapes[official_name]
        if ".attentions." in name and name.endswith("weight") and len(shape) == 4:
            shape = shape[:2]
        state[name] = np.broadcast_to(np.float16(i), shape)
    return state, official, shapes


def test_converter_matches_reference_name_pairs_and_round_trips():
    state, official, shapes = reference_diffusers_state()
    assert len(state) == len(official) == 248
    converted = vae_to_official(state)
    assert sorted(converted) == sorted(official)
    for i, name in enumerate(official):  # line i of one list is line i of the other
        assert converted[name].shape == shapes[name]
        assert int(converted[name].flat[0]) == i, name
    back = vae_from_official(converted)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        assert back[name].shape == value.shape and int(back[name].flat[0]) == int(value.flat[0])


def test_converter_reads_legacy_attention_names_and_rejects_unknown_ones():
    state, _, _ = reference_diffusers_state()
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for name, value in state.items():
        for new, old in legacy_names.items():
            name = name.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[name] = value
    assert legacy.keys() != state.keys()
    assert {k: v.shape for k, v in vae_to_official(legacy).items()} == {k: v.shape for k, v in vae_to_official(state).items()}
    with pytest.raises(KeyError, match="encoder.mid_block.attentions.0.to_x.weight"):
        vae_to_official({**state, "encoder.mid_block.attentions.0.to_x.weight": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="first_stage_model"):
        vae_from_official({"model.diffusion_model.out.2.weight": np.zeros(1)})


def test_bad_config_is_reported():
    ddconfig = dict(vae_config(TINY_CONFIG).params.ddconfig)
    with pytest.raises(ValueError, match="multiple of 32"):
        AutoencoderKLInferenceWrapper(embed_dim=4, ddconfig={**ddconfig, "ch": 24})
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKLInferenceWrapper(embed_dim=4, ddconfig={**ddconfig, "double_z": False})
