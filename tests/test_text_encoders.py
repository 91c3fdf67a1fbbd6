"""SDXL's text encoders against transformers on identical random weights, and the weight-name conversion.

The weights travel the way a real checkpoint does: transformers state dict -> diffusers_text (official
names) -> official_to_mindspore_names -> load_params(strict=True) into the conditioner.
"""
import copy

import mindspore as ms
import numpy as np
import pytest
import torch
from conftest import BACKENDS, KEYS, TINY_CONFIG, read_key_yaml
from gm.backends import apply_backend
from mindspore import nn
from omegaconf import OmegaConf

from gm.util import instantiate_from_config, load_params
from mindbooth.config import load_config
from tools.model_conversion import diffusers_text as dt
from tools.model_conversion.keymap import official_to_mindspore_names

PROMPTS = [
    "",
    "a photo of sks dog",
    "A majestic lion, golden hour, 35mm film, highly detailed!",
    " ".join(["a very long prompt that will be truncated"] * 12),  # > 77 tokens: EOT lands at position 76
]
BOS, EOT = 49406, 49407


class Holder(nn.Cell):
    """Gives the conditioner its checkpoint prefix `conditioner.`."""

    def __init__(self, conditioner):
        super().__init__()
        self.conditioner = conditioner


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(b).max())


def randomize(model):
    """Random weights everywhere (norms too, so a swapped or ignored gamma/beta would show)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


def hand_made_ids(pad: int, lengths=(1, 9, 40)):
    """BOS, random ids, EOT, then padding: independent of the tokenizer."""
    rng = np.random.default_rng(0)
    ids = np.full((len(lengths), 77), pad, np.int32)
    for row, n in enumerate(lengths):
        ids[row, : n + 2] = [BOS, *rng.integers(0, BOS, n), EOT]
    return ids


def transformers_text_encoders(conditioner_config):
    """transformers' CLIP-L and bigG (with projection) of the conditioner config's sizes, random weights; and the
    CLIP-L embedder's params."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    p_l, p_g = (OmegaConf.to_container(conditioner_config.params.emb_models[i].params) for i in (0, 1))

    def hf_config(p, **extra):
        # eos_token_id 49407 (not the legacy 2): transformers pools at the first EOT. bigG pads with 0, so the
        # first EOT is also the largest id, which is where sgm (argmax of ids) pools: both pick the same token.
        return CLIPTextConfig(vocab_size=49408, hidden_size=p["width"], intermediate_size=p["mlp_width"],
                              num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                              max_position_embeddings=77, hidden_act=p["act"], layer_norm_eps=1e-5,
                              bos_token_id=BOS, eos_token_id=EOT, pad_token_id=1, attn_implementation="eager", **extra)

    torch.manual_seed(0)
    hf_l = randomize(CLIPTextModel(hf_config(p_l)))
    hf_g = randomize(CLIPTextModelWithProjection(hf_config(p_g, projection_dim=p_g["projection_dim"])))
    return hf_l, hf_g, p_l


def build_models(backend):
    """Our tiny conditioner (frozen, in `backend`) and transformers' CLIP-L and bigG with the same random weights."""
    emb_cfgs = load_config(TINY_CONFIG).model.params.conditioner_config
    conditioner = instantiate_from_config(emb_cfgs)
    hf_l, hf_g, p_l = transformers_text_encoders(emb_cfgs)

    official = {}
    official.update(dt.clip_l_to_official({k: v.numpy() for k, v in hf_l.state_dict().items()}))
    official.update(dt.open_clip_to_official({k: v.numpy() for k, v in hf_g.state_dict().items()}))
    renamed = official_to_mindspore_names({k: v.shape for k, v in official.items()})
    load_params(Holder(conditioner), {renamed[k]: v for k, v in official.items()}, strict=True)
    for param in conditioner.get_parameters():
        param.requires_grad = False
    assert apply_backend(conditioner, backend) == backend
    conditioner.backend = backend
    return conditioner, hf_l, hf_g, p_l


@pytest.fixture(scope="module", params=BACKENDS)
def models(request):
    return build_models(request.param)


def token_sets(conditioner):
    """(CLIP-L ids, bigG ids) pairs: tokenizer output for real prompts, and hand-made sequences."""
    clip_l, open_clip = conditioner.embedders[0], conditioner.embedders[1]
    yield clip_l.tokenize(PROMPTS).asnumpy(), open_clip.tokenize(PROMPTS).asnumpy()
    yield hand_made_ids(pad=EOT), hand_made_ids(pad=0)


def test_clip_l_hidden_state_matches_transformers(models):
    conditioner, hf_l, _, p_l = models
    for ids, _ in token_sets(conditioner):
        assert (ids[:, -1] == EOT).all()  # CLIP-L pads with end-of-text
        ours = conditioner.embedders[0](ms.Tensor(ids)).asnumpy()
        with torch.no_grad():
            ref = hf_l(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states[p_l["layer_idx"]].numpy()
        assert ours.shape == ref.shape == (len(ids), 77, p_l["width"])
        assert rel_err(ours, ref) < 1e-4


def test_open_clip_penultimate_and_pooled_match_transformers(models):
    conditioner, _, hf_g, _ = models
    for _, ids in token_sets(conditioner):
        assert (ids[:, -1] == 0).any()  # bigG pads with 0
        z, pooled = conditioner.embedders[1](ms.Tensor(ids))
        with torch.no_grad():
            ref = hf_g(torch.from_numpy(ids).long(), output_hidden_states=True)
        assert rel_err(z.asnumpy(), ref.hidden_states[-2].numpy()) < 1e-4
        assert pooled.shape == ref.text_embeds.shape == (len(ids), 48)
        assert rel_err(pooled.asnumpy(), ref.text_embeds.numpy()) < 1e-4


def standalone(target, params, conditioner, index):
    """A lone embedder with other output options, holding embedder `index`'s weights."""
    embedder = instantiate_from_config({"target": f"gm.modules.embedders.modules.{target}", "params": params})
    prefix = f"embedders.{index}."
    load_params(embedder, {n[len(prefix):]: p for n, p in conditioner.parameters_and_names() if n.startswith(prefix)})
    return embedder


def test_other_output_layers_match_transformers(models):
    conditioner, hf_l, hf_g, _ = models
    cfgs = load_config(TINY_CONFIG).model.params.conditioner_config.params.emb_models
    p_l, p_g = (OmegaConf.to_container(cfgs[i].params) for i in (0, 1))
    ids_l, ids_g = next(token_sets(conditioner))
    with torch.no_grad():
        ref_l = hf_l(torch.from_numpy(ids_l).long())
        ref_g = hf_g(torch.from_numpy(ids_g).long(), output_hidden_states=True)
        legacy_penultimate = hf_g.text_model.final_layer_norm(ref_g.hidden_states[-2]).numpy()

    last_l = standalone("FrozenCLIPEmbedder", {**p_l, "layer": "last", "layer_idx": None}, conditioner, 0)
    assert rel_err(last_l(ms.Tensor(ids_l)).asnumpy(), ref_l.last_hidden_state.numpy()) < 1e-4
    first_l = standalone("FrozenCLIPEmbedder", {**p_l, "layer_idx": 0}, conditioner, 0)  # the embeddings
    with torch.no_grad():
        embeddings = hf_l(torch.from_numpy(ids_l).long(), output_hidden_states=True).hidden_states[0].numpy()
    assert rel_err(first_l(ms.Tensor(ids_l)).asnumpy(), embeddings) < 1e-4

    last_g = standalone("FrozenOpenCLIPEmbedder2", {**p_g, "layer": "last"}, conditioner, 1)
    z, pooled = last_g(ms.Tensor(ids_g))
    assert rel_err(z.asnumpy(), ref_g.hidden_states[-1].numpy()) < 1e-4
    assert rel_err(pooled.asnumpy(), ref_g.text_embeds.numpy()) < 1e-4
    legacy = {**p_g, "legacy": True, "always_return_pooled": False}
    z = standalone("FrozenOpenCLIPEmbedder2", legacy, conditioner, 1)(ms.Tensor(ids_g))
    assert rel_err(z.asnumpy(), legacy_penultimate) < 1e-4


def test_bad_sizes_are_rejected():
    from gm.modules.embedders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2

    with pytest.raises(ValueError, match="divisible by heads"):
        FrozenCLIPEmbedder(width=30, layers=1, heads=4, mlp_width=8, layer="hidden", layer_idx=1)
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(width=8, layers=2, heads=2, mlp_width=8, layer="hidden", layer_idx=3)
    with pytest.raises(ValueError, match="act must be"):
        FrozenOpenCLIPEmbedder2(width=8, layers=2, heads=2, mlp_width=8, act="relu")


def test_graph_mode_equals_pynative(models):
    conditioner = models[0]
    batch = {"txt": PROMPTS[:3], "original_size_as_tuple": [[1024, 1024]] * 3,
             "crop_coords_top_left": [[0, 0], [16, 8], [0, 64]], "target_size_as_tuple": [[1024, 1024]] * 3}
    inputs = conditioner.tokenize(batch)
    eager = [t.asnumpy() for t in conditioner(*inputs)]
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = [t.asnumpy() for t in conditioner(*inputs)]
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    for a, b in zip(graph, eager):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ---- weight-name conversion (diffusers_text) ----

def zero_arrays(shapes):
    """Arrays of the right shapes that allocate nothing (int8 keeps the fused q/k/v concatenation small)."""
    return {k: np.broadcast_to(np.zeros((), np.int8), s) for k, s in shapes.items()}


def read_lines(path):
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("n", [1, 2])
def test_names_match_reference_pairs(n):
    hf = read_lines(KEYS / "diffuser_yaml" / f"hf_key_text{n}.yaml")
    official = read_lines(KEYS / "diffuser_yaml" / f"torch_key_text{n}.yaml")
    assert len(hf) == len(official)
    if n == 1:
        mapped = [next(iter(dt.clip_l_to_official({name: np.zeros(1)}))) for name in hf]
    else:
        mapped = [dt.OPEN_CLIP_PREFIX + dt.open_clip_official_name(name) for name in hf]
    assert mapped == official


def full_size_hf_shapes(n):
    """transformers names -> shapes, from the reference pairs and the official shapes (q/k/v: a third of in_proj)."""
    base = read_key_yaml(KEYS / "torch_key_base.yaml")
    hf = read_lines(KEYS / "diffuser_yaml" / f"hf_key_text{n}.yaml")
    official = read_lines(KEYS / "diffuser_yaml" / f"torch_key_text{n}.yaml")
    shapes = {}
    for h, o in zip(hf, official):
        shape = base[o]
        if "in_proj" in o:
            shape = (shape[0] // 3, *shape[1:])
        elif o.endswith("text_projection"):
            shape = shape[::-1]
        shapes[h] = shape
    return shapes, base


@pytest.mark.parametrize("n", [1, 2])
def test_full_size_conversion_is_complete_and_round_trips(n):
    to_official, from_official = ((dt.clip_l_to_official, dt.clip_l_from_official) if n == 1
                                  else (dt.open_clip_to_official, dt.open_clip_from_official))
    hf_shapes, base = full_size_hf_shapes(n)
    prefix = dt.CLIP_L_PREFIX if n == 1 else dt.OPEN_CLIP_PREFIX
    expected = {k: s for k, s in base.items() if k.startswith(prefix)}
    assert len(expected) == (196 if n == 1 else 390)

    official = to_official(zero_arrays(hf_shapes))
    assert {k: v.shape for k, v in official.items()} == expected  # every official name, with its shape
    back = from_official({**official, "model.diffusion_model.out.0.weight": np.zeros(1)})  # other models ignored
    assert {k: v.shape for k, v in back.items()} == hf_shapes


def file_layout(model):
    """State dict with the names of diffusers' files: transformers >= 5 drops CLIPTextModel's `text_model.`."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v.numpy()
            for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def test_round_trip_preserves_values(models):
    _, hf_l, hf_g, _ = models
    bare = {k: v.numpy() for k, v in hf_l.state_dict().items()}
    assert dt.clip_l_to_official(bare).keys() == dt.clip_l_to_official(file_layout(hf_l)).keys()
    for model, to_official, from_official in ((hf_l, dt.clip_l_to_official, dt.clip_l_from_official),
                                              (hf_g, dt.open_clip_to_official, dt.open_clip_from_official)):
        state = file_layout(model)
        official = to_official(state)
        back = from_official(official)
        assert back.keys() == state.keys()
        for k in state:
            np.testing.assert_array_equal(back[k], state[k])
    official = dt.open_clip_to_official({k: v.numpy() for k, v in hf_g.state_dict().items()})
    layer = hf_g.text_model.encoder.layers[0].self_attn
    fused = official[dt.OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"]
    np.testing.assert_array_equal(fused, torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]).detach().numpy())
    np.testing.assert_array_equal(official[dt.OPEN_CLIP_PREFIX + "text_projection"], hf_g.text_projection.weight.detach().numpy().T)
    assert official[dt.OPEN_CLIP_PREFIX + "logit_scale"].shape == ()
    np.testing.assert_allclose(official[dt.OPEN_CLIP_PREFIX + "logit_scale"], np.log(1 / 0.07), rtol=1e-6)


def test_unknown_names_are_rejected():
    with pytest.raises(KeyError, match="not a CLIP-L"):
        dt.clip_l_to_official({"text_projection.weight": np.zeros((2, 2))})
    with pytest.raises(KeyError, match="not an OpenCLIP-bigG"):
        dt.open_clip_to_official({"text_model.encoder.layers.0.self_attn.o_proj.weight": np.zeros((2, 2))})
    with pytest.raises(KeyError, match="q, k and v"):
        dt.open_clip_to_official({"text_model.encoder.layers.0.self_attn.q_proj.weight": np.zeros((2, 2))})
    with pytest.raises(KeyError, match="not an OpenCLIP-bigG"):
        dt.open_clip_from_official({dt.OPEN_CLIP_PREFIX + "visual.proj": np.zeros((2, 2))})


# ---- text-encoder LoRA (--train_text_encoder) against transformers + peft ----

def test_text_encoder_lora_matches_peft(models):
    """LoRA on q/k/v/out of both encoders (bigG's fused in_proj gets one LoRA per q, k, v) gives transformers+peft's
    hidden states and pooled output, with the same A/B weights carried over by the export's name mapping."""
    from peft import LoraConfig, get_peft_model

    from tools.lora_conversion.text_encoder_names import from_diffusers

    conditioner, hf_l, hf_g, p_l = models
    rank, alpha = 4, 8.0
    emb_cfgs = load_config(TINY_CONFIG).model.params.conditioner_config
    with_lora = instantiate_from_config(emb_cfgs)
    load_params(with_lora, dict(conditioner.parameters_and_names()), strict=True)
    added = with_lora.add_text_encoder_lora(rank, alpha)
    for param in with_lora.get_parameters():
        param.requires_grad = ".lora_" in param.name
    apply_backend(with_lora, conditioner.backend)
    holder = Holder(with_lora)
    for name, param in holder.parameters_and_names():
        param.name = name
    assert added == 4 * 2 + 4 * 2  # 2 layers x q/k/v/out in each of the two tiny encoders

    ids_l, ids_g = next(token_sets(conditioner))
    before_l = with_lora.embedders[0](ms.Tensor(ids_l)).asnumpy()
    np.testing.assert_array_equal(before_l, conditioner.embedders[0](ms.Tensor(ids_l)).asnumpy())  # B = 0: no change

    own = dict(holder.parameters_and_names())
    gen = torch.Generator().manual_seed(1)
    peft_models = []
    for encoder, hf in (("text_encoder", hf_l), ("text_encoder_2", hf_g)):
        peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                                  target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        copied = 0
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if ".lora_" not in name:
                    continue
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                module = name.split("base_model.model.", 1)[1].rsplit(".lora_", 1)[0]
                module = module if module.startswith("text_model.") else "text_model." + module
                ours = from_diffusers(f"{encoder}.{module}") + (".lora_A.weight" if ".lora_A." in name else ".lora_B.weight")
                own[ours].set_data(ms.Tensor(p.numpy()))
                copied += 1
        assert copied == 2 * 4 * 2
        peft_models.append(peft_model.eval())

    ours_l = with_lora.embedders[0](ms.Tensor(ids_l)).asnumpy()
    z, pooled = with_lora.embedders[1](ms.Tensor(ids_g))
    with torch.no_grad():
        ref_l = peft_models[0](input_ids=torch.from_numpy(ids_l).long(), output_hidden_states=True).hidden_states[p_l["layer_idx"]]
        ref_g = peft_models[1](input_ids=torch.from_numpy(ids_g).long(), output_hidden_states=True)
    assert rel_err(ours_l, before_l) > 1e-2  # the LoRA does change the output...
    assert rel_err(ours_l, ref_l.numpy()) < 1e-4  # ...exactly as peft's does
    assert rel_err(z.asnumpy(), ref_g.hidden_states[-2].numpy()) < 1e-4
    assert rel_err(pooled.asnumpy(), ref_g.text_embeds.numpy()) < 1e-4

    # merged == unmerged (bigG's merge folds q/k/v into the fused rows)
    from gm.modules.lora import set_lora_merged

    set_lora_merged(with_lora, True)
    merged_z, merged_pooled = with_lora.embedders[1](ms.Tensor(ids_g))
    merged_l = with_lora.embedders[0](ms.Tensor(ids_l)).asnumpy()
    set_lora_merged(with_lora, False)
    assert rel_err(merged_l, ours_l) < 1e-5
    assert rel_err(merged_z.asnumpy(), z.asnumpy()) < 1e-5 and rel_err(merged_pooled.asnumpy(), pooled.asnumpy()) < 1e-5
    np.testing.assert_allclose(with_lora.embedders[1](ms.Tensor(ids_g))[0].asnumpy(), z.asnumpy(), rtol=1e-5, atol=1e-5)
