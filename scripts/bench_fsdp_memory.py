"""Peak memory per rank of DDP vs FSDP (``trainer=fsdp``) on 2 CPU processes (gloo).

    python scripts/bench_fsdp_memory.py                        # open_clip ViT-B-16, batch 4 per rank
    python scripts/bench_fsdp_memory.py --model ViT-L-14 --device cuda --batch 16   # (scripts/gpu_check.py)

Each strategy runs in 2 fresh processes with a real ``L.Trainer`` (``DDPStrategy`` or mmpretrain's
``FSDP2Strategy``, as ``trainer=ddp``/``trainer=fsdp`` build them) on a ``ContrastiveModule`` of both
towers of an open_clip model config (shipped in the open_clip package, random init, no download),
AdamW, gradient clipping 1.0, ``--steps`` steps of a fixed synthetic batch (224 px images, 77 tokens).
Two numbers per rank, both taken from the second step on (after the optimizer state exists):

- tracked tensor bytes: parameters + gradients + AdamW state that the rank holds (a shard's local
  part under FSDP), counted from the tensors themselves: exact, and independent of the allocator;
- peak resident memory (VmHWM on CPU, reset when step 2 starts; ``torch.cuda.max_memory_allocated``
  on CUDA): everything the process holds, activations and gathered blocks included.

The whole model is built on every rank before it is sharded (as the CLI does): the start-up peak is
one full model per rank under both strategies, so the peak is taken from step 2, not from launch.
Writes benchmarks/results/fsdp_memory{,_cuda}.{csv,md}.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import bench_common as bc

sys.path.insert(0, str(bc.ROOT))


def _bytes(tensors) -> int:
    from mmpretrain.runtime.distributed import local_tensor

    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors if t is not None)


def _malloc_trim() -> None:
    """glibc keeps freed heap pages resident; give them back so RSS counts live memory only."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then includes freed pages (an upper bound)
        pass


def worker(rank: int, world: int, port: int, queue, args: argparse.Namespace) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        OMP_NUM_THREADS=str(args.threads),
    )
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from mmpretrain.losses import InfoNCE
    from mmpretrain.model import build_model
    from mmpretrain.runtime.fsdp import FSDP2Strategy
    from mmpretrain.training.module import ContrastiveModule

    torch.manual_seed(0)
    cfg = {
        "config": args.model,
        "towers": {
            m: {"_target_": "mmpretrain.towers.open_clip.OpenClipTower", "modality": m, "config": args.model}
            for m in ("image", "text")
        },
    }
    model = build_model(cfg)
    module = ContrastiveModule(model, InfoNCE(), {"lr": 1e-4, "weight_decay": 0.1})
    g = torch.Generator().manual_seed(rank)
    batch = {
        "image": torch.randint(0, 256, (args.batch, 3, 224, 224), dtype=torch.uint8, generator=g),
        "text": torch.randint(1, 49407, (args.batch, 77), generator=g),
    }
    cuda = args.device == "cuda"
    # Fewer GPUs than ranks (one lent GPU): the ranks share it as one-process "nodes", over gloo
    # (NCCL refuses two ranks on one device).
    shared = cuda and torch.cuda.device_count() < world
    if shared:
        os.environ.update(LOCAL_RANK="0", NODE_RANK=str(rank))
    backend = "nccl" if cuda and not shared else "gloo"
    strategy = (
        FSDP2Strategy(process_group_backend=backend)
        if args.strategy == "fsdp"
        else DDPStrategy(process_group_backend=backend)
    )
    record: dict = {"rank": rank, "strategy": args.strategy}

    class Measure(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, batch_idx):
            if batch_idx == 1:  # the optimizer state exists from here on
                if (
                    not cuda
                ):  # hand the heap freed since start-up (the whole model FSDP replaced by shards) back
                    _malloc_trim()
                record["exact"], start_kb = bc.reset_peak_rss()
                record["rss_start_mb"] = start_kb / 1024
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                self.t0 = time.perf_counter()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step >= 1:
                params = list(pl_module.parameters())
                state = [
                    v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
                ]
                record["params_mb"] = _bytes(params) / 2**20
                record["grads_mb"] = _bytes(p.grad for p in params) / 2**20
                record["optim_mb"] = _bytes(state) / 2**20

        def on_train_end(self, trainer, pl_module):
            record["tensors_mb"] = record["params_mb"] + record["grads_mb"] + record["optim_mb"]
            record["peak_mb"] = (
                torch.cuda.max_memory_allocated() if cuda else bc.peak_rss_kb(record["exact"]) * 1024
            ) / 2**20
            record["s_per_step"] = (time.perf_counter() - self.t0) / max(1, args.steps - 1)

    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="gpu" if cuda else "cpu",
        devices=1 if shared else world,
        num_nodes=world if shared else 1,
        strategy=strategy,
        precision="bf16-mixed" if cuda else "32-true",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Measure()],
        limit_val_batches=0,
        use_distributed_sampler=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch] * args.steps, batch_size=None))
    buf = io.BytesIO()
    torch.save(record, buf)
    queue.put(buf.getvalue())


def measure(args: argparse.Namespace, strategy: str) -> list[dict]:
    import torch
    import torch.multiprocessing as mp

    sys.path.insert(0, str(bc.ROOT / "tests" / "integration"))
    from gloo import free_port

    args = argparse.Namespace(**vars(args), strategy=strategy)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, args.world, port, queue, args)) for r in range(args.world)]
    for p in procs:
        p.start()
    out = [torch.load(io.BytesIO(queue.get(timeout=args.timeout)), weights_only=False) for _ in procs]
    for p in procs:
        p.join(timeout=120)
        if p.exitcode != 0:
            raise RuntimeError(f"{strategy}: a worker exited with {p.exitcode}")
    return sorted(out, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-16", help="an open_clip model config name (random init)")
    parser.add_argument("--batch", type=int, default=4, help="samples per rank")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--no-write", action="store_true", help="print only (gpu_check's rehearsal)")
    args = parser.parse_args()
    rows = [
        r | {"model": args.model, "batch_per_rank": args.batch, "device": args.device}
        for s in ("ddp", "fsdp")
        for r in measure(args, s)
    ]
    by = {s: [r for r in rows if r["strategy"] == s] for s in ("ddp", "fsdp")}
    peak_name = "peak allocated MB (CUDA)" if args.device == "cuda" else "peak RSS MB (VmHWM)"
    table = bc.md_table(
        [
            "strategy",
            "rank",
            "params MB",
            "grads MB",
            "AdamW state MB",
            "tracked tensors MB",
            "RSS at step 2 MB",
            peak_name,
            "s/step",
        ],
        [
            [
                r["strategy"],
                r["rank"],
                r["params_mb"],
                r["grads_mb"],
                r["optim_mb"],
                r["tensors_mb"],
                r.get("rss_start_mb", float("nan")),
                r["peak_mb"],
                r["s_per_step"],
            ]
            for r in rows
        ],
    )
    ratio = {
        k: max(r[k] for r in by["fsdp"]) / max(r[k] for r in by["ddp"]) for k in ("tensors_mb", "peak_mb")
    }
    notes = [
        (
            f"open_clip {args.model} (both towers, random init), batch {args.batch} per rank, {args.world} "
            f"{'GPUs' if args.device == 'cuda' else 'CPU processes (gloo, 1 thread each)'}, AdamW, clipping "
            f"1.0, {'bf16-mixed' if args.device == 'cuda' else 'fp32'}"
        ),
        f"FSDP / DDP, largest rank: tracked tensors {ratio['tensors_mb']:.2f}x, peak {ratio['peak_mb']:.2f}x",
        "tracked tensors: parameters + gradients + AdamW state held by the rank (FSDP: its shards), from "
        "the tensors' sizes; peak: from the start of step 2 to the end of training (activations, gathered "
        "blocks, the interpreter, torch and open_clip included; RSS at step 2 minus the tracked tensors: "
        + ", ".join(
            f"{s} {max(r.get('rss_start_mb', 0) - r['tensors_mb'] for r in by[s]) / 1024:.1f} GB" for s in by
        )
        + "); on CPU the "
        "heap freed before step 2 is returned first (glibc malloc_trim), since the whole model is built on "
        "every rank before it is sharded",
        "s/step on CPU is the shared 2-core machine's, under other jobs' load: not a speed comparison",
    ]
    if args.no_write:
        print(table + "\n" + "\n".join(notes))
    else:
        name = "fsdp_memory" + ("_cuda" if args.device == "cuda" else "")
        bc.write_results(name, rows, table, notes)
        if args.device == "cpu":
            cmd = " ".join(["python scripts/bench_fsdp_memory.py", *sys.argv[1:]])
            (bc.ROOT / "benchmarks" / "FSDP_MEMORY.md").write_text(
                f"# Peak memory per rank: trainer=ddp vs trainer=fsdp\n\nReproduce with `{cmd}` "
                f"(about 5 minutes on 2 cores). Rows per rank; CSV in `benchmarks/results/{name}.csv`.\n\n"
                + (bc.RESULTS / f"{name}.md").read_text()
            )


if __name__ == "__main__":
    main()
