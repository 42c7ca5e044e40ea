"""Distillation on the scenes: a small student trained alone vs distilled from a scenes_clip teacher,
online and from cached teacher embeddings, on the same samples and steps.

Runs, one after the other, through the installed console script (``mmpretrain``):

1. ``mmpretrain data scenes`` (a small split: ``--train`` / ``--val`` scenes),
2. the teacher: ``experiment=scenes_clip`` (ViT 4x192 p8 64 px, text 4x192, embed 128),
   ``--teacher-epochs`` epochs,
3. ``mmpretrain data teacher-embeddings`` of the teacher's export (``--augmentations`` per scene),
4. the student (ViT 2x128 p8 64 px, text 2x128, embed 64) for ``--student-epochs``: alone, distilled online
   and distilled from the cache (logit + feature terms; a learned 64 -> 128 head for the feature term).

Writes ``benchmarks/results/distill_scenes.{csv,md}``: val retrieval mean R@1 (image-text), zero-shot
colour top-1, and the median step time of each run (from ``train/samples_per_s``).

    python scripts/bench_distill_scenes.py --work /tmp/distill-scenes

``--step-time N`` measures only the student's step time with the teacher online vs cached: N runs a
side, interleaved (online, cached, online, ...), each ``--steps`` steps without validation, the median
of the per-step ``train/samples_per_s`` the run logs (its first 5 steps left out). It writes
``benchmarks/results/distill_step_time.{csv,md}``; take the quiet lock around it (README, Benchmarks).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import bench_common as bc

TEACHER = ["experiment=scenes_clip"]
# scenes_clip's recipe (data, loss, lr) with a 2-layer ViT and text transformer (benchmarks/models/)
STUDENT_MODEL = ["model=openclip", f"model.config={bc.MODEL_DIR / 'distill-student-vit-2x128-p8-64.json'}"]
STUDENT = ["data=scenes", "loss=infonce", "optim.lr=5e-4", *STUDENT_MODEL]
QUIET = [
    "callbacks.plots=null",
    "callbacks.model_summary=null",
    "logger=csv",
    "trainer.enable_progress_bar=false",
]
QUIET += ["callbacks.progress_bar=null"]


def mmpretrain(args: list[str], log: Path, threads: int) -> float:
    """Run the console script; its wall time (s). Fails loudly with the log's tail."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            [str(Path(bc.python()).parent / "mmpretrain"), *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=bc.child_env(threads),
            cwd=log.parent,
        )
    if proc.returncode != 0:
        raise SystemExit(
            f"failed ({proc.returncode}): mmpretrain {' '.join(args)}\n{log.read_text()[-3000:]}"
        )
    return time.perf_counter() - start


def run_metrics(run: Path, batch: int) -> dict[str, float]:
    metrics = json.loads((run / "metrics.json").read_text())
    with open(run / "metrics.csv", newline="") as f:
        rates = [float(r["train/samples_per_s"]) for r in csv.DictReader(f) if r.get("train/samples_per_s")]
    return {
        "mean_R@1": metrics["val/retrieval_mean_R@1/image_text"],
        "zeroshot_color": metrics["val/zeroshot_top1/color/image_text"],
        "step_ms": 1000 * batch / statistics.median(rates[1:] or rates),
    }


def step_rates(run: Path) -> list[float]:
    """The run's ``train/samples_per_s`` of every logged step, in order."""
    with open(run / "metrics.csv", newline="") as f:
        return [float(r["train/samples_per_s"]) for r in csv.DictReader(f) if r.get("train/samples_per_s")]


def step_time(
    a: argparse.Namespace, student: list[str], common: list[str], teacher: Path, cached: Path
) -> None:
    """``--step-time``: online vs cached teacher, interleaved runs of the same student, data and steps."""
    distill = [f"distill.teacher={teacher}/export", "distill.logit_weight=1.0", "distill.feature_weight=1.0"]
    sides = {
        "online teacher": distill,
        "cached teacher": [*distill, "distill.cached=true", f"data.sources.scenes.shards={cached}/*.tar"],
    }
    load = [os.getloadavg()[0]]
    rows = []
    for repeat in range(a.step_time):
        for side, extra in sides.items():
            run = a.work / f"time-{side.split()[0]}{repeat}"
            shutil.rmtree(run, ignore_errors=True)
            args = ["train", *student, *common, f"trainer.max_steps={a.steps}", "trainer.limit_val_batches=0"]
            args += ["trainer.log_every_n_steps=1", "export_at_end=false", *extra, f"hydra.run.dir={run}"]
            mmpretrain(args, a.work / f"{run.name}.log", a.threads)
            rates = step_rates(run)[5:]  # the first steps warm up the allocator and the loader
            ms = [1000 * a.batch / r for r in rates]
            rows.append(
                {
                    "teacher": side,
                    "repeat": repeat,
                    "steps": len(ms),
                    "step_ms_median": statistics.median(ms),
                    "step_ms_q1": statistics.quantiles(ms, n=4)[0],
                    "step_ms_q3": statistics.quantiles(ms, n=4)[2],
                }
            )
            print(rows[-1], flush=True)
    load.append(os.getloadavg()[0])
    table = [
        [
            r["teacher"],
            r["repeat"],
            r["steps"],
            f"{r['step_ms_median']:.1f}",
            f"{r['step_ms_q1']:.1f}-{r['step_ms_q3']:.1f}",
        ]
        for r in rows
    ]
    for side in sides:
        medians = [r["step_ms_median"] for r in rows if r["teacher"] == side]
        table.append([f"**{side}**", "all", "", f"**{statistics.median(medians):.1f}**", ""])
    notes = [
        f"the student `{a.student_json.name}`, batch {a.batch}, the same scenes in the same order; "
        f"{a.steps} steps a run, no validation, the step time of each from its own per-step "
        "`train/samples_per_s` (the first 5 steps left out); runs interleaved online, cached, online, ...",
        f"online: the teacher `{teacher}/export` runs forward on every batch; cached: its embeddings read "
        f"from `{cached}` (`mmpretrain data teacher-embeddings`), no teacher loaded",
        f"fp32 CPU, {a.threads} threads, 1 data worker; load average (1 min) {load[0]:.2f} before, "
        f"{load[1]:.2f} after, under the quiet lock",
    ]
    header = ["teacher", "run", "steps", "step ms (median)", "interquartile"]
    bc.write_results("distill_step_time", rows, bc.md_table(header, table), notes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/mmpretrain-distill-scenes"))
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=1)
    p.add_argument("--student-epochs", type=int, default=1)
    p.add_argument("--augmentations", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="delete --work first")
    p.add_argument("--data", type=Path, default=None, help="an existing `mmpretrain data scenes` root")
    p.add_argument(
        "--teacher-run", type=Path, default=None, help="an existing scenes run directory (export/) as teacher"
    )
    p.add_argument("--teacher-name", default="teacher (scenes_clip, ViT 4x192)")
    p.add_argument(
        "--student-json",
        type=Path,
        default=bc.MODEL_DIR / "distill-student-vit-2x128-p8-64.json",
        help="the student's open_clip model JSON",
    )
    p.add_argument("--student-name", default="student (ViT 2x128)")
    p.add_argument("--step-time", type=int, default=0, help="only time online vs cached: N runs a side")
    p.add_argument("--steps", type=int, default=40, help="--step-time: steps a run")
    p.add_argument("--cached", type=Path, default=None, help="existing teacher-embeddings shards to read")
    a = p.parse_args()
    if a.fresh and a.work.exists():
        shutil.rmtree(a.work)
    a.work.mkdir(parents=True, exist_ok=True)
    data = a.data or a.work / "scenes"
    student_model = ["model=openclip", f"model.config={a.student_json.resolve()}"]  # the runs cd elsewhere
    student = [*STUDENT[: -len(STUDENT_MODEL)], *student_model]
    walls = {}
    if not (data / "val" / "sizes.json").exists():
        mmpretrain(
            ["data", "scenes", f"out={data}", f"train={a.train}", f"val={a.val}", f"test={a.val}"],
            a.work / "data.log",
            a.threads,
        )
    common = [f"data.root={data}", f"data.batch_size={a.batch}", "data.num_workers=1", *QUIET]
    teacher = a.teacher_run or a.work / "teacher"
    if not (teacher / "export" / "model.safetensors").exists():
        walls["teacher"] = mmpretrain(
            [
                "train",
                *TEACHER,
                *common,
                f"trainer.max_epochs={a.teacher_epochs}",
                f"hydra.run.dir={teacher}",
            ],
            a.work / "teacher.log",
            a.threads,
        )
    cached = a.cached or a.work / "cached"
    if a.step_time and (cached / "sizes.json").exists():
        return step_time(a, student, common, teacher, cached)
    walls["teacher-embeddings"] = mmpretrain(
        [
            "data",
            "teacher-embeddings",
            f"teacher={teacher}/export",
            f"out={cached}",
            "data=scenes",
            f"data.root={data}",
            f"augmentations={a.augmentations}",
            *student_model,
        ],
        a.work / "cached.log",
        a.threads,
    )
    if a.step_time:
        return step_time(a, student, common, teacher, cached)
    distill = [f"distill.teacher={teacher}/export", "distill.logit_weight=1.0", "distill.feature_weight=1.0"]
    runs = {
        "alone": [],
        "distilled, online teacher": distill,
        "distilled, cached teacher": [
            *distill,
            "distill.cached=true",
            f"data.sources.scenes.shards={cached}/*.tar",
        ],
    }
    rows = [
        {
            "run": a.teacher_name,
            **run_metrics(teacher, a.batch),
            "wall_s": walls.get("teacher"),
        }
    ]
    for name, extra in runs.items():
        run = a.work / name.split(",")[-1].strip().replace(" ", "_")
        wall = mmpretrain(
            [
                "train",
                *student,
                *common,
                f"trainer.max_epochs={a.student_epochs}",
                *extra,
                f"hydra.run.dir={run}",
            ],
            a.work / f"{run.name}.log",
            a.threads,
        )
        rows.append({"run": f"{a.student_name}, {name}", **run_metrics(run, a.batch), "wall_s": wall})
        print(rows[-1], flush=True)
    header = ["run", "val retrieval mean R@1", "zero-shot colour top-1", "step ms (median)", "wall s"]
    keys = ("run", "mean_R@1", "zeroshot_color", "step_ms", "wall_s")
    table = [[r[k] for k in keys] for r in rows]
    notes = [
        f"scenes: {a.train} train / {a.val} val (`mmpretrain data scenes train={a.train} val={a.val}`), "
        f"5 captions each; batch {a.batch}; teacher {a.teacher_epochs} epochs, each student "
        f"{a.student_epochs} epochs ({a.student_epochs * a.train // a.batch} steps, the same samples in the "
        "same order)",
        f"teacher: {a.teacher_name}"
        + (f", the run `{a.teacher_run}`" if a.teacher_run else "")
        + f"; student: `{a.student_json.name}`",
        "distillation: logit term (weight 1) + cosine feature term (weight 1, learned heads from the "
        "student's embedding width to the teacher's); "
        f"cached: {a.augmentations} stored augmentations per scene (`mmpretrain data "
        "teacher-embeddings`), "
        f"{walls['teacher-embeddings']:.0f} s to write",
        f"fp32 CPU, {a.threads} threads, 1 data worker, one run after the other on a shared machine: step "
        "times compare runs made under similar load only roughly",
    ]
    bc.write_results("distill_scenes", rows, bc.md_table(header, table), notes)


if __name__ == "__main__":
    main()
