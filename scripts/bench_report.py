"""Assemble benchmarks/results/*.md into benchmarks/RESULTS.md (date, machine, versions, tables)."""

from __future__ import annotations

import argparse

import bench_common as bc

from mmpretrain.io import write_text_atomic

SECTIONS = [
    ("throughput_cpu", "1. A whole training run vs open_clip_train (CPU): launch to exit"),
    ("overhead", "2. Framework overhead: Lightning step vs plain PyTorch loop"),
    (
        "overhead_micro",
        "2b. The Trainer's fixed cost per step: a micro model (~12 ms steps), and what each default "
        "callback/logger costs",
    ),
    (
        "overhead_gpu",
        "2c. The Trainer's fixed cost per step on a GPU (ViT-B-32 224 px bf16, `make gpu-check`)",
    ),
    ("data", "3. Data pipeline vs model consumption"),
    (
        "data_224",
        "3b. The data path at 224 px: samples/s per worker, ours vs open_clip_train's get_wds_dataset",
    ),
    ("time_to_accuracy", "4. Time to accuracy (val zero-shot top-1 on the digits)"),
    ("throughput_cuda", "5. GPU: throughput at ViT-B/32 224 px bf16, MFU"),
    (
        "scenes_time_to_target",
        "6. Time to fixed val retrieval targets on the scenes, 3-5 seeds a side (5 captions per image)",
    ),
    (
        "attention_cpu",
        "6b. CPU attention kernels under bf16: what `trainer.precision=auto` and `attention_kernel=auto` "
        "pick",
    ),
    ("store", "7. Object storage (an S3 server on the same cores): resume from the store, uploads"),
    ("patch_dropout", "8. Patch dropout (FLIP): step time and activation memory at 0.0 / 0.5 / 0.75"),
    ("distill_scenes", "9. Distillation on the scenes: a small ViT student alone vs distilled"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--note", action="append", default=[], help="extra line for the header (e.g. contention)")
    a = p.parse_args()
    info = bc.machine()
    lines = [
        "# Benchmarks: mmpretrain vs open_clip's trainer",
        "",
        "Reproduce with `make bench` (CPU, ~30 min on 2 quiet cores, install included; `make bench-gpu` "
        "adds section 5 on a CUDA machine). Each table compares runs made side by side in the same `make "
        "bench`, interleaved; CSVs with every run are in `benchmarks/results/`.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info.items()],
        "",
        *[f"- {n}" for n in a.note],
    ]
    for name, title in SECTIONS:
        md = bc.RESULTS / f"{name}.md"
        lines += ["", f"## {title}", ""]
        if md.exists():
            lines.append(md.read_text().rstrip())
        elif name == "overhead_gpu":
            lines.append(
                "Not measured: no GPU was available to this run (`make gpu-check` on a CUDA machine)."
            )
        elif name == "throughput_cuda":
            lines.append(
                "Not measured: no GPU was available to this run. On a CUDA machine run "
                "`make bench-gpu` (`scripts/bench_throughput.py --device cuda`: open_clip `ViT-B-32`, "
                "224 px, bf16 autocast, batch 256, with MFU from torch's FLOP counter)."
            )
        else:
            lines.append(f"Not run (no `{md.relative_to(bc.ROOT)}`).")
    out = bc.ROOT / "benchmarks" / "RESULTS.md"
    write_text_atomic(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")
    if quote_in_readme(info, a.note):
        print(f"updated the quoted tables in {README}")


README = bc.ROOT / "README.md"
#: The sections the README quotes; the others (their tables name commands the README's test would have to
#: run) stay in RESULTS.md only.
README_SECTIONS = {
    "throughput_cpu",
    "overhead",
    "overhead_micro",
    "overhead_gpu",
    "data",
    "time_to_accuracy",
    "throughput_cuda",
    "scenes_time_to_target",
    "attention_cpu",
}
QUOTE_START, QUOTE_END = "<!-- bench:start (written by scripts/bench_report.py) -->", "<!-- bench:end -->"


def quote_in_readme(info: dict[str, str], notes: list[str] | tuple[str, ...] = ()) -> bool:
    """Replace the README's block between the bench markers with the latest tables (sections run),
    under the same header notes as RESULTS.md (which machine measured what, when runs were mixed)."""
    text = README.read_text() if README.exists() else ""
    if QUOTE_START not in text or QUOTE_END not in text:
        return False
    block = [
        QUOTE_START,
        "",
        f"Assembled {info['date_utc']} ({info['host_cpu']}, {info['cores']} cores, torch "
        f"{info['torch']}, lightning {info['lightning']}, open_clip {info['open_clip']}"
        + (f", {info['gpu']}" if "gpu" in info else "")
        + ").",
        "",
        *[f"- {n}" for n in notes],
        *([""] if notes else []),
    ]
    for name, title in SECTIONS:
        md = bc.RESULTS / f"{name}.md"
        if md.exists() and name in README_SECTIONS:
            block += [f"#### {title}", "", md.read_text().rstrip(), ""]
    block.append(QUOTE_END)
    head, rest = text.split(QUOTE_START, 1)
    write_text_atomic(README, head + "\n".join(block) + rest.split(QUOTE_END, 1)[1])
    return True


if __name__ == "__main__":
    main()
