"""The SDXL UNet: official key layout at full size, numerical parity with diffusers on the tiny config."""
import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import nn
from mindspore.nn.utils import no_init_parameters

from conftest import BACKENDS, BASE_CONFIG, KEYS, TINY_CONFIG, read_key_yaml
from gm.backends import apply_backend
from gradients import Gradients
from gm.modules.diffusionmodules.wrappers import OpenAIWrapper
from gm.util import instantiate_from_config, load_params
from mindbooth.config import load_config
from tools.model_conversion.diffusers_unet import unet_from_official, unet_to_official
from tools.model_conversion.keymap import official_to_mindspore_names


class _Holder(nn.Cell):
    """Puts the UNet where the official checkpoint has it: `model.diffusion_model`."""

    def __init__(self, unet):
        super().__init__()
        self.model = OpenAIWrapper(unet)


def build_unet(config_path):
    return instantiate_from_config(load_config(config_path).model.params.network_config)


def test_full_size_unet_names_and_shapes_equal_the_official_checkpoint():
    with no_init_parameters():
        holder = _Holder(build_unet(BASE_CONFIG))
    ours = {name: tuple(p.shape) for name, p in holder.parameters_and_names()}
    reference = {k: v for k, v in read_key_yaml(KEYS / "mindspore_key_base.yaml").items() if k.startswith("model.diffusion_model.")}
    assert len(reference) == 1680
    assert ours == reference


def test_diffusers_name_map_matches_reference_pairs_both_ways():
    pairs = KEYS / "diffuser_yaml"
    hf = (pairs / "hf_key_unet.yaml").read_text().split()
    official = (pairs / "torch_key_unet.yaml").read_text().split()
    index_by_official = unet_to_official({name: i for i, name in enumerate(hf)})
    assert [hf[index_by_official[o]] for o in official] == hf
    index_by_hf = unet_from_official({name: i for i, name in enumerate(official)})
    assert [official[index_by_hf[h]] for h in hf] == official


def tiny_diffusers_unet(config):
    from diffusers import UNet2DConditionModel

    p = config.model.params.network_config.params
    channels = [p.model_channels * m for m in p.channel_mult]
    has_attention = [2**level in p.attention_resolutions for level in range(len(channels))]
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=16,
        in_channels=p.in_channels,
        out_channels=p.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)),
        block_out_channels=tuple(channels),
        layers_per_block=p.num_res_blocks,
        transformer_layers_per_block=tuple(p.transformer_depth),
        attention_head_dim=tuple(c // p.num_head_channels for c in channels),
        cross_attention_dim=p.context_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=p.adm_in_channels,
        norm_num_groups=32,
    ).eval()
    # Random everything (diffusers zero-inits nothing here, but norms start at 1/0): make every parameter count.
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if param.ndim == 1 and param.abs().max() == 1 else 0.0))
    return model


def load_diffusers_unet_into_ours(torch_model, unet):
    official = unet_to_official({k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
    stripped = {k[len("model.diffusion_model."):]: v for k, v in official.items()}
    renamed = official_to_mindspore_names({k: v.shape for k, v in stripped.items()})
    load_params(unet, {renamed[k]: v for k, v in stripped.items()}, strict=True)


def relative_error(ours, reference):
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module", params=BACKENDS)
def tiny_pair(request):
    """(our tiny UNet, frozen as in a LoRA run, in the backend of the parameter; inputs; diffusers' output; diffusers'
    UNet)."""
    config = load_config(TINY_CONFIG)
    reference = tiny_diffusers_unet(config)
    unet = build_unet(TINY_CONFIG)
    load_diffusers_unet_into_ours(reference, unet)
    for param in unet.get_parameters():
        param.requires_grad = False
    assert apply_backend(unet, request.param) == request.param
    rng = np.random.default_rng(0)
    p = config.model.params.network_config.params
    inputs = dict(
        x=rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
        t=np.array([3.0, 917.0], np.float32),
        context=rng.standard_normal((2, 77, p.context_dim)).astype(np.float32),
        y=rng.standard_normal((2, p.adm_in_channels)).astype(np.float32),
    )
    with torch.no_grad():
        # diffusers splits SDXL's vector into pooled text embeds + 6 size numbers; feed the same vector via its parts
        # by giving add_embedding the full vector directly (time_ids are embedded inside diffusers otherwise).
        emb = reference.get_time_embed(sample=torch.from_numpy(inputs["x"]), timestep=torch.from_numpy(inputs["t"]))
        emb = reference.time_embedding(emb) + reference.add_embedding(torch.from_numpy(inputs["y"]))
        expected = _diffusers_forward_with_emb(reference, torch.from_numpy(inputs["x"]), emb, torch.from_numpy(inputs["context"]))
    return unet, inputs, expected.numpy(), reference


def _diffusers_forward_with_emb(model, sample, emb, context):
    """diffusers' UNet2DConditionModel.forward from the combined embedding on (its add_time_proj path is
    checked separately by the conditioner's size-embedding test)."""
    sample = model.conv_in(sample)
    skips = (sample,)
    for block in model.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        skips += res
    sample = model.mid_block(sample, emb, encoder_hidden_states=context)
    for block in model.up_blocks:
        res = skips[-len(block.resnets):]
        skips = skips[: -len(block.resnets)]
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res)
    return model.conv_out(model.conv_act(model.conv_norm_out(sample)))


def run_ours(unet, inputs):
    return unet(*(ms.Tensor(inputs[k]) for k in ("x", "t", "context", "y"))).asnumpy()


def test_tiny_unet_matches_diffusers(tiny_pair):
    unet, inputs, expected, _ = tiny_pair
    assert relative_error(run_ours(unet, inputs), expected) < 1e-4


def test_tiny_unet_graph_mode_equals_pynative(tiny_pair):
    unet, inputs, expected, _ = tiny_pair
    pynative = run_ours(unet, inputs)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = run_ours(unet, inputs)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert relative_error(graph, pynative) < 1e-5
    assert relative_error(graph, expected) < 1e-4


class _WeightedOutput(nn.Cell):
    def __init__(self, unet, weights):
        super().__init__()
        self.unet, self.weights = unet, weights

    def construct(self, x, t, context, y):
        return (self.unet(x, t, context, y) * self.weights).sum()


def test_tiny_unet_input_gradients_match_diffusers(tiny_pair):
    """Through the whole frozen UNet (as in a LoRA run; in the CPU backend with the frozen convolutions', the
    attention's and GELU's own backward passes) the gradients for the latents, the text context and the vector are
    torch autograd's."""
    unet, inputs, _, reference = tiny_pair
    weights = np.random.default_rng(5).standard_normal(run_ours(unet, inputs).shape).astype(np.float32)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        loss = _WeightedOutput(unet, ms.Tensor(weights))
        grads = Gradients(loss)(*(ms.Tensor(inputs[k]) for k in ("x", "t", "context", "y")))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    ours = dict(x=grads[0].asnumpy(), context=grads[2].asnumpy(), y=grads[3].asnumpy())
    x, context, y = (torch.from_numpy(inputs[k]).requires_grad_(True) for k in ("x", "context", "y"))
    emb = reference.get_time_embed(sample=x, timestep=torch.from_numpy(inputs["t"]))
    emb = reference.time_embedding(emb) + reference.add_embedding(y)
    (_diffusers_forward_with_emb(reference, x, emb, context) * torch.from_numpy(weights)).sum().backward()
    for name, tensor in (("x", x), ("context", context), ("y", y)):
        assert relative_error(ours[name], tensor.grad.numpy()) < 1e-4, name
