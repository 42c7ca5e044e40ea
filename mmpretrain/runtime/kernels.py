"""What the hardware computes fastest: the precision ``trainer.precision=auto`` becomes, and the SDPA
kernel of the towers' attention in training (``attention_kernel``).

``auto`` precision: ``bf16-mixed`` where the device multiplies bf16 natively (a GPU with bf16; a CPU with
AMX or AVX512-BF16), else ``32-true`` on a CPU and ``16-mixed`` on a GPU. ``auto`` attention: torch's
choice, except under CPU bf16 where every tower attends over at most :data:`SHORT_ATTENTION` tokens:
there torch's math kernel (float32 inside), whose backward is ~2x faster than its flash kernel's at such
lengths (``scripts/bench_attention_cpu.py``; flash is ahead from ~160 tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

#: The longest attention (tokens) for which the math kernel is picked under CPU bf16 autocast.
SHORT_ATTENTION = 150
#: ``attention_kernel`` values besides ``auto`` and ``torch`` (torch's choice): the SDPA backend each names.
BACKENDS = {
    "math": "MATH",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}
KERNELS = ("auto", "torch", *BACKENDS)


def cpu_has_bf16() -> bool:
    """The CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16), as oneDNN uses them."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def on_gpu(trainer: dict[str, Any]) -> bool:
    """The trainer kwargs put the run on a CUDA device."""
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def resolve_precision(trainer: dict[str, Any]) -> dict[str, Any]:
    """``trainer.precision=auto``: ``bf16-mixed`` where the device computes bf16 natively, else ``32-true``
    on a CPU and ``16-mixed`` on a GPU; any other value is Lightning's and passes unchanged."""
    if str(trainer.get("precision")) != "auto":
        return trainer
    if on_gpu(trainer):
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    else:
        precision = "bf16-mixed" if cpu_has_bf16() else "32-true"
    return {**trainer, "precision": precision}


def longest_attention(modules: Iterable[nn.Module]) -> int | None:
    """The most tokens any of ``modules`` attends over, read from its positional tables (open_clip's
    ``positional_embedding``, timm's ``pos_embed``: ``[..., tokens, width]``); None when a module has no
    such table (its attention length is unknown, or it has none)."""
    longest = 0
    for module in modules:
        tables = [
            p.shape[-2]
            for name, p in module.named_parameters()
            if name.rsplit(".", 1)[-1] in ("positional_embedding", "pos_embed") and p.ndim >= 2
        ]
        if not tables:
            return None
        longest = max(longest, *tables)
    return longest or None


def attention_backends(
    choice: str, precision: str, gpu: bool, towers: Iterable[nn.Module]
) -> list[Any] | None:
    """The SDPA backends training runs under (None: torch's choice) for ``attention_kernel=choice``."""
    from torch.nn.attention import SDPBackend

    if choice not in KERNELS:
        raise ValueError(f"attention_kernel must be one of {', '.join(KERNELS)}; got {choice!r}")
    if choice == "torch":
        return None
    if choice != "auto":
        return [getattr(SDPBackend, BACKENDS[choice])]
    if gpu or not str(precision).startswith("bf16"):
        return None
    longest = longest_attention(towers)
    if longest is None or longest > SHORT_ATTENTION:
        return None
    return [SDPBackend.MATH]


def attention_context(backends: list[Any] | None) -> contextlib.AbstractContextManager:
    """A context in which SDPA calls use ``backends`` (their backward follows the forward's choice)."""
    if backends is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backends)
