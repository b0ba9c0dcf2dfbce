"""Training metrics: one JSON object per logged step in ``metrics.jsonl``, and a PNG plot."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
TENSORBOARD_DIR = "tensorboard"


def check_reporter(report_to: str) -> None:
    """Raises ``ValueError`` when ``report_to`` needs a package that is not installed (called
    before a run touches its output directory)."""
    if report_to == "tensorboard":
        _summary_writer_class()


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("report_to='tensorboard' needs the tensorboard package: pip install "
                         "tensorboard (or 'fastalign[tensorboard]'), or report_to='none' for "
                         "metrics.jsonl and metrics.png only") from None
    return SummaryWriter


def _tensorboard_writer(directory: Path, resume_step: int):
    return _summary_writer_class()(str(directory), purge_step=resume_step or None)


class MetricsLog:
    """Appends ``{"step": ..., name: value, ...}`` lines to ``output_dir/metrics.jsonl``; on a
    resume, lines past the resumed step are dropped first, so the file reads as one run.
    ``report_to="tensorboard"`` also writes each value as a scalar to TensorBoard event files
    in ``output_dir/tensorboard`` (events past a resumed step are purged there too)."""

    def __init__(self, output_dir: str | os.PathLike, resume_step: int = 0,
                 report_to: str = "none"):
        self.path = Path(output_dir) / METRICS_FILE
        kept = [row for row in self.rows() if row["step"] <= resume_step] if resume_step else []
        with open(self.path, "w") as out:
            out.writelines(json.dumps(row) + "\n" for row in kept)
        self.writer = (_tensorboard_writer(Path(output_dir) / TENSORBOARD_DIR, resume_step)
                       if report_to == "tensorboard" else None)

    def rows(self) -> list[dict]:
        """The logged rows; a damaged line (a crash mid-write, an edit) is left out with a
        warning naming it, never a traceback: the log is a record, not a state to resume."""
        if not self.path.is_file():
            return []
        rows = []
        with open(self.path, encoding="utf-8", errors="replace") as source:
            for number, line in enumerate(source, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    warnings.warn(f"{self.path} line {number} is not a metrics row; left out",
                                  RuntimeWarning, stacklevel=2)
                    continue
                rows.append(row)
        return rows

    def log(self, step: int, values: dict) -> None:
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        with open(self.path, "a") as out:
            out.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for name, value in row.items():
                if name != "step":
                    self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def plot(self, panels: list[tuple[str, list[str]]]) -> Path | None:
        """One panel per ``(title, metric names)``; returns the PNG's path, or None without
        matplotlib (the JSONL has every number)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            warnings.warn("matplotlib is not installed: no metrics.png (metrics.jsonl has every "
                          "number); pip install 'fastalign[train]' adds it", RuntimeWarning,
                          stacklevel=2)
            return None
        rows = self.rows()
        figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4))
        for axis, (title, names) in zip(axes, panels):
            for name in names:
                points = [(row["step"], row[name]) for row in rows if name in row]
                if points:
                    steps, values = zip(*points)
                    axis.plot(steps, values, marker="o" if len(points) < 30 else None,
                              markersize=3, label=name)
            axis.set_title(title)
            axis.set_xlabel("optimizer step")
            axis.grid(alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=7)
        figure.tight_layout()
        path = self.path.with_name(PLOT_FILE)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path
