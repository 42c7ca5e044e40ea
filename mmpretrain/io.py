"""Files: checkpoints and weights read as plain dicts of tensors (never unpickled: torch files with
``weights_only=True``, ``.safetensors`` with safetensors), and the one atomic writer every file we
write goes through.

The bottom of the package: imports nothing of mmpretrain.
"""

from __future__ import annotations

import os
import pickle
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


class UnsafeCheckpointError(ValueError):
    pass


def torch_load_safe(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with a clear error for pickles that need more."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds Python objects that only an unsafe unpickle could build "
            f"({str(e).splitlines()[0]}). mmpretrain reads checkpoints with torch.load(weights_only=True); "
            f"re-save it as a plain state_dict or safetensors from a trusted environment."
        ) from None


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A complete distributed checkpoint directory (``trainer=fsdp``): torch.distributed.checkpoint's
    ``.metadata`` (written after every rank's shards) and Lightning's ``meta.pt``."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def read_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """A distributed checkpoint directory as one checkpoint dict, in this process alone (any number
    of processes may have written it): Lightning's ``meta.pt`` (loops, callbacks, hyper-parameters)
    plus ``state_dict`` and the other sharded entries (``ema_state_dict``), every tensor whole, assembled
    from the shards by torch.distributed.checkpoint. The optimizer state is left on disk."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    reader = dcp.FileSystemReader(str(path))
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for k, m in reader.read_metadata().state_dict_metadata.items():
        entry, _, name = k.partition(".")  # "state_dict.model.towers...": the entry, then the tensor's key
        if not entry.startswith("optimizer_") and isinstance(m, TensorStorageMetadata):
            loaded.setdefault(entry, {})[name] = torch.empty(m.size, dtype=m.properties.dtype)
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is what we want
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(loaded, storage_reader=reader, no_dist=True)
    meta = torch_load_safe(path / "meta.pt")
    return {**meta, **loaded}


def sharded_checkpoint_shapes(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights of a distributed checkpoint directory as shape-only (``meta``) tensors, and its
    ``meta.pt``: enough to check it fits a model without reading a shard."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    shapes = {
        k.removeprefix("state_dict."): torch.empty(m.size, device="meta")
        for k, m in metadata.items()
        if k.startswith("state_dict.") and isinstance(m, TensorStorageMetadata)
    }
    return shapes, torch_load_safe(Path(path) / "meta.pt")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file as a dict (``.safetensors`` gives ``{"state_dict": ...}``; a distributed
    checkpoint directory its whole weights and metadata, see :func:`read_sharded_checkpoint`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if is_sharded_checkpoint(path):
            return read_sharded_checkpoint(path)
        raise ValueError(
            f"{path} is a directory but not a complete distributed checkpoint (no .metadata and "
            f"meta.pt: interrupted while saving?); use another checkpoint of the run"
        )
    if path.suffix == ".safetensors":
        return {"state_dict": load_file(str(path))}
    obj = torch_load_safe(path)
    if not isinstance(obj, dict):
        # the file's content is wrong, not the type of the argument: a ValueError
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state_dict")  # noqa: TRY004
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: its ``state_dict`` (Lightning, open_clip's trainer), ``model``, or
    itself."""
    obj = read_checkpoint(path)
    state = obj.get("state_dict", obj.get("model", obj))
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(
    state: dict[str, torch.Tensor], prefixes=("module.", "_orig_mod.")
) -> dict[str, torch.Tensor]:
    """Keys without the wrappers' prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``)."""
    out = {}
    for k, v in state.items():
        for p in prefixes:
            while k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def atomic_write(path: str | Path, write: Callable[[str], Any], durable: bool = False) -> Any:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: a reader sees the
    old file or the whole new one, never part of one. Returns what ``write`` returned.

    The temporary name is hidden and unique to this process and call (``.<name>.<pid>-<random>.tmp``),
    so concurrent writers never share one, and it is removed when ``write`` fails. ``durable``: the
    data is fsynced before the rename and the directory after it, so the rename survives a power loss
    (checkpoints). The file gets the usual permissions (the process's umask), as ``open`` gives.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        result = write(str(tmp))
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if durable:
        fsync_dir(path.parent)
    return result


def write_text_atomic(path: str | Path, text: str) -> None:
    """``path`` holds ``text`` (UTF-8), written with :func:`atomic_write`."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (where the OS allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
