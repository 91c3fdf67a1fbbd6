"""The Streamlit demo (demo/sampling.py): driven with Streamlit's AppTest on the tiny SDXL, then served
once and rendered in headless Chromium (skipped when Chromium is not installed)."""
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from conftest import ROOT, TINY_CONFIG
from gm.util import instantiate_from_config
from mindbooth import sampling_model
from mindbooth.checkpoint import save_checkpoint_atomic
from mindbooth.config import load_config
from mindbooth.tiny_model import random_weights

PAGE = ROOT / "demo" / "sampling.py"
SD15_TINY = ROOT / "configs" / "inference" / "sd_v1.5_tiny.yaml"


@pytest.fixture(scope="module")
def base_weight(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.ckpt"
    save_checkpoint_atomic(random_weights(instantiate_from_config(load_config(TINY_CONFIG).model), seed=1), path)
    yield path
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the page compiled in GRAPH_MODE


def fill_and_generate(app, timeout=240):
    app.button(key="generate").click().run(timeout=timeout)
    assert not app.exception, app.exception
    assert not app.error, [e.value for e in app.error]


def test_generate_shows_saves_and_keeps_the_model_loaded(base_weight, tmp_path, monkeypatch):
    built = []

    class CountingModel(sampling_model.SamplingModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(sampling_model, "SamplingModel", CountingModel)
    monkeypatch.setenv("MINDBOOTH_MS_MODE", "0")
    st.cache_resource.clear()
    app = AppTest.from_file(str(PAGE), default_timeout=60).run()
    assert not app.exception, app.exception
    save_path = tmp_path / "out"
    app.text_input(key="config").input(str(TINY_CONFIG))
    app.text_input(key="base_weight").input(str(base_weight))
    app.text_input(key="save_path").input(str(save_path))
    app.text_area(key="prompt").input("a photo of sks toy")
    app.number_input(key="steps").set_value(2)
    app.selectbox(key="ratio").select("custom").run()
    app.number_input(key="width").set_value(64)
    app.number_input(key="height").set_value(64)

    fill_and_generate(app)
    assert len(app.get("image")) == 1
    first = sorted(save_path.glob("*.png"))
    assert [p.name for p in first] == ["a_photo_of_sks_toy-s42-0.png"]
    # what the page saved is what the pipeline gives for these settings
    expected = built[0].generate(prompts=["a photo of sks toy"], width=64, height=64, num_steps=2, guidance_scale=5.0,
                                 sampler="EulerEDMSampler", seed=42)[0]
    assert np.array_equal(np.asarray(Image.open(first[0]).convert("RGB")), expected)

    app.number_input(key="seed").set_value(43)
    fill_and_generate(app)
    assert len(built) == 1  # the second generation reused the loaded model
    second = save_path / "a_photo_of_sks_toy-s43-0.png"
    assert second.is_file() and len(list(save_path.glob("*.png"))) == 2
    assert np.abs(np.asarray(Image.open(second), int) - expected).mean() > 5  # another seed, another image


def test_bad_settings_give_one_line_errors(base_weight, tmp_path):
    app = AppTest.from_file(str(PAGE), default_timeout=60).run()
    app.text_input(key="config").input(str(TINY_CONFIG))
    app.text_input(key="base_weight").input(str(tmp_path / "missing.ckpt"))
    app.button(key="generate").click().run()
    assert [e.value for e in app.error] == [f"weight file not found: {tmp_path / 'missing.ckpt'}"]
    assert not app.get("image")


@pytest.fixture(scope="module")
def sd15_weight(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights_sd15") / "sd15_tiny.ckpt"
    save_checkpoint_atomic(random_weights(instantiate_from_config(load_config(SD15_TINY).model), seed=2), path)
    return path


def test_model_picker_lists_the_inference_configs_and_sizes_follow_the_model(sd15_weight, tmp_path, monkeypatch):
    """The picker offers every configs/inference/*.yaml by its version and fills the config box; the size list is the
    picked model's native resolution (SDXL's ratio table only for size-conditioned models); an SD 1.5 model generates."""
    monkeypatch.setenv("MINDBOOTH_MS_MODE", "0")
    monkeypatch.setenv("MINDBOOTH_CONFIG", str(TINY_CONFIG))
    st.cache_resource.clear()
    app = AppTest.from_file(str(PAGE), default_timeout=60).run()
    assert not app.exception, app.exception
    picker = app.selectbox(key="model_picker")
    listed = {label.split("(")[-1].rstrip(")") for label in picker.options}  # labels: "<version>  (<file>)"
    assert listed == {p.name for p in (ROOT / "configs" / "inference").glob("*.yaml")}
    assert "SD-1.5-tiny  (sd_v1.5_tiny.yaml)" in picker.options and "SSD-1B  (ssd_1b.yaml)" in picker.options
    assert picker.value is not None and Path(picker.value).resolve() == TINY_CONFIG.resolve()  # the default is shown picked
    ratios = app.selectbox(key="ratio").options
    assert ratios[0] == "native: 64x64" and "1.0: 1024x1024" in ratios  # tiny SDXL: native 64, and SDXL's table

    picker.select(_shown_path(SD15_TINY)).run()  # the option's value: the config path as the page shows it
    assert not app.exception, app.exception
    assert Path(app.text_input(key="config").value).resolve() == SD15_TINY.resolve()
    assert app.selectbox(key="ratio").options == ["native: 64x64", "custom"]  # no size conditioning: no SDXL table
    save_path = tmp_path / "out"
    app.text_input(key="base_weight").input(str(sd15_weight))
    app.text_input(key="save_path").input(str(save_path))
    app.text_area(key="prompt").input("a photo of sks toy")
    app.number_input(key="steps").set_value(2)
    fill_and_generate(app)
    saved = sorted(save_path.glob("*.png"))
    assert [p.name for p in saved] == ["a_photo_of_sks_toy-s42-0.png"]
    image = np.asarray(Image.open(saved[0]).convert("RGB"))
    assert image.shape == (64, 64, 3)
    model = sampling_model.SamplingModel(SD15_TINY, sd15_weight)
    expected = model.generate(prompts=["a photo of sks toy"], width=64, height=64, num_steps=2, guidance_scale=5.0,
                              sampler="EulerEDMSampler", seed=42)[0]
    assert np.array_equal(image, expected)


def _shown_path(path: Path) -> str:
    """A config path as the picker's options hold it: relative to the working directory when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_health(port: int, server, log_path, timeout: float = 60):
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as answer:
                if answer.read() == b"ok":
                    return
        except OSError:
            pass
        assert server.poll() is None and time.time() < deadline, log_path.read_text()
        time.sleep(0.5)


def _screenshot_when_rendered(chromium, url, text, path, profile, timeout=60):
    """Headless Chromium driven over the DevTools protocol: wait (in real time) until the page shows `text`,
    then take a screenshot. (`chromium --screenshot` alone captures Streamlit's loading skeleton: its
    virtual-time budget does not wait for the page's websocket.)"""
    from websockets.sync.client import connect

    browser = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900",
                                "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in browser.stderr:
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "Chromium did not open its DevTools port"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            target = next(t["webSocketDebuggerUrl"] for t in json.load(answer) if t["type"] == "page")
        with connect(target, max_size=None) as devtools:
            ids = iter(range(1, 1 << 30))

            def call(method, **params):
                request_id = next(ids)
                devtools.send(json.dumps({"id": request_id, "method": method, "params": params}))
                while True:
                    message = json.loads(devtools.recv(timeout=30))
                    if message.get("id") == request_id:
                        return message.get("result", {})

            call("Page.navigate", url=url)
            deadline = time.time() + timeout
            check = f"document.body !== null && document.body.innerText.includes({json.dumps(text)})"
            while not call("Runtime.evaluate", expression=check, returnByValue=True).get("result", {}).get("value"):
                assert time.time() < deadline, f"the page never showed {text!r}"
                time.sleep(0.5)
            time.sleep(1.0)  # let the last widgets paint
            path.write_bytes(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
    finally:
        browser.terminate()
        browser.wait(timeout=20)


def test_page_renders_in_headless_chromium(base_weight, tmp_path):
    chromium = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); the AppTest checks above still ran")
    pytest.importorskip("websockets.sync.client", reason="the websockets package drives Chromium's DevTools protocol")
    port = _free_port()
    env = {**os.environ, "MINDBOOTH_CONFIG": str(TINY_CONFIG), "MINDBOOTH_WEIGHT": str(base_weight), "MINDBOOTH_SAVE_PATH": str(tmp_path)}
    log_path = tmp_path / "streamlit.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(PAGE), "--server.port", str(port)],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_health(port, server, log_path)
        assert f"http://127.0.0.1:{port}" in log_path.read_text()  # .streamlit/config.toml: bound to localhost only
        shot = tmp_path / "page.png"
        _screenshot_when_rendered(chromium, f"http://127.0.0.1:{port}/", "MindBooth", shot, tmp_path / "chromium-profile")
        pixels = np.asarray(Image.open(shot).convert("L"), np.float32)
        assert pixels.shape[1] == 1280 and pixels.shape[0] > 400
        assert pixels.std() > 20 and (pixels < 100).mean() > 0.01  # not blank: dark text and widgets were drawn
        if os.environ.get("MINDBOOTH_KEEP_SCREENSHOT"):
            shutil.copy(shot, os.environ["MINDBOOTH_KEEP_SCREENSHOT"])
    finally:
        server.terminate()
        server.wait(timeout=20)
