"""A command's run: its directory (the resolved config written, the path printed at start and end),
which checkpoint a resume starts from, and the bundled data built on first use.

No Lightning and no Hydra: configs are read as mappings.
"""

from __future__ import annotations

import os
import shlex
import shutil
import zipfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmpretrain import storage
from mmpretrain.io import is_sharded_checkpoint, write_text_atomic


def start_run(cfg: DictConfig) -> Path:
    """Create the run directory (``paths.output_dir``), write ``config.yaml`` (resolved) and print it."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if launched_as_global_zero():  # under DDP every rank starts here: the path is printed once
        print(f"run directory: {run_dir}", flush=True)
    return run_dir


def launched_as_global_zero(env: Any = None) -> bool:
    """Whether this process is the run's global rank 0, judged before the process group exists from
    what the launchers set: Lightning's DDP launcher (``LOCAL_RANK``/``NODE_RANK`` for the ranks it
    starts), torchrun (``RANK``) and SLURM (``SLURM_PROCID``)."""
    env = os.environ if env is None else env
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(str(env.get(k) or "0").strip() == "0" for k in ranks)


def end_run(run_dir: Path, mirror: RemoteRun | None = None) -> None:
    """Print the run directory; with ``paths.remote``, upload what changed and wait for every upload."""
    if mirror is not None:
        mirror.close()
    if launched_as_global_zero():
        print(f"run directory: {run_dir}", flush=True)


# -- paths.remote: the run mirrored to object storage ----------------------------------------------
class RemoteRun:
    """The run directory mirrored to ``paths.remote`` (``s3://bucket/runs/NAME``, any fsspec URL) by a
    background :class:`~mmpretrain.storage.Uploader`: each checkpoint as it is published (and removed
    when the run removes it), and with it every other file of the run that changed since the last
    upload (``config.yaml``, ``metrics.csv``, plots, at the end ``metrics.json`` and the export).
    Hidden files, ``checkpoints/`` (uploaded one by one) and ``wandb/`` are left out."""

    SKIP = ("checkpoints", "wandb")

    def __init__(self, remote: str, run_dir: Path, queue_size: int = 4):
        self.remote, self.run_dir = remote.rstrip("/"), Path(run_dir)
        self.uploader = storage.Uploader(self.remote, self.run_dir / ".upload-staging", queue_size)
        self.sent: dict[str, tuple[int, int]] = {}  # relative path -> (mtime_ns, size) last queued
        print(f"paths.remote: uploading checkpoints and run files to {self.remote}", flush=True)

    def checkpoint_saved(self, path: str | Path) -> None:
        path = Path(path)
        self.uploader.upload(path, f"checkpoints/{path.name}", link=True)
        self.sync()

    def checkpoint_removed(self, path: str | Path) -> None:
        self.uploader.delete(f"checkpoints/{Path(path).name}")

    def sync(self) -> None:
        """Queue every file of the run that changed since it was last queued."""
        for path in sorted(self.run_dir.rglob("*")):
            rel = path.relative_to(self.run_dir)
            if rel.parts[0] in self.SKIP or any(p.startswith(".") for p in rel.parts) or not path.is_file():
                continue
            stat = path.stat()
            key = (stat.st_mtime_ns, stat.st_size)
            if self.sent.get(rel.as_posix()) != key:
                self.sent[rel.as_posix()] = key
                self.uploader.upload(path, rel.as_posix())

    def close(self) -> None:
        self.sync()
        self.uploader.close()


def remote_run(cfg: Any, run_dir: Path) -> RemoteRun | None:
    """The run's :class:`RemoteRun` when ``paths.remote`` is set (on rank 0 only: one uploader a run)."""
    remote = (cfg.get("paths") or {}).get("remote")
    if not remote:
        return None
    if not storage.is_remote(str(remote)):
        raise ValueError(
            f"paths.remote must be a store URL (s3://bucket/runs/NAME, gs://..., any fsspec URL), "
            f"not '{remote}'"
        )
    return RemoteRun(str(remote), run_dir) if launched_as_global_zero() else None


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


#: What a run's divergence guard writes when it stops: the weights at the divergence, never resumed
#: from unless named (resume=PATH), since training would restart exactly where it diverged.
NONFINITE_STOP = "nonfinite-stop.ckpt"


def newest_complete_checkpoint(directory: str | Path) -> Path | None:
    """The most recently written complete ``*.ckpt`` in ``directory`` (files, or ``trainer=fsdp``
    directories): temporary files ignored, the divergence guard's :data:`NONFINITE_STOP` skipped, and a
    sharded checkpoint caught between the two renames of its publication (only ``.<name>.old`` there,
    see :mod:`mmpretrain.runtime.fsdp`) counted."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [p for p in directory.glob("*.ckpt") if not p.name.startswith(".") and p.name != NONFINITE_STOP]
    found += [p for p in directory.glob(".*.ckpt.old") if not (directory / p.name[1:-4]).exists()]
    for path in sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True):
        if is_complete_checkpoint(path):
            return path
    return None


def remove_interrupted_writes(directory: str | Path) -> list[Path]:
    """Remove what interrupted checkpoint writes left in ``directory``: hidden ``*.tmp*`` files and
    directories (a sharded checkpoint's ``.<name>.old`` is left: without ``<name>`` it is the complete
    one). The paths removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.glob(".*"):
        if ".tmp" not in path.name:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def checkpoint_step(path: str | Path) -> int:
    """The optimizer steps a checkpoint was saved after (``global_step``), read without its tensors."""
    import torch

    path = Path(path)
    meta = path / "meta.pt" if path.is_dir() else path
    return int(torch.load(meta, map_location="cpu", weights_only=True, mmap=not path.is_dir())["global_step"])


def newest_remote_checkpoint(remote: str) -> str | None:
    """The newest complete checkpoint under ``<remote>/checkpoints`` (one listing; a sharded checkpoint's
    folder counts once its :data:`~mmpretrain.storage.COMPLETE` marker is there): hidden keys (uploads
    in progress) and :data:`NONFINITE_STOP` are never taken; ``last.ckpt`` wins a tie of times."""
    folder = storage.join(remote, "checkpoints")
    found = []
    for name, details in storage.listing(folder).items():
        if name.startswith(".") or not name.endswith(".ckpt") or name == NONFINITE_STOP:
            continue
        if details.get("type") == "directory":
            marker = storage.listing(storage.join(folder, name)).get(storage.COMPLETE)
            if marker is None:
                continue
            details = marker
        found.append((storage.modified(details), name == "last.ckpt", name))
    return storage.join(folder, max(found)[2]) if found else None


def _from_remote(cfg: Any, run_dir: Path) -> str | None:
    """``resume=auto`` on a node without the run's checkpoints: the newest one of ``paths.remote``,
    downloaded into the run directory (with ``metrics.csv``, so the run's log continues)."""
    remote = (cfg.get("paths") or {}).get("remote")
    if not remote:
        return None
    found = newest_remote_checkpoint(str(remote))
    if found is None:
        return None
    local = storage.download(found, run_dir / "checkpoints" / found.rsplit("/", 1)[1])
    if not (run_dir / "metrics.csv").exists():
        data = storage.read_bytes(storage.join(str(remote), "metrics.csv"))
        if data is not None:
            write_text_atomic(run_dir / "metrics.csv", data.decode())
    print(f"resume=auto: downloaded {found}")
    return str(local)


def resume_path(cfg: Any, run_dir: Path) -> str | None:
    """``resume=auto`` (or ``ckpt_path=auto``): the newest complete checkpoint of the run, if any (with
    ``paths.remote``, the newest in the store when the run directory has none); a path as given (it
    must exist; a store URL is downloaded); None for a fresh start."""
    choice = cfg.get("resume") or cfg.get("ckpt_path")
    removed = remove_interrupted_writes(run_dir / "checkpoints")
    if removed:
        where = run_dir / "checkpoints"
        print(f"removed {len(removed)} temporary file(s) of interrupted checkpoint writes in {where}")
    if choice == "auto":
        found = newest_complete_checkpoint(run_dir / "checkpoints") or _from_remote(cfg, run_dir)
        print(
            f"resume=auto: {'resuming from ' + str(found) if found else 'no checkpoint yet, starting fresh'}"
        )
        return str(found) if found else None
    if choice and storage.is_remote(str(choice)):
        return storage.local_copy(str(choice))
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
        if storage.is_remote(str(root)):
            continue  # a store holds what was uploaded there (`mmpretrain data NAME out=s3://...`)
        if not is_built(root, name):
            print(f"building bundled '{name}' data in {root}")
            build(name, root)


# -- what a run says at its end --------------------------------------------------------------------
def summary(
    metrics: dict[str, float],
    run_dir: Path,
    *,
    data_args: list[str],
    model: Path | None = None,
    train_args: list[str] | tuple[str, ...] = (),
    suggest_eval: bool = True,
    sweep_beside: Path | None = None,
) -> str:
    """The lines a command prints when it ends, read in five seconds: the zero-shot and retrieval
    figures, where the run's files are, and the next commands to try.

    ``data_args`` are the overrides that pick the run's data (repeated in the eval and finetune
    commands); ``model`` is what those commands take (the export, else a checkpoint); ``train_args``
    the run's other training overrides (repeated in the sweep command); ``suggest_eval``: whether
    ``mmpretrain eval`` is one of the next commands; the sweep goes to ``<sweep_beside>-lr-sweep``
    (default: beside ``run_dir``). Retrieval shows class recall
    where most val captions repeat (``val/caption_repeat_frac``), instance recall otherwise."""
    from mmpretrain.evaluation.retrieval import CAPTIONS_REPEAT

    rows: list[tuple[str, str]] = []
    zeroshot = {k.split("zeroshot_top1/", 1)[1]: v for k, v in metrics.items() if "/zeroshot_top1/" in k}
    if zeroshot:
        rows.append(("zero-shot top-1", "  ".join(f"{k} {v:.3f}" for k, v in sorted(zeroshot.items()))))
    repeat = metrics.get("val/caption_repeat_frac")
    # class recall needs class labels: repeated captions without them (no cls) show instance recall
    by_class = (
        repeat is not None
        and repeat > CAPTIONS_REPEAT
        and any(k.startswith("val/retrieval_class_R@1/") for k in metrics)
    )
    prefix = "val/retrieval_class_R@1/" if by_class else "val/retrieval_R@1/"
    recall = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
    if recall:
        what = f"class R@1 ({repeat:.0%} of val captions repeat)" if by_class else "R@1"
        pairs = "  ".join(f"{k.replace('_to_', '→')} {v:.3f}" for k, v in sorted(recall.items()))
        rows.append((f"retrieval {what}", pairs))
    for name in ("plots", "checkpoints", "export"):
        where = run_dir / name
        files = (
            sorted(p.name for p in where.iterdir() if not p.name.startswith(".")) if where.is_dir() else []
        )
        if not files:
            continue
        if name == "plots":
            first = [f for f in ("loss.png", "zeroshot.png", "retrieval.png") if f in files] or files[:3]
            note = ", ".join(first) + (
                f" and {len(files) - len(first)} more" if len(files) > len(first) else ""
            )
        elif name == "export":
            note = f'mmpretrain.load_pretrained("{_shown(where)}")'
        else:
            note = ", ".join(files)
        rows.append((name, f"{_shown(where)}/  ({note})"))
    for name in ("metrics.json", "eval_metrics.json"):
        if (run_dir / name).is_file():
            rows.append(("metrics", _shown(run_dir / name)))
    next_commands = []
    data_args, train_args = _last_of_each(data_args), _last_of_each(train_args)
    if model is not None:  # the commands as a shell takes them: an override with a space is quoted
        shown, data = shlex.quote(_shown(model)), " ".join(map(shlex.quote, data_args))
        if suggest_eval:
            next_commands.append(f"mmpretrain eval ckpt={shown} {data}".rstrip())
        next_commands.append(f"mmpretrain finetune task=linear_probe pretrained={shown} {data}".rstrip())
    beside = sweep_beside or run_dir
    sweep_dir = shlex.quote(_shown(beside.parent / f"{beside.name}-lr-sweep"))
    swept = [shlex.quote(a) for a in train_args if not a.startswith("optim.lr=")]
    next_commands += [
        " ".join(["mmpretrain train -m", *swept, f"optim.lr=1e-3,3e-3 hydra.sweep.dir={sweep_dir}"]),
        f"mmpretrain sweep-summary {sweep_dir}",
    ]
    width = max(len(label) for label, _ in rows) if rows else 0
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines += ["next:"] + [f"  {c}" for c in next_commands]
    return "\n".join(lines)


def _last_of_each(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The overrides with each key once, where it was given last (Hydra takes the last of repeats)."""
    seen, kept = set(), []
    for o in reversed(overrides):
        key = o.split("=", 1)[0].lstrip("+~")
        if key not in seen:
            seen.add(key)
            kept.append(o)
    return kept[::-1]


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when below it (``runs/demo/export``), else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
