"""Checkpoints of a training run: the LoRA (`<version>_<step>_lora.ckpt`, MindONE's naming) or, with --finetune full,
the whole model (`<version>_<step>_full.ckpt`, in the base file's layout) and, beside it, everything needed to
continue exactly (optimizer moments, step, random-generator states, loss scale).
A state's JSON is written last: a run killed mid-save resumes from the previous complete state."""
import json
import math
from pathlib import Path

import numpy as np

from gm.modules.lora import lora_parameters
from mindbooth.checkpoint import (load_trained_weights, read_checkpoint, save_checkpoint_atomic, save_full_model,
                                  save_json_atomic, save_lora)

STATE_FOLDER = "state"  # a run's training states: step_<n>.json and step_<n>_optimizer.ckpt
WEIGHT_KEYS = ("lora", "full")  # the key a state's record names its weights file under: LoRA, or the whole model


def weights_key(record) -> str:
    """"full" for a state of a --finetune full run, else "lora"."""
    return "full" if "full" in record else "lora"


def learning_rate_at(step: int, optim_cfg) -> float:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to 0 over `decay_steps`."""
    base = float(optim_cfg.learning_rate)
    warmup = int(optim_cfg.get("warmup_steps", 0))
    if step < warmup:
        return base * (step + 1) / warmup
    schedule = optim_cfg.get("lr_scheduler", "constant")
    if schedule == "constant":
        return base
    if schedule == "cosine":
        decay_steps = max(1, int(optim_cfg.decay_steps) - warmup)
        progress = min(1.0, (step - warmup) / decay_steps)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.lr_scheduler must be 'constant' or 'cosine', got {schedule!r}")


def run_file(save_path, recorded, key: str) -> Path:
    """The file a state's record names under `key` ("lora", "full" or "optimizer"), inside the run folder `save_path`.
    Records hold paths relative to the run folder, so a moved or copied run finds its own files. Records written
    before that held absolute paths: only their file name is kept, looked up in this run's folder (never the
    folder they name, which may be another run's). A name leading outside the folder is refused."""
    save_path = Path(save_path)
    path = Path(recorded)
    if path.is_absolute():
        path = Path(path.name) if key in WEIGHT_KEYS else Path(STATE_FOLDER) / path.name
    resolved = (save_path / path).resolve()
    if not resolved.is_relative_to(save_path.resolve()):
        raise ValueError(f"{save_path}: a training state names {recorded}, outside the run folder")
    return save_path / path


def complete_states(save_path) -> list:
    """Complete training states of the run in `save_path`, oldest first: [(step, json path, record)]; a state
    counts when its JSON and both files it names are there (the JSON is written last)."""
    state_dir = Path(save_path) / STATE_FOLDER
    if not state_dir.is_dir():
        return []
    states = []
    for path in state_dir.glob("step_*.json"):
        try:
            record = json.loads(path.read_text())
            files = [run_file(save_path, record[key], key) for key in (weights_key(record), "optimizer")]
        except (ValueError, KeyError, TypeError, OSError):  # unreadable or foreign: not a state of this run
            continue
        if all(f.is_file() for f in files):
            states.append((int(record["step"]), path, record))
    return sorted(states, key=lambda state: state[0])


class TrainingState:
    def __init__(self, save_path, engine, optimizer, batch_sampler, data_rng: np.random.Generator, loss_scale, rank: int,
                 alpha: float, max_num_ckpt: int, full_base=None, trained=()):
        """`full_base`: for a --finetune full run, the base weights file, whose layout (and whose tensors the engine
        no longer holds) the saved model takes; `trained`: the names of the parameters that run trains."""
        self.save_path = Path(save_path)
        self.state_dir = self.save_path / STATE_FOLDER
        self.engine, self.optimizer, self.batch_sampler = engine, optimizer, batch_sampler
        self.data_rng, self.loss_scale = data_rng, loss_scale
        self.rank, self.alpha = rank, alpha
        self.max_num_ckpt = max(1, max_num_ckpt)
        self.full_base, self.trained = full_base, sorted(trained)
        self.key = "full" if full_base is not None else "lora"

    def weights_path(self, version: str, step: int) -> Path:
        return self.save_path / f"{version}_{step}_{self.key}.ckpt"

    def lora_path(self, version: str, step: int) -> Path:
        return self.weights_path(version, step)

    def latest_weights_path(self):
        states = complete_states(self.save_path)
        if not states:
            return None
        record = states[-1][2]
        return run_file(self.save_path, record[weights_key(record)], weights_key(record))

    latest_lora_path = latest_weights_path

    def save(self, step: int, version: str):
        weights_path = self.weights_path(version, step)
        optimizer_path = self.state_dir / f"step_{step}_optimizer.ckpt"
        if self.full_base is not None:
            save_full_model(self.engine, weights_path, self.full_base)
        else:
            save_lora(self.engine, weights_path, self.rank, self.alpha)
        save_checkpoint_atomic({k: v.value() for k, v in self.optimizer.state().items()}, optimizer_path)
        record = {  # paths relative to the run folder: a moved or copied run still names its own files
            "step": step,
            self.key: weights_path.relative_to(self.save_path).as_posix(),
            "optimizer": optimizer_path.relative_to(self.save_path).as_posix(),
            "data_rng": self.data_rng.bit_generator.state,
            "batch_sampler": self.batch_sampler.state(),
            "loss_scale": self.loss_scale.state(),
        }
        save_json_atomic(record, self.state_dir / f"step_{step}.json")
        for _, old_json, old in complete_states(self.save_path)[: -self.max_num_ckpt]:
            old_json.unlink()
            for key in (weights_key(old), "optimizer"):  # inside this run's folder only (run_file)
                run_file(self.save_path, old[key], key).unlink(missing_ok=True)

    def restore(self) -> int:
        states = complete_states(self.save_path)
        if not states:
            raise SystemExit(f"error: nothing to resume in {self.save_path}: no complete training state under {self.state_dir}")
        record = states[-1][2]
        if weights_key(record) != self.key:  # (train.finetune is checked against the run's config.yaml before)
            raise SystemExit(f"error: {self.save_path} holds a --finetune {weights_key(record)} run, not {self.key}")
        if self.full_base is not None:
            self._restore_full(run_file(self.save_path, record["full"], "full"))
        else:
            self._restore_lora(run_file(self.save_path, record["lora"], "lora"))
        optimizer_path = run_file(self.save_path, record["optimizer"], "optimizer")
        try:
            self.optimizer.load_state(read_checkpoint(optimizer_path), source=str(optimizer_path))
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        self.data_rng.bit_generator.state = record["data_rng"]
        self.batch_sampler.load_state(record["batch_sampler"])
        self.loss_scale.load_state(record["loss_scale"])
        return int(record["step"])

    def _restore_full(self, model_path):
        """The trained weights from the saved model (the rest are the base file's, loaded at the start)."""
        try:
            load_trained_weights(self.engine, model_path, self.trained)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"error: {error}") from None

    def _restore_lora(self, lora_path):
        lora = read_checkpoint(lora_path)
        for name, param in lora_parameters(self.engine).items():
            if name not in lora:
                raise SystemExit(f"error: {lora_path} lacks {name}: it was trained with another LoRA config")
            param.set_data(lora[name].value().astype(param.dtype))
