"""Training-step throughput of the digits tiny model with and without each speed/memory option.

One step = forward + loss + backward + AdamW step on a fixed batch of digits-shaped inputs (image
3x32x32, 24 text tokens), so only the model's cost is measured, not decoding. Variants are run
interleaved (round-robin, several rounds) so that load from other processes on a shared machine
hits all of them alike; the table gives the median throughput and its ratio to the baseline
measured in the same rounds.

    python scripts/bench_speed_options.py                    # all variants
    python scripts/bench_speed_options.py --skip compile --rounds 3 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "baseline": {},
    "grad_checkpointing": {
        "overrides": [
            "model.towers.image.grad_checkpointing=true",
            "model.towers.text.grad_checkpointing=true",
        ]
    },
    "channels_last": {"overrides": ["model.towers.image.channels_last=true"]},
    "bf16_autocast": {"autocast": True},
    "compile": {"compile": True},
    "tiled_loss": {"loss": {"tiled": True, "tile_size": 32}},
    "grad_cache_k4": {"chunks": 4},
}


def build(name: str, spec: dict, batch_size: int):
    from hydra import compose, initialize_config_dir

    from mmpretrain.losses import InfoNCE
    from mmpretrain.model import apply_training_options, build_model
    from mmpretrain.training.optim import build_optimizer

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(spec.get("overrides", [])))
    torch.manual_seed(0)
    model = apply_training_options(build_model(cfg.model), cfg.model).train()
    if spec.get("compile"):
        for tower in model.towers.values():
            tower.compile()
    loss = InfoNCE(**spec.get("loss", {}))
    opt = build_optimizer(model, cfg.optim, cfg.model.towers)
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(batch_size, 3, 32, 32, generator=g),
        "text": torch.randint(
            1, 49000, (batch_size, cfg.model.towers.text.config.text_cfg.context_length), generator=g
        ),
    }
    return model, loss, opt, batch


def step(model, loss, opt, batch, spec) -> None:
    from mmpretrain.training.gradcache import grad_cache_backward

    opt.zero_grad()
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if spec.get("autocast") else contextlib.nullcontext()
    with amp:
        if spec.get("chunks"):
            grad_cache_backward(model, loss, batch, spec["chunks"])
        else:
            sum(loss(model(batch)).values()).backward()
    opt.step()


def main(argv=None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=list(VARIANTS))
    args = parser.parse_args(argv)

    runs = {}
    for name, spec in VARIANTS.items():
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        runs[name] = (build(name, spec, args.batch_size), spec)
        for _ in range(args.warmup):  # includes compilation for the compiled variant
            step(*runs[name][0], spec)
        print(f"{name}: built + {args.warmup} warm-up steps in {time.perf_counter() - t0:.1f} s", flush=True)

    rates: dict[str, list[float]] = {name: [] for name in runs}
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, (objs, spec) in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(*objs, spec)
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
        for name in runs:
            ratios[name].append(rates[name][-1] / rates["baseline"][-1])
        print(f"round {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:.0f}/s" for n in runs), flush=True)

    print("\n| option | samples/s (median) | vs baseline (median of per-round ratios) |")
    print("|--------|-------------------:|-----------------------------------------:|")
    result = {}
    for name in runs:
        result[name] = {
            "samples_per_s": statistics.median(rates[name]),
            "ratio": statistics.median(ratios[name]),
        }
        print(f"| {name} | {result[name]['samples_per_s']:.0f} | {result[name]['ratio']:.2f}x |")
    return result


if __name__ == "__main__":
    main()
