"""Caption generation speed: tokens/s with the decoder's key/value cache and without it (the whole prefix
recomputed at every step), and a check that both give the same tokens.

The model is scenes_coca's (open_clip ViT 4x192 patch 8 at 64 px, our decoder 2 x 256) or open_clip's
CoCa layout (``--model open_clip_coca``, ``conf/model/open_clip/coca-4x192-p8-64.json``), random
weights unless ``--ckpt`` names a trained one. Every caption is made exactly ``--max-len`` tokens long
(the end token is banned until the last position), so both arms decode the same number of tokens.
Timed after one warm-up call, ``--reps`` repetitions per arm interleaved, the median reported.

    python scripts/bench_generate.py --out benchmarks/results/generate   # generate.{json,csv,png}
    (--model open_clip_coca: generate_open_clip_coca.*)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(name: str, ckpt: str | None):
    from mmpretrain.export import model_from_checkpoint
    from mmpretrain.interop.open_clip import open_clip_model_config
    from mmpretrain.model import build_model

    if ckpt:
        return model_from_checkpoint(ckpt).eval()
    torch.manual_seed(0)
    coca_json = json.loads((ROOT / "conf" / "model" / "open_clip" / "coca-4x192-p8-64.json").read_text())
    if name == "open_clip_coca":
        return build_model(open_clip_model_config(coca_json)).eval()
    clip = json.loads((ROOT / "conf" / "model" / "open_clip" / "vit-4x192-p8-64.json").read_text())
    clip["text_cfg"]["context_length"] = 32
    towers = {
        m: {"_target_": "mmpretrain.towers.open_clip.OpenClipTower", "modality": m, "config": clip}
        for m in ("image", "text")
    }
    return build_model(
        {"towers": towers, "embed_dim": None, "decoder": {"width": 256, "heads": 4, "layers": 2}}
    ).eval()


def time_arm(model, images, max_len: int, strategy: str, use_cache: bool, beams: int) -> tuple[float, list]:
    start = time.perf_counter()
    out = model.generate(
        images, strategy, max_len=max_len, min_len=max_len - 2, use_cache=use_cache, num_beams=beams
    )
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ours", choices=["ours", "open_clip_coca"])
    parser.add_argument(
        "--ckpt", default=None, help="a trained model (.ckpt or export) instead of random weights"
    )
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--max-len", type=int, default=32, help="tokens per caption, start and end included")
    parser.add_argument("--strategy", default="greedy", choices=["greedy", "beam"])
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--out", default=None, help="a folder for generate.json, generate.csv and generate.png"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.model, args.ckpt)
    from mmpretrain.towers.decoder import tower_input_size

    shape = tower_input_size(model.towers["image"])
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        gen = torch.Generator().manual_seed(batch)
        images = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, generator=gen)
        tokens = batch * (args.max_len - 1)  # decoded tokens: every position after the start token
        times = {True: [], False: []}
        outputs = {}
        for use_cache in (True, False):  # warm-up
            _, outputs[use_cache] = time_arm(
                model, images, args.max_len, args.strategy, use_cache, args.beams
            )
        for rep in range(args.reps):
            for use_cache in (True, False) if rep % 2 == 0 else (False, True):
                seconds, _ = time_arm(model, images, args.max_len, args.strategy, use_cache, args.beams)
                times[use_cache].append(seconds)
        cached, uncached = statistics.median(times[True]), statistics.median(times[False])
        row = {
            "batch": batch,
            "max_len": args.max_len,
            "strategy": args.strategy,
            "tokens_per_s_cache": tokens / cached,
            "tokens_per_s_no_cache": tokens / uncached,
            "speedup": uncached / cached,
            "same_tokens": outputs[True] == outputs[False],
            "threads": torch.get_num_threads(),
        }
        rows.append(row)
        print(
            f"batch {batch:>3}: {row['tokens_per_s_cache']:8.1f} tokens/s with the cache, "
            f"{row['tokens_per_s_no_cache']:8.1f} without ({row['speedup']:.2f}x), "
            f"same tokens: {row['same_tokens']}"
        )
    if args.out:
        write(rows, Path(args.out), args)


def write(rows: list[dict], out: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmpretrain.io import atomic_write, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    stem = "generate" if args.model == "ours" else f"generate_{args.model}"
    write_text_atomic(out / f"{stem}.json", json.dumps({"args": vars(args), "rows": rows}, indent=2))
    keys = list(rows[0])
    write_text_atomic(
        out / f"{stem}.csv",
        "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n",
    )
    fig, ax = plt.subplots(figsize=(5, 3.2))
    batches = [str(r["batch"]) for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["tokens_per_s_cache"] for r in rows], 0.4, label="KV cache")
    ax.bar([i + 0.2 for i in x], [r["tokens_per_s_no_cache"] for r in rows], 0.4, label="no cache")
    ax.set_xticks(list(x), batches)
    ax.set_xlabel("images per batch")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{args.model} decoder, {args.strategy}, {args.max_len} tokens")
    ax.legend()
    fig.tight_layout()
    atomic_write(out / f"{stem}.png", lambda p: fig.savefig(p, dpi=100, format="png"))
    print(f"wrote {out}/{stem}.{{json,csv,png}}")


if __name__ == "__main__":
    main()
