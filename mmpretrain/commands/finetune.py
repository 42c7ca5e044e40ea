"""``mmpretrain finetune task=... pretrained=PATH``: a downstream task on a pretrained model."""

from __future__ import annotations

from omegaconf import DictConfig

from mmpretrain.config import to_plain
from mmpretrain.evaluation.zeroshot import prompts_from_config
from mmpretrain.runs import end_run, ensure_data, start_run


def pretrained_model(pretrained: str, model_cfg: dict | None):
    """The towers to fine-tune (or to caption with, ``task=caption``): ``model`` builds them from the
    ``model=`` config with its own starting weights (an open_clip tag, ``hf-hub:`` ids, timm weights);
    ``hf-hub:ORG/REPO`` is an open_clip model on the hub; anything else a checkpoint or export
    (:func:`model_from_checkpoint`)."""
    import mmpretrain
    from mmpretrain.export import model_from_checkpoint
    from mmpretrain.interop.open_clip import open_clip_model_config
    from mmpretrain.pretrained import check_available, is_hub_id

    if pretrained == "model":
        if not model_cfg:
            raise ValueError(
                "pretrained=model builds the towers of the model= config: give one (e.g. model=openclip)"
            )
        check_available(model_cfg)
        return mmpretrain.create_model(model_cfg)
    if is_hub_id(pretrained) and not model_cfg:
        cfg = open_clip_model_config(pretrained)
        check_available(cfg)
        return mmpretrain.create_model(cfg)
    return model_from_checkpoint(pretrained, model_cfg)


def finetune(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg.task`` on ``cfg.pretrained``'s towers; the final metrics (also in ``metrics.json``)."""
    import lightning as L

    from mmpretrain import finetune as tasks
    from mmpretrain.data.stream.seeds import global_seed
    from mmpretrain.runtime.ddp import resolve_strategy

    run_dir = start_run(cfg)
    L.seed_everything(global_seed(cfg.seed), workers=True)
    ensure_data(cfg.data)
    model = pretrained_model(str(cfg.pretrained), to_plain(cfg.get("model")))
    if cfg.task.name == "caption":  # a caption decoder, not a classifier (finetune/caption.py)
        return _caption(cfg, model, run_dir)
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
    if "val/accuracy" in metrics:
        print(
            f"{cfg.task.name}: val accuracy {metrics['val/accuracy']:.4f}, "
            f"macro-F1 {metrics['val/f1_macro']:.4f}"
        )
    else:
        print(
            f"{cfg.task.name}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("/vqa_accuracy"))
        )
    end_run(run_dir)
    return metrics


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
