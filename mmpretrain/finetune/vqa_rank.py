"""``task=vqa task.answer_mode=rank``: answers ranked by a caption decoder's likelihood.

BLIP's "rank" inference with the question as the decoder's prefix (as GIT and PaLI ask a captioner a
question): the decoder reads the image tower's tokens and the sequence ``<start> question answer
<end>``; training scores only the answer and its end token (each of a question's answers weighted by
its VQA soft score, BLIP's answer weights), and a question's answer is the candidate whose tokens the
decoder finds most likely (summed log-probability). With more answers than ``task.rank_k`` the
candidates are the ``rank_k`` whose first token is likeliest after the question (BLIP's pre-selection);
otherwise every answer of the vocabulary is scored, exactly.

The decoder is the pretrained model's (``loss=coca``, a ``task=caption`` export) or, for a model
without one or with ``task.new_decoder=true``, a new one sized by ``task.decoder``. Locked towers stay
frozen as for classification; open_clip's CoCa decoder reads the text tower's tokens, so that tower
trains with it, as in ``task=caption``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmpretrain.model import ContrastiveModel
from mmpretrain.towers.decoder import build_decoder


def _strip(row: torch.Tensor, sot: int, eot: int) -> list[int]:
    """A tokenized text's ids between its start and end tokens."""
    ids = row.tolist()
    start = 1 if ids and ids[0] == sot else 0
    end = ids.index(eot) if eot in ids else len(ids)
    return ids[start:end]


class AnswerRanker(nn.Module):
    """Image + question -> a score per vocabulary answer ``[Q, A]`` (the answer's log-likelihood under
    the decoder; ``-inf`` for answers not among a question's candidates); :meth:`loss` trains it."""

    def __init__(self, model: ContrastiveModel, task: dict[str, Any], vocabulary: list[str], tokenize):
        super().__init__()
        if task.get("inputs", "both") != "both":
            raise ValueError(
                f"task.answer_mode=rank reads the image and the question; task.inputs={task['inputs']} "
                "is a baseline of answer_mode=classify"
            )
        if "image" not in model.towers or "text" not in model.towers:
            raise ValueError(
                f"task.answer_mode=rank needs an image and a text tower; the model has {model.modalities}"
            )
        if model.decoder is None or task.get("new_decoder"):
            model.decoder = build_decoder(dict(task.get("decoder") or {}), dict(model.towers))
        if model.decoder.source != "image":
            raise ValueError("task.answer_mode=rank needs a decoder that reads an image tower")
        towers = task.get("towers", "locked")
        if towers not in ("locked", "tuned"):
            raise ValueError(
                f"task.towers={towers}: use locked (frozen towers) or tuned (trained at their lr)"
            )
        self.locked = towers == "locked"
        self.model, self.rank_k = model, int(task.get("rank_k", 128))
        self.rank_batch = int(task.get("rank_batch", 1024))
        decoder = model.decoder
        self.sot, self.eot, self.pad = decoder.sot_id, decoder.eot_id, decoder.pad_id
        tokenizer = getattr(tokenize, "tokenizer", None)  # the text tower reads what the decoder reads
        self.context_length = min(
            int(decoder.context_length), int(getattr(tokenizer, "context_length", 10**9))
        )
        answers = [_strip(tokenize(a), self.sot, self.eot) for a in vocabulary]
        empty = [a for a, ids in zip(vocabulary, answers) if not ids]
        if empty:
            raise ValueError(f"answers {empty[:5]} tokenize to nothing; the rank mode cannot score them")
        width = max(map(len, answers))
        ids = torch.full((len(answers), width), self.pad, dtype=torch.long)
        for i, a in enumerate(answers):
            ids[i, : len(a)] = torch.tensor(a)
        self.register_buffer("answer_ids", ids, persistent=False)
        self.register_buffer("answer_len", torch.tensor([len(a) for a in answers]), persistent=False)
        if width + 2 > self.context_length:
            raise ValueError(
                f"the answer {vocabulary[int(self.answer_len.argmax())]!r} is {width} tokens; with the start "
                f"and end tokens it does not fit the decoder's context of {self.context_length}"
            )
        model.requires_grad_(False)
        decoder.requires_grad_(True)
        if decoder.reads_text_tower:  # open_clip's CoCa: the text tower is the decoder's first half
            model.towers["text"].requires_grad_(True)
        if not self.locked:
            model.towers["image"].requires_grad_(True)
        self.modalities = ("text", "image")

    def train(self, mode: bool = True) -> AnswerRanker:
        super().train(mode)
        self.model.eval()
        self.model.decoder.train(mode)
        if self.model.decoder.reads_text_tower:
            self.model.towers["text"].train(mode)
        if not self.locked:
            self.model.towers["image"].train(mode)
        return self

    def param_groups(
        self, lr: float, tower_lr_scale: dict[str, float], layer_decay: float | None
    ) -> list[dict[str, Any]]:
        """The decoder (and a CoCa decoder's text tower) at ``lr``; a tuned image tower at
        ``lr * tower_lr_scale['image']``, each of its groups further by ``layer_decay`` as classification
        does."""
        decoder = list(self.model.decoder.parameters())
        if self.model.decoder.reads_text_tower:
            decoder += list(self.model.towers["text"].parameters())
        groups = [{"params": decoder, "lr": lr, "name": "decoder"}]
        if not self.locked:
            tower = self.model.towers["image"]
            parts = tower.param_groups() if layer_decay else [list(tower.parameters())]
            for i, params in enumerate(parts):
                scale = float(tower_lr_scale.get("image", 0.1)) * (
                    layer_decay ** (len(parts) - 1 - i) if layer_decay else 1.0
                )
                groups.append(
                    {"params": [p for p in params if p.requires_grad], "lr": lr * scale, "name": f"image.{i}"}
                )
        return groups

    # -- sequences -------------------------------------------------------------------------------------
    def prefix_lengths(self, questions: torch.Tensor) -> torch.Tensor:
        """Per question the tokens before its answer: ``<start>`` and the question, cut at its end where
        the longest answer would not fit the decoder's context (as the tokenizer cuts a long question),
        so every answer follows the same prefix."""
        qlen = questions.ne(self.eot).long().cumprod(1).sum(1)
        return qlen.clamp(max=self.context_length - 1 - int(self.answer_len.max()))

    def sequences(
        self, questions: torch.Tensor, answers: torch.Tensor, skip_first: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``<start> question answer <end>`` per row of ``questions`` ``[P, L]`` (tokenized with start and
        end) and answer index ``answers`` ``[P]``, right-padded; the labels ``[P, T-1]`` score the answer
        and the end token only (``skip_first``: not the answer's first token either, which every answer
        of a question predicts from the same prefix: :meth:`first_token_logp`)."""
        device = questions.device
        ans, alen = self.answer_ids[answers], self.answer_len[answers]
        qlen = self.prefix_lengths(questions)
        total = qlen + alen + 1
        width = int(total.max())
        j = torch.arange(width, device=device)[None]
        q_part = questions.gather(1, j.clamp(max=questions.shape[1] - 1).expand(len(qlen), -1))
        a_part = ans.gather(1, (j - qlen[:, None]).clamp(0, ans.shape[1] - 1))
        ids = torch.where(j < qlen[:, None], q_part, a_part)
        ids = torch.where(j == total[:, None] - 1, torch.full_like(ids, self.eot), ids)
        ids = torch.where(j >= total[:, None], torch.full_like(ids, self.pad), ids)
        labels = ids[:, 1:].clone()
        context = j[:, 1:] <= qlen[:, None] if skip_first else j[:, 1:] < qlen[:, None]
        labels[context] = self.pad  # the question is context, not a target
        return ids, labels

    def _image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.locked):
            return self.model.towers["image"].forward_with_tokens(image)[1]

    def _nll(self, image_tokens: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        decoder, text_tokens = self.model.decoder, None
        if decoder.reads_text_tower:
            text_tokens = self.model.towers["text"].forward_with_tokens(ids)[1]
        return decoder.caption_nll(image_tokens, ids, text_tokens, labels=labels)[0]

    # -- training and ranking --------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Summed answer NLL of every (question, answer) with a positive soft score, weighted by the
        score, averaged over the questions."""
        target = batch["target"]
        rows, answers = target.nonzero(as_tuple=True)
        if not len(rows):
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        tokens = self._image_tokens(batch["image"])[batch["owner"][rows]]
        nll = self._nll(tokens, *self.sequences(batch["text"][rows], answers))
        return (target[rows, answers] * nll).sum() / len(target)

    @torch.no_grad()
    def first_token_logp(self, tokens: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        """``[Q, A]``: the log-probability of each answer's first token after each question (one
        projection onto the vocabulary per question, shared by all of its answers)."""
        qlen = self.prefix_lengths(questions)
        first, out = self.answer_ids[:, 0], []
        step = max(1, self.rank_batch // 4)  # [step, vocabulary] logits at a time
        for s in range(0, len(questions), step):
            q, n = questions[s : s + step], qlen[s : s + step]
            logits = self.model.decoder.next_token_logits(
                tokens[s : s + step], q[:, : int(n.max())], n, self.model.towers["text"]
            )
            out.append(logits.float().log_softmax(-1)[:, first])
        return torch.cat(out)

    def candidates(self, first_logp: torch.Tensor) -> torch.Tensor:
        """``[Q, k]`` answer indices per question: every answer, or the ``rank_k`` whose first token is
        likeliest after the question."""
        n_answers = first_logp.shape[1]
        if n_answers <= self.rank_k:
            return torch.arange(n_answers, device=first_logp.device).expand(len(first_logp), -1)
        return first_logp.topk(self.rank_k, dim=1).indices

    @torch.no_grad()
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        questions = batch["text"]
        tokens = self._image_tokens(batch["image"])[batch["owner"]]
        first = self.first_token_logp(tokens, questions)
        cand = self.candidates(first)
        k = cand.shape[1]
        scores = torch.full((len(questions), len(self.answer_ids)), float("-inf"), device=questions.device)
        per = max(1, self.rank_batch // k)  # questions per chunk: rank_batch sequences at most
        for s in range(0, len(questions), per):
            c = cand[s : s + per]
            n = len(c)
            rows = torch.arange(s, s + n, device=questions.device).repeat_interleave(k)
            rest = self._nll(tokens[rows], *self.sequences(questions[rows], c.reshape(-1), skip_first=True))
            scores[s : s + n] = scores[s : s + n].scatter(
                1, c, first[s : s + n].gather(1, c) - rest.view(n, k).float()
            )
        return scores
