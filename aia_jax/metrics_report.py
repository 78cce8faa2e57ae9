"""Classification metrics from per-video scores, and the files an evaluation writes.

Pure numpy (matplotlib, the `plot` extra, for the confusion-matrix plot; without it the plot is
skipped with a warning). Everything is counted per video, so the numbers do not depend on how
the videos were batched.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from aia_jax.fileio import write_atomically

RESULTS_JSON = "results.json"
PER_CLASS_CSV = "per_class_accuracy.csv"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
SCORES_NPZ = "scores.npz"


def top_k_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """bool `[N]`: whether each label is among the `k` highest scores of its row.

    Ties are broken towards the lower class index (like `argmax`), so the result is
    deterministic; `k` is capped at the number of classes.
    """
    scores = np.asarray(scores)
    k = min(k, scores.shape[-1])
    # A stable sort of the negated scores keeps equal scores in index order.
    top = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return np.any(top == np.asarray(labels)[:, None], axis=-1)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 `[K, K]`: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(predictions)), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """float `[K]`: recall of each class (diagonal / row sum); NaN for classes with no video."""
    counts = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.diag(cm) / np.maximum(counts, 1), np.nan)


def classification_metrics(
    scores: np.ndarray, labels: np.ndarray, num_classes: int | None = None
) -> dict[str, Any]:
    """Top-1, top-5, mean class accuracy and the confusion matrix of per-video scores.

    Args:
      scores: `[N, K]` logits or probabilities (anything whose argmax is the prediction).
      labels: int `[N]`.
      num_classes: K; default `scores.shape[-1]`.

    Returns:
      `num_videos`, `top1`, `top5` (fractions), `mean_class_accuracy` (the mean of the per-class
      accuracies over the classes that have at least one video), and as numpy arrays
      `predictions [N]`, `confusion [K, K]`, `class_accuracy [K]` (NaN where no video),
      `class_count [K]`.
    """
    scores, labels = np.asarray(scores), np.asarray(labels, np.int64)
    num_classes = int(num_classes or scores.shape[-1])
    n = len(labels)
    if n == 0:
        raise ValueError("no videos to compute metrics over")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels outside [0, {num_classes}): {labels.min()}..{labels.max()}")
    predictions = np.argmax(scores, axis=-1)
    cm = confusion_matrix(labels, predictions, num_classes)
    class_acc = per_class_accuracy(cm)
    present = ~np.isnan(class_acc)
    return {
        "num_videos": n,
        "top1": float(top_k_correct(scores, labels, 1).mean()),
        "top5": float(top_k_correct(scores, labels, 5).mean()),
        "mean_class_accuracy": float(class_acc[present].mean()),
        "predictions": predictions,
        "confusion": cm,
        "class_accuracy": class_acc,
        "class_count": cm.sum(axis=1),
    }


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """The JSON-friendly part of `classification_metrics`' result."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


# ---------------------------------------------------------------------------------------------
# Files.


def _class_names(names: Sequence[str] | None, num_classes: int) -> list[str]:
    names = list(names or [])
    return [names[i] if i < len(names) else str(i) for i in range(num_classes)]


def write_per_class_csv(
    path: str, metrics: Mapping[str, Any], class_names: Sequence[str] | None = None
) -> None:
    """`class,name,videos,correct,accuracy` rows; accuracy is empty for classes with no video."""
    cm = metrics["confusion"]
    names = _class_names(class_names, len(cm))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "name", "videos", "correct", "accuracy"])
        for i, (count, acc) in enumerate(zip(metrics["class_count"], metrics["class_accuracy"])):
            accuracy = "" if np.isnan(acc) else f"{acc:.6f}"
            w.writerow([i, names[i], int(count), int(cm[i, i]), accuracy])


def write_confusion_csv(
    path: str, cm: np.ndarray, class_names: Sequence[str] | None = None
) -> None:
    """The matrix with a header row of predicted and a first column of true class names."""
    names = _class_names(class_names, len(cm))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *names])
        for i, row in enumerate(cm):
            w.writerow([names[i], *(int(x) for x in row)])


def plot_confusion(
    path: str, cm: np.ndarray, class_names: Sequence[str] | None = None, title: str = ""
) -> None:
    """A row-normalised confusion matrix as a PNG (tick labels only up to 50 classes)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    import matplotlib.pyplot as plt

    k = len(cm)
    rows = cm.sum(axis=1, keepdims=True)
    normalised = cm / np.maximum(rows, 1)
    size = min(4 + 0.25 * k, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    if k <= 50:
        names = _class_names(class_names, k)
        ax.set_xticks(range(k), names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), names, fontsize=7)
        if k <= 20:  # counts stay readable only on small matrices
            for i in range(k):
                for j in range(k):
                    if cm[i, j]:
                        color = "white" if normalised[i, j] > 0.5 else "black"
                        ax.text(
                            j, i, int(cm[i, j]), ha="center", va="center", color=color, fontsize=7
                        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as indented JSON (atomically: temporary file, then rename)."""
    write_atomically(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return str(value)


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(
    directory: str,
    *,
    metrics: Mapping[str, Any],
    results: Mapping[str, Any],
    index: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str] | None = None,
    extra_arrays: Mapping[str, np.ndarray] | None = None,
    title: str = "",
) -> dict[str, str]:
    """Writes `results.json`, the per-class CSV, the confusion matrix (CSV, PNG), `scores.npz`.

    The PNG needs matplotlib; without it every other file is written and a warning says how to
    get the plot.

    Returns:
      `{kind: path}` of the files written.
    """
    os.makedirs(directory, exist_ok=True)
    paths = {
        "results": os.path.join(directory, RESULTS_JSON),
        "per_class": os.path.join(directory, PER_CLASS_CSV),
        "confusion_csv": os.path.join(directory, CONFUSION_CSV),
        "confusion_png": os.path.join(directory, CONFUSION_PNG),
        "scores": os.path.join(directory, SCORES_NPZ),
    }
    plot = _can_plot()
    if not plot:
        del paths["confusion_png"]
        logging.warning(
            "%s not written: matplotlib is not installed (pip install 'aia-jax[plot]'); the "
            "other report files are.",
            os.path.join(directory, CONFUSION_PNG),
        )
    write_json(
        paths["results"], {**results, "files": {k: os.path.basename(v) for k, v in paths.items()}}
    )
    write_per_class_csv(paths["per_class"], metrics, class_names)
    write_confusion_csv(paths["confusion_csv"], metrics["confusion"], class_names)
    np.savez(
        paths["scores"],
        index=np.asarray(index),
        label=np.asarray(labels),
        scores=np.asarray(scores),
        **dict(extra_arrays or {}),
    )
    if plot:
        plot_confusion(paths["confusion_png"], metrics["confusion"], class_names, title)
    return paths
