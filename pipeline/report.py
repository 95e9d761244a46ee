"""Presentation that outlives the terminal: plots (PNG). matplotlib is imported lazily and
always with the Agg backend, so plotting works on machines without a display."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write a figure atomically and release it."""
    plt = _pyplot()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_learning_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy per epoch, train against validation."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.plot(epochs, [100 * h["train_accuracy"] for h in history], label="train (dropout active)")
    acc_ax.plot(epochs, [100 * h["val_accuracy"] for h in history], label="validation")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, path)
