"""Our export (safetensors + config.json + preprocess.json + a model card), ``load_pretrained``,
and checkpoint -> model for every source ``eval ckpt=`` / ``finetune pretrained=`` / ``export ckpt=``
accept, with a clear message when a checkpoint does not fit the configured model.

Reading files safely is :mod:`mmpretrain.io`; open_clip's layouts and TorchScript are
:mod:`mmpretrain.interop`. Neither Lightning nor Hydra is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmpretrain import storage
from mmpretrain.interop.open_clip import (
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    from_open_clip_state_dict,
    open_clip_model_config,
    preprocess_cfg,
    read_open_clip_state_dict,
)
from mmpretrain.io import (
    atomic_write,
    is_sharded_checkpoint,
    read_checkpoint,
    sharded_checkpoint_shapes,
    write_text_atomic,
)
from mmpretrain.model import ContrastiveModel, build_model, weights_free

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESS_NAME = "preprocess.json"
FORMAT_VERSION = 1


def model_from_checkpoint(
    path: str | Path, model_cfg: dict[str, Any] | None = None, weights: str = "ema"
) -> ContrastiveModel:
    """Rebuild a ContrastiveModel from an mmpretrain ``.ckpt``, an exported directory (mmpretrain or
    open_clip layout), or an open_clip checkpoint (``.pt``/``.safetensors``; needs ``model_cfg``, a
    ``model=openclip`` config naming the open_clip model-config JSON). The weights come from ``path``
    alone: no starting-weights source the model was trained from is read (:func:`weights_free`). A store
    URL (``s3://...``) is downloaded first (:func:`mmpretrain.storage.local_copy`).
    ``weights``: ``ema`` takes a training checkpoint's weight average (``ema_state_dict``, model.ema)
    where it holds one, ``raw`` always its trained weights."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be ema or raw, got '{weights}'")
    path = Path(storage.local_copy(path))
    export_dir = path.is_dir() and not is_sharded_checkpoint(path)  # a trainer=fsdp checkpoint is read below
    if export_dir:
        if not (path / CONFIG_NAME).exists() and (path / OPEN_CLIP_CONFIG).exists():
            oc = json.loads((path / OPEN_CLIP_CONFIG).read_text())
            return model_from_open_clip_checkpoint(
                path / OPEN_CLIP_WEIGHTS, open_clip_model_config(oc["model_cfg"])
            )
        return load_pretrained(path)
    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters") or {}
    if "model" not in hp:
        if model_cfg:
            return model_from_open_clip_checkpoint(path, model_cfg)
        raise ValueError(
            f"{path} has no model config in hyper_parameters, so it is not an mmpretrain training "
            "checkpoint. For an open_clip checkpoint also give its model config: model=openclip "
            "model.config=PATH.json"
        )
    model = build_model(weights_free(hp["model"]))
    if weights == "ema" and ckpt.get(EMA_KEY) is not None:
        state = dict(ckpt[EMA_KEY])
    else:
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    load_into(model, state, str(path), trained_with=hp["model"])
    return model


#: Where a training checkpoint holds the weight average of model.ema (the ContrastiveModel's keys).
EMA_KEY = "ema_state_dict"


class CheckpointMismatchError(ValueError):
    pass


def load_into(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    trained_with: dict[str, Any] | None = None,
) -> None:
    """``load_state_dict`` that, on any key or shape mismatch, says what differs and what to do."""
    error = mismatch_error(model.state_dict(), state, source, trained_with)
    if error is not None:
        raise error
    model.load_state_dict(state, strict=True)


def check_checkpoint_matches(model: torch.nn.Module, path: str | Path) -> None:
    """Before resuming from a Lightning checkpoint: its ``model.*`` tensors must fit ``model``."""
    if is_sharded_checkpoint(path):  # trainer=fsdp: the shapes from its metadata, no shard is read
        weights, ckpt = sharded_checkpoint_shapes(path)
        ckpt = {**ckpt, "state_dict": weights}
    else:
        ckpt = read_checkpoint(path)
    state = {
        k.removeprefix("model."): v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("model.")
    }
    error = mismatch_error(
        model.state_dict(), state, str(path), (ckpt.get("hyper_parameters") or {}).get("model")
    )
    if error is not None:
        raise error


def mismatch_error(
    expected: dict[str, torch.Tensor],
    found: dict[str, torch.Tensor],
    source: str,
    trained_with: dict[str, Any] | None = None,
) -> CheckpointMismatchError | None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in found and found[k].shape != expected[k].shape
    ]
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
        if isinstance(tower.get("frame"), dict):  # a video tower: its pooling over a frame tower
            frame = tower["frame"]
            over = frame.get("model_name") or "open_clip ViT"
            arch = f"{tower.get('pooling')} x{tower.get('num_frames')} over {over}"
        elif arch is None and isinstance(tower.get("config"), dict):
            part = tower["config"].get("vision_cfg" if modality == "image" else "text_cfg") or {}
            arch = ", ".join(f"{k}={part[k]}" for k in ("width", "layers", "patch_size") if k in part)
        elif arch is None:
            arch = tower.get("config")
        towers.append(f"{modality}: {kind}({arch})")
    return f"model config embed_dim={cfg.get('embed_dim')}, towers {{{'; '.join(towers)}}}"


def export(model: ContrastiveModel, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json``; loadable by :func:`load_pretrained`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    config = {"format_version": FORMAT_VERSION, "model": model.config(), **(extra or {})}
    write_text_atomic(out / CONFIG_NAME, json.dumps(config, indent=2, default=str))
    settings = json.dumps(preprocess_settings(model), indent=2, default=str)
    write_text_atomic(out / PREPROCESS_NAME, settings)
    card = model_card(model, extra or {})
    write_text_atomic(out / "README.md", card)
    return out


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> ContrastiveModel:
    """Load an exported directory: a ContrastiveModel in eval mode with ``encode_*`` /
    ``encode(modality, x)``, ``transforms`` (``{modality: callable}``, eval mode) and ``tokenizer``
    (one caption -> token ids; None without a text tower)."""
    path = Path(path)
    if not (path / CONFIG_NAME).exists():
        hint = (
            " (it is in open_clip's layout: load it with open_clip 'local-dir:')"
            if (path / OPEN_CLIP_CONFIG).exists()
            else ""
        )
        raise FileNotFoundError(
            f"{path} is not an exported mmpretrain model (no {CONFIG_NAME}){hint}; run `mmpretrain export`"
        )
    config = json.loads((path / CONFIG_NAME).read_text())
    model = build_model(weights_free(config["model"]))
    load_into(model, load_file(str(path / WEIGHTS_NAME)), str(path))
    model = model.to(device).eval()
    model.transforms = model.preprocess(train=False)
    model.tokenizer = model.transforms.get("text")
    return model


def model_from_open_clip_checkpoint(path: str | Path, model_cfg: dict[str, Any]) -> ContrastiveModel:
    """An open_clip checkpoint in any layout (``.pt`` from open_clip's trainer, ``.safetensors``;
    CLIP or CustomTextCLIP keys) as a ContrastiveModel with open_clip towers built from
    ``model_cfg`` (a ``model=openclip`` config). A checkpoint with a ``logit_bias`` (SigLIP) gets one
    in the model even if the config does not ask for it: the checkpoint says how it was trained."""
    state = from_open_clip_state_dict(read_open_clip_state_dict(path))
    if "logit_bias" in state and model_cfg.get("init_logit_bias") is None:
        model_cfg = {**model_cfg, "init_logit_bias": 0.0}  # the value comes from the checkpoint
    model = build_model(weights_free(model_cfg))
    load_into(model, state, str(path))
    return model


# -- what an export says about itself ------------------------------------------------------------
def preprocess_settings(model: ContrastiveModel) -> dict[str, Any]:
    """Per-modality preprocessing (image transform settings, tokenizer) as plain JSON."""
    from mmpretrain.towers.open_clip import OpenClipTower, build_tokenizer

    out: dict[str, Any] = {}
    for m, t in model.towers.items():
        if isinstance(t, OpenClipTower) and m == "text":
            tok = build_tokenizer(t.model_cfg)
            out[m] = {
                "tokenizer": type(tok).__name__,
                "context_length": tok.context_length,
                "library": "open_clip",
            }
        elif isinstance(t, OpenClipTower):
            out[m] = {"library": "open_clip", **preprocess_cfg(t.model_cfg)}
        elif hasattr(t, "data_config"):
            out[m] = {"library": "timm", **{k: v for k, v in t.data_config.items()}}
    return out


def model_card(model: ContrastiveModel, extra: dict[str, Any]) -> str:
    """A short README.md: what the model is, how it was trained, on what, and how well it did."""
    towers = "\n".join(
        f"| {m} | `{t.config.get('_target_', type(t).__name__).rsplit('.', 1)[-1]}` | "
        f"{_summary(t)} | {t.output_dim} |"
        for m, t in model.towers.items()
    )
    train_cfg = extra.get("train_config") or {}
    data = train_cfg.get("data") or {}
    sources = (
        ", ".join(f"`{s.get('shards')}`" for s in (data.get("sources") or {}).values() if s) or "not recorded"
    )
    metrics = extra.get("metrics") or {}
    metric_lines = "\n".join(
        f"| {k} | {v:.4f} |"
        for k, v in sorted(metrics.items())
        if isinstance(v, (int, float)) and k.startswith("val/")
    )
    loss = (train_cfg.get("loss") or {}).get("_target_", "not recorded")
    optim = train_cfg.get("optim") or {}
    trainer = train_cfg.get("trainer") or {}
    schedule = ", ".join(f"{k} {trainer.get(k, '?')}" for k in ("max_epochs", "max_steps", "precision"))
    return f"""# mmpretrain contrastive model

Modalities: {", ".join(model.modalities)} · shared embedding dim {model.embed_dim} · L2-normalised embeddings.

| modality | tower | architecture | tower output dim |
| --- | --- | --- | --- |
{towers}

## Use

```python
import mmpretrain
model = mmpretrain.load_pretrained("THIS_DIR")
x = model.transforms["image"](pil_image)[None]          # or model.tokenizer("a caption")[None]
emb = model.encode("image", x)
```

{_caption_usage(model)}Files: `model.safetensors` (weights), `config.json` (model config + provenance),
`preprocess.json` (transforms and tokenizer settings). Loading never unpickles.

## Training

- source: {extra.get("source_checkpoint", "end of training run")}
- objective: `{loss}` · optimiser lr {optim.get("lr", "?")}, weight decay {optim.get("weight_decay", "?")}
- trainer: {schedule}
- data: {sources}; val `{(data.get("val") or {}).get("shards", "not recorded")}`

## Metrics (validation, end of training)

| metric | value |
| --- | --- |
{metric_lines or "| not recorded | |"}
"""


def _caption_usage(model: ContrastiveModel) -> str:
    """The model card's captioning lines, for a model with a caption decoder."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return ""
    kind = type(decoder).__name__
    return f"""It also captions (`{kind}`, reading the {decoder.source} tower's tokens):

```python
captions = model.caption(x, strategy="greedy")   # or "beam" (num_beams=), "top_p" (top_p=, temperature=)
```

or `mmpretrain caption ckpt=THIS_DIR in=FOLDER_OR_SHARDS out=captions.jsonl`.

"""


def _summary(tower) -> str:
    frame = getattr(tower, "frame", None)  # a video tower: temporal pooling over an image tower
    if frame is not None:
        return (
            f"{tower.config['pooling']} pooling over {tower.config['num_frames']} frames of {_summary(frame)}"
        )
    return tower.config.get("model_name") or _oc_summary(tower)


def _oc_summary(tower) -> str:
    cfg = getattr(tower, "model_cfg", {})
    part = cfg.get("vision_cfg" if tower.modality == "image" else "text_cfg", {})
    return f"open_clip {tower.modality}: layers {part.get('layers')}, width {part.get('width')}"


def run_provenance(ckpt: str | Path) -> dict[str, Any]:
    """Training config and final metrics of the run a checkpoint came from (``<run>/checkpoints/x.ckpt``)."""
    ckpt = Path(ckpt)
    out: dict[str, Any] = {}
    for run in (ckpt.parent.parent, ckpt.parent):
        if (run / "metrics.json").exists() and "metrics" not in out:
            out["metrics"] = json.loads((run / "metrics.json").read_text())
        if (run / "config.yaml").exists() and "train_config" not in out:
            import yaml

            out["train_config"] = yaml.safe_load((run / "config.yaml").read_text())
    if ckpt.is_dir() and (ckpt / CONFIG_NAME).exists():
        prev = json.loads((ckpt / CONFIG_NAME).read_text())
        out |= {k: prev[k] for k in ("metrics", "train_config") if k in prev}
    return out
