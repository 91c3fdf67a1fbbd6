"""DreamBooth-LoRA fine-tuning of SDXL with prior preservation (Ruiz et al., CVPR 2023), in MindSpore.

    python train_dreambooth.py --config configs/training/sd_xl_base_finetune_dreambooth_lora_910b.yaml \
        --weight checkpoints/sd_xl_base_1.0_ms.ckpt --instance_data_path DIR --instance_prompt "A photo of a sks dog" \
        --class_data_path DIR --class_prompt "A photo of a dog" --device_target Ascend

Data parallel over N processes (per_batch_size is per process; gradients are averaged; rank 0 writes):
    msrun --worker_num=N --local_worker_num=N --master_port=8118 --log_dir=logs --join=True train_dreambooth.py ... --is_parallel True
    mpirun -n N python train_dreambooth.py ... --is_parallel True

Phases: arguments, config and every input checked -> runtime -> model -> class images -> data -> optimizer -> training loop -> save.
"""
import math
import sys
import time

from mindbooth.allocator import preload_mimalloc
from mindbooth.distributed import setup_distributed_environment

if __name__ == "__main__":
    preload_mimalloc()  # on CPU: re-executes this script with mimalloc preloaded (mindbooth/allocator.py), first
setup_distributed_environment()  # before MindSpore is imported: mpirun's variables -> MindSpore's

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from gm.modules.lora import lora_parameters, new_lora_init  # noqa: E402
from gm.util import instantiate_from_config  # noqa: E402
from mindbooth import checkpoint as ckpt  # noqa: E402
from mindbooth.class_images import missing_class_image_names, sample_class_images  # noqa: E402
from mindbooth.compile_cache import precompile_folder  # noqa: E402
from mindbooth.config import load_training_config, training_parser  # noqa: E402
from mindbooth.context_projections import ContextProjections  # noqa: E402
from mindbooth.data import DreamBoothDataset  # noqa: E402
from mindbooth.distributed import Distributed  # noqa: E402
from mindbooth.images import make_grid, remove_stale_temporaries, save_image_atomic  # noqa: E402
from mindbooth.optim import AdamW  # noqa: E402
from mindbooth.pipeline import Text2Image  # noqa: E402
from mindbooth.progress_log import LossLog  # noqa: E402
from mindbooth.step_graphs import step_graphs_in_child, use_step_graphs  # noqa: E402
from mindbooth.train_step import (ApplyStep, DreamBoothLoss, DynamicLossScale, GradStep, make_buffers, prior_passes,  # noqa: E402
                                  step_input_shapes)
from mindbooth.training_data import TrainingData, pass_inputs  # noqa: E402
from mindbooth.training_state import TrainingState, learning_rate_at  # noqa: E402
from mindbooth.validation import UsageError, check_training_run, model_error, prior_preservation  # noqa: E402


def fail(message: str):
    sys.exit(f"error: {message}")


def main(argv=None):
    # ---- arguments, config and every input, checked before any work (mindbooth/validation.py) -----------------
    args = training_parser().parse_args(argv)
    weights = [w for w in args.weight.split(",") if w]
    try:
        config = load_training_config(args)
        save_path, resuming = check_training_run(args, config, weights)
    except UsageError as error:
        fail(str(error))
    db, data_cfg, optim_cfg, train_cfg = config.dreambooth, config.data, config.optim, config.train
    with_prior = prior_preservation(config)

    # ---- runtime ---------------------------------------------------------------------------------------------
    ms.set_context(mode=ms.GRAPH_MODE if args.ms_mode == 0 else ms.PYNATIVE_MODE, jit_config={"jit_level": args.jit_level})
    ms.set_device(args.device_target)
    dist = Distributed(args.is_parallel, args.device_target)
    seed = int(train_cfg.seed)
    ms.set_seed(seed)
    precompiling = precompile_folder() is not None  # this process is compile_in_child's child
    if dist.is_main and not precompiling:
        save_path.mkdir(parents=True, exist_ok=True)
        # what a run killed while saving left (its temporary files), in the run's folders and the class folder
        remove_stale_temporaries(save_path, save_path / "state", *([db.class_data_path] if with_prior else []))
        OmegaConf.save(config, save_path / "config.yaml")  # the effective config: YAML + flags
    # A batch item is its instance example, then its class example; with split_prior_batch each part is its own pass.
    passes = prior_passes(int(train_cfg.per_batch_size), with_prior, bool(train_cfg.get("split_prior_batch", False)),
                          float(db.get("prior_loss_weight", 1.0)))
    rows_per_pass = passes[0][0].stop - passes[0][0].start
    step_shapes = step_input_shapes(config.model.params, rows_per_pass, int(data_cfg.resolution))

    # ---- the step's graphs, compiled by a child that exits before this process builds its model ---------------
    # On CPU the compiler's leftovers would stay on top of the training peak (mindbooth/compile_cache.py).
    step_cache = precompile_folder() if precompiling else step_graphs_in_child(args, argv, config, weights, step_shapes, save_path, __file__)

    # ---- model -----------------------------------------------------------------------------------------------
    try:
        engine = instantiate_from_config(config.model)
    except ValueError as error:  # e.g. a LoRA rank larger than a layer
        fail(model_error(error, args.config))
    try:
        ckpt.load_weights(engine, weights)
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    if bool(train_cfg.get("gradient_checkpointing", False)):  # less memory for one more forward's work
        engine.model.diffusion_model.enable_gradient_checkpointing(
            res_blocks=bool(train_cfg.get("gradient_checkpointing_res_blocks", False)))
    lora = lora_parameters(engine)
    train_text_encoder = engine.has_text_encoder_lora  # lora_config.text_encoder / --train_text_encoder
    lora_rng = np.random.default_rng(seed)  # identical initial LoRA on every rank
    if len(weights) < 2:
        for name, param in sorted(lora.items()):
            if ".lora_A." in name:
                param.set_data(new_lora_init(param.shape, lora_rng))
    # The text context is fixed (cached embeddings of the instance and class prompts): the frozen cross-attention
    # keys/values of it are computed once, not in every step. Trained text encoders change it at every step.
    # One per pass: each keeps the projections of its own rows' text.
    context_projections = [None if train_text_encoder else ContextProjections(engine.model.diffusion_model) for _ in passes]
    one_loss_per_pass = len(passes) > 1  # split_prior_batch: each pass is the mean over its rows, weighted by GradStep
    if precompiling:  # the child: compile the step graphs into step_cache and exit
        if not train_text_encoder:  # (its conditioning is token ids, not the cached embeddings step_shapes describes)
            steps = build_steps(engine, config, lora, dist, with_prior and not one_loss_per_pass, train_text_encoder)
            use_step_graphs(step_cache, steps["grad_step"], steps["apply_step"], step_shapes, context_projections[0])
        return engine
    rank, alpha = int(config.model.params.lora_config.rank), float(config.model.params.lora_config.get("alpha", config.model.params.lora_config.rank))
    text2image = Text2Image(engine)

    # ---- class images (prior preservation) -------------------------------------------------------------------
    resolution = int(data_cfg.resolution)
    if with_prior:
        names = missing_class_image_names(db.class_data_path, int(db.num_class_images), db.class_prompt) if dist.is_main else []
        names = dist.broadcast_names(names)
        if names:
            sample_class_images(text2image, db.class_data_path, names, db.class_prompt, resolution, dict(db.get("class_sampling", {})),
                                seed, dist.rank, dist.world_size, show_progress=True)
        dist.barrier()

    # ---- data ------------------------------------------------------------------------------------------------
    try:
        dataset = DreamBoothDataset(db.instance_data_path, db.instance_prompt, resolution,
                                    db.class_data_path if with_prior else None, db.get("class_prompt"),
                                    int(db.get("train_data_repeat", 1)), bool(data_cfg.get("center_crop", False)),
                                    bool(data_cfg.get("random_flip", False)))
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    data = TrainingData(dataset, engine, int(train_cfg.per_batch_size), seed, dist.rank, dist.world_size, with_prior,
                        train_text_encoder, bool(data_cfg.get("cache_latents", False)))
    validation_prompts = list(train_cfg.get("validation_prompts", []) or [db.instance_prompt])
    if data.cache is not None:
        data.encode_all(show_progress=dist.is_main)
        if not train_text_encoder:  # trained text encoders change the embeddings: they stay and run every step
            sample_prompt = train_cfg.get("final_sample_prompt") or db.instance_prompt
            guidance = float(train_cfg.get("validation_sampling", {}).get("guidance_scale", 5.0))
            for prompts in (validation_prompts, [sample_prompt]):
                text2image.cache_prompts(prompts, resolution, resolution, guidance)
        engine.free_encoders(text_encoders=not train_text_encoder)  # what is no longer needed

    # ---- optimizer -------------------------------------------------------------------------------------------
    steps = build_steps(engine, config, lora, dist, with_prior and not one_loss_per_pass, train_text_encoder)
    buffers, optimizer, grad_step, apply_step = steps["buffers"], steps["optimizer"], steps["grad_step"], steps["apply_step"]
    accumulation = int(train_cfg.get("gradient_accumulation_steps", 1))
    loss_scale = DynamicLossScale(enabled=str(train_cfg.get("precision", "fp32")) == "fp16")
    if step_cache is not None and not train_text_encoder:
        use_step_graphs(step_cache, grad_step, apply_step, step_shapes, context_projections[0])  # loaded, not compiled
    state = TrainingState(save_path, engine, optimizer, data.sampler, data.rng, loss_scale, rank, alpha, int(train_cfg.get("max_num_ckpt", 3)))
    start_step = state.restore() if resuming else 0
    if resuming and dist.is_main:
        print(f"resuming {save_path} from step {start_step}")

    # ---- training loop ---------------------------------------------------------------------------------------
    total_step = int(train_cfg.total_step)
    log = LossLog(save_path, start_step) if dist.is_main else None
    progress = tqdm(range(start_step, total_step), initial=start_step, total=total_step, desc="training", disable=not dist.is_main)
    engine.set_train(False)  # frozen base: no dropout; LoRA dropout is configured on the LoRA layers
    for step in progress:
        started = time.time()
        lr = learning_rate_at(step, optim_cfg)
        optimizer.learning_rate.set_data(ms.Tensor(lr, ms.float32))
        finite, losses = True, np.zeros(3)
        for _ in range(accumulation):
            fields = data.next_batch()
            pass_losses = []  # (weighted loss, mean loss of the pass's rows, class loss) per pass
            for (rows, loss_weight), projections in zip(passes, context_projections):
                outputs = grad_step(*pass_inputs(fields, rows, projections), loss_scale.tensor(), ms.Tensor(loss_weight, ms.float32))
                pass_losses.append([float(o.asnumpy()) for o in outputs[:3]])
                finite = finite and bool(outputs[3].asnumpy())
            if one_loss_per_pass:  # (instance pass, class pass) -> (loss, loss_instance, loss_class)
                pass_losses = [[pass_losses[0][0] + pass_losses[1][0], pass_losses[0][1], pass_losses[1][1]]]
            losses += np.array(pass_losses[0]) / accumulation
        finite = dist.all_true(finite)  # apply or skip together: a rank's own scaled loss may overflow alone
        losses = dist.mean(losses)  # the global batch's loss (local batches are equal-sized)
        if not np.isfinite(losses).all() and not loss_scale.enabled:
            fail(f"loss became {losses[0]} at step {step + 1}: lower --learning_rate or enable --clip_grad")
        if loss_scale.update(finite):
            grad_norm = float(apply_step().asnumpy())
        else:  # fp16 overflow: drop this step's gradients, the scale was lowered
            buffers_zero(buffers)
            grad_norm = float("nan")
        seconds = time.time() - started
        done = step + 1
        if dist.is_main:
            progress.set_postfix(loss=f"{losses[0]:.4f}", lr=f"{lr:.2e}", s_per_step=f"{seconds:.2f}")
            if done % int(train_cfg.get("log_interval", 1)) == 0 or done == total_step:
                log.append(step=done, loss=losses[0], loss_instance=losses[1], loss_class=losses[2], lr=lr, grad_norm=grad_norm,
                           seconds_per_step=round(seconds, 4), loss_scale=loss_scale.scale, skipped_steps=loss_scale.skipped_steps,
                           compiled_step_graphs=len(grad_step.compile_cache))
            if done % int(train_cfg.save_ckpt_interval) == 0 or done == total_step:
                state.save(done, config.get("version", "SDXL"))
                log.plot()
            if train_cfg.get("infer_during_train", False) and done % int(train_cfg.infer_interval) == 0:
                write_grid(text2image, validation_prompts, save_path / f"validation_step{done:06d}.png", train_cfg, resolution, seed)

    # ---- save ------------------------------------------------------------------------------------------------
    if dist.is_main:
        sample_prompt = train_cfg.get("final_sample_prompt") or db.instance_prompt
        write_grid(text2image, [sample_prompt], save_path / "sample_final.png", train_cfg, resolution, seed)
        print(f"done: LoRA in {state.latest_lora_path()}, loss plot {save_path / 'loss.png'}, sample {save_path / 'sample_final.png'}")
    return engine


def build_steps(engine, config, lora, dist, with_prior, train_text_encoder) -> dict:
    """The LoRA's gradient buffers, AdamW, and the gradient and optimizer steps (mindbooth/train_step.py)."""
    optim_cfg, train_cfg = config.optim, config.train
    names = sorted(lora)
    params = [lora[name] for name in names]
    buffers = make_buffers(params)
    # the text-encoder LoRA may train at its own rate (diffusers' --text_encoder_lr), under the same schedule
    text_encoder_lr = optim_cfg.get("text_encoder_learning_rate") or optim_cfg.learning_rate
    lr_scales = [float(text_encoder_lr) / float(optim_cfg.learning_rate) if name.startswith("conditioner.") else 1.0 for name in names]
    optimizer = AdamW(params, learning_rate=float(optim_cfg.learning_rate), beta1=float(optim_cfg.get("beta1", 0.9)),
                      beta2=float(optim_cfg.get("beta2", 0.999)), eps=float(optim_cfg.get("eps", 1e-8)),
                      weight_decay=float(optim_cfg.get("weight_decay", 1e-2)), lr_scales=lr_scales)
    loss_net = DreamBoothLoss(engine, float(config.dreambooth.get("prior_loss_weight", 1.0)), with_prior, train_text_encoder)
    grad_step = GradStep(loss_net, params, buffers, dist.grad_reducer(buffers))
    apply_step = ApplyStep(buffers, optimizer, int(train_cfg.get("gradient_accumulation_steps", 1)),
                           bool(train_cfg.get("clip_grad", False)), float(train_cfg.get("max_grad_norm", 1.0)))
    # precision fp16: the UNet computes in fp16; LoRA weights and AdamW stay fp32; the loss scale guards overflow
    if str(train_cfg.get("precision", "fp32")) == "fp16":
        if engine.backend == "cpu":
            fail("train.precision fp16 is for Ascend/GPU: the CPU backend's kernels compute in fp32 "
                 "(set --backend plain to compute in fp16 on the CPU)")
        engine.model.to_float(ms.float16)
    return {"buffers": buffers, "optimizer": optimizer, "grad_step": grad_step, "apply_step": apply_step}


def buffers_zero(buffers):
    for buffer in buffers:
        buffer.set_data(ms.ops.zeros_like(buffer))


def write_grid(text2image, prompts, path, train_cfg, resolution, seed):
    sampling = dict(train_cfg.get("validation_sampling", {}))
    images = text2image(prompts, width=resolution, height=resolution, num_steps=int(sampling.get("num_steps", 20)),
                        guidance_scale=float(sampling.get("guidance_scale", 5.0)), sampler=sampling.get("sampler", "EulerEDMSampler"),
                        seed=seed)
    save_image_atomic(make_grid(images, int(math.ceil(math.sqrt(len(images))))), path, overwrite=True)


if __name__ == "__main__":
    main()
