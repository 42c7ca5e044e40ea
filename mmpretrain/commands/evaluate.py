"""``mmpretrain eval ckpt=PATH``: zero-shot, retrieval and the probe of a checkpoint or export on data.val
(and, for a model that can caption, the captioning scores of ``data.val.captioning``)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from mmpretrain.commands.train import captioning_evaluation, data_overrides, run_overrides
from mmpretrain.config import to_plain
from mmpretrain.evaluation.zeroshot import prompts_from_config, tasks_from_config
from mmpretrain.io import write_text_atomic
from mmpretrain.runs import end_run, ensure_data, start_run, summary

#: The metrics printed (besides every zero-shot accuracy), by key prefix.
PRINTED = (
    "val/retrieval_R@",
    "val/retrieval_mean_rank",
    "val/retrieval_median_rank",
    "val/retrieval_rsum",
    "val/retrieval_mean_R@1",
    "val/probe/",
)
#: Captioning metrics (a model with a caption decoder; data.val.captioning), printed with their prefix.
CAPTION_PRINTED = ("val/caption/", "val/caption_retrieval/")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validate ``cfg.ckpt`` once on ``cfg.data.val``; the metrics (also in ``eval_metrics.json``)."""
    import lightning as L

    from mmpretrain.data.stream.seeds import global_seed
    from mmpretrain.export import model_from_checkpoint
    from mmpretrain.runtime.ddp import resolve_strategy
    from mmpretrain.training.datamodule import ContrastiveDataModule
    from mmpretrain.training.module import ContrastiveModule

    run_dir = start_run(cfg)
    L.seed_everything(global_seed(cfg.seed))
    ensure_data(cfg.data)
    model = model_from_checkpoint(cfg.ckpt, to_plain(cfg.get("model")))
    datamodule = ContrastiveDataModule(cfg.data, model.preprocess, seed=cfg.seed)
    prompts = prompts_from_config({"classnames": cfg.get("classnames"), "templates": cfg.get("templates")})
    module = ContrastiveModule(
        model,
        loss=all_pairs_loss(model),
        optim={},
        zeroshot=prompts,
        zeroshot_tasks=tasks_from_config(cfg.data.get("val")),
    )
    # A model that can caption: its captions scored; any image-text model: the retrieval-captioning baseline.
    module.captioning = captioning_evaluation(model, cfg.data, datamodule, retrieval_only=True)
    trainer = L.Trainer(
        **resolve_strategy(to_plain(cfg.trainer)) | {"logger": False, "enable_checkpointing": False}
    )
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    for key, value in sorted(metrics.items()):
        if "zeroshot_top1" in key:
            print(
                f"{key.split('zeroshot_top1/', 1)[1]} zero-shot top-1: {value:.4f}"
            )  # the pair, or task/pair
    for key, value in sorted(metrics.items()):
        if key.startswith(PRINTED) or key.startswith(CAPTION_PRINTED):
            print(f"{key.removeprefix('val/retrieval_')}: {value:.4f}")
    if trainer.is_global_zero:
        write_text_atomic(run_dir / "eval_metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
        data, ckpt = data_overrides(run_overrides()), Path(cfg.ckpt)
        print(
            summary(
                metrics,
                run_dir,
                data_args=data,
                model=ckpt,
                train_args=data,
                suggest_eval=False,
                sweep_beside=trained_run(ckpt) or run_dir,
            )
        )
    end_run(run_dir)
    return metrics


def trained_run(ckpt: Path) -> Path | None:
    """The run directory that made ``ckpt`` (``RUN/export``, ``RUN/checkpoints/X.ckpt``), else None."""
    if ckpt.name == "export":
        return ckpt.parent
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def all_pairs_loss(model):
    """InfoNCE over every pair the model scores: its per-pair temperatures' pairs, else every pair."""
    from mmpretrain.losses import InfoNCE

    pairs = model.config()["temperature_pairs"]
    if not pairs:
        mods = model.modalities
        pairs = [(a, b) for i, a in enumerate(mods) for b in mods[i + 1 :]]
    return InfoNCE(pairs=pairs)
