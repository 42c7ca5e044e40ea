"""sweep-summary on hand-made sweep directories: ordering, unfinished runs, direction, errors."""

import json

import yaml

from mmpretrain.cli import main
from mmpretrain.sweeps import summarize

KEY = "val/zeroshot_top1/image_text"


def make_run(root, name, overrides, metrics=None, direction=None, metric=KEY):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": metric}))
    if direction:
        (run / ".hydra" / "hydra.yaml").write_text(
            yaml.safe_dump({"hydra": {"sweeper": {"direction": direction}}})
        )
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_runs_best_first_unfinished_last(tmp_path):
    for i, (lr, acc) in enumerate([(1e-4, 0.2), (1e-3, 0.7), (3e-3, None), (1e-2, 0.5)]):
        make_run(
            tmp_path,
            str(i),
            [f"optim.lr={lr}", "data.batch_size=16"],
            None if acc is None else {KEY: acc, "train/loss": 1.0},
        )
    make_run(tmp_path, "10", ["optim.lr=0.1", "data.batch_size=16"], {"train/loss": 9.0})  # no val metric
    s = summarize(tmp_path)
    assert [r.path.name for r in s.runs] == ["1", "3", "0", "2", "10"]
    assert [r.finished for r in s.runs] == [True, True, True, False, True]
    varying, shared = s.varying_overrides()
    assert varying == ["optim.lr"] and shared == ["data.batch_size=16"]
    assert s.columns()[0] == KEY and "train/loss" in s.columns()


def test_direction_from_the_sweeper_and_metric_override(tmp_path):
    make_run(tmp_path, "0", ["a=1"], {KEY: 0.1, "val/loss": 3.0}, direction="minimize")
    make_run(tmp_path, "1", ["a=2"], {KEY: 0.9, "val/loss": 2.0}, direction="minimize")
    assert [r.path.name for r in summarize(tmp_path).runs] == ["0", "1"]  # the sweeper minimised
    assert [r.path.name for r in summarize(tmp_path, metric="val/loss").runs] == ["1", "0"]
    assert [r.path.name for r in summarize(tmp_path, maximize=True).runs] == ["1", "0"]


def test_cli_prints_the_table_and_fails_clearly_on_a_wrong_dir(tmp_path, capsys):
    make_run(tmp_path, "0", ["optim.lr=0.001"], {KEY: 0.25})
    make_run(tmp_path, "1", ["optim.lr=0.01"], {KEY: 0.75})
    assert main(["sweep-summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.index("optim.lr=0.01 ") < out.index("optim.lr=0.001") and "0.7500" in out
    assert main(["sweep-summary", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sweep-summary", str(tmp_path / "0" / ".hydra")]) == 2
    assert "no run under" in capsys.readouterr().err
