import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
KEYS = SHARED / "reference" / "sdxl_keys" / "mindone" / "model_conversion"
TINY_CONFIG = ROOT / "configs" / "inference" / "sd_xl_tiny.yaml"
BASE_CONFIG = ROOT / "configs" / "inference" / "sd_xl_base.yaml"
# The two ways a built model computes (gm.backends): parity tests run in both.
BACKENDS = ("plain", "cpu")


@pytest.fixture(autouse=True, scope="session")
def _mindspore_cpu():
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    yield


def read_key_yaml(path):
    """`name:(d0, d1)` lines -> {name: shape tuple}."""
    shapes = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        name, _, shape = line.partition(":")
        shapes[name] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return shapes
