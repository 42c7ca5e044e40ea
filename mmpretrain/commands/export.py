"""``mmpretrain export ckpt=PATH out=DIR format=mmpretrain|open_clip|torchscript``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from mmpretrain.config import to_plain


def export_cmd(cfg: DictConfig) -> Path:
    """Write ``cfg.ckpt``'s model to ``cfg.out`` in ``cfg.format``; the directory written."""
    from mmpretrain.export import export, model_from_checkpoint, run_provenance
    from mmpretrain.interop.open_clip import export_open_clip
    from mmpretrain.interop.torchscript import export_torchscript

    writers = {"mmpretrain": None, "open_clip": export_open_clip, "torchscript": export_torchscript}
    if cfg.format not in writers:
        raise ValueError(
            f"export format '{cfg.format}' is unknown; use format=mmpretrain|open_clip|torchscript"
        )
    weights = str((cfg.get("export") or {}).get("weights") or "ema")
    model = model_from_checkpoint(cfg.ckpt, to_plain(cfg.get("model")), weights=weights)
    if cfg.format == "mmpretrain":
        extra = {"source_checkpoint": str(cfg.ckpt), "weights": weights} | run_provenance(cfg.ckpt)
        out = export(model, cfg.out, extra=extra)
    else:
        out = writers[cfg.format](model, cfg.out)
    print(f"exported {cfg.ckpt} to {out} (format={cfg.format})")
    return out
