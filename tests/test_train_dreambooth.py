"""DreamBooth training on the tiny model: the prior-preservation loss, per-image size conditioning,
class-image sampling that never touches user files, only LoRA changes, loss falls when overfitting,
resume == uninterrupted, GRAPH == PyNative."""
import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from gm.modules.lora import lora_parameters
from gm.util import instantiate_from_config
from mindbooth.checkpoint import load_weights, read_checkpoint
from mindbooth.config import load_config
from mindbooth.data import DreamBoothDataset, collate
from mindbooth.optim import AdamW
from mindbooth.train_step import ApplyStep, DreamBoothLoss, GradStep, buffered_gradients, make_buffers, prior_passes
from conftest import ROOT
from tiny_workspace import make_workspace

ONE = ms.Tensor(1.0, ms.float32)  # a GradStep loss scale or loss weight of 1


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny base checkpoint, 3 subject images and a class folder holding one user photo."""
    root = make_workspace(tmp_path_factory.mktemp("dreambooth"))
    (root / "class").mkdir()
    user_photo = root / "class" / "my_dog.jpg"
    Image.new("RGB", (40, 56), (10, 200, 30)).save(user_photo)
    return root


def _train(workspace, save_path, *extra):
    import train_dreambooth

    argv = ["--config", str(workspace / "train.yaml"), "--weight", str(workspace / "tiny.ckpt"),
            "--instance_data_path", str(workspace / "subject"), "--instance_prompt", "a photo of sks toy",
            "--class_data_path", str(workspace / "class"), "--class_prompt", "a photo of toy", "--num_class_images", "3",
            "--device_target", "CPU", "--save_path", str(save_path), "--save_ckpt_interval", "2", *extra]
    try:
        return train_dreambooth.main(argv)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def _losses(folder):
    with open(folder / "loss.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def _lora(path):
    return {k: v.asnumpy() for k, v in read_checkpoint(path).items()}


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    user_photo = workspace / "class" / "my_dog.jpg"
    before = (hashlib.sha256(user_photo.read_bytes()).hexdigest(), os.stat(user_photo).st_mtime_ns)
    engine = _train(workspace, workspace / "run_a", "--total_step", "4", "--ms_mode", "0", "--infer_during_train", "True", "--infer_interval", "2")
    return engine, before


def test_missing_class_images_are_sampled_and_user_images_untouched(workspace, uninterrupted):
    _, (digest, mtime) = uninterrupted
    files = sorted(p.name for p in (workspace / "class").iterdir())
    assert "my_dog.jpg" in files and len(files) == 3  # 1 user photo + 2 sampled
    sampled = [f for f in files if f.startswith("class_")]
    assert len(sampled) == 2 and all(f.endswith(".png") for f in sampled)
    user_photo = workspace / "class" / "my_dog.jpg"
    assert hashlib.sha256(user_photo.read_bytes()).hexdigest() == digest
    assert os.stat(user_photo).st_mtime_ns == mtime
    for name in sampled:
        with Image.open(workspace / "class" / name) as image:
            assert image.size == (32, 32)
    assert not [p for p in (workspace / "class").iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_run_writes_lora_log_plot_sample_and_changes_only_lora(workspace, uninterrupted):
    engine, _ = uninterrupted
    run = workspace / "run_a"
    assert len(_losses(run)) == 4 and all(np.isfinite(_losses(run)))
    with open(run / "loss.csv") as handle:  # GRAPH_MODE compiled the step once, not once per step
        assert [int(row["compiled_step_graphs"]) for row in csv.DictReader(handle)] == [1, 1, 1, 1]
    for name in ("loss.png", "sample_final.png", "config.yaml", "SDXL-tiny_2_lora.ckpt", "SDXL-tiny_4_lora.ckpt",
                 "validation_step000002.png", "validation_step000004.png"):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml").dreambooth.num_class_images == 3  # the flag is in the saved config
    lora = _lora(run / "SDXL-tiny_4_lora.ckpt")
    assert set(k for k in lora if ".lora_" in k) == set(lora_parameters(engine))
    assert lora["lora_rank"] == 4
    # Base weights are exactly those of the file; LoRA weights moved away from their start (B was zero).
    base = read_checkpoint(workspace / "tiny.ckpt")
    for name, param in engine.parameters_and_names():
        if ".lora_" not in name:
            np.testing.assert_array_equal(param.asnumpy(), base[name].asnumpy(), err_msg=name)
    assert max(np.abs(v).max() for k, v in lora.items() if ".lora_B." in k) > 0


@pytest.fixture(scope="module")
def interrupted_in_pynative(workspace, uninterrupted):
    """The same run in PyNative, stopped after 2 steps (as if killed after its step-2 save)."""
    _train(workspace, workspace / "run_b", "--total_step", "2", "--ms_mode", "1")
    return workspace / "run_b"


def test_graph_mode_and_pynative_give_the_same_losses(workspace, interrupted_in_pynative):
    np.testing.assert_allclose(_losses(interrupted_in_pynative), _losses(workspace / "run_a")[:2], rtol=1e-5)


def test_plain_backend_trains_as_the_cpu_backend(workspace, uninterrupted):
    """--backend plain (MindSpore's ops, as on Ascend/GPU) against run_a (the CPU backend here): the same losses and,
    after 2 steps, the same LoRA to float rounding."""
    assert uninterrupted[0].backend == "cpu"
    run = workspace / "run_plain"
    engine = _train(workspace, run, "--total_step", "2", "--ms_mode", "0", "--backend", "plain")
    assert engine.backend == "plain"
    np.testing.assert_allclose(_losses(run), _losses(workspace / "run_a")[:2], rtol=1e-5)
    with open(run / "loss.csv") as plain_log, open(workspace / "run_a" / "loss.csv") as cpu_log:
        norms = [[float(row["grad_norm"]) for row in csv.DictReader(log)][:2] for log in (plain_log, cpu_log)]
    np.testing.assert_allclose(*norms, rtol=1e-3)  # measured 8e-5 apart: the kernels sum in another order
    plain, cpu = _lora(run / "SDXL-tiny_2_lora.ckpt"), _lora(workspace / "run_a" / "SDXL-tiny_2_lora.ckpt")
    assert plain.keys() == cpu.keys()
    for name in cpu:
        # Adam's first steps divide each element's gradient by its own size, so rounding in single near-zero
        # gradient elements grows (measured up to 1.3e-3 of a tensor's norm); a wrong layer would be off by O(1).
        difference = np.linalg.norm(plain[name] - cpu[name]) / max(np.linalg.norm(cpu[name]), 1e-12)
        assert difference < 1e-2, (name, difference)


def test_resume_after_interruption_equals_uninterrupted_run(workspace, interrupted_in_pynative):
    run_b = interrupted_in_pynative
    _train(workspace, run_b, "--total_step", "4", "--ms_mode", "1", "--resume", str(run_b))
    resumed, straight = _lora(run_b / "SDXL-tiny_4_lora.ckpt"), _lora(workspace / "run_a" / "SDXL-tiny_4_lora.ckpt")
    assert resumed.keys() == straight.keys()
    for name in straight:
        # The two runs differ in mode (PyNative vs GRAPH) only by float rounding, which Adam can amplify for single
        # near-zero-gradient elements; a resume that lost the optimizer state or RNG would be off by O(1).
        difference = np.linalg.norm(resumed[name] - straight[name]) / max(np.linalg.norm(straight[name]), 1e-12)
        assert difference < 1e-3, (name, difference)
    np.testing.assert_allclose(_losses(run_b), _losses(workspace / "run_a"), rtol=1e-5)


def test_split_prior_batch_trains_as_the_joint_batch(workspace, uninterrupted):
    """--split_prior_batch: the same run as run_a (joint instance + class batch) up to float rounding, losses and
    LoRA, with one compiled gradient graph serving both passes."""
    run = workspace / "run_split"
    _train(workspace, run, "--total_step", "4", "--ms_mode", "0", "--split_prior_batch", "True")
    with open(run / "loss.csv") as handle:
        rows = list(csv.DictReader(handle))
    with open(workspace / "run_a" / "loss.csv") as handle:
        joint = list(csv.DictReader(handle))
    for column in ("loss", "loss_instance", "loss_class"):
        np.testing.assert_allclose([float(r[column]) for r in rows], [float(r[column]) for r in joint], rtol=1e-5, err_msg=column)
    # The gradients are sums over rows in another order: at step 1 (LoRA B = 0) their norm measured 1.4e-4 apart.
    np.testing.assert_allclose([float(r["grad_norm"]) for r in rows], [float(r["grad_norm"]) for r in joint], rtol=1e-3)
    assert [int(r["compiled_step_graphs"]) for r in rows] == [1, 1, 1, 1]
    split, straight = _lora(run / "SDXL-tiny_4_lora.ckpt"), _lora(workspace / "run_a" / "SDXL-tiny_4_lora.ckpt")
    for name in straight:  # as in the resume test: Adam may amplify rounding in single near-zero-gradient elements
        difference = np.linalg.norm(split[name] - straight[name]) / max(np.linalg.norm(straight[name]), 1e-12)
        assert difference < 1e-3, (name, difference)


@pytest.mark.parametrize("res_blocks", [False, True], ids=["transformer-blocks", "and-res-blocks"])
def test_gradient_checkpointing_trains_as_without_it(workspace, uninterrupted, res_blocks):
    """--gradient_checkpointing recomputes each UNet transformer block's forward in the backward pass, with
    --gradient_checkpointing_res_blocks each ResBlock's too (what they compile to: test_lean_ops): the same losses,
    gradient norms and LoRA as run_a, from one compiled gradient graph."""
    run = workspace / f"run_checkpointed_{res_blocks}"
    _train(workspace, run, "--total_step", "2", "--ms_mode", "0", "--gradient_checkpointing", "True",
           "--gradient_checkpointing_res_blocks", str(res_blocks))
    saved = load_config(run / "config.yaml").train
    assert saved.gradient_checkpointing is True and saved.gradient_checkpointing_res_blocks is res_blocks
    with open(run / "loss.csv") as handle:
        rows = list(csv.DictReader(handle))
    with open(workspace / "run_a" / "loss.csv") as handle:
        plain = list(csv.DictReader(handle))[:2]
    for column in ("loss", "loss_instance", "loss_class", "grad_norm"):
        np.testing.assert_allclose([float(r[column]) for r in rows], [float(r[column]) for r in plain], rtol=1e-5, err_msg=column)
    assert [int(r["compiled_step_graphs"]) for r in rows] == [1, 1]
    checkpointed, straight = _lora(run / "SDXL-tiny_2_lora.ckpt"), _lora(workspace / "run_a" / "SDXL-tiny_2_lora.ckpt")
    for name in straight:
        difference = np.linalg.norm(checkpointed[name] - straight[name]) / max(np.linalg.norm(straight[name]), 1e-12)
        assert difference < 1e-4, (name, difference)


def test_res_blocks_checkpointing_alone_is_refused(workspace):
    """--gradient_checkpointing_res_blocks only adds to --gradient_checkpointing: alone, a one-line error, no run."""
    run = workspace / "run_res_blocks_alone"
    with pytest.raises(SystemExit, match="--gradient_checkpointing_res_blocks needs --gradient_checkpointing True"):
        _train(workspace, run, "--gradient_checkpointing_res_blocks", "True")
    assert not run.exists()


def test_cache_latents_and_fp16_frozen_weights_train_and_free_the_encoders(workspace, uninterrupted):
    engine = _train(workspace, workspace / "run_cached", "--total_step", "2", "--ms_mode", "1", "--cache_latents", "True",
                    "--frozen_weight_dtype", "float16")
    assert engine.conditioner is None and not hasattr(engine.first_stage_model, "encoder")
    frozen = [p for n, p in engine.model.parameters_and_names() if ".lora_" not in n]
    assert all(p.dtype == ms.float16 for p in frozen) and all(p.dtype == ms.float32 for p in lora_parameters(engine).values())
    assert len(_losses(workspace / "run_cached")) == 2 and all(np.isfinite(_losses(workspace / "run_cached")))
    assert (workspace / "run_cached" / "sample_final.png").is_file()  # sampled from the cached prompt embedding


# ---- units ---------------------------------------------------------------------------------------------------

def _tiny_engine_with_weights(workspace, backend="auto"):
    engine = instantiate_from_config(load_config(workspace / "train.yaml").model, backend=backend)
    load_weights(engine, [str(workspace / "tiny.ckpt")])
    rng = np.random.default_rng(5)
    for name, param in lora_parameters(engine).items():
        param.set_data(ms.Tensor(rng.normal(0, 0.05, param.shape).astype(np.float32)))
    return engine


def _fixed_batch(engine, batch):
    rng = np.random.default_rng(7)
    latents = rng.standard_normal((batch, 4, 4, 4)).astype(np.float32)
    cond = engine.conditioner.encode({"txt": ["a photo of sks toy"] * (batch // 2) + ["a photo of toy"] * (batch // 2),
                                      "original_size_as_tuple": [[32, 32]] * batch, "crop_coords_top_left": [[0, 0]] * batch,
                                      "target_size_as_tuple": [[32, 32]] * batch})
    noise = rng.standard_normal(latents.shape).astype(np.float32)
    sigmas = np.array([0.5, 2.0, 1.0, 8.0][:batch], np.float32)
    return [ms.Tensor(latents), ms.Tensor(noise), ms.Tensor(sigmas), (cond["crossattn"], cond["vector"])]


def test_prior_preservation_loss_formula(workspace):
    engine = _tiny_engine_with_weights(workspace)
    inputs = _fixed_batch(engine, 4)
    cond = {"crossattn": inputs[3][0], "vector": inputs[3][1]}
    per_sample = engine.loss_fn(engine.model, engine.denoiser, cond, *inputs[:3]).asnumpy()
    loss, loss_instance, loss_class = (o.asnumpy() for o in DreamBoothLoss(engine, 0.7, True)(*inputs))
    np.testing.assert_allclose(loss_instance, per_sample[:2].mean(), rtol=1e-6)
    np.testing.assert_allclose(loss_class, per_sample[2:].mean(), rtol=1e-6)
    np.testing.assert_allclose(loss, per_sample[:2].mean() + 0.7 * per_sample[2:].mean(), rtol=1e-6)
    no_prior = DreamBoothLoss(engine, 0.7, False)(*inputs)[0].asnumpy()
    np.testing.assert_allclose(no_prior, per_sample.mean(), rtol=1e-6)


def test_loss_falls_when_overfitting_and_only_lora_changes(workspace):
    engine = _tiny_engine_with_weights(workspace)
    inputs = _fixed_batch(engine, 2)
    params = [p for _, p in sorted(lora_parameters(engine).items())]
    base_before = {n: p.asnumpy().copy() for n, p in engine.parameters_and_names() if ".lora_" not in n}
    buffers = make_buffers(params)
    grad_step = GradStep(DreamBoothLoss(engine, 1.0, True), params, buffers)
    apply_step = ApplyStep(buffers, AdamW(params, learning_rate=2e-2), 1, True, 1.0)
    scale = ms.Tensor(1.0, ms.float32)
    losses = []
    for _ in range(6):
        loss, _, _, finite = grad_step(*inputs, scale, ONE)
        assert bool(finite.asnumpy())
        apply_step()
        losses.append(float(loss.asnumpy()))
    assert losses[-1] < 0.7 * losses[0], losses
    for name, param in engine.parameters_and_names():
        if ".lora_" not in name:
            np.testing.assert_array_equal(param.asnumpy(), base_before[name], err_msg=name)


def test_gradient_accumulation_equals_the_large_batch_and_loss_scale_cancels(workspace):
    """Two micro-batches of one sample accumulate to the gradient of the mean over both;
    a loss scale of 1024 changes nothing (the loss is scaled and unscaled exactly once)."""
    engine = _tiny_engine_with_weights(workspace)
    inputs = _fixed_batch(engine, 2)
    params = [p for _, p in sorted(lora_parameters(engine).items())]
    buffers = make_buffers(params)
    no_prior = DreamBoothLoss(engine, 1.0, False)
    grad_step = GradStep(no_prior, params, buffers)
    grad_step(*inputs, ms.Tensor(1024.0, ms.float32), ONE)
    whole = [b.asnumpy().copy() for b in buffers]
    for b in buffers:
        b.set_data(ms.ops.zeros_like(b))
    for i in range(2):
        latents, noise, sigmas, (crossattn, vector) = inputs
        grad_step(latents[i:i + 1], noise[i:i + 1], sigmas[i:i + 1], (crossattn[i:i + 1], vector[i:i + 1]), ONE, ONE)
    for accumulated, full in zip(buffers, whole):
        np.testing.assert_allclose(accumulated.asnumpy() / 2, full, rtol=1e-4, atol=1e-4 * np.abs(full).max())


def test_split_prior_batch_accumulates_the_gradient_of_the_prior_preservation_loss(workspace):
    """split_prior_batch: the instance rows, then the class rows weighted by prior_loss_weight, each through the
    loss without prior preservation, add up to the gradient and loss of instance + 0.7 * class in one pass."""
    engine = _tiny_engine_with_weights(workspace)
    inputs = _fixed_batch(engine, 4)  # 2 instance rows, then 2 class rows
    params = [p for _, p in sorted(lora_parameters(engine).items())]
    buffers = make_buffers(params)
    loss, loss_instance, loss_class, _ = GradStep(DreamBoothLoss(engine, 0.7, True), params, buffers)(*inputs, ONE, ONE)
    whole = buffers[0].asnumpy().copy()
    buffers[0].set_data(ms.ops.zeros_like(buffers[0]))
    passes = prior_passes(2, True, True, 0.7)
    assert [(rows.start, rows.stop, weight) for rows, weight in passes] == [(0, 2, 1.0), (2, 4, 0.7)]
    split_step = GradStep(DreamBoothLoss(engine, 0.7, False), params, buffers)
    latents, noise, sigmas, (crossattn, vector) = inputs
    outputs = [split_step(latents[rows], noise[rows], sigmas[rows], (crossattn[rows], vector[rows]), ONE, ms.Tensor(weight, ms.float32))
               for rows, weight in passes]
    np.testing.assert_allclose(outputs[0][1].asnumpy(), loss_instance.asnumpy(), rtol=1e-5)
    np.testing.assert_allclose(outputs[1][1].asnumpy(), loss_class.asnumpy(), rtol=1e-5)
    np.testing.assert_allclose(outputs[1][0].asnumpy(), 0.7 * loss_class.asnumpy(), rtol=1e-5)
    np.testing.assert_allclose(outputs[0][0].asnumpy() + outputs[1][0].asnumpy(), loss.asnumpy(), rtol=1e-5)
    assert np.abs(whole).max() > 0
    np.testing.assert_allclose(buffers[0].asnumpy(), whole, rtol=1e-4, atol=1e-4 * np.abs(whole).max())
    assert prior_passes(2, True, False, 0.7) == [(slice(0, 4), 1.0)]
    assert prior_passes(2, False, True, 0.7) == [(slice(0, 2), 1.0)]


def test_class_images_get_their_own_size_conditioning(tmp_path):
    (tmp_path / "inst").mkdir()
    (tmp_path / "cls").mkdir()
    Image.new("RGB", (100, 60), (200, 0, 0)).save(tmp_path / "inst" / "a.png")
    Image.new("RGB", (40, 90), (0, 0, 200)).save(tmp_path / "cls" / "b.png")
    dataset = DreamBoothDataset(tmp_path / "inst", "sks", 32, tmp_path / "cls", "cls", center_crop=True)
    batch = collate([dataset.examples(0, np.random.default_rng(0))])
    assert batch["txt"] == ["sks", "cls"]
    np.testing.assert_array_equal(batch["original_size_as_tuple"], [[60, 100], [90, 40]])  # (height, width) of each file
    np.testing.assert_array_equal(batch["target_size_as_tuple"], [[32, 32], [32, 32]])
    # centre crop after resizing the short side to 32: 60x100 -> 32x53 (left 10), 90x40 -> 72x32 (top 20)
    np.testing.assert_array_equal(batch["crop_coords_top_left"], [[0, 10], [20, 0]])
    assert batch["pixels"].shape == (2, 3, 32, 32)
    assert batch["pixels"][0, 0].mean() > 0.5 and batch["pixels"][1, 2].mean() > 0.5  # red instance, blue class


def test_image_modes_are_converted_and_corrupt_files_named(tmp_path):
    from mindbooth.images import load_rgb

    gray16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    gray16.save(tmp_path / "g16.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    rotated = Image.new("RGB", (8, 4), (0, 0, 0))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(tmp_path / "rot.jpg", exif=exif)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert np.asarray(load_rgb(tmp_path / "g16.png")).min() == 255
    assert tuple(np.asarray(load_rgb(tmp_path / "rgba.png"))[0, 0]) == (255, 255, 255)  # transparent -> white
    assert load_rgb(tmp_path / "cmyk.jpg").mode == "RGB" and np.asarray(load_rgb(tmp_path / "cmyk.jpg"))[0, 0, 0] > 200
    assert load_rgb(tmp_path / "rot.jpg").size == (4, 8)
    with pytest.raises(ValueError, match="broken.jpg"):
        load_rgb(tmp_path / "broken.jpg")


def test_dynamic_loss_scale_skips_overflowing_steps(workspace):
    """An overflowing scaled loss gives non-finite gradients: the step is reported, skipped, and the scale halves."""
    from mindbooth.train_step import DynamicLossScale

    engine = _tiny_engine_with_weights(workspace)
    inputs = _fixed_batch(engine, 2)
    params = [p for _, p in sorted(lora_parameters(engine).items())]
    grad_step = GradStep(DreamBoothLoss(engine, 1.0, True), params, make_buffers(params))
    scaler = DynamicLossScale(enabled=True, initial_scale=3.0e38, growth_interval=2)
    finite = bool(grad_step(*inputs, scaler.tensor(), ONE)[3].asnumpy())
    assert not finite
    assert scaler.update(finite) is False and scaler.skipped_steps == 1 and scaler.scale == 1.5e38
    scaler.scale = 1024.0
    finite = bool(grad_step(*inputs, scaler.tensor(), ONE)[3].asnumpy())
    assert finite and scaler.update(True) and scaler.update(True) and scaler.scale == 2048.0  # grows after 2 clean steps
    assert DynamicLossScale(enabled=False).scale == 1.0


def test_fp16_precision_follows_fp32_under_a_loss_scale(workspace):
    """train.precision fp16 computes the UNet in fp16 (LoRA weights and AdamW stay fp32): under a loss scale
    of 1024 the loss and the unscaled LoRA gradients follow the fp32 ones to fp16 rounding. With the plain backend
    (as on Ascend/GPU): the CPU backend's kernels compute in fp32 and the trainer refuses fp16 with them."""
    results = []
    for precision in ("fp32", "fp16"):
        engine = _tiny_engine_with_weights(workspace, backend="plain")
        if precision == "fp16":
            engine.model.to_float(ms.float16)  # what train_dreambooth does for precision: fp16
        inputs = _fixed_batch(engine, 2)
        params = [p for _, p in sorted(lora_parameters(engine).items())]
        buffers = make_buffers(params)
        loss, _, _, finite = GradStep(DreamBoothLoss(engine, 1.0, True), params, buffers)(*inputs, ms.Tensor(1024.0, ms.float32), ONE)
        assert bool(finite.asnumpy()) and all(b.dtype == ms.float32 for b in buffers)
        results.append((float(loss.asnumpy()), np.concatenate([b.asnumpy().ravel() for b in buffers])))
    (loss32, grads32), (loss16, grads16) = results
    assert abs(loss16 - loss32) < 2e-3 * abs(loss32)
    relative = np.linalg.norm(grads16 - grads32) / np.linalg.norm(grads32)
    assert relative < 0.15, relative  # measured 0.05: fp16 rounding, not a second (or missing) scaling by 1024


# ---- --train_text_encoder ------------------------------------------------------------------------------------

def _text_encoder_engine(workspace):
    config = load_config(workspace / "train.yaml")
    config.model.params.lora_config.text_encoder = True
    engine = instantiate_from_config(config.model)
    load_weights(engine, [str(workspace / "tiny.ckpt")])
    rng = np.random.default_rng(5)
    for name, param in lora_parameters(engine).items():
        param.set_data(ms.Tensor(rng.normal(0, 0.05, param.shape).astype(np.float32)))
    return engine


def _text_batch(engine):
    batch = {"txt": ["a photo of sks toy", "a photo of toy"], "original_size_as_tuple": [[32, 32], [40, 56]],
             "crop_coords_top_left": [[0, 0], [4, 0]], "target_size_as_tuple": [[32, 32]] * 2}
    rng = np.random.default_rng(7)
    latents = ms.Tensor(rng.standard_normal((2, 4, 4, 4)).astype(np.float32))
    noise = ms.Tensor(rng.standard_normal((2, 4, 4, 4)).astype(np.float32))
    return batch, latents, noise, ms.Tensor(np.array([0.7, 3.0], np.float32))


def test_text_encoder_loss_equals_precomputed_embeddings_and_its_gradient_is_the_finite_difference(workspace):
    """With --train_text_encoder the text encoders run inside the loss: the same loss as on precomputed
    embeddings, and the text-encoder LoRA gradient equals a central finite difference of that loss."""
    engine = _text_encoder_engine(workspace)
    batch, latents, noise, sigmas = _text_batch(engine)
    cond = engine.conditioner.encode(batch)
    inside = DreamBoothLoss(engine, 0.5, True, train_text_encoder=True)
    tokens = engine.conditioner.tokenize(batch)
    loss_inside = inside(latents, noise, sigmas, tokens)[0].asnumpy()
    loss_outside = DreamBoothLoss(engine, 0.5, True)(latents, noise, sigmas, (cond["crossattn"], cond["vector"]))[0].asnumpy()
    np.testing.assert_allclose(loss_inside, loss_outside, rtol=1e-6)

    lora = lora_parameters(engine)
    names = sorted(lora)
    params = [lora[n] for n in names]
    buffers = make_buffers(params)
    GradStep(inside, params, buffers)(latents, noise, sigmas, tokens, ONE, ONE)
    grads = dict(zip(names, buffered_gradients(buffers, params)))
    text_names = [n for n in names if n.startswith("conditioner.")]
    assert {n.split(".")[2] for n in text_names} == {"0", "1"}  # both encoders carry LoRA
    for name in ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.v_proj.lora_B.weight",
                 "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_lora.k_proj.lora_B.weight",
                 "conditioner.embedders.1.model.transformer.resblocks.1.attn.out_proj.lora_A.weight"):
        param, grad = lora[name], grads[name]
        index = np.unravel_index(np.abs(grad).argmax(), grad.shape)
        original = param.asnumpy()
        values = []
        for step in (1e-2, -1e-2):
            shifted = original.copy()
            shifted[index] += step
            param.set_data(ms.Tensor(shifted))
            values.append(float(inside(latents, noise, sigmas, tokens)[0].asnumpy()))
        param.set_data(ms.Tensor(original))
        finite_difference = (values[0] - values[1]) / 2e-2
        assert abs(grad[index]) > 1e-4, name
        np.testing.assert_allclose(grad[index], finite_difference, rtol=2e-2, err_msg=name)


def test_train_text_encoder_run_saves_and_reloads_text_lora(workspace):
    engine = _train(workspace, workspace / "run_text", "--total_step", "2", "--ms_mode", "0", "--train_text_encoder", "True",
                    "--text_encoder_lr", "5e-4", "--cache_latents", "True")
    run = workspace / "run_text"
    assert all(np.isfinite(_losses(run))) and len(_losses(run)) == 2
    assert load_config(run / "config.yaml").optim.text_encoder_learning_rate == 5e-4
    with open(run / "loss.csv") as handle:  # token ids and sizes are step inputs, not graph constants
        assert [int(row["compiled_step_graphs"]) for row in csv.DictReader(handle)] == [1, 1]
    assert engine.conditioner is not None and not hasattr(engine.first_stage_model, "encoder")  # only the VAE encoder freed
    lora = _lora(run / "SDXL-tiny_2_lora.ckpt")
    text = {k: v for k, v in lora.items() if k.startswith("conditioner.")}
    assert text and set(k for k in lora if ".lora_" in k) == set(lora_parameters(engine))
    assert max(np.abs(v).max() for k, v in text.items() if ".lora_B." in k) > 0  # the text-encoder LoRA trained
    base = read_checkpoint(workspace / "tiny.ckpt")
    for name, param in engine.parameters_and_names():
        if ".lora_" not in name:
            np.testing.assert_array_equal(param.asnumpy(), base[name].asnumpy(), err_msg=name)

    # An inference model (no lora_config) given base + this file gets both LoRAs: same text embeddings, same UNet LoRA.
    config = load_config(workspace / "train.yaml")
    del config.model.params["lora_config"]
    reloaded = instantiate_from_config(config.model)
    load_weights(reloaded, [str(workspace / "tiny.ckpt"), str(run / "SDXL-tiny_2_lora.ckpt")])
    assert set(lora_parameters(reloaded)) == set(lora_parameters(engine))
    batch = {"txt": ["a photo of sks toy"], "original_size_as_tuple": [[32, 32]], "crop_coords_top_left": [[0, 0]],
             "target_size_as_tuple": [[32, 32]]}
    for key, value in engine.conditioner.encode(batch).items():
        np.testing.assert_allclose(reloaded.conditioner.encode(batch)[key].asnumpy(), value.asnumpy(), rtol=1e-6, atol=1e-6)


# ---- runs on disk: a run reads and deletes only inside its own folder ------------------------------------------

def _state_on_disk(run, monkeypatch, max_num_ckpt=2):
    """A TrainingState of `run` whose LoRA and optimizer files are a few bytes (what pruning and finding states
    read are the paths, not the weights): no model."""
    from types import SimpleNamespace

    from mindbooth import training_state
    from mindbooth.data import BatchSampler
    from mindbooth.train_step import DynamicLossScale

    def write(path, data):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    monkeypatch.setattr(training_state, "save_lora", lambda engine, path, rank, alpha: write(path, b"lora"))
    monkeypatch.setattr(training_state, "save_checkpoint_atomic", lambda params, path: write(path, b"adam"))
    return training_state.TrainingState(run, None, SimpleNamespace(state=dict), BatchSampler(3, 1, 0), np.random.default_rng(0),
                                        DynamicLossScale(False), 4, 4.0, max_num_ckpt)


def test_a_copied_run_prunes_only_its_own_checkpoints(tmp_path, monkeypatch):
    """cp -a RUN COPY, then COPY trains on: pruning old checkpoints (max_num_ckpt) deletes COPY's files, never RUN's,
    also for a state written before paths were stored relative to the run (absolute paths into RUN)."""
    import json
    import shutil

    run, copy = tmp_path / "run", tmp_path / "copy"
    for step in (2, 4):
        _state_on_disk(run, monkeypatch).save(step, "SDXL-tiny")
    record = json.loads((run / "state" / "step_2.json").read_text())  # the old format: absolute paths
    record.update(lora=str((run / record["lora"]).absolute()), optimizer=str((run / record["optimizer"]).absolute()))
    (run / "state" / "step_2.json").write_text(json.dumps(record))
    shutil.copytree(run, copy, symlinks=True)
    original = sorted(p.relative_to(run) for p in run.rglob("*"))
    _state_on_disk(copy, monkeypatch).save(6, "SDXL-tiny")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == original
    assert not (copy / "SDXL-tiny_2_lora.ckpt").exists() and not (copy / "state" / "step_2_optimizer.ckpt").exists()
    assert (copy / "SDXL-tiny_6_lora.ckpt").is_file() and (copy / "SDXL-tiny_4_lora.ckpt").is_file()


def test_a_moved_run_with_a_relative_save_path_resumes_from_elsewhere(tmp_path, monkeypatch):
    """A run saved under a relative --save_path, then moved, is found complete from another working directory."""
    from mindbooth.training_state import complete_states

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    _state_on_disk(Path("runs/a"), monkeypatch).save(2, "SDXL-tiny")
    (tmp_path / "runs" / "a").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert [step for step, _, _ in complete_states(tmp_path / "moved")] == [2]
    assert _state_on_disk(tmp_path / "moved", monkeypatch).latest_lora_path() == tmp_path / "moved" / "SDXL-tiny_2_lora.ckpt"


def _effective_config(workspace, save_path):
    """The config.yaml a run of `_train(workspace, save_path)` saves."""
    from mindbooth.config import load_training_config, training_parser

    args = training_parser().parse_args(["--config", str(workspace / "train.yaml"), "--instance_data_path", str(workspace / "subject"),
                                         "--instance_prompt", "a photo of sks toy", "--class_data_path", str(workspace / "class"),
                                         "--class_prompt", "a photo of toy", "--num_class_images", "3", "--save_path", str(save_path),
                                         "--save_ckpt_interval", "2"])
    return load_training_config(args)


@pytest.fixture
def no_model(monkeypatch):
    """Building a model or compiling the step fails the test: bad input must be refused before either."""
    from mindbooth import step_graphs, training

    def refuse(*_, **__):
        raise AssertionError("a model was built or compiled before the input was checked")

    monkeypatch.setattr(training, "instantiate_from_config", refuse)
    monkeypatch.setattr(step_graphs, "step_graphs_in_child", refuse)


def _one_line_error(workspace, save_path, *extra) -> str:
    with pytest.raises(SystemExit) as error:
        _train(workspace, save_path, *extra)
    text = str(error.value.code)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


def test_resume_checks_the_run_and_its_settings_before_it_writes(workspace, tmp_path, monkeypatch, no_model):
    """--resume refuses a folder that is not a run and flags that change what the run trains (naming each),
    before it writes anything: the run's config.yaml stays as it was, no folder is created."""
    run = tmp_path / "run"
    run.mkdir()
    OmegaConf.save(_effective_config(workspace, run), run / "config.yaml")
    saved = (run / "config.yaml").read_bytes()
    assert "nothing to resume" in _one_line_error(workspace, run, "--resume", str(run))  # no training state yet
    _state_on_disk(run, monkeypatch).save(2, "SDXL-tiny")
    message = _one_line_error(workspace, run, "--resume", str(run), "--lora_rank", "8", "--learning_rate", "0.5")
    assert "--lora_rank is 8, the run has 4" in message and "--learning_rate is 0.5, the run has 0.001" in message
    assert (run / "config.yaml").read_bytes() == saved
    monkeypatch.chdir(tmp_path)
    assert "no such folder" in _one_line_error(workspace, tmp_path / "Falsy", "--resume", "Falsy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("extra, message", [
    (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["--lora_alpha", "inf"], "--lora_alpha must be a finite number, got inf"),
    (["--prior_loss_weight", "-1"], "--prior_loss_weight must be at least 0, got -1"),
    (["--per_batch_size", "0"], "--per_batch_size must be at least 1, got 0"),
    (["--save_ckpt_interval", "0"], "--save_ckpt_interval must be at least 1, got 0"),
    (["--log_interval", "0"], "--log_interval must be at least 1, got 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
    (["--total_step", "0"], "--total_step must be at least 1, got 0"),
    (["--total_step", "-5"], "--total_step must be at least 1, got -5"),
    (["--resolution", "0"], "--resolution must be at least 1, got 0"),
    (["--resolution", "63"], "--resolution must be a multiple of 32 for this model, got 63"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--lora_rank", "0"], "--lora_rank must be at least 1, got 0"),
    (["--backend", "gpu"], "--backend must be one of auto, plain, cpu, got 'gpu'"),
    (["--save_path", "{tmp}/a_file"], "exists and is not a folder"),
    (["--save_path", "/proc/mindbooth/run"], "cannot be written"),
    (["--instance_data_path", "{tmp}/missing"], "--instance_data_path {tmp}/missing: no such folder"),
    (["--instance_data_path", "{tmp}/empty"], "--instance_data_path {tmp}/empty holds no images"),
    (["--instance_data_path", "{tmp}/broken"], "cannot read image {tmp}/broken/x.png"),
    (["--class_data_path", "{tmp}/empty", "--num_class_images", "0"], "holds no images and --num_class_images is 0"),
    (["--weight", "{tmp}/missing.ckpt"], "weight file not found: {tmp}/missing.ckpt"),
    (["--weight", "{tmp}/a_file"], "cannot read weights from {tmp}/a_file"),
    (["--config", "{tmp}/missing.yaml"], "--config {tmp}/missing.yaml: no such file"),
    (["--config", "{tmp}/bad.yaml"], "is not valid YAML"),
    (["--config", "{tmp}/empty.yaml"], "holds no settings"),
    (["--config", "{tmp}/scalar.yaml"], "holds no settings"),
])
def test_bad_input_is_one_line_before_any_work(workspace, tmp_path, monkeypatch, no_model, extra, message):
    """Each bad input: one line naming what to fix, before a model is built or anything written (the working
    directory too: MindSpore's analyze_fail.ir came from compiling a bad shape)."""
    (tmp_path / "a_file").write_text("not a folder, not weights")
    for folder in ("empty", "broken"):
        (tmp_path / folder).mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "scalar.yaml").write_text("42\n")
    inputs = sorted(tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    text = _one_line_error(workspace, tmp_path / "run", *[e.format(tmp=tmp_path) for e in extra])
    assert message.format(tmp=tmp_path) in text
    assert sorted(tmp_path.iterdir()) == inputs


def test_skipped_files_and_long_prompts_are_noted(tmp_path, capsys):
    """Files of a type not read (.gif) are named, and a prompt longer than the text encoders read says how many
    tokens it loses."""
    from mindbooth.validation import check_image_folder, prompt_token_notes

    tmp_path.joinpath("subject").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "subject" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "subject" / "b.gif")
    assert [p.name for p in check_image_folder(tmp_path / "subject", "--instance_data_path", True)] == ["a.png"]
    note = capsys.readouterr().out
    assert "1 file(s) skipped" in note and "b.gif" in note
    notes = prompt_token_notes({"--instance_prompt": "red " * 100, "--class_prompt": "a photo of toy"})
    assert len(notes) == 1 and "--instance_prompt" in notes[0] and "last 25 token(s) are dropped" in notes[0]  # 100 + BOS + EOS - 77


def test_a_lora_rank_too_large_for_a_layer_names_the_flag():
    from mindbooth.validation import model_error

    message = model_error(ValueError("LoRA rank must be in 1..32 for a 32->64 layer, got 40"), "train.yaml")
    assert message.startswith("--lora_rank: LoRA rank must be in 1..32")


def test_temporary_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    """atomic_write's temporary file carries its process id: a run killed while saving leaves it (a 0-byte
    .loss.png.tmp.* was seen), and the next run removes it, but never one that a live process is writing."""
    import subprocess
    import sys

    from mindbooth.images import atomic_write, remove_stale_temporaries

    seen = []
    atomic_write(tmp_path / "loss.png", lambda temporary: seen.append(Path(temporary).name) or Path(temporary).write_text("x"))
    assert seen[0].startswith(f".loss.png.tmp.{os.getpid()}.") and seen[0].endswith(".png")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    (tmp_path / "state").mkdir()
    stale = [tmp_path / f".loss.png.tmp.{dead}.k2j4.png", tmp_path / "state" / f".step_2.json.tmp.{dead}.a8x1.json"]
    live = tmp_path / f".loss.png.tmp.{os.getpid()}.q9w3.png"
    for path in (*stale, live):
        path.write_bytes(b"")
    assert remove_stale_temporaries(tmp_path, tmp_path / "state", tmp_path / "not_there") == 2
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [live.name, "loss.png", "state"]


def test_importing_the_trainer_imports_no_mindspore_and_changes_nothing():
    """Under mpirun's variables, with flags on which the script's __main__ sets MindSpore's cluster variables and
    starts a scheduler, importing train_dreambooth does neither and imports no MindSpore: that is __main__'s work."""
    code = ("import os, sys; before = dict(os.environ); "
            "sys.argv[1:] = ['--is_parallel', 'True', '--device_target', 'CPU', '--allocator', 'mimalloc']; "
            "import train_dreambooth; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mindspore'), dict(os.environ) == before)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MS_", "OMPI_"))}
    env.update(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="2")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["[]", "True"]
