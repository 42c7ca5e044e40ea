"""The fine-tuning tasks: build data and a classifier for ``task.name``, train with Lightning,
write metrics.json, the confusion matrix (JSON + PNG) and checkpoints into the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from mmpretrain.data import ShardStream, Source, expand_shards
from mmpretrain.finetune.heads import FusionClassifier, LinearHead, TowerClassifier, features
from mmpretrain.finetune.module import ClassifierModule, task_trainer
from mmpretrain.io import write_text_atomic
from mmpretrain.model import ContrastiveModel
from mmpretrain.training.datamodule import ContrastiveDataModule
from mmpretrain.training.plots import plot_confusion

TASKS = ("linear_probe", "full", "fusion", "vqa")


def run(
    task: dict[str, Any],
    model: ContrastiveModel,
    data: dict[str, Any],
    trainer: dict[str, Any],
    run_dir: Path,
    classnames: list[str] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    if task["name"] not in TASKS:
        raise ValueError(f"task={task['name']} is unknown; use one of {', '.join(TASKS)}")
    if task["name"] == "vqa":  # its own data, net, module and metrics: finetune/vqa.py
        from mmpretrain.finetune.vqa import run_vqa

        return run_vqa(task, model, data, trainer, run_dir, seed=seed)
    num_classes = int(task.get("num_classes") or (len(classnames) if classnames else 0))
    if num_classes < 2:
        raise ValueError(
            "the number of classes is unknown: give data.val.classnames (a file) or task.num_classes=N"
        )
    modalities = list(task["modalities"]) if task["name"] == "fusion" else [task["modality"]]
    missing = [m for m in modalities if m not in model.towers]
    if missing:
        raise ValueError(f"task needs {missing} tower(s), but the pretrained model has {model.modalities}")
    if task["name"] == "linear_probe":
        net, groups, fit_kwargs = _linear_probe(task, model, data, num_classes)
    else:
        datamodule = ContrastiveDataModule(
            data, lambda train: _preprocess(model, modalities, train), seed=seed
        )
        fit_kwargs = {"datamodule": datamodule}
        if task["name"] == "full":
            model.train()  # exported models load in eval mode; fine-tuning trains dropout and norm statistics
            net = TowerClassifier(model, task["modality"], num_classes, kind=task.get("features", "tower"))
            groups = net.param_groups(
                float(task["lr"]), float(task["tower_lr_scale"]), task.get("layer_decay")
            )
        else:
            example = next(
                iter(
                    ShardStream(
                        [Source("val", datamodule.val_urls)],
                        _preprocess(model, modalities, False),
                        batch_size=2,
                        train=False,
                    )
                )
            )
            net = FusionClassifier(
                model,
                modalities,
                num_classes,
                task["fusion"],
                example,
                width=int(task["width"]),
                layers=int(task["layers"]),
                heads=int(task["heads"]),
                query=task.get("query"),
                freeze_towers=bool(task["freeze_towers"]),
            )
            groups = [{"params": [p for p in net.parameters() if p.requires_grad], "lr": float(task["lr"])}]
    module = ClassifierModule(
        net,
        num_classes,
        groups,
        weight_decay=float(task.get("weight_decay", 0.0)),
        warmup_steps=float(task.get("warmup_steps", 0.0)),
        label_smoothing=float(task.get("label_smoothing", 0.0)),
        hparams={"model": model.config(), "task": task, "num_classes": num_classes},
    )
    module.train()  # Lightning keeps the modes it finds; frozen fusion towers switch themselves to eval here
    fit = task_trainer(trainer, task, run_dir)
    fit.fit(module, **fit_kwargs)
    trained = {k: float(v) for k, v in fit.callback_metrics.items() if k.startswith("train/")}
    val_kwargs = (
        {"datamodule": fit_kwargs["datamodule"]}
        if "datamodule" in fit_kwargs
        else {"dataloaders": fit_kwargs["val_dataloaders"]}
    )
    (final,) = fit.validate(module, verbose=False, **val_kwargs)
    metrics = {k: float(v) for k, v in final.items()}
    metrics |= trained
    _write_results(run_dir, metrics, module.last_confusion, classnames)
    return metrics


def _preprocess(model: ContrastiveModel, modalities: list[str], train: bool) -> dict[str, Any]:
    prep = model.preprocess(train)
    return {m: prep[m] for m in modalities}


# -- linear probe: features extracted once, then a linear layer ----------------------------------
@torch.no_grad()
def extract(
    model: ContrastiveModel,
    modality: str,
    urls: list[str],
    kind: str,
    batch_size: int = 256,
    caption_field: str = "caption",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of ``urls`` (eval transforms, in shard order)."""
    model.eval()
    stream = ShardStream(
        [Source("probe", urls)],
        _preprocess(model, [modality], False),
        batch_size=batch_size,
        train=False,
        caption_field=caption_field,
        on_error="raise",
    )
    feats, labels = [], []
    for batch in stream:
        from mmpretrain.finetune.module import _labels

        labels.append(_labels(batch))
        feats.append(features(model, modality, batch[modality], kind).float())
    if not feats:
        raise ValueError(f"no samples in {urls[:3]}...")
    return torch.cat(feats), torch.cat(labels)


def _linear_probe(task, model, data, num_classes):
    missing = data.get("missing_shards", "error")
    urls = [
        u for src in data["sources"].values() if src for u in expand_shards(src["shards"], missing=missing)
    ]
    val_urls = expand_shards(data["val"]["shards"], missing=missing)
    kind = task.get("features", "embedding")
    caption_field = data.get("caption_field", "caption")
    x_train, y_train = extract(model, task["modality"], urls, kind, caption_field=caption_field)
    x_val, y_val = extract(model, task["modality"], val_urls, kind, caption_field=caption_field)
    print(
        f"linear probe: {len(x_train)} train / {len(x_val)} val features of dim {x_train.shape[1]} ({kind})"
    )
    head = LinearHead(x_train.mean(0), x_train.std(0), num_classes)
    gen = torch.Generator().manual_seed(0)
    bs = int(task["batch_size"])
    loaders = {
        "train_dataloaders": DataLoader(_Dict(x_train, y_train), batch_size=bs, shuffle=True, generator=gen),
        "val_dataloaders": DataLoader(_Dict(x_val, y_val), batch_size=1024),
    }
    groups = [{"params": list(head.parameters()), "lr": float(task["lr"])}]
    return head, groups, loaders


class _Dict(TensorDataset):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return {"features": x, "cls": y}


# -- outputs --------------------------------------------------------------------------------------
def _write_results(
    run_dir: Path, metrics: dict[str, float], confusion: torch.Tensor | None, classnames: list[str] | None
) -> None:
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    if confusion is None:
        return
    names = classnames or [str(i) for i in range(confusion.shape[0])]
    write_text_atomic(
        run_dir / "confusion_matrix.json", json.dumps({"classes": names, "matrix": confusion.tolist()})
    )
    plot_confusion(
        confusion,
        names,
        run_dir / "plots" / "confusion_matrix.png",
        title=f"val accuracy {metrics.get('val/accuracy', float('nan')):.4f}",
    )
