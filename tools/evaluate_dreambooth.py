"""Score a DreamBooth run as the paper does (Ruiz et al. 2023, Sec. 4.1): DINO, CLIP-I and CLIP-T of the generated
images against the instance images and their prompts, with a downloaded DINO (facebook/dino-vits16) and CLIP
(e.g. openai/clip-vit-large-patch14) Hugging Face folder (config.json, model.safetensors, preprocessor_config.json).

    python tools/evaluate_dreambooth.py --print_prompts --subject_class dog --live > prompts.txt
    python demo/sampling_without_streamlit.py ... --prompt prompts.txt --num_images 4 --save_path outputs/eval
    python tools/evaluate_dreambooth.py --instance_dir runs/dog --generated_dir outputs/eval \
        --dino models/dino-vits16 --clip models/clip-vit-large-patch14 --json outputs/eval/scores.json

A generated image's prompt is its `<image>.txt` sidecar, or else the prompt the sampler records in the PNG.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindbooth.dreambooth_eval import dreambooth_prompts, evaluate, format_table  # noqa: E402
from mindbooth.validation import UsageError  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--instance_dir", help="the subject's real images (the training instance images)")
    add("--generated_dir", help="the generated images, each with its prompt (sidecar .txt or the sampler's PNG record)")
    add("--dino", help="folder of a downloaded DINO ViT (facebook/dino-vits16)")
    add("--clip", help="folder of a downloaded CLIP model (openai/clip-vit-large-patch14 or similar)")
    add("--json", default=None, help="also write the scores (overall and per prompt) to this JSON file")
    add("--device_target", default="CPU", choices=["Ascend", "GPU", "CPU"])
    add("--print_prompts", action="store_true", help="print the paper's 25 prompts for --subject_class and exit")
    add("--subject_class", default=None, help="with --print_prompts: the class noun (dog, backpack, ...)")
    add("--live", action="store_true", help="with --print_prompts: the live-subject list (the paper's cats and dogs)")
    add("--unique_token", default="sks", help="with --print_prompts: the subject's identifier")
    return p


def run(args):
    if args.print_prompts:
        if not args.subject_class:
            raise UsageError("--print_prompts needs --subject_class (the class noun, e.g. dog)")
        print("\n".join(dreambooth_prompts(args.subject_class, args.live, args.unique_token)))
        return None
    missing = [f"--{flag}" for flag in ("instance_dir", "generated_dir", "dino", "clip") if not getattr(args, flag)]
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (or use --print_prompts)")
    if args.json and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json} is a folder; give a file name")

    import mindspore as ms

    from mindbooth.images import atomic_write
    from tools.model_conversion.feature_extractors import ClipExtractor, DinoExtractor

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device(args.device_target)
    result = evaluate(args.instance_dir, args.generated_dir, lambda: DinoExtractor(args.dino),
                      lambda: ClipExtractor(args.clip))
    print(format_table(result))
    if args.json:
        record = {"instance_dir": str(args.instance_dir), "generated_dir": str(args.generated_dir),
                  "dino_model": str(args.dino), "clip_model": str(args.clip), **result}
        atomic_write(args.json, lambda temporary: Path(temporary).write_text(json.dumps(record, indent=1)))
        print(f"wrote {args.json}")
    return result


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        sys.exit(f"error: {str(error).strip().splitlines()[0]}")


if __name__ == "__main__":
    main()
