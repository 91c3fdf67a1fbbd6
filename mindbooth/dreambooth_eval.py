"""The DreamBooth evaluation of a run (Ruiz et al. 2023, Sec. 4.1): DINO, CLIP-I and CLIP-T of generated images
against the subject's instance images and the prompts they were generated from (tools/evaluate_dreambooth.py).

A generated image's prompt is its `<image>.txt` sidecar (the convention of training captions, mindbooth/data.py)
or else the prompt that demo/sampling_without_streamlit.py records in each PNG (its "parameters" text); the
sampler's grid images (they record several prompts) are skipped.
"""
import json
from pathlib import Path

import yaml
from PIL import Image

from mindbooth.data import sidecar_caption
from mindbooth.dreambooth_scores import pairwise_image_similarity, prompt_image_similarity
from mindbooth.images import list_images, load_rgb
from mindbooth.validation import UsageError

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "configs" / "evaluation" / "dreambooth_prompts.yaml"
METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))


def dreambooth_prompts(class_token: str, live: bool, unique_token: str = "sks") -> list:
    """The paper's 25 evaluation prompts for a subject of class `class_token` (live: the cats' and dogs' list)."""
    if not class_token.strip() or not unique_token.strip():
        raise UsageError("the subject class and the unique token must not be empty")
    lists = yaml.safe_load(PROMPTS_FILE.read_text(encoding="utf-8"))
    return [t.format(unique_token=unique_token.strip(), class_token=class_token.strip())
            for t in lists["live" if live else "object"]]


def images_per_prompt() -> int:
    return int(yaml.safe_load(PROMPTS_FILE.read_text(encoding="utf-8"))["images_per_prompt"])


def recorded_prompt(path):
    """The prompt of a generated image: its sidecar caption, else the sampler's PNG record. Returns (prompt, is_grid)."""
    caption = sidecar_caption(path)
    if caption:
        return caption, False
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except OSError:
        return None, False  # unreadable: load_rgb reports it
    try:
        record = json.loads(text) if text else {}
    except ValueError:
        record = {}
    if not isinstance(record, dict):
        return None, False
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return record["prompt"].strip(), False
    return None, "prompts" in record


def generated_images(folder) -> tuple:
    """(paths, prompts, skipped grid paths) of the generated images in `folder`."""
    paths, prompts, grids = [], [], []
    for path in _images(folder, "--generated_dir"):
        prompt, is_grid = recorded_prompt(path)
        if is_grid:
            grids.append(path)
            continue
        if prompt is None:
            raise UsageError(f"generated image {path} has no prompt: write it in {path.with_suffix('.txt').name} next "
                             "to it, or generate with demo/sampling_without_streamlit.py (it records the prompt)")
        paths.append(path)
        prompts.append(prompt)
    if not paths:
        raise UsageError(f"--generated_dir {folder}: no generated images (only sampler grids)")
    return paths, prompts, grids


def _images(folder, flag: str) -> list:
    try:
        paths = list_images(folder)
    except FileNotFoundError:
        raise UsageError(f"{flag} {folder}: no such folder") from None
    if not paths:
        raise UsageError(f"{flag} {folder}: no images in it (.jpg, .png, .webp, ...)")
    return paths


def _load(paths) -> list:
    try:
        return [load_rgb(path) for path in paths]
    except ValueError as error:
        raise UsageError(str(error)) from None


def scores_from_features(dino_gen, dino_real, clip_gen, clip_real, clip_text, prompts) -> dict:
    """The three scores over all images, and per prompt. `clip_text`: one row per generated image (its prompt)."""
    def scores(rows):
        return {"dino": pairwise_image_similarity(dino_gen[rows], dino_real),
                "clip_i": pairwise_image_similarity(clip_gen[rows], clip_real),
                "clip_t": prompt_image_similarity(clip_gen[rows], clip_text[rows]), "images": len(rows)}

    prompts = list(prompts)
    per_prompt = {p: scores([i for i, q in enumerate(prompts) if q == p]) for p in dict.fromkeys(prompts)}
    return {**scores(list(range(len(prompts)))), "prompts": len(per_prompt), "per_prompt": per_prompt}


def evaluate(instance_dir, generated_dir, make_dino, make_clip) -> dict:
    """`make_dino`, `make_clip`: zero-argument callables returning extractors with the methods of the
    DinoExtractor and ClipExtractor of tools/model_conversion/feature_extractors.py; called once the images are read,
    so that a bad image folder fails before the models load. Returns the scores (`scores_from_features`) and the
    image counts."""
    real = _load(_images(instance_dir, "--instance_dir"))
    paths, prompts, grids = generated_images(generated_dir)
    generated = _load(paths)
    dino, clip = make_dino(), make_clip()
    unique = list(dict.fromkeys(prompts))
    text = clip.text_features(unique)
    clip_text = text[[unique.index(p) for p in prompts]]
    result = scores_from_features(dino.image_features(generated), dino.image_features(real),
                                  clip.image_features(generated), clip.image_features(real), clip_text, prompts)
    return {**result, "instance_images": len(real), "skipped_grids": [p.name for p in grids]}


def format_table(result: dict) -> str:
    lines = [f"{len(result['per_prompt'])} prompts, {result['images']} generated images, "
             f"{result['instance_images']} instance images",
             f"{'metric':<8}{'score':>8}"]
    lines += [f"{label:<8}{result[key]:>8.4f}" for key, label in METRICS]
    return "\n".join(lines)

