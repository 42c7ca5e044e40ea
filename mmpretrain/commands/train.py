"""``mmpretrain train``: build the model, data, loss and Trainer from a composed config, fit, export."""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig

from mmpretrain.config import instantiate_all, safe_instantiate, to_plain
from mmpretrain.evaluation.zeroshot import prompts_from_config, tasks_from_config
from mmpretrain.io import write_text_atomic
from mmpretrain.runs import (
    checkpoint_step,
    end_run,
    ensure_data,
    launched_as_global_zero,
    remote_run,
    resume_path,
    start_run,
    summary,
)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as ``cfg`` says (resuming when ``resume=`` names a checkpoint); the final metrics."""
    import lightning as L

    from mmpretrain.data.stream.seeds import global_seed
    from mmpretrain.evaluation.captioning import write_caption_examples
    from mmpretrain.export import check_checkpoint_matches, export
    from mmpretrain.losses import check_modalities
    from mmpretrain.model import apply_training_options, build_model
    from mmpretrain.pretrained import check_available
    from mmpretrain.runtime.fsdp import preload_datamodule_state
    from mmpretrain.training.callbacks import AtomicCheckpointIO
    from mmpretrain.training.datamodule import ContrastiveDataModule
    from mmpretrain.training.distill import build_distillation
    from mmpretrain.training.ema import ema_callback
    from mmpretrain.training.module import ContrastiveModule
    from mmpretrain.training.monitor import CSVLogger, one_wandb_run

    run_dir = start_run(cfg)
    L.seed_everything(global_seed(cfg.seed), workers=True)
    check_available(cfg.model)  # pretrained files cached or downloaded now, before any data or trainer
    ensure_data(cfg.data)
    model = apply_training_options(build_model(cfg.model), cfg.model)
    if cfg.get("compile"):
        for tower in model.towers.values():
            tower.compile()  # in place: parameter names (checkpoints, export) stay as they are
    datamodule = ContrastiveDataModule(
        cfg.data,
        model.preprocess,
        seed=cfg.seed,
        negatives=_hard_negatives(cfg.loss),
        captions_per_sample=_captions_per_sample(cfg),
        teacher_cache=bool((cfg.get("distill") or {}).get("cached")),
    )
    loss = safe_instantiate(cfg.loss)
    check_modalities(loss, model.modalities)
    prompts = prompts_from_config(cfg.data.get("val"))
    labelled = prompts is None or _val_labelled(datamodule.val_urls, cfg.data)
    _resolve_monitor(cfg, has_classnames=prompts is not None, has_labels=labelled)
    ckpt_path = resume_path(cfg, run_dir)
    if ckpt_path:  # a checkpoint of another model config fails here, with what differs
        check_checkpoint_matches(model, ckpt_path)
        preload_datamodule_state(
            datamodule, ckpt_path
        )  # trainer=fsdp restores only after building the loader
    trainer_kwargs, optim = trainer_and_optim(cfg)
    distill = build_distillation(cfg.get("distill"), model)
    module = ContrastiveModule(
        model,
        loss,
        optim,
        zeroshot=prompts,
        # The checkpoint rebuilds the model from its own config (no weights source); the training config
        # (per-tower lr scales, locks, where the starting weights came from) is kept beside it.
        hparams={"model": model.config(), "model_training": to_plain(cfg.model)},
        zeroshot_tasks=tasks_from_config(cfg.data.get("val")),
        distill=distill,
    )
    module.captioning = captioning_evaluation(model, cfg.data, datamodule)
    module.attention_backends = _attention(cfg, trainer_kwargs, model)
    ema = ema_callback(cfg.model.get("ema"))
    weights = export_weights(cfg)
    loggers = instantiate_all(cfg.get("logger"))
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            logger.resuming = bool(ckpt_path)
            logger.resume_step = checkpoint_step(ckpt_path) if ckpt_path else None
    mirror = remote_run(cfg, run_dir)  # paths.remote: uploads in the background
    trainer = L.Trainer(
        **trainer_kwargs,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO(mirror=mirror)],
        logger=loggers,
        # the EMA first: its update precedes every callback that saves a checkpoint after a step
        callbacks=[*([ema] if ema else []), *instantiate_all(cfg.get("callbacks"))],
    )
    if val_at_start(cfg) and not ckpt_path:  # the pretrained starting point, logged at step 0
        with one_wandb_run(loggers):
            trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["skipped_samples"] = float(module.skipped_total)
    if cfg.export_at_end:  # under trainer=fsdp gathered from every rank (the EMA's shards too)
        model = _whole_model(ema.module if ema is not None and weights == "ema" else model, cfg.model)
    if trainer.is_global_zero:
        write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
        if cfg.export_at_end:
            written = "ema" if ema is not None and weights == "ema" else "raw"
            extra = {"metrics": metrics, "train_config": to_plain(cfg), "weights": written}
            export(model, run_dir / "export", extra=extra)
        if module.captioning is not None and module.captioning.last:
            write_caption_examples(module.captioning, run_dir)
        print(f"skipped samples: {module.skipped_total}")
        last = run_dir / "checkpoints" / "last.ckpt"
        overrides = run_overrides()
        print(
            summary(
                metrics,
                run_dir,
                data_args=data_overrides(overrides),
                model=run_dir / "export" if cfg.export_at_end else last if last.exists() else None,
                train_args=[o for o in overrides if not o.startswith(("resume=", "ckpt_path="))],
            )
        )
    end_run(run_dir, mirror)
    return metrics


def export_weights(cfg: DictConfig) -> str:
    """``export.weights``: ``ema`` (the weight average, where the run keeps one) or ``raw``."""
    weights = str((cfg.get("export") or {}).get("weights") or "ema")
    if weights not in ("ema", "raw"):
        raise ValueError(f"export.weights must be ema or raw, got '{weights}'")
    return weights


def run_overrides() -> list[str]:
    """The command line's overrides of this run (not Hydra's own); [] outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def data_overrides(overrides: list[str]) -> list[str]:
    """What picks a run's data, as ``mmpretrain eval`` and ``finetune`` take it: ``data=CHOICE``
    (when not their default, the digits) and the ``data.*`` overrides."""
    from hydra.core.hydra_config import HydraConfig

    choice = HydraConfig.get().runtime.choices.get("data") if HydraConfig.initialized() else None
    picked = [f"data={choice}"] if choice and choice != "digits" else []
    return picked + [o for o in overrides if o.startswith("data.")]


def captioning_evaluation(model, data_cfg: DictConfig, datamodule, retrieval_only: bool = False):
    """The captioning evaluation of a model with a caption decoder, from ``data.val.captioning`` (README,
    "Captioning"); with ``retrieval_only`` also of a model without one (the retrieval baseline alone, when
    the data config has ``val.captioning``). None without val shards or with ``samples: 0``."""
    has_decoder = getattr(model, "decoder", None) is not None
    wanted = has_decoder or (
        retrieval_only
        and {"image", "text"} <= set(model.modalities)
        and (data_cfg.get("val") or {}).get("captioning") is not None
    )
    if not wanted or not datamodule.val_urls:
        return None
    from mmpretrain.data import expand_shards
    from mmpretrain.evaluation.captioning import evaluation_from_config

    missing = data_cfg.get("missing_shards", "error")
    train_urls = [
        u
        for s in (data_cfg.get("sources") or {}).values()
        if s
        for u in expand_shards(s["shards"], missing=missing)
    ]
    return evaluation_from_config(
        to_plain((data_cfg.get("val") or {}).get("captioning")),
        datamodule.val_urls,
        train_urls,
        data_cfg.get("caption_field", "caption"),
        to_plain(data_cfg.get("caption_keys")),
    )


def _whole_model(model, model_cfg: DictConfig):
    """``model`` itself, or, when it is sharded (trainer=fsdp), an unsharded copy with the trained
    weights (a collective: every rank calls it)."""
    from mmpretrain.model import build_model
    from mmpretrain.runtime.fsdp import full_state_dict, is_sharded

    if not is_sharded(model):
        return model
    state = full_state_dict(model)  # the whole state on rank 0, empty on the others
    if not state:
        return model
    whole = build_model(to_plain(model_cfg))
    whole.load_state_dict(state, strict=True)
    return whole


def trainer_and_optim(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trainer kwargs and optim config, refusing gradient accumulation that changes the objective."""
    from mmpretrain.runtime.ddp import resolve_strategy

    trainer, optim = to_plain(cfg.trainer), to_plain(cfg.optim)
    trainer.pop("val_at_start", None)  # ours, not Lightning's: see val_at_start
    trainer = resolve_strategy(trainer)
    if int(trainer.get("accumulate_grad_batches") or 1) > 1:
        raise ValueError(
            "trainer.accumulate_grad_batches>1 changes a contrastive loss (each micro-batch would only see "
            "its own negatives). For a batch too big for memory set data.batch_size to the full batch and "
            "optim.grad_cache_chunks=K instead (same gradient as the full batch, memory of one K-th)."
        )
    if int(optim.get("grad_cache_chunks") or 1) > 1:
        # manual optimisation: the module clips itself (Lightning refuses gradient_clip_val then)
        optim["gradient_clip_val"] = trainer.pop("gradient_clip_val", None)
    return trainer, optim


def _attention(cfg: DictConfig, trainer: dict[str, Any], model: Any) -> list[Any] | None:
    """The SDPA backends of the training steps (``attention_kernel``), said at start with the precision
    ``trainer.precision=auto`` became."""
    from mmpretrain.runtime.kernels import attention_backends, on_gpu

    precision = str(trainer.get("precision"))
    backends = attention_backends(
        str(cfg.get("attention_kernel") or "auto"), precision, on_gpu(trainer), model.towers.values()
    )
    if launched_as_global_zero():
        said = [f"trainer.precision=auto: {precision}"] if cfg.trainer.get("precision") == "auto" else []
        if backends is not None:
            said.append("attention in training: " + ", ".join(b.name.lower() for b in backends))
        if said:
            print("; ".join(said), flush=True)
    return backends


def val_at_start(cfg: DictConfig) -> bool:
    """``trainer.val_at_start``; ``null`` (default): on when any tower starts from pretrained weights."""
    choice = cfg.trainer.get("val_at_start")
    if choice is not None:
        return bool(choice)
    from mmpretrain.pretrained import tower_configs

    return any(
        t.get("pretrained")
        or t.get("pretrained_path")
        or t.get("image_tower_path")
        or str(t.get("config", "")).startswith("hf-hub:")
        or str(t.get("model_name", "")).startswith("hf-hub:")
        for t in tower_configs(cfg.model)
    )


def _resolve_monitor(cfg: DictConfig, has_classnames: bool, has_labels: bool = True) -> None:
    """Make ``optimized_metric`` (what the best checkpoint and a sweeper watch) one the run logs.

    Without validation (no val shards, or ``trainer.limit_val_batches=0``) no checkpoint callback
    monitors anything (each keeps the newest). A zero-shot metric without class names (unlabelled
    shards: no ``classnames.txt``) or without class labels in the val shards (``has_labels``: a
    ``classnames.txt`` beside captioned shards with no ``cls``) becomes the pair's mean instance R@1
    over both directions, ``val/retrieval_mean_R@1/<pair>``, which every val set with the pair
    supports."""
    val = cfg.data.get("val") or {}
    limit = cfg.trainer.get("limit_val_batches")
    if not val.get("shards") or (limit is not None and float(limit) == 0):
        for callback in (cfg.get("callbacks") or {}).values():
            if callback is not None and callback.get("monitor") is not None:
                callback.monitor = None
        return
    metric = str(cfg.get("optimized_metric") or "")
    if metric.startswith("val/zeroshot_") and metric.count("/") == 2 and not (has_classnames and has_labels):
        fallback = f"val/retrieval_mean_R@1/{metric.rsplit('/', 1)[1]}"
        why = (
            "the val shards carry no class labels (cls) for zero-shot"
            if has_classnames
            else "no class names for zero-shot (data.val.classnames)"
        )
        if launched_as_global_zero():  # every rank resolves it; one says so
            print(f"{why}: monitoring {fallback} instead of {metric}")
        cfg.optimized_metric = fallback


def _val_labelled(urls: list[str], data: DictConfig) -> bool:
    """Whether the val rows carry the class labels zero-shot scores (``cls``, or a key
    ``data.modality_keys.cls`` names), judged by the first sample of ``urls`` (the datamodule's val
    shards): one read of tar headers. No val shards, or an unreadable first one, counts as labelled:
    the loader reports it."""
    from mmpretrain.data.stream.tar_reader import first_sample_fields

    keys = {"cls", *((data.get("modality_keys") or {}).get("cls") or ())}
    try:
        return not urls or bool(first_sample_fields(urls[0]) & keys)
    except (OSError, ValueError):  # ValueError: a damaged first sample (ShardFault)
        return True


def _captions_per_sample(cfg: DictConfig) -> int:
    """``data.captions_per_sample``: several captions of a sample in one step need InfoNCE's
    multi-positive form, and the whole batch's features at once (no grad cache)."""
    k = int(cfg.data.get("captions_per_sample") or 1)
    if k > 1:
        if not str(cfg.loss.get("_target_", "")).endswith("InfoNCE"):
            raise ValueError(
                f"data.captions_per_sample={k} trains with loss=infonce (its multi-positive form); "
                f"{cfg.loss.get('_target_')} takes one caption per sample: set data.captions_per_sample=1"
            )
        if int(cfg.optim.get("grad_cache_chunks") or 1) > 1:
            raise ValueError(
                f"data.captions_per_sample={k} cannot be combined with optim.grad_cache_chunks>1 "
                "(the cached features would hold one caption per sample)"
            )
    return k


def _hard_negatives(loss_cfg: DictConfig) -> int:
    """Hard negative captions per training sample: ``loss.max_negatives`` with ``loss.hard_negatives``."""
    if not loss_cfg.get("hard_negatives"):
        return 0
    target = str(loss_cfg.get("_target_", ""))
    if not (
        target.endswith("InfoNCE") or (target.endswith("CoCa") and loss_cfg.get("contrastive") == "infonce")
    ):
        raise ValueError(
            f"loss.hard_negatives=true needs loss=infonce (NegCLIP) or loss=coca with contrastive=infonce; "
            f"{target} "
            f"has no softmax over captions to add the negatives to"
        )
    return int(loss_cfg.get("max_negatives") or 1)
