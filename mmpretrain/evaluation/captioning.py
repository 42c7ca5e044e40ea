"""Captions scored as captioning papers score them, and the captioning evaluation of a model.

- :func:`caption_scores`: BLEU-1..4, ROUGE-L and CIDEr-D of generated captions against *all* references
  of each sample, by pycocoevalcap's scorers (the COCO caption evaluation), fed text tokenized here in
  Python (lower case, punctuation dropped, as its PTB tokenizer does) so no Java is needed. CIDEr-D's
  document frequencies come from the references of the scored set, as in the COCO evaluation.
- :func:`retrieval_captions`: the baseline that generates nothing: each image gets the train caption
  nearest to it in the contrastive embedding.
- :func:`names_object`: whether a caption names a colour and a shape (the held-out-pair naming rate on
  the scenes' ``test_compositional`` split).
- :class:`CaptionEvaluation`: the captioning metrics of a model on a fixed set of samples (validation
  during ``loss=coca`` training, ``mmpretrain eval``, ``mmpretrain caption``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmpretrain.io import atomic_write, write_text_atomic

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")
#: data.val.captioning's defaults (README, "Captioning").
CAPTIONING_DEFAULTS = {
    "samples": 64,  # val samples captioned at each captioning validation (the first ones, fixed)
    "every": 1,  # caption at every N-th validation
    "strategy": "greedy",
    "max_len": None,  # null: the decoder's context length
    "batch_size": 32,
    "retrieval_pool": 2000,  # train samples whose captions (all of them) the retrieval baseline picks from
    "compositional": None,  # shards of one-object scenes with held-out colour-shape pairs
    "compositional_samples": 256,
}

_PUNCTUATION = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


def tokenize_caption(text: str) -> str:
    """Lower case, punctuation removed (a hyphen too: "five-sided" and a tokenizer's decoded
    "five - sided" both read "five sided"), words joined by single spaces (what pycocoevalcap reads)."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4 (corpus level), ROUGE-L and CIDEr-D (means over samples) of ``predictions[i]`` against
    every caption of ``references[i]``."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every sample needs at least one reference caption")
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize_caption(p)] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return dict(zip(METRICS, [*map(float, bleu), float(rouge), float(cider)]))


def retrieval_captions(
    image_embeddings: torch.Tensor, caption_embeddings: torch.Tensor, captions: Sequence[str]
) -> list[str]:
    """For each image, the caption whose (L2-normalised) embedding is nearest."""
    if len(captions) != caption_embeddings.shape[0] or not len(captions):
        raise ValueError("retrieval captioning needs one embedding per caption and at least one caption")
    best = (image_embeddings.float() @ caption_embeddings.float().T).argmax(1)
    return [captions[i] for i in best.tolist()]


def names_object(caption: str, color_words: Sequence[str], shape_words: Sequence[str]) -> bool:
    """Whether ``caption`` contains one of the colour's words and one of the shape's (as whole words)."""
    text = f" {tokenize_caption(caption)} "
    return any(f" {tokenize_caption(w)} " in text for w in color_words) and any(
        f" {tokenize_caption(w)} " in text for w in shape_words
    )


# -- reading captioned samples ----------------------------------------------------------------------
@dataclass
class CaptionedSamples:
    """Samples read for captioning: keys, images (PIL), every caption, the json metadata; the samples
    that could not be read are counted in ``skipped``."""

    keys: list[str] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


def read_captioned(
    urls: Sequence[str],
    limit: int | None = None,
    caption_field: str = "caption",
    caption_keys: Sequence[str] | None = None,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    need_captions: bool = True,
) -> CaptionedSamples:
    """The first ``limit`` samples of ``urls`` (in shard order) with an image (and, with ``need_captions``,
    captions) that ``keep(meta)`` accepts; damaged or incomplete samples are counted, not raised."""
    out = CaptionedSamples()
    for sample in iter_captioned(urls, caption_field, caption_keys, out, need_captions):
        if keep is not None and not keep(sample["meta"]):
            continue
        out.keys.append(sample["key"])
        out.images.append(sample["image"])
        out.captions.append(sample["captions"])
        out.meta.append(sample["meta"])
        if limit is not None and len(out.keys) >= limit:
            break
    return out


def iter_captioned(
    urls, caption_field, caption_keys, out: CaptionedSamples, need_captions: bool = True
) -> Iterator[dict]:
    """Each readable sample of ``urls`` as ``{key, image, captions, meta}``; the others counted in ``out``."""
    from mmpretrain.data.stream.decode import decode_sample, read_meta
    from mmpretrain.data.stream.tar_reader import read_samples

    def skip(_exn: Exception) -> None:
        out.skipped += 1

    options = {"caption_field": caption_field, "caption_keys": list(caption_keys) if caption_keys else None}
    for url in urls:
        for _, _, raw in read_samples(str(url), on_error=skip):
            raw["__url__"] = str(url)
            try:
                decoded = decode_sample(raw, ["image", "text"], ["image"], **options)
                meta = read_meta(raw)
            except Exception:  # noqa: BLE001 - a bad sample is counted and left out
                out.skipped += 1
                continue
            captions = decoded.get("text") or []
            if need_captions and not captions:
                out.skipped += 1
                continue
            yield {"key": raw.get("__key__"), "image": decoded["image"], "captions": captions, "meta": meta}


# -- the captioning evaluation of a model ---------------------------------------------------------------
class CaptionEvaluation:
    """Captioning metrics of a model on fixed samples: generated captions (``caption/<metric>``, a model
    with a caption decoder) and the retrieval baseline (``caption_retrieval/<metric>``, any model with
    image and text towers) against every reference; with compositional
    samples (one object each, its ``objects[0]`` colour and shape) the share of captions naming both
    (``caption/heldout_naming_rate``, ``caption_retrieval/heldout_naming_rate``).

    ``samples``: the scored set; ``pool``: train captions for the baseline (none: no baseline);
    ``compositional``: the held-out-pair scenes (optional). Deterministic for greedy and beam decoding:
    every rank computes the same numbers (no collective)."""

    def __init__(
        self,
        samples: CaptionedSamples,
        pool: Sequence[str] = (),
        compositional: CaptionedSamples | None = None,
        strategy: str = "greedy",
        max_len: int | None = None,
        batch_size: int = 32,
        every: int = 1,
        **generate_options: Any,
    ):
        if not samples.keys:
            raise ValueError("captioning evaluation needs at least one captioned sample")
        self.samples, self.pool, self.compositional = samples, list(dict.fromkeys(pool)), compositional
        self.options = {"strategy": strategy, "max_len": max_len} | generate_options
        self.batch_size, self.every = int(batch_size), max(int(every), 1)
        self.validations = 0
        self.last: dict[str, Any] = {}  # the last evaluation's captions (for plots and files)

    def due(self) -> bool:
        """Count a validation; True at every ``every``-th (the first included)."""
        self.validations += 1
        return (self.validations - 1) % self.every == 0

    @torch.no_grad()
    def metrics(self, model) -> dict[str, float]:
        was = model.training
        model.eval()
        try:
            return self._metrics(model)
        finally:
            model.train(was)

    def _metrics(self, model) -> dict[str, float]:
        images = self._tensors(model, self.samples.images)
        self.last = {"keys": self.samples.keys, "references": self.samples.captions}
        out: dict[str, float] = {}
        if model.decoder is not None:  # a model without a decoder gets the retrieval baseline alone
            generated = self.generate(model, images)
            out |= {f"caption/{k}": v for k, v in caption_scores(generated, self.samples.captions).items()}
            self.last["generated"] = generated
        pool = self._pool_embeddings(model) if self.pool else None
        if pool is not None:
            retrieved = retrieval_captions(self._embed_images(model, images), pool, self.pool)
            scores = caption_scores(retrieved, self.samples.captions)
            out |= {f"caption_retrieval/{k}": v for k, v in scores.items()}
            self.last["retrieved"] = retrieved
        if self.compositional is not None and self.compositional.keys:
            out |= self._compositional(model, pool)
        return out

    def _compositional(self, model, pool: torch.Tensor | None) -> dict[str, float]:
        from mmpretrain.data.synthetic.scenes.grammar import COLOR_WORDS, SHAPE_WORDS

        images = self._tensors(model, self.compositional.images)
        objects = [m["objects"][0] for m in self.compositional.meta]

        def rate(captions: list[str]) -> float:
            named = [
                names_object(
                    c, COLOR_WORDS[o["color"]], [w for pair in SHAPE_WORDS[o["shape"]] for w in pair]
                )
                for c, o in zip(captions, objects)
            ]
            return sum(named) / len(named)

        self.last["compositional"] = {"keys": self.compositional.keys}
        out: dict[str, float] = {}
        if model.decoder is not None:
            generated = self.generate(model, images)
            self.last["compositional"]["generated"] = generated
            out["caption/heldout_naming_rate"] = rate(generated)
        if pool is not None:
            retrieved = retrieval_captions(self._embed_images(model, images), pool, self.pool)
            out["caption_retrieval/heldout_naming_rate"] = rate(retrieved)
            self.last["compositional"]["retrieved"] = retrieved
        return out

    def generate(self, model, images: torch.Tensor) -> list[str]:
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            out += model.caption(images[start : start + self.batch_size], **self.options)
        return out

    def _tensors(self, model, pil_images: list[Any]) -> torch.Tensor:
        transform = model.towers["image"].preprocess(False)
        return torch.stack([transform(im) for im in pil_images])

    def _device(self, model) -> torch.device:
        return next(model.parameters()).device

    def _embed_images(self, model, images: torch.Tensor) -> torch.Tensor:
        device = self._device(model)
        return torch.cat(
            [
                model.encode("image", images[s : s + self.batch_size].to(device))
                for s in range(0, len(images), self.batch_size)
            ]
        )

    def _pool_embeddings(self, model) -> torch.Tensor:
        tower, device = model.towers["text"], self._device(model)
        tokenize = tower.preprocess(False)
        chunks = []
        for start in range(0, len(self.pool), 256):
            tokens = torch.stack([tokenize(c) for c in self.pool[start : start + 256]])
            chunks.append(model.encode("text", tower.trim_input(tokens).to(device)))
        return torch.cat(chunks)


def evaluation_from_config(
    captioning: dict[str, Any] | None,
    val_urls: Sequence[str],
    train_urls: Sequence[str],
    caption_field: str = "caption",
    caption_keys: Sequence[str] | None = None,
) -> CaptionEvaluation | None:
    """A :class:`CaptionEvaluation` from ``data.val.captioning`` (missing keys: :data:`CAPTIONING_DEFAULTS`;
    ``samples: 0`` turns it off) over the val and train shards; None when off or nothing is captioned."""
    cfg = CAPTIONING_DEFAULTS | dict(captioning or {})
    if not int(cfg["samples"] or 0) or not val_urls:
        return None
    read = {"caption_field": caption_field, "caption_keys": caption_keys}
    samples = read_captioned(val_urls, int(cfg["samples"]), **read)
    if not samples.keys:
        return None
    pool: list[str] = []
    if int(cfg["retrieval_pool"] or 0) and train_urls:
        pool = [
            c
            for caps in read_captioned(train_urls, int(cfg["retrieval_pool"]), **read).captions
            for c in caps
        ]
    compositional = None
    if cfg["compositional"]:
        from mmpretrain.data import NoShardsError, expand_shards

        try:
            urls = expand_shards(str(cfg["compositional"]), missing="warn")
        except NoShardsError:
            print(f"captioning: no compositional shards at {cfg['compositional']}; no held-out naming rate")
            urls = []
        compositional = read_captioned(
            urls, int(cfg["compositional_samples"]), keep=lambda m: len(m.get("objects") or []) == 1, **read
        )
    return CaptionEvaluation(
        samples,
        pool,
        compositional,
        strategy=cfg["strategy"],
        max_len=cfg["max_len"],
        batch_size=int(cfg["batch_size"]),
        every=int(cfg["every"]),
    )


def plot_captions(
    images: Sequence[Any], rows: dict[str, Sequence[str]], path: str | Path, title: str = "", n: int = 8
) -> Path:
    """The first ``n`` images, each beside its captions (``rows``: label -> one caption per image)."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    n = min(n, len(images))
    fig, axes = plt.subplots(
        n, 2, figsize=(9, 1.9 * n), gridspec_kw={"width_ratios": [1, 3.5]}, squeeze=False
    )
    for i in range(n):
        axes[i, 0].imshow(images[i])
        lines = [f"{label}: {textwrap.shorten(caps[i], 90)}" for label, caps in rows.items()]
        axes[i, 1].text(0, 0.5, "\n".join(lines), va="center", fontsize=8, family="monospace")
        for ax in axes[i]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)
    return path


def write_caption_examples(evaluation: CaptionEvaluation, run_dir: Path) -> None:
    """The last captioning validation's captions (``captions_val.jsonl``) and the first ones beside their
    images (``plots/captions.png``)."""
    last = evaluation.last
    rows = {name: last[name] for name in ("generated", "retrieved") if name in last}
    rows["reference"] = [refs[0] for refs in last["references"]]
    lines = [
        json.dumps(
            {"key": k, **{name: caps[i] for name, caps in rows.items()}, "references": last["references"][i]}
        )
        for i, k in enumerate(last["keys"])
    ]
    write_text_atomic(run_dir / "captions_val.jsonl", "\n".join(lines) + "\n")
    path = plot_captions(evaluation.samples.images, rows, run_dir / "plots" / "captions.png")
    print(f"captions: {run_dir / 'captions_val.jsonl'}, {path}")
