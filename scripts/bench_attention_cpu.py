"""The CPU attention kernels under bf16 autocast, and what they do to experiment=scenes_clip's step.

Part 1, the kernel: forward + backward of ``F.scaled_dot_product_attention`` (batch x heads x tokens x 64)
at several sequence lengths, torch's flash kernel vs its math kernel, fp32 and bf16 inputs; the ratio
flash / math under bf16 is what ``attention_kernel=auto`` decides on (runtime/kernels.py, the math kernel
up to ``SHORT_ATTENTION`` tokens).

Part 2, the step: forward + loss + backward + AdamW step of experiment=scenes_clip's model (built by our
own code from the config, ViT 4x192 patch 8 at 64 px + text transformer 4x192) on one fixed batch of 128
(3x64x64 images, 32 text tokens): fp32 (torch's kernels), bf16-mixed with torch's kernels, bf16-mixed with
the math kernel (what ``trainer.precision=auto`` + ``attention_kernel=auto`` give on a bf16 CPU). No data
loading: the model's cost alone; the whole-run figures are section 6 of RESULTS (bench_scenes_tta.py).

Variants run interleaved, round-robin; medians, ratios against a reference measured in the same rounds.

    python scripts/bench_attention_cpu.py       # both parts -> benchmarks/results/attention_cpu.*
    python scripts/bench_attention_cpu.py --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import bench_common as bc  # noqa: E402

# (batch, heads, tokens, causal): scenes' image (65) and text (32) towers, ViT-B/16 at 128 px (65),
# 77-token CLIP text, ViT-S/16 at 192 px (145), and ViT-B/16 at 224 px (197).
SHAPES = [
    (128, 3, 65, False),
    (128, 3, 32, True),
    (32, 12, 77, True),
    (64, 6, 145, False),
    (64, 12, 197, False),
]


def _kernel_ms(b: int, h: int, n: int, causal: bool, dtype: torch.dtype, backend) -> float:
    from torch.nn.attention import sdpa_kernel

    q, k, v = (torch.randn(b, h, n, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    with sdpa_kernel([backend]):
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
    return 1000 * (time.perf_counter() - start)


def kernels(rounds: int) -> list[dict]:
    from torch.nn.attention import SDPBackend

    rows = []
    variants = [
        (d, be)
        for d in (torch.float32, torch.bfloat16)
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
    ]
    for b, h, n, causal in SHAPES:
        times: dict = {v: [] for v in variants}
        for v in variants:  # warm-up
            _kernel_ms(b, h, n, causal, *v)
        for _ in range(rounds):
            for v in variants:
                times[v].append(_kernel_ms(b, h, n, causal, *v))
        med = {v: statistics.median(t) for v, t in times.items()}
        fl, ma = SDPBackend.FLASH_ATTENTION, SDPBackend.MATH
        rows.append(
            {
                "shape": f"{b}x{h}x{n}x64" + (" causal" if causal else ""),
                "tokens": n,
                "fp32_flash_ms": round(med[(torch.float32, fl)], 1),
                "fp32_math_ms": round(med[(torch.float32, ma)], 1),
                "bf16_flash_ms": round(med[(torch.bfloat16, fl)], 1),
                "bf16_math_ms": round(med[(torch.bfloat16, ma)], 1),
                "bf16_flash_over_math": round(med[(torch.bfloat16, fl)] / med[(torch.bfloat16, ma)], 2),
            }
        )
        print(rows[-1], flush=True)
    return rows


def _scenes_step(backends, bf16: bool, batch_size: int):
    from hydra import compose, initialize_config_dir

    from mmpretrain.losses import InfoNCE
    from mmpretrain.model import build_model
    from mmpretrain.runtime.kernels import attention_context
    from mmpretrain.training.optim import build_optimizer

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=scenes_clip"])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    loss = InfoNCE()
    opt = build_optimizer(model, cfg.optim, cfg.model.towers)
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(batch_size, 3, 64, 64, generator=g),
        "text": torch.randint(1, 49407, (batch_size, 32), generator=g),
    }

    def step() -> float:
        start = time.perf_counter()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with attention_context(backends), autocast:
            total = sum(loss(model(batch)).values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return 1000 * (time.perf_counter() - start)

    return step


def steps(rounds: int, per_round: int, batch_size: int) -> list[dict]:
    from torch.nn.attention import SDPBackend

    variants = {
        "fp32 (torch's kernels)": _scenes_step(None, False, batch_size),
        "bf16-mixed, torch's kernels (flash)": _scenes_step(None, True, batch_size),
        "bf16-mixed, math kernel (precision=auto, attention_kernel=auto)": _scenes_step(
            [SDPBackend.MATH], True, batch_size
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name] += [fn() for _ in range(per_round)]
    base = statistics.median(times["fp32 (torch's kernels)"])
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        rows.append({"step": name, "median_ms": round(med, 1), "speedup_vs_fp32": round(base / med, 2)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    a = p.parse_args()
    from mmpretrain.runtime.kernels import SHORT_ATTENTION, cpu_has_bf16

    if not cpu_has_bf16():
        print("this CPU has no native bf16 (AMX / AVX512-BF16): bf16 figures here are emulated", flush=True)
    krows = kernels(a.rounds)
    srows = steps(a.rounds, a.steps_per_round, a.batch)
    table = bc.md_table(
        [
            "attention fwd+bwd",
            "fp32 flash ms",
            "fp32 math ms",
            "bf16 flash ms",
            "bf16 math ms",
            "bf16 flash / math",
        ],
        [
            [
                r["shape"],
                r["fp32_flash_ms"],
                r["fp32_math_ms"],
                r["bf16_flash_ms"],
                r["bf16_math_ms"],
                f"{r['bf16_flash_over_math']}x",
            ]
            for r in krows
        ],
    )
    table += "\n\n" + bc.md_table(
        [f"experiment=scenes_clip step (batch {a.batch}, no data loading)", "median ms", "speedup vs fp32"],
        [[r["step"], r["median_ms"], f"{r['speedup_vs_fp32']}x"] for r in srows],
    )
    notes = [
        f"median of {a.rounds} interleaved rounds (steps: {a.steps_per_round} a round), after a warm-up; "
        f"CPU with native bf16: {cpu_has_bf16()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        f"attention_kernel=auto picks the math kernel under CPU bf16 where every tower attends over at most "
        f"{SHORT_ATTENTION} tokens (a ratio above 1x in the first table), torch's choice otherwise",
    ]
    rows = [{"part": "kernel", **r} for r in krows] + [{"part": "step", **r} for r in srows]
    bc.write_results("attention_cpu", rows, table, notes)


if __name__ == "__main__":
    main()
