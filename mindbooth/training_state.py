"""Checkpoints of a training run: the LoRA (`<version>_<step>_lora.ckpt`, MindONE's naming) and, beside it,
everything needed to continue exactly (optimizer moments, step, random-generator states, loss scale).
A state's JSON is written last: a run killed mid-save resumes from the previous complete state."""
import json
import math
from pathlib import Path

import numpy as np

from gm.modules.lora import lora_parameters
from mindbooth.checkpoint import read_checkpoint, save_checkpoint_atomic, save_json_atomic, save_lora

STATE_FOLDER = "state"  # a run's training states: step_<n>.json and step_<n>_optimizer.ckpt


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
    """The file a state's record names under `key` ("lora" or "optimizer"), inside the run folder `save_path`.
    Records hold paths relative to the run folder, so a moved or copied run finds its own files. Records written
    before that held absolute paths: only their file name is kept, looked up in this run's folder (never the
    folder they name, which may be another run's). A name leading outside the folder is refused."""
    save_path = Path(save_path)
    path = Path(recorded)
    if path.is_absolute():
        path = Path(path.name) if key == "lora" else Path(STATE_FOLDER) / path.name
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
            files = [run_file(save_path, record[key], key) for key in ("lora", "optimizer")]
        except (ValueError, KeyError, TypeError, OSError):  # unreadable or foreign: not a state of this run
            continue
        if all(f.is_file() for f in files):
            states.append((int(record["step"]), path, record))
    return sorted(states, key=lambda state: state[0])


class TrainingState:
    def __init__(self, save_path, engine, optimizer, batch_sampler, data_rng: np.random.Generator, loss_scale, rank: int,
                 alpha: float, max_num_ckpt: int):
        self.save_path = Path(save_path)
        self.state_dir = self.save_path / STATE_FOLDER
        self.engine, self.optimizer, self.batch_sampler = engine, optimizer, batch_sampler
        self.data_rng, self.loss_scale = data_rng, loss_scale
        self.rank, self.alpha = rank, alpha
        self.max_num_ckpt = max(1, max_num_ckpt)

    def lora_path(self, version: str, step: int) -> Path:
        return self.save_path / f"{version}_{step}_lora.ckpt"

    def latest_lora_path(self):
        states = complete_states(self.save_path)
        return run_file(self.save_path, states[-1][2]["lora"], "lora") if states else None

    def save(self, step: int, version: str):
        lora_path = self.lora_path(version, step)
        optimizer_path = self.state_dir / f"step_{step}_optimizer.ckpt"
        save_lora(self.engine, lora_path, self.rank, self.alpha)
        save_checkpoint_atomic({k: v.value() for k, v in self.optimizer.state().items()}, optimizer_path)
        record = {  # paths relative to the run folder: a moved or copied run still names its own files
            "step": step,
            "lora": lora_path.relative_to(self.save_path).as_posix(),
            "optimizer": optimizer_path.relative_to(self.save_path).as_posix(),
            "data_rng": self.data_rng.bit_generator.state,
            "batch_sampler": self.batch_sampler.state(),
            "loss_scale": self.loss_scale.state(),
        }
        save_json_atomic(record, self.state_dir / f"step_{step}.json")
        for _, old_json, old in complete_states(self.save_path)[: -self.max_num_ckpt]:
            old_json.unlink()
            for key in ("lora", "optimizer"):  # inside this run's folder only (run_file)
                run_file(self.save_path, old[key], key).unlink(missing_ok=True)

    def restore(self) -> int:
        states = complete_states(self.save_path)
        if not states:
            raise SystemExit(f"error: nothing to resume in {self.save_path}: no complete training state under {self.state_dir}")
        record = states[-1][2]
        lora_path, optimizer_path = (run_file(self.save_path, record[key], key) for key in ("lora", "optimizer"))
        lora = read_checkpoint(lora_path)
        own = lora_parameters(self.engine)
        for name, param in own.items():
            if name not in lora:
                raise SystemExit(f"error: {lora_path} lacks {name}: it was trained with another LoRA config")
            param.set_data(lora[name].value().astype(param.dtype))
        try:
            self.optimizer.load_state(read_checkpoint(optimizer_path), source=str(optimizer_path))
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        self.data_rng.bit_generator.state = record["data_rng"]
        self.batch_sampler.load_state(record["batch_sampler"])
        self.loss_scale.load_state(record["loss_scale"])
        return int(record["step"])
