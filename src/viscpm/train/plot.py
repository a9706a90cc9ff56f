"""``viscpm plot RUN_DIR``: loss and learning-rate curves of a run, as a PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..extras import require
from .engine import METRICS_NAME


def plot_run(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    matplotlib = require("matplotlib", "train", "viscpm plot")
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_NAME} in {run_dir}; is it a training output_dir?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no metrics yet")
    steps = [r["step"] for r in records]
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    loss_axis.plot(steps, [r["loss"] for r in records])
    loss_axis.set_ylabel("loss")
    loss_axis.set_title(run_dir.name)
    lr_axis.plot(steps, [r["lr"] for r in records], color="tab:orange")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("step")
    figure.tight_layout()
    output = Path(output) if output is not None else run_dir / "curves.png"
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
