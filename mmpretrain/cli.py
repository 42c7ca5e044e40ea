"""``mmpretrain <command> [hydra overrides]``: plain functions + thin Hydra wrappers.

Each command is a function of a composed config (tests call them directly); ``main`` only
dispatches to the Hydra-decorated wrapper of the command named on the command line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(os.environ.get("MMPRETRAIN_CONF_DIR", Path(__file__).resolve().parent.parent / "conf")))


# -- commands ------------------------------------------------------------------------------
def data(cfg: DictConfig) -> Path:
    from mmpretrain.data.builders import build

    out = build(cfg.name, cfg.out, seed=cfg.seed, image_size=cfg.image_size)
    print(f"wrote {cfg.name} shards to {out}")
    return out


def train(cfg: DictConfig) -> dict[str, float]:
    import lightning as L

    from mmpretrain.datamodule import ContrastiveDataModule
    from mmpretrain.export import export
    from mmpretrain.model import build_model
    from mmpretrain.module import ContrastiveModule

    run_dir = _start_run(cfg)
    L.seed_everything(cfg.seed, workers=True)
    _ensure_data(cfg.data)
    model = build_model(cfg.model)
    datamodule = ContrastiveDataModule(cfg.data, model.preprocess, seed=cfg.seed)
    loss = _instantiate(cfg.loss)
    module = ContrastiveModule(
        model, loss, _plain(cfg.optim), zeroshot=_zeroshot_prompts(cfg.data), hparams={"model": _plain(cfg.model)}
    )
    trainer = L.Trainer(**_plain(cfg.trainer), default_root_dir=str(run_dir),
                        logger=_instantiate_all(cfg.get("logger")), callbacks=_instantiate_all(cfg.get("callbacks")))
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg, run_dir))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["skipped_samples"] = float(module.skipped_total)
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if cfg.export_at_end:
            export(model, run_dir / "export", extra={"metrics": metrics, "train_config": _plain(cfg)})
        print(f"skipped samples: {module.skipped_total}")
    _end_run(run_dir)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    import lightning as L

    from mmpretrain.datamodule import ContrastiveDataModule
    from mmpretrain.export import model_from_checkpoint
    from mmpretrain.module import ContrastiveModule

    run_dir = _start_run(cfg)
    L.seed_everything(cfg.seed)
    _ensure_data(cfg.data)
    model = model_from_checkpoint(cfg.ckpt)
    datamodule = ContrastiveDataModule(cfg.data, model.preprocess, seed=cfg.seed)
    module = ContrastiveModule(model, loss=_InfoNCEForAllPairs(model), optim={}, zeroshot=_zeroshot_prompts(cfg.data))
    trainer = L.Trainer(**_plain(cfg.trainer) | {"logger": False, "enable_checkpointing": False})
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    for key, value in sorted(metrics.items()):
        if "zeroshot_top1" in key:
            print(f"{key.split('/')[-1]} zero-shot top-1: {value:.4f}")
    for key, value in sorted(metrics.items()):
        if key.startswith("val/retrieval_R@"):
            print(f"{key.removeprefix('val/retrieval_')}: {value:.4f}")
    (run_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    _end_run(run_dir)
    return metrics


def export_cmd(cfg: DictConfig) -> Path:
    from mmpretrain.export import export, model_from_checkpoint

    if cfg.format != "mmpretrain":
        raise ValueError(f"export format '{cfg.format}' is unknown; use format=mmpretrain")
    model = model_from_checkpoint(cfg.ckpt)
    out = export(model, cfg.out, extra={"source_checkpoint": str(cfg.ckpt)})
    print(f"exported {cfg.ckpt} to {out}")
    return out


# -- wiring helpers --------------------------------------------------------------------------
def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def _instantiate(cfg: Any) -> Any:
    from mmpretrain.config import safe_instantiate

    return safe_instantiate(cfg)


def _instantiate_all(group: Any) -> list:
    return [_instantiate(c) for c in (group or {}).values() if c is not None and c.get("_target_")]


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
        if not is_built(root):
            print(f"building bundled '{name}' data in {root}")
            build(name, root)


def _zeroshot_prompts(data_cfg: DictConfig) -> dict[str, list[str]] | None:
    from mmpretrain.evaluation.zeroshot import read_lines

    val = data_cfg.get("val") or {}
    if not (val.get("classnames") and Path(val.classnames).exists()):
        return None
    templates = read_lines(val.templates) if val.get("templates") and Path(val.templates).exists() else ["{}"]
    return {"classnames": read_lines(val.classnames), "templates": templates}


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.ckpt_path == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    return cfg.ckpt_path


def _InfoNCEForAllPairs(model):
    from mmpretrain.losses import InfoNCE

    # A model with one temperature per pair scores only those pairs (the others have none).
    pairs = model.config()["temperature_pairs"]
    if not pairs:
        mods = model.modalities
        pairs = [(a, b) for i, a in enumerate(mods) for b in mods[i + 1 :]]
    return InfoNCE(pairs=pairs)


# -- Hydra wrappers ----------------------------------------------------------------------------
def _hydra_command(fn: Callable, config_name: str, returns_metric: bool = False) -> Callable[[], Any]:
    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")
    def wrapper(cfg: DictConfig):
        result = fn(cfg)
        if returns_metric:  # what a sweeper optimises
            return result.get(cfg.get("optimized_metric"))
        return None

    return wrapper


COMMANDS: dict[str, tuple[Callable, str, str]] = {
    "train": (train, "train", "train a contrastive model (Hydra overrides; -m for sweeps)"),
    "eval": (evaluate, "eval", "zero-shot + retrieval of ckpt=PATH on data.val"),
    "export": (export_cmd, "export", "ckpt=PATH out=DIR -> model.safetensors + config.json"),
    "data": (data, "build_data", "NAME out=DIR: write a bundled dataset (digits, spoken-digits) as shards"),
}


def usage() -> str:
    lines = ["usage: mmpretrain <command> [hydra overrides]   (mmpretrain <command> --help lists config groups)", ""]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mmpretrain: unknown command '{command}'\n\n{usage()}", file=sys.stderr)
        return 2
    fn, config_name, _ = COMMANDS[command]
    if command == "data" and rest and "=" not in rest[0] and not rest[0].startswith("-"):
        rest[0] = f"name={rest[0]}"  # `mmpretrain data digits out=DIR`
    sys.argv = [f"mmpretrain {command}", *rest]
    return _hydra_command(fn, config_name, returns_metric=command == "train")()


if __name__ == "__main__":
    sys.exit(main())
