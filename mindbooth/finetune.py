"""What a run fine-tunes (`train.finetune`): `lora` (LoRA layers on a frozen base, the default when the key is absent)
or `full` (the paper's DreamBooth: every UNet weight, and with --train_text_encoder every text-encoder weight).

The checks a full run needs before any work, the model config it builds, and the parameters it trains."""
from pathlib import Path

from omegaconf import OmegaConf

from mindbooth.validation import UsageError

FINETUNE_MODES = ("lora", "full")
UNET_PREFIX = "model.diffusion_model."
TEXT_ENCODER_PREFIX = "conditioner."


def finetune_mode(config) -> str:
    """`train.finetune` of a training config; `lora` where the key is absent (configs written before it)."""
    return str(OmegaConf.select(config, "train.finetune", default=None) or "lora")


def is_full(config) -> bool:
    return finetune_mode(config) == "full"


def trains_text_encoders(config) -> bool:
    """--train_text_encoder: in LoRA mode LoRA on the encoders' attention, in full mode all their weights."""
    return bool(OmegaConf.select(config, "model.params.lora_config.text_encoder", default=False))


def trainable_prefixes(config) -> list:
    """The parameter-name prefixes a full run trains (DiffusionEngine.make_trainable)."""
    return [UNET_PREFIX] + ([TEXT_ENCODER_PREFIX] if trains_text_encoders(config) else [])


def model_config(config):
    """The model section to build: in full mode without its lora_config (no LoRA layers are built)."""
    if not is_full(config):
        return config.model
    model = OmegaConf.create(OmegaConf.to_container(config.model, resolve=False))
    model.params.lora_config = None
    return model


def step_graph_config(config):
    """`config` as the compiled step graphs' cache key should see it (mindbooth/step_graphs.py keys on config.model):
    a full run's graphs differ from a LoRA run's of the same YAML, so the model section says which it is."""
    if not is_full(config):
        return config
    keyed = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
    keyed.model.params.finetune = "full"
    return keyed


def align_with_resumed_run(config, resume_folder):
    """A run started before `train.finetune` existed saved a config.yaml without it: resumed with a YAML that now says
    `finetune: lora` (what it trained), the key is dropped so that the resume check sees the same settings."""
    saved = Path(resume_folder) / "config.yaml"
    if not saved.is_file() or finetune_mode(config) != "lora":
        return
    if OmegaConf.select(OmegaConf.load(saved), "train.finetune", default=None) is None and "finetune" in config.train:
        del config.train["finetune"]


def check_finetune(config, weights, resume_folder=None):
    """The finetune setting and what it rules out, as one-line UsageErrors: an unknown mode; with `full`, frozen
    weights in a low precision (the trained weights are fp32), a LoRA to start from (--weight base,lora); on
    --resume (`resume_folder`), another mode than the run was started with."""
    mode = finetune_mode(config)
    if mode not in FINETUNE_MODES:
        raise UsageError(f"--finetune must be one of {', '.join(FINETUNE_MODES)}, got {mode!r}")
    if resume_folder is not None and (Path(resume_folder) / "config.yaml").is_file():
        started = finetune_mode(OmegaConf.load(Path(resume_folder) / "config.yaml"))
        if started != mode:
            raise UsageError(f"--resume {resume_folder}: the run was started with --finetune {started}, not {mode}; a "
                             "resumed run keeps its finetune mode (or start a new --save_path)")
    if mode != "full":
        return
    if OmegaConf.select(config, "model.params.frozen_weight_dtype", default=None):
        raise UsageError("--frozen_weight_dtype is for LoRA: with --finetune full the trained weights must be fp32 "
                         "(drop --frozen_weight_dtype)")
    if len([w for w in weights if w]) > 1:
        raise UsageError(f"--finetune full trains the base weights themselves and takes no LoRA: give one --weight "
                         f"file, not {','.join(weights)}")
