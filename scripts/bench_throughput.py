"""Benchmark 1 (and 5 on a GPU): a whole training run of ours vs open_clip's own trainer.

Same open_clip model-config JSON, same digits shards, batch, precision, steps, data workers,
optimiser (AdamW, lr, wd, clipping); runs interleaved ours, open_clip, ours, open_clip ...
The headline is the whole-process wall time, launch to exit, of each A/B pair: what a user who
runs both sees. Next to it: steady-state samples/s from the same optimizer-step hook in both
(scripts/bench_entry.py, excluding ``--warmup`` steps), start-up (launch to the end of the first
optimizer step) and end of run (the last optimizer step to process exit: checkpoint, plots, logger
finish). Ours runs with every default a user gets (progress bar, CSV + wandb offline, checkpoints,
plots); no validation and no export on either side.

    python scripts/bench_throughput.py                     # CPU: clip_vit-tiny_digits ViT, batch 64, 1 worker
    python scripts/bench_throughput.py --device cuda       # ViT-B/32 at 224 px, bf16, + MFU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import bench_common as bc


def flops_per_sample(model_name: str) -> float:
    """Training FLOPs per (image, caption) pair: forward + backward counted by torch on 2 samples."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    for folder in bc.MODEL_DIRS:
        open_clip.add_model_config(str(folder))
    model = open_clip.create_model(model_name, output_dict=True)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(2, 3, size, size)
    texts = torch.randint(0, 1000, (2, model.context_length))
    with FlopCounterMode(display=False) as counter:
        out = model(images, texts)
        (out["image_features"] @ out["text_features"].T).sum().backward()
    return counter.get_total_flops() / 2


def ours_cmd(a, digits: Path, run: Path, record: Path) -> list[str]:
    config = (
        str(bc.model_json(a.model))
        if any((d / f"{a.model}.json").exists() for d in bc.MODEL_DIRS)
        else a.model
    )
    gpu = a.device == "cuda"
    return [
        bc.python(),
        "scripts/bench_entry.py",
        "ours",
        "--record",
        str(record),
        "--",
        "model=openclip",
        f"model.config={config}",
        f"data.root={digits}",
        f"data.batch_size={a.batch}",
        f"data.num_workers={a.workers}",
        f"data.train_samples={a.steps * a.batch}",
        f"trainer={'gpu' if gpu else 'cpu'}",
        f"trainer.precision={'bf16-mixed' if gpu else '32-true'}",
        f"trainer.max_steps={a.steps}",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=0",
        f"optim.lr={a.lr}",
        f"optim.warmup_steps={a.steps // 10}",
        f"optim.weight_decay={a.wd}",
        "trainer.gradient_clip_val=1.0",
        "export_at_end=false",
        f"hydra.run.dir={run}",
    ]


def open_clip_cmd(a, digits: Path, run: Path, record: Path) -> list[str]:
    shards, _ = bc.train_shards(digits)
    return [
        bc.python(),
        "scripts/bench_entry.py",
        "open_clip",
        "--record",
        str(record),
        "--",
        "--model",
        a.model,
        "--train-data",
        bc.brace_pattern(shards),
        "--dataset-type",
        "webdataset",
        "--dataset-resampled",
        "--train-num-samples",
        str(a.steps * a.batch),
        "--batch-size",
        str(a.batch),
        "--workers",
        str(a.workers),
        "--epochs",
        "1",
        "--precision",
        "amp_bf16" if a.device == "cuda" else "fp32",
        "--device",
        a.device,
        "--lr",
        str(a.lr),
        "--warmup",
        str(a.steps // 10),
        "--wd",
        str(a.wd),
        "--grad-clip-norm",
        "1.0",
        "--log-every-n-steps",
        "5",
        "--logs",
        str(run),
        "--name",
        "run",
        "--seed",
        "0",
        "--report-to",
        "",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--model", default=None, help=f"open_clip config name (default {bc.CPU_MODEL} / {bc.GPU_MODEL})"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 200 cpu, 120 cuda)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="steps excluded from steady state (default steps/4)"
    )
    p.add_argument("--batch", type=int, default=None, help=f"default {bc.CPU_BATCH} cpu, 256 cuda")
    p.add_argument(
        "--workers", type=int, default=None, help=f"data workers (default {bc.CPU_WORKERS} cpu, 8 cuda)"
    )
    p.add_argument("--reps", type=int, default=3, help="A/B pairs")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of both (default: all cores)")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default by GPU name)")
    p.add_argument("--work", default="/tmp/mmpretrain-bench", help="scratch directory")
    p.add_argument(
        "--ours-variant",
        action="append",
        default=[],
        help="extra arm: ours with these overrides (e.g. optim.fused=false), to measure a change",
    )
    p.add_argument("--name", default=None, help="results name (default throughput_<device>)")
    a = p.parse_args()
    gpu = a.device == "cuda"
    a.model = a.model or (bc.GPU_MODEL if gpu else bc.CPU_MODEL)
    a.steps = a.steps or (120 if gpu else 200)
    a.warmup = a.warmup if a.warmup is not None else a.steps // 4
    a.batch = a.batch or (256 if gpu else bc.CPU_BATCH)
    a.workers = a.workers if a.workers is not None else (8 if gpu else bc.CPU_WORKERS)
    a.steps = max(a.workers, 1) * -(-a.steps // max(a.workers, 1))  # open_clip rounds to whole worker batches
    name = a.name or f"throughput_{a.device}"
    work = Path(a.work)
    digits = bc.digits_root(work)

    rows = []
    for rep in range(a.reps):
        arms = ["ours", "open_clip", *a.ours_variant]
        for trainer in arms:
            run = work / name / f"{trainer.replace('=', '_')}_{rep}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            record = run / "steps.json"
            cmd = (open_clip_cmd if trainer == "open_clip" else ours_cmd)(a, digits, run, record)
            if trainer not in ("ours", "open_clip"):
                cmd += trainer.split()
            env = bc.child_env(a.threads, reference=trainer == "open_clip")
            launched = time.time()
            res = bc.run_timed(cmd, env, run / "log.txt", timeout=1800)
            exited = launched + res["wall_s"]
            recorded = json.loads(record.read_text())
            steps, epochs = recorded["steps"], recorded["step_epochs"]
            if len(steps) != a.steps:
                raise SystemExit(
                    f"{trainer} ran {len(steps)} optimizer steps, expected {a.steps}; see {run}/log.txt"
                )
            rate = bc.steady_rate(steps, a.batch, a.warmup)
            rows.append(
                dict(
                    trainer=trainer,
                    rep=rep,
                    device=a.device,
                    model=a.model,
                    batch=a.batch,
                    workers=a.workers,
                    steps=a.steps,
                    warmup_steps=a.warmup,
                    steady_samples_per_s=round(rate, 2),
                    first_step_s=round(steps[0], 2),
                    startup_s=round(epochs[0] - launched, 2),
                    end_s=round(exited - epochs[-1], 2),
                    wall_s=round(res["wall_s"], 2),
                    load_avg_1m=round(os.getloadavg()[0], 2),
                )
            )
            print(
                f"{trainer} rep {rep}: wall {res['wall_s']:.1f} s (start-up {rows[-1]['startup_s']:.1f} s, "
                f"end {rows[-1]['end_s']:.1f} s), {rate:.1f} samples/s steady",
                flush=True,
            )
            shutil.rmtree(run / "checkpoints", ignore_errors=True)

    flops = flops_per_sample(a.model)
    ours = [r["steady_samples_per_s"] for r in rows if r["trainer"] == "ours"]
    ref = [r["steady_samples_per_s"] for r in rows if r["trainer"] == "open_clip"]
    pair_ratios = [o / r for o, r in zip(ours, ref)]
    peak = a.peak_tflops
    if gpu and peak is None:
        import torch

        gpu_name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in bc.PEAK_BF16_TFLOPS.items() if k in gpu_name), None)
    walls = {
        key: [r["wall_s"] for r in rows if r["trainer"] == key]
        for key in dict.fromkeys(r["trainer"] for r in rows)
    }
    wall_pairs = [r / o for o, r in zip(walls["ours"], walls["open_clip"])]
    table_rows = []
    arms = [("ours (Lightning)", "ours"), ("open_clip_train", "open_clip")]
    arms += [(f"ours with `{v}`", v) for v in a.ours_variant]
    for trainer, key in arms:
        mine = [r for r in rows if r["trainer"] == key]
        rate = bc.median([r["steady_samples_per_s"] for r in mine])
        achieved = flops * rate / 1e12
        mfu = f"{100 * achieved / peak:.1f} %" if peak else "–"
        table_rows.append(
            [
                trainer,
                bc.median(walls[key]),
                ", ".join(f"{x:.1f}" for x in walls[key]),
                bc.median([r["startup_s"] for r in mine]),
                bc.median([r["end_s"] for r in mine]),
                rate,
                f"{achieved:.3f}",
                mfu,
            ]
        )
    table = (
        f"**whole run, launch to exit: ours is {bc.median(wall_pairs):.2f}x as fast as open_clip_train** "
        f"(median of {len(wall_pairs)} interleaved A/B pairs; open_clip wall / ours wall per pair: "
        f"{', '.join(f'{x:.3f}' for x in wall_pairs)})\n\n"
    )
    table += bc.md_table(
        [
            "trainer",
            "wall s (median)",
            "wall s per run",
            "start-up s",
            "end of run s",
            "steady samples/s",
            "TFLOP/s",
            "MFU",
        ],
        table_rows,
    )
    table += (
        f"\n\nsteady state alone: ours / open_clip {bc.median(ours) / bc.median(ref):.2f}x "
        f"(per pair: {', '.join(f'{x:.2f}' for x in pair_ratios)})"
    )
    notes = [
        f"model `{a.model}` (open_clip config, same JSON for both), {a.device}, "
        f"{'bf16 autocast' if gpu else 'fp32'}, batch {a.batch}, {a.workers} data workers, {a.steps} steps "
        f"(steady state: the first {a.warmup} excluded), AdamW lr {a.lr} wd {a.wd}, grad-clip 1.0, {a.reps} "
        "A/B pairs; no validation, no export",
        "start-up: launch to the end of the first optimizer step (imports, config, model, loggers, data "
        "workers, first batch, first step); end of run: the last optimizer step to process exit",
        f"load average (1 min) after each run: {', '.join(str(r['load_avg_1m']) for r in rows)}",
        f"training FLOPs per sample {flops / 1e9:.3f} GFLOP (torch FlopCounter, fwd+bwd, captions at the "
        "full context length: TFLOP/s and MFU count the same model FLOPs for both, although ours skips the "
        "padding "
        "columns its text tower cannot see)" + (f", peak {peak} TFLOP/s bf16" if peak else ""),
        "ours: `mmpretrain train` with the default callbacks and loggers (checkpoint, lr monitor, rich "
        "progress bar, wandb offline + CSV); open_clip: `open_clip_train.main` from open_clip_torch "
        f"{bc.machine()['open_clip']} with webdataset 0.2.86 (`.bench/ref`), `--dataset-resampled`",
    ]
    bc.write_results(name, rows, table, notes)


if __name__ == "__main__":
    main()
