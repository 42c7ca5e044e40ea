"""A command's run: its directory (the resolved config written, the path printed at start and end),
which checkpoint a resume starts from, and the bundled data built on first use.

No Lightning and no Hydra: configs are read as mappings.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmpretrain.io import is_sharded_checkpoint, write_text_atomic


def start_run(cfg: DictConfig) -> Path:
    """Create the run directory (``paths.output_dir``), write ``config.yaml`` (resolved) and print it."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    print(f"run directory: {run_dir}", flush=True)
    return run_dir


def end_run(run_dir: Path) -> None:
    print(f"run directory: {run_dir}", flush=True)


# -- resume ----------------------------------------------------------------------------------------
def is_complete_checkpoint(path: str | Path) -> bool:
    """A torch zip checkpoint whose central directory (written last) is readable, or a complete
    distributed checkpoint directory (``trainer=fsdp``, published only once every rank wrote)."""
    if Path(path).is_dir():
        return is_sharded_checkpoint(path)
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith("data.pkl") for name in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def newest_complete_checkpoint(directory: str | Path) -> Path | None:
    """The most recently written complete ``*.ckpt`` in ``directory`` (temporary files ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [
        p for p in directory.glob("*.ckpt") if not p.name.startswith(".")
    ]  # files, or trainer=fsdp directories
    for path in sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True):
        if is_complete_checkpoint(path):
            return path
    return None


def resume_path(cfg: Any, run_dir: Path) -> str | None:
    """``resume=auto`` (or ``ckpt_path=auto``): the newest complete checkpoint of the run, if any; a path
    as given (it must exist); None for a fresh start."""
    choice = cfg.get("resume") or cfg.get("ckpt_path")
    if choice == "auto":
        found = newest_complete_checkpoint(run_dir / "checkpoints")
        print(
            f"resume=auto: {'resuming from ' + str(found) if found else 'no checkpoint yet, starting fresh'}"
        )
        return str(found) if found else None
    if choice and not Path(choice).exists():
        raise FileNotFoundError(
            f"resume checkpoint {choice} does not exist (resume=auto picks the newest of the run)"
        )
    return choice


# -- bundled data, built on first use --------------------------------------------------------------
def ensure_data(data_cfg: Any) -> None:
    """Build the bundled dataset(s) named by ``data.build`` when missing: a name (built into
    ``data.root``) or a mapping ``{name: root}`` (a data config mixing several bundled sets)."""
    wanted = data_cfg.get("build")
    if not wanted:
        return
    from mmpretrain.data.builders import build, is_built

    pairs = wanted.items() if hasattr(wanted, "items") else [(wanted, data_cfg.root)]
    for name, root in pairs:
        if not is_built(root, name):
            print(f"building bundled '{name}' data in {root}")
            build(name, root)
