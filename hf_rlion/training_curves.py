"""The training-curves picture both recipes write (and the model card shows): loss and one metric."""

from __future__ import annotations

import os
from typing import Sequence


def plot_training_curves(
    path: str | os.PathLike,
    title: str,
    loss: Sequence[tuple[float, float]],
    metric: Sequence[tuple[float, float]],
    metric_name: str,
    loss_x: str = "step",
) -> None:
    """Write a PNG with two panels: ``loss`` as (x, training loss) on a log scale, and ``metric`` as
    (epoch, value) in [0, 1], its last value annotated. Either list may be empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    if loss:
        loss_axis.plot(*zip(*loss), marker=".")
    loss_axis.set(xlabel=loss_x, ylabel="training loss", yscale="log", title="training loss")
    if metric:
        metric_axis.plot(*zip(*metric), marker="o")
        metric_axis.annotate(f"{metric[-1][1]:.4f}", metric[-1], textcoords="offset points", xytext=(-30, -15))
    metric_axis.set(xlabel="epoch", ylabel=metric_name, ylim=(0, 1.02), title=metric_name)
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
