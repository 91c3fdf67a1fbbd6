"""Write the quick-start's inputs: a tiny SDXL base checkpoint with random weights (same key layout as the
official model) and a few procedurally drawn subject images.

    python tools/make_tiny_model.py --config configs/inference/sd_xl_tiny.yaml --weight_ms checkpoints/sd_xl_tiny_ms.ckpt \
        --subject_dir runs/toy_subject
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mindspore as ms  # noqa: E402

from gm.util import instantiate_from_config  # noqa: E402
from mindbooth.checkpoint import save_checkpoint_atomic  # noqa: E402
from mindbooth.config import load_config  # noqa: E402
from mindbooth.tiny_model import random_weights  # noqa: E402
from mindbooth.toy_subject import write_toy_images  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/inference/sd_xl_tiny.yaml")
    parser.add_argument("--weight_ms", default="checkpoints/sd_xl_tiny_ms.ckpt")
    parser.add_argument("--subject_dir", default="", help="also draw subject images here")
    parser.add_argument("--num_subject_images", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    ms.set_device("CPU")
    if Path(args.weight_ms).exists() and not args.overwrite:
        print(f"{args.weight_ms} exists; keeping it (use --overwrite to rebuild)")
    else:
        engine = instantiate_from_config(load_config(args.config).model)
        save_checkpoint_atomic(random_weights(engine, args.seed), args.weight_ms)
        print(f"wrote {args.weight_ms}")
    if args.subject_dir:
        paths = write_toy_images(args.subject_dir, args.num_subject_images, seed=args.seed)
        print(f"subject images in {args.subject_dir} ({len(paths)})")


if __name__ == "__main__":
    main()
