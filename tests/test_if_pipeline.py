"""DeepFloyd IF as a MindBooth engine: tiny random stage I + II (the tiny configs' UNets, weights copied by name from
diffusers' UNet2DConditionModel, a tiny transformers T5) against diffusers' IFPipeline + IFSuperResolutionPipeline on
the same prompt embeddings, the same noise and the same scheduler settings; the engine built from YAML and loaded
strictly by the converter's names equals IFUNet and transformers' T5, and its loss is the eps MSE IF trains with."""
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
from omegaconf import OmegaConf
from PIL import Image
from test_if_unet import diffusers_config, randomize, unet_config, unet_params
from test_t5 import spiece_model  # noqa: F401  (a fixture: a small T5 SentencePiece model)

from gm.util import instantiate_from_config
from mindbooth import if_cascade
from mindbooth.checkpoint import load_weights, save_checkpoint_atomic
from mindbooth.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "inference"
STAGE_ONE, STAGE_TWO = CONFIGS / "if_i_tiny.yaml", CONFIGS / "if_ii_tiny.yaml"
UNET = "model.diffusion_model."
T5 = "conditioner.embedders.0.transformer."


def t5_config():
    """transformers' T5Config of the tiny config's FrozenT5Embedder."""
    params = OmegaConf.load(STAGE_ONE).model.params.conditioner_config.params.emb_models[0].params
    return transformers.T5Config(vocab_size=params.vocab_size, d_model=params.width, d_ff=params.ff_width,
                                 num_layers=params.layers, num_heads=params.heads, d_kv=params.head_dim,
                                 feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)


def numpy_state(module: torch.nn.Module, prefix: str) -> dict:
    return {prefix + name: value.detach().numpy().copy() for name, value in module.state_dict().items()
            if name != "encoder.embed_tokens.weight"}  # T5's embedding is saved once, as `shared.weight`


@pytest.fixture(scope="module")
def tiny_if(tmp_path_factory):
    """Random tiny stage I (UNet + T5) and stage II (UNet) in diffusers/transformers, and the same weights as
    MindBooth checkpoints under the converter's names."""
    folder = tmp_path_factory.mktemp("tiny_if")
    unets = []
    for seed, config in ((0, STAGE_ONE), (1, STAGE_TWO)):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**diffusers_config(unet_params(config.name))).eval()
        randomize(unet, seed)
        unets.append(unet)
    torch.manual_seed(2)
    t5 = transformers.T5EncoderModel(t5_config()).eval()
    weights = folder / "if_i_tiny.ckpt", folder / "if_ii_tiny.ckpt"
    save_checkpoint_atomic({**numpy_state(unets[0], UNET), **numpy_state(t5, T5)}, weights[0])
    save_checkpoint_atomic(numpy_state(unets[1], UNET), weights[1])
    return {"unets": unets, "t5": t5, "weights": weights}


def shared_noise(seed: int):
    """One stream of standard normal draws, taken in call order (both sides draw in diffusers' order)."""
    rng = np.random.default_rng(seed)
    return lambda shape: rng.standard_normal(tuple(shape)).astype(np.float32)


def if_scheduler(sample_max_value: float) -> DDPMScheduler:
    """IF's released scheduler settings (stage I: sample_max_value 1.5, stage II: 1.0)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                         thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=sample_max_value,
                         clip_sample=True, prediction_type="epsilon")


def diffusers_cascade(tiny_if, embeds, negative, noise, monkeypatch, steps, guidance, sizes):
    import diffusers.pipelines.deepfloyd_if.pipeline_if as stage_one_module
    import diffusers.pipelines.deepfloyd_if.pipeline_if_superresolution as stage_two_module
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(noise(shape))

    for module in (stage_one_module, stage_two_module, ddpm_module):
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    common = dict(tokenizer=None, text_encoder=None, safety_checker=None, feature_extractor=None, watermarker=None,
                  requires_safety_checker=False)
    stage_one = IFPipeline(unet=tiny_if["unets"][0], scheduler=if_scheduler(1.5), **common)
    stage_two = IFSuperResolutionPipeline(unet=tiny_if["unets"][1], scheduler=if_scheduler(1.0),
                                          image_noising_scheduler=if_scheduler(1.0), **common)
    embeds, negative = torch.tensor(embeds), torch.tensor(negative)
    with torch.no_grad():
        low = stage_one(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps[0],
                        guidance_scale=guidance[0], height=sizes[0], width=sizes[0], output_type="pt").images
        high = stage_two(image=low, prompt_embeds=embeds, negative_prompt_embeds=negative, noise_level=250,
                         num_inference_steps=steps[1], guidance_scale=guidance[1], height=sizes[1], width=sizes[1],
                         output_type="pt").images
    return low.numpy(), high.numpy()


def assert_images_close(got, expected):
    """In [0, 1] pixel units: at most 3/255 anywhere, 0.5/255 on average."""
    difference = np.abs(got - expected) / 2.0
    assert got.shape == expected.shape
    assert difference.max() <= 3 / 255 and difference.mean() <= 0.5 / 255, (difference.max() * 255, difference.mean() * 255)


def test_cascade_equals_diffusers_if_stage_one_and_two(tiny_if, monkeypatch):
    rng = np.random.default_rng(5)
    width = OmegaConf.load(STAGE_ONE).model.params.network_config.params.encoder_hid_dim
    embeds = rng.standard_normal((2, 77, width)).astype(np.float32)
    negative = rng.standard_normal((2, 77, width)).astype(np.float32)
    steps, guidance, sizes = (4, 3), (7.0, 4.0), (16, 64)
    expected_low, expected_high = diffusers_cascade(tiny_if, embeds, negative, shared_noise(7), monkeypatch, steps,
                                                    guidance, sizes)
    stage_one = if_cascade.load_stage(STAGE_ONE, tiny_if["weights"][0])
    stage_two = if_cascade.load_stage(STAGE_TWO, tiny_if["weights"][1])
    assert stage_one.conditioner is None and stage_two.conditioner is None  # the UNet engines hold no T5
    low, high = if_cascade.cascade(stage_one, stage_two, embeds, negative, shared_noise(7), num_steps=steps[0],
                                   guidance_scale=guidance[0], stage_two_steps=steps[1], stage_two_guidance=guidance[1])
    assert (np.abs(expected_high) < 0.99).mean() > 0.25 and expected_high.std() > 0.1  # neither flat nor all clipped
    assert_images_close(low, expected_low)
    assert_images_close(high, expected_high)
    # the tiny configs' defaults are the sizes used here: stage I 16, stage II 64 (4x, as 64 -> 256)
    assert (stage_one.native_resolution, stage_two.native_resolution) == sizes


def test_upscale_equals_torch_bilinear_align_corners():
    images = np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.tensor(images), (20, 13), mode="bilinear", align_corners=True)
    np.testing.assert_allclose(if_cascade.upscale_bilinear(images, 20, 13), expected.numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def stage_one_engine(tiny_if):
    engine = instantiate_from_config(load_config(STAGE_ONE).model)
    load_weights(engine, [tiny_if["weights"][0]])  # strict: every engine name in the file and no other
    engine.set_train(False)
    return engine


def test_engine_names_and_output_equal_ifunet_and_t5(tiny_if, stage_one_engine):
    engine = stage_one_engine
    names = {name for name, _ in engine.parameters_and_names()}
    assert names == set(numpy_state(tiny_if["unets"][0], UNET)) | set(numpy_state(tiny_if["t5"], T5))
    unet = instantiate_from_config(unet_config(STAGE_ONE.name))  # IFUNet alone, the diffusers names
    for param in unet.get_parameters():
        param.set_data(ms.Tensor(tiny_if["unets"][0].state_dict()[param.name].numpy()))
    unet.set_train(False)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    t = np.array([980, 3], np.int64)
    context = rng.standard_normal((2, 77, 16)).astype(np.float32)
    expected = unet(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context)).asnumpy()
    got = engine.model.diffusion_model(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context)).asnumpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    eps = engine.model(ms.Tensor(x), ms.Tensor(t), {"crossattn": ms.Tensor(context)}).asnumpy()  # IFWrapper
    np.testing.assert_allclose(eps, expected[:, :3], rtol=0, atol=1e-5 * np.abs(expected).max())
    ids = rng.integers(0, 60, (2, 77)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 9:] = 0
    text = engine.conditioner.embedders[0](ms.Tensor(np.stack([ids, mask], axis=1))).asnumpy()
    with torch.no_grad():
        reference = tiny_if["t5"](torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    reference = reference.last_hidden_state.numpy()
    np.testing.assert_allclose(text, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


@pytest.mark.parametrize("stage", [1, 2])
def test_loss_is_the_eps_mse_of_the_first_output_half(tiny_if, stage_one_engine, stage):
    """IF trains on eps (the variance half aside): the engine's loss at timestep t is mean((eps - noise)^2) with
    eps = UNet(sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t)[:, :3] on IF's cosine schedule; stage II's UNet also
    takes the noised upscaled image ("concat") and its noise level ("noise_level" -> class_labels)."""
    engine = stage_one_engine if stage == 1 else if_cascade.load_stage(STAGE_TWO, tiny_if["weights"][1])
    size = 16 if stage == 1 else 32
    rng = np.random.default_rng(4)
    x0 = np.tanh(rng.standard_normal((2, 3, size, size))).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    context = rng.standard_normal((2, 77, 16)).astype(np.float32)
    steps = np.array([700, 40])
    sampling = engine.loss_fn.sigma_sampler  # DiscreteSampling over the cosine table: sigma_t = sqrt((1 - abar) / abar)
    sigmas = sampling.idx_to_sigma(steps).astype(np.float32)
    alphas_cumprod = 1.0 / (1.0 + sigmas.astype(np.float64) ** 2)
    cond, extra = {"crossattn": ms.Tensor(context)}, ()
    if stage == 2:
        low = np.tanh(rng.standard_normal(x0.shape)).astype(np.float32)
        labels = np.array([250, 100], np.int64)
        cond.update(concat=ms.Tensor(low), noise_level=ms.Tensor(labels))
        extra = (ms.Tensor(labels),)
    loss = engine.loss_fn(engine.model, engine.denoiser, cond, ms.Tensor(x0), ms.Tensor(noise), ms.Tensor(sigmas))
    noised = (np.sqrt(alphas_cumprod)[:, None, None, None] * x0
              + np.sqrt(1 - alphas_cumprod)[:, None, None, None] * noise).astype(np.float32)
    if stage == 2:
        noised = np.concatenate([noised, low], axis=1)
    eps = engine.model.diffusion_model(ms.Tensor(noised), ms.Tensor(steps), ms.Tensor(context), *extra).asnumpy()[:, :3]
    expected = ((eps - noise) ** 2).reshape(2, -1).mean(axis=1)
    np.testing.assert_allclose(loss.asnumpy(), expected, rtol=1e-3)


@pytest.fixture(scope="module")
def stage_one_yaml(tmp_path_factory, spiece_model):  # noqa: F811
    """The tiny stage-I config with the test's SentencePiece model as tokenizer_file."""
    config = load_config(STAGE_ONE)
    config.model.params.conditioner_config.params.emb_models[0].params.tokenizer_file = str(spiece_model)
    path = tmp_path_factory.mktemp("if_config") / "if_i_tiny_test.yaml"
    OmegaConf.save(config, path)
    return path


def test_command_line_cascade_saves_what_the_cascade_gives_and_frees_t5(tiny_if, stage_one_yaml, tmp_path, monkeypatch):
    """demo/sampling_without_streamlit.py picks IF from the config: T5 (freed after encoding), stage I, stage II;
    the saved 64x64 PNG equals the cascade on the same seed, prompt and negative prompt."""
    import gc
    import weakref

    from gm.modules.embedders.t5 import T5EncoderModel
    from mindbooth import sampling_cli

    built, build = [], T5EncoderModel.__init__

    def record(self, *args, **kwargs):  # every T5 the command builds, watched without keeping it alive
        build(self, *args, **kwargs)
        built.append(weakref.ref(self))

    monkeypatch.setattr(T5EncoderModel, "__init__", record)
    prompt, seed = "a photo of sks dog", 3
    paths = sampling_cli.main(["--config", str(stage_one_yaml), "--weight", str(tiny_if["weights"][0]),
                               "--stage2_config", str(STAGE_TWO), "--stage2_weight", str(tiny_if["weights"][1]),
                               "--stage2_sample_step", "2", "--sample_step", "3", "--prompt", prompt,
                               "--negative_prompt", "blurry", "--seed", str(seed), "--device_target", "CPU",
                               "--ms_mode", "1", "--save_path", str(tmp_path / "out")])
    monkeypatch.undo()
    gc.collect()
    assert len(built) == 1 and built[0]() is None  # T5 was built once and is gone
    assert [p.name for p in paths] == [f"a_photo_of_sks_dog-s{seed}-0.png", "a_photo_of_sks_dog-grid.png"]
    saved = np.asarray(Image.open(paths[0]).convert("RGB"))
    assert saved.shape == (64, 64, 3)
    embeds, negative = if_cascade.encode_prompts(stage_one_yaml, tiny_if["weights"][0], [prompt], ["blurry"])
    _, high = if_cascade.cascade(if_cascade.load_stage(STAGE_ONE, tiny_if["weights"][0]),
                                 if_cascade.load_stage(STAGE_TWO, tiny_if["weights"][1]), embeds, negative,
                                 if_cascade.seeded_noise(seed), num_steps=3, stage_two_steps=2)
    from mindbooth.images import to_uint8

    np.testing.assert_array_equal(saved, to_uint8(high)[0])


@pytest.mark.parametrize("extra, message", [
    (["--stage2_config", str(STAGE_TWO)], "give --stage2_config and --stage2_weight together"),
    (["--width", "16", "--height", "32"], "square images"),
    (["--sampler", "HeunEDMSampler"], "drop --sampler"),
    (["--width", "18"], "--width 18 must be a positive multiple of 4"),
    (["--task", "img2img", "--img", __file__], "only --task txt2img"),
    (["--stage2_config", str(STAGE_ONE), "--stage2_weight", __file__], "not a DeepFloyd IF stage-II config"),
])
def test_command_line_refuses_what_if_does_not_take(tiny_if, stage_one_yaml, tmp_path, capsys, extra, message):
    from mindbooth import sampling_cli

    with pytest.raises(SystemExit) as exit_info:
        sampling_cli.main(["--config", str(stage_one_yaml), "--weight", str(tiny_if["weights"][0]), "--device_target",
                           "CPU", "--save_path", str(tmp_path / "out"), *extra])
    assert message in str(exit_info.value) and str(exit_info.value).startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_the_shared_model_loader_refuses_if_before_building_it(tiny_if):
    from mindbooth.sampling_model import SamplingModel

    with pytest.raises(ValueError, match="samples from the command line only"):
        SamplingModel(STAGE_ONE, tiny_if["weights"][0])
