"""Decoding captions from a caption decoder (:mod:`mmpretrain.towers.decoder`): greedy, beam search and
nucleus (top-p) sampling, with the decoder's key/value cache or without it (the whole prefix
recomputed at every step, the reference the cache must equal token for token). No ``transformers``.

Lengths count tokens as open_clip's ``generate`` does: ``max_len`` is the whole sequence, the start
token and the end token included (the end token is forced at the last position); the end token is
not allowed before ``min_len`` caption tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STRATEGIES = ("greedy", "beam", "top_p")


class _Stepper:
    """Next-token logits ``[B, V]`` for the sequences ``ids`` ``[B, T]`` grown one column a call."""

    def __init__(self, decoder, image_tokens: torch.Tensor, text_tower, use_cache: bool):
        self.decoder, self.text_tower, self.use_cache = decoder, text_tower, use_cache
        self.image_tokens = image_tokens
        self.state = decoder.start(image_tokens, text_tower) if use_cache else None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.use_cache:
            return self.decoder.step(self.state, ids[:, self.state.length :], self.text_tower)[:, -1]
        return self.decoder.logits(self.image_tokens, ids, self.text_tower)[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        if self.use_cache:
            self.state.reorder(index)
        self.image_tokens = self.image_tokens.index_select(0, index)


@torch.no_grad()
def generate(
    decoder,
    image_tokens: torch.Tensor,
    text_tower=None,
    strategy: str = "greedy",
    max_len: int | None = None,
    min_len: int = 0,
    num_beams: int = 4,
    top_p: float = 0.9,
    temperature: float = 1.0,
    length_penalty: float = 1.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The caption token ids of each image (start and end tokens left out).

    ``image_tokens`` ``[B, N, C]``: the image tower's tokens (:meth:`Tower.forward_with_tokens`);
    ``text_tower``: the model's, for decoders that read it (open_clip's CoCa). ``max_len``: at most
    the decoder's context length (its default). ``beam``: ``num_beams`` beams, hypotheses ranked by
    summed log-probability / length ** ``length_penalty``. ``top_p``: sampling from the smallest set
    of tokens whose probability reaches ``top_p``, logits divided by ``temperature``, from
    ``generator`` (seeded by the caller for repeatable captions)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    limit = int(decoder.context_length)
    max_len = limit if max_len is None else int(max_len)
    if not 2 <= max_len <= limit:
        raise ValueError(f"max_len={max_len} must be between 2 and the decoder's context length {limit}")
    if min_len >= max_len - 1:
        raise ValueError(f"min_len={min_len} leaves no room for the end token within max_len={max_len}")
    stepper = _Stepper(decoder, image_tokens, text_tower, use_cache)
    if strategy == "beam":
        return _beam(
            stepper, decoder, image_tokens.shape[0], max_len, min_len, int(num_beams), length_penalty
        )
    return _sample(
        stepper, decoder, image_tokens.shape[0], max_len, min_len, strategy, top_p, temperature, generator
    )


def _sample(stepper, decoder, batch, max_len, min_len, strategy, top_p, temperature, generator):
    device = stepper.image_tokens.device
    sot, eot, pad = decoder.sot_id, decoder.eot_id, decoder.pad_id
    ids = torch.full((batch, 1), sot, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for t in range(1, max_len):
        logits = stepper(ids).float()
        if t - 1 < min_len:
            logits[:, eot] = float("-inf")
        if t == max_len - 1:
            token = torch.full((batch,), eot, dtype=torch.long, device=device)
        elif strategy == "greedy":
            token = logits.argmax(-1)
        else:
            token = _nucleus(logits / temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad), token)
        ids = torch.cat([ids, token[:, None]], 1)
        # A row ends at its end token (or, as in open_clip, at a padding id it generated).
        done |= (token == eot) | (token == pad)
        if bool(done.all()):
            break
    return [_caption(row, eot, pad) for row in ids[:, 1:].tolist()]


def _nucleus(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # probability of the tokens ranked above each one
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always stays
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def _beam(stepper, decoder, batch, max_len, min_len, beams, length_penalty):
    device = stepper.image_tokens.device
    sot, eot, pad = decoder.sot_id, decoder.eot_id, decoder.pad_id
    stepper.reorder(torch.arange(batch, device=device).repeat_interleave(beams))
    ids = torch.full((batch * beams, 1), sot, dtype=torch.long, device=device)
    scores = torch.full((batch, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam at the start: the others would repeat it
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    for t in range(1, max_len):
        logp = F.log_softmax(stepper(ids).float(), -1)
        if t - 1 < min_len:
            logp[:, eot] = float("-inf")
        if t == max_len - 1:  # the last position: only the end token
            logp = torch.full_like(logp, float("-inf")).index_fill_(
                1, torch.tensor([eot], device=device), 0.0
            )
        vocab = logp.shape[-1]
        candidates = (scores.reshape(-1, 1) + logp).view(batch, beams * vocab)
        top_scores, top_idx = candidates.topk(2 * beams, dim=1)
        rows, new_tokens, new_scores = [], [], []
        for b in range(batch):
            kept = 0
            for rank, (score, idx) in enumerate(zip(top_scores[b].tolist(), top_idx[b].tolist())):
                beam, token = divmod(idx, vocab)
                row = b * beams + beam
                if score == float("-inf"):
                    break
                if token in (eot, pad):
                    if rank < beams:  # an ending among the best `beams` candidates is a hypothesis
                        _keep_best(finished[b], score / t**length_penalty, ids[row, 1:].tolist(), beams)
                    continue
                rows.append(row)
                new_tokens.append(token)
                new_scores.append(score)
                kept += 1
                if kept == beams:
                    break
            while kept < beams:  # fewer live candidates than beams: dead copies
                rows.append(b * beams)
                new_tokens.append(pad)
                new_scores.append(float("-inf"))
                kept += 1
        live = torch.tensor(new_scores, device=device).view(batch, beams)
        # Done when `beams` hypotheses are in and no live beam can beat the worst of them.
        if all(
            len(f) >= beams and live[b].max().item() / (t + 1) ** length_penalty <= f[-1][0]
            for b, f in enumerate(finished)
        ):
            break
        index = torch.tensor(rows, device=device)
        stepper.reorder(index)
        ids = torch.cat([ids.index_select(0, index), torch.tensor(new_tokens, device=device)[:, None]], 1)
        scores = live
    return [_caption(f[0][1], eot, pad) for f in finished]


def _keep_best(hyps: list[tuple[float, list[int]]], score: float, tokens: list[int], beams: int) -> None:
    """Add a finished hypothesis; keep the best ``beams``, best first."""
    hyps.append((score, tokens))
    hyps.sort(key=lambda h: -h[0])
    del hyps[beams:]


def _caption(tokens: list[int], eot: int, pad: int) -> list[int]:
    out = []
    for token in tokens:
        if token in (eot, pad):
            break
        out.append(token)
    return out
