"""--aspect_ratio_buckets: the buckets against SDXL's ratio table, resize-then-crop to a bucket keeping the aspect
(with the size conditioning of the crop actually used), one-bucket batches that are deterministic, sharded and
resumable, and a tiny run on a portrait and a landscape photo (class images sampled at their buckets, one graph per
bucket shape, resume == uninterrupted)."""
import csv
import math
import shutil

import mindspore as ms
import numpy as np
import pytest
from PIL import Image, ImageDraw

from mindbooth.bucket_sampler import BucketBatchSampler
from mindbooth.buckets import bucket_sizes, class_image_sizes, nearest_bucket
from mindbooth.checkpoint import read_checkpoint
from mindbooth.data import DreamBoothDataset, collate, prepare_image
from mindbooth.sampling_cli import SD_XL_BASE_RATIOS
from tiny_workspace import make_workspace

TABLE = [size for name, size in SD_XL_BASE_RATIOS.items() if "_" not in name]  # (width, height), 1024^2 area


def test_buckets_at_1024_are_sdxl_table():
    assert bucket_sizes(1024, 32) == sorted({(h, w) for w, h in TABLE})
    assert bucket_sizes(1024, 64) == sorted({(h, w) for w, h in TABLE})  # the table's sides are multiples of 64


@pytest.mark.parametrize("resolution,multiple", [(512, 32), (512, 64), (768, 32)])
def test_buckets_are_the_table_scaled_to_the_resolution_area(resolution, multiple):
    """Each bucket is a table size scaled by resolution / 1024 with each side within half a unit of the exact value
    (unit: 64 px scaled, or the model's multiple if larger), and each table ratio has a bucket that near."""
    buckets = bucket_sizes(resolution, multiple)
    unit = max(multiple, resolution // 16)
    assert all(height % unit == 0 and width % unit == 0 for height, width in buckets)
    scaled = [(height * resolution / 1024, width * resolution / 1024) for width, height in TABLE]
    assert all(any(abs(height - h) <= unit / 2 and abs(width - w) <= unit / 2 for h, w in scaled) for height, width in buckets)
    for h, w in scaled:
        assert any(abs(height - h) <= unit / 2 and abs(width - w) <= unit / 2 for height, width in buckets)
        # the nearest bucket's aspect is no further than half a unit's rounding of each side can move it
        height, width = nearest_bucket(buckets, h, w)
        bound = math.log((w + unit / 2) / w) - math.log((h - unit / 2) / h)
        assert abs(math.log(width / height) - math.log(w / h)) <= bound + 1e-9
    assert (resolution, resolution) in buckets


def test_tiny_resolution_rounds_to_the_unet_multiple():
    """At 64 px the table scaled by 1/16 has 4-px steps; the tiny UNet needs multiples of 32 (8x VAE, 4x UNet):
    e.g. 0.5 (704x1408) -> 44x88 -> 32x96; 0.6 (768x1280) -> 48x80 -> 64x96 (half rounds up)."""
    assert bucket_sizes(64, 32) == [(32, 96), (64, 64), (64, 96), (96, 32), (96, 64)]
    assert nearest_bucket(bucket_sizes(64, 32), 1000, 600) == (96, 64)  # portrait, 0.6
    assert nearest_bucket(bucket_sizes(64, 32), 500, 1000) == (64, 96)  # landscape, 2.0: log 1.33 < log 1.5
    assert nearest_bucket(bucket_sizes(64, 32), 100, 100) == (64, 64)


def disc_image(width, height, color=(220, 30, 30)):
    """A photo of a disc (round, diameter 0.6 of the shorter side) centred on grey: squashing would make it an ellipse."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    radius = 0.3 * min(width, height)
    ImageDraw.Draw(image).ellipse((width / 2 - radius, height / 2 - radius, width / 2 + radius, height / 2 + radius), fill=color)
    return image


def disc_extent(pixels):
    """(height, width) of the coloured disc on grey in (3, H, W) pixels in [-1, 1]."""
    coloured = np.abs(pixels - pixels.mean(axis=0)).max(axis=0) > 0.3
    rows, cols = np.nonzero(coloured.any(axis=1))[0], np.nonzero(coloured.any(axis=0))[0]
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


@pytest.mark.parametrize("size,bucket", [((600, 1000), (96, 64)), ((1000, 500), (64, 96))], ids=["portrait", "landscape"])
def test_prepare_image_crops_to_the_bucket_keeping_the_aspect(size, bucket):
    width, height = size
    example = prepare_image(disc_image(width, height), bucket, center_crop=True, random_flip=False, rng=None)
    assert example.pixels.shape == (3, *bucket)
    scale = max(bucket[0] / height, bucket[1] / width)  # resized to cover the bucket, then cropped
    resized_h, resized_w = round(height * scale), round(width * scale)
    assert example.original_size == (height, width) and example.target_size == bucket
    assert example.crop_top_left == ((resized_h - bucket[0]) // 2, (resized_w - bucket[1]) // 2)
    disc_h, disc_w = disc_extent(example.pixels)
    assert abs(disc_h - disc_w) <= 1  # still round
    assert abs(disc_h - 0.6 * min(width, height) * scale) <= 2  # at the resize's scale
    # a random crop stays inside the resized image
    for seed in range(5):
        top, left = prepare_image(disc_image(width, height), bucket, False, True, np.random.default_rng(seed)).crop_top_left
        assert 0 <= top <= resized_h - bucket[0] and 0 <= left <= resized_w - bucket[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A portrait (600x1000) and a landscape (1000x500) photo of a disc, and one class photo (square)."""
    root = tmp_path_factory.mktemp("bucket_photos")
    (root / "subject").mkdir()
    disc_image(600, 1000).save(root / "subject" / "a_portrait.png")
    disc_image(1000, 500, (30, 30, 220)).save(root / "subject" / "b_landscape.png")
    (root / "class").mkdir()
    disc_image(80, 80, (30, 220, 30)).save(root / "class" / "user.png")
    return root


def test_dataset_batches_keep_each_photo_aspect_and_its_conditioning(photos):
    dataset = DreamBoothDataset(photos / "subject", "sks", 64, photos / "class", "cls", train_data_repeat=2, center_crop=True,
                                buckets=bucket_sizes(64, 32))
    assert dataset.instance_sizes == [(96, 64), (64, 96)]
    assert [dataset.item_size(i) for i in range(len(dataset))] == [(96, 64), (64, 96)] * 2
    for index, (height, width), original in ((0, (96, 64), (1000, 600)), (1, (64, 96), (500, 1000))):
        batch = collate([dataset.examples(index, None), dataset.examples(index + 2, None)])
        # two items of one bucket: instance rows, then the class rows cropped to the same bucket
        assert batch["pixels"].shape == (4, 3, height, width)
        np.testing.assert_array_equal(batch["target_size_as_tuple"], [[height, width]] * 4)
        np.testing.assert_array_equal(batch["original_size_as_tuple"], [original, original, (80, 80), (80, 80)])
        scale = max(height / original[0], width / original[1])
        crop = ((round(original[0] * scale) - height) // 2, (round(original[1] * scale) - width) // 2)
        class_scale = max(height, width) / 80
        class_crop = ((round(80 * class_scale) - height) // 2, (round(80 * class_scale) - width) // 2)
        np.testing.assert_array_equal(batch["crop_coords_top_left"], [crop, crop, class_crop, class_crop])
        disc_h, disc_w = disc_extent(batch["pixels"][0])
        assert abs(disc_h - disc_w) <= 1
    square = DreamBoothDataset(photos / "subject", "sks", 64)  # without buckets: the square crop, as before
    assert square.instance_sizes == [(64, 64)] * 2 and square.examples(0, np.random.default_rng(0))[0][0].pixels.shape == (3, 64, 64)


def test_class_images_follow_the_instance_buckets():
    assert class_image_sizes([(96, 64), (64, 96)], 5) == [(96, 64), (64, 96), (96, 64), (64, 96), (96, 64)]


def test_bucket_sampler_batches_one_bucket_per_step_deterministic_sharded_resumable():
    item_buckets = [(96, 64), (64, 96), (64, 64), (96, 64), (96, 64)] * 3  # 9, 3, 3 items per bucket
    straight = BucketBatchSampler(item_buckets, 2, seed=7)
    batches = [straight.next_indices() for _ in range(40)]
    assert all(len({item_buckets[i] for i in batch}) == 1 for batch in batches)
    epoch = batches[:len(straight.epoch_batches(0))]
    assert len(epoch) == 5 + 2 + 2  # each bucket padded to whole batches: 9 -> 10, 3 -> 4, 3 -> 4
    assert sorted(set(i for batch in epoch for i in batch)) == list(range(15))  # every item each epoch
    assert batches[:9] != batches[9:18]  # epochs are shuffled anew
    again, other_seed = BucketBatchSampler(item_buckets, 2, seed=7), BucketBatchSampler(item_buckets, 2, seed=8)
    assert [again.next_indices() for _ in range(40)] == batches
    assert [other_seed.next_indices() for _ in range(40)] != batches
    # two ranks of batch 1 split each global batch of 2 (the same order as one process of batch 2)
    ranks = [BucketBatchSampler(item_buckets, 1, seed=7, shard=r, num_shards=2) for r in range(2)]
    assert [[ranks[0].next_indices()[0], ranks[1].next_indices()[0]] for _ in range(40)] == batches
    # resumed from a saved state (through JSON, as TrainingState saves it), the order goes on unchanged
    import json
    interrupted = BucketBatchSampler(item_buckets, 2, seed=7)
    for _ in range(13):
        interrupted.next_indices()
    resumed = BucketBatchSampler(item_buckets, 2, seed=7)
    resumed.load_state(json.loads(json.dumps(interrupted.state())))
    assert [resumed.next_indices() for _ in range(27)] == batches[13:]


# ---- a tiny training run with buckets -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, photos):
    root = make_workspace(tmp_path_factory.mktemp("bucket_run"))
    (root / "class").mkdir()
    return root


def _train(workspace, photos, save_path, *extra):
    import train_dreambooth

    argv = ["--config", str(workspace / "train.yaml"), "--weight", str(workspace / "tiny.ckpt"),
            "--instance_data_path", str(photos / "subject"), "--instance_prompt", "a photo of sks disc",
            "--class_data_path", str(workspace / "class"), "--class_prompt", "a photo of disc", "--num_class_images", "2",
            "--device_target", "CPU", "--save_path", str(save_path), "--save_ckpt_interval", "2", "--resolution", "64",
            "--aspect_ratio_buckets", "True", *extra]
    try:
        return train_dreambooth.main(argv)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def _log(folder):
    with open(folder / "loss.csv") as handle:
        return list(csv.DictReader(handle))


def _lora(path):
    return {k: v.asnumpy() for k, v in read_checkpoint(path).items()}


@pytest.fixture(scope="module")
def uninterrupted(workspace, photos):
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _train(workspace, photos, workspace / "run_a", "--total_step", "6", "--ms_mode", "0")
    return printed.getvalue()


def test_class_images_are_sampled_at_the_instance_buckets(workspace, uninterrupted):
    sampled = sorted((workspace / "class").glob("class_*.png"))
    assert len(sampled) == 2
    sizes = []
    for path in sampled:
        with Image.open(path) as image:
            sizes.append(image.size)
    assert sizes == [(64, 96), (96, 64)]  # (width, height): the portrait's bucket, then the landscape's


def test_bucketed_run_trains_with_one_graph_per_bucket_shape(workspace, uninterrupted):
    rows = _log(workspace / "run_a")
    assert len(rows) == 6 and all(np.isfinite(float(r["loss"])) for r in rows)
    compiled = [int(r["compiled_step_graphs"]) for r in rows]
    assert compiled[-1] == 2 and compiled == sorted(compiled)  # two bucket shapes, each compiled once
    assert "aspect-ratio buckets: 2 of 5 in use (height x width: instance images): 64x96: 1, 96x64: 1" in uninterrupted
    assert "step graphs compiled: 2 gradient step graph(s), one per bucket shape trained on" in uninterrupted
    lora = _lora(workspace / "run_a" / "SDXL-tiny_6_lora.ckpt")
    assert max(np.abs(v).max() for k, v in lora.items() if ".lora_B." in k) > 0


def test_bucketed_resume_after_interruption_equals_uninterrupted(workspace, photos, uninterrupted):
    """A copy of run_a cut back to what a run killed after its step-2 save leaves (its later states, LoRA files and
    log rows gone; one tiny run fewer than training an interrupted run), resumed to step 6: run_a's losses and LoRA."""
    run_b = workspace / "run_b"
    shutil.copytree(workspace / "run_a", run_b)
    for step in (4, 6):
        for path in [run_b / f"SDXL-tiny_{step}_lora.ckpt", *(run_b / "state").glob(f"step_{step}[._]*")]:
            path.unlink()
    assert sorted(p.name for p in (run_b / "state").iterdir() if p.suffix == ".json") == ["step_2.json"]
    _train(workspace, photos, run_b, "--total_step", "6", "--ms_mode", "0", "--resume", str(run_b))
    straight, resumed = _log(workspace / "run_a"), _log(run_b)
    assert [int(r["step"]) for r in resumed] == list(range(1, 7))
    np.testing.assert_allclose([float(r["loss"]) for r in resumed], [float(r["loss"]) for r in straight], rtol=1e-5)
    # the resumed process compiled its own graphs: as many as the bucket shapes of steps 3-6
    assert 1 <= int(resumed[-1]["compiled_step_graphs"]) <= 2
    a, b = _lora(workspace / "run_a" / "SDXL-tiny_6_lora.ckpt"), _lora(run_b / "SDXL-tiny_6_lora.ckpt")
    assert a.keys() == b.keys()
    for name in a:
        difference = np.linalg.norm(b[name] - a[name]) / max(np.linalg.norm(a[name]), 1e-12)
        assert difference < 1e-5, (name, difference)


def test_cached_latents_keep_each_item_at_its_bucket(workspace, photos):
    """--cache_latents with buckets: each distinct item is encoded once at its bucket's shape, and every micro-batch
    (instance row, then class row) has the latent shape of its items' bucket."""
    from gm.util import instantiate_from_config
    from mindbooth.config import load_config
    from mindbooth.training_data import TrainingData

    engine = instantiate_from_config(load_config(workspace / "train.yaml").model)
    dataset = DreamBoothDataset(photos / "subject", "sks", 64, photos / "class", "cls", train_data_repeat=3,
                                buckets=bucket_sizes(64, 32))
    data = TrainingData(dataset, engine, batch_size=1, seed=5, rank=0, world_size=1, with_prior=True,
                        train_text_encoder=False, cache_latents=True)
    data.encode_all(show_progress=False)
    assert sorted(moments.shape for moments, _ in data.cache.values()) == [(2, 8, 8, 12), (2, 8, 12, 8)]
    seen = set()
    for _ in range(6):
        indices = data.sampler.next_indices()
        height, width = dataset.item_size(indices[0])
        latents, noise, sigmas, crossattn, vector = data.make_batch(indices, data.sampler.sample_generators(0))
        assert latents.shape == noise.shape == (2, 4, height // 8, width // 8) and sigmas.shape == (2,)
        seen.add((height, width))
    assert seen == {(96, 64), (64, 96)}


def test_buckets_cannot_change_on_resume_and_the_yaml_value_must_be_a_bool(workspace, photos, uninterrupted, tmp_path):
    """A bucketed run resumes bucketed (its sampler state is the buckets' epoch and position): turning the flag off
    on --resume is a one-line error naming it; a YAML value that is not True/False is one too. Nothing is written."""
    before = sorted(p.name for p in (workspace / "run_a").rglob("*"))
    with pytest.raises(SystemExit, match=r"--resume .*--aspect_ratio_buckets is False, the run has True"):
        _train(workspace, photos, workspace / "run_a", "--total_step", "8", "--resume", str(workspace / "run_a"),
               "--aspect_ratio_buckets", "False")
    assert sorted(p.name for p in (workspace / "run_a").rglob("*")) == before
    config = (workspace / "train.yaml").read_text().replace("\ntrain:\n", "\ntrain:\n  aspect_ratio_buckets: sometimes\n", 1)
    (tmp_path / "bad.yaml").write_text(config)
    import train_dreambooth

    with pytest.raises(SystemExit, match="train.aspect_ratio_buckets in .*bad.yaml must be True or False, got 'sometimes'"):
        train_dreambooth.main(["--config", str(tmp_path / "bad.yaml"), "--weight", str(workspace / "tiny.ckpt"),
                               "--instance_data_path", str(photos / "subject"), "--instance_prompt", "sks",
                               "--device_target", "CPU", "--save_path", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
