"""Weight converter: official SDXL `.safetensors` (or a diffusers folder) <-> MindSpore `.ckpt`.

References: MindSpore's own checkpoint code (protobuf messages, save/load_checkpoint), the
`safetensors` library, torch's bf16 rounding, MindONE's SDXL key lists, and the MindBooth model.
The full-size conversion with real data (~2 min, ~21 GB of disk) runs with MINDBOOTH_FULL_SIZE=1;
always-on tests check the full-size names and shapes through a sparse file (header only).
"""
import errno
import os
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore.nn.utils import no_init_parameters
from mindspore.train.checkpoint_pb2 import Checkpoint

from conftest import BASE_CONFIG, KEYS, ROOT, TINY_CONFIG, read_key_yaml
from gm.util import instantiate_from_config, load_params
from mindbooth.ckpt_stream import CkptReader, CkptWriter, copy_range, entry_prefix, iter_arrays
from mindbooth.tensor_dtypes import ConversionError, cast
from tools.model_conversion import conversion
from tools.model_conversion.keymap import mindspore_to_official_name
from tools.model_conversion.make_random_sdxl import write_random
from tools.model_conversion.safetensors_stream import SafetensorsReader, TensorInfo, header_bytes, write_order
from tools.model_conversion.convert_weight import expected_shapes
from tools.model_conversion.file_layout import SDXL, detect
from tools.model_conversion.sdxl_layout import (RULE_MODULES, config_targets, load_config, model_mindspore_shapes,
                                                 official_shapes, rule_mindspore_shapes)

CLI = ROOT / "tools" / "model_conversion" / "convert_weight.py"
FULL = os.environ.get("MINDBOOTH_FULL_SIZE") == "1"


@pytest.fixture(scope="module")
def tiny_expected():
    return model_mindspore_shapes(TINY_CONFIG)


@pytest.fixture(scope="module")
def base_expected():
    return model_mindspore_shapes(BASE_CONFIG)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    write_random(path, official_shapes(load_config(TINY_CONFIG)["model"]["params"]), "fp16", seed=1)
    return path


def sparse_safetensors(path, shapes, code="F16"):
    """A file with a real header and a hole for the data: full-size names and shapes, no disk."""
    infos = write_order([TensorInfo(n, code, tuple(s)) for n, s in shapes.items()])
    with open(path, "wb") as f:
        f.write(header_bytes(infos))
        f.truncate(f.tell() + sum(i.nbytes for i in infos))
    return path


def partials(out) -> list:
    """The temporary files a conversion to `out` is writing (or left)."""
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConversionError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ layout: rule, model, reference
def test_rule_layout_is_the_official_base_key_list():
    reference = read_key_yaml(KEYS / "torch_key_base.yaml")
    derived = official_shapes(load_config(BASE_CONFIG)["model"]["params"])
    assert len(derived) == 2514 and dict(derived) == reference


@pytest.mark.parametrize("config", [TINY_CONFIG, BASE_CONFIG], ids=["tiny", "base"])
def test_model_parameters_are_the_rule_layout_in_mindspore_names(config, request):
    model = request.getfixturevalue("tiny_expected" if config == TINY_CONFIG else "base_expected")
    as_official = {mindspore_to_official_name(n): s for n, s in model.items()}
    assert as_official == dict(official_shapes(load_config(config)["model"]["params"]))


def _config_variant(tmp_path, change):
    config = load_config(TINY_CONFIG)
    change(config["model"])
    path = tmp_path / "variant.yaml"
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(config), path)
    return path


def test_rule_shapes_are_the_models_for_configs_of_sdxls_modules(tmp_path, tiny_expected, base_expected):
    assert set(config_targets(load_config(BASE_CONFIG)["model"])) <= RULE_MODULES
    assert rule_mindspore_shapes(TINY_CONFIG) == tiny_expected
    assert rule_mindspore_shapes(BASE_CONFIG) == base_expected
    # a number the rules read beyond the shipped configs: a deeper middle transformer
    deeper = _config_variant(tmp_path, lambda m: m["params"]["network_config"]["params"].update(transformer_depth_middle=3))
    assert rule_mindspore_shapes(deeper) == model_mindspore_shapes(deeper) != tiny_expected


def _other_sampler(model):
    model["params"]["sampler_config"]["target"] = "gm.modules.diffusionmodules.sampler.EulerAncestralSampler"


@pytest.mark.parametrize("change", [
    _other_sampler,
    lambda m: m["params"]["network_config"]["params"].update(num_res_blocks=[2, 2, 1]),
], ids=["another module", "numbers the rules do not describe"])
def test_rule_shapes_are_not_guessed_for_other_configs(tmp_path, change):
    assert rule_mindspore_shapes(_config_variant(tmp_path, change)) is None


def test_an_sdxl_config_is_checked_without_building_its_model(monkeypatch, tiny_expected):
    import multiprocessing

    def no_child(*args):
        raise AssertionError("a process was started to build the model")

    monkeypatch.setattr(multiprocessing, "get_context", no_child)
    with expected_shapes(TINY_CONFIG) as expected:
        assert expected == tiny_expected


def test_another_config_is_checked_against_its_model_built_in_a_child(tmp_path, tiny_expected):
    with expected_shapes(_config_variant(tmp_path, _other_sampler)) as expected:
        assert callable(expected) and expected() == tiny_expected


def test_a_config_that_is_not_yaml_is_a_one_line_error(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("model: [1, 2\n")
    with pytest.raises(ConversionError, match=r"^could not read the model config .*broken.yaml: ParserError") as e:
        with expected_shapes(config):
            pass
    assert "\n" not in str(e.value)


def test_model_shapes_are_read_with_the_plain_backend(monkeypatch, tiny_expected):
    """The converter's expectation is built with the plain backend (on a fresh machine, the CPU backend compiles its
    kernels): the same names and shapes as the model built with the CPU backend."""
    from gm.backends.cpu import kernels

    if not kernels.available():
        pytest.skip("the CPU kernels do not build here")
    with no_init_parameters():
        model = instantiate_from_config(load_config(TINY_CONFIG)["model"], backend="cpu")
    with_kernels = {name: tuple(int(d) for d in p.shape) for name, p in model.parameters_and_names()}

    def asked():
        raise AssertionError("the kernel library was asked for while reading the model's shapes")

    monkeypatch.setattr(kernels, "library_path", asked)
    assert model_mindspore_shapes(TINY_CONFIG) == with_kernels == tiny_expected


@pytest.mark.parametrize("keys,what", [("torch_key_base.yaml", "SDXL base 1.0"),
                                       ("torch_key_refiner.yaml", "SDXL refiner"),
                                       ("torch_key_base_lcm.yaml", "LCM"),
                                       ("mindspore_key_base.yaml", "MindSpore parameter names")])
def test_detect_names_the_reference_key_lists(keys, what):
    assert what in detect(read_key_yaml(KEYS / keys))


# ------------------------------------------------------------------ file formats
def test_bf16_rounding_matches_torch():
    x = np.concatenate([np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100,
                        np.array([np.inf, -np.inf, 0.0, -0.0, 1e-40, 3.4e38, 1.00390625, 1.01171875], np.float32)])
    bits = cast(x, "F32", "BF16")
    assert np.array_equal(bits, torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    back = cast(bits, "BF16", "F32")
    assert np.array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.isnan(cast(cast(np.array([np.nan], np.float32), "F32", "BF16"), "BF16", "F32")).all()


def test_safetensors_writer_is_byte_identical_to_the_library(tmp_path):
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    tensors = {"b.w": torch.randn(3, 5), "a.h": torch.randn(4).half(), "c.bf": torch.randn(2, 2).bfloat16(),
               "z.scalar": torch.tensor(2.5), "i": torch.arange(3), "a.bf": torch.randn(7).bfloat16()}
    save_file(tensors, tmp_path / "lib.safetensors")
    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    raw = {n: (t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy())
           for n, t in tensors.items()}
    infos = [TensorInfo(n, codes[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    rng.shuffle(infos)
    with open(tmp_path / "mine.safetensors", "wb") as f:
        from tools.model_conversion.safetensors_stream import write_safetensors

        write_safetensors(f, infos, raw.__getitem__)
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    with SafetensorsReader(tmp_path / "lib.safetensors") as reader:
        for name, value in raw.items():
            got = reader.read(name)
            assert got.dtype == value.dtype and np.array_equal(got, value), name


def test_ckpt_entries_are_mindspores_protobuf_and_load_exactly(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((300, 2)).astype(np.float16)
    reference = Checkpoint()
    value = reference.value.add()
    value.tag, value.tensor.tensor_type, value.tensor.tensor_content = "a.b", "Float16", data.tobytes()
    value.tensor.dims.extend([300, 2])
    assert entry_prefix("a.b", "Float16", (300, 2), data.nbytes) + data.tobytes() == reference.SerializeToString()

    tensors = {"w": ("F32", rng.standard_normal((5, 7)).astype(np.float32)),
               "h": ("F16", rng.standard_normal(3).astype(np.float16)),
               "logit_scale": ("F32", np.array(4.6052, np.float32)),
               "big": ("F32", rng.standard_normal((1000, 3)).astype(np.float32)),  # sliced below
               "bf": ("BF16", cast(rng.standard_normal((4, 4)).astype(np.float32), "F32", "BF16"))}
    with open(tmp_path / "mine.ckpt", "wb") as f:
        writer = CkptWriter(f, slice_bytes=1000)  # forces MindSpore's multi-entry layout for 'big'
        for name, (code, array) in tensors.items():
            writer.write(name, code, array)
    loaded = ms.load_checkpoint(str(tmp_path / "mine.ckpt"))
    assert list(loaded) == list(tensors)
    types = {"F32": ms.float32, "F16": ms.float16, "BF16": ms.bfloat16}
    for name, (code, array) in tensors.items():
        assert loaded[name].dtype == types[code] and tuple(loaded[name].shape) == array.shape
        got = loaded[name].astype(ms.float32).asnumpy()
        assert np.array_equal(got, cast(array, code, "F32")), name
    with CkptReader(tmp_path / "mine.ckpt") as reader:
        assert len(reader.tensors["big"].pieces) == 12
        for name, (code, array) in tensors.items():
            assert reader.tensors[name].dtype == code and np.array_equal(reader.read(name), array)
    streamed = dict(iter_arrays(tmp_path / "mine.ckpt"))  # the streaming loader gives what MindSpore loads
    assert list(streamed) == list(loaded)
    for name, value in streamed.items():
        reference = loaded[name].astype(ms.float32).asnumpy() if name == "bf" else loaded[name].asnumpy()
        assert value.dtype == reference.dtype and np.array_equal(value, reference), name


@pytest.mark.parametrize("crc", [False, True])
def test_ckpt_reader_reads_save_checkpoint_files(tmp_path, crc):
    rng = np.random.default_rng(1)
    w, h = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal(3).astype(np.float16)
    params = [{"name": "w", "data": ms.Tensor(w)}, {"name": "s", "data": ms.Tensor(np.float32(2.5))},
              {"name": "bf", "data": ms.Tensor(w).astype(ms.bfloat16)}, {"name": "h", "data": ms.Tensor(h)}]
    ms.save_checkpoint(params, str(tmp_path / "ms.ckpt"), crc_check=crc)
    with CkptReader(tmp_path / "ms.ckpt") as reader:
        assert reader.shapes() == {"w": (5, 7), "s": (), "bf": (5, 7), "h": (3,)}
        assert reader.has_crc == crc and reader.verify_crc() == crc
        assert np.array_equal(reader.read("w"), w) and reader.read("s") == np.float32(2.5)
        assert np.array_equal(reader.read("h"), h)
        assert reader.tensors["bf"].dtype == "BF16"
        bf_ref = ms.Tensor(w).astype(ms.bfloat16).astype(ms.float32).asnumpy()
        assert np.array_equal(cast(reader.read("bf"), "BF16", "F32"), bf_ref)


# ------------------------------------------------------------------ conversion
def test_tiny_round_trip_is_bit_identical_and_loads_into_the_model(tmp_path, tiny_file, tiny_expected):
    ckpt, back = tmp_path / "tiny.ckpt", tmp_path / "back.safetensors"
    conversion.official_to_mindspore(tiny_file, ckpt, tiny_expected, progress=False)
    conversion.mindspore_to_official(ckpt, back, tiny_expected, dtype="fp16", progress=False)
    assert back.read_bytes() == tiny_file.read_bytes()

    # The checkpoint, read by MindSpore itself, loads into the model strictly, values exact in fp32.
    params = ms.load_checkpoint(str(ckpt))
    assert all(p.dtype == ms.float32 for p in params.values())
    model = instantiate_from_config(load_config(TINY_CONFIG)["model"])
    load_params(model, params, strict=True)
    own = dict(model.parameters_and_names())
    with SafetensorsReader(tiny_file) as source:
        for ms_name in ("model.diffusion_model.input_blocks.0.0.weight",
                        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.embedding_table",
                        "conditioner.embedders.1.model.logit_scale",
                        "first_stage_model.decoder.mid.attn_1.norm.gamma"):
            expected = source.read(mindspore_to_official_name(ms_name)).astype(np.float32)
            assert np.array_equal(own[ms_name].asnumpy(), expected), ms_name


@pytest.mark.parametrize("dtype,code", [("bf16", "BF16"), ("keep", "F16")])
def test_output_dtype_is_what_was_asked(tmp_path, tiny_file, tiny_expected, dtype, code):
    ckpt = tmp_path / "out.ckpt"
    conversion.official_to_mindspore(tiny_file, ckpt, tiny_expected, dtype=dtype, progress=False)
    name = "model.diffusion_model.out.2.weight"
    with CkptReader(ckpt) as out, SafetensorsReader(tiny_file) as source:
        assert {t.dtype for t in out.tensors.values()} == {code}
        assert np.array_equal(out.read(name), cast(source.read(name), "F16", code))


def test_existing_output_is_kept_unless_overwrite(tmp_path, tiny_file, tiny_expected):
    out = tmp_path / "out.ckpt"
    out.write_bytes(b"precious")
    message = error_of(conversion.official_to_mindspore, tiny_file, out, tiny_expected, progress=False)
    assert "output exists" in message and "--overwrite" in message and out.read_bytes() == b"precious"
    conversion.official_to_mindspore(tiny_file, out, tiny_expected, overwrite=True, progress=False)
    assert len(CkptReader(out).tensors) == len(tiny_expected)


def test_output_name_appears_only_when_complete(tmp_path, tiny_file, tiny_expected, monkeypatch):
    out, seen = tmp_path / "out.ckpt", []
    original = CkptWriter.write

    def write(self, name, dtype, data):
        seen.append((out.exists(), len(partials(out)) == 1))
        if len(seen) == 100:
            raise KeyboardInterrupt  # as Ctrl-C in the middle
        original(self, name, dtype, data)

    monkeypatch.setattr(CkptWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        conversion.official_to_mindspore(tiny_file, out, tiny_expected, progress=False)
    assert seen == [(False, True)] * 100  # mid-run, where a kill could land: only the .partial file
    assert list(tmp_path.iterdir()) == []


def test_two_conversions_to_one_output_never_share_a_file(tmp_path, tiny_file, tiny_expected, monkeypatch):
    """A second conversion to the same output, run while the first writes: each writes a file of its own; the one
    that finishes first gets the name, the other fails saying so, and the output is whole."""
    out, reference = tmp_path / "out.ckpt", tmp_path / "reference.ckpt"
    conversion.official_to_mindspore(tiny_file, reference, tiny_expected, progress=False)
    original, calls = CkptWriter.write, []

    def write(self, name, dtype, data):
        calls.append(name)
        if len(calls) == 50:  # the first is half-way: the second runs from start to end
            monkeypatch.setattr(CkptWriter, "write", original)
            conversion.official_to_mindspore(tiny_file, out, tiny_expected, progress=False)
        original(self, name, dtype, data)

    monkeypatch.setattr(CkptWriter, "write", write)
    message = error_of(conversion.official_to_mindspore, tiny_file, out, tiny_expected, progress=False)
    assert "output exists" in message and "another process wrote it meanwhile" in message
    assert out.read_bytes() == reference.read_bytes() and not partials(out)


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, tiny_file, tiny_expected):
    for out in ("/proc/mindbooth/out.ckpt", "/proc/out.ckpt"):
        assert "cannot be written" in error_of(conversion.official_to_mindspore, tiny_file, out, tiny_expected, progress=False)
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    assert "is not a folder" in error_of(conversion.official_to_mindspore, tiny_file, blocked / "out.ckpt", tiny_expected,
                                         progress=False)


def test_the_disk_starts_writing_while_the_output_is_written(tmp_path, tiny_file, tiny_expected, monkeypatch):
    """The output's dirty pages go to the disk during the conversion (sync_file_range, which does not wait), not
    only at its final fsync; the write-behind thread works on the .partial file and stops with it."""
    start_writing, calls = conversion._sync_file_range(), []
    assert start_writing is not None  # glibc

    def record(fd, offset, nbytes, flags):
        calls.append((os.path.realpath(f"/proc/self/fd/{fd}"), flags))
        return start_writing(fd, offset, nbytes, flags)

    original = CkptWriter.write

    def write(self, name, dtype, data):  # slower than the tiny model's conversion, so the thread comes round
        time.sleep(0.002)
        original(self, name, dtype, data)

    monkeypatch.setattr(conversion, "_sync_file_range", lambda: record)
    monkeypatch.setattr(conversion, "WRITE_BEHIND_SECONDS", 0.01)
    monkeypatch.setattr(CkptWriter, "write", write)
    out = tmp_path / "out.ckpt"
    conversion.official_to_mindspore(tiny_file, out, tiny_expected, progress=False)
    (written, flags), = set(calls)  # one file: the temporary one, which is gone now
    assert len(calls) > 1 and flags == conversion.SYNC_FILE_RANGE_WRITE
    assert os.path.basename(written).startswith(f".{out.name}.partial-") and not partials(out)
    finished = len(calls)
    time.sleep(0.05)
    assert len(calls) == finished and len(CkptReader(out).tensors) == len(tiny_expected)


# ------------------------------------------------------------------ bad input: one clear line
def test_not_a_safetensors_file(tmp_path, tiny_expected):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("this is not a model\n" * 10)
    message = error_of(conversion.official_to_mindspore, bad, tmp_path / "o.ckpt", tiny_expected)
    assert message.startswith(f"not a safetensors file: {bad} (header length")


def test_truncated_file(tmp_path, tiny_file, tiny_expected):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_file.read_bytes()[:-1000])
    message = error_of(conversion.official_to_mindspore, cut, tmp_path / "o.ckpt", tiny_expected)
    assert message.startswith(f"truncated file: {cut}") and "download it again" in message
    assert not (tmp_path / "o.ckpt").exists()


def test_wrong_task_is_named(tmp_path, tiny_file, tiny_expected):
    ckpt = tmp_path / "t.ckpt"
    conversion.official_to_mindspore(tiny_file, ckpt, tiny_expected, progress=False)
    assert "use --task ms_to_pt" in error_of(conversion.official_to_mindspore, ckpt, tmp_path / "x.ckpt", tiny_expected)
    assert "use --task pt_to_ms" in error_of(conversion.mindspore_to_official, tiny_file, tmp_path / "x.st",
                                             tiny_expected)


def _tiny_shapes():
    return dict(official_shapes(load_config(TINY_CONFIG)["model"]["params"]))


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_expected):
    shapes = _tiny_shapes()
    del shapes["first_stage_model.quant_conv.bias"]
    shapes["model.diffusion_model.extra.weight"] = (2, 2)
    write_random(tmp_path / "m.safetensors", shapes)
    message = error_of(conversion.official_to_mindspore, tmp_path / "m.safetensors", tmp_path / "o.ckpt",
                       tiny_expected)
    assert "1 official keys missing (first: first_stage_model.quant_conv.bias)" in message
    assert "1 unexpected (first: model.diffusion_model.extra.weight)" in message


def test_wrong_shape_is_named(tmp_path, tiny_expected):
    shapes = _tiny_shapes()
    shapes["model.diffusion_model.out.2.weight"] = (4, 32, 1, 1)
    write_random(tmp_path / "s.safetensors", shapes)
    message = error_of(conversion.official_to_mindspore, tmp_path / "s.safetensors", tmp_path / "o.ckpt",
                       tiny_expected)
    assert "model.diffusion_model.out.2.weight is (4, 32, 1, 1), expected (4, 32, 3, 3)" in message


def test_sd15_is_detected(tmp_path, tiny_expected):
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
              "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
              "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}
    write_random(tmp_path / "sd15.safetensors", shapes)
    message = error_of(conversion.official_to_mindspore, tmp_path / "sd15.safetensors", tmp_path / "o.ckpt",
                       tiny_expected)
    assert "looks like Stable Diffusion 1.x" in message


def test_ckpt_with_wrong_keys_is_refused(tmp_path, tiny_expected):
    with open(tmp_path / "w.ckpt", "wb") as f:
        CkptWriter(f).write("model.diffusion_model.out.2.weight", "F32", np.zeros((4, 32, 3, 3), np.float32))
    message = error_of(conversion.mindspore_to_official, tmp_path / "w.ckpt", tmp_path / "o.safetensors",
                       tiny_expected)
    assert f"{len(tiny_expected) - 1} MindSpore keys missing" in message


def test_truncated_ckpt(tmp_path, tiny_file, tiny_expected):
    ckpt = tmp_path / "t.ckpt"
    conversion.official_to_mindspore(tiny_file, ckpt, tiny_expected, progress=False)
    (tmp_path / "cut.ckpt").write_bytes(ckpt.read_bytes()[:-5000])
    assert error_of(CkptReader, tmp_path / "cut.ckpt").startswith("truncated checkpoint")


# ------------------------------------------------------------------ full size: names and shapes
def test_full_size_header_matches_the_full_size_model(tmp_path, base_expected):
    """The released file's 2514 names and shapes (MindONE's list) pass the converter's checks against
    the full-size model, and each name lands on a model parameter (a sparse file: no data moved)."""
    src = sparse_safetensors(tmp_path / "full.safetensors", read_key_yaml(KEYS / "torch_key_base.yaml"))
    plan = conversion.official_to_mindspore(src, tmp_path / "o.ckpt", base_expected, check_only=True)
    assert sorted(plan["names"]) == sorted(base_expected) and plan["bytes"] == 4 * 3_468_837_868


@pytest.mark.parametrize("change,what", [("inpaint", "SDXL inpainting"), ("refiner", "SDXL refiner")])
def test_full_size_other_models_are_named(tmp_path, base_expected, change, what):
    if change == "refiner":
        shapes = read_key_yaml(KEYS / "torch_key_refiner.yaml")
    else:
        shapes = read_key_yaml(KEYS / "torch_key_base.yaml")
        shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    src = sparse_safetensors(tmp_path / "other.safetensors", shapes)
    message = error_of(conversion.official_to_mindspore, src, tmp_path / "o.ckpt", base_expected, check_only=True)
    assert what in message


# ------------------------------------------------------------------ command line
def test_command_line_round_trip_and_errors(tmp_path, tiny_file):
    def run(*args):
        return subprocess.run([sys.executable, str(CLI), "--config", str(TINY_CONFIG), "--no_progress", *args],
                              capture_output=True, text=True, cwd=tmp_path)

    ckpt, back = tmp_path / "t.ckpt", tmp_path / "back.safetensors"
    done = run("--task", "pt_to_ms", "--weight_safetensors", str(tiny_file), "--weight_ms", str(ckpt))
    assert done.returncode == 0 and "866 tensors" in done.stdout, done.stderr
    again = run("--task", "pt_to_ms", "--weight_safetensors", str(tiny_file), "--weight_ms", str(ckpt))
    assert again.returncode == 1 and again.stderr.strip() == f"error: output exists: {ckpt} (pass --overwrite to replace it)"
    done = run("--task", "ms_to_pt", "--weight_safetensors", str(back), "--weight_ms", str(ckpt), "--dtype", "fp16")
    assert done.returncode == 0 and back.read_bytes() == tiny_file.read_bytes(), done.stderr


# ------------------------------------------------------------------ diffusers folder
def test_diffusers_folder_converts_and_loads(tmp_path, tiny_expected):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    folder = tmp_path / "pipe"
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(4, 8, 16), cross_attention_dim=96,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1584).save_pretrained(folder / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                  block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(folder / "vae")
    common = dict(vocab_size=49408, max_position_embeddings=77, num_attention_heads=2, num_hidden_layers=2)
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, hidden_act="quick_gelu", **common)
                  ).save_pretrained(folder / "text_encoder")
    text2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=64, intermediate_size=128, hidden_act="gelu",
                                                       projection_dim=48, **common))
    text2.save_pretrained(folder / "text_encoder_2")

    ckpt = tmp_path / "pipe.ckpt"
    conversion.diffusers_to_mindspore(folder, ckpt, tiny_expected, progress=False)
    params = ms.load_checkpoint(str(ckpt))
    with no_init_parameters():
        model = instantiate_from_config(load_config(TINY_CONFIG)["model"])
    load_params(model, params, strict=True)  # every name, every shape
    # bigG's fused attention input = q, k, v rows; the projection is stored (in, out).
    layer = text2.text_model.encoder.layers[1].self_attn
    fused = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]).detach().numpy()
    g = "conditioner.embedders.1.model."
    assert np.array_equal(params[g + "transformer.resblocks.1.attn.in_proj_weight"].asnumpy(), fused)
    assert np.array_equal(params[g + "text_projection"].asnumpy(), text2.text_projection.weight.detach().numpy().T)


# ------------------------------------------------------------------ full size with data (opt-in)
@pytest.mark.skipif(not FULL, reason="set MINDBOOTH_FULL_SIZE=1 to run (~3 min, ~28 GB in the temp dir)")
def test_full_size_random_file_converts_loads_and_round_trips(tmp_path, base_expected):
    import filecmp

    src, ckpt, back = tmp_path / "full.safetensors", tmp_path / "full.ckpt", tmp_path / "back.safetensors"
    write_random(src, read_key_yaml(KEYS / "torch_key_base.yaml"), "fp16", seed=3)
    conversion.official_to_mindspore(src, ckpt, base_expected, progress=False)
    with CkptReader(ckpt) as out, SafetensorsReader(src) as source:
        assert out.shapes() == base_expected  # exactly the full model's parameters: a strict load
        for name, t in out.tensors.items():
            assert t.dtype == "F32"
            assert np.array_equal(out.read(name), source.read(mindspore_to_official_name(name)).astype(np.float32))
    conversion.mindspore_to_official(ckpt, back, base_expected, dtype="fp16", progress=False)
    assert filecmp.cmp(src, back, shallow=False)


def test_unchanged_tensors_are_copied_by_the_kernel_exactly(tmp_path, tiny_file, tiny_expected, monkeypatch):
    """fp16 -> fp16 tensors skip this process (copy_file_range, as `cp`): the file is byte for byte the one
    written by reading and writing each tensor, with or without the kernel copy, and round-trips exactly."""
    kernel = tmp_path / "kernel.ckpt"
    conversion.official_to_mindspore(tiny_file, kernel, tiny_expected, dtype="fp16", progress=False)
    back = tmp_path / "back.safetensors"
    conversion.mindspore_to_official(kernel, back, tiny_expected, dtype="fp16", progress=False)
    assert back.read_bytes() == tiny_file.read_bytes()

    def no_kernel_copy(*args):
        raise OSError(errno.EXDEV, "cross-device")  # as on kernels/filesystems without copy_file_range

    with monkeypatch.context() as patch:
        patch.setattr(os, "copy_file_range", no_kernel_copy)
        fallback = tmp_path / "fallback.ckpt"
        conversion.official_to_mindspore(tiny_file, fallback, tiny_expected, dtype="fp16", progress=False)

    def copy_through_numpy(self, name, dtype, shape, src_fd, offset, nbytes):
        data = np.frombuffer(os.pread(src_fd, nbytes, offset), dtype=np.float16).reshape(shape)
        self.write(name, dtype, data)

    with monkeypatch.context() as patch:
        patch.setattr(CkptWriter, "copy", copy_through_numpy)
        through = tmp_path / "through.ckpt"
        conversion.official_to_mindspore(tiny_file, through, tiny_expected, dtype="fp16", progress=False)
    assert kernel.read_bytes() == fallback.read_bytes() == through.read_bytes()
    params = ms.load_checkpoint(str(kernel))
    with SafetensorsReader(tiny_file) as source:
        for ms_name, param in params.items():
            assert np.array_equal(param.asnumpy(), source.read(mindspore_to_official_name(ms_name))), ms_name


def test_kernel_copy_of_a_short_input_is_an_error(tmp_path):
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(b"x" * 10)
    with open(src, "rb") as s, open(dst, "wb") as d:
        message = error_of(copy_range, s.fileno(), d, 4, 100, "w")
    assert "input ended while copying 'w' (6 of 100 bytes)" in message


# ------------------------------------------------------------------ the model built while the tensors are written
def test_model_names_arriving_late_give_the_same_file(tmp_path, tiny_file, tiny_expected):
    """The command line passes the model's names as a function (the model is built in a child meanwhile)."""
    for name, fn, src in (("pt_to_ms", conversion.official_to_mindspore, tiny_file),
                          ("ms_to_pt", conversion.mindspore_to_official, tmp_path / "now_pt_to_ms.ckpt")):
        suffix = ".ckpt" if name == "pt_to_ms" else ".safetensors"
        now, late = tmp_path / f"now_{name}{suffix}", tmp_path / f"late_{name}{suffix}"
        fn(src, now, tiny_expected, dtype="fp16", progress=False)
        fn(src, late, lambda: tiny_expected, dtype="fp16", progress=False)
        assert now.read_bytes() == late.read_bytes(), name


@pytest.mark.parametrize("task", ["pt_to_ms", "ms_to_pt"])
def test_a_late_mismatch_leaves_no_output(tmp_path, tiny_file, tiny_expected, task):
    name = "model.diffusion_model.out.2.weight"
    other = dict(tiny_expected, **{name: (8,) + tuple(tiny_expected[name][1:])})  # a model with 8 output channels
    if task == "pt_to_ms":
        fn, src, dst, wrong = conversion.official_to_mindspore, tiny_file, tmp_path / "out.ckpt", name
    else:
        src = tmp_path / "in.ckpt"
        conversion.official_to_mindspore(tiny_file, src, tiny_expected, dtype="fp16", progress=False)
        fn, dst, wrong = conversion.mindspore_to_official, tmp_path / "out.safetensors", name
    up_front = error_of(fn, src, dst, other, progress=False)
    seen = []

    def model_names():
        seen.append(partials(dst)[0].stat().st_size)  # called once everything is written
        return other

    assert error_of(fn, src, dst, model_names, progress=False) == up_front
    assert wrong in up_front and "wrong shape" in up_front
    assert seen and seen[0] > 0.9 * src.stat().st_size
    assert not dst.exists() and not partials(dst)


def test_a_file_of_another_kind_is_refused_before_writing(tmp_path, tiny_expected):
    src = sparse_safetensors(tmp_path / "lora.safetensors", {"unet.down.lora_up.weight": (4, 4)})
    called = []
    message = error_of(conversion.official_to_mindspore, src, tmp_path / "out.ckpt",
                       lambda: called.append(1) or tiny_expected, progress=False, family=SDXL)
    assert message == f"{src} looks like a LoRA file, not a full model, not SDXL base 1.0"
    assert not called and sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]
