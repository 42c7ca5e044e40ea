"""Visual question answering on pretrained towers: ``mmpretrain finetune task=vqa pretrained=PATH``.

The question goes through the text tower and the image through the image tower, both as token
features (:func:`~mmpretrain.finetune.heads.tower_tokens`), into a fusion module (``fusion=attention``
by default: the question tokens attend to the image tokens; ``early`` and ``late`` as
``task=fusion`` has them) and a classifier over the answer vocabulary (the ``task.max_answers``
most frequent normalised answers of the train shards). Trained with soft-score BCE (VQA v2: an
answer's target is the VQA accuracy predicting it would score) or cross-entropy on those scores;
scored with the official VQA accuracy (:mod:`mmpretrain.evaluation.vqa`) overall, per question
type and per answer type on ``data.val`` and each of ``task.test``. ``task.inputs=question_only`` or
``image_only`` trains the blind baselines (one tower's tokens, the same head) with the same command.

A batch is ``data.batch_size`` images with all of their questions: each image is encoded once and
its tokens are repeated for its questions. Answers are predicted by classification, or with
``task.answer_mode=rank`` ranked by a caption decoder's likelihood (:mod:`mmpretrain.finetune.vqa_rank`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain.data import NoShardsError, ShardStream, Source, expand_shards
from mmpretrain.data.stream.questions import iter_qa
from mmpretrain.evaluation.vqa import question_accuracy, soft_scores
from mmpretrain.finetune.heads import FusionClassifier, tower_tokens
from mmpretrain.finetune.module import adamw_warmup_cosine, task_trainer
from mmpretrain.finetune.vqa_rank import AnswerRanker
from mmpretrain.io import write_text_atomic
from mmpretrain.model import ContrastiveModel, build_model, weights_free
from mmpretrain.runtime import distributed
from mmpretrain.training.datamodule import ContrastiveDataModule, sources_from_config
from mmpretrain.training.plots import plot_confusion

INPUTS = {"both": ("text", "image"), "question_only": ("text",), "image_only": ("image",)}
LOSSES = ("bce", "ce")


# -- data: the vocabulary, each sample's questions encoded, a batch flattened to questions -------------
def scan(urls: list[str]) -> tuple[Counter, list[str], list[str], int, int]:
    """Over ``urls``: how often each normalised answer is given (once per question), the question and
    answer types (sorted), the questions, and the samples without usable questions."""
    counts: Counter = Counter()
    qtypes, atypes = set(), set()
    questions = skipped = 0
    for entries in iter_qa(urls):
        if entries is None:
            skipped += 1
            continue
        for e in entries:
            counts.update(soft_scores(e["answers"]).keys())
            qtypes.add(e["question_type"])
            atypes.add(e["answer_type"])
            questions += 1
    return counts, sorted(qtypes), sorted(atypes), questions, skipped


def answer_vocabulary(counts: Counter, max_answers: int, min_count: int = 1) -> list[str]:
    """The ``max_answers`` most frequent answers given at least ``min_count`` times (ties by name)."""
    return sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))[
        :max_answers
    ]


class EncodeQuestions:
    """Picklable per-sample encoding (runs in the data-loader workers): each question tokenized, its
    soft target over the vocabulary as ``(index, score)`` pairs, its answers and its type indices."""

    def __init__(self, tokenize, vocabulary: list[str], question_types: list[str], answer_types: list[str]):
        self.tokenize = tokenize
        self.index = {a: i for i, a in enumerate(vocabulary)}
        self.qtypes = {t: i for i, t in enumerate(question_types)}
        self.atypes = {t: i for i, t in enumerate(answer_types)}

    def __call__(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        targets = [
            [(self.index[a], s) for a, s in soft_scores(e["answers"]).items() if a in self.index and s > 0]
            for e in entries
        ]
        return {
            "text": torch.stack([self.tokenize(e["question"]) for e in entries]),
            "targets": targets,
            "answers": [e["answers"] for e in entries],
            "question_type": torch.tensor([self.qtypes.get(e["question_type"], -1) for e in entries]),
            "answer_type": torch.tensor([self.atypes.get(e["answer_type"], -1) for e in entries]),
        }


def flatten(per_sample: list[dict[str, Any]], num_answers: int) -> dict[str, Any]:
    """A batch's per-sample encodings as one row per question: ``text [Q, L]``, ``owner [Q]`` (the
    image row of each), ``target [Q, A]`` soft scores, ``answers`` and type indices."""
    owner = torch.cat([torch.full((len(s["text"]),), i, dtype=torch.long) for i, s in enumerate(per_sample)])
    targets = [t for s in per_sample for t in s["targets"]]
    dense = torch.zeros(len(targets), num_answers)
    for row, pairs in enumerate(targets):
        for j, score in pairs:
            dense[row, j] = score
    return {
        "text": torch.cat([s["text"] for s in per_sample]),
        "owner": owner,
        "target": dense,
        "answers": [a for s in per_sample for a in s["answers"]],
        "question_type": torch.cat([s["question_type"] for s in per_sample]),
        "answer_type": torch.cat([s["answer_type"] for s in per_sample]),
    }


# -- the network ------------------------------------------------------------------------------------
class _QuestionImageFusion(FusionClassifier):
    """``FusionClassifier`` over (question, image) where a batch has fewer images than questions:
    each image's tokens are computed once and repeated for its questions (``batch["owner"]``)."""

    def _tokens(self, batch: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        toks = super()._tokens(batch)
        image, mask = toks["image"]
        toks["image"] = (image[batch["owner"]], mask[batch["owner"]])
        return toks

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.fusion == "late":
            batch = dict(batch, image=batch["image"][batch["owner"]])
        return super().forward(batch)


class _OneInput(nn.Module):
    """A blind baseline: one tower's tokens through a small transformer with a class token (what
    ``fusion=early`` does with both) and the same answer head."""

    def __init__(self, model, modality, num_answers, example, width, layers, heads, freeze_towers):
        super().__init__()
        self.model, self.modality, self.freeze_towers = model, modality, freeze_towers
        was_training = model.training
        model.eval()
        with torch.no_grad():
            dim = tower_tokens(model, modality, example[modality][:1])[0].shape[-1]
        model.train(was_training)
        self.proj = nn.Linear(dim, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_answers)

    def train(self, mode: bool = True) -> _OneInput:
        super().train(mode)
        if self.freeze_towers:
            self.model.eval()
        return self

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_towers):
            tokens, mask = tower_tokens(self.model, self.modality, batch[self.modality])
        if self.modality == "image":
            tokens = tokens[batch["owner"]]
        x = self.proj(tokens)
        b = x.shape[0]
        x = torch.cat([self.cls.expand(b, -1, -1), x], 1)
        pad = torch.zeros(b, x.shape[1], dtype=torch.bool, device=x.device)
        if mask is not None:
            pad[:, 1:] = mask if self.modality == "text" else mask[batch["owner"]]
        return self.head(self.norm(self.encoder(x, src_key_padding_mask=pad)[:, 0]))


class VQANet(nn.Module):
    """Question and/or image tokens -> fusion -> logits over the answer vocabulary ``[Q, A]``."""

    def __init__(
        self, model: ContrastiveModel, task: dict[str, Any], num_answers: int, example: dict[str, Any]
    ):
        super().__init__()
        inputs = task.get("inputs", "both")
        if inputs not in INPUTS:
            raise ValueError(f"task.inputs={inputs} is unknown; use one of {', '.join(INPUTS)}")
        towers = task.get("towers", "locked")
        if towers not in ("locked", "tuned"):
            raise ValueError(
                f"task.towers={towers}: use locked (frozen towers) or tuned (trained at their lr)"
            )
        self.modalities = INPUTS[inputs]
        missing = [m for m in self.modalities if m not in model.towers]
        if missing:
            raise ValueError(
                f"task=vqa needs a {' and a '.join(missing)} tower; "
                f"the pretrained model has {model.modalities}"
            )
        self.locked = towers == "locked"
        model.requires_grad_(False)
        if not self.locked:  # only what the fusion uses trains (DDP needs every trainable one used)
            for m in self.modalities:
                model.towers[m].requires_grad_(True)
                if len(self.modalities) == 2 and task["fusion"] == "late":  # late reads the embeddings
                    model.projections[m].requires_grad_(True)
        sizes = {k: int(task[k]) for k in ("width", "layers", "heads")}
        if len(self.modalities) == 2:
            self.fusion = _QuestionImageFusion(
                model, ["text", "image"], num_answers, task["fusion"], example, query="text",
                freeze_towers=self.locked, **sizes,
            )  # fmt: skip
        else:
            self.fusion = _OneInput(
                model, self.modalities[0], num_answers, example, freeze_towers=self.locked, **sizes
            )
        self.model = model

    def train(self, mode: bool = True) -> VQANet:
        super().train(mode)
        if self.locked:
            self.model.eval()  # locked towers keep dropout off and norm statistics as loaded
        return self

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.fusion(batch)

    def param_groups(
        self, lr: float, tower_lr_scale: dict[str, float], layer_decay: float | None
    ) -> list[dict[str, Any]]:
        """Fusion and head at ``lr``; with tuned towers, tower ``m`` at ``lr * tower_lr_scale[m]``,
        each of its groups (input -> output) further scaled by ``layer_decay ** (distance from the
        top)`` when layer_decay is set (its projection with the top group)."""
        in_model = {id(p) for p in self.model.parameters()}
        groups = [
            {"params": [p for p in self.parameters() if id(p) not in in_model], "lr": lr, "name": "head"}
        ]
        if self.locked:
            return groups
        for m in self.modalities:
            tower = self.model.towers[m]
            parts = tower.param_groups() if layer_decay else [list(tower.parameters())]
            parts[-1] = parts[-1] + list(self.model.projections[m].parameters())
            for i, params in enumerate(parts):
                scale = float(tower_lr_scale[m]) * (
                    layer_decay ** (len(parts) - 1 - i) if layer_decay else 1.0
                )
                trainable = [p for p in params if p.requires_grad]
                if trainable:
                    groups.append({"params": trainable, "lr": lr * scale, "name": f"{m}.{i}"})
        return groups


# -- training and scoring -----------------------------------------------------------------------------
class VQAModule(L.LightningModule):
    """Soft-score BCE (``bce``) or cross-entropy on the normalised scores (``ce``); the VQA accuracy of
    the arg-max answer, per question type and answer type, of each split validated."""

    def __init__(
        self,
        net: VQANet,
        vocabulary: list[str],
        question_types: list[str],
        answer_types: list[str],
        param_groups: list[dict[str, Any]],
        loss: str = "bce",
        rank: bool = False,
        weight_decay: float = 0.0,
        warmup_steps: float = 0.0,
        hparams: dict[str, Any] | None = None,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"task.loss={loss} is unknown; use bce (VQA v2 soft scores) or ce")
        self.net, self.vocabulary = net, list(vocabulary)
        self.question_types, self.answer_types = list(question_types), list(answer_types)
        self.groups, self.loss_name, self.rank = param_groups, loss, rank
        self.weight_decay, self.warmup_steps = weight_decay, warmup_steps
        self.save_hyperparameters(hparams or {}, logger=False)
        self.split = "val"  # the name the next validation's metrics are logged under
        self.results: dict[str, dict[str, Any]] = {}  # split -> scores, predictions, labels, types
        self._val: list[dict[str, torch.Tensor]] = []
        self.scored_at: dict[str, int] = {}  # split -> the global step its latest results are of

    def _questions(self, batch: dict[str, Any]) -> dict[str, Any]:
        flat = flatten(batch["qa"], len(self.vocabulary))
        trim = getattr(self.net.model.towers["text"], "trim_input", None)  # padding columns off (exact)
        if trim is not None and "text" in self.net.modalities:
            flat["text"] = trim(flat["text"])
        out = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in flat.items()}
        if "image" in batch:
            out["image"] = batch["image"]
        return out

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "bce":  # summed over the answers, averaged over the questions (VQA v2 practice)
            return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(target)
        mass = target.sum(1)
        known = mass > 0  # a question none of whose answers is in the vocabulary teaches CE nothing
        if not known.any():
            return logits.sum() * 0.0
        soft = target[known] / mass[known, None]
        return -(soft * F.log_softmax(logits[known], 1)).sum(1).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        q = self._questions(batch)
        if self.rank:  # the decoder's answer likelihood; ranking every answer is for validation
            loss = self.net.loss(q)
            self.log("train/loss", loss, prog_bar=True, batch_size=len(q["target"]))
            return loss
        logits = self.net(q)
        loss = self.loss(logits, q["target"])
        n = len(q["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        hit = q["target"].gather(1, logits.argmax(1, keepdim=True)).mean()  # the soft score of the top answer
        self.log("train/vqa_accuracy", hit, batch_size=n)
        return loss

    def predict_answers(self, logits: torch.Tensor) -> torch.Tensor:
        """Vocabulary indices of the answers given: the arg-max of the classifier's logits, or of the
        answers' likelihoods (rank mode)."""
        return logits.argmax(1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        q = self._questions(batch)
        logits = self.net(q)
        loss = self.net.loss(q) if self.rank else self.loss(logits, q["target"])
        self.log(f"{self.split}/loss", loss, batch_size=len(q["target"]))
        pred = self.predict_answers(logits).cpu()
        scores = torch.tensor(
            [question_accuracy(self.vocabulary[i], a) for i, a in zip(pred.tolist(), q["answers"])],
            dtype=torch.float32,
        )
        top = q["target"].cpu()
        label = torch.where(top.amax(1) > 0, top.argmax(1), torch.full_like(pred, -1))
        self._val.append(
            {
                "score": scores,
                "pred": pred,
                "label": label,
                "question_type": q["question_type"].cpu(),
                "answer_type": q["answer_type"].cpu(),
            }
        )

    def on_validation_epoch_end(self) -> None:
        # every rank gathers, even one that validated no batch (its columns are empty)
        kinds = {"score": torch.float32, "pred": torch.long, "label": torch.long}
        kinds |= {"question_type": torch.long, "answer_type": torch.long}
        local = {
            k: torch.cat([v[k] for v in self._val]) if self._val else torch.zeros(0, dtype=dtype)
            for k, dtype in kinds.items()
        }
        self._val = []
        if distributed.world_size() > 1:
            local = {k: distributed.all_gather_variable(v.to(self.device)).cpu() for k, v in local.items()}
        if not len(local["score"]):
            raise ValueError(f"the {self.split} split has no questions to score")
        self.results[self.split] = local
        if not self.trainer.sanity_checking:
            self.scored_at[self.split] = self.global_step
        for name, value in self.summarise(local).items():
            self.log(f"{self.split}/{name}", value, rank_zero_only=True)

    def summarise(self, r: dict[str, torch.Tensor]) -> dict[str, float]:
        """``vqa_accuracy`` overall, ``/question_type/<t>`` and ``/answer_type/<t>``: mean per-question
        VQA accuracy (the official tool's numbers / 100)."""
        out = {"vqa_accuracy": float(r["score"].double().mean())}
        for key, names in (("question_type", self.question_types), ("answer_type", self.answer_types)):
            for i, name in enumerate(names):
                chosen = r[key] == i
                if chosen.any():
                    out[f"vqa_accuracy/{key}/{name}"] = float(r["score"][chosen].double().mean())
        return out

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, self.groups, self.weight_decay, self.warmup_steps)


# -- the task -----------------------------------------------------------------------------------------
def _preprocess(model: ContrastiveModel, modalities: tuple[str, ...], encode: EncodeQuestions, train: bool):
    prep = model.preprocess(train)
    return {m: prep[m] for m in modalities if m == "image"} | {"qa": encode}


def run_vqa(
    task: dict[str, Any],
    model: ContrastiveModel,
    data: dict[str, Any],
    trainer: dict[str, Any],
    run_dir: Path,
    seed: int = 0,
) -> dict[str, float]:
    """Train and score VQA; writes metrics.json, vqa_results.json, answers.txt and per-type confusion
    plots (``plots/confusion_<split>_<type>.png``) into ``run_dir``."""
    mode = task.get("answer_mode", "classify")
    if mode not in ("classify", "rank"):
        raise ValueError(
            f"task.answer_mode={mode}: use classify (a head over the answers) or rank (the answers "
            "ranked by a caption decoder's likelihood)"
        )
    if task.get("init", "pretrained") == "random":  # the same architecture, fresh weights: the baseline
        model = build_model(weights_free(model.config()))
    elif task.get("init", "pretrained") != "pretrained":
        raise ValueError(f"task.init={task['init']}: use pretrained or random")
    if "text" not in model.towers:
        raise ValueError(f"task=vqa needs a text tower for the questions; the model has {model.modalities}")
    train_urls = [u for s in sources_from_config(data) for u in s.urls]
    counts, qtypes, atypes, n_questions, skipped = scan(train_urls)
    vocabulary = answer_vocabulary(counts, int(task["max_answers"]), int(task.get("min_answer_count", 1)))
    if len(vocabulary) < 2:
        raise ValueError(
            f"the train shards hold {len(vocabulary)} answer(s) in their json 'qa' lists ({n_questions} "
            f"questions, {skipped} samples without): VQA needs questions with answers "
            "(README, 'Visual question answering')"
        )
    covered = sum(counts[a] for a in vocabulary) / max(1, sum(counts.values()))
    print(
        f"vqa: {n_questions} train questions, {len(vocabulary)} answers in the vocabulary "
        f"({covered:.1%} of the answers given), question types {qtypes}"
        + (f"; {skipped} samples without questions" if skipped else "")
    )
    modalities = INPUTS[task.get("inputs", "both")]
    encode = EncodeQuestions(model.preprocess(False)["text"], vocabulary, qtypes, atypes)
    datamodule = ContrastiveDataModule(
        data, lambda train: _preprocess(model, modalities, encode, train), seed=seed
    )
    model.train()
    first = next(
        iter(
            ShardStream(
                [Source("val", datamodule.val_urls)], _preprocess(model, modalities, encode, False), 2, False
            )
        )
    )
    example = {"text": flatten(first["qa"], len(vocabulary))["text"]} | (
        {"image": first["image"]} if "image" in first else {}
    )
    if mode == "rank":
        net = AnswerRanker(model, task, vocabulary, model.preprocess(False)["text"])
    else:
        net = VQANet(model, task, len(vocabulary), example)
    scales = task.get("tower_lr_scale") or {}
    scales = {m: float(scales.get(m, 0.1)) if isinstance(scales, dict) else float(scales) for m in modalities}
    module = VQAModule(
        net,
        vocabulary,
        qtypes,
        atypes,
        net.param_groups(float(task["lr"]), scales, task.get("layer_decay")),
        loss=task.get("loss", "bce"),
        rank=mode == "rank",
        weight_decay=float(task.get("weight_decay", 0.0)),
        warmup_steps=float(task.get("warmup_steps", 0.0)),
        hparams={"model": model.config(), "task": task, "vocabulary": vocabulary},
    )
    module.train()
    splits = {"val": datamodule.val_urls} | test_splits(task.get("test"), data.get("missing_shards", "error"))
    fit = task_trainer(trainer, task, run_dir)
    fit.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in fit.callback_metrics.items() if k.startswith("train/")}
    for name, urls in splits.items():
        if module.scored_at.get(name) == fit.global_step:  # fit's last validation scored these weights
            metrics |= {k: float(v) for k, v in fit.callback_metrics.items() if k.startswith(f"{name}/")}
            continue
        module.split, datamodule.val_urls = name, urls
        (final,) = fit.validate(module, datamodule=datamodule, verbose=False)
        metrics |= {k: float(v) for k, v in final.items()}
    _write_results(run_dir, metrics, module, vocabulary)
    return metrics


def test_splits(patterns: dict[str, str] | None, missing: str) -> dict[str, list[str]]:
    """``task.test`` resolved: ``{name: urls}``; a pattern that matches nothing is said and left out
    (``data=scenes`` has ``test_compositional``, a user's shards usually not)."""
    out = {}
    for name, pattern in (patterns or {}).items():
        try:
            out[name] = expand_shards(pattern, missing=missing) if pattern else []
        except NoShardsError:
            out[name] = []
        if not out[name]:
            print(f"vqa: task.test.{name}: no shards match {pattern}; not scored")
            del out[name]
    return out


def _write_results(
    run_dir: Path, metrics: dict[str, float], module: VQAModule, vocabulary: list[str]
) -> None:
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    write_text_atomic(run_dir / "answers.txt", "\n".join(vocabulary) + "\n")
    report = {}
    for split, r in module.results.items():
        report[split] = {"questions": len(r["score"]), **module.summarise(r), "confusion": {}}
        for i, qtype in enumerate(module.question_types):
            chosen = (r["question_type"] == i) & (r["label"] >= 0)
            if not chosen.any():
                continue
            label, pred = r["label"][chosen], r["pred"][chosen]
            names = sorted(set(label.tolist()) | set(pred.tolist()))
            where = {a: j for j, a in enumerate(names)}
            cm = torch.zeros(len(names), len(names), dtype=torch.long)
            for t, p in zip(label.tolist(), pred.tolist()):
                cm[where[t], where[p]] += 1
            answers = [vocabulary[a] for a in names]
            report[split]["confusion"][qtype] = {"answers": answers, "matrix": cm.tolist()}
            safe = qtype.replace("/", "_")
            acc = module.summarise(r).get(f"vqa_accuracy/question_type/{qtype}", float("nan"))
            plot_confusion(
                cm,
                answers,
                run_dir / "plots" / f"confusion_{split}_{safe}.png",
                title=f"{split} {qtype}: {acc:.3f}",
            )
    write_text_atomic(run_dir / "vqa_results.json", json.dumps(report, indent=1))
