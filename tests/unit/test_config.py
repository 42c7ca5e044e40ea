"""Building objects from configs: allow-listed classes only, plain values, and class paths of earlier
versions still building the class that moved."""

from __future__ import annotations

import json

import pytest

from mmpretrain.config import MOVED, UnsafeTargetError, current_target, safe_instantiate, to_plain
from tests.conftest import compose_config


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_class_path_of_an_earlier_version_builds_the_class_where_it_lives_now(old):
    new = current_target(old)
    assert new != old and new.startswith("mmpretrain.")


def test_old_callback_and_strategy_targets_still_build():
    from mmpretrain.runtime.ddp import DDPStrategy
    from mmpretrain.training.monitor import StepStats

    assert isinstance(safe_instantiate({"_target_": "mmpretrain.monitor.StepStats"}), StepStats)
    assert isinstance(safe_instantiate({"_target_": "mmpretrain.ddp.DDPStrategy"}), DDPStrategy)


def test_a_moved_path_is_still_checked_against_the_allow_list():
    with pytest.raises(UnsafeTargetError):
        safe_instantiate({"_target_": "mmpretrain.cli.os.system"})


def test_a_model_built_from_a_composed_config_holds_plain_json_values(tmp_path):
    """An exported tower config must hold lists, not the strings of OmegaConf containers (a video
    tower's frame transform was once exported as "[0.7, 1.0]")."""
    from mmpretrain.model import build_model

    cfg = compose_config("train", ["model=tiny_video_text"], run_dir=tmp_path)
    plain = to_plain(cfg.model)
    assert isinstance(plain["towers"]["video"]["frame"]["transform"]["scale"], list)
    model = build_model(cfg.model)
    exported = json.loads(json.dumps(model.config(), default=str))
    assert exported["towers"]["video"]["frame"]["transform"]["scale"] == [0.7, 1.0]
