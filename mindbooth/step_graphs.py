"""The training step's two graphs (gradient step, optimizer step) compiled by a child process, for train_dreambooth.py.

When the child is used and what names its cache folder; the mechanism (the child, the cache, the compile) is in
mindbooth/compile_cache.py, and why it exists in docs/performance.md. The training process calls
`step_graphs_in_child` before it builds its model; the child, which is the same script run again, and later the
training process call `use_step_graphs` on the steps they built: the child compiles, the training process loads.
"""
import sys
from pathlib import Path

from omegaconf import OmegaConf

from mindbooth.compile_cache import cache_folder, compile_in_child, compile_step_graphs, is_entry_point, user_cache_enabled
from mindbooth.file_identity import file_identity
from mindbooth.train_step import zero_step_inputs

# The settings of config.train that shape the step graphs; the data, prompts, paths, seed and schedule stay on the host.
GRAPH_TRAIN_SETTINGS = ("precision", "clip_grad", "max_grad_norm", "gradient_accumulation_steps", "split_prior_batch",
                        "gradient_checkpointing", "gradient_checkpointing_res_blocks")


def uses_compile_child(args, config, weights, script) -> bool:
    """Whether the step graphs are compiled by a child: not when switched off (--compile_in_child False), outside
    CPU GRAPH mode, data parallel, with trained text encoders (their step takes token ids), with aspect-ratio buckets
    (a graph per bucket shape, compiled in this process as the buckets come), with a missing weight file (the model
    phase says so), with MindSpore's cache switched on by the user, or when `script` was imported rather than run
    (MindSpore's cache check would not match)."""
    return (bool(config.train.get("compile_in_child", True)) and args.device_target == "CPU" and args.ms_mode == 0
            and not args.is_parallel and not OmegaConf.select(config, "model.params.lora_config.text_encoder", default=False)
            and not config.train.get("aspect_ratio_buckets", False)
            and not user_cache_enabled() and bool(weights) and all(Path(w).is_file() for w in weights)
            and is_entry_point(script))


def step_graph_key(args, config, weights, step_shapes) -> dict:
    """Everything the two step graphs depend on (cache_folder hashes it with the sources and MindSpore's version)."""
    train_cfg = config.train
    return {"model": OmegaConf.to_container(config.model, resolve=True), "optim": OmegaConf.to_container(config.optim, resolve=True),
            "train": {k: train_cfg.get(k) for k in GRAPH_TRAIN_SETTINGS},
            "prior_loss_weight": config.dreambooth.get("prior_loss_weight", 1.0), "inputs": step_shapes,
            "mode": args.ms_mode, "jit_level": args.jit_level, "device": args.device_target,
            "weights": [file_identity(w) for w in weights]}


def step_graphs_in_child(args, argv, config, weights, step_shapes, save_path, script):
    """The cache folder of the step graphs (under save_path/compile_cache), compiled there by a child that runs
    `script` with the same arguments, unless an earlier run did; None where no child is used (uses_compile_child)
    or it failed (the training process then compiles the step itself)."""
    if not uses_compile_child(args, config, weights, script):
        return None
    folder = cache_folder(Path(save_path) / "compile_cache", script, step_graph_key(args, config, weights, step_shapes))
    return folder if compile_in_child(folder, script, sys.argv[1:] if argv is None else argv) else None


def use_step_graphs(folder, grad_step, apply_step, step_shapes, context_projections=None):
    """Compile (in the child) or load (in the training process) both step graphs in `folder`, for GradStep inputs
    of `step_shapes` with cached text embeddings (and their `context_projections`, if used)."""
    compile_step_graphs(folder, grad_step, apply_step, zero_step_inputs(step_shapes, context_projections))
