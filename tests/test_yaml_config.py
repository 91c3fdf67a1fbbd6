"""YAML loading with a `base:` include (mindbooth.config.load_config): the 910a/910b training configs share one base."""
import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from mindbooth.config import load_config, load_training_config, training_parser

TRAINING = ROOT / "configs" / "training"
ASCEND_910A = TRAINING / "sd_xl_base_finetune_dreambooth_lora_910a.yaml"
ASCEND_910B = TRAINING / "sd_xl_base_finetune_dreambooth_lora_910b.yaml"


def test_910a_and_910b_differ_only_in_resolution():
    a, b = (OmegaConf.to_container(load_config(path)) for path in (ASCEND_910A, ASCEND_910B))
    assert (a["data"].pop("resolution"), b["data"].pop("resolution")) == (512, 1024)
    assert a == b
    assert "base" not in a and a["model"]["params"]["network_config"]["params"]["model_channels"] == 320  # the base's


def test_the_trainers_effective_config_is_merged_without_base(tmp_path):
    args = training_parser().parse_args(["--config", str(ASCEND_910A), "--lora_rank", "8"])
    config = load_training_config(args)
    OmegaConf.save(config, tmp_path / "config.yaml")  # as train_dreambooth.py saves it in the run folder
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert "base" not in saved and saved.data.resolution == 512 and saved.model.params.lora_config.rank == 8
    assert saved.train.total_step == 1000  # from the base


def test_base_is_relative_to_the_including_file_and_overridden_by_it(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "root.yaml").write_text("a: 1\nb: {c: 2, d: [1, 2]}\n")
    (tmp_path / "shared" / "mid.yaml").write_text("base: root.yaml\nb: {c: 3}\n")
    (tmp_path / "top.yaml").write_text("base: shared/mid.yaml\nb: {d: [5]}\ne: ${b.c}\n")
    assert OmegaConf.to_container(load_config(tmp_path / "top.yaml"), resolve=True) == {"a": 1, "b": {"c": 3, "d": [5]}, "e": 3}


def test_a_missing_base_is_a_one_line_error(tmp_path):
    (tmp_path / "device.yaml").write_text("base: nowhere.yaml\ndata: {resolution: 512}\n")
    with pytest.raises(FileNotFoundError) as error:
        load_config(tmp_path / "device.yaml")
    assert str(error.value) == f"{tmp_path / 'device.yaml'} names base {tmp_path / 'nowhere.yaml'}, which is not a file"
    with pytest.raises(FileNotFoundError, match="^config not found: "):
        load_config(tmp_path / "absent.yaml")


def test_a_cycle_of_bases_is_a_one_line_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nx: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ny: 2\n")
    with pytest.raises(ValueError, match="^config bases form a cycle: .*a.yaml -> .*b.yaml -> .*a.yaml$") as error:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(error.value)


def test_the_trainer_reports_a_missing_base_in_one_line(tmp_path):
    import train_dreambooth

    (tmp_path / "device.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(SystemExit, match=r"^error: .*device\.yaml names base .*nowhere\.yaml, which is not a file$"):
        train_dreambooth.main(["--config", str(tmp_path / "device.yaml"), "--device_target", "CPU"])
