import numpy as np
import pytest

from mindbooth.dreambooth_scores import pairwise_image_similarity, prompt_image_similarity


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_pairwise_image_similarity_is_mean_over_all_pairs():
    rng = np.random.default_rng(0)
    gen, real = rng.normal(size=(5, 8)), rng.normal(size=(3, 8))
    expected = np.mean([_cos(g, r) for g in gen for r in real])
    assert pairwise_image_similarity(gen, real) == pytest.approx(expected, abs=1e-12)


def test_identical_images_score_one_and_opposite_minus_one():
    x = np.array([[1.0, 2.0, 3.0]])
    assert pairwise_image_similarity(x, 2 * x) == pytest.approx(1.0)
    assert pairwise_image_similarity(x, -x) == pytest.approx(-1.0)


def test_prompt_image_similarity_pairs_each_image_with_its_own_prompt():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    expected = np.mean([_cos(i, t) for i, t in zip(img, txt)])
    assert prompt_image_similarity(img, txt) == pytest.approx(expected, abs=1e-12)
    # Not the all-pairs mean: shuffling the prompts changes the score.
    assert prompt_image_similarity(img, txt[::-1]) != pytest.approx(expected)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="one prompt embedding per image"):
        prompt_image_similarity(np.ones((3, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        pairwise_image_similarity(np.ones((3, 4)), np.ones((2, 5)))
