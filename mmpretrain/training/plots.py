"""PNG plots of a run: curves from ``metrics.csv`` and pictures of the val embeddings.

Pure matplotlib (object-oriented API on the Agg canvas: no pyplot state, no display needed) and
numpy (scikit-learn only for t-SNE); neither Lightning nor Hydra. Every function writes one PNG and returns
its path.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmpretrain.evaluation.retrieval import CAPTIONS_REPEAT
from mmpretrain.io import atomic_write

Series = dict[str, tuple[np.ndarray, np.ndarray]]  # metric name -> (steps, values)

# One figure per family of curves: (file stem, title, y label, metric-name predicate).
CURVES = (
    ("loss", "loss", "loss", lambda k: k.endswith("loss") and k.startswith(("train/", "val/"))),
    ("zeroshot", "zero-shot accuracy (val)", "accuracy", lambda k: k.startswith("val/zeroshot")),
    (  # model.ema.eval_both: the average's zero-shot (val/) beside the raw weights' (val_raw/)
        "ema_vs_raw",
        "zero-shot accuracy (val): EMA weights (val/) vs raw weights (val_raw/)",
        "accuracy",
        lambda k: k.startswith(("val/zeroshot", "val_raw/zeroshot")),
    ),
    ("retrieval", "instance recall@k (val)", "recall", lambda k: k.startswith("val/retrieval_R@")),
    ("temperature", "temperature 1/s", "temperature", lambda k: k.startswith("train/temperature")),
    ("learning_rate", "learning rate", "lr", lambda k: k.startswith(("lr-", "train/lr"))),
    ("throughput", "samples/s", "samples/s", lambda k: k == "train/samples_per_s"),
    (
        "data_wait",
        "fraction of step time waiting for data",
        "fraction",
        lambda k: k == "train/data_wait_frac",
    ),
)


def read_metrics_csv(path: str | Path) -> Series:
    """``metrics.csv`` as written by Lightning's CSVLogger (a ``step`` column, one column per
    metric, empty cells where a metric was not logged) -> {name: (steps, values)}."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        step = _float(row.get("step"))
        if step is None:
            continue
        for key, cell in row.items():
            value = _float(cell)
            if key in ("step", "epoch") or value is None or not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(value)
    return {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in series.items()}


def _float(cell) -> float | None:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return None


def with_temperature(series: Series) -> Series:
    """Add ``train/temperature/<k>`` = 1 / ``train/logit_scale/<k>`` where only the scale was logged."""
    out = dict(series)
    for key, (steps, values) in series.items():
        temperature = key.replace("logit_scale", "temperature", 1)
        if key.startswith("train/logit_scale") and temperature not in series:
            out[temperature] = (steps, 1.0 / np.maximum(values, 1e-12))
    return out


def retrieval_curves(series: Series) -> tuple[str, Callable[[str], bool]]:
    """The title and metric predicate of ``retrieval.png``: instance recall, or class recall where
    most val captions repeat (``val/caption_repeat_frac`` above :data:`CAPTIONS_REPEAT`, e.g. class
    templates), since there every pair tying with an identical caption counts against the model."""
    repeat = series.get("val/caption_repeat_frac")
    has_class = any(k.startswith("val/retrieval_class_R@") for k in series)
    if repeat is None or not has_class or repeat[1][-1] <= CAPTIONS_REPEAT:
        _, title, _, wanted = next(c for c in CURVES if c[0] == "retrieval")
        return title, wanted
    title = f"class recall@k (val): {repeat[1][-1]:.0%} of val captions repeat, so a same-class match counts"
    return title, lambda k: k.startswith("val/retrieval_class_R@")


def _save(fig: Figure, path: Path, title: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    # The title also goes into the PNG's text chunk, for whoever reads the file rather than the picture.
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Title": title} if title else None)
    return path


def plot_curves(series: Series, out_dir: str | Path) -> list[Path]:
    """One PNG per family in :data:`CURVES` that has at least one logged value (for ``retrieval``,
    what :func:`retrieval_curves` picks)."""
    series = with_temperature(series)
    written = []
    for stem, title, ylabel, wanted in CURVES:
        if stem == "retrieval":
            title, wanted = retrieval_curves(series)
        if stem == "ema_vs_raw" and not any(k.startswith("val_raw/") for k in series):
            continue
        keys = sorted(k for k in series if wanted(k))
        if not keys:
            continue
        fig = Figure(figsize=(6.4, 4.0))
        ax = fig.add_subplot()
        for key in keys:
            steps, values = series[key]
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=key)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        written.append(_save(fig, Path(out_dir) / f"{stem}.png", title))
    return written


def plot_similarity(
    features: np.ndarray,
    labels: np.ndarray,
    class_features: np.ndarray,
    classnames: list[str],
    path: str | Path,
    per_class: int = 8,
) -> Path:
    """Cosine similarity of val samples (rows, grouped by true class) vs class prompt embeddings."""
    labels = np.asarray(labels)
    rows = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(classnames))]).astype(
        int
    )
    a = _normalize(np.asarray(features)[rows])
    sim = a @ _normalize(np.asarray(class_features)).T
    fig = Figure(figsize=(max(4.0, 0.45 * len(classnames) + 2), 6.0))
    ax = fig.add_subplot()
    im = ax.imshow(sim, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(classnames)), classnames, rotation=90, fontsize=7)
    bounds = np.flatnonzero(np.diff(labels[rows])) + 0.5
    for b in bounds:
        ax.axhline(b, color="white", linewidth=0.5)
    centres = [
        rows_of.mean() for c in range(len(classnames)) if (rows_of := np.flatnonzero(labels[rows] == c)).size
    ]
    present = [classnames[c] for c in range(len(classnames)) if (labels[rows] == c).any()]
    ax.set_yticks(centres, present, fontsize=7)
    ax.set(
        title="val samples vs class prompts (cosine)", xlabel="class prompt", ylabel="val sample (true class)"
    )
    fig.colorbar(im, ax=ax)
    return _save(fig, Path(path))


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """``[N, D]`` -> ``[N, 2]``: PCA (numpy's SVD; each axis's sign fixed so its largest loading is
    positive, so the picture is the same on every run) or scikit-learn's t-SNE."""
    x = _normalize(np.asarray(features, dtype=np.float64))
    if method == "pca":
        centred = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        axes = vt[:2] * np.sign(vt[:2][np.arange(min(2, len(vt))), np.abs(vt[:2]).argmax(axis=1)])[:, None]
        return np.pad(centred @ axes.T, ((0, 0), (0, 2 - len(axes))))
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(
            n_components=2, perplexity=min(30.0, max(2.0, (len(x) - 1) / 3)), init="pca", random_state=seed
        ).fit_transform(x)
    raise ValueError(f"projection method '{method}' is unknown; use pca or tsne")


def plot_projection(
    features: np.ndarray,
    labels: np.ndarray,
    classnames: list[str],
    path: str | Path,
    method: str = "pca",
    seed: int = 0,
) -> Path:
    """2-D projection of the val embeddings, one colour per class."""
    xy = project_2d(features, method, seed)
    labels = np.asarray(labels)
    fig = Figure(figsize=(6.0, 5.0))
    ax = fig.add_subplot()
    cmap = "tab10" if len(classnames) <= 10 else "tab20"
    points = ax.scatter(
        xy[:, 0], xy[:, 1], c=labels, cmap=cmap, s=8, vmin=0, vmax=max(len(classnames) - 1, 1)
    )
    handles, _ = points.legend_elements(num=None)
    names = [classnames[int(c)] for c in np.unique(labels)]
    if len(names) <= 20:
        ax.legend(handles, names, fontsize=7, loc="best", markerscale=0.8)
    ax.set(title=f"val embeddings ({method.upper()})", xticks=[], yticks=[])
    return _save(fig, Path(path))


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def plot_confusion(confusion, names: list[str], path: Path, title: str = "") -> Path:
    """A confusion matrix (rows: true, columns: predicted; a ``[n, n]`` tensor or array) with its
    counts written in the cells."""
    counts = np.asarray(confusion)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(names)
    fig = Figure(figsize=(1.0 + 0.5 * n, 1.0 + 0.5 * n))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return path
