"""task=vqa answer_mode=rank: the sequences a question and an answer make, scores that are the
answer's log-likelihood under the decoder (checked against the decoder's full forward, both decoder
kinds), the first-token pre-selection, and that training on the answers makes the image decide."""

import pytest
import torch

from mmpretrain.finetune.vqa_rank import AnswerRanker
from tests.unit.test_coca import open_clip_coca, ours

VOCABULARY = ["red", "blue", "five-sided shape", "no", "yes"]
TASK = {"inputs": "both", "towers": "locked", "rank_k": 128, "rank_batch": 7}


def _batch(model, questions=("what colour is it?", "what colour is it?", "is there a red square?")):
    tokenize = model.towers["text"].preprocess(False)
    text = model.towers["text"].trim_input(torch.stack([tokenize(q) for q in questions]))
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return {"image": images, "text": text, "owner": torch.tensor([0, 1, 1][: len(questions)])}


def test_a_sequence_is_start_question_answer_end_and_only_the_answer_is_scored():
    model = ours()
    ranker = AnswerRanker(model, TASK, VOCABULARY, model.preprocess(False)["text"])
    tok = model.preprocess(False)["text"].tokenizer
    batch = _batch(model)
    ids, labels = ranker.sequences(batch["text"][[0, 2]], torch.tensor([2, 4]))
    sot, eot = tok.sot_token_id, tok.eot_token_id
    for row, (q, a) in enumerate(
        [("what colour is it?", "five-sided shape"), ("is there a red square?", "yes")]
    ):
        want = [sot, *tok.encode(q), *tok.encode(a), eot]
        assert ids[row, : len(want)].tolist() == want
        assert (ids[row, len(want) :] == ranker.pad).all()
        scored = labels[row][labels[row] != ranker.pad].tolist()
        assert scored == [*tok.encode(a), eot]  # the question is context only


@pytest.mark.parametrize("make", [ours, open_clip_coca], ids=["ours", "open_clip_coca"])
def test_scores_are_each_answers_log_likelihood_from_the_full_forward(make):
    model = make().eval()
    ranker = AnswerRanker(model, TASK, VOCABULARY, model.preprocess(False)["text"]).eval()
    batch = _batch(model)
    scores = ranker(batch)
    assert scores.shape == (3, len(VOCABULARY)) and torch.isfinite(scores).all()
    tokens = model.towers["image"].forward_with_tokens(batch["image"])[1]
    for q in range(3):
        for a in range(len(VOCABULARY)):
            ids, labels = ranker.sequences(batch["text"][q : q + 1], torch.tensor([a]))
            with torch.no_grad():
                logp = model.decoder.logits(
                    tokens[batch["owner"][q : q + 1]], ids[:, :-1], model.towers["text"]
                )
            logp = logp.float().log_softmax(-1)[0]
            keep = labels[0] != ranker.pad
            want = logp[keep].gather(1, labels[0][keep, None]).sum()
            assert scores[q, a].item() == pytest.approx(want.item(), abs=1e-4)


def test_more_answers_than_rank_k_scores_the_likeliest_first_tokens_only():
    model = ours().eval()
    full = AnswerRanker(model, TASK, VOCABULARY, model.preprocess(False)["text"]).eval()
    top = AnswerRanker(model, TASK | {"rank_k": 2}, VOCABULARY, model.preprocess(False)["text"]).eval()
    batch = _batch(model)
    all_scores, some = full(batch), top(batch)
    assert (torch.isfinite(some).sum(1) == 2).all()
    kept = torch.isfinite(some)
    assert torch.allclose(some[kept], all_scores[kept], atol=1e-5)  # same likelihoods where scored
    tokens = model.towers["image"].forward_with_tokens(batch["image"])[1][batch["owner"]]
    cand = top.candidates(top.first_token_logp(tokens, batch["text"]))
    assert torch.equal(kept, torch.zeros_like(kept).scatter(1, cand, True))


def test_training_on_the_answers_makes_the_image_decide():
    """Frozen random towers, a red and a blue image, one question: the trained decoder answers each
    image's colour, which a question-only guess could not."""
    model = ours()
    ranker = AnswerRanker(model, TASK, VOCABULARY, model.preprocess(False)["text"])
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    images[0, 0], images[1, 2] = 255, 255
    batch = _batch(model, ("what colour is it?", "what colour is it?"))
    batch |= {"image": images, "owner": torch.tensor([0, 1]), "target": torch.eye(5)[[0, 1]]}
    groups = ranker.param_groups(1e-2, {"image": 0.1}, None)
    assert sum(len(g["params"]) for g in groups) == len(list(model.decoder.parameters()))
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    ranker.train()
    first = ranker.loss(batch).item()
    for _ in range(25):
        opt.zero_grad()
        loss = ranker.loss(batch)
        loss.backward()
        opt.step()
    assert loss.item() < first / 4
    ranker.eval()
    assert ranker(batch).argmax(1).tolist() == [0, 1]


def test_rank_mode_refuses_the_blind_baselines():
    model = ours()
    with pytest.raises(ValueError, match="inputs=question_only"):
        AnswerRanker(model, TASK | {"inputs": "question_only"}, VOCABULARY, model.preprocess(False)["text"])


@pytest.mark.parametrize("make", [ours, open_clip_coca], ids=["ours", "open_clip_coca"])
def test_a_question_too_long_for_the_context_is_cut_and_its_answer_kept(make):
    model = make().eval()
    ranker = AnswerRanker(model, TASK, VOCABULARY, model.preprocess(False)["text"]).eval()
    long = "is the small red five-sided shape on the far left above the big blue circle and the green star?"
    batch = _batch(model, ("what colour is it?", long))
    ids, labels = ranker.sequences(batch["text"][[1]], torch.tensor([2]))
    tok = model.preprocess(False)["text"].tokenizer
    answer = [*tok.encode("five-sided shape"), tok.eot_token_id]
    assert ids.shape[1] == ranker.context_length == 16  # the tiny models read 16 tokens
    assert ids[0, -len(answer) :].tolist() == answer and labels[0][labels[0] != ranker.pad].tolist() == answer
    assert torch.isfinite(ranker(batch)).all()
