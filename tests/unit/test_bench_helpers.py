"""The arithmetic and command building of scripts/bench_*.py (the benchmarks themselves run in `make
bench`)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_common as bc


def test_brace_pattern_names_exactly_our_shards():
    import braceexpand

    files = [Path(f"/d/train/train-{i:04d}.tar") for i in range(8)]
    pattern = bc.brace_pattern(files)
    assert pattern == "/d/train/train-{0000..0007}.tar"
    assert list(braceexpand.braceexpand(pattern)) == [str(f) for f in files]


def test_steady_rate_excludes_warmup_steps():
    # 3 slow warmup steps (10 s each), then 4 steps of 0.5 s: steady = 4 * 8 / 2.0 s.
    times = [10.0, 20.0, 30.0, 30.5, 31.0, 31.5, 32.0]
    assert bc.steady_rate(times, batch_size=8, warmup=3) == pytest.approx(16.0)
    assert bc.steady_rate(times, batch_size=8, warmup=0) == pytest.approx(8 * 6 / 22.0)
    with pytest.raises(SystemExit, match="warmup"):
        bc.steady_rate(times[:3], batch_size=8, warmup=3)


def test_md_table_formats_numbers():
    table = bc.md_table(["a", "b"], [["x", 1234.5], ["y", 0.12345]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x | 1234 |", "| y | 0.123 |"]


def test_each_section_names_the_machine_it_was_measured_on(tmp_path, monkeypatch):
    """RESULTS.md's sections can come from different runs of make bench, on different CPUs: each
    section's own last line says which (its header names only the machine of the latest run)."""
    monkeypatch.setattr(bc, "RESULTS", tmp_path)
    monkeypatch.setattr(bc, "_cpu_name", lambda: "Some CPU 9000")
    bc.write_results("x", [{"a": 1}], "| a |\n|---|\n| 1 |", ["a note"])
    last = (tmp_path / "x.md").read_text().splitlines()[-1]
    assert last.startswith("- measured ") and " on Some CPU 9000, load average at the end " in last
    assert (tmp_path / "x.csv").read_text().splitlines() == ["a", "1"]


def test_report_quotes_the_latest_tables_between_the_readme_markers(tmp_path, monkeypatch):
    import bench_report

    results = tmp_path / "results"
    results.mkdir()
    (results / "throughput_cpu.md").write_text("| trainer | x |\n|---|---|\n| ours | 2 |\n")
    (results / "overhead_parts.md").write_text("not quoted\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench_report.QUOTE_START}\nold table\n{bench_report.QUOTE_END}\noutro\n")
    monkeypatch.setattr(bc, "RESULTS", results)
    monkeypatch.setattr(bench_report, "README", readme)
    info = {"date_utc": "D", "host_cpu": "C", "cores": "2", "torch": "T", "lightning": "L", "open_clip": "O"}
    assert bench_report.quote_in_readme(info)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{bench_report.QUOTE_END}\noutro\n")
    assert "| ours | 2 |" in text and "A whole training run vs open_clip_train" in text
    assert "old table" not in text and "not quoted" not in text
    assert bench_report.quote_in_readme(info) and readme.read_text() == text  # idempotent
    assert bench_report.quote_in_readme(info, ["section 1 ran elsewhere"])
    assert "\n- section 1 ran elsewhere\n" in readme.read_text()  # the header's notes come along
    readme.write_text("no markers\n")
    assert not bench_report.quote_in_readme(info)


def test_time_to_target_counts_training_steps_not_evaluations():
    """Benchmark 6: an epoch's first step (its interval holds the evaluation) and the very first step
    count as one median step; the crossing is the first evaluation at or above the target; a seed that
    never reaches it makes the median a lower bound."""
    import bench_scenes_tta as tta

    # 2 epochs of 3 steps of 1 s; a 50 s evaluation before step 3 (the second epoch's first)
    steps = [5.0, 6.0, 7.0, 58.0, 59.0, 60.0]
    assert tta.training_seconds(steps, steps_per_epoch=3) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    history = [(10.0, 0, 0.004, 3.0, 384), (70.0, 1, 0.012, 6.0, 768)]
    assert tta.crossing(history, 0.01) == history[1] and tta.crossing(history, 0.02) is None
    assert tta.spread([3.0, 1.0, 2.0]) == "2 [1–3]"
    assert tta.spread([3.0, float("nan"), 2.0], unit=" s") == "3 s [2–3, 1 of 3 not reached]"
    assert tta.spread([float("nan"), float("nan"), 2.0]).startswith("> 2")  # the median never got there
    assert tta.spread([float("nan")]) == "not reached"


def test_time_to_target_compares_ours_with_every_open_clip_precision():
    """Benchmark 6 with open_clip_train at fp32 (merged from an earlier CSV) and at amp_bf16: a ratio
    line for ours against each of them, from the medians over seeds."""
    import bench_scenes_tta as tta

    def row(label, side, seconds_per_epoch):
        history = [(0.0, e, 0.005 * (e + 1), seconds_per_epoch * (e + 1), 100 * (e + 1)) for e in range(4)]
        return {
            "label": label,
            "side": side,
            "history": history,
            "best_mean_R1": 0.02,
            "median_step_s": 1.0,
            "load_avg_1m": 2.0,
        }

    ours, ref = tta.SIDES["ours"], tta.SIDES["open_clip"]
    rows = [
        row(ours, "ours", 10.0),
        row(ref, "open_clip", 20.0),
        row(f"{ref} --precision amp_bf16", "open_clip", 15.0),
    ]
    table = tta.summarize(rows, [0.02])
    assert f"- {ours} vs {ref}, to mean R@1 0.02: training time 2.00x" in table
    assert f"- {ours} vs {ref} --precision amp_bf16, to mean R@1 0.02: training time 1.50x" in table
    assert "amp_bf16 vs" not in table  # no open_clip label is compared with another
