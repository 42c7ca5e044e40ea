"""Cross-modal retrieval over paired embeddings (row i of ``a`` pairs with row i of ``b``).

Ranks are pessimistic: a gallery item that ties with the true match counts as ranked above it,
and a NaN similarity beats everything. A collapsed model (all embeddings equal) or a diverged one
(NaN embeddings) therefore scores the worst rank, not a perfect R@1.

Memory is O(chunk x N), never O(N x N): similarities are computed a chunk of queries at a time
and reduced at once to what the metrics need per query (the rank of the true match, the class
hits at k, the average precision). With ``across_ranks=True`` (inputs identical on every rank,
e.g. gathered) each rank scores only its share of the queries and the per-query results, small
vectors, are gathered: every rank returns the metrics of the whole set for 1/world of the work.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mmpretrain.runtime import distributed

CHUNK = 1024  # most queries scored at once
MAX_SIMILARITIES = 2**23  # and at most this many similarities (32 MB of float32) per chunk


def _chunk_rows(n_gallery: int, chunk: int | None) -> int:
    return chunk or max(1, min(CHUNK, MAX_SIMILARITIES // max(n_gallery, 1)))


def _query_rows(n: int, across_ranks: bool) -> torch.Tensor:
    rows = distributed.share(n) if across_ranks else slice(0, n)
    return torch.arange(rows.start, rows.stop)


def _gather(x: torch.Tensor, across_ranks: bool) -> torch.Tensor:
    return distributed.all_gather_variable(x) if across_ranks else x


def _ranks(queries: torch.Tensor, gallery: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """1-based pessimistic rank of the true match (same index) of each query in the gallery:
    1 + the number of other gallery items whose similarity is not below the true one's."""
    return _per_query(queries, gallery, torch.arange(queries.shape[0]), chunk=chunk)["ranks"]


def _sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row's values ascending (no NaN); numpy's vectorised sort on CPU (faster there than torch's)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return x.sort(dim=1).values


def _per_query(
    q: torch.Tensor,
    g: torch.Tensor,
    rows: torch.Tensor,
    *,
    ql: torch.Tensor | None = None,
    gl: torch.Tensor | None = None,
    ks: tuple[int, ...] = (),
    chunk: int | None = None,
    paired: bool = True,
    targets: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """For the queries ``rows`` of ``q`` against the gallery ``g``, one similarity chunk at a time:
    ``ranks`` ``[n]`` of the true match (row i of ``g`` when ``paired``) and, with labels, class ``hits``
    ``[n, len(ks)]`` at each k
    and average precision ``ap`` ``[n]``.

    The rank of the true match is 1 + #(other items not scoring below it) = #(items not below it),
    the true match included: N - #(items strictly below), since a NaN compares false.

    Class metrics are exact without sorting whole rankings: in the pessimistic order (descending
    similarity, irrelevant items first among ties, NaN worst for a relevant item and best for an
    irrelevant one) the j-th relevant item (relevant sorted by similarity) has j relevant items at
    or above it and, above those, every irrelevant item scoring at least as high. Its precision is
    ``j / (j + #irrelevant >= its score)``; ties among relevant items share that count, so their
    order does not matter. The gallery is ordered by label and the queries grouped by label, so
    a chunk's relevant items are one block of columns.
    """
    device = q.device
    rows = rows.to(device)
    g = F.normalize(g, dim=-1)
    finite_gallery = bool(g.isfinite().all())  # else some similarities are NaN
    n_gallery, n = g.shape[0], len(rows)
    out = {"ranks": torch.zeros(n, dtype=torch.long, device=device)} if paired else {}
    where = rows if targets is None else targets.to(device)[rows]  # column of each query's true match
    groups: list[tuple[int, int, torch.Tensor]] = [(0, 0, torch.arange(n, device=device))]
    if ql is not None:
        ql, gl = ql.to(device), gl.to(device)
        order = gl.argsort(stable=True)
        g, gl = g[order], gl[order]
        where = torch.empty_like(order)
        where[order] = torch.arange(n_gallery, device=device)
        where = where[rows] if paired else None
        labels = ql[rows]
        groups = []
        for c in labels.unique():
            lo = int((gl < c).sum())  # the block [lo, hi) of the label-ordered gallery is relevant
            groups.append((lo, lo + int((gl == c).sum()), (labels == c).nonzero().squeeze(1)))
        out["hits"] = torch.zeros(n, len(ks), dtype=torch.bool, device=device)
        out["ap"] = torch.zeros(n, dtype=torch.float64, device=device)
    step = _chunk_rows(n_gallery, chunk)
    for lo, hi, positions in groups:
        for pos in positions.split(step):
            queries = F.normalize(q[rows[pos]], dim=-1)
            sims = queries @ g.T
            if paired:
                true = sims[torch.arange(len(pos), device=device), where[pos]].unsqueeze(1)
                below = (sims < true).sum(1, dtype=torch.int32)  # ties and NaN count against the match
                out["ranks"][pos] = n_gallery - below.long()
            if hi > lo:  # no relevant item at all: a miss, AP 0
                nan = not (finite_gallery and bool(queries.isfinite().all()))
                out["hits"][pos], out["ap"][pos] = _class_hits_and_ap(sims, lo, hi, ks, nan)
    return out


def _class_hits_and_ap(
    sims: torch.Tensor, lo: int, hi: int, ks, nan: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hits at each k and AP of rows whose relevant items are the columns ``[lo, hi)``."""
    rel, irr = sims[:, lo:hi], torch.cat([sims[:, :lo], sims[:, hi:]], 1)
    if nan:
        rel, irr = (
            rel.nan_to_num(nan=-torch.inf),
            irr.nan_to_num(nan=torch.inf),
        )  # NaN: worst relevant, best irrelevant
    rel, irr = _sort_rows(rel), _sort_rows(irr)  # ascending; rel column i is the (m - i)-th best relevant
    ahead = irr.shape[1] - torch.searchsorted(irr, rel)  # irrelevant items scoring >= each relevant one
    m = hi - lo
    j = torch.arange(m, 0, -1, device=sims.device, dtype=torch.float64)
    ap = (j / (j + ahead)).sum(1) / m
    hits = (ahead[:, -1:] + 1) <= torch.tensor(
        ks, device=sims.device
    )  # the best relevant item's position <= k
    return hits, ap


def _directional(q, g, ql, gl, ks, chunk, across_ranks, paired=True) -> dict[str, torch.Tensor]:
    """Per-query results of ``q`` against ``g`` for every query (gathered when split)."""
    res = _per_query(
        q, g, _query_rows(q.shape[0], across_ranks), ql=ql, gl=gl, ks=ks, chunk=chunk, paired=paired
    )
    if "hits" in res:
        res["hits"] = res["hits"].to(torch.uint8)
    res = {k: _gather(v, across_ranks) for k, v in res.items()}
    if "hits" in res:
        res["hits"] = res["hits"].bool()
    return res


def multi_caption_retrieval(
    items: torch.Tensor,
    captions: torch.Tensor,
    owner: torch.Tensor,
    item_name: str,
    caption_name: str,
    ks=(1, 5, 10),
    chunk: int | None = None,
    across_ranks: bool = False,
) -> dict[str, float]:
    """The COCO/Flickr protocol: ``items [N, D]`` (images, audio clips) each with one or more
    ``captions [C, D]``; ``owner [C]`` is the item of each caption.

    item->caption: a hit at k when ANY of the item's captions is in the top k, i.e. the rank of its
    best-scoring own caption among all captions, where only other items' captions count against it
    (ties with them and NaN count against the model; an item whose own scores are all NaN ranks last).
    caption->item: every caption is a query against all items, its owner the target (pessimistic
    rank as in :func:`retrieval_metrics`). With one caption per item (``owner = arange(N)``) both
    equal :func:`retrieval_metrics`'s instance ranks. Keyed ``R@k/<item>_to_<caption>`` and back,
    ``mean_rank``/``median_rank``, ``rsum/<item>_<caption>`` (the six R@1/5/10 summed, in percent as
    papers report) and ``mean_R@1/<item>_<caption>`` (the mean of both R@1). Memory O(chunk x C).
    """
    owner = owner.long().to(captions.device)
    out: dict[str, float] = {}
    forward, backward = f"{item_name}_to_{caption_name}", f"{caption_name}_to_{item_name}"
    rows = _query_rows(items.shape[0], across_ranks)
    ranks = {forward: _gather(_best_owned_ranks(items, captions, owner, rows, chunk), across_ranks)}
    back = _per_query(
        captions, items, _query_rows(captions.shape[0], across_ranks), chunk=chunk, targets=owner
    )["ranks"]
    ranks[backward] = _gather(back, across_ranks)
    for direction, r in ranks.items():
        r = r.float()
        for k in ks:
            out[f"R@{k}/{direction}"] = (r <= k).float().mean().item() if len(r) else 0.0
        out[f"mean_rank/{direction}"] = r.mean().item() if len(r) else float("nan")
        out[f"median_rank/{direction}"] = r.median().item() if len(r) else float("nan")
    pair = f"{item_name}_{caption_name}"
    out[f"rsum/{pair}"] = 100 * sum(out[f"R@{k}/{d}"] for k in ks for d in (forward, backward))
    out[f"mean_R@1/{pair}"] = (out[f"R@1/{forward}"] + out[f"R@1/{backward}"]) / 2
    return out


def rows_multi_caption_retrieval(
    items: torch.Tensor,
    first: torch.Tensor,
    extra: torch.Tensor,
    extra_owner: torch.Tensor,
    rows: torch.Tensor,
    item_name: str,
    caption_name: str,
    **kwargs,
) -> dict[str, float]:
    """:func:`multi_caption_retrieval` over the rows ``rows`` (``[N]`` bool) of a val set whose row i
    has the caption ``first[i]`` and the ``extra`` captions owned by i (``extra_owner``)."""
    kept = rows.nonzero().squeeze(1)
    index = torch.full(rows.shape, -1, dtype=torch.long, device=rows.device)
    index[kept] = torch.arange(len(kept), device=rows.device)
    owner = index[extra_owner]
    captions = torch.cat([first[rows], extra[owner >= 0]])
    owner = torch.cat([torch.arange(len(kept), device=rows.device), owner[owner >= 0]])
    return multi_caption_retrieval(items[rows], captions, owner, item_name, caption_name, **kwargs)


def _best_owned_ranks(items, captions, owner, rows, chunk) -> torch.Tensor:
    """1-based pessimistic rank of each item's best own caption: 1 + #(other items' captions not
    scoring below it). A NaN own score is the worst, a NaN other score beats it."""
    device = items.device
    rows = rows.to(device)
    g = F.normalize(captions, dim=-1)
    ranks = torch.zeros(len(rows), dtype=torch.long, device=device)
    for pos in torch.arange(len(rows), device=device).split(_chunk_rows(g.shape[0], chunk)):
        sims = F.normalize(items[rows[pos]], dim=-1) @ g.T
        own = owner[None, :] == rows[pos][:, None]
        best = sims.nan_to_num(nan=-torch.inf).masked_fill(~own, -torch.inf).max(1, keepdim=True).values
        ahead = (~(sims < best) & ~own).sum(1)  # ties and NaN count against the item
        ranks[pos] = 1 + ahead.long()
    return ranks


def _pairs(a, b, a_labels, b_labels, a_name, b_name):
    yield a, b, a_labels, b_labels, f"{a_name}_to_{b_name}"
    yield b, a, b_labels, a_labels, f"{b_name}_to_{a_name}"


def retrieval_metrics(
    a: torch.Tensor,
    b: torch.Tensor,
    a_name: str,
    b_name: str,
    ks=(1, 5, 10),
    a_labels: torch.Tensor | None = None,
    b_labels: torch.Tensor | None = None,
    chunk: int | None = None,
    across_ranks: bool = False,
) -> dict[str, float]:
    """R@k, mean and median rank in both directions, keyed ``R@1/a_to_b`` etc.; with labels also
    the class metrics of :func:`class_retrieval_metrics`."""
    out: dict[str, float] = {}
    labelled = a_labels is not None and b_labels is not None
    for q, g, ql, gl, direction in _pairs(a, b, a_labels, b_labels, a_name, b_name):
        res = _directional(q, g, ql if labelled else None, gl, ks, chunk, across_ranks)
        ranks = res["ranks"].float()
        for k in ks:
            out[f"R@{k}/{direction}"] = (ranks <= k).float().mean().item()
        out[f"mean_rank/{direction}"] = ranks.mean().item()
        out[f"median_rank/{direction}"] = ranks.median().item()
        if labelled:
            out |= _class_summary(res, ks, direction)
    return out


def _class_summary(res: dict[str, torch.Tensor], ks, direction: str) -> dict[str, float]:
    out = {f"class_R@{k}/{direction}": res["hits"][:, i].float().mean().item() for i, k in enumerate(ks)}
    out[f"class_mAP/{direction}"] = res["ap"].mean().item()
    return out


def class_retrieval_metrics(
    a: torch.Tensor,
    b: torch.Tensor,
    a_labels: torch.Tensor,
    b_labels: torch.Tensor,
    a_name: str,
    b_name: str,
    ks=(1, 5, 10),
    chunk: int | None = None,
    across_ranks: bool = False,
) -> dict[str, float]:
    """Retrieval where a gallery item is relevant when it has the query's class.

    For modalities that share classes but no instance pairing (audio of a spoken "seven" and any
    image of a 7): ``R@k`` = fraction of queries with a same-class item in the top k (chance
    ~ the class frequency at k=1), ``mAP`` = mean average precision over all same-class items.
    Ties with irrelevant items count against the model. Keyed ``class_R@1/a_to_b``,
    ``class_mAP/a_to_b`` etc., both directions.
    """
    out: dict[str, float] = {}
    for q, g, ql, gl, direction in _pairs(a, b, a_labels, b_labels, a_name, b_name):
        out |= _class_summary(
            _directional(q, g, ql, gl, ks, chunk, across_ranks, paired=False), ks, direction
        )
    return out


# -- repeated captions ----------------------------------------------------------------------------
#: Above this fraction of val rows sharing their caption with another row (class templates: "a photo
#: of the digit seven."), instance recall mostly measures ties, which count against the model; the
#: plots and the end-of-run summary show class recall instead.
CAPTIONS_REPEAT = 0.5


def caption_keys(tokens: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
    """One int64 per row of token ids ``[n, L]``: equal for equal captions, whatever the number of
    trailing ``pad_id`` columns (batches are trimmed to their longest caption), and different for
    different ones but with a chance of ~2^-32 per pair."""
    x = tokens.long() - (pad_id or 0)  # padding becomes 0, so trailing columns add nothing
    weights = torch.randint(1, 2**32, (x.shape[-1],), generator=torch.Generator().manual_seed(0))
    # |token| < 2^20 and weight < 2^32: each product < 2^52, a sum of up to 2048 of them fits int64
    return (x * weights.to(x.device)).sum(-1)


def repeated_caption_fraction(keys: torch.Tensor) -> float:
    """The fraction of rows whose caption key (:func:`caption_keys`) another row shares; 0.0 for none."""
    if not len(keys):
        return 0.0
    _, inverse, counts = keys.unique(return_inverse=True, return_counts=True)
    return (counts[inverse] > 1).float().mean().item()
