"""Processes of a run: whether a process that left a file behind still lives, and a child that dies with its parent."""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>: the signal a process gets when the thread that started it ends


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (a file named after a dead one is a leftover)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


def pid_suffix(name: str, marker: str):
    """The process id after the last `marker` in a file name (`x.partial-123` -> 123), or None."""
    _, found, tail = name.rpartition(marker)
    digits = tail.split(".", 1)[0]
    return int(digits) if found and digits.isdigit() else None


def death_signal_setter():
    """A function for subprocess's preexec_fn that has the child killed (SIGKILL) when this process ends, however
    it ends (kill -9 included): Linux's prctl(PR_SET_PDEATHSIG). None where there is no prctl. Resolved here, in
    the parent, so the forked child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    parent = os.getpid()

    def set_death_signal():
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent ended before the call: nothing will signal this child
            os._exit(1)

    return set_death_signal
