"""Reading a sweep directory back: every run's overrides and final metrics, best first.

A run is any directory under the sweep holding ``.hydra/overrides.yaml`` (what Hydra writes for
each job); its final metrics are its ``metrics.json`` (written by ``mmpretrain train``). Neither
Lightning nor Hydra is imported: the files are plain YAML and JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_METRIC = "val/zeroshot_top1/image_text"
# Columns shown besides the optimised metric when present (prefixes of metric names).
HEADLINE = ("val/zeroshot_top1/", "val/retrieval_R@1/", "val/loss", "train/loss", "skipped_samples")


@dataclass
class SweepRun:
    path: Path
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    finished: bool = False

    def value(self, metric: str) -> float | None:
        v = self.metrics.get(metric)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


@dataclass
class SweepSummary:
    root: Path
    metric: str
    maximize: bool
    runs: list[SweepRun]  # best first; runs without the metric last, in directory order
    best_params: dict[str, Any] | None = None  # Optuna's optimization_results.yaml, when present

    def varying_overrides(self) -> tuple[list[str], list[str]]:
        """(keys whose value differs between runs, overrides shared by every run)."""
        values: dict[str, set[str]] = {}
        for run in self.runs:
            for o in run.overrides:
                key, _, val = o.partition("=")
                values.setdefault(key, set()).add(val)
        counts = {
            k: sum(any(o.partition("=")[0] == k for o in r.overrides) for r in self.runs) for k in values
        }
        varying = [k for k, v in values.items() if len(v) > 1 or counts[k] < len(self.runs)]
        shared = sorted({o for r in self.runs for o in r.overrides if o.partition("=")[0] not in varying})
        return varying, shared

    def columns(self) -> list[str]:
        keys = {k for r in self.runs for k in r.metrics}
        rest = sorted(
            k
            for k in keys
            if k != self.metric and (k.startswith(HEADLINE) or (k.startswith("val/") and k.endswith("loss")))
        )
        return [self.metric, *rest]


def find_runs(root: str | Path) -> list[SweepRun]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"sweep directory {root} does not exist; pass the directory `mmpretrain train -m` "
            f"printed (hydra.sweep.dir, by default runs/train/multirun/<date>_<time>)"
        )
    runs = []
    for overrides_file in sorted(
        root.rglob(".hydra/overrides.yaml"), key=lambda p: _natural(p.parent.parent, root)
    ):
        run_dir = overrides_file.parent.parent
        overrides = [str(o) for o in (yaml.safe_load(overrides_file.read_text()) or [])]
        metrics_file = run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        runs.append(
            SweepRun(run_dir, overrides, {k: float(v) for k, v in metrics.items()}, metrics_file.exists())
        )
    if not runs:
        raise FileNotFoundError(
            f"no run under {root}: a sweep run is a directory with .hydra/overrides.yaml; "
            f"is {root} the directory of a `mmpretrain train -m ...` sweep?"
        )
    return runs


def _natural(path: Path, root: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.relative_to(root).parts)


def summarize(root: str | Path, metric: str | None = None, maximize: bool | None = None) -> SweepSummary:
    """Every run under ``root``, best first by ``metric`` (default: the runs' ``optimized_metric``;
    direction: the Optuna sweeper's when the sweep used it, else maximise)."""
    root = Path(root)
    runs = find_runs(root)
    config = _read_yaml(runs[0].path / ".hydra" / "config.yaml")
    metric = metric or config.get("optimized_metric") or DEFAULT_METRIC
    if maximize is None:
        direction = (
            (_read_yaml(runs[0].path / ".hydra" / "hydra.yaml").get("hydra") or {}).get("sweeper") or {}
        ).get("direction", "maximize")
        maximize = str(direction).lower().removeprefix("direction.") != "minimize"
    scored = [r for r in runs if r.value(metric) is not None]
    unscored = [r for r in runs if r.value(metric) is None]
    scored.sort(key=lambda r: r.value(metric), reverse=maximize)
    results = _read_yaml(root / "optimization_results.yaml")
    return SweepSummary(root, metric, maximize, scored + unscored, results.get("best_params"))


def _read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def print_summary(summary: SweepSummary, console: Any = None) -> None:
    """A rich table: rank, run directory, the overrides that vary, then the metrics."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if Console().is_terminal else 200)
    varying, shared = summary.varying_overrides()
    order = "highest" if summary.maximize else "lowest"
    table = Table(
        title=f"sweep {summary.root} — {len(summary.runs)} runs, best first ({order} {summary.metric})"
    )
    table.add_column("#", justify="right")
    table.add_column("run")
    table.add_column("overrides", overflow="fold")
    columns = summary.columns()
    for key in columns:
        table.add_column(key, justify="right", overflow="fold")
    for i, run in enumerate(summary.runs, 1):
        shown = " ".join(_short(o) for o in run.overrides if o.partition("=")[0] in varying) or "-"
        cells = [_fmt(run.metrics.get(k)) for k in columns]
        if not run.finished:
            cells[0] = "no metrics.json"
        table.add_row(str(i), str(run.path.relative_to(summary.root)), shown, *cells)
    console.print(table)
    if shared:
        console.print(f"common to every run: {' '.join(shared)}")
    if summary.best_params is not None:
        console.print(f"optuna best params: {summary.best_params}")


def _short(override: str) -> str:
    """``optim.lr=0.0012520653814999472`` -> ``optim.lr=0.001252`` (Optuna's samples are long)."""
    key, sep, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}{sep}{number:.4g}" if len(value) > 8 and "." in value else override


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 1e4 and v != int(v) else f"{v:g}"
