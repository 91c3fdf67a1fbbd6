"""Loss log: loss.csv (appended, survives resume) and a loss.png plot."""
import csv
from pathlib import Path

from mindbooth.images import atomic_write

# compiled_step_graphs: graphs GRAPH_MODE compiled for the training step so far (1 when all is well; a growing
# count means a recompile every step, e.g. an input that became a graph constant). 0 in PyNative.
COLUMNS = ["step", "loss", "loss_instance", "loss_class", "lr", "grad_norm", "seconds_per_step", "loss_scale", "skipped_steps",
           "compiled_step_graphs"]


class LossLog:
    def __init__(self, folder, resume_step: int = 0):
        self.path = Path(folder) / "loss.csv"
        self.rows = []
        if self.path.exists():
            with open(self.path) as handle:
                self.rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        self._rewrite()

    def _rewrite(self):
        def write(temporary):
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, COLUMNS)
                writer.writeheader()
                writer.writerows(self.rows)
        atomic_write(self.path, write)

    def append(self, **row):
        self.rows.append({k: row.get(k, "") for k in COLUMNS})
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, COLUMNS).writerow(self.rows[-1])

    def plot(self, path=None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path or self.path.with_suffix(".png"))
        steps = [int(r["step"]) for r in self.rows]
        figure, axis = plt.subplots(figsize=(7, 4))
        for key in ("loss", "loss_instance", "loss_class"):
            values = [float(r[key]) for r in self.rows if r[key] != ""]
            if values:
                axis.plot(steps[: len(values)], values, label=key, linewidth=1)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.legend()
        axis.grid(alpha=0.3)
        figure.tight_layout()
        atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
        plt.close(figure)
