"""Assemble benchmarks/results/*.md into benchmarks/RESULTS.md (date, machine, versions, tables)."""

from __future__ import annotations

import argparse

import bench_common as bc

SECTIONS = [
    ("throughput_cpu", "1. Training throughput vs open_clip_train (CPU)"),
    ("overhead", "2. Framework overhead: Lightning step vs plain PyTorch loop"),
    ("overhead_parts", "2b. Which of our default callbacks/loggers costs what (optional: "
     "`bench_overhead.py --name overhead_parts --modes ...`)"),
    ("data", "3. Data pipeline vs model consumption"),
    ("time_to_accuracy", "4. Time to accuracy (val zero-shot top-1 on the digits)"),
    ("throughput_cuda", "5. GPU: throughput at ViT-B/32 224 px bf16, MFU"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--note", action="append", default=[], help="extra line for the header (e.g. contention)")
    a = p.parse_args()
    info = bc.machine()
    lines = [
        "# Benchmarks: mmpretrain vs open_clip's trainer",
        "",
        "Reproduce with `make bench` (CPU, ~20 min on 2 quiet cores; `make bench-gpu` adds section 5 on a "
        "CUDA machine). Each table compares runs made side by side in the same `make bench`, interleaved; "
        "CSVs with every run are in `benchmarks/results/`.",
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
        elif name == "overhead_parts":
            del lines[-3:]  # optional section: no heading when not run
            continue
        elif name == "throughput_cuda":
            lines.append("Not measured: no GPU was available to this run. On a CUDA machine run "
                         "`make bench-gpu` (`scripts/bench_throughput.py --device cuda`: open_clip `ViT-B-32`, "
                         "224 px, bf16 autocast, batch 256, with MFU from torch's FLOP counter).")
        else:
            lines.append(f"Not run (no `{md.relative_to(bc.ROOT)}`).")
    out = bc.ROOT / "benchmarks" / "RESULTS.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
