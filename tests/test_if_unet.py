"""DeepFloyd IF's UNet (gm/modules/diffusionmodules/if_unet.py) against diffusers' UNet2DConditionModel on the same
weights: tiny random UNets of the stage-I shape (text only) and of the stage-II shape (6 input channels, the noise
level as `class_labels`, cross-attention only, a wider time embedding) load diffusers' state dict by name (every
name used, none missing) and give its output within 1e-4 relative; the full-size IF-I-XL and IF-II-L configs build
diffusers' names, shapes and parameter counts; the engine YAML configs' network_config builds the UNet it describes."""
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from mindspore.nn.utils import no_init_parameters
from omegaconf import OmegaConf

from gm.modules.diffusionmodules.if_unet import IFUNet
from gm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "inference"


def unet_config(name: str):
    """The engine config's UNet: model.params.network_config."""
    return OmegaConf.load(CONFIGS / name).model.params.network_config


def unet_params(name: str) -> dict:
    return dict(OmegaConf.to_container(unet_config(name))["params"])


def diffusers_config(params: dict) -> dict:
    """The YAML params as diffusers' UNet2DConditionModel takes them (our own option dropped)."""
    return {key: value for key, value in params.items() if key != "spatial_transformer_attn_type"}


def randomize(reference: torch.nn.Module, seed: int):
    """Every weight drawn at random, norms and the zero-initialised layers included, so nothing hides behind ones,
    zeros or an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in reference.named_parameters():
            if "norm" in name and name.endswith("weight"):
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
            else:
                value.copy_(torch.randn(value.shape, generator=generator) * 0.5 / max(1, value[0].numel()) ** 0.5)


def load_by_name(model: IFUNet, state: dict):
    params = {p.name: p for p in model.get_parameters()}
    assert sorted(params) == sorted(state), (sorted(set(params) ^ set(state)))[:10]
    for name, value in state.items():
        assert tuple(params[name].shape) == tuple(value.shape), name
        params[name].set_data(ms.Tensor(value.numpy()))


def compare(config_name: str, seed: int, batch_inputs):
    params = unet_params(config_name)
    torch.manual_seed(seed)
    reference = UNet2DConditionModel(**diffusers_config(params)).eval()
    randomize(reference, seed)
    model = instantiate_from_config(unet_config(config_name))
    load_by_name(model, reference.state_dict())
    model.set_train(False)
    x, t, context, class_labels = batch_inputs(params)
    with torch.no_grad():
        expected = reference(torch.tensor(x), torch.tensor(t), encoder_hidden_states=torch.tensor(context),
                             class_labels=None if class_labels is None else torch.tensor(class_labels)).sample.numpy()
    got = model(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context),
                None if class_labels is None else ms.Tensor(class_labels)).asnumpy()
    assert got.shape == expected.shape == (x.shape[0], params["out_channels"]) + x.shape[2:]
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error <= 1e-4, error
    return expected


def stage_inputs(stage_two: bool):
    def make(params):
        rng = np.random.default_rng(1)
        size = params["sample_size"]
        x = rng.standard_normal((2, params["in_channels"], size, size)).astype(np.float32)
        t = np.array([999, 17], np.int64)
        context = rng.standard_normal((2, 7, params["encoder_hid_dim"])).astype(np.float32)
        class_labels = np.array([250, 0], np.int64) if stage_two else None
        return x, t, context, class_labels
    return make


def test_tiny_stage_one_matches_diffusers():
    compare("if_i_tiny.yaml", 0, stage_inputs(stage_two=False))


def test_tiny_stage_two_matches_diffusers_and_uses_the_noise_level():
    expected = compare("if_ii_tiny.yaml", 1, stage_inputs(stage_two=True))
    assert np.isfinite(expected).all()


@pytest.mark.parametrize("config_name, params_in_billions", [("if_i_xl.yaml", 4.3), ("if_ii_l.yaml", 1.167)])
def test_full_size_names_and_shapes_equal_diffusers(config_name, params_in_billions):
    params = unet_params(config_name)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**diffusers_config(params))
    expected = {name: tuple(value.shape) for name, value in reference.state_dict().items()}
    with no_init_parameters():  # names and shapes only: nothing is allocated
        model = instantiate_from_config(unet_config(config_name))
    got = {p.name: tuple(p.shape) for p in model.get_parameters()}
    assert got == expected
    assert list(got) == list(expected)  # built in the released order
    count = sum(int(np.prod(shape)) for shape in got.values())
    assert count == sum(value.numel() for value in reference.parameters())
    if params_in_billions:
        assert count == pytest.approx(params_in_billions * 1e9, rel=0.01)


def test_a_released_config_json_builds_as_is():
    """A diffusers config.json (with its `_class_name` and every default field) gives IFUNet's params unchanged."""
    params = unet_params("if_i_tiny.yaml")
    full = dict(UNet2DConditionModel(**diffusers_config(params)).config)
    with no_init_parameters():
        model = IFUNet(**full)
    assert {p.name for p in model.get_parameters()} == set(
        UNet2DConditionModel(**diffusers_config(params)).state_dict())


@pytest.mark.parametrize("field, value, message", [
    ("upcast_attention", True, "upcast_attention=False only"),
    ("class_embed_type", "projection", "class_embed_type must be"),
    ("no_such_field", 1, "no parameter 'no_such_field'"),
])
def test_unsupported_fields_are_refused_with_the_reason(field, value, message):
    params = dict(unet_params("if_i_tiny.yaml"), **{field: value})
    with pytest.raises(ValueError, match=message):
        IFUNet(**params)


def test_stage_two_without_a_noise_level_says_what_is_missing():
    model = instantiate_from_config(unet_config("if_ii_tiny.yaml"))
    params = unet_params("if_ii_tiny.yaml")
    x, t, context, _ = stage_inputs(stage_two=True)(params)
    with pytest.raises(ValueError, match="needs class_labels"):
        model(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context))
