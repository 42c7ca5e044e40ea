"""Peak memory and time of plain vs memory-tiled InfoNCE (forward + backward) on the CPU.

Each configuration runs in a fresh subprocess, so one run's allocations cannot hide another's.
The peak is the process's resident high-water mark (``VmHWM``, reset with
``/proc/self/clear_refs`` once the features exist; ``ru_maxrss`` where that is not allowed)
minus the resident size at that point: the *extra* memory the loss needs beyond its inputs.
Plain configurations whose logits would not fit under ``--mem-cap-gb`` are not run; their need
is predicted from the measured plain runs (bytes per logit) and printed.

    python scripts/bench_loss_memory.py                     # 4096, 16384, 65536 at dim 512
    python scripts/bench_loss_memory.py --sizes 1024 4096 --mem-cap-gb 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import bench_common as bc

ROOT = Path(__file__).resolve().parent.parent


def run_one(method: str, n: int, dim: int, tile: int) -> dict:
    import torch
    import torch.nn.functional as F

    from mmpretrain.losses import clip_loss, tiled_clip_loss

    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    exact, base_kb = bc.reset_peak_rss()
    t0 = time.perf_counter()
    if method == "plain":
        loss = clip_loss(a, b, scale, gather=False)
    else:
        loss = tiled_clip_loss(a, b, scale, gather=False, tile=tile)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak_kb = bc.peak_rss_kb(exact)
    return {
        "method": method,
        "n": n,
        "dim": dim,
        "loss": loss.item(),
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "extra_mb": (peak_kb - base_kb) / 1024,
        "inputs_mb": 2 * n * dim * 4 / 2**20,
        "exact_peak": exact,
    }


def spawn(method: str, n: int, dim: int, tile: int, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--one", method, str(n), "--dim", str(dim), "--tile", str(tile)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if proc.returncode != 0:
        return {"method": method, "n": n, "dim": dim, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument(
        "--mem-cap-gb", type=float, default=3.0, help="do not run plain configs predicted above this"
    )
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", type=str, default=None, help="also write the rows here")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.dim, args.tile)))
        return []

    rows, bytes_per_logit = [], None
    for n in sorted(args.sizes):
        for method in ("plain", "tiled"):
            if method == "plain":
                # plain holds the two [n, n] logits plus their log-softmax: predict from measurements
                per = bytes_per_logit or 16.0
                need_gb = per * n * n / 2**30
                if need_gb > args.mem_cap_gb:
                    rows.append(
                        {
                            "method": method,
                            "n": n,
                            "dim": args.dim,
                            "skipped": f"does not fit (needs ~{need_gb:.1f} GB)",
                        }
                    )
                    print(
                        f"plain  n={n}: does not fit (needs ~{need_gb:.1f} GB > cap {args.mem_cap_gb} GB)",
                        flush=True,
                    )
                    continue
            row = spawn(method, n, args.dim, args.tile, args.timeout)
            if method == "plain" and "extra_mb" in row:
                bytes_per_logit = row["extra_mb"] * 2**20 / (n * n)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| loss  | global batch | dim | extra peak memory | forward s | backward s | loss value |")
    print("|-------|-------------:|----:|------------------:|----------:|-----------:|-----------:|")
    for r in rows:
        if "skipped" in r or "error" in r:
            print(
                f"| {r['method']:<5} | {r['n']:>12} | {r['dim']:>3} | {r.get('skipped') or r.get('error')} "
                "| | | |"
            )
        else:
            mem = f"{r['extra_mb']:.0f} MB" if r["extra_mb"] < 1024 else f"{r['extra_mb'] / 1024:.2f} GB"
            print(
                f"| {r['method']:<5} | {r['n']:>12} | {r['dim']:>3} | {mem:>17} | {r['forward_s']:>9.1f} | "
                f"{r['backward_s']:>10.1f} | {r['loss']:.6f} |"
            )


if __name__ == "__main__":
    main()
