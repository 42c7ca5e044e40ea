"""``mmpretrain finetune task=... pretrained=PATH``: a downstream task on a pretrained model."""

from __future__ import annotations

from omegaconf import DictConfig

from mmpretrain.config import to_plain
from mmpretrain.evaluation.zeroshot import prompts_from_config
from mmpretrain.runs import end_run, ensure_data, start_run


def finetune(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg.task`` on ``cfg.pretrained``'s towers; the final metrics (also in ``metrics.json``)."""
    import lightning as L

    from mmpretrain import finetune as tasks
    from mmpretrain.data.stream.seeds import global_seed
    from mmpretrain.export import model_from_checkpoint
    from mmpretrain.runtime.ddp import resolve_strategy

    run_dir = start_run(cfg)
    L.seed_everything(global_seed(cfg.seed), workers=True)
    ensure_data(cfg.data)
    if cfg.task.name == "caption":  # a caption decoder, not a classifier (finetune/caption.py)
        return _caption(cfg, _caption_model(cfg), run_dir)
    model = model_from_checkpoint(cfg.pretrained, to_plain(cfg.get("model")))
    prompts = prompts_from_config(cfg.data.get("val"))
    classnames = prompts["classnames"] if prompts else None
    metrics = tasks.run(
        to_plain(cfg.task),
        model,
        to_plain(cfg.data),
        resolve_strategy(to_plain(cfg.trainer)),
        run_dir,
        classnames=classnames,
        seed=cfg.seed,
    )
    print(
        f"{cfg.task.name}: val accuracy {metrics['val/accuracy']:.4f}, macro-F1 {metrics['val/f1_macro']:.4f}"
    )
    end_run(run_dir)
    return metrics


def _caption_model(cfg: DictConfig):
    """``pretrained=model``: the model config's own starting weights (an open_clip tag, ``model.pretrained=``;
    a timm name, ``model.towers.image.pretrained=true``); any other value: a checkpoint or an export."""
    from mmpretrain.export import model_from_checkpoint
    from mmpretrain.model import build_model
    from mmpretrain.pretrained import check_available

    if str(cfg.pretrained) != "model":
        return model_from_checkpoint(cfg.pretrained, to_plain(cfg.get("model")))
    if cfg.get("model") is None:
        raise ValueError(
            "pretrained=model builds the model config's towers with their own weights: give one, e.g. "
            "model=openclip model.config=ViT-B-32 model.pretrained=laion2b_s34b_b79k"
        )
    check_available(cfg.model)
    return build_model(to_plain(cfg.model))


def _caption(cfg: DictConfig, model, run_dir) -> dict[str, float]:
    from mmpretrain.finetune import caption
    from mmpretrain.runtime.ddp import resolve_strategy

    metrics = caption.run(
        to_plain(cfg.task),
        model,
        to_plain(cfg.data),
        resolve_strategy(to_plain(cfg.trainer)),
        run_dir,
        cfg.seed,
    )
    shown = {
        k: v for k, v in metrics.items() if k.startswith("val/") and "BLEU-" not in k or k.endswith("BLEU-4")
    }
    print("caption: " + ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in sorted(shown.items())))
    print(f"caption with it: mmpretrain caption ckpt={run_dir / 'export'} in=FOLDER_OR_SHARDS")
    end_run(run_dir)
    return metrics
