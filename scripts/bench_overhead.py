"""Benchmark 2: framework overhead — our Lightning step vs a plain PyTorch loop.

The same model (same initial weights), loss, optimiser, clipping and the same pre-collated
batches held in memory (no data loading in the timed region). Three loops, interleaved per rep:

- ``plain``: forward, InfoNCE, backward, clip, AdamW step, lr schedule, logit-scale clamp;
- ``lightning-bare``: ``ContrastiveModule`` under a Trainer with no logger, callbacks or bar;
- ``lightning-default``: the Trainer as `mmpretrain train` builds it (our default callbacks and
  loggers: checkpointing, lr monitor, rich progress bar, wandb offline + CSV).

- ``lightning-default-no-<name>[+<name>...]``: the default without those callbacks/loggers.

Steady-state step time from the same optimizer-step hook, first ``--warmup`` steps excluded. Each
loop runs in a fresh process, the modes interleaved and their order reversed every other rep.

Sections: ``make bench`` runs the heavy one (the CPU benchmark model, where a step takes ~0.5 s)
and ``--micro``: a micro open_clip model (ViT 1x64 patch 16 at 32 px, text 1x64, context 16),
batch 8, 300 steps, 1 thread, where a step takes ~12 ms and the Trainer's fixed cost per step in
milliseconds is what the table shows, per callback and logger too. ``--device cuda`` (``make
gpu-check``): ViT-B-32 at 224 px, bf16, plain vs default on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import bench_common as bc
import torch


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(bc.ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


#: ``--micro``: the Trainer's fixed cost per step on a step of ~12 ms (issue: within 1.5 ms of plain).
MICRO = dict(
    model="bench-micro-vit-1x64-p16-32", batch=8, steps=300, warmup=50, threads=1, name="overhead_micro"
)
#: Every callback and logger of the default config, dropped one at a time by ``--micro``.
PARTS = (
    "wandb",
    "csv",
    "progress_bar",
    "lr_monitor",
    "step_stats",
    "nonfinite_guard",
    "preemption",
    "model_checkpoint+step_checkpoint",
)


def collect_batches(model, cfg, n: int, distinct: int | None = None, device: str = "cpu") -> list[dict]:
    """``n`` pre-collated batches (``distinct`` of them, repeated: a GPU's batches of 224 px images
    would not all fit), on ``device``."""
    from mmpretrain.data import ShardStream
    from mmpretrain.training.datamodule import sources_from_config

    stream = ShardStream(
        sources_from_config(cfg.data),
        model.preprocess(True),
        batch_size=int(cfg.data.batch_size),
        train=True,
        batches_per_worker=min(n, distinct or n),
        seed=0,
    )
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in stream]
    return [batches[i % len(batches)] for i in range(n)]


class StepClock:
    """perf_counter after every optimizer step (same hook as scripts/bench_entry.py)."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.times: list[float] = []
        self.handle = register_optimizer_step_post_hook(lambda *_: self.times.append(time.perf_counter()))

    def close(self) -> list[float]:
        self.handle.remove()
        return self.times


def plain_loop(model, loss_fn, optim_cfg, batches, clip: float, bf16: bool = False) -> list[float]:
    from mmpretrain.training.optim import build_optimizer, warmup_cosine

    model.train()
    opt = build_optimizer(model, optim_cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(int(0.05 * len(batches)), len(batches), 0.0))
    device = next(model.parameters()).device
    clock = StepClock()
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = loss_fn(model(batch))
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        model.clamp_logit_scales()
    if device.type == "cuda":
        torch.cuda.synchronize()  # the last steps' kernels, as Lightning's loop ends with a host read
    return clock.close()


def lightning_loop(
    model, loss_fn, cfg, batches, default: bool, work: Path, drop: tuple[str, ...] = ()
) -> list[float]:
    import lightning as L
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from mmpretrain.commands.train import trainer_and_optim as _trainer_and_optim
    from mmpretrain.config import instantiate_all as _instantiate_all
    from mmpretrain.config import to_plain as _plain
    from mmpretrain.training.module import ContrastiveModule

    module = ContrastiveModule(model, loss_fn, _plain(cfg.optim))
    trainer_cfg = _trainer_and_optim(cfg)[0] | dict(max_steps=len(batches), max_epochs=1, limit_val_batches=0)
    if default:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        OmegaConf.update(cfg, "paths.output_dir", str(work), force_add=True)
        loggers = {k: v for k, v in cfg.logger.items() if k not in drop}
        callbacks = {k: v for k, v in cfg.callbacks.items() if k not in drop}
        extra = dict(logger=_instantiate_all(loggers), callbacks=_instantiate_all(callbacks))
        if "progress_bar" in drop:
            extra["enable_progress_bar"] = False
        if {"model_checkpoint", "step_checkpoint"} <= set(drop):
            extra["enable_checkpointing"] = False  # else Lightning adds a ModelCheckpoint of its own
    else:
        extra = dict(
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
        )
    trainer = L.Trainer(**(trainer_cfg | extra), default_root_dir=str(work))
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    clock = StepClock()
    trainer.fit(module, train_dataloaders=loader)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = clock.close()
    if default and "wandb" not in drop:
        import wandb

        wandb.finish()
    return times


def run_one(a, mode: str, rep: int) -> list[float]:
    """One loop in this process (a fresh one per loop: no state, heap or thread left over from the
    loop before it), on the same batches and initial weights as every other loop."""
    from mmpretrain.runtime.allocator import keep_freed_memory

    keep_freed_memory()  # as every `mmpretrain` command does: the same allocator for every loop
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("WANDB_SILENT", "true")
    work = Path(a.work)
    cuda = a.device == "cuda"
    cfg = compose(
        [
            f"data.root={bc.digits_root(work)}",
            "model=openclip",
            f"model.config={a.model if cuda else bc.model_json(a.model)}",
            f"data.batch_size={a.batch}",
            "data.num_workers=0",
            *(["trainer=gpu"] if cuda else []),
        ]
    )
    from mmpretrain.config import safe_instantiate as _instantiate
    from mmpretrain.config import to_plain as _plain
    from mmpretrain.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model).to(a.device)
    loss_fn = _instantiate(cfg.loss)
    batches = collect_batches(model, cfg, a.steps, a.distinct, a.device)
    if mode == "plain":
        clip = float(cfg.trainer.gradient_clip_val)
        return plain_loop(model, loss_fn, _plain(cfg.optim), batches, clip, bf16=cuda)
    drop = tuple(mode.removeprefix("lightning-default-no-").split("+")) if "-no-" in mode else ()
    return lightning_loop(
        model,
        loss_fn,
        cfg,
        batches,
        mode.startswith("lightning-default"),
        work / "overhead" / f"{mode}_{rep}",
        drop,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--micro",
        action="store_true",
        help="the micro-model section: the fixed cost per step, per callback and logger too",
    )
    p.add_argument("--device", default="cpu", help="cpu, or cuda: ViT-B-32 224 px bf16 (make gpu-check)")
    p.add_argument("--distinct", type=int, default=None, help="distinct batches, cycled (default: all)")
    p.add_argument("--model", default=bc.CPU_MODEL)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--batch", type=int, default=bc.CPU_BATCH)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--modes",
        default="plain,lightning-bare,lightning-default",
        help="comma list; lightning-default-no-<name> drops that logger/callback (wandb, csv, "
        "progress_bar, lr_monitor, model_checkpoint)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--work", default="/tmp/mmpretrain-bench")
    p.add_argument("--name", default="overhead", help="results name")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: MODE:REP:OUT.json, one loop
    a = p.parse_args()
    if a.micro:
        for k, v in MICRO.items():
            if p.get_default(k) == getattr(a, k):
                setattr(a, k, v)
        if a.modes == p.get_default("modes"):
            a.modes += "," + ",".join(f"lightning-default-no-{part}" for part in PARTS)
    if a.one:
        mode, rep, out = a.one.split(":", 2)
        Path(out).write_text(json.dumps(run_one(a, mode, int(rep))))
        return
    bc.digits_root(Path(a.work))  # built once, before any timed process

    rows = []
    modes = a.modes.split(",")
    for rep in range(a.reps):
        # Each loop in a fresh process, the order reversed every other rep: a drift of the machine
        # over the run weighs on every mode alike.
        for mode in modes if rep % 2 == 0 else modes[::-1]:
            out = Path(a.work) / "overhead" / f"{mode}_{rep}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            args = [
                bc.python(),
                __file__,
                "--one",
                f"{mode}:{rep}:{out}",
                "--model",
                a.model,
                "--steps",
                str(a.steps),
                "--batch",
                str(a.batch),
                "--work",
                a.work,
                "--device",
                a.device,
            ]
            args += ["--threads", str(a.threads)] if a.threads else []
            args += ["--distinct", str(a.distinct)] if a.distinct else []
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times = json.loads(out.read_text())
            t0 = times[0]
            rate = bc.steady_rate([t - t0 for t in times], a.batch, a.warmup)
            ms = 1000 * a.batch / rate
            typical = 1000 * bc.median([b - t for t, b in zip(times[a.warmup :], times[a.warmup + 1 :])])
            rows.append(
                dict(
                    mode=mode,
                    rep=rep,
                    steps=len(times),
                    samples_per_s=round(rate, 2),
                    ms_per_step=round(ms, 2),
                    median_step_ms=round(typical, 2),
                )
            )
            print(
                f"{mode} rep {rep}: {rate:.1f} samples/s, {ms:.1f} ms/step (median step {typical:.1f} ms)",
                flush=True,
            )

    def per_mode(key: str, mode: str) -> float:
        return bc.median([r[key] for r in rows if r["mode"] == mode])

    def over_plain(mode: str) -> float:
        """The median over reps of (this mode's ms/step - plain's in the same rep): paired, so a
        drift of the machine between reps cancels."""
        plain_by_rep = {r["rep"]: r["ms_per_step"] for r in rows if r["mode"] == "plain"}
        return bc.median(
            [
                r["ms_per_step"] - plain_by_rep[r["rep"]]
                for r in rows
                if r["mode"] == mode and r["rep"] in plain_by_rep
            ]
        )

    plain, plain_typical = per_mode("ms_per_step", "plain"), per_mode("median_step_ms", "plain")
    table_rows = []
    for mode in modes:
        ms, typical = per_mode("ms_per_step", mode), per_mode("median_step_ms", mode)
        runs = ", ".join(f"{r['ms_per_step']:.1f}" for r in rows if r["mode"] == mode)
        table_rows.append(
            [
                mode,
                per_mode("samples_per_s", mode),
                ms,
                f"{over_plain(mode):+.2f}",
                f"{ms / plain:.3f}x",
                typical,
                f"{typical / plain_typical:.3f}x",
                runs,
            ]
        )
    table = bc.md_table(
        [
            "loop",
            "samples/s (median)",
            "ms/step (mean over the run)",
            "ms/step over plain (paired)",
            "vs plain",
            "median step ms",
            "vs plain",
            "ms/step per rep",
        ],
        table_rows,
    )
    default = over_plain("lightning-default") if "lightning-default" in modes else None
    where = f"{a.device}, {'bf16-mixed' if a.device == 'cuda' else 'fp32'}"
    notes = [
        f"model `{a.model}`, batch {a.batch}, {where}, {a.steps} in-memory batches, first {a.warmup} steps "
        f"excluded, {a.reps} reps; every loop in a fresh process, modes interleaved and their order reversed "
        f"every other rep; same batches and initial weights for every loop",
        "ms/step (mean over the run): the steady span over its steps, every step's cost included; median "
        "step: the median of one run's step times, which a slow window of the machine moves less (the "
        "median over the reps of each); over plain: the median over reps of the difference to the same "
        "rep's plain loop",
    ]
    if default is not None:
        verdict = f"the default Trainer costs {default:+.2f} ms/step over the plain loop"
        notes.insert(0, verdict + (" (goal: within 1.5 ms)" if a.micro else ""))
        print(verdict, flush=True)
    bc.write_results(a.name, rows, table, notes)


if __name__ == "__main__":
    main()
