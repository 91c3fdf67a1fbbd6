"""The train step compiled in a child process and loaded from MindSpore's compile cache (mindbooth/compile_cache.py):
the same training, bit for bit, as compiling it in the training process; a later run with the same graphs loads them
without a child; a child that fails leaves nothing a run could load."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from mindbooth.checkpoint import read_checkpoint
from mindbooth.compile_cache import PRECOMPILE_ENV, cache_folder, compile_in_child, is_complete
from tiny_workspace import make_workspace

SCRIPT = ROOT / "train_dreambooth.py"


def _command(workspace, save_path, *extra):
    """The command line of train_dreambooth.py as a user runs it (the entry point: the only case where the cache is used)."""
    return [sys.executable, str(SCRIPT), "--config", str(workspace / "train.yaml"), "--weight", str(workspace / "tiny.ckpt"),
            "--instance_data_path", str(workspace / "subject"), "--instance_prompt", "a photo of sks toy",
            "--class_data_path", str(workspace / "class"), "--class_prompt", "a photo of toy", "--num_class_images", "2",
            "--device_target", "CPU", "--ms_mode", "0", "--save_path", str(save_path), "--save_ckpt_interval", "1", *extra]


def _train(workspace, save_path, *extra):
    """Run `_command` to its end; it must succeed."""
    run = subprocess.run(_command(workspace, save_path, *extra), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _rows(save_path):
    with open(save_path / "loss.csv") as handle:
        return list(csv.DictReader(handle))


def _cache_files(save_path):
    return {p.relative_to(save_path): p.stat().st_mtime_ns for p in (save_path / "compile_cache").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("compile_cache"))


@pytest.fixture(scope="module")
def runs(workspace):
    """Run a: 2 steps with the step compiled in a child, then resumed to 3 steps (same graphs: loaded, no child).
    Run b: 3 steps compiled in the training process."""
    run_a, run_b = workspace / "run_a", workspace / "run_b"
    _train(workspace, run_a, "--total_step", "2")
    files_after_first = _cache_files(run_a)
    _train(workspace, run_a, "--total_step", "3", "--resume", str(run_a))
    _train(workspace, run_b, "--total_step", "3", "--compile_in_child", "False")
    return run_a, run_b, files_after_first


def test_training_with_the_step_compiled_in_a_child_equals_compiling_it_in_process(runs):
    run_a, run_b, _ = runs
    for name in ("SDXL-tiny_3_lora.ckpt", "state/step_3_optimizer.ckpt"):
        a, b = read_checkpoint(run_a / name), read_checkpoint(run_b / name)
        assert a.keys() == b.keys() and len(a) > 0
        for key in b:
            np.testing.assert_array_equal(a[key].asnumpy(), b[key].asnumpy(), err_msg=f"{name}: {key}")
    lora = read_checkpoint(run_b / "SDXL-tiny_3_lora.ckpt")
    assert max(np.abs(v.asnumpy()).max() for k, v in lora.items() if ".lora_B." in k) > 0  # trained: B moved from 0
    rows_a, rows_b = _rows(run_a), _rows(run_b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == ["1", "2", "3"]
    for column in ("loss", "loss_instance", "loss_class", "grad_norm"):
        assert [r[column] for r in rows_a] == [r[column] for r in rows_b], column
    # one graph for every step: the graph loaded from the cache served the real batches
    assert {r["compiled_step_graphs"] for r in rows_a} == {"1"}


def test_the_child_leaves_both_graphs_and_a_resumed_run_loads_them_without_a_child(runs):
    run_a, run_b, files_after_first = runs
    folders = [p for p in (run_a / "compile_cache").iterdir()]
    assert len(folders) == 1 and is_complete(folders[0])  # no .partial left, one key for both runs of run_a
    graphs = list(folders[0].rglob("*.mindir"))
    assert len(graphs) == 2  # the gradient step and the optimizer step
    # The child marked the folder complete after writing both graphs; a training process that compiled instead of
    # loading would have written them again (MindSpore rewrites a cache that does not match).
    completed = (folders[0] / "complete.json").stat().st_mtime_ns
    assert all(graph.stat().st_mtime_ns <= completed for graph in graphs)
    assert _cache_files(run_a) == files_after_first  # the resumed run wrote nothing either: it loaded
    assert not (run_b / "compile_cache").exists()


def test_a_failed_child_leaves_no_folder_and_says_why(tmp_path, capsys):
    """A child that stops at a bad input ends the run with its own line (no note, no second try in this process,
    which would fail the same way); a child that fails otherwise leaves the compile to this process, with a note."""
    script = tmp_path / "fails.py"
    script.write_text("import sys\nsys.exit('error: --weight not found')\n")
    folder = cache_folder(tmp_path / "cache", script, {"inputs": [1, 2]})
    with pytest.raises(SystemExit, match="^error: --weight not found$"):
        compile_in_child(folder, script, [])
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert capsys.readouterr().err == ""
    script.write_text("raise RuntimeError('compiler crashed')\n")
    assert compile_in_child(folder, script, []) is False and not folder.exists()
    assert "note: the train step could not be compiled in a child process" in capsys.readouterr().err
    # a child that exits cleanly without compiling both graphs is no better
    script.write_text("pass\n")
    assert compile_in_child(folder, script, []) is False and not folder.exists()


def test_folders_of_dead_runs_children_are_removed_and_live_ones_kept(tmp_path):
    from mindbooth.compile_cache import remove_stale_partials

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = tmp_path / f"0123abcd.partial-{int(ended.stdout)}", tmp_path / f"0123abcd.partial-{os.getpid()}"
    for folder in (dead, alive, tmp_path / "0123abcd"):
        (folder / "graphs").mkdir(parents=True)
    assert remove_stale_partials(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["0123abcd", alive.name])


def _processes_with(variable: str, prefix: str) -> list:
    """Live (not zombie) processes whose environment has `variable` set to a value starting with `prefix`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            continue
        if state != "Z" and any(e.startswith(f"{variable}={prefix}".encode()) for e in environ):
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_trainer_takes_its_compile_child_along_and_the_next_run_cleans_up(workspace):
    """kill -9 of the trainer while its child compiles: 5 s later no process of the run is left; the next run
    removes what the child left, trains, and leaves no .partial-* folder."""
    run = workspace / "run_killed"
    trainer = subprocess.Popen(_command(workspace, run, "--total_step", "1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, child_seen = time.time() + 300, None
        while time.time() < deadline and trainer.poll() is None:
            children = _processes_with(PRECOMPILE_ENV, str(run))
            child_seen = child_seen or (time.time() if children else None)
            partials = list((run / "compile_cache").glob("*.partial-*")) if (run / "compile_cache").is_dir() else []
            if children and (partials or time.time() - child_seen > 15):  # compiling
                break
            time.sleep(0.2)
        assert child_seen and trainer.poll() is None, "the trainer's compile child was not seen"
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
        time.sleep(5)
        assert _processes_with(PRECOMPILE_ENV, str(run)) == []
    finally:
        if trainer.poll() is None:
            trainer.kill()
    _train(workspace, run, "--total_step", "1")
    assert len(_rows(run)) == 1 and not list((run / "compile_cache").glob("*.partial-*"))


def test_the_folder_name_changes_with_what_shapes_the_graph(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("# v1\n")
    base = cache_folder(tmp_path, script, {"inputs": [2, 4, 4, 4], "model": {"rank": 4}})
    assert base == cache_folder(tmp_path, script, {"model": {"rank": 4}, "inputs": [2, 4, 4, 4]})  # order-free
    assert base != cache_folder(tmp_path, script, {"inputs": [2, 4, 8, 8], "model": {"rank": 4}})
    assert base != cache_folder(tmp_path, script, {"inputs": [2, 4, 4, 4], "model": {"rank": 8}})
    script.write_text("# v2\n")  # the script's source is part of the key
    assert base != cache_folder(tmp_path, script, {"inputs": [2, 4, 4, 4], "model": {"rank": 4}})


def test_the_cache_switches_are_set_in_the_block_only_and_restored_after_an_error(tmp_path, monkeypatch):
    from mindbooth.compile_cache import compile_cache

    monkeypatch.delenv("MS_COMPILER_CACHE_ENABLE", raising=False)
    monkeypatch.setenv("MS_COMPILER_CACHE_PATH", "/users/own/path")  # a value the user set before stays theirs
    with pytest.raises(RuntimeError, match="inside"):
        with compile_cache(tmp_path):
            assert os.environ["MS_COMPILER_CACHE_ENABLE"] == "1"
            assert os.environ["MS_COMPILER_CACHE_PATH"] == str(tmp_path)
            raise RuntimeError("inside")
    assert "MS_COMPILER_CACHE_ENABLE" not in os.environ
    assert os.environ["MS_COMPILER_CACHE_PATH"] == "/users/own/path"


def test_release_weights_frees_them_and_keeps_what_compiling_reads():
    """The child's weights: the same shapes, dtypes and names, their memory given back (RSS falls by about their
    size)."""
    import ctypes

    from mindspore import nn

    from mindbooth.compile_cache import release_weights

    def rss_gib():
        libc.malloc_trim(0)  # freed heap pages go back to the OS
        return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 2**20

    # As in the compile child, whose model build freed large blocks: glibc then serves 16 MiB blocks from its heap
    # (freeing a mapped 30 MiB block raises its mmap threshold), where freed pages are reused. A release that
    # allocated new storage in their place gave nothing back here (it did in a fresh process, from untouched pages).
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free(ctypes.c_void_p(libc.malloc(30 * 2**20)))
    net = nn.SequentialCell([nn.Dense(2048, 2048) for _ in range(16)])  # 256 MiB of fp32 weights
    for param in net.get_parameters():
        param.requires_grad = False
    net.append(nn.Dense(8, 8))  # trained (a full fine-tune's weights): released too
    before = [(p.name, p.shape, p.dtype) for p in net.get_parameters()]
    rss = rss_gib()
    assert release_weights(net) == 34
    assert [(p.name, p.shape, p.dtype) for p in net.get_parameters()] == before
    assert rss - rss_gib() > 0.2  # of the 0.25 GiB released


def test_the_cached_optimizer_step_holds_no_constant_of_the_trainable_size(tmp_path):
    """ApplyStep's graph file stays small with 4M trainable values: a constant as large as the gradients (a cleared
    buffer's zeros) would make a full fine-tune's file > 2 GB, which MindSpore cannot write or read. In a script of its
    own: MindSpore's cache reads the entry script (a pytest worker's is `-c`)."""
    script = tmp_path / "compile_apply_step.py"
    script.write_text(f"""import sys
import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor
sys.path.insert(0, {str(ROOT)!r})
from mindbooth.compile_cache import compile_cache
from mindbooth.optim import AdamW
from mindbooth.train_step import ApplyStep, make_buffers

ms.set_context(mode=ms.GRAPH_MODE)
params = [Parameter(Tensor(np.ones(1 << 21, np.float32)), name=name) for name in ("a", "b")]
buffers = make_buffers(params)
apply_step = ApplyStep(buffers, AdamW(params), accumulation_steps=1, clip_grad=True, max_grad_norm=1.0)
with compile_cache({str(tmp_path / "cache")!r}):
    apply_step.compile()
buffers[0].set_data(Tensor(np.full(buffers[0].shape, 0.5, np.float32)))
apply_step()
print("STEP", int(buffers[0].asnumpy().any()), float(params[0].asnumpy().max()))
""")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    cleared, largest = run.stdout.split("STEP")[1].split()
    assert cleared == "0" and float(largest) < 1.0  # cleared, and the step was taken
    graphs = list((tmp_path / "cache").rglob("*.mindir"))
    assert graphs and sum(path.stat().st_size for path in graphs) < (1 << 20)  # the values alone would be 16 MiB
