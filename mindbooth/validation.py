"""Checks of every input before any work: a bad config, flag, folder, image or weight file is one line
(`UsageError`, which the scripts print as `error: ...`) within seconds, before a model is built, a graph is
compiled or anything is written. Nothing here builds a model or leaves a file (a folder's writability is tried with
an empty folder, removed at once)."""
import math
import os
import tempfile
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from mindbooth.images import IMAGE_SUFFIXES, list_images, load_rgb

PROMPT_TOKENS = 77  # the text encoders' context: BOS + 75 tokens + EOS; the rest of a prompt is cut


class UsageError(ValueError):
    """Bad input: reported as one line."""


def load_yaml_config(path, flag: str = "--config", sections=("model",)) -> DictConfig:
    """The YAML mapping at `path` (merged over its `base`, mindbooth.config.load_config), which must hold `sections`;
    a missing, unreadable, empty or scalar file, or a bad base, is a UsageError naming `flag`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file" if not path.exists() else f"{flag} {path} is not a file")
    from mindbooth.config import load_config

    try:
        if not isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict):  # empty, a scalar or a list
            raise UsageError(f"{flag} {path} holds no settings: expected a YAML mapping with {', '.join(sections)}")
        config = load_config(path)  # with the YAML it names as its `base`, if any
    except UsageError:
        raise
    except (FileNotFoundError, ValueError) as error:  # a missing base, a cycle of bases
        raise UsageError(f"{flag} {path}: {error}") from None
    except Exception as error:  # noqa: BLE001 - YAML syntax, encoding, ...: one line naming the file
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"{flag} {path} is not valid YAML: {first_line}") from None
    for section in sections:
        if not isinstance(config.get(section), DictConfig):
            raise UsageError(f"{flag} {path} has no '{section}' section")
    return config


def finite_float(value, name: str, minimum: float = None, above: float = None) -> float:
    """`value` as a finite float, at least `minimum` or greater than `above`; else a UsageError naming `name`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UsageError(f"{name} must be a finite number, got {value}")
    if minimum is not None and number < minimum:
        raise UsageError(f"{name} must be at least {minimum:g}, got {value}")
    if above is not None and number <= above:
        raise UsageError(f"{name} must be greater than {above:g}, got {value}")
    return number


def bounded_int(value, name: str, minimum: int = None, maximum: int = None) -> int:
    """`value` as an int in [minimum, maximum]; else a UsageError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise UsageError(f"{name} must be a whole number, got {value!r}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise UsageError(f"{name} must be at most {maximum}, got {number}")
    return number


def check_image_folder(folder, flag: str, must_have_images: bool) -> list:
    """The images in `folder` (`flag`'s value), each opened once so that an unreadable one is named now. A missing
    folder is an error when `must_have_images`, else fine (it is created later); files that are not read
    (other suffixes such as .gif) are listed in a note."""
    folder = Path(folder)
    if not folder.exists() and not must_have_images:
        return []
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder}: " + ("not a folder" if folder.exists() else "no such folder"))
    images = list_images(folder)
    skipped = sorted(p.name for p in folder.iterdir()
                     if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_SUFFIXES)
    if skipped:
        print(f"note: {flag} {folder}: {len(skipped)} file(s) skipped, not of an image type read here "
              f"({', '.join(sorted(IMAGE_SUFFIXES))}): {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    if must_have_images and not images:
        raise UsageError(f"{flag} {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); put 3-10 photos of "
                         "your subject there")
    for path in images:
        try:
            load_rgb(path)
        except ValueError as error:
            raise UsageError(f"{flag}: {error}") from None
    return images


def check_writable_folder(folder, flag: str):
    """`folder` is a folder, or can be created: its nearest existing parent is a folder where a subfolder can be
    made (tried with an empty one, removed at once; /proc and read-only places fail here)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} exists and is not a folder")
    parent = folder if folder.exists() else next((p for p in folder.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise UsageError(f"{flag} {folder} cannot be created: {parent} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".mindbooth-probe-"))
    except OSError as error:
        raise UsageError(f"{flag} {folder} cannot be written: {error.strerror} ({parent})") from None


def prompt_token_notes(prompts: dict) -> list:
    """A note for each {flag: prompt} longer than the text encoders read, saying how many tokens are dropped."""
    from gm.modules.embedders.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer(max_length=PROMPT_TOKENS)
    notes = []
    for flag, prompt in prompts.items():
        dropped = len(tokenizer.encode(prompt)) + 2 - PROMPT_TOKENS  # + BOS and EOS
        if prompt and dropped > 0:
            notes.append(f"note: {flag} is {dropped} token(s) longer than the {PROMPT_TOKENS} the text encoders read; "
                         f"its last {dropped} token(s) are dropped")
    return notes


# ---- training ---------------------------------------------------------------------------------------------------

# config path -> (kind, minimum, maximum or "above" for floats, default: None = required). Checked before any work.
TRAINING_NUMBERS = {
    "train.total_step": ("int", 1, None, None),
    "train.per_batch_size": ("int", 1, None, None),
    "train.gradient_accumulation_steps": ("int", 1, None, 1),
    "train.save_ckpt_interval": ("int", 1, None, None),
    "train.log_interval": ("int", 1, None, 1),
    "train.max_num_ckpt": ("int", 1, None, 3),
    "train.seed": ("int", 0, 2**32 - 1, None),
    "train.max_grad_norm": ("float", None, 0.0, 1.0),
    "dreambooth.num_class_images": ("int", 0, None, 0),
    "dreambooth.train_data_repeat": ("int", 1, None, 1),
    "dreambooth.prior_loss_weight": ("float", 0.0, None, 1.0),
    "data.resolution": ("int", 1, None, None),
    "model.params.lora_config.rank": ("int", 1, None, None),
    "model.params.lora_config.alpha": ("float", None, 0.0, 1.0),
    "optim.learning_rate": ("float", None, 0.0, None),
    "optim.text_encoder_learning_rate": ("float", None, 0.0, 1.0),
    "optim.beta1": ("float", 0.0, None, 0.9),
    "optim.beta2": ("float", 0.0, None, 0.999),
    "optim.eps": ("float", None, 0.0, 1e-8),
    "optim.weight_decay": ("float", 0.0, None, 0.0),
    "optim.warmup_steps": ("int", 0, None, 0),
}
# Settings a resumed run may change: when and what it saves, logs and samples, and how (not what) it computes.
RESUME_MAY_CHANGE = ("train.total_step", "train.save_path", "train.save_ckpt_interval", "train.max_num_ckpt",
                     "train.log_interval", "train.infer_during_train", "train.infer_interval", "train.validation_prompts",
                     "train.validation_sampling", "train.final_sample_prompt", "train.compile_in_child",
                     "train.split_prior_batch", "train.gradient_checkpointing", "train.gradient_checkpointing_res_blocks",
                     "model.params.frozen_weight_dtype", "model.params.backend", "dreambooth.instance_data_path",
                     "dreambooth.class_data_path", "dreambooth.class_sampling")


def setting_name(path: str, config_path) -> str:
    """How a user sets a config path: its flag, or the YAML entry."""
    from mindbooth.config import TRAIN_FLAGS

    flags = {entry[0]: flag for flag, entry in TRAIN_FLAGS.items()}
    return f"--{flags[path]}" if path in flags else f"{path} in {config_path}"


def check_training_numbers(config, config_path):
    """Every number of TRAINING_NUMBERS is set (or has its default) and in range; the resolution fits the model."""
    from mindbooth.sampling_model import size_multiple

    for path, (kind, minimum, bound, default) in TRAINING_NUMBERS.items():
        value = OmegaConf.select(config, path, default=None)
        name = setting_name(path, config_path)
        if value is None:
            if default is None:
                raise UsageError(f"{path} is not set: give {name}" if name.startswith("--") else f"{name} is not set")
            continue
        if kind == "int":
            bounded_int(value, name, minimum, bound)
        else:
            finite_float(value, name, minimum, bound)
    if config.train.get("infer_during_train", False):
        bounded_int(config.train.get("infer_interval"), "--infer_interval", 1)
    snr_gamma = OmegaConf.select(config, "model.params.loss_fn_config.params.snr_gamma", default=None)
    if snr_gamma is not None:  # optional: unset trains the plain MSE
        finite_float(snr_gamma, "--snr_gamma", above=0.0)
    multiple = size_multiple(config)
    if int(config.data.resolution) % multiple:
        raise UsageError(f"--resolution must be a multiple of {multiple} for this model, got {config.data.resolution}")


def check_training_choices(config, config_path):
    """The settings that name a choice, and the flags that need another one."""
    from gm.backends import BACKENDS
    from gm.modules.attention import ATTENTION_TYPES
    from gm.modules.frozen_weights import storage_dtype

    db, train_cfg = config.dreambooth, config.train
    for key in ("instance_data_path", "instance_prompt"):
        if not db.get(key):
            raise UsageError(f"--{key} is required (or set dreambooth.{key} in {config_path})")
    if prior_preservation(config) and not db.get("class_prompt"):
        raise UsageError("--class_prompt is required with --class_data_path (prior preservation)")
    if train_cfg.get("gradient_checkpointing_res_blocks", False) and not train_cfg.get("gradient_checkpointing", False):
        raise UsageError("--gradient_checkpointing_res_blocks needs --gradient_checkpointing True")
    if not isinstance(train_cfg.get("aspect_ratio_buckets", False), bool):  # a YAML "no" would read as a true string
        raise UsageError(f"train.aspect_ratio_buckets in {config_path} must be True or False, got {train_cfg.aspect_ratio_buckets!r}")
    if config.data.get("pre_compute_text_embeddings", False):
        from mindbooth.if_cascade import is_if_config

        if not is_if_config(config):
            raise UsageError("--pre_compute_text_embeddings is for DeepFloyd IF (T5); for the other models "
                             "--cache_latents True encodes the prompts once and frees the text encoders")
        if OmegaConf.select(config, "model.params.lora_config.text_encoder", default=False):
            raise UsageError("--pre_compute_text_embeddings frees the text encoder, so it cannot train: drop --train_text_encoder")
    precision = str(train_cfg.get("precision", "fp32"))
    if precision not in ("fp32", "fp16"):
        raise UsageError(f"train.precision in {config_path} must be fp32 or fp16, got {precision!r}")
    schedule = config.optim.get("lr_scheduler", "constant")
    if schedule not in ("constant", "cosine"):
        raise UsageError(f"optim.lr_scheduler in {config_path} must be 'constant' or 'cosine', got {schedule!r}")
    if schedule == "cosine":
        bounded_int(config.optim.get("decay_steps"), f"optim.decay_steps in {config_path} (cosine schedule)", 1)
    backend = OmegaConf.select(config, "model.params.backend", default="auto")
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    attention = OmegaConf.select(config, "model.params.network_config.params.spatial_transformer_attn_type",
                                 default="vanilla")
    if attention not in ATTENTION_TYPES:
        raise UsageError(f"spatial_transformer_attn_type in {config_path} must be one of {', '.join(ATTENTION_TYPES)}, "
                         f"got {attention!r}")
    dtype = OmegaConf.select(config, "model.params.frozen_weight_dtype", default=None)
    if dtype:
        try:
            storage_dtype(dtype)
        except ValueError as error:
            raise UsageError(f"--frozen_weight_dtype: {error}") from None
    if not isinstance(OmegaConf.select(config, "model.params.lora_config"), DictConfig):
        raise UsageError("the model config has no lora_config: add model.params.lora_config (rank, alpha) to the training YAML")


def prior_preservation(config) -> bool:
    """Whether the run trains with the class (prior-preservation) loss: a class folder and a positive weight."""
    db = config.dreambooth
    return float(db.get("prior_loss_weight", 1.0)) > 0 and bool(db.get("class_data_path"))


def run_folder(args, config):
    """(the run's folder, whether it is resumed): --resume RUN, --resume True (--save_path), or --save_path."""
    resume = str(args.resume or "")
    if resume in ("", "False", "false"):
        return Path(str(config.train.save_path)), False
    folder = Path(str(config.train.save_path) if resume in ("True", "true") else resume)
    if resume not in ("True", "true") and args.save_path is not None and Path(args.save_path).absolute() != folder.absolute():
        raise UsageError(f"--save_path {args.save_path} and --resume {resume} name different folders; give one of them")
    return folder, True


def check_resumable(folder, config, config_path):
    """`folder` holds a run with a complete training state, and `config` trains it as it started: else a UsageError
    that names each setting that differs (RESUME_MAY_CHANGE may)."""
    from mindbooth.training_state import complete_states

    if not folder.is_dir():
        raise UsageError(f"--resume {folder}: no such folder (give the --save_path of an earlier run, or True)")
    if not (folder / "config.yaml").is_file() or not complete_states(folder):
        raise UsageError(f"--resume {folder}: nothing to resume, no config.yaml and complete training state "
                         "(state/step_*.json with its LoRA and optimizer files) there")
    saved = load_yaml_config(folder / "config.yaml", f"--resume {folder}:")
    differences = [f"{setting_name(path, config_path)} is {new!r}, the run has {old!r}"
                   for path, (old, new) in config_differences(saved, config).items()
                   if not path.startswith(RESUME_MAY_CHANGE)]
    if differences:
        raise UsageError(f"--resume {folder}: {'; '.join(differences[:4])}{' ...' if len(differences) > 4 else ''} "
                         "(a resumed run trains as it started: drop these, or start a new --save_path)")


def config_differences(old, new) -> dict:
    """{dotted path: (old value, new value)} of the leaves where two configs differ (a missing leaf is None)."""
    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], node

    old_leaves = dict(leaves(OmegaConf.to_container(old, resolve=False)))
    new_leaves = dict(leaves(OmegaConf.to_container(new, resolve=False)))
    return {path: (old_leaves.get(path), new_leaves.get(path)) for path in sorted(old_leaves.keys() | new_leaves.keys())
            if old_leaves.get(path) != new_leaves.get(path)}


def check_training_run(args, config, weights) -> tuple:
    """Everything a training run reads, checked before any work: settings, the run folder (resumable when
    resumed, writable), the weight files' headers, the image folders (every image opened). Returns
    (run folder, resuming). Notes (skipped files, prompts cut at 77 tokens) are printed."""
    from mindbooth.checkpoint import check_weight_files

    check_training_choices(config, args.config)
    check_training_numbers(config, args.config)
    folder, resuming = run_folder(args, config)
    if resuming:
        check_resumable(folder, config, args.config)
    else:
        check_writable_folder(folder, "--save_path")
    try:
        check_weight_files(weights)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--weight: {error}") from None
    db = config.dreambooth
    check_image_folder(db.instance_data_path, "--instance_data_path", must_have_images=True)
    if prior_preservation(config):
        class_images = check_image_folder(db.class_data_path, "--class_data_path", must_have_images=False)
        if len(class_images) < int(db.get("num_class_images", 0)):  # the missing ones will be sampled there
            check_writable_folder(db.class_data_path, "--class_data_path")
        elif not class_images:
            raise UsageError(f"--class_data_path {db.class_data_path} holds no images and --num_class_images is 0: "
                             "ask for class images to be sampled, or give --prior_loss_weight 0 (no prior preservation)")
    for note in prompt_token_notes({"--instance_prompt": db.instance_prompt, "--class_prompt": db.get("class_prompt") or ""}):
        print(note)
    return folder, resuming


def model_error(error: ValueError, config_path) -> str:
    """The message of an error building the model from a checked config, naming the setting to change: a LoRA
    rank larger than a layer is --lora_rank (only the built layers know their sizes)."""
    if "LoRA rank" in str(error):
        return f"{setting_name('model.params.lora_config.rank', config_path)}: {error}"
    return f"{config_path}: {error}"
