"""GeneralConditioner built from the configs: output layout, parameter names, size embeddings, zeroing."""
import mindspore as ms
import numpy as np
import pytest
import torch
from conftest import BASE_CONFIG, KEYS, TINY_CONFIG, read_key_yaml
from mindspore import nn
from omegaconf import OmegaConf

from gm.modules.embedders.modules import ConcatTimestepEmbedderND
from gm.util import instantiate_from_config
from mindbooth.config import load_config

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
BATCH = {
    "txt": ["a photo of sks dog", "a red car on a mountain road at night"],
    "original_size_as_tuple": [[1024, 1024], [768, 1344]],    # list of pairs
    "crop_coords_top_left": np.array([[0, 0], [37, 512]]),     # numpy
    "target_size_as_tuple": ms.Tensor([[1024, 1024], [896, 1152]], ms.float32),  # Tensor
}


class Holder(nn.Cell):
    def __init__(self, conditioner):
        super().__init__()
        self.conditioner = conditioner


def conditioner_config(path):
    return load_config(path).model.params.conditioner_config


@pytest.fixture(scope="module")
def tiny():
    return instantiate_from_config(conditioner_config(TINY_CONFIG))


def diffusers_size_embedding(values):
    """diffusers' SDXL `add_time_ids` embedding: Timesteps(256, flip_sin_to_cos=True, shift 0) per number."""
    from diffusers.models.embeddings import Timesteps

    values = torch.as_tensor(np.asarray(values, np.float32))
    emb = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(values.flatten())
    return emb.reshape(values.shape[0], -1).numpy()


def test_output_shapes_fit_the_unet(tiny):
    unet = load_config(TINY_CONFIG).model.params.network_config.params
    out = tiny.encode(BATCH)
    assert out["crossattn"].shape == (2, 77, unet.context_dim) == (2, 77, 96)
    assert out["vector"].shape == (2, unet.adm_in_channels) == (2, 1584)
    assert out["crossattn"].dtype == out["vector"].dtype == ms.float32


def test_full_size_parameter_names_and_shapes_equal_mindone_list():
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():  # names and shapes only: nothing is allocated
        conditioner = instantiate_from_config(conditioner_config(BASE_CONFIG))
    ours = {name: tuple(p.shape) for name, p in Holder(conditioner).parameters_and_names()}
    expected = {k: v for k, v in read_key_yaml(KEYS / "mindspore_key_base.yaml").items() if k.startswith("conditioner.")}
    assert len(expected) == 196 + 390
    assert ours == expected
    assert not any(p.requires_grad for p in conditioner.get_parameters())  # is_trainable: False everywhere


def test_is_trainable_leaves_parameters_trainable():
    config = OmegaConf.to_container(conditioner_config(TINY_CONFIG))
    config["params"]["emb_models"][1]["is_trainable"] = True
    conditioner = instantiate_from_config(config)
    assert not any(p.requires_grad for p in conditioner.embedders[0].get_parameters())
    assert all(p.requires_grad for p in conditioner.embedders[1].get_parameters())


def test_vector_is_pooled_text_then_sizes_in_order(tiny):
    vector = tiny.encode(BATCH)["vector"].asnumpy()
    ids = tiny.embedders[1].tokenize(BATCH["txt"])
    _, pooled = tiny.embedders[1](ids)
    np.testing.assert_array_equal(vector[:, :48], pooled.asnumpy())
    sizes = vector[:, 48:].reshape(2, 3, 512)
    for n, key in enumerate(SIZE_KEYS):
        value = BATCH[key].asnumpy() if isinstance(BATCH[key], ms.Tensor) else BATCH[key]
        # cos/sin of arguments up to ~1300 in fp32: the two libraries round differently by ~1e-4
        np.testing.assert_allclose(sizes[:, n], diffusers_size_embedding(value), atol=3e-4, rtol=0)


def test_size_embedder_matches_diffusers_on_its_own():
    values = np.array([[0.0, 1.0], [1024.0, 17.0], [3.0, 2048.0]], np.float32)
    embedder = ConcatTimestepEmbedderND(outdim=256)
    ours = embedder(embedder.tokenize(values)).asnumpy()
    assert ours.shape == (3, 512)
    np.testing.assert_allclose(ours, diffusers_size_embedding(values), atol=3e-4, rtol=0)


def test_crossattn_is_clip_l_then_open_clip(tiny):
    crossattn = tiny.encode(BATCH)["crossattn"].asnumpy()
    clip_l = tiny.embedders[0](tiny.embedders[0].tokenize(BATCH["txt"])).asnumpy()
    open_clip, _ = tiny.embedders[1](tiny.embedders[1].tokenize(BATCH["txt"]))
    np.testing.assert_array_equal(crossattn, np.concatenate([clip_l, open_clip.asnumpy()], axis=-1))


def test_force_zero_embeddings_zeros_text_only(tiny):
    full = {k: v.asnumpy() for k, v in tiny.encode(BATCH).items()}
    assert full["crossattn"][..., :32].any() and full["crossattn"][..., 32:].any()
    assert np.abs(full["vector"][:, :48]).max() > 0

    uncond = {k: v.asnumpy() for k, v in tiny.encode(BATCH, force_zero_embeddings=["txt"]).items()}
    assert uncond["crossattn"].shape == full["crossattn"].shape
    assert not uncond["crossattn"].any()
    assert not uncond["vector"][:, :48].any()
    np.testing.assert_array_equal(uncond["vector"][:, 48:], full["vector"][:, 48:])

    no_crop = tiny.encode(BATCH, force_zero_embeddings=["crop_coords_top_left"])["vector"].asnumpy()
    assert not no_crop[:, 560:1072].any()
    np.testing.assert_array_equal(np.delete(no_crop, np.s_[560:1072], axis=1), np.delete(full["vector"], np.s_[560:1072], axis=1))


def test_tokenize_gives_each_embedder_its_input(tiny):
    ids_l, ids_g, *sizes = tiny.tokenize(BATCH)
    assert ids_l.dtype == ids_g.dtype == ms.int32 and ids_l.shape == ids_g.shape == (2, 77)
    ids_l, ids_g = ids_l.asnumpy(), ids_g.asnumpy()
    last = (ids_l != 49407).sum(axis=1)  # BOS + words; EOT follows
    assert (ids_l[np.arange(2), last] == 49407).all() and (ids_g[np.arange(2), last] == 49407).all()
    np.testing.assert_array_equal(ids_l[:, :last.min()], ids_g[:, :last.min()])
    assert (ids_l[0, last[0]:] == 49407).all() and (ids_g[0, last[0] + 1:] == 0).all()  # pad: EOT vs 0
    for tensor, key in zip(sizes, SIZE_KEYS):
        assert tensor.dtype == ms.float32
        np.testing.assert_array_equal(tensor.asnumpy(), np.asarray(BATCH[key].asnumpy() if isinstance(BATCH[key], ms.Tensor) else BATCH[key]))


def test_bad_input_says_what_to_fix(tiny):
    with pytest.raises(KeyError, match="crop_coords_top_left"):
        tiny.tokenize({k: v for k, v in BATCH.items() if k != "crop_coords_top_left"})
    with pytest.raises(ValueError, match=r"shape \(batch, D\)"):
        tiny.tokenize({**BATCH, "original_size_as_tuple": [1024, 1024]})
    with pytest.raises(TypeError, match="list of str"):
        tiny.tokenize({**BATCH, "txt": 3})
    config = OmegaConf.to_container(conditioner_config(TINY_CONFIG))
    config["params"]["emb_models"][0]["ucg_rate"] = 0.1
    with pytest.raises(ValueError, match="unsupported keys"):
        instantiate_from_config(config)
