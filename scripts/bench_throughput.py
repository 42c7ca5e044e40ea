"""Benchmark 1 (and 5 on a GPU): training throughput of ours vs open_clip's own trainer.

Same open_clip model-config JSON, same digits shards, batch, precision, steps, data workers,
optimiser (AdamW, lr, wd, clipping); runs interleaved ours, open_clip, ours, open_clip ...
Steady-state samples/s come from the same optimizer-step hook in both (scripts/bench_entry.py),
excluding ``--warmup`` steps; wall time is the whole process (start-up, data, checkpoint).

    python scripts/bench_throughput.py                     # CPU, small ViT
    python scripts/bench_throughput.py --device cuda       # ViT-B/32 at 224 px, bf16, + MFU
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import bench_common as bc


def flops_per_sample(model_name: str) -> float:
    """Training FLOPs per (image, caption) pair: forward + backward counted by torch on 2 samples."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    open_clip.add_model_config(str(bc.MODEL_DIR))
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
    config = str(bc.MODEL_DIR / f"{a.model}.json") if (bc.MODEL_DIR / f"{a.model}.json").exists() else a.model
    gpu = a.device == "cuda"
    return [
        bc.python(), "scripts/bench_entry.py", "ours", "--record", str(record), "--",
        "model=openclip", f"model.config={config}", f"data.root={digits}",
        f"data.batch_size={a.batch}", f"data.num_workers={a.workers}", f"data.train_samples={a.steps * a.batch}",
        f"trainer={'gpu' if gpu else 'cpu'}", f"trainer.precision={'bf16-mixed' if gpu else '32-true'}",
        f"trainer.max_steps={a.steps}", "trainer.max_epochs=1", "trainer.limit_val_batches=0",
        f"optim.lr={a.lr}", f"optim.warmup_steps={a.steps // 10}", f"optim.weight_decay={a.wd}",
        "trainer.gradient_clip_val=1.0", f"hydra.run.dir={run}",
    ]


def open_clip_cmd(a, digits: Path, run: Path, record: Path) -> list[str]:
    shards, _ = bc.train_shards(digits)
    return [
        bc.python(), "scripts/bench_entry.py", "open_clip", "--record", str(record), "--",
        "--model", a.model, "--train-data", bc.brace_pattern(shards), "--dataset-type", "webdataset",
        "--dataset-resampled", "--train-num-samples", str(a.steps * a.batch),
        "--batch-size", str(a.batch), "--workers", str(a.workers), "--epochs", "1",
        "--precision", "amp_bf16" if a.device == "cuda" else "fp32", "--device", a.device,
        "--lr", str(a.lr), "--warmup", str(a.steps // 10), "--wd", str(a.wd), "--grad-clip-norm", "1.0",
        "--log-every-n-steps", "5", "--logs", str(run), "--name", "run", "--seed", "0", "--report-to", "",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None, help=f"open_clip config name (default {bc.CPU_MODEL} / {bc.GPU_MODEL})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40 cpu, 120 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="steps excluded from steady state (default steps/4)")
    p.add_argument("--batch", type=int, default=None, help="default 128 cpu, 256 cuda")
    p.add_argument("--workers", type=int, default=None, help="data workers (default 2 cpu, 8 cuda)")
    p.add_argument("--reps", type=int, default=2, help="A/B pairs")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of both (default: all cores)")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default by GPU name)")
    p.add_argument("--work", default="/tmp/mmpretrain-bench", help="scratch directory")
    p.add_argument("--ours-variant", action="append", default=[],
                   help="extra arm: ours with these overrides (e.g. optim.fused=false), to measure a change")
    p.add_argument("--name", default=None, help="results name (default throughput_<device>)")
    a = p.parse_args()
    gpu = a.device == "cuda"
    a.model = a.model or (bc.GPU_MODEL if gpu else bc.CPU_MODEL)
    a.steps = a.steps or (120 if gpu else 40)
    a.warmup = a.warmup if a.warmup is not None else a.steps // 4
    a.batch = a.batch or (256 if gpu else 128)
    a.workers = a.workers if a.workers is not None else (8 if gpu else 2)
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
            res = bc.run_timed(cmd, env, run / "log.txt", timeout=1800)
            steps = json.loads(record.read_text())["steps"]
            if len(steps) != a.steps:
                raise SystemExit(f"{trainer} ran {len(steps)} optimizer steps, expected {a.steps}; see {run}/log.txt")
            rate = bc.steady_rate(steps, a.batch, a.warmup)
            rows.append(dict(trainer=trainer, rep=rep, device=a.device, model=a.model, batch=a.batch,
                             workers=a.workers, steps=a.steps, warmup_steps=a.warmup,
                             steady_samples_per_s=round(rate, 2), first_step_s=round(steps[0], 2),
                             wall_s=round(res["wall_s"], 2)))
            print(f"{trainer} rep {rep}: {rate:.1f} samples/s steady, wall {res['wall_s']:.1f} s", flush=True)
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
    table_rows = []
    arms = [("ours (Lightning)", "ours"), ("open_clip_train", "open_clip")]
    arms += [(f"ours with `{v}`", v) for v in a.ours_variant]
    for trainer, key in arms:
        rates = [r["steady_samples_per_s"] for r in rows if r["trainer"] == key]
        walls = [r["wall_s"] for r in rows if r["trainer"] == key]
        rate = bc.median(rates)
        achieved = flops * rate / 1e12
        mfu = f"{100 * achieved / peak:.1f} %" if peak else "–"
        table_rows.append([trainer, rate, ", ".join(f"{x:.1f}" for x in rates), bc.median(walls), f"{achieved:.3f}", mfu])
    table = bc.md_table(
        ["trainer", "steady samples/s (median)", "per run", "wall s (median)", "TFLOP/s", "MFU"], table_rows
    )
    table += (f"\n\n**ratio ours / open_clip (steady samples/s): {bc.median(ours) / bc.median(ref):.2f}x** "
              f"(per A/B pair: {', '.join(f'{x:.2f}' for x in pair_ratios)}); "
              f"wall-time ratio {bc.median([r['wall_s'] for r in rows if r['trainer'] == 'open_clip']) / bc.median([r['wall_s'] for r in rows if r['trainer'] == 'ours']):.2f}x (open_clip / ours)")
    notes = [
        f"model `{a.model}` (open_clip config, same JSON for both), {a.device}, "
        f"{'bf16 autocast' if gpu else 'fp32'}, batch {a.batch}, {a.workers} data workers, {a.steps} steps "
        f"of which the first {a.warmup} are excluded, AdamW lr {a.lr} wd {a.wd}, grad-clip 1.0, {a.reps} A/B pairs",
        f"training FLOPs per sample {flops / 1e9:.3f} GFLOP (torch FlopCounter, fwd+bwd)"
        + (f", peak {peak} TFLOP/s bf16" if peak else ""),
        "ours: `mmpretrain train` with the default callbacks and loggers (checkpoint, lr monitor, rich "
        "progress bar, wandb offline + CSV); open_clip: `open_clip_train.main` from open_clip_torch "
        f"{bc.machine()['open_clip']} with webdataset 0.2.86 (`.bench/ref`), `--dataset-resampled`",
    ]
    bc.write_results(name, rows, table, notes)


if __name__ == "__main__":
    main()
