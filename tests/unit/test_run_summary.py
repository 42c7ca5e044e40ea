"""The end-of-run summary's choices, on made-up metrics: instance recall where val captions are
distinct (the scenes), class recall where they repeat (class templates), commands a shell can run."""

from __future__ import annotations

import shlex

import pytest

from mmpretrain.runs import launched_as_global_zero, summary

METRICS = {
    "val/zeroshot_top1/image_text": 0.5,
    "val/zeroshot_top1/color/image_text": 0.25,
    "val/retrieval_R@1/image_to_text": 0.125,
    "val/retrieval_R@1/text_to_image": 0.0625,
    "val/retrieval_class_R@1/image_to_text": 0.75,
    "val/retrieval_class_R@1/text_to_image": 0.875,
}


@pytest.mark.parametrize(
    ("repeat", "row"),
    [
        (0.008, "retrieval R@1  image→text 0.125  text→image 0.062"),  # the scenes: 0.8% repeat
        (0.89, "retrieval class R@1 (89% of val captions repeat)  image→text 0.750  text→image 0.875"),
        (None, "retrieval R@1  image→text 0.125  text→image 0.062"),  # not measured (no text tokens)
    ],
)
def test_retrieval_row_is_class_recall_only_where_most_captions_repeat(tmp_path, repeat, row):
    metrics = METRICS | ({} if repeat is None else {"val/caption_repeat_frac": repeat})
    lines = summary(metrics, tmp_path / "run", data_args=[]).splitlines()
    assert lines[0].split() == ["zero-shot", "top-1", "color/image_text", "0.250", "image_text", "0.500"]
    assert " ".join(lines[1].split()) == " ".join(row.split())


def test_repeated_captions_without_class_labels_show_instance_recall(tmp_path):
    """Captioned shards whose val captions all repeat but carry no cls: no class recall is measured,
    and the summary showed no retrieval row at all."""
    metrics = {k: v for k, v in METRICS.items() if "zeroshot" not in k and "class" not in k}
    lines = summary(metrics | {"val/caption_repeat_frac": 1.0}, tmp_path / "run", data_args=[]).splitlines()
    assert " ".join(lines[0].split()) == "retrieval R@1 image→text 0.125 text→image 0.062"


def test_next_commands_carry_the_data_overrides_quoted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a" / "export").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "export" / "model.safetensors").write_bytes(b"")
    data = ["data=scenes", "data.root=/my data/scenes"]
    text = summary(
        {},
        tmp_path / "runs" / "a",
        data_args=data,
        model=tmp_path / "runs/a/export",
        train_args=[*data, "optim.lr=1"],
    )
    lines = text.splitlines()
    assert lines[0] == 'export  runs/a/export/  (mmpretrain.load_pretrained("runs/a/export"))'
    commands = [shlex.split(line) for line in lines[lines.index("next:") + 1 :]]
    assert commands == [
        ["mmpretrain", "eval", "ckpt=runs/a/export", *data],
        ["mmpretrain", "finetune", "task=linear_probe", "pretrained=runs/a/export", *data],
        ["mmpretrain", "train", "-m", *data, "optim.lr=1e-3,3e-3", "hydra.sweep.dir=runs/a-lr-sweep"],
        ["mmpretrain", "sweep-summary", "runs/a-lr-sweep"],
    ]


def test_next_commands_give_a_repeated_override_once_with_the_value_that_won(tmp_path):
    """``data.shuffle_buffer=50 ... data.shuffle_buffer=0``: Hydra trains with 0; the commands said both."""
    data = ["data.shuffle_buffer=50", "data.root=/d", "data.shuffle_buffer=0"]
    text = summary({}, tmp_path, data_args=data, model=tmp_path, train_args=[*data, "+x=1", "++x=2"])
    commands = [shlex.split(line) for line in text.splitlines()[text.splitlines().index("next:") + 1 :]]
    assert commands[0][3:] == ["data.root=/d", "data.shuffle_buffer=0"]
    assert commands[2][3:-2] == ["data.root=/d", "data.shuffle_buffer=0", "++x=2"]


@pytest.mark.parametrize(
    "env, zero",
    [
        ({}, True),  # a plain run
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),  # Lightning's DDP launcher, rank 0
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # ... the rank it starts
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # a second node
        ({"RANK": "3", "LOCAL_RANK": "1"}, False),  # torchrun
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"SLURM_PROCID": "2"}, False),  # srun
        ({"SLURM_PROCID": "0", "RANK": ""}, True),
    ],
)
def test_global_zero_before_the_process_group_exists(env, zero):
    """Who prints the run directory and mirrors it to a store: rank 0 alone, under every launcher."""
    assert launched_as_global_zero(env) is zero
