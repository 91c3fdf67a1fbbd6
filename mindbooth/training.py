"""The phases of a DreamBooth-LoRA training run, in the order train_dreambooth.py's main() calls them.

Each phase takes what it needs as arguments and returns what later phases use; `Run` is the checked command
line. Importing this module imports MindSpore: train_dreambooth.py imports it only after its `__main__` has set up
the allocator and mpirun's environment.
"""
import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import mindspore as ms
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from gm.modules.lora import lora_parameters, new_lora_init
from gm.util import instantiate_from_config
from mindbooth import checkpoint as ckpt
from mindbooth import finetune
from mindbooth.buckets import bucket_sizes, class_image_sizes, image_buckets
from mindbooth.class_images import missing_class_image_names, sample_class_images
from mindbooth.compile_cache import precompile_folder
from mindbooth.config import load_training_config, training_parser
from mindbooth.context_projections import ContextProjections
from mindbooth.data import DreamBoothDataset, instance_prompts
from mindbooth.distributed import Distributed
from mindbooth.images import list_images, make_grid, remove_stale_temporaries, save_image_atomic
from mindbooth.optim import AdamW, AdamWPerParameter
from mindbooth.progress_log import LossLog
from mindbooth.text_embeddings import encode_alone
from mindbooth.sampling_model import size_multiple
from mindbooth.train_step import (ApplyStep, DreamBoothLoss, DynamicLossScale, FusedStep, GradStep, make_buffers,
                                  prior_passes, step_input_shapes)
from mindbooth.training_data import TrainingData, pass_inputs
from mindbooth.training_state import TrainingState, learning_rate_at
from mindbooth.validation import UsageError, check_training_run, model_error, prior_preservation, run_folder


def fail(message: str):
    sys.exit(f"error: {message}")


@dataclass
class Run:
    """A checked command line: its flags, the effective config (YAML + flags), the weight files, the run folder."""
    args: argparse.Namespace
    config: DictConfig
    weights: list
    save_path: Path
    resuming: bool
    with_prior: bool  # prior preservation: a class folder and a positive prior_loss_weight

    @property
    def seed(self) -> int:
        return int(self.config.train.seed)

    @property
    def resolution(self) -> int:
        return int(self.config.data.resolution)

    @property
    def buckets(self):
        """With --aspect_ratio_buckets: the (height, width) buckets at the training resolution (mindbooth/buckets.py); else None."""
        if not bool(self.config.train.get("aspect_ratio_buckets", False)):
            return None
        return bucket_sizes(self.resolution, size_multiple(self.config))

    @property
    def validation_prompts(self) -> list:
        return list(self.config.train.get("validation_prompts", []) or [self.config.dreambooth.instance_prompt])

    @property
    def final_prompt(self) -> str:
        return self.config.train.get("final_sample_prompt") or self.config.dreambooth.instance_prompt


def parse_and_check(argv=None) -> Run:
    """The flags, the config and every input the run reads, checked before any work (mindbooth/validation.py);
    a bad one ends the process with one line `error: ...`."""
    args = training_parser().parse_args(argv)
    weights = [w for w in args.weight.split(",") if w]
    try:
        config = load_training_config(args)
        folder, resuming = run_folder(args, config)
        finetune.check_finetune(config, weights, folder if resuming else None)
        if resuming:
            finetune.align_with_resumed_run(config, folder)
        save_path, resuming = check_training_run(args, config, weights)
    except UsageError as error:
        fail(str(error))
    return Run(args, config, weights, save_path, resuming, prior_preservation(config))


def set_up_runtime(run: Run) -> Distributed:
    """MindSpore's mode, device and seed, the data-parallel ranks; rank 0 prepares the run folder (not in the
    compile child): what a run killed while saving left is removed, the effective config is written."""
    args = run.args
    ms.set_context(mode=ms.GRAPH_MODE if args.ms_mode == 0 else ms.PYNATIVE_MODE, jit_config={"jit_level": args.jit_level})
    ms.set_device(args.device_target)
    dist = Distributed(args.is_parallel, args.device_target)
    ms.set_seed(run.seed)
    if dist.is_main and precompile_folder() is None:
        run.save_path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run.save_path, run.save_path / "state",
                                 *([run.config.dreambooth.class_data_path] if run.with_prior else []))
        OmegaConf.save(run.config, run.save_path / "config.yaml")
    return dist


def loss_passes(run: Run) -> list:
    """The GradStep calls of a micro-batch as (rows, loss_weight) (prior_passes): a batch item is its instance
    example, then its class example; with split_prior_batch each part is its own pass."""
    db, train_cfg = run.config.dreambooth, run.config.train
    return prior_passes(int(train_cfg.per_batch_size), run.with_prior, bool(train_cfg.get("split_prior_batch", False)),
                        float(db.get("prior_loss_weight", 1.0)))


def step_shapes(run: Run, passes) -> dict:
    """The shapes of one pass's GradStep inputs (step_input_shapes)."""
    rows = passes[0][0].stop - passes[0][0].start
    return step_input_shapes(run.config.model.params, rows, run.resolution)


def precomputes_text(run: Run) -> bool:
    """--pre_compute_text_embeddings: the text encoder encodes the run's prompts and is freed before the model is built."""
    return bool(run.config.data.get("pre_compute_text_embeddings", False))


def precompute_text_embeddings(run: Run) -> dict:
    """With --pre_compute_text_embeddings: every prompt the run uses (the instance images' prompts, the class prompt,
    the validation and final prompts, the empty negative prompt) encoded by the text encoder built alone and freed
    (mindbooth/text_embeddings.py); else None."""
    if not precomputes_text(run):
        return None
    db = run.config.dreambooth
    prompts = [*instance_prompts(db.instance_data_path, db.instance_prompt), *([db.class_prompt] if run.with_prior else []),
               *run.validation_prompts, run.final_prompt, ""]
    return encode_alone(run.config.model.params.conditioner_config, run.weights[0], prompts)


def load_model(run: Run):
    """(engine, its trained parameters by name): the model built from the config with the base weights (without its
    text encoder with --pre_compute_text_embeddings). LoRA: its LoRA parameters (from a second weight file, if given;
    else a new LoRA, the same on every rank). --finetune full: no LoRA, every UNet parameter (and text-encoder
    parameter with --train_text_encoder)."""
    train_cfg = run.config.train
    model_config = finetune.model_config(run.config)
    if precomputes_text(run):
        model_config = OmegaConf.create(OmegaConf.to_container(model_config, resolve=False))
        model_config.params.conditioner_config = "__is_unconditional__"
    try:
        engine = instantiate_from_config(model_config)
    except ValueError as error:  # e.g. a LoRA rank larger than a layer
        fail(model_error(error, run.args.config))
    try:
        ckpt.load_weights(engine, run.weights, skip_prefixes=("conditioner.",) if precomputes_text(run) else ())
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    if finetune.is_full(run.config):
        if lora_parameters(engine):
            fail(f"--finetune full: {run.weights[0]} holds LoRA weights; give a base model without LoRA")
        engine.make_trainable(finetune.trainable_prefixes(run.config))
    # after make_trainable: which ResBlocks can be recomputed depends on whether their convolutions' weights train
    if bool(train_cfg.get("gradient_checkpointing", False)):  # less memory for one more forward's work
        engine.model.diffusion_model.enable_gradient_checkpointing(
            res_blocks=bool(train_cfg.get("gradient_checkpointing_res_blocks", False)))
    if finetune.is_full(run.config):
        return engine, {name: param for name, param in engine.parameters_and_names() if param.requires_grad}
    lora = lora_parameters(engine)
    lora_rng = np.random.default_rng(run.seed)
    if len(run.weights) < 2:
        for name, param in sorted(lora.items()):
            if ".lora_A." in name:
                param.set_data(new_lora_init(param.shape, lora_rng))
    return engine, lora


def context_projections(engine, passes, run: Run) -> list:
    """One ContextProjections per pass (each keeps the projections of its own rows' text), or None per pass when
    the text encoders train (the text context is then not fixed) or the UNet's own weights do (--finetune full: the
    cross-attention keys/values weights train). With frozen encoders and UNet the text is the cached embeddings of
    the instance and class prompts, so the frozen cross-attention keys/values of it are computed once."""
    unet = engine.model.diffusion_model
    # IF's UNet has no such cache: its text keys/values (add_k_proj/add_v_proj) carry LoRA and train
    fixed = not engine.trains_text_encoders and not finetune.is_full(run.config) and hasattr(unet, "context_projections")
    return [ContextProjections(unet) if fixed else None for _ in passes]


class Steps(NamedTuple):
    """The trained parameters' gradient buffer, AdamW, the gradient and optimizer steps (mindbooth/train_step.py) and
    the loss scale; or, fused (a FusedStep as `grad_step`), no buffer and no `apply_step`."""
    buffers: object
    optimizer: object  # AdamW, or AdamWPerParameter with a FusedStep
    grad_step: object  # GradStep, or FusedStep
    apply_step: object  # ApplyStep, or None with a FusedStep
    loss_scale: DynamicLossScale


def build_steps(engine, lora, run: Run, dist: Distributed, passes) -> Steps:
    """The training step for `lora` (a dict name -> parameter: the LoRA, or with --finetune full the UNet's and
    maybe the text encoders' weights), its loss with prior preservation unless the passes split the batch (each pass
    is then the mean over its rows, weighted by GradStep). precision fp16: the UNet computes in fp16, the trained
    weights (LoRA or, full, the UNet's fp32 master weights) and AdamW stay fp32, the loss scale guards overflow."""
    optim_cfg, train_cfg = run.config.optim, run.config.train
    names = sorted(lora)
    params = [lora[name] for name in names]
    # the text-encoder LoRA may train at its own rate (diffusers' --text_encoder_lr), under the same schedule
    text_encoder_lr = optim_cfg.get("text_encoder_learning_rate") or optim_cfg.learning_rate
    lr_scales = [float(text_encoder_lr) / float(optim_cfg.learning_rate) if name.startswith("conditioner.") else 1.0 for name in names]
    accumulation = int(train_cfg.get("gradient_accumulation_steps", 1))
    fp16 = str(train_cfg.get("precision", "fp32")) == "fp16"
    # A full fine-tune's gradient buffer is as large as the model: with nothing to accumulate, one graph needs none.
    # (Data parallel keeps the buffer: its all-reduce runs over the buffer's flat groups.)
    fused = finetune.is_full(run.config) and accumulation == 1 and len(passes) == 1 and not fp16 and dist.world_size == 1
    optimizer = (AdamWPerParameter if fused else AdamW)(
        params, learning_rate=float(optim_cfg.learning_rate), beta1=float(optim_cfg.get("beta1", 0.9)),
        beta2=float(optim_cfg.get("beta2", 0.999)), eps=float(optim_cfg.get("eps", 1e-8)),
        weight_decay=float(optim_cfg.get("weight_decay", 1e-2)), lr_scales=lr_scales)
    loss_net = DreamBoothLoss(engine, float(run.config.dreambooth.get("prior_loss_weight", 1.0)), run.with_prior and len(passes) == 1,
                              engine.trains_text_encoders)
    clip_grad, max_grad_norm = bool(train_cfg.get("clip_grad", False)), float(train_cfg.get("max_grad_norm", 1.0))
    if fused:
        grad_step, apply_step, buffers = FusedStep(loss_net, params, optimizer, clip_grad, max_grad_norm), None, None
    else:
        buffers = make_buffers(params)
        grad_step = GradStep(loss_net, params, buffers, dist.grad_reducer(buffers))
        apply_step = ApplyStep(buffers, optimizer, accumulation, clip_grad, max_grad_norm)
    if fp16:
        if engine.backend == "cpu":
            fail("train.precision fp16 is for Ascend/GPU: the CPU backend's kernels compute in fp32 "
                 "(set --backend plain to compute in fp16 on the CPU)")
        engine.model.to_float(ms.float16)
    return Steps(buffers, optimizer, grad_step, apply_step, DynamicLossScale(enabled=fp16))


def ensure_class_images(run: Run, dist: Distributed, text2image):
    """With prior preservation: rank 0 lists the class images missing from the class folder, all ranks sample
    their share of them, and all wait until they are written."""
    if not run.with_prior:
        return
    db = run.config.dreambooth
    names = missing_class_image_names(db.class_data_path, int(db.num_class_images), db.class_prompt) if dist.is_main else []
    names = dist.broadcast_names(names)
    if names:
        # with buckets, the new class images follow the instance images' buckets (class_image_sizes)
        sizes = class_image_sizes(image_buckets(list_images(db.instance_data_path), run.buckets), len(names)) if run.buckets else None
        sample_class_images(text2image, db.class_data_path, names, db.class_prompt, run.resolution, dict(db.get("class_sampling", {})),
                            run.seed, dist.rank, dist.world_size, show_progress=True, sizes=sizes)
    dist.barrier()


def build_data(run: Run, dist: Distributed, engine, text2image, text_embeddings: dict = None) -> TrainingData:
    """The training examples (mindbooth/training_data.py), their text from `text_embeddings` when it was encoded
    before the model was built. With cache_latents every item is encoded now, the sampling prompts' embeddings are
    cached too (frozen text encoders), and the encoders no longer needed are freed."""
    db, data_cfg = run.config.dreambooth, run.config.data
    train_text_encoder = engine.trains_text_encoders
    try:
        dataset = DreamBoothDataset(db.instance_data_path, db.instance_prompt, run.resolution,
                                    db.class_data_path if run.with_prior else None, db.get("class_prompt"),
                                    int(db.get("train_data_repeat", 1)), bool(data_cfg.get("center_crop", False)),
                                    bool(data_cfg.get("random_flip", False)), run.buckets)
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    if dataset.buckets and dist.is_main:
        used = {size: dataset.instance_sizes.count(size) for size in sorted(set(dataset.instance_sizes))}
        print(f"aspect-ratio buckets: {len(used)} of {len(dataset.buckets)} in use (height x width: instance images): "
              + ", ".join(f"{h}x{w}: {n}" for (h, w), n in used.items()))
    data = TrainingData(dataset, engine, int(run.config.train.per_batch_size), run.seed, dist.rank, dist.world_size,
                        run.with_prior, train_text_encoder, bool(data_cfg.get("cache_latents", False)), text_embeddings)
    if data.cache is not None:
        data.encode_all(show_progress=dist.is_main)
        if not train_text_encoder and text_embeddings is None:  # trained text encoders change the embeddings: they stay and run every step
            guidance = float(run.config.train.get("validation_sampling", {}).get("guidance_scale", 5.0))
            for prompts in (run.validation_prompts, [run.final_prompt]):
                text2image.cache_prompts(prompts, run.resolution, run.resolution, guidance)
        engine.free_encoders(text_encoders=not train_text_encoder)
    return data


def resume_or_start(run: Run, dist: Distributed, engine, steps: Steps, data: TrainingData):
    """(the training state that saves and restores the run, the step to start from): the last complete state's
    LoRA (or, --finetune full, trained weights), optimizer, data order and loss scale when resuming, else step 0."""
    lora_cfg = run.config.model.params.lora_config
    full = finetune.is_full(run.config)
    state = TrainingState(run.save_path, engine, steps.optimizer, data.sampler, data.rng, steps.loss_scale, int(lora_cfg.rank),
                          float(lora_cfg.get("alpha", lora_cfg.rank)), int(run.config.train.get("max_num_ckpt", 3)),
                          full_base=run.weights[0] if full else None,
                          trained=[n for n, p in engine.parameters_and_names() if p.requires_grad] if full else ())
    start_step = state.restore() if run.resuming else 0
    if run.resuming and dist.is_main:
        print(f"resuming {run.save_path} from step {start_step}")
    return state, start_step


def accumulate_gradients(steps: Steps, data: TrainingData, passes, projections, accumulation: int):
    """The gradients of `accumulation` micro-batches into the buffer; returns (the mean of their (loss,
    loss_instance, loss_class), whether every gradient was finite, and with a FusedStep, which has applied the step
    already, the gradient norm, else None)."""
    finite, losses, grad_norm = True, np.zeros(3), None
    for _ in range(accumulation):
        fields = data.next_batch()
        pass_losses = []  # (weighted loss, mean loss of the pass's rows, class loss) per pass
        for (rows, loss_weight), pass_projections in zip(passes, projections):
            outputs = steps.grad_step(*pass_inputs(fields, rows, pass_projections), steps.loss_scale.tensor(),
                                      ms.Tensor(loss_weight, ms.float32))
            pass_losses.append([float(o.asnumpy()) for o in outputs[:3]])
            finite = finite and bool(outputs[3].asnumpy())
            if len(outputs) > 4:
                grad_norm = float(outputs[4].asnumpy())
        if len(passes) > 1:  # (instance pass, class pass) -> (loss, loss_instance, loss_class)
            pass_losses = [[pass_losses[0][0] + pass_losses[1][0], pass_losses[0][1], pass_losses[1][1]]]
        losses += np.array(pass_losses[0]) / accumulation
    return losses, finite, grad_norm


def train_loop(run: Run, dist: Distributed, engine, steps: Steps, data: TrainingData, passes, projections, state: TrainingState,
               start_step: int, text2image):
    """The optimizer steps from `start_step` to total_step. Every rank applies or skips a step together (an fp16
    overflow skips it); rank 0 logs the global batch's loss, saves the training state every save_ckpt_interval
    and, with infer_during_train, a grid of the validation prompts every infer_interval."""
    train_cfg = run.config.train
    total_step, accumulation = int(train_cfg.total_step), int(train_cfg.get("gradient_accumulation_steps", 1))
    loss_scale = steps.loss_scale
    log = LossLog(run.save_path, start_step) if dist.is_main else None
    progress = tqdm(range(start_step, total_step), initial=start_step, total=total_step, desc="training", disable=not dist.is_main)
    engine.set_train(False)  # frozen base: no dropout; LoRA dropout is configured on the LoRA layers
    for step in progress:
        started = time.time()
        lr = learning_rate_at(step, run.config.optim)
        steps.optimizer.learning_rate.set_data(ms.Tensor(lr, ms.float32))
        losses, finite, fused_norm = accumulate_gradients(steps, data, passes, projections, accumulation)
        finite = dist.all_true(finite)  # apply or skip together: a rank's own scaled loss may overflow alone
        losses = dist.mean(losses)  # the global batch's loss (local batches are equal-sized)
        if not np.isfinite(losses).all() and not loss_scale.enabled:
            fail(f"loss became {losses[0]} at step {step + 1}: lower --learning_rate or enable --clip_grad")
        if steps.apply_step is None:  # the FusedStep applied the step, or skipped it (NaN norm)
            loss_scale.update(finite)
            grad_norm = fused_norm
        elif loss_scale.update(finite):
            grad_norm = float(steps.apply_step().asnumpy())
        else:  # fp16 overflow: drop this step's gradients, the scale was lowered
            for buffer in steps.buffers:
                buffer.set_data(ms.ops.zeros_like(buffer))
            grad_norm = float("nan")
        seconds = time.time() - started
        done = step + 1
        if dist.is_main:
            progress.set_postfix(loss=f"{losses[0]:.4f}", lr=f"{lr:.2e}", s_per_step=f"{seconds:.2f}")
            if done % int(train_cfg.get("log_interval", 1)) == 0 or done == total_step:
                log.append(step=done, loss=losses[0], loss_instance=losses[1], loss_class=losses[2], lr=lr, grad_norm=grad_norm,
                           seconds_per_step=round(seconds, 4), loss_scale=loss_scale.scale, skipped_steps=loss_scale.skipped_steps,
                           compiled_step_graphs=len(steps.grad_step.compile_cache))
            if done % int(train_cfg.save_ckpt_interval) == 0 or done == total_step:
                state.save(done, run.config.get("version", "SDXL"))
                log.plot()
            if train_cfg.get("infer_during_train", False) and done % int(train_cfg.infer_interval) == 0:
                write_grid(text2image, run.validation_prompts, run.save_path / f"validation_step{done:06d}.png", run)
    if dist.is_main and run.buckets and run.args.ms_mode == 0:
        print(f"step graphs compiled: {len(steps.grad_step.compile_cache)} gradient step graph(s), one per bucket shape trained on")


def save_final(run: Run, dist: Distributed, state: TrainingState, text2image):
    """Rank 0: a sample of the final prompt with the trained weights, and where the results are."""
    if not dist.is_main:
        return
    write_grid(text2image, [run.final_prompt], run.save_path / "sample_final.png", run)
    what = "model" if finetune.is_full(run.config) else "LoRA"
    print(f"done: {what} in {state.latest_weights_path()}, loss plot {run.save_path / 'loss.png'}, "
          f"sample {run.save_path / 'sample_final.png'}")


def write_grid(text2image, prompts, path, run: Run):
    """One image per prompt with the validation sampling settings, as a grid in `path`."""
    sampling = dict(run.config.train.get("validation_sampling", {}))
    images = text2image(prompts, width=run.resolution, height=run.resolution, num_steps=int(sampling.get("num_steps", 20)),
                        guidance_scale=float(sampling.get("guidance_scale", 5.0)), sampler=sampling.get("sampler", "EulerEDMSampler"),
                        seed=run.seed)
    save_image_atomic(make_grid(images, int(math.ceil(math.sqrt(len(images))))), path, overwrite=True)
