"""Data parallelism for `msrun` and `mpirun -n N python train_dreambooth.py ... --is_parallel True`.

msrun sets MindSpore's dynamic-cluster variables (MS_ROLE, MS_SCHED_HOST, ...) and starts the scheduler
process itself. Under mpirun, MindSpore's own init reads OpenMPI's variables on Ascend/GPU only; on CPU it
needs the dynamic-cluster ones, so `setup_distributed_environment` derives them from OpenMPI's before
MindSpore is imported, and rank 0 starts the scheduler process that msrun would have started.

Failure ends the job in bounded time: both launchers kill every rank when one exits with an error (msrun after
its scheduler's timeout); cluster set-up gives up after
MS_TOPO_TIMEOUT seconds; the scheduler started here leaves with the workers, or SCHEDULER_GRACE_S after rank 0."""
import hashlib
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

from mindbooth.config import early_flags  # MindSpore itself is imported only after setup_distributed_environment

DYNAMIC_CLUSTER_VARS = ("MS_ROLE", "MS_WORKER_NUM", "MS_SCHED_HOST", "MS_SCHED_PORT")
TOPOLOGY_TIMEOUT_S = 300  # cluster set-up (all ranks registering) under mpirun; msrun's own default is 600
SCHEDULER_GRACE_S = 60  # the scheduler outlives rank 0 by at most this (the other ranks unregister meanwhile)

# The scheduler: MindSpore's init() in the MS_SCHED role serves the cluster until every worker has left, then
# exits. A watchdog thread ends it once rank 0 (its parent) is gone for SCHEDULER_GRACE_S, so a killed job
# never leaves it behind.
_SCHEDULER_CODE = """
import os, sys, threading, time
parent, grace = int(sys.argv[1]), float(sys.argv[2])
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    time.sleep(grace)
    os._exit(3)
threading.Thread(target=watch, daemon=True).start()
import mindspore as ms
ms.set_device("CPU")
from mindspore.communication import init
init()
"""


def launch_flags(argv=None):
    """(is_parallel, device_target) from the command line, read before MindSpore is imported."""
    flags = early_flags(argv, is_parallel=False, device_target="Ascend")
    return flags.is_parallel, flags.device_target


def openmpi_world():
    """(rank, size, local_size) from OpenMPI's variables, or None outside mpirun."""
    rank, size = os.environ.get("OMPI_COMM_WORLD_RANK"), os.environ.get("OMPI_COMM_WORLD_SIZE")
    if rank is None or size is None:
        return None
    return int(rank), int(size), int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", size))


def scheduler_port() -> int:
    """MS_SCHED_PORT, else a port every rank derives alike from the mpirun job's id (no communication yet)."""
    if os.environ.get("MS_SCHED_PORT"):
        return int(os.environ["MS_SCHED_PORT"])
    job = os.environ.get("OMPI_MCA_ess_base_jobid") or os.environ.get("PMIX_NAMESPACE") or os.environ.get("OMPI_MCA_orte_hnp_uri", "")
    return 20000 + int(hashlib.sha1(job.encode()).hexdigest()[:8], 16) % 20000


def setup_distributed_environment(argv=None):
    """Under mpirun with --is_parallel True on CPU: MindSpore's dynamic-cluster variables from OpenMPI's, and the
    scheduler process on rank 0. Does nothing under msrun (it sets them), for one process, or on Ascend/GPU."""
    if os.environ.get("MS_ROLE"):
        return
    world = openmpi_world()
    is_parallel, device_target = launch_flags(argv)
    if world is None or not is_parallel or device_target != "CPU":
        return
    rank, size, local_size = world
    host = os.environ.get("MS_SCHED_HOST")
    if local_size != size and not host:
        sys.exit("error: mpirun over several hosts on CPU needs MS_SCHED_HOST (rank 0's address) exported to every "
                 "rank (mpirun -x MS_SCHED_HOST=...), or start with msrun")
    host, port = host or "127.0.0.1", scheduler_port()
    os.environ.update({"MS_ROLE": "MS_WORKER", "MS_NODE_ID": str(rank), "MS_WORKER_NUM": str(size),
                       "MS_SCHED_HOST": host, "MS_SCHED_PORT": str(port)})
    os.environ.setdefault("MS_TOPO_TIMEOUT", str(TOPOLOGY_TIMEOUT_S))
    if rank == 0:
        start_scheduler(host, port)


def start_scheduler(host: str, port: int) -> subprocess.Popen:
    try:  # a clear error now rather than workers waiting MS_TOPO_TIMEOUT for a scheduler that cannot listen
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as error:
        sys.exit(f"error: cannot start MindSpore's scheduler on {host}:{port} ({error.strerror}); "
                 "export another MS_SCHED_PORT to every rank (mpirun -x MS_SCHED_PORT=...)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    env.update({"MS_ROLE": "MS_SCHED", "MS_NODE_ID": "scheduler"})
    log_path = os.path.join(tempfile.gettempdir(), f"mindbooth_scheduler_{port}.log")
    with open(log_path, "w") as log:  # never the job's stdout: mpirun would wait for it to close
        return subprocess.Popen([sys.executable, "-c", _SCHEDULER_CODE, str(os.getpid()), str(SCHEDULER_GRACE_S)],
                                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def launched_world_size() -> int:
    """How many processes a launcher started (1 without one)."""
    if os.environ.get("MS_WORKER_NUM"):
        return int(os.environ["MS_WORKER_NUM"])
    world = openmpi_world()
    return world[1] if world else 1


class Distributed:
    """Rank bookkeeping and the few host-side collectives training needs; one process is rank 0 of 1."""

    def __init__(self, is_parallel: bool, device_target: str = "CPU"):
        self.rank, self.world_size = 0, 1
        launched = launched_world_size()
        if not is_parallel:
            if launched > 1 or os.environ.get("MS_ROLE") == "MS_SCHED":
                raise SystemExit(f"error: {launched} processes were launched but --is_parallel is False: add "
                                 "--is_parallel True, or start a single process")
            return
        missing = [k for k in DYNAMIC_CLUSTER_VARS if not os.environ.get(k)]
        if device_target == "CPU" and missing:
            raise SystemExit(f"error: --is_parallel True needs a launcher, but {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not set: start with msrun --worker_num=N "
                             "--local_worker_num=N train_dreambooth.py ... or mpirun -n N python train_dreambooth.py ...")
        from mindspore.communication import get_group_size, get_local_rank_size, get_rank, init

        try:
            init()  # in msrun's scheduler process (MS_ROLE=MS_SCHED) this serves the cluster, then exits
        except Exception as error:  # noqa: BLE001 - MindSpore raises RuntimeError/ValueError variants
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            # the scheduler's init() also ends this way when a rank is lost mid-training (its heartbeats stop)
            raise SystemExit(f"error: --is_parallel True, but the {launched} processes did not form a cluster or lost a rank "
                             f"({first_line}); check the launcher's logs") from None
        self.rank, self.world_size = get_rank(), get_group_size()
        if device_target == "CPU":  # ranks on one host share its cores instead of oversubscribing them
            import mindspore as ms

            ms.device_context.cpu.op_tuning.threads_num(max(1, (os.cpu_count() or 1) // max(1, get_local_rank_size())))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def grad_reducer(self, params):
        """Mean of gradients over ranks. Explicit: the parallel context's gradients_mean does nothing in a
        hand-written value_and_grad step."""
        if self.world_size == 1:
            return None
        from mindspore import nn

        return nn.DistributedGradReducer(params, mean=True, degree=self.world_size)

    def all_sum(self, values):
        """Element-wise sum of a float32 array over ranks, on the host (CPU's AllReduce takes floats only;
        integers below 2**24 are exact)."""
        values = np.asarray(values, np.float32)
        if self.world_size == 1:
            return values
        import mindspore as ms
        from mindspore import ops

        return ops.AllReduce()(ms.Tensor(values)).asnumpy()

    def mean(self, values):
        """Mean of a float array over ranks (each rank's losses -> the loss of the global batch)."""
        if self.world_size == 1:
            return np.asarray(values)
        return self.all_sum(values) / self.world_size

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank."""
        if self.world_size == 1:
            return bool(flag)
        return float(self.all_sum([0.0 if flag else 1.0])[0]) == 0.0

    def barrier(self):
        """Every rank waits here until all have arrived (an all-reduce: mint's barrier logs a false error on CPU)."""
        if self.world_size > 1:
            self.all_sum(np.ones(1, np.float32))

    def broadcast_names(self, names):
        """Rank 0's list of file names, on every rank."""
        if self.world_size == 1:
            return list(names)
        payload = np.frombuffer("\n".join(names).encode(), np.uint8) if self.is_main else np.zeros(0, np.uint8)
        length = int(self.all_sum([payload.size])[0])  # the other ranks add zeros
        if length == 0:
            return []
        text = bytes(self.all_sum(payload if self.is_main else np.zeros(length)).astype(np.uint8)).decode()
        return text.split("\n")
