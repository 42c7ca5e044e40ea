from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from mmpretrain.cli import CONF_DIR
from tests.conftest import compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose_config("train", [f"experiment={experiment}"], run_dir=tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["towers"], experiment
    assert resolved["loss"]["_target_"].startswith("mmpretrain.losses.")


def test_default_train_config_is_the_digits_clip_experiment(tmp_path):
    cfg = compose_config("train", [], run_dir=tmp_path)
    assert "digits" in cfg.tags and cfg.data.build == "digits"


def test_wrong_group_choice_fails_before_anything_heavy():
    with pytest.raises(ConfigCompositionException, match="model"):
        compose_config("train", ["model=does_not_exist"])


def test_unknown_key_fails():
    with pytest.raises((ConfigCompositionException, ConfigAttributeError, ConfigKeyError)):
        compose_config("train", ["trainer.not_a_trainer_arg=1"])


@pytest.mark.parametrize(
    "data", sorted(p.stem for p in (Path(__file__).parents[2] / "conf" / "data").glob("*.yaml"))
)
def test_every_data_config_takes_the_overrides_our_error_messages_suggest(data):
    """Error messages tell users to set data.shard_policy=, data.on_missing=, data.caption_keys=,
    data.modality_keys=, data.missing_shards=: each bundled data config must accept them without a
    '+' (a run of experiment=moving_digits_clip on too few shards was told to set
    data.shard_policy=resample, and Hydra refused the key)."""
    cfg = compose_config(
        "train",
        [
            f"data={data}",
            "data.shard_policy=resample",
            "data.on_missing=partial",
            "data.caption_keys=[json]",
            "data.modality_keys={audio: [mp4]}",
            "data.missing_shards=warn",
        ],
    )
    assert cfg.data.shard_policy == "resample" and cfg.data.on_missing == "partial"
    assert cfg.data.missing_shards == "warn"
