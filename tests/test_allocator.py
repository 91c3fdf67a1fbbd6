"""The trainer and the command-line sampler run on CPU with mimalloc preloaded: the script re-executes itself
once (same PID, same arguments) with LD_PRELOAD set; `--allocator system` and non-CPU targets keep glibc's malloc."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from mindbooth.allocator import mimalloc_library, preload_env

# A script that calls preload_mimalloc like train_dreambooth.py does, then reports what it runs with.
PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
print("start", os.getpid(), flush=True)
from mindbooth.allocator import preload_mimalloc
if __name__ == "__main__":
    preload_mimalloc()
with open("/proc/self/maps") as f:
    mapped = any("libmimalloc" in line for line in f)
print(json.dumps({{"pid": os.getpid(), "argv": sys.argv[1:], "mimalloc_mapped": mapped}}), flush=True)
"""

needs_mimalloc = pytest.mark.skipif(mimalloc_library() is None, reason="cmeel-mimalloc is not installed")


def run_probe(tmp_path, *args, env=None):
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(root=str(ROOT)))
    env = preload_env("system", env)  # the test process itself may run with a preload
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=60,
                         check=True)
    lines = out.stdout.splitlines()
    starts = [line for line in lines if line.startswith("start")]
    return starts, json.loads(lines[-1]), out.stderr


@needs_mimalloc
def test_cpu_run_reexecutes_once_with_mimalloc(tmp_path):
    starts, report, _ = run_probe(tmp_path, "--device_target", "CPU", "--prompt", "a photo of sks dog")
    assert len(starts) == 2, starts  # the original process and its one re-execution
    assert starts[0].split()[1] == starts[1].split()[1] == str(report["pid"])  # exec keeps the PID (mpirun, msrun)
    assert report["argv"] == ["--device_target", "CPU", "--prompt", "a photo of sks dog"]
    assert report["mimalloc_mapped"]


@pytest.mark.parametrize("args", [["--device_target", "CPU", "--allocator", "system"], ["--device_target", "Ascend"]])
def test_system_allocator_and_other_devices_do_not_reexecute(tmp_path, args):
    starts, report, _ = run_probe(tmp_path, *args)
    assert len(starts) == 1
    assert not report["mimalloc_mapped"]


@needs_mimalloc
def test_an_existing_preload_is_kept(tmp_path):
    other = "/nonexistent/libother.so"  # the loader warns about a missing preload and goes on
    env = dict(os.environ, LD_PRELOAD=other)
    assert preload_env("mimalloc", env)["LD_PRELOAD"].split(":") == [mimalloc_library(), other]
    assert preload_env("system", preload_env("mimalloc", env))["LD_PRELOAD"] == other
    assert "LD_PRELOAD" not in preload_env("system", {"LD_PRELOAD": mimalloc_library()})


def test_missing_mimalloc_runs_on_and_says_how_to_get_it(monkeypatch, capsys):
    import mindbooth.allocator as allocator

    monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MINDBOOTH_ALLOCATOR_SET", raising=False)
    allocator.preload_mimalloc(["--device_target", "CPU"])  # returns instead of re-executing
    assert "pip install cmeel-mimalloc" in capsys.readouterr().err


def test_trainer_and_sampler_accept_the_flag():
    from mindbooth.config import training_parser
    from mindbooth.sampling_cli import sampling_parser

    assert training_parser().parse_args(["--config", "x.yaml", "--allocator", "system"]).allocator == "system"
    assert sampling_parser().parse_args(["--allocator", "mimalloc"]).allocator == "mimalloc"
    with pytest.raises(SystemExit):
        training_parser().parse_args(["--config", "x.yaml", "--allocator", "tcmalloc"])


@needs_mimalloc
def test_mimalloc_keeps_freed_memory_10_s_unless_told_otherwise():
    assert preload_env("mimalloc", {})["MIMALLOC_PURGE_DELAY"] == "10000"
    assert preload_env("mimalloc", {"MIMALLOC_PURGE_DELAY": "250"})["MIMALLOC_PURGE_DELAY"] == "250"
    assert "MIMALLOC_PURGE_DELAY" not in preload_env("system", {})
