"""Convert model weights (SDXL base, SSD-1B, SD 1.x, SD 2.x; DeepFloyd IF from its diffusers folders) between the
official `.safetensors` or diffusers folders and MindBooth's MindSpore `.ckpt`.

    python tools/model_conversion/convert_weight.py --task pt_to_ms \
        --weight_safetensors sd_xl_base_1.0.safetensors --weight_ms checkpoints/sd_xl_base_1.0_ms.ckpt
    python tools/model_conversion/convert_weight.py --task ms_to_pt \
        --weight_ms checkpoints/sd_xl_base_1.0_ms.ckpt --weight_safetensors sd_xl_base_1.0_back.safetensors
    python tools/model_conversion/convert_weight.py --task ms_to_diffusers --config configs/inference/sd_xl_base.yaml \
        --weight_ms checkpoints/sd_xl_base_1.0_ms.ckpt --weight_diffusers sd_xl_finetuned_diffusers

DeepFloyd IF (released as diffusers folders only; stage I also converts its T5-XXL, see weight_convertion.md):

    python tools/model_conversion/convert_weight.py --task diffusers_to_ms --config configs/inference/if_i_xl.yaml \
        --weight_diffusers IF-I-XL-v1.0 --variant fp16 --weight_ms checkpoints/if_i_xl_ms.ckpt

`--config` picks the model (default SDXL base); a file of another family is refused with the config to pass.
`--weight_safetensors` may also be a diffusers pipeline folder (pt_to_ms only); ms_to_diffusers writes a new
diffusers pipeline folder (`--weight_diffusers`, never overwritten). The names and shapes the
checkpoint must have are those of the model that `--config` builds: derived from the config's numbers for SDXL
base's modules, read from the model (built in a child process) for any other. See weight_convertion.md.
"""
import argparse
import resource
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mindbooth.tensor_dtypes import CHOICES, ConversionError  # noqa: E402

TASKS = {"pt_to_ms": "pt_to_ms", "st_to_ms": "pt_to_ms", "ms_to_pt": "ms_to_pt", "ms_to_st": "ms_to_pt",
         "ms_to_diffusers": "ms_to_diffusers", "diffusers_to_ms": "diffusers_to_ms"}
DEFAULT_CONFIG = ROOT / "configs" / "inference" / "sd_xl_base.yaml"


def _model_shapes(config):
    import mindspore as ms

    from tools.model_conversion.sdxl_layout import model_mindspore_shapes

    ms.set_device("CPU")  # only parameter names and shapes are read; nothing is allocated or run
    return model_mindspore_shapes(config)


@contextmanager
def expected_shapes(config):
    """The {MindSpore name: shape} a checkpoint for `config` must have, for the block.

    A config built of the shipped configs' modules gets it from the rules at once (`rule_mindspore_shapes`, which the
    tests hold equal to the model's): a dict. Any other config's model is built in a child process while the
    caller goes on (the conversion writes meanwhile); then a function that waits for it is yielded. A child, so
    this process never holds MindSpore (about 1 GB) while it streams the weights; it is ended on leaving the block."""
    import multiprocessing

    from tools.model_conversion.sdxl_layout import rule_mindspore_shapes

    if not Path(config).is_file():
        raise ConversionError(f"model config not found: {config}")
    try:
        by_rule = rule_mindspore_shapes(config)
    except Exception as e:  # not YAML, or not a mapping
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ConversionError(f"could not read the model config {config}: {type(e).__name__}: {first_line}") from None
    if by_rule is not None:
        yield by_rule
        return
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # leaving it terminates the child
        pending = pool.apply_async(_model_shapes, (str(config),))

        def result() -> dict:
            try:
                return pending.get()
            except Exception as e:
                raise ConversionError(f"could not build the model of {config} to read its parameter names: "
                                      f"{type(e).__name__}: {e}") from None

        yield result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=sorted(TASKS),
                   help="pt_to_ms: safetensors (or diffusers folder) -> .ckpt; ms_to_pt: .ckpt -> safetensors; "
                        "ms_to_diffusers: .ckpt -> diffusers pipeline folder; diffusers_to_ms: diffusers pipeline "
                        "folder (--weight_diffusers; DeepFloyd IF's release) -> .ckpt")
    p.add_argument("--weight_safetensors",
                   help="official single-file .safetensors (input of pt_to_ms, output of ms_to_pt), "
                        "or a diffusers pipeline folder (pt_to_ms)")
    p.add_argument("--weight_ms", required=True,
                   help="MindSpore .ckpt (output of pt_to_ms, input of ms_to_pt and ms_to_diffusers)")
    p.add_argument("--weight_diffusers",
                   help="diffusers pipeline folder: input of diffusers_to_ms; output of ms_to_diffusers (must be new "
                        "or empty)")
    p.add_argument("--dtype", default="fp32", choices=list(CHOICES),
                   help="element type written (default fp32; 'keep' keeps the input's)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config the weights are for")
    p.add_argument("--variant", default=None, help="diffusers weight variant to read, e.g. fp16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--check", action="store_true",
                   help="only validate the input against the model (names, shapes, dtypes, file size); write nothing")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    parts = p.add_mutually_exclusive_group()
    parts.add_argument("--no_text_encoder", action="store_true",
                       help="DeepFloyd IF stage I: write the UNet only (keep T5 in a file of its own)")
    parts.add_argument("--text_encoder_only", action="store_true",
                       help="DeepFloyd IF stage I: write the T5 text encoder only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    task = TASKS[args.task]
    try:
        deepfloyd = is_deepfloyd_config(args.config)
        if deepfloyd and task == "pt_to_ms" and args.weight_safetensors and Path(args.weight_safetensors).is_dir():
            args.weight_diffusers, args.weight_safetensors, task = args.weight_safetensors, None, "diffusers_to_ms"
        if deepfloyd and task != "diffusers_to_ms":
            raise ConversionError(f"{args.config} is DeepFloyd IF, released as diffusers folders: use --task "
                                  "diffusers_to_ms --weight_diffusers FOLDER (no other task supports IF yet)")
        if (args.no_text_encoder or args.text_encoder_only) and not deepfloyd:
            raise ConversionError("--no_text_encoder / --text_encoder_only are for DeepFloyd IF configs only")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if task == "diffusers_to_ms":
        return convert_diffusers_folder(args, deepfloyd)
    if task == "ms_to_diffusers":
        return export_diffusers(args)
    from tools.model_conversion import conversion
    from tools.model_conversion.file_layout import config_family

    try:
        if not args.weight_safetensors:
            raise ConversionError(f"--task {args.task} needs --weight_safetensors")
        src, dst = (args.weight_safetensors, args.weight_ms) if task == "pt_to_ms" else (args.weight_ms,
                                                                                         args.weight_safetensors)
        if not Path(src).exists():
            raise ConversionError(f"input not found: {src}")
        conversion.check_output(dst, args.overwrite or args.check, probe=not args.check)  # before the model is built
        common = dict(dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress, check_only=args.check)
        with expected_shapes(args.config) as expected:
            family = config_family(args.config)  # known from the config's numbers: a wrong file is refused at once
            if task == "pt_to_ms":
                if Path(src).is_dir():
                    summary = conversion.diffusers_to_mindspore(src, dst, expected, variant=args.variant, **common)
                else:
                    summary = conversion.official_to_mindspore(src, dst, expected, family=family, **common)
            else:
                summary = conversion.mindspore_to_official(src, dst, expected, family=family, **common)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    return report(summary, src, dst, args, task)


def is_deepfloyd_config(config) -> bool:
    from tools.model_conversion.if_layout import if_config

    if not Path(config).is_file():
        raise ConversionError(f"model config not found: {config}")
    try:
        return if_config(config) is not None
    except Exception as e:  # not YAML, or not a mapping
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ConversionError(f"could not read the model config {config}: {type(e).__name__}: {first_line}") from None


def convert_diffusers_folder(args, deepfloyd: bool) -> int:
    """--task diffusers_to_ms: a diffusers pipeline folder (--weight_diffusers) -> .ckpt."""
    from tools.model_conversion import conversion
    from tools.model_conversion.if_conversion import folder_stage, if_diffusers_to_mindspore
    from tools.model_conversion.if_layout import STAGE_CONFIGS

    src, dst = args.weight_diffusers, args.weight_ms
    try:
        if args.weight_safetensors:
            raise ConversionError("--task diffusers_to_ms reads --weight_diffusers (a folder), not --weight_safetensors")
        if not src:
            raise ConversionError("--task diffusers_to_ms needs --weight_diffusers (the diffusers pipeline folder)")
        if not Path(src).is_dir():
            raise ConversionError(f"input folder not found: {src}")
        common = dict(dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress, check_only=args.check,
                      variant=args.variant)
        if deepfloyd:
            summary = if_diffusers_to_mindspore(src, dst, args.config, unet=not args.text_encoder_only,
                                                text_encoder=not args.no_text_encoder, **common)
        else:
            stage = folder_stage(src)
            if stage:
                raise ConversionError(f"{src} is DeepFloyd IF: pass --config {STAGE_CONFIGS[stage]}")
            conversion.check_output(dst, args.overwrite or args.check, probe=not args.check)
            with expected_shapes(args.config) as expected:
                summary = conversion.diffusers_to_mindspore(src, dst, expected, **common)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    return report(summary, src, dst, args, "diffusers_to_ms")


def report(summary, src, dst, args, task) -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    if summary.get("note"):
        print(f"note: {summary['note']}")
    if not summary["written"]:
        print(f"ok: {src} matches the model of {args.config}: {summary['tensors']} tensors; "
              f"{task} would write {summary['bytes'] / 2**30:.2f} GiB ({args.dtype}) to {dst}")
        return 0
    print(f"wrote {dst}: {summary['tensors']} tensors, {summary['bytes'] / 2**30:.2f} GiB ({args.dtype}) "
          f"in {summary['seconds']:.1f} s; peak RSS {peak:.2f} GiB")
    return 0


def export_diffusers(args) -> int:
    """--task ms_to_diffusers: .ckpt -> a new diffusers pipeline folder."""
    from tools.model_conversion.diffusers_export import check_output_folder, mindspore_to_diffusers
    from tools.model_conversion.file_layout import config_family
    from tools.model_conversion.sdxl_layout import load_config

    src, dst = args.weight_ms, args.weight_diffusers
    try:
        unused = [flag for flag, value in (("--weight_safetensors", args.weight_safetensors),
                                           ("--overwrite", args.overwrite), ("--variant", args.variant)) if value]
        if unused:
            raise ConversionError(f"--task ms_to_diffusers takes no {', '.join(unused)} (it writes a new folder: "
                                  "--weight_diffusers)")
        if not dst:
            raise ConversionError("--task ms_to_diffusers needs --weight_diffusers (the folder to create)")
        if not Path(src).is_file():
            raise ConversionError(f"input not found: {src}")
        check_output_folder(dst, probe=not args.check)  # before the model is built
        with expected_shapes(args.config) as expected:
            try:
                params = load_config(args.config)["model"]["params"]
            except (KeyError, TypeError):
                raise ConversionError(f"{args.config} has no model.params: not a MindBooth inference config") from None
            summary = mindspore_to_diffusers(src, dst, expected, params, config_family(args.config),
                                             dtype=args.dtype, progress=not args.no_progress,
                                             check_only=args.check)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    if not summary["written"]:
        print(f"ok: {src} matches the model of {args.config}: {summary['tensors']} tensors; ms_to_diffusers would "
              f"write {summary['bytes'] / 2**30:.2f} GiB ({args.dtype}) to {dst}")
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"wrote {dst}: {summary['tensors']} tensors, {summary['bytes'] / 2**30:.2f} GiB ({args.dtype}) "
          f"in {summary['seconds']:.1f} s; peak RSS {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
