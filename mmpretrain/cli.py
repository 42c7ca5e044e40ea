"""``mmpretrain <command> [hydra overrides]``: dispatch to the command's function, run as a Hydra app.

The commands are plain functions of a composed config (:mod:`mmpretrain.commands`); this module only
finds the configs, picks the command named on the command line and hands the rest of the line to
Hydra (overrides, ``-m`` sweeps, ``--help``, ``--cfg``).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig


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


def _command(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported when called: ``mmpretrain --help`` loads no command's dependencies.
    A partial of a module-level function, so a launcher that pickles the task (submitit) can."""
    return functools.partial(_call, module, name)


def _call(module: str, name: str, *args: Any) -> Any:
    return getattr(importlib.import_module(module), name)(*args)


_train = _command("mmpretrain.commands.train", "train")
_evaluate = _command("mmpretrain.commands.evaluate", "evaluate")
_finetune = _command("mmpretrain.commands.finetune", "finetune")
_export = _command("mmpretrain.commands.export", "export_cmd")
_data = _command("mmpretrain.commands.data", "data")
_sweep_summary = _command("mmpretrain.commands.sweep_summary", "main")


#: Hydra commands: name -> (function of the composed config, config name, help).
COMMANDS: dict[str, tuple[Callable[[DictConfig], Any], str, str]] = {
    "train": (_train, "train", "train a contrastive model (Hydra overrides; -m for sweeps)"),
    "eval": (_evaluate, "eval", "zero-shot + retrieval of ckpt=PATH on data.val"),
    "finetune": (
        _finetune,
        "finetune",
        "task=linear_probe|full|fusion pretrained=CKPT_OR_DIR: classification",
    ),
    "export": (_export, "export", "ckpt=PATH out=DIR -> model.safetensors + config.json"),
    "caption": (
        _command("mmpretrain.commands.caption", "caption"),
        "caption",
        "ckpt=PATH in=FOLDER_OR_SHARDS out=captions.jsonl: caption images (a model trained with loss=coca)",
    ),
    "data": (
        _data,
        "build_data",
        "NAME out=DIR [options]: write a bundled dataset as shards, or `shards in=...` your own data",
    ),
}
#: Commands that are not Hydra apps: name -> (main(argv) -> exit code, help).
PLAIN_COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "sweep-summary": (
        _sweep_summary,
        "DIR: table of every run of a sweep (overrides, final metrics), best first",
    ),
}


def usage() -> str:
    """``mmpretrain --help``: every command of :data:`COMMANDS` and :data:`PLAIN_COMMANDS`, and the
    names of the data builders (:data:`mmpretrain.data.builders.BUILDERS`)."""
    from mmpretrain.data.builders import BUILDERS, TEACHER_EMBEDDINGS

    lines = [
        "usage: mmpretrain <command> [hydra overrides]   (mmpretrain <command> --help: what it takes)",
        "",
    ]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in PLAIN_COMMANDS.items()]
    names = ", ".join([*BUILDERS, TEACHER_EMBEDDINGS[0]])
    lines += ["", f"mmpretrain data NAME: {names}   (mmpretrain data --help: their options)"]
    return "\n".join(lines)


def data_usage() -> str:
    """``mmpretrain data --help``: every builder of :data:`mmpretrain.data.builders.BUILDERS`, what
    it writes and its options with their defaults (``conf/build_data.yaml``, else the builder's own)."""
    from omegaconf import OmegaConf

    from mmpretrain.data.builders import BUILDERS, TEACHER_EMBEDDINGS, describe

    cfg = OmegaConf.load(Path(CONF_DIR) / "build_data.yaml")
    lines = [
        "usage: mmpretrain data NAME [out=DIR] [OPTION=VALUE ...]   (out: data/NAME under paths.data_dir)",
        "",
        "NAME, what it writes, and its options (null: the builder decides, e.g. workers = all cores):",
    ]
    for name in BUILDERS:
        about, defaults = describe(name, cfg)
        options = " ".join(
            f"{k}={'(required)' if k == 'in' and v is None else 'null' if v is None else v}"
            for k, v in defaults.items()
        )
        lines += [f"  {name:<18} {about}", f"  {'':<18} {options}"]
    name, about = TEACHER_EMBEDDINGS
    options = " ".join(f"{k}={cfg.get(k)}" for k in ("teacher", "augmentations", "batch_size"))
    lines += [f"  {name:<18} {about}", f"  {'':<18} {options} (and data=, in: its train shards)"]
    lines += ["", "Hydra's own flags still apply: mmpretrain data NAME --cfg job shows the composed config."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the command named by ``argv[0]`` (default: ``sys.argv[1:]``); the exit code."""
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
    fn, config_name, help_ = COMMANDS[command]
    if command == "data" and ("-h" in rest or "--help" in rest):
        print(data_usage())
        return 0
    if "-h" in rest or "--help" in rest:  # Hydra's help (config groups, the config) follows
        print(f"mmpretrain {command}: {help_}\n")
    from mmpretrain.runtime.allocator import keep_freed_memory

    keep_freed_memory()  # no page faults per training step on the CPU (see mmpretrain/runtime/allocator.py)
    quiet_third_party_noise()
    if command == "data" and rest and "=" not in rest[0] and not rest[0].startswith("-"):
        rest[0] = f"name={rest[0]}"  # `mmpretrain data digits out=DIR`
    run_hydra(fn, config_name, rest, returns_metric=command == "train")
    return 0


def console(argv: list[str] | None = None) -> NoReturn:
    """The ``mmpretrain`` console script: :func:`main`'s exit code becomes the process's."""
    sys.exit(main(argv))


# -- Hydra ------------------------------------------------------------------------------------
def run_hydra(fn: Callable, config_name: str, overrides: list[str], returns_metric: bool = False) -> None:
    """Run ``fn`` as a Hydra app on ``overrides`` (``-m``, ``--help``, ``--cfg`` and sweepers included).

    This is what ``@hydra.main`` does, but ``hydra.main`` parses ``sys.argv[1:]``, which here starts
    with the command word (``train``), and no public Hydra API takes the arguments instead: so this
    calls the function ``hydra.main`` itself calls (``hydra._internal.utils._run_hydra``; Hydra 1.3).
    ``sys.argv`` stays as the user typed it, which is what Lightning's DDP launcher, torchrun and
    SLURM re-execute for the other ranks. tests/unit/test_cli.py fails when Hydra changes this API.
    """
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    version.setbase("1.3")
    parser = get_args_parser()
    args = parser.parse_args(overrides)
    _run_hydra(
        args=args,
        args_parser=parser,
        task_function=_task(fn, returns_metric),
        config_path=CONF_DIR,
        config_name=config_name,
    )


def _task(fn: Callable, returns_metric: bool) -> Callable[[DictConfig], Any]:
    """The task function Hydra runs (once, or per job of a sweep): ``fn``, and for ``train`` the
    metric a sweeper optimises."""

    def task(cfg: DictConfig):
        scored = _name_sweep_run(cfg)
        result = fn(cfg)
        if not returns_metric:
            return None
        value = result.get(cfg.get("optimized_metric"))
        if value is None and scored:
            raise ValueError(
                f"this run logged no '{cfg.optimized_metric}' (the sweep's optimized_metric), so the "
                f"sweeper cannot score it; logged: {sorted(result)}. Make validation run before training "
                "ends (e.g. trainer.val_check_interval=N with N <= trainer.max_steps) or set "
                "optimized_metric=KEY."
            )
        return value

    return task


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
        wandb_cfg.name = (
            wandb_cfg.get("name") or f"{hc.job.num}: {' '.join(own) or hc.job.override_dirname}"[:128]
        )
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


if __name__ == "__main__":
    console()
