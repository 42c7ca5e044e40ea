"""``mmpretrain <command> [hydra overrides]``: plain functions + thin Hydra wrappers.

Each command is a function of a composed config (tests call them directly); ``main`` only
dispatches to the Hydra-decorated wrapper of the command named on the command line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf


def _find_conf_dir() -> str:
    """The configs: ``$MMPRETRAIN_CONF_DIR``, else ``mmpretrain/conf`` inside an installed wheel
    (pyproject maps the top-level ``conf/`` there), else the source checkout's top-level ``conf/``
    (an editable install, or the repository on ``sys.path``)."""
    if os.environ.get("MMPRETRAIN_CONF_DIR"):
        return str(Path(os.environ["MMPRETRAIN_CONF_DIR"]).resolve())
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"mmpretrain's configs were found neither in {package / 'conf'} (an installed wheel) nor in "
        f"{package.parent / 'conf'} (a source checkout); reinstall mmpretrain or set MMPRETRAIN_CONF_DIR"
    )


CONF_DIR = _find_conf_dir()


# -- commands ------------------------------------------------------------------------------
def data(cfg: DictConfig) -> Path:
    from mmpretrain.data.builders import build, options

    out = build(cfg.name, cfg.out, **options(cfg.name, cfg))
    print(f"wrote {cfg.name} to {out}")
    return out


def train(cfg: DictConfig) -> dict[str, float]:
    import lightning as L

    from mmpretrain.callbacks import AtomicCheckpointIO
    from mmpretrain.datamodule import ContrastiveDataModule
    from mmpretrain.export import check_checkpoint_matches, export
    from mmpretrain.losses import check_modalities
    from mmpretrain.model import apply_training_options, build_model
    from mmpretrain.module import ContrastiveModule
    from mmpretrain.monitor import CSVLogger, one_wandb_run
    from mmpretrain.pretrained import check_available

    run_dir = _start_run(cfg)
    from mmpretrain.data.seeds import global_seed

    L.seed_everything(global_seed(cfg.seed), workers=True)
    check_available(cfg.model)  # pretrained files cached or downloaded now, before any data or trainer
    _ensure_data(cfg.data)
    model = apply_training_options(build_model(cfg.model), cfg.model)
    if cfg.get("compile"):
        for tower in model.towers.values():
            tower.compile()  # in place: parameter names (checkpoints, export) stay as they are
    datamodule = ContrastiveDataModule(cfg.data, model.preprocess, seed=cfg.seed, negatives=_hard_negatives(cfg.loss))
    loss = _instantiate(cfg.loss)
    check_modalities(loss, model.modalities)
    prompts = _zeroshot_prompts(cfg.data)
    _resolve_monitor(cfg, has_classnames=prompts is not None)
    ckpt_path = _resume_path(cfg, run_dir)
    if ckpt_path:  # a checkpoint of another model config fails here, with what differs
        check_checkpoint_matches(model, ckpt_path)
        from mmpretrain.sharding import preload_datamodule_state

        preload_datamodule_state(datamodule, ckpt_path)  # trainer=fsdp restores only after building the loader
    trainer_kwargs, optim = _trainer_and_optim(cfg)
    module = ContrastiveModule(
        model, loss, optim, zeroshot=prompts, hparams={"model": _plain(cfg.model)},
        zeroshot_tasks=_zeroshot_tasks(cfg.data),
    )
    loggers = _instantiate_all(cfg.get("logger"))
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            logger.resuming = bool(ckpt_path)
    trainer = L.Trainer(**trainer_kwargs, default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()],
                        logger=loggers, callbacks=_instantiate_all(cfg.get("callbacks")))
    if _val_at_start(cfg) and not ckpt_path:  # the pretrained starting point, logged at step 0
        with one_wandb_run(loggers):
            trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["skipped_samples"] = float(module.skipped_total)
    if cfg.export_at_end:
        model = _whole_model(model, cfg.model)  # under trainer=fsdp: gathered from every rank
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if cfg.export_at_end:
            export(model, run_dir / "export", extra={"metrics": metrics, "train_config": _plain(cfg)})
        print(f"skipped samples: {module.skipped_total}")
    _end_run(run_dir)
    return metrics


def _whole_model(model, model_cfg: DictConfig):
    """``model`` itself, or, when it is sharded (trainer=fsdp), an unsharded copy with the trained
    weights (a collective: every rank calls it)."""
    from mmpretrain.model import build_model
    from mmpretrain.sharding import full_state_dict, is_sharded

    if not is_sharded(model):
        return model
    state = full_state_dict(model)  # the whole state on rank 0, empty on the others
    if not state:
        return model
    whole = build_model(_plain(model_cfg))
    whole.load_state_dict(state, strict=True)
    return whole


def evaluate(cfg: DictConfig) -> dict[str, float]:
    import lightning as L

    from mmpretrain.datamodule import ContrastiveDataModule
    from mmpretrain.export import model_from_checkpoint
    from mmpretrain.module import ContrastiveModule

    run_dir = _start_run(cfg)
    from mmpretrain.data.seeds import global_seed

    L.seed_everything(global_seed(cfg.seed))
    _ensure_data(cfg.data)
    model = model_from_checkpoint(cfg.ckpt, _plain(cfg.get("model")))
    datamodule = ContrastiveDataModule(cfg.data, model.preprocess, seed=cfg.seed)
    prompts = _zeroshot_prompts({"val": {"classnames": cfg.get("classnames"), "templates": cfg.get("templates")}})
    module = ContrastiveModule(model, loss=_InfoNCEForAllPairs(model), optim={}, zeroshot=prompts,
                               zeroshot_tasks=_zeroshot_tasks(cfg.data))
    trainer = L.Trainer(**_with_strategy(_plain(cfg.trainer)) | {"logger": False, "enable_checkpointing": False})
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    for key, value in sorted(metrics.items()):
        if "zeroshot_top1" in key:
            print(f"{key.split('zeroshot_top1/', 1)[1]} zero-shot top-1: {value:.4f}")  # the pair, or task/pair
    for key, value in sorted(metrics.items()):
        if key.startswith(("val/retrieval_R@", "val/retrieval_mean_rank", "val/retrieval_median_rank",
                           "val/retrieval_rsum", "val/retrieval_mean_R@1", "val/probe/")):
            print(f"{key.removeprefix('val/retrieval_')}: {value:.4f}")
    if trainer.is_global_zero:
        (run_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    _end_run(run_dir)
    return metrics


def finetune(cfg: DictConfig) -> dict[str, float]:
    import lightning as L

    from mmpretrain import finetune as tasks
    from mmpretrain.export import model_from_checkpoint

    run_dir = _start_run(cfg)
    from mmpretrain.data.seeds import global_seed

    L.seed_everything(global_seed(cfg.seed), workers=True)
    _ensure_data(cfg.data)
    model = model_from_checkpoint(cfg.pretrained, _plain(cfg.get("model")))
    prompts = _zeroshot_prompts(cfg.data)
    classnames = prompts["classnames"] if prompts else None
    metrics = tasks.run(_plain(cfg.task), model, _plain(cfg.data), _with_strategy(_plain(cfg.trainer)),
                        run_dir, classnames=classnames, seed=cfg.seed)
    print(f"{cfg.task.name}: val accuracy {metrics['val/accuracy']:.4f}, macro-F1 {metrics['val/f1_macro']:.4f}")
    _end_run(run_dir)
    return metrics


def export_cmd(cfg: DictConfig) -> Path:
    from mmpretrain.export import (
        export,
        export_open_clip,
        export_torchscript,
        model_from_checkpoint,
        run_provenance,
    )

    writers = {"mmpretrain": None, "open_clip": export_open_clip, "torchscript": export_torchscript}
    if cfg.format not in writers:
        raise ValueError(f"export format '{cfg.format}' is unknown; use format=mmpretrain|open_clip|torchscript")
    model = model_from_checkpoint(cfg.ckpt, _plain(cfg.get("model")))
    if cfg.format == "mmpretrain":
        out = export(model, cfg.out, extra={"source_checkpoint": str(cfg.ckpt)} | run_provenance(cfg.ckpt))
    else:
        out = writers[cfg.format](model, cfg.out)
    print(f"exported {cfg.ckpt} to {out} (format={cfg.format})")
    return out


def sweep_summary(sweep_dir: str | Path, metric: str | None = None, minimize: bool = False, as_json: bool = False):
    """Print every run of a sweep directory (overrides + final metrics), best first."""
    from mmpretrain.sweeps import print_summary, summarize

    summary = summarize(sweep_dir, metric=metric, maximize=False if minimize else None)
    if as_json:
        print(json.dumps({"metric": summary.metric, "maximize": summary.maximize, "runs": [
            {"path": str(r.path), "overrides": r.overrides, "metrics": r.metrics} for r in summary.runs]}, indent=2))
    else:
        print_summary(summary)
    return summary


# -- known-harmless third-party noise -----------------------------------------------------------
#: Warnings that say nothing about the user's run, matched by the start of their message (real
#: warnings still show): our training stream sizes itself per worker, so Lightning's `__len__`
#: caution does not apply; Lightning's pytree shim warns about torch's own API.
_NOISE_WARNINGS = (
    r"Your `IterableDataset` has `__len__` defined",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
#: Lightning's start-up advertisements (logged at INFO).
_NOISE_LOGS = ("💡 Tip:",)


class _DropNoise:
    def filter(self, record) -> bool:  # logging.Filter protocol
        return not str(record.getMessage()).startswith(_NOISE_LOGS)


def quiet_third_party_noise() -> None:
    import logging
    import warnings

    for message in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropNoise())


# -- wiring helpers --------------------------------------------------------------------------
def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def _instantiate(cfg: Any) -> Any:
    from mmpretrain.config import safe_instantiate

    return safe_instantiate(cfg)


def _instantiate_all(group: Any) -> list:
    return [_instantiate(c) for c in (group or {}).values() if c is not None and c.get("_target_")]


def _with_strategy(trainer: dict[str, Any]) -> dict[str, Any]:
    """Trainer kwargs with ``strategy`` built: a config (``{_target_: ...}``) is instantiated, and Lightning's
    ``ddp`` becomes ours (:mod:`mmpretrain.ddp`: evaluation never waits on a rank with no batch left)."""
    trainer = dict(trainer)
    if isinstance(trainer.get("strategy"), dict):  # e.g. {_target_: mmpretrain.ddp.DDPStrategy, ...}
        trainer["strategy"] = _instantiate(trainer["strategy"])
    elif trainer.get("strategy") == "ddp":
        from mmpretrain.ddp import DDPStrategy

        trainer["strategy"] = DDPStrategy()
    return trainer


def _trainer_and_optim(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trainer kwargs and optim config, refusing gradient accumulation that changes the objective."""
    trainer, optim = _plain(cfg.trainer), _plain(cfg.optim)
    trainer.pop("val_at_start", None)  # ours, not Lightning's: see _val_at_start
    trainer = _with_strategy(trainer)
    if int(trainer.get("accumulate_grad_batches") or 1) > 1:
        raise ValueError(
            "trainer.accumulate_grad_batches>1 changes a contrastive loss (each micro-batch would only see its "
            "own negatives). For a batch too big for memory set data.batch_size to the full batch and "
            "optim.grad_cache_chunks=K instead (same gradient as the full batch, memory of one K-th)."
        )
    if int(optim.get("grad_cache_chunks") or 1) > 1:
        # manual optimisation: the module clips itself (Lightning refuses gradient_clip_val then)
        optim["gradient_clip_val"] = trainer.pop("gradient_clip_val", None)
    return trainer, optim


def _val_at_start(cfg: DictConfig) -> bool:
    """``trainer.val_at_start``; ``null`` (default): on when any tower starts from pretrained weights."""
    choice = cfg.trainer.get("val_at_start")
    if choice is not None:
        return bool(choice)
    from mmpretrain.pretrained import tower_configs

    return any(t.get("pretrained") or t.get("pretrained_path") or t.get("image_tower_path")
               or str(t.get("config", "")).startswith("hf-hub:") or str(t.get("model_name", "")).startswith("hf-hub:")
               for t in tower_configs(cfg.model))


def _start_run(cfg: DictConfig) -> Path:
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    print(f"run directory: {run_dir}", flush=True)
    return run_dir


def _end_run(run_dir: Path) -> None:
    print(f"run directory: {run_dir}", flush=True)


def _ensure_data(data_cfg: DictConfig) -> None:
    """Build the bundled dataset(s) named by ``data.build`` when missing: a name (built into
    ``data.root``) or a mapping ``{name: root}`` (a data config mixing several bundled sets)."""
    wanted = data_cfg.get("build")
    if not wanted:
        return
    from mmpretrain.data.builders import build, is_built

    for name, root in (wanted.items() if isinstance(wanted, DictConfig) else [(wanted, data_cfg.root)]):
        if not is_built(root, name):
            print(f"building bundled '{name}' data in {root}")
            build(name, root)


def _zeroshot_prompts(data_cfg: DictConfig) -> dict[str, list[str]] | None:
    from mmpretrain.evaluation.zeroshot import read_lines

    val = data_cfg.get("val") or {}
    if not (val.get("classnames") and Path(val["classnames"]).exists()):
        return None
    templates = read_lines(val["templates"]) if val.get("templates") and Path(val["templates"]).exists() else ["{}"]
    return {"classnames": read_lines(val["classnames"]), "templates": templates}


def _zeroshot_tasks(data_cfg: DictConfig) -> dict[str, dict[str, list[str]]]:
    """``data.val.tasks``: zero-shot tasks scored on the val rows whose json ``labels[<task>]`` >= 0."""
    from mmpretrain.evaluation.zeroshot import read_lines, read_tasks

    val = data_cfg.get("val") or {}
    templates = read_lines(val["templates"]) if val.get("templates") and Path(val["templates"]).exists() else ["{}"]
    return read_tasks(val.get("tasks"), templates)


def _resolve_monitor(cfg: DictConfig, has_classnames: bool) -> None:
    """Make ``optimized_metric`` (what the best checkpoint and a sweeper watch) one the run logs.

    Without validation (no val shards, or ``trainer.limit_val_batches=0``) no checkpoint callback
    monitors anything (each keeps the newest). A zero-shot metric without class names (unlabelled
    shards: no ``classnames.txt``) becomes the pair's mean instance R@1 over both directions,
    ``val/retrieval_mean_R@1/<pair>``, which every val set with the pair supports."""
    val = cfg.data.get("val") or {}
    limit = cfg.trainer.get("limit_val_batches")
    if not val.get("shards") or (limit is not None and float(limit) == 0):
        for callback in (cfg.get("callbacks") or {}).values():
            if callback is not None and callback.get("monitor") is not None:
                callback.monitor = None
        return
    metric = str(cfg.get("optimized_metric") or "")
    if metric.startswith("val/zeroshot_") and metric.count("/") == 2 and not has_classnames:
        fallback = f"val/retrieval_mean_R@1/{metric.rsplit('/', 1)[1]}"
        print(f"no class names for zero-shot (data.val.classnames): monitoring {fallback} instead of {metric}")
        cfg.optimized_metric = fallback


def _hard_negatives(loss_cfg: DictConfig) -> int:
    """Hard negative captions per training sample: ``loss.max_negatives`` with ``loss.hard_negatives``."""
    if not loss_cfg.get("hard_negatives"):
        return 0
    if not str(loss_cfg.get("_target_", "")).endswith("InfoNCE"):
        raise ValueError(f"loss.hard_negatives=true needs loss=infonce (NegCLIP); {loss_cfg.get('_target_')} "
                         f"has no softmax over captions to add the negatives to")
    return int(loss_cfg.get("max_negatives") or 1)


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """``resume=auto`` (or ``ckpt_path=auto``): the newest complete checkpoint of the run, if any."""
    from mmpretrain.callbacks import newest_complete_checkpoint

    choice = cfg.get("resume") or cfg.get("ckpt_path")
    if choice == "auto":
        found = newest_complete_checkpoint(run_dir / "checkpoints")
        print(f"resume=auto: {'resuming from ' + str(found) if found else 'no checkpoint yet, starting fresh'}")
        return str(found) if found else None
    if choice and not Path(choice).exists():
        raise FileNotFoundError(f"resume checkpoint {choice} does not exist (resume=auto picks the newest of the run)")
    return choice


def _InfoNCEForAllPairs(model):
    from mmpretrain.losses import InfoNCE

    # A model with one temperature per pair scores only those pairs (the others have none).
    pairs = model.config()["temperature_pairs"]
    if not pairs:
        mods = model.modalities
        pairs = [(a, b) for i, a in enumerate(mods) for b in mods[i + 1 :]]
    return InfoNCE(pairs=pairs)


# -- Hydra wrappers ----------------------------------------------------------------------------
def _hydra_command(fn: Callable, returns_metric: bool = False) -> Callable[[DictConfig], Any]:
    """The task function Hydra runs (once, or per job of a sweep) for command ``fn``."""

    def task(cfg: DictConfig):
        scored = _name_sweep_run(cfg)
        result = fn(cfg)
        if returns_metric:  # what a sweeper optimises
            value = result.get(cfg.get("optimized_metric"))
            if value is None and scored:
                raise ValueError(
                    f"this run logged no '{cfg.optimized_metric}' (the sweep's optimized_metric), so the sweeper "
                    f"cannot score it; logged: {sorted(result)}. Make validation run before training ends "
                    f"(e.g. trainer.val_check_interval=N with N <= trainer.max_steps) or set optimized_metric=KEY."
                )
            return value
        return None

    return task


def run_hydra(fn: Callable, config_name: str, overrides: list[str], returns_metric: bool = False) -> None:
    """Run ``fn`` as a Hydra app on the given command-line arguments (overrides, ``-m``, ``--help`` ...).

    This is what ``@hydra.main`` does, with the arguments passed in instead of read from
    ``sys.argv[1:]``: ``sys.argv`` stays as the user typed it (``.../bin/mmpretrain train ...`` or
    ``python -m mmpretrain.cli train ...``), which is exactly what Lightning's DDP launcher, torchrun
    and SLURM re-execute for the other ranks.
    """
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    version.setbase("1.3")
    parser = get_args_parser()
    args = parser.parse_args(overrides)
    _run_hydra(args=args, args_parser=parser, task_function=_hydra_command(fn, returns_metric),
               config_path=CONF_DIR, config_name=config_name)


def _name_sweep_run(cfg: DictConfig) -> bool:
    """In a multirun, put each run's wandb run in a group named after the sweep directory (unless
    logger.wandb.group is set) and name it by its job number and overrides. True when a sweeper
    scores the runs (a search, not a grid)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return False
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is not None:
        swept = _swept_keys(hc)
        own = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
        wandb_cfg.group = wandb_cfg.get("group") or Path(hc.sweep.dir).name
        wandb_cfg.name = wandb_cfg.get("name") or f"{hc.job.num}: {' '.join(own) or hc.job.override_dirname}"[:128]
    return "BasicSweeper" not in str(hc.sweeper.get("_target_", ""))


def _swept_keys(hc: Any) -> set[str]:
    """Keys a sweep varies: command-line sweep overrides (a,b / range() / choice()) and the
    sweeper's search space (hydra.sweeper.params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set((hc.sweeper.get("params") or {}).keys())
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if "=" in a])
    except Exception:  # noqa: BLE001 - a launcher's own argv (submitit) is not ours to parse
        return keys
    return keys | {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}


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


def _sweep_summary_main(argv: list[str]) -> int:
    import argparse

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


COMMANDS: dict[str, tuple[Callable, str, str]] = {
    "train": (train, "train", "train a contrastive model (Hydra overrides; -m for sweeps)"),
    "eval": (evaluate, "eval", "zero-shot + retrieval of ckpt=PATH on data.val"),
    "finetune": (finetune, "finetune", "task=linear_probe|full|fusion pretrained=CKPT_OR_DIR: classification"),
    "export": (export_cmd, "export", "ckpt=PATH out=DIR -> model.safetensors + config.json"),
    "data": (data, "build_data", "NAME out=DIR: write a bundled dataset (digits, spoken-digits, scenes) as shards; shards in=...: your own data"),
}


# Commands that are not Hydra apps: name -> (main(argv) -> exit code, help).
PLAIN_COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "sweep-summary": (_sweep_summary_main, "DIR: table of every run of a sweep (overrides, final metrics), best first"),
}


def usage() -> str:
    lines = ["usage: mmpretrain <command> [hydra overrides]   (mmpretrain <command> --help lists config groups)", ""]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in PLAIN_COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in PLAIN_COMMANDS:
        return PLAIN_COMMANDS[command][0](rest)
    if command not in COMMANDS:
        print(f"mmpretrain: unknown command '{command}'\n\n{usage()}", file=sys.stderr)
        return 2
    fn, config_name, _ = COMMANDS[command]
    from mmpretrain.allocator import keep_freed_memory

    keep_freed_memory()  # no page faults per training step on the CPU (see mmpretrain/allocator.py)
    quiet_third_party_noise()
    if command == "data" and rest and "=" not in rest[0] and not rest[0].startswith("-"):
        rest[0] = f"name={rest[0]}"  # `mmpretrain data digits out=DIR`
    run_hydra(fn, config_name, rest, returns_metric=command == "train")
    return 0

def console(argv: list[str] | None = None) -> NoReturn:
    """The ``mmpretrain`` console script: :func:`main`, then :func:`exit_now` with its exit code
    (an error still leaves through the normal ``SystemExit`` path, traceback and all)."""
    code = main(argv)
    exit_now(code if isinstance(code, int) else 0)


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown of every module it imported: with torch,
    Lightning and open_clip loaded that teardown alone takes ~2 s and does nothing a finished
    command needs. What has to happen at exit still happens, in the interpreter's order:
    non-daemon threads are joined, the ``atexit`` handlers run (logging flushed and closed, wandb's
    service stopped, data-loader workers reaped, ...), and stdout/stderr are flushed."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to lose
            pass
    os._exit(code)


if __name__ == "__main__":
    console()
