"""What a newcomer reads in the first hour, through the installed console script: the model summary
(no ``Total FLOPs: 0``), the progress bar (no ``v_num``, ``Epoch 2/2`` on the second of two epochs),
``retrieval.png`` (class recall on the digits' template captions), the end-of-run summaries of
``train`` and ``eval``, and each command's ``--help`` (generated from the builders and commands).

One tiny two-epoch training run (with the default loggers, as users run it) serves every test
of the run; the eval run is the command the training's summary suggests, as printed."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from mmpretrain.cli import COMMANDS, PLAIN_COMMANDS
from mmpretrain.data.builders import BUILDERS, DEFAULT_OPTIONS, OPTIONS, TEACHER_EMBEDDINGS
from mmpretrain.evaluation.retrieval import CAPTIONS_REPEAT
from tests.integration.test_launch import run_cli


@pytest.fixture(scope="module")
def two_epochs(digits_root, tmp_path_factory):
    """``(cwd, stdout + stderr of train, of eval)`` of a 2-epoch run in ``cwd/run``."""
    cwd = tmp_path_factory.mktemp("first_hour")
    train = run_cli(
        [
            "train",
            f"data.root={digits_root}",
            "data.num_workers=0",
            "data.batch_size=512",  # 3 steps an epoch
            "trainer.max_epochs=2",
            "model.towers.text.config.text_cfg.width=32",
            "model.towers.text.config.text_cfg.heads=2",
            "model.towers.text.config.text_cfg.layers=1",
            "hydra.run.dir=run",
        ],
        cwd=cwd,
    )
    suggested = next(
        line.strip() for line in train.stdout.splitlines() if line.strip().startswith("mmpretrain eval")
    )
    evaluate = run_cli([*shlex.split(suggested)[1:], "hydra.run.dir=run/eval"], cwd=cwd)
    return cwd, train.stdout + train.stderr, evaluate.stdout + evaluate.stderr


def summary_of(output: str) -> dict[str, str]:
    """The end-of-run summary's ``label  value`` rows (labels may hold one space), and its next commands."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("zero-shot top-1"))
    rows, commands = {}, []
    for line in lines[start:]:
        if line.startswith("  mmpretrain "):
            commands.append(line.strip())
        elif line.startswith("run directory:"):
            break
        elif line != "next:":
            label, value = re.split(r"\s{2,}", line, maxsplit=1)
            rows[label] = value
    rows["next"] = "\n".join(commands)
    return rows


def test_model_summary_has_no_zero_flops(two_epochs):
    _, out, _ = two_epochs
    assert "Total params: " in out and "ContrastiveModel" in out
    assert "Total FLOPs: 0" not in out and "FLOPs" not in out
    # printed once, by our callback: Lightning's would say it skips its own default summary
    assert out.count("Total params: ") == 1 and "Trainer already configured" not in out


def test_progress_bar_counts_epochs_from_one_and_shows_no_version(two_epochs):
    _, out, _ = two_epochs
    assert "Epoch 2/2" in out and "Epoch 1/1" not in out
    assert "epoch 2 step" in out and "epoch 0 step" not in out  # the validation line counts as the bar does
    assert "train/loss" in out and "v_num" not in out  # the wandb logger has a version: it is not shown


def test_retrieval_plot_shows_class_recall_on_template_captions(two_epochs):
    cwd, _, _ = two_epochs
    metrics = json.loads((cwd / "run" / "metrics.json").read_text())
    repeat = metrics["val/caption_repeat_frac"]  # the digits' captions: class templates
    assert CAPTIONS_REPEAT < repeat <= 1.0
    with Image.open(cwd / "run" / "plots" / "retrieval.png") as im:
        assert im.text["Title"].startswith(f"class recall@k (val): {repeat:.0%} of val captions repeat")


def test_training_ends_with_a_summary_of_figures_files_and_next_commands(two_epochs):
    cwd, out, _ = two_epochs
    metrics = json.loads((cwd / "run" / "metrics.json").read_text())
    rows = summary_of(out)
    assert rows["zero-shot top-1"] == f"image_text {metrics['val/zeroshot_top1/image_text']:.3f}"
    assert rows[f"retrieval class R@1 ({metrics['val/caption_repeat_frac']:.0%} of val captions repeat)"] == (
        f"image→text {metrics['val/retrieval_class_R@1/image_to_text']:.3f}  "
        f"text→image {metrics['val/retrieval_class_R@1/text_to_image']:.3f}"
    )
    assert rows["plots"].startswith("run/plots/  (loss.png, zeroshot.png, retrieval.png and ")
    (best,) = [p.name for p in (cwd / "run" / "checkpoints").glob("best-epoch*.ckpt")]
    assert rows["checkpoints"] == f"run/checkpoints/  ({best}, last.ckpt)"
    assert rows["export"] == 'run/export/  (mmpretrain.load_pretrained("run/export"))'
    assert rows["metrics"] == "run/metrics.json"
    commands = rows["next"].splitlines()
    assert [c.split()[1] for c in commands] == ["eval", "finetune", "train", "sweep-summary"]
    assert commands[0].startswith("mmpretrain eval ckpt=run/export data.root=")
    assert commands[1].startswith("mmpretrain finetune task=linear_probe pretrained=run/export data.root=")
    assert commands[2].startswith("mmpretrain train -m data.root=") and "optim.lr=1e-3,3e-3" in commands[2]
    assert (
        commands[3] == "mmpretrain sweep-summary run-lr-sweep"
        and "hydra.sweep.dir=run-lr-sweep" in commands[2]
    )


def test_eval_of_the_suggested_command_ends_with_its_own_summary(two_epochs):
    cwd, _, out = two_epochs
    metrics = json.loads((cwd / "run" / "eval" / "eval_metrics.json").read_text())
    rows = summary_of(out)
    assert rows["zero-shot top-1"] == f"image_text {metrics['val/zeroshot_top1/image_text']:.3f}"
    assert rows["metrics"] == "run/eval/eval_metrics.json"
    commands = rows["next"].splitlines()
    assert [c.split()[1] for c in commands] == ["finetune", "train", "sweep-summary"]
    assert commands[-1] == "mmpretrain sweep-summary run-lr-sweep"  # beside the run that trained the export


# -- --help ---------------------------------------------------------------------------------------
def test_mmpretrain_help_lists_every_command_and_data_builder(tmp_path):
    lines = run_cli(["--help"], cwd=tmp_path).stdout.splitlines()
    for name in [*COMMANDS, *PLAIN_COMMANDS]:
        assert any(line.startswith(f"  {name} ") for line in lines), name
    (builders,) = [line for line in lines if line.startswith("mmpretrain data NAME: ")]
    # the bundled builders, then the command that writes a teacher's embeddings beside the shards
    assert builders.split(": ", 1)[1].split("   ")[0].split(", ") == [*BUILDERS, TEACHER_EMBEDDINGS[0]]


def test_data_help_lists_the_builders_with_their_options_not_training_groups(tmp_path):
    out = run_cli(["data", "--help"], cwd=tmp_path).stdout
    assert "Configuration groups" not in out and "optim" not in out
    lines = out.splitlines()
    for name in BUILDERS:
        (i,) = [i for i, line in enumerate(lines) if line.split()[:1] == [name]]
        keys = [option.split("=", 1)[0] for option in lines[i + 1].split()]
        assert keys == list(OPTIONS.get(name, DEFAULT_OPTIONS)), name
    assert "in=(required)" in out and "train=50000" in out  # a required option; a builder's own default
    # Hydra's own flags still work for the data command
    assert "name: scenes" in run_cli(["data", "scenes", "--cfg", "job"], cwd=tmp_path).stdout


def test_train_help_is_hydras_headed_by_the_command(tmp_path):
    out = run_cli(["train", "--help"], cwd=tmp_path).stdout
    assert out.startswith(f"mmpretrain train: {COMMANDS['train'][2]}")
    assert "== Configuration groups ==" in out and "experiment: " in out and "== Config ==" in out


def test_readme_shows_the_summaries_as_they_print(two_epochs):
    """The README's demo section pastes both summaries: same rows and next commands as the code prints."""
    _, train, evaluate = two_epochs
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### What the demo prints at the end", 1)[1].split("\n## ", 1)[0]
    pasted = re.findall(r"```text\n(.*?)```", section, re.DOTALL)
    assert len(pasted) == 2

    def shape(rows: dict[str, str]) -> tuple[list[str], list[str]]:
        labels = [re.sub(r"\d+%", "N%", label) for label in rows if label != "next"]
        return labels, [c.split()[1] for c in rows["next"].splitlines()]

    assert shape(summary_of(pasted[0])) == shape(summary_of(train))
    assert shape(summary_of(pasted[1])) == shape(summary_of(evaluate))
