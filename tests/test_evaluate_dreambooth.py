"""tools/evaluate_dreambooth.py and its feature extractors against transformers, on tiny random-weight DINO (ViT)
and CLIP models saved as Hugging Face folders: features, preprocessing, and the scores by the paper's formula."""
import json
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from gm.modules.embedders.clip_model import first_token_positions
from gm.modules.embedders.tokenizer import CLIPTokenizer
from tools.model_conversion.feature_extractors import ClipExtractor, DinoExtractor
from mindbooth.image_preprocessing import CLIP_DEFAULTS, VIT_DEFAULTS, ImagePreprocessing
from mindbooth.sampling_cli import save_png
from test_text_encoders import randomize, rel_err
from tools import evaluate_dreambooth

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PROMPTS = ["a sks dog in the snow", "a red sks dog", "a photo of sks dog on the beach, golden hour"]


def random_images(seed, sizes):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    folder = tmp_path_factory.mktemp("dino")
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = randomize(ViTModel(config))  # with its pooler, as facebook/dino-vits16's file: the loader skips it
    model.save_pretrained(folder)
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    processor.save_pretrained(folder)
    return folder, model, processor


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(**small, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(**small, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = randomize(CLIPModel(config))
    model.save_pretrained(folder)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    return folder, model, processor


def torch_image_features(model, processor, images, kind):
    pixels = torch.from_numpy(np.stack(processor(images=images)["pixel_values"]))
    with torch.no_grad():
        if kind == "dino":
            return model(pixel_values=pixels).last_hidden_state[:, 0].numpy()
        out = model.get_image_features(pixel_values=pixels)
        return getattr(out, "pooler_output", out).numpy()


def torch_text_features(model, prompts):
    ids = torch.from_numpy(CLIPTokenizer()(prompts).astype(np.int64))
    with torch.no_grad():
        out = model.get_text_features(input_ids=ids)
    return getattr(out, "pooler_output", out).numpy()


def test_dino_features_match_transformers(dino):
    folder, model, processor = dino
    extractor = DinoExtractor(folder)
    images = random_images(1, [(32, 32), (45, 30), (30, 60)])
    pixels = np.stack(processor(images=images)["pixel_values"])
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert rel_err(extractor.model(ms.Tensor(pixels)).asnumpy(), expected) < 1e-4  # every token, after the final norm
    assert rel_err(extractor.image_features(images, batch_size=2), expected[:, 0]) < 1e-4


def test_dino_reads_transformers_5_in_memory_names(dino, tmp_path):
    """A file saved with save_original_format=False (transformers >= 5's own ViT names) loads the same."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers < 5 has one ViT naming")
    folder, model, processor = dino
    model.save_pretrained(tmp_path, save_original_format=False)
    processor.save_pretrained(tmp_path)
    images = random_images(2, [(32, 32)])
    assert rel_err(DinoExtractor(tmp_path).image_features(images), DinoExtractor(folder).image_features(images)) == 0


def test_clip_features_match_transformers(clip):
    folder, model, processor = clip
    extractor = ClipExtractor(folder)
    images = random_images(3, [(32, 32), (50, 37), (37, 50)])
    assert rel_err(extractor.image_features(images, batch_size=2), torch_image_features(model, processor, images, "clip")) < 1e-4
    assert rel_err(extractor.text_features(PROMPTS, batch_size=2), torch_text_features(model, PROMPTS)) < 1e-4


def test_text_is_pooled_at_the_first_end_of_text_token():
    ids = CLIPTokenizer()(["a dog", "a"])
    assert first_token_positions(ids, 49407).tolist() == [3, 2]  # BOS, tokens, EOS (padding is EOS too)
    with pytest.raises(ValueError, match="end-of-text"):
        first_token_positions(np.zeros((1, 5), np.int32), 49407)


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_preprocessing_matches_the_processors(kind, dino, clip, tmp_path):
    """Odd sizes, both orientations, an image smaller than the model input (upscaled), the processors' defaults."""
    import transformers

    folder = (dino if kind == "vit" else clip)[0]
    processor_class = transformers.ViTImageProcessorPil if kind == "vit" else transformers.CLIPImageProcessorPil
    defaults = VIT_DEFAULTS if kind == "vit" else CLIP_DEFAULTS
    images = random_images(4, [(50, 37), (37, 50), (20, 20), (301, 300)])
    cases = [(processor_class.from_pretrained(folder), json.loads((folder / "preprocessor_config.json").read_text())),
             (processor_class(), {})]  # a config that names nothing: the class defaults (224, ...)
    # the Hub's older files give sizes as bare ints (facebook/dino-vits16: "size": 224; openai CLIP: "size": 224,
    # "crop_size": 224), read as a square for ViT and as the shortest edge for CLIP
    old_style = ({"size": 32, "resample": 2, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD} if kind == "vit"
                 else {"size": 40, "crop_size": 32, "resample": 3})
    cases.append((processor_class(**old_style), old_style))
    for processor, config in cases:
        ours = ImagePreprocessing.from_config(config, defaults).batch(images)
        expected = np.stack(processor(images=images)["pixel_values"])
        assert ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def paper_scores(gen_dino, real_dino, gen_clip, real_clip, text_clip):
    """Sec. 4.1, written out: mean cosine over every (generated, real) pair; CLIP-T: each image with its prompt."""
    def cos(a, b):
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    return {"dino": np.mean([cos(g, r) for g in gen_dino for r in real_dino]),
            "clip_i": np.mean([cos(g, r) for g in gen_clip for r in real_clip]),
            "clip_t": np.mean([cos(i, t) for i, t in zip(gen_clip, text_clip)])}


def test_cli_scores_are_the_papers_formula_on_transformers_features(dino, clip, tmp_path, capsys):
    instance_dir, generated_dir = tmp_path / "instance", tmp_path / "generated"
    instance_dir.mkdir()
    real = random_images(5, [(40, 30), (30, 40), (32, 32)])
    for i, image in enumerate(real):
        image.save(instance_dir / f"{i:02d}.png")
    generated = random_images(6, [(32, 32), (48, 40), (32, 32), (40, 48)])
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2]]
    # two as the sampler writes them (the prompt in the PNG), two with a sidecar caption
    save_png(generated[0], generated_dir, "a", {"prompt": prompts[0], "image": 0})
    save_png(generated[1], generated_dir, "b", {"prompt": prompts[1], "image": 0})
    for name, image, prompt in (("c", generated[2], prompts[2]), ("d", generated[3], prompts[3])):
        image.save(generated_dir / f"{name}.png")
        (generated_dir / f"{name}.txt").write_text(prompt + "\n")
    save_png(generated[0], generated_dir, "z-grid", {"prompts": PROMPTS})  # the sampler's grid: skipped

    out = tmp_path / "scores.json"
    evaluate_dreambooth.main(["--instance_dir", str(instance_dir), "--generated_dir", str(generated_dir),
                              "--dino", str(dino[0]), "--clip", str(clip[0]), "--json", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    expected = paper_scores(torch_image_features(dino[1], dino[2], generated, "dino"),
                            torch_image_features(dino[1], dino[2], real, "dino"),
                            torch_image_features(clip[1], clip[2], generated, "clip"),
                            torch_image_features(clip[1], clip[2], real, "clip"), torch_text_features(clip[1], prompts))
    for key, label in (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T")):
        assert result[key] == pytest.approx(expected[key], abs=1e-5)
        assert f"{label:<8}{result[key]:>8.4f}" in printed
    assert result["images"] == 4 and result["instance_images"] == 3 and result["skipped_grids"] == ["z-grid.png"]
    assert result["per_prompt"][PROMPTS[1]]["images"] == 2
    assert set(result["per_prompt"]) == set(PROMPTS)


def test_print_prompts(capsys):
    evaluate_dreambooth.main(["--print_prompts", "--subject_class", "dog", "--live"])
    live = capsys.readouterr().out.splitlines()
    evaluate_dreambooth.main(["--print_prompts", "--subject_class", "backpack", "--unique_token", "zwx"])
    objects = capsys.readouterr().out.splitlines()
    assert len(live) == len(objects) == 25
    assert live[0] == "a sks dog in the jungle" and "a sks dog wearing a santa hat" in live
    assert objects[-1] == "a cube shaped zwx backpack" and "a zwx backpack floating in an ocean of milk" in objects
    assert len(set(live) & {p.replace("zwx backpack", "sks dog") for p in objects}) == 15  # the shared prompts


def bad_folder_message(capsys, **flags):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_dreambooth.main([arg for key, value in flags.items() for arg in (f"--{key}", str(value))])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_folders_are_one_line_errors(dino, clip, tmp_path, capsys):
    instance = tmp_path / "instance"
    instance.mkdir()
    random_images(7, [(32, 32)])[0].save(instance / "0.png")
    generated = tmp_path / "generated"
    generated.mkdir()
    random_images(8, [(32, 32)])[0].save(generated / "0.png")
    (generated / "0.txt").write_text("a sks dog")
    ok = dict(instance_dir=instance, generated_dir=generated, dino=dino[0], clip=clip[0])

    assert "no such folder" in bad_folder_message(capsys, **{**ok, "dino": tmp_path / "absent"})
    assert "needs a 'vit' one" in bad_folder_message(capsys, **{**ok, "dino": clip[0]})  # CLIP given as DINO
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (bin_only / name).write_text((clip[0] / name).read_text())
    (bin_only / "pytorch_model.bin").write_bytes(b"pickle")
    message = bad_folder_message(capsys, **{**ok, "clip": bin_only})
    assert ".bin files are not read" in message and "save_pretrained" in message
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (truncated / name).write_text((dino[0] / name).read_text())
    (truncated / "model.safetensors").write_bytes((dino[0] / "model.safetensors").read_bytes()[:-100])
    assert "truncated" in bad_folder_message(capsys, **{**ok, "dino": truncated})
    (generated / "0.txt").unlink()
    assert "has no prompt" in bad_folder_message(capsys, **ok)


def test_command_line_error_has_no_traceback(tmp_path):
    for folder in ("instance", "generated"):
        (tmp_path / folder).mkdir()
        random_images(9, [(32, 32)])[0].save(tmp_path / folder / "0.png")
    (tmp_path / "generated" / "0.txt").write_text("a sks dog")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate_dreambooth.py"),
                          "--instance_dir", str(tmp_path / "instance"), "--generated_dir", str(tmp_path / "generated"),
                          "--dino", str(tmp_path / "absent"), "--clip", str(tmp_path), "--json", str(tmp_path / "s.json")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().startswith("error: --dino") and len(run.stderr.strip().splitlines()) == 1
    assert "Traceback" not in run.stderr and not (tmp_path / "s.json").exists()
