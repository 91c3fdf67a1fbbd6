"""DreamBooth evaluation scores (Ruiz et al. 2023, Sec. 4.1) computed from extracted features.

DINO and CLIP-I: mean cosine similarity over all (generated, real) image pairs of their embeddings.
CLIP-T: mean cosine similarity between each generated image's CLIP embedding and its prompt's CLIP text embedding.
Feature extraction is separate so the arithmetic can be checked on its own.
"""
import numpy as np


def _unit_rows(features) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (count, dim) feature array, got shape {x.shape}")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pairwise_image_similarity(generated_features, real_features) -> float:
    """DINO / CLIP-I score: average cosine similarity over every generated x real image pair."""
    gen, real = _unit_rows(generated_features), _unit_rows(real_features)
    if gen.shape[1] != real.shape[1]:
        raise ValueError(f"feature sizes differ: generated {gen.shape[1]}, real {real.shape[1]}")
    return float((gen @ real.T).mean())


def prompt_image_similarity(image_features, text_features) -> float:
    """CLIP-T score: average cosine similarity of each generated image with its own prompt (row i with row i)."""
    img, txt = _unit_rows(image_features), _unit_rows(text_features)
    if img.shape != txt.shape:
        raise ValueError(f"need one prompt embedding per image: images {img.shape}, prompts {txt.shape}")
    return float((img * txt).sum(axis=1).mean())
