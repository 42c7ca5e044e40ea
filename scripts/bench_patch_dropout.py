"""Patch dropout (FLIP): training step time and peak memory at 0.0 / 0.5 / 0.75 of the patches dropped.

One training step is the model's forward over a batch of images and captions, the InfoNCE loss, its
backward and an AdamW step, on the ViT of the CPU benchmarks (``vit-4x192-p8-64``: 64 patches + the
class token) or any open_clip model-config JSON. Each setting runs in a fresh child process,
interleaved (A B C A B C ...) so the machine's load falls on all alike. Memory: the activations
autograd saves for the backward (bytes of the distinct storages packed by
``torch.autograd.graph.saved_tensors_hooks`` in one forward: exact, the same on any device; what
patch dropout shrinks) and, on a GPU, ``torch.cuda.max_memory_allocated`` over the timed steps.
Writes ``benchmarks/results/patch_dropout.{csv,md}``.

    python scripts/bench_patch_dropout.py                    # CPU, batch 64, 3 reps
    python scripts/bench_patch_dropout.py --device cuda --batch 256 --model ViT-B-32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import bench_common as bc

RATES = (0.0, 0.5, 0.75)


def child(model: str, rate: float, batch: int, steps: int, warmup: int, device: str) -> dict:
    import torch

    from mmpretrain.losses import InfoNCE
    from mmpretrain.model import build_model
    from mmpretrain.towers.open_clip import resolve_model_cfg

    cfg = resolve_model_cfg(str(bc.model_json(model)) if not model.startswith("ViT") else model)
    tower = {"_target_": "mmpretrain.towers.open_clip.OpenClipTower", "config": cfg, "pretrained": False}
    torch.manual_seed(0)
    net = build_model({"towers": {m: tower | {"modality": m} for m in ("image", "text")}})
    if rate:
        net.towers["image"].set_patch_dropout(rate)
    net.to(device).train()
    loss_fn = InfoNCE()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    size = int(cfg["vision_cfg"]["image_size"])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    text = torch.randint(1, 49000, (batch, 12), generator=g).to(device)  # 12-token captions (trimmed)
    cuda = device.startswith("cuda")
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved = sum(loss_fn(net({"image": images, "text": text})).values())
    saved.backward()
    opt.zero_grad(set_to_none=True)
    times = []
    for i in range(warmup + steps):
        if i == warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        start, cpu = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        sum(loss_fn(net({"image": images, "text": text})).values()).backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    out = {
        "step_ms": 1000 * bc.median([t[0] for t in times[warmup:]]),
        "cpu_ms": 1000 * bc.median([t[1] for t in times[warmup:]]),
        "activations_mb": sum(storages.values()) / 2**20,
    }
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=bc.CPU_MODEL, help="a JSON in benchmarks/models or an open_clip name")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        print(json.dumps(child(a.model, a.child, a.batch, a.steps, a.warmup, a.device)))
        return
    rows = []
    for rep in range(a.reps):
        for rate in RATES:
            cmd = [bc.python(), __file__, "--child", str(rate), "--model", a.model, "--batch", str(a.batch)]
            cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--device", a.device]
            out = subprocess.run(cmd, env=bc.child_env(a.threads), capture_output=True, text=True, check=True)
            rows.append({"rep": rep, "patch_dropout": rate} | json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    table, base, cuda = [], None, a.device.startswith("cuda")
    for rate in RATES:
        mine = [r for r in rows if r["patch_dropout"] == rate]
        step = bc.median([r["step_ms"] for r in mine])
        cpu = bc.median([r["cpu_ms"] for r in mine])
        act = bc.median([r["activations_mb"] for r in mine])
        base = base or (step, cpu, act)
        table.append([rate, step, cpu, f"{cpu / base[1]:.2f}x", act, f"{act / base[2]:.2f}x"])
        if cuda:
            table[-1].append(bc.median([r["peak_gpu_mb"] for r in mine]))
    header = ["patch_dropout", "step ms (wall)", "step CPU ms", "vs 0.0", "activations saved for backward MB"]
    header += ["vs 0.0"]
    header += ["peak GPU memory MB"] if cuda else []
    notes = [
        f"model `{a.model}` (open_clip ViT + text transformer, random init), batch {a.batch}, 12-token "
        f"captions, forward + InfoNCE + backward + AdamW, device {a.device}, {a.threads} threads, fp32",
        f"median of {a.steps} steps after {a.warmup} warm-up steps, per child; median over {a.reps} "
        "interleaved children per setting",
        "activations: the storages autograd keeps for the backward of one step (both towers and the "
        "loss; weights, gradients and optimiser state excluded)",
        "patch dropout acts on the image tower only: the text tower's share of the step is unchanged",
        "step CPU ms: the child's process time per step (all its threads), which other jobs on a shared "
        "machine disturb far less than the wall time; with 1 thread on a quiet machine the two agree",
    ]
    bc.write_results("patch_dropout", rows, bc.md_table(header, table), notes)


if __name__ == "__main__":
    main()
