"""Streamlit demo: text-to-image with SDXL, SSD-1B, SD 1.5 or SD 2.1 (+ a DreamBooth LoRA) in MindSpore.

    streamlit run demo/sampling.py [-- --config configs/inference/sd_xl_base.yaml --weight base.ckpt[,lora.ckpt]
                                       --device_target CPU --ms_mode 0 --save_path outputs/demo]

Run it from the repository root: `.streamlit/config.toml` there binds the server to 127.0.0.1 (the page
reads weight files and writes images where its user says; do not expose it). The flags after `--`, or
the variables MINDBOOTH_CONFIG, MINDBOOTH_WEIGHT, MINDBOOTH_DEVICE, MINDBOOTH_MS_MODE, MINDBOOTH_SAVE_PATH,
only fill in the page's defaults. The base model stays loaded between generations (one per config and
base file); changing the LoRA files or their scale does not reload it. The sidebar's model picker lists
configs/inference/*.yaml (any other YAML path can be typed); the size defaults to the picked model's
`native_resolution`, and SDXL's ratio table is offered only for size-conditioned models (SDXL, SSD-1B).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
import streamlit as st  # noqa: E402
from PIL import Image  # noqa: E402

from mindbooth import sampling_model  # noqa: E402
from mindbooth.config import load_config  # noqa: E402
from mindbooth.file_identity import file_identity  # noqa: E402
from mindbooth.pipeline import SAMPLERS  # noqa: E402
from mindbooth.sampling_cli import SD_XL_BASE_RATIOS, safe_stem, save_png  # noqa: E402

CUSTOM_SIZE = "custom"
NATIVE_SIZE = "native"
ROOT = Path(__file__).resolve().parents[1]
INFERENCE_CONFIGS = ROOT / "configs" / "inference"


def shown_path(path: Path) -> str:
    """`path` relative to the working directory where it lies under it (the repository root, usually), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def model_choices() -> dict:
    """The model picker's entries: path of each configs/inference/*.yaml -> its label ("SD-1.5  (sd_v1.5.yaml)")."""
    choices = {}
    for path in sorted(INFERENCE_CONFIGS.glob("*.yaml")):
        try:
            version = load_config(path).get("version", path.stem)
        except Exception:  # noqa: BLE001 - a broken YAML is still listed; loading it reports the problem
            version = path.stem
        choices[shown_path(path)] = f"{version}  ({path.name})"
    return choices


def model_traits(config_path: str):
    """(native resolution, size-conditioned) of the config at `config_path`; SDXL's (1024, True) while it cannot be read
    (generating then reports the problem)."""
    try:
        config = load_config(config_path)
        return sampling_model.native_resolution(config), sampling_model.size_conditioned(config)
    except Exception:  # noqa: BLE001 - a path being typed, a broken YAML
        return sampling_model.DEFAULT_NATIVE_RESOLUTION, True


def page_defaults() -> dict:
    """Defaults from `streamlit run demo/sampling.py -- FLAGS`, else from MINDBOOTH_* variables."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=os.environ.get("MINDBOOTH_CONFIG", "configs/inference/sd_xl_base.yaml"))
    parser.add_argument("--weight", default=os.environ.get("MINDBOOTH_WEIGHT", ""))
    parser.add_argument("--device_target", default=os.environ.get("MINDBOOTH_DEVICE", ms.get_context("device_target")))
    parser.add_argument("--ms_mode", type=int, default=int(os.environ.get("MINDBOOTH_MS_MODE", "0")))
    parser.add_argument("--save_path", default=os.environ.get("MINDBOOTH_SAVE_PATH", "outputs/demo"))
    own_argv = sys.argv[0] and Path(sys.argv[0]).resolve() == Path(__file__).resolve()
    args, _ = parser.parse_known_args(sys.argv[1:] if own_argv else [])  # not pytest's argv under AppTest
    weights = sampling_model.split_weights(args.weight)
    return {"config": args.config, "base": weights[0] if weights else "", "loras": ",".join(weights[1:]),
            "device_target": args.device_target, "ms_mode": args.ms_mode, "save_path": args.save_path}


@st.cache_resource(max_entries=1, show_spinner="Loading the model (once per config and base weights) ...")
def load_base_model(config: str, base_identity: tuple, ms_mode: int, device_target: str):
    """The base model, kept between generations and sessions; the key includes the file's size and mtime."""
    ms.set_context(mode=ms.GRAPH_MODE if ms_mode == 0 else ms.PYNATIVE_MODE)
    ms.set_device(device_target)
    return sampling_model.SamplingModel(config, base_identity[0])


def model_with_lora(config, base, loras, lora_scale, ms_mode, device_target):
    key = (str(Path(config).resolve()), file_identity(base), ms_mode, device_target)
    model = load_base_model(*key)
    try:
        model.set_lora(loras, lora_scale)
    except sampling_model.LoRARankChanged:  # new LoRA layers are needed: rebuild the model once
        load_base_model.clear()
        model = load_base_model(*key)
        model.set_lora(loras, lora_scale)
    return model


def sidebar(defaults: dict) -> dict:
    with st.sidebar:
        st.header("Model")
        choices = model_choices()
        st.session_state.setdefault("config", defaults["config"])  # the text box below; the picker writes into it
        picked = next((path for path in choices if Path(path).resolve() == Path(st.session_state["config"]).resolve()), None)

        def use_picked():
            if st.session_state["model_picker"] is not None:
                st.session_state["config"] = st.session_state["model_picker"]

        st.selectbox("Model", list(choices), index=list(choices).index(picked) if picked else None, format_func=choices.get,
                     placeholder="another config: type its path below", key="model_picker", on_change=use_picked)
        config = st.text_input("Model config (YAML)", key="config")
        base = st.text_input("Base weights (.ckpt / .safetensors)", defaults["base"], key="base_weight")
        loras = st.text_input("LoRA weights (comma-separated, optional)", defaults["loras"], key="lora_weights")
        lora_scale = st.slider("LoRA scale", 0.0, 2.0, 1.0, 0.05, key="lora_scale")
        save_path = st.text_input("Save images to folder", defaults["save_path"], key="save_path")
        st.caption(f"Device {defaults['device_target']}, {'GRAPH' if defaults['ms_mode'] == 0 else 'PYNATIVE'} mode: "
                   "chosen when the server starts (`streamlit run demo/sampling.py -- --device_target CPU --ms_mode 1`).")
    return {"config": config.strip(), "base": base.strip(), "loras": loras, "lora_scale": lora_scale, "save_path": save_path.strip()}


def sampling_controls(native: int, with_size_conditioning: bool) -> dict:
    """The sampling widgets; the size defaults to the model's `native` side, SDXL's ratio table only
    `with_size_conditioning` (SDXL, SSD-1B)."""
    prompt = st.text_area("Prompt", "a photo of sks dog", key="prompt")
    negative_prompt = st.text_input("Negative prompt (empty: SDXL base zeroes its text embeddings)", "", key="negative_prompt")
    left, middle, right = st.columns(3)
    sampler = left.selectbox("Sampler", list(SAMPLERS), key="sampler")
    steps = middle.number_input("Steps", 1, 1000, 40, key="steps")
    guidance = right.number_input("Guidance scale", 0.0, 30.0, 5.0, 0.5, key="guidance")
    left, middle, right = st.columns(3)
    sizes = {NATIVE_SIZE: (native, native), **(SD_XL_BASE_RATIOS if with_size_conditioning else {})}
    ratio = left.selectbox("Size (width/height ratio)", [*sizes, CUSTOM_SIZE], index=0,
                           format_func=lambda r: r if r == CUSTOM_SIZE else f"{r}: {sizes[r][0]}x{sizes[r][1]}", key="ratio")
    if ratio == CUSTOM_SIZE:
        width = middle.number_input("Width", 32, 4096, native, 32, key="width")
        height = right.number_input("Height", 32, 4096, native, 32, key="height")
    else:
        width, height = sizes[ratio]
    left, middle, _ = st.columns(3)
    seed = left.number_input("Seed", 0, 2**32 - 1, 42, key="seed")
    num_images = middle.number_input("Number of images", 1, 16, 1, key="num_images")
    return {"prompt": prompt.strip(), "negative_prompt": negative_prompt, "sampler": sampler, "steps": int(steps),
            "guidance": float(guidance), "width": int(width), "height": int(height), "seed": int(seed), "num_images": int(num_images)}


def check(model_settings: dict, sampling: dict):
    """A one-line message for the first thing that is wrong, else None."""
    if not Path(model_settings["config"]).is_file():
        return f"model config not found: {model_settings['config']}"
    if not model_settings["base"]:
        return "give the base weights file (e.g. checkpoints/sd_xl_base_1.0_ms.ckpt)"
    for path in [model_settings["base"], *sampling_model.split_weights(model_settings["loras"])]:
        if not Path(path).is_file():
            return f"weight file not found: {path}"
    if not sampling["prompt"]:
        return "the prompt is empty"
    if not model_settings["save_path"]:
        return "give a folder to save the images in"
    return None


def generate(model_settings: dict, sampling: dict, defaults: dict):
    model = model_with_lora(model_settings["config"], model_settings["base"], sampling_model.split_weights(model_settings["loras"]),
                            model_settings["lora_scale"], defaults["ms_mode"], defaults["device_target"])
    multiple = model.size_multiple
    if sampling["width"] % multiple or sampling["height"] % multiple:
        raise ValueError(f"width and height must be multiples of {multiple} for this model")
    progress = st.progress(0.0, text="sampling ...")

    def on_step(info):
        progress.progress((info["i"] + 1) / info["total"], text=f"step {info['i'] + 1}/{info['total']}")

    count = sampling["num_images"]
    with model.lock:  # another session may have switched the LoRA since: set it again (cheap) and sample at once
        model.set_lora(sampling_model.split_weights(model_settings["loras"]), model_settings["lora_scale"])
        images = model.generate(
            prompts=[sampling["prompt"]] * count, negative_prompts=[sampling["negative_prompt"]] * count,
            width=sampling["width"], height=sampling["height"], num_steps=sampling["steps"], guidance_scale=sampling["guidance"],
            sampler=sampling["sampler"], seed=sampling["seed"], callback=on_step)
    progress.empty()
    parameters = {**sampling, "weights": [Path(w).name for w in [model_settings["base"], *sampling_model.split_weights(model_settings["loras"])]],
                  "lora_scale": model_settings["lora_scale"]}
    stem = f"{safe_stem(sampling['prompt'])}-s{sampling['seed']}"
    paths = [save_png(Image.fromarray(image), model_settings["save_path"], f"{stem}-{i}", {**parameters, "image": i})
             for i, image in enumerate(images)]
    return images, paths


def main():
    st.set_page_config(page_title="MindBooth sampling", layout="wide")
    st.title("MindBooth: SDXL / SSD-1B / SD 1.5 / SD 2.1 + DreamBooth LoRA sampling")
    defaults = page_defaults()
    model_settings = sidebar(defaults)
    sampling = sampling_controls(*model_traits(model_settings["config"]))
    if st.button("Generate", type="primary", key="generate"):
        problem = check(model_settings, sampling)
        if problem:
            st.error(problem)
        else:
            try:
                images, paths = generate(model_settings, sampling, defaults)
                st.session_state["result"] = {"images": list(images), "paths": [str(p) for p in paths], "prompt": sampling["prompt"]}
            except (ValueError, FileNotFoundError, FloatingPointError) as error:
                st.error(str(error).strip().splitlines()[0])
    result = st.session_state.get("result")
    if result:  # kept across reruns, so changing a widget does not hide the last images
        st.image([np.asarray(image) for image in result["images"]], caption=[Path(p).name for p in result["paths"]])
        st.caption("saved: " + ", ".join(result["paths"]))


main()
