"""Data-parallel DreamBooth on the tiny model, with both launchers: 2 processes x batch 1 train exactly as
1 process x batch 2 (losses, gradient norms, optimizer moments, LoRA weights); class-image sampling is split
across ranks; only rank 0 writes; a killed rank or a missing launcher ends the job with an error in bounded time.

Every job runs in a temporary folder under a timeout; its processes carry a tag in their environment and are
killed by that tag afterwards, whatever happened (msrun puts its workers in sessions of their own)."""
import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from mindbooth.checkpoint import read_checkpoint
from tiny_workspace import make_workspace

SCRIPT = ROOT / "train_dreambooth.py"
MSRUN = Path(sys.executable).parent / "msrun"
MPIRUN = shutil.which("mpirun")
JOB_TIMEOUT_S = 420
NODE_LOSS_BOUND_S = 180  # a lost node ends the others within this (MindSpore's scheduler notices the missing heartbeats)
STEPS = 3
TAG = "MINDBOOTH_TEST_JOB"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny workspace with Adam's eps at 1e-6 (see _train_args)."""
    root = make_workspace(tmp_path_factory.mktemp("distributed"))
    config = OmegaConf.load(root / "train.yaml")
    config.optim.eps = 1.0e-6
    OmegaConf.save(config, root / "train.yaml")
    return root


def _train_args(workspace, save_path, class_folder, *extra):
    # Adam moves an element by lr * g / (|g| + eps): where g is near 0 (a LoRA A at the step after B left 0: some
    # elements' g is ~1e-10, all rounding), batch-1 vs batch-2 rounding can flip its sign, a 2 * lr jump. With eps
    # 1e-6 (typical |g| here ~3e-5) such an element moves by at most lr * 1e-4, and with lr 1e-4 every difference
    # stays far below the 1e-5 tolerance on the LoRA weights.
    return [str(SCRIPT), "--config", str(workspace / "train.yaml"), "--weight", str(workspace / "tiny.ckpt"),
            "--instance_data_path", str(workspace / "subject"), "--instance_prompt", "a photo of sks toy",
            "--class_data_path", str(class_folder), "--class_prompt", "a photo of toy", "--num_class_images", "2",
            "--device_target", "CPU", "--ms_mode", "0", "--total_step", str(STEPS), "--learning_rate", "1e-4",
            "--save_path", str(save_path), *extra]


def _tagged_pids(tag):
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"{TAG}={tag}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _kill_tagged(tag):
    for pid in _tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Job:
    """One launcher command in `folder`, output in folder/output.txt, its processes tagged for clean-up."""

    def __init__(self, command, folder: Path, compile_cache: Path = None, extra_env=None):
        self.folder, self.tag = folder, uuid.uuid4().hex
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **{TAG: self.tag})
        env.pop("PYTHONPATH", None)  # the script finds its packages beside itself, as a user's run does
        if compile_cache is not None:  # the launchers' jobs compile the same graphs: the second one reuses them
            env.update(MS_COMPILER_CACHE_ENABLE="1", MS_COMPILER_CACHE_PATH=str(compile_cache))
        env.update(extra_env or {})
        self.log = open(folder / "output.txt", "w")
        self.started = time.time()
        self.process = subprocess.Popen(command, cwd=folder, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def wait(self, timeout=JOB_TIMEOUT_S):
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(f"job did not end within {timeout} s: {self.output()[-3000:]}")
        finally:
            self.seconds = time.time() - self.started

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.folder / "output.txt").read_text(errors="replace")

    def close(self):
        _kill_tagged(self.tag)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def _finished(job):
    try:
        rc = job.wait()
        assert rc == 0, f"exit code {rc} after {job.seconds:.0f} s:\n{job.output()[-4000:]}"
    finally:
        job.close()
    return job


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# MindSpore's compile cache numbers graphs in the order a process compiles them and loads them back by that
# number. So every 2-rank job compiles the same graphs in the same order: each samples its 2 class images into
# an empty folder of its own (one per rank), then trains.

@pytest.fixture(scope="module")
def msrun_job(workspace):
    assert MSRUN.is_file(), f"msrun not found beside {sys.executable}: install mindspore in this environment"
    folder = workspace / "msrun"
    command = [str(MSRUN), "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
               f"--log_dir={folder / 'logs'}", "--join=True", *_train_args(workspace, workspace / "out_msrun", workspace / "class_msrun"),
               "--per_batch_size", "1", "--is_parallel", "True"]
    return _finished(Job(command, folder, workspace / "compile_cache_2_ranks"))


# On one machine every address is this host's, so each msrun would start the cluster's scheduler (msrun starts it
# where `master_addr` is local) and the second could not bind the port. Node 1 is told that the master is remote, as
# it is when node 1 is another host; everything else is the stock msrun.
REMOTE_NODE_MSRUN = ("from mindspore.parallel.cluster.process_entity import _api; _api._is_local_ip = lambda ip: False; "
                     "from mindspore.parallel.cluster.run import main; import sys; sys.argv[0] = 'msrun'; sys.exit(main())")


def _two_node_jobs(workspace, name, out, class_folder, compile_cache=None, *extra):
    """Node 0 and node 1 of one worker each (master 127.0.0.1), as the README's multi-node commands start them on
    two hosts."""
    port, jobs = _free_port(), []
    for node in (0, 1):
        folder = workspace / f"{name}{node}"
        launcher = [str(MSRUN)] if node == 0 else [sys.executable, "-c", REMOTE_NODE_MSRUN]
        command = [*launcher, "--worker_num=2", "--local_worker_num=1", "--master_addr=127.0.0.1",
                   f"--master_port={port}", f"--node_rank={node}", f"--log_dir={folder / 'logs'}", "--join=True",
                   *_train_args(workspace, out, class_folder), "--per_batch_size", "1", "--is_parallel", "True", *extra]
        jobs.append(Job(command, folder, compile_cache))
    return jobs


@pytest.fixture(scope="module")
def multinode_jobs(workspace, msrun_job):
    """Two nodes of one worker each: 2 ranks x batch 1."""
    jobs = _two_node_jobs(workspace, "node", workspace / "out_nodes", workspace / "class_nodes", workspace / "compile_cache_2_ranks")
    return [_finished(job) for job in jobs]


@pytest.fixture(scope="module")
def mpirun_job(workspace, msrun_job):
    if MPIRUN is None:
        pytest.skip("mpirun not found: apt-get install openmpi-bin libopenmpi-dev (.ci/run does)")
    # the user's command line, unchanged: the script maps OpenMPI's variables to MindSpore's itself
    command = [MPIRUN, "--allow-run-as-root", "-n", "2", sys.executable, *_train_args(workspace, workspace / "out_mpirun", workspace / "class_mpirun"),
               "--per_batch_size", "1", "--is_parallel", "True"]
    return _finished(Job(command, workspace / "mpirun", workspace / "compile_cache_2_ranks"))


@pytest.fixture(scope="module")
def single_job(workspace, msrun_job):
    """The reference: one process, batch 2, the same data order, the class images msrun sampled."""
    command = [sys.executable, *_train_args(workspace, workspace / "out_single", workspace / "class_msrun"), "--per_batch_size", "2"]
    return _finished(Job(command, workspace / "single"))


def _log(folder):
    with open(folder / "loss.csv") as handle:
        return list(csv.DictReader(handle))


def _arrays(path):
    return {k: v.asnumpy() for k, v in read_checkpoint(path).items()}


def _assert_same_training(parallel: Path, single: Path):
    rows, reference = _log(parallel), _log(single)
    assert [r["step"] for r in rows] == [str(s) for s in range(1, STEPS + 1)] == [r["step"] for r in reference]
    for column in ("loss", "loss_instance", "loss_class", "grad_norm"):  # the global batch's, on rank 0
        np.testing.assert_allclose([float(r[column]) for r in rows], [float(r[column]) for r in reference], rtol=1e-5, err_msg=column)
    lora, lora_reference = _arrays(parallel / f"SDXL-tiny_{STEPS}_lora.ckpt"), _arrays(single / f"SDXL-tiny_{STEPS}_lora.ckpt")
    assert lora.keys() == lora_reference.keys()
    assert max(np.abs(v).max() for k, v in lora_reference.items() if ".lora_B." in k) > 1e-4  # B moved from 0: not trivially equal
    for name, value in lora_reference.items():
        np.testing.assert_allclose(lora[name], value, rtol=0, atol=1e-5, err_msg=name)
    # Adam's moments carry the gradients' scale (weights alone would not show a sum in place of a mean over ranks)
    moments = _arrays(parallel / "state" / f"step_{STEPS}_optimizer.ckpt")
    moments_reference = _arrays(single / "state" / f"step_{STEPS}_optimizer.ckpt")
    assert moments.keys() == moments_reference.keys()
    for name, value in moments_reference.items():
        np.testing.assert_allclose(moments[name], value, rtol=0, atol=1e-3 * np.abs(value).max() + 1e-30, err_msg=name)


def test_msrun_two_ranks_of_batch_one_equal_one_process_of_batch_two(workspace, msrun_job, single_job):
    _assert_same_training(workspace / "out_msrun", workspace / "out_single")


def test_mpirun_two_ranks_of_batch_one_equal_one_process_of_batch_two(workspace, mpirun_job, single_job):
    _assert_same_training(workspace / "out_mpirun", workspace / "out_single")


def test_two_msrun_nodes_of_batch_one_equal_one_process_of_batch_two(workspace, multinode_jobs, single_job):
    _assert_same_training(workspace / "out_nodes", workspace / "out_single")
    node0, node1 = (job.folder / "logs" / f"worker_{rank}.log" for rank, job in enumerate(multinode_jobs))
    assert "done: LoRA in" in node0.read_text() and "done: LoRA in" not in node1.read_text()  # global rank 0 only
    assert not (multinode_jobs[1].folder / "logs" / "scheduler.log").exists()  # one scheduler: node 0's
    assert _files(workspace / "out_nodes") == [name for name in _files(workspace / "out_single")
                                               if name.split("/")[0] != "compile_cache"]


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_only_rank_zero_writes_one_output_folder(workspace, msrun_job, mpirun_job, single_job):
    # The single process compiled its step in a child (mindbooth/compile_cache.py); data parallel jobs compile in place.
    single = _files(workspace / "out_single")
    assert any(name.startswith("compile_cache/") and name.endswith(".mindir") for name in single)
    expected = [name for name in single if name.split("/")[0] != "compile_cache"]
    assert f"SDXL-tiny_{STEPS}_lora.ckpt" in expected and "sample_final.png" in expected and "loss.png" in expected
    for launcher in ("msrun", "mpirun"):
        assert _files(workspace / f"out_{launcher}") == expected, launcher
        assert len(_log(workspace / f"out_{launcher}")) == STEPS  # a second writer would have appended its rows too
    assert mpirun_job.output().count("done: LoRA in") == 1
    logs = msrun_job.folder / "logs"
    assert "done: LoRA in" in (logs / "worker_0.log").read_text() and "done: LoRA in" not in (logs / "worker_1.log").read_text()
    # nothing of the jobs' own lands outside their folders (MindSpore's per-rank folders, stray checkpoints)
    assert sorted(p.name for p in workspace.iterdir()) == sorted(
        ["train.yaml", "tiny.ckpt", "subject", "class_msrun", "class_mpirun", "compile_cache_2_ranks", "msrun", "mpirun",
         "single", "out_msrun", "out_mpirun", "out_single"] + sorted(
            p.name for p in workspace.iterdir() if p.name in ("node0", "node1", "out_nodes", "class_nodes")))


def test_class_images_are_sampled_once_split_across_ranks(workspace, msrun_job, mpirun_job):
    sampled = sorted(p.name for p in (workspace / "class_msrun").iterdir())
    assert len(sampled) == 2 and all(n.startswith("class_") and n.endswith(".png") for n in sampled), sampled
    for rank in (0, 1):  # each rank sampled exactly one of the two (names r, r + world_size, ...)
        log = (msrun_job.folder / "logs" / f"worker_{rank}.log").read_text()
        assert re.search(rf"sampling class images \(rank {rank}\): 100%\|[^|]*\| 1/1 ", log), log[-2000:]
    # each image's seed comes from its name, not from the rank that drew it: the other launcher's job drew the same
    assert sorted(p.name for p in (workspace / "class_mpirun").iterdir()) == sampled
    for name in sampled:
        assert (workspace / "class_mpirun" / name).read_bytes() == (workspace / "class_msrun" / name).read_bytes(), name


def _rank_pid(tag, rank):
    for pid in _tagged_pids(tag):
        try:
            environ = dict(e.split(b"=", 1) for e in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0") if b"=" in e)
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if environ.get(b"OMPI_COMM_WORLD_RANK") == str(rank).encode() and b"train_dreambooth.py" in cmdline:
            return pid
    return None


def test_a_killed_rank_ends_the_mpirun_job_and_its_scheduler(workspace, mpirun_job):
    """Rank 1 killed while sampling its class image (rank 0 then waits for it at the barrier after sampling):
    mpirun ends the job in seconds, and the scheduler rank 0 started leaves too."""
    out = workspace / "out_killed"
    command = [MPIRUN, "--allow-run-as-root", "-n", "2", sys.executable, *_train_args(workspace, out, workspace / "class_killed"),
               "--per_batch_size", "1", "--is_parallel", "True", "--total_step", "100000"]
    job = Job(command, workspace / "killed", workspace / "compile_cache_2_ranks")
    try:
        deadline = time.time() + JOB_TIMEOUT_S
        while "sampling class images (rank 1)" not in job.output():
            assert job.process.poll() is None and time.time() < deadline, job.output()[-3000:]
            time.sleep(0.5)
        victim = _rank_pid(job.tag, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        rc = job.wait(timeout=120)
        ended = time.time() - killed
        assert rc != 0 and ended < 60, (rc, ended)
        assert "rank 1" in job.output() and "signal 9" in job.output()
        while _tagged_pids(job.tag) and time.time() - killed < 90:
            time.sleep(0.5)
        assert not _tagged_pids(job.tag), "processes of the killed job survive"
    finally:
        job.close()
    for folder in (out, workspace / "killed", workspace / "class_killed"):
        shutil.rmtree(folder, ignore_errors=True)


def test_a_dead_node_ends_the_other_node_in_bounded_time(workspace, msrun_job):
    """Two msrun nodes training; node 1 dies whole (its msrun and worker killed, as when its host goes down) after a
    few steps: node 0's msrun ends with an error in bounded time instead of waiting in the next all-reduce forever."""
    out, jobs = workspace / "out_dead_node", []
    try:
        # no shared compile cache: two fresh nodes compiling at once
        jobs = _two_node_jobs(workspace, "dead_node", out, workspace / "class_msrun", None, "--total_step", "100000")
        deadline = time.time() + JOB_TIMEOUT_S
        while not ((out / "loss.csv").is_file() and len((out / "loss.csv").read_text().splitlines()) > 2):
            assert all(job.process.poll() is None for job in jobs) and time.time() < deadline, jobs[0].output()[-3000:]
            time.sleep(0.5)
        jobs[1].close()  # the whole node: launcher and worker, SIGKILL
        killed = time.time()
        rc = jobs[0].wait(timeout=NODE_LOSS_BOUND_S + 60)
        ended = time.time() - killed
        assert rc != 0 and ended < NODE_LOSS_BOUND_S, (rc, ended, jobs[0].output()[-3000:])
        assert "lost a rank" in jobs[0].output() and "worker 1" in jobs[0].output(), jobs[0].output()[-3000:]
        while _tagged_pids(jobs[0].tag) and time.time() - killed < NODE_LOSS_BOUND_S + 30:
            time.sleep(0.5)
        assert not _tagged_pids(jobs[0].tag), "processes of node 0 survive the lost node"
    finally:
        for job in jobs:
            job.close()
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("case", ["no launcher", "no scheduler", "mpirun without --is_parallel"])
def test_an_incomplete_launcher_environment_fails_fast_and_clearly(workspace, tmp_path, case):
    command = [sys.executable, *_train_args(workspace, tmp_path / "out", tmp_path / "class"), "--is_parallel", "True"]
    extra_env, limit = {}, 60
    if case == "no launcher":  # --is_parallel True started as one plain process
        expected = "needs a launcher"
    elif case == "no scheduler":  # dynamic-cluster variables, but nobody serves the cluster: init gives up after MS_TOPO_TIMEOUT
        extra_env = {"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "2", "MS_NODE_ID": "0", "MS_SCHED_HOST": "127.0.0.1",
                     "MS_SCHED_PORT": str(_free_port()), "MS_TOPO_TIMEOUT": "3"}
        expected = "did not form a cluster"
    else:  # N processes that would each train alone and overwrite each other's output
        if MPIRUN is None:
            pytest.skip("mpirun not found: apt-get install openmpi-bin libopenmpi-dev (.ci/run does)")
        command = [MPIRUN, "--allow-run-as-root", "-n", "2", *command[:-2]]
        expected = "2 processes were launched but --is_parallel is False"
    job = Job(command, tmp_path / "job", extra_env=extra_env)
    try:
        rc = job.wait(timeout=limit)
    finally:
        job.close()
    assert rc != 0 and expected in job.output(), job.output()[-2000:]
    assert not (tmp_path / "out").exists()
