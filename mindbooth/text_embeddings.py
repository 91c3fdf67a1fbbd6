"""Prompt embeddings computed before the model is built (--pre_compute_text_embeddings, as MindONE's DeepFloyd IF
recipe does): the text encoder is built alone, encodes every prompt the run will use, and is freed, so IF's 4.76B
T5 never sits next to the UNet being trained or sampled."""
import gc

import numpy as np
from mindspore import nn

from gm.util import instantiate_from_config
from mindbooth import checkpoint

BATCH = 8  # prompts per encoder call: a bounded activation peak however many prompts a run has


class _TextEncoder(nn.Cell):
    """The conditioner alone, under the engine's names (conditioner.*), so the base file's names load into it."""

    def __init__(self, conditioner):
        super().__init__()
        self.conditioner = conditioner


def encode_alone(conditioner_config, weight, prompts) -> dict:
    """{prompt: (crossattn (L, D), vector (V,))} as float32 numpy for each distinct prompt, by the conditioner built
    alone from `conditioner_config` with its names read from the base file `weight`; freed before returning."""
    holder = _TextEncoder(instantiate_from_config(conditioner_config))
    if holder.conditioner is None:
        raise ValueError("the model config has no text encoder (conditioner_config)")
    checkpoint.load_weights(holder, [weight], skip_prefixes=("model.", "first_stage_model."))
    try:
        holder.conditioner.set_train(False)
        unique = list(dict.fromkeys(prompts))
        table = {}
        for start in range(0, len(unique), BATCH):
            chunk = unique[start:start + BATCH]
            cond = holder.conditioner.encode({"txt": chunk})
            crossattn, vector = cond["crossattn"].asnumpy(), cond["vector"].asnumpy()
            table.update({prompt: (crossattn[i], vector[i]) for i, prompt in enumerate(chunk)})
        return table
    finally:
        del holder
        gc.collect()


def lookup(table: dict, prompts) -> tuple:
    """(crossattn (N, L, D), vector (N, V)) of `prompts` from an encode_alone table; a prompt not in it is a
    ValueError (the encoder is gone: only the prompts encoded beforehand can be used)."""
    missing = [p for p in prompts if p not in table]
    if missing:
        raise ValueError(f"the text encoder was freed after encoding the run's prompts; {missing[0]!r} is not one of them")
    return (np.stack([table[p][0] for p in prompts]), np.stack([table[p][1] for p in prompts]))
