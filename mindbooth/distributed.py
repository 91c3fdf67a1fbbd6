"""Data parallelism for `mpirun -n N python train_dreambooth.py ... --is_parallel True` and `msrun`.

msrun sets MindSpore's dynamic-cluster variables itself. Under mpirun, MindSpore's own init needs them
too on CPU (its mpirun support is Ascend/GPU only), so they are derived from OpenMPI's variables before
MindSpore is imported, and rank 0 also starts the scheduler process that msrun would have started."""
import os
import subprocess
import sys

SCHEDULER_ENV = "MINDBOOTH_SCHEDULER"


def _openmpi_rank_size():
    rank, size = os.environ.get("OMPI_COMM_WORLD_RANK"), os.environ.get("OMPI_COMM_WORLD_SIZE")
    return (int(rank), int(size)) if rank is not None and size is not None else (None, None)


def setup_distributed_environment():
    """Map OpenMPI's rank/size to MindSpore's MS_* variables (no-op under msrun or a single process)."""
    if "MS_ROLE" in os.environ or os.environ.get(SCHEDULER_ENV):
        return
    rank, size = _openmpi_rank_size()
    if rank is None or size < 2 or "--is_parallel" not in " ".join(sys.argv):
        return
    port = os.environ.get("MS_SCHED_PORT", str(8118 + int(os.environ.get("OMPI_MCA_orte_ess_jobid", "0") or 0) % 1000))
    os.environ.update({
        "MS_WORKER_NUM": str(size), "MS_SCHED_HOST": os.environ.get("MS_SCHED_HOST", "127.0.0.1"),
        "MS_SCHED_PORT": port, "MS_NODE_ID": str(rank), "MS_ROLE": "MS_WORKER",
    })
    if rank == 0:
        scheduler_env = dict(os.environ, MS_ROLE="MS_SCHED", MS_NODE_ID="sched", **{SCHEDULER_ENV: "1"})
        for key in [k for k in scheduler_env if k.startswith("OMPI_") or k.startswith("PMIX_")]:
            del scheduler_env[key]
        subprocess.Popen([sys.executable, "-c", "import mindspore as ms; from mindspore.communication import init; init()"],
                         env=scheduler_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Distributed:
    """Rank bookkeeping; a single process is world_size 1 and rank 0."""

    def __init__(self, is_parallel: bool):
        self.is_parallel = is_parallel
        self.rank, self.world_size = 0, 1
        if is_parallel:
            from mindspore.communication import get_group_size, get_rank, init

            try:
                init()
            except Exception as error:  # noqa: BLE001 - MindSpore raises RuntimeError/ValueError variants
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise SystemExit(f"error: --is_parallel True but the launcher environment is incomplete ({first_line}); "
                                 "start with msrun or mpirun -n N") from None
            self.rank, self.world_size = get_rank(), get_group_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def grad_reducer(self, params):
        """Mean of gradients over ranks. Explicit: the parallel context's gradients_mean does nothing in a
        hand-written value_and_grad step (measured on this MindSpore)."""
        if self.world_size == 1:
            return None
        from mindspore import nn

        return nn.DistributedGradReducer(params, mean=True, degree=self.world_size)

    def barrier(self):
        if self.world_size > 1:
            from mindspore import mint

            mint.distributed.barrier()

    def broadcast_names(self, names):
        """Rank 0's list of file names to every rank (through a tiny all-gather of lengths+bytes)."""
        if self.world_size == 1:
            return names
        import numpy as np
        import mindspore as ms
        from mindspore import ops

        payload = "\n".join(names).encode()
        buffer = np.zeros(65536, np.uint8)
        if self.rank == 0:
            if len(payload) > buffer.size:
                raise ValueError("too many class images to announce at once; lower num_class_images")
            buffer[: len(payload)] = np.frombuffer(payload, np.uint8)
        summed = ops.AllReduce()(ms.Tensor(buffer.astype(np.int32))).asnumpy().astype(np.uint8)
        text = bytes(summed[summed > 0]).decode()
        return text.split("\n") if text else []

    def barrier_if_needed(self, step: int, total_step: int):
        if self.world_size > 1 and step == total_step:
            self.barrier()
