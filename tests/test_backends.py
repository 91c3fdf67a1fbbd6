"""gm.backends: which backend a model gets, the plain model needs nothing of the CPU backend (it trains and samples with
that package unimportable), and the attention types of spatial_transformer_attn_type."""
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_CONFIG
from mindbooth.config import load_config
from gm.backends import apply_backend, resolve_backend
from gm.backends.cpu import kernels
from gm.util import instantiate_from_config
from tiny_workspace import make_workspace


def test_auto_is_cpu_where_the_kernels_build_and_plain_where_they_do_not(monkeypatch):
    if not kernels.available():
        pytest.skip("the CPU kernels do not build here")
    assert resolve_backend("auto") == "cpu" and resolve_backend("plain") == "plain"
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert resolve_backend("auto") == "plain"
    with pytest.raises(ValueError, match="backend 'cpu' needs MindBooth's CPU kernels"):
        resolve_backend("cpu")
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'plain', 'cpu'\], got 'gpu'"):
        resolve_backend("gpu")


def test_plain_model_asks_nothing_of_the_cpu_kernels(monkeypatch):
    """Building a gm model with the plain backend compiles no kernel, reads no environment switch, writes no cache."""
    def asked():
        raise AssertionError("the CPU kernel library was asked for by a plain build")

    monkeypatch.setattr(kernels, "library_path", asked)
    engine = instantiate_from_config(load_config(TINY_CONFIG).model, backend="plain")
    assert engine.backend == "plain"
    assert not [type(c).__name__ for _, c in engine.cells_and_names() if type(c).__module__.startswith("gm.backends")]


def test_cpu_backend_keeps_names_and_is_idempotent():
    engine = instantiate_from_config(load_config(TINY_CONFIG).model, backend="plain")
    names = [name for name, _ in engine.parameters_and_names()]
    if not kernels.available():
        pytest.skip("the CPU kernels do not build here")
    assert apply_backend(engine, "cpu") == "cpu"
    forms = [type(c) for _, c in engine.cells_and_names()]
    assert any(t.__module__.startswith("gm.backends.cpu") for t in forms)
    apply_backend(engine, "cpu")  # a second call changes nothing
    assert [type(c) for _, c in engine.cells_and_names()] == forms
    assert [name for name, _ in engine.parameters_and_names()] == names


def test_flash_attention_off_ascend_is_one_clear_error():
    config = load_config(TINY_CONFIG).model.params.network_config
    config.params.spatial_transformer_attn_type = "flash-attention"
    with pytest.raises(ValueError, match="^spatial_transformer_attn_type 'flash-attention' needs MindSpore's "
                                         "flash-attention op, which runs on Ascend only; use 'vanilla' on CPU$"):
        instantiate_from_config(config)
    config.params.spatial_transformer_attn_type = "xformers"
    with pytest.raises(ValueError, match="spatial_transformer_attn_type must be one of"):
        instantiate_from_config(config)


_WITHOUT_THE_CPU_BACKEND = """
import importlib.abc
import sys


class NoCPUBackend(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "gm.backends.cpu" or name.startswith("gm.backends.cpu."):
            raise ImportError(f"{name} is deleted for this test")
        return None


sys.meta_path.insert(0, NoCPUBackend())
sys.path.insert(0, sys.argv[1])
workspace, lora_path = sys.argv[2], None
import train_dreambooth
from mindbooth.sampling_cli import main as sample

engine = train_dreambooth.main([
    "--config", f"{workspace}/train.yaml", "--weight", f"{workspace}/tiny.ckpt", "--device_target", "CPU",
    "--instance_data_path", f"{workspace}/subject", "--instance_prompt", "a photo of sks toy",
    "--class_data_path", f"{workspace}/class", "--class_prompt", "a photo of toy", "--num_class_images", "2",
    "--save_path", f"{workspace}/run", "--total_step", "2", "--save_ckpt_interval", "2", "--ms_mode", "1"])
assert engine.backend == "plain", engine.backend
images = sample(["--config", f"{workspace}/train.yaml", "--weight", f"{workspace}/tiny.ckpt,{workspace}/run/SDXL-tiny_2_lora.ckpt",
                 "--device_target", "CPU", "--ms_mode", "1", "--width", "32", "--height", "32", "--sample_step", "2",
                 "--prompt", "a photo of sks toy", "--save_path", f"{workspace}/samples"])
assert not [name for name in sys.modules if name.startswith("gm.backends.cpu")]
print("TRAINED AND SAMPLED", len(images))
"""


def test_plain_model_trains_and_samples_without_the_cpu_backend_package(tmp_path):
    workspace = make_workspace(tmp_path)
    script = tmp_path / "without_cpu_backend.py"
    script.write_text(_WITHOUT_THE_CPU_BACKEND)
    run = subprocess.run([sys.executable, str(script), str(ROOT), str(workspace)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "TRAINED AND SAMPLED" in run.stdout
    assert (workspace / "run" / "SDXL-tiny_2_lora.ckpt").is_file() and list((workspace / "samples").glob("*.png"))
