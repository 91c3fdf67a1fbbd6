"""Text-to-image end to end on the tiny SDXL against diffusers' StableDiffusionXLPipeline.

Both sides hold the same random weights (diffusers' / transformers' models, carried into ours through the
project's converters), start from the same latent noise, and run the same deterministic Euler schedule with
classifier-free guidance (empty negative prompt = zeroed text embeddings on both sides). The decoded uint8 images
must agree to a few levels. The prompt embeddings for diffusers are computed from our tokenizer's ids through the
transformers encoders exactly as SDXL's encode_prompt does (no tokenizer download)."""
import numpy as np
import pytest
import torch

from conftest import BACKENDS, TINY_CONFIG
from mindbooth.config import load_config
from gm.modules.diffusionmodules.discretizer import LegacyDDPMDiscretization
from gm.util import instantiate_from_config, load_params
from mindbooth.pipeline import Text2Image
from test_text_encoders import transformers_text_encoders
from test_unet import tiny_diffusers_unet
from txt2img_reference import assert_images_match, diffusers_start_latents, euler_scheduler, run_reference, step_errors
from tools.model_conversion import diffusers_text as dt
from tools.model_conversion.diffusers_unet import unet_to_official
from tools.model_conversion.diffusers_vae import vae_to_official
from tools.model_conversion.keymap import official_to_mindspore_names

PROMPT = "a photo of sks dog, golden hour"
SIZE = 64
STEPS = 5
GUIDANCE = 5.0


def diffusers_vae(config):
    """AutoencoderKL with the tiny config's VAE sizes (as tests/test_vae.py), norms and biases moved off 1/0."""
    from diffusers import AutoencoderKL

    dd = config.model.params.first_stage_config.params.ddconfig
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=dd.in_channels, out_channels=dd.out_ch,
        down_block_types=("DownEncoderBlock2D",) * len(dd.ch_mult), up_block_types=("UpDecoderBlock2D",) * len(dd.ch_mult),
        block_out_channels=tuple(dd.ch * m for m in dd.ch_mult), layers_per_block=dd.num_res_blocks,
        latent_channels=dd.z_channels, norm_num_groups=32, sample_size=SIZE,
        scaling_factor=float(config.model.params.scale_factor),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for param in vae.parameters():
            if param.ndim == 1:
                param.add_(0.3 * torch.randn_like(param))
    return vae


def diffusers_text_encoders(config):
    """transformers' CLIP-L and bigG (with projection) with the tiny config's sizes (as tests/test_text_encoders.py)."""
    hf_l, hf_g, _ = transformers_text_encoders(config.model.params.conditioner_config)
    return hf_l, hf_g


def official_weights(unet, vae, hf_l, hf_g) -> dict:
    """The diffusers/transformers weights under the official checkpoint names, as a converted checkpoint has them."""
    official = {}
    official.update(unet_to_official({k: v.detach().numpy() for k, v in unet.state_dict().items()}))
    official.update(vae_to_official({k: v.detach().numpy() for k, v in vae.state_dict().items()}))
    official.update(dt.clip_l_to_official({k: v.detach().numpy() for k, v in hf_l.state_dict().items()}))
    official.update(dt.open_clip_to_official({k: v.detach().numpy() for k, v in hf_g.state_dict().items()}))
    return official


def build_engine(config, official, backend):
    engine = instantiate_from_config(config.model, backend=backend)
    assert engine.backend == backend
    renamed = official_to_mindspore_names({k: v.shape for k, v in official.items()})
    load_params(engine, {renamed[k]: v for k, v in official.items()}, strict=True)
    return engine


def sdxl_prompt_embeds(hf_l, hf_g, ids_l, ids_g):
    """SDXL's encode_prompt (clip_skip None) from token ids: both encoders' penultimate hidden states, concatenated;
    pooled = bigG's projected text embedding."""
    with torch.no_grad():
        out_l = hf_l(torch.from_numpy(ids_l).long(), output_hidden_states=True)
        out_g = hf_g(torch.from_numpy(ids_g).long(), output_hidden_states=True)
    return torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1), out_g.text_embeds


@pytest.fixture(scope="module")
def setup():
    """The diffusers pipeline with random weights, its image for PROMPT from fixed noise, and the same weights
    under official names (for our engines). Built once for both backends."""
    from diffusers import StableDiffusionXLPipeline

    config = load_config(TINY_CONFIG)
    unet = tiny_diffusers_unet(config)
    vae = diffusers_vae(config)
    hf_l, hf_g = diffusers_text_encoders(config)
    official = official_weights(unet, vae, hf_l, hf_g)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=hf_l, text_encoder_2=hf_g, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=euler_scheduler(), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    # token ids from our tokenizers (CLIP-L pads with EOT, bigG with 0), through the transformers encoders
    conditioner = instantiate_from_config(config.model.params.conditioner_config)
    ids_l = conditioner.embedders[0].tokenize([PROMPT]).asnumpy()
    ids_g = conditioner.embedders[1].tokenize([PROMPT]).asnumpy()
    prompt_embeds, pooled = sdxl_prompt_embeds(hf_l, hf_g, ids_l, ids_g)
    assert prompt_embeds.shape == (1, 77, config.model.params.network_config.params.context_dim)

    factor = config.model.params.latents_per_pixel
    noise = np.random.default_rng(2024).standard_normal((1, 4, SIZE // factor, SIZE // factor)).astype(np.float32)
    latents = diffusers_start_latents(noise, STEPS)

    # negative_prompt None with force_zeros_for_empty_prompt: diffusers zeroes the negative embeddings, as our
    # sampler does for an empty negative prompt; size conditioning defaults to original = target = (64, 64), crop 0.
    reference, steps = run_reference(pipe, STEPS, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled,
                                     latents=latents, height=SIZE, width=SIZE, guidance_scale=GUIDANCE)
    return config, official, noise, reference, steps


def test_diffusers_schedule_is_ours():
    """Same timesteps and sigmas; the UNet is told the same timestep at each sigma (our DiscreteDenoiser snaps sigma
    to the index of the nearest training sigma)."""
    disc = LegacyDDPMDiscretization()
    scheduler = euler_scheduler()
    scheduler.set_timesteps(STEPS)
    np.testing.assert_array_equal(scheduler.timesteps.numpy().astype(int), disc.timesteps(STEPS)[::-1])
    np.testing.assert_allclose(scheduler.sigmas.numpy(), disc(STEPS), rtol=2e-5)
    table = disc(1000, do_append_zero=False, flip=True)
    nearest = [int(np.argmin(np.abs(table - s))) for s in disc(STEPS)[:-1]]
    assert nearest == disc.timesteps(STEPS)[::-1].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_txt2img_matches_diffusers_pipeline(setup, backend):
    config, official, noise, reference, reference_steps = setup
    engine = build_engine(config, official, backend)
    assert engine.scale_factor == pytest.approx(0.13025)
    steps = []
    ours = Text2Image(engine)(PROMPT, width=SIZE, height=SIZE, num_steps=STEPS, guidance_scale=GUIDANCE,
                              sampler="EulerEDMSampler", init_noise=noise,
                              callback=lambda info: steps.append(info["x"].asnumpy()))
    # the latents after every step (a wrong start scale, guidance or timestep shows here first)
    assert len(steps) == len(reference_steps) == STEPS
    errors = step_errors(steps, reference_steps)
    assert max(errors) < 1e-4, f"relative latent error per step: {errors}"
    # the decoded images
    assert ours.shape == (1, SIZE, SIZE, 3)
    assert_images_match(ours, reference, f"{backend}: latents rel err per step {['%.1e' % e for e in errors]}")
