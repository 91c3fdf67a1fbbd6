"""MindBooth's fused fp32 CPU kernels (C++, vectorised, one thread per core) as MindSpore "aot" custom ops: GroupNorm
and LayerNorm, GEGLU's gating, SiLU, the fp16 -> fp32 weight cast, the axes-1-2 swap, nearest upsampling, and, through
the oneDNN library MindSpore ships, the stride-1 convolution (3x3 by Winograd's F(4x4, 3x3) where it pays), attention,
the frozen Dense layers' products on fp16 weights and the LoRA branches. docs/performance.md ("CPU backend and
kernels") says why each exists and what it gave.

The library is compiled once per source and machine with the system's g++ (`-march=native`) into a cache folder
(MINDBOOTH_KERNEL_CACHE, default ~/.cache/mindbooth/cpu_kernels). The oneDNN kernels need oneDNN's headers
(`pip install --no-deps onednn-devel`, done by scripts/setup.sh) and MindSpore's libdnnl.so.3; without them the library
is built without those kernels, and the backend uses MindSpore-op forms of those layers.
"""
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import mindspore as ms
from mindspore import ops


SOURCE_FOLDER = Path(__file__).resolve().parent
FAST_MATH_SOURCES = ("gelu.cc", "silu.cc", "attention.cc")  # -ffast-math: erff/expf vectorised through glibc's libmvec
SOURCES = ("norms.cc", "cast.cc", "transpose.cc", "upsample.cc", "scratch.cc")
ONEDNN_SOURCES = ("conv.cc", "winograd.cc", "attention.cc", "dense.cc", "lora.cc")  # need oneDNN's headers and library
ONEDNN_LIBRARY = "libdnnl.so.3"
COMPILER_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-pthread", "-fPIC", "-std=c++20")

logger = logging.getLogger(__name__)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def onednn_paths():
    """(include folder, library folder) for the oneDNN sources: onednn-devel's headers in this environment and the
    libdnnl.so.3 inside MindSpore; None where either is missing."""
    include = Path(sysconfig.get_path("data")) / "include"
    library = Path(ms.__file__).resolve().parent / "lib"
    if (include / "oneapi" / "dnnl" / "dnnl_threadpool_iface.hpp").is_file() and (library / ONEDNN_LIBRARY).is_file():
        return include, library
    return None


def _build_key(compiler: str, onednn) -> str:
    digest = hashlib.sha256(repr(onednn).encode())
    for path in sorted(SOURCE_FOLDER.glob("*.[ch]*")):
        if path.suffix in (".cc", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest.update(" ".join(COMPILER_FLAGS).encode() + version.encode() + _cpu_flags().encode())
    return digest.hexdigest()[:16]


def _compile(compiler: str, target: Path, onednn):
    """Compile into a private folder, then rename into place: concurrent processes (one per device) and an
    interrupted build never leave a partial library behind. `onednn`: onednn_paths(), or None to leave out the
    sources that need oneDNN."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    try:
        objects, link = [], []
        names = dict.fromkeys((*SOURCES, *FAST_MATH_SOURCES, *ONEDNN_SOURCES))  # each once, in order
        for name in (n for n in names if onednn is not None or n not in ONEDNN_SOURCES):
            flags = ["-ffast-math"] if name in FAST_MATH_SOURCES else []
            if name in ONEDNN_SOURCES:
                flags.append(f"-I{onednn[0]}")
            obj = work / (name + ".o")
            subprocess.run([compiler, *COMPILER_FLAGS, *flags, "-c", str(SOURCE_FOLDER / name), "-o", str(obj)],
                           check=True, capture_output=True, text=True)
            objects.append(str(obj))
        if onednn is not None:
            link = [f"-L{onednn[1]}", f"-l:{ONEDNN_LIBRARY}", f"-Wl,-rpath,{onednn[1]}"]
        library = work / target.name
        subprocess.run([compiler, *COMPILER_FLAGS, "-shared", *objects, *link, "-o", str(library)], check=True,
                       capture_output=True, text=True)
        os.replace(library, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _library():
    """(path, has the oneDNN convolution) of the compiled kernel library, built on first use: with the convolution
    where oneDNN is found, else (or if that fails to build) without it; (None, False) where nothing builds."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None or platform.system() != "Linux":
        logger.warning("MindBooth CPU kernels: no g++ found; using MindSpore's (slower) CPU kernels")
        return None, False
    cache = Path(os.environ.get("MINDBOOTH_KERNEL_CACHE", Path.home() / ".cache" / "mindbooth" / "cpu_kernels"))
    onednn = onednn_paths()
    for variant in ((onednn, None) if onednn is not None else (None,)):
        target = cache / f"libmindbooth_cpu_{_build_key(compiler, variant)}.so"
        if not target.is_file():
            try:
                _compile(compiler, target, variant)
            except (OSError, subprocess.CalledProcessError) as error:
                detail = getattr(error, "stderr", "") or str(error)
                logger.warning("MindBooth CPU kernels: build %s oneDNN failed (%s)", "with" if variant else "without",
                               detail.strip().splitlines()[-1] if detail.strip() else error)
                continue
        return str(target), variant is not None
    logger.warning("MindBooth CPU kernels: using MindSpore's CPU kernels")
    return None, False


def library_path():
    """The compiled kernel library's path, building it on first use; None where it cannot be built."""
    return _library()[0]


def available() -> bool:
    """Whether the kernel library builds here (and MindSpore would load it)."""
    path = library_path()
    allowed = os.environ.get("MS_CUSTOM_AOT_WHITE_LIST")  # MindSpore refuses custom-op libraries outside it
    if path is not None and allowed and not Path(path).resolve().is_relative_to(Path(allowed).resolve()):
        logger.warning("MindBooth CPU kernels: %s is outside MS_CUSTOM_AOT_WHITE_LIST; set MINDBOOTH_KERNEL_CACHE "
                       "inside it to use them", path)
        return False
    return path is not None


def has_onednn() -> bool:
    """Whether the library was built with the kernels that run on oneDNN (convolution, attention, Dense, LoRA)."""
    return available() and _library()[1]


def same_as_first(first, *rest):
    """out_shape/out_dtype of a kernel whose output is like its first input."""
    return first


def kernel(name: str, out_shape, out_dtype, bprop=None):
    """The custom primitive running `name` of the library; out_shape/out_dtype map the input shapes/dtypes to the
    output's (a tuple of them for several outputs). `bprop(*inputs, out, dout)` -> the inputs' gradients: the
    primitive's own backward, which Cell.recompute of an enclosing cell recomputes from (a Cell bprop would not)."""
    return ops.Custom(f"{library_path()}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot", bprop=bprop)


def kernel_with_backward(forward: str, backward: str, forward_shape=same_as_first):
    """kernel(forward) on one input x, whose bprop is the kernel `backward`(x, dout) -> dx (dx like x)."""
    backward_kernel = kernel(backward, same_as_first, same_as_first)

    def bprop(x, out, dout):
        return (backward_kernel(x, dout.astype(x.dtype)),)

    return kernel(forward, forward_shape, same_as_first, bprop=bprop)
