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


def plot_latency(records: list[dict], path: Path, title: str) -> None:
    """p50 latency (with p90 as a band) and throughput against batch size, one line per artifact x provider.

    Threads are chosen per batch size, so a line joins the chosen setting at each batch and every
    point is labelled with its thread count; only when several thread counts were timed at one
    batch does each thread count get its own line. Only records with status "ok" are drawn (an
    unavailable provider has no line, by design).
    """
    plt = _pyplot()
    ok = [r for r in records if r.get("status") == "ok"]
    per_point: dict[tuple, int] = {}
    for r in ok:
        key = (r["artifact"], r.get("engine"), r["provider"], r["batch"])
        per_point[key] = per_point.get(key, 0) + 1
    split_by_threads = any(count > 1 for count in per_point.values())
    lines: dict[str, list[dict]] = {}
    for r in ok:
        engine = "" if r.get("engine") in (None, "onnxruntime", "torch") else f" ({r['engine']})"
        label = f"{r['artifact']}{engine} / {r['provider']}" + (f" / {r['threads']}t" if split_by_threads else "")
        lines.setdefault(label, []).append(r)
    fig, (lat_ax, tput_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    fig.subplots_adjust(wspace=0.3, right=0.8)
    for label, rows in sorted(lines.items()):
        rows = sorted(rows, key=lambda r: r["batch"])
        batches = [r["batch"] for r in rows]
        p50 = [r["latency_ms"]["p50"] for r in rows]
        (line,) = lat_ax.plot(batches, p50, marker="o", label=label)
        lat_ax.fill_between(batches, p50, [r["latency_ms"]["p90"] for r in rows], color=line.get_color(), alpha=0.15)
        throughput = [r["throughput_ips"] for r in rows]
        tput_ax.plot(batches, throughput, marker="o", color=line.get_color(), label=label)
        if not split_by_threads:
            for r, y in zip(rows, throughput, strict=True):
                tput_ax.annotate(f"{r['threads']}t", (r["batch"], y), textcoords="offset points", xytext=(4, 3),
                                 fontsize=6, color=line.get_color())
    lat_ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="latency per batch (ms): p50, band to p90",
               title="latency")
    tput_ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s (labels: intra-op threads)",
                title="throughput")
    for ax in (lat_ax, tput_ax):
        ax.grid(alpha=0.3, which="both")
    if lines:
        tput_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    save_figure(fig, path)


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    """Counts per (true class, predicted class), with each row's recall in the row label."""
    import numpy as np

    plt = _pyplot()
    counts = np.asarray(matrix)
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    shown = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # colour by row share: rare classes show too
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    recall = np.diag(counts) / np.maximum(counts.sum(axis=1), 1)
    ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 6 else 0)
    ax.set_yticks(range(len(labels)), [f"{label} ({100 * r:.0f}%, n={n})" for label, r, n in
                                       zip(labels, recall, counts.sum(axis=1), strict=True)])
    if len(labels) <= 30:
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true class (recall, images)", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    save_figure(fig, path)
