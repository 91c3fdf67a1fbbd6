"""Share a MindBooth LoRA (UNet and text encoders) with diffusers and A1111/ComfyUI, and bring theirs back.

    python tools/lora_conversion/convert_lora.py --task ms_to_diffusers --src lora.ckpt \
        --dst pytorch_lora_weights.safetensors --base_model stabilityai/stable-diffusion-xl-base-1.0 \
        --instance_prompt "a photo of sks dog"
    python tools/lora_conversion/convert_lora.py --task ms_to_kohya --src lora.ckpt --dst my_lora.safetensors
    python tools/lora_conversion/convert_lora.py --task to_ms --src downloaded_lora.safetensors --dst lora.ckpt
    python tools/lora_conversion/convert_lora.py --task ms_to_diffusers --config configs/inference/if_i_xl.yaml \
        --src if_lora.ckpt --dst pytorch_lora_weights.safetensors      # DeepFloyd IF stage I (IFPipeline)

ms_to_diffusers writes what `pipe.load_lora_weights(...)` reads (`unet.…`, `text_encoder.…`,
`text_encoder_2.…`; each component's alpha in the `lora_adapter_metadata` header); ms_to_kohya writes what
A1111 and ComfyUI load (`lora_unet_input_blocks_…`, `lora_te1_…`, `lora_te2_…`, per-layer `.alpha`).
to_ms reads either (or a diffusers attention-processor LoRA), detected from the key names.
Text-encoder LoRA (a `--train_text_encoder` run) is converted with the UNet's; `--drop_text_encoder` keeps
the UNet part only. LoRA on other text-encoder layers (e.g. mlp fc1) is refused.
DeepFloyd IF (to_q/to_k/to_v/to_out.0/add_k_proj/add_v_proj of every `attentions.N`): diffusers format only; its
family comes from an IF --config or, without one, from the LoRA's names.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from mindbooth.tensor_dtypes import CHOICES, FLOATS, ConversionError, cast  # noqa: E402
from tools.lora_conversion import lora_formats as lf  # noqa: E402
from tools.lora_conversion import text_encoder_names as te  # noqa: E402
from tools.lora_conversion.lora_family import check_family, family_from_config, family_of_layers  # noqa: E402

TASKS = {"ms_to_diffusers": "diffusers", "ms_to_kohya": "kohya", "to_ms": "mindbooth"}


def _float32(name, data, code, path):
    if code in FLOATS:
        return cast(data, code, "F32").astype(np.float32, copy=False)
    if data.ndim == 0 or data.size == 1:  # integer metadata scalars (e.g. lora_rank)
        return data.astype(np.float32)
    raise ConversionError(f"{path}: '{name}' is {code}; LoRA weights are floating point")


def is_safetensors(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_state(path):
    """{name: fp32 array} and the safetensors header metadata ({} for a .ckpt) of a LoRA file."""
    from mindbooth.ckpt_stream import CkptReader
    from tools.model_conversion.safetensors_stream import SafetensorsReader

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"input not found: {path}")
    if is_safetensors(path):
        with SafetensorsReader(path) as reader:
            state = {n: _float32(n, reader.read(n), t.dtype, path) for n, t in reader.tensors.items()}
            return state, dict(reader.metadata or {})
    with CkptReader(path) as reader:
        return {n: _float32(n, reader.read(n), t.dtype, path) for n, t in reader.tensors.items()}, {}


def write_ckpt(state: dict, path, overwrite=False):
    """A MindSpore .ckpt (as ms.save_checkpoint writes it), fp32, written atomically."""
    from mindbooth.ckpt_stream import CkptWriter
    from tools.model_conversion.conversion import atomic_output

    with atomic_output(path, overwrite) as f:
        writer = CkptWriter(f)
        for name, value in state.items():
            writer.write(name, "F32", np.asarray(value, np.float32))


def write_safetensors(state: dict, metadata: dict, path, overwrite=False, dtype="fp32"):
    """A .safetensors file (weights in `dtype`, `.alpha` scalars fp32), written atomically."""
    from tools.model_conversion.conversion import atomic_output
    from tools.model_conversion.safetensors_stream import TensorInfo, write_safetensors as write

    if dtype not in CHOICES or CHOICES[dtype] is None:
        raise ConversionError(f"unknown --dtype {dtype!r}: choose fp32, fp16 or bf16")
    codes = {name: "F32" if np.ndim(value) == 0 else CHOICES[dtype] for name, value in state.items()}
    infos = [TensorInfo(name, codes[name], tuple(np.shape(value))) for name, value in state.items()]
    with atomic_output(path, overwrite) as f:
        write(f, infos, lambda name: cast(np.asarray(state[name], np.float32), "F32", codes[name]), metadata)


def layers_per_block(config) -> int:
    """ResBlocks per UNet level (`num_res_blocks`) of the model config; the block numbering depends on it."""
    return family_from_config(config).layers_per_block


def check_against_model(layers: dict, config):
    """Every LoRA layer has its weight in the model `config` builds, and its B A fits that weight's shape."""
    from tools.model_conversion.if_layout import checkpoint_shapes, if_config
    from tools.model_conversion.sdxl_layout import model_mindspore_shapes, rule_mindspore_shapes

    deepfloyd = if_config(config)
    if deepfloyd is not None:  # IF's names and shapes from its numbers (no model, no T5 tokenizer needed)
        shapes = checkpoint_shapes(deepfloyd, text_encoder=False)
    else:
        shapes = rule_mindspore_shapes(config) or model_mindspore_shapes(config)
    try:
        lf.check_targets(layers, shapes, f"the model of {config}")
    except ConversionError as error:  # e.g. an SD 2.x LoRA in diffusers/kohya names with an SD 1.x config
        raise ConversionError(f"{error} (pass the --config of the LoRA's base model)") from None


def convert(task, src, dst, config=None, base_model="", instance_prompt="", dtype="fp32", overwrite=False,
            drop_text_encoder=False, uniform_rank=False, fold_alpha=False) -> dict:
    """Run one conversion; returns a summary (format read, layers, rank, alpha, ...)."""
    if task not in TASKS:
        raise ConversionError(f"unknown --task {task!r}: choose one of {', '.join(TASKS)}")
    if Path(dst).exists() and Path(src).exists() and Path(dst).resolve() == Path(src).resolve():
        raise ConversionError(f"output {dst} is the input file")
    family = family_from_config(config)
    state, header = read_state(src)
    layers, info = lf.read_layers(state, header, family, drop_text_encoder)
    family = family_of_layers(layers, family, config)  # without --config: IF when the names are IF's
    # before anything is written: the LoRA's names show the config's family, and its layers fit that model
    check_family(layers, family, src, config or "the default without --config")
    if config is not None:
        check_against_model(layers, config)
    if task != "to_ms":
        tensors, metadata = lf.export_lora(state, TASKS[task], family, base_model or family.base_model,
                                           instance_prompt, fold_alpha, drop_text_encoder)
    if task == "to_ms":
        out = lf.to_mindbooth(layers, uniform_rank)
        write_ckpt(out, dst, overwrite)
        rank, alpha = int(out["lora_rank"]), float(out["lora_alpha"])
    else:
        write_safetensors(tensors, metadata, dst, overwrite, dtype)
        rank, alpha = metadata["lora_rank"], metadata["lora_alpha"]
    text_layers = sum(te.is_text_encoder_layer(name) for name in layers)
    return {**info, "layers": len(layers), "text_encoder_layers": text_layers, "rank": rank, "alpha": alpha,
            "output": str(dst)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=list(TASKS),
                   help="ms_to_diffusers / ms_to_kohya: MindBooth .ckpt -> safetensors; to_ms: safetensors -> .ckpt")
    p.add_argument("--src", required=True, help="input LoRA file")
    p.add_argument("--dst", required=True, help="output LoRA file")
    p.add_argument("--config", default=None,
                   help="config of the LoRA's base model (e.g. configs/inference/sd_v1.5.yaml): its family (SD 1.x, "
                        "SD 2.x, SDXL, SSD-1B, DeepFloyd IF) decides the names; default: SDXL base (IF when the "
                        "LoRA's names are IF's)")
    p.add_argument("--base_model", default="",
                   help="base model name written into the safetensors metadata (default: the family's Hub name)")
    p.add_argument("--instance_prompt", default="", help="trigger / instance prompt written into the metadata")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weight type of a safetensors output")
    p.add_argument("--drop_text_encoder", action="store_true",
                   help="keep only the UNet part: leave text-encoder LoRA weights out of the output")
    p.add_argument("--uniform_rank", action="store_true",
                   help="to_ms: zero-pad layers to the largest rank so the file has one rank (same B A)")
    p.add_argument("--fold_alpha", action="store_true",
                   help="ms_to_*: fold alpha / rank into B and write alpha = rank, for loaders that ignore alpha")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = convert(args.task, args.src, args.dst, args.config, args.base_model, args.instance_prompt,
                          args.dtype, args.overwrite, args.drop_text_encoder, args.uniform_rank, args.fold_alpha)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    notes = []
    if summary.get("skipped"):
        notes.append(f"skipped {summary['skipped']} non-LoRA weights")
    if summary.get("dropped_text_encoder"):
        notes.append(f"dropped {summary['dropped_text_encoder']} text-encoder LoRA weights")
    if summary.get("text_encoder_layers"):
        notes.append(f"{summary['text_encoder_layers']} of the layers on the text encoders")
    print(f"{summary['format']} -> {TASKS[args.task]}: {summary['layers']} layers, rank {summary['rank']}, "
          f"alpha {summary['alpha']} -> {summary['output']}" + (f" ({'; '.join(notes)})" if notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
