"""The training tests' workspace: a reduced tiny model (one res block per level, one transformer block per stage:
the same code paths as the tiny config, a third of the graph, so compiling the training step fits the test
budget), its random base checkpoint and a few procedurally drawn subject images; and the helpers that run the
trainer and read what a run wrote."""
import csv

from omegaconf import OmegaConf

from conftest import ROOT
from gm.util import instantiate_from_config
from mindbooth.checkpoint import read_checkpoint, save_checkpoint_atomic
from mindbooth.config import load_config
from mindbooth.tiny_model import random_weights
from mindbooth.toy_subject import write_toy_images

TRAIN_CONFIG = ROOT / "configs" / "training" / "sd_xl_tiny_dreambooth_lora_cpu.yaml"


def make_workspace(root):
    """Writes root/train.yaml, root/tiny.ckpt and root/subject/*.png; returns root."""
    config = load_config(TRAIN_CONFIG)
    config.model.params.network_config.params.num_res_blocks = 1
    config.model.params.network_config.params.transformer_depth = [1, 1, 1]
    config.dreambooth.class_sampling.num_steps = 2
    config.train.validation_sampling.num_steps = 2
    config.data.resolution = 32
    OmegaConf.save(config, root / "train.yaml")
    engine = instantiate_from_config(config.model)
    save_checkpoint_atomic({k: v for k, v in random_weights(engine, seed=1).items() if ".lora_" not in k}, root / "tiny.ckpt")
    write_toy_images(root / "subject", count=3, size=48, seed=3)
    return root


def train(argv):
    """train_dreambooth.main(argv) (its engine); the process is left in PYNATIVE_MODE, as the tests expect."""
    import mindspore as ms
    import train_dreambooth

    try:
        return train_dreambooth.main(argv)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def run_losses(folder) -> list:
    """The `loss` column of a run folder's loss.csv."""
    with open(folder / "loss.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def checkpoint_arrays(path) -> dict:
    """{name: numpy array} of a .ckpt."""
    return {k: v.asnumpy() for k, v in read_checkpoint(path).items()}
