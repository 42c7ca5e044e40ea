"""Checkpoints in and out: safe reading, export to safetensors + config.json, ``load_pretrained``.

Nothing here unpickles untrusted content: torch files are read with ``weights_only=True`` and
exports are safetensors + JSON. Neither Lightning nor Hydra is imported.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmpretrain.model import ContrastiveModel, build_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


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


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file as a dict (``.safetensors`` gives ``{"state_dict": ...}``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return {"state_dict": load_file(str(path))}
    obj = torch_load_safe(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state_dict")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    obj = read_checkpoint(path)
    state = obj.get("state_dict", obj.get("model", obj))
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(state: dict[str, torch.Tensor], prefixes=("module.", "_orig_mod.")) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for p in prefixes:
            while k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def model_from_checkpoint(path: str | Path) -> ContrastiveModel:
    """Rebuild a ContrastiveModel from an mmpretrain ``.ckpt`` or an exported directory."""
    path = Path(path)
    if path.is_dir():
        return load_pretrained(path)
    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters") or {}
    if "model" not in hp:
        raise ValueError(f"{path} has no model config in hyper_parameters; is it an mmpretrain training checkpoint?")
    model = build_model(hp["model"])
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    load_into(model, state, str(path), trained_with=hp["model"])
    return model


class CheckpointMismatchError(ValueError):
    pass


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
              trained_with: dict[str, Any] | None = None) -> None:
    """``load_state_dict`` that, on any key or shape mismatch, says what differs and what to do."""
    error = mismatch_error(model.state_dict(), state, source, trained_with)
    if error is not None:
        raise error
    model.load_state_dict(state, strict=True)


def check_checkpoint_matches(model: torch.nn.Module, path: str | Path) -> None:
    """Before resuming from a Lightning checkpoint: its ``model.*`` tensors must fit ``model``."""
    ckpt = read_checkpoint(path)
    state = {k.removeprefix("model."): v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("model.")}
    error = mismatch_error(model.state_dict(), state, str(path), (ckpt.get("hyper_parameters") or {}).get("model"))
    if error is not None:
        raise error


def mismatch_error(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str,
                   trained_with: dict[str, Any] | None = None) -> CheckpointMismatchError | None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in found and found[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return None
    origin = f" It was trained with {describe_model_config(trained_with)}." if trained_with else ""
    return CheckpointMismatchError(
        f"{source} was saved from another model config than the one configured now: "
        f"{len(missing)} tensors of the model are missing from it{_some(missing)}, "
        f"{len(unexpected)} of its tensors are not in the model{_some(unexpected)}, "
        f"{len(shapes)} have another shape{_some(shapes)}.{origin} "
        f"Fix: use the model config it was trained with (the run's config.yaml; e.g. the same model= and "
        f"model.* overrides), or, to start another architecture from its weights, give the towers "
        f"pretrained_path= (or fine-tune from an export) instead of resuming with ckpt_path=."
    )


def _some(keys: list[str], n: int = 3) -> str:
    return f" (e.g. {', '.join(keys[:n])}{', ...' if len(keys) > n else ''})" if keys else ""


def describe_model_config(cfg: dict[str, Any]) -> str:
    """One line naming a model config: embed_dim and each tower's class and architecture."""
    towers = []
    for modality, tower in (cfg.get("towers") or {}).items():
        kind = str(tower.get("_target_", "?")).rsplit(".", 1)[-1]
        arch = tower.get("model_name")
        if arch is None and isinstance(tower.get("config"), dict):
            part = tower["config"].get("vision_cfg" if modality == "image" else "text_cfg") or {}
            arch = ", ".join(f"{k}={part[k]}" for k in ("width", "layers", "patch_size") if k in part)
        elif arch is None:
            arch = tower.get("config")
        towers.append(f"{modality}: {kind}({arch})")
    return f"model config embed_dim={cfg.get('embed_dim')}, towers {{{'; '.join(towers)}}}"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export(model: ContrastiveModel, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json``; loadable by :func:`load_pretrained`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    config = {"format_version": FORMAT_VERSION, "model": model.config(), **(extra or {})}
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2, default=str)))
    return out


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> ContrastiveModel:
    """Load an exported directory: a ContrastiveModel in eval mode with ``encode_*`` and
    ``preprocess(train=False)`` (image transforms, tokenizer) ready to use."""
    path = Path(path)
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path} is not an exported mmpretrain model (no {CONFIG_NAME}); run `mmpretrain export`")
    config = json.loads((path / CONFIG_NAME).read_text())
    model = build_model(config["model"])
    load_into(model, load_file(str(path / WEIGHTS_NAME)), str(path))
    return model.to(device).eval()
