"""mimalloc in place of glibc's malloc for MindSpore on CPU.

MindSpore's CPU runtime allocates through malloc; with mimalloc preloaded it compiles faster and peaks lower
(docs/performance.md, "mimalloc"). A preloaded allocator must be in
place before the process starts, so `preload_mimalloc` re-executes the running script once, with LD_PRELOAD set,
before MindSpore is imported. `--allocator` is declared in mindbooth/config.py (add_allocator_flag).
mimalloc comes from PyPI (`cmeel-mimalloc`, in requirement.txt); without it everything runs on glibc's malloc.
"""
import glob
import os
import sys
import sysconfig

from mindbooth.config import early_flags

_DONE = "MINDBOOTH_ALLOCATOR_SET"  # set in the re-executed process: never re-execute twice


def mimalloc_library():
    """Path of the libmimalloc.so that `cmeel-mimalloc` installs, or None."""
    for key in ("platlib", "purelib"):
        found = sorted(glob.glob(os.path.join(sysconfig.get_paths()[key], "cmeel.prefix", "lib", "libmimalloc.so.*")))
        if found:
            return found[0]
    return None


def preload_env(allocator: str, env=None) -> dict:
    """A copy of `env` (default os.environ) whose processes start with `allocator` ('mimalloc' or 'system')."""
    env = dict(os.environ if env is None else env)
    library = mimalloc_library() if allocator == "mimalloc" else None
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "libmimalloc" not in p]
    if library:
        preload.insert(0, library)
        # mimalloc returns memory left free for 1 s (its default) to the OS, and the next step page-faults it back
        # in; 10 s keeps what a step frees and soon takes again, while never returning it grows the peak.
        env.setdefault("MIMALLOC_PURGE_DELAY", "10000")
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    return env


def preload_mimalloc(argv=None):
    """Re-execute this script with mimalloc preloaded, when it runs on CPU with `--allocator mimalloc` (the
    default) and mimalloc is installed. Otherwise it returns, having printed a hint if mimalloc is missing.
    Call it first thing in a script's `__main__`, before MindSpore is imported and before any other process
    is started (the re-executed process keeps the PID, so mpirun and msrun see the same worker)."""
    flags = early_flags(argv, allocator="mimalloc", device_target="Ascend")
    if flags.allocator != "mimalloc" or flags.device_target != "CPU" or os.environ.get(_DONE):
        return
    if "libmimalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    if mimalloc_library() is None:
        print("note: running on glibc's malloc; `pip install cmeel-mimalloc` compiles faster and peaks lower on CPU", file=sys.stderr)
        return
    env = preload_env("mimalloc")
    env[_DONE] = "mimalloc"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
