"""Merge a LoRA into a base checkpoint: W <- W + scale * (alpha / rank) * B A for every LoRA layer.

    python tools/lora_conversion/merge_lora.py --base_ckpt checkpoints/sd_xl_base_1.0_ms.ckpt \
        --lora_ckpt output/lora.ckpt --output checkpoints/sd_xl_base_sks_dog.ckpt [--scale 1.0]

The base is a MindBooth/MindONE `.ckpt` (names `model.diffusion_model.…`, `conditioner.embedders.…`); the
LoRA is a MindBooth `.ckpt` or any file `convert_lora.py --task to_ms` reads. UNet and text-encoder LoRA
are both merged, for SD 1.x, SD 2.x, SDXL and SSD-1B (DeepFloyd IF: its UNet LoRA, add_k_proj/add_v_proj
included): CLIP's q/k/v/out_proj and OpenCLIP's out_proj (SD 2.x's ViT-H, SDXL's bigG) into their weights,
OpenCLIP's q/k/v into the row blocks [0:W], [W:2W], [2W:3W] of the fused `….attn.in_proj_weight`. The family
(how diffusers/kohya names map) is the base checkpoint's (IF: its UNet's diffusers names), or --config's.
`--drop_text_encoder` merges the UNet part only. The output is written tensor by tensor (one tensor and its delta
in memory at a time) to a temporary file that is renamed at the end; each merged weight keeps its dtype (the sum
is computed in fp32).
"""
import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from mindbooth.tensor_dtypes import FLOATS, ConversionError, cast  # noqa: E402
from tools.lora_conversion import lora_formats as lf  # noqa: E402
from tools.lora_conversion.convert_lora import is_safetensors, read_state  # noqa: E402
from tools.lora_conversion.lora_family import check_family, family_from_base, family_from_config  # noqa: E402


def merge(base_ckpt, lora, output, scale=1.0, overwrite=False, config=None, drop_text_encoder=False) -> dict:
    """Write `output` = base with the LoRA merged in; returns {"merged": layers, "weights": base weights changed,
    "tensors": written, "seconds"}."""
    from mindbooth.ckpt_stream import CkptReader, CkptWriter
    from tools.model_conversion.conversion import atomic_output

    start = time.time()
    if not math.isfinite(scale):
        raise ConversionError(f"--scale must be a finite number, got {scale}")
    if not Path(base_ckpt).is_file():
        raise ConversionError(f"base checkpoint not found: {base_ckpt}")
    if is_safetensors(base_ckpt):
        raise ConversionError(f"{base_ckpt} is a safetensors file; convert it to a MindSpore .ckpt first "
                              f"(tools/model_conversion/convert_weight.py --task pt_to_ms)")
    state, header = read_state(lora)
    with CkptReader(base_ckpt) as base:
        # the family (how non-MindBooth names map) from --config, else from the base's names (text encoders, IF)
        family = family_from_config(config) if config is not None else family_from_base(base.tensors)
        layers, _ = lf.read_layers(state, header, family, drop_text_encoder)
        check_family(layers, family, lora, config or f"the model of {base_ckpt}")
        lora_in_base = [n for n in base.tensors if n.endswith((".lora_A.weight", ".lora_B.weight"))]
        if lora_in_base:
            raise ConversionError(f"{base_ckpt} already holds LoRA weights (e.g. '{lora_in_base[0]}'); "
                                  f"merge into a plain base checkpoint")
        # every fit is checked before anything is written
        targets = lf.check_targets(layers, {n: t.shape for n, t in base.tensors.items()}, str(base_ckpt))
        for name in targets:
            if base.tensors[name].dtype not in FLOATS:
                raise ConversionError(f"{base_ckpt}: '{name}' is {base.tensors[name].dtype}, not floating point")
        with atomic_output(output, overwrite, inputs=[base_ckpt]) as f:
            writer = CkptWriter(f)
            for name, t in base.tensors.items():
                data = base.read(name)
                if name in targets:
                    delta = lf.merge_delta(layers, targets[name], t.shape, scale, name)
                    merged = cast(data, t.dtype, "F32").astype(np.float32) + delta
                    data = cast(merged, "F32", t.dtype)
                writer.write(name, t.dtype, data)
        copied = len(base.tensors)
    return {"merged": len(layers), "weights": len(targets), "tensors": copied, "seconds": time.time() - start}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base_ckpt", required=True, help="base model .ckpt (MindSpore names)")
    p.add_argument("--lora_ckpt", required=True, help="LoRA: MindBooth .ckpt, or diffusers/kohya .safetensors")
    p.add_argument("--output", required=True, help="merged .ckpt to write")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA strength: multiplies alpha / rank (default 1)")
    p.add_argument("--config", default=None,
                   help="config of the base model (its family maps diffusers/kohya names; default: told by the "
                        "base checkpoint's text encoders)")
    p.add_argument("--drop_text_encoder", action="store_true", help="merge the UNet part of the LoRA only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = merge(args.base_ckpt, args.lora_ckpt, args.output, args.scale, args.overwrite, args.config,
                        args.drop_text_encoder)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {summary['merged']} LoRA layers into {args.output} ({summary['tensors']} tensors, "
          f"{summary['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
