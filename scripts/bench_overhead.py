"""Benchmark 2: framework overhead — our Lightning step vs a plain PyTorch loop.

The same model (same initial weights), loss, optimiser, clipping and the same pre-collated
batches held in memory (no data loading in the timed region). Three loops, interleaved per rep:

- ``plain``: input trimming (``model.trim_inputs``, which Lightning's loops get from the module's
  ``transfer_batch_to_device``), forward, InfoNCE, backward, clip, AdamW step, lr schedule,
  logit-scale clamp;
- ``lightning-bare``: ``ContrastiveModule`` under a Trainer with no logger, callbacks or bar;
- ``lightning-default``: the Trainer as `mmpretrain train` builds it (our default callbacks and
  loggers: checkpointing, lr monitor, rich progress bar, wandb offline + CSV).

Steady-state step time from the same optimizer-step hook, first ``--warmup`` steps excluded.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import time
from pathlib import Path

import bench_common as bc
import torch


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(bc.ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def collect_batches(model, cfg, n: int) -> list[dict]:
    from mmpretrain.datamodule import sources_from_config
    from mmpretrain.data import ShardStream

    stream = ShardStream(sources_from_config(cfg.data), model.preprocess(True), batch_size=int(cfg.data.batch_size),
                         train=True, batches_per_worker=n, seed=0)
    return [dict(b) for b in stream]


class StepClock:
    """perf_counter after every optimizer step (same hook as scripts/bench_entry.py)."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.times: list[float] = []
        self.handle = register_optimizer_step_post_hook(lambda *_: self.times.append(time.perf_counter()))

    def close(self) -> list[float]:
        self.handle.remove()
        return self.times


def plain_loop(model, loss_fn, optim_cfg, batches, clip: float) -> list[float]:
    from mmpretrain.optim import build_optimizer, warmup_cosine

    model.train()
    opt = build_optimizer(model, optim_cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(int(0.05 * len(batches)), len(batches), 0.0))
    clock = StepClock()
    for batch in batches:
        losses = loss_fn(model(model.trim_inputs(batch)))
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        model.clamp_logit_scales()
    return clock.close()


def lightning_loop(model, loss_fn, cfg, batches, default: bool, work: Path, drop: tuple[str, ...] = ()) -> list[float]:
    import lightning as L
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from mmpretrain.cli import _instantiate_all, _plain, _trainer_and_optim
    from mmpretrain.module import ContrastiveModule

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
    else:
        extra = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(**(trainer_cfg | extra), default_root_dir=str(work))
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    clock = StepClock()
    trainer.fit(module, train_dataloaders=loader)
    times = clock.close()
    if default and "wandb" not in drop:
        import wandb

        wandb.finish()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=bc.CPU_MODEL)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=bc.CPU_BATCH)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--modes", default="plain,lightning-bare,lightning-default",
                   help="comma list; lightning-default-no-<name> drops that logger/callback (wandb, csv, "
                   "progress_bar, lr_monitor, model_checkpoint)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--work", default="/tmp/mmpretrain-bench")
    p.add_argument("--name", default="overhead", help="results name")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("WANDB_SILENT", "true")
    work = Path(a.work)
    digits = bc.digits_root(work)
    cfg = compose([f"data.root={digits}", "model=openclip", f"model.config={bc.model_json(a.model)}",
                   f"data.batch_size={a.batch}", "data.num_workers=0"])
    from mmpretrain.cli import _instantiate
    from mmpretrain.model import build_model

    torch.manual_seed(0)
    base = build_model(cfg.model)
    loss_fn = _instantiate(cfg.loss)
    batches = collect_batches(base, cfg, a.steps)
    clip = float(cfg.trainer.gradient_clip_val)
    from mmpretrain.cli import _plain

    rows = []
    modes = a.modes.split(",")
    for rep in range(a.reps):
        for mode in modes:
            model = copy.deepcopy(base)
            if mode == "plain":
                times = plain_loop(model, loss_fn, _plain(cfg.optim), batches, clip)
            else:
                drop = tuple(mode.removeprefix("lightning-default-no-").split("+")) if "-no-" in mode else ()
                times = lightning_loop(model, loss_fn, cfg, batches, mode.startswith("lightning-default"),
                                       work / "overhead" / f"{mode}_{rep}", drop)
            t0 = times[0]
            rate = bc.steady_rate([t - t0 for t in times], a.batch, a.warmup)
            ms = 1000 * a.batch / rate
            rows.append(dict(mode=mode, rep=rep, steps=len(times), samples_per_s=round(rate, 2), ms_per_step=round(ms, 2)))
            print(f"{mode} rep {rep}: {rate:.1f} samples/s, {ms:.1f} ms/step", flush=True)
    plain = bc.median([r["ms_per_step"] for r in rows if r["mode"] == "plain"])
    table_rows = []
    for mode in modes:
        ms = bc.median([r["ms_per_step"] for r in rows if r["mode"] == mode])
        sps = bc.median([r["samples_per_s"] for r in rows if r["mode"] == mode])
        table_rows.append([mode, sps, ms, ms - plain, f"{ms / plain:.3f}x"])
    table = bc.md_table(["loop", "samples/s (median)", "ms/step", "overhead ms/step", "step time vs plain"], table_rows)
    notes = [f"model `{a.model}`, batch {a.batch}, fp32 CPU, {a.steps} in-memory batches, first {a.warmup} steps "
             f"excluded, {a.reps} interleaved reps; same initial weights for every loop"]
    bc.write_results(a.name, rows, table, notes)


if __name__ == "__main__":
    main()
