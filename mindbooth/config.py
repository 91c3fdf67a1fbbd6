"""Training configuration: the YAML holds everything; a command-line flag, when given, overrides it."""
import argparse
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

ALLOCATORS = ("mimalloc", "system")  # --allocator (mindbooth/allocator.py)


def str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes", "y"):
        return True
    if value.lower() in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def early_flags(argv=None, **defaults) -> argparse.Namespace:
    """Flags a script must read before MindSpore is imported, before its full parser runs: each `name=default`
    (a bool default parses True/False) from argv (default sys.argv[1:]); every other flag is left alone."""
    parser = argparse.ArgumentParser(add_help=False)
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", default=default, type=str2bool if isinstance(default, bool) else str)
    return parser.parse_known_args(sys.argv[1:] if argv is None else argv)[0]


def add_allocator_flag(add_argument):
    """The `--allocator` flag of the trainer and the sampler (mindbooth/allocator.py reads it with early_flags)."""
    add_argument("--allocator", default="mimalloc", choices=ALLOCATORS,
                 help="CPU only: mimalloc (default: faster compiles, lower peak) or glibc's malloc (system)")


# flag -> (config path, type, help). MindONE's DreamBooth flags keep their meaning.
TRAIN_FLAGS = {
    "instance_data_path": ("dreambooth.instance_data_path", str, "folder with the subject's 3-10 photos"),
    "instance_prompt": ("dreambooth.instance_prompt", str, 'prompt with the rare token, e.g. "A photo of a sks dog"'),
    "class_data_path": ("dreambooth.class_data_path", str, "folder of class images (missing ones are sampled here)"),
    "class_prompt": ("dreambooth.class_prompt", str, 'prompt of the class, e.g. "A photo of a dog"'),
    "num_class_images": ("dreambooth.num_class_images", int, "class images wanted for prior preservation"),
    "prior_loss_weight": ("dreambooth.prior_loss_weight", float, "weight of the class (prior-preservation) loss"),
    "train_data_repeat": ("dreambooth.train_data_repeat", int, "repeats of the instance images per epoch"),
    "per_batch_size": ("train.per_batch_size", int, "instance images per micro-batch and device"),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", int, "micro-batches per optimizer step"),
    "split_prior_batch": ("train.split_prior_batch", str2bool,
                          "with prior preservation: run a micro-batch's instance and class rows as two passes "
                          "(the same gradients with the activations of half the rows)"),
    "gradient_checkpointing": ("train.gradient_checkpointing", str2bool,
                               "keep only each UNet transformer block's inputs and recompute its forward in the backward pass "
                               "(diffusers' option of that name: less memory, more time)"),
    "gradient_checkpointing_res_blocks": ("train.gradient_checkpointing_res_blocks", str2bool,
                                          "with --gradient_checkpointing: recompute the ResBlocks too (a little less "
                                          "memory, a longer step)"),
    "snr_gamma": ("model.params.loss_fn_config.params.snr_gamma", float,
                  "Min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is the paper's value): each sample's loss "
                  "times min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v)"),
    "clip_grad": ("train.clip_grad", str2bool, "clip gradients by global norm"),
    "max_grad_norm": ("train.max_grad_norm", float, "global-norm limit when clip_grad"),
    "total_step": ("train.total_step", int, "optimizer steps to train"),
    "learning_rate": ("optim.learning_rate", float, "AdamW learning rate"),
    "finetune": ("train.finetune", str,
                 "lora (default: LoRA layers on the frozen base) or full (the paper's DreamBooth: every UNet weight, and "
                 "with --train_text_encoder every text-encoder weight, trains; saves <version>_<step>_full.ckpt)"),
    "lora_rank": ("model.params.lora_config.rank", int, "LoRA rank"),
    "lora_alpha": ("model.params.lora_config.alpha", float, "LoRA alpha (scale = alpha / rank)"),
    "train_text_encoder": ("model.params.lora_config.text_encoder", str2bool,
                           "also train LoRA on both text encoders' attention q/k/v/out (as diffusers' --train_text_encoder)"),
    "text_encoder_lr": ("optim.text_encoder_learning_rate", float, "learning rate of the text-encoder LoRA (default: --learning_rate)"),
    "frozen_weight_dtype": ("model.params.frozen_weight_dtype", str,
                            "store the frozen UNet/VAE weights as float16 or bfloat16 (half their memory; compute stays fp32)"),
    "backend": ("model.params.backend", str,
                "how the model computes: auto (cpu where MindSpore runs on the CPU and the kernels build), plain "
                "(MindSpore's ops, any device) or cpu (MindBooth's CPU kernels)"),
    "cache_latents": ("data.cache_latents", str2bool,
                      "encode images (and prompts, unless training the text encoders) once, then free the encoders"),
    "pre_compute_text_embeddings": ("data.pre_compute_text_embeddings", str2bool,
                                    "DeepFloyd IF: encode every prompt of the run with T5 built alone, free it, then build "
                                    "the UNet (T5-XXL never sits next to the training)"),
    "seed": ("train.seed", int, "random seed"),
    "save_path": ("train.save_path", str, "output folder"),
    "save_ckpt_interval": ("train.save_ckpt_interval", int, "save the LoRA every N steps"),
    "max_num_ckpt": ("train.max_num_ckpt", int, "keep at most N LoRA checkpoints (oldest removed)"),
    "log_interval": ("train.log_interval", int, "log every N steps"),
    "infer_during_train": ("train.infer_during_train", str2bool, "write a validation grid during training"),
    "infer_interval": ("train.infer_interval", int, "steps between validation grids"),
    "resolution": ("data.resolution", int, "training image size"),
    "aspect_ratio_buckets": ("train.aspect_ratio_buckets", str2bool,
                             "train each image at the SDXL aspect-ratio bucket nearest its own aspect (scaled to --resolution) "
                             "instead of a square crop; a batch holds one bucket"),
    "compile_in_child": ("train.compile_in_child", str2bool,
                         "CPU, GRAPH mode: compile the train step in a child process and load it from the compile cache "
                         "(a lower peak: the compiler's leftovers leave with the child)"),
}


def training_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="DreamBooth fine-tuning (LoRA or full) of SDXL, SSD-1B, SD 1.5 and SD 2.1 with prior preservation.")
    parser.add_argument("--config", required=True, help="training YAML (model, dreambooth, data, optim, train)")
    parser.add_argument("--weight", default="", help="base weights .ckpt[,LoRA .ckpt to start from]")
    parser.add_argument("--ms_mode", type=int, default=0, help="0: GRAPH_MODE (fast), 1: PYNATIVE_MODE")
    parser.add_argument("--jit_level", default="O0", choices=["O0", "O1", "O2"], help="GRAPH_MODE optimisation level")
    parser.add_argument("--device_target", default="Ascend", choices=["Ascend", "GPU", "CPU"])
    parser.add_argument("--is_parallel", type=str2bool, default=False, help="data parallel over all launched processes")
    add_allocator_flag(parser.add_argument)
    parser.add_argument("--resume", default="", help="output folder (or True for --save_path) of a run to continue")
    for flag, (_, kind, help_text) in TRAIN_FLAGS.items():
        parser.add_argument(f"--{flag}", type=kind, default=None, help=help_text)
    return parser


def load_config(path):
    """A training or inference YAML. A top-level `base: <path relative to this file>` names a YAML this one
    overrides: the base is loaded (with its own base, if any) and this file's entries are merged over it.
    The result has no `base` key. A missing file or base, or a cycle of bases, is a one-line error."""
    return _load_over_bases(Path(path), ())


def _load_over_bases(path: Path, chain: tuple):
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}" if not chain else f"{chain[-1]} names base {path}, which is not a file")
    if path.resolve() in (p.resolve() for p in chain):
        raise ValueError(f"config bases form a cycle: {' -> '.join(str(p) for p in (*chain, path))}")
    config = OmegaConf.load(path)
    base = config.pop("base", None) if isinstance(config, DictConfig) else None
    if base is None:
        return config
    if not isinstance(base, str):
        raise ValueError(f"{path}: `base` must be the path of a YAML file, got {base!r}")
    return OmegaConf.merge(_load_over_bases(path.parent / base, (*chain, path)), config)


TRAINING_SECTIONS = ("model", "dreambooth", "data", "optim", "train")


def load_training_config(args):
    """The training YAML (`--config`) with the flags that were given written over it; a missing or unreadable
    YAML is a UsageError (mindbooth/validation.py)."""
    from mindbooth.validation import load_yaml_config

    config = load_yaml_config(args.config, "--config", TRAINING_SECTIONS)
    for flag, (path, _, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            OmegaConf.update(config, path, value, force_add=True)
    return config
