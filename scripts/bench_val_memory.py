"""Peak extra memory and time of the validation metrics on a large val set, on the CPU.

The metrics are the module's own (``ContrastiveModule.validation_metrics``): retrieval and class
retrieval (R@k, mAP) in both directions, the InfoNCE val loss and zero-shot by class prototypes,
for ``--n`` random ``--dim``-d pairs in ``--classes`` classes. The peak is the process's resident
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` once the embeddings exist;
``ru_maxrss`` where that is not allowed) minus the resident size at that point: the memory the
metrics need beyond their inputs. Computing them with one N x N float32 matrix per direction
would need 2 N^2 x 4 bytes and more (20 GB at N = 50,000).

    python scripts/bench_val_memory.py                 # N = 50,000, dim 512, 10 classes
    python scripts/bench_val_memory.py --n 5000
"""

from __future__ import annotations

import argparse
import json
import time

import bench_common as bc


def build_module(dim: int):
    from mmpretrain.losses import InfoNCE
    from mmpretrain.model import build_model
    from mmpretrain.training.module import ContrastiveModule

    towers = {
        "image": {
            "_target_": "mmpretrain.towers.timm.TimmTower",
            "model_name": "test_resnet",
            "img_size": 32,
        },
        "audio": {
            "_target_": "mmpretrain.towers.audio.AudioTower",
            "model_name": "test_resnet",
            "clip_seconds": 0.25,
            "frontend": {"n_mels": 16, "hop_length": 256},
        },
    }
    model = build_model({"embed_dim": dim, "towers": towers}).eval()
    return ContrastiveModule(model, InfoNCE(pairs=[["image", "audio"]]), optim={})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    module = build_module(args.dim)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, args.classes, (args.n,), generator=g)
    centres = torch.randn(args.classes, args.dim, generator=g)
    image = F.normalize(centres[labels] + 3 * torch.randn(args.n, args.dim, generator=g), dim=-1)
    audio = F.normalize(image + 0.06 * torch.randn(args.n, args.dim, generator=g), dim=-1)
    local = {"image": image, "audio": audio, "cls": labels}

    exact, base_kb = bc.reset_peak_rss()
    t0, cpu0 = time.perf_counter(), time.process_time()
    metrics = module.validation_metrics(local)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    peak_kb = bc.peak_rss_kb(exact)
    row = {
        "n": args.n,
        "dim": args.dim,
        "classes": args.classes,
        "extra_peak_mb": round((peak_kb - base_kb) / 1024, 1),
        "inputs_mb": round(2 * args.n * args.dim * 4 / 2**20, 1),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),  # all threads; wall time on a shared machine varies
        "threads": torch.get_num_threads(),
        "exact_peak": exact,
        "one_nxn_float32_gb": round(args.n**2 * 4 / 2**30, 1),
    }
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=1))
    print(json.dumps(row))
    print(
        f"N={args.n}: validation metrics in {row['seconds']} s ({row['cpu_seconds']} s CPU), peak extra "
        f"memory {row['extra_peak_mb']} MB "
        f"(inputs {row['inputs_mb']} MB; one N x N float32 matrix would be {row['one_nxn_float32_gb']} GB)"
    )
    return row


if __name__ == "__main__":
    main()
