"""How a built model computes. `plain`: the model as gm/ builds it, MindSpore's documented ops on any device. `cpu`:
MindBooth's CPU backend (gm/backends/cpu) swaps layers for forms on its fused kernels and for MindSpore-op forms
written around MindSpore's CPU buffers; the same parameters, names and results. `auto`: cpu where MindSpore targets the
CPU and the backend's kernels build, plain otherwise."""
import logging

import mindspore as ms

BACKENDS = ("auto", "plain", "cpu")

logger = logging.getLogger(__name__)


def _cpu_backend():
    """The CPU backend package, or None where it is missing (the plain model works without it)."""
    try:
        from gm.backends import cpu
    except ImportError:
        return None
    return cpu


def resolve_backend(name: str) -> str:
    """`name` with `auto` decided for this process: 'plain' or 'cpu'. A ValueError for an unknown name or a CPU
    backend that cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    if name == "plain":
        return name
    on_cpu = ms.get_context("device_target") == "CPU"
    cpu = _cpu_backend() if on_cpu else None
    if name == "auto":
        return "cpu" if cpu is not None and cpu.available() else "plain"
    if not on_cpu:
        raise ValueError(f"backend 'cpu' runs where MindSpore targets the CPU, not {ms.get_context('device_target')}; "
                         "use 'auto' or 'plain'")
    if cpu is None or not cpu.available():
        raise ValueError("backend 'cpu' needs MindBooth's CPU kernels, which did not build here (g++ missing or "
                         "failing: see the warning above); use 'auto' or 'plain'")
    return name


def apply_backend(model, name: str = "auto") -> str:
    """Make the built `model` compute with backend `name` (BACKENDS); returns the backend used, 'plain' or 'cpu'.
    Call again after adding layers (LoRA): layers already swapped stay as they are."""
    resolved = resolve_backend(name)
    if resolved == "cpu":
        swapped = _cpu_backend().apply(model)
        logger.debug("CPU backend: %d layers", swapped)
    return resolved


def cpu_kernel_library():
    """The path of the CPU backend's kernel library where MindSpore targets the CPU and it builds, else None: what a
    compiled graph of the cpu backend calls (its file name hashes the kernels' sources)."""
    return _cpu_backend().kernels.library_path() if resolve_backend("auto") == "cpu" else None
