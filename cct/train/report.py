"""What a run shows and leaves behind for people: progress while it runs, metrics.csv, TensorBoard events and
curves.png. Only rank 0 writes (the trainer creates these objects on rank 0 only)."""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .state import atomic_write, atomic_write_text

METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5",
                  "img_per_s", "seconds")


class Progress:
    """A tqdm bar with img/s, loss and ETA on a terminal; plain periodic lines when stdout is not one."""

    def __init__(self, total_steps: int, initial_step: int, batch_images: int, every_s: float = 30.0):
        self.interactive = sys.stdout.isatty()
        self.batch_images = batch_images
        self.every_s = every_s
        self.total = total_steps
        self.step = initial_step
        self.start = self.last_print = time.perf_counter()
        self.start_step = initial_step
        self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                        disable=not self.interactive)

    def update(self, epoch: int, loss: float) -> None:
        """Record one finished step."""
        self.step += 1
        now = time.perf_counter()
        rate = (self.step - self.start_step) * self.batch_images / max(now - self.start, 1e-9)
        if self.interactive:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", img_s=f"{rate:.0f}", refresh=False)
        elif now - self.last_print >= self.every_s:
            self.last_print = now
            eta = (self.total - self.step) * self.batch_images / max(rate, 1e-9)
            print(f"epoch {epoch} step {self.step}/{self.total} loss {loss:.4f} {rate:.0f} img/s "
                  f"eta {eta / 60:.1f} min", flush=True)

    def write(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if self.interactive:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self.bar.close()


class MetricsLog:
    """metrics.csv (rewritten atomically from the full history, so it always matches the checkpoint),
    TensorBoard scalars and curves.png."""

    def __init__(self, run_dir: Path, history: list[dict[str, Any]]):
        self.run_dir = run_dir
        self.history = history
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def add(self, row: dict[str, Any]) -> None:
        """Append one evaluation row and refresh every output."""
        self.history.append(row)
        for key in ("lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "img_per_s"):
            if row.get(key) is not None:
                self.tensorboard.add_scalar(key, row[key], row["step"])
        self.tensorboard.flush()
        self.write_csv()
        self.plot()

    def write_csv(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.run_dir / "metrics.csv", buffer.getvalue())

    def plot(self) -> None:
        """curves.png: loss, accuracy and learning rate against epoch."""
        plot_curves(self.history, self.run_dir / "curves.png")

    def close(self) -> None:
        self.tensorboard.close()


def _png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (written with `atomic_write`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Draw loss, top-1 accuracy and learning rate against epoch into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        axes[0].plot(epochs, [r[key] for r in history], marker=".", label=label)
    for key, label in (("train_top1", "train"), ("test_top1", "test")):
        axes[1].plot(epochs, [r[key] for r in history], marker=".", label=label)
    axes[2].plot(epochs, [r["lr"] for r in history], marker=".")
    for ax, name in zip(axes, ("loss", "top-1 accuracy (%)", "learning rate"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, _png(fig))
    plt.close(fig)


def plot_confusion(confusion, classes: list[str], path: Path, title: str = "") -> None:
    """Draw a confusion matrix (rows: true class, columns: predicted), normalised per true class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = confusion.double()
    matrix = (matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    size = min(4 + 0.35 * len(classes), 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 30:
        ax.set_xticks(range(len(classes)), classes, rotation=90)
        ax.set_yticks(range(len(classes)), classes)
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, _png(fig))
    plt.close(fig)
