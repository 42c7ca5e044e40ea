"""finetune / eval / export configs compose for every task and resolve."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmpretrain.cli import COMMANDS, CONF_DIR
from tests.conftest import compose_config

TASKS = sorted(p.stem for p in (Path(CONF_DIR) / "task").glob("*.yaml"))


@pytest.mark.parametrize("task", TASKS)
def test_every_task_composes_and_resolves(task, tmp_path):
    cfg = compose_config(
        "finetune", [f"task={task}", "pretrained=x.ckpt", "fusion=attention"], run_dir=tmp_path
    )
    resolved = OmegaConf.to_container(cfg.task, resolve=True)
    assert resolved["name"] == task
    if task == "fusion":
        assert resolved["fusion"] == "attention"


def test_open_clip_model_config_is_accepted_by_finetune_eval_and_export():
    for name, extra in (
        ("finetune", ["pretrained=x.pt"]),
        ("eval", ["ckpt=x.pt"]),
        ("export", ["ckpt=x.pt", "out=o"]),
    ):
        cfg = compose_config(
            name, [*extra, "model=openclip", "model.config=conf/model/open_clip/vit-4x192-p8-64.json"]
        )
        assert OmegaConf.to_container(cfg.model, resolve=True)["towers"]["image"]["config"].endswith(".json")
    assert "finetune" in COMMANDS


def test_eval_prompt_files_default_to_the_data_val_files():
    cfg = compose_config("eval", ["ckpt=x", "data.root=/d"])
    assert cfg.classnames == "/d/classnames.txt" and cfg.templates == "/d/templates.txt"
