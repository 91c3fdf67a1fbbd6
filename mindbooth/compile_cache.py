"""Graphs compiled in a short-lived child process, then loaded from MindSpore's compile cache.

Why: on MindSpore's CPU backend the compiler leaves memory in the process that compiles, on top of the training
peak; a process that loads the graph from the cache holds far less (docs/performance.md, "Compile in a child
process and compile cache"). So a child (the same script, `PRECOMPILE_ENV` naming the folder) compiles into the
cache and exits, and the parent loads. mindbooth/step_graphs.py uses this for the training step.

MindSpore picks a cached graph by the order graphs are compiled in and checks only a hash of the entry script and
the files it imports, not the network, its config or the input shapes. Hence: the folder is named by a hash of
everything that shapes the graphs (`cache_folder`); only those graphs are compiled with the cache switched on, in
the same order in both processes, and not at all when the user switched the cache on (`user_cache_enabled`); and
the cache is used only when the running script is the entry point (`is_entry_point`), as it is in the child.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mindspore as ms
from mindspore.common.initializer import Zero

from gm.backends import cpu_kernel_library
from gm.util import environment
from mindbooth.processes import death_signal_setter, pid_suffix, process_alive

PRECOMPILE_ENV = "MINDBOOTH_PRECOMPILE"  # set in the child: the folder to compile into
_COMPLETE = "complete.json"  # written once the child compiled both graphs
_PARTIAL = ".partial-"  # <hash>.partial-<pid of the training process>: the child's folder until it is complete
_ROOT = Path(__file__).resolve().parents[1]
_CACHE_ENABLE, _CACHE_PATH = "MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH"  # MindSpore's switches


def precompile_folder():
    """In the child: the folder its graphs are compiled into. None in every other process."""
    folder = os.environ.get(PRECOMPILE_ENV)
    return Path(folder) if folder else None


def is_entry_point(script) -> bool:
    """Whether `script` is the program being run (the only case where MindSpore's cache check can match)."""
    return os.path.realpath(sys.argv[0]) == os.path.realpath(script)


def _source_digest(script) -> str:
    digest = hashlib.sha256()
    for path in sorted([*_ROOT.glob("gm/**/*.py"), *_ROOT.glob("mindbooth/**/*.py"), Path(script).resolve()]):
        digest.update(str(path.relative_to(_ROOT) if path.is_relative_to(_ROOT) else path).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_folder(root, script, key_parts) -> Path:
    """root/<hash of key_parts, MindSpore's version, the sources of gm/, mindbooth/ and `script`, and the CPU kernel
    library the graphs may call (gm/backends/cpu/kernels), if any: its file name hashes the kernels' sources>."""
    key = json.dumps({"parts": key_parts, "mindspore": ms.__version__, "sources": _source_digest(script),
                      "cpu_kernels": cpu_kernel_library()},
                     sort_keys=True, default=str)
    return Path(root) / hashlib.sha256(key.encode()).hexdigest()[:20]


def is_complete(folder) -> bool:
    return (Path(folder) / _COMPLETE).is_file()


def compile_in_child(folder, script, argv) -> bool:
    """Make sure `folder` holds the compiled step graphs: run `script argv` as a child with PRECOMPILE_ENV set,
    unless an earlier run left them. The child writes into a private folder renamed into place on success, so
    an interrupted child leaves nothing that could be loaded; it is killed when this process ends, however it
    ends, and what a killed run's child left is removed here. Returns whether the graphs are there. A child that
    stops at a bad input (a line `error: ...`) ends this process with that line: it would fail the same way."""
    folder = Path(folder)
    remove_stale_partials(folder.parent)
    if is_complete(folder):
        return True
    partial = folder.with_name(f"{folder.name}{_PARTIAL}{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    result = subprocess.run([sys.executable, str(script), *argv], env={**os.environ, PRECOMPILE_ENV: str(partial)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
                            preexec_fn=death_signal_setter())
    if result.returncode != 0 or not is_complete(partial):
        shutil.rmtree(partial, ignore_errors=True)
        last_line = (result.stderr.strip().splitlines() or ["no message"])[-1]
        if last_line.startswith("error: "):
            raise SystemExit(last_line)
        print(f"note: the train step could not be compiled in a child process (exit code {result.returncode}: {last_line}); "
              "compiling it in this process", file=sys.stderr)
        return False
    try:
        partial.rename(folder)
    except OSError:  # another run put the same graphs there first
        shutil.rmtree(partial, ignore_errors=True)
    return is_complete(folder)


def remove_stale_partials(root) -> int:
    """Remove the `<hash>.partial-<pid>` folders in `root` whose process is gone (a run killed during its child's
    compile). Returns how many were removed."""
    removed = 0
    if not Path(root).is_dir():
        return removed
    for path in Path(root).glob(f"*{_PARTIAL}*"):
        pid = pid_suffix(path.name, _PARTIAL)
        if pid is not None and not process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def user_cache_enabled() -> bool:
    """Whether the user switched MindSpore's compile cache on for the whole process: its graphs would then take
    the cache's numbers before ours, and ours would no longer match the child's."""
    return os.environ.get(_CACHE_ENABLE) in ("1", "True", "true")


def compile_cache(folder):
    """MindSpore's compile cache on in `folder` (graphs compiled now are written there, or loaded if there).
    Its environment variables are read at each compile (set_context's enable_compile_cache is deprecated)."""
    return environment(**{_CACHE_ENABLE: "1", _CACHE_PATH: str(folder)})


def release_weights(net) -> int:
    """Give every parameter of `net` the storage of an uninitialised tensor of its shape and dtype, which holds none,
    instead of its data, which is freed. Compiling needs the parameters' shapes and dtypes, not their values: the
    child then compiles beside no weights at all, and its cached graphs carry none (a full fine-tune's weights,
    moments and gradient buffers are 13 GiB for SD 1.5: a graph file holding them could not be read back).
    Returns the number released.

    By assign_value: set_data (and a new Parameter) would allocate the uninitialised tensor's memory in its place."""
    released = 0
    for param in net.get_parameters():
        param.assign_value(ms.Tensor(shape=param.shape, dtype=param.dtype, init=Zero()))
        released += 1
    return released


def compile_step_graphs(folder, grad_step, apply_step, inputs):
    """Compile (in the child) or load (in the training process) the gradient step for `inputs`, then the
    optimizer step (None: the gradient step is a FusedStep, which takes the optimizer step too), in this order, with
    the cache in `folder`. The child, which only compiles, first releases the weights of both, and marks the folder
    complete."""
    folder = Path(folder)
    steps = [step for step in (grad_step, apply_step) if step is not None]
    if precompile_folder() == folder:
        for step in steps:
            release_weights(step)
    with compile_cache(folder):
        grad_step.compile(*inputs)
        if apply_step is not None:
            apply_step.compile()
    if precompile_folder() == folder:
        (folder / _COMPLETE).write_text(json.dumps({"graphs": ["grad_step", "apply_step"][:len(steps)]}))
