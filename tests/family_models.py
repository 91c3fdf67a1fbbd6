"""Tiny random pipelines of SD 1.x, SD 2.x and SSD-1B built with diffusers/transformers at the sizes of the tiny
configs, and their conversion to MindBooth checkpoints through both paths (diffusers folder, official single file).
Shared by tests/test_convert_families.py (the converter) and tests/test_family_parity.py (numerical parity)."""
import torch

from conftest import ROOT
from tools.model_conversion import conversion
from tools.model_conversion.file_layout import SD1, SD2, SSD1B
from tools.model_conversion.sdxl_layout import model_mindspore_shapes

CONFIGS = ROOT / "configs" / "inference"
TINY = {SD1: CONFIGS / "sd_v1.5_tiny.yaml", SD2: CONFIGS / "sd_v2.1_tiny.yaml", SSD1B: CONFIGS / "ssd_1b_tiny.yaml"}
CLIP = dict(vocab_size=49408, max_position_embeddings=77, num_attention_heads=2, num_hidden_layers=2)


# ------------------------------------------------------------------ tiny pipelines in diffusers
def _vae(scaling_factor):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=scaling_factor)


def _clip(width, act, projection_dim=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, hidden_act=act, **CLIP,
                            **({"projection_dim": projection_dim} if projection_dim else {}))
    return (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(config)


def _sd_unet(linear, context, heads):
    """SD 1.x/2.x at the tiny configs' sizes: channel_mult [1, 1, 2, 2] of 32, attention at levels 0-2. `heads`: per
    level (diffusers' attention_head_dim is a head count): SD 1.x fixes the count, SD 2.x the head width."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=heads,
        cross_attention_dim=context, use_linear_projection=linear)


def _ssd_unet():
    """SSD-1B at ssd_1b_tiny.yaml's sizes: per-block depths, a middle block of one ResBlock."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, [1, 2], [2, 1]],
        reverse_transformer_layers_per_block=[[1, 1, 2], [2, 1, 1], 1],
        mid_block_type="UNetMidBlock2D", attention_head_dim=(4, 8, 16), cross_attention_dim=96,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1584)


def build_pipeline(family):
    """{component: diffusers/transformers model} of a tiny random pipeline of `family`."""
    torch.manual_seed(0)
    if family == SD1:
        parts = {"unet": _sd_unet(False, 32, 2), "text_encoder": _clip(32, "quick_gelu")}
    elif family == SD2:
        parts = {"unet": _sd_unet(True, 64, (2, 2, 4, 4)), "text_encoder": _clip(64, "gelu")}
    else:
        parts = {"unet": _ssd_unet(), "text_encoder": _clip(32, "quick_gelu"),
                 "text_encoder_2": _clip(64, "gelu", projection_dim=48)}
    parts["vae"] = _vae(0.13025 if family == SSD1B else 0.18215)  # the configs' scale_factor
    with torch.no_grad():  # diffusers zero-initialises some layers (conv_out, proj_out): make every value tell
        for model in parts.values():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return parts


class Converted:
    """One family's tiny pipeline: the diffusers folder, its `.ckpt`, the official file exported from it, and that
    file converted back."""

    def __init__(self, family, folder):
        self.family, self.config, self.folder = family, TINY[family], folder / "pipe"
        self.parts = build_pipeline(family)
        for name, model in self.parts.items():
            model.save_pretrained(self.folder / name)
        self.expected = model_mindspore_shapes(self.config)
        self.ckpt, self.back = folder / "pipe.ckpt", folder / "back.ckpt"
        self.official = folder / "official.safetensors"
        conversion.diffusers_to_mindspore(self.folder, self.ckpt, self.expected, progress=False)
        conversion.mindspore_to_official(self.ckpt, self.official, self.expected, progress=False)
        self.note = conversion.official_to_mindspore(self.official, self.back, self.expected, progress=False)["note"]
