"""Benchmark 6: time to fixed val retrieval targets on the scenes, ours vs open_clip_train, over seeds.

Both trainers train the same open_clip ViT JSON (``vit-4x192-p8-64``, the tower pair of
experiment=scenes_clip) on the same scenes shards (`mmpretrain data scenes`), batch, lr, warmup,
weight decay, clipping, epochs and data workers on the CPU, each in its faster precision there, and
evaluate after every epoch. Ours: experiment=scenes_clip's ``trainer.precision=auto`` (bf16-mixed on a
CPU with native bf16, with ``attention_kernel=auto``'s math kernel); open_clip_train:
``--ref-precision``, by default ``amp_bf16`` on such a CPU (its bf16 autocast, with torch's kernels,
measured ~7 % faster a step than its fp32 there) and ``fp32`` elsewhere:

- ours: ``experiment=scenes_clip`` as it is (its captions per step included), and
  ``val/retrieval_mean_R@1/image_text`` over every val caption (the papers' protocol);
- open_clip_train reads the ``txt`` caption (the first of the five), as it does for webdataset
  shards; scripts/bench_entry.py adds the same five-caption retrieval, computed with mmpretrain's
  evaluation functions, to its per-epoch evaluation.

Each side runs once per ``--seeds`` seed (ours ``seed=``, open_clip ``--seed``, which also seeds its
shard shuffle), the sides interleaved. Reported per side, as the median over seeds and its range:
the val curve, and for each fixed ``--targets`` mean R@1 the time to reach it three ways:

- **training time**: the sum of the optimizer steps' durations up to the evaluation that crossed
  it, from the same step hook in both trainers (scripts/bench_entry.py); the interval that holds an
  evaluation (and the loader's restart) counts as one median step, the first step as one median step;
- **wall time**: process start to the line that reports the metric (evaluation and start-up included);
- **samples seen**: (evaluations up to the crossing) x ``--epoch-samples``: what a recipe changes.

An "epoch" is ``--epoch-samples`` samples, so that evaluation comes often enough to time the
crossing; both trainers draw shards with replacement (open_clip's ``--dataset-resampled``, our
endless stream).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from pathlib import Path

import bench_common as bc

OURS = re.compile(r"epoch (\d+) step \d+: .*retrieval_mean_R@1/image_text ([0-9.]+)")
REF = re.compile(r"BENCH retrieval epoch=(\d+) mean_R@1=([0-9.]+)")
SIDES = {"ours": "ours (experiment=scenes_clip)", "open_clip": "open_clip_train (txt caption)"}


def scenes_root(work: Path, train: int, val: int) -> Path:
    return bc.scenes(work / f"scenes-{train}-{val}", train=train, val=val, test=100)


def training_seconds(step_times: list[float], steps_per_epoch: int) -> list[float]:
    """Cumulative training time after each step: the steps' durations, where the first step and each
    epoch's first (whose interval holds the previous evaluation and the loader's restart) count as
    one median step."""
    gaps = [b - a for a, b in zip(step_times, step_times[1:])]
    inner = [g for i, g in enumerate(gaps, start=1) if i % steps_per_epoch]
    typical = bc.median(inner) if inner else 0.0
    total, out = typical, [typical] if step_times else []
    for i, g in enumerate(gaps, start=1):
        total += g if i % steps_per_epoch else typical
        out.append(total)
    return out


def run(name: str, cmd: list[str], env: dict, pattern: re.Pattern, a, work: Path, offset: int) -> dict:
    out = work / "scenes_tta" / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [c.replace("{out}", str(out)) for c in cmd]
    evaluations: list[tuple[float, int, float]] = []

    def watch(t: float, line: str) -> bool:
        m = pattern.search(line)
        if m:
            evaluations.append((t, int(m.group(1)) + offset, float(m.group(2))))
        return False

    res = bc.run_timed(cmd, env, out / "log.txt", timeout=a.cap, watch=watch)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "run" / "checkpoints", ignore_errors=True)
    steps_per_epoch = a.epoch_samples // a.batch
    record = out / "steps.json"
    steps = json.loads(record.read_text())["steps"] if record.exists() else []
    trained = training_seconds(steps, steps_per_epoch)
    history = []  # (wall s, epoch, value, training s, samples seen)
    for t, epoch, value in evaluations:
        n = (epoch + 1) * steps_per_epoch
        history.append((t, epoch, value, trained[n - 1] if len(trained) >= n else float("nan"), n * a.batch))
    row = dict(
        run=name,
        wall_s=round(res["wall_s"], 1),
        capped=res["timed_out"],
        evaluations=len(history),
        best_mean_R1=max((h[2] for h in history), default=float("nan")),
        median_step_s=round(bc.median([b - x for x, b in zip(steps, steps[1:])]), 4)
        if len(steps) > 1
        else None,
        history=history,
        load_avg_1m=round(os.getloadavg()[0], 1),  # timings are only comparable on a quiet machine
    )
    print(f"{name}: curve {[h[2] for h in history]}, wall {row['wall_s']} s", flush=True)
    return row


def crossing(history: list[tuple], target: float) -> tuple | None:
    """The first evaluation at or above ``target``."""
    return next((h for h in history if h[2] >= target), None)


def spread(values: list[float], fmt: str = "{:.0f}", unit: str = "") -> str:
    """``median [min–max]`` over seeds; a seed that never reached the target counts as infinitely
    late, so the median is a lower bound ('> ...') when such seeds hold it."""
    done = sorted(v for v in values if v == v)
    if not done:
        return "not reached"
    med = median_or_inf(values)
    lead = fmt.format(med) if med != math.inf else f"> {fmt.format(done[-1])}"
    missing = f", {len(values) - len(done)} of {len(values)} not reached" if len(done) < len(values) else ""
    return f"{lead}{unit} [{fmt.format(done[0])}–{fmt.format(done[-1])}{missing}]"


def median_or_inf(values: list[float]) -> float:
    """The median with seeds that never reached the target as infinitely late."""
    ranked = sorted(v if v == v else math.inf for v in values)
    n = len(ranked)
    return ranked[n // 2] if n % 2 else (ranked[n // 2 - 1] + ranked[n // 2]) / 2


def commands(a, root: Path, seed: int) -> dict[str, tuple[list[str], bool, re.Pattern, int]]:
    shards, _ = bc.train_shards(root)
    val_shards = sorted((root / "val").glob("*.tar"))
    n_val = sum(json.loads((root / "val" / "sizes.json").read_text()).values())
    warmup = a.epochs * (a.epoch_samples // a.batch) // 20
    entry = [bc.python(), "scripts/bench_entry.py"]
    ours = [
        *entry,
        "ours",
        "--record",
        "{out}/steps.json",
        "--",
        "experiment=scenes_clip",
        f"seed={seed}",
        f"data.root={root}",
        f"model.config={bc.model_json(a.model)}",
        f"data.batch_size={a.batch}",
        f"data.num_workers={a.workers}",
        f"data.train_samples={a.epoch_samples}",
        f"trainer.max_epochs={a.epochs}",
        f"optim.lr={a.lr}",
        f"optim.warmup_steps={warmup}",
        "export_at_end=false",
        "hydra.run.dir={out}",
        *a.ours_extra,
    ]
    ref = [
        *entry,
        "open_clip",
        "--record",
        "{out}/steps.json",
        "--scenes",
        str(root),
        "--",
        *bc.open_clip_cpu_args(
            a.model,
            shards,
            a.epoch_samples,
            val_shards,
            n_val,
            a.epochs,
            a.workers,
            warmup,
            seed,
            options=(
                *("--dataset-resampled", "--batch-size", str(a.batch), "--lr", str(a.lr)),
                *("--wd", "0.1", "--grad-clip-norm", "1.0"),
            ),
            precision=a.ref_precision,
        ),
    ]
    # both number completed epochs from 1
    return {"ours": (ours, False, OURS, -1), "open_clip": (ref, True, REF, -1)}


def summarize(rows: list[dict], targets: list[float]) -> str:
    """One line per run label (a side, with its extra overrides): the median curve and each target's
    times as ``median [range]`` over seeds; then each of our labels against open_clip_train's."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    summary, per_target = [], {}
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        curves = [[h[2] for h in r["history"]] for r in mine]
        length = min((len(c) for c in curves), default=0)
        curve = ", ".join(f"{bc.median([c[e] for c in curves]):.4f}" for e in range(length))
        cells = [f"{label} ({len(mine)} seeds)", curve]
        for target in targets:
            hits = [crossing(r["history"], target) for r in mine]
            train = [h[3] if h else float("nan") for h in hits]
            wall = [h[0] if h else float("nan") for h in hits]
            samples = [h[4] if h else float("nan") for h in hits]
            per_target[(label, target)] = (train, wall, samples)
            cells.append(
                f"{spread(train, unit=' s train')}; {spread(wall, unit=' s wall')}; "
                f"{spread(samples, unit=' samples')}"
            )
        cells += [
            spread([r["best_mean_R1"] for r in mine], "{:.4f}"),
            spread([r["median_step_s"] or float("nan") for r in mine], "{:.3f}"),
            ", ".join(str(r["load_avg_1m"]) for r in mine),
        ]
        summary.append(cells)
    header = ["run", "median val mean R@1 per evaluation"]
    header += [f"to mean R@1 {t:g}: median [range]" for t in targets]
    header += ["best mean R@1", "median step s", "load average after each run"]
    table = bc.md_table(header, summary)
    refs = [label for label in labels if label.startswith(SIDES["open_clip"])]
    lines = []
    for ref, label in ((r, lb) for r in refs for lb in labels if lb not in refs):
        for target in targets:
            parts = []
            for what, k in (("training time", 0), ("wall time", 1), ("samples seen", 2)):
                mo, mr = (
                    median_or_inf(per_target[(label, target)][k]),
                    median_or_inf(per_target[(ref, target)][k]),
                )
                ratio = f"{mr / mo:.2f}x" if math.isfinite(mo) and math.isfinite(mr) and mo > 0 else "–"
                parts.append(f"{what} {ratio}")
            lines.append(f"- {label} vs {ref}, to mean R@1 {target:g}: " + ", ".join(parts))
    if lines:
        table += "\n\nratio open_clip_train / ours of the medians over seeds:\n" + "\n".join(lines)
    return table


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's CSV (``--merge``), as :func:`summarize` takes them."""
    import csv

    rows = []
    for r in csv.DictReader(path.open()):
        step = r.get("median_step_s")
        rows.append(
            r
            | {
                "history": [(h[0], h[1], h[2], h[3], h[4]) for h in json.loads(r["history"])],
                "best_mean_R1": float(r["best_mean_R1"]),
                "median_step_s": float(step) if step else None,
                "label": r.get("label") or SIDES[r["side"]],
            }
        )
    return rows


def _ours_precision() -> str:
    """What ``trainer.precision=auto`` is on this machine, with the attention kernel it trains with."""
    from mmpretrain.runtime.kernels import cpu_has_bf16

    return "bf16-mixed, math attention" if cpu_has_bf16() else "32-true: no native bf16 on this CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=bc.CPU_MODEL)
    p.add_argument("--train", type=int, default=10_000, help="train scenes")
    p.add_argument("--val", type=int, default=500, help="val scenes (retrieval gallery)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epoch-samples", type=int, default=2560, help="samples between evaluations")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4, help="both trainers (experiment=scenes_clip's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4], help="none: only --merge")
    p.add_argument("--targets", type=float, nargs="+", default=[0.01, 0.02], help="fixed mean R@1 targets")
    p.add_argument("--sides", nargs="+", choices=sorted(SIDES), default=["ours", "open_clip"])
    p.add_argument("--ours-extra", nargs="*", default=[], help="more overrides for ours (exploring a recipe)")
    p.add_argument("--merge", nargs="*", type=Path, default=[], help="earlier runs' CSVs to summarize with")
    p.add_argument("--cap", type=float, default=900, help="seconds per run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default="/tmp/mmpretrain-bench")
    p.add_argument(
        "--ref-precision",
        default=None,
        help="open_clip_train's --precision (default: amp_bf16 on a CPU with native bf16, its faster "
        "setting there; else fp32)",
    )
    a = p.parse_args()
    if a.ref_precision is None:
        from mmpretrain.runtime.kernels import cpu_has_bf16

        a.ref_precision = "amp_bf16" if cpu_has_bf16() else "fp32"
    work = Path(a.work)
    root = scenes_root(work, a.train, a.val)
    n_val = sum(json.loads((root / "val" / "sizes.json").read_text()).values())
    rows = [r for path in a.merge for r in read_rows(path)]
    for i, seed in enumerate(a.seeds):
        order = a.sides if i % 2 == 0 else a.sides[::-1]  # alternate who goes first: drift hits both
        for side in order:
            cmd, ref, pattern, offset = commands(a, root, seed)[side]
            env = bc.child_env(a.threads, reference=ref)
            label = SIDES[side] + (f" + {' '.join(a.ours_extra)}" if side == "ours" and a.ours_extra else "")
            if side == "open_clip" and a.ref_precision != "fp32":
                label = f"{SIDES[side]} --precision {a.ref_precision}"
            row = run(f"{label} seed {seed}", cmd, env, pattern, a, work, offset)
            rows.append(row | {"side": side, "seed": seed, "label": label})
    table = summarize(rows, a.targets)
    for r in rows:
        r["history"] = json.dumps([[round(h[0], 1), h[1], h[2], round(h[3], 1), h[4]] for h in r["history"]])
    steps = a.epochs * (a.epoch_samples // a.batch)
    notes = [
        f"model `{a.model}`, {a.train} train / {n_val} val scenes (5 captions each; chance R@1 = "
        f"1/{n_val}), batch {a.batch}, lr {a.lr}, wd 0.1, clip 1.0, warmup {steps // 20} of {steps} steps, "
        f"{a.epochs} epochs of {a.epoch_samples} samples, {a.workers} data workers, CPU: "
        f"ours at experiment=scenes_clip's trainer.precision=auto ({_ours_precision()}), "
        "open_clip_train at the --precision its label says (none: fp32), "
        f"cap {a.cap:.0f} s per run; the sides interleaved seed by seed",
        "mean R@1 = the mean of image->text (any of the 5 captions in the top 1) and text->image (each "
        "caption against every image) R@1, the same function for both trainers; open_clip_train trains "
        "on the txt (first) caption, ours as experiment=scenes_clip says (data.captions_per_sample)",
        "training time: the optimizer steps' durations up to the crossing (evaluations and loader "
        "restarts excluded, the same step hook in both); wall: from process start; samples: evaluations "
        "to the crossing x samples per epoch",
    ]
    bc.write_results("scenes_time_to_target", rows, table, notes)


if __name__ == "__main__":
    main()
