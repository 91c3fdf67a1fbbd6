"""Write the quick-start's inputs: a tiny base checkpoint with random weights for any tiny config (SDXL, SSD-1B,
SD 1.5, SD 2.1, DeepFloyd IF: the same key layout as the released model of that family) and a few subject images
drawn from the toy world (mindbooth/toy_world.py).

    python tools/make_tiny_model.py --config configs/inference/sd_xl_tiny.yaml --weight_ms checkpoints/sd_xl_tiny_ms.ckpt \
        --subject_dir runs/toy_subject
    python tools/make_tiny_model.py --config configs/inference/sd_v1.5_tiny.yaml --weight_ms checkpoints/sd_v1.5_tiny_ms.ckpt
    python tools/make_tiny_model.py --config configs/inference/if_i_tiny.yaml --weight_ms checkpoints/if_i_tiny_ms.ckpt

DeepFloyd IF's tiny config also needs a T5 tokenizer: a small SentencePiece model is written at its tokenizer_file
when none is there.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mindspore as ms  # noqa: E402

from gm.util import instantiate_from_config  # noqa: E402
from mindbooth.checkpoint import save_checkpoint_atomic  # noqa: E402
from mindbooth.config import load_config  # noqa: E402
from mindbooth.tiny_model import random_weights, t5_tokenizer_files, tiny_t5_tokenizer  # noqa: E402
from mindbooth.toy_subject import write_toy_images  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/inference/sd_xl_tiny.yaml",
                        help="model YAML: configs/inference/{sd_xl,ssd_1b,sd_v1.5,sd_v2.1}_tiny.yaml (or a training YAML)")
    parser.add_argument("--weight_ms", default="checkpoints/sd_xl_tiny_ms.ckpt")
    parser.add_argument("--subject_dir", default="", help="also draw subject images here")
    parser.add_argument("--num_subject_images", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    ms.set_device("CPU")
    if Path(args.weight_ms).exists() and not args.overwrite:
        print(f"{args.weight_ms} exists; keeping it (use --overwrite to rebuild)")
    else:
        try:
            config = load_config(args.config)
        except (FileNotFoundError, ValueError) as error:
            sys.exit(f"error: --config: {error}")
        if "model" not in config:
            sys.exit(f"error: --config {args.config} has no 'model' section; use configs/inference/*_tiny.yaml")
        engine = instantiate_from_config(config.model)
        # a training YAML's LoRA layers are not base weights: the base checkpoint holds the model alone
        weights = {name: value for name, value in random_weights(engine, args.seed).items() if ".lora_" not in name}
        save_checkpoint_atomic(weights, args.weight_ms)
        print(f"wrote {args.weight_ms}")
        for tokenizer in t5_tokenizer_files(config):  # DeepFloyd IF: its T5 tokenizer, a small SentencePiece model
            if not Path(tokenizer).exists():
                Path(tokenizer).parent.mkdir(parents=True, exist_ok=True)
                Path(tokenizer).write_bytes(tiny_t5_tokenizer())
                print(f"wrote {tokenizer}")
    if args.subject_dir:
        paths = write_toy_images(args.subject_dir, args.num_subject_images, seed=args.seed)
        print(f"subject images in {args.subject_dir} ({len(paths)})")


if __name__ == "__main__":
    main()
