"""Checkpoints of a training run: the LoRA (`<version>_<step>_lora.ckpt`, MindONE's naming) and, beside it,
everything needed to continue exactly (optimizer moments, step, random-generator states, loss scale).
A state's JSON is written last: a run killed mid-save resumes from the previous complete state."""
import json
import math
from pathlib import Path

import mindspore as ms
import numpy as np

from gm.modules.lora import lora_parameters
from mindbooth.checkpoint import read_checkpoint, save_checkpoint_atomic, save_json_atomic, save_lora


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


class TrainingState:
    def __init__(self, save_path, engine, optimizer, batch_sampler, data_rng: np.random.Generator, loss_scale, rank: int,
                 alpha: float, max_num_ckpt: int):
        self.save_path = Path(save_path)
        self.state_dir = self.save_path / "state"
        self.engine, self.optimizer, self.batch_sampler = engine, optimizer, batch_sampler
        self.data_rng, self.loss_scale = data_rng, loss_scale
        self.rank, self.alpha = rank, alpha
        self.max_num_ckpt = max(1, max_num_ckpt)

    def lora_path(self, version: str, step: int) -> Path:
        return self.save_path / f"{version}_{step}_lora.ckpt"

    def _states(self):
        """Complete states, oldest first: [(step, json path)]."""
        if not self.state_dir.exists():
            return []
        states = []
        for path in self.state_dir.glob("step_*.json"):
            record = json.loads(path.read_text())
            if Path(record["lora"]).exists() and Path(record["optimizer"]).exists():
                states.append((record["step"], path))
        return sorted(states)

    def latest_lora_path(self):
        states = self._states()
        return json.loads(states[-1][1].read_text())["lora"] if states else None

    def save(self, step: int, version: str):
        lora_path = self.lora_path(version, step)
        optimizer_path = self.state_dir / f"step_{step}_optimizer.ckpt"
        save_lora(self.engine, lora_path, self.rank, self.alpha)
        save_checkpoint_atomic({k: v.value() for k, v in self.optimizer.state().items()}, optimizer_path)
        record = {
            "step": step,
            "lora": str(lora_path),
            "optimizer": str(optimizer_path),
            "data_rng": self.data_rng.bit_generator.state,
            "batch_sampler": self.batch_sampler.state(),
            "loss_scale": self.loss_scale.state(),
        }
        save_json_atomic(record, self.state_dir / f"step_{step}.json")
        for old_step, old_json in self._states()[: -self.max_num_ckpt]:
            old = json.loads(old_json.read_text())
            old_json.unlink()
            for key in ("lora", "optimizer"):
                Path(old[key]).unlink(missing_ok=True)

    def restore(self) -> int:
        states = self._states()
        if not states:
            raise SystemExit(f"error: nothing to resume in {self.save_path}: no complete training state under {self.state_dir}")
        record = json.loads(states[-1][1].read_text())
        lora = read_checkpoint(record["lora"])
        own = lora_parameters(self.engine)
        for name, param in own.items():
            if name not in lora:
                raise SystemExit(f"error: {record['lora']} lacks {name}: it was trained with another LoRA config")
            param.set_data(lora[name].value().astype(param.dtype))
        try:
            self.optimizer.load_state(read_checkpoint(record["optimizer"]), source=record["optimizer"])
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        self.data_rng.bit_generator.state = record["data_rng"]
        self.batch_sampler.load_state(record["batch_sampler"])
        self.loss_scale.load_state(record["loss_scale"])
        return int(record["step"])
