"""The papers' multi-caption retrieval protocol against a brute-force reference, ties counted
against the model; one caption per item gives exactly the single-caption metrics."""

import math

import pytest
import torch

from mmpretrain.evaluation import multi_caption_retrieval, retrieval_metrics
from tests.conftest import validate_batches
from tests.unit.test_evaluation import cosine


def reference(items, captions, owner, k):
    """(item->caption R@k, caption->item R@k) by the definitions, pessimistic on ties and NaN."""
    sims = cosine(items, captions)
    owner = owner.tolist()
    i2t = []
    for i, row in enumerate(sims):
        own = [s for s, o in zip(row, owner) if o == i and not math.isnan(s)]
        best = max(own) if own else -math.inf
        ahead = sum(1 for s, o in zip(row, owner) if o != i and (math.isnan(s) or s >= best))
        i2t.append(ahead + 1 <= k)
    t2i = []
    for c, row in enumerate(zip(*sims)):
        true = row[owner[c]]
        ahead = sum(
            1 for j, s in enumerate(row) if j != owner[c] and (math.isnan(s) or math.isnan(true) or s >= true)
        )
        t2i.append(ahead + 1 <= k)
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)


def problem(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, d = 9, 4
    owner = torch.cat([torch.arange(n), torch.randint(0, n, (14,), generator=g)])  # 1..several captions each
    if kind == "random":
        return torch.randn(n, d, generator=g), torch.randn(len(owner), d, generator=g), owner
    # one-hot rows: similarities are exactly -1/0/1, so ties are everywhere
    eye = torch.eye(d)
    return (
        eye[torch.randint(0, d, (n,), generator=g)],
        eye[torch.randint(0, d, (len(owner),), generator=g)],
        owner,
    )


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_multi_caption_retrieval_matches_brute_force(kind, chunk):
    items, captions, owner = problem(kind)
    got = multi_caption_retrieval(items, captions, owner, "image", "text", chunk=chunk)
    rsum = 0.0
    for k in (1, 5, 10):
        i2t, t2i = reference(items, captions, owner, k)
        assert got[f"R@{k}/image_to_text"] == pytest.approx(i2t)
        assert got[f"R@{k}/text_to_image"] == pytest.approx(t2i)
        rsum += 100 * (i2t + t2i)
    assert got["rsum/image_text"] == pytest.approx(rsum)
    assert got["mean_R@1/image_text"] == pytest.approx(
        (got["R@1/image_to_text"] + got["R@1/text_to_image"]) / 2
    )


def test_nan_and_collapse_score_the_worst_rank():
    items, captions, owner = problem("random")
    collapsed = multi_caption_retrieval(
        torch.ones_like(items), torch.ones_like(captions), owner, "image", "text"
    )
    assert collapsed["R@1/image_to_text"] == 0.0 and collapsed["R@1/text_to_image"] == 0.0
    broken = items.clone()
    broken[0] = float("nan")
    got = multi_caption_retrieval(broken, captions, owner, "image", "text")
    i2t, t2i = reference(broken, captions, owner, 1)
    assert got["R@1/image_to_text"] == pytest.approx(i2t) and got["R@1/text_to_image"] == pytest.approx(t2i)


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_one_caption_per_item_equals_the_single_caption_metrics(kind):
    items, captions, _ = problem(kind)
    captions = captions[: len(items)]
    got = multi_caption_retrieval(items, captions, torch.arange(len(items)), "image", "text")
    single = retrieval_metrics(items, captions, "image", "text")
    assert {k: v for k, v in got.items() if k in single} == single


def reference_probe(items, captions, negatives, owner, kinds):
    def sims(x, y):
        return cosine(x[None], y[None])[0][0]

    per_kind: dict[int, list[bool]] = {}
    for g, (o, k) in enumerate(zip(owner.tolist(), kinds.tolist())):
        true, neg = sims(items[o], captions[o]), sims(items[o], negatives[g])
        per_kind.setdefault(k, []).append(true > neg)  # NaN and ties fail
    return {k: sum(v) / len(v) for k, v in per_kind.items()}


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_compositional_probe_matches_brute_force(kind):
    from mmpretrain.evaluation import compositional_probe

    items, captions, _ = problem(kind)
    captions = captions[: len(items)]
    g = torch.Generator().manual_seed(5)
    owner = torch.randint(0, len(items), (20,), generator=g)
    negatives = captions[torch.randint(0, len(items), (20,), generator=g)]  # ties with the true caption too
    kinds = torch.randint(0, 3, (20,), generator=g)
    names = ("a", "b", "c")
    got = compositional_probe(items, captions, negatives, owner, kinds, names)
    ref = reference_probe(items, captions, negatives, owner, kinds)
    assert {k: v for k, v in got.items() if k != "mean"} == pytest.approx(
        {names[k]: v for k, v in ref.items()}
    )
    assert got["mean"] == pytest.approx(sum(ref.values()) / len(ref))


def val_batches(sizes, seed=0):
    """Image-text val batches with 1..3 captions per row, hard negatives and a 'color' task label."""
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    image, text = torch.randn(total, 6, generator=g), torch.randn(total, 5, generator=g)
    more_owner = torch.randint(0, total, (2 * total,), generator=g).sort().values
    more = torch.randn(len(more_owner), 5, generator=g)
    neg_owner = torch.randint(0, total, (total,), generator=g).sort().values
    neg = torch.randn(len(neg_owner), 5, generator=g)
    kinds = torch.randint(0, 3, (len(neg_owner),), generator=g)
    color = torch.randint(-1, 3, (total,), generator=g)
    batches, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        mo, no = (
            (more_owner >= start) & (more_owner < start + n),
            (neg_owner >= start) & (neg_owner < start + n),
        )
        batches.append(
            {
                "image": image[rows],
                "text": text[rows],
                "text_more": more[mo],
                "text_more_owner": more_owner[mo] - start,
                "probe_negatives": neg[no],
                "probe_negatives_owner": neg_owner[no] - start,
                "probe_negatives_kind": kinds[no],
                "label/color": color[rows],
            }
        )
        start += n
    whole = {
        "image": image,
        "text": text,
        "more": more,
        "more_owner": more_owner,
        "neg": neg,
        "neg_owner": neg_owner,
        "kinds": kinds,
        "color": color,
    }
    return batches, whole


validate = validate_batches


@pytest.mark.parametrize("item", ["image", "audio"])  # audio: Clotho-style clips with several captions
def test_validation_reports_the_protocol_probe_and_task_zero_shot(item):
    from mmpretrain.data.stream.captions import NEGATIVE_KINDS
    from mmpretrain.evaluation import compositional_probe, zero_shot_accuracy
    from mmpretrain.evaluation.zeroshot import class_embeddings
    from mmpretrain.losses import InfoNCE
    from mmpretrain.model import ContrastiveModel
    from mmpretrain.training.module import ContrastiveModule
    from tests.unit.test_gradcache import DropoutTower

    torch.manual_seed(0)
    model = ContrastiveModel({item: DropoutTower(item, 6), "text": DropoutTower("text", 5)}, 4).eval()
    prompts = {
        name: torch.randn(5, generator=torch.Generator().manual_seed(i))
        for i, name in enumerate(["a red", "a green", "a blue"])
    }
    module = ContrastiveModule(
        model,
        InfoNCE(pairs=[[item, "text"]]),
        optim={},
        zeroshot_tasks={"color": {"classnames": ["red", "green", "blue"], "templates": ["a {}"]}},
    )
    module.val.encode_prompts = lambda ps: model.encode("text", torch.stack([prompts[p] for p in ps]))

    def rename(bs):
        return [{(item if k == "image" else k): v for k, v in b.items()} for b in bs]

    batches, whole = val_batches([5, 3, 6])
    got = validate(module, rename(batches))
    assert validate(module, rename(val_batches([2, 12])[0])) == pytest.approx(
        got
    )  # batch boundaries do not matter
    with torch.no_grad():
        img, txt = model.encode(item, whole["image"]), model.encode("text", whole["text"])
        more, neg = model.encode("text", whole["more"]), model.encode("text", whole["neg"])
        n = len(img)
        ref = multi_caption_retrieval(
            img, torch.cat([txt, more]), torch.cat([torch.arange(n), whole["more_owner"]]), item, "text"
        )
        probe = compositional_probe(img, txt, neg, whole["neg_owner"], whole["kinds"], NEGATIVE_KINDS)
        rows = whole["color"] >= 0
        classes = class_embeddings(["red", "green", "blue"], ["a {}"], module.val.encode_prompts)
        zs = zero_shot_accuracy(img[rows], whole["color"][rows], classes)
    for k in (
        "R@1/image_to_text",
        "R@5/text_to_image",
        "R@10/image_to_text",
        "rsum/image_text",
        "mean_R@1/image_text",
    ):
        k = k.replace("image", item)
        assert got[f"val/retrieval_{k}"] == pytest.approx(ref[k]), k
    prefix = "val/probe/" if item == "image" else f"val/probe/{item}/"
    assert {k.removeprefix(prefix): v for k, v in got.items() if k.startswith(prefix)} == pytest.approx(probe)
    assert got[f"val/zeroshot_top1/color/{item}_text"] == pytest.approx(zs["top1"])
    assert f"val/zeroshot_top1/{item}_text" not in got  # no root classnames: no root zero-shot
