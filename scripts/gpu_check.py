"""`make gpu-check`: every GPU code path for 50 steps, then ViT-B-32 throughput, memory and MFU.

    python scripts/gpu_check.py [--work DIR] [--steps 50] [--peak-tflops T]

On a CUDA machine only (exit status 2 without one). Each check is a `mmpretrain train` run of the
default recipe on the bundled digits through the installed console script (or `python -m
mmpretrain.cli` where none is installed), as a user launches it, validating once at the last step:

1. bf16-mixed with gradient clipping on one GPU (`trainer=gpu`)
2. DDP over every visible GPU; with a single GPU, two processes share it (two torchrun "nodes" of
   one process each on this host, gloo backend: NCCL refuses two ranks on one device)
3. `compile=true`
4. `loss=siglip`
5. `loss.tiled=true`
6. `optim.grad_cache_chunks=4`
7. `trainer=fsdp` (Lightning's FSDP2 strategy) over every visible GPU
8. `data.image_decode=gpu`: one batch of 224-px scenes JPEGs decoded by nvJPEG against the workers'
   path, and a short `experiment=scenes_clip` run at 224 px with it (--skip-gpu-decode)

then samples/s, peak memory and MFU of open_clip ViT-B-32 at 224 px, bf16, batch 256 (FLOPs from
torch's FlopCounter, peak bf16 TFLOP/s by GPU name or --peak-tflops), the Trainer's fixed cost per
step on the GPU (plain loop vs the default Trainer on the same model, scripts/bench_overhead.py,
~1.5 minutes; --skip-overhead), and DDP vs FSDP peak memory per rank for open_clip ViT-L-14
(scripts/bench_fsdp_memory.py, 2 ranks). Prints one line per check and exits non-zero when any
failed. About 8.5 minutes on one H100/H200 (budget: 10; `--skip-fsdp-memory` leaves out the
ViT-L-14 comparison, ~2 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc


def mmpretrain_cmd() -> list[str]:
    script = Path(sys.executable).parent / "mmpretrain"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mmpretrain.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, cmds: list[list[str]], run_dir: Path, timeout: float) -> dict:
    """Run the processes of one check together; pass when all exit 0 and the loss is finite."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(bc.ROOT), os.environ.get("PYTHONPATH", "")]),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        HYDRA_FULL_ERROR="1",
    )
    start = time.perf_counter()
    logs = [run_dir.parent / f"{run_dir.name}.rank{i}.log" for i in range(len(cmds))]
    codes: list = []
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(open(log, "w")) for log in logs]
        procs = [
            subprocess.Popen(c, env=env, cwd=run_dir.parent, stdout=f, stderr=subprocess.STDOUT)
            for c, f in zip(cmds, outs)
        ]
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(1.0, timeout - (time.perf_counter() - start))))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append("timeout")
    seconds = time.perf_counter() - start
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    loss = metrics.get("train/loss")
    ok = all(c == 0 for c in codes) and loss is not None and math.isfinite(loss)
    detail = f"{seconds:.0f} s, train/loss {loss}, val top-1 {metrics.get('val/zeroshot_top1/image_text')}"
    if not ok:
        tail = "".join(log.read_text()[-2500:] for log in logs)
        detail += f", exit {codes}\n{tail}"
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return {"check": name, "ok": ok, "seconds": round(seconds, 1), "loss": loss, "exit": codes}


def on_cpu(cmd: list[str]) -> list[str]:
    """The same command on CPU processes (``--cpu-rehearsal``)."""
    swap = {
        "trainer=gpu": ["trainer=cpu", "trainer.precision=bf16-mixed"],
        "trainer.accelerator=gpu": ["trainer.accelerator=cpu"],
    }
    return [x for arg in cmd for x in swap.get(arg, [arg])]


def checks(digits: Path, work: Path, steps: int, gpus: int) -> list[tuple[str, Path, list[list[str]]]]:
    """(name, run directory, the command of each process) of every check."""
    common = [
        f"data.root={digits}",
        "data.batch_size=128",
        "data.num_workers=4",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        f"trainer.val_check_interval={steps}",
        "trainer.check_val_every_n_epoch=null",
        "trainer.limit_val_batches=4",
        "export_at_end=false",
        "callbacks.progress_bar=null",
    ]

    def single(name: str, *overrides: str) -> tuple[str, Path, list[list[str]]]:
        run_dir = work / name.split()[0].replace("=", "_").replace(".", "_")
        return (
            name,
            run_dir,
            [[*mmpretrain_cmd(), "train", "trainer=gpu", *common, *overrides, f"hydra.run.dir={run_dir}"]],
        )

    ddp_dir = work / "ddp"
    if gpus >= 2:
        ddp = (
            f"DDP over {gpus} GPUs",
            ddp_dir,
            [
                [
                    *mmpretrain_cmd(),
                    "train",
                    "trainer=ddp",
                    "trainer.accelerator=gpu",
                    f"trainer.devices={gpus}",
                    "trainer.precision=bf16-mixed",
                    *common,
                    f"hydra.run.dir={ddp_dir}",
                ]
            ],
        )
    else:
        port = free_port()
        ddp = (
            "DDP, 2 processes on 1 GPU (gloo)",
            ddp_dir,
            [
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes=2",
                    f"--node_rank={r}",
                    "--nproc_per_node=1",
                    "--master_addr=127.0.0.1",
                    f"--master_port={port}",
                    "-m",
                    "mmpretrain.cli",
                    "train",
                    "trainer=ddp_multinode",
                    "trainer.num_nodes=2",
                    "trainer.devices=1",
                    "trainer.accelerator=gpu",
                    "trainer.precision=bf16-mixed",
                    "trainer.strategy={_target_: lightning.pytorch.strategies.DDPStrategy, "
                    "process_group_backend: gloo}",
                    *common,
                    f"hydra.run.dir={ddp_dir}",
                ]
                for r in range(2)
            ],
        )
    fsdp_dir = work / "fsdp"
    fsdp = (
        f"trainer=fsdp over {max(1, gpus)} GPU(s)",
        fsdp_dir,
        [
            [
                *mmpretrain_cmd(),
                "train",
                "trainer=fsdp",
                "trainer.accelerator=gpu",
                f"trainer.devices={max(1, gpus)}",
                "trainer.precision=bf16-mixed",
                "callbacks.plots=null",
                *common,
                f"hydra.run.dir={fsdp_dir}",
            ]
        ],
    )
    return [
        single("bf16-mixed + clipping, 1 GPU"),
        ddp,
        fsdp,
        single("compile=true", "compile=true"),
        single("loss=siglip", "loss=siglip"),
        single("loss.tiled=true", "loss.tiled=true", "loss.tile_size=64"),
        single("optim.grad_cache_chunks=4", "optim.grad_cache_chunks=4"),
    ]


def throughput(digits: Path, work: Path, peak: float | None) -> dict:
    """Steady samples/s (optimizer-step hook of scripts/bench_entry.py), peak memory and MFU of ViT-B-32."""
    import bench_throughput as bt
    import torch

    a = argparse.Namespace(model=bc.GPU_MODEL, device="cuda", batch=256, workers=8, steps=64, lr=5e-4, wd=0.1)
    run_dir = work / "vit_b32"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    record = run_dir / "steps.json"
    try:
        res = bc.run_timed(
            bt.ours_cmd(a, digits, run_dir, record), bc.child_env(), run_dir / "log.txt", timeout=300
        )
    except SystemExit as e:  # the run failed: run_timed says how
        print(f"FAIL ViT-B-32 throughput: {e}", flush=True)
        return {"ok": False}
    data = json.loads(record.read_text()) if record.exists() else {"steps": []}
    if len(data["steps"]) < a.steps or res["rc"] != 0:
        print(
            f"FAIL ViT-B-32 throughput: {len(data['steps'])} of {a.steps} steps; see {run_dir}/log.txt",
            flush=True,
        )
        return {"ok": False}
    rate = bc.steady_rate(data["steps"], a.batch, warmup=16)
    flops = bt.flops_per_sample(a.model)
    gpu = torch.cuda.get_device_name(0)
    peak = peak or next((v for k, v in bc.PEAK_BF16_TFLOPS.items() if k in gpu), None)
    achieved = flops * rate / 1e12
    mfu = f"{100 * achieved / peak:.1f} %" if peak else "unknown peak (--peak-tflops)"
    mem = data.get("peak_gpu_bytes")
    print(
        f"PASS ViT-B-32 224 px bf16, batch {a.batch}, {gpu}: {rate:.0f} samples/s steady, {achieved:.1f} "
        f"TFLOP/s, MFU {mfu}, peak memory {mem / 2**30 if mem else float('nan'):.1f} GiB, wall "
        f"{res['wall_s']:.0f} s",
        flush=True,
    )
    return {"ok": True, "samples_per_s": rate, "tflops": achieved, "peak_gpu_bytes": mem}


def step_overhead(work: Path, rehearsal: bool, timeout: float) -> dict:
    """The Trainer's fixed cost per step on the GPU (scripts/bench_overhead.py): plain loop vs the
    default Trainer (trainer=gpu: bf16-mixed, logs every 50 steps), ViT-B-32 at 224 px, batch 256,
    100 steps of 8 distinct in-memory batches, 2 interleaved reps. The rehearsal: the micro model on CPU."""
    args = (
        ["--model", "bench-micro-vit-1x64-p16-32", "--batch", "8", "--steps", "60", "--warmup", "10"]
        if rehearsal
        else [
            "--device",
            "cuda",
            "--model",
            bc.GPU_MODEL,
            "--batch",
            "256",
            "--steps",
            "100",
            "--warmup",
            "20",
        ]
    )
    name = (
        "overhead_cpu_rehearsal" if rehearsal else "overhead_gpu"
    )  # a rehearsal never fills the GPU section
    args += ["--distinct", "8", "--reps", "2", "--modes", "plain,lightning-default", "--name", name]
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parent / "bench_overhead.py"),
        *args,
        "--work",
        str(work),
    ]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=bc.child_env()
        )
    except subprocess.TimeoutExpired:
        print(f"FAIL step overhead: timed out after {timeout:.0f} s", flush=True)
        return {"check": "step_overhead", "ok": False}
    verdict = next((line for line in proc.stdout.splitlines() if "over the plain loop" in line), None)
    ok = proc.returncode == 0 and verdict is not None
    table = (bc.RESULTS / f"{name}.md").read_text() if ok else proc.stdout[-2500:] + proc.stderr[-2500:]
    print(
        f"{'PASS' if ok else 'FAIL'} step overhead ({args[1]}): {time.perf_counter() - start:.0f} s, "
        f"{verdict}\n{table}",
        flush=True,
    )
    return {"check": "step_overhead", "ok": ok, "verdict": verdict}


def fsdp_memory(rehearsal: bool, timeout: float) -> dict:
    """Peak memory per rank of DDP vs FSDP for open_clip ViT-L-14 (scripts/bench_fsdp_memory.py):
    2 ranks, over 2 GPUs, or as 2 processes sharing one (gloo). Passes when FSDP's tracked tensors
    (parameters + gradients + AdamW state) per rank are at most 0.6x DDP's (ideal: 0.5x with 2
    ranks). The rehearsal runs ViT-B-32 at batch 2 on CPU processes instead."""
    args = (
        ["--model", "ViT-B-32", "--batch", "2", "--steps", "2", "--device", "cpu"]
        if rehearsal
        else ["--model", "ViT-L-14", "--batch", "16", "--steps", "3", "--device", "cuda"]
    )
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "bench_fsdp_memory.py"), *args, "--no-write"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=dict(os.environ, PYTHONPATH=str(bc.ROOT)),
        )
    except subprocess.TimeoutExpired:
        print(f"FAIL FSDP memory ({args[1]}): timed out after {timeout:.0f} s", flush=True)
        return {"check": "fsdp_memory", "ok": False}
    ratio = next(
        (
            float(line.split("tracked tensors ")[1].split("x")[0])
            for line in proc.stdout.splitlines()
            if "FSDP / DDP" in line
        ),
        None,
    )
    ok = proc.returncode == 0 and ratio is not None and ratio <= 0.6
    print(
        f"{'PASS' if ok else 'FAIL'} FSDP memory ({args[1]}): {time.perf_counter() - start:.0f} s, FSDP/DDP "
        f"tracked tensors per rank {ratio}x\n{proc.stdout[-2500:]}" + ("" if ok else proc.stderr[-2500:]),
        flush=True,
    )
    return {"check": "fsdp_memory", "ok": ok, "ratio": ratio}


FALLBACK = "data.image_decode=gpu: CUDA is not available"


def gpu_decode(work: Path, steps: int, rehearsal: bool, timeout: float) -> list[dict]:
    """``data.image_decode=gpu`` (workers send JPEG bytes + crop box, nvJPEG decodes the batch): (a) one
    batch of 256 of the 224-px scenes (256-512 px JPEGs) decoded on the device against the workers'
    fast path (mean |difference| in grey levels, decode + crop samples/s on the device), and (b) a
    `mmpretrain train experiment=scenes_clip` run at 224 px with the option, whose log must not say it
    fell back. Without CUDA (the rehearsal) both run on the CPU: (a) the same code with device="cpu",
    (b) a CPU trainer, whose log must say it fell back to the fast path."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_data

    scenes = bench_data.scenes224(work)
    results = []
    device = "cpu" if rehearsal else "cuda"
    if rehearsal:
        print(f"gpu decode: no CUDA, so the byte path runs on the CPU and training falls back ({FALLBACK})")
    try:
        results.append(_decode_batch(scenes, device))
    except Exception as exn:  # noqa: BLE001 - one failed check is reported, the others still run
        print(f"FAIL gpu decode, one batch on {device}: {type(exn).__name__}: {exn}", flush=True)
        results.append({"check": "gpu_decode_batch", "ok": False})
    run_dir = work / "image_decode_gpu"
    cmd = [
        *mmpretrain_cmd(),
        "train",
        "experiment=scenes_clip",
        "trainer=gpu",
        f"data.root={scenes}",
        "data.build=null",
        "data.image_decode=gpu",
        "data.batch_size=64",
        "data.num_workers=4",
        "model.config.vision_cfg.image_size=224",
        "model.config.vision_cfg.patch_size=32",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        f"trainer.val_check_interval={steps}",
        "trainer.check_val_every_n_epoch=null",
        "trainer.limit_val_batches=2",
        "export_at_end=false",
        "callbacks.progress_bar=null",
        f"hydra.run.dir={run_dir}",
    ]
    res = run(
        "data.image_decode=gpu, scenes at 224 px", [on_cpu(cmd) if rehearsal else cmd], run_dir, timeout
    )
    log = (run_dir.parent / f"{run_dir.name}.rank0.log").read_text()
    said = FALLBACK in log
    if said != rehearsal:
        print(
            f"FAIL data.image_decode=gpu: the log {'says' if said else 'does not say'} it fell back to the "
            f"workers ({'with' if torch.cuda.is_available() else 'without'} CUDA)",
            flush=True,
        )
        res["ok"] = False
    return [*results, res]


def _decode_batch(scenes: Path, device: str, batch: int = 256) -> dict:
    import tarfile

    import open_clip
    import torch

    from mmpretrain.data.stream.image import decode_images, training_image_transform
    from mmpretrain.data.stream.seeds import seeded
    from mmpretrain.towers.base import uint8_transform

    files = sorted((scenes / "train").glob("*.tar"))
    jpgs: list[bytes] = []
    for f in files:
        with tarfile.open(f) as t:
            jpgs += [t.extractfile(m).read() for m in t if m.name.endswith(".jpg")]
        if len(jpgs) >= batch:
            break
    jpgs = jpgs[:batch]
    exact = uint8_transform(open_clip.image_transform(224, is_train=True))
    dev, fast = training_image_transform(exact, "gpu"), training_image_transform(exact, "fast")
    rows, ref = [], []
    for k, data in enumerate(jpgs):
        with seeded(k):
            rows.append(dev(data))
        with seeded(k):
            ref.append(fast(data))
    decode_images(rows[:8], device)  # warm-up (nvJPEG handles, kernels)
    times = []
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = decode_images(rows, device)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    diff = (out.cpu().float() - torch.stack(ref).float()).abs().mean().item()
    rate = batch / min(times)
    ok = out.shape == (batch, 3, 224, 224) and out.dtype == torch.uint8 and diff < 3.0
    print(
        f"{'PASS' if ok else 'FAIL'} gpu decode, one batch of {batch} on {device}: {rate:.0f} samples/s "
        f"(decode + crop + resize, best of 3), mean |difference| to the workers' fast path {diff:.2f} grey "
        f"levels of 255",
        flush=True,
    )
    return {"check": "gpu_decode_batch", "ok": ok, "device": device, "samples_per_s": rate, "diff": diff}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/mmpretrain-gpu-check", help="scratch directory (shards, runs)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default by GPU name)")
    p.add_argument("--timeout", type=float, default=240, help="seconds per check")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-fsdp-memory", action="store_true")
    p.add_argument("--skip-overhead", action="store_true", help="leave out the per-step overhead (~1.5 min)")
    p.add_argument("--skip-gpu-decode", action="store_true", help="leave out data.image_decode=gpu (~1 min)")
    p.add_argument(
        "--cpu-rehearsal",
        action="store_true",
        help="run the same checks on CPU processes (bf16 on CPU, gloo): tests this script without a GPU",
    )
    a = p.parse_args()
    import torch

    if not torch.cuda.is_available() and not a.cpu_rehearsal:
        print(
            "gpu-check needs a CUDA device (torch.cuda.is_available() is False); the CPU paths are in make "
            "test, and --cpu-rehearsal runs these checks on the CPU (data.image_decode=gpu then falls back "
            "to decoding in the workers, with a message)",
            file=sys.stderr,
        )
        return 2
    start = time.perf_counter()
    work = Path(a.work)
    digits = bc.digits_root(work)
    planned = checks(digits, work, a.steps, gpus=torch.cuda.device_count())
    if a.cpu_rehearsal:
        planned = [(name, run_dir, [on_cpu(c) for c in cmds]) for name, run_dir, cmds in planned]
    results = [run(name, cmds, run_dir, a.timeout) for name, run_dir, cmds in planned]
    if not a.skip_throughput and not a.cpu_rehearsal:
        results.append(throughput(digits, work, a.peak_tflops))
    if not a.skip_gpu_decode:
        results += gpu_decode(work, a.steps, a.cpu_rehearsal, a.timeout)
    if not a.skip_overhead:
        results.append(step_overhead(work, a.cpu_rehearsal, timeout=300))
    if not a.skip_fsdp_memory:
        results.append(fsdp_memory(a.cpu_rehearsal, timeout=600))
    failed = [r for r in results if not r["ok"]]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU rehearsal"
    print(
        f"gpu-check: {len(results) - len(failed)} of {len(results)} passed in "
        f"{time.perf_counter() - start:.0f} s "
        f"({device}, torch {torch.__version__})",
        flush=True,
    )
    (work / "gpu_check.json").write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
