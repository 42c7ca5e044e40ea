"""``mmpretrain caption ckpt=PATH in=FOLDER_OR_SHARDS out=captions.jsonl``: caption every input image."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mmpretrain.config import to_plain
from mmpretrain.io import write_text_atomic
from mmpretrain.runs import end_run, start_run

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def caption(cfg: DictConfig) -> dict[str, Any]:
    """Write one json line per input of ``cfg.in`` to ``cfg.out``; the counts (and scores, when the
    inputs have reference captions)."""
    from rich.progress import Progress

    from mmpretrain.evaluation.captioning import caption_scores
    from mmpretrain.export import model_from_checkpoint

    run_dir = start_run(cfg)
    device = _device(str(cfg.device))
    model = model_from_checkpoint(cfg.ckpt, to_plain(cfg.get("model"))).to(device).eval()
    if model.decoder is None:
        raise ValueError(
            f"{cfg.ckpt} has no caption decoder: train with loss=coca, or give a pretrained model one with "
            f"`mmpretrain finetune task=caption pretrained={cfg.ckpt}`"
        )
    if model.decoder.source != "image":
        raise ValueError(
            f"{cfg.ckpt} captions {model.decoder.source} clips; this command reads images. Caption clips "
            "from Python: model.caption(clips) with clips [B, T, C, H, W] from model.transforms"
        )
    options = {
        "max_len": cfg.max_len,
        "min_len": int(cfg.min_len),
        "use_cache": bool(cfg.use_cache),
    } | _strategy_options(cfg, device)
    transform = model.towers["image"].preprocess(False)
    source = Inputs(str(cfg["in"]), cfg.get("caption_field", "captions"))
    lines: list[str] = []
    predictions, references = [], []
    with Progress(transient=True) as progress:
        task = progress.add_task("captioning", total=source.total)
        for batch in source.batches(int(cfg.batch_size)):
            images = torch.stack([transform(item["image"]) for item in batch])
            captions = model.caption(images, cfg.strategy, **options)
            for item, text in zip(batch, captions):
                line = {"key": item["key"], "caption": text}
                if item.get("references"):
                    line["references"] = item["references"]
                    predictions.append(text)
                    references.append(item["references"])
                lines.append(json.dumps(line))
            progress.advance(task, len(batch))
    out = Path(str(cfg.out))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(f"{line}\n" for line in lines))
    result: dict[str, Any] = {"captioned": len(lines), "skipped": source.skipped}
    print(
        f"captioned {len(lines)} inputs -> {out}"
        + (f"; skipped {source.skipped} unreadable" if source.skipped else "")
    )
    if predictions and len(predictions) == len(lines):
        scores = caption_scores(predictions, references)
        print(", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        result |= scores
        write_text_atomic(run_dir / "caption_metrics.json", json.dumps(result, indent=2))
    end_run(run_dir)
    return result


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _strategy_options(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    if cfg.strategy == "beam":
        return {"num_beams": int(cfg.num_beams), "length_penalty": float(cfg.length_penalty)}
    if cfg.strategy == "top_p":
        generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
        return {"top_p": float(cfg.top_p), "temperature": float(cfg.temperature), "generator": generator}
    return {}


class Inputs:
    """The images of a folder (recursively, sorted; key: the path under the folder, suffix kept) or of
    shards (key: the sample's; references: its captions). Unreadable ones are counted in ``skipped``."""

    def __init__(self, where: str, caption_field: str = "captions"):
        self.where, self.caption_field = where, caption_field
        self.skipped = 0
        path = Path(where).expanduser()
        if path.is_dir() and not list(path.glob("*.tar")):
            self.files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise FileNotFoundError(
                    f"in={where}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder"
                )
            self.root, self.urls = path, None
            self.total: int | None = len(self.files)
        else:
            from mmpretrain.data import expand_shards

            pattern = str(path / "*.tar") if path.is_dir() else where
            self.files, self.urls = None, expand_shards(pattern)
            self.total = None

    def batches(self, size: int) -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        for item in self._items():
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _items(self) -> Iterator[dict[str, Any]]:
        if self.files is not None:
            from PIL import Image

            for p in self.files:
                try:
                    with Image.open(p) as im:
                        image = im.convert("RGB")
                except Exception as exn:  # noqa: BLE001 - an unreadable file is counted and reported
                    self.skipped += 1
                    print(f"skipped {p}: {exn}")
                    continue
                yield {"key": str(p.relative_to(self.root)), "image": image}
            return
        from mmpretrain.evaluation.captioning import CaptionedSamples, iter_captioned

        counter = CaptionedSamples()
        for sample in iter_captioned(self.urls, self.caption_field, None, counter, need_captions=False):
            self.skipped = counter.skipped
            yield {"key": sample["key"], "image": sample["image"], "references": sample["captions"]}
        self.skipped = counter.skipped
