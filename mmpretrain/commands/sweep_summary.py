"""``mmpretrain sweep-summary DIR``: every run of a sweep (overrides, final metrics), best first; and the
Hydra callback that prints it when a ``-m`` sweep ends."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig


def sweep_summary(
    sweep_dir: str | Path, metric: str | None = None, minimize: bool = False, as_json: bool = False
):
    """Print every run of a sweep directory (overrides + final metrics), best first."""
    from mmpretrain.sweeps import print_summary, summarize

    summary = summarize(sweep_dir, metric=metric, maximize=False if minimize else None)
    if as_json:
        print(
            json.dumps(
                {
                    "metric": summary.metric,
                    "maximize": summary.maximize,
                    "runs": [
                        {"path": str(r.path), "overrides": r.overrides, "metrics": r.metrics}
                        for r in summary.runs
                    ],
                },
                indent=2,
            )
        )
    else:
        print_summary(summary)
    return summary


def main(argv: list[str]) -> int:
    """The command line of ``mmpretrain sweep-summary``; its exit code."""
    parser = argparse.ArgumentParser(prog="mmpretrain sweep-summary", description=sweep_summary.__doc__)
    parser.add_argument("dir", help="the sweep directory (hydra.sweep.dir, printed by `mmpretrain train -m`)")
    parser.add_argument("--metric", help="metric to rank by (default: the runs' optimized_metric)")
    parser.add_argument("--minimize", action="store_true", help="lower is better")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        sweep_summary(args.dir, metric=args.metric, minimize=args.minimize, as_json=args.json)
    except FileNotFoundError as e:
        print(f"mmpretrain sweep-summary: {e}", file=sys.stderr)
        return 2
    return 0


class SweepCallback(HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): create the sweep directory before the sweeper
    starts (Optuna's sqlite storage lives in it) and print the sweep summary when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep_summary(config.hydra.sweep.dir, metric=config.get("optimized_metric"))
        except FileNotFoundError as e:  # e.g. every job of a SLURM sweep is still queued
            print(f"no summary yet: {e}")
