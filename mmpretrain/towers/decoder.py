"""Caption decoders: a text decoder that cross-attends to an image tower's tokens, trained by teacher
forcing (``caption_nll``) and stepped one token at a time with a key/value cache (``start``/``step``).

- :class:`CaptionDecoder` (ours) reads any image tower: its token features (a ViT's patches, a CNN's
  feature map as ``h*w`` tokens, or a tower without tokens' pooled feature as a one-token prefix)
  pass a LayerNorm and a linear map to the decoder width, plus a learned position per token. Its
  own token and position embeddings, then open_clip's ``MultimodalTransformer`` (causal self-attention
  and cross-attention blocks, final LayerNorm, projection to the vocabulary).
- :class:`OpenClipCoCaDecoder` is open_clip's CoCa ``text_decoder``: its input is the text tower's
  unimodal token features (the first half of CoCa's text decoder), so it keeps open_clip's keys.

Both share one cached step (:func:`cached_self_block`, :func:`cached_cross_block`) over open_clip's
``ResidualAttentionBlock``; the uncached reference is the modules' own forward on the whole prefix
(:meth:`logits`). Token ids: ``sot_id`` starts a caption, ``eot_id`` ends it, ``pad_id`` fills after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import MultimodalTransformer
from torch import nn

CAPTION_TARGETS = ("CaptionDecoder", "OpenClipCoCaDecoder")


# -- the cached step over open_clip's ResidualAttentionBlock ---------------------------------------
def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, w = x.shape
    return x.view(b, t, heads, w // heads).transpose(1, 2)  # [B, H, T, d]


def _project(attn: nn.MultiheadAttention, x: torch.Tensor, part: int) -> torch.Tensor:
    """Query (0), key (1) or value (2) projection of ``nn.MultiheadAttention``'s packed in-projection."""
    w = attn.embed_dim
    weight = attn.in_proj_weight[part * w : (part + 1) * w]
    bias = attn.in_proj_bias[part * w : (part + 1) * w] if attn.in_proj_bias is not None else None
    return F.linear(x, weight, bias)


def _attend(attn: nn.MultiheadAttention, q_in: torch.Tensor, k, v, mask) -> torch.Tensor:
    q = _split_heads(_project(attn, q_in, 0), attn.num_heads)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, _, t, _ = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, attn.embed_dim))


def memory_kv(block: nn.Module, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A cross-attention block's keys and values of the image tokens: computed once per image."""
    attn, kv = block.attn, block.ln_1_kv(memory)
    return (
        _split_heads(_project(attn, kv, 1), attn.num_heads),
        _split_heads(_project(attn, kv, 2), attn.num_heads),
    )


def cached_self_block(block: nn.Module, x: torch.Tensor, cache: list[torch.Tensor | None]) -> torch.Tensor:
    """``block(x)`` with causal self-attention for new positions ``x`` ``[B, n, W]`` after the ones whose
    keys/values ``cache`` holds (``[k, v]``, extended in place)."""
    attn = block.attn
    h = block.ln_1(x)
    k = _split_heads(_project(attn, h, 1), attn.num_heads)
    v = _split_heads(_project(attn, h, 2), attn.num_heads)
    if cache[0] is not None:
        k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
    cache[0], cache[1] = k, v
    n, total = x.shape[1], k.shape[2]
    mask = None
    if n > 1:  # new position i (absolute total - n + i) sees keys up to itself
        rows = torch.arange(total - n, total, device=x.device)[:, None]
        mask = torch.arange(total, device=x.device)[None, :] <= rows
    x = x + block.ls_1(_attend(attn, h, k, v, mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def cached_cross_block(
    block: nn.Module, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """``block(x, k_x=memory, v_x=memory)`` with the memory's keys/values precomputed (:func:`memory_kv`)."""
    x = x + block.ls_1(_attend(block.attn, block.ln_1(x), kv[0], kv[1], None))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@dataclass
class DecodeState:
    """What a cached decode carries between steps: per self-attention block ``[k, v]`` (grown each
    step), per cross-attention block the image tokens' ``(k, v)``, and the positions done so far."""

    self_kv: list[list[torch.Tensor | None]] = field(default_factory=list)
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    length: int = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search: the surviving beams), in that order."""
        self.self_kv = [[None if t is None else t.index_select(0, index) for t in kv] for kv in self.self_kv]
        self.cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]


def _decoder_stack(dec: MultimodalTransformer, x, state: DecodeState, offset: int) -> torch.Tensor:
    for i, (block, cross) in enumerate(zip(dec.resblocks, dec.cross_attn)):
        x = cached_self_block(block, x, state.self_kv[offset + i])
        x = cached_cross_block(cross, x, state.cross_kv[i])
    x = dec.ln_final(x)
    return x @ dec.text_projection


def _init_decoder(dec: MultimodalTransformer, width: int, layers: int) -> None:
    """open_clip's CLIP initialisation of the blocks (its ``MultimodalTransformer.init_parameters``
    reads attributes the class does not have, so it cannot be called)."""
    proj_std, attn_std, fc_std = width**-0.5 * (2 * layers) ** -0.5, width**-0.5, (2 * width) ** -0.5
    for block in [*dec.resblocks, *dec.cross_attn]:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(dec.text_projection, std=width**-0.5)


def _hidden(dec: MultimodalTransformer, memory: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dec(memory, x)`` without the vocabulary projection: the blocks (causal self-attention, then
    cross-attention to ``memory``) and the final LayerNorm, as open_clip's forward runs them."""
    from torch.utils.checkpoint import checkpoint

    mask = dec.attn_mask[: x.shape[1], : x.shape[1]]
    for block, cross in zip(dec.resblocks, dec.cross_attn):
        if dec.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, None, None, mask, use_reentrant=False)
            x = checkpoint(cross, x, memory, memory, None, use_reentrant=False)
        else:
            x = block(x, attn_mask=mask)
            x = cross(x, k_x=memory, v_x=memory)
    return dec.ln_final(x)


def _nll(
    dec: MultimodalTransformer, memory: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the summed token cross-entropy of ``labels`` (padding ignored) and the number of tokens
    scored. The vocabulary projection, the bulk of a small decoder's cost, runs only at the scored
    positions (selecting them is one host sync)."""
    hidden = _hidden(dec, memory, x)
    scored = labels.ne(pad_id)
    rows = scored.nonzero(as_tuple=True)[0]
    logits = hidden[scored] @ dec.text_projection
    ce = F.cross_entropy(logits.float(), labels[scored], reduction="none")
    nll = torch.zeros(labels.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
    return nll, scored.sum(1)


class CaptionDecoder(nn.Module):
    """Our decoder (see the module docstring); ``config`` rebuilds it without weights."""

    reads_text_tower = False

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        image_dim: int,
        image_tokens: int,
        width: int = 256,
        heads: int = 4,
        layers: int = 2,
        mlp_ratio: float = 4.0,
        sot_id: int = 49406,
        eot_id: int = 49407,
        pad_id: int = 0,
        source: str = "image",
    ):
        super().__init__()
        self.source = source  # the modality whose tower's tokens it reads (image, or video frames)
        self.config = {
            "_target_": f"{__name__}.CaptionDecoder",
            "vocab_size": int(vocab_size),
            "context_length": int(context_length),
            "image_dim": int(image_dim),
            "image_tokens": int(image_tokens),
            "width": int(width),
            "heads": int(heads),
            "layers": int(layers),
            "mlp_ratio": float(mlp_ratio),
            "sot_id": int(sot_id),
            "eot_id": int(eot_id),
            "pad_id": int(pad_id),
            "source": source,
        }
        self.sot_id, self.eot_id, self.pad_id = int(sot_id), int(eot_id), int(pad_id)
        self.context_length = int(context_length)
        self.image_norm = nn.LayerNorm(image_dim)
        self.image_proj = nn.Linear(image_dim, width)
        self.image_pos = nn.Parameter(torch.zeros(image_tokens, width))
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.text_decoder = MultimodalTransformer(
            width=width,
            layers=layers,
            heads=heads,
            context_length=context_length,
            mlp_ratio=mlp_ratio,
            output_dim=vocab_size,
        )
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        _init_decoder(self.text_decoder, width, layers)

    def memory(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """The image tower's tokens ``[B, N, image_dim]`` as the decoder's cross-attention memory."""
        if image_tokens.shape[1] != self.image_pos.shape[0]:
            raise ValueError(
                f"the image tower gave {image_tokens.shape[1]} tokens; this decoder was built for "
                f"{self.image_pos.shape[0]} (another input size than the tower's own?)"
            )
        return self.image_proj(self.image_norm(image_tokens)) + self.image_pos

    def embed(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self.token_embedding(ids) + self.positional_embedding[offset : offset + ids.shape[1]]

    def logits(self, image_tokens: torch.Tensor, ids: torch.Tensor, text_tower=None) -> torch.Tensor:
        """Next-token logits ``[B, T, V]`` at every position of ``ids`` (no cache: the reference)."""
        return self.text_decoder(self.memory(image_tokens), self.embed(ids))

    def caption_nll(
        self, image_tokens, text, text_tokens=None, labels=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing on captions ``text`` ``[B, L]``: per sample summed NLL and token count.
        ``labels`` ``[B, L-1]`` (default ``text[:, 1:]``) scores other targets; padding ids are not
        scored (a question prefix whose answer alone is scored)."""
        labels = text[:, 1:] if labels is None else labels
        return _nll(
            self.text_decoder, self.memory(image_tokens), self.embed(text[:, :-1]), labels, self.pad_id
        )

    def next_token_logits(self, image_tokens, ids, lengths, text_tower=None) -> torch.Tensor:
        """Logits ``[B, V]`` of the token after the first ``lengths[b]`` tokens of each row of ``ids``
        (teacher forcing; the vocabulary projection at that position only)."""
        hidden = _hidden(self.text_decoder, self.memory(image_tokens), self.embed(ids))
        return (
            hidden[torch.arange(len(ids), device=ids.device), lengths - 1] @ self.text_decoder.text_projection
        )

    def start(self, image_tokens: torch.Tensor, text_tower=None) -> DecodeState:
        memory = self.memory(image_tokens)
        dec = self.text_decoder
        return DecodeState(
            self_kv=[[None, None] for _ in dec.resblocks],
            cross_kv=[memory_kv(block, memory) for block in dec.cross_attn],
        )

    def step(self, state: DecodeState, ids: torch.Tensor, text_tower=None) -> torch.Tensor:
        """Logits ``[B, n, V]`` for new tokens ``ids`` ``[B, n]`` after the ``state.length`` cached ones."""
        x = self.embed(ids, state.length)
        state.length += ids.shape[1]
        return _decoder_stack(self.text_decoder, x, state, 0)


class OpenClipCoCaDecoder(nn.Module):
    """open_clip's CoCa ``text_decoder`` (``multimodal_cfg``), fed by the text tower's unimodal tokens.

    ``text_tower`` (an :class:`~mmpretrain.towers.open_clip.OpenClipTower`, the model's) is passed to
    each call, never owned: its weights stay under the text tower, as in open_clip's CoCa.
    """

    reads_text_tower = True
    source = "image"

    def __init__(
        self,
        multimodal_cfg: dict[str, Any],
        embed_dim: int,
        quick_gelu: bool = False,
        sot_id: int = 49406,
        eot_id: int = 49407,
        pad_id: int = 0,
    ):
        super().__init__()
        from open_clip.coca_model import _build_text_decoder_tower

        self.config = {
            "_target_": f"{__name__}.OpenClipCoCaDecoder",
            "multimodal_cfg": dict(multimodal_cfg),
            "embed_dim": int(embed_dim),
            "quick_gelu": bool(quick_gelu),
            "sot_id": int(sot_id),
            "eot_id": int(eot_id),
            "pad_id": int(pad_id),
        }
        self.sot_id, self.eot_id, self.pad_id = int(sot_id), int(eot_id), int(pad_id)
        vocab = int(multimodal_cfg.get("vocab_size", 49408))
        # As open_clip's CoCa builds it: the decoder's output dim is the vocabulary.
        self.text_decoder = _build_text_decoder_tower(vocab, dict(multimodal_cfg), quick_gelu)
        # open_clip leaves the decoder's projection uninitialised (torch.empty); initialise as ours.
        _init_decoder(self.text_decoder, self.text_decoder.width, len(self.text_decoder.resblocks))
        self.context_length = int(self.text_decoder.context_length)

    def load_open_clip_checkpoint(self, path: str) -> None:
        """The ``text_decoder.*`` tensors of an open_clip CoCa checkpoint (any layout open_clip saves)."""
        from mmpretrain.interop.open_clip import read_open_clip_state_dict

        prefix = "text_decoder."
        state = {k: v for k, v in read_open_clip_state_dict(path).items() if k.startswith(prefix)}
        if not state:
            raise ValueError(
                f"{path} holds no CoCa text decoder ('{prefix}*' tensors); is it a CoCa checkpoint?"
            )
        self.load_state_dict(state, strict=True)

    def logits(self, image_tokens, ids, text_tower) -> torch.Tensor:
        _, tokens = text_tower.forward_with_tokens(ids)
        return self.text_decoder(image_tokens, tokens)

    def caption_nll(self, image_tokens, text, text_tokens, labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """open_clip's CoCa teacher forcing: the text tower's tokens of the whole caption, but the last,
        predict the caption shifted by one (or ``labels``, as :meth:`CaptionDecoder.caption_nll`)."""
        labels = text[:, 1:] if labels is None else labels
        return _nll(self.text_decoder, image_tokens, text_tokens[:, :-1], labels, self.pad_id)

    def next_token_logits(self, image_tokens, ids, lengths, text_tower) -> torch.Tensor:
        """As :meth:`CaptionDecoder.next_token_logits`, through the text tower's tokens."""
        _, tokens = text_tower.forward_with_tokens(ids)
        hidden = _hidden(self.text_decoder, image_tokens, tokens)
        return (
            hidden[torch.arange(len(ids), device=ids.device), lengths - 1] @ self.text_decoder.text_projection
        )

    def start(self, image_tokens: torch.Tensor, text_tower) -> DecodeState:
        n_text = len(text_tower.encoder.transformer.resblocks)
        dec = self.text_decoder
        return DecodeState(
            self_kv=[[None, None] for _ in range(n_text + len(dec.resblocks))],
            cross_kv=[memory_kv(block, image_tokens) for block in dec.cross_attn],
        )

    def step(self, state: DecodeState, ids: torch.Tensor, text_tower) -> torch.Tensor:
        enc = text_tower.encoder  # open_clip's TextTransformer: causal blocks, then (CoCa) no ln_final
        x = enc.token_embedding(ids) + enc.positional_embedding[state.length : state.length + ids.shape[1]]
        blocks = enc.transformer.resblocks
        for i, block in enumerate(blocks):
            x = cached_self_block(block, x, state.self_kv[i])
        if enc.cls_emb is None:  # a text tower without CoCa's class token applies ln_final to its tokens
            x = enc.ln_final(x)
        state.length += ids.shape[1]
        return _decoder_stack(self.text_decoder, x, state, len(blocks))


def build_decoder(cfg: dict[str, Any] | None, towers: dict[str, nn.Module]) -> nn.Module | None:
    """The model's caption decoder from ``model.decoder`` (None: no decoder).

    A config with ``_target_`` (a saved model) rebuilds as it says; otherwise open_clip's CoCa decoder
    when the image tower's open_clip config has a ``multimodal_cfg``, else :class:`CaptionDecoder` sized
    by ``cfg`` (``width``, ``heads``, ``layers``, ``mlp_ratio``) with the vocabulary, context and special
    tokens of the text tower's tokenizer and the image tower's token shape (probed once)."""
    if cfg is None:
        return None
    source = "image" if "image" in towers else "video"
    image, text = towers.get(source), towers.get("text")
    model_cfg = getattr(image, "model_cfg", None) or {}
    cfg = dict(cfg)
    target = str(cfg.pop("_target_", ""))
    if target:
        name = target.rsplit(".", 1)[-1]
        if name not in CAPTION_TARGETS or not target.startswith(__name__):
            raise ValueError(f"model.decoder._target_={target} is not a caption decoder of {__name__}")
        return globals()[name](**cfg)
    if image is None or text is None:
        raise ValueError(
            "a caption decoder needs an image (or video) and a text tower (its tokenizer); the model has "
            f"{sorted(towers)}"
        )
    special = tokenizer_ids(text)
    vocab, context = special.pop("vocab_size"), special.pop("context_length")
    if "multimodal_cfg" in model_cfg:
        return OpenClipCoCaDecoder(
            model_cfg["multimodal_cfg"], model_cfg["embed_dim"], model_cfg.get("quick_gelu", False), **special
        )
    dim, count = probe_tokens(image)
    sizes = {k: cfg[k] for k in ("width", "heads", "layers", "mlp_ratio") if cfg.get(k) is not None}
    return CaptionDecoder(vocab, context, dim, count, **sizes, **special, source=source)


def tokenizer_ids(text_tower: nn.Module) -> dict[str, int]:
    """The text tower's tokenizer: vocabulary size, context length, start/end/padding ids."""
    tokenizer = getattr(text_tower.preprocess(False), "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "sot_token_id"):
        raise ValueError(
            "a caption decoder needs the text tower's tokenizer to have start and end tokens "
            "(open_clip's SimpleTokenizer); this text tower's has none"
        )
    part = getattr(text_tower, "model_cfg", {}).get("text_cfg", {})
    return {
        "vocab_size": int(part.get("vocab_size") or tokenizer.vocab_size),
        "context_length": int(tokenizer.context_length),
        "sot_id": int(tokenizer.sot_token_id),
        "eot_id": int(tokenizer.eot_token_id),
        "pad_id": int(getattr(text_tower, "pad_id", None) or 0),
    }


@torch.no_grad()
def probe_tokens(tower: nn.Module) -> tuple[int, int]:
    """``(token width, token count)`` of an image tower's :meth:`forward_with_tokens` on one blank input
    of its own size (eval mode; the tower's mode is restored)."""
    size = tower_input_size(tower)
    was = tower.training
    tower.eval()
    try:
        _, tokens = tower.forward_with_tokens(torch.zeros(1, *size, dtype=torch.uint8))
    finally:
        tower.train(was)
    return int(tokens.shape[-1]), int(tokens.shape[1])


def tower_input_size(tower: nn.Module) -> tuple[int, ...]:
    """The ``[C, H, W]`` (video: ``[T, C, H, W]``) input a tower's eval preprocessing gives."""
    from PIL import Image

    frames = getattr(tower, "num_frames", None)
    if frames:  # a video tower: its frame tower's size, T frames
        frame = tuple(tower.frame.preprocess(False)(Image.new("RGB", (64, 64))).shape)
        return (int(frames), *frame)
    return tuple(tower.preprocess(False)(Image.new("RGB", (64, 64))).shape)
