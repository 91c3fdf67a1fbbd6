"""SDXL's first stage: the KL-regularised autoencoder (sgm `AutoencoderKL`), inference only.

Images are NCHW in [-1, 1]; latents are unscaled (the diffusion engine applies `scale_factor`).
"""
from mindspore import nn, ops

from gm.modules.diffusionmodules.model import Decoder, Encoder, conv
from gm.modules.distributions import DiagonalGaussianDistribution, gaussian_parameters, gaussian_sample


class AutoencoderKL(nn.Cell):
    """Encoder -> quant_conv -> Gaussian posterior moments; latent -> post_quant_conv -> Decoder.

    Training-only sgm keys (monitor, lossconfig, ckpt_path, ...) are accepted and ignored.
    """

    def __init__(self, embed_dim: int, ddconfig: dict, **ignored):
        super().__init__()
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig double_z: True (the encoder predicts mean and log-variance)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = conv(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = conv(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def encode_moments(self, x):
        """Image (B, C, H, W) -> posterior moments (B, 2*embed_dim, H/f, W/f): mean, then log-variance."""
        return self.quant_conv(self.encoder(x))

    def posterior(self, x) -> DiagonalGaussianDistribution:
        """Eager convenience (PyNative); graph code uses `encode`."""
        return DiagonalGaussianDistribution(self.encode_moments(x))

    def encode(self, x, noise=None):
        """Image -> latent sampled from the posterior: mean + std * noise (noise drawn if None)."""
        mean, _, std = gaussian_parameters(self.encode_moments(x))
        return gaussian_sample(mean, std, noise)

    def decode(self, z):
        """Latent (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    def construct(self, x, noise=None):
        """Reconstruction: decode(encode(x))."""
        return self.decode(self.encode(x, noise))


class AutoencoderKLInferenceWrapper(AutoencoderKL):
    """The `first_stage_config` target of SDXL's configs: `encode` returns a latent sample, not a distribution
    (in this code base `AutoencoderKL.encode` already does, so the wrapper only keeps sgm's config name)."""


class IdentityFirstStage(nn.Cell):
    """sgm's `IdentityFirstStage`: the first stage of a pixel-space model (DeepFloyd IF), whose UNet sees the image
    itself in [-1, 1]. No parameters, so no checkpoint names."""

    def __init__(self, **ignored):
        super().__init__()

    def encode_moments(self, x):
        """The image as a posterior's mean, with the log-variance at the -30 floor every posterior sample clips
        to (std 3e-7, far below an 8-bit pixel step): the trainer's latent draw then gives back the image."""
        return ops.cat((x, ops.full_like(x, -30.0)), axis=1)

    def encode(self, x, noise=None):
        return x

    def decode(self, z):
        return z
