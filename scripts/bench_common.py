"""Shared helpers of the benchmarks in scripts/bench_*.py (run by `make bench`).

Every benchmark runs the things it compares side by side in one process tree, interleaved
(A B A B ...), and writes ``benchmarks/results/<name>.csv`` plus ``<name>.md`` (its table);
``scripts/bench_report.py`` assembles them into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
REF_DIR = ROOT / ".bench" / "ref"  # webdataset 0.2.86 (+ pandas) for open_clip_train only
MODEL_DIR = ROOT / "benchmarks" / "models"  # open_clip model-config JSONs both trainers read
MODEL_DIRS = (MODEL_DIR, ROOT / "conf" / "model" / "open_clip")  # both registered for open_clip_train
CPU_MODEL = "vit-4x192-p8-64"  # experiment=clip_vit-tiny_digits: ViT 4x192 patch 8 at 64 px (sections 1-3)
CPU_BATCH, CPU_WORKERS = 64, 1  # the work of the whole-run comparison (section 1)
SMALL_MODEL = "bench-vit-2x128-p8-32"  # time to accuracy (section 4): many epochs on 2 cores
GPU_MODEL = "ViT-B-32"  # open_clip's registry config, 224 px

# Dense bf16 peak FLOP/s by accelerator name (for MFU); extend as needed or pass --peak-tflops.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def model_json(name: str) -> Path:
    """The open_clip model-config JSON named ``name`` in :data:`MODEL_DIRS`."""
    for folder in MODEL_DIRS:
        if (folder / f"{name}.json").exists():
            return folder / f"{name}.json"
    raise SystemExit(f"no model config {name}.json in {', '.join(str(d) for d in MODEL_DIRS)}")


def python() -> str:
    return sys.executable


def digits_root(base: Path) -> Path:
    """The bundled digits shards under ``base`` (built once with `mmpretrain data digits`)."""
    root = base / "digits"
    if not (root / "train" / "sizes.json").exists():
        run_checked([python(), "-m", "mmpretrain.cli", "data", "digits", f"out={root}"], env=child_env())
    return root


def scenes(root: Path, **options: int) -> Path:
    """``mmpretrain data scenes out=root`` with ``options`` (``train=2000``, ...), built once: a root
    whose val split has its ``sizes.json`` is reused."""
    if not (root / "val" / "sizes.json").exists():
        opts = [f"{k}={v}" for k, v in options.items()]
        run_checked(
            [python(), "-m", "mmpretrain.cli", "data", "scenes", f"out={root}", *opts], env=child_env()
        )
    return root


def train_shards(root: Path) -> tuple[list[Path], int]:
    sizes = json.loads((root / "train" / "sizes.json").read_text())
    return [root / "train" / n for n in sorted(sizes)], sum(sizes.values())


def brace_pattern(files: list[Path]) -> str:
    """``dir/train-{0000..0007}.tar`` for open_clip_train (it expands braces, not globs)."""
    stems = [f.stem for f in files]
    prefix = os.path.commonprefix(stems).rstrip("0123456789")
    nums = [s[len(prefix) :] for s in stems]
    return str(files[0].parent / f"{prefix}{{{nums[0]}..{nums[-1]}}}.tar")


def open_clip_cpu_args(
    model: str,
    shards: list[Path],
    n_train: int,
    val_shards: list[Path],
    n_val: int,
    epochs: int,
    workers: int,
    warmup: int,
    seed: int,
    options: tuple[str, ...] = (),
    precision: str = "fp32",
) -> list[str]:
    """open_clip_train's arguments for a CPU run (``--precision``, fp32 by default) on our webdataset
    shards, logging to ``{out}`` and nowhere else; ``options`` (e.g. ``--batch-size``, ``--lr``) go before
    the shared tail."""
    return [
        *("--model", model, "--dataset-type", "webdataset", *options),
        *("--train-data", brace_pattern(shards), "--train-num-samples", str(n_train)),
        *("--val-data", brace_pattern(val_shards), "--val-num-samples", str(n_val)),
        *("--epochs", str(epochs), "--workers", str(workers), "--precision", precision, "--device", "cpu"),
        *("--warmup", str(warmup), "--seed", str(seed)),
        *("--logs", "{out}", "--name", "run", "--report-to", ""),
    ]


def child_env(threads: int | None = None, reference: bool = False) -> dict[str, str]:
    """Environment of a benchmarked child: our tree first; the reference also sees .bench/ref."""
    env = dict(os.environ)
    paths = [str(ROOT)]
    if reference:
        if not (REF_DIR / "webdataset").is_dir():
            raise SystemExit(
                f"{REF_DIR} is missing: run `make bench-ref` (installs open_clip_train's webdataset 0.2.86)"
            )
        paths.insert(0, str(REF_DIR))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["WANDB_SILENT"] = "true"
    env.setdefault("HYDRA_FULL_ERROR", "1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_checked(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, env=env, cwd=cwd or ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"command failed ({proc.returncode}): "
            f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def run_timed(cmd: list[str], env: dict[str, str], log: Path, timeout: float, watch=None) -> dict:
    """Run ``cmd``; timestamp each output line as it arrives (seconds since start).

    ``watch(t, line)`` may return True to stop the child early (e.g. a target accuracy reached).
    Returns ``{"wall_s", "rc", "lines": [(t, line)], "stopped", "timed_out"}``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines, stopped, timed_out = [], False, False
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    with open(log, "w") as f:
        while True:
            left = timeout - (time.perf_counter() - start)
            if left <= 0:
                timed_out = True
                break
            if not sel.select(timeout=min(left, 1.0)):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            t = time.perf_counter() - start
            f.write(f"[{t:8.2f}] {line}")
            lines.append((t, line.rstrip("\n")))
            if watch is not None and watch(t, line):
                stopped = True
                break
        if stopped or timed_out:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0 and not (stopped or timed_out):
        tail = "\n".join(line for _, line in lines[-40:])
        raise SystemExit(f"benchmarked command failed ({rc}); log {log}:\n{tail}")
    return {"wall_s": wall, "rc": rc, "lines": lines, "stopped": stopped, "timed_out": timed_out}


def steady_rate(step_times: list[float], batch_size: int, warmup: int) -> float:
    """Samples/s between the end of step ``warmup`` and the last step (warmup steps excluded)."""
    if len(step_times) <= warmup + 1:
        raise SystemExit(f"only {len(step_times)} steps recorded; need more than warmup={warmup} + 1")
    span = step_times[-1] - step_times[warmup - 1 if warmup else 0]
    steps = len(step_times) - (warmup if warmup else 1)
    return batch_size * steps / span


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict[str, str]:
    import torch

    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host_cpu": _cpu_name(),
        "cores": str(os.cpu_count()),
        "load_avg_1m": f"{os.getloadavg()[0]:.1f}",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for pkg in ("lightning", "open_clip", "timm", "webdataset"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001
            info[pkg] = "?"
    ref = next(REF_DIR.glob("webdataset-*.dist-info"), None) if REF_DIR.is_dir() else None
    info["reference webdataset"] = ref.name.removesuffix(".dist-info").split("-")[1] if ref else "?"
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def write_results(name: str, rows: list[dict], table: str, notes: list[str]) -> None:
    """``benchmarks/results/<name>.csv`` (all rows) and ``<name>.md`` (table + notes), each written
    atomically (a benchmark killed while writing leaves the previous results whole); print the table."""
    from mmpretrain.io import atomic_write, write_text_atomic

    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    atomic_write(RESULTS / f"{name}.csv", write_csv)
    info = machine()
    md = f"{table}\n\n" + "".join(f"- {n}\n" for n in notes)
    # The machine on the section's own line: RESULTS.md's sections may come from different runs of make bench.
    md += f"- measured {info['date_utc']} on {info['host_cpu']}, "
    md += f"load average at the end {info['load_avg_1m']} on {info['cores']} cores\n"
    write_text_atomic(RESULTS / f"{name}.md", md)
    print(md, flush=True)


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


# -- peak memory of this process ------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> tuple[bool, int]:
    """Reset this process's peak resident memory (Linux ``/proc/self/clear_refs``) and return
    ``(exact, baseline kB)``: with ``exact`` the peak read later is the peak since now; without
    (no /proc), it is the process's lifetime peak (``ru_maxrss``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return True, _status_kb("VmRSS") or 0


def peak_rss_kb(exact: bool) -> int:
    """Peak resident memory in kB (since :func:`reset_peak_rss` when ``exact``)."""
    peak = _status_kb("VmHWM") if exact else None
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
