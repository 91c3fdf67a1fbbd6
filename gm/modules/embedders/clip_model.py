"""CLIP's joint image-text embedding with transformers' `CLIPModel` parameter names, for CLIP-I / CLIP-T scores.

`text_model.` is the existing CLIP text transformer (clip.py), `vision_model.` the vision tower (clip_vision.py);
`visual_projection` and `text_projection` (no bias) map both into the shared space where cosine similarity is
taken. The temperature `logit_scale` of the files plays no part in a cosine and is not built.
"""
import numpy as np
from mindspore import nn, ops

from gm.modules.embedders.clip import CLIPTextTransformer
from gm.modules.embedders.clip_vision import CLIPVisionTransformer


def first_token_positions(input_ids, token_id: int) -> np.ndarray:
    """(B, L) ids -> (B,) index of the first `token_id` (the end-of-text token whose state CLIP pools)."""
    ids = np.asarray(input_ids)
    found = ids == token_id
    if not found.any(axis=1).all():
        raise ValueError(f"every row of input_ids needs the end-of-text token {token_id}")
    return found.argmax(axis=1).astype(np.int32)


class CLIPModel(nn.Cell):
    def __init__(self, text: dict, vision: dict, projection_dim: int = 512):
        """`text`: CLIPTextTransformer's arguments (width, layers, heads, mlp_width, act, vocab_size, max_length);
        `vision`: CLIPVisionTransformer's (width, layers, heads, mlp_width, act, image_size, patch_size, channels)."""
        super().__init__()
        self.text_model = CLIPTextTransformer(**text)
        self.vision_model = CLIPVisionTransformer(**vision)
        self.visual_projection = nn.Dense(vision["width"], projection_dim, has_bias=False)
        self.text_projection = nn.Dense(text["width"], projection_dim, has_bias=False)

    def image_embeds(self, pixel_values):
        """(B, C, H, W) pixels -> (B, projection_dim) (transformers' `get_image_features`)."""
        return self.visual_projection(self.vision_model(pixel_values))

    def text_embeds(self, input_ids, pooled_positions):
        """(B, L) ids and each row's end-of-text position (`first_token_positions`) -> (B, projection_dim)
        (transformers' `get_text_features`): the final-norm state at that position, projected."""
        text = self.text_model
        hidden = text.final_layer_norm(text(input_ids, text.num_layers))
        # select row b's token pooled_positions[b] by a one-hot product (exact: the other weights are 0)
        select = ops.one_hot(pooled_positions, hidden.shape[1], ops.ones((), hidden.dtype), ops.zeros((), hidden.dtype))
        pooled = ops.matmul(select.expand_dims(1), hidden).squeeze(1)
        return self.text_projection(pooled)
